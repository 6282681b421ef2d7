//! NBD exports of volumes on loopback, served by the `storage` crate's NBD server.
//!
//! The server is given a [`ReplicatedDevice`] per export, not the engine's volume:
//! reads come from the local copy, but every write goes through
//! [`Volumes::write`](crate::volumes::Volumes::write), so a write through NBD is
//! acknowledged to the client only once every replica has it, exactly like
//! `Apply.WriteVolume`.

use std::collections::BTreeSet;
use std::sync::Arc;

use storage::nbd::{Exports as NbdExports, NbdServer};
use storage::{BlockDevice, StorageError};
use tokio::sync::Mutex;
use tonic::Status;

use crate::validate::MAX_IO_BYTES;
use crate::volumes::Volumes;

/// A volume as the NBD server sees it.
pub struct ReplicatedDevice {
    volumes: Arc<Volumes>,
    name: String,
    size_bytes: u64,
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
        // NBD connections run on their own OS threads, outside the tokio runtime, so
        // blocking on the runtime here is allowed.
        for (index, chunk) in data.chunks(MAX_IO_BYTES as usize).enumerate() {
            let chunk_offset = offset + (index as u64) * MAX_IO_BYTES;
            self.runtime
                .block_on(self.volumes.write(&self.name, chunk_offset, chunk.to_vec()))
                .map_err(|status| {
                    io_error(
                        format!("writing volume `{}` at {chunk_offset}", self.name),
                        &status,
                    )
                })?;
        }
        Ok(())
    }

    fn flush(&self) -> storage::Result<()> {
        // Every acknowledged write is already durable on every copy; sync the local
        // disks once more for clients that want a barrier.
        self.volumes.engine().flush(&self.name)
    }

    fn trim(&self, _offset: u64, _length: u64) -> storage::Result<()> {
        // Trim is advisory in NBD; skipping it keeps replicas byte-identical without a
        // replicated trim path.
        Ok(())
    }
}

#[derive(Debug, Default)]
struct State {
    server: Option<NbdServer>,
    exported: BTreeSet<String>,
}

/// The node's NBD server and its exports.
#[derive(Debug)]
pub struct Exports {
    volumes: Arc<Volumes>,
    devices: Arc<NbdExports>,
    state: Mutex<State>,
}

impl Exports {
    /// No exports yet; the server starts on the first export.
    pub fn new(volumes: Arc<Volumes>) -> Self {
        Self {
            volumes,
            devices: Arc::new(NbdExports::new()),
            state: Mutex::new(State::default()),
        }
    }

    /// Exports a volume (idempotent) and returns its `nbd://` URI.
    pub async fn export(&self, name: &str) -> Result<String, Status> {
        let status = self.volumes.role_and_size(name).await?;
        if !status.0 {
            return Err(Status::failed_precondition(format!(
                "volume `{name}` is a replica on this node; export it from its primary"
            )));
        }
        let mut state = self.state.lock().await;
        if state.server.is_none() {
            let address = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            let server = NbdServer::start(address, self.devices.clone()).map_err(|error| {
                Status::internal(format!("cannot start the NBD server: {error}"))
            })?;
            state.server = Some(server);
        }
        if !state.exported.contains(name) {
            let device = ReplicatedDevice {
                volumes: self.volumes.clone(),
                name: name.to_string(),
                size_bytes: status.1,
                runtime: tokio::runtime::Handle::current(),
            };
            self.devices.insert(name, Arc::new(device));
            state.exported.insert(name.to_string());
        }
        let uri = state
            .server
            .as_ref()
            .map(|server| server.uri(name))
            .unwrap_or_default();
        Ok(uri)
    }

    /// Stops exporting a volume to new connections (missing is fine).
    pub async fn unexport(&self, name: &str) {
        let mut state = self.state.lock().await;
        if state.exported.remove(name) {
            self.devices.remove(name);
        }
    }

    /// The URI of an exported volume.
    pub fn uri_of(&self, name: &str) -> Option<String> {
        let state = self.state.try_lock().ok()?;
        if !state.exported.contains(name) {
            return None;
        }
        state.server.as_ref().map(|server| server.uri(name))
    }

    /// Stops the NBD server.
    pub async fn shutdown(&self) {
        if let Some(server) = self.state.lock().await.server.take() {
            server.shutdown();
        }
    }
}
