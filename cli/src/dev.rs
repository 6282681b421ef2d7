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
//! Networking: as root with network namespaces available, each node gets its own
//! network namespace (`cairn-HASH-NODE`, HASH from the spec root's path) whose
//! "physical NICs" — the spec node's NICs and its site's bond members, by their spec
//! names — are veth pairs into one shared switch namespace (`cairn-HASH-sw`, a
//! bridge). `cairn-node --netns` makes its bonds, HTB classes and taps there; its
//! gRPC server stays on the host's loopback (addresses 127.0.0.11, .12, ... from the
//! spec), so the controller reaches it as before. `cairn dev down` deletes every
//! namespace of the prefix (their veths, bridges and qdiscs go with them).
//!
//! Witnesses: every site `witness` of the spec (its `address=` and its `alternate=`)
//! gets a `cairn witness` on that address, started before the nodes, with its data
//! directory under `.cairn/dev/witness-SITE` (`-alternate`), trusting the controller
//! key and the site's node keys; their pids are in `.cairn/dev/witnesses.json` and
//! `dev down` stops them after the nodes. A witness left running is kept (its grant
//! numbers only ever rise); its data directory is never wiped.
//!
//! Without that capability nodes run with `--network-disabled REASON`: they never
//! touch the host's network, report the reason in Inventory and Observe, and refuse
//! network actions; `cairn plan` shows their bonds as not made, with the reason.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::auth::{Identity, RequestSigner};

use crate::ctx::Ctx;
use reconciler::desired::DesiredNode;
use reconciler::nodes::connect;

/// Where the node binaries are: `CAIRN_NODE_BIN` for `cairn-node` (`CAIRN_VMM_BIN` for
/// `cairn-vmm`), else beside `cairn`, else on PATH.
pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    let short = name.strip_prefix("cairn-").unwrap_or(name);
    let env = format!("CAIRN_{}_BIN", short.replace('-', "_").to_uppercase());
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

fn network_path(ctx: &Ctx) -> PathBuf {
    ctx.cairn_dir.join("dev/network.json")
}

/// The dev cluster's namespaces, recorded so `dev down` removes them even when the
/// spec changed since `dev up`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct DevNetwork {
    /// Prefix of every namespace of this dev cluster.
    prefix: String,
    /// Node → its namespace.
    nodes: BTreeMap<String, String>,
}

/// `cairn-` + 8 hex digits of the spec root's absolute path + `-`: unique per spec
/// root, so two dev clusters on one machine never share a namespace.
fn netns_prefix(ctx: &Ctx) -> String {
    let root = std::fs::canonicalize(&ctx.spec_root).unwrap_or_else(|_| ctx.spec_root.clone());
    format!(
        "cairn-{:08x}-",
        fnv1a_32(root.as_os_str().as_encoded_bytes())
    )
}

/// A node's namespace name: `PREFIX + node` (≤ 64 characters, else hashed).
fn node_netns(prefix: &str, node: &str) -> String {
    let name = format!("{prefix}{node}");
    if name.len() <= 64 {
        return name;
    }
    format!("{prefix}n{:08x}", fnv1a_32(node.as_bytes()))
}

/// 32-bit FNV-1a: short, stable names derived from longer ones.
fn fnv1a_32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

/// A node's NICs in its dev namespace: the spec node's NICs, then its site's bond
/// members not among them, by their spec names.
fn dev_nics(model: &compiler::Model, node: &str) -> Vec<String> {
    let mut nics: Vec<String> = vec![];
    for site in &model.sites {
        let Some(spec_node) = site.nodes.iter().find(|n| n.name == node) else {
            continue;
        };
        let members = site.bonds.iter().flat_map(|b| b.members.iter());
        for nic in spec_node.nics.iter().map(|n| &n.name).chain(members) {
            if !nics.contains(nic) {
                nics.push(nic.clone());
            }
        }
    }
    nics
}

