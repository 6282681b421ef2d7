//! Draining a node of the quickstart moves its running VMs live (issue 17): the
//! quickstart's own specs on a real three-node dev cluster (127.0.0.43-45, helper
//! A's range; each node in its own network namespace, so its VMs' NICs and VMMs
//! are there), every VM with a NIC and a disk. The node running `db` is put in
//! maintenance (`maintenance=#true`): `cairn plan` shows one `migrate_vm` step per
//! VM running there, and no cold move; `cairn apply` moves them live: each runs on
//! another node, in a new VMM whose guest's heartbeat counter went on from the old
//! one's (no reboot), none is left on the drained node, and the data each guest
//! wrote to its disk before reads back after. The downtime of each is measured
//! from the VMMs' heartbeat logs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::TempDir;
use crate::engine::{Cluster, copy_specs, free_port, kvm_usable};
use crate::ha::{vmm_pids, vmm_status};
use crate::migration::{heartbeat_logs, wait_for};

/// The quickstart's nodes at 127.0.0.43-45 (on `ports`); `maintenance=#true` on
/// `maintenance`.
fn quickstart_specs(dir: &Path, ports: &[u16; 3], maintenance: Option<&str>) {
    let mut text =
        std::fs::read_to_string(crate::repo_root().join("examples/quickstart/cluster.kdl"))
            .expect("the quickstart's cluster.kdl");
    for (i, port) in ports.iter().enumerate() {
        let node = format!("lab-{}", i + 1);
        let flag = if maintenance == Some(node.as_str()) {
            " maintenance=#true"
        } else {
            ""
        };
        let from = format!(
            "node \"{node}\" class=\"laptop\" address=\"127.0.0.1{}:7100\"",
            i + 1
        );
        assert!(text.contains(&from), "the quickstart names {node} so");
        text = text.replace(
            &from,
            &format!(
                "node \"{node}\" class=\"laptop\" address=\"127.0.0.4{}:{port}\"{flag}",
                i + 3
            ),
        );
    }
    std::fs::write(dir.join("cluster.kdl"), text).expect("write cluster.kdl");
    crate::engine::without_witness(dir);
}

/// The disk each quickstart VM has.
fn disk_of(vm: &str) -> &'static str {
    match vm {
        "db" => "data",
        "backup" => "scratch",
        _ => "root",
    }
}

