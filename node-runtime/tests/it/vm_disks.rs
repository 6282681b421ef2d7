//! A VM's disks are its volumes: the built-in guest writes through virtio-blk, the VMM
//! hands each request to the node over NBD, the node's replicated write path puts it on
//! the primary and the replica; qemu-img reads the same bytes back through the
//! volume's NBD export, and the replica node holds them too.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proto::client::NodeClient;
use proto::v1::{
    CreateVm, CreateVolume, ExportVolume, Peer, ReadVolumeRequest, StartVm, StopVm, VmState,
    VmStatus, apply_request::Action, apply_response::Result as ApplyResult, create_vm::Image,
};

use crate::harness::{TestNode, apply_ok, controller};
use crate::replication::push_peers;
use crate::vms::vms_can_run;

const VOLUME_BYTES: u64 = 8 << 20;
const SECTOR: u64 = 512;

/// What the built-in guest's self-test writes in round `round` to the disk's last 4 KiB.
pub(crate) fn guest_pattern(disk_bytes: u64, round: u64) -> Vec<u8> {
    vmm::guest::block_test_pattern(disk_bytes / SECTOR - 8, round)
}

pub(crate) async fn observe_vm(client: &mut NodeClient, name: &str) -> VmStatus {
    client
        .observe()
        .await
        .expect("observe")
        .vms
        .into_iter()
        .find(|vm| vm.name == name)
        .expect("the VM is observed")
}

/// Waits until the guest has completed `tests` block self-tests.
pub(crate) async fn await_block_tests(client: &mut NodeClient, name: &str, tests: u64) -> VmStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let vm = observe_vm(client, name).await;
        if vm.guest_block_tests >= tests {
            return vm;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the guest did not complete block self-test {tests} in 30 s: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The volume's last 4 KiB, read by `qemu-img convert` through its NBD export on `client`'s
/// node (the export any NBD client uses, `cairn volume export` included).
async fn read_tail_with_qemu_img(client: &mut NodeClient, volume: &str, scratch: &Path) -> Vec<u8> {
    let exported = apply_ok(
        client,
        "export",
        Action::ExportVolume(ExportVolume {
            name: volume.into(),
            lifetime_seconds: 60,
            // The VM runs: its disk is exported read-only only.
            read_only: true,
        }),
    )
    .await;
    let Some(ApplyResult::ExportVolume(export)) = exported.result else {
        panic!("unexpected result {exported:?}");
    };
    let out = scratch.join("disk.img");
    let _ = std::fs::remove_file(&out);
    let output = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &export.uri])
        .arg(&out)
        .output()
        .expect("run qemu-img");
    assert!(
        output.status.success(),
        "qemu-img convert from {} failed: {}",
        export.uri,
        String::from_utf8_lossy(&output.stderr)
    );
    let image = std::fs::read(&out).expect("qemu-img's output");
    assert_eq!(image.len() as u64, VOLUME_BYTES);
    image[image.len() - 4096..].to_vec()
}

/// Whether qemu-img runs here; says why a test skips when it does not.
pub(crate) fn qemu_img_available() -> bool {
    let runs = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !runs {
        eprintln!("skipping: qemu-img is not installed (apt-get install qemu-utils)");
    }
    runs
}

