//! Version skew during a rolling upgrade (issue 24 item 7), with real `cairn-node`
//! processes on 127.0.0.74-75: a node accepts the requests of a controller one minor
//! newer, fields it does not know included (the signature is checked against the
//! bytes received, `proto::received`), and those of a controller one minor older; a
//! node that speaks the previous minor (`CAIRN_PROTOCOL_EMULATE=1.7`: it advertises
//! 1.7, answers UNIMPLEMENTED for 1.8's `Apply.ApplyBatch`, and verifies against its
//! re-encoding as builds before 1.7 did) serves this build's controller, and shows what
//! the change fixes: the same newer request is refused by it.

use proto::auth::{Identity, NodeTarget, RequestSigner};
use proto::methods;
use proto::v1::{ObserveResponse, ProtocolVersion};
use tonic::Code;

use crate::lab::{start_at_ip, target_of};

/// An `ObserveRequest` of a newer minor: a field this build does not know.
#[derive(Clone, PartialEq, prost::Message)]
struct NewerObserveRequest {
    #[prost(string, tag = "1000")]
    since_next_minor: String,
}

/// One Observe, signed by `key` for `target`, sent as a caller of `version` whose
/// message sets a field this build does not know (`unknown`) or not.
async fn observe_as(
    address: &str,
    target: &NodeTarget,
    key: &Identity,
    version: &str,
    unknown: bool,
) -> Result<ObserveResponse, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let message = NewerObserveRequest {
        since_next_minor: if unknown { "set".into() } else { String::new() },
    };
    let mut request = RequestSigner::new(key.clone())
        .sign(methods::OBSERVE, target, message)
        .unwrap();
    request
        .metadata_mut()
        .insert(proto::protocol::HEADER, version.parse().unwrap());
    grpc.unary(
        request,
        tonic::codegen::http::uri::PathAndQuery::from_static(methods::OBSERVE),
        tonic_prost::ProstCodec::<NewerObserveRequest, ObserveResponse>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_accept_the_next_and_the_previous_controller_minor_and_a_previous_minor_node_serves_this_controller()
 {
    let dir = tempfile::tempdir().unwrap();
    let controller = Identity::generate().unwrap();
    let this = format!("1.{}", proto::protocol::MINOR);
    let next = format!("1.{}", proto::protocol::MINOR + 1);
    let previous = format!("1.{}", proto::protocol::MINOR - 1);

    // This build's node.
    let node = start_at_ip("skew-1", &dir.path().join("n1"), &controller, "127.0.0.74");
    let target = target_of(&node);
    // The next minor's controller: a request with a field the node does not know.
    let answer = observe_as(&node.address, &target, &controller, &next, true)
        .await
        .expect("a node accepts the next minor's request with a field it does not know");
    assert_eq!(answer.node_name, "skew-1");
    // The previous minor's controller (its messages lack this minor's fields).
    observe_as(&node.address, &target, &controller, &previous, false)
        .await
        .expect("a node accepts the previous minor's request");
    // Received bytes are what is checked: a key the node does not trust is still refused.
    let stranger = Identity::generate().unwrap();
    let refused = observe_as(&node.address, &target, &stranger, &next, true)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A node of the previous minor (1.6), and this build's controller.
    let old_dir = dir.path().join("n2");
    std::fs::create_dir_all(&old_dir).unwrap();
    std::fs::write(
        old_dir.join("trusted-controllers"),
        format!("{} test-controller\n", controller.public_key_hex()),
    )
    .unwrap();
    let old = crate::harness::TestNode::start_with_env(
        "skew-2",
        &old_dir,
        "127.0.0.75:0",
        &["--disks", "1", "--disk-capacity", "16777216"],
        &[(proto::protocol::EMULATE, previous.as_str())],
    );
    let old_target = target_of(&old);
    let mut client = old.client(&controller).await;
    let inventory = client.get_inventory().await.unwrap();
    assert_eq!(
        inventory.protocol_version,
        Some(ProtocolVersion {
            major: 1,
            minor: proto::protocol::MINOR - 1
        }),
        "the emulated node advertises the previous minor"
    );
    client
        .observe()
        .await
        .expect("a node of the previous minor serves this build's controller");
    observe_as(&old.address, &old_target, &controller, &this, false)
        .await
        .expect("this minor's request without new fields");
    // What 1.6 builds did with a newer field, and this build no longer does.
    let refused = observe_as(&old.address, &old_target, &controller, &this, true)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("signature does not verify")
            && refused.message().contains(&format!(
                "the caller speaks protocol {this}, newer than this node's {previous}"
            )),
        "{refused:?}"
    );
    // 1.8's batched Apply: a 1.7 node does not have it, says so as a 1.7 build would,
    // and carries nothing out (its caller sends the actions one by one).
    let batch = vec![proto::v1::ApplyRequest {
        request_id: "set-peers-batched".into(),
        action: Some(proto::v1::apply_request::Action::SetPeers(
            proto::v1::SetPeers { peers: vec![] },
        )),
    }];
    let refused = client.apply_batch(batch.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    let outcome = client.get_outcome("set-peers-batched").await.unwrap();
    assert_eq!(outcome.outcome, proto::v1::Outcome::NotFound as i32);
    // This build's node takes it.
    let results = node
        .client(&controller)
        .await
        .apply_batch(batch)
        .await
        .expect("a 1.8 node takes a batch");
    assert!(
        matches!(
            results[0].outcome,
            Some(proto::v1::apply_batch_result::Outcome::Response(_))
        ),
        "{results:?}"
    );
}
