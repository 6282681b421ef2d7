//! The error type of the storage API.
//!
//! Every variant names the object and, for bad input, the request field that was wrong, so
//! the node agent can turn it into a gRPC status without string parsing.

use std::io;
use std::path::PathBuf;

/// Errors returned by [`crate::Store`], [`crate::Volume`] and [`crate::Snapshot`].
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A request field is malformed (empty name, zero length, bad stripe geometry, ...).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field that is wrong, e.g. `stripe_unit`.
        field: &'static str,
        /// What is wrong with it and what would be right.
        reason: String,
    },
    /// A field that must be a multiple of the block size is not.
    #[error("misaligned {field}: {value} is not a multiple of {alignment} bytes")]
    Misaligned {
        /// The request field, `offset` or `length`.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The required alignment in bytes.
        alignment: u64,
    },
    /// A range does not fit inside the volume.
    #[error(
        "{field} out of range: offset {offset} + length {length} exceeds volume `{volume}` of {size} bytes"
    )]
    OutOfRange {
        /// The request field that is out of range, usually `offset`.
        field: &'static str,
        /// The volume or snapshot addressed.
        volume: String,
        /// Start of the requested range.
        offset: u64,
        /// Length of the requested range.
        length: u64,
        /// Size of the volume.
        size: u64,
    },
    /// No volume of that name exists on this node.
    #[error("unknown volume `{name}`")]
    UnknownVolume {
        /// The name asked for.
        name: String,
    },
    /// No snapshot of that name exists on the volume.
    #[error("unknown snapshot `{snapshot}` of volume `{volume}`")]
    UnknownSnapshot {
        /// The volume the snapshot was looked up on.
        volume: String,
        /// The snapshot name asked for.
        snapshot: String,
    },
    /// No disk of that name is registered in the store.
    #[error("unknown disk `{name}`")]
    UnknownDisk {
        /// The name asked for.
        name: String,
    },
    /// An object of that kind and name already exists.
    #[error("{kind} `{name}` already exists")]
    AlreadyExists {
        /// `volume`, `snapshot` or `disk`.
        kind: &'static str,
        /// The clashing name.
        name: String,
    },
    /// The object cannot be removed while others depend on it.
    #[error("volume `{volume}` still has {count} snapshot(s); delete them first")]
    HasSnapshots {
        /// The volume that was to be deleted.
        volume: String,
        /// How many snapshots it has.
        count: usize,
    },
    /// A disk has no free extent left for a new allocation. Nothing was written or changed.
    #[error("no space left on disk `{disk}`: needed {needed} bytes for a new extent")]
    NoSpace {
        /// The disk that is full.
        disk: String,
        /// The extent size that could not be allocated.
        needed: u64,
    },
    /// A block's data does not match its stored crc32c. Repair it from a replica with
    /// [`crate::Volume::repair`].
    #[error(
        "checksum mismatch in volume `{volume}` at offset {offset} (disk `{disk}` byte {physical_offset}): stored crc32c {expected:#010x}, data has {actual:#010x}"
    )]
    ChecksumMismatch {
        /// The volume or snapshot read.
        volume: String,
        /// Logical byte offset of the bad block inside the volume.
        offset: u64,
        /// The disk holding the block.
        disk: String,
        /// Byte offset of the block on that disk.
        physical_offset: u64,
        /// The checksum recorded when the block was written.
        expected: u32,
        /// The checksum of the data read now.
        actual: u32,
    },
    /// The target is a snapshot, which is read-only.
    #[error("`{name}` is a read-only snapshot")]
    ReadOnly {
        /// The snapshot addressed.
        name: String,
    },
    /// An I/O error on a disk or the data directory.
    #[error("i/o error {context}")]
    Io {
        /// What was being done, e.g. "writing disk `d0`".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The metadata database failed.
    #[error("metadata database error")]
    Metadata(#[source] Box<redb::Error>),
    /// The store was written by a newer version of this crate, in a format this build does
    /// not read (a node's data directory is never downgraded).
    #[error(
        "{path} holds {what} in format {found}, written by a newer cairn-node; this build reads format {supported}: run the newer cairn-node on this data directory"
    )]
    NewerFormat {
        /// "metadata" or "journal".
        what: &'static str,
        /// The file holding it.
        path: PathBuf,
        /// The format found.
        found: u64,
        /// The newest format this build reads.
        supported: u64,
    },
    /// The metadata in the store is not what this version understands.
    #[error("corrupt or incompatible metadata in {path}: {reason}")]
    CorruptMetadata {
        /// The metadata file.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
}

impl StorageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        StorageError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Metadata(Box::new(redb::Error::from(e)))
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<redb::Error> for StorageError {
    fn from(e: redb::Error) -> Self {
        StorageError::Metadata(Box::new(e))
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
