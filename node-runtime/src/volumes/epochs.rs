//! Volume epochs on the node: fencing, the frozen writer and copies catching up.
//!
//! The controller is the only authority over a volume's epoch, its one writer and its
//! in-sync set; it installs them on every copy with a signed `SetVolumeEpoch`. Each
//! copy keeps the highest epoch it was told (`volume_epochs` in node.redb) and:
//! - refuses a `ReplicaWrite` (resynchronisation included) under an older epoch (the
//!   writer was fenced) or a newer one (not installed here yet), and one from any node
//!   but the epoch's writer;
//! - refuses `SetVolumeEpoch` of an older epoch;
//! - serves no reads while it is outside its epoch's in-sync set (it may be stale:
//!   checksums prove a copy consistent, not current);
//! - accepts no `WriteVolume` unless it is the epoch's writer.
//!
//! The writer acknowledges a write only when every copy of the in-sync set holds it.
//! When an in-sync copy fails, the writer keeps the write's intent and *freezes*: the
//! write (and every later one, queued behind it) waits, retrying the copy, until the
//! controller installs a new epoch without it (seen in Observe: `awaiting_removal`),
//! or the copy answers again, or the freeze bound passes (then the write fails
//! `UNAVAILABLE`, unacknowledged; the next write freezes again). It never shrinks the
//! set by itself. Every write while a copy is outside the in-sync set is recorded as
//! that copy's dirty region (`VOLUME@NODE/OFFSET/LENGTH` in `write_intents`), and so is
//! every region an intent covered when the copy left the set (writes in flight when it
//! failed). The background pass ships the union of a returning copy's dirty regions
//! (merged, so overlapping writes travel once) from the writer, under the current
//! epoch, then keeps writing to it ("caught up"); the controller adds it back under a
//! new epoch when Observe reports it in `caught_up`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use proto::v1::{self, Health};
use redb::Durability;
use tonic::Status;

use super::{
    ReplicationCaller, VolumeEntry, Volumes, blocking, parse_intent_key, peer_failure,
    records_status, sessions,
};
use crate::records::{Peer, VolumeEpochRecord};
use crate::validate;

/// How long a frozen write waits for the controller (or the failed copy) by default:
/// Linux's default SCSI command timeout, so a guest sees the same bound as on a SAN.
pub const DEFAULT_FREEZE: Duration = Duration::from_secs(30);

/// Environment variable overriding [`DEFAULT_FREEZE`], in milliseconds.
pub const FREEZE_ENV: &str = "CAIRN_VOLUME_FREEZE_MS";

/// How often a frozen writer retries the failed copy.
const RETRY: Duration = Duration::from_millis(200);

/// The least time a peer is given to answer one write, even past a frozen write's
/// deadline (one last attempt).
const MIN_ATTEMPT: Duration = Duration::from_millis(500);

/// How long a copy catching up is given to answer each piece.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// The time a peer is given to answer a write that must be done by `deadline`: a peer
/// that stopped (SIGSTOP, a dropped link) must not hold the writer past its bound.
pub fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(MIN_ATTEMPT)
}

/// Marks a refusal because the caller's epoch is older than the copy's. The writer that
/// hears it freezes like for a failed copy, but names no copy for removal: either the
/// controller's newer epoch reaches it too (installs go to the other copies first) and
/// it goes on, or that epoch names another writer and its writes are refused from then
/// on, or its bound passes; it acknowledges nothing meanwhile.
pub const FENCED: &str = "is fenced";

/// A volume's epoch as this copy knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochState {
    /// 0 until the controller installed one.
    pub epoch: u64,
    /// Empty at epoch 0 (the primary writes).
    pub writer: String,
    /// Empty at epoch 0 (every copy is in sync).
    pub in_sync: Vec<String>,
    /// Nodes doing client I/O without a copy (`clients.rs`).
    pub clients: Vec<String>,
}

impl EpochState {
    pub fn from_record(record: &VolumeEpochRecord) -> Self {
        Self {
            epoch: record.epoch,
            writer: record.writer.clone(),
            in_sync: record.in_sync.clone(),
            clients: record.clients.clone(),
        }
    }

    /// Whether the copy on `node` is in sync at this epoch.
    pub fn in_sync(&self, node: &str) -> bool {
        self.in_sync.is_empty() || self.in_sync.iter().any(|name| name == node)
    }

