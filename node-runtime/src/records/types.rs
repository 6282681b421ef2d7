//! The node's own record types: what `node.redb` keeps, in the node's words.
//!
//! These are not wire types. The wire contract (`proto::v1`) may grow fields and is
//! converted to and from these in one place (`convert.rs`); a record changes only with
//! its [`Record::VERSION`], and a build reads the versions before its own (a rolling
//! upgrade reads what the previous version wrote). Records are stored as JSON objects
//! whose `version` field says which shape they have.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A table of records, one type per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// [`RequestRecord`]s by request id.
    Requests,
    /// [`VolumeRecord`]s by volume name.
    Volumes,
    /// [`VmRecord`]s by VM name.
    Vms,
    /// [`BondRecord`]s by bond name.
    Bonds,
    /// [`PeerRecord`]s by node name.
    Peers,
    /// [`VolumeEpochRecord`]s by volume name.
    VolumeEpochs,
    /// [`ClientVolumeRecord`]s by volume name.
    ClientVolumes,
    /// [`SnapshotRecord`]s by `VOLUME/SNAPSHOT`.
    VolumeSnapshots,
    /// [`ProtectionRecord`]s by VM name.
    Protections,
    /// [`ReplicationRecord`]s by volume name (delta replication, issue 18).
    Replications,
}

impl Table {
    /// Every table of records.
    pub const ALL: [Table; 10] = [
        Table::Requests,
        Table::Volumes,
        Table::Vms,
        Table::Bonds,
        Table::Peers,
        Table::VolumeEpochs,
        Table::ClientVolumes,
        Table::VolumeSnapshots,
        Table::Protections,
        Table::Replications,
    ];

    /// The redb table's name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Requests => "requests",
            Table::Volumes => "volumes",
            Table::Vms => "vms",
            Table::Bonds => "bonds",
            Table::Peers => "peers",
            Table::VolumeEpochs => "volume_epochs",
            Table::ClientVolumes => "client_volumes",
            Table::VolumeSnapshots => "volume_snapshots",
            Table::Protections => "protections",
            Table::Replications => "replications",
        }
    }
}

/// A stored record type.
pub trait Record: Serialize + DeserializeOwned + Sized {
    /// The table it lives in.
    const TABLE: Table;
    /// The version this build writes (the `version` field of every record it stores).
    const VERSION: u32;

    /// Decodes the record as the node wrote it before records had versions (prost
    /// messages, `node.redb` format 1; see `legacy.rs`).
    fn decode_unversioned(bytes: &[u8]) -> Result<Self, String>;
}

/// A request id's record: what was asked and what was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// [`RequestRecord::VERSION`] when written by this build.
    pub version: u32,
    /// SHA-256 of the prost-encoded `ApplyRequest`.
    #[serde(with = "hex_bytes")]
    pub action_digest: Vec<u8>,
    /// The prost-encoded `ApplyResponse` returned the first time, kept byte for byte:
    /// a replay answers exactly that. It is the one wire message the node keeps; the
    /// wire contract only ever grows fields, so every later node decodes it.
    #[serde(with = "hex_bytes")]
    pub response: Vec<u8>,
    /// When the record was written (Unix ms), for retention.
    pub recorded_at_unix_ms: u64,
}

impl RequestRecord {
    /// The version written.
    pub const VERSION: u32 = 1;

    /// A record of this version.
    pub fn new(action_digest: Vec<u8>, response: Vec<u8>, recorded_at_unix_ms: u64) -> Self {
        Self {
            version: Self::VERSION,
            action_digest,
            response,
            recorded_at_unix_ms,
        }
    }
}

/// A node a volume's copy lives on, as the controller named it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Node name.
    pub name: String,
    /// gRPC address ("127.0.0.1:7101"); empty when only the name is known.
    pub address: String,
    /// Its ed25519 public key, lower-case hex; empty when the controller gave none.
    pub public_key_hex: String,
}

/// Which copy of a volume this node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeRole {
    /// The copy that serves reads and writes and ships writes to the replicas.
    Primary,
    /// A copy kept in step by the primary on another node.
    Replica,
}

