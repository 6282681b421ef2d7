//! Two-dimensional (vCPU, memory) bin packing without the placement engine:
//! the benchmark's instances with a known optimum, first-fit decreasing, and
//! the exact search (bin completion with a work limit) behind
//! `cairn place --optimize`.
//!
//! Everything here is deterministic: no clock, no threads, no hashing; ties
//! break by index.

use std::fmt::Write as _;

use crate::generate::Rng;

/// An amount in both dimensions (milli-vCPUs or vCPUs, bytes or GiB: the
/// caller's units, the same for items and bins).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dim2 {
    /// vCPUs.
    pub cpu: u64,
    /// Memory.
    pub mem: u64,
}

impl Dim2 {
    /// Whether `self` fits into `free`.
    pub fn fits(self, free: Dim2) -> bool {
        self.cpu <= free.cpu && self.mem <= free.mem
    }

    fn sub(self, o: Dim2) -> Dim2 {
        Dim2 {
            cpu: self.cpu - o.cpu,
            mem: self.mem - o.mem,
        }
    }

    fn add(self, o: Dim2) -> Dim2 {
        Dim2 {
            cpu: self.cpu + o.cpu,
            mem: self.mem + o.mem,
        }
    }

    /// Its size relative to a capacity: the sum of both fractions.
    pub fn size(self, cap: Dim2) -> f64 {
        self.cpu as f64 / cap.cpu.max(1) as f64 + self.mem as f64 / cap.mem.max(1) as f64
    }
}

/// A packing instance whose optimum is known: `optimum` bins of capacity
/// `cap`, each split into pieces that fill it exactly in both dimensions.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The seed it was drawn from.
    pub seed: u64,
    /// Bins in an optimal packing (every one exactly full).
    pub optimum: usize,
    /// The capacity of every bin.
    pub cap: Dim2,
    /// The items, shuffled.
    pub items: Vec<Dim2>,
}

/// Draws an instance: each of `optimum` bins of `cap` is cut into 2 to 7
/// pieces, its vCPUs and its memory at independent random points, and the
/// pieces of both dimensions paired at random, so shapes mix (small vCPU with
/// large memory and the reverse). Each piece has at least one unit of each.
pub fn generate_instance(seed: u64, optimum: usize, cap: Dim2) -> Instance {
    let mut rng = Rng(seed.wrapping_mul(0xA076_1D64_78BD_642F) ^ 0x5EED);
    let mut items = vec![];
    let cuts = |rng: &mut Rng, total: u64, k: usize| -> Vec<u64> {
        // k - 1 distinct cut points in 1..total.
        let mut points: Vec<u64> = vec![];
        while points.len() < k - 1 {
            let p = 1 + rng.below(total - 1);
            if !points.contains(&p) {
                points.push(p);
            }
        }
        points.sort_unstable();
        let mut out = vec![];
        let mut last = 0;
        for p in points.into_iter().chain([total]) {
            out.push(p - last);
            last = p;
        }
        out
    };
    for _ in 0..optimum {
        let max_k = 7.min(cap.cpu.min(cap.mem)) as usize;
        let k = 2 + rng.below(max_k as u64 - 1) as usize;
        let cpu = cuts(&mut rng, cap.cpu, k);
        let mut mem = cuts(&mut rng, cap.mem, k);
        for i in (1..k).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            mem.swap(i, j);
        }
        items.extend(cpu.into_iter().zip(mem).map(|(cpu, mem)| Dim2 { cpu, mem }));
    }
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
    Instance {
        seed,
        optimum,
        cap,
        items,
    }
}

/// The spec of an instance: `optimum` + 10% + 2 identical nodes (`b0000`…)
/// in one site `s` with strategy `pack`, one VM per item (`v00000`…: the
/// item's vCPUs, and its memory in GiB).
pub fn instance_spec(inst: &Instance) -> String {
    let mut spec = format!(
        "node-class \"bin\" {{\n    cpu {}\n    memory \"{}GiB\"\n}}\nsite \"s\" {{\n    scheduler strategy=\"pack\"\n    rack \"r\" {{\n",
        inst.cap.cpu, inst.cap.mem
    );
    let nodes = inst.optimum + inst.optimum / 10 + 2;
    for b in 0..nodes {
        let _ = writeln!(
            spec,
            "        node \"b{b:04}\" class=\"bin\" address=\"127.0.0.1:{}\"",
            10000 + b
        );
    }
    spec.push_str("    }\n}\ntenant \"t\"\nimage \"tiny\" builtin=\"cairn-guest\"\n");
    for (i, it) in inst.items.iter().enumerate() {
        let _ = writeln!(
            spec,
            "vm \"v{i:05}\" tenant=\"t\" site=\"s\" {{\n    cpu {}\n    memory \"{}GiB\"\n    image \"tiny\"\n}}",
            it.cpu, it.mem
        );
    }
    spec
}

