//! What a node's networking can do, for the agent's Inventory and status.

use serde::Serialize;

use crate::bond::{BondCapability, detect_bonding};
use crate::netns::{NetNs, netns_capability};

/// Networking capabilities of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInventory {
    /// Node label.
    pub node: String,
    /// Network namespaces usable (root, `CONFIG_NET_NS`): needed by the dev cluster.
    pub netns_available: bool,
    /// Why not, when unavailable.
    pub netns_reason: Option<String>,
    /// Bond backend and why; `None` with the error text in `bonding_error`.
    pub bonding: Option<BondCapability>,
    /// Why bonding could not be detected.
    pub bonding_error: Option<String>,
    /// `tc` version line, `None` when the iproute2 `tc` binary is missing
    /// (then QoS changes are refused).
    pub tc: Option<String>,
    /// `/dev/net/tun` present (VM taps).
    pub tun: bool,
}

/// Collects the node's networking capabilities.
pub fn inventory(ns: &NetNs) -> NetworkInventory {
    let netns = netns_capability();
    let bonding = detect_bonding(ns);
    let tc = std::process::Command::new("tc")
        .arg("-V")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    NetworkInventory {
        node: ns.node().to_owned(),
        netns_available: netns.is_ok(),
        netns_reason: netns.err(),
        bonding_error: bonding.as_ref().err().map(ToString::to_string),
        bonding: bonding.ok(),
        tc,
        tun: std::path::Path::new("/dev/net/tun").exists(),
    }
}