/// A volume this node holds a copy of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// [`VolumeRecord::VERSION`] when written by this build.
    pub version: u32,
    /// Volume name.
    pub name: String,
    /// Primary or replica.
    pub role: VolumeRole,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Columns.
    pub stripe_width: u32,
    /// Stripe unit in bytes.
    pub stripe_unit_bytes: u64,
    /// Replica peers (primary only).
    pub replica_peers: Vec<Peer>,
    /// Primary node name (replica only).
    pub primary: String,
    /// The primary's public key, hex, from the controller's signed CreateVolume the
    /// primary forwarded (replica only; empty when a controller created the replica
    /// directly: then the primary is recognised by name through the peer set).
    pub primary_key_hex: String,
    /// Every replica of the volume (this node included) with the key the controller
    /// gave for it (replica only): with the primary, the volume's in-sync set.
    pub copies: Vec<Peer>,
}

impl VolumeRecord {
    /// The version written.
    pub const VERSION: u32 = 1;
}

/// A VM's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmImage {
    /// An image built into the VMM ("cairn-guest").
    Builtin(String),
    /// A Linux kernel (absolute paths on the node).
    Kernel {
        /// The kernel.
        kernel_path: String,
        /// The initrd; empty for none.
        initrd_path: String,
        /// The kernel command line.
        cmdline: String,
    },
}

/// A VM's NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNic {
    /// Tenant network name.
    pub network: String,
    /// MTU; 0 for 1500.
    pub mtu: u32,
    /// IPv4 address the built-in guest answers on; empty for none.
    pub ipv4: String,
}

/// A VM's definition, as `CreateVm` gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    /// VM name.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// What it boots; `None` when the request left it out.
    pub image: Option<VmImage>,
    /// Volumes attached as disks, in order.
    pub volumes: Vec<String>,
    /// Its tenant.
    pub tenant: String,
    /// NICs, in order.
    pub nics: Vec<VmNic>,
    /// SLA class ("reserved", "on-demand", "spot"; empty: on-demand). Absent in
    /// records written before SLA classes reached the node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sla: String,
    /// SLA priority.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: u32,
    /// Whether the VM gets CPUs of its own (a cpuset of dedicated CPUs). Absent in
    /// records written before pinning reached the node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dedicated_cpus: bool,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// A VM this node keeps: its definition and what it should be doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// [`VmRecord::VERSION`] when written by this build.
    pub version: u32,
    /// The definition as created.
    pub definition: Option<VmDefinition>,
    /// Whether the VM should be running (it was started and not stopped).
    pub desired_running: bool,
    /// Process id of the last cairn-vmm process, for the next agent to adopt it.
    pub last_pid: u32,
    /// That process's start time (clock ticks since boot, `/proc/PID/stat` field 22),
    /// checked before adoption; 0 when unknown (written by an older agent).
    #[serde(default)]
    pub last_start_ticks: u64,
    /// The incarnation id that process was given at spawn, asked back over its control
    /// socket before adoption.
    #[serde(default)]
    pub incarnation: String,
}

impl VmRecord {
    /// The version written.
    pub const VERSION: u32 = 1;
}

/// A QoS class of a bond.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficClass {
    /// storage | migration | guest | management | replication
    pub name: String,
    /// Guaranteed rate, bits per second.
    pub min_bps: u64,
    /// Ceiling, bits per second; 0 for none.
    pub max_bps: u64,
    /// Weight.
    pub weight: u32,
}

/// A bond this node was asked to keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BondRecord {
    /// [`BondRecord::VERSION`] when written by this build.
    pub version: u32,
    /// Bond name.
    pub name: String,
    /// active-backup | balance-rr | balance-xor | 802.3ad
    pub mode: String,
    /// Member NICs.
    pub members: Vec<String>,
    /// MTU; 0 leaves the default.
    pub mtu: u32,
    /// Traffic classes.
    pub traffic: Vec<TrafficClass>,
    /// Capacity for the HTB root, bits per second; 0 reads the members' speed.
    pub capacity_bps: u64,
    /// Link-monitoring interval, ms; 0 leaves the default.
    pub miimon_ms: u32,
}

impl BondRecord {
    /// The version written.
    pub const VERSION: u32 = 1;
}

/// A node of the peer set a controller pushed (`SetPeers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// [`PeerRecord::VERSION`] when written by this build.
    pub version: u32,
    /// The peer.
    #[serde(flatten)]
    pub peer: Peer,
}

