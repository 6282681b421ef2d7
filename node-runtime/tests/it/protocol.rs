//! The contract's version: a node reports what it speaks and refuses callers of another
//! major, naming both versions (node on 127.0.0.93).

use proto::auth::{Identity, RequestSigner};
use proto::methods;
use proto::v1::{
    GetInventoryRequest, ObserveRequest, ReplicaReadRequest, inventory_client::InventoryClient,
    observe_client::ObserveClient, replication_client::ReplicationClient,
};
use tonic::Code;

use crate::harness::controller;
use crate::lab::{start_at_ip, target_of};

fn with_protocol<T>(mut request: tonic::Request<T>, version: Option<&str>) -> tonic::Request<T> {
    match version {
        Some(version) => {
            request
                .metadata_mut()
                .insert(proto::protocol::HEADER, version.parse().unwrap());
        }
        None => {
            request.metadata_mut().remove(proto::protocol::HEADER);
        }
    }
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_reports_its_protocol_and_refuses_another_major() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = start_at_ip("proto-1", dir.path(), &controller, "127.0.0.93");
    let target = target_of(&node);
    let signer = RequestSigner::new(controller.clone());
    let address = format!("http://{}", node.address);

    // What it speaks, through the client every caller uses (which sends its own).
    let inventory = node
        .client(&controller)
        .await
        .get_inventory()
        .await
        .unwrap();
    assert_eq!(
        inventory.protocol_version,
        Some(proto::v1::ProtocolVersion { major: 1, minor: 8 })
    );
    assert_eq!(
        proto::protocol::display(&proto::protocol::of_inventory(&inventory)),
        "1.8"
    );
    let signed = signer
        .sign(methods::GET_INVENTORY, &target, GetInventoryRequest {})
        .unwrap();
    assert_eq!(
        signed
            .metadata()
            .get(proto::protocol::HEADER)
            .unwrap()
            .to_str()
            .unwrap(),
        "1.8",
        "every signed call says which version it speaks"
    );

    let mut observe = ObserveClient::connect(address.clone()).await.unwrap();
    let sign_observe = || {
        signer
            .sign(methods::OBSERVE, &target, ObserveRequest {})
            .unwrap()
    };
    // A caller from before versions were sent, and one of a newer minor: served.
    observe
        .observe(with_protocol(sign_observe(), None))
        .await
        .unwrap();
    observe
        .observe(with_protocol(sign_observe(), Some("1.9")))
        .await
        .unwrap();

    // Another major: refused before anything else, saying who to upgrade.
    let newer = observe
        .observe(with_protocol(sign_observe(), Some("2.0")))
        .await
        .unwrap_err();
    assert_eq!(newer.code(), Code::FailedPrecondition, "{newer:?}");
    assert_eq!(
        newer.message(),
        "the caller speaks cairn.node protocol 2.0, node proto-1 speaks 1.8 and serves only major 1: upgrade node proto-1 first (nodes are upgraded before controllers)"
    );
    let older = observe
        .observe(with_protocol(sign_observe(), Some("0.3")))
        .await
        .unwrap_err();
    assert_eq!(older.code(), Code::FailedPrecondition);
    assert!(older.message().ends_with("upgrade the caller"), "{older:?}");
    let malformed = observe
        .observe(with_protocol(sign_observe(), Some("v2")))
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(
        malformed.message().contains("x-cairn-protocol"),
        "{malformed:?}"
    );

    // Node to node the same: a peer of another major is refused before its key is
    // even looked at.
    let stranger = RequestSigner::new(Identity::generate().unwrap());
    let read = stranger
        .sign(
            methods::REPLICA_READ,
            &target,
            ReplicaReadRequest {
                volume: "v".into(),
                offset: 0,
                length: 4096,
            },
        )
        .unwrap();
    let status = ReplicationClient::connect(address.clone())
        .await
        .unwrap()
        .replica_read(with_protocol(read, Some("2.1")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // A newer minor whose signature does not verify is flagged as the likely cause.
    let mut forged = signer
        .sign(methods::GET_INVENTORY, &target, GetInventoryRequest {})
        .unwrap();
    forged
        .metadata_mut()
        .insert("x-cairn-signature", "00".repeat(64).parse().unwrap());
    let status = InventoryClient::connect(address)
        .await
        .unwrap()
        .get_inventory(with_protocol(forged, Some("1.9")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("signature does not verify")
            && status
                .message()
                .contains("the caller speaks protocol 1.9, newer than this node's 1.8"),
        "{status:?}"
    );
}
