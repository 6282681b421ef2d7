//! Helpers for `cairn dev up` / `cairn dev down`: each dev node lives in its
//! own network namespace whose "physical NICs" are veth pairs into a shared
//! switch namespace holding one bridge.
//!
//! Namespace names are `<prefix>sw` for the switch and whatever the caller
//! picks for nodes and endpoints (they should share `prefix`, so
//! [`teardown`] removes everything by prefix). Switch-side port names are
//! `p` + 8 hex digits of the namespace name + `-` + NIC index.

use std::net::IpAddr;

use serde::Serialize;

use crate::NetworkError;
use crate::netns::{NetNs, create_netns, delete_netns, list_netns};
use crate::nl::Rtnl;

/// Name of the bridge inside the switch namespace.
pub const SWITCH_BRIDGE: &str = "sw0";

/// A dev node's namespace and its NIC names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevNode {
    /// Namespace name.
    pub netns: String,
    /// Node name (for messages).
    pub node: String,
    /// NIC names inside the node namespace (`nic0`, `nic1`, ...).
    pub nics: Vec<String>,
    /// Switch-side peer of each NIC, in the switch namespace.
    pub switch_ports: Vec<String>,
}

impl DevNode {
    /// The namespace handle.
    pub fn ns(&self) -> NetNs {
        NetNs::named_for_node(self.netns.clone(), self.node.clone())
    }
}

/// The switch namespace name for `prefix`.
pub fn switch_netns_name(prefix: &str) -> String {
    format!("{prefix}sw")
}

/// Creates (idempotently) the switch namespace `<prefix>sw` with bridge
/// [`SWITCH_BRIDGE`] up.
pub fn create_switch(prefix: &str) -> Result<NetNs, NetworkError> {
    require_netns(prefix)?;
    let ns = create_netns(&switch_netns_name(prefix))?;
    let nl = |e| NetworkError::netlink(&ns, e);
    let mut rtnl = Rtnl::open(&ns).map_err(nl)?;
    if rtnl.link(SWITCH_BRIDGE).map_err(nl)?.is_none() {
        rtnl.create_bridge(SWITCH_BRIDGE, None, None).map_err(nl)?;
    }
    rtnl.set_link_up_by_name(SWITCH_BRIDGE, true).map_err(nl)?;
    Ok(ns)
}

/// Refuses dev-cluster networking, with the reason, when this process cannot
/// create network namespaces. Never faked: there is no "pretend" mode.
pub fn require_netns(who: &str) -> Result<(), NetworkError> {
    crate::netns::netns_capability().map_err(|reason| NetworkError::NetnsUnavailable {
        node: who.to_owned(),
        reason,
    })
}

/// Name of a switch port for namespace `netns`, NIC `i`.
pub fn switch_port_name(netns: &str, i: usize) -> String {
    format!("p{:08x}-{i}", crate::fnv1a(netns.as_bytes()) as u32)
}

/// Creates (idempotently) a node namespace with `n_nics` veth NICs named
/// `nic0..` plugged into the switch bridge, all up.
pub fn add_node(
    switch: &NetNs,
    netns: &str,
    node: &str,
    n_nics: usize,
) -> Result<DevNode, NetworkError> {
    let nics: Vec<String> = (0..n_nics).map(|i| format!("nic{i}")).collect();
    add_node_with_nics(switch, netns, node, &nics)
}

/// Creates (idempotently) a node namespace whose NICs have the given names
/// (e.g. the spec's bond members `ens1f0`, `ens1f1`), each a veth plugged
/// into the switch bridge, all up.
pub fn add_node_with_nics(
    switch: &NetNs,
    netns: &str,
    node: &str,
    nic_names: &[String],
) -> Result<DevNode, NetworkError> {
    require_netns(node)?;
    for nic in nic_names {
        if !crate::spec::valid_ifname(nic) {
            return Err(NetworkError::Spec(crate::SpecError {
                node: node.to_owned(),
                bond: String::new(),
                problem: format!("NIC name `{nic}` is not a valid interface name"),
            }));
        }
    }
    let ns = create_netns(netns)?;
    let ns = NetNs::named_for_node(ns.name().unwrap_or(netns).to_owned(), node.to_owned());
    let mut sw = Rtnl::open(switch).map_err(|e| NetworkError::netlink(switch, e))?;
    let mut local = Rtnl::open(&ns).map_err(|e| NetworkError::netlink(&ns, e))?;
    let bridge = sw
        .require_link(SWITCH_BRIDGE)
        .map_err(|e| NetworkError::netlink(switch, e))?;
    let mut nics = Vec::new();
    let mut switch_ports = Vec::new();
    for (i, nic) in nic_names.iter().enumerate() {
        let port = switch_port_name(netns, i);
        let swe = |e| NetworkError::netlink(switch, e);
        if local
            .link(nic)
            .map_err(|e| NetworkError::netlink(&ns, e))?
            .is_none()
        {
            sw.delete_link(&port).map_err(swe)?;
            sw.create_veth(&port, nic, Some(&ns)).map_err(swe)?;
        }
        let p = sw.require_link(&port).map_err(swe)?;
        if p.controller != Some(bridge.index) {
            sw.set_controller(p.index, bridge.index).map_err(swe)?;
        }
        sw.set_link_up(p.index, true).map_err(swe)?;
        local
            .set_link_up_by_name(nic, true)
            .map_err(|e| NetworkError::netlink(&ns, e))?;
        nics.push(nic.clone());
        switch_ports.push(port);
    }
    Ok(DevNode {
        netns: netns.to_owned(),
        node: node.to_owned(),
        nics,
        switch_ports,
    })
}

