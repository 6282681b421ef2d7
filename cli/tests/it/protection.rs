//! Protection plans on a real dev cluster (issue 18): `cairn apply` gives db's writer
//! its snapshot schedule and exits; with no controller and no cairn process running,
//! the node takes the snapshots on schedule and keeps the newest `keep`;
//! `cairn volume snapshots` lists them; a restore in place is refused while db runs, a
//! restore into a new volume works and is audited, the next plan has nothing to do;
//! and with db stopped, a restore in place brings back what its guest wrote before the
//! snapshot (the guest's own CRC-32C, after it overwrote the range).

use std::time::{Duration, Instant};

use crate::engine::{Cluster, kvm_usable};

const PLAN: &str =
    "protection-plan \"often\" {\n    snapshot every=\"2s\" keep=5\n    applies-to app=\"db\"\n}\n";

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
        if kept.len() == 5 {
            break kept;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "5 scheduled snapshots within 60 s: {kept:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    std::thread::sleep(Duration::from_secs(5));
    let later = scheduled(&cluster);
    assert_eq!(later.len(), 5, "retention keeps 5: {later:?}");
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
    let name = later[4]["name"].as_str().expect("name").to_owned();
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

    // In place: the guest writes A, a scheduled snapshot comes, the guest writes B;
    // db stopped, restored to that snapshot and started: the guest reads A.
    let a = guest_io(&cluster, "write-pattern", 7);
    let after_a = now_ms();
    let snapshot = loop {
        if let Some(s) = scheduled(&cluster)
            .into_iter()
            .find(|s| s["created_at_unix_ms"].as_u64().unwrap_or(0) > after_a)
        {
            break s["name"].as_str().expect("name").to_owned();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let b = guest_io(&cluster, "write-pattern", 8);
    assert_ne!(a, b);
    let status = cluster.status_json();
    let node = status["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|v| v["name"] == "db"))
        .and_then(|v| v["node"].as_str())
        .expect("db's node")
        .to_owned();
    let address = status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == node.as_str()))
        .and_then(|n| n["address"].as_str())
        .expect("its address")
        .to_owned();
    node_action(
        &cluster,
        &address,
        "stop",
        proto::v1::apply_request::Action::StopVm(proto::v1::StopVm {
            name: "db".into(),
            grace_ms: 0,
        }),
    );
    let restored = cluster.cairn(&["volume", "restore", "db/data", ".", "--snapshot", &snapshot]);
    assert_eq!(restored.code, 0, "{restored:?}");
    eprintln!("{}", restored.stdout);
    assert!(
        restored.stdout.contains("restored db-data in place"),
        "{}",
        restored.stdout
    );
    node_action(
        &cluster,
        &address,
        "start",
        proto::v1::apply_request::Action::StartVm(proto::v1::StartVm { name: "db".into() }),
    );
    assert_eq!(
        guest_io(&cluster, "checksum", 0),
        a,
        "after the restore the guest reads what it wrote before {snapshot}"
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `cairn vm disk-io db OP --disk data` on 64 KiB at 1 MiB: the guest's CRC-32C.
fn guest_io(cluster: &Cluster, op: &str, seed: u64) -> String {
    let seed = seed.to_string();
    let out = cluster.cairn(&[
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
    assert_eq!(out.code, 0, "vm disk-io {op}: {out:?}");
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("crc32c "))
        .unwrap_or_else(|| panic!("no crc32c in {}", out.stdout))
        .to_owned()
}

/// One action on a node, signed with the dev cluster's controller key.
fn node_action(
    cluster: &Cluster,
    address: &str,
    id: &str,
    action: proto::v1::apply_request::Action,
) {
    let key = proto::auth::Identity::load(&cluster.path().join(".cairn/controller.key"))
        .expect("the dev cluster's controller key");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut client =
            proto::client::NodeClient::connect(address, proto::auth::RequestSigner::new(key))
                .await
                .expect("connect");
        client
            .apply(proto::v1::ApplyRequest {
                request_id: format!("protection-test-{id}-{}", now_ms()),
                action: Some(action),
            })
            .await
            .unwrap_or_else(|status| panic!("{id}: {status:?}"));
    });
}
