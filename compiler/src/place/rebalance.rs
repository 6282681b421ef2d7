//! `cairn place --rebalance`: move VMs toward the strategy's optimum, within
//! the site's `max-moves` and each group's `max-unavailable`.
//!
//! `spread`: while the most and least utilized alive nodes of a site differ
//! by more than the site's `rebalance threshold`, move the smallest movable VM
//! from the fullest node to the emptiest. `pack`: empty the least utilized
//! non-empty node into the fullest nodes that can take its VMs. FT VMs do not
//! move (their secondary is their move).
//!
//! By measured load ([`rebalance_measured`], issue 20): a node's utilization is what
//! its VMs use (CPU cores and resident memory, as their nodes report them: the
//! controller's `UsageBoard`) over its allocatable CPUs and memory, not their
//! declared sizes; a VM with no measurement counts its declared cost. Among the
//! movable VMs of the busiest node, the busiest that still leaves its destination
//! below the source moves first (fewer moves than smallest-first). Every move must
//! still fit by declared size (the room reserved VMs are promised does not depend on
//! a moment's load), and each move's reason gives the figures it was decided on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Engine, Locator, Move, PlaceOptions, Placement, Verdict, finish, order};
use crate::model::{Availability, Model, Strategy, Vm};

/// What one VM uses, measured on its node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct VmLoad {
    /// CPUs it used (CPU time over wall time between two observations).
    pub cpu_cores: f64,
    /// Resident memory of its VMM process, bytes.
    pub resident_bytes: u64,
}

/// Measured load of running VMs, by name (`cairn place --rebalance --usage FILE`:
/// `{"vms": {"db": {"cpu_cores": 1.5, "resident_bytes": 2147483648}}}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MeasuredLoad {
    /// VM name → its load.
    pub vms: BTreeMap<String, VmLoad>,
}

/// Rebalances a placement. The result's `moves` lists what moved and why.
pub fn rebalance(
    model: &Model,
    placement: &Placement,
    options: &PlaceOptions,
    locator: Option<&Locator<'_>>,
) -> Placement {
    let _ = locator;
    rebalance_with(model, placement, options, None)
}

/// Rebalances a placement by measured load: see the module's description. The
/// result's `moves` say, for each VM, the measured figures it moved for.
pub fn rebalance_measured(
    model: &Model,
    placement: &Placement,
    options: &PlaceOptions,
    load: &MeasuredLoad,
) -> Placement {
    rebalance_with(model, placement, options, Some(load))
}

/// A node's measured use: CPU cores and bytes of its VMs (declared cost for a VM with
/// no measurement), and how many VMs were not measured.
fn measured_use(engine: &Engine<'_>, load: &MeasuredLoad, node: usize) -> (f64, u64, usize) {
    let mut cores = 0.0;
    let mut bytes = 0;
    let mut unmeasured = 0;
    for vm in &engine.model.vms {
        if engine
            .assigned
            .get(&vm.name)
            .is_none_or(|(n, _)| *n != node)
        {
            continue;
        }
        let (c, b) = vm_use(engine.model, load, vm);
        cores += c;
        bytes += b;
        unmeasured += usize::from(!load.vms.contains_key(&vm.name));
    }
    (cores, bytes, unmeasured)
}

/// A VM's measured use, or its declared cost where it has none.
fn vm_use(model: &Model, load: &MeasuredLoad, vm: &Vm) -> (f64, u64) {
    match load.vms.get(&vm.name) {
        Some(l) => (l.cpu_cores, l.resident_bytes),
        None => {
            let cost = super::cost(model, vm);
            (cost.cpu_milli as f64 / 1000.0, cost.memory)
        }
    }
}

