//! The typed spec: what the files say, with spans, before names are resolved.
//!
//! These are internal working types; the serialized contract is [`crate::model`].

use crate::diag::Span;

/// A value with the span it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Where it was written.
    pub span: Span,
}

/// A name (first argument of a node) with its span.
pub type Name = Spanned<String>;

macro_rules! keyword_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        pub enum $name {
            $(
                #[doc = concat!("`", $text, "`")]
                #[serde(rename = $text)]
                $variant,
            )*
        }
        impl $name {
            /// Every keyword, in declaration order.
            pub const KEYWORDS: &'static [&'static str] = &[$($text),*];
            /// Parses the keyword.
            pub fn parse(s: &str) -> Option<$name> {
                match s { $($text => Some($name::$variant),)* _ => None }
            }
            /// The keyword as written in specs.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keyword_enum!(
    /// A failure domain or spread scope.
    Domain { Node => "node", Rack => "rack", Site => "site" }
);
keyword_enum!(
    /// Scheduler strategy.
    Strategy { Spread => "spread", Pack => "pack" }
);
keyword_enum!(
    /// Linux bonding mode.
    BondMode { ActiveBackup => "active-backup", BalanceRr => "balance-rr", BalanceXor => "balance-xor", Lacp => "802.3ad" }
);
keyword_enum!(
    /// Runtime traffic classes.
    TrafficKind { Storage => "storage", Migration => "migration", Guest => "guest", Management => "management", Replication => "replication" }
);
keyword_enum!(
    /// Tenant member role.
    Role { Admin => "admin", Operator => "operator", Viewer => "viewer" }
);
keyword_enum!(
    /// SLA class.
    SlaClass { Reserved => "reserved", OnDemand => "on-demand", Spot => "spot" }
);
keyword_enum!(
    /// VM availability.
    Availability { None => "none", Ha => "ha", Ft => "ft" }
);
keyword_enum!(
    /// A VM's power state (`power "off"`: defined and kept, not running).
    Power { On => "on", Off => "off" }
);
keyword_enum!(
    /// Affinity kind.
    AffinityKind { Apart => "apart", Together => "together", Node => "node" }
);
keyword_enum!(
    /// Security-group protocol.
    Proto { Tcp => "tcp", Udp => "udp", Icmp => "icmp", Any => "any" }
);

/// `disk NAME size=… class=…` on a node class or node.
#[derive(Debug, Clone)]
pub struct HostDisk {
    /// Device name.
    pub name: Name,
    /// Bytes.
    pub size: Option<Spanned<u64>>,
    /// Disk class, matched by pools.
    pub class: Option<Name>,
}

/// `nic NAME speed=…`.
#[derive(Debug, Clone)]
pub struct HostNic {
    /// Interface name.
    pub name: Name,
    /// Bits per second.
    pub speed: Option<Spanned<u64>>,
}

/// `label KEY VALUE` / `tag KEY VALUE`.
#[derive(Debug, Clone)]
pub struct KeyValue {
    /// Key.
    pub key: Spanned<String>,
    /// Value.
    pub value: Spanned<String>,
}

/// `node-class`.
#[derive(Debug, Clone)]
pub struct NodeClassSpec {
    /// Name.
    pub name: Name,
    /// Hardware threads.
    pub cpu: Option<Spanned<u32>>,
    /// Bytes of memory.
    pub memory: Option<Spanned<u64>>,
    /// CPU kept for the host.
    pub reserve_cpu: Option<Spanned<u32>>,
    /// Memory kept for the host.
    pub reserve_memory: Option<Spanned<u64>>,
    /// Disks.
    pub disks: Vec<HostDisk>,
    /// NICs.
    pub nics: Vec<HostNic>,
    /// Labels every node of the class carries.
    pub labels: Vec<KeyValue>,
}

