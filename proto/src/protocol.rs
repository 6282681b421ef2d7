//! The version of the contract: `cairn.node.v1` at [`MAJOR`].[`MINOR`].
//!
//! Every signed call carries it as metadata ([`HEADER`], `x-cairn-protocol: 1.2`), and
//! a node reports its own in `GetInventoryResponse.protocol_version`. The rules:
//!
//! - [`MINOR`] grows with every additive change (a field, a message, an rpc, an action).
//!   Both sides keep working across minors: prost ignores unknown fields. One caveat:
//!   a request body is signed as the caller encodes it and verified as the node
//!   decodes it, so a caller that sets a field the node does not know fails the
//!   signature check; nodes are upgraded before controllers, and the node says so when
//!   that is the likely cause ([`signature_hint`]).
//! - [`MAJOR`] changes only with a change the other side cannot understand. A node
//!   refuses a call of another major ([`check`]) naming both versions and who to
//!   upgrade. A call without the header comes from a caller before versions were sent:
//!   1.0, accepted.
//!
//! History: 1.0 is the contract before versions were reported; 1.1 added
//! `ProtocolVersion`, `GetInventoryResponse.protocol_version` and the header; 1.2 added
//! the VM-disk and HA contract of issues 15 and 16: remote data (`ClientOpen`,
//! `ClientRead`, `ClientWrite`, `SetVolumeEpoch.clients`), promotion
//! (`ReplicaRecent`), copies added and removed (`AddVolumeCopy`, `RemoveVolumeCopy`),
//! snapshots, clones and image imports, the lease's `unguarded_vms`, and the
//! `x-cairn-fence-token` header of an elected controller. 1.3 adds (with the other
//! 1.3 additions marked in the .proto files) issue 19's tenant networks:
//! `ApplyNetworkSegment`, `DeleteNetworkSegment` and `Networking.segments` /
//! `Networking.firewall_drift`. 1.4 adds (with the other 1.4 additions marked in the
//! .proto files) issue 17's live migration: `PrepareIncomingVm`, `MigrateVm`,
//! `CommitMigration`, `AbortMigration` and their `IncomingVmResult` /
//! `MigrationResult`. 1.5 adds issue 15's replica sessions:
//! `ReplicaWriteRequest.replica_boot` and `ReplicaWriteResponse.replica_boot` (a
//! writer sets the field only after a 1.5 replica gave it one, so it still writes to
//! 1.4 replicas), and issue 17's `Networking.migration_address` (where a VM with
//! NICs migrating to the node is received; a 1.4 node leaves it empty, so such VMs
//! move to it cold). 1.6 adds issue 22's fault-tolerant VMs: `PrepareFtSecondary`,
//! `StartFt`, `PromoteFt`, `StopFt`, their `FtResult`, and `VmStatus.ft` (`VmFt`), and
//! issue 15's writer sessions for remote data: `ClientWriteRequest.writer_boot` and
//! `ClientWriteResponse.writer_boot` (a client sets the field only after a 1.6 writer
//! gave it one, so it still writes through 1.5 writers); also issue 20's
//! `CreateVm.dedicated_cpus` with `VmStatus.dedicated_cpus` and
//! `NodeUsage.dedicated_cpus`/`dedicated_cpus_free`, the zswap figures of Observe, and
//! issue 19's `ApplyNetworkSegment.ipv6_gateway` (left empty for a network without
//! IPv6, so a 1.5 node sees the same segment).

use crate::v1;

/// The major version this build speaks.
pub const MAJOR: u32 = 1;
/// The minor version this build speaks.
pub const MINOR: u32 = 6;
/// Metadata key of the caller's protocol version, `MAJOR.MINOR`.
pub const HEADER: &str = "x-cairn-protocol";

/// The version this build speaks.
pub fn current() -> v1::ProtocolVersion {
    v1::ProtocolVersion {
        major: MAJOR,
        minor: MINOR,
    }
}

/// The header value of this build's version (`"1.6"`).
pub fn header_value() -> String {
    format!("{MAJOR}.{MINOR}")
}

