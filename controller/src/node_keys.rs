//! Node key revocation (issue 24, item 7): `cairn node revoke NODE`, a signed action
//! to the running controller (`POST /api/v1/nodes/NODE/revoke`, action
//! `node-revoke:NODE`), which holds the pinned keys in its lease service's cache, so
//! the revocation has to go through it rather than the store alone.
//!
//! The node's pinned key is recorded as revoked (`enroll/nodes/NAME`, how `revoked`,
//! in the redb file or etcd), an audit entry `node-key-revoked` names it and who
//! asked, and the lease service forgets it. From then on:
//! - the node's lease renewals are refused, naming the revocation, so the node fences
//!   its HA VMs when its lease runs out and the controller, once the failure
//!   detection passes, restarts them elsewhere (the HA path of a failed node);
//! - its key is not learned again from its Inventory (as an unenrolled node's is);
//! - enrolling again with the same key is refused, and a node key rotation signed by
//!   it too: the node enrolls again with a new key and a new token (remove
//!   `identity.key` and `trusted-controllers` on the node, `cairn node token create
//!   NODE`, `cairn-node --enroll`).
//!
//! With replicas, the others drop the key from their caches within [`REFRESH`]
//! ([`forget_revoked`]). Not built: the peer set pushed to the other nodes
//! (`SetPeers`) still names the revoked key until the node leaves the specs.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};

use crate::Shared;
use crate::events::Event;
use crate::keys::short;

/// How a revoked pin is recorded (`EnrolledNode::how`).
pub const REVOKED: &str = "revoked";

/// The audit event of a revocation.
pub const AUDIT_EVENT: &str = "node-key-revoked";

/// The signed action of revoking `node`'s key.
pub fn action(node: &str) -> String {
    format!("node-revoke:{node}")
}

/// Why a node whose pin is `revoked` is refused, and what to do.
pub fn refusal(node: &str, revoked: &reconciler::enroll::EnrolledNode) -> String {
    format!(
        "the key {}… of node `{node}` was revoked: enroll it again with a new key (on the node remove identity.key and trusted-controllers; `cairn node token create {node}`; `cairn-node --enroll TOKEN`)",
        short(&revoked.key_hex)
    )
}

/// Every pinned key in the store (`None`: the store did not answer).
async fn pins(shared: &Arc<Shared>) -> Option<Vec<reconciler::enroll::EnrolledNode>> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let store = shared.state_store().ok()?;
        store.enrollment_store().enrolled_nodes().ok()
    })
    .await
    .ok()
    .flatten()
}

/// What the store says of node `name`'s key.
pub async fn pinned(shared: &Arc<Shared>, name: &str) -> Option<reconciler::enroll::EnrolledNode> {
    pins(shared)
        .await?
        .into_iter()
        .find(|node| node.name == name)
}

/// How often a replica reads the pins again for revocations another replica made.
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// With replicas, another replica may revoke a key this one has cached (any replica
/// grants leases): every [`REFRESH`] the pins are read again and revoked ones leave
/// the cache, so the next renewal reads the revocation. Without replicas it returns:
/// the only revocations are this process's own.
pub(crate) async fn forget_revoked(shared: Arc<Shared>) {
    if shared.replicas.is_none() {
        return;
    }
    loop {
        tokio::time::sleep(REFRESH).await;
        let pins = pins(&shared).await.unwrap_or_default();
        let mut keys = shared.leases.keys.lock().await;
        for pin in pins {
            if pin.how == REVOKED && keys.get(&pin.name) == Some(&pin.key_hex) {
                keys.remove(&pin.name);
            }
        }
    }
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// `POST /api/v1/nodes/NODE/revoke`.
pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    UrlPath(node): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let action = action(&node);
    let binding = crate::actions::Binding::current(&shared);
    let signed = match crate::actions::authorize(&shared, &action, &body, &binding) {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    let by = signed.signer();
    // The key to revoke: the pinned one, else the one the lease service learned from
    // the node (a node started with copied key files).
    let pin = pinned(&shared, &node).await;
    if let Some(pin) = pin.as_ref().filter(|p| p.how == REVOKED) {
        let message = format!(
            "the key {}… of node `{node}` was revoked before; nothing to do",
            short(&pin.key_hex)
        );
        return axum::Json(serde_json::json!({"message": message, "key": pin.key_hex}))
            .into_response();
    }
    let learned = shared.leases.keys.lock().await.get(&node).cloned();
    let Some(key) = pin.map(|p| p.key_hex).or(learned) else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "no key is known for node `{node}`: it never enrolled and never renewed a lease with this controller"
            ),
        );
    };
    let record = reconciler::enroll::EnrolledNode {
        name: node.clone(),
        key_hex: key.clone(),
        at_ms: reconciler::state::now_ms(),
        how: REVOKED.into(),
    };
    let detail = serde_json::json!({"node": node, "key": key, "by": by});
    let written = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            let store = shared.state_store()?;
            store
                .enrollment_store()
                .set_enrolled_node(&record)
                .map_err(|e| e.to_string())?;
            reconciler::state::StateStore::audit(&store, AUDIT_EVENT, detail)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    };
    if let Err(e) = written {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the revocation of node `{node}`'s key was not recorded: {e}"),
        );
    }
    shared.leases.keys.lock().await.remove(&node);
    let message = format!(
        "the key {}… of node `{node}` is revoked: its lease renewals are refused from now on, so its HA VMs are fenced and restarted elsewhere once it is detected failed; it enrolls again only with a new key and a new token",
        short(&key)
    );
    shared.record(vec![
        Event::new("node-key", "revoked")
            .object(format!("node {node}"))
            .reason(format!("by {by}: {message}")),
    ]);
    axum::Json(serde_json::json!({"message": message, "key": key})).into_response()
}
