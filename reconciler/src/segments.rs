//! Tenant network segments (issue 19): per node, what `ApplyNetworkSegment` should
//! make there, built from the placement (`networks`: VNI, member nodes, gateway,
//! CIDR, external; `addresses`: each NIC's address, whose VM runs on a node) and the
//! model's security groups.
//!
//! - A tenant's networks are all made on every node that hosts any of that tenant's
//!   VMs (the union of its networks' `nodes`): the tenant's router namespace routes
//!   between its networks on each node, so a network with no VM on a node still
//!   needs its leg there.
//! - `remotes`: every NIC on the network whose VM runs on another node, with the
//!   MAC the node gives it ([`default_mac`], the same function as
//!   `vmm::devices::virtio_net::default_mac`) and that node's VTEP: one list per
//!   network that every node's segment shares and reads without its own NICs
//!   ([`Remotes`]).
//! - `guarded`: every NIC of the tenant's placed VMs that lists security groups,
//!   with the rules resolved (the node enforces those of VMs it runs and admits the
//!   others' traffic in the router namespace).
//! - VTEP (underlay address): the IPv4 host of the node's `address` (the address the
//!   controller reaches its cairn-node at). The spec has no underlay address of its
//!   own; on the dev cluster and on a host whose management address sits on its
//!   bond that is the right one. A node whose address is a host name gets no
//!   segment, nor does a node that runs its network in a named namespace
//!   (Observe's `networking.netns`: the dev cluster, whose gRPC stays on the
//!   host's loopback, so the address is not in the node's namespace and the node
//!   would refuse the VTEP). An underlay address per node in the spec would lift
//!   both limits.
//! - MTU: the site's guest bond MTU minus the 50 bytes of VXLAN ([`segment_mtus`];
//!   [`SEGMENT_MTU`], 1450, for a 1500 bond or a site without bonds), sent
//!   explicitly, and every VM NIC is created with its node's segment MTU
//!   (`NodeAction::CreateVm::nic_mtu`), so the tap and the segment agree on the
//!   bridge's MTU. The node refuses a segment MTU its underlay device cannot carry.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use compiler::Model;
use serde::{Deserialize, Serialize};

use crate::desired::{DesiredNode, Placement};

/// The MTU of every tenant network segment and of every VM NIC: a 1500-byte
/// underlay minus VXLAN's 50 bytes (the node refuses more than its underlay allows).
pub const SEGMENT_MTU: u32 = 1450;

/// Bytes of VXLAN encapsulation over IPv4 (outer IP 20, UDP 8, VXLAN 8, inner
/// Ethernet 14): the segment MTU is the underlay's minus this.
pub const VXLAN_OVERHEAD: u32 = 50;

/// A NIC on another node: its frames go to that node's VTEP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SegmentRemote {
    /// The VM.
    pub vm: String,
    /// Its MAC on this network.
    pub mac: String,
    /// Its IPv4 address (empty: none).
    pub ipv4: String,
    /// The VTEP of the node it runs on.
    pub vtep: String,
    /// While the VM migrates live, the VTEP of the node it runs on until the
    /// commit: its frames go to both (make before break). Empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub also_vtep: String,
}

/// A NIC of a network and the node its VM runs on: one list of these per network,
/// shared by the segments of all its nodes ([`Remotes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMember {
    /// The node the NIC's VM runs on (several simulated nodes can share one
    /// address, and so one VTEP: a node's own NICs are left out by name).
    pub node: String,
    /// The NIC as the other nodes' segments list it.
    pub remote: SegmentRemote,
}

/// A segment's remote NICs: the network's member list without the NICs on the
/// segment's own node. The list is shared (an `Arc`) by the segments of every node
/// of the network and filtered when read: a copy per node was nodes × members
/// (gigabytes at 1,000 nodes / 10,000 VMs, out of memory at 10,000 / 100,000).
///
/// On the wire, in the plan's JSON and in its schema it is the filtered list, a
/// plain `Vec<SegmentRemote>`; equality compares the filtered lists.
#[derive(Debug, Clone)]
pub struct Remotes {
    members: std::sync::Arc<[SegmentMember]>,
    /// The node whose NICs are left out (None: none, a list read or made whole).
    except: Option<String>,
    /// The filtered list's length, counted once.
    len: usize,
}

impl Remotes {
    /// The NICs of `members` not on node `except`, sharing the list.
    pub fn excluding(members: std::sync::Arc<[SegmentMember]>, except: &str) -> Self {
        let len = members.iter().filter(|m| m.node != except).count();
        Self {
            members,
            except: Some(except.to_owned()),
            len,
        }
    }

