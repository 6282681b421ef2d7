//! A new writer: a replica promoted by the controller, and the copies it reconciles.
//!
//! A copy's role (primary or replica) is the layout the controller created; who
//! *writes* is the epoch's writer. When the controller names a replica as the writer
//! of a new epoch (its writer's node failed), that copy:
//! - raises its sequence numbers above every number the old writer can have shipped
//!   (`epoch << 40`; replicas drop a write whose number is not above the last they
//!   applied, so a lower number would be silently lost);
//! - before its first write, *reconciles* the in-sync copies: a write the old writer
//!   had in flight when it failed may be on some copies and not on others (it was
//!   never acknowledged, so either content is right, but all copies must agree). Each
//!   copy keeps the regions of its most recent replica writes ([`Recent`]); the new
//!   writer ships the union of its own and every other in-sync copy's recent regions
//!   from itself to them, then writes (DRBD 9 calls this a reconciliation resync).
//!   The pending reconciliation is not recorded: a promoted copy (a replica by layout)
//!   whose agent restarts reconciles again before its next write.
//!
//! A copy that cannot account for its recent writes (its agent restarted since, with
//! no write applied after) says so
//! (`complete = false`) and lists every allocated region instead: the whole of it is
//! compared, which is slow but never wrong.
//!
//! A former writer that returns is caught up like any copy, and the regions it
//! reports include its own pending write intents (writes it had in flight, or made
//! while frozen): they are overwritten from the new writer. It drops those intents
//! when the controller puts it back in the in-sync set.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use proto::v1;
use redb::Durability;
use tonic::Status;

use super::epochs::{merge_ranges, remaining};
use super::{VolumeEntry, Volumes, blocking, parse_intent_key, records_status};
use crate::records::{Peer, VolumeEpochRecord};
use crate::validate;

/// How many recent replica writes a copy remembers. Must exceed the writes a writer
/// has in flight at once.
pub const RECENT_WRITES: usize = 1024;

/// The first sequence number a writer uses at `epoch`: above every number a writer of
/// an older epoch can have shipped.
pub fn sequence_floor(epoch: u64) -> u64 {
    (epoch << 40) + 1
}

/// A copy's recent replica writes.
#[derive(Debug, Default)]
pub struct Recent {
    /// Regions (offset, length), oldest first.
    pub regions: VecDeque<(u64, u64)>,
    /// Whether `regions` holds every write this copy applied that may not be on every
    /// copy (see the module documentation).
    pub complete: bool,
}

impl Recent {
    /// What a copy knows right after its agent (re)started: a writer's in-flight
    /// writes are its durable intents, so it knows them; a replica does not know
    /// which of the writes it applied before were acknowledged.
    pub fn at_start(writer: bool) -> Self {
        Self {
            regions: VecDeque::new(),
            complete: writer,
        }
    }

    /// Records one applied replica write. The writer settles every earlier write on
    /// every in-sync copy before it ships a later one (a write waits behind the
    /// pending intents), so once a write is applied after a start, everything older
    /// is on every copy.
    pub fn push(&mut self, offset: u64, length: u64) {
        if self.regions.len() == RECENT_WRITES {
            self.regions.pop_front();
        }
        self.regions.push_back((offset, length));
        self.complete = true;
    }
}

