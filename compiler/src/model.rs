//! The compiled model: the checked, resolved and expanded cloud, as the
//! rest of cairn (placement, policies, plans) sees it.
//!
//! This is a serialization boundary: its JSON form is a documented contract
//! (`cairn compile --format json`, the policy input) described by the JSON
//! Schema in `schemas/model.schema.json`. Every list is sorted by name and
//! every map is a `BTreeMap`, so the same specs give the same bytes whatever
//! the files are called or the order they are in. Source locations are kept
//! out of it for the same reason; [`crate::Compilation::spans`] has them.

use std::collections::BTreeMap;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod reconcile;
pub mod timers;

pub use reconcile::{
    DEFAULT_CRASH_RESTART_LIMIT, DEFAULT_CRASH_RESTART_WINDOW_MS, FreezeSchedule, FreezeTime,
    FreezeWindow, Reconcile, parse_utc_offset,
};

pub use crate::spec::{
    AffinityKind, Availability, BondMode, Domain, Power, Proto, Role, SlaClass, Strategy,
    TrafficKind,
};

/// The version of the model's JSON shape. Bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// The whole compiled cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Always [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Node classes.
    pub node_classes: Vec<NodeClass>,
    /// Sites with their racks, nodes, bonds and pools.
    pub sites: Vec<Site>,
    /// Tenants.
    pub tenants: Vec<Tenant>,
    /// SLA profiles, built-in ones included.
    pub sla_profiles: Vec<SlaProfile>,
    /// Images.
    pub images: Vec<Image>,
    /// Every VM, vm-groups expanded.
    // Each is shared (`Arc`), so a copy of the model (the controller's status
    // keeps one beside its compile session's) copies pointers, not 100,000
    // VMs, and the compile session's patch replaces only the changed ones. The
    // JSON and the schema are the VM's own.
    pub vms: Vec<Arc<Vm>>,
    /// VM groups.
    pub vm_groups: Vec<VmGroup>,
    /// Affinity rules.
    pub affinities: Vec<Affinity>,
    /// Protection plans.
    pub protection_plans: Vec<ProtectionPlan>,
    /// The `reconcile` block (absent: the defaults, [`Reconcile::default`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<Reconcile>,
}

/// CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Resources {
    /// Hardware threads or vCPUs.
    pub cpu: u64,
    /// Bytes.
    pub memory_bytes: u64,
}

/// A node class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeClass {
    /// Name.
    pub name: String,
    /// Hardware.
    pub capacity: Resources,
    /// Kept for the host.
    pub host_reserve: Resources,
    /// Disks.
    pub disks: Vec<Disk>,
    /// NICs.
    pub nics: Vec<Nic>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A physical disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Disk {
    /// Device name.
    pub name: String,
    /// Bytes.
    pub size_bytes: u64,
    /// Class matched by pools.
    pub class: String,
}

/// A physical NIC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Nic {
    /// Interface name.
    pub name: String,
    /// Bits per second.
    pub speed_bps: u64,
}

/// A site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Site {
    /// Name.
    pub name: String,
    /// Overcommit ratios for on-demand VMs.
    pub overcommit: Overcommit,
    /// Nodes whose loss HA and FT VMs must survive.
    pub ha_reserve_nodes: u32,
    /// Scheduler settings.
    pub scheduler: Scheduler,
    /// The site's quorum witness `host:port` (`witness address=`, the preferred one):
    /// HA nodes cut off from the controller and FT pairs ask it.
    pub witness: Option<String>,
    /// The alternate witness (`witness alternate=`), used while the preferred one
    /// cannot be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness_alternate: Option<String>,
    /// `failure-detect after=` in ms: detect T, the nodes' lease length (absent:
    /// 3 s; see [`timers::HaTimers`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_detect_ms: Option<u64>,
    /// Racks and their node names.
    pub racks: Vec<Rack>,
    /// Nodes, with inherited class settings applied.
    pub nodes: Vec<Node>,
    /// Bonds every node of the site carries.
    pub bonds: Vec<Bond>,
    /// Storage pools.
    pub pools: Vec<Pool>,
    /// Sum of the nodes' allocatable resources.
    pub allocatable: Resources,
}

/// Overcommit ratios.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Overcommit {
    /// CPU ratio.
    pub cpu: f64,
    /// Memory ratio.
    pub memory: f64,
}

/// Scheduler settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Scheduler {
    /// Strategy.
    pub strategy: Strategy,
    /// Imbalance that triggers rebalancing (0..1).
    pub rebalance_threshold: f64,
    /// Moves per rebalance.
    pub max_moves: u32,
}

/// A rack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rack {
    /// Name.
    pub name: String,
    /// Names of its nodes.
    pub nodes: Vec<String>,
}

