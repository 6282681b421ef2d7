//! A small cluster for the security tests: nodes named `lab-N` on their own loopback
//! addresses (127.0.0.51-59, so they can run beside other tests), the controller's
//! peer set pushed to each, and helpers to act as one node's key against another.

use std::path::Path;

use proto::auth::{
    HEADER_KEY, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TARGET_KEY, HEADER_TARGET_NODE,
    HEADER_TIMESTAMP, Identity, NodeTarget, RequestSigner,
};
use proto::client::NodeClient;
use proto::v1::{ApplyRequest, ControllerGrant, Peer, SetPeers, apply_request::Action};

use crate::harness::{TestNode, apply_ok};

/// Starts a node whose dev-mode controller key file trusts `controller`, listening on
/// a free port of loopback address `ip`.
pub fn start_at_ip(name: &str, data_dir: &Path, controller: &Identity, ip: &str) -> TestNode {
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(
        data_dir.join("trusted-controllers"),
        format!("{} test-controller\n", controller.public_key_hex()),
    )
    .unwrap();
    TestNode::start_at(name, data_dir, &format!("{ip}:0"))
}

/// The identity a node signs with.
pub fn identity_of(node: &TestNode) -> Identity {
    Identity::load(&node.data_dir.join("identity.key")).unwrap()
}

/// The target a request for `node` names.
pub fn target_of(node: &TestNode) -> NodeTarget {
    NodeTarget::new(&node.name, &node.public_key_hex()).unwrap()
}

/// The node as a peer, with its address and key.
pub fn peer_of(node: &TestNode) -> Peer {
    Peer {
        name: node.name.clone(),
        address: node.address.clone(),
        public_key_hex: node.public_key_hex(),
    }
}

/// Pushes every node's name, address and key to every node (SetPeers), as the
/// controller does: all of them trust each other as peers.
pub async fn push_peers(nodes: &[&TestNode], controller: &Identity) {
    let peers: Vec<Peer> = nodes.iter().map(|node| peer_of(node)).collect();
    for node in nodes {
        let mut client = node.client(controller).await;
        apply_ok(
            &mut client,
            "peers",
            Action::SetPeers(SetPeers {
                peers: peers.clone(),
            }),
        )
        .await;
    }
}

/// A client of `node` that signs with `caller`'s node key (a peer, or an attacker
/// holding that peer's identity.key).
pub async fn client_as(caller: &TestNode, node: &TestNode) -> NodeClient {
    NodeClient::connect(&node.address, RequestSigner::new(identity_of(caller)))
        .await
        .unwrap()
}

/// What a node that received `request` from the controller, signed for `target`, could
/// forward: the controller's signature as a grant.
pub fn controller_grant(
    controller: &Identity,
    target: &NodeTarget,
    request: ApplyRequest,
) -> ControllerGrant {
    let signed = RequestSigner::new(controller.clone())
        .sign(proto::methods::APPLY, target, request.clone())
        .unwrap();
    let header = |key: &str| {
        signed
            .metadata()
            .get(key)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    ControllerGrant {
        request: Some(request),
        key_hex: header(HEADER_KEY),
        target_node: header(HEADER_TARGET_NODE),
        target_key_hex: header(HEADER_TARGET_KEY),
        timestamp_unix_ms: header(HEADER_TIMESTAMP).parse().unwrap(),
        nonce_hex: header(HEADER_NONCE),
        signature_hex: header(HEADER_SIGNATURE),
    }
}

/// The process id of the `cairn-node` serving `node`'s data directory (read from
/// /proc, so the harness need not expose its child).
pub fn pid_of(node: &TestNode) -> libc::pid_t {
    let data_dir = node.data_dir.display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let arguments: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect();
        let serves_it = arguments
            .windows(2)
            .any(|pair| pair[0] == "--data-dir" && pair[1] == data_dir);
        if serves_it && arguments.iter().any(|a| a == "--name") {
            return pid;
        }
    }
    panic!("no cairn-node process serves {data_dir}");
}
