//! The audit log: hash-chained, signed with the controller key.
//!
//! Every entry (table `audit` of the state store, key = sequence number) is a
//! [`Sealed`] record: the entry's content ([`AuditEntry`]: when, who, what),
//! its sequence number, the hash of the entry before it, the SHA-256 of its
//! content, its own hash and an ed25519 signature by the controller key (the key
//! in `controller.key` that the nodes trust) over the same bytes:
//!
//! ```text
//! link    = "cairn-audit-v1" 0x00 || seq (u64 big-endian) || prev_hash (32) || content_hash (32)
//! hash    = SHA-256(link)
//! content_hash = SHA-256(JSON of the entry's content)
//! signature = ed25519(controller key, link)
//! ```
//!
//! The first entry's previous hash is 32 zero bytes. [`verify`] walks the chain
//! and names the first entry that was altered (content hash), removed (a gap in
//! the sequence numbers, or a previous hash that is not the previous entry's),
//! reordered (an entry stored under another sequence number than it was signed
//! with) or signed by another key. An append reads the head and writes the next
//! entry in one redb write transaction, so two writers cannot fork the chain.
//!
//! Upgrade (state format 4): entries written before the chain existed are plain
//! [`AuditEntry`] JSON. They are not chained retroactively (signing them now would
//! vouch for history nobody can check); instead the first append after the
//! upgrade writes a marker entry, `audit-chain-started`, whose detail records
//! `unchained_before` (its own seq), how many entries precede it and the SHA-256
//! of their bytes. The marker is signed like every entry, so from then on the old
//! entries cannot be altered unnoticed either; [`verify`] reports them as
//! unchained.
//!
//! The chain cannot show that its newest entries were cut off (whoever can
//! delete them can sign a new tail with the key next to the log): the head is
//! sent to every node with each request ([`proto::anchor`]) and
//! `cairn audit verify` compares what the nodes saw ([`check_anchors`]).

pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signature, Verifier as _};
use proto::anchor::Head;
use proto::auth::{Identity, from_hex, to_hex};
use redb::{ReadableTable, Table, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod brief;

/// The audit table: sequence number → one [`Sealed`] entry (JSON).
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// The domain-separation tag at the start of every signed link.
pub const CONTEXT: &[u8] = b"cairn-audit-v1\0";

/// The event of the marker entry that starts the chain after unchained entries.
pub const CHAIN_STARTED: &str = "audit-chain-started";

/// The event of a controller key rotation: the last entry the outgoing key seals,
/// naming its successor ([`rotation_detail`]); the entries after it are sealed by
/// the new key.
pub const KEY_ROTATED: &str = "controller-key-rotated";

/// The event of a recovery from a lost controller key: the first entry the new key
/// seals, carrying the offline recovery key's signature over the lost and the new
/// key ([`recovery_detail`]), since the lost key cannot hand over.
pub const KEY_RECOVERED: &str = "controller-key-recovered";

/// The detail of a [`KEY_ROTATED`] entry (sealed by `from`).
pub fn rotation_detail(from_hex: &str, to_hex: &str) -> serde_json::Value {
    serde_json::json!({"from": from_hex, "to": to_hex})
}

/// What a recovery key signs to put `new_hex` in the place of the lost `lost_hex`.
pub fn recovery_payload(lost_hex: &str, new_hex: &str) -> Vec<u8> {
    format!("cairn-audit-key-recovery-v1\n{lost_hex}\n{new_hex}").into_bytes()
}

/// The detail of a [`KEY_RECOVERED`] entry (sealed by the new key), signed by the
/// offline `recovery` key.
pub fn recovery_detail(lost_hex: &str, new_hex: &str, recovery: &Identity) -> serde_json::Value {
    serde_json::json!({
        "lost": lost_hex,
        "to": new_hex,
        "recovery_key": recovery.public_key_hex(),
        "recovery_signature": to_hex(&recovery.sign_bytes(&recovery_payload(lost_hex, new_hex)).to_bytes()),
    })
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditEntry {
    /// When.
    pub at_unix_ms: u64,
    /// `$USER`.
    pub user: String,
    /// What happened (`apply`, `force-unlock`, ...).
    pub event: String,
    /// Detail.
    pub detail: serde_json::Value,
}

/// One entry as stored: its content, sealed into the chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sealed {
    /// Sequence number (the table key it was written under).
    pub seq: u64,
    /// Hash of the previous entry (hex; zeros for the first).
    pub prev: String,
    /// SHA-256 of the content's JSON (hex).
    pub content_hash: String,
    /// SHA-256 of the link (hex): what the next entry's `prev` is.
    pub hash: String,
    /// The signing key (hex).
    pub key: String,
    /// ed25519 signature over the link (hex).
    pub signature: String,
    /// The content.
    pub entry: AuditEntry,
}

/// A stored record: a sealed entry, or one written before the chain.
#[derive(Debug, Clone)]
pub enum Record {
    /// Chained and signed.
    Sealed(Box<Sealed>),
    /// Written before format 4 (plain content).
    Unchained(AuditEntry),
    /// Neither.
    Corrupt(String),
}

impl Record {
    /// Decodes stored bytes.
    pub fn decode(bytes: &[u8]) -> Record {
        match serde_json::from_slice::<Sealed>(bytes) {
            Ok(s) => Record::Sealed(Box::new(s)),
            Err(sealed_error) => match serde_json::from_slice::<AuditEntry>(bytes) {
                Ok(e) => Record::Unchained(e),
                Err(_) => Record::Corrupt(sealed_error.to_string()),
            },
        }
    }

    /// The content, if it decodes.
    pub fn entry(self) -> Option<AuditEntry> {
        match self {
            Record::Sealed(s) => Some(s.entry),
            Record::Unchained(e) => Some(e),
            Record::Corrupt(_) => None,
        }
    }
}

/// SHA-256 of an entry's content.
pub fn content_hash(entry: &AuditEntry) -> [u8; 32] {
    Sha256::digest(serde_json::to_vec(entry).expect("audit entries serialize")).into()
}

/// The signed bytes of one link.
pub fn link(seq: u64, prev: &[u8; 32], content_hash: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONTEXT.len() + 8 + 64);
    out.extend_from_slice(CONTEXT);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(prev);
    out.extend_from_slice(content_hash);
    out
}

