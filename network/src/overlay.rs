//! Tenant network segments across nodes (issue 19): per tenant network per node,
//! the tenant bridge (`tenant::tenant_bridge_name`) gets a VXLAN port with the
//! network's VNI over the node's underlay (bond) address, static forwarding
//! entries for the network's VM NICs on other nodes, and a leg into the tenant's
//! router namespace that holds the network's gateway address (a distributed
//! gateway: the same address and MAC on every node).
//!
//! No flood-and-learn: the VXLAN device is created `nolearning`, its bridge port
//! has learning off, and there is no all-zero (flood) FDB entry, so broadcasts
//! stay on the node. For every remote NIC the segment holds `MAC → VTEP` (on
//! the VXLAN device and on the bridge) and `address → MAC` (permanent neighbour
//! on the VXLAN device, answered by its ARP proxy). A VM that moves is one
//! changed entry per node.
//!
//! Changes run the iproute2 `ip` and `bridge` binaries (like `tc` for HTB: the
//! VXLAN options, `neigh_suppress` and FDB flags are simplest there);
//! observation reads rtnetlink (link dump with the VXLAN info, `AF_BRIDGE` and
//! `AF_INET` neighbour dumps). [`plan_segment`] compares the two and lists the
//! steps; empty means converged, so it is also the drift report.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use serde::{Deserialize, Serialize};

use crate::NetworkError;
use crate::netns::{NetNs, create_netns};
use crate::nl::Rtnl;
use crate::tenant::tenant_bridge_name;

/// UDP port of the VXLAN segments (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// Bytes of VXLAN encapsulation over IPv4 (outer IP 20, UDP 8, VXLAN 8, inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The segment MTU for an underlay (bond) MTU: the underlay's minus 50, so a
/// full-sized guest frame never needs the underlay to fragment.
pub fn segment_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
}

/// VXLAN device of a tenant network (`cvx` + 12 hex digits).
pub fn vxlan_name(tenant: &str, network: &str) -> String {
    let h = crate::fnv1a(format!("vx/{tenant}/{network}").as_bytes());
    format!("cvx{:012x}", h & 0xffff_ffff_ffff)
}

/// Node-side end of the gateway leg (a bridge port, `cgl` + 12 hex digits).
pub fn gateway_leg_name(tenant: &str, network: &str) -> String {
    let h = crate::fnv1a(format!("gw/{tenant}/{network}").as_bytes());
    format!("cgl{:012x}", h & 0xffff_ffff_ffff)
}

/// Router-side end of the gateway leg (holds the gateway address, `cgw` + 12 hex digits).
pub fn gateway_device_name(tenant: &str, network: &str) -> String {
    let h = crate::fnv1a(format!("gw/{tenant}/{network}").as_bytes());
    format!("cgw{:012x}", h & 0xffff_ffff_ffff)
}

/// The gateway's MAC: locally administered unicast, fixed by tenant and network,
/// the same on every node (a VM that moves keeps a valid ARP entry).
pub fn gateway_mac(tenant: &str, network: &str) -> [u8; 6] {
    let h = crate::fnv1a(format!("gwmac/{tenant}/{network}").as_bytes()).to_be_bytes();
    [0x0a, h[0], h[1], h[2], h[3], h[4]]
}

/// The tenant's router namespace on the node whose namespace is `node`:
/// `<node netns>-r<8 hex>` (`cairn-r<8 hex>` on a host).
pub fn router_netns_name(node: &NetNs, tenant: &str) -> String {
    let h = crate::fnv1a(format!("router/{tenant}").as_bytes()) as u32;
    format!("{}-r{h:08x}", node.name().unwrap_or("cairn"))
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A VM NIC of the network that runs on another node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemoteNic {
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// Its IPv4 address (from IPAM), if it has one.
    pub ipv4: Option<Ipv4Addr>,
    /// The underlay address (VTEP) of the node it runs on.
    pub vtep: Ipv4Addr,
    /// While the VM migrates live, the VTEP of the other node of the migration:
    /// its frames then go to both, so the VM is reached on whichever node runs it,
    /// before and after the switch-over (make before break). The VXLAN FDB keeps
    /// one destination per unicast MAC (`bridge fdb append` of a second is
    /// ignored, measured), so the MAC then has no entry of its own on the VXLAN
    /// device and the all-zero entry names both VTEPs: the device sends a copy of
    /// each frame the bridge gives it for the MAC to each (see [`FLOOD_MAC`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub also_vtep: Option<Ipv4Addr>,
}

/// The VXLAN device's all-zero entry: frames for a MAC with no entry of its own
/// (and broadcasts) go to every destination it names. A segment has it only while
/// a remote NIC migrates live (`RemoteNic::also_vtep`), naming the two nodes of
/// each migration; ARP requests and IPv6 neighbour solicitations never use it
/// (the VXLAN proxy answers them), the bridge still sends a migrating MAC only to
/// the VXLAN port (its `master static` entry stays).
pub const FLOOD_MAC: &str = "00:00:00:00:00:00";

/// The network's gateway on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    /// The gateway address.
    pub address: Ipv4Addr,
    /// The network's prefix length.
    pub prefix_len: u8,
    /// The network's IPv6 gateway address, when it has an IPv6 prefix (always a
    /// /64: guests take their addresses by SLAAC from the gateway's router
    /// advertisements, [`slaac_address`]).
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
}

/// The modified EUI-64 interface identifier of `mac` (RFC 4291 appendix A).
fn eui64(mac: &[u8; 6]) -> [u8; 8] {
    [
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]
}

