//! The storage seam of the VMM: what a virtio-blk device reads and writes.
//!
//! The storage engine (crate `storage`) provides cairn volumes; the node agent serves a
//! VM's volumes over NBD on unix sockets and
//! [`NbdBackend`](super::nbd_client::NbdBackend) adapts such an export to
//! [`BlockBackend`]. [`FileBackend`] serves a plain file (or block device) and
//! [`MemoryBackend`] a byte vector, for tests and fault injection.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

/// A disk as the VMM sees it: a fixed number of bytes, positioned reads and writes, and
/// a durability barrier. Implementations are shared by vCPU threads.
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Fills `buffer` from byte `offset`; the range lies inside [`Self::size`].
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buffer` at byte `offset`; the range lies inside [`Self::size`].
    fn write_at(&self, buffer: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Whether writes are refused (the device then offers `VIRTIO_BLK_F_RO`).
    fn read_only(&self) -> bool {
        false
    }
}

/// A [`BlockBackend`] on a file or block device, with positioned I/O (`pread`/`pwrite`).
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    /// Opens `path`; its size is fixed at open time and rounded down to 512 bytes.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len() & !511;
        Ok(Self {
            file,
            size,
            read_only,
        })
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buffer, offset)
    }

    fn write_at(&self, buffer: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ));
        }
        self.file.write_all_at(buffer, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

/// A [`BlockBackend`] in memory, optionally failing every request (fault injection).
#[derive(Debug)]
pub struct MemoryBackend {
    bytes: Mutex<Vec<u8>>,
    failing: std::sync::atomic::AtomicBool,
}

impl MemoryBackend {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            bytes: Mutex::new(vec![0; size as usize]),
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes every later request fail with an I/O error (or succeed again).
    pub fn set_failing(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    /// A copy of the disk's contents.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().expect("memory backend lock").clone()
    }

    fn check(&self) -> io::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other("injected failure"));
        }
        Ok(())
    }
}

impl BlockBackend for MemoryBackend {
    fn size(&self) -> u64 {
        self.bytes.lock().expect("memory backend lock").len() as u64
    }

    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        self.check()?;
        let bytes = self.bytes.lock().expect("memory backend lock");
        let start = offset as usize;
        let source = bytes
            .get(start..start + buffer.len())
            .ok_or_else(|| io::Error::other("read beyond the end"))?;
        buffer.copy_from_slice(source);
        Ok(())
    }

    fn write_at(&self, buffer: &[u8], offset: u64) -> io::Result<()> {
        self.check()?;
        let mut bytes = self.bytes.lock().expect("memory backend lock");
        let start = offset as usize;
        let target = bytes
            .get_mut(start..start + buffer.len())
            .ok_or_else(|| io::Error::other("write beyond the end"))?;
        target.copy_from_slice(buffer);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_backend_round_trips_and_honours_read_only() {
        let path = std::env::temp_dir().join(format!("cairn-vmm-block-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192 + 100]).expect("create");
        let backend = FileBackend::open(&path, false).expect("open");
        assert_eq!(backend.size(), 8192, "size rounds down to whole sectors");
        backend.write_at(b"cairn", 4096).expect("write");
        backend.flush().expect("flush");
        let mut buffer = [0u8; 5];
        backend.read_at(&mut buffer, 4096).expect("read");
        assert_eq!(&buffer, b"cairn");
        let read_only = FileBackend::open(&path, true).expect("open read-only");
        assert!(read_only.read_only());
        assert!(read_only.write_at(b"x", 0).is_err());
        std::fs::remove_file(&path).expect("remove");
    }
}
