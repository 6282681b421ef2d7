//! The metadata schema in redb, and the in-memory copy of everything but the checksums.
//!
//! Everything a volume is made of lives in one redb database (`meta.redb`); every change is
//! one redb write transaction committed with immediate durability, so after a crash the
//! metadata is exactly the last committed state. Checksums are read from redb on demand
//! (there is one per 4 KiB block); the rest is small and held in memory as [`State`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

use redb::{ReadableTable, TableDefinition};

use crate::error::{Result, StorageError};

/// Key/value pairs: "format" and "next_layer".
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// disk id -> encoded [`DiskRecord`].
pub(crate) const DISKS: TableDefinition<u32, &[u8]> = TableDefinition::new("disks");
/// (disk id, byte offset) -> length of a free range below the disk's high-water mark.
pub(crate) const FREE: TableDefinition<(u32, u64), u64> = TableDefinition::new("free");
/// volume name -> encoded [`VolumeRecord`].
pub(crate) const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// (volume, snapshot) -> encoded [`SnapshotRecord`].
pub(crate) const SNAPSHOTS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("snapshots");
/// layer id -> (parent layer id or 0, reference count).
pub(crate) const LAYERS: TableDefinition<u64, (u64, u64)> = TableDefinition::new("layers");
/// (layer id, stripe-unit index) -> (disk id, byte offset), offset [`ZERO_EXTENT`] for a hole.
pub(crate) const EXTENTS: TableDefinition<(u64, u64), (u32, u64)> = TableDefinition::new("extents");
/// (disk id, block group) -> committed crc32c of up to 64 blocks (see `crcs.rs`).
pub(crate) const CRCS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("crcs");
/// (disk id, block group) -> crc32c of recent writes not yet known to be durable everywhere:
/// read in preference to `CRCS`, kept by recovery only where the data matches.
pub(crate) const PENDING: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("pending");

/// volume -> its sequence number before the one write whose checksums are still pending
/// (at most one row: writes are serialised and the next write promotes the previous one).
pub(crate) const INFLIGHT: TableDefinition<&str, u64> = TableDefinition::new("inflight");

/// Version of the schema above.
pub(crate) const FORMAT_VERSION: u64 = 3;
/// Extent offset that marks a hole masking ancestor data (after a trim).
pub(crate) const ZERO_EXTENT: u64 = u64::MAX;

/// Where a stripe unit of a layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Reads as zeros, even if an ancestor layer has data.
    Zero,
    /// Stored on `disk` at byte `offset`, one stripe unit long.
    At { disk: u32, offset: u64 },
}

impl Extent {
    pub(crate) fn to_raw(self) -> (u32, u64) {
        match self {
            Extent::Zero => (0, ZERO_EXTENT),
            Extent::At { disk, offset } => (disk, offset),
        }
    }

    pub(crate) fn from_raw((disk, offset): (u32, u64)) -> Self {
        if offset == ZERO_EXTENT {
            Extent::Zero
        } else {
            Extent::At { disk, offset }
        }
    }
}

/// A registered disk.
#[derive(Debug)]
pub(crate) struct Disk {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) alloc: Allocator,
}

impl Disk {
    pub(crate) fn record(&self, alloc: &Allocator) -> DiskRecord {
        DiskRecord {
            name: self.name.clone(),
            path: self.path.clone(),
            capacity: alloc.capacity,
            high_water: alloc.high_water,
        }
    }
}

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

/// Decoded disk row, before the file is opened.
#[derive(Debug)]
pub(crate) struct DiskRecord {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) capacity: u64,
    pub(crate) high_water: u64,
}

impl DiskRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.str(&self.name);
        e.str(&self.path.to_string_lossy());
        e.u64(self.capacity);
        e.u64(self.high_water);
        e.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut d = Dec(bytes);
        Some(DiskRecord {
            name: d.str()?,
            path: PathBuf::from(d.str()?),
            capacity: d.u64()?,
            high_water: d.u64()?,
        })
    }
}

