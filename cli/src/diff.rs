//! `cairn diff`: a pull-request preview of what a change between two git
//! revisions would do.
//!
//! Both revisions are compiled out of git history (the head may be the
//! working tree); the preview lists objects added, changed and removed
//! (VMs grouped by tenant, with the fields that change), placement changes
//! (the head is placed starting from the base's placement, so it shows new
//! VMs' nodes, moves, preemptions and VMs that no longer fit), capacity and
//! quota headroom before and after, the policy verdict on the head (with its
//! placement in the input), and the head's spec errors when it does not
//! compile.
//!
//! The verdict uses the policies of the *base* revision: a change cannot
//! weaken the gate that judges it. A change to `policies/` is listed so
//! reviewers see it; it takes effect once merged.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use compiler::Sources;
use compiler::diag;
use compiler::model::{Model, SlaClass};
use compiler::place::{PlaceOptions, Placement};
use compiler::source::TreeRoot;
use compiler::units::human_size;
use policy::eval::{Input, SpecLocator};
use policy::{PolicySet, Report, RuleKind};
use serde::Serialize;
use serde_json::Value;

use crate::frontend::Compiled;

/// Output formats of `cairn diff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiffFormat {
    /// GitHub/GitLab-flavoured Markdown for a PR comment.
    Markdown,
    /// Versioned JSON.
    Json,
    /// Plain text.
    Text,
}

/// `cairn diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The revision the change starts from (e.g. origin/main, the PR's merge base).
    #[arg(long)]
    pub base: String,
    /// The revision with the change (default: the working tree).
    #[arg(long)]
    pub head: Option<String>,
    /// The spec root inside a git repository (default: the current directory).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "markdown")]
    pub format: DiffFormat,
    /// The platform keys a controller trusts (allowed-signers format): with
    /// it, a head a controller would refuse (authorization) exits 1.
    #[arg(long, value_name = "FILE")]
    pub trusted_keys: Option<PathBuf>,
}

/// The version of the JSON shape.
pub const FORMAT_VERSION: u32 = 1;

/// Lists longer than this go into a collapsed `<details>` block.
const COLLAPSE_AFTER: usize = 10;

#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
struct FieldChange {
    path: String,
    before: Value,
    after: Value,
}

