//! `cairn-node`: the gRPC agent that runs on every physical node of a cairn cloud.
//!
//! What it does: serves the `cairn.node.v1` contract (crate `proto`): `Inventory`,
//! `Observe`, `Apply` (idempotent by request id, recorded durably in redb),
//! `Watch` (events and heartbeats) and node-to-node `Replication`; authenticates
//! every call with ed25519 request signatures against trusted controller and peer
//! keys; keeps volumes in the `storage` volume store, replicated synchronously to peer
//! nodes; exports volumes over NBD to local clients of its own user (owner-only unix
//! sockets); runs each VM as a supervised `cairn-vmm` process.
//!
//! What it does not do: decide anything. Placement, ordering, healing and retries
//! are the reconciler's; the agent carries out one action at a time and reports.
//!
//! Invariants:
//! - an `ApplyRequest` whose request id has a recorded outcome is never carried out
//!   again; the recorded response is returned with `replayed = true`;
//! - a write to a replicated volume is acknowledged only after every copy holds it
//!   durably; a region that may differ between copies has a durable write intent
//!   until it is resynchronised;
//! - every refusal names the field or the object and the reason; nothing in request
//!   data can panic the agent;
//! - only controllers may call `Inventory`, `Observe`, `Apply` and `Watch`; peers
//!   may call `Replication`; gRPC reflection is open (it reveals only the schema).

#![warn(missing_docs)]

pub mod anchors;
pub mod bonds;
pub mod cgroups;
pub mod cpusets;
pub mod enroll;
pub mod events;
pub mod exports;
pub mod fencing;
pub mod guest_io;
pub mod hypervisor;
pub mod import;
pub mod inventory;
pub mod local_volumes;
pub mod metrics;
pub mod network_backend;
pub mod node;
pub mod operate;
pub mod quorum;
pub mod records;
pub mod remote_disk;
pub mod segments;
pub mod server;
pub mod service;
pub mod simulate;
pub mod trust;
pub mod validate;
pub mod vm_nics;
pub mod vms;
pub mod volumes;
pub mod watchdog;

/// Runs `f` on tokio's blocking pool when it `blocks` (a VMM socket, netlink), else
/// inline: the simulated backends answer from memory (`Hypervisor::blocks`,
/// `NetworkBackend::blocks`), and at 10,000 simulated nodes the hand-offs to the pool
/// were a quarter of a simulator's Observe.
pub async fn maybe_blocking<T: Send + 'static>(
    blocks: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if blocks {
        tokio::task::spawn_blocking(f).await
    } else {
        Ok(f())
    }
}

/// An error and every cause under it, one line: `what: why: why…`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
