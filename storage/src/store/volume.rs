//! Volumes: creating, growing and deleting them, and the [`Volume`] handle through which
//! they are read and written.

use std::fs::File;

use super::checkpoint::write_disk_rows;
use super::layers::{ReleasePlan, fold_into_only_child, release_layer};
use super::state::{Disk, Layer, State};
use super::write::WriteMode;
use super::{
    BLOCK_SIZE, BadBlock, Location, MAX_IO, MAX_STRIPE_UNIT, MAX_STRIPE_WIDTH, MIN_STRIPE_UNIT,
    Store, VolumeInfo, VolumeSpec, WriteReceipt, check_io, check_range, crc_blocks, io_err,
    validate_name,
};
use crate::error::{Result, StorageError};
use crate::meta::{Extent, Geometry, LAYERS, META, VOLUMES, VolumeRecord};

impl Store {
    /// Creates an empty thin volume.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<Volume> {
        validate_name("name", &spec.name)?;
        let su = spec.stripe_unit;
        if !su.is_power_of_two() || !(MIN_STRIPE_UNIT..=MAX_STRIPE_UNIT).contains(&su) {
            return Err(StorageError::invalid(
                "stripe_unit",
                format!(
                    "{su} must be a power of two between {MIN_STRIPE_UNIT} and {MAX_STRIPE_UNIT}"
                ),
            ));
        }
        if spec.size == 0 || !spec.size.is_multiple_of(BLOCK_SIZE) {
            return Err(StorageError::invalid(
                "size",
                format!("{} must be a positive multiple of {BLOCK_SIZE}", spec.size),
            ));
        }
        if spec.stripe_width == 0 || spec.stripe_width > MAX_STRIPE_WIDTH {
            return Err(StorageError::invalid(
                "stripe_width",
                format!("{} must be 1 to {MAX_STRIPE_WIDTH}", spec.stripe_width),
            ));
        }
        let mut st = self.write_state();
        if st.volumes.contains_key(&spec.name) {
            return Err(StorageError::AlreadyExists {
                kind: "volume",
                name: spec.name.clone(),
            });
        }
        let columns: Vec<u32> = if spec.disks.is_empty() {
            if st.disks.len() < spec.stripe_width {
                return Err(StorageError::invalid(
                    "stripe_width",
                    format!(
                        "{} columns need as many disks, the store has {}",
                        spec.stripe_width,
                        st.disks.len()
                    ),
                ));
            }
            let mut by_free: Vec<(&u32, &Disk)> = st.disks.iter().collect();
            let free = |d: &Disk| d.alloc.capacity - d.alloc.allocated();
            by_free.sort_by(|a, b| free(b.1).cmp(&free(a.1)).then(a.1.name.cmp(&b.1.name)));
            by_free
                .iter()
                .take(spec.stripe_width)
                .map(|(id, _)| **id)
                .collect()
        } else {
            if spec.disks.len() != spec.stripe_width {
                return Err(StorageError::invalid(
                    "disks",
                    format!(
                        "{} disks given for a stripe width of {}",
                        spec.disks.len(),
                        spec.stripe_width
                    ),
                ));
            }
            let mut ids = Vec::new();
            for name in &spec.disks {
                let id = st
                    .disks
                    .iter()
                    .find(|(_, d)| &d.name == name)
                    .map(|(&id, _)| id)
                    .ok_or_else(|| StorageError::UnknownDisk { name: name.clone() })?;
                if ids.contains(&id) {
                    return Err(StorageError::invalid(
                        "disks",
                        format!("disk `{name}` named twice; columns need distinct disks"),
                    ));
                }
                ids.push(id);
            }
            ids
        };
        let layer = st.next_layer;
        let rec = VolumeRecord {
            geometry: Geometry {
                size: spec.size,
                stripe_unit: su,
                columns,
            },
            top: layer,
            seq: 0,
        };
        let txn = self.inner.db.begin_write()?;
        {
            txn.open_table(META)?.insert("next_layer", layer + 1)?;
            txn.open_table(LAYERS)?.insert(layer, (0, 1))?;
            txn.open_table(VOLUMES)?
                .insert(spec.name.as_str(), rec.encode().as_slice())?;
        }
        self.checkpoint_commit(txn, &mut st)?;
        st.next_layer = layer + 1;
        st.layers.insert(layer, Layer { parent: 0, refs: 1 });
        st.volumes.insert(spec.name.clone(), rec);
        Ok(Volume {
            store: self.clone(),
            name: spec.name.clone(),
        })
    }

    /// A handle on an existing volume.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        if !self.read_state().volumes.contains_key(name) {
            return Err(StorageError::UnknownVolume {
                name: name.to_owned(),
            });
        }
        Ok(Volume {
            store: self.clone(),
            name: name.to_owned(),
        })
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let st = self.read_state();
        st.volumes
            .iter()
            .map(|(name, rec)| volume_info(&st, name, rec))
            .collect()
    }

    /// Deletes a volume without snapshots and frees the extents only it used.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut st = self.write_state();
        let rec = st.volume(name)?.clone();
        let count = st.snapshots.keys().filter(|(v, _)| v == name).count();
        if count > 0 {
            return Err(StorageError::HasSnapshots {
                volume: name.to_owned(),
                count,
            });
        }
        let mut plan = ReleasePlan::new(&st);
        let txn = self.inner.db.begin_write()?;
        if let Some(kept) = release_layer(&mut plan, &st, &txn, rec.top)? {
            // A clone's base whose snapshot is gone and that one other layer still
            // builds on.
            fold_into_only_child(&mut plan, &st, &txn, kept, None)?;
        }
        txn.open_table(VOLUMES)?.remove(name)?;
        write_disk_rows(&txn, &st, &plan.disks)?;
        self.checkpoint_commit(txn, &mut st)?;
        plan.apply(&mut st);
        st.volumes.remove(name);
        Ok(())
    }

    /// Grows a volume in place to `new_size` bytes (a positive multiple of
    /// [`BLOCK_SIZE`]). Its data stays where it is and the new space is thin: stripe units
    /// past the old end have no extents and read as zeros, as do the never-written blocks
    /// of a last stripe unit the old end cut through (they have no checksum). The size
    /// lives only in the volume's row, which is committed durably (as a checkpoint)
    /// before this returns, so after a crash the volume has either size, never anything
    /// between, and no write beyond the old end can have been acknowledged before the new
    /// size was durable. The same size changes nothing; a smaller one is refused:
    /// shrinking would drop data. Snapshots keep the size they were taken with.
    pub fn grow_volume(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        if new_size == 0 || !new_size.is_multiple_of(BLOCK_SIZE) {
            return Err(StorageError::invalid(
                "size",
                format!("{new_size} must be a positive multiple of {BLOCK_SIZE}"),
            ));
        }
        let mut st = self.write_state();
        let mut rec = st.volume(name)?.clone();
        let old_size = rec.geometry.size;
        if new_size < old_size {
            return Err(StorageError::invalid(
                "size",
                format!(
                    "shrinking volume `{name}` from {old_size} to {new_size} bytes would lose data; volumes only grow"
                ),
            ));
        }
        if new_size == old_size {
            return Ok(volume_info(&st, name, &rec));
        }
        rec.geometry.size = new_size;
        let txn = self.inner.db.begin_write()?;
        txn.open_table(VOLUMES)?
            .insert(name, rec.encode().as_slice())?;
        self.checkpoint_commit(txn, &mut st)?;
        let info = volume_info(&st, name, &rec);
        st.volumes.insert(name.to_owned(), rec);
        Ok(info)
    }
}