/// The order both FFD and the exact search take items in: larger (sum of
/// both fractions of the capacity) first, ties by index.
pub fn decreasing(items: &[Dim2], cap: Dim2) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| {
        items[b]
            .size(cap)
            .total_cmp(&items[a].size(cap))
            .then(a.cmp(&b))
    });
    order
}

/// First-fit decreasing into identical bins of `cap`: the bin of each item
/// (bins numbered in the order they were opened).
pub fn first_fit_decreasing(items: &[Dim2], cap: Dim2) -> Vec<usize> {
    let mut free: Vec<Dim2> = vec![];
    let mut bin = vec![0; items.len()];
    for i in decreasing(items, cap) {
        let it = items[i];
        let b = match free.iter().position(|f| it.fits(*f)) {
            Some(b) => b,
            None => {
                free.push(cap);
                free.len() - 1
            }
        };
        free[b] = free[b].sub(it);
        bin[i] = b;
    }
    bin
}

/// Bins used by an assignment (item → bin).
pub fn bins_used(assignment: &[usize]) -> usize {
    let mut seen: Vec<usize> = assignment.to_vec();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// A lower bound on the bins of `cap` that `items` need: the larger of the
/// two dimensions' totals divided by the capacity, and the number of items
/// larger than half a bin in one dimension (no two of them share a bin).
pub fn lower_bound(items: &[Dim2], cap: Dim2) -> usize {
    let total = items.iter().fold(Dim2::default(), |a, &b| a.add(b));
    let by_cpu = total.cpu.div_ceil(cap.cpu.max(1));
    let by_mem = total.mem.div_ceil(cap.mem.max(1));
    let big_cpu = items.iter().filter(|i| 2 * i.cpu > cap.cpu).count();
    let big_mem = items.iter().filter(|i| 2 * i.mem > cap.mem).count();
    (by_cpu.max(by_mem) as usize).max(big_cpu).max(big_mem)
}

/// The outcome of the exact search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exact {
    /// The best assignment found (item → bin index), if any.
    pub assignment: Option<Vec<usize>>,
    /// Bins it uses (`usize::MAX` without an assignment).
    pub bins: usize,
    /// The proven lower bound: no packing uses fewer bins.
    pub lower_bound: usize,
    /// Whether `bins == lower_bound`: optimal, proven.
    pub proven: bool,
    /// Search steps spent.
    pub work: u64,
}

/// What the exact search may spend: a count of search steps (one per subset
/// of items tried in a bin), never a wall-clock time, so that the same input
/// gives the same answer on any machine.
pub const DEFAULT_WORK_LIMIT: u64 = 2_000_000;

/// Exact search for the fewest bins of `cap` holding `items`: bin
/// completion (Korf): bins are filled one at a time with a maximal set of
/// items that includes the largest one left, and a packing into `k` bins
/// may waste at most `k × cap − total` in each dimension, which prunes hard
/// when the bound is tight. Tries `k` = lower bound upward to below the
/// incumbent (the caller's packing, e.g. the heuristic's); each `k` whose
/// search completes without a packing raises the proven bound.
pub fn exact(items: &[Dim2], cap: Dim2, incumbent: Option<Vec<usize>>, work_limit: u64) -> Exact {
    let caps = vec![cap; items.len().max(1)];
    let lb = lower_bound(items, cap);
    let below = incumbent.as_deref().map_or(usize::MAX, bins_used);
    let mut e = search_bins(items, &caps, lb, below, work_limit / 4, work_limit, true);
    if e.assignment.is_none() {
        e.assignment = incumbent;
    }
    e
}

