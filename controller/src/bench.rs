//! `cairn controller bench`: push → sync started and push → converged for a
//! change of N VMs on a local dev cluster, with the sync's phases (verify,
//! compile, plan, apply). A benchmark, not a test: it prints medians.
//!
//! It makes everything in a temporary directory: a spec repository of three
//! dev nodes sized for the VMs, a bare repository the controller follows, an
//! ed25519 key (`ssh-keygen`) that signs every commit, a dev cluster (`cairn dev
//! up`, the `cairn` binary running this), and a controller in this process.
//! Each run pushes a commit adding N VMs (measured), then one removing them.
//!
//! `--noop` measures a sync with nothing to do instead (see [`noop`]): no
//! cluster, a generated repository of `--nodes` nodes and `--vms` VMs.
//! `--failover` measures HA: a node killed → its HA VMs running elsewhere (see
//! [`failover`]). `--console` measures the web console's page loads once the
//! VMs run (see [`console`]). `--leader-failover` measures controller replicas on
//! etcd: the leader killed → another leading and syncing (see [`leader`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::events::Event;

pub mod console;
pub mod failover;
pub mod leader;
pub mod leases;
pub mod noop;
pub mod simulate;

/// Flags of `cairn controller bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// VMs added by each measured commit (default 20); with `--noop`, VMs of
    /// the generated repository (default 10000).
    #[arg(long)]
    pub vms: Option<usize>,
    /// Measure a sync with nothing to do (verify, compile, plan, policy) of a
    /// generated repository against a recorded observation: no cluster.
    #[arg(long, conflicts_with = "failover")]
    pub noop: bool,
    /// Measure the controller on a simulated cluster (`cairn-node --simulate`) of
    /// `--nodes` nodes and `--vms` VMs: observing every node, the first apply, a
    /// no-change sync and a change of `--change` VMs, with peak memory.
    #[arg(long, conflicts_with_all = ["noop", "failover"])]
    pub simulate: bool,
    /// With `--simulate`: VMs added and removed by the measured change.
    #[arg(long, default_value_t = 1000, requires = "simulate")]
    pub change: usize,
    /// With `--simulate`: the IPv4 address the simulated nodes listen on (consecutive
    /// ports from a free base).
    #[arg(long, default_value = "127.0.0.42", requires = "simulate")]
    pub simulate_address: std::net::Ipv4Addr,
    /// With `--simulate`: simulator processes (`cairn-node --simulate`), each serving
    /// a consecutive share of the nodes (one process has a 20,000 open-file limit here).
    #[arg(long, default_value_t = 1, requires = "simulate")]
    pub simulators: usize,
    /// With `--simulate`: each simulator serves its nodes on one port, the node named
    /// in each call's metadata, and the controller shares one connection per port;
    /// else a port (and a connection) per node.
    #[arg(long, requires = "simulate")]
    pub one_port: bool,
    /// With `--simulate`: file disks per simulated node (0: none; the VMs are
    /// diskless, and each disk costs the simulator a file and a 4 MiB journal).
    #[arg(long, default_value_t = 1, requires = "simulate")]
    pub simulate_disks: u32,
    /// With `--simulate`: the controller's node actions in flight at once (at most
    /// 8 on one node), as `cairn controller run --parallelism`.
    #[arg(long, default_value_t = 1024, requires = "simulate")]
    pub parallelism: usize,
    /// Measure HA failover instead: a node killed (its agent and VMMs) → each of
    /// its diskless HA VMs running elsewhere, over `--vms` HA VMs on 3 dev nodes.
    #[arg(long)]
    pub failover: bool,
    /// With `--failover`: cut the node off with nftables (every packet to or from its
    /// address dropped) instead of killing it; the cluster runs in a network namespace
    /// of its own. Needs root, `ip` and `nft`.
    #[arg(long, requires = "failover")]
    pub partition: bool,
    /// Measure the web console instead: each page's load time over HTTP (cold, in
    /// use, at once), once a commit of `--vms` VMs (default 8, the quickstart's size) runs;
    /// with `--simulate`, on the simulated cluster after its first apply.
    #[arg(long, conflicts_with_all = ["noop", "failover"])]
    pub console: bool,
    /// Measure what the lease service computes per node renewal and per status
    /// read at `--nodes` nodes (and a tenth of them, the baseline): no processes.
    #[arg(long, conflicts_with_all = ["noop", "failover", "simulate", "console"])]
    pub leases: bool,
    /// With `--noop`, `--simulate` or `--leases`: nodes of the repository (default
    /// 1000); with `--leader-failover`, simulated nodes (default 5).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Measure the failover of three controller replicas on etcd instead: the leader
    /// killed with SIGKILL mid-sync → another leads, → its sync of that commit started,
    /// → succeeded, against the lease TTL (`CAIRN_ETCD_LEASE_TTL_S`), on a simulated
    /// cluster of `--nodes` nodes, `--vms` VMs pushed a run (default 6).
    #[arg(long, conflicts_with_all = ["noop", "failover", "simulate", "console", "leases"])]
    pub leader_failover: bool,
    /// With `--leader-failover`: etcd's client address (its peer port is the next).
    #[arg(long, default_value = "127.0.0.38:23830", requires = "leader_failover")]
    pub leader_etcd: std::net::SocketAddrV4,
    /// With `--leader-failover`: the simulated nodes listen on this address
    /// (consecutive ports), the three controllers on the next three addresses.
    #[arg(long, default_value = "127.0.0.51", requires = "leader_failover")]
    pub leader_address: std::net::Ipv4Addr,
    /// Measured runs.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Keep the temporary directory (its path is printed).
    #[arg(long)]
    pub keep: bool,
    /// With `--failover`: the three nodes listen on this IPv4 address and the next
    /// two, the controller on the one after them (default: 127.0.0.1 with free ports; with
    /// `--partition`, 127.0.0.21-23 in the bench's own network namespace, named by
    /// `CAIRN_BENCH_NETNS`).
    #[arg(long, requires = "failover")]
    pub failover_address: Option<std::net::Ipv4Addr>,
    /// With `--failover`: the site declares a quorum witness (`cairn dev up` starts
    /// it), on the address after the controller's (default: 127.0.0.1 with a free
    /// port), so each restart waits for the controller to hold the failed node's
    /// witness grant.
    #[arg(long, requires = "failover")]
    pub witness: bool,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn git(dir: &Path, key: &Path, args: &[&str]) -> anyhow::Result<String> {
    run_ok(
        Command::new("git")
            .current_dir(dir)
            .args([
                "-c",
                "user.name=Bench",
                "-c",
                "user.email=bench@example.com",
                "-c",
                "gpg.format=ssh",
                "-c",
            ])
            .arg(format!("user.signingkey={}", key.display()))
            .args(args),
    )
}

