//! `cairn controller bench --simulate`: the controller against a simulated cluster
//! (`cairn-node --simulate N`, issue 24). A benchmark, not a test: it prints medians.
//!
//! Setup (not measured): a spec repository of `--nodes` nodes in sites of 50 (one
//! bond per site) and `--vms` diskless HA VMs in one vm-group per site, committed
//! signed into a bare repository; one `cairn-node --simulate` process serving every
//! node on `--simulate-address` (127.0.0.42 by default; consecutive ports), trusting the controller key; the
//! controller in this process (so its peak memory is this process's).
//!
//! Measured:
//! - observe: every node observed once (`reconciler::observe::observe`, what the
//!   controller's plan does), before the first apply and after it;
//! - first apply: controller start → the first sync succeeded (every VM created
//!   and started), with the sync's phases;
//! - no-change sync: an empty commit pushed → its sync succeeded (`--runs` times);
//! - a change of `--change` VMs: a commit adding them (one more vm-group per site)
//!   pushed → converged, then one removing them (`--runs` times each);
//! - a one-VM commit: one VM of its own added, then its vCPUs changed (2 ×
//!   `--runs` pushes), each push → converged, with the sync's compile, place,
//!   desired state and diff, and what the plan session did;
//! - peak memory (VmHWM, reset before each phase through /proc/self/clear_refs) of
//!   this process, and the simulator's.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{free_port, git, median, wait_event};

/// Nodes per site (sites are the lease and quorum domain).
const PER_SITE: usize = 50;

pub(super) fn spec(nodes: usize, vms: usize, addresses: &[String]) -> String {
    let sites = nodes.div_ceil(PER_SITE);
    let mut text = String::from(
        "node-class \"sim\" {\n    cpu 64\n    memory \"512GiB\"\n    host-reserve cpu=2 memory=\"16GiB\"\n    disk \"disk0\" size=\"1TiB\" class=\"ssd\"\n    nic \"eth0\" speed=\"25Gbps\"\n    nic \"eth1\" speed=\"25Gbps\"\n}\n\nimage \"tiny\" builtin=\"cairn-guest\"\n\n",
    );
    for s in 0..sites {
        text.push_str(&format!(
            "site \"s{s}\" {{\n    overcommit cpu=4.0 memory=1.0\n    rack \"r{s}\" {{\n"
        ));
        for (i, address) in addresses
            .iter()
            .enumerate()
            .take(((s + 1) * PER_SITE).min(nodes))
            .skip(s * PER_SITE)
        {
            text.push_str(&format!(
                "        node \"n{i}\" class=\"sim\" address=\"{address}\"\n"
            ));
        }
        text.push_str("    }\n    bond \"data\" mode=\"active-backup\" {\n        members \"eth0\" \"eth1\"\n    }\n    pool \"local\" disk-class=\"ssd\" replicas=2 failure-domain=\"node\" {\n        stripe-width 1\n        stripe-unit \"64KiB\"\n    }\n}\n\n");
    }
    text.push_str(&format!(
        "tenant \"sim\" {{\n    quota vcpus={q} memory=\"{m}GiB\" storage=\"10GiB\" vms={q}\n    member \"bench@example.com\" role=\"admin\"\n}}\n",
        q = vms * 2 + 10_000,
        m = (vms * 2 + 10_000) / 16 + 1,
    ));
    text
}

/// One vm-group per site, `vms` VMs spread over them; named `PREFIX{site}`.
fn workloads(nodes: usize, vms: usize, prefix: &str) -> String {
    let sites = nodes.div_ceil(PER_SITE);
    let mut text = String::new();
    for s in 0..sites {
        let here = vms / sites + usize::from(s < vms % sites);
        if here == 0 {
            continue;
        }
        text.push_str(&format!(
            "vm-group \"{prefix}{s}\" tenant=\"sim\" site=\"s{s}\" replicas={here} {{\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n    availability \"ha\"\n}}\n"
        ));
    }
    text
}

/// This process's peak resident memory (VmHWM) in MiB.
fn peak_mib(pid: Option<u32>) -> u64 {
    status_mib(pid, "VmHWM:")
}

