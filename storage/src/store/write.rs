//! The write path (what makes an acknowledged write survive `kill -9` and power loss),
//! and the replica operations built on it.
//!
//! 1. Plan: split the request into stripe-unit pieces; allocate extents for units the
//!    volume's writable layer lacks (in memory only) and plan copy-on-write of blocks an
//!    ancestor layer holds; compute the crc32c of every 4 KiB block.
//! 2. Build the write's [`WriteRecord`] (new extents, new checksums as *pending*, volume
//!    sequence number) and place it in the journal ring of the first disk the data touches.
//! 3. Fresh blocks only: data, copied blocks and the record are written and each touched
//!    disk gets one `fdatasync` (one linked io_uring chain per disk), while the calling
//!    thread applies the record to redb without durability. Overwrites of acknowledged
//!    blocks: the record is written and synced first (the intent), then the data.
//! 4. Acknowledge. redb is made durable by checkpoints (before a journal ring wraps, every
//!    [`CHECKPOINT_RECORDS`] records, and with every structural change).
//!
//! A failure before step 3 leaves metadata untouched and rolls back the in-memory
//! allocator, so a full disk yields [`StorageError::NoSpace`] and changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;

use redb::ReadableDatabase;

use super::checkpoint::{apply_record, write_disk_rows};
use super::state::State;
use super::{BLOCK_SIZE, Store, check_io, check_range, crc_blocks, io_err, pieces};
use crate::allocator::Allocator;
use crate::crcs::{self, BlockCrc};
use crate::engine::IoOp;
use crate::error::{Result, StorageError};
use crate::journal::{CHECKPOINT_RECORDS, JOURNAL_BYTES, WriteRecord};
use crate::meta::{CRCS, EXTENTS, Extent, INFLIGHT, PENDING, VOLUMES};

/// Pending checksums are moved to the committed table in one batch once there are more
/// than this many; until then reads take the pending one. Bounds the work of recovery.
const PROMOTE_THRESHOLD: usize = 16 * 1024;

/// Largest overwrite whose data goes into its journal record (one flush instead of two).
const INLINE_MAX: u64 = 64 << 10;

/// What kind of write the shared write path performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteMode {
    /// Ordinary write to the volume's writable layer (copy-on-write from ancestors).
    Normal,
    /// Overwrite blocks where they live, even in a frozen layer: the data is a replica's
    /// copy of the very same content.
    Repair,
}

impl Store {
    /// Applies a write or trim shipped by the primary (see [`Volume::write_replicated`](super::Volume::write_replicated)).
    /// Idempotent: an operation whose sequence number is not newer than the volume's is
    /// acknowledged as [`ApplyOutcome::Duplicate`](crate::ApplyOutcome::Duplicate) without touching data.
    pub fn apply_replica(
        &self,
        op: &crate::replication::ReplicaOp,
    ) -> Result<crate::replication::ApplyOutcome> {
        self.apply_replica_op(op, true)
    }

    /// Applies a write shipped by the primary whose sequence number may be older than
    /// the volume's: the primary has several writes in flight at once (never two that
    /// overlap), so they can arrive in another order than they were numbered. The
    /// caller knows the write was not applied yet (the agent remembers recent
    /// sequence numbers); the volume's number becomes the higher of the two. Shipped
    /// checksums are verified as in [`Store::apply_replica`].
    pub fn apply_replica_unordered(
        &self,
        op: &crate::replication::ReplicaOp,
    ) -> Result<crate::replication::ApplyOutcome> {
        self.apply_replica_op(op, false)
    }

