//! Protection schedules held by the node (`Apply.SetProtection`, issue 18).
//!
//! The controller gives the writer of a VM's volumes the VM's snapshot schedule (its
//! protection plan's `snapshot every=… keep=…`); from then on the node takes the
//! snapshots itself, so they go on while the controller is down:
//! - the schedule lives in `node.redb` (`protections`, by VM) and is run again after a
//!   restart; [`Volumes::protection_loop`] looks at the schedules a few times a second;
//! - every `every_ms` one **group snapshot**: every volume of the VM that this node
//!   writes, each one's write lock held whole at once (taken in name order; every other
//!   path takes one volume's lock at a time, so the order cannot deadlock). No write of
//!   the VM is in flight and none starts until all are taken: the VM's I/O is quiesced
//!   for the time of the snapshots (O(1) each, plus one round trip to each in-sync copy),
//!   and the group is crash-consistent. Each snapshot is the sequenced snapshot of
//!   `snapshots.rs` (one point of the write stream on every copy), all with the same
//!   name `auto-<Unix ms>` and the same time;
//! - retention then deletes, per volume, the oldest `auto-` snapshots beyond `keep`
//!   (on every copy, like `DeleteSnapshot`); the volume store frees exactly the blocks
//!   only a deleted snapshot saw. Snapshots of other names are never touched;
//! - a run that comes more than one interval late (the node was down, or a run took
//!   that long) or fails is *missed*: counted in Observe (`ProtectionStatus.missed`,
//!   `last_error`) and published as a volume event `protection: …`. A failed run is
//!   tried again after a short pause, not a whole interval later.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::v1;
use tonic::Status;

use super::{Volumes, records_status};
use crate::events::now_unix_ms;
use crate::records::ProtectionRecord;
use crate::validate;

/// Scheduled snapshots are named `auto-<Unix ms>`; nothing else is the schedule's.
const PREFIX: &str = "auto-";
/// The shortest interval (1 s) and the longest (a year).
const MIN_EVERY_MS: u64 = 1000;
const MAX_EVERY_MS: u64 = 365 * 24 * 3600 * 1000;
const MAX_KEEP: u32 = 100_000;
/// How soon a failed run is tried again.
const RETRY_MS: u64 = 2000;

/// What one VM's schedule did since the node started.
#[derive(Debug, Clone, Default)]
pub(super) struct Run {
    next_due: u64,
    last_snapshot: String,
    last_at: u64,
    missed: u64,
    last_error: String,
}

/// Whether a snapshot is a schedule's own (`auto-<Unix ms>`).
pub(super) fn is_scheduled(name: &str) -> bool {
    scheduled_at(name).is_some()
}

