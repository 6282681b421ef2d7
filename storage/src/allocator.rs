//! The extent allocator of one disk: a bump pointer plus a coalesced free list below it.
//!
//! Pure bookkeeping: the store persists an allocator as its disk's row (capacity and
//! high-water mark) plus the free ranges (table `free`).

use std::collections::BTreeMap;

/// Extent allocator of one disk: a bump pointer plus a coalesced free list below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Allocator {
    pub(crate) capacity: u64,
    /// Everything at or above this offset is free.
    pub(crate) high_water: u64,
    /// Free ranges below `high_water`: offset -> length, coalesced.
    pub(crate) free: BTreeMap<u64, u64>,
}

impl Allocator {
    /// Bytes currently allocated to extents.
    pub(crate) fn allocated(&self) -> u64 {
        self.high_water - self.free.values().sum::<u64>()
    }

    /// First-fit allocation of `len` bytes; `None` when the disk is full.
    pub(crate) fn allocate(&mut self, len: u64) -> Option<u64> {
        let hit = self
            .free
            .iter()
            .find(|&(_, &l)| l >= len)
            .map(|(&o, &l)| (o, l));
        if let Some((offset, range_len)) = hit {
            self.free.remove(&offset);
            if range_len > len {
                self.free.insert(offset + len, range_len - len);
            }
            return Some(offset);
        }
        if self.capacity - self.high_water >= len {
            let offset = self.high_water;
            self.high_water += len;
            return Some(offset);
        }
        None
    }

    /// Marks `[offset, offset + len)` allocated, as journal replay finds it; a range that
    /// is already allocated stays so (replay is idempotent).
    pub(crate) fn claim(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        if end > self.high_water {
            let old_high_water = self.high_water;
            self.high_water = end;
            if offset > old_high_water {
                self.free.insert(old_high_water, offset - old_high_water);
                self.coalesce(old_high_water);
            } else {
                self.carve(offset, old_high_water);
            }
            return;
        }
        self.carve(offset, end);
    }

    /// Merges the free range at `offset` with its neighbours.
    fn coalesce(&mut self, offset: u64) {
        let Some(len) = self.free.remove(&offset) else {
            return;
        };
        let hw = self.high_water;
        // `release` never sees this range at the top: the caller just raised `high_water`.
        self.high_water = hw.max(offset + len + 1);
        self.release(offset, len);
        self.high_water = hw;
    }

    /// Removes `[start, end)` from the free ranges.
    fn carve(&mut self, start: u64, end: u64) {
        let overlapping: Vec<(u64, u64)> = self
            .free
            .range(..end)
            .filter(|&(&o, &l)| o + l > start)
            .map(|(&o, &l)| (o, l))
            .collect();
        for (o, l) in overlapping {
            self.free.remove(&o);
            if o < start {
                self.free.insert(o, start - o);
            }
            if o + l > end {
                self.free.insert(end, o + l - end);
            }
        }
    }

    /// Returns a range to the allocator, coalescing with neighbours and the high-water mark.
    pub(crate) fn release(&mut self, mut offset: u64, mut len: u64) {
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            self.free.remove(&prev);
            offset = prev;
            len += prev_len;
        }
        if let Some(&next_len) = self.free.get(&(offset + len)) {
            self.free.remove(&(offset + len));
            len += next_len;
        }
        if offset + len == self.high_water {
            self.high_water = offset;
        } else {
            self.free.insert(offset, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(capacity: u64) -> Allocator {
        Allocator {
            capacity,
            high_water: 0,
            free: BTreeMap::new(),
        }
    }

    #[test]
    fn allocator_reuses_and_coalesces() {
        let mut d = disk(4 * 4096);
        let a = d.allocate(4096).unwrap();
        let b = d.allocate(4096).unwrap();
        let c = d.allocate(4096).unwrap();
        assert_eq!((a, b, c), (0, 4096, 8192));
        d.release(a, 4096);
        d.release(b, 4096);
        assert_eq!(d.free.get(&0), Some(&8192));
        assert_eq!(d.allocate(8192), Some(0));
        assert_eq!(d.allocate(8192), None, "only one block left");
        d.release(c, 4096);
        assert_eq!(
            d.high_water, 8192,
            "release at the top lowers the high-water mark"
        );
        assert_eq!(d.allocated(), 8192);
    }

    #[test]
    fn claim_is_idempotent_and_splits_free_ranges() {
        let mut d = disk(16 * 4096);
        d.claim(4 * 4096, 4096);
        assert_eq!(d.high_water, 5 * 4096);
        assert_eq!(d.free.get(&0), Some(&(4 * 4096)));
        d.claim(4 * 4096, 4096);
        assert_eq!(d.allocated(), 4096);
        d.claim(4096, 4096);
        assert_eq!(d.free.get(&0), Some(&4096));
        assert_eq!(d.free.get(&(2 * 4096)), Some(&(2 * 4096)));
        assert_eq!(d.allocated(), 2 * 4096);
        assert_eq!(d.allocate(2 * 4096), Some(2 * 4096));
        // Claiming across the high-water mark.
        d.claim(4 * 4096, 4 * 4096);
        assert_eq!(d.high_water, 8 * 4096);
        assert_eq!(d.allocated(), 7 * 4096);
    }
}
