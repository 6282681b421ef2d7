//! Recovery on open, after an unclean shutdown.
//!
//! Recovery replays journal records newer than the checkpoint, then checks every pending
//! checksum against the data on disk: a match commits it, a mismatch means the data never
//! landed (the write was not acknowledged), so the block keeps its old checksum or stays
//! unwritten and the volume's sequence number goes back. Reads prefer a pending checksum
//! over the committed one. [`Store::recovery`] reports what happened.

use std::collections::{BTreeMap, BTreeSet};

use redb::{ReadableDatabase, ReadableTable};

use super::checkpoint::{apply_record, write_disk_rows};
use super::state::State;
use super::{BLOCK_SIZE, Store, io_err};
use crate::allocator::Allocator;
use crate::crcs::{self, BlockCrc};
use crate::engine::IoOp;
use crate::error::{Result, StorageError};
use crate::journal::{self, JOURNAL_BYTES, WriteRecord};
use crate::meta::{CRCS, Extent, INFLIGHT, PENDING, VOLUMES, VolumeRecord};

impl Store {
    /// Replays the journal records newer than the last checkpoint, in sequence order, into
    /// redb and `st`, and checkpoints.
    pub(super) fn replay_journals(&self, st: &mut State) -> Result<()> {
        let mut found: BTreeMap<u64, WriteRecord> = BTreeMap::new();
        let mut ring = vec![0u8; JOURNAL_BYTES as usize];
        for d in st.disks.values() {
            self.inner
                .engine
                .read_exact_at(&d.file, d.alloc.capacity, &mut ring)
                .map_err(io_err(format!("reading the journal of disk `{}`", d.name)))?;
            let records = journal::parse_ring(&ring).map_err(|other| {
                let supported = u64::from(journal::JOURNAL_VERSION - b'0');
                if other.number() > supported {
                    StorageError::NewerFormat {
                        what: "journal",
                        path: d.path.clone(),
                        found: other.number(),
                        supported,
                    }
                } else {
                    StorageError::CorruptMetadata {
                        path: d.path.clone(),
                        reason: format!(
                            "journal frame of version {}, which no build wrote",
                            other.number()
                        ),
                    }
                }
            })?;
            for (seq, record) in records {
                if seq > st.checkpoint {
                    found.entry(seq).or_insert(record);
                }
            }
        }
        // Write n+1 starts only after write n was acknowledged, so the durable records form
        // one run after the checkpoint; anything after a gap was never acknowledged.
        let mut next = st.checkpoint + 1;
        let mut replay = Vec::new();
        for (seq, record) in found {
            if seq != next {
                break;
            }
            next += 1;
            replay.push(record);
        }
        if replay.is_empty() {
            return Ok(());
        }
        // Redo inline data, block by block, unless a later record wrote the block again:
        // that record's data is on disk or, if it never landed, the inline data was made
        // durable before it (see the overwrite path), so there is nothing to redo.
        let mut later: BTreeSet<(u32, u64)> = BTreeSet::new();
        let mut redo: Vec<(u32, u64, &[u8])> = Vec::new();
        for record in replay.iter().rev() {
            for (disk, offset, bytes) in &record.inline {
                for (i, block) in bytes.chunks(BLOCK_SIZE as usize).enumerate() {
                    let at = offset + i as u64 * BLOCK_SIZE;
                    if !later.contains(&(*disk, at / BLOCK_SIZE)) {
                        redo.push((*disk, at, block));
                    }
                }
            }
            later.extend(record.updates.iter().map(|(key, _)| *key));
        }
        {
            let mut ops: Vec<IoOp<'_>> = redo
                .iter()
                .filter_map(|&(disk, offset, buf)| {
                    st.disks.get(&disk).map(|d| IoOp::Write {
                        file: &d.file,
                        offset,
                        buf,
                    })
                })
                .collect();
            self.inner
                .engine
                .run(&mut ops)
                .map_err(io_err("redoing journaled data"))?;
        }
        st.dirty_disks.extend(redo.iter().map(|r| r.0));
        let txn = self.inner.db.begin_write()?;
        let mut touched = BTreeSet::new();
        for record in &replay {
            let rec = VolumeRecord::decode(&record.volume_record).ok_or_else(|| {
                StorageError::CorruptMetadata {
                    path: self.inner.dir.join("disks"),
                    reason: format!("journal record for volume `{}`", record.volume),
                }
            })?;
            st.volumes.insert(record.volume.clone(), rec);
            for &(stripe, disk, offset) in &record.extents {
                st.extents
                    .insert((record.layer, stripe), Extent::At { disk, offset });
                if let Some(d) = st.disks.get_mut(&disk) {
                    d.alloc.claim(offset, record.extent_size);
                    touched.insert(disk);
                }
            }
            apply_record(&txn, record)?;
        }
        let rows: BTreeMap<u32, Allocator> = touched
            .iter()
            .map(|id| (*id, st.disks[id].alloc.clone()))
            .collect();
        write_disk_rows(&txn, st, &rows)?;
        st.journal_seq = next - 1;
        st.recovery.journal_records_replayed = replay.len() as u64;
        self.checkpoint_commit_with(txn, st, false)
    }

    /// Settles the write that was in flight at a crash (at most one). A block whose data
    /// matches its pending checksum takes it; otherwise the block keeps its committed
    /// checksum (old data) or stays unwritten. If any block of that write did not land,
    /// the write was never acknowledged and the volume's sequence number goes back.
    pub(super) fn recover_pending(&self) -> Result<()> {
        let mut st = self.write_state();
        let (pending, inflight): (Vec<BlockCrc>, Vec<(String, u64)>) = {
            let txn = self.inner.db.begin_read()?;
            let pending = txn.open_table(PENDING)?;
            let inflight = txn.open_table(INFLIGHT)?;
            (
                crcs::all(&pending)?,
                inflight
                    .iter()?
                    .map(|r| r.map(|(k, v)| (k.value().to_owned(), v.value())))
                    .collect::<Result<_, _>>()?,
            )
        };
        if pending.is_empty() && inflight.is_empty() {
            return Ok(());
        }
        let mut incomplete = false;
        let mut rolled_back = None;
        st.recovery.blocks_verified = pending.len() as u64;
        let mut verified = Vec::with_capacity(pending.len());
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        for ((disk, pblock), crc) in pending {
            let Some(d) = st.disks.get(&disk) else {
                continue;
            };
            self.inner
                .engine
                .read_exact_at(&d.file, pblock * BLOCK_SIZE, &mut block)
                .map_err(io_err(format!("reading disk `{}`", d.name)))?;
            if crc32c::crc32c(&block) == crc {
                verified.push(((disk, pblock), crc));
            } else {
                incomplete = true;
                st.recovery.blocks_dropped += 1;
            }
        }
        let txn = self.inner.db.begin_write()?;
        {
            crcs::take_all(&mut txn.open_table(PENDING)?)?;
            crcs::set(&mut txn.open_table(CRCS)?, &verified)?;
            let mut inflight_table = txn.open_table(INFLIGHT)?;
            let mut volumes = txn.open_table(VOLUMES)?;
            for (volume, seq_before) in &inflight {
                inflight_table.remove(volume.as_str())?;
                if incomplete && let Some(rec) = st.volumes.get_mut(volume) {
                    rec.seq = *seq_before;
                    volumes.insert(volume.as_str(), rec.encode().as_slice())?;
                    rolled_back = Some(volume.clone());
                }
            }
        }
        self.checkpoint_commit(txn, &mut st)?;
        st.recovery.sequence_rolled_back = rolled_back;
        Ok(())
    }
}
