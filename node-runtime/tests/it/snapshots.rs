//! Snapshots and clones in the node API: a snapshot of a replicated volume is one point
//! of its write sequence on every copy, clones are writable and leave the snapshot as it
//! was, deletes free the space, and bad requests are refused naming what is wrong.

use proto::auth::Identity;
use proto::client::NodeClient;
use proto::v1::{
    CloneVolume, CreateVolume, DeleteSnapshot, DeleteVolume, Peer, ReadVolumeRequest,
    SnapshotVolume, VolumeStatus, WriteVolume, apply_request::Action,
    apply_response::Result as ApplyResult,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern, request};
use crate::lab::{client_as, push_peers};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// The volume: 16 blocks of 64 KiB, each written whole.
const BLOCK: u64 = 64 * KIB;
const BLOCKS: u64 = 16;

fn snapshot(volume: &str, name: &str) -> Action {
    Action::SnapshotVolume(SnapshotVolume {
        volume: volume.into(),
        snapshot: name.into(),
    })
}

fn clone(volume: &str, name: &str, into: &str) -> Action {
    Action::CloneVolume(CloneVolume {
        volume: volume.into(),
        snapshot: name.into(),
        name: into.into(),
    })
}

fn write(volume: &str, offset: u64, data: Vec<u8>) -> Action {
    Action::WriteVolume(WriteVolume {
        name: volume.into(),
        offset,
        data,
    })
}

async fn read_all(client: &mut NodeClient, volume: &str) -> Vec<u8> {
    client
        .read_volume(ReadVolumeRequest {
            name: volume.into(),
            offset: 0,
            length: BLOCK * BLOCKS,
        })
        .await
        .unwrap_or_else(|status| panic!("read {volume}: {status:?}"))
}

pub(crate) async fn status_of(client: &mut NodeClient, volume: &str) -> VolumeStatus {
    client
        .observe()
        .await
        .unwrap()
        .volumes
        .into_iter()
        .find(|status| status.name == volume)
        .unwrap_or_else(|| panic!("volume {volume} is observed"))
}

async fn free_bytes(client: &mut NodeClient) -> u64 {
    client
        .get_inventory()
        .await
        .unwrap()
        .disks
        .iter()
        .filter(|disk| disk.name.starts_with("disk-"))
        .map(|disk| disk.free_bytes)
        .sum()
}

/// The volume after the first `writes` writes of the writer below (write `k` puts
/// `pattern(k)` on block `k % BLOCKS`).
fn after(writes: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; (BLOCK * BLOCKS) as usize];
    for k in 1..=writes {
        let at = ((k % BLOCKS) * BLOCK) as usize;
        bytes[at..at + BLOCK as usize].copy_from_slice(&pattern(k, BLOCK as usize));
    }
    bytes
}

/// A writer and a replica node on `ips`, each with the other in its peer set.
async fn two_nodes(
    base: &std::path::Path,
    controller: &Identity,
    names: [&str; 2],
    ips: [&str; 2],
) -> (TestNode, TestNode, NodeClient, NodeClient) {
    let primary = TestNode::start_on(names[0], &base.join("p"), controller, ips[0]);
    let replica = TestNode::start_on(names[1], &base.join("r"), controller, ips[1]);
    push_peers(&[&primary, &replica], controller).await;
    let on_primary = primary.client(controller).await;
    let on_replica = replica.client(controller).await;
    (primary, replica, on_primary, on_replica)
}

