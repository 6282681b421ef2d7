//! Guest I/O that people can see (issue 15, item 6): through the node API
//! (`Apply.GuestDiskIo`) the built-in guest writes a seeded pattern through virtio-blk
//! onto its replicated volume and checksums it; the host-computed CRC-32C of the
//! expected pattern matches the guest's, the bytes qemu-img reads back through the
//! volume's NBD export (read-only while the VM runs, writable once it stopped), and the
//! replica's copy. Observe shows the guest's own counters
//! next to the VMM's and the copies in sync.

use std::path::Path;
use std::process::Command;

use proto::client::NodeClient;
use proto::v1::{
    CreateVm, CreateVolume, ExportVolume, GuestDiskIoRequest, GuestDiskIoResponse, GuestDiskOp,
    Peer, ReadVolumeRequest, StartVm, StopVm, VmStatus, apply_request::Action,
    apply_response::Result as ApplyResult, create_vm::Image,
};
use tonic::Code;
use vmm::guest::{disk_checksum, disk_pattern};

use crate::harness::{apply_ok, controller};
use crate::vm_disks::{qemu_img_available, two_peers};
use crate::vms::vms_can_run;

const DATA_BYTES: u64 = 8 << 20;
/// 192 KiB across the first 1 MiB stripe unit's end: 3 guest requests of 64 KiB. (On
/// PVM the built-in guest's instructions are emulated, about 1 µs each, so it computes
/// the pattern and CRC-32C of 64 KiB in about half a second; far more would be slow.)
const OFFSET: u64 = (1 << 20) - (64 << 10);
const LENGTH: u64 = 192 << 10;
const SEED: u64 = 0xFEED_F00D;

fn io(op: GuestDiskOp, disk: u32, offset: u64, length: u64, seed: u64) -> GuestDiskIoRequest {
    GuestDiskIoRequest {
        vm: "g".into(),
        disk,
        op: op as i32,
        offset,
        length,
        seed,
        timeout_ms: 0,
    }
}

async fn guest_io(client: &mut NodeClient, request: GuestDiskIoRequest) -> GuestDiskIoResponse {
    client
        .guest_disk_io(request.clone())
        .await
        .unwrap_or_else(|status| panic!("{request:?} refused: {status:?}"))
}

async fn observe_vm(client: &mut NodeClient) -> VmStatus {
    client
        .observe()
        .await
        .expect("observe")
        .vms
        .into_iter()
        .find(|vm| vm.name == "g")
        .expect("the VM is observed")
}

