//! Incremental desired state and plan (issue 24, item 6): a [`PlanSession`]
//! keeps the last desired state, the observation it was planned against (each
//! node's digest) and whether that plan had nothing to do, so that a push that
//! changes a few VMs rebuilds their entries and plans them, not the cloud.
//!
//! **The desired state** is patched when the caller says what changed since the
//! model and placement of the last call ([`Input::changed_vms`],
//! [`Input::places`]): the VMs the compile
//! session changed (their vCPUs or memory: `compiler::session::Session::changed_vms`)
//! and the sites the placement session placed again, with their parts before and
//! after (`compiler::session::PlaceSession::last_patches`). Each VM those name
//! has its entries (VM, volumes, snapshot schedule) built again by the function
//! [`crate::desired::desired`] builds them with; when a site's placement moved
//! anything, its VMs are built again and the tenant segments are made again
//! (a VM's node or address is in every segment of its tenant). Debug builds
//! compare the patched state with [`crate::desired::desired`] of the whole.
//!
//! **The plan** of a part is the plan of the whole when every object outside
//! the part has the inputs it had at the last plan and had nothing to do then.
//! Every planning pass works object by object (a VM, a volume, a node's bonds
//! or segments) and reads of other objects only the nodes' identity and
//! networking, which every view carries, and a VM of its node's segments
//! (their MTU, a move's VTEP), which come with it; so an object none of whose inputs
//! changed says what it said at the last plan. The part is therefore: the
//! objects the last plan said anything of (a change, an object left alone,
//! refused or unpruned: `Pending`); the VMs, volumes and nodes whose desired
//! entries changed; and every object of a node whose answer changed (each
//! node's [`node_digest`]: the objects it reported then and now, and those
//! the desired state puts there), closed over what they touch (a VM's volumes
//! and a volume's VM, every observed copy by name, the nodes' image bases).
//! It is planned against a view of the observation that holds only those and
//! every node's identity and networking (`crate::plan::plan_view`); the plan
//! id, the digest and the unreachable and unplaced lists come from the whole.
//! So a push after an applied one is planned in part too: the nodes the apply
//! changed are in the part. The differential test
//! `cli/tests/it/incremental_plan.rs` compares this with the full plan, JSON
//! for JSON, over generated commit histories applied to a simulated cluster.
//!
//! Anything else (no hint, other options, a node set that changed, DR copies,
//! replications or failovers, nodes in maintenance, a last plan with an object
//! of another kind, a part of more than a quarter of the VMs) plans the whole
//! and says why in [`PlanReuse::full`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use compiler::Model;
use compiler::place::Placement;
use compiler::session::PlaceSession;

use crate::desired::{self, Desired};
use crate::observe::{NodeObservation, Observed, node_digest};
use crate::plan::{Plan, PlanOptions};

/// What one plan was made from.
#[derive(Debug)]
pub struct Input<'a> {
    /// The model (maintenance already applied).
    pub model: &'a Model,
    /// Where its images' paths are relative to.
    pub spec_root: &'a Path,
    /// The placement to carry out.
    pub placement: &'a Placement,
    /// The VMs whose entries the compile changed since the last call's model
    /// (their vCPUs or memory; every other part of the model is as it was).
    /// `None`: anything may have changed.
    pub changed_vms: Option<&'a BTreeSet<String>>,
    /// The placement session that made `placement` (`None`: none did). Its
    /// [`PlaceSession::calls`] tells whether it is the call right after the
    /// one the last plan planned, and its [`PlaceSession::last_patches`]
    /// which sites it placed again.
    pub places: Option<&'a PlaceSession>,
    /// Each node's [`node_digest`] of `observed`, when the caller made them
    /// (`None`: the session makes them).
    pub digests: Option<BTreeMap<String, [u8; 32]>>,
    /// The volumes `prevent-destroy` protected in the specs last applied.
    pub protected_before: BTreeSet<String>,
    /// The placement before this one (a drain's order compares the two).
    pub previous: &'a Placement,
    /// What the nodes run.
    pub observed: Arc<Observed>,
    /// The revision planned.
    pub revision: &'a str,
    /// The plan's options.
    pub options: &'a PlanOptions,
}

