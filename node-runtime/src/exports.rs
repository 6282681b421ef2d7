//! NBD exports of volumes to local clients that run as the node's user, served by the
//! `storage` crate's NBD server.
//!
//! Each export is its own server on a unix socket `DATA_DIR/exports/NAME.sock` (mode
//! 0600, in a directory of mode 0700; the server also checks that a peer runs as the
//! node's uid or root), so other local users cannot connect. Its URI is
//! `nbd+unix:///NAME?socket=PATH`, which qemu-img, qemu-io, nbdinfo and nbdcopy accept.
//! An export may be given a lifetime: when it runs out the socket is removed and every
//! connection to it is closed, as `UnexportVolume` and `DeleteVolume` do at once.
//!
//! Exports survive a restart of the agent (kill -9 included): each one (volume, lifetime
//! deadline, read-only) is kept in the node's records (`node.redb`, table `exports`)
//! before `ExportVolume` answers, and [`Exports::restore`] serves it again on the same
//! socket, so the same URI works; one whose deadline passed meanwhile is forgotten.
//! Sockets left by a crash are removed at start before that.
//!
//! An export may be read-only (`NBD_FLAG_READ_ONLY`, writes refused with `EPERM`). A
//! volume that is the disk of a running VM is exported read-only only: a second writer
//! beside the guest would change the disk under its file system, so a writable export
//! of it is refused, and a writable export is turned read-only (served again, its
//! connections closed) when a VM using the volume starts.
//!
//! A running VM's disks are exported the same way, to its `cairn-vmm` only
//! ([`Exports::attach_vm`]): one server per disk on `DATA_DIR/exports/vm-VM-INDEX.sock`,
//! started before the VMM is spawned and stopped when its process ends
//! ([`Exports::detach_vm`]), so the export lives exactly as long as the VM runs.
//!
//! The server is given a [`ReplicatedDevice`] per export, not the volume store's volume:
//! reads come from the local copy, but every write goes through
//! [`Volumes::write`](crate::volumes::Volumes::write), so a write through NBD is
//! acknowledged to the client only once every replica has it, exactly like
//! `Apply.WriteVolume`.
//!
//! A VM's disk whose volume has no primary copy here is served from a
//! [`crate::remote_disk::RemoteDevice`] instead, when the volume's epoch names this node
//! a client: reads from the nearest in-sync copy, writes through the epoch's writer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use storage::nbd::{Exports as NbdExports, NbdServer};
use storage::{AllocationRun, BlockDevice, StorageError};
use tonic::Status;

use crate::events::now_unix_ms;
use crate::records::Records;
use crate::remote_disk::RemoteVolumes;
use crate::validate::MAX_IO_BYTES;
use crate::volumes::Volumes;

/// The directory of the export sockets, inside the data directory.
pub const SOCKET_DIR: &str = "exports";
/// Longest lifetime an export may be given (a year).
pub const MAX_LIFETIME_SECONDS: u64 = 365 * 24 * 3600;

