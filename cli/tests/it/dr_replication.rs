//! Delta replication to another site from a protection plan, end to end (issue 18),
//! on a real two-site dev cluster (`examples/dr`, east-1 on 127.0.0.72, west-1 on
//! 127.0.0.73): the plan places db's DR copy in pool `dr` of site west and sets up
//! both ends of the replication; after `cairn apply` exits, with no cairn process running, bytes
//! written into db's disk on east show up in the DR copy on west after a snapshot
//! and a replication cycle, zeroed ranges included; the next plan has nothing to do;
//! `cairn status` shows the replication and its recovery point.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::engine::{Cluster, copy_specs, kvm_usable};
use crate::{TempDir, repo_root};

/// The real failover and the failback (`dr_replication::failover::…`).
#[path = "dr_failover.rs"]
mod failover;

pub(crate) fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// A free port on `ip` (one of this test's own loopback addresses).
pub(crate) fn port_on(ip: &str) -> u16 {
    crate::ports::free_port_on(ip)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The bytes of a volume (`VM/DISK` or `VM/DISK@SITE`) through `cairn volume export`.
fn volume_bytes(cluster: &Cluster, target: &str, out: &Path) -> Vec<u8> {
    let export = cluster.cairn(&["volume", "export", target, "."]);
    assert_eq!(export.code, 0, "{export:?}");
    let uri = export.stdout.trim().to_owned();
    let _ = std::fs::remove_file(out);
    let convert = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(out)
        .output()
        .expect("qemu-img runs");
    assert!(convert.status.success(), "qemu-img: {convert:?}");
    std::fs::read(out).expect("read the bytes")
}

/// Writes into db's disk through a writable export (db is powered off).
fn write(cluster: &Cluster, commands: &[&str]) {
    let export = cluster.cairn(&["volume", "export", "db/data", "."]);
    assert_eq!(export.code, 0, "{export:?}");
    assert!(!export.stderr.contains("read-only"), "{export:?}");
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw"]);
    for c in commands {
        io.args(["-c", c]);
    }
    let out = io.arg(export.stdout.trim()).output().expect("qemu-io runs");
    assert!(out.status.success(), "qemu-io: {out:?}");
}

/// `(name, node, state)` of every VM copy in `cairn status`'s JSON.
pub(crate) fn vm_rows(json: &serde_json::Value) -> Vec<(&str, &str, &str)> {
    json["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or_default(),
                v["node"].as_str().unwrap_or_default(),
                v["state"].as_str().unwrap_or_default(),
            )
        })
        .collect()
}