    /// The remote NICs, in the member list's order.
    pub fn iter(&self) -> impl Iterator<Item = &SegmentRemote> {
        self.members
            .iter()
            .filter(|m| self.except.as_deref() != Some(m.node.as_str()))
            .map(|m| &m.remote)
    }

    /// How many remote NICs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for Remotes {
    fn default() -> Self {
        Vec::new().into()
    }
}

/// A list of its own (read from JSON, or a changed copy): nothing left out.
impl From<Vec<SegmentRemote>> for Remotes {
    fn from(remotes: Vec<SegmentRemote>) -> Self {
        let len = remotes.len();
        Self {
            members: remotes
                .into_iter()
                .map(|remote| SegmentMember {
                    node: String::new(),
                    remote,
                })
                .collect(),
            except: None,
            len,
        }
    }
}

impl<'a> IntoIterator for &'a Remotes {
    type Item = &'a SegmentRemote;
    type IntoIter = Box<dyn Iterator<Item = &'a SegmentRemote> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl PartialEq for Remotes {
    fn eq(&self, other: &Self) -> bool {
        if std::sync::Arc::ptr_eq(&self.members, &other.members) && self.except == other.except {
            return true;
        }
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for Remotes {}

impl Serialize for Remotes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Remotes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<SegmentRemote>::deserialize(deserializer).map(Self::from)
    }
}

/// The schema of the list it is written as.
impl schemars::JsonSchema for Remotes {
    fn inline_schema() -> bool {
        <Vec<SegmentRemote>>::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        <Vec<SegmentRemote>>::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        <Vec<SegmentRemote>>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <Vec<SegmentRemote>>::json_schema(generator)
    }
}

/// One resolved allow rule of a security group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SegmentRule {
    /// The group.
    pub group: String,
    /// Source prefix.
    pub from_cidr: String,
    /// Destination prefix (empty: any address of the NIC).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub to_cidr: String,
    /// `tcp`, `udp`, `icmp` or `any`.
    pub proto: String,
    /// First destination port (0: all).
    #[serde(default)]
    pub port: u32,
    /// Last destination port (0: = port).
    #[serde(default)]
    pub port_end: u32,
}

/// A NIC of the tenant that lists security groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GuardedNic {
    /// The VM.
    pub vm: String,
    /// Index of the NIC in the VM's definition.
    pub nic: u32,
    /// Its network.
    pub network: String,
    /// Its address (empty: none).
    pub ipv4: String,
    /// The groups it lists.
    pub groups: Vec<String>,
    /// Their rules.
    pub allow: Vec<SegmentRule>,
}

/// What one node should have of one tenant network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DesiredSegment {
    /// Tenant.
    pub tenant: String,
    /// Network.
    pub network: String,
    /// VXLAN network identifier (from the placement).
    pub vni: u32,
    /// Segment MTU.
    pub mtu: u32,
    /// This node's VTEP.
    pub local_vtep: String,
    /// Gateway (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    /// The network's prefix length.
    pub prefix_len: u32,
    /// NICs of this network on other nodes.
    pub remotes: Remotes,
    // One list per tenant, shared by the segments of all its nodes (at 100,000 VMs a
    // copy per node was gigabytes).
    /// The tenant's NICs with security groups.
    #[serde(default, skip_serializing_if = "no_guarded")]
    pub guarded: std::sync::Arc<[GuardedNic]>,
    /// Egress through the node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
    /// The underlay subnet's prefix length when the node makes its underlay address
    /// (`local_vtep`) itself, from the spec's `underlay=` (0: the node's address is
    /// the VTEP and must already be on a device).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub underlay_prefix_len: u32,
    /// The bond that carries the guest class, where that address is made.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub underlay_device: String,
    /// The network's IPv6 gateway (`PREFIX::1` of its `ipv6=` /64; empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv6_gateway: String,
}

/// The IPv6 gateway of a network's `ipv6=` /64: its `::1` (empty without one).
pub fn ipv6_gateway(network: &compiler::model::Network) -> String {
    network
        .ipv6
        .as_deref()
        .and_then(|p| p.split_once('/')?.0.parse::<std::net::Ipv6Addr>().ok())
        .map(|p| {
            let mut o = p.octets();
            o[15] = 1;
            std::net::Ipv6Addr::from(o).to_string()
        })
        .unwrap_or_default()
}

