//! Observe: ask every node of the spec, in parallel and with a timeout, what it
//! runs. An unreachable node is recorded as such; it never aborts the plan.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::v1::{Health, VmState, VolumeRole};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::desired::DesiredNode;
use crate::nodes::NodeApi;

/// How long one node may take to answer.
pub const OBSERVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A VM as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedVm {
    /// Name.
    pub name: String,
    /// Running, stopped, crashed or starting (`running`, `stopped`, `crashed`,
    /// `pending` in JSON).
    #[serde(with = "wire_words::vm_state")]
    pub state: VmState,
    /// Health (`healthy`, `degraded`, `failed`, `unknown` in JSON).
    #[serde(with = "wire_words::health")]
    pub health: Health,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_bytes: u64,
    /// Unrequested exits.
    pub crash_count: u32,
    /// Attached volumes.
    pub volumes: Vec<String>,
    /// Its NICs as made on the node.
    #[serde(default)]
    pub nics: Vec<ObservedNic>,
    /// The image it was defined with (`None` from nodes that do not report it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::desired::BootImage>,
    /// How many times the node started its process (exactly-once checks).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub starts: u64,
    /// Its disks (its volumes) as the node serves them to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<ObservedDisk>,
    /// The built-in guest's last block self-test on its first disk (`pass`, …; empty
    /// when unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guest_block_test: String,
    /// The SLA class the node enforces for it (empty from nodes that do not report
    /// one) and its priority.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sla: String,
    /// Its SLA priority as the node keeps it.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub priority: u32,
    /// Values of its cgroup that differ from what its class asks (a CreateVm of the
    /// same definition repairs them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup_drift: Vec<String>,
    /// The CPUs its node dedicates to it ("1-2"; empty: it shares its node's CPUs).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dedicated_cpus: String,
    /// Why its node stopped it under memory pressure (`preempted: …`, the node's
    /// last exit) while it stays stopped; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub preempted: String,
    /// Its fault-tolerance side as its node reports it (issue 22): a protected
    /// primary, a waiting secondary, a promoted one; `None` for a VM its node runs
    /// without FT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<ObservedFt>,
}

/// One side of an FT pair as its node reports it (`VmStatus.ft`). Its figures are
/// counters: they count as 0 in [`Observed::digest`] (a plan file stays valid while
/// the pair checkpoints).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ObservedFt {
    /// `primary` or `secondary`.
    pub role: String,
    /// Primary: `connecting`, `initial-copy`, `protected`, `secondary-lost`,
    /// `unprotected`; secondary: `waiting`, `initial-copy`, `protected`,
    /// `primary-lost`, `failed`, `promoting`, `promoted`, `stopped`.
    pub phase: String,
    /// The other side's checkpoint address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    /// Epoch length (ms).
    #[serde(default)]
    pub epoch_ms: u64,
    /// Primary: the last checkpoint taken; secondary: the last complete one.
    #[serde(default, serialize_with = "counter")]
    pub epoch: u64,
    /// The last checkpoint the secondary acknowledged.
    #[serde(default, serialize_with = "counter")]
    pub last_acked: u64,
    /// Median bytes per checkpoint.
    #[serde(default, serialize_with = "counter")]
    pub median_epoch_bytes: u64,
    /// The added latency of output: how long a frame was held (median, µs).
    #[serde(default, serialize_with = "counter")]
    pub median_output_delay_us: u64,
    /// A promoted secondary: promotion → vCPUs running (µs).
    #[serde(default, serialize_with = "counter")]
    pub promote_us: u64,
    /// Who holds `vm/NAME` at the witness as last answered (empty: no guard).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub witness_holder: String,
    /// The witness grant's number.
    #[serde(default, serialize_with = "counter")]
    pub witness_number: u64,
    /// The VMM's or the guard's last error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl ObservedFt {
    fn from_wire(f: proto::v1::VmFt) -> ObservedFt {
        ObservedFt {
            role: f.role,
            phase: f.phase,
            peer: f.peer,
            epoch_ms: f.epoch_ms,
            epoch: f.epoch,
            last_acked: f.last_acked,
            median_epoch_bytes: f.median_epoch_bytes.max(0.0).round() as u64,
            median_output_delay_us: (f.median_output_delay_ms.max(0.0) * 1000.0).round() as u64,
            promote_us: (f.promote_ms.max(0.0) * 1000.0).round() as u64,
            witness_holder: f.witness_holder,
            witness_number: f.witness_number,
            error: f.error,
        }
    }
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// A VM's disk as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ObservedDisk {
    /// The volume.
    pub volume: String,
    /// The running VM has it as a virtio-blk device (through its node's NBD export
    /// and the replicated write path).
    pub attached: bool,
    /// The guest's device index when attached.
    pub device: u32,
    /// `local` (the node holds the primary copy), `remote` (a replica only) or
    /// `missing`.
    pub data: String,
    /// Copies of the volume, and how many hold every acknowledged write.
    pub copies: u32,
    /// Copies in sync.
    pub copies_in_sync: u32,
    /// Why not attached, or what is wrong with the copies.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// The guest's read and write requests and bytes on it since the VM started.
    /// These counters move with the guest's I/O, so [`Observed::digest`] sees them
    /// as 0 ([`counter`]).
    #[serde(serialize_with = "counter")]
    pub reads: u64,
    /// Write requests.
    #[serde(serialize_with = "counter")]
    pub writes: u64,
    /// Bytes read.
    #[serde(serialize_with = "counter")]
    pub bytes_read: u64,
    /// Bytes written.
    #[serde(serialize_with = "counter")]
    pub bytes_written: u64,
    /// Failed requests.
    #[serde(serialize_with = "counter")]
    pub errors: u64,
    /// The copies at a glance: `in-sync`, `resyncing` or `degraded` (empty when the
    /// node does not hold the primary copy, or does not say).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub copies_state: String,
    /// The built-in guest's own count of its I/O on this disk (its driver's requests,
    /// bytes and failures since it booted; zero for Linux guests; 0 to the digest).
    #[serde(default, serialize_with = "guest_counter")]
    pub guest: GuestDiskCount,
    /// Its copies' catch-up while one is outside the in-sync set: the progress its
    /// volume's writer reports, filled in by status (a node's own observation of a
    /// VM disk never carries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<crate::status::VolumeRebuild>,
}

