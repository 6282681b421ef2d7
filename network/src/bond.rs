//! Bonds: capability detection, the kernel-bond path, the bridge fallback,
//! and `apply_bond` / `observe_bond`.

use netlink_packet_route::link::{
    BondMode as NlBondMode, InfoBond, InfoData, InfoKind, LinkAttribute, LinkInfo, LinkMessage,
};
use serde::Serialize;

use crate::NetworkError;
use crate::drift::Drift;
use crate::netns::NetNs;
use crate::nl::{LinkState, NlError, Rtnl};
use crate::qos::{HtbPlan, ObservedQos, converge_qos, observe_qos, qos_drift};
use crate::spec::{BondMode, BondSpec, validate_capacity, validate_spec};

/// How a bond is realised on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BondBackend {
    /// A Linux bonding device configured over netlink.
    KernelBond,
    /// A bridge named after the bond with only the live member attached,
    /// swapped by [`crate::FailoverMonitor`]: active-backup only.
    BridgeFallback,
}

impl BondBackend {
    /// Short name for inventory and status.
    pub fn as_str(self) -> &'static str {
        match self {
            BondBackend::KernelBond => "kernel-bond",
            BondBackend::BridgeFallback => "bridge-fallback",
        }
    }
}

/// Result of bonding capability detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BondCapability {
    /// The backend this node uses.
    pub backend: BondBackend,
    /// Why (what was probed and what the kernel said).
    pub reason: String,
}

const PROBE_NAME: &str = "cairnbondprobe";

/// Detects whether the kernel can create bonds. If the bonding driver is
/// present (`/sys/module/bonding`), yes; otherwise asks the kernel to create
/// a probe bond (`RTM_NEWLINK` kind `bond`) in `ns` and deletes it again:
/// that is the authoritative test (a loadable module gets loaded, an absent
/// driver answers `EOPNOTSUPP`). The result is cached for the process.
pub fn detect_bonding(ns: &NetNs) -> Result<BondCapability, NetworkError> {
    // The answer is a property of the kernel, not of a namespace: probe once.
    static DETECTED: std::sync::OnceLock<BondCapability> = std::sync::OnceLock::new();
    if let Some(c) = DETECTED.get() {
        return Ok(c.clone());
    }
    let cap = probe_bonding(ns)?;
    Ok(DETECTED.get_or_init(|| cap).clone())
}

fn probe_bonding(ns: &NetNs) -> Result<BondCapability, NetworkError> {
    if std::path::Path::new("/sys/module/bonding").exists() {
        // Loaded (or built in): no need to create a device on the host.
        return Ok(BondCapability {
            backend: BondBackend::KernelBond,
            reason: "bonding driver present (/sys/module/bonding)".to_owned(),
        });
    }
    let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
    let mut msg = LinkMessage::default();
    msg.attributes
        .push(LinkAttribute::IfName(PROBE_NAME.to_owned()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Bond,
        )]));
    let _ = rtnl.delete_link(PROBE_NAME);
    match rtnl.create_link("probe bond", msg) {
        Ok(()) => {
            rtnl.delete_link(PROBE_NAME)
                .map_err(|e| NetworkError::netlink(ns, e))?;
            Ok(BondCapability {
                backend: BondBackend::KernelBond,
                reason: "kernel created a probe bond device: bonding driver available".to_owned(),
            })
        }
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => Ok(BondCapability {
            backend: BondBackend::BridgeFallback,
            reason: "kernel has no bonding driver (no /sys/module/bonding, and creating a bond \
                     link returned EOPNOTSUPP): using the bridge fallback, active-backup only"
                .to_owned(),
        }),
        Err(e) => Err(NetworkError::netlink(ns, e)),
    }
}

// ---------------------------------------------------------------------------
// Kernel bond messages (unit-tested for shape; no kernel here can run them).

fn nl_mode(mode: BondMode) -> NlBondMode {
    match mode {
        BondMode::ActiveBackup => NlBondMode::ActiveBackup,
        BondMode::BalanceRr => NlBondMode::BalanceRr,
        BondMode::BalanceXor => NlBondMode::BalanceXor,
        BondMode::Lacp => NlBondMode::Ieee8023Ad,
    }
}

/// `RTM_NEWLINK` body creating the bond device: name, MTU, kind `bond`,
/// `IFLA_BOND_MODE` and `IFLA_BOND_MIIMON`.
pub fn bond_create_message(spec: &BondSpec) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes
        .push(LinkAttribute::IfName(spec.name.clone()));
    msg.attributes.push(LinkAttribute::Mtu(spec.mtu));
    msg.attributes.push(LinkAttribute::TxQueueLen(1000));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Bond),
        LinkInfo::Data(InfoData::Bond(vec![
            InfoBond::Mode(nl_mode(spec.mode)),
            InfoBond::MiiMon(spec.miimon),
        ])),
    ]));
    msg
}