/// The address a guest with `mac` takes by SLAAC in the /64 of `prefix` (a
/// guest's kernel default, `addr_gen_mode` eui64): the network's IPv6 IPAM, which
/// the MAC (deterministic per VM NIC) decides.
pub fn slaac_address(prefix: Ipv6Addr, mac: &[u8; 6]) -> Ipv6Addr {
    let mut o = prefix.octets();
    o[8..].copy_from_slice(&eui64(mac));
    Ipv6Addr::from(o)
}

/// The link-local address of `mac` (`fe80::/64` with its EUI-64).
pub fn link_local_address(mac: &[u8; 6]) -> Ipv6Addr {
    slaac_address(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), mac)
}

/// One tenant network's segment on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSpec {
    /// Tenant.
    pub tenant: String,
    /// Network.
    pub network: String,
    /// VXLAN network identifier, 1..=16777215.
    pub vni: u32,
    /// Segment MTU (bridge, VXLAN, taps): the underlay's MTU minus 50.
    pub mtu: u32,
    /// This node's underlay address (its bond's), the local VTEP.
    pub local_vtep: Ipv4Addr,
    /// The gateway, when the network has one.
    pub gateway: Option<Gateway>,
    /// The network's NICs on other nodes.
    pub remotes: Vec<RemoteNic>,
}

/// One change that converges a segment; its `Display` is the drift line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum SegmentStep {
    /// The tenant bridge is missing, down or of another MTU.
    Bridge {
        /// What is wrong.
        why: String,
    },
    /// The VXLAN device is missing (or of the wrong VNI/VTEP/flags: recreated).
    CreateVxlan {
        /// What is wrong.
        why: String,
    },
    /// The VXLAN device's MTU, bridge or admin state is off.
    FixVxlan {
        /// What is wrong.
        why: String,
    },
    /// A remote NIC's FDB entry is missing or points elsewhere.
    SetFdb {
        /// Guest MAC.
        mac: String,
        /// Wanted VTEP.
        vtep: Ipv4Addr,
        /// What is there now.
        have: Option<Ipv4Addr>,
    },
    /// The all-zero entry lacks a node of a live migration ([`FLOOD_MAC`]).
    SetFlood {
        /// The VTEP.
        vtep: Ipv4Addr,
    },
    /// The all-zero entry names a node no live migration needs.
    DeleteFlood {
        /// The VTEP.
        vtep: Ipv4Addr,
    },
    /// The bridge does not send a remote MAC to the VXLAN port.
    SetBridgeFdb {
        /// Guest MAC.
        mac: String,
    },
    /// An FDB entry for a MAC no remote NIC has (a VM gone or moved here).
    DeleteFdb {
        /// MAC.
        mac: String,
        /// On the bridge (`master`) rather than on the VXLAN device (`self`).
        bridge: bool,
    },
    /// A remote NIC's neighbour entry is missing or wrong.
    SetNeighbour {
        /// Address.
        ip: IpAddr,
        /// MAC.
        mac: String,
    },
    /// A neighbour entry no remote NIC has.
    DeleteNeighbour {
        /// Address.
        ip: IpAddr,
    },
    /// The gateway leg (router namespace, veth, address, MAC) is missing or off.
    Gateway {
        /// What is wrong.
        why: String,
    },
}

impl std::fmt::Display for SegmentStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bridge { why } => write!(f, "bridge: {why}"),
            Self::CreateVxlan { why } => write!(f, "vxlan: {why}"),
            Self::FixVxlan { why } => write!(f, "vxlan: {why}"),
            Self::SetFdb { mac, vtep, have } => match have {
                Some(h) => write!(f, "fdb {mac}: points to {h}, want {vtep}"),
                None => write!(f, "fdb {mac}: missing, want {vtep}"),
            },
            Self::SetFlood { vtep } => write!(
                f,
                "fdb {FLOOD_MAC}: missing dst {vtep} (a VM migrating live)"
            ),
            Self::DeleteFlood { vtep } => write!(
                f,
                "fdb {FLOOD_MAC} dst {vtep}: no VM migrates live through it"
            ),
            Self::SetBridgeFdb { mac } => write!(f, "bridge fdb {mac}: missing"),
            Self::DeleteFdb { mac, bridge } => write!(
                f,
                "{}fdb {mac}: no remote NIC has this MAC",
                if *bridge { "bridge " } else { "" }
            ),
            Self::SetNeighbour { ip, mac } => write!(f, "neighbour {ip}: want {mac}"),
            Self::DeleteNeighbour { ip } => write!(f, "neighbour {ip}: no remote NIC has it"),
            Self::Gateway { why } => write!(f, "gateway: {why}"),
        }
    }
}

/// A segment as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedSegment {
    /// Bridge name.
    pub bridge: String,
    /// VXLAN device name.
    pub vxlan: String,
    /// The VXLAN device's VNI, 0 when it is missing.
    pub vni: u32,
    /// Its local VTEP.
    pub local_vtep: Option<Ipv4Addr>,
    /// MTU of the VXLAN device.
    pub mtu: u32,
    /// Remote entries: MAC → VTEP, sorted; the all-zero entry ([`FLOOD_MAC`],
    /// only during live migrations) once per VTEP it names.
    pub fdb: Vec<(String, Ipv4Addr)>,
    /// Neighbour entries: address → MAC, sorted (IPv4, then IPv6).
    pub neighbours: Vec<(IpAddr, String)>,
    /// The router namespace holding the gateway, when the network has one.
    pub router_netns: Option<String>,
    /// Every difference from the spec (empty: converged).
    pub drift: Vec<String>,
}