/// `node` inside a rack.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Name.
    pub name: Name,
    /// Node class.
    pub class: Option<Name>,
    /// `host:port` of its cairn-node.
    pub address: Option<Spanned<String>>,
    /// `underlay="A.B.C.D/N"`: the node's underlay (VXLAN tunnel endpoint) address
    /// and prefix, made on the bond that carries the `guest` class.
    pub underlay: Option<Spanned<String>>,
    /// `maintenance=#true`: no new VM is placed on it.
    pub maintenance: Option<Spanned<bool>>,
    /// Extra labels.
    pub labels: Vec<KeyValue>,
    /// Extra disks.
    pub disks: Vec<HostDisk>,
    /// Extra NICs.
    pub nics: Vec<HostNic>,
}

/// `rack`.
#[derive(Debug, Clone)]
pub struct RackSpec {
    /// Name.
    pub name: Name,
    /// Nodes.
    pub nodes: Vec<NodeSpec>,
}

/// `traffic` in a bond.
#[derive(Debug, Clone)]
pub struct TrafficSpec {
    /// Traffic class.
    pub name: Name,
    /// Guaranteed rate.
    pub min: Option<Spanned<u64>>,
    /// Ceiling.
    pub max: Option<Spanned<u64>>,
    /// Share of the excess.
    pub weight: Option<Spanned<u32>>,
}

/// `bond`.
#[derive(Debug, Clone)]
pub struct BondSpec {
    /// Name (also the Linux device name).
    pub name: Name,
    /// Mode.
    pub mode: Option<Spanned<BondMode>>,
    /// MTU.
    pub mtu: Option<Spanned<u32>>,
    /// Link monitoring interval in ms.
    pub miimon: Option<Spanned<u32>>,
    /// Member NICs.
    pub members: Vec<Name>,
    /// Span of the `members` line (or the bond when missing).
    pub members_span: Span,
    /// Traffic classes.
    pub traffic: Vec<TrafficSpec>,
}

/// `pool`.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Name.
    pub name: Name,
    /// Disk class.
    pub disk_class: Option<Name>,
    /// Copies of each stripe.
    pub replicas: Option<Spanned<u32>>,
    /// Failure domain of the copies.
    pub failure_domain: Option<Spanned<Domain>>,
    /// Columns.
    pub stripe_width: Option<Spanned<u32>>,
    /// Bytes per stripe unit.
    pub stripe_unit: Option<Spanned<u64>>,
    /// Thin overcommit ratio.
    pub thin_overcommit: Option<Spanned<f64>>,
}

/// `site`.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    /// Name.
    pub name: Name,
    /// CPU overcommit for on-demand VMs.
    pub overcommit_cpu: Option<Spanned<f64>>,
    /// Memory overcommit for on-demand VMs.
    pub overcommit_memory: Option<Spanned<f64>>,
    /// Nodes whose loss HA/FT VMs must survive.
    pub ha_reserve: Option<Spanned<u32>>,
    /// Strategy.
    pub strategy: Option<Spanned<Strategy>>,
    /// Rebalance threshold.
    pub rebalance_threshold: Option<Spanned<f64>>,
    /// Rebalance move budget.
    pub max_moves: Option<Spanned<u32>>,
    /// Witness address.
    pub witness: Option<Spanned<String>>,
    /// `witness alternate=`: the alternate witness, used while the preferred one
    /// (`address=`) cannot be reached.
    pub witness_alternate: Option<Spanned<String>>,
    /// `failure-detect after=` (ms).
    pub failure_detect: Option<Spanned<u64>>,
    /// Racks.
    pub racks: Vec<RackSpec>,
    /// Bonds.
    pub bonds: Vec<BondSpec>,
    /// Pools.
    pub pools: Vec<PoolSpec>,
}