fn no_guarded(guarded: &std::sync::Arc<[GuardedNic]>) -> bool {
    guarded.is_empty()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl DesiredSegment {
    /// `tenant/network`, the key of a segment on a node.
    pub fn key(&self) -> String {
        segment_key(&self.tenant, &self.network)
    }

    /// The forwarding entries as the node reports them (`MAC -> VTEP`).
    pub fn fdb(&self) -> BTreeSet<String> {
        self.fdb_pairs()
            .map(|(mac, vtep)| format!("{mac} -> {vtep}"))
            .collect()
    }

    /// The forwarding entries as `(MAC, VTEP)` pairs, the strings of [`Self::fdb`]
    /// without making them (a plan compares millions at 10,000 nodes).
    pub fn fdb_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.remotes.iter().flat_map(|r| {
            // A migrating NIC's frames go to both nodes through the VXLAN
            // device's all-zero entry (`network::overlay::FLOOD_MAC`).
            if r.also_vtep.is_empty() {
                [Some((r.mac.as_str(), r.vtep.as_str())), None]
            } else {
                [
                    Some((FLOOD_MAC, r.vtep.as_str())),
                    Some((FLOOD_MAC, r.also_vtep.as_str())),
                ]
            }
            .into_iter()
            .flatten()
        })
    }
}

/// The all-zero MAC of a VXLAN device's flood entry, which names both nodes of a
/// live migration (the node crate's `network::overlay::FLOOD_MAC`).
pub const FLOOD_MAC: &str = "00:00:00:00:00:00";

/// `tenant/network`.
pub fn segment_key(tenant: &str, network: &str) -> String {
    format!("{tenant}/{network}")
}

