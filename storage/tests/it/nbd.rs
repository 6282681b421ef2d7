//! The NBD server, driven by the real qemu tools and libnbd's nbdinfo / nbdcopy, and by
//! a raw protocol client for what tools do not show.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        let mut conn = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
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

// ---------------------------------------------------------------------------------
// Connection lifetime, structured replies, block status, owner-only unix sockets.

const KIB: u64 = 1 << 10;

/// Runs a tool with a deadline: a hang is the bug these tests look for, so it fails the
/// test (after killing the tool) instead of blocking the suite.
fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tool runs");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{cmd:?} did not finish within {deadline:?} (hung): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(cmd: &mut Command) -> String {
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A thin 8 MiB volume (64 KiB stripe units over 2 disks) with data at [0, 1 MiB) and
/// [5 MiB, 5 MiB + 64 KiB) and never-written holes elsewhere; returns its contents.
fn partly_written(store: &Store, name: &str) -> Vec<u8> {
    let volume = store
        .create_volume(&spec(name, 8 * MIB, 64 * KIB, 2))
        .unwrap();
    let mut image = vec![0u8; 8 * MIB as usize];
    let first = pattern(81, MIB as usize);
    let second = pattern(82, 64 * KIB as usize);
    volume.write_at(0, &first).unwrap();
    volume.write_at(5 * MIB, &second).unwrap();
    image[..MIB as usize].copy_from_slice(&first);
    image[5 * MIB as usize..(5 * MIB + 64 * KIB) as usize].copy_from_slice(&second);
    image
}

/// The extents `partly_written` leaves, as (offset, length, is data).
fn expected_extents() -> Vec<(u64, u64, bool)> {
    vec![
        (0, MIB, true),
        (MIB, 4 * MIB, false),
        (5 * MIB, 64 * KIB, true),
        (5 * MIB + 64 * KIB, 3 * MIB - 64 * KIB, false),
    ]
}

/// An owner-only unix-socket server in `dir` exporting `name`.
fn serve_unix(store: &Store, dir: &Path, name: &str) -> NbdServer {
    let exports = Arc::new(Exports::new());
    exports.insert(name, Arc::new(store.volume(name).unwrap()));
    NbdServer::start_unix(&dir.join("nbd.sock"), exports).unwrap()
}

fn wait_for_no_connections(server: &NbdServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.live_connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.live_connections(), 0, "connections left open");
}

/// Sockets on TCP port `port` (either end) by kernel state, from /proc/net/tcp{,6}, with
/// their inodes.
fn tcp_sockets_on_port(port: u16) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port != Some(port) {
                continue;
            }
            let state = match fields[3] {
                "01" => "ESTABLISHED",
                "06" => "TIME_WAIT",
                "08" => "CLOSE_WAIT",
                "0A" => "LISTEN",
                other => other,
            };
            found.push((state.to_string(), fields[9].parse().unwrap_or(0)));
        }
    }
    found
}

/// Descriptors of this process that are one of `inodes`' sockets.
fn own_fds_for(inodes: &[u64]) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| {
            let target = target.to_string_lossy();
            inodes
                .iter()
                .any(|inode| *inode != 0 && target == format!("socket:[{inode}]"))
        })
        .count()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A raw NBD client: fixed newstyle handshake, then requests, for what the tools hide.
struct RawClient<S: Read + Write> {
    stream: S,
}

impl<S: Read + Write> RawClient<S> {
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.stream.read_exact(&mut b).unwrap();
        u32::from_be_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.stream.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.stream.read_exact(&mut b).unwrap();
        b
    }

    /// Greeting and client flags (fixed newstyle, no zeroes).
    fn hello(mut stream: S) -> Self {
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        RawClient { stream }
    }

    /// Sends an option, returns its replies up to the final one as (type, data).
    fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut msg = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.stream.write_all(&msg).unwrap();
        let mut replies = Vec::new();
        loop {
            assert_eq!(self.u64(), 0x0003_e889_0455_65a9, "option reply magic");
            assert_eq!(self.u32(), option);
            let kind = self.u32();
            let len = self.u32() as usize;
            let data = self.bytes(len);
            let last = kind == 1 || kind & (1 << 31) != 0;
            replies.push((kind, data));
            if last {
                return replies;
            }
        }
    }

    /// STRUCTURED_REPLY, SET_META_CONTEXT base:allocation (if `meta`), GO.
    fn go(&mut self, name: &str, structured: bool, meta: bool) -> u64 {
        if structured {
            assert_eq!(self.option(8, &[]), vec![(1, vec![])]);
        }
        if meta {
            let mut data = (name.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&15u32.to_be_bytes());
            data.extend_from_slice(b"base:allocation");
            let replies = self.option(10, &data);
            assert_eq!(replies.len(), 2, "{replies:?}");
            assert_eq!(replies[0].0, 4);
            assert_eq!(&replies[0].1[4..], b"base:allocation");
        }
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let replies = self.option(7, &data);
        assert_eq!(replies.last().unwrap().0, 1, "GO acknowledged: {replies:?}");
        let export = replies
            .iter()
            .find(|(kind, data)| *kind == 3 && data[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        u64::from_be_bytes(export.1[2..10].try_into().unwrap())
    }

    fn request(&mut self, flags: u16, command: u16, handle: u64, offset: u64, len: u32) {
        let mut msg = 0x2560_9513u32.to_be_bytes().to_vec();
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&command.to_be_bytes());
        msg.extend_from_slice(&handle.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        self.stream.write_all(&msg).unwrap();
    }

    /// One structured reply chunk: (flags, type, handle, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), 0x668e_33ef, "structured reply magic");
        let head = self.bytes(4);
        let flags = u16::from_be_bytes([head[0], head[1]]);
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let handle = self.u64();
        let len = self.u32() as usize;
        (flags, kind, handle, self.bytes(len))
    }
}