/// What a [`PlanSession::plan`] redid.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlanReuse {
    /// Why the whole cloud was planned (`None`: a part).
    pub full: Option<String>,
    /// VMs whose desired entries were built again.
    pub vms_rebuilt: usize,
    /// VMs, volumes and nodes in the part planned (all, when the whole was).
    pub planned: (usize, usize, usize),
    /// Nodes whose answer was digested again (the others answered as before).
    pub nodes_digested: usize,
    /// Nodes whose answer changed since the last plan.
    pub nodes_changed: usize,
    /// Where the time went (µs): the nodes' digests, the desired state (its
    /// patch, with its copy when the caller held the last one, or its build for
    /// a whole plan), the part's closure, its views, and its plan.
    pub us: [u64; 5],
}

/// A plan session: the last desired state, observation and what the last
/// plan said.
#[derive(Debug)]
pub struct PlanSession {
    last: Option<Last>,
    /// The largest part planned, as a share of the VMs (beyond it the whole is
    /// planned: a part's view costs more per object than the whole's passes).
    part_limit: f64,
}

impl Default for PlanSession {
    fn default() -> Self {
        PlanSession {
            last: None,
            part_limit: 0.25,
        }
    }
}

#[derive(Debug)]
struct Last {
    desired: Arc<Desired>,
    spec_root: PathBuf,
    protected_before: BTreeSet<String>,
    options: PlanOptions,
    place_calls: Option<u64>,
    observed: Arc<Observed>,
    digests: BTreeMap<String, [u8; 32]>,
    /// The objects the plan said anything of (`None`: one of a kind a part
    /// does not follow).
    pending: Option<Pending>,
    /// Where `observed` holds each object (names only).
    index: Index,
    /// Where `desired` puts each VM and volume (names only).
    held: Held,
    /// Every node of `observed` as a part's view starts ([`shell_of`]), filled
    /// and emptied again by each part's plan.
    shell: Observed,
}

/// The objects a plan said anything of: by VM (its changes, its schedule's),
/// by volume, and by node (bonds and segments).
#[derive(Debug, Default, Clone)]
struct Pending {
    vms: BTreeSet<String>,
    volumes: BTreeSet<String>,
    nodes: BTreeSet<String>,
}

impl Pending {
    fn of(plan: &Plan) -> Option<Pending> {
        let mut p = Pending::default();
        let said = plan
            .changes
            .iter()
            .map(|c| (&c.object, &c.name, &c.node))
            .chain(
                plan.left_alone
                    .iter()
                    .map(|l| (&l.object, &l.name, &l.node)),
            )
            .chain(plan.refused.iter().map(|r| (&r.object, &r.name, &r.node)))
            .chain(plan.unpruned.iter().map(|l| (&l.object, &l.name, &l.node)));
        for (object, name, node) in said {
            match object.as_str() {
                "vm" | "protection" => p.vms.insert(name.clone()),
                "volume" => p.volumes.insert(name.clone()),
                "bond" | "segment" => p.nodes.insert(node.clone()),
                _ => return None,
            };
        }
        Some(p)
    }
}

/// What a desired state puts on each node, by name: a VM on its node and its
/// FT secondary's, a volume on its node and its replicas'. A changed node's
/// objects are found here, not by a scan of every VM and volume.
#[derive(Debug, Default, PartialEq)]
struct Held {
    vms: HashMap<String, BTreeSet<String>>,
    volumes: HashMap<String, BTreeSet<String>>,
}

impl Held {
    fn of(desired: &Desired) -> Held {
        let mut held = Held::default();
        for vm in desired.vms.values() {
            held.vm(vm, true);
        }
        for v in desired.volumes.values() {
            held.volume(v, true);
        }
        held
    }

    /// Adds `vm` (`add`) or takes it out.
    fn vm(&mut self, vm: &desired::DesiredVm, add: bool) {
        let nodes = std::iter::once(&vm.node).chain(vm.ft.as_ref().map(|f| &f.secondary));
        Held::mark(&mut self.vms, nodes, &vm.name, add);
    }

    /// Adds `v` (`add`) or takes it out.
    fn volume(&mut self, v: &desired::DesiredVolume, add: bool) {
        let nodes = std::iter::once(&v.node).chain(&v.replicas);
        Held::mark(&mut self.volumes, nodes, &v.name, add);
    }

    fn mark<'a>(
        by_node: &mut HashMap<String, BTreeSet<String>>,
        nodes: impl Iterator<Item = &'a String>,
        name: &str,
        add: bool,
    ) {
        for node in nodes {
            if add {
                by_node
                    .entry(node.clone())
                    .or_default()
                    .insert(name.to_owned());
            } else if let Some(names) = by_node.get_mut(node) {
                names.remove(name);
                if names.is_empty() {
                    by_node.remove(node);
                }
            }
        }
    }
}