/// `quota`.
#[derive(Debug, Clone)]
pub struct QuotaSpec {
    /// Span of the quota line.
    pub span: Span,
    /// vCPUs.
    pub vcpus: Option<Spanned<u64>>,
    /// Memory bytes.
    pub memory: Option<Spanned<u64>>,
    /// Storage bytes.
    pub storage: Option<Spanned<u64>>,
    /// VM count.
    pub vms: Option<Spanned<u64>>,
}

/// `member`.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    /// E-mail address.
    pub email: Spanned<String>,
    /// Role.
    pub role: Option<Spanned<Role>>,
    /// `key=`: an SSH ed25519 public key, as `ssh-ed25519 BASE64` (its
    /// comment dropped), checked when lowered.
    pub key: Option<Spanned<String>>,
}

/// `budget`.
#[derive(Debug, Clone)]
pub struct BudgetSpec {
    /// Span.
    pub span: Span,
    /// Monthly amount.
    pub monthly: Option<Spanned<f64>>,
    /// ISO currency code.
    pub currency: Option<Spanned<String>>,
}

/// `network` in a tenant.
#[derive(Debug, Clone)]
pub struct NetworkSpec {
    /// Name.
    pub name: Name,
    /// Site.
    pub site: Option<Name>,
    /// CIDR text.
    pub cidr: Option<Spanned<String>>,
    /// Gateway address text.
    pub gateway: Option<Spanned<String>>,
    /// `external=#true`: egress with SNAT through the node's management side.
    pub external: Option<Spanned<bool>>,
    /// `ipv6="fd00:20::/64"`: the network's IPv6 prefix (a /64), an addition to
    /// SPEC.md.
    pub ipv6: Option<Spanned<String>>,
}

/// `allow` in a security group.
#[derive(Debug, Clone)]
pub struct AllowSpec {
    /// Span.
    pub span: Span,
    /// Network name or CIDR.
    pub from: Option<Spanned<String>>,
    /// Destination network name or CIDR (absent: any address of the NIC).
    pub to: Option<Spanned<String>>,
    /// Protocol.
    pub proto: Option<Spanned<Proto>>,
    /// Port or inclusive port range (`port=5432`, `port="8000-8100"`).
    pub port: Option<Spanned<PortRange>>,
}

/// An inclusive range of TCP/UDP ports; a single port is `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u32,
    /// Last port (inclusive).
    pub last: u32,
}

/// `security-group`.
#[derive(Debug, Clone)]
pub struct SecurityGroupSpec {
    /// Name.
    pub name: Name,
    /// Rules.
    pub allow: Vec<AllowSpec>,
}

/// `tenant`.
#[derive(Debug, Clone)]
pub struct TenantSpec {
    /// Name.
    pub name: Name,
    /// Quota.
    pub quota: Option<QuotaSpec>,
    /// Members.
    pub members: Vec<MemberSpec>,
    /// Budget.
    pub budget: Option<BudgetSpec>,
    /// Networks.
    pub networks: Vec<NetworkSpec>,
    /// Security groups.
    pub security_groups: Vec<SecurityGroupSpec>,
}

/// `sla-profile`.
#[derive(Debug, Clone)]
pub struct SlaProfileSpec {
    /// Name.
    pub name: Name,
    /// Class.
    pub class: Option<Spanned<SlaClass>>,
    /// Priority.
    pub priority: Option<Spanned<u32>>,
    /// `cpu-pinning=#true`: dedicated CPUs for its (reserved) VMs.
    pub cpu_pinning: Option<Spanned<bool>>,
}

/// `image`.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Name.
    pub name: Name,
    /// Built-in guest name.
    pub builtin: Option<Spanned<String>>,
    /// Kernel path.
    pub kernel: Option<Spanned<String>>,
    /// Initrd path.
    pub initrd: Option<Spanned<String>>,
    /// Kernel command line.
    pub cmdline: Option<Spanned<String>>,
    /// `disk "PATH" format="raw"|"qcow2"`: the disk content `from-image` disks start from.
    pub disk: Option<ImageDiskSpec>,
}

