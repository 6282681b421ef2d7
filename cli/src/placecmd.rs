//! `cairn place` and `cairn graph`, and the placement check of `validate`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, bail};
use compiler::Compilation;
use compiler::diag::Diagnostic;
use compiler::model::{Availability, Model, SlaClass};
use compiler::place::{Candidate, FailureSet, PlaceOptions, Placement, Unplaced};
use compiler::units::human_size;
use schemars::JsonSchema;
use serde::Serialize;

use crate::cli::Format;
use crate::frontend::{self, Warnings};

/// How the graph is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    /// Graphviz DOT.
    Dot,
    /// Versioned JSON.
    Json,
}

/// Diagnostics for VMs that cannot be placed: errors, except spot VMs,
/// which may legitimately wait for capacity (warnings).
pub fn unplaced_diagnostics(c: &Compilation, placement: &Placement) -> Vec<Diagnostic> {
    let mut out = vec![];
    for u in &placement.unplaced {
        let Some(span) = c.spans.get("vm", &u.name) else {
            continue;
        };
        let spot = c
            .model
            .vm(&u.name)
            .is_some_and(|v| v.sla.class == SlaClass::Spot);
        let message = format!("vm `{}` cannot be placed in site `{}`", u.name, u.site);
        let d = if spot {
            Diagnostic::warning("cairn::place::spot_unplaced", span, message)
        } else {
            Diagnostic::error("cairn::place::unplaced", span, message)
        };
        let help = u
            .reasons
            .iter()
            .map(reason_line)
            .collect::<Vec<_>>()
            .join("\n");
        out.push(d.with_label("no node can take it").with_help(help));
    }
    out
}

fn reason_line(r: &compiler::place::Reason) -> String {
    let mut s = format!("{}: {}", r.constraint, r.message);
    if !r.nodes.is_empty() {
        let more = r.nodes_filtered.saturating_sub(r.nodes.len());
        s.push_str(&format!(
            " ({}{})",
            r.nodes.join(", "),
            if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            }
        ));
    }
    if let Some(src) = &r.source {
        s.push_str(&format!(" [{src}]"));
    }
    s
}

fn parse_failures(model: &Model, fail: &[String]) -> anyhow::Result<FailureSet> {
    let mut out = FailureSet::default();
    for f in fail {
        let Some((kind, name)) = f.split_once('=') else {
            bail!("--fail takes node=NAME, rack=NAME or site=NAME, not `{f}`")
        };
        let exists = match kind {
            "node" => model
                .sites
                .iter()
                .any(|s| s.nodes.iter().any(|n| n.name == name)),
            "rack" => model
                .sites
                .iter()
                .any(|s| s.racks.iter().any(|r| r.name == name)),
            "site" => model.site(name).is_some(),
            _ => bail!("--fail takes node=NAME, rack=NAME or site=NAME, not `{f}`"),
        };
        if !exists {
            bail!("--fail {f}: no {kind} named `{name}` in the specs");
        }
        let set = match kind {
            "node" => &mut out.nodes,
            "rack" => &mut out.racks,
            _ => &mut out.sites,
        };
        set.insert(name.to_owned());
    }
    Ok(out)
}

/// Arguments of `cairn place`.
#[derive(Debug, Clone)]
pub struct PlaceArgs {
    /// Spec root.
    pub dir: std::path::PathBuf,
    /// Output format.
    pub format: Format,
    /// Previous placement JSON.
    pub previous: Option<std::path::PathBuf>,
    /// VM to explain.
    pub explain: Option<String>,
    /// What-if failures.
    pub fail: Vec<String>,
    /// Rebalance.
    pub rebalance: bool,
    /// With rebalance: free whole nodes.
    pub consolidate: bool,
    /// With rebalance: the measured load to weigh VMs by (a JSON file).
    pub usage: Option<std::path::PathBuf>,
    /// With rebalance: the load the controller measured (`Some(None)`: the controller
    /// that runs for DIR/.cairn; `Some(Some(URL))`: that one).
    pub measured: Option<Option<String>>,
    /// Exact search for pack sites.
    pub optimize: bool,
}