/// Where an observation holds each VM, volume and schedule.
#[derive(Debug, Default)]
struct Index {
    vms: HashMap<String, BTreeSet<String>>,
    volumes: HashMap<String, BTreeSet<String>>,
    protections: HashMap<String, BTreeSet<String>>,
    /// Image base volumes (and any volume named like one).
    bases: BTreeSet<String>,
    /// Nodes that hold a delta replication.
    replications: BTreeSet<String>,
}

impl Index {
    fn of(observed: &Observed) -> Index {
        let mut index = Index::default();
        for (node, o) in &observed.nodes {
            index.add(node, o);
        }
        index
    }

    fn add(&mut self, node: &str, o: &NodeObservation) {
        let NodeObservation::Reachable {
            vms,
            volumes,
            protections,
            replications,
            ..
        } = o
        else {
            return;
        };
        for name in vms.keys() {
            self.vms
                .entry(name.clone())
                .or_default()
                .insert(node.to_owned());
        }
        for name in volumes.keys() {
            self.volumes
                .entry(name.clone())
                .or_default()
                .insert(node.to_owned());
            if crate::images::is_base(name) {
                self.bases.insert(name.clone());
            }
        }
        for name in protections.keys() {
            self.protections
                .entry(name.clone())
                .or_default()
                .insert(node.to_owned());
        }
        if !replications.is_empty() {
            self.replications.insert(node.to_owned());
        }
    }

    fn remove(&mut self, node: &str, o: &NodeObservation) {
        let NodeObservation::Reachable {
            vms,
            volumes,
            protections,
            ..
        } = o
        else {
            return;
        };
        let drop = |map: &mut HashMap<String, BTreeSet<String>>, name: &String| {
            if let Some(nodes) = map.get_mut(name) {
                nodes.remove(node);
                if nodes.is_empty() {
                    map.remove(name);
                }
            }
        };
        for name in vms.keys() {
            drop(&mut self.vms, name);
        }
        for name in volumes.keys() {
            drop(&mut self.volumes, name);
        }
        for name in protections.keys() {
            drop(&mut self.protections, name);
        }
        // A base seen once stays in the set: it is only ever planned with more.
        self.replications.remove(node);
    }
}

/// The objects a part of the plan covers: VMs and volumes by name, and the
/// nodes whose bonds and segments are planned.
#[derive(Debug, Default)]
struct Dirty {
    vms: BTreeSet<String>,
    volumes: BTreeSet<String>,
    nodes: BTreeSet<String>,
}

impl PlanSession {
    /// A session with nothing kept: its first plan is of the whole cloud.
    pub fn new() -> PlanSession {
        PlanSession::default()
    }

    /// Forgets the last plan (one was made without the session): the next
    /// plan is of the whole cloud.
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// A session that plans a part of up to `share` of the VMs (default a
    /// quarter); the differential test plans every part it can.
    pub fn with_part_limit(share: f64) -> PlanSession {
        PlanSession {
            part_limit: share,
            ..PlanSession::default()
        }
    }