/// `disk` inside an `image`.
#[derive(Debug, Clone)]
pub struct ImageDiskSpec {
    /// The file, relative to the spec root.
    pub path: Spanned<String>,
    /// `format=`.
    pub format: Option<Spanned<String>>,
}

/// `disk` on a VM.
#[derive(Debug, Clone)]
pub struct VmDiskSpec {
    /// Name.
    pub name: Name,
    /// Bytes.
    pub size: Option<Spanned<u64>>,
    /// Pool.
    pub pool: Option<Name>,
    /// Whether it starts as a copy of the image.
    pub from_image: Option<Spanned<bool>>,
    /// Whether no plan may delete its volume (`prevent-destroy=#true`).
    pub prevent_destroy: Option<Spanned<bool>>,
}

/// `nic` on a VM.
#[derive(Debug, Clone)]
pub struct VmNicSpec {
    /// Span.
    pub span: Span,
    /// Network.
    pub network: Option<Name>,
    /// Security groups (comma- or space-separated in the spec).
    pub security_groups: Vec<Name>,
    /// A pinned IPv4 address (`address="10.20.0.15"`), as written.
    pub address: Option<Spanned<String>>,
}

/// The body shared by `vm` and `vm-group`.
#[derive(Debug, Clone, Default)]
pub struct VmBody {
    /// vCPUs.
    pub cpu: Option<Spanned<u32>>,
    /// Memory bytes.
    pub memory: Option<Spanned<u64>>,
    /// SLA profile.
    pub sla: Option<Name>,
    /// Availability.
    pub availability: Option<Spanned<Availability>>,
    /// Power state (`power "off"`).
    pub power: Option<Spanned<Power>>,
    /// An FT VM's checkpoint interval in ms (`ft-epoch "30ms"`).
    pub ft_epoch: Option<Spanned<u64>>,
    /// Image.
    pub image: Option<Name>,
    /// Disks.
    pub disks: Vec<VmDiskSpec>,
    /// NICs.
    pub nics: Vec<VmNicSpec>,
    /// Tags.
    pub tags: Vec<KeyValue>,
}

/// `vm`.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Name.
    pub name: Name,
    /// Tenant.
    pub tenant: Option<Name>,
    /// Site.
    pub site: Option<Name>,
    /// Body.
    pub body: VmBody,
}

/// `vm-group`.
#[derive(Debug, Clone)]
pub struct VmGroupSpec {
    /// Name.
    pub name: Name,
    /// Tenant.
    pub tenant: Option<Name>,
    /// Site.
    pub site: Option<Name>,
    /// Replica count.
    pub replicas: Option<Spanned<u32>>,
    /// Spread scope.
    pub spread: Option<Spanned<Domain>>,
    /// Disruption budget.
    pub max_unavailable: Option<Spanned<u32>>,
    /// Body of every replica.
    pub body: VmBody,
}

/// A selector: `KEY=VALUE` properties, ANDed.
#[derive(Debug, Clone)]
pub struct SelectorSpec {
    /// Span of the selector line.
    pub span: Span,
    /// Pairs in the order written.
    pub pairs: Vec<KeyValue>,
}

/// `affinity`.
#[derive(Debug, Clone)]
pub struct AffinitySpec {
    /// Name.
    pub name: Name,
    /// Kind.
    pub kind: Option<Spanned<AffinityKind>>,
    /// Scope.
    pub scope: Option<Spanned<Domain>>,
    /// Hard constraint?
    pub hard: Option<Spanned<bool>>,
    /// Soft weight.
    pub weight: Option<Spanned<u32>>,
    /// VM selector.
    pub select: Option<SelectorSpec>,
    /// Node selector.
    pub nodes: Option<SelectorSpec>,
}

/// `snapshot` in a protection plan.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    /// Span.
    pub span: Span,
    /// Interval (ms).
    pub every: Option<Spanned<u64>>,
    /// Snapshots kept.
    pub keep: Option<Spanned<u32>>,
}

