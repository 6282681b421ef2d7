//! `cairn controller bench --noop`: a sync with nothing to do, on a generated
//! repository (`cairn gen`'s generator: `--nodes`, `--vms`), against a recorded
//! observation, without a cluster and without gRPC. A benchmark, not a test.
//!
//! The setup (not measured) writes the generated specs and the shipped policies
//! (`policies/`, built in) into a git repository, commits them signed with an
//! ed25519 key made by `ssh-keygen`, places the model and records what the nodes
//! would report if every VM, volume and bond ran where it is placed. Each run
//! then does what the controller's sync does before apply, phase by phase:
//! verify (the commit's SSHSIG against the allowed signers), compile (read the
//! commit's tree, compile, write the checkout), plan (place from the recorded
//! placement, plan against the recorded observation: it must have no step) and
//! policy (the commit's policies judge model, placement and plan). Compile alone
//! is the baseline the total is compared with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use proto::v1::{Health, VmState, VolumeRole};
use reconciler::desired::Desired;
use reconciler::observe::{
    NodeObservation, Observed, ObservedBond, ObservedNetworking, ObservedNic, ObservedVm,
    ObservedVolume,
};

use super::{git, run_ok};

/// The shipped policies and their data, as `policies/` holds them.
const POLICIES: &[(&str, &str)] = &[
    (
        "policies/budget.rego",
        include_str!("../../../policies/budget.rego"),
    ),
    (
        "policies/ft-witness-racks.rego",
        include_str!("../../../policies/ft-witness-racks.rego"),
    ),
    (
        "policies/max-vm-size.rego",
        include_str!("../../../policies/max-vm-size.rego"),
    ),
    (
        "policies/naming-conventions.rego",
        include_str!("../../../policies/naming-conventions.rego"),
    ),
    (
        "policies/no-spot-for-finance.rego",
        include_str!("../../../policies/no-spot-for-finance.rego"),
    ),
    (
        "policies/data/limits.json",
        include_str!("../../../policies/data/limits.json"),
    ),
    (
        "policies/data/prices.json",
        include_str!("../../../policies/data/prices.json"),
    ),
];