/// A figure in kB of /proc/PID/status (this process's without a pid), in MiB.
fn status_mib(pid: Option<u32>, field: &str) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// Resets this process's VmHWM to its current RSS, and gives that RSS (MiB): what
/// a phase's peak starts from.
fn reset_peak() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_mib(None, "VmRSS:")
}

/// Commits everything (or nothing), signed, and pushes: the commit and when the push began.
pub(super) fn commit_and_push(
    work: &Path,
    key: &Path,
    message: &str,
) -> anyhow::Result<(String, u64)> {
    git(work, key, &["add", "-A"])?;
    git(
        work,
        key,
        &["commit", "-q", "-S", "--allow-empty", "-m", message],
    )?;
    let commit = git(work, key, &["rev-parse", "HEAD"])?.trim().to_owned();
    let at = reconciler::state::now_ms();
    git(work, key, &["push", "-q", "origin", "HEAD:main"])?;
    Ok((commit, at))
}

/// What one sync took: push → its sync event, and its phases.
#[derive(Debug, Clone, Default)]
struct Synced {
    total_ms: u64,
    /// Push → the sync started (the worker busy with a drift check, or the push not
    /// yet seen).
    queued_ms: u64,
    compile_ms: u64,
    plan_ms: u64,
    /// The plan's parts: observing, placing, what should run, the steps, the
    /// placement read from the store, the controller's work before and after.
    plan_parts: [u64; 7],
    apply_ms: u64,
    steps: u64,
    /// Nodes the sync found not answering (a `partial` sync; 0 when it succeeded).
    unanswered: u64,
    /// What the plan session did: `part` or why it planned the whole.
    plan_session: String,
    /// The compile phase's parts: the commit's files read from git, the compile
    /// session's compile (with its copy of the compilation).
    compile_parts: (u64, u64),
}

/// The plan's parts a sync event names (`plan_parts`: `NAME_ms`).
const PARTS: [&str; 7] = [
    "observe", "place", "desired", "diff", "load", "prepare", "handover",
];

async fn synced(
    handle: &crate::Handle,
    commit: &str,
    since_ms: u64,
    timeout: Duration,
) -> anyhow::Result<Synced> {
    let done = wait_event(handle, "sync", commit, timeout).await?;
    // A partial sync (nodes that did not answer in time) is still a measurement:
    // reported with how many did not answer.
    if done.result != "succeeded" && done.result != "partial" {
        bail!("the sync of {commit} did not succeed: {done:?}");
    }
    let unanswered = done
        .reason
        .as_deref()
        .map_or(0, |r| r.matches(" did not answer (").count() as u64);
    let detail = done.detail.clone().unwrap_or_default();
    let phase = |name: &str| detail["phases"][format!("{name}_ms")].as_u64().unwrap_or(0);
    let started_at = handle
        .shared
        .events
        .newest(400, Some("sync-started"))?
        .into_iter()
        .find(|e| e.commit.as_deref() == Some(commit))
        .map_or(since_ms, |e| e.at_unix_ms);
    Ok(Synced {
        total_ms: done.at_unix_ms.saturating_sub(since_ms),
        queued_ms: started_at.saturating_sub(since_ms),
        compile_ms: phase("compile"),
        plan_ms: phase("plan"),
        plan_parts: PARTS.map(|part| {
            detail["plan_parts"][format!("{part}_ms")]
                .as_u64()
                .unwrap_or(0)
        }),
        apply_ms: phase("apply"),
        steps: detail["steps"].as_u64().unwrap_or(0),
        unanswered,
        plan_session: match &detail["plan_session"]["full"] {
            serde_json::Value::Null if detail["plan_session"].is_object() => format!(
                "part of {} VMs ({} nodes changed; µs digests, patch, closure, views, plan: {})",
                detail["plan_session"]["planned"][0].as_u64().unwrap_or(0),
                detail["plan_session"]["nodes_changed"]
                    .as_u64()
                    .unwrap_or(0),
                detail["plan_session"]["us"]
            ),
            serde_json::Value::String(why) => format!("whole: {why}"),
            _ => "none".to_owned(),
        },
        compile_parts: (
            detail["compile_session"]["load_ms"].as_u64().unwrap_or(0),
            detail["compile_session"]["compile_ms"]
                .as_u64()
                .unwrap_or(0),
        ),
    })
}

