//! Who may call this node: trusted controller keys and trusted peer keys.
//!
//! Controller keys come from `--trusted-controller-keys FILE`, else from
//! `DATA_DIR/trusted-controllers` (the dev-mode default: `cairn dev up` writes its
//! controller key there before starting the node). Peer keys come from
//! `--trusted-peer-keys FILE`, else `DATA_DIR/trusted-peers`, plus the peer set a
//! controller pushes with `SetPeers` (persisted in the node's records).
//!
//! Controllers may call every service; peers only `Replication`, and there only for
//! volumes they hold a copy of (see `volumes.rs`: that is authorization per volume;
//! this module is authentication and the controller's forwarded signatures).
//!
//! Every accepted request's nonce is written to the node's records before the request is
//! carried out, and loaded again at start, so a request replayed after a restart is
//! refused like one replayed before it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use proto::auth::{Caller, DEFAULT_WINDOW, Envelope, NodeTarget, NonceLog, TrustedKeys, Verifier};
use proto::v1::{self, Peer};
use tonic::Status;

use crate::records::{Records, RecordsError};

/// File name of the dev-mode controller key file inside the data directory.
pub const DEV_CONTROLLERS_FILE: &str = "trusted-controllers";
/// File name of the default peer key file inside the data directory.
pub const DEV_PEERS_FILE: &str = "trusted-peers";

/// The pushed peer set, shared between the trust checks and the volumes.
pub type PeerDirectory = Arc<RwLock<Vec<Peer>>>;

/// The role a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Only controllers.
    Controller,
    /// Controllers or peer nodes.
    ControllerOrPeer,
}

/// The node's trust state and request verifier.
#[derive(Debug)]
pub struct Trust {
    controllers: RwLock<TrustedKeys>,
    controllers_source: String,
    /// Where a pushed controller key set is written: `DATA_DIR/trusted-controllers`,
    /// or `None` when the keys come from `--trusted-controller-keys FILE`.
    controllers_file: Option<PathBuf>,
    /// The controller key of the newest verified controller call: the key the lease
    /// renewals are addressed to while several are trusted (a rotation).
    last_controller: RwLock<Option<String>>,
    file_peers: TrustedKeys,
    pushed_peers: Arc<RwLock<Vec<Peer>>>,
    verifier: Verifier,
    anchors: crate::anchors::Anchors,
    fence_tokens: crate::fencing::FenceTokens,
}

/// Errors of loading trust files.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A key file is unreadable or malformed.
    #[error("trusted keys: {0}")]
    Keys(#[from] proto::auth::AuthError),
    /// The remembered nonces cannot be read.
    #[error("remembered request nonces: {0}")]
    Nonces(#[from] RecordsError),
}

/// Keeps accepted nonces in the node's records (`nonces`), durably, and prunes expired
/// ones now and then.
#[derive(Debug)]
struct RecordsNonceLog {
    records: Arc<Records>,
    recorded: AtomicU64,
}

impl NonceLog for RecordsNonceLog {
    fn record(&self, nonce: &[u8; 16], expires_at_ms: u64) -> Result<(), String> {
        let write = || {
            self.records.put_nonce(nonce, expires_at_ms)?;
            if self.recorded.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
                self.records.prune_nonces(crate::events::now_unix_ms())?;
            }
            Ok::<(), RecordsError>(())
        };
        // The check runs inside async handlers; the commit syncs a file, so the worker
        // thread hands its other tasks on meanwhile (cairn-node's runtime is
        // multi-threaded; elsewhere it just blocks).
        let result = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(write)
            }
            _ => write(),
        };
        result.map_err(|error| error.to_string())
    }
}

fn load_optional(
    explicit: Option<&Path>,
    default: PathBuf,
) -> Result<(TrustedKeys, String), TrustError> {
    if let Some(path) = explicit {
        return Ok((TrustedKeys::load(path)?, path.display().to_string()));
    }
    if default.exists() {
        return Ok((TrustedKeys::load(&default)?, default.display().to_string()));
    }
    Ok((
        TrustedKeys::new(),
        format!("{} (absent)", default.display()),
    ))
}

impl Trust {
    /// Loads the key files and the remembered nonces of the node `this`.
    pub fn load(
        data_dir: &Path,
        controller_keys: Option<&Path>,
        peer_keys: Option<&Path>,
        pushed_peers: Vec<Peer>,
        this: NodeTarget,
        records: Arc<Records>,
    ) -> Result<Self, TrustError> {
        let (controllers, controllers_source) =
            load_optional(controller_keys, data_dir.join(DEV_CONTROLLERS_FILE))?;
        let controllers_file = controller_keys
            .is_none()
            .then(|| data_dir.join(DEV_CONTROLLERS_FILE));
        let (file_peers, _) = load_optional(peer_keys, data_dir.join(DEV_PEERS_FILE))?;
        let now = crate::events::now_unix_ms();
        records.prune_nonces(now)?;
        let remembered = records.live_nonces(now)?;
        let log = RecordsNonceLog {
            records,
            recorded: AtomicU64::new(0),
        };
        Ok(Self {
            controllers: RwLock::new(controllers),
            controllers_source,
            controllers_file,
            last_controller: RwLock::new(None),
            file_peers,
            pushed_peers: Arc::new(RwLock::new(pushed_peers)),
            verifier: Verifier::with_log(DEFAULT_WINDOW, this, Box::new(log), remembered),
            anchors: crate::anchors::Anchors::load(data_dir),
            fence_tokens: crate::fencing::FenceTokens::load(data_dir),
        })
    }

