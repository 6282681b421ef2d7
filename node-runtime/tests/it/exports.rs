//! NBD exports through the node API: an owner-only unix socket (`nbd+unix://` URI), a
//! lifetime after which the socket and its connections are gone, no descriptors left
//! behind by finished clients, exports kept across a restart, and a running VM's disk
//! exported read-only only.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use proto::auth::Identity;
use proto::client::NodeClient;
use proto::v1::{
    CreateVolume, ExportVolume, ExportVolumeResult, UnexportVolume, WriteVolume,
    apply_request::Action, apply_response::Result as ApplyResult,
};

use crate::harness::{TestNode, apply_ok, controller, pattern, request};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .map(|line| line.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs a tool with a deadline; a hang fails the test instead of blocking the suite.
fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tool runs");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within 60 s (hung)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A node on its own loopback address (tests of this module use 127.0.0.41–49).
fn start_node(name: &str, data_dir: &Path, controller: &Identity, ip: &str) -> TestNode {
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(
        data_dir.join("trusted-controllers"),
        format!("{} test-controller\n", controller.public_key_hex()),
    )
    .unwrap();
    TestNode::start_at(name, data_dir, &format!("{ip}:0"))
}

/// The pid of the `cairn-node` serving `data_dir`, found in /proc by its command line.
fn node_pid(data_dir: &Path) -> u32 {
    let wanted = data_dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        if args.first().is_some_and(|arg| arg.ends_with("cairn-node")) && args.contains(&wanted) {
            return pid;
        }
    }
    panic!("no cairn-node process serves {wanted}");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// An 8 MiB volume (64 KiB units over 2 columns) with data at [0, 1 MiB) and
/// [5 MiB, 5 MiB + 64 KiB), holes elsewhere.
async fn partly_written_volume(client: &mut NodeClient, name: &str) -> Vec<u8> {
    apply_ok(
        client,
        &format!("create-{name}"),
        Action::CreateVolume(CreateVolume {
            name: name.into(),
            size_bytes: 8 * MIB,
            stripe_width: 2,
            stripe_unit_bytes: 64 * KIB,
            replica_peers: Vec::new(),
        }),
    )
    .await;
    let mut image = vec![0u8; 8 * MIB as usize];
    for (index, (offset, length)) in [(0, MIB), (5 * MIB, 64 * KIB)].into_iter().enumerate() {
        let data = pattern(index as u64 + 7, length as usize);
        image[offset as usize..(offset + length) as usize].copy_from_slice(&data);
        apply_ok(
            client,
            &format!("write-{name}-{index}"),
            Action::WriteVolume(WriteVolume {
                name: name.into(),
                offset,
                data,
            }),
        )
        .await;
    }
    image
}

async fn export(
    client: &mut NodeClient,
    id: &str,
    name: &str,
    lifetime_seconds: u64,
) -> ExportVolumeResult {
    export_mode(client, id, name, lifetime_seconds, false)
        .await
        .unwrap_or_else(|status| panic!("export {id} failed: {status:?}"))
}

async fn export_mode(
    client: &mut NodeClient,
    id: &str,
    name: &str,
    lifetime_seconds: u64,
    read_only: bool,
) -> Result<ExportVolumeResult, tonic::Status> {
    let response = client
        .apply(request(
            id,
            Action::ExportVolume(ExportVolume {
                name: name.into(),
                lifetime_seconds,
                read_only,
            }),
        ))
        .await?;
    let Some(ApplyResult::ExportVolume(export)) = response.result else {
        panic!("unexpected result {response:?}");
    };
    Ok(export)
}

async fn observed_uri(client: &mut NodeClient, name: &str) -> String {
    client
        .observe()
        .await
        .unwrap()
        .volumes
        .into_iter()
        .find(|volume| volume.name == name)
        .map(|volume| volume.export_uri)
        .unwrap_or_default()
}

fn wait_until_gone(path: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Issue 12, item 11: the export is an `nbd+unix://` URI on a 0600 socket in a 0700
/// directory; the owner reads it (holes included), `nobody` is refused; after its
/// lifetime the socket is gone and an open connection is closed; a lifetime over a year
/// is refused naming the field; unexport removes the socket at once.
#[tokio::test(flavor = "multi_thread")]
async fn export_is_an_owner_only_unix_socket_that_closes_after_its_lifetime() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let data_dir = base.path().join("n");
    let node = start_node("exp-a", &data_dir, &controller, "127.0.0.41");
    let mut client = node.client(&controller).await;
    let image = partly_written_volume(&mut client, "disk").await;

    let refused = client
        .apply(request(
            "export-forever",
            Action::ExportVolume(ExportVolume {
                name: "disk".into(),
                lifetime_seconds: 400 * 24 * 3600,
                read_only: false,
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("export_volume.lifetime_seconds"),
        "{}",
        refused.message()
    );

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let lifetime = 5;
    let exported = export(&mut client, "export-disk", "disk", lifetime).await;
    eprintln!("ExportVolume returned {exported:?}");
    let socket = PathBuf::from(&exported.socket_path);
    assert_eq!(socket, data_dir.join("exports").join("disk.sock"));
    assert_eq!(
        exported.uri,
        format!("nbd+unix:///disk?socket={}", socket.display())
    );
    assert!(
        (before + lifetime * 1000..before + lifetime * 1000 + 10_000)
            .contains(&exported.expires_at_unix_ms),
        "expires at {} (asked at {before})",
        exported.expires_at_unix_ms
    );
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(observed_uri(&mut client, "disk").await, exported.uri);

    // A connection held open across the expiry.
    let mut held = UnixStream::connect(&socket).expect("the owner connects");
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut greeting = [0u8; 18];
    held.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");

    if have("nbdinfo") {
        let out = run(Command::new("nbdinfo").arg("--map").arg(&exported.uri));
        eprintln!("nbdinfo --map {}:\n{}", exported.uri, text(&out));
        assert!(out.status.success(), "{}", text(&out));
        let map: Vec<Vec<String>> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| line.split_whitespace().map(String::from).collect())
            .collect();
        let expected = [
            ["0", "1048576", "0"],
            ["1048576", "4194304", "3"],
            ["5242880", "65536", "0"],
            ["5308416", "3080192", "3"],
        ];
        assert_eq!(map.len(), expected.len(), "{map:?}");
        for (line, want) in map.iter().zip(expected) {
            assert_eq!(&line[..3], want, "{map:?}");
        }
        if is_root() && have("runuser") {
            let out =
                run(Command::new("runuser").args(["-u", "nobody", "--", "nbdinfo", &exported.uri]));
            eprintln!("nbdinfo as nobody: {}", text(&out));
            assert!(!out.status.success(), "nobody connected: {}", text(&out));
            assert!(text(&out).contains("Permission denied"), "{}", text(&out));
        } else {
            eprintln!("skipping the other-user part: needs root and runuser");
        }
    } else {
        eprintln!(
            "skipping the nbdinfo part: nbdinfo is not installed (apt-get install libnbd-bin)"
        );
    }
    if have("qemu-img") {
        assert!(
            qemu_img_copy(&exported.uri, base.path()) == image,
            "qemu-img copy differs"
        );
    }

    // After the lifetime: socket gone, the held connection closed, Observe says so.
    assert!(
        wait_until_gone(&socket, Duration::from_secs(lifetime + 10)),
        "the socket outlived the export's lifetime"
    );
    let mut rest = Vec::new();
    let closed = held.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "the held connection was closed at expiry: {closed:?}"
    );
    assert!(UnixStream::connect(&socket).is_err());
    assert_eq!(observed_uri(&mut client, "disk").await, "");

    // Exported again without a lifetime, then unexported: the socket goes at once.
    let again = export(&mut client, "export-disk-again", "disk", 0).await;
    assert_eq!(again.uri, exported.uri);
    assert_eq!(again.expires_at_unix_ms, 0);
    assert!(socket.exists());
    apply_ok(
        &mut client,
        "unexport-disk",
        Action::UnexportVolume(UnexportVolume {
            name: "disk".into(),
        }),
    )
    .await;
    assert!(!socket.exists(), "unexport removes the socket");
    assert_eq!(observed_uri(&mut client, "disk").await, "");
}

/// Issue 12, item 8: 20 `qemu-img info` runs raised the node's open files from 29 to 49
/// (24 sockets in CLOSE-WAIT). Finished clients must leave no descriptor behind.
#[tokio::test(flavor = "multi_thread")]
async fn finished_nbd_clients_leave_no_descriptors_in_the_node() {
    if !have("qemu-img") {
        eprintln!("skipping: qemu-img is not installed (apt-get install qemu-utils)");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let data_dir = base.path().join("n");
    let node = start_node("exp-b", &data_dir, &controller, "127.0.0.42");
    let mut client = node.client(&controller).await;
    let image = partly_written_volume(&mut client, "disk").await;
    let exported = export(&mut client, "export-disk", "disk", 0).await;
    let pid = node_pid(&data_dir);

    // One client first, so lazily opened files (engine, thread pools) are open before
    // the count starts.
    let out = run(Command::new("qemu-img")
        .args(["info", "-f", "raw"])
        .arg(&exported.uri));
    assert!(out.status.success(), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(300));
    let before = open_fds(pid);
    for _ in 0..20 {
        let out = run(Command::new("qemu-img")
            .args(["info", "-f", "raw"])
            .arg(&exported.uri));
        assert!(out.status.success(), "{}", text(&out));
    }
    let mut extra = Vec::new();
    if have("nbdinfo") && have("nbdcopy") {
        for _ in 0..5 {
            let out = run(Command::new("nbdinfo").arg("--json").arg(&exported.uri));
            assert!(out.status.success(), "{}", text(&out));
        }
        let copy = base.path().join("copy.img");
        std::fs::File::create(&copy).unwrap();
        let out = run(Command::new("nbdcopy").arg(&exported.uri).arg(&copy));
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            std::fs::read(&copy).unwrap() == image,
            "nbdcopy copy differs"
        );
        extra.push("5 nbdinfo --json + 1 nbdcopy");
    } else {
        eprintln!("nbdinfo/nbdcopy are not installed (apt-get install libnbd-bin): qemu-img only");
    }
    // Connection threads close their socket as they end; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = open_fds(pid);
    while after > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = open_fds(pid);
    }
    eprintln!(
        "cairn-node open fds: {before} before, {after} after 20 qemu-img info {}",
        extra.join(" ")
    );
    assert!(
        after <= before,
        "finished NBD clients left {} descriptors open in the node",
        after - before
    );
}

/// The export's bytes, as `qemu-img convert` copies them into `scratch/copy.img`.
fn qemu_img_copy(uri: &str, scratch: &Path) -> Vec<u8> {
    let copy = scratch.join("copy.img");
    let _ = std::fs::remove_file(&copy);
    let out = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri)
        .arg(&copy));
    assert!(
        out.status.success(),
        "qemu-img convert {uri}: {}",
        text(&out)
    );
    std::fs::read(&copy).unwrap()
}

