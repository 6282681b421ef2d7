//! `cairn status`: what runs where, health, and drift from the specs.

use std::fmt::Write as _;

use serde::Serialize;

use crate::desired::Desired;
use crate::drift::{self, VmDrift};
use crate::observe::{NodeObservation, Observed, ObservedVm};
use crate::state::{Applied, StepStatus};
use proto::v1::VolumeRole;

mod ft;
mod networks;
mod protection;
pub use ft::FtRow;
pub use networks::{NicRow, SegmentRow};
pub use protection::{ProtectionRow, ReplicationRow};

/// Version of the status JSON.
pub const STATUS_FORMAT_VERSION: u32 = 1;

/// A node's row.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct NodeRow {
    /// Name.
    pub name: String,
    /// Address.
    pub address: String,
    /// `ready`, `suspect`, `failed`, `fenced`, `maintenance` or `unreachable`
    /// (CLI.md). Without a controller: `ready` when it answered, else
    /// `unreachable`; the controller adds its leases (see controller/ARCHITECTURE.md).
    #[serde(default)]
    pub state: String,
    /// Whether it answered.
    pub reachable: bool,
    /// Why not.
    pub error: Option<String>,
    /// VMs it reports.
    pub vms: usize,
    /// Volumes (primaries and replicas) it reports.
    pub volumes: usize,
}

/// A VM's row.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct VmRow {
    /// Name.
    pub name: String,
    /// Tenant (empty for a VM no spec mentions).
    pub tenant: String,
    /// Where it runs (or should run, when it does not exist yet).
    pub node: String,
    /// Where the specs want it (empty: nowhere).
    pub desired_node: String,
    /// `running`, `stopped`, `crashed`, `pending` (not created yet or starting),
    /// `unknown` (its node did not answer).
    pub state: String,
    /// `healthy`, `degraded`, `failed`, `unknown`.
    pub health: String,
    /// Unrequested exits.
    pub crash_count: u32,
    /// `none`, `missing`, `not-in-spec`, `wrong-node`, `definition`, `not-running`,
    /// `not-stopped` (its spec says `power "off"`), `nics` (a NIC's tap or bridge is missing or down), `unknown`.
    pub drift: String,
    /// Its NICs as the node made them (tap on the tenant network's bridge).
    pub nics: Vec<crate::observe::ObservedNic>,
    /// How many times its node started its process (0: not reported).
    pub starts: u64,
    /// Its disks (its volumes) as its node serves them: attached or not, where the
    /// data is, copies in sync, the guest's I/O.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::observe::ObservedDisk>,
    /// The built-in guest's last block self-test (`pass`, …; empty when unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guest_block_test: String,
    /// What differs, one line each (`memory 64MiB → 128MiB`; empty when the
    /// drift word says it all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detail: Vec<String>,
    /// Its last live migration (issue 17): where from and to, how it ended, and its
    /// figures (downtime, total time, bytes sent, rounds, pre-copy or stop-and-copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_migration: Option<crate::migrate::MigrationRecord>,
}

/// A volume's row (primaries).
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct VolumeRow {
    /// Name.
    pub name: String,
    /// Primary node.
    pub node: String,
    /// Replica nodes it reports.
    pub replicas: Vec<String>,
    /// Health.
    pub health: String,
    /// `none`, `missing`, `not-in-spec`, `wrong-node`, `definition`, `unknown`.
    pub drift: String,
    /// Size (the node's; the spec's while it is missing).
    pub size_bytes: u64,
    /// How many times a volume of this name was created on its node (0: not reported).
    pub generation: u64,
    /// Copies being rebuilt or caught up, as the volume's writer reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<VolumeRebuild>,
}

/// A volume's copies outside its in-sync set and the writer's progress towards them
/// (issue 15 item 7: a lost copy rebuilt on another node, a returning copy caught up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct VolumeRebuild {
    /// The writer that ships the data.
    pub writer: String,
    /// The copies being rebuilt or caught up (outside the in-sync set).
    pub copies: Vec<String>,
    /// Of them, those that hold every write now: they join the in-sync set at the
    /// controller's next epoch.
    pub caught_up: Vec<String>,
    /// Bytes the writer still owes them (their dirty regions, merged).
    pub pending_bytes: u64,
    /// The writer's allocated bytes: what a new copy receives in all.
    pub allocated_bytes: u64,
    /// Bytes shipped to copies catching up since the writer's node started.
    pub shipped_bytes: u64,
    /// How much of the allocated bytes no copy is owed any more (0-100): a new copy's
    /// progress.
    pub percent_done: u32,
}

/// The writer's rebuild progress for `volume`, from its own observation.
fn volume_rebuild(observed: &Observed, volume: &str) -> Option<VolumeRebuild> {
    observed.nodes.iter().find_map(|(node, obs)| {
        let NodeObservation::Reachable { volumes, .. } = obs else {
            return None;
        };
        let v = volumes.get(volume)?;
        if v.epoch.as_ref().is_none_or(|e| e.writer != *node) {
            return None;
        }
        let r = v.resync.as_ref()?;
        let owed = r.pending_bytes.min(r.allocated_bytes);
        let percent_done = ((r.allocated_bytes - owed) * 100)
            .checked_div(r.allocated_bytes)
            .map_or(100, |p| p as u32);
        Some(VolumeRebuild {
            writer: node.clone(),
            copies: r.copies.clone(),
            caught_up: r.caught_up.clone(),
            pending_bytes: r.pending_bytes,
            allocated_bytes: r.allocated_bytes,
            shipped_bytes: r.shipped_bytes,
            percent_done,
        })
    })
}

