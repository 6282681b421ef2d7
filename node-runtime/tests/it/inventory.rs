//! Inventory, reflection, Watch and graceful shutdown.

use std::time::Duration;

use proto::v1::{CreateVolume, apply_request::Action, watch_event::Event};
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::harness::{TestNode, apply_ok, controller};

#[tokio::test(flavor = "multi_thread")]
async fn inventory_reports_identity_hardware_and_kernel_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("inv-1", dir.path(), &controller);
    let inventory = node
        .client(&controller)
        .await
        .get_inventory()
        .await
        .unwrap();

    assert_eq!(inventory.node_name, "inv-1");
    assert_eq!(inventory.public_key_hex, node.public_key_hex());
    let cpu = inventory.cpu.unwrap();
    assert!(cpu.threads >= 1);
    assert!(inventory.memory.unwrap().total_bytes > 0);
    let disk_names: Vec<&str> = inventory
        .disks
        .iter()
        .map(|disk| disk.name.as_str())
        .collect();
    assert_eq!(
        disk_names,
        ["data-dir", "disk-0", "disk-1", "disk-2", "disk-3"]
    );
    assert!(
        inventory
            .disks
            .iter()
            .all(|disk| disk.total_bytes > 0 && disk.free_bytes > 0)
    );
    assert!(inventory.nics.iter().any(|nic| nic.name == "lo"));
    let kernel = inventory.kernel.unwrap();
    assert!(!kernel.kernel_release.is_empty());
    assert_eq!(
        kernel.kvm,
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
    );
    assert_eq!(
        kernel.kvm_pvm,
        std::path::Path::new("/sys/module/kvm_pvm").exists()
    );
    let bonding = network::detect_bonding(&network::NetNs::current("probe"))
        .is_ok_and(|capability| capability.backend == network::BondBackend::KernelBond);
    assert_eq!(kernel.bonding, bonding);
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_is_created_once_and_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut node = TestNode::start("id-1", dir.path(), &controller);
    let first = node.public_key_hex();
    let secret = std::fs::metadata(dir.path().join("identity.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        secret.permissions().mode() & 0o777,
        0o600,
        "the secret key is private"
    );
    assert_eq!(node.terminate(), Some(0));
    let node = TestNode::start_at("id-1", dir.path(), "127.0.0.1:0");
    assert_eq!(node.public_key_hex(), first);
    let inventory = node
        .client(&controller)
        .await
        .get_inventory()
        .await
        .unwrap();
    assert_eq!(inventory.public_key_hex, first);
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_every_service_without_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start("refl-1", dir.path(), &controller());
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let mut names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    names.sort();
    for expected in [
        "cairn.node.v1.Apply",
        "cairn.node.v1.Inventory",
        "cairn.node.v1.Observe",
        "cairn.node.v1.Replication",
        "cairn.node.v1.Watch",
    ] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_heartbeats_and_action_events() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("watch-1", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    let mut stream = client.watch(100).await.unwrap();
    apply_ok(
        &mut client,
        "watch-create",
        Action::CreateVolume(CreateVolume {
            name: "w".into(),
            size_bytes: 1 << 20,
            stripe_width: 1,
            stripe_unit_bytes: 65536,
            replica_peers: vec![],
        }),
    )
    .await;
    let mut saw_heartbeat = false;
    let mut saw_action = false;
    let mut last_sequence = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(saw_heartbeat && saw_action) {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("events within 10 s")
            .expect("stream open")
            .expect("event");
        assert!(event.sequence > last_sequence, "sequence numbers increase");
        last_sequence = event.sequence;
        assert_eq!(event.node_name, "watch-1");
        match event.event {
            Some(Event::Heartbeat(_)) => saw_heartbeat = true,
            Some(Event::Action(action)) => {
                assert_eq!(action.request_id, "watch-create");
                assert_eq!(action.action, "create_volume");
                assert!(action.ok);
                saw_action = true;
            }
            _ => {}
        }
    }
}

/// Two watchers of one node: each stream numbers its own events, heartbeats included,
/// from 1 without a gap, while the other's heartbeats run and actions are published
/// to both. (The node's shared numbering gave each stream's heartbeats a number the
/// other never saw: a gap at every heartbeat, and every gap woke a drift check.)
#[tokio::test(flavor = "multi_thread")]
async fn two_watchers_each_see_their_own_sequence_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("watch-2", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    let mut first = client.watch(100).await.unwrap();
    let mut second = client.watch(130).await.unwrap();
    for i in 0..3 {
        apply_ok(
            &mut client,
            &format!("watch-two-{i}"),
            Action::CreateVolume(CreateVolume {
                name: format!("w{i}"),
                size_bytes: 1 << 20,
                stripe_width: 1,
                stripe_unit_bytes: 65536,
                replica_peers: vec![],
            }),
        )
        .await;
    }
    for (name, stream) in [("first", &mut first), ("second", &mut second)] {
        let mut sequences = vec![];
        let (mut heartbeats, mut actions) = (0, 0);
        while heartbeats < 5 || actions < 3 {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("events within 10 s")
                .expect("stream open")
                .expect("event");
            match event.event {
                Some(Event::Heartbeat(_)) => heartbeats += 1,
                Some(Event::Action(_)) => actions += 1,
                _ => {}
            }
            sequences.push(event.sequence);
        }
        let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
        assert_eq!(sequences, expected, "the {name} watcher's sequence");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut node = TestNode::start("term-1", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    let mut stream = client.watch(1000).await.unwrap();
    assert_eq!(node.terminate(), Some(0), "log:\n{}", node.log());
    assert!(!dir.path().join("listen-address").exists());
    // The Watch stream ends instead of hanging.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(end.is_ok(), "watch stream did not end on shutdown");
}
