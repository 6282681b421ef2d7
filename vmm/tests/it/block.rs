//! The built-in guest's virtio-blk self-test does real I/O to the disk file.

use std::time::Duration;

use vmm::control::Request;
use vmm::guest::{
    BlockTestResult, block_checksum as guest_checksum, block_test_pattern as expected_pattern,
};

use crate::support::{VmProcess, disk_image, kvm_available};

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn the_guest_self_test_writes_the_disk_file_and_reads_it_back() {
    if !kvm_available("the_guest_self_test_writes_the_disk_file_and_reads_it_back") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = disk_image(dir.path(), 1 << 20);
    let mut vm = VmProcess::spawn_in(
        dir,
        &[
            "--memory",
            "32MiB",
            "--disk",
            disk.to_str().expect("utf-8 path"),
        ],
    );
    let status = vm.wait_status(TIMEOUT, |status| status.block_tests >= 1);
    assert_eq!(status.block_test, BlockTestResult::Pass);
    let block = status.block.expect("block counters");
    assert_eq!((block.writes, block.reads, block.errors), (1, 1, 0));
    assert_eq!((block.bytes_written, block.bytes_read), (4096, 4096));

    let sector = (1 << 20) / 512 - 8;
    assert_eq!(
        status.block_checksum,
        guest_checksum(&expected_pattern(sector, 1)),
        "the guest's checksum of what it read back"
    );

    vm.request(&Request::BlockTest);
    let status = vm.wait_status(TIMEOUT, |status| {
        status.block_tests >= 2 && status.block_test == BlockTestResult::Pass
    });
    assert_eq!(
        status.block_checksum,
        guest_checksum(&expected_pattern(sector, 2))
    );
    vm.request(&Request::PowerOff { force: false });
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));

    let bytes = std::fs::read(&disk).expect("read disk");
    assert_eq!(
        &bytes[(1 << 20) - 4096..],
        &expected_pattern(sector, 2)[..],
        "round 2's pattern is on disk"
    );
    assert!(
        bytes[..(1 << 20) - 4096].iter().all(|byte| *byte == 0),
        "nothing else was written"
    );
    assert!(vm.console().contains("block self-test pass"));
}

#[test]
fn a_read_only_disk_fails_the_write_and_keeps_its_bytes() {
    if !kvm_available("a_read_only_disk_fails_the_write_and_keeps_its_bytes") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = disk_image(dir.path(), 1 << 20);
    let disk_arg = disk.to_str().expect("utf-8 path").to_string();
    let mut vm = VmProcess::spawn_in(
        dir,
        &["--memory", "32MiB", "--disk", &disk_arg, "--disk-read-only"],
    );
    let status = vm.wait_status(TIMEOUT, |status| status.block_tests >= 1);
    assert_eq!(status.block_test, BlockTestResult::DeviceError);
    assert!(
        std::fs::read(&disk)
            .expect("read disk")
            .iter()
            .all(|byte| *byte == 0)
    );
}

#[test]
fn without_a_disk_the_guest_reports_no_device() {
    if !kvm_available("without_a_disk_the_guest_reports_no_device") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB"]);
    let status = vm.wait_status(TIMEOUT, |status| status.block_tests >= 1);
    assert_eq!(status.block_test, BlockTestResult::NoDevice);
    assert!(status.block.is_none());
    let refused = vm.client().call(&Request::BlockTest).expect("answer");
    assert!(!refused.ok && refused.error.expect("reason").contains("no block device"));
}

#[test]
fn every_disk_gets_a_device_and_the_guest_tests_the_first() {
    if !kvm_available("every_disk_gets_a_device_and_the_guest_tests_the_first") {
        return;
    }
    let (mut vm, first, second) = VmProcess::spawn_two_disks(2 << 20);
    let status = vm.wait_status(TIMEOUT, |status| status.block_tests >= 1);
    assert_eq!(status.block_test, BlockTestResult::Pass);
    assert_eq!(status.disks.len(), 2);
    assert_eq!(status.disks[0].writes, 1);
    assert_eq!(
        (status.disks[1].reads, status.disks[1].writes),
        (0, 0),
        "the second disk is idle"
    );
    vm.request(&Request::PowerOff { force: true });
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    assert!(
        std::fs::read(&second)
            .expect("read")
            .iter()
            .all(|byte| *byte == 0)
    );
    assert!(
        std::fs::read(&first)
            .expect("read")
            .iter()
            .any(|byte| *byte != 0)
    );
}
