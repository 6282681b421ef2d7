//! Simulated clusters (issue 24): `cairn gen --simulate ADDR` and `cairn dev up
//! --simulate`.
//!
//! A simulated cluster is one `cairn-node --simulate N` process serving every node of
//! a spec on its own address (`node_runtime::simulate`): the same node API as real
//! nodes, over a simulated hypervisor and network. `dev up --simulate` writes the
//! nodes' names and addresses to `.cairn/dev/simulated-nodes`, the trust files of each
//! node under `.cairn/dev/NODE/` as a real dev cluster has them, starts the process in
//! its own process group (recorded in `pids.json` for every node, so `cairn dev down`
//! stops it) and waits until every node answers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use proto::auth::{Identity, RequestSigner};
use reconciler::desired::DesiredNode;

use crate::ctx::Ctx;

/// The file of `cairn-node --simulate-nodes` under `.cairn/dev/`.
pub const NODES_FILE: &str = "simulated-nodes";

/// Rewrites the node addresses of `cairn gen`'s `infra.kdl` so node `n{i}` is at
/// `base`'s IP and port + i (what `cairn-node --simulate N --listen BASE` serves).
pub fn simulated_addresses(
    files: &mut [(String, String)],
    base: SocketAddr,
) -> anyhow::Result<usize> {
    let mut count = 0usize;
    for (_, text) in files.iter_mut() {
        let mut out = String::with_capacity(text.len());
        for line in text.split_inclusive('\n') {
            let trimmed = line.trim_start();
            if let Some(rest) = trimmed.strip_prefix("node \"n")
                && let Some((index, _)) = rest.split_once('"')
                && let Ok(index) = index.parse::<usize>()
                && let Some(at) = line.find(" address=\"")
            {
                let port = usize::from(base.port()) + index;
                if port > 65_535 {
                    bail!(
                        "node n{index} would listen on port {port}: start lower than port {}",
                        base.port()
                    );
                }
                let after = &line[at + " address=\"".len()..];
                let end = after
                    .find('"')
                    .context("an address without its closing quote")?;
                out.push_str(&line[..at]);
                out.push_str(&format!(" address=\"{}:{port}\"", base.ip()));
                out.push_str(&after[end + 1..]);
                count += 1;
            } else {
                out.push_str(line);
            }
        }
        *text = out;
    }
    Ok(count)
}

