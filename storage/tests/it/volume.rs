use storage::{EngineKind, Store, StoreOptions};

use crate::{check_read, pattern, spec, store_with_disks};

const MIB: u64 = 1 << 20;

fn striped_roundtrip(engine: EngineKind) {
    let (dir, store) = store_with_disks(4, 64 * MIB, engine);
    let vol = store
        .create_volume(&spec("vm1-root", 32 * MIB, 64 * 1024, 4))
        .unwrap();
    assert_eq!(
        vol.info().unwrap().allocated,
        0,
        "thin: nothing allocated before the first write"
    );

    // A write spanning many stripe units and all four columns, unaligned to the unit.
    let data = pattern(1, 3 * MIB as usize + 8192);
    vol.write_at(MIB - 4096, &data).unwrap();
    check_read(&vol, MIB - 4096, &data);

    // Unwritten space reads as zeros, also inside an allocated extent.
    check_read(&vol, 20 * MIB, &vec![0u8; 64 * 1024]);
    check_read(&vol, MIB - 8192, &vec![0u8; 4096]);

    // Each column disk got a share.
    let disks = store.disks();
    assert!(
        disks.iter().all(|d| d.allocated > 0),
        "every column used: {disks:?}"
    );
    let total: u64 = disks.iter().map(|d| d.allocated).sum();
    assert_eq!(total, vol.info().unwrap().allocated);

    // Overwrite in place, then reopen and read everything back.
    let over = pattern(2, 12288);
    vol.write_at(2 * MIB, &over).unwrap();
    drop(vol);
    drop(store);
    let store = Store::open(dir.path(), StoreOptions { engine }).unwrap();
    assert_eq!(
        store.recovery(),
        storage::RecoveryReport::default(),
        "a clean shutdown leaves nothing to recover"
    );
    let vol = store.volume("vm1-root").unwrap();
    let mut expected = data.clone();
    let at = (2 * MIB - (MIB - 4096)) as usize;
    expected[at..at + over.len()].copy_from_slice(&over);
    check_read(&vol, MIB - 4096, &expected);
    assert_eq!(vol.info().unwrap().seq, 2);
}

#[test]
fn striped_volume_round_trips_on_io_uring() {
    if storage::FileEngine::new(EngineKind::IoUring).is_err() {
        eprintln!("skipping: io_uring is not available on this kernel");
        return;
    }
    striped_roundtrip(EngineKind::IoUring);
}

#[test]
fn striped_volume_round_trips_on_sync_engine() {
    striped_roundtrip(EngineKind::Sync);
}

#[test]
fn auto_engine_prefers_io_uring() {
    let (_dir, store) = store_with_disks(1, MIB, EngineKind::Auto);
    let expected = if storage::FileEngine::new(EngineKind::IoUring).is_ok() {
        EngineKind::IoUring
    } else {
        EngineKind::Sync
    };
    assert_eq!(store.engine_kind(), expected);
}

#[test]
fn trim_frees_whole_units_and_zeroes_partial_ones() {
    let (_dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    let vol = store
        .create_volume(&spec("v", 4 * MIB, 64 * 1024, 2))
        .unwrap();
    vol.write_at(0, &pattern(3, 512 * 1024)).unwrap();
    let before = vol.info().unwrap().allocated;
    assert_eq!(before, 512 * 1024);
    // Trim the first two units entirely and one block of the third.
    vol.trim(0, 128 * 1024 + 4096).unwrap();
    assert_eq!(vol.info().unwrap().allocated, before - 128 * 1024);
    check_read(&vol, 0, &vec![0u8; 128 * 1024 + 4096]);
    check_read(
        &vol,
        128 * 1024 + 4096,
        &pattern(3, 512 * 1024)[128 * 1024 + 4096..],
    );
    // Freed space is reused.
    let used: u64 = store.disks().iter().map(|d| d.allocated).sum();
    vol.write_at(2 * MIB, &pattern(4, 128 * 1024)).unwrap();
    assert_eq!(
        store.disks().iter().map(|d| d.allocated).sum::<u64>(),
        used + 128 * 1024
    );
}

#[test]
fn explicit_column_placement_is_honoured_and_volumes_delete_cleanly() {
    let (_dir, store) = store_with_disks(3, 8 * MIB, EngineKind::Auto);
    let mut s = spec("placed", 2 * MIB, 4096, 2);
    s.disks = vec!["d2".into(), "d0".into()];
    let vol = store.create_volume(&s).unwrap();
    assert_eq!(
        vol.info().unwrap().columns,
        vec!["d2".to_string(), "d0".to_string()]
    );
    vol.write_at(0, &pattern(5, 8192)).unwrap();
    assert_eq!(vol.locate(0).unwrap().unwrap().disk, "d2");
    assert_eq!(vol.locate(4096).unwrap().unwrap().disk, "d0");
    assert!(vol.locate(MIB).unwrap().is_none());
    store.delete_volume("placed").unwrap();
    assert!(store.disks().iter().all(|d| d.allocated == 0));
    assert!(matches!(
        vol.read_at(0, &mut [0u8; 4096]),
        Err(storage::StorageError::UnknownVolume { .. })
    ));
}

#[test]
fn many_writes_promote_pending_checksums_in_batches_and_survive_reopen() {
    // More than the 16 Ki pending blocks after which checksums are promoted in one batch.
    let (dir, store) = store_with_disks(2, 48 * MIB, EngineKind::Auto);
    let vol = store.create_volume(&spec("big", 80 * MIB, MIB, 2)).unwrap();
    let chunk = 4 * MIB as usize;
    for i in 0..18u64 {
        vol.write_at(i * 4 * MIB, &pattern(100 + i, chunk)).unwrap();
    }
    // Overwrite across the batch boundary, then read everything back, before and after reopen.
    let over = pattern(200, 8192);
    vol.write_at(4 * MIB - 4096, &over).unwrap();
    let check_all = |vol: &storage::Volume| {
        for i in 0..18u64 {
            let mut expected = pattern(100 + i, chunk);
            if i == 0 {
                expected[chunk - 4096..].copy_from_slice(&over[..4096]);
            }
            if i == 1 {
                expected[..4096].copy_from_slice(&over[4096..]);
            }
            check_read(vol, i * 4 * MIB, &expected);
        }
    };
    check_all(&vol);
    drop((vol, store));
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    check_all(&store.volume("big").unwrap());
}

#[test]
fn write_zeroes_trims_whole_units_and_fills_partial_ones() {
    let (_dir, store) = store_with_disks(1, 16 * MIB, EngineKind::Auto);
    let vol = store
        .create_volume(&spec("z", 4 * MIB, 64 * 1024, 1))
        .unwrap();
    vol.write_at(0, &pattern(90, MIB as usize)).unwrap();
    store.create_snapshot("z", "before").unwrap();
    // From the middle of unit 0 to the middle of unit 5: units 1..=4 are whole.
    vol.write_zeroes(32 * 1024, 5 * 64 * 1024).unwrap();
    let mut expected = pattern(90, MIB as usize);
    expected[32 * 1024..32 * 1024 + 5 * 64 * 1024].fill(0);
    check_read(&vol, 0, &expected);
    // Only the two partial units were copied and written; the whole ones cost no space.
    assert_eq!(vol.info().unwrap().allocated, 2 * 64 * 1024);
    let mut snap = vec![0u8; MIB as usize];
    store
        .snapshot("z", "before")
        .unwrap()
        .read_at(0, &mut snap)
        .unwrap();
    assert!(snap == pattern(90, MIB as usize));
}
