//! The node's durable state: one redb file, `DATA_DIR/node.redb`.
//!
//! Tables hold prost-encoded records, keyed by name:
//! - `requests`: request id → [`RequestRecord`] (the digest of the action and the
//!   encoded `ApplyResponse` that was returned);
//! - `volumes`, `vms`, `bonds`: the definitions the node was asked to keep;
//! - `peers`: the peer set pushed with `SetPeers`;
//! - `write_intents`: regions of replicated volumes that may differ between the
//!   primary and its replicas (written before a replicated write, removed once every
//!   copy acknowledged it);
//! - `nonces`: the nonce of every accepted signed request (16 bytes) → when it may be
//!   forgotten (Unix ms), so a restart does not reopen the replay
//!   window;
//! - `counters`: per-object counters that outlive their objects (`vm-starts/NAME`,
//!   `volume-generation/NAME`), for proving that an effect happened exactly once.

use std::path::Path;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const BONDS: TableDefinition<&str, &[u8]> = TableDefinition::new("bonds");
const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers");
const WRITE_INTENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("write_intents");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NONCES: TableDefinition<&[u8], u64> = TableDefinition::new("nonces");

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("state store {operation}: {message}")]
    Redb {
        /// What was being done.
        operation: &'static str,
        /// redb's message.
        message: String,
    },
    /// A stored record does not decode.
    #[error("state store record `{key}` in table `{table}` is corrupt: {source}")]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// Key.
        key: String,
        /// Decoder error.
        #[source]
        source: prost::DecodeError,
    },
}

fn redb_error(operation: &'static str) -> impl Fn(redb::Error) -> StoreError {
    move |error| StoreError::Redb {
        operation,
        message: error.to_string(),
    }
}

macro_rules! redb_try {
    ($operation:expr, $expression:expr) => {
        $expression.map_err(|error| redb_error($operation)(error.into()))?
    };
}

/// A request-id record: what was asked and what was answered.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestRecord {
    /// SHA-256 of the prost-encoded `ApplyRequest.action`.
    #[prost(bytes = "vec", tag = "1")]
    pub action_digest: Vec<u8>,
    /// The prost-encoded `ApplyResponse` returned the first time.
    #[prost(bytes = "vec", tag = "2")]
    pub response: Vec<u8>,
    /// When the record was written (Unix ms), for retention.
    #[prost(uint64, tag = "3")]
    pub recorded_at_unix_ms: u64,
}

/// Which kind of definition a table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Volume records.
    Volume,
    /// VM records.
    Vm,
    /// Bond records.
    Bond,
    /// Peer records.
    Peer,
    /// Write intents.
    WriteIntent,
}

impl Kind {
    fn table(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Kind::Volume => VOLUMES,
            Kind::Vm => VMS,
            Kind::Bond => BONDS,
            Kind::Peer => PEERS,
            Kind::WriteIntent => WRITE_INTENTS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Vm => "vms",
            Kind::Bond => "bonds",
            Kind::Peer => "peers",
            Kind::WriteIntent => "write_intents",
        }
    }
}

/// When [`Store::put_counted`] moves its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// On every put.
    Always,
    /// Only when the record did not exist before.
    IfNew,
}

/// The node's redb database.
#[derive(Debug)]
pub struct Store {
    database: Database,
}