/// Regression (issue 12, item 8): the accept loop kept a clone of every accepted socket
/// until the server stopped, so every finished client left a descriptor and a CLOSE-WAIT
/// socket behind. Now a connection's last descriptor goes when it ends.
#[test]
fn finished_connections_leave_no_descriptors_or_close_wait_sockets() {
    let (_dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    partly_written(&store, "v");
    let server = serve(&store, "v");
    let port = server.local_addr().unwrap().port();
    let fds_before = open_fds();

    // Clients that disconnect politely (NBD_CMD_DISC), abort the handshake, or just drop.
    for _ in 0..10 {
        let stream = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let mut client = RawClient::hello(stream);
        client.go("v", true, true);
        client.request(0, 2, 1, 0, 0);
        drop(client);
        let mut client =
            RawClient::hello(std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap());
        client.option(2, &[]);
        drop(std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap());
    }
    let mut runs = 0;
    if have("qemu-img") {
        for _ in 0..20 {
            ok(Command::new("qemu-img")
                .args(["info", "-f", "raw"])
                .arg(server.uri("v")));
            runs += 1;
        }
    } else {
        eprintln!("qemu-img is not installed (apt-get install qemu-utils): raw clients only");
    }
    wait_for_no_connections(&server);
    let sockets = tcp_sockets_on_port(port);
    let inodes: Vec<u64> = sockets
        .iter()
        .filter(|(state, _)| state != "LISTEN")
        .map(|(_, inode)| *inode)
        .collect();
    let fds_after = open_fds();
    eprintln!(
        "30 raw clients + {runs} qemu-img info: open fds of the test process {fds_before} -> {fds_after} \
         (other tests run beside this one), sockets on port {port}: {sockets:?}"
    );
    assert!(
        !sockets
            .iter()
            .any(|(state, _)| state == "CLOSE_WAIT" || state == "ESTABLISHED"),
        "sockets left open on port {port}: {sockets:?}"
    );
    assert_eq!(
        own_fds_for(&inodes),
        0,
        "the server holds descriptors of finished connections"
    );
    server.shutdown();
}

/// NBD_CMD_DISC closes the socket (the client sees end of file), on TCP and unix sockets.
#[test]
fn disconnect_command_closes_the_socket() {
    let (dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    partly_written(&store, "v");
    let tcp = serve(&store, "v");
    let stream = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut client = RawClient::hello(stream);
    client.go("v", false, false);
    client.request(0, 2, 7, 0, 0);
    let mut rest = Vec::new();
    client
        .stream
        .read_to_end(&mut rest)
        .expect("the server closes the TCP connection after NBD_CMD_DISC");
    assert!(rest.is_empty());

    let unix = serve_unix(&store, dir.path(), "v");
    let stream = std::os::unix::net::UnixStream::connect(unix.socket_path().unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut client = RawClient::hello(stream);
    client.go("v", true, true);
    client.request(0, 2, 7, 0, 0);
    let mut rest = Vec::new();
    client
        .stream
        .read_to_end(&mut rest)
        .expect("the server closes the unix connection after NBD_CMD_DISC");
    assert!(rest.is_empty());
    wait_for_no_connections(&tcp);
    wait_for_no_connections(&unix);
}

/// Structured replies and block status on the wire: reads come back as one data chunk,
/// block status reports the holes of a thin volume, REQ_ONE gives one extent, and
/// asking without a negotiated context is refused with a message.
#[test]
fn block_status_reports_holes_and_reads_are_structured() {
    let (dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    let image = partly_written(&store, "v");
    let server = serve_unix(&store, dir.path(), "v");
    let connect = || {
        let s = std::os::unix::net::UnixStream::connect(server.socket_path().unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawClient::hello(s)
    };
    let mut client = connect();
    assert_eq!(client.go("v", true, true), 8 * MIB);

    // Whole volume: the four extents, holes flagged HOLE|ZERO (3).
    client.request(0, 7, 1, 0, 8 * MIB as u32);
    let (flags, kind, handle, payload) = client.chunk();
    assert_eq!((flags, kind, handle), (1, 5, 1));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), 1);
    let extents: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    let expected: Vec<(u32, u32)> = expected_extents()
        .into_iter()
        .map(|(_, len, data)| (len as u32, if data { 0 } else { 3 }))
        .collect();
    assert_eq!(extents, expected);

    // An unaligned range starting in the hole, one extent only (REQ_ONE).
    client.request(1 << 3, 7, 2, MIB + 1000, 5000);
    let (_, kind, _, payload) = client.chunk();
    assert_eq!(kind, 5);
    assert_eq!(payload.len(), 12, "one descriptor");
    assert_eq!(&payload[4..], &[0, 0, 0x13, 0x88, 0, 0, 0, 3]);

    // A structured read: one OFFSET_DATA chunk carrying offset and bytes.
    client.request(0, 0, 3, 4096 + 17, 10000);
    let (flags, kind, handle, payload) = client.chunk();
    assert_eq!((flags, kind, handle), (1, 1, 3));
    assert_eq!(
        u64::from_be_bytes(payload[..8].try_into().unwrap()),
        4096 + 17
    );
    assert!(payload[8..] == image[4096 + 17..4096 + 17 + 10000]);

    // A read past the end: an error chunk (EINVAL) with a message.
    client.request(0, 0, 4, 8 * MIB, 4096);
    let (flags, kind, handle, payload) = client.chunk();
    assert_eq!((flags, kind, handle), (1, 0x8001, 4));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), 22);
    assert!(String::from_utf8_lossy(&payload[6..]).contains("past the end"));
    client.request(0, 2, 5, 0, 0);

    // Without base:allocation selected, block status is refused (EINVAL).
    let mut client = connect();
    client.go("v", true, false);
    client.request(0, 7, 9, 0, 4096);
    let (_, kind, handle, payload) = client.chunk();
    assert_eq!((kind, handle), (0x8001, 9));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), 22);
    // Metadata contexts before structured replies are refused as invalid.
    let mut client = connect();
    let mut data = 1u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"v");
    data.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(client.option(9, &data)[0].0, (1 << 31) + 3);
}