thread_local! {
    /// Set while [`Observed::digest`] serializes: counters are written as 0 then.
    static DIGESTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A counter that moves while nothing changes (a guest's I/O): written as it is,
/// except into [`Observed::digest`], which sees 0, so a plan file or a signed
/// action's binding does not go stale because a guest wrote a block.
fn counter<S: serde::Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(if DIGESTING.with(std::cell::Cell::get) {
        0
    } else {
        *value
    })
}

fn guest_counter<S: serde::Serializer>(value: &GuestDiskCount, s: S) -> Result<S::Ok, S::Error> {
    if DIGESTING.with(std::cell::Cell::get) {
        GuestDiskCount::default().serialize(s)
    } else {
        value.serialize(s)
    }
}

/// Whether a volume's resync is left out: when there is none, and always from
/// [`Observed::digest`] (its bytes move every second).
fn resync_left_out(resync: &Option<ObservedResync>) -> bool {
    resync.is_none() || DIGESTING.with(std::cell::Cell::get)
}

/// The built-in guest's own count of its I/O on one disk.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct GuestDiskCount {
    /// virtio-blk requests its driver submitted.
    pub requests: u64,
    /// Bytes it read.
    pub bytes_read: u64,
    /// Bytes it wrote.
    pub bytes_written: u64,
    /// Requests that failed.
    pub errors: u64,
}

impl ObservedVm {
    /// Whether its process runs or is starting (a stop is needed before a delete).
    pub fn is_running(&self) -> bool {
        matches!(self.state, VmState::Running | VmState::Starting)
    }

    /// Whether it is stopped or crashed (a start brings it back).
    pub fn is_down(&self) -> bool {
        matches!(self.state, VmState::Stopped | VmState::Crashed)
    }

    /// Its NICs' tenant networks, in order.
    pub fn nic_networks(&self) -> Vec<&str> {
        self.nics.iter().map(|n| n.network.as_str()).collect()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The image a node reports a VM defined with (`None`: the node does not say).
fn wire_image(v: &proto::v1::VmStatus) -> Option<crate::desired::BootImage> {
    use crate::desired::BootImage;
    if !v.image_builtin.is_empty() {
        Some(BootImage::Builtin(v.image_builtin.clone()))
    } else if !v.kernel_path.is_empty() {
        Some(BootImage::Kernel {
            kernel: v.kernel_path.clone(),
            initrd: v.initrd_path.clone(),
            cmdline: v.cmdline.clone(),
        })
    } else {
        None
    }
}

/// A VM NIC as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ObservedNic {
    /// Tenant network.
    pub network: String,
    /// Tap device.
    pub tap: String,
    /// The tenant network's bridge.
    pub bridge: String,
    /// Tap up on the bridge, bridge up.
    pub ready: bool,
    /// Why not.
    pub detail: String,
    /// The guest's MAC address on this NIC (empty from nodes before it was reported).
    #[serde(default)]
    pub mac: String,
    /// The running VM's virtio-net device is on this tap and the guest's driver has
    /// brought it up.
    #[serde(default)]
    pub guest_up: bool,
}

/// A volume as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedVolume {
    /// Name.
    pub name: String,
    /// Primary or replica (`primary`, `replica` in JSON).
    #[serde(with = "wire_words::volume_role")]
    pub role: VolumeRole,
    /// Size.
    pub size_bytes: u64,
    /// Stripe columns.
    pub stripe_width: u32,
    /// Stripe unit.
    pub stripe_unit_bytes: u64,
    /// Replica peers (primary) — node names.
    pub replica_peers: Vec<String>,
    /// Primary node (replica).
    pub primary: String,
    /// Health (`healthy`, `degraded`, `failed`, `unknown` in JSON).
    #[serde(with = "wire_words::health")]
    pub health: Health,
    /// How many times a volume of this name was created on the node.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// The epoch this copy holds (absent before the controller set one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<ObservedEpoch>,
    /// Its snapshots' names (a base volume's `image` snapshot: `crate::images`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
    /// On the writer: copies outside the in-sync set being caught up or rebuilt.
    /// Volatile (bytes move every second): serialized (a recorded observation shows
    /// it to `cairn status --observed`) but never into [`Observed::digest`].
    #[serde(default, skip_serializing_if = "resync_left_out")]
    pub resync: Option<ObservedResync>,
}

