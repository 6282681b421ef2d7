use storage::{DiskSource, EngineKind, StorageError, VolumeSpec};

use crate::{spec, store_with_disks};

const MIB: u64 = 1 << 20;

/// Asserts the error names `field`.
fn check_field(result: Result<impl std::fmt::Debug, StorageError>, field: &str) {
    let err = result.expect_err("bad input must be refused");
    let named = match &err {
        StorageError::InvalidArgument { field, .. } => *field,
        StorageError::Misaligned { field, .. } => *field,
        StorageError::OutOfRange { field, .. } => *field,
        other => panic!("expected an error naming `{field}`, got {other:?}"),
    };
    assert_eq!(named, field, "{err}");
    assert!(
        err.to_string().contains(field),
        "message names the field: {err}"
    );
}

#[test]
fn data_requests_outside_the_volume_or_misaligned_name_the_field() {
    let (_dir, store) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    let vol = store.create_volume(&spec("v", MIB, 4096, 1)).unwrap();
    check_field(vol.write_at(MIB, &[0u8; 4096]), "offset");
    check_field(vol.write_at(u64::MAX - 4095, &[0u8; 4096]), "offset");
    check_field(vol.write_at(100, &[0u8; 4096]), "offset");
    check_field(vol.write_at(0, &[0u8; 100]), "length");
    check_field(vol.write_at(0, &[]), "length");
    check_field(vol.read_at(MIB - 4096, &mut [0u8; 8192]), "offset");
    check_field(vol.read_at(0, &mut [0u8; 513]), "length");
    check_field(vol.trim(4096, 1), "length");
    check_field(vol.write_zeroes(0, 2 * MIB), "offset");
    check_field(vol.locate(MIB), "offset");
    check_field(vol.read_for_repair(0, 3), "length");
    // Nothing was written by any of that.
    assert_eq!(vol.info().unwrap().seq, 0);
    assert_eq!(store.disks()[0].allocated, 0);
}

#[test]
fn malformed_volume_specs_name_the_field() {
    let (_dir, store) = store_with_disks(2, 4 * MIB, EngineKind::Auto);
    check_field(store.create_volume(&spec("v", MIB, 3000, 1)), "stripe_unit");
    check_field(store.create_volume(&spec("v", MIB, 2048, 1)), "stripe_unit");
    check_field(
        store.create_volume(&spec("v", MIB, 128 * MIB, 1)),
        "stripe_unit",
    );
    check_field(store.create_volume(&spec("v", 0, 4096, 1)), "size");
    check_field(store.create_volume(&spec("v", 5000, 4096, 1)), "size");
    check_field(
        store.create_volume(&spec("v", MIB, 4096, 0)),
        "stripe_width",
    );
    check_field(
        store.create_volume(&spec("v", MIB, 4096, 3)),
        "stripe_width",
    );
    check_field(store.create_volume(&spec("", MIB, 4096, 1)), "name");
    check_field(store.create_volume(&spec("../etc", MIB, 4096, 1)), "name");
    check_field(store.create_volume(&spec("a b", MIB, 4096, 1)), "name");
    let dup = VolumeSpec {
        disks: vec!["d0".into(), "d0".into()],
        ..spec("v", MIB, 4096, 2)
    };
    check_field(store.create_volume(&dup), "disks");
    let short = VolumeSpec {
        disks: vec!["d0".into()],
        ..spec("v", MIB, 4096, 2)
    };
    check_field(store.create_volume(&short), "disks");
    let unknown = VolumeSpec {
        disks: vec!["nope".into()],
        ..spec("v", MIB, 4096, 1)
    };
    assert!(
        matches!(store.create_volume(&unknown), Err(StorageError::UnknownDisk { name }) if name == "nope")
    );
    check_field(
        store.add_disk("x", DiskSource::File { capacity: 1000 }),
        "capacity",
    );
    check_field(
        store.add_disk("x/y", DiskSource::File { capacity: MIB }),
        "disk name",
    );
    assert!(store.volumes().is_empty());
}

