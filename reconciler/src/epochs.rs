//! The volumes' epoch authority: the one place a volume's epoch, its one writer and
//! its in-sync set change (issue 15, "epochs as fencing").
//!
//! Kept in the state store (`state.redb`), two tables:
//! - `volume_epochs`: volume → [`VolumeEpoch`] (JSON), the current epoch;
//! - `volume_epoch_journal`: `VOLUME/EPOCH` (zero-padded) → [`EpochChange`] (JSON),
//!   written in the same transaction as the change it records.
//!
//! Every change is a compare-and-swap: the caller names the epoch it saw, the change is
//! refused ([`EpochError::Conflict`]) when the volume is at another, and it raises the
//! epoch by one. (With etcd this becomes a transaction on the key's revision.)
//!
//! The nodes learn an epoch only from a signed `SetVolumeEpoch` ([`install`]), sent to
//! every copy. [`react`] is the controller's half of the data-path protocol: from one
//! observation of the nodes, the writer reporting an in-sync copy it cannot write
//! (`awaiting_removal`: its writes are frozen) makes the authority remove that copy
//! under a new epoch; the writer reporting a copy `caught_up` makes it add the copy
//! back; every copy that reports an older epoch than the authority's gets the current
//! one installed (the copies other than the writer first, so the writer's next write
//! under the new epoch finds them ready).

use std::collections::BTreeSet;
use std::path::Path;

use proto::v1::{SetVolumeEpoch, VolumeRole, VolumeStatus};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::state::{RedbStore, StateError, now_ms};

const EPOCHS: TableDefinition<&str, &[u8]> = TableDefinition::new("volume_epochs");
const JOURNAL: TableDefinition<&str, &[u8]> = TableDefinition::new("volume_epoch_journal");

/// A volume's epoch as the authority holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEpoch {
    /// The volume.
    pub volume: String,
    /// At least 1; only grows.
    pub epoch: u64,
    /// The node that alone writes the volume at this epoch.
    pub writer: String,
    /// The nodes whose copies hold every acknowledged write (the writer included).
    pub in_sync: BTreeSet<String>,
    /// Every node holding a copy, in sync or not.
    pub copies: BTreeSet<String>,
    /// Nodes that do client I/O on the volume without a copy (they run a VM using it):
    /// installed with the epoch, served by the copies only under it.
    #[serde(default)]
    pub clients: BTreeSet<String>,
}

/// One journaled change of a volume's epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochChange {
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// The epoch before (0 when the authority adopted the volume).
    pub previous: u64,
    /// What changed ("adopted", "removed copy b", "added copy b", "writer a → b",
    /// "raised").
    pub change: String,
    /// Why (the observation that caused it).
    pub reason: String,
    /// The state after the change.
    pub state: VolumeEpoch,
}

/// Errors of the epoch authority.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Another change came first (compare-and-swap failed).
    #[error(
        "volume `{volume}` is at epoch {found}, not {expected}: another change came first; read it again"
    )]
    Conflict {
        /// The volume.
        volume: String,
        /// The epoch the caller saw.
        expected: u64,
        /// The epoch stored.
        found: u64,
    },
    /// The authority holds no epoch of the volume.
    #[error("the epoch authority holds no epoch of volume `{volume}`")]
    Unknown {
        /// The volume.
        volume: String,
    },
    /// The change would break an invariant.
    #[error("volume `{volume}` at epoch {epoch}: {why}")]
    Refused {
        /// The volume.
        volume: String,
        /// Its epoch.
        epoch: u64,
        /// What is wrong.
        why: String,
    },
}

fn redb_err<'p>(
    path: &'p Path,
    operation: &'static str,
) -> impl Fn(redb::Error) -> StateError + 'p {
    move |error| StateError::Redb {
        path: path.display().to_string(),
        operation,
        message: error.to_string(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    path: &Path,
    key: &str,
    bytes: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt {
        path: path.display().to_string(),
        key: key.to_string(),
        source,
    })
}

/// What [`EpochStore::swap_epoch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swapped {
    /// The new state and its journal record were stored, in one transaction.
    Stored,
    /// Nothing was written: the volume is at this epoch (`None`: it has none), not at
    /// the one expected.
    Found(Option<u64>),
}

/// Where the authority keeps the epochs and their journal: the data directory's
/// `state.redb` ([`RedbStore`], one controller) or etcd (`state_etcd::EtcdStore`,
/// shared by controller replicas, so a new leader holds its predecessor's epochs).
///
/// Every change goes through [`EpochStore::swap_epoch`], a compare-and-swap on the
/// volume's epoch: epochs only grow (each change raises it by at least one), so
/// comparing the epoch number compares the whole state.
pub trait EpochStore: Send + Sync {
    /// Where the epochs are (for messages).
    fn epoch_store_name(&self) -> String;
    /// The current epoch of a volume.
    fn epoch(&self, volume: &str) -> Result<Option<VolumeEpoch>, StateError>;
    /// Every volume's current epoch, by name.
    fn epochs(&self) -> Result<Vec<VolumeEpoch>, StateError>;
    /// The journal of a volume's changes, oldest first.
    fn epoch_journal(&self, volume: &str) -> Result<Vec<EpochChange>, StateError>;
    /// Stores `change.state` as its volume's epoch and journals `change` under
    /// `VOLUME/EPOCH`, both or neither, only when the volume is at `expected` (`None`:
    /// the authority holds no epoch of it yet).
    fn swap_epoch(
        &self,
        expected: Option<u64>,
        change: &EpochChange,
    ) -> Result<Swapped, StateError>;
}

