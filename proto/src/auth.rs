//! Signed requests: how a caller proves who it is to a `cairn-node`, and which node
//! it means.
//!
//! Every call carries these metadata entries:
//!
//! | key | value |
//! |---|---|
//! | `x-cairn-auth` | the payload format, [`SIGNATURE_CONTEXT`] (`cairn-req-v2`) |
//! | `x-cairn-target-node` | the name of the node the request is for |
//! | `x-cairn-target-key` | that node's ed25519 public key, 64 lower-case hex characters |
//! | `x-cairn-key` | the caller's ed25519 public key, 64 lower-case hex characters |
//! | `x-cairn-timestamp` | milliseconds since the Unix epoch when the caller signed |
//! | `x-cairn-nonce` | 16 random bytes, 32 hex characters, never reused |
//! | `x-cairn-signature` | ed25519 signature, 128 hex characters, over [`signing_payload`] |
//! | `x-cairn-protocol` | the caller's contract version, `MAJOR.MINOR` ([`crate::protocol`]; not signed) |
//! | `x-cairn-audit-head` | a controller's audit-log head, `SEQ:HASH_HEX` ([`crate::anchor`]; not signed, optional) |
//! | `x-cairn-fence-token` | an elected controller's fencing token, decimal ([`crate::fence`]; not signed, optional) |
//!
//! The signed payload binds the format tag, the full gRPC method path, the target
//! node's name and public key, the timestamp, the nonce and the SHA-256 of the
//! prost-encoded request message, so a signature cannot be moved to another method,
//! another body or another node. The [`Verifier`] refuses a request addressed to
//! another node (saying which node it was for and which node this is), accepts a
//! timestamp within its window (±30 s by default) and remembers nonces for twice the
//! window, through a [`NonceLog`] that can keep them across a restart, so a captured
//! request cannot be replayed, here or anywhere else.
//!
//! A node that refuses a request for naming another target (or none) says who it is in
//! the refusal's metadata (`x-cairn-node-name`, `x-cairn-node-key`): that is how a
//! client that knows only an address learns the identity to sign for. Names and public
//! keys are not secrets; what the answer cannot give is proof that the server holds the
//! key (the client does not authenticate the server).
//!
//! A node may forward a controller's signature to another node as its authority (a
//! primary creating or deleting its replicas): [`Envelope`] is the signature's metadata,
//! [`Verifier::verify_forwarded`] checks it statelessly, with an age limit instead of
//! the nonce cache, and leaves it to the caller to check that the target named in it
//! is the node forwarding it.
//!
//! Why signed requests rather than mutual TLS with pinned keys: the identity *is* an
//! ed25519 key pair, exactly what the rest of cairn uses (signed plans, commit
//! signatures), so there is no certificate to mint, rotate or pin; authorization is
//! per call, not per connection, so one connection can serve calls from callers with
//! different roles (controller vs. peer node), and a signature can be forwarded as
//! evidence; it works through any gRPC proxy; and it pulls in no TLS stack. What it
//! does not give is confidentiality: traffic is plain HTTP/2. Nodes listen on loopback
//! or a management network; adding TLS for secrecy later does not change this scheme.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

/// Metadata key of the caller's public key.
pub const HEADER_KEY: &str = "x-cairn-key";
/// Metadata key of the signing time (Unix milliseconds).
pub const HEADER_TIMESTAMP: &str = "x-cairn-timestamp";
/// Metadata key of the per-request nonce.
pub const HEADER_NONCE: &str = "x-cairn-nonce";
/// Metadata key of the signature.
pub const HEADER_SIGNATURE: &str = "x-cairn-signature";
/// Metadata key of the payload format ([`SIGNATURE_CONTEXT`]).
pub const HEADER_VERSION: &str = "x-cairn-auth";
/// Metadata key of the name of the node a request is for.
pub const HEADER_TARGET_NODE: &str = "x-cairn-target-node";
/// Metadata key of the public key (hex) of the node a request is for.
pub const HEADER_TARGET_KEY: &str = "x-cairn-target-key";
/// Metadata key, in a refusal, of the refusing node's name.
pub const HEADER_NODE_NAME: &str = "x-cairn-node-name";
/// Metadata key, in a refusal, of the refusing node's public key (hex).
pub const HEADER_NODE_KEY: &str = "x-cairn-node-key";
/// Domain separation string at the start of every signed payload, and the value of
/// `x-cairn-auth`: the payload format's version tag.
pub const SIGNATURE_CONTEXT: &str = "cairn-req-v2";
/// The previous format (no target node), refused with a message saying so.
pub const LEGACY_SIGNATURE_CONTEXT: &str = "cairn-node-request-v1";
/// Default accepted clock difference between caller and node.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// Oldest forwarded controller signature [`Verifier::verify_forwarded`] accepts. A
/// primary forwards the controller's signature while it carries out that very request
/// (which it accepted within the ±30 s window), so a minute and a half more is room
/// for its own work and the call's timeout, and a grant cannot be kept for later.
pub const GRANT_MAX_AGE: Duration = Duration::from_secs(120);

/// Errors of key handling and request verification.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A metadata entry is absent.
    #[error(
        "request is not signed: metadata `{0}` is missing (sign requests with a trusted controller or peer key)"
    )]
    Missing(&'static str),
    /// A metadata entry is present but not well formed.
    #[error("metadata `{header}` is malformed: {problem}")]
    Malformed {
        /// Which entry.
        header: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The key is well formed but not trusted for this call.
    #[error(
        "key {key} is not trusted by this node for {method} (add it to the trusted {role} keys)"
    )]
    Untrusted {
        /// The caller's key, hex.
        key: String,
        /// The method called.
        method: String,
        /// "controller" or "controller or peer".
        role: &'static str,
    },
    /// The signature does not verify.
    #[error(
        "signature does not verify for {method} with key {key} (wrong key, or body/method altered)"
    )]
    BadSignature {
        /// The caller's key, hex.
        key: String,
        /// The method called.
        method: String,
    },
    /// The timestamp is outside the accepted window.
    #[error(
        "request timestamp is {skew_ms} ms away from the node's clock, more than the {window_ms} ms allowed (check clocks)"
    )]
    Stale {
        /// Signed difference, node minus caller.
        skew_ms: i128,
        /// The window.
        window_ms: u128,
    },
    /// The nonce was seen before within the window.
    #[error("nonce was already used: request replayed")]
    Replayed,
    /// The request is signed in another payload format.
    #[error(
        "request is signed in the {found} format; this node accepts only {SIGNATURE_CONTEXT}, whose signature names the target node (upgrade the caller: cairn CLI or peer cairn-node)"
    )]
    OldFormat {
        /// The format the request claims, or what its headers suggest.
        found: String,
    },
    /// The request names no target node (a client learning who the node is).
    #[error("request names no target node (metadata `{missing}`); sign it for this node, {this}")]
    NotAddressed {
        /// The missing header.
        missing: &'static str,
        /// This node.
        this: NodeTarget,
    },
    /// The request was signed for another node.
    #[error(
        "request is addressed to node {addressed}, not to this node {this}: a request signed for one node is refused by every other"
    )]
    WrongTarget {
        /// The node named in the request.
        addressed: NodeTarget,
        /// This node.
        this: NodeTarget,
    },
    /// A forwarded signature is too old (or from the future).
    #[error(
        "the forwarded controller signature is {age_ms} ms old, outside the {max_age_ms} ms a grant is accepted for"
    )]
    GrantTooOld {
        /// Age, node clock minus signing time (negative: from the future).
        age_ms: i128,
        /// The limit.
        max_age_ms: u128,
    },
    /// The nonce could not be recorded, so the request cannot be protected from replay.
    #[error("cannot record the request's nonce, so it is refused: {0}")]
    NonceLog(String),
    /// A key text could not be parsed.
    #[error("{what}: {problem}")]
    BadKey {
        /// Where the key came from.
        what: String,
        /// What is wrong.
        problem: String,
    },
    /// A key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),
    /// This controller must not call a node now (`crate::fence`).
    #[error("not signed: {0}")]
    Fenced(String),
}