/// `nbdinfo --json URI`'s `is_read_only`.
fn nbd_read_only(uri: &str) -> bool {
    let out = run(Command::new("nbdinfo").arg("--json").arg(uri));
    assert!(out.status.success(), "nbdinfo {uri}: {}", text(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["exports"][0]["is_read_only"]
        .as_bool()
        .unwrap_or_else(|| panic!("nbdinfo --json has no is_read_only: {info}"))
}

/// Issue 15, item 8: an export (and its lifetime) is kept in node.redb; after kill -9
/// and a restart the node serves it again on the same socket, so qemu-img and nbdinfo
/// read the same bytes through the same URI; one whose lifetime ran out meanwhile is
/// not served again.
#[tokio::test(flavor = "multi_thread")]
async fn exports_survive_kill_9_of_the_node_with_their_uri_and_lifetime() {
    if !have("qemu-img") || !have("nbdinfo") {
        eprintln!("skipping: needs qemu-img (qemu-utils) and nbdinfo (libnbd-bin)");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let data_dir = base.path().join("n");
    let mut node = start_node("exp-c", &data_dir, &controller, "127.0.0.43");
    let mut client = node.client(&controller).await;
    let image = partly_written_volume(&mut client, "kept").await;
    partly_written_volume(&mut client, "brief").await;
    let kept = export(&mut client, "export-kept", "kept", 3600).await;
    let brief = export(&mut client, "export-brief", "brief", 3).await;
    let read_only = export_mode(&mut client, "export-brief-ro", "brief", 3, true)
        .await
        .unwrap();
    assert!(read_only.read_only);
    assert_eq!(read_only.uri, brief.uri);
    assert!(
        nbd_read_only(&brief.uri),
        "the export was served again read-only"
    );

    node.kill_9();
    std::thread::sleep(Duration::from_secs(3));
    let node = start_node("exp-c", &data_dir, &controller, "127.0.0.43");
    let mut client = node.client(&controller).await;
    assert_eq!(observed_uri(&mut client, "kept").await, kept.uri);
    assert!(
        qemu_img_copy(&kept.uri, base.path()) == image,
        "the export after the restart reads other bytes"
    );
    assert!(!nbd_read_only(&kept.uri));
    // Its lifetime is the one it was given before the restart.
    let again = export(&mut client, "export-kept-again", "kept", 3600).await;
    assert!(again.expires_at_unix_ms >= kept.expires_at_unix_ms);
    // The brief one ran out while the node was down.
    assert_eq!(observed_uri(&mut client, "brief").await, "");
    assert!(!Path::new(&brief.socket_path).exists());
    let out = run(Command::new("nbdinfo").arg(&brief.uri));
    assert!(!out.status.success(), "{}", text(&out));
    // Unexported: not served after the next restart either.
    apply_ok(
        &mut client,
        "unexport-kept",
        Action::UnexportVolume(UnexportVolume {
            name: "kept".into(),
        }),
    )
    .await;
    drop(client);
    let mut node = node;
    node.kill_9();
    let node = start_node("exp-c", &data_dir, &controller, "127.0.0.43");
    let mut client = node.client(&controller).await;
    assert_eq!(observed_uri(&mut client, "kept").await, "");
    assert!(!Path::new(&kept.socket_path).exists());
}

/// Issue 15, item 8: a running VM's disk is exported read-only: a writable export is
/// refused naming the VM, a read-only one reads the disk (nbdinfo says read-only, a
/// qemu-io write is refused), and a writable export made while the VM was stopped
/// turns read-only when it starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_vms_disk_is_exported_read_only() {
    if !crate::vms::vms_can_run() {
        return;
    }
    if !have("nbdinfo") || !have("qemu-io") {
        eprintln!("skipping: needs nbdinfo (libnbd-bin) and qemu-io (qemu-utils)");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = start_node("exp-d", &base.path().join("n"), &controller, "127.0.0.44");
    let mut client = node.client(&controller).await;
    let image = partly_written_volume(&mut client, "r-root").await;
    apply_ok(
        &mut client,
        "create-r",
        Action::CreateVm(proto::v1::CreateVm {
            name: "r".into(),
            vcpus: 1,
            memory_bytes: 32 << 20,
            image: Some(proto::v1::create_vm::Image::Builtin("cairn-guest".into())),
            volumes: vec!["r-root".into()],
            ..Default::default()
        }),
    )
    .await;
    // Stopped: writable.
    let writable = export(&mut client, "export-w", "r-root", 0).await;
    assert!(!writable.read_only);
    assert!(!nbd_read_only(&writable.uri));

    apply_ok(
        &mut client,
        "start-r",
        Action::StartVm(proto::v1::StartVm { name: "r".into() }),
    )
    .await;
    assert!(
        nbd_read_only(&writable.uri),
        "the writable export turned read-only when the VM started"
    );
    let refused = export_mode(&mut client, "export-w2", "r-root", 0, false)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("vm `r`") && refused.message().contains("read-only"),
        "{}",
        refused.message()
    );
    let read_only = export_mode(&mut client, "export-ro", "r-root", 0, true)
        .await
        .unwrap();
    assert!(read_only.read_only);
    assert_eq!(read_only.uri, writable.uri);
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x55 0 4096"])
        .arg(&read_only.uri));
    eprintln!("qemu-io write to the read-only export: {}", text(&out));
    let said = text(&out);
    assert!(
        !out.status.success() || said.contains("ermission denied") || said.contains("read-only"),
        "the write was not refused: {said}"
    );
    let read = qemu_img_copy(&read_only.uri, base.path());
    assert!(
        read[..4096] == image[..4096],
        "the refused write changed the disk"
    );

    // Stopped again: a writable export is allowed.
    apply_ok(
        &mut client,
        "stop-r",
        Action::StopVm(proto::v1::StopVm {
            name: "r".into(),
            grace_ms: 1000,
        }),
    )
    .await;
    let writable = export_mode(&mut client, "export-w3", "r-root", 0, false)
        .await
        .unwrap();
    assert!(!writable.read_only);
    assert!(!nbd_read_only(&writable.uri));
}
