//! Node enrollment (issue 24, item 7): `Enrollment.Enroll` on the gRPC listener, and
//! the controller keys a node is told to trust.
//!
//! A new node is trusted through a one-time token instead of copied key files: `cairn
//! node token create NODE [--ttl 15m]` records the token's SHA-256 in the state store
//! (the redb file, or etcd with replicas: `reconciler::enroll`); `cairn-node --enroll
//! TOKEN --controller ADDR` presents it with its name and public key, signed with that
//! key (`proto::enroll`). This service checks the proof, consumes the token in one
//! transaction (once, before its expiry, for the node it names; a reused, expired,
//! unknown or misdirected token is `PERMISSION_DENIED` with the reason and the command
//! that makes a new one), records the node's key (the Lease service addresses and
//! checks that node with it from then on), and answers with the controller keys to
//! trust, MACed with the token.
//!
//! The keys a node is told to trust: `DATA_DIR/controller-keys` (`HEX NAME` lines:
//! the signing key, a key being rotated in, an offline recovery key) when it exists,
//! else the signing key alone; the signing key is always among them.

use std::path::Path;
use std::sync::Arc;

use proto::auth::TrustedKeys;
use proto::v1;
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::events::Event;

/// The file of the keys nodes are told to trust, in the data directory.
pub const CONTROLLER_KEYS_FILE: &str = "controller-keys";

/// The keys a node is told to trust: `DATA_DIR/controller-keys` plus the signing key.
pub fn trust_set(
    data_dir: &Path,
    signing: &proto::auth::Identity,
) -> Result<Vec<v1::ControllerKey>, String> {
    let path = data_dir.join(CONTROLLER_KEYS_FILE);
    let mut keys = if path.exists() {
        TrustedKeys::load(&path).map_err(|e| e.to_string())?
    } else {
        TrustedKeys::new()
    };
    if keys.name_of(&signing.public_key()).is_none() {
        keys.insert(signing.public_key(), "controller");
    }
    Ok(TrustedKeys::parse(&keys.render(), "keys")
        .map_err(|e| e.to_string())?
        .render()
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(key, name)| v1::ControllerKey {
            public_key_hex: key.to_owned(),
            name: name.to_owned(),
        })
        .collect())
}

/// `Enrollment.Enroll` over the shared controller state.
#[derive(Debug, Clone)]
pub struct EnrollmentService {
    shared: Arc<Shared>,
}

impl EnrollmentService {
    /// The service.
    pub fn new(shared: Arc<Shared>) -> EnrollmentService {
        EnrollmentService { shared }
    }
}

#[tonic::async_trait]
impl v1::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollReply>, Status> {
        let body = request.into_inner();
        let now = reconciler::state::now_ms();
        proto::enroll::verify_request(&body, now).map_err(|why| {
            Status::unauthenticated(format!("enrollment of node `{}` refused: {why}", body.node))
        })?;
        let key_hex = body.public_key_hex.to_ascii_lowercase();
        // A revoked key does not enroll again (the token is left unused).
        if let Some(pin) = crate::node_keys::pinned(&self.shared, &body.node)
            .await
            .filter(|p| p.how == crate::node_keys::REVOKED && p.key_hex == key_hex)
        {
            let why = crate::node_keys::refusal(&body.node, &pin);
            self.shared.record(vec![
                Event::new("enroll", "refused")
                    .object(format!("node {}", body.node))
                    .reason(why.clone()),
            ]);
            return Err(Status::permission_denied(why));
        }
        let hash = proto::enroll::token_hash(&body.token);
        let shared = self.shared.clone();
        let (node, key) = (body.node.clone(), key_hex.clone());
        let consumed = tokio::task::spawn_blocking(move || {
            let store = shared.state_store()?;
            store
                .enrollment_store()
                .consume_enrollment_token(&hash, &node, &key, now)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::unavailable(format!("the state store: {e}")))?;
        if let Err(why) = consumed {
            self.shared.record(vec![
                Event::new("enroll", "refused")
                    .object(format!("node {}", body.node))
                    .reason(why.clone()),
            ]);
            return Err(Status::permission_denied(why));
        }
        self.shared
            .leases
            .keys
            .lock()
            .await
            .insert(body.node.clone(), key_hex.clone());
        let keys = trust_set(&self.shared.config.data_dir, &self.shared.signer.identity())
            .map_err(Status::internal)?;
        self.shared.record(vec![
            Event::new("enroll", "enrolled")
                .object(format!("node {}", body.node))
                .reason(format!(
                    "node {} enrolled with key {}… by a one-time token; it trusts {} controller key(s)",
                    body.node,
                    &key_hex[..16],
                    keys.len()
                )),
        ]);
        Ok(Response::new(v1::EnrollReply {
            mac_hex: proto::enroll::keys_mac(&body.token, &keys),
            controller_keys: keys,
        }))
    }

