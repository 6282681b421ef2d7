//! The seam to node runtimes: [`NodeApi`] is what the reconciler asks of nodes
//! (observe, apply, the outcome of a request). [`GrpcNodes`] is the real one,
//! signed gRPC to `cairn-node` (or `cairn-node --simulate`, the same service over
//! simulated backends); tests may put an in-process fake behind the same trait.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::auth::RequestSigner;
use proto::client::NodeClient;
use proto::v1;
use tokio::sync::Mutex;

use crate::desired::DesiredNode;
use crate::observe::NodeObservation;

/// Why a node call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// No connection.
    #[error("node {node} unreachable: {error}")]
    Unreachable {
        /// Node name.
        node: String,
        /// Why.
        error: String,
    },
    /// The node answered with an error.
    #[error("node {node} refused ({code:?}): {message}")]
    Refused {
        /// Node name.
        node: String,
        /// The gRPC code.
        code: tonic::Code,
        /// The node's message.
        message: String,
    },
    /// Not sent: the node speaks a protocol version that would not carry it out as
    /// asked ([`proto::protocol::requires`]).
    #[error("{message}")]
    Unsupported {
        /// Node name.
        node: String,
        /// What is wrong and what would be right.
        message: String,
    },
}

/// A request `node` (speaking `speaks`) must not be sent, because it would not carry
/// it out as asked: a VM with dedicated CPUs for a node before 1.6, which ignores
/// `CreateVm.dedicated_cpus` (the VM would run unpinned while the plan says pinned).
pub fn unsupported(
    node: &str,
    speaks: &v1::ProtocolVersion,
    request: &v1::ApplyRequest,
) -> Result<(), NodeError> {
    let Some(v1::apply_request::Action::CreateVm(vm)) = &request.action else {
        return Ok(());
    };
    if !vm.dedicated_cpus {
        return Ok(());
    }
    proto::protocol::requires(
        proto::protocol::DEDICATED_CPUS,
        speaks,
        node,
        &format!("vm {}", vm.name),
        &format!(
            "remove cpu-pinning from its sla-profile `{}` (its VM then shares CPUs)",
            vm.sla
        ),
    )
    .map_err(|message| NodeError::Unsupported {
        node: node.to_owned(),
        message,
    })
}

/// What the reconciler asks of node runtimes. Implementations are cheap to clone
/// (they share their connections).
pub trait NodeApi: Clone + Send + Sync + 'static {
    /// The node's inventory and observation (checked to be the node the spec
    /// names at that address); `Err` with why it cannot be asked.
    fn observe(
        &self,
        node: &DesiredNode,
    ) -> impl Future<Output = Result<NodeObservation, String>> + Send;

    /// Carries out one action (idempotent per request id).
    fn apply(
        &self,
        node: &str,
        address: &str,
        request: v1::ApplyRequest,
    ) -> impl Future<Output = Result<v1::ApplyResponse, NodeError>> + Send;

    /// Carries out several actions on one node, each as [`NodeApi::apply`] does, and
    /// answers each in order. By default they are sent one by one, concurrently;
    /// [`GrpcNodes`] sends them in one `ApplyBatch` to a node that speaks it.
    fn apply_batch(
        &self,
        node: &str,
        address: &str,
        requests: Vec<v1::ApplyRequest>,
    ) -> impl Future<Output = Vec<Result<v1::ApplyResponse, NodeError>>> + Send {
        one_by_one(self, node, address, requests)
    }

    /// What became of a request id (read-only; waits for it if it still runs).
    fn get_outcome(
        &self,
        node: &str,
        address: &str,
        request_id: &str,
    ) -> impl Future<Output = Result<v1::GetOutcomeResponse, NodeError>> + Send;
}

/// How long an observation trusts the identity and protocol version the inventory
/// of a node gave when the node does not report its version in Observe (a node
/// before that field, [`GrpcNodes::observe`]). One that does keeps its identity
/// until a call fails.
pub const INVENTORY_FRESH: Duration = Duration::from_secs(30);

/// What a node's last inventory said that an observation needs: who it is.
#[derive(Debug, Clone)]
struct Known {
    /// When the inventory was read.
    at: std::time::Instant,
    /// Its name and public key, which every signed call names.
    target: proto::auth::NodeTarget,
    /// Whether its Observe answers carry its protocol version: then an upgrade is
    /// seen there, and the identity is kept until a call fails (at 10,000 simulated
    /// nodes an observation round took longer than [`INVENTORY_FRESH`], so every
    /// round asked every inventory again: three calls a node instead of one).
    reports_version: bool,
}

