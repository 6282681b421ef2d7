//! Tenant network segments and security groups on the node (issue 19).
//!
//! `ApplyNetworkSegment` carries one tenant network's segment on this node (VNI,
//! local VTEP, gateway, the network's NICs on other nodes) and the tenant's NICs
//! that list security groups. The node converges the segment with the `network`
//! crate (`overlay`), then the tenant's router-namespace rules and the node's
//! security-group tables (`secgroup`), both built from every segment it holds and
//! its VM definitions (a guarded NIC of a VM defined here is filtered on its tap).
//! Definitions are kept in `<data dir>/segments/<tenant>.<network>.pb` (the request
//! as protobuf), so Observe keeps reporting drift after a restart; the controller
//! repairs drift by sending the same segment again.
//!
//! Architecture invariant: a segment the node cannot make as asked (an invalid
//! field, an MTU above the underlay's minus 50, a VTEP on no device) is refused
//! before anything changes and is not kept.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use network::NetNs;
use network::dhcp::{self, DhcpHost, DhcpSpec};
use network::overlay::{self, Gateway, RemoteNic, SegmentSpec};
use network::secgroup::{self, AllowRule, FirewallSpec, GuardedNic, Prefix, Proto, Zone};
use network::tenant::vm_tap_name;
use prost::Message;
use proto::v1;
use tonic::Status;

use crate::validate;

/// The segment definitions this node holds.
#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    defs: tokio::sync::Mutex<BTreeMap<(String, String), v1::ApplyNetworkSegment>>,
    /// Held by every change (apply, delete, reprogramming): the node's group tables
    /// and router rules are computed from all kept segments, so two segments applied
    /// at once would each program the tables without the other (seen: the first
    /// apply of the quickstart left one network's conntrack zone rules out).
    changing: tokio::sync::Mutex<()>,
}

fn file_name(tenant: &str, network: &str) -> String {
    format!("{tenant}.{network}.pb")
}