impl VolumeEntry {
    pub(super) fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Volumes {
    /// Whether this node writes the volume now: the epoch's writer, or (before the
    /// controller set an epoch) the primary.
    pub(super) fn is_writer(&self, entry: &VolumeEntry) -> bool {
        self.writer_name(entry) == self.node_name
    }

    /// The next sequence number to ship, never below the floor of the current epoch.
    pub(super) fn take_sequence(&self, entry: &VolumeEntry) -> u64 {
        let floor = sequence_floor(entry.epoch().epoch);
        entry.next_sequence.fetch_max(floor, Ordering::Relaxed);
        entry.next_sequence.fetch_add(1, Ordering::Relaxed)
    }

    /// Every allocated region of the local copy.
    pub(super) async fn allocated_regions(
        &self,
        entry: &VolumeEntry,
    ) -> Result<Vec<(u64, u64)>, Status> {
        let name = entry.record.name.clone();
        let size = entry.size();
        let local = self.local.clone();
        blocking(move || {
            let mut regions = Vec::new();
            let mut offset = 0;
            while offset < size {
                let runs = local.allocation(&name, offset, size - offset)?;
                if runs.is_empty() {
                    break;
                }
                for run in runs {
                    if run.allocated {
                        regions.push((offset, run.length));
                    }
                    offset += run.length;
                }
            }
            Ok(regions)
        })
        .await
    }

    /// `Replication.ReplicaRecent`: the regions where this copy may differ from the
    /// others (see the module documentation).
    pub async fn recent(
        &self,
        volume: &str,
        reconcile: bool,
    ) -> Result<v1::ReplicaRecentResponse, Status> {
        let entry = self.entry(volume).await?;
        // Writes applied from another writer than the current one may be missing on
        // the current writer: when reconciling, or when this copy left the in-sync set
        // under another writer.
        let foreign = reconcile || {
            let last = self
                .records
                .get::<VolumeEpochRecord>(volume)
                .map_err(records_status)?
                .map(|record| record.last_in_sync_writer)
                .unwrap_or_default();
            !last.is_empty() && last != self.writer_name(&entry)
        };
        let (mut regions, complete) = if foreign {
            let recent = entry.recent();
            (
                recent.regions.iter().copied().collect::<Vec<_>>(),
                recent.complete,
            )
        } else {
            (Vec::new(), true)
        };
        // Its own pending intents: writes it had in flight as a writer.
        let intents = self
            .records
            .intents(&format!("{volume}/"))
            .map_err(records_status)?;
        regions.extend(intents.iter().filter_map(|key| parse_intent_key(key)));
        if !complete {
            regions.extend(self.allocated_regions(&entry).await?);
        }
        let regions = merge_ranges(regions, validate::MAX_IO_BYTES)
            .into_iter()
            .map(|(offset, length)| v1::Region { offset, length })
            .collect();
        Ok(v1::ReplicaRecentResponse { regions, complete })
    }

    /// The regions `peer` reports as possibly different (a copy that cannot be asked
    /// fails the call).
    pub(super) async fn recent_of(
        &self,
        entry: &VolumeEntry,
        peer: &Peer,
        reconcile: bool,
    ) -> Result<(Vec<(u64, u64)>, bool), Status> {
        let mut client = self.peer_client(peer)?;
        let call = client.replica_recent(v1::ReplicaRecentRequest {
            volume: entry.record.name.clone(),
            reconcile,
        });
        let response = tokio::time::timeout(std::time::Duration::from_secs(5), call)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "node {} did not say within 5 s which regions of volume `{}` may differ",
                    peer.name, entry.record.name
                ))
            })??;
        let mut regions: Vec<(u64, u64)> = response
            .regions
            .iter()
            .map(|region| (region.offset, region.length))
            .collect();
        if !response.complete {
            // The peer may hold data where this copy has none: compare all of ours too.
            regions.extend(self.allocated_regions(entry).await?);
        }
        Ok((regions, response.complete))
    }

    /// A new writer's reconciliation: ships the union of its own and every in-sync
    /// copy's recent regions from itself to them. Caller holds the volume's write
    /// lock. A copy that fails is returned with why (the caller freezes on it).
    pub(super) async fn reconcile_locked(
        &self,
        entry: &VolumeEntry,
        in_sync: &[Peer],
        epoch: u64,
        deadline: std::time::Instant,
    ) -> Vec<(String, Status)> {
        let mut failures = Vec::new();
        let (mut regions, complete) = {
            let recent = entry.recent();
            (
                recent.regions.iter().copied().collect::<Vec<(u64, u64)>>(),
                recent.complete,
            )
        };
        if !complete {
            match self.allocated_regions(entry).await {
                Ok(all) => regions.extend(all),
                Err(status) => {
                    failures.push((self.node_name.clone(), status));
                    return failures;
                }
            }
        }
        let mut asked = Vec::new();
        for peer in in_sync {
            match self.recent_of(entry, peer, true).await {
                Ok((theirs, _)) => {
                    regions.extend(theirs);
                    asked.push(peer.clone());
                }
                Err(status) => failures.push((peer.name.clone(), status)),
            }
        }
        let regions = merge_ranges(regions, validate::MAX_IO_BYTES);
        let name = &entry.record.name;
        let mut shipped = 0;
        for (offset, length) in &regions {
            let (offset, length) = (*offset, *length);
            let local = self.local.clone();
            let owned = name.clone();
            let read = blocking(move || local.read_with_checksums(&owned, offset, length)).await;
            let (data, checksums) = match read {
                Ok((data, checksums)) => (std::sync::Arc::new(data), checksums),
                Err(status) => {
                    failures.push((self.node_name.clone(), status));
                    return failures;
                }
            };
            for peer in &asked {
                if failures.iter().any(|(node, _)| node == &peer.name) {
                    continue;
                }
                let result = self
                    .ship(
                        peer,
                        name,
                        offset,
                        data.clone(),
                        checksums.clone(),
                        0,
                        epoch,
                        "reconcile the copy with its new writer",
                        remaining(deadline),
                    )
                    .await;
                if let Err(status) = result {
                    failures.push((peer.name.clone(), status));
                }
            }
            shipped += length;
        }
        entry.resync_bytes.fetch_add(shipped, Ordering::Relaxed);
        if failures.is_empty() {
            entry.writer_state().reconcile_pending = false;
            self.events
                .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                    name: name.clone(),
                    health: v1::Health::Healthy as i32,
                    detail: format!(
                        "new writer {} reconciled the in-sync copies at epoch {epoch}: {} region(s), {shipped} bytes shipped",
                        self.node_name,
                        regions.len()
                    ),
                    deleted: false,
                }));
        }
        failures
    }

    /// The regions a copy catching up reports itself (its own in-flight writes as a
    /// former writer, its recent writes), added to the writer's dirty regions of it.
    /// A copy that cannot be asked gets none added (its own dirty regions then wait for
    /// the next catch-up: it is not marked caught up).
    pub(super) async fn catch_up_regions(
        &self,
        entry: &VolumeEntry,
        peer: &Peer,
    ) -> Result<Vec<(u64, u64)>, Status> {
        self.recent_of(entry, peer, false)
            .await
            .map(|(regions, _)| regions)
    }

    /// On a copy that is not the writer and is (back) in the in-sync set: the intents
    /// it kept as a former writer were overwritten from the new writer when it caught
    /// up, so they are dropped.
    pub(super) fn drop_stale_intents(&self, volume: &str) -> Result<(), Status> {
        let keys = self
            .records
            .intents(&format!("{volume}/"))
            .map_err(records_status)?;
        for key in keys {
            self.records
                .remove_intent(&key, Durability::None)
                .map_err(records_status)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_floors_grow_with_the_epoch_above_any_earlier_number() {
        assert!(sequence_floor(1) > 1 << 39);
        assert!(sequence_floor(2) > sequence_floor(1) + (1 << 39));
        assert_eq!(sequence_floor(0), 1);
    }

    #[test]
    fn a_replica_knows_its_recent_writes_only_after_one_applied_since_start() {
        let mut recent = Recent::at_start(false);
        assert!(!recent.complete);
        recent.push(0, 4096);
        assert!(recent.complete);
        for index in 0..RECENT_WRITES as u64 + 5 {
            recent.push(index * 4096, 4096);
        }
        assert_eq!(recent.regions.len(), RECENT_WRITES);
        assert_eq!(recent.regions.front(), Some(&(5 * 4096, 4096)));
        assert!(Recent::at_start(true).complete);
    }
}