/// A 2-copy volume `v` of 16 × 64 KiB on the writer and `replica`.
async fn create_v(client: &mut NodeClient, replica: &TestNode) {
    apply_ok(
        client,
        "create",
        Action::CreateVolume(CreateVolume {
            name: "v".into(),
            size_bytes: BLOCK * BLOCKS,
            stripe_width: 2,
            stripe_unit_bytes: BLOCK,
            replica_peers: vec![Peer {
                name: replica.name.clone(),
                ..Default::default()
            }],
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_taken_during_writes_is_the_same_point_on_both_copies_and_clones_leave_it_alone()
{
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let (primary, replica, mut on_primary, mut on_replica) = two_nodes(
        base.path(),
        &controller,
        ["snap-p", "snap-r"],
        ["127.0.0.131", "127.0.0.132"],
    )
    .await;
    let free_before = (
        free_bytes(&mut on_primary).await,
        free_bytes(&mut on_replica).await,
    );
    create_v(&mut on_primary, &replica).await;

    // One writer, write after write; the snapshot is taken while it writes. The writes
    // acknowledged before the snapshot was asked for are in it; those asked for after
    // it was acknowledged are not.
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut client = on_primary.clone();
        let (acknowledged, started, stop) = (acknowledged.clone(), started.clone(), stop.clone());
        tokio::spawn(async move {
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                k += 1;
                started.store(k, std::sync::atomic::Ordering::SeqCst);
                let data = pattern(k, BLOCK as usize);
                client
                    .apply(request(
                        &format!("w{k}"),
                        write("v", (k % BLOCKS) * BLOCK, data),
                    ))
                    .await
                    .unwrap_or_else(|status| panic!("write {k}: {status:?}"));
                acknowledged.store(k, std::sync::atomic::Ordering::SeqCst);
            }
            k
        })
    };
    while acknowledged.load(std::sync::atomic::Ordering::SeqCst) < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    let taken = apply_ok(&mut on_primary, "snap-1", snapshot("v", "s1")).await;
    let not_after = started.load(std::sync::atomic::Ordering::SeqCst);
    // A few more writes after it, then stop.
    while acknowledged.load(std::sync::atomic::Ordering::SeqCst) < not_after + 10 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let last = writer.await.unwrap();
    let Some(ApplyResult::Snapshot(taken)) = taken.result else {
        panic!("unexpected result {taken:?}");
    };
    assert_eq!(taken.size_bytes, BLOCK * BLOCKS);
    assert_eq!(
        taken.copies,
        vec!["snap-p".to_string(), "snap-r".to_string()]
    );

    // Both copies list it, with the writer's time.
    for client in [&mut on_primary, &mut on_replica] {
        let status = status_of(client, "v").await;
        assert_eq!(status.snapshots.len(), 1, "{status:?}");
        assert_eq!(status.snapshots[0].name, "s1");
        assert_eq!(
            status.snapshots[0].created_at_unix_ms,
            taken.created_at_unix_ms
        );
        assert_eq!(status.snapshots[0].size_bytes, BLOCK * BLOCKS);
        assert!(status.snapshots[0].pending_copies.is_empty());
    }

    // The snapshot's content, read through a clone on each copy: the same bytes on both,
    // and the volume as it was after one write between `before` and `not_after`.
    apply_ok(&mut on_primary, "clone-1", clone("v", "s1", "c1")).await;
    let on_p = read_all(&mut on_primary, "c1").await;
    let on_r = read_all(&mut on_replica, "c1").await;
    assert_eq!(
        crc32c::crc32c(&on_p),
        crc32c::crc32c(&on_r),
        "the snapshot differs between the copies"
    );
    let point = (before..=not_after).find(|&k| after(k) == on_p);
    let point = point.unwrap_or_else(|| {
        panic!(
            "the snapshot is no state of the write sequence between write {before} and {not_after}"
        )
    });
    println!(
        "snapshot taken after write {point} (acknowledged before it: {before}, started before its answer: {not_after}, last write {last}); crc32c {:08x} on both copies",
        crc32c::crc32c(&on_p)
    );
    // The volume went on: it holds every write.
    assert_eq!(read_all(&mut on_primary, "v").await, after(last));
    assert_eq!(read_all(&mut on_replica, "v").await, after(last));

    // The clone is writable on both copies; the snapshot stays as it was.
    let mine = pattern(999, BLOCK as usize);
    let ack = apply_ok(&mut on_primary, "clone-write", write("c1", 0, mine.clone())).await;
    let Some(ApplyResult::WriteVolume(ack)) = ack.result else {
        panic!("unexpected result {ack:?}");
    };
    assert_eq!(ack.copies, 2, "the clone's write is on both copies");
    let mut expected = on_p.clone();
    expected[..BLOCK as usize].copy_from_slice(&mine);
    assert_eq!(read_all(&mut on_primary, "c1").await, expected);
    assert_eq!(read_all(&mut on_replica, "c1").await, expected);
    apply_ok(&mut on_primary, "clone-2", clone("v", "s1", "c2")).await;
    assert_eq!(read_all(&mut on_primary, "c2").await, on_p);
    assert_eq!(read_all(&mut on_replica, "c2").await, on_p);
    let c1 = status_of(&mut on_replica, "c1").await;
    assert_eq!(
        c1.primary, "snap-p",
        "the clone's replica names its primary"
    );

    // Bad requests, each naming what is wrong.
    let refuser = on_primary.clone();
    let refused = move |id: &'static str, action: Action| {
        let mut client = refuser.clone();
        async move {
            client
                .apply(request(id, action))
                .await
                .expect_err("refused")
        }
    };
    let unknown_volume = refused("bad-1", snapshot("nope", "s1")).await;
    assert_eq!(unknown_volume.code(), Code::NotFound, "{unknown_volume:?}");
    assert!(
        unknown_volume
            .message()
            .contains("volume `nope` does not exist on node snap-p")
    );
    let unknown_snapshot = refused("bad-2", clone("v", "s9", "c9")).await;
    assert_eq!(
        unknown_snapshot.code(),
        Code::NotFound,
        "{unknown_snapshot:?}"
    );
    assert!(
        unknown_snapshot
            .message()
            .contains("volume `v` has no snapshot `s9` on node snap-p"),
        "{}",
        unknown_snapshot.message()
    );
    let duplicate = refused("bad-3", snapshot("v", "s1")).await;
    assert_eq!(duplicate.code(), Code::AlreadyExists, "{duplicate:?}");
    assert!(duplicate.message().contains("already has a snapshot `s1`"));
    apply_ok(
        &mut on_primary,
        "create-other",
        Action::CreateVolume(CreateVolume {
            name: "other".into(),
            size_bytes: MIB,
            stripe_width: 1,
            stripe_unit_bytes: BLOCK,
            replica_peers: Vec::new(),
        }),
    )
    .await;
    let taken_name = refused("bad-4", clone("v", "s1", "other")).await;
    assert_eq!(taken_name.code(), Code::AlreadyExists, "{taken_name:?}");
    assert!(
        taken_name
            .message()
            .contains("volume `other` already exists on node snap-p"),
        "{}",
        taken_name.message()
    );
    let existing = refused("bad-5", clone("v", "s1", "v")).await;
    assert_eq!(existing.code(), Code::InvalidArgument, "{existing:?}");
    assert!(existing.message().contains("clone_volume.name"));
    let other_volume = refused("bad-6", clone("c2", "s1", "c1")).await;
    assert_eq!(other_volume.code(), Code::NotFound, "{other_volume:?}");
    let bad_name = refused("bad-7", snapshot("v", "Daily_1")).await;
    assert_eq!(bad_name.code(), Code::InvalidArgument);
    assert!(bad_name.message().contains("snapshot_volume.snapshot"));
    let on_the_replica = on_replica
        .apply(request("bad-8", snapshot("v", "s2")))
        .await
        .expect_err("refused");
    assert_eq!(on_the_replica.code(), Code::FailedPrecondition);
    assert!(
        on_the_replica
            .message()
            .contains("is a replica of node snap-p")
    );
    // Replication is authorised per volume: only the writer snapshots a copy (not a
    // controller), and a clone's copy needs the controller's signed CloneVolume.
    let by_controller = on_replica
        .replica_snapshot(proto::v1::ReplicaSnapshotRequest {
            volume: "v".into(),
            snapshot: "s9".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(
        by_controller.code(),
        Code::PermissionDenied,
        "{by_controller:?}"
    );
    let mut as_primary = client_as(&primary, &replica).await;
    let no_grant = as_primary
        .clone_replica(proto::v1::CloneReplicaRequest {
            volume: "v".into(),
            snapshot: "s1".into(),
            name: "sneaky".into(),
            grant: None,
        })
        .await
        .expect_err("refused");
    assert_eq!(no_grant.code(), Code::PermissionDenied, "{no_grant:?}");
    assert!(
        no_grant.message().contains("CloneVolume"),
        "{}",
        no_grant.message()
    );
    assert!(
        !status_of(&mut on_replica, "v")
            .await
            .snapshots
            .iter()
            .any(|s| s.name == "s9"),
        "nothing refused reached the copy"
    );
    let with_snapshots = refused(
        "bad-9",
        Action::DeleteVolume(DeleteVolume { name: "v".into() }),
    )
    .await;
    assert_eq!(with_snapshots.code(), Code::FailedPrecondition);
    assert!(
        with_snapshots.message().contains("has 1 snapshot(s) (s1)"),
        "{}",
        with_snapshots.message()
    );

    // Deleting frees: the clones, the snapshot (gone from both copies; the clones made
    // from it would have kept its data), then the volume: every disk as before.
    for (id, name) in [("del-c1", "c1"), ("del-c2", "c2"), ("del-other", "other")] {
        apply_ok(
            &mut on_primary,
            id,
            Action::DeleteVolume(DeleteVolume { name: name.into() }),
        )
        .await;
    }
    apply_ok(
        &mut on_primary,
        "del-s1",
        Action::DeleteSnapshot(DeleteSnapshot {
            volume: "v".into(),
            snapshot: "s1".into(),
        }),
    )
    .await;
    for client in [&mut on_primary, &mut on_replica] {
        assert!(status_of(client, "v").await.snapshots.is_empty());
    }
    let gone = refused("bad-10", clone("v", "s1", "c3")).await;
    assert_eq!(gone.code(), Code::NotFound);
    apply_ok(
        &mut on_primary,
        "del-v",
        Action::DeleteVolume(DeleteVolume { name: "v".into() }),
    )
    .await;
    assert_eq!(
        (
            free_bytes(&mut on_primary).await,
            free_bytes(&mut on_replica).await
        ),
        free_before,
        "every byte is free again on both nodes"
    );
}

async fn install_epoch(client: &mut NodeClient, id: &str, epoch: u64, in_sync: &[&str]) {
    apply_ok(
        client,
        id,
        Action::SetVolumeEpoch(proto::v1::SetVolumeEpoch {
            name: "v".into(),
            epoch,
            writer: "snapo-p".into(),
            in_sync: in_sync.iter().map(|name| name.to_string()).collect(),
            ..Default::default()
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_outside_the_in_sync_set_takes_the_snapshot_at_its_point_when_it_catches_up() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let (_primary, replica, mut on_primary, mut on_replica) = two_nodes(
        base.path(),
        &controller,
        ["snapo-p", "snapo-r"],
        ["127.0.0.133", "127.0.0.134"],
    )
    .await;
    create_v(&mut on_primary, &replica).await;
    let mut expected = vec![0u8; (BLOCK * BLOCKS) as usize];
    let put = |bytes: &mut Vec<u8>, block: u64, seed: u64| {
        let data = pattern(seed, BLOCK as usize);
        bytes[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize].copy_from_slice(&data);
        write("v", block * BLOCK, data)
    };
    for block in 0..BLOCKS {
        let action = put(&mut expected, block, block + 1);
        apply_ok(&mut on_primary, &format!("w{block}"), action).await;
    }
    // The authority takes the replica out of the in-sync set (the replica first, the
    // writer last, as the controller installs).
    install_epoch(&mut on_replica, "e1", 1, &["snapo-p"]).await;
    install_epoch(&mut on_primary, "e1", 1, &["snapo-p"]).await;
    // Writes the replica misses, then the snapshot, then writes after it to the same
    // blocks: the replica's snapshot must hold the first, not the second.
    for block in 0..4 {
        let action = put(&mut expected, block, 100 + block);
        apply_ok(&mut on_primary, &format!("x{block}"), action).await;
    }
    let at_snapshot = expected.clone();
    let taken = apply_ok(&mut on_primary, "snap", snapshot("v", "s1")).await;
    let Some(ApplyResult::Snapshot(taken)) = taken.result else {
        panic!("unexpected result {taken:?}");
    };
    assert_eq!(
        taken.copies,
        vec!["snapo-p".to_string()],
        "the copy outside the in-sync set does not hold it yet"
    );
    for (id, block, seed) in [("y0", 0, 200), ("y5", 5, 201), ("y2", 2, 202)] {
        let action = put(&mut expected, block, seed);
        apply_ok(&mut on_primary, id, action).await;
    }
    // The writer's background pass catches the copy up: the snapshot first, at its point.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let writer = status_of(&mut on_primary, "v").await;
        let copy = status_of(&mut on_replica, "v").await;
        let caught_up = writer.caught_up.contains(&"snapo-r".to_string());
        let pending = writer
            .snapshots
            .iter()
            .any(|snapshot| !snapshot.pending_copies.is_empty());
        if caught_up && !pending && copy.snapshots.len() == 1 {
            assert_eq!(copy.snapshots[0].name, "s1");
            assert_eq!(
                copy.snapshots[0].created_at_unix_ms,
                taken.created_at_unix_ms
            );
            assert!(writer.resync_bytes > 0);
            println!(
                "caught up: {} bytes shipped to the returning copy",
                writer.resync_bytes
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the copy did not catch up: writer {writer:?}, copy {copy:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    install_epoch(&mut on_replica, "e2", 2, &["snapo-p", "snapo-r"]).await;
    install_epoch(&mut on_primary, "e2", 2, &["snapo-p", "snapo-r"]).await;
    // Both copies of the snapshot (read through a clone) are the volume at its point;
    // both copies of the volume hold every write.
    apply_ok(&mut on_primary, "clone", clone("v", "s1", "c")).await;
    let on_p = read_all(&mut on_primary, "c").await;
    let on_r = read_all(&mut on_replica, "c").await;
    assert_eq!(
        crc32c::crc32c(&on_p),
        crc32c::crc32c(&at_snapshot),
        "the writer's snapshot"
    );
    assert_eq!(
        crc32c::crc32c(&on_r),
        crc32c::crc32c(&at_snapshot),
        "the returning copy's snapshot"
    );
    assert_eq!(read_all(&mut on_primary, "v").await, expected);
    assert_eq!(read_all(&mut on_replica, "v").await, expected);
}
