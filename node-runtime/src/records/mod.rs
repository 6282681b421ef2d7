//! The node's records: one redb file, `DATA_DIR/node.redb`, that outlives the process.
//!
//! (The word *store* belongs to the volume store, `storage::Store`; these are the
//! agent's records.)
//!
//! Tables:
//! - `requests`: request id → [`RequestRecord`] (the digest of the request and the
//!   encoded `ApplyResponse` that was returned);
//! - `volumes`, `vms`, `bonds`: the definitions the node was asked to keep
//!   ([`VolumeRecord`], [`VmRecord`], [`BondRecord`]);
//! - `peers`: the peer set pushed with `SetPeers` ([`PeerRecord`]);
//! - `volume_epochs`: the highest epoch of each volume this copy was told of, with
//!   its writer, in-sync set and clients ([`VolumeEpochRecord`]);
//! - `client_volumes`: volumes this node holds no copy of but reaches remotely, with
//!   the epoch installed here ([`ClientVolumeRecord`]);
//! - `write_intents`: regions of replicated volumes that may differ between the
//!   primary and its replicas (written before a replicated write, removed once every
//!   copy acknowledged it), and each volume's sequence high-water mark;
//! - `nonces`: the nonce of every accepted signed request (16 bytes) → when it may be
//!   forgotten (Unix ms), so a restart does not reopen the replay window;
//! - `counters`: per-object counters that outlive their objects (`vm-starts/NAME`,
//!   `volume-generation/NAME`), for proving that an effect happened exactly once;
//! - `meta`: `format`, the version of this layout ([`FORMAT`]);
//! - `exports`: the NBD exports to serve again at start (volume → the export's JSON
//!   with its own `version`: lifetime deadline, read-only; `exports.rs`).
//!
//! Versions: the records are the node's own types (`types.rs`), stored as JSON with a
//! `version` field; wire types are converted to them in one place (`convert.rs`). A
//! rolling upgrade reads what the previous version wrote: format 1 (no `meta` table)
//! kept prost messages, some of them wire types; opening such a file converts every
//! record to its versioned form once, in one transaction (`legacy.rs` keeps the old
//! decoders). A file or a record written by a newer node is refused, saying so, rather
//! than half-read; a node's data directory is never downgraded.

mod convert;
mod group;
pub mod legacy;
mod types;

use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

pub use convert::{
    apply_bond, bond_record, client_volume_record, create_vm, peer, peer_record, vm_definition,
    vm_record, volume_role, wire_peer,
};
pub use types::{
    BondRecord, ClientVolumeRecord, Peer, PeerRecord, ProtectionRecord, Record, ReplicationReceive,
    ReplicationRecord, ReplicationSend, RequestRecord, SnapshotRecord, Table, TrafficClass,
    VmDefinition, VmImage, VmNic, VmRecord, VolumeEpochRecord, VolumeRecord, VolumeRole,
};

const WRITE_INTENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("write_intents");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NONCES: TableDefinition<&[u8], u64> = TableDefinition::new("nonces");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// NBD exports to re-serve at start: volume name → the export's JSON (`exports.rs`).
const EXPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("exports");

/// The layout of `node.redb` this build writes: 2, versioned JSON records. Format 1
/// (prost records, no `meta` table) is converted on open.
pub const FORMAT: u64 = 2;

fn table(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

/// Errors of the node's records.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// redb failed.
    #[error("node records {operation}: {message}")]
    Redb {
        /// What was being done.
        operation: &'static str,
        /// redb's message.
        message: String,
    },
    /// A stored record does not decode.
    #[error("node record `{key}` in table `{table}` is corrupt: {reason}")]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// Key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A record was written by a newer node.
    #[error(
        "node record `{key}` in table `{table}` has version {found}, written by a newer cairn-node; this one reads versions up to {supported}: run the newer cairn-node on this data directory"
    )]
    NewerRecord {
        /// Table name.
        table: &'static str,
        /// Key.
        key: String,
        /// The record's version.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The file was written by a newer node.
    #[error(
        "{path} has format {found}, written by a newer cairn-node; this one reads formats up to {supported}: run the newer cairn-node on this data directory"
    )]
    NewerFormat {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u64,
        /// The newest format this build reads.
        supported: u64,
    },
}

