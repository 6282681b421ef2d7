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