/// Seals `entry` as number `seq` after the entry whose hash is `prev`.
pub fn seal(identity: &Identity, seq: u64, prev: [u8; 32], entry: AuditEntry) -> Sealed {
    let content = content_hash(&entry);
    let bytes = link(seq, &prev, &content);
    Sealed {
        seq,
        prev: to_hex(&prev),
        content_hash: to_hex(&content),
        hash: to_hex(&Sha256::digest(&bytes)),
        key: identity.public_key_hex(),
        signature: to_hex(&identity.sign_bytes(&bytes).to_bytes()),
        entry,
    }
}

/// The SHA-256 over unchained records (each as length and bytes, in order).
fn unchained_digest<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut hasher = Sha256::new();
    for bytes in records {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    }
    to_hex(&hasher.finalize())
}

fn redb_err(e: impl Into<redb::Error>) -> String {
    e.into().to_string()
}

/// Appends `entry` to the table (inside the caller's write transaction): reads
/// the head, writes the chain-start marker first when the log holds only
/// unchained entries, returns the new head.
pub fn append(
    table: &mut Table<u64, &[u8]>,
    identity: &Identity,
    entry: AuditEntry,
) -> Result<Head, String> {
    let last = table
        .last()
        .map_err(redb_err)?
        .map(|(k, v)| (k.value(), Record::decode(v.value())));
    let (seq, prev) = match last {
        None => (1, [0; 32]),
        Some((key, Record::Sealed(s))) => (key + 1, from_hex::<32>(&s.hash).unwrap_or([0; 32])),
        Some((key, Record::Corrupt(_))) => (key + 1, [0; 32]),
        Some((key, Record::Unchained(_))) => {
            let mut old = vec![];
            for item in table.iter().map_err(redb_err)? {
                let (_, v) = item.map_err(redb_err)?;
                old.push(v.value().to_vec());
            }
            let marker = seal(
                identity,
                key + 1,
                [0; 32],
                AuditEntry {
                    at_unix_ms: entry.at_unix_ms,
                    user: entry.user.clone(),
                    event: CHAIN_STARTED.to_owned(),
                    detail: serde_json::json!({
                        "unchained_before": key + 1,
                        "unchained_entries": old.len(),
                        "unchained_sha256": unchained_digest(old.iter().map(Vec::as_slice)),
                    }),
                },
            );
            write(table, &marker)?;
            (
                key + 2,
                from_hex::<32>(&marker.hash).expect("hashes are hex"),
            )
        }
    };
    let sealed = seal(identity, seq, prev, entry);
    write(table, &sealed)?;
    Ok(Head {
        seq,
        hash: from_hex::<32>(&sealed.hash).expect("hashes are hex"),
    })
}