fn redb_error(operation: &'static str) -> impl Fn(redb::Error) -> RecordsError {
    move |error| RecordsError::Redb {
        operation,
        message: error.to_string(),
    }
}

macro_rules! redb_try {
    ($operation:expr, $expression:expr) => {
        $expression.map_err(|error| redb_error($operation)(error.into()))?
    };
}

/// Encodes a record as stored.
fn encode<R: Record>(record: &R) -> Vec<u8> {
    // Serializing plain structs of strings and numbers to JSON cannot fail.
    serde_json::to_vec(record).expect("records serialize to JSON")
}

/// Decodes a stored record: a versioned JSON object, or (left by format 1) a prost
/// message.
fn decode<R: Record>(key: &str, bytes: &[u8]) -> Result<R, RecordsError> {
    let corrupt = |reason: String| RecordsError::Corrupt {
        table: R::TABLE.name(),
        key: key.to_string(),
        reason,
    };
    if bytes.first() != Some(&b'{') {
        return R::decode_unversioned(bytes).map_err(corrupt);
    }
    #[derive(serde::Deserialize)]
    struct Version {
        version: u32,
    }
    let found = serde_json::from_slice::<Version>(bytes)
        .map_err(|error| corrupt(error.to_string()))?
        .version;
    if found > R::VERSION {
        return Err(RecordsError::NewerRecord {
            table: R::TABLE.name(),
            key: key.to_string(),
            found,
            supported: R::VERSION,
        });
    }
    // Versions before `R::VERSION` are upgraded here. Only `VolumeEpochRecord` has
    // had a second version so far, and its new field (`clients`) defaults to empty.
    serde_json::from_slice(bytes).map_err(|error| corrupt(error.to_string()))
}

/// Rewrites every format-1 record of one table in its versioned form.
fn convert_table<R: Record>(transaction: &redb::WriteTransaction) -> Result<u64, RecordsError> {
    let mut rows = redb_try!("open table", transaction.open_table(table(R::TABLE)));
    let mut old: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in redb_try!("range", rows.iter()) {
        let (key, value) = redb_try!("iterate", entry);
        if value.value().first() != Some(&b'{') {
            old.push((key.value().to_string(), value.value().to_vec()));
        }
    }
    let mut converted = 0;
    for (key, bytes) in old {
        let record = match R::decode_unversioned(&bytes) {
            Ok(record) => record,
            // A request record that never decoded stays as it was: looking it up says
            // it is corrupt, as before (and retention prunes it by age only if it can).
            Err(_) if R::TABLE == Table::Requests => continue,
            Err(reason) => {
                return Err(RecordsError::Corrupt {
                    table: R::TABLE.name(),
                    key,
                    reason,
                });
            }
        };
        redb_try!(
            "convert",
            rows.insert(key.as_str(), encode(&record).as_slice())
        );
        converted += 1;
    }
    Ok(converted)
}

/// When [`Records::put_counted`] moves its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// On every put.
    Always,
    /// Only when the record did not exist before.
    IfNew,
}

/// The node's redb database of records.
#[derive(Debug)]
pub struct Records {
    database: Database,
    /// Records converted from format 1 when the file was opened.
    converted: u64,
    /// Nonces waiting for the next group commit ([`Records::put_nonce`]).
    nonces: group::GroupCommit<([u8; 16], u64)>,
    /// Request records waiting for the next group commit ([`Records::put_request`]):
    /// key and encoded record.
    requests: group::GroupCommit<(String, Vec<u8>)>,
    /// Moves on every record stored or removed ([`Records::changes`]).
    changed: tokio::sync::watch::Sender<u64>,
}