/// A physical node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Node {
    /// Name.
    pub name: String,
    /// Site.
    pub site: String,
    /// Rack.
    pub rack: String,
    /// Node class.
    pub class: String,
    /// `host:port` of its cairn-node.
    pub address: String,
    /// `underlay="A.B.C.D/N"`: its underlay address (the VXLAN tunnel endpoint of
    /// its tenant networks) with the underlay subnet's prefix; cairn-node makes it on
    /// the bond carrying the `guest` class. None: the host of `address` is the
    /// tunnel endpoint, and must already be on a device of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay: Option<String>,
    /// Hardware.
    pub capacity: Resources,
    /// Capacity net of host-reserve.
    pub allocatable: Resources,
    /// Disks (class disks, then the node's own).
    pub disks: Vec<Disk>,
    /// NICs.
    pub nics: Vec<Nic>,
    /// Labels (class labels overridden by the node's).
    pub labels: BTreeMap<String, String>,
    /// `maintenance=#true`: the node takes no VM that was not on it before (new VMs,
    /// HA restarts and crash moves go elsewhere, a volume's new writer is never
    /// chosen there), the VMs already on it stay, and `ha-reserve` admission counts
    /// no room on it. Also set at run time by `cairn node maintenance NODE --on`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
}

/// A bond.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Bond {
    /// Name, also the Linux device name.
    pub name: String,
    /// Mode.
    pub mode: BondMode,
    /// MTU.
    pub mtu: u32,
    /// Link monitor interval, ms.
    pub miimon_ms: u32,
    /// Member NICs.
    pub members: Vec<String>,
    /// Capacity on the slowest node of the site.
    pub capacity_bps: u64,
    /// Traffic classes.
    pub traffic: Vec<TrafficClass>,
}

/// A QoS traffic class of a bond.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TrafficClass {
    /// Which traffic.
    pub name: TrafficKind,
    /// Guaranteed rate.
    pub min_bps: u64,
    /// Ceiling (the bond capacity when not given).
    pub max_bps: u64,
    /// Share of the excess.
    pub weight: u32,
}

impl TrafficClass {
    /// How every output words it (see [`traffic_class_text`]).
    pub fn text(&self) -> String {
        traffic_class_text(self.name.as_str(), self.min_bps, self.max_bps, self.weight)
    }
}

/// A traffic class in the words of the spec, as `cairn compile`, `plan` and
/// `status` print it: `storage min 300Mbps max 1Gbps weight 4`.
pub fn traffic_class_text(name: &str, min_bps: u64, max_bps: u64, weight: u32) -> String {
    use crate::units::format_bandwidth as bandwidth;
    format!(
        "{name} min {} max {} weight {weight}",
        bandwidth(min_bps),
        bandwidth(max_bps)
    )
}

/// A storage pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Pool {
    /// Name.
    pub name: String,
    /// Disk class.
    pub disk_class: String,
    /// Copies of each stripe.
    pub replicas: u32,
    /// Failure domain of the copies.
    pub failure_domain: Domain,
    /// Columns.
    pub stripe_width: u32,
    /// Bytes per stripe unit.
    pub stripe_unit_bytes: u64,
    /// Thin overcommit ratio.
    pub thin_overcommit: f64,
    /// Every disk of the class in the site, as `node/disk`.
    pub disks: Vec<String>,
    /// Distinct failure domains holding such disks.
    pub failure_domains: Vec<String>,
    /// Sum of the disks' sizes.
    pub raw_bytes: u64,
    /// Raw bytes / replicas × thin overcommit.
    pub provisionable_bytes: u64,
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Tenant {
    /// Name.
    pub name: String,
    /// Quota (absent: unlimited).
    pub quota: Option<Quota>,
    /// What its VMs ask for.
    pub usage: Usage,
    /// Members.
    pub members: Vec<Member>,
    /// Budget.
    pub budget: Option<Budget>,
    /// Networks.
    pub networks: Vec<Network>,
    /// Security groups.
    pub security_groups: Vec<SecurityGroup>,
}

/// Tenant quota; an absent field is unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Quota {
    /// vCPUs.
    pub vcpus: Option<u64>,
    /// Memory bytes.
    pub memory_bytes: Option<u64>,
    /// Storage bytes.
    pub storage_bytes: Option<u64>,
    /// VMs.
    pub vms: Option<u64>,
}

/// What a tenant's VMs ask for, as counted against its quota: FT VMs count
/// their secondary too.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory bytes.
    pub memory_bytes: u64,
    /// Provisioned disk bytes.
    pub storage_bytes: u64,
    /// VMs.
    pub vms: u64,
}

/// A tenant member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Member {
    /// E-mail.
    pub email: String,
    /// Role.
    pub role: Role,
    /// SSH ed25519 public key (`ssh-ed25519 BASE64`, without comment): what
    /// the controller trusts to sign this member's commits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A monthly budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Budget {
    /// Amount.
    pub monthly: f64,
    /// ISO 4217 code.
    pub currency: String,
}