fn write(table: &mut Table<u64, &[u8]>, sealed: &Sealed) -> Result<(), String> {
    let bytes = serde_json::to_vec(sealed).expect("audit entries serialize");
    table
        .insert(sealed.seq, bytes.as_slice())
        .map_err(redb_err)?;
    Ok(())
}

/// The head of stored records: the newest sealed entry.
pub fn head_of(records: &[(u64, Vec<u8>)]) -> Option<Head> {
    records
        .iter()
        .rev()
        .find_map(|(key, bytes)| match Record::decode(bytes) {
            Record::Sealed(s) => Some(Head {
                seq: *key,
                hash: from_hex::<32>(&s.hash).ok()?,
            }),
            _ => None,
        })
}

/// What an intact log holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Entries in the log.
    pub entries: u64,
    /// Of which written before the chain (before format 4).
    pub unchained: u64,
    /// The newest entry's seq (0: empty).
    pub head_seq: u64,
    /// Its hash (hex; empty when empty).
    pub head_hash: String,
    /// The key the newest chained entries are signed with (hex): the controller key.
    pub key: String,
    /// The keys that signed older entries, oldest first, each handing over to the
    /// next by a [`KEY_ROTATED`] or [`KEY_RECOVERED`] entry (empty: one key all along).
    pub previous_keys: Vec<String>,
}

/// The first broken entry: which, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit entry {seq}: {problem}")]
pub struct Broken {
    /// The entry (its position in the log: the table key).
    pub seq: u64,
    /// What is wrong with it.
    pub problem: String,
}

fn broken(seq: u64, problem: impl Into<String>) -> Broken {
    Broken {
        seq,
        problem: problem.into(),
    }
}

/// Walks the stored records (table key and bytes, in key order) and checks every
/// hash and signature; the newest entries must be signed by `key`, the controller
/// key ([`verify_with`], accepting a recovery by any recovery key).
pub fn verify(records: &[(u64, Vec<u8>)], key: &VerifyingKey) -> Result<Summary, Broken> {
    verify_with(records, key, &[])
}

