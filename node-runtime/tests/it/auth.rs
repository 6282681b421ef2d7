//! Authentication: signed requests against trusted controller and peer keys.

use proto::auth::{Identity, RequestSigner};
use proto::methods;
use proto::v1::{
    self, ObserveRequest, Peer, SetPeers, apply_request::Action, observe_client::ObserveClient,
    replication_client::ReplicationClient,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, request};

async fn observe_client(node: &TestNode) -> ObserveClient<tonic::transport::Channel> {
    ObserveClient::connect(format!("http://{}", node.address))
        .await
        .unwrap()
}

fn assert_unauthenticated<T: std::fmt::Debug>(result: Result<T, tonic::Status>, needle: &str) {
    let status = result.expect_err("call must be refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} lacks {needle:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unsigned_untrusted_and_tampered_calls_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("auth-1", dir.path(), &controller);
    let mut raw = observe_client(&node).await;

    assert_unauthenticated(raw.observe(ObserveRequest {}).await, "not signed");

    let stranger = RequestSigner::new(Identity::generate().unwrap());
    let signed = stranger.sign(methods::OBSERVE, ObserveRequest {}).unwrap();
    assert_unauthenticated(raw.observe(signed).await, "not trusted");

    // Signed by the right key but for another method: the signature does not carry over.
    let signer = RequestSigner::new(controller.clone());
    let moved = signer.sign(methods::APPLY, ObserveRequest {}).unwrap();
    assert_unauthenticated(raw.observe(moved).await, "signature does not verify");

    // A forged signature.
    let mut forged = signer.sign(methods::OBSERVE, ObserveRequest {}).unwrap();
    forged
        .metadata_mut()
        .insert("x-cairn-signature", "00".repeat(64).parse().unwrap());
    assert_unauthenticated(raw.observe(forged).await, "signature does not verify");

    // The right signature works.
    let good = signer.sign(methods::OBSERVE, ObserveRequest {}).unwrap();
    assert_eq!(
        raw.observe(good).await.unwrap().into_inner().node_name,
        "auth-1"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_request_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("auth-2", dir.path(), &controller);
    let mut raw = observe_client(&node).await;
    let signer = RequestSigner::new(controller);
    let original = signer.sign(methods::OBSERVE, ObserveRequest {}).unwrap();
    let mut copy = tonic::Request::new(ObserveRequest {});
    *copy.metadata_mut() = original.metadata().clone();
    raw.observe(original).await.unwrap();
    assert_unauthenticated(raw.observe(copy).await, "replayed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_trusted_keys_refuses_everything_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_at("auth-3", dir.path(), "127.0.0.1:0");
    let result = node.client(&controller()).await.get_inventory().await;
    assert_unauthenticated(result, "--trusted-controller-keys");
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_controller_keys_flag_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::NamedTempFile::new().unwrap();
    let controller = controller();
    std::fs::write(
        keys.path(),
        format!("# ops\n{} ops-controller\n", controller.public_key_hex()),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-node"))
        .args(["--name", "auth-4", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--trusted-controller-keys")
        .arg(keys.path())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let address_file = dir.path().join("listen-address");
    let mut address = String::new();
    for _ in 0..1000 {
        if let Ok(text) = std::fs::read_to_string(&address_file)
            && text.ends_with('\n')
        {
            address = text.trim().to_string();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!address.is_empty(), "node did not start");
    let mut client = proto::client::NodeClient::connect(&address, RequestSigner::new(controller))
        .await
        .unwrap();
    let result = client.get_inventory().await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(result.unwrap().node_name, "auth-4");
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_may_replicate_but_not_apply() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let node_a = TestNode::start("peer-a", &base.path().join("a"), &controller);
    let node_b = TestNode::start("peer-b", &base.path().join("b"), &controller);
    let identity_b = Identity::load(&base.path().join("b/identity.key")).unwrap();

    // Before node A trusts B, B's replication calls are refused.
    let signer_b = RequestSigner::new(identity_b.clone());
    let mut replication = ReplicationClient::connect(format!("http://{}", node_a.address))
        .await
        .unwrap();
    let delete = || v1::DeleteReplicaRequest {
        volume: "nothing".into(),
    };
    assert_unauthenticated(
        replication
            .delete_replica(signer_b.sign(methods::DELETE_REPLICA, delete()).unwrap())
            .await,
        "not trusted",
    );

    let mut client_a = node_a.client(&controller).await;
    apply_ok(
        &mut client_a,
        "peers-1",
        Action::SetPeers(SetPeers {
            peers: vec![Peer {
                name: "peer-b".into(),
                address: node_b.address.clone(),
                public_key_hex: node_b.public_key_hex(),
            }],
        }),
    )
    .await;
    replication
        .delete_replica(signer_b.sign(methods::DELETE_REPLICA, delete()).unwrap())
        .await
        .expect("a trusted peer may call Replication");

    // ... but a peer key is not a controller key.
    let mut as_peer = proto::client::NodeClient::connect(&node_a.address, signer_b)
        .await
        .unwrap();
    assert_unauthenticated(
        as_peer
            .apply(request("p-1", Action::SetPeers(SetPeers { peers: vec![] })))
            .await,
        "not trusted",
    );
    assert_unauthenticated(as_peer.observe().await, "not trusted");

    // The pushed peer set survives a restart and is reported by Observe.
    drop(node_a);
    let node_a = TestNode::start_at("peer-a", &base.path().join("a"), "127.0.0.1:0");
    let observed = node_a.client(&controller).await.observe().await.unwrap();
    assert_eq!(observed.peers.len(), 1);
    assert_eq!(observed.peers[0].name, "peer-b");
}
