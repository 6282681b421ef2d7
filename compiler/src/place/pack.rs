//! Strategy `pack` in two dimensions: after the greedy pass, a bounded
//! local search empties nodes (issue 21).
//!
//! The greedy pass places VMs one at a time and never revisits a choice; on
//! VMs of mixed shapes (vCPU-heavy beside memory-heavy) it strands capacity
//! in one dimension. [`Search::empty_nodes`] then takes the least-filled node
//! whose VMs may all move, lifts them into a pool and re-inserts the pool into
//! the site's other used nodes: a direct insert where one fits (best fit:
//! the fullest node after), else a swap that puts the pool's largest VM on a
//! node in exchange for one or two smaller VMs there (the node gets fuller,
//! the pool smaller), until the pool is empty (the node is freed) or the
//! attempt runs out of steps (everything goes back). Every insert goes
//! through [`Engine::verdict`], so every hard constraint (affinities,
//! spread, overcommit) holds throughout.
//!
//! Only VMs placed anew in this run move; a VM kept from the previous
//! placement never does (stability). The search counts its work (candidate
//! checks) against a fixed limit, never a clock, and breaks every tie by
//! name: the same input gives the same bytes.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::binpack::{self, Dim2};
use super::{Cost, Engine, PlaceOptions, Placement, Verdict, cost, finish, order};
use crate::model::{Availability, Model, SlaClass, Strategy, Vm};

/// Work (candidate checks; a verdict counts [`VERDICT_WORK`]) the search
/// may spend on one site.
pub(crate) const WORK_LIMIT: u64 = 300_000;
const VERDICT_WORK: u64 = 16;
/// Steps of one attempt to empty a node, per VM it held at first.
const STEPS_PER_VM: usize = 24;

/// The local search's state over the movable VMs of one site.
pub(crate) struct Search<'e, 'm> {
    pub engine: &'e mut Engine<'m>,
    /// The site's alive nodes (engine indices), by name.
    nodes: Vec<usize>,
    vms: Vec<&'m Vm>,
    cost: Vec<Cost>,
    /// Each movable VM's node (None while in the pool).
    at: Vec<Option<usize>>,
    /// Movable VMs on each engine node.
    on: Vec<Vec<usize>>,
    /// Undo log: (VM, the node it was taken from, or None when it was put).
    log: Vec<(usize, Option<usize>)>,
    pub work: u64,
    pub limit: u64,
}