/// The MAC a node gives NIC `index` of `vm` (FNV-1a over the name, a NUL and the
/// index as 8 little-endian bytes, under the locally administered prefix
/// 02:ca): the same function as `vmm::devices::virtio_net::default_mac`, which the
/// reconciler cannot link.
pub fn default_mac(vm: &str, index: usize) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in vm.bytes().chain([0]).chain((index as u64).to_le_bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let [a, b, c, d] = hash.to_be_bytes();
    format!("02:ca:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// A node's underlay as the spec gives it: the VTEP address and, when the node makes
/// it itself (`underlay="A.B.C.D/N"`), the prefix length and the bond that carries
/// the guest class (the site's bond with a `guest` traffic class, else its first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// VTEP address.
    pub vtep: String,
    /// Prefix length (0: the address is already on a device).
    pub prefix_len: u32,
    /// The bond the node puts it on (empty with prefix 0).
    pub device: String,
}

/// Each node's underlay from the model: `underlay=` when given, else the IPv4 host
/// of its address ([`vtep_of`]); a node with neither is left out.
pub fn underlays(
    model: &Model,
    nodes: &BTreeMap<String, DesiredNode>,
) -> BTreeMap<String, Underlay> {
    let mut out = BTreeMap::new();
    for site in &model.sites {
        let device = site
            .bonds
            .iter()
            .find(|b| {
                b.traffic
                    .iter()
                    .any(|t| t.name == compiler::spec::TrafficKind::Guest)
            })
            .or(site.bonds.first())
            .map(|b| b.name.clone())
            .unwrap_or_default();
        for node in &site.nodes {
            let given = node.underlay.as_deref().and_then(|u| {
                let (addr, len) = u.split_once('/')?;
                Some(Underlay {
                    vtep: addr.parse::<Ipv4Addr>().ok()?.to_string(),
                    prefix_len: len.parse().ok()?,
                    device: device.clone(),
                })
            });
            let underlay = given.or_else(|| {
                Some(Underlay {
                    vtep: vtep_of(nodes.get(&node.name)?)?,
                    prefix_len: 0,
                    device: String::new(),
                })
            });
            if let Some(u) = underlay
                && nodes.contains_key(&node.name)
            {
                out.insert(node.name.clone(), u);
            }
        }
    }
    out
}

/// Each site's segment MTU: the MTU of the bond that carries the guest class (the
/// site's first bond if none does) minus VXLAN's 50 bytes; [`SEGMENT_MTU`] for a
/// site without bonds (or a bond without an MTU).
pub fn segment_mtus(model: &Model) -> BTreeMap<&str, u32> {
    model
        .sites
        .iter()
        .map(|site| {
            let bond = site
                .bonds
                .iter()
                .find(|b| {
                    b.traffic
                        .iter()
                        .any(|t| t.name == compiler::spec::TrafficKind::Guest)
                })
                .or(site.bonds.first());
            let mtu = bond
                .map(|b| b.mtu)
                .filter(|m| *m > VXLAN_OVERHEAD)
                .map_or(SEGMENT_MTU, |m| m - VXLAN_OVERHEAD);
            (site.name.as_str(), mtu)
        })
        .collect()
}

/// A node's VTEP: the IPv4 host of its `host:port` address; None for a host name.
pub fn vtep_of(node: &DesiredNode) -> Option<String> {
    let host = node
        .address
        .rsplit_once(':')
        .map_or(node.address.as_str(), |(h, _)| h);
    host.parse::<Ipv4Addr>().ok().map(|a| a.to_string())
}

/// Per node, the segments it should have, by `tenant/network`.
pub fn desired_segments(
    model: &Model,
    nodes: &BTreeMap<String, DesiredNode>,
    placement: &Placement,
) -> BTreeMap<String, BTreeMap<String, std::sync::Arc<DesiredSegment>>> {
    let vm_node: BTreeMap<&str, &str> = placement
        .vms
        .iter()
        .map(|v| (v.name.as_str(), v.node.as_str()))
        .collect();
    let underlays = underlays(model, nodes);
    let mtus = segment_mtus(model);
    let vtep = |node: &str| underlays.get(node).map(|u| u.vtep.clone());
    // Indexes made once: each is a scan of the whole cloud, and looking them up
    // per tenant, network, node or NIC made this quadratic (5 s and 7 GB at 1,000
    // nodes / 10,000 VMs; out of memory at 10,000 / 100,000).
    let mut addresses: BTreeMap<(&str, &str), Vec<&compiler::ipam::NicAddress>> = BTreeMap::new();
    let mut nic_address: BTreeMap<(&str, u32), &str> = BTreeMap::new();
    for a in &placement.addresses {
        addresses
            .entry((a.tenant.as_str(), a.network.as_str()))
            .or_default()
            .push(a);
        nic_address
            .entry((a.vm.as_str(), a.nic))
            .or_insert(a.address.as_str());
    }
    let mut tenant_vms: BTreeMap<&str, Vec<&compiler::model::Vm>> = BTreeMap::new();
    for vm in &model.vms {
        tenant_vms.entry(vm.tenant.as_str()).or_default().push(vm);
    }
    let mut tenant_networks: BTreeMap<&str, Vec<&compiler::ipam::NetworkPlacement>> =
        BTreeMap::new();
    for n in &placement.networks {
        tenant_networks
            .entry(n.tenant.as_str())
            .or_default()
            .push(n);
    }
    let mut out: BTreeMap<String, BTreeMap<String, std::sync::Arc<DesiredSegment>>> =
        BTreeMap::new();
    for tenant in &model.tenants {
        let networks: Vec<_> = tenant_networks
            .get(tenant.name.as_str())
            .into_iter()
            .flatten()
            // IPv6 networks have no segment yet (IPAM and the overlay are IPv4).
            .filter(|n| !n.cidr.contains(':'))
            .collect();
        let tenant_nodes: BTreeSet<&str> = networks
            .iter()
            .flat_map(|n| n.nodes.iter().map(String::as_str))
            .filter(|n| nodes.contains_key(*n))
            .collect();
        let mut guarded = vec![];
        for vm in tenant_vms.get(tenant.name.as_str()).into_iter().flatten() {
            if !vm_node.contains_key(vm.name.as_str()) {
                continue;
            }
            for (i, nic) in vm.nics.iter().enumerate() {
                if nic.security_groups.is_empty() {
                    continue;
                }
                let allow = nic
                    .security_groups
                    .iter()
                    .filter_map(|g| tenant.security_groups.iter().find(|s| &s.name == g))
                    .flat_map(|g| {
                        g.allow.iter().flat_map(|r| {
                            let rule = |from_cidr: String| SegmentRule {
                                group: g.name.clone(),
                                from_cidr,
                                to_cidr: r.to_cidr.clone().unwrap_or_default(),
                                proto: r.proto.to_string(),
                                port: r.port.unwrap_or(0),
                                port_end: r.port_end.unwrap_or(0),
                            };
                            // A source network with an IPv6 /64 is admitted on it too
                            // (a `to` narrows IPv4 only, so the IPv6 rule has none).
                            let v6 = tenant
                                .networks
                                .iter()
                                .find(|n| n.name == r.from)
                                .and_then(|n| n.ipv6.clone())
                                .map(|p| SegmentRule {
                                    to_cidr: String::new(),
                                    ..rule(p)
                                });
                            std::iter::once(rule(r.from_cidr.clone())).chain(v6)
                        })
                    })
                    .collect();
                guarded.push(GuardedNic {
                    vm: vm.name.clone(),
                    nic: i as u32,
                    network: nic.network.clone(),
                    ipv4: nic_address
                        .get(&(vm.name.as_str(), i as u32))
                        .copied()
                        .unwrap_or_default()
                        .to_owned(),
                    groups: nic.security_groups.clone(),
                    allow,
                });
            }
        }
        let guarded: std::sync::Arc<[GuardedNic]> = guarded.into();
        for network in &networks {
            let prefix_len = network
                .cidr
                .rsplit_once('/')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(32);
            // The network's NICs with their nodes and VTEPs, once: each node's
            // segment shares this list and reads it without its own NICs.
            let members: std::sync::Arc<[SegmentMember]> = addresses
                .get(&(tenant.name.as_str(), network.name.as_str()))
                .into_iter()
                .flatten()
                .filter_map(|a| {
                    let there = *vm_node.get(a.vm.as_str())?;
                    Some(SegmentMember {
                        node: there.to_owned(),
                        remote: SegmentRemote {
                            vm: a.vm.clone(),
                            mac: default_mac(&a.vm, a.nic as usize),
                            ipv4: a.address.clone(),
                            vtep: vtep(there)?,
                            also_vtep: String::new(),
                        },
                    })
                })
                .collect();
            let ipv6_gateway = tenant
                .networks
                .iter()
                .find(|n| n.name == network.name)
                .map(ipv6_gateway)
                .unwrap_or_default();
            for node in &tenant_nodes {
                let Some(local) = underlays.get(*node) else {
                    continue;
                };
                let remotes = Remotes::excluding(members.clone(), node);
                let segment = DesiredSegment {
                    tenant: tenant.name.clone(),
                    network: network.name.clone(),
                    vni: network.vni,
                    mtu: mtus
                        .get(network.site.as_str())
                        .copied()
                        .unwrap_or(SEGMENT_MTU),
                    local_vtep: local.vtep.clone(),
                    gateway: network.gateway.clone().unwrap_or_default(),
                    prefix_len,
                    remotes,
                    guarded: guarded.clone(),
                    external: network.external,
                    underlay_prefix_len: local.prefix_len,
                    underlay_device: local.device.clone(),
                    ipv6_gateway: ipv6_gateway.clone(),
                };
                out.entry((*node).to_owned())
                    .or_default()
                    .insert(segment.key(), std::sync::Arc::new(segment));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mac_is_the_vmms() {
        // FNV-1a of "web-0\0" and 0u64 little-endian (recomputed outside Rust).
        let mac = default_mac("web-0", 0);
        assert_eq!(mac, "02:ca:a0:ea:53:e4");
        assert_ne!(mac, default_mac("web-0", 1));
        assert_ne!(mac, default_mac("web-1", 0));
    }
}

#[cfg(test)]
mod ipv6_tests {
    /// The quickstart with `ipv6=` on dev-net and the db VM's NIC in a group that
    /// admits TCP 5432 from dev-net.
    fn desired_v6() -> crate::desired::Desired {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let files: Vec<(String, String)> = ["cluster.kdl", "tenants.kdl", "workloads.kdl"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(root.join(f)).unwrap();
                let text = text
                    .replace(
                        r#"gateway="10.77.0.1""#,
                        r#"gateway="10.77.0.1" ipv6="fd00:77::/64"
    security-group "db" {
        allow from="dev-net" proto="tcp" port=5432
    }"#,
                    )
                    .replace(
                        "    nic network=\"dev-net\"\n    tag \"app\" \"db\"",
                        "    nic network=\"dev-net\" security-groups=\"db\"\n    tag \"app\" \"db\"",
                    );
                ((*f).to_owned(), text)
            })
            .collect();
        let sources = compiler::source::Sources::from_files(files);
        let c = compiler::compile(&sources);
        assert!(!c.has_errors(), "{:?}", c.diagnostics);
        let placement = crate::desired::place(&c.model, None);
        crate::desired::desired(&c.model, &root, placement)
    }

    #[test]
    fn an_ipv6_network_sends_its_gateway_and_admits_its_prefix_in_groups() {
        let desired = desired_v6();
        let mut seen = 0;
        for segments in desired.segments.values() {
            for s in segments.values() {
                let want = if s.network == "dev-net" {
                    "fd00:77::1"
                } else {
                    ""
                };
                assert_eq!(s.ipv6_gateway, want, "{}", s.key());
                if s.tenant != "dev" {
                    continue;
                }
                seen += 1;
                let db = s.guarded.iter().find(|g| g.vm == "db").expect("db guarded");
                let from: Vec<&str> = db.allow.iter().map(|r| r.from_cidr.as_str()).collect();
                assert_eq!(from, vec!["10.77.0.0/24", "fd00:77::/64"]);
                assert!(db.allow.iter().all(|r| r.port == 5432 && r.proto == "tcp"));
            }
        }
        assert!(seen >= 2, "dev-net spans several nodes");
    }
}
