//! Opening a store's data directory and registering its disks.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable};

use super::state::{Disk, State};
use super::{BLOCK_SIZE, DiskInfo, DiskSource, Inner, Store, StoreOptions, io_err, validate_name};
use crate::allocator::Allocator;
use crate::engine::FileEngine;
use crate::error::{Result, StorageError};
use crate::journal::JOURNAL_BYTES;
use crate::meta::{
    CRCS, DISKS, EXTENTS, FORMAT_VERSION, FREE, INFLIGHT, LAYERS, META, PENDING, SNAPSHOTS, VOLUMES,
};

impl Store {
    /// Opens the store in `dir`, creating the directory and an empty store if needed.
    /// Resolves in-place overwrites interrupted by a crash.
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(dir.join("disks"))
            .map_err(io_err(format!("creating {}", dir.display())))?;
        let engine = FileEngine::new(options.engine).map_err(io_err("setting up io_uring"))?;
        let db_path = dir.join("meta.redb");
        let db = match crate::power_loss::recorder() {
            // Simulated power loss (tests only): meta.redb's writes are recorded too.
            Some(recorder) => Database::builder().create_with_backend(
                crate::power_loss::RecordingBackend::open(&db_path, recorder)
                    .map_err(io_err(format!("opening {}", db_path.display())))?,
            )?,
            None => Database::create(&db_path)?,
        };
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
            .and_then(|()| self.inner.engine.sync_data(&[&file]))
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
}
