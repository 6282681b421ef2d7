//! The pipeline from compiled specs to a carried-out plan, shared by the `cairn`
//! commands and the controller: the nodes the specs name, the placement to start
//! from, plan (with what must never be applied), settling an interrupted
//! execution, and carrying out a new one. Nothing here prints or asks: callers
//! decide what to show and whether to go on.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::apply::{ApplyEvents, ApplyOptions, Report, Settled, apply};
use proto::v1::VolumeRole;

use compiler::place::VolumePlacement;

use crate::desired::{self, BootImage, Desired, DesiredNode, Placement};
use crate::nodes::NodeApi;
use crate::observe::{NodeObservation, Observed, observe};
use crate::plan::{Plan, PlanOptions, plan_with};
use crate::state::{
    Applied, PlanRecord, StateError, StateStore, StepRecord, StepStatus, new_execution_id, now_ms,
};

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A journaled plan does not decode.
    #[error(
        "the journaled plan of execution {execution_id} does not decode ({source}); move the state file aside to start over (placement will be rebuilt from the nodes)"
    )]
    JournaledPlan {
        /// The execution.
        execution_id: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The policies refused the plan (a hard- or soft-mandatory deny not
    /// overridden); nothing was sent.
    #[error("the policies refuse this plan: {}", .0.join("; "))]
    PolicyDenied(Vec<String>),
    /// The policies could not be evaluated.
    #[error("the policies could not be evaluated: {0}")]
    Policy(String),
    /// Images a plan needs cannot be read; nothing was sent.
    #[error("images the plan needs are missing; nothing was sent: {}", .0.join("; "))]
    MissingImages(Vec<String>),
}

/// The revision of a set of spec files: `sources:` and 16 hex digits of SHA-256
/// over every file's path and text, sorted by path (the working tree is what is
/// applied, not a commit).
pub fn revision(sources: &compiler::Sources) -> String {
    let mut files: Vec<(String, String)> = sources
        .files()
        .map(|(id, _)| (sources.path(id).to_owned(), sources.text(id).to_owned()))
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for (path, text) in &files {
        hasher.update(path.as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
    }
    format!("sources:{}", proto::auth::to_hex(&hasher.finalize()[..8]))
}

/// The nodes the model names, by name.
pub fn spec_nodes(model: &compiler::Model) -> BTreeMap<String, DesiredNode> {
    model
        .sites
        .iter()
        .flat_map(|s| {
            s.nodes.iter().map(|n| {
                (
                    n.name.clone(),
                    DesiredNode {
                        name: n.name.clone(),
                        site: s.name.clone(),
                        address: n.address.clone(),
                    },
                )
            })
        })
        .collect()
}

/// What the nodes run, as a placement (used when the state store has none, e.g.
/// after it was lost: placement then starts from reality). Volumes are known
/// only by their runtime names here.
pub fn placement_from_observed(observed: &Observed) -> Placement {
    let mut p = Placement::default();
    for (node, obs) in &observed.nodes {
        let NodeObservation::Reachable { vms, volumes, .. } = obs else {
            continue;
        };
        for vm in vms.values() {
            if p.vm_node(&vm.name).is_none() {
                p.vms.push(compiler::place::VmPlacement {
                    name: vm.name.clone(),
                    tenant: String::new(),
                    site: String::new(),
                    node: node.clone(),
                    secondary: None,
                });
            }
        }
        for v in volumes.values().filter(|v| v.role != VolumeRole::Replica) {
            p.volumes.push(observed_volume(node, v));
        }
    }
    p
}

fn observed_volume(node: &str, v: &crate::observe::ObservedVolume) -> VolumePlacement {
    VolumePlacement {
        name: v.name.clone(),
        vm: String::new(),
        pool: String::new(),
        size_bytes: v.size_bytes,
        column_bytes: 0,
        columns: vec![],
        degraded_columns: 0,
        primary: node.to_owned(),
        replicas: v.replica_peers.clone(),
    }
}

/// The placement to start from: the stored one, with every volume a node
/// reports where the node says its data is (the data decides, not the record).
pub fn previous_placement(stored: Option<Placement>, observed: &Observed) -> Placement {
    let Some(mut p) = stored else {
        return placement_from_observed(observed);
    };
    let index: BTreeMap<String, usize> = p
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| (v.runtime_name(), i))
        .collect();
    for (node, obs) in &observed.nodes {
        let NodeObservation::Reachable { volumes, .. } = obs else {
            continue;
        };
        for v in volumes.values().filter(|v| v.role != VolumeRole::Replica) {
            match index.get(&v.name) {
                Some(&i) => {
                    p.volumes[i].primary = node.clone();
                    p.volumes[i].replicas = v.replica_peers.clone();
                }
                None => p.volumes.push(observed_volume(node, v)),
            }
        }
    }
    swap_promoted(&mut p, observed);
    p
}

/// An FT VM whose secondary was promoted (its node reports the VM with ft phase
/// `promoted`, issue 22) runs on its secondary's node: the pair is swapped, so the
/// placement starts from where it runs and its former primary's node is the
/// secondary to re-protect on (or the placement picks another when that node
/// failed). Returns the VMs swapped.
pub fn swap_promoted(p: &mut Placement, observed: &Observed) -> Vec<String> {
    let mut swapped = vec![];
    for vm in &mut p.vms {
        let Some(secondary) = vm.secondary.clone() else {
            continue;
        };
        let promoted = match observed.nodes.get(&secondary) {
            Some(NodeObservation::Reachable { vms, .. }) => vms.get(&vm.name).is_some_and(|o| {
                o.is_running()
                    && o.ft
                        .as_ref()
                        .is_some_and(|f| f.role == "secondary" && f.phase == "promoted")
            }),
            _ => false,
        };
        if promoted {
            vm.secondary = Some(std::mem::replace(&mut vm.node, secondary));
            swapped.push(vm.name.clone());
        }
    }
    swapped
}

/// A plan and what it was made from.
#[derive(Debug, Clone)]
pub struct Planned {
    /// What should run (shared: the controller's status of the applied commit
    /// reads the same desired state rather than placing the model again).
    pub desired: std::sync::Arc<Desired>,
    /// What ran when it was made (shared: the controller hands the same observation
    /// to its console, and at 100,000 VMs a copy is a second of CPU and memory).
    pub observed: std::sync::Arc<Observed>,
    /// The plan.
    pub plan: Plan,
    /// Where the planning time went.
    pub timings: PlanTimings,
    /// What the plan session redid (`None`: planned without one).
    pub reuse: Option<crate::session::PlanReuse>,
}

/// Where a plan's time went, in milliseconds (the controller's sync event shows
/// them beside its phases: at 10,000 nodes a slow plan has to say which part is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlanTimings {
    /// Observing every node (0 when the observation was given).
    pub observe_ms: u64,
    /// Placing (with the moves off failed, crash-looping and maintenance nodes).
    pub place_ms: u64,
    /// What should run, from the placement.
    pub desired_ms: u64,
    /// The steps: desired against observed.
    pub diff_ms: u64,
    /// Reading the placement last applied (and the protected volumes) from the
    /// state store, and matching it to the observation.
    pub load_ms: u64,
    /// The caller's work before it (the controller: opening and locking the state
    /// store, settling an interrupted execution, the volumes' writers).
    pub prepare_ms: u64,
    /// The caller's work after it (the controller: handing the observation to the
    /// console and the metrics).
    pub handover_ms: u64,
}

