//! Bonds: the node's bonded NICs with HTB QoS, carried out by the `network` crate
//! in the node's network namespace.
//!
//! A bond's definition is persisted (table `bonds`) so `Observe` can compare the
//! device with what was asked and the failover monitor of a fallback bond (kernels
//! without the bonding driver) is restarted after an agent restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use network::{
    BondBackend, BondMode, BondSpec, FailoverMonitor, NetNs, TrafficClassSpec, TrafficKind,
};
use proto::v1::{self, BondStatus, Health};
use tokio::sync::Mutex;
use tonic::Status;

use crate::events::EventBus;
use crate::network_backend::NetworkBackend;
use crate::records::{self, BondRecord, Records};
use crate::validate;

/// Link-monitoring interval when a request leaves it 0 (ms).
const DEFAULT_MIIMON_MS: u32 = 100;

/// Every bond of the node.
#[derive(Debug)]
pub struct Bonds {
    netns: NetNs,
    /// Why network actions are refused on this node (`None`: they are carried out).
    unavailable: Option<String>,
    records: Arc<Records>,
    events: Arc<EventBus>,
    monitors: Mutex<BTreeMap<String, FailoverMonitor>>,
    /// Makes and reads back the devices (the host's, or simulated).
    network: Arc<dyn NetworkBackend>,
    /// The tenant segments and security-group drift of the latest Observe
    /// (`Node::segment_statuses`), reported in `Networking`.
    segments: std::sync::Mutex<(Vec<v1::NetworkSegmentStatus>, Vec<String>)>,
    /// The node's `--migration-address` ([`Bonds::with_migration_address`]; default
    /// 127.0.0.1).
    migration_address: std::net::IpAddr,
}

fn network_status(error: network::NetworkError) -> Status {
    let message = error.to_string();
    match error {
        network::NetworkError::Spec(_) => Status::invalid_argument(message),
        network::NetworkError::ModeUnsupported { .. }
        | network::NetworkError::MemberMissing { .. }
        | network::NetworkError::CapacityUnknown { .. }
        | network::NetworkError::DeviceConflict { .. } => Status::failed_precondition(message),
        _ => Status::internal(message),
    }
}

/// The `network` crate's spec of an `ApplyBond` (validated first).
pub fn bond_spec(bond: &v1::ApplyBond) -> Result<BondSpec, Status> {
    validate_bond(bond)?;
    let mode: BondMode = bond
        .mode
        .parse()
        .map_err(|error| validate::invalid("apply_bond.mode", format!("{error:?}")))?;
    let mut classes = Vec::with_capacity(bond.traffic.len());
    for (index, class) in bond.traffic.iter().enumerate() {
        let name: TrafficKind = class.name.parse().map_err(|error| {
            validate::invalid(
                &format!("apply_bond.traffic[{index}].name"),
                format!("{error:?}"),
            )
        })?;
        classes.push(TrafficClassSpec {
            name,
            min_bps: class.min_bps,
            max_bps: (class.max_bps != 0).then_some(class.max_bps),
            weight: class.weight,
        });
    }
    Ok(BondSpec {
        name: bond.name.clone(),
        mode,
        members: bond.members.clone(),
        mtu: if bond.mtu == 0 { 1500 } else { bond.mtu },
        miimon: if bond.miimon_ms == 0 {
            DEFAULT_MIIMON_MS
        } else {
            bond.miimon_ms
        },
        classes,
        capacity_bps: (bond.capacity_bps != 0).then_some(bond.capacity_bps),
    })
}

/// Why this process cannot change the network of `netns`, if it cannot.
pub fn network_unavailable(netns: &NetNs) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "cairn-node is not running as root: bond devices and qdiscs need CAP_NET_ADMIN"
                .to_string(),
        );
    }
    if !netns.exists() {
        return Some(format!(
            "its network namespace {} no longer exists",
            netns.describe()
        ));
    }
    None
}

/// The bond definitions kept in the node's records, as the `ApplyBond`s they came from.
fn definitions(records: &Records) -> Result<Vec<(String, v1::ApplyBond)>, records::RecordsError> {
    Ok(records
        .list::<BondRecord>()?
        .into_iter()
        .map(|(name, record)| (name, records::apply_bond(&record)))
        .collect())
}

