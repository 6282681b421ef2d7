//! The node-local block store of `cairn-node` (striped volumes on the node's disks), and an
//! NBD server for it.
//!
//! What it does:
//! - A [`Store`] is a data directory holding `meta.redb` (all metadata, in redb) and the
//!   node's disks: files under `disks/` of fixed capacity, or existing files and block
//!   devices ([`DiskSource`]).
//! - A [`Volume`] is thin-provisioned and cut into stripe units (a power of two, 4 KiB to
//!   64 MiB) striped round-robin over `stripe_width` columns, each on its own disk. A
//!   stripe unit gets an extent on its column's disk on first write.
//! - All data I/O goes through a [`FileEngine`] (the one thing this crate calls an
//!   *engine*): io_uring, or `pread`/`pwrite` where io_uring is unavailable. A write is
//!   durable when it returns: its data and a small journal record (in a ring at the end of
//!   one of its disks) are fdatasync'ed together; redb, which holds all metadata, is
//!   checkpointed from the journal.
//! - Every 4 KiB block has a crc32c in the metadata, checked on every read; a bad block is
//!   a distinct [`StorageError::ChecksumMismatch`], repairable with [`Volume::repair`] from
//!   a peer's [`Volume::read_for_repair`].
//! - Snapshots and clones are copy-on-write layers created in O(1) ([`Store::create_snapshot`],
//!   [`Store::clone_snapshot`]).
//! - The replication hook ([`Volume::write_replicated`], [`Store::apply_replica`]) produces
//!   and applies sequence-numbered operations; shipping them is the agent's job.
//! - [`nbd::NbdServer`] serves any [`BlockDevice`] over NBD: on an owner-only unix socket
//!   (the default for the agent) or on loopback TCP, with structured replies and the
//!   `base:allocation` context, so clients skip a thin volume's holes.
//!
//! What it does not do: talk to other nodes, authenticate anyone, place volumes (placement,
//! in the compiler, chooses disks and passes them in [`VolumeSpec::disks`]), or cache data
//! (the page cache does).
//!
//! Invariants:
//! - An acknowledged write is durable and its checksums verify after a crash (`kill -9` or
//!   power loss): the write's journal record and its data are made durable by the same
//!   per-disk fdatasync, and recovery keeps a new checksum only where the data matches it.
//! - Committed metadata never points at space the allocator considers free, and a failed
//!   write (including [`StorageError::NoSpace`]) leaves committed metadata unchanged.
//! - Extents are owned by exactly one layer; sharing between snapshots, clones and volumes
//!   happens only through the layer chain, never by sharing extents.
//! - Bad input returns a typed error naming the field; no input panics.

#![warn(missing_docs)]

mod allocator;
mod crcs;
mod device;
mod engine;
mod error;
mod journal;
mod meta;
pub mod nbd;
pub mod power_loss;
mod replication;
mod store;

pub use device::{AllocationRun, BlockDevice};
pub use engine::{EngineKind, FileEngine, IoOp};
pub use error::{Result, StorageError};
pub use replication::{ApplyOutcome, RepairData, ReplicaOp, ReplicaPayload};
pub use store::{
    BLOCK_SIZE, BadBlock, ChangedUnits, DiskInfo, DiskSource, Location, MAX_IO, MAX_STRIPE_UNIT,
    MAX_STRIPE_WIDTH, MIN_STRIPE_UNIT, RecoveryReport, Snapshot, SnapshotInfo, Store, StoreOptions,
    Volume, VolumeInfo, VolumeSpec, WriteReceipt,
};