    /// The desired state of `input` and its plan against `input.observed`:
    /// what [`crate::desired::desired`] and [`crate::plan::plan_with`] make of
    /// the whole (with the protected volumes, the moved writers and a drain's
    /// order as `crate::pipeline::plan_against_session` adds them), made from
    /// the last call's where that is the same (see the module's text).
    pub fn plan(&mut self, mut input: Input<'_>) -> (Arc<Desired>, Plan, PlanReuse) {
        let t = std::time::Instant::now();
        let (digests, nodes_digested) = match input.digests.take() {
            Some(digests) => (digests, 0),
            None => self.digests(&input.observed),
        };
        let digests_us = t.elapsed().as_micros() as u64;
        // The nodes whose answer changed since the last plan.
        let changed: BTreeSet<&str> = self.last.as_ref().map_or_else(BTreeSet::new, |l| {
            digests
                .iter()
                .filter(|(node, d)| l.digests.get(*node) != Some(*d))
                .map(|(node, _)| node.as_str())
                .collect()
        });
        let nodes_changed = changed.len();
        let mut reuse = match self.part(&input, &digests, &changed) {
            Ok((plan, reuse)) => {
                let last = self
                    .last
                    .as_mut()
                    .expect("a part is planned from a last plan");
                // The last observation is freed off this thread: at 100,000 VMs
                // that is tens of milliseconds of the plan's.
                let old = std::mem::replace(&mut last.observed, input.observed.clone());
                free_elsewhere(old);
                last.place_calls = input.places.map(PlaceSession::calls);
                last.pending = Pending::of(&plan);
                last.digests = digests;
                let mut us = reuse.us;
                us[0] = digests_us;
                return (
                    last.desired.clone(),
                    plan,
                    PlanReuse {
                        nodes_digested,
                        us,
                        ..reuse
                    },
                );
            }
            Err(why) => PlanReuse {
                full: Some(why),
                nodes_digested,
                nodes_changed,
                ..PlanReuse::default()
            },
        };
        let (desired, plan, desired_us) = whole(&input, &digests);
        reuse.us[1] = desired_us;
        reuse.vms_rebuilt = desired.vms.len();
        reuse.planned = (
            desired.vms.len(),
            desired.volumes.len(),
            desired.nodes.len(),
        );
        let desired = Arc::new(desired);
        // The index and the shell a part is planned with, made now: a whole plan
        // takes hundreds of milliseconds at 100,000 VMs, and the next push, which
        // may be planned in part, then does not pay for them (about 60 ms).
        let index = Index::of(&input.observed);
        let held = Held::of(&desired);
        let shell = Observed {
            nodes: input
                .observed
                .nodes
                .iter()
                .map(|(n, o)| (n.clone(), shell_of(o)))
                .collect(),
        };
        self.last = Some(Last {
            desired: desired.clone(),
            spec_root: input.spec_root.to_owned(),
            protected_before: input.protected_before,
            options: input.options.clone(),
            place_calls: input.places.map(PlaceSession::calls),
            observed: input.observed,
            digests,
            pending: Pending::of(&plan),
            index,
            held,
            shell,
        });
        (desired, plan, reuse)
    }

    /// Each node's digest of `observed` (a node whose answer equals the last
    /// one's keeps its digest), and how many were digested.
    fn digests(&self, observed: &Arc<Observed>) -> (BTreeMap<String, [u8; 32]>, usize) {
        let last = self.last.as_ref();
        if let Some(last) = last
            && Arc::ptr_eq(&last.observed, observed)
        {
            return (last.digests.clone(), 0);
        }
        let mut digested = 0;
        let digests = observed
            .nodes
            .iter()
            .map(|(name, o)| {
                let kept = last.and_then(|l| {
                    (l.observed.nodes.get(name) == Some(o))
                        .then(|| l.digests.get(name).copied())
                        .flatten()
                });
                let digest = kept.unwrap_or_else(|| {
                    digested += 1;
                    node_digest(o)
                });
                (name.clone(), digest)
            })
            .collect();
        (digests, digested)
    }