/// The spec files: three dev nodes big enough for `vms` VMs of 1 vCPU and 64 MiB.
fn cluster_kdl(ports: &[u16]) -> String {
    let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    cluster_kdl_at(&addresses)
}

/// [`cluster_kdl`] with the nodes at `addresses` (`host:port`).
fn cluster_kdl_at(addresses: &[String]) -> String {
    let nodes: String = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!(
                "        node \"lab-{}\" class=\"bench\" address=\"{a}\"\n",
                i + 1
            )
        })
        .collect();
    format!(
        r#"node-class "bench" {{
    cpu 64
    memory "64GiB"
    host-reserve cpu=1 memory="512MiB"
    disk "disk0" size="2GiB" class="ssd"
    nic "eth0" speed="1Gbps"
}}

site "lab" {{
    overcommit cpu=4.0 memory=1.0
    rack "desk" {{
{nodes}    }}
    pool "local" disk-class="ssd" replicas=2 failure-domain="node" {{
        stripe-width 1
        stripe-unit "64KiB"
    }}
}}

tenant "bench" {{
    quota vcpus=4096 memory="128GiB" storage="10GiB" vms=4096
    member "bench@example.com" role="admin"
}}

image "tiny" builtin="cairn-guest"
"#
    )
}

fn workloads_kdl(vms: usize) -> String {
    if vms == 0 {
        return "// no workloads\n".to_owned();
    }
    format!(
        r#"vm-group "bench" tenant="bench" site="lab" replicas={vms} {{
    cpu 1
    memory "64MiB"
    image "tiny"
}}
"#
    )
}

