//! `cairn node maintenance NODE --on|--off` on a real dev cluster with a controller:
//! the node shows `maintenance` in the status (JSON and text) and `/metrics`, the
//! VMs on it are named and drained live by the controller (they have NICs, and every
//! node reports a migration address in its namespace: each runs on another node in a
//! new VMM, its guest not rebooted), and an HA restart off a failed node goes to the
//! other node, never to the one in maintenance.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ha::{HaCluster, diskless_web, vmm_pid, vmm_status};
use crate::ha_timers::get;

fn node_state(status: &Value, node: &str) -> Option<String> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)?["state"]
        .as_str()
        .map(str::to_owned)
}

/// The heartbeat counter of the guest whose VMM's directory is `dir`.
fn heartbeats(dir: &std::path::Path) -> Option<u64> {
    vmm_status(&dir.join("control.sock"))?["heartbeat_total"].as_u64()
}

/// [`heartbeats`] once the VMM there answers (within 30 s).
fn wait_for_beats(dir: &std::path::Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(beats) = heartbeats(dir) {
            return beats;
        }
        assert!(
            Instant::now() < deadline,
            "no VMM answers in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_in_maintenance_is_drained_live_gets_no_ha_restart_and_shows_it() {
    let Some(ha) = HaCluster::up_in("maintenance", diskless_web, None) else {
        return;
    };
    let nodes = ["lab-1", "lab-2", "lab-3"];
    let on = |node: &str| -> Vec<String> {
        ha.placement
            .iter()
            .filter(|(_, n)| n == node)
            .map(|(vm, _)| vm.clone())
            .collect()
    };
    // The node to fail runs a diskless HA VM (web-N) and not db (a VM with a disk
    // goes to its volume's new writer); the node in maintenance is the one of the two
    // others with the fewest VMs, where the spread strategy would restart them.
    let failing = nodes
        .iter()
        .find(|n| {
            let vms = on(n);
            vms.iter().any(|v| v.starts_with("web-")) && !vms.contains(&"db".to_owned())
        })
        .expect("a node runs a web VM and not db")
        .to_string();
    let kept = nodes
        .iter()
        .filter(|n| **n != failing)
        .min_by_key(|n| on(n).len())
        .expect("another node")
        .to_string();
    let other = nodes
        .iter()
        .find(|n| **n != failing && **n != kept)
        .expect("a third node")
        .to_string();
    let key = ha.cluster.path().join(".cairn/dev/gitops/operator_ed25519");
    let key = key.to_string_lossy();
    let maintenance = |node: &str, switch: &str| {
        ha.cluster.cairn(&[
            "node",
            "maintenance",
            node,
            switch,
            "--data-dir",
            ".cairn",
            "--key",
            &key,
        ])
    };

    // A node the applied commit does not name: exit 1, naming the nodes.
    let unknown = maintenance("lab-9", "--on");
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(
        unknown.stderr.contains("lab-9") && unknown.stderr.contains("lab-1, lab-2, lab-3"),
        "{unknown:?}"
    );

    let vms_kept = on(&kept);
    assert!(!vms_kept.is_empty(), "{kept} runs VMs: {:?}", ha.placement);
    let beats: Vec<u64> = vms_kept
        .iter()
        .map(|vm| heartbeats(&ha.vm_dir(vm)).expect("its VMM's heartbeats"))
        .collect();
    let entered = maintenance(&kept, "--on");
    assert_eq!(entered.code, 0, "{entered:?}");
    assert!(
        entered
            .stdout
            .contains(&format!("{kept} is in maintenance")),
        "{entered:?}"
    );
    for vm in &vms_kept {
        assert!(
            entered.stdout.contains(vm.as_str()),
            "names {vm}: {entered:?}"
        );
    }
    let again = maintenance(&kept, "--on");
    assert!(
        again.code == 0 && again.stdout.contains("already in maintenance"),
        "{again:?}"
    );

    // Status (JSON, text), /metrics.
    let status = ha.status();
    assert_eq!(
        node_state(&status, &kept).as_deref(),
        Some("maintenance"),
        "{status:#}"
    );
    assert_eq!(
        status["controller"]["maintenance"][0]["node"], kept,
        "{:#}",
        status["controller"]
    );
    let text = ha.cluster.cairn(&["status", "."]).stdout;
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with(kept.as_str()) && l.contains("maintenance")),
        "{text}"
    );
    let metrics = get(&ha, "/metrics");
    for sample in [
        format!("cairn_controller_node_state{{node=\"{kept}\",state=\"maintenance\"}} 1"),
        "cairn_controller_nodes{state=\"maintenance\"} 1".to_owned(),
    ] {
        assert!(metrics.contains(&sample), "{sample} in:\n{metrics}");
    }
    let ready = format!("cairn_controller_node_state{{node=\"{kept}\",state=\"ready\"}}");
    assert!(!metrics.contains(&ready), "{ready} in:\n{metrics}");

    // The controller drains `kept` live: each of its VMs runs on another node, in a
    // new VMM whose guest's heartbeat counter went on (no reboot), none on `kept`.
    let deadline = Instant::now() + Duration::from_secs(90);
    let drained = loop {
        let status = ha.status();
        let rows: Vec<(String, String)> = status["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["state"] == "running")
            .filter_map(|r| {
                Some((
                    r["name"].as_str()?.to_owned(),
                    r["node"].as_str()?.to_owned(),
                ))
            })
            .collect();
        let elsewhere: Vec<(String, String)> = vms_kept
            .iter()
            .filter_map(|vm| {
                rows.iter()
                    .find(|(n, node)| n == vm && *node != kept)
                    .cloned()
            })
            .collect();
        if elsewhere.len() == vms_kept.len() {
            break elsewhere;
        }
        assert!(
            Instant::now() < deadline,
            "{vms_kept:?} not drained off {kept}: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut not_live = vec![];
    for ((vm, node), before) in drained.iter().zip(&beats) {
        assert_eq!(
            vmm_pid(&ha.vm_dir(vm)),
            None,
            "{vm}'s VMM on {kept} is gone"
        );
        let dir = ha
            .cluster
            .path()
            .join(".cairn/dev")
            .join(node)
            .join("vms")
            .join(vm);
        let after = wait_for_beats(&dir);
        // Every VM moved live: its guest's counter went on (a fresh boot starts it
        // again). A session-12 CI run saw web-1 start afresh on lab-2 (6 heartbeats
        // after 252); the way found (session 13, 19099fc): a migration that did not
        // finish left a stopped copy on the destination, and the next plan started it
        // afresh and deleted the running one (`reconciler::plan::vms::stale_destination`).
        // If another way remains, the controller's migration lines say which.
        if after < *before {
            not_live.push(format!(
                "{vm} started afresh on {node} ({after} heartbeats < {before} on {kept})"
            ));
        } else {
            eprintln!("{vm}: drained live {kept} -> {node}, heartbeats {before} -> {after}");
        }
    }
    if !not_live.is_empty() {
        let log = std::fs::read_to_string(ha.cluster.path().join(".cairn/dev/controller.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["migrat", "drift", "delete", "start"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .map(|l| &l[..l.len().min(300)])
            .collect();
        panic!(
            "not drained live: {not_live:?}\ncontroller:\n  {}",
            lines.join("\n  ")
        );
    }

    // The failing node's HA VMs restart on the other node, never on `kept`.
    let moving: Vec<String> = ha.status()["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["node"] == failing.as_str())
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .filter(|vm| vm.starts_with("web-"))
        .collect();
    let killed = ha.kill_node(&failing);
    let mut landed = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while landed.len() < moving.len() {
        let status = ha.status();
        for row in status["vms"].as_array().into_iter().flatten() {
            let (Some(vm), Some(node)) = (row["name"].as_str(), row["node"].as_str()) else {
                continue;
            };
            if !moving.iter().any(|m| m == vm) || node == failing {
                continue;
            }
            assert_ne!(
                node, kept,
                "{vm} was restarted on {kept}, in maintenance: {row}"
            );
            if row["state"] == "running" {
                landed.insert(vm.to_owned(), node.to_owned());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{moving:?} running elsewhere; now {landed:?}; status {status:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{failing} killed: {landed:?} after {:?} ({kept} in maintenance)",
        killed.elapsed()
    );
    let log = std::fs::read_to_string(ha.cluster.path().join(".cairn/dev/controller.log"))
        .unwrap_or_default();
    for line in log.lines().filter(|l| {
        ["node failed", "drift", "ha-restart", "volume", "migrat"]
            .iter()
            .any(|k| l.contains(k))
    }) {
        eprintln!("  controller: {}", &line[..line.len().min(300)]);
    }
    assert!(landed.values().all(|n| *n == other), "{landed:?}");

    let left = maintenance(&kept, "--off");
    assert!(
        left.code == 0 && left.stdout.contains("out of maintenance"),
        "{left:?}"
    );
    let status = ha.status();
    assert_ne!(
        node_state(&status, &kept).as_deref(),
        Some("maintenance"),
        "{status:#}"
    );
    assert_eq!(
        status["controller"]["maintenance"],
        serde_json::json!([]),
        "{status:#}"
    );
}
