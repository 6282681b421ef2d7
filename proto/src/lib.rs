//! The wire contract between the cairn reconciler and `cairn-node`.
//!
//! What this crate does:
//! - compiles `schemas/proto/cairn/node/v1/*.proto` at build time with protox (no
//!   system `protoc`) into prost messages and tonic clients/servers ([`v1`]);
//! - exposes the encoded file descriptor set ([`FILE_DESCRIPTOR_SET`]) for gRPC
//!   reflection;
//! - signs and verifies requests ([`auth`]): every call to a node carries an ed25519
//!   signature (format `cairn-req-v2`) over the method, the target node's name and
//!   public key, a timestamp, a nonce and the SHA-256 of the encoded request body;
//! - writes out the conversions of wire enums to status words once ([`convert`]);
//! - names the contract's version and its rules ([`protocol`]: `MAJOR.MINOR`, sent as
//!   `x-cairn-protocol` on every signed call, reported in the inventory);
//! - offers [`client::NodeClient`], a connected client that signs every call, for the
//!   reconciler and for node-to-node replication.
//!
//! What it does not do: no node logic, no storage, no policy about *which* keys are
//! trusted (callers hand a [`auth::TrustedKeys`] to the verifier).
//!
//! Invariants: the `.proto` files are the single source of the contract; this crate
//! adds no message types of its own on the wire. A request's signature covers the
//! exact bytes prost encodes for the message, so map fields are generated as
//! `BTreeMap` (deterministic order).

#![warn(missing_docs)]

pub mod anchor;
pub mod auth;
pub mod client;
pub mod convert;
pub mod enroll;
pub mod fence;
pub mod protocol;
pub mod received;
pub mod witness;

/// Generated types of package `cairn.node.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("cairn.node.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file of the contract, for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cairn_node_v1_descriptor.bin"));

/// Full gRPC method paths, as signed by [`auth::RequestSigner`] and checked by
/// [`auth::Verifier`].
pub mod methods {
    /// `Inventory.GetInventory`
    pub const GET_INVENTORY: &str = "/cairn.node.v1.Inventory/GetInventory";
    /// `Observe.Observe`
    pub const OBSERVE: &str = "/cairn.node.v1.Observe/Observe";
    /// `Apply.Apply`
    pub const APPLY: &str = "/cairn.node.v1.Apply/Apply";
    /// `Apply.ApplyBatch` (protocol 1.8)
    pub const APPLY_BATCH: &str = "/cairn.node.v1.Apply/ApplyBatch";
    /// `Apply.ReadVolume`
    pub const READ_VOLUME: &str = "/cairn.node.v1.Apply/ReadVolume";
    /// `Apply.GetOutcome`
    pub const GET_OUTCOME: &str = "/cairn.node.v1.Apply/GetOutcome";
    /// `Apply.GuestDiskIo`
    pub const GUEST_DISK_IO: &str = "/cairn.node.v1.Apply/GuestDiskIo";
    /// `Apply.ReadConsole`
    pub const READ_CONSOLE: &str = "/cairn.node.v1.Apply/ReadConsole";
    /// `Apply.WriteConsole`
    pub const WRITE_CONSOLE: &str = "/cairn.node.v1.Apply/WriteConsole";
    /// `Watch.Watch`
    pub const WATCH: &str = "/cairn.node.v1.Watch/Watch";
    /// `Replication.EnsureReplica`
    pub const ENSURE_REPLICA: &str = "/cairn.node.v1.Replication/EnsureReplica";
    /// `Replication.ReplicaWrite`
    pub const REPLICA_WRITE: &str = "/cairn.node.v1.Replication/ReplicaWrite";
    /// `Replication.ReplicaRead`
    pub const REPLICA_READ: &str = "/cairn.node.v1.Replication/ReplicaRead";
    /// `Replication.ReplicaRecent`
    pub const REPLICA_RECENT: &str = "/cairn.node.v1.Replication/ReplicaRecent";
    /// `Replication.DeleteReplica`
    pub const DELETE_REPLICA: &str = "/cairn.node.v1.Replication/DeleteReplica";
    /// `Replication.ResizeReplica`
    pub const RESIZE_REPLICA: &str = "/cairn.node.v1.Replication/ResizeReplica";
    /// `Replication.ClientOpen`
    pub const CLIENT_OPEN: &str = "/cairn.node.v1.Replication/ClientOpen";
    /// `Replication.ClientRead`
    pub const CLIENT_READ: &str = "/cairn.node.v1.Replication/ClientRead";
    /// `Replication.ClientWrite`
    pub const CLIENT_WRITE: &str = "/cairn.node.v1.Replication/ClientWrite";
    /// `Replication.ReplicaSnapshot`
    pub const REPLICA_SNAPSHOT: &str = "/cairn.node.v1.Replication/ReplicaSnapshot";
    /// `Replication.CloneReplica`
    pub const CLONE_REPLICA: &str = "/cairn.node.v1.Replication/CloneReplica";
    /// `Replication.DeltaStatus` (delta replication to another site, issue 18)
    pub const DELTA_STATUS: &str = "/cairn.node.v1.Replication/DeltaStatus";
    /// `Replication.DeltaWrite`
    pub const DELTA_WRITE: &str = "/cairn.node.v1.Replication/DeltaWrite";
    /// `Replication.DeltaCommit`
    pub const DELTA_COMMIT: &str = "/cairn.node.v1.Replication/DeltaCommit";
    /// `Lease.Renew` (served by the controller)
    pub const RENEW_LEASE: &str = "/cairn.node.v1.Lease/Renew";
    /// `Quorum.Probe` (served by every node, called by its site's peers)
    pub const QUORUM_PROBE: &str = "/cairn.node.v1.Quorum/Probe";
    /// `Witness.Claim` (served by `cairn witness`)
    pub const WITNESS_CLAIM: &str = "/cairn.node.v1.Witness/Claim";
    /// `Witness.Query` (served by `cairn witness`)
    pub const WITNESS_QUERY: &str = "/cairn.node.v1.Witness/Query";
    /// `Enrollment.Enroll` (served by the controller; the token is the authority)
    pub const ENROLL: &str = "/cairn.node.v1.Enrollment/Enroll";
    /// `ControllerTrust.SetControllerKeys` (served by every node; controller keys)
    pub const SET_CONTROLLER_KEYS: &str = "/cairn.node.v1.ControllerTrust/SetControllerKeys";
}