/// Gives every node its own namespace (or says why it cannot). Returns each node's
/// `cairn-node` network arguments.
fn setup_network(
    ctx: &Ctx,
    model: &compiler::Model,
    nodes: &BTreeMap<String, DesiredNode>,
) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    if let Err(reason) = network::netns::netns_capability() {
        let why = format!("dev node without its own network namespace ({reason})");
        println!(
            "note: network namespaces are not available here ({reason}): nodes run without networking and refuse bonds"
        );
        return Ok(nodes
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    vec!["--network-disabled".to_owned(), why.clone()],
                )
            })
            .collect());
    }
    let prefix = netns_prefix(ctx);
    let record = DevNetwork {
        prefix: prefix.clone(),
        nodes: nodes
            .keys()
            .map(|n| (n.clone(), node_netns(&prefix, n)))
            .collect(),
    };
    // Recorded first: a failure half-way still leaves `dev down` what to remove.
    let path = network_path(ctx);
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    let switch = network::dev_cluster::create_switch(&prefix)
        .with_context(|| format!("cannot create the dev switch namespace {prefix}sw"))?;
    let mut args = BTreeMap::new();
    for (node, netns) in &record.nodes {
        let nics = dev_nics(model, node);
        let dev = network::dev_cluster::add_node_with_nics(&switch, netns, node, &nics)
            .with_context(|| format!("cannot create the network namespace of {node}"))?;
        println!(
            "{node}: network namespace {netns} with NICs {}",
            if dev.nics.is_empty() {
                "(none)".to_owned()
            } else {
                dev.nics.join(", ")
            }
        );
        args.insert(node.clone(), vec!["--netns".to_owned(), netns.clone()]);
    }
    Ok(args)
}

/// Deletes the namespaces `dev up` recorded; returns their names.
fn teardown_network(ctx: &Ctx) -> anyhow::Result<Vec<String>> {
    let path = network_path(ctx);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(vec![]);
    };
    let record: DevNetwork = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a dev network record", path.display()))?;
    let removed = network::dev_cluster::down(&record.prefix)
        .with_context(|| format!("cannot delete the namespaces {}*", record.prefix))?;
    let _ = std::fs::remove_file(&path);
    Ok(removed)
}

