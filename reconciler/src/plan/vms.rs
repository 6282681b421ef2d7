//! VMs: deletes (what no longer runs where it is), then what the specs want.

use proto::v1::VmState;

use super::build::Builder;
use super::{Change, ChangeKind, LeftAlone, NodeAction};
use crate::desired::{BootImage, Desired, DesiredVm};
use crate::drift;

/// The `CreateVm` of a VM (also re-sent, unchanged, to repair its NICs).
pub(super) fn vm_definition(vm: &DesiredVm, desired: &Desired) -> NodeAction {
    NodeAction::CreateVm {
        addresses: nic_addresses(vm, desired),
        name: vm.name.clone(),
        vcpus: vm.vcpus,
        memory_bytes: vm.memory_bytes,
        image: vm.image.clone(),
        volumes: attached_volumes(vm, desired),
        tenant: vm.tenant.clone(),
        nics: vm.nics.clone(),
        sla: vm.sla.clone(),
        priority: vm.priority,
        dedicated_cpus: vm.dedicated_cpus,
        nic_mtu: nic_mtu(vm, desired),
    }
}

/// The MTU of `vm`'s NICs: its node's segment MTU for its networks (the site's
/// guest bond MTU minus 50); 0 for the default 1450 (`NodeAction::CreateVm`).
fn nic_mtu(vm: &DesiredVm, desired: &Desired) -> u32 {
    desired
        .segments
        .get(&vm.node)
        .and_then(|s| {
            s.values()
                .find(|s| s.tenant == vm.tenant && vm.nics.contains(&s.network))
        })
        .map(|s| s.mtu)
        .filter(|m| *m != crate::segments::SEGMENT_MTU)
        .unwrap_or(0)
}

/// The volumes a VM definition attaches as its disks, in order: those written on the
/// VM's node (its primary copy, or a copy the epoch authority made the writer after the
/// primary's node failed; the node serves each to the VM's VMM over NBD, through the
/// replicated write path), and those of which the VM's node holds no copy (after a
/// cold move: the node's storage client reaches the copies, the controller names it
/// among the volume's clients before the plan runs). A volume of which the node holds
/// a copy another node writes is left out.
fn attached_volumes(vm: &DesiredVm, desired: &Desired) -> Vec<String> {
    vm.volumes
        .iter()
        .filter(|name| {
            writer_of(name, desired).is_some_and(|node| node == vm.node)
                || desired
                    .volumes
                    .get(name.as_str())
                    .is_some_and(|v| v.node != vm.node && !v.replicas.contains(&vm.node))
        })
        .cloned()
        .collect()
}

/// The `CreateVm` of a VM migrating live to its node: every volume is attached. A
/// copy there that is not the writer yet is served to the incoming VMM as the
/// writer's in-sync copy (the node refuses its writes until the commit's epoch names
/// it the writer); without a copy there the node's storage client reaches the copies
/// (`crate::migrate` names the node among the volume's clients before the prepare).
fn migration_definition(vm: &DesiredVm, desired: &Desired) -> NodeAction {
    let mut definition = vm_definition(vm, desired);
    if let NodeAction::CreateVm { volumes, .. } = &mut definition {
        volumes.clone_from(&vm.volumes);
    }
    definition
}

/// The node where `name` runs when its copy on the node the specs want it on (its
/// destination) is down while it runs elsewhere and can move from there live: that
/// copy is what a live migration that did not finish left behind (its destination's
/// definition, not removed by an abort that failed under load, or a VMM that ended
/// before the commit). Starting it would boot the guest afresh and delete the copy
/// that runs, which is a cold move of a running VM; instead the stale copy is deleted
/// (`plan_vm_deletes`) and the VM migrates again (`plan_vms`). `None`: no such copy.
fn stale_destination<'o>(
    vm: &DesiredVm,
    copies: &[(&'o str, &crate::observe::ObservedVm)],
    desired: &Desired,
    cold: bool,
    observed: &crate::observe::Observed,
) -> Option<&'o str> {
    if vm.power_off || super::ft::is_secondary(desired, &vm.name, &vm.node) {
        return None;
    }
    let here = copies.iter().find(|(n, _)| *n == vm.node)?.1;
    if !here.is_down() {
        return None;
    }
    copies
        .iter()
        .find(|(n, o)| {
            *n != vm.node
                && o.state == VmState::Running
                && !super::ft::is_secondary(desired, &vm.name, n)
                && !crate::desired::failover::left_behind(desired, &vm.name, n)
                && live_refusal(vm, desired, cold, observed, n).is_none()
        })
        .map(|(n, _)| *n)
}