/// Most requests an `ApplyBatch` carries.
pub const APPLY_BATCH_MAX: usize = 64;

/// Whether the node forwards the controller's signed request of `action` to other
/// nodes as its authority (`Envelope::to_grant`): such an action is sent alone, in an
/// `Apply`, since a batch's signature covers the batch, not the one request.
pub fn forwards_grant(action: &v1::apply_request::Action) -> bool {
    use v1::apply_request::Action;
    matches!(
        action,
        Action::CreateVolume(_)
            | Action::DeleteVolume(_)
            | Action::ResizeVolume(_)
            | Action::AddVolumeCopy(_)
            | Action::RemoveVolumeCopy(_)
            | Action::SnapshotVolume(_)
            | Action::DeleteSnapshot(_)
            | Action::CloneVolume(_)
    )
}

/// The name of the `ApplyRequest.action` oneof variant, as used in events and the
/// request-id table ("create_volume", ...).
pub fn action_name(action: &v1::apply_request::Action) -> &'static str {
    use v1::apply_request::Action;
    match action {
        Action::RebootVm(_) => "reboot_vm",
        Action::ApplyNetworkSegment(_) => "apply_network_segment",
        Action::DeleteNetworkSegment(_) => "delete_network_segment",
        Action::CreateVolume(_) => "create_volume",
        Action::DeleteVolume(_) => "delete_volume",
        Action::WriteVolume(_) => "write_volume",
        Action::ExportVolume(_) => "export_volume",
        Action::UnexportVolume(_) => "unexport_volume",
        Action::ResizeVolume(_) => "resize_volume",
        Action::SetVolumeEpoch(_) => "set_volume_epoch",
        Action::SnapshotVolume(_) => "snapshot_volume",
        Action::DeleteSnapshot(_) => "delete_snapshot",
        Action::CloneVolume(_) => "clone_volume",
        Action::AddVolumeCopy(_) => "add_volume_copy",
        Action::RemoveVolumeCopy(_) => "remove_volume_copy",
        Action::ImportImage(_) => "import_image",
        Action::SetProtection(_) => "set_protection",
        Action::ReplicateVolume(_) => "replicate_volume",
        Action::AcceptReplication(_) => "accept_replication",
        Action::CreateVm(_) => "create_vm",
        Action::StartVm(_) => "start_vm",
        Action::StopVm(_) => "stop_vm",
        Action::DeleteVm(_) => "delete_vm",
        Action::ApplyBond(_) => "apply_bond",
        Action::DeleteBond(_) => "delete_bond",
        Action::SetPeers(_) => "set_peers",
        Action::PrepareIncomingVm(_) => "prepare_incoming_vm",
        Action::MigrateVm(_) => "migrate_vm",
        Action::CommitMigration(_) => "commit_migration",
        Action::AbortMigration(_) => "abort_migration",
        Action::PrepareFtSecondary(_) => "prepare_ft_secondary",
        Action::StartFt(_) => "start_ft",
        Action::PromoteFt(_) => "promote_ft",
        Action::StopFt(_) => "stop_ft",
    }
}