/// Packs `items` into the fewest of `caps` (each bin's free capacity), used
/// in order: the first `lb` at least (callers put the bins that are used
/// anyway first, then the empty ones largest first), fewer than `below`.
/// Each count of bins from `lb` up gets at most `per_count` steps, all of
/// them at most `work_limit`; a count whose search runs out is left open
/// (not proven) and the next is tried. `provable`: whether a search that completes without a packing
/// proves that count infeasible (true when the bins after the first `lb`
/// are identical, so which of them is used does not matter).
pub fn search_bins(
    items: &[Dim2],
    caps: &[Dim2],
    lb: usize,
    below: usize,
    per_count: u64,
    work_limit: u64,
    provable: bool,
) -> Exact {
    let mut best_bins = below;
    let mut best = None;
    let mut lb = lb;
    let reference = caps.iter().copied().max().unwrap_or_default();
    let order = decreasing(items, reference);
    let mut search = Completion {
        items,
        caps,
        order: &order,
        work: 0,
        limit: work_limit,
        bin_of: vec![usize::MAX; items.len()],
    };
    let mut k = lb;
    let mut open = false;
    while k < best_bins && k <= caps.len() && search.work < work_limit {
        search.limit = (search.work + per_count).min(work_limit);
        match search.run(k) {
            Some(true) => {
                best = Some(search.bin_of.clone());
                best_bins = k;
            }
            // Proven infeasible: the bound rises, unless a smaller count
            // is still open.
            Some(false) if provable && !open => lb = k + 1,
            Some(false) => {}
            None => open = true,
        }
        k += 1;
    }
    Exact {
        proven: best_bins == lb,
        bins: best_bins,
        assignment: best,
        lower_bound: lb.min(best_bins),
        work: search.work,
    }
}

struct Completion<'a> {
    items: &'a [Dim2],
    caps: &'a [Dim2],
    order: &'a [usize],
    work: u64,
    limit: u64,
    bin_of: Vec<usize>,
}

impl Completion<'_> {
    /// Whether the items fit into `k` bins; `None` when the work ran out.
    fn run(&mut self, k: usize) -> Option<bool> {
        let total = self.items.iter().fold(Dim2::default(), |a, &b| a.add(b));
        let room = self.caps[..k]
            .iter()
            .fold(Dim2::default(), |a, &b| a.add(b));
        if !total.fits(room) {
            return Some(false);
        }
        let waste = room.sub(total);
        self.bin_of.iter_mut().for_each(|b| *b = usize::MAX);
        let left: Vec<usize> = self.order.to_vec();
        self.bins(0, k, &left, waste)
    }

    /// Fills bin `bin` of `k` with a maximal set of `left` (in decreasing
    /// order) including its first item, within the waste left, and recurses
    /// into the next bin for each such set in turn.
    fn bins(&mut self, bin: usize, k: usize, left: &[usize], waste: Dim2) -> Option<bool> {
        if left.is_empty() {
            return Some(true);
        }
        if bin == k {
            return Some(false);
        }
        let cap = self.caps[bin];
        let mut fill = Fill {
            bin,
            k,
            rest: left,
            waste,
        };
        // When every bin left is like this one, the largest item left may
        // as well go here (symmetry).
        let first = left[0];
        if self.caps[bin..k].iter().all(|&c| c == cap) && self.items[first].fits(cap) {
            fill.rest = &left[1..];
            self.bin_of[first] = bin;
            let found = self.subsets(&mut fill, 0, cap.sub(self.items[first]))?;
            if !found {
                self.bin_of[first] = usize::MAX;
            }
            return Some(found);
        }
        self.subsets(&mut fill, 0, cap)
    }

    /// Every maximal set of items (the bin's first, those of `fill.rest`
    /// marked with the bin, and more of `fill.rest[at..]`) whose slack stays
    /// within the waste, largest items first; of equal items the first is
    /// tried only (no duplicate sets). Each set found goes on to the next
    /// bin at once.
    fn subsets(&mut self, fill: &mut Fill<'_>, at: usize, free: Dim2) -> Option<bool> {
        self.work += 1;
        if self.work > self.limit {
            return None;
        }
        let rest = fill.rest;
        let open = |s: &Self, i: usize| s.bin_of[i] == usize::MAX && s.items[i].fits(free);
        // Even every item left could not bring the slack within the waste.
        let need = Dim2 {
            cpu: free.cpu.saturating_sub(fill.waste.cpu),
            mem: free.mem.saturating_sub(fill.waste.mem),
        };
        let mut reachable = Dim2::default();
        for &i in &rest[at..] {
            if need.fits(reachable) {
                break;
            }
            if open(self, i) {
                reachable = reachable.add(self.items[i]);
            }
        }
        if !need.fits(reachable) {
            return Some(false);
        }
        if !rest.iter().any(|&i| open(self, i)) {
            // Maximal: nothing else fits. Within the waste, on to the next bin.
            if !free.fits(fill.waste) {
                return Some(false);
            }
            let remaining: Vec<usize> = rest
                .iter()
                .copied()
                .filter(|&r| self.bin_of[r] == usize::MAX)
                .collect();
            return self.bins(fill.bin + 1, fill.k, &remaining, fill.waste.sub(free));
        }
        let mut tried: Option<Dim2> = None;
        for (j, &i) in rest.iter().enumerate().skip(at) {
            let it = self.items[i];
            if !open(self, i) || tried == Some(it) {
                continue;
            }
            tried = Some(it);
            self.bin_of[i] = fill.bin;
            if self.subsets(fill, j + 1, free.sub(it))? {
                return Some(true);
            }
            self.bin_of[i] = usize::MAX;
        }
        Some(false)
    }
}

