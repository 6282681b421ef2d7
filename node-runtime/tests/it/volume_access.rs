//! Per-volume authorization of `Replication`: a node's key opens only the volumes it
//! holds a copy of. The attacks of issue 12 item 9, each with lab-2's identity.key
//! against volume `v` whose primary is on lab-3 and whose replica is on lab-1; every
//! one is refused with PERMISSION_DENIED naming the caller, the volume and the node,
//! while the legitimate traffic between lab-3 and lab-1 keeps working.

use std::path::Path;

use proto::auth::Identity;
use proto::v1::{
    AddVolumeCopy, ApplyRequest, CreateVolume, DeleteReplicaRequest, DeleteVolume,
    EnsureReplicaRequest, ReadVolumeRequest, RemoveVolumeCopy, ReplicaReadRequest,
    ReplicaWriteRequest, VolumeRole, WriteVolume, apply_request::Action,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern};
use crate::lab::{client_as, controller_grant, peer_of, push_peers, start_at_ip, target_of};

const VOLUME_BYTES: u64 = 16 << 20;

/// lab-1 (replica of `v`), lab-2 (a trusted peer holding no copy of `v`), lab-3
/// (primary of `v`), and `v` written with `pattern(1, ..)` in its first 64 KiB.
struct Lab {
    controller: Identity,
    lab1: TestNode,
    lab2: TestNode,
    lab3: TestNode,
    written: Vec<u8>,
}

async fn lab(base: &Path) -> Lab {
    let controller = controller();
    let lab1 = start_at_ip("lab-1", &base.join("1"), &controller, "127.0.0.51");
    let lab2 = start_at_ip("lab-2", &base.join("2"), &controller, "127.0.0.52");
    let lab3 = start_at_ip("lab-3", &base.join("3"), &controller, "127.0.0.53");
    push_peers(&[&lab1, &lab2, &lab3], &controller).await;
    let mut primary = lab3.client(&controller).await;
    // As the reconciler sends it: the replica's name, address and key.
    apply_ok(
        &mut primary,
        "create-v",
        Action::CreateVolume(CreateVolume {
            name: "v".into(),
            size_bytes: VOLUME_BYTES,
            stripe_width: 2,
            stripe_unit_bytes: 64 << 10,
            replica_peers: vec![peer_of(&lab1)],
        }),
    )
    .await;
    let written = pattern(1, 64 << 10);
    let ack = apply_ok(
        &mut primary,
        "write-v",
        Action::WriteVolume(WriteVolume {
            name: "v".into(),
            offset: 0,
            data: written.clone(),
        }),
    )
    .await;
    assert!(
        matches!(ack.result, Some(proto::v1::apply_response::Result::WriteVolume(ref w)) if w.copies == 2),
        "{ack:?}"
    );
    Lab {
        controller,
        lab1,
        lab2,
        lab3,
        written,
    }
}

fn assert_denied<T: std::fmt::Debug>(result: Result<T, tonic::Status>, volume: &str, node: &str) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let message = status.message();
    assert!(
        message.contains("lab-2")
            && message.contains(&format!("`{volume}`"))
            && message.contains(node),
        "the refusal names the caller, the volume and the node: {message}"
    );
}

async fn read_local(node: &TestNode, controller: &Identity, length: u64) -> Vec<u8> {
    node.client(controller)
        .await
        .read_volume(ReadVolumeRequest {
            name: "v".into(),
            offset: 0,
            length,
        })
        .await
        .unwrap()
}