/// Stripe geometry shared by a volume, its snapshots and its clones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) size: u64,
    pub(crate) stripe_unit: u64,
    /// Disk id of every stripe column; the stripe width is its length.
    pub(crate) columns: Vec<u32>,
}

impl Geometry {
    fn encode_into(&self, e: &mut Enc) {
        e.u64(self.size);
        e.u64(self.stripe_unit);
        e.u64(self.columns.len() as u64);
        for &c in &self.columns {
            e.u64(u64::from(c));
        }
    }

    fn decode_from(d: &mut Dec<'_>) -> Option<Self> {
        let size = d.u64()?;
        let stripe_unit = d.u64()?;
        let n = d.u64()?;
        let columns = (0..n)
            .map(|_| d.u64().map(|c| c as u32))
            .collect::<Option<Vec<_>>>()?;
        Some(Geometry {
            size,
            stripe_unit,
            columns,
        })
    }
}

/// A writable volume.
#[derive(Debug, Clone)]
pub(crate) struct VolumeRecord {
    pub(crate) geometry: Geometry,
    /// The layer written to; older layers are frozen by snapshots.
    pub(crate) top: u64,
    /// Sequence number of the last write or trim applied (local or replica).
    pub(crate) seq: u64,
}

impl VolumeRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        self.geometry.encode_into(&mut e);
        e.u64(self.top);
        e.u64(self.seq);
        e.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut d = Dec(bytes);
        Some(VolumeRecord {
            geometry: Geometry::decode_from(&mut d)?,
            top: d.u64()?,
            seq: d.u64()?,
        })
    }
}

/// A read-only snapshot: a frozen layer and the geometry it was taken with.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotRecord {
    pub(crate) geometry: Geometry,
    pub(crate) layer: u64,
    /// Volume sequence number at the time of the snapshot.
    pub(crate) seq: u64,
}

impl SnapshotRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        self.geometry.encode_into(&mut e);
        e.u64(self.layer);
        e.u64(self.seq);
        e.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut d = Dec(bytes);
        Some(SnapshotRecord {
            geometry: Geometry::decode_from(&mut d)?,
            layer: d.u64()?,
            seq: d.u64()?,
        })
    }
}

/// A layer of a copy-on-write chain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layer {
    /// 0 for a root layer.
    pub(crate) parent: u64,
    /// Volumes whose top it is, snapshots that freeze it, and child layers.
    pub(crate) refs: u64,
}

/// Everything but checksums, mirrored from redb.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) disks: BTreeMap<u32, Disk>,
    pub(crate) volumes: BTreeMap<String, VolumeRecord>,
    pub(crate) snapshots: BTreeMap<(String, String), SnapshotRecord>,
    pub(crate) layers: BTreeMap<u64, Layer>,
    pub(crate) extents: BTreeMap<(u64, u64), Extent>,
    pub(crate) next_layer: u64,
    /// Upper bound on the rows of the pending-checksum table.
    pub(crate) pending_blocks: usize,
    /// Sequence number of the last journal record written (or replayed).
    pub(crate) journal_seq: u64,
    /// Journal sequence number covered by the last durable redb commit.
    pub(crate) checkpoint: u64,
    /// Next free byte of each disk's journal ring (relative to the ring start).
    pub(crate) journal_heads: BTreeMap<u32, u64>,
    /// Disks holding inline-journaled data written in place but not yet fdatasync'ed; the
    /// next checkpoint or overwrite intent syncs them.
    pub(crate) dirty_disks: std::collections::BTreeSet<u32>,
    /// What opening the store recovered.
    pub(crate) recovery: crate::store::RecoveryReport,
}

impl State {
    /// The extent that holds stripe unit `stripe` as seen from `layer`, walking the parents.
    pub(crate) fn resolve(&self, mut layer: u64, stripe: u64) -> Option<Extent> {
        while layer != 0 {
            if let Some(&extent) = self.extents.get(&(layer, stripe)) {
                return Some(extent);
            }
            layer = self.layers.get(&layer).map_or(0, |l| l.parent);
        }
        None
    }

    pub(crate) fn parent(&self, layer: u64) -> u64 {
        self.layers.get(&layer).map_or(0, |l| l.parent)
    }

