//! [`NodeClient`]: one connection to a `cairn-node` that signs every call for that node.
//!
//! Every signature names the node it is for (name and public key, see [`crate::auth`]).
//! A client made with [`NodeClient::with_target`] signs for the identity it was given; one
//! that knows only an address learns the identity on its first call, from the refusal a
//! node gives to an identity probe, and then keeps it. [`NodeClient::for_node`] makes it
//! refuse to talk to a node that calls itself by another name.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use proto::auth::{Identity, RequestSigner};
//! use proto::client::NodeClient;
//! use proto::v1::{apply_request::Action, ApplyRequest, CreateVolume};
//! let signer = RequestSigner::new(Identity::load("controller.key".as_ref())?);
//! let mut node = NodeClient::connect("http://127.0.0.1:7100", signer).await?;
//! let inventory = node.get_inventory().await?;
//! let response = node
//!     .apply(ApplyRequest {
//!         request_id: "plan-42/step-3".into(),
//!         action: Some(Action::CreateVolume(CreateVolume {
//!             name: "web-1-root".into(),
//!             size_bytes: 1 << 30,
//!             stripe_width: 2,
//!             stripe_unit_bytes: 1 << 20,
//!             replica_peers: vec![],
//!         })),
//!     })
//!     .await?;
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex};

use tonic::transport::{Channel, Endpoint};

use crate::auth::{NodeTarget, RequestSigner};
use crate::methods;
use crate::v1;
use crate::v1::apply_client::ApplyClient;
use crate::v1::inventory_client::InventoryClient;
use crate::v1::observe_client::ObserveClient;
use crate::v1::replication_client::ReplicationClient;
use crate::v1::watch_client::WatchClient;

/// The metadata key naming the node a call is for. A `cairn-node --simulate --one-port`
/// serves many nodes on one address and routes each call by it; a real node serves one
/// and ignores it. [`NodeClient::for_node`] and [`NodeClient::named`] send it.
pub const NODE_NAME_METADATA: &str = "cairn-node";