    /// The plan of the part that changed, or why the whole is planned. On
    /// success the session's desired state and index are the new ones.
    fn part(
        &mut self,
        input: &Input<'_>,
        digests: &BTreeMap<String, [u8; 32]>,
        changed: &BTreeSet<&str>,
    ) -> Result<(Plan, PlanReuse), String> {
        let Some(last) = self.last.as_mut() else {
            return Err("no plan before".to_owned());
        };
        let (Some(changed_vms), Some(places)) = (input.changed_vms, input.places) else {
            return Err("what changed since the last plan is not known".to_owned());
        };
        let Some(pending) = last.pending.clone() else {
            return Err("the last plan named objects a part does not follow".to_owned());
        };
        if last.options != *input.options || *input.options != plain(input.options) {
            return Err("the plan's options changed or move VMs".to_owned());
        }
        if last.spec_root != input.spec_root || last.protected_before != input.protected_before {
            return Err("the spec root or the protected volumes changed".to_owned());
        }
        if !last.digests.keys().eq(digests.keys()) {
            return Err("the nodes observed changed".to_owned());
        }
        if !input.model.nodes_in_maintenance().is_empty() {
            return Err("nodes are in maintenance".to_owned());
        }
        if !(last.desired.replications.is_empty()
            && last.desired.failed_over.is_empty()
            && input.placement.dr_volumes.is_empty()
            && input.placement.failovers.is_empty())
        {
            return Err("the cloud has DR copies or failovers".to_owned());
        }
        if last.place_calls.map(|c| c + 1) != Some(places.calls()) {
            return Err("the placement is not the one after the last plan's".to_owned());
        }
        let Some(patches) = places.last_patches() else {
            return Err("the placement was made anew".to_owned());
        };
        // The index follows the observation: the changed nodes' entries are
        // taken out as they were and put back as they are.
        let observed = &input.observed;
        let index = &mut last.index;
        for node in changed {
            if let Some(o) = last.observed.nodes.get(*node) {
                index.remove(node, o);
            }
            if let Some(o) = observed.nodes.get(*node) {
                index.add(node, o);
            }
        }
        if !index.replications.is_empty() {
            return Err("nodes hold replications".to_owned());
        }
        // The patch works on the session's desired state (a copy only when the
        // caller still holds the last one).
        let mut us = [0u64; 5];
        let t = std::time::Instant::now();
        let desired = Arc::make_mut(&mut last.desired);
        let (mut dirty, rebuilt) = patch(
            desired,
            &mut last.held,
            input,
            changed_vms,
            places,
            &patches,
        );
        debug_assert!(
            last.held == Held::of(desired),
            "the held index follows the patched desired state"
        );
        us[1] = t.elapsed().as_micros() as u64;
        let t = std::time::Instant::now();
        dirty.vms.extend(pending.vms);
        dirty.volumes.extend(pending.volumes);
        dirty.nodes.extend(pending.nodes);
        if !changed.is_empty() {
            // Everything of a node that answered differently: what it reported
            // then and now, and what the desired state puts there.
            for node in changed {
                dirty.nodes.insert((*node).to_owned());
                for o in [last.observed.nodes.get(*node), observed.nodes.get(*node)]
                    .into_iter()
                    .flatten()
                {
                    if let NodeObservation::Reachable {
                        vms,
                        volumes,
                        protections,
                        ..
                    } = o
                    {
                        dirty.vms.extend(vms.keys().cloned());
                        dirty.vms.extend(protections.keys().cloned());
                        dirty.volumes.extend(volumes.keys().cloned());
                    }
                }
            }
            for node in changed {
                if let Some(vms) = last.held.vms.get(*node) {
                    dirty.vms.extend(vms.iter().cloned());
                }
                if let Some(volumes) = last.held.volumes.get(*node) {
                    dirty.volumes.extend(volumes.iter().cloned());
                }
            }
        }
        // Closed over what they touch: a volume's VM, a VM's volumes; the image
        // bases every node keeps (a new disk is cloned from one).
        for volume in &dirty.volumes {
            if let Some(vm) = desired.spec_volumes.get(volume) {
                dirty.vms.insert(vm.clone());
            }
        }
        for name in &dirty.vms {
            if let Some(vm) = desired.vms.get(name) {
                dirty.volumes.extend(vm.volumes.iter().cloned());
            }
        }
        dirty.volumes.extend(index.bases.iter().cloned());
        // A VM's definition carries its node's segment MTU, and a move reads the
        // VTEP of the node it leaves: the segments (and bonds) of every node a
        // changed VM is on, is to be on, or has its secondary on are planned too.
        for name in &dirty.vms {
            if let Some(vm) = desired.vms.get(name) {
                dirty.nodes.insert(vm.node.clone());
                if let Some(ft) = &vm.ft {
                    dirty.nodes.insert(ft.secondary.clone());
                }
            }
            if let Some(nodes) = index.vms.get(name) {
                dirty.nodes.extend(nodes.iter().cloned());
            }
        }
        let limit = (desired.vms.len() as f64 * self.part_limit) as usize;
        if dirty.vms.len() > limit.max(64) {
            return Err(format!(
                "the part would have {} of {} VMs, more than {:.0}%",
                dirty.vms.len(),
                desired.vms.len(),
                self.part_limit * 100.0
            ));
        }
        us[2] = t.elapsed().as_micros() as u64;
        let t = std::time::Instant::now();
        let view = view(desired, &dirty);
        // The shell follows the observation: a changed node's is made again.
        let seen = &mut last.shell;
        for node in changed {
            if let Some(o) = observed.nodes.get(*node) {
                seen.nodes.insert((*node).to_owned(), shell_of(o));
            }
        }
        let filled = fill(seen, observed, index, &dirty);
        us[3] = t.elapsed().as_micros() as u64;
        let t = std::time::Instant::now();
        let digest = crate::observe::digest_of(digests.iter().map(|(n, d)| (n.as_str(), *d)));
        let plan = crate::plan::plan_view(
            &view,
            seen,
            desired,
            observed,
            digest,
            input.revision,
            input.options,
        );
        empty(seen, &filled);
        us[4] = t.elapsed().as_micros() as u64;
        Ok((
            plan,
            PlanReuse {
                full: None,
                vms_rebuilt: rebuilt,
                planned: (view.vms.len(), view.volumes.len(), dirty.nodes.len()),
                nodes_digested: 0,
                nodes_changed: changed.len(),
                us,
            },
        ))
    }
}

