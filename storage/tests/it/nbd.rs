//! The NBD server, driven by the real qemu tools.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use storage::nbd::{Exports, NbdError, NbdServer};
use storage::{EngineKind, Store};

use crate::{check_read, pattern, spec, store_with_disks};

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn serve(store: &Store, name: &str) -> NbdServer {
    let exports = Arc::new(Exports::new());
    exports.insert(name, Arc::new(store.volume(name).unwrap()));
    NbdServer::start("127.0.0.1:0".parse().unwrap(), exports).unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("tool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

#[test]
fn qemu_img_writes_an_image_into_a_volume_and_reads_it_back_byte_identical() {
    if !have("qemu-img") {
        eprintln!("skipping: qemu-img is not installed (apt-get install qemu-utils)");
        return;
    }
    let (dir, store) = store_with_disks(2, 32 * MIB, EngineKind::Auto);
    store
        .create_volume(&spec("vm1-disk0", 4 * MIB, 64 * 1024, 2))
        .unwrap();
    let server = serve(&store, "vm1-disk0");
    let uri = server.uri("vm1-disk0");

    // An image with data, a hole of zeros, and an odd-sized tail.
    let mut image = pattern(60, 3 * MIB as usize + 1536);
    image[MIB as usize..MIB as usize + 262144].fill(0);
    let src = dir.path().join("src.img");
    std::fs::write(&src, &image).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));

    let out = dir.path().join("out.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&out));
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), 4 * MIB as usize);
    assert!(
        back[..image.len()] == image[..],
        "image read back over NBD is byte-identical"
    );
    assert!(back[image.len()..].iter().all(|&b| b == 0));

    // And the volume itself holds the bytes, checksums verified.
    let vol = store.volume("vm1-disk0").unwrap();
    check_read(&vol, 0, &image[..3 * MIB as usize]);
    let info = run(Command::new("qemu-img")
        .args(["info", "-f", "raw"])
        .arg(&uri));
    assert!(info.contains("4 MiB") || info.contains("4194304"), "{info}");
    server.shutdown();
}

#[test]
fn qemu_io_pattern_writes_unaligned_writes_flush_and_discard() {
    if !have("qemu-io") {
        eprintln!("skipping: qemu-io is not installed (apt-get install qemu-utils)");
        return;
    }
    let (_dir, store) = store_with_disks(1, 16 * MIB, EngineKind::Auto);
    store
        .create_volume(&spec("scratch", 2 * MIB, 4096, 1))
        .unwrap();
    let server = serve(&store, "scratch");
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(server.uri("scratch"))
        .args([
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1000 3000",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 1000",
            "-c",
            "read -P 0xcd 1000 3000",
            "-c",
            "read -P 0xab 4000 1044576",
            "-c",
            "discard 1M 64k",
            "-c",
            "write -z 1536k 8k",
            "-c",
            "read -P 0 1536k 8k",
        ]));
    assert!(!out.contains("fail"), "qemu-io reported a failure: {out}");
    let mut expected = vec![0xabu8; MIB as usize];
    expected[1000..4000].fill(0xcd);
    check_read(&store.volume("scratch").unwrap(), 0, &expected);
}

#[test]
fn unknown_exports_are_refused_and_only_loopback_is_served() {
    let addr: SocketAddr = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(
        NbdServer::start(addr, Arc::new(Exports::new())),
        Err(NbdError::NotLoopback { .. })
    ));
    if !have("qemu-img") {
        eprintln!("skipping the qemu-img part: qemu-img is not installed");
        return;
    }
    let (_dir, store) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    store.create_volume(&spec("v", MIB, 4096, 1)).unwrap();
    let server = serve(&store, "v");
    let out = Command::new("qemu-img")
        .args(["info", "-f", "raw"])
        .arg(server.uri("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unknown export must not open");
    let snapshot = store.create_snapshot("v", "s").unwrap();
    let exports = Arc::new(Exports::new());
    exports.insert("v-s", Arc::new(snapshot));
    let ro = NbdServer::start("127.0.0.1:0".parse().unwrap(), exports).unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(ro.uri("v-s"))
        .args(["-c", "write 0 4k"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || text.to_lowercase().contains("read-only")
            || text.contains("Permission denied")
            || text.contains("failed"),
        "{text}"
    );
}

/// Garbage and truncated handshakes end only their own connection; the server keeps
/// serving well-behaved clients.
#[test]
fn malformed_clients_do_not_take_the_server_down() {
    use std::io::{Read, Write};
    let (_dir, store) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    store.create_volume(&spec("v", MIB, 4096, 1)).unwrap();
    let server = serve(&store, "v");
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\n\r\n",
        &[0xff; 64],
        // Valid client flags, then an option header claiming a huge payload.
        &[
            0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0xff, 0xff,
            0xff, 0xff,
        ],
        &[],
    ];
    for bytes in garbage {
        let mut conn = std::net::TcpStream::connect(server.local_addr()).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut hello = [0u8; 18];
        conn.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        let _ = conn.write_all(bytes);
        drop(conn);
    }
    if !have("qemu-io") {
        eprintln!("skipping the qemu-io part: qemu-io is not installed");
        return;
    }
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(server.uri("v"))
        .args(["-c", "write -P 0x11 0 64k", "-c", "read -P 0x11 0 64k"]));
    assert!(!out.contains("fail"), "{out}");
}
