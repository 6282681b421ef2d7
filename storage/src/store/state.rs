//! The in-memory mirror of the store's metadata: everything in redb but the checksums.
//!
//! Loaded once when the store opens; every change is made to redb first (or in the same
//! step, under the store's write lock) and then mirrored here, so reads never touch redb
//! for anything but checksums.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use redb::ReadableTable;

use super::RecoveryReport;
use crate::allocator::Allocator;
use crate::error::{Result, StorageError};
use crate::meta::{
    self, DISKS, DiskRecord, EXTENTS, Extent, FREE, LAYERS, META, SNAPSHOTS, SnapshotRecord,
    VOLUMES, VolumeRecord,
};

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
    pub(crate) dirty_disks: BTreeSet<u32>,
    /// What opening the store recovered.
    pub(crate) recovery: RecoveryReport,
}

impl State {
    /// The record of volume `name`, or [`StorageError::UnknownVolume`].
    pub(crate) fn volume(&self, name: &str) -> Result<&VolumeRecord> {
        self.volumes
            .get(name)
            .ok_or_else(|| StorageError::UnknownVolume {
                name: name.to_owned(),
            })
    }

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
    pub(crate) fn load(txn: &redb::ReadTransaction, path: &Path) -> Result<Self> {
        let corrupt = |reason: String| StorageError::CorruptMetadata {
            path: path.to_owned(),
            reason,
        };
        let mut state = State::default();
        let meta = txn.open_table(META)?;
        meta::check_format(meta.get("format")?.map(|v| v.value()), path)?;
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
