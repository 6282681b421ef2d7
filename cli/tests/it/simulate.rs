//! A simulated cluster (issue 24): `cairn dev up --simulate --gitops` serves 50 nodes
//! from one `cairn-node --simulate` process (real gRPC, signatures, records and
//! leases; simulated VMs, bonds and taps), the GitOps controller converges it, and a
//! node killed through the simulator's fault commands is declared failed.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::TempDir;
use crate::engine::Cluster;

const SITES: usize = 10;
const PER_SITE: usize = 5;
const VMS_PER_SITE: usize = 12;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.code().is_some())
}

/// A base port from which `count` consecutive ports are free on `ip`.
pub(crate) fn free_ports(ip: &str, count: u16) -> u16 {
    crate::ports::free_ports_on(ip, count)
}

/// Sites of `PER_SITE` nodes, each with a bond; `VMS_PER_SITE` diskless HA VMs per site.
fn spec(ip: &str, base: u16) -> (String, String) {
    let mut cluster = String::from(
        "node-class \"sim\" {\n    cpu 32\n    memory \"64GiB\"\n    host-reserve cpu=1 memory=\"1GiB\"\n    disk \"disk0\" size=\"100GiB\" class=\"ssd\"\n    nic \"eth0\" speed=\"10Gbps\"\n    nic \"eth1\" speed=\"10Gbps\"\n}\n\nimage \"tiny\" builtin=\"cairn-guest\"\n\n",
    );
    let mut workloads = String::new();
    for s in 0..SITES {
        cluster.push_str(&format!(
            "site \"s{s}\" {{\n    overcommit cpu=4.0 memory=1.0\n    rack \"r{s}\" {{\n"
        ));
        for n in 0..PER_SITE {
            let index = s * PER_SITE + n;
            cluster.push_str(&format!(
                "        node \"n{index}\" class=\"sim\" address=\"{ip}:{}\"\n",
                usize::from(base) + index
            ));
        }
        cluster.push_str("    }\n    bond \"data\" mode=\"active-backup\" {\n        members \"eth0\" \"eth1\"\n    }\n    pool \"local\" disk-class=\"ssd\" replicas=2 failure-domain=\"node\" {\n        stripe-width 1\n        stripe-unit \"64KiB\"\n    }\n}\n\n");
        workloads.push_str(&format!(
            "vm-group \"g{s}\" tenant=\"sim\" site=\"s{s}\" replicas={VMS_PER_SITE} {{\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n    availability \"ha\"\n}}\n"
        ));
    }
    cluster.push_str(
        "tenant \"sim\" {\n    quota vcpus=4096 memory=\"64GiB\" storage=\"10GiB\" vms=4096\n    member \"sim@example.com\" role=\"admin\"\n}\n",
    );
    (cluster, workloads)
}