    /// "epoch 5 (writer a, in sync: a, b)".
    pub fn describe(&self) -> String {
        if self.epoch == 0 {
            return "epoch 0 (before the controller set one: the primary writes, every copy in sync)".into();
        }
        format!(
            "epoch {} (writer {}, in sync: {})",
            self.epoch,
            self.writer,
            self.in_sync.join(", ")
        )
    }
}

/// What only the writer keeps, in memory.
#[derive(Debug, Default)]
pub struct WriterState {
    /// In-sync copies that failed; writes are frozen until the controller removes them.
    pub awaiting_removal: BTreeSet<String>,
    /// Copies outside the in-sync set that hold every write now.
    pub caught_up: BTreeSet<String>,
    /// This copy became the writer and has not reconciled the in-sync copies yet
    /// (`promotion.rs`): no write goes out before it has.
    pub reconcile_pending: bool,
}

/// The intent key of a dirty region of the copy on `node`.
pub fn dirty_key(volume: &str, node: &str, offset: u64, length: u64) -> String {
    format!("{volume}@{node}/{offset:020}/{length:010}")
}

/// The prefix of every dirty region of the copy on `node` (names hold no `@`).
pub fn dirty_prefix(volume: &str, node: &str) -> String {
    format!("{volume}@{node}/")
}

/// Sorted, merged byte ranges `(offset, length)`, each at most `max` long.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>, max: u64) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (offset, length) in ranges {
        match merged.last_mut() {
            Some((start, len)) if offset <= *start + *len => {
                *len = (*len).max(offset + length - *start);
            }
            _ => merged.push((offset, length)),
        }
    }
    let mut out = Vec::new();
    for (mut offset, mut length) in merged {
        while length > 0 {
            let piece = length.min(max);
            out.push((offset, piece));
            offset += piece;
            length -= piece;
        }
    }
    out
}

/// The freeze bound from the environment, else [`DEFAULT_FREEZE`].
pub fn freeze_bound() -> Duration {
    std::env::var(FREEZE_ENV)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_FREEZE)
}

