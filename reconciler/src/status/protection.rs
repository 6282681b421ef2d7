//! `cairn status`'s protection section (issue 18): per protected VM its snapshot
//! schedule as the writer of its disks holds it (the last snapshot, its age, missed
//! runs), and per disk replicated to another site the replication as the source's
//! writer and the DR copy's writer report it (the last replicated snapshot, the
//! recovery point's age, the transfer in flight, the last error).

use std::fmt::Write as _;

use serde::Serialize;

use crate::desired::Desired;
use crate::observe::{NodeObservation, Observed, ObservedReplication};

/// One protected VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ProtectionRow {
    /// VM.
    pub vm: String,
    /// Tenant.
    pub tenant: String,
    /// The plan its snapshot schedule comes from.
    pub plan: String,
    /// The node that should hold the schedule (the writer of its first disk).
    pub node: String,
    /// Snapshot interval (ms) and snapshots kept.
    pub every_ms: u64,
    /// Scheduled snapshots kept per disk.
    pub keep: u32,
    /// `ok`, `pending` (the node does not hold the schedule yet), `failing` (its last
    /// run failed), `unknown` (the node did not answer).
    pub state: String,
    /// The newest group snapshot (empty: none yet), when it was taken (Unix ms) and
    /// its age when the node answered.
    pub last_snapshot: String,
    /// When it was taken (Unix ms; 0: none).
    pub last_snapshot_at_unix_ms: u64,
    /// Runs missed since the node started.
    pub missed: u64,
    /// Why the last run failed (empty when it did not).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Its disks' replications to other sites.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replications: Vec<ReplicationRow>,
}

/// One disk's delta replication to its DR copy at another site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ReplicationRow {
    /// The source volume and the node that ships it (its writer).
    pub volume: String,
    /// The source's writer.
    pub node: String,
    /// The target site, the DR copy and the node holding its writer.
    pub site: String,
    /// The DR copy.
    pub target_volume: String,
    /// The DR copy's writer.
    pub target_node: String,
    /// Interval (ms) and the snapshots the DR copy keeps.
    pub every_ms: u64,
    /// Snapshots the DR copy keeps.
    pub keep: u32,
    /// `ok` (a snapshot was replicated and the last transfer did not fail),
    /// `transferring` (none replicated yet, one in flight), `pending` (not set up on
    /// both nodes yet, or nothing replicated yet), `failing` (the last transfer
    /// failed), `unknown` (a node did not answer).
    pub state: String,
    /// The newest snapshot the DR copy committed (empty: none), when the source took
    /// it (Unix ms), and its age when the node answered: the recovery point achieved.
    pub last_replicated: String,
    /// When the source took it (Unix ms; 0: unknown).
    pub last_replicated_at_unix_ms: u64,
    /// Its age (ms) when the node answered.
    pub rpo_ms: u64,
    /// The snapshot in transfer (empty: none) and the bytes of it the DR copy holds
    /// so far (its progress mark).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub in_transfer: String,
    /// Bytes of the transfer in flight written at the DR copy (its progress mark).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub transferred_bytes: u64,
    /// Why the last transfer failed (empty after a success).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

fn replication_of<'o>(
    observed: &'o Observed,
    node: &str,
    volume: &str,
) -> (bool, Option<&'o ObservedReplication>) {
    match observed.nodes.get(node) {
        Some(NodeObservation::Reachable { replications, .. }) => (true, replications.get(volume)),
        _ => (false, None),
    }
}