impl<'e, 'm> Search<'e, 'm> {
    /// A search over `movable` (each assigned to a node of `site`, no FT VM).
    pub(crate) fn new(engine: &'e mut Engine<'m>, site: &str, mut movable: Vec<&'m Vm>) -> Self {
        movable.sort_by(|a, b| a.name.cmp(&b.name));
        let mut nodes: Vec<usize> = engine
            .site_nodes
            .get(site)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&i| engine.nodes[i].alive)
                    .collect()
            })
            .unwrap_or_default();
        nodes.sort_by(|&a, &b| engine.nodes[a].name.cmp(&engine.nodes[b].name));
        let mut on = vec![vec![]; engine.nodes.len()];
        let at: Vec<Option<usize>> = movable
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let n = engine.assigned.get(&v.name).map(|&(n, _)| n);
                if let Some(n) = n {
                    on[n].push(i);
                }
                n
            })
            .collect();
        let cost = movable.iter().map(|v| cost(engine.model, v)).collect();
        Search {
            engine,
            nodes,
            vms: movable,
            cost,
            at,
            on,
            log: vec![],
            work: 0,
            limit: WORK_LIMIT,
        }
    }

    /// The size of VM `v` on node `n`: the sum of its fractions of the
    /// node's vCPUs and memory.
    fn size_on(&self, v: usize, n: usize) -> f64 {
        let cap = self.engine.nodes[n].cap;
        let c = self.cost[v];
        c.cpu_milli as f64 / cap.cpu_milli.max(1) as f64
            + c.memory as f64 / cap.memory.max(1) as f64
    }

    fn fill(&self, n: usize) -> f64 {
        let node = &self.engine.nodes[n];
        node.used.cpu_milli as f64 / node.cap.cpu_milli.max(1) as f64
            + node.used.memory as f64 / node.cap.memory.max(1) as f64
    }

    fn take(&mut self, v: usize) {
        let Some(n) = self.at[v] else { return };
        self.engine.unassign(self.vms[v]);
        self.on[n].retain(|&x| x != v);
        self.at[v] = None;
        self.log.push((v, Some(n)));
    }

    fn put(&mut self, v: usize, n: usize) {
        self.engine.assign(self.vms[v], n, None);
        self.on[n].push(v);
        self.at[v] = Some(n);
        self.log.push((v, None));
    }

    /// Undoes everything after log entry `mark`.
    fn revert(&mut self, mark: usize) {
        while self.log.len() > mark {
            let (v, from) = self.log.pop().expect("entry");
            match from {
                Some(n) => {
                    self.engine.assign(self.vms[v], n, None);
                    self.on[n].push(v);
                    self.at[v] = Some(n);
                }
                None => {
                    if let Some(n) = self.at[v] {
                        self.engine.unassign(self.vms[v]);
                        self.on[n].retain(|&x| x != v);
                        self.at[v] = None;
                    }
                }
            }
        }
    }

    /// Whether `v`'s cost fits node `n`'s free capacity plus `extra`.
    fn room(&mut self, v: usize, n: usize, extra: Cost) -> bool {
        self.work += 1;
        let free = self.engine.nodes[n].free();
        let c = self.cost[v];
        c.cpu_milli <= free.cpu_milli + extra.cpu_milli && c.memory <= free.memory + extra.memory
    }

    /// Every hard constraint of `v` on `n`, as things stand.
    fn allowed(&mut self, v: usize, n: usize) -> bool {
        self.work += VERDICT_WORK;
        matches!(self.engine.verdict(self.vms[v], n, None), Verdict::Fits)
    }

    fn cost_of(&self, vs: &[usize]) -> Cost {
        vs.iter().fold(Cost::default(), |a, &v| Cost {
            cpu_milli: a.cpu_milli + self.cost[v].cpu_milli,
            memory: a.memory + self.cost[v].memory,
        })
    }

    /// Nodes that may receive pool VMs: used alive nodes of the site except
    /// `closed`.
    fn targets(&self, closed: usize) -> Vec<usize> {
        self.nodes
            .iter()
            .copied()
            .filter(|&n| n != closed && self.engine.nodes[n].vms > 0)
            .collect()
    }

    /// Tries to empty node `b` of its movable VMs into the site's other used
    /// nodes. Keeps the result and returns true when `b` ends empty of them;
    /// otherwise undoes everything. `may_move` limits which VMs a swap may
    /// displace.
    pub(crate) fn empty(&mut self, b: usize, may_move: &dyn Fn(&Vm) -> bool) -> bool {
        let mark = self.log.len();
        let mut pool: Vec<usize> = self.on[b].clone();
        for &v in &pool {
            self.take(v);
        }
        let mut steps = STEPS_PER_VM * pool.len().max(1);
        let targets = self.targets(b);
        let ref_node = b;
        while !pool.is_empty() {
            if steps == 0 || self.work > self.limit {
                self.revert(mark);
                return false;
            }
            steps -= 1;
            pool.sort_by(|&x, &y| {
                self.size_on(y, ref_node)
                    .total_cmp(&self.size_on(x, ref_node))
                    .then(self.vms[x].name.cmp(&self.vms[y].name))
            });
            // A direct insert of any pool VM, largest first; else a swap.
            let inserted = (0..pool.len())
                .find_map(|at| self.best_insert(pool[at], &targets).map(|n| (at, n)));
            if let Some((at, n)) = inserted {
                self.put(pool[at], n);
                pool.remove(at);
                continue;
            }
            let swapped = (0..pool.len()).find_map(|at| {
                self.best_swap(pool[at], &targets, may_move)
                    .map(|out| (at, out))
            });
            match swapped {
                Some((at, out)) => {
                    pool.remove(at);
                    pool.extend(out);
                }
                None => {
                    self.revert(mark);
                    return false;
                }
            }
        }
        true
    }

    /// The node among `targets` where `p` fits that is fullest after.
    fn best_insert(&mut self, p: usize, targets: &[usize]) -> Option<usize> {
        let mut cands: Vec<(f64, usize)> = vec![];
        for &n in targets {
            if self.room(p, n, Cost::default()) {
                cands.push((self.fill(n) + self.size_on(p, n), n));
            }
        }
        cands.sort_by(|a, b| {
            b.0.total_cmp(&a.0).then_with(|| {
                self.engine.nodes[a.1]
                    .name
                    .cmp(&self.engine.nodes[b.1].name)
            })
        });
        cands
            .into_iter()
            .map(|(_, n)| n)
            .find(|&n| self.allowed(p, n))
    }

    /// Puts `p` on a target node in exchange for one or two smaller movable
    /// VMs there (in all smaller than `p` on that node), choosing the node
    /// fullest after; returns the VMs it displaced (now in the pool).
    fn best_swap(
        &mut self,
        p: usize,
        targets: &[usize],
        may_move: &dyn Fn(&Vm) -> bool,
    ) -> Option<Vec<usize>> {
        let mut cands: Vec<(f64, Swap)> = vec![];
        for &n in targets {
            let sp = self.size_on(p, n);
            let base = self.fill(n) + sp;
            let here: Vec<usize> = self.on[n]
                .iter()
                .copied()
                .filter(|&q| may_move(self.vms[q]))
                .collect();
            for (i, &q) in here.iter().enumerate() {
                let sq = self.size_on(q, n);
                if sq + 1e-9 < sp && self.room(p, n, self.cost[q]) {
                    cands.push((
                        base - sq,
                        Swap {
                            node: n,
                            out: [q, usize::MAX],
                        },
                    ));
                }
                for &r in &here[i + 1..] {
                    let sr = self.size_on(r, n);
                    if sq + sr + 1e-9 < sp && self.room(p, n, self.cost_of(&[q, r])) {
                        cands.push((
                            base - sq - sr,
                            Swap {
                                node: n,
                                out: [q, r],
                            },
                        ));
                    }
                }
            }
        }
        let names = |s: Swap| -> String {
            s.out
                .iter()
                .filter(|&&v| v != usize::MAX)
                .map(|&v| self.vms[v].name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut keyed: Vec<(f64, Swap, String)> =
            cands.into_iter().map(|(f, s)| (f, s, names(s))).collect();
        keyed.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then_with(|| {
                    self.engine.nodes[a.1.node]
                        .name
                        .cmp(&self.engine.nodes[b.1.node].name)
                })
                .then_with(|| a.2.cmp(&b.2))
        });
        for (_, s, _) in keyed {
            let mark = self.log.len();
            let out: Vec<usize> = s.out.iter().copied().filter(|&v| v != usize::MAX).collect();
            for &q in &out {
                self.take(q);
            }
            if self.allowed(p, s.node) {
                self.put(p, s.node);
                return Some(out);
            }
            self.revert(mark);
            if self.work > self.limit {
                return None;
            }
        }
        None
    }

    /// Nodes holding movable VMs and nothing else, least filled first (ties
    /// by name).
    fn emptiable(&self) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .nodes
            .iter()
            .copied()
            .filter(|&n| !self.on[n].is_empty() && self.engine.nodes[n].vms == self.on[n].len())
            .collect();
        out.sort_by(|&a, &b| {
            self.fill(a)
                .total_cmp(&self.fill(b))
                .then(self.engine.nodes[a].name.cmp(&self.engine.nodes[b].name))
        });
        out
    }

    /// Empties nodes while one can be emptied and work is left: each round
    /// tries the least-filled emptiable nodes in turn and starts over after
    /// a success. Returns how many nodes it emptied.
    pub(crate) fn empty_nodes(&mut self) -> usize {
        let mut emptied = 0;
        'rounds: loop {
            for b in self.emptiable() {
                if self.work > self.limit {
                    break 'rounds;
                }
                if self.empty(b, &|_| true) {
                    emptied += 1;
                    continue 'rounds;
                }
            }
            break;
        }
        emptied
    }
}

