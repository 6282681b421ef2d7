//! The store: disks, volumes, snapshots and clones, and the data path.
//!
//! Write path (what makes an acknowledged write survive `kill -9` and power loss):
//!
//! 1. Plan: split the request into stripe-unit pieces; allocate extents for units the
//!    volume's writable layer lacks (in memory only) and plan copy-on-write of blocks an
//!    ancestor layer holds; compute the crc32c of every 4 KiB block.
//! 2. Build the write's [`WriteRecord`] (new extents, new checksums as *pending*, volume
//!    sequence number) and place it in the journal ring of the first disk the data touches.
//! 3. Fresh blocks only: data, copied blocks and the record are written and each touched
//!    disk gets one `fdatasync` (one linked io_uring chain per disk), while the calling
//!    thread applies the record to redb without durability. Overwrites of acknowledged
//!    blocks: the record is written and synced first (the intent), then the data.
//! 4. Acknowledge. redb is made durable by checkpoints (before a journal ring wraps, every
//!    [`CHECKPOINT_RECORDS`] records, and with every structural change).
//!
//! Recovery replays journal records newer than the checkpoint, then checks every pending
//! checksum against the data on disk: a match commits it, a mismatch means the data never
//! landed (the write was not acknowledged), so the block keeps its old checksum or stays
//! unwritten and the volume's sequence number goes back. Reads prefer a pending checksum
//! over the committed one.
//!
//! A failure before step 3 leaves metadata untouched and rolls back the in-memory
//! allocator, so a full disk yields [`StorageError::NoSpace`] and changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::crcs::{self, BlockCrc};
use crate::engine::{EngineKind, FileEngine, IoOp};
use crate::error::{Result, StorageError};
use crate::journal::{self, CHECKPOINT_RECORDS, JOURNAL_BYTES, WriteRecord};
use crate::meta::{
    Allocator, CRCS, DISKS, Disk, EXTENTS, Extent, FORMAT_VERSION, FREE, Geometry, INFLIGHT,
    LAYERS, Layer, META, PENDING, SNAPSHOTS, SnapshotRecord, State, VOLUMES, VolumeRecord,
};

/// Size of a checksummed block and the alignment of every data request.
pub const BLOCK_SIZE: u64 = 4096;
/// Smallest stripe unit.
pub const MIN_STRIPE_UNIT: u64 = 4096;
/// Largest stripe unit.
pub const MAX_STRIPE_UNIT: u64 = 64 << 20;
/// Largest stripe width.
pub const MAX_STRIPE_WIDTH: usize = 64;
/// Largest single read or write request.
pub const MAX_IO: u64 = 64 << 20;

/// How to open a store.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreOptions {
    /// Data-path engine; [`EngineKind::Auto`] picks io_uring where available.
    pub engine: EngineKind,
}

/// Where a new disk's bytes live.
#[derive(Debug, Clone)]
pub enum DiskSource {
    /// A file `disks/<name>.img` under the data directory, of fixed capacity (sparse).
    File {
        /// Capacity in bytes, a multiple of [`BLOCK_SIZE`].
        capacity: u64,
    },
    /// An existing file or block device; its current size is the capacity.
    Path(PathBuf),
}

/// A disk as reported by [`Store::disks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Name given at [`Store::add_disk`].
    pub name: String,
    /// File or device path.
    pub path: PathBuf,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Bytes allocated to extents.
    pub allocated: u64,
}

/// What [`Store::create_volume`] should build.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Volume name: 1..=128 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Size in bytes, a multiple of [`BLOCK_SIZE`]. Thin: nothing is allocated up front.
    pub size: u64,
    /// Stripe unit in bytes: a power of two in [`MIN_STRIPE_UNIT`]..=[`MAX_STRIPE_UNIT`].
    pub stripe_unit: u64,
    /// Number of columns, 1..=[`MAX_STRIPE_WIDTH`], each on a different disk.
    pub stripe_width: usize,
    /// Disks for the columns, in order (as chosen by placement); empty picks the disks
    /// with the most free space, ties broken by name.
    pub disks: Vec<String>,
}

/// A volume as reported by [`Store::volumes`] and [`Volume::info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Stripe unit in bytes.
    pub stripe_unit: u64,
    /// Disk name of every column.
    pub columns: Vec<String>,
    /// Sequence number of the last write or trim applied.
    pub seq: u64,
    /// Bytes of disk allocated to extents owned by the volume's writable layer.
    pub allocated: u64,
}

/// A snapshot as reported by [`Store::snapshots`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Volume it was taken of.
    pub volume: String,
    /// Snapshot name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Volume sequence number when it was taken.
    pub seq: u64,
}

/// What [`Store::open`] recovered; all zero after a clean shutdown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Journal records newer than the last checkpoint that were applied.
    pub journal_records_replayed: u64,
    /// Blocks of recent writes whose data was checked against their new checksum.
    pub blocks_verified: u64,
    /// Of those, blocks whose new data had not landed (they keep their old content).
    pub blocks_dropped: u64,
    /// The volume whose last write had not fully landed, whose sequence number went back.
    pub sequence_rolled_back: Option<String>,
}

/// Acknowledgement of a durable write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteReceipt {
    /// The volume's sequence number assigned to this write.
    pub seq: u64,
}

/// A block whose data does not match its checksum, found by [`Volume::scrub`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBlock {
    /// Logical byte offset in the volume.
    pub offset: u64,
    /// Disk holding it.
    pub disk: String,
    /// Byte offset on the disk.
    pub physical_offset: u64,
}

/// The physical location of a logical block, from [`Volume::locate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Disk name.
    pub disk: String,
    /// Disk file or device path.
    pub path: PathBuf,
    /// Byte offset on the disk.
    pub physical_offset: u64,
}

/// The node-local block store: a data directory with `meta.redb` and `disks/`.
///
/// Cloning is cheap and shares the store. Writes (and metadata changes) are serialised
/// store-wide; reads run concurrently with each other.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    db: Database,
    engine: FileEngine,
    state: RwLock<State>,
}

fn validate_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        return Err(StorageError::invalid(
            field,
            format!("must be 1 to 128 characters, got {}", name.len()),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(StorageError::invalid(
            field,
            format!("character {c:?} not allowed; use letters, digits, '.', '_', '-'"),
        ));
    }
    if name.starts_with('.') {
        return Err(StorageError::invalid(field, "must not start with '.'"));
    }
    Ok(())
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StorageError {
    move |e| StorageError::io(context, e)
}

/// Pending checksums are moved to the committed table in one batch once there are more
/// than this many; until then reads take the pending one. Bounds the work of recovery.
const PROMOTE_THRESHOLD: usize = 16 * 1024;

/// Largest overwrite whose data goes into its journal record (one flush instead of two).
const INLINE_MAX: u64 = 64 << 10;

/// One contiguous part of a request that falls inside a single stripe unit.
#[derive(Debug, Clone, Copy)]
struct Piece {
    stripe: u64,
    /// Offset inside the stripe unit.
    within: u64,
    /// Offset inside the request buffer.
    buf_off: usize,
    len: u64,
}

fn pieces(offset: u64, len: u64, stripe_unit: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let stripe = pos / stripe_unit;
        let within = pos % stripe_unit;
        let len = (stripe_unit - within).min(end - pos);
        out.push(Piece {
            stripe,
            within,
            buf_off: (pos - offset) as usize,
            len,
        });
        pos += len;
    }
    out
}

