//! Per-object counters that prove an effect happened exactly once: a volume's
//! `generation` (VM `starts` are tested with the VMs).

use proto::v1::{CreateVolume, DeleteVolume, VolumeStatus, apply_request::Action};

use crate::harness::{TestNode, apply_ok, controller};

fn create(name: &str) -> Action {
    Action::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: 8 << 20,
        stripe_width: 2,
        stripe_unit_bytes: 64 << 10,
        replica_peers: vec![],
    })
}

fn delete(name: &str) -> Action {
    Action::DeleteVolume(DeleteVolume { name: name.into() })
}

async fn volume(client: &mut proto::client::NodeClient, name: &str) -> Option<VolumeStatus> {
    client
        .observe()
        .await
        .unwrap()
        .volumes
        .into_iter()
        .find(|volume| volume.name == name)
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_generation_counts_creations_across_deletes_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut node = TestNode::start_on("gen-1", dir.path(), &controller, "127.0.0.78");
    let mut client = node.client(&controller).await;

    apply_ok(&mut client, "create-1", create("v")).await;
    assert_eq!(volume(&mut client, "v").await.unwrap().generation, 1);
    // A replayed request and an idempotent re-create under a new id create nothing.
    assert!(
        apply_ok(&mut client, "create-1", create("v"))
            .await
            .replayed
    );
    apply_ok(&mut client, "create-1b", create("v")).await;
    assert_eq!(volume(&mut client, "v").await.unwrap().generation, 1);
    // Another volume has its own count.
    apply_ok(&mut client, "create-w", create("w")).await;
    assert_eq!(volume(&mut client, "w").await.unwrap().generation, 1);

    // Deleted and created again: the second volume of that name.
    apply_ok(&mut client, "delete-1", delete("v")).await;
    assert!(volume(&mut client, "v").await.is_none());
    apply_ok(&mut client, "create-2", create("v")).await;
    assert_eq!(volume(&mut client, "v").await.unwrap().generation, 2);

    // Durable: the same after kill -9 and restart.
    node.kill_9();
    let node = TestNode::start_at("gen-1", dir.path(), "127.0.0.78:0");
    let mut client = node.client(&controller).await;
    assert_eq!(volume(&mut client, "v").await.unwrap().generation, 2);
    assert_eq!(volume(&mut client, "w").await.unwrap().generation, 1);
    apply_ok(&mut client, "delete-2", delete("v")).await;
    apply_ok(&mut client, "create-3", create("v")).await;
    assert_eq!(volume(&mut client, "v").await.unwrap().generation, 3);
}