/// `cairn dev up --simulate`: one `cairn-node --simulate` for every node of the spec.
pub async fn up(
    ctx: &Ctx,
    model: &compiler::Model,
    nodes: &BTreeMap<String, DesiredNode>,
    lease_from: Option<&str>,
) -> anyhow::Result<u8> {
    let node_bin = crate::dev::find_binary("cairn-node").context(
        "cannot find the cairn-node binary next to cairn or on PATH; build it with `cargo build -p node-runtime` (or set CAIRN_NODE_BIN)",
    )?;
    let dev_dir = ctx.cairn_dir.join("dev");
    std::fs::create_dir_all(&dev_dir)
        .with_context(|| format!("cannot create {}", dev_dir.display()))?;
    let mut pids = crate::dev::read_pids(ctx);
    if let Some((name, pid)) = pids
        .iter()
        .find(|(_, pid)| reconciler::state::process_alive(**pid))
    {
        bail!(
            "a dev cluster of {} runs already ({name}: pid {pid}); stop it with `cairn dev down {}`",
            ctx.spec_root.display(),
            ctx.spec_root.display()
        );
    }
    let controller = ctx.identity()?;
    let mut listed = String::new();
    let mut keys = BTreeMap::new();
    for node in nodes.values() {
        let address: SocketAddr = node.address.parse().with_context(|| {
            format!(
                "node {}: address `{}` is not an IP address and port; a simulated node listens on one",
                node.name, node.address
            )
        })?;
        if let Err(error) = std::net::TcpListener::bind(address) {
            bail!(
                "cannot simulate {}: its address {address} is not available ({error}); another process listens there",
                node.name
            );
        }
        listed.push_str(&format!("{} {address}\n", node.name));
        let dir = dev_dir.join(&node.name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let identity =
            Identity::load_or_create(&dir.join("identity.key"), &dir.join("identity.pub"))
                .with_context(|| format!("node identity of {}", node.name))?;
        keys.insert(node.name.clone(), identity.public_key_hex());
        std::fs::write(
            dir.join("trusted-controllers"),
            format!("{} cairn-controller\n", controller.public_key_hex()),
        )?;
    }
    for name in keys.keys() {
        let peers: String = keys
            .iter()
            .filter(|(n, _)| *n != name)
            .map(|(n, k)| format!("{k} {n}\n"))
            .collect();
        std::fs::write(dev_dir.join(name).join("trusted-peers"), peers)?;
    }
    let Some(first) = nodes.values().next() else {
        bail!("the spec has no node to simulate");
    };
    let nodes_file = dev_dir.join(NODES_FILE);
    std::fs::write(&nodes_file, listed)?;
    // One disk layout for all: the largest any node asks for (files are sparse).
    let (disks, capacity) = nodes
        .keys()
        .map(|name| crate::dev::disks_of(model, name))
        .max()
        .unwrap_or((1, 1 << 30));
    let log = std::fs::File::create(dev_dir.join("simulator.log"))?;
    let child = std::process::Command::new(&node_bin)
        .arg("--simulate")
        .arg(nodes.len().to_string())
        .arg("--simulate-nodes")
        .arg(&nodes_file)
        .arg("--listen")
        .arg(&first.address)
        .arg("--data-dir")
        .arg(&dev_dir)
        .arg("--disks")
        .arg(disks.to_string())
        .arg("--disk-capacity")
        .arg(capacity.to_string())
        .args(lease_from.into_iter().flat_map(|a| ["--lease-from", a]))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", node_bin.display()))?;
    for name in nodes.keys() {
        pids.insert(name.clone(), child.id());
    }
    crate::dev::write_pids(ctx, &pids)?;
    let signer = RequestSigner::new(controller);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30 + nodes.len() as u64 / 20);
    for node in nodes.values() {
        loop {
            let answer = match reconciler::nodes::connect(&node.address, signer.clone()).await {
                Ok(mut c) => c.get_inventory().await.map_err(|s| s.message().to_owned()),
                Err(e) => Err(e),
            };
            match answer {
                Ok(_) => break,
                Err(e) => {
                    if Instant::now() > deadline || !reconciler::state::process_alive(child.id()) {
                        let log = std::fs::read_to_string(dev_dir.join("simulator.log"))
                            .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(10).collect();
                        let _ = crate::dev::down(ctx);
                        bail!(
                            "simulated node {} did not come up on {}: {e}\nlast lines of {}:\n{}\n(the simulator was stopped again)",
                            node.name,
                            node.address,
                            dev_dir.join("simulator.log").display(),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    println!(
        "simulated dev cluster up: {} nodes in one cairn-node (pid {}) in {} ms; fault commands on the address in {}. Stop it with `cairn dev down {}`.",
        nodes.len(),
        child.id(),
        started.elapsed().as_millis(),
        dev_dir.join("control-address").display(),
        ctx.spec_root.display(),
    );
    Ok(0)
}

/// `cairn dev up --simulate DIR`: compiles the specs and starts the simulator.
pub fn dev_up(dir: &Path, lease_from: Option<&str>) -> anyhow::Result<u8> {
    let loaded = match crate::commands::load(dir, None)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let nodes = reconciler::pipeline::spec_nodes(loaded.model());
    crate::commands::runtime()?.block_on(up(&loaded.ctx, loaded.model(), &nodes, lease_from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gen_addresses_become_consecutive_ports_of_one_address() {
        let mut files = compiler::generate::generate(&compiler::generate::GenConfig {
            nodes: 40,
            vms: 10,
            seed: 1,
        });
        let base: SocketAddr = "127.0.0.41:20000".parse().expect("address");
        assert_eq!(
            simulated_addresses(&mut files, base).expect("rewritten"),
            40
        );
        let infra = &files
            .iter()
            .find(|(p, _)| p == "infra.kdl")
            .expect("infra")
            .1;
        assert!(infra.contains("node \"n0\" class=\"std\" address=\"127.0.0.41:20000\"\n"));
        assert!(infra.contains("node \"n39\" class=\"std\" address=\"127.0.0.41:20039\"\n"));
        // Only the nodes move: the witness keeps its address.
        let left: Vec<&str> = infra
            .lines()
            .filter(|l| l.trim_start().starts_with("node ") && l.contains("address=\"10."))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(
            infra.contains("witness address=\"10.255.0.1:7400\""),
            "{infra}"
        );
        let high: SocketAddr = "127.0.0.41:65530".parse().expect("address");
        let error = simulated_addresses(&mut files, high).expect_err("past 65535");
        assert!(error.to_string().contains("port 65536"), "{error}");
    }
}
