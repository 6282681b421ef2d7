//! HTB traffic classes on the bond device: plan, observe, converge.
//!
//! Changes are made with the iproute2 `tc` binary: `netlink-packet-route`
//! 0.34 has no HTB option types, and hand-encoding `tc_htb_opt` plus the
//! burst/buffer tick arithmetic would duplicate what `tc` already gets right.
//! Observation does not parse `tc` output: it dumps qdiscs, classes and
//! filters over rtnetlink and decodes `TCA_HTB_*` options itself
//! (`tc -j class show` prints no JSON for HTB classes in iproute2 6.1).
//!
//! Layout (all ids hex, as `tc` prints them):
//! - root qdisc `1:` htb, `default` = the default class's minor;
//! - class `1:1` at the bond capacity (rate = ceil = capacity);
//! - one class `1:<minor>` per traffic class under `1:1`
//!   (storage 10, migration 20, guest 30, management 40, replication 50),
//!   rate = min, ceil = max or capacity, quantum = weight × 64 KiB, prio 0;
//! - one u32 filter per marked class and IP version, matching the DSCP bits
//!   of the IPv4 TOS / IPv6 traffic-class byte (mask 0xfc, ECN ignored).

use netlink_packet_core::{Nla, NlasIterator};
use netlink_packet_route::tc::{TcAttribute, TcFilterU32Option, TcMessage, TcOption, TcStats2};

use crate::drift::Drift;
use crate::netns::NetNs;
use crate::nl::{NlError, Rtnl, TcDump};
use crate::spec::{BondSpec, TrafficKind};

/// HTB quantum per unit of weight: one maximal GSO packet (64 KiB).
///
/// HTB's deficit round robin lets a class send one packet per turn whatever
/// its deficit, so a quantum below the packet size makes every class send one
/// packet per turn and the weights stop mattering. With GSO/TSO (veth, any
/// modern NIC) packets reach 64 KiB: measured on veth, quantum = weight × 1514
/// split a 4:1 excess 1:1; weight × 64 KiB splits it by weight.
pub const QUANTUM_PER_WEIGHT: u32 = 65_536;
/// HTB major handle of the root qdisc.
pub const HTB_MAJOR: u16 = 1;
/// Minor id of the capacity class `1:1`.
pub const ROOT_CLASS_MINOR: u16 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Errors of running `tc`.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    /// `tc` could not be started.
    #[error("cannot run `tc` (iproute2): {0}")]
    Spawn(#[source] std::io::Error),
    /// `tc` rejected a command.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What tc printed.
        stderr: String,
    },
}

/// Formats a rate for messages (`50Mbit/s`, `1.5Gbit/s`).
pub fn fmt_bps(bps: u64) -> String {
    let units = [
        (1_000_000_000_000u64, "Tbit/s"),
        (1_000_000_000, "Gbit/s"),
        (1_000_000, "Mbit/s"),
        (1_000, "Kbit/s"),
    ];
    for (div, unit) in units {
        if bps >= div {
            let v = bps as f64 / div as f64;
            return if bps.is_multiple_of(div) {
                format!("{}{unit}", bps / div)
            } else {
                format!("{v:.2}{unit}")
            };
        }
    }
    format!("{bps}bit/s")
}

/// One planned HTB class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedClass {
    /// Traffic type.
    pub kind: TrafficKind,
    /// Minor class id under `1:`.
    pub minor: u16,
    /// Guaranteed rate, bytes per second (what the kernel stores).
    pub rate_bytes: u64,
    /// Ceiling, bytes per second.
    pub ceil_bytes: u64,
    /// DRR quantum in bytes.
    pub quantum: u32,
}

/// One planned u32 DSCP filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FilterRule {
    /// Ethertype (0x0800 or 0x86dd).
    pub protocol: u16,
    /// Filter preference.
    pub pref: u16,
    /// Target class minor.
    pub flowid_minor: u16,
    /// Key value (host order, as the selector's 32-bit word).
    pub value: u32,
    /// Key mask.
    pub mask: u32,
    /// Key offset in the network header.
    pub off: i32,
}

/// The HTB layout a spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtbPlan {
    /// Capacity in bytes per second (class `1:1`).
    pub capacity_bytes: u64,
    /// Minor of the default class.
    pub default_minor: u16,
    /// Per-kind classes.
    pub classes: Vec<PlannedClass>,
    /// Filters, sorted.
    pub filters: Vec<FilterRule>,
}

