//! The read path: resolve each stripe unit through the layer chain, read the extents in
//! one batch, verify every block against its checksum.

use redb::ReadableDatabase;

use super::state::State;
use super::{BLOCK_SIZE, Store, check_io, io_err, pieces};
use crate::crcs;
use crate::engine::IoOp;
use crate::error::{Result, StorageError};
use crate::meta::{CRCS, Extent, Geometry, PENDING};

impl Store {
    /// Reads `buf.len()` bytes at `offset` as seen from layer `top`, verifying checksums.
    pub(super) fn read_layer(
        &self,
        st: &State,
        label: &str,
        top: u64,
        geometry: &Geometry,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        check_io(label, geometry.size, offset, buf.len() as u64)?;
        let su = geometry.stripe_unit;
        let plan = pieces(offset, buf.len() as u64, su);
        let mut located = Vec::with_capacity(plan.len());
        {
            let mut ops = Vec::with_capacity(plan.len());
            let mut rest: &mut [u8] = buf;
            for piece in &plan {
                let (head, tail) = rest.split_at_mut(piece.len as usize);
                rest = tail;
                match st.resolve(top, piece.stripe) {
                    Some(Extent::At { disk, offset: base }) => {
                        let d = &st.disks[&disk];
                        ops.push(IoOp::Read {
                            file: &d.file,
                            offset: base + piece.within,
                            buf: head,
                        });
                        located.push(Some((disk, base + piece.within)));
                    }
                    _ => {
                        head.fill(0);
                        located.push(None);
                    }
                }
            }
            self.inner
                .engine
                .run(&mut ops)
                .map_err(io_err(format!("reading volume `{label}`")))?;
        }
        let txn = self.inner.db.begin_read()?;
        let committed_table = txn.open_table(CRCS)?;
        let pending = txn.open_table(PENDING)?;
        for (piece, loc) in plan.iter().zip(located) {
            let Some((disk, phys)) = loc else { continue };
            let first = phys / BLOCK_SIZE;
            let n = piece.len / BLOCK_SIZE;
            // Checksum of each block: the pending one (the last write, durable but not yet
            // promoted) wins over the committed one; a block with neither was never written.
            let stored = crcs::load(&pending, disk, first, n)?;
            let committed = crcs::load(&committed_table, disk, first, n)?;
            let data = &mut buf[piece.buf_off..piece.buf_off + piece.len as usize];
            for (i, block) in data.chunks_mut(BLOCK_SIZE as usize).enumerate() {
                let pblock = first + i as u64;
                let Some(expected) = stored[i].or(committed[i]) else {
                    // Allocated but never written (or trimmed): thin space reads as zeros.
                    block.fill(0);
                    continue;
                };
                let actual = crc32c::crc32c(block);
                if actual == expected || committed[i] == Some(actual) {
                    continue;
                }
                return Err(StorageError::ChecksumMismatch {
                    volume: label.to_owned(),
                    offset: piece.stripe * su + piece.within + i as u64 * BLOCK_SIZE,
                    disk: st.disk_name(disk),
                    physical_offset: pblock * BLOCK_SIZE,
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }
}