/// A swap: the node and the one or two VMs it gives up (`usize::MAX`: none).
#[derive(Debug, Clone, Copy)]
struct Swap {
    node: usize,
    out: [usize; 2],
}

/// Assigns the spot VMs of `pack` sites to their previous nodes where every
/// hard constraint still holds there (before the other VMs are placed anew);
/// returns them, to be unassigned again before the spot pass.
pub(crate) fn hold_spot<'m>(
    engine: &mut Engine<'m>,
    ordered: &[&'m Vm],
    previous: &BTreeMap<&str, &super::VmPlacement>,
) -> Vec<&'m Vm> {
    let mut held = vec![];
    for &vm in ordered {
        if vm.sla.class != SlaClass::Spot
            || vm.availability == Availability::Ft
            || engine.model.site(&vm.site).map(|s| s.scheduler.strategy) != Some(Strategy::Pack)
        {
            continue;
        }
        let Some(&node) = previous
            .get(vm.name.as_str())
            .and_then(|p| engine.node_index.get(&p.node))
        else {
            continue;
        };
        if engine.nodes[node].site == vm.site
            && matches!(engine.verdict(vm, node, None), Verdict::Fits)
        {
            engine.assign(vm, node, None);
            held.push(vm);
        }
    }
    held
}

/// The repack runs on sites with at most this many capacity-only VMs placed
/// anew (bin completion scans the VMs left at every step); larger sites get
/// the local search only.
pub(crate) const REPACK_MAX_VMS: usize = 1_500;

