//! Node enrollment tokens and the enrolled nodes' keys, in the state store (issue 24,
//! item 7). The token itself is never stored: the key of a record is its SHA-256
//! (`proto::enroll::token_hash`). A token is good once, until its expiry, for the node
//! it names; [`judge`] says so in words, and each store consumes a token in one
//! transaction ([`EnrollmentStore::consume_enrollment_token`]), so two nodes racing
//! with one token cannot both enroll.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::state::{RedbStore, StateError};

/// The redb table: `token/HASH` → [`TokenRecord`], `node/NAME` → [`EnrolledNode`].
const ENROLLMENT: TableDefinition<&str, &[u8]> = TableDefinition::new("enrollment");

/// A token as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The node it enrolls.
    pub node: String,
    /// When it was made, Unix ms.
    pub created_at_ms: u64,
    /// When it stops being accepted, Unix ms.
    pub expires_at_ms: u64,
    /// Who made it (user@host), for the audit.
    #[serde(default)]
    pub created_by: String,
    /// Set when it was used: when, and the key it enrolled.
    #[serde(default)]
    pub used: Option<Used>,
}

/// A token's use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Used {
    /// Unix ms.
    pub at_ms: u64,
    /// The enrolled node's public key, hex.
    pub key_hex: String,
}

/// A node the controller enrolled (or whose key was rotated): its key, pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledNode {
    /// The node's name.
    pub name: String,
    /// Its ed25519 public key, hex.
    pub key_hex: String,
    /// When it was recorded, Unix ms.
    pub at_ms: u64,
    /// How: `token` (enrollment) or `rotated` (a node key rotation).
    pub how: String,
}

/// Where tokens and enrolled keys live: the redb file, or etcd with replicas.
pub trait EnrollmentStore {
    /// Records a new token under `hash`.
    fn put_enrollment_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StateError>;

    /// Consumes the token `hash` for `node` with key `key_hex` at `now_ms`, and records
    /// the node's key, in one transaction. `Ok(Err(why))` is a refusal ([`judge`]).
    fn consume_enrollment_token(
        &self,
        hash: &str,
        node: &str,
        key_hex: &str,
        now_ms: u64,
    ) -> Result<Result<TokenRecord, String>, StateError>;

    /// Every enrolled node, by name.
    fn enrolled_nodes(&self) -> Result<Vec<EnrolledNode>, StateError>;

    /// Records (or replaces) a node's key.
    fn set_enrolled_node(&self, node: &EnrolledNode) -> Result<(), StateError>;
}

fn ago(now_ms: u64, at_ms: u64) -> String {
    let seconds = now_ms.saturating_sub(at_ms) / 1000;
    match seconds {
        0..=119 => format!("{seconds} s ago"),
        120..=7199 => format!("{} min ago", seconds / 60),
        _ => format!("{} h ago", seconds / 3600),
    }
}

/// Whether the token `hash` (as found: `record`) enrolls `node` now. `Ok` is the
/// record marked used by `key_hex`; `Err` says why not and what to do.
pub fn judge(
    hash: &str,
    record: Option<TokenRecord>,
    node: &str,
    key_hex: &str,
    now_ms: u64,
) -> Result<TokenRecord, String> {
    let short = &hash[..hash.len().min(12)];
    let Some(record) = record else {
        return Err(format!(
            "enrollment token (sha256 {short}…) is not known to this controller: it was never made for this controller's state store; make one with `cairn node token create {node}`"
        ));
    };
    if let Some(used) = &record.used {
        if used.key_hex == key_hex && record.node == node {
            // The same node asking again (its answer was lost to a timeout): the
            // signature proved it holds the key the token enrolled; answer again.
            return Ok(record);
        }
        return Err(format!(
            "enrollment token (sha256 {short}…) for node {} was already used {} (by key {}…): a token enrolls one node once; make a new one with `cairn node token create {}`",
            record.node,
            ago(now_ms, used.at_ms),
            &used.key_hex[..used.key_hex.len().min(16)],
            record.node
        ));
    }
    if now_ms >= record.expires_at_ms {
        return Err(format!(
            "enrollment token (sha256 {short}…) for node {} expired {} (made {}, valid for {} s): make a new one with `cairn node token create {}`",
            record.node,
            ago(now_ms, record.expires_at_ms),
            ago(now_ms, record.created_at_ms),
            record.expires_at_ms.saturating_sub(record.created_at_ms) / 1000,
            record.node
        ));
    }
    if record.node != node {
        return Err(format!(
            "enrollment token (sha256 {short}…) is for node {}, not {node}: start the node as --name {} or make a token for {node}",
            record.node, record.node
        ));
    }
    Ok(TokenRecord {
        used: Some(Used {
            at_ms: now_ms,
            key_hex: key_hex.to_owned(),
        }),
        ..record
    })
}

/// [`judge`], and the node's key record a consumed token writes with it.
pub fn consume(
    hash: &str,
    record: Option<TokenRecord>,
    node: &str,
    key_hex: &str,
    now_ms: u64,
) -> Result<(TokenRecord, EnrolledNode), String> {
    let used = judge(hash, record, node, key_hex, now_ms)?;
    Ok((
        used,
        EnrolledNode {
            name: node.to_owned(),
            key_hex: key_hex.to_owned(),
            at_ms: now_ms,
            how: "token".to_owned(),
        },
    ))
}

