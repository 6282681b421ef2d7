//! The state store: one redb file (default `SPEC_ROOT/.cairn/state.redb`).
//!
//! It holds only what neither git nor the node runtimes can tell us:
//! - `meta`: `placement` (the last applied VM → node placement, JSON),
//!   `applied` (the last applied revision, JSON), `lock` (the apply lock, JSON);
//! - `plans`: execution id (`PLAN_ID-RANDOM`) → the plan one run of apply
//!   started (JSON), whether it finished and how;
//! - `journal`: `EXECUTION_ID/STEP` (step zero-padded) → the step's record (JSON),
//!   written before and after every action. Request ids are
//!   `EXECUTION_ID.STEP`: unique per execution, so applying the same plan again
//!   (the same specs and observation, e.g. scaling 3 → 4 → 3 → 4) sends new
//!   requests instead of getting the first execution's outcomes back;
//! - `audit`: sequence number → one audit entry per plan/apply/unlock/sync,
//!   hash-chained and signed with the controller key (`crate::audit`).
//!
//! The database is opened for each operation and closed again, so `cairn status`
//! and `cairn plan` work while an apply runs (redb allows one opener at a time;
//! a busy file is retried for a few seconds).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::desired::Placement;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PLANS: TableDefinition<&str, &[u8]> = TableDefinition::new("plans");
const JOURNAL: TableDefinition<&str, &[u8]> = TableDefinition::new("journal");
/// Each execution's head (`ExecutionHead`: finished, started), beside its record
/// in `PLANS`: a sync asks which executions are unfinished, and a first apply's
/// record is a hundred MB of plan that scanning `PLANS` read every time.
const PLAN_HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("plan_heads");
use crate::audit::AUDIT;
pub use crate::audit::AuditEntry;

/// The format of the state store's records (`meta/format_version`). Version 1
/// had no marker; version 2 keys executions by execution id and journals
/// `EXECUTION_ID/STEP` (version-1 records keyed by plan id are still read);
/// version 3 stores the compiler's placement as it is. A placement recorded by
/// an older version is dropped when the store is opened: placement is then
/// rebuilt from what the nodes run (VMs stay where they are, volumes where
/// their data is), which is what losing it costs. Version 4 chains and signs
/// the audit log (`crate::audit`); entries written before stay as they are and
/// the chain starts after them with a signed `audit-chain-started` marker.
/// Version 5 keeps each execution's head (finished, started) in a table of its own,
/// filled from the records when an older store is opened.
pub const STATE_FORMAT_VERSION: u32 = 5;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// redb failed.
    #[error(
        "state store {path}: {operation}: {message}{}",
        recovery_hint(operation, path, message)
    )]
    Redb {
        /// The file.
        path: String,
        /// What was being done.
        operation: &'static str,
        /// redb's message.
        message: String,
    },
    /// A record does not decode.
    #[error(
        "state store {path}: record `{key}` is corrupt: {source}{}",
        recovery_hint("read", path, "")
    )]
    Corrupt {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Written by a newer cairn.
    #[error(
        "state store {path} was written by a newer cairn (record format {found}; this one reads up to {STATE_FORMAT_VERSION}); use that version, or move the file aside (placement will be rebuilt from what the nodes run)"
    )]
    Newer {
        /// The file.
        path: String,
        /// Its format.
        found: u32,
    },
    /// Another apply holds the lock.
    #[error(
        "the state is locked by apply {id} (pid {pid} on {host}, since {since_unix_ms} ms after the epoch, `{command}`); wait for it, or if that process is gone run `cairn force-unlock {id}`"
    )]
    Locked {
        /// Lock id.
        id: String,
        /// Holder pid.
        pid: u32,
        /// Holder host.
        host: String,
        /// When it was taken.
        since_unix_ms: u64,
        /// The holder's command line.
        command: String,
    },
    /// force-unlock named the wrong id.
    #[error("the state is not locked by `{given}`{}", match current { Some(c) => format!(" (the lock id is `{c}`)"), None => " (it is not locked)".to_owned() })]
    WrongLockId {
        /// The id given.
        given: String,
        /// The current id.
        current: Option<String>,
    },
    /// An audit entry cannot be signed.
    #[error(
        "state store {path}: audit entry `{event}` not written: the store was opened without the controller key that signs the audit log, and there is no controller.key next to it"
    )]
    AuditUnsigned {
        /// The file.
        path: String,
        /// The event.
        event: String,
    },
    /// The etcd store's prefix holds a restore that did not finish (`cairn controller
    /// restore` was cut off): nothing may use it until the same restore is run again.
    #[error("state store {url}: {message}")]
    Unfinished {
        /// The store's URL.
        url: String,
        /// What happened and what to do.
        message: String,
    },
    /// The etcd store failed (`--state etcd://…`, the `state-etcd` crate).
    #[error("state store {url}: {operation}: {message}")]
    Etcd {
        /// The store's URL.
        url: String,
        /// What was being done.
        operation: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A write by a controller that is not (or no longer) the leader: refused by its
    /// own timer or by etcd's comparison of the fencing token.
    #[error("state store {url}: write refused: {why}")]
    Fenced {
        /// The store's URL.
        url: String,
        /// Why.
        why: String,
    },
    /// The directory cannot be created.
    #[error("cannot create {path}: {source}")]
    Io {
        /// Directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How to get going again when the state file cannot be read: nothing in it is
/// needed to run, so moving it aside loses history but no data (empty for a
/// busy file: that one only needs waiting for).
fn recovery_hint(operation: &str, path: &str, message: &str) -> String {
    if !matches!(operation, "open" | "read") || message.contains("already open") {
        return String::new();
    }
    format!(
        "\nTo recover: move the file aside (`mv {path} {path}.broken`); placement will be rebuilt from what the nodes run (the journal and audit log of earlier applies stay in the moved file)"
    )
}

/// Who holds the apply lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Random id, given to `cairn force-unlock`.
    pub id: String,
    /// Holder's pid.
    pub pid: u32,
    /// Holder's host name.
    pub host: String,
    /// When it was taken.
    pub since_unix_ms: u64,
    /// Holder's command line.
    pub command: String,
}

/// The last applied revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Applied {
    /// Digest of the spec sources that were applied.
    pub revision: String,
    /// The plan that applied them.
    pub plan_id: String,
    /// When the apply finished.
    pub at_unix_ms: u64,
}