/// The journal key of a volume's change to `epoch` (zero-padded: key order is epoch
/// order).
pub fn journal_key(volume: &str, epoch: u64) -> String {
    format!("{volume}/{epoch:020}")
}

impl EpochStore for RedbStore {
    fn epoch_store_name(&self) -> String {
        self.path().display().to_string()
    }

    fn epoch(&self, volume: &str) -> Result<Option<VolumeEpoch>, StateError> {
        // Read transactions: no commit, so no fsync (a migration reads the epochs of
        // its volumes while its guest is paused).
        self.with_database(|database, path| {
            let transaction = database
                .begin_read()
                .map_err(|e| redb_err(path, "begin")(e.into()))?;
            let Some(table) = read_table(&transaction, EPOCHS, path)? else {
                return Ok(None);
            };
            let value = table
                .get(volume)
                .map_err(|e| redb_err(path, "get")(e.into()))?;
            match value {
                Some(bytes) => Ok(Some(decode(path, volume, bytes.value())?)),
                None => Ok(None),
            }
        })
    }

    fn epochs(&self) -> Result<Vec<VolumeEpoch>, StateError> {
        self.with_database(|database, path| {
            let transaction = database
                .begin_read()
                .map_err(|e| redb_err(path, "begin")(e.into()))?;
            let mut out = Vec::new();
            let Some(table) = read_table(&transaction, EPOCHS, path)? else {
                return Ok(out);
            };
            for entry in table.iter().map_err(|e| redb_err(path, "iter")(e.into()))? {
                let (key, value) = entry.map_err(|e| redb_err(path, "iter")(e.into()))?;
                out.push(decode(path, key.value(), value.value())?);
            }
            Ok(out)
        })
    }

    fn epoch_journal(&self, volume: &str) -> Result<Vec<EpochChange>, StateError> {
        let prefix = format!("{volume}/");
        self.with_database(|database, path| {
            let transaction = database
                .begin_read()
                .map_err(|e| redb_err(path, "begin")(e.into()))?;
            let mut out = Vec::new();
            let Some(table) = read_table(&transaction, JOURNAL, path)? else {
                return Ok(out);
            };
            for entry in table
                .range(prefix.as_str()..)
                .map_err(|e| redb_err(path, "range")(e.into()))?
            {
                let (key, value) = entry.map_err(|e| redb_err(path, "range")(e.into()))?;
                if !key.value().starts_with(&prefix) {
                    break;
                }
                out.push(decode(path, key.value(), value.value())?);
            }
            Ok(out)
        })
    }

    fn swap_epoch(
        &self,
        expected: Option<u64>,
        change: &EpochChange,
    ) -> Result<Swapped, StateError> {
        self.with_database(|database, path| {
            let transaction = database
                .begin_write()
                .map_err(|e| redb_err(path, "begin")(e.into()))?;
            let swapped = swap_in(&transaction, path, expected, change)?;
            if swapped == Swapped::Stored {
                transaction
                    .commit()
                    .map_err(|e| redb_err(path, "commit")(e.into()))?;
            }
            Ok(swapped)
        })
    }
}

/// `table` in a read transaction; `None` when nothing created it yet.
fn read_table(
    transaction: &redb::ReadTransaction,
    table: TableDefinition<'static, &'static str, &'static [u8]>,
    path: &Path,
) -> Result<Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>, StateError> {
    match transaction.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(redb_err(path, "open table")(e.into())),
    }
}

/// [`EpochStore::swap_epoch`] inside `transaction` (the caller commits it, or drops it
/// when the volume is not at `expected`): also the migration commit point's, which
/// writes its record in the same transaction (`RedbStore::commit_migration`).
pub(crate) fn swap_in(
    transaction: &redb::WriteTransaction,
    path: &Path,
    expected: Option<u64>,
    change: &EpochChange,
) -> Result<Swapped, StateError> {
    let volume = change.state.volume.as_str();
    let mut epochs = transaction
        .open_table(EPOCHS)
        .map_err(|e| redb_err(path, "open table")(e.into()))?;
    let found = match epochs
        .get(volume)
        .map_err(|e| redb_err(path, "get")(e.into()))?
    {
        Some(bytes) => Some(decode::<VolumeEpoch>(path, volume, bytes.value())?.epoch),
        None => None,
    };
    if found != expected {
        return Ok(Swapped::Found(found));
    }
    let state_bytes = serde_json::to_vec(&change.state).expect("epochs serialize");
    epochs
        .insert(volume, state_bytes.as_slice())
        .map_err(|e| redb_err(path, "insert")(e.into()))?;
    let mut journal = transaction
        .open_table(JOURNAL)
        .map_err(|e| redb_err(path, "open table")(e.into()))?;
    let journal_bytes = serde_json::to_vec(change).expect("epochs serialize");
    journal
        .insert(
            journal_key(volume, change.state.epoch).as_str(),
            journal_bytes.as_slice(),
        )
        .map_err(|e| redb_err(path, "insert")(e.into()))?;
    Ok(Swapped::Stored)
}

/// The epoch authority over an [`EpochStore`].
#[derive(Clone, Copy)]
pub struct EpochAuthority<'a> {
    store: &'a dyn EpochStore,
}

impl std::fmt::Debug for EpochAuthority<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochAuthority")
            .field("store", &self.store.epoch_store_name())
            .finish()
    }
}

impl<'a> EpochAuthority<'a> {
    /// The authority kept in `store`.
    pub fn new(store: &'a dyn EpochStore) -> Self {
        Self { store }
    }