impl Bonds {
    /// Loads bond definitions and restarts the failover monitors of fallback bonds.
    /// `unavailable` says why network actions are refused (then nothing is touched);
    /// `network` makes the devices ([`crate::network_backend::HostNetwork`]: netlink).
    pub fn open(
        netns: NetNs,
        unavailable: Option<String>,
        records: Arc<Records>,
        events: Arc<EventBus>,
        network: Arc<dyn NetworkBackend>,
    ) -> Result<Self, records::RecordsError> {
        let mut monitors = BTreeMap::new();
        let definitions = if unavailable.is_some() || !network.is_host() {
            Vec::new()
        } else {
            definitions(&records)?
        };
        for (name, bond) in definitions {
            let Ok(spec) = bond_spec(&bond) else { continue };
            let Ok(observed) = network::observe_bond(&netns, &spec) else {
                continue;
            };
            if observed.exists
                && observed.backend == BondBackend::BridgeFallback
                && let Ok(monitor) = FailoverMonitor::start(&netns, &spec)
            {
                monitors.insert(name, monitor);
            }
        }
        Ok(Self {
            netns,
            unavailable,
            records,
            events,
            monitors: Mutex::new(monitors),
            network,
            segments: std::sync::Mutex::new((Vec::new(), Vec::new())),
            migration_address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        })
    }

    /// Sets the node's `--migration-address` (where incoming VMs without NICs listen,
    /// in the agent's namespace).
    pub fn with_migration_address(mut self, address: std::net::IpAddr) -> Self {
        self.migration_address = address;
        self
    }

    /// Where an incoming VM with NICs listens (issue 17): its VMM runs in the node's
    /// network namespace, so the address must be there and reachable from the other
    /// nodes' namespaces. In the agent's own namespace (production) that is
    /// `--migration-address`; in a named one (`cairn dev up`) `--migration-address`
    /// when a device there holds it, else the underlay address (local VTEP) of the
    /// node's tenant segments, which a device there holds once a segment made it: the
    /// nodes' underlay subnet connects them. `None`: network actions are refused, or
    /// no such address is there (such VMs then move cold).
    pub async fn nic_migration_address(&self) -> Option<std::net::IpAddr> {
        if self.refusal().is_some() {
            return None;
        }
        if self.netns.name().is_none() {
            return Some(self.migration_address);
        }
        if !self.network.is_host() {
            return None;
        }
        let mut candidates: Vec<std::net::Ipv4Addr> = vec![];
        if let std::net::IpAddr::V4(a) = self.migration_address
            && !a.is_loopback()
        {
            candidates.push(a);
        }
        if let Ok(kept) = self.segments.lock() {
            for seg in &kept.0 {
                if let Ok(a) = seg.local_vtep.parse::<std::net::Ipv4Addr>()
                    && !candidates.contains(&a)
                {
                    candidates.push(a);
                }
            }
        }
        let netns = self.netns.clone();
        tokio::task::spawn_blocking(move || {
            candidates
                .into_iter()
                .find(|a| matches!(network::overlay::underlay_device(&netns, *a), Ok(Some(_))))
        })
        .await
        .ok()
        .flatten()
        .map(std::net::IpAddr::V4)
    }

    /// Keeps the segments and security-group drift just read back, for
    /// [`Bonds::networking`] to report.
    pub fn set_segment_statuses(
        &self,
        segments: Vec<v1::NetworkSegmentStatus>,
        drift: Vec<String>,
    ) {
        if let Ok(mut kept) = self.segments.lock() {
            *kept = (segments, drift);
        }
    }

    /// The backend that makes the node's bonds and VM NICs.
    pub fn network(&self) -> Arc<dyn NetworkBackend> {
        self.network.clone()
    }

    /// The network namespace bonds (and the node's NICs) live in.
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// Why network actions are refused right now, if they are.
    pub fn refusal(&self) -> Option<String> {
        self.unavailable
            .clone()
            .or_else(|| self.network.unavailable(&self.netns))
    }

    fn refuse(&self, what: &str, bond: &str) -> Result<(), Status> {
        match self.refusal() {
            Some(reason) => Err(Status::failed_precondition(format!(
                "node {}: cannot {what} bond `{bond}`: network actions are refused here: {reason}",
                self.netns.node()
            ))),
            None => Ok(()),
        }
    }