/// Signed gRPC to `cairn-node`, one connection per address, made on first use.
#[derive(Debug, Clone)]
pub struct GrpcNodes {
    signer: RequestSigner,
    clients: Arc<Mutex<BTreeMap<String, NodeClient>>>,
    usage: crate::usage::UsageBoard,
    /// The protocol version each node reported in its last inventory, by node.
    versions: Arc<std::sync::Mutex<BTreeMap<String, v1::ProtocolVersion>>>,
    /// Each address's identity from its last inventory, by address.
    known: Arc<std::sync::Mutex<std::collections::HashMap<String, Known>>>,
}

impl GrpcNodes {
    /// Nodes reached with requests signed by `signer` (the controller key).
    pub fn new(signer: RequestSigner) -> Self {
        Self {
            signer,
            clients: Arc::default(),
            usage: Default::default(),
            versions: Arc::default(),
            known: Arc::default(),
        }
    }

    /// The usage each node reported in its last Observe answer (kept out of the
    /// observation: [`crate::usage`]).
    pub fn usage(&self) -> &crate::usage::UsageBoard {
        &self.usage
    }

    async fn client(&self, node: &str, address: &str) -> Result<NodeClient, NodeError> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let client = connect(address, self.signer.clone())
            .await
            .map_err(|error| NodeError::Unreachable {
                node: node.to_owned(),
                error,
            })?;
        clients.insert(address.to_owned(), client.clone());
        Ok(client)
    }
}

/// `requests` to `node`, each in an `Apply` of its own, concurrently; the answers in
/// order (what [`NodeApi::apply_batch`] does by default).
pub async fn one_by_one<N: NodeApi>(
    api: &N,
    node: &str,
    address: &str,
    requests: Vec<v1::ApplyRequest>,
) -> Vec<Result<v1::ApplyResponse, NodeError>> {
    let calls = requests
        .into_iter()
        .map(|request| api.apply(node, address, request));
    futures_util::future::join_all(calls).await
}

/// An `ApplyBatch`'s results as the `Apply` answers of `ids`, in order: a result
/// missing or naming another request id is an error of that request.
fn batch_results(
    node: &str,
    ids: &[String],
    results: Vec<v1::ApplyBatchResult>,
) -> Vec<Result<v1::ApplyResponse, NodeError>> {
    let count = results.len();
    let mut results = results.into_iter();
    ids.iter()
        .map(|id| {
            let mismatch = |what: String| NodeError::Refused {
                node: node.to_owned(),
                code: tonic::Code::Internal,
                message: format!(
                    "its ApplyBatch answer {what} (request `{id}`, {count} results for {} requests)",
                    ids.len()
                ),
            };
            let result = results
                .next()
                .ok_or_else(|| mismatch("has no result".into()))?;
            if result.request_id != *id {
                return Err(mismatch(format!("names `{}` instead", result.request_id)));
            }
            match result.outcome {
                Some(v1::apply_batch_result::Outcome::Response(response)) => Ok(response),
                Some(v1::apply_batch_result::Outcome::Error(error)) => Err(NodeError::Refused {
                    node: node.to_owned(),
                    code: tonic::Code::from_i32(error.code),
                    message: error.message,
                }),
                None => Err(mismatch("has a result with no outcome".into())),
            }
        })
        .collect()
}

fn refused(node: &str, status: &tonic::Status) -> NodeError {
    NodeError::Refused {
        node: node.to_owned(),
        code: status.code(),
        message: status.message().to_owned(),
    }
}

impl GrpcNodes {
    /// The identity `node`'s inventory gave less than [`INVENTORY_FRESH`] ago.
    fn known(&self, node: &DesiredNode) -> Option<proto::auth::NodeTarget> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&node.address)
            .filter(|k| {
                (k.reports_version || k.at.elapsed() < INVENTORY_FRESH)
                    && k.target.name == node.name
            })
            .map(|k| k.target.clone())
    }

    fn note_version(&self, node: &str, speaks: v1::ProtocolVersion) {
        self.versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.to_owned(), speaks);
    }

    fn forget(&self, node: &DesiredNode) {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&node.address);
    }

    /// Observe alone, signed for the identity the node's recent inventory gave: one
    /// call where a full observation makes three (the identity probe, GetInventory,
    /// Observe). `None` when the node is not known, or the call did not succeed (the
    /// caller then observes in full: a node with a new key or name is asked again).
    async fn observe_known(
        &self,
        node: &DesiredNode,
        client: &NodeClient,
    ) -> Option<NodeObservation> {
        let target = self.known(node)?;
        let key = target.public_key_hex.clone();
        let mut client = client.clone().with_target(target);
        match client.observe().await {
            Ok(response)
                if response.node_name == node.name
                    && response
                        .protocol_version
                        .is_none_or(|v| v.major == proto::protocol::MAJOR) =>
            {
                if let Some(speaks) = response.protocol_version {
                    self.note_version(&node.name, speaks);
                }
                self.usage.record(&node.name, &response);
                Some(crate::observe::from_wire(key, response))
            }
            _ => {
                self.forget(node);
                None
            }
        }
    }
}