/// [`verify`] across controller key changes. Each entry is signed by the key of its
/// span: the first chained entry's key, until a [`KEY_ROTATED`] entry signed by it
/// names the next, or a [`KEY_RECOVERED`] entry sealed by the next carries a recovery
/// key's signature naming the lost one and the next (one of `recovery` when it is not
/// empty). The last span's key must be `key`: whoever holds it vouches, by its first
/// entry's previous hash, for everything before.
pub fn verify_with(
    records: &[(u64, Vec<u8>)],
    key: &VerifyingKey,
    recovery: &[VerifyingKey],
) -> Result<Summary, Broken> {
    let key_hex = to_hex(key.as_bytes());
    // The key of the current span, the entry it starts at, and the keys before it.
    let mut span: Option<(String, u64)> = None;
    let mut previous_keys: Vec<String> = vec![];
    let mut unchained: Vec<&[u8]> = vec![];
    // The previous sealed entry: its seq and hash.
    let mut previous: Option<(u64, [u8; 32])> = None;
    let mut expected_next = 1u64;
    for (position, bytes) in records {
        let position = *position;
        let sealed = match Record::decode(bytes) {
            Record::Sealed(s) => s,
            Record::Unchained(_) if previous.is_none() && position == expected_next => {
                unchained.push(bytes);
                expected_next = position + 1;
                continue;
            }
            Record::Unchained(_) if previous.is_none() => {
                return Err(missing(expected_next, position));
            }
            Record::Unchained(e) => {
                return Err(broken(
                    position,
                    format!(
                        "it is not chained (event `{}`, no hash or signature) but the chain started before it: it was replaced or inserted",
                        e.event
                    ),
                ));
            }
            Record::Corrupt(why) => {
                return Err(broken(position, format!("it does not decode ({why})")));
            }
        };
        if sealed.seq != position {
            return Err(broken(
                position,
                format!(
                    "the entry stored here was signed as entry {}: entries were reordered or moved",
                    sealed.seq
                ),
            ));
        }
        if position != expected_next {
            return Err(missing(expected_next, position));
        }
        let prev = from_hex::<32>(&sealed.prev)
            .map_err(|e| broken(position, format!("its previous hash is malformed: {e}")))?;
        match previous {
            Some((before, hash)) if prev != hash => {
                return Err(broken(
                    position,
                    format!(
                        "its previous hash {} is not entry {before}'s hash {}: an entry before it was removed, replaced or re-sealed",
                        short(&sealed.prev),
                        short(&to_hex(&hash))
                    ),
                ));
            }
            Some(_) => {}
            None => {
                if prev != [0; 32] {
                    return Err(broken(
                        position,
                        "it is the first chained entry but names a previous hash: entries before it were removed",
                    ));
                }
                if !unchained.is_empty() {
                    check_marker(&sealed, position, &unchained)?;
                }
            }
        }
        let content = content_hash(&sealed.entry);
        if to_hex(&content) != sealed.content_hash {
            return Err(broken(
                position,
                format!(
                    "its content (event `{}`) does not match its content hash: it was altered",
                    sealed.entry.event
                ),
            ));
        }
        let bytes = link(position, &prev, &content);
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if to_hex(&hash) != sealed.hash {
            return Err(broken(
                position,
                "its hash does not match its seq, previous hash and content hash: it was altered",
            ));
        }
        let signer_hex = sealed.key.to_ascii_lowercase();
        let signer = proto::auth::parse_public_key(&signer_hex)
            .map_err(|e| broken(position, format!("its key is malformed: {e}")))?;
        match &span {
            None => span = Some((signer_hex.clone(), position)),
            Some((current, _)) if *current == signer_hex => {}
            Some((current, since)) => {
                recovered(&sealed, current, recovery).map_err(|why| {
                    broken(
                        position,
                        format!(
                            "it is signed by key {}, not key {} that signed the entries since {since}, and {why}",
                            short(&signer_hex),
                            short(current)
                        ),
                    )
                })?;
                previous_keys.push(current.clone());
                span = Some((signer_hex.clone(), position));
            }
        }
        let signature = from_hex::<64>(&sealed.signature)
            .map(|b| Signature::from_bytes(&b))
            .map_err(|e| broken(position, format!("its signature is malformed: {e}")))?;
        if signer.verify(&bytes, &signature).is_err() {
            return Err(broken(
                position,
                "its signature does not verify with the controller key: it was altered or forged",
            ));
        }
        if sealed.entry.event == KEY_ROTATED {
            let detail = &sealed.entry.detail;
            let to = detail["to"]
                .as_str()
                .and_then(|t| proto::auth::parse_public_key(t).ok())
                .ok_or_else(|| {
                    broken(
                        position,
                        "it rotates the controller key but names no valid key `to`",
                    )
                })?;
            if detail["from"].as_str().map(str::to_ascii_lowercase) != Some(signer_hex.clone()) {
                return Err(broken(
                    position,
                    "it rotates the controller key `from` another key than the one that signed it",
                ));
            }
            let to = to_hex(to.as_bytes());
            if to != signer_hex {
                previous_keys.push(signer_hex);
                span = Some((to, position + 1));
            }
        }
        previous = Some((position, hash));
        expected_next = position + 1;
    }
    if let Some((last, since)) = &span
        && *last != key_hex
    {
        let problem = if previous_keys.is_empty() {
            format!(
                "it is signed by key {}, not the controller key {}",
                short(last),
                short(&key_hex)
            )
        } else {
            format!(
                "the entries from {since} on belong to key {} (after {} key change(s)), not the controller key {}",
                short(last),
                previous_keys.len(),
                short(&key_hex)
            )
        };
        return Err(broken(*since, problem));
    }
    Ok(Summary {
        entries: records.len() as u64,
        unchained: unchained.len() as u64,
        head_seq: previous
            .map(|(s, _)| s)
            .unwrap_or(expected_next.saturating_sub(1)),
        head_hash: previous.map(|(_, h)| to_hex(&h)).unwrap_or_default(),
        key: key_hex,
        previous_keys,
    })
}

