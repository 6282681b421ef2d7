//! Remote data, the copies' side: client I/O from nodes that hold no copy of a volume.
//!
//! A node running a VM whose volume has no copy there (after a restart elsewhere or a
//! move) reaches the volume through `Replication.ClientOpen/ClientRead/ClientWrite`
//! (its storage client is `crate::remote_disk`). The controller names such nodes in the
//! epoch (`SetVolumeEpoch.clients`) and installs it on them and on every copy. A copy
//! serves a client call only:
//! - under exactly the epoch it holds: an older one is refused (the client was fenced
//!   by a newer epoch, for example when its VM moved), a newer one too (not installed
//!   here yet); both `FAILED_PRECONDITION`;
//! - from a node named in that epoch's `clients` (reads also from the epoch's writer),
//!   recognised by its key in the pushed peer set; anyone else is `PERMISSION_DENIED`
//!   naming caller, volume and node;
//! - reads only on a copy of the in-sync set (a copy outside it may be stale);
//! - writes only on the epoch's writer, which takes them through the same replicated
//!   write path as a local write ([`Volumes::write`]): answered only once every copy
//!   of the in-sync set holds the write durably.

use proto::v1;
use tonic::Status;

use super::{ReplicationCaller, VolumeEntry, Volumes};
use crate::validate;

/// Part of the refusal of a client call under an older epoch than the copy's: the
/// client waits for the controller's newer epoch (or learns that it was moved away).
pub const CLIENT_FENCED: &str = "the client is fenced";

/// Part of the refusal of a client call under a newer epoch than the copy's.
pub const NOT_INSTALLED: &str = "not installed on this copy yet";

/// A volume's epoch as a client uses it: who writes, who may be read, who is a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientView {
    /// The epoch (0: none installed, so no client I/O).
    pub epoch: u64,
    /// The node client writes go to.
    pub writer: String,
    /// The copies client reads may go to.
    pub in_sync: Vec<String>,
    /// The nodes that may do client I/O at this epoch.
    pub clients: Vec<String>,
}

/// Checks `SetVolumeEpoch.clients`: node names, each at most once.
pub fn validate_clients(request: &v1::SetVolumeEpoch) -> Result<(), Status> {
    for (index, node) in request.clients.iter().enumerate() {
        let field = format!("set_volume_epoch.clients[{index}]");
        validate::name(&field, node)?;
        if request.clients[..index].contains(node) {
            return Err(validate::invalid(
                &field,
                format!("names node {node} twice"),
            ));
        }
    }
    Ok(())
}

/// What a client call asks of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientOp {
    Read,
    Write,
}

impl ClientOp {
    fn verb(self) -> &'static str {
        match self {
            ClientOp::Read => "read",
            ClientOp::Write => "write",
        }
    }
}

/// crc32c of every 4 KiB block of `data`.
pub fn block_checksums(data: &[u8]) -> Vec<u32> {
    data.chunks(storage::BLOCK_SIZE as usize)
        .map(crc32c::crc32c)
        .collect()
}

impl Volumes {
    /// The epoch a copy on this node holds, as a client on this node would use it
    /// (`None` when this node holds no copy).
    pub async fn client_view(&self, name: &str) -> Option<ClientView> {
        let entry = self.volumes.read().await.get(name).cloned()?;
        let epoch = entry.epoch();
        Some(ClientView {
            epoch: epoch.epoch,
            writer: epoch.writer,
            in_sync: epoch.in_sync,
            clients: epoch.clients,
        })
    }

