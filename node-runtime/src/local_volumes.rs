//! This node's copies of volumes: the one adapter between the agent and the node-local
//! volume store (`storage::Store`, in `DATA_DIR/volumes`).
//!
//! Every method may block on disk I/O: call it from `spawn_blocking`. Errors are
//! mapped once, here, to gRPC statuses with the store's message kept.

use std::path::Path;

use storage::{
    DiskSource, ReplicaOp, ReplicaPayload, StorageError, Store, StoreOptions, VolumeSpec,
};

/// Shape of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes (multiple of 4096).
    pub size_bytes: u64,
    /// Columns.
    pub stripe_width: u32,
    /// Stripe unit in bytes (power of two).
    pub stripe_unit_bytes: u64,
}

/// Maps a volume store error to a gRPC status.
pub fn status(error: StorageError) -> tonic::Status {
    let message = format!("volume store: {error}");
    match error {
        StorageError::InvalidArgument { .. }
        | StorageError::Misaligned { .. }
        | StorageError::OutOfRange { .. } => tonic::Status::invalid_argument(message),
        StorageError::UnknownVolume { .. }
        | StorageError::UnknownSnapshot { .. }
        | StorageError::UnknownDisk { .. } => tonic::Status::not_found(message),
        StorageError::AlreadyExists { .. } => tonic::Status::already_exists(message),
        StorageError::HasSnapshots { .. } | StorageError::ReadOnly { .. } => {
            tonic::Status::failed_precondition(message)
        }
        StorageError::NoSpace { .. } => tonic::Status::resource_exhausted(message),
        StorageError::ChecksumMismatch { .. } => tonic::Status::data_loss(message),
        _ => tonic::Status::internal(message),
    }
}

/// How many disks the node creates in its data directory on first start, and their size.
#[derive(Debug, Clone, Copy)]
pub struct DiskLayout {
    /// Number of file disks (`disks/disk-N.img`).
    pub count: u32,
    /// Capacity of each, bytes (sparse files).
    pub capacity_bytes: u64,
}

/// This node's copies of volumes, in its volume store.
#[derive(Debug, Clone)]
pub struct LocalVolumes {
    store: Store,
}

impl LocalVolumes {
    /// Opens the volume store in `dir`, adding file disks up to `layout.count` on first
    /// start.
    pub fn open(dir: &Path, layout: DiskLayout) -> Result<Self, StorageError> {
        let store = Store::open(dir, StoreOptions::default())?;
        let existing: Vec<String> = store.disks().into_iter().map(|disk| disk.name).collect();
        for index in 0..layout.count {
            let name = format!("disk-{index}");
            if !existing.contains(&name) {
                store.add_disk(
                    &name,
                    DiskSource::File {
                        capacity: layout.capacity_bytes,
                    },
                )?;
            }
        }
        Ok(Self { store })
    }

    /// The volume store's disks.
    pub fn disks(&self) -> Vec<storage::DiskInfo> {
        self.store.disks()
    }

    /// Creates a volume; an existing one with the same geometry is fine.
    pub fn create(&self, name: &str, geometry: Geometry) -> Result<(), StorageError> {
        if let Ok(volume) = self.store.volume(name) {
            let info = volume.info()?;
            if info.size == geometry.size_bytes
                && info.stripe_unit == geometry.stripe_unit_bytes
                && info.columns.len() == geometry.stripe_width as usize
            {
                return Ok(());
            }
            return Err(StorageError::AlreadyExists {
                kind: "volume",
                name: name.to_string(),
            });
        }
        self.store.create_volume(&VolumeSpec {
            name: name.to_string(),
            size: geometry.size_bytes,
            stripe_unit: geometry.stripe_unit_bytes,
            stripe_width: geometry.stripe_width as usize,
            disks: Vec::new(),
        })?;
        Ok(())
    }

    /// Grows a volume in place (durable on return); the same size is fine, a smaller one
    /// is refused.
    pub fn grow(&self, name: &str, size_bytes: u64) -> Result<(), StorageError> {
        self.store.grow_volume(name, size_bytes)?;
        Ok(())
    }

    /// Deletes a volume; a missing one is fine.
    pub fn delete(&self, name: &str) -> Result<(), StorageError> {
        match self.store.delete_volume(name) {
            Err(StorageError::UnknownVolume { .. }) => Ok(()),
            other => other,
        }
    }

