//! Authentication: signed requests against trusted controller and peer keys, each
//! signature bound to the one node it was made for.

use proto::auth::{Identity, NodeTarget, RequestSigner};
use proto::methods;
use proto::v1::{
    self, ApplyRequest, CreateVolume, ObserveRequest, Peer, SetPeers, apply_client::ApplyClient,
    apply_request::Action, observe_client::ObserveClient, replication_client::ReplicationClient,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, request};
use crate::lab::{start_at_ip, target_of};

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
    let target = target_of(&node);

    let stranger = RequestSigner::new(Identity::generate().unwrap());
    let signed = stranger
        .sign(methods::OBSERVE, &target, ObserveRequest {})
        .unwrap();
    assert_unauthenticated(raw.observe(signed).await, "not trusted");

    // Signed by the right key but for another method: the signature does not carry over.
    let signer = RequestSigner::new(controller.clone());
    let moved = signer
        .sign(methods::APPLY, &target, ObserveRequest {})
        .unwrap();
    assert_unauthenticated(raw.observe(moved).await, "signature does not verify");

    // A forged signature.
    let mut forged = signer
        .sign(methods::OBSERVE, &target, ObserveRequest {})
        .unwrap();
    forged
        .metadata_mut()
        .insert("x-cairn-signature", "00".repeat(64).parse().unwrap());
    assert_unauthenticated(raw.observe(forged).await, "signature does not verify");

    // The right signature works.
    let good = signer
        .sign(methods::OBSERVE, &target, ObserveRequest {})
        .unwrap();
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
    let original = signer
        .sign(methods::OBSERVE, &target_of(&node), ObserveRequest {})
        .unwrap();
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
    let target_a = target_of(&node_a);
    let mut replication = ReplicationClient::connect(format!("http://{}", node_a.address))
        .await
        .unwrap();
    let delete = || v1::DeleteReplicaRequest {
        volume: "nothing".into(),
        grant: None,
    };
    assert_unauthenticated(
        replication
            .delete_replica(
                signer_b
                    .sign(methods::DELETE_REPLICA, &target_a, delete())
                    .unwrap(),
            )
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
    // Now B is authenticated, and authorised per volume: it holds no copy of
    // `nothing` and brings no controller signature, so it may not delete it.
    let status = replication
        .delete_replica(
            signer_b
                .sign(methods::DELETE_REPLICA, &target_a, delete())
                .unwrap(),
        )
        .await
        .expect_err("a trusted peer is still authorised per volume");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("peer-b")
            && status.message().contains("`nothing`")
            && status.message().contains("peer-a"),
        "{}",
        status.message()
    );

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

fn create_volume(id: &str, name: &str) -> ApplyRequest {
    request(
        id,
        Action::CreateVolume(CreateVolume {
            name: name.into(),
            size_bytes: 1 << 20,
            stripe_width: 1,
            stripe_unit_bytes: 64 << 10,
            replica_peers: vec![],
        }),
    )
}

async fn apply_client(node: &TestNode) -> ApplyClient<tonic::transport::Channel> {
    ApplyClient::connect(format!("http://{}", node.address))
        .await
        .unwrap()
}

/// The same signed request, sent again byte for byte.
fn copy_of<T: Clone>(request: &tonic::Request<T>) -> tonic::Request<T> {
    let mut copy = tonic::Request::new(request.get_ref().clone());
    *copy.metadata_mut() = request.metadata().clone();
    copy
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_signed_for_one_node_is_refused_by_another() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let lab2 = start_at_ip("lab-2", &base.path().join("2"), &controller, "127.0.0.54");
    let lab3 = start_at_ip("lab-3", &base.path().join("3"), &controller, "127.0.0.55");
    let signer = RequestSigner::new(controller.clone());
    let for_lab2 = signer
        .sign(methods::APPLY, &target_of(&lab2), create_volume("c-1", "v"))
        .unwrap();

    let refused = apply_client(&lab3)
        .await
        .apply(copy_of(&for_lab2))
        .await
        .expect_err("lab-3 refuses a request signed for lab-2");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("addressed to node `lab-2`")
            && refused.message().contains("not to this node `lab-3`"),
        "{}",
        refused.message()
    );
    // The refusal says who lab-3 is, so an honest client can sign for it.
    assert_eq!(NodeTarget::from_refusal(&refused), Some(target_of(&lab3)));
    assert!(
        lab3.client(&controller)
            .await
            .observe()
            .await
            .unwrap()
            .volumes
            .is_empty(),
        "nothing was created on lab-3"
    );

    // A node with lab-2's name but another key (a reinstalled or impostor lab-2) refuses
    // it too: the key is part of what was signed.
    let impostor_dir = base.path().join("2-again");
    let impostor = start_at_ip("lab-2", &impostor_dir, &controller, "127.0.0.54");
    let refused = apply_client(&impostor)
        .await
        .apply(copy_of(&for_lab2))
        .await
        .expect_err("another lab-2 refuses it");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("addressed to node `lab-2`"),
        "{}",
        refused.message()
    );

    // The node it was made for carries it out.
    let response = apply_client(&lab2)
        .await
        .apply(for_lab2)
        .await
        .expect("lab-2 accepts its own request")
        .into_inner();
    assert!(!response.replayed);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_replayed_after_a_node_restart_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut node = start_at_ip("lab-4", dir.path(), &controller, "127.0.0.56");
    let signer = RequestSigner::new(controller.clone());
    let original = signer
        .sign(methods::APPLY, &target_of(&node), create_volume("r-1", "v"))
        .unwrap();
    let replay = copy_of(&original);
    apply_client(&node).await.apply(original).await.unwrap();

    // Kill the node and start it again on the same data directory and address: the
    // nonces it accepted are in its store, so the window does not reopen.
    let address = node.address.clone();
    node.kill_9();
    let node = TestNode::start_at("lab-4", dir.path(), &address);
    let refused = apply_client(&node)
        .await
        .apply(replay)
        .await
        .expect_err("a replay after the restart is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("replayed"),
        "{}",
        refused.message()
    );
    // A freshly signed request is fine.
    node.client(&controller).await.observe().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_the_old_signature_format_is_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = start_at_ip("lab-5", dir.path(), &controller, "127.0.0.57");
    // What a client of the cairn-node-request-v1 format sends: no format tag and no
    // target in the headers or in the signed payload.
    let body = ObserveRequest {};
    let body_hash = {
        use sha2::Digest;
        sha2::Sha256::digest(prost::Message::encode_to_vec(&body))
    };
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let nonce = "ab".repeat(16);
    let payload = format!(
        "cairn-node-request-v1\n{}\n{timestamp}\n{nonce}\n{}",
        methods::OBSERVE,
        proto::auth::to_hex(&body_hash)
    );
    let signature = proto::auth::to_hex(&controller.sign_bytes(payload.as_bytes()).to_bytes());
    let mut old = tonic::Request::new(body);
    let metadata = old.metadata_mut();
    metadata.insert("x-cairn-key", controller.public_key_hex().parse().unwrap());
    metadata.insert("x-cairn-timestamp", timestamp.to_string().parse().unwrap());
    metadata.insert("x-cairn-nonce", nonce.parse().unwrap());
    metadata.insert("x-cairn-signature", signature.parse().unwrap());
    let refused = observe_client(&node)
        .await
        .observe(old)
        .await
        .expect_err("the old format is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    for needle in ["cairn-node-request-v1", "cairn-req-v2", "upgrade"] {
        assert!(
            refused.message().contains(needle),
            "{needle:?} missing in {}",
            refused.message()
        );
    }
}