impl VolumeEntry {
    pub(super) fn epoch(&self) -> EpochState {
        self.epoch.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn writer_state(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.writer_state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Volumes {
    /// Installs an epoch the controller signed (`SetVolumeEpoch`) on this copy.
    pub async fn set_epoch(&self, request: &v1::SetVolumeEpoch) -> Result<(), Status> {
        validate::name("set_volume_epoch.name", &request.name)?;
        if request.epoch == 0 {
            return Err(validate::invalid(
                "set_volume_epoch.epoch",
                "must be at least 1 (0 is the epoch before the controller sets one)",
            ));
        }
        validate::name("set_volume_epoch.writer", &request.writer)?;
        for (index, node) in request.in_sync.iter().enumerate() {
            validate::name(&format!("set_volume_epoch.in_sync[{index}]"), node)?;
        }
        super::clients::validate_clients(request)?;
        if !request.in_sync.contains(&request.writer) {
            return Err(validate::invalid(
                "set_volume_epoch.in_sync",
                format!(
                    "must name the writer {} (the writer holds every acknowledged write)",
                    request.writer
                ),
            ));
        }
        let entry = self.entry(&request.name).await?;
        self.learn_copies(&entry, &request.in_sync)?;
        let copies = self.copy_names(&entry);
        if let Some(stranger) = request
            .in_sync
            .iter()
            .find(|node| !copies.contains(node.as_str()))
        {
            return Err(Status::failed_precondition(format!(
                "volume `{}` on node {}: the in-sync set of epoch {} names node {stranger}, which holds no copy of it (copies: {})",
                request.name,
                self.node_name,
                request.epoch,
                copies.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        // On a replica, a write under the old epoch that is being applied finishes
        // first; none starts after this returns. (The writer's own lock may be held by
        // a frozen write waiting for exactly this epoch, so it is not taken there.)
        let _guard = if self.is_writer(&entry) {
            None
        } else {
            Some(entry.write_lock.lock().await)
        };
        let current = entry.epoch();
        let wanted = EpochState {
            epoch: request.epoch,
            writer: request.writer.clone(),
            in_sync: request.in_sync.clone(),
            clients: request.clients.clone(),
        };
        if request.epoch < current.epoch {
            return Err(Status::failed_precondition(format!(
                "volume `{}` on node {}: epoch {} (writer {}) is older than {} this copy holds; refusing it",
                request.name,
                self.node_name,
                request.epoch,
                request.writer,
                current.describe()
            )));
        }
        if request.epoch == current.epoch {
            if current == wanted {
                return Ok(());
            }
            return Err(Status::failed_precondition(format!(
                "volume `{}` on node {}: this copy holds {}, and the request gives epoch {} another writer or in-sync set (writer {}, in sync: {}); a change needs a new epoch",
                request.name,
                self.node_name,
                current.describe(),
                request.epoch,
                request.writer,
                request.in_sync.join(", ")
            )));
        }
        let record = VolumeEpochRecord {
            version: VolumeEpochRecord::VERSION,
            epoch: request.epoch,
            writer: request.writer.clone(),
            in_sync: request.in_sync.clone(),
            clients: request.clients.clone(),
            last_in_sync_writer: if wanted.in_sync(&self.node_name) {
                request.writer.clone()
            } else {
                self.records
                    .get::<VolumeEpochRecord>(&request.name)
                    .ok()
                    .flatten()
                    .map(|previous| previous.last_in_sync_writer)
                    .filter(|writer| !writer.is_empty())
                    .unwrap_or_else(|| current.writer.clone())
            },
        };
        let records = self.records.clone();
        let key = request.name.clone();
        tokio::task::spawn_blocking(move || records.put(&key, &record))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(records_status)?;
        let was_writer = self.is_writer(&entry);
        *entry.epoch.lock().unwrap_or_else(|p| p.into_inner()) = wanted.clone();
        let is_writer = self.is_writer(&entry);
        {
            let mut writer = entry.writer_state();
            writer.caught_up.retain(|node| !wanted.in_sync(node));
            writer.awaiting_removal.retain(|node| wanted.in_sync(node));
            if is_writer && !was_writer {
                // Promoted: reconcile the in-sync copies before the first write.
                writer.reconcile_pending = true;
            }
        }
        if is_writer {
            entry.next_sequence.fetch_max(
                super::promotion::sequence_floor(wanted.epoch),
                Ordering::Relaxed,
            );
        } else if wanted.in_sync(&self.node_name) {
            // A former writer back in the set: the writer overwrote its in-flight
            // regions while it caught up.
            self.drop_stale_intents(&request.name)?;
        }
        entry.epoch_changed.notify_waiters();
        let (health, detail) = self.epoch_health(&entry, &wanted);
        self.set_health(&entry, health, detail.clone());
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: request.name.clone(),
                health: health as i32,
                detail: format!("now at {}", wanted.describe()),
                deleted: false,
            }));
        Ok(())
    }

    /// The health a copy has at an epoch when nothing is failing.
    pub(super) fn epoch_health(&self, entry: &VolumeEntry, epoch: &EpochState) -> (Health, String) {
        if !epoch.in_sync(&self.node_name) {
            return (
                Health::Degraded,
                format!(
                    "this copy is outside the in-sync set of {}: it may be stale until the writer brings it back",
                    epoch.describe()
                ),
            );
        }
        let missing: Vec<String> = self
            .copy_names(entry)
            .into_iter()
            .filter(|node| !epoch.in_sync(node))
            .collect();
        if missing.is_empty() {
            (Health::Healthy, String::new())
        } else {
            (
                Health::Degraded,
                format!(
                    "copies on {} are outside the in-sync set of {}",
                    missing.join(", "),
                    epoch.describe()
                ),
            )
        }
    }

    /// Every node holding a copy of the volume, as this copy's record names them.
    pub(super) fn copy_names(&self, entry: &VolumeEntry) -> BTreeSet<String> {
        let record = &entry.record;
        let mut names = BTreeSet::new();
        if let Some(others) = entry.changed_copies() {
            names.insert(self.node_name.clone());
            names.extend(others.into_iter().map(|peer| peer.name));
        } else if record.is_primary() {
            names.insert(self.node_name.clone());
            names.extend(record.replica_peers.iter().map(|peer| peer.name.clone()));
        } else {
            names.insert(record.primary.clone());
            names.insert(self.node_name.clone());
            names.extend(record.copies.iter().map(|peer| peer.name.clone()));
        }
        names
    }

    /// The node that may write the volume now: the epoch's writer, else the primary.
    pub(super) fn writer_name(&self, entry: &VolumeEntry) -> String {
        let epoch = entry.epoch();
        if !epoch.writer.is_empty() {
            return epoch.writer;
        }
        if entry.record.is_primary() {
            self.node_name.clone()
        } else {
            entry.record.primary.clone()
        }
    }

    /// Refuses a `WriteVolume` on a node that is not the epoch's writer (fenced).
    pub(super) fn check_writer(&self, entry: &VolumeEntry) -> Result<(), Status> {
        let epoch = entry.epoch();
        if epoch.epoch > 0 && (epoch.writer != self.node_name || !epoch.in_sync(&self.node_name)) {
            return Err(Status::failed_precondition(format!(
                "node {} {FENCED}: it is not the writer of volume `{}` at {}; write through the writer",
                self.node_name,
                entry.record.name,
                epoch.describe()
            )));
        }
        Ok(())
    }

    /// Refuses a read of a copy outside its epoch's in-sync set.
    pub(super) fn check_readable(&self, entry: &VolumeEntry) -> Result<(), Status> {
        let epoch = entry.epoch();
        if !epoch.in_sync(&self.node_name) {
            return Err(Status::failed_precondition(format!(
                "the copy of volume `{}` on node {} is outside the in-sync set of {}: it may be stale (its checksums prove it consistent, not current); read from the writer {}",
                entry.record.name,
                self.node_name,
                epoch.describe(),
                epoch.writer
            )));
        }
        Ok(())
    }

    /// The epoch check of a `ReplicaWrite` (caller already known to be the writer's
    /// node). Call under the volume's write lock.
    pub(super) fn check_replica_epoch(
        &self,
        entry: &VolumeEntry,
        epoch: u64,
        caller: &ReplicationCaller,
    ) -> Result<(), Status> {
        let current = entry.epoch();
        let name = &entry.record.name;
        if epoch < current.epoch {
            return Err(Status::failed_precondition(format!(
                "volume `{name}` on node {} refuses a write from {} under epoch {epoch}: this copy holds {}; the writer {FENCED}",
                self.node_name,
                caller.description,
                current.describe()
            )));
        }
        if epoch > current.epoch {
            return Err(Status::failed_precondition(format!(
                "volume `{name}` on node {} refuses a write from {} under epoch {epoch}, newer than {} this copy was told of: the controller has not installed it here yet",
                self.node_name,
                caller.description,
                current.describe()
            )));
        }
        Ok(())
    }

    /// The replicas the writer ships a write to now: the in-sync ones (a failure
    /// freezes the writer) and the caught-up ones (a failure only drops them back).
    pub(super) fn targets(&self, entry: &VolumeEntry) -> (u64, Vec<Peer>, Vec<Peer>, Vec<Peer>) {
        let epoch = entry.epoch();
        let caught_up = entry.writer_state().caught_up.clone();
        let mut in_sync = Vec::new();
        let mut catching = Vec::new();
        let mut outside = Vec::new();
        for peer in &self.other_copies(entry) {
            if epoch.in_sync(&peer.name) {
                in_sync.push(peer.clone());
            } else {
                if caught_up.contains(&peer.name) {
                    catching.push(peer.clone());
                }
                outside.push(peer.clone());
            }
        }
        (epoch.epoch, in_sync, catching, outside)
    }

    /// One replica write (or resynchronisation) under `epoch`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn ship(
        &self,
        peer: &Peer,
        name: &str,
        offset: u64,
        data: Arc<Vec<u8>>,
        checksums: Vec<u32>,
        sequence: u64,
        epoch: u64,
        what: &str,
        within: Duration,
    ) -> Result<(), Status> {
        let deadline = Instant::now() + within;
        let mut client = self.peer_client(peer)?;
        // In the replica's session when this writer knows it (`sessions.rs`); a replica
        // that restarted since refuses it and names its new one: re-sent once with it.
        let mut retried = false;
        let status = loop {
            let call = client.replica_write_in_session(v1::ReplicaWriteRequest {
                volume: name.to_string(),
                offset,
                data: data.to_vec(),
                sequence,
                checksums: checksums.clone(),
                resync: sequence == 0,
                epoch,
                replica_boot: self.replica_session(&peer.name),
            });
            let status = match tokio::time::timeout(remaining(deadline), call).await {
                Ok(Ok(answer)) => {
                    self.learn_session(&peer.name, answer.replica_boot);
                    return Ok(());
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    Status::deadline_exceeded(format!("no answer within {} ms", within.as_millis()))
                }
            };
            match sessions::offered_boot(&status) {
                Some(boot) if !retried => {
                    self.learn_session(&peer.name, boot);
                    retried = true;
                }
                _ => break status,
            }
        };
        Err(peer_failure(peer, what, &status))
    }

    /// Records a dirty region of the copy on `node` durably (the volume's sequence
    /// high-water mark stays where it is).
    pub(super) fn mark_dirty(
        &self,
        entry: &VolumeEntry,
        node: &str,
        offset: u64,
        length: u64,
    ) -> Result<(), Status> {
        let name = &entry.record.name;
        let high_water = entry
            .next_sequence
            .load(Ordering::Relaxed)
            .saturating_sub(1);
        self.records
            .put_intent(name, &dirty_key(name, node, offset, length), high_water)
            .map_err(records_status)
    }

    /// Brings every pending write intent of a primary onto its in-sync copies, and
    /// records each as a dirty region of every copy outside the set. While an in-sync
    /// copy fails the writer is frozen: it retries until the copy answers, or the
    /// controller installs an epoch without it, or `deadline` passes (`UNAVAILABLE`).
    /// A copy refusing this writer's epoch as stale is waited out too (see [`FENCED`]);
    /// a newer epoch naming another writer ends it (`FAILED_PRECONDITION`).
    /// Caller holds the volume's write lock.
    pub(super) async fn settle_locked(
        &self,
        entry: &VolumeEntry,
        deadline: Instant,
    ) -> Result<(), Status> {
        let name = &entry.record.name;
        let frozen_since = Instant::now();
        loop {
            let changed = entry.epoch_changed.notified();
            self.check_writer(entry)?;
            let intents = self
                .records
                .intents(&format!("{name}/"))
                .map_err(records_status)?;
            let (epoch, in_sync, _, outside) = self.targets(entry);
            let mut failures: Vec<(String, Status)> = Vec::new();
            if entry.writer_state().reconcile_pending {
                failures = self
                    .reconcile_locked(entry, &in_sync, epoch, deadline)
                    .await;
            }
            for key in intents {
                let Some((offset, length)) = parse_intent_key(&key) else {
                    continue;
                };
                for peer in &outside {
                    self.mark_dirty(entry, &peer.name, offset, length)?;
                }
                let local = self.local.clone();
                let owned = name.clone();
                let (data, checksums) =
                    blocking(move || local.read_with_checksums(&owned, offset, length)).await?;
                let data = Arc::new(data);
                let mut key_failed = false;
                for peer in &in_sync {
                    let result = self
                        .ship(
                            peer,
                            name,
                            offset,
                            data.clone(),
                            checksums.clone(),
                            0,
                            epoch,
                            "resynchronise the replica",
                            remaining(deadline),
                        )
                        .await;
                    if let Err(status) = result {
                        key_failed = true;
                        failures.push((peer.name.clone(), status));
                    }
                }
                if !key_failed {
                    self.records
                        .remove_intent(&key, Durability::Immediate)
                        .map_err(records_status)?;
                }
            }
            if failures.is_empty() {
                entry.writer_state().awaiting_removal.clear();
                return Ok(());
            }
            // A copy that refused this writer's epoch as stale has not failed.
            let failed: BTreeSet<String> = failures
                .iter()
                .filter(|(_, status)| !status.message().contains(FENCED))
                .map(|(node, _)| node.clone())
                .collect();
            let why: Vec<String> = failures
                .iter()
                .map(|(_, status)| status.message().to_string())
                .collect();
            let waiting_for = if failed.is_empty() {
                "the controller's newer epoch reaches this node (a copy refused this writer's epoch as stale)".to_string()
            } else {
                format!(
                    "the controller removes the copy on {} from the in-sync set (or it answers again)",
                    failed.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            entry.writer_state().awaiting_removal = failed;
            let current = entry.epoch();
            self.set_health(
                entry,
                Health::Degraded,
                format!(
                    "degraded: waiting for the authority: writes are frozen at {} until {waiting_for}: {}",
                    current.describe(),
                    why.join("; ")
                ),
            );
            let now = Instant::now();
            if now >= deadline {
                return Err(Status::unavailable(format!(
                    "write to volume `{name}` was not acknowledged: its writes are frozen for {} ms at {}, waiting until {waiting_for}: {}",
                    now.duration_since(frozen_since).as_millis(),
                    current.describe(),
                    why.join("; ")
                )));
            }
            let wait = RETRY.min(deadline - now);
            let _ = tokio::time::timeout(wait, changed).await;
        }
    }

    /// Ships the union of a copy's dirty regions from this writer, under the current
    /// epoch, and marks it caught up (writes go to it from then on). Caller holds the
    /// volume's write lock. Returns the bytes shipped.
    pub(super) async fn catch_up_locked(
        &self,
        entry: &VolumeEntry,
        peer: &Peer,
    ) -> Result<u64, Status> {
        let name = &entry.record.name;
        let epoch = entry.epoch().epoch;
        self.catch_up_snapshots_locked(entry, peer).await?;
        let keys = self
            .records
            .intents(&dirty_prefix(name, &peer.name))
            .map_err(records_status)?;
        let mut ranges: Vec<(u64, u64)> = keys
            .iter()
            .filter_map(|key| parse_intent_key(key))
            .collect();
        // What the copy itself may hold that this writer does not (a former writer's
        // in-flight writes, writes it applied from a writer that failed).
        ranges.extend(self.catch_up_regions(entry, peer).await?);
        let mut ranges = merge_ranges(ranges, validate::MAX_IO_BYTES);
        if ranges.is_empty() {
            // Nothing changed: one block proves the copy is there and at this epoch.
            ranges.push((0, storage::BLOCK_SIZE));
        }
        let mut shipped = 0;
        for (offset, length) in ranges {
            let local = self.local.clone();
            let owned = name.clone();
            let (data, checksums) =
                blocking(move || local.read_with_checksums(&owned, offset, length)).await?;
            self.ship(
                peer,
                name,
                offset,
                std::sync::Arc::new(data),
                checksums,
                0,
                epoch,
                "catch up",
                CATCH_UP_TIMEOUT,
            )
            .await?;
            shipped += length;
            entry.resync_bytes.fetch_add(length, Ordering::Relaxed);
            entry.copies_state().shipping = shipped;
        }
        entry.copies_state().shipping = 0;
        for key in keys {
            self.records
                .remove_intent(&key, Durability::None)
                .map_err(records_status)?;
        }
        entry.writer_state().caught_up.insert(peer.name.clone());
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: name.clone(),
                health: Health::Degraded as i32,
                detail: format!(
                    "the copy on {} caught up at epoch {epoch} ({shipped} bytes shipped); the controller may add it to the in-sync set",
                    peer.name
                ),
                deleted: false,
            }));
        Ok(shipped)
    }

    /// Whether the node of `peer` answers a small read of the volume within a second.
    async fn answers(&self, entry: &VolumeEntry, peer: &Peer) -> bool {
        let Ok(mut client) = self.peer_client(peer) else {
            return false;
        };
        let probe = client.replica_read(v1::ReplicaReadRequest {
            volume: entry.record.name.clone(),
            offset: 0,
            length: storage::BLOCK_SIZE,
        });
        match tokio::time::timeout(Duration::from_secs(1), probe).await {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => !matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
            Err(_) => false,
        }
    }

    /// Brings back every reachable copy outside the in-sync set of a writer.
    pub(super) async fn catch_up_all(&self, entry: &VolumeEntry) {
        let (_, _, catching, outside) = self.targets(entry);
        for peer in outside {
            if catching.iter().any(|caught| caught.name == peer.name) {
                continue;
            }
            // A copy that does not answer is not waited for under the volume's lock
            // (writes would stall behind it): any answer of its node, a refusal
            // included, shows it is back.
            if !self.answers(entry, &peer).await {
                continue;
            }
            let _guard = entry.write_lock.lock().await;
            if self.check_writer(entry).is_err() {
                return;
            }
            let _ = self.catch_up_locked(entry, &peer).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_ranges_ship_overlaps_once_and_split_at_the_maximum() {
        let merged = merge_ranges(
            vec![
                (8192, 4096),
                (0, 4096),
                (4096, 4096),
                (2048, 4096),
                (65536, 4096),
            ],
            8192,
        );
        assert_eq!(merged, vec![(0, 8192), (8192, 4096), (65536, 4096)]);
        assert_eq!(merge_ranges(vec![], 8192), vec![]);
    }

    #[test]
    fn dirty_keys_parse_like_intents_and_stay_under_their_copy() {
        let key = dirty_key("db-data", "lab-2", 4096, 8192);
        assert!(key.starts_with(&dirty_prefix("db-data", "lab-2")));
        assert!(!key.starts_with("db-data/"));
        assert_eq!(parse_intent_key(&key), Some((4096, 8192)));
    }

    #[test]
    fn epoch_zero_has_every_copy_in_sync() {
        let zero = EpochState::default();
        assert!(zero.in_sync("anyone"));
        let later = EpochState {
            epoch: 3,
            writer: "a".into(),
            in_sync: vec!["a".into(), "b".into()],
            clients: Vec::new(),
        };
        assert!(later.in_sync("b") && !later.in_sync("c"));
        assert_eq!(later.describe(), "epoch 3 (writer a, in sync: a, b)");
    }
}
