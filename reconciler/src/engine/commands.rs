//! The commands: `plan`, `apply`, `status`, `dev up|down`, `force-unlock`.
//! Each returns the exit code of CLI.md.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use proto::auth::RequestSigner;
use sha2::{Digest, Sha256};

use super::Ctx;
use super::apply::{ApplyOptions, apply};
use super::desired::{self, Desired, DesiredNode, Placement, VolumePlacement};
use super::observe::{NodeObservation, Observed, observe};
use super::plan::{Plan, plan};
use super::render;
use super::state::{Applied, PlanRecord, StateStore, now_ms};
use crate::cli::Format;

/// A compiled spec root.
struct Loaded {
    ctx: Ctx,
    model: compiler::Model,
    revision: String,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Compiles the specs; prints diagnostics. `Err(1)` when they have errors.
fn load(dir: &Path, state: Option<&Path>) -> anyhow::Result<Result<Loaded, u8>> {
    let ctx = Ctx::new(dir, state)?;
    let sources = crate::frontend::load(&ctx.spec_root, None)?;
    let compilation = compiler::compile(&sources);
    if !compilation.diagnostics.is_empty() {
        let mut err = std::io::stderr().lock();
        err.write_all(compiler::diag::render_all(&sources, &compilation.diagnostics).as_bytes())?;
    }
    if compilation.has_errors() {
        eprintln!("the specs have errors; nothing was planned or applied");
        return Ok(Err(1));
    }
    let mut files: Vec<(String, String)> = sources
        .files()
        .map(|(id, _)| (sources.path(id).to_owned(), sources.text(id).to_owned()))
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for (path, text) in &files {
        hasher.update(path.as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
    }
    let revision = format!("sources:{}", proto::auth::to_hex(&hasher.finalize()[..8]));
    Ok(Ok(Loaded {
        ctx,
        model: compilation.model,
        revision,
    }))
}

fn spec_nodes(model: &compiler::Model) -> BTreeMap<String, DesiredNode> {
    model
        .sites
        .iter()
        .flat_map(|s| {
            s.nodes.iter().map(|n| {
                (
                    n.name.clone(),
                    DesiredNode {
                        name: n.name.clone(),
                        site: s.name.clone(),
                        address: n.address.clone(),
                    },
                )
            })
        })
        .collect()
}

/// What the nodes run, as a placement (used when the state store has none, e.g.
/// after it was lost: placement then starts from reality).
fn placement_from_observed(observed: &Observed) -> Placement {
    let mut p = Placement::default();
    for (node, obs) in &observed.nodes {
        let NodeObservation::Reachable { vms, volumes, .. } = obs else {
            continue;
        };
        for vm in vms.values() {
            p.vms.entry(vm.name.clone()).or_insert_with(|| node.clone());
        }
        for v in volumes.values().filter(|v| v.role != "replica") {
            p.volumes.insert(
                v.name.clone(),
                VolumePlacement {
                    node: node.clone(),
                    replicas: v.replica_peers.clone(),
                },
            );
        }
    }
    p
}

/// Observes and plans.
async fn make_plan(
    loaded: &Loaded,
    store: &StateStore,
    signer: &RequestSigner,
) -> anyhow::Result<(Desired, Observed, Plan)> {
    let nodes = spec_nodes(&loaded.model);
    let observed = observe(&nodes, signer).await;
    let previous = match store.placement()? {
        Some(p) => p,
        None => placement_from_observed(&observed),
    };
    let placement = desired::place(&loaded.model, Some(&previous));
    let desired = desired::desired(&loaded.model, &loaded.ctx.spec_root, placement);
    let plan = plan(&desired, &observed, &loaded.revision);
    Ok((desired, observed, plan))
}

/// Arguments of `cairn plan`.
#[derive(Debug)]
pub struct PlanArgs {
    /// Spec root.
    pub dir: PathBuf,
    /// State store override.
    pub state: Option<PathBuf>,
    /// Write a signed plan file.
    pub out: Option<PathBuf>,
    /// Output format.
    pub format: Format,
    /// Exit 3 when there are changes.
    pub detailed_exitcode: bool,
    /// One line per change.
    pub concise: bool,
    /// A recorded observation to plan against (no nodes, no state store).
    pub observed: Option<PathBuf>,
}

/// `cairn plan`.
pub fn plan_cmd(args: PlanArgs) -> anyhow::Result<u8> {
    let loaded = match load(&args.dir, args.state.as_deref())? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    if let Some(path) = &args.observed {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read observation {}", path.display()))?;
        let observed: Observed = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a recorded observation", path.display()))?;
        let placement = desired::place(&loaded.model, Some(&placement_from_observed(&observed)));
        let desired = desired::desired(&loaded.model, &loaded.ctx.spec_root, placement);
        let plan = plan(&desired, &observed, &loaded.revision);
        match args.format {
            Format::Text => print!("{}", render::plan_text(&plan, args.concise)),
            Format::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
        }
        return Ok(if args.detailed_exitcode && !plan.is_empty() {
            3
        } else {
            0
        });
    }
    let store = loaded.ctx.store()?;
    let identity = loaded.ctx.identity()?;
    let signer = RequestSigner::new(identity.clone());
    let started = Instant::now();
    let (desired, observed, plan) = runtime()?.block_on(make_plan(&loaded, &store, &signer))?;
    let millis = started.elapsed().as_millis();
    match args.format {
        Format::Text => print!("{}", render::plan_text(&plan, args.concise)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
    }
    if let Some(out) = &args.out {
        render::write_plan_file(
            out,
            &loaded.ctx.spec_root,
            &loaded.ctx.state_path,
            &plan,
            &observed,
            &desired.nodes,
            &identity,
        )
        .with_context(|| format!("cannot write plan file {}", out.display()))?;
        if args.format == Format::Text {
            println!(
                "\nSaved the signed plan to {}; `cairn apply {}` carries out exactly this plan (and refuses it if the cluster changed meanwhile).",
                out.display(),
                out.display()
            );
        }
    }
    if args.format == Format::Text && std::env::var_os("CAIRN_TIMINGS").is_some() {
        eprintln!("planned in {millis} ms");
    }
    store.audit(
        "plan",
        serde_json::json!({"plan_id": plan.plan_id, "revision": plan.revision, "steps": plan.steps.len(), "out": args.out}),
    )?;
    if args.detailed_exitcode && !plan.is_empty() {
        return Ok(3);
    }
    Ok(0)
}

/// Arguments of `cairn apply`.
#[derive(Debug)]
pub struct ApplyArgs {
    /// Spec root or plan file.
    pub target: PathBuf,
    /// State store override.
    pub state: Option<PathBuf>,
    /// Do not ask.
    pub auto_approve: bool,
    /// Steps in flight.
    pub parallelism: usize,
}

/// Releases the apply lock when dropped.
struct LockGuard<'a> {
    store: &'a StateStore,
    id: String,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.store.unlock(&self.id);
    }
}

fn take_lock<'a>(store: &'a StateStore, command: &str) -> anyhow::Result<LockGuard<'a>> {
    let (mine, previous) = store.lock(command)?;
    if let Some(dead) = previous {
        eprintln!(
            "note: took over the lock of apply {} (pid {} is gone)",
            dead.id, dead.pid
        );
    }
    Ok(LockGuard { store, id: mine.id })
}