#[test]
fn unknown_and_duplicate_objects_are_typed_errors() {
    let (_dir, store) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    assert!(
        matches!(store.volume("ghost"), Err(StorageError::UnknownVolume { name }) if name == "ghost")
    );
    assert!(matches!(
        store.delete_volume("ghost"),
        Err(StorageError::UnknownVolume { .. })
    ));
    assert!(matches!(
        store.create_snapshot("ghost", "s"),
        Err(StorageError::UnknownVolume { .. })
    ));
    assert!(matches!(
        store.snapshot("ghost", "s"),
        Err(StorageError::UnknownVolume { .. })
    ));
    assert!(matches!(
        store.clone_snapshot("ghost", "s", "c"),
        Err(StorageError::UnknownSnapshot { .. })
    ));
    store.create_volume(&spec("v", MIB, 4096, 1)).unwrap();
    assert!(matches!(
        store.create_volume(&spec("v", MIB, 4096, 1)),
        Err(StorageError::AlreadyExists { kind: "volume", .. })
    ));
    assert!(matches!(
        store.add_disk("d0", DiskSource::File { capacity: MIB }),
        Err(StorageError::AlreadyExists { kind: "disk", .. })
    ));
    let op = storage::ReplicaOp {
        volume: "v".into(),
        seq: 0,
        offset: 0,
        payload: storage::ReplicaPayload::Trim { length: 4096 },
    };
    check_field(store.apply_replica(&op), "seq");
    let op = storage::ReplicaOp {
        volume: "v".into(),
        seq: 1,
        offset: 0,
        payload: storage::ReplicaPayload::Write {
            data: vec![0u8; 4096],
            checksums: vec![],
        },
    };
    check_field(store.apply_replica(&op), "checksums");
}

/// Many random requests, most of them invalid: every one returns, none panics, and every
/// error is one of the typed input errors.
#[test]
fn random_requests_never_panic() {
    let (_dir, store) = store_with_disks(2, 4 * MIB, EngineKind::Auto);
    let vol = store.create_volume(&spec("v", MIB, 8192, 2)).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let interesting = [
        0,
        1,
        4095,
        4096,
        8192,
        MIB - 4096,
        MIB,
        MIB + 4096,
        u64::MAX - 4095,
        u64::MAX,
    ];
    for _ in 0..400 {
        let pick = |r: u64| {
            if r.is_multiple_of(3) {
                interesting[(r / 3) as usize % interesting.len()]
            } else {
                (r >> 8) % (2 * MIB)
            }
        };
        let offset = pick(next());
        let len = pick(next()).min(256 * 1024) as usize;
        let result = match next() % 5 {
            0 => vol.write_at(offset, &vec![7u8; len]).map(|_| ()),
            1 => vol.read_at(offset, &mut vec![0u8; len]),
            2 => vol.trim(offset, len as u64).map(|_| ()),
            3 => vol.write_zeroes(offset, len as u64).map(|_| ()),
            _ => vol.read_for_repair(offset, len as u64).map(|_| ()),
        };
        if let Err(e) = result {
            assert!(
                matches!(
                    e,
                    StorageError::InvalidArgument { .. }
                        | StorageError::Misaligned { .. }
                        | StorageError::OutOfRange { .. }
                ),
                "unexpected error for offset {offset} length {len}: {e}"
            );
        }
    }
    assert!(
        vol.scrub().unwrap().is_empty(),
        "valid requests among them left consistent data"
    );
}

#[test]
fn an_existing_file_can_be_a_disk_and_a_too_small_one_is_refused() {
    let (dir, store) = store_with_disks(0, MIB, EngineKind::Auto);
    let small = dir.path().join("small.img");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    check_field(store.add_disk("small", DiskSource::Path(small)), "path");
    let big = dir.path().join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let info = store.add_disk("big", DiskSource::Path(big)).unwrap();
    assert_eq!(info.capacity, 4 * MIB, "the last 4 MiB hold the journal");
    let vol = store.create_volume(&spec("v", 2 * MIB, 65536, 1)).unwrap();
    vol.write_at(0, &crate::pattern(3, 65536)).unwrap();
    crate::check_read(&vol, 0, &crate::pattern(3, 65536));
}
