//! Snapshots and clones of volumes (`Apply.SnapshotVolume`, `DeleteSnapshot`,
//! `CloneVolume`; `Replication.ReplicaSnapshot`, `CloneReplica`).
//!
//! The volume store makes both O(1) copy-on-write layers (`storage::Store`,
//! `layers.rs`); this module makes them one point of a replicated volume's write
//! sequence on every copy:
//! - the writer takes a snapshot under the volume's write lock, after bringing its
//!   pending write intents onto the in-sync copies (`settle_locked`), so no write is in
//!   flight and every in-sync copy holds exactly what the writer holds; it records the
//!   snapshot (`volume_snapshots` in node.redb) with every other copy *pending*, takes
//!   it in its volume store, then sends `ReplicaSnapshot` to every in-sync copy and
//!   answers only when each took it. An in-sync copy that does not answer keeps the
//!   snapshot pending, and the writer's next write first sends it (or freezes like a
//!   failed write: `settle_snapshots_locked`), so no write reaches a copy before that
//!   copy took every snapshot the writer took before the write;
//! - a copy outside the in-sync set (or only caught up) at that moment stays pending
//!   with the regions where it differed then (its dirty regions): it stops receiving
//!   writes, and when it catches up the writer first ships those regions *as the
//!   snapshot holds them* and has it take the snapshot, then ships what changed since
//!   (`catch_up_snapshots_locked`). Its copy of the snapshot is therefore the writer's,
//!   block for block;
//! - a clone is a new volume whose copies live where the source's copies live: the
//!   writer creates it on every replica (`CloneReplica`, forwarding the controller's
//!   signed `CloneVolume` as its grant, like `CreateVolume`) and then holds the clone's
//!   primary. A snapshot that some copy does not hold yet cannot be cloned.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use proto::v1::{self, Health};
use tonic::Status;

use super::{
    ReplicationCaller, VolumeEntry, Volumes, blocking, epochs, parse_intent_key, peer_failure,
    records_status,
};
use crate::events::now_unix_ms;
use crate::records::{Peer, SnapshotRecord, VolumeRecord, VolumeRole};
use crate::validate;

/// How often an unanswered in-sync copy is asked again to take a snapshot.
const RETRY: Duration = Duration::from_millis(200);

/// The record key of a snapshot (volume names hold no `/`).
fn key(volume: &str, snapshot: &str) -> String {
    format!("{volume}/{snapshot}")
}

fn snapshot_result(
    volume: &str,
    snapshot: &str,
    record: &SnapshotRecord,
    size_bytes: u64,
    copies: Vec<String>,
) -> v1::SnapshotResult {
    v1::SnapshotResult {
        volume: volume.to_string(),
        snapshot: snapshot.to_string(),
        created_at_unix_ms: record.created_at_unix_ms,
        size_bytes,
        copies,
    }
}

/// What Apply answers for an action that made or changed a volume.
pub fn volume_result(record: VolumeRecord) -> v1::VolumeResult {
    v1::VolumeResult {
        name: record.name,
        size_bytes: record.size_bytes,
        stripe_width: record.stripe_width,
        stripe_unit_bytes: record.stripe_unit_bytes,
        replica_peers: record
            .replica_peers
            .into_iter()
            .map(|peer| peer.name)
            .collect(),
    }
}