/// The DR site's entry of `cairn volume snapshots db/data`.
fn dr_snapshots(cluster: &Cluster) -> serde_json::Value {
    let run = cluster.cairn(&["volume", "snapshots", "db/data", ".", "--format", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    json["sites"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["dr_copy"] == true))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until the DR copy committed a scheduled snapshot the source took after
/// `after` (Unix ms; the name carries the source's time), and returns its name.
pub(crate) fn replicated_after(cluster: &Cluster, after: u64) -> String {
    let started = Instant::now();
    loop {
        let site = dr_snapshots(cluster);
        let newest = site["snapshots"].as_array().and_then(|s| {
            s.iter()
                .filter_map(|s| s["name"].as_str())
                .filter(|n| {
                    n.strip_prefix("auto-")
                        .and_then(|ms| ms.parse::<u64>().ok())
                        .is_some_and(|ms| ms > after)
                })
                .max()
                .map(str::to_owned)
        });
        if let Some(name) = newest {
            return name;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no snapshot taken after {after} reached the DR copy within 90 s: {site}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_protection_plan_replicates_a_disk_to_its_dr_copy_at_the_other_site() {
    if !have("qemu-io") || !have("qemu-img") {
        eprintln!("skipped: qemu-io and qemu-img (qemu-utils) are not installed");
        return;
    }
    // examples/dr on this test's own addresses, db powered off (its disk is then
    // exported writable, and qemu-io writes into it).
    let dir = TempDir::new("s-dr");
    copy_specs(&repo_root().join("examples/dr"), &dir.0);
    let cluster_file = dir.0.join("cluster.kdl");
    let text = std::fs::read_to_string(&cluster_file)
        .expect("read cluster.kdl")
        .replace(
            "127.0.0.21:7100",
            &format!("127.0.0.72:{}", port_on("127.0.0.72")),
        )
        .replace(
            "127.0.0.22:7100",
            &format!("127.0.0.73:{}", port_on("127.0.0.73")),
        );
    std::fs::write(&cluster_file, text).expect("write cluster.kdl");
    let workloads = dir.0.join("workloads.kdl");
    let text = std::fs::read_to_string(&workloads)
        .expect("read workloads.kdl")
        .replace(
            "    image \"tiny\"\n",
            "    image \"tiny\"\n    power \"off\"\n",
        );
    assert!(text.contains("power \"off\""), "{text}");
    std::fs::write(&workloads, text).expect("write workloads.kdl");
    let cluster = Cluster { dir };
    let up = cluster.cairn(&["dev", "up", "."]);
    assert_eq!(up.code, 0, "{up:?}");

    // The plan: db's disk, its DR copy on west-1, and both ends of the replication.
    let plan = cluster.cairn(&["plan", "."]);
    assert_eq!(plan.code, 0, "{plan:?}");
    eprintln!("{}", plan.stdout);
    for want in [
        "volume db-data-dr-west on west-1",
        "replication db-data on east-1",
        "to DR copy db-data-dr-west on west-1 (site west, pool dr)",
    ] {
        assert!(plan.stdout.contains(want), "{want}:\n{}", plan.stdout);
    }
    let json = cluster.cairn(&["plan", ".", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_str(&json.stdout).expect("plan JSON");
    let steps: Vec<(String, String)> = json["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["action"].as_str().unwrap_or_default().to_owned(),
                s["node"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for want in [
        ("accept_replication", "west-1"),
        ("replicate_volume", "east-1"),
        ("set_protection", "east-1"),
    ] {
        assert!(
            steps.iter().any(|(a, n)| a == want.0 && n == want.1),
            "{want:?} in {steps:?}"
        );
    }
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    // Both nodes report the replication as the specs want it: nothing to do.
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "{again:?}");

    // No cairn process runs now. Data written on east reaches west.
    write(
        &cluster,
        &["write -q -P 0xa7 1M 2M", "write -q -P 0x3c 9M 64k"],
    );
    let written = now_ms();
    let first = replicated_after(&cluster, written);
    let source = volume_bytes(&cluster, "db/data", &cluster.path().join("east.raw"));
    let copy = volume_bytes(&cluster, "db/data@west", &cluster.path().join("west.raw"));
    assert_eq!(source.len(), 16 << 20);
    assert!(source[1 << 20..3 << 20].iter().all(|b| *b == 0xa7));
    assert!(
        copy == source,
        "the DR copy (after {first}) holds the source's bytes"
    );
    // A zeroed range and new data: the next delta carries both.
    write(&cluster, &["write -q -z 1M 1M", "write -q -P 0x55 12M 4k"]);
    let rewritten = now_ms();
    let second = replicated_after(&cluster, rewritten);
    let source = volume_bytes(&cluster, "db/data", &cluster.path().join("east.raw"));
    let copy = volume_bytes(&cluster, "db/data@west", &cluster.path().join("west.raw"));
    assert!(source[1 << 20..2 << 20].iter().all(|b| *b == 0));
    assert!(
        copy == source,
        "the DR copy (after {second}) holds the zeroed range and the new block"
    );
    // The target keeps its own chain of `keep` snapshots.
    let started = Instant::now();
    loop {
        let kept = dr_snapshots(&cluster)["snapshots"]
            .as_array()
            .map_or(0, Vec::len);
        if kept == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the DR copy keeps 2 snapshots, holds {kept}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let text = cluster.cairn(&["volume", "snapshots", "db/data", "."]);
    assert_eq!(text.code, 0, "{text:?}");
    eprintln!("{}", text.stdout);
    assert!(
        text.stdout
            .contains("DR copy db-data-dr-west (vm db, disk data), site west"),
        "{}",
        text.stdout
    );
    // Status: db's last snapshot and its replication's recovery point.
    let status = cluster.cairn(&["status", "."]);
    assert_eq!(status.code, 0, "{status:?}");
    eprintln!("{}", status.stdout);
    for want in [
        "protection:",
        "replication:",
        "db-data-dr-west on west-1 (site west)",
    ] {
        assert!(status.stdout.contains(want), "{want}:\n{}", status.stdout);
    }
    // A transfer may fail for a moment on a loaded machine (the next one resumes):
    // wait for a status without an error.
    let started = Instant::now();
    let json = loop {
        let json = cluster.status_json();
        if json["protection"][0]["replications"][0]["state"] == "ok"
            || started.elapsed() > Duration::from_secs(60)
        {
            break json;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let row = &json["protection"][0];
    assert_eq!(row["vm"], "db", "{json}");
    assert!(
        row["last_snapshot"]
            .as_str()
            .is_some_and(|s| s.starts_with("auto-")),
        "{row}"
    );
    let replication = &row["replications"][0];
    assert_eq!(replication["target_node"], "west-1", "{row}");
    assert!(
        replication["last_replicated"]
            .as_str()
            .is_some_and(|s| s.starts_with("auto-")),
        "{row}"
    );
    // Nothing fails here, so the state is `ok` (a transfer in flight of a newer
    // snapshot does not change it), and the recovery point is a few schedule
    // intervals old at most; 60 s allows for a loaded machine.
    assert_eq!(replication["state"], "ok", "{row}");
    assert!(
        replication["rpo_ms"].as_u64().is_some_and(|ms| ms < 60_000),
        "{row}"
    );

    // A restore drill at west: db's newest replicated snapshot boots there without
    // NICs and is removed again; east is not touched.
    if kvm_usable() {
        let drill = cluster.cairn(&["failover", "--site", "east", ".", "--drill"]);
        eprintln!("{}", drill.stdout);
        assert_eq!(drill.code, 0, "{drill:?}");
        assert!(
            drill
                .stdout
                .contains("drill db at site west: pass: booted on west-1 from auto-"),
            "{drill:?}"
        );
        let json = cluster.status_json();
        assert_eq!(vm_rows(&json), [("db", "east-1", "stopped")], "{json}");
        let volumes: Vec<&str> = json["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(volumes, vec!["db-data", "db-data-dr-west"], "{json}");
        let after = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
        assert_eq!(after.code, 0, "the drill left nothing behind: {after:?}");
    } else {
        eprintln!("skipped the drill: /dev/kvm is not usable here");
    }
    // A real failover of a site that answers is refused (`dr_failover` fails over a
    // lost one).
    let real = cluster.cairn(&["failover", "--site", "east", "."]);
    assert_eq!(real.code, 1, "{real:?}");
    assert!(
        real.stderr
            .contains("site east is not lost: east-1 answered"),
        "{real:?}"
    );

    // The export of a DR copy is read-only.
    let export = cluster.cairn(&["volume", "export", "db/data@west", "."]);
    assert_eq!(export.code, 0, "{export:?}");
    assert!(export.stderr.contains("is a DR copy"), "{export:?}");
    let nowhere = cluster.cairn(&["volume", "export", "db/data@east", "."]);
    assert_eq!(nowhere.code, 1, "{nowhere:?}");
    assert!(
        nowhere
            .stderr
            .contains("its protection plans replicate to west"),
        "{nowhere:?}"
    );
}
