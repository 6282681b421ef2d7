//! The writer's activity log: write intents per hot extent, not per write.
//!
//! A region where the copies may differ must be known to the writer after a crash,
//! so that it brings the region onto every in-sync copy before it acknowledges the
//! next write (`epochs.rs`, settling). Recording every write's region durably before
//! shipping it cost one `node.redb` fsync per write, a flush round of its own in
//! front of the data's, on a disk the copies share. DRBD's answer is its activity
//! log, and this is the same:
//!
//! - the volume is cut into [`EXTENT`]-sized extents; before a write is shipped,
//!   every extent it touches is *hot*: recorded durably in `write_intents` as
//!   `VOLUME#hot/INDEX` (the first write into a cold extent commits it, in one group
//!   commit with the other writes that arrive meanwhile; the writes after it find it
//!   hot and record nothing);
//! - the sequence high-water mark is reserved [`RESERVE`] numbers ahead in the same
//!   commit, so a number is still never shipped before a durable mark covers it;
//! - an extent cools when no write has been in it for [`COOL_AFTER`]: its record is
//!   removed without a sync (a removal lost in a crash only widens the next resync);
//! - a write that fails, or is abandoned, records its own region durably (the
//!   per-write intent that settling ships) before its extent may cool;
//! - at start, every hot extent left by a crash becomes pending intents of its
//!   regions (`Volumes::open`), which the settle ships to the in-sync copies before the
//!   next write, exactly as a per-write intent left by a crash was.
//!
//! What it costs: after a crash a hot extent is resynchronised whole (at most
//! [`EXTENT`] per extent written in the last [`COOL_AFTER`]), where per-write intents
//! shipped only the writes in flight.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes of one activity-log extent.
pub const EXTENT: u64 = 64 << 20;
/// Sequence numbers reserved by one durable high-water mark.
pub const RESERVE: u64 = 1 << 16;
/// How long an extent stays hot after its last write.
pub const COOL_AFTER: Duration = Duration::from_secs(2);

/// The record key of a hot extent.
pub fn hot_key(volume: &str, index: u64) -> String {
    format!("{}{index:012}", hot_prefix(volume))
}

/// The prefix of a volume's hot extents (`#` never appears in a volume's name).
pub fn hot_prefix(volume: &str) -> String {
    format!("{volume}#hot/")
}

/// The extent index of a hot key.
pub fn parse_hot_key(key: &str) -> Option<u64> {
    key.rsplit_once('/')?.1.parse().ok()
}

/// The extents `[first, last]` a write touches.
pub fn extents(offset: u64, length: u64) -> (u64, u64) {
    (
        offset / EXTENT,
        offset.saturating_add(length.max(1) - 1) / EXTENT,
    )
}

/// A volume's hot extents (in memory; `node.redb` holds the durable ones) and its
/// reserved sequence numbers.
#[derive(Debug, Default)]
pub struct Activity {
    hot: Mutex<BTreeMap<u64, Hot>>,
    /// Numbers below this are covered by the durable high-water mark.
    reserved: AtomicU64,
}

#[derive(Debug)]
struct Hot {
    writers: usize,
    last: Instant,
}

impl Activity {
    fn hot(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Hot>> {
        self.hot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a write into the extents `[first, last]` that are hot, and returns
    /// those that are not (the write records them durably, then calls
    /// [`Activity::entered`]).
    pub fn enter(&self, first: u64, last: u64) -> Vec<u64> {
        let mut hot = self.hot();
        let mut missing = Vec::new();
        for index in first..=last {
            match hot.get_mut(&index) {
                Some(extent) => extent.writers += 1,
                None => missing.push(index),
            }
        }
        missing
    }

    /// The extents a write recorded durably are hot, the write counted in them.
    pub fn entered(&self, indices: &[u64]) {
        let mut hot = self.hot();
        let now = Instant::now();
        for index in indices {
            hot.entry(*index)
                .or_insert(Hot {
                    writers: 0,
                    last: now,
                })
                .writers += 1;
        }
    }

    /// A write left the extents `[first, last]` except `skip` (which it never
    /// entered).
    pub fn leave(&self, first: u64, last: u64, skip: &[u64]) {
        let mut hot = self.hot();
        let now = Instant::now();
        for index in (first..=last).filter(|index| !skip.contains(index)) {
            if let Some(extent) = hot.get_mut(&index) {
                extent.writers = extent.writers.saturating_sub(1);
                extent.last = now;
            }
        }
    }

    /// Forgets and returns the extents without a write since `after`.
    pub fn cool(&self, after: Duration) -> Vec<u64> {
        let mut hot = self.hot();
        let now = Instant::now();
        let idle: Vec<u64> = hot
            .iter()
            .filter(|(_, extent)| extent.writers == 0 && now.duration_since(extent.last) >= after)
            .map(|(index, _)| *index)
            .collect();
        for index in &idle {
            hot.remove(index);
        }
        idle
    }

    /// Whether the durable high-water mark covers `sequence`.
    pub fn covers(&self, sequence: u64) -> bool {
        sequence < self.reserved.load(Ordering::Acquire)
    }

    /// The durable high-water mark is now `high_water`.
    pub fn reserved_up_to(&self, high_water: u64) {
        self.reserved
            .fetch_max(high_water.saturating_add(1), Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_hot_while_written_and_cool_when_idle() {
        assert_eq!(extents(0, 4096), (0, 0));
        assert_eq!(extents(EXTENT - 4096, 8192), (0, 1));
        assert_eq!(parse_hot_key(&hot_key("v", 7)), Some(7));
        assert!(hot_key("v", 7).starts_with(&hot_prefix("v")));
        let activity = Activity::default();
        assert_eq!(activity.enter(0, 1), vec![0, 1]);
        activity.entered(&[0, 1]);
        assert_eq!(activity.enter(1, 1), Vec::<u64>::new());
        activity.leave(0, 1, &[]);
        // Extent 1 still has the second write.
        assert_eq!(activity.cool(Duration::ZERO), vec![0]);
        activity.leave(1, 1, &[]);
        assert_eq!(activity.cool(Duration::from_secs(60)), Vec::<u64>::new());
        assert_eq!(activity.cool(Duration::ZERO), vec![1]);
        assert_eq!(
            activity.enter(0, 1),
            vec![0, 1],
            "cooled extents are cold again"
        );
        assert!(!activity.covers(1));
        activity.reserved_up_to(RESERVE);
        assert!(activity.covers(RESERVE) && !activity.covers(RESERVE + 1));
    }
}