#[test]
fn nbdinfo_json_and_map_finish_and_report_the_holes_of_a_thin_volume() {
    if !have("nbdinfo") {
        eprintln!("skipping: nbdinfo is not installed (apt-get install libnbd-bin)");
        return;
    }
    let (dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    partly_written(&store, "thin");
    let server = serve_unix(&store, dir.path(), "thin");
    let uri = server.uri("thin");

    let json = ok(Command::new("nbdinfo").arg("--json").arg(&uri));
    eprintln!("nbdinfo --json {uri}:\n{json}");
    let compact: String = json.split_whitespace().collect();
    assert!(compact.contains("\"export-size\":8388608"), "{json}");
    assert!(compact.contains("\"base:allocation\""), "{json}");
    assert!(compact.contains("\"can_multi_conn\":true"), "{json}");

    let map = ok(Command::new("nbdinfo").arg("--map").arg(&uri));
    eprintln!("nbdinfo --map {uri}:\n{map}");
    let extents: Vec<(u64, u64, bool)> = map
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let kind: u32 = fields[2].parse().unwrap();
            (
                fields[0].parse().unwrap(),
                fields[1].parse().unwrap(),
                kind & 1 == 0,
            )
        })
        .collect();
    assert_eq!(extents, expected_extents(), "{map}");
    assert!(map.contains("hole,zero"), "{map}");
    wait_for_no_connections(&server);
}

