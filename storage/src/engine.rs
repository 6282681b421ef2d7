//! The I/O seam: every data read, write and sync of the store goes through a [`FileEngine`].
//!
//! Like Firecracker's `FileEngine { Async, Sync }`, there are two implementations behind one
//! small type: io_uring (the real one, batching every piece of a striped request into one
//! submission so columns on different disks proceed in parallel) and plain `pread`/`pwrite`
//! for kernels where io_uring is missing or forbidden (seccomp, containers).
//!
//! Both engines complete every operation fully (short transfers are resubmitted) before
//! returning, so callers may lend buffers by reference.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use io_uring::{IoUring, opcode, types};

/// Which engine to use when opening a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring when the kernel offers it, else the synchronous engine.
    #[default]
    Auto,
    /// io_uring only; opening fails where it is unavailable.
    IoUring,
    /// `pread`/`pwrite`/`fdatasync` on the calling thread.
    Sync,
}

/// Number of submission queue entries of the ring; larger batches are split.
const RING_ENTRIES: u32 = 128;

/// One data transfer for [`FileEngine::run`].
#[derive(Debug)]
pub enum IoOp<'a> {
    /// Fill `buf` from `file` at `offset`.
    Read {
        /// Source file.
        file: &'a File,
        /// Byte offset in the file.
        offset: u64,
        /// Destination; filled completely or the batch fails.
        buf: &'a mut [u8],
    },
    /// Write all of `buf` to `file` at `offset`.
    Write {
        /// Destination file.
        file: &'a File,
        /// Byte offset in the file.
        offset: u64,
        /// Data to write.
        buf: &'a [u8],
    },
}

impl IoOp<'_> {
    fn len(&self) -> usize {
        match self {
            IoOp::Read { buf, .. } => buf.len(),
            IoOp::Write { buf, .. } => buf.len(),
        }
    }
}

/// A data-path engine: io_uring or synchronous.
#[derive(Debug)]
pub enum FileEngine {
    /// Batched submission through one shared ring.
    IoUring(Box<UringEngine>),
    /// Blocking positional I/O.
    Sync,
}

/// The io_uring engine state.
pub struct UringEngine {
    ring: Mutex<IoUring>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("entries", &RING_ENTRIES)
            .finish()
    }
}

impl FileEngine {
    /// Creates the engine `kind` asks for.
    pub fn new(kind: EngineKind) -> io::Result<Self> {
        match kind {
            EngineKind::Sync => Ok(FileEngine::Sync),
            EngineKind::IoUring => Ok(FileEngine::IoUring(Box::new(UringEngine {
                ring: Mutex::new(IoUring::new(RING_ENTRIES)?),
            }))),
            EngineKind::Auto => match IoUring::new(RING_ENTRIES) {
                Ok(ring) => Ok(FileEngine::IoUring(Box::new(UringEngine {
                    ring: Mutex::new(ring),
                }))),
                Err(_) => Ok(FileEngine::Sync),
            },
        }
    }

    /// The engine actually in use (never [`EngineKind::Auto`]).
    pub fn kind(&self) -> EngineKind {
        match self {
            FileEngine::IoUring(_) => EngineKind::IoUring,
            FileEngine::Sync => EngineKind::Sync,
        }
    }

    /// Runs every operation to completion. Operations in one batch may run concurrently and
    /// in any order, so they must not overlap.
    pub fn run(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        match self {
            FileEngine::Sync => {
                for op in ops.iter_mut() {
                    match op {
                        IoOp::Read { file, offset, buf } => file.read_exact_at(buf, *offset)?,
                        IoOp::Write { file, offset, buf } => file.write_all_at(buf, *offset)?,
                    }
                }
                Ok(())
            }
            FileEngine::IoUring(engine) => engine.run(ops),
        }
    }