/// What the nodes report when everything `desired` names runs where it is
/// placed: VMs running and healthy with their definition and ready NICs,
/// volumes (primary and replica copies) in sync, bonds as defined.
pub fn observation_of(desired: &Desired) -> Observed {
    let mut observed = Observed::default();
    for node in desired.nodes.keys() {
        observed.nodes.insert(
            node.clone(),
            NodeObservation::Reachable {
                public_key_hex: "00".repeat(32),
                vms: Default::default(),
                volumes: Default::default(),
                bonds: Default::default(),
                networking: ObservedNetworking {
                    netns: String::new(),
                    unavailable: String::new(),
                    bond_implementation: "kernel-bond".to_owned(),
                    ..Default::default()
                },
                protections: Default::default(),
                replications: Default::default(),
            },
        );
    }
    // Each node's tenant network segments as defined.
    for (node, segments) in &desired.segments {
        if let Some(NodeObservation::Reachable { networking, .. }) = observed.nodes.get_mut(node) {
            for (key, s) in segments {
                networking.segments.insert(
                    key.clone(),
                    reconciler::observe::ObservedSegment {
                        vni: s.vni,
                        mtu: s.mtu,
                        local_vtep: s.local_vtep.clone(),
                        fdb: s.fdb().into_iter().collect(),
                        drift: vec![],
                        ..Default::default()
                    },
                );
            }
        }
    }
    for vm in desired.vms.values() {
        let Some((vms, _, _)) = reachable(&mut observed, &vm.node) else {
            continue;
        };
        let nics = vm
            .nics
            .iter()
            .enumerate()
            .map(|(i, network)| ObservedNic {
                network: network.clone(),
                tap: format!("tap{i}"),
                bridge: format!("br-{network}"),
                ready: true,
                detail: String::new(),
                mac: String::new(),
                guest_up: true,
            })
            .collect();
        vms.insert(
            vm.name.clone(),
            ObservedVm {
                name: vm.name.clone(),
                state: VmState::Running,
                health: Health::Healthy,
                vcpus: vm.vcpus,
                memory_bytes: vm.memory_bytes,
                crash_count: 0,
                volumes: vm.volumes.clone(),
                nics,
                image: Some(vm.image.clone()),
                starts: 1,
                disks: vec![],
                guest_block_test: String::new(),
                sla: String::new(),
                priority: 0,
                cgroup_drift: vec![],
                dedicated_cpus: String::new(),
                preempted: String::new(),
                ft: vm.ft.as_ref().map(|f| ft_side("primary", f)),
            },
        );
        // An FT pair's secondary: its copy waits on its own node, protected.
        if let Some(f) = &vm.ft {
            let mut copy = vms[&vm.name].clone();
            copy.ft = Some(ft_side("secondary", f));
            if let Some((vms, _, _)) = reachable(&mut observed, &f.secondary) {
                vms.insert(vm.name.clone(), copy);
            }
        }
    }
    for v in desired.volumes.values() {
        let copy = |role, primary: &str, peers: &[String]| ObservedVolume {
            name: v.name.clone(),
            role,
            size_bytes: v.size_bytes,
            stripe_width: v.stripe_width,
            stripe_unit_bytes: v.stripe_unit_bytes,
            replica_peers: peers.to_vec(),
            primary: primary.to_owned(),
            health: Health::Healthy,
            generation: 1,
            epoch: None,
            snapshots: vec![],
            resync: None,
        };
        if let Some((_, volumes, _)) = reachable(&mut observed, &v.node) {
            volumes.insert(v.name.clone(), copy(VolumeRole::Primary, "", &v.replicas));
        }
        for r in &v.replicas {
            if let Some((_, volumes, _)) = reachable(&mut observed, r) {
                volumes.insert(v.name.clone(), copy(VolumeRole::Replica, &v.node, &[]));
            }
        }
    }
    // Each protected VM's schedule on the writer of its first disk.
    for (vm, p) in &desired.protections {
        let writer = p.volumes.first().and_then(|first| {
            desired
                .moved_writers
                .get(first)
                .or_else(|| desired.volumes.get(first).map(|v| &v.node))
        });
        if let Some(NodeObservation::Reachable { protections, .. }) =
            writer.and_then(|node| observed.nodes.get_mut(node))
        {
            protections.insert(
                vm.clone(),
                reconciler::observe::ObservedProtection {
                    plan: p.plan.clone(),
                    volumes: p.volumes.clone(),
                    every_ms: p.every_ms,
                    keep: p.keep,
                    ..Default::default()
                },
            );
        }
    }
    for (node, wanted) in &desired.bonds {
        let Some((_, _, bonds)) = reachable(&mut observed, node) else {
            continue;
        };
        for b in wanted.values() {
            bonds.insert(
                b.name.clone(),
                ObservedBond {
                    name: b.name.clone(),
                    mode: b.mode.clone(),
                    members: b.members.clone(),
                    mtu: b.mtu,
                    miimon_ms: b.miimon_ms,
                    capacity_bps: b.capacity_bps,
                    traffic: b.traffic.clone(),
                    exists: true,
                    implementation: "kernel-bond".to_owned(),
                    active_members: b.members.clone(),
                    health: Health::Healthy,
                    drift: vec![],
                    detail: String::new(),
                },
            );
        }
    }
    observed
}

type NodeParts<'a> = (
    &'a mut BTreeMap<String, ObservedVm>,
    &'a mut BTreeMap<String, ObservedVolume>,
    &'a mut BTreeMap<String, ObservedBond>,
);

/// One side of a protected FT pair, as its node reports it.
fn ft_side(role: &str, ft: &reconciler::desired::DesiredFt) -> reconciler::observe::ObservedFt {
    reconciler::observe::ObservedFt {
        role: role.to_owned(),
        phase: "protected".to_owned(),
        epoch_ms: u64::from(ft.epoch_ms),
        epoch: 1,
        last_acked: 1,
        ..Default::default()
    }
}

/// The VMs, volumes and bonds of a node that answers.
fn reachable<'a>(observed: &'a mut Observed, node: &str) -> Option<NodeParts<'a>> {
    match observed.nodes.get_mut(node) {
        Some(NodeObservation::Reachable {
            vms,
            volumes,
            bonds,
            ..
        }) => Some((vms, volumes, bonds)),
        _ => None,
    }
}

/// Medians of one phase over the runs (ms).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The timings of one run (ms of wall time), and the CPU time the process
/// spent in it (every thread, user and system): on a shared machine the wall
/// time includes waiting for a core, the CPU time does not.
#[derive(Debug, Clone, Default)]
struct Run {
    verify: f64,
    compile: f64,
    plan: f64,
    policy: f64,
    total: f64,
    cpu: f64,
    /// The gate's verdict: `passed` or `refused (N blocking)`.
    verdict: String,
}