/// One row per protected VM (`desired.protections`), sorted by VM.
pub fn rows(desired: &Desired, observed: &Observed) -> Vec<ProtectionRow> {
    let mut out = vec![];
    for (vm, want) in &desired.protections {
        let node = want
            .volumes
            .first()
            .and_then(|first| {
                desired
                    .moved_writers
                    .get(first)
                    .or_else(|| desired.volumes.get(first).map(|v| &v.node))
            })
            .cloned()
            .unwrap_or_default();
        let (state, have) = match observed.nodes.get(&node) {
            Some(NodeObservation::Reachable { protections, .. }) => match protections.get(vm) {
                Some(h) if !h.last_error.is_empty() => ("failing", Some(h)),
                Some(h) => ("ok", Some(h)),
                None => ("pending", None),
            },
            _ => ("unknown", None),
        };
        let mut replications = vec![];
        for r in desired.replications.values().filter(|r| &r.vm == vm) {
            let source = desired
                .moved_writers
                .get(&r.volume)
                .or_else(|| desired.volumes.get(&r.volume).map(|v| &v.node))
                .cloned()
                .unwrap_or_default();
            let target = desired
                .volumes
                .get(&r.target_volume)
                .map(|v| v.node.clone())
                .unwrap_or_default();
            let (source_up, s) = replication_of(observed, &source, &r.volume);
            let (target_up, t) = replication_of(observed, &target, &r.target_volume);
            let s = s.filter(|s| s.role == "source");
            let t = t.filter(|t| t.role == "target");
            // The target knows best what it committed; the source what failed.
            let newest = t
                .filter(|t| !t.last_replicated.is_empty())
                .or(s.filter(|s| !s.last_replicated.is_empty()));
            let error = s.map(|s| s.last_error.clone()).unwrap_or_default();
            let in_transfer = t
                .map(|t| t.in_transfer.clone())
                .filter(|n| !n.is_empty())
                .or_else(|| s.map(|s| s.in_transfer.clone()))
                .unwrap_or_default();
            let state = if !source_up || !target_up {
                "unknown"
            } else if !error.is_empty() {
                "failing"
            } else if s.is_none() || t.is_none() {
                "pending"
            } else if newest.is_some() {
                "ok"
            } else if !in_transfer.is_empty() {
                "transferring"
            } else {
                "pending"
            };
            replications.push(ReplicationRow {
                volume: r.volume.clone(),
                node: source,
                site: r.site.clone(),
                target_volume: r.target_volume.clone(),
                target_node: target,
                every_ms: r.every_ms,
                keep: r.keep,
                state: state.to_owned(),
                last_replicated: newest
                    .map(|n| n.last_replicated.clone())
                    .unwrap_or_default(),
                last_replicated_at_unix_ms: newest.map_or(0, |n| n.last_replicated_at_unix_ms),
                rpo_ms: newest.map_or(0, |n| n.rpo_ms),
                transferred_bytes: if in_transfer.is_empty() {
                    0
                } else {
                    t.map_or(0, |t| t.transferred_to)
                },
                in_transfer,
                error,
            });
        }
        out.push(ProtectionRow {
            vm: vm.clone(),
            tenant: desired.tenants.get(vm).cloned().unwrap_or_default(),
            plan: want.plan.clone(),
            node,
            every_ms: want.every_ms,
            keep: want.keep,
            state: state.to_owned(),
            last_snapshot: have.map(|h| h.last_snapshot.clone()).unwrap_or_default(),
            last_snapshot_at_unix_ms: have.map_or(0, |h| h.last_snapshot_at_unix_ms),
            missed: have.map_or(0, |h| h.missed),
            error: have.map(|h| h.last_error.clone()).unwrap_or_default(),
            replications,
        });
    }
    out
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A short duration: `850ms`, `2.3s`, `4m10s`.
fn short(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => compiler::units::format_duration(ms / 1000 * 1000),
    }
}

/// `2.3s ago` of a Unix ms time, against `now` (ms).
fn age(at: u64, now: u64) -> String {
    if at == 0 {
        return "-".to_owned();
    }
    format!("{} ago", short(now.saturating_sub(at)))
}

/// The `protection:` section (nothing without protected VMs).
pub fn text(rows: &[ProtectionRow], now_ms: u64) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut table = vec![vec![
        "VM".to_owned(),
        "PLAN".into(),
        "WRITER".into(),
        "SNAPSHOTS".into(),
        "LAST SNAPSHOT".into(),
        "STATE".into(),
    ]];
    for r in rows {
        table.push(vec![
            r.vm.clone(),
            r.plan.clone(),
            r.node.clone(),
            format!(
                "every {}, {} kept",
                compiler::units::format_duration(r.every_ms),
                r.keep
            ),
            if r.last_snapshot.is_empty() {
                "-".into()
            } else {
                format!(
                    "{} ({})",
                    r.last_snapshot,
                    age(r.last_snapshot_at_unix_ms, now_ms)
                )
            },
            if r.missed > 0 {
                format!("{} ({} missed)", r.state, r.missed)
            } else {
                r.state.clone()
            },
        ]);
    }
    let mut out = format!("\nprotection:\n{}", super::table(&table));
    let mut table = vec![vec![
        "VOLUME".to_owned(),
        "FROM".into(),
        "DR COPY".into(),
        "EVERY".into(),
        "LAST REPLICATED".into(),
        "RPO".into(),
        "STATE".into(),
    ]];
    let mut errors = vec![];
    for r in rows.iter().flat_map(|r| &r.replications) {
        table.push(vec![
            r.volume.clone(),
            r.node.clone(),
            format!("{} on {} (site {})", r.target_volume, r.target_node, r.site),
            compiler::units::format_duration(r.every_ms),
            if r.last_replicated.is_empty() {
                "-".into()
            } else {
                r.last_replicated.clone()
            },
            if r.last_replicated.is_empty() {
                "-".into()
            } else {
                short(r.rpo_ms)
            },
            if r.in_transfer.is_empty() {
                r.state.clone()
            } else {
                format!(
                    "{} ({} in transfer, {} there)",
                    r.state,
                    r.in_transfer,
                    compiler::units::human_size(r.transferred_bytes)
                )
            },
        ]);
        if !r.error.is_empty() {
            errors.push(format!("  ! replication of {}: {}", r.volume, r.error));
        }
    }
    if table.len() > 1 {
        let _ = write!(out, "\nreplication:\n{}", super::table(&table));
    }
    for r in rows.iter().filter(|r| !r.error.is_empty()) {
        let _ = writeln!(out, "  ! snapshots of {}: {}", r.vm, r.error);
    }
    for e in errors {
        let _ = writeln!(out, "{e}");
    }
    out
}