/// The measured load from the controller at `url` (else the one that runs for
/// DIR/.cairn): its URL and `GET /api/v1/usage`.
fn controller_load(
    dir: &std::path::Path,
    url: Option<&str>,
) -> anyhow::Result<(String, compiler::place::MeasuredLoad)> {
    let data_dir = dir.join(".cairn");
    let Some((url, token)) = controller::control::status_endpoint(&data_dir, url) else {
        anyhow::bail!(
            "--measured: no controller runs for {} (no controller.url and lock there); start one, or name it with --controller http://HOST:PORT",
            data_dir.display()
        );
    };
    let answer = controller::control::fetch_json(&url, "/api/v1/usage", token.as_deref())
        .map_err(|e| anyhow::anyhow!("--measured: {e}"))?;
    let load = serde_json::from_value(answer).map_err(|e| {
        anyhow::anyhow!(
            "--measured: the controller at {url} answered GET /api/v1/usage with no measured load ({e}); is it older than this cairn?"
        )
    })?;
    Ok((url, load))
}

/// `cairn place`.
pub fn place(args: &PlaceArgs) -> anyhow::Result<u8> {
    let compiled = match frontend::compile_specs(&args.dir, None, Warnings::Quiet, "")? {
        Ok(compiled) => compiled,
        Err(code) => return Ok(code),
    };
    let c = &compiled.compilation;
    let previous = match &args.previous {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --previous {}", p.display()))?;
            let placement: Placement = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a placement (the JSON that `cairn place --format json` prints)",
                    p.display()
                )
            })?;
            Some(placement)
        }
        None => None,
    };
    let locator = compiled.locator();
    let model = &c.model;
    let base_options = PlaceOptions {
        previous,
        failed: FailureSet::default(),
    };
    let mut out = std::io::stdout().lock();
    if let Some(vm) = &args.explain {
        let Some(candidates) =
            compiler::place::explain_vm(model, &base_options, Some(&locator), vm)
        else {
            let names: Vec<&str> = model.vms.iter().map(|v| v.name.as_str()).collect();
            bail!(
                "no VM named `{vm}`; {}",
                compiler::diag::suggestion(vm, &names, "VM")
            );
        };
        if args.format == Format::Json {
            let doc = ExplainJson {
                candidates,
                format_version: FORMAT_VERSION,
                vm: vm.clone(),
            };
            writeln!(out, "{}", sorted_json(&doc)?)?;
            return Ok(0);
        }
        writeln!(out, "candidates for vm {vm} (best first):")?;
        let width = candidates
            .iter()
            .map(|c| c.node.len())
            .max()
            .unwrap_or(4)
            .max(4);
        for c in &candidates {
            let mark = if c.chosen { "*" } else { " " };
            if c.feasible {
                let parts: Vec<String> = c
                    .parts
                    .iter()
                    .map(|p| format!("{} {:+}", p.name, p.value))
                    .collect();
                writeln!(
                    out,
                    "{mark} {:width$}  score {:>4}  = {}",
                    c.node,
                    c.total,
                    parts.join(", ")
                )?;
            } else {
                writeln!(
                    out,
                    "  {:width$}  ruled out: {}",
                    c.node,
                    c.ruled_out_by.clone().unwrap_or_default()
                )?;
            }
        }
        writeln!(out, "(* = chosen)")?;
        return Ok(0);
    }
    let mut placement = compiler::place::place(model, &base_options, Some(&locator));
    let mut notes = String::new();
    if args.optimize {
        let (optimized, bounds) = compiler::place::optimize(
            model,
            &placement,
            &base_options,
            compiler::place::binpack::DEFAULT_WORK_LIMIT,
        );
        placement = optimized;
        notes.push_str(&optimize_text(&bounds));
    }
    if args.rebalance && args.consolidate {
        let (consolidated, freed) = compiler::place::consolidate(model, &placement, &base_options);
        placement = consolidated;
        for (site, nodes) in freed {
            let _ = writeln!(
                notes,
                "consolidate site {site}: {} node{} freed{}",
                nodes.len(),
                if nodes.len() == 1 { "" } else { "s" },
                if nodes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", nodes.join(", "))
                }
            );
        }
    } else if let (true, Some(path)) = (args.rebalance, &args.usage) {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --usage {}", path.display()))?;
        let load: compiler::place::MeasuredLoad = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a measured load: expected {{\"vms\": {{\"VM\": {{\"cpu_cores\": 1.5, \"resident_bytes\": 2147483648}}}}}}",
                path.display()
            )
        })?;
        placement = compiler::place::rebalance_measured(model, &placement, &base_options, &load);
    } else if let (true, Some(url)) = (args.rebalance, &args.measured) {
        let load = controller_load(&args.dir, url.as_deref())?;
        let _ = writeln!(
            notes,
            "measured load from {}: {} running VM{} with a CPU rate (the others count their declared size)",
            load.0,
            load.1.vms.len(),
            if load.1.vms.len() == 1 { "" } else { "s" }
        );
        placement = compiler::place::rebalance_measured(model, &placement, &base_options, &load.1);
    } else if args.rebalance {
        placement = compiler::place::rebalance(model, &placement, &base_options, Some(&locator));
    }
    if !args.fail.is_empty() {
        let failed = parse_failures(model, &args.fail)?;
        let options = PlaceOptions {
            previous: Some(placement.clone()),
            failed: failed.clone(),
        };
        let after = compiler::place::place(model, &options, Some(&locator));
        let report = what_if(model, &placement, &after, &failed);
        match args.format {
            Format::Json => writeln!(out, "{}", sorted_json(&report.json)?)?,
            Format::Text => out.write_all(report.text.as_bytes())?,
        }
        return Ok(if report.promises_kept { 0 } else { 1 });
    }
    match args.format {
        Format::Json => {
            out.write_all(compiler::place::placement_json(&placement).as_bytes())?;
            eprint!("{notes}");
        }
        Format::Text => {
            out.write_all(placement_text(model, &placement).as_bytes())?;
            out.write_all(notes.as_bytes())?;
        }
    }
    let diags = unplaced_diagnostics(c, &placement);
    if !diags.is_empty() {
        eprint!("{}", compiler::diag::render_all(&compiled.sources, &diags));
    }
    Ok(if diags.iter().any(Diagnostic::is_error) {
        1
    } else {
        0
    })
}