    fn apply_replica_op(
        &self,
        op: &crate::replication::ReplicaOp,
        ordered: bool,
    ) -> Result<crate::replication::ApplyOutcome> {
        use crate::replication::{ApplyOutcome, ReplicaPayload};
        if op.seq == 0 {
            return Err(StorageError::invalid(
                "seq",
                "replica sequence numbers start at 1",
            ));
        }
        let mut st = self.write_state();
        let rec = st.volume(&op.volume)?;
        if ordered && op.seq <= rec.seq {
            return Ok(ApplyOutcome::Duplicate {
                volume_seq: rec.seq,
            });
        }
        let volume_seq = op.seq.max(rec.seq);
        match &op.payload {
            ReplicaPayload::Write { data, checksums } => {
                check_io(&op.volume, rec.geometry.size, op.offset, data.len() as u64)?;
                let actual = crc_blocks(data);
                if actual.len() != checksums.len() {
                    return Err(StorageError::invalid(
                        "checksums",
                        format!("{} checksums for {} blocks", checksums.len(), actual.len()),
                    ));
                }
                if let Some(i) = actual.iter().zip(checksums).position(|(a, b)| a != b) {
                    return Err(StorageError::invalid(
                        "data",
                        format!(
                            "block at offset {} does not match its shipped crc32c (corrupted in transit)",
                            op.offset + i as u64 * BLOCK_SIZE
                        ),
                    ));
                }
                self.write_locked(
                    &mut st,
                    &op.volume,
                    op.offset,
                    data,
                    Some(&actual),
                    WriteMode::Normal,
                    Some(op.seq),
                )?;
            }
            ReplicaPayload::Trim { length } => {
                check_range(&op.volume, rec.geometry.size, op.offset, *length)?;
                self.trim_locked(&mut st, &op.volume, op.offset, *length, Some(volume_seq))?;
            }
        }
        Ok(ApplyOutcome::Applied { volume_seq })
    }