/// A volume's delta replication as a node reports it (`ReplicationStatus`, issue
/// 18). Who ships to whom, how often and how many are kept is stable; what it did
/// (the last replicated snapshot, its age, the transfer, the error) moves, so it is
/// not serialized (not in the digest a plan file is bound to).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedReplication {
    /// `source` (this node ships) or `target` (it receives).
    pub role: String,
    /// The other node.
    pub peer: String,
    /// On the source: the target's volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_volume: String,
    /// On the source: the schedule's interval (ms; 0: on request only).
    #[serde(default)]
    pub every_ms: u64,
    /// On the source: snapshots the target keeps.
    #[serde(default)]
    pub keep: u32,
    /// The newest snapshot the target committed, as far as this node knows.
    #[serde(skip)]
    pub last_replicated: String,
    /// When the source took it (Unix ms; 0: unknown).
    #[serde(skip)]
    pub last_replicated_at_unix_ms: u64,
    /// Its age when the node answered: the recovery point achieved.
    #[serde(skip)]
    pub rpo_ms: u64,
    /// The snapshot in transfer (empty: none).
    #[serde(skip)]
    pub in_transfer: String,
    /// On the target: bytes of the transfer written so far (its progress mark).
    #[serde(skip)]
    pub transferred_to: u64,
    /// On the source: why the last scheduled transfer failed (empty after a success).
    #[serde(skip)]
    pub last_error: String,
}

/// A snapshot schedule a node holds (`ProtectionStatus`, issue 18). The schedule is
/// stable; what it did (its last snapshot, missed runs) moves every interval, so it is
/// not serialized (not in the digest a plan file is bound to).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedProtection {
    /// The plan it comes from.
    pub plan: String,
    /// The VM's volumes.
    pub volumes: Vec<String>,
    /// Interval (ms).
    pub every_ms: u64,
    /// Kept per volume.
    pub keep: u32,
    /// The newest group snapshot it took and when (Unix ms); empty before the first.
    #[serde(skip)]
    pub last_snapshot: String,
    /// When the last snapshot was taken (Unix ms).
    #[serde(skip)]
    pub last_snapshot_at_unix_ms: u64,
    /// Runs missed since the node started, and why the last one failed.
    #[serde(skip)]
    pub missed: u64,
    /// Why the last run failed (empty when it did not).
    #[serde(skip)]
    pub last_error: String,
}

/// A writer's copies outside the in-sync set and what it still owes them: a rebuild's
/// progress (`crate::status::VolumeRebuild`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedResync {
    /// Copies outside the in-sync set.
    pub copies: Vec<String>,
    /// Of them, the caught-up ones (they join the set at the next epoch).
    pub caught_up: Vec<String>,
    /// The writer's allocated bytes (a new copy is owed every one of them).
    pub allocated_bytes: u64,
    /// Bytes still to ship (their dirty regions, merged).
    pub pending_bytes: u64,
    /// Bytes shipped to copies catching up since the writer's node started.
    pub shipped_bytes: u64,
}

/// The resync a volume's writer reports, when a copy is outside its in-sync set.
fn observed_resync(v: &proto::v1::VolumeStatus) -> Option<ObservedResync> {
    let outside: Vec<String> = v
        .copies
        .iter()
        .filter(|c| !v.in_sync.contains(c))
        .cloned()
        .collect();
    (v.epoch > 0 && (!outside.is_empty() || v.resync_pending_bytes > 0)).then(|| ObservedResync {
        copies: outside,
        caught_up: v.caught_up.clone(),
        allocated_bytes: v.allocated_bytes,
        pending_bytes: v.resync_pending_bytes,
        shipped_bytes: v.resync_bytes,
    })
}

/// A volume's epoch as one copy holds it, and (on its writer) the writer's view of
/// the copies (see `crate::epochs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedEpoch {
    /// The epoch (at least 1).
    pub epoch: u64,
    /// Its one writer.
    pub writer: String,
    /// Its in-sync copies.
    pub in_sync: Vec<String>,
    /// On the writer: in-sync copies it cannot write (its writes are frozen).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub awaiting_removal: Vec<String>,
    /// On the writer: copies outside the set that caught up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caught_up: Vec<String>,
}