/// Status of one journaled step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Sent (or about to be sent) to the node; outcome unknown.
    Started,
    /// The node answered with success.
    Succeeded,
    /// The node refused or failed.
    Failed,
    /// A dependency failed; not sent.
    Skipped,
    /// In flight when its apply was interrupted, and its node says it never
    /// carried it out; not sent again (the next apply planned afresh).
    Abandoned,
}

/// The journal record of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step index in the plan.
    pub step: usize,
    /// The request id sent to the node.
    pub request_id: String,
    /// Status.
    pub status: StepStatus,
    /// The node answered with a recorded earlier outcome (done before a crash).
    pub replayed: bool,
    /// How many apply runs sent it (1 normally, 2 when a crash interrupted it).
    pub attempts: u32,
    /// Error text for failures and skips.
    pub error: Option<String>,
    /// When it changed last.
    pub at_unix_ms: u64,
}

/// One execution of a plan: what one run of apply started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRecord {
    /// The execution id (`PLAN_ID-RANDOM`; records written before executions had
    /// ids are keyed by the plan id and have it empty).
    #[serde(default)]
    pub execution_id: String,
    /// The plan (JSON of `plan::Plan`).
    pub plan: serde_json::Value,
    /// Whether the apply finished (successfully or not, or was superseded); an
    /// unfinished execution is settled and planned again by the next apply.
    pub finished: bool,
    /// How it ended, when it did not simply run to its end: `superseded by
    /// EXECUTION_ID` after it was interrupted and planned again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// When it started.
    pub started_at_unix_ms: u64,
}

/// A [`PlanRecord`] read without its plan (serde skips the plan's text without
/// building it): which executions are unfinished and which is the newest. Every
/// sync asks, and a 100,000-VM first apply's plan is about a hundred MB of JSON,
/// several times that as a `serde_json::Value`, kept in the store for good.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ExecutionHead {
    /// Whether the execution finished.
    pub finished: bool,
    /// When it started.
    pub started_at_unix_ms: u64,
}

impl ExecutionHead {
    /// The head of a record.
    pub fn of(record: &PlanRecord) -> ExecutionHead {
        ExecutionHead {
            finished: record.finished,
            started_at_unix_ms: record.started_at_unix_ms,
        }
    }
}

/// An execution record without its plan's steps (counted, not kept).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ExecutionSummary {
    /// The execution id.
    #[serde(default)]
    pub execution_id: String,
    /// Its plan's id and step count.
    pub plan: PlanSummary,
    /// Whether it finished.
    pub finished: bool,
    /// How it ended, when it did not run to its end.
    #[serde(default)]
    pub ended: Option<String>,
}

/// A plan's id and how many steps it has (read without building them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PlanSummary {
    /// The plan id.
    #[serde(default)]
    pub plan_id: String,
    /// Its steps, counted.
    #[serde(default, deserialize_with = "count_steps")]
    pub steps: usize,
}

fn count_steps<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let steps: Vec<serde::de::IgnoredAny> = Deserialize::deserialize(d)?;
    Ok(steps.len())
}

