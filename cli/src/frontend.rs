//! Commands that need no cluster: validate, fmt, compile, schema, gen, bench.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use compiler::diag::{self, Diagnostic};
use compiler::place::{Locator, PlaceOptions, Placement};
use compiler::units::human_size as format_size;
use compiler::{Compilation, Sources};

use crate::cli::Format;

/// Loads sources from a directory or a git revision.
pub fn load(dir: &Path, rev: Option<&str>) -> anyhow::Result<Sources> {
    let sources = match rev {
        Some(rev) => Sources::load_git(dir, rev)?,
        None => Sources::load_dir(dir)?,
    };
    Ok(sources)
}

/// Specs loaded and compiled: what every command on the specs starts from.
#[derive(Debug)]
pub struct Compiled {
    /// The spec files.
    pub sources: Sources,
    /// The model, spans and diagnostics compiled from them.
    pub compilation: Compilation,
}

impl Compiled {
    /// Compiles loaded sources.
    pub fn new(sources: Sources) -> Compiled {
        let compilation = compiler::compile(&sources);
        Compiled {
            sources,
            compilation,
        }
    }

    /// Loads the spec root `dir` (as it is in git revision `rev`, else the
    /// working tree) and compiles it; prints nothing.
    pub fn load(dir: &Path, rev: Option<&str>) -> anyhow::Result<Compiled> {
        Ok(Compiled::new(load(dir, rev)?))
    }

    /// What placement reasons use to name spec files and lines.
    pub fn locator(&self) -> Locator<'_> {
        Locator {
            spans: &self.compilation.spans,
            sources: &self.sources,
        }
    }

    /// The solver's placement of the model.
    pub fn place(&self, options: &PlaceOptions) -> Placement {
        compiler::place::place(&self.compilation.model, options, Some(&self.locator()))
    }
}

/// Whether [`compile_specs`] prints the warnings of specs that compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warnings {
    /// Print them (on stderr, like errors).
    Print,
    /// Print nothing unless there is an error.
    Quiet,
}

/// Loads and compiles the spec root `dir` (at git revision `rev`, else the
/// working tree), printing the diagnostics on stderr as text: all of them
/// when there is an error, followed by `refused` (what was not done because
/// of the errors; nothing when empty), and the warnings of specs that compile
/// only with [`Warnings::Print`]. `Err(1)`, the exit code, when the specs
/// have errors.
pub fn compile_specs(
    dir: &Path,
    rev: Option<&str>,
    warnings: Warnings,
    refused: &str,
) -> anyhow::Result<Result<Compiled, u8>> {
    let compiled = Compiled::load(dir, rev)?;
    let c = &compiled.compilation;
    if c.has_errors() || warnings == Warnings::Print {
        print_diagnostics(&compiled.sources, &c.diagnostics, Format::Text)?;
    }
    if !c.has_errors() {
        return Ok(Ok(compiled));
    }
    if !refused.is_empty() {
        eprintln!("{refused}");
    }
    Ok(Err(1))
}

