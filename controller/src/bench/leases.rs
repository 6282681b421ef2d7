//! `cairn controller bench --leases`: what the lease service computes per node
//! renewal and per status read at `--nodes` nodes (issue 24), on a generated cluster
//! (500 nodes per site, as `cairn generate` makes them) with every node's grant
//! recorded, one node in 50 down ([`healthy_leases`]). No processes: the cost is
//! the controller's CPU.
//!
//! Every node renews every T/3 (1 s by default), and each renewal computes the
//! HA VMs on the move in its site ([`crate::fence_list::with_moving`]:
//! [`Leases::quiet_peers`], O(site)). Status, metrics and each drift check compute
//! every node's row ([`Leases::rows`], O(cluster)). Before, each renewal computed
//! every node's row, and each row counted its peers' reports one by one: O(site²)
//! per site per renewal ([`Leases::per_node_counts`], kept as the baseline). The
//! figures printed: the median of each, the CPU that one renewal period of every
//! node costs (as a share of one core), and the same at a tenth of the nodes
//! (linear: ×10; quadratic: ×100). Also a renewal's lookup of its node and site:
//! through the applied model's [`crate::lease::NodeIndex`], and by scanning every
//! site's nodes as the handler did before.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::lease::{DEFAULT_TTL, Leases};

/// A compiled synthetic cluster of `nodes` nodes (500 per site at most).
pub(crate) fn model_of(nodes: usize) -> compiler::Model {
    let files = compiler::generate::generate(&compiler::generate::GenConfig {
        nodes,
        vms: nodes,
        seed: 7,
    });
    let compilation = compiler::compile(&compiler::source::Sources::from_files(files));
    assert!(
        !compilation.has_errors(),
        "the generated cluster compiles: {:?}",
        compilation.diagnostics
    );
    compilation.model
}

/// Leases for every node of `model` but every 7th (never renewed): every 4th
/// node's grant 8-10 s old (past T + margin), the others' under 1.5 s (fresh, and
/// clear of the 2 s at which a peer turns quiet). Every 3rd node is unheard by most
/// of its peers, the others by a few. The controller started a minute ago.
#[cfg(test)]
pub(crate) fn leases_for(model: &compiler::Model, seed: u64) -> Leases {
    let now = Instant::now();
    let leases = Leases::new(DEFAULT_TTL)
        .started_at(now.checked_sub(Duration::from_secs(60)).unwrap_or(now));
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for site in &model.sites {
        for (i, node) in site.nodes.iter().enumerate() {
            if i % 7 == 3 {
                continue;
            }
            let age = Duration::from_millis(if i % 4 == 0 {
                8_000 + next() % 2_000
            } else {
                next() % 1_500
            });
            let unheard: BTreeSet<String> = site
                .nodes
                .iter()
                .enumerate()
                .filter(|(j, n)| {
                    n.name != node.name
                        && if j % 3 == 0 {
                            next() % 16 != 0
                        } else {
                            next() % 10 == 0
                        }
                })
                .map(|(_, n)| n.name.clone())
                .collect();
            leases.note_grant(&node.name, now.checked_sub(age).unwrap_or(now), unheard);
        }
    }
    leases
}

/// A cluster as it mostly is: every 50th node down for 9 s (unheard by all of its
/// site's peers, which name it in their reports), every other one renewed within
/// the last 1.5 s.
pub(crate) fn healthy_leases(model: &compiler::Model) -> Leases {
    let now = Instant::now();
    let leases = Leases::new(DEFAULT_TTL)
        .started_at(now.checked_sub(Duration::from_secs(60)).unwrap_or(now));
    for site in &model.sites {
        let down: BTreeSet<String> = site
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 50 == 0)
            .map(|(_, n)| n.name.clone())
            .collect();
        for (i, node) in site.nodes.iter().enumerate() {
            let (age, unheard) = if down.contains(&node.name) {
                (Duration::from_secs(9), BTreeSet::new())
            } else {
                (Duration::from_millis((i as u64 * 37) % 1_500), down.clone())
            };
            leases.note_grant(&node.name, now.checked_sub(age).unwrap_or(now), unheard);
        }
    }
    leases
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Figures {
    nodes: usize,
    /// A renewal's lookup of its node and site: now through the applied model's
    /// index, before by scanning every site's nodes.
    lookup: Duration,
    lookup_before: Duration,
    renewal: Duration,
    rows: Duration,
    /// A failure watcher's tick (every 100 ms) when no lease has lapsed: the
    /// check that skips the rows.
    quiet_tick: Duration,
    /// The rows' counts as computed before (per node over its peers): what each
    /// renewal computed before, at the least.
    before: Duration,
}