impl ExecutionSummary {
    /// The summary of a record read whole.
    pub fn of(record: &PlanRecord) -> ExecutionSummary {
        ExecutionSummary {
            execution_id: record.execution_id.clone(),
            plan: PlanSummary {
                plan_id: record.plan["plan_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                steps: record.plan["steps"].as_array().map_or(0, Vec::len),
            },
            finished: record.finished,
            ended: record.ended.clone(),
        }
    }
}

/// `executions_where`'s pick of the newest execution (the last of equal starts).
fn newest(heads: &[(String, ExecutionHead)]) -> Vec<usize> {
    heads.len().checked_sub(1).into_iter().collect()
}

fn record_id(record: &mut PlanRecord) -> &mut String {
    &mut record.execution_id
}

fn head_bytes(head: &ExecutionHead) -> Vec<u8> {
    serde_json::to_vec(head).expect("a head serializes")
}

/// A new execution id for a plan: the plan id and 8 random hex digits.
pub fn new_execution_id(plan_id: &str) -> String {
    format!("{plan_id}-{}", &random_id()[..8])
}

/// The request id of one step of one execution.
pub fn request_id(execution_id: &str, step: usize) -> String {
    format!("{execution_id}.{step}")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The state store at one path: one redb file.
#[derive(Debug)]
pub struct RedbStore {
    path: PathBuf,
    // Serialises openers inside this process (redb refuses a second open).
    guard: Mutex<()>,
    // Signs audit entries; the head is shared with the request signer.
    audit_key: Option<(proto::auth::Identity, proto::anchor::SharedHead)>,
}

/// The records that outlive a process: placement, applied revision, protected
/// volumes, executions and their journal, the audit log and the apply lock.
/// [`RedbStore`] keeps them in one redb file; an etcd store will implement the
/// same trait for controller replicas.
pub trait StateStore: Send + Sync {
    /// The volumes' epoch authority this store keeps (`crate::epochs`), if it keeps
    /// one: a live migration of a VM with disks hands their writer over through it.
    fn epoch_authority(&self) -> Option<crate::epochs::EpochAuthority<'_>> {
        None
    }

    /// The last applied placement.
    fn placement(&self) -> Result<Option<Placement>, StateError>;

    /// Records the applied placement.
    fn set_placement(&self, placement: &Placement) -> Result<(), StateError>;

    /// Volumes protected by `prevent-destroy` in the specs last applied.
    fn protected_volumes(&self) -> Result<std::collections::BTreeSet<String>, StateError>;

    /// Records the volumes the applied specs protect.
    fn set_protected_volumes(
        &self,
        volumes: &std::collections::BTreeSet<String>,
    ) -> Result<(), StateError>;

    /// The last applied revision.
    fn applied(&self) -> Result<Option<Applied>, StateError>;

    /// Records the applied revision.
    fn set_applied(&self, applied: &Applied) -> Result<(), StateError>;

    /// The current lock holder.
    fn lock_holder(&self) -> Result<Option<LockInfo>, StateError>;

    /// Takes the apply lock. A lock whose holder is a dead process on this host is
    /// taken over (the caller is told through the returned previous holder).
    fn lock(&self, command: &str) -> Result<(LockInfo, Option<LockInfo>), StateError>;

    /// Releases the lock if `id` holds it. With `force`, any holder with that id is
    /// removed (`cairn force-unlock`).
    fn unlock(&self, id: &str) -> Result<(), StateError>;

    /// Records that an execution started (keyed by its execution id).
    fn start_execution(&self, record: &PlanRecord) -> Result<(), StateError>;

    /// The executions that did not finish (a crash), oldest first.
    fn unfinished_executions(&self) -> Result<Vec<(String, PlanRecord)>, StateError>;

    /// Every execution record, oldest first (the key is the execution id).
    fn executions(&self) -> Result<Vec<(String, PlanRecord)>, StateError>;

    /// The newest execution record (the last of [`Self::executions`]). The redb
    /// store parses only that one's plan (`ExecutionHead`).
    fn last_execution(&self) -> Result<Option<(String, PlanRecord)>, StateError> {
        Ok(self.executions()?.pop())
    }

    /// The newest execution without its plan's steps (`cairn status` and the
    /// console's "last apply"; a first apply's plan is a hundred MB).
    fn last_execution_summary(&self) -> Result<Option<ExecutionSummary>, StateError> {
        Ok(self
            .last_execution()?
            .map(|(_, record)| ExecutionSummary::of(&record)))
    }

    /// Marks an execution finished; `ended` says how when it did not run to its end.
    fn finish_execution(&self, execution_id: &str, ended: Option<String>)
    -> Result<(), StateError>;

    /// Writes one journal record (durably: redb commits are fsynced).
    fn journal(&self, execution_id: &str, record: &StepRecord) -> Result<(), StateError>;

    /// Writes several journal records of one execution (a wave's batch: the etcd
    /// store makes it one transaction per 100 records instead of one each). All or
    /// none of each transaction is written.
    fn journal_many(&self, execution_id: &str, records: &[StepRecord]) -> Result<(), StateError> {
        for record in records {
            self.journal(execution_id, record)?;
        }
        Ok(())
    }

    /// The journal of one execution, by step.
    fn journal_of(&self, execution_id: &str) -> Result<Vec<StepRecord>, StateError>;

    /// Appends to the audit log.
    fn audit(&self, event: &str, detail: serde_json::Value) -> Result<(), StateError>;

    /// The audit log, oldest first.
    fn audit_log(&self) -> Result<Vec<AuditEntry>, StateError>;

    /// The newest `n` entries of the audit log, oldest first, in brief
    /// ([`crate::audit::brief`]: what a status shows). A store reads them from the
    /// end, never the whole log.
    fn recent_audit(&self, n: usize) -> Result<Vec<AuditEntry>, StateError> {
        let mut log = self.audit_log()?;
        log.drain(..log.len().saturating_sub(n));
        Ok(log
            .into_iter()
            .map(crate::audit::brief::abbreviate)
            .collect())
    }

    /// Records a live migration's phase durably (issue 17): `committed` is the
    /// commit point that names the destination the VM's owner. Written as an audit
    /// entry (`migration`), so every store keeps it in the same signed chain, in one
    /// durable write.
    fn record_migration(&self, record: &crate::migrate::MigrationRecord) -> Result<(), StateError> {
        self.audit(
            crate::migrate::MIGRATION_EVENT,
            serde_json::to_value(record).expect("migration records serialize"),
        )
    }

    /// The commit point of a live migration (issue 17 item 4): `record` (`committed`)
    /// and the volume epoch changes it decides (each a compare-and-swap on the epoch
    /// it was computed from, `epochs::EpochAuthority::migration_change`), in one
    /// durable write where the store can ([`RedbStore`]: one transaction, one fsync):
    /// all or nothing, and nothing when a volume moved to another epoch meanwhile.
    /// A store that cannot writes the record alone ([`Committed::RecordOnly`]); the
    /// commit then changes the epochs after it, as a settle of a committed record
    /// does.
    ///
    /// [`Committed::RecordOnly`]: crate::migrate::Committed::RecordOnly
    fn commit_migration(
        &self,
        record: &crate::migrate::MigrationRecord,
        epochs: &[crate::epochs::EpochChange],
    ) -> Result<crate::migrate::Committed, StateError> {
        let _ = epochs;
        self.record_migration(record)?;
        Ok(crate::migrate::Committed::RecordOnly)
    }

    /// Every migration record, oldest first.
    fn migrations(&self) -> Result<Vec<crate::migrate::MigrationRecord>, StateError> {
        Ok(crate::migrate::records_in(&self.audit_log()?))
    }
}

impl RedbStore {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store at `path`; its directory is created, the file on first write.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| StateError::Io {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let store = Self {
            path: path.to_owned(),
            guard: Mutex::new(()),
            audit_key: None,
        };
        // Opened for every read (`cairn status`, each console page): a store that
        // already has its tables at this format is read as is, without a write
        // transaction (whose commit is an fsync, 1-3 s on a busy disk).
        if store.is_current() {
            return Ok(store);
        }
        store.with_db(|db| {
            let tx = db.begin_write().map_err(|e| store.err("begin", e))?;
            for table in [META, PLANS, JOURNAL, PLAN_HEADS] {
                tx.open_table(table)
                    .map_err(|e| store.err("create table", e))?;
            }
            tx.open_table(AUDIT)
                .map_err(|e| store.err("create table", e))?;
            {
                // The format of the records: a store written by a newer cairn is
                // refused, not misread; an older one is read (and marked) as is.
                let mut meta = tx
                    .open_table(META)
                    .map_err(|e| store.err("open table", e))?;
                let found: Option<u32> = meta
                    .get("format_version")
                    .map_err(|e| store.err("get", e))?
                    .and_then(|v| serde_json::from_slice(v.value()).ok());
                match found {
                    Some(v) if v > STATE_FORMAT_VERSION => {
                        return Err(StateError::Newer {
                            path: store.path.display().to_string(),
                            found: v,
                        });
                    }
                    Some(v) if v == STATE_FORMAT_VERSION => {}
                    older => {
                        if older.is_none_or(|v| v < 3) {
                            meta.remove("placement")
                                .map_err(|e| store.err("remove", e))?;
                        }
                        if older.is_none_or(|v| v < 5) {
                            store.fill_heads(&tx)?;
                        }
                        let bytes =
                            serde_json::to_vec(&STATE_FORMAT_VERSION).expect("a number serializes");
                        meta.insert("format_version", bytes.as_slice())
                            .map_err(|e| store.err("insert", e))?;
                    }
                }
            }
            tx.commit().map_err(|e| store.err("commit", e))
        })?;
        Ok(store)
    }