fn ms_since(t: std::time::Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

/// Plans `model` (of `revision`, whose images are relative to `spec_root`)
/// against `observed`, starting from `previous`; `protected_before` are the
/// volumes `prevent-destroy` protected in the specs last applied.
pub fn plan_against(
    model: &compiler::Model,
    spec_root: &std::path::Path,
    revision: &str,
    observed: impl Into<std::sync::Arc<Observed>>,
    previous: &Placement,
    protected_before: BTreeSet<String>,
) -> Planned {
    plan_against_with(
        model,
        spec_root,
        revision,
        observed,
        previous,
        protected_before,
        &PlanOptions::default(),
    )
}

/// [`plan_against`] with plan options (the controller's `prune`).
pub fn plan_against_with(
    model: &compiler::Model,
    spec_root: &std::path::Path,
    revision: &str,
    observed: impl Into<std::sync::Arc<Observed>>,
    previous: &Placement,
    protected_before: BTreeSet<String>,
    options: &PlanOptions,
) -> Planned {
    plan_against_session(
        model,
        spec_root,
        revision,
        observed,
        previous,
        protected_before,
        options,
        None,
    )
}

/// The sessions a caller that plans again and again keeps (issue 24, item 6):
/// placement and plan, and what its compile session changed.
#[derive(Debug)]
pub struct Sessions<'a> {
    /// Places again only the sites whose inputs changed.
    pub places: &'a mut compiler::session::PlaceSession,
    /// Builds again only the changed VMs' desired entries and plans them
    /// ([`crate::session`]).
    pub plans: &'a mut crate::session::PlanSession,
    /// The VMs the compile of this model changed since the model the sessions
    /// last placed and planned (`compiler::session::Session::changed_vms`, when
    /// that compile was the one before it); `None`: anything may have changed.
    pub changed_vms: Option<&'a BTreeSet<String>>,
    /// Each node's digest of the observation planned against, when the caller
    /// made them as the nodes answered (`observe::observe_digested`).
    pub digests: Option<BTreeMap<String, [u8; 32]>>,
}

/// [`plan_against_with`] placing and planning through `sessions` (issue 24,
/// item 6): the placement session places again only the sites whose inputs
/// changed and gives what `desired::place` gives, byte for byte
/// (`compiler/tests/it/session.rs`); the plan session builds and plans only
/// what changed when nothing else can have (`crate::session`). Used when no
/// node has failed; an HA restart places the whole model as before.
#[allow(clippy::too_many_arguments)]
pub fn plan_against_session(
    model: &compiler::Model,
    spec_root: &std::path::Path,
    revision: &str,
    observed: impl Into<std::sync::Arc<Observed>>,
    previous: &Placement,
    protected_before: BTreeSet<String>,
    options: &PlanOptions,
    sessions: Option<Sessions<'_>>,
) -> Planned {
    let observed = observed.into();
    // The operator's nodes in maintenance are placed as the spec's
    // (`maintenance=#true`): they keep their VMs, take no new one, and `ha-reserve`
    // admission counts no room on them.
    let mut timings = PlanTimings::default();
    let t = std::time::Instant::now();
    let closed = model.with_maintenance(&options.maintenance);
    let model = closed.as_ref();
    // Nothing moves a VM after the placement (`move_off`, `move_preempted` and
    // `keep_off` change nothing): the plan session plans the placement session's
    // result as it is.
    let plain = options.crash_moves.is_empty()
        && options.preempted.is_empty()
        && model.nodes_in_maintenance().is_empty();
    let mut placement = if let (true, Some(s)) = (options.failed_nodes.is_empty(), sessions) {
        s.places.place_after(model, previous, s.changed_vms);
        let placed = s.places.last().expect("placed");
        if plain {
            timings.place_ms = ms_since(t);
            let t = std::time::Instant::now();
            let (desired, plan, reuse) = s.plans.plan(crate::session::Input {
                model,
                spec_root,
                placement: placed,
                changed_vms: s.changed_vms,
                places: Some(s.places),
                digests: s.digests,
                protected_before,
                previous,
                observed: observed.clone(),
                revision,
                options,
            });
            // The session's desired state (patched, or built for a whole plan),
            // and the diff it made after.
            timings.desired_ms = reuse.us[1] / 1000;
            timings.diff_ms = ms_since(t).saturating_sub(timings.desired_ms);
            return Planned {
                desired,
                observed,
                plan,
                timings,
                reuse: Some(reuse),
            };
        }
        // The plan below is not the session's: its next one plans the whole.
        s.plans.forget();
        placed.clone()
    } else if options.failed_nodes.is_empty() {
        desired::place(model, Some(previous))
    } else {
        // An HA restart is not held by `ha-reserve` admission: admission kept the
        // room before the failure, and with a node gone (or one more in
        // maintenance since) it would refuse the very VMs being restarted, and with
        // them the whole plan.
        let mut restart = model.clone();
        for site in &mut restart.sites {
            site.ha_reserve_nodes = 0;
        }
        desired::place_without(
            &restart,
            previous,
            &options.failed_nodes,
            &options.disk_writers,
        )
    };
    move_off(model, &mut placement, &options.crash_moves);
    move_preempted(model, &mut placement, &options.preempted);
    keep_off(model, previous, &mut placement, options, &observed);
    timings.place_ms = ms_since(t);
    let t = std::time::Instant::now();
    let (desired, options) = desired_for(
        model,
        spec_root,
        placement,
        protected_before,
        previous,
        options,
    );
    timings.desired_ms = ms_since(t);
    let t = std::time::Instant::now();
    let plan = plan_with(&desired, &observed, revision, &options);
    timings.diff_ms = ms_since(t);
    Planned {
        desired: std::sync::Arc::new(desired),
        observed,
        plan,
        timings,
        reuse: None,
    }
}

/// The desired state of `placement` as a plan wants it (with the volumes
/// `prevent-destroy` protected in the specs last applied, and the volumes whose
/// writer the epoch authority moved off their layout's primary), and `options`
/// with a drain's order (`previous` → `placement`).
pub(crate) fn desired_for(
    model: &compiler::Model,
    spec_root: &std::path::Path,
    placement: Placement,
    protected_before: impl IntoIterator<Item = String>,
    previous: &Placement,
    options: &PlanOptions,
) -> (Desired, PlanOptions) {
    let mut desired = desired::desired(model, spec_root, placement);
    desired.protected_volumes.extend(protected_before);
    desired.moved_writers = options
        .disk_writers
        .iter()
        .filter(|(volume, writer)| {
            desired
                .volumes
                .get(volume.as_str())
                .is_some_and(|v| &v.node != *writer)
        })
        .map(|(volume, writer)| (volume.clone(), writer.clone()))
        .collect();
    let options = PlanOptions {
        drain_after: drain_order(model, previous, &desired.placement, options),
        ..options.clone()
    };
    (desired, options)
}

