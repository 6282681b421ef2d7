//! Shared fixture: a switch namespace, a node namespace with two veth NICs,
//! and a peer namespace with one, all on the switch bridge.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use network::dev_cluster::{self, DevNode};
use network::{BondMode, BondSpec, NetNs, TrafficClassSpec, TrafficKind};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Returns the reason to skip kernel tests, if any.
pub fn skip_reason() -> Option<String> {
    if let Err(why) = network::netns_capability() {
        return Some(why);
    }
    if std::process::Command::new("tc").arg("-V").output().is_err() {
        return Some("the iproute2 `tc` binary is not installed".to_owned());
    }
    None
}

/// Skips the calling test (with a printed reason) when kernel tests cannot run.
macro_rules! require_netns {
    () => {
        if let Some(why) = crate::common::skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}
pub(crate) use require_netns;

/// A throwaway topology, torn down on drop.
pub struct Topology {
    pub prefix: String,
    pub switch: NetNs,
    pub node: DevNode,
    pub peer: DevNode,
    pub node_ip: Ipv4Addr,
    pub peer_ip: Ipv4Addr,
}

impl Topology {
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("cnt{}x{n}-", std::process::id() % 100_000);
        let _ = dev_cluster::teardown(&prefix);
        let switch = dev_cluster::create_switch(&prefix).expect("create switch namespace");
        let node = dev_cluster::add_node(&switch, &format!("{prefix}node"), "node-a", 2)
            .expect("create node");
        let node_ip = Ipv4Addr::new(10, 77, 0, 1);
        let peer_ip = Ipv4Addr::new(10, 77, 0, 2);
        let peer =
            dev_cluster::add_endpoint(&switch, &format!("{prefix}peer"), IpAddr::V4(peer_ip), 24)
                .expect("create peer");
        Self {
            prefix,
            switch,
            node,
            peer,
            node_ip,
            peer_ip,
        }
    }

    pub fn node_ns(&self) -> NetNs {
        self.node.ns()
    }

    /// Applies `spec` and puts the node's address on the bond device.
    pub fn apply_with_address(&self, spec: &BondSpec) -> network::ApplyReport {
        let report = network::apply_bond(&self.node_ns(), spec).expect("apply bond");
        dev_cluster::add_address(&self.node_ns(), &spec.name, IpAddr::V4(self.node_ip), 24)
            .expect("add address");
        report
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = dev_cluster::teardown(&self.prefix) {
            eprintln!("teardown of {} failed: {e}", self.prefix);
        }
    }
}

pub const MBIT: u64 = 1_000_000;

/// An active-backup bond over nic0/nic1 at 100 Mbit/s with four classes.
pub fn spec() -> BondSpec {
    BondSpec {
        name: "data".to_owned(),
        mode: BondMode::ActiveBackup,
        members: vec!["nic0".to_owned(), "nic1".to_owned()],
        mtu: 1500,
        miimon: 50,
        classes: vec![
            TrafficClassSpec {
                name: TrafficKind::Storage,
                min_bps: 50 * MBIT,
                max_bps: None,
                weight: 4,
            },
            TrafficClassSpec {
                name: TrafficKind::Migration,
                min_bps: 10 * MBIT,
                max_bps: Some(50 * MBIT),
                weight: 1,
            },
            TrafficClassSpec {
                name: TrafficKind::Guest,
                min_bps: 30 * MBIT,
                max_bps: None,
                weight: 4,
            },
            TrafficClassSpec {
                name: TrafficKind::Management,
                min_bps: 5 * MBIT,
                max_bps: None,
                weight: 1,
            },
        ],
        capacity_bps: Some(100 * MBIT),
    }
}