impl NodeApi for GrpcNodes {
    /// The node's observation. A fresh connection each time (observation is how a
    /// node that came back is found; a `NAME@HOST:PORT` node shares its port's). The
    /// node's inventory (its name, key and protocol version: GetInventory, which reads
    /// the host's capabilities) is asked again only after a failed observation, or
    /// every [`INVENTORY_FRESH`] of a node whose Observe answer lacks its protocol
    /// version: at 1,000 simulated nodes it was most of an observation's cost on the
    /// node side.
    async fn observe(&self, node: &DesiredNode) -> Result<NodeObservation, String> {
        let mut client = connect(&node.address, self.signer.clone()).await?;
        if let Some(observation) = self.observe_known(node, &client).await {
            return Ok(observation);
        }
        let inventory = client
            .get_inventory()
            .await
            .map_err(|s| format!("inventory of {} refused: {}", node.address, s.message()))?;
        if inventory.node_name != node.name {
            return Err(format!(
                "the node at {} calls itself `{}`, not `{}`; check the address in the spec",
                node.address, inventory.node_name, node.name
            ));
        }
        let speaks = proto::protocol::of_inventory(&inventory);
        self.note_version(&node.name, speaks);
        if speaks.major != proto::protocol::MAJOR {
            return Err(format!(
                "node {} speaks cairn.node protocol {}, this controller {}: upgrade {} (nodes are upgraded before controllers); its objects are left alone",
                node.name,
                proto::protocol::display(&speaks),
                proto::protocol::display(&proto::protocol::current()),
                if speaks.major < proto::protocol::MAJOR {
                    "the node"
                } else {
                    "this controller"
                }
            ));
        }
        let response = client
            .observe()
            .await
            .map_err(|s| format!("observe of {} refused: {}", node.address, s.message()))?;
        self.usage.record(&node.name, &response);
        // The identity the node just accepted two signed calls for.
        if let Ok(target) = client.target().await {
            self.known
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(
                    node.address.clone(),
                    Known {
                        at: std::time::Instant::now(),
                        target,
                        reports_version: response.protocol_version.is_some(),
                    },
                );
        }
        Ok(crate::observe::from_wire(
            inventory.public_key_hex,
            response,
        ))
    }

    async fn apply(
        &self,
        node: &str,
        address: &str,
        request: v1::ApplyRequest,
    ) -> Result<v1::ApplyResponse, NodeError> {
        let mut client = self.client(node, address).await?;
        if unsupported(node, &proto::protocol::current(), &request).is_ok()
            && unsupported(node, &v1::ProtocolVersion::default(), &request).is_err()
        {
            // Only a request that needs a newer node than some: its node's version,
            // from its last inventory (asked now when this process has none).
            let known = self
                .versions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(node)
                .copied();
            let speaks = match known {
                Some(speaks) => speaks,
                None => proto::protocol::of_inventory(
                    &client
                        .get_inventory()
                        .await
                        .map_err(|s| refused(node, &s))?,
                ),
            };
            unsupported(node, &speaks, &request)?;
        }
        client.apply(request).await.map_err(|s| refused(node, &s))
    }

    /// One `ApplyBatch` when the node's last observation said it speaks 1.8 and no
    /// request is one sent alone ([`proto::forwards_grant`], or one an older node must
    /// be kept from, [`unsupported`]); else, or when the node answers UNIMPLEMENTED
    /// (nothing was carried out), one `Apply` each.
    async fn apply_batch(
        &self,
        node: &str,
        address: &str,
        requests: Vec<v1::ApplyRequest>,
    ) -> Vec<Result<v1::ApplyResponse, NodeError>> {
        let speaks = self
            .versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .copied();
        let batch = speaks.is_some_and(|speaks| {
            requests.len() > 1
                && requests.len() <= proto::APPLY_BATCH_MAX
                && proto::protocol::APPLY_BATCH.spoken_by(&speaks)
                && requests.iter().all(|request| {
                    request
                        .action
                        .as_ref()
                        .is_some_and(|action| !proto::forwards_grant(action))
                        && unsupported(node, &speaks, request).is_ok()
                })
        });
        if batch {
            let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
            let answered = match self.client(node, address).await {
                // A copy: an UNIMPLEMENTED answer sends them again one by one.
                Ok(mut client) => client.apply_batch(requests.clone()).await,
                Err(error) => return vec![Err(error); ids.len()],
            };
            match answered {
                Ok(results) => return batch_results(node, &ids, results),
                Err(status) if status.code() == tonic::Code::Unimplemented => {}
                Err(status) => return vec![Err(refused(node, &status)); ids.len()],
            }
        }
        one_by_one(self, node, address, requests).await
    }