impl Volumes {
    /// Carries out `SnapshotVolume`, `DeleteSnapshot` or `CloneVolume` (validated here;
    /// `grant` is the controller's signed request, forwarded to the replicas of a clone).
    pub async fn apply_snapshot_action(
        &self,
        action: &v1::apply_request::Action,
        grant: v1::ControllerGrant,
    ) -> Result<v1::apply_response::Result, Status> {
        use v1::apply_request::Action;
        use v1::apply_response::Result as ApplyResult;
        validate::snapshot_action(action)?;
        match action {
            Action::SnapshotVolume(take) => Ok(ApplyResult::Snapshot(
                self.snapshot(&take.volume, &take.snapshot).await?,
            )),
            Action::DeleteSnapshot(delete) => {
                self.delete_snapshot(&delete.volume, &delete.snapshot)
                    .await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::CloneVolume(clone) => {
                let record = self.clone_volume(clone, grant).await?;
                Ok(ApplyResult::Volume(volume_result(record)))
            }
            _ => Err(Status::internal("not a snapshot action")),
        }
    }

    /// The snapshot records of one volume, by snapshot name.
    pub(super) fn snapshot_records(
        &self,
        volume: &str,
    ) -> Result<Vec<(String, SnapshotRecord)>, Status> {
        let prefix = format!("{volume}/");
        Ok(self
            .records
            .list::<SnapshotRecord>()
            .map_err(records_status)?
            .into_iter()
            .filter_map(|(key, record)| {
                key.strip_prefix(&prefix)
                    .map(|name| (name.to_string(), record))
            })
            .collect())
    }

    fn put_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        record: &SnapshotRecord,
    ) -> Result<(), Status> {
        self.records
            .put(&key(volume, snapshot), record)
            .map_err(records_status)
    }

    /// The entry of a volume this node writes (its primary, and the epoch's writer).
    pub(super) async fn writer_entry(
        &self,
        volume: &str,
        verb: &str,
    ) -> Result<Arc<VolumeEntry>, Status> {
        let entry = self.entry(volume).await?;
        if !entry.record.is_primary() {
            return Err(Status::failed_precondition(format!(
                "volume `{volume}` on node {} is a replica of node {}; {verb} it on its writer",
                self.node_name, entry.record.primary
            )));
        }
        Ok(entry)
    }

    /// `Apply.SnapshotVolume` on the writer (see the module docs). A snapshot of that
    /// name that some copy does not hold yet (an attempt that was not acknowledged) is
    /// finished: sent to the in-sync copies still pending. One that every copy holds is
    /// `ALREADY_EXISTS` (a retry of the same request id replays the recorded answer).
    pub async fn snapshot(
        &self,
        volume: &str,
        snapshot: &str,
    ) -> Result<v1::SnapshotResult, Status> {
        let entry = self.writer_entry(volume, "snapshot").await?;
        let _guard = entry.write_lock.lock().await;
        self.check_writer(&entry)?;
        let deadline = Instant::now() + self.freeze_bound;
        self.snapshot_locked(&entry, snapshot, now_unix_ms(), deadline)
            .await
    }