/// `RTM_SETLINK` body changing miimon of an existing bond.
pub fn bond_miimon_message(bond_index: u32, miimon: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = bond_index;
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Bond),
        LinkInfo::Data(InfoData::Bond(vec![InfoBond::MiiMon(miimon)])),
    ]));
    msg
}

/// `RTM_SETLINK` body enslaving `member_index` to `bond_index`
/// (`IFLA_MASTER`); 0 as `bond_index` releases it.
pub fn bond_enslave_message(member_index: u32, bond_index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = member_index;
    msg.attributes.push(LinkAttribute::Controller(bond_index));
    msg
}

// ---------------------------------------------------------------------------
// Observation.

/// A member NIC as observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedMember {
    /// Name.
    pub name: String,
    /// Exists on the node.
    pub present: bool,
    /// Attached to the bond device (enslaved / bridge port).
    pub attached: bool,
    /// Administratively up.
    pub admin_up: bool,
    /// Carrier.
    pub carrier: bool,
    /// MTU.
    pub mtu: u32,
}

/// A bond as read back from the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedBond {
    /// Node label.
    pub node: String,
    /// Device name.
    pub name: String,
    /// Backend used on this node.
    pub backend: BondBackend,
    /// The device exists.
    pub exists: bool,
    /// Its kind (`bond`, `bridge`).
    pub kind: Option<String>,
    /// Administratively up.
    pub up: bool,
    /// MTU.
    pub mtu: u32,
    /// MAC address.
    pub mac: Option<String>,
    /// Kernel bond mode, when a kernel bond.
    pub mode: Option<String>,
    /// Kernel bond miimon, when a kernel bond.
    pub miimon: Option<u32>,
    /// The spec's members, in spec order.
    pub members: Vec<ObservedMember>,
    /// Fallback: the member currently attached and carrying traffic.
    pub active_member: Option<String>,
    /// Devices attached that are not spec members.
    pub foreign_ports: Vec<String>,
    /// QoS on the device.
    pub qos: ObservedQos,
    /// Differences from the spec.
    pub drift: Vec<Drift>,
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The stable, locally administered MAC of a fallback bond, derived from
/// the bond's name and its first member's MAC:
/// - it does not change when members are swapped, so peers' ARP caches stay
///   valid across a failover;
/// - it is unique per node (member MACs are), so two nodes with a bond of
///   the same name do not collide on one switch;
/// - it is no member's own MAC, so a detached member that wakes up and
///   sends (IPv6 DAD, router solicitation) cannot pull the bond's MAC to its
///   switch port.
pub fn fallback_mac(name: &str, first_member_mac: [u8; 6]) -> [u8; 6] {
    let mut key = name.as_bytes().to_vec();
    key.extend_from_slice(&first_member_mac);
    let b = crate::fnv1a(&key).to_be_bytes();
    [0x02, 0xca, b[4], b[5], b[6], b[7]]
}

fn first_member_mac(links: &[LinkState], spec: &BondSpec) -> Option<[u8; 6]> {
    links
        .iter()
        .find(|l| l.name == spec.members[0])
        .and_then(|l| l.mac)
}