    /// A node key rotation: signed by the pinned key (the authority) and by the new
    /// key (the node holds it); the new key is pinned in the store and in the lease
    /// service's cache at once, so the node's next renewal is checked with it.
    async fn rotate_node_key(
        &self,
        request: Request<v1::RotateNodeKeyRequest>,
    ) -> Result<Response<v1::RotateNodeKeyReply>, Status> {
        let body = request.into_inner();
        let now = reconciler::state::now_ms();
        proto::enroll::verify_rotation(&body, now).map_err(|why| {
            Status::unauthenticated(format!(
                "key rotation of node `{}` refused: {why}",
                body.node
            ))
        })?;
        let (old, new) = (
            body.old_public_key_hex.to_ascii_lowercase(),
            body.new_public_key_hex.to_ascii_lowercase(),
        );
        let shared = self.shared.clone();
        let node = body.node.clone();
        let (old_key, new_key) = (old.clone(), new.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let store = shared.state_store()?;
            let enrollment = store.enrollment_store();
            let pinned = enrollment
                .enrolled_nodes()
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|n| n.name == node);
            Ok::<_, String>(match pinned {
                None => Err(format!(
                    "node `{node}` has no pinned key: it was not enrolled (`cairn node token create {node}`, then `cairn-node --enroll`)"
                )),
                Some(pin) if pin.how == crate::node_keys::REVOKED => {
                    Err(crate::node_keys::refusal(&node, &pin))
                }
                Some(pin) => match pin.key_hex {
                // The same request again: its answer was lost.
                pinned if pinned == new_key => Ok(false),
                pinned if pinned != old_key => Err(format!(
                    "the key pinned for node `{node}` is {}…, not {}…: the rotation must be signed by the pinned key",
                    &pinned[..16],
                    &old_key[..16]
                )),
                _ => enrollment
                    .set_enrolled_node(&reconciler::enroll::EnrolledNode {
                        name: node.clone(),
                        key_hex: new_key.clone(),
                        at_ms: now,
                        how: "rotated".into(),
                    })
                    .map(|()| true)
                    .map_err(|e| e.to_string()),
                },
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::unavailable(format!("the state store: {e}")))?;
        match outcome {
            Err(why) => {
                self.shared.record(vec![
                    Event::new("node-key", "refused")
                        .object(format!("node {}", body.node))
                        .reason(why.clone()),
                ]);
                Err(Status::permission_denied(why))
            }
            Ok(changed) => {
                self.shared
                    .leases
                    .keys
                    .lock()
                    .await
                    .insert(body.node.clone(), new.clone());
                if changed {
                    self.shared.record(vec![
                        Event::new("node-key", "rotated")
                            .object(format!("node {}", body.node))
                            .reason(format!(
                                "node {} now signs with {}… (was {}…), a request signed by both keys",
                                body.node,
                                &new[..16],
                                &old[..16]
                            )),
                    ]);
                }
                Ok(Response::new(v1::RotateNodeKeyReply {
                    public_key_hex: new,
                }))
            }
        }
    }
}