/// A bond as a node reports it: the definition it keeps and the device read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedBond {
    /// Name (the device).
    pub name: String,
    /// Mode.
    pub mode: String,
    /// Member NICs.
    pub members: Vec<String>,
    /// MTU (0: the node's default).
    pub mtu: u32,
    /// Link-monitoring interval (ms; 0: the node's default).
    pub miimon_ms: u32,
    /// Capacity the HTB root was given (bit/s; 0: read from link speed).
    pub capacity_bps: u64,
    /// Traffic classes as defined.
    pub traffic: Vec<crate::desired::DesiredTraffic>,
    /// The device exists.
    pub exists: bool,
    /// `kernel-bond` or `bridge-fallback`.
    pub implementation: String,
    /// Members attached with a carrier.
    pub active_members: Vec<String>,
    /// Health (`healthy`, `degraded`, `failed`, `unknown` in JSON).
    #[serde(with = "wire_words::health")]
    pub health: Health,
    /// Differences between the definition and the device.
    pub drift: Vec<String>,
    /// Readable detail.
    pub detail: String,
}

/// Where a node's NICs and bonds live and whether it can change them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedNetworking {
    /// Named network namespace (empty: the agent's own).
    pub netns: String,
    /// Why network actions are refused (empty: they are carried out).
    pub unavailable: String,
    /// `kernel-bond` or `bridge-fallback`.
    pub bond_implementation: String,
    /// Tenant network segments the node keeps, by `tenant/network` (issue 19).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub segments: BTreeMap<String, ObservedSegment>,
    /// Differences of the node's security-group tables from its NICs' groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firewall_drift: Vec<String>,
    /// Where a VM with NICs migrating to the node is received, inside `netns`
    /// (issue 17; empty: none, such VMs move to it cold).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub migration_address: String,
}

/// A tenant network segment as a node reads it back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedSegment {
    /// VXLAN network identifier of the definition.
    pub vni: u32,
    /// MTU read back (0: the devices are missing).
    pub mtu: u32,
    /// Local VTEP read back.
    pub local_vtep: String,
    /// Remote forwarding entries read back (`MAC -> VTEP`).
    pub fdb: Vec<String>,
    /// Differences from the definition (router rules included).
    pub drift: Vec<String>,
    /// SHA-256 of the definition the node keeps (empty: the node reports none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub definition_digest: String,
}

/// One node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
// One value per node, built once per observation: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum NodeObservation {
    /// It answered.
    Reachable {
        /// Its public key (hex).
        public_key_hex: String,
        /// VMs by name.
        vms: BTreeMap<String, ObservedVm>,
        /// Volumes by name.
        volumes: BTreeMap<String, ObservedVolume>,
        /// Bonds the node keeps, by name.
        #[serde(default)]
        bonds: BTreeMap<String, ObservedBond>,
        /// Its networking.
        #[serde(default)]
        networking: ObservedNetworking,
        /// Snapshot schedules it holds, by VM.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        protections: BTreeMap<String, ObservedProtection>,
        /// Delta replications it ships or receives, by its volume (issue 18).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        replications: BTreeMap<String, ObservedReplication>,
    },
    /// It did not answer in time or refused.
    Unreachable {
        /// Why.
        error: String,
    },
}

/// The names a node's snapshot schedule gives its snapshots (`auto-<Unix ms>`).
pub const SCHEDULED_SNAPSHOT_PREFIX: &str = "auto-";

/// SHA-256 of one node's answer: its canonical JSON with the volatile fields
/// left out or counted as 0 (see [`Observed::digest`]).
pub fn node_digest(observation: &NodeObservation) -> [u8; 32] {
    struct Digesting;
    impl Drop for Digesting {
        fn drop(&mut self) {
            DIGESTING.with(|d| d.set(false));
        }
    }
    DIGESTING.with(|d| d.set(true));
    let _digesting = Digesting;
    let mut hasher = Sha256::new();
    serde_json::to_writer(crate::plan::HashWriter(&mut hasher), observation)
        .expect("observations serialize");
    hasher.finalize().into()
}

/// [`Observed::digest`] from each node's name and [`node_digest`], in name
/// order.
pub fn digest_of<'a>(nodes: impl Iterator<Item = (&'a str, [u8; 32])>) -> String {
    let mut hasher = Sha256::new();
    for (name, digest) in nodes {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(digest);
    }
    proto::auth::to_hex(&hasher.finalize())
}

/// What every node reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Node name → answer.
    pub nodes: BTreeMap<String, NodeObservation>,
}

impl Observed {
    /// SHA-256 (hex) of the canonical JSON of the observation. Volatile fields
    /// (pids, timestamps, allocated bytes) are not part of it; counters (a disk's
    /// I/O) count as 0; usage (CPU time, resident memory, KSM, I/O) is not in an
    /// observation at all ([`crate::usage`]).
    ///
    /// It is the SHA-256 of each node's name and [`node_digest`], in name
    /// order, so that a caller that knows which nodes answered as before
    /// (`crate::session`) digests only the others.
    pub fn digest(&self) -> String {
        digest_of(
            self.nodes
                .iter()
                .map(|(name, o)| (name.as_str(), node_digest(o))),
        )
    }

