//! Protection plans on a real dev cluster (issue 18): `cairn apply` gives db's writer
//! its snapshot schedule and exits; with no controller and no cairn process running,
//! the node takes the snapshots on schedule and keeps the newest `keep`;
//! `cairn volume snapshots` lists them; a restore in place is refused while db runs and
//! a restore into a new volume works and is audited; the next plan has nothing to do.

use std::time::{Duration, Instant};

use crate::engine::{Cluster, kvm_usable};

const PLAN: &str =
    "protection-plan \"often\" {\n    snapshot every=\"2s\" keep=3\n    applies-to app=\"db\"\n}\n";

fn scheduled(cluster: &Cluster) -> Vec<serde_json::Value> {
    let run = cluster.cairn(&["volume", "snapshots", "db/data", ".", "--format", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    json["sites"][0]["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .filter(|s| s["scheduled"] == true)
        .cloned()
        .collect()
}

#[test]
fn a_protected_vms_writer_snapshots_on_schedule_with_no_controller_and_restores_are_checked() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("protect");
    std::fs::write(cluster.path().join("protection.kdl"), PLAN).expect("write protection.kdl");
    let plan = cluster.cairn(&["plan", "."]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout.contains("protection db"),
        "the plan gives db's writer its schedule:\n{}",
        plan.stdout
    );
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");

    // No cairn process runs now: the node takes them by itself.
    let started = Instant::now();
    let kept = loop {
        let kept = scheduled(&cluster);
        if kept.len() == 3 {
            break kept;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "3 scheduled snapshots within 60 s: {kept:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    std::thread::sleep(Duration::from_secs(5));
    let later = scheduled(&cluster);
    assert_eq!(later.len(), 3, "retention keeps 3: {later:?}");
    assert_ne!(
        later, kept,
        "newer snapshots replaced the oldest: {later:?}"
    );
    for s in &later {
        assert!(s["copies"].as_array().is_some_and(|c| !c.is_empty()), "{s}");
        assert_eq!(s["size_bytes"], 256 << 20, "{s}");
    }
    let text = cluster.cairn(&["volume", "snapshots", "db/data", "."]);
    assert_eq!(text.code, 0, "{text:?}");
    eprintln!("{}", text.stdout);
    assert!(
        text.stdout.contains("volume db-data (vm db, disk data)"),
        "{}",
        text.stdout
    );

    // The snapshots that come and go are no drift: nothing to do.
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "{again:?}");

    // db runs: a restore in place is refused, saying why and what to do.
    let name = later[2]["name"].as_str().expect("name").to_owned();
    let refused = cluster.cairn(&["volume", "restore", "db/data", ".", "--snapshot", &name]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("vm `db` is running on node")
            && refused.stderr.contains("--as NAME"),
        "{}",
        refused.stderr
    );
    let unknown = cluster.cairn(&[
        "volume",
        "restore",
        "db/data",
        ".",
        "--snapshot",
        "nope",
        "--as",
        "x",
    ]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(
        unknown.stderr.contains("has no snapshot `nope`"),
        "{}",
        unknown.stderr
    );
    let bad = cluster.cairn(&["volume", "restore", "db", ".", "--snapshot", &name]);
    assert_eq!(bad.code, 2, "{bad:?}");

    // Into a new volume: allowed while db runs.
    let restored = cluster.cairn(&[
        "volume",
        "restore",
        "db/data",
        ".",
        "--snapshot",
        &name,
        "--as",
        "db-data-restored",
    ]);
    assert_eq!(restored.code, 0, "{restored:?}");
    assert!(
        restored.stdout.contains("as new volume db-data-restored"),
        "{}",
        restored.stdout
    );
    let audit = cluster.cairn(&["audit", "verify", "."]);
    assert_eq!(audit.code, 0, "{audit:?}");
}