/// Parses `MAJOR.MINOR`.
pub fn parse(text: &str) -> Option<v1::ProtocolVersion> {
    let (major, minor) = text.split_once('.')?;
    Some(v1::ProtocolVersion {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

/// What a node's inventory says it speaks (1.0 when it does not say).
pub fn of_inventory(inventory: &v1::GetInventoryResponse) -> v1::ProtocolVersion {
    inventory
        .protocol_version
        .unwrap_or(v1::ProtocolVersion { major: 1, minor: 0 })
}

/// `MAJOR.MINOR`, for messages.
pub fn display(version: &v1::ProtocolVersion) -> String {
    format!("{}.{}", version.major, version.minor)
}

/// Whether a caller's version (from [`HEADER`]; `None` when absent) may call this build,
/// which is `this_node` ("node lab-1"). `Err` is the refusal, for a
/// `FAILED_PRECONDITION` (another major) or an `INVALID_ARGUMENT` (not a version).
pub fn check(header: Option<&str>, this_node: &str) -> Result<(), ProtocolRefusal> {
    let Some(text) = header else {
        return Ok(());
    };
    let Some(theirs) = parse(text) else {
        return Err(ProtocolRefusal::Malformed(format!(
            "metadata `{HEADER}` is `{text}`, not MAJOR.MINOR"
        )));
    };
    if theirs.major == MAJOR {
        return Ok(());
    }
    let upgrade = if theirs.major > MAJOR {
        format!("upgrade {this_node} first (nodes are upgraded before controllers)")
    } else {
        "upgrade the caller".to_string()
    };
    Err(ProtocolRefusal::OtherMajor(format!(
        "the caller speaks cairn.node protocol {}, {this_node} speaks {} and serves only major {MAJOR}: {upgrade}",
        display(&theirs),
        display(&current()),
    )))
}

/// Why [`check`] refused a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolRefusal {
    /// The header is not `MAJOR.MINOR`.
    Malformed(String),
    /// The caller speaks another major version.
    OtherMajor(String),
}

impl From<ProtocolRefusal> for tonic::Status {
    fn from(refusal: ProtocolRefusal) -> Self {
        match refusal {
            ProtocolRefusal::Malformed(message) => tonic::Status::invalid_argument(message),
            ProtocolRefusal::OtherMajor(message) => tonic::Status::failed_precondition(message),
        }
    }
}

/// A hint for a refused signature: when the caller speaks a newer minor than this build,
/// the likely cause is a field this node does not know (it changes the signed body).
pub fn signature_hint(header: Option<&str>) -> Option<String> {
    let theirs = parse(header?)?;
    (theirs.major == MAJOR && theirs.minor > MINOR).then(|| {
        format!(
            "the caller speaks protocol {}, newer than this node's {}: a field this node does not know changes the signed body, so upgrade the node first",
            display(&theirs),
            display(&current())
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_majors_are_checked() {
        assert_eq!(header_value(), "1.6");
        assert_eq!(parse("1.6"), Some(current()));
        assert_eq!(parse("2.0").map(|v| v.major), Some(2));
        assert_eq!(parse("1"), None);
        assert_eq!(parse("one.two"), None);
        assert_eq!(check(None, "node lab-1"), Ok(()));
        assert_eq!(check(Some("1.0"), "node lab-1"), Ok(()));
        assert_eq!(check(Some("1.9"), "node lab-1"), Ok(()));
        let Err(ProtocolRefusal::OtherMajor(newer)) = check(Some("2.3"), "node lab-1") else {
            panic!("another major is refused");
        };
        assert_eq!(
            newer,
            "the caller speaks cairn.node protocol 2.3, node lab-1 speaks 1.6 and serves only major 1: upgrade node lab-1 first (nodes are upgraded before controllers)"
        );
        let Err(ProtocolRefusal::OtherMajor(older)) = check(Some("0.4"), "node lab-1") else {
            panic!("another major is refused");
        };
        assert!(older.ends_with("upgrade the caller"), "{older}");
        assert!(matches!(
            check(Some("v1"), "node lab-1"),
            Err(ProtocolRefusal::Malformed(_))
        ));
        assert!(signature_hint(Some("1.7")).is_some());
        assert_eq!(signature_hint(Some("1.6")), None);
        assert_eq!(signature_hint(None), None);
        let old_node = v1::GetInventoryResponse::default();
        assert_eq!(display(&of_inventory(&old_node)), "1.0");
    }
}
