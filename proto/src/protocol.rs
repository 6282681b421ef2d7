//! The version of the contract: `cairn.node.v1` at [`MAJOR`].[`MINOR`].
//!
//! Every signed call carries it as metadata ([`HEADER`], `x-cairn-protocol: 1.2`), and
//! a node reports its own in `GetInventoryResponse.protocol_version`. The rules:
//!
//! - [`MINOR`] grows with every additive change (a field, a message, an rpc, an action).
//!   Both sides keep working across minors: prost ignores unknown fields. A request's
//!   signature is checked against the SHA-256 of the bytes received
//!   ([`crate::received`]), so a caller may set a field the receiver does not know (a
//!   1.7 node accepts a 1.8 controller's requests, and the reverse); builds before
//!   that verified against their own re-encoding, which drops unknown fields, so for
//!   them a newer caller's new field failed the signature check (nodes were upgraded
//!   before controllers, and the node says so when that is the likely cause,
//!   [`signature_hint`]). A field whose absence changes what the receiver does is
//!   still kept from an older receiver by its caller ([`requires`]).
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
//! IPv6, so a 1.5 node sees the same segment) and `SegmentRemote.also_vtep` (a
//! migrating VM's second destination, left empty otherwise). 1.7 adds issue 24's
//! control-plane lifecycle (`enroll.proto`): the controller's `Enrollment.Enroll` and
//! every node's `ControllerTrust.SetControllerKeys` (a 1.6 node answers UNIMPLEMENTED:
//! its keys are changed in its key file), and `ObserveResponse.protocol_version` (a
//! controller keeps a node's identity between observations while the node reports
//! its version there, and asks the inventory of one that does not every 30 s). 1.8
//! adds issue 24's `Apply.ApplyBatch`: up to [`crate::APPLY_BATCH_MAX`] actions to one
//! node in one signed call, each carried out and recorded as its own Apply (a 1.7
//! node answers UNIMPLEMENTED and its caller sends them one by one, [`APPLY_BATCH`]).

use crate::v1;

/// The major version this build speaks.
pub const MAJOR: u32 = 1;
/// The minor version this build speaks.
pub const MINOR: u32 = 8;
/// Metadata key of the caller's protocol version, `MAJOR.MINOR`.
pub const HEADER: &str = "x-cairn-protocol";

/// The environment variable with which a process speaks an older minor of [`MAJOR`]
/// (`CAIRN_PROTOCOL_EMULATE=1.6`), for version-skew tests with real processes (issue
/// 24 item 7): it advertises that version (inventory and [`HEADER`]), answers
/// UNIMPLEMENTED for what came later ([`speaks`]), and verifies signatures against
/// its re-encoding of a request, as builds of that minor do ([`crate::received`]).
/// Unset, malformed or not older than this build: ignored (a malformed value is
/// reported once on stderr).
pub const EMULATE: &str = "CAIRN_PROTOCOL_EMULATE";

/// The older minor this process emulates ([`EMULATE`]), if any.
pub fn emulated() -> Option<u32> {
    static EMULATED: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *EMULATED.get_or_init(|| {
        let text = std::env::var(EMULATE).ok()?;
        match parse(&text) {
            Some(v) if v.major == MAJOR && v.minor < MINOR => Some(v.minor),
            _ => {
                eprintln!(
                    "cairn: {EMULATE}={text} ignored: it must be {MAJOR}.N with N below this build's {MINOR}"
                );
                None
            }
        }
    })
}

/// The minor this process speaks: [`MINOR`], or the one it emulates.
pub fn minor() -> u32 {
    emulated().unwrap_or(MINOR)
}

/// Whether this process serves what minor `since` added (false only while it
/// emulates an older minor).
pub fn speaks(since: u32) -> bool {
    minor() >= since
}

/// The version this process speaks ([`MAJOR`].[`minor`]).
pub fn current() -> v1::ProtocolVersion {
    v1::ProtocolVersion {
        major: MAJOR,
        minor: minor(),
    }
}

/// The header value of this process's version (`"1.8"`).
pub fn header_value() -> String {
    format!("{MAJOR}.{}", minor())
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
    (theirs.major == MAJOR && theirs.minor > minor()).then(|| {
        format!(
            "the caller speaks protocol {}, newer than this node's {}: a field this node does not know changes the signed body, so upgrade the node first",
            display(&theirs),
            display(&current())
        )
    })
}