    /// The shared write path; see the module docs for the ordering.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_locked(
        &self,
        st: &mut State,
        volume: &str,
        offset: u64,
        data: &[u8],
        block_crcs: Option<&[u32]>,
        mode: WriteMode,
        replica_seq: Option<u64>,
    ) -> Result<u64> {
        let mut rec = st.volume(volume)?.clone();
        let geometry = rec.geometry.clone();
        check_io(volume, geometry.size, offset, data.len() as u64)?;
        let su = geometry.stripe_unit;
        let plan = pieces(offset, data.len() as u64, su);
        let saved: BTreeMap<u32, Allocator> = st
            .disks
            .iter()
            .map(|(&id, d)| (id, d.alloc.clone()))
            .collect();
        let restore = |st: &mut State| {
            for (id, alloc) in &saved {
                if let Some(d) = st.disks.get_mut(id) {
                    d.alloc = alloc.clone();
                }
            }
        };

        // Where every piece goes, and what must be copied from an ancestor first.
        let mut new_extents: Vec<(u64, Extent)> = Vec::new();
        let mut writes: Vec<(u32, u64, usize, usize)> = Vec::new(); // disk, phys, buf range
        // Checksums copied with copy-on-write data, and data blocks whose checksum is
        // computed from `data` (possibly while the data is being written).
        let mut crc_updates: Vec<BlockCrc> = Vec::new();
        let mut data_blocks: Vec<((u32, u64), usize)> = Vec::new();
        let mut overwrites: Vec<(u32, u64)> = Vec::new();
        // Acknowledged checksums still pending on overwritten blocks.
        let mut olds: Vec<BlockCrc> = Vec::new();
        let mut copies: Vec<(u32, u64, u32, u64, u64)> = Vec::new(); // src disk, src off, dst disk, dst off, len
        let txn = self.inner.db.begin_read()?;
        let committed_table = txn.open_table(CRCS)?;
        let pending = txn.open_table(PENDING)?;
        for piece in &plan {
            let in_top = st.extents.get(&(rec.top, piece.stripe)).copied();
            let target = match (mode, in_top) {
                (_, Some(Extent::At { disk, offset })) => Some((disk, offset)),
                (WriteMode::Repair, None) => match st.resolve(st.parent(rec.top), piece.stripe) {
                    Some(Extent::At { disk, offset }) => Some((disk, offset)),
                    _ => None,
                },
                _ => None,
            };
            let (disk, base) = match target {
                Some(t) => t,
                None => {
                    let column =
                        geometry.columns[(piece.stripe % geometry.columns.len() as u64) as usize];
                    let d = st
                        .disks
                        .get_mut(&column)
                        .ok_or_else(|| StorageError::UnknownDisk {
                            name: format!("#{column}"),
                        })?;
                    let Some(base) = d.alloc.allocate(su) else {
                        let disk = d.name.clone();
                        restore(st);
                        return Err(StorageError::NoSpace { disk, needed: su });
                    };
                    new_extents.push((
                        piece.stripe,
                        Extent::At {
                            disk: column,
                            offset: base,
                        },
                    ));
                    // Copy-on-write: blocks of the unit this write does not cover come from
                    // the ancestor, raw with their checksums (a bad block stays detectable).
                    if in_top.is_none()
                        && let Some(Extent::At {
                            disk: src_disk,
                            offset: src,
                        }) = st.resolve(st.parent(rec.top), piece.stripe)
                    {
                        let (lo, hi) = (
                            piece.within / BLOCK_SIZE,
                            (piece.within + piece.len) / BLOCK_SIZE,
                        );
                        let mut run: Option<(u64, u64)> = None;
                        // Committed checksums, overridden by pending ones of the last write.
                        let first_src = src / BLOCK_SIZE;
                        let n_src = su / BLOCK_SIZE;
                        let newest = crcs::load(&pending, src_disk, first_src, n_src)?;
                        let older = crcs::load(&committed_table, src_disk, first_src, n_src)?;
                        let src_crcs: Vec<(u64, u32)> = newest
                            .iter()
                            .zip(&older)
                            .enumerate()
                            .filter_map(|(i, (p, c))| p.or(*c).map(|crc| (i as u64, crc)))
                            .collect();
                        for (idx, crc) in src_crcs {
                            if (lo..hi).contains(&idx) {
                                continue;
                            }
                            crc_updates.push(((column, base / BLOCK_SIZE + idx), crc));
                            run = match run {
                                Some((start, len)) if start + len == idx => Some((start, len + 1)),
                                Some((start, len)) => {
                                    copies.push((
                                        src_disk,
                                        src + start * BLOCK_SIZE,
                                        column,
                                        base + start * BLOCK_SIZE,
                                        len * BLOCK_SIZE,
                                    ));
                                    Some((idx, 1))
                                }
                                None => Some((idx, 1)),
                            };
                        }
                        if let Some((start, len)) = run {
                            copies.push((
                                src_disk,
                                src + start * BLOCK_SIZE,
                                column,
                                base + start * BLOCK_SIZE,
                                len * BLOCK_SIZE,
                            ));
                        }
                    }
                    (column, base)
                }
            };
            let phys = base + piece.within;
            writes.push((
                disk,
                phys,
                piece.buf_off,
                piece.buf_off + piece.len as usize,
            ));
            let first_crc = piece.buf_off / BLOCK_SIZE as usize;
            // Blocks that hold acknowledged data, committed or still pending from the
            // previous write: overwriting them needs the checksum intent first.
            let n_blocks = piece.len / BLOCK_SIZE;
            let (newest, older) = if target.is_some() {
                (
                    crcs::load(&pending, disk, phys / BLOCK_SIZE, n_blocks)?,
                    crcs::load(&committed_table, disk, phys / BLOCK_SIZE, n_blocks)?,
                )
            } else {
                (vec![None; n_blocks as usize], vec![None; n_blocks as usize])
            };
            for i in 0..piece.len / BLOCK_SIZE {
                let key = (disk, phys / BLOCK_SIZE + i);
                if newest[i as usize].is_some() || older[i as usize].is_some() {
                    overwrites.push(key);
                }
                if let Some(old) = newest[i as usize] {
                    olds.push((key, old));
                }
                data_blocks.push((key, first_crc + i as usize));
            }
        }
        drop((committed_table, pending, txn));

        let old_rec = rec.clone();
        // A replica write shipped out of order keeps the volume's higher number.
        rec.seq = replica_seq.map_or(rec.seq + 1, |seq| seq.max(rec.seq));
        let touched: BTreeSet<u32> = new_extents
            .iter()
            .filter_map(|(_, e)| match e {
                Extent::At { disk, .. } => Some(*disk),
                Extent::Zero => None,
            })
            .collect();
        let rows: BTreeMap<u32, Allocator> = touched
            .iter()
            .map(|id| (*id, st.disks[id].alloc.clone()))
            .collect();
        let data_crcs = match block_crcs {
            Some(c) => c.to_vec(),
            None => crc_blocks(data),
        };
        let mut updates = crc_updates.clone();
        updates.extend(data_blocks.iter().map(|&(key, i)| (key, data_crcs[i])));
        let promote_all = st.pending_blocks > PROMOTE_THRESHOLD;
        // Small overwrites journal their data: one flush instead of intent + data.
        let inline = !overwrites.is_empty() && copies.is_empty() && data.len() as u64 <= INLINE_MAX;
        let record = WriteRecord {
            volume: volume.to_owned(),
            volume_record: rec.encode(),
            layer: rec.top,
            seq_before: old_rec.seq,
            extents: new_extents
                .iter()
                .filter_map(|&(stripe, e)| match e {
                    Extent::At { disk, offset } => Some((stripe, disk, offset)),
                    Extent::Zero => None,
                })
                .collect(),
            extent_size: su,
            promote_all,
            olds,
            inline: if inline {
                writes
                    .iter()
                    .map(|&(disk, phys, from, to)| (disk, phys, data[from..to].to_vec()))
                    .collect()
            } else {
                Vec::new()
            },
            updates,
        };

        // The record goes to the journal ring of the first disk the data touches, so that
        // disk's fdatasync covers both. A checkpoint first if the ring would wrap.
        let journal_disk = writes[0].0;
        let frame = record.frame(st.journal_seq + 1);
        let head = st.journal_heads.get(&journal_disk).copied().unwrap_or(0);
        let (head, frame) = if head + frame.len() as u64 > JOURNAL_BYTES
            || st.journal_seq - st.checkpoint >= CHECKPOINT_RECORDS
        {
            if let Err(e) = self.checkpoint_commit(self.inner.db.begin_write()?, st) {
                restore(st);
                return Err(e);
            }
            (0, frame)
        } else {
            (head, frame)
        };
        // Sequence numbers are never reused, even if this write fails.
        st.journal_seq += 1;
        st.journal_heads
            .insert(journal_disk, head + frame.len() as u64);
        let journal_offset = st.disks[&journal_disk].alloc.capacity + head;

        // redb gets the write at once but without durability: the journal is what makes
        // it durable.
        let commit = |st: &State| -> Result<()> {
            let mut txn = self.inner.db.begin_write()?;
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StorageError::Metadata(Box::new(redb::Error::from(e))))?;
            apply_record(&txn, &record)?;
            write_disk_rows(&txn, st, &rows)?;
            txn.commit()?;
            Ok(())
        };
        let copy_bufs = match self.read_copies(st, volume, &copies) {
            Ok(bufs) => bufs,
            Err(e) => {
                restore(st);
                return Err(e);
            }
        };
        let (data_result, commit_result) = if overwrites.is_empty() {
            // Only fresh blocks: data, journal record and the redb update at once. A crash
            // before the fdatasync returns may leave the record without the data; recovery
            // then drops the pending checksums whose data does not match, and the blocks
            // read as never written.
            let journal = (
                &st.disks[&journal_disk].file,
                journal_offset,
                frame.as_slice(),
            );
            self.write_data(
                st,
                volume,
                &copies,
                &copy_bufs,
                &writes,
                data,
                Some(journal),
                || commit(st),
            )
        } else {
            // Overwrites of acknowledged blocks: the record (the new checksums) must be
            // durable before the data changes, so that after a crash old and new data both
            // verify. Data written in place by earlier inline overwrites is made durable
            // in the same round, before this write's data can replace it.
            let journal_file = &st.disks[&journal_disk].file;
            let mut sync: Vec<&File> = vec![journal_file];
            for d in &st.dirty_disks {
                if *d != journal_disk {
                    sync.push(&st.disks[d].file);
                }
            }
            let intent = self
                .inner
                .engine
                .write_all_at(journal_file, journal_offset, &frame)
                .and_then(|()| self.inner.engine.sync_data(&sync))
                .map_err(io_err(format!("writing the journal of volume `{volume}`")));
            if let Err(e) = intent {
                restore(st);
                return Err(e);
            }
            st.dirty_disks.clear();
            if inline {
                // The record holds the data: write it in place without waiting for it;
                // a checkpoint syncs it, replay rewrites it after a crash.
                let commit_result = commit(st);
                let mut ops: Vec<IoOp<'_>> = record
                    .inline
                    .iter()
                    .map(|(disk, offset, bytes)| IoOp::Write {
                        file: &st.disks[disk].file,
                        offset: *offset,
                        buf: bytes,
                    })
                    .collect();
                let data_result = self
                    .inner
                    .engine
                    .run(&mut ops)
                    .map_err(io_err(format!("writing volume `{volume}`")));
                drop(ops);
                st.dirty_disks
                    .extend(record.inline.iter().map(|(d, _, _)| *d));
                (data_result, commit_result)
            } else {
                self.write_data(st, volume, &copies, &copy_bufs, &writes, data, None, || {
                    commit(st)
                })
            }
        };
        match (data_result, commit_result) {
            (Ok(()), Ok(())) => {}
            (Err(err), Ok(())) => {
                // The metadata landed but the data did not: take the metadata back, durably.
                let undo = |st: &mut State| -> Result<()> {
                    let txn = self.inner.db.begin_write()?;
                    {
                        let mut extents = txn.open_table(EXTENTS)?;
                        for (stripe, _) in &new_extents {
                            extents.remove((rec.top, *stripe))?;
                        }
                        let keys: Vec<(u32, u64)> =
                            record.updates.iter().map(|(k, _)| *k).collect();
                        crcs::remove(&mut txn.open_table(PENDING)?, &keys)?;
                        txn.open_table(VOLUMES)?
                            .insert(volume, old_rec.encode().as_slice())?;
                        txn.open_table(INFLIGHT)?.remove(volume)?;
                    }
                    let rows: BTreeMap<u32, Allocator> = touched
                        .iter()
                        .filter_map(|id| saved.get(id).map(|a| (*id, a.clone())))
                        .collect();
                    write_disk_rows(&txn, st, &rows)?;
                    self.checkpoint_commit(txn, st)
                };
                restore(st);
                undo(st)?;
                return Err(err);
            }
            (_, Err(e)) => {
                // The allocator keeps the extents (not restored): the journal record may be
                // durable and replayed, so its space must not be handed out again.
                return Err(e);
            }
        }
        st.pending_blocks = if promote_all {
            record.updates.len()
        } else {
            st.pending_blocks + record.updates.len()
        };
        for (stripe, extent) in new_extents {
            st.extents.insert((rec.top, stripe), extent);
        }
        let seq = rec.seq;
        st.volumes.insert(volume.to_owned(), rec);
        Ok(seq)
    }

    /// Reads the blocks a copy-on-write must carry over from ancestor extents.
    fn read_copies(
        &self,
        st: &State,
        volume: &str,
        copies: &[(u32, u64, u32, u64, u64)],
    ) -> Result<Vec<Vec<u8>>> {
        let mut bufs: Vec<Vec<u8>> = copies.iter().map(|c| vec![0u8; c.4 as usize]).collect();
        let mut ops: Vec<IoOp<'_>> = copies
            .iter()
            .zip(bufs.iter_mut())
            .map(|(c, buf)| IoOp::Read {
                file: &st.disks[&c.0].file,
                offset: c.1,
                buf,
            })
            .collect();
        self.inner
            .engine
            .run(&mut ops)
            .map_err(io_err(format!("copying on write for volume `{volume}`")))?;
        Ok(bufs)
    }

    /// Writes the copied blocks, the data and the journal record (if any), and makes them
    /// durable with one fdatasync per disk, running `during` meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn write_data<R>(
        &self,
        st: &State,
        volume: &str,
        copies: &[(u32, u64, u32, u64, u64)],
        copy_bufs: &[Vec<u8>],
        writes: &[(u32, u64, usize, usize)],
        data: &[u8],
        journal: Option<(&File, u64, &[u8])>,
        during: impl FnOnce() -> R,
    ) -> (Result<()>, R) {
        let mut list: Vec<(&File, u64, &[u8])> =
            Vec::with_capacity(writes.len() + copies.len() + 1);
        for (c, buf) in copies.iter().zip(copy_bufs) {
            list.push((&st.disks[&c.2].file, c.3, buf));
        }
        for &(disk, phys, from, to) in writes {
            list.push((&st.disks[&disk].file, phys, &data[from..to]));
        }
        // The journal record rides along; its disk is one of the data disks, so the same
        // fdatasync covers it.
        if let Some(record) = journal {
            list.push(record);
        }
        let (result, r) = self.inner.engine.write_sync_while(&list, during);
        let result = result.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                let disk = writes
                    .first()
                    .map_or_else(String::new, |w| st.disk_name(w.0));
                StorageError::NoSpace {
                    disk,
                    needed: data.len() as u64,
                }
            } else {
                StorageError::io(format!("writing volume `{volume}`"), e)
            }
        });
        (result, r)
    }
}