impl From<AuthError> for tonic::Status {
    fn from(error: AuthError) -> Self {
        match &error {
            AuthError::NotAddressed { this, .. } | AuthError::WrongTarget { this, .. } => {
                // The refusal tells who this node is, so a client can sign for it.
                let mut metadata = MetadataMap::new();
                if let (Ok(name), Ok(key)) =
                    (this.name.parse(), this.public_key_hex.as_str().parse())
                {
                    metadata.insert(HEADER_NODE_NAME, name);
                    metadata.insert(HEADER_NODE_KEY, key);
                }
                tonic::Status::with_metadata(
                    tonic::Code::Unauthenticated,
                    error.to_string(),
                    metadata,
                )
            }
            AuthError::NonceLog(_) => tonic::Status::unavailable(error.to_string()),
            _ => tonic::Status::unauthenticated(error.to_string()),
        }
    }
}

/// The node a request is signed for: its name and its public key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeTarget {
    /// The node's name (a DNS label).
    pub name: String,
    /// The node's ed25519 public key, 64 lower-case hex characters.
    pub public_key_hex: String,
}

impl NodeTarget {
    /// A target from a name and a key given as hex (any case; checked).
    pub fn new(name: impl Into<String>, public_key_hex: &str) -> Result<Self, AuthError> {
        let key = parse_public_key(public_key_hex)?;
        Ok(Self {
            name: name.into(),
            public_key_hex: to_hex(key.as_bytes()),
        })
    }

    /// The target of a node with `identity`.
    pub fn of(name: impl Into<String>, identity: &Identity) -> Self {
        Self {
            name: name.into(),
            public_key_hex: identity.public_key_hex(),
        }
    }

    /// The first 16 hex characters of the key, for messages.
    pub fn short_key(&self) -> &str {
        &self.public_key_hex[..self.public_key_hex.len().min(16)]
    }

    /// Reads the identity a node put in a refusal (`x-cairn-node-name`/`-key`).
    pub fn from_refusal(status: &tonic::Status) -> Option<Self> {
        let metadata = status.metadata();
        let name = metadata.get(HEADER_NODE_NAME)?.to_str().ok()?;
        let key = metadata.get(HEADER_NODE_KEY)?.to_str().ok()?;
        Self::new(name, key).ok()
    }
}

impl std::fmt::Display for NodeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = if self.name.is_empty() {
            "(none)"
        } else {
            &self.name
        };
        if self.public_key_hex.is_empty() {
            write!(f, "`{name}` (no key)")
        } else {
            write!(f, "`{name}` (key {}…)", self.short_key())
        }
    }
}

/// Lower-case hex of bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    out
}

/// Parses hex into exactly `N` bytes.
pub fn from_hex<const N: usize>(text: &str) -> Result<[u8; N], String> {
    let text = text.trim();
    if text.len() != N * 2 {
        return Err(format!(
            "expected {} hex characters, found {}",
            N * 2,
            text.len()
        ));
    }
    let mut out = [0u8; N];
    for (index, chunk) in text.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| -> Result<u8, String> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(format!("`{}` is not a hex digit", c as char)),
            }
        };
        out[index] = (digit(chunk[0])? << 4) | digit(chunk[1])?;
    }
    Ok(out)
}

/// A fresh session id: 16 bytes from the operating system's random source (a replica's
/// boot id, see [`Nonces::InMemory`]).
pub fn session_id() -> Result<[u8; 16], AuthError> {
    random_bytes::<16>()
}

fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|error| AuthError::Random(error.to_string()))?;
    Ok(out)
}

fn now_unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Parses a public key given as 64 hex characters.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, AuthError> {
    let bytes = from_hex::<32>(text).map_err(|problem| AuthError::BadKey {
        what: "public key".into(),
        problem,
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|error| AuthError::BadKey {
        what: "public key".into(),
        problem: error.to_string(),
    })
}

/// An ed25519 key pair: a node's identity or a controller's signing key.
#[derive(Clone)]
pub struct Identity {
    signing_key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &self.public_key_hex())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh random key pair.
    pub fn generate() -> Result<Self, AuthError> {
        let seed = random_bytes::<32>()?;
        Ok(Self::from_seed(seed))
    }

    /// The key pair of a 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            signing_key: SigningKey::from_bytes(&seed),
        }
    }

    /// Reads a secret key file: 64 hex characters (the seed), surrounding whitespace ignored.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let seed = from_hex::<32>(&text).map_err(|problem| AuthError::BadKey {
            what: path.display().to_string(),
            problem,
        })?;
        Ok(Self::from_seed(seed))
    }

    /// Reads the key at `secret_path`, or creates one there (mode 0600, written to a
    /// temporary file, synced and renamed, so a crash never leaves a half key) and
    /// writes its public half to `public_path`.
    pub fn load_or_create(secret_path: &Path, public_path: &Path) -> Result<Self, AuthError> {
        if secret_path.exists() {
            let identity = Self::load(secret_path)?;
            if !public_path.exists() {
                write_file_atomically(
                    public_path,
                    &format!("{}\n", identity.public_key_hex()),
                    0o644,
                )?;
            }
            return Ok(identity);
        }
        let identity = Self::generate()?;
        write_file_atomically(
            secret_path,
            &format!("{}\n", identity.secret_seed_hex()),
            0o600,
        )?;
        write_file_atomically(
            public_path,
            &format!("{}\n", identity.public_key_hex()),
            0o644,
        )?;
        Ok(identity)
    }

    /// The public key.
    pub fn public_key(&self) -> VerifyingKey {
        self.signing_key.verifying_key()
    }

    /// The public key as 64 lower-case hex characters.
    pub fn public_key_hex(&self) -> String {
        to_hex(self.public_key().as_bytes())
    }

    /// The secret seed as 64 hex characters (what key files hold).
    pub fn secret_seed_hex(&self) -> String {
        to_hex(self.signing_key.as_bytes())
    }

    /// Signs arbitrary bytes.
    pub fn sign_bytes(&self, message: &[u8]) -> Signature {
        self.signing_key.sign(message)
    }
}