/// Checks a spec before anything changes.
pub fn validate_segment(node: &str, spec: &SegmentSpec) -> Result<(), NetworkError> {
    let bad = |problem: String| {
        Err(NetworkError::Segment {
            node: node.to_owned(),
            tenant: spec.tenant.clone(),
            network: spec.network.clone(),
            problem,
        })
    };
    if !(1..=0xff_ffff).contains(&spec.vni) {
        return bad(format!("VNI {} is outside 1..=16777215", spec.vni));
    }
    if !(68..=65535 - VXLAN_OVERHEAD).contains(&spec.mtu) {
        return bad(format!(
            "segment MTU {} is outside 68..={}",
            spec.mtu,
            65535 - VXLAN_OVERHEAD
        ));
    }
    if let Some(g) = spec.gateway
        && !(1..=30).contains(&g.prefix_len)
    {
        return bad(format!(
            "gateway prefix length /{} is outside /1../30",
            g.prefix_len
        ));
    }
    Ok(())
}

#[derive(Debug, Default)]
struct VxlanInfo {
    index: u32,
    mtu: u32,
    up: bool,
    controller: Option<u32>,
    vni: u32,
    local: Option<Ipv4Addr>,
    learning: bool,
    proxy: bool,
    port: u16,
    mac: Option<[u8; 6]>,
}

fn vxlan_info(msg: &LinkMessage) -> VxlanInfo {
    let state = crate::nl::link_state_from(msg);
    let mut info = VxlanInfo {
        index: state.index,
        mtu: state.mtu,
        up: state.admin_up,
        controller: state.controller,
        mac: state.mac,
        ..VxlanInfo::default()
    };
    for attr in &msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = attr {
            for i in infos {
                if let LinkInfo::Data(InfoData::Vxlan(vx)) = i {
                    for v in vx {
                        match v {
                            InfoVxlan::Id(id) => info.vni = *id,
                            InfoVxlan::Local(a) => info.local = Some(*a),
                            InfoVxlan::Learning(l) => info.learning = *l,
                            InfoVxlan::Proxy(p) => info.proxy = *p,
                            InfoVxlan::Port(p) => info.port = *p,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    info
}

fn dump_links_raw(rtnl: &mut Rtnl) -> Result<Vec<LinkMessage>, crate::NlError> {
    let answers = rtnl.request(
        "dump links",
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_DUMP,
    )?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l),
            _ => None,
        })
        .collect())
}

/// A neighbour or FDB entry as dumped.
#[derive(Debug, Clone)]
struct NeighEntry {
    ifindex: u32,
    mac: Option<[u8; 6]>,
    dst: Option<Ipv4Addr>,
    dst6: Option<Ipv6Addr>,
    on_device: bool,
    on_bridge: bool,
    permanent: bool,
}

fn dump_neighbours(
    rtnl: &mut Rtnl,
    family: AddressFamily,
) -> Result<Vec<NeighEntry>, crate::NlError> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family;
    let answers = rtnl.request(
        "dump neighbours",
        RouteNetlinkMessage::GetNeighbour(msg),
        NLM_F_DUMP,
    )?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => Some(n),
            _ => None,
        })
        .map(|n| {
            let mut e = NeighEntry {
                ifindex: n.header.ifindex,
                mac: None,
                dst: None,
                dst6: None,
                on_device: n.header.flags.contains(NeighbourFlags::Own),
                on_bridge: n.header.flags.contains(NeighbourFlags::Controller),
                permanent: n.header.state == NeighbourState::Permanent,
            };
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        let mut m = [0u8; 6];
                        m.copy_from_slice(l);
                        e.mac = Some(m);
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => e.dst = Some(*a),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        e.dst6 = Some(*a)
                    }
                    // A bridge's entries name it (NDA_MASTER); NTF_MASTER is a request flag.
                    NeighbourAttribute::Controller(_) => e.on_bridge = true,
                    // An AF_BRIDGE dump's VTEP comes as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                        e.dst = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                    }
                    _ => {}
                }
            }
            e
        })
        .collect())
}

