//! IPAM and VNIs: an IPv4 address for every VM NIC and a VXLAN network
//! identifier for every tenant network.
//!
//! Both are part of the placement (DESIGN.md): [`allocate`] is a pure
//! function of the tenants, the VMs and the previous placement, and what it
//! gives is kept in the placement (`addresses`, `networks`), which the state
//! store keeps and feeds back to the next run. The compile runs it with no
//! previous placement, so `cairn compile` shows what a first placement gives.
//!
//! Rules, per network:
//! 1. Pinned addresses (`nic … address=`) are taken first. The network and
//!    broadcast addresses and the gateway can never be pinned or given out.
//! 2. Every other NIC that had an address in the previous placement keeps it
//!    while it is still a free host address of its network. A NIC is known by
//!    its VM, its network and its rank among that VM's NICs on that network,
//!    so reordering a VM's NICs on different networks renumbers nothing.
//! 3. Addresses of NICs that left since the previous placement are held back:
//!    no NIC gets one in the run that removed its owner (in-flight traffic,
//!    ARP caches and security-group peers still name it). The next run frees
//!    them.
//! 4. Each new NIC starts at a slot derived from a hash of
//!    `tenant/network/vm/rank` (FNV-1a, stable across releases) and probes
//!    upward, wrapping, to the first address that is neither reserved, taken
//!    nor held. So even without a previous placement, adding a VM renumbers
//!    another only when their slots collide.
//!
//!    Reserved for IPAM (never handed out, may be pinned): when the network has
//!    no gateway, its first host, so that adding the conventional gateway later
//!    renumbers nothing.
//!
//! A NIC for which no address is left is reported in [`Allocation::starved`]
//! (the compile turns it into an error at the network's CIDR; the placement
//! leaves the VM unplaced). IPv6 networks get no addresses.
//!
//! VNIs: 24-bit, in [`VNI_MIN`]..=[`VNI_MAX`], unique across the repository;
//! kept from the previous placement, a removed network's VNI held for one
//! run, a new network's derived from a hash of `tenant/network`, collisions
//! probing upward in (tenant, network) order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::model::{Network, Tenant, Vm};

/// The lowest VNI given out (below are left for the operator's own segments).
pub const VNI_MIN: u32 = 4096;
/// The highest VNI (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// A tenant network as placed: its VNI and the nodes its segment spans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkPlacement {
    /// Tenant.
    pub tenant: String,
    /// Network name.
    pub name: String,
    /// Site.
    pub site: String,
    /// CIDR.
    pub cidr: String,
    /// Gateway (distributed: answers on every node of `nodes`).
    pub gateway: Option<String>,
    /// Egress with SNAT through the node's management side.
    #[serde(default)]
    pub external: bool,
    /// VXLAN network identifier, kept across placements.
    pub vni: u32,
    /// Nodes that host a placed VM (FT secondaries included) with a NIC on
    /// it, sorted: the members of its VXLAN segment.
    pub nodes: Vec<String>,
}

/// The address of one VM NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NicAddress {
    /// VM.
    pub vm: String,
    /// Tenant.
    pub tenant: String,
    /// Network.
    pub network: String,
    /// Index of the NIC in the VM's `nics`.
    pub nic: u32,
    /// IPv4 address (dotted quad; the prefix is the network's).
    pub address: String,
    /// Pinned by the operator (`address=`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

/// What [`allocate`] gives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    /// Every NIC that has an address, sorted by VM then NIC index.
    pub addresses: Vec<NicAddress>,
    /// VNI of each network, by (tenant, network).
    pub vnis: BTreeMap<(String, String), u32>,
    /// NICs no address was left for: (VM, NIC index, tenant, network).
    pub starved: Vec<(String, usize, String, String)>,
}

impl Allocation {
    /// The address of a VM's NIC.
    pub fn address(&self, vm: &str, nic: usize) -> Option<&str> {
        self.addresses
            .binary_search_by(|a| (a.vm.as_str(), a.nic as usize).cmp(&(vm, nic)))
            .ok()
            .map(|i| self.addresses[i].address.as_str())
    }
}

/// The IPv4 hosts of a network and what is never given out.
#[derive(Debug, Clone)]
pub struct Hosts {
    cidr: Cidr,
    first: u32,
    last: u32,
    network: Option<u32>,
    broadcast: Option<u32>,
    gateway: Option<u32>,
    /// The first host, kept for a gateway when the network has none.
    kept_for_gateway: Option<u32>,
}

/// Why an address cannot be pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinError {
    /// Not an IPv4 address.
    NotIpv4,
    /// Outside the network.
    Outside,
    /// The network's own address.
    NetworkAddress,
    /// The broadcast address.
    Broadcast,
    /// The gateway.
    Gateway,
}

