//! Signed requests: how a caller proves who it is to a `cairn-node`.
//!
//! Every call carries four metadata entries:
//!
//! | key | value |
//! |---|---|
//! | `x-cairn-key` | the caller's ed25519 public key, 64 lower-case hex characters |
//! | `x-cairn-timestamp` | milliseconds since the Unix epoch when the caller signed |
//! | `x-cairn-nonce` | 16 random bytes, 32 hex characters, never reused |
//! | `x-cairn-signature` | ed25519 signature, 128 hex characters, over [`signing_payload`] |
//!
//! The signed payload binds the full gRPC method path, the timestamp, the nonce and
//! the SHA-256 of the prost-encoded request message, so a signature cannot be moved
//! to another method or another body. The [`Verifier`] accepts a timestamp within its
//! window (±30 s by default) and remembers nonces for twice the window, so a captured
//! request cannot be replayed.
//!
//! Why signed requests rather than mutual TLS with pinned keys: the identity *is* an
//! ed25519 key pair, exactly what the rest of cairn uses (signed plans, commit
//! signatures), so there is no certificate to mint, rotate or pin; authorization is
//! per call, not per connection, so one connection can serve calls from callers with
//! different roles (controller vs. peer node); it works through any gRPC proxy; and it
//! pulls in no TLS stack. What it does not give is confidentiality: traffic is plain
//! HTTP/2. Nodes listen on loopback or a management network; adding TLS for secrecy
//! later does not change this scheme.

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
/// Domain separation string at the start of every signed payload.
pub const SIGNATURE_CONTEXT: &str = "cairn-node-request-v1";
/// Default accepted clock difference between caller and node.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

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
}

impl From<AuthError> for tonic::Status {
    fn from(error: AuthError) -> Self {
        tonic::Status::unauthenticated(error.to_string())
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

fn write_file_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), AuthError> {
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

/// The bytes a caller signs: context, method, timestamp, nonce and body hash, one per line.
pub fn signing_payload(
    method: &str,
    timestamp_ms: u128,
    nonce_hex: &str,
    body_sha256: &[u8],
) -> Vec<u8> {
    format!(
        "{SIGNATURE_CONTEXT}\n{method}\n{timestamp_ms}\n{nonce_hex}\n{}",
        to_hex(body_sha256)
    )
    .into_bytes()
}

fn body_hash<T: Message>(message: &T) -> Vec<u8> {
    Sha256::digest(message.encode_to_vec()).to_vec()
}

/// Signs requests with one identity. This is the client-side helper for the
/// reconciler and for node-to-node calls.
///
/// ```
/// use proto::auth::{Identity, RequestSigner};
/// use proto::v1::GetInventoryRequest;
/// let signer = RequestSigner::new(Identity::generate().unwrap());
/// let request = signer.sign(proto::methods::GET_INVENTORY, GetInventoryRequest {}).unwrap();
/// assert!(request.metadata().get("x-cairn-signature").is_some());
/// ```
#[derive(Debug, Clone)]
pub struct RequestSigner {
    identity: Identity,
}

impl RequestSigner {
    /// A signer for `identity`.
    pub fn new(identity: Identity) -> Self {
        Self { identity }
    }

    /// The identity it signs with.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Wraps `message` in a `tonic::Request` signed for `method` (one of [`crate::methods`]).
    pub fn sign<T: Message>(
        &self,
        method: &str,
        message: T,
    ) -> Result<tonic::Request<T>, AuthError> {
        let nonce_hex = to_hex(&random_bytes::<16>()?);
        let timestamp_ms = now_unix_ms();
        let payload = signing_payload(method, timestamp_ms, &nonce_hex, &body_hash(&message));
        let signature = self.identity.sign_bytes(&payload);
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        let insert = |metadata: &mut MetadataMap,
                      key: &'static str,
                      value: String|
         -> Result<(), AuthError> {
            let value = value.parse().map_err(|_| AuthError::Malformed {
                header: key,
                problem: "not ascii".into(),
            })?;
            metadata.insert(key, value);
            Ok(())
        };
        insert(metadata, HEADER_KEY, self.identity.public_key_hex())?;
        insert(metadata, HEADER_TIMESTAMP, timestamp_ms.to_string())?;
        insert(metadata, HEADER_NONCE, nonce_hex)?;
        insert(metadata, HEADER_SIGNATURE, to_hex(&signature.to_bytes()))?;
        Ok(request)
    }
}

/// A set of trusted public keys, each with a name for messages and audit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    by_key: BTreeMap<[u8; 32], String>,
}

impl TrustedKeys {
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
}

/// Verifies signed requests and keeps the replay cache. One per server.
#[derive(Debug)]
pub struct Verifier {
    window: Duration,
    seen_nonces: Mutex<HashMap<[u8; 16], u128>>,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW)
    }
}