/// `--optimize`: per pack site, the nodes used against the proven bound.
fn optimize_text(bounds: &[compiler::place::SiteBound]) -> String {
    let mut s = String::new();
    for b in bounds {
        let verdict = if b.proven_optimal {
            "optimal (proven)".to_owned()
        } else {
            let gap = b.nodes_used - b.lower_bound;
            format!(
                "gap {gap} node{} ({:.1}%) to the bound, not closed within the work limit",
                if gap == 1 { "" } else { "s" },
                100.0 * gap as f64 / b.lower_bound.max(1) as f64
            )
        };
        let _ = writeln!(
            s,
            "optimize site {}: {} nodes used, lower bound {}: {verdict} ({} VMs searched, {} of {} steps)",
            b.site, b.nodes_used, b.lower_bound, b.vms_searched, b.work, b.work_limit
        );
    }
    s
}

/// The text view of a placement.
pub fn placement_text(model: &Model, p: &Placement) -> String {
    let mut s = String::new();
    for site in &model.sites {
        let _ = writeln!(s, "site {}", site.name);
        let loads: Vec<_> = p.nodes.iter().filter(|n| n.site == site.name).collect();
        let width = loads.iter().map(|n| n.name.len()).max().unwrap_or(4).max(4);
        let _ = writeln!(
            s,
            "  {:width$}  {:>18}  {:>24}  {:>3}",
            "NODE", "vCPU res+shared/all", "MEMORY res+shared/all", "VMS"
        );
        for n in loads {
            let _ = writeln!(
                s,
                "  {:width$}  {:>18}  {:>24}  {:>3}",
                n.name,
                format!("{}+{}/{}", n.cpu_reserved, n.cpu_shared, n.cpu_allocatable),
                format!(
                    "{}+{}/{}",
                    human_size(n.memory_reserved_bytes),
                    human_size(n.memory_shared_bytes),
                    human_size(n.memory_allocatable_bytes)
                ),
                n.vms
            );
        }
    }
    let width = p.vms.iter().map(|v| v.name.len()).max().unwrap_or(2).max(2);
    let _ = writeln!(
        s,
        "{:width$}  {:10} {:14} {:14} VOLUMES  ADDRESSES",
        "VM", "TENANT", "NODE", "SECONDARY"
    );
    for v in &p.vms {
        let vols = p.volumes.iter().filter(|x| x.vm == v.name).count();
        let addresses: Vec<String> = p
            .addresses
            .iter()
            .filter(|a| a.vm == v.name)
            .map(|a| format!("{}={}", a.network, a.address))
            .collect();
        let addresses = if addresses.is_empty() {
            "-".to_owned()
        } else {
            addresses.join(" ")
        };
        let _ = writeln!(
            s,
            "{:width$}  {:10} {:14} {:14} {vols:<7}  {addresses}",
            v.name,
            v.tenant,
            v.node,
            v.secondary.as_deref().unwrap_or("-")
        );
    }
    for n in &p.networks {
        let _ = writeln!(
            s,
            "network {}/{}: {} gateway {} vni {}{}, on {}",
            n.tenant,
            n.name,
            n.cidr,
            n.gateway.as_deref().unwrap_or("none"),
            n.vni,
            if n.external { ", external" } else { "" },
            if n.nodes.is_empty() {
                "no node".to_owned()
            } else {
                n.nodes.join(" ")
            }
        );
    }
    for m in &p.moves {
        let _ = writeln!(s, "move {}: {} -> {} ({})", m.vm, m.from, m.to, m.reason);
    }
    if !p.unplaced.is_empty() {
        let _ = writeln!(s, "unplaced:");
        for u in &p.unplaced {
            write_unplaced(&mut s, u);
        }
    }
    let _ = writeln!(
        s,
        "{} placed, {} unplaced, {} volumes, {} moves",
        p.vms.len(),
        p.unplaced.len(),
        p.volumes.len(),
        p.moves.len()
    );
    s
}