/// One fault command to the simulator; its answer line.
pub(crate) fn fault(dir: &Path, command: &str) -> String {
    let address = std::fs::read_to_string(dir.join(".cairn/dev/control-address"))
        .expect("the simulator wrote its control address");
    let mut stream =
        std::net::TcpStream::connect(address.trim()).expect("the simulator's control port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    writeln!(stream, "{command}").expect("send");
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("answer");
    answer.trim().to_owned()
}

/// `cairn dev up --simulate --gitops` of `(cluster.kdl, workloads.kdl)` in a new
/// directory, the controller on `listen` and `grpc`; dropping the cluster runs
/// `dev down` (the simulator and the controller stop).
pub(crate) fn up_with_controller(
    tag: &str,
    (cluster_kdl, workloads_kdl): (String, String),
    listen: &str,
    grpc: &str,
) -> (Cluster, crate::Run) {
    let dir = TempDir::new(tag);
    std::fs::write(dir.0.join("cluster.kdl"), cluster_kdl).expect("write");
    std::fs::write(dir.0.join("workloads.kdl"), workloads_kdl).expect("write");
    let cluster = Cluster { dir };
    let up = cluster.cairn(&[
        "dev",
        "up",
        ".",
        "--simulate",
        "--gitops",
        "--controller-listen",
        listen,
        "--controller-grpc-listen",
        grpc,
    ]);
    assert_eq!(up.code, 0, "dev up --simulate --gitops: {up:?}");
    (cluster, up)
}

fn wait<T>(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut(&Value) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let out = cluster
            .command(&["status", ".", "--format", "json"])
            .output()
            .expect("cairn status runs");
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(found) = check(&status) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; status: {}\ncontroller log tail:\n{}\nsimulator log tail:\n{}",
            serde_json::to_string(&status["controller"]).unwrap_or_default(),
            tail(&cluster.path().join(".cairn/dev/controller.log")),
            tail(&cluster.path().join(".cairn/dev/simulator.log")),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[test]
fn a_simulated_cluster_of_50_nodes_converges_and_a_killed_node_is_declared_failed() {
    for tool in ["git", "ssh-keygen"] {
        if !have(tool) {
            eprintln!("skipped: `{tool}` is not installed; the GitOps controller needs it");
            return;
        }
    }
    let ip = "127.0.0.41";
    let nodes = (SITES * PER_SITE) as u16;
    let base = free_ports(ip, nodes);
    // The controller on the test's own address: a port picked free on 127.0.0.1 can
    // be taken by another test's outgoing connection before the controller binds it
    // (a CI run failed "Address already in use" on the gRPC port); connections to
    // 127.0.0.41 go out from 127.0.0.1, so nothing but a listener takes its ports.
    let listen = format!("{ip}:{}", crate::enroll::free_port(ip));
    let grpc = format!("{ip}:{}", crate::enroll::free_port(ip));
    let started = Instant::now();
    let (cluster, up) = up_with_controller("simulate", spec(ip, base), &listen, &grpc);
    assert!(
        up.stdout
            .contains(&format!("simulated dev cluster up: {nodes} nodes")),
        "{up:?}"
    );
    // One process serves every node.
    let pids: std::collections::BTreeSet<u32> =
        cluster.pids().into_iter().map(|(_, pid)| pid).collect();
    assert_eq!(pids.len(), 1, "one simulator process: {pids:?}");

    let total = SITES * VMS_PER_SITE;
    let converged = wait(
        &cluster,
        "every VM running",
        Duration::from_secs(180),
        |s| {
            let last = &s["controller"]["last_sync"];
            let running = s["vms"]
                .as_array()?
                .iter()
                .filter(|v| v["state"] == "running" && v["drift"] == "none")
                .count();
            (last["result"] == "succeeded" && running == total).then(|| s.clone())
        },
    );
    eprintln!(
        "{nodes} simulated nodes: {total} VMs running {:?} after dev up started",
        started.elapsed()
    );
    let reachable = converged["nodes"]
        .as_array()
        .map(|n| n.iter().filter(|n| n["reachable"] == true).count())
        .unwrap_or(0);
    assert_eq!(
        reachable,
        usize::from(nodes),
        "every node answers: {}",
        converged["nodes"]
    );
    let leases = wait(
        &cluster,
        "every node holding a lease",
        Duration::from_secs(30),
        |s| {
            let leases = s["controller"]["leases"].as_array()?;
            (leases.iter().filter(|l| l["state"] == "ready").count() == usize::from(nodes))
                .then(|| leases.clone())
        },
    );
    assert_eq!(leases.len(), usize::from(nodes));

    // Faults: a slow node still answers; then a node dies.
    assert!(
        fault(cluster.path(), "slow n3 200").starts_with("ok"),
        "slow"
    );
    let answer = fault(cluster.path(), "nodes");
    assert!(
        answer.contains("n3=up") && answer.contains("n7=up"),
        "{answer}"
    );
    assert!(
        fault(cluster.path(), "slow n3 0").starts_with("ok"),
        "slow off"
    );
    let refused = fault(cluster.path(), "kill n999");
    assert_eq!(refused, "error no simulated node `n999`");
    let killed = Instant::now();
    let answer = fault(cluster.path(), "kill n7");
    assert_eq!(answer, "ok n7 is down");
    assert!(
        std::net::TcpStream::connect((ip, base + 7)).is_err(),
        "a dead node refuses connections"
    );
    let lease = wait(
        &cluster,
        "n7 declared failed",
        Duration::from_secs(30),
        |s| {
            s["controller"]["leases"]
                .as_array()?
                .iter()
                .find(|l| l["node"] == "n7" && l["state"] == "failed")
                .cloned()
        },
    );
    eprintln!(
        "n7 killed → declared failed after {:?}: {lease}",
        killed.elapsed()
    );
    // Its site's other nodes stay ready.
    let s = wait(
        &cluster,
        "n5, n6, n8, n9 ready",
        Duration::from_secs(10),
        |s| {
            let leases = s["controller"]["leases"].as_array()?;
            ["n5", "n6", "n8", "n9"]
                .iter()
                .all(|n| {
                    leases
                        .iter()
                        .any(|l| l["node"] == *n && l["state"] == "ready")
                })
                .then(|| s.clone())
        },
    );
    // Its HA VMs run elsewhere in its site once it is failed.
    wait(&cluster, "n7's VMs moved", Duration::from_secs(60), |s| {
        let vms = s["vms"].as_array()?;
        let running = vms
            .iter()
            .filter(|v| v["state"] == "running" && v["node"] != "n7")
            .count();
        (running == total).then_some(())
    });
    drop(s);
}