/// Places each VM of `away` (VM → the node it crash-loops on) on another node of
/// its site, as an HA move is placed: the placement with that node failed gives the
/// VM's new node (where it fits even with every VM of that node moved, so it fits
/// with them staying), and nothing else moves. A VM with disks stays (its volume
/// needs a new writer first, as for HA), and so does one no other node can take.
/// Returns the VMs moved.
pub fn move_off(
    model: &compiler::Model,
    placement: &mut Placement,
    away: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut moved = vec![];
    for (vm, node) in away {
        let diskless = model.vm(vm).is_some_and(|m| m.disks.is_empty());
        let Some(at) = placement
            .vms
            .iter()
            .position(|v| v.name == *vm && v.node == *node)
        else {
            continue;
        };
        if !diskless {
            continue;
        }
        let without = compiler::place::place(
            model,
            &compiler::place::PlaceOptions {
                previous: Some(placement.clone()),
                failed: compiler::place::FailureSet::of_nodes([node.clone()]),
            },
            None,
        );
        let Some(elsewhere) = without
            .vms
            .iter()
            .find(|v| v.name == *vm && v.node != *node)
        else {
            continue;
        };
        placement.vms[at] = elsewhere.clone();
        placement.moves.retain(|m| m.vm != *vm);
        placement.moves.push(compiler::place::Move {
            vm: vm.clone(),
            from: node.clone(),
            to: elsewhere.node.clone(),
            reason: format!("crash-looping on {node}: restarted elsewhere"),
        });
        moved.push(vm.clone());
    }
    moved
}