/// A volume as the NBD server sees it.
pub struct ReplicatedDevice {
    volumes: Arc<Volumes>,
    name: String,
    size_bytes: u64,
    read_only: bool,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for ReplicatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn io_error(context: String, status: &Status) -> StorageError {
    StorageError::Io {
        context,
        source: std::io::Error::other(status.message().to_string()),
    }
}

impl BlockDevice for ReplicatedDevice {
    fn size(&self) -> storage::Result<u64> {
        Ok(self.size_bytes)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> storage::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let chunk = (buf.len() - done).min(MAX_IO_BYTES as usize);
            let chunk_offset = offset + done as u64;
            // Through the agent, so a bad block is repaired from a replica.
            let data = self
                .runtime
                .block_on(
                    self.volumes
                        .read(&self.name, chunk_offset, chunk as u64, "nbd_read"),
                )
                .map_err(|status| {
                    io_error(
                        format!("reading volume `{}` at {chunk_offset}", self.name),
                        &status,
                    )
                })?;
            buf[done..done + chunk].copy_from_slice(&data);
            done += chunk;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> storage::Result<()> {
        self.write_owned(offset, data.to_vec())
    }

    /// The NBD server's path: its payload buffer goes down to the store (and, with
    /// replicas, into the replicas' requests) without another copy, and a volume
    /// without replicas is written by this connection's own thread
    /// ([`Volumes::write_from_thread`]).
    fn write_owned(&self, offset: u64, data: Vec<u8>) -> storage::Result<()> {
        if self.read_only {
            // The NBD server refuses writes to a read-only export before they get here.
            return Err(StorageError::Io {
                context: format!("writing volume `{}`", self.name),
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the export is read-only",
                ),
            });
        }
        let write = |chunk_offset: u64, chunk: Vec<u8>| {
            // NBD connections run on their own OS threads, outside the tokio runtime,
            // so blocking on the runtime here is allowed.
            self.volumes
                .write_from_thread(&self.runtime, &self.name, chunk_offset, chunk)
                .map(drop)
                .map_err(|status| {
                    io_error(
                        format!("writing volume `{}` at {chunk_offset}", self.name),
                        &status,
                    )
                })
        };
        if data.len() as u64 <= MAX_IO_BYTES {
            return write(offset, data);
        }
        for (index, chunk) in data.chunks(MAX_IO_BYTES as usize).enumerate() {
            write(offset + (index as u64) * MAX_IO_BYTES, chunk.to_vec())?;
        }
        Ok(())
    }

    fn flush(&self) -> storage::Result<()> {
        // Every acknowledged write is already durable on every copy; sync the local
        // disks once more for clients that want a barrier.
        self.volumes.local().flush(&self.name)
    }

    fn trim(&self, _offset: u64, _length: u64) -> storage::Result<()> {
        // Trim is advisory in NBD; skipping it keeps replicas byte-identical without a
        // replicated trim path.
        Ok(())
    }

    fn allocation(&self, offset: u64, length: u64) -> storage::Result<Vec<AllocationRun>> {
        // From the local copy: every copy allocates the same stripe units, because
        // replicas apply the same writes.
        self.volumes.local().allocation(&self.name, offset, length)
    }
}

/// What `ExportVolume` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// `nbd+unix:///NAME?socket=PATH`.
    pub uri: String,
    /// The socket the export listens on.
    pub socket_path: PathBuf,
    /// When the export closes (Unix ms); 0 if it has no lifetime.
    pub expires_at_unix_ms: u64,
    /// Served read-only.
    pub read_only: bool,
}

/// An export as the node's records keep it (JSON, table `exports`, keyed by volume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ExportRecord {
    /// [`ExportRecord::VERSION`] when written by this build.
    version: u32,
    /// When the export closes (Unix ms); 0 if it has no lifetime.
    expires_at_unix_ms: u64,
    /// Served read-only.
    read_only: bool,
}

impl ExportRecord {
    const VERSION: u32 = 1;
}

#[derive(Debug)]
struct Export {
    server: NbdServer,
    info: ExportInfo,
    /// Bumped by every `export` call, so only the newest lifetime's timer closes it.
    generation: u64,
}

/// How a VM's disk was attached when its VMM was spawned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    /// The volume.
    pub volume: String,
    /// What the VMM is given: the volume's NBD socket and export name; `None` when the
    /// disk could not be attached (`detail` says why).
    pub config: Option<vm_config::DiskConfig>,
    /// Whether this node holds the volume's primary copy (its data is local).
    pub local: bool,
    /// Why the disk is not attached.
    pub detail: String,
}

#[derive(Debug, Default)]
struct State {
    exports: BTreeMap<String, Export>,
    /// The disk servers of each running VM (volume, server), by VM name.
    vm_disks: BTreeMap<String, Vec<(String, NbdServer)>>,
    generation: u64,
    stopped: bool,
}

