use storage::{EngineKind, StorageError, Store, StoreOptions};

use crate::{check_read, pattern, spec, store_with_disks};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

#[test]
fn snapshot_freezes_content_while_the_volume_moves_on() {
    let (dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    let vol = store
        .create_volume(&spec("db", 4 * MIB, 64 * KIB, 2))
        .unwrap();
    let a = pattern(10, 256 * KIB as usize);
    vol.write_at(0, &a).unwrap();
    let used_before = vol.info().unwrap().allocated;
    let snap = store.create_snapshot("db", "before-migration").unwrap();
    assert_eq!(
        vol.info().unwrap().allocated,
        0,
        "the snapshot took no copy"
    );

    // Overwrite one block in the middle of a unit: copy-on-write of that unit only.
    let b = pattern(11, 4096);
    vol.write_at(68 * KIB, &b).unwrap();
    assert_eq!(vol.info().unwrap().allocated, 64 * KIB);
    let mut expected = a.clone();
    expected[68 * KIB as usize..72 * KIB as usize].copy_from_slice(&b);
    check_read(&vol, 0, &expected);
    let mut buf = vec![0u8; a.len()];
    snap.read_at(0, &mut buf).unwrap();
    assert!(buf == a, "snapshot still shows the old data");

    // Trimming a whole shared unit in the volume hides it without touching the snapshot.
    vol.trim(128 * KIB, 64 * KIB).unwrap();
    check_read(&vol, 128 * KIB, &vec![0u8; 64 * KIB as usize]);
    snap.read_at(0, &mut buf).unwrap();
    assert!(buf == a);

    // Everything survives a reopen.
    drop((vol, snap, store));
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let vol = store.volume("db").unwrap();
    expected[128 * KIB as usize..192 * KIB as usize].fill(0);
    check_read(&vol, 0, &expected);
    store
        .snapshot("db", "before-migration")
        .unwrap()
        .read_at(0, &mut buf)
        .unwrap();
    assert!(buf == a);
    assert_eq!(store.snapshots("db").len(), 1);
    assert_eq!(store.snapshots("db")[0].seq, 1);
    assert!(used_before > 0);
}

#[test]
fn clones_are_independent_and_outlive_their_snapshot() {
    let (_dir, store) = store_with_disks(1, 16 * MIB, EngineKind::Auto);
    let golden = store
        .create_volume(&spec("golden", MIB, 16 * KIB, 1))
        .unwrap();
    let image = pattern(20, MIB as usize);
    golden.write_at(0, &image).unwrap();
    store.create_snapshot("golden", "v1").unwrap();
    let c1 = store.clone_snapshot("golden", "v1", "vm-a").unwrap();
    let c2 = store.clone_snapshot("golden", "v1", "vm-b").unwrap();
    c1.write_at(0, &pattern(21, 4096)).unwrap();
    c2.write_at(4096, &pattern(22, 4096)).unwrap();
    golden.write_at(8192, &pattern(23, 4096)).unwrap();

    let mut a = image.clone();
    a[..4096].copy_from_slice(&pattern(21, 4096));
    let mut b = image.clone();
    b[4096..8192].copy_from_slice(&pattern(22, 4096));
    let mut g = image.clone();
    g[8192..12288].copy_from_slice(&pattern(23, 4096));
    check_read(&c1, 0, &a);
    check_read(&c2, 0, &b);
    check_read(&golden, 0, &g);

    // The volume with a snapshot cannot be deleted; the snapshot can, clones keep reading.
    assert!(matches!(
        store.delete_volume("golden"),
        Err(StorageError::HasSnapshots { count: 1, .. })
    ));
    let used = store.disks()[0].allocated;
    store.delete_snapshot("golden", "v1").unwrap();
    assert_eq!(
        store.disks()[0].allocated,
        used,
        "the clones still reference the frozen layer"
    );
    check_read(&c1, 0, &a);
    store.delete_volume("golden").unwrap();
    store.delete_volume("vm-a").unwrap();
    check_read(&c2, 0, &b);
    store.delete_volume("vm-b").unwrap();
    assert_eq!(
        store.disks()[0].allocated,
        0,
        "last reference gone: every extent freed"
    );
}

#[test]
fn snapshots_are_read_only_through_the_block_device_seam() {
    use storage::BlockDevice;
    let (_dir, store) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    store.create_volume(&spec("v", MIB, 4096, 1)).unwrap();
    let snap = store.create_snapshot("v", "s").unwrap();
    assert!(snap.read_only());
    match BlockDevice::write_at(&snap, 0, &[0u8; 4096]) {
        Err(StorageError::ReadOnly { name }) => assert_eq!(name, "v@s"),
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    assert!(matches!(
        store.create_snapshot("v", "s"),
        Err(StorageError::AlreadyExists {
            kind: "snapshot",
            ..
        })
    ));
    assert!(matches!(
        store.snapshot("v", "nope"),
        Err(StorageError::UnknownSnapshot { .. })
    ));
}

#[test]
fn resync_writes_copy_on_write_and_repair_in_place() {
    let (_dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    let vol = store.create_volume(&spec("r", MIB, 64 * KIB, 2)).unwrap();
    let a = pattern(20, 128 * KIB as usize);
    vol.write_at(0, &a).unwrap();
    let seq = vol.info().unwrap().seq;
    let snap = store.create_snapshot("r", "s").unwrap();
    // A resync of newer bytes lands in the volume's own layer: the snapshot keeps its
    // blocks, the sequence number stays, the snapshot's layer owns what it held.
    let b = pattern(21, 64 * KIB as usize);
    let crcs: Vec<u32> = b.chunks(4096).map(crc32c::crc32c).collect();
    vol.resync(&storage::RepairData {
        offset: 0,
        data: b.clone(),
        checksums: crcs.clone(),
    })
    .unwrap();
    let mut expected = a.clone();
    expected[..b.len()].copy_from_slice(&b);
    check_read(&vol, 0, &expected);
    let mut buf = vec![0u8; a.len()];
    snap.read_at(0, &mut buf).unwrap();
    assert!(buf == a, "a resync must not change a snapshot");
    assert_eq!(vol.info().unwrap().seq, seq);
    assert_eq!(vol.info().unwrap().allocated, 64 * KIB);
    // Data that does not match its checksums is refused, naming the field.
    let err = vol
        .resync(&storage::RepairData {
            offset: 0,
            data: pattern(22, 4096),
            checksums: vec![0],
        })
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::InvalidArgument { field, .. } if *field == "checksums"),
        "{err:?}"
    );
    // A repair of the same unit in the frozen layer overwrites it where it lives (for a
    // bad block): the snapshot shows it.
    let c = pattern(23, 64 * KIB as usize);
    let crcs: Vec<u32> = c.chunks(4096).map(crc32c::crc32c).collect();
    vol.repair(&storage::RepairData {
        offset: 64 * KIB,
        data: c.clone(),
        checksums: crcs,
    })
    .unwrap();
    snap.read_at(0, &mut buf).unwrap();
    assert!(buf[64 * KIB as usize..] == c[..]);
}