fn write_unplaced(s: &mut String, u: &Unplaced) {
    let _ = writeln!(s, "  {} (tenant {}, site {}):", u.name, u.tenant, u.site);
    for r in &u.reasons {
        let _ = writeln!(s, "    - {}", reason_line(r));
    }
}

/// The version of the JSON shapes of `--explain` and `--fail`.
pub const FORMAT_VERSION: u32 = 1;

/// Pretty JSON with every object's keys in alphabetical order, the order
/// these documents have always had (they were built with `json!`).
fn sorted_json(doc: &impl Serialize) -> serde_json::Result<String> {
    serde_json::to_string_pretty(&serde_json::to_value(doc)?)
}

/// `cairn place --explain VM --format json`: the VM's site's nodes, best
/// first.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ExplainJson {
    /// Every node of the VM's site: the feasible ones by score, then those
    /// a hard constraint rules out.
    pub candidates: Vec<Candidate>,
    /// The version of this shape.
    pub format_version: u32,
    /// The VM explained.
    pub vm: String,
}

/// `cairn place --fail … --format json`: what happens to the VMs when nodes,
/// racks or sites fail.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WhatIfJson {
    /// The VMs that ran on (or had their FT secondary on) what failed.
    pub affected: Vec<AffectedVm>,
    /// What failed: node names, `rack=NAME`, `site=NAME`.
    pub failed: BTreeSet<String>,
    /// The version of this shape.
    pub format_version: u32,
    /// VMs that did not run on what failed but lose their place to the
    /// restarted ones.
    pub preempted: Vec<String>,
    /// Whether the availability promises hold.
    pub promises: Promises,
}