/// Writes `contents` to `path` with `mode` through a synced temporary file and a rename.
pub fn write_file_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), AuthError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io_error = |source| AuthError::Io {
        path: path.display().to_string(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(io_error)?;
    file.write_all(contents.as_bytes()).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    std::fs::rename(&temporary, path).map_err(io_error)?;
    if let Some(parent) = path.parent()
        && let Ok(directory) = std::fs::File::open(parent)
    {
        let _ = directory.sync_all();
    }
    Ok(())
}

/// The bytes a caller signs, one item per line: the format tag ([`SIGNATURE_CONTEXT`]),
/// the method, the target node's name and public key, the timestamp, the nonce and the
/// body hash. Header values cannot hold a newline, so no item can forge another.
pub fn signing_payload(
    method: &str,
    target: &NodeTarget,
    timestamp_ms: u128,
    nonce_hex: &str,
    body_sha256: &[u8],
) -> Vec<u8> {
    format!(
        "{SIGNATURE_CONTEXT}\n{method}\n{}\n{}\n{timestamp_ms}\n{nonce_hex}\n{}",
        target.name,
        target.public_key_hex,
        to_hex(body_sha256)
    )
    .into_bytes()
}

fn body_hash<T: Message>(message: &T) -> Vec<u8> {
    Sha256::digest(message.encode_to_vec()).to_vec()
}

/// A signature's metadata: everything but the method and the body, which the receiver
/// has anyway. Kept by the node that verified it, so it can forward the signature as
/// evidence ([`Envelope::to_grant`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The signer's public key, hex.
    pub key_hex: String,
    /// The node the request was signed for.
    pub target: NodeTarget,
    /// Signing time, Unix ms.
    pub timestamp_ms: u128,
    /// The nonce, hex.
    pub nonce_hex: String,
    /// The signature, hex.
    pub signature_hex: String,
}

impl Envelope {
    /// The envelope of a signed Apply request together with that request: what a node
    /// forwards to another node as the controller's authority.
    pub fn to_grant(&self, request: crate::v1::ApplyRequest) -> crate::v1::ControllerGrant {
        crate::v1::ControllerGrant {
            request: Some(request),
            key_hex: self.key_hex.clone(),
            target_node: self.target.name.clone(),
            target_key_hex: self.target.public_key_hex.clone(),
            timestamp_unix_ms: u64::try_from(self.timestamp_ms).unwrap_or(u64::MAX),
            nonce_hex: self.nonce_hex.clone(),
            signature_hex: self.signature_hex.clone(),
        }
    }

    /// The envelope of a forwarded grant (its fields are checked when it is verified).
    pub fn of_grant(grant: &crate::v1::ControllerGrant) -> Self {
        Self {
            key_hex: grant.key_hex.clone(),
            target: NodeTarget {
                name: grant.target_node.clone(),
                public_key_hex: grant.target_key_hex.clone(),
            },
            timestamp_ms: u128::from(grant.timestamp_unix_ms),
            nonce_hex: grant.nonce_hex.clone(),
            signature_hex: grant.signature_hex.clone(),
        }
    }
}

/// Signs requests with one identity. This is the client-side helper for the
/// reconciler and for node-to-node calls.
///
/// ```
/// use proto::auth::{Identity, NodeTarget, RequestSigner};
/// use proto::v1::GetInventoryRequest;
/// let signer = RequestSigner::new(Identity::generate().unwrap());
/// let node = NodeTarget::of("lab-2", &Identity::generate().unwrap());
/// let request = signer
///     .sign(proto::methods::GET_INVENTORY, &node, GetInventoryRequest {})
///     .unwrap();
/// assert!(request.metadata().get("x-cairn-signature").is_some());
/// ```
#[derive(Debug, Clone)]
pub struct RequestSigner {
    /// Shared by every clone: [`RequestSigner::set_identity`] switches them all.
    identity: std::sync::Arc<std::sync::RwLock<Identity>>,
    audit_head: Option<crate::anchor::SharedHead>,
    fence: Option<crate::fence::SharedFence>,
}

impl RequestSigner {
    /// A signer for `identity`.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity: std::sync::Arc::new(std::sync::RwLock::new(identity)),
            audit_head: None,
            fence: None,
        }
    }

    /// Signs with `identity` from the next request on, in this signer and every clone
    /// of it (a running controller's key rotation: no restart, no request refused
    /// once the nodes trust both keys); returns the identity it signed with before.
    pub fn set_identity(&self, identity: Identity) -> Identity {
        std::mem::replace(
            &mut *self
                .identity
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            identity,
        )
    }

    /// Also sends the audit log's head with every request ([`crate::anchor`]).
    pub fn with_audit_head(mut self, head: crate::anchor::SharedHead) -> Self {
        self.audit_head = Some(head);
        self
    }

    /// Also sends the fencing token of an elected controller with every request, and
    /// signs nothing while that controller must not act ([`crate::fence`]).
    pub fn with_fence(mut self, fence: crate::fence::SharedFence) -> Self {
        self.fence = Some(fence);
        self
    }

    /// The audit head it sends, if any.
    pub fn audit_head(&self) -> Option<&crate::anchor::SharedHead> {
        self.audit_head.as_ref()
    }

    /// The identity it signs with now.
    pub fn identity(&self) -> Identity {
        self.identity
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Wraps `message` in a `tonic::Request` signed for `method` (one of [`crate::methods`])
    /// on the node `target`; no other node accepts it.
    pub fn sign<T: Message>(
        &self,
        method: &str,
        target: &NodeTarget,
        message: T,
    ) -> Result<tonic::Request<T>, AuthError> {
        let token = match &self.fence {
            Some(fence) => fence
                .check(std::time::Instant::now())
                .map_err(AuthError::Fenced)?,
            None => None,
        };
        let nonce_hex = to_hex(&random_bytes::<16>()?);
        let timestamp_ms = now_unix_ms();
        let payload = signing_payload(
            method,
            target,
            timestamp_ms,
            &nonce_hex,
            &body_hash(&message),
        );
        let identity = self.identity();
        let signature = identity.sign_bytes(&payload);
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        insert_header(metadata, HEADER_VERSION, SIGNATURE_CONTEXT.to_string())?;
        insert_header(metadata, HEADER_TARGET_NODE, target.name.clone())?;
        insert_header(metadata, HEADER_TARGET_KEY, target.public_key_hex.clone())?;
        insert_header(metadata, HEADER_KEY, identity.public_key_hex())?;
        insert_header(metadata, HEADER_TIMESTAMP, timestamp_ms.to_string())?;
        insert_header(metadata, HEADER_NONCE, nonce_hex)?;
        insert_header(metadata, HEADER_SIGNATURE, to_hex(&signature.to_bytes()))?;
        insert_header(
            metadata,
            crate::protocol::HEADER,
            crate::protocol::header_value(),
        )?;
        if let Some(head) = self.audit_head.as_ref().and_then(|h| h.get()) {
            insert_header(metadata, crate::anchor::HEADER, head.header_value())?;
        }
        if let Some(token) = token {
            insert_header(metadata, crate::fence::HEADER, token.to_string())?;
        }
        Ok(request)
    }
}

