//! Guest disk I/O on command: the built-in guest writes seeded patterns and reads and
//! checksums ranges of its disks through its own virtio-blk driver, and reports
//! CRC-32C and its own counters; the host checks both against the disk files.

use std::time::Duration;

use vmm::control::{ControlClient, GuestDiskAction, GuestDiskIoRequest, Request};
use vmm::guest::{disk_checksum, disk_pattern};

use crate::support::{VmProcess, disk_image, kvm_available};

const TIMEOUT: Duration = Duration::from_secs(30);

fn io(
    disk: u32,
    action: GuestDiskAction,
    offset: u64,
    length: u64,
    seed: u64,
) -> GuestDiskIoRequest {
    GuestDiskIoRequest {
        disk,
        action,
        offset,
        length,
        seed,
        timeout_ms: Some(25_000),
    }
}

#[test]
fn the_guest_writes_a_seeded_pattern_and_reports_its_crc32c_and_counters() {
    if !kvm_available("the_guest_writes_a_seeded_pattern_and_reports_its_crc32c_and_counters") {
        return;
    }
    let (mut vm, _, second) = VmProcess::spawn_two_disks(4 << 20);
    let status = vm.wait_status(TIMEOUT, |status| status.block_tests >= 1);
    assert_eq!(status.guest_disks.len(), 2);
    assert_eq!(
        (
            status.guest_disks[0].requests,
            status.guest_disks[0].bytes_written
        ),
        (2, 4096),
        "the self-test's write and read on disk 0, counted by the guest"
    );
    assert_eq!(status.guest_disks[1].requests, 0);

    // 136 KiB from 12 KiB on the second disk: three requests (64 KiB at most each).
    // (On PVM the built-in guest's instructions are emulated, about 1 µs each: this
    // takes seconds there, microseconds on hardware KVM.)
    let (offset, length, seed) = (12 << 10, 136 << 10, 0xC0FFEE);
    let expected = disk_pattern(offset, length, seed);
    vm.client();
    let mut client = ControlClient::connect(&vm.path("control.sock"), TIMEOUT).expect("connect");
    let written = client
        .guest_disk_io(io(1, GuestDiskAction::WritePattern, offset, length, seed))
        .expect("write-pattern");
    eprintln!(
        "write-pattern of 136 KiB in {} ms (guest-computed pattern and CRC-32C)",
        written.elapsed_ms
    );
    assert_eq!(
        written.crc32c,
        disk_checksum(&expected),
        "CRC-32C of what it wrote"
    );
    assert_eq!(
        (
            written.counters.requests,
            written.counters.bytes_written,
            written.counters.errors
        ),
        (3, length, 0)
    );
    let read = client
        .guest_disk_io(io(1, GuestDiskAction::ReadChecksum, offset, length, 0))
        .expect("read-checksum");
    assert_eq!(read.crc32c, written.crc32c, "it reads back what it wrote");
    assert_eq!(
        (read.counters.requests, read.counters.bytes_read),
        (6, length)
    );
    // A sub-range has the checksum of the same pattern bytes.
    let part = client
        .guest_disk_io(io(1, GuestDiskAction::ReadChecksum, offset + 4096, 8192, 0))
        .expect("read a part");
    assert_eq!(part.crc32c, disk_checksum(&expected[4096..4096 + 8192]));

    let status = vm.status();
    assert_eq!(status.guest_disks[1].bytes_written, length);
    assert_eq!(status.guest_disks[1].bytes_read, length + 8192);
    assert_eq!(
        (status.disks[1].writes, status.disks[1].bytes_written),
        (3, length),
        "the VMM counted the same requests"
    );

    // Refusals name what is wrong, before the guest is asked.
    for (request, says) in [
        (
            io(2, GuestDiskAction::ReadChecksum, 0, 512, 0),
            "disk 2 does not exist",
        ),
        (
            io(1, GuestDiskAction::ReadChecksum, 100, 512, 0),
            "multiples of 512",
        ),
        (
            io(1, GuestDiskAction::ReadChecksum, 4 << 20, 512, 0),
            "beyond the end of disk 1",
        ),
    ] {
        let answer = client.call(&Request::GuestDiskIo(request)).expect("answer");
        let error = answer.error.unwrap_or_default();
        assert!(!answer.ok && error.contains(says), "{error}");
    }

    vm.request(&Request::PowerOff { force: false });
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    let bytes = std::fs::read(&second).expect("read the disk file");
    assert_eq!(
        &bytes[offset as usize..(offset + length) as usize],
        &expected[..]
    );
    assert!(bytes[..offset as usize].iter().all(|byte| *byte == 0));
    assert!(
        bytes[(offset + length) as usize..]
            .iter()
            .all(|byte| *byte == 0)
    );
}

#[test]
fn a_paused_guest_cannot_take_the_command_and_a_later_one_still_runs() {
    if !kvm_available("a_paused_guest_cannot_take_the_command_and_a_later_one_still_runs") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = disk_image(dir.path(), 1 << 20);
    let disk_arg = disk.to_str().expect("utf-8").to_string();
    let mut vm = VmProcess::spawn_in(dir, &["--memory", "32MiB", "--disk", &disk_arg]);
    vm.wait_status(TIMEOUT, |status| status.block_tests >= 1);
    vm.request(&Request::Pause);
    let refused = vm
        .client()
        .call(&Request::GuestDiskIo(io(
            0,
            GuestDiskAction::ReadChecksum,
            0,
            4096,
            0,
        )))
        .expect("answer");
    assert!(
        !refused.ok && refused.error.unwrap_or_default().contains("paused"),
        "a paused VM is refused at once"
    );
    vm.request(&Request::Resume);
    let result = ControlClient::connect(&vm.path("control.sock"), TIMEOUT)
        .expect("connect")
        .guest_disk_io(io(0, GuestDiskAction::WritePattern, 0, 4096, 9))
        .expect("write after resume");
    assert_eq!(result.crc32c, disk_checksum(&disk_pattern(0, 4096, 9)));
    vm.request(&Request::PowerOff { force: true });
    vm.wait_exit(TIMEOUT);
}
