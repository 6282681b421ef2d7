//! VM disks reached remotely (issue 15, item 2), on a real dev cluster with its
//! controller: a VM cold-moved (by a pushed `affinity kind="node"`) to the node that
//! holds no copy of its volume runs with its disk through that node's storage client,
//! and its guest reads back exactly what it wrote before the move.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::ha::HaCluster;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cairn vm disk-io db OP --disk data …`: the guest's CRC-32C of the range.
pub(crate) fn guest_io(ha: &HaCluster, op: &str, seed: u64) -> String {
    let seed = seed.to_string();
    let started = std::time::Instant::now();
    // 64 KiB: the built-in guest's instructions are emulated here (PVM), so a guest
    // checksum costs about 1 µs per byte; 25 s is the longest a guest command may take.
    let out = ha.cluster.cairn(&[
        "vm",
        "disk-io",
        "db",
        op,
        ".",
        "--disk",
        "data",
        "--offset",
        "1MiB",
        "--length",
        "64KiB",
        "--seed",
        &seed,
        "--timeout",
        "25s",
    ]);
    eprintln!(
        "vm disk-io {op}: {} ({:?})",
        out.stdout.trim(),
        started.elapsed()
    );
    assert_eq!(
        out.code, 0,
        "vm disk-io {op}: {}\n{}",
        out.stdout, out.stderr
    );
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("crc32c "))
        .unwrap_or_else(|| panic!("no crc32c in {}", out.stdout))
        .to_owned()
}

#[test]
fn a_vm_cold_moved_to_a_node_without_a_copy_reads_and_writes_its_disk_remotely() {
    let Some(ha) = HaCluster::up("remote-disk") else {
        return;
    };
    let log = || {
        std::fs::read_to_string(ha.cluster.path().join(".cairn/dev/controller.log"))
            .unwrap_or_default()
    };
    // db-data's copies, from the epoch the controller adopted.
    let adopted = ha.wait("db-data's epoch adopted", Duration::from_secs(60), |_| {
        log()
            .lines()
            .find(|l| l.contains("volume db-data: epoch 1"))
            .map(str::to_owned)
    });
    let copies: Vec<String> = ["lab-1", "lab-2", "lab-3"]
        .iter()
        .filter(|n| adopted.contains(&format!(", {n}")) || adopted.contains(&format!(": {n}")))
        .map(|n| n.to_string())
        .collect();
    let elsewhere = ["lab-1", "lab-2", "lab-3"]
        .into_iter()
        .find(|n| !adopted.contains(n))
        .unwrap_or_else(|| panic!("db-data has a copy on every node: {adopted}"));
    eprintln!("db-data copies {copies:?}; moving db to {elsewhere}");

    // The guest writes a pattern through its virtio-blk disk before the move.
    let written = guest_io(&ha, "write-pattern", 7);
    assert_eq!(guest_io(&ha, "checksum", 0), written);

    // Pin db to the node without a copy: a cold move.
    let work = ha.cluster.path().join(".cairn/dev/gitops/work");
    let path = work.join("workloads.kdl");
    let mut text = std::fs::read_to_string(&path).expect("read workloads.kdl");
    text.push_str(&format!(
        "\naffinity \"db-on-{elsewhere}\" kind=\"node\" hard=#true {{\n    select app=\"db\"\n    nodes node=\"{elsewhere}\"\n}}\n"
    ));
    std::fs::write(&path, text).expect("write workloads.kdl");
    git(
        &work,
        &[
            "commit",
            "-q",
            "-am",
            "db: pinned to a node without its data",
        ],
    );
    git(&work, &["push", "-q", "origin", "main"]);
    let moved = ha.wait(
        "db running on the node without a copy, its disk attached remotely",
        Duration::from_secs(90),
        |s| {
            let vm = s["vms"]
                .as_array()?
                .iter()
                .find(|v| v["name"] == "db")?
                .clone();
            let disk = vm["disks"].as_array()?.first()?.clone();
            (vm["state"] == "running" && vm["node"] == elsewhere && disk["attached"] == true)
                .then_some(vm)
        },
    );
    eprintln!("db after the move: {moved:#}");
    assert_eq!(moved["disks"][0]["data"], "remote", "{moved:#}");
    assert!(
        log().contains(&format!("clients: {elsewhere}")),
        "the controller named {elsewhere} a client of db-data:\n{}",
        log()
    );
    // The guest reads what it wrote before the move, through the storage client.
    assert_eq!(
        guest_io(&ha, "checksum", 0),
        written,
        "data changed by the move"
    );
    // ... and writes remotely: a new pattern reads back as written.
    let rewritten = guest_io(&ha, "write-pattern", 8);
    assert_ne!(rewritten, written);
    assert_eq!(guest_io(&ha, "checksum", 0), rewritten);
}
