//! `cairn place --rebalance`: move VMs toward the strategy's optimum, within
//! the site's `max-moves` and each group's `max-unavailable`.
//!
//! `spread`: while the most and least utilized alive nodes of a site differ
//! by more than the site's `rebalance threshold`, move the smallest movable VM
//! from the fullest node to the emptiest. `pack`: empty the least utilized
//! non-empty node into the fullest nodes that can take its VMs. FT VMs do not
//! move (their secondary is their move).

use std::collections::BTreeMap;

use super::{Engine, Locator, Move, PlaceOptions, Placement, Verdict, finish, order};
use crate::model::{Availability, Model, Strategy};

/// Rebalances a placement. The result's `moves` lists what moved and why.
pub fn rebalance(
    model: &Model,
    placement: &Placement,
    options: &PlaceOptions,
    locator: Option<&Locator<'_>>,
) -> Placement {
    let _ = locator;
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
            let util =
                |e: &Engine<'_>, i: usize| e.nodes[i].utilization_with(super::Cost::default());
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
                movable.sort_by(|a, b| {
                    (u64::from(a.cpu) * a.memory_bytes)
                        .cmp(&(u64::from(b.cpu) * b.memory_bytes))
                        .then(a.name.cmp(&b.name))
                });
                for vm in movable {
                    for &dst in &targets {
                        engine.unassign(vm);
                        let fits = matches!(engine.verdict(vm, dst, None), Verdict::Fits);
                        let better = match site.scheduler.strategy {
                            Strategy::Spread => {
                                let c = super::cost(model, vm);
                                engine.nodes[dst].utilization_with(c)
                                    < engine.nodes[src].utilization_with(super::Cost::default())
                                        + 1e-9
                            }
                            Strategy::Pack => true,
                        };
                        if fits && better {
                            engine.assign(vm, dst, None);
                            moves.push(Move {
                                vm: vm.name.clone(),
                                from: engine.nodes[src].name.clone(),
                                to: engine.nodes[dst].name.clone(),
                                reason: format!("rebalance ({})", site.scheduler.strategy),
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
        unplaced,
        Some(placement),
    );
    out.moves = moves;
    out
}
