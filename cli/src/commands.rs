//! The commands: `plan`, `apply`, `status`, `dev up|down`, `force-unlock`.
//! Each returns the exit code of CLI.md.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::cli::Format;
use crate::ctx::Ctx;
use reconciler::apply::ApplyOptions;
use reconciler::desired::{self, BootImage, Placement};
use reconciler::nodes::{GrpcNodes, NodeApi};
use reconciler::observe::{NodeObservation, Observed, observe};
use reconciler::pipeline::{
    self, Interrupted, PipelineError, Planned, defined_images, images_of, placement_from_observed,
    previous_placement, settle_interrupted, spec_nodes, unacceptable,
};
use reconciler::plan::Plan;
use reconciler::render;
use reconciler::state::{StateStore, now_ms};

/// A compiled spec root.
pub(crate) struct Loaded {
    pub(crate) ctx: Ctx,
    /// The spec files (placement diagnostics point into them).
    sources: compiler::Sources,
    compilation: compiler::Compilation,
    revision: String,
}

impl Loaded {
    pub(crate) fn model(&self) -> &compiler::Model {
        &self.compilation.model
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Compiles the specs; prints diagnostics. `Err(1)` when they have errors.
pub(crate) fn load(dir: &Path, state: Option<&Path>) -> anyhow::Result<Result<Loaded, u8>> {
    let ctx = Ctx::new(dir, state)?;
    let compiled = match crate::frontend::compile_specs(
        &ctx.spec_root,
        None,
        crate::frontend::Warnings::Print,
        "the specs have errors; nothing was planned or applied",
    )? {
        Ok(c) => c,
        Err(code) => return Ok(Err(code)),
    };
    let revision = pipeline::revision(&compiled.sources);
    Ok(Ok(Loaded {
        ctx,
        sources: compiled.sources,
        compilation: compiled.compilation,
        revision,
    }))
}

fn plan_against(
    loaded: &Loaded,
    observed: Observed,
    previous: &Placement,
    protected_before: std::collections::BTreeSet<String>,
    cold: bool,
) -> Planned {
    pipeline::plan_against_with(
        loaded.model(),
        &loaded.ctx.spec_root,
        &loaded.revision,
        observed,
        previous,
        protected_before,
        &move_options(cold),
    )
}

/// The plan options of `cairn plan`/`apply`: `--cold` moves running VMs cold.
fn move_options(cold: bool) -> reconciler::plan::PlanOptions {
    reconciler::plan::PlanOptions {
        cold,
        ..Default::default()
    }
}

/// Observes and plans.
async fn make_plan(
    loaded: &Loaded,
    store: &dyn StateStore,
    nodes: &GrpcNodes,
    cold: bool,
) -> Result<Planned, PipelineError> {
    let mut options = move_options(cold);
    // The writers the epoch authority holds (a live migration hands a VM's disks'
    // writer over): a VM's definition attaches a volume where its writer is.
    if let Some(authority) = store.epoch_authority() {
        options.disk_writers = authority
            .all()
            .unwrap_or_default()
            .into_iter()
            .map(|state| (state.volume, state.writer))
            .collect();
    }
    pipeline::plan_revision_with(
        loaded.model(),
        &loaded.ctx.spec_root,
        &loaded.revision,
        store,
        nodes,
        &options,
    )
    .await
}

/// Carries out `plan` as a new execution, printing its progress and its end
/// report; the exit code of CLI.md.
fn execute(
    store: &dyn StateStore,
    nodes: &GrpcNodes,
    plan: &Plan,
    images: &BTreeMap<String, BootImage>,
    parallelism: usize,
    interrupted: Option<&Interrupted>,
) -> anyhow::Result<u8> {
    let executed = match runtime()?.block_on(pipeline::execute(
        store,
        nodes,
        plan,
        images,
        &ApplyOptions::new(parallelism),
        interrupted,
        &crate::progress::Progress::new(),
    )) {
        Ok(e) => e,
        Err(PipelineError::MissingImages(missing)) => {
            eprintln!(
                "error: refusing to apply: images the plan needs are missing; nothing was sent:"
            );
            for m in &missing {
                eprintln!("  {m}");
            }
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    print!("{}", executed.report.text());
    if !executed.problems.is_empty() {
        println!(
            "Not converged: the cluster does not match the specs yet ({}).",
            executed.problems.join("; ")
        );
    }
    Ok(if executed.converged() { 0 } else { 1 })
}

fn nothing_to_do(
    store: &dyn StateStore,
    plan: &Plan,
    interrupted: Option<&Interrupted>,
) -> anyhow::Result<u8> {
    Ok(if pipeline::nothing_to_do(store, plan, interrupted)? {
        0
    } else {
        1
    })
}

/// The policy gate of `apply`: the spec root's `policies/` judge the model, the
/// plan's placement and the plan. `Ok(true)`: go on (warnings and advisory
/// results printed); `Ok(false)`: refused, printed and audited.
fn gate(loaded: &Loaded, store: &dyn StateStore, plan: &Plan) -> anyhow::Result<bool> {
    let dir = loaded.ctx.spec_root.join("policies");
    if !dir.is_dir() {
        return Ok(true);
    }
    let policies = policy::set::PolicySet::load_dir(&dir)?;
    match pipeline::policy_gate(&policies, loaded.model(), plan, &[]) {
        Ok(report) => {
            if !report.findings.is_empty() {
                eprint!("{}", policy::report::text(&report));
            }
            Ok(true)
        }
        Err(PipelineError::PolicyDenied(denied)) => {
            eprintln!(
                "error: refusing to apply: the policies in {} deny this plan; nothing was sent:",
                dir.display()
            );
            for d in &denied {
                eprintln!("  {d}");
            }
            eprintln!(
                "`cairn check {} --plan FILE` (with `cairn plan --format json` saved to FILE) shows the full report.",
                loaded.ctx.spec_root.display()
            );
            store.audit(
                "apply-refused",
                serde_json::json!({"plan_id": plan.plan_id, "reason": "policy", "denied": denied}),
            )?;
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints the diagnostics of VMs that cannot be placed (errors with spans; spot
/// VMs get warnings), as `cairn validate` does.
fn print_unplaced(loaded: &Loaded, placement: &compiler::place::Placement) -> anyhow::Result<()> {
    let diagnostics = crate::placecmd::unplaced_diagnostics(&loaded.compilation, placement);
    if diagnostics.is_empty() {
        return Ok(());
    }
    let mut err = std::io::stderr().lock();
    err.write_all(compiler::diag::render_all(&loaded.sources, &diagnostics).as_bytes())?;
    Ok(())
}

/// The exit code of a plan (CLI.md): 1 when it must not be applied or applying it
/// would not make the cluster match the specs (a node down, a VM without a
/// node); otherwise 3 for pending changes with `--detailed-exitcode`, else 0.
fn plan_exit(plan: &Plan, detailed_exitcode: bool) -> u8 {
    if unacceptable(plan).is_some() || !plan.not_converged().is_empty() {
        1
    } else if detailed_exitcode && !plan.is_empty() {
        3
    } else {
        0
    }
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
    /// Move running VMs cold instead of live.
    pub cold: bool,
}

fn print_plan(plan: &Plan, format: Format, concise: bool) -> anyhow::Result<()> {
    match format {
        Format::Text => print!("{}", render::plan_text(plan, concise)),
        Format::Json => println!("{}", serde_json::to_string_pretty(plan)?),
    }
    Ok(())
}

/// `cairn plan`.
pub fn plan_cmd(args: PlanArgs) -> anyhow::Result<u8> {
    let loaded = match load(&args.dir, args.state.as_deref())? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    if let Some(path) = &args.observed {
        let observed = match recorded_observation(path)? {
            Ok(o) => o,
            Err(code) => return Ok(code),
        };
        let previous = placement_from_observed(&observed);
        let planned = plan_against(&loaded, observed, &previous, Default::default(), args.cold);
        print_unplaced(&loaded, &planned.desired.placement)?;
        print_plan(&planned.plan, args.format, args.concise)?;
        return Ok(plan_exit(&planned.plan, args.detailed_exitcode));
    }
    let store = loaded.ctx.store()?;
    let identity = loaded.ctx.identity()?;
    let nodes = GrpcNodes::new(loaded.ctx.signer()?);
    let started = Instant::now();
    let planned = runtime()?.block_on(make_plan(&loaded, &store, &nodes, args.cold))?;
    let millis = started.elapsed().as_millis();
    print_unplaced(&loaded, &planned.desired.placement)?;
    print_plan(&planned.plan, args.format, args.concise)?;
    let plan = &planned.plan;
    if let Some(out) = &args.out {
        if let Some(why) = unacceptable(plan) {
            eprintln!(
                "error: no plan file written to {}: this plan cannot be applied: {why}",
                out.display()
            );
            return Ok(1);
        }
        render::write_plan_file(
            out,
            &loaded.ctx.spec_root,
            &loaded.ctx.state_path,
            plan,
            &planned.observed,
            &planned.desired.nodes,
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
    Ok(plan_exit(plan, args.detailed_exitcode))
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
    /// Move running VMs cold instead of live.
    pub cold: bool,
}

/// Releases the apply lock when dropped.
struct LockGuard<'a> {
    store: &'a dyn StateStore,
    id: String,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.store.unlock(&self.id);
    }
}

fn take_lock<'a>(store: &'a dyn StateStore, command: &str) -> anyhow::Result<LockGuard<'a>> {
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
    let nodes = GrpcNodes::new(loaded.ctx.signer()?);
    let _lock = take_lock(&store, &command)?;
    let rt = runtime()?;
    let interrupted = rt.block_on(settle_interrupted(&store, &nodes))?;
    let planned = rt.block_on(make_plan(&loaded, &store, &nodes, args.cold))?;
    let plan = &planned.plan;
    if let Some(i) = &interrupted {
        print!("{}", i.describe());
        if i.plan.revision != plan.revision {
            println!(
                "The specs changed since ({} then, {} now). The interrupted plan was:\n{}\nThe plan for the specs as they are now:",
                i.plan.revision,
                plan.revision,
                render::plan_text(&i.plan, true).trim_end()
            );
        }
    }
    print_unplaced(&loaded, &planned.desired.placement)?;
    print!("{}", render::plan_text(plan, false));
    if let Some(why) = unacceptable(plan) {
        eprintln!("error: refusing to apply: {why}; nothing was sent");
        store.audit(
            "apply-refused",
            serde_json::json!({"plan_id": plan.plan_id, "reason": why}),
        )?;
        return Ok(1);
    }
    if plan.is_empty() {
        return nothing_to_do(&store, plan, interrupted.as_ref());
    }
    if !gate(&loaded, &store, plan)? {
        return Ok(1);
    }
    let approved_before = interrupted.as_ref().is_some_and(|i| i.covers(plan));
    if approved_before {
        println!(
            "\nContinuing without asking: this only finishes what the interrupted plan was approved to do."
        );
    } else if !args.auto_approve && !approve()? {
        println!("Apply cancelled.");
        return Ok(1);
    }
    let images = images_of(&planned.desired);
    execute(
        &store,
        &nodes,
        plan,
        &images,
        args.parallelism,
        interrupted.as_ref(),
    )
}

fn apply_file(args: &ApplyArgs, command: &str) -> anyhow::Result<u8> {
    // The spec root is read from the file, so the controller key is the one of
    // the specs the plan was made for. Nothing is written anywhere before the
    // file's signature is verified against that key.
    let text = std::fs::read_to_string(&args.target)
        .with_context(|| format!("cannot read {}", args.target.display()))?;
    let not_a_plan = |why: String| {
        eprintln!(
            "error: {} is not a cairn plan file: {why}",
            args.target.display()
        );
        Ok(1)
    };
    let root: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return not_a_plan(format!("it is not JSON ({e})")),
    };
    let Some(spec_root) = root
        .get("spec_root")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
    else {
        return not_a_plan("it has no spec_root".to_owned());
    };
    let state = root
        .get("state")
        .and_then(|v| v.as_str())
        .map(PathBuf::from);
    let key_path = spec_root.join(".cairn/controller.key");
    let identity = match proto::auth::Identity::load(&key_path) {
        Ok(i) => i,
        Err(e) => {
            eprintln!(
                "error: refusing plan file {}: it names spec root {}, which has no controller key ({e}); a plan file is applied with the key of the spec root it was made for",
                args.target.display(),
                spec_root.display()
            );
            return Ok(1);
        }
    };
    let file = match render::read_plan_file(&args.target, &identity.public_key_hex()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(1);
        }
    };
    if let Some(why) = unacceptable(&file.plan) {
        eprintln!("error: refusing to apply: {why}; nothing was sent");
        return Ok(1);
    }
    let ctx = Ctx::new(&spec_root, args.state.as_deref().or(state.as_deref()))?;
    let store = ctx.store()?;
    let nodes = GrpcNodes::new(ctx.signer()?);
    let _lock = take_lock(&store, command)?;
    let rt = runtime()?;
    let interrupted = rt.block_on(settle_interrupted(&store, &nodes))?;
    if let Some(i) = &interrupted {
        print!("{}", i.describe());
    }
    let now = rt.block_on(observe(&file.nodes, &nodes));
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
    if file.plan.is_empty() {
        return nothing_to_do(&store, &file.plan, interrupted.as_ref());
    }
    execute(
        &store,
        &nodes,
        &file.plan,
        &defined_images(&file.plan),
        args.parallelism,
        interrupted.as_ref(),
    )
}

/// `cairn status`.
pub fn status_cmd(dir: &Path, state: Option<&Path>, format: Format) -> anyhow::Result<u8> {
    let loaded = match load(dir, state)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let store = loaded.ctx.store()?;
    let nodes = GrpcNodes::new(loaded.ctx.signer()?);
    let spec = spec_nodes(loaded.model());
    let observed = runtime()?.block_on(observe(&spec, &nodes));
    let previous = previous_placement(store.placement()?, &observed);
    let placement = desired::place(loaded.model(), Some(&previous));
    let desired = desired::desired(loaded.model(), &loaded.ctx.spec_root, placement);
    let last = store
        .last_execution_summary()?
        .map(|record| reconciler::status::last_apply(&record, &store));
    let audit = store.recent_audit(5)?;
    let mut status = reconciler::status::status(&desired, &observed, store.applied()?, last, audit);
    reconciler::status::mark_maintenance(&mut status, &loaded.model().nodes_in_maintenance());
    reconciler::status::mark_migrations(&mut status, store.migrations()?);
    match format {
        Format::Text => print!("{}", reconciler::status::text(&status)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
    }
    Ok(0)
}

/// A recorded observation (`--observed FILE` of plan and status), or exit code 1 with
/// the error printed when the file is not one.
fn recorded_observation(path: &Path) -> anyhow::Result<Result<Observed, u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read observation {}", path.display()))?;
    Ok(serde_json::from_str(&text).map_err(|e| {
        eprintln!(
            "error: {} is not a recorded observation: {e}",
            path.display()
        );
        1
    }))
}

/// `cairn status --observed FILE`: the status of a recorded observation, without
/// nodes, controller or state store (what was applied, the audit and migrations are
/// left out), so what status prints can be pinned by golden tests.
pub fn status_observed(
    dir: &Path,
    state: Option<&Path>,
    format: Format,
    path: &Path,
) -> anyhow::Result<u8> {
    let loaded = match load(dir, state)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let observed = match recorded_observation(path)? {
        Ok(o) => o,
        Err(code) => return Ok(code),
    };
    let previous = placement_from_observed(&observed);
    let placement = desired::place(loaded.model(), Some(&previous));
    let desired = desired::desired(loaded.model(), &loaded.ctx.spec_root, placement);
    let mut status = reconciler::status::status(&desired, &observed, None, None, vec![]);
    reconciler::status::mark_maintenance(&mut status, &loaded.model().nodes_in_maintenance());
    match format {
        Format::Text => print!("{}", reconciler::status::text(&status)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
    }
    Ok(0)
}

/// `cairn dev up`.
pub fn dev_up(dir: &Path, lease_from: Option<&str>) -> anyhow::Result<u8> {
    let loaded = match load(dir, None)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let nodes = spec_nodes(loaded.model());
    runtime()?.block_on(crate::dev::up(
        &loaded.ctx,
        loaded.model(),
        &nodes,
        lease_from,
    ))
}

/// `cairn dev down`.
pub fn dev_down(dir: &Path) -> anyhow::Result<u8> {
    let ctx = Ctx::new(dir, None)?;
    crate::dev::down(&ctx)
}

/// `cairn force-unlock`: removes the apply lock with this id. A holder that is
/// still alive on this host (or on another host, where it cannot be checked) is
/// refused unless `force`: two applies running one plan at once is what the lock
/// is for.
pub fn force_unlock(dir: &Path, state: Option<&Path>, id: &str, force: bool) -> anyhow::Result<u8> {
    let ctx = Ctx::new(dir, state)?;
    let store = ctx.store()?;
    let holder = store.lock_holder()?;
    if let Some(h) = holder.as_ref().filter(|h| h.id == id) {
        let here = h.host == reconciler::state::hostname();
        let alive = here && reconciler::state::process_alive(h.pid);
        if (alive || !here) && !force {
            eprintln!(
                "error: lock {id} is held by {}pid {} on {} since {} ms after the epoch (`{}`); {}. Wait for it to finish; pass --force only if you are sure it is not running",
                if alive { "live " } else { "" },
                h.pid,
                h.host,
                h.since_unix_ms,
                h.command,
                if alive {
                    "that process is still running"
                } else {
                    "it runs on another host, so cairn cannot tell whether it is alive"
                }
            );
            return Ok(1);
        }
    }
    match store.unlock(id) {
        Ok(()) => {
            store.audit(
                "force-unlock",
                serde_json::json!({"holder": holder, "force": force}),
            )?;
            println!("unlocked: removed lock {id}");
            Ok(0)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(1)
        }
    }
}

/// `cairn volume export VM/DISK`: asks the node holding the volume's primary copy
/// to export it on an owner-only unix socket for `lifetime`, and prints the URI.
pub fn volume_export(
    dir: &Path,
    state: Option<&Path>,
    target: &str,
    lifetime: &str,
) -> anyhow::Result<u8> {
    let lifetime_ms = match compiler::units::parse_duration(lifetime) {
        Ok(ms) => ms,
        Err(e) => {
            eprintln!("error: --lifetime {lifetime}: {e} (for example `30m` or `2h`)");
            return Ok(2);
        }
    };
    let loaded = match load(dir, state)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let (vm_name, _, volume) = match crate::volumecmd::resolve(loaded.model(), target) {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let vm_name = vm_name.as_str();
    let store = loaded.ctx.store()?;
    let nodes = GrpcNodes::new(loaded.ctx.signer()?);
    let spec = spec_nodes(loaded.model());
    let rt = runtime()?;
    let observed = rt.block_on(observe(&spec, &nodes));
    let primary = observed.nodes.iter().find_map(|(node, o)| match o {
        NodeObservation::Reachable { volumes, .. } => volumes
            .get(&volume)
            .filter(|v| v.role != proto::v1::VolumeRole::Replica)
            .map(|_| node.clone()),
        NodeObservation::Unreachable { .. } => None,
    });
    let Some(node) = primary else {
        let down: Vec<&String> = observed
            .nodes
            .iter()
            .filter(|(_, o)| matches!(o, NodeObservation::Unreachable { .. }))
            .map(|(n, _)| n)
            .collect();
        eprintln!(
            "error: no node that answered holds volume {volume}{}; `cairn apply` makes it",
            if down.is_empty() {
                String::new()
            } else {
                format!(
                    " (not answering: {})",
                    down.iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        return Ok(1);
    };
    let address = spec[&node].address.clone();
    // A running VM's disk is exported read-only: a second writer beside its guest
    // would change the disk under its file system (the node refuses a writable one).
    let running_on = observed.nodes.iter().find_map(|(node, o)| match o {
        NodeObservation::Reachable { vms, .. } => vms
            .get(vm_name)
            .filter(|vm| vm.is_running())
            .map(|_| node.clone()),
        NodeObservation::Unreachable { .. } => None,
    });
    let request = proto::v1::ApplyRequest {
        request_id: format!("export-{}", reconciler::state::random_id()),
        action: Some(proto::v1::apply_request::Action::ExportVolume(
            proto::v1::ExportVolume {
                name: volume.clone(),
                lifetime_seconds: lifetime_ms.div_ceil(1000),
                // A DR copy is written by its replication only.
                read_only: running_on.is_some() || target.contains('@'),
            },
        )),
    };
    let answer = rt.block_on(nodes.apply(&node, &address, request));
    let result = match answer {
        Ok(response) => response.result,
        Err(e) => {
            eprintln!("error: node {node} did not export {volume}: {e}");
            return Ok(1);
        }
    };
    let Some(proto::v1::apply_response::Result::ExportVolume(export)) = result else {
        eprintln!("error: node {node} answered the export of {volume} without a URI");
        return Ok(2);
    };
    store.audit(
        "volume-export",
        serde_json::json!({"volume": volume, "node": node, "uri": export.uri, "expires_at_unix_ms": export.expires_at_unix_ms, "read_only": export.read_only}),
    )?;
    println!("{}", export.uri);
    if target.contains('@') {
        eprintln!(
            "read-only: {volume} is a DR copy, written by its replication only; `cairn volume restore {target} --snapshot ID --as NAME` makes a writable volume of one of its snapshots"
        );
    } else if let Some(running) = &running_on {
        eprintln!(
            "read-only: vm `{vm_name}` is running on node {running}; stop it for a writable export"
        );
    }
    let until = if export.expires_at_unix_ms == 0 {
        "until it is unexported".to_owned()
    } else {
        format!(
            "for {}",
            compiler::units::format_duration(export.expires_at_unix_ms.saturating_sub(now_ms()))
        )
    };
    eprintln!(
        "exported {volume} on node {node} {until}: local clients on that node, as its user (or root), e.g. `nbdinfo '{}'`",
        export.uri
    );
    Ok(0)
}