fn line(what: &str, s: &Synced) -> String {
    format!(
        "{what}: {} ms (queued {} ms, compile {} ms, plan {} ms [{}], apply {} ms, {} steps){}",
        s.total_ms,
        s.queued_ms,
        s.compile_ms,
        s.plan_ms,
        PARTS
            .iter()
            .zip(s.plan_parts)
            .map(|(part, ms)| format!("{part} {ms}"))
            .collect::<Vec<_>>()
            .join(", "),
        s.apply_ms,
        s.steps,
        if s.unanswered > 0 {
            format!("; PARTIAL: {} nodes did not answer", s.unanswered)
        } else {
            String::new()
        }
    )
}

fn median_of(samples: &[Synced]) -> Synced {
    let m = |f: fn(&Synced) -> u64| median(samples.iter().map(f).collect());
    Synced {
        total_ms: m(|s| s.total_ms),
        queued_ms: m(|s| s.queued_ms),
        compile_ms: m(|s| s.compile_ms),
        plan_ms: m(|s| s.plan_ms),
        plan_parts: std::array::from_fn(|i| {
            median(samples.iter().map(|s| s.plan_parts[i]).collect())
        }),
        apply_ms: m(|s| s.apply_ms),
        steps: m(|s| s.steps),
        unanswered: m(|s| s.unanswered),
        plan_session: samples
            .last()
            .map(|s| s.plan_session.clone())
            .unwrap_or_default(),
        compile_parts: (m(|s| s.compile_parts.0), m(|s| s.compile_parts.1)),
    }
}

pub(super) fn node_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("CAIRN_NODE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe()?;
    let beside = me
        .parent()
        .context("the binary's directory")?
        .join("cairn-node");
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "no cairn-node next to {} (build it: cargo build --release -p node-runtime, or set CAIRN_NODE_BIN)",
        me.display()
    )
}

/// A base port from which `count` consecutive ports are free on `ip`.
pub(super) fn free_ports(ip: Ipv4Addr, count: usize) -> anyhow::Result<u16> {
    for base in (20_000..60_000 - count).step_by(count.max(100) + 7) {
        let base = base as u16;
        if (0..count).all(|i| std::net::TcpListener::bind((ip, base + i as u16)).is_ok()) {
            return Ok(base);
        }
    }
    bail!("no {count} consecutive free ports on {ip}")
}

/// A simulated-cluster bench's temporary directory and what is in it.
pub(super) struct Dirs {
    /// `TMP/NAME-PID`, made anew.
    pub tmp: PathBuf,
    /// The spec repository (branch `main`).
    pub work: PathBuf,
    /// Its bare origin, which the controller follows.
    pub bare: PathBuf,
    /// The simulator's data directory; its `trusted-controllers` names the controller key.
    pub sim: PathBuf,
    /// The key that signs the commits, and the allowed-signers file naming it.
    pub key: PathBuf,
    pub signers: PathBuf,
}

/// Makes [`Dirs`] for `name`, the controller key in `TMP/CONTROLLER_DIR`.
pub(super) fn dirs(name: &str, controller_dir: &str) -> anyhow::Result<Dirs> {
    let tmp = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let work = tmp.join("spec");
    let bare = tmp.join("origin.git");
    let sim = tmp.join("sim");
    std::fs::create_dir_all(&sim)?;
    let (key, signers) = super::signed_repositories(&tmp, &work, &bare)?;
    let controller_dir = tmp.join(controller_dir);
    std::fs::create_dir_all(&controller_dir)?;
    let controller = proto::auth::Identity::load_or_create(
        &controller_dir.join("controller.key"),
        &controller_dir.join("controller.pub"),
    )?;
    std::fs::write(
        sim.join("trusted-controllers"),
        format!("{} cairn-controller\n", controller.public_key_hex()),
    )?;
    Ok(Dirs {
        tmp,
        work,
        bare,
        sim,
        key,
        signers,
    })
}

