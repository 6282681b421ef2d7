//! Live migration through `cairn plan` and `cairn apply` on a real dev cluster
//! (issue 17): two nodes on 127.0.0.31-32 (helper H's range), one diskless VM
//! without NICs. Draining its node (`maintenance=#true`) plans one `migrate_vm`
//! step; apply moves it live (the guest's heartbeat counter goes on, no reboot).
//! The faults are real: kill -9 of the destination's VMM before the commit (the
//! source runs on, alone), kill -9 of the source's VMM after the commit record
//! (the destination runs, alone).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::TempDir;
use crate::engine::{Cluster, free_port, kvm_usable};
use crate::ha::{vmm_pids, vmm_status};

fn specs(dir: &Path, maintenance: Option<&str>, ports: (u16, u16)) {
    two_node_specs(dir, maintenance, ("127.0.0.31", "127.0.0.32"), ports, false);
}

/// Two nodes `n-1`, `n-2` at `ips` (`maintenance=#true` on `maintenance`) and one VM
/// `mv` of 64 MiB without NICs; with `disk`, each node has a disk, the site a pool
/// with a copy on each node, and `mv` a 64 MiB disk `data` in it.
pub(crate) fn two_node_specs(
    dir: &Path,
    maintenance: Option<&str>,
    ips: (&str, &str),
    ports: (u16, u16),
    disk: bool,
) {
    let flag = |node: &str| {
        if maintenance == Some(node) {
            " maintenance=#true"
        } else {
            ""
        }
    };
    let (class_disk, pool, quota, vm_disk) = if disk {
        (
            "\n    disk \"disk0\" size=\"1GiB\" class=\"ssd\"",
            "    pool \"local\" disk-class=\"ssd\" replicas=2 failure-domain=\"node\" {\n        stripe-width 1\n        stripe-unit \"64KiB\"\n    }\n",
            " storage=\"1GiB\"",
            "\n    disk \"data\" size=\"64MiB\" pool=\"local\"",
        )
    } else {
        ("", "", "", "")
    };
    let cluster = format!(
        r#"node-class "small" {{
    cpu 4
    memory "4GiB"
    host-reserve cpu=1 memory="512MiB"{class_disk}
    nic "eth0" speed="1Gbps"
}}

site "lab" {{
    rack "desk" {{
        node "n-1" class="small" address="{}:{}"{}
        node "n-2" class="small" address="{}:{}"{}
    }}
{pool}}}
"#,
        ips.0,
        ports.0,
        flag("n-1"),
        ips.1,
        ports.1,
        flag("n-2")
    );
    std::fs::write(dir.join("cluster.kdl"), cluster).expect("write cluster.kdl");
    std::fs::write(
        dir.join("workloads.kdl"),
        format!(
            r#"tenant "dev" {{
    quota vcpus=4 memory="1GiB"{quota} vms=4
    member "dev@example.com" role="admin"
}}

image "tiny" builtin="cairn-guest"

vm "mv" tenant="dev" site="lab" {{
    cpu 1
    memory "64MiB"
    image "tiny"{vm_disk}
}}
"#
        ),
    )
    .expect("write workloads.kdl");
}