pub(crate) fn observe_with(
    rtnl: &mut Rtnl,
    ns: &NetNs,
    spec: &BondSpec,
    backend: BondBackend,
    capacity_bps: Option<u64>,
) -> Result<ObservedBond, NlError> {
    let links = rtnl.links()?;
    let dev = links.iter().find(|l| l.name == spec.name);
    let mut drift = Vec::new();
    let want_kind = match backend {
        BondBackend::KernelBond => "bond",
        BondBackend::BridgeFallback => "bridge",
    };
    let members: Vec<ObservedMember> = spec
        .members
        .iter()
        .map(|m| match links.iter().find(|l| &l.name == m) {
            Some(l) => ObservedMember {
                name: m.clone(),
                present: true,
                attached: dev.is_some_and(|d| l.controller == Some(d.index)),
                admin_up: l.admin_up,
                carrier: l.carrier,
                mtu: l.mtu,
            },
            None => ObservedMember {
                name: m.clone(),
                present: false,
                attached: false,
                admin_up: false,
                carrier: false,
                mtu: 0,
            },
        })
        .collect();
    let foreign_ports: Vec<String> = match dev {
        Some(d) => links
            .iter()
            .filter(|l| l.controller == Some(d.index) && !spec.members.contains(&l.name))
            .map(|l| l.name.clone())
            .collect(),
        None => Vec::new(),
    };
    let mut obs = ObservedBond {
        node: ns.node().to_owned(),
        name: spec.name.clone(),
        backend,
        exists: dev.is_some(),
        kind: dev.and_then(|d| d.kind.clone()),
        up: dev.is_some_and(|d| d.admin_up),
        mtu: dev.map_or(0, |d| d.mtu),
        mac: dev.and_then(|d| d.mac.as_ref().map(mac_string)),
        mode: dev.and_then(|d| d.bond_mode).map(|m| {
            BondMode::from_kernel_mode(m)
                .map_or_else(|| format!("mode {m}"), |m| m.as_str().to_owned())
        }),
        miimon: dev.and_then(|d| d.bond_miimon),
        active_member: None,
        members,
        foreign_ports,
        qos: ObservedQos::default(),
        drift: Vec::new(),
    };
    let Some(dev) = dev else {
        drift.push(Drift::DeviceMissing);
        for m in &obs.members {
            if !m.present {
                drift.push(Drift::MemberGone {
                    member: m.name.clone(),
                });
            }
        }
        obs.drift = drift;
        return Ok(obs);
    };
    if dev.kind.as_deref() != Some(want_kind) {
        drift.push(Drift::WrongDeviceKind {
            want: want_kind.to_owned(),
            have: dev
                .kind
                .clone()
                .unwrap_or_else(|| "device without kind".to_owned()),
        });
    }
    if !dev.admin_up {
        drift.push(Drift::DeviceDown);
    }
    if dev.mtu != spec.mtu {
        drift.push(Drift::MtuChanged {
            device: spec.name.clone(),
            want: spec.mtu,
            have: dev.mtu,
        });
    }
    for m in &obs.members {
        if !m.present {
            drift.push(Drift::MemberGone {
                member: m.name.clone(),
            });
            continue;
        }
        if !m.admin_up {
            drift.push(Drift::MemberDown {
                member: m.name.clone(),
            });
        }
        if m.mtu != spec.mtu {
            drift.push(Drift::MtuChanged {
                device: m.name.clone(),
                want: spec.mtu,
                have: m.mtu,
            });
        }
    }
    for p in &obs.foreign_ports {
        drift.push(Drift::UnexpectedPort { port: p.clone() });
    }
    match backend {
        BondBackend::KernelBond => {
            let want_mode = spec.mode.kernel_mode();
            if dev.bond_mode.is_some_and(|m| m != want_mode) {
                drift.push(Drift::ModeChanged {
                    want: spec.mode.as_str().to_owned(),
                    have: obs.mode.clone().unwrap_or_default(),
                });
            }
            if let Some(have) = dev.bond_miimon
                && have != spec.miimon
            {
                drift.push(Drift::MiimonChanged {
                    want: spec.miimon,
                    have,
                });
            }
            for m in &obs.members {
                if m.present && !m.attached {
                    drift.push(Drift::MemberDetached {
                        member: m.name.clone(),
                    });
                }
            }
        }
        BondBackend::BridgeFallback => {
            if let Some(first) = first_member_mac(&links, spec)
                && dev.mac != Some(fallback_mac(&spec.name, first))
            {
                drift.push(Drift::MacChanged);
            }
            let attached: Vec<&ObservedMember> =
                obs.members.iter().filter(|m| m.attached).collect();
            match attached.as_slice() {
                [] => drift.push(Drift::NoActiveMember),
                [one] => {
                    obs.active_member = Some(one.name.clone());
                    let other_live = obs
                        .members
                        .iter()
                        .any(|m| !m.attached && m.admin_up && m.carrier);
                    if !(one.admin_up && one.carrier) && other_live {
                        drift.push(Drift::ActiveMemberDead {
                            member: one.name.clone(),
                        });
                    }
                }
                [first, rest @ ..] => {
                    obs.active_member = Some(first.name.clone());
                    for r in rest {
                        drift.push(Drift::UnexpectedPort {
                            port: r.name.clone(),
                        });
                    }
                }
            }
        }
    }
    obs.qos = observe_qos(rtnl, dev.index)?;
    let plan = capacity_bps.and_then(|c| HtbPlan::new(spec, c));
    if capacity_bps.is_some() {
        drift.extend(qos_drift(plan.as_ref(), &obs.qos));
    }
    obs.drift = drift;
    Ok(obs)
}

// ---------------------------------------------------------------------------
// Link speed (capacity) via the ethtool ioctl.