/// A VM's disks as its node reports them, each with its volume writer's catch-up
/// progress while a copy is outside the in-sync set (that writer may be another node).
fn disks_with_rebuild(
    observed: &Observed,
    disks: &[crate::observe::ObservedDisk],
) -> Vec<crate::observe::ObservedDisk> {
    disks
        .iter()
        .map(|d| crate::observe::ObservedDisk {
            rebuild: volume_rebuild(observed, &d.volume),
            ..d.clone()
        })
        .collect()
}

/// `  ~ volume V: rebuilding on lab-3 from lab-1: 62% (8MiB left of 21MiB allocated; 13MiB shipped since lab-1 started)`.
fn rebuild_lines(status: &Status) -> String {
    let human = compiler::units::human_size;
    let mut out = String::new();
    for v in &status.volumes {
        let Some(r) = &v.rebuild else {
            continue;
        };
        let waiting: Vec<&String> = r
            .copies
            .iter()
            .filter(|c| !r.caught_up.contains(c))
            .collect();
        let copies = |list: &[&String]| {
            list.iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !waiting.is_empty() {
            let _ = writeln!(
                out,
                "  ~ volume {}: copy on {} catching up from {}: {}% ({} left of {} allocated; {} shipped since {} started)",
                v.name,
                copies(&waiting),
                r.writer,
                r.percent_done,
                human(r.pending_bytes),
                human(r.allocated_bytes),
                human(r.shipped_bytes),
                r.writer
            );
        }
        let done: Vec<&String> = r.caught_up.iter().collect();
        if !done.is_empty() {
            let _ = writeln!(
                out,
                "  ~ volume {}: copy on {} caught up; it joins the in-sync set at the controller's next epoch",
                v.name,
                copies(&done)
            );
        }
    }
    out
}

/// A bond's row: one per node and bond.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct BondRow {
    /// Bond name (the device).
    pub name: String,
    /// Node.
    pub node: String,
    /// `kernel-bond` or `bridge-fallback` (empty when not made).
    pub implementation: String,
    /// Mode.
    pub mode: String,
    /// Member NICs.
    pub members: Vec<String>,
    /// Members attached with a carrier.
    pub active_members: Vec<String>,
    /// Traffic classes as the node keeps them: `name min/max weight`.
    pub traffic: Vec<String>,
    /// `healthy`, `degraded`, `failed`, `unknown`.
    pub health: String,
    /// `none`, `missing`, `not-in-spec`, `definition`, `device` (the live device
    /// differs from its definition), `refused` (the node cannot make bonds),
    /// `unknown` (its node did not answer).
    pub drift: String,
    /// What differs, or why it is refused.
    pub detail: String,
}

/// The last apply, from the journal.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct LastApply {
    /// Plan id.
    pub plan_id: String,
    /// Execution id (request ids are `EXECUTION_ID.STEP`).
    pub execution_id: String,
    /// Whether it finished.
    pub finished: bool,
    /// How it ended when it did not run to its end (`superseded by …`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// Steps journaled succeeded.
    pub succeeded: usize,
    /// Steps failed.
    pub failed: usize,
    /// Steps skipped.
    pub skipped: usize,
    /// Steps still `started` (an interrupted apply).
    pub in_flight: usize,
    /// Steps in flight at an interruption that their node never carried out (not
    /// sent again: the next apply planned afresh).
    pub abandoned: usize,
    /// Steps the node answered with a recorded outcome (done before an interruption).
    pub replayed: usize,
    /// Steps sent by more than one apply run.
    pub resent: usize,
    /// Total steps of the plan.
    pub steps: usize,
}

/// `cairn status --format json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Status {
    /// [`STATUS_FORMAT_VERSION`].
    pub format_version: u32,
    /// The last applied revision.
    pub applied: Option<Applied>,
    /// Nodes.
    pub nodes: Vec<NodeRow>,
    /// VMs.
    pub vms: Vec<VmRow>,
    /// Volumes.
    pub volumes: Vec<VolumeRow>,
    /// Bonds, by node then name.
    pub bonds: Vec<BondRow>,
    /// Every VM NIC on a tenant network: address, VNI, security groups and the drift
    /// of its segment on its node (issue 19).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NicRow>,
    /// Every tenant network segment per node: VNI, VTEP, MTU, entries, drift.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<SegmentRow>,
    /// Every protected VM: its snapshot schedule and its disks' replications to
    /// other sites, as their nodes report them (issue 18).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protection: Vec<ProtectionRow>,
    /// Every FT VM's pair: primary, secondary, state, epoch, last acknowledged
    /// checkpoint, bytes per checkpoint, added output latency (issue 22).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ft: Vec<FtRow>,
    /// VMs with no node.
    pub unplaced: Vec<String>,
    /// Objects that drifted.
    pub drifted: usize,
    /// The last apply.
    pub last_apply: Option<LastApply>,
    /// The last five entries of the audit log (newest last), in brief: a list of
    /// more than 50 items at the top of an entry's detail (an `apply` entry's
    /// `steps`) is left out and its length named under `abbreviated`
    /// (`crate::audit::brief`); the audit log keeps the entry whole.
    pub audit: Vec<crate::state::AuditEntry>,
}