    /// The current epoch of a volume.
    pub fn get(&self, volume: &str) -> Result<Option<VolumeEpoch>, EpochError> {
        Ok(self.store.epoch(volume)?)
    }

    /// Every volume's current epoch, by name.
    pub fn all(&self) -> Result<Vec<VolumeEpoch>, EpochError> {
        Ok(self.store.epochs()?)
    }

    /// The journal of a volume's epoch changes, oldest first.
    pub fn journal(&self, volume: &str) -> Result<Vec<EpochChange>, EpochError> {
        Ok(self.store.epoch_journal(volume)?)
    }

    /// One journaled compare-and-swap: `change` edits the state read at `expected`
    /// (`None`: the volume has no epoch yet) and names what it did; the epoch goes up
    /// by one (to at least `floor + 1`). The store writes it only if the volume is
    /// still at `expected` (another authority, a controller replica that led before,
    /// may have changed it since it was read).
    fn change(
        &self,
        volume: &str,
        expected: Option<u64>,
        floor: u64,
        reason: &str,
        change: impl FnOnce(Option<VolumeEpoch>) -> Result<(VolumeEpoch, String), EpochError>,
    ) -> Result<VolumeEpoch, EpochError> {
        let current = self.store.epoch(volume)?;
        let found = current.as_ref().map(|state| state.epoch);
        if found != expected {
            return Err(conflict(volume, expected, found));
        }
        let previous = found.unwrap_or(0);
        let (mut next, what) = change(current)?;
        next.epoch = previous.max(floor) + 1;
        let record = EpochChange {
            at_unix_ms: now_ms(),
            previous,
            change: what,
            reason: reason.to_string(),
            state: next.clone(),
        };
        match self.store.swap_epoch(expected, &record)? {
            Swapped::Stored => Ok(next),
            Swapped::Found(found) => Err(conflict(volume, expected, found)),
        }
    }

    /// Takes over a volume the authority holds no epoch of: its writer, its copies and
    /// which of them are in sync, at an epoch above `floor` (the highest any copy
    /// reported), so every copy accepts it.
    pub fn adopt(
        &self,
        volume: &str,
        writer: &str,
        copies: &BTreeSet<String>,
        in_sync: &BTreeSet<String>,
        floor: u64,
        reason: &str,
    ) -> Result<VolumeEpoch, EpochError> {
        self.change(volume, None, floor, reason, |_| {
            let state = VolumeEpoch {
                volume: volume.to_string(),
                epoch: 0,
                writer: writer.to_string(),
                in_sync: in_sync.clone(),
                copies: copies.clone(),
                clients: BTreeSet::new(),
            };
            check(&state)?;
            Ok((state, "adopted".to_string()))
        })
    }

    fn edit(
        &self,
        volume: &str,
        expected: u64,
        reason: &str,
        edit: impl FnOnce(&mut VolumeEpoch) -> Result<String, String>,
    ) -> Result<VolumeEpoch, EpochError> {
        self.change(volume, Some(expected), 0, reason, |current| {
            let mut state = current.expect("the epoch was compared");
            let what = edit(&mut state).map_err(|why| EpochError::Refused {
                volume: volume.to_string(),
                epoch: expected,
                why,
            })?;
            check(&state)?;
            Ok((state, what))
        })
    }

    /// Raises the epoch with nothing else changed (fences every request of older ones).
    pub fn raise_epoch(
        &self,
        volume: &str,
        expected: u64,
        reason: &str,
    ) -> Result<VolumeEpoch, EpochError> {
        self.edit(volume, expected, reason, |_| Ok("raised".to_string()))
    }

    /// Makes `writer` (an in-sync copy) the volume's only writer.
    pub fn set_writer(
        &self,
        volume: &str,
        expected: u64,
        writer: &str,
        reason: &str,
    ) -> Result<VolumeEpoch, EpochError> {
        self.edit(volume, expected, reason, |state| {
            if !state.in_sync.contains(writer) {
                return Err(format!(
                    "node {writer} cannot become the writer: its copy is not in sync (in sync: {})",
                    join(&state.in_sync)
                ));
            }
            let what = format!("writer {} → {writer}", state.writer);
            state.writer = writer.to_string();
            Ok(what)
        })
    }

    /// Removes a failed copy from the in-sync set (never the writer's).
    pub fn remove_copy(
        &self,
        volume: &str,
        expected: u64,
        copy: &str,
        reason: &str,
    ) -> Result<VolumeEpoch, EpochError> {
        self.edit(volume, expected, reason, |state| {
            if copy == state.writer {
                return Err(format!(
                    "the writer's copy (node {copy}) cannot leave the in-sync set; set another writer first"
                ));
            }
            if !state.in_sync.remove(copy) {
                return Err(format!(
                    "node {copy} is not in the in-sync set ({})",
                    join(&state.in_sync)
                ));
            }
            Ok(format!("removed copy {copy}"))
        })
    }

    /// A failed node's copy leaves the in-sync set; if it was the writer's, `writer`
    /// (an in-sync copy on a live node) becomes the writer in the same change.
    pub fn fail_over(
        &self,
        volume: &str,
        expected: u64,
        failed: &BTreeSet<String>,
        writer: &str,
        reason: &str,
    ) -> Result<VolumeEpoch, EpochError> {
        self.edit(volume, expected, reason, |state| {
            if failed.contains(writer) || !state.in_sync.contains(writer) {
                return Err(format!(
                    "node {writer} cannot become the writer: its copy is not in sync on a live node (in sync: {}, failed: {})",
                    join(&state.in_sync),
                    join(failed)
                ));
            }
            let mut what = Vec::new();
            if state.writer != writer {
                what.push(format!("writer {} → {writer}", state.writer));
                state.writer = writer.to_string();
            }
            for node in failed {
                if state.in_sync.remove(node) {
                    what.push(format!("removed copy {node}"));
                }
            }
            Ok(what.join(", "))
        })
    }