/// The node's NBD exports, one owner-only unix-socket server per exported volume.
#[derive(Debug)]
pub struct Exports {
    volumes: Arc<Volumes>,
    records: Arc<Records>,
    socket_dir: PathBuf,
    state: Arc<Mutex<State>>,
    /// The storage client for volumes with no copy here (`remote_disk.rs`).
    remote: std::sync::OnceLock<Arc<RemoteVolumes>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes the socket directory (mode 0700, so nobody else can even reach the sockets).
fn prepare_socket_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The running VM whose disk volume `name` is, if any.
fn attached_to(state: &State, name: &str) -> Option<String> {
    state
        .vm_disks
        .iter()
        .find(|(_, servers)| servers.iter().any(|(volume, _)| volume == name))
        .map(|(vm, _)| vm.clone())
}

/// Stops a server off the async threads (it joins its accept thread).
async fn stop(server: NbdServer) {
    let _ = tokio::task::spawn_blocking(move || server.shutdown()).await;
}

impl Exports {
    /// No exports yet; sockets are made in `socket_dir`. Sockets left there by an agent
    /// that crashed are removed; [`Exports::restore`] serves the kept exports again.
    pub fn new(volumes: Arc<Volumes>, records: Arc<Records>, socket_dir: PathBuf) -> Self {
        if let Ok(entries) = std::fs::read_dir(&socket_dir) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|ext| ext == "sock") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Self {
            volumes,
            records,
            socket_dir,
            state: Arc::default(),
            remote: std::sync::OnceLock::new(),
        }
    }

    /// Gives the exports the node's storage client, so a VM's disk whose volume has no
    /// copy here is served remotely ([`RemoteVolumes`]).
    pub fn set_remote(&self, remote: Arc<RemoteVolumes>) {
        let _ = self.remote.set(remote);
    }

    /// Serves VM `vm`'s disk `index` from a [`crate::remote_disk::RemoteDevice`] when
    /// the volume's epoch names this node a client; false when it does not (nothing
    /// done). A client that cannot reach any copy leaves the disk detached, saying why.
    async fn attach_remote(
        &self,
        vm: &str,
        index: usize,
        disk: &mut VmDisk,
        servers: &mut Vec<(String, NbdServer)>,
    ) -> bool {
        let Some(remote) = self.remote.get() else {
            return false;
        };
        let device = match remote.device(&disk.volume).await {
            Ok(None) => return false,
            Ok(Some(device)) => device,
            Err(status) => {
                disk.detail = format!("its data is on other nodes: {}", status.message());
                return true;
            }
        };
        let socket = self.vm_disk_socket(vm, index);
        let devices = Arc::new(NbdExports::new());
        devices.insert(disk.volume.clone(), Arc::new(device));
        match NbdServer::start_unix(&socket, devices) {
            Ok(server) => {
                servers.push((disk.volume.clone(), server));
                disk.config = Some(vm_config::DiskConfig {
                    path: socket,
                    read_only: false,
                    nbd_export: Some(disk.volume.clone()),
                });
            }
            Err(error) => disk.detail = format!("cannot serve it: {error}"),
        }
        true
    }

    /// Serves again every export kept in the node's records (at start), with its
    /// deadline and mode; forgets those whose deadline passed or whose volume is no
    /// longer a primary here. Returns one line per export that could not be served.
    pub async fn restore(&self) -> Vec<String> {
        let kept = match self.records.exports() {
            Ok(kept) => kept,
            Err(error) => return vec![format!("cannot read the kept NBD exports: {error}")],
        };
        let mut problems = Vec::new();
        for (name, bytes) in kept {
            let record = match serde_json::from_slice::<ExportRecord>(&bytes) {
                Ok(record) if record.version <= ExportRecord::VERSION => record,
                Ok(record) => {
                    problems.push(format!(
                        "export of volume `{name}` was kept by a newer cairn-node (version {}); not served",
                        record.version
                    ));
                    continue;
                }
                Err(error) => {
                    problems.push(format!(
                        "export of volume `{name}` in node.redb does not decode: {error}; forgotten"
                    ));
                    let _ = self.records.remove_export(&name);
                    continue;
                }
            };
            let expired =
                record.expires_at_unix_ms != 0 && record.expires_at_unix_ms <= now_unix_ms();
            let served = if expired {
                Err(Status::deadline_exceeded(
                    "its lifetime ran out while the node was down",
                ))
            } else {
                self.export_until(&name, record.expires_at_unix_ms, record.read_only)
                    .await
            };
            if let Err(status) = served {
                let _ = self.records.remove_export(&name);
                let mut line = format!("export of volume `{name}` not served again: ");
                let _ = write!(line, "{}", status.message());
                problems.push(line);
            }
        }
        problems
    }

