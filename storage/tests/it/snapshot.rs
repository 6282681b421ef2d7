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

/// Retention of a chain of snapshots: deleting the oldest (or a middle one) frees exactly
/// the blocks only it still saw (`SnapshotInfo::unique`), and every other snapshot and
/// the volume keep reading the same bytes, also after a reopen.
#[test]
fn deleting_a_snapshot_of_a_chain_frees_only_its_unique_blocks() {
    const UNIT: u64 = 64 * KIB;
    let (dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    let vol = store
        .create_volume(&spec("db", 16 * UNIT, UNIT, 2))
        .unwrap();
    let allocated = |store: &Store| store.disks().iter().map(|d| d.allocated).sum::<u64>();
    let unique = |store: &Store, name: &str| {
        store
            .snapshots("db")
            .into_iter()
            .find(|s| s.name == name)
            .unwrap()
            .unique
    };
    let mut now = pattern(30, (16 * UNIT) as usize);
    vol.write_at(0, &now).unwrap();
    let mut points = vec![];
    // s1; units 0-3 rewritten; s2; units 2-5; s3; unit 0.
    for (name, seed, units) in [("s1", 31, 0..4), ("s2", 32, 2..6), ("s3", 33, 0..1)] {
        store.create_snapshot("db", name).unwrap();
        points.push((name, now.clone()));
        let range = (units.start * UNIT) as usize..(units.end * UNIT) as usize;
        let data = pattern(seed, range.len());
        vol.write_at(range.start as u64, &data).unwrap();
        now[range].copy_from_slice(&data);
    }
    assert_eq!(allocated(&store), (16 + 4 + 4 + 1) * UNIT);
    assert_eq!(
        unique(&store, "s1"),
        4 * UNIT,
        "units 0-3, rewritten after s1"
    );
    assert_eq!(
        unique(&store, "s2"),
        2 * UNIT,
        "units 2-3 of s2's own, rewritten"
    );
    assert_eq!(
        unique(&store, "s3"),
        0,
        "unit 0 after s3 was s1's, not s3's"
    );
    let check_all = |store: &Store, points: &[(&str, Vec<u8>)], now: &[u8]| {
        for (name, bytes) in points {
            let mut buf = vec![0u8; bytes.len()];
            store
                .snapshot("db", name)
                .unwrap()
                .read_at(0, &mut buf)
                .unwrap();
            assert!(
                &buf == bytes,
                "snapshot {name} reads what the volume held then"
            );
        }
        check_read(&store.volume("db").unwrap(), 0, now);
    };

    // Retention deletes the oldest: its 4 unique units are freed, nothing else.
    let before = allocated(&store);
    store.delete_snapshot("db", "s1").unwrap();
    points.remove(0);
    assert_eq!(before - allocated(&store), 4 * UNIT);
    check_all(&store, &points, &now);
    assert_eq!(
        unique(&store, "s2"),
        4 * UNIT,
        "s2 now also holds s1's units 4-5"
    );

    drop(vol);
    drop(store);
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    check_all(&store, &points, &now);

    // Then a middle one... here the oldest again: s2's 4 units go, s3 keeps its view.
    let before = allocated(&store);
    store.delete_snapshot("db", "s2").unwrap();
    points.remove(0);
    assert_eq!(before - allocated(&store), 4 * UNIT);
    check_all(&store, &points, &now);
    assert_eq!(unique(&store, "s3"), UNIT);
    store.delete_snapshot("db", "s3").unwrap();
    assert_eq!(
        allocated(&store),
        16 * UNIT,
        "only the volume's own data is left"
    );
    check_read(&store.volume("db").unwrap(), 0, &now);
}

/// Deleting a snapshot in the middle of a chain frees what only it saw and leaves the
/// older and newer snapshots as they were.
#[test]
fn deleting_a_middle_snapshot_keeps_its_neighbours() {
    const UNIT: u64 = 64 * KIB;
    let (_dir, store) = store_with_disks(1, 16 * MIB, EngineKind::Auto);
    let vol = store.create_volume(&spec("v", 8 * UNIT, UNIT, 1)).unwrap();
    let allocated = |store: &Store| store.disks().iter().map(|d| d.allocated).sum::<u64>();
    let a = pattern(40, (8 * UNIT) as usize);
    vol.write_at(0, &a).unwrap();
    store.create_snapshot("v", "a").unwrap();
    let mut b = a.clone();
    b[..(2 * UNIT) as usize].copy_from_slice(&pattern(41, (2 * UNIT) as usize));
    vol.write_at(0, &b[..(2 * UNIT) as usize]).unwrap();
    store.create_snapshot("v", "b").unwrap();
    let mut c = b.clone();
    c[..UNIT as usize].copy_from_slice(&pattern(42, UNIT as usize));
    vol.write_at(0, &c[..UNIT as usize]).unwrap();
    let before = allocated(&store);
    store.delete_snapshot("v", "b").unwrap();
    assert_eq!(
        before - allocated(&store),
        UNIT,
        "unit 0 of b, rewritten since"
    );
    let mut buf = vec![0u8; a.len()];
    store
        .snapshot("v", "a")
        .unwrap()
        .read_at(0, &mut buf)
        .unwrap();
    assert!(buf == a);
    check_read(&vol, 0, &c);
}

/// The units a delta between two snapshots must consider: exactly those written (or
/// trimmed) in between, also after the snapshot in the middle was deleted (its layer
/// folded into the next); the first delta is every unit with data.
#[test]
fn changed_units_between_snapshots_are_the_units_written_in_between() {
    const UNIT: u64 = 64 * KIB;
    let (_dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    let vol = store.create_volume(&spec("v", 16 * UNIT, UNIT, 2)).unwrap();
    vol.write_at(0, &pattern(50, (3 * UNIT) as usize)).unwrap();
    store.create_snapshot("v", "a").unwrap();
    vol.write_at(5 * UNIT, &pattern(51, UNIT as usize)).unwrap();
    vol.write_at(UNIT, &pattern(52, 4096)).unwrap();
    store.create_snapshot("v", "b").unwrap();
    vol.trim(0, UNIT).unwrap();
    vol.trim(10 * UNIT, UNIT).unwrap();
    vol.write_at(2 * UNIT, &pattern(53, 4096)).unwrap();
    store.create_snapshot("v", "c").unwrap();
    vol.write_at(7 * UNIT, &pattern(54, 4096)).unwrap();

    let units =
        |base: Option<&str>, snap: &str| store.changed_units("v", base, snap).unwrap().units;
    assert_eq!(
        units(None, "a"),
        vec![0, 1, 2],
        "the first delta is all the data"
    );
    assert_eq!(units(Some("a"), "b"), vec![1, 5]);
    assert_eq!(
        units(Some("b"), "c"),
        vec![0, 2],
        "a trimmed unit that held data is a change; one that never did is not"
    );
    assert_eq!(units(Some("a"), "c"), vec![0, 1, 2, 5]);
    let err = store.changed_units("v", Some("c"), "a").unwrap_err();
    assert!(err.to_string().contains("not older"), "{err}");
    store.delete_snapshot("v", "b").unwrap();
    assert_eq!(
        units(Some("a"), "c"),
        vec![0, 1, 2, 5],
        "b's layer folded into c's"
    );
    let info = store.changed_units("v", None, "c").unwrap();
    assert_eq!((info.unit_bytes, info.size), (UNIT, 16 * UNIT));
    assert!(matches!(
        store.changed_units("v", Some("zz"), "c"),
        Err(StorageError::UnknownSnapshot { .. })
    ));
}