/// Search steps the bin-completion repack may spend on one site, and on
/// each count of nodes it tries.
pub(crate) const REPACK_WORK: u64 = 600_000;
const REPACK_PER_COUNT: u64 = 60_000;

/// Improves the packing of the VMs placed anew in one pass (`fresh`), site
/// by site, for sites whose strategy is `pack`: first [`repack`] (the VMs
/// whose only hard constraints are vCPUs and memory), then the local search
/// over all of them but FT VMs (their secondary is placed with them).
pub(crate) fn improve_fresh<'m>(engine: &mut Engine<'m>, fresh: &[&'m Vm]) {
    let model = engine.model;
    // The fresh VMs of each site, in their order, grouped once (not a pass over
    // every fresh VM per site).
    let mut by_site: BTreeMap<&str, Vec<&'m Vm>> = BTreeMap::new();
    for &v in fresh.iter().filter(|v| v.availability != Availability::Ft) {
        by_site.entry(v.site.as_str()).or_default().push(v);
    }
    for site in &model.sites {
        if site.scheduler.strategy != Strategy::Pack {
            continue;
        }
        let movable: Vec<&Vm> = by_site.get(site.name.as_str()).cloned().unwrap_or_default();
        if movable.is_empty() {
            continue;
        }
        let free: Vec<&Vm> = movable
            .iter()
            .copied()
            .filter(|v| capacity_only(engine, v))
            .collect();
        if free.len() <= REPACK_MAX_VMS {
            repack(engine, &site.name, &free, REPACK_WORK);
        }
        Search::new(engine, &site.name, movable).empty_nodes();
    }
}

/// Whether a VM's only hard constraints are vCPUs and memory: no hard
/// affinity rule, no spread group.
fn capacity_only(engine: &Engine<'_>, vm: &Vm) -> bool {
    let hard = engine
        .rules_of
        .get(&vm.name)
        .is_some_and(|rules| rules.iter().any(|&r| engine.model.affinities[r].hard));
    let spread = vm
        .group
        .as_deref()
        .is_some_and(|g| engine.group_scope.contains_key(g));
    !hard && !spread
}