impl Segments {
    /// Loads the definitions kept under `data_dir/segments`.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("segments");
        std::fs::create_dir_all(&dir)?;
        let mut defs = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pb") {
                continue;
            }
            let bytes = std::fs::read(&path)?;
            let seg = v1::ApplyNetworkSegment::decode(bytes.as_slice()).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a segment definition: {e}", path.display()),
                )
            })?;
            defs.insert((seg.tenant.clone(), seg.network.clone()), seg);
        }
        Ok(Self {
            dir,
            defs: tokio::sync::Mutex::new(defs),
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// Serializes changes to the node's segments and the tables computed from them.
    pub async fn changing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changing.lock().await
    }

    /// Keeps `seg` (replacing its earlier definition), durably.
    pub async fn put(&self, seg: &v1::ApplyNetworkSegment) -> std::io::Result<()> {
        let mut defs = self.defs.lock().await;
        let path = self.dir.join(file_name(&seg.tenant, &seg.network));
        let tmp = path.with_extension("pb.tmp");
        std::fs::write(&tmp, seg.encode_to_vec())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        defs.insert((seg.tenant.clone(), seg.network.clone()), seg.clone());
        Ok(())
    }

    /// Forgets a segment (missing is fine).
    pub async fn remove(&self, tenant: &str, network: &str) -> std::io::Result<()> {
        let mut defs = self.defs.lock().await;
        match std::fs::remove_file(self.dir.join(file_name(tenant, network))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        defs.remove(&(tenant.to_owned(), network.to_owned()));
        Ok(())
    }

    /// Every definition, by tenant and network.
    pub async fn all(&self) -> Vec<v1::ApplyNetworkSegment> {
        self.defs.lock().await.values().cloned().collect()
    }

    /// Where the DHCP servers' files live (`<data dir>/segments/dhcp`).
    pub fn dhcp_dir(&self) -> PathBuf {
        self.dir.join("dhcp")
    }
}

/// An internal error (a failed task join, a failed write of the node's files).
pub(crate) fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

fn ipv4(field: &str, text: &str) -> Result<Ipv4Addr, Status> {
    text.parse().map_err(|_| {
        validate::invalid(
            field,
            format!("{text:?} is not an IPv4 address like 10.20.0.5"),
        )
    })
}

/// An allow rule of the wire as the `network` crate's.
pub fn allow_rule(field: &str, r: &v1::SecurityRule) -> Result<AllowRule, Status> {
    let prefix = |f: &str, text: &str| {
        Prefix::parse(text).ok_or_else(|| {
            validate::invalid(
                &format!("{field}.{f}"),
                format!("{text:?} is not an IPv4 prefix like 10.20.0.0/24"),
            )
        })
    };
    let proto = Proto::parse(&r.proto).ok_or_else(|| {
        validate::invalid(
            &format!("{field}.proto"),
            format!("{:?} is not one of tcp, udp, icmp, any", r.proto),
        )
    })?;
    let port = |p: u32, f: &str| {
        u16::try_from(p)
            .map_err(|_| validate::invalid(&format!("{field}.{f}"), format!("{p} is above 65535")))
    };
    let ports = match (r.port, r.port_end) {
        (0, 0) => None,
        (0, _) => {
            return Err(validate::invalid(
                &format!("{field}.port_end"),
                "a range needs its first port in `port`",
            ));
        }
        (a, 0) => Some((port(a, "port")?, port(a, "port")?)),
        (a, b) if b < a => {
            return Err(validate::invalid(
                &format!("{field}.port_end"),
                format!("{b} is below port {a}"),
            ));
        }
        (a, b) => Some((port(a, "port")?, port(b, "port_end")?)),
    };
    Ok(AllowRule {
        group: r.group.clone(),
        from: prefix("from_cidr", &r.from_cidr)?,
        to: if r.to_cidr.is_empty() {
            None
        } else {
            Some(prefix("to_cidr", &r.to_cidr)?)
        },
        proto,
        ports,
    })
}

/// The segment's IPv6 gateway (empty: none); it must be an IPv6 unicast address.
fn ipv6_gateway(seg: &v1::ApplyNetworkSegment) -> Result<Option<std::net::Ipv6Addr>, Status> {
    if seg.ipv6_gateway.is_empty() {
        return Ok(None);
    }
    match seg.ipv6_gateway.parse::<std::net::Ipv6Addr>() {
        Ok(a) if !a.is_multicast() && !a.is_unspecified() => Ok(Some(a)),
        _ => Err(validate::invalid(
            "apply_network_segment.ipv6_gateway",
            format!(
                "`{}` is not an IPv6 unicast address (want the network's PREFIX::1, e.g. fd00:20::1)",
                seg.ipv6_gateway
            ),
        )),
    }
}

/// Checks an `ApplyNetworkSegment` and turns it into the `network` crate's spec;
/// `underlay_mtu` fills in an MTU of 0.
pub fn segment_spec(
    seg: &v1::ApplyNetworkSegment,
    underlay_mtu: Option<u32>,
) -> Result<SegmentSpec, Status> {
    validate::name("apply_network_segment.tenant", &seg.tenant)?;
    validate::name("apply_network_segment.network", &seg.network)?;
    let local_vtep = ipv4("apply_network_segment.local_vtep", &seg.local_vtep)?;
    let ipv6 = ipv6_gateway(seg)?;
    let gateway = if seg.gateway.is_empty() {
        if ipv6.is_some() {
            return Err(validate::invalid(
                "apply_network_segment.ipv6_gateway",
                "an IPv6 gateway needs the network's IPv4 gateway (`gateway`): both live on the same gateway leg",
            ));
        }
        None
    } else {
        Some(Gateway {
            address: ipv4("apply_network_segment.gateway", &seg.gateway)?,
            prefix_len: u8::try_from(seg.prefix_len).unwrap_or(u8::MAX),
            ipv6,
        })
    };
    let mut remotes = Vec::with_capacity(seg.remotes.len());
    for (i, r) in seg.remotes.iter().enumerate() {
        let field = format!("apply_network_segment.remotes[{i}]");
        remotes.push(RemoteNic {
            mac: overlay::parse_mac(&r.mac).ok_or_else(|| {
                validate::invalid(
                    &format!("{field}.mac"),
                    format!("{:?} is not a MAC like 02:00:00:00:00:01", r.mac),
                )
            })?,
            ipv4: if r.ipv4.is_empty() {
                None
            } else {
                Some(ipv4(&format!("{field}.ipv4"), &r.ipv4)?)
            },
            vtep: ipv4(&format!("{field}.vtep"), &r.vtep)?,
            also_vtep: if r.also_vtep.is_empty() {
                None
            } else {
                Some(ipv4(&format!("{field}.also_vtep"), &r.also_vtep)?)
            },
        });
    }
    if seg.external && seg.gateway.is_empty() {
        return Err(validate::invalid(
            "apply_network_segment.external",
            "an external network needs a gateway (its egress leaves through the tenant's router)",
        ));
    }
    for (i, g) in seg.guarded.iter().enumerate() {
        let field = format!("apply_network_segment.guarded[{i}]");
        validate::name(&format!("{field}.vm"), &g.vm)?;
        validate::name(&format!("{field}.network"), &g.network)?;
        if !g.ipv4.is_empty() {
            ipv4(&format!("{field}.ipv4"), &g.ipv4)?;
        }
        for (j, r) in g.allow.iter().enumerate() {
            allow_rule(&format!("{field}.allow[{j}]"), r)?;
        }
    }
    let mtu = match (seg.mtu, underlay_mtu) {
        (0, Some(u)) => overlay::segment_mtu(u),
        (0, None) => {
            return Err(validate::invalid(
                "apply_network_segment.mtu",
                format!(
                    "0 asks for the underlay's MTU minus 50, but no device of this node holds the local VTEP {local_vtep}"
                ),
            ));
        }
        (m, _) => m,
    };
    let spec = SegmentSpec {
        tenant: seg.tenant.clone(),
        network: seg.network.clone(),
        vni: seg.vni,
        mtu,
        local_vtep,
        gateway,
        remotes,
    };
    overlay::validate_segment("this node", &spec)
        .map_err(|e| validate::invalid("apply_network_segment", e))?;
    Ok(spec)
}

/// Rules of a guarded NIC (validated at apply; a bad one is skipped here).
fn rules_of(g: &v1::GuardedNic) -> Vec<AllowRule> {
    g.allow
        .iter()
        .filter_map(|r| allow_rule("guarded.allow", r).ok())
        .collect()
}

/// The node's security-group state: guarded NICs of VMs defined here, and a
/// conntrack zone per segment with its ports.
pub fn firewall_spec(
    segments: &[v1::ApplyNetworkSegment],
    definitions: &BTreeMap<String, v1::CreateVm>,
) -> FirewallSpec {
    let mut nics: BTreeMap<String, GuardedNic> = BTreeMap::new();
    let mut zones = Vec::new();
    let mut guests = Vec::new();
    for seg in segments {
        let mut ports = vec![overlay::vxlan_name(&seg.tenant, &seg.network)];
        if !seg.gateway.is_empty() {
            ports.push(overlay::gateway_leg_name(&seg.tenant, &seg.network));
        }
        for def in definitions.values().filter(|d| d.tenant == seg.tenant) {
            for (i, nic) in def.nics.iter().enumerate() {
                if nic.network == seg.network {
                    let tap = vm_tap_name(&def.name, u16::try_from(i).unwrap_or(u16::MAX));
                    guests.push(tap.clone());
                    ports.push(tap);
                }
            }
        }
        zones.push(Zone {
            id: secgroup::zone_id(&seg.tenant, &seg.network),
            ports,
        });
        for g in &seg.guarded {
            let Some(def) = definitions.get(&g.vm) else {
                continue;
            };
            let on_network = def.tenant == seg.tenant
                && def
                    .nics
                    .get(g.nic as usize)
                    .is_some_and(|n| n.network == g.network);
            if !on_network {
                continue;
            }
            let tap = vm_tap_name(&g.vm, u16::try_from(g.nic).unwrap_or(u16::MAX));
            nics.entry(tap.clone()).or_insert_with(|| GuardedNic {
                tap,
                ipv4: g.ipv4.parse().ok(),
                rules: rules_of(g),
                // Its own network's gateway (every segment of the tenant lists all
                // the tenant's guarded NICs, so `seg` may be another network's).
                dhcp_server: segments
                    .iter()
                    .find(|s| s.tenant == seg.tenant && s.network == g.network)
                    .and_then(|s| s.gateway.parse().ok()),
            });
        }
    }
    FirewallSpec {
        nics: nics.into_values().collect(),
        zones,
        guests,
    }
}

/// The tenant router's rules: every guarded NIC of `tenant` with an address.
pub fn router_rules(
    segments: &[v1::ApplyNetworkSegment],
    tenant: &str,
) -> Vec<(Ipv4Addr, AllowRule)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for g in segments
        .iter()
        .filter(|s| s.tenant == tenant)
        .flat_map(|s| &s.guarded)
    {
        let Ok(ip) = g.ipv4.parse::<Ipv4Addr>() else {
            continue;
        };
        if seen.insert((g.vm.clone(), g.nic)) {
            out.extend(rules_of(g).into_iter().map(|r| (ip, r)));
        }
    }
    out
}