impl Store {
    /// Opens (or creates) the store at `path` and makes sure every table exists.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let database = redb_try!("open", Database::create(path));
        let transaction = redb_try!("begin", database.begin_write());
        for table in [REQUESTS, VOLUMES, VMS, BONDS, PEERS, WRITE_INTENTS] {
            redb_try!("create table", transaction.open_table(table));
        }
        redb_try!("create table", transaction.open_table(NONCES));
        redb_try!("create table", transaction.open_table(COUNTERS));
        redb_try!("commit", transaction.commit());
        Ok(Self { database })
    }

    /// Records an accepted request's nonce until `expires_at_ms`, durably (fsync
    /// before returning): the request is carried out only after this.
    pub fn put_nonce(&self, nonce: &[u8; 16], expires_at_ms: u64) -> Result<(), StoreError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut table = redb_try!("open table", transaction.open_table(NONCES));
            redb_try!("insert", table.insert(nonce.as_slice(), expires_at_ms));
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// Every recorded nonce that expires after `now_ms`, with its expiry.
    pub fn live_nonces(&self, now_ms: u64) -> Result<Vec<([u8; 16], u64)>, StoreError> {
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
    pub fn prune_nonces(&self, now_ms: u64) -> Result<u64, StoreError> {
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
    pub fn request(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(REQUESTS));
        let Some(value) = redb_try!("get", table.get(request_id)) else {
            return Ok(None);
        };
        let record =
            prost::Message::decode(value.value()).map_err(|source| StoreError::Corrupt {
                table: "requests",
                key: request_id.to_string(),
                source,
            })?;
        Ok(Some(record))
    }

    /// Stores the record of a request id durably (fsync before returning).
    pub fn put_request(&self, request_id: &str, record: &RequestRecord) -> Result<(), StoreError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut table = redb_try!("open table", transaction.open_table(REQUESTS));
            let encoded = prost::Message::encode_to_vec(record);
            redb_try!("insert", table.insert(request_id, encoded.as_slice()));
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// Removes request records written before `cutoff_unix_ms`; returns how many.
    pub fn prune_requests(&self, cutoff_unix_ms: u64) -> Result<u64, StoreError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        let mut removed = 0;
        {
            let mut table = redb_try!("open table", transaction.open_table(REQUESTS));
            redb_try!(
                "prune",
                table.retain(|_, value| {
                    let keep = <RequestRecord as prost::Message>::decode(value)
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
    pub fn request_count(&self) -> Result<u64, StoreError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(REQUESTS));
        Ok(redb_try!("len", table.len()))
    }

    /// Stores (replaces) a record durably.
    pub fn put(&self, kind: Kind, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put_with(kind, key, value, Durability::Immediate)
    }

    /// Stores a record; with [`Durability::None`] it may be lost in a crash.
    pub fn put_with(
        &self,
        kind: Kind,
        key: &str,
        value: &[u8],
        durability: Durability,
    ) -> Result<(), StoreError> {
        let mut transaction = redb_try!("begin", self.database.begin_write());
        redb_try!("set durability", transaction.set_durability(durability));
        {
            let mut table = redb_try!("open table", transaction.open_table(kind.table()));
            redb_try!("insert", table.insert(key, value));
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// Records a write intent and raises the volume's sequence high-water mark to
    /// `sequence`, in one durable transaction.
    pub fn put_intent(
        &self,
        volume: &str,
        intent_key: &str,
        sequence: u64,
    ) -> Result<(), StoreError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut table = redb_try!("open table", transaction.open_table(WRITE_INTENTS));
            redb_try!("insert", table.insert(intent_key, [].as_slice()));
            let bytes = sequence.to_le_bytes();
            redb_try!("insert", table.insert(volume, bytes.as_slice()));
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// The sequence high-water mark of a volume (0 when none was recorded).
    pub fn sequence_high_water(&self, volume: &str) -> Result<u64, StoreError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(WRITE_INTENTS));
        let Some(value) = redb_try!("get", table.get(volume)) else {
            return Ok(0);
        };
        let bytes: [u8; 8] = value.value().try_into().unwrap_or([0; 8]);
        Ok(u64::from_le_bytes(bytes))
    }

    /// Removes a record (a missing one is fine).
    pub fn remove(&self, kind: Kind, key: &str, durability: Durability) -> Result<(), StoreError> {
        let mut transaction = redb_try!("begin", self.database.begin_write());
        redb_try!("set durability", transaction.set_durability(durability));
        {
            let mut table = redb_try!("open table", transaction.open_table(kind.table()));
            redb_try!("remove", table.remove(key));
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// Replaces every record of a kind in one transaction.
    pub fn replace_all(&self, kind: Kind, records: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        {
            let mut table = redb_try!("open table", transaction.open_table(kind.table()));
            redb_try!("clear", table.retain(|_, _| false));
            for (key, value) in records {
                redb_try!("insert", table.insert(key.as_str(), value.as_slice()));
            }
        }
        redb_try!("commit", transaction.commit());
        Ok(())
    }

    /// Every record of a kind, in key order.
    pub fn list(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.list_prefix(kind, "")
    }

    /// Every record of a kind whose key starts with `prefix`, in key order.
    pub fn list_prefix(
        &self,
        kind: Kind,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(kind.table()));
        let mut out = Vec::new();
        for entry in redb_try!("range", table.range(prefix..)) {
            let (key, value) = redb_try!("iterate", entry);
            let key = key.value().to_string();
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key, value.value().to_vec()));
        }
        Ok(out)
    }

    /// The value of a per-object counter (0 when it never moved). Counters outlive the
    /// records they count (deletes do not reset them).
    pub fn counter(&self, counter: &str) -> Result<u64, StoreError> {
        let transaction = redb_try!("begin read", self.database.begin_read());
        let table = redb_try!("open table", transaction.open_table(COUNTERS));
        Ok(redb_try!("get", table.get(counter)).map_or(0, |value| value.value()))
    }

    /// Stores (replaces) a record and adds one to `counter`, in one durable
    /// transaction, so the count moves exactly when the record does; with
    /// [`Count::IfNew`] only when the record did not exist before. Returns the counter.
    pub fn put_counted(
        &self,
        kind: Kind,
        key: &str,
        value: &[u8],
        counter: &str,
        count: Count,
    ) -> Result<u64, StoreError> {
        let transaction = redb_try!("begin", self.database.begin_write());
        let counted = {
            let mut table = redb_try!("open table", transaction.open_table(kind.table()));
            let existed = redb_try!("insert", table.insert(key, value)).is_some();
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
        Ok(counted)
    }

    /// Decodes every record of a kind.
    pub fn list_decoded<M: prost::Message + Default>(
        &self,
        kind: Kind,
    ) -> Result<Vec<(String, M)>, StoreError> {
        self.list(kind)?
            .into_iter()
            .map(|(key, value)| {
                let decoded =
                    M::decode(value.as_slice()).map_err(|source| StoreError::Corrupt {
                        table: kind.name(),
                        key: key.clone(),
                        source,
                    })?;
                Ok((key, decoded))
            })
            .collect()
    }
}