/// Repacks `vms` (placed, capacity-only) of a site as a two-dimensional bin
/// packing over the site's alive nodes' free capacity, by bin completion
/// ([`binpack::search_bins`]): the nodes used anyway (by other VMs) first,
/// then the empty ones, largest first, ties by name. Takes the result only
/// when it uses fewer nodes than the placement had; otherwise everything
/// stays. Returns the nodes used and the proven lower bound when it
/// repacked.
pub(crate) fn repack<'m>(
    engine: &mut Engine<'m>,
    site: &str,
    vms: &[&'m Vm],
    work: u64,
) -> binpack::Exact {
    let mut nodes: Vec<usize> = engine
        .site_nodes
        .get(site)
        .map(|v| {
            v.iter()
                .copied()
                .filter(|&i| engine.nodes[i].alive && !engine.nodes[i].closed)
                .collect()
        })
        .unwrap_or_default();
    let used_before = nodes.iter().filter(|&&n| engine.nodes[n].vms > 0).count();
    let mut vms: Vec<&Vm> = vms.to_vec();
    vms.retain(|v| engine.assigned.contains_key(&v.name));
    let original: Vec<usize> = vms.iter().map(|v| engine.assigned[&v.name].0).collect();
    for v in &vms {
        engine.unassign(v);
    }
    let dim = |c: Cost| Dim2 {
        cpu: c.cpu_milli,
        mem: c.memory,
    };
    nodes.sort_by(|&a, &b| {
        let (na, nb) = (&engine.nodes[a], &engine.nodes[b]);
        (nb.vms > 0)
            .cmp(&(na.vms > 0))
            .then(dim(nb.cap).cmp(&dim(na.cap)))
            .then(na.name.cmp(&nb.name))
    });
    let preused = nodes.iter().filter(|&&n| engine.nodes[n].vms > 0).count();
    let caps: Vec<Dim2> = nodes.iter().map(|&n| dim(engine.nodes[n].free())).collect();
    let items: Vec<Dim2> = vms.iter().map(|v| dim(cost(engine.model, v))).collect();
    let total = items.iter().fold(Dim2::default(), |a, &b| Dim2 {
        cpu: a.cpu + b.cpu,
        mem: a.mem + b.mem,
    });
    // The fewest bins, in this order, whose room holds the total.
    let mut room = Dim2::default();
    let mut lb = 0;
    while lb < caps.len() && (lb < preused || !total.fits(room)) {
        room.cpu += caps[lb].cpu;
        room.mem += caps[lb].mem;
        lb += 1;
    }
    // Which empty nodes a packing uses matters not when they are alike.
    let provable = caps[preused.min(caps.len())..]
        .windows(2)
        .all(|w| w[0] == w[1]);
    let e = binpack::search_bins(
        &items,
        &caps,
        lb,
        used_before,
        REPACK_PER_COUNT.min(work),
        work,
        provable,
    );
    let restore = |engine: &mut Engine<'m>, upto: usize| {
        for v in &vms[..upto] {
            engine.unassign(v);
        }
        for (v, &n) in vms.iter().zip(&original) {
            engine.assign(v, n, None);
        }
    };
    let Some(assignment) = &e.assignment else {
        restore(engine, 0);
        return e;
    };
    for (i, v) in vms.iter().enumerate() {
        let n = nodes[assignment[i]];
        if !matches!(engine.verdict(v, n, None), Verdict::Fits) {
            restore(engine, i);
            return binpack::Exact {
                assignment: None,
                bins: used_before,
                ..e
            };
        }
        engine.assign(v, n, None);
    }
    e
}

/// How close a site's packing is to the best possible (`cairn place
/// --optimize`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SiteBound {
    /// Site.
    pub site: String,
    /// Nodes holding VMs after the exact search.
    pub nodes_used: usize,
    /// No placement that keeps the other VMs where they are uses fewer.
    pub lower_bound: usize,
    /// Whether `nodes_used` equals the bound (optimal, proven).
    pub proven_optimal: bool,
    /// VMs the search could move (placed anew, vCPU and memory constraints only).
    pub vms_searched: usize,
    /// Search steps spent, and the limit.
    pub work: u64,
    /// The work limit.
    pub work_limit: u64,
}

/// `cairn place --optimize`: the exact search ([`binpack::search_bins`]
/// with `work_limit` steps per site) over each `pack` site's VMs placed
/// anew whose only hard constraints are vCPUs and memory, against the other
/// VMs where they are; the gap to the proven lower bound per site.
pub fn optimize(
    model: &Model,
    placement: &Placement,
    options: &PlaceOptions,
    work_limit: u64,
) -> (Placement, Vec<SiteBound>) {
    let mut engine = Engine::new(model, options);
    engine.may_stay(placement);
    for vm in order(model) {
        if let Some(p) = placement.vms.iter().find(|v| v.name == vm.name) {
            let node = engine.node_index[&p.node];
            let secondary = p.secondary.as_ref().map(|s| engine.node_index[s]);
            engine.assign(vm, node, secondary);
        }
    }
    let kept = |vm: &Vm| {
        options
            .previous
            .as_ref()
            .is_some_and(|prev| prev.vm_node(&vm.name) == placement.vm_node(&vm.name))
    };
    let mut bounds = vec![];
    for site in &model.sites {
        if site.scheduler.strategy != Strategy::Pack {
            continue;
        }
        let movable: Vec<&Vm> = model
            .vms
            .iter()
            .map(|v| &**v)
            .filter(|v| v.site == site.name && v.availability != Availability::Ft)
            .filter(|v| engine.assigned.contains_key(&v.name) && !kept(v))
            .filter(|v| capacity_only(&engine, v))
            .collect();
        let e = repack(&mut engine, &site.name, &movable, work_limit);
        let nodes_used = engine.site_nodes.get(&site.name).map_or(0, |ns| {
            ns.iter().filter(|&&n| engine.nodes[n].vms > 0).count()
        });
        let lower_bound = e.lower_bound.min(nodes_used);
        bounds.push(SiteBound {
            site: site.name.clone(),
            nodes_used,
            lower_bound,
            proven_optimal: nodes_used == lower_bound,
            vms_searched: movable.len(),
            work: e.work,
            work_limit,
        });
    }
    let unplaced = placement
        .unplaced
        .iter()
        .map(|u| (u.name.clone(), u.reasons.clone()))
        .collect();
    let out = finish(
        model,
        &engine,
        placement.volumes.clone(),
        crate::ipam::allocate(&model.tenants, &model.vms, options.previous.as_ref()),
        unplaced,
        options.previous.as_ref(),
        crate::threads::second(),
    );
    (out, bounds)
}