pub(crate) fn vm_row(status: &Value) -> Value {
    status["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|v| v["name"] == "mv"))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The VMM of `mv` on `node`: (pid, its control socket).
pub(crate) fn vmm_on(cluster: &Cluster, node: &str) -> Option<(u32, std::path::PathBuf)> {
    let dir = cluster.path().join(".cairn/dev").join(node).join("vms/mv");
    let pid = *vmm_pids(&dir.to_string_lossy()).first()?;
    Some((pid, dir.join("control.sock")))
}

pub(crate) fn heartbeats(socket: &Path) -> Option<u64> {
    vmm_status(socket)?["heartbeat_total"].as_u64()
}

pub(crate) fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "{what} not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cairn apply --auto-approve` with the migration hold hook at `point` (holding
/// `hold_ms`, the hook touching `marker`); kills the VMM of `mv` on `victim` with
/// SIGKILL when the hold is reached; returns the run.
pub(crate) fn apply_held(
    cluster: &Cluster,
    point: &str,
    marker: &Path,
    hold_ms: u64,
    victim: Option<&str>,
) -> crate::Run {
    let child = cluster
        .command(&["apply", ".", "--auto-approve"])
        .env(
            "CAIRN_MIGRATE_HOLD",
            format!("{point}:{}:{hold_ms}", marker.display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cairn apply runs");
    wait_for("the hold", Duration::from_secs(120), || {
        marker.exists().then_some(())
    });
    if let Some(victim) = victim {
        let (pid, _) = vmm_on(cluster, victim).expect("the victim's VMM runs");
        let killed = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(killed, "kill -9 {pid}");
    }
    run_of(child.wait_with_output().expect("cairn apply ends"))
}

fn apply_killing(cluster: &Cluster, point: &str, victim: &str) -> crate::Run {
    let marker = cluster.path().join(format!("hold-{point}"));
    apply_held(cluster, point, &marker, 1500, Some(victim))
}

#[test]
fn draining_a_node_moves_its_vm_live_and_a_killed_side_leaves_exactly_one_running() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here; the test migrates a running VM");
        return;
    }
    let dir = TempDir::new("migration");
    let ports = (free_port(), free_port());
    specs(&dir.0, None, ports);
    let cluster = Cluster { dir };
    let up = cluster.cairn(&["dev", "up", "."]);
    assert_eq!(up.code, 0, "{up:?}");
    let first = cluster.cairn_unattended(&["apply", ".", "--auto-approve"]);
    assert_eq!(first.code, 0, "{first:?}");
    let row = vm_row(&cluster.status_json());
    assert_eq!(row["state"], "running", "{row:#}");
    let a = row["node"].as_str().expect("a node").to_owned();
    let b = if a == "n-1" { "n-2" } else { "n-1" }.to_owned();

    // Drain A: one migrate_vm step, live; --cold keeps the old four.
    specs(cluster.path(), Some(&a), ports);
    let plan = cluster.cairn(&["plan", "."]);
    assert!(
        plan.stdout.contains(&format!("migrate_vm mv@{b}"))
            && plan.stdout.contains("live migration"),
        "{plan:?}"
    );
    let cold = cluster.cairn(&["plan", ".", "--cold"]);
    assert!(
        cold.stdout.contains(&format!("stop_vm mv@{a}")) && !cold.stdout.contains("migrate_vm"),
        "{cold:?}"
    );

    // 1. The destination's VMM dies before the commit: the source runs on, alone.
    let (source_pid, source_socket) = vmm_on(&cluster, &a).expect("the source's VMM");
    let before = heartbeats(&source_socket).expect("the source's heartbeats");
    let run = apply_killing(&cluster, "prepared", &b);
    eprintln!("the apply that lost its destination before the commit: {run:?}");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("aborted"), "{run:?}");
    let after = wait_for(
        "the source's heartbeats going on",
        Duration::from_secs(10),
        || heartbeats(&source_socket).filter(|h| *h > before),
    );
    assert!(after > before);
    assert_eq!(vmm_on(&cluster, &a).map(|v| v.0), Some(source_pid));
    assert!(vmm_on(&cluster, &b).is_none(), "a destination VMM is left");
    let row = vm_row(&cluster.status_json());
    assert_eq!(
        (row["node"].as_str(), row["state"].as_str()),
        (Some(a.as_str()), Some("running")),
        "{row:#}"
    );

    // 2. The source's VMM dies after the commit record: the destination runs, alone.
    let run = apply_killing(&cluster, "committed", &a);
    eprintln!("the apply that lost its source after the commit: {run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    let row = wait_for(
        "mv running on the destination",
        Duration::from_secs(30),
        || {
            let row = vm_row(&cluster.status_json());
            (row["node"] == b.as_str() && row["state"] == "running").then_some(row)
        },
    );
    assert!(
        vmm_on(&cluster, &a).is_none(),
        "the source's VMM runs: {row:#}\n{run:?}"
    );
    let (_, socket) = vmm_on(&cluster, &b).expect("the destination's VMM");
    let moved = heartbeats(&socket).expect("the destination's heartbeats");
    assert!(moved >= after, "the guest rebooted: {moved} < {after}");
    // The run's own result: the VM runs on B (the next plan has nothing to move).
    let plan = cluster.cairn(&["plan", "."]);
    assert!(!plan.stdout.contains("migrate_vm"), "{plan:?}\n{run:?}");

    // 3. A clean drain back to A, measured: the heartbeat counter goes on, and the
    // downtime from the VMMs' heartbeat logs (the source's last heartbeat to the
    // destination's first; the built-in guest beats every 10 ms, so ±10 ms).
    specs(cluster.path(), Some(&b), ports);
    let before = heartbeats(&socket).expect("heartbeats on B");
    let source_logs = cluster
        .path()
        .join(".cairn/dev")
        .join(&b)
        .join("vms/mv/heartbeats");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        // The source's last heartbeat, read until the apply ends (its directory may
        // go with the source's DeleteVm; `last` is rewritten at every heartbeat).
        std::thread::spawn(move || {
            let mut last = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                for (_, l) in heartbeat_logs(&source_logs) {
                    last = last.max(l);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            last
        })
    };
    let run = cluster.cairn_unattended(&["apply", ".", "--auto-approve"]);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let source_last = watcher.join().expect("the watcher");
    assert_eq!(run.code, 0, "{run:?}");
    eprintln!("the clean drain: {run:?}");
    let (_, socket) = vmm_on(&cluster, &a).expect("the VMM on A again");
    let now = heartbeats(&socket).expect("heartbeats on A");
    assert!(now >= before, "the guest rebooted: {now} < {before}");
    let destination = cluster
        .path()
        .join(".cairn/dev")
        .join(&a)
        .join("vms/mv/heartbeats");
    let destination_first = heartbeat_logs(&destination)
        .into_iter()
        .map(|(first, _)| first)
        .filter(|first| *first > source_last)
        .min()
        .expect("the destination's first heartbeat after the source's last");
    let downtime_ms = (destination_first - source_last) as f64 / 1e6;
    let status = cluster.status_json();
    let row = vm_row(&status);
    assert_eq!(row["node"], a.as_str(), "{row:#}");
    let m = &row["last_migration"];
    assert_eq!(
        (m["from"].as_str(), m["to"].as_str(), m["phase"].as_str()),
        (Some(b.as_str()), Some(a.as_str()), Some("completed")),
        "{row:#}"
    );
    let f = &m["figures"];
    assert_eq!(f["mode"], "pre-copy", "{f:#}");
    assert!(f["rounds"].as_u64() >= Some(1), "{f:#}");
    assert!(f["bytes_sent"].as_u64() > Some(0), "{f:#}");
    let text = cluster.cairn(&["status", "."]);
    assert!(
        text.stdout.contains("last migrations:")
            && text
                .stdout
                .contains(&format!("mv {b} -> {a}: completed, pre-copy")),
        "{text:?}"
    );
    eprintln!(
        "downtime from the heartbeat logs: {downtime_ms:.1} ms; the commander's figures: {f}"
    );
    assert!(downtime_ms < 5_000.0, "{downtime_ms} ms");
}

/// Each heartbeat log in `dir`: (first, last) heartbeat, `CLOCK_BOOTTIME` ns.
pub(crate) fn heartbeat_logs(dir: &Path) -> Vec<(u64, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let text = std::fs::read_to_string(entry.path()).ok()?;
            let mut lines = text.lines();
            let mut boottime = |tag: &str| -> Option<u64> {
                let mut fields = lines.next()?.split_whitespace();
                (fields.next()? == tag).then_some(())?;
                fields.nth(1)?.parse().ok()
            };
            Some((boottime("first")?, boottime("last")?))
        })
        .collect()
}

