//! The packing part of `cairn bench` (issue 21): strategy `pack`, first-fit
//! decreasing and the exact search on two-dimensional instances whose
//! optimum is known, the improved pack's time on the big generated cloud, and
//! its stability.
//!
//! The instances come from `compiler::place::binpack::generate_instance`:
//! every node (64 vCPUs, 256 GiB) of an optimal packing is cut into 2 to 7
//! VMs at random points in each dimension independently, so the optimum is
//! the node count. The seeds are fixed here (1..=20 for 40 nodes,
//! 1001..=1020 for 200) and were not chosen after seeing results.

use std::time::Instant;

use compiler::Sources;
use compiler::place::binpack::{self, Dim2, Instance};
use compiler::place::{PlaceOptions, place};

const CAP: Dim2 = Dim2 { cpu: 64, mem: 256 };
const SEEDS_40: std::ops::RangeInclusive<u64> = 1..=20;
const SEEDS_200: std::ops::RangeInclusive<u64> = 1001..=1020;

/// Nodes used by one method on one instance (`None`: it left VMs unplaced).
struct Row {
    pack: Option<usize>,
    ffd: usize,
    exact: usize,
    exact_proven: bool,
}

fn run_instance(inst: &Instance) -> anyhow::Result<Row> {
    let sources = Sources::from_files([("p.kdl".to_owned(), binpack::instance_spec(inst))]);
    let c = compiler::compile(&sources);
    anyhow::ensure!(
        !c.has_errors(),
        "packing instance {} does not compile",
        inst.seed
    );
    let p = place(&c.model, &PlaceOptions::default(), None);
    let pack = p
        .unplaced
        .is_empty()
        .then(|| p.nodes.iter().filter(|n| n.vms > 0).count());
    // The pack placement as an assignment of the instance's items, the exact
    // search's incumbent.
    let node_of: std::collections::BTreeMap<&str, &str> = p
        .vms
        .iter()
        .map(|v| (v.name.as_str(), v.node.as_str()))
        .collect();
    let incumbent: Option<Vec<usize>> = pack.map(|_| {
        (0..inst.items.len())
            .map(|i| {
                let node = node_of[format!("v{i:05}").as_str()];
                node[1..].parse::<usize>().unwrap_or(usize::MAX)
            })
            .collect()
    });
    let ffd = binpack::bins_used(&binpack::first_fit_decreasing(&inst.items, CAP));
    let e = binpack::exact(&inst.items, CAP, incumbent, binpack::DEFAULT_WORK_LIMIT);
    Ok(Row {
        pack,
        ffd,
        exact: e.bins,
        exact_proven: e.proven,
    })
}

fn median_worst(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s.last().copied().unwrap_or(f64::NAN))
}

fn line(what: &str, used: &[Option<usize>], opt: usize) -> String {
    let extra: Vec<f64> = used
        .iter()
        .map(|u| u.map_or(f64::INFINITY, |u| u as f64 - opt as f64))
        .collect();
    let ratio: Vec<f64> = used
        .iter()
        .map(|u| u.map_or(f64::INFINITY, |u| u as f64 / opt as f64))
        .collect();
    let (em, ew) = median_worst(&extra);
    let (rm, rw) = median_worst(&ratio);
    format!(
        "{what:5} extra nodes median {em:>3} worst {ew:>3}   nodes/optimum median {rm:.3} worst {rw:.3}"
    )
}

/// Prints the packing figures.
pub fn run(nodes: usize, vms: usize) -> anyhow::Result<()> {
    println!(
        "packing   2-D instances, optimum known (nodes of {} vCPU / {} GiB cut into 2-7 VMs of mixed shapes), seeds fixed",
        CAP.cpu, CAP.mem
    );
    let (mut better, mut equal, mut worse) = (0, 0, 0);
    for (opt, seeds, goal) in [
        (40usize, SEEDS_40, "goal: pack at most +1 node"),
        (200, SEEDS_200, "goal: pack at most 1.02x"),
    ] {
        let mut rows = vec![];
        for seed in seeds {
            let inst = binpack::generate_instance(seed, opt, CAP);
            rows.push(run_instance(&inst)?);
        }
        for r in &rows {
            match r.pack {
                Some(p) if p < r.ffd => better += 1,
                Some(p) if p == r.ffd => equal += 1,
                _ => worse += 1,
            }
        }
        let finished = rows.iter().filter(|r| r.exact_proven).count();
        println!(
            "packing   {} instances of {opt} nodes ({goal}):",
            rows.len()
        );
        let pack: Vec<Option<usize>> = rows.iter().map(|r| r.pack).collect();
        let ffd: Vec<Option<usize>> = rows.iter().map(|r| Some(r.ffd)).collect();
        let exact: Vec<Option<usize>> = rows.iter().map(|r| Some(r.exact)).collect();
        println!("packing     {}", line("pack", &pack, opt));
        println!("packing     {}", line("ffd", &ffd, opt));
        println!(
            "packing     {}   (optimal, proven: {finished}/{}; work limit {} steps)",
            line("exact", &exact, opt),
            rows.len(),
            binpack::DEFAULT_WORK_LIMIT
        );
    }
    println!(
        "packing   pack vs ffd: fewer nodes on {better}, as many on {equal}, more on {worse} of {} instances",
        better + equal + worse
    );
    big_pack(nodes, vms)
}

/// The improved pack on the generated cloud (its sites switched to `pack`):
/// place time, and the VMs a one-VM change moves.
fn big_pack(nodes: usize, vms: usize) -> anyhow::Result<()> {
    let files: Vec<(String, String)> =
        compiler::generate::generate(&compiler::generate::GenConfig {
            nodes,
            vms,
            seed: 1,
        })
        .into_iter()
        .map(|(p, t)| (p, t.replace("strategy=\"spread\"", "strategy=\"pack\"")))
        .collect();
    let c = compiler::compile(&Sources::from_files(files));
    anyhow::ensure!(!c.has_errors(), "the generated repository does not compile");
    let mut times = vec![];
    let mut p = None;
    for _ in 0..3 {
        let t = Instant::now();
        p = Some(place(&c.model, &PlaceOptions::default(), None));
        times.push(t.elapsed().as_secs_f64());
    }
    let p = p.expect("placed");
    let mut changed = c.model.clone();
    let target = changed
        .vms
        .iter()
        .position(|v| v.group.is_none())
        .unwrap_or(0);
    std::sync::Arc::make_mut(&mut changed.vms[target]).cpu += 1;
    let name = changed.vms[target].name.clone();
    let p2 = place(
        &changed,
        &PlaceOptions {
            previous: Some(p.clone()),
            ..Default::default()
        },
        None,
    );
    let before: std::collections::BTreeMap<_, _> =
        p.vms.iter().map(|v| (&v.name, &v.node)).collect();
    let moved = p2
        .vms
        .iter()
        .filter(|v| v.name != name && before.get(&v.name) != Some(&&v.node))
        .count();
    let (m, _) = median_worst(&times);
    println!(
        "packing   pack on the {nodes}-node / {vms}-VM cloud: place median {:.1} ms (3 runs; {} placed, {} unplaced, {} nodes used); a one-VM change moves {moved} other VMs",
        m * 1e3,
        p.vms.len(),
        p.unplaced.len(),
        p.nodes.iter().filter(|n| n.vms > 0).count()
    );
    Ok(())
}