    /// Where the node's NICs and bonds live, whether network actions are possible
    /// and which bond implementation this kernel gets.
    pub async fn networking(&self) -> v1::Networking {
        let (segments, firewall_drift) =
            self.segments.lock().map(|s| s.clone()).unwrap_or_default();
        let mut networking = v1::Networking {
            netns: self.netns.name().unwrap_or_default().to_string(),
            segments,
            firewall_drift,
            ..Default::default()
        };
        if let Some(reason) = self.refusal() {
            networking.unavailable_reason = reason;
            return networking;
        }
        networking.migration_address = self
            .nic_migration_address()
            .await
            .map(|a| a.to_string())
            .unwrap_or_default();
        let netns = self.netns.clone();
        let backend = self.network.clone();
        match crate::maybe_blocking(backend.blocks(), move || backend.bonding(&netns)).await {
            Ok(Ok(capability)) => {
                networking.bond_implementation = capability.backend.as_str().to_string();
                networking.bond_implementation_reason = capability.reason;
            }
            Ok(Err(error)) => {
                networking.unavailable_reason =
                    format!("cannot tell whether the kernel has bonding: {error}");
            }
            Err(error) => networking.unavailable_reason = error.to_string(),
        }
        networking
    }

    fn publish(&self, name: &str, health: Health, detail: String, deleted: bool) {
        self.events
            .publish(v1::watch_event::Event::Bond(v1::BondEvent {
                name: name.to_string(),
                health: health as i32,
                detail,
                deleted,
            }));
    }

    /// Creates or updates a bond.
    pub async fn apply(&self, bond: &v1::ApplyBond) -> Result<v1::BondResult, Status> {
        let spec = bond_spec(bond)?;
        self.refuse("apply", &bond.name)?;
        let mut monitors = self.monitors.lock().await;
        // The monitor re-attaches members on its own; stop it while the bond changes.
        if let Some(monitor) = monitors.remove(&bond.name) {
            tokio::task::spawn_blocking(move || monitor.stop())
                .await
                .map_err(|error| Status::internal(error.to_string()))?;
        }
        let netns = self.netns.clone();
        let applied_spec = spec.clone();
        let backend = self.network.clone();
        let used = tokio::task::spawn_blocking(move || backend.apply_bond(&netns, &applied_spec))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(network_status)?;
        if used == BondBackend::BridgeFallback {
            let netns = self.netns.clone();
            let monitor =
                tokio::task::spawn_blocking(move || FailoverMonitor::start(&netns, &spec))
                    .await
                    .map_err(|error| Status::internal(error.to_string()))?
                    .map_err(network_status)?;
            monitors.insert(bond.name.clone(), monitor);
        }
        self.records
            .put(&bond.name, &records::bond_record(bond))
            .map_err(|error| Status::internal(error.to_string()))?;
        self.publish(
            &bond.name,
            Health::Healthy,
            format!("applied ({})", used.as_str()),
            false,
        );
        Ok(v1::BondResult {
            name: bond.name.clone(),
            implementation: used.as_str().to_string(),
        })
    }

    /// Removes a bond (missing is fine).
    pub async fn delete(&self, name: &str) -> Result<(), Status> {
        validate_bond_name("delete_bond.name", name)?;
        self.refuse("delete", name)?;
        if let Some(monitor) = self.monitors.lock().await.remove(name) {
            tokio::task::spawn_blocking(move || monitor.stop())
                .await
                .map_err(|error| Status::internal(error.to_string()))?;
        }
        let netns = self.netns.clone();
        let owned = name.to_string();
        let backend = self.network.clone();
        tokio::task::spawn_blocking(move || backend.remove_bond(&netns, &owned))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(network_status)?;
        self.records
            .remove::<BondRecord>(name)
            .map_err(|error| Status::internal(error.to_string()))?;
        self.publish(name, Health::Unspecified, "deleted".into(), true);
        Ok(())
    }