    /// The file has every table and this format version (nothing to create or mark).
    fn is_current(&self) -> bool {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err("begin", e))?;
            for table in [PLANS, JOURNAL, PLAN_HEADS] {
                tx.open_table(table)
                    .map_err(|e| self.err("open table", e))?;
            }
            tx.open_table(AUDIT)
                .map_err(|e| self.err("open table", e))?;
            let meta = tx.open_table(META).map_err(|e| self.err("open table", e))?;
            let found: Option<u32> = meta
                .get("format_version")
                .map_err(|e| self.err("get", e))?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            Ok(found == Some(STATE_FORMAT_VERSION))
        })
        .unwrap_or(false)
    }

    /// Signs audit entries with `identity` (the controller key) and keeps `head`
    /// (shared with the request signer, `proto::anchor`) at the log's head.
    pub fn with_audit_key(
        mut self,
        identity: proto::auth::Identity,
        head: proto::anchor::SharedHead,
    ) -> Result<Self, StateError> {
        if let Some(current) = self.audit_head()? {
            head.advance(current);
        }
        self.audit_key = Some((identity, head));
        Ok(self)
    }

    /// The stored audit records, raw, in seq order (for `crate::audit::verify`).
    pub fn audit_records(&self) -> Result<Vec<(u64, Vec<u8>)>, StateError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err("begin", e))?;
            let t = tx
                .open_table(AUDIT)
                .map_err(|e| self.err("open table", e))?;
            let mut out = vec![];
            for entry in t.iter().map_err(|e| self.err("iter", e))? {
                let (k, v) = entry.map_err(|e| self.err("iter", e))?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// The audit log's head (its newest chained entry).
    pub fn audit_head(&self) -> Result<Option<proto::anchor::Head>, StateError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err("begin", e))?;
            let t = tx
                .open_table(AUDIT)
                .map_err(|e| self.err("open table", e))?;
            let last = t.last().map_err(|e| self.err("last", e))?;
            Ok(last.and_then(|(k, v)| crate::audit::head_of(&[(k.value(), v.value().to_vec())])))
        })
    }

    /// Appends to the audit log (chained and signed, `crate::audit::append`) in one
    /// write transaction, with `before`'s writes to other tables in it: `before`
    /// returning `false` writes nothing (the transaction is dropped) and gives
    /// `Ok(false)`.
    fn audit_with(
        &self,
        event: &str,
        detail: serde_json::Value,
        before: impl FnOnce(&redb::WriteTransaction, &Path) -> Result<bool, StateError>,
    ) -> Result<bool, StateError> {
        // Opened without the key: the controller key next to the file (where the
        // CLI's `.cairn/` and the controller's data directory keep both).
        let found;
        let (identity, head) = match &self.audit_key {
            Some((identity, head)) => (identity, Some(head)),
            None => {
                found = self
                    .path
                    .parent()
                    .map(|dir| dir.join("controller.key"))
                    .and_then(|key| proto::auth::Identity::load(&key).ok())
                    .ok_or_else(|| StateError::AuditUnsigned {
                        path: self.path.display().to_string(),
                        event: event.to_owned(),
                    })?;
                (&found, None)
            }
        };
        let entry = AuditEntry {
            at_unix_ms: now_ms(),
            user: std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned()),
            event: event.to_owned(),
            detail,
        };
        let new_head = self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.err("begin", e))?;
            if !before(&tx, &self.path)? {
                return Ok(None);
            }
            let new_head = {
                let mut t = tx
                    .open_table(AUDIT)
                    .map_err(|e| self.err("open table", e))?;
                crate::audit::append(&mut t, identity, entry).map_err(|message| {
                    StateError::Redb {
                        path: self.path.display().to_string(),
                        operation: "append audit entry",
                        message,
                    }
                })?
            };
            tx.commit().map_err(|e| self.err("commit", e))?;
            Ok(Some(new_head))
        })?;
        let Some(new_head) = new_head else {
            return Ok(false);
        };
        if let Some(head) = head {
            head.advance(new_head);
        }
        Ok(true)
    }

    fn err(&self, operation: &'static str, error: impl Into<redb::Error>) -> StateError {
        StateError::Redb {
            path: self.path.display().to_string(),
            operation,
            message: error.into().to_string(),
        }
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let _held = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + Duration::from_secs(10);
        let database = loop {
            match Database::create(&self.path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(self.err("open", e)),
            }
        };
        f(&database)
    }

    /// Runs `f` on the open database, with the store's path for errors (tables kept by
    /// other modules of this crate: the volume epochs, `crate::epochs`).
    pub(crate) fn with_database<T>(
        &self,
        f: impl FnOnce(&Database, &Path) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        self.with_db(|database| f(database, &self.path))
    }

    /// The execution records `pick` chooses, oldest first, from their heads sorted
    /// oldest first (by start, then key); only the chosen ones' plans are parsed.
    fn executions_where<T: DeserializeOwned>(
        &self,
        pick: impl FnOnce(&[(String, ExecutionHead)]) -> Vec<usize>,
        id_of: fn(&mut T) -> &mut String,
    ) -> Result<Vec<(String, T)>, StateError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err("begin", e))?;
            let t = tx
                .open_table(PLANS)
                .map_err(|e| self.err("open table", e))?;
            let corrupt = |key: &str, source| StateError::Corrupt {
                path: self.path.display().to_string(),
                key: key.to_owned(),
                source,
            };
            let mut heads = vec![];
            let head_table = tx
                .open_table(PLAN_HEADS)
                .map_err(|e| self.err("open table", e))?;
            for entry in head_table.iter().map_err(|e| self.err("iter", e))? {
                let (k, v) = entry.map_err(|e| self.err("iter", e))?;
                let head: ExecutionHead =
                    serde_json::from_slice(v.value()).map_err(|e| corrupt(k.value(), e))?;
                heads.push((k.value().to_owned(), head));
            }
            // Stable: equal starts keep the key order (as `executions` always had).
            heads.sort_by_key(|(_, head)| head.started_at_unix_ms);
            let mut out = vec![];
            for i in pick(&heads) {
                let key = &heads[i].0;
                let Some(v) = t.get(key.as_str()).map_err(|e| self.err("get", e))? else {
                    continue;
                };
                let mut record: T =
                    serde_json::from_slice(v.value()).map_err(|e| corrupt(key, e))?;
                if id_of(&mut record).is_empty() {
                    *id_of(&mut record) = key.clone();
                }
                out.push((key.clone(), record));
            }
            Ok(out)
        })
    }

    /// Writes the head of every execution record (opening a store older than
    /// version 5, in its write transaction).
    fn fill_heads(&self, tx: &redb::WriteTransaction) -> Result<(), StateError> {
        let plans = tx
            .open_table(PLANS)
            .map_err(|e| self.err("open table", e))?;
        let mut heads = tx
            .open_table(PLAN_HEADS)
            .map_err(|e| self.err("open table", e))?;
        for entry in plans.iter().map_err(|e| self.err("iter", e))? {
            let (k, v) = entry.map_err(|e| self.err("iter", e))?;
            let head: ExecutionHead =
                serde_json::from_slice(v.value()).map_err(|source| StateError::Corrupt {
                    path: self.path.display().to_string(),
                    key: k.value().to_owned(),
                    source,
                })?;
            heads
                .insert(k.value(), head_bytes(&head).as_slice())
                .map_err(|e| self.err("insert", e))?;
        }
        Ok(())
    }

    /// Writes an execution's record and its head in one transaction.
    fn put_execution(&self, key: &str, record: &PlanRecord) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(record).expect("state records serialize");
        let head = head_bytes(&ExecutionHead::of(record));
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.err("begin", e))?;
            {
                let mut plans = tx
                    .open_table(PLANS)
                    .map_err(|e| self.err("open table", e))?;
                plans
                    .insert(key, bytes.as_slice())
                    .map_err(|e| self.err("insert", e))?;
                let mut heads = tx
                    .open_table(PLAN_HEADS)
                    .map_err(|e| self.err("open table", e))?;
                heads
                    .insert(key, head.as_slice())
                    .map_err(|e| self.err("insert", e))?;
            }
            tx.commit().map_err(|e| self.err("commit", e))
        })
    }

    fn get_json<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err("begin", e))?;
            let t = tx
                .open_table(table)
                .map_err(|e| self.err("open table", e))?;
            let Some(v) = t.get(key).map_err(|e| self.err("get", e))? else {
                return Ok(None);
            };
            serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|source| StateError::Corrupt {
                    path: self.path.display().to_string(),
                    key: key.to_owned(),
                    source,
                })
        })
    }

    fn put_json<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(value).expect("state records serialize");
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.err("begin", e))?;
            {
                let mut t = tx
                    .open_table(table)
                    .map_err(|e| self.err("open table", e))?;
                t.insert(key, bytes.as_slice())
                    .map_err(|e| self.err("insert", e))?;
            }
            tx.commit().map_err(|e| self.err("commit", e))
        })
    }
}