/// Summarises an execution's journal.
pub fn last_apply(
    record: &crate::state::ExecutionSummary,
    store: &dyn crate::state::StateStore,
) -> LastApply {
    let steps = record.plan.steps;
    let plan_id = record.plan.plan_id.clone();
    let journal = store.journal_of(&record.execution_id).unwrap_or_default();
    let count = |s: StepStatus| journal.iter().filter(|r| r.status == s).count();
    LastApply {
        plan_id,
        execution_id: record.execution_id.clone(),
        finished: record.finished,
        ended: record.ended.clone(),
        succeeded: count(StepStatus::Succeeded),
        failed: count(StepStatus::Failed),
        skipped: count(StepStatus::Skipped),
        in_flight: count(StepStatus::Started),
        abandoned: count(StepStatus::Abandoned),
        replayed: journal.iter().filter(|r| r.replayed).count(),
        resent: journal.iter().filter(|r| r.attempts > 1).count(),
        steps,
    }
}

/// Shows the nodes of `maintenance` (the spec's `maintenance=#true`) as
/// `maintenance`, whether they answer or not (the controller's own overlay does the
/// same, and keeps `failed` and `fenced`, which it alone knows).
pub fn mark_maintenance(status: &mut Status, maintenance: &std::collections::BTreeSet<String>) {
    for node in status.nodes.iter_mut() {
        if maintenance.contains(&node.name) {
            node.state = "maintenance".to_owned();
        }
    }
}

/// Gives each VM its last live migration from the store's records (oldest first).
pub fn mark_migrations(status: &mut Status, records: Vec<crate::migrate::MigrationRecord>) {
    let mut last = crate::migrate::last_of(records);
    for vm in status.vms.iter_mut() {
        vm.last_migration = last.remove(&vm.name);
    }
}

/// The VMs' last migrations, one line each ("" without any).
fn migrations_text(status: &Status) -> String {
    let mut out = String::new();
    for v in &status.vms {
        let Some(m) = &v.last_migration else {
            continue;
        };
        if out.is_empty() {
            out.push_str(
                "
last migrations:
",
            );
        }
        let _ = write!(out, "  {} {} -> {}: {}", v.name, m.from, m.to, m.phase);
        if let Some(f) = &m.figures {
            let _ = write!(
                out,
                ", {}, downtime {:.1} ms (paused {:.1} ms), total {:.0} ms, {} sent ({:.2}x memory), {} round{}",
                f.mode,
                f.downtime_ms,
                f.paused_ms,
                f.total_ms,
                compiler::units::human_size(f.bytes_sent),
                f.bytes_sent as f64 / f.memory_bytes.max(1) as f64,
                f.rounds,
                if f.rounds == 1 { "" } else { "s" }
            );
        }
        if !m.error.is_empty() {
            let _ = write!(out, " ({})", m.error);
        }
        out.push('\n');
    }
    out
}

