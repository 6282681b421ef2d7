//! Simulated power loss, for tests only.
//!
//! `kill -9` is not a power loss: the page cache survives it, so a write that was never
//! synced is still there when the store reopens. In this mode every write of the store
//! (data and journal through [`crate::FileEngine`], and `meta.redb` through a redb
//! backend) first appends the bytes it replaces to an undo log, and every `fdatasync`
//! appends a marker saying which of those writes it made durable. After the process is
//! killed, [`cut`] rewinds every write no sync covered, newest first, and shrinks files
//! that unsynced writes grew: what is left is what a disk would hold after the power
//! went out at the moment of the kill (the worst case: every unsynced write lost, none
//! reordered or torn).
//!
//! How it is switched on, and why that way: the environment variable [`ENV`] names the
//! undo log, and it is honoured only in debug builds (`cfg(debug_assertions)`); a
//! release build compiles the hook to nothing. Test binaries and the `cairn-node` that
//! integration tests start are debug builds, so a test can put a real node process in
//! this mode without a cargo feature threaded through every crate that links the store
//! (a feature would also be unified into normal builds of the workspace), and no
//! released node can be switched into it by its environment.
//!
//! The log is written with plain `write` (no sync): it is the test's record of the cut,
//! not subject to it, and `kill -9` keeps the page cache. Rewind only files of a process
//! that is dead.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The environment variable naming the undo log (debug builds only).
pub const ENV: &str = "CAIRN_STORAGE_POWER_LOSS";

const UNDO: u8 = 1;
const SYNC: u8 = 2;

/// The undo log of this process.
#[derive(Debug)]
pub struct Recorder {
    log: Mutex<File>,
}

static RECORDER: OnceLock<Option<Recorder>> = OnceLock::new();

/// The process's recorder, when the mode is on.
pub fn recorder() -> Option<&'static Recorder> {
    #[cfg(debug_assertions)]
    {
        RECORDER
            .get_or_init(|| {
                let path = std::env::var_os(ENV)?;
                let log = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .unwrap_or_else(|error| {
                        panic!(
                            "{ENV}={}: cannot open the undo log: {error}",
                            path.display()
                        )
                    });
                Some(Recorder {
                    log: Mutex::new(log),
                })
            })
            .as_ref()
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = &RECORDER;
        None
    }
}

fn path_of(file: &File) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

fn put_path(out: &mut Vec<u8>, path: &Path) {
    let bytes = path.as_os_str().as_encoded_bytes();
    out.extend((bytes.len() as u32).to_le_bytes());
    out.extend(bytes);
}

impl Recorder {
    fn append(&self, record: &[u8]) -> io::Result<u64> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let position = log.metadata()?.len();
        log.write_all(record)?;
        Ok(position)
    }

    /// The log's length now: a sync that starts now covers every record before it.
    pub fn position(&self) -> io::Result<u64> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        Ok(log.metadata()?.len())
    }

    /// Records what `len` bytes at `offset` of the file at `path` hold now (read by
    /// `read`), before they are overwritten; `old_len` is the file's length now.
    fn before(
        &self,
        path: &Path,
        offset: u64,
        len: u64,
        old_len: u64,
        read: impl FnOnce(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = (offset + len).min(old_len);
        let mut old = vec![0u8; end.saturating_sub(offset) as usize];
        if !old.is_empty() {
            read(offset, &mut old)?;
        }
        let mut record = vec![UNDO];
        put_path(&mut record, path);
        record.extend(offset.to_le_bytes());
        record.extend(old_len.to_le_bytes());
        record.extend((old.len() as u64).to_le_bytes());
        record.extend(old);
        self.append(&record).map(|_| ())
    }

    /// Before a write of `len` bytes at `offset` of `file`.
    pub fn before_write(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let old_len = file.metadata()?.len();
        self.before(&path_of(file)?, offset, len, old_len, |at, buf| {
            file.read_exact_at(buf, at)
        })
    }

    /// After `files` were synced by a sync that started at log position `started`.
    pub fn synced(&self, files: &[&File], started: u64) -> io::Result<()> {
        for file in files {
            self.synced_path(&path_of(file)?, started)?;
        }
        Ok(())
    }

    fn synced_path(&self, path: &Path, started: u64) -> io::Result<()> {
        let mut record = vec![SYNC];
        put_path(&mut record, path);
        record.extend(started.to_le_bytes());
        self.append(&record).map(|_| ())
    }
}

/// What [`cut`] discarded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Writes rewound (no sync covered them).
    pub writes_discarded: u64,
    /// Bytes those writes had replaced, now restored.
    pub bytes_restored: u64,
    /// Files touched.
    pub files: Vec<PathBuf>,
}

struct Undo {
    position: u64,
    offset: u64,
    old_len: u64,
    old: Vec<u8>,
}