impl StateStore for RedbStore {
    fn epoch_authority(&self) -> Option<crate::epochs::EpochAuthority<'_>> {
        Some(crate::epochs::EpochAuthority::new(self))
    }

    /// The last applied placement.
    fn placement(&self) -> Result<Option<Placement>, StateError> {
        self.get_json(META, "placement")
    }

    /// Records the applied placement.
    fn set_placement(&self, placement: &Placement) -> Result<(), StateError> {
        self.put_json(META, "placement", placement)
    }

    /// Volumes protected by `prevent-destroy` in the specs last applied.
    fn protected_volumes(&self) -> Result<std::collections::BTreeSet<String>, StateError> {
        Ok(self.get_json(META, "protected")?.unwrap_or_default())
    }

    /// Records the volumes the applied specs protect.
    fn set_protected_volumes(
        &self,
        volumes: &std::collections::BTreeSet<String>,
    ) -> Result<(), StateError> {
        self.put_json(META, "protected", volumes)
    }

    /// The last applied revision.
    fn applied(&self) -> Result<Option<Applied>, StateError> {
        self.get_json(META, "applied")
    }

    /// Records the applied revision.
    fn set_applied(&self, applied: &Applied) -> Result<(), StateError> {
        self.put_json(META, "applied", applied)
    }

    /// The current lock holder.
    fn lock_holder(&self) -> Result<Option<LockInfo>, StateError> {
        self.get_json(META, "lock")
    }

    /// Takes the apply lock. A lock whose holder is a dead process on this host is
    /// taken over (the caller is told through the returned previous holder).
    fn lock(&self, command: &str) -> Result<(LockInfo, Option<LockInfo>), StateError> {
        let host = hostname();
        let mine = LockInfo {
            id: random_id(),
            pid: std::process::id(),
            host: host.clone(),
            since_unix_ms: now_ms(),
            command: command.to_owned(),
        };
        let bytes = serde_json::to_vec(&mine).expect("lock serializes");
        let previous = self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.err("begin", e))?;
            let previous = {
                let mut t = tx.open_table(META).map_err(|e| self.err("open table", e))?;
                let current: Option<LockInfo> = t
                    .get("lock")
                    .map_err(|e| self.err("get", e))?
                    .and_then(|v| serde_json::from_slice(v.value()).ok());
                if let Some(holder) = &current {
                    let dead_here = holder.host == host && !process_alive(holder.pid);
                    if !dead_here {
                        return Err(StateError::Locked {
                            id: holder.id.clone(),
                            pid: holder.pid,
                            host: holder.host.clone(),
                            since_unix_ms: holder.since_unix_ms,
                            command: holder.command.clone(),
                        });
                    }
                }
                t.insert("lock", bytes.as_slice())
                    .map_err(|e| self.err("insert", e))?;
                current
            };
            tx.commit().map_err(|e| self.err("commit", e))?;
            Ok(previous)
        })?;
        Ok((mine, previous))
    }

    /// Releases the lock if `id` holds it. With `force`, any holder with that id is
    /// removed (`cairn force-unlock`).
    fn unlock(&self, id: &str) -> Result<(), StateError> {
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.err("begin", e))?;
            {
                let mut t = tx.open_table(META).map_err(|e| self.err("open table", e))?;
                let current: Option<LockInfo> = t
                    .get("lock")
                    .map_err(|e| self.err("get", e))?
                    .and_then(|v| serde_json::from_slice(v.value()).ok());
                match current {
                    Some(holder) if holder.id == id => {
                        t.remove("lock").map_err(|e| self.err("remove", e))?;
                    }
                    other => {
                        return Err(StateError::WrongLockId {
                            given: id.to_owned(),
                            current: other.map(|h| h.id),
                        });
                    }
                }
            }
            tx.commit().map_err(|e| self.err("commit", e))
        })
    }

    /// Records that an execution started (keyed by its execution id).
    fn start_execution(&self, record: &PlanRecord) -> Result<(), StateError> {
        self.put_execution(&record.execution_id, record)
    }

    /// The executions that did not finish (a crash), oldest first: only their plans
    /// are read (the heads table says which).
    fn unfinished_executions(&self) -> Result<Vec<(String, PlanRecord)>, StateError> {
        self.executions_where(
            |heads| {
                heads
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, head))| !head.finished)
                    .map(|(i, _)| i)
                    .collect()
            },
            record_id,
        )
    }

    /// The newest execution record: only its plan is parsed.
    fn last_execution(&self) -> Result<Option<(String, PlanRecord)>, StateError> {
        Ok(self.executions_where(newest, record_id)?.pop())
    }

    /// The newest execution, its steps counted and not built.
    fn last_execution_summary(&self) -> Result<Option<ExecutionSummary>, StateError> {
        Ok(self
            .executions_where(newest, |s: &mut ExecutionSummary| &mut s.execution_id)?
            .pop()
            .map(|(_, summary)| summary))
    }

    /// Every execution record, oldest first (the key is the execution id).
    fn executions(&self) -> Result<Vec<(String, PlanRecord)>, StateError> {
        self.executions_where(|heads| (0..heads.len()).collect(), record_id)
    }

    /// Marks an execution finished; `ended` says how when it did not run to its end.
    fn finish_execution(
        &self,
        execution_id: &str,
        ended: Option<String>,
    ) -> Result<(), StateError> {
        if let Some(mut record) = self.get_json::<PlanRecord>(PLANS, execution_id)? {
            record.finished = true;
            record.ended = ended;
            self.put_execution(execution_id, &record)?;
        }
        Ok(())
    }

    /// Writes one journal record (durably: redb commits are fsynced).
    fn journal(&self, execution_id: &str, record: &StepRecord) -> Result<(), StateError> {
        self.put_json(
            JOURNAL,
            &format!("{execution_id}/{:06}", record.step),
            record,
        )
    }

    /// Writes several journal records in one write transaction.
    fn journal_many(&self, execution_id: &str, records: &[StepRecord]) -> Result<(), StateError> {
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.err("begin", e))?;
            {
                let mut t = tx
                    .open_table(JOURNAL)
                    .map_err(|e| self.err("open table", e))?;
                for record in records {
                    let bytes = serde_json::to_vec(record).expect("state records serialize");
                    t.insert(
                        format!("{execution_id}/{:06}", record.step).as_str(),
                        bytes.as_slice(),
                    )
                    .map_err(|e| self.err("insert", e))?;
                }
            }
            tx.commit().map_err(|e| self.err("commit", e))
        })
    }

    /// The journal of one execution, by step.
    fn journal_of(&self, execution_id: &str) -> Result<Vec<StepRecord>, StateError> {
        let prefix = format!("{execution_id}/");
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err("begin", e))?;
            let t = tx
                .open_table(JOURNAL)
                .map_err(|e| self.err("open table", e))?;
            let mut out = vec![];
            for entry in t
                .range(prefix.as_str()..)
                .map_err(|e| self.err("range", e))?
            {
                let (k, v) = entry.map_err(|e| self.err("range", e))?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                let record: StepRecord =
                    serde_json::from_slice(v.value()).map_err(|source| StateError::Corrupt {
                        path: self.path.display().to_string(),
                        key: k.value().to_owned(),
                        source,
                    })?;
                out.push(record);
            }
            Ok(out)
        })
    }

    /// Appends to the audit log: chained and signed in one write transaction
    /// (`crate::audit::append`).
    fn audit(&self, event: &str, detail: serde_json::Value) -> Result<(), StateError> {
        self.audit_with(event, detail, |_, _| Ok(true)).map(|_| ())
    }

    fn commit_migration(
        &self,
        record: &crate::migrate::MigrationRecord,
        epochs: &[crate::epochs::EpochChange],
    ) -> Result<crate::migrate::Committed, StateError> {
        let mut moved = None;
        let detail = serde_json::to_value(record).expect("migration records serialize");
        let written = self.audit_with(crate::migrate::MIGRATION_EVENT, detail, |tx, path| {
            for change in epochs {
                let expected = Some(change.previous).filter(|e| *e > 0);
                if let crate::epochs::Swapped::Found(found) =
                    crate::epochs::swap_in(tx, path, expected, change)?
                {
                    moved = Some(crate::migrate::Committed::Moved {
                        volume: change.state.volume.clone(),
                        found,
                    });
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        Ok(match (written, moved) {
            (true, _) => crate::migrate::Committed::WithEpochs,
            (false, Some(moved)) => moved,
            (false, None) => unreachable!("only a moved epoch leaves the commit unwritten"),
        })
    }

    /// The audit log, oldest first (records that do not decode are left out;
    /// `crate::audit::verify` names them).
    fn audit_log(&self) -> Result<Vec<AuditEntry>, StateError> {
        Ok(self
            .audit_records()?
            .into_iter()
            .filter_map(|(_, bytes)| crate::audit::Record::decode(&bytes).entry())
            .collect())
    }

    fn recent_audit(&self, n: usize) -> Result<Vec<AuditEntry>, StateError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err("begin", e))?;
            let t = tx
                .open_table(AUDIT)
                .map_err(|e| self.err("open table", e))?;
            let mut out = vec![];
            for record in t.iter().map_err(|e| self.err("iter", e))?.rev() {
                if out.len() == n {
                    break;
                }
                let (_, bytes) = record.map_err(|e| self.err("iter", e))?;
                out.extend(crate::audit::brief::decode(bytes.value()));
            }
            out.reverse();
            Ok(out)
        })
    }

    /// Decodes only the audit entries whose bytes name a migration (every sync
    /// asks, for a committed one to finish; decoding the whole log each time grew
    /// with the cloud's history).
    fn migrations(&self) -> Result<Vec<crate::migrate::MigrationRecord>, StateError> {
        let needle = crate::migrate::MIGRATION_EVENT.as_bytes();
        let entries: Vec<AuditEntry> = self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err("begin", e))?;
            let t = tx
                .open_table(AUDIT)
                .map_err(|e| self.err("open table", e))?;
            let mut out = vec![];
            for entry in t.iter().map_err(|e| self.err("iter", e))? {
                let (_, v) = entry.map_err(|e| self.err("iter", e))?;
                let bytes = v.value();
                if bytes.windows(needle.len()).any(|w| w == needle)
                    && let Some(entry) = crate::audit::Record::decode(bytes).entry()
                {
                    out.push(entry);
                }
            }
            Ok(out)
        })?;
        Ok(crate::migrate::records_in(&entries))
    }
}