/// Reads the segment back and lists what differs from `spec` (the steps
/// [`apply_segment`] would take).
pub fn plan_segment(
    ns: &NetNs,
    spec: &SegmentSpec,
) -> Result<(ObservedSegment, Vec<SegmentStep>), NetworkError> {
    let nl = |e| NetworkError::netlink(ns, e);
    let bridge = tenant_bridge_name(&spec.tenant, &spec.network);
    let vxlan = vxlan_name(&spec.tenant, &spec.network);
    let mut rtnl = Rtnl::open(ns).map_err(nl)?;
    let links = dump_links_raw(&mut rtnl).map_err(nl)?;
    let states: Vec<_> = links.iter().map(crate::nl::link_state_from).collect();
    let mut steps = Vec::new();
    let br = states.iter().find(|l| l.name == bridge);
    match br {
        None => steps.push(SegmentStep::Bridge {
            why: format!("{bridge} does not exist"),
        }),
        Some(b) if b.kind.as_deref() != Some("bridge") => {
            return Err(NetworkError::DeviceConflict {
                node: ns.node().to_owned(),
                name: bridge,
                kind: b.kind.clone().unwrap_or_default(),
            });
        }
        Some(b) if b.mtu != spec.mtu => steps.push(SegmentStep::Bridge {
            why: format!("{bridge} has MTU {}, want {}", b.mtu, spec.mtu),
        }),
        Some(b) if !b.admin_up => steps.push(SegmentStep::Bridge {
            why: format!("{bridge} is down"),
        }),
        Some(_) => {}
    }
    let vx = links
        .iter()
        .find(|l| crate::nl::link_state_from(l).name == vxlan)
        .map(vxlan_info);
    let mut observed = ObservedSegment {
        bridge: bridge.clone(),
        vxlan: vxlan.clone(),
        vni: 0,
        local_vtep: None,
        mtu: 0,
        fdb: Vec::new(),
        neighbours: Vec::new(),
        router_netns: spec.gateway.map(|_| router_netns_name(ns, &spec.tenant)),
        drift: Vec::new(),
    };
    let mut fresh_vxlan = false;
    match &vx {
        None => {
            fresh_vxlan = true;
            steps.push(SegmentStep::CreateVxlan {
                why: format!("{vxlan} does not exist"),
            });
        }
        Some(v) => {
            observed.vni = v.vni;
            observed.local_vtep = v.local;
            observed.mtu = v.mtu;
            let mut wrong = Vec::new();
            if v.vni != spec.vni {
                wrong.push(format!("VNI {}, want {}", v.vni, spec.vni));
            }
            if v.local != Some(spec.local_vtep) {
                wrong.push(format!(
                    "local VTEP {}, want {}",
                    v.local
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "none".into()),
                    spec.local_vtep
                ));
            }
            if v.learning {
                wrong.push("learning on, want off".into());
            }
            if !v.proxy {
                wrong.push("ARP proxy off, want on".into());
            }
            if v.port != VXLAN_PORT {
                wrong.push(format!("UDP port {}, want {VXLAN_PORT}", v.port));
            }
            if !wrong.is_empty() {
                fresh_vxlan = true;
                steps.push(SegmentStep::CreateVxlan {
                    why: format!("{vxlan} has {}", wrong.join(", ")),
                });
            } else {
                let mut fix = Vec::new();
                if v.mtu != spec.mtu {
                    fix.push(format!("MTU {}, want {}", v.mtu, spec.mtu));
                }
                let br_index = br.map(|b| b.index);
                if br_index.is_none() || v.controller != br_index {
                    fix.push(format!("not a port of {bridge}"));
                }
                if !v.up {
                    fix.push("down".into());
                }
                if !fix.is_empty() {
                    steps.push(SegmentStep::FixVxlan {
                        why: format!("{vxlan} is {}", fix.join(", ")),
                    });
                }
            }
        }
    }
    // Remote entries.
    let vx_index = vx.as_ref().map(|v| v.index);
    let own_mac = vx.as_ref().and_then(|v| v.mac);
    let mut have_fdb: std::collections::BTreeMap<[u8; 6], Ipv4Addr> = Default::default();
    let mut have_flood: std::collections::BTreeSet<Ipv4Addr> = Default::default();
    let mut have_bridge_fdb: std::collections::BTreeSet<[u8; 6]> = Default::default();
    let mut have_neigh: std::collections::BTreeMap<IpAddr, [u8; 6]> = Default::default();
    if let (Some(index), false) = (vx_index, fresh_vxlan) {
        for e in dump_neighbours(&mut rtnl, AddressFamily::Bridge).map_err(nl)? {
            let Some(mac) = e.mac else { continue };
            if e.ifindex != index || Some(mac) == own_mac {
                continue;
            }
            if e.on_device {
                match e.dst {
                    Some(dst) if mac == [0; 6] => {
                        have_flood.insert(dst);
                    }
                    Some(dst) => {
                        have_fdb.insert(mac, dst);
                    }
                    None => {}
                }
            } else if e.on_bridge && !e.permanent && mac != [0; 6] {
                // `master static` makes a static entry (NUD_NOARP); permanent
                // ones are the bridge's own addresses.
                have_bridge_fdb.insert(mac);
            }
        }
        for e in dump_neighbours(&mut rtnl, AddressFamily::Inet).map_err(nl)? {
            if e.ifindex != index || !e.permanent {
                continue;
            }
            if let (Some(ip), Some(mac)) = (e.dst, e.mac) {
                have_neigh.insert(IpAddr::V4(ip), mac);
            }
        }
        for e in dump_neighbours(&mut rtnl, AddressFamily::Inet6).map_err(nl)? {
            if e.ifindex != index || !e.permanent {
                continue;
            }
            if let (Some(ip), Some(mac)) = (e.dst6, e.mac) {
                have_neigh.insert(IpAddr::V6(ip), mac);
            }
        }
    }
    // A migrating NIC's frames go to both nodes through the all-zero entry (the
    // VXLAN FDB keeps one destination per unicast MAC), its own entry is removed.
    let mut want_fdb: std::collections::BTreeMap<[u8; 6], Ipv4Addr> = Default::default();
    let mut want_bridge: std::collections::BTreeSet<[u8; 6]> = Default::default();
    let mut want_flood: std::collections::BTreeSet<Ipv4Addr> = Default::default();
    let mut want_neigh: std::collections::BTreeMap<IpAddr, [u8; 6]> = Default::default();
    let prefix6 = spec.gateway.and_then(|g| g.ipv6);
    for r in &spec.remotes {
        want_bridge.insert(r.mac);
        match r.also_vtep {
            Some(also) => want_flood.extend([r.vtep, also]),
            None => {
                want_fdb.insert(r.mac, r.vtep);
            }
        }
        if let Some(ip) = r.ipv4 {
            want_neigh.insert(IpAddr::V4(ip), r.mac);
        }
        // With an IPv6 prefix the VXLAN proxy also answers neighbour solicitations
        // for the remote NIC's SLAAC and link-local addresses (no flooding).
        if let Some(p) = prefix6 {
            want_neigh.insert(IpAddr::V6(slaac_address(p, &r.mac)), r.mac);
            want_neigh.insert(IpAddr::V6(link_local_address(&r.mac)), r.mac);
        }
    }
    // Make before break: the all-zero entry's new destinations first, its old
    // ones last, so a migrating MAC always has a way to the node running it.
    for vtep in want_flood.difference(&have_flood) {
        steps.push(SegmentStep::SetFlood { vtep: *vtep });
    }
    for (mac, vtep) in &want_fdb {
        if have_fdb.get(mac) != Some(vtep) {
            steps.push(SegmentStep::SetFdb {
                mac: format_mac(mac),
                vtep: *vtep,
                have: have_fdb.get(mac).copied(),
            });
        }
    }
    for mac in &want_bridge {
        if !have_bridge_fdb.contains(mac) {
            steps.push(SegmentStep::SetBridgeFdb {
                mac: format_mac(mac),
            });
        }
    }
    for mac in have_fdb.keys() {
        if !want_fdb.contains_key(mac) {
            steps.push(SegmentStep::DeleteFdb {
                mac: format_mac(mac),
                bridge: false,
            });
        }
    }
    for mac in &have_bridge_fdb {
        if !want_bridge.contains(mac) {
            steps.push(SegmentStep::DeleteFdb {
                mac: format_mac(mac),
                bridge: true,
            });
        }
    }
    for vtep in have_flood.difference(&want_flood) {
        steps.push(SegmentStep::DeleteFlood { vtep: *vtep });
    }
    for (ip, mac) in &want_neigh {
        if have_neigh.get(ip) != Some(mac) {
            steps.push(SegmentStep::SetNeighbour {
                ip: *ip,
                mac: format_mac(mac),
            });
        }
    }
    for ip in have_neigh.keys() {
        if !want_neigh.contains_key(ip) {
            steps.push(SegmentStep::DeleteNeighbour { ip: *ip });
        }
    }
    observed.fdb = have_flood
        .iter()
        .map(|v| (FLOOD_MAC.to_owned(), *v))
        .chain(have_fdb.iter().map(|(m, v)| (format_mac(m), *v)))
        .collect();
    observed.neighbours = have_neigh
        .iter()
        .map(|(ip, m)| (*ip, format_mac(m)))
        .collect();
    // Gateway leg.
    if let Some(g) = spec.gateway {
        let leg = gateway_leg_name(&spec.tenant, &spec.network);
        let mut why = Vec::new();
        match states.iter().find(|l| l.name == leg) {
            None => why.push(format!("{leg} does not exist")),
            Some(l) => {
                if br.map(|b| b.index) != l.controller {
                    why.push(format!("{leg} is not a port of {bridge}"));
                }
                if !l.admin_up {
                    why.push(format!("{leg} is down"));
                }
                if l.mtu != spec.mtu {
                    why.push(format!("{leg} has MTU {}, want {}", l.mtu, spec.mtu));
                }
            }
        }
        let router = NetNs::named_for_node(router_netns_name(ns, &spec.tenant), ns.node());
        if !router.exists() {
            why.push(format!("router netns {} does not exist", describe(&router)));
        } else {
            why.extend(gateway_drift(&router, spec, g)?);
        }
        if !why.is_empty() {
            steps.push(SegmentStep::Gateway {
                why: why.join(", "),
            });
        }
    }
    observed.drift = steps.iter().map(ToString::to_string).collect();
    Ok((observed, steps))
}

