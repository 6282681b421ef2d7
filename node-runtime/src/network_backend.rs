//! The network seam: how the node makes and reads back bonds and VM NICs.
//!
//! [`Bonds`](crate::bonds::Bonds) keeps the definitions, refusals, events and
//! failover monitors; a [`NetworkBackend`] only touches devices. [`HostNetwork`] is
//! the real one (netlink and `tc` in the node's namespace, the `network` crate);
//! `cairn-node --simulate` puts a simulated one behind the same calls
//! (`crate::simulate`), which never touches the host's network.

use std::collections::BTreeMap;
use std::fmt::Debug;

use network::{BondBackend, BondSpec, NetNs, NetworkError, bond::BondCapability};
use proto::v1::{self, BondStatus, VmNicStatus};
use tonic::Status;

use crate::vm_nics::VmNics;

/// The operations of a network backend. Every method may block (netlink): call them
/// off the async runtime.
pub trait NetworkBackend: Send + Sync + Debug {
    /// Why this process cannot change the network of `netns`, if it cannot.
    fn unavailable(&self, netns: &NetNs) -> Option<String>;
    /// Whether its calls block (netlink, sysfs): callers then run them on tokio's
    /// blocking pool. A simulated network answers from memory, inline.
    fn blocks(&self) -> bool {
        true
    }
    /// Which bond implementation this kernel gets, and why.
    fn bonding(&self, netns: &NetNs) -> Result<BondCapability, NetworkError>;
    /// Creates or converges a bond; returns the implementation used.
    fn apply_bond(&self, netns: &NetNs, spec: &BondSpec) -> Result<BondBackend, NetworkError>;
    /// Removes a bond (missing is fine).
    fn remove_bond(&self, netns: &NetNs, name: &str) -> Result<(), NetworkError>;
    /// Reads a bond back and compares it with its definition.
    fn observe_bond(&self, netns: &NetNs, name: &str, bond: &v1::ApplyBond) -> BondStatus;
    /// Makes (or repairs) a VM's NIC taps on their tenant bridges.
    fn ensure_vm_nics(
        &self,
        netns: &NetNs,
        vm: &str,
        tenant: &str,
        nics: &[v1::VmNic],
    ) -> Result<(), Status>;
    /// Removes a VM's `count` NIC taps.
    fn remove_vm_nics(&self, netns: &NetNs, vm: &str, count: usize);
    /// The status of every NIC of `vms`; `refusal` says why nothing is made.
    fn vm_nic_statuses(
        &self,
        netns: &NetNs,
        refusal: Option<&str>,
        vms: &[VmNics<'_>],
    ) -> BTreeMap<String, Vec<VmNicStatus>>;
    /// Whether devices are the host's (then fallback bonds get failover monitors).
    fn is_host(&self) -> bool {
        true
    }
}

/// The real network: netlink and `tc` in the node's namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostNetwork;

impl NetworkBackend for HostNetwork {
    fn unavailable(&self, netns: &NetNs) -> Option<String> {
        crate::bonds::network_unavailable(netns)
    }

    fn bonding(&self, netns: &NetNs) -> Result<BondCapability, NetworkError> {
        network::detect_bonding(netns)
    }

    fn apply_bond(&self, netns: &NetNs, spec: &BondSpec) -> Result<BondBackend, NetworkError> {
        network::apply_bond(netns, spec).map(|report| report.backend)
    }

    fn remove_bond(&self, netns: &NetNs, name: &str) -> Result<(), NetworkError> {
        network::remove_bond(netns, name)
    }

    fn observe_bond(&self, netns: &NetNs, name: &str, bond: &v1::ApplyBond) -> BondStatus {
        crate::bonds::observe_one(netns, name, bond)
    }

    fn ensure_vm_nics(
        &self,
        netns: &NetNs,
        vm: &str,
        tenant: &str,
        nics: &[v1::VmNic],
    ) -> Result<(), Status> {
        crate::vm_nics::ensure(netns, vm, tenant, nics)
    }

    fn remove_vm_nics(&self, netns: &NetNs, vm: &str, count: usize) {
        crate::vm_nics::remove(netns, vm, count);
    }

    fn vm_nic_statuses(
        &self,
        netns: &NetNs,
        refusal: Option<&str>,
        vms: &[VmNics<'_>],
    ) -> BTreeMap<String, Vec<VmNicStatus>> {
        crate::vm_nics::statuses(netns, refusal, vms)
    }
}
