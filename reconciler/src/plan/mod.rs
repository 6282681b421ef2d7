//! Plan: diff(desired, observed) → changes (what an operator reads) and steps
//! (the node actions that carry them out), ordered into waves.
//!
//! A change is one object (`vm web-1`, `volume web-1-root`) with a kind (create,
//! update, replace, delete, start, stop, move, preempt). A step is one idempotent
//! `Apply` call to one node with a request id `PLAN_ID.STEP`; steps depend on steps
//! (creates forward: volume → VM definition → start; deletes backward: stop → delete
//! VM → delete volume; a VM created on a node waits for the VMs deleted there).
//! The wave of a step is the length of its longest dependency chain.
//!
//! Layout: `types` (the plan's JSON contract), `actions` (node actions and
//! their one conversion to protobuf), `build` (the step builder: waves are the
//! longest dependency chain), `bonds`, `volumes`, `vms` (what each kind of object
//! needs), and this module (the order they are planned in, the summary, the id).

mod actions;
mod bonds;
mod build;
mod ft;
mod images;
mod protection;
mod segments;
mod types;
mod vms;
mod volumes;

use sha2::{Digest, Sha256};

pub use actions::{MigratingVolume, NodeAction, PeerRef};
pub use protection::{drill_definition, vm_definition_of};
pub(crate) use segments::segment_diff;
#[cfg(test)]
pub(crate) use segments::tests::{
    desired_with as quickstart_desired, observed_as as segments_converged,
};
pub use types::*;

use crate::desired::Desired;
use crate::observe::{NodeObservation, Observed};
use build::Builder;

/// Computes the plan: bonds first (they depend on nothing), then VM deletes
/// (they free room), volumes, and the VMs the specs want.
pub fn plan(desired: &Desired, observed: &Observed, revision: &str) -> Plan {
    plan_with(desired, observed, revision, &PlanOptions::default())
}

/// How a plan is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// Delete what no spec names any more (VMs, their volumes, bonds); off:
    /// they are kept and listed in [`Plan::unpruned`] (the controller's
    /// `reconcile { prune #false }`).
    pub prune: bool,
    /// Nodes the controller declared failed (their lease lapsed and their site no
    /// longer hears them): their diskless HA and FT VMs are placed elsewhere
    /// ([`crate::desired::place_without`]); nothing else moves.
    pub failed_nodes: std::collections::BTreeSet<String>,
    /// Crash moves: VM → the node it crashed on too often (the `reconcile` block's
    /// `crash-restart limit= window=`); it is placed on another node
    /// ([`crate::pipeline::move_off`]); nothing else moves.
    pub crash_moves: std::collections::BTreeMap<String, String>,
    /// Each volume's writer at its current epoch (runtime volume name → node), from
    /// the epoch authority: an HA VM with disks on a failed node moves to the node of
    /// its first disk's writer once every disk has a writer on a live node.
    pub disk_writers: std::collections::BTreeMap<String, String>,
    /// Nodes an operator put in maintenance (`cairn node maintenance NODE --on`):
    /// no VM is placed on them that was not there before (a new VM, an HA
    /// restart, a crash move goes elsewhere: [`crate::pipeline::keep_off`]); the
    /// VMs already there stay.
    pub maintenance: std::collections::BTreeSet<String>,
    /// Spot VMs a node stopped under memory pressure: VM → that node. Each is placed
    /// where there is room on another node, or left unplaced (stopped where it is)
    /// saying why ([`crate::pipeline::move_preempted`]); nothing else moves.
    pub preempted: std::collections::BTreeMap<String, String>,
    /// Move running VMs cold (stop, delete, create, start; `cairn plan --cold`)
    /// instead of live (one `migrate_vm` step).
    pub cold: bool,
    /// A drain's order (set by [`crate::pipeline::drain_order`]): VM → the VMs whose
    /// moves its move waits for (`max-moves`, `max-unavailable`).
    pub drain_after: std::collections::BTreeMap<String, Vec<String>>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            prune: true,
            failed_nodes: Default::default(),
            crash_moves: Default::default(),
            disk_writers: Default::default(),
            maintenance: Default::default(),
            preempted: Default::default(),
            cold: false,
            drain_after: Default::default(),
        }
    }
}

/// [`plan`] with options.
pub fn plan_with(
    desired: &Desired,
    observed: &Observed,
    revision: &str,
    options: &PlanOptions,
) -> Plan {
    let b = build(desired, observed, options);
    finish(b, revision, desired, observed, observed.digest())
}

