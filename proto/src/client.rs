//! [`NodeClient`]: one connection to a `cairn-node` that signs every call.
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

use tonic::transport::{Channel, Endpoint};

use crate::auth::RequestSigner;
use crate::methods;
use crate::v1;
use crate::v1::apply_client::ApplyClient;
use crate::v1::inventory_client::InventoryClient;
use crate::v1::observe_client::ObserveClient;
use crate::v1::replication_client::ReplicationClient;
use crate::v1::watch_client::WatchClient;

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
/// is shared).
#[derive(Debug, Clone)]
pub struct NodeClient {
    channel: Channel,
    signer: RequestSigner,
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
        Ok(Self { channel, signer })
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
        Ok(Self {
            channel: endpoint.connect_lazy(),
            signer,
        })
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel, signer: RequestSigner) -> Self {
        Self { channel, signer }
    }

    /// The signer used for every call.
    pub fn signer(&self) -> &RequestSigner {
        &self.signer
    }

    fn signed<T: prost::Message>(
        &self,
        method: &str,
        message: T,
    ) -> Result<tonic::Request<T>, tonic::Status> {
        self.signer
            .sign(method, message)
            .map_err(|error| tonic::Status::internal(error.to_string()))
    }

    /// `Inventory.GetInventory`.
    pub async fn get_inventory(&mut self) -> Result<v1::GetInventoryResponse, tonic::Status> {
        let request = self.signed(methods::GET_INVENTORY, v1::GetInventoryRequest {})?;
        Ok(InventoryClient::new(self.channel.clone())
            .get_inventory(request)
            .await?
            .into_inner())
    }

    /// `Observe.Observe`.
    pub async fn observe(&mut self) -> Result<v1::ObserveResponse, tonic::Status> {
        let request = self.signed(methods::OBSERVE, v1::ObserveRequest {})?;
        Ok(ObserveClient::new(self.channel.clone())
            .observe(request)
            .await?
            .into_inner())
    }

    /// `Apply.Apply`. Retrying with the same `request_id` is safe: the node returns
    /// the recorded outcome.
    pub async fn apply(
        &mut self,
        request: v1::ApplyRequest,
    ) -> Result<v1::ApplyResponse, tonic::Status> {
        let request = self.signed(methods::APPLY, request)?;
        Ok(ApplyClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .apply(request)
            .await?
            .into_inner())
    }

    /// `Apply.ReadVolume`.
    pub async fn read_volume(
        &mut self,
        request: v1::ReadVolumeRequest,
    ) -> Result<Vec<u8>, tonic::Status> {
        let request = self.signed(methods::READ_VOLUME, request)?;
        Ok(ApplyClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .read_volume(request)
            .await?
            .into_inner()
            .data)
    }

    /// `Apply.GetOutcome`: what became of `request_id` on this node (read-only; waits
    /// while an Apply of that id is being carried out).
    pub async fn get_outcome(
        &mut self,
        request_id: &str,
    ) -> Result<v1::GetOutcomeResponse, tonic::Status> {
        let request = self.signed(
            methods::GET_OUTCOME,
            v1::GetOutcomeRequest {
                request_id: request_id.to_string(),
            },
        )?;
        Ok(ApplyClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .get_outcome(request)
            .await?
            .into_inner())
    }

    /// `Watch.Watch`: the event stream.
    pub async fn watch(
        &mut self,
        heartbeat_interval_ms: u32,
    ) -> Result<tonic::Streaming<v1::WatchEvent>, tonic::Status> {
        let request = self.signed(
            methods::WATCH,
            v1::WatchRequest {
                heartbeat_interval_ms,
            },
        )?;
        Ok(WatchClient::new(self.channel.clone())
            .watch(request)
            .await?
            .into_inner())
    }

    /// `Replication.EnsureReplica`.
    pub async fn ensure_replica(
        &mut self,
        request: v1::EnsureReplicaRequest,
    ) -> Result<v1::EnsureReplicaResponse, tonic::Status> {
        let request = self.signed(methods::ENSURE_REPLICA, request)?;
        Ok(ReplicationClient::new(self.channel.clone())
            .ensure_replica(request)
            .await?
            .into_inner())
    }

    /// `Replication.ReplicaWrite`.
    pub async fn replica_write(
        &mut self,
        request: v1::ReplicaWriteRequest,
    ) -> Result<(), tonic::Status> {
        let request = self.signed(methods::REPLICA_WRITE, request)?;
        ReplicationClient::new(self.channel.clone())
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .replica_write(request)
            .await?;
        Ok(())
    }

    /// `Replication.ReplicaRead`: verified bytes and their per-block crc32c.
    pub async fn replica_read(
        &mut self,
        request: v1::ReplicaReadRequest,
    ) -> Result<v1::ReplicaReadResponse, tonic::Status> {
        let request = self.signed(methods::REPLICA_READ, request)?;
        Ok(ReplicationClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .replica_read(request)
            .await?
            .into_inner())
    }

    /// `Replication.DeleteReplica`.
    pub async fn delete_replica(&mut self, volume: &str) -> Result<(), tonic::Status> {
        let request = self.signed(
            methods::DELETE_REPLICA,
            v1::DeleteReplicaRequest {
                volume: volume.to_string(),
            },
        )?;
        ReplicationClient::new(self.channel.clone())
            .delete_replica(request)
            .await?;
        Ok(())
    }
}

/// Largest gRPC message either side sends or accepts: 4 MiB of data plus framing.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024 + 64 * 1024;
