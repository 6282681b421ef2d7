//! Downtime of a quickstart drain through `cairn apply` (issue 17).
//!
//! `cargo bench -p cli --bench drain` (release): the quickstart's own specs on a
//! three-node dev cluster (`cairn dev up`, each node in its own network namespace)
//! on 127.0.0.41-43, a witness (if the quickstart has one) on .44 (`CAIRN_BENCH_IPS=A,B,C,W`
//! for others), its fault-tolerant VMs left out (a pair is not drained), `db` given 256 MiB
//! (`CAIRN_BENCH_DB_MEMORY`), every guest ticking every 1 ms (a wrapper of
//! `cairn-vmm` rewrites its config; the quickstart's is 10 ms), all of its RAM
//! touched, then dirtying 5,000 pages/s ("moderate writes"). Each drain sets
//! `maintenance=#true` on the node running `db` (and on no other) and runs
//! `cairn apply . --auto-approve`: every VM running there moves. Per moved VM it
//! prints the downtime (the source's last heartbeat → the destination's first, from
//! the VMMs' heartbeat logs, `CLOCK_BOOTTIME`, as `cli it migration_nics` measures it),
//! and the commander's figures (total, bytes sent ÷ the source VMM's resident memory,
//! rounds, mode, and its own downtime bound). Baseline in the same command: the node
//! path of the same move (below); with `CAIRN_BENCH_COLD=1` also the same drain with
//! `--cold` (stop, delete, create, start), drains interleaved live / cold.
//! Each live drain also prints the commander's trace of the switch-over
//! (`CAIRN_MIGRATE_TRACE`: from the source's `ready-to-commit` to the commit record,
//! the disks' hand-over and each side's commit answer).
//! (A cold move to a node without a copy of the VM's disks needs the controller to
//! name it a client first: without one, `--cold` fails for such VMs, so the cold
//! drains are off by default.) The node-runtime `migrate` bench (the node path of the
//! same move: a 256 MiB guest, the same load and tick, no commit record, no epoch
//! compare-and-swap; `CAIRN_BENCH_NODE_PATH`, else its newest build in
//! `target/release/deps`) runs after the drains with the same binaries, and the
//! ratio of `db`'s downtime to its median is printed.
//! Medians over `CAIRN_BENCH_RUNS` (default 5) drains per mode. Not a test: it asserts
//! nothing but that each step succeeds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The bench's dev cluster: `dev down` and the directory removed on drop.
struct Bench {
    dir: PathBuf,
    vmm: PathBuf,
}

/// The `cairn` measured: `CAIRN_BENCH_CAIRN` (e.g. a release build driven by a
/// debug build of this bench), else the one cargo built with the bench.
fn cairn_binary() -> PathBuf {
    std::env::var_os("CAIRN_BENCH_CAIRN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cairn")), PathBuf::from)
}

impl Bench {
    fn command(&self, args: &[&str]) -> Command {
        let cairn = cairn_binary();
        let mut c = Command::new(&cairn);
        c.args(args)
            .current_dir(&self.dir)
            .env("NO_COLOR", "1")
            .env(
                "CAIRN_NODE_BIN",
                cairn.parent().expect("a directory").join("cairn-node"),
            )
            .env("CAIRN_VMM_BIN", &self.vmm)
            .stdin(Stdio::null());
        c
    }

