use std::os::unix::fs::FileExt;

use storage::{EngineKind, StorageError};

use crate::{check_read, pattern, spec, store_with_disks};

const MIB: u64 = 1 << 20;

fn corrupt(path: &std::path::Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x5a;
    file.write_all_at(&byte, offset).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn a_flipped_byte_is_detected_named_and_repaired_from_a_replica() {
    let (_dir, primary) = store_with_disks(2, 8 * MIB, EngineKind::Auto);
    let (_dir2, replica) = store_with_disks(2, 8 * MIB, EngineKind::Auto);
    let vol = primary
        .create_volume(&spec("data", 2 * MIB, 64 * 1024, 2))
        .unwrap();
    let peer = replica
        .create_volume(&spec("data", 2 * MIB, 64 * 1024, 2))
        .unwrap();
    let data = pattern(30, 256 * 1024);
    let op = vol.write_replicated(0, data.clone()).unwrap();
    replica.apply_replica(&op).unwrap();

    let loc = vol.locate(70 * 1024).unwrap().expect("allocated");
    corrupt(&loc.path, loc.physical_offset + 100);

    let mut buf = vec![0u8; data.len()];
    match vol.read_at(0, &mut buf) {
        Err(StorageError::ChecksumMismatch {
            volume,
            offset,
            disk,
            physical_offset,
            expected,
            actual,
        }) => {
            assert_eq!(volume, "data");
            assert_eq!(offset, 68 * 1024, "names the bad 4 KiB block");
            assert_eq!(disk, loc.disk);
            assert_eq!(physical_offset, loc.physical_offset - 2048);
            assert_ne!(expected, actual);
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    // Blocks next to it are fine, and scrub finds exactly the bad one.
    check_read(&vol, 64 * 1024, &data[64 * 1024..68 * 1024]);
    let bad = vol.scrub().unwrap();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].offset, 68 * 1024);

    let good = peer.read_for_repair(68 * 1024, 4096).unwrap();
    vol.repair(&good).unwrap();
    check_read(&vol, 0, &data);
    assert!(vol.scrub().unwrap().is_empty());
}

#[test]
fn repair_fixes_a_block_shared_with_a_snapshot_in_place() {
    let (_dir, store) = store_with_disks(1, 8 * MIB, EngineKind::Auto);
    let vol = store.create_volume(&spec("v", MIB, 16 * 1024, 1)).unwrap();
    let data = pattern(31, 64 * 1024);
    vol.write_at(0, &data).unwrap();
    let snap = store.create_snapshot("v", "s").unwrap();
    let loc = vol.locate(4096).unwrap().unwrap();
    corrupt(&loc.path, loc.physical_offset);
    assert!(matches!(
        snap.read_at(0, &mut vec![0u8; 8192]),
        Err(StorageError::ChecksumMismatch { .. })
    ));
    let repair = storage::RepairData {
        offset: 4096,
        data: data[4096..8192].to_vec(),
        checksums: vec![crc32c::crc32c(&data[4096..8192])],
    };
    vol.repair(&repair).unwrap();
    let mut buf = vec![0u8; data.len()];
    snap.read_at(0, &mut buf).unwrap();
    assert!(buf == data, "the snapshot sees the repaired block too");
    assert_eq!(
        vol.info().unwrap().allocated,
        0,
        "repair did not copy-on-write"
    );
}

#[test]
fn repair_with_data_that_does_not_match_its_checksums_is_refused() {
    let (_dir, store) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    let vol = store.create_volume(&spec("v", MIB, 4096, 1)).unwrap();
    let repair = storage::RepairData {
        offset: 0,
        data: vec![1u8; 4096],
        checksums: vec![0],
    };
    assert!(matches!(
        vol.repair(&repair),
        Err(StorageError::InvalidArgument {
            field: "checksums",
            ..
        })
    ));
}