fn header<'a>(metadata: &'a MetadataMap, key: &'static str) -> Result<&'a str, AuthError> {
    let value = metadata.get(key).ok_or(AuthError::Missing(key))?;
    value.to_str().map_err(|_| AuthError::Malformed {
        header: key,
        problem: "not ascii".into(),
    })
}

impl Verifier {
    /// A verifier accepting timestamps within `window` of the local clock.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen_nonces: Mutex::new(HashMap::new()),
        }
    }

    /// Checks that `request` was signed for `method` by a key in `trusted`.
    /// `role` names the trusted set in the refusal message.
    pub fn verify<T: Message>(
        &self,
        method: &str,
        request: &tonic::Request<T>,
        trusted: &TrustedKeys,
        role: &'static str,
    ) -> Result<Caller, AuthError> {
        let metadata = request.metadata();
        let key_text = header(metadata, HEADER_KEY)?;
        let key = parse_public_key(key_text).map_err(|error| AuthError::Malformed {
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
        let signature_text = header(metadata, HEADER_SIGNATURE)?;
        let signature_bytes =
            from_hex::<64>(signature_text).map_err(|problem| AuthError::Malformed {
                header: HEADER_SIGNATURE,
                problem,
            })?;
        let signature = Signature::from_bytes(&signature_bytes);
        let payload = signing_payload(
            method,
            timestamp_ms,
            nonce_hex,
            &body_hash(request.get_ref()),
        );
        if key.verify(&payload, &signature).is_err() {
            return Err(AuthError::BadSignature {
                key: key_hex,
                method: method.to_string(),
            });
        }
        let now = now_unix_ms();
        let skew_ms = now as i128 - timestamp_ms as i128;
        if skew_ms.unsigned_abs() > self.window.as_millis() {
            return Err(AuthError::Stale {
                skew_ms,
                window_ms: self.window.as_millis(),
            });
        }
        // The nonce is recorded only after the signature verified, so a forger cannot
        // fill the cache. Entries live for twice the window: a timestamp older than
        // that is refused as stale anyway.
        let mut seen = self
            .seen_nonces
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let expiry = now + 2 * self.window.as_millis();
        if seen.len() > 4096 {
            seen.retain(|_, expires_at| *expires_at > now);
        }
        match seen.get(&nonce) {
            Some(expires_at) if *expires_at > now => return Err(AuthError::Replayed),
            _ => {
                seen.insert(nonce, expiry);
            }
        }
        Ok(Caller {
            key_hex,
            name: name.to_string(),
        })
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

    #[test]
    fn signed_request_verifies_once_and_replay_is_refused() {
        let controller = Identity::generate().unwrap();
        let signer = RequestSigner::new(controller.clone());
        let verifier = Verifier::default();
        let request = signer
            .sign(crate::methods::GET_INVENTORY, GetInventoryRequest {})
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
        let replay = verifier.verify(
            crate::methods::GET_INVENTORY,
            &request,
            &trusted(&controller),
            "controller",
        );
        assert!(matches!(replay, Err(AuthError::Replayed)));
    }

    #[test]
    fn signature_is_bound_to_method_and_body() {
        let controller = Identity::generate().unwrap();
        let signer = RequestSigner::new(controller.clone());
        let verifier = Verifier::default();
        let request = signer
            .sign(
                crate::methods::APPLY,
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
    fn untrusted_key_and_missing_signature_are_refused() {
        let stranger = Identity::generate().unwrap();
        let controller = Identity::generate().unwrap();
        let verifier = Verifier::default();
        let request = RequestSigner::new(stranger)
            .sign(crate::methods::OBSERVE, GetInventoryRequest {})
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