    /// Sets the nodes that do client I/O on the volume without a copy (a VM runs there):
    /// a node dropped from the set is fenced by the new epoch.
    pub fn set_clients(
        &self,
        volume: &str,
        expected: u64,
        clients: &BTreeSet<String>,
        reason: &str,
    ) -> Result<VolumeEpoch, EpochError> {
        self.edit(volume, expected, reason, |state| {
            if let Some(copy) = clients.intersection(&state.copies).next() {
                return Err(format!(
                    "node {copy} holds a copy; only a node without one is a client"
                ));
            }
            let what = format!(
                "clients {{{}}} → {{{}}}",
                join(&state.clients),
                join(clients)
            );
            state.clients = clients.clone();
            Ok(what)
        })
    }

    /// Adds a copy that caught up back to the in-sync set.
    pub fn add_copy(
        &self,
        volume: &str,
        expected: u64,
        copy: &str,
        reason: &str,
    ) -> Result<VolumeEpoch, EpochError> {
        self.edit(volume, expected, reason, |state| {
            if !state.copies.contains(copy) {
                return Err(format!(
                    "node {copy} holds no copy of it (copies: {})",
                    join(&state.copies)
                ));
            }
            if !state.in_sync.insert(copy.to_string()) {
                return Err(format!("node {copy} is in the in-sync set already"));
            }
            Ok(format!("added copy {copy}"))
        })
    }
}

impl EpochAuthority<'_> {
    /// A new copy on `node` (rebuilt or moved there): one of the volume's copies from
    /// now on, outside the in-sync set. Its writer ships it every allocated byte
    /// (`AddVolumeCopy`) and reports it caught up; only then does [`react`] add it to
    /// the set. Installed on `node` too once its copy exists.
    pub fn new_copy(
        &self,
        volume: &str,
        expected: u64,
        node: &str,
        reason: &str,
    ) -> Result<VolumeEpoch, EpochError> {
        self.edit(volume, expected, reason, |state| {
            if state.clients.contains(node) {
                return Err(format!(
                    "node {node} is a client of it (a VM there uses it remotely); a copy there needs it out of the clients first"
                ));
            }
            if !state.copies.insert(node.to_string()) {
                return Err(format!(
                    "node {node} holds a copy already (copies: {})",
                    join(&state.copies)
                ));
            }
            Ok(format!("new copy {node}"))
        })
    }

    /// Forgets the copy on `node` entirely (lost with its node, or moved off it): it
    /// leaves the in-sync set too if it was there. Never the writer's.
    pub fn drop_copy(
        &self,
        volume: &str,
        expected: u64,
        node: &str,
        reason: &str,
    ) -> Result<VolumeEpoch, EpochError> {
        self.edit(volume, expected, reason, |state| {
            if node == state.writer {
                return Err(format!(
                    "the writer's copy (node {node}) cannot be dropped; set another writer first"
                ));
            }
            if !state.copies.remove(node) {
                return Err(format!(
                    "node {node} holds no copy of it (copies: {})",
                    join(&state.copies)
                ));
            }
            state.in_sync.remove(node);
            Ok(format!("dropped copy {node}"))
        })
    }
}

impl EpochAuthority<'_> {
    /// The change a live migration's commit point makes to `volume` (issue 17), from
    /// its current state, not written: a destination holding a copy (in sync) becomes
    /// the writer, else it becomes a client; the source leaves the clients. Returns
    /// the current state and, when anything changes, the change to the next epoch
    /// (one raise for both), which the commit writes as a compare-and-swap on the
    /// current epoch in the same transaction as its record
    /// (`StateStore::commit_migration`).
    pub fn migration_change(
        &self,
        volume: &str,
        from: &str,
        to: &str,
        reason: &str,
    ) -> Result<(VolumeEpoch, Option<EpochChange>), EpochError> {
        let current = self.get(volume)?.ok_or_else(|| EpochError::Unknown {
            volume: volume.to_string(),
        })?;
        let mut next = current.clone();
        let mut what = vec![];
        if next.copies.contains(to) && next.writer != to {
            if !next.in_sync.contains(to) {
                return Err(EpochError::Refused {
                    volume: volume.to_string(),
                    epoch: current.epoch,
                    why: format!(
                        "node {to} cannot become the writer: its copy is not in sync (in sync: {})",
                        join(&next.in_sync)
                    ),
                });
            }
            what.push(format!("writer {} → {to}", next.writer));
            next.writer = to.to_string();
        }
        let mut clients = next.clients.clone();
        clients.remove(from);
        if !next.copies.contains(to) {
            clients.insert(to.to_string());
        }
        if clients != next.clients {
            what.push(format!(
                "clients {{{}}} → {{{}}}",
                join(&next.clients),
                join(&clients)
            ));
            next.clients = clients;
        }
        if what.is_empty() {
            return Ok((current, None));
        }
        check(&next)?;
        next.epoch = current.epoch + 1;
        let change = EpochChange {
            at_unix_ms: now_ms(),
            previous: current.epoch,
            change: what.join(", "),
            reason: reason.to_string(),
            state: next,
        };
        Ok((current, Some(change)))
    }
}