/// Creates a traffic endpoint namespace with one NIC `eth0` into the switch,
/// carrying `addr/prefix_len` (a stand-in for a peer host in tests and demos).
pub fn add_endpoint(
    switch: &NetNs,
    netns: &str,
    addr: IpAddr,
    prefix_len: u8,
) -> Result<DevNode, NetworkError> {
    let node = add_node(switch, netns, netns, 1)?;
    let ns = node.ns();
    let mut rtnl = Rtnl::open(&ns).map_err(|e| NetworkError::netlink(&ns, e))?;
    let l = rtnl
        .require_link("nic0")
        .map_err(|e| NetworkError::netlink(&ns, e))?;
    rtnl.add_address(l.index, addr, prefix_len)
        .map_err(|e| NetworkError::netlink(&ns, e))?;
    Ok(node)
}

/// Adds `addr/prefix_len` to `dev` in `ns` (e.g. the bond device of a node).
pub fn add_address(
    ns: &NetNs,
    dev: &str,
    addr: IpAddr,
    prefix_len: u8,
) -> Result<(), NetworkError> {
    let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
    let l = rtnl
        .require_link(dev)
        .map_err(|e| NetworkError::netlink(ns, e))?;
    rtnl.add_address(l.index, addr, prefix_len)
        .map_err(|e| NetworkError::netlink(ns, e))
}

/// Sets a link up or down in `ns` (the test's "cable pull").
pub fn set_link_up(ns: &NetNs, dev: &str, up: bool) -> Result<(), NetworkError> {
    let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
    rtnl.set_link_up_by_name(dev, up)
        .map_err(|e| NetworkError::netlink(ns, e))
}

/// Deletes every namespace whose name starts with `prefix` (switch, nodes,
/// endpoints); their veths, bridges and taps go with them. Returns the names
/// deleted. One namespace that cannot be deleted does not keep the others:
/// all are tried, then the first failure is returned.
pub fn teardown(prefix: &str) -> Result<Vec<String>, NetworkError> {
    let names = list_netns(prefix);
    let mut first_failure = None;
    for n in &names {
        if let Err(e) = delete_netns(n) {
            first_failure.get_or_insert(e);
        }
    }
    match first_failure {
        Some(e) => Err(e.into()),
        None => Ok(names),
    }
}

/// A dev cluster: the switch namespace and one namespace per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevCluster {
    /// Prefix of every namespace of this cluster.
    pub prefix: String,
    /// Switch namespace name.
    pub switch: String,
    /// Nodes in the order given.
    pub nodes: Vec<DevNode>,
}

impl DevCluster {
    /// The switch namespace handle.
    pub fn switch_ns(&self) -> NetNs {
        NetNs::named(self.switch.clone())
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&DevNode> {
        self.nodes.iter().find(|n| n.node == name)
    }
}

/// Builds (idempotently) a dev cluster: switch `<prefix>sw`, and for each
/// `(node, nic names)` a namespace `<prefix><node>` with those NICs (use the
/// bond members of the node's site, e.g. `ens1f0`, `ens1f1`).
pub fn up(prefix: &str, nodes: &[(&str, &[&str])]) -> Result<DevCluster, NetworkError> {
    let switch = create_switch(prefix)?;
    let mut out = Vec::new();
    for (node, nics) in nodes {
        let nics: Vec<String> = nics.iter().map(|n| (*n).to_owned()).collect();
        out.push(add_node_with_nics(
            &switch,
            &format!("{prefix}{node}"),
            node,
            &nics,
        )?);
    }
    Ok(DevCluster {
        prefix: prefix.to_owned(),
        switch: switch_netns_name(prefix),
        nodes: out,
    })
}

/// Removes everything [`up`] created (alias of [`teardown`]).
pub fn down(prefix: &str) -> Result<Vec<String>, NetworkError> {
    teardown(prefix)
}