    async fn get_outcome(
        &self,
        node: &str,
        address: &str,
        request_id: &str,
    ) -> Result<v1::GetOutcomeResponse, NodeError> {
        let mut client = self.client(node, address).await?;
        client
            .get_outcome(request_id)
            .await
            .map_err(|s| refused(node, &s))
    }
}

/// A connected, signing client for one node, with call timeouts.
/// A `NAME@HOST:PORT` address ([`routed`]) shares its port's one channel and names
/// NAME in every call.
pub async fn connect(address: &str, signer: RequestSigner) -> Result<NodeClient, String> {
    if let Some((name, at)) = routed(address) {
        let channel = shared_port::channel(at).await?;
        return Ok(NodeClient::from_channel(channel, signer).named(name));
    }
    let channel = connect_channel(address).await?;
    Ok(NodeClient::from_channel(channel, signer))
}

/// A node address `NAME@HOST:PORT`: node NAME behind a port that serves several
/// nodes (`cairn-node --simulate --simulate-one-port`), each call naming it in its
/// metadata ([`proto::client::NODE_NAME_METADATA`]). The name and the port's address.
pub fn routed(address: &str) -> Option<(&str, &str)> {
    let (name, at) = address.split_once('@')?;
    (!name.is_empty() && !at.is_empty()).then_some((name, at))
}

/// One HTTP/2 channel per shared port ([`routed`] addresses), made on first use and
/// shared by every node behind it, so 10,000 simulated nodes cost the controller a
/// connection per simulator process, not one (or two, with Watch) per node.
pub mod shared_port {
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock, Mutex, PoisonError};

    use tokio::sync::OnceCell;
    use tonic::transport::Channel;

    type Cells = HashMap<String, Arc<OnceCell<Channel>>>;
    static PORTS: LazyLock<Mutex<Cells>> = LazyLock::new(Mutex::default);

    /// The channel of the port at `at` (`HOST:PORT`), connected by its first caller
    /// while the others wait; after a failed connect the next caller tries again.
    pub async fn channel(at: &str) -> Result<Channel, String> {
        let cell = PORTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(at.to_owned())
            .or_default()
            .clone();
        cell.get_or_try_init(|| super::connect_channel(at))
            .await
            .cloned()
    }
}

/// A connected channel to `address`, with the call timeouts of [`connect`].
pub async fn connect_channel(address: &str) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(proto::client::endpoint_uri(address))
        .map_err(|e| format!("invalid address {address}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60));
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {address}: {}", error_chain(&e)))
}

/// An error and its sources on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod version_tests {
    use super::*;

    fn create_vm(dedicated_cpus: bool) -> v1::ApplyRequest {
        v1::ApplyRequest {
            request_id: "r1".into(),
            action: Some(v1::apply_request::Action::CreateVm(v1::CreateVm {
                name: "db".into(),
                sla: "pinned".into(),
                dedicated_cpus,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_pinned_vm_is_not_sent_to_a_node_before_1_6_and_the_error_names_vm_node_and_fixes() {
        let old = v1::ProtocolVersion { major: 1, minor: 5 };
        let Err(NodeError::Unsupported { node, message }) =
            unsupported("lab-1", &old, &create_vm(true))
        else {
            panic!("a pinned VM for a 1.5 node is refused");
        };
        assert_eq!(node, "lab-1");
        for part in [
            "vm db needs dedicated CPUs",
            "node lab-1 speaks cairn.node protocol 1.5",
            "Upgrade cairn-node on lab-1 to 1.6 or later",
            "place vm db on a node that speaks it",
            "remove cpu-pinning from its sla-profile `pinned`",
        ] {
            assert!(message.contains(part), "{part:?} in {message}");
        }
        // The same VM unpinned goes to a 1.5 node; the pinned one to a 1.6 node.
        assert_eq!(unsupported("lab-1", &old, &create_vm(false)), Ok(()));
        assert_eq!(
            unsupported("lab-1", &proto::protocol::current(), &create_vm(true)),
            Ok(())
        );
        // Other actions are not gated.
        let start = v1::ApplyRequest {
            request_id: "r2".into(),
            action: Some(v1::apply_request::Action::StartVm(v1::StartVm {
                name: "db".into(),
            })),
        };
        assert_eq!(unsupported("lab-1", &old, &start), Ok(()));
    }
}