/// A tenant network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Network {
    /// Name.
    pub name: String,
    /// Site.
    pub site: String,
    /// CIDR.
    pub cidr: String,
    /// Gateway: answers on every node that hosts the network (distributed).
    pub gateway: Option<String>,
    /// VXLAN network identifier: 24-bit, 4096 or above, unique across the
    /// repository (see [`crate::ipam`]). The placement's copy is the one kept
    /// across recompiles; this one is what a compile with no previous
    /// placement gives.
    #[serde(default)]
    pub vni: u32,
    /// `external=#true`: its VMs reach outside the cloud through the node's
    /// management side, with SNAT.
    #[serde(default)]
    pub external: bool,
    /// `ipv6="PREFIX/64"` (an addition to SPEC.md): the network's IPv6 prefix. Its
    /// gateway is `PREFIX::1` on every node, which sends router advertisements;
    /// guests take `PREFIX` + the EUI-64 of their MAC by SLAAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
}

/// A security group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SecurityGroup {
    /// Name.
    pub name: String,
    /// Rules.
    pub allow: Vec<AllowRule>,
}

/// An allow rule: traffic arriving at a NIC that lists the group is let in
/// when its source lies in `from_cidr`, its destination in `to_cidr` (when
/// given), its protocol is `proto` (`any`: every one) and its destination
/// port in `port..=port_end` (when given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AllowRule {
    /// Source network name or CIDR, as written.
    pub from: String,
    /// The source as a CIDR: the network's, or `from` itself.
    #[serde(default)]
    pub from_cidr: String,
    /// Destination network name or CIDR, as written (none: any address of the NIC).
    #[serde(default)]
    pub to: Option<String>,
    /// The destination as a CIDR (none: any).
    #[serde(default)]
    pub to_cidr: Option<String>,
    /// Protocol.
    pub proto: Proto,
    /// Port, or the first port of a range (none: all; always none for `icmp`
    /// and `any`).
    pub port: Option<u32>,
    /// The last port of a range (inclusive); none for a single port.
    #[serde(default)]
    pub port_end: Option<u32>,
}

/// An SLA profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SlaProfile {
    /// Name.
    pub name: String,
    /// Class.
    pub class: SlaClass,
    /// Priority (higher preempts lower).
    pub priority: u32,
    /// Whether cairn defines it.
    pub builtin: bool,
    /// `cpu-pinning=#true` (reserved profiles only): each of its VMs gets as many
    /// dedicated CPUs of its node as it has vCPUs, which no other VM runs on. Left
    /// out of the JSON when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cpu_pinning: bool,
}

/// An image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Image {
    /// Name.
    pub name: String,
    /// Built-in guest name (`cairn-guest`).
    pub builtin: Option<String>,
    /// Kernel path relative to the spec root.
    pub kernel: Option<String>,
    /// Initrd path relative to the spec root.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// The disk content its `from-image` disks start from (imported once into a base
    /// volume, of which each such disk is a copy-on-write clone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<ImageDisk>,
}

/// An image's disk file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ImageDisk {
    /// Path relative to the spec root.
    pub path: String,
    /// The file's format, as `qemu-img convert -f` takes it.
    pub format: ImageDiskFormat,
    /// Where the spec names the file (`FILE:LINE:COL`), for the messages of an import
    /// that fails; not part of the model's JSON.
    #[serde(skip)]
    #[schemars(skip)]
    pub at: String,
}

/// The format of an image's disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageDiskFormat {
    /// Raw bytes.
    Raw,
    /// QEMU copy-on-write v2.
    Qcow2,
}

impl ImageDiskFormat {
    /// Every format, as written in a spec.
    pub const ALL: [&'static str; 2] = ["raw", "qcow2"];

    /// The format written `text`, if it is one.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "raw" => Some(Self::Raw),
            "qcow2" => Some(Self::Qcow2),
            _ => None,
        }
    }

    /// As written in a spec (and given to `qemu-img -f`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// A VM (after vm-group expansion).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Vm {
    /// Name.
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// Site.
    pub site: String,
    /// The vm-group it was expanded from.
    pub group: Option<String>,
    /// vCPUs.
    pub cpu: u32,
    /// Memory bytes.
    pub memory_bytes: u64,
    /// SLA profile, resolved.
    pub sla: VmSla,
    /// Availability.
    pub availability: Availability,
    /// An FT VM's checkpoint interval in ms (`ft-epoch`); left out of the JSON when
    /// not given (the node's default, 30 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft_epoch_ms: Option<u32>,
    /// `off`: defined on its node and kept (placed, its disks kept) but not
    /// running (`power "off"`). Left out of the JSON when `on`.
    #[serde(default = "power_on", skip_serializing_if = "is_on")]
    pub power: Power,
    /// Image.
    pub image: String,
    /// Disks (volumes).
    pub disks: Vec<VmDisk>,
    /// NICs.
    pub nics: Vec<VmNic>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Protection plans that apply to it.
    pub protection_plans: Vec<String>,
}

