//! The step builder: steps with their dependencies (a step's wave is the length
//! of its longest dependency chain), the changes they carry out, and what is
//! left alone or refused on the way.

use std::collections::BTreeMap;

use super::{Change, LeftAlone, NodeAction, PeerRef, Refused, Step};
use crate::desired::{Desired, DesiredVm, DesiredVolume};
use crate::observe::{NodeObservation, Observed};

pub(super) struct Builder<'a> {
    pub(super) desired: &'a Desired,
    pub(super) observed: &'a Observed,
    pub(super) steps: Vec<Step>,
    pub(super) changes: Vec<Change>,
    /// Objects not touched, with why (empty: their node did not answer).
    pub(super) left_alone: Vec<LeftAlone>,
    /// Changes the specs ask for that would destroy data or cannot be made.
    pub(super) refused: Vec<Refused>,
    /// Per node, the VM deletes (creates there wait for them).
    pub(super) deleted_vm_steps: BTreeMap<String, Vec<usize>>,
    /// Every VM delete (volume deletes wait for them).
    pub(super) all_vm_deletes: Vec<usize>,
    /// Per volume, the steps that make or grow it (its VM waits for them).
    pub(super) volume_steps: BTreeMap<String, Vec<usize>>,
    /// Delete objects no spec names (`PlanOptions::prune`).
    pub(super) prune: bool,
    /// Objects no spec names, kept because prune is off.
    pub(super) unpruned: Vec<LeftAlone>,
    /// Move running VMs cold (`PlanOptions::cold`), never live.
    pub(super) cold: bool,
    /// A drain's order: VM → the VMs whose moves it waits for.
    pub(super) drain_after: BTreeMap<String, Vec<String>>,
    /// Per moved VM, the last step of its move (the VMs draining after it wait for it).
    pub(super) moved: BTreeMap<String, usize>,
}

impl<'a> Builder<'a> {
    pub(super) fn new(desired: &'a Desired, observed: &'a Observed) -> Self {
        Self {
            desired,
            observed,
            steps: vec![],
            changes: vec![],
            left_alone: vec![],
            refused: vec![],
            deleted_vm_steps: BTreeMap::new(),
            all_vm_deletes: vec![],
            volume_steps: BTreeMap::new(),
            prune: true,
            unpruned: vec![],
            cold: false,
            drain_after: BTreeMap::new(),
            moved: BTreeMap::new(),
        }
    }

    /// With prune off, keeps an object no spec names (reported in
    /// `Plan::unpruned`) and returns true: the caller plans no delete.
    pub(super) fn keep_unpruned(&mut self, object: &str, name: &str, node: &str) -> bool {
        if self.prune {
            return false;
        }
        self.unpruned.push(LeftAlone {
            object: object.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            reason: "no spec names it any more; prune is off (`reconcile { prune #false }`), so it is left alone".to_owned(),
        });
        true
    }

    /// Makes `step` wait for `on` as well (a step made after it), and moves every
    /// step's wave to the length of its longest dependency chain again. Returns
    /// false, changing nothing, when `on` already waits for `step` (a cycle).
    pub(super) fn add_dependency(&mut self, step: usize, on: usize) -> bool {
        if self.steps[step].depends_on.contains(&on) {
            return true;
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut todo = vec![on];
        while let Some(s) = todo.pop() {
            if s == step {
                return false;
            }
            if seen.insert(s) {
                todo.extend(self.steps[s].depends_on.iter().copied());
            }
        }
        self.steps[step].depends_on.push(on);
        // Waves only grow, and the dependencies form no cycle: this ends.
        loop {
            let mut changed = false;
            for i in 0..self.steps.len() {
                let wave = self.steps[i]
                    .depends_on
                    .iter()
                    .map(|d| self.steps[*d].wave + 1)
                    .max()
                    .unwrap_or(0);
                if wave > self.steps[i].wave {
                    self.steps[i].wave = wave;
                    changed = true;
                }
            }
            if !changed {
                return true;
            }
        }
    }

    pub(super) fn address(&self, node: &str) -> String {
        self.desired
            .nodes
            .get(node)
            .map(|n| n.address.clone())
            .unwrap_or_default()
    }

    pub(super) fn step(&mut self, node: &str, action: NodeAction, depends_on: Vec<usize>) -> usize {
        let id = self.steps.len();
        let wave = depends_on
            .iter()
            .map(|d| self.steps[*d].wave + 1)
            .max()
            .unwrap_or(0);
        self.steps.push(Step {
            id,
            wave,
            node: node.to_owned(),
            address: self.address(node),
            action,
            depends_on,
        });
        id
    }

    pub(super) fn public_key(&self, node: &str) -> String {
        match self.observed.nodes.get(node) {
            Some(NodeObservation::Reachable { public_key_hex, .. }) => public_key_hex.clone(),
            _ => String::new(),
        }
    }

    /// Every node of the spec that answered, with its address and key (what the
    /// controller pushes with `SetPeers`).
    pub(super) fn peer_set(&self) -> Vec<PeerRef> {
        self.desired
            .nodes
            .keys()
            .map(|n| PeerRef {
                name: n.clone(),
                address: self.address(n),
                public_key_hex: self.public_key(n),
            })
            .filter(|p| !p.public_key_hex.is_empty())
            .collect()
    }

    pub(super) fn create_volume(&mut self, v: &DesiredVolume, depends_on: Vec<usize>) -> usize {
        let replicas = v
            .replicas
            .iter()
            .map(|r| PeerRef {
                name: r.clone(),
                address: self.address(r),
                public_key_hex: self.public_key(r),
            })
            .collect();
        self.step(
            &v.node,
            NodeAction::CreateVolume {
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                stripe_width: v.stripe_width,
                stripe_unit_bytes: v.stripe_unit_bytes,
                replicas,
            },
            depends_on,
        )
    }

    /// Define a VM and start it, unless its spec says `power "off"`.
    pub(super) fn create_vm(&mut self, vm: &DesiredVm, depends_on: Vec<usize>) -> Vec<usize> {
        let create = self.step(
            &vm.node,
            super::vms::vm_definition(vm, self.desired),
            depends_on,
        );
        if vm.power_off {
            return vec![create];
        }
        let start = self.step(
            &vm.node,
            NodeAction::StartVm {
                name: vm.name.clone(),
            },
            vec![create],
        );
        vec![create, start]
    }

    /// Stop (when it runs) and delete a VM; returns the steps and the delete step.
    pub(super) fn remove_vm(
        &mut self,
        node: &str,
        name: &str,
        running: bool,
    ) -> (Vec<usize>, usize) {
        self.remove_vm_after(node, name, running, vec![])
    }

    /// [`Self::remove_vm`] once `after` succeeded.
    pub(super) fn remove_vm_after(
        &mut self,
        node: &str,
        name: &str,
        running: bool,
        after: Vec<usize>,
    ) -> (Vec<usize>, usize) {
        let mut steps = vec![];
        let mut deps = after;
        if running {
            let stop = self.step(
                node,
                NodeAction::StopVm {
                    name: name.to_owned(),
                },
                std::mem::take(&mut deps),
            );
            steps.push(stop);
            deps.push(stop);
        }
        let delete = self.step(
            node,
            NodeAction::DeleteVm {
                name: name.to_owned(),
            },
            deps,
        );
        steps.push(delete);
        (steps, delete)
    }
}