impl PeerRecord {
    /// The version written.
    pub const VERSION: u32 = 1;
}

/// The highest epoch of a volume this copy was told of (`SetVolumeEpoch`, signed by
/// the controller, the epoch authority): the copy refuses requests of older epochs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEpochRecord {
    /// [`VolumeEpochRecord::VERSION`] when written by this build.
    pub version: u32,
    /// The epoch (at least 1).
    pub epoch: u64,
    /// Node name of the volume's only writer at this epoch.
    pub writer: String,
    /// Node names of the copies in sync at this epoch, the writer included.
    pub in_sync: Vec<String>,
    /// Nodes that may do client I/O on the volume at this epoch without a copy (since
    /// version 2; a version-1 record has none).
    #[serde(default)]
    pub clients: Vec<String>,
    /// The writer of the last epoch whose in-sync set held this copy (since version 2;
    /// empty: unknown). A copy that left the set under another writer than the current
    /// one may hold writes the current writer never had (`volumes/promotion.rs`).
    #[serde(default)]
    pub last_in_sync_writer: String,
}

impl VolumeEpochRecord {
    /// The version written: 2 added `clients` and `last_in_sync_writer`.
    pub const VERSION: u32 = 2;
}

/// A volume this node holds no copy of but reaches remotely (it runs a VM using it):
/// the highest epoch the controller installed here with this node among its clients
/// (or, once moved away, without it: then this node is fenced).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientVolumeRecord {
    /// [`ClientVolumeRecord::VERSION`] when written by this build.
    pub version: u32,
    /// The epoch (at least 1).
    pub epoch: u64,
    /// The node that writes the volume at this epoch (client writes go to it).
    pub writer: String,
    /// The copies in sync at this epoch (client reads go to the nearest).
    pub in_sync: Vec<String>,
    /// The nodes that may do client I/O at this epoch.
    pub clients: Vec<String>,
}

impl ClientVolumeRecord {
    /// The version written.
    pub const VERSION: u32 = 1;
}

impl Record for ClientVolumeRecord {
    const TABLE: Table = Table::ClientVolumes;
    const VERSION: u32 = ClientVolumeRecord::VERSION;
    fn decode_unversioned(_bytes: &[u8]) -> Result<Self, String> {
        Err("client volumes were never stored unversioned".into())
    }
}

impl Record for VolumeEpochRecord {
    const TABLE: Table = Table::VolumeEpochs;
    const VERSION: u32 = VolumeEpochRecord::VERSION;
    fn decode_unversioned(_bytes: &[u8]) -> Result<Self, String> {
        Err("volume epochs were never stored unversioned".into())
    }
}

/// A snapshot of a volume as this copy keeps it, beside the volume store's own (which
/// has no time): when the writer took it and, on the writer, which copies do not hold it
/// yet. Key `VOLUME/SNAPSHOT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// [`SnapshotRecord::VERSION`] when written by this build.
    pub version: u32,
    /// When the writer took it (Unix ms), the same on every copy.
    pub created_at_unix_ms: u64,
    /// Writer only: copies that do not hold the snapshot yet, each with the regions
    /// `(offset, length)` where it differed from the writer when the snapshot was taken
    /// (its dirty regions then; none for a copy that was in sync).
    #[serde(default)]
    pub pending: std::collections::BTreeMap<String, Vec<(u64, u64)>>,
    /// Writer only: the snapshot was deleted here and these copies still hold it.
    #[serde(default)]
    pub deleting: Vec<String>,
}

impl SnapshotRecord {
    /// The version written.
    pub const VERSION: u32 = 1;
}

/// A VM's snapshot schedule this node holds (`Apply.SetProtection`, issue 18): the
/// node takes the group snapshots itself, controller or not. Key: the VM's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectionRecord {
    /// [`ProtectionRecord::VERSION`] when written by this build.
    pub version: u32,
    /// The protection plan it comes from.
    pub plan: String,
    /// The VM's volumes (all its disks).
    pub volumes: Vec<String>,
    /// Interval (ms).
    pub every_ms: u64,
    /// Scheduled snapshots kept per volume.
    pub keep: u32,
    /// When the schedule was set (Unix ms): the first snapshot is due one interval later.
    pub since_unix_ms: u64,
}