fn print_diagnostics(
    sources: &Sources,
    diagnostics: &[Diagnostic],
    format: Format,
) -> anyhow::Result<()> {
    match format {
        Format::Text => {
            let mut err = std::io::stderr().lock();
            err.write_all(diag::render_all(sources, diagnostics).as_bytes())?;
        }
        Format::Json => {
            let list: Vec<_> = diagnostics
                .iter()
                .map(|d| diag::to_json(sources, d))
                .collect();
            let doc = serde_json::to_value(diag::DiagnosticsJson {
                format_version: diag::FORMAT_VERSION,
                diagnostics: list,
            })?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
    }
    Ok(())
}

/// `cairn validate`.
pub fn validate(dir: &Path, rev: Option<&str>, format: Format) -> anyhow::Result<u8> {
    let mut compiled = Compiled::load(dir, rev)?;
    if !compiled.compilation.has_errors() {
        // Placement feasibility: every VM that no node can take is an error
        // (a warning for spot VMs), explained constraint by constraint.
        let placement = compiled.place(&PlaceOptions::default());
        let extra = crate::placecmd::unplaced_diagnostics(&compiled.compilation, &placement);
        compiled.compilation.diagnostics.extend(extra);
        compiler::diag::sort(&compiled.sources, &mut compiled.compilation.diagnostics);
    }
    let Compiled {
        sources,
        compilation: c,
    } = compiled;
    print_diagnostics(&sources, &c.diagnostics, format)?;
    if c.has_errors() {
        return Ok(1);
    }
    if format == Format::Text {
        let m = &c.model;
        let volumes: usize = m.vms.iter().map(|v| v.disks.len()).sum();
        let nodes: usize = m.sites.iter().map(|s| s.nodes.len()).sum();
        println!(
            "ok: {} spec {}, {} {}, {} {}, {} {}, {} {}, {} {}",
            sources.len(),
            diag::plural(sources.len(), "file"),
            m.sites.len(),
            diag::plural(m.sites.len(), "site"),
            nodes,
            diag::plural(nodes, "node"),
            m.tenants.len(),
            diag::plural(m.tenants.len(), "tenant"),
            m.vms.len(),
            diag::plural(m.vms.len(), "VM"),
            volumes,
            diag::plural(volumes, "volume"),
        );
    }
    Ok(0)
}

/// `cairn fmt`.
pub fn fmt(dir: &Path, check: bool) -> anyhow::Result<u8> {
    let sources = Sources::load_dir(dir)?;
    let mut failed = false;
    let mut changed = vec![];
    for (id, file) in sources.files() {
        match compiler::fmt::format_text(id, &file.text) {
            Ok(text) if text == *file.text => {}
            Ok(text) => {
                changed.push(file.path.clone());
                if !check {
                    let path = dir.join(&file.path);
                    let tmp = path.with_extension("kdl.cairn-fmt");
                    std::fs::write(&tmp, text)
                        .with_context(|| format!("cannot write {}", tmp.display()))?;
                    std::fs::rename(&tmp, &path)
                        .with_context(|| format!("cannot replace {}", path.display()))?;
                }
            }
            Err(diags) => {
                failed = true;
                eprint!("{}", diag::render_all(&sources, &diags));
            }
        }
    }
    let mut out = std::io::stdout().lock();
    for path in &changed {
        if check {
            writeln!(out, "would reformat {path}")?;
        } else {
            writeln!(out, "formatted {path}")?;
        }
    }
    if failed || (check && !changed.is_empty()) {
        return Ok(1);
    }
    Ok(0)
}

/// `cairn compile`.
pub fn compile(dir: &Path, rev: Option<&str>, format: Format) -> anyhow::Result<u8> {
    let c = match compile_specs(dir, rev, Warnings::Print, "")? {
        Ok(compiled) => compiled.compilation,
        Err(code) => return Ok(code),
    };
    let text = match format {
        Format::Json => compiler::model_json(&c.model),
        Format::Text => model_text(&c),
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(0)
}

/// The text view of a compiled model.
pub fn model_text(c: &Compilation) -> String {
    use std::fmt::Write as _;
    let m = &c.model;
    let mut s = String::new();
    for site in &m.sites {
        let _ = writeln!(
            s,
            "site {}: {} {} in {} {}, {} CPUs and {} allocatable, strategy {}, ha-reserve {}",
            site.name,
            site.nodes.len(),
            diag::plural(site.nodes.len(), "node"),
            site.racks.len(),
            diag::plural(site.racks.len(), "rack"),
            site.allocatable.cpu,
            format_size(site.allocatable.memory_bytes),
            site.scheduler.strategy,
            site.ha_reserve_nodes
        );
        for b in &site.bonds {
            let classes: Vec<String> = b.traffic.iter().map(|t| t.text()).collect();
            let _ = writeln!(
                s,
                "  bond {} {} over {} = {}: {}",
                b.name,
                b.mode,
                b.members.join("+"),
                compiler::units::format_bandwidth(b.capacity_bps),
                classes.join(", ")
            );
        }
        for p in &site.pools {
            let _ = writeln!(
                s,
                "  pool {}: {} disks of class {}, {} replicas across {} {}s, stripe {} x {}, {} provisionable",
                p.name,
                p.disks.len(),
                p.disk_class,
                p.replicas,
                p.failure_domains.len(),
                p.failure_domain,
                p.stripe_width,
                format_size(p.stripe_unit_bytes),
                format_size(p.provisionable_bytes)
            );
        }
    }
    for t in &m.tenants {
        let q = t.quota.as_ref();
        let of = |used: String, limit: Option<String>| match limit {
            Some(l) => format!("{used}/{l}"),
            None => used,
        };
        let _ = writeln!(
            s,
            "tenant {}: {} VMs, {} vCPUs, {} memory, {} storage",
            t.name,
            of(
                t.usage.vms.to_string(),
                q.and_then(|q| q.vms).map(|v| v.to_string())
            ),
            of(
                t.usage.vcpus.to_string(),
                q.and_then(|q| q.vcpus).map(|v| v.to_string())
            ),
            of(
                format_size(t.usage.memory_bytes),
                q.and_then(|q| q.memory_bytes).map(format_size)
            ),
            of(
                format_size(t.usage.storage_bytes),
                q.and_then(|q| q.storage_bytes).map(format_size)
            ),
        );
        for n in &t.networks {
            let _ = writeln!(
                s,
                "  network {} in {}: {} gateway {} vni {}{}",
                n.name,
                n.site,
                n.cidr,
                n.gateway.as_deref().unwrap_or("none"),
                n.vni,
                if n.external { ", external" } else { "" }
            );
        }
    }
    let width = m.vms.iter().map(|v| v.name.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(
        s,
        "{:width$}  {:10} {:8} {:>4} {:>8}  {:24} {:5} {:>5}  ADDRESSES",
        "VM", "TENANT", "SITE", "CPU", "MEMORY", "SLA", "AVAIL", "DISKS"
    );
    for v in &m.vms {
        let addresses: Vec<String> = v
            .nics
            .iter()
            .map(|n| format!("{}={}", n.network, n.address.as_deref().unwrap_or("none")))
            .collect();
        let addresses = if addresses.is_empty() {
            "-".to_owned()
        } else {
            addresses.join(" ")
        };
        let _ = writeln!(
            s,
            "{:width$}  {:10} {:8} {:>4} {:>8}  {:24} {:5} {:>5}  {addresses}",
            v.name,
            v.tenant,
            v.site,
            v.cpu,
            format_size(v.memory_bytes),
            format!("{} ({})", v.sla.name, v.sla.class),
            v.availability.as_str(),
            v.disks.len()
        );
    }
    s
}

/// `cairn schema`.
pub fn schema(out: &Path) -> anyhow::Result<u8> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, text) in schemas() {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(0)
}

/// Every JSON Schema `cairn schema` writes: the compiler's (spec, model,
/// placement, graph, diagnostics) and those of the reconciler's outputs.
pub fn schemas() -> Vec<(&'static str, String)> {
    use reconciler::{plan::Plan, status::Status};
    let mut all = compiler::schemas();
    all.extend([
        ("plan.schema.json", compiler::output_schema::<Plan>()),
        ("status.schema.json", compiler::output_schema::<Status>()),
        ("check.schema.json", policy::report::json_schema()),
        ("diff.schema.json", crate::diff::json_schema()),
    ]);
    all.extend(crate::placecmd::json_schemas());
    all
}

/// `cairn gen`.
pub fn generate(
    out: &Path,
    nodes: usize,
    vms: usize,
    seed: u64,
    simulate: Option<std::net::SocketAddr>,
) -> anyhow::Result<u8> {
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        anyhow::bail!(
            "{} exists and is not empty; choose a new directory",
            out.display()
        );
    }
    let mut files =
        compiler::generate::generate(&compiler::generate::GenConfig { nodes, vms, seed });
    if let Some(base) = simulate {
        crate::simulate::simulated_addresses(&mut files, base)?;
    }
    for (path, text) in &files {
        let path = out.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "wrote {} files with {nodes} nodes and {vms} VMs to {}",
        files.len(),
        out.display()
    );
    if let Some(base) = simulate {
        println!(
            "simulated nodes n0..n{} at {}:{}..; serve them with `cairn-node --simulate {nodes} --listen {base} --data-dir DIR` or `cairn dev up --simulate {}`",
            nodes.saturating_sub(1),
            base.ip(),
            base.port(),
            out.display()
        );
    }
    Ok(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `cairn bench`: medians of the front end and placement on a generated
/// repo, with KDL parsing alone as the baseline measured in the same run;
/// then the one-VM re-plan and the packing quality on instances whose
/// optimum is known.
pub fn bench(nodes: usize, vms: usize, runs: usize) -> anyhow::Result<u8> {
    use compiler::place::{PlaceOptions, build_graph, place};
    let runs = runs.max(1);
    let files = compiler::generate::generate(&compiler::generate::GenConfig {
        nodes,
        vms,
        seed: 1,
    });
    let bytes: usize = files.iter().map(|(_, t)| t.len()).sum();
    let sources = Sources::from_files(files);
    let (mut parse, mut full, mut placing, mut graphing, mut replan) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut fast_parse = vec![];
    let mut fast_files = 0;
    let mut last = None;
    let mut moved_others = 0;
    // The baselines' runs first, then cairn's: a run of cairn's phases then
    // follows the one before it, as in a process that compiles again and
    // again (the controller), not seconds of another parser's allocations.
    // The first run, in memory the process never touched, is what a one-shot
    // `cairn plan` pays; it is printed beside the medians.
    for _ in 0..runs {
        let t = Instant::now();
        for (_, f) in sources.files() {
            std::hint::black_box(kdl::KdlDocument::parse_v2(&f.text).is_ok());
        }
        parse.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        fast_files = 0;
        for (_, f) in sources.files() {
            fast_files +=
                usize::from(std::hint::black_box(compiler::kdl_fast::parse(&f.text)).is_some());
        }
        fast_parse.push(t.elapsed().as_secs_f64());
    }
    for _ in 0..runs {
        let t = Instant::now();
        let c = std::hint::black_box(compiler::compile(&sources));
        full.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(!c.has_errors(), "the generated repository does not compile");
        let t = Instant::now();
        let p = place(&c.model, &PlaceOptions::default(), None);
        placing.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(build_graph(&c.model, &p));
        graphing.push(t.elapsed().as_secs_f64());
        // Re-plan after a change to one VM.
        let mut changed = c.model.clone();
        let target = changed
            .vms
            .iter()
            .position(|v| v.group.is_none())
            .unwrap_or(0);
        std::sync::Arc::make_mut(&mut changed.vms[target]).cpu += 1;
        let name = changed.vms[target].name.clone();
        let t = Instant::now();
        let p2 = place(
            &changed,
            &PlaceOptions {
                previous: Some(p.clone()),
                ..Default::default()
            },
            None,
        );
        replan.push(t.elapsed().as_secs_f64());
        let before: std::collections::BTreeMap<_, _> =
            p.vms.iter().map(|v| (&v.name, &v.node)).collect();
        moved_others = p2
            .vms
            .iter()
            .filter(|v| v.name != name && before.get(&v.name) != Some(&&v.node))
            .count();
        last = Some((c, p));
    }
    let (c, p) = last.expect("at least one run");
    let first_total = full[0] + placing[0] + graphing[0];
    let volumes: usize = c.model.vms.iter().map(|v| v.disks.len()).sum();
    let (pa, f, pl, g, r) = (
        median(parse),
        median(full),
        median(placing),
        median(graphing),
        median(replan),
    );
    println!(
        "repo: {nodes} nodes, {vms} VMs, {volumes} volumes, {} KiB of KDL, {runs} runs, lowering, placement and graph on 2 threads where the machine has them",
        bytes / 1024
    );
    println!(
        "baseline  kdl parse only                    median {:8.1} ms",
        pa * 1e3
    );
    let fp = median(fast_parse);
    println!(
        "fastparse compiler::kdl_fast ({fast_files}/{} files) median {:8.1} ms  ({:.2}x baseline)",
        sources.files().count(),
        fp * 1e3,
        fp / pa
    );
    println!(
        "compile   parse+resolve+check+expand        median {:8.1} ms  ({:.2}x baseline)",
        f * 1e3,
        f / pa
    );
    println!(
        "place     VMs + stripes ({} placed, {} unplaced) median {:8.1} ms  ({:.2}x baseline)",
        p.vms.len(),
        p.unplaced.len(),
        pl * 1e3,
        pl / pa
    );
    println!(
        "graph     dependency graph + waves          median {:8.1} ms  ({:.2}x baseline)",
        g * 1e3,
        g / pa
    );
    println!(
        "total     compile + place + graph           median {:8.1} ms  ({:.2}x baseline; first run {:.1} ms)",
        (f + pl + g) * 1e3,
        (f + pl + g) / pa,
        first_total * 1e3
    );
    println!(
        "re-plan   after a one-VM change             median {:8.1} ms  ({:.2}x baseline), other VMs moved: {moved_others}",
        r * 1e3,
        r / pa
    );
    crate::incrbench::run(nodes, vms, runs)?;
    crate::packbench::run(nodes, vms)?;
    Ok(0)
}