/// Link speed of `ifname` in Mbit/s as the driver reports it (`ETHTOOL_GSET`),
/// `None` when unknown. veth reports 10000.
pub fn link_speed_mbps(ns: &NetNs, ifname: &str) -> Option<u32> {
    let name = ifname.to_owned();
    ns.run(move || -> Option<u32> {
        #[repr(C)]
        #[derive(Default)]
        struct EthtoolCmd {
            cmd: u32,
            supported: u32,
            advertising: u32,
            speed: u16,
            duplex: u8,
            port: u8,
            phy_address: u8,
            transceiver: u8,
            autoneg: u8,
            mdio_support: u8,
            maxtxpkt: u32,
            maxrxpkt: u32,
            speed_hi: u16,
            eth_tp_mdix: u8,
            eth_tp_mdix_ctrl: u8,
            lp_advertising: u32,
            reserved: [u32; 2],
        }
        const ETHTOOL_GSET: u32 = 1;
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        let mut cmd = EthtoolCmd {
            cmd: ETHTOOL_GSET,
            ..Default::default()
        };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        let bytes = name.as_bytes();
        if bytes.len() >= ifr.ifr_name.len() {
            return None;
        }
        for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut cmd as *mut EthtoolCmd).cast();
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd is a valid socket; ifr points at a valid ifreq whose data
        // pointer refers to `cmd`, which outlives the call and has the layout
        // of `struct ethtool_cmd`.
        let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr) };
        // SAFETY: fd was returned by socket above and is closed once.
        unsafe { libc::close(fd) };
        if rc != 0 {
            return None;
        }
        let speed = u32::from(cmd.speed) | (u32::from(cmd.speed_hi) << 16);
        if speed == 0 || speed == u32::MAX || speed == u32::from(u16::MAX) {
            None
        } else {
            Some(speed)
        }
    })
    .ok()
    .flatten()
}

/// The bond's capacity: `spec.capacity_bps`, else from member link speeds.
fn capacity(ns: &NetNs, spec: &BondSpec) -> Result<u64, NetworkError> {
    if let Some(c) = spec.capacity_bps {
        return Ok(c);
    }
    let mut speeds = Vec::new();
    for m in &spec.members {
        let Some(s) = link_speed_mbps(ns, m) else {
            return Err(NetworkError::CapacityUnknown {
                node: ns.node().to_owned(),
                bond: spec.name.clone(),
                nic: m.clone(),
            });
        };
        speeds.push(u64::from(s) * 1_000_000);
    }
    Ok(match spec.mode {
        BondMode::ActiveBackup => speeds.into_iter().min().unwrap_or(0),
        _ => speeds.into_iter().sum(),
    })
}

// ---------------------------------------------------------------------------
// Apply.

/// What `apply_bond` found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Node label.
    pub node: String,
    /// Bond name.
    pub bond: String,
    /// Backend used.
    pub backend: BondBackend,
    /// Why this backend.
    pub backend_reason: String,
    /// Capacity used for class `1:1` and the ceilings, bits per second.
    pub capacity_bps: u64,
    /// Drift found before converging.
    pub drift_before: Vec<Drift>,
    /// Changes made (netlink operations and `tc` commands), in order.
    pub actions: Vec<String>,
}

impl ApplyReport {
    /// Whether anything was changed.
    pub fn changed(&self) -> bool {
        !self.actions.is_empty()
    }
}

/// Checks the spec against this node: validity, mode support of the
/// backend, member NICs present, minimums within capacity. Returns the
/// backend and capacity.
pub fn check_bond(ns: &NetNs, spec: &BondSpec) -> Result<(BondCapability, u64), NetworkError> {
    validate_spec(ns.node(), spec)?;
    let cap = detect_bonding(ns)?;
    if cap.backend == BondBackend::BridgeFallback && spec.mode != BondMode::ActiveBackup {
        return Err(NetworkError::ModeUnsupported {
            node: ns.node().to_owned(),
            bond: spec.name.clone(),
            mode: spec.mode,
            reason: cap.reason.clone(),
        });
    }
    let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
    for m in &spec.members {
        if rtnl
            .link(m)
            .map_err(|e| NetworkError::netlink(ns, e))?
            .is_none()
        {
            return Err(NetworkError::MemberMissing {
                node: ns.node().to_owned(),
                bond: spec.name.clone(),
                nic: m.clone(),
            });
        }
    }
    let capacity_bps = capacity(ns, spec)?;
    validate_capacity(ns.node(), spec, capacity_bps)?;
    Ok((cap, capacity_bps))
}