/// One VM hit by the failure.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AffectedVm {
    /// Its availability.
    pub availability: Availability,
    /// What happens, in words.
    pub detail: String,
    /// Where it runs afterwards (`null`: nowhere).
    pub new_node: Option<String>,
    /// Where it ran.
    pub node: String,
    /// What happens.
    pub outcome: Outcome,
    /// VM name.
    pub vm: String,
    /// For a VM that restarts elsewhere: the worst-case time from the node's
    /// failure to the VM running there with its first heartbeat, from its site's
    /// timers (`failure-detect`: detect + margin + poll + restart estimate).
    pub worst_restart_ms: Option<u64>,
}

/// What a failure does to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// An FT VM continues on its secondary.
    FailsOver,
    /// An FT VM whose secondary failed keeps running and gets a new one.
    ReProtects,
    /// An HA (or FT) VM is restarted on another node.
    Restarts,
    /// The VM stays down.
    Lost,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::FailsOver => "fails-over",
            Outcome::ReProtects => "re-protects",
            Outcome::Restarts => "restarts",
            Outcome::Lost => "lost",
        }
    }
}

/// The availability promises after the failure.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Promises {
    /// Every FT VM runs and has a secondary.
    pub ft_protected: bool,
    /// Every HA VM restarts.
    pub ha_kept: bool,
    /// Reserved-class VMs that stay down.
    pub reserved_lost: u32,
}

