use storage::{ApplyOutcome, EngineKind, ReplicaPayload, StorageError};

use crate::{check_read, pattern, spec, store_with_disks};

const MIB: u64 = 1 << 20;

#[test]
fn replica_ops_converge_two_stores_and_retries_are_idempotent() {
    let (_d1, primary) = store_with_disks(2, 8 * MIB, EngineKind::Auto);
    let (_d2, replica) = store_with_disks(1, 8 * MIB, EngineKind::Sync);
    let vol = primary
        .create_volume(&spec("r", 2 * MIB, 32 * 1024, 2))
        .unwrap();
    // The replica may use a different local layout; only the content must agree.
    let peer = replica
        .create_volume(&spec("r", 2 * MIB, 128 * 1024, 1))
        .unwrap();

    let ops = vec![
        vol.write_replicated(0, pattern(40, 300 * 1024)).unwrap(),
        vol.write_replicated(MIB, pattern(41, 8192)).unwrap(),
        vol.trim_replicated(0, 64 * 1024).unwrap(),
    ];
    assert_eq!(ops.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    match &ops[0].payload {
        ReplicaPayload::Write { data, checksums } => assert_eq!(checksums.len(), data.len() / 4096),
        other => panic!("expected a write, got {other:?}"),
    }
    for op in &ops {
        assert_eq!(
            replica.apply_replica(op).unwrap(),
            ApplyOutcome::Applied { volume_seq: op.seq }
        );
    }
    // A retried operation is acknowledged without being applied again.
    assert_eq!(
        replica.apply_replica(&ops[1]).unwrap(),
        ApplyOutcome::Duplicate { volume_seq: 3 }
    );

    let mut a = vec![0u8; 2 * MIB as usize];
    let mut b = vec![0u8; 2 * MIB as usize];
    vol.read_at(0, &mut a).unwrap();
    peer.read_at(0, &mut b).unwrap();
    assert!(a == b, "replica content equals primary content");
    check_read(&peer, 0, &vec![0u8; 64 * 1024]);
    assert_eq!(peer.info().unwrap().seq, 3);
}

/// The primary has several writes in flight at once, so a replica can receive them in
/// another order than they were numbered: the ordered path drops the older one as a
/// duplicate, the unordered path (the agent knows it was never applied) applies it and
/// keeps the higher number, also after the store is reopened.
#[test]
fn writes_arriving_out_of_sequence_are_applied_by_the_unordered_path() {
    let (_d1, primary) = store_with_disks(1, 8 * MIB, EngineKind::Auto);
    let (d2, replica) = store_with_disks(1, 8 * MIB, EngineKind::Auto);
    let vol = primary
        .create_volume(&spec("r", 2 * MIB, 64 * 1024, 1))
        .unwrap();
    replica
        .create_volume(&spec("r", 2 * MIB, 64 * 1024, 1))
        .unwrap();
    let first = vol.write_replicated(0, pattern(50, 8192)).unwrap();
    let second = vol.write_replicated(MIB, pattern(51, 8192)).unwrap();
    assert_eq!(
        replica.apply_replica(&second).unwrap(),
        ApplyOutcome::Applied { volume_seq: 2 }
    );
    assert_eq!(
        replica.apply_replica(&first).unwrap(),
        ApplyOutcome::Duplicate { volume_seq: 2 },
        "the ordered path cannot tell a late write from a retry"
    );
    assert_eq!(
        replica.apply_replica_unordered(&first).unwrap(),
        ApplyOutcome::Applied { volume_seq: 2 }
    );
    let peer = replica.volume("r").unwrap();
    check_read(&peer, 0, &pattern(50, 8192));
    check_read(&peer, MIB, &pattern(51, 8192));
    assert_eq!(peer.info().unwrap().seq, 2);
    drop(peer);
    drop(replica);
    let reopened = storage::Store::open(d2.path(), storage::StoreOptions::default()).unwrap();
    let peer = reopened.volume("r").unwrap();
    check_read(&peer, 0, &pattern(50, 8192));
    check_read(&peer, MIB, &pattern(51, 8192));
    assert_eq!(peer.info().unwrap().seq, 2);
}

#[test]
fn a_replica_write_corrupted_in_transit_is_refused_and_changes_nothing() {
    let (_d1, primary) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    let (_d2, replica) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    let vol = primary.create_volume(&spec("r", MIB, 4096, 1)).unwrap();
    replica.create_volume(&spec("r", MIB, 4096, 1)).unwrap();
    let mut op = vol.write_replicated(8192, pattern(42, 8192)).unwrap();
    if let ReplicaPayload::Write { data, .. } = &mut op.payload {
        data[5000] ^= 1;
    }
    match replica.apply_replica(&op) {
        Err(StorageError::InvalidArgument {
            field: "data",
            reason,
        }) => assert!(reason.contains("offset 12288"), "{reason}"),
        other => panic!("expected a refused write, got {other:?}"),
    }
    assert_eq!(replica.volume("r").unwrap().info().unwrap().seq, 0);
    op.volume = "missing".into();
    assert!(matches!(
        replica.apply_replica(&op),
        Err(StorageError::UnknownVolume { .. })
    ));
}