/// Converges the node toward `spec`, idempotently: only what differs is
/// changed, and a second call on an unchanged node changes nothing.
///
/// Refuses (before changing anything) a spec the node cannot honour: a mode
/// the bridge fallback cannot do, a member NIC that does not exist, minimums
/// above capacity.
pub fn apply_bond(ns: &NetNs, spec: &BondSpec) -> Result<ApplyReport, NetworkError> {
    let (cap, capacity_bps) = check_bond(ns, spec)?;
    let nl = |e| NetworkError::netlink(ns, e);
    let mut rtnl = Rtnl::open(ns).map_err(nl)?;
    let before = observe_with(&mut rtnl, ns, spec, cap.backend, Some(capacity_bps)).map_err(nl)?;
    let mut actions = Vec::new();
    if let Some(Drift::WrongDeviceKind { have, .. }) = before
        .drift
        .iter()
        .find(|d| matches!(d, Drift::WrongDeviceKind { .. }))
    {
        return Err(NetworkError::DeviceConflict {
            node: ns.node().to_owned(),
            name: spec.name.clone(),
            kind: have.clone(),
        });
    }
    match cap.backend {
        BondBackend::KernelBond => {
            converge_kernel_bond(&mut rtnl, spec, &before, &mut actions).map_err(nl)?
        }
        BondBackend::BridgeFallback => {
            converge_fallback(&mut rtnl, spec, &before, &mut actions).map_err(nl)?
        }
    }
    if cap.backend == BondBackend::BridgeFallback
        && before.exists
        && actions.iter().any(|a| a.starts_with("attach "))
    {
        // A member swap: tell the switches where the bond's MAC lives now.
        let (arps, nas) = crate::announce::announce(ns, &mut rtnl, &spec.name)?;
        actions.push(format!(
            "sent {arps} gratuitous arp(s) and {nas} unsolicited neighbor advertisement(s) on {}",
            spec.name
        ));
    }
    let dev = rtnl.require_link(&spec.name).map_err(nl)?;
    let observed_qos = observe_qos(&mut rtnl, dev.index).map_err(nl)?;
    let plan = HtbPlan::new(spec, capacity_bps);
    let tc_actions =
        converge_qos(ns, &spec.name, plan.as_ref(), &observed_qos).map_err(|source| {
            NetworkError::Tc {
                node: ns.node().to_owned(),
                bond: spec.name.clone(),
                source,
            }
        })?;
    actions.extend(tc_actions);
    Ok(ApplyReport {
        node: ns.node().to_owned(),
        bond: spec.name.clone(),
        backend: cap.backend,
        backend_reason: cap.reason,
        capacity_bps,
        drift_before: before.drift,
        actions,
    })
}

/// Reads the bond back from the node and reports drift against `spec`.
pub fn observe_bond(ns: &NetNs, spec: &BondSpec) -> Result<ObservedBond, NetworkError> {
    validate_spec(ns.node(), spec)?;
    let cap = detect_bonding(ns)?;
    let capacity_bps = capacity(ns, spec).ok();
    let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
    observe_with(&mut rtnl, ns, spec, cap.backend, capacity_bps)
        .map_err(|e| NetworkError::netlink(ns, e))
}

/// Removes the bond device (members are released, the HTB tree goes with
/// the device). Missing is not an error.
pub fn remove_bond(ns: &NetNs, name: &str) -> Result<(), NetworkError> {
    let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
    rtnl.delete_link(name)
        .map_err(|e| NetworkError::netlink(ns, e))
}

fn member_links(rtnl: &mut Rtnl, spec: &BondSpec) -> Result<Vec<LinkState>, NlError> {
    spec.members.iter().map(|m| rtnl.require_link(m)).collect()
}

/// One step of converging a kernel bond, in execution order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelBondStep {
    /// Delete the bond (its mode cannot change while it has members).
    DeleteBond,
    /// Create the bond with [`bond_create_message`].
    CreateBond,
    /// Change miimon with [`bond_miimon_message`].
    SetMiimon(u32),
    /// Change the bond's MTU.
    SetBondMtu(u32),
    /// Release a port that is not a spec member.
    Release(String),
    /// Take a member down (the kernel enslaves down links).
    MemberDown(String),
    /// Enslave a member with [`bond_enslave_message`] (the bond sets its MTU).
    Enslave(String),
    /// Set an already enslaved member's MTU.
    MemberMtu(String, u32),
    /// Bring a member up.
    MemberUp(String),
    /// Bring the bond up.
    BondUp,
}

/// Plans the netlink steps that bring a kernel bond from `before` to
/// `spec`; empty when nothing differs. Pure, so its order is unit-tested.
pub fn plan_kernel_bond(spec: &BondSpec, before: &ObservedBond) -> Vec<KernelBondStep> {
    use KernelBondStep as S;
    let mut steps = Vec::new();
    let mode_changed = before
        .drift
        .iter()
        .any(|d| matches!(d, Drift::ModeChanged { .. }));
    let recreate = !before.exists || mode_changed;
    if before.exists && mode_changed {
        steps.push(S::DeleteBond);
    }
    if recreate {
        steps.push(S::CreateBond);
    } else {
        if before.miimon.is_some_and(|m| m != spec.miimon) {
            steps.push(S::SetMiimon(spec.miimon));
        }
        if before.mtu != spec.mtu {
            steps.push(S::SetBondMtu(spec.mtu));
        }
        for port in &before.foreign_ports {
            steps.push(S::Release(port.clone()));
        }
    }
    for m in &before.members {
        // Deleting the bond released every member; they come back down-cycled.
        let attached = m.attached && !recreate;
        if !attached {
            if m.admin_up {
                steps.push(S::MemberDown(m.name.clone()));
            }
            steps.push(S::Enslave(m.name.clone()));
            steps.push(S::MemberUp(m.name.clone()));
            continue;
        }
        if m.mtu != spec.mtu {
            steps.push(S::MemberMtu(m.name.clone(), spec.mtu));
        }
        if !m.admin_up {
            steps.push(S::MemberUp(m.name.clone()));
        }
    }
    if recreate || !before.up {
        steps.push(S::BondUp);
    }
    steps
}