/// What the tenant's router enforces: its guarded NICs' rules and, when one of its
/// networks is external, egress for those networks.
pub fn router_spec(segments: &[v1::ApplyNetworkSegment], tenant: &str) -> secgroup::RouterSpec {
    let prefix_of = |s: &v1::ApplyNetworkSegment| {
        let gw: Ipv4Addr = s.gateway.parse().ok()?;
        let len = u8::try_from(s.prefix_len).ok().filter(|l| *l <= 32)?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Some(Prefix {
            addr: std::net::IpAddr::V4(Ipv4Addr::from(u32::from(gw) & mask)),
            len,
        })
    };
    let mine: Vec<&v1::ApplyNetworkSegment> =
        segments.iter().filter(|s| s.tenant == tenant).collect();
    let external: Vec<Prefix> = mine
        .iter()
        .filter(|s| s.external)
        .filter_map(|s| prefix_of(s))
        .collect();
    secgroup::RouterSpec {
        guarded: router_rules(segments, tenant),
        tenant_cidrs: mine.iter().filter_map(|s| prefix_of(s)).collect(),
        egress: (!external.is_empty()).then(|| secgroup::Egress {
            uplink: overlay::uplink_names(tenant).1,
            cidrs: external,
        }),
    }
}

/// The MTU of the device holding `addr` in `netns`, if any device holds it.
fn underlay_mtu(netns: &NetNs, addr: &str) -> Option<u32> {
    let addr: Ipv4Addr = addr.parse().ok()?;
    overlay::underlay_device(netns, addr)
        .ok()
        .flatten()
        .map(|(_, mtu)| mtu)
}

