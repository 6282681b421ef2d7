//! The store: one data directory holding `meta.redb` and the node's disks, and the
//! volumes, snapshots and clones striped over them.
//!
//! Map of this module, one file per part of the store's life:
//!
//! - `mod.rs` — the public vocabulary ([`StoreOptions`], [`DiskSource`], [`VolumeSpec`],
//!   the `*Info` reports, [`RecoveryReport`], limits such as [`BLOCK_SIZE`]), the
//!   [`Store`] handle and the request checks shared by every path.
//! - `open.rs` — opening a data directory ([`Store::open`]) and registering disks.
//! - `state.rs` — the in-memory mirror of everything in redb but checksums
//!   (`State`), loaded once at open.
//! - `checkpoint.rs` — making redb durable: checkpoints, the clean-shutdown
//!   checkpoint, applying a write's journal record to redb.
//! - `recovery.rs` — what open does after a crash: journal replay and the
//!   verification of pending checksums.
//! - `volume.rs` — volumes: create, grow, delete, and the [`Volume`] handle.
//! - `layers.rs` — snapshots and clones (copy-on-write layers), releasing layers, and
//!   the [`Snapshot`] handle.
//! - `read.rs` — the read path: resolving the layer chain, checksum verification.
//! - `write.rs` — the write path (plan, journal record, one fdatasync per disk),
//!   replica operations and repair.
//! - `trim.rs` — trimming ranges (freeing whole stripe units).
//!
//! Dependencies point one way: this module uses `meta` (the on-disk schema),
//! `allocator`, `journal`, `crcs` and `engine`; none of those uses the store.

mod checkpoint;
mod layers;
mod open;
mod read;
mod recovery;
mod state;
mod trim;
mod volume;
mod write;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::Database;

use crate::engine::{EngineKind, FileEngine};
use crate::error::{Result, StorageError};

pub use layers::{ChangedUnits, Snapshot};
use state::State;
pub use volume::Volume;

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
    /// Bytes of disk allocated to extents owned by the snapshot's (frozen) layer: data
    /// the volume overwrote since, or never overwrote, that only the snapshot's layer
    /// holds (the volume and clones above it still read what they did not overwrite).
    pub allocated: u64,
    /// Bytes of disk only this snapshot still sees: data the next layer up (the next
    /// snapshot, or the volume) overwrote since. Deleting the snapshot frees exactly
    /// these (0 while clones of it exist: they see it all).
    pub unique: u64,
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

impl Store {
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