/// The error of a compare-and-swap that found `found` where `expected` was.
fn conflict(volume: &str, expected: Option<u64>, found: Option<u64>) -> EpochError {
    match (expected, found) {
        (Some(_), None) => EpochError::Unknown {
            volume: volume.to_string(),
        },
        (expected, found) => EpochError::Conflict {
            volume: volume.to_string(),
            expected: expected.unwrap_or(0),
            found: found.unwrap_or(0),
        },
    }
}

fn join(names: &BTreeSet<String>) -> String {
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn check(state: &VolumeEpoch) -> Result<(), EpochError> {
    let refuse = |why: String| EpochError::Refused {
        volume: state.volume.clone(),
        epoch: state.epoch,
        why,
    };
    if !state.in_sync.contains(&state.writer) {
        return Err(refuse(format!(
            "the writer {} must be in the in-sync set ({})",
            state.writer,
            join(&state.in_sync)
        )));
    }
    if let Some(stranger) = state.in_sync.difference(&state.copies).next() {
        return Err(refuse(format!(
            "the in-sync set names node {stranger}, which holds no copy (copies: {})",
            join(&state.copies)
        )));
    }
    Ok(())
}

/// The `SetVolumeEpoch` that installs `state` on a copy.
pub fn install(state: &VolumeEpoch) -> SetVolumeEpoch {
    SetVolumeEpoch {
        name: state.volume.clone(),
        epoch: state.epoch,
        writer: state.writer.clone(),
        in_sync: state.in_sync.iter().cloned().collect(),
        clients: state.clients.iter().cloned().collect(),
    }
}

/// The request id of installing `state` on `node`: the same epoch on the same node is
/// the same action (its recorded outcome is returned when it is sent again).
pub fn request_id(state: &VolumeEpoch, node: &str) -> String {
    format!("epoch.{}.{}.{node}", state.volume, state.epoch)
}

/// One `SetVolumeEpoch` for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    /// The node holding the copy.
    pub node: String,
    /// Its request id ([`request_id`]).
    pub request_id: String,
    /// What to install.
    pub request: SetVolumeEpoch,
}

/// What the authority decided from one observation.
#[derive(Debug, Default)]
pub struct Reaction {
    /// Epoch changes made (journaled).
    pub changes: Vec<VolumeEpoch>,
    /// Installs to send, copies other than the writer first.
    pub installs: Vec<Install>,
}

/// The authority's reaction to one observation: `observed` is each reachable node's
/// name with its volume statuses (unreachable nodes are absent).
pub fn react(
    authority: &EpochAuthority<'_>,
    observed: &[(String, Vec<VolumeStatus>)],
) -> Result<Reaction, EpochError> {
    let mut reaction = Reaction::default();
    let mut volumes: BTreeSet<&str> = BTreeSet::new();
    for (_, statuses) in observed {
        volumes.extend(statuses.iter().map(|status| status.name.as_str()));
    }
    // One read of every epoch, not one per volume (a round trip each with etcd); a
    // change made since is caught by the compare-and-swap of the next change.
    let mut known: std::collections::BTreeMap<String, VolumeEpoch> = authority
        .all()?
        .into_iter()
        .map(|state| (state.volume.clone(), state))
        .collect();
    for volume in volumes {
        let copies: Vec<(&str, &VolumeStatus)> = observed
            .iter()
            .filter_map(|(node, statuses)| {
                statuses
                    .iter()
                    .find(|status| status.name == volume)
                    .map(|status| (node.as_str(), status))
            })
            .collect();
        let primary = copies
            .iter()
            .find(|(_, status)| status.role == VolumeRole::Primary as i32);
        let mut state = match known.remove(volume) {
            Some(state) => state,
            None => {
                // Only a writer's report says which copies exist.
                let Some((node, status)) = primary else {
                    continue;
                };
                let all: BTreeSet<String> = std::iter::once(node.to_string())
                    .chain(status.replica_peers.iter().cloned())
                    .collect();
                let in_sync: BTreeSet<String> = if status.in_sync.is_empty() {
                    all.clone()
                } else {
                    status.in_sync.iter().cloned().collect()
                };
                let floor = copies.iter().map(|(_, s)| s.epoch).max().unwrap_or(0);
                let writer = if status.epoch_writer.is_empty() {
                    node.to_string()
                } else {
                    status.epoch_writer.clone()
                };
                let state = authority.adopt(
                    volume,
                    &writer,
                    &all,
                    &in_sync,
                    floor,
                    &format!("first seen on node {node}"),
                )?;
                reaction.changes.push(state.clone());
                state
            }
        };
        // The writer's report counts only when made at the authority's epoch: an
        // older one may name a copy the authority has handled since.
        if let Some((node, status)) = copies
            .iter()
            .find(|(node, _)| *node == state.writer)
            .filter(|(_, status)| status.epoch == state.epoch)
        {
            for failed in &status.awaiting_removal {
                if state.in_sync.contains(failed) && *failed != state.writer {
                    state = authority.remove_copy(
                        volume,
                        state.epoch,
                        failed,
                        &format!("writer {node} cannot write it and froze its writes"),
                    )?;
                    reaction.changes.push(state.clone());
                }
            }
            for back in &status.caught_up {
                if !state.in_sync.contains(back) && state.copies.contains(back) {
                    state = authority.add_copy(
                        volume,
                        state.epoch,
                        back,
                        &format!("writer {node} reports it caught up"),
                    )?;
                    reaction.changes.push(state.clone());
                }
            }
        }
        let mut behind: Vec<&str> = copies
            .iter()
            .filter(|(node, status)| status.epoch < state.epoch && state.copies.contains(*node))
            .map(|(node, _)| *node)
            .collect();
        behind.sort_by_key(|node| *node == state.writer);
        for node in behind {
            reaction.installs.push(Install {
                node: node.to_string(),
                request_id: request_id(&state, node),
                request: install(&state),
            });
        }
    }
    Ok(reaction)
}

