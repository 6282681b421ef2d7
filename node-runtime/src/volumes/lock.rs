//! The lock of one volume, and what lets writes to it run side by side.
//!
//! - **Writes share the volume; everything else takes it whole.** A write holds the
//!   volume's lock shared and its byte range exclusively ([`VolumeLock::range`]);
//!   writes whose ranges overlap run one after the other, in the order they asked
//!   (tickets), so every copy applies overlapping writes in the same order. Settling
//!   pending intents, catching a copy up, epochs, resize, delete, snapshots and read
//!   repair take the lock whole ([`VolumeLock::lock`]): they wait until every write in
//!   flight finished, and no write starts while they run. A write never holds the
//!   lock while it waits for a range, so the two cannot wait for each other.
//! - **Intents of writes in flight are not pending.** The write intents in the node's
//!   records name the regions where copies may differ. A write's own intent is *in
//!   flight* ([`VolumeLock::begin_intent`]) from just before it is recorded until it
//!   is removed; only intents that are not in flight (a write that failed, or a crash)
//!   are brought onto the copies by a settle, which takes the lock whole.
//! - **Group commit.** Writes that arrive together and need a record (an extent that
//!   is not hot yet, or a sequence number past the reserved high-water mark:
//!   `activity.rs`) make it in one durable transaction of `node.redb`
//!   ([`Volumes::record_intent`]): the first becomes the leader and commits every
//!   record queued until then; those behind it find theirs committed. Most writes
//!   need none.
//! - **Replica writes out of order.** The writer numbers its writes when they start,
//!   but several are shipped at once, so a replica can receive number 7 before 6 (they
//!   never overlap: overlapping writes are in flight one at a time). The volume store
//!   drops a write whose number is not above the volume's as a retry; the replica
//!   remembers the numbers and regions of its recent writes ([`VolumeLock::arrival`])
//!   to tell a late write (applied with `apply_replica_unordered`) from a retry of one
//!   it applied, or from a stale one that a newer overlapping write already replaced.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{Notify, RwLock, RwLockReadGuard, RwLockWriteGuard, oneshot};
use tonic::Status;

use super::{VolumeEntry, Volumes, activity, records_status};
use crate::records::SnapshotRecord;

/// How many applied replica writes a copy remembers for telling late writes from
/// retries (far more than a writer has in flight).
const REMEMBERED_WRITES: usize = 4096;

fn guard<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct VolumeLock {
    /// Shared by writes, taken whole by everything else.
    gate: RwLock<()>,
    /// Byte ranges of writes, by ticket (the order they asked in).
    ranges: Mutex<Ranges>,
    /// Woken when a range is released.
    released: Notify,
    /// Intent keys of writes in flight (a count per key).
    in_flight: Mutex<BTreeMap<String, usize>>,
    /// Intents waiting for the next group commit.
    queued: Mutex<Vec<Queued>>,
    /// Held by the writer committing a group.
    leader: tokio::sync::Mutex<()>,
    /// A replica's recent writes: sequence number → (offset, end).
    applied: Mutex<BTreeMap<u64, (u64, u64)>>,
    /// The writer's hot extents (`activity.rs`).
    pub(super) activity: activity::Activity,
}

#[derive(Debug, Default)]
struct Ranges {
    next_ticket: u64,
    held: BTreeMap<u64, (u64, u64)>,
}

#[derive(Debug)]
struct Queued {
    /// Hot extents to record.
    keys: Vec<String>,
    /// The high-water mark to record.
    sequence: u64,
    done: oneshot::Sender<Result<(), String>>,
}

/// A write's hold on its byte range (and the volume's lock, shared).
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a VolumeLock,
    ticket: u64,
    _shared: RwLockReadGuard<'a, ()>,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.release(self.ticket);
    }
}

/// A range asked for but not held yet: released if the write is dropped while it
/// waits.
struct Waiting<'a> {
    lock: &'a VolumeLock,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.ticket != 0 {
            self.lock.release(self.ticket);
        }
    }
}