    fn cairn(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("cairn runs");
        assert!(
            out.status.success(),
            "cairn {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn status(&self) -> Value {
        let out = self.cairn(&["status", ".", "--format", "json"]);
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The status's VMs: (name, node, state).
    fn vms(&self) -> Vec<(String, String, String)> {
        self.status()["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| {
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                (text("name"), text("node"), text("state"))
            })
            .collect()
    }

    fn vm_dir(&self, node: &str, vm: &str) -> PathBuf {
        self.dir.join(".cairn/dev").join(node).join("vms").join(vm)
    }

    fn control(&self, node: &str, vm: &str, request: vmm::control::Request) -> bool {
        let socket = self.vm_dir(node, vm).join("control.sock");
        vmm::control::ControlClient::connect(&socket, Duration::from_secs(5))
            .and_then(|mut c| c.request(&request))
            .is_ok()
    }

    fn vmm_status(&self, node: &str, vm: &str) -> Option<vmm::control::VmStatus> {
        let socket = self.vm_dir(node, vm).join("control.sock");
        vmm::control::ControlClient::connect(&socket, Duration::from_secs(5))
            .and_then(|mut c| c.request(&vmm::control::Request::Status))
            .ok()?
            .status
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.command(&["dev", "down", "."]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The quickstart's specs at `ips` on `ports`, `maintenance=#true` on `maintenance`,
/// `db` with `db_memory`.
fn specs(dir: &Path, ips: &[String], ports: &[u16], maintenance: &str, db_memory: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    for file in ["tenants.kdl", "workloads.kdl"] {
        let mut text = std::fs::read_to_string(root.join(file)).expect("the quickstart's specs");
        // Fault-tolerant VMs are not drained (their pair is): left out.
        while let Some(at) = text.find("availability \"ft\"") {
            let start = text[..at].rfind("\nvm \"").map_or(0, |s| s + 1);
            let end = text[at..].find("\n}\n").map_or(text.len(), |e| at + e + 3);
            text.replace_range(start..end, "");
        }
        let text = text.replace(
            "vm \"db\" tenant=\"dev\" site=\"lab\" {\n    cpu 1\n    memory \"128MiB\"",
            &format!(
                "vm \"db\" tenant=\"dev\" site=\"lab\" {{\n    cpu 1\n    memory \"{db_memory}\""
            ),
        );
        std::fs::write(dir.join(file), text).expect("write specs");
    }
    let mut text =
        std::fs::read_to_string(root.join("cluster.kdl")).expect("the quickstart's cluster.kdl");
    for (i, (ip, port)) in ips.iter().zip(ports).take(3).enumerate() {
        let node = format!("lab-{}", i + 1);
        let from = format!(
            "node \"{node}\" class=\"laptop\" address=\"127.0.0.1{}:7100\"",
            i + 1
        );
        assert!(text.contains(&from), "the quickstart names {node} so");
        let flag = if node == maintenance {
            " maintenance=#true"
        } else {
            ""
        };
        text = text.replace(
            &from,
            &format!("node \"{node}\" class=\"laptop\" address=\"{ip}:{port}\"{flag}"),
        );
    }
    // A witness (it backs the HA failure decision) in the bench's range too.
    if let Some(at) = text.find("witness address=\"") {
        let from = at + "witness address=\"".len();
        let end = from + text[from..].find('"').expect("a quoted address");
        text.replace_range(from..end, &format!("{}:{}", ips[3], ports[3]));
    }
    std::fs::write(dir.join("cluster.kdl"), text).expect("write cluster.kdl");
}

/// A wrapper of `real` whose guests tick every 1 ms (heartbeat resolution).
fn ticking_every_ms(dir: &Path, real: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("fast-tick-cairn-vmm");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             [ \"$1\" = --config ] || exec {real} \"$@\"\n\
             config=\"$2\"\n\
             sed -e 's/\"tick_ms\": *[0-9]*/\"tick_ms\": 1/' \"$config\" > \"$config.vmm\" || exit 2\n\
             shift 2\n\
             exec {real} --config \"$config.vmm\" \"$@\"\n",
            real = real.display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// Every heartbeat log of `dir`: (first, last) `CLOCK_BOOTTIME` ns.
fn heartbeat_logs(dir: &Path) -> Vec<(u64, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| vmm::heartbeat_log::read(&e.path()))
        .map(|r| (r.first.1, r.last.1))
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "{what} not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Touches all of `vm`'s RAM, then dirties 5,000 pages/s.
fn load(bench: &Bench, node: &str, vm: &str) {
    use vmm::control::Request::SetDirtyRate;
    let status = || bench.vmm_status(node, vm).expect("the VMM answers");
    let before = status();
    let pages = before.memory_bytes.saturating_sub(2 << 20) / 4096;
    if before.guest_resident_bytes < before.memory_bytes / 10 * 9 {
        bench.control(
            node,
            vm,
            SetDirtyRate {
                pages_per_second: 400_000,
            },
        );
        wait_for(
            &format!("{vm}'s RAM touched"),
            Duration::from_secs(60),
            || (status().pages_dirtied >= before.pages_dirtied + pages).then_some(()),
        );
    }
    bench.control(
        node,
        vm,
        SetDirtyRate {
            pages_per_second: 5_000,
        },
    );
}

/// The guest memory resident in the VMM serving `vm` on `node`, bytes.
fn resident(bench: &Bench, node: &str, vm: &str) -> u64 {
    bench
        .vmm_status(node, vm)
        .map_or(0, |s| s.guest_resident_bytes)
}

/// The node-runtime `migrate` bench: `CAIRN_BENCH_NODE_PATH`, else the newest build
/// of it in the workspace's `target/release/deps`.
fn node_path_bench() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CAIRN_BENCH_NODE_PATH") {
        return Some(path.into());
    }
    let deps = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/deps");
    std::fs::read_dir(deps)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_none()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("migrate-"))
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One moved VM: (vm, live, downtime ms, commander's figures).
struct Moved {
    vm: String,
    live: bool,
    downtime_ms: f64,
    figures: Value,
    resident: u64,
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("drain bench skipped: /dev/kvm is not usable; the bench migrates running VMs");
        return;
    }
    if let Err(why) = network::netns_capability() {
        println!(
            "drain bench skipped: no network namespaces ({why}); VMs with NICs move live only between nodes with a migration address in theirs"
        );
        return;
    }
    let cairn = cairn_binary();
    let bin = cairn.parent().expect("a directory");
    let real_vmm = std::env::var_os("CAIRN_VMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin.join("cairn-vmm"));
    if !bin.join("cairn-node").is_file() || !real_vmm.is_file() {
        println!(
            "drain bench skipped: cairn-node and cairn-vmm are not built beside {} (cargo build --release -p node-runtime -p vmm)",
            cairn.display()
        );
        return;
    }
    let runs: usize = std::env::var("CAIRN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(5);
    let ips: Vec<String> = std::env::var("CAIRN_BENCH_IPS")
        .unwrap_or_else(|_| "127.0.0.41,127.0.0.42,127.0.0.43,127.0.0.44".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(
        ips.len(),
        4,
        "CAIRN_BENCH_IPS names four addresses (three nodes, a witness)"
    );
    let db_memory = std::env::var("CAIRN_BENCH_DB_MEMORY").unwrap_or_else(|_| "256MiB".into());
    let cold_too = std::env::var("CAIRN_BENCH_COLD").is_ok_and(|v| v == "1");
    let ports = [free_port(), free_port(), free_port(), free_port()];

    let dir = std::env::temp_dir().join(format!("cairn-drain-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let vmm = ticking_every_ms(&dir, &real_vmm);
    let bench = Bench { dir, vmm };
    specs(&bench.dir, &ips, &ports, "", &db_memory);
    bench.cairn(&["dev", "up", "."]);
    bench.cairn(&["apply", ".", "--auto-approve"]);
    let rows = wait_for("every VM running", Duration::from_secs(120), || {
        let rows = bench.vms();
        (rows.len() >= 5 && rows.iter().all(|(_, _, s)| s == "running")).then_some(rows)
    });
    for (vm, node, _) in &rows {
        load(&bench, node, vm);
    }
    println!(
        "quickstart drain bench: 3 nodes on {}, db {db_memory}, guests ticking every 1 ms, all RAM touched, 5,000 pages/s dirtied; {runs} drains per mode{}",
        ips[..3].join(", "),
        if cold_too {
            ", live and --cold interleaved"
        } else {
            ""
        }
    );

    let mut moved: Vec<Moved> = vec![];
    let mut applies: [Vec<f64>; 2] = [vec![], vec![]];
    let modes: Vec<bool> = (0..runs)
        .flat_map(|_| {
            if cold_too {
                vec![true, false]
            } else {
                vec![true]
            }
        })
        .collect();
    for (drain, live) in modes.into_iter().enumerate() {
        let rows = bench.vms();
        let drained = rows
            .iter()
            .find(|(vm, _, _)| vm == "db")
            .map(|(_, node, _)| node.clone())
            .expect("db is placed");
        let moving: Vec<String> = rows
            .iter()
            .filter(|(_, node, _)| *node == drained)
            .map(|(vm, _, _)| vm.clone())
            .collect();
        let rss: Vec<u64> = moving
            .iter()
            .map(|vm| resident(&bench, &drained, vm))
            .collect();
        specs(&bench.dir, &ips, &ports, &drained, &db_memory);
        // Each source's last heartbeat, read every 2 ms until the apply ends (its
        // directory goes with the source's DeleteVm).
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let done = done.clone();
            let sources: Vec<PathBuf> = moving
                .iter()
                .map(|vm| bench.vm_dir(&drained, vm).join("heartbeats"))
                .collect();
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
        let started = Instant::now();
        let mut args = vec!["apply", ".", "--auto-approve"];
        if !live {
            args.push("--cold");
        }
        let run = bench
            .command(&args)
            .env("CAIRN_MIGRATE_TRACE", "1")
            .output()
            .expect("cairn runs");
        let took = started.elapsed().as_secs_f64() * 1e3;
        done.store(true, Ordering::SeqCst);
        let source_last = watcher.join().expect("the watcher");
        assert!(
            run.status.success(),
            "drain {drain}: {}\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        applies[usize::from(live)].push(took);
        let after = wait_for(
            "the drained VMs running elsewhere",
            Duration::from_secs(60),
            || {
                let rows = bench.vms();
                moving
                    .iter()
                    .all(|vm| {
                        rows.iter()
                            .any(|(n, node, s)| n == vm && *node != drained && s == "running")
                    })
                    .then_some(rows)
            },
        );
        let status = bench.status();
        println!(
            "drain {} ({}): {drained} -> maintenance, apply {took:.0} ms",
            drain + 1,
            if live { "live" } else { "cold" }
        );
        for line in String::from_utf8_lossy(&run.stderr)
            .lines()
            .filter(|l| l.starts_with("migrate trace"))
        {
            println!("  {line}");
        }
        for (i, vm) in moving.iter().enumerate() {
            let node = &after.iter().find(|(n, _, _)| n == vm).expect("placed").1;
            let first = wait_for(
                &format!("{vm}'s first heartbeat on {node}"),
                Duration::from_secs(30),
                || {
                    heartbeat_logs(&bench.vm_dir(node, vm).join("heartbeats"))
                        .into_iter()
                        .map(|(first, _)| first)
                        .filter(|first| *first > source_last[i])
                        .min()
                },
            );
            let downtime_ms = (first - source_last[i]) as f64 / 1e6;
            let row = status["vms"]
                .as_array()
                .and_then(|v| v.iter().find(|r| r["name"] == vm.as_str()))
                .cloned()
                .unwrap_or_default();
            let figures = if live {
                row["last_migration"]["figures"].clone()
            } else {
                Value::Null
            };
            let per = |k: &str| figures[k].as_f64().unwrap_or(f64::NAN);
            if live {
                println!(
                    "  {vm}: -> {node} downtime {downtime_ms:.1} ms (commander's bound {:.1}, paused {:.1}), total {:.0} ms, sent/resident {:.2} ({} MiB / {} MiB), rounds {}, {}",
                    per("downtime_ms"),
                    per("paused_ms"),
                    per("total_ms"),
                    per("bytes_sent") / rss[i].max(1) as f64,
                    per("bytes_sent") as u64 >> 20,
                    rss[i] >> 20,
                    figures["rounds"],
                    figures["mode"].as_str().unwrap_or("?"),
                );
            } else {
                println!(
                    "  {vm}: -> {node} downtime {downtime_ms:.1} ms (cold: the guest rebooted)"
                );
            }
            moved.push(Moved {
                vm: vm.clone(),
                live,
                downtime_ms,
                figures,
                resident: rss[i],
            });
            load(&bench, node, vm);
        }
    }

    let pick = |live: bool, vm: Option<&str>, f: &dyn Fn(&Moved) -> f64| -> Vec<f64> {
        moved
            .iter()
            .filter(|m| m.live == live && vm.is_none_or(|v| m.vm == v))
            .map(f)
            .filter(|v| v.is_finite())
            .collect()
    };
    let figure = |k: &'static str| move |m: &Moved| m.figures[k].as_f64().unwrap_or(f64::NAN);
    println!("medians:");
    for (label, vm) in [("every moved VM", None), ("db", Some("db"))] {
        let live = median(&mut pick(true, vm, &|m| m.downtime_ms));
        let cold = median(&mut pick(false, vm, &|m| m.downtime_ms));
        println!(
            "  {label}: live downtime {live:.1} ms (n={}), total {:.0} ms, commander's bound {:.1} ms, paused {:.1} ms, sent/resident {:.2}, rounds {:.0}",
            pick(true, vm, &|m| m.downtime_ms).len(),
            median(&mut pick(true, vm, &figure("total_ms"))),
            median(&mut pick(true, vm, &figure("downtime_ms"))),
            median(&mut pick(true, vm, &figure("paused_ms"))),
            median(&mut pick(true, vm, &|m| {
                m.figures["bytes_sent"].as_f64().unwrap_or(f64::NAN) / m.resident.max(1) as f64
            })),
            median(&mut pick(true, vm, &figure("rounds"))),
        );
        if cold_too {
            println!(
                "  {label}: cold downtime {cold:.1} ms (n={}); live / cold {:.3}",
                pick(false, vm, &|m| m.downtime_ms).len(),
                live / cold
            );
        }
    }
    println!(
        "  apply wall time: live {:.0} ms, cold {:.0} ms",
        median(&mut applies[1]),
        median(&mut applies[0])
    );
    drop(bench);
    // The node path of the same move (`cargo bench -p node-runtime --bench migrate`:
    // a 256 MiB guest, the same load and tick, the commander's record and epoch
    // compare-and-swap left out), run after the drains with the same binaries.
    let Some(node_path) = node_path_bench() else {
        println!(
            "baseline: no node path bench (cargo bench -p node-runtime --bench migrate --no-run, or CAIRN_BENCH_NODE_PATH)"
        );
        return;
    };
    let out = Command::new(&node_path)
        .arg("--bench")
        .env("CAIRN_BENCH_RUNS", runs.to_string())
        .env("CAIRN_BENCH_NODE_BINARY", bin.join("cairn-node"))
        .env("CAIRN_VMM_BINARY", &real_vmm)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../node-runtime"))
        .output()
        .expect("the node path bench runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        println!("node path: {line}");
    }
    let node_median = text
        .lines()
        .find(|l| l.starts_with("pre-copy, median"))
        .and_then(|l| l.split("downtime ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok());
    let db = median(&mut pick(true, Some("db"), &|m| m.downtime_ms));
    match node_median {
        Some(node) => println!(
            "baseline: db's live downtime through cairn apply {db:.1} ms / the node path's {node:.1} ms = {:.2}",
            db / node
        ),
        None => println!(
            "baseline: the node path bench gave no median ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