impl Hosts {
    /// The hosts of an IPv4 network; none for IPv6 or an invalid CIDR.
    pub fn of(net: &Network) -> Option<Hosts> {
        let cidr = Cidr::parse(&net.cidr).ok()?;
        let (lo, hi) = cidr.ipv4_bounds()?;
        let edges = cidr.prefix() <= 30;
        let (first, last) = if edges { (lo + 1, hi - 1) } else { (lo, hi) };
        let gateway = net
            .gateway
            .as_deref()
            .and_then(|g| g.parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|g| (first..=last).contains(g));
        Some(Hosts {
            cidr,
            first,
            last,
            network: edges.then_some(lo),
            broadcast: edges.then_some(hi),
            gateway,
            kept_for_gateway: (net.gateway.is_none() && edges).then_some(first),
        })
    }

    /// The network.
    pub fn cidr(&self) -> Cidr {
        self.cidr
    }

    /// How many addresses IPAM can give out.
    pub fn capacity(&self) -> u64 {
        u64::from(self.last - self.first) + 1
            - u64::from(self.gateway.is_some())
            - u64::from(self.kept_for_gateway.is_some())
    }

    /// The first and last address IPAM gives out from, as text.
    pub fn range_text(&self) -> String {
        let lo = (self.first..=self.last).find(|a| self.free_for_ipam(*a));
        let hi = (self.first..=self.last)
            .rev()
            .find(|a| self.free_for_ipam(*a));
        match (lo, hi) {
            (Some(lo), Some(hi)) if lo != hi => {
                format!("{} to {}", Ipv4Addr::from(lo), Ipv4Addr::from(hi))
            }
            (Some(lo), _) => Ipv4Addr::from(lo).to_string(),
            _ => "no address".to_owned(),
        }
    }

    /// Whether an operator may pin `text`.
    pub fn check_pin(&self, text: &str) -> Result<u32, PinError> {
        let a = u32::from(text.parse::<Ipv4Addr>().map_err(|_| PinError::NotIpv4)?);
        let (lo, hi) = self.cidr.ipv4_bounds().unwrap_or((0, 0));
        if !(lo..=hi).contains(&a) {
            return Err(PinError::Outside);
        }
        if self.network == Some(a) {
            return Err(PinError::NetworkAddress);
        }
        if self.broadcast == Some(a) {
            return Err(PinError::Broadcast);
        }
        if self.gateway == Some(a) {
            return Err(PinError::Gateway);
        }
        Ok(a)
    }

    fn free_for_ipam(&self, a: u32) -> bool {
        (self.first..=self.last).contains(&a)
            && self.gateway != Some(a)
            && self.kept_for_gateway != Some(a)
    }
}

/// FNV-1a, 64 bits: a hash whose values never change across releases.
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h ^= u64::from(b'/');
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in p.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// `n` in decimal, written into `buf` (what `n.to_string()` gives, without
/// allocating).
fn decimal(mut n: usize, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[at..]).expect("ASCII digits")
}

/// A NIC's identity across placements: (VM, tenant, network, rank among the
/// VM's NICs on that network), borrowed from the VMs or the previous placement.
type NicKey<'a> = (&'a str, &'a str, &'a str, usize);