/// A write's intent key, in flight until this is dropped.
#[derive(Debug)]
pub struct InFlight<'a> {
    lock: &'a VolumeLock,
    key: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = guard(&self.lock.in_flight);
        if let Some(count) = in_flight.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.key);
            }
        }
    }
}

/// A write's hold on its hot extents (`activity.rs`). A write that ends without
/// [`WriteIntent::done`] or [`WriteIntent::keep`] (its future dropped mid-way) keeps
/// its region: recorded durably as a pending intent before its extents may cool.
pub struct WriteIntent<'a> {
    volumes: &'a Volumes,
    entry: &'a VolumeEntry,
    key: String,
    first: u64,
    last: u64,
    /// Extents the write never entered.
    missing: Vec<u64>,
    settled: bool,
}

impl WriteIntent<'_> {
    /// Every in-sync copy holds the write: nothing to keep.
    pub fn done(mut self) {
        self.settled = true;
    }

    /// The write failed somewhere: its region becomes a pending intent, durably, for
    /// the settle to bring onto the copies.
    pub fn keep(mut self) -> Result<(), Status> {
        self.record()?;
        self.settled = true;
        Ok(())
    }

    fn record(&self) -> Result<(), Status> {
        self.volumes
            .records
            .put_intent(&self.entry.record.name, &self.key, 0)
            .map_err(records_status)
    }
}

impl Drop for WriteIntent<'_> {
    fn drop(&mut self) {
        if !self.settled && self.record().is_err() {
            // Not recorded: the extents stay hot (never cooled), so the region is
            // still settled after the next start.
            return;
        }
        self.entry
            .write_lock
            .activity
            .leave(self.first, self.last, &self.missing);
    }
}

/// How a replica write relates to what this copy applied recently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Not applied here yet, and no newer write of its region was: apply it.
    New,
    /// Applied already (a retry): acknowledge without applying.
    Seen,
    /// A newer write overlapping it was applied: it is a stale copy of a write that
    /// was settled meanwhile; acknowledge without applying.
    Stale,
}

impl VolumeLock {
    /// The whole volume: waits until every write in flight finished; no write starts
    /// until the guard is dropped.
    pub async fn lock(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().await
    }

    /// `[offset, offset + length)` for a write, after every earlier write overlapping
    /// it finished, and the volume's lock shared.
    pub async fn range(&self, offset: u64, length: u64) -> RangeGuard<'_> {
        let end = offset.saturating_add(length);
        let mut waiting = {
            let mut ranges = guard(&self.ranges);
            ranges.next_ticket += 1;
            let ticket = ranges.next_ticket;
            ranges.held.insert(ticket, (offset, end));
            Waiting { lock: self, ticket }
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let blocked = guard(&self.ranges)
                .held
                .range(..waiting.ticket)
                .any(|(_, &(start, stop))| start < end && offset < stop);
            if !blocked {
                break;
            }
            released.await;
        }
        let shared = self.gate.read().await;
        let ticket = std::mem::replace(&mut waiting.ticket, 0);
        RangeGuard {
            lock: self,
            ticket,
            _shared: shared,
        }
    }

    fn release(&self, ticket: u64) {
        guard(&self.ranges).held.remove(&ticket);
        self.released.notify_waiters();
    }

    /// Marks a write's intent key in flight until the returned guard is dropped.
    pub fn begin_intent(&self, key: &str) -> InFlight<'_> {
        *guard(&self.in_flight).entry(key.to_string()).or_default() += 1;
        InFlight {
            lock: self,
            key: key.to_string(),
        }
    }

    /// Whether a write in flight owns intent `key`.
    pub fn in_flight(&self, key: &str) -> bool {
        guard(&self.in_flight).contains_key(key)
    }

    /// Where a replica write of `sequence` over `[offset, offset + length)` stands.
    pub fn arrival(&self, sequence: u64, offset: u64, length: u64) -> Arrival {
        let end = offset.saturating_add(length);
        let applied = guard(&self.applied);
        if applied.contains_key(&sequence) {
            return Arrival::Seen;
        }
        let replaced = applied
            .range(sequence + 1..)
            .any(|(_, &(start, stop))| start < end && offset < stop);
        if replaced {
            Arrival::Stale
        } else {
            Arrival::New
        }
    }

    /// Remembers an applied replica write.
    pub fn applied(&self, sequence: u64, offset: u64, length: u64) {
        let mut applied = guard(&self.applied);
        applied.insert(sequence, (offset, offset.saturating_add(length)));
        while applied.len() > REMEMBERED_WRITES {
            applied.pop_first();
        }
    }
}