fn approve() -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "refusing to apply: stdin is not a terminal, so nobody can confirm; pass --auto-approve or apply a saved plan file (`cairn plan --out FILE`, then `cairn apply FILE`)"
        );
        return Ok(false);
    }
    print!("\nDo you want to perform these actions? Only 'yes' is accepted: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

fn execute(
    store: &StateStore,
    signer: &RequestSigner,
    plan: &Plan,
    parallelism: usize,
    resumed: bool,
) -> anyhow::Result<u8> {
    if !resumed {
        store.start_plan(
            &plan.plan_id,
            &PlanRecord {
                plan: serde_json::to_value(plan)?,
                finished: false,
                started_at_unix_ms: now_ms(),
            },
        )?;
    }
    let report = runtime()?.block_on(apply(plan, store, signer, &ApplyOptions { parallelism }))?;
    store.finish_plan(&plan.plan_id)?;
    store.set_placement(&plan.placement)?;
    if !report.failed() {
        store.set_applied(&Applied {
            revision: plan.revision.clone(),
            plan_id: plan.plan_id.clone(),
            at_unix_ms: now_ms(),
        })?;
    }
    store.audit("apply", serde_json::to_value(&report)?)?;
    print!("{}", report.text());
    Ok(if report.failed() { 1 } else { 0 })
}

/// `cairn apply`.
pub fn apply_cmd(args: ApplyArgs) -> anyhow::Result<u8> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if args.target.is_file() {
        return apply_file(&args, &command);
    }
    let loaded = match load(&args.target, args.state.as_deref())? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let store = loaded.ctx.store()?;
    let signer = RequestSigner::new(loaded.ctx.identity()?);
    let _lock = take_lock(&store, &command)?;
    if let Some((plan_id, record)) = store.unfinished_plans()?.pop() {
        let plan: Plan = serde_json::from_value(record.plan)
            .with_context(|| format!("the journaled plan {plan_id} does not decode"))?;
        let journal = store.journal_of(&plan_id)?;
        println!(
            "Resuming plan {plan_id}, interrupted before it finished: {} of {} steps left (steps in flight are re-sent with the same request id; nodes answer those they already did without doing them again).",
            super::apply::remaining(&plan, &journal),
            plan.steps.len()
        );
        return execute(&store, &signer, &plan, args.parallelism, true);
    }
    let (_, _, plan) = runtime()?.block_on(make_plan(&loaded, &store, &signer))?;
    print!("{}", render::plan_text(&plan, false));
    if plan.is_empty() {
        return Ok(0);
    }
    if !args.auto_approve && !approve()? {
        println!("Apply cancelled.");
        return Ok(1);
    }
    execute(&store, &signer, &plan, args.parallelism, false)
}