/// One bin being filled by [`Completion::subsets`].
struct Fill<'a> {
    bin: usize,
    k: usize,
    /// The items left after the bin's first, in decreasing order.
    rest: &'a [usize],
    /// What may still be wasted, in each dimension.
    waste: Dim2,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Dim2 = Dim2 { cpu: 64, mem: 256 };

    #[test]
    fn instances_fill_their_bins_exactly_and_are_reproducible() {
        let a = generate_instance(7, 40, CAP);
        let b = generate_instance(7, 40, CAP);
        assert_eq!(a.items, b.items);
        let total = a.items.iter().fold(Dim2::default(), |x, &y| x.add(y));
        assert_eq!(
            total,
            Dim2 {
                cpu: 64 * 40,
                mem: 256 * 40
            }
        );
        assert!(a.items.iter().all(|i| i.cpu >= 1 && i.mem >= 1));
        assert_eq!(lower_bound(&a.items, CAP), 40);
        assert_ne!(a.items, generate_instance(8, 40, CAP).items);
    }

    #[test]
    fn first_fit_decreasing_respects_capacity() {
        let inst = generate_instance(3, 40, CAP);
        let bins = first_fit_decreasing(&inst.items, CAP);
        let mut load = vec![Dim2::default(); bins_used(&bins)];
        for (i, &b) in bins.iter().enumerate() {
            load[b] = load[b].add(inst.items[i]);
        }
        assert!(load.iter().all(|l| l.fits(CAP)));
        assert!(bins_used(&bins) >= 40);
    }

    #[test]
    fn exact_finds_the_optimum_of_small_instances_and_proves_it() {
        for seed in 1..=5 {
            let inst = generate_instance(seed, 8, CAP);
            let ffd = first_fit_decreasing(&inst.items, CAP);
            let e = exact(&inst.items, CAP, Some(ffd), DEFAULT_WORK_LIMIT);
            assert!(e.proven, "seed {seed}: {e:?}");
            assert_eq!(e.bins, 8);
            let a = e.assignment.expect("an assignment");
            let mut load = vec![Dim2::default(); 8];
            for (i, &b) in a.iter().enumerate() {
                load[b] = load[b].add(inst.items[i]);
            }
            assert!(load.iter().all(|l| *l == CAP), "seed {seed}: {load:?}");
        }
    }

    #[test]
    fn exact_proves_a_bound_above_the_volume_bound() {
        // Five items of 22 vCPUs: the bounds say 2 bins, the truth is 3.
        let items = vec![Dim2 { cpu: 22, mem: 1 }; 5];
        assert_eq!(lower_bound(&items, CAP), 2);
        let e = exact(&items, CAP, None, 1000);
        assert_eq!((e.bins, e.lower_bound, e.proven), (3, 3, true));
        // With no work at all nothing is proven beyond the bound.
        let inst = generate_instance(1, 40, CAP);
        let ffd = first_fit_decreasing(&inst.items, CAP);
        let used = bins_used(&ffd);
        let e = exact(&inst.items, CAP, Some(ffd), 0);
        assert_eq!((e.bins, e.lower_bound), (used, 40));
        assert_eq!(e.proven, used == 40);
    }
}