fn insert_header(
    metadata: &mut MetadataMap,
    key: &'static str,
    value: String,
) -> Result<(), AuthError> {
    let value = value.parse().map_err(|_| AuthError::Malformed {
        header: key,
        problem: "not a valid header value (ascii, no newline)".into(),
    })?;
    metadata.insert(key, value);
    Ok(())
}

/// An unsigned request that only says which format it speaks and names no target: a
/// node answers it with a refusal carrying its name and key ([`NodeTarget::from_refusal`]).
pub fn identity_probe<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        HEADER_VERSION,
        tonic::metadata::MetadataValue::from_static(SIGNATURE_CONTEXT),
    );
    if let Ok(version) = crate::protocol::header_value().parse() {
        request
            .metadata_mut()
            .insert(crate::protocol::HEADER, version);
    }
    request
}

/// A set of trusted public keys, each with a name for messages and audit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    by_key: BTreeMap<[u8; 32], String>,
}

impl TrustedKeys {
    /// Every key, lower-case hex, in key order.
    pub fn keys_hex(&self) -> Vec<String> {
        self.by_key.keys().map(|key| to_hex(key)).collect()
    }

    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key under a name (replacing the name of a key already present).
    pub fn insert(&mut self, key: VerifyingKey, name: impl Into<String>) {
        self.by_key.insert(key.to_bytes(), name.into());
    }

    /// Adds every key of `other`.
    pub fn extend(&mut self, other: &TrustedKeys) {
        for (key, name) in &other.by_key {
            self.by_key.insert(*key, name.clone());
        }
    }

    /// The name of a trusted key, if it is trusted.
    pub fn name_of(&self, key: &VerifyingKey) -> Option<&str> {
        self.by_key.get(key.as_bytes()).map(String::as_str)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Parses a key file: one key per line as 64 hex characters, optionally followed
    /// by whitespace and a name; blank lines and lines starting with `#` are ignored.
    /// `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, AuthError> {
        let mut keys = Self::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let key_text = parts.next().unwrap_or_default();
            let name = parts.collect::<Vec<_>>().join(" ");
            let key = parse_public_key(key_text).map_err(|error| AuthError::BadKey {
                what: format!("{source} line {}", index + 1),
                problem: error.to_string(),
            })?;
            let name = if name.is_empty() {
                format!("key {}", &key_text[..key_text.len().min(16)])
            } else {
                name
            };
            keys.insert(key, name);
        }
        Ok(keys)
    }

    /// The key file text of this set (what [`TrustedKeys::parse`] reads): one
    /// `HEX NAME` line per key. `cairn dev up` writes it to `DATA_DIR/trusted-controllers`.
    pub fn render(&self) -> String {
        self.by_key
            .iter()
            .map(|(key, name)| format!("{} {name}\n", to_hex(key)))
            .collect()
    }

    /// Reads and parses a key file (see [`TrustedKeys::parse`]).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// Who a verified request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's public key, hex.
    pub key_hex: String,
    /// The caller's name in the trusted key set.
    pub name: String,
    /// The verified signature's metadata (for forwarding it as evidence).
    pub envelope: Envelope,
}

/// Where a [`Verifier`] keeps the nonces it accepted, so that a restart does not forget
/// them (a node keeps them in its state store). `record` must be durable when it
/// returns: the request is carried out only after that.
pub trait NonceLog: std::fmt::Debug + Send + Sync {
    /// Records `nonce` as used until `expires_at_ms` (Unix ms).
    fn record(&self, nonce: &[u8; 16], expires_at_ms: u64) -> Result<(), String>;
}

/// Whether a replay of `method` changes nothing on the node: reads and liveness probes.
/// Their nonces are kept in memory only (a replay within the window is still refused,
/// but one after a restart finds nothing to repeat). Everything else is recorded in
/// the [`NonceLog`] before it is carried out. The cost is the point: the log syncs a
/// file, and on a busy disk a site peer's `Quorum.Probe` that waited for that sync
/// behind every other request's (1–3 s under load) let a healthy node lose its site
/// majority, and with it fence its HA VMs during a controller outage.
pub fn replay_changes_nothing(method: &str) -> bool {
    use crate::methods;
    [
        methods::GET_INVENTORY,
        methods::OBSERVE,
        methods::READ_VOLUME,
        methods::GET_OUTCOME,
        methods::WATCH,
        methods::REPLICA_READ,
        methods::REPLICA_RECENT,
        methods::CLIENT_READ,
        methods::QUORUM_PROBE,
    ]
    .contains(&method)
}

/// Where [`Verifier::verify_as`] keeps an accepted nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nonces {
    /// In the [`NonceLog`] unless [`replay_changes_nothing`] says the method may skip it.
    ByMethod,
    /// In memory only: the request is bound to this process's session.
    InMemory,
}

/// Verifies signed requests for one node and keeps the replay cache. One per server.
#[derive(Debug)]
pub struct Verifier {
    window: Duration,
    this: NodeTarget,
    /// Other names and keys this verifier answers to (a controller's keys during a
    /// rotation: [`Verifier::answer_also_to`]).
    also: std::sync::RwLock<Vec<NodeTarget>>,
    seen_nonces: Mutex<HashMap<[u8; 16], u128>>,
    log: Option<Box<dyn NonceLog>>,
}

fn header<'a>(metadata: &'a MetadataMap, key: &'static str) -> Result<&'a str, AuthError> {
    let value = metadata.get(key).ok_or(AuthError::Missing(key))?;
    value.to_str().map_err(|_| AuthError::Malformed {
        header: key,
        problem: "not ascii".into(),
    })
}

struct Signed<'a> {
    key_hex: String,
    name: &'a str,
}

impl Verifier {
    /// A verifier for the node `this`, accepting timestamps within `window` of the
    /// local clock, keeping nonces in memory only.
    pub fn new(window: Duration, this: NodeTarget) -> Self {
        Self {
            window,
            this,
            also: std::sync::RwLock::new(vec![]),
            seen_nonces: Mutex::new(HashMap::new()),
            log: None,
        }
    }