/// A request field a node acts on only from some minor on. An older node decodes the
/// request without it (prost drops unknown fields) and carries out the rest, so a
/// caller must not send such a request to it: [`requires`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    /// The first minor (of [`MAJOR`]) that acts on it.
    pub minor: u32,
    /// What it is, for messages (`dedicated CPUs (CreateVm.dedicated_cpus)`).
    pub what: &'static str,
    /// What an older node does instead.
    pub older: &'static str,
}

/// `CreateVm.dedicated_cpus` (a reserved sla-profile's `cpu-pinning=#true`): a 1.5
/// node ignores it and runs the VM on the CPUs every VM shares.
pub const DEDICATED_CPUS: Since = Since {
    minor: 6,
    what: "dedicated CPUs (CreateVm.dedicated_cpus)",
    older: "ignores the field and runs the VM on the CPUs its other VMs share",
};

impl Since {
    /// Whether a node that speaks `speaks` acts on it.
    pub fn spoken_by(&self, speaks: &v1::ProtocolVersion) -> bool {
        speaks.major > MAJOR || (speaks.major == MAJOR && speaks.minor >= self.minor)
    }
}

/// `Apply.ApplyBatch`: a 1.7 node answers UNIMPLEMENTED, and its caller sends each
/// action in an `Apply` of its own.
pub const APPLY_BATCH: Since = Since {
    minor: 8,
    what: "several actions in one call (Apply.ApplyBatch)",
    older: "answers UNIMPLEMENTED; each action is sent alone",
};

/// Whether `node`, which speaks `speaks`, acts on `feature` that `object` ("vm db")
/// needs; `Err` says what is wrong and what would be right, `fix` naming the spec's
/// way out ("remove cpu-pinning from its sla-profile").
pub fn requires(
    feature: Since,
    speaks: &v1::ProtocolVersion,
    node: &str,
    object: &str,
    fix: &str,
) -> Result<(), String> {
    if feature.spoken_by(speaks) {
        return Ok(());
    }
    Err(format!(
        "{object} needs {}, and node {node} speaks cairn.node protocol {}, which has them only from {MAJOR}.{} on: {node} {}. Upgrade cairn-node on {node} to {MAJOR}.{} or later, place {object} on a node that speaks it (a node affinity), or {fix}",
        feature.what,
        display(speaks),
        feature.minor,
        feature.older,
        feature.minor,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_majors_are_checked() {
        assert_eq!(header_value(), "1.8");
        assert_eq!(parse("1.8"), Some(current()));
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
            "the caller speaks cairn.node protocol 2.3, node lab-1 speaks 1.8 and serves only major 1: upgrade node lab-1 first (nodes are upgraded before controllers)"
        );
        let Err(ProtocolRefusal::OtherMajor(older)) = check(Some("0.4"), "node lab-1") else {
            panic!("another major is refused");
        };
        assert!(older.ends_with("upgrade the caller"), "{older}");
        assert!(matches!(
            check(Some("v1"), "node lab-1"),
            Err(ProtocolRefusal::Malformed(_))
        ));
        assert!(signature_hint(Some("1.9")).is_some());
        assert_eq!(signature_hint(Some("1.8")), None);
        assert_eq!(signature_hint(None), None);
        let old_node = v1::GetInventoryResponse::default();
        assert_eq!(display(&of_inventory(&old_node)), "1.0");
    }

    #[test]
    fn dedicated_cpus_are_refused_for_a_node_before_1_6_naming_vm_node_and_the_way_out() {
        let version = |major, minor| v1::ProtocolVersion { major, minor };
        let fix = "remove cpu-pinning from its sla-profile";
        for ok in [version(1, 6), version(1, 7), version(2, 0)] {
            assert_eq!(
                requires(DEDICATED_CPUS, &ok, "lab-1", "vm db", fix),
                Ok(()),
                "{ok:?}"
            );
        }
        assert_eq!(
            requires(DEDICATED_CPUS, &version(1, 5), "lab-1", "vm db", fix),
            Err("vm db needs dedicated CPUs (CreateVm.dedicated_cpus), and node lab-1 speaks cairn.node protocol 1.5, which has them only from 1.6 on: lab-1 ignores the field and runs the VM on the CPUs its other VMs share. Upgrade cairn-node on lab-1 to 1.6 or later, place vm db on a node that speaks it (a node affinity), or remove cpu-pinning from its sla-profile".to_owned())
        );
        // A node that reports no version is 1.0.
        let silent = of_inventory(&v1::GetInventoryResponse::default());
        assert!(
            requires(DEDICATED_CPUS, &silent, "lab-2", "vm db", fix)
                .is_err_and(|e| e.contains("speaks cairn.node protocol 1.0"))
        );
        const { assert!(DEDICATED_CPUS.minor <= MINOR, "this build acts on it") };
    }
}