    /// Makes every completed write to `files` durable (`fdatasync`), in parallel on io_uring.
    pub fn sync_data(&self, files: &[&File]) -> io::Result<()> {
        match self {
            FileEngine::Sync => {
                for file in files {
                    file.sync_data()?;
                }
                Ok(())
            }
            FileEngine::IoUring(engine) => engine.sync_data(files),
        }
    }

    /// Convenience: writes one buffer fully.
    pub fn write_all_at(&self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.run(&mut [IoOp::Write { file, offset, buf }])
    }

    /// Convenience: fills one buffer fully.
    pub fn read_exact_at(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.run(&mut [IoOp::Read { file, offset, buf }])
    }
}

impl UringEngine {
    fn run(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        let mut done = vec![0usize; ops.len()];
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let pending: Vec<usize> = (0..ops.len()).filter(|&i| done[i] < ops[i].len()).collect();
            if pending.is_empty() {
                return Ok(());
            }
            for chunk in pending.chunks(RING_ENTRIES as usize) {
                for &i in chunk {
                    let progress = done[i];
                    let entry = match &mut ops[i] {
                        IoOp::Read { file, offset, buf } => {
                            let rest = &mut buf[progress..];
                            opcode::Read::new(
                                types::Fd(file.as_raw_fd()),
                                rest.as_mut_ptr(),
                                rest.len() as u32,
                            )
                            .offset(*offset + progress as u64)
                            .build()
                        }
                        IoOp::Write { file, offset, buf } => {
                            let rest = &buf[progress..];
                            opcode::Write::new(
                                types::Fd(file.as_raw_fd()),
                                rest.as_ptr(),
                                rest.len() as u32,
                            )
                            .offset(*offset + progress as u64)
                            .build()
                        }
                    }
                    .user_data(i as u64);
                    // SAFETY: the entry points into a buffer borrowed by `ops` for the whole
                    // call; we wait below for every submitted entry to complete before
                    // returning or touching the buffer again, and the file descriptor is kept
                    // open by the borrowed `&File`. The queue has room: chunks are at most
                    // RING_ENTRIES long and the queue is drained by submit_and_wait.
                    unsafe { ring.submission().push(&entry) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
                let mut outstanding = chunk.len();
                let mut first_error = None;
                while outstanding > 0 {
                    ring.submit_and_wait(1)?;
                    for cqe in ring.completion() {
                        outstanding -= 1;
                        let i = cqe.user_data() as usize;
                        let res = cqe.result();
                        if res < 0 {
                            let err = io::Error::from_raw_os_error(-res);
                            if !matches!(
                                err.kind(),
                                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                            ) {
                                first_error.get_or_insert(err);
                            }
                        } else if res == 0 && ops[i].len() > done[i] {
                            first_error.get_or_insert(match ops[i] {
                                IoOp::Read { .. } => io::Error::from(io::ErrorKind::UnexpectedEof),
                                IoOp::Write { .. } => io::Error::from(io::ErrorKind::WriteZero),
                            });
                        } else {
                            done[i] += res as usize;
                        }
                    }
                }
                if let Some(err) = first_error {
                    return Err(err);
                }
            }
        }
    }

    fn sync_data(&self, files: &[&File]) -> io::Result<()> {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in files.chunks(RING_ENTRIES as usize) {
            for (i, file) in chunk.iter().enumerate() {
                let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(i as u64);
                // SAFETY: an fsync entry references no memory; the descriptors stay open
                // through the borrowed `&File`s until we have reaped every completion below.
                unsafe { ring.submission().push(&entry) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
            let mut outstanding = chunk.len();
            let mut first_error = None;
            while outstanding > 0 {
                ring.submit_and_wait(1)?;
                for cqe in ring.completion() {
                    outstanding -= 1;
                    if cqe.result() < 0 {
                        first_error.get_or_insert(io::Error::from_raw_os_error(-cqe.result()));
                    }
                }
            }
            if let Some(err) = first_error {
                return Err(err);
            }
        }
        Ok(())
    }
}