/// Two nodes under `base` (`a/`, `b/`) listening on `ips`, each a peer of the other.
pub(crate) async fn two_peers(
    base: &Path,
    names: [&str; 2],
    ips: [&str; 2],
    controller: &proto::auth::Identity,
) -> [TestNode; 2] {
    let nodes = [
        TestNode::start_on(names[0], &base.join("a"), controller, ips[0]),
        TestNode::start_on(names[1], &base.join("b"), controller, ips[1]),
    ];
    push_peers(&nodes, controller).await;
    nodes
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_writes_its_disk_through_the_node_onto_both_copies_and_qemu_img_reads_it_back() {
    if !vms_can_run() || !qemu_img_available() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let nodes = two_peers(
        base.path(),
        ["vd-a", "vd-b"],
        ["127.0.0.71", "127.0.0.72"],
        &controller,
    )
    .await;
    let [primary, replica] = &nodes;
    let mut client = primary.client(&controller).await;
    apply_ok(
        &mut client,
        "volume",
        Action::CreateVolume(CreateVolume {
            name: "g-root".into(),
            size_bytes: VOLUME_BYTES,
            stripe_width: 2,
            stripe_unit_bytes: 1 << 20,
            replica_peers: vec![Peer {
                name: replica.name.clone(),
                ..Default::default()
            }],
        }),
    )
    .await;
    apply_ok(
        &mut client,
        "create",
        Action::CreateVm(CreateVm {
            name: "g".into(),
            vcpus: 1,
            memory_bytes: 32 << 20,
            image: Some(Image::Builtin("cairn-guest".into())),
            volumes: vec!["g-root".into()],
            ..Default::default()
        }),
    )
    .await;
    apply_ok(
        &mut client,
        "start",
        Action::StartVm(StartVm { name: "g".into() }),
    )
    .await;
    let socket = primary.data_dir.join("exports/vm-g-0.sock");
    assert!(
        socket.exists(),
        "the VM's disk is served on {}",
        socket.display()
    );

    // The guest's boot-time self-test wrote round 1 through virtio-blk → NBD → node.
    let vm = await_block_tests(&mut client, "g", 1).await;
    assert_eq!(vm.state, VmState::Running as i32);
    assert_eq!(vm.guest_block_test, "pass", "{vm:?}");
    let [disk] = &vm.disks[..] else {
        panic!("one disk: {:?}", vm.disks);
    };
    assert_eq!(disk.volume, "g-root");
    assert!(disk.attached, "{disk:?}");
    assert_eq!((disk.device, disk.data.as_str()), (0, "local"));
    assert_eq!((disk.copies, disk.copies_in_sync), (2, 2), "{disk:?}");
    assert!(disk.writes >= 1 && disk.bytes_written >= 4096, "{disk:?}");
    assert!(disk.reads >= 1 && disk.errors == 0, "{disk:?}");

    let expected = guest_pattern(VOLUME_BYTES, 1);
    assert_eq!(
        vm.guest_block_checksum,
        vmm::guest::block_checksum(&expected),
        "the guest read back what it wrote (its own checksum, through status)"
    );
    let tail = read_tail_with_qemu_img(&mut client, "g-root", base.path()).await;
    assert!(
        tail == expected,
        "qemu-img reads the guest's bytes through NBD: {} bytes, {:02x?} … expected {:02x?}",
        tail.len(),
        &tail[..tail.len().min(16)],
        &expected[..16]
    );

    // The guest runs its self-test again when asked (round 2: other bytes); the
    // replica node holds exactly what the guest wrote, read through that node.
    let control = primary.data_dir.join("vms/g/control.sock");
    tokio::task::spawn_blocking(move || {
        let mut vmm = vmm::control::ControlClient::connect(&control, Duration::from_secs(5))
            .expect("control socket");
        vmm.request(&vmm::control::Request::BlockTest)
            .expect("block-test");
    })
    .await
    .unwrap();
    let vm = await_block_tests(&mut client, "g", 2).await;
    assert_eq!(vm.guest_block_test, "pass", "{vm:?}");
    let expected = guest_pattern(VOLUME_BYTES, 2);
    assert_eq!(
        vm.guest_block_checksum,
        vmm::guest::block_checksum(&expected)
    );
    assert_ne!(expected, guest_pattern(VOLUME_BYTES, 1));
    let mut on_replica = replica.client(&controller).await;
    let copy = on_replica
        .read_volume(ReadVolumeRequest {
            name: "g-root".into(),
            offset: VOLUME_BYTES - 4096,
            length: 4096,
        })
        .await
        .expect("read the replica's copy");
    assert!(
        copy == expected,
        "the replica holds the guest's second write"
    );
    let tail = read_tail_with_qemu_img(&mut client, "g-root", base.path()).await;
    assert!(tail == expected, "the primary too");

    // The export lives as long as the VM runs.
    apply_ok(
        &mut client,
        "stop",
        Action::StopVm(StopVm {
            name: "g".into(),
            grace_ms: 5000,
        }),
    )
    .await;
    assert!(
        !socket.exists(),
        "the disk's socket is removed when the VM stops"
    );
    let vm = observe_vm(&mut client, "g").await;
    assert!(!vm.disks[0].attached, "{:?}", vm.disks);
}