/// A random 16-hex-digit id.
pub fn random_id() -> String {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        bytes = (now_ms() ^ u64::from(std::process::id()) << 32).to_le_bytes();
    }
    proto::auth::to_hex(&bytes)
}

/// This host's name (lock holders are checked for liveness only on it).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// Whether a process with this pid exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state letter follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// The pids of the `cairn-vmm` processes whose `--config` file is under `dir` (the VMs
/// of the nodes whose data directories are there, wherever their process groups are).
pub fn vmms_under(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            let vmm = args.first().is_some_and(|program| {
                Path::new(program).file_name() == Some(std::ffi::OsStr::new("cairn-vmm"))
            });
            let ours = args
                .windows(2)
                .any(|pair| pair[0] == "--config" && Path::new(&pair[1]).starts_with(dir));
            (vmm && ours && pid > 1).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmms_under_a_directory_are_found_by_program_and_config() {
        use std::os::unix::process::CommandExt as _;
        let dir = std::env::temp_dir().join(format!("cairn-vmms-{}", random_id()));
        // `read` is a shell builtin: the shell waits on its stdin without forking. A
        // `sleep` there forked a copy of the shell, with the same command line until
        // it exec'd, and that copy was found too (once, on a loaded machine).
        let spawn = |program: &str, config: &std::path::Path| {
            std::process::Command::new("sh")
                .arg0(program)
                .args(["-c", "read -r _", "--config"])
                .arg(config)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut ours = spawn("/opt/cairn/cairn-vmm", &dir.join("n1/vms/a/vm-config.json"));
        let mut elsewhere = spawn(
            "/opt/cairn/cairn-vmm",
            Path::new("/elsewhere/vm-config.json"),
        );
        let mut not_a_vmm = spawn("/usr/bin/less", &dir.join("n1/vms/b/vm-config.json"));
        // Until a child has exec'd, /proc shows the test's own command line (CI saw
        // nothing found on a loaded machine).
        for child in [&ours, &elsewhere, &not_a_vmm] {
            let cmdline = format!("/proc/{}/cmdline", child.id());
            let deadline = Instant::now() + Duration::from_secs(10);
            while !std::fs::read(&cmdline).is_ok_and(|c| c.windows(8).any(|w| w == b"--config"))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let found = vmms_under(&dir);
        for child in [&mut ours, &mut elsewhere, &mut not_a_vmm] {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert_eq!(found, vec![ours.id() as i32]);
    }

    #[test]
    fn lock_refuses_a_live_holder_and_force_unlock_needs_the_id() {
        let dir = std::env::temp_dir().join(format!("cairn-state-{}", random_id()));
        let store = RedbStore::open(&dir.join("state.redb")).unwrap();
        let (mine, previous) = store.lock("cairn apply").unwrap();
        assert!(previous.is_none());
        let err = store.lock("cairn apply").unwrap_err();
        assert!(err.to_string().contains(&mine.id), "{err}");
        assert!(matches!(
            store.unlock("nope"),
            Err(StateError::WrongLockId { .. })
        ));
        store.unlock(&mine.id).unwrap();
        store.lock("again").unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_store_written_by_a_newer_cairn_is_refused_and_an_older_one_is_marked() {
        let dir = std::env::temp_dir().join(format!("cairn-state-{}", random_id()));
        let path = dir.join("state.redb");
        let store = RedbStore::open(&path).unwrap();
        store
            .put_json(META, "format_version", &(STATE_FORMAT_VERSION + 1))
            .unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(
            matches!(err, StateError::Newer { found, .. } if found == STATE_FORMAT_VERSION + 1)
        );
        assert!(
            err.to_string().contains("written by a newer cairn"),
            "{err}"
        );
        // A store of version 2 is read and marked; its placement (of another
        // shape) is dropped, to be rebuilt from the nodes.
        store.put_json(META, "format_version", &2u32).unwrap();
        store
            .put_json(META, "placement", &serde_json::json!({"vms": {"a": "n1"}}))
            .unwrap();
        let reopened = RedbStore::open(&path).unwrap();
        let marked: Option<u32> = reopened.get_json(META, "format_version").unwrap();
        assert_eq!(marked, Some(STATE_FORMAT_VERSION));
        assert!(reopened.placement().unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn executions_unfinished_and_the_last_parse_only_what_they_return() {
        let dir = std::env::temp_dir().join(format!("cairn-state-{}", random_id()));
        let store = RedbStore::open(&dir.join("state.redb")).unwrap();
        assert!(store.last_execution().unwrap().is_none());
        // Keys in another order than their starts; c and a start at the same time.
        for (id, started, finished) in [("b", 2, false), ("c", 3, true), ("a", 3, false)] {
            store
                .start_execution(&PlanRecord {
                    execution_id: id.into(),
                    plan: serde_json::json!({"plan_id": id, "steps": [{"finished": false}]}),
                    finished,
                    ended: None,
                    started_at_unix_ms: started,
                })
                .unwrap();
        }
        let ids = |records: Vec<(String, PlanRecord)>| -> Vec<String> {
            records.into_iter().map(|(key, _)| key).collect()
        };
        // Oldest first; equal starts in key order.
        assert_eq!(ids(store.executions().unwrap()), ["b", "a", "c"]);
        assert_eq!(ids(store.unfinished_executions().unwrap()), ["b", "a"]);
        let (key, last) = store.last_execution().unwrap().unwrap();
        assert_eq!((key.as_str(), last.finished), ("c", true));
        assert_eq!(last.plan["plan_id"], "c");
        let summary = store.last_execution_summary().unwrap().unwrap();
        assert_eq!(summary, ExecutionSummary::of(&last));
        assert_eq!(
            (summary.plan.plan_id.as_str(), summary.plan.steps),
            ("c", 1)
        );
        store
            .finish_execution("a", Some("superseded by c".into()))
            .unwrap();
        assert_eq!(ids(store.unfinished_executions().unwrap()), ["b"]);
        // A store of version 4 had no heads: they are made from the records when it
        // is opened, and only the unfinished ones are read from then on.
        let path = dir.join("state.redb");
        let unfinished =
            serde_json::json!({"plan": {}, "finished": false, "started_at_unix_ms": 1});
        store.put_json(PLANS, "e", &unfinished).unwrap();
        assert_eq!(ids(store.unfinished_executions().unwrap()), ["b"]);
        store.put_json(META, "format_version", &4u32).unwrap();
        let reopened = RedbStore::open(&path).unwrap();
        assert_eq!(ids(reopened.unfinished_executions().unwrap()), ["e", "b"]);
        assert_eq!(ids(reopened.executions().unwrap()), ["e", "b", "a", "c"]);
        // A record without its head fields is corrupt, named by its key.
        reopened
            .put_json(PLANS, "d", &serde_json::json!({"plan": {}}))
            .unwrap();
        reopened.put_json(META, "format_version", &4u32).unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("record `d`"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A store in a new temporary directory, its audit log signed by a new key.
    fn audited_store() -> (std::path::PathBuf, RedbStore) {
        let dir = std::env::temp_dir().join(format!("cairn-state-{}", random_id()));
        let store = RedbStore::open(&dir.join("state.redb"))
            .unwrap()
            .with_audit_key(
                proto::auth::Identity::generate().unwrap(),
                proto::anchor::SharedHead::default(),
            )
            .unwrap();
        (dir, store)
    }

    #[test]
    fn the_newest_audit_entries_are_read_from_the_end_in_brief() {
        let (dir, store) = audited_store();
        assert!(store.recent_audit(5).unwrap().is_empty());
        let steps: Vec<u32> = (0..120).collect();
        for n in 0..4 {
            store.audit("sync", serde_json::json!({"n": n})).unwrap();
        }
        store
            .audit("apply", serde_json::json!({"plan_id": "p", "steps": steps}))
            .unwrap();
        store.audit("sync", serde_json::json!({"n": 5})).unwrap();
        let whole = store.audit_log().unwrap();
        for n in [0, 1, 2, 5, 6, 9] {
            let want: Vec<AuditEntry> = whole[whole.len().saturating_sub(n)..]
                .iter()
                .cloned()
                .map(crate::audit::brief::abbreviate)
                .collect();
            assert_eq!(store.recent_audit(n).unwrap(), want, "newest {n}");
        }
        assert_eq!(
            store.recent_audit(2).unwrap()[0].detail,
            serde_json::json!({"plan_id": "p", "abbreviated": {"steps": 120}})
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn migrations_are_the_migration_entries_of_the_audit_log() {
        let (dir, store) = audited_store();
        let record = |vm: &str, phase: &str| crate::migrate::MigrationRecord {
            vm: vm.into(),
            from: "n1".into(),
            to: "n2".into(),
            phase: phase.into(),
            request_id: format!("e-1.{vm}"),
            at_unix_ms: 1,
            figures: None,
            error: String::new(),
            handover: vec![],
        };
        store.record_migration(&record("a", "started")).unwrap();
        // Other entries, one that mentions a migration without being one.
        store
            .audit("apply", serde_json::json!({"reason": "a live migration"}))
            .unwrap();
        store.record_migration(&record("a", "committed")).unwrap();
        store.audit("sync", serde_json::json!({"n": 1})).unwrap();
        let all = crate::migrate::records_in(&store.audit_log().unwrap());
        assert_eq!(all.len(), 2);
        assert_eq!(store.migrations().unwrap(), all);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn journal_and_audit_round_trip() {
        let (dir, store) = audited_store();
        for step in [2, 0, 1] {
            store
                .journal(
                    "p1",
                    &StepRecord {
                        step,
                        request_id: format!("p1/{step}"),
                        status: StepStatus::Succeeded,
                        replayed: false,
                        attempts: 1,
                        error: None,
                        at_unix_ms: 1,
                    },
                )
                .unwrap();
        }
        store
            .journal(
                "p2",
                &StepRecord {
                    step: 0,
                    request_id: "p2/0".into(),
                    status: StepStatus::Started,
                    replayed: false,
                    attempts: 1,
                    error: None,
                    at_unix_ms: 1,
                },
            )
            .unwrap();
        let steps: Vec<usize> = store
            .journal_of("p1")
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(steps, vec![0, 1, 2]);
        store
            .audit("apply", serde_json::json!({"plan": "p1"}))
            .unwrap();
        store
            .audit("apply", serde_json::json!({"plan": "p2"}))
            .unwrap();
        assert_eq!(store.audit_log().unwrap().len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