/// `cairn place --rebalance --consolidate`: frees whole nodes of each `pack`
/// or `spread` site by moving their VMs into the site's other used nodes
/// (the local search's inserts and swaps, every hard constraint checked),
/// nodes with the fewest VMs first, within the site's `max-moves` and each
/// group's `max-unavailable`. FT VMs do not move. Returns the placement with
/// its moves and the nodes freed per site.
pub fn consolidate(
    model: &Model,
    placement: &Placement,
    options: &PlaceOptions,
) -> (Placement, Vec<(String, Vec<String>)>) {
    let mut engine = Engine::new(model, options);
    engine.may_stay(placement);
    for vm in order(model) {
        if let Some(p) = placement.vms.iter().find(|v| v.name == vm.name) {
            let node = engine.node_index[&p.node];
            let secondary = p.secondary.as_ref().map(|s| engine.node_index[s]);
            engine.assign(vm, node, secondary);
        }
    }
    let before: BTreeMap<String, usize> = engine
        .assigned
        .iter()
        .map(|(k, &(n, _))| (k.clone(), n))
        .collect();
    let mut freed_per_site = vec![];
    for site in &model.sites {
        let movable: Vec<&Vm> = model
            .vms
            .iter()
            .map(|v| &**v)
            .filter(|v| v.site == site.name && v.availability != Availability::Ft)
            .filter(|v| engine.assigned.contains_key(&v.name))
            .collect();
        let max_moves = site.scheduler.max_moves as usize;
        let mut search = Search::new(&mut engine, &site.name, movable);
        let mut freed = vec![];
        loop {
            let mut candidates = search.emptiable();
            candidates.sort_by_key(|&n| search.on[n].len());
            let mut progress = false;
            for b in candidates {
                if search.work > search.limit {
                    break;
                }
                let mark = search.log.len();
                if !search.empty(b, &|_| true) {
                    continue;
                }
                if within_budget(model, &search, &before, max_moves) {
                    freed.push(search.engine.nodes[b].name.clone());
                    progress = true;
                    break;
                }
                search.revert(mark);
            }
            if !progress {
                break;
            }
        }
        freed_per_site.push((site.name.clone(), freed));
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
    for m in &mut out.moves {
        m.reason = "consolidate: frees its node".to_owned();
    }
    (out, freed_per_site)
}

/// Whether the VMs moved so far stay within `max_moves` and each group's
/// `max-unavailable`.
fn within_budget(
    model: &Model,
    search: &Search<'_, '_>,
    before: &BTreeMap<String, usize>,
    max_moves: usize,
) -> bool {
    let mut moved = 0;
    let mut per_group: BTreeMap<&str, u32> = BTreeMap::new();
    for (v, at) in search.vms.iter().zip(&search.at) {
        if before.get(&v.name) == at.as_ref() {
            continue;
        }
        moved += 1;
        if let Some(g) = v.group.as_deref() {
            *per_group.entry(g).or_default() += 1;
        }
    }
    moved <= max_moves
        && per_group.iter().all(|(g, &n)| {
            let limit = model
                .vm_groups
                .iter()
                .find(|x| x.name == *g)
                .map_or(1, |x| x.max_unavailable);
            n <= limit
        })
}