    pub(crate) fn disk_name(&self, disk: u32) -> String {
        self.disks
            .get(&disk)
            .map_or_else(|| format!("#{disk}"), |d| d.name.clone())
    }

    /// Loads the state from an open transaction (tables must exist).
    pub(crate) fn load(txn: &redb::ReadTransaction, path: &std::path::Path) -> Result<Self> {
        let corrupt = |reason: String| StorageError::CorruptMetadata {
            path: path.to_owned(),
            reason,
        };
        let mut state = State::default();
        let meta = txn.open_table(META)?;
        let format = meta.get("format")?.map(|v| v.value());
        if format != Some(FORMAT_VERSION) {
            return Err(corrupt(format!(
                "format version {format:?}, expected {FORMAT_VERSION}"
            )));
        }
        state.next_layer = meta.get("next_layer")?.map_or(1, |v| v.value());
        state.checkpoint = meta.get("checkpoint")?.map_or(0, |v| v.value());
        state.journal_seq = state.checkpoint;
        for row in txn.open_table(DISKS)?.iter()? {
            let (id, bytes) = row?;
            let rec = DiskRecord::decode(bytes.value())
                .ok_or_else(|| corrupt(format!("disk {}", id.value())))?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&rec.path)
                .map_err(|e| {
                    StorageError::io(
                        format!("opening disk `{}` at {}", rec.name, rec.path.display()),
                        e,
                    )
                })?;
            state.disks.insert(
                id.value(),
                Disk {
                    name: rec.name,
                    path: rec.path,
                    file,
                    alloc: Allocator {
                        capacity: rec.capacity,
                        high_water: rec.high_water,
                        free: BTreeMap::new(),
                    },
                },
            );
        }
        for row in txn.open_table(FREE)?.iter()? {
            let (key, len) = row?;
            let (disk, offset) = key.value();
            let d = state
                .disks
                .get_mut(&disk)
                .ok_or_else(|| corrupt(format!("free range on unknown disk {disk}")))?;
            d.alloc.free.insert(offset, len.value());
        }
        for row in txn.open_table(VOLUMES)?.iter()? {
            let (name, bytes) = row?;
            let rec = VolumeRecord::decode(bytes.value())
                .ok_or_else(|| corrupt(format!("volume `{}`", name.value())))?;
            state.volumes.insert(name.value().to_owned(), rec);
        }
        for row in txn.open_table(SNAPSHOTS)?.iter()? {
            let (key, bytes) = row?;
            let (vol, snap) = key.value();
            let rec = SnapshotRecord::decode(bytes.value())
                .ok_or_else(|| corrupt(format!("snapshot `{vol}@{snap}`")))?;
            state
                .snapshots
                .insert((vol.to_owned(), snap.to_owned()), rec);
        }
        for row in txn.open_table(LAYERS)?.iter()? {
            let (id, value) = row?;
            let (parent, refs) = value.value();
            state.layers.insert(id.value(), Layer { parent, refs });
        }
        for row in txn.open_table(EXTENTS)?.iter()? {
            let (key, value) = row?;
            state
                .extents
                .insert(key.value(), Extent::from_raw(value.value()));
        }
        Ok(state)
    }
}

/// Little-endian encoder for metadata rows.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Decoder matching [`Enc`]; `None` on truncated or malformed input.
struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }
    fn str(&mut self) -> Option<String> {
        let len = usize::try_from(self.u64()?).ok()?;
        if self.0.len() < len {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8(head.to_vec()).ok()
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

    #[test]
    fn records_round_trip_and_reject_truncation() {
        let rec = VolumeRecord {
            geometry: Geometry {
                size: 1 << 20,
                stripe_unit: 65536,
                columns: vec![0, 2],
            },
            top: 7,
            seq: 9,
        };
        let bytes = rec.encode();
        let back = VolumeRecord::decode(&bytes).unwrap();
        assert_eq!(back.geometry, rec.geometry);
        assert_eq!((back.top, back.seq), (7, 9));
        assert!(VolumeRecord::decode(&bytes[..bytes.len() - 1]).is_none());
    }
}