/// `options` without what moves VMs by itself (failed nodes, crash moves,
/// writers, maintenance, preemption, a drain).
fn plain(options: &PlanOptions) -> PlanOptions {
    PlanOptions {
        prune: options.prune,
        cold: options.cold,
        ..PlanOptions::default()
    }
}

/// The desired state and plan of the whole, as `plan_against_session` makes
/// them without a session, and how long the desired state took (µs).
fn whole(input: &Input<'_>, digests: &BTreeMap<String, [u8; 32]>) -> (Desired, Plan, u64) {
    let t = std::time::Instant::now();
    let (desired, options) = desired_of(input);
    let desired_us = t.elapsed().as_micros() as u64;
    let digest = crate::observe::digest_of(digests.iter().map(|(n, d)| (n.as_str(), *d)));
    let plan = crate::plan::plan_view(
        &desired,
        &input.observed,
        &desired,
        &input.observed,
        digest,
        input.revision,
        &options,
    );
    (desired, plan, desired_us)
}

/// The whole desired state of `input`, and its plan options.
fn desired_of(input: &Input<'_>) -> (Desired, PlanOptions) {
    crate::pipeline::desired_for(
        input.model,
        input.spec_root,
        input.placement.clone(),
        input.protected_before.iter().cloned(),
        input.previous,
        input.options,
    )
}

/// Brings `desired` to `input`'s model and placement; the objects whose
/// entries changed, and how many VMs were built again.
fn patch(
    desired: &mut Desired,
    held: &mut Held,
    input: &Input<'_>,
    changed_vms: &BTreeSet<String>,
    places: &PlaceSession,
    patches: &[(&str, &Placement, &Placement)],
) -> (Dirty, usize) {
    let model = input.model;
    let mut dirty = Dirty::default();
    // The placement: patched as the placement session patched its own.
    let placement = Arc::make_mut(&mut desired.placement);
    let patched = places.patch_copy(placement);
    debug_assert!(patched, "the placement session patched its last result");
    debug_assert!(
        *placement == *input.placement,
        "the placement patched as the session's is the session's"
    );
    let mut rebuild: BTreeSet<String> = changed_vms.clone();
    // What a re-placed site's placement moved: the VMs whose entries differ (a
    // node, a secondary, a volume's copies, being placed at all); the segments
    // follow every VM's node and address, the unplaced lists their entries.
    let (mut segments_moved, mut unplaced_moved) = (false, false);
    for (_, before, after) in patches {
        if before == after {
            continue;
        }
        let vms = differing(&before.vms, &after.vms, |v| v.name.as_str());
        segments_moved |= !vms.is_empty();
        rebuild.extend(vms.into_iter().map(|v| v.name.clone()));
        let volumes = differing(&before.volumes, &after.volumes, |v| v.name.as_str());
        rebuild.extend(volumes.into_iter().map(|v| v.vm.clone()));
        let unplaced = differing(&before.unplaced, &after.unplaced, |u| u.name.as_str());
        unplaced_moved |= !unplaced.is_empty();
        rebuild.extend(unplaced.into_iter().map(|u| u.name.clone()));
        segments_moved |= before.addresses != after.addresses || before.networks != after.networks;
    }
    let placement = &*desired.placement;
    let mut rebuilt = 0;
    let mut entries = vec![];
    for name in &rebuild {
        let name = name.as_str();
        let Ok(i) = model.vms.binary_search_by(|v| v.name.as_str().cmp(name)) else {
            continue;
        };
        let vm = &model.vms[i];
        let new = placement.vm(name).map(|p| {
            rebuilt += 1;
            desired::vm_entries(model, input.spec_root, placement, vm, &p.node, |disk| {
                let key = format!("{name}/{disk}");
                placement
                    .volumes
                    .binary_search_by(|v| v.name.as_str().cmp(&key))
                    .ok()
                    .map(|i| &placement.volumes[i])
            })
        });
        entries.push((name.to_owned(), new));
    }
    for (name, new) in entries {
        let old = desired.vms.get(&name).map(|vm| desired::VmEntries {
            vm: vm.clone(),
            volumes: vm
                .volumes
                .iter()
                .filter_map(|v| desired.volumes.get(v).cloned())
                .collect(),
            protection: desired.protections.get(&name).cloned(),
        });
        if old == new {
            continue;
        }
        for v in old.iter().chain(&new).flat_map(|e| &e.volumes) {
            dirty.volumes.insert(v.name.clone());
        }
        if let Some(old) = &old {
            for v in &old.vm.volumes {
                if let Some(v) = desired.volumes.remove(v) {
                    held.volume(&v, false);
                }
            }
            desired.protections.remove(&name);
            desired.vms.remove(&name);
            held.vm(&old.vm, false);
        }
        if let Some(new) = new {
            held.vm(&new.vm, true);
            for v in &new.volumes {
                held.volume(v, true);
            }
            new.insert_into(desired);
        }
        dirty.vms.insert(name);
    }
    if unplaced_moved {
        let (mut unplaced, mut preempted) = (BTreeMap::new(), BTreeMap::new());
        for u in &desired.placement.unplaced {
            unplaced.insert(u.name.clone(), u.reason_text());
            if u.preempted() {
                preempted.insert(u.name.clone(), u.reason_text());
            }
        }
        for (before, after) in [
            (&desired.unplaced, &unplaced),
            (&desired.preempted, &preempted),
        ] {
            for name in before.keys().chain(after.keys()) {
                if before.get(name) != after.get(name) {
                    dirty.vms.insert(name.clone());
                }
            }
        }
        desired.unplaced = unplaced;
        desired.preempted = preempted;
    }
    if segments_moved {
        let segments = crate::segments::desired_segments(model, &desired.nodes, &desired.placement);
        for node in segments.keys().chain(desired.segments.keys()) {
            if segments.get(node) != desired.segments.get(node) {
                dirty.nodes.insert(node.clone());
            }
        }
        desired.segments = segments;
    }
    // A changed VM's volumes are planned with it.
    for name in &dirty.vms {
        if let Some(vm) = desired.vms.get(name) {
            dirty.volumes.extend(vm.volumes.iter().cloned());
        }
    }
    if cfg!(debug_assertions) {
        assert!(
            desired_of(input).0 == *desired,
            "PlanSession: the patched desired state differs from the whole's"
        );
    }
    (dirty, rebuilt)
}

