//! `cairn controller bench --leader-failover`: controller replicas on etcd (issue 24),
//! the leader killed with SIGKILL in the middle of a sync → another replica leading,
//! → its `sync-started` of that commit, → that sync's end, each against the election's
//! lease TTL (`CAIRN_ETCD_LEASE_TTL_S`, default 3 s). A benchmark, not a test: it
//! prints each run and the medians.
//!
//! Everything is real and made in a temporary directory: an etcd (Debian's `etcd`,
//! `state_etcd::testing::Etcd`) on `--leader-etcd` (127.0.0.38:23830, its peer port
//! the next), one `cairn-node --simulate N` process serving `--nodes` nodes (default
//! 5, no disks) on consecutive ports of `--leader-address` (127.0.0.51), three
//! `cairn controller --state etcd://…/cairn` processes (this binary) on the next three
//! addresses (127.0.0.52-54), each with its own data directory and a copy of one
//! controller key, following one bare repository whose commits an `ssh-keygen` key
//! signs.
//!
//! Each run pushes a commit adding `--vms` VMs (default 6, diskless, one vm-group);
//! the controllers carry out one step at a time (`--parallelism 1`), each held
//! [`STEP_DELAY_MS`] after its answer (`CAIRN_APPLY_STEP_DELAY_MS`, so that the kill
//! lands mid-sync; set it in the environment to change it). Once the leader recorded
//! [`STEPS_BEFORE_KILL`] steps of that commit (the shared events), it is killed; the
//! times are taken from the kill: another replica's status says `leading` (polled),
//! the new leader's `sync-started` and `sync` events of that commit (their own
//! timestamps). The sync must succeed, and every VM pushed so far must run on exactly
//! one simulated node with `starts` 1 (the node's own counter, read with Observe).
//! The killed replica is started again as a follower before the next run.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::median;
use super::simulate::{
    Dirs, commit_and_push, dirs, free_ports, node_binary, spec, stop_simulators,
};

/// How long each step is held after its answer (unless `CAIRN_APPLY_STEP_DELAY_MS`
/// is set): long enough to kill the leader between steps.
pub const STEP_DELAY_MS: u64 = 200;

/// Steps of the run's commit the leader records before it is killed.
pub const STEPS_BEFORE_KILL: usize = 3;

/// The etcd prefix of the replicas' state.
const PREFIX: &str = "cairn";

/// Where the bench's processes listen.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// etcd's client address (its peer port is the next).
    pub etcd: SocketAddrV4,
    /// The simulated nodes (consecutive ports); the three controllers listen on the
    /// next three addresses.
    pub nodes: Ipv4Addr,
}

/// One `cairn controller --state etcd://…` process.
struct Replica {
    n: usize,
    child: Option<Child>,
    listen: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a replica is started with.
struct Launch<'a> {
    cairn: &'a Path,
    dir: &'a Path,
    bare: &'a Path,
    signers: &'a Path,
    state: &'a str,
    ip: Ipv4Addr,
}

impl Replica {
    /// Starts replica `n` (its data directory `DIR/ctl-N`, kept across restarts).
    fn start(launch: &Launch, n: usize) -> anyhow::Result<Replica> {
        let data_dir = launch.dir.join(format!("ctl-{n}"));
        let log = launch.dir.join(format!("ctl-{n}.log"));
        let port = std::net::TcpListener::bind((launch.ip, 0))?
            .local_addr()?
            .port();
        let listen = format!("{}:{port}", launch.ip);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = Command::new(launch.cairn);
        command
            .arg("controller")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--trusted-keys")
            .arg(launch.signers)
            .args(["--listen", &listen, "--grpc-listen", "none"])
            .args(["--drift-interval", "1h", "--poll", "60s"])
            .args(["--parallelism", "1"])
            .args(["--state", launch.state])
            .arg("--repo")
            .arg(launch.bare)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if std::env::var_os("CAIRN_APPLY_STEP_DELAY_MS").is_none() {
            command.env("CAIRN_APPLY_STEP_DELAY_MS", STEP_DELAY_MS.to_string());
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", launch.cairn.display()))?;
        Ok(Replica {
            n,
            child: Some(child),
            listen,
            data_dir,
            log,
        })
    }

    /// Its HTTP URL (how events and followers name it).
    fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.child.as_ref()?;
        let token = std::fs::read_to_string(crate::control::token_path(&self.data_dir)).ok()?;
        crate::control::fetch_json(&self.url(), path, Some(token.trim())).ok()
    }