/// Builds the status.
pub fn status(
    desired: &Desired,
    observed: &Observed,
    applied: Option<Applied>,
    last: Option<LastApply>,
    audit: Vec<crate::state::AuditEntry>,
) -> Status {
    let mut nodes = vec![];
    for (name, node) in desired.nodes.iter() {
        let row = match observed.nodes.get(name) {
            Some(NodeObservation::Reachable { vms, volumes, .. }) => NodeRow {
                name: name.clone(),
                address: node.address.clone(),
                state: "ready".to_owned(),
                reachable: true,
                error: None,
                vms: vms.len(),
                volumes: volumes.len(),
            },
            Some(NodeObservation::Unreachable { error }) => NodeRow {
                name: name.clone(),
                address: node.address.clone(),
                state: "unreachable".to_owned(),
                reachable: false,
                error: Some(error.clone()),
                vms: 0,
                volumes: 0,
            },
            None => continue,
        };
        nodes.push(row);
    }
    let observed_vms = observed.vms();
    let mut vms = vec![];
    let row =
        |name: &str, node: &str, desired_node: &str, o: Option<&ObservedVm>, drift: VmDrift| {
            VmRow {
                name: name.to_owned(),
                tenant: desired.tenants.get(name).cloned().unwrap_or_default(),
                node: node.to_owned(),
                desired_node: desired_node.to_owned(),
                state: o
                    .map_or_else(
                        || {
                            if drift == VmDrift::Unknown {
                                "unknown"
                            } else {
                                "pending"
                            }
                        },
                        |o| o.state.status_name(),
                    )
                    .to_owned(),
                health: o.map_or("unknown", |o| o.health.status_name()).to_owned(),
                crash_count: o.map_or(0, |o| o.crash_count),
                drift: drift.word().to_owned(),
                detail: drift.detail().to_vec(),
                nics: o.map(|o| o.nics.clone()).unwrap_or_default(),
                starts: o.map_or(0, |o| o.starts),
                disks: o
                    .map(|o| disks_with_rebuild(observed, &o.disks))
                    .unwrap_or_default(),
                guest_block_test: o.map(|o| o.guest_block_test.clone()).unwrap_or_default(),
                last_migration: None,
            }
        };
    for vm in desired.vms.values() {
        let copies = observed_vms.get(vm.name.as_str());
        let here = copies.and_then(|c| c.iter().find(|(n, _)| *n == vm.node));
        let any = copies.and_then(|c| c.first());
        vms.push(match (here, any) {
            (Some((node, o)), _) => row(
                &vm.name,
                node,
                &vm.node,
                Some(o),
                drift::vm(vm, o, observed.can_network(node)),
            ),
            (None, Some((node, o))) => row(&vm.name, node, &vm.node, Some(o), VmDrift::WrongNode),
            (None, None) if observed.reachable(&vm.node) => {
                row(&vm.name, &vm.node, &vm.node, None, VmDrift::Missing)
            }
            (None, None) => row(&vm.name, &vm.node, &vm.node, None, VmDrift::Unknown),
        });
    }
    for (name, copies) in &observed_vms {
        for (node, o) in copies {
            let wanted = desired.vms.get(*name);
            if wanted.is_some_and(|w| w.node == *node || !copies.iter().any(|(n, _)| *n == w.node))
            {
                continue;
            }
            // An FT VM's secondary: shown in the fault-tolerance section.
            if wanted
                .and_then(|w| w.ft.as_ref())
                .is_some_and(|f| f.secondary == *node)
            {
                continue;
            }
            // In the spec but without a node now: it is kept, not removed.
            let drift = if desired.tenants.contains_key(*name) {
                VmDrift::Unplaced
            } else {
                VmDrift::NotInSpec
            };
            vms.push(row(name, node, "", Some(o), drift));
        }
    }
    vms.sort_by(|a, b| (&a.name, &a.node).cmp(&(&b.name, &b.node)));
    let mut volumes = vec![];
    let mut seen = std::collections::BTreeSet::new();
    for (node, obs) in &observed.nodes {
        let NodeObservation::Reachable { volumes: vols, .. } = obs else {
            continue;
        };
        for v in vols.values().filter(|v| v.role != VolumeRole::Replica) {
            seen.insert(v.name.clone());
            let drift = match desired.volumes.get(&v.name) {
                // An image's base volume, kept while its image is in the spec.
                None if crate::images::base_image(&v.name)
                    .is_some_and(|i| desired.image_bases.contains(i)) =>
                {
                    "none"
                }
                None => "not-in-spec",
                Some(d) if d.node != *node => "wrong-node",
                Some(d) if d.size_bytes != v.size_bytes => "definition",
                Some(_) => "none",
            };
            volumes.push(VolumeRow {
                name: v.name.clone(),
                node: node.clone(),
                replicas: v.replica_peers.clone(),
                health: v.health.status_name().to_owned(),
                drift: drift.into(),
                size_bytes: v.size_bytes,
                generation: v.generation,
                rebuild: volume_rebuild(observed, &v.name),
            });
        }
    }
    for d in desired.volumes.values().filter(|d| !seen.contains(&d.name)) {
        volumes.push(VolumeRow {
            name: d.name.clone(),
            node: d.node.clone(),
            replicas: d.replicas.clone(),
            health: "unknown".into(),
            drift: if observed.reachable(&d.node) {
                "missing"
            } else {
                "unknown"
            }
            .into(),
            size_bytes: d.size_bytes,
            generation: 0,
            rebuild: None,
        });
    }
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    let bonds = bond_rows(desired, observed);
    let (networks, segments) = networks::rows(desired, observed);
    let drifted = vms.iter().filter(|v| v.drift != "none").count()
        + volumes.iter().filter(|v| v.drift != "none").count()
        + bonds.iter().filter(|b| b.drift != "none").count()
        // A segment the node cannot make (refused, no underlay) is reported, not
        // counted: the plan does not act on it either.
        + segments
            .iter()
            .filter(|s| !matches!(s.drift.as_str(), "none" | "refused" | "no-underlay"))
            .count();
    Status {
        format_version: STATUS_FORMAT_VERSION,
        applied,
        nodes,
        vms,
        volumes,
        bonds,
        networks,
        segments,
        protection: protection::rows(desired, observed),
        ft: ft::rows(desired, observed),
        unplaced: desired.unplaced.keys().cloned().collect(),
        drifted,
        last_apply: last,
        audit,
    }
}