impl Records {
    /// Opens (or creates) the records at `path`, makes sure every table exists, and
    /// converts a file of format 1 (written before records had versions) to [`FORMAT`].
    /// A file of a newer format is refused.
    pub fn open(path: &Path) -> Result<Self, RecordsError> {
        let database = redb_try!("open", Database::create(path));
        let transaction = redb_try!("begin", database.begin_write());
        for kind in Table::ALL {
            redb_try!("create table", transaction.open_table(table(kind)));
        }
        redb_try!("create table", transaction.open_table(WRITE_INTENTS));
        redb_try!("create table", transaction.open_table(NONCES));
        redb_try!("create table", transaction.open_table(COUNTERS));
        redb_try!("create table", transaction.open_table(EXPORTS));
        let found = {
            let meta = redb_try!("create table", transaction.open_table(META));
            redb_try!("get", meta.get("format")).map(|value| value.value())
        };
        let mut converted = 0;
        match found {
            Some(FORMAT) => {}
            Some(found) if found > FORMAT => {
                return Err(RecordsError::NewerFormat {
                    path: path.to_path_buf(),
                    found,
                    supported: FORMAT,
                });
            }
            // No `meta` table: format 1, or a new file.
            _ => {
                converted += convert_table::<RequestRecord>(&transaction)?;
                converted += convert_table::<VolumeRecord>(&transaction)?;
                converted += convert_table::<VmRecord>(&transaction)?;
                converted += convert_table::<BondRecord>(&transaction)?;
                converted += convert_table::<PeerRecord>(&transaction)?;
                let mut meta = redb_try!("open table", transaction.open_table(META));
                redb_try!("insert", meta.insert("format", FORMAT));
            }
        }
        redb_try!("commit", transaction.commit());
        Ok(Self {
            database,
            converted,
            nonces: group::GroupCommit::default(),
            requests: group::GroupCommit::default(),
            changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// A receiver that sees a change whenever a record of any table is stored or
    /// removed ([`Records::put`], [`Records::remove`], [`Records::replace_all`],
    /// [`Records::put_counted`]; nonces, intents and exports do not count). The
    /// node's periodic loops wait on it while their table is empty: at 10,000
    /// simulated nodes, listing empty tables four times a second was most of an
    /// idle simulator's work.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn note_change(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// How many records of format 1 were converted when the file was opened.
    pub fn converted_on_open(&self) -> u64 {
        self.converted
    }

    /// Records an accepted request's nonce until `expires_at_ms`, durably (fsync
    /// before returning): the request is carried out only after this. Requests that
    /// arrive together share one commit (group commit): the first caller commits every
    /// nonce queued until then, those behind it find theirs committed.
    pub fn put_nonce(&self, nonce: &[u8; 16], expires_at_ms: u64) -> Result<(), RecordsError> {
        self.nonces.submit((*nonce, expires_at_ms), |batch| {
            let transaction = redb_try!("begin", self.database.begin_write());
            {
                let mut table = redb_try!("open table", transaction.open_table(NONCES));
                for (nonce, expires_at_ms) in batch {
                    redb_try!("insert", table.insert(nonce.as_slice(), *expires_at_ms));
                }
            }
            redb_try!("commit", transaction.commit());
            Ok(())
        })
    }

    /// Every recorded nonce that expires after `now_ms`, with its expiry.
    pub fn live_nonces(&self, now_ms: u64) -> Result<Vec<([u8; 16], u64)>, RecordsError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(NONCES));
        let mut out = Vec::new();
        for entry in redb_try!("range", table.iter()) {
            let (key, value) = redb_try!("iterate", entry);
            let expires_at = value.value();
            if let Ok(nonce) = <[u8; 16]>::try_from(key.value())
                && expires_at > now_ms
            {
                out.push((nonce, expires_at));
            }
        }
        Ok(out)
    }

    /// Removes nonces that expired by `now_ms`; returns how many.
    pub fn prune_nonces(&self, now_ms: u64) -> Result<u64, RecordsError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        let mut removed = 0;
        {
            let mut table = redb_try!("open table", transaction.open_table(NONCES));
            redb_try!(
                "prune",
                table.retain(|_, expires_at| {
                    let keep = expires_at > now_ms;
                    if !keep {
                        removed += 1;
                    }
                    keep
                })
            );
        }
        redb_try!("commit", transaction.commit());
        Ok(removed)
    }

    /// The record of a request id, if one was stored.
    pub fn request(&self, request_id: &str) -> Result<Option<RequestRecord>, RecordsError> {
        self.get(request_id)
    }