/// CPU time of the process so far (ms, every thread, user and system).
fn cpu_ms() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

/// The repository, the key and what the runs start from.
struct Setup {
    repo: PathBuf,
    signers: PathBuf,
    checkout: PathBuf,
    commit: String,
    observed: Observed,
    previous: reconciler::desired::Placement,
    vms: usize,
    steps_from_nothing: usize,
}

fn setup(tmp: &Path, nodes: usize, vms: usize) -> anyhow::Result<Setup> {
    let repo = tmp.join("spec");
    std::fs::create_dir_all(&repo)?;
    let key = tmp.join("key");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f"])
            .arg(&key),
    )
    .context("ssh-keygen makes the signing key (package openssh-client)")?;
    let public = std::fs::read_to_string(tmp.join("key.pub"))?;
    let signers = tmp.join("allowed-signers");
    std::fs::write(&signers, format!("bench@example.com {public}"))?;
    let files = compiler::generate::generate(&compiler::generate::GenConfig {
        nodes,
        vms,
        seed: 1,
    });
    let policies = POLICIES
        .iter()
        .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()));
    for (path, text) in files.into_iter().chain(policies) {
        let path = repo.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
    }
    run_ok(
        Command::new("git")
            .current_dir(&repo)
            .args(["init", "-q", "-b", "main"]),
    )?;
    git(&repo, &key, &["add", "-A"])?;
    git(
        &repo,
        &key,
        &["commit", "-q", "-S", "-m", "bench: a generated repository"],
    )?;
    let commit = git(&repo, &key, &["rev-parse", "HEAD"])?.trim().to_owned();

    // What the last apply left: the placement, and the nodes running it.
    let sources = source(&repo).load(&commit)?;
    let compilation = compiler::compile(&sources);
    if compilation.has_errors() {
        bail!("the generated specs do not compile");
    }
    let model = compilation.model;
    let placement = reconciler::desired::place(&model, None);
    let desired = reconciler::desired::desired(&model, &tmp.join("checkout"), placement);
    let observed = observation_of(&desired);
    // The same nodes answering with nothing on them: what the recording saves.
    let empty = observation_of(&Desired {
        nodes: desired.nodes.clone(),
        ..Desired::default()
    });
    let from_nothing = reconciler::plan::plan(&desired, &empty, &commit);
    Ok(Setup {
        repo,
        signers,
        checkout: tmp.join("checkout"),
        commit,
        observed,
        previous: (*desired.placement).clone(),
        vms: desired.vms.len(),
        steps_from_nothing: from_nothing.steps.len(),
    })
}

fn source(repo: &Path) -> crate::source::GitSource {
    crate::source::GitSource {
        repo: repo.to_owned(),
        branch: "main".to_owned(),
        subdir: PathBuf::new(),
    }
}

/// One sync with nothing to do, phase by phase, as the controller's worker
/// does it before apply.
fn run_once(s: &Setup) -> anyhow::Result<Run> {
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let cpu = cpu_ms();
    let src = source(&s.repo);

    let t = Instant::now();
    let signers = crate::trust::read_signers(&s.signers).map_err(anyhow::Error::msg)?;
    let repo = src.open()?;
    crate::trust::verify(&repo, &s.commit, &signers, &s.signers)
        .map_err(|r| anyhow::anyhow!("the commit is refused: {}", r.reason))?;
    let verify = ms(t);

    let t = Instant::now();
    let sources = src.load(&s.commit)?;
    let compilation = compiler::compile(&sources);
    if compilation.has_errors() {
        bail!("the generated specs do not compile");
    }
    src.materialize(&s.commit, &s.checkout)?;
    let model = compilation.model;
    let compile = ms(t);

    let t = Instant::now();
    let planned = reconciler::pipeline::plan_against(
        &model,
        &s.checkout,
        &s.commit,
        s.observed.clone(),
        &s.previous,
        Default::default(),
    );
    if !planned.plan.steps.is_empty() {
        let first: Vec<String> = planned
            .plan
            .changes
            .iter()
            .take(5)
            .map(|c| {
                format!(
                    "{:?} {} {}: {}",
                    c.kind,
                    c.object,
                    c.name,
                    c.details.join("; ")
                )
            })
            .collect();
        bail!(
            "the plan against the recorded observation is not empty ({} steps), first changes: {}",
            planned.plan.steps.len(),
            first.join(" | ")
        );
    }
    let plan = ms(t);

    let t = Instant::now();
    let policies = policy::PolicySet::load_tree(compiler::source::TreeRoot::Git {
        repo: &repo,
        rev: &s.commit,
        dir: Path::new("policies"),
    })?;
    // A refusal is a verdict too: the gate's time is what is measured.
    let verdict = match reconciler::pipeline::policy_gate(&policies, &model, &planned.plan, &[]) {
        Ok(_) => "passed".to_owned(),
        Err(reconciler::pipeline::PipelineError::PolicyDenied(why)) => {
            format!("refused ({} blocking)", why.len())
        }
        Err(e) => bail!("{e}"),
    };
    let policy = ms(t);
    Ok(Run {
        verify,
        compile,
        plan,
        policy,
        total: ms(started),
        cpu: cpu_ms() - cpu,
        verdict,
    })
}