impl HtbPlan {
    /// Plans the HTB tree for `spec` at `capacity_bps`; `None` if the spec
    /// has no traffic classes (then the device keeps no HTB root).
    pub fn new(spec: &BondSpec, capacity_bps: u64) -> Option<Self> {
        let default = spec.default_class()?;
        let capacity_bytes = capacity_bps / 8;
        let mut classes: Vec<PlannedClass> = spec
            .classes
            .iter()
            .map(|c| PlannedClass {
                kind: c.name,
                minor: c.name.class_minor(),
                rate_bytes: c.min_bps / 8,
                ceil_bytes: c.max_bps.unwrap_or(capacity_bps) / 8,
                quantum: c.weight * QUANTUM_PER_WEIGHT,
            })
            .collect();
        classes.sort_by_key(|c| c.minor);
        let mut filters = Vec::new();
        for c in &classes {
            let Some(tos) = c.kind.tos() else { continue };
            filters.push(FilterRule {
                protocol: ETH_P_IP,
                pref: c.minor,
                flowid_minor: c.minor,
                value: u32::from(tos) << 16,
                mask: 0x00fc_0000,
                off: 0,
            });
            filters.push(FilterRule {
                protocol: ETH_P_IPV6,
                pref: 100 + c.minor,
                flowid_minor: c.minor,
                value: u32::from(tos) << 20,
                mask: 0x0fc0_0000,
                off: 0,
            });
        }
        filters.sort();
        Some(Self {
            capacity_bytes,
            default_minor: default.class_minor(),
            classes,
            filters,
        })
    }
}

/// The root qdisc as observed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObservedRootQdisc {
    /// Qdisc kind (`htb`, `noqueue`, ...).
    pub kind: String,
    /// Handle major.
    pub major: u16,
    /// HTB default class minor, for htb.
    pub default_minor: Option<u16>,
}

/// An HTB class as observed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObservedClass {
    /// Minor id under `1:`.
    pub minor: u16,
    /// Parent minor (0 for the root).
    pub parent_minor: u16,
    /// Traffic type for known minors.
    pub kind: Option<TrafficKind>,
    /// Rate in bits per second.
    pub rate_bps: u64,
    /// Ceiling in bits per second.
    pub ceil_bps: u64,
    /// Quantum in bytes.
    pub quantum: u32,
    /// Priority.
    pub prio: u32,
    /// Packets sent through this class so far (a counter, not configuration;
    /// never part of drift).
    pub sent_packets: u64,
}

/// The QoS configuration of a device as observed over netlink.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ObservedQos {
    /// Root qdisc, if any non-default one.
    pub root: Option<ObservedRootQdisc>,
    /// HTB classes under the root.
    pub classes: Vec<ObservedClass>,
    /// u32 filters attached to `1:` (rules only, sorted).
    pub filters: Vec<FilterRuleView>,
}

/// A filter rule as observed (serializable view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct FilterRuleView {
    /// Ethertype.
    pub protocol: u16,
    /// Preference.
    pub pref: u16,
    /// Target class minor.
    pub flowid_minor: u16,
    /// Key value.
    pub value: u32,
    /// Key mask.
    pub mask: u32,
    /// Key offset.
    pub off: i32,
}

impl From<FilterRule> for FilterRuleView {
    fn from(r: FilterRule) -> Self {
        Self {
            protocol: r.protocol,
            pref: r.pref,
            flowid_minor: r.flowid_minor,
            value: r.value,
            mask: r.mask,
            off: r.off,
        }
    }
}

impl ObservedQos {
    /// The class of a traffic kind.
    pub fn class(&self, kind: TrafficKind) -> Option<&ObservedClass> {
        self.classes
            .iter()
            .find(|c| c.kind == Some(kind) && c.parent_minor == ROOT_CLASS_MINOR)
    }
}

fn options_bytes(msg: &TcMessage) -> Option<Vec<u8>> {
    msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::Other(nla) => {
                let mut buf = vec![0u8; nla.value_len()];
                nla.emit_value(&mut buf);
                Some(buf)
            }
            _ => None,
        }),
        _ => None,
    })
}