    /// This node's name and key, as every request to it must name them.
    pub fn this_node(&self) -> &NodeTarget {
        self.verifier.this_node()
    }

    /// Whether `key_hex` is a trusted controller key.
    pub fn is_controller(&self, key_hex: &str) -> bool {
        proto::auth::parse_public_key(key_hex)
            .is_ok_and(|key| self.controllers().name_of(&key).is_some())
    }

    /// A verified caller for messages: the node name the controller gave its key
    /// (SetPeers), else its name in the peers file, with the start of the key.
    pub fn describe(&self, key_hex: &str) -> String {
        let short = &key_hex[..key_hex.len().min(16)];
        if let Some(peer) = self
            .pushed_peers()
            .into_iter()
            .find(|peer| peer.public_key_hex.eq_ignore_ascii_case(key_hex))
        {
            return format!("node {} (key {short}…)", peer.name);
        }
        let Ok(key) = proto::auth::parse_public_key(key_hex) else {
            return format!("key {short}…");
        };
        if let Some(label) = self.file_peers.name_of(&key) {
            return format!("peer `{label}` (key {short}…)");
        }
        match self.controllers().name_of(&key) {
            Some(label) => format!("controller `{label}` (key {short}…)"),
            None => format!("key {short}…"),
        }
    }

    /// Checks a controller signature forwarded by a peer: the Apply request in `grant`
    /// was signed by a trusted controller, recently. Returns the envelope (whose
    /// target the caller compares with the forwarding node) and the request.
    pub fn verify_grant(
        &self,
        grant: &v1::ControllerGrant,
    ) -> Result<(Envelope, v1::ApplyRequest), String> {
        let Some(request) = grant.request.clone() else {
            return Err("the grant carries no request".into());
        };
        let envelope = Envelope::of_grant(grant);
        let caller = self
            .verifier
            .verify_forwarded(
                proto::methods::APPLY,
                &request,
                &envelope,
                &self.controllers(),
                "controller",
            )
            .map_err(|error| error.to_string())?;
        Ok((caller.envelope, request))
    }

    /// The newest audit-log head each controller key sent (`crate::anchors`).
    pub fn audit_anchors(&self) -> Vec<v1::AuditAnchor> {
        self.anchors.list()
    }

    /// The trusted controller keys, hex (the lease's renewals are addressed to one).
    pub fn controller_keys_hex(&self) -> Vec<String> {
        self.controllers().keys_hex()
    }

    /// Number of controller keys.
    pub fn controller_count(&self) -> usize {
        self.controllers().len()
    }

    /// The controller key lease renewals are addressed to: the key of the newest
    /// controller call this node verified while it is still trusted (the key the
    /// controller signs with now, during a rotation too), else the first trusted key.
    pub fn lease_controller_key(&self) -> Option<String> {
        let last = self
            .last_controller
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        last.filter(|key| self.is_controller(key))
            .or_else(|| self.controller_keys_hex().into_iter().next())
    }