    /// Stores the record of a request id durably (fsync before returning). Records
    /// stored together share one commit (group commit, as [`Records::put_nonce`]):
    /// the actions of an `ApplyBatch` end together.
    pub fn put_request(
        &self,
        request_id: &str,
        record: &RequestRecord,
    ) -> Result<(), RecordsError> {
        let item = (request_id.to_owned(), encode(record));
        self.requests.submit(item, |batch| {
            let transaction = redb_try!("begin", self.database.begin_write());
            {
                let mut rows = redb_try!(
                    "open table",
                    transaction.open_table(table(RequestRecord::TABLE))
                );
                for (key, bytes) in batch {
                    redb_try!("insert", rows.insert(key.as_str(), bytes.as_slice()));
                }
            }
            redb_try!("commit", transaction.commit());
            Ok(())
        })?;
        self.note_change();
        Ok(())
    }

    /// Removes request records written before `cutoff_unix_ms`; returns how many.
    pub fn prune_requests(&self, cutoff_unix_ms: u64) -> Result<u64, RecordsError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        let mut removed = 0;
        {
            let mut table = redb_try!("open table", transaction.open_table(table(Table::Requests)));
            redb_try!(
                "prune",
                table.retain(|key, value| {
                    let keep = decode::<RequestRecord>(key, value)
                        .map_or(true, |record| record.recorded_at_unix_ms >= cutoff_unix_ms);
                    if !keep {
                        removed += 1;
                    }
                    keep
                })
            );
        }
        redb_try!("commit", transaction.commit());
        Ok(removed)
    }

    /// Number of request ids recorded.
    pub fn request_count(&self) -> Result<u64, RecordsError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(table(Table::Requests)));
        Ok(redb_try!("len", table.len()))
    }

    /// The record stored under `key`, if any.
    pub fn get<R: Record>(&self, key: &str) -> Result<Option<R>, RecordsError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let rows = redb_try!("open table", transaction.open_table(table(R::TABLE)));
        let Some(value) = redb_try!("get", rows.get(key)) else {
            return Ok(None);
        };
        decode(key, value.value()).map(Some)
    }

    /// Stores (replaces) a record durably.
    pub fn put<R: Record>(&self, key: &str, record: &R) -> Result<(), RecordsError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut rows = redb_try!("open table", transaction.open_table(table(R::TABLE)));
            redb_try!("insert", rows.insert(key, encode(record).as_slice()));
        }
        redb_try!("commit", transaction.commit());
        self.note_change();
        Ok(())
    }

    /// Removes a record durably (a missing one is fine).
    pub fn remove<R: Record>(&self, key: &str) -> Result<(), RecordsError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut rows = redb_try!("open table", transaction.open_table(table(R::TABLE)));
            redb_try!("remove", rows.remove(key));
        }
        redb_try!("commit", transaction.commit());
        self.note_change();
        Ok(())
    }

    /// Replaces every record of a table in one transaction.
    pub fn replace_all<R: Record>(&self, records: &[(String, R)]) -> Result<(), RecordsError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut rows = redb_try!("open table", transaction.open_table(table(R::TABLE)));
            redb_try!("clear", rows.retain(|_, _| false));
            for (key, record) in records {
                redb_try!(
                    "insert",
                    rows.insert(key.as_str(), encode(record).as_slice())
                );
            }
        }
        redb_try!("commit", transaction.commit());
        self.note_change();
        Ok(())
    }

    /// Every record of a table, in key order.
    pub fn list<R: Record>(&self) -> Result<Vec<(String, R)>, RecordsError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let rows = redb_try!("open table", transaction.open_table(table(R::TABLE)));
        let mut out = Vec::new();
        for entry in redb_try!("range", rows.iter()) {
            let (key, value) = redb_try!("iterate", entry);
            let key = key.value().to_string();
            let record = decode(&key, value.value())?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// Records a write intent and raises the volume's sequence high-water mark to
    /// `sequence`, in one durable transaction.
    pub fn put_intent(
        &self,
        volume: &str,
        intent_key: &str,
        sequence: u64,
    ) -> Result<(), RecordsError> {
        self.put_intents(volume, &[intent_key.to_string()], sequence)
    }

    /// Records several write intents of one volume and raises its sequence high-water
    /// mark to at least `sequence`, in one durable transaction (one sync for writes
    /// that arrived together: group commit). The mark never goes down.
    pub fn put_intents(
        &self,
        volume: &str,
        intent_keys: &[String],
        sequence: u64,
    ) -> Result<(), RecordsError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut table = redb_try!("open table", transaction.open_table(WRITE_INTENTS));
            for key in intent_keys {
                redb_try!("insert", table.insert(key.as_str(), [].as_slice()));
            }
            let current = redb_try!("get", table.get(volume)).map_or(0, |value| {
                u64::from_le_bytes(value.value().try_into().unwrap_or([0; 8]))
            });
            let bytes = sequence.max(current).to_le_bytes();
            redb_try!("insert", table.insert(volume, bytes.as_slice()));
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// Keeps an NBD export (its JSON, `exports.rs`) so it is served again after a
    /// restart; durable.
    pub fn put_export(&self, volume: &str, export: &[u8]) -> Result<(), RecordsError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut table = redb_try!("open table", transaction.open_table(EXPORTS));
            redb_try!("insert", table.insert(volume, export));
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// Forgets an NBD export (missing is fine); durable.
    pub fn remove_export(&self, volume: &str) -> Result<(), RecordsError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut table = redb_try!("open table", transaction.open_table(EXPORTS));
            redb_try!("remove", table.remove(volume));
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// Every kept NBD export: volume name and its JSON.
    pub fn exports(&self) -> Result<Vec<(String, Vec<u8>)>, RecordsError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(EXPORTS));
        let mut out = Vec::new();
        for entry in redb_try!("range", table.iter()) {
            let (key, value) = redb_try!("iterate", entry);
            out.push((key.value().to_string(), value.value().to_vec()));
        }
        Ok(out)
    }

    /// The sequence high-water mark of a volume (0 when none was recorded).
    pub fn sequence_high_water(&self, volume: &str) -> Result<u64, RecordsError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(WRITE_INTENTS));
        let Some(value) = redb_try!("get", table.get(volume)) else {
            return Ok(0);
        };
        let bytes: [u8; 8] = value.value().try_into().unwrap_or([0; 8]);
        Ok(u64::from_le_bytes(bytes))
    }

    /// The keys of the write intents starting with `prefix`, in key order.
    pub fn intents(&self, prefix: &str) -> Result<Vec<String>, RecordsError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(WRITE_INTENTS));
        let mut out = Vec::new();
        for entry in redb_try!("range", table.range(prefix..)) {
            let (key, _) = redb_try!("iterate", entry);
            let key = key.value().to_string();
            if !key.starts_with(prefix) {
                break;
            }
            out.push(key);
        }
        Ok(out)
    }

    /// Removes a write intent, or a volume's high-water mark (keyed by the volume's
    /// name); with [`Durability::None`] the removal may be lost in a crash (the intent
    /// then stays, which is safe).
    pub fn remove_intent(&self, key: &str, durability: Durability) -> Result<(), RecordsError> {
        let mut transaction = redb_try!("begin", self.database.begin_write());
        redb_try!("set durability", transaction.set_durability(durability));
        {
            let mut table = redb_try!("open table", transaction.open_table(WRITE_INTENTS));
            redb_try!("remove", table.remove(key));
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// The value of a per-object counter (0 when it never moved). Counters outlive the
    /// records they count (deletes do not reset them).
    pub fn counter(&self, counter: &str) -> Result<u64, RecordsError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(COUNTERS));
        Ok(redb_try!("get", table.get(counter)).map_or(0, |value| value.value()))
    }

    /// Stores (replaces) a record and adds one to `counter`, in one durable
    /// transaction, so the count moves exactly when the record does; with
    /// [`Count::IfNew`] only when the record did not exist before. Returns the counter.
    pub fn put_counted<R: Record>(
        &self,
        key: &str,
        record: &R,
        counter: &str,
        count: Count,
    ) -> Result<u64, RecordsError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        let counted = {
            let mut rows = redb_try!("open table", transaction.open_table(table(R::TABLE)));
            let existed =
                redb_try!("insert", rows.insert(key, encode(record).as_slice())).is_some();
            let mut counters = redb_try!("open table", transaction.open_table(COUNTERS));
            let current = redb_try!("get", counters.get(counter)).map_or(0, |value| value.value());
            if existed && count == Count::IfNew {
                current
            } else {
                redb_try!("insert", counters.insert(counter, current + 1));
                current + 1
            }
        };
        redb_try!("commit", transaction.commit());
        self.note_change();
        Ok(counted)
    }
}

#[cfg(test)]
mod tests;