    fn replicas(&self) -> Value {
        self.get("/api/v1/status")
            .map(|s| s["controller"]["replicas"].clone())
            .unwrap_or(Value::Null)
    }

    fn leading(&self) -> bool {
        self.replicas()["leading"] == true
    }

    /// The shared history's events of `kind` about `commit` recorded by `by` (a
    /// replica's URL), newest first.
    fn events(&self, kind: &str, commit: &str, by: &str) -> Vec<Value> {
        self.get(&format!("/api/v1/events?limit=2000&kind={kind}"))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["commit"] == commit && e["replica"] == by && e["result"] != "scheduled")
            .collect()
    }

    /// The last "first node call in N ms" its log says (its last term's wait).
    fn first_call_wait_ms(&self) -> Option<u64> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        log.lines().rev().find_map(|l| {
            l.split_once("first node call in ")?
                .1
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `f` every `every` until it gives a value, at most `timeout`.
fn wait<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(every);
    }
}

fn workloads(runs: usize, vms: usize) -> String {
    (0..runs)
        .map(|r| {
            format!(
                "vm-group \"r{r}\" tenant=\"sim\" site=\"s0\" replicas={vms} {{\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n}}\n"
            )
        })
        .collect()
}

/// `/proc/loadavg`'s three averages.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One run's figures, ms from the kill.
#[derive(Debug, Clone)]
struct Sample {
    elected_ms: u64,
    syncing_ms: u64,
    synced_ms: u64,
}