    /// The checks of every client call (see the module's comment).
    async fn authorize_client(
        &self,
        volume: &str,
        epoch: u64,
        caller: &ReplicationCaller,
        op: ClientOp,
    ) -> Result<std::sync::Arc<VolumeEntry>, Status> {
        let verb = op.verb();
        let Some(entry) = self.volumes.read().await.get(volume).cloned() else {
            return Err(self.denied(caller, verb, volume, "this node holds no copy of it"));
        };
        if caller.controller {
            return Err(self.denied(
                caller,
                verb,
                volume,
                "client I/O is for nodes named in the epoch's clients; controllers read with ReplicaRead or ReadVolume and write with Apply.WriteVolume",
            ));
        }
        let current = entry.epoch();
        if epoch < current.epoch {
            return Err(Status::failed_precondition(format!(
                "volume `{volume}` on node {} refuses client I/O from {} under epoch {epoch}: this copy holds {}; {CLIENT_FENCED} (a newer epoch was installed, e.g. its VM moved)",
                self.node_name,
                caller.description,
                current.describe()
            )));
        }
        if epoch > current.epoch {
            return Err(Status::failed_precondition(format!(
                "volume `{volume}` on node {} refuses client I/O from {} under epoch {epoch}: this copy holds {}; epoch {epoch} is {NOT_INSTALLED}",
                self.node_name,
                caller.description,
                current.describe()
            )));
        }
        let is = |name: &str| self.key_of(name, "").as_deref() == Some(caller.key_hex.as_str());
        let allowed = current.clients.iter().any(|name| is(name))
            || (op == ClientOp::Read && !current.writer.is_empty() && is(&current.writer));
        if !allowed {
            let clients = if current.clients.is_empty() {
                "none".to_string()
            } else {
                current.clients.join(", ")
            };
            return Err(self.denied(
                caller,
                verb,
                volume,
                &format!(
                    "only the clients of {} do client I/O (clients: {clients}; a client's key must be in this node's peer set)",
                    current.describe()
                ),
            ));
        }
        match op {
            ClientOp::Read => self.check_readable(&entry)?,
            ClientOp::Write => {
                if current.writer != self.node_name {
                    return Err(Status::failed_precondition(format!(
                        "node {} is not the writer of volume `{volume}` at {}: send client writes to node {}",
                        self.node_name,
                        current.describe(),
                        current.writer
                    )));
                }
            }
        }
        Ok(entry)
    }

    /// `ClientOpen`: the volume's size and the epoch this copy holds.
    pub async fn client_open(
        &self,
        request: &v1::ClientOpenRequest,
        caller: &ReplicationCaller,
    ) -> Result<v1::ClientOpenResponse, Status> {
        let entry = self
            .authorize_client(&request.volume, request.epoch, caller, ClientOp::Read)
            .await?;
        Ok(v1::ClientOpenResponse {
            size_bytes: entry.size(),
            epoch: entry.epoch().epoch,
        })
    }

    /// `ClientRead`: verified bytes of this in-sync copy (a bad block is repaired from
    /// another copy first, as for a local read) and their checksums.
    pub async fn client_read(
        &self,
        request: &v1::ClientReadRequest,
        caller: &ReplicationCaller,
    ) -> Result<v1::ClientReadResponse, Status> {
        self.authorize_client(&request.volume, request.epoch, caller, ClientOp::Read)
            .await?;
        let data = self
            .read(
                &request.volume,
                request.offset,
                request.length,
                "client_read_request",
            )
            .await?;
        let checksums = block_checksums(&data);
        Ok(v1::ClientReadResponse { data, checksums })
    }

    /// `ClientWrite`: a write through this node, the epoch's writer, replicated to
    /// every in-sync copy before it is answered.
    pub async fn client_write(
        &self,
        request: v1::ClientWriteRequest,
        caller: &ReplicationCaller,
    ) -> Result<v1::ClientWriteResponse, Status> {
        if request.data.is_empty() {
            return Err(validate::invalid(
                "client_write_request.data",
                "must not be empty",
            ));
        }
        if block_checksums(&request.data) != request.checksums {
            return Err(Status::data_loss(format!(
                "client_write_request.checksums: the data of the write to volume `{}` at {} from {} does not match its checksums (damaged in transit); nothing was written",
                request.volume, request.offset, caller.description
            )));
        }
        self.authorize_client(&request.volume, request.epoch, caller, ClientOp::Write)
            .await?;
        let ack = self
            .write(&request.volume, request.offset, request.data)
            .await?;
        Ok(v1::ClientWriteResponse {
            copies: ack.copies,
            writer_boot: self.boot_id().to_vec(),
        })
    }
}