fn redb_err(
    path: &std::path::Path,
    operation: &'static str,
    error: impl Into<redb::Error>,
) -> StateError {
    StateError::Redb {
        path: path.display().to_string(),
        operation,
        message: error.into().to_string(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    key: &str,
    bytes: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt {
        path: path.display().to_string(),
        key: key.to_owned(),
        source,
    })
}

impl RedbStore {
    fn enrollment_write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<'_, &str, &[u8]>, &std::path::Path) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        self.with_database(|database, path| {
            let transaction = database
                .begin_write()
                .map_err(|e| redb_err(path, "begin", e))?;
            let out = {
                let mut table = transaction
                    .open_table(ENROLLMENT)
                    .map_err(|e| redb_err(path, "open table", e))?;
                f(&mut table, path)?
            };
            transaction
                .commit()
                .map_err(|e| redb_err(path, "commit", e))?;
            Ok(out)
        })
    }
}

impl EnrollmentStore for RedbStore {
    fn put_enrollment_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(record).expect("token records serialize");
        self.enrollment_write(|table, path| {
            table
                .insert(format!("token/{hash}").as_str(), bytes.as_slice())
                .map_err(|e| redb_err(path, "insert", e))?;
            Ok(())
        })
    }

    fn consume_enrollment_token(
        &self,
        hash: &str,
        node: &str,
        key_hex: &str,
        now_ms: u64,
    ) -> Result<Result<TokenRecord, String>, StateError> {
        let key = format!("token/{hash}");
        self.enrollment_write(|table, path| {
            let found: Option<TokenRecord> = match table
                .get(key.as_str())
                .map_err(|e| redb_err(path, "get", e))?
            {
                Some(bytes) => Some(decode(path, &key, bytes.value())?),
                None => None,
            };
            let (used, enrolled) = match consume(hash, found, node, key_hex, now_ms) {
                Ok(consumed) => consumed,
                Err(why) => return Ok(Err(why)),
            };
            table
                .insert(
                    key.as_str(),
                    serde_json::to_vec(&used).expect("serializes").as_slice(),
                )
                .map_err(|e| redb_err(path, "insert", e))?;
            table
                .insert(
                    format!("node/{node}").as_str(),
                    serde_json::to_vec(&enrolled)
                        .expect("serializes")
                        .as_slice(),
                )
                .map_err(|e| redb_err(path, "insert", e))?;
            Ok(Ok(used))
        })
    }

    fn enrolled_nodes(&self) -> Result<Vec<EnrolledNode>, StateError> {
        self.enrollment_write(|table, path| {
            let mut out = Vec::new();
            for entry in table
                .range("node/".."node0")
                .map_err(|e| redb_err(path, "range", e))?
            {
                let (key, value) = entry.map_err(|e| redb_err(path, "range", e))?;
                out.push(decode(path, key.value(), value.value())?);
            }
            Ok(out)
        })
    }

    fn set_enrolled_node(&self, node: &EnrolledNode) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(node).expect("serializes");
        self.enrollment_write(|table, path| {
            table
                .insert(format!("node/{}", node.name).as_str(), bytes.as_slice())
                .map_err(|e| redb_err(path, "insert", e))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_enrolls_once_before_its_expiry_and_only_its_node() {
        let dir = std::env::temp_dir().join(format!("cairn-enroll-{}", crate::state::random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = RedbStore::open(&dir.join("state.redb")).unwrap();
        let record = TokenRecord {
            node: "lab-4".into(),
            created_at_ms: 1_000,
            expires_at_ms: 901_000,
            created_by: "test".into(),
            used: None,
        };
        store.put_enrollment_token("aa", &record).unwrap();
        store.put_enrollment_token("bb", &record).unwrap();
        let key = "ab".repeat(32);
        let refused = store
            .consume_enrollment_token("aa", "lab-5", &key, 2_000)
            .unwrap()
            .unwrap_err();
        assert!(
            refused.contains("is for node lab-4, not lab-5"),
            "{refused}"
        );
        let used = store
            .consume_enrollment_token("aa", "lab-4", &key, 2_000)
            .unwrap()
            .unwrap();
        assert_eq!(used.used.unwrap().key_hex, key);
        // The same node again (a lost answer): answered again, still used by it.
        let retried = store
            .consume_enrollment_token("aa", "lab-4", &key, 2_500)
            .unwrap()
            .unwrap();
        assert_eq!(retried.used.unwrap().at_ms, 2_000);
        let again = store
            .consume_enrollment_token("aa", "lab-4", &"ef".repeat(32), 3_000)
            .unwrap()
            .unwrap_err();
        assert!(again.contains("was already used"), "{again}");
        let late = store
            .consume_enrollment_token("bb", "lab-4", &key, 901_000)
            .unwrap()
            .unwrap_err();
        assert!(late.contains("expired 0 s ago"), "{late}");
        let unknown = store
            .consume_enrollment_token("cc", "lab-4", &key, 2_000)
            .unwrap()
            .unwrap_err();
        assert!(unknown.contains("not known"), "{unknown}");
        let nodes = store.enrolled_nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(
            (nodes[0].name.as_str(), nodes[0].key_hex.as_str()),
            ("lab-4", key.as_str())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