    /// Also accepts requests addressed to `targets` (replacing the ones given
    /// before), beside [`Verifier::this_node`]: a controller whose nodes address its
    /// lease renewals to whichever of its keys they saw last, across a key rotation.
    /// The replay cache is the same for every target.
    pub fn answer_also_to(&self, targets: Vec<NodeTarget>) {
        let targets = targets
            .into_iter()
            .map(|t| NodeTarget {
                public_key_hex: t.public_key_hex.to_ascii_lowercase(),
                ..t
            })
            .collect();
        *self
            .also
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = targets;
    }

    /// The targets [`Verifier::answer_also_to`] set.
    pub fn also_answers_to(&self) -> Vec<NodeTarget> {
        self.also
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A verifier that also records every accepted nonce in `log`, starting from the
    /// nonces `remembered` (with their expiry, Unix ms) that an earlier run recorded.
    pub fn with_log(
        window: Duration,
        this: NodeTarget,
        log: Box<dyn NonceLog>,
        remembered: impl IntoIterator<Item = ([u8; 16], u64)>,
    ) -> Self {
        let now = now_unix_ms();
        let seen = remembered
            .into_iter()
            .map(|(nonce, expires_at)| (nonce, u128::from(expires_at)))
            .filter(|(_, expires_at)| *expires_at > now)
            .collect();
        Self {
            window,
            this,
            also: std::sync::RwLock::new(vec![]),
            seen_nonces: Mutex::new(seen),
            log: Some(log),
        }
    }

    /// The node this verifier accepts requests for.
    pub fn this_node(&self) -> &NodeTarget {
        &self.this
    }

    /// Checks that `request` was signed for `method` on this node by a key in
    /// `trusted`, within the window and never before. `role` names the trusted set in
    /// the refusal message.
    pub fn verify<T: Message>(
        &self,
        method: &str,
        request: &tonic::Request<T>,
        trusted: &TrustedKeys,
        role: &'static str,
    ) -> Result<Caller, AuthError> {
        self.verify_as(method, request, trusted, role, Nonces::ByMethod)
    }

    /// [`Verifier::verify`] keeping the nonce as `nonces` says. [`Nonces::InMemory`]
    /// is sound only when the caller refuses, by something in the signed body, every
    /// request that was not made for this very process (a `ReplicaWrite` naming this
    /// run's boot id, drawn at random at start): within the process the in-memory
    /// cache outlives the timestamp window, and a copy captured before a restart names
    /// another session and is refused.
    pub fn verify_as<T: Message>(
        &self,
        method: &str,
        request: &tonic::Request<T>,
        trusted: &TrustedKeys,
        role: &'static str,
        nonces: Nonces,
    ) -> Result<Caller, AuthError> {
        let metadata = request.metadata();
        match metadata.get(HEADER_VERSION).map(|value| value.to_str()) {
            None if metadata.get(HEADER_SIGNATURE).is_some() => {
                return Err(AuthError::OldFormat {
                    found: format!("older {LEGACY_SIGNATURE_CONTEXT} (no `{HEADER_VERSION}`)"),
                });
            }
            None => return Err(AuthError::Missing(HEADER_KEY)),
            Some(Ok(SIGNATURE_CONTEXT)) => {}
            Some(found) => {
                return Err(AuthError::OldFormat {
                    found: format!("`{}`", found.unwrap_or("(not ascii)")),
                });
            }
        }
        let addressed = NodeTarget {
            name: header(metadata, HEADER_TARGET_NODE)
                .map_err(|_| AuthError::NotAddressed {
                    missing: HEADER_TARGET_NODE,
                    this: self.this.clone(),
                })?
                .to_string(),
            public_key_hex: header(metadata, HEADER_TARGET_KEY)
                .map_err(|_| AuthError::NotAddressed {
                    missing: HEADER_TARGET_KEY,
                    this: self.this.clone(),
                })?
                .to_ascii_lowercase(),
        };
        if addressed != self.this
            && !self
                .also
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&addressed)
        {
            return Err(AuthError::WrongTarget {
                addressed,
                this: self.this.clone(),
            });
        }
        let key_text = header(metadata, HEADER_KEY)?;
        let timestamp_text = header(metadata, HEADER_TIMESTAMP)?;
        let timestamp_ms: u128 = timestamp_text.parse().map_err(|_| AuthError::Malformed {
            header: HEADER_TIMESTAMP,
            problem: format!("`{timestamp_text}` is not a number of milliseconds"),
        })?;
        let nonce_hex = header(metadata, HEADER_NONCE)?;
        let nonce = from_hex::<16>(nonce_hex).map_err(|problem| AuthError::Malformed {
            header: HEADER_NONCE,
            problem,
        })?;
        let signature_hex = header(metadata, HEADER_SIGNATURE)?;
        let envelope = Envelope {
            key_hex: key_text.to_string(),
            target: addressed,
            timestamp_ms,
            nonce_hex: nonce_hex.to_string(),
            signature_hex: signature_hex.to_string(),
        };
        let received = request
            .extensions()
            .get::<crate::received::ReceivedBody>()
            .and_then(crate::received::ReceivedBody::sha256);
        let signed = match received {
            // The bytes as sent (a newer caller's fields this build does not know
            // included); else, or when they do not verify, this build's re-encoding.
            Some(hash) => Self::check_signature_of(method, &hash, &envelope, trusted, role)
                .or_else(|_| {
                    Self::check_signature(method, request.get_ref(), &envelope, trusted, role)
                })?,
            None => Self::check_signature(method, request.get_ref(), &envelope, trusted, role)?,
        };
        let now = now_unix_ms();
        let skew_ms = now as i128 - timestamp_ms as i128;
        if skew_ms.unsigned_abs() > self.window.as_millis() {
            return Err(AuthError::Stale {
                skew_ms,
                window_ms: self.window.as_millis(),
            });
        }
        let durable = match nonces {
            Nonces::ByMethod => !replay_changes_nothing(method),
            Nonces::InMemory => false,
        };
        self.remember_nonce(nonce, now, durable)?;
        Ok(Caller {
            envelope: Envelope {
                key_hex: signed.key_hex.clone(),
                ..envelope
            },
            key_hex: signed.key_hex,
            name: signed.name.to_string(),
        })
    }