    /// The reachable nodes' VMs: VM name → (node, VM).
    pub fn vms(&self) -> BTreeMap<&str, Vec<(&str, &ObservedVm)>> {
        let mut out: BTreeMap<&str, Vec<(&str, &ObservedVm)>> = BTreeMap::new();
        for (node, obs) in &self.nodes {
            if let NodeObservation::Reachable { vms, .. } = obs {
                for vm in vms.values() {
                    out.entry(vm.name.as_str())
                        .or_default()
                        .push((node.as_str(), vm));
                }
            }
        }
        out
    }

    /// Whether a node answered and carries out network actions (bonds, VM NICs).
    pub fn can_network(&self, node: &str) -> bool {
        matches!(
            self.nodes.get(node),
            Some(NodeObservation::Reachable { networking, .. }) if networking.unavailable.is_empty()
        )
    }

    /// Where a VM with NICs migrating to `node` is received (Observe's
    /// `networking.migration_address`); `None`: the node did not answer, or has no
    /// such address (a VM with NICs moves to or from it cold).
    pub fn nic_migration_address(&self, node: &str) -> Option<&str> {
        match self.nodes.get(node) {
            Some(NodeObservation::Reachable { networking, .. })
                if networking.unavailable.is_empty()
                    && !networking.migration_address.is_empty() =>
            {
                Some(networking.migration_address.as_str())
            }
            _ => None,
        }
    }

    /// Whether a node answered.
    pub fn reachable(&self, node: &str) -> bool {
        matches!(
            self.nodes.get(node),
            Some(NodeObservation::Reachable { .. })
        )
    }

    /// What changed from `earlier` to `self`, one readable line per difference.
    pub fn delta(&self, earlier: &Observed) -> Vec<String> {
        let mut out = vec![];
        let names: std::collections::BTreeSet<&String> =
            self.nodes.keys().chain(earlier.nodes.keys()).collect();
        for node in names {
            match (earlier.nodes.get(node), self.nodes.get(node)) {
                (
                    Some(NodeObservation::Unreachable { .. }),
                    Some(NodeObservation::Reachable { .. }),
                ) => {
                    out.push(format!("node {node}: was unreachable, now answers"));
                }
                (
                    Some(NodeObservation::Reachable { .. }),
                    Some(NodeObservation::Unreachable { error }),
                ) => {
                    out.push(format!("node {node}: answered, now unreachable ({error})"));
                }
                (
                    Some(NodeObservation::Reachable {
                        vms: a,
                        volumes: va,
                        bonds: ba,
                        ..
                    }),
                    Some(NodeObservation::Reachable {
                        vms: b,
                        volumes: vb,
                        bonds: bb,
                        ..
                    }),
                ) => {
                    for (name, bond) in bb {
                        match ba.get(name) {
                            None => out.push(format!("bond {name} on {node}: appeared")),
                            Some(old) if old != bond => {
                                let mut parts = vec![];
                                if old.health != bond.health {
                                    parts.push(format!(
                                        "health {} → {}",
                                        old.health.status_name(),
                                        bond.health.status_name()
                                    ));
                                }
                                if old.active_members != bond.active_members {
                                    parts.push(format!(
                                        "active members [{}] → [{}]",
                                        old.active_members.join(" "),
                                        bond.active_members.join(" ")
                                    ));
                                }
                                if old.drift != bond.drift {
                                    parts.push(format!("drift [{}]", bond.drift.join("; ")));
                                }
                                if parts.is_empty() {
                                    parts.push("definition changed".to_owned());
                                }
                                out.push(format!("bond {name} on {node}: {}", parts.join(", ")));
                            }
                            Some(_) => {}
                        }
                    }
                    for name in ba.keys().filter(|n| !bb.contains_key(*n)) {
                        out.push(format!("bond {name} on {node}: disappeared"));
                    }
                    for (name, vm) in b {
                        match a.get(name) {
                            None => out.push(format!(
                                "vm {name} on {node}: appeared ({})",
                                vm.state.status_name()
                            )),
                            Some(old) if old != vm => {
                                let mut parts = vec![];
                                if old.state != vm.state {
                                    parts.push(format!(
                                        "state {} → {}",
                                        old.state.status_name(),
                                        vm.state.status_name()
                                    ));
                                }
                                if old.health != vm.health {
                                    parts.push(format!(
                                        "health {} → {}",
                                        old.health.status_name(),
                                        vm.health.status_name()
                                    ));
                                }
                                if old.crash_count != vm.crash_count {
                                    parts.push(format!(
                                        "crashes {} → {}",
                                        old.crash_count, vm.crash_count
                                    ));
                                }
                                if old.vcpus != vm.vcpus || old.memory_bytes != vm.memory_bytes {
                                    parts.push("definition changed".to_owned());
                                }
                                out.push(format!("vm {name} on {node}: {}", parts.join(", ")));
                            }
                            Some(_) => {}
                        }
                    }
                    for name in a.keys().filter(|n| !b.contains_key(*n)) {
                        out.push(format!("vm {name} on {node}: disappeared"));
                    }
                    for (name, v) in vb {
                        match va.get(name) {
                            None => out.push(format!(
                                "volume {name} on {node}: appeared ({})",
                                v.role.status_name()
                            )),
                            Some(old) if old != v => out.push(format!(
                                "volume {name} on {node}: changed (health {} → {})",
                                old.health.status_name(),
                                v.health.status_name()
                            )),
                            Some(_) => {}
                        }
                    }
                    for name in va.keys().filter(|n| !vb.contains_key(*n)) {
                        out.push(format!("volume {name} on {node}: disappeared"));
                    }
                }
                (None, Some(_)) => out.push(format!("node {node}: new in the spec")),
                (Some(_), None) => out.push(format!("node {node}: no longer in the spec")),
                _ => {}
            }
        }
        out
    }
}