#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
struct ObjectChange {
    kind: &'static str,
    name: String,
    /// The tenant a VM, vm-group or tenant belongs to.
    tenant: Option<String>,
    change: &'static str,
    fields: Vec<FieldChange>,
    location: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
struct Headroom {
    scope: String,
    resource: &'static str,
    limit: u64,
    before: u64,
    after: u64,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
struct Side {
    rev: String,
    commit: Option<String>,
    compiles: bool,
    errors: usize,
    vms: usize,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
struct Preview {
    format_version: u32,
    base: Side,
    head: Side,
    summary: String,
    objects: Vec<ObjectChange>,
    capacity: Vec<Headroom>,
    quota: Vec<Headroom>,
    placement: PlacementChanges,
    policy: PolicyVerdict,
    policies_changed: Vec<String>,
    head_diagnostics: Option<String>,
    /// Whether a controller following the base would accept the head's
    /// commits (signatures and per-object authorization).
    authorization: Option<crate::authz::Authorization>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
struct PolicyVerdict {
    evaluated: bool,
    passed: bool,
    source: String,
    report: Option<Report>,
    /// Findings of the head that the base did not have (policy + message).
    new: Vec<(String, String)>,
    /// Findings of the base that the head no longer has.
    resolved: Vec<(String, String)>,
}

#[derive(Debug, Serialize, Default, schemars::JsonSchema)]
struct PlacementChanges {
    /// Whether the head could be placed (it compiles).
    available: bool,
    /// New VMs and where they go.
    placed: Vec<PlacedVm>,
    /// VMs that move from their base node.
    moves: Vec<MovedVm>,
    /// VMs that ran in the base and lose their place to higher priorities.
    preempted: Vec<PreemptedVm>,
    /// VMs the head cannot place that the base could (or new ones).
    unplaced: Vec<UnplaceableVm>,
}

// The four entry types below keep their fields in alphabetical order: that
// is the order the JSON has always had (it was built with `json!`).

/// A new VM and where it goes.
#[derive(Debug, Serialize, schemars::JsonSchema)]
struct PlacedVm {
    /// Its node (the primary's, for FT VMs).
    node: String,
    /// The FT secondary's node.
    secondary: Option<String>,
    /// Tenant.
    tenant: String,
    /// VM name.
    vm: String,
}

/// A VM that moves from its base node.
#[derive(Debug, Serialize, schemars::JsonSchema)]
struct MovedVm {
    /// The base's node.
    from: String,
    /// Why it moves.
    reason: String,
    /// The head's node.
    to: String,
    /// VM name.
    vm: String,
}

/// A VM that ran in the base and loses its place.
#[derive(Debug, Serialize, schemars::JsonSchema)]
struct PreemptedVm {
    /// The node it ran on in the base.
    from: String,
    /// Why it has no place in the head.
    reasons: Vec<String>,
    /// Tenant.
    tenant: String,
    /// VM name.
    vm: String,
}

/// A VM the head cannot place.
#[derive(Debug, Serialize, schemars::JsonSchema)]
struct UnplaceableVm {
    /// Why no node can take it.
    reasons: Vec<String>,
    /// Tenant.
    tenant: String,
    /// VM name.
    vm: String,
}

fn placement_changes(base: Option<&Placement>, head: Option<&Placement>) -> PlacementChanges {
    let Some(head) = head else {
        return PlacementChanges::default();
    };
    let before: BTreeMap<&str, &compiler::place::VmPlacement> = base
        .map(|b| b.vms.iter().map(|v| (v.name.as_str(), v)).collect())
        .unwrap_or_default();
    let unplaced_before: BTreeSet<&str> = base
        .map(|b| b.unplaced.iter().map(|u| u.name.as_str()).collect())
        .unwrap_or_default();
    let mut out = PlacementChanges {
        available: true,
        ..PlacementChanges::default()
    };
    for v in &head.vms {
        if !before.contains_key(v.name.as_str()) {
            out.placed.push(PlacedVm {
                vm: v.name.clone(),
                tenant: v.tenant.clone(),
                node: v.node.clone(),
                secondary: v.secondary.clone(),
            });
        }
    }
    for m in &head.moves {
        out.moves.push(MovedVm {
            vm: m.vm.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            reason: m.reason.clone(),
        });
    }
    for u in &head.unplaced {
        let reasons: Vec<String> = u.reasons.iter().map(|r| r.message.clone()).collect();
        let was = before
            .get(u.name.as_str())
            .map(|v| v.node.clone())
            .or(u.previous_node.clone());
        if let Some(node) = was {
            out.preempted.push(PreemptedVm {
                vm: u.name.clone(),
                tenant: u.tenant.clone(),
                from: node,
                reasons,
            });
        } else if !unplaced_before.contains(u.name.as_str()) {
            out.unplaced.push(UnplaceableVm {
                vm: u.name.clone(),
                tenant: u.tenant.clone(),
                reasons,
            });
        }
    }
    out
}

fn placement_lines(p: &PlacementChanges, code: bool) -> Vec<String> {
    let t = if code { "`" } else { "" };
    let mut lines = vec![];
    for v in &p.placed {
        let mut l = format!("new vm {t}{}{t} → {}", v.vm, v.node);
        if let Some(secondary) = &v.secondary {
            let _ = write!(l, " (secondary {secondary})");
        }
        lines.push(l);
    }
    for m in &p.moves {
        lines.push(format!(
            "move vm {t}{}{t}: {} → {} ({})",
            m.vm, m.from, m.to, m.reason
        ));
    }
    for u in &p.preempted {
        lines.push(format!(
            "PREEMPTED vm {t}{}{t} (was on {}): {}",
            u.vm,
            u.from,
            u.reasons.join("; ")
        ));
    }
    for u in &p.unplaced {
        lines.push(format!(
            "UNPLACEABLE vm {t}{}{t}: {}",
            u.vm,
            u.reasons.join("; ")
        ));
    }
    lines
}

fn placement_summary(p: &PlacementChanges) -> String {
    if !p.available {
        return "not computed: the head does not compile".to_owned();
    }
    format!(
        "{} new {} placed, {} {}, {} {}, {} unplaceable",
        p.placed.len(),
        diag::plural(p.placed.len(), "VM"),
        p.moves.len(),
        if p.moves.len() == 1 { "move" } else { "moves" },
        p.preempted.len(),
        if p.preempted.len() == 1 {
            "preemption"
        } else {
            "preemptions"
        },
        p.unplaced.len()
    )
}

struct Loaded {
    compiled: Compiled,
    commit: Option<String>,
}

impl Loaded {
    fn model(&self) -> &Model {
        &self.compiled.compilation.model
    }
}

/// Runs the command: 0 when the head compiles and passes the policies, 1
/// otherwise (the preview is printed either way).
pub fn run(args: DiffArgs) -> anyhow::Result<u8> {
    let repo = git2::Repository::discover(&args.repo)
        .with_context(|| format!("no git repository at {}", args.repo.display()))?;
    let workdir = repo
        .workdir()
        .context("the repository is bare; pass --head to compare two revisions")?
        .canonicalize()?;
    let dir = args
        .repo
        .canonicalize()
        .with_context(|| format!("cannot open {}", args.repo.display()))?;
    let prefix = dir
        .strip_prefix(&workdir)
        .unwrap_or(Path::new(""))
        .to_owned();

    let load_rev = |rev: &str| -> anyhow::Result<Loaded> {
        let sources = Sources::load_tree(TreeRoot::Git {
            repo: &repo,
            rev,
            dir: &prefix,
        })?;
        let commit = repo
            .revparse_single(rev)
            .and_then(|o| o.peel_to_commit())
            .map(|c| c.id().to_string())
            .ok();
        Ok(Loaded {
            compiled: Compiled::new(sources),
            commit,
        })
    };
    let base = load_rev(&args.base)?;
    let head = match &args.head {
        Some(rev) => load_rev(rev)?,
        None => Loaded {
            compiled: Compiled::load(&dir, None)?,
            commit: None,
        },
    };
    let policy_dir = prefix.join("policies");
    let policies_at = |rev: &str| {
        PolicySet::load_tree(TreeRoot::Git {
            repo: &repo,
            rev,
            dir: &policy_dir,
        })
    };
    let base_policies = policies_at(&args.base)?;
    let head_policies = match &args.head {
        Some(rev) => policies_at(rev)?,
        None => PolicySet::load_dir(&dir.join("policies"))?,
    };
    let mut preview = build(
        &args.base,
        args.head.as_deref().unwrap_or("working tree"),
        &base,
        &head,
        &base_policies,
        &head_policies,
    )?;
    let authorization = crate::authz::preview(
        &repo,
        &prefix,
        &args.base,
        args.head.as_deref(),
        args.trusted_keys.as_deref(),
    )?;
    let refused = args.trusted_keys.is_some() && !authorization.allowed;
    preview.authorization = Some(authorization);
    let out = match args.format {
        DiffFormat::Markdown => markdown(&preview),
        DiffFormat::Text => text(&preview),
        DiffFormat::Json => {
            let mut s = serde_json::to_string_pretty(&preview)?;
            s.push('\n');
            s
        }
    };
    print!("{out}");
    Ok(
        if preview.head.compiles && preview.policy.passed && !refused {
            0
        } else {
            1
        },
    )
}

/// The JSON Schema of `cairn diff --format json`.
pub fn json_schema() -> String {
    compiler::output_schema::<Preview>()
}

fn short(commit: &Option<String>) -> String {
    commit
        .as_deref()
        .map(|c| c[..c.len().min(12)].to_owned())
        .unwrap_or_default()
}

fn build(
    base_rev: &str,
    head_rev: &str,
    base: &Loaded,
    head: &Loaded,
    base_policies: &PolicySet,
    head_policies: &PolicySet,
) -> anyhow::Result<Preview> {
    let head_ok = !head.compiled.compilation.has_errors();
    let base_ok = !base.compiled.compilation.has_errors();
    let objects = if head_ok {
        object_changes(base.model(), head)
    } else {
        vec![]
    };
    let capacity = capacity(base.model(), head.model());
    let quota = quota(base.model(), head.model());

    let place = |l: &Loaded, previous: Option<Placement>| -> Placement {
        l.compiled.place(&PlaceOptions {
            previous,
            ..PlaceOptions::default()
        })
    };
    // The head is placed starting from the base's placement, as apply would.
    let base_placement = base_ok.then(|| place(base, None));
    let head_placement = head_ok.then(|| place(head, base_placement.clone()));
    let placement = placement_changes(base_placement.as_ref(), head_placement.as_ref());

    let evaluate = |l: &Loaded, p: Option<&Placement>| -> anyhow::Result<Report> {
        let p = p.map(serde_json::to_value).transpose()?;
        let input = Input::new(l.model(), p.as_ref(), None)?;
        let locator = SpecLocator {
            sources: &l.compiled.sources,
            spans: &l.compiled.compilation.spans,
        };
        Ok(policy::eval::evaluate(
            base_policies,
            &input,
            Some(locator),
            &[],
        )?)
    };
    let verdict = if head_ok {
        let report = evaluate(head, head_placement.as_ref())?;
        let key = |r: &Report| -> BTreeSet<(String, String)> {
            r.findings
                .iter()
                .map(|f| (f.policy.clone(), f.message.clone()))
                .collect()
        };
        let before = if base_ok {
            key(&evaluate(base, base_placement.as_ref())?)
        } else {
            BTreeSet::new()
        };
        let after = key(&report);
        PolicyVerdict {
            evaluated: true,
            passed: report.passed(),
            source: format!("policies of the base revision {base_rev}"),
            new: after.difference(&before).cloned().collect(),
            resolved: before.difference(&after).cloned().collect(),
            report: Some(report),
        }
    } else {
        PolicyVerdict {
            evaluated: false,
            passed: false,
            source: format!("policies of the base revision {base_rev}"),
            report: None,
            new: vec![],
            resolved: vec![],
        }
    };
    let policies_changed = policy_changes(base_policies, head_policies);
    let head_diagnostics = (!head.compiled.compilation.diagnostics.is_empty()).then(|| {
        diag::render_all(
            &head.compiled.sources,
            &head.compiled.compilation.diagnostics,
        )
    });
    let count = |c: &str| objects.iter().filter(|o| o.change == c).count();
    let summary = if !head_ok {
        let n = head
            .compiled
            .compilation
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .count();
        format!(
            "the head does not compile ({n} {}); nothing can be applied",
            diag::plural(n, "error")
        )
    } else {
        let vm_delta = head.model().vms.len() as i64 - base.model().vms.len() as i64;
        let policy = match &verdict.report {
            Some(r) if r.passed() => format!(
                "policies pass ({} {})",
                r.count(RuleKind::Warn),
                diag::plural(r.count(RuleKind::Warn), "warning")
            ),
            Some(r) => format!(
                "policies FAIL ({} blocking {})",
                r.blocking() + r.errors(),
                if r.blocking() + r.errors() == 1 {
                    "denial"
                } else {
                    "denials"
                }
            ),
            None => "policies not evaluated".to_owned(),
        };
        format!(
            "{} added, {} changed, {} removed; VMs {} → {} ({:+}); {policy}",
            count("added"),
            count("changed"),
            count("removed"),
            base.model().vms.len(),
            head.model().vms.len(),
            vm_delta
        )
    };
    Ok(Preview {
        format_version: FORMAT_VERSION,
        base: Side {
            rev: base_rev.to_owned(),
            commit: base.commit.clone(),
            compiles: base_ok,
            errors: base
                .compiled
                .compilation
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .count(),
            vms: base.model().vms.len(),
        },
        head: Side {
            rev: head_rev.to_owned(),
            commit: head.commit.clone(),
            compiles: head_ok,
            errors: head
                .compiled
                .compilation
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .count(),
            vms: head.model().vms.len(),
        },
        summary,
        objects,
        capacity,
        quota,
        placement,
        policy: verdict,
        policies_changed,
        head_diagnostics,
        authorization: None,
    })
}

fn policy_changes(base: &PolicySet, head: &PolicySet) -> Vec<String> {
    let files = |s: &PolicySet| -> BTreeMap<String, String> {
        s.policies
            .iter()
            .map(|p| (p.path.clone(), p.text.clone()))
            .chain(s.tests.iter().map(|t| (t.path.clone(), t.text.clone())))
            .chain(s.data.iter().cloned())
            .collect()
    };
    let (b, h) = (files(base), files(head));
    let mut out = vec![];
    for (path, text) in &h {
        match b.get(path) {
            None => out.push(format!("{path} (added)")),
            Some(t) if t != text => out.push(format!("{path} (changed)")),
            _ => {}
        }
    }
    for path in b.keys() {
        if !h.contains_key(path) {
            out.push(format!("{path} (removed)"));
        }
    }
    out
}

/// Named objects of a model by kind, each as JSON without derived fields
/// (a tenant's usage, a site's nodes — nodes are their own kind).
fn objects(model: &Model) -> Vec<(&'static str, String, Option<String>, Value)> {
    let mut out = vec![];
    let mut push = |kind: &'static str, name: &str, tenant: Option<&str>, v: Value| {
        out.push((kind, name.to_owned(), tenant.map(str::to_owned), v));
    };
    let json = |v: &dyn erased::Ser| v.to_json();
    for t in &model.tenants {
        let mut v = json(t);
        if let Value::Object(m) = &mut v {
            m.remove("usage");
        }
        push("tenant", &t.name, Some(&t.name), v);
    }
    for vm in &model.vms {
        push("vm", &vm.name, Some(&vm.tenant), json(vm));
    }
    for g in &model.vm_groups {
        let mut v = json(g);
        if let Value::Object(m) = &mut v {
            m.remove("vms");
        }
        push("vm-group", &g.name, Some(&g.tenant), v);
    }
    for s in &model.sites {
        let mut v = json(s);
        if let Value::Object(m) = &mut v {
            m.remove("nodes");
            m.remove("allocatable");
        }
        push("site", &s.name, None, v);
        for n in &s.nodes {
            push("node", &n.name, None, json(n));
        }
    }
    for c in &model.node_classes {
        push("node-class", &c.name, None, json(c));
    }
    for p in model.sla_profiles.iter().filter(|p| !p.builtin) {
        push("sla-profile", &p.name, None, json(p));
    }
    for i in &model.images {
        push("image", &i.name, None, json(i));
    }
    for a in &model.affinities {
        push("affinity", &a.name, None, json(a));
    }
    for p in &model.protection_plans {
        push("protection-plan", &p.name, None, json(p));
    }
    out
}

/// A tiny object-safe serialization shim so `objects` can treat every model
/// type alike.
mod erased {
    pub trait Ser {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
        }
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            out.insert(prefix.to_owned(), v.clone());
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let key = item
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| i.to_string());
                flatten(&format!("{prefix}[{key}]"), item, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.clone());
        }
    }
}