/// The desired state of the changed objects, with every node.
fn view(desired: &Desired, dirty: &Dirty) -> Desired {
    let vms = |name: &String| dirty.vms.contains(name);
    let volumes = |name: &String| dirty.volumes.contains(name);
    let pick = |map: &BTreeMap<String, String>, keep: &dyn Fn(&String) -> bool| {
        map.iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    Desired {
        nodes: desired.nodes.clone(),
        bonds: dirty
            .nodes
            .iter()
            .filter_map(|n| desired.bonds.get(n).map(|b| (n.clone(), b.clone())))
            .collect(),
        segments: dirty
            .nodes
            .iter()
            .filter_map(|n| desired.segments.get(n).map(|s| (n.clone(), s.clone())))
            .collect(),
        vms: dirty
            .vms
            .iter()
            .filter_map(|n| desired.vms.get(n).map(|v| (n.clone(), v.clone())))
            .collect(),
        volumes: dirty
            .volumes
            .iter()
            .filter_map(|n| desired.volumes.get(n).map(|v| (n.clone(), v.clone())))
            .collect(),
        placement: desired.placement.clone(),
        unplaced: pick(&desired.unplaced, &vms),
        preempted: pick(&desired.preempted, &vms),
        tenants: dirty
            .vms
            .iter()
            .filter_map(|n| desired.tenants.get(n).map(|t| (n.clone(), t.clone())))
            .collect(),
        spec_volumes: dirty
            .volumes
            .iter()
            .filter_map(|n| desired.spec_volumes.get(n).map(|v| (n.clone(), v.clone())))
            .collect(),
        spot_vms: desired
            .spot_vms
            .iter()
            .filter(|n| vms(n))
            .cloned()
            .collect(),
        protected_volumes: desired
            .protected_volumes
            .iter()
            .filter(|n| volumes(n))
            .cloned()
            .collect(),
        moved_writers: pick(&desired.moved_writers, &volumes),
        protections: dirty
            .vms
            .iter()
            .filter_map(|n| desired.protections.get(n).map(|p| (n.clone(), p.clone())))
            .collect(),
        replications: BTreeMap::new(),
        image_bases: desired.image_bases.clone(),
        failed_over: BTreeMap::new(),
    }
}

/// A node as a part's view of the observation starts: its identity and
/// networking, none of its objects.
fn shell_of(o: &NodeObservation) -> NodeObservation {
    match o {
        NodeObservation::Unreachable { error } => NodeObservation::Unreachable {
            error: error.clone(),
        },
        NodeObservation::Reachable {
            public_key_hex,
            networking,
            ..
        } => NodeObservation::Reachable {
            public_key_hex: public_key_hex.clone(),
            vms: BTreeMap::new(),
            volumes: BTreeMap::new(),
            bonds: BTreeMap::new(),
            networking: crate::observe::ObservedNetworking {
                netns: networking.netns.clone(),
                unavailable: networking.unavailable.clone(),
                bond_implementation: networking.bond_implementation.clone(),
                segments: BTreeMap::new(),
                firewall_drift: networking.firewall_drift.clone(),
                migration_address: networking.migration_address.clone(),
            },
            protections: BTreeMap::new(),
            replications: BTreeMap::new(),
        },
    }
}

/// Fills `shell` (every node's [`shell_of`]) into the part's view of
/// `observed`: every copy of a changed VM, volume and schedule (found by name
/// through `index`), and a changed node's bonds and segments. Returns the
/// nodes it filled, for [`empty`].
fn fill(
    shell: &mut Observed,
    observed: &Observed,
    index: &Index,
    dirty: &Dirty,
) -> BTreeSet<String> {
    // Per node, the part's VMs, schedules and volumes it holds.
    type Names<'a> = [Vec<&'a String>; 3];
    let mut wanted: BTreeMap<&String, Names<'_>> =
        dirty.nodes.iter().map(|n| (n, Names::default())).collect();
    for (i, (names, at)) in [
        (&dirty.vms, &index.vms),
        (&dirty.vms, &index.protections),
        (&dirty.volumes, &index.volumes),
    ]
    .into_iter()
    .enumerate()
    {
        for name in names {
            for node in at.get(name).into_iter().flatten() {
                wanted.entry(node).or_default()[i].push(name);
            }
        }
    }
    let mut filled = BTreeSet::new();
    for (node, [vms, protections, volumes]) in wanted {
        let (
            Some(NodeObservation::Reachable {
                vms: have_vms,
                volumes: have_volumes,
                protections: have_protections,
                bonds: have_bonds,
                networking: have_networking,
                ..
            }),
            Some(NodeObservation::Reachable {
                vms: to_vms,
                volumes: to_volumes,
                protections: to_protections,
                bonds: to_bonds,
                networking: to_networking,
                ..
            }),
        ) = (observed.nodes.get(node), shell.nodes.get_mut(node))
        else {
            continue;
        };
        if dirty.nodes.contains(node) {
            to_bonds.clone_from(have_bonds);
            to_networking.segments.clone_from(&have_networking.segments);
        }
        for name in vms {
            if let Some(x) = have_vms.get(name) {
                to_vms.insert(name.clone(), x.clone());
            }
        }
        for name in protections {
            if let Some(x) = have_protections.get(name) {
                to_protections.insert(name.clone(), x.clone());
            }
        }
        for name in volumes {
            if let Some(x) = have_volumes.get(name) {
                to_volumes.insert(name.clone(), x.clone());
            }
        }
        filled.insert(node.clone());
    }
    filled
}