/// Gives every NIC of `vms` an address and every network of `tenants` a VNI,
/// keeping what `previous` gave (see the module docs).
pub fn allocate(
    tenants: &[Tenant],
    vms: &[impl std::borrow::Borrow<Vm>],
    previous: Option<&crate::place::Placement>,
) -> Allocation {
    let mut out = Allocation::default();
    // The previous addresses, by NIC identity.
    let mut before: BTreeMap<NicKey<'_>, u32> = BTreeMap::new();
    if let Some(p) = previous {
        let mut sorted: Vec<&NicAddress> = p.addresses.iter().collect();
        sorted.sort_by(|a, b| (&a.vm, a.nic).cmp(&(&b.vm, b.nic)));
        let mut rank: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for a in sorted {
            let r = rank.entry((&a.vm, &a.network)).or_default();
            if let Ok(ip) = a.address.parse::<Ipv4Addr>() {
                before.insert(
                    (a.vm.as_str(), a.tenant.as_str(), a.network.as_str(), *r),
                    u32::from(ip),
                );
            }
            *r += 1;
        }
    }
    // The NICs of each network, with their identity and pin.
    struct Want<'v> {
        vm: &'v Vm,
        nic: usize,
        key: NicKey<'v>,
        pin: Option<u32>,
    }
    let mut by_net: BTreeMap<(&str, &str), Vec<Want<'_>>> = BTreeMap::new();
    // Point lookups only (nothing iterates it), and only needed to find the
    // previous addresses that are gone.
    let mut present: crate::place::fasthash::FxHashSet<NicKey<'_>> = Default::default();
    for vm in vms {
        let vm: &Vm = std::borrow::Borrow::borrow(vm);
        for (i, n) in vm.nics.iter().enumerate() {
            // The NIC's rank among the VM's NICs on its network.
            let r = vm.nics[..i]
                .iter()
                .filter(|m| m.network == n.network)
                .count();
            let key = (vm.name.as_str(), vm.tenant.as_str(), n.network.as_str(), r);
            if !before.is_empty() {
                present.insert(key);
            }
            let pin = n
                .address
                .as_deref()
                .filter(|_| n.pinned)
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
                .map(u32::from);
            by_net
                .entry((vm.tenant.as_str(), n.network.as_str()))
                .or_default()
                .push(Want {
                    vm,
                    nic: i,
                    key,
                    pin,
                });
        }
    }
    // The previous addresses of NICs that are gone, per network: held back from new
    // NICs (grouped once; a scan of every previous address per network was
    // O(networks x NICs)).
    let mut gone: BTreeMap<(&str, &str), BTreeSet<u32>> = BTreeMap::new();
    for (k, a) in &before {
        if !present.contains(k) {
            gone.entry((k.1, k.2)).or_default().insert(*a);
        }
    }
    let none = BTreeSet::new();
    for t in tenants {
        for net in &t.networks {
            let Some(hosts) = Hosts::of(net) else {
                continue;
            };
            let Some(wants) = by_net.get(&(t.name.as_str(), net.name.as_str())) else {
                continue;
            };
            let mut given: BTreeMap<(&str, usize), (u32, bool)> = BTreeMap::new();
            let mut taken: BTreeSet<u32> = BTreeSet::new();
            for w in wants {
                if let Some(a) = w.pin
                    && hosts.check_pin(&Ipv4Addr::from(a).to_string()).is_ok()
                    && taken.insert(a)
                {
                    given.insert((w.vm.name.as_str(), w.nic), (a, true));
                }
            }
            for w in wants.iter().filter(|w| w.pin.is_none()) {
                if let Some(&a) = before.get(&w.key)
                    && hosts.free_for_ipam(a)
                    && taken.insert(a)
                {
                    given.insert((w.vm.name.as_str(), w.nic), (a, false));
                }
            }
            let held = gone
                .get(&(t.name.as_str(), net.name.as_str()))
                .unwrap_or(&none);
            let span = u64::from(hosts.last - hosts.first) + 1;
            for w in wants {
                if w.pin.is_some() || given.contains_key(&(w.vm.name.as_str(), w.nic)) {
                    continue;
                }
                let mut digits = [0u8; 20];
                let start = fnv(&[
                    &t.name,
                    &net.name,
                    &w.vm.name,
                    decimal(w.key.3, &mut digits),
                ]) % span;
                let found = (0..span)
                    .map(|j| hosts.first + ((start + j) % span) as u32)
                    .find(|a| hosts.free_for_ipam(*a) && !taken.contains(a) && !held.contains(a));
                match found {
                    Some(a) => {
                        taken.insert(a);
                        given.insert((w.vm.name.as_str(), w.nic), (a, false));
                    }
                    None => out.starved.push((
                        w.vm.name.clone(),
                        w.nic,
                        t.name.clone(),
                        net.name.clone(),
                    )),
                }
            }
            out.addresses.extend(
                given
                    .into_iter()
                    .map(|((vm, nic), (a, pinned))| NicAddress {
                        vm: vm.to_owned(),
                        tenant: t.name.clone(),
                        network: net.name.clone(),
                        nic: nic as u32,
                        address: Ipv4Addr::from(a).to_string(),
                        pinned,
                    }),
            );
        }
    }
    out.addresses
        .sort_by(|a, b| (&a.vm, a.nic).cmp(&(&b.vm, b.nic)));
    out.starved.sort();
    out.vnis = vnis(tenants, previous);
    out
}

/// The VNI of every network (see the module docs).
fn vnis(
    tenants: &[Tenant],
    previous: Option<&crate::place::Placement>,
) -> BTreeMap<(String, String), u32> {
    let mut nets: Vec<(String, String)> = tenants
        .iter()
        .flat_map(|t| t.networks.iter().map(|n| (t.name.clone(), n.name.clone())))
        .collect();
    nets.sort();
    nets.dedup();
    let before: BTreeMap<(String, String), u32> = previous
        .iter()
        .flat_map(|p| p.networks.iter())
        .filter(|n| (VNI_MIN..=VNI_MAX).contains(&n.vni))
        .map(|n| ((n.tenant.clone(), n.name.clone()), n.vni))
        .collect();
    let wanted: BTreeSet<&(String, String)> = nets.iter().collect();
    let held: BTreeSet<u32> = before
        .iter()
        .filter(|(k, _)| !wanted.contains(k))
        .map(|(_, v)| *v)
        .collect();
    let mut out = BTreeMap::new();
    let mut taken = BTreeSet::new();
    for k in &nets {
        if let Some(&v) = before.get(k)
            && taken.insert(v)
        {
            out.insert(k.clone(), v);
        }
    }
    let span = u64::from(VNI_MAX - VNI_MIN) + 1;
    for k in &nets {
        if out.contains_key(k) {
            continue;
        }
        let start = fnv(&[&k.0, &k.1]) % span;
        // More networks than 2^24 - 4096 cannot be written down; the probe ends.
        if let Some(v) = (0..span)
            .map(|j| VNI_MIN + ((start + j) % span) as u32)
            .find(|v| !taken.contains(v) && !held.contains(v))
        {
            taken.insert(v);
            out.insert(k.clone(), v);
        }
    }
    out
}