fn failed(netns: &NetNs, seg: &v1::ApplyNetworkSegment, e: impl std::fmt::Display) -> Status {
    Status::failed_precondition(format!(
        "node {}: cannot make segment {}/{}: {e}",
        netns.node(),
        seg.tenant,
        seg.network
    ))
}

/// The underlay address the node is asked to make (`underlay_device`,
/// `underlay_prefix_len`), checked; None when `local_vtep` must already be there.
pub fn underlay_request(seg: &v1::ApplyNetworkSegment) -> Result<Option<(String, u8)>, Status> {
    if seg.underlay_prefix_len == 0 {
        return Ok(None);
    }
    let len = u8::try_from(seg.underlay_prefix_len)
        .ok()
        .filter(|l| (1..=32).contains(l))
        .ok_or_else(|| {
            validate::invalid(
                "apply_network_segment.underlay_prefix_len",
                format!(
                    "{} is not a prefix length of 1 to 32",
                    seg.underlay_prefix_len
                ),
            )
        })?;
    if !network::spec::valid_ifname(&seg.underlay_device) {
        return Err(validate::invalid(
            "apply_network_segment.underlay_device",
            format!(
                "{:?} is not an interface name (the bond carrying the guest class, e.g. \"data\")",
                seg.underlay_device
            ),
        ));
    }
    Ok(Some((seg.underlay_device.clone(), len)))
}