fn bond_rows(desired: &Desired, observed: &Observed) -> Vec<BondRow> {
    use crate::observe::ObservedBond;
    let traffic = |b: &ObservedBond| -> Vec<String> {
        b.traffic.iter().map(crate::drift::traffic_text).collect()
    };
    let mut rows = vec![];
    for (node, wanted) in &desired.bonds {
        let (have, networking) = match observed.nodes.get(node) {
            Some(NodeObservation::Reachable {
                bonds, networking, ..
            }) => (Some(bonds), Some(networking)),
            _ => (None, None),
        };
        for want in wanted.values() {
            let o = have.and_then(|h| h.get(&want.name));
            let (drift, detail) = match (have, networking, o) {
                (None, ..) => ("unknown", "its node did not answer".to_owned()),
                (_, Some(n), None) if !n.unavailable.is_empty() => (
                    "refused",
                    format!("network actions are refused there: {}", n.unavailable),
                ),
                (_, _, None) => ("missing", String::new()),
                (_, _, Some(o)) => {
                    let diff = drift::bond_definition_diff(want, o);
                    if !diff.is_empty() {
                        ("definition", diff.join("; "))
                    } else if !o.exists || !o.drift.is_empty() {
                        let mut d = o.drift.clone();
                        if !o.exists {
                            d.insert(0, "the device does not exist".into());
                        }
                        ("device", d.join("; "))
                    } else {
                        ("none", o.detail.clone())
                    }
                }
            };
            rows.push(BondRow {
                name: want.name.clone(),
                node: node.clone(),
                implementation: o.map(|o| o.implementation.clone()).unwrap_or_default(),
                mode: want.mode.clone(),
                members: want.members.clone(),
                active_members: o.map(|o| o.active_members.clone()).unwrap_or_default(),
                traffic: o.map(traffic).unwrap_or_default(),
                health: o.map_or("unknown", |o| o.health.status_name()).to_owned(),
                drift: drift.into(),
                detail,
            });
        }
        for o in have
            .into_iter()
            .flat_map(|h| h.values())
            .filter(|o| !wanted.contains_key(&o.name))
        {
            rows.push(BondRow {
                name: o.name.clone(),
                node: node.clone(),
                implementation: o.implementation.clone(),
                mode: o.mode.clone(),
                members: o.members.clone(),
                active_members: o.active_members.clone(),
                traffic: traffic(o),
                health: o.health.status_name().to_owned(),
                drift: "not-in-spec".into(),
                detail: "its site no longer has this bond".into(),
            });
        }
    }
    rows.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
    rows
}

fn table(rows: &[Vec<String>]) -> String {
    let mut widths = vec![0; rows.first().map(Vec::len).unwrap_or(0)];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    out
}

/// The `disks:` section: each VM disk, attached or not, where its data is, its copies
/// and the guest's I/O on it (nothing when no VM reports a disk).
fn disks_text(status: &Status) -> String {
    let mut rows = vec![vec![
        "VM".into(),
        "VOLUME".into(),
        "ATTACHED".into(),
        "DATA".into(),
        "COPIES IN SYNC".into(),
        "VMM COUNT (reads/writes, bytes)".into(),
        "GUEST COUNT (requests, bytes)".into(),
        "DETAIL".into(),
    ]];
    for v in &status.vms {
        for d in &v.disks {
            rows.push(vec![
                v.name.clone(),
                d.volume.clone(),
                if d.attached {
                    format!("vd{}", (b'a' + (d.device % 26) as u8) as char)
                } else {
                    "no".into()
                },
                d.data.clone(),
                copies_text(d),
                format!(
                    "{}/{}, {}{}",
                    d.reads,
                    d.writes,
                    read_written(d.bytes_read, d.bytes_written),
                    errors_suffix(d.errors)
                ),
                format!(
                    "{}, {}{}",
                    d.guest.requests,
                    read_written(d.guest.bytes_read, d.guest.bytes_written),
                    errors_suffix(d.guest.errors)
                ),
                if d.detail.is_empty() {
                    "-".into()
                } else {
                    d.detail.clone()
                },
            ]);
        }
    }
    if rows.len() == 1 {
        return String::new();
    }
    format!("\ndisks:\n{}", table(&rows))
}

/// `2/2 in-sync`, `1/2 degraded`, `1/2 resyncing 62% (8MiB left)`: the copies in
/// sync, their state, and the writer's progress while one catches up.
fn copies_text(d: &crate::observe::ObservedDisk) -> String {
    let mut out = format!("{}/{}", d.copies_in_sync, d.copies);
    let catching_up = d
        .rebuild
        .as_ref()
        .filter(|r| r.copies.iter().any(|c| !r.caught_up.contains(c)));
    let state = match (d.copies_state.as_str(), catching_up) {
        ("", Some(_)) => "resyncing",
        (state, _) => state,
    };
    if !state.is_empty() {
        out.push(' ');
        out.push_str(state);
    }
    if let Some(r) = catching_up {
        let _ = write!(
            out,
            " {}% ({} left)",
            r.percent_done,
            compiler::units::human_size(r.pending_bytes)
        );
    } else if d.rebuild.is_some() {
        out.push_str(" (caught up, joins at the next epoch)");
    }
    out
}

/// `READ/WRITTEN` in human sizes.
fn read_written(read: u64, written: u64) -> String {
    format!(
        "{}/{}",
        compiler::units::human_size(read),
        compiler::units::human_size(written)
    )
}

/// `, N errors` when there were any.
fn errors_suffix(errors: u64) -> String {
    if errors > 0 {
        format!(", {errors} errors")
    } else {
        String::new()
    }
}