/// SIGKILLs the VM's process if the test ends before it stops the VM (a VMM outlives
/// its node agent, so a failed test would leave it running).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0 != 0 {
            let _ = Command::new("kill")
                .args(["-s", "KILL", &self.0.to_string()])
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_writes_a_pattern_that_qemu_img_reads_back_through_the_export_with_the_same_crc32c()
 {
    if !vms_can_run() || !qemu_img_available() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let nodes = two_peers(
        base.path(),
        ["gio-a", "gio-b"],
        ["127.0.0.141", "127.0.0.142"],
        &controller,
    )
    .await;
    let [primary, replica] = &nodes;
    let mut client = primary.client(&controller).await;
    for (name, size, peers) in [
        ("g-root", 1 << 20, vec![]),
        (
            "g-data",
            DATA_BYTES,
            vec![Peer {
                name: replica.name.clone(),
                ..Default::default()
            }],
        ),
    ] {
        apply_ok(
            &mut client,
            &format!("volume-{name}"),
            Action::CreateVolume(CreateVolume {
                name: name.into(),
                size_bytes: size,
                stripe_width: 2,
                stripe_unit_bytes: 1 << 20,
                replica_peers: peers,
            }),
        )
        .await;
    }
    apply_ok(
        &mut client,
        "create",
        Action::CreateVm(CreateVm {
            name: "g".into(),
            vcpus: 1,
            memory_bytes: 32 << 20,
            image: Some(Image::Builtin("cairn-guest".into())),
            volumes: vec!["g-root".into(), "g-data".into()],
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
    let mut vmm = KillOnDrop(observe_vm(&mut client).await.pid);

    let expected = disk_pattern(OFFSET, LENGTH, SEED);
    let expected_crc = disk_checksum(&expected);
    let written = guest_io(
        &mut client,
        io(GuestDiskOp::WritePattern, 1, OFFSET, LENGTH, SEED),
    )
    .await;
    assert_eq!((written.volume.as_str(), written.device), ("g-data", 1));
    assert_eq!(
        written.crc32c, expected_crc,
        "the guest wrote the pattern the host computes"
    );
    assert_eq!(
        (
            written.guest_requests,
            written.guest_bytes_written,
            written.guest_errors
        ),
        (LENGTH / 65536, LENGTH, 0),
        "the guest's own count: 64 KiB requests"
    );
    let read = guest_io(
        &mut client,
        io(GuestDiskOp::ReadChecksum, 1, OFFSET, LENGTH, 0),
    )
    .await;
    assert_eq!(
        read.crc32c, expected_crc,
        "the guest reads back the same bytes"
    );
    assert_eq!(read.guest_bytes_read, LENGTH);
    eprintln!(
        "guest write-pattern of {LENGTH} bytes through NBD onto 2 copies: {} ms, read-checksum {} ms",
        written.elapsed_ms, read.elapsed_ms
    );

    // Status: the guest's count beside the VMM's, and the copies in sync.
    let vm = observe_vm(&mut client).await;
    let [root, data] = &vm.disks[..] else {
        panic!("two disks: {:?}", vm.disks);
    };
    assert_eq!(
        (root.guest_requests, root.guest_bytes_written),
        (2, 4096),
        "the self-test's write and read: {root:?}"
    );
    assert_eq!(
        (
            data.guest_requests,
            data.guest_bytes_written,
            data.guest_bytes_read
        ),
        (2 * LENGTH / 65536, LENGTH, LENGTH),
        "{data:?}"
    );
    assert_eq!(
        (data.writes, data.bytes_written),
        (LENGTH / 65536, LENGTH),
        "the VMM counted the same writes: {data:?}"
    );
    assert_eq!((data.copies, data.copies_in_sync), (2, 2), "{data:?}");
    assert_eq!(data.copies_state, "in-sync", "{data:?}");

    // Refusals name what is wrong.
    let refused = client
        .guest_disk_io(io(GuestDiskOp::ReadChecksum, 2, 0, 512, 0))
        .await
        .expect_err("disk 2 does not exist");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("has 2 disk(s)"), "{refused:?}");
    let refused = client
        .guest_disk_io(io(GuestDiskOp::ReadChecksum, 1, DATA_BYTES, 512, 0))
        .await
        .expect_err("beyond the disk");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("beyond the end of disk 1"),
        "{refused:?}"
    );
    let refused = client
        .guest_disk_io(io(GuestDiskOp::Unspecified, 1, 0, 512, 0))
        .await
        .expect_err("no operation");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // The replica holds the guest's bytes.
    let mut on_replica = replica.client(&controller).await;
    let copy = on_replica
        .read_volume(ReadVolumeRequest {
            name: "g-data".into(),
            offset: OFFSET,
            length: LENGTH,
        })
        .await
        .expect("read the replica's copy");
    assert_eq!(disk_checksum(&copy), expected_crc, "the replica's copy");

    // While it runs, the volume is exported read-only and qemu-img reads the guest's
    // bytes through NBD; stopped, a writable export serves the same bytes.
    let image = read_with_qemu_img(&mut client, true, &base.path().join("running.img")).await;
    assert_range_holds(&image, &expected, expected_crc);
    apply_ok(
        &mut client,
        "stop",
        Action::StopVm(StopVm {
            name: "g".into(),
            grace_ms: 5000,
        }),
    )
    .await;
    vmm.0 = 0;
    let refused = client
        .guest_disk_io(io(GuestDiskOp::ReadChecksum, 1, 0, 512, 0))
        .await
        .expect_err("the VM is stopped");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let image = read_with_qemu_img(&mut client, false, &base.path().join("stopped.img")).await;
    assert_range_holds(&image, &expected, expected_crc);
}

/// The whole data volume, read by `qemu-img convert` through its NBD export.
async fn read_with_qemu_img(client: &mut NodeClient, read_only: bool, out: &Path) -> Vec<u8> {
    let exported = apply_ok(
        client,
        &format!("export-{read_only}"),
        Action::ExportVolume(ExportVolume {
            name: "g-data".into(),
            lifetime_seconds: 60,
            read_only,
        }),
    )
    .await;
    let Some(ApplyResult::ExportVolume(export)) = exported.result else {
        panic!("unexpected result {exported:?}");
    };
    assert_eq!(export.read_only, read_only, "{export:?}");
    let output = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &export.uri])
        .arg(out)
        .output()
        .expect("run qemu-img");
    assert!(
        output.status.success(),
        "qemu-img convert from {} failed: {}",
        export.uri,
        String::from_utf8_lossy(&output.stderr)
    );
    let image = std::fs::read(out).expect("qemu-img's output");
    assert_eq!(image.len() as u64, DATA_BYTES);
    image
}

/// `image` holds the expected pattern in the range and zeros before it.
fn assert_range_holds(image: &[u8], expected: &[u8], expected_crc: u32) {
    let range = &image[OFFSET as usize..(OFFSET + LENGTH) as usize];
    assert_eq!(
        disk_checksum(range),
        expected_crc,
        "qemu-img reads through the export the bytes whose CRC-32C the guest reported"
    );
    assert!(range == expected, "byte for byte");
    assert!(
        image[..OFFSET as usize].iter().all(|byte| *byte == 0),
        "nothing before the range"
    );
}