    /// The trusted controller keys now.
    pub fn controllers(&self) -> TrustedKeys {
        self.controllers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the trusted controller keys with `keys` (a `SetControllerKeys` signed
    /// by `signer_hex`, a key trusted now): written to `DATA_DIR/trusted-controllers`
    /// (temporary file, fsync, rename) before the new set is used. `Err` is the
    /// refusal: an empty set, a set without its signer, keys from the operator's file.
    pub fn set_controllers(&self, keys: TrustedKeys, signer_hex: &str) -> Result<(), Status> {
        let Some(file) = &self.controllers_file else {
            return Err(Status::failed_precondition(format!(
                "node {} reads its controller keys from {} (--trusted-controller-keys): edit that file instead of pushing keys",
                self.this_node().name,
                self.controllers_source
            )));
        };
        if keys.is_empty() {
            return Err(Status::invalid_argument(
                "an empty controller key set would lock every controller out; send at least one key",
            ));
        }
        let signer = proto::auth::parse_public_key(signer_hex)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if keys.name_of(&signer).is_none() {
            return Err(Status::invalid_argument(format!(
                "the new controller key set leaves out the key that signed it ({}…): a key is revoked by a request signed with another key of the set",
                &signer_hex[..16]
            )));
        }
        let text = format!(
            "# pushed by a controller (ControllerTrust.SetControllerKeys)\n{}",
            keys.render()
        );
        let mut guard = self.controllers.write().unwrap_or_else(|p| p.into_inner());
        write_atomically(file, &text).map_err(Status::unavailable)?;
        *guard = keys;
        Ok(())
    }

    /// Where controller keys came from.
    pub fn controllers_source(&self) -> &str {
        &self.controllers_source
    }

    /// Replaces the pushed peer set.
    pub fn set_pushed_peers(&self, peers: Vec<Peer>) {
        *self.pushed_peers.write().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    /// A shared handle on the pushed peer set (for finding a primary by name).
    pub fn peer_directory(&self) -> PeerDirectory {
        self.pushed_peers.clone()
    }

    /// The pushed peer set.
    pub fn pushed_peers(&self) -> Vec<Peer> {
        self.pushed_peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A pushed peer by name.
    pub fn peer_by_name(&self, name: &str) -> Option<Peer> {
        self.pushed_peers()
            .into_iter()
            .find(|peer| peer.name == name)
    }

    fn trusted_for(&self, role: Role) -> TrustedKeys {
        let mut keys = self.controllers();
        if role == Role::ControllerOrPeer {
            keys.extend(&self.file_peers);
            for peer in self.pushed_peers() {
                if let Ok(key) = proto::auth::parse_public_key(&peer.public_key_hex) {
                    keys.insert(key, format!("peer {}", peer.name));
                }
            }
        }
        keys
    }

    /// Verifies a signed request for `method`; refusals are `UNAUTHENTICATED` with the
    /// reason. First the caller's protocol version (`x-cairn-protocol`): another major
    /// is `FAILED_PRECONDITION` naming both versions, before anything else is looked at.
    pub fn check<T: prost::Message>(
        &self,
        method: &str,
        role: Role,
        request: &tonic::Request<T>,
    ) -> Result<Caller, Status> {
        self.check_as(method, role, request, false)
    }

    /// [`Trust::check`] for a request the caller has bound to this process's
    /// session (a `ReplicaWrite` naming this run's boot id): its nonce is kept in memory
    /// only ([`proto::auth::Nonces::InMemory`]).
    pub fn check_in_session<T: prost::Message>(
        &self,
        method: &str,
        role: Role,
        request: &tonic::Request<T>,
    ) -> Result<Caller, Status> {
        self.check_as(method, role, request, true)
    }

    fn check_as<T: prost::Message>(
        &self,
        method: &str,
        role: Role,
        request: &tonic::Request<T>,
        in_session: bool,
    ) -> Result<Caller, Status> {
        let protocol = request
            .metadata()
            .get(proto::protocol::HEADER)
            .map(|value| value.to_str().unwrap_or("(not ascii)"));
        proto::protocol::check(protocol, &format!("node {}", self.this_node().name))?;
        let keys = self.trusted_for(role);
        if keys.is_empty() {
            return Err(Status::unauthenticated(format!(
                "this node trusts no controller keys yet: start it with --trusted-controller-keys FILE or write keys to {}",
                self.controllers_source
            )));
        }
        let role_name = match role {
            Role::Controller => "controller",
            Role::ControllerOrPeer => "controller or peer",
        };
        let nonces = if in_session {
            proto::auth::Nonces::InMemory
        } else {
            proto::auth::Nonces::ByMethod
        };
        let verified = self
            .verifier
            .verify_as(method, request, &keys, role_name, nonces);
        let caller = verified.map_err(|error| {
            let bad_signature = matches!(error, proto::auth::AuthError::BadSignature { .. });
            let status = Status::from(error);
            match proto::protocol::signature_hint(protocol) {
                Some(hint) if bad_signature => Status::with_metadata(
                    status.code(),
                    format!("{}; {hint}", status.message()),
                    status.metadata().clone(),
                ),
                _ => status,
            }
        })?;
        let known = self
            .last_controller
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            == Some(caller.key_hex.as_str());
        if !known && self.is_controller(&caller.key_hex) {
            *self
                .last_controller
                .write()
                .unwrap_or_else(|p| p.into_inner()) = Some(caller.key_hex.clone());
        }
        if let Some(head) = request.metadata().get(proto::anchor::HEADER)
            && self.is_controller(&caller.key_hex)
        {
            self.anchors
                .note(&caller.key_hex, head.to_str().unwrap_or("(not ascii)"));
        }
        if let Some(token) = request.metadata().get(proto::fence::HEADER)
            && self.is_controller(&caller.key_hex)
        {
            self.fence_tokens
                .admit(&caller.key_hex, token.to_str().unwrap_or("(not ascii)"))?;
        }
        Ok(caller)
    }
}

/// Writes `text` to `path` through a synced temporary file and a rename.
pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let temporary = path.with_extension("tmp");
    let error = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut file = std::fs::File::create(&temporary).map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)?;
    if let Some(parent) = path.parent()
        && let Ok(directory) = std::fs::File::open(parent)
    {
        let _ = directory.sync_all();
    }
    Ok(())
}