    /// Status of every bond this node was asked to keep, read back from the kernel.
    pub async fn statuses(&self) -> Vec<BondStatus> {
        let Ok(definitions) = definitions(&self.records) else {
            return Vec::new();
        };
        if definitions.is_empty() {
            return Vec::new();
        }
        let netns = self.netns.clone();
        let refusal = self.refusal();
        let backend = self.network.clone();
        let blocks = backend.blocks();
        crate::maybe_blocking(blocks, move || {
            definitions
                .into_iter()
                .map(|(name, bond)| match &refusal {
                    Some(reason) => {
                        let mut status = definition_status(&name, &bond);
                        status.detail = format!("cannot be read back: {reason}");
                        status
                    }
                    None => backend.observe_bond(&netns, &name, &bond),
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }
}

/// The status of a bond as defined, before reading the device back.
fn definition_status(name: &str, bond: &v1::ApplyBond) -> BondStatus {
    BondStatus {
        name: name.to_string(),
        mode: bond.mode.clone(),
        members: bond.members.clone(),
        active_members: Vec::new(),
        health: Health::Failed as i32,
        implementation: String::new(),
        detail: String::new(),
        mtu: bond.mtu,
        traffic: bond.traffic.clone(),
        capacity_bps: bond.capacity_bps,
        miimon_ms: bond.miimon_ms,
        exists: false,
        drift: Vec::new(),
    }
}

/// A bond read back from the kernel and compared with its definition.
pub(crate) fn observe_one(netns: &NetNs, name: &str, bond: &v1::ApplyBond) -> BondStatus {
    let mut status = definition_status(name, bond);
    let observed = match bond_spec(bond).map(|spec| network::observe_bond(netns, &spec)) {
        Ok(Ok(observed)) => observed,
        Ok(Err(error)) => {
            status.detail = error.to_string();
            return status;
        }
        Err(error) => {
            status.detail = error.message().to_string();
            return status;
        }
    };
    status.implementation = observed.backend.as_str().to_string();
    status.exists = observed.exists;
    status.drift = observed.drift.iter().map(ToString::to_string).collect();
    status.active_members = observed
        .members
        .iter()
        .filter(|member| member.attached && member.carrier)
        .map(|member| member.name.clone())
        .collect();
    let usable = observed
        .members
        .iter()
        .filter(|member| member.present && member.carrier)
        .count();
    let (health, detail) = if !observed.exists {
        (Health::Failed, "the bond device does not exist".to_string())
    } else if usable == 0 {
        (Health::Failed, "no member has a carrier".to_string())
    } else if usable < observed.members.len() || !observed.drift.is_empty() {
        let drift: Vec<String> = observed.drift.iter().map(ToString::to_string).collect();
        let down = observed.members.len() - usable;
        (
            Health::Degraded,
            format!(
                "{down} member(s) without carrier; drift: [{}]",
                drift.join("; ")
            ),
        )
    } else {
        (Health::Healthy, String::new())
    };
    status.health = health as i32;
    status.detail = detail;
    status
}

fn validate_bond_name(field: &str, name: &str) -> Result<(), Status> {
    validate::name(field, name)?;
    if name.len() > 15 {
        return Err(validate::invalid(
            field,
            format!("`{name}` is longer than 15 characters (a Linux device name)"),
        ));
    }
    Ok(())
}

/// Checks an `ApplyBond` request.
pub fn validate_bond(bond: &v1::ApplyBond) -> Result<(), Status> {
    validate_bond_name("apply_bond.name", &bond.name)?;
    if !matches!(
        bond.mode.as_str(),
        "active-backup" | "balance-rr" | "balance-xor" | "802.3ad"
    ) {
        return Err(validate::invalid(
            "apply_bond.mode",
            format!(
                "`{}` is not one of active-backup, balance-rr, balance-xor, 802.3ad",
                bond.mode
            ),
        ));
    }
    if bond.members.is_empty() {
        return Err(validate::invalid(
            "apply_bond.members",
            "must name at least one NIC",
        ));
    }
    if bond.mtu != 0 && !(68..=65535).contains(&bond.mtu) {
        return Err(validate::invalid(
            "apply_bond.mtu",
            format!("{} is out of range 68..=65535", bond.mtu),
        ));
    }
    if bond.miimon_ms > 60_000 {
        return Err(validate::invalid(
            "apply_bond.miimon_ms",
            format!(
                "{} is out of range 0..=60000 (0: the default)",
                bond.miimon_ms
            ),
        ));
    }
    for (index, class) in bond.traffic.iter().enumerate() {
        if !matches!(
            class.name.as_str(),
            "storage" | "migration" | "guest" | "management" | "replication"
        ) {
            return Err(validate::invalid(
                &format!("apply_bond.traffic[{index}].name"),
                format!(
                    "`{}` is not one of storage, migration, guest, management, replication",
                    class.name
                ),
            ));
        }
        if class.weight == 0 || class.weight > 100 {
            return Err(validate::invalid(
                &format!("apply_bond.traffic[{index}].weight"),
                format!("{} is out of range 1..=100", class.weight),
            ));
        }
        if class.max_bps != 0 && class.max_bps < class.min_bps {
            return Err(validate::invalid(
                &format!("apply_bond.traffic[{index}].max_bps"),
                format!("{} is below min_bps {}", class.max_bps, class.min_bps),
            ));
        }
    }
    Ok(())
}