fn field_changes(before: &Value, after: &Value) -> Vec<FieldChange> {
    let (mut b, mut a) = (BTreeMap::new(), BTreeMap::new());
    flatten("", before, &mut b);
    flatten("", after, &mut a);
    let keys: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (
                b.get(k).cloned().unwrap_or(Value::Null),
                a.get(k).cloned().unwrap_or(Value::Null),
            );
            (x != y).then(|| FieldChange {
                path: k.clone(),
                before: x,
                after: y,
            })
        })
        .collect()
}

fn object_changes(base: &Model, head: &Loaded) -> Vec<ObjectChange> {
    let key = |o: &(&'static str, String, Option<String>, Value)| (o.0, o.1.clone());
    let b: BTreeMap<_, _> = objects(base).into_iter().map(|o| (key(&o), o)).collect();
    let h: BTreeMap<_, _> = objects(head.model())
        .into_iter()
        .map(|o| (key(&o), o))
        .collect();
    let locate = |kind: &'static str, name: &str| {
        head.compiled
            .compilation
            .spans
            .get(kind, name)
            .map(|s| diag::location(&head.compiled.sources, s))
    };
    let mut out = vec![];
    for (k, (kind, name, tenant, v)) in &h {
        match b.get(k) {
            None => out.push(ObjectChange {
                kind,
                name: name.clone(),
                tenant: tenant.clone(),
                change: "added",
                fields: vec![],
                location: locate(kind, name),
            }),
            Some((_, _, _, old)) if old != v => out.push(ObjectChange {
                kind,
                name: name.clone(),
                tenant: tenant.clone(),
                change: "changed",
                fields: field_changes(old, v),
                location: locate(kind, name),
            }),
            _ => {}
        }
    }
    for (k, (kind, name, tenant, _)) in &b {
        if !h.contains_key(k) {
            out.push(ObjectChange {
                kind,
                name: name.clone(),
                tenant: tenant.clone(),
                change: "removed",
                fields: vec![],
                location: None,
            });
        }
    }
    out
}