/// `replicate` in a protection plan.
#[derive(Debug, Clone)]
pub struct ReplicateSpec {
    /// Span.
    pub span: Span,
    /// Target site.
    pub to_site: Option<Name>,
    /// Target pool in that site.
    pub pool: Option<Name>,
    /// Interval (ms).
    pub every: Option<Spanned<u64>>,
    /// Copies kept.
    pub keep: Option<Spanned<u32>>,
}

/// `protection-plan`.
#[derive(Debug, Clone)]
pub struct ProtectionPlanSpec {
    /// Name.
    pub name: Name,
    /// Snapshot schedule.
    pub snapshot: Option<SnapshotSpec>,
    /// Replication schedules.
    pub replicate: Vec<ReplicateSpec>,
    /// VM selector.
    pub applies_to: Option<SelectorSpec>,
}

/// Everything the files declare.
#[derive(Debug, Clone, Default)]
pub struct SpecSet {
    /// Node classes.
    pub node_classes: Vec<NodeClassSpec>,
    /// Sites.
    pub sites: Vec<SiteSpec>,
    /// Tenants.
    pub tenants: Vec<TenantSpec>,
    /// SLA profiles.
    pub sla_profiles: Vec<SlaProfileSpec>,
    /// Images.
    pub images: Vec<ImageSpec>,
    /// VMs.
    pub vms: Vec<VmSpec>,
    /// VM groups.
    pub vm_groups: Vec<VmGroupSpec>,
    /// Affinity rules.
    pub affinities: Vec<AffinitySpec>,
    /// Protection plans.
    pub protection_plans: Vec<ProtectionPlanSpec>,
    /// `reconcile` blocks (at most one is valid; `check` reports the others).
    pub reconcile: Vec<ReconcileSpec>,
}

impl SpecSet {
    /// Appends what `other` declares after what this set declares: the set of
    /// lowering this set's files, then `other`'s.
    pub fn append(&mut self, other: SpecSet) {
        let SpecSet {
            node_classes,
            sites,
            tenants,
            sla_profiles,
            images,
            vms,
            vm_groups,
            affinities,
            protection_plans,
            reconcile,
        } = other;
        self.node_classes.extend(node_classes);
        self.sites.extend(sites);
        self.tenants.extend(tenants);
        self.sla_profiles.extend(sla_profiles);
        self.images.extend(images);
        self.vms.extend(vms);
        self.vm_groups.extend(vm_groups);
        self.affinities.extend(affinities);
        self.protection_plans.extend(protection_plans);
        self.reconcile.extend(reconcile);
    }
}

/// `freeze` in the `reconcile` block (times checked by `check::reconcile`).
#[derive(Debug, Clone)]
pub struct FreezeSpec {
    /// Name.
    pub name: Name,
    /// Start, as written.
    pub from: Option<Spanned<String>>,
    /// End, as written.
    pub to: Option<Spanned<String>>,
    /// UTC offset, as written (`+02:00`).
    pub zone: Option<Spanned<String>>,
}

/// The `reconcile` block: the repository's own sync policy.
#[derive(Debug, Clone)]
pub struct ReconcileSpec {
    /// The `reconcile` node.
    pub span: Span,
    /// `auto-apply`.
    pub auto_apply: Option<Spanned<bool>>,
    /// `self-heal`.
    pub self_heal: Option<Spanned<bool>>,
    /// `prune`.
    pub prune: Option<Spanned<bool>>,
    /// `drift-check every=` (ms).
    pub drift_check: Option<Spanned<u64>>,
    /// `crash-restart limit= window=` (window in ms).
    pub crash_restart: Option<(Spanned<u32>, Spanned<u64>)>,
    /// `blast-radius max=`.
    pub blast_radius: Option<Spanned<u32>>,
    /// `freeze` windows.
    pub freezes: Vec<FreezeSpec>,
}