    /// [`Volumes::snapshot`] once the caller holds the volume's write lock whole (a
    /// group snapshot holds every volume's at once: `protection.rs`). `created_at` is
    /// the time recorded for a new snapshot (the same for every volume of a group).
    pub(super) async fn snapshot_locked(
        &self,
        entry: &VolumeEntry,
        snapshot: &str,
        created_at: u64,
        deadline: Instant,
    ) -> Result<v1::SnapshotResult, Status> {
        let volume = entry.record.name.as_str();
        let local = self.local.clone();
        let (owned_volume, owned_snapshot) = (volume.to_string(), snapshot.to_string());
        let taken =
            blocking(move || Ok(local.has_snapshot(&owned_volume, &owned_snapshot))).await?;
        let existing = self
            .records
            .get::<SnapshotRecord>(&key(volume, snapshot))
            .map_err(records_status)?;
        let record = match existing {
            // An earlier attempt that was not acknowledged (a copy did not answer) is
            // finished by a retry; a snapshot that every copy holds is a duplicate.
            Some(record) if taken && record.pending.is_empty() && record.deleting.is_empty() => {
                return Err(Status::already_exists(format!(
                    "volume `{volume}` already has a snapshot `{snapshot}` (taken at {} Unix ms); snapshot names are unique per volume: choose another name or delete it first",
                    record.created_at_unix_ms
                )));
            }
            Some(record) if taken => record,
            _ => {
                // Every write before this one is on every in-sync copy; none is in
                // flight (the lock), so this is one point of the write sequence.
                if !entry.record.replica_peers.is_empty() {
                    self.settle_locked(entry, deadline).await?;
                }
                let (_, in_sync, _, outside) = self.targets(entry);
                let mut pending = BTreeMap::new();
                for peer in &in_sync {
                    pending.insert(peer.name.clone(), Vec::new());
                }
                for peer in &outside {
                    let dirty = self
                        .records
                        .intents(&epochs::dirty_prefix(volume, &peer.name))
                        .map_err(records_status)?;
                    let regions = dirty
                        .iter()
                        .filter_map(|key| parse_intent_key(key))
                        .collect();
                    pending.insert(peer.name.clone(), regions);
                    // It must not get later writes before it took the snapshot.
                    entry.writer_state().caught_up.remove(&peer.name);
                }
                let record = SnapshotRecord {
                    version: SnapshotRecord::VERSION,
                    created_at_unix_ms: created_at,
                    pending,
                    deleting: Vec::new(),
                };
                // The record first: one whose snapshot the volume store does not hold
                // was never taken (a crash in between), and is taken anew.
                self.put_snapshot(volume, snapshot, &record)?;
                let local = self.local.clone();
                let (owned_volume, owned_snapshot) = (volume.to_string(), snapshot.to_string());
                blocking(move || local.snapshot(&owned_volume, &owned_snapshot)).await?;
                self.events
                    .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                        name: volume.to_string(),
                        health: entry.health().0 as i32,
                        detail: format!("snapshot {snapshot} taken"),
                        deleted: false,
                    }));
                record
            }
        };
        let record = self
            .ship_snapshot_locked(entry, snapshot, record, deadline)
            .await?;
        let size = self.snapshot_size(volume, snapshot).await?;
        let copies = self
            .copy_names(entry)
            .into_iter()
            .filter(|node| !record.pending.contains_key(node))
            .collect();
        Ok(snapshot_result(volume, snapshot, &record, size, copies))
    }

    async fn snapshot_size(&self, volume: &str, snapshot: &str) -> Result<u64, Status> {
        let local = self.local.clone();
        let owned = volume.to_string();
        let infos = blocking(move || Ok(local.snapshots(&owned))).await?;
        infos
            .into_iter()
            .find(|info| info.name == snapshot)
            .map(|info| info.size)
            .ok_or_else(|| self.unknown_snapshot(volume, snapshot))
    }

    fn unknown_snapshot(&self, volume: &str, snapshot: &str) -> Status {
        Status::not_found(format!(
            "volume `{volume}` has no snapshot `{snapshot}` on node {}",
            self.node_name
        ))
    }

    /// Sends a snapshot to every in-sync copy still pending, retrying (frozen, like a
    /// write) until each took it, or left the in-sync set (then it gets it when it
    /// catches up), or `deadline` passes (`UNAVAILABLE`; it stays pending and the next
    /// write or retry sends it again). Caller holds the volume's write lock.
    async fn ship_snapshot_locked(
        &self,
        entry: &VolumeEntry,
        snapshot: &str,
        mut record: SnapshotRecord,
        deadline: Instant,
    ) -> Result<SnapshotRecord, Status> {
        let volume = &entry.record.name;
        loop {
            let changed = entry.epoch_changed.notified();
            let (epoch, in_sync, _, _) = self.targets(entry);
            let waiting: Vec<Peer> = in_sync
                .into_iter()
                .filter(|peer| record.pending.contains_key(&peer.name))
                .collect();
            if waiting.is_empty() {
                return Ok(record);
            }
            let sends = waiting.iter().map(|peer| {
                self.send_replica_snapshot(peer, volume, snapshot, epoch, &record, false, deadline)
            });
            let mut failures = Vec::new();
            for (peer, result) in waiting.iter().zip(join_all(sends).await) {
                match result {
                    Ok(()) => {
                        record.pending.remove(&peer.name);
                    }
                    Err(status) => failures.push(status.message().to_string()),
                }
            }
            self.put_snapshot(volume, snapshot, &record)?;
            if failures.is_empty() {
                continue;
            }
            self.set_health(
                entry,
                Health::Degraded,
                format!(
                    "degraded: waiting for the authority: snapshot {snapshot} is not on every in-sync copy at {}; writes wait until the controller removes the copy from the in-sync set (or it answers again): {}",
                    entry.epoch().describe(),
                    failures.join("; ")
                ),
            );
            let now = Instant::now();
            if now >= deadline {
                return Err(Status::unavailable(format!(
                    "snapshot {snapshot} of volume `{volume}` was taken on node {} but not acknowledged: {}; retrying the request sends it again",
                    self.node_name,
                    failures.join("; ")
                )));
            }
            let _ = tokio::time::timeout(RETRY.min(deadline - now), changed).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_replica_snapshot(
        &self,
        peer: &Peer,
        volume: &str,
        snapshot: &str,
        epoch: u64,
        record: &SnapshotRecord,
        delete: bool,
        deadline: Instant,
    ) -> Result<(), Status> {
        let mut client = self.peer_client(peer)?;
        let call = client.replica_snapshot(v1::ReplicaSnapshotRequest {
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
            epoch,
            created_at_unix_ms: record.created_at_unix_ms,
            delete,
        });
        let what = if delete {
            "delete the snapshot"
        } else {
            "take the snapshot"
        };
        match tokio::time::timeout(epochs::remaining(deadline), call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(peer_failure(peer, what, &status)),
            Err(_) => Err(peer_failure(
                peer,
                what,
                &Status::deadline_exceeded("no answer in time"),
            )),
        }
    }

    /// Before a write: every snapshot an in-sync copy has not taken yet is sent to it
    /// (frozen until it is, or the copy leaves the in-sync set, or `deadline`), so no
    /// write lands on a copy before the snapshots taken before it. Caller holds the
    /// volume's write lock.
    pub(super) async fn settle_snapshots_locked(
        &self,
        entry: &VolumeEntry,
        deadline: Instant,
    ) -> Result<(), Status> {
        let volume = &entry.record.name;
        let (_, in_sync, _, _) = self.targets(entry);
        for (snapshot, record) in self.snapshot_records(volume)? {
            if !in_sync
                .iter()
                .any(|peer| record.pending.contains_key(&peer.name))
            {
                continue;
            }
            let local = self.local.clone();
            let (owned_volume, owned_snapshot) = (volume.clone(), snapshot.clone());
            if !blocking(move || Ok(local.has_snapshot(&owned_volume, &owned_snapshot))).await? {
                // Recorded but never taken (a crash in between): it does not exist.
                self.records
                    .remove::<SnapshotRecord>(&key(volume, &snapshot))
                    .map_err(records_status)?;
                continue;
            }
            self.ship_snapshot_locked(entry, &snapshot, record, deadline)
                .await?;
        }
        Ok(())
    }

    /// A copy catching up first takes the snapshots it missed, each at its point of the
    /// write sequence: the regions where it differed when the snapshot was taken are
    /// shipped as the snapshot holds them, then it takes the snapshot; snapshots deleted
    /// meanwhile are deleted there. Caller holds the volume's write lock.
    pub(super) async fn catch_up_snapshots_locked(
        &self,
        entry: &VolumeEntry,
        peer: &Peer,
    ) -> Result<(), Status> {
        let volume = &entry.record.name;
        let epoch = entry.epoch().epoch;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut records = self.snapshot_records(volume)?;
        records.sort_by_key(|(_, record)| record.created_at_unix_ms);
        for (snapshot, mut record) in records {
            if record.deleting.contains(&peer.name) {
                self.send_replica_snapshot(peer, volume, &snapshot, epoch, &record, true, deadline)
                    .await?;
                record.deleting.retain(|node| node != &peer.name);
            } else if let Some(regions) = record.pending.get(&peer.name).cloned() {
                for (offset, length) in epochs::merge_ranges(regions, validate::MAX_IO_BYTES) {
                    let local = self.local.clone();
                    let (owned_volume, owned_snapshot) = (volume.clone(), snapshot.clone());
                    let (data, checksums) = blocking(move || {
                        local.read_snapshot(&owned_volume, &owned_snapshot, offset, length)
                    })
                    .await?;
                    self.ship(
                        peer,
                        volume,
                        offset,
                        std::sync::Arc::new(data),
                        checksums,
                        0,
                        epoch,
                        "catch up to a snapshot",
                        Duration::from_secs(5),
                    )
                    .await?;
                    entry
                        .resync_bytes
                        .fetch_add(length, std::sync::atomic::Ordering::Relaxed);
                }
                self.send_replica_snapshot(
                    peer, volume, &snapshot, epoch, &record, false, deadline,
                )
                .await?;
                record.pending.remove(&peer.name);
            } else {
                continue;
            }
            if record.deleting.is_empty() && !self.local_has_snapshot(volume, &snapshot).await? {
                self.records
                    .remove::<SnapshotRecord>(&key(volume, &snapshot))
                    .map_err(records_status)?;
            } else {
                self.put_snapshot(volume, &snapshot, &record)?;
            }
        }
        Ok(())
    }

    async fn local_has_snapshot(&self, volume: &str, snapshot: &str) -> Result<bool, Status> {
        let local = self.local.clone();
        let (owned_volume, owned_snapshot) = (volume.to_string(), snapshot.to_string());
        blocking(move || Ok(local.has_snapshot(&owned_volume, &owned_snapshot))).await
    }

    /// `Apply.DeleteSnapshot` on the writer: here, then on every in-sync (or caught-up)
    /// copy; a copy outside the in-sync set deletes it when it catches up (one that
    /// never took it just forgets it). A missing snapshot succeeds.
    pub async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), Status> {
        let entry = self.writer_entry(volume, "delete a snapshot of").await?;
        let _guard = entry.write_lock.lock().await;
        self.check_writer(&entry)?;
        let mut record = self
            .records
            .get::<SnapshotRecord>(&key(volume, snapshot))
            .map_err(records_status)?;
        let had = self.local_has_snapshot(volume, snapshot).await?;
        if record.is_none() && !had {
            return Ok(());
        }
        let local = self.local.clone();
        let (owned_volume, owned_snapshot) = (volume.to_string(), snapshot.to_string());
        blocking(move || local.delete_snapshot(&owned_volume, &owned_snapshot)).await?;
        let mut record = record.take().unwrap_or(SnapshotRecord {
            version: SnapshotRecord::VERSION,
            created_at_unix_ms: 0,
            pending: BTreeMap::new(),
            deleting: Vec::new(),
        });
        // Copies that never took it have nothing to delete; after a retry, the copies
        // the earlier attempt did not reach.
        let holders: BTreeSet<String> = if had {
            entry
                .record
                .replica_peers
                .iter()
                .map(|peer| peer.name.clone())
                .filter(|node| !record.pending.contains_key(node))
                .collect()
        } else {
            record.deleting.iter().cloned().collect()
        };
        record.pending.clear();
        record.deleting = holders.iter().cloned().collect();
        self.put_snapshot(volume, snapshot, &record)?;
        let (epoch, in_sync, catching, _) = self.targets(&entry);
        let deadline = Instant::now() + self.freeze_bound.min(Duration::from_secs(10));
        let reachable: Vec<Peer> = in_sync
            .into_iter()
            .chain(catching)
            .filter(|peer| holders.contains(&peer.name))
            .collect();
        let sends = reachable.iter().map(|peer| {
            self.send_replica_snapshot(peer, volume, snapshot, epoch, &record, true, deadline)
        });
        let mut failures = Vec::new();
        let results = join_all(sends).await;
        for (peer, result) in reachable.iter().zip(results) {
            match result {
                Ok(()) => record.deleting.retain(|node| node != &peer.name),
                Err(status) => failures.push(status.message().to_string()),
            }
        }
        if record.deleting.is_empty() {
            self.records
                .remove::<SnapshotRecord>(&key(volume, snapshot))
                .map_err(records_status)?;
        } else {
            self.put_snapshot(volume, snapshot, &record)?;
        }
        if !failures.is_empty() {
            return Err(Status::unavailable(format!(
                "snapshot {snapshot} of volume `{volume}` was deleted on node {} but not on every copy: {}; retrying the request deletes it there",
                self.node_name,
                failures.join("; ")
            )));
        }
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: volume.to_string(),
                health: entry.health().0 as i32,
                detail: format!("snapshot {snapshot} deleted"),
                deleted: false,
            }));
        Ok(())
    }

    /// `Replication.ReplicaSnapshot`: takes (or deletes) a snapshot of this replica
    /// under the epoch it holds; the caller was checked to be the volume's writer.
    pub async fn replica_snapshot(
        &self,
        request: &v1::ReplicaSnapshotRequest,
        caller: &ReplicationCaller,
    ) -> Result<v1::ReplicaSnapshotResponse, Status> {
        let entry = self.entry(&request.volume).await?;
        if entry.record.is_primary() {
            return Err(Status::failed_precondition(format!(
                "volume `{}` on node {} is a primary, not a replica; refusing a replica snapshot",
                request.volume, self.node_name
            )));
        }
        let _guard = entry.write_lock.lock().await;
        self.check_replica_epoch(&entry, request.epoch, caller)?;
        let local = self.local.clone();
        let (volume, snapshot) = (request.volume.clone(), request.snapshot.clone());
        let changed = if request.delete {
            let changed = blocking(move || local.delete_snapshot(&volume, &snapshot)).await?;
            self.records
                .remove::<SnapshotRecord>(&key(&request.volume, &request.snapshot))
                .map_err(records_status)?;
            changed
        } else {
            let changed = blocking(move || local.snapshot(&volume, &snapshot)).await?;
            let record = SnapshotRecord {
                version: SnapshotRecord::VERSION,
                created_at_unix_ms: request.created_at_unix_ms,
                pending: BTreeMap::new(),
                deleting: Vec::new(),
            };
            self.put_snapshot(&request.volume, &request.snapshot, &record)?;
            changed
        };
        Ok(v1::ReplicaSnapshotResponse { changed })
    }

    /// `Apply.CloneVolume` on the source's writer: the clone on every replica of the
    /// source first (forwarding the controller's signed request `grant`), then here,
    /// then its record makes it visible (a crash in between leaves nothing a retry
    /// cannot finish). The clone's primary is this node, its replicas the source's.
    pub async fn clone_volume(
        &self,
        request: &v1::CloneVolume,
        grant: v1::ControllerGrant,
    ) -> Result<VolumeRecord, Status> {
        let (volume, snapshot, name) = (&request.volume, &request.snapshot, &request.name);
        let source = self.writer_entry(volume, "clone").await?;
        if !self.local_has_snapshot(volume, snapshot).await? {
            return Err(self.unknown_snapshot(volume, snapshot));
        }
        if let Some(record) = self
            .records
            .get::<SnapshotRecord>(&key(volume, snapshot))
            .map_err(records_status)?
            && !record.pending.is_empty()
        {
            return Err(Status::failed_precondition(format!(
                "snapshot {snapshot} of volume `{volume}` is not on the copies on {} yet (they get it when they are in sync again); a clone's copies live where the source's copies live, so clone it once they hold it",
                record
                    .pending
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let local = self.local.clone();
        let (v, s, n) = (volume.clone(), snapshot.clone(), name.clone());
        let geometry = blocking(move || {
            let infos = local.snapshots(&v);
            let info = infos.iter().find(|info| info.name == s).ok_or_else(|| {
                storage::StorageError::UnknownSnapshot {
                    volume: v.clone(),
                    snapshot: s.clone(),
                }
            })?;
            Ok((info.size, n))
        })
        .await?;
        let record = VolumeRecord {
            version: VolumeRecord::VERSION,
            name: name.clone(),
            role: VolumeRole::Primary,
            size_bytes: geometry.0,
            stripe_width: source.record.stripe_width,
            stripe_unit_bytes: source.record.stripe_unit_bytes,
            replica_peers: source.record.replica_peers.clone(),
            primary: String::new(),
            primary_key_hex: String::new(),
            copies: Vec::new(),
        };
        if let Some(existing) = self.volumes.read().await.get(name) {
            if existing.record_now().same_definition(&record) {
                return Ok(existing.record_now());
            }
            return Err(Status::already_exists(format!(
                "volume `{name}` already exists on node {} (another volume than this clone of {volume}@{snapshot}); choose another name or delete it first",
                self.node_name
            )));
        }
        let clones = record.replica_peers.iter().map(|peer| {
            let grant = grant.clone();
            async move {
                let mut client = self.peer_client(peer)?;
                client
                    .clone_replica(v1::CloneReplicaRequest {
                        volume: volume.clone(),
                        snapshot: snapshot.clone(),
                        name: name.clone(),
                        grant: Some(grant),
                    })
                    .await
                    .map_err(|status| peer_failure(peer, "create the clone's copy", &status))
            }
        });
        for result in join_all(clones).await {
            result?;
        }
        self.make_clone_copy(volume, snapshot, &record).await?;
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: name.clone(),
                health: Health::Healthy as i32,
                detail: format!("created as a clone of {volume}@{snapshot}"),
                deleted: false,
            }));
        Ok(record)
    }

    /// `Replication.CloneReplica`: this node's copy of a clone, for a controller or for
    /// the source's primary forwarding the controller's signed CloneVolume.
    pub async fn clone_replica(
        &self,
        request: &v1::CloneReplicaRequest,
        caller: &ReplicationCaller,
    ) -> Result<v1::CloneReplicaResponse, Status> {
        let (volume, snapshot, name) = (&request.volume, &request.snapshot, &request.name);
        let Some(source) = self.volumes.read().await.get(volume).cloned() else {
            return Err(self.denied(caller, "clone", volume, "this node holds no copy of it"));
        };
        if source.record.is_primary() {
            return Err(Status::failed_precondition(format!(
                "volume `{volume}` on node {} is a primary, not a replica; clone it with CloneVolume",
                self.node_name
            )));
        }
        if !caller.controller {
            let (_, signed) = self.grant_of(caller, "clone", volume, "CloneVolume")?;
            match &signed.action {
                Some(v1::apply_request::Action::CloneVolume(clone))
                    if &clone.volume == volume
                        && &clone.snapshot == snapshot
                        && &clone.name == name => {}
                _ => {
                    return Err(self.denied(
                        caller,
                        "clone",
                        volume,
                        &format!(
                            "the forwarded controller request is not a CloneVolume of {volume}@{snapshot} into `{name}`"
                        ),
                    ));
                }
            }
            if self
                .key_of(&source.record.primary, &source.record.primary_key_hex)
                .as_deref()
                != Some(&caller.key_hex)
            {
                return Err(self.denied(
                    caller,
                    "clone",
                    volume,
                    &format!(
                        "only its primary, node {}, makes clones of it here",
                        source.record.primary
                    ),
                ));
            }
        }
        if !self.local_has_snapshot(volume, snapshot).await? {
            return Err(self.unknown_snapshot(volume, snapshot));
        }
        let size = self.snapshot_size(volume, snapshot).await?;
        let record = VolumeRecord {
            version: VolumeRecord::VERSION,
            name: name.clone(),
            role: VolumeRole::Replica,
            size_bytes: size,
            stripe_width: source.record.stripe_width,
            stripe_unit_bytes: source.record.stripe_unit_bytes,
            replica_peers: Vec::new(),
            primary: source.record.primary.clone(),
            primary_key_hex: source.record.primary_key_hex.clone(),
            copies: source.record.copies.clone(),
        };
        if let Some(existing) = self.volumes.read().await.get(name) {
            if existing.record_now().same_definition(&record) {
                return Ok(v1::CloneReplicaResponse { created: false });
            }
            return Err(Status::already_exists(format!(
                "volume `{name}` already exists on node {} with another definition; cannot hold it as a clone of {volume}@{snapshot}",
                self.node_name
            )));
        }
        self.make_clone_copy(volume, snapshot, &record).await?;
        Ok(v1::CloneReplicaResponse { created: true })
    }

    /// This node's copy of a clone: in the volume store (a copy already there from a
    /// crash before its record is taken), then its record (counted like a create), then
    /// visible.
    async fn make_clone_copy(
        &self,
        volume: &str,
        snapshot: &str,
        record: &VolumeRecord,
    ) -> Result<(), Status> {
        let local = self.local.clone();
        let (v, s, n) = (
            volume.to_string(),
            snapshot.to_string(),
            record.name.clone(),
        );
        blocking(move || local.clone_snapshot(&v, &s, &n)).await?;
        self.record_created(record)?;
        self.volumes.write().await.insert(
            record.name.clone(),
            Arc::new(VolumeEntry::new(record.clone())),
        );
        Ok(())
    }

    /// Refuses to delete a volume that still has snapshots (the volume store keeps a
    /// volume's layers while its snapshots exist), naming them. The snapshots a
    /// protection schedule took (`auto-…`, `protection.rs`) go with the volume: on its
    /// writer they are deleted first, on every copy.
    pub async fn refuse_delete_with_snapshots(&self, volume: &str) -> Result<(), Status> {
        let local = self.local.clone();
        let owned = volume.to_string();
        let mut snapshots = blocking(move || Ok(local.snapshots(&owned))).await?;
        let writer = match self.volumes.read().await.get(volume) {
            Some(entry) => entry.record.is_primary(),
            None => false,
        };
        if writer {
            for info in &snapshots {
                if super::protection::is_scheduled(&info.name) {
                    self.delete_snapshot(volume, &info.name).await?;
                }
            }
            snapshots.retain(|info| !super::protection::is_scheduled(&info.name));
        }
        if snapshots.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = snapshots.into_iter().map(|info| info.name).collect();
        Err(Status::failed_precondition(format!(
            "volume `{volume}` on node {} has {} snapshot(s) ({}); delete them first (DeleteSnapshot), clones made from them stay",
            self.node_name,
            names.len(),
            names.join(", ")
        )))
    }

    /// Forgets the snapshot records of a volume that is gone from this node.
    pub(super) fn forget_snapshots(&self, volume: &str) -> Result<(), Status> {
        for (snapshot, _) in self.snapshot_records(volume)? {
            self.records
                .remove::<SnapshotRecord>(&key(volume, &snapshot))
                .map_err(records_status)?;
        }
        Ok(())
    }

    /// The snapshots of a volume on this copy, for Observe.
    pub(super) async fn snapshot_statuses(&self, volume: &str) -> Vec<v1::SnapshotStatus> {
        let local = self.local.clone();
        let owned = volume.to_string();
        let infos = blocking(move || Ok(local.snapshots(&owned)))
            .await
            .unwrap_or_default();
        let records: BTreeMap<String, SnapshotRecord> = self
            .snapshot_records(volume)
            .unwrap_or_default()
            .into_iter()
            .collect();
        infos
            .into_iter()
            .map(|info| {
                let record = records.get(&info.name);
                v1::SnapshotStatus {
                    created_at_unix_ms: record.map_or(0, |r| r.created_at_unix_ms),
                    size_bytes: info.size,
                    allocated_bytes: info.allocated,
                    pending_copies: record
                        .map(|r| r.pending.keys().cloned().collect())
                        .unwrap_or_default(),
                    unique_bytes: info.unique,
                    name: info.name,
                }
            })
            .collect()
    }
}