    /// Checks a signature forwarded by another node (a [`crate::v1::ControllerGrant`]):
    /// `message` was signed for `method` by a key in `trusted`, at most
    /// [`GRANT_MAX_AGE`] ago. Stateless: no nonce is consumed (the node it was sent to
    /// consumed it), and the target it names is the caller's to compare with the node
    /// that forwarded it.
    pub fn verify_forwarded<T: Message>(
        &self,
        method: &str,
        message: &T,
        envelope: &Envelope,
        trusted: &TrustedKeys,
        role: &'static str,
    ) -> Result<Caller, AuthError> {
        let signed = Self::check_signature(method, message, envelope, trusted, role)?;
        let age_ms = now_unix_ms() as i128 - envelope.timestamp_ms as i128;
        if age_ms > GRANT_MAX_AGE.as_millis() as i128 || -age_ms > self.window.as_millis() as i128 {
            return Err(AuthError::GrantTooOld {
                age_ms,
                max_age_ms: GRANT_MAX_AGE.as_millis(),
            });
        }
        Ok(Caller {
            key_hex: signed.key_hex.clone(),
            name: signed.name.to_string(),
            envelope: Envelope {
                key_hex: signed.key_hex,
                target: NodeTarget {
                    name: envelope.target.name.clone(),
                    public_key_hex: envelope.target.public_key_hex.to_ascii_lowercase(),
                },
                ..envelope.clone()
            },
        })
    }