/// The JSON Schemas of `--explain` and `--fail` output: file name and text.
pub fn json_schemas() -> [(&'static str, String); 2] {
    [
        (
            "place-explain.schema.json",
            compiler::output_schema::<ExplainJson>(),
        ),
        (
            "place-fail.schema.json",
            compiler::output_schema::<WhatIfJson>(),
        ),
    ]
}

struct WhatIf {
    text: String,
    json: WhatIfJson,
    promises_kept: bool,
}

fn what_if(model: &Model, before: &Placement, after: &Placement, failed: &FailureSet) -> WhatIf {
    let node_failed = |node: &str| {
        model
            .sites
            .iter()
            .flat_map(|s| s.nodes.iter())
            .any(|n| n.name == node && failed.has_node(&n.name, &n.rack, &n.site))
    };
    let mut lines = vec![];
    let mut entries = vec![];
    let (mut lost_reserved, mut lost_ha, mut ft_unprotected) = (0, 0, 0);
    for v in &before.vms {
        let Some(vm) = model.vm(&v.name) else {
            continue;
        };
        let primary_down = node_failed(&v.node);
        let secondary_down = v.secondary.as_deref().is_some_and(node_failed);
        if !primary_down && !secondary_down {
            continue;
        }
        let now = after.vms.iter().find(|x| x.name == v.name);
        let mut restart_ms = None;
        let (outcome, detail) = match vm.availability {
            Availability::Ft if primary_down && !secondary_down => {
                let sec = v.secondary.clone().unwrap_or_default();
                let new_secondary = now.and_then(|n| n.secondary.clone());
                if new_secondary.is_none() {
                    ft_unprotected += 1;
                }
                (
                    Outcome::FailsOver,
                    format!(
                        "continues on its secondary {sec}; new secondary: {}",
                        new_secondary.unwrap_or_else(|| "none (unprotected)".to_owned())
                    ),
                )
            }
            Availability::Ft if !primary_down => {
                let new_secondary = now.and_then(|n| n.secondary.clone());
                if new_secondary.is_none() {
                    ft_unprotected += 1;
                }
                (
                    Outcome::ReProtects,
                    format!(
                        "keeps running on {}; new secondary: {}",
                        v.node,
                        new_secondary.unwrap_or_else(|| "none (unprotected)".to_owned())
                    ),
                )
            }
            Availability::Ha | Availability::Ft => match now {
                Some(n) => {
                    let (worst, how) = compiler::model::timers::vm_worst_restart(model, &v.name)
                        .unwrap_or_default();
                    restart_ms = Some(worst);
                    (
                        Outcome::Restarts,
                        format!(
                            "restarts on {} within {:.1} s ({how})",
                            n.node,
                            worst as f64 / 1000.0
                        ),
                    )
                }
                None => {
                    if vm.availability == Availability::Ft {
                        ft_unprotected += 1;
                    } else {
                        lost_ha += 1;
                    }
                    let why = after
                        .unplaced
                        .iter()
                        .find(|u| u.name == v.name)
                        .and_then(|u| u.reasons.first())
                        .map_or_else(|| "no node can take it".to_owned(), |r| r.message.clone());
                    (Outcome::Lost, format!("cannot be restarted: {why}"))
                }
            },
            Availability::None => (
                Outcome::Lost,
                "not HA: stays down until the node returns".to_owned(),
            ),
        };
        if outcome == Outcome::Lost && vm.sla.class == SlaClass::Reserved {
            lost_reserved += 1;
        }
        lines.push(format!(
            "  {:12} {:10} {} ({} on {})",
            v.name,
            outcome.as_str(),
            detail,
            vm.availability,
            v.node
        ));
        entries.push(AffectedVm {
            availability: vm.availability,
            detail,
            new_node: now.map(|n| n.node.clone()),
            node: v.node.clone(),
            outcome,
            vm: v.name.clone(),
            worst_restart_ms: restart_ms,
        });
    }
    let preempted: Vec<&str> = after
        .unplaced
        .iter()
        .filter(|u| {
            before
                .vms
                .iter()
                .any(|b| b.name == u.name && !node_failed(&b.node))
        })
        .map(|u| u.name.as_str())
        .collect();
    let kept = lost_ha == 0 && ft_unprotected == 0;
    let mut text = format!("what if {} failed:\n", failed.entries().join(", "));
    if lines.is_empty() {
        text.push_str("  no VM runs there\n");
    }
    for l in &lines {
        text.push_str(l);
        text.push('\n');
    }
    for p in &preempted {
        let _ = writeln!(text, "  {p:12} preempted  to make room for restarted VMs");
    }
    let _ = writeln!(
        text,
        "promises: HA {}, FT {}, reserved {} lost",
        if lost_ha == 0 {
            "kept".to_owned()
        } else {
            format!("broken ({lost_ha} HA VMs cannot restart)")
        },
        if ft_unprotected == 0 {
            "kept".to_owned()
        } else {
            format!("broken ({ft_unprotected} FT VMs down or without a secondary)")
        },
        lost_reserved
    );
    let json = WhatIfJson {
        affected: entries,
        failed: failed.entries().into_iter().collect(),
        format_version: FORMAT_VERSION,
        preempted: preempted.iter().map(|p| (*p).to_owned()).collect(),
        promises: Promises {
            ft_protected: ft_unprotected == 0,
            ha_kept: lost_ha == 0,
            reserved_lost: lost_reserved,
        },
    };
    WhatIf {
        text,
        json,
        promises_kept: kept,
    }
}

/// `cairn graph`.
pub fn graph(dir: &Path, format: GraphFormat) -> anyhow::Result<u8> {
    let compiled = match frontend::compile_specs(dir, None, Warnings::Quiet, "")? {
        Ok(compiled) => compiled,
        Err(code) => return Ok(code),
    };
    let placement = compiled.place(&PlaceOptions::default());
    let g = compiler::place::build_graph(&compiled.compilation.model, &placement);
    let mut out = std::io::stdout().lock();
    match format {
        GraphFormat::Dot => out.write_all(g.to_dot().as_bytes())?,
        GraphFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&g)?)?,
    }
    Ok(0)
}