/// The shortest `ft-epoch` (what `StartFt.epoch_ms` accepts).
pub const FT_EPOCH_MIN_MS: u64 = 1;
/// The longest `ft-epoch`.
pub const FT_EPOCH_MAX_MS: u64 = 10_000;

fn power_on() -> Power {
    Power::On
}

fn is_on(power: &Power) -> bool {
    *power == Power::On
}

/// A VM's resolved SLA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmSla {
    /// Profile name.
    pub name: String,
    /// Class.
    pub class: SlaClass,
    /// Priority.
    pub priority: u32,
    /// Its profile's `cpu-pinning=#true`: dedicated CPUs on its node. Left out of the
    /// JSON when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cpu_pinning: bool,
}

/// A VM disk (a volume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmDisk {
    /// Name.
    pub name: String,
    /// Bytes.
    pub size_bytes: u64,
    /// Pool in the VM's site.
    pub pool: String,
    /// Starts as a copy of the image.
    pub from_image: bool,
    /// No plan may delete its volume, not even after the disk leaves the spec:
    /// the protection is lifted by applying specs with it set to `#false` first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prevent_destroy: bool,
}

/// A VM NIC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmNic {
    /// Tenant network.
    pub network: String,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// Its IPv4 address in the network (dotted quad; the prefix is the
    /// network's): pinned by the operator, or given by IPAM
    /// ([`crate::ipam`]). The placement's copy is the one kept across
    /// recompiles. None on an IPv6 network (IPAM is IPv4 only).
    #[serde(default)]
    pub address: Option<String>,
    /// Whether the operator pinned the address (`address=`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

/// A VM group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmGroup {
    /// Name.
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// Site.
    pub site: String,
    /// Replica count.
    pub replicas: u32,
    /// Spread scope.
    pub spread: Option<Domain>,
    /// Disruption budget.
    pub max_unavailable: u32,
    /// Expanded VM names, in replica order.
    pub vms: Vec<String>,
}

/// An affinity rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Affinity {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: AffinityKind,
    /// Scope (apart/together).
    pub scope: Domain,
    /// Constraint (true) or preference (false).
    pub hard: bool,
    /// Preference weight 1..100.
    pub weight: u32,
    /// VM selector.
    pub select: BTreeMap<String, String>,
    /// Node selector (kind `node`).
    pub nodes: BTreeMap<String, String>,
    /// VMs the selector matches.
    pub vms: Vec<String>,
}

/// A protection plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProtectionPlan {
    /// Name.
    pub name: String,
    /// Snapshot schedule.
    pub snapshot: Option<Schedule>,
    /// Replication schedules.
    pub replicate: Vec<Replication>,
    /// VM selector.
    pub applies_to: BTreeMap<String, String>,
    /// VMs it applies to.
    pub vms: Vec<String>,
}

/// A snapshot schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Schedule {
    /// Interval, ms.
    pub every_ms: u64,
    /// Kept.
    pub keep: u32,
}

/// A replication schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Replication {
    /// Target site.
    pub to_site: String,
    /// Target pool.
    pub pool: String,
    /// Interval, ms.
    pub every_ms: u64,
    /// Kept.
    pub keep: u32,
}

impl Model {
    /// The nodes in maintenance (`maintenance=#true`), by name.
    pub fn nodes_in_maintenance(&self) -> std::collections::BTreeSet<String> {
        self.sites
            .iter()
            .flat_map(|s| &s.nodes)
            .filter(|n| n.maintenance)
            .map(|n| n.name.clone())
            .collect()
    }

    /// This model with `nodes` in maintenance too (the operator's
    /// `cairn node maintenance`); borrowed when that changes nothing.
    pub fn with_maintenance<'a>(
        &'a self,
        nodes: &std::collections::BTreeSet<String>,
    ) -> std::borrow::Cow<'a, Model> {
        let adds = self
            .sites
            .iter()
            .flat_map(|s| &s.nodes)
            .any(|n| !n.maintenance && nodes.contains(&n.name));
        if !adds {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut model = self.clone();
        for n in model.sites.iter_mut().flat_map(|s| &mut s.nodes) {
            n.maintenance |= nodes.contains(&n.name);
        }
        std::borrow::Cow::Owned(model)
    }

    /// A VM by name.
    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms
            .binary_search_by(|v| v.name.as_str().cmp(name))
            .ok()
            .map(|i| &*self.vms[i])
    }

    /// A site by name.
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }
}