/// What one measured push took.
#[derive(Debug, Clone, Default)]
struct Sample {
    push_ms: u64,
    detect_ms: u64,
    converged_ms: u64,
    verify_ms: u64,
    compile_ms: u64,
    plan_ms: u64,
    apply_ms: u64,
    steps: u64,
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Waits for the `kind` event of `commit`.
async fn wait_event(
    handle: &crate::Handle,
    kind: &str,
    commit: &str,
    timeout: Duration,
) -> anyhow::Result<Event> {
    let deadline = Instant::now() + timeout;
    loop {
        // A sync's end is in the worker's view before its event is recorded: until
        // it names this commit, the event log is not read (a read of the newest
        // events every 5 ms decoded up to 20,000 step events each time, 23% of
        // the CPU of a 1,000-node apply, taken from the controller it measures).
        if kind == "sync"
            && handle
                .shared
                .view
                .lock()
                .expect("view lock")
                .last_sync
                .as_ref()
                .is_none_or(|last| last.commit != commit)
        {
            if Instant::now() > deadline {
                bail!("no {kind} event for commit {commit} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let found = handle
            .shared
            .events
            .newest(400, Some(kind))?
            .into_iter()
            .find(|e| e.commit.as_deref() == Some(commit) && e.result != "scheduled");
        if let Some(e) = found {
            return Ok(e);
        }
        if Instant::now() > deadline {
            bail!("no {kind} event for commit {commit} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The signing key `TMP/key` (`ssh-keygen`, ed25519), `TMP/allowed-signers` naming it
/// for bench@example.com, the spec repository `work` (branch `main`) and its bare
/// origin `bare`: (key, allowed signers).
fn signed_repositories(tmp: &Path, work: &Path, bare: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(work)?;
    let key = tmp.join("key");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f"])
            .arg(&key),
    )?;
    let public = std::fs::read_to_string(tmp.join("key.pub"))?;
    let signers = tmp.join("allowed-signers");
    std::fs::write(&signers, format!("bench@example.com {public}"))?;
    run_ok(
        Command::new("git")
            .current_dir(work)
            .args(["init", "-q", "-b", "main"]),
    )?;
    run_ok(
        Command::new("git")
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(bare),
    )?;
    git(
        work,
        &key,
        &["remote", "add", "origin", &bare.display().to_string()],
    )?;
    Ok((key, signers))
}

/// Commits `workloads` and pushes; returns the commit and the push's start (Unix ms) and duration.
fn push(work: &Path, key: &Path, vms: usize, message: &str) -> anyhow::Result<(String, u64, u64)> {
    std::fs::write(work.join("workloads.kdl"), workloads_kdl(vms))?;
    git(work, key, &["add", "-A"])?;
    git(work, key, &["commit", "-q", "-S", "-m", message])?;
    let commit = git(work, key, &["rev-parse", "HEAD"])?.trim().to_owned();
    let at = reconciler::state::now_ms();
    let t = Instant::now();
    git(work, key, &["push", "-q", "origin", "HEAD:main"])?;
    Ok((commit, at, t.elapsed().as_millis() as u64))
}

/// A fresh temporary directory `NAME-PID`, or `None` (said why) when /dev/kvm is
/// not usable: the cluster benchmarks start VMs.
fn kvm_and_a_fresh_dir(name: &str) -> anyhow::Result<Option<PathBuf>> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("cannot run: /dev/kvm is not usable here, and the benchmark starts VMs");
        return Ok(None);
    }
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(Some(dir))
}

/// `cairn controller bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<u8> {
    let nodes = args.nodes.unwrap_or(1000);
    if args.leader_failover {
        return leader::run(
            args.nodes.unwrap_or(5),
            args.vms.unwrap_or(6),
            args.runs,
            args.keep,
            leader::Addresses {
                etcd: args.leader_etcd,
                nodes: args.leader_address,
            },
        );
    }
    if args.leases {
        return leases::run(nodes, args.runs);
    }
    if args.noop {
        return noop::run(nodes, args.vms.unwrap_or(10_000), args.runs, args.keep);
    }
    if args.simulate {
        return simulate::run(
            nodes,
            args.vms.unwrap_or(10_000),
            args.change,
            args.runs,
            args.parallelism,
            args.keep,
            args.console,
            simulate::Serving {
                ip: args.simulate_address,
                simulators: args.simulators,
                one_port: args.one_port,
                disks: args.simulate_disks,
            },
        );
    }
    if args.failover {
        return failover::run(
            args.vms.unwrap_or(3),
            args.runs,
            args.keep,
            args.partition,
            args.failover_address,
            args.witness,
        );
    }
    let Some(tmp) = kvm_and_a_fresh_dir("cairn-controller-bench")? else {
        return Ok(1);
    };
    let cairn = std::env::current_exe()?;
    let work = tmp.join("spec");
    let bare = tmp.join("origin.git");
    let (key, signers) = signed_repositories(&tmp, &work, &bare)?;
    let ports = [free_port()?, free_port()?, free_port()?];
    std::fs::write(work.join("cluster.kdl"), cluster_kdl(&ports))?;
    std::fs::write(work.join(".gitignore"), ".cairn/\n")?;
    let up = Command::new(&cairn)
        .args(["dev", "up"])
        .arg(&work)
        .output()?;
    if !up.status.success() {
        bail!(
            "cairn dev up failed: {}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
    }
    let result = measure(&args, &work, &bare, &key, &signers);
    let _ = Command::new(&cairn)
        .args(["dev", "down"])
        .arg(&work)
        .output();
    if args.keep {
        eprintln!("kept {}", tmp.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let samples = result?;
    if args.console {
        return Ok(0);
    }
    let col = |f: fn(&Sample) -> u64| median(samples.iter().map(f).collect());
    println!(
        "controller bench: a commit adding {} VMs on a 3-node dev cluster, {} runs (medians)",
        args.vms.unwrap_or(20),
        args.runs
    );
    for (i, s) in samples.iter().enumerate() {
        println!(
            "  run {}: push {} ms, push → sync started {} ms, push → converged {} ms (verify {} ms, compile {} ms, plan {} ms, apply {} ms, {} steps)",
            i + 1,
            s.push_ms,
            s.detect_ms,
            s.converged_ms,
            s.verify_ms,
            s.compile_ms,
            s.plan_ms,
            s.apply_ms,
            s.steps
        );
    }
    println!(
        "median: push → sync started {} ms; push → converged {} ms = detect {} + verify {} + compile {} + plan {} + apply {} (+ events); git push itself {} ms",
        col(|s| s.detect_ms),
        col(|s| s.converged_ms),
        col(|s| s.detect_ms),
        col(|s| s.verify_ms),
        col(|s| s.compile_ms),
        col(|s| s.plan_ms),
        col(|s| s.apply_ms),
        col(|s| s.push_ms),
    );
    Ok(0)
}

fn measure(
    args: &BenchArgs,
    work: &Path,
    bare: &Path,
    key: &Path,
    signers: &Path,
) -> anyhow::Result<Vec<Sample>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (first, _, _) = push(work, key, 0, "bench: the cluster")?;
        let handle = crate::start(crate::Config {
            repo: bare.to_owned(),
            branch: "main".to_owned(),
            subdir: PathBuf::new(),
            data_dir: work.join(".cairn"),
            trusted_keys: Some(signers.to_owned()),
            state: None,
            listen: "127.0.0.1:0".parse().expect("address"),
            grpc_listen: None,
            poll: Duration::from_secs(60),
            drift_interval: Duration::from_secs(30),
            self_heal: true,
            parallelism: 8,
            remote: None,
            webhook_secret: None,
            notify: None,
        })
        .await?;
        let outcome = async {
            let e = wait_event(&handle, "sync", &first, Duration::from_secs(60)).await?;
            if e.result != "succeeded" && e.result != "partial" {
                bail!("the first sync did not succeed: {e:?}");
            }
            let mut samples = vec![];
            if args.console {
                let vms = args.vms.unwrap_or(8);
                let (commit, _, _) = push(work, key, vms, &format!("bench: {vms} VMs"))?;
                let done = wait_event(&handle, "sync", &commit, Duration::from_secs(600)).await?;
                if done.result != "succeeded" {
                    bail!("the sync of {commit} did not succeed: {done:?}");
                }
                console::measure(&handle, "bench-0", args.runs, 200.0).await?;
                return Ok(samples);
            }
            for run in 0..args.runs {
                let (commit, at, push_ms) = push(
                    work,
                    key,
                    args.vms.unwrap_or(20),
                    &format!("bench: add {} VMs ({run})", args.vms.unwrap_or(20)),
                )?;
                let started =
                    wait_event(&handle, "sync-started", &commit, Duration::from_secs(30)).await?;
                let done = wait_event(&handle, "sync", &commit, Duration::from_secs(600)).await?;
                if done.result != "succeeded" {
                    bail!("the sync of {commit} did not succeed: {done:?}");
                }
                let phase = |name: &str| {
                    done.detail
                        .as_ref()
                        .and_then(|d| d["phases"][format!("{name}_ms")].as_u64())
                        .unwrap_or(0)
                };
                samples.push(Sample {
                    push_ms,
                    detect_ms: started.at_unix_ms.saturating_sub(at),
                    converged_ms: done.at_unix_ms.saturating_sub(at),
                    verify_ms: phase("verify"),
                    compile_ms: phase("compile"),
                    plan_ms: phase("plan"),
                    apply_ms: phase("apply"),
                    steps: done
                        .detail
                        .as_ref()
                        .and_then(|d| d["steps"].as_u64())
                        .unwrap_or(0),
                });
                let (back, _, _) = push(work, key, 0, &format!("bench: remove the VMs ({run})"))?;
                let e = wait_event(&handle, "sync", &back, Duration::from_secs(600)).await?;
                if e.result != "succeeded" {
                    bail!("the sync removing the VMs did not succeed: {e:?}");
                }
            }
            Ok(samples)
        }
        .await;
        handle.stop(Duration::from_secs(30)).await;
        outcome
    })
}