fn measure(nodes: usize, runs: usize) -> Figures {
    let model = model_of(nodes);
    let leases = healthy_leases(&model);
    let all: Vec<(&compiler::model::Site, &str)> = model
        .sites
        .iter()
        .flat_map(|s| s.nodes.iter().map(move |n| (s, n.name.as_str())))
        .collect();
    let index = crate::lease::NodeIndex::of(&model);
    // Every node renewed within the last 1.5 s: no lease lapsed.
    let quiet = Leases::new(DEFAULT_TTL);
    let now = Instant::now();
    for (i, (_, node)) in all.iter().enumerate() {
        let age = Duration::from_millis((i as u64 * 37) % 1_500);
        quiet.note_grant(node, now.checked_sub(age).unwrap_or(now), BTreeSet::new());
    }
    let mut quiet_tick = vec![];
    let mut lookup = vec![];
    let mut lookup_before = vec![];
    let mut renewal = vec![];
    let mut rows = vec![];
    let mut before = vec![];
    let mut sink = 0usize;
    for _ in 0..runs.max(1) {
        // One renewal of each of up to 1,000 nodes, per renewal.
        let sample: Vec<_> = all.iter().step_by((all.len() / 1_000).max(1)).collect();
        let started = Instant::now();
        for (site, node) in &sample {
            sink += leases.quiet_peers(site, node).len();
        }
        renewal.push(started.elapsed() / sample.len() as u32);
        let started = Instant::now();
        for (_, node) in &sample {
            sink += index.locate(&model, node).map_or(0, |(s, _)| s.nodes.len());
        }
        lookup.push(started.elapsed() / sample.len() as u32);
        let started = Instant::now();
        for (_, node) in &sample {
            sink += model
                .sites
                .iter()
                .find_map(|s| s.nodes.iter().find(|n| n.name == *node).map(|_| s))
                .map_or(0, |s| s.nodes.len());
        }
        lookup_before.push(started.elapsed() / sample.len() as u32);
        let started = Instant::now();
        sink += leases.rows(&model).len();
        rows.push(started.elapsed());
        let started = Instant::now();
        sink += quiet.lapsed_rows(&model).len();
        quiet_tick.push(started.elapsed());
        let started = Instant::now();
        sink += leases.per_node_counts(&model).len();
        before.push(started.elapsed());
    }
    std::hint::black_box(sink);
    Figures {
        nodes: all.len(),
        lookup: median(lookup),
        lookup_before: median(lookup_before),
        renewal: median(renewal),
        rows: median(rows),
        quiet_tick: median(quiet_tick),
        before: median(before),
    }
}

/// Prints the figures; exit code 0.
pub fn run(nodes: usize, runs: usize) -> anyhow::Result<u8> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let baseline = measure((nodes / 10).max(2), runs);
    let measured = measure(nodes, runs);
    for f in [&baseline, &measured] {
        // Every node renews once per T/3.
        let period = (DEFAULT_TTL / 3).as_secs_f64();
        let share = |per: Duration| per.as_secs_f64() * f.nodes as f64 / period * 100.0;
        println!(
            "{} nodes: per renewal now (HA VMs on the move in its site) median {:.4} ms, before (every node's row, its peers' reports counted per node) {:.2} ms; every node's row now (status, metrics, drift check) {:.2} ms; one renewal period of every node: now {:.2} % of a core, before {:.0} %",
            f.nodes,
            ms(f.renewal),
            ms(f.before),
            ms(f.rows),
            share(f.renewal),
            share(f.before)
        );
        // Each failure watcher ticks every 100 ms.
        let per_tick = |d: Duration| d.as_secs_f64() / 0.1 * 100.0;
        println!(
            "{} nodes: a failure watcher's tick with no lease lapsed: now {:.3} ms (the lapse check), before {:.2} ms (every node's row): {:.2} % of a core, before {:.1} %",
            f.nodes,
            ms(f.quiet_tick),
            ms(f.rows),
            per_tick(f.quiet_tick),
            per_tick(f.rows)
        );
        println!(
            "{} nodes: a renewal's node and site lookup now (the applied model's index) median {:.5} ms, before (every site's nodes scanned) {:.4} ms",
            f.nodes,
            ms(f.lookup),
            ms(f.lookup_before)
        );
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "ratio {} / {} nodes ({:.1}x the nodes): per renewal now {:.1}x, before {:.1}x; every row now {:.1}x",
        measured.nodes,
        baseline.nodes,
        measured.nodes as f64 / baseline.nodes as f64,
        ratio(measured.renewal, baseline.renewal),
        ratio(measured.before, baseline.before),
        ratio(measured.rows, baseline.rows)
    );
    println!(
        "at {} nodes, per renewal: before / now {:.0}x",
        measured.nodes,
        ratio(measured.before, measured.renewal)
    );
    println!(
        "lookup: ratio {} / {} nodes now {:.1}x, before {:.1}x; at {} nodes before / now {:.0}x",
        measured.nodes,
        baseline.nodes,
        ratio(measured.lookup, baseline.lookup),
        ratio(measured.lookup_before, baseline.lookup_before),
        measured.nodes,
        ratio(measured.lookup_before, measured.lookup)
    );
    Ok(0)
}