/// Whether `sealed` is a valid recovery from the lost key `lost` (hex) to its own key;
/// `Err` says why not.
fn recovered(sealed: &Sealed, lost: &str, recovery: &[VerifyingKey]) -> Result<(), String> {
    if sealed.entry.event != KEY_RECOVERED {
        return Err(format!(
            "no `{KEY_ROTATED}` entry signed by the old key or `{KEY_RECOVERED}` entry hands over to it: it was forged or re-sealed"
        ));
    }
    let detail = &sealed.entry.detail;
    let field = |name: &str| detail[name].as_str().map(str::to_ascii_lowercase);
    let new = sealed.key.to_ascii_lowercase();
    if field("lost").as_deref() != Some(lost) || field("to").as_deref() != Some(new.as_str()) {
        return Err(format!(
            "its `{KEY_RECOVERED}` detail does not name the lost key and its own key"
        ));
    }
    let recovery_key = field("recovery_key")
        .and_then(|k| proto::auth::parse_public_key(&k).ok())
        .ok_or("its recovery key is missing or malformed")?;
    if !recovery.is_empty() && !recovery.contains(&recovery_key) {
        return Err(format!(
            "its recovery key {} is not a trusted recovery key",
            short(&to_hex(recovery_key.as_bytes()))
        ));
    }
    let signature = field("recovery_signature")
        .and_then(|s| from_hex::<64>(&s).ok())
        .map(|b| Signature::from_bytes(&b))
        .ok_or("its recovery signature is missing or malformed")?;
    recovery_key
        .verify(&recovery_payload(lost, &new), &signature)
        .map_err(|_| "its recovery signature does not verify".to_owned())
}

fn missing(expected: u64, found: u64) -> Broken {
    let which = if found == expected + 1 {
        format!("entry {expected} is missing")
    } else {
        format!("entries {expected} to {} are missing", found - 1)
    };
    broken(
        expected,
        format!("{which}: the log goes on with entry {found} (removed)"),
    )
}

fn check_marker(sealed: &Sealed, position: u64, unchained: &[&[u8]]) -> Result<(), Broken> {
    let detail = &sealed.entry.detail;
    let expected = serde_json::json!({
        "unchained_before": position,
        "unchained_entries": unchained.len(),
        "unchained_sha256": unchained_digest(unchained.iter().copied()),
    });
    if sealed.entry.event != CHAIN_STARTED {
        return Err(broken(
            position,
            format!(
                "the first chained entry after {} unchained ones is `{}`, not the `{CHAIN_STARTED}` marker",
                unchained.len(),
                sealed.entry.event
            ),
        ));
    }
    if *detail != expected {
        return Err(broken(
            position,
            format!(
                "the entries before the chain started were altered, removed or added: the marker recorded {detail}, they are now {expected}"
            ),
        ));
    }
    Ok(())
}

fn short(hex: &str) -> String {
    hex.chars().take(16).collect()
}

/// An anchor a node reported: the highest entry it saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeAnchor {
    /// The node.
    pub node: String,
    /// The seq it saw.
    pub seq: u64,
    /// The hash it saw (hex).
    pub hash: String,
}