fn replica_read(length: u64) -> ReplicaReadRequest {
    ReplicaReadRequest {
        volume: "v".into(),
        offset: 0,
        length,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_key_cannot_read_a_volume_it_holds_no_copy_of() {
    let base = tempfile::tempdir().unwrap();
    let lab = lab(base.path()).await;

    let mut attacker = client_as(&lab.lab2, &lab.lab3).await;
    assert_denied(
        attacker.replica_read(replica_read(4096)).await,
        "v",
        "lab-3",
    );
    let mut attacker = client_as(&lab.lab2, &lab.lab1).await;
    assert_denied(
        attacker.replica_read(replica_read(4096)).await,
        "v",
        "lab-1",
    );

    // The copies of `v` still read each other: read repair from the replica to the
    // primary, and a copy catching up from the primary.
    let length = lab.written.len() as u64;
    let from_replica = client_as(&lab.lab3, &lab.lab1)
        .await
        .replica_read(replica_read(length))
        .await
        .expect("the primary reads its replica");
    assert!(from_replica.data == lab.written);
    let from_primary = client_as(&lab.lab1, &lab.lab3)
        .await
        .replica_read(replica_read(length))
        .await
        .expect("the replica reads its primary");
    assert!(from_primary.data == lab.written);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_key_cannot_overwrite_a_replica_it_is_not_the_primary_of() {
    let base = tempfile::tempdir().unwrap();
    let lab = lab(base.path()).await;
    let zeros = vec![0u8; 64 << 10];
    let checksums: Vec<u32> = zeros.chunks(4096).map(crc32c::crc32c).collect();
    let mut attacker = client_as(&lab.lab2, &lab.lab1).await;
    for (sequence, resync) in [(0, true), (u64::MAX - 1, false)] {
        let overwrite = ReplicaWriteRequest {
            volume: "v".into(),
            offset: 0,
            data: zeros.clone(),
            sequence,
            checksums: checksums.clone(),
            resync,
            epoch: 0,
            replica_boot: Vec::new(),
        };
        assert_denied(attacker.replica_write(overwrite).await, "v", "lab-1");
    }
    // Nor the primary's copy, which only the primary itself writes.
    let mut attacker = client_as(&lab.lab2, &lab.lab3).await;
    let overwrite = ReplicaWriteRequest {
        volume: "v".into(),
        offset: 0,
        data: zeros.clone(),
        sequence: 0,
        checksums: checksums.clone(),
        resync: true,
        epoch: 0,
        replica_boot: Vec::new(),
    };
    assert_denied(attacker.replica_write(overwrite).await, "v", "lab-3");

    let length = lab.written.len() as u64;
    assert!(read_local(&lab.lab1, &lab.controller, length).await == lab.written);
    assert!(read_local(&lab.lab3, &lab.controller, length).await == lab.written);

    // The primary still writes its replica.
    let newer = pattern(2, 64 << 10);
    let mut primary = lab.lab3.client(&lab.controller).await;
    apply_ok(
        &mut primary,
        "write-v-2",
        Action::WriteVolume(WriteVolume {
            name: "v".into(),
            offset: 0,
            data: newer.clone(),
        }),
    )
    .await;
    assert!(read_local(&lab.lab1, &lab.controller, length).await == newer);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_key_cannot_delete_a_replica() {
    let base = tempfile::tempdir().unwrap();
    let lab = lab(base.path()).await;
    let mut attacker = client_as(&lab.lab2, &lab.lab1).await;
    let delete_v = ApplyRequest {
        request_id: "delete-v".into(),
        action: Some(Action::DeleteVolume(DeleteVolume { name: "v".into() })),
    };

    // No controller signature at all.
    let bare = DeleteReplicaRequest {
        volume: "v".into(),
        grant: None,
    };
    assert_denied(attacker.delete_replica(bare).await, "v", "lab-1");
    // The controller's DeleteVolume of `v` sent to lab-3, captured and forwarded by
    // lab-2: it names lab-3, not the caller.
    let captured = DeleteReplicaRequest {
        volume: "v".into(),
        grant: Some(controller_grant(
            &lab.controller,
            &target_of(&lab.lab3),
            delete_v.clone(),
        )),
    };
    assert_denied(attacker.delete_replica(captured).await, "v", "lab-1");
    // A DeleteVolume of `v` the controller really sent to lab-2: lab-2 is still not
    // the primary that drops this replica.
    let own = DeleteReplicaRequest {
        volume: "v".into(),
        grant: Some(controller_grant(
            &lab.controller,
            &target_of(&lab.lab2),
            delete_v.clone(),
        )),
    };
    assert_denied(attacker.delete_replica(own).await, "v", "lab-1");

    let replica = lab
        .lab1
        .client(&lab.controller)
        .await
        .observe()
        .await
        .unwrap();
    assert_eq!(replica.volumes.len(), 1, "the replica is still there");
    assert_eq!(replica.volumes[0].role, VolumeRole::Replica as i32);
    let length = lab.written.len() as u64;
    assert!(read_local(&lab.lab1, &lab.controller, length).await == lab.written);

    // The controller's DeleteVolume on the primary still drops the replica.
    let mut primary = lab.lab3.client(&lab.controller).await;
    apply_ok(
        &mut primary,
        "delete-v",
        Action::DeleteVolume(DeleteVolume { name: "v".into() }),
    )
    .await;
    let replica = lab
        .lab1
        .client(&lab.controller)
        .await
        .observe()
        .await
        .unwrap();
    assert!(replica.volumes.is_empty(), "{:?}", replica.volumes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_key_cannot_create_an_unrequested_volume() {
    let base = tempfile::tempdir().unwrap();
    let lab = lab(base.path()).await;
    let mut attacker = client_as(&lab.lab2, &lab.lab1).await;
    let big = |grant| EnsureReplicaRequest {
        volume: "big".into(),
        primary: "lab-2".into(),
        size_bytes: 64 << 20,
        stripe_width: 1,
        stripe_unit_bytes: 1 << 20,
        grant,
        copies: Vec::new(),
    };
    let create_big = |replica: &TestNode| ApplyRequest {
        request_id: "create-big".into(),
        action: Some(Action::CreateVolume(CreateVolume {
            name: "big".into(),
            size_bytes: 64 << 20,
            stripe_width: 1,
            stripe_unit_bytes: 1 << 20,
            replica_peers: vec![peer_of(replica)],
        })),
    };

    // No controller signature.
    assert_denied(attacker.ensure_replica(big(None)).await, "big", "lab-1");
    // A CreateVolume the controller sent to lab-2 that puts the replica on lab-3.
    let elsewhere = controller_grant(
        &lab.controller,
        &target_of(&lab.lab2),
        create_big(&lab.lab3),
    );
    assert_denied(
        attacker.ensure_replica(big(Some(elsewhere))).await,
        "big",
        "lab-1",
    );
    // A CreateVolume for lab-1's replica that the controller sent to lab-3, captured.
    let captured = controller_grant(
        &lab.controller,
        &target_of(&lab.lab3),
        create_big(&lab.lab1),
    );
    assert_denied(
        attacker.ensure_replica(big(Some(captured))).await,
        "big",
        "lab-1",
    );
    // The grant's request altered to another volume no longer verifies.
    let mut altered = controller_grant(
        &lab.controller,
        &target_of(&lab.lab2),
        create_big(&lab.lab1),
    );
    if let Some(Action::CreateVolume(create)) = altered
        .request
        .as_mut()
        .and_then(|request| request.action.as_mut())
    {
        create.name = "bigger".into();
    }
    let mut bigger = big(Some(altered));
    bigger.volume = "bigger".into();
    assert_denied(attacker.ensure_replica(bigger).await, "bigger", "lab-1");

    let replica = lab
        .lab1
        .client(&lab.controller)
        .await
        .observe()
        .await
        .unwrap();
    let names: Vec<&str> = replica.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["v"], "no volume was created");
}

/// A writer's forwarded AddVolumeCopy and RemoveVolumeCopy open `EnsureReplica` and
/// `DeleteReplica` only as the controller signed them: for the node they were sent to,
/// naming this node and this volume.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_key_cannot_add_or_remove_copies_the_controller_did_not_ask_for() {
    let base = tempfile::tempdir().unwrap();
    let lab = lab(base.path()).await;
    let mut attacker = client_as(&lab.lab2, &lab.lab1).await;
    let add = |volume: &str, peer: &TestNode| ApplyRequest {
        request_id: "add-copy".into(),
        action: Some(Action::AddVolumeCopy(AddVolumeCopy {
            volume: volume.into(),
            peer: Some(peer_of(peer)),
        })),
    };
    let ensure = |grant| EnsureReplicaRequest {
        volume: "big".into(),
        primary: "lab-2".into(),
        size_bytes: 64 << 20,
        stripe_width: 1,
        stripe_unit_bytes: 1 << 20,
        grant,
        copies: Vec::new(),
    };
    // Sent to lab-2, but naming lab-3 as the new copy.
    let elsewhere = controller_grant(
        &lab.controller,
        &target_of(&lab.lab2),
        add("big", &lab.lab3),
    );
    assert_denied(
        attacker.ensure_replica(ensure(Some(elsewhere))).await,
        "big",
        "lab-1",
    );
    // Naming lab-1, but sent to lab-3 (captured).
    let captured = controller_grant(
        &lab.controller,
        &target_of(&lab.lab3),
        add("big", &lab.lab1),
    );
    assert_denied(
        attacker.ensure_replica(ensure(Some(captured))).await,
        "big",
        "lab-1",
    );
    // Sent to lab-2 naming lab-1, for another volume.
    let other = controller_grant(
        &lab.controller,
        &target_of(&lab.lab2),
        add("small", &lab.lab1),
    );
    assert_denied(
        attacker.ensure_replica(ensure(Some(other))).await,
        "big",
        "lab-1",
    );
    // A RemoveVolumeCopy sent to lab-2 of lab-3's copy does not delete lab-1's.
    let remove = |node: &str| ApplyRequest {
        request_id: "remove-copy".into(),
        action: Some(Action::RemoveVolumeCopy(RemoveVolumeCopy {
            volume: "v".into(),
            node: node.into(),
        })),
    };
    let not_here = controller_grant(&lab.controller, &target_of(&lab.lab2), remove("lab-3"));
    let delete = |grant| DeleteReplicaRequest {
        volume: "v".into(),
        grant: Some(grant),
    };
    assert_denied(
        attacker.delete_replica(delete(not_here)).await,
        "v",
        "lab-1",
    );
    // Of lab-1's copy, but sent to lab-3 (captured).
    let captured = controller_grant(&lab.controller, &target_of(&lab.lab3), remove("lab-1"));
    assert_denied(
        attacker.delete_replica(delete(captured)).await,
        "v",
        "lab-1",
    );
    let names: Vec<String> = lab
        .lab1
        .client(&lab.controller)
        .await
        .observe()
        .await
        .unwrap()
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["v"], "nothing was created or deleted");
    assert_eq!(
        read_local(&lab.lab1, &lab.controller, 64 << 10).await,
        lab.written
    );
}