/// Errors of connecting.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not a valid URI.
    #[error("invalid node address `{address}`: {source}")]
    Address {
        /// The address given.
        address: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection failed.
    #[error("cannot connect to node at {address}: {source}")]
    Connect {
        /// The address given.
        address: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A signed-call client for every service of one node. Cheap to clone (the channel
/// and the learned identity of the node are shared).
#[derive(Debug, Clone)]
pub struct NodeClient {
    channel: Channel,
    signer: RequestSigner,
    /// The address, for messages (empty when made from a channel).
    address: String,
    /// The name the node must have, when the caller knows which node it means.
    expected_name: Option<String>,
    /// The identity requests are signed for, once known.
    target: Arc<Mutex<Option<NodeTarget>>>,
    /// The identity was given ([`NodeClient::with_target`]), not learned: never asked
    /// for and never forgotten.
    pinned: bool,
    /// Sent as [`NODE_NAME_METADATA`] with every call.
    node_name: Option<tonic::metadata::AsciiMetadataValue>,
}

/// Turns "127.0.0.1:7100" into "http://127.0.0.1:7100"; keeps URIs with a scheme.
pub fn endpoint_uri(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

impl NodeClient {
    /// Connects now to `address` ("127.0.0.1:7100" or "http://…").
    pub async fn connect(address: &str, signer: RequestSigner) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(endpoint_uri(address)).map_err(|source| {
            ClientError::Address {
                address: address.to_string(),
                source,
            }
        })?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                address: address.to_string(),
                source,
            })?;
        Ok(Self::new(channel, signer, address))
    }

    fn new(channel: Channel, signer: RequestSigner, address: &str) -> Self {
        Self {
            channel,
            signer,
            address: address.to_string(),
            expected_name: None,
            target: Arc::default(),
            pinned: false,
            node_name: None,
        }
    }

    /// A client that connects on first use and reconnects after failures (for peers
    /// that may be down now).
    pub fn connect_lazy(address: &str, signer: RequestSigner) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(endpoint_uri(address))
            .map_err(|source| ClientError::Address {
                address: address.to_string(),
                source,
            })?
            .connect_timeout(std::time::Duration::from_secs(2))
            // A peer that hangs must not hold a volume's writes forever.
            .timeout(std::time::Duration::from_secs(30));
        Ok(Self::new(endpoint.connect_lazy(), signer, address))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel, signer: RequestSigner) -> Self {
        Self::new(channel, signer, "")
    }

    /// This client signs for `target` and never asks the node who it is. A node with
    /// another name or key refuses every call.
    pub fn with_target(self, target: NodeTarget) -> Self {
        Self {
            node_name: target.name.parse().ok(),
            expected_name: Some(target.name.clone()),
            target: Arc::new(Mutex::new(Some(target))),
            pinned: true,
            ..self
        }
    }

    /// This client talks only to a node named `name`: when it learns the node's
    /// identity it refuses one that calls itself otherwise (a wrong address).
    pub fn for_node(self, name: &str) -> Self {
        Self {
            expected_name: Some(name.to_string()),
            ..self.named(name)
        }
    }

    /// Every call names the node `name` in its metadata ([`NODE_NAME_METADATA`]), so
    /// one address can serve several nodes (a simulated cluster on one port).
    pub fn named(self, name: &str) -> Self {
        Self {
            node_name: name.parse().ok(),
            ..self
        }
    }

    fn name_in<T>(&self, mut request: tonic::Request<T>) -> tonic::Request<T> {
        if let Some(name) = &self.node_name {
            request
                .metadata_mut()
                .insert(NODE_NAME_METADATA, name.clone());
        }
        request
    }

    /// The identity of the node, asking it once if it is not known yet.
    pub async fn target(&self) -> Result<NodeTarget, tonic::Status> {
        if let Some(target) = self
            .target
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
        {
            return Ok(target);
        }
        let at = if self.address.is_empty() {
            String::new()
        } else {
            format!(" at {}", self.address)
        };
        let probe = self.name_in(crate::auth::identity_probe(v1::GetInventoryRequest {}));
        let refusal = match InventoryClient::new(self.channel.clone())
            .get_inventory(probe)
            .await
        {
            Ok(_) => {
                return Err(tonic::Status::permission_denied(format!(
                    "the node{at} answered an unsigned request; it is not a cairn-node that checks signatures, refusing to talk to it"
                )));
            }
            Err(status) => status,
        };
        let Some(target) = NodeTarget::from_refusal(&refusal) else {
            // Unreachable, or a node that does not speak cairn-req-v2.
            return Err(tonic::Status::new(
                refusal.code(),
                format!(
                    "cannot learn who the node{at} is: {} (a cairn-node older than {} does not say)",
                    refusal.message(),
                    crate::auth::SIGNATURE_CONTEXT
                ),
            ));
        };
        if let Some(expected) = &self.expected_name
            && *expected != target.name
        {
            return Err(tonic::Status::failed_precondition(format!(
                "the node{at} calls itself `{}`, not `{expected}`; check its address",
                target.name
            )));
        }
        *self
            .target
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(target.clone());
        Ok(target)
    }

    /// Forgets a learned identity after the node refused a request for naming another
    /// one (its key changed), so the next call asks again. A pinned target stays.
    fn forget_target_after(&self, status: &tonic::Status) {
        if self.pinned
            || status.code() != tonic::Code::Unauthenticated
            || NodeTarget::from_refusal(status).is_none()
        {
            return;
        }
        *self
            .target
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }

    /// The signer used for every call.
    pub fn signer(&self) -> &RequestSigner {
        &self.signer
    }

    async fn signed<T: prost::Message>(
        &self,
        method: &str,
        message: T,
    ) -> Result<tonic::Request<T>, tonic::Status> {
        let target = self.target().await?;
        self.signer
            .sign(method, &target, message)
            .map(|request| self.name_in(request))
            .map_err(|error| tonic::Status::internal(error.to_string()))
    }

    /// Passes a call's outcome through, forgetting a learned identity the node refused.
    fn checked<T>(&self, result: Result<T, tonic::Status>) -> Result<T, tonic::Status> {
        if let Err(status) = &result {
            self.forget_target_after(status);
        }
        result
    }

    /// `Inventory.GetInventory`.
    pub async fn get_inventory(&mut self) -> Result<v1::GetInventoryResponse, tonic::Status> {
        let request = self
            .signed(methods::GET_INVENTORY, v1::GetInventoryRequest {})
            .await?;
        let result = InventoryClient::new(self.channel.clone())
            .get_inventory(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Observe.Observe`.
    pub async fn observe(&mut self) -> Result<v1::ObserveResponse, tonic::Status> {
        let request = self.signed(methods::OBSERVE, v1::ObserveRequest {}).await?;
        let result = ObserveClient::new(self.channel.clone())
            .observe(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `ControllerTrust.SetControllerKeys` (1.7): replaces the node's trusted
    /// controller keys with `keys` (key rotation, revocation, recovery); the keys it
    /// trusts now.
    pub async fn set_controller_keys(
        &mut self,
        keys: Vec<v1::ControllerKey>,
    ) -> Result<Vec<v1::ControllerKey>, tonic::Status> {
        let request = self
            .signed(
                methods::SET_CONTROLLER_KEYS,
                v1::SetControllerKeysRequest { keys },
            )
            .await?;
        let result = v1::controller_trust_client::ControllerTrustClient::new(self.channel.clone())
            .set_controller_keys(request)
            .await;
        Ok(self.checked(result)?.into_inner().keys)
    }

    /// `Apply.Apply`. Retrying with the same `request_id` is safe: the node returns
    /// the recorded outcome.
    pub async fn apply(
        &mut self,
        request: v1::ApplyRequest,
    ) -> Result<v1::ApplyResponse, tonic::Status> {
        let request = self.signed(methods::APPLY, request).await?;
        let result = ApplyClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .apply(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Apply.ApplyBatch` (protocol 1.8): several actions in one signed call, one
    /// result per request in order. A 1.7 node answers UNIMPLEMENTED (nothing was
    /// carried out), and the caller sends them one by one.
    pub async fn apply_batch(
        &mut self,
        requests: Vec<v1::ApplyRequest>,
    ) -> Result<Vec<v1::ApplyBatchResult>, tonic::Status> {
        let request = self
            .signed(methods::APPLY_BATCH, v1::ApplyBatchRequest { requests })
            .await?;
        let result = ApplyClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .apply_batch(request)
            .await;
        Ok(self.checked(result)?.into_inner().results)
    }

    /// `Apply.ReadVolume`.
    pub async fn read_volume(
        &mut self,
        request: v1::ReadVolumeRequest,
    ) -> Result<Vec<u8>, tonic::Status> {
        let request = self.signed(methods::READ_VOLUME, request).await?;
        let result = ApplyClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .read_volume(request)
            .await;
        Ok(self.checked(result)?.into_inner().data)
    }

    /// `Apply.GetOutcome`: what became of `request_id` on this node (read-only; waits
    /// while an Apply of that id is being carried out).
    pub async fn get_outcome(
        &mut self,
        request_id: &str,
    ) -> Result<v1::GetOutcomeResponse, tonic::Status> {
        let request = self
            .signed(
                methods::GET_OUTCOME,
                v1::GetOutcomeRequest {
                    request_id: request_id.to_string(),
                },
            )
            .await?;
        Ok(ApplyClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .get_outcome(request)
            .await?
            .into_inner())
    }

    /// `Apply.GuestDiskIo`: the built-in guest of a VM on this node writes a pattern to
    /// or checksums a range of one of its disks, and this is its report.
    pub async fn guest_disk_io(
        &mut self,
        request: v1::GuestDiskIoRequest,
    ) -> Result<v1::GuestDiskIoResponse, tonic::Status> {
        let request = self.signed(methods::GUEST_DISK_IO, request).await?;
        let result = ApplyClient::new(self.channel.clone())
            .guest_disk_io(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Apply.ReadConsole`: a VM's console output from an offset (waits up to
    /// `wait_ms` for some).
    pub async fn read_console(
        &mut self,
        request: v1::ReadConsoleRequest,
    ) -> Result<v1::ReadConsoleResponse, tonic::Status> {
        let request = self.signed(methods::READ_CONSOLE, request).await?;
        let result = ApplyClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .read_console(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Apply.WriteConsole`: bytes typed into a running VM's serial console.
    pub async fn write_console(
        &mut self,
        request: v1::WriteConsoleRequest,
    ) -> Result<v1::WriteConsoleResponse, tonic::Status> {
        let request = self.signed(methods::WRITE_CONSOLE, request).await?;
        let result = ApplyClient::new(self.channel.clone())
            .write_console(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Watch.Watch`: the event stream.
    pub async fn watch(
        &mut self,
        heartbeat_interval_ms: u32,
    ) -> Result<tonic::Streaming<v1::WatchEvent>, tonic::Status> {
        let request = self
            .signed(
                methods::WATCH,
                v1::WatchRequest {
                    heartbeat_interval_ms,
                },
            )
            .await?;
        let result = WatchClient::new(self.channel.clone()).watch(request).await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.EnsureReplica`.
    pub async fn ensure_replica(
        &mut self,
        request: v1::EnsureReplicaRequest,
    ) -> Result<v1::EnsureReplicaResponse, tonic::Status> {
        let request = self.signed(methods::ENSURE_REPLICA, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .ensure_replica(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.ReplicaWrite`.
    pub async fn replica_write(
        &mut self,
        request: v1::ReplicaWriteRequest,
    ) -> Result<(), tonic::Status> {
        let request = self.signed(methods::REPLICA_WRITE, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .replica_write(request)
            .await;
        self.checked(result)?;
        Ok(())
    }

    /// `Replication.ReplicaWrite`, with the replica's answer (its session's boot id).
    pub async fn replica_write_in_session(
        &mut self,
        request: v1::ReplicaWriteRequest,
    ) -> Result<v1::ReplicaWriteResponse, tonic::Status> {
        let request = self.signed(methods::REPLICA_WRITE, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .replica_write(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.ReplicaRead`: verified bytes and their per-block crc32c.
    pub async fn replica_read(
        &mut self,
        request: v1::ReplicaReadRequest,
    ) -> Result<v1::ReplicaReadResponse, tonic::Status> {
        let request = self.signed(methods::REPLICA_READ, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .replica_read(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.ReplicaRecent`: where a copy may differ from the others.
    pub async fn replica_recent(
        &mut self,
        request: v1::ReplicaRecentRequest,
    ) -> Result<v1::ReplicaRecentResponse, tonic::Status> {
        let request = self.signed(methods::REPLICA_RECENT, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .replica_recent(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.DeleteReplica`.
    pub async fn delete_replica(
        &mut self,
        request: v1::DeleteReplicaRequest,
    ) -> Result<(), tonic::Status> {
        let request = self.signed(methods::DELETE_REPLICA, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .delete_replica(request)
            .await;
        self.checked(result)?;
        Ok(())
    }

    /// `Replication.ResizeReplica`: grows a replica in place.
    pub async fn resize_replica(
        &mut self,
        request: v1::ResizeReplicaRequest,
    ) -> Result<v1::ResizeReplicaResponse, tonic::Status> {
        let request = self.signed(methods::RESIZE_REPLICA, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .resize_replica(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.DeltaStatus`: what a replication target holds and how far the
    /// transfer in progress got.
    pub async fn delta_status(
        &mut self,
        request: v1::DeltaStatusRequest,
    ) -> Result<v1::DeltaStatusResponse, tonic::Status> {
        let request = self.signed(methods::DELTA_STATUS, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .delta_status(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.DeltaWrite`: one piece of a delta.
    pub async fn delta_write(
        &mut self,
        request: v1::DeltaWriteRequest,
    ) -> Result<v1::DeltaWriteResponse, tonic::Status> {
        let request = self.signed(methods::DELTA_WRITE, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .delta_write(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.DeltaCommit`: the end of a delta, manifests compared.
    pub async fn delta_commit(
        &mut self,
        request: v1::DeltaCommitRequest,
    ) -> Result<v1::DeltaCommitResponse, tonic::Status> {
        let request = self.signed(methods::DELTA_COMMIT, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .delta_commit(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.ClientOpen`: a volume's size, for a node reaching it remotely.
    pub async fn client_open(
        &mut self,
        request: v1::ClientOpenRequest,
    ) -> Result<v1::ClientOpenResponse, tonic::Status> {
        let request = self.signed(methods::CLIENT_OPEN, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .client_open(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.ClientRead`: bytes of an in-sync copy and their per-block crc32c.
    pub async fn client_read(
        &mut self,
        request: v1::ClientReadRequest,
    ) -> Result<v1::ClientReadResponse, tonic::Status> {
        let request = self.signed(methods::CLIENT_READ, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .client_read(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.ClientWrite`: a write through the volume's writer, answered once
    /// every in-sync copy holds it.
    pub async fn client_write(
        &mut self,
        request: v1::ClientWriteRequest,
    ) -> Result<v1::ClientWriteResponse, tonic::Status> {
        let request = self.signed(methods::CLIENT_WRITE, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .client_write(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.ReplicaSnapshot`: a replica takes (or deletes) a snapshot.
    pub async fn replica_snapshot(
        &mut self,
        request: v1::ReplicaSnapshotRequest,
    ) -> Result<v1::ReplicaSnapshotResponse, tonic::Status> {
        let request = self.signed(methods::REPLICA_SNAPSHOT, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .replica_snapshot(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }

    /// `Replication.CloneReplica`: a replica's copy of a clone of a snapshot.
    pub async fn clone_replica(
        &mut self,
        request: v1::CloneReplicaRequest,
    ) -> Result<v1::CloneReplicaResponse, tonic::Status> {
        let request = self.signed(methods::CLONE_REPLICA, request).await?;
        let result = ReplicationClient::new(self.channel.clone())
            .clone_replica(request)
            .await;
        Ok(self.checked(result)?.into_inner())
    }
}

/// Largest gRPC message either side sends or accepts: 4 MiB of data plus framing.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024 + 64 * 1024;

/// Raises this process's open-file limit to at least `wanted` descriptors (soft,
/// and hard as far as the process may: root up to `fs.nr_open`), for a controller
/// that holds a connection per node or a simulator that serves thousands of nodes.
/// Returns the soft limit now in force; a limit already high enough is left alone.
pub fn raise_open_file_limit(wanted: u64) -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        ));
    }
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: limit.rlim_max.max(wanted),
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(wanted);
    }
    // Not allowed past the hard limit (not root): as far as it goes.
    let capped = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } != 0 {
        return Err(format!(
            "cannot raise the open-file limit to {wanted}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Err(format!(
        "the open-file limit is {} (the hard limit) and {wanted} are needed: raise it (ulimit -Hn, or run as root)",
        limit.rlim_max
    ))
}

#[cfg(test)]
mod open_file_limit_tests {
    use super::*;

    fn limits() -> (u64, u64) {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid pointer to a local rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
        (l.rlim_cur, l.rlim_max)
    }

    #[test]
    fn the_open_file_limit_is_raised_and_never_lowered() {
        let (soft, hard) = limits();
        // Already enough: left alone.
        assert_eq!(raise_open_file_limit(1).unwrap(), soft);
        assert_eq!(limits(), (soft, hard));
        // Within the hard limit: raised to exactly that.
        if soft < hard {
            let wanted = soft + 1;
            assert_eq!(raise_open_file_limit(wanted).unwrap(), wanted);
            assert_eq!(limits().0, wanted);
        }
        // Past the hard limit: root raises both, others get the hard limit and an
        // error saying what to do.
        let past = limits().1 + 16;
        match raise_open_file_limit(past) {
            Ok(now) => assert_eq!((now, limits()), (past, (past, past))),
            Err(e) => {
                assert!(e.contains("hard limit"), "{e}");
                assert_eq!(limits().0, limits().1);
            }
        }
    }
}