    fn check_signature<'t, T: Message>(
        method: &str,
        message: &T,
        envelope: &Envelope,
        trusted: &'t TrustedKeys,
        role: &'static str,
    ) -> Result<Signed<'t>, AuthError> {
        Self::check_signature_of(method, &body_hash(message), envelope, trusted, role)
    }

    /// [`Verifier::check_signature`] of a body known by its SHA-256.
    fn check_signature_of<'t>(
        method: &str,
        body_sha256: &[u8],
        envelope: &Envelope,
        trusted: &'t TrustedKeys,
        role: &'static str,
    ) -> Result<Signed<'t>, AuthError> {
        let key = parse_public_key(&envelope.key_hex).map_err(|error| AuthError::Malformed {
            header: HEADER_KEY,
            problem: error.to_string(),
        })?;
        let key_hex = to_hex(key.as_bytes());
        let Some(name) = trusted.name_of(&key) else {
            return Err(AuthError::Untrusted {
                key: key_hex,
                method: method.to_string(),
                role,
            });
        };
        let signature_bytes =
            from_hex::<64>(&envelope.signature_hex).map_err(|problem| AuthError::Malformed {
                header: HEADER_SIGNATURE,
                problem,
            })?;
        let signature = Signature::from_bytes(&signature_bytes);
        let payload = signing_payload(
            method,
            &envelope.target,
            envelope.timestamp_ms,
            &envelope.nonce_hex,
            body_sha256,
        );
        if key.verify(&payload, &signature).is_err() {
            return Err(AuthError::BadSignature {
                key: key_hex,
                method: method.to_string(),
            });
        }
        Ok(Signed { key_hex, name })
    }

    /// Refuses a nonce seen within its lifetime, else records it (in memory, then in
    /// the log). The nonce is recorded only after the signature verified, so a forger
    /// cannot fill the cache. Entries live for twice the window: a timestamp older than
    /// that is refused as stale anyway.
    fn remember_nonce(&self, nonce: [u8; 16], now: u128, durable: bool) -> Result<(), AuthError> {
        let expiry = now + 2 * self.window.as_millis();
        {
            let mut seen = self
                .seen_nonces
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if seen.len() > 4096 {
                seen.retain(|_, expires_at| *expires_at > now);
            }
            match seen.get(&nonce) {
                Some(expires_at) if *expires_at > now => return Err(AuthError::Replayed),
                _ => {
                    seen.insert(nonce, expiry);
                }
            }
        }
        // Outside the lock: the log may sync a file. A concurrent copy of the request
        // already finds the nonce in memory.
        if let Some(log) = self.log.as_ref().filter(|_| durable)
            && let Err(problem) = log.record(&nonce, u64::try_from(expiry).unwrap_or(u64::MAX))
        {
            // Not recorded durably: forget it, so a retry of the same request is judged
            // afresh instead of refused as a replay of something never carried out.
            self.seen_nonces
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&nonce);
            return Err(AuthError::NonceLog(problem));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ApplyRequest, GetInventoryRequest};

    fn trusted(identity: &Identity) -> TrustedKeys {
        let mut keys = TrustedKeys::new();
        keys.insert(identity.public_key(), "controller");
        keys
    }

    fn node(name: &str) -> (NodeTarget, Verifier) {
        let target = NodeTarget::of(name, &Identity::generate().unwrap());
        (target.clone(), Verifier::new(DEFAULT_WINDOW, target))
    }

    #[test]
    fn signed_request_verifies_once_and_replay_is_refused() {
        let controller = Identity::generate().unwrap();
        let signer = RequestSigner::new(controller.clone());
        let (target, verifier) = node("n1");
        let request = signer
            .sign(
                crate::methods::GET_INVENTORY,
                &target,
                GetInventoryRequest {},
            )
            .unwrap();
        let caller = verifier
            .verify(
                crate::methods::GET_INVENTORY,
                &request,
                &trusted(&controller),
                "controller",
            )
            .unwrap();
        assert_eq!(caller.name, "controller");
        assert_eq!(caller.envelope.target, target);
        let replay = verifier.verify(
            crate::methods::GET_INVENTORY,
            &request,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(replay, Err(AuthError::Replayed)));
    }

    #[test]
    fn a_switched_identity_signs_the_next_request_in_every_clone() {
        let (old, new) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let signer = RequestSigner::new(old.clone());
        let clone = signer.clone();
        let (target, verifier) = node("n1");
        let sign = |s: &RequestSigner| {
            s.sign(crate::methods::OBSERVE, &target, GetInventoryRequest {})
                .unwrap()
        };
        let before = sign(&clone);
        let previous = signer.set_identity(new.clone());
        assert_eq!(previous.public_key(), old.public_key());
        assert_eq!(clone.identity().public_key(), new.public_key());
        let after = sign(&clone);
        let check = |request, key: &Identity| {
            verifier.verify(
                crate::methods::OBSERVE,
                &request,
                &trusted(key),
                "controller",
            )
        };
        check(before, &old).expect("signed with the old key before the switch");
        check(after, &new).expect("signed with the new key after it");
    }

    #[test]
    fn a_verifier_answers_to_the_other_targets_it_is_given_and_only_while_given() {
        let node_key = Identity::generate().unwrap();
        let signer = RequestSigner::new(node_key.clone());
        let (old, verifier) = node("controller");
        let next = NodeTarget::of("controller", &Identity::generate().unwrap());
        let to = |target: &NodeTarget| {
            signer
                .sign(crate::methods::RENEW_LEASE, target, GetInventoryRequest {})
                .unwrap()
        };
        let check = |request| {
            verifier.verify(
                crate::methods::RENEW_LEASE,
                &request,
                &trusted(&node_key),
                "node",
            )
        };
        assert!(matches!(
            check(to(&next)),
            Err(AuthError::WrongTarget { .. })
        ));
        verifier.answer_also_to(vec![next.clone()]);
        check(to(&next)).expect("addressed to the next key");
        check(to(&old)).expect("addressed to its own key still");
        verifier.answer_also_to(vec![]);
        assert!(matches!(
            check(to(&next)),
            Err(AuthError::WrongTarget { .. })
        ));
    }

    #[test]
    fn signature_is_bound_to_method_and_body() {
        let controller = Identity::generate().unwrap();
        let signer = RequestSigner::new(controller.clone());
        let (target, verifier) = node("n1");
        let request = signer
            .sign(
                crate::methods::APPLY,
                &target,
                ApplyRequest {
                    request_id: "a".into(),
                    action: None,
                },
            )
            .unwrap();
        let other_method = verifier.verify(
            crate::methods::OBSERVE,
            &request,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(other_method, Err(AuthError::BadSignature { .. })));
        let mut altered = request;
        altered.get_mut().request_id = "b".into();
        let other_body = verifier.verify(
            crate::methods::APPLY,
            &altered,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(other_body, Err(AuthError::BadSignature { .. })));
    }

    #[test]
    fn signature_is_bound_to_the_target_node_name_and_key() {
        let controller = Identity::generate().unwrap();
        let signer = RequestSigner::new(controller.clone());
        let (lab2, _) = node("lab-2");
        let (lab3, verifier3) = node("lab-3");
        let request = signer
            .sign(crate::methods::OBSERVE, &lab2, GetInventoryRequest {})
            .unwrap();
        let refused = verifier3
            .verify(
                crate::methods::OBSERVE,
                &request,
                &trusted(&controller),
                "controller",
            )
            .unwrap_err();
        assert!(matches!(refused, AuthError::WrongTarget { .. }));
        let message = refused.to_string();
        assert!(
            message.contains("`lab-2`") && message.contains("`lab-3`"),
            "{message}"
        );
        let status = tonic::Status::from(refused);
        assert_eq!(NodeTarget::from_refusal(&status), Some(lab3.clone()));

        // The right name with another key (a node that was reinstalled) is refused too.
        let impostor = NodeTarget {
            name: "lab-3".into(),
            ..lab2.clone()
        };
        let request = signer
            .sign(crate::methods::OBSERVE, &impostor, GetInventoryRequest {})
            .unwrap();
        let refused = verifier3.verify(
            crate::methods::OBSERVE,
            &request,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(refused, Err(AuthError::WrongTarget { .. })));

        // Relabelling the headers breaks the signature.
        let mut relabelled = signer
            .sign(crate::methods::OBSERVE, &lab2, GetInventoryRequest {})
            .unwrap();
        let metadata = relabelled.metadata_mut();
        metadata.insert(HEADER_TARGET_NODE, lab3.name.parse().unwrap());
        metadata.insert(
            HEADER_TARGET_KEY,
            lab3.public_key_hex.as_str().parse().unwrap(),
        );
        let refused = verifier3.verify(
            crate::methods::OBSERVE,
            &relabelled,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(refused, Err(AuthError::BadSignature { .. })));

        // A probe names no target and learns who the node is.
        let probe = identity_probe(GetInventoryRequest {});
        let refused = verifier3
            .verify(
                crate::methods::GET_INVENTORY,
                &probe,
                &trusted(&controller),
                "controller",
            )
            .unwrap_err();
        assert!(matches!(refused, AuthError::NotAddressed { .. }));
        assert_eq!(
            NodeTarget::from_refusal(&tonic::Status::from(refused)),
            Some(lab3)
        );
    }

    /// An Observe request of a newer protocol: a field this build does not know.
    #[derive(Clone, PartialEq, prost::Message)]
    struct NewerObserveRequest {
        #[prost(string, tag = "1000")]
        since_next_minor: String,
    }

    #[test]
    fn a_newer_callers_unknown_field_verifies_against_the_bytes_received() {
        let controller = Identity::generate().unwrap();
        let signer = RequestSigner::new(controller.clone());
        let (target, verifier) = node("n1");
        let newer = NewerObserveRequest {
            since_next_minor: "set".into(),
        };
        let sent = signer
            .sign(crate::methods::OBSERVE, &target, newer.clone())
            .unwrap();
        let wire = newer.encode_to_vec();
        // What this build decodes: the field is dropped, the re-encoding is empty.
        let decoded = crate::v1::ObserveRequest::decode(wire.as_slice()).unwrap();
        let receive = |with_hash: bool| {
            let mut request = tonic::Request::new(decoded);
            *request.metadata_mut() = sent.metadata().clone();
            if with_hash {
                request
                    .extensions_mut()
                    .insert(crate::received::ReceivedBody::of(
                        Sha256::digest(&wire).into(),
                    ));
            }
            request
        };
        let re_encoded = verifier.verify(
            crate::methods::OBSERVE,
            &receive(false),
            &trusted(&controller),
            "controller",
        );
        assert!(
            matches!(re_encoded, Err(AuthError::BadSignature { .. })),
            "{re_encoded:?}"
        );
        verifier
            .verify(
                crate::methods::OBSERVE,
                &receive(true),
                &trusted(&controller),
                "controller",
            )
            .expect("the bytes as sent verify");
        // Other bytes received than signed: refused.
        let other_verifier = Verifier::new(DEFAULT_WINDOW, target);
        let mut tampered = receive(false);
        tampered
            .extensions_mut()
            .insert(crate::received::ReceivedBody::of(
                Sha256::digest(b"other").into(),
            ));
        assert!(matches!(
            other_verifier.verify(
                crate::methods::OBSERVE,
                &tampered,
                &trusted(&controller),
                "controller"
            ),
            Err(AuthError::BadSignature { .. })
        ));
    }

    #[test]
    fn the_old_payload_format_is_refused_saying_so() {
        let controller = Identity::generate().unwrap();
        let (_, verifier) = node("n1");
        // What a cairn-node-request-v1 client sends: no format tag, no target.
        let payload = format!(
            "{LEGACY_SIGNATURE_CONTEXT}\n{}\n1\n{}\n{}",
            crate::methods::OBSERVE,
            "00".repeat(16),
            to_hex(&body_hash(&GetInventoryRequest {}))
        );
        let mut request = tonic::Request::new(GetInventoryRequest {});
        let metadata = request.metadata_mut();
        metadata.insert(HEADER_KEY, controller.public_key_hex().parse().unwrap());
        metadata.insert(HEADER_TIMESTAMP, "1".parse().unwrap());
        metadata.insert(HEADER_NONCE, "00".repeat(16).parse().unwrap());
        metadata.insert(
            HEADER_SIGNATURE,
            to_hex(&controller.sign_bytes(payload.as_bytes()).to_bytes())
                .parse()
                .unwrap(),
        );
        let refused = verifier
            .verify(
                crate::methods::OBSERVE,
                &request,
                &trusted(&controller),
                "controller",
            )
            .unwrap_err();
        let message = refused.to_string();
        assert!(matches!(refused, AuthError::OldFormat { .. }));
        assert!(
            message.contains(LEGACY_SIGNATURE_CONTEXT) && message.contains(SIGNATURE_CONTEXT),
            "{message}"
        );
    }

    #[test]
    fn a_forwarded_signature_verifies_statelessly_and_only_while_fresh() {
        let controller = Identity::generate().unwrap();
        let signer = RequestSigner::new(controller.clone());
        let (primary, primary_verifier) = node("lab-3");
        let (_, replica_verifier) = node("lab-1");
        let apply = ApplyRequest {
            request_id: "create-v".into(),
            action: None,
        };
        let request = signer
            .sign(crate::methods::APPLY, &primary, apply.clone())
            .unwrap();
        let caller = primary_verifier
            .verify(
                crate::methods::APPLY,
                &request,
                &trusted(&controller),
                "controller",
            )
            .unwrap();
        let grant = caller.envelope.to_grant(apply.clone());
        let envelope = Envelope::of_grant(&grant);
        for _ in 0..2 {
            let verified = replica_verifier
                .verify_forwarded(
                    crate::methods::APPLY,
                    &apply,
                    &envelope,
                    &trusted(&controller),
                    "controller",
                )
                .unwrap();
            assert_eq!(verified.envelope.target, primary);
        }
        let other = ApplyRequest {
            request_id: "create-w".into(),
            action: None,
        };
        let altered = replica_verifier.verify_forwarded(
            crate::methods::APPLY,
            &other,
            &envelope,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(altered, Err(AuthError::BadSignature { .. })));
        let stranger = Identity::generate().unwrap();
        let untrusted = replica_verifier.verify_forwarded(
            crate::methods::APPLY,
            &apply,
            &envelope,
            &trusted(&stranger),
            "controller",
        );
        assert!(matches!(untrusted, Err(AuthError::Untrusted { .. })));

        // An old grant, correctly signed, is refused for its age.
        let old = Envelope {
            timestamp_ms: now_unix_ms() - GRANT_MAX_AGE.as_millis() - 1000,
            ..envelope
        };
        let payload = signing_payload(
            crate::methods::APPLY,
            &old.target,
            old.timestamp_ms,
            &old.nonce_hex,
            &body_hash(&apply),
        );
        let old = Envelope {
            signature_hex: to_hex(&controller.sign_bytes(&payload).to_bytes()),
            ..old
        };
        let refused = replica_verifier.verify_forwarded(
            crate::methods::APPLY,
            &apply,
            &old,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(refused, Err(AuthError::GrantTooOld { .. })));
    }

    #[derive(Debug, Default)]
    struct MemoryLog(Mutex<Vec<([u8; 16], u64)>>);

    impl NonceLog for std::sync::Arc<MemoryLog> {
        fn record(&self, nonce: &[u8; 16], expires_at_ms: u64) -> Result<(), String> {
            self.0.lock().unwrap().push((*nonce, expires_at_ms));
            Ok(())
        }
    }

    #[test]
    fn remembered_nonces_are_refused_by_a_new_verifier() {
        let controller = Identity::generate().unwrap();
        let signer = RequestSigner::new(controller.clone());
        let target = NodeTarget::of("n1", &Identity::generate().unwrap());
        let log = std::sync::Arc::new(MemoryLog::default());
        let first = Verifier::with_log(DEFAULT_WINDOW, target.clone(), Box::new(log.clone()), []);
        let request = signer
            .sign(crate::methods::APPLY, &target, GetInventoryRequest {})
            .unwrap();
        first
            .verify(
                crate::methods::APPLY,
                &request,
                &trusted(&controller),
                "controller",
            )
            .unwrap();
        let recorded = log.0.lock().unwrap().clone();
        assert_eq!(recorded.len(), 1);
        // A restart: a new verifier that starts from what the log kept.
        let second = Verifier::with_log(DEFAULT_WINDOW, target, Box::new(log.clone()), recorded);
        let replay = second.verify(
            crate::methods::APPLY,
            &request,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(replay, Err(AuthError::Replayed)));
    }

    #[test]
    fn a_probe_or_a_read_is_refused_as_a_replay_but_never_waits_for_the_log() {
        let controller = Identity::generate().unwrap();
        let signer = RequestSigner::new(controller.clone());
        let target = NodeTarget::of("n1", &Identity::generate().unwrap());
        let log = std::sync::Arc::new(MemoryLog::default());
        let verifier =
            Verifier::with_log(DEFAULT_WINDOW, target.clone(), Box::new(log.clone()), []);
        for method in [crate::methods::QUORUM_PROBE, crate::methods::OBSERVE] {
            let request = signer
                .sign(method, &target, GetInventoryRequest {})
                .unwrap();
            verifier
                .verify(method, &request, &trusted(&controller), "controller")
                .unwrap();
            let replay = verifier.verify(method, &request, &trusted(&controller), "controller");
            assert!(
                matches!(replay, Err(AuthError::Replayed)),
                "{method}: {replay:?}"
            );
        }
        assert!(
            log.0.lock().unwrap().is_empty(),
            "nothing was written to the log"
        );
        assert!(!replay_changes_nothing(crate::methods::APPLY));
        assert!(!replay_changes_nothing(crate::methods::REPLICA_WRITE));
    }

    #[test]
    fn untrusted_key_and_missing_signature_are_refused() {
        let stranger = Identity::generate().unwrap();
        let controller = Identity::generate().unwrap();
        let (target, verifier) = node("n1");
        let request = RequestSigner::new(stranger)
            .sign(crate::methods::OBSERVE, &target, GetInventoryRequest {})
            .unwrap();
        let refused = verifier.verify(
            crate::methods::OBSERVE,
            &request,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(refused, Err(AuthError::Untrusted { .. })));
        let unsigned = tonic::Request::new(GetInventoryRequest {});
        let refused = verifier.verify(
            crate::methods::OBSERVE,
            &unsigned,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(refused, Err(AuthError::Missing(HEADER_KEY))));
    }

    #[test]
    fn trusted_key_file_parses_names_and_rejects_garbage() {
        let key = Identity::from_seed([7; 32]);
        let text = format!("# controllers\n\n{} ctl-1\n", key.public_key_hex());
        let keys = TrustedKeys::parse(&text, "keys").unwrap();
        assert_eq!(keys.name_of(&key.public_key()), Some("ctl-1"));
        assert_eq!(TrustedKeys::parse(&keys.render(), "again").unwrap(), keys);
        let error = TrustedKeys::parse("zz\n", "keys").unwrap_err();
        assert!(error.to_string().contains("keys line 1"), "{error}");
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex::<4>(&to_hex(&bytes)).unwrap(), bytes);
        assert!(from_hex::<4>("0001abf").is_err());
    }
}