/// The nodes' volume statuses as [`react`] takes them, from the controller's
/// observation (unreachable nodes are left out).
pub fn statuses_of(observed: &crate::observe::Observed) -> Vec<(String, Vec<VolumeStatus>)> {
    use crate::observe::NodeObservation;
    observed
        .nodes
        .iter()
        .filter_map(|(node, observation)| match observation {
            NodeObservation::Reachable { volumes, .. } => Some((
                node.clone(),
                volumes
                    .values()
                    .map(|volume| {
                        let epoch = volume.epoch.clone().unwrap_or_default();
                        VolumeStatus {
                            name: volume.name.clone(),
                            role: volume.role as i32,
                            replica_peers: volume.replica_peers.clone(),
                            primary: volume.primary.clone(),
                            epoch: epoch.epoch,
                            epoch_writer: epoch.writer,
                            in_sync: epoch.in_sync,
                            awaiting_removal: epoch.awaiting_removal,
                            caught_up: epoch.caught_up,
                            ..Default::default()
                        }
                    })
                    .collect(),
            )),
            NodeObservation::Unreachable { .. } => None,
        })
        .collect()
}

/// A volume that lost every in-sync copy with its failed nodes: it gets no new writer
/// (a stale copy is never promoted) and its VM is not restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// The volume.
    pub volume: String,
    /// Why.
    pub why: String,
}

/// The authority's reaction to failed nodes: every volume whose writer is on a failed
/// node gets a new writer from its in-sync copies on live nodes (one that reported
/// the volume at the current epoch first), and the failed nodes' copies leave the
/// in-sync set, under a new epoch installed on every reachable copy (the writer
/// last). Called before any VM of those volumes is restarted, so a stale writer that
/// wakes up is refused by every copy.
pub fn fail_over(
    authority: &EpochAuthority<'_>,
    observed: &[(String, Vec<VolumeStatus>)],
    failed: &BTreeSet<String>,
) -> Result<(Reaction, Vec<Unavailable>), EpochError> {
    fail_over_avoiding(authority, observed, failed, &BTreeSet::new())
}