/// Takes out of `shell` what [`fill`] put into `nodes`.
fn empty(shell: &mut Observed, nodes: &BTreeSet<String>) {
    for node in nodes {
        if let Some(NodeObservation::Reachable {
            vms,
            volumes,
            bonds,
            networking,
            protections,
            ..
        }) = shell.nodes.get_mut(node)
        {
            vms.clear();
            volumes.clear();
            bonds.clear();
            networking.segments.clear();
            protections.clear();
        }
    }
}

/// The entries of `before` and `after` (a site's part of a placement, each key
/// once) that differ, added or removed, by `key`.
fn differing<'p, T: PartialEq>(
    before: &'p [T],
    after: &'p [T],
    key: impl Fn(&'p T) -> &'p str,
) -> Vec<&'p T> {
    let old: HashMap<&str, &T> = before.iter().map(|x| (key(x), x)).collect();
    let new: HashMap<&str, &T> = after.iter().map(|x| (key(x), x)).collect();
    let mut out: Vec<&T> = old
        .iter()
        .filter(|(k, x)| new.get(*k) != Some(*x))
        .map(|(_, x)| *x)
        .collect();
    out.extend(
        new.iter()
            .filter(|(k, x)| old.get(*k) != Some(*x))
            .map(|(_, x)| *x),
    );
    out
}

/// Drops `value` on a thread of its own when this was its last reference.
fn free_elsewhere<T: Send + Sync + 'static>(value: Arc<T>) {
    if Arc::strong_count(&value) == 1 {
        let _ = std::thread::Builder::new()
            .name("free".into())
            .spawn(move || drop(value));
    }
}
