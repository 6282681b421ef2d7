//! Spot VMs a node preempted at runtime (issue 20): a node under memory pressure stops
//! its spot VMs, lowest priority first, and reports each as stopped with the reason
//! (`ObservedVm::preempted`). The controller then places each where there is room:
//! the drift check that the VM's stop wakes passes them to the planner
//! (`PlanOptions::preempted`, `reconciler::pipeline::move_preempted`), which moves a
//! diskless one to another node with room, or leaves it unplaced and stopped where it
//! is, saying why (no other node has room; or its disks are on that node). An event
//! says which, once per preemption.
//!
//! A VM left waiting is kept off its node for [`HOLD`] after the preemption was first
//! seen; then it is offered to the planner no longer, so the next drift check starts
//! it where it was (the pressure may be gone). Should the node preempt it again, that
//! is a new preemption, and the same holds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reconciler::observe::{NodeObservation, Observed};

use crate::events::Event;

/// How long a preempted VM that found no room elsewhere is kept off its node.
pub const HOLD: Duration = Duration::from_secs(120);

#[derive(Debug)]
struct Preemption {
    node: String,
    reason: String,
    /// The node's start count of the VM: a start in between makes a new preemption.
    starts: u64,
    since: Instant,
    reported: bool,
}

/// The preempted VMs the controller knows of, by name.
#[derive(Debug, Default)]
pub struct Preemptions {
    by_vm: BTreeMap<String, Preemption>,
}

impl Preemptions {
    /// Takes in an observation: VMs newly reported preempted are noted (with an
    /// event each), those no longer reported are forgotten. Returns what the planner
    /// should re-place: VM → the node that preempted it (those held less than
    /// [`HOLD`]).
    pub fn observe(
        &mut self,
        observed: &Observed,
        events: &mut Vec<Event>,
    ) -> BTreeMap<String, String> {
        let mut now_preempted: BTreeMap<String, (String, String, u64)> = BTreeMap::new();
        for (node, observation) in &observed.nodes {
            let NodeObservation::Reachable { vms, .. } = observation else {
                continue;
            };
            for (name, vm) in vms {
                if !vm.preempted.is_empty() {
                    now_preempted.insert(
                        name.clone(),
                        (node.clone(), vm.preempted.clone(), vm.starts),
                    );
                }
            }
        }
        // A node that did not answer says nothing of its VMs: keep what it said last.
        self.by_vm.retain(|name, p| {
            now_preempted.contains_key(name)
                || !matches!(
                    observed.nodes.get(&p.node),
                    Some(NodeObservation::Reachable { .. })
                )
        });
        for (name, (node, reason, starts)) in now_preempted {
            let known = self
                .by_vm
                .get(&name)
                .is_some_and(|p| p.node == node && p.reason == reason && p.starts == starts);
            if known {
                continue;
            }
            events.push(
                Event::new("preempted", "noted")
                    .object(format!("vm {name}"))
                    .reason(format!(
                        "vm {name} was stopped by {node} ({reason}): placing it where there is room"
                    )),
            );
            self.by_vm.insert(
                name,
                Preemption {
                    node,
                    reason,
                    starts,
                    since: Instant::now(),
                    reported: false,
                },
            );
        }
        self.by_vm
            .iter()
            .filter(|(_, p)| p.since.elapsed() < HOLD)
            .map(|(name, p)| (name.clone(), p.node.clone()))
            .collect()
    }

    /// After planning with `offered`: an event for each VM the plan moves
    /// (`re-placing`) or leaves waiting (`pending`, with the placement's reason), once
    /// per preemption.
    pub fn planned(
        &mut self,
        offered: &BTreeMap<String, String>,
        desired: &reconciler::desired::Desired,
        events: &mut Vec<Event>,
    ) {
        for (name, node) in offered {
            let Some(p) = self.by_vm.get_mut(name) else {
                continue;
            };
            if p.reported {
                continue;
            }
            p.reported = true;
            if let Some(to) = desired
                .placement
                .moves
                .iter()
                .find(|m| m.vm == *name && m.from == *node)
                .map(|m| m.to.clone())
            {
                events.push(
                    Event::new("preempted", "re-placing")
                        .object(format!("vm {name}"))
                        .reason(format!(
                            "vm {name}, preempted on {node}, is started on {to}, which has room"
                        )),
                );
            } else if let Some(why) = desired.unplaced.get(name) {
                events.push(
                    Event::new("preempted", "pending")
                        .object(format!("vm {name}"))
                        .reason(format!(
                            "vm {name} is pending: {why}; it is tried on {node} again after {} s",
                            HOLD.as_secs()
                        )),
                );
            }
        }
    }
}
