//! The block-device seam the NBD server (and later the VMM's virtio-blk) serve.

use crate::error::{Result, StorageError};
use crate::store::{BLOCK_SIZE, Snapshot, Volume};

/// Something with a size that can be read and written in blocks.
///
/// Offsets and lengths passed in are multiples of [`BlockDevice::block_size`]; callers
/// with smaller requests (NBD clients) read-modify-write around it.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> Result<u64>;
    /// Alignment of every request, a power of two.
    fn block_size(&self) -> u32 {
        BLOCK_SIZE as u32
    }
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at `offset`, durably.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// [`BlockDevice::write_at`] with a buffer the device may keep: a device that hands
    /// the bytes on (to another thread, a replica, a request) takes them without a copy.
    /// The NBD server passes each write's payload here as it read it from the socket.
    fn write_owned(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.write_at(offset, &data)
    }
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Discards a range (advisory).
    fn trim(&self, offset: u64, length: u64) -> Result<()>;
    /// Writes zeros over a range.
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        let zeros = vec![0u8; length as usize];
        self.write_at(offset, &zeros)
    }
    /// Which bytes from `offset` hold data and which are holes (unallocated, reading as
    /// zeros), as consecutive runs starting at `offset`. The runs may cover less than
    /// `length` (callers ask again for the rest) but cover at least one byte when
    /// `length > 0`. `offset` and `length` need not be block-aligned.
    ///
    /// The default reports everything as data, which is always true but lets no client
    /// skip anything.
    fn allocation(&self, offset: u64, length: u64) -> Result<Vec<AllocationRun>> {
        let _ = offset;
        Ok(vec![AllocationRun {
            length,
            allocated: true,
        }])
    }
}

/// A run of bytes that either holds data or is a hole, as reported by
/// [`BlockDevice::allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationRun {
    /// Length in bytes.
    pub length: u64,
    /// `false` for a hole: no space is allocated and the bytes read as zeros.
    pub allocated: bool,
}

/// Most stripe units [`Volume`]'s [`BlockDevice::allocation`] looks up per call, so one
/// NBD block-status request over a huge volume stays short; clients ask for the rest.
const MAX_UNITS_PER_ALLOCATION_QUERY: u64 = 8192;

/// Appends a run, merging it into the previous one when both are data or both holes.
fn push_run(runs: &mut Vec<AllocationRun>, length: u64, allocated: bool) {
    match runs.last_mut() {
        Some(last) if last.allocated == allocated => last.length += length,
        _ => runs.push(AllocationRun { length, allocated }),
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> Result<u64> {
        Ok(self.info()?.size)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Volume::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        Volume::write_at(self, offset, data).map(|_| ())
    }
    fn flush(&self) -> Result<()> {
        Volume::flush(self)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        Volume::trim(self, offset, length).map(|_| ())
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        Volume::write_zeroes(self, offset, length).map(|_| ())
    }
    /// One lookup per stripe unit (the allocation unit of a thin volume): a unit with an
    /// extent in the volume's layer chain is data (even if some of its blocks were never
    /// written), a unit without one, or trimmed or zeroed whole, is a hole.
    fn allocation(&self, offset: u64, length: u64) -> Result<Vec<AllocationRun>> {
        let info = self.info()?;
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= info.size)
            .ok_or_else(|| StorageError::OutOfRange {
                field: "length",
                volume: info.name.clone(),
                offset,
                length,
                size: info.size,
            })?;
        let unit = info.stripe_unit;
        let mut runs = Vec::new();
        let mut position = offset;
        let mut units = 0;
        while position < end && units < MAX_UNITS_PER_ALLOCATION_QUERY {
            let unit_end = ((position / unit + 1) * unit).min(end);
            let allocated = self.locate(position)?.is_some();
            push_run(&mut runs, unit_end - position, allocated);
            position = unit_end;
            units += 1;
        }
        Ok(runs)
    }
}

impl BlockDevice for Snapshot {
    fn size(&self) -> Result<u64> {
        Snapshot::size(self)
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Snapshot::read_at(self, offset, buf)
    }
    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<()> {
        Err(StorageError::ReadOnly { name: self.label() })
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _length: u64) -> Result<()> {
        Err(StorageError::ReadOnly { name: self.label() })
    }
    fn write_zeroes(&self, _offset: u64, _length: u64) -> Result<()> {
        Err(StorageError::ReadOnly { name: self.label() })
    }
}