/// `cairn controller bench --leader-failover`.
pub fn run(nodes: usize, vms: usize, runs: usize, keep: bool, at: Addresses) -> anyhow::Result<u8> {
    if let Err(why) = state_etcd::testing::binary() {
        eprintln!("cannot run: {why}");
        return Ok(1);
    }
    if nodes == 0 || vms == 0 || runs == 0 {
        bail!("--nodes, --vms and --runs must be at least 1");
    }
    let ttl = crate::replicas::lease_ttl();
    let node_bin = node_binary()?;
    let cairn = std::env::current_exe()?;
    let Dirs {
        tmp,
        work,
        bare,
        sim: sim_dir,
        key,
        signers,
    } = dirs("cairn-leader-bench", "ctl-1")?;
    // One controller key, copied into every replica's data directory.
    for n in 2..=3 {
        std::fs::create_dir_all(tmp.join(format!("ctl-{n}")))?;
        for file in ["controller.key", "controller.pub"] {
            std::fs::copy(
                tmp.join("ctl-1").join(file),
                tmp.join(format!("ctl-{n}")).join(file),
            )?;
        }
    }
    let base = free_ports(at.nodes, nodes)?;
    let addresses: Vec<String> = (0..nodes)
        .map(|i| format!("{}:{}", at.nodes, usize::from(base) + i))
        .collect();
    std::fs::write(
        work.join("cluster.kdl"),
        spec(nodes, vms * runs, &addresses),
    )?;
    std::fs::write(work.join(".gitignore"), ".cairn/\n")?;
    let etcd = state_etcd::testing::Etcd::start(&at.etcd.ip().to_string(), at.etcd.port(), &tmp)
        .map_err(|e| anyhow::anyhow!(e))?;
    let log = std::fs::File::create(tmp.join("simulator.log"))?;
    let simulator = Command::new(&node_bin)
        .arg("--simulate")
        .arg(nodes.to_string())
        .arg("--listen")
        .arg(&addresses[0])
        .arg("--data-dir")
        .arg(&sim_dir)
        .args(["--disks", "0"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", node_bin.display()))?;
    let mut simulators = vec![simulator];
    let controllers = Ipv4Addr::from(u32::from(at.nodes) + 1);
    let launch = Launch {
        cairn: &cairn,
        dir: &tmp,
        bare: &bare,
        signers: &signers,
        state: &etcd.url(PREFIX),
        ip: controllers,
    };
    println!(
        "leader failover bench: 3 controllers on {}-{} sharing etcd {} (prefix {PREFIX}), lease TTL {} ms; {nodes} simulated nodes on {}; {vms} VMs a run, one step at a time, each held {} ms; killed after {STEPS_BEFORE_KILL} steps",
        controllers,
        Ipv4Addr::from(u32::from(controllers) + 2),
        etcd.client,
        ttl.as_millis(),
        at.nodes,
        std::env::var("CAIRN_APPLY_STEP_DELAY_MS").unwrap_or_else(|_| STEP_DELAY_MS.to_string()),
    );
    let result = measure(&launch, &work, &key, nodes, vms, runs, &addresses);
    stop_simulators(&mut simulators);
    drop(etcd);
    if keep {
        eprintln!("kept {}", tmp.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let samples = result?;
    let ms = |f: fn(&Sample) -> u64| median(samples.iter().map(f).collect());
    let ratio = |v: u64| v as f64 / ttl.as_millis() as f64;
    let (a, b, c) = (
        ms(|s| s.elected_ms),
        ms(|s| s.syncing_ms),
        ms(|s| s.synced_ms),
    );
    println!(
        "median of {runs}: leader killed → another leads {a} ms ({:.2} × TTL), → its sync-started {b} ms ({:.2} × TTL), → that sync succeeded {c} ms ({:.2} × TTL); load average now {}",
        ratio(a),
        ratio(b),
        ratio(c),
        load()
    );
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
fn measure(
    launch: &Launch,
    work: &Path,
    key: &Path,
    nodes: usize,
    vms: usize,
    runs: usize,
    addresses: &[String],
) -> anyhow::Result<Vec<Sample>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The simulated nodes as the specs name them, and a client that observes them with
    // the controller key (reads carry no fencing token: the nodes take them).
    let spec_nodes: std::collections::BTreeMap<String, reconciler::desired::DesiredNode> =
        addresses
            .iter()
            .enumerate()
            .map(|(i, address)| {
                let node = reconciler::desired::DesiredNode {
                    name: format!("n{i}"),
                    site: "s0".to_owned(),
                    address: address.clone(),
                };
                (node.name.clone(), node)
            })
            .collect();
    let identity = proto::auth::Identity::load(&launch.dir.join("ctl-1/controller.key"))?;
    let api = reconciler::nodes::GrpcNodes::new(proto::auth::RequestSigner::new(identity));
    let observe = || runtime.block_on(reconciler::observe::observe(&spec_nodes, &api));
    wait(
        "every simulated node answering",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            let observed = observe();
            let up = observed
                .nodes
                .values()
                .filter(|n| matches!(n, reconciler::observe::NodeObservation::Reachable { .. }))
                .count();
            (up == nodes).then_some(())
        },
    )?;

    let (first, _) = commit_and_push(work, key, "bench: the cluster")?;
    let mut replicas = (1..=3)
        .map(|n| Replica::start(launch, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let logs = |replicas: &[Replica]| {
        replicas
            .iter()
            .map(|r| format!("  {}", r.log.display()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let started = Instant::now();
    let mut leader = wait(
        "a leader",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || replicas.iter().position(Replica::leading),
    )
    .with_context(|| logs(&replicas))?;
    let done = wait(
        "the first sync",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || {
            replicas[leader]
                .events("sync", &first, &replicas[leader].url())
                .into_iter()
                .next()
        },
    )
    .with_context(|| logs(&replicas))?;
    if done["result"] != "succeeded" {
        bail!(
            "the first sync did not succeed: {done}\n{}",
            logs(&replicas)
        );
    }
    println!(
        "cold start: controllers started → ctl-{} leads and synced the cluster commit in {} ms (its first node call waited {} ms)",
        replicas[leader].n,
        started.elapsed().as_millis(),
        replicas[leader]
            .first_call_wait_ms()
            .map_or("?".to_owned(), |w| w.to_string())
    );

    let mut samples = vec![];
    for run in 0..runs {
        // Every follower knows who leads (a follower learns it by its poll).
        let url = replicas[leader].url();
        wait(
            "every follower naming the leader",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                replicas
                    .iter()
                    .all(|r| r.replicas()["leader"] == url.as_str())
                    .then_some(())
            },
        )
        .with_context(|| logs(&replicas))?;
        std::fs::write(work.join("workloads.kdl"), workloads(run + 1, vms))?;
        let (commit, _) = commit_and_push(work, key, &format!("bench: {vms} more VMs ({run})"))?;
        let watcher = (leader + 1) % 3;
        wait(
            "the leader's steps",
            Duration::from_secs(60),
            Duration::from_millis(20),
            || {
                let steps = replicas[watcher].events("step", &commit, &url).len();
                (steps >= STEPS_BEFORE_KILL).then_some(())
            },
        )
        .with_context(|| logs(&replicas))?;
        let load_at_kill = load();
        replicas[leader].kill9();
        let killed = Instant::now();
        let killed_ms = reconciler::state::now_ms();
        let steps_before = replicas[watcher].events("step", &commit, &url).len();
        let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        let next = wait(
            "another replica leading",
            Duration::from_secs(60),
            Duration::from_millis(20),
            || others.iter().copied().find(|i| replicas[*i].leading()),
        )
        .with_context(|| logs(&replicas))?;
        let elected_ms = killed.elapsed().as_millis() as u64;
        let next_url = replicas[next].url();
        // The new leader's own event of `kind` about the commit.
        let event = |kind: &str, timeout: u64| {
            wait(
                &format!("the new leader's {kind}"),
                Duration::from_secs(timeout),
                Duration::from_millis(50),
                || {
                    replicas[next]
                        .events(kind, &commit, &next_url)
                        .into_iter()
                        .next()
                },
            )
            .with_context(|| logs(&replicas))
        };
        let syncing = event("sync-started", 60)?;
        let synced = event("sync", 120)?;
        if synced["result"] != "succeeded" {
            bail!(
                "run {}: the new leader's sync did not succeed: {synced}\n{}",
                run + 1,
                logs(&replicas)
            );
        }
        let at = |e: &Value| {
            e["at_unix_ms"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(killed_ms)
        };
        let sample = Sample {
            elected_ms,
            syncing_ms: at(&syncing),
            synced_ms: at(&synced),
        };
        // Every VM pushed so far runs on exactly one node, started once.
        let observed = observe();
        let by_name = observed.vms();
        let mut wrong = vec![];
        let mut checked = 0;
        for r in 0..=run {
            for i in 0..vms {
                let name = format!("r{r}-{i}");
                let found = by_name.get(name.as_str()).cloned().unwrap_or_default();
                checked += 1;
                match found.as_slice() {
                    [(_, vm)] if vm.starts == 1 && vm.state == proto::v1::VmState::Running => {}
                    other => wrong.push(format!(
                        "{name}: {:?}",
                        other
                            .iter()
                            .map(|(node, vm)| format!("{node} {:?} starts {}", vm.state, vm.starts))
                            .collect::<Vec<_>>()
                    )),
                }
            }
        }
        if !wrong.is_empty() {
            bail!(
                "run {}: VMs not running exactly once: {}\n{}",
                run + 1,
                wrong.join("; "),
                logs(&replicas)
            );
        }
        println!(
            "  run {}: ctl-{} killed after {steps_before} steps (load {load_at_kill}) → ctl-{} leads {} ms, its first node call waited {} ms, → sync-started {} ms, → succeeded {} ms ({} steps, settle+plan {} ms, apply {} ms); {checked} VMs running once",
            run + 1,
            replicas[leader].n,
            replicas[next].n,
            sample.elected_ms,
            replicas[next]
                .first_call_wait_ms()
                .map_or("?".to_owned(), |w| w.to_string()),
            sample.syncing_ms,
            sample.synced_ms,
            synced["detail"]["steps"],
            synced["detail"]["phases"]["plan_ms"],
            synced["detail"]["phases"]["apply_ms"],
        );
        samples.push(sample);
        // The killed replica comes back as a follower of the new leader.
        let killed_n = replicas[leader].n;
        replicas[leader] = Replica::start(launch, killed_n)?;
        leader = next;
    }
    Ok(samples)
}