/// How the simulated nodes are served.
#[derive(Debug, Clone, Copy)]
pub struct Serving {
    /// The IPv4 address they listen on.
    pub ip: Ipv4Addr,
    /// `cairn-node --simulate` processes, each serving a consecutive share of the nodes.
    pub simulators: usize,
    /// Each process serves its nodes on one port (`--simulate-one-port`), routed by
    /// the node named in each call's metadata; else a port per node.
    pub one_port: bool,
    /// File disks per simulated node (0: none; the bench's VMs are diskless, and each
    /// disk costs a file descriptor and a 4 MiB journal written at creation).
    pub disks: u32,
}

/// This process's open file descriptors.
fn open_fds(pid: Option<u32>) -> usize {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/fd"),
        None => "/proc/self/fd".to_owned(),
    };
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// `cairn controller bench --simulate`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    nodes: usize,
    vms: usize,
    change: usize,
    runs: usize,
    parallelism: usize,
    keep: bool,
    console: bool,
    serving: Serving,
) -> anyhow::Result<u8> {
    let Serving {
        ip,
        simulators,
        one_port,
        disks,
    } = serving;
    if simulators == 0 || simulators > nodes {
        bail!("--simulators {simulators}: between 1 and --nodes ({nodes})");
    }
    let node_bin = node_binary()?;
    // A connection per node, and the git and state files around them.
    if let Err(e) = proto::client::raise_open_file_limit(nodes as u64 * 4 + 1024) {
        eprintln!("warning: {e}");
    }
    let Dirs {
        tmp,
        work,
        bare,
        sim: sim_dir,
        key,
        signers,
    } = dirs("cairn-sim-bench", "spec/.cairn")?;
    // Process p serves nodes [first, first + count): on one port of its own, or on
    // consecutive ports from base + first.
    let per = nodes.div_ceil(simulators);
    let shares: Vec<(usize, usize)> = (0..nodes)
        .step_by(per)
        .map(|first| (first, per.min(nodes - first)))
        .collect();
    let base = free_ports(ip, if one_port { shares.len() } else { nodes })?;
    // One port: `n{i}@IP:PORT`, the node named in each call on its process's port.
    let listens: Vec<String> = (0..nodes)
        .map(|i| {
            let port = if one_port {
                usize::from(base) + i / per
            } else {
                usize::from(base) + i
            };
            format!("{ip}:{port}")
        })
        .collect();
    let addresses: Vec<String> = if one_port {
        listens
            .iter()
            .enumerate()
            .map(|(i, at)| format!("n{i}@{at}"))
            .collect()
    } else {
        listens.clone()
    };
    std::fs::write(work.join("cluster.kdl"), spec(nodes, vms, &addresses))?;
    std::fs::write(work.join("workloads.kdl"), workloads(nodes, vms, "g"))?;
    std::fs::write(work.join(".gitignore"), ".cairn/\n")?;
    let started = Instant::now();
    let mut children = Vec::new();
    for (p, (first, count)) in shares.iter().enumerate() {
        let log = std::fs::File::create(tmp.join(format!("simulator-{p}.log")))?;
        let mut command = Command::new(&node_bin);
        command
            .arg("--simulate")
            .arg(count.to_string())
            .arg("--simulate-first")
            .arg(first.to_string())
            .arg("--listen")
            .arg(&listens[*first])
            .arg("--data-dir")
            .arg(&sim_dir)
            .arg("--disks")
            .arg(disks.to_string())
            .args(["--disk-capacity", "1073741824"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if one_port {
            command.arg("--simulate-one-port");
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", node_bin.display()));
        match child {
            Ok(child) => children.push(child),
            Err(error) => {
                stop_simulators(&mut children);
                return Err(error);
            }
        }
    }
    let simulator_pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let result = measure(
        nodes,
        vms,
        change,
        runs,
        parallelism,
        &work,
        &bare,
        &key,
        &signers,
        started,
        &simulator_pids,
        &addresses,
        console,
    );
    stop_simulators(&mut children);
    if keep {
        eprintln!("kept {}", tmp.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    Ok(0)
}

/// SIGTERM to each simulator this bench started, then SIGKILL after 30 s.
pub(super) fn stop_simulators(children: &mut [std::process::Child]) {
    for child in children.iter() {
        // SAFETY: kill(2) of a simulator this bench spawned (its pid, not a group).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for child in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn measure(
    nodes: usize,
    vms: usize,
    change: usize,
    runs: usize,
    parallelism: usize,
    work: &Path,
    bare: &Path,
    key: &Path,
    signers: &Path,
    started: Instant,
    simulators: &[u32],
    addresses: &[String],
    console: bool,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (first, _) = commit_and_push(work, key, "bench: the cluster")?;
        // Every node answers before anything is measured.
        let spec_nodes: std::collections::BTreeMap<String, reconciler::desired::DesiredNode> =
            (0..nodes)
                .map(|i| {
                    let node = reconciler::desired::DesiredNode {
                        name: format!("n{i}"),
                        site: format!("s{}", i / PER_SITE),
                        address: addresses[i].clone(),
                    };
                    (node.name.clone(), node)
                })
                .collect();
        let identity = proto::auth::Identity::load(&work.join(".cairn/controller.key"))?;
        let api = reconciler::nodes::GrpcNodes::new(proto::auth::RequestSigner::new(identity));
        let deadline = Instant::now() + Duration::from_secs(120 + nodes as u64 / 10);
        let observe_ms = loop {
            let t = Instant::now();
            let observed = reconciler::observe::observe(&spec_nodes, &api).await;
            let reachable = observed
                .nodes
                .values()
                .filter(|n| matches!(n, reconciler::observe::NodeObservation::Reachable { .. }))
                .count();
            if reachable == nodes {
                break t.elapsed().as_millis() as u64;
            }
            if Instant::now() > deadline {
                bail!("only {reachable} of {nodes} simulated nodes answer after {:?}", started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        println!(
            "simulator: {nodes} nodes in {} process(es) answering {} ms after their start; observing every node (first, connections new): {observe_ms} ms",
            simulators.len(),
            started.elapsed().as_millis()
        );
        let mut warm = vec![];
        for _ in 0..runs {
            let t = Instant::now();
            let _ = reconciler::observe::observe(&spec_nodes, &api).await;
            warm.push(t.elapsed().as_millis() as u64);
        }
        println!("observing every node (empty nodes, connections open): median {} ms of {warm:?}; this process has {} open files", median(warm.clone()), open_fds(None));
        drop(api);

        let _ = reset_peak();
        let start_ms = reconciler::state::now_ms();
        let handle = crate::start(crate::Config {
            repo: bare.to_owned(),
            branch: "main".to_owned(),
            subdir: PathBuf::new(),
            data_dir: work.join(".cairn"),
            trusted_keys: Some(signers.to_owned()),
            state: None,
            listen: format!("127.0.0.1:{}", free_port()?).parse()?,
            grpc_listen: None,
            poll: Duration::from_secs(60),
            drift_interval: Duration::from_secs(3600),
            self_heal: true,
            parallelism,
            remote: None,
            webhook_secret: None,
            notify: None,
        })
        .await?;
        let outcome = async {
            let first_apply =
                synced(&handle, &first, start_ms, Duration::from_secs(3600)).await?;
            println!(
                "{}; {:.0} VMs/s; controller peak memory {} MiB",
                line(&format!("first apply of {vms} VMs on {nodes} nodes (controller start → synced)"), &first_apply),
                vms as f64 * 1000.0 / first_apply.total_ms.max(1) as f64,
                peak_mib(None)
            );
            let identity = proto::auth::Identity::load(&work.join(".cairn/controller.key"))?;
            let api = reconciler::nodes::GrpcNodes::new(proto::auth::RequestSigner::new(identity));
            let mut full = vec![];
            for _ in 0..runs.max(1) {
                let t = Instant::now();
                let _ = reconciler::observe::observe(&spec_nodes, &api).await;
                full.push(t.elapsed().as_millis() as u64);
            }
            println!(
                "observing every node with {vms} VMs running (its own connections): median {} ms of {full:?}",
                median(full.clone())
            );
            drop(api);
            if console {
                // The web console on this cluster: its first VM's page, every list.
                return super::console::measure(&handle, "g0-0", runs, 1000.0).await;
            }

            let resident = reset_peak();
            let mut noop = vec![];
            for run in 0..runs {
                let (commit, at) = commit_and_push(work, key, &format!("bench: nothing ({run})"))?;
                noop.push(synced(&handle, &commit, at, Duration::from_secs(600)).await?);
            }
            for (i, s) in noop.iter().enumerate() {
                println!("  {}", line(&format!("no-change sync run {}", i + 1), s));
            }
            println!(
                "{}; controller peak memory {} MiB (resident {resident} MiB before the first)",
                line("no-change sync, push → synced, median", &median_of(&noop)),
                peak_mib(None)
            );

            let resident = reset_peak();
            let (mut added, mut removed) = (vec![], vec![]);
            for run in 0..runs {
                std::fs::write(
                    work.join("workloads.kdl"),
                    workloads(nodes, vms, "g") + &workloads(nodes, change, "c"),
                )?;
                let (commit, at) =
                    commit_and_push(work, key, &format!("bench: {change} more VMs ({run})"))?;
                added.push(synced(&handle, &commit, at, Duration::from_secs(1800)).await?);
                std::fs::write(work.join("workloads.kdl"), workloads(nodes, vms, "g"))?;
                let (commit, at) =
                    commit_and_push(work, key, &format!("bench: {change} VMs fewer ({run})"))?;
                removed.push(synced(&handle, &commit, at, Duration::from_secs(1800)).await?);
            }
            for (i, (a, r)) in added.iter().zip(&removed).enumerate() {
                println!("  run {}: {}; {}", i + 1, line("add", a), line("remove", r));
            }
            println!(
                "{}; {}; controller peak memory {} MiB (resident {resident} MiB before the first)",
                line(&format!("{change}-VM change, push → converged, median: add"), &median_of(&added)),
                line("remove", &median_of(&removed)),
                peak_mib(None)
            );
            // A one-VM commit (issue 24's goal: compiled, placed and planned in under
            // 100 ms): a VM of its own in the first site, in a file of its own (as a
            // team keeps its VMs), its vCPUs changed back and forth. Its first push
            // adds it (the whole is planned).
            let one = "vm \"one\" tenant=\"sim\" site=\"s0\" {\n    cpu CPU\n    memory \"64MiB\"\n    image \"tiny\"\n    availability \"ha\"\n}\n";
            std::fs::write(work.join("workloads.kdl"), workloads(nodes, vms, "g"))?;
            std::fs::write(work.join("one.kdl"), one.replace("CPU", "1"))?;
            let (commit, at) = commit_and_push(work, key, "bench: one VM more")?;
            let added = synced(&handle, &commit, at, Duration::from_secs(1800)).await?;
            println!("  {}", line("one VM added", &added));
            let mut one_vm = vec![];
            for run in 0..runs.max(1) * 2 {
                let cpu = if run % 2 == 0 { "2" } else { "1" };
                std::fs::write(work.join("one.kdl"), one.replace("CPU", cpu))?;
                let (commit, at) =
                    commit_and_push(work, key, &format!("bench: one VM's vCPUs to {cpu} ({run})"))?;
                one_vm.push(synced(&handle, &commit, at, Duration::from_secs(1800)).await?);
            }
            for (i, s) in one_vm.iter().enumerate() {
                println!(
                    "  {}; compile + place + desired + diff {} ms (compile: files read {} ms, session {} ms); plan session: {}",
                    line(&format!("one-VM commit run {}", i + 1), s),
                    s.compile_ms + s.plan_parts[1] + s.plan_parts[2] + s.plan_parts[3],
                    s.compile_parts.0,
                    s.compile_parts.1,
                    s.plan_session
                );
            }
            let m = median_of(&one_vm);
            println!(
                "{}; compiled, placed and planned (compile + place + desired + diff) median {} ms",
                line("one-VM commit, push → converged, median", &m),
                median(
                    one_vm
                        .iter()
                        .map(|s| s.compile_ms + s.plan_parts[1] + s.plan_parts[2] + s.plan_parts[3])
                        .collect()
                )
            );
            println!(
                "simulator peak memory {} MiB, open files {} (summed over {} process(es)); controller open files {}",
                simulators.iter().map(|p| peak_mib(Some(*p))).sum::<u64>(),
                simulators.iter().map(|p| open_fds(Some(*p))).sum::<usize>(),
                simulators.len(),
                open_fds(None),
            );
            Ok::<(), anyhow::Error>(())
        }
        .await;
        handle.stop(Duration::from_secs(30)).await;
        outcome
    })
}