/// The time a scheduled snapshot's name says it was taken (a replicated snapshot
/// keeps its name: `delta.rs`).
pub(super) fn scheduled_at(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

impl Volumes {
    /// `Apply.SetProtection`: holds (or with `every_ms` 0 drops) a VM's schedule. The
    /// same schedule again keeps its clock.
    pub async fn set_protection(&self, set: &v1::SetProtection) -> Result<(), Status> {
        validate::name("set_protection.vm", &set.vm)?;
        if set.every_ms == 0 {
            self.records
                .remove::<ProtectionRecord>(&set.vm)
                .map_err(records_status)?;
            self.runs().remove(&set.vm);
            return Ok(());
        }
        if !(MIN_EVERY_MS..=MAX_EVERY_MS).contains(&set.every_ms) {
            return Err(validate::invalid(
                "set_protection.every_ms",
                format!(
                    "is {} ms; a snapshot schedule runs every {MIN_EVERY_MS} ms (1 s) to {MAX_EVERY_MS} ms (a year), 0 removes it",
                    set.every_ms
                ),
            ));
        }
        if !(1..=MAX_KEEP).contains(&set.keep) {
            return Err(validate::invalid(
                "set_protection.keep",
                format!("is {}; keep 1 to {MAX_KEEP} snapshots", set.keep),
            ));
        }
        if set.volumes.is_empty() {
            return Err(validate::invalid(
                "set_protection.volumes",
                "must name the VM's volumes (all its disks)",
            ));
        }
        for (index, volume) in set.volumes.iter().enumerate() {
            validate::name(&format!("set_protection.volumes[{index}]"), volume)?;
        }
        let existing = self
            .records
            .get::<ProtectionRecord>(&set.vm)
            .map_err(records_status)?;
        let since = match &existing {
            Some(old) if old.every_ms == set.every_ms => old.since_unix_ms,
            _ => now_unix_ms(),
        };
        let record = ProtectionRecord {
            version: ProtectionRecord::VERSION,
            plan: set.plan.clone(),
            volumes: set.volumes.clone(),
            every_ms: set.every_ms,
            keep: set.keep,
            since_unix_ms: since,
        };
        if existing.as_ref() == Some(&record) {
            return Ok(());
        }
        self.records.put(&set.vm, &record).map_err(records_status)?;
        if existing.is_some_and(|old| old.every_ms != record.every_ms) {
            // A new interval starts a new clock.
            self.runs().remove(&set.vm);
        }
        Ok(())
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Run>> {
        self.protection_runs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The schedules for Observe.
    pub fn protection_statuses(&self) -> Vec<v1::ProtectionStatus> {
        let records = self.records.list::<ProtectionRecord>().unwrap_or_default();
        let runs = self.runs();
        records
            .into_iter()
            .map(|(vm, record)| {
                let run = runs.get(&vm).cloned().unwrap_or_default();
                v1::ProtectionStatus {
                    vm,
                    plan: record.plan,
                    volumes: record.volumes,
                    every_ms: record.every_ms,
                    keep: record.keep,
                    last_snapshot: run.last_snapshot,
                    last_snapshot_at_unix_ms: run.last_at,
                    next_due_unix_ms: run.next_due,
                    missed: run.missed,
                    last_error: run.last_error,
                }
            })
            .collect()
    }

    /// The newest scheduled snapshot any volume of the group holds here (after a
    /// restart, the schedule goes on from it).
    fn newest_scheduled(&self, record: &ProtectionRecord) -> Option<(String, u64)> {
        record
            .volumes
            .iter()
            .filter_map(|volume| self.snapshot_records(volume).ok())
            .flatten()
            .filter(|(name, snapshot)| scheduled_at(name).is_some() && snapshot.deleting.is_empty())
            .max_by_key(|(_, snapshot)| snapshot.created_at_unix_ms)
            .map(|(name, snapshot)| (name, snapshot.created_at_unix_ms))
    }

    /// Runs the schedules until the node stops: each due one takes its group snapshot
    /// and applies its retention. With no schedule it sleeps until a record changes.
    pub async fn protection_loop(self: Arc<Self>, tick: Duration) {
        let mut changes = self.records.changes();
        loop {
            tokio::time::sleep(tick).await;
            changes.borrow_and_update();
            let Ok(records) = self.records.list::<ProtectionRecord>() else {
                continue;
            };
            if records.is_empty() {
                let _ = changes.changed().await;
                continue;
            }
            for (vm, record) in records {
                self.run_if_due(&vm, &record).await;
            }
        }
    }

    async fn run_if_due(&self, vm: &str, record: &ProtectionRecord) {
        let now = now_unix_ms();
        let mut next_due = self.runs().get(vm).map_or(0, |run| run.next_due);
        if next_due == 0 {
            // First look since the node started (or since the schedule changed).
            let newest = self.newest_scheduled(record);
            let from = newest
                .as_ref()
                .map_or(record.since_unix_ms, |(_, at)| *at)
                .max(record.since_unix_ms);
            next_due = from + record.every_ms;
            let mut runs = self.runs();
            let run = runs.entry(vm.to_string()).or_default();
            run.next_due = next_due;
            if let Some((name, at)) = newest {
                run.last_snapshot = name;
                run.last_at = at;
            }
        }
        if now < next_due {
            return;
        }
        let late = now - next_due;
        if late > record.every_ms {
            let skipped = late / record.every_ms;
            self.protection_event(
                vm,
                record,
                &format!(
                    "missed {skipped} scheduled snapshot(s): the run due at {next_due} Unix ms comes {late} ms late (the node was down or busy)"
                ),
            );
            self.runs().entry(vm.to_string()).or_default().missed += skipped;
        }
        let name = format!("{PREFIX}{now}");
        match self.group_snapshot(vm, record, &name, now).await {
            Ok(()) => {
                let mut runs = self.runs();
                let run = runs.entry(vm.to_string()).or_default();
                run.last_snapshot = name;
                run.last_at = now;
                run.last_error.clear();
                // The next one on the schedule's grid after now.
                run.next_due = next_due + (late / record.every_ms + 1) * record.every_ms;
            }
            Err(status) => {
                let why = status.message().to_string();
                self.protection_event(vm, record, &format!("missed a scheduled snapshot: {why}"));
                let mut runs = self.runs();
                let run = runs.entry(vm.to_string()).or_default();
                run.missed += 1;
                run.last_error = why;
                run.next_due = now + RETRY_MS.min(record.every_ms);
                return;
            }
        }
        for volume in &record.volumes {
            if let Err(status) = self.retain(volume, record.keep).await {
                self.protection_event(
                    vm,
                    record,
                    &format!(
                        "retention of volume `{volume}` failed (it is tried again after the next snapshot): {}",
                        status.message()
                    ),
                );
            }
        }
    }

    fn protection_event(&self, vm: &str, record: &ProtectionRecord, what: &str) {
        eprintln!(
            "cairn-node: protection: vm {vm} (plan {}): {what}",
            record.plan
        );
        for volume in &record.volumes {
            self.events
                .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                    name: volume.clone(),
                    health: v1::Health::Degraded as i32,
                    detail: format!(
                        "protection: vm {vm} (plan {}, every {} ms): {what}",
                        record.plan, record.every_ms
                    ),
                    deleted: false,
                }));
        }
    }

    /// One group snapshot of every volume of `record` (see the module docs). Every
    /// volume must be written here: a group split over nodes would not be one instant.
    async fn group_snapshot(
        &self,
        vm: &str,
        record: &ProtectionRecord,
        name: &str,
        created_at: u64,
    ) -> Result<(), Status> {
        let mut volumes = record.volumes.clone();
        volumes.sort();
        volumes.dedup();
        let mut entries = Vec::with_capacity(volumes.len());
        for volume in &volumes {
            entries.push(
                self.writer_entry(volume, "snapshot")
                    .await
                    .map_err(|status| {
                        Status::failed_precondition(format!(
                            "vm {vm}'s volume `{volume}` cannot be snapshotted on node {}: {}",
                            self.node_name,
                            status.message()
                        ))
                    })?,
            );
        }
        let started = Instant::now();
        let mut guards = Vec::with_capacity(entries.len());
        for entry in &entries {
            guards.push(entry.write_lock.lock().await);
        }
        for entry in &entries {
            self.check_writer(entry)?;
        }
        let quiesced = started.elapsed();
        let deadline = Instant::now() + self.freeze_bound;
        for entry in &entries {
            self.snapshot_locked(entry, name, created_at, deadline)
                .await?;
        }
        drop(guards);
        eprintln!(
            "cairn-node: protection: vm {vm}: group snapshot {name} of {} volume(s): locks taken in {} ms, held {} ms",
            entries.len(),
            quiesced.as_millis(),
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Deletes the oldest scheduled snapshots of `volume` beyond `keep`.
    async fn retain(&self, volume: &str, keep: u32) -> Result<(), Status> {
        let mut scheduled: Vec<(u64, String)> = Vec::new();
        // The base of the next delta to another site and the snapshot in transfer
        // stay (`delta.rs`), beyond `keep` if need be.
        let pinned = self.replication_pins(volume);
        for (name, record) in self.snapshot_records(volume)? {
            let Some(at) = scheduled_at(&name) else {
                continue;
            };
            if pinned.contains(&name) {
                continue;
            }
            if record.deleting.is_empty() {
                scheduled.push((at, name));
            } else {
                // Deleted here, not yet on every copy: finish it (not counted as kept).
                self.delete_snapshot(volume, &name).await?;
            }
        }
        scheduled.sort();
        let excess = scheduled.len().saturating_sub(keep as usize);
        for (_, name) in scheduled.into_iter().take(excess) {
            self.delete_snapshot(volume, &name).await?;
        }
        Ok(())
    }
}
