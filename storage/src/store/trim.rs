//! Trimming: whole stripe units owned by the volume are freed (or masked with a zero
//! extent where an ancestor layer holds data); blocks inside owned units lose their
//! checksums and read as zeros. Committed as a checkpoint.

use std::collections::BTreeMap;

use super::checkpoint::write_disk_rows;
use super::state::State;
use super::{BLOCK_SIZE, Store, check_range, pieces};
use crate::allocator::Allocator;
use crate::crcs;
use crate::error::Result;
use crate::meta::{CRCS, EXTENTS, Extent, PENDING, VOLUMES};

impl Store {
    /// Trims a block-aligned range of a volume; see [`Volume::trim`](super::Volume::trim).
    pub(super) fn trim_locked(
        &self,
        st: &mut State,
        volume: &str,
        offset: u64,
        len: u64,
        replica_seq: Option<u64>,
    ) -> Result<u64> {
        let mut rec = st.volume(volume)?.clone();
        check_range(volume, rec.geometry.size, offset, len)?;
        let su = rec.geometry.stripe_unit;
        let top = rec.top;
        let mut set_extent: Vec<(u64, Extent)> = Vec::new();
        let mut drop_extent: Vec<u64> = Vec::new();
        let mut drop_crcs: Vec<(u32, u64, u64)> = Vec::new(); // disk, first block, end block
        let mut freed: Vec<(u32, u64)> = Vec::new();
        for piece in pieces(offset, len, su) {
            let in_top = st.extents.get(&(top, piece.stripe)).copied();
            let below = st.resolve(st.parent(top), piece.stripe);
            let whole = piece.len == su;
            match in_top {
                Some(Extent::At { disk, offset: base }) if whole => {
                    freed.push((disk, base));
                    drop_crcs.push((disk, base / BLOCK_SIZE, (base + su) / BLOCK_SIZE));
                    if matches!(below, Some(Extent::At { .. })) {
                        set_extent.push((piece.stripe, Extent::Zero));
                    } else {
                        drop_extent.push(piece.stripe);
                    }
                }
                Some(Extent::At { disk, offset: base }) => {
                    let first = (base + piece.within) / BLOCK_SIZE;
                    drop_crcs.push((disk, first, first + piece.len / BLOCK_SIZE));
                }
                None if whole && matches!(below, Some(Extent::At { .. })) => {
                    set_extent.push((piece.stripe, Extent::Zero))
                }
                // Already zero, or a partial unit still shared with a snapshot: trim is
                // advisory there and the data stays (NBD allows either).
                _ => {}
            }
        }
        rec.seq = replica_seq.unwrap_or(rec.seq + 1);
        let mut next_disks: BTreeMap<u32, Allocator> = BTreeMap::new();
        for &(disk, base) in &freed {
            next_disks
                .entry(disk)
                .or_insert_with(|| st.disks[&disk].alloc.clone())
                .release(base, su);
        }
        let txn = self.inner.db.begin_write()?;
        {
            let mut extents = txn.open_table(EXTENTS)?;
            for (stripe, extent) in &set_extent {
                extents.insert((top, *stripe), extent.to_raw())?;
            }
            for stripe in &drop_extent {
                extents.remove((top, *stripe))?;
            }
            let mut committed = txn.open_table(CRCS)?;
            let mut pending = txn.open_table(PENDING)?;
            for &(disk, first, end) in &drop_crcs {
                crcs::clear(&mut committed, disk, first, end)?;
                crcs::clear(&mut pending, disk, first, end)?;
            }
            txn.open_table(VOLUMES)?
                .insert(volume, rec.encode().as_slice())?;
            write_disk_rows(&txn, st, &next_disks)?;
        }
        self.checkpoint_commit(txn, st)?;
        for (disk, alloc) in next_disks {
            if let Some(d) = st.disks.get_mut(&disk) {
                d.alloc = alloc;
            }
        }
        for (stripe, extent) in set_extent {
            st.extents.insert((top, stripe), extent);
        }
        for stripe in drop_extent {
            st.extents.remove(&(top, stripe));
        }
        let seq = rec.seq;
        st.volumes.insert(volume.to_owned(), rec);
        Ok(seq)
    }
}
