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
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Discards a range (advisory).
    fn trim(&self, offset: u64, length: u64) -> Result<()>;
    /// Writes zeros over a range.
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        let zeros = vec![0u8; length as usize];
        self.write_at(offset, &zeros)
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