/// Compares the nodes' anchors with the log: the first anchor beyond the log's
/// head, or naming another hash than the log has at its seq.
pub fn check_anchors(
    records: &[(u64, Vec<u8>)],
    anchors: &[NodeAnchor],
) -> Result<(), (NodeAnchor, String)> {
    let head = head_of(records).map(|h| h.seq).unwrap_or(0);
    for anchor in anchors {
        let at = records.iter().find(|(k, _)| *k == anchor.seq);
        let problem = match at.map(|(_, b)| Record::decode(b)) {
            None if anchor.seq > head => Some(format!(
                "the log's tail was cut: node {} saw entry {} (hash {}), the log ends at entry {head}",
                anchor.node,
                anchor.seq,
                short(&anchor.hash)
            )),
            None => Some(format!(
                "node {} saw entry {} (hash {}), which is not in the log",
                anchor.node,
                anchor.seq,
                short(&anchor.hash)
            )),
            Some(Record::Sealed(s)) if !s.hash.eq_ignore_ascii_case(&anchor.hash) => Some(format!(
                "the log was rewritten: node {} saw entry {} with hash {}, the log has hash {} there",
                anchor.node,
                anchor.seq,
                short(&anchor.hash),
                short(&s.hash)
            )),
            Some(Record::Sealed(_)) => None,
            Some(_) => Some(format!(
                "node {} saw entry {} as chained, the log's entry {} is not",
                anchor.node, anchor.seq, anchor.seq
            )),
        };
        if let Some(problem) = problem {
            return Err((anchor.clone(), problem));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{RedbStore, StateStore, random_id};
    use redb::Database;

    fn store() -> (std::path::PathBuf, RedbStore, Identity) {
        let dir = std::env::temp_dir().join(format!("cairn-audit-{}", random_id()));
        let identity = Identity::generate().unwrap();
        let store = RedbStore::open(&dir.join("state.redb"))
            .unwrap()
            .with_audit_key(identity.clone(), proto::anchor::SharedHead::default())
            .unwrap();
        (dir, store, identity)
    }

    fn fill(store: &RedbStore, n: u64) {
        for i in 1..=n {
            store
                .audit("apply", serde_json::json!({"plan_id": format!("p{i}")}))
                .unwrap();
        }
    }

    /// Rewrites the raw table with `f` (what an attacker with the file can do).
    fn tamper(dir: &std::path::Path, f: impl FnOnce(&mut Table<u64, &[u8]>)) {
        let db = Database::create(dir.join("state.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(AUDIT).unwrap();
            f(&mut t);
        }
        tx.commit().unwrap();
    }

    fn get(t: &Table<u64, &[u8]>, seq: u64) -> Vec<u8> {
        t.get(seq).unwrap().unwrap().value().to_vec()
    }

    fn verdict(store: &RedbStore, identity: &Identity) -> Result<Summary, Broken> {
        verify(&store.audit_records().unwrap(), &identity.public_key())
    }

    #[test]
    fn an_intact_chain_verifies_and_its_head_is_shared() {
        let (dir, store, identity) = store();
        fill(&store, 5);
        let summary = verdict(&store, &identity).unwrap();
        assert_eq!(summary.entries, 5);
        assert_eq!(summary.head_seq, 5);
        let head = store.audit_head().unwrap().unwrap();
        assert_eq!(head.seq, 5);
        assert_eq!(summary.head_hash, to_hex(&head.hash));
        assert_eq!(store.audit_log().unwrap().len(), 5);
        // Another key does not verify it.
        let other = Identity::generate().unwrap();
        let err = verdict(&store, &other).unwrap_err();
        assert_eq!(err.seq, 1);
        assert!(err.problem.contains("not the controller key"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_altered_detail_is_named_by_its_seq() {
        let (dir, store, identity) = store();
        fill(&store, 5);
        tamper(&dir, |t| {
            let mut sealed: Sealed = serde_json::from_slice(&get(t, 3)).unwrap();
            sealed.entry.detail = serde_json::json!({"plan_id": "forged"});
            t.insert(3, serde_json::to_vec(&sealed).unwrap().as_slice())
                .unwrap();
        });
        let err = verdict(&store, &identity).unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
        assert!(err.problem.contains("altered"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_removed_middle_entry_is_named_as_the_gap() {
        let (dir, store, identity) = store();
        fill(&store, 5);
        tamper(&dir, |t| {
            t.remove(3).unwrap();
        });
        let err = verdict(&store, &identity).unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
        assert!(err.problem.contains("entry 3 is missing"), "{err}");
        // Renumbering the rest to close the gap breaks the signatures' seqs.
        tamper(&dir, |t| {
            for seq in 4..=5 {
                let bytes = get(t, seq);
                t.remove(seq).unwrap();
                t.insert(seq - 1, bytes.as_slice()).unwrap();
            }
        });
        let err = verdict(&store, &identity).unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
        assert!(err.problem.contains("reordered"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn swapped_entries_are_named() {
        let (dir, store, identity) = store();
        fill(&store, 5);
        tamper(&dir, |t| {
            let (a, b) = (get(t, 2), get(t, 4));
            t.insert(2, b.as_slice()).unwrap();
            t.insert(4, a.as_slice()).unwrap();
        });
        let err = verdict(&store, &identity).unwrap_err();
        assert_eq!(err.seq, 2, "{err}");
        assert!(err.problem.contains("signed as entry 4"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The store of `dir` reopened with its audit entries signed by `identity`.
    fn reopen(dir: &std::path::Path, identity: &Identity) -> RedbStore {
        RedbStore::open(&dir.join("state.redb"))
            .unwrap()
            .with_audit_key(identity.clone(), proto::anchor::SharedHead::default())
            .unwrap()
    }

    #[test]
    fn the_chain_verifies_across_a_rotation_and_a_recovery_and_not_otherwise() {
        let (dir, store, old) = store();
        fill(&store, 3);
        let new = Identity::generate().unwrap();
        // The old key's last entry hands over to the new key.
        store
            .audit(
                KEY_ROTATED,
                rotation_detail(&old.public_key_hex(), &new.public_key_hex()),
            )
            .unwrap();
        // Verified with the old key now: the log is the new key's from entry 5 on.
        let err = verdict(&store, &old).unwrap_err();
        assert_eq!(err.seq, 5, "{err}");
        assert!(err.problem.contains("after 1 key change"), "{err}");
        drop(store);
        let store = reopen(&dir, &new);
        fill(&store, 2);
        let summary = verdict(&store, &new).unwrap();
        assert_eq!(summary.entries, 6);
        assert_eq!(summary.previous_keys, vec![old.public_key_hex()]);
        assert!(verdict(&store, &old).is_err());

        // controller.key (new) is lost: the replacement's first entry carries the
        // recovery key's signature.
        let recovery = Identity::generate().unwrap();
        let replacement = Identity::generate().unwrap();
        drop(store);
        let store = reopen(&dir, &replacement);
        store
            .audit(
                KEY_RECOVERED,
                recovery_detail(
                    &new.public_key_hex(),
                    &replacement.public_key_hex(),
                    &recovery,
                ),
            )
            .unwrap();
        fill(&store, 1);
        let records = store.audit_records().unwrap();
        let summary = verify_with(
            &records,
            &replacement.public_key(),
            &[recovery.public_key()],
        )
        .expect("verifies across the recovery");
        assert_eq!(
            summary.previous_keys,
            vec![old.public_key_hex(), new.public_key_hex()]
        );
        // A recovery key the verifier does not trust: refused, naming the entry.
        let stranger = Identity::generate().unwrap();
        let err = verify_with(
            &records,
            &replacement.public_key(),
            &[stranger.public_key()],
        )
        .unwrap_err();
        assert_eq!(err.seq, 7, "{err}");
        assert!(err.problem.contains("not a trusted recovery key"), "{err}");
        drop(store);

        // A key change with neither: a forger's key taking over at entry 9 is named.
        let forger = Identity::generate().unwrap();
        let store = reopen(&dir, &forger);
        store
            .audit("apply", serde_json::json!({"plan_id": "forged"}))
            .unwrap();
        let err = verdict(&store, &forger).unwrap_err();
        assert_eq!(err.seq, 9, "{err}");
        assert!(
            err.problem.contains("no `controller-key-rotated` entry"),
            "{err}"
        );
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_recovery_signed_by_the_wrong_key_or_a_rotation_from_another_key_is_refused() {
        let (dir, first_store, old) = store();
        fill(&first_store, 2);
        drop(first_store);
        let (new, recovery) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let reopened = reopen(&dir, &new);
        // The recovery detail signed for another lost key.
        let mut detail = recovery_detail(&new.public_key_hex(), &new.public_key_hex(), &recovery);
        detail["lost"] = serde_json::json!(old.public_key_hex());
        reopened.audit(KEY_RECOVERED, detail).unwrap();
        let err = verdict(&reopened, &new).unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
        assert!(
            err.problem.contains("recovery signature does not verify"),
            "{err}"
        );
        drop(reopened);
        let (dir2, store, first) = store();
        // A rotation entry claiming to be from another key than its signer.
        let other = Identity::generate().unwrap();
        store
            .audit(
                KEY_ROTATED,
                rotation_detail(&other.public_key_hex(), &other.public_key_hex()),
            )
            .unwrap();
        let err = verdict(&store, &first).unwrap_err();
        assert_eq!(err.seq, 1, "{err}");
        assert!(err.problem.contains("`from` another key"), "{err}");
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(dir2).unwrap();
    }

    #[test]
    fn a_bad_signature_is_named() {
        let (dir, store, identity) = store();
        fill(&store, 4);
        // Re-sealed with a forger's key but claiming the controller's.
        let forger = Identity::generate().unwrap();
        tamper(&dir, |t| {
            let old: Sealed = serde_json::from_slice(&get(t, 4)).unwrap();
            let mut entry = old.entry.clone();
            entry.event = "nothing-happened".into();
            let prev = from_hex::<32>(&old.prev).unwrap();
            let mut forged = seal(&forger, 4, prev, entry);
            forged.key = old.key;
            t.insert(4, serde_json::to_vec(&forged).unwrap().as_slice())
                .unwrap();
        });
        let err = verdict(&store, &identity).unwrap_err();
        assert_eq!(err.seq, 4, "{err}");
        assert!(err.problem.contains("signature does not verify"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unchained_entries_of_an_older_store_are_sealed_under_a_marker() {
        let (dir, store, identity) = store();
        // Two entries as format 3 wrote them.
        tamper(&dir, |t| {
            for (seq, plan) in [(1u64, "old1"), (2, "old2")] {
                let entry = AuditEntry {
                    at_unix_ms: 1,
                    user: "u".into(),
                    event: "apply".into(),
                    detail: serde_json::json!({"plan_id": plan}),
                };
                t.insert(seq, serde_json::to_vec(&entry).unwrap().as_slice())
                    .unwrap();
            }
        });
        fill(&store, 2);
        let log = store.audit_log().unwrap();
        assert_eq!(log.len(), 5);
        assert_eq!(log[2].event, CHAIN_STARTED);
        assert_eq!(log[2].detail["unchained_before"], 3);
        let summary = verdict(&store, &identity).unwrap();
        assert_eq!(
            (summary.entries, summary.unchained, summary.head_seq),
            (5, 2, 5)
        );
        // The old entries are now covered by the marker.
        tamper(&dir, |t| {
            let mut entry: AuditEntry = serde_json::from_slice(&get(t, 1)).unwrap();
            entry.user = "someone-else".into();
            t.insert(1, serde_json::to_vec(&entry).unwrap().as_slice())
                .unwrap();
        });
        let err = verdict(&store, &identity).unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
        assert!(err.problem.contains("before the chain started"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_cut_tail_is_found_by_the_anchors() {
        let (dir, store, _) = store();
        fill(&store, 5);
        let records = store.audit_records().unwrap();
        let at = |seq: u64| {
            let Record::Sealed(s) = Record::decode(&records[seq as usize - 1].1) else {
                panic!("sealed")
            };
            s.hash
        };
        let anchor = |seq, hash: String| NodeAnchor {
            node: "n1".into(),
            seq,
            hash,
        };
        check_anchors(&records, &[anchor(5, at(5)), anchor(3, at(3))]).unwrap();
        let (_, why) = check_anchors(&records[..3], &[anchor(5, at(5))]).unwrap_err();
        assert!(why.contains("tail was cut: node n1 saw entry 5"), "{why}");
        let (_, why) = check_anchors(&records, &[anchor(4, at(3))]).unwrap_err();
        assert!(why.contains("rewritten"), "{why}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