/// A private network namespace for a dev cluster (the nftables faults stay in it).
struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        let name = format!("h-mig-{}", std::process::id());
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns(name);
        (ok(&["-n", &ns.0, "link", "set", "lo", "up"])).then_some(ns)
    }

    /// Runs `nft` in the namespace.
    fn nft(&self, script: &str) {
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", script])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "nft {script}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `cairn ARGS` in `ns`, in the cluster's directory.
fn cairn_in(ns: &Netns, cluster: &Cluster, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_cairn")])
        .args(args)
        .current_dir(cluster.path())
        .env("NO_COLOR", "1")
        .env(
            "CAIRN_NODE_BIN",
            crate::engine::node_binaries().join("cairn-node"),
        )
        .stdin(Stdio::null());
    c
}

fn run_of(out: std::process::Output) -> crate::Run {
    crate::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `cairn apply` in `ns` holding at `point`; runs `fault` when the hold is reached.
fn apply_breaking(ns: &Netns, cluster: &Cluster, point: &str, fault: impl FnOnce()) -> crate::Run {
    let marker = cluster.path().join(format!("hold-net-{point}"));
    let child = cairn_in(ns, cluster, &["apply", ".", "--auto-approve"])
        .env(
            "CAIRN_MIGRATE_HOLD",
            format!("{point}:{}:1500", marker.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cairn apply runs");
    wait_for("the hold", Duration::from_secs(60), || {
        marker.exists().then_some(())
    });
    fault();
    run_of(child.wait_with_output().expect("cairn apply ends"))
}

#[test]
fn a_link_broken_before_the_commit_keeps_the_source_and_after_it_the_destination() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here; the test migrates a running VM");
        return;
    }
    let Some(ns) = Netns::new() else {
        eprintln!("skipped: cannot make a network namespace (needs root and iproute2)");
        return;
    };
    if Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "list", "ruleset"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!("skipped: nft does not run here");
        return;
    }
    let dir = TempDir::new("migration-link");
    let ports = (free_port(), free_port());
    specs(&dir.0, None, ports);
    let cluster = Cluster { dir };
    let cairn = |args: &[&str]| run_of(cairn_in(&ns, &cluster, args).output().expect("cairn"));
    let up = cairn(&["dev", "up", "."]);
    assert_eq!(up.code, 0, "{up:?}");
    let first = cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(first.code, 0, "{first:?}");
    let status = || -> Value {
        serde_json::from_str(&cairn(&["status", ".", "--format", "json"]).stdout)
            .unwrap_or(Value::Null)
    };
    let a = vm_row(&status())["node"]
        .as_str()
        .expect("a node")
        .to_owned();
    let (b, b_ip, b_port) = if a == "n-1" {
        ("n-2", "127.0.0.32", ports.1)
    } else {
        ("n-1", "127.0.0.31", ports.0)
    };
    specs(cluster.path(), Some(&a), ports);
    let (source_pid, source_socket) = vmm_on(&cluster, &a).expect("the source's VMM");

    // Before the commit: every connection to the destination but its agent's is
    // reset (the source VMM cannot reach the destination VMM). The source runs on.
    let before = heartbeats(&source_socket).expect("heartbeats");
    let run = apply_breaking(&ns, &cluster, "prepared", || {
        ns.nft(&format!(
            "add table inet hmig; add chain inet hmig out {{ type filter hook output priority 0; }}; add rule inet hmig out ip daddr {b_ip} tcp dport != {b_port} reject with tcp reset"
        ));
    });
    eprintln!("the link broken before the commit: {run:?}");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("aborted"), "{run:?}");
    ns.nft("delete table inet hmig");
    wait_for("the source beating on", Duration::from_secs(10), || {
        heartbeats(&source_socket).filter(|h| *h > before)
    });
    assert_eq!(vmm_on(&cluster, &a).map(|v| v.0), Some(source_pid));
    assert!(vmm_on(&cluster, b).is_none(), "a destination VMM is left");

    // After the commit record: every connection to the destination is reset, its
    // agent's included. Its commit cannot get through: the apply fails, and the
    // source is not resumed (the record names the destination).
    let run = apply_breaking(&ns, &cluster, "committed", || {
        ns.nft(&format!(
            "add table inet hmig; add chain inet hmig out {{ type filter hook output priority 0; }}; add rule inet hmig out ip daddr {b_ip} reject with tcp reset"
        ));
    });
    eprintln!("the link broken after the commit: {run:?}");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("stays paused"), "{run:?}");
    let frozen = heartbeats(&source_socket);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        heartbeats(&source_socket),
        frozen,
        "the source runs again after the commit record"
    );
    // The link is back: the next apply settles the migration from its record and
    // the destination runs, alone, with the guest's counter going on.
    ns.nft("delete table inet hmig");
    let settled = cairn(&["apply", ".", "--auto-approve"]);
    eprintln!("the apply after the link came back: {settled:?}");
    let row = wait_for(
        "mv running on the destination",
        Duration::from_secs(30),
        || {
            let row = vm_row(&status());
            (row["node"] == b && row["state"] == "running").then_some(row)
        },
    );
    let (_, socket) = vmm_on(&cluster, b).expect("the destination's VMM");
    assert!(heartbeats(&socket) >= frozen, "the guest rebooted");
    assert!(
        vmm_on(&cluster, &a).is_none(),
        "the source's VMM is left: {row:#}"
    );
    assert_eq!(row["last_migration"]["phase"], "completed", "{row:#}");
    let _ = cairn(&["dev", "down", "."]);
}