/// The plan of a part of the cloud (`crate::session`): `view` and `seen` hold
/// the part's objects (those whose inputs changed since the last plan, and
/// those it said anything of) and every node; `desired` and `observed` are the
/// whole, for what the plan reports
/// of it (unplaced VMs, unreachable nodes, protected volumes, the placement) and
/// `observed_digest` is `observed.digest()`.
pub(crate) fn plan_view(
    view: &Desired,
    seen: &Observed,
    desired: &Desired,
    observed: &Observed,
    observed_digest: String,
    revision: &str,
    options: &PlanOptions,
) -> Plan {
    let b = build(view, seen, options);
    finish(b, revision, desired, observed, observed_digest)
}

/// Every kind of object planned, in order.
fn build<'a>(desired: &'a Desired, observed: &'a Observed, options: &PlanOptions) -> Builder<'a> {
    let mut b = Builder::new(desired, observed);
    b.prune = options.prune;
    b.cold = options.cold;
    b.drain_after = options.drain_after.clone();
    bonds::plan_bonds(&mut b);
    vms::plan_vm_deletes(&mut b);
    volumes::plan_volumes(&mut b);
    vms::plan_vms(&mut b);
    protection::plan_protections(&mut b);
    segments::plan_segments(&mut b);
    // After the segments: a secondary with NICs listens on its node's underlay.
    ft::plan_ft(&mut b);
    b
}

/// The summary, the order of changes, the plan id.
fn finish(
    b: Builder<'_>,
    revision: &str,
    desired: &Desired,
    observed: &Observed,
    observed_digest: String,
) -> Plan {
    let mut summary = Summary::default();
    for c in &b.changes {
        match c.kind {
            ChangeKind::Create => summary.add += 1,
            ChangeKind::Update | ChangeKind::Start | ChangeKind::Stop => summary.change += 1,
            ChangeKind::Replace => {
                summary.add += 1;
                summary.destroy += 1;
            }
            ChangeKind::Delete | ChangeKind::Preempt => summary.destroy += 1,
            ChangeKind::Move => summary.moves += 1,
        }
    }
    let mut changes = b.changes;
    // Site infrastructure (bonds) first, by site; then by tenant.
    changes.sort_by(|a, c| {
        (
            a.site.is_none(),
            a.site.as_deref().unwrap_or(""),
            a.tenant.as_str(),
            a.object.as_str(),
            a.name.as_str(),
            a.node.as_str(),
            a.kind,
        )
            .cmp(&(
                c.site.is_none(),
                c.site.as_deref().unwrap_or(""),
                c.tenant.as_str(),
                c.object.as_str(),
                c.name.as_str(),
                c.node.as_str(),
                c.kind,
            ))
    });
    let steps = b.steps;
    let waves = steps.iter().map(|s| s.wave + 1).max().unwrap_or(0);
    let mut hasher = Sha256::new();
    hasher.update(revision.as_bytes());
    hasher.update(observed_digest.as_bytes());
    // The steps' JSON goes straight into the hash: a plan from nothing at 100,000
    // VMs in tenant networks is gigabytes of it (each node's segments).
    serde_json::to_writer(HashWriter(&mut hasher), &steps).expect("steps serialize");
    // The plan id names the plan (for display and signing); request ids are
    // per execution (`state::request_id`), so the same plan carried out twice
    // sends new requests.
    let plan_id = proto::auth::to_hex(&hasher.finalize()[..8]);
    let unreachable = observed
        .nodes
        .iter()
        .filter_map(|(n, o)| match o {
            NodeObservation::Unreachable { error } => Some((n.clone(), error.clone())),
            NodeObservation::Reachable { .. } => None,
        })
        .collect();
    let unplaced = desired.unplaced.clone();
    let spot_unplaced = unplaced
        .keys()
        .filter(|vm| desired.spot_vms.contains(*vm))
        .cloned()
        .collect();
    Plan {
        format_version: PLAN_FORMAT_VERSION,
        plan_id,
        revision: revision.to_owned(),
        observed_digest,
        summary,
        changes,
        steps,
        waves,
        unreachable,
        left_alone: b.left_alone,
        unpruned: b.unpruned,
        unplaced,
        spot_unplaced,
        refused: b.refused,
        protected: desired
            .protected_volumes
            .iter()
            .filter(|v| desired.spec_volumes.contains_key(*v))
            .cloned()
            .collect(),
        placement: desired.placement.clone(),
    }
}

/// `io::Write` into a SHA-256, so that JSON is hashed without being kept.
pub(crate) struct HashWriter<'h>(pub(crate) &'h mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
