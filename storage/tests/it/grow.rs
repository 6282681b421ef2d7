//! Growing a volume in place: data kept, new space thin and zero, the size durable.

use std::process::Command;

use storage::{EngineKind, StorageError, Store, StoreOptions};

use crate::{check_read, pattern, spec, store_with_disks};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

#[test]
fn a_volume_grows_in_place_keeping_its_data_and_the_new_space_reads_as_zeros() {
    let (_dir, store) = store_with_disks(2, 16 * MIB, EngineKind::Auto);
    // The old end cuts through a 64 KiB stripe unit.
    let old_size = MIB + 12 * KIB;
    let volume = store
        .create_volume(&spec("v", old_size, 64 * KIB, 2))
        .unwrap();
    let old = pattern(1, old_size as usize);
    volume.write_at(0, &old).unwrap();
    store.create_snapshot("v", "before").unwrap();
    let allocated = volume.info().unwrap().allocated;

    let new_size = 3 * MIB;
    let info = volume.grow(new_size).unwrap();
    assert_eq!(info.size, new_size);
    assert_eq!(info.allocated, allocated, "growing allocates nothing");
    check_read(&volume, 0, &old);
    check_read(
        &volume,
        old_size,
        &vec![0u8; (new_size - old_size) as usize],
    );

    // Writes past the old end, one straddling it, one at the new end.
    let straddling = pattern(2, 64 * KIB as usize);
    volume.write_at(old_size - 8 * KIB, &straddling).unwrap();
    let at_end = pattern(3, 8 * KIB as usize);
    volume.write_at(new_size - 8 * KIB, &at_end).unwrap();
    check_read(&volume, 0, &old[..(old_size - 8 * KIB) as usize]);
    check_read(&volume, old_size - 8 * KIB, &straddling);
    check_read(&volume, new_size - 8 * KIB, &at_end);
    assert!(volume.scrub().unwrap().is_empty());

    // The snapshot keeps its size and its data.
    let snapshot = store.snapshot("v", "before").unwrap();
    assert_eq!(snapshot.size().unwrap(), old_size);
    let mut buf = vec![0u8; old_size as usize];
    snapshot.read_at(0, &mut buf).unwrap();
    assert!(buf == old);

    // The same size is nothing; a smaller one or a misaligned one is refused.
    assert_eq!(volume.grow(new_size).unwrap().size, new_size);
    match volume.grow(new_size - 4096) {
        Err(StorageError::InvalidArgument { field, reason }) => {
            assert_eq!(field, "size");
            assert!(reason.contains("would lose data"), "{reason}");
        }
        other => panic!("shrinking was not refused: {other:?}"),
    }
    assert!(matches!(
        volume.grow(new_size + 100),
        Err(StorageError::InvalidArgument { .. })
    ));
    assert!(matches!(
        store.grow_volume("missing", new_size),
        Err(StorageError::UnknownVolume { .. })
    ));
    assert_eq!(volume.info().unwrap().size, new_size);
}

const GROW_CHILD_ENV: &str = "CAIRN_STORAGE_GROW_CHILD_DIR";

/// The child grows the volume, writes past the old end and dies without a clean shutdown
/// (no checkpoint on drop); the parent finds the new size and the write.
#[test]
fn a_grown_size_and_writes_past_the_old_end_survive_a_crash() {
    if let Ok(dir) = std::env::var(GROW_CHILD_ENV) {
        let store = Store::open(&dir, StoreOptions::default()).expect("child opens store");
        let vol = store.volume("v").expect("volume exists");
        vol.grow(4 * MIB).expect("grow");
        vol.write_at(3 * MIB, &pattern(21, 16 * KIB as usize))
            .expect("write past the old end");
        println!("acked");
        std::process::exit(0);
    }
    let (dir, store) = store_with_disks(1, 16 * MIB, EngineKind::Auto);
    let vol = store.create_volume(&spec("v", MIB, 64 * KIB, 1)).unwrap();
    vol.write_at(MIB - 16 * KIB, &pattern(20, 16 * KIB as usize))
        .unwrap();
    drop(vol);
    drop(store);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "grow::a_grown_size_and_writes_past_the_old_end_survive_a_crash",
            "--exact",
            "--nocapture",
        ])
        .env(GROW_CHILD_ENV, dir.path())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("acked"),
        "child: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let vol = store.volume("v").unwrap();
    assert_eq!(vol.info().unwrap().size, 4 * MIB);
    check_read(&vol, MIB - 16 * KIB, &pattern(20, 16 * KIB as usize));
    check_read(&vol, 3 * MIB, &pattern(21, 16 * KIB as usize));
    check_read(&vol, MIB, &vec![0u8; 2 * MIB as usize]);
}
