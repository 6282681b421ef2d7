//! The incremental part of `cairn bench` (issue 24, item 6): a one-VM commit
//! compiled and placed by the sessions the controller keeps
//! (`compiler::session`), against the full compile and re-place of the same
//! commit as the baseline, in the same run. Every run checks that both give
//! the same model and placement.

use std::time::Instant;

use compiler::Sources;
use compiler::place::{PlaceOptions, place};
use compiler::session::{PlaceSession, Session};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The files with one VM's `cpu` changed: the first `cpu` line of the first
/// workload file, alternating between its value and one more.
fn one_vm_commit(files: &[(String, String)], run: usize) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = files.to_vec();
    let (_, text) = out
        .iter_mut()
        .find(|(p, _)| p.starts_with("workloads/"))
        .ok_or_else(|| anyhow::anyhow!("the generated repository has no workload file"))?;
    let at = text
        .find("\n    cpu ")
        .ok_or_else(|| anyhow::anyhow!("no `cpu` line in the workload file"))?
        + "\n    cpu ".len();
    let end = at + text[at..].find('\n').unwrap_or(text.len() - at);
    let cpu: u32 = text[at..end].trim().parse()?;
    if run.is_multiple_of(2) {
        text.replace_range(at..end, &(cpu + 1).to_string());
    }
    Ok(out)
}

/// Digests of a compilation (model JSON, diagnostics, spans) and of a
/// placement's JSON.
fn digest(c: &compiler::Compilation, p: &compiler::place::Placement) -> (u64, u64) {
    use std::hash::{Hash, Hasher};
    let hash = |text: &str| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    };
    let compiled = format!(
        "{}{:?}{:?}",
        compiler::model_json(&c.model),
        c.diagnostics,
        c.spans
    );
    (hash(&compiled), hash(&compiler::place::placement_json(p)))
}

/// Prints the incremental figures of `cairn bench`.
pub fn run(nodes: usize, vms: usize, runs: usize) -> anyhow::Result<()> {
    let files = compiler::generate::generate(&compiler::generate::GenConfig {
        nodes,
        vms,
        seed: 1,
    });
    let sources = Sources::from_files(files.clone());
    let mut session = Session::new();
    let mut places = PlaceSession::new();
    let (first, _) = session.compile(&sources);
    anyhow::ensure!(
        !first.has_errors(),
        "the generated repository does not compile"
    );
    // The controller's steady state: the cloud placed, and placed again from
    // that placement with nothing changed (each site's memo settled).
    let mut previous = place(&first.model, &PlaceOptions::default(), None);
    for _ in 0..2 {
        let options = PlaceOptions {
            previous: Some(previous.clone()),
            ..Default::default()
        };
        previous = places.place(&first.model, &options).0;
    }
    // The full runs first, then the sessions' runs over the same commits: a
    // session's run then follows the one before it, as in the controller,
    // not a full compile's allocations. Each run's outputs are compared by
    // digest (`digest`: the model JSON with the diagnostics and spans, and
    // the placement JSON).
    let (mut full_compile, mut full_place) = (vec![], vec![]);
    let (mut inc_compile, mut inc_place) = (vec![], vec![]);
    let mut digests = vec![];
    let runs = runs.max(1) * 2;
    for run in 1..=runs {
        let commit = Sources::from_files(one_vm_commit(&files, run)?);
        let options = PlaceOptions {
            previous: Some(previous.clone()),
            ..Default::default()
        };
        let t = Instant::now();
        let whole = compiler::compile(&commit);
        full_compile.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let whole_placed = place(&whole.model, &options, None);
        full_place.push(t.elapsed().as_secs_f64());
        digests.push(digest(&whole, &whole_placed));
        previous = whole_placed;
    }
    drop(previous);
    let mut last = None;
    for (run, full) in (1..=runs).zip(digests) {
        let commit = Sources::from_files(one_vm_commit(&files, run)?);
        let t = Instant::now();
        let (_, reuse) = session.compile_ref(&commit);
        let c = session.last().expect("compiled");
        inc_compile.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        // The controller's steady state: its previous placement is the
        // session's last result (`place_next` takes it as such, without
        // comparing the two), and the compile session says which VMs it
        // changed (the sites of the others are not compared VM by VM).
        let (p, place_reuse) = places.place_next_hinted(&c.model, session.changed_vms());
        inc_place.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            digest(c, p) == full,
            "the sessions' compilation or placement differs from the full compile's and placement's"
        );
        last = Some((reuse, place_reuse));
    }
    let (reuse, place_reuse) = last.expect("at least one run");
    // What a caller that keeps the compilation beside the session (the
    // controller keeps the model for its status) pays for its copy.
    let (mut copies, mut model_copies) = (vec![], vec![]);
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(session.last().expect("compiled").clone());
        copies.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(session.last().expect("compiled").model.clone());
        model_copies.push(t.elapsed().as_secs_f64());
    }
    let (copy, model_copy) = (median(copies), median(model_copies));
    let (fc, fp, ic, ip) = (
        median(full_compile),
        median(full_place),
        median(inc_compile),
        median(inc_place),
    );
    println!(
        "one-VM commit, full        compile + re-place (baseline)     median {:8.1} ms  (compile {:.1}, place {:.1}), {} runs",
        (fc + fp) * 1e3,
        fc * 1e3,
        fp * 1e3,
        runs
    );
    println!(
        "one-VM commit, incremental compile + place (sessions)        median {:8.1} ms  ({:.2}x baseline; compile {:.1} ms ({:.2}x), {} of {} files lowered, {}; place {:.1} ms ({:.2}x), {} of {} sites placed{})",
        (ic + ip) * 1e3,
        (ic + ip) / (fc + fp),
        ic * 1e3,
        ic / fc,
        reuse.lowered,
        reuse.lowered + reuse.reused,
        reuse
            .vms_rechecked
            .map(|n| format!("{n} VMs re-checked"))
            .unwrap_or_else(|| "the whole set checked".to_owned()),
        ip * 1e3,
        ip / fp,
        place_reuse.sites_placed,
        place_reuse.sites_placed + place_reuse.sites_reused,
        place_reuse
            .full
            .map(|why| format!("; whole placement: {why}"))
            .unwrap_or_default()
    );
    println!(
        "one-VM commit, a copy of the session's compilation median {:8.1} ms; of its model alone (what the controller's compile adds) {:.1} ms",
        copy * 1e3,
        model_copy * 1e3
    );
    Ok(())
}