/// Nodes asked at once by [`observe`].
///
/// Every node used to be asked at once, each call timed from then: at 1,000
/// simulated nodes on a loaded 2-core machine the whole observation took longer than
/// [`OBSERVE_TIMEOUT`], so 927 nodes that were answering were recorded unreachable
/// and a no-change sync ended `partial`. A call's timeout now starts when it is sent.
pub const OBSERVE_IN_FLIGHT: usize = 256;

/// Asks every node, [`OBSERVE_IN_FLIGHT`] at a time, each with [`OBSERVE_TIMEOUT`]
/// from when its call is sent; a node that does not answer is recorded as
/// unreachable with why.
pub async fn observe<N: NodeApi>(nodes: &BTreeMap<String, DesiredNode>, api: &N) -> Observed {
    observe_with(nodes, api, false).await.0
}

/// [`observe`], and each node's [`node_digest`], made as each node answers (on
/// the runtime's threads, while the others are still asked), for a plan session
/// (`crate::session`) that compares them with the last plan's.
pub async fn observe_digested<N: NodeApi>(
    nodes: &BTreeMap<String, DesiredNode>,
    api: &N,
) -> (Observed, BTreeMap<String, [u8; 32]>) {
    observe_with(nodes, api, true).await
}

async fn observe_with<N: NodeApi>(
    nodes: &BTreeMap<String, DesiredNode>,
    api: &N,
    digest: bool,
) -> (Observed, BTreeMap<String, [u8; 32]>) {
    let mut tasks = tokio::task::JoinSet::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(OBSERVE_IN_FLIGHT));
    for node in nodes.values() {
        let node = node.clone();
        let api = api.clone();
        let slots = slots.clone();
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let result = tokio::time::timeout(OBSERVE_TIMEOUT, api.observe(&node)).await;
            let observation = match result {
                Ok(Ok(o)) => o,
                Ok(Err(error)) => NodeObservation::Unreachable { error },
                Err(_) => NodeObservation::Unreachable {
                    error: format!(
                        "no answer from {} within {} s",
                        node.address,
                        OBSERVE_TIMEOUT.as_secs()
                    ),
                },
            };
            let digest = digest.then(|| node_digest(&observation));
            (node.name, observation, digest)
        });
    }
    let mut observed = Observed::default();
    let mut digests = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((name, observation, digest)) = joined {
            if let Some(d) = digest {
                digests.insert(name.clone(), d);
            }
            observed.nodes.insert(name, observation);
        }
    }
    (observed, digests)
}

/// [`observe`], except the nodes in `failed`: they are recorded unreachable at once.
/// A node the controller declared failed is frozen, cut off or dead (its lease lapsed
/// and its site no longer hears it); asking it would only wait [`OBSERVE_TIMEOUT`]
/// before its HA VMs could restart elsewhere (found by the HA fault tests: a frozen
/// node's VMs ran elsewhere after 15.8 s instead of about 5).
pub async fn observe_except<N: NodeApi>(
    nodes: &BTreeMap<String, DesiredNode>,
    api: &N,
    failed: &std::collections::BTreeSet<String>,
) -> Observed {
    let live: BTreeMap<String, DesiredNode> = nodes
        .iter()
        .filter(|(name, _)| !failed.contains(*name))
        .map(|(name, node)| (name.clone(), node.clone()))
        .collect();
    let mut observed = observe(&live, api).await;
    for name in nodes.keys().filter(|name| failed.contains(*name)) {
        observed.nodes.insert(
            name.clone(),
            NodeObservation::Unreachable {
                error: format!("{name} failed: its lease lapsed and its site no longer hears it"),
            },
        );
    }
    observed
}