fn sent_packets(msg: &TcMessage) -> u64 {
    let mut packets = None;
    for a in &msg.attributes {
        match a {
            TcAttribute::Stats2(list) => {
                for st in list {
                    if let TcStats2::Basic(b) = st {
                        packets = Some(u64::from(b.packets));
                    }
                }
            }
            TcAttribute::Stats(st) if packets.is_none() => packets = Some(u64::from(st.packets)),
            _ => {}
        }
    }
    packets.unwrap_or(0)
}

fn kind_of(msg: &TcMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.as_str()),
        _ => None,
    })
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8)
        .map(|s| u64::from_ne_bytes(s.try_into().expect("8 bytes")))
}

/// Decoded `TCA_HTB_PARMS` (+ 64-bit rates) of a class.
fn decode_htb_class(opts: &[u8]) -> Option<(u64, u64, u32, u32)> {
    const TCA_HTB_PARMS: u16 = 1;
    const TCA_HTB_RATE64: u16 = 6;
    const TCA_HTB_CEIL64: u16 = 7;
    let (mut rate, mut ceil, mut quantum, mut prio) = (None, None, 0, 0);
    let (mut rate64, mut ceil64) = (None, None);
    for nla in NlasIterator::new(opts) {
        let nla = nla.ok()?;
        let v = nla.value();
        match nla.kind() {
            TCA_HTB_PARMS => {
                // struct tc_htb_opt: rate(tc_ratespec, 12 B; .rate at 8),
                // ceil(12 B; .rate at 20), buffer, cbuffer, quantum(32),
                // level, prio(40).
                rate = u32_at(v, 8).map(u64::from);
                ceil = u32_at(v, 20).map(u64::from);
                quantum = u32_at(v, 32)?;
                prio = u32_at(v, 40)?;
            }
            TCA_HTB_RATE64 => rate64 = u64_at(v, 0),
            TCA_HTB_CEIL64 => ceil64 = u64_at(v, 0),
            _ => {}
        }
    }
    Some((rate64.or(rate)?, ceil64.or(ceil)?, quantum, prio))
}

/// Decoded `TCA_HTB_INIT.defcls` of an htb qdisc.
fn decode_htb_default(opts: &[u8]) -> Option<u16> {
    const TCA_HTB_INIT: u16 = 2;
    NlasIterator::new(opts)
        .filter_map(|n| n.ok())
        .find(|n| n.kind() == TCA_HTB_INIT)
        .and_then(|n| {
            // struct tc_htb_glob { version, rate2quantum, defcls, debug, direct_pkts }
            u32_at(n.value(), 8).map(|d| d as u16)
        })
}

/// Reads the device's QoS configuration over rtnetlink.
pub fn observe_qos(rtnl: &mut Rtnl, ifindex: u32) -> Result<ObservedQos, NlError> {
    let mut out = ObservedQos::default();
    for q in rtnl.tc_dump(TcDump::Qdisc, ifindex, None)? {
        if u32::from(q.header.parent) != 0xFFFF_FFFF {
            continue;
        }
        let kind = kind_of(&q).unwrap_or_default().to_owned();
        let default_minor = if kind == "htb" {
            options_bytes(&q).as_deref().and_then(decode_htb_default)
        } else {
            None
        };
        out.root = Some(ObservedRootQdisc {
            kind,
            major: q.header.handle.major,
            default_minor,
        });
    }
    let Some(root) = &out.root else {
        return Ok(out);
    };
    if root.kind != "htb" {
        return Ok(out);
    }
    let major = root.major;
    for c in rtnl.tc_dump(TcDump::Class, ifindex, None)? {
        if kind_of(&c) != Some("htb") || c.header.handle.major != major {
            continue;
        }
        let Some((rate, ceil, quantum, prio)) =
            options_bytes(&c).as_deref().and_then(decode_htb_class)
        else {
            continue;
        };
        let parent = c.header.parent;
        let parent_minor = if parent.major == major {
            parent.minor
        } else {
            0
        };
        out.classes.push(ObservedClass {
            minor: c.header.handle.minor,
            parent_minor,
            kind: if parent_minor == ROOT_CLASS_MINOR {
                TrafficKind::from_class_minor(c.header.handle.minor)
            } else {
                None
            },
            rate_bps: rate * 8,
            ceil_bps: ceil * 8,
            quantum,
            prio,
            sent_packets: sent_packets(&c),
        });
    }
    out.classes.sort_by_key(|c| c.minor);
    let parent = u32::from(major) << 16;
    for f in rtnl.tc_dump(TcDump::Filter, ifindex, Some(parent))? {
        if kind_of(&f) != Some("u32") {
            continue;
        }
        let protocol = u16::from_be((f.header.info & 0xffff) as u16);
        let pref = (f.header.info >> 16) as u16;
        let mut flowid = None;
        let mut keys = Vec::new();
        for a in &f.attributes {
            if let TcAttribute::Options(opts) = a {
                for o in opts {
                    match o {
                        TcOption::U32(TcFilterU32Option::ClassId(h)) => flowid = Some(h.minor),
                        TcOption::U32(TcFilterU32Option::Selector(s)) => {
                            keys.extend(s.keys.iter().cloned())
                        }
                        _ => {}
                    }
                }
            }
        }
        let (Some(flowid_minor), [key]) = (flowid, keys.as_slice()) else {
            continue;
        };
        out.filters.push(FilterRuleView {
            protocol,
            pref,
            flowid_minor,
            value: key.val,
            mask: key.mask,
            off: key.off,
        });
    }
    out.filters.sort();
    Ok(out)
}

