//! Who may call this node: trusted controller keys and trusted peer keys.
//!
//! Controller keys come from `--trusted-controller-keys FILE`, else from
//! `DATA_DIR/trusted-controllers` (the dev-mode default: `cairn dev up` writes its
//! controller key there before starting the node). Peer keys come from
//! `--trusted-peer-keys FILE`, else `DATA_DIR/trusted-peers`, plus the peer set a
//! controller pushes with `SetPeers` (persisted in the state store).
//!
//! Controllers may call every service; peers only `Replication`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use proto::auth::{Caller, TrustedKeys, Verifier};
use proto::v1::Peer;
use tonic::Status;

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
    controllers: TrustedKeys,
    controllers_source: String,
    file_peers: TrustedKeys,
    pushed_peers: Arc<RwLock<Vec<Peer>>>,
    verifier: Verifier,
}

/// Errors of loading trust files.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A key file is unreadable or malformed.
    #[error("trusted keys: {0}")]
    Keys(#[from] proto::auth::AuthError),
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
    /// Loads the key files.
    pub fn load(
        data_dir: &Path,
        controller_keys: Option<&Path>,
        peer_keys: Option<&Path>,
        pushed_peers: Vec<Peer>,
    ) -> Result<Self, TrustError> {
        let (controllers, controllers_source) =
            load_optional(controller_keys, data_dir.join(DEV_CONTROLLERS_FILE))?;
        let (file_peers, _) = load_optional(peer_keys, data_dir.join(DEV_PEERS_FILE))?;
        Ok(Self {
            controllers,
            controllers_source,
            file_peers,
            pushed_peers: Arc::new(RwLock::new(pushed_peers)),
            verifier: Verifier::default(),
        })
    }

    /// Number of controller keys.
    pub fn controller_count(&self) -> usize {
        self.controllers.len()
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
        let mut keys = self.controllers.clone();
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

    /// Verifies a signed request for `method`; refusals are `UNAUTHENTICATED` with the reason.
    pub fn check<T: prost::Message>(
        &self,
        method: &str,
        role: Role,
        request: &tonic::Request<T>,
    ) -> Result<Caller, Status> {
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
        Ok(self.verifier.verify(method, request, &keys, role_name)?)
    }
}