    /// Writes durably. The block checksums are computed by the store as it writes (the
    /// writer's replicas get theirs from `Volumes::write`), so the bytes are read once.
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.store.volume(name)?.write_at(offset, data)?;
        Ok(())
    }

    /// Applies a write shipped by the writer, whatever its sequence number: the writer
    /// has several writes in flight at once, so they arrive in any order, and the
    /// agent tells retries and stale writes apart before this (`volumes/lock.rs`).
    /// The volume keeps the highest number.
    pub fn apply_replica(
        &self,
        name: &str,
        sequence: u64,
        offset: u64,
        data: Vec<u8>,
        checksums: Vec<u32>,
    ) -> Result<(), StorageError> {
        self.store.apply_replica_unordered(&ReplicaOp {
            volume: name.to_string(),
            seq: sequence,
            offset,
            payload: ReplicaPayload::Write { data, checksums },
        })?;
        Ok(())
    }

    /// Overwrites a range where its blocks live, frozen layers included, regardless of
    /// sequence numbers (read repair of a bad block from another copy).
    pub fn overwrite(
        &self,
        name: &str,
        offset: u64,
        data: Vec<u8>,
        checksums: Vec<u32>,
    ) -> Result<(), StorageError> {
        self.store.volume(name)?.repair(&storage::RepairData {
            offset,
            data,
            checksums,
        })
    }

    /// Writes the writer's bytes of a range regardless of sequence numbers
    /// (resynchronisation: intents, a copy catching up), copy on write: a snapshot of
    /// this copy keeps its blocks.
    pub fn resync(
        &self,
        name: &str,
        offset: u64,
        data: Vec<u8>,
        checksums: Vec<u32>,
    ) -> Result<(), StorageError> {
        self.store.volume(name)?.resync(&storage::RepairData {
            offset,
            data,
            checksums,
        })
    }

    /// Reads with checksums verified.
    pub fn read(&self, name: &str, offset: u64, length: u64) -> Result<Vec<u8>, StorageError> {
        let mut buffer = vec![0u8; length as usize];
        self.store.volume(name)?.read_at(offset, &mut buffer)?;
        Ok(buffer)
    }

    /// Reads a range with its per-block crc32c (for shipping).
    pub fn read_with_checksums(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<(Vec<u8>, Vec<u32>), StorageError> {
        let repair = self.store.volume(name)?.read_for_repair(offset, length)?;
        Ok((repair.data, repair.checksums))
    }

    /// Syncs the volume's disks.
    pub fn flush(&self, name: &str) -> Result<(), StorageError> {
        self.store.volume(name)?.flush()
    }

    /// Bytes allocated to the volume.
    pub fn allocated_bytes(&self, name: &str) -> Result<u64, StorageError> {
        Ok(self.store.volume(name)?.info()?.allocated)
    }

    /// Which bytes of a range hold data and which are holes (for NBD block status).
    pub fn allocation(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<storage::AllocationRun>, StorageError> {
        storage::BlockDevice::allocation(&self.store.volume(name)?, offset, length)
    }

    /// Takes a snapshot of a volume; an existing one of that name is fine (`false`).
    pub fn snapshot(&self, volume: &str, snapshot: &str) -> Result<bool, StorageError> {
        if self.has_snapshot(volume, snapshot) {
            return Ok(false);
        }
        self.store.create_snapshot(volume, snapshot)?;
        Ok(true)
    }

    /// Whether the volume has a snapshot of that name here.
    pub fn has_snapshot(&self, volume: &str, snapshot: &str) -> bool {
        self.store.snapshot(volume, snapshot).is_ok()
    }

    /// Deletes a snapshot; a missing one is fine (`false`).
    pub fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<bool, StorageError> {
        match self.store.delete_snapshot(volume, snapshot) {
            Ok(()) => Ok(true),
            Err(StorageError::UnknownSnapshot { .. } | StorageError::UnknownVolume { .. }) => {
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// The volume's snapshots here, by name.
    pub fn snapshots(&self, volume: &str) -> Vec<storage::SnapshotInfo> {
        self.store.snapshots(volume)
    }

    /// The stripe units that may differ between two snapshots of a volume (all units
    /// with data when `base` is `None`): delta replication (`volumes/delta.rs`).
    pub fn changed_units(
        &self,
        volume: &str,
        base: Option<&str>,
        snapshot: &str,
    ) -> Result<storage::ChangedUnits, StorageError> {
        self.store.changed_units(volume, base, snapshot)
    }

    /// Reads a range of a snapshot (verified), with the crc32c of every 4 KiB block.
    pub fn read_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        offset: u64,
        length: u64,
    ) -> Result<(Vec<u8>, Vec<u32>), StorageError> {
        let mut buffer = vec![0u8; length as usize];
        self.store
            .snapshot(volume, snapshot)?
            .read_at(offset, &mut buffer)?;
        let checksums = buffer
            .chunks(storage::BLOCK_SIZE as usize)
            .map(crc32c::crc32c)
            .collect();
        Ok((buffer, checksums))
    }

    /// Creates volume `name` as a copy-on-write clone of a snapshot. A volume of that
    /// name that is already there with the snapshot's geometry is taken as that clone
    /// (a retry after a crash between the clone and its record).
    pub fn clone_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        name: &str,
    ) -> Result<Geometry, StorageError> {
        let info = self
            .store
            .snapshots(volume)
            .into_iter()
            .find(|info| info.name == snapshot);
        let source = self.store.volume(volume)?.info()?;
        let Some(info) = info else {
            return Err(StorageError::UnknownSnapshot {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            });
        };
        let geometry = Geometry {
            size_bytes: info.size,
            stripe_width: source.columns.len() as u32,
            stripe_unit_bytes: source.stripe_unit,
        };
        if let Ok(existing) = self.store.volume(name) {
            let existing = existing.info()?;
            if existing.size == geometry.size_bytes
                && existing.stripe_unit == geometry.stripe_unit_bytes
                && existing.columns.len() == geometry.stripe_width as usize
            {
                return Ok(geometry);
            }
            return Err(StorageError::AlreadyExists {
                kind: "volume",
                name: name.to_string(),
            });
        }
        self.store.clone_snapshot(volume, snapshot, name)?;
        Ok(geometry)
    }
}