/// A node's answer to Observe, with the public key its inventory gave, as an
/// observation (the one place wire types become observed ones).
pub fn from_wire(public_key_hex: String, response: proto::v1::ObserveResponse) -> NodeObservation {
    let vms = response
        .vms
        .into_iter()
        .map(|v| {
            let image = wire_image(&v);
            (
                v.name.clone(),
                ObservedVm {
                    image,
                    starts: v.starts,
                    name: v.name,
                    state: VmState::from_wire(v.state),
                    health: Health::from_wire(v.health),
                    vcpus: v.vcpus,
                    memory_bytes: v.memory_bytes,
                    crash_count: v.crash_count,
                    volumes: v.volumes,
                    nics: v
                        .nics
                        .into_iter()
                        .map(|n| ObservedNic {
                            network: n.network,
                            tap: n.tap,
                            bridge: n.bridge,
                            ready: n.ready,
                            detail: n.detail,
                            mac: n.mac,
                            guest_up: n.guest_up,
                        })
                        .collect(),
                    disks: v
                        .disks
                        .into_iter()
                        .map(|d| ObservedDisk {
                            volume: d.volume,
                            attached: d.attached,
                            device: d.device,
                            data: d.data,
                            copies: d.copies,
                            copies_in_sync: d.copies_in_sync,
                            detail: d.detail,
                            reads: d.reads,
                            writes: d.writes,
                            bytes_read: d.bytes_read,
                            bytes_written: d.bytes_written,
                            errors: d.errors,
                            copies_state: d.copies_state,
                            guest: GuestDiskCount {
                                requests: d.guest_requests,
                                bytes_read: d.guest_bytes_read,
                                bytes_written: d.guest_bytes_written,
                                errors: d.guest_errors,
                            },
                            rebuild: None,
                        })
                        .collect(),
                    guest_block_test: v.guest_block_test,
                    sla: v.sla,
                    priority: v.priority,
                    cgroup_drift: v.cgroup.map(|c| c.drift).unwrap_or_default(),
                    dedicated_cpus: v.dedicated_cpus,
                    preempted: if v.state == proto::v1::VmState::Stopped as i32
                        && v.last_exit.starts_with("preempted: ")
                    {
                        v.last_exit.clone()
                    } else {
                        String::new()
                    },
                    ft: v.ft.map(ObservedFt::from_wire),
                },
            )
        })
        .collect();
    let volumes = response
        .volumes
        .into_iter()
        .map(|v| {
            let resync = observed_resync(&v);
            (
                v.name.clone(),
                ObservedVolume {
                    name: v.name,
                    role: VolumeRole::from_wire(v.role),
                    size_bytes: v.size_bytes,
                    stripe_width: v.stripe_width,
                    stripe_unit_bytes: v.stripe_unit_bytes,
                    replica_peers: v.replica_peers,
                    primary: v.primary,
                    health: Health::from_wire(v.health),
                    generation: v.generation,
                    epoch: (v.epoch > 0).then_some(ObservedEpoch {
                        epoch: v.epoch,
                        writer: v.epoch_writer,
                        in_sync: v.in_sync,
                        awaiting_removal: v.awaiting_removal,
                        caught_up: v.caught_up,
                    }),
                    resync,
                    // A schedule's own snapshots (`auto-…`, one every interval) are
                    // left out: the plan does not act on them, and the digest a
                    // plan file is bound to stays the same while they come and go.
                    snapshots: v
                        .snapshots
                        .into_iter()
                        .map(|s| s.name)
                        .filter(|name| !name.starts_with(SCHEDULED_SNAPSHOT_PREFIX))
                        .collect(),
                },
            )
        })
        .collect();
    let bonds = response
        .bonds
        .into_iter()
        .map(|b| {
            (
                b.name.clone(),
                ObservedBond {
                    name: b.name,
                    mode: b.mode,
                    members: b.members,
                    mtu: b.mtu,
                    miimon_ms: b.miimon_ms,
                    capacity_bps: b.capacity_bps,
                    traffic: b
                        .traffic
                        .into_iter()
                        .map(|t| crate::desired::DesiredTraffic {
                            name: t.name,
                            min_bps: t.min_bps,
                            max_bps: t.max_bps,
                            weight: t.weight,
                        })
                        .collect(),
                    exists: b.exists,
                    implementation: b.implementation,
                    active_members: b.active_members,
                    health: Health::from_wire(b.health),
                    drift: b.drift,
                    detail: b.detail,
                },
            )
        })
        .collect();
    let networking = response
        .networking
        .map(|n| ObservedNetworking {
            netns: n.netns,
            unavailable: n.unavailable_reason,
            bond_implementation: n.bond_implementation,
            segments: n
                .segments
                .into_iter()
                .map(|s| {
                    (
                        crate::segments::segment_key(&s.tenant, &s.network),
                        ObservedSegment {
                            vni: s.vni,
                            mtu: s.mtu,
                            local_vtep: s.local_vtep,
                            fdb: s.fdb,
                            drift: s.drift,
                            definition_digest: s.definition_digest,
                        },
                    )
                })
                .collect(),
            firewall_drift: n.firewall_drift,
            migration_address: n.migration_address,
        })
        .unwrap_or_default();
    let protections = response
        .protections
        .into_iter()
        .map(|p| {
            (
                p.vm,
                ObservedProtection {
                    plan: p.plan,
                    volumes: p.volumes,
                    every_ms: p.every_ms,
                    keep: p.keep,
                    last_snapshot: p.last_snapshot,
                    last_snapshot_at_unix_ms: p.last_snapshot_at_unix_ms,
                    missed: p.missed,
                    last_error: p.last_error,
                },
            )
        })
        .collect();
    let replications = response
        .replications
        .into_iter()
        .map(|r| {
            (
                r.volume,
                ObservedReplication {
                    role: r.role,
                    peer: r.peer,
                    peer_volume: r.peer_volume,
                    every_ms: r.every_ms,
                    keep: r.keep,
                    last_replicated: r.last_replicated,
                    last_replicated_at_unix_ms: r.last_replicated_at_unix_ms,
                    rpo_ms: r.rpo_ms,
                    in_transfer: r.in_transfer,
                    transferred_to: r.transferred_to,
                    last_error: r.last_error,
                },
            )
        })
        .collect();
    NodeObservation::Reachable {
        public_key_hex,
        vms,
        volumes,
        bonds,
        networking,
        protections,
        replications,
    }
}