/// Requested CPU and memory per site (FT VMs twice), by SLA class group:
/// reserved demand against allocatable, everything against overcommitted.
fn capacity(base: &Model, head: &Model) -> Vec<Headroom> {
    let demand = |m: &Model| -> BTreeMap<String, (u64, u64, u64)> {
        let mut d: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        for vm in &m.vms {
            let copies = if vm.availability == compiler::model::Availability::Ft {
                2
            } else {
                1
            };
            let e = d.entry(vm.site.clone()).or_default();
            if vm.sla.class != SlaClass::Spot {
                e.0 += u64::from(vm.cpu) * copies;
                e.1 += vm.memory_bytes * copies;
            }
            e.2 += vm.disks.iter().map(|x| x.size_bytes).sum::<u64>();
        }
        d
    };
    let (db, dh) = (demand(base), demand(head));
    let mut out = vec![];
    for site in &head.sites {
        let b = db.get(&site.name).copied().unwrap_or_default();
        let h = dh.get(&site.name).copied().unwrap_or_default();
        if b == h && base.site(&site.name).is_some() {
            continue;
        }
        let cpu_limit = (site.allocatable.cpu as f64 * site.overcommit.cpu) as u64;
        let mem_limit = (site.allocatable.memory_bytes as f64 * site.overcommit.memory) as u64;
        let storage: u64 = site.pools.iter().map(|p| p.provisionable_bytes).sum();
        out.push(Headroom {
            scope: site.name.clone(),
            resource: "vcpus",
            limit: cpu_limit,
            before: b.0,
            after: h.0,
        });
        out.push(Headroom {
            scope: site.name.clone(),
            resource: "memory",
            limit: mem_limit,
            before: b.1,
            after: h.1,
        });
        out.push(Headroom {
            scope: site.name.clone(),
            resource: "storage",
            limit: storage,
            before: b.2,
            after: h.2,
        });
    }
    out
}

