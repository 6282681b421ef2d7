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

use io_uring::{IoUring, opcode, squeue, types};

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
        if let Some(recorder) = crate::power_loss::recorder() {
            for op in ops.iter() {
                if let IoOp::Write { file, offset, buf } = op {
                    recorder.before_write(file, *offset, buf.len() as u64)?;
                }
            }
        }
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
        let recorder = crate::power_loss::recorder();
        let started = match recorder {
            Some(recorder) => recorder.position()?,
            None => 0,
        };
        match self {
            FileEngine::Sync => {
                for file in files {
                    file.sync_data()?;
                }
            }
            FileEngine::IoUring(engine) => engine.sync_data(files)?,
        }
        match recorder {
            Some(recorder) => recorder.synced(files, started),
            None => Ok(()),
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

    /// Writes every buffer and fdatasyncs every file written, running `during` on the
    /// calling thread while the kernel works (io_uring: each file's writes and its
    /// fdatasync are one linked chain, all chains submitted at once). The writes must not
    /// overlap. Returns the I/O result and what `during` returned.
    pub fn write_sync_while<R>(
        &self,
        writes: &[(&File, u64, &[u8])],
        during: impl FnOnce() -> R,
    ) -> (io::Result<()>, R) {
        let fallback = |engine: &FileEngine| {
            let mut ops: Vec<IoOp<'_>> = writes
                .iter()
                .map(|&(file, offset, buf)| IoOp::Write { file, offset, buf })
                .collect();
            engine.run(&mut ops)?;
            let mut files: Vec<&File> = Vec::new();
            for &(file, _, _) in writes {
                if !files.iter().any(|f| f.as_raw_fd() == file.as_raw_fd()) {
                    files.push(file);
                }
            }
            engine.sync_data(&files)
        };
        let Some(recorder) = crate::power_loss::recorder() else {
            return self.write_sync_unrecorded(writes, during, fallback);
        };
        // Simulated power loss: every write is recorded before the sync starts (so the
        // sync covers them), the sync once it completed.
        let recorded = writes
            .iter()
            .try_for_each(|&(file, offset, buf)| {
                recorder.before_write(file, offset, buf.len() as u64)
            })
            .and_then(|()| recorder.position());
        let started = match recorded {
            Ok(started) => started,
            Err(error) => return (Err(error), during()),
        };
        let (result, r) = self.write_sync_unrecorded(writes, during, fallback);
        let files: Vec<&File> = writes.iter().map(|&(file, _, _)| file).collect();
        (result.and_then(|()| recorder.synced(&files, started)), r)
    }

    fn write_sync_unrecorded<R>(
        &self,
        writes: &[(&File, u64, &[u8])],
        during: impl FnOnce() -> R,
        fallback: impl Fn(&FileEngine) -> io::Result<()>,
    ) -> (io::Result<()>, R) {
        match self {
            FileEngine::Sync => {
                let result = fallback(self);
                (result, during())
            }
            FileEngine::IoUring(engine) => {
                let (chained, r) = engine.write_sync_chained(writes, during);
                match chained {
                    Ok(true) => (Ok(()), r),
                    // A short write or a cancelled link: redo it all plainly (same bytes,
                    // same places, so repeating is harmless).
                    Ok(false) => (fallback(self), r),
                    Err(e) => (Err(e), r),
                }
            }
        }
    }
}

/// io_uring_enter errors after which simply entering again is right.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
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
                    match ring.submit_and_wait(1) {
                        Ok(_) => {}
                        Err(e) if transient(&e) => continue,
                        Err(e) => return Err(e),
                    }
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

    /// `Ok(true)` when every write completed in full and every fdatasync succeeded,
    /// `Ok(false)` when something was short or cancelled and should be redone plainly.
    fn write_sync_chained<R>(
        &self,
        writes: &[(&File, u64, &[u8])],
        during: impl FnOnce() -> R,
    ) -> (io::Result<bool>, R) {
        let mut by_file: Vec<(&File, Vec<usize>)> = Vec::new();
        for (i, &(file, _, _)) in writes.iter().enumerate() {
            match by_file
                .iter_mut()
                .find(|(f, _)| f.as_raw_fd() == file.as_raw_fd())
            {
                Some((_, list)) => list.push(i),
                None => by_file.push((file, vec![i])),
            }
        }
        let entries = writes.len() + by_file.len();
        if entries > RING_ENTRIES as usize {
            return (Ok(false), during());
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        const FSYNC_TAG: u64 = 1 << 63;
        for (file, list) in &by_file {
            for &i in list {
                let (_, offset, buf) = writes[i];
                let entry =
                    opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), buf.len() as u32)
                        .offset(offset)
                        .build()
                        .flags(squeue::Flags::IO_LINK)
                        .user_data(i as u64);
                // SAFETY: the buffer is borrowed from `writes` for the whole call and we
                // wait below for every submitted entry before returning; the descriptor is
                // kept open by the borrowed `&File`; the queue has room (checked above,
                // and it is empty: every call drains what it submits).
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    return (
                        Err(io::Error::other("io_uring submission queue full")),
                        during(),
                    );
                }
            }
            let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(FSYNC_TAG);
            // SAFETY: an fsync entry references no memory; the descriptor stays open
            // through the borrowed `&File` until every completion is reaped below.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                return (
                    Err(io::Error::other("io_uring submission queue full")),
                    during(),
                );
            }
        }
        loop {
            match ring.submit() {
                Ok(_) => break,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    // The kernel took none of the entries (a bad ring, not a bad request):
                    // start over with a fresh ring so no entry outlives its buffer.
                    if let Ok(fresh) = IoUring::new(RING_ENTRIES) {
                        *ring = fresh;
                    }
                    return (Err(e), during());
                }
            }
        }
        let r = during();
        let mut outstanding = entries;
        let mut complete = true;
        let mut first_error = None;
        while outstanding > 0 {
            if let Err(e) = ring.submit_and_wait(1) {
                if transient(&e) {
                    continue;
                }
                return (Err(e), r);
            }
            for cqe in ring.completion() {
                outstanding -= 1;
                let res = cqe.result();
                if res == -libc::ECANCELED || res == -libc::EINTR || res == -libc::EAGAIN {
                    complete = false;
                } else if res < 0 {
                    first_error.get_or_insert(io::Error::from_raw_os_error(-res));
                } else if cqe.user_data() != FSYNC_TAG
                    && res as usize != writes[cqe.user_data() as usize].2.len()
                {
                    complete = false;
                }
            }
        }
        match first_error {
            Some(e) => (Err(e), r),
            None => (Ok(complete), r),
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
                match ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if transient(&e) => continue,
                    Err(e) => return Err(e),
                }
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
