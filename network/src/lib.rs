//! Node networking for cairn: bonds with QoS traffic classes, per-VM taps on
//! tenant bridges, and the namespace plumbing of the dev cluster.
//!
//! What it does:
//! - [`apply_bond`] converges a [`BondSpec`] on a node's network namespace:
//!   the bond device, its members, MTU, and an HTB tree with one class per
//!   traffic type plus u32 DSCP filters steering traffic into them.
//!   [`observe_bond`] reads it all back over rtnetlink and lists [`Drift`].
//! - It detects whether the kernel has bonding ([`detect_bonding`]). With
//!   it, the device is a real Linux bond configured over netlink; without
//!   it, the bond is a bridge of the bond's name with only the live member
//!   attached, kept so by [`FailoverMonitor`] (active-backup only; other
//!   modes are refused with [`NetworkError::ModeUnsupported`]).
//! - [`tenant`] creates tenant bridges and persistent VM taps;
//!   [`dev_cluster`] builds and tears down the namespaces of `cairn dev up`.
//!
//! What it does not do: address or route management beyond what the dev
//! cluster needs, VLANs, and marking traffic (senders set DSCP; see
//! [`TrafficKind::dscp`]). It is synchronous and blocking (netlink requests,
//! `tc` processes, helper threads for namespaces): async callers use
//! `spawn_blocking`.
//!
//! Use from the node agent: report [`inventory()`] in Inventory; on a bond
//! request call [`apply_bond`]; when the report's backend is
//! [`BondBackend::BridgeFallback`], keep one [`FailoverMonitor`] per bond
//! running (restart it when the spec's members change, drop it on delete);
//! status comes from [`observe_bond`] (`drift` empty means converged).
//!
//! Invariants:
//! - Applying the same spec twice changes nothing the second time
//!   ([`ApplyReport::actions`] is empty).
//! - A spec the node cannot honour (mode, missing NIC, minimums above
//!   capacity) is refused before anything is changed; nothing is downgraded.
//! - Links and observation go over rtnetlink from Rust; only HTB/u32
//!   changes run the iproute2 `tc` binary (see [`qos`]).
#![warn(missing_docs)]

pub mod announce;
pub mod bond;
pub mod dev_cluster;
pub mod dhcp;
pub mod drift;
pub mod failover;
pub mod inventory;
pub mod netns;
pub mod nl;
pub mod overlay;
pub mod qos;
pub mod secgroup;
pub mod spec;
pub mod tenant;

pub use bond::{
    ApplyReport, BondBackend, BondCapability, KernelBondStep, ObservedBond, ObservedMember,
    apply_bond, check_bond, detect_bonding, observe_bond, plan_kernel_bond, remove_bond,
};
pub use drift::Drift;
pub use failover::{FailoverEvent, FailoverMonitor};
pub use inventory::{NetworkInventory, inventory};
pub use netns::{NetNs, NetnsError, netns_capability};
pub use nl::NlError;
pub use qos::TcError;
pub use spec::{
    BondMode, BondSpec, DEFAULT_MIIMON_MS, DEFAULT_MTU, SpecError, TrafficClassSpec, TrafficKind,
};

/// Errors of the network crate's public operations. Every message names the
/// node, and the bond or device where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The spec is invalid or does not fit the node.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The bond mode cannot be provided on this node.
    #[error(
        "node `{node}`, bond `{bond}`: mode {mode} is not available on this node: {reason}; \
         use mode active-backup on this node or run it on a kernel with the bonding driver"
    )]
    ModeUnsupported {
        /// Node.
        node: String,
        /// Bond.
        bond: String,
        /// Requested mode.
        mode: BondMode,
        /// Why.
        reason: String,
    },
    /// A member NIC does not exist on the node.
    #[error("node `{node}`, bond `{bond}`: member NIC `{nic}` does not exist on this node")]
    MemberMissing {
        /// Node.
        node: String,
        /// Bond.
        bond: String,
        /// NIC.
        nic: String,
    },
    /// A member's speed is unknown and the spec gives no capacity.
    #[error(
        "node `{node}`, bond `{bond}`: cannot read the link speed of `{nic}`; set capacity_bps in the bond spec"
    )]
    CapacityUnknown {
        /// Node.
        node: String,
        /// Bond.
        bond: String,
        /// NIC.
        nic: String,
    },
    /// A device of the wanted name exists with another kind.
    #[error("node `{node}`: device `{name}` exists as a {kind}; remove it or rename the bond")]
    DeviceConflict {
        /// Node.
        node: String,
        /// Device.
        name: String,
        /// Its kind.
        kind: String,
    },
    /// A netlink operation failed.
    #[error("node `{node}` ({netns}): {source}")]
    Netlink {
        /// Node.
        node: String,
        /// Namespace description.
        netns: String,
        /// Cause.
        #[source]
        source: NlError,
    },
    /// A `tc` command failed.
    #[error("node `{node}`, bond `{bond}`: {source}")]
    Tc {
        /// Node.
        node: String,
        /// Bond.
        bond: String,
        /// Cause.
        #[source]
        source: TcError,
    },
    /// Namespace handling failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A tap device could not be created.
    #[error("node `{node}`: cannot create tap `{tap}`: {source}")]
    Tap {
        /// Node.
        node: String,
        /// Tap.
        tap: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An announcement (gratuitous ARP or unsolicited NA) could not be sent.
    #[error("node `{node}`: cannot announce `{dev}` after failover: {source}")]
    Announce {
        /// Node.
        node: String,
        /// Device.
        dev: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Network namespaces are not available to this process.
    #[error(
        "node `{node}`: network namespaces are unavailable ({reason}); dev-cluster networking is refused"
    )]
    NetnsUnavailable {
        /// Node (or dev cluster) name.
        node: String,
        /// Why.
        reason: String,
    },
    /// A tenant network segment cannot be made as asked.
    #[error("node `{node}`, tenant `{tenant}`, network `{network}`: {problem}")]
    Segment {
        /// Node.
        node: String,
        /// Tenant.
        tenant: String,
        /// Network.
        network: String,
        /// What is wrong and what would be right.
        problem: String,
    },
    /// An `ip`, `bridge` or `nft` command failed.
    #[error("node `{node}`: `{command}` failed: {detail}")]
    Command {
        /// Node.
        node: String,
        /// The command line.
        command: String,
        /// Its error output.
        detail: String,
    },
    /// The failover monitor could not start.
    #[error("cannot start the failover monitor: {0}")]
    Monitor(String),
}

impl NetworkError {
    pub(crate) fn netlink(ns: &NetNs, source: NlError) -> Self {
        NetworkError::Netlink {
            node: ns.node().to_owned(),
            netns: ns.describe(),
            source,
        }
    }
}

/// FNV-1a, 64-bit: the stable hash behind deterministic device names (and the node's
/// cgroup names).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