/// The words observations are written with in JSON (recorded observations, plan
/// files): the status words of CLI.md, read back into the proto enums.
mod wire_words {
    macro_rules! words {
        ($module:ident, $ty:ty, [$($word:literal => $value:expr),* $(,)?]) => {
            pub mod $module {
                use serde::{Deserialize, Deserializer, Serializer};

                pub fn serialize<S: Serializer>(value: &$ty, s: S) -> Result<S::Ok, S::Error> {
                    s.serialize_str(value.status_name())
                }

                pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                    let word = String::deserialize(d)?;
                    match word.as_str() {
                        $($word => Ok($value),)*
                        other => Err(serde::de::Error::unknown_variant(other, &[$($word),*])),
                    }
                }
            }
        };
    }

    words!(vm_state, proto::v1::VmState, [
        "running" => proto::v1::VmState::Running,
        "stopped" => proto::v1::VmState::Stopped,
        "crashed" => proto::v1::VmState::Crashed,
        "pending" => proto::v1::VmState::Starting,
    ]);
    words!(health, proto::v1::Health, [
        "healthy" => proto::v1::Health::Healthy,
        "degraded" => proto::v1::Health::Degraded,
        "failed" => proto::v1::Health::Failed,
        "unknown" => proto::v1::Health::Unspecified,
    ]);
    words!(volume_role, proto::v1::VolumeRole, [
        "primary" => proto::v1::VolumeRole::Primary,
        "replica" => proto::v1::VolumeRole::Replica,
        "unknown" => proto::v1::VolumeRole::Unspecified,
    ]);
}

#[cfg(test)]
mod in_flight_tests {
    use super::*;

    /// Nodes that answer one at a time, each after 10 ms (one busy simulator).
    #[derive(Clone)]
    struct OneAtATime(std::sync::Arc<tokio::sync::Mutex<()>>);

    impl NodeApi for OneAtATime {
        async fn observe(&self, _node: &DesiredNode) -> Result<NodeObservation, String> {
            let _turn = self.0.lock().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err("answered".into())
        }

        async fn apply(
            &self,
            node: &str,
            _address: &str,
            _request: proto::v1::ApplyRequest,
        ) -> Result<proto::v1::ApplyResponse, crate::nodes::NodeError> {
            Err(crate::nodes::NodeError::Unreachable {
                node: node.into(),
                error: "not used".into(),
            })
        }

        async fn get_outcome(
            &self,
            node: &str,
            _address: &str,
            _request_id: &str,
        ) -> Result<proto::v1::GetOutcomeResponse, crate::nodes::NodeError> {
            Err(crate::nodes::NodeError::Unreachable {
                node: node.into(),
                error: "not used".into(),
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_observation_longer_than_the_timeout_times_out_no_node_that_answers() {
        // 600 nodes × 10 ms one at a time: 6 s in all, past OBSERVE_TIMEOUT; asked all
        // at once, the last ~100 timed out while waiting for their turn.
        let nodes: BTreeMap<String, DesiredNode> = (0..600)
            .map(|i| {
                let node = DesiredNode {
                    name: format!("n{i}"),
                    site: "s".into(),
                    address: format!("127.0.0.1:{}", 20_000 + i),
                };
                (node.name.clone(), node)
            })
            .collect();
        let started = std::time::Instant::now();
        let observed = observe(&nodes, &OneAtATime(Default::default())).await;
        assert!(
            started.elapsed() > OBSERVE_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(observed.nodes.len(), 600);
        for (name, observation) in &observed.nodes {
            assert!(
                matches!(observation, NodeObservation::Unreachable { error } if error == "answered"),
                "{name}: {observation:?}"
            );
        }
    }
}