fn check_range(label: &str, size: u64, offset: u64, len: u64) -> Result<()> {
    if !offset.is_multiple_of(BLOCK_SIZE) {
        return Err(StorageError::Misaligned {
            field: "offset",
            value: offset,
            alignment: BLOCK_SIZE,
        });
    }
    if !len.is_multiple_of(BLOCK_SIZE) {
        return Err(StorageError::Misaligned {
            field: "length",
            value: len,
            alignment: BLOCK_SIZE,
        });
    }
    if len == 0 {
        return Err(StorageError::invalid("length", "must be greater than zero"));
    }
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(StorageError::OutOfRange {
            field: "offset",
            volume: label.to_owned(),
            offset,
            length: len,
            size,
        });
    }
    Ok(())
}

/// Like [`check_range`], and bounds the buffer a data request needs.
fn check_io(label: &str, size: u64, offset: u64, len: u64) -> Result<()> {
    check_range(label, size, offset, len)?;
    if len > MAX_IO {
        return Err(StorageError::invalid(
            "length",
            format!("{len} exceeds the largest data request of {MAX_IO} bytes"),
        ));
    }
    Ok(())
}

fn crc_blocks(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_SIZE as usize)
        .map(crc32c::crc32c)
        .collect()
}

/// What kind of write the shared write path performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteMode {
    /// Ordinary write to the volume's writable layer (copy-on-write from ancestors).
    Normal,
    /// Overwrite blocks where they live, even in a frozen layer: the data is a replica's
    /// copy of the very same content.
    Repair,
}

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
    /// Opens the store in `dir`, creating the directory and an empty store if needed.
    /// Resolves in-place overwrites interrupted by a crash.
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(dir.join("disks"))
            .map_err(io_err(format!("creating {}", dir.display())))?;
        let engine = FileEngine::new(options.engine).map_err(io_err("setting up io_uring"))?;
        let db_path = dir.join("meta.redb");
        let db = Database::create(&db_path)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            if meta.get("format")?.is_none() {
                meta.insert("format", FORMAT_VERSION)?;
                meta.insert("next_layer", 1)?;
            }
            txn.open_table(DISKS)?;
            txn.open_table(FREE)?;
            txn.open_table(VOLUMES)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(LAYERS)?;
            txn.open_table(EXTENTS)?;
            txn.open_table(CRCS)?;
            txn.open_table(PENDING)?;
            txn.open_table(INFLIGHT)?;
        }
        txn.commit()?;
        let state = State::load(&db.begin_read()?, &db_path)?;
        let store = Store {
            inner: Arc::new(Inner {
                dir,
                db,
                engine,
                state: RwLock::new(state),
            }),
        };
        {
            let mut st = store.write_state();
            store.replay_journals(&mut st)?;
        }
        store.recover_pending()?;
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// What opening the store had to recover after an unclean shutdown.
    pub fn recovery(&self) -> RecoveryReport {
        self.read_state().recovery.clone()
    }

    /// The engine in use ([`EngineKind::IoUring`] or [`EngineKind::Sync`]).
    pub fn engine_kind(&self) -> EngineKind {
        self.inner.engine.kind()
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `txn` durably as a checkpoint: every journal record written so far is then
    /// in redb for good and the journal rings start over.
    ///
    /// No write is in flight at a checkpoint (writes hold the store lock), so every pending
    /// checksum belongs to an acknowledged, durable write: they are all promoted.
    fn checkpoint_commit(&self, txn: redb::WriteTransaction, st: &mut State) -> Result<()> {
        self.checkpoint_commit_with(txn, st, true)
    }

    /// [`Store::checkpoint_commit`], optionally leaving pending checksums for recovery to
    /// verify (after journal replay).
    fn checkpoint_commit_with(
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

    /// Replays the journal records newer than the last checkpoint, in sequence order, into
    /// redb and `st`, and checkpoints.
    fn replay_journals(&self, st: &mut State) -> Result<()> {
        let mut found: BTreeMap<u64, WriteRecord> = BTreeMap::new();
        let mut ring = vec![0u8; JOURNAL_BYTES as usize];
        for d in st.disks.values() {
            self.inner
                .engine
                .read_exact_at(&d.file, d.alloc.capacity, &mut ring)
                .map_err(io_err(format!("reading the journal of disk `{}`", d.name)))?;
            for (seq, record) in journal::parse_ring(&ring) {
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
    fn recover_pending(&self) -> Result<()> {
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

    /// Registers a disk. A [`DiskSource::File`] is created under `disks/`.
    pub fn add_disk(&self, name: &str, source: DiskSource) -> Result<DiskInfo> {
        validate_name("disk name", name)?;
        let mut st = self.write_state();
        if st.disks.values().any(|d| d.name == name) {
            return Err(StorageError::AlreadyExists {
                kind: "disk",
                name: name.to_owned(),
            });
        }
        let (path, file, capacity) = match source {
            DiskSource::File { capacity } => {
                if capacity == 0 || !capacity.is_multiple_of(BLOCK_SIZE) {
                    return Err(StorageError::invalid(
                        "capacity",
                        format!("{capacity} must be a positive multiple of {BLOCK_SIZE}"),
                    ));
                }
                let path = self.inner.dir.join("disks").join(format!("{name}.img"));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(io_err(format!("creating disk file {}", path.display())))?;
                // Capacity for data, then the journal ring (sparse zeros: empty).
                file.set_len(capacity + JOURNAL_BYTES)
                    .map_err(io_err(format!("sizing disk file {}", path.display())))?;
                file.sync_all()
                    .map_err(io_err(format!("syncing disk file {}", path.display())))?;
                (path, file, capacity)
            }
            DiskSource::Path(path) => {
                let mut file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err(format!("opening disk {}", path.display())))?;
                let len = io::Seek::seek(&mut file, io::SeekFrom::End(0))
                    .map_err(io_err(format!("sizing disk {}", path.display())))?;
                let usable = len - len % BLOCK_SIZE;
                if usable < JOURNAL_BYTES + BLOCK_SIZE {
                    return Err(StorageError::invalid(
                        "path",
                        format!(
                            "{} has {len} bytes; a disk needs at least {} (its journal takes {JOURNAL_BYTES})",
                            path.display(),
                            JOURNAL_BYTES + BLOCK_SIZE
                        ),
                    ));
                }
                // The journal ring is the last JOURNAL_BYTES.
                (path, file, usable - JOURNAL_BYTES)
            }
        };
        // Start the journal ring empty, and written for real: in a sparse file every record
        // would allocate filesystem blocks and make each fdatasync a filesystem journal
        // commit.
        let zeros = vec![0u8; JOURNAL_BYTES as usize];
        self.inner
            .engine
            .write_all_at(&file, capacity, &zeros)
            .and_then(|()| file.sync_data())
            .map_err(io_err(format!("clearing the journal of disk `{name}`")))?;
        let id = st.disks.keys().next_back().map_or(0, |&k| k + 1);
        let disk = Disk {
            name: name.to_owned(),
            path,
            file,
            alloc: Allocator {
                capacity,
                high_water: 0,
                free: BTreeMap::new(),
            },
        };
        let txn = self.inner.db.begin_write()?;
        txn.open_table(DISKS)?
            .insert(id, disk.record(&disk.alloc).encode().as_slice())?;
        self.checkpoint_commit(txn, &mut st)?;
        let info = DiskInfo {
            name: disk.name.clone(),
            path: disk.path.clone(),
            capacity,
            allocated: 0,
        };
        st.disks.insert(id, disk);
        Ok(info)
    }

    /// Every registered disk, in registration order.
    pub fn disks(&self) -> Vec<DiskInfo> {
        let st = self.read_state();
        st.disks
            .values()
            .map(|d| DiskInfo {
                name: d.name.clone(),
                path: d.path.clone(),
                capacity: d.alloc.capacity,
                allocated: d.alloc.allocated(),
            })
            .collect()
    }

    /// Creates an empty thin volume.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<Volume> {
        validate_name("name", &spec.name)?;
        let su = spec.stripe_unit;
        if !su.is_power_of_two() || !(MIN_STRIPE_UNIT..=MAX_STRIPE_UNIT).contains(&su) {
            return Err(StorageError::invalid(
                "stripe_unit",
                format!(
                    "{su} must be a power of two between {MIN_STRIPE_UNIT} and {MAX_STRIPE_UNIT}"
                ),
            ));
        }
        if spec.size == 0 || !spec.size.is_multiple_of(BLOCK_SIZE) {
            return Err(StorageError::invalid(
                "size",
                format!("{} must be a positive multiple of {BLOCK_SIZE}", spec.size),
            ));
        }
        if spec.stripe_width == 0 || spec.stripe_width > MAX_STRIPE_WIDTH {
            return Err(StorageError::invalid(
                "stripe_width",
                format!("{} must be 1 to {MAX_STRIPE_WIDTH}", spec.stripe_width),
            ));
        }
        let mut st = self.write_state();
        if st.volumes.contains_key(&spec.name) {
            return Err(StorageError::AlreadyExists {
                kind: "volume",
                name: spec.name.clone(),
            });
        }
        let columns: Vec<u32> = if spec.disks.is_empty() {
            if st.disks.len() < spec.stripe_width {
                return Err(StorageError::invalid(
                    "stripe_width",
                    format!(
                        "{} columns need as many disks, the store has {}",
                        spec.stripe_width,
                        st.disks.len()
                    ),
                ));
            }
            let mut by_free: Vec<(&u32, &Disk)> = st.disks.iter().collect();
            let free = |d: &Disk| d.alloc.capacity - d.alloc.allocated();
            by_free.sort_by(|a, b| free(b.1).cmp(&free(a.1)).then(a.1.name.cmp(&b.1.name)));
            by_free
                .iter()
                .take(spec.stripe_width)
                .map(|(id, _)| **id)
                .collect()
        } else {
            if spec.disks.len() != spec.stripe_width {
                return Err(StorageError::invalid(
                    "disks",
                    format!(
                        "{} disks given for a stripe width of {}",
                        spec.disks.len(),
                        spec.stripe_width
                    ),
                ));
            }
            let mut ids = Vec::new();
            for name in &spec.disks {
                let id = st
                    .disks
                    .iter()
                    .find(|(_, d)| &d.name == name)
                    .map(|(&id, _)| id)
                    .ok_or_else(|| StorageError::UnknownDisk { name: name.clone() })?;
                if ids.contains(&id) {
                    return Err(StorageError::invalid(
                        "disks",
                        format!("disk `{name}` named twice; columns need distinct disks"),
                    ));
                }
                ids.push(id);
            }
            ids
        };
        let layer = st.next_layer;
        let rec = VolumeRecord {
            geometry: Geometry {
                size: spec.size,
                stripe_unit: su,
                columns,
            },
            top: layer,
            seq: 0,
        };
        let txn = self.inner.db.begin_write()?;
        {
            txn.open_table(META)?.insert("next_layer", layer + 1)?;
            txn.open_table(LAYERS)?.insert(layer, (0, 1))?;
            txn.open_table(VOLUMES)?
                .insert(spec.name.as_str(), rec.encode().as_slice())?;
        }
        self.checkpoint_commit(txn, &mut st)?;
        st.next_layer = layer + 1;
        st.layers.insert(layer, Layer { parent: 0, refs: 1 });
        st.volumes.insert(spec.name.clone(), rec);
        Ok(Volume {
            store: self.clone(),
            name: spec.name.clone(),
        })
    }

    /// A handle on an existing volume.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        if !self.read_state().volumes.contains_key(name) {
            return Err(StorageError::UnknownVolume {
                name: name.to_owned(),
            });
        }
        Ok(Volume {
            store: self.clone(),
            name: name.to_owned(),
        })
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let st = self.read_state();
        st.volumes
            .iter()
            .map(|(name, rec)| volume_info(&st, name, rec))
            .collect()
    }

    /// Deletes a volume without snapshots and frees the extents only it used.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut st = self.write_state();
        let rec = st
            .volumes
            .get(name)
            .ok_or_else(|| StorageError::UnknownVolume {
                name: name.to_owned(),
            })?
            .clone();
        let count = st.snapshots.keys().filter(|(v, _)| v == name).count();
        if count > 0 {
            return Err(StorageError::HasSnapshots {
                volume: name.to_owned(),
                count,
            });
        }
        let mut plan = ReleasePlan::new(&st);
        let txn = self.inner.db.begin_write()?;
        release_layer(&mut plan, &st, &txn, rec.top)?;
        txn.open_table(VOLUMES)?.remove(name)?;
        write_disk_rows(&txn, &st, &plan.disks)?;
        self.checkpoint_commit(txn, &mut st)?;
        plan.apply(&mut st);
        st.volumes.remove(name);
        Ok(())
    }

    /// Grows a volume in place to `new_size` bytes (a positive multiple of
    /// [`BLOCK_SIZE`]). Its data stays where it is and the new space is thin: stripe units
    /// past the old end have no extents and read as zeros, as do the never-written blocks
    /// of a last stripe unit the old end cut through (they have no checksum). The size
    /// lives only in the volume's row, which is committed durably (as a checkpoint)
    /// before this returns, so after a crash the volume has either size, never anything
    /// between, and no write beyond the old end can have been acknowledged before the new
    /// size was durable. The same size changes nothing; a smaller one is refused:
    /// shrinking would drop data. Snapshots keep the size they were taken with.
    pub fn grow_volume(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        if new_size == 0 || !new_size.is_multiple_of(BLOCK_SIZE) {
            return Err(StorageError::invalid(
                "size",
                format!("{new_size} must be a positive multiple of {BLOCK_SIZE}"),
            ));
        }
        let mut st = self.write_state();
        let mut rec = st
            .volumes
            .get(name)
            .ok_or_else(|| StorageError::UnknownVolume {
                name: name.to_owned(),
            })?
            .clone();
        let old_size = rec.geometry.size;
        if new_size < old_size {
            return Err(StorageError::invalid(
                "size",
                format!(
                    "shrinking volume `{name}` from {old_size} to {new_size} bytes would lose data; volumes only grow"
                ),
            ));
        }
        if new_size == old_size {
            return Ok(volume_info(&st, name, &rec));
        }
        rec.geometry.size = new_size;
        let txn = self.inner.db.begin_write()?;
        txn.open_table(VOLUMES)?
            .insert(name, rec.encode().as_slice())?;
        self.checkpoint_commit(txn, &mut st)?;
        let info = volume_info(&st, name, &rec);
        st.volumes.insert(name.to_owned(), rec);
        Ok(info)
    }

    /// Takes a read-only snapshot of `volume` in O(1): the volume's layer is frozen and the
    /// volume continues on a new, empty layer on top of it.
    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<Snapshot> {
        validate_name("snapshot", name)?;
        let mut st = self.write_state();
        let mut rec = st
            .volumes
            .get(volume)
            .ok_or_else(|| StorageError::UnknownVolume {
                name: volume.to_owned(),
            })?
            .clone();
        let key = (volume.to_owned(), name.to_owned());
        if st.snapshots.contains_key(&key) {
            return Err(StorageError::AlreadyExists {
                kind: "snapshot",
                name: format!("{volume}@{name}"),
            });
        }
        let frozen = rec.top;
        let new_top = st.next_layer;
        let mut frozen_layer = st.layers[&frozen];
        // The volume's reference moves to the new layer; the snapshot and the new child
        // layer each hold one on the frozen layer.
        frozen_layer.refs += 1;
        let snap = SnapshotRecord {
            geometry: rec.geometry.clone(),
            layer: frozen,
            seq: rec.seq,
        };
        rec.top = new_top;
        let txn = self.inner.db.begin_write()?;
        {
            txn.open_table(META)?.insert("next_layer", new_top + 1)?;
            let mut layers = txn.open_table(LAYERS)?;
            layers.insert(frozen, (frozen_layer.parent, frozen_layer.refs))?;
            layers.insert(new_top, (frozen, 1))?;
            txn.open_table(VOLUMES)?
                .insert(volume, rec.encode().as_slice())?;
            txn.open_table(SNAPSHOTS)?
                .insert((volume, name), snap.encode().as_slice())?;
        }
        self.checkpoint_commit(txn, &mut st)?;
        st.next_layer = new_top + 1;
        st.layers.insert(frozen, frozen_layer);
        st.layers.insert(
            new_top,
            Layer {
                parent: frozen,
                refs: 1,
            },
        );
        st.volumes.insert(volume.to_owned(), rec);
        st.snapshots.insert(key, snap);
        Ok(Snapshot {
            store: self.clone(),
            volume: volume.to_owned(),
            name: name.to_owned(),
        })
    }

    /// A handle on an existing snapshot.
    pub fn snapshot(&self, volume: &str, name: &str) -> Result<Snapshot> {
        let st = self.read_state();
        if !st
            .snapshots
            .contains_key(&(volume.to_owned(), name.to_owned()))
        {
            if !st.volumes.contains_key(volume) {
                return Err(StorageError::UnknownVolume {
                    name: volume.to_owned(),
                });
            }
            return Err(StorageError::UnknownSnapshot {
                volume: volume.to_owned(),
                snapshot: name.to_owned(),
            });
        }
        Ok(Snapshot {
            store: self.clone(),
            volume: volume.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Snapshots of `volume`, by name.
    pub fn snapshots(&self, volume: &str) -> Vec<SnapshotInfo> {
        let st = self.read_state();
        st.snapshots
            .iter()
            .filter(|((v, _), _)| v == volume)
            .map(|((v, n), r)| SnapshotInfo {
                volume: v.clone(),
                name: n.clone(),
                size: r.geometry.size,
                seq: r.seq,
            })
            .collect()
    }

    /// Deletes a snapshot; its data stays as long as clones or the volume still see it.
    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<()> {
        let mut st = self.write_state();
        let key = (volume.to_owned(), name.to_owned());
        let Some(snap) = st.snapshots.get(&key).cloned() else {
            return Err(StorageError::UnknownSnapshot {
                volume: volume.to_owned(),
                snapshot: name.to_owned(),
            });
        };
        let mut plan = ReleasePlan::new(&st);
        let txn = self.inner.db.begin_write()?;
        release_layer(&mut plan, &st, &txn, snap.layer)?;
        txn.open_table(SNAPSHOTS)?.remove((volume, name))?;
        write_disk_rows(&txn, &st, &plan.disks)?;
        self.checkpoint_commit(txn, &mut st)?;
        plan.apply(&mut st);
        st.snapshots.remove(&key);
        Ok(())
    }

    /// Creates a writable volume `new_name` from a snapshot in O(1); it shares the
    /// snapshot's extents until it overwrites them.
    pub fn clone_snapshot(&self, volume: &str, snapshot: &str, new_name: &str) -> Result<Volume> {
        validate_name("name", new_name)?;
        let mut st = self.write_state();
        let Some(snap) = st
            .snapshots
            .get(&(volume.to_owned(), snapshot.to_owned()))
            .cloned()
        else {
            return Err(StorageError::UnknownSnapshot {
                volume: volume.to_owned(),
                snapshot: snapshot.to_owned(),
            });
        };
        if st.volumes.contains_key(new_name) {
            return Err(StorageError::AlreadyExists {
                kind: "volume",
                name: new_name.to_owned(),
            });
        }
        let layer = st.next_layer;
        let mut base = st.layers[&snap.layer];
        base.refs += 1;
        let rec = VolumeRecord {
            geometry: snap.geometry.clone(),
            top: layer,
            seq: 0,
        };
        let txn = self.inner.db.begin_write()?;
        {
            txn.open_table(META)?.insert("next_layer", layer + 1)?;
            let mut layers = txn.open_table(LAYERS)?;
            layers.insert(snap.layer, (base.parent, base.refs))?;
            layers.insert(layer, (snap.layer, 1))?;
            txn.open_table(VOLUMES)?
                .insert(new_name, rec.encode().as_slice())?;
        }
        self.checkpoint_commit(txn, &mut st)?;
        st.next_layer = layer + 1;
        st.layers.insert(snap.layer, base);
        st.layers.insert(
            layer,
            Layer {
                parent: snap.layer,
                refs: 1,
            },
        );
        st.volumes.insert(new_name.to_owned(), rec);
        Ok(Volume {
            store: self.clone(),
            name: new_name.to_owned(),
        })
    }

    /// Applies a write or trim shipped by the primary (see [`Volume::write_replicated`]).
    /// Idempotent: an operation whose sequence number is not newer than the volume's is
    /// acknowledged as [`ApplyOutcome::Duplicate`](crate::ApplyOutcome::Duplicate) without touching data.
    pub fn apply_replica(
        &self,
        op: &crate::replication::ReplicaOp,
    ) -> Result<crate::replication::ApplyOutcome> {
        use crate::replication::{ApplyOutcome, ReplicaPayload};
        if op.seq == 0 {
            return Err(StorageError::invalid(
                "seq",
                "replica sequence numbers start at 1",
            ));
        }
        let mut st = self.write_state();
        let rec = st
            .volumes
            .get(&op.volume)
            .ok_or_else(|| StorageError::UnknownVolume {
                name: op.volume.clone(),
            })?;
        if op.seq <= rec.seq {
            return Ok(ApplyOutcome::Duplicate {
                volume_seq: rec.seq,
            });
        }
        match &op.payload {
            ReplicaPayload::Write { data, checksums } => {
                check_io(&op.volume, rec.geometry.size, op.offset, data.len() as u64)?;
                let actual = crc_blocks(data);
                if actual.len() != checksums.len() {
                    return Err(StorageError::invalid(
                        "checksums",
                        format!("{} checksums for {} blocks", checksums.len(), actual.len()),
                    ));
                }
                if let Some(i) = actual.iter().zip(checksums).position(|(a, b)| a != b) {
                    return Err(StorageError::invalid(
                        "data",
                        format!(
                            "block at offset {} does not match its shipped crc32c (corrupted in transit)",
                            op.offset + i as u64 * BLOCK_SIZE
                        ),
                    ));
                }
                self.write_locked(
                    &mut st,
                    &op.volume,
                    op.offset,
                    data,
                    Some(&actual),
                    WriteMode::Normal,
                    Some(op.seq),
                )?;
            }
            ReplicaPayload::Trim { length } => {
                check_range(&op.volume, rec.geometry.size, op.offset, *length)?;
                self.trim_locked(&mut st, &op.volume, op.offset, *length, Some(op.seq))?;
            }
        }
        Ok(ApplyOutcome::Applied { volume_seq: op.seq })
    }

    /// Reads `buf.len()` bytes at `offset` as seen from layer `top`, verifying checksums.
    fn read_layer(
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

    /// The shared write path; see the module docs for the ordering.
    #[allow(clippy::too_many_arguments)]
    fn write_locked(
        &self,
        st: &mut State,
        volume: &str,
        offset: u64,
        data: &[u8],
        block_crcs: Option<&[u32]>,
        mode: WriteMode,
        replica_seq: Option<u64>,
    ) -> Result<u64> {
        let mut rec = st
            .volumes
            .get(volume)
            .ok_or_else(|| StorageError::UnknownVolume {
                name: volume.to_owned(),
            })?
            .clone();
        let geometry = rec.geometry.clone();
        check_io(volume, geometry.size, offset, data.len() as u64)?;
        let su = geometry.stripe_unit;
        let plan = pieces(offset, data.len() as u64, su);
        let saved: BTreeMap<u32, Allocator> = st
            .disks
            .iter()
            .map(|(&id, d)| (id, d.alloc.clone()))
            .collect();
        let restore = |st: &mut State| {
            for (id, alloc) in &saved {
                if let Some(d) = st.disks.get_mut(id) {
                    d.alloc = alloc.clone();
                }
            }
        };

        // Where every piece goes, and what must be copied from an ancestor first.
        let mut new_extents: Vec<(u64, Extent)> = Vec::new();
        let mut writes: Vec<(u32, u64, usize, usize)> = Vec::new(); // disk, phys, buf range
        // Checksums copied with copy-on-write data, and data blocks whose checksum is
        // computed from `data` (possibly while the data is being written).
        let mut crc_updates: Vec<BlockCrc> = Vec::new();
        let mut data_blocks: Vec<((u32, u64), usize)> = Vec::new();
        let mut overwrites: Vec<(u32, u64)> = Vec::new();
        // Acknowledged checksums still pending on overwritten blocks.
        let mut olds: Vec<BlockCrc> = Vec::new();
        let mut copies: Vec<(u32, u64, u32, u64, u64)> = Vec::new(); // src disk, src off, dst disk, dst off, len
        let txn = self.inner.db.begin_read()?;
        let committed_table = txn.open_table(CRCS)?;
        let pending = txn.open_table(PENDING)?;
        for piece in &plan {
            let in_top = st.extents.get(&(rec.top, piece.stripe)).copied();
            let target = match (mode, in_top) {
                (_, Some(Extent::At { disk, offset })) => Some((disk, offset)),
                (WriteMode::Repair, None) => match st.resolve(st.parent(rec.top), piece.stripe) {
                    Some(Extent::At { disk, offset }) => Some((disk, offset)),
                    _ => None,
                },
                _ => None,
            };
            let (disk, base) = match target {
                Some(t) => t,
                None => {
                    let column =
                        geometry.columns[(piece.stripe % geometry.columns.len() as u64) as usize];
                    let d = st
                        .disks
                        .get_mut(&column)
                        .ok_or_else(|| StorageError::UnknownDisk {
                            name: format!("#{column}"),
                        })?;
                    let Some(base) = d.alloc.allocate(su) else {
                        let disk = d.name.clone();
                        restore(st);
                        return Err(StorageError::NoSpace { disk, needed: su });
                    };
                    new_extents.push((
                        piece.stripe,
                        Extent::At {
                            disk: column,
                            offset: base,
                        },
                    ));
                    // Copy-on-write: blocks of the unit this write does not cover come from
                    // the ancestor, raw with their checksums (a bad block stays detectable).
                    if in_top.is_none()
                        && let Some(Extent::At {
                            disk: src_disk,
                            offset: src,
                        }) = st.resolve(st.parent(rec.top), piece.stripe)
                    {
                        let (lo, hi) = (
                            piece.within / BLOCK_SIZE,
                            (piece.within + piece.len) / BLOCK_SIZE,
                        );
                        let mut run: Option<(u64, u64)> = None;
                        // Committed checksums, overridden by pending ones of the last write.
                        let first_src = src / BLOCK_SIZE;
                        let n_src = su / BLOCK_SIZE;
                        let newest = crcs::load(&pending, src_disk, first_src, n_src)?;
                        let older = crcs::load(&committed_table, src_disk, first_src, n_src)?;
                        let src_crcs: Vec<(u64, u32)> = newest
                            .iter()
                            .zip(&older)
                            .enumerate()
                            .filter_map(|(i, (p, c))| p.or(*c).map(|crc| (i as u64, crc)))
                            .collect();
                        for (idx, crc) in src_crcs {
                            if (lo..hi).contains(&idx) {
                                continue;
                            }
                            crc_updates.push(((column, base / BLOCK_SIZE + idx), crc));
                            run = match run {
                                Some((start, len)) if start + len == idx => Some((start, len + 1)),
                                Some((start, len)) => {
                                    copies.push((
                                        src_disk,
                                        src + start * BLOCK_SIZE,
                                        column,
                                        base + start * BLOCK_SIZE,
                                        len * BLOCK_SIZE,
                                    ));
                                    Some((idx, 1))
                                }
                                None => Some((idx, 1)),
                            };
                        }
                        if let Some((start, len)) = run {
                            copies.push((
                                src_disk,
                                src + start * BLOCK_SIZE,
                                column,
                                base + start * BLOCK_SIZE,
                                len * BLOCK_SIZE,
                            ));
                        }
                    }
                    (column, base)
                }
            };
            let phys = base + piece.within;
            writes.push((
                disk,
                phys,
                piece.buf_off,
                piece.buf_off + piece.len as usize,
            ));
            let first_crc = piece.buf_off / BLOCK_SIZE as usize;
            // Blocks that hold acknowledged data, committed or still pending from the
            // previous write: overwriting them needs the checksum intent first.
            let n_blocks = piece.len / BLOCK_SIZE;
            let (newest, older) = if target.is_some() {
                (
                    crcs::load(&pending, disk, phys / BLOCK_SIZE, n_blocks)?,
                    crcs::load(&committed_table, disk, phys / BLOCK_SIZE, n_blocks)?,
                )
            } else {
                (vec![None; n_blocks as usize], vec![None; n_blocks as usize])
            };
            for i in 0..piece.len / BLOCK_SIZE {
                let key = (disk, phys / BLOCK_SIZE + i);
                if newest[i as usize].is_some() || older[i as usize].is_some() {
                    overwrites.push(key);
                }
                if let Some(old) = newest[i as usize] {
                    olds.push((key, old));
                }
                data_blocks.push((key, first_crc + i as usize));
            }
        }
        drop((committed_table, pending, txn));

        let old_rec = rec.clone();
        rec.seq = replica_seq.unwrap_or(rec.seq + 1);
        let touched: BTreeSet<u32> = new_extents
            .iter()
            .filter_map(|(_, e)| match e {
                Extent::At { disk, .. } => Some(*disk),
                Extent::Zero => None,
            })
            .collect();
        let rows: BTreeMap<u32, Allocator> = touched
            .iter()
            .map(|id| (*id, st.disks[id].alloc.clone()))
            .collect();
        let data_crcs = match block_crcs {
            Some(c) => c.to_vec(),
            None => crc_blocks(data),
        };
        let mut updates = crc_updates.clone();
        updates.extend(data_blocks.iter().map(|&(key, i)| (key, data_crcs[i])));
        let promote_all = st.pending_blocks > PROMOTE_THRESHOLD;
        // Small overwrites journal their data: one flush instead of intent + data.
        let inline = !overwrites.is_empty() && copies.is_empty() && data.len() as u64 <= INLINE_MAX;
        let record = WriteRecord {
            volume: volume.to_owned(),
            volume_record: rec.encode(),
            layer: rec.top,
            seq_before: old_rec.seq,
            extents: new_extents
                .iter()
                .filter_map(|&(stripe, e)| match e {
                    Extent::At { disk, offset } => Some((stripe, disk, offset)),
                    Extent::Zero => None,
                })
                .collect(),
            extent_size: su,
            promote_all,
            olds,
            inline: if inline {
                writes
                    .iter()
                    .map(|&(disk, phys, from, to)| (disk, phys, data[from..to].to_vec()))
                    .collect()
            } else {
                Vec::new()
            },
            updates,
        };

        // The record goes to the journal ring of the first disk the data touches, so that
        // disk's fdatasync covers both. A checkpoint first if the ring would wrap.
        let journal_disk = writes[0].0;
        let frame = record.frame(st.journal_seq + 1);
        let head = st.journal_heads.get(&journal_disk).copied().unwrap_or(0);
        let (head, frame) = if head + frame.len() as u64 > JOURNAL_BYTES
            || st.journal_seq - st.checkpoint >= CHECKPOINT_RECORDS
        {
            if let Err(e) = self.checkpoint_commit(self.inner.db.begin_write()?, st) {
                restore(st);
                return Err(e);
            }
            (0, frame)
        } else {
            (head, frame)
        };
        // Sequence numbers are never reused, even if this write fails.
        st.journal_seq += 1;
        st.journal_heads
            .insert(journal_disk, head + frame.len() as u64);
        let journal_offset = st.disks[&journal_disk].alloc.capacity + head;

        // redb gets the write at once but without durability: the journal is what makes
        // it durable.
        let commit = |st: &State| -> Result<()> {
            let mut txn = self.inner.db.begin_write()?;
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StorageError::Metadata(Box::new(redb::Error::from(e))))?;
            apply_record(&txn, &record)?;
            write_disk_rows(&txn, st, &rows)?;
            txn.commit()?;
            Ok(())
        };
        let copy_bufs = match self.read_copies(st, volume, &copies) {
            Ok(bufs) => bufs,
            Err(e) => {
                restore(st);
                return Err(e);
            }
        };
        let (data_result, commit_result) = if overwrites.is_empty() {
            // Only fresh blocks: data, journal record and the redb update at once. A crash
            // before the fdatasync returns may leave the record without the data; recovery
            // then drops the pending checksums whose data does not match, and the blocks
            // read as never written.
            let journal = (
                &st.disks[&journal_disk].file,
                journal_offset,
                frame.as_slice(),
            );
            self.write_data(
                st,
                volume,
                &copies,
                &copy_bufs,
                &writes,
                data,
                Some(journal),
                || commit(st),
            )
        } else {
            // Overwrites of acknowledged blocks: the record (the new checksums) must be
            // durable before the data changes, so that after a crash old and new data both
            // verify. Data written in place by earlier inline overwrites is made durable
            // in the same round, before this write's data can replace it.
            let journal_file = &st.disks[&journal_disk].file;
            let mut sync: Vec<&File> = vec![journal_file];
            for d in &st.dirty_disks {
                if *d != journal_disk {
                    sync.push(&st.disks[d].file);
                }
            }
            let intent = self
                .inner
                .engine
                .write_all_at(journal_file, journal_offset, &frame)
                .and_then(|()| self.inner.engine.sync_data(&sync))
                .map_err(io_err(format!("writing the journal of volume `{volume}`")));
            if let Err(e) = intent {
                restore(st);
                return Err(e);
            }
            st.dirty_disks.clear();
            if inline {
                // The record holds the data: write it in place without waiting for it;
                // a checkpoint syncs it, replay rewrites it after a crash.
                let commit_result = commit(st);
                let mut ops: Vec<IoOp<'_>> = record
                    .inline
                    .iter()
                    .map(|(disk, offset, bytes)| IoOp::Write {
                        file: &st.disks[disk].file,
                        offset: *offset,
                        buf: bytes,
                    })
                    .collect();
                let data_result = self
                    .inner
                    .engine
                    .run(&mut ops)
                    .map_err(io_err(format!("writing volume `{volume}`")));
                drop(ops);
                st.dirty_disks
                    .extend(record.inline.iter().map(|(d, _, _)| *d));
                (data_result, commit_result)
            } else {
                self.write_data(st, volume, &copies, &copy_bufs, &writes, data, None, || {
                    commit(st)
                })
            }
        };
        match (data_result, commit_result) {
            (Ok(()), Ok(())) => {}
            (Err(err), Ok(())) => {
                // The metadata landed but the data did not: take the metadata back, durably.
                let undo = |st: &mut State| -> Result<()> {
                    let txn = self.inner.db.begin_write()?;
                    {
                        let mut extents = txn.open_table(EXTENTS)?;
                        for (stripe, _) in &new_extents {
                            extents.remove((rec.top, *stripe))?;
                        }
                        let keys: Vec<(u32, u64)> =
                            record.updates.iter().map(|(k, _)| *k).collect();
                        crcs::remove(&mut txn.open_table(PENDING)?, &keys)?;
                        txn.open_table(VOLUMES)?
                            .insert(volume, old_rec.encode().as_slice())?;
                        txn.open_table(INFLIGHT)?.remove(volume)?;
                    }
                    let rows: BTreeMap<u32, Allocator> = touched
                        .iter()
                        .filter_map(|id| saved.get(id).map(|a| (*id, a.clone())))
                        .collect();
                    write_disk_rows(&txn, st, &rows)?;
                    self.checkpoint_commit(txn, st)
                };
                restore(st);
                undo(st)?;
                return Err(err);
            }
            (_, Err(e)) => {
                // The allocator keeps the extents (not restored): the journal record may be
                // durable and replayed, so its space must not be handed out again.
                return Err(e);
            }
        }
        st.pending_blocks = if promote_all {
            record.updates.len()
        } else {
            st.pending_blocks + record.updates.len()
        };
        for (stripe, extent) in new_extents {
            st.extents.insert((rec.top, stripe), extent);
        }
        let seq = rec.seq;
        st.volumes.insert(volume.to_owned(), rec);
        Ok(seq)
    }

    /// Reads the blocks a copy-on-write must carry over from ancestor extents.
    fn read_copies(
        &self,
        st: &State,
        volume: &str,
        copies: &[(u32, u64, u32, u64, u64)],
    ) -> Result<Vec<Vec<u8>>> {
        let mut bufs: Vec<Vec<u8>> = copies.iter().map(|c| vec![0u8; c.4 as usize]).collect();
        let mut ops: Vec<IoOp<'_>> = copies
            .iter()
            .zip(bufs.iter_mut())
            .map(|(c, buf)| IoOp::Read {
                file: &st.disks[&c.0].file,
                offset: c.1,
                buf,
            })
            .collect();
        self.inner
            .engine
            .run(&mut ops)
            .map_err(io_err(format!("copying on write for volume `{volume}`")))?;
        Ok(bufs)
    }

    /// Writes the copied blocks, the data and the journal record (if any), and makes them
    /// durable with one fdatasync per disk, running `during` meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn write_data<R>(
        &self,
        st: &State,
        volume: &str,
        copies: &[(u32, u64, u32, u64, u64)],
        copy_bufs: &[Vec<u8>],
        writes: &[(u32, u64, usize, usize)],
        data: &[u8],
        journal: Option<(&File, u64, &[u8])>,
        during: impl FnOnce() -> R,
    ) -> (Result<()>, R) {
        let mut list: Vec<(&File, u64, &[u8])> =
            Vec::with_capacity(writes.len() + copies.len() + 1);
        for (c, buf) in copies.iter().zip(copy_bufs) {
            list.push((&st.disks[&c.2].file, c.3, buf));
        }
        for &(disk, phys, from, to) in writes {
            list.push((&st.disks[&disk].file, phys, &data[from..to]));
        }
        // The journal record rides along; its disk is one of the data disks, so the same
        // fdatasync covers it.
        if let Some(record) = journal {
            list.push(record);
        }
        let (result, r) = self.inner.engine.write_sync_while(&list, during);
        let result = result.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                let disk = writes
                    .first()
                    .map_or_else(String::new, |w| st.disk_name(w.0));
                StorageError::NoSpace {
                    disk,
                    needed: data.len() as u64,
                }
            } else {
                StorageError::io(format!("writing volume `{volume}`"), e)
            }
        });
        (result, r)
    }

    /// Trims a block-aligned range of a volume; see [`Volume::trim`].
    fn trim_locked(
        &self,
        st: &mut State,
        volume: &str,
        offset: u64,
        len: u64,
        replica_seq: Option<u64>,
    ) -> Result<u64> {
        let mut rec = st
            .volumes
            .get(volume)
            .ok_or_else(|| StorageError::UnknownVolume {
                name: volume.to_owned(),
            })?
            .clone();
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

fn volume_info(st: &State, name: &str, rec: &VolumeRecord) -> VolumeInfo {
    let owned = st
        .extents
        .range((rec.top, 0)..=(rec.top, u64::MAX))
        .filter(|(_, e)| matches!(e, Extent::At { .. }))
        .count() as u64;
    VolumeInfo {
        name: name.to_owned(),
        size: rec.geometry.size,
        stripe_unit: rec.geometry.stripe_unit,
        columns: rec
            .geometry
            .columns
            .iter()
            .map(|&c| st.disk_name(c))
            .collect(),
        seq: rec.seq,
        allocated: owned * rec.geometry.stripe_unit,
    }
}

/// The parts of [`State`] a layer release changes, built aside so a failed commit changes
/// nothing in memory.
#[derive(Debug)]
struct ReleasePlan {
    layers: BTreeMap<u64, Layer>,
    removed_extents: Vec<(u64, u64)>,
    /// Allocators of the disks that got space back.
    disks: BTreeMap<u32, Allocator>,
}

impl ReleasePlan {
    fn new(st: &State) -> Self {
        ReleasePlan {
            layers: st.layers.clone(),
            removed_extents: Vec::new(),
            disks: BTreeMap::new(),
        }
    }

    fn apply(self, st: &mut State) {
        st.layers = self.layers;
        for key in self.removed_extents {
            st.extents.remove(&key);
        }
        for (id, alloc) in self.disks {
            if let Some(d) = st.disks.get_mut(&id) {
                d.alloc = alloc;
            }
        }
    }
}

/// Drops one reference on `layer`; a layer nobody references any more is freed with its
/// extents and checksums, and its parent loses a reference in turn.
fn release_layer(
    plan: &mut ReleasePlan,
    st: &State,
    txn: &redb::WriteTransaction,
    mut layer: u64,
) -> Result<()> {
    let su = extent_size(st, layer);
    let mut layers_table = txn.open_table(LAYERS)?;
    let mut extents_table = txn.open_table(EXTENTS)?;
    let mut committed = txn.open_table(CRCS)?;
    let mut pending = txn.open_table(PENDING)?;
    while layer != 0 {
        let Some(entry) = plan.layers.get_mut(&layer) else {
            break;
        };
        entry.refs -= 1;
        if entry.refs > 0 {
            layers_table.insert(layer, (entry.parent, entry.refs))?;
            break;
        }
        let parent = entry.parent;
        plan.layers.remove(&layer);
        layers_table.remove(layer)?;
        for (&(l, stripe), extent) in st.extents.range((layer, 0)..=(layer, u64::MAX)) {
            plan.removed_extents.push((l, stripe));
            extents_table.remove((l, stripe))?;
            if let Extent::At { disk, offset } = *extent {
                let blocks = (disk, offset / BLOCK_SIZE)..(disk, (offset + su) / BLOCK_SIZE);
                crcs::clear(&mut committed, disk, blocks.start.1, blocks.end.1)?;
                crcs::clear(&mut pending, disk, blocks.start.1, blocks.end.1)?;
                plan.disks
                    .entry(disk)
                    .or_insert_with(|| st.disks[&disk].alloc.clone())
                    .release(offset, su);
            }
        }
        layer = parent;
    }
    Ok(())
}

/// The stripe unit of the chain `layer` belongs to (every layer of a chain shares it).
fn extent_size(st: &State, layer: u64) -> u64 {
    let reaches = |mut l: u64| {
        while l != 0 {
            if l == layer {
                return true;
            }
            l = st.parent(l);
        }
        false
    };
    st.volumes
        .values()
        .map(|v| (v.top, v.geometry.stripe_unit))
        .chain(
            st.snapshots
                .values()
                .map(|s| (s.layer, s.geometry.stripe_unit)),
        )
        .find(|&(top, _)| reaches(top))
        .map_or(BLOCK_SIZE, |(_, su)| su)
}

/// Applies a write's metadata to redb: promotion of acknowledged checksums, the new
/// pending checksums, new extents, the volume record and the in-flight marker. Idempotent.
fn apply_record(txn: &redb::WriteTransaction, record: &WriteRecord) -> Result<()> {
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

fn write_disk_rows(
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

/// A writable volume. Cheap to clone; operations fail with
/// [`StorageError::UnknownVolume`] once the volume is deleted.
#[derive(Debug, Clone)]
pub struct Volume {
    store: Store,
    name: String,
}

impl Volume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn record(&self, st: &State) -> Result<VolumeRecord> {
        st.volumes
            .get(&self.name)
            .cloned()
            .ok_or_else(|| StorageError::UnknownVolume {
                name: self.name.clone(),
            })
    }

    /// Grows the volume in place (see [`Store::grow_volume`]).
    pub fn grow(&self, new_size: u64) -> Result<VolumeInfo> {
        self.store.grow_volume(&self.name, new_size)
    }

    /// Size, geometry, sequence number and allocation.
    pub fn info(&self) -> Result<VolumeInfo> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        Ok(volume_info(&st, &self.name, &rec))
    }

    /// Reads `buf.len()` bytes at `offset`; both multiples of [`BLOCK_SIZE`]. Unwritten
    /// space reads as zeros; a block failing its checksum gives
    /// [`StorageError::ChecksumMismatch`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        self.store
            .read_layer(&st, &self.name, rec.top, &rec.geometry, offset, buf)
    }

    /// Writes `data` at `offset` (both multiples of [`BLOCK_SIZE`]); durable on return.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<WriteReceipt> {
        let mut st = self.store.write_state();
        let seq = self.store.write_locked(
            &mut st,
            &self.name,
            offset,
            data,
            None,
            WriteMode::Normal,
            None,
        )?;
        Ok(WriteReceipt { seq })
    }

    /// Writes `data` locally like [`Volume::write_at`] and returns the operation to ship to
    /// the replicas, which apply it with [`Store::apply_replica`].
    pub fn write_replicated(
        &self,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<crate::replication::ReplicaOp> {
        let checksums = crc_blocks(&data);
        let mut st = self.store.write_state();
        let seq = self.store.write_locked(
            &mut st,
            &self.name,
            offset,
            &data,
            Some(&checksums),
            WriteMode::Normal,
            None,
        )?;
        Ok(crate::replication::ReplicaOp {
            volume: self.name.clone(),
            seq,
            offset,
            payload: crate::replication::ReplicaPayload::Write { data, checksums },
        })
    }

    /// Makes a range read as zeros. Whole stripe units are trimmed (no space is used, and
    /// a trimmed whole unit always reads as zeros); partial units get zeros written.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<WriteReceipt> {
        let info = self.info()?;
        check_range(&self.name, info.size, offset, length)?;
        let su = info.stripe_unit;
        let end = offset + length;
        let whole_start = offset.div_ceil(su) * su;
        let whole_end = end / su * su;
        let mut receipt = WriteReceipt { seq: info.seq };
        let mut zero_fill = |from: u64, to: u64| -> Result<()> {
            let mut pos = from;
            while pos < to {
                let len = (to - pos).min(MAX_IO);
                receipt = self.write_at(pos, &vec![0u8; len as usize])?;
                pos += len;
            }
            Ok(())
        };
        if whole_start >= whole_end {
            zero_fill(offset, end)?;
            return Ok(receipt);
        }
        zero_fill(offset, whole_start)?;
        zero_fill(whole_end, end)?;
        self.trim(whole_start, whole_end - whole_start)
    }

    /// Discards a range: whole stripe units owned by the volume are freed and read as
    /// zeros, blocks inside owned units read as zeros; ranges still shared with a
    /// snapshot inside a partially covered unit are left as they are (trim is advisory).
    pub fn trim(&self, offset: u64, length: u64) -> Result<WriteReceipt> {
        let mut st = self.store.write_state();
        let seq = self
            .store
            .trim_locked(&mut st, &self.name, offset, length, None)?;
        Ok(WriteReceipt { seq })
    }

    /// Trims like [`Volume::trim`] and returns the operation to ship to the replicas.
    pub fn trim_replicated(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<crate::replication::ReplicaOp> {
        let seq = self.trim(offset, length)?.seq;
        Ok(crate::replication::ReplicaOp {
            volume: self.name.clone(),
            seq,
            offset,
            payload: crate::replication::ReplicaPayload::Trim { length },
        })
    }

    /// Every acknowledged write is already durable; this syncs the volume's disks again
    /// for callers (NBD FLUSH) that want an explicit barrier.
    pub fn flush(&self) -> Result<()> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        let files: Vec<&File> = rec
            .geometry
            .columns
            .iter()
            .filter_map(|c| st.disks.get(c))
            .map(|d| &d.file)
            .collect();
        self.store
            .inner
            .engine
            .sync_data(&files)
            .map_err(io_err(format!("flushing volume `{}`", self.name)))
    }

    /// Reads a range for a peer that is repairing it: the data plus per-block crc32c, so
    /// the receiver can check it end to end. Fails like [`Volume::read_at`] if this copy
    /// is bad too.
    pub fn read_for_repair(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<crate::replication::RepairData> {
        check_io(&self.name, self.info()?.size, offset, length)?;
        let mut data = vec![0u8; length as usize];
        self.read_at(offset, &mut data)?;
        let checksums = crc_blocks(&data);
        Ok(crate::replication::RepairData {
            offset,
            data,
            checksums,
        })
    }

    /// Overwrites blocks with good data from a replica, in place wherever they live (also
    /// in extents shared with snapshots, whose content is by construction the same).
    /// Bypasses checksum verification of the old data; does not change the sequence number.
    pub fn repair(&self, repair: &crate::replication::RepairData) -> Result<()> {
        let actual = crc_blocks(&repair.data);
        if actual != repair.checksums {
            return Err(StorageError::invalid(
                "checksums",
                "repair data does not match its crc32c (corrupted in transit)",
            ));
        }
        let mut st = self.store.write_state();
        let rec = self.record(&st)?;
        let seq = rec.seq;
        self.store.write_locked(
            &mut st,
            &self.name,
            repair.offset,
            &repair.data,
            Some(&actual),
            WriteMode::Repair,
            Some(seq),
        )?;
        Ok(())
    }

    /// Reads the whole volume and lists every block that fails its checksum.
    pub fn scrub(&self) -> Result<Vec<BadBlock>> {
        let info = self.info()?;
        let mut bad = Vec::new();
        let chunk = info.stripe_unit.clamp(1 << 20, MAX_IO);
        let mut offset = 0;
        while offset < info.size {
            let len = chunk.min(info.size - offset);
            let mut buf = vec![0u8; len as usize];
            match self.read_at(offset, &mut buf) {
                Ok(()) => offset += len,
                Err(StorageError::ChecksumMismatch { .. }) if len > BLOCK_SIZE => {
                    // Narrow down block by block.
                    let mut block = vec![0u8; BLOCK_SIZE as usize];
                    for b in (offset..offset + len).step_by(BLOCK_SIZE as usize) {
                        if let Err(StorageError::ChecksumMismatch {
                            disk,
                            physical_offset,
                            ..
                        }) = self.read_at(b, &mut block)
                        {
                            bad.push(BadBlock {
                                offset: b,
                                disk,
                                physical_offset,
                            });
                        }
                    }
                    offset += len;
                }
                Err(StorageError::ChecksumMismatch {
                    disk,
                    physical_offset,
                    ..
                }) => {
                    bad.push(BadBlock {
                        offset,
                        disk,
                        physical_offset,
                    });
                    offset += len;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(bad)
    }

    /// Where the block at `offset` is stored, or `None` if it is unallocated.
    pub fn locate(&self, offset: u64) -> Result<Option<Location>> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        check_range(
            &self.name,
            rec.geometry.size,
            offset - offset % BLOCK_SIZE,
            BLOCK_SIZE,
        )?;
        let su = rec.geometry.stripe_unit;
        Ok(match st.resolve(rec.top, offset / su) {
            Some(Extent::At { disk, offset: base }) => {
                let d = &st.disks[&disk];
                Some(Location {
                    disk: d.name.clone(),
                    path: d.path.clone(),
                    physical_offset: base + offset % su,
                })
            }
            _ => None,
        })
    }
}

/// A read-only snapshot of a volume.
#[derive(Debug, Clone)]
pub struct Snapshot {
    store: Store,
    volume: String,
    name: String,
}

impl Snapshot {
    /// `volume@snapshot`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.volume, self.name)
    }

    fn record(&self, st: &State) -> Result<SnapshotRecord> {
        st.snapshots
            .get(&(self.volume.clone(), self.name.clone()))
            .cloned()
            .ok_or_else(|| StorageError::UnknownSnapshot {
                volume: self.volume.clone(),
                snapshot: self.name.clone(),
            })
    }

    /// Size in bytes.
    pub fn size(&self) -> Result<u64> {
        Ok(self.record(&self.store.read_state())?.geometry.size)
    }

    /// Reads like [`Volume::read_at`], as the volume was when the snapshot was taken.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        self.store
            .read_layer(&st, &self.label(), rec.layer, &rec.geometry, offset, buf)
    }
}