fn apply_file(args: &ApplyArgs, command: &str) -> anyhow::Result<u8> {
    // The spec root is read from the file, so the controller key is the one of
    // the specs the plan was made for.
    let text = std::fs::read_to_string(&args.target)
        .with_context(|| format!("cannot read {}", args.target.display()))?;
    let root: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a cairn plan file", args.target.display()))?;
    let spec_root = root
        .get("spec_root")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
        .with_context(|| {
            format!(
                "{} is not a cairn plan file (no spec_root)",
                args.target.display()
            )
        })?;
    let state = root
        .get("state")
        .and_then(|v| v.as_str())
        .map(PathBuf::from);
    let ctx = Ctx::new(&spec_root, args.state.as_deref().or(state.as_deref()))?;
    let identity = ctx.identity()?;
    let file = match render::read_plan_file(&args.target, &identity.public_key_hex()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(1);
        }
    };
    let store = ctx.store()?;
    let signer = RequestSigner::new(identity);
    let _lock = take_lock(&store, command)?;
    let now = runtime()?.block_on(observe(&file.nodes, &signer));
    if now.digest() != file.plan.observed_digest {
        let delta = now.delta(&file.observed);
        eprintln!(
            "error: refusing to apply plan {}: the cluster changed since the plan was made ({} difference{}):",
            file.plan.plan_id,
            delta.len(),
            if delta.len() == 1 { "" } else { "s" }
        );
        for line in &delta {
            eprintln!("  {line}");
        }
        eprintln!("Run `cairn plan --out FILE` again and review the new plan.");
        store.audit(
            "apply-refused",
            serde_json::json!({"plan_id": file.plan.plan_id, "reason": "stale", "delta": delta}),
        )?;
        return Ok(1);
    }
    print!("{}", render::plan_text(&file.plan, true));
    let resumed = store.plan(&file.plan.plan_id)?.is_some();
    execute(&store, &signer, &file.plan, args.parallelism, resumed)
}

/// `cairn status`.
pub fn status_cmd(dir: &Path, state: Option<&Path>, format: Format) -> anyhow::Result<u8> {
    let loaded = match load(dir, state)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let store = loaded.ctx.store()?;
    let signer = RequestSigner::new(loaded.ctx.identity()?);
    let nodes = spec_nodes(&loaded.model);
    let observed = runtime()?.block_on(observe(&nodes, &signer));
    let previous = match store.placement()? {
        Some(p) => p,
        None => placement_from_observed(&observed),
    };
    let placement = desired::place(&loaded.model, Some(&previous));
    let desired = desired::desired(&loaded.model, &loaded.ctx.spec_root, placement);
    let last = store.plans()?.pop().map(|(id, record)| {
        let steps = record
            .plan
            .get("steps")
            .and_then(|s| s.as_array())
            .map(Vec::len)
            .unwrap_or(0);
        let journal = store.journal_of(&id).unwrap_or_default();
        super::status::last_apply(&id, record.finished, steps, &journal)
    });
    let mut audit = store.audit_log()?;
    audit.drain(..audit.len().saturating_sub(5));
    let status = super::status::status(&desired, &observed, store.applied()?, last, audit);
    match format {
        Format::Text => print!("{}", super::status::text(&status)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
    }
    Ok(0)
}

/// `cairn dev up`.
pub fn dev_up(dir: &Path) -> anyhow::Result<u8> {
    let loaded = match load(dir, None)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let nodes = spec_nodes(&loaded.model);
    runtime()?.block_on(super::dev::up(&loaded.ctx, &loaded.model, &nodes))
}

/// `cairn dev down`.
pub fn dev_down(dir: &Path) -> anyhow::Result<u8> {
    let ctx = Ctx::new(dir, None)?;
    super::dev::down(&ctx)
}

/// `cairn force-unlock`.
pub fn force_unlock(dir: &Path, state: Option<&Path>, id: &str) -> anyhow::Result<u8> {
    let ctx = Ctx::new(dir, state)?;
    let store = ctx.store()?;
    let holder = store.lock_holder()?;
    match store.unlock(id) {
        Ok(()) => {
            store.audit("force-unlock", serde_json::to_value(&holder)?)?;
            println!("unlocked: removed lock {id}");
            Ok(0)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(1)
        }
    }
}