    /// Exports a volume on its own owner-only unix socket and returns its URI. Exporting
    /// an exported volume returns the same URI and sets its lifetime (and mode) anew:
    /// `lifetime` from now, or none (`None`: until unexported or deleted). The export
    /// is kept in the node's records before this returns, so it is served again after a
    /// restart. A volume that is the disk of a running VM here is exported read-only
    /// only.
    pub async fn export(
        &self,
        name: &str,
        lifetime: Option<Duration>,
        read_only: bool,
    ) -> Result<ExportInfo, Status> {
        let expires_at_unix_ms =
            lifetime.map_or(0, |lifetime| now_unix_ms() + lifetime.as_millis() as u64);
        self.export_until(name, expires_at_unix_ms, read_only).await
    }

    /// [`Exports::export`] with its deadline (Unix ms, 0 for none).
    async fn export_until(
        &self,
        name: &str,
        expires_at_unix_ms: u64,
        read_only: bool,
    ) -> Result<ExportInfo, Status> {
        let (primary, size_bytes) = self.volumes.role_and_size(name).await?;
        if !primary {
            return Err(Status::failed_precondition(format!(
                "volume `{name}` is a replica on this node; export it from its primary"
            )));
        }
        let (generation, replaced) = {
            let mut state = lock(&self.state);
            if state.stopped {
                return Err(Status::unavailable("the node is stopping"));
            }
            if !read_only && let Some(vm) = attached_to(&state, name) {
                return Err(Status::failed_precondition(format!(
                    "volume `{name}` is a disk of vm `{vm}`, which is running on this node: a writable export would be a second writer under its guest; export it read-only (`read_only`), or stop the VM first"
                )));
            }
            state.generation += 1;
            let generation = state.generation;
            let same_mode = state
                .exports
                .get(name)
                .map(|existing| existing.info.read_only == read_only);
            let replaced = match (same_mode, state.exports.get_mut(name)) {
                (Some(true), Some(existing)) => {
                    existing.generation = generation;
                    existing.info.expires_at_unix_ms = expires_at_unix_ms;
                    None
                }
                // Another mode: served anew on the same socket (clients learn the mode
                // at the handshake, so open connections are closed).
                (Some(false), _) => state.exports.remove(name),
                _ => None,
            };
            (generation, replaced)
        };
        if let Some(old) = replaced {
            stop(old.server).await;
        }
        let mut state = lock(&self.state);
        if state.stopped {
            return Err(Status::unavailable("the node is stopping"));
        }
        let info = match state.exports.get(name) {
            Some(existing) => existing.info.clone(),
            None => {
                prepare_socket_dir(&self.socket_dir).map_err(|error| {
                    Status::internal(format!(
                        "cannot export volume `{name}`: cannot make the socket directory {}: {error}",
                        self.socket_dir.display()
                    ))
                })?;
                let socket_path = self.socket_dir.join(format!("{name}.sock"));
                let server = self
                    .serve(name, size_bytes, &socket_path, read_only)
                    .map_err(|error| {
                        Status::failed_precondition(format!(
                            "cannot export volume `{name}`: {error}"
                        ))
                    })?;
                let info = ExportInfo {
                    uri: server.uri(name),
                    socket_path,
                    expires_at_unix_ms,
                    read_only,
                };
                state.exports.insert(
                    name.to_string(),
                    Export {
                        server,
                        info: info.clone(),
                        generation,
                    },
                );
                info
            }
        };
        let record = ExportRecord {
            version: ExportRecord::VERSION,
            expires_at_unix_ms,
            read_only,
        };
        let kept = serde_json::to_vec(&record)
            .map_err(|error| error.to_string())
            .and_then(|bytes| {
                self.records
                    .put_export(name, &bytes)
                    .map_err(|error| error.to_string())
            });
        drop(state);
        if let Err(error) = kept {
            return Err(Status::internal(format!(
                "volume `{name}` is exported but could not be kept for a restart: {error}"
            )));
        }
        if expires_at_unix_ms != 0 {
            let lifetime = Duration::from_millis(expires_at_unix_ms.saturating_sub(now_unix_ms()));
            let state = self.state.clone();
            let records = self.records.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(lifetime).await;
                let expired = {
                    let mut state = lock(&state);
                    match state.exports.get(&name) {
                        Some(export) if export.generation == generation => {
                            let _ = records.remove_export(&name);
                            state.exports.remove(&name)
                        }
                        _ => None,
                    }
                };
                if let Some(export) = expired {
                    stop(export.server).await;
                }
            });
        }
        Ok(info)
    }

    /// Stops exporting a volume: removes its socket and closes every connection to it
    /// (missing is fine).
    pub async fn unexport(&self, name: &str) -> Result<(), Status> {
        let (removed, forgotten) = {
            let mut state = lock(&self.state);
            (state.exports.remove(name), self.records.remove_export(name))
        };
        if let Some(export) = removed {
            stop(export.server).await;
        }
        forgotten.map_err(|error| {
            Status::internal(format!(
                "the export of volume `{name}` is closed but could not be forgotten (it would come back after a restart): {error}"
            ))
        })
    }

    /// The URI of an exported volume.
    pub fn uri_of(&self, name: &str) -> Option<String> {
        lock(&self.state)
            .exports
            .get(name)
            .map(|export| export.info.uri.clone())
    }

    /// Stops every export (the node is stopping); later exports are refused. The kept
    /// exports stay in the records and are served again at the next start.
    pub async fn shutdown(&self) {
        let (exports, vm_disks) = {
            let mut state = lock(&self.state);
            state.stopped = true;
            (
                std::mem::take(&mut state.exports),
                std::mem::take(&mut state.vm_disks),
            )
        };
        for (_, export) in exports {
            stop(export.server).await;
        }
        for (_, server) in vm_disks.into_values().flatten() {
            stop(server).await;
        }
    }

    /// Starts an NBD server of volume `name` (through the replicated write path) on
    /// `socket`.
    fn serve(
        &self,
        name: &str,
        size_bytes: u64,
        socket: &Path,
        read_only: bool,
    ) -> Result<NbdServer, storage::nbd::NbdError> {
        let device = ReplicatedDevice {
            volumes: self.volumes.clone(),
            name: name.to_string(),
            size_bytes,
            read_only,
            runtime: tokio::runtime::Handle::current(),
        };
        let devices = Arc::new(NbdExports::new());
        devices.insert(name, Arc::new(device));
        NbdServer::start_unix(socket, devices)
    }

    /// The socket VM `vm`'s disk `index` is served on.
    pub fn vm_disk_socket(&self, vm: &str, index: usize) -> PathBuf {
        self.socket_dir.join(format!("vm-{vm}-{index}.sock"))
    }

    /// Exports each of `volumes` to VM `vm` (its disks, in order) on its own owner-only
    /// socket, replacing the VM's previous disk servers, and says how each disk is
    /// attached. A volume whose primary copy is here is attached, through the
    /// replicated write path; one that is only a replica here, or is not here, is
    /// served remotely when its epoch names this node a client (`remote_disk.rs`), and
    /// is not attached otherwise, nor is one whose server cannot start: `detail` says
    /// why.
    pub async fn attach_vm(&self, vm: &str, volumes: &[String]) -> Result<Vec<VmDisk>, Status> {
        self.attach_vm_as(vm, volumes, false).await
    }

    /// [`Exports::attach_vm`] for a live migration's destination (`incoming`): a local
    /// copy that is not the writer yet is served as well, through the same write path
    /// (which refuses writes until the commit's epoch makes this node the writer; the
    /// destination's guest writes nothing before the commit).
    pub async fn attach_vm_as(
        &self,
        vm: &str,
        volumes: &[String],
        incoming: bool,
    ) -> Result<Vec<VmDisk>, Status> {
        self.detach_vm(vm).await;
        if lock(&self.state).stopped {
            return Err(Status::unavailable("the node is stopping"));
        }
        prepare_socket_dir(&self.socket_dir).map_err(|error| {
            Status::internal(format!(
                "cannot attach the disks of vm `{vm}`: cannot make the socket directory {}: {error}",
                self.socket_dir.display()
            ))
        })?;
        let mut disks = Vec::with_capacity(volumes.len());
        let mut servers = Vec::new();
        for (index, volume) in volumes.iter().enumerate() {
            let mut disk = VmDisk {
                volume: volume.clone(),
                config: None,
                local: false,
                detail: String::new(),
            };
            match self.volumes.role_and_size(volume).await {
                Err(status) => {
                    if !self.attach_remote(vm, index, &mut disk, &mut servers).await {
                        disk.detail = format!("not on this node: {}", status.message());
                    }
                }
                Ok((false, _)) if !incoming => {
                    if !self.attach_remote(vm, index, &mut disk, &mut servers).await {
                        disk.detail = "this node holds a replica, not the primary copy, and the volume's epoch does not name it a client (remote data)".into();
                    }
                }
                Ok((_, size_bytes)) => {
                    disk.local = true;
                    let socket = self.vm_disk_socket(vm, index);
                    match self.serve(volume, size_bytes, &socket, false) {
                        Ok(server) => {
                            servers.push((volume.clone(), server));
                            disk.config = Some(vm_config::DiskConfig {
                                path: socket,
                                read_only: false,
                                nbd_export: Some(volume.clone()),
                            });
                        }
                        Err(error) => disk.detail = format!("cannot serve it: {error}"),
                    }
                }
            }
            disks.push(disk);
        }
        let stale = {
            let mut state = lock(&self.state);
            if state.stopped {
                Some(servers)
            } else {
                state.vm_disks.insert(vm.to_string(), servers);
                None
            }
        };
        if let Some(servers) = stale {
            for (_, server) in servers {
                stop(server).await;
            }
            return Err(Status::unavailable("the node is stopping"));
        }
        // A writable export of a disk would be a second writer beside the guest: it is
        // served again read-only (its open connections are closed; clients reconnect
        // and learn the mode at the handshake).
        for disk in disks.iter().filter(|disk| disk.config.is_some()) {
            let writable = lock(&self.state)
                .exports
                .get(&disk.volume)
                .map(|export| (export.info.expires_at_unix_ms, export.info.read_only));
            if let Some((expires_at_unix_ms, false)) = writable
                && let Err(status) = self
                    .export_until(&disk.volume, expires_at_unix_ms, true)
                    .await
            {
                // It cannot stay writable: close it.
                let _ = self.unexport(&disk.volume).await;
                eprintln!(
                    "cairn-node: the writable export of volume `{}` (a disk of vm `{vm}`) is closed: it could not be served read-only: {}",
                    disk.volume,
                    status.message()
                );
            }
        }
        Ok(disks)
    }

    /// Stops serving VM `vm`'s disks (its VMM ended): removes their sockets and closes
    /// every connection to them. Missing is fine.
    pub async fn detach_vm(&self, vm: &str) {
        let removed = lock(&self.state).vm_disks.remove(vm);
        for (_, server) in removed.into_iter().flatten() {
            stop(server).await;
        }
    }

    /// Whether VM `vm`'s disks are being served.
    pub fn vm_attached(&self, vm: &str) -> bool {
        lock(&self.state).vm_disks.contains_key(vm)
    }
}
