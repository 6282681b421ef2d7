//! ResizeVolume: a replicated volume grown in place on its primary and its replica,
//! data kept, new space zeros and writable; shrinking refused.

use proto::auth::{Identity, RequestSigner};
use proto::client::NodeClient;
use proto::v1::{
    CreateVolume, Peer, ReadVolumeRequest, ResizeReplicaRequest, ResizeVolume, SetPeers,
    VolumeStatus, WriteVolume, apply_request::Action, apply_response::Result as ApplyResult,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern, request};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

fn resize(name: &str, size_bytes: u64) -> Action {
    Action::ResizeVolume(ResizeVolume {
        name: name.into(),
        size_bytes,
    })
}

async fn read(client: &mut NodeClient, offset: u64, length: u64) -> Vec<u8> {
    client
        .read_volume(ReadVolumeRequest {
            name: "v".into(),
            offset,
            length,
        })
        .await
        .unwrap_or_else(|status| panic!("read {offset}+{length}: {status:?}"))
}

async fn status_of(client: &mut NodeClient) -> VolumeStatus {
    client
        .observe()
        .await
        .unwrap()
        .volumes
        .into_iter()
        .find(|volume| volume.name == "v")
        .expect("volume v is observed")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replicated_volume_grows_in_place_on_every_copy_keeping_its_data() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut primary =
        TestNode::start_on("grow-p", &base.path().join("p"), &controller, "127.0.0.74");
    let replica = TestNode::start_on("grow-r", &base.path().join("r"), &controller, "127.0.0.75");
    let peers: Vec<Peer> = [&primary, &replica]
        .iter()
        .map(|node| Peer {
            name: node.name.clone(),
            address: node.address.clone(),
            public_key_hex: node.public_key_hex(),
        })
        .collect();
    for node in [&primary, &replica] {
        let mut client = node.client(&controller).await;
        apply_ok(
            &mut client,
            "peers",
            Action::SetPeers(SetPeers {
                peers: peers.clone(),
            }),
        )
        .await;
    }
    let mut on_primary = primary.client(&controller).await;
    let mut on_replica = replica.client(&controller).await;
    let old_size = 8 * MIB;
    apply_ok(
        &mut on_primary,
        "create",
        Action::CreateVolume(CreateVolume {
            name: "v".into(),
            size_bytes: old_size,
            stripe_width: 2,
            stripe_unit_bytes: 64 * KIB,
            replica_peers: vec![Peer {
                name: replica.name.clone(),
                ..Default::default()
            }],
        }),
    )
    .await;
    let head = pattern(1, MIB as usize);
    let tail = pattern(2, 64 * KIB as usize);
    let write = |id: &str, offset: u64, data: &[u8]| {
        request(
            id,
            Action::WriteVolume(WriteVolume {
                name: "v".into(),
                offset,
                data: data.to_vec(),
            }),
        )
    };
    on_primary.apply(write("w-head", 0, &head)).await.unwrap();
    on_primary
        .apply(write("w-tail", old_size - 64 * KIB, &tail))
        .await
        .unwrap();

    // The same size: nothing to do.
    let same = apply_ok(&mut on_primary, "same", resize("v", old_size)).await;
    let Some(ApplyResult::Volume(same)) = same.result else {
        panic!("unexpected result {same:?}");
    };
    assert_eq!(same.size_bytes, old_size);
    // Smaller: refused, nothing changes.
    let shrink = on_primary
        .apply(request("shrink", resize("v", 4 * MIB)))
        .await
        .unwrap_err();
    assert_eq!(shrink.code(), Code::FailedPrecondition, "{shrink:?}");
    assert!(
        shrink
            .message()
            .contains("shrinking volume v from 8388608 to 4194304 would lose data"),
        "{}",
        shrink.message()
    );
    let misaligned = on_primary
        .apply(request("odd", resize("v", old_size + 100)))
        .await
        .unwrap_err();
    assert_eq!(misaligned.code(), Code::InvalidArgument);
    assert!(misaligned.message().contains("resize_volume.size_bytes"));
    // Only the primary grows a volume.
    let on_the_replica = on_replica
        .apply(request("grow-replica", resize("v", 16 * MIB)))
        .await
        .unwrap_err();
    assert_eq!(on_the_replica.code(), Code::FailedPrecondition);
    // A peer cannot grow a replica without the controller's signed ResizeVolume.
    let primary_key = Identity::load(&primary.data_dir.join("identity.key")).unwrap();
    let mut as_primary = NodeClient::connect(&replica.address, RequestSigner::new(primary_key))
        .await
        .unwrap();
    let ungranted = as_primary
        .resize_replica(ResizeReplicaRequest {
            volume: "v".into(),
            size_bytes: 64 * MIB,
            grant: None,
        })
        .await
        .unwrap_err();
    assert_eq!(ungranted.code(), Code::PermissionDenied, "{ungranted:?}");
    assert_eq!(status_of(&mut on_replica).await.size_bytes, old_size);

    // Grow: every copy, data kept, the new space zeros.
    let new_size = 12 * MIB;
    let grown = apply_ok(&mut on_primary, "grow", resize("v", new_size)).await;
    let Some(ApplyResult::Volume(grown)) = grown.result else {
        panic!("unexpected result {grown:?}");
    };
    assert_eq!(grown.size_bytes, new_size);
    assert_eq!(grown.replica_peers, ["grow-r"]);
    for client in [&mut on_primary, &mut on_replica] {
        let status = status_of(client).await;
        assert_eq!(status.size_bytes, new_size, "{status:?}");
        assert_eq!(status.generation, 1, "growing creates nothing");
        assert_eq!(read(client, 0, MIB).await, head);
        assert_eq!(read(client, old_size - 64 * KIB, 64 * KIB).await, tail);
        assert_eq!(
            read(client, old_size, 4 * MIB).await,
            vec![0u8; 4 * MIB as usize]
        );
    }
    // Writes past the old end reach every copy.
    let straddling = pattern(3, 64 * KIB as usize);
    let at_end = pattern(4, 8 * KIB as usize);
    let ack = on_primary
        .apply(write("w-straddle", old_size - 32 * KIB, &straddling))
        .await
        .unwrap();
    let Some(ApplyResult::WriteVolume(ack)) = ack.result else {
        panic!("unexpected result {ack:?}");
    };
    assert_eq!(ack.copies, 2);
    on_primary
        .apply(write("w-end", new_size - 8 * KIB, &at_end))
        .await
        .unwrap();
    for client in [&mut on_primary, &mut on_replica] {
        assert_eq!(
            read(client, old_size - 32 * KIB, 64 * KIB).await,
            straddling
        );
        assert_eq!(read(client, new_size - 8 * KIB, 8 * KIB).await, at_end);
        assert_eq!(
            read(client, old_size - 64 * KIB, 32 * KIB).await,
            tail[..32 * KIB as usize]
        );
    }
    // A retry is a replay; growing again to the same size changes nothing.
    assert!(
        apply_ok(&mut on_primary, "grow", resize("v", new_size))
            .await
            .replayed
    );
    apply_ok(&mut on_primary, "grow-again", resize("v", new_size)).await;

    // The new size is durable: the primary killed and restarted still has it.
    primary.kill_9();
    let primary = TestNode::start_at("grow-p", &base.path().join("p"), "127.0.0.74:0");
    let mut on_primary = primary.client(&controller).await;
    assert_eq!(status_of(&mut on_primary).await.size_bytes, new_size);
    assert_eq!(
        read(&mut on_primary, new_size - 8 * KIB, 8 * KIB).await,
        at_end
    );
    assert_eq!(read(&mut on_primary, 0, MIB).await, head);
}