/// SHA-256 (hex) of a segment definition as protobuf: what Observe reports as
/// `definition_digest`, and what the reconciler compares with its own.
pub fn definition_digest(seg: &v1::ApplyNetworkSegment) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(seg.encode_to_vec())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DHCP server of `seg` on this node, when it has a gateway (DHCP is served
/// from the gateway address in the tenant's router namespace; a network without a
/// gateway has no DHCP). Static leases: every NIC of the network with an address,
/// the VMs defined here (MAC as cairn-vmm gives it) and the `remotes`.
pub fn dhcp_spec(
    seg: &v1::ApplyNetworkSegment,
    mtu: u32,
    definitions: &BTreeMap<String, v1::CreateVm>,
) -> Option<DhcpSpec> {
    let gateway: Ipv4Addr = seg.gateway.parse().ok()?;
    let prefix_len = u8::try_from(seg.prefix_len).ok().filter(|l| *l <= 32)?;
    let mut hosts = Vec::new();
    for def in definitions.values().filter(|d| d.tenant == seg.tenant) {
        for (i, nic) in def.nics.iter().enumerate() {
            if nic.network != seg.network {
                continue;
            }
            let (Ok(ipv4), Some(mac)) = (
                nic.ipv4.parse::<Ipv4Addr>(),
                overlay::parse_mac(&crate::vm_nics::mac(&def.name, i)),
            ) else {
                continue;
            };
            hosts.push(DhcpHost {
                mac,
                ipv4,
                name: def.name.clone(),
            });
        }
    }
    for r in &seg.remotes {
        if let (Ok(ipv4), Some(mac)) = (r.ipv4.parse::<Ipv4Addr>(), overlay::parse_mac(&r.mac)) {
            hosts.push(DhcpHost {
                mac,
                ipv4,
                name: r.vm.clone(),
            });
        }
    }
    hosts.sort();
    hosts.dedup_by(|a, b| a.mac == b.mac);
    Some(DhcpSpec {
        tenant: seg.tenant.clone(),
        network: seg.network.clone(),
        gateway,
        prefix_len,
        mtu,
        hosts,
        // An external network's gateway forwards other names to the node's
        // resolvers through the tenant's uplink; an isolated one refuses them.
        upstream: if seg.external {
            dhcp::system_resolvers()
        } else {
            Vec::new()
        },

        ipv6_gateway: ipv6_gateway(seg).ok().flatten(),
    })
}

/// The DHCP servers wanted on this node: one per segment with a gateway.
fn dhcp_specs(
    netns: &NetNs,
    all: &[v1::ApplyNetworkSegment],
    definitions: &BTreeMap<String, v1::CreateVm>,
) -> Vec<DhcpSpec> {
    all.iter()
        .filter_map(|seg| {
            let mtu = segment_spec(seg, underlay_mtu(netns, &seg.local_vtep))
                .ok()?
                .mtu;
            dhcp_spec(seg, mtu, definitions)
        })
        .collect()
}

/// Converges `seg` (blocking: netlink, `ip`, `nft`), then the tenant's router rules,
/// the node's security groups and the DHCP servers over `all` (which includes
/// `seg`). With an underlay request the node's underlay address is made on the bond
/// first.
pub fn apply_blocking(
    netns: &NetNs,
    dhcp_dir: &Path,
    seg: &v1::ApplyNetworkSegment,
    all: &[v1::ApplyNetworkSegment],
    definitions: &BTreeMap<String, v1::CreateVm>,
) -> Result<Vec<String>, Status> {
    let underlay = underlay_request(seg)?;
    let spec = segment_spec(seg, underlay_mtu(netns, &seg.local_vtep))?;
    let mut done = Vec::new();
    if let Some((device, len)) = underlay {
        done.extend(
            overlay::ensure_underlay(netns, &spec, &device, len)
                .map_err(|e| failed(netns, seg, e))?,
        );
    }
    done.extend(overlay::apply_segment(netns, &spec).map_err(|e| failed(netns, seg, e))?);
    done.extend(
        program_blocking(netns, dhcp_dir, all, definitions).map_err(|e| failed(netns, seg, e))?,
    );
    Ok(done)
}

/// Converges every tenant router's rules, the node's security groups and the DHCP
/// servers (started, reloaded or restarted as their segment changed; stopped for a
/// network that has none any more).
pub fn program_blocking(
    netns: &NetNs,
    dhcp_dir: &Path,
    all: &[v1::ApplyNetworkSegment],
    definitions: &BTreeMap<String, v1::CreateVm>,
) -> Result<Vec<String>, network::NetworkError> {
    let mut done = Vec::new();
    let tenants: BTreeSet<&str> = all
        .iter()
        .filter(|s| !s.gateway.is_empty())
        .map(|s| s.tenant.as_str())
        .collect();
    for tenant in tenants {
        let router = NetNs::named_for_node(overlay::router_netns_name(netns, tenant), netns.node());
        if router.exists() {
            let spec = router_spec(all, tenant);
            if spec.egress.is_some() {
                done.extend(overlay::ensure_egress(netns, tenant)?);
            }
            done.extend(secgroup::apply_router(&router, &spec)?);
        }
    }
    done.extend(secgroup::apply_firewall(
        netns,
        &firewall_spec(all, definitions),
    )?);
    let wanted = dhcp_specs(netns, all, definitions);
    for (tenant, network) in dhcp::configured(dhcp_dir) {
        if !wanted
            .iter()
            .any(|d| d.tenant == tenant && d.network == network)
        {
            done.extend(dhcp::stop_dhcp(dhcp_dir, &tenant, &network));
        }
    }
    for spec in &wanted {
        done.extend(dhcp::converge_dhcp(netns, dhcp_dir, spec)?);
    }
    Ok(done)
}

/// Each segment as read back (its DHCP server's drift included), and the node's
/// security-group drift.
pub fn statuses_blocking(
    netns: &NetNs,
    dhcp_dir: &Path,
    all: &[v1::ApplyNetworkSegment],
    definitions: &BTreeMap<String, v1::CreateVm>,
) -> (Vec<v1::NetworkSegmentStatus>, Vec<String>) {
    let segments = all
        .iter()
        .map(|seg| {
            let mut status = v1::NetworkSegmentStatus {
                tenant: seg.tenant.clone(),
                network: seg.network.clone(),
                vni: seg.vni,
                definition_digest: definition_digest(seg),
                ..Default::default()
            };
            if seg.underlay_prefix_len != 0 && underlay_mtu(netns, &seg.local_vtep).is_none() {
                status.drift.push(format!(
                    "underlay address {}/{} is on no device (want it on {})",
                    seg.local_vtep, seg.underlay_prefix_len, seg.underlay_device
                ));
            }
            let spec = match segment_spec(seg, underlay_mtu(netns, &seg.local_vtep)) {
                Ok(s) => s,
                Err(e) => {
                    status.drift.push(e.message().to_owned());
                    return status;
                }
            };
            match overlay::plan_segment(netns, &spec) {
                Ok((observed, _)) => {
                    status.bridge = observed.bridge;
                    status.vxlan = observed.vxlan;
                    status.mtu = observed.mtu;
                    status.local_vtep = observed
                        .local_vtep
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    status.router_netns = observed.router_netns.clone().unwrap_or_default();
                    status.fdb = observed
                        .fdb
                        .iter()
                        .map(|(mac, vtep)| format!("{mac} -> {vtep}"))
                        .collect();
                    status.drift = observed.drift;
                    if let Some(name) = observed.router_netns {
                        let router = NetNs::named_for_node(name, netns.node());
                        if router.exists() {
                            match secgroup::router_drift(&router, &router_spec(all, &seg.tenant)) {
                                Ok(d) => status
                                    .drift
                                    .extend(d.into_iter().map(|d| format!("router: {d}"))),
                                Err(e) => status.drift.push(format!("router: cannot read: {e}")),
                            }
                        }
                    }
                }
                Err(e) => status.drift.push(format!("cannot read the segment: {e}")),
            }
            if let Some(dhcp) = dhcp_spec(seg, spec.mtu, definitions) {
                status
                    .drift
                    .extend(dhcp::dhcp_drift(netns, dhcp_dir, &dhcp));
            }
            status
        })
        .collect();
    let firewall = secgroup::firewall_drift(netns, &firewall_spec(all, definitions))
        .unwrap_or_else(|e| vec![format!("cannot read the security groups: {e}")]);
    (segments, firewall)
}

/// Removes a segment's devices (blocking); the tenant's router namespace goes with
/// its last segment on the node.
pub fn remove_blocking(
    netns: &NetNs,
    dhcp_dir: &Path,
    tenant: &str,
    network: &str,
    remaining: &[v1::ApplyNetworkSegment],
    definitions: &BTreeMap<String, v1::CreateVm>,
) -> Result<(), network::NetworkError> {
    // Its DHCP server first: a process inside the router namespace would keep it
    // alive after its file is gone.
    dhcp::stop_dhcp(dhcp_dir, tenant, network);
    overlay::remove_segment(netns, tenant, network)?;
    if !remaining.iter().any(|s| s.tenant == tenant) {
        overlay::remove_router(netns, tenant)?;
    }
    program_blocking(netns, dhcp_dir, remaining, definitions).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(port: u32, port_end: u32) -> v1::SecurityRule {
        v1::SecurityRule {
            group: "db".into(),
            from_cidr: "10.20.0.0/24".into(),
            to_cidr: String::new(),
            proto: "tcp".into(),
            port,
            port_end,
        }
    }

    fn segment() -> v1::ApplyNetworkSegment {
        v1::ApplyNetworkSegment {
            tenant: "finance".into(),
            network: "fin-db".into(),
            vni: 5001,
            mtu: 0,
            local_vtep: "10.0.0.1".into(),
            gateway: "10.30.0.1".into(),
            prefix_len: 24,
            remotes: vec![v1::SegmentRemote {
                vm: "db-2".into(),
                mac: "02:00:00:00:00:02".into(),
                ipv4: "10.30.0.6".into(),
                vtep: "10.0.0.2".into(),
                also_vtep: String::new(),
            }],
            guarded: vec![v1::GuardedNic {
                vm: "db-1".into(),
                nic: 0,
                network: "fin-db".into(),
                ipv4: "10.30.0.5".into(),
                groups: vec!["db".into()],
                allow: vec![rule(5432, 0)],
            }],
            external: false,
            underlay_prefix_len: 0,
            underlay_device: String::new(),
            ipv6_gateway: String::new(),
        }
    }

    #[test]
    fn a_segment_converts_and_mtu_0_follows_the_underlay() {
        let spec = segment_spec(&segment(), Some(9000)).expect("valid");
        assert_eq!(spec.mtu, 8950);
        assert_eq!(spec.remotes[0].vtep, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(spec.gateway.map(|g| g.prefix_len), Some(24));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut seg = segment();
        seg.remotes[0].mac = "02:00".into();
        let e = segment_spec(&seg, Some(1500)).unwrap_err();
        assert!(
            e.message().contains("apply_network_segment.remotes[0].mac"),
            "{e}"
        );
        let mut seg = segment();
        seg.vni = 0;
        let e = segment_spec(&seg, Some(1500)).unwrap_err();
        assert!(e.message().contains("VNI 0"), "{e}");
        let mut seg = segment();
        seg.guarded[0].allow[0] = rule(6000, 5000);
        let e = segment_spec(&seg, Some(1500)).unwrap_err();
        assert!(e.message().contains("guarded[0].allow[0].port_end"), "{e}");
        assert!(allow_rule("r", &rule(70000, 0)).is_err());
    }

    #[test]
    fn an_ipv6_gateway_reaches_the_segment_and_its_server_or_is_named() {
        let mut seg = segment();
        assert_eq!(
            segment_spec(&seg, Some(1500))
                .unwrap()
                .gateway
                .unwrap()
                .ipv6,
            None
        );
        seg.ipv6_gateway = "fd00:20::1".into();
        let want = Some("fd00:20::1".parse().unwrap());
        assert_eq!(
            segment_spec(&seg, Some(1500))
                .unwrap()
                .gateway
                .unwrap()
                .ipv6,
            want
        );
        let dhcp = dhcp_spec(&seg, 1450, &BTreeMap::new()).expect("a gateway serves");
        assert_eq!(dhcp.ipv6_gateway, want);
        for bad in ["10.0.0.1", "ff02::1", "fd00::/64"] {
            seg.ipv6_gateway = bad.into();
            let e = segment_spec(&seg, Some(1500)).unwrap_err();
            assert!(
                e.message().contains("apply_network_segment.ipv6_gateway")
                    && e.message().contains("not an IPv6 unicast address"),
                "{bad}: {e}"
            );
        }
        seg.ipv6_gateway = "fd00:20::1".into();
        seg.gateway.clear();
        let e = segment_spec(&seg, Some(1500)).unwrap_err();
        assert!(
            e.message().contains("needs the network's IPv4 gateway"),
            "{e}"
        );
    }

    #[test]
    fn only_nics_of_vms_defined_here_are_filtered() {
        let seg = segment();
        let mut defs = BTreeMap::new();
        assert!(
            firewall_spec(std::slice::from_ref(&seg), &defs)
                .nics
                .is_empty()
        );
        defs.insert(
            "db-1".to_owned(),
            v1::CreateVm {
                name: "db-1".into(),
                tenant: "finance".into(),
                nics: vec![v1::VmNic {
                    network: "fin-db".into(),
                    mtu: 0,
                    ipv4: "10.30.0.5".into(),
                }],
                ..Default::default()
            },
        );
        let fw = firewall_spec(std::slice::from_ref(&seg), &defs);
        assert_eq!(fw.nics.len(), 1);
        assert_eq!(fw.nics[0].tap, vm_tap_name("db-1", 0));
        assert_eq!(fw.nics[0].dhcp_server, Some(Ipv4Addr::new(10, 30, 0, 1)));
        // Listed by another network's segment first, it still gets its own gateway.
        let mut other = seg.clone();
        other.network = "fin-app".into();
        other.gateway = "10.20.0.1".into();
        let both = firewall_spec(&[other, seg.clone()], &defs);
        assert_eq!(both.nics[0].dhcp_server, Some(Ipv4Addr::new(10, 30, 0, 1)));
        assert_eq!(fw.zones[0].ports.len(), 3, "vxlan, gateway leg, tap");
        assert_eq!(
            fw.guests,
            vec![vm_tap_name("db-1", 0)],
            "the guest guard's taps"
        );
        let routed = router_rules(std::slice::from_ref(&seg), "finance");
        assert_eq!(routed.len(), 1);
        assert_eq!(routed[0].0, Ipv4Addr::new(10, 30, 0, 5));
        let mut public = seg.clone();
        public.network = "fin-pub".into();
        public.gateway = "10.60.0.1".into();
        public.external = true;
        let spec = router_spec(&[seg, public], "finance");
        assert_eq!(
            spec.tenant_cidrs,
            vec![
                Prefix::parse("10.30.0.0/24").unwrap(),
                Prefix::parse("10.60.0.0/24").unwrap()
            ]
        );
        assert_eq!(
            spec.egress.map(|e| e.cidrs),
            Some(vec![Prefix::parse("10.60.0.0/24").unwrap()])
        );
    }
}