/// Differences between the plan and the device.
pub fn qos_drift(plan: Option<&HtbPlan>, observed: &ObservedQos) -> Vec<Drift> {
    let mut drift = Vec::new();
    let Some(plan) = plan else {
        if let Some(root) = &observed.root
            && root.kind == "htb"
        {
            drift.push(Drift::UnexpectedQdisc {
                kind: root.kind.clone(),
            });
        }
        return drift;
    };
    match &observed.root {
        Some(r) if r.kind == "htb" && r.major == HTB_MAJOR => {
            if r.default_minor != Some(plan.default_minor) {
                drift.push(Drift::DefaultClassChanged {
                    want: plan.default_minor,
                    have: r.default_minor,
                });
            }
        }
        other => {
            drift.push(Drift::QdiscMissing {
                have: other.as_ref().map(|r| r.kind.clone()),
            });
            return drift;
        }
    }
    let cap_bps = plan.capacity_bytes * 8;
    match observed
        .classes
        .iter()
        .find(|c| c.minor == ROOT_CLASS_MINOR && c.parent_minor == 0)
    {
        None => drift.push(Drift::CapacityClassMissing),
        Some(c) if c.rate_bps != cap_bps || c.ceil_bps != cap_bps => {
            drift.push(Drift::CapacityChanged {
                want_bps: cap_bps,
                have_bps: c.rate_bps,
            })
        }
        Some(_) => {}
    }
    for want in &plan.classes {
        let Some(have) = observed.class(want.kind) else {
            drift.push(Drift::ClassMissing { class: want.kind });
            continue;
        };
        if have.rate_bps != want.rate_bytes * 8 {
            drift.push(Drift::ClassRateChanged {
                class: want.kind,
                want_bps: want.rate_bytes * 8,
                have_bps: have.rate_bps,
            });
        }
        if have.ceil_bps != want.ceil_bytes * 8 {
            drift.push(Drift::ClassCeilChanged {
                class: want.kind,
                want_bps: want.ceil_bytes * 8,
                have_bps: have.ceil_bps,
            });
        }
        if have.quantum != want.quantum || have.prio != 0 {
            drift.push(Drift::ClassShareChanged {
                class: want.kind,
                want_quantum: want.quantum,
                have_quantum: have.quantum,
            });
        }
    }
    for have in &observed.classes {
        let known =
            have.minor == ROOT_CLASS_MINOR || plan.classes.iter().any(|p| p.minor == have.minor);
        if !known {
            drift.push(Drift::UnexpectedClass { minor: have.minor });
        }
    }
    let want_filters: Vec<FilterRuleView> = plan.filters.iter().copied().map(Into::into).collect();
    if want_filters != observed.filters {
        drift.push(Drift::FiltersChanged {
            want: want_filters.len(),
            have: observed.filters.len(),
        });
    }
    drift
}