/// Utilization from a node's measured use, with `extra` (cores, bytes) added or
/// (negative) taken away.
fn measured_util(engine: &Engine<'_>, load: &MeasuredLoad, node: usize, extra: (f64, i64)) -> f64 {
    let (cores, bytes, _) = measured_use(engine, load, node);
    let cap = &engine.nodes[node].cap;
    let cpu = (cores + extra.0) / (cap.cpu_milli.max(1) as f64 / 1000.0);
    let memory = (bytes as i64 + extra.1).max(0) as f64 / cap.memory.max(1) as f64;
    (cpu + memory) / 2.0
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// "lab-1 measured 0.83 (2.90 of 4 CPUs, 12.0 of 16.0 GiB resident)".
fn node_figures(engine: &Engine<'_>, load: &MeasuredLoad, node: usize) -> String {
    let (cores, bytes, unmeasured) = measured_use(engine, load, node);
    let cap = &engine.nodes[node].cap;
    format!(
        "{} measured {:.2} ({:.2} of {} CPUs, {} of {} resident{})",
        engine.nodes[node].name,
        measured_util(engine, load, node, (0.0, 0)),
        cores,
        cap.cpu_milli / 1000,
        gib(bytes),
        gib(cap.memory),
        if unmeasured == 0 {
            String::new()
        } else {
            format!("; {unmeasured} VM(s) not measured count their declared size")
        }
    )
}

fn rebalance_with(
    model: &Model,
    placement: &Placement,
    options: &PlaceOptions,
    load: Option<&MeasuredLoad>,
) -> Placement {
    let mut engine = Engine::new(model, options);
    engine.may_stay(placement);
    for vm in order(model) {
        if let Some(p) = placement.vms.iter().find(|v| v.name == vm.name) {
            let node = engine.node_index[&p.node];
            let secondary = p.secondary.as_ref().map(|s| engine.node_index[s]);
            engine.assign(vm, node, secondary);
        }
    }
    let mut moves: Vec<Move> = vec![];
    let mut moved_per_group: BTreeMap<String, u32> = BTreeMap::new();
    for site in &model.sites {
        let nodes: Vec<usize> = engine
            .site_nodes
            .get(&site.name)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|&i| engine.nodes[i].alive)
            .collect();
        let mut budget = site.scheduler.max_moves;
        'moves: while budget > 0 {
            let util = |e: &Engine<'_>, i: usize| match load {
                Some(load) => measured_util(e, load, i, (0.0, 0)),
                None => e.nodes[i].utilization_with(super::Cost::default()),
            };
            let mut by_util: Vec<usize> = nodes.clone();
            by_util.sort_by(|&a, &b| {
                util(&engine, a)
                    .total_cmp(&util(&engine, b))
                    .then(engine.nodes[a].name.cmp(&engine.nodes[b].name))
            });
            let (Some(&low), Some(&high)) = (by_util.first(), by_util.last()) else {
                break;
            };
            let (sources, targets): (Vec<usize>, Vec<usize>) = match site.scheduler.strategy {
                Strategy::Spread => {
                    if util(&engine, high) - util(&engine, low)
                        <= site.scheduler.rebalance_threshold
                    {
                        break;
                    }
                    (vec![high], vec![low])
                }
                Strategy::Pack => {
                    let Some(&src) = by_util.iter().find(|&&i| engine.nodes[i].vms > 0) else {
                        break;
                    };
                    if util(&engine, src) > 1.0 - site.scheduler.rebalance_threshold {
                        break;
                    }
                    (
                        vec![src],
                        by_util
                            .iter()
                            .rev()
                            .copied()
                            .filter(|&i| i != src)
                            .collect(),
                    )
                }
            };
            for src in sources {
                let mut movable: Vec<&crate::model::Vm> = model
                    .vms
                    .iter()
                    .map(|v| &**v)
                    .filter(|v| {
                        v.availability != Availability::Ft
                            && engine.assigned.get(&v.name).is_some_and(|(n, _)| *n == src)
                    })
                    .filter(|v| {
                        v.group.as_ref().is_none_or(|g| {
                            let limit = model
                                .vm_groups
                                .iter()
                                .find(|x| &x.name == g)
                                .map_or(1, |x| x.max_unavailable);
                            moved_per_group.get(g).copied().unwrap_or(0) < limit
                        })
                    })
                    .collect();
                match load {
                    // Measured: the busiest VM first (it evens the nodes in fewer moves).
                    Some(load) => movable.sort_by(|a, b| {
                        let weight = |vm: &Vm| {
                            let (cores, bytes) = vm_use(model, load, vm);
                            let cap = &engine.nodes[src].cap;
                            cores / (cap.cpu_milli.max(1) as f64 / 1000.0)
                                + bytes as f64 / cap.memory.max(1) as f64
                        };
                        weight(b).total_cmp(&weight(a)).then(a.name.cmp(&b.name))
                    }),
                    None => movable.sort_by(|a, b| {
                        (u64::from(a.cpu) * a.memory_bytes)
                            .cmp(&(u64::from(b.cpu) * b.memory_bytes))
                            .then(a.name.cmp(&b.name))
                    }),
                }
                for vm in movable {
                    for &dst in &targets {
                        engine.unassign(vm);
                        let fits = matches!(engine.verdict(vm, dst, None), Verdict::Fits);
                        let better = match (site.scheduler.strategy, load) {
                            (Strategy::Spread, Some(load)) => {
                                // The source still counts the VM (it is unassigned
                                // only for the fit check): compare after the move.
                                let (cores, bytes) = vm_use(model, load, vm);
                                engine.assign(vm, src, None);
                                let after_dst =
                                    measured_util(&engine, load, dst, (cores, bytes as i64));
                                let before_src = measured_util(&engine, load, src, (0.0, 0));
                                engine.unassign(vm);
                                after_dst < before_src - 1e-9
                            }
                            (Strategy::Spread, None) => {
                                let c = super::cost(model, vm);
                                engine.nodes[dst].utilization_with(c)
                                    < engine.nodes[src].utilization_with(super::Cost::default())
                                        + 1e-9
                            }
                            (Strategy::Pack, _) => true,
                        };
                        if fits && better {
                            let reason = match load {
                                None => format!("rebalance ({})", site.scheduler.strategy),
                                Some(load) => {
                                    engine.assign(vm, src, None);
                                    let (src_text, dst_text) = (
                                        node_figures(&engine, load, src),
                                        node_figures(&engine, load, dst),
                                    );
                                    engine.unassign(vm);
                                    let used = match load.vms.get(&vm.name) {
                                        Some(l) => format!(
                                            "it uses {:.2} CPUs and {} resident (declared {} vCPUs, {})",
                                            l.cpu_cores,
                                            gib(l.resident_bytes),
                                            vm.cpu,
                                            gib(vm.memory_bytes)
                                        ),
                                        None => format!(
                                            "it was not measured: its declared {} vCPUs and {} count",
                                            vm.cpu,
                                            gib(vm.memory_bytes)
                                        ),
                                    };
                                    format!(
                                        "rebalance by measured load ({}): {src_text}, {dst_text}; {used}",
                                        site.scheduler.strategy
                                    )
                                }
                            };
                            engine.assign(vm, dst, None);
                            moves.push(Move {
                                vm: vm.name.clone(),
                                from: engine.nodes[src].name.clone(),
                                to: engine.nodes[dst].name.clone(),
                                reason,
                            });
                            if let Some(g) = &vm.group {
                                *moved_per_group.entry(g.clone()).or_default() += 1;
                            }
                            budget -= 1;
                            continue 'moves;
                        }
                        engine.assign(vm, src, None);
                    }
                }
            }
            break;
        }
    }
    let unplaced = placement
        .unplaced
        .iter()
        .map(|u| (u.name.clone(), u.reasons.clone()))
        .collect();
    let mut out = finish(
        model,
        &engine,
        placement.volumes.clone(),
        crate::ipam::allocate(&model.tenants, &model.vms, Some(placement)),
        unplaced,
        Some(placement),
        crate::threads::second(),
    );
    out.moves = moves;
    out
}