fn converge_kernel_bond(
    rtnl: &mut Rtnl,
    spec: &BondSpec,
    before: &ObservedBond,
    actions: &mut Vec<String>,
) -> Result<(), NlError> {
    use KernelBondStep as S;
    let bond = &spec.name;
    for step in plan_kernel_bond(spec, before) {
        match &step {
            S::DeleteBond => rtnl.delete_link(bond)?,
            S::CreateBond => {
                rtnl.create_link(&format!("create bond {bond}"), bond_create_message(spec))?
            }
            S::SetMiimon(m) => {
                let b = rtnl.require_link(bond)?;
                rtnl.change_link("set miimon", bond_miimon_message(b.index, *m))?
            }
            S::SetBondMtu(mtu) => {
                let b = rtnl.require_link(bond)?;
                rtnl.set_mtu(b.index, *mtu)?
            }
            S::Release(port) => {
                let l = rtnl.require_link(port)?;
                rtnl.change_link("release port", bond_enslave_message(l.index, 0))?
            }
            S::MemberDown(m) => rtnl.set_link_up_by_name(m, false)?,
            S::Enslave(m) => {
                let b = rtnl.require_link(bond)?;
                let l = rtnl.require_link(m)?;
                rtnl.change_link("enslave", bond_enslave_message(l.index, b.index))?
            }
            S::MemberMtu(m, mtu) => {
                let l = rtnl.require_link(m)?;
                rtnl.set_mtu(l.index, *mtu)?
            }
            S::MemberUp(m) => rtnl.set_link_up_by_name(m, true)?,
            S::BondUp => rtnl.set_link_up_by_name(bond, true)?,
        }
        actions.push(format!("{bond}: {step:?}"));
    }
    Ok(())
}

fn converge_fallback(
    rtnl: &mut Rtnl,
    spec: &BondSpec,
    before: &ObservedBond,
    actions: &mut Vec<String>,
) -> Result<(), NlError> {
    let first = first_member_mac(&rtnl.links()?, spec)
        .ok_or_else(|| NlError::NoSuchLink(spec.members[0].clone()))?;
    let mac = fallback_mac(&spec.name, first);
    if !before.exists {
        rtnl.create_bridge(&spec.name, Some(mac), Some(spec.mtu))?;
        actions.push(format!(
            "create bridge {} (bond fallback) mac {}",
            spec.name,
            mac_string(&mac)
        ));
    }
    let dev = rtnl.require_link(&spec.name)?;
    if dev.mac != Some(mac) {
        let mut msg = LinkMessage::default();
        msg.header.index = dev.index;
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        rtnl.change_link("set mac", msg)?;
        actions.push(format!("set mac {} on {}", mac_string(&mac), spec.name));
    }
    if dev.txqlen == 0 {
        rtnl.set_txqlen(dev.index, 1000)?;
        actions.push(format!("set txqueuelen 1000 on {}", spec.name));
    }
    for m in member_links(rtnl, spec)? {
        if m.mtu != spec.mtu {
            rtnl.set_mtu(m.index, spec.mtu)?;
            actions.push(format!("set mtu {} on {}", spec.mtu, m.name));
        }
        if !m.admin_up {
            rtnl.set_link_up(m.index, true)?;
            actions.push(format!("set {} up", m.name));
        }
    }
    let swapped = converge_fallback_ports(rtnl, spec)?;
    actions.extend(swapped);
    // The bridge's MTU follows its ports; set it after attaching.
    let dev = rtnl.require_link(&spec.name)?;
    if dev.mtu != spec.mtu {
        rtnl.set_mtu(dev.index, spec.mtu)?;
        actions.push(format!("set mtu {} on {}", spec.mtu, spec.name));
    }
    if !dev.admin_up {
        rtnl.set_link_up(dev.index, true)?;
        actions.push(format!("set {} up", spec.name));
    }
    Ok(())
}

