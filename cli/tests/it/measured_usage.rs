//! Rebalancing by the load the controller measured (issue 20): `cairn place
//! --rebalance --measured` asks the running controller (`GET /api/v1/usage`, the
//! nodes' last answers) what each VM uses, and moves a VM off the node whose guests
//! burn CPU, where declared sizes alone move nothing. A real dev cluster with a
//! controller, nodes on 127.0.0.85-87.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cpu_preemption::{control, on_loopback};
use crate::ha::HaCluster;
use crate::ha_timers::get;

#[test]
fn place_rebalance_measured_weighs_vms_by_what_the_controller_measured() {
    // The site rebalances once its nodes' utilizations differ by more than 0.02 (a
    // node's utilization is the mean of its CPU and memory shares, so the
    // quickstart's 0.25 takes 1.5 of its 3 allocatable CPUs, more than two guests
    // get on this shared 2-CPU machine).
    let edit = |dir: &std::path::Path| {
        on_loopback(dir, 85, "3s");
        let cluster = dir.join("cluster.kdl");
        let text = std::fs::read_to_string(&cluster).expect("read cluster.kdl");
        let text = text.replacen("rebalance threshold=0.25", "rebalance threshold=0.02", 1);
        std::fs::write(&cluster, text).expect("write cluster.kdl");
    };
    let Some(ha) = HaCluster::up_in("d-measured", edit, None) else {
        return;
    };
    // By declared size the quickstart is balanced even at 0.02: nothing moves.
    let declared = ha
        .cluster
        .command(&["place", ".", "--rebalance"])
        .output()
        .expect("cairn place runs");
    let declared = String::from_utf8_lossy(&declared.stdout).into_owned();
    assert!(declared.contains(", 0 moves"), "{declared}");

    // Both VMs of db's node (db, reserved, and an on-demand web VM) burn CPU.
    let busy_node = ha.node_of("db");
    let busy: Vec<String> = ha
        .placement
        .iter()
        .filter(|(_, node)| *node == busy_node)
        .map(|(vm, _)| vm.clone())
        .collect();
    assert!(busy.len() >= 2, "{:?}", ha.placement);
    for vm in &busy {
        assert_eq!(
            control(&ha.vm_dir(vm), r#"{"op":"set-burn","on":true}"#)["ok"],
            true,
            "set-burn on {vm}"
        );
    }
    // The controller measures a CPU rate between two answers of a node: it asks the
    // nodes for every status, so two statuses a second apart give one.
    let deadline = Instant::now() + Duration::from_secs(60);
    let usage = loop {
        let _ = get(&ha, "/api/v1/status");
        std::thread::sleep(Duration::from_secs(1));
        let _ = get(&ha, "/api/v1/status");
        let usage: Value = serde_json::from_str(&get(&ha, "/api/v1/usage")).expect("usage JSON");
        // What two guests get of this shared machine varies (0.1-1.2 CPUs measured).
        let cores = |vm: &String| usage["vms"][vm]["cpu_cores"].as_f64().unwrap_or(0.0);
        let burning =
            busy.iter().all(|vm| cores(vm) > 0.03) && busy.iter().map(cores).sum::<f64>() > 0.15;
        if burning {
            break usage;
        }
        assert!(
            Instant::now() < deadline,
            "the controller measured no CPU of {busy:?}: {usage:#}"
        );
    };
    assert_eq!(usage["format_version"], 1, "{usage:#}");
    assert!(
        usage["vms"]["db"]["resident_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0),
        "every running VM's resident memory: {usage:#}"
    );

    let out = ha
        .cluster
        .command(&["place", ".", "--rebalance", "--measured"])
        .output()
        .expect("cairn place runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("measured load from http://127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "rebalance by measured load (spread): {busy_node} measured"
        )),
        "a VM of {busy_node} moves by its measured load: {text}"
    );
    let moves: Vec<&str> = text.lines().filter(|l| l.contains(" -> ")).collect();
    // The same answer saved as a file is a `--usage FILE`.
    let file = ha.cluster.path().join("usage.json");
    std::fs::write(&file, usage.to_string()).expect("write usage.json");
    let from_file = ha
        .cluster
        .command(&["place", ".", "--rebalance", "--usage", "usage.json"])
        .output()
        .expect("cairn place runs");
    assert!(
        String::from_utf8_lossy(&from_file.stdout).contains("rebalance by measured load"),
        "{}",
        String::from_utf8_lossy(&from_file.stdout)
    );
    // A controller that does not answer: a clear error, exit 2.
    let refused = ha
        .cluster
        .command(&[
            "place",
            ".",
            "--rebalance",
            "--measured",
            "--controller",
            "http://127.0.0.85:9",
        ])
        .output()
        .expect("cairn place runs");
    let error = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(2), "{error}");
    assert!(error.contains("--measured:"), "{error}");
    for vm in &busy {
        control(&ha.vm_dir(vm), r#"{"op":"set-burn","on":false}"#);
    }
    eprintln!(
        "measured rebalance: {busy:?} burning on {busy_node}; the controller measured {}; moves:\n{}\nby declared size:\n{}",
        busy.iter()
            .map(|vm| format!(
                "{vm} {:.2} cores",
                usage["vms"][vm]["cpu_cores"].as_f64().unwrap_or(0.0)
            ))
            .collect::<Vec<_>>()
            .join(", "),
        moves.join("\n"),
        declared
            .lines()
            .filter(|l| l.starts_with("move "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
