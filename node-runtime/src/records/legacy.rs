//! The records as the node wrote them before they had versions (`node.redb` format 1):
//! prost messages, some of them wire types. Kept to read a data directory the previous
//! version left (`Records::open` converts every such record once), and to write one in
//! tests. Never used to write outside tests.
//!
//! The messages below are the previous version's definitions, tag for tag; do not change
//! them.

use proto::v1;

use super::convert;
use super::types::{PeerRecord, RequestRecord, VmRecord, VolumeRecord, VolumeRole};

/// The previous `store::RequestRecord`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LegacyRequestRecord {
    /// SHA-256 of the prost-encoded `ApplyRequest`.
    #[prost(bytes = "vec", tag = "1")]
    pub action_digest: Vec<u8>,
    /// The prost-encoded `ApplyResponse`.
    #[prost(bytes = "vec", tag = "2")]
    pub response: Vec<u8>,
    /// Unix ms.
    #[prost(uint64, tag = "3")]
    pub recorded_at_unix_ms: u64,
}

/// The previous `volumes::VolumeRecord`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LegacyVolumeRecord {
    /// Volume name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// `v1::VolumeRole` as i32.
    #[prost(int32, tag = "2")]
    pub role: i32,
    /// Size in bytes.
    #[prost(uint64, tag = "3")]
    pub size_bytes: u64,
    /// Columns.
    #[prost(uint32, tag = "4")]
    pub stripe_width: u32,
    /// Stripe unit.
    #[prost(uint64, tag = "5")]
    pub stripe_unit_bytes: u64,
    /// Replica peers (primary only).
    #[prost(message, repeated, tag = "6")]
    pub replica_peers: Vec<v1::Peer>,
    /// Primary node name (replica only).
    #[prost(string, tag = "7")]
    pub primary: String,
    /// The primary's key (replica only).
    #[prost(string, tag = "8")]
    pub primary_key_hex: String,
    /// Every replica (replica only).
    #[prost(message, repeated, tag = "9")]
    pub copies: Vec<v1::Peer>,
}

/// The previous `vms::VmRecord`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LegacyVmRecord {
    /// The definition as created (the wire message).
    #[prost(message, optional, tag = "1")]
    pub definition: Option<v1::CreateVm>,
    /// Whether the VM should be running.
    #[prost(bool, tag = "2")]
    pub desired_running: bool,
    /// Process id of the last cairn-vmm process.
    #[prost(uint32, tag = "3")]
    pub last_pid: u32,
}

fn decode<M: prost::Message + Default>(bytes: &[u8]) -> Result<M, String> {
    M::decode(bytes).map_err(|error| format!("not a record of the previous format: {error}"))
}

/// A request record of format 1.
pub fn request(bytes: &[u8]) -> Result<RequestRecord, String> {
    let old: LegacyRequestRecord = decode(bytes)?;
    Ok(RequestRecord::new(
        old.action_digest,
        old.response,
        old.recorded_at_unix_ms,
    ))
}

/// A volume record of format 1.
pub fn volume(bytes: &[u8]) -> Result<VolumeRecord, String> {
    let old: LegacyVolumeRecord = decode(bytes)?;
    let role = match v1::VolumeRole::try_from(old.role) {
        Ok(v1::VolumeRole::Primary) => VolumeRole::Primary,
        Ok(v1::VolumeRole::Replica) => VolumeRole::Replica,
        _ => {
            return Err(format!(
                "volume role {} is neither primary nor replica",
                old.role
            ));
        }
    };
    Ok(VolumeRecord {
        version: VolumeRecord::VERSION,
        name: old.name,
        role,
        size_bytes: old.size_bytes,
        stripe_width: old.stripe_width,
        stripe_unit_bytes: old.stripe_unit_bytes,
        replica_peers: old.replica_peers.iter().map(convert::peer).collect(),
        primary: old.primary,
        primary_key_hex: old.primary_key_hex,
        copies: old.copies.iter().map(convert::peer).collect(),
    })
}

/// A VM record of format 1.
pub fn vm(bytes: &[u8]) -> Result<VmRecord, String> {
    let old: LegacyVmRecord = decode(bytes)?;
    Ok(VmRecord {
        version: VmRecord::VERSION,
        definition: old.definition.as_ref().map(convert::vm_definition),
        desired_running: old.desired_running,
        last_pid: old.last_pid,
        last_start_ticks: 0,
        incarnation: String::new(),
    })
}

/// A bond record of format 1 (the wire `ApplyBond` itself).
pub fn bond(bytes: &[u8]) -> Result<super::types::BondRecord, String> {
    let old: v1::ApplyBond = decode(bytes)?;
    Ok(convert::bond_record(&old))
}

/// A peer record of format 1 (the wire `Peer` itself).
pub fn peer(bytes: &[u8]) -> Result<PeerRecord, String> {
    let old: v1::Peer = decode(bytes)?;
    Ok(convert::peer_record(&old))
}

/// Encodes `record` the way format 1 did, for tests that need a data directory the
/// previous version left.
pub mod encode {
    use super::*;

    /// A request record as format 1 wrote it.
    pub fn request(record: &RequestRecord) -> Vec<u8> {
        prost::Message::encode_to_vec(&LegacyRequestRecord {
            action_digest: record.action_digest.clone(),
            response: record.response.clone(),
            recorded_at_unix_ms: record.recorded_at_unix_ms,
        })
    }

    /// A volume record as format 1 wrote it.
    pub fn volume(record: &VolumeRecord) -> Vec<u8> {
        prost::Message::encode_to_vec(&LegacyVolumeRecord {
            name: record.name.clone(),
            role: convert::volume_role(record.role) as i32,
            size_bytes: record.size_bytes,
            stripe_width: record.stripe_width,
            stripe_unit_bytes: record.stripe_unit_bytes,
            replica_peers: record
                .replica_peers
                .iter()
                .map(convert::wire_peer)
                .collect(),
            primary: record.primary.clone(),
            primary_key_hex: record.primary_key_hex.clone(),
            copies: record.copies.iter().map(convert::wire_peer).collect(),
        })
    }

    /// A VM record as format 1 wrote it.
    pub fn vm(record: &VmRecord) -> Vec<u8> {
        prost::Message::encode_to_vec(&LegacyVmRecord {
            definition: record.definition.clone().map(convert::create_vm),
            desired_running: record.desired_running,
            last_pid: record.last_pid,
        })
    }

    /// A bond record as format 1 wrote it.
    pub fn bond(record: &super::super::types::BondRecord) -> Vec<u8> {
        prost::Message::encode_to_vec(&convert::apply_bond(record))
    }

    /// A peer record as format 1 wrote it.
    pub fn peer(record: &PeerRecord) -> Vec<u8> {
        prost::Message::encode_to_vec(&convert::wire_peer(&record.peer))
    }
}