/// Fallback failover step: keeps exactly one member attached to the bridge,
/// the current one while it is live, else the first live member in spec
/// order (else the first present member, so traffic resumes when its link
/// returns). Never changes a member's admin state: an operator's `ip link
/// set down` is respected, not undone. Returns what it changed.
pub fn converge_fallback_ports(rtnl: &mut Rtnl, spec: &BondSpec) -> Result<Vec<String>, NlError> {
    let mut actions = Vec::new();
    let links = rtnl.links()?;
    let Some(dev) = links.iter().find(|l| l.name == spec.name) else {
        return Ok(actions);
    };
    let attached: Vec<&LinkState> = links
        .iter()
        .filter(|l| l.controller == Some(dev.index))
        .collect();
    let members: Vec<&LinkState> = spec
        .members
        .iter()
        .filter_map(|m| links.iter().find(|l| &l.name == m))
        .collect();
    let current_live = attached
        .iter()
        .find(|l| spec.members.contains(&l.name) && l.is_live());
    let chosen = current_live
        .copied()
        .or_else(|| members.iter().find(|l| l.is_live()).copied())
        .or_else(|| {
            attached
                .iter()
                .find(|l| spec.members.contains(&l.name))
                .copied()
        })
        .or_else(|| members.first().copied());
    // Detach first: two members on one bridge would loop through the switch.
    for l in &attached {
        if Some(l.index) != chosen.map(|c| c.index) {
            rtnl.set_controller(l.index, 0)?;
            actions.push(format!("detach {} from {}", l.name, spec.name));
        }
    }
    if let Some(c) = chosen
        && c.controller != Some(dev.index)
    {
        rtnl.set_controller(c.index, dev.index)?;
        actions.push(format!(
            "attach {} to {} as active member",
            c.name, spec.name
        ));
    }
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_route::RouteNetlinkMessage;

    use super::*;
    use crate::spec::{TrafficClassSpec, TrafficKind};

    fn spec(mode: BondMode) -> BondSpec {
        BondSpec {
            name: "data".to_owned(),
            mode,
            members: vec!["ens1f0".to_owned(), "ens1f1".to_owned()],
            mtu: 9000,
            miimon: 100,
            classes: vec![TrafficClassSpec {
                name: TrafficKind::Storage,
                min_bps: 1,
                max_bps: None,
                weight: 1,
            }],
            capacity_bps: None,
        }
    }

    /// Serializes a request as the kernel receives it.
    fn wire(msg: RouteNetlinkMessage) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        buf
    }

    /// Walks netlink attributes: (type without flags, payload).
    fn attrs(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
            let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
            out.push((kind, b[4..len].to_vec()));
            let step = (len + 3) & !3;
            b = &b[step.min(b.len())..];
        }
        out
    }

    fn find(list: &[(u16, Vec<u8>)], kind: u16) -> Vec<u8> {
        list.iter()
            .find(|(k, _)| *k == kind)
            .unwrap_or_else(|| panic!("attribute {kind} missing"))
            .1
            .clone()
    }

    /// The kernel accepts string attributes with or without a trailing nul.
    fn without_nul(mut v: Vec<u8>) -> Vec<u8> {
        if v.last() == Some(&0) {
            v.pop();
        }
        v
    }

    const RTM_NEWLINK: u16 = 16;
    const RTM_SETLINK: u16 = 19;
    const IFLA_IFNAME: u16 = 3;
    const IFLA_MTU: u16 = 4;
    const IFLA_MASTER: u16 = 10;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    const IFLA_INFO_DATA: u16 = 2;
    const IFLA_BOND_MODE: u16 = 1;
    const IFLA_BOND_MIIMON: u16 = 3;

    #[test]
    fn bond_create_request_has_kind_mode_miimon_mtu() {
        for (mode, number) in [
            (BondMode::BalanceRr, 0u8),
            (BondMode::ActiveBackup, 1),
            (BondMode::BalanceXor, 2),
            (BondMode::Lacp, 4),
        ] {
            let bytes = wire(RouteNetlinkMessage::NewLink(bond_create_message(&spec(
                mode,
            ))));
            assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), RTM_NEWLINK);
            // nlmsghdr (16) + ifinfomsg (16), then attributes.
            let top = attrs(&bytes[32..]);
            assert_eq!(find(&top, IFLA_IFNAME), b"data\0");
            assert_eq!(find(&top, IFLA_MTU), 9000u32.to_ne_bytes());
            let info = attrs(&find(&top, IFLA_LINKINFO));
            assert_eq!(without_nul(find(&info, IFLA_INFO_KIND)), b"bond");
            let data = attrs(&find(&info, IFLA_INFO_DATA));
            assert_eq!(find(&data, IFLA_BOND_MODE), vec![number], "{mode}");
            assert_eq!(find(&data, IFLA_BOND_MIIMON), 100u32.to_ne_bytes());
            // And the crate parses it back to the same message.
            let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).expect("parse");
            assert!(
                matches!(parsed.payload, NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) if m == bond_create_message(&spec(mode)))
            );
        }
    }

    #[test]
    fn enslave_request_sets_master_on_member_index() {
        let bytes = wire(RouteNetlinkMessage::SetLink(bond_enslave_message(7, 42)));
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), RTM_SETLINK);
        // ifinfomsg.ifi_index sits at offset 16 + 4.
        assert_eq!(i32::from_ne_bytes(bytes[20..24].try_into().unwrap()), 7);
        assert_eq!(find(&attrs(&bytes[32..]), IFLA_MASTER), 42u32.to_ne_bytes());
        let release = wire(RouteNetlinkMessage::SetLink(bond_enslave_message(7, 0)));
        assert_eq!(
            find(&attrs(&release[32..]), IFLA_MASTER),
            0u32.to_ne_bytes()
        );
    }

    #[test]
    fn miimon_change_request_targets_the_bond() {
        let bytes = wire(RouteNetlinkMessage::SetLink(bond_miimon_message(3, 250)));
        assert_eq!(i32::from_ne_bytes(bytes[20..24].try_into().unwrap()), 3);
        let info = attrs(&find(&attrs(&bytes[32..]), IFLA_LINKINFO));
        assert_eq!(without_nul(find(&info, IFLA_INFO_KIND)), b"bond");
        let data = attrs(&find(&info, IFLA_INFO_DATA));
        assert_eq!(find(&data, IFLA_BOND_MIIMON), 250u32.to_ne_bytes());
        assert!(
            data.iter().all(|(k, _)| *k != IFLA_BOND_MODE),
            "mode must not be sent on a live bond"
        );
    }

    fn observed(spec: &BondSpec) -> ObservedBond {
        ObservedBond {
            node: "n".into(),
            name: spec.name.clone(),
            backend: BondBackend::KernelBond,
            exists: true,
            kind: Some("bond".into()),
            up: true,
            mtu: spec.mtu,
            mac: None,
            mode: Some(spec.mode.as_str().into()),
            miimon: Some(spec.miimon),
            members: spec
                .members
                .iter()
                .map(|m| ObservedMember {
                    name: m.clone(),
                    present: true,
                    attached: true,
                    admin_up: true,
                    carrier: true,
                    mtu: spec.mtu,
                })
                .collect(),
            active_member: None,
            foreign_ports: Vec::new(),
            qos: ObservedQos::default(),
            drift: Vec::new(),
        }
    }

    #[test]
    fn kernel_bond_plan_is_empty_when_converged() {
        let s = spec(BondMode::Lacp);
        assert_eq!(plan_kernel_bond(&s, &observed(&s)), vec![]);
    }

    #[test]
    fn kernel_bond_plan_creates_then_enslaves_down_members_then_brings_up() {
        use KernelBondStep as S;
        let s = spec(BondMode::Lacp);
        let mut o = observed(&s);
        o.exists = false;
        o.up = false;
        for m in &mut o.members {
            m.attached = false;
            m.mtu = 1500;
        }
        o.members[1].admin_up = false;
        assert_eq!(
            plan_kernel_bond(&s, &o),
            vec![
                S::CreateBond,
                S::MemberDown("ens1f0".into()),
                S::Enslave("ens1f0".into()),
                S::MemberUp("ens1f0".into()),
                S::Enslave("ens1f1".into()),
                S::MemberUp("ens1f1".into()),
                S::BondUp,
            ]
        );
    }

    #[test]
    fn kernel_bond_mode_change_recreates_and_reenslaves() {
        use KernelBondStep as S;
        let s = spec(BondMode::Lacp);
        let mut o = observed(&s);
        o.drift.push(Drift::ModeChanged {
            want: "802.3ad".into(),
            have: "balance-rr".into(),
        });
        let plan = plan_kernel_bond(&s, &o);
        assert_eq!(&plan[..2], &[S::DeleteBond, S::CreateBond]);
        assert!(
            plan.contains(&S::Enslave("ens1f0".into()))
                && plan.contains(&S::Enslave("ens1f1".into()))
        );
        assert_eq!(plan.last(), Some(&S::BondUp));
    }

    #[test]
    fn kernel_bond_small_drifts_are_fixed_in_place() {
        use KernelBondStep as S;
        let s = spec(BondMode::ActiveBackup);
        let mut o = observed(&s);
        o.miimon = Some(10);
        o.foreign_ports.push("eth9".into());
        o.members[0].attached = false;
        o.members[1].mtu = 1500;
        assert_eq!(
            plan_kernel_bond(&s, &o),
            vec![
                S::SetMiimon(100),
                S::Release("eth9".into()),
                S::MemberDown("ens1f0".into()),
                S::Enslave("ens1f0".into()),
                S::MemberUp("ens1f0".into()),
                S::MemberMtu("ens1f1".into(), 9000),
            ]
        );
    }

    #[test]
    fn fallback_mac_is_stable_and_locally_administered() {
        let m = [0x52, 0x54, 0, 1, 2, 3];
        let a = fallback_mac("data", m);
        assert_eq!(a, fallback_mac("data", m));
        assert_ne!(a, fallback_mac("mgmt", m));
        assert_ne!(
            a,
            fallback_mac("data", [0x52, 0x54, 0, 1, 2, 4]),
            "another node's bond"
        );
        assert_eq!(a[0] & 0x03, 0x02, "unicast, locally administered");
    }
}
