//! Types of the replication hook. Shipping them between nodes is the agent's job (gRPC);
//! this crate only produces and applies them.
//!
//! Protocol the agent follows: the primary calls [`crate::Volume::write_replicated`] (or
//! [`crate::Volume::trim_replicated`]), sends the returned [`ReplicaOp`] to every replica,
//! which call [`crate::Store::apply_replica`], and acknowledges the client once all
//! replicas answered. Sequence numbers make retries idempotent. For repair, the node that
//! saw [`crate::StorageError::ChecksumMismatch`] asks a peer for
//! [`crate::Volume::read_for_repair`] of the range and applies it with
//! [`crate::Volume::repair`].

/// One mutation of a volume, as shipped from the primary to a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOp {
    /// Volume name (the same on every node).
    pub volume: String,
    /// The primary's sequence number for this operation, starting at 1.
    pub seq: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// What to do there.
    pub payload: ReplicaPayload,
}

/// The mutation carried by a [`ReplicaOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaPayload {
    /// Write `data`; `checksums` holds the crc32c of every 4 KiB block, checked on apply.
    Write {
        /// The bytes written.
        data: Vec<u8>,
        /// crc32c per block of `data`.
        checksums: Vec<u32>,
    },
    /// Trim `length` bytes.
    Trim {
        /// Length in bytes.
        length: u64,
    },
}

/// What [`crate::Store::apply_replica`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The operation was applied and is durable; the volume is now at `volume_seq`.
    Applied {
        /// The volume's sequence number after applying.
        volume_seq: u64,
    },
    /// The volume already had this or a newer operation; nothing was changed.
    Duplicate {
        /// The volume's current sequence number.
        volume_seq: u64,
    },
}

/// A verified range read from a healthy copy, for [`crate::Volume::repair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairData {
    /// Byte offset in the volume.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
    /// crc32c of every 4 KiB block of `data`.
    pub checksums: Vec<u32>,
}
