//! The local dev cluster: one `cairn-node` process per node of a spec, on the
//! node's address from the spec (loopback in the quickstart), each with its data
//! directory under `SPEC_ROOT/.cairn/dev/NODE/`.
//!
//! Trust is set up before any node starts: the controller key
//! (`.cairn/controller.key`) goes into every node's `trusted-controllers`, and every
//! node's identity is created here first so each node's `trusted-peers` can list
//! the others (replicated volumes need peers to trust each other).
//!
//! Nodes run in their own process group (they outlive `cairn dev up`); their pids
//! are in `.cairn/dev/pids.json`; `cairn dev down` stops each group (SIGTERM, then
//! SIGKILL after 10 s) so no node and no VM process is left.
//!
//! Nodes share the host's network namespace: addresses are loopback aliases
//! (127.0.0.11, .12, ...), which Linux routes without configuration. Per-node
//! network namespaces (`network::dev_cluster`) are not used yet.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::auth::{Identity, RequestSigner};

use super::Ctx;
use super::desired::DesiredNode;
use super::observe::connect;

/// Where the node binaries are.
fn find_binary(name: &str) -> Option<PathBuf> {
    let env = format!("CAIRN_{}_BIN", name.replace('-', "_").to_uppercase());
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
    {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn pids_path(ctx: &Ctx) -> PathBuf {
    ctx.cairn_dir.join("dev/pids.json")
}

fn read_pids(ctx: &Ctx) -> BTreeMap<String, u32> {
    std::fs::read_to_string(pids_path(ctx))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Per-node disk layout for `cairn-node --disks N --disk-capacity BYTES`, from the
/// spec: as many disk files as the node has disks, or as the widest stripe of its
/// site's pools needs (a node's volume engine stripes over its own disks), each
/// the size of its smallest disk.
fn disks_of(model: &compiler::Model, node: &str) -> (usize, u64) {
    let Some((site, spec_node)) = model
        .sites
        .iter()
        .find_map(|s| s.nodes.iter().find(|n| n.name == node).map(|n| (s, n)))
    else {
        return (1, 1 << 30);
    };
    let widest = site
        .pools
        .iter()
        .map(|p| p.stripe_width as usize)
        .max()
        .unwrap_or(1);
    let count = spec_node.disks.len().max(widest).clamp(1, 64);
    let smallest = spec_node
        .disks
        .iter()
        .map(|d| d.size_bytes)
        .min()
        .unwrap_or(1 << 30);
    (count, (smallest.max(1 << 20) / 4096) * 4096)
}

/// `cairn dev up`.
pub async fn up(
    ctx: &Ctx,
    model: &compiler::Model,
    nodes: &BTreeMap<String, DesiredNode>,
) -> anyhow::Result<u8> {
    let node_bin = find_binary("cairn-node").context(
        "cannot find the cairn-node binary next to cairn or on PATH; build it with `cargo build -p node-runtime` (or set CAIRN_NODE_BIN)",
    )?;
    if node_bin
        .parent()
        .is_none_or(|d| !d.join("cairn-vmm").is_file())
    {
        eprintln!(
            "warning: no cairn-vmm next to {}; nodes will refuse to start VMs (build it with `cargo build -p vmm`)",
            node_bin.display()
        );
    }
    let dev_dir = ctx.cairn_dir.join("dev");
    std::fs::create_dir_all(&dev_dir)
        .with_context(|| format!("cannot create {}", dev_dir.display()))?;
    let controller = ctx.identity()?;
    let mut pids = read_pids(ctx);
    // Node identities first, so every node can trust every other as a peer.
    let mut keys = BTreeMap::new();
    for node in nodes.values() {
        let dir = dev_dir.join(&node.name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let identity =
            Identity::load_or_create(&dir.join("identity.key"), &dir.join("identity.pub"))
                .with_context(|| format!("node identity of {}", node.name))?;
        keys.insert(node.name.clone(), identity.public_key_hex());
    }
    let mut started = vec![];
    for node in nodes.values() {
        let dir = dev_dir.join(&node.name);
        if let Some(pid) = pids.get(&node.name)
            && super::state::process_alive(*pid)
        {
            println!(
                "{}: already running (pid {pid}) on {}",
                node.name, node.address
            );
            continue;
        }
        // Someone else on the address (another spec's dev cluster, a stale node
        // whose pids file is gone) would answer in our node's place.
        if let Err(error) = std::net::TcpListener::bind(&node.address) {
            stop_started(&pids, &started);
            bail!(
                "cannot start {}: its address {} is not available ({error}); another process listens there (a dev cluster of another spec root? `ss -ltnp | grep {}` shows which); stop it or change the node's address in the spec",
                node.name,
                node.address,
                node.address
            );
        }
        std::fs::write(
            dir.join("trusted-controllers"),
            format!("{} cairn-controller\n", controller.public_key_hex()),
        )?;
        let peers: String = keys
            .iter()
            .filter(|(n, _)| **n != node.name)
            .map(|(n, k)| format!("{k} {n}\n"))
            .collect();
        std::fs::write(dir.join("trusted-peers"), peers)?;
        let (disks, capacity) = disks_of(model, &node.name);
        let log = std::fs::File::create(dir.join("node.log"))?;
        let mut command = std::process::Command::new(&node_bin);
        command
            .arg("--name")
            .arg(&node.name)
            .arg("--listen")
            .arg(&node.address)
            .arg("--data-dir")
            .arg(&dir)
            .arg("--disks")
            .arg(disks.to_string())
            .arg("--disk-capacity")
            .arg(capacity.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: it outlives this command and `dev down` can
            // stop it together with its VM processes.
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", node_bin.display()))?;
        pids.insert(node.name.clone(), child.id());
        started.push(node.name.clone());
    }
    write_pids(ctx, &pids)?;
    // Wait until every node answers Inventory.
    let signer = RequestSigner::new(controller);
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in nodes.values() {
        loop {
            let answer = match connect(&node.address, signer.clone()).await {
                Ok(mut c) => c.get_inventory().await.map_err(|s| s.message().to_owned()),
                Err(e) => Err(e),
            };
            match answer {
                Ok(inv) => {
                    println!(
                        "{}: up on {} (pid {}, data {}, kvm {})",
                        node.name,
                        node.address,
                        pids.get(&node.name).copied().unwrap_or(0),
                        dev_dir.join(&node.name).display(),
                        inv.kernel.map(|k| k.kvm).unwrap_or(false)
                    );
                    break;
                }
                Err(e) => {
                    let pid = pids.get(&node.name).copied().unwrap_or(0);
                    if Instant::now() > deadline || !super::state::process_alive(pid) {
                        let log =
                            std::fs::read_to_string(dev_dir.join(&node.name).join("node.log"))
                                .unwrap_or_default();
                        let tail: Vec<&str> = log
                            .lines()
                            .rev()
                            .take(10)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect();
                        stop_all(ctx)?;
                        bail!(
                            "node {} did not come up on {}: {e}\nlast lines of its log:\n{}\n(every dev node was stopped again)",
                            node.name,
                            node.address,
                            tail.join("\n")
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    println!(
        "dev cluster up: {} nodes. Next: `cairn plan {1}` and `cairn apply {1}`; stop it with `cairn dev down {1}`.",
        nodes.len(),
        ctx.spec_root.display(),
    );
    Ok(0)
}

/// Kills the process group `pgid` only when it is provably one of ours: some
/// live process in it is a `cairn-node` or `cairn-vmm`. Pids are recycled
/// (pid_max is 32768 on these machines), so a recorded pid whose node has
/// exited may by now lead someone else's process group.
fn kill_our_group(pgid: i32) {
    if pgid <= 1 {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let ours = entries.filter_map(Result::ok).any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        // Fields after the name: state, ppid, pgrp.
        let pgrp = rest
            .split_whitespace()
            .nth(2)
            .and_then(|f| f.parse::<i32>().ok());
        pgrp == Some(pgid) && matches!(comm, "cairn-node" | "cairn-vmm")
    });
    if ours {
        // SAFETY: kill(2) of a process group that holds our cairn-node/cairn-vmm processes.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// Stops nodes this run started (when a later one cannot start).
fn stop_started(pids: &BTreeMap<String, u32>, started: &[String]) {
    for name in started {
        if let Some(pid) = pids.get(name)
            && let Ok(raw) = i32::try_from(*pid)
        {
            kill_our_group(raw);
        }
    }
}

fn write_pids(ctx: &Ctx, pids: &BTreeMap<String, u32>) -> anyhow::Result<()> {
    let path = pids_path(ctx);
    std::fs::write(&path, serde_json::to_string_pretty(pids)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

fn stop_all(ctx: &Ctx) -> anyhow::Result<Vec<(String, u32, bool)>> {
    let pids = read_pids(ctx);
    let mut out = vec![];
    for (name, pid) in &pids {
        if !super::state::process_alive(*pid) {
            continue;
        }
        let Ok(raw) = i32::try_from(*pid) else {
            continue;
        };
        // SAFETY: kill(2) with a pid we started; no memory is involved.
        unsafe { libc::kill(raw, libc::SIGTERM) };
        out.push((name.clone(), *pid, false));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for entry in &mut out {
        while super::state::process_alive(entry.1) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if super::state::process_alive(entry.1) {
            entry.2 = true;
        }
    }
    // Anything left in the nodes' process groups (stuck nodes, VM processes) is killed.
    for pid in pids.values() {
        let Ok(raw) = i32::try_from(*pid) else {
            continue;
        };
        kill_our_group(raw);
    }
    for (_, pid, _) in &out {
        let deadline = Instant::now() + Duration::from_secs(5);
        while super::state::process_alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pids_path(ctx));
    Ok(out)
}

/// `cairn dev down`.
pub fn down(ctx: &Ctx) -> anyhow::Result<u8> {
    let stopped = stop_all(ctx)?;
    if stopped.is_empty() {
        println!("no dev nodes were running for {}", ctx.spec_root.display());
    }
    for (name, pid, killed) in &stopped {
        println!(
            "{name}: stopped (pid {pid}{})",
            if *killed { ", killed after 10 s" } else { "" }
        );
    }
    Ok(0)
}