/// Re-places the spot VMs their node stopped short of memory or CPU (`preempted`: VM →
/// that node): a diskless one goes where the placement without that node puts it
/// (the move says why); one with disks (its data is on that node), or one no other
/// node has room for, is unplaced with constraint `runtime-preempted`, so the plan
/// leaves it stopped where it is and status says why. Nothing else moves. Returns
/// the VMs moved.
pub fn move_preempted(
    model: &compiler::Model,
    placement: &mut Placement,
    preempted: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut moved = vec![];
    for (vm, node) in preempted {
        let Some(at) = placement
            .vms
            .iter()
            .position(|v| v.name == *vm && v.node == *node)
        else {
            continue;
        };
        let diskless = model.vm(vm).is_some_and(|m| m.disks.is_empty());
        let without = diskless.then(|| {
            compiler::place::place(
                model,
                &compiler::place::PlaceOptions {
                    previous: Some(placement.clone()),
                    failed: compiler::place::FailureSet::of_nodes([node.clone()]),
                },
                None,
            )
        });
        let elsewhere = without.as_ref().and_then(|without| {
            without
                .vms
                .iter()
                .find(|v| v.name == *vm && v.node != *node)
                .cloned()
        });
        // Why the placement without that node has no place for it (a hard affinity,
        // room), in its own words.
        let why_not = without
            .as_ref()
            .and_then(|without| without.unplaced.iter().find(|u| u.name == *vm))
            .map(|u| {
                u.reasons
                    .iter()
                    // Its node is out of that placement, and the spot pass's own
                    // `preempted` says no more than the node already did.
                    .filter(|r| r.constraint != "failed" && r.constraint != "preempted")
                    .map(|r| format!("{}: {}", r.constraint, r.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .filter(|why| !why.is_empty());
        placement.moves.retain(|m| m.vm != *vm);
        match elsewhere {
            Some(fits) => {
                placement.moves.push(compiler::place::Move {
                    vm: vm.clone(),
                    from: node.clone(),
                    to: fits.node.clone(),
                    reason: format!(
                        "preempted on {node} (short of memory or CPU): placed where there is room"
                    ),
                });
                placement.vms[at] = fits;
                moved.push(vm.clone());
            }
            None => {
                let was = placement.vms.remove(at);
                let message = if let Some(why_not) = why_not {
                    format!(
                        "preempted on {node} (short of memory or CPU), and no other node of its site takes it ({why_not}): it waits, stopped"
                    )
                } else if diskless {
                    format!(
                        "preempted on {node} (short of memory or CPU), and no other node of its site has room for it: it waits, stopped"
                    )
                } else {
                    format!(
                        "preempted on {node} (short of memory or CPU); its disks are there, so it waits there, stopped, for the node to have room"
                    )
                };
                placement.unplaced.retain(|u| u.name != *vm);
                placement.unplaced.push(compiler::place::Unplaced {
                    name: was.name,
                    tenant: was.tenant,
                    site: was.site,
                    previous_node: Some(node.clone()),
                    reasons: vec![compiler::place::Reason {
                        constraint: "runtime-preempted".to_owned(),
                        message,
                        nodes_filtered: 1,
                        nodes: vec![node.clone()],
                        source: None,
                    }],
                });
            }
        }
    }
    moved
}

/// Keeps VMs off the nodes in maintenance (the spec's `maintenance=#true` and
/// `options.maintenance`; the placement already does, this is the last guard for
/// what a later step moved, e.g. a crash move or a writer's node): a VM the
/// placement put on one where `previous` did not have it there (a new VM, an HA
/// restart, a crash move) goes where the placement with those nodes (and the failed
/// ones) out of service puts it, with its new volumes; when that has no room for
/// it, it is unplaced, saying why. The VMs already on a node in maintenance that can
/// move live are drained: placed elsewhere the same way (a live migration when they
/// run; their disks stay, their writer is handed over at the commit), or left where
/// they are when no other node has room. A VM with NICs can move live only between
/// nodes that report a migration address in their network namespace (`observed`,
/// [`Observed::nic_migration_address`]): it is drained when its node reports one and
/// the node it would go to does too; when that node reports none, it goes where the
/// placement without the nodes that report none puts it; else it stays. Nothing else
/// moves. Returns the VMs it kept off or drained.
pub fn keep_off(
    model: &compiler::Model,
    previous: &Placement,
    placement: &mut Placement,
    options: &PlanOptions,
    observed: &Observed,
) -> Vec<String> {
    let mut maintenance = model.nodes_in_maintenance();
    maintenance.extend(options.maintenance.iter().cloned());
    if maintenance.is_empty() {
        // Nothing to keep off (and no index of the cloud's VMs to build).
        return vec![];
    }
    let maintenance = &maintenance;
    let before: BTreeMap<&str, &str> = previous
        .vms
        .iter()
        .map(|v| (v.name.as_str(), v.node.as_str()))
        .collect();
    // Whether a VM with NICs can move live to or from `node` (`plan::vms::live_refusal`
    // asks the same of both nodes).
    let has_nics = |vm: &str| model.vm(vm).is_some_and(|m| !m.nics.is_empty());
    let nic_ready = |node: &str| observed.nic_migration_address(node).is_some();
    // A new VM or one moved there, and (the drain) a VM that was there and can move
    // live (`plan::vms`, when it runs; its disks stay, their writer is handed over at
    // the commit): with NICs only when its node reports a migration address (the
    // destination's is checked once it is placed). The others stay, as before.
    let landed: Vec<String> = placement
        .vms
        .iter()
        .filter(|v| {
            maintenance.contains(&v.node)
                && (before.get(v.name.as_str()) != Some(&v.node.as_str())
                    || !has_nics(&v.name)
                    || nic_ready(&v.node))
        })
        .map(|v| v.name.clone())
        .collect();
    if landed.is_empty() {
        return landed;
    }
    let out: BTreeSet<String> = maintenance
        .iter()
        .chain(&options.failed_nodes)
        .cloned()
        .collect();
    // Without the `ha-reserve` admission: with nodes out of service it would refuse
    // every HA VM (no room left to lose one more node), and an HA restart is not held
    // by admission (which already kept the room).
    let mut relaxed = model.clone();
    for site in &mut relaxed.sites {
        site.ha_reserve_nodes = 0;
    }
    let elsewhere = desired::place_without(&relaxed, previous, &out, &options.disk_writers);
    let mut drain_to: Option<Placement> = None;
    // The same without the nodes that report no migration address (for VMs with NICs).
    let mut live_to: Option<Placement> = None;
    for vm in &landed {
        let Some(at) = placement.vms.iter().position(|v| v.name == *vm) else {
            continue;
        };
        let there = placement.vms[at].node.clone();
        let new = !before.contains_key(vm.as_str());
        let drained = before.get(vm.as_str()) == Some(&there.as_str());
        // A drained VM goes where the placement with those nodes out puts it (not
        // `place_without`, which keeps a VM that is not HA where it was).
        let fits = if drained {
            drain_to
                .get_or_insert_with(|| {
                    compiler::place::place(
                        &relaxed,
                        &compiler::place::PlaceOptions {
                            previous: Some(previous.clone()),
                            failed: compiler::place::FailureSet {
                                nodes: out.clone(),
                                ..Default::default()
                            },
                        },
                        None,
                    )
                })
                .vms
                .iter()
                .find(|v| v.name == *vm && !out.contains(&v.node))
                .cloned()
        } else {
            elsewhere
                .vms
                .iter()
                .find(|v| v.name == *vm && !out.contains(&v.node))
                .cloned()
        };
        // With NICs, a drain to a node without a migration address would leave it
        // where it runs: it goes instead where the placement with those nodes out
        // too puts it, when that node can take it live.
        let fits = match fits {
            Some(f) if drained && has_nics(vm) && !nic_ready(&f.node) => live_to
                .get_or_insert_with(|| {
                    let mut out = out.clone();
                    out.extend(
                        relaxed
                            .sites
                            .iter()
                            .flat_map(|s| &s.nodes)
                            .filter(|n| !nic_ready(&n.name))
                            .map(|n| n.name.clone()),
                    );
                    compiler::place::place(
                        &relaxed,
                        &compiler::place::PlaceOptions {
                            previous: Some(previous.clone()),
                            failed: compiler::place::FailureSet {
                                nodes: out,
                                ..Default::default()
                            },
                        },
                        None,
                    )
                })
                .vms
                .iter()
                .find(|v| v.name == *vm && !out.contains(&v.node) && nic_ready(&v.node))
                .cloned()
                .or(Some(f)),
            fits => fits,
        };
        if drained
            && fits
                .as_ref()
                .is_none_or(|f| has_nics(vm) && !nic_ready(&f.node))
        {
            // No room elsewhere (or, with NICs, no migration address where there is):
            // it stays where it runs until there is.
            continue;
        }
        placement.moves.retain(|m| m.vm != *vm);
        match fits {
            Some(fits) => {
                placement.vms[at] = fits.clone();
                if let Some(from) = before.get(vm.as_str()) {
                    placement.moves.push(compiler::place::Move {
                        vm: vm.clone(),
                        from: (*from).to_owned(),
                        to: fits.node.clone(),
                        reason: if drained {
                            format!("{there} is in maintenance: drained")
                        } else {
                            format!("{there} is in maintenance: placed elsewhere")
                        },
                    });
                }
                if new {
                    placement.volumes.retain(|v| v.vm != *vm);
                    placement
                        .volumes
                        .extend(elsewhere.volumes.iter().filter(|v| v.vm == *vm).cloned());
                }
            }
            None => {
                let was = placement.vms.remove(at);
                if new {
                    placement.volumes.retain(|v| v.vm != *vm);
                }
                placement.unplaced.retain(|u| u.name != *vm);
                placement.unplaced.push(compiler::place::Unplaced {
                    name: was.name,
                    tenant: was.tenant,
                    site: was.site,
                    previous_node: before.get(vm.as_str()).map(|n| (*n).to_owned()),
                    reasons: vec![compiler::place::Reason {
                        constraint: "maintenance".to_owned(),
                        message: format!(
                            "it fits only on {there}, which is in maintenance (`cairn node maintenance {there} --off` ends it)"
                        ),
                        nodes_filtered: maintenance.len(),
                        nodes: maintenance.iter().take(5).cloned().collect(),
                        source: None,
                    }],
                });
            }
        }
    }
    landed
}

/// The order of a drain (issue 17): the VMs moving off nodes in maintenance, by
/// name, each waiting for the move `max-moves` (its site's) places before it and for
/// the move `max-unavailable` places before it in its own group. Returns VM → the
/// VMs whose moves it waits for (the plan makes its steps depend on theirs).
pub fn drain_order(
    model: &compiler::Model,
    previous: &Placement,
    placement: &Placement,
    options: &PlanOptions,
) -> BTreeMap<String, Vec<String>> {
    let mut maintenance = model.nodes_in_maintenance();
    maintenance.extend(options.maintenance.iter().cloned());
    if maintenance.is_empty() {
        return BTreeMap::new();
    }
    let mut drained: Vec<(&str, &str)> = previous
        .vms
        .iter()
        .filter(|v| maintenance.contains(&v.node))
        .filter(|v| {
            placement
                .vms
                .iter()
                .any(|p| p.name == v.name && p.node != v.node)
        })
        .map(|v| {
            let site = model
                .vm(&v.name)
                .map_or(v.site.as_str(), |m| m.site.as_str());
            (v.name.as_str(), site)
        })
        .collect();
    drained.sort();
    let mut after: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut per_site: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut per_group: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (vm, site) in drained {
        let mut waits = vec![];
        let max_moves = model
            .sites
            .iter()
            .find(|s| s.name == site)
            .map_or(1, |s| s.scheduler.max_moves.max(1)) as usize;
        let earlier = per_site.entry(site).or_default();
        if earlier.len() >= max_moves {
            waits.push(earlier[earlier.len() - max_moves].to_owned());
        }
        earlier.push(vm);
        if let Some(group) = model.vm(vm).and_then(|m| m.group.as_deref()) {
            let limit = model
                .vm_groups
                .iter()
                .find(|g| g.name == group)
                .map_or(1, |g| g.max_unavailable.max(1)) as usize;
            let earlier = per_group.entry(group).or_default();
            if earlier.len() >= limit {
                waits.push(earlier[earlier.len() - limit].to_owned());
            }
            earlier.push(vm);
        }
        waits.sort();
        waits.dedup();
        if !waits.is_empty() {
            after.insert(vm.to_owned(), waits);
        }
    }
    after
}

/// Observes every node the model names and plans against what they run, from the
/// placement and protections the store recorded.
pub async fn plan_revision<N: NodeApi>(
    model: &compiler::Model,
    spec_root: &std::path::Path,
    revision: &str,
    store: &dyn StateStore,
    nodes: &N,
) -> Result<Planned, PipelineError> {
    plan_revision_with(
        model,
        spec_root,
        revision,
        store,
        nodes,
        &PlanOptions::default(),
    )
    .await
}

/// [`plan_revision`] with plan options (the controller's `prune`).
pub async fn plan_revision_with<N: NodeApi>(
    model: &compiler::Model,
    spec_root: &std::path::Path,
    revision: &str,
    store: &dyn StateStore,
    nodes: &N,
    options: &PlanOptions,
) -> Result<Planned, PipelineError> {
    plan_revision_session(model, spec_root, revision, store, nodes, options, None).await
}

/// [`plan_revision_with`] placing and planning through the caller's sessions
/// (see [`plan_against_session`]).
pub async fn plan_revision_session<N: NodeApi>(
    model: &compiler::Model,
    spec_root: &std::path::Path,
    revision: &str,
    store: &dyn StateStore,
    nodes: &N,
    options: &PlanOptions,
    mut sessions: Option<Sessions<'_>>,
) -> Result<Planned, PipelineError> {
    let spec = spec_nodes(model);
    let t = std::time::Instant::now();
    let observed = match &mut sessions {
        Some(s) => {
            let (observed, digests) = crate::observe::observe_digested(&spec, nodes).await;
            s.digests = Some(digests);
            observed
        }
        None => observe(&spec, nodes).await,
    };
    let observe_ms = ms_since(t);
    let t = std::time::Instant::now();
    let previous = previous_placement(store.placement()?, &observed);
    let protected = store.protected_volumes()?;
    let load_ms = ms_since(t);
    let mut planned = plan_against_session(
        model, spec_root, revision, observed, &previous, protected, options, sessions,
    );
    planned.timings.observe_ms = observe_ms;
    planned.timings.load_ms = load_ms;
    Ok(planned)
}

/// The policy gate: `policies` judge the model with the plan's placement and the
/// plan itself (the input `cairn check --plan` gives them). A blocking result
/// (hard-mandatory deny, or soft-mandatory deny without an override) refuses
/// the plan, one line per finding; advisory and warning results are returned in
/// the report for the caller to show. An empty policy set passes.
pub fn policy_gate(
    policies: &policy::set::PolicySet,
    model: &compiler::Model,
    plan: &Plan,
    overrides: &[policy::eval::Override],
) -> Result<policy::eval::Report, PipelineError> {
    let input = policy::eval::Input::of_model(model)
        .and_then(|i| i.with("placement", &plan.placement))
        .and_then(|i| i.with("plan", plan))
        .map_err(|e| PipelineError::Policy(e.to_string()))?;
    let report = policy::eval::evaluate(policies, &input, None, overrides)
        .map_err(|e| PipelineError::Policy(e.to_string()))?;
    if report.passed() {
        return Ok(report);
    }
    let mut denied: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.blocking)
        .map(|f| format!("{}: {}", f.policy, f.message))
        .collect();
    denied.extend(
        report
            .policies
            .iter()
            .filter_map(|p| p.error.as_ref().map(|e| format!("{}: {e}", p.name))),
    );
    if denied.is_empty() {
        denied.push(format!(
            "{} blocking result(s), {} error(s)",
            report.blocking(),
            report.errors()
        ));
    }
    Err(PipelineError::PolicyDenied(denied))
}

/// The image every desired VM boots.
pub fn images_of(desired: &Desired) -> BTreeMap<String, BootImage> {
    desired
        .vms
        .values()
        .map(|vm| (vm.name.clone(), vm.image.clone()))
        .collect()
}

/// Why a plan must not be applied (`None`: it may be). The specs ask for
/// something that cannot be done: a VM no node can take (the specs do not
/// validate), or a change that would destroy data.
pub fn unacceptable(plan: &Plan) -> Option<String> {
    let unplaced: Vec<&String> = plan.blocking_unplaced().map(|(vm, _)| vm).collect();
    let mut why = vec![];
    if !unplaced.is_empty() {
        why.push(format!(
            "{} cannot be placed (the specs do not validate: `cairn validate` says why)",
            unplaced
                .iter()
                .map(|vm| format!("vm {vm}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for r in &plan.refused {
        why.push(format!("{} {} is refused: {}", r.object, r.name, r.reason));
    }
    if why.is_empty() {
        None
    } else {
        Some(why.join("; "))
    }
}

/// An execution an earlier apply did not finish, settled: its in-flight steps'
/// outcomes asked of their nodes.
#[derive(Debug, Clone)]
pub struct Interrupted {
    /// Its execution id.
    pub execution_id: String,
    /// Its plan.
    pub plan: Plan,
    /// Its journal, settled.
    pub journal: Vec<StepRecord>,
    /// What settling found.
    pub settled: Settled,
}

impl Interrupted {
    /// Its changes not carried out in full.
    pub fn unfinished(&self) -> Vec<&crate::plan::Change> {
        let done: std::collections::BTreeSet<usize> = self
            .journal
            .iter()
            .filter(|r| r.status == StepStatus::Succeeded)
            .map(|r| r.step)
            .collect();
        self.plan
            .changes
            .iter()
            .filter(|c| !c.steps.iter().all(|s| done.contains(s)))
            .collect()
    }

    /// Whether `plan` only finishes what this execution was approved to do: the
    /// same specs, and every change of `plan` was an unfinished change of it
    /// (destroying ones only where it destroyed too).
    pub fn covers(&self, plan: &Plan) -> bool {
        use crate::plan::ChangeKind::*;
        let destroys = |k| matches!(k, Delete | Replace | Preempt | Move);
        let unfinished = self.unfinished();
        self.plan.revision == plan.revision
            && plan.changes.iter().all(|c| {
                unfinished.iter().any(|u| {
                    u.object == c.object
                        && u.name == c.name
                        && (!destroys(c.kind) || destroys(u.kind))
                })
            })
    }

    /// What happened to it, for people.
    pub fn describe(&self) -> String {
        let done = self
            .journal
            .iter()
            .filter(|r| r.status == StepStatus::Succeeded)
            .count();
        let mut out = format!(
            "An earlier apply of plan {} (execution {}, {}) was interrupted: {done} of {} steps were carried out",
            self.plan.plan_id,
            self.execution_id,
            self.plan.revision,
            self.plan.steps.len()
        );
        if self.settled.done + self.settled.not_done > 0 {
            out.push_str(&format!(
                "; of the {} in flight, the nodes carried out {} and never started {}",
                self.settled.done + self.settled.not_done,
                self.settled.done,
                self.settled.not_done
            ));
        }
        for u in &self.settled.unknown {
            out.push_str(&format!("; outcome unknown: {u}"));
        }
        out.push_str(
            ".\nIts requests are not sent again: the plan below is made from what the cluster runs now.\n",
        );
        out
    }
}

/// Settles every execution an earlier apply left unfinished (the newest is
/// returned; all stay unfinished until a new execution supersedes them).
pub async fn settle_interrupted<N: NodeApi>(
    store: &dyn StateStore,
    nodes: &N,
) -> Result<Option<Interrupted>, PipelineError> {
    let mut newest = None;
    for (key, record) in store.unfinished_executions()? {
        let plan: Plan =
            serde_json::from_value(record.plan).map_err(|source| PipelineError::JournaledPlan {
                execution_id: key.clone(),
                source,
            })?;
        let settled = crate::apply::settle(&plan, &record.execution_id, store, nodes).await?;
        let journal = store.journal_of(&record.execution_id)?;
        newest = Some(Interrupted {
            execution_id: record.execution_id,
            plan,
            journal,
            settled,
        });
    }
    // A live migration committed (the record names its destination) but not seen
    // running there is finished before anything is planned (`crate::migrate`).
    crate::migrate::finish_pending(store, nodes).await?;
    Ok(newest)
}

/// The image of every VM a plan defines (from its `create_vm` steps).
pub fn defined_images(plan: &Plan) -> BTreeMap<String, BootImage> {
    plan.steps
        .iter()
        .filter_map(|s| match &s.action {
            crate::plan::NodeAction::CreateVm { name, image, .. } => {
                Some((name.clone(), image.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Kernel and initrd files that VMs the plan defines or starts need and that are
/// missing (`images`: VM → the image it boots): checked before any step is sent,
/// so a missing image never half-applies a plan.
pub fn missing_images(plan: &Plan, images: &BTreeMap<String, BootImage>) -> Vec<String> {
    let mut out = vec![];
    for step in &plan.steps {
        let name = match &step.action {
            crate::plan::NodeAction::CreateVm { name, .. }
            | crate::plan::NodeAction::StartVm { name } => name,
            _ => continue,
        };
        let Some(BootImage::Kernel { kernel, initrd, .. }) = images.get(name) else {
            continue;
        };
        for (what, path) in [("kernel", kernel), ("initrd", initrd)] {
            if path.is_empty() {
                continue;
            }
            if let Err(e) = std::fs::File::open(path) {
                out.push(format!("vm {name}: {what} {path} cannot be read: {e}"));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What an execution did.
#[derive(Debug, Clone)]
pub struct Executed {
    /// Its id.
    pub execution_id: String,
    /// Every step's outcome.
    pub report: Report,
    /// Why the cluster will still not match the specs (empty: converged, if no
    /// step failed).
    pub problems: Vec<String>,
}

impl Executed {
    /// Whether the cluster matches the specs now (no step failed, nothing left).
    pub fn converged(&self) -> bool {
        !self.report.failed() && self.problems.is_empty()
    }
}

/// Carries out `plan` as a new execution (superseding `interrupted`, if any):
/// every kernel and initrd it needs is checked first (`images`: VM → the image
/// it boots), the execution is journaled, applied, and recorded (placement,
/// protections, and the applied revision when it converged).
pub async fn execute<N: NodeApi>(
    store: &dyn StateStore,
    nodes: &N,
    plan: &Plan,
    images: &BTreeMap<String, BootImage>,
    options: &ApplyOptions,
    interrupted: Option<&Interrupted>,
    events: &dyn ApplyEvents,
) -> Result<Executed, PipelineError> {
    let missing = missing_images(plan, images);
    if !missing.is_empty() {
        store.audit(
            "apply-refused",
            serde_json::json!({"plan_id": plan.plan_id, "reason": "missing images", "missing": missing}),
        )?;
        return Err(PipelineError::MissingImages(missing));
    }
    let execution_id = new_execution_id(&plan.plan_id);
    store.start_execution(&PlanRecord {
        execution_id: execution_id.clone(),
        plan: serde_json::to_value(plan).expect("plans serialize"),
        finished: false,
        ended: None,
        started_at_unix_ms: now_ms(),
    })?;
    if let Some(old) = interrupted {
        store.finish_execution(
            &old.execution_id,
            Some(format!("superseded by {execution_id}")),
        )?;
    }
    let report = apply(plan, &execution_id, store, nodes, options, events).await?;
    store.finish_execution(&execution_id, None)?;
    store.set_placement(&plan.placement)?;
    store.set_protected_volumes(&plan.protected)?;
    let executed = Executed {
        execution_id,
        report,
        problems: plan.not_converged(),
    };
    if executed.converged() {
        store.set_applied(&Applied {
            revision: plan.revision.clone(),
            plan_id: plan.plan_id.clone(),
            at_unix_ms: now_ms(),
        })?;
    }
    store.audit(
        "apply",
        serde_json::to_value(&executed.report).expect("reports serialize"),
    )?;
    Ok(executed)
}

/// A plan with no steps: nothing is sent. Supersedes an interrupted execution
/// (its work is done or no longer wanted); returns whether the cluster matches
/// the specs (then the revision is recorded as applied).
pub fn nothing_to_do(
    store: &dyn StateStore,
    plan: &Plan,
    interrupted: Option<&Interrupted>,
) -> Result<bool, PipelineError> {
    if let Some(old) = interrupted {
        store.finish_execution(
            &old.execution_id,
            Some("settled: nothing left to do".to_owned()),
        )?;
    }
    let converged = plan.not_converged().is_empty();
    if converged {
        store.set_applied(&Applied {
            revision: plan.revision.clone(),
            plan_id: plan.plan_id.clone(),
            at_unix_ms: now_ms(),
        })?;
    }
    Ok(converged)
}

#[cfg(test)]
mod keep_off_tests {
    use super::*;

    pub(super) fn quickstart() -> compiler::Model {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let sources = compiler::source::Sources::load_dir(&root).expect("the quickstart loads");
        let compilation = compiler::compile(&sources);
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        compilation.model
    }

    pub(super) fn node_of<'a>(placement: &'a Placement, vm: &str) -> Option<&'a str> {
        placement
            .vms
            .iter()
            .find(|v| v.name == vm)
            .map(|v| v.node.as_str())
    }

    #[test]
    fn a_new_vm_is_not_placed_on_a_node_in_maintenance_and_the_vms_there_stay() {
        let model = quickstart();
        let all = desired::place(&model, None);
        let mut previous = all.clone();
        previous.vms.retain(|v| v.name != "backup");
        previous.volumes.retain(|v| v.vm != "backup");
        // Without maintenance, the new VM goes where the placement puts it: M.
        let mut placement = desired::place(&model, Some(&previous));
        let m = node_of(&placement, "backup")
            .expect("backup placed")
            .to_owned();
        let options = PlanOptions {
            maintenance: BTreeSet::from([m.clone()]),
            ..Default::default()
        };
        let kept = keep_off(
            &model,
            &previous,
            &mut placement,
            &options,
            &Observed::default(),
        );
        assert_eq!(kept, vec!["backup".to_owned()]);
        let now = node_of(&placement, "backup").expect("backup placed elsewhere");
        assert_ne!(now, m, "{placement:#?}");
        for v in placement.volumes.iter().filter(|v| v.vm == "backup") {
            assert!(
                v.columns
                    .iter()
                    .flatten()
                    .all(|c| !c.starts_with(&format!("{m}/"))),
                "backup's new volume is not on {m}: {v:?}"
            );
        }
        // The VMs already on M stay there, and nothing else moved.
        for v in &previous.vms {
            assert_eq!(
                node_of(&placement, &v.name),
                Some(v.node.as_str()),
                "{}",
                v.name
            );
        }
        assert!(placement.moves.is_empty(), "{:?}", placement.moves);
        // Every node in maintenance: it is unplaced, saying why.
        let mut placement = desired::place(&model, Some(&previous));
        let every = PlanOptions {
            maintenance: model
                .sites
                .iter()
                .flat_map(|s| &s.nodes)
                .map(|n| n.name.clone())
                .collect(),
            ..Default::default()
        };
        keep_off(
            &model,
            &previous,
            &mut placement,
            &every,
            &Observed::default(),
        );
        assert_eq!(node_of(&placement, "backup"), None);
        let unplaced = placement
            .unplaced
            .iter()
            .find(|u| u.name == "backup")
            .expect("backup unplaced");
        assert_eq!(unplaced.reasons[0].constraint, "maintenance");
        assert!(
            unplaced.reasons[0].message.contains("--off"),
            "{unplaced:?}"
        );
    }

    #[test]
    fn the_spec_flag_and_the_operators_set_both_keep_a_new_vm_off_through_the_plan() {
        let model = quickstart();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let mut previous = desired::place(&model, None);
        previous.vms.retain(|v| v.name != "backup");
        previous.volumes.retain(|v| v.vm != "backup");
        let m = node_of(&desired::place(&model, Some(&previous)), "backup")
            .expect("backup placed")
            .to_owned();
        let mut flagged = model.clone();
        for n in flagged.sites.iter_mut().flat_map(|s| &mut s.nodes) {
            n.maintenance = n.name == m;
        }
        let operator = PlanOptions {
            maintenance: BTreeSet::from([m.clone()]),
            ..Default::default()
        };
        for (model, options) in [(&flagged, &PlanOptions::default()), (&model, &operator)] {
            let planned = plan_against_with(
                model,
                &root,
                "test",
                Observed::default(),
                &previous,
                BTreeSet::new(),
                options,
            );
            let placement = &planned.desired.placement;
            let now = node_of(placement, "backup").expect("backup placed elsewhere");
            assert_ne!(now, m);
            for v in &previous.vms {
                assert_eq!(node_of(placement, &v.name), Some(v.node.as_str()));
            }
        }
    }

    /// The controller's status of an applied commit reads the sync's own desired
    /// state (controller `Observation::desired`) instead of placing the model again
    /// from the placement the apply stored: both give the same status, for new VMs
    /// placed and for a node in maintenance. Not with a failed node: the plan's
    /// desired state leaves the failed node's tenant segments out (nothing is sent
    /// there) where the status wants them, so the controller hands a sync's desired
    /// state over only when no node was failed.
    #[test]
    fn the_status_of_the_plans_desired_state_is_the_status_of_placing_again_from_what_it_stored() {
        let model = quickstart();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let all = desired::place(&model, None);
        let mut previous = all.clone();
        previous.vms.retain(|v| v.name != "backup");
        previous.volumes.retain(|v| v.vm != "backup");
        let busy = all.vms.first().expect("a placed VM").node.clone();
        let options = [
            PlanOptions::default(),
            PlanOptions {
                maintenance: BTreeSet::from([busy.clone()]),
                ..Default::default()
            },
        ];
        let observed = Observed::default();
        for (i, options) in options.iter().enumerate() {
            let planned = plan_against_with(
                &model,
                &root,
                "test",
                observed.clone(),
                &previous,
                BTreeSet::new(),
                options,
            );
            let stored = (*planned.plan.placement).clone();
            let again = desired::place(&model, Some(&previous_placement(Some(stored), &observed)));
            let again = desired::desired(&model, &root, again);
            let status = |d: &Desired| {
                serde_json::to_value(crate::status::status(d, &observed, None, None, vec![]))
                    .unwrap()
            };
            assert_eq!(status(&planned.desired), status(&again), "options {i}");
        }
    }

    /// The quickstart's model with its VMs' root disks and spread rules left out.
    fn quickstart_without_disks_or_spread() -> compiler::model::Model {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let files = ["cluster.kdl", "tenants.kdl", "workloads.kdl"].map(|f| {
            let text = std::fs::read_to_string(root.join(f)).expect("quickstart file");
            let text: String = text
                .lines()
                .filter(|l| !l.contains("disk \"root\"") && !l.contains("spread \"node\""))
                .map(|l| format!("{l}\n"))
                .collect();
            (f.to_owned(), text)
        });
        let compilation = compiler::compile(&compiler::source::Sources::from_files(files));
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        compilation.model
    }

    #[test]
    fn an_ha_restart_off_a_failed_node_skips_the_node_in_maintenance() {
        // The dev cluster's web VMs without disks and without spread (as the HA tests).
        let model = quickstart_without_disks_or_spread();
        let mut previous = desired::place(&model, None);
        for v in &mut previous.vms {
            v.node = match v.name.as_str() {
                "db" | "web-2" => "lab-1",
                "backup" | "web-0" => "lab-2",
                _ => "lab-3",
            }
            .to_owned();
        }
        let failed = BTreeSet::from(["lab-2".to_owned()]);
        let mut placement = desired::place_without(&model, &previous, &failed, &BTreeMap::new());
        // Without maintenance, web-0 restarts on lab-3 (the spread strategy).
        assert_eq!(node_of(&placement, "web-0"), Some("lab-3"));
        let options = PlanOptions {
            failed_nodes: failed,
            maintenance: BTreeSet::from(["lab-3".to_owned()]),
            ..Default::default()
        };
        assert_eq!(
            keep_off(
                &model,
                &previous,
                &mut placement,
                &options,
                &Observed::default()
            ),
            vec!["web-0".to_owned()]
        );
        assert_eq!(
            node_of(&placement, "web-0"),
            Some("lab-1"),
            "{placement:#?}"
        );
        assert!(
            placement
                .moves
                .iter()
                .any(|m| m.vm == "web-0" && m.from == "lab-2" && m.to == "lab-1"),
            "{:?}",
            placement.moves
        );
        // web-1 has a NIC and no node reports a migration address: it cannot move
        // live, so the drain leaves it (issue 17).
        assert_eq!(node_of(&placement, "web-1"), Some("lab-3"), "stays");
        assert!(placement.unplaced.is_empty(), "{:?}", placement.unplaced);
        // lab-3 reports one, lab-1 (the only node left) does not: it still stays.
        let reports = |observed: &mut Observed, node: &str, address: &str| {
            let wire = proto::v1::ObserveResponse {
                networking: Some(proto::v1::Networking {
                    migration_address: address.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            observed.nodes.insert(
                node.to_owned(),
                crate::observe::from_wire(String::new(), wire),
            );
        };
        let mut observed = Observed::default();
        reports(&mut observed, "lab-3", "10.255.0.13");
        reports(&mut observed, "lab-1", "");
        let restart =
            || desired::place_without(&model, &previous, &options.failed_nodes, &BTreeMap::new());
        let mut placement = restart();
        keep_off(&model, &previous, &mut placement, &options, &observed);
        assert_eq!(node_of(&placement, "web-1"), Some("lab-3"), "stays");
        // Both report one: web-1 is drained to lab-1 (a live migration when it runs).
        reports(&mut observed, "lab-1", "10.255.0.11");
        let mut placement = restart();
        let kept = keep_off(&model, &previous, &mut placement, &options, &observed);
        assert!(kept.contains(&"web-1".to_owned()), "{kept:?}");
        assert_eq!(
            node_of(&placement, "web-1"),
            Some("lab-1"),
            "{placement:#?}"
        );
        assert!(
            placement
                .moves
                .iter()
                .any(|m| m.vm == "web-1" && m.from == "lab-3" && m.reason.contains("drained")),
            "{:?}",
            placement.moves
        );
    }

    #[test]
    fn a_drain_skips_a_node_without_a_migration_address_for_one_that_has_one() {
        // The dev cluster's VMs without disks and without spread (as above).
        let model = quickstart_without_disks_or_spread();
        let mut previous = desired::place(&model, None);
        for v in &mut previous.vms {
            v.node = match v.name.as_str() {
                "db" | "web-2" => "lab-1",
                "backup" | "web-0" => "lab-2",
                "web-1" => "lab-3",
                _ => continue,
            }
            .to_owned();
        }
        let options = PlanOptions {
            maintenance: BTreeSet::from(["lab-3".to_owned()]),
            ..Default::default()
        };
        let reports = |observed: &mut Observed, node: &str, address: &str| {
            let wire = proto::v1::ObserveResponse {
                networking: Some(proto::v1::Networking {
                    migration_address: address.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            observed.nodes.insert(
                node.to_owned(),
                crate::observe::from_wire(String::new(), wire),
            );
        };
        let drain = |observed: &Observed| {
            let mut placement = desired::place(&model, Some(&previous));
            keep_off(&model, &previous, &mut placement, &options, observed);
            placement
        };
        // Every node reports an address: web-1 goes where the drain's placement puts it.
        let mut observed = Observed::default();
        for (node, address) in [
            ("lab-1", "10.255.0.11"),
            ("lab-2", "10.255.0.12"),
            ("lab-3", "10.255.0.13"),
        ] {
            reports(&mut observed, node, address);
        }
        let first = node_of(&drain(&observed), "web-1")
            .expect("web-1 placed")
            .to_owned();
        assert_ne!(first, "lab-3");
        let other = if first == "lab-1" { "lab-2" } else { "lab-1" };
        // That node reports none: web-1 goes to the other, which can take it live,
        // instead of staying on lab-3.
        reports(&mut observed, &first, "");
        let placement = drain(&observed);
        assert_eq!(node_of(&placement, "web-1"), Some(other), "{placement:#?}");
        assert!(
            placement
                .moves
                .iter()
                .any(|m| m.vm == "web-1" && m.from == "lab-3" && m.to == other),
            "{:?}",
            placement.moves
        );
        // Neither reports one: it stays.
        reports(&mut observed, other, "");
        assert_eq!(node_of(&drain(&observed), "web-1"), Some("lab-3"));
    }
}

#[cfg(test)]
mod preemption_tests {
    use super::keep_off_tests::node_of;
    use super::*;

    fn quickstart() -> (compiler::Model, Placement) {
        let model = super::keep_off_tests::quickstart();
        let placement = desired::place(&model, None);
        (model, placement)
    }

    #[test]
    fn a_preempted_diskless_vm_moves_to_a_node_with_room_and_one_with_disks_waits_saying_why() {
        let (mut model, mut placement) = quickstart();
        // A diskless `backup` moves; nothing else does.
        for vm in &mut model.vms {
            if vm.name == "backup" {
                std::sync::Arc::make_mut(vm).disks.clear();
            }
        }
        let before = placement.clone();
        let from = node_of(&placement, "backup")
            .expect("backup placed")
            .to_owned();
        let preempted = BTreeMap::from([("backup".to_owned(), from.clone())]);
        let moved = move_preempted(&model, &mut placement, &preempted);
        assert_eq!(moved, vec!["backup".to_owned()]);
        let to = node_of(&placement, "backup").expect("still placed");
        assert_ne!(to, from);
        let the_move = placement
            .moves
            .iter()
            .find(|m| m.vm == "backup")
            .expect("a move");
        assert!(
            the_move.reason.contains(&format!("preempted on {from}")),
            "{the_move:?}"
        );
        for vm in &before.vms {
            if vm.name != "backup" {
                assert_eq!(
                    node_of(&placement, &vm.name),
                    Some(vm.node.as_str()),
                    "{}",
                    vm.name
                );
            }
        }

        // With its disk, its data is on that node: it waits there, unplaced, saying
        // why (not `preempted`, which would delete it).
        let (model, mut placement) = quickstart();
        let from = node_of(&placement, "backup")
            .expect("backup placed")
            .to_owned();
        let preempted = BTreeMap::from([("backup".to_owned(), from.clone())]);
        assert!(move_preempted(&model, &mut placement, &preempted).is_empty());
        assert_eq!(node_of(&placement, "backup"), None);
        let unplaced = placement
            .unplaced
            .iter()
            .find(|u| u.name == "backup")
            .expect("unplaced");
        assert!(!unplaced.preempted());
        assert_eq!(unplaced.previous_node.as_deref(), Some(from.as_str()));
        assert!(
            unplaced.reason_text().contains("its disks are there"),
            "{}",
            unplaced.reason_text()
        );

        // A VM its node did not preempt (or one placed elsewhere now) is not touched.
        let (model, mut placement) = quickstart();
        let before = placement.clone();
        let elsewhere = BTreeMap::from([("backup".to_owned(), "no-such-node".to_owned())]);
        assert!(move_preempted(&model, &mut placement, &elsewhere).is_empty());
        assert_eq!(placement, before);
    }
}