/// The status as text.
pub fn text(status: &Status) -> String {
    let mut out = String::new();
    match &status.applied {
        Some(a) => {
            let _ = writeln!(out, "applied: {} (plan {})", a.revision, a.plan_id);
        }
        None => out.push_str("applied: nothing yet (run `cairn apply`)\n"),
    }
    out.push_str("\nnodes:\n");
    let mut rows = vec![vec![
        "NODE".into(),
        "ADDRESS".into(),
        "STATUS".into(),
        "VMS".into(),
        "VOLUMES".into(),
    ]];
    for n in &status.nodes {
        rows.push(vec![
            n.name.clone(),
            n.address.clone(),
            match (&n.error, n.state.as_str()) {
                (Some(error), state) => format!(
                    "{}: {error}",
                    if state.is_empty() {
                        "unreachable"
                    } else {
                        state
                    }
                ),
                (None, "") => "ready".into(),
                (None, state) => state.to_owned(),
            },
            n.vms.to_string(),
            n.volumes.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    out.push_str("\nvms:\n");
    let mut rows = vec![vec![
        "VM".into(),
        "TENANT".into(),
        "NODE".into(),
        "STATE".into(),
        "HEALTH".into(),
        "CRASHES".into(),
        "DRIFT".into(),
    ]];
    for v in &status.vms {
        let node = if v.desired_node.is_empty() || v.desired_node == v.node {
            v.node.clone()
        } else {
            format!("{} (wanted on {})", v.node, v.desired_node)
        };
        rows.push(vec![
            v.name.clone(),
            v.tenant.clone(),
            node,
            v.state.clone(),
            v.health.clone(),
            v.crash_count.to_string(),
            v.drift.clone(),
        ]);
    }
    out.push_str(&table(&rows));
    out.push_str(&migrations_text(status));
    out.push_str(&disks_text(status));
    out.push_str("\nvolumes:\n");
    let mut rows = vec![vec![
        "VOLUME".into(),
        "NODE".into(),
        "REPLICAS".into(),
        "HEALTH".into(),
        "DRIFT".into(),
    ]];
    for v in &status.volumes {
        rows.push(vec![
            v.name.clone(),
            v.node.clone(),
            v.replicas.join(","),
            v.health.clone(),
            v.drift.clone(),
        ]);
    }
    out.push_str(&table(&rows));
    out.push_str(&rebuild_lines(status));
    if !status.bonds.is_empty() {
        out.push_str("\nbonds:\n");
        let mut rows = vec![vec![
            "BOND".into(),
            "NODE".into(),
            "IMPLEMENTATION".into(),
            "ACTIVE".into(),
            "CLASSES (min/max weight)".into(),
            "HEALTH".into(),
            "DRIFT".into(),
        ]];
        for b in &status.bonds {
            rows.push(vec![
                b.name.clone(),
                b.node.clone(),
                if b.implementation.is_empty() {
                    "-".into()
                } else {
                    b.implementation.clone()
                },
                format!(
                    "{} of {}",
                    if b.active_members.is_empty() {
                        "none".to_owned()
                    } else {
                        b.active_members.join(",")
                    },
                    b.members.join(",")
                ),
                b.traffic.join(", "),
                b.health.clone(),
                b.drift.clone(),
            ]);
        }
        out.push_str(&table(&rows));
        for b in status
            .bonds
            .iter()
            .filter(|b| b.drift != "none" && !b.detail.is_empty())
        {
            let _ = writeln!(out, "  ! bond {} on {}: {}", b.name, b.node, b.detail);
        }
    }
    out.push_str(&networks::text(&status.networks, &status.segments));
    out.push_str(&protection::text(
        &status.protection,
        crate::state::now_ms(),
    ));
    out.push_str(&ft::text(&status.ft));
    for u in &status.unplaced {
        let _ = writeln!(out, "! vm {u} has no node (see `cairn plan`)");
    }
    if let Some(l) = &status.last_apply {
        let _ = writeln!(
            out,
            "\nlast apply: plan {} (execution {}): {} of {} steps succeeded, {} failed, {} skipped{}",
            l.plan_id,
            l.execution_id,
            l.succeeded,
            l.steps,
            l.failed,
            l.skipped,
            match (&l.ended, l.finished) {
                (Some(how), _) => format!(" — {how}"),
                (None, true) => String::new(),
                (None, false) =>
                    " — interrupted; `cairn apply` settles it and plans again from what runs now"
                        .to_owned(),
            }
        );
    }
    let _ = writeln!(
        out,
        "\n{}",
        if status.drifted == 0 {
            "no drift: the cluster matches the specs".to_owned()
        } else {
            format!(
                "{} objects drifted: run `cairn plan` to see the fix",
                status.drifted
            )
        }
    );
    out
}

#[cfg(test)]
mod disk_tests {
    use super::*;
    use crate::observe::ObservedDisk;

    fn disk(volume: &str, attached: bool, data: &str, in_sync: u32, detail: &str) -> ObservedDisk {
        ObservedDisk {
            volume: volume.into(),
            attached,
            device: u32::from(!volume.ends_with("root")),
            data: data.into(),
            copies: 2,
            copies_in_sync: in_sync,
            detail: detail.into(),
            reads: 3,
            writes: 2,
            bytes_read: 12 << 10,
            bytes_written: 8 << 10,
            errors: 0,
            copies_state: if data == "local" {
                "in-sync".into()
            } else {
                String::new()
            },
            guest: crate::observe::GuestDiskCount {
                requests: 5,
                bytes_read: 12 << 10,
                bytes_written: 8 << 10,
                errors: u64::from(!attached),
            },
            rebuild: None,
        }
    }

    #[test]
    fn each_vm_disk_shows_its_volume_attachment_data_copies_and_guest_io() {
        let status = Status {
            vms: vec![VmRow {
                name: "db".into(),
                tenant: "acme".into(),
                node: "n1".into(),
                desired_node: "n1".into(),
                state: "running".into(),
                health: "healthy".into(),
                crash_count: 0,
                drift: "none".into(),
                nics: vec![],
                starts: 1,
                detail: vec![],
                disks: vec![
                    disk("db-root", true, "local", 2, ""),
                    disk(
                        "db-data",
                        false,
                        "remote",
                        0,
                        "the primary copy is on node n2",
                    ),
                ],
                guest_block_test: "pass".into(),
                last_migration: None,
            }],
            ..empty_status()
        };
        assert_eq!(
            disks_text(&status),
            "
disks:
  VM  VOLUME   ATTACHED  DATA    COPIES IN SYNC  VMM COUNT (reads/writes, bytes)  GUEST COUNT (requests, bytes)  DETAIL
  db  db-root  vda       local   2/2 in-sync     3/2, 12KiB/8KiB                  5, 12KiB/8KiB                  -
  db  db-data  no        remote  0/2             3/2, 12KiB/8KiB                  5, 12KiB/8KiB, 1 errors        the primary copy is on node n2
"
        );
        let json = serde_json::to_value(&status.vms[0]).unwrap();
        assert_eq!(json["disks"][0]["data"], "local");
        assert_eq!(json["disks"][0]["copies_state"], "in-sync");
        assert_eq!(json["disks"][0]["guest"]["requests"], 5);
        assert_eq!(json["guest_block_test"], "pass");
        let mut none = status.clone();
        none.vms[0].disks.clear();
        assert_eq!(disks_text(&none), "", "no section without disks");
    }

    #[test]
    fn a_disk_whose_copy_catches_up_shows_the_writers_progress() {
        let rebuild = VolumeRebuild {
            writer: "n1".into(),
            copies: vec!["n3".into()],
            caught_up: vec![],
            pending_bytes: 8 << 20,
            allocated_bytes: 32 << 20,
            shipped_bytes: 24 << 20,
            percent_done: 75,
        };
        let mut d = disk("db-data", true, "local", 1, "");
        d.copies_state = "resyncing".into();
        d.rebuild = Some(rebuild.clone());
        assert_eq!(copies_text(&d), "1/2 resyncing 75% (8MiB left)");
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["rebuild"]["percent_done"], 75);
        assert_eq!(json["rebuild"]["pending_bytes"], 8 << 20);
        // The VM runs where no copy is: its node does not say; the writer's report does.
        d.copies_state.clear();
        assert_eq!(copies_text(&d), "1/2 resyncing 75% (8MiB left)");
        d.rebuild = Some(VolumeRebuild {
            caught_up: vec!["n3".into()],
            ..rebuild
        });
        assert_eq!(copies_text(&d), "1/2 (caught up, joins at the next epoch)");
        d.rebuild = None;
        d.copies_state = "degraded".into();
        assert_eq!(copies_text(&d), "1/2 degraded");
    }

    #[test]
    fn each_vm_shows_its_last_migration_in_text_and_json() {
        let record = |vm: &str, phase: &str, rounds: u32| crate::migrate::MigrationRecord {
            vm: vm.into(),
            from: "n1".into(),
            to: "n2".into(),
            phase: phase.into(),
            request_id: "e.0".into(),
            at_unix_ms: 1,
            figures: (phase == "completed").then(|| crate::migrate::MigrationFigures {
                mode: "pre-copy".into(),
                downtime_ms: 12.3,
                paused_ms: 7.0,
                total_ms: 1474.0,
                bytes_sent: 70 << 20,
                memory_bytes: 64 << 20,
                rounds,
            }),
            error: String::new(),
            handover: vec![],
        };
        let row = |name: &str| VmRow {
            name: name.into(),
            tenant: "acme".into(),
            node: "n2".into(),
            desired_node: "n2".into(),
            state: "running".into(),
            health: "healthy".into(),
            crash_count: 0,
            drift: "none".into(),
            nics: vec![],
            starts: 1,
            detail: vec![],
            disks: vec![],
            guest_block_test: String::new(),
            last_migration: None,
        };
        let mut status = Status {
            vms: vec![row("web"), row("db")],
            ..empty_status()
        };
        assert_eq!(
            migrations_text(&status),
            "",
            "no section without migrations"
        );
        // The last record of each VM counts (an earlier one is replaced).
        mark_migrations(
            &mut status,
            vec![record("web", "committed", 0), record("web", "completed", 3)],
        );
        assert_eq!(
            migrations_text(&status),
            "
last migrations:
  web n1 -> n2: completed, pre-copy, downtime 12.3 ms (paused 7.0 ms), total 1474 ms, 70MiB sent (1.09x memory), 3 rounds
"
        );
        let json = serde_json::to_value(&status.vms[0]).unwrap();
        let m = &json["last_migration"];
        assert_eq!(
            (m["from"].as_str(), m["to"].as_str()),
            (Some("n1"), Some("n2"))
        );
        assert_eq!(m["figures"]["downtime_ms"], 12.3);
        assert_eq!(m["figures"]["bytes_sent"], 70u64 << 20);
        assert_eq!(m["figures"]["rounds"], 3);
        assert_eq!(m["figures"]["mode"], "pre-copy");
        let db = serde_json::to_value(&status.vms[1]).unwrap();
        assert!(db.get("last_migration").is_none(), "{db}");
    }

    fn empty_status() -> Status {
        Status {
            format_version: STATUS_FORMAT_VERSION,
            applied: None,
            nodes: vec![],
            vms: vec![],
            volumes: vec![],
            bonds: vec![],
            networks: vec![],
            segments: vec![],
            protection: vec![],
            ft: vec![],
            unplaced: vec![],
            drifted: 0,
            last_apply: None,
            audit: vec![],
        }
    }

    #[test]
    fn a_rebuild_shows_the_writers_progress_and_caught_up_copies() {
        use crate::observe::{
            NodeObservation, Observed, ObservedEpoch, ObservedResync, ObservedVolume,
        };
        let volume = |writer: &str, resync: Option<ObservedResync>| ObservedVolume {
            name: "db-data".into(),
            role: VolumeRole::Primary,
            size_bytes: 256 << 20,
            stripe_width: 2,
            stripe_unit_bytes: 64 << 10,
            replica_peers: vec![],
            primary: String::new(),
            health: proto::v1::Health::Healthy,
            generation: 1,
            epoch: Some(ObservedEpoch {
                epoch: 3,
                writer: writer.into(),
                in_sync: vec!["lab-1".into()],
                awaiting_removal: vec![],
                caught_up: vec![],
            }),
            snapshots: vec![],
            resync,
        };
        let node = |v: ObservedVolume| NodeObservation::Reachable {
            public_key_hex: String::new(),
            vms: Default::default(),
            volumes: [(v.name.clone(), v)].into_iter().collect(),
            bonds: Default::default(),
            networking: Default::default(),
            protections: Default::default(),
            replications: Default::default(),
        };
        let resync = ObservedResync {
            copies: vec!["lab-3".into()],
            caught_up: vec![],
            allocated_bytes: 21 << 20,
            pending_bytes: 8 << 20,
            shipped_bytes: 13 << 20,
        };
        let mut observed = Observed {
            nodes: [
                (
                    "lab-1".to_owned(),
                    node(volume("lab-1", Some(resync.clone()))),
                ),
                // A copy that is not the writer: its numbers are not used.
                (
                    "lab-3".to_owned(),
                    node(volume("lab-1", Some(ObservedResync::default()))),
                ),
            ]
            .into_iter()
            .collect(),
        };
        let r = volume_rebuild(&observed, "db-data").expect("a rebuild");
        assert_eq!((r.writer.as_str(), r.percent_done), ("lab-1", 61));
        // A recorded observation keeps the resync (for `cairn status --observed`);
        // the digest a plan file is bound to does not see it move.
        let recorded: Observed =
            serde_json::from_value(serde_json::to_value(&observed).unwrap()).unwrap();
        assert_eq!(volume_rebuild(&recorded, "db-data").as_ref(), Some(&r));
        let digest = observed.digest();
        if let NodeObservation::Reachable { volumes, .. } = observed.nodes.get_mut("lab-1").unwrap()
        {
            volumes.get_mut("db-data").unwrap().resync = None;
        }
        assert_eq!(observed.digest(), digest, "the resync is not in the digest");
        observed = recorded;
        let row = VolumeRow {
            name: "db-data".into(),
            node: "lab-1".into(),
            replicas: vec!["lab-3".into()],
            health: "healthy".into(),
            drift: "none".into(),
            size_bytes: 256 << 20,
            generation: 1,
            rebuild: Some(r),
        };
        let status = Status {
            volumes: vec![row.clone()],
            ..empty_status()
        };
        assert_eq!(
            rebuild_lines(&status),
            "  ~ volume db-data: copy on lab-3 catching up from lab-1: 61% (8MiB left of 21MiB allocated; 13MiB shipped since lab-1 started)\n"
        );
        let json = serde_json::to_value(&status.volumes[0]).unwrap();
        assert_eq!(json["rebuild"]["pending_bytes"], 8 << 20);
        assert_eq!(json["rebuild"]["copies"][0], "lab-3");
        // Caught up: nothing owed, waiting for the controller's epoch.
        if let Some(NodeObservation::Reachable { volumes, .. }) = observed.nodes.get_mut("lab-1") {
            volumes.get_mut("db-data").unwrap().resync = Some(ObservedResync {
                caught_up: vec!["lab-3".into()],
                pending_bytes: 0,
                ..resync
            });
        }
        let r = volume_rebuild(&observed, "db-data").expect("a rebuild");
        assert_eq!(r.percent_done, 100);
        let status = Status {
            volumes: vec![VolumeRow {
                rebuild: Some(r),
                ..row
            }],
            ..status
        };
        assert_eq!(
            rebuild_lines(&status),
            "  ~ volume db-data: copy on lab-3 caught up; it joins the in-sync set at the controller's next epoch\n"
        );
        // No epoch, or nothing outside the set: no rebuild.
        observed.nodes.remove("lab-1");
        assert_eq!(volume_rebuild(&observed, "db-data"), None);
    }
}
