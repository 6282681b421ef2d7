//! Making redb durable: checkpoints.
//!
//! Writes reach redb without durability (the journal makes them durable); a checkpoint
//! is a durable redb commit that records the journal sequence number it covers, after
//! which the journal rings start over. Checkpoints happen before a ring would wrap,
//! every [`CHECKPOINT_RECORDS`](crate::journal::CHECKPOINT_RECORDS) records, with every
//! structural change, and on drop (the clean-shutdown checkpoint).

use std::collections::BTreeMap;
use std::fs::File;

use super::state::State;
use super::{Inner, Store, io_err};
use crate::allocator::Allocator;
use crate::crcs;
use crate::error::Result;
use crate::journal::WriteRecord;
use crate::meta::{CRCS, DISKS, EXTENTS, Extent, FREE, INFLIGHT, META, PENDING, VOLUMES};

impl Drop for Inner {
    fn drop(&mut self) {
        // A clean shutdown checkpoints, so the next open has no journal to replay. Errors
        // are ignored: the journal still covers everything.
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.journal_seq == st.checkpoint {
            return;
        }
        let files: Vec<&File> = st.dirty_disks.iter().map(|d| &st.disks[d].file).collect();
        if self.engine.sync_data(&files).is_err() {
            return;
        }
        let Ok(txn) = self.db.begin_write() else {
            return;
        };
        // Everything acknowledged is durable now, so pending checksums can be promoted and
        // the next open has nothing to verify.
        let promoted = (|| -> Result<()> {
            let all = crcs::take_all(&mut txn.open_table(PENDING)?)?;
            crcs::set(&mut txn.open_table(CRCS)?, &all)?;
            txn.open_table(INFLIGHT)?.retain(|_, _| false)?;
            Ok(())
        })()
        .is_ok();
        let inserted = promoted
            && match txn.open_table(META) {
                Ok(mut meta) => meta.insert("checkpoint", st.journal_seq).is_ok(),
                Err(_) => false,
            };
        if inserted {
            let _ = txn.commit();
        }
    }
}

impl Store {
    /// Commits `txn` durably as a checkpoint: every journal record written so far is then
    /// in redb for good and the journal rings start over.
    ///
    /// No write is in flight at a checkpoint (writes hold the store lock), so every pending
    /// checksum belongs to an acknowledged, durable write: they are all promoted.
    pub(super) fn checkpoint_commit(
        &self,
        txn: redb::WriteTransaction,
        st: &mut State,
    ) -> Result<()> {
        self.checkpoint_commit_with(txn, st, true)
    }

    /// [`Store::checkpoint_commit`], optionally leaving pending checksums for recovery to
    /// verify (after journal replay).
    pub(super) fn checkpoint_commit_with(
        &self,
        txn: redb::WriteTransaction,
        st: &mut State,
        promote_pending: bool,
    ) -> Result<()> {
        // Inline-journaled data must be durable in place before its records become obsolete.
        if !st.dirty_disks.is_empty() {
            let files: Vec<&File> = st.dirty_disks.iter().map(|d| &st.disks[d].file).collect();
            self.inner
                .engine
                .sync_data(&files)
                .map_err(io_err("syncing disks for a checkpoint"))?;
            st.dirty_disks.clear();
        }
        if promote_pending {
            let all = crcs::take_all(&mut txn.open_table(PENDING)?)?;
            crcs::set(&mut txn.open_table(CRCS)?, &all)?;
            txn.open_table(INFLIGHT)?.retain(|_, _| false)?;
        }
        txn.open_table(META)?.insert("checkpoint", st.journal_seq)?;
        txn.commit()?;
        if promote_pending {
            st.pending_blocks = 0;
        }
        st.checkpoint = st.journal_seq;
        st.journal_heads.clear();
        Ok(())
    }
}

/// Applies a write's metadata to redb: promotion of acknowledged checksums, the new
/// pending checksums, new extents, the volume record and the in-flight marker. Idempotent.
pub(super) fn apply_record(txn: &redb::WriteTransaction, record: &WriteRecord) -> Result<()> {
    let mut pending = txn.open_table(PENDING)?;
    let mut committed = txn.open_table(CRCS)?;
    if record.promote_all {
        let all = crcs::take_all(&mut pending)?;
        crcs::set(&mut committed, &all)?;
    }
    // An overwritten block's acknowledged checksum becomes the committed one, so old data
    // still verifies if the new data does not land.
    crcs::set(&mut committed, &record.olds)?;
    crcs::set(&mut pending, &record.updates)?;
    let mut extents = txn.open_table(EXTENTS)?;
    for &(stripe, disk, offset) in &record.extents {
        extents.insert((record.layer, stripe), Extent::At { disk, offset }.to_raw())?;
    }
    txn.open_table(VOLUMES)?
        .insert(record.volume.as_str(), record.volume_record.as_slice())?;
    let mut inflight = txn.open_table(INFLIGHT)?;
    inflight.retain(|_, _| false)?;
    inflight.insert(record.volume.as_str(), record.seq_before)?;
    Ok(())
}

pub(super) fn write_disk_rows(
    txn: &redb::WriteTransaction,
    st: &State,
    rows: &BTreeMap<u32, Allocator>,
) -> Result<()> {
    let mut disks = txn.open_table(DISKS)?;
    let mut free_table = txn.open_table(FREE)?;
    for (&id, alloc) in rows {
        let Some(d) = st.disks.get(&id) else { continue };
        disks.insert(id, d.record(alloc).encode().as_slice())?;
        free_table.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        for (&offset, &len) in &alloc.free {
            free_table.insert((id, offset), len)?;
        }
    }
    Ok(())
}