fn describe(ns: &NetNs) -> String {
    ns.name().unwrap_or("?").to_owned()
}

fn gateway_drift(
    router: &NetNs,
    spec: &SegmentSpec,
    g: Gateway,
) -> Result<Vec<String>, NetworkError> {
    let nl = |e| NetworkError::netlink(router, e);
    let dev = gateway_device_name(&spec.tenant, &spec.network);
    let mut rtnl = Rtnl::open(router).map_err(nl)?;
    let mut why = Vec::new();
    let Some(l) = rtnl.link(&dev).map_err(nl)? else {
        why.push(format!("{dev} does not exist in the router netns"));
        return Ok(why);
    };
    let mac = gateway_mac(&spec.tenant, &spec.network);
    if l.mac != Some(mac) {
        why.push(format!(
            "{dev} has MAC {}, want {}",
            l.mac.map(|m| format_mac(&m)).unwrap_or_default(),
            format_mac(&mac)
        ));
    }
    if !l.admin_up {
        why.push(format!("{dev} is down"));
    }
    if l.mtu != spec.mtu {
        why.push(format!("{dev} has MTU {}, want {}", l.mtu, spec.mtu));
    }
    let addrs = rtnl.ipv4_addresses(l.index).map_err(nl)?;
    if !addrs.contains(&g.address) {
        why.push(format!("{dev} lacks {}/{}", g.address, g.prefix_len));
    }
    if let Some(v6) = g.ipv6 {
        let addrs = rtnl.ipv6_addresses(l.index).map_err(nl)?;
        if !addrs.iter().any(|a| a.addr == v6 && a.prefix_len == 64) {
            why.push(format!("{dev} lacks {v6}/64"));
        }
        let forwarding = router
            .run(|| std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding"))
            .map_err(NetworkError::Netns)?
            .unwrap_or_default();
        if forwarding.trim() != "1" {
            why.push("the router does not forward IPv6".into());
        }
    }
    Ok(why)
}

/// Runs `program` (`ip` or `bridge`) with `-n <netns>` where the namespace is named.
fn run(ns: &NetNs, program: &str, args: &[&str]) -> Result<(), NetworkError> {
    let mut full: Vec<String> = ns.iproute_args();
    full.extend(args.iter().map(|a| (*a).to_owned()));
    let out = std::process::Command::new(program)
        .args(&full)
        .output()
        .map_err(|e| NetworkError::Command {
            node: ns.node().to_owned(),
            command: format!("{program} {}", full.join(" ")),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Command {
            node: ns.node().to_owned(),
            command: format!("{program} {}", full.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Converges the segment: bridge, VXLAN port, remote entries, gateway leg.
/// Refuses, before any change, a spec whose MTU does not fit the underlay
/// device's MTU minus 50, or whose local VTEP is on no device of the node.
/// Returns the steps taken (empty when it was converged).
pub fn apply_segment(ns: &NetNs, spec: &SegmentSpec) -> Result<Vec<String>, NetworkError> {
    validate_segment(ns.node(), spec)?;
    check_underlay(ns, spec)?;
    let (_, steps) = plan_segment(ns, spec)?;
    let bridge = tenant_bridge_name(&spec.tenant, &spec.network);
    let vxlan = vxlan_name(&spec.tenant, &spec.network);
    let mut done = Vec::new();
    for step in &steps {
        match step {
            SegmentStep::Bridge { .. } => {
                crate::tenant::ensure_tenant_bridge(ns, &spec.tenant, &spec.network, spec.mtu)?;
            }
            SegmentStep::CreateVxlan { .. } => {
                let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
                rtnl.delete_link(&vxlan)
                    .map_err(|e| NetworkError::netlink(ns, e))?;
                let vni = spec.vni.to_string();
                let local = spec.local_vtep.to_string();
                let port = VXLAN_PORT.to_string();
                let mtu = spec.mtu.to_string();
                run(
                    ns,
                    "ip",
                    &[
                        "link",
                        "add",
                        &vxlan,
                        "mtu",
                        &mtu,
                        "type",
                        "vxlan",
                        "id",
                        &vni,
                        "local",
                        &local,
                        "dstport",
                        &port,
                        "nolearning",
                        "proxy",
                        "df",
                        "set",
                    ],
                )?;
                fix_vxlan(ns, &vxlan, &bridge, spec.mtu)?;
            }
            SegmentStep::FixVxlan { .. } => fix_vxlan(ns, &vxlan, &bridge, spec.mtu)?,
            SegmentStep::SetFdb { mac, vtep, .. } => vxlan_fdb(ns, "replace", mac, &vxlan, *vtep)?,
            SegmentStep::SetFlood { vtep } => vxlan_fdb(ns, "append", FLOOD_MAC, &vxlan, *vtep)?,
            SegmentStep::DeleteFlood { vtep } => vxlan_fdb(ns, "del", FLOOD_MAC, &vxlan, *vtep)?,
            SegmentStep::SetBridgeFdb { mac } => {
                run(
                    ns,
                    "bridge",
                    &["fdb", "replace", mac, "dev", &vxlan, "master", "static"],
                )?;
            }
            SegmentStep::DeleteFdb { mac, bridge } => {
                let which = if *bridge { "master" } else { "self" };
                run(ns, "bridge", &["fdb", "del", mac, "dev", &vxlan, which])?;
            }
            SegmentStep::SetNeighbour { ip, mac } => {
                let ip = ip.to_string();
                run(
                    ns,
                    "ip",
                    &[
                        "neigh",
                        "replace",
                        &ip,
                        "lladdr",
                        mac,
                        "dev",
                        &vxlan,
                        "nud",
                        "permanent",
                    ],
                )?;
            }
            SegmentStep::DeleteNeighbour { ip } => {
                let ip = ip.to_string();
                run(ns, "ip", &["neigh", "del", &ip, "dev", &vxlan])?;
            }
            SegmentStep::Gateway { .. } => {
                if let Some(g) = spec.gateway {
                    ensure_gateway(ns, spec, g)?;
                }
            }
        }
        done.push(step.to_string());
    }
    Ok(done)
}

/// `bridge fdb OP MAC dev VXLAN dst VTEP self`, `permanent` unless deleting.
fn vxlan_fdb(
    ns: &NetNs,
    op: &str,
    mac: &str,
    vxlan: &str,
    vtep: Ipv4Addr,
) -> Result<(), NetworkError> {
    let vtep = vtep.to_string();
    let mut args = vec!["fdb", op, mac, "dev", vxlan, "dst", &vtep, "self"];
    if op != "del" {
        args.push("permanent");
    }
    run(ns, "bridge", &args)
}

fn fix_vxlan(ns: &NetNs, vxlan: &str, bridge: &str, mtu: u32) -> Result<(), NetworkError> {
    let mtu = mtu.to_string();
    run(
        ns,
        "ip",
        &["link", "set", vxlan, "mtu", &mtu, "master", bridge, "up"],
    )?;
    run(
        ns,
        "bridge",
        &[
            "link",
            "set",
            "dev",
            vxlan,
            "learning",
            "off",
            "neigh_suppress",
            "on",
        ],
    )
}

/// The device of `ns` that holds `addr` (the underlay), with its MTU.
pub fn underlay_device(ns: &NetNs, addr: Ipv4Addr) -> Result<Option<(String, u32)>, NetworkError> {
    let nl = |e| NetworkError::netlink(ns, e);
    let mut rtnl = Rtnl::open(ns).map_err(nl)?;
    for l in rtnl.links().map_err(nl)? {
        if rtnl.ipv4_addresses(l.index).map_err(nl)?.contains(&addr) {
            return Ok(Some((l.name, l.mtu)));
        }
    }
    Ok(None)
}

/// Makes the node's underlay address (`spec.local_vtep`/`prefix_len`) on `device`
/// (the bond that carries the guest class) unless some device of the node already
/// holds it.
/// Returns what it did (`None`: nothing to do). The device must exist: the bond
/// is made by `apply_bond`, and a segment asking for its address first is refused
/// with that reason.
pub fn ensure_underlay(
    ns: &NetNs,
    spec: &SegmentSpec,
    device: &str,
    prefix_len: u8,
) -> Result<Option<String>, NetworkError> {
    let addr = spec.local_vtep;
    if underlay_device(ns, addr)?.is_some() {
        return Ok(None);
    }
    let nl = |e| NetworkError::netlink(ns, e);
    let mut rtnl = Rtnl::open(ns).map_err(nl)?;
    let Some(link) = rtnl.link(device).map_err(nl)? else {
        return Err(NetworkError::Segment {
            node: ns.node().to_owned(),
            tenant: spec.tenant.clone(),
            network: spec.network.clone(),
            problem: format!(
                "the underlay address {addr}/{prefix_len} belongs on device {device}, which does not exist \
                 (the bond carrying the guest class is made first by ApplyBond)"
            ),
        });
    };
    rtnl.add_address(link.index, addr.into(), prefix_len)
        .map_err(nl)?;
    Ok(Some(format!(
        "underlay address {addr}/{prefix_len} on {device}"
    )))
}

fn check_underlay(ns: &NetNs, spec: &SegmentSpec) -> Result<(), NetworkError> {
    let found = underlay_device(ns, spec.local_vtep)?;
    let bad = |problem: String| NetworkError::Segment {
        node: ns.node().to_owned(),
        tenant: spec.tenant.clone(),
        network: spec.network.clone(),
        problem,
    };
    match found {
        None => Err(bad(format!(
            "the local VTEP address {} is on no device of this node; give the bond its underlay address first",
            spec.local_vtep
        ))),
        Some((dev, mtu)) if spec.mtu + VXLAN_OVERHEAD > mtu => Err(bad(format!(
            "segment MTU {} does not fit underlay device {dev} (MTU {mtu}): VXLAN adds {VXLAN_OVERHEAD} bytes, \
             so the segment MTU must be at most {} (or raise the bond's MTU to {})",
            spec.mtu,
            segment_mtu(mtu),
            spec.mtu + VXLAN_OVERHEAD
        ))),
        Some(_) => Ok(()),
    }
}

fn ensure_gateway(ns: &NetNs, spec: &SegmentSpec, g: Gateway) -> Result<(), NetworkError> {
    let router_name = router_netns_name(ns, &spec.tenant);
    create_netns(&router_name)?;
    let router = NetNs::named_for_node(router_name.clone(), ns.node());
    let leg = gateway_leg_name(&spec.tenant, &spec.network);
    let dev = gateway_device_name(&spec.tenant, &spec.network);
    let bridge = tenant_bridge_name(&spec.tenant, &spec.network);
    let nl = |e| NetworkError::netlink(ns, e);
    let rl = |e| NetworkError::netlink(&router, e);
    let mut local = Rtnl::open(ns).map_err(nl)?;
    let mut remote = Rtnl::open(&router).map_err(rl)?;
    let leg_exists = local.link(&leg).map_err(nl)?.is_some();
    let dev_exists = remote.link(&dev).map_err(rl)?.is_some();
    if !(leg_exists && dev_exists) {
        local.delete_link(&leg).map_err(nl)?;
        remote.delete_link(&dev).map_err(rl)?;
        local.create_veth(&leg, &dev, Some(&router)).map_err(nl)?;
    }
    let mtu = spec.mtu.to_string();
    let mac = format_mac(&gateway_mac(&spec.tenant, &spec.network));
    run(
        ns,
        "ip",
        &["link", "set", &leg, "mtu", &mtu, "master", &bridge, "up"],
    )?;
    run(
        &router,
        "ip",
        &["link", "set", &dev, "address", &mac, "mtu", &mtu, "up"],
    )?;
    run(&router, "ip", &["link", "set", "lo", "up"])?;
    let cidr = format!("{}/{}", g.address, g.prefix_len);
    run(&router, "ip", &["addr", "replace", &cidr, "dev", &dev])?;
    let mut sysctls = vec!["/proc/sys/net/ipv4/ip_forward"];
    if let Some(v6) = g.ipv6 {
        // The same address on every node: duplicate address detection would fail
        // where a gateway answers for itself, so none.
        let cidr = format!("{v6}/64");
        run(
            &router,
            "ip",
            &["-6", "addr", "replace", &cidr, "dev", &dev, "nodad"],
        )?;
        sysctls.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for path in sysctls {
        router
            .run(move || std::fs::write(path, "1"))
            .map_err(NetworkError::Netns)?
            .map_err(|e| NetworkError::Command {
                node: ns.node().to_owned(),
                command: format!("write 1 to {path} in {router_name}"),
                detail: e.to_string(),
            })?;
    }
    Ok(())
}

/// Removes a segment's VXLAN device and gateway leg (the bridge stays with the
/// taps; missing pieces are fine). The router namespace is removed by
/// [`remove_router`] when the tenant has no segment left on the node.
pub fn remove_segment(ns: &NetNs, tenant: &str, network: &str) -> Result<(), NetworkError> {
    let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
    rtnl.delete_link(&vxlan_name(tenant, network))
        .map_err(|e| NetworkError::netlink(ns, e))?;
    rtnl.delete_link(&gateway_leg_name(tenant, network))
        .map_err(|e| NetworkError::netlink(ns, e))
}

/// Removes the tenant's router namespace on this node (missing is fine).
pub fn remove_router(ns: &NetNs, tenant: &str) -> Result<(), NetworkError> {
    let name = router_netns_name(ns, tenant);
    if NetNs::named(name.clone()).exists() {
        crate::netns::delete_netns(&name)?;
    }
    Ok(())
}

/// The uplink of a tenant's router namespace into the node's: node side `cup…`,
/// router side `cux…` (12 hex digits of the tenant).
pub fn uplink_names(tenant: &str) -> (String, String) {
    let h = crate::fnv1a(format!("up/{tenant}").as_bytes()) & 0xffff_ffff_ffff;
    (format!("cup{h:012x}"), format!("cux{h:012x}"))
}

/// The uplink's /30 in 169.254.0.0/16 (link-local, never routed beyond the node):
/// the node side's address and the router side's.
pub fn uplink_addresses(tenant: &str) -> (Ipv4Addr, Ipv4Addr) {
    let h = crate::fnv1a(format!("uplink/{tenant}").as_bytes());
    let (a, b) = (((h >> 8) & 0xff) as u8, (h & 0xfc) as u8);
    (
        Ipv4Addr::new(169, 254, a, b | 1),
        Ipv4Addr::new(169, 254, a, b | 2),
    )
}

/// Name of the node namespace's egress table (`inet`).
pub const EGRESS_TABLE: &str = "cairn_egress";

/// Gives the tenant's router namespace (which must exist: a segment with a gateway
/// made it) an uplink into the node's namespace for its external networks: a veth
/// pair on a link-local /30, the router's default route through it, forwarding on
/// in the node's namespace, and the node masquerading what comes from any uplink
/// (169.254.0.0/16) on its way out of any other device. The router's own rules
/// (`secgroup::apply_router` with an `Egress`) decide which networks may use it
/// and masquerade them onto the uplink. Returns the changes made.
pub fn ensure_egress(ns: &NetNs, tenant: &str) -> Result<Vec<String>, NetworkError> {
    let router_name = router_netns_name(ns, tenant);
    let router = NetNs::named_for_node(router_name.clone(), ns.node());
    if !router.exists() {
        return Err(NetworkError::Segment {
            node: ns.node().to_owned(),
            tenant: tenant.to_owned(),
            network: String::new(),
            problem: format!(
                "egress needs the tenant's router namespace {router_name}: give an external network a gateway"
            ),
        });
    }
    let (up, ux) = uplink_names(tenant);
    let (node_addr, router_addr) = uplink_addresses(tenant);
    let nl = |e| NetworkError::netlink(ns, e);
    let rl = |e| NetworkError::netlink(&router, e);
    let mut local = Rtnl::open(ns).map_err(nl)?;
    let mut remote = Rtnl::open(&router).map_err(rl)?;
    let mut done = Vec::new();
    if local.link(&up).map_err(nl)?.is_none() || remote.link(&ux).map_err(rl)?.is_none() {
        local.delete_link(&up).map_err(nl)?;
        remote.delete_link(&ux).map_err(rl)?;
        local.create_veth(&up, &ux, Some(&router)).map_err(nl)?;
        done.push(format!("create uplink {up}/{ux} for tenant {tenant}"));
    }
    let node_cidr = format!("{node_addr}/30");
    let router_cidr = format!("{router_addr}/30");
    let via = node_addr.to_string();
    run(ns, "ip", &["addr", "replace", &node_cidr, "dev", &up])?;
    run(ns, "ip", &["link", "set", &up, "up"])?;
    run(
        &router,
        "ip",
        &["addr", "replace", &router_cidr, "dev", &ux],
    )?;
    run(&router, "ip", &["link", "set", &ux, "up"])?;
    run(
        &router,
        "ip",
        &["route", "replace", "default", "via", &via, "dev", &ux],
    )?;
    let node = ns.node().to_owned();
    ns.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .map_err(NetworkError::Netns)?
        .map_err(|e| NetworkError::Command {
            node: node.clone(),
            command: "sysctl net.ipv4.ip_forward=1".into(),
            detail: e.to_string(),
        })?;
    let table = format!(
        "table inet {EGRESS_TABLE} {{\n chain uplink_nat {{\n  type nat hook postrouting priority 100; policy accept;\n  \
         ip saddr 169.254.0.0/16 oifname != \"cup*\" masquerade comment \"cairn: uplinks out\"\n }}\n}}\n"
    );
    let exists = ns
        .run(|| {
            std::process::Command::new("nft")
                .args(["list", "table", "inet", EGRESS_TABLE])
                .output()
        })
        .map_err(NetworkError::Netns)?
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("cairn: uplinks out")
        })
        .unwrap_or(false);
    if !exists {
        let script =
            format!("add table inet {EGRESS_TABLE}\ndelete table inet {EGRESS_TABLE}\n{table}");
        let out = ns
            .run(move || -> std::io::Result<std::process::Output> {
                use std::io::Write;
                let mut child = std::process::Command::new("nft")
                    .args(["-f", "-"])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()?;
                child
                    .stdin
                    .take()
                    .expect("piped")
                    .write_all(script.as_bytes())?;
                child.wait_with_output()
            })
            .map_err(NetworkError::Netns)?
            .map_err(|e| NetworkError::Command {
                node: node.clone(),
                command: "nft -f - (egress table)".into(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(NetworkError::Command {
                node,
                command: "nft -f - (egress table)".into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        done.push(format!("table inet {EGRESS_TABLE}: masquerade uplinks"));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slaac_addresses_are_the_macs_eui64() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        assert_eq!(
            link_local_address(&mac),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            slaac_address("fd00:20::1".parse().unwrap(), &mac),
            "fd00:20::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap(),
            "the /64 of the gateway, the interface identifier of the MAC"
        );
    }

    #[test]
    fn names_fit_and_differ() {
        for n in [
            vxlan_name("finance", "fin-app"),
            gateway_leg_name("finance", "fin-app"),
            gateway_device_name("finance", "fin-app"),
        ] {
            assert!(n.len() <= 15 && crate::spec::valid_ifname(&n), "{n}");
        }
        assert_ne!(vxlan_name("a", "b"), vxlan_name("a", "c"));
        assert_ne!(gateway_mac("a", "b"), gateway_mac("b", "b"));
        let mac = gateway_mac("finance", "fin-app");
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(segment_mtu(1500), 1450);
        assert_eq!(segment_mtu(9000), 8950);
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let mut spec = SegmentSpec {
            tenant: "t".into(),
            network: "n".into(),
            vni: 0,
            mtu: 1450,
            local_vtep: Ipv4Addr::new(10, 0, 0, 1),
            gateway: None,
            remotes: vec![],
        };
        let e = validate_segment("lab-1", &spec).unwrap_err().to_string();
        assert!(e.contains("lab-1") && e.contains("VNI 0"), "{e}");
        spec.vni = 5000;
        spec.mtu = 40;
        let e = validate_segment("lab-1", &spec).unwrap_err().to_string();
        assert!(e.contains("MTU 40"), "{e}");
        spec.mtu = 1450;
        assert!(validate_segment("lab-1", &spec).is_ok());
    }
}