/// `cairn vm disk-io VM OP` on 64 KiB at 1 MiB of its disk: the guest's CRC-32C.
fn guest_io(dir: &Path, vm: &str, op: &str, seed: u64) -> Option<String> {
    let seed = seed.to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .args(["vm", "disk-io", vm, op, ".", "--disk", disk_of(vm)])
        .args(["--offset", "1048576", "--length", "65536", "--seed", &seed])
        .args(["--timeout", "25s"])
        .output()
        .expect("cairn runs");
    if !out.status.success() {
        eprintln!(
            "disk-io {vm} {op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("crc32c "))
        .map(str::to_owned)
}

/// The status's VMs: (name, node, state).
fn vms(cluster: &Cluster) -> Vec<(String, String, String)> {
    let status = cluster.status_json();
    status["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v: &Value| {
            let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (text("name"), text("node"), text("state"))
        })
        .collect()
}

/// The directory of `vm` on `node`.
fn vm_dir(cluster: &Cluster, node: &str, vm: &str) -> PathBuf {
    cluster
        .path()
        .join(".cairn/dev")
        .join(node)
        .join("vms")
        .join(vm)
}

/// The VMM of `vm` on `node`: (pid, its guest's heartbeat counter).
fn vmm(cluster: &Cluster, node: &str, vm: &str) -> Option<(u32, u64)> {
    let dir = vm_dir(cluster, node, vm);
    let pid = *vmm_pids(&format!("{}/", dir.display())).first()?;
    let beats = vmm_status(&dir.join("control.sock"))?["heartbeat_total"].as_u64()?;
    Some((pid, beats))
}

#[test]
fn draining_a_quickstart_node_moves_its_vms_with_nics_and_disks_live() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here; the test migrates running VMs");
        return;
    }
    if let Err(why) = network::netns_capability() {
        eprintln!(
            "skipped: no network namespaces here ({why}); VMs with NICs move live only between nodes with a migration address in theirs"
        );
        return;
    }
    let dir = TempDir::new("migration-nics");
    copy_specs(&crate::repo_root().join("examples/quickstart"), &dir.0);
    crate::engine::without_ft(&dir.0);
    let ports = [free_port(), free_port(), free_port()];
    quickstart_specs(&dir.0, &ports, None);
    let cluster = Cluster { dir };
    let up = cluster.cairn(&["dev", "up", "."]);
    assert_eq!(up.code, 0, "{up:?}");
    let first = cluster.cairn_unattended(&["apply", ".", "--auto-approve"]);
    assert_eq!(first.code, 0, "{first:?}");
    let running = wait_for("every VM running", Duration::from_secs(120), || {
        let rows = vms(&cluster);
        (rows.len() == 5 && rows.iter().all(|(_, _, state)| state == "running")).then_some(rows)
    });
    let drained = running
        .iter()
        .find(|(vm, _, _)| vm == "db")
        .map(|(_, node, _)| node.clone())
        .expect("db is placed");
    let moving: Vec<String> = running
        .iter()
        .filter(|(_, node, _)| *node == drained)
        .map(|(vm, _, _)| vm.clone())
        .collect();
    eprintln!("draining {drained}, which runs {moving:?}; before: {running:?}");

    // Before: each moving guest writes to its disk; its VMM and heartbeat counter.
    let mut before = vec![];
    for (i, vm) in moving.iter().enumerate() {
        let seed = 11 + i as u64;
        let crc = guest_io(cluster.path(), vm, "write-pattern", seed)
            .unwrap_or_else(|| panic!("{vm} writes to its disk"));
        let (pid, beats) = vmm(&cluster, &drained, vm).expect("its VMM runs");
        before.push((vm.clone(), seed, crc, pid, beats));
    }

    // The plan: one live step per VM, no cold move.
    quickstart_specs(cluster.path(), &ports, Some(&drained));
    let plan = cluster.cairn(&["plan", "."]);
    eprintln!("{}", plan.stdout);
    for vm in &moving {
        assert!(
            plan.stdout.contains(&format!("migrate_vm {vm}@")),
            "no live step for {vm}: {plan:?}"
        );
    }
    assert!(
        !plan.stdout.contains("not live") && !plan.stdout.contains("stop_vm"),
        "{plan:?}"
    );

    // The drain, each source's last heartbeat read every 2 ms until the apply ends
    // (its directory goes with the source's DeleteVm).
    let logs = |node: &str, vm: &str| vm_dir(&cluster, node, vm).join("heartbeats");
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let sources: Vec<PathBuf> = moving.iter().map(|vm| logs(&drained, vm)).collect();
        std::thread::spawn(move || {
            let mut last = vec![0; sources.len()];
            while !done.load(Ordering::SeqCst) {
                for (i, source) in sources.iter().enumerate() {
                    for (_, l) in heartbeat_logs(source) {
                        last[i] = last[i].max(l);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            last
        })
    };
    let run = cluster.cairn_unattended(&["apply", ".", "--auto-approve"]);
    done.store(true, Ordering::SeqCst);
    let source_last = watcher.join().expect("the watcher");
    eprintln!("{}", run.stdout);
    assert_eq!(run.code, 0, "{run:?}");

    // Each VM runs elsewhere, in a VMM whose guest did not reboot, with its data.
    let after = wait_for(
        "the drained VMs running elsewhere",
        Duration::from_secs(60),
        || {
            let rows = vms(&cluster);
            moving
                .iter()
                .all(|vm| {
                    rows.iter()
                        .any(|(n, node, state)| n == vm && *node != drained && state == "running")
                })
                .then_some(rows)
        },
    );
    let status = cluster.status_json();
    for (i, (vm, seed, crc, pid, beats)) in before.iter().enumerate() {
        let node = &after.iter().find(|(n, _, _)| n == vm).expect("placed").1;
        assert!(
            vmm(&cluster, &drained, vm).is_none(),
            "{vm} still runs on {drained}"
        );
        let (new_pid, new_beats) = vmm(&cluster, node, vm).expect("its VMM on the new node");
        assert_ne!(new_pid, *pid);
        assert!(
            new_beats >= *beats,
            "{vm}'s guest rebooted: {new_beats} heartbeats on {node} < {beats} on {drained}"
        );
        let read = guest_io(cluster.path(), vm, "checksum", *seed);
        assert_eq!(read.as_ref(), Some(crc), "{vm}'s disk data on {node}");
        let row = status["vms"]
            .as_array()
            .and_then(|v| v.iter().find(|r| r["name"] == vm.as_str()))
            .expect("the VM's row");
        let last = &row["last_migration"];
        assert_eq!(last["phase"], "completed", "{row:#}");
        assert_eq!(last["from"], drained.as_str(), "{row:#}");
        // The downtime: the source's last heartbeat to the destination's first after.
        let first = heartbeat_logs(&logs(node, vm))
            .into_iter()
            .map(|(first, _)| first)
            .filter(|first| *first > source_last[i])
            .min()
            .unwrap_or_else(|| panic!("no heartbeat of {vm} on {node} after {drained}'s last"));
        eprintln!(
            "{vm}: {drained} -> {node} live, downtime from the heartbeat logs {:.1} ms, heartbeats {beats} -> {new_beats}; the commander's figures {}",
            (first - source_last[i]) as f64 / 1e6,
            last["figures"]
        );
    }
}