#[cfg(test)]
mod measured_tests {
    use super::*;
    use crate::source::Sources;

    #[test]
    fn measured_load_moves_a_busy_vm_that_declared_sizes_would_leave_and_says_why() {
        let mut text = String::from(
            "node-class \"n\" {\n    cpu 4\n    memory \"16GiB\"\n}\nsite \"s\" {\n    scheduler strategy=\"spread\" {\n        rebalance threshold=0.2 max-moves=10\n    }\n    rack \"r\" {\n        node \"n1\" class=\"n\" address=\"127.0.0.1:1\"\n        node \"n2\" class=\"n\" address=\"127.0.0.1:2\"\n    }\n}\ntenant \"t\"\nimage \"tiny\" builtin=\"cairn-guest\"\n",
        );
        for name in ["a", "b", "c", "d"] {
            text.push_str(&format!(
                "vm \"{name}\" tenant=\"t\" site=\"s\" {{\n    cpu 1\n    memory \"4GiB\"\n    image \"tiny\"\n}}\n"
            ));
        }
        let compiled = crate::compile(&Sources::from_files([("main.kdl".to_owned(), text)]));
        assert!(!compiled.has_errors(), "{:?}", compiled.diagnostics);
        let model = &compiled.model;
        let options = PlaceOptions::default();
        let placed = super::super::place(model, &options, None);
        let on = |node: &str| -> Vec<String> {
            let mut names: Vec<String> = placed
                .vms
                .iter()
                .filter(|v| v.node == node)
                .map(|v| v.name.clone())
                .collect();
            names.sort();
            names
        };
        // Spread by declared size: two VMs on each node.
        let (busy, idle) = (on("n1"), on("n2"));
        assert_eq!((busy.len(), idle.len()), (2, 2), "{placed:?}");
        // By declared size nothing moves.
        assert!(rebalance(model, &placed, &options, None).moves.is_empty());
        // Generated usage: n1's two VMs burn 0.9 CPUs and hold 3 GiB each, n2's idle.
        let mut load = MeasuredLoad::default();
        for name in &busy {
            load.vms.insert(
                name.clone(),
                VmLoad {
                    cpu_cores: 0.9,
                    resident_bytes: 3 << 30,
                },
            );
        }
        for name in &idle {
            load.vms.insert(
                name.clone(),
                VmLoad {
                    cpu_cores: 0.05,
                    resident_bytes: 200 << 20,
                },
            );
        }
        let moved = rebalance_measured(model, &placed, &options, &load);
        assert_eq!(moved.moves.len(), 1, "{:?}", moved.moves);
        let m = &moved.moves[0];
        assert_eq!(
            (m.vm.as_str(), m.from.as_str(), m.to.as_str()),
            (busy[0].as_str(), "n1", "n2")
        );
        assert_eq!(
            m.reason,
            format!(
                "rebalance by measured load (spread): n1 measured 0.41 (1.80 of 4 CPUs, 6.0 GiB of 16.0 GiB resident), n2 measured 0.02 (0.10 of 4 CPUs, 0.4 GiB of 16.0 GiB resident); it uses 0.90 CPUs and 3.0 GiB resident (declared 1 vCPUs, 4.0 GiB)"
            )
        );
        // The moved placement is consistent: the VM runs on n2 now.
        assert_eq!(
            moved.vms.iter().find(|v| v.name == busy[0]).unwrap().node,
            "n2"
        );
        // A VM with no measurement counts its declared size (1 CPU, 4 GiB: more than
        // it was measured at), and says so.
        let mut partial = load.clone();
        partial.vms.remove(&busy[0]);
        let moved = rebalance_measured(model, &placed, &options, &partial);
        assert_eq!(moved.moves.len(), 1, "{:?}", moved.moves);
        let reason = &moved.moves[0].reason;
        assert!(
            reason.contains("n1 measured 0.46 (1.90 of 4 CPUs, 7.0 GiB of 16.0 GiB resident; 1 VM(s) not measured count their declared size)")
                && reason.contains("it was not measured: its declared 1 vCPUs and 4.0 GiB count"),
            "{reason}"
        );
        // A move must still fit by declared size: with 2 vCPUs declared for each VM,
        // every CPU of both nodes is taken (4 of 4), and a measured-idle n2 takes
        // nothing.
        let mut tight = model.clone();
        for vm in tight.vms.iter_mut() {
            std::sync::Arc::make_mut(vm).cpu = 2;
        }
        let placed_tight = super::super::place(&tight, &options, None);
        let moved = rebalance_measured(&tight, &placed_tight, &options, &load);
        assert!(moved.moves.is_empty(), "{:?}", moved.moves);
    }
}