/// Quota headroom of tenants whose usage changes.
fn quota(base: &Model, head: &Model) -> Vec<Headroom> {
    let mut out = vec![];
    for t in &head.tenants {
        let before = base
            .tenants
            .iter()
            .find(|b| b.name == t.name)
            .map(|b| b.usage.clone())
            .unwrap_or_default();
        if before == t.usage {
            continue;
        }
        let Some(q) = &t.quota else {
            continue;
        };
        let rows = [
            ("vcpus", q.vcpus, before.vcpus, t.usage.vcpus),
            (
                "memory",
                q.memory_bytes,
                before.memory_bytes,
                t.usage.memory_bytes,
            ),
            (
                "storage",
                q.storage_bytes,
                before.storage_bytes,
                t.usage.storage_bytes,
            ),
            ("vms", q.vms, before.vms, t.usage.vms),
        ];
        for (resource, limit, b, a) in rows {
            if let Some(limit) = limit {
                out.push(Headroom {
                    scope: t.name.clone(),
                    resource,
                    limit,
                    before: b,
                    after: a,
                });
            }
        }
    }
    out
}

fn amount(resource: &str, v: u64) -> String {
    match resource {
        "memory" | "storage" => human_size(v),
        _ => v.to_string(),
    }
}

fn headroom_row(h: &Headroom) -> (String, String, String, String) {
    let pct = |v: u64| {
        if h.limit == 0 {
            "-".to_owned()
        } else {
            format!("{:.0}%", v as f64 * 100.0 / h.limit as f64)
        }
    };
    let free = |v: u64| {
        if v > h.limit {
            format!("over by {}", amount(h.resource, v - h.limit))
        } else {
            format!("{} free", amount(h.resource, h.limit - v))
        }
    };
    (
        format!("{} {}", h.scope, h.resource),
        format!(
            "{} / {} ({})",
            amount(h.resource, h.before),
            amount(h.resource, h.limit),
            pct(h.before)
        ),
        format!(
            "{} / {} ({})",
            amount(h.resource, h.after),
            amount(h.resource, h.limit),
            pct(h.after)
        ),
        free(h.after),
    )
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Null => "—".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn change_line(o: &ObjectChange, code: bool) -> String {
    let tick = if code { "`" } else { "" };
    let mut s = format!("{} {tick}{}{tick}", o.kind, o.name);
    if o.change == "changed" && !o.fields.is_empty() {
        let parts: Vec<String> = o
            .fields
            .iter()
            .take(6)
            .map(|f| {
                format!(
                    "{tick}{}{tick} {} → {}",
                    f.path,
                    value_text(&f.before),
                    value_text(&f.after)
                )
            })
            .collect();
        let _ = write!(s, ": {}", parts.join(", "));
        if o.fields.len() > 6 {
            let _ = write!(s, ", and {} more", o.fields.len() - 6);
        }
    }
    if let Some(l) = &o.location {
        let _ = write!(s, " ({l})");
    }
    s
}

/// Groups changes under headings: each tenant (its VMs, groups and the
/// tenant itself), then the shared infrastructure.
fn groups(objects: &[ObjectChange]) -> Vec<(String, Vec<&ObjectChange>)> {
    let mut by: BTreeMap<(u8, String), Vec<&ObjectChange>> = BTreeMap::new();
    for o in objects {
        let k = match &o.tenant {
            Some(t) => (0, format!("tenant {t}")),
            None => (1, "infrastructure".to_owned()),
        };
        by.entry(k).or_default().push(o);
    }
    by.into_iter().map(|((_, k), v)| (k, v)).collect()
}

fn markdown(p: &Preview) -> String {
    let mut out = String::new();
    let verdict = if !p.head.compiles {
        "❌ does not compile"
    } else if p.policy.passed {
        "✅ policies pass"
    } else {
        "❌ policies fail"
    };
    let _ = writeln!(out, "### cairn preview: {verdict}\n");
    let _ = writeln!(
        out,
        "`{}` {} → `{}` {}\n",
        p.base.rev,
        short(&p.base.commit),
        p.head.rev,
        short(&p.head.commit)
    );
    let _ = writeln!(out, "**{}**\n", p.summary);

    if let Some(d) = &p.head_diagnostics {
        let title = if p.head.compiles {
            "Spec warnings"
        } else {
            "Spec errors"
        };
        if p.head.compiles {
            let _ = writeln!(
                out,
                "<details><summary>{title}</summary>\n\n```text\n{d}```\n\n</details>\n"
            );
        } else {
            let _ = writeln!(out, "#### {title}\n\n```text\n{d}```\n");
        }
    }

    if p.head.compiles {
        let _ = writeln!(out, "#### Changes\n");
        if p.objects.is_empty() {
            let _ = writeln!(out, "No object changes.\n");
        }
        for (heading, items) in groups(&p.objects) {
            let lines: Vec<String> = items
                .iter()
                .map(|o| {
                    let sign = match o.change {
                        "added" => "➕ added",
                        "removed" => "➖ removed",
                        _ => "✏️ changed",
                    };
                    format!("- {sign} {}", change_line(o, true))
                })
                .collect();
            if lines.len() > COLLAPSE_AFTER {
                let _ = writeln!(
                    out,
                    "<details><summary><b>{heading}</b>: {} changes</summary>\n\n{}\n\n</details>\n",
                    lines.len(),
                    lines.join("\n")
                );
            } else {
                let _ = writeln!(out, "**{heading}**\n\n{}\n", lines.join("\n"));
            }
        }
    }

    let _ = writeln!(out, "#### Placement\n");
    let _ = writeln!(out, "Placement: {}.\n", placement_summary(&p.placement));
    let lines: Vec<String> = placement_lines(&p.placement, true)
        .into_iter()
        .map(|l| format!("- {l}"))
        .collect();
    if lines.len() > COLLAPSE_AFTER {
        let _ = writeln!(
            out,
            "<details><summary>{} placement changes</summary>\n\n{}\n\n</details>\n",
            lines.len(),
            lines.join("\n")
        );
    } else if !lines.is_empty() {
        let _ = writeln!(out, "{}\n", lines.join("\n"));
    }

    for (title, rows) in [("Capacity", &p.capacity), ("Quota", &p.quota)] {
        if rows.is_empty() {
            continue;
        }
        let mut table = String::from("| | before | after | headroom |\n|---|---|---|---|\n");
        for h in rows {
            let (a, b, c, d) = headroom_row(h);
            let _ = writeln!(table, "| {a} | {b} | {c} | {d} |");
        }
        let over = rows.iter().filter(|h| h.after > h.limit).count();
        let note = if over > 0 {
            format!(" ({over} over the limit)")
        } else {
            String::new()
        };
        if rows.len() > COLLAPSE_AFTER {
            let _ = writeln!(
                out,
                "<details><summary><b>{title} headroom</b>{note}</summary>\n\n{table}\n</details>\n"
            );
        } else {
            let _ = writeln!(out, "#### {title} headroom{note}\n\n{table}");
        }
    }

    let _ = writeln!(out, "#### Policy ({})\n", p.policy.source);
    match &p.policy.report {
        None => {
            let _ = writeln!(out, "Not evaluated: the head does not compile.\n");
        }
        Some(r) => {
            let _ = writeln!(out, "{}\n", policy::report::summary(r));
            let new: BTreeSet<(&str, &str)> = p
                .policy
                .new
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            let lines: Vec<String> = r
                .findings
                .iter()
                .map(|f| {
                    let tag = match (f.rule, f.blocking, f.overridden.is_some()) {
                        (RuleKind::Warn, ..) => "⚠️ warn",
                        (_, true, _) => "❌ **deny**",
                        (_, _, true) => "overridden",
                        _ => "ℹ️ advisory",
                    };
                    let fresh = if new.contains(&(f.policy.as_str(), f.message.as_str())) {
                        " *(new)*"
                    } else {
                        ""
                    };
                    let loc = f
                        .location
                        .as_ref()
                        .map(|l| format!(" ({l})"))
                        .unwrap_or_default();
                    format!(
                        "- {tag} `{}` [{}]: {}{loc}{fresh}",
                        f.policy,
                        f.enforcement.as_str(),
                        f.message
                    )
                })
                .collect();
            if lines.len() > COLLAPSE_AFTER {
                let _ = writeln!(
                    out,
                    "<details><summary>{} findings</summary>\n\n{}\n\n</details>\n",
                    lines.len(),
                    lines.join("\n")
                );
            } else if !lines.is_empty() {
                let _ = writeln!(out, "{}\n", lines.join("\n"));
            }
            for pr in r.policies.iter().filter(|p| p.error.is_some()) {
                let _ = writeln!(
                    out,
                    "- ❌ `{}` could not be evaluated: {}\n",
                    pr.name,
                    pr.error.as_deref().unwrap_or("")
                );
            }
            if !p.policy.resolved.is_empty() {
                let _ = writeln!(
                    out,
                    "Resolved by this change: {}\n",
                    p.policy
                        .resolved
                        .iter()
                        .map(|(a, b)| format!("`{a}`: {b}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
        }
    }
    if !p.policies_changed.is_empty() {
        let _ = writeln!(
            out,
            "Policy files changed (they take effect after merge; review them): {}\n",
            p.policies_changed
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(a) = &p.authorization {
        out.push_str(&crate::authz::markdown(a));
    }
    out
}

fn text(p: &Preview) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} -> {} {}",
        p.base.rev,
        short(&p.base.commit),
        p.head.rev,
        short(&p.head.commit)
    );
    let _ = writeln!(out, "{}", p.summary);
    if let Some(d) = &p.head_diagnostics {
        out.push_str(d);
    }
    for (heading, items) in groups(&p.objects) {
        let _ = writeln!(out, "\n{heading}:");
        for o in items {
            let sign = match o.change {
                "added" => "+",
                "removed" => "-",
                _ => "~",
            };
            let _ = writeln!(out, "  {sign} {}", change_line(o, false));
        }
    }
    let _ = writeln!(out, "\nplacement: {}", placement_summary(&p.placement));
    for l in placement_lines(&p.placement, false) {
        let _ = writeln!(out, "  {l}");
    }
    for (title, rows) in [("capacity", &p.capacity), ("quota", &p.quota)] {
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{title} headroom (before -> after):");
        for h in rows {
            let (a, b, c, d) = headroom_row(h);
            let _ = writeln!(out, "  {a}: {b} -> {c}, {d}");
        }
    }
    let _ = writeln!(out, "\npolicy ({}):", p.policy.source);
    match &p.policy.report {
        None => {
            let _ = writeln!(out, "  not evaluated: the head does not compile");
        }
        Some(r) => {
            for line in policy::report::text(r).lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    for c in &p.policies_changed {
        let _ = writeln!(out, "policy file changed: {c}");
    }
    if let Some(a) = &p.authorization {
        out.push_str(&crate::authz::text(a));
    }
    out
}