pub(crate) fn read_pids(ctx: &Ctx) -> BTreeMap<String, u32> {
    std::fs::read_to_string(pids_path(ctx))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Per-node disk layout for `cairn-node --disks N --disk-capacity BYTES`, from the
/// spec: as many disk files as the node has disks, or as the widest stripe of its
/// site's pools needs (a node's volume engine stripes over its own disks), each
/// the size of its smallest disk.
pub(crate) fn disks_of(model: &compiler::Model, node: &str) -> (usize, u64) {
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
    lease_from: Option<&str>,
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
    let any_running = nodes.values().any(|n| {
        pids.get(&n.name)
            .is_some_and(|pid| reconciler::state::process_alive(*pid))
    });
    let network_args = match setup_network(ctx, model, nodes) {
        Ok(args) => args,
        Err(error) => {
            if !any_running {
                let _ = teardown_network(ctx);
            }
            return Err(error);
        }
    };
    start_witnesses(ctx, model, &keys, &controller.public_key_hex())?;
    let mut started = vec![];
    for node in nodes.values() {
        let dir = dev_dir.join(&node.name);
        if let Some(pid) = pids.get(&node.name)
            && reconciler::state::process_alive(*pid)
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
            if !any_running {
                // Nothing of this dev cluster runs now: remove what this run made.
                let _ = teardown_network(ctx);
            }
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
            .args(network_args.get(&node.name).into_iter().flatten())
            // The node's process group stands for the whole machine: its VMMs stay
            // in it, so `dev down` and a power-loss test kill them with the agent
            // (a kill of the agent alone still leaves them for the next to adopt).
            .args(["--vmm-process-group", "agent"])
            // With a controller, the node renews its lease there and fences its HA
            // VMs when it loses quorum.
            .args(lease_from.into_iter().flat_map(|a| ["--lease-from", a]))
            // Development hook: every node runs this cairn-vmm (e.g. a debug build,
            // or a wrapper in tests) instead of the one beside cairn-node.
            .args(
                std::env::var_os("CAIRN_VMM_BIN")
                    .map(|vmm| [std::ffi::OsString::from("--vmm-binary"), vmm])
                    .into_iter()
                    .flatten(),
            )
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
                    if Instant::now() > deadline || !reconciler::state::process_alive(pid) {
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
                        let _ = teardown_network(ctx);
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

fn witnesses_path(ctx: &Ctx) -> PathBuf {
    ctx.cairn_dir.join("dev/witnesses.json")
}

/// Whether `pid` is the `cairn witness` of data directory `dir`.
fn is_witness(pid: u32, dir: &std::path::Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        args.contains(&b"witness".as_slice()) && args.contains(&dir.as_os_str().as_encoded_bytes())
    })
}

/// Starts a `cairn witness` for every witness address of the spec's sites that has
/// none running (see the module's comment); waits until each listens.
fn start_witnesses(
    ctx: &Ctx,
    model: &compiler::Model,
    node_keys: &BTreeMap<String, String>,
    controller_key: &str,
) -> anyhow::Result<()> {
    let path = witnesses_path(ctx);
    let mut pids: BTreeMap<String, u32> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let dev_dir = ctx.cairn_dir.join("dev");
    for site in &model.sites {
        let declared = [
            (format!("witness-{}", site.name), site.witness.as_ref()),
            (
                format!("witness-{}-alternate", site.name),
                site.witness_alternate.as_ref(),
            ),
        ];
        for (name, address) in declared {
            let Some(address) = address else { continue };
            let dir = dev_dir.join(&name);
            if let Some(pid) = pids.get(&name)
                && is_witness(*pid, &dir)
            {
                println!("{name}: already running (pid {pid}) on {address}");
                continue;
            }
            let listen: std::net::SocketAddr = address.parse().with_context(|| {
                format!(
                    "site {}'s witness address `{address}` is not IP:PORT; `cairn dev up` starts witnesses on IP addresses only",
                    site.name
                )
            })?;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::write(
                dir.join("trusted-controllers"),
                format!("{controller_key} cairn-controller\n"),
            )?;
            let nodes: String = site
                .nodes
                .iter()
                .filter_map(|n| node_keys.get(&n.name).map(|k| format!("{k} {}\n", n.name)))
                .collect();
            std::fs::write(dir.join("trusted-nodes"), nodes)?;
            let log = std::fs::File::create(dir.join("witness.log"))?;
            let me = std::env::current_exe().context("cannot find the cairn binary")?;
            let child = std::process::Command::new(me)
                .arg("witness")
                .arg("--listen")
                .arg(address)
                .arg("--data-dir")
                .arg(&dir)
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .context("cannot start cairn witness")?;
            pids.insert(name.clone(), child.id());
            std::fs::write(&path, serde_json::to_string_pretty(&pids)? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err()
            {
                if Instant::now() > deadline || !reconciler::state::process_alive(child.id()) {
                    bail!(
                        "{name} did not come up on {address}; its log:\n{}",
                        std::fs::read_to_string(dir.join("witness.log")).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            println!(
                "{name}: up on {address} (pid {}, data {})",
                child.id(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Stops the witnesses `dev up` started (SIGTERM, SIGKILL after 10 s).
fn stop_witnesses(ctx: &Ctx) -> Vec<(String, u32)> {
    let path = witnesses_path(ctx);
    let pids: BTreeMap<String, u32> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    let mut stopped = vec![];
    for (name, pid) in pids {
        let dir = ctx.cairn_dir.join("dev").join(&name);
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if !is_witness(pid, &dir) {
            continue;
        }
        // SAFETY: kill(2) of the witness this dev cluster started (checked by its command line).
        unsafe { libc::kill(raw, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while reconciler::state::process_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if reconciler::state::process_alive(pid) && is_witness(pid, &dir) {
            // SAFETY: as above.
            unsafe { libc::kill(raw, libc::SIGKILL) };
        }
        stopped.push((name, pid));
    }
    stopped
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

/// SIGKILLs every `cairn-vmm --config DIR/...` process: the VMs of this dev cluster's
/// nodes, wherever their process group is.
fn kill_vmms_under(dir: &std::path::Path) {
    for pid in reconciler::state::vmms_under(dir) {
        // SAFETY: kill(2) of a cairn-vmm whose config is in this dev cluster.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Stops the DHCP servers (dnsmasq) of every node data dir under `dir`.
fn stop_dhcp_under(dir: &std::path::Path) {
    let Ok(nodes) = std::fs::read_dir(dir) else {
        return;
    };
    for node in nodes.flatten() {
        let dhcp = node.path().join("segments").join("dhcp");
        for (tenant, network) in network::dhcp::configured(&dhcp) {
            network::dhcp::stop_dhcp(&dhcp, &tenant, &network);
        }
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

pub(crate) fn write_pids(ctx: &Ctx, pids: &BTreeMap<String, u32>) -> anyhow::Result<()> {
    let path = pids_path(ctx);
    std::fs::write(&path, serde_json::to_string_pretty(pids)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

fn stop_all(ctx: &Ctx) -> anyhow::Result<Vec<(String, u32, bool)>> {
    let pids = read_pids(ctx);
    let mut out = vec![];
    for (name, pid) in &pids {
        if !reconciler::state::process_alive(*pid) {
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
        while reconciler::state::process_alive(entry.1) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if reconciler::state::process_alive(entry.1) {
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
    // VMMs outlive their agent: one adopted by a node restarted alone is still in the
    // group of the agent that spawned it, which pids.json no longer names.
    kill_vmms_under(&ctx.cairn_dir.join("dev"));
    // Tenant networks' DHCP servers outlive their agent too (a node restarted alone
    // keeps the running one): each node's data dir records them.
    stop_dhcp_under(&ctx.cairn_dir.join("dev"));
    for (_, pid, _) in &out {
        let deadline = Instant::now() + Duration::from_secs(5);
        while reconciler::state::process_alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pids_path(ctx));
    Ok(out)
}

fn controller_pid_path(ctx: &Ctx) -> PathBuf {
    ctx.cairn_dir.join("dev/controller.pid")
}

/// `cairn dev up --controller-repo REPO`: starts `cairn controller` on the dev
/// cluster (data directory `.cairn`, so it signs with the key the dev nodes
/// trust), in its own process group, logging to `.cairn/dev/controller.log`;
/// waits until it serves `/healthz`. `dev down` stops it first.
pub fn start_controller(
    ctx: &Ctx,
    repo: &std::path::Path,
    trusted_keys: Option<&std::path::Path>,
    listen: &str,
    grpc_listen: &str,
) -> anyhow::Result<u8> {
    if let Some(running) = controller::control::running(&ctx.cairn_dir) {
        println!(
            "controller: already running (pid {}) on {}",
            running.pid, running.listen
        );
        return Ok(0);
    }
    let me = std::env::current_exe().context("cannot find the cairn binary")?;
    let log_path = ctx.cairn_dir.join("dev/controller.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut command = std::process::Command::new(me);
    command
        .arg("controller")
        .arg("--repo")
        .arg(std::path::absolute(repo)?)
        .arg("--data-dir")
        .arg(&ctx.cairn_dir)
        .arg("--listen")
        .arg(listen);
    // Its gRPC listener: the health service and the nodes' leases.
    command.arg("--grpc-listen").arg(grpc_listen);
    if let Some(keys) = trusted_keys {
        command
            .arg("--trusted-keys")
            .arg(std::path::absolute(keys)?);
    }
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start cairn controller")?;
    std::fs::write(controller_pid_path(ctx), format!("{}\n", child.id()))?;
    let url = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let healthy =
            controller::control::request(&url, "GET", "/healthz", None, Duration::from_secs(1))
                .is_ok_and(|a| a.status == 200);
        if healthy {
            break;
        }
        if Instant::now() > deadline || !reconciler::state::process_alive(child.id()) {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "the controller did not come up on {listen}; last lines of {}:\n{}",
                log_path.display(),
                text.lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "controller: following branch main of {} on {url} (pid {}, log {}); push signed commits there. Events: `curl -H \"Authorization: Bearer $(cat {})\" {url}/api/v1/events`",
        repo.display(),
        child.id(),
        log_path.display(),
        controller::control::token_path(&ctx.cairn_dir).display()
    );
    Ok(0)
}

/// Stops the controller `dev up` started (SIGTERM, SIGKILL after 30 s).
fn stop_controller(ctx: &Ctx) -> Option<u32> {
    let path = controller_pid_path(ctx);
    let pid: u32 = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    let _ = std::fs::remove_file(&path);
    let ours = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split('\0').any(|a| a == "controller"));
    let raw = i32::try_from(pid).ok()?;
    if !ours || !reconciler::state::process_alive(pid) {
        return None;
    }
    // SAFETY: kill(2) of the controller process this dev cluster started (checked by its command line).
    unsafe { libc::kill(raw, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while reconciler::state::process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if reconciler::state::process_alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(raw, libc::SIGKILL) };
    }
    Some(pid)
}

/// `cairn dev down`.
pub fn down(ctx: &Ctx) -> anyhow::Result<u8> {
    if let Some(pid) = stop_controller(ctx) {
        println!("controller: stopped (pid {pid})");
    }
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
    for (name, pid) in stop_witnesses(ctx) {
        println!("{name}: stopped (pid {pid})");
    }
    // After the nodes: their failover monitors work in these namespaces.
    let removed = teardown_network(ctx)?;
    if !removed.is_empty() {
        println!(
            "removed {} network namespaces: {}",
            removed.len(),
            removed.join(", ")
        );
    }
    Ok(0)
}