/// Rewinds every write recorded in the undo log at `log` that no later sync covered,
/// newest first, then empties the log. Only for files of a dead process.
pub fn cut(log: &Path) -> io::Result<CutReport> {
    let mut bytes = Vec::new();
    File::open(log)?.read_to_end(&mut bytes)?;
    let mut undos: BTreeMap<PathBuf, Vec<Undo>> = BTreeMap::new();
    let mut synced: BTreeMap<PathBuf, u64> = BTreeMap::new();
    let mut at = 0usize;
    let truncated = || io::Error::new(io::ErrorKind::InvalidData, "undo log ends mid-record");
    let take = |at: &mut usize, n: usize| -> io::Result<&[u8]> {
        let slice = bytes.get(*at..*at + n).ok_or_else(truncated)?;
        *at += n;
        Ok(slice)
    };
    let u64_at = |at: &mut usize| -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            take(at, 8)?.try_into().expect("8 bytes"),
        ))
    };
    while at < bytes.len() {
        let position = at as u64;
        let kind = take(&mut at, 1)?[0];
        let path_len = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4 bytes")) as usize;
        // SAFETY-free: the bytes came from `as_encoded_bytes` of a path in this process.
        let path = PathBuf::from(
            std::str::from_utf8(take(&mut at, path_len)?)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "path is not UTF-8"))?,
        );
        match kind {
            UNDO => {
                let offset = u64_at(&mut at)?;
                let old_len = u64_at(&mut at)?;
                let len = u64_at(&mut at)? as usize;
                let old = take(&mut at, len)?.to_vec();
                undos.entry(path).or_default().push(Undo {
                    position,
                    offset,
                    old_len,
                    old,
                });
            }
            SYNC => {
                let started = u64_at(&mut at)?;
                let covered = synced.entry(path).or_insert(0);
                *covered = (*covered).max(started);
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("undo log record of unknown kind {other} at byte {position}"),
                ));
            }
        }
    }
    let mut report = CutReport::default();
    for (path, records) in undos {
        let covered = synced.get(&path).copied().unwrap_or(0);
        let lost: Vec<&Undo> = records
            .iter()
            .filter(|undo| undo.position >= covered)
            .collect();
        if lost.is_empty() {
            continue;
        }
        let file = OpenOptions::new().write(true).open(&path)?;
        for undo in lost.iter().rev() {
            file.write_all_at(&undo.old, undo.offset)?;
            report.bytes_restored += undo.old.len() as u64;
            report.writes_discarded += 1;
        }
        let first_len = lost[0].old_len;
        if file.metadata()?.len() > first_len {
            file.set_len(first_len)?;
        }
        file.sync_all()?;
        report.files.push(path);
    }
    File::create(log)?;
    Ok(report)
}

/// A redb backend that records like the engine does (for `meta.redb`).
#[derive(Debug)]
pub struct RecordingBackend {
    inner: redb::backends::FileBackend,
    path: PathBuf,
    recorder: &'static Recorder,
}

impl RecordingBackend {
    /// Wraps the file at `path` (opened or created read-write).
    pub fn open(path: &Path, recorder: &'static Recorder) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let inner = redb::backends::FileBackend::new(file).map_err(io::Error::other)?;
        Ok(Self {
            inner,
            path: std::fs::canonicalize(path)?,
            recorder,
        })
    }
}

impl redb::StorageBackend for RecordingBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let old_len = self.inner.len()?;
        let start = len.min(old_len);
        self.recorder.before(
            &self.path,
            start,
            old_len.max(len) - start,
            old_len,
            |at, buf| self.inner.read(at, buf),
        )?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let started = self.recorder.position()?;
        self.inner.sync_data()?;
        self.recorder.synced_path(&self.path, started)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let old_len = self.inner.len()?;
        self.recorder
            .before(&self.path, offset, data.len() as u64, old_len, |at, buf| {
                self.inner.read(at, buf)
            })?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_rewinds_unsynced_writes_newest_first_and_keeps_synced_ones() {
        let dir = tempfile::tempdir().unwrap();
        let recorder: &'static Recorder = Box::leak(Box::new(Recorder {
            log: Mutex::new(File::create(dir.path().join("undo.log")).unwrap()),
        }));
        let a_path = dir.path().join("a");
        let b_path = dir.path().join("b");
        std::fs::write(&a_path, [0u8; 8192]).unwrap();
        std::fs::write(&b_path, [0u8; 4096]).unwrap();
        let a = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&a_path)
            .unwrap();
        let b = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&b_path)
            .unwrap();
        let write = |file: &File, offset: u64, byte: u8, len: usize| {
            recorder.before_write(file, offset, len as u64).unwrap();
            file.write_all_at(&vec![byte; len], offset).unwrap();
        };
        write(&a, 0, 1, 4096);
        let started = recorder.position().unwrap();
        a.sync_data().unwrap();
        recorder.synced(&[&a], started).unwrap();
        // Unsynced: an overwrite of synced data, two writes to one place, a write that
        // grows the file, and everything written to b.
        write(&a, 0, 2, 4096);
        write(&a, 4096, 3, 4096);
        write(&a, 4096, 4, 4096);
        write(&a, 8192, 5, 4096);
        write(&b, 0, 6, 4096);
        let report = cut(&dir.path().join("undo.log")).unwrap();
        assert_eq!(report.writes_discarded, 5);
        let a_now = std::fs::read(&a_path).unwrap();
        assert_eq!(a_now.len(), 8192, "the unsynced growth is gone");
        assert!(
            a_now[..4096].iter().all(|byte| *byte == 1),
            "the synced write stays"
        );
        assert!(a_now[4096..].iter().all(|byte| *byte == 0));
        assert!(
            std::fs::read(&b_path)
                .unwrap()
                .iter()
                .all(|byte| *byte == 0)
        );
        // The log is consumed: a second cut changes nothing.
        assert_eq!(
            cut(&dir.path().join("undo.log")).unwrap(),
            CutReport::default()
        );
    }
}