#[test]
fn nbdcopy_copies_a_thin_volume_out_byte_identical() {
    if !have("nbdcopy") {
        eprintln!("skipping: nbdcopy is not installed (apt-get install libnbd-bin)");
        return;
    }
    let (dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    let image = partly_written(&store, "thin");
    let server = serve_unix(&store, dir.path(), "thin");
    let out = dir.path().join("copy.img");
    std::fs::File::create(&out).unwrap();
    ok(Command::new("nbdcopy").arg(server.uri("thin")).arg(&out));
    let copy = std::fs::read(&out).unwrap();
    assert_eq!(copy.len(), image.len());
    assert!(copy == image, "nbdcopy's copy differs from the volume");
    let meta = std::fs::metadata(&out).unwrap();
    eprintln!(
        "nbdcopy wrote {} bytes, {} KiB allocated in the file (data is 1088 KiB)",
        meta.len(),
        meta.blocks() * 512 / 1024
    );
    wait_for_no_connections(&server);
}

#[test]
fn qemu_img_map_shows_the_data_and_zero_extents() {
    if !have("qemu-img") {
        eprintln!("skipping: qemu-img is not installed (apt-get install qemu-utils)");
        return;
    }
    let (dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    partly_written(&store, "thin");
    let server = serve_unix(&store, dir.path(), "thin");
    let map = ok(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(server.uri("thin")));
    eprintln!("qemu-img map --output=json:\n{map}");
    let number = |entry: &str, key: &str| -> u64 {
        let at = entry.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
        entry[at..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let flag = |entry: &str, key: &str| -> bool {
        let at = entry.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
        entry[at..].trim_start().starts_with("true")
    };
    let extents: Vec<(u64, u64, bool)> = map
        .split('{')
        .skip(1)
        .map(|entry| {
            let data = flag(entry, "data");
            assert_eq!(flag(entry, "zero"), !data, "holes read as zeros: {entry}");
            (number(entry, "start"), number(entry, "length"), data)
        })
        .collect();
    assert_eq!(extents, expected_extents(), "{map}");
    wait_for_no_connections(&server);
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Issue 12, item 11: an export on a unix socket is for its owner only. `nobody` is
/// refused by the socket's mode (0600) and, if the mode is loosened, by the peer
/// credential check; the owner connects; the socket is gone once the server stops.
#[test]
fn unix_socket_exports_are_for_their_owner_only() {
    let (dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    partly_written(&store, "v");
    // Let others traverse the directory, so only the socket's own protection is tested.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = serve_unix(&store, dir.path(), "v");
    let socket = server.socket_path().unwrap().to_owned();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let uri = server.uri("v");
    assert_eq!(
        uri,
        format!("nbd+unix:///v?socket={}", socket.display()),
        "a plain temp path needs no escaping"
    );

    if !have("nbdinfo") {
        eprintln!(
            "skipping the client part: nbdinfo is not installed (apt-get install libnbd-bin)"
        );
    } else {
        ok(Command::new("nbdinfo").arg(&uri));
        if !is_root() || !have("runuser") {
            eprintln!("skipping the other-user part: needs root and runuser");
        } else {
            let as_nobody = |uri: &str| {
                run_with_deadline(
                    Command::new("runuser").args(["-u", "nobody", "--", "nbdinfo", uri]),
                    Duration::from_secs(30),
                )
            };
            let out = as_nobody(&uri);
            eprintln!("nbdinfo as nobody (socket 0600): {}", text(&out));
            assert!(!out.status.success(), "nobody connected: {}", text(&out));
            assert!(text(&out).contains("Permission denied"), "{}", text(&out));
            if have("qemu-io") {
                // The client of the original report: qemu-io reading as nobody.
                let out = run_with_deadline(
                    Command::new("runuser")
                        .args(["-u", "nobody", "--", "qemu-io", "-f", "raw"])
                        .arg(&uri)
                        .args(["-c", "read 0 4k"]),
                    Duration::from_secs(30),
                );
                eprintln!("qemu-io as nobody (socket 0600): {}", text(&out));
                assert!(
                    !out.status.success(),
                    "nobody read the volume: {}",
                    text(&out)
                );
            }

            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
            let out = as_nobody(&uri);
            eprintln!("nbdinfo as nobody (socket made 0666): {}", text(&out));
            // The server answers every option with NBD_REP_ERR_POLICY; libnbd 1.14
            // prints it as "Operation not supported" without the server's message.
            assert!(!out.status.success(), "nobody connected: {}", text(&out));
            assert!(
                text(&out).contains("server replied with error to opt_go"),
                "{}",
                text(&out)
            );
        }
    }
    wait_for_no_connections(&server);
    server.shutdown();
    assert!(
        !socket.exists(),
        "the socket file is removed when the server stops"
    );
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err());
}

/// A stale socket file (nobody listening) is replaced; a live one or another file is not.
#[test]
fn unix_socket_paths_are_checked() {
    let (dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    partly_written(&store, "v");
    let path = dir.path().join("nbd.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let server = serve_unix(&store, dir.path(), "v");
    let exports = Arc::new(Exports::new());
    assert!(matches!(
        NbdServer::start_unix(&path, exports.clone()),
        Err(NbdError::SocketInUse { .. })
    ));
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        NbdServer::start_unix(&file, exports.clone()),
        Err(NbdError::SocketInUse { .. })
    ));
    let long = dir.path().join("x".repeat(120));
    assert!(matches!(
        NbdServer::start_unix(&long, exports),
        Err(NbdError::SocketPathTooLong { .. })
    ));
    drop(server);
    assert!(!path.exists());
}