/// [`fail_over`], never choosing a new writer on a node of `maintenance` (a node in
/// maintenance takes no new VM, and an HA VM with disks restarts on its first disk's
/// writer): a volume whose only other in-sync copies are there gets no new writer
/// and is reported unavailable, saying so, until one of them leaves maintenance.
pub fn fail_over_avoiding(
    authority: &EpochAuthority<'_>,
    observed: &[(String, Vec<VolumeStatus>)],
    failed: &BTreeSet<String>,
    maintenance: &BTreeSet<String>,
) -> Result<(Reaction, Vec<Unavailable>), EpochError> {
    let mut reaction = Reaction::default();
    let mut unavailable = Vec::new();
    if failed.is_empty() {
        return Ok((reaction, unavailable));
    }
    let reports = |volume: &str, node: &str| -> Option<u64> {
        observed
            .iter()
            .find(|(name, _)| name == node)
            .and_then(|(_, statuses)| statuses.iter().find(|status| status.name == volume))
            .map(|status| status.epoch)
    };
    for state in authority.all()? {
        if state.in_sync.is_disjoint(failed) {
            continue;
        }
        let writer = if failed.contains(&state.writer) {
            let mut candidates: Vec<&String> = state
                .in_sync
                .iter()
                .filter(|node| !failed.contains(*node))
                .filter(|node| reports(&state.volume, node).is_some())
                .collect();
            candidates.sort_by_key(|node| reports(&state.volume, node) != Some(state.epoch));
            let closed: Vec<&String> = candidates
                .iter()
                .copied()
                .filter(|node| maintenance.contains(*node))
                .collect();
            candidates.retain(|node| !maintenance.contains(*node));
            match candidates.first() {
                Some(node) => (*node).clone(),
                None if !closed.is_empty() => {
                    let closed: BTreeSet<String> = closed.into_iter().cloned().collect();
                    unavailable.push(Unavailable {
                        volume: state.volume.clone(),
                        why: format!(
                            "its writer {} failed and its other in-sync copies are on nodes in maintenance ({}), where no new writer is chosen; `cairn node maintenance NODE --off` (or `maintenance=#false` in the spec) lets one take over",
                            state.writer,
                            join(&closed)
                        ),
                    });
                    continue;
                }
                None => {
                    unavailable.push(Unavailable {
                        volume: state.volume.clone(),
                        why: format!(
                            "its writer {} failed and no other in-sync copy is on a reachable node (in sync at epoch {}: {})",
                            state.writer,
                            state.epoch,
                            join(&state.in_sync)
                        ),
                    });
                    continue;
                }
            }
        } else {
            state.writer.clone()
        };
        let failed_here: Vec<&String> = state.in_sync.intersection(failed).collect();
        let next = authority.fail_over(
            &state.volume,
            state.epoch,
            failed,
            &writer,
            &format!(
                "node(s) {} failed",
                failed_here
                    .iter()
                    .map(|node| node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )?;
        let mut nodes: Vec<&str> = next
            .copies
            .iter()
            .chain(next.clients.iter())
            .filter(|node| !failed.contains(*node))
            .filter(|node| reports(&next.volume, node).is_some() || next.clients.contains(*node))
            .map(|node| node.as_str())
            .collect();
        nodes.sort_by_key(|node| *node == next.writer);
        for node in nodes {
            reaction.installs.push(Install {
                node: node.to_string(),
                request_id: request_id(&next, node),
                request: install(&next),
            });
        }
        reaction.changes.push(next);
    }
    Ok((reaction, unavailable))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new() -> Self {
            Self(std::env::temp_dir().join(format!("cairn-epochs-{}", crate::state::random_id())))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    fn status(name: &str, role: VolumeRole, epoch: u64) -> VolumeStatus {
        VolumeStatus {
            name: name.into(),
            role: role as i32,
            epoch,
            ..Default::default()
        }
    }

    #[test]
    fn changes_are_journaled_compare_and_swaps_that_raise_the_epoch() {
        let dir = TempDir::new();
        let store = RedbStore::open(&dir.0.join("state.redb")).unwrap();
        let authority = EpochAuthority::new(&store);
        let all = names(&["a", "b", "c"]);
        let first = authority.adopt("vol", "a", &all, &all, 0, "test").unwrap();
        assert_eq!(first.epoch, 1);
        let removed = authority.remove_copy("vol", 1, "c", "c failed").unwrap();
        assert_eq!(
            (removed.epoch, removed.in_sync.clone()),
            (2, names(&["a", "b"]))
        );
        // A change made on a stale read is refused, naming both epochs.
        let conflict = authority.remove_copy("vol", 1, "b", "late").unwrap_err();
        assert_eq!(
            conflict.to_string(),
            "volume `vol` is at epoch 2, not 1: another change came first; read it again"
        );
        let refused = authority.remove_copy("vol", 2, "a", "x").unwrap_err();
        assert!(
            refused.to_string().contains("the writer's copy (node a)"),
            "{refused}"
        );
        let refused = authority.set_writer("vol", 2, "c", "x").unwrap_err();
        assert!(refused.to_string().contains("not in sync"), "{refused}");
        let moved = authority.set_writer("vol", 2, "b", "a failed").unwrap();
        assert_eq!((moved.epoch, moved.writer.as_str()), (3, "b"));
        let back = authority.add_copy("vol", 3, "c", "caught up").unwrap();
        assert_eq!((back.epoch, back.in_sync.clone()), (4, all.clone()));
        let raised = authority.raise_epoch("vol", 4, "fence").unwrap();
        assert_eq!(raised.epoch, 5);
        // Kept across opens, with every change journaled in order.
        drop(store);
        let store = RedbStore::open(&dir.0.join("state.redb")).unwrap();
        let authority = EpochAuthority::new(&store);
        assert_eq!(authority.get("vol").unwrap(), Some(raised));
        let journal: Vec<(u64, String)> = authority
            .journal("vol")
            .unwrap()
            .into_iter()
            .map(|change| (change.state.epoch, change.change))
            .collect();
        assert_eq!(
            journal,
            vec![
                (1, "adopted".to_string()),
                (2, "removed copy c".to_string()),
                (3, "writer a → b".to_string()),
                (4, "added copy c".to_string()),
                (5, "raised".to_string()),
            ]
        );
        assert!(authority.get("other").unwrap().is_none());
    }

    #[test]
    fn a_new_writer_is_never_chosen_on_a_node_in_maintenance() {
        let dir = TempDir::new();
        let store = RedbStore::open(&dir.0.join("state.redb")).unwrap();
        let authority = EpochAuthority::new(&store);
        let abc = names(&["a", "b", "c"]);
        authority.adopt("v1", "a", &abc, &abc, 0, "test").unwrap();
        let ab = names(&["a", "b"]);
        authority.adopt("v2", "a", &ab, &ab, 0, "test").unwrap();
        // b is the first candidate by name; with b in maintenance, c takes v1.
        let observed = vec![
            (
                "b".to_string(),
                vec![
                    status("v1", VolumeRole::Replica, 1),
                    status("v2", VolumeRole::Replica, 1),
                ],
            ),
            ("c".to_string(), vec![status("v1", VolumeRole::Replica, 1)]),
        ];
        let (plain, _) = fail_over(&authority, &observed, &names(&["a"])).unwrap();
        let b = |v: &str| (v.to_owned(), "b".to_owned());
        assert_eq!(
            writers(&plain),
            vec![b("v1"), b("v2")],
            "without maintenance, b"
        );
        let dir = TempDir::new();
        let store = RedbStore::open(&dir.0.join("state.redb")).unwrap();
        let authority = EpochAuthority::new(&store);
        authority.adopt("v1", "a", &abc, &abc, 0, "test").unwrap();
        authority.adopt("v2", "a", &ab, &ab, 0, "test").unwrap();
        let (reaction, unavailable) =
            fail_over_avoiding(&authority, &observed, &names(&["a"]), &names(&["b"])).unwrap();
        assert_eq!(writers(&reaction), vec![("v1".to_owned(), "c".to_owned())]);
        // v2's only other copy is on b: no writer, reported, nothing raised.
        assert_eq!(unavailable.len(), 1);
        assert_eq!(unavailable[0].volume, "v2");
        assert!(
            unavailable[0].why.contains("nodes in maintenance (b)")
                && unavailable[0].why.contains("--off"),
            "{}",
            unavailable[0].why
        );
        assert_eq!(authority.get("v2").unwrap().unwrap().writer, "a");
    }

    fn writers(reaction: &Reaction) -> Vec<(String, String)> {
        reaction
            .changes
            .iter()
            .map(|c| (c.volume.clone(), c.writer.clone()))
            .collect()
    }

    #[test]
    fn a_new_copy_joins_the_copies_outside_the_in_sync_set_and_a_lost_one_is_dropped() {
        let dir = TempDir::new();
        let store = RedbStore::open(&dir.0.join("state.redb")).unwrap();
        let authority = EpochAuthority::new(&store);
        let ab = names(&["a", "b"]);
        authority.adopt("vol", "a", &ab, &ab, 0, "test").unwrap();
        let lost = authority
            .fail_over("vol", 1, &names(&["b"]), "a", "b failed")
            .unwrap();
        let new = authority.new_copy("vol", 2, "c", "b lost").unwrap();
        assert_eq!(
            (new.epoch, new.copies.clone(), new.in_sync.clone()),
            (3, names(&["a", "b", "c"]), names(&["a"]))
        );
        let twice = authority.new_copy("vol", 3, "c", "again").unwrap_err();
        assert!(
            twice.to_string().contains("holds a copy already"),
            "{twice}"
        );
        let writer = authority.drop_copy("vol", 3, "a", "x").unwrap_err();
        assert!(
            writer.to_string().contains("the writer's copy (node a)"),
            "{writer}"
        );
        let dropped = authority.drop_copy("vol", 3, "b", "b lost").unwrap();
        assert_eq!(
            (
                dropped.epoch,
                dropped.copies.clone(),
                dropped.in_sync.clone()
            ),
            (4, names(&["a", "c"]), names(&["a"]))
        );
        let none = authority.drop_copy("vol", 4, "b", "again").unwrap_err();
        assert!(none.to_string().contains("holds no copy"), "{none}");
        let back = authority.add_copy("vol", 4, "c", "caught up").unwrap();
        assert_eq!(back.in_sync, names(&["a", "c"]));
        assert_eq!(lost.in_sync, names(&["a"]));
        let journal: Vec<String> = authority
            .journal("vol")
            .unwrap()
            .into_iter()
            .map(|change| change.change)
            .collect();
        assert_eq!(
            journal[2..],
            ["new copy c", "dropped copy b", "added copy c"].map(String::from)
        );
    }

    #[test]
    fn react_removes_a_copy_the_frozen_writer_reports_and_installs_everywhere_writer_last() {
        let dir = TempDir::new();
        let store = RedbStore::open(&dir.0.join("state.redb")).unwrap();
        let authority = EpochAuthority::new(&store);
        let mut primary = status("vol", VolumeRole::Primary, 0);
        primary.replica_peers = vec!["b".into(), "c".into()];
        let observed = vec![
            ("a".to_string(), vec![primary.clone()]),
            ("b".to_string(), vec![status("vol", VolumeRole::Replica, 0)]),
            ("c".to_string(), vec![status("vol", VolumeRole::Replica, 0)]),
        ];
        let first = react(&authority, &observed).unwrap();
        assert_eq!(first.changes.len(), 1);
        let order: Vec<&str> = first.installs.iter().map(|i| i.node.as_str()).collect();
        assert_eq!(order, vec!["b", "c", "a"]);
        assert_eq!(first.installs[0].request_id, "epoch.vol.1.b");

        // c died; the writer (now at epoch 1) froze and says so.
        primary.epoch = 1;
        primary.awaiting_removal = vec!["c".into()];
        let observed = vec![
            ("a".to_string(), vec![primary.clone()]),
            ("b".to_string(), vec![status("vol", VolumeRole::Replica, 1)]),
        ];
        let second = react(&authority, &observed).unwrap();
        assert_eq!(second.changes.len(), 1);
        assert_eq!(second.changes[0].in_sync, names(&["a", "b"]));
        let order: Vec<&str> = second.installs.iter().map(|i| i.node.as_str()).collect();
        assert_eq!(order, vec!["b", "a"]);
        assert_eq!(second.installs[1].request.epoch, 2);

        // A report of an older epoch changes nothing (c is handled already).
        let third = react(&authority, &observed).unwrap();
        assert!(third.changes.is_empty());

        // c is back (at epoch 1) and caught up: installed, then added.
        primary.epoch = 2;
        primary.awaiting_removal.clear();
        let observed = vec![
            ("a".to_string(), vec![primary.clone()]),
            ("b".to_string(), vec![status("vol", VolumeRole::Replica, 2)]),
            ("c".to_string(), vec![status("vol", VolumeRole::Replica, 1)]),
        ];
        let fourth = react(&authority, &observed).unwrap();
        assert!(fourth.changes.is_empty());
        assert_eq!(fourth.installs.len(), 1);
        assert_eq!(fourth.installs[0].node, "c");
        primary.caught_up = vec!["c".into()];
        let observed = vec![
            ("a".to_string(), vec![primary]),
            ("b".to_string(), vec![status("vol", VolumeRole::Replica, 2)]),
            ("c".to_string(), vec![status("vol", VolumeRole::Replica, 2)]),
        ];
        let fifth = react(&authority, &observed).unwrap();
        assert_eq!(fifth.changes[0].in_sync, names(&["a", "b", "c"]));
        assert_eq!(fifth.changes[0].epoch, 3);
        assert_eq!(fifth.installs.len(), 3);
    }
}