/// The node that writes a volume now: the epoch authority's writer when it moved off
/// the layout's primary, else the primary.
fn writer_of<'d>(volume: &str, desired: &'d Desired) -> Option<&'d str> {
    desired
        .moved_writers
        .get(volume)
        .map(String::as_str)
        .or_else(|| desired.volumes.get(volume).map(|v| v.node.as_str()))
}

/// Each NIC's IPv4 address from the placement's IPAM, in the order of the VM's
/// NICs ("" where a NIC has none: an IPv6 network).
fn nic_addresses(vm: &DesiredVm, desired: &Desired) -> Vec<String> {
    (0..vm.nics.len())
        .map(|i| {
            desired
                .placement
                .nic_address(&vm.name, i)
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

pub(super) fn vm_details(vm: &DesiredVm, desired: &Desired) -> Vec<String> {
    let image = match &vm.image {
        BootImage::Builtin(b) => format!("image {b} (built in)"),
        BootImage::Kernel { kernel, .. } => format!("kernel {kernel}"),
    };
    let mut line = format!(
        "{} vCPU, {} memory, {image}",
        vm.vcpus,
        compiler::units::human_size(vm.memory_bytes)
    );
    if !vm.volumes.is_empty() {
        line.push_str(&format!(", volumes {}", vm.volumes.join(" ")));
    }
    if !vm.nics.is_empty() {
        let addresses = nic_addresses(vm, desired);
        let nics: Vec<String> = vm
            .nics
            .iter()
            .enumerate()
            .map(|(i, network)| match addresses.get(i) {
                Some(address) if !address.is_empty() => format!("{network}={address}"),
                _ => network.clone(),
            })
            .collect();
        line.push_str(&format!(", nics {}", nics.join(" ")));
    }
    vec![line]
}

/// VMs no longer wanted where they run: stopped and deleted first (they free
/// room; creates on the same node wait for them). A VM still in the specs that
/// cannot be placed now is left alone where it runs.
pub(super) fn plan_vm_deletes(b: &mut Builder<'_>) {
    let desired = b.desired;
    let observed = b.observed;
    let observed_vms = observed.vms();
    for (name, copies) in &observed_vms {
        for (node, vm) in copies {
            let wanted_here = desired.vms.get(*name).is_some_and(|d| d.node == *node);
            let wanted_elsewhere = desired.vms.get(*name).is_some_and(|d| d.node != *node);
            let stale = desired
                .vms
                .get(*name)
                .and_then(|d| stale_destination(d, copies, desired, b.cold, observed));
            if let Some(runs) = stale {
                if wanted_here {
                    // Left by a live migration that did not finish: deleted, and the
                    // VM migrates again from where it runs (`plan_vms`).
                    let (steps, delete) = b.remove_vm(node, name, false);
                    b.deleted_vm_steps
                        .entry((*node).to_owned())
                        .or_default()
                        .push(delete);
                    b.all_vm_deletes.push(delete);
                    b.changes.push(Change {
                        details: vec![format!(
                            "{} here, left by a live migration that did not finish; it runs on {runs} and migrates again",
                            if vm.state == VmState::Crashed { "crashed" } else { "stopped" }
                        )],
                        steps,
                        ..Change::new(
                            ChangeKind::Delete,
                            "vm",
                            name,
                            desired.tenants.get(*name).map_or("", String::as_str),
                            node,
                        )
                    });
                }
                if wanted_here || *node == runs {
                    continue;
                }
            }
            if wanted_here || super::ft::is_secondary(desired, name, node) {
                // An FT VM's secondary's copy is wanted there too (`plan_ft`).
                continue;
            }
            let in_spec = desired.tenants.contains_key(*name);
            let preempted = desired.preempted.get(*name);
            if in_spec && !wanted_elsewhere && preempted.is_none() {
                // Still in the spec but it cannot be placed now: a spec mistake
                // (or a cluster too small) never deletes what runs. It stays.
                let why = desired
                    .unplaced
                    .get(*name)
                    .map_or("it has no node", String::as_str);
                b.left_alone.push(LeftAlone {
                    object: "vm".into(),
                    name: (*name).to_owned(),
                    node: (*node).to_owned(),
                    reason: format!(
                        "it cannot be placed now ({why}); it stays where it runs until the specs give it room"
                    ),
                });
                continue;
            }
            if !in_spec && b.keep_unpruned("vm", name, node) {
                continue;
            }
            // A copy a failover left at its lost site is deleted, never moved from.
            if wanted_elsewhere && !crate::desired::failover::left_behind(desired, name, node) {
                // Handled as a move below when the target answers.
                let target = &desired.vms[*name].node;
                if !observed.reachable(target) {
                    continue;
                }
                let already_there = copies.iter().any(|(n, _)| n == target);
                if !already_there {
                    continue;
                }
            }
            let running = vm.is_running();
            let (steps, delete) = b.remove_vm(node, name, running);
            b.deleted_vm_steps
                .entry((*node).to_owned())
                .or_default()
                .push(delete);
            b.all_vm_deletes.push(delete);
            let (kind, details) = match preempted {
                Some(why) => (
                    ChangeKind::Preempt,
                    vec![why.clone(), "its volumes are kept".to_owned()],
                ),
                None if crate::desired::failover::left_behind(desired, name, node) => (
                    ChangeKind::Delete,
                    vec![format!(
                        "its site failed over: it runs on {} (site {}); this copy is deleted, never started again (its volumes are kept for `cairn failback`)",
                        desired.vms[*name].node,
                        desired
                            .nodes
                            .get(&desired.vms[*name].node)
                            .map_or("", |n| n.site.as_str())
                    )],
                ),
                None if wanted_elsewhere => (
                    ChangeKind::Delete,
                    vec![format!(
                        "duplicate: it also runs on {}",
                        desired.vms[*name].node
                    )],
                ),
                None => (ChangeKind::Delete, vec![]),
            };
            b.changes.push(Change {
                details,
                steps,
                ..Change::new(
                    kind,
                    "vm",
                    name,
                    desired.tenants.get(*name).map_or("", String::as_str),
                    node,
                )
            });
        }
    }
}

/// The downtime a live migration's last pre-copy round may take (issue 17's goal).
pub(crate) const MAX_DOWNTIME_MS: u32 = 50;

/// Why a running VM's move cannot be a live migration (`None`: it can). A VM with
/// disks moves live too: its disks stay where their copies are, and the commit hands
/// their writer over (`crate::migrate`); only a volume the placement has no layout of
/// keeps it cold. A VM with NICs runs in its node's network namespace: both nodes
/// must report a migration address there (Observe's `networking.migration_address`:
/// the destination's VMM listens on it, the source's, in its own namespace, sends to
/// it).
fn live_refusal(
    vm: &DesiredVm,
    desired: &Desired,
    cold: bool,
    observed: &crate::observe::Observed,
    from: &str,
) -> Option<String> {
    if cold {
        Some("--cold asked for a cold move".to_owned())
    } else if vm.power_off {
        Some("its spec says power \"off\"".to_owned())
    } else if let Some(volume) = vm
        .volumes
        .iter()
        .find(|v| !desired.volumes.contains_key(v.as_str()))
    {
        Some(format!(
            "its disk's volume {volume} has no layout in the placement, so its writer cannot be handed over"
        ))
    } else if !vm.nics.is_empty() {
        let missing: Vec<&str> = [from, vm.node.as_str()]
            .into_iter()
            .filter(|n| observed.nic_migration_address(n).is_none())
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "its NICs run in the nodes' network namespaces, and {} report{} no migration address there",
                missing.join(" and "),
                if missing.len() == 1 { "s" } else { "" }
            )
        })
    } else {
        None
    }
}