fn volume_info(st: &State, name: &str, rec: &VolumeRecord) -> VolumeInfo {
    let owned = st
        .extents
        .range((rec.top, 0)..=(rec.top, u64::MAX))
        .filter(|(_, e)| matches!(e, Extent::At { .. }))
        .count() as u64;
    VolumeInfo {
        name: name.to_owned(),
        size: rec.geometry.size,
        stripe_unit: rec.geometry.stripe_unit,
        columns: rec
            .geometry
            .columns
            .iter()
            .map(|&c| st.disk_name(c))
            .collect(),
        seq: rec.seq,
        allocated: owned * rec.geometry.stripe_unit,
    }
}

/// A writable volume. Cheap to clone; operations fail with
/// [`StorageError::UnknownVolume`] once the volume is deleted.
#[derive(Debug, Clone)]
pub struct Volume {
    pub(super) store: Store,
    pub(super) name: String,
}

impl Volume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn record(&self, st: &State) -> Result<VolumeRecord> {
        st.volume(&self.name).cloned()
    }

    /// Grows the volume in place (see [`Store::grow_volume`]).
    pub fn grow(&self, new_size: u64) -> Result<VolumeInfo> {
        self.store.grow_volume(&self.name, new_size)
    }

    /// Size, geometry, sequence number and allocation.
    pub fn info(&self) -> Result<VolumeInfo> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        Ok(volume_info(&st, &self.name, &rec))
    }

    /// Reads `buf.len()` bytes at `offset`; both multiples of [`BLOCK_SIZE`]. Unwritten
    /// space reads as zeros; a block failing its checksum gives
    /// [`StorageError::ChecksumMismatch`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        self.store
            .read_layer(&st, &self.name, rec.top, &rec.geometry, offset, buf)
    }

    /// Writes `data` at `offset` (both multiples of [`BLOCK_SIZE`]); durable on return.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<WriteReceipt> {
        let mut st = self.store.write_state();
        let seq = self.store.write_locked(
            &mut st,
            &self.name,
            offset,
            data,
            None,
            WriteMode::Normal,
            None,
        )?;
        Ok(WriteReceipt { seq })
    }

    /// Writes `data` locally like [`Volume::write_at`] and returns the operation to ship to
    /// the replicas, which apply it with [`Store::apply_replica`].
    pub fn write_replicated(
        &self,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<crate::replication::ReplicaOp> {
        let checksums = crc_blocks(&data);
        let mut st = self.store.write_state();
        let seq = self.store.write_locked(
            &mut st,
            &self.name,
            offset,
            &data,
            Some(&checksums),
            WriteMode::Normal,
            None,
        )?;
        Ok(crate::replication::ReplicaOp {
            volume: self.name.clone(),
            seq,
            offset,
            payload: crate::replication::ReplicaPayload::Write { data, checksums },
        })
    }

    /// Makes a range read as zeros. Whole stripe units are trimmed (no space is used, and
    /// a trimmed whole unit always reads as zeros); partial units get zeros written.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<WriteReceipt> {
        let info = self.info()?;
        check_range(&self.name, info.size, offset, length)?;
        let su = info.stripe_unit;
        let end = offset + length;
        let whole_start = offset.div_ceil(su) * su;
        let whole_end = end / su * su;
        let mut receipt = WriteReceipt { seq: info.seq };
        let mut zero_fill = |from: u64, to: u64| -> Result<()> {
            let mut pos = from;
            while pos < to {
                let len = (to - pos).min(MAX_IO);
                receipt = self.write_at(pos, &vec![0u8; len as usize])?;
                pos += len;
            }
            Ok(())
        };
        if whole_start >= whole_end {
            zero_fill(offset, end)?;
            return Ok(receipt);
        }
        zero_fill(offset, whole_start)?;
        zero_fill(whole_end, end)?;
        self.trim(whole_start, whole_end - whole_start)
    }

    /// Discards a range: whole stripe units owned by the volume are freed and read as
    /// zeros, blocks inside owned units read as zeros; ranges still shared with a
    /// snapshot inside a partially covered unit are left as they are (trim is advisory).
    pub fn trim(&self, offset: u64, length: u64) -> Result<WriteReceipt> {
        let mut st = self.store.write_state();
        let seq = self
            .store
            .trim_locked(&mut st, &self.name, offset, length, None)?;
        Ok(WriteReceipt { seq })
    }

    /// Trims like [`Volume::trim`] and returns the operation to ship to the replicas.
    pub fn trim_replicated(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<crate::replication::ReplicaOp> {
        let seq = self.trim(offset, length)?.seq;
        Ok(crate::replication::ReplicaOp {
            volume: self.name.clone(),
            seq,
            offset,
            payload: crate::replication::ReplicaPayload::Trim { length },
        })
    }

    /// Every acknowledged write is already durable; this syncs the volume's disks again
    /// for callers (NBD FLUSH) that want an explicit barrier.
    pub fn flush(&self) -> Result<()> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        let files: Vec<&File> = rec
            .geometry
            .columns
            .iter()
            .filter_map(|c| st.disks.get(c))
            .map(|d| &d.file)
            .collect();
        self.store
            .inner
            .engine
            .sync_data(&files)
            .map_err(io_err(format!("flushing volume `{}`", self.name)))
    }

    /// Reads a range for a peer that is repairing it: the data plus per-block crc32c, so
    /// the receiver can check it end to end. Fails like [`Volume::read_at`] if this copy
    /// is bad too.
    pub fn read_for_repair(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<crate::replication::RepairData> {
        check_io(&self.name, self.info()?.size, offset, length)?;
        let mut data = vec![0u8; length as usize];
        self.read_at(offset, &mut data)?;
        let checksums = crc_blocks(&data);
        Ok(crate::replication::RepairData {
            offset,
            data,
            checksums,
        })
    }

    /// Overwrites blocks with good data from a replica, in place wherever they live (also
    /// in extents shared with snapshots, whose content is by construction the same).
    /// Bypasses checksum verification of the old data; does not change the sequence number.
    pub fn repair(&self, repair: &crate::replication::RepairData) -> Result<()> {
        self.write_verified(repair, WriteMode::Repair, "repair data")
    }

    /// Writes another copy's bytes, checked against their crc32c first, keeping the
    /// sequence number: in place (`Repair`) or copy on write (`Normal`).
    fn write_verified(
        &self,
        data: &crate::replication::RepairData,
        mode: WriteMode,
        what: &str,
    ) -> Result<()> {
        let actual = crc_blocks(&data.data);
        if actual != data.checksums {
            return Err(StorageError::invalid(
                "checksums",
                format!("{what} does not match its crc32c (corrupted in transit)"),
            ));
        }
        let mut st = self.store.write_state();
        let seq = self.record(&st)?.seq;
        self.store.write_locked(
            &mut st,
            &self.name,
            data.offset,
            &data.data,
            Some(&actual),
            mode,
            Some(seq),
        )?;
        Ok(())
    }

    /// Writes another copy's bytes of a range (a returning replica catching up, a write
    /// intent brought onto a replica): the checksums are verified like
    /// [`Volume::repair`]'s, but the data goes to the volume's writable layer, copy on
    /// write, as an ordinary write does, so snapshots and the bases of clones keep their
    /// blocks ([`Volume::repair`] overwrites a block where it lives, frozen layers
    /// included: right for a bad block, wrong for newer data). The sequence number does
    /// not move.
    pub fn resync(&self, data: &crate::replication::RepairData) -> Result<()> {
        self.write_verified(data, WriteMode::Normal, "resynchronised data")
    }

    /// Reads the whole volume and lists every block that fails its checksum.
    pub fn scrub(&self) -> Result<Vec<BadBlock>> {
        let info = self.info()?;
        let mut bad = Vec::new();
        let chunk = info.stripe_unit.clamp(1 << 20, MAX_IO);
        let mut offset = 0;
        while offset < info.size {
            let len = chunk.min(info.size - offset);
            let mut buf = vec![0u8; len as usize];
            match self.read_at(offset, &mut buf) {
                Ok(()) => offset += len,
                Err(StorageError::ChecksumMismatch { .. }) if len > BLOCK_SIZE => {
                    // Narrow down block by block.
                    let mut block = vec![0u8; BLOCK_SIZE as usize];
                    for b in (offset..offset + len).step_by(BLOCK_SIZE as usize) {
                        if let Err(StorageError::ChecksumMismatch {
                            disk,
                            physical_offset,
                            ..
                        }) = self.read_at(b, &mut block)
                        {
                            bad.push(BadBlock {
                                offset: b,
                                disk,
                                physical_offset,
                            });
                        }
                    }
                    offset += len;
                }
                Err(StorageError::ChecksumMismatch {
                    disk,
                    physical_offset,
                    ..
                }) => {
                    bad.push(BadBlock {
                        offset,
                        disk,
                        physical_offset,
                    });
                    offset += len;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(bad)
    }

    /// Where the block at `offset` is stored, or `None` if it is unallocated.
    pub fn locate(&self, offset: u64) -> Result<Option<Location>> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        check_range(
            &self.name,
            rec.geometry.size,
            offset - offset % BLOCK_SIZE,
            BLOCK_SIZE,
        )?;
        let su = rec.geometry.stripe_unit;
        Ok(match st.resolve(rec.top, offset / su) {
            Some(Extent::At { disk, offset: base }) => {
                let d = &st.disks[&disk];
                Some(Location {
                    disk: d.name.clone(),
                    path: d.path.clone(),
                    physical_offset: base + offset % su,
                })
            }
            _ => None,
        })
    }
}