fn run_tc(ns: &NetNs, args: &[String]) -> Result<String, TcError> {
    let mut full = ns.iproute_args();
    full.extend_from_slice(args);
    let out = std::process::Command::new("tc")
        .args(&full)
        .output()
        .map_err(TcError::Spawn)?;
    let command = format!("tc {}", full.join(" "));
    if !out.status.success() {
        return Err(TcError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(command)
}

fn argv(s: String) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// Brings the device's QoS to the plan, touching only what differs.
/// Returns the `tc` commands it ran (empty when nothing drifted).
pub fn converge_qos(
    ns: &NetNs,
    dev: &str,
    plan: Option<&HtbPlan>,
    observed: &ObservedQos,
) -> Result<Vec<String>, TcError> {
    let mut actions = Vec::new();
    let drift = qos_drift(plan, observed);
    if drift.is_empty() {
        return Ok(actions);
    }
    let Some(plan) = plan else {
        actions.push(run_tc(ns, &argv(format!("qdisc del dev {dev} root")))?);
        return Ok(actions);
    };
    let root_ok = matches!(&observed.root, Some(r) if r.kind == "htb" && r.major == HTB_MAJOR);
    let fresh = !root_ok;
    if fresh {
        // Replacing the root (or creating it) starts from an empty tree.
        actions.push(run_tc(
            ns,
            &argv(format!(
                "qdisc replace dev {dev} root handle 1: htb default {:x}",
                plan.default_minor
            )),
        )?);
    } else if drift
        .iter()
        .any(|d| matches!(d, Drift::DefaultClassChanged { .. }))
    {
        actions.push(run_tc(
            ns,
            &argv(format!(
                "qdisc change dev {dev} root handle 1: htb default {:x}",
                plan.default_minor
            )),
        )?);
    }
    let filters_drift = fresh
        || drift
            .iter()
            .any(|d| matches!(d, Drift::FiltersChanged { .. }));
    let extra: Vec<u16> = drift
        .iter()
        .filter_map(|d| match d {
            Drift::UnexpectedClass { minor } => Some(*minor),
            _ => None,
        })
        .collect();
    // Filters may point at classes about to change or go; drop them first.
    if !fresh && (filters_drift || !extra.is_empty()) && !observed.filters.is_empty() {
        actions.push(run_tc(
            ns,
            &argv(format!("filter del dev {dev} parent 1:")),
        )?);
    }
    for minor in extra.iter().rev() {
        actions.push(run_tc(
            ns,
            &argv(format!("class del dev {dev} classid 1:{minor:x}")),
        )?);
    }
    let cap_bits = plan.capacity_bytes * 8;
    if fresh
        || drift.iter().any(|d| {
            matches!(
                d,
                Drift::CapacityClassMissing | Drift::CapacityChanged { .. }
            )
        })
    {
        actions.push(run_tc(
            ns,
            &argv(format!(
                "class replace dev {dev} parent 1: classid 1:1 htb rate {cap_bits}bit ceil {cap_bits}bit quantum {QUANTUM_PER_WEIGHT}"
            )),
        )?);
    }
    for c in &plan.classes {
        let touched = fresh
            || drift.iter().any(|d| match d {
                Drift::ClassMissing { class }
                | Drift::ClassRateChanged { class, .. }
                | Drift::ClassCeilChanged { class, .. }
                | Drift::ClassShareChanged { class, .. } => *class == c.kind,
                _ => false,
            });
        if !touched {
            continue;
        }
        actions.push(run_tc(
            ns,
            &argv(format!(
                "class replace dev {dev} parent 1:1 classid 1:{:x} htb rate {}bit ceil {}bit quantum {} prio 0",
                c.minor,
                c.rate_bytes * 8,
                c.ceil_bytes * 8,
                c.quantum
            )),
        )?);
    }
    if filters_drift || !extra.is_empty() {
        for f in &plan.filters {
            let tos = if f.protocol == ETH_P_IP {
                f.value >> 16
            } else {
                f.value >> 20
            };
            let (proto, field) = if f.protocol == ETH_P_IP {
                ("ip", "ip dsfield")
            } else {
                ("ipv6", "ip6 priority")
            };
            actions.push(run_tc(
                ns,
                &argv(format!(
                    "filter add dev {dev} parent 1: protocol {proto} pref {} u32 match {field} 0x{tos:02x} 0xfc flowid 1:{:x}",
                    f.pref, f.flowid_minor
                )),
            )?);
        }
    }
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{BondMode, TrafficClassSpec};

    fn spec() -> BondSpec {
        BondSpec {
            name: "data".into(),
            mode: BondMode::ActiveBackup,
            members: vec!["a".into()],
            mtu: 1500,
            miimon: 100,
            classes: vec![
                TrafficClassSpec {
                    name: TrafficKind::Guest,
                    min_bps: 30_000_000,
                    max_bps: None,
                    weight: 4,
                },
                TrafficClassSpec {
                    name: TrafficKind::Storage,
                    min_bps: 50_000_000,
                    max_bps: Some(80_000_000),
                    weight: 2,
                },
            ],
            capacity_bps: None,
        }
    }

    #[test]
    fn plan_maps_min_max_weight_to_rate_ceil_quantum() {
        let plan = HtbPlan::new(&spec(), 100_000_000).expect("plan");
        assert_eq!(plan.capacity_bytes, 12_500_000);
        assert_eq!(plan.default_minor, 0x30);
        assert_eq!(
            plan.classes[0].kind,
            TrafficKind::Storage,
            "sorted by class id"
        );
        assert_eq!(plan.classes[0].rate_bytes, 6_250_000);
        assert_eq!(plan.classes[0].ceil_bytes, 10_000_000);
        assert_eq!(plan.classes[0].quantum, 2 * QUANTUM_PER_WEIGHT);
        assert_eq!(plan.classes[1].ceil_bytes, 12_500_000, "no max: capacity");
    }

    #[test]
    fn filters_match_dscp_bits_for_both_ip_versions() {
        let plan = HtbPlan::new(&spec(), 100_000_000).expect("plan");
        // Guest is unmarked (the default class): only storage has filters.
        assert_eq!(plan.filters.len(), 2);
        let v4 = plan
            .filters
            .iter()
            .find(|f| f.protocol == ETH_P_IP)
            .unwrap();
        assert_eq!((v4.value, v4.mask, v4.off), (0x0088_0000, 0x00fc_0000, 0));
        let v6 = plan
            .filters
            .iter()
            .find(|f| f.protocol == ETH_P_IPV6)
            .unwrap();
        assert_eq!((v6.value, v6.mask), (0x0880_0000, 0x0fc0_0000));
        assert_eq!(v4.flowid_minor, 0x10);
    }

    #[test]
    fn no_classes_means_no_plan_and_htb_is_drift() {
        let mut s = spec();
        s.classes.clear();
        assert!(HtbPlan::new(&s, 1_000_000).is_none());
        let observed = ObservedQos {
            root: Some(ObservedRootQdisc {
                kind: "htb".into(),
                major: 1,
                default_minor: Some(0x30),
            }),
            ..Default::default()
        };
        assert_eq!(
            qos_drift(None, &observed),
            vec![Drift::UnexpectedQdisc { kind: "htb".into() }]
        );
    }

    #[test]
    fn decodes_htb_class_options() {
        // TCA_HTB_PARMS with rate 6_250_000 B/s, ceil 12_500_000 B/s, quantum 3028, prio 0.
        let mut parms = vec![0u8; 44];
        parms[8..12].copy_from_slice(&6_250_000u32.to_ne_bytes());
        parms[20..24].copy_from_slice(&12_500_000u32.to_ne_bytes());
        parms[32..36].copy_from_slice(&3028u32.to_ne_bytes());
        let mut nla = Vec::new();
        nla.extend_from_slice(&(4 + parms.len() as u16).to_ne_bytes());
        nla.extend_from_slice(&1u16.to_ne_bytes());
        nla.extend_from_slice(&parms);
        assert_eq!(
            decode_htb_class(&nla),
            Some((6_250_000, 12_500_000, 3028, 0))
        );
        // A 64-bit rate attribute wins over the saturated 32-bit field.
        let mut rate64 = Vec::new();
        rate64.extend_from_slice(&12u16.to_ne_bytes());
        rate64.extend_from_slice(&6u16.to_ne_bytes());
        rate64.extend_from_slice(&(5_000_000_000u64).to_ne_bytes());
        let mut both = nla.clone();
        both.extend_from_slice(&rate64);
        assert_eq!(decode_htb_class(&both).map(|r| r.0), Some(5_000_000_000));
    }

    #[test]
    fn rates_format_for_operators() {
        assert_eq!(fmt_bps(50_000_000), "50Mbit/s");
        assert_eq!(fmt_bps(1_500_000_000), "1.50Gbit/s");
        assert_eq!(fmt_bps(999), "999bit/s");
    }
}