impl ProtectionRecord {
    /// The version written.
    pub const VERSION: u32 = 1;
}

impl Record for ProtectionRecord {
    const TABLE: Table = Table::Protections;
    const VERSION: u32 = ProtectionRecord::VERSION;
    fn decode_unversioned(_bytes: &[u8]) -> Result<Self, String> {
        Err("protection schedules were never stored unversioned".into())
    }
}

/// Delta replication of one volume to another site (issue 18), either side. Key: the
/// volume's name here. An additive table: an older node never reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationRecord {
    /// [`ReplicationRecord::VERSION`] when written by this build.
    pub version: u32,
    /// This node writes the volume and ships its snapshots (`Apply.ReplicateVolume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<ReplicationSend>,
    /// This node holds the target volume and accepts deltas (`Apply.AcceptReplication`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive: Option<ReplicationReceive>,
}

/// The sending side's schedule and pins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationSend {
    /// The target node.
    pub target: Peer,
    /// Its volume.
    pub target_volume: String,
    /// Interval (ms); 0: shipped only on request.
    pub every_ms: u64,
    /// Snapshots the target keeps.
    pub keep: u32,
    /// The last snapshot the target committed: the base of the next delta, kept from
    /// local retention.
    pub last_shipped: String,
    /// The snapshot being shipped (kept from retention until it is committed, so an
    /// interrupted transfer resumes with the same delta).
    pub shipping: String,
}

/// The receiving side's source and progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationReceive {
    /// The only node that may ship into the volume, by name and key.
    pub source: Peer,
    /// Snapshots received and committed, oldest first.
    pub snapshots: Vec<String>,
    /// The transfer in progress: its snapshot (empty: none).
    pub receiving: String,
    /// Its base (empty: a full copy).
    pub receiving_base: String,
    /// Every piece below this offset is durable here.
    pub next_offset: u64,
}

impl ReplicationRecord {
    /// The version written.
    pub const VERSION: u32 = 1;
}

impl Record for ReplicationRecord {
    const TABLE: Table = Table::Replications;
    const VERSION: u32 = ReplicationRecord::VERSION;
    fn decode_unversioned(_bytes: &[u8]) -> Result<Self, String> {
        Err("replication records were never stored unversioned".into())
    }
}

impl Record for SnapshotRecord {
    const TABLE: Table = Table::VolumeSnapshots;
    const VERSION: u32 = SnapshotRecord::VERSION;
    fn decode_unversioned(_bytes: &[u8]) -> Result<Self, String> {
        Err("volume snapshots were never stored unversioned".into())
    }
}

impl Record for RequestRecord {
    const TABLE: Table = Table::Requests;
    const VERSION: u32 = RequestRecord::VERSION;
    fn decode_unversioned(bytes: &[u8]) -> Result<Self, String> {
        super::legacy::request(bytes)
    }
}

impl Record for VolumeRecord {
    const TABLE: Table = Table::Volumes;
    const VERSION: u32 = VolumeRecord::VERSION;
    fn decode_unversioned(bytes: &[u8]) -> Result<Self, String> {
        super::legacy::volume(bytes)
    }
}

impl Record for VmRecord {
    const TABLE: Table = Table::Vms;
    const VERSION: u32 = VmRecord::VERSION;
    fn decode_unversioned(bytes: &[u8]) -> Result<Self, String> {
        super::legacy::vm(bytes)
    }
}

impl Record for BondRecord {
    const TABLE: Table = Table::Bonds;
    const VERSION: u32 = BondRecord::VERSION;
    fn decode_unversioned(bytes: &[u8]) -> Result<Self, String> {
        super::legacy::bond(bytes)
    }
}

impl Record for PeerRecord {
    const TABLE: Table = Table::Peers;
    const VERSION: u32 = PeerRecord::VERSION;
    fn decode_unversioned(bytes: &[u8]) -> Result<Self, String> {
        super::legacy::peer(bytes)
    }
}

/// Bytes as lower-case hex strings in JSON.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&proto::auth::to_hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        (0..text.len())
            .step_by(2)
            .map(|at| {
                text.get(at..at + 2)
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                    .ok_or_else(|| serde::de::Error::custom("not hex"))
            })
            .collect()
    }
}