impl Volumes {
    /// Makes a write's region known to survive a crash before it is shipped
    /// (`activity.rs`): the extents it touches are hot, and the volume's sequence
    /// high-water mark covers `sequence`. Only when one of them is not yet is
    /// anything committed: the missing hot extents and a mark [`activity::RESERVE`]
    /// numbers ahead, durably, together with those of the writes queued at the same
    /// moment (one commit for all of them: group commit). The write's own region
    /// (`key`) is recorded durably only if it fails or is abandoned
    /// ([`WriteIntent`]).
    pub(super) async fn record_intent<'a>(
        &'a self,
        entry: &'a VolumeEntry,
        key: String,
        offset: u64,
        length: u64,
        sequence: u64,
    ) -> Result<WriteIntent<'a>, Status> {
        let lock = &entry.write_lock;
        let (first, last) = activity::extents(offset, length);
        let missing = lock.activity.enter(first, last);
        let mut intent = WriteIntent {
            volumes: self,
            entry,
            key,
            first,
            last,
            missing,
            settled: false,
        };
        if intent.missing.is_empty() && lock.activity.covers(sequence) {
            return Ok(intent);
        }
        let name = &entry.record.name;
        let keys: Vec<String> = intent
            .missing
            .iter()
            .map(|index| activity::hot_key(name, *index))
            .collect();
        let (done, mut result) = oneshot::channel();
        guard(&lock.queued).push(Queued {
            keys,
            sequence: sequence.saturating_add(activity::RESERVE - 1),
            done,
        });
        let committed = {
            let _leader = lock.leader.lock().await;
            match result.try_recv() {
                // A leader before this one committed it.
                Ok(committed) => committed,
                Err(_) => {
                    let batch = std::mem::take(&mut *guard(&lock.queued));
                    let keys: Vec<String> = batch
                        .iter()
                        .flat_map(|queued| queued.keys.iter().cloned())
                        .collect();
                    let high_water = batch
                        .iter()
                        .map(|queued| queued.sequence)
                        .max()
                        .unwrap_or(0);
                    let committed = self
                        .records
                        .put_intents(name, &keys, high_water)
                        .map_err(|error| records_status(error).message().to_string());
                    if committed.is_ok() {
                        lock.activity.reserved_up_to(high_water);
                    }
                    for queued in batch {
                        let _ = queued.done.send(committed.clone());
                    }
                    result.try_recv().unwrap_or_else(|_| {
                        Err("the write's intent was not in the group it committed".into())
                    })
                }
            }
        };
        match committed {
            Ok(()) => {
                lock.activity.entered(&intent.missing);
                intent.missing.clear();
                Ok(intent)
            }
            Err(message) => {
                // Nothing was shipped: nothing to keep.
                intent.settled = true;
                Err(Status::internal(message))
            }
        }
    }

    /// Forgets the hot extents of `entry` that saw no write for
    /// [`activity::COOL_AFTER`] (their records removed without a sync). Serialised
    /// with the group commit, so an extent a write just made hot again is never
    /// removed after it was recorded.
    pub(super) async fn cool(&self, entry: &VolumeEntry) {
        let lock = &entry.write_lock;
        let _leader = lock.leader.lock().await;
        for index in lock.activity.cool(activity::COOL_AFTER) {
            let key = activity::hot_key(&entry.record.name, index);
            if let Err(error) = self.records.remove_intent(&key, redb::Durability::None) {
                eprintln!("cairn-node: could not cool {key}: {error}");
            }
        }
    }

    /// Whether a write must settle the volume first (with the lock whole): an intent
    /// that no write in flight owns (a failed write, or one from before a crash), a
    /// reconciliation after a promotion, or a snapshot an in-sync copy has not taken.
    pub(super) fn needs_settle(&self, entry: &VolumeEntry) -> Result<bool, Status> {
        if entry.writer_state().reconcile_pending {
            return Ok(true);
        }
        let name = &entry.record.name;
        let pending = self
            .records
            .intents(&format!("{name}/"))
            .map_err(records_status)?
            .iter()
            .any(|key| !entry.write_lock.in_flight(key));
        Ok(pending || self.snapshots_pending(entry)?)
    }

    /// Whether an in-sync copy has a snapshot to take before the next write (what
    /// `settle_snapshots_locked` sends).
    fn snapshots_pending(&self, entry: &VolumeEntry) -> Result<bool, Status> {
        let prefix = format!("{}/", entry.record.name);
        let (_, in_sync, _, _) = self.targets(entry);
        Ok(self
            .records
            .list::<SnapshotRecord>()
            .map_err(records_status)?
            .iter()
            .filter(|(key, _)| key.starts_with(&prefix))
            .any(|(_, record)| {
                in_sync
                    .iter()
                    .any(|peer| record.pending.contains_key(&peer.name))
            }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn overlapping_ranges_wait_in_order_and_others_run_beside_them() {
        let lock = Arc::new(VolumeLock::default());
        let first = lock.range(0, 8192).await;
        // Beside it: no wait.
        let beside = tokio::time::timeout(Duration::from_millis(200), lock.range(8192, 4096))
            .await
            .expect("a range beside a held one is granted at once");
        drop(beside);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for index in 0..3u64 {
            let (lock, order) = (lock.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                // Each overlaps the held range and the ones asked before it.
                let _held = lock.range(0, 4096 * (index + 1)).await;
                guard(&order).push(index);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            // Each asks after the previous one did.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            guard(&order).is_empty(),
            "overlapping ranges wait for the held one"
        );
        drop(first);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*guard(&order), vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn the_whole_lock_waits_for_writes_in_flight_and_holds_new_ones() {
        let lock = Arc::new(VolumeLock::default());
        let write = lock.range(0, 4096).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), lock.lock())
                .await
                .is_err(),
            "the whole lock waits for a write in flight"
        );
        drop(write);
        let whole = lock.lock().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), lock.range(1 << 20, 4096))
                .await
                .is_err(),
            "no write starts while the lock is held whole"
        );
        drop(whole);
        drop(lock.range(1 << 20, 4096).await);
    }

    #[test]
    fn replica_arrivals_tell_late_writes_from_retries_and_stale_copies() {
        let lock = VolumeLock::default();
        lock.applied(7, 0, 4096);
        assert_eq!(lock.arrival(7, 0, 4096), Arrival::Seen);
        assert_eq!(
            lock.arrival(6, 8192, 4096),
            Arrival::New,
            "a late write beside it"
        );
        assert_eq!(lock.arrival(5, 0, 8192), Arrival::Stale, "replaced by 7");
        assert_eq!(lock.arrival(8, 0, 4096), Arrival::New);
        let key = "v/00000000000000000000/0000004096";
        let first = lock.begin_intent(key);
        let second = lock.begin_intent(key);
        drop(first);
        assert!(lock.in_flight(key));
        drop(second);
        assert!(!lock.in_flight(key));
    }
}