/// `cairn controller bench --noop`.
pub fn run(nodes: usize, vms: usize, runs: usize, keep: bool) -> anyhow::Result<u8> {
    let tmp = std::env::temp_dir().join(format!("cairn-noop-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let result = setup(&tmp, nodes, vms).and_then(|s| {
        let mut out = vec![];
        for _ in 0..runs.max(1) {
            out.push(run_once(&s)?);
        }
        Ok((s, out))
    });
    if keep {
        eprintln!("kept {}", tmp.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let (s, samples) = result?;
    let col = |f: fn(&Run) -> f64| median(samples.iter().map(f).collect());
    println!(
        "controller bench --noop: a sync with nothing to do, {nodes} nodes, {} VMs placed, against a recorded observation (a plan from nothing would have {} steps), {} runs (medians)",
        s.vms,
        s.steps_from_nothing,
        samples.len()
    );
    for (i, r) in samples.iter().enumerate() {
        println!(
            "  run {}: verify {:.1} ms, compile {:.1} ms, plan {:.1} ms, policy {:.1} ms, total {:.1} ms (CPU {:.1} ms)",
            i + 1,
            r.verify,
            r.compile,
            r.plan,
            r.policy,
            r.total,
            r.cpu
        );
    }
    if let Some(r) = samples.last() {
        println!(
            "  the policy gate's verdict: {} (it is timed either way)",
            r.verdict
        );
    }
    let (compile, total) = (col(|r| r.compile), col(|r| r.total));
    println!("  verify   {:8.1} ms", col(|r| r.verify));
    println!("  compile  {compile:8.1} ms  (the baseline)");
    println!("  plan     {:8.1} ms", col(|r| r.plan));
    println!("  policy   {:8.1} ms", col(|r| r.policy));
    println!(
        "  total    {total:8.1} ms  = {:.2}x compile; budget 2000 ms: {:.2}x of budget",
        total / compile,
        total / 2000.0
    );
    println!(
        "  CPU      {:8.1} ms  (every thread, user + system: the wall time adds waiting for a core on a loaded machine, and threads shorten it)",
        col(|r| r.cpu)
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    /// The recorded observation leaves nothing to do (the bench fails on any
    /// step), at a small scale: SSHSIG verification of a real signed commit,
    /// compile, plan and the shipped policies included.
    #[test]
    fn a_generated_repository_has_nothing_to_do_against_its_recording() {
        if std::process::Command::new("ssh-keygen")
            .arg("-?")
            .output()
            .is_err()
        {
            eprintln!("skipped: ssh-keygen is not installed (package openssh-client)");
            return;
        }
        let tmp = std::env::temp_dir().join(format!("cairn-noop-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("temporary directory");
        let s = super::setup(&tmp, 20, 100);
        let run = s.as_ref().ok().map(super::run_once);
        let _ = std::fs::remove_dir_all(&tmp);
        let s = s.expect("setup");
        assert!(
            s.vms > 0 && s.steps_from_nothing > s.vms,
            "{} VMs, {} steps",
            s.vms,
            s.steps_from_nothing
        );
        let run = run.expect("ran").expect("a sync with nothing to do");
        assert!(run.compile > 0.0 && run.policy > 0.0 && run.total >= run.compile);
        assert!(
            run.verdict == "passed" || run.verdict.starts_with("refused"),
            "{}",
            run.verdict
        );
    }
}