/// The volumes of a VM migrating live, each with its copies (primary first).
fn migrating_volumes(vm: &DesiredVm, desired: &Desired) -> Vec<super::MigratingVolume> {
    vm.volumes
        .iter()
        .filter_map(|name| desired.volumes.get(name.as_str()))
        .map(|v| super::MigratingVolume {
            name: v.name.clone(),
            copies: std::iter::once(v.node.clone())
                .chain(v.replicas.iter().cloned())
                .collect(),
        })
        .collect()
}

/// `disks stay: the writer of VOL moves to NODE at the commit (its copy there)`, or
/// `NODE reaches VOL's copies as a client from the prepare`, one clause per volume.
fn handover_line(vm: &DesiredVm, desired: &Desired) -> String {
    let clauses: Vec<String> = migrating_volumes(vm, desired)
        .iter()
        .map(|v| {
            if v.copies.contains(&vm.node) {
                format!(
                    "{} writer -> {} at the commit (its copy there)",
                    v.name, vm.node
                )
            } else {
                format!(
                    "{} read and written from {} as a client of {}",
                    v.name,
                    vm.node,
                    v.copies.join(", ")
                )
            }
        })
        .collect();
    format!("disks stay: {}", clauses.join("; "))
}

/// VMs the specs want: created, moved (live or cold), replaced when their definition
/// changed, repaired (NICs), or started when stopped or crashed.
pub(super) fn plan_vms(b: &mut Builder<'_>) {
    let desired = b.desired;
    let observed = b.observed;
    // An FT VM's copy on its secondary's node is its secondary, not a copy to move.
    let all_copies = observed.vms();
    let observed_vms = super::ft::without_secondaries(desired, all_copies.clone());
    for vm in desired.vms.values() {
        if let Some(why) = super::ft::takeover_pending(vm, &all_copies) {
            // Starting the primary again would run a second copy of the guest beside
            // the secondary that is about to resume it.
            b.left_alone.push(LeftAlone {
                object: "vm".into(),
                name: vm.name.clone(),
                node: vm.node.clone(),
                reason: why,
            });
            continue;
        }
        // Left alone with its node, or with a volume that is left alone.
        let down = if observed.reachable(&vm.node) {
            // A volume left alone with its primary's node holds the VM, unless its
            // new writer is on the VM's node.
            b.left_alone
                .iter()
                .find(|l| {
                    l.object == "volume"
                        && vm.volumes.contains(&l.name)
                        && desired.moved_writers.get(&l.name) != Some(&vm.node)
                })
                .map(|l| l.node.clone())
        } else {
            Some(vm.node.clone())
        };
        if let Some(node) = down {
            b.left_alone.push(LeftAlone {
                object: "vm".into(),
                name: vm.name.clone(),
                node,
                reason: String::new(),
            });
            continue;
        }
        let copies = observed_vms
            .get(vm.name.as_str())
            .cloned()
            .unwrap_or_default();
        let stale = stale_destination(vm, &copies, desired, b.cold, observed).is_some();
        let here = copies
            .iter()
            .find(|(n, _)| *n == vm.node && !stale)
            .map(|(_, o)| *o);
        let elsewhere = copies.iter().find(|(n, _)| {
            *n != vm.node && !crate::desired::failover::left_behind(desired, &vm.name, n)
        });
        let mut deps: Vec<usize> = vm
            .volumes
            .iter()
            .filter_map(|v| b.volume_steps.get(v))
            .flatten()
            .copied()
            .collect();
        deps.extend(b.deleted_vm_steps.get(&vm.node).into_iter().flatten());
        match (here, elsewhere) {
            (None, None) => {
                let steps = b.create_vm(vm, deps);
                b.changes.push(Change {
                    details: vm_details(vm, desired),
                    steps,
                    ..Change::new(ChangeKind::Create, "vm", &vm.name, &vm.tenant, &vm.node)
                });
            }
            (None, Some((old, o))) => {
                let running = o.is_running();
                let live = running.then(|| live_refusal(vm, desired, b.cold, observed, old));
                // A drain's order: this move waits for the moves before it.
                let waits: Vec<usize> = b
                    .drain_after
                    .get(&vm.name)
                    .into_iter()
                    .flatten()
                    .filter_map(|w| b.moved.get(w))
                    .copied()
                    .collect();
                let order = b.drain_after.get(&vm.name).map(|w| {
                    format!(
                        "after the move of {} (max-moves, max-unavailable)",
                        w.join(", ")
                    )
                });
                if let Some(None) = live {
                    deps.extend(&waits);
                    let volumes = migrating_volumes(vm, desired);
                    let peers = if volumes.is_empty() {
                        vec![]
                    } else {
                        b.peer_set()
                    };
                    // One step: the commander's migration sequence (`crate::migrate`).
                    let migrate = b.step(
                        &vm.node,
                        NodeAction::MigrateVm {
                            name: vm.name.clone(),
                            from: (*old).to_owned(),
                            from_address: b.address(old),
                            max_downtime_ms: MAX_DOWNTIME_MS,
                            definition: Box::new(migration_definition(vm, desired)),
                            volumes,
                            peers,
                        },
                        deps,
                    );
                    let mut details = vec![format!(
                        "live migration: pre-copy, downtime target {MAX_DOWNTIME_MS} ms; it runs on {old} until the commit"
                    )];
                    if !vm.volumes.is_empty() {
                        details.push(handover_line(vm, desired));
                    }
                    details.extend(order);
                    b.changes.push(Change {
                        was_node: Some((*old).to_owned()),
                        details,
                        steps: vec![migrate],
                        ..Change::new(ChangeKind::Move, "vm", &vm.name, &vm.tenant, &vm.node)
                    });
                    b.moved.insert(vm.name.clone(), migrate);
                    continue;
                }
                let (mut steps, delete) = b.remove_vm_after(old, &vm.name, running, waits);
                deps.push(delete);
                steps.extend(b.create_vm(vm, deps));
                if let Some(last) = steps.last() {
                    b.moved.insert(vm.name.clone(), *last);
                }
                let mut details = vec!["cold move: stopped there, started here".to_owned()];
                if let Some(Some(why)) = live {
                    details.push(format!("not live: {why}"));
                }
                details.extend(order);
                b.changes.push(Change {
                    was_node: Some((*old).to_owned()),
                    details,
                    steps,
                    ..Change::new(ChangeKind::Move, "vm", &vm.name, &vm.tenant, &vm.node)
                });
            }
            (Some(o), _) => {
                let diffs = drift::vm_definition(vm, o);
                let mut broken_nics = drift::nic_repairs(o, observed.can_network(&vm.node));
                broken_nics.extend(drift::sla_repairs(vm, o));
                if vm.power_off {
                    // Stopped on purpose: its taps and cgroup are made when it starts.
                    broken_nics.clear();
                }
                let will_start = o.is_down() && !vm.power_off;
                if diffs.is_empty() && !broken_nics.is_empty() && !will_start {
                    // Same definition again: the node makes the missing parts.
                    let repair = b.step(&vm.node, vm_definition(vm, desired), vec![]);
                    b.changes.push(Change {
                        details: broken_nics,
                        steps: vec![repair],
                        ..Change::new(ChangeKind::Update, "vm", &vm.name, &vm.tenant, &vm.node)
                    });
                    continue;
                }
                if !diffs.is_empty() {
                    let running = o.is_running();
                    let (mut steps, delete) = b.remove_vm(&vm.node, &vm.name, running);
                    deps.push(delete);
                    steps.extend(b.create_vm(vm, deps));
                    b.changes.push(Change {
                        details: diffs,
                        steps,
                        ..Change::new(ChangeKind::Replace, "vm", &vm.name, &vm.tenant, &vm.node)
                    });
                } else if vm.power_off {
                    if o.is_running() {
                        let stop = b.step(
                            &vm.node,
                            NodeAction::StopVm {
                                name: vm.name.clone(),
                            },
                            vec![],
                        );
                        b.changes.push(Change {
                            details: vec![
                                "power \"off\" in its spec: stopped, kept defined".into(),
                            ],
                            steps: vec![stop],
                            ..Change::new(ChangeKind::Stop, "vm", &vm.name, &vm.tenant, &vm.node)
                        });
                    }
                } else if o.is_down() {
                    let start = b.step(
                        &vm.node,
                        NodeAction::StartVm {
                            name: vm.name.clone(),
                        },
                        vec![],
                    );
                    let detail = if o.state == VmState::Crashed && o.crash_count == 0 {
                        "not running (its process ended with its node); start it again".to_owned()
                    } else if o.state == VmState::Crashed {
                        format!(
                            "crashed ({} unrequested exits); start it again",
                            o.crash_count
                        )
                    } else {
                        "stopped; start it".to_owned()
                    };
                    b.changes.push(Change {
                        details: vec![detail],
                        steps: vec![start],
                        ..Change::new(ChangeKind::Start, "vm", &vm.name, &vm.tenant, &vm.node)
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod address_tests {
    use super::*;

    #[test]
    fn create_vm_carries_each_nics_address_from_the_placement() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let sources = compiler::source::Sources::load_dir(&root).expect("the quickstart loads");
        let compilation = compiler::compile(&sources);
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        let placement = crate::desired::place(&compilation.model, None);
        let desired = crate::desired::desired(&compilation.model, &root, placement.clone());
        let address = placement
            .nic_address("db", 0)
            .expect("db's NIC has an address");
        let vm = desired.vms.get("db").expect("db is placed");
        let request = vm_definition(vm, &desired).to_request("test");
        let Some(proto::v1::apply_request::Action::CreateVm(definition)) = request.action else {
            panic!("not a create_vm: {request:?}");
        };
        assert_eq!(definition.nics.len(), 1);
        assert_eq!(definition.nics[0].network, "dev-net");
        assert_eq!(definition.nics[0].ipv4, address);
        let details = vm_details(vm, &desired).join(" ");
        assert!(
            details.contains(&format!("nics dev-net={address}")),
            "{details}"
        );
    }
}

#[cfg(test)]
mod stale_destination_tests {
    use crate::observe::{NodeObservation, Observed};
    use crate::plan::segments::tests::{desired_with, observed_as};
    use crate::plan::{ChangeKind, NodeAction, plan};

    /// `vm` observed on `node` in `state`, as the node's Observe answer says it.
    fn observed_on(observed: &mut Observed, node: &str, vm: &str, state: proto::v1::VmState) {
        let wire = proto::v1::ObserveResponse {
            vms: vec![proto::v1::VmStatus {
                name: vm.into(),
                state: state as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let NodeObservation::Reachable { vms: seen, .. } =
            crate::observe::from_wire(String::new(), wire)
        else {
            unreachable!("from_wire always answers Reachable")
        };
        let Some(NodeObservation::Reachable {
            vms, networking, ..
        }) = observed.nodes.get_mut(node)
        else {
            panic!("{node} is observed")
        };
        vms.extend(seen);
        networking.migration_address = format!("10.255.0.{}", 10 + node.len());
    }

    /// Issue 17: a live migration that did not finish (its abort could not remove the
    /// destination's definition) leaves the VM running on its source and a stopped
    /// copy on the node the specs now want it on. Starting that copy would boot the
    /// guest afresh and delete the one that runs (what `cli it maintenance` saw once in
    /// CI: web-1 "started afresh"); the plan deletes the stale copy and migrates again.
    #[test]
    fn a_stopped_copy_left_on_the_destination_is_deleted_and_the_vm_migrates_again() {
        let before = desired_with(None);
        let was = before.vms["db"].node.clone();
        let to = before.nodes.keys().find(|n| **n != was).unwrap().clone();
        let mut placement = (*before.placement).clone();
        placement
            .vms
            .iter_mut()
            .find(|v| v.name == "db")
            .unwrap()
            .node = to.clone();
        let mut after = desired_with(Some(placement));
        after.vms.get_mut("db").unwrap().volumes.clear();
        for state in [proto::v1::VmState::Stopped, proto::v1::VmState::Crashed] {
            let mut observed = observed_as(&before);
            observed_on(&mut observed, &was, "db", proto::v1::VmState::Running);
            observed_on(&mut observed, &to, "db", state);
            let planned = plan(&after, &observed, "r");
            let db: Vec<_> = planned
                .changes
                .iter()
                .filter(|c| c.object == "vm" && c.name == "db")
                .collect();
            let delete = db
                .iter()
                .find(|c| c.kind == ChangeKind::Delete)
                .unwrap_or_else(|| panic!("{state:?}: the stale copy is deleted: {db:#?}"));
            assert_eq!(delete.node, to);
            assert!(
                delete.details[0].contains(&format!("it runs on {was} and migrates again")),
                "{:?}",
                delete.details
            );
            let migrate = planned
                .steps
                .iter()
                .find(|s| matches!(&s.action, NodeAction::MigrateVm { name, from, .. } if name == "db" && *from == was))
                .unwrap_or_else(|| panic!("{state:?}: db migrates again: {db:#?}"));
            assert_eq!(migrate.node, to);
            let deleted = &planned.steps[delete.steps[delete.steps.len() - 1]];
            assert!(migrate.depends_on.contains(&deleted.id), "{migrate:?}");
            // Never a start of the stale copy, nor a delete of the copy that runs.
            for s in &planned.steps {
                match &s.action {
                    NodeAction::StartVm { name } => assert_ne!(name, "db", "{s:?}"),
                    NodeAction::DeleteVm { name } | NodeAction::StopVm { name } => {
                        assert!(name != "db" || s.node == to, "{s:?}")
                    }
                    _ => {}
                }
            }
        }
        // --cold: the old behaviour (the copy there is started, the other deleted).
        let mut observed = observed_as(&before);
        observed_on(&mut observed, &was, "db", proto::v1::VmState::Running);
        observed_on(&mut observed, &to, "db", proto::v1::VmState::Stopped);
        let cold = crate::plan::plan_with(
            &after,
            &observed,
            "r",
            &crate::plan::PlanOptions {
                cold: true,
                ..Default::default()
            },
        );
        assert!(
            cold.steps.iter().any(
                |s| matches!(&s.action, NodeAction::StartVm { name } if name == "db")
                    && s.node == to
            ),
            "{:#?}",
            cold.changes
        );
    }
}
