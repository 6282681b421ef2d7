//! Runtime preemption for CPU, end to end (issue 20): a node loaded until its CPU
//! pressure crosses its threshold stops its spot VM, and the controller starts it
//! again on another node with room, while the node's reserved VM keeps its dedicated
//! CPU and runs on. Only lab-1 preempts (a `cairn-node` wrapper adds
//! `--preempt-above-cpu-pressure` to it), since every dev node shares this host's
//! CPUs and its PSI. The load is busy loops pinned to CPU 0: some task then always
//! waits for a CPU, while CPU 1, which lab-1 dedicates to the reserved VM `db`, stays
//! free of them.
//!
//! PSI is the host's: on this shared build machine other builds alone keep CPU `some`
//! at 75-90% of each second for minutes, about what the load adds up to (95-100%), so
//! no threshold tells them apart and a node watching from the start preempts whenever
//! the machine is busy. So lab-1 starts without the flag, and once the cluster runs,
//! its agent is restarted with it (its VMMs run on and are adopted) at the moment the
//! load starts: the clock starts there. `failure-detect` (the lease T, and so the
//! fence of the HA VMs) is 30 s: an HA VM fences itself when the new agent's first
//! renewal comes later than T after the old agent's last. Under the load of a CI run on
//! 2 cores (12 busy loops and two writers syncing 1 GiB files beside this test, load
//! 27-31) `cairn dev up` took 7.0-13.7 s to bring lab-1 back, and with T = 10 s db and
//! web-2 fenced themselves (exit 6; the CI runs' failure of sessions 12 and 13) in 1 of
//! 8 runs, and in 2 of 5 with only the first of session 14's two node fixes (renewals
//! held to 1 s; a restarted agent's first round on the asked-for 3 s): once before the
//! new agent adopted db, so from the restart's length alone. That the new agent renews
//! db's fence is asserted.
//!
//! Session 14's CI run then failed it another way: the restarted agent killed batch
//! (spot) and web-2 (on-demand) instead of adopting them, as their VMMs did not answer
//! the identity handshake in 1 + 2 + 4 s beside the three busy loops, every thread of
//! them being in the class's cpu cgroup (spot's share is the least). Since then only a
//! VMM's vCPU threads are in its class's cpu cgroup and its control and I/O threads in
//! one of their own of ordinary weight, `svc-NAME` (cgroup v1; node-runtime ARCHITECTURE,
//! "SLA classes"), so the load still starts with the restart: adoption under CPU
//! pressure is part of what this test proves.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ha::{HaCluster, alive, signal, vmm_pid};
use crate::spot_preemption::{
    assert_others_stayed, assert_preemption_events, lab_1_node_wrapper, spot_on_lab_1, vm_row,
};

/// lab-1 preempts above this share of a 1 s window with a task waiting for a CPU:
/// three busy loops on one CPU cross it (this machine's other builds may too, which
/// is why lab-1 watches only from the moment the load starts). Not higher: the host's
/// PSI `some` is each CPU's share averaged with the CPUs' busy time as weights, and
/// CPU 1 is busy with db's guest alone, nothing waiting there, so the loops on CPU 0
/// alone give 50% and more. With 90% the test passed only while other processes
/// waited on CPU 1 too: session 15's fresh-clone CI run adopted every VM and then
/// never preempted batch in 30 s, where the same code passed 4 of 4 locally beside
/// other builds (pressure 91-100%).
const THRESHOLD_PERCENT: u32 = 40;

/// Busy loops pinned to one CPU, killed when dropped.
///
/// They run at the lowest priority (nice 19). PSI's `some` counts a task waiting for
/// a CPU whatever its priority, so three of them still keep CPU 0 under full pressure
/// and lab-1 still preempts; but lab-1's agent and the VMs it starts get CPU 0 when
/// they ask for it. At the default priority the agent had a quarter of CPU 0 at best,
/// less with the suite's other tests beside it, and in two CI runs it was starved:
/// new VMs sent no first heartbeat within 10 s, and web-2's fence deadline lapsed
/// 12.6 s unrenewed.
struct Burners(Vec<Child>);

impl Burners {
    fn on_cpu(cpu: u32, count: usize) -> Burners {
        Burners(
            (0..count)
                .map(|_| {
                    Command::new("taskset")
                        .args(["-c", &cpu.to_string(), "nice", "-n", "19"])
                        .args(["sh", "-c", "while :; do :; done"])
                        .stdout(Stdio::null())
                        .spawn()
                        .expect("taskset runs a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The quickstart with `batch` (spot, preferring lab-1) instead of `backup`, `db` on a
/// reserved profile with dedicated CPUs that prefers lab-1 too, and the nodes on this
/// test's loopback addresses (127.0.0.82-84), detecting failures after 30 s.
fn loaded_lab_1(dir: &Path) {
    spot_on_lab_1(dir);
    let workloads = dir.join("workloads.kdl");
    let text = std::fs::read_to_string(&workloads).expect("read workloads.kdl");
    let text = text.replacen("    sla \"reserved\"\n", "    sla \"pinned\"\n", 1);
    let text = format!(
        "{text}\nsla-profile \"pinned\" class=\"reserved\" priority=950 cpu-pinning=#true\n\naffinity \"db-on-lab-1\" kind=\"node\" hard=#false weight=100 {{\n    select app=\"db\"\n    nodes node=\"lab-1\"\n}}\n"
    );
    std::fs::write(&workloads, text).expect("write workloads.kdl");
    on_loopback(dir, 82, "30s");
}

/// The quickstart copy's three nodes on 127.0.0.FIRST and the two addresses after it
/// (this test's own; the copy has them on 127.0.0.1), with `failure-detect after`.
pub(crate) fn on_loopback(dir: &Path, first: u8, failure_detect: &str) {
    let cluster = dir.join("cluster.kdl");
    let mut text = std::fs::read_to_string(&cluster)
        .expect("read cluster.kdl")
        .replacen(
            "failure-detect after=\"3s\"",
            &format!("failure-detect after=\"{failure_detect}\""),
            1,
        );
    for (n, last) in (1..=3).zip(first..) {
        let at = text
            .find(&format!("node \"lab-{n}\""))
            .expect("the quickstart's nodes");
        let address = at + text[at..].find("address=\"127.0.0.1:").expect("an address");
        let prefix = "address=\"127.0.0.1:";
        text.replace_range(
            address..address + prefix.len(),
            &format!("address=\"127.0.0.{last}:"),
        );
    }
    std::fs::write(&cluster, text).expect("write cluster.kdl");
}

/// The CPUs each thread of process `pid` may run on (`Cpus_allowed_list`).
fn thread_affinities(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .flatten()
        .filter_map(|task| {
            std::fs::read_to_string(task.path().join("status"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|cpus| cpus.trim().to_owned())
        })
        .collect()
}

/// One request to a VM's control socket (JSON lines), its answer.
pub(crate) fn control(vm_dir: &Path, request: &str) -> Value {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut stream = match std::os::unix::net::UnixStream::connect(vm_dir.join("control.sock")) {
        Ok(stream) => stream,
        Err(e) => panic!(
            "the VMM's control socket in {}: {e}\n--- the VM's vmm.log (tail):\n{}\n--- its node's node.log (tail):\n{}",
            vm_dir.display(),
            log_tail(&vm_dir.join("vmm.log"), 40),
            log_tail(&vm_dir.join("../../node.log"), 120),
        ),
    };
    // The VMs here burn every CPU on purpose: on a loaded 2-core CI machine a
    // VMM's control thread waited over 5 s for its answer (CI at e7ccb58).
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(format!("{request}\n").as_bytes())
        .expect("send");
    let mut line = String::new();
    if let Err(e) = BufReader::new(stream).read_line(&mut line) {
        panic!(
            "no answer from the VMM's control socket in {} within 20 s: {e}\n--- the VM's vmm.log (tail):\n{}",
            vm_dir.display(),
            log_tail(&vm_dir.join("vmm.log"), 40),
        );
    }
    serde_json::from_str(&line).unwrap_or(Value::Null)
}

/// The last `lines` lines of a log file (or why it could not be read): what a failure
/// shows, since the test's cluster directory is removed when it ends.
fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// The VMM's fence deadline (`CLOCK_BOOTTIME` ns, 0 when disarmed) and the
/// milliseconds left before it, from its status.
fn fence(vm_dir: &Path) -> (u64, f64) {
    let status = control(vm_dir, r#"{"op":"status"}"#);
    (
        status["status"]["fence_deadline_boottime_ns"]
            .as_u64()
            .unwrap_or(0),
        status["status"]["fence_remaining_ms"]
            .as_f64()
            .unwrap_or(0.0),
    )
}

/// The guest's own loop counter over `window`: loops per second.
fn loop_rate(vm_dir: &Path, window: Duration) -> f64 {
    let count = || {
        control(vm_dir, r#"{"op":"status"}"#)["status"]["heartbeat_total"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = count();
    let started = Instant::now();
    std::thread::sleep(window);
    count().saturating_sub(before) as f64 / started.elapsed().as_secs_f64()
}

fn psi_cpu_some_total() -> Option<u64> {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()?
        .lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// The share (percent) of `window` in which some task waited for a CPU (PSI).
fn cpu_pressure_over(window: Duration) -> f64 {
    let before = psi_cpu_some_total().unwrap_or(0);
    let started = Instant::now();
    std::thread::sleep(window);
    let stalled = psi_cpu_some_total().unwrap_or(0).saturating_sub(before);
    stalled as f64 / started.elapsed().as_micros() as f64 * 100.0
}

/// Loads lab-1 (three busy loops on CPU 0) and restarts its agent with
/// `--preempt-above-cpu-pressure` (through `flags`, the wrapper's file) at that moment;
/// `outliving` VMMs (besides batch's `batch_pid`) must run on through the restart.
/// Returns the load, when it started, when the agent watched again and when batch's
/// VMM was gone (both since the load).
fn load_lab_1_until_stopped(
    ha: &HaCluster,
    flags: &Path,
    batch_pid: u32,
    outliving: &[u32],
) -> (Burners, Instant, Duration, Duration) {
    std::fs::write(
        flags,
        format!("--preempt-above-cpu-pressure {THRESHOLD_PERCENT}"),
    )
    .expect("flags file");
    let agent = ha.node_pid("lab-1");
    let burners = Burners::on_cpu(0, 3);
    let loaded = Instant::now();
    signal(agent, "-TERM");
    while alive(agent) {
        assert!(
            loaded.elapsed() < Duration::from_secs(10),
            "lab-1's agent exits on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        alive(batch_pid) && outliving.iter().all(|pid| alive(*pid)),
        "the VMMs outlive their agent"
    );
    let up = ha.dev_up();
    assert_eq!(up.code, 0, "{up:?}");
    let watching = loaded.elapsed();
    let log = || {
        std::fs::read_to_string(ha.cluster.path().join(".cairn/dev/lab-1/node.log"))
            .unwrap_or_default()
    };
    assert!(
        log().contains(&format!("more than {THRESHOLD_PERCENT}% of a 1 s window")),
        "lab-1 was restarted to preempt for CPU: {}",
        log()
    );
    while alive(batch_pid) {
        assert!(
            loaded.elapsed() < Duration::from_secs(30),
            "batch still runs on lab-1 30 s into the load; lab-1's log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (burners, loaded, watching, loaded.elapsed())
}

#[test]
fn a_spot_vm_preempted_for_cpu_runs_again_elsewhere_and_the_reserved_vm_keeps_its_cpu() {
    if psi_cpu_some_total().is_none() {
        eprintln!("skipped: no /proc/pressure/cpu (PSI), which the test's figures read");
        return;
    }
    if !Path::new("/sys/fs/cgroup/cpuset").is_dir()
        || std::thread::available_parallelism().map_or(1, usize::from) < 2
    {
        eprintln!(
            "skipped: the reserved VM's dedicated CPU needs the cgroup v1 cpuset hierarchy and 2 CPUs"
        );
        return;
    }
    let scratch = std::env::temp_dir().join(format!("d-cpu-preempt-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    // lab-1's extra flags are read from a file at each start: none at first.
    let flags = scratch.join("lab-1-flags");
    std::fs::write(&flags, "").expect("flags file");
    let wrapper = lab_1_node_wrapper(&scratch, &format!("$(cat {})", flags.display()));
    let Some(ha) = HaCluster::up_with_binaries("d-cpu-preempt", loaded_lab_1, None, Some(wrapper))
    else {
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    };
    assert_eq!(ha.node_of("batch"), "lab-1", "{:?}", ha.placement);
    assert_eq!(ha.node_of("db"), "lab-1", "{:?}", ha.placement);
    let batch_dir = ha.vm_dir("batch");
    let db_dir = ha.vm_dir("db");
    let batch_pid = vmm_pid(&batch_dir).expect("batch's VMM runs");
    let db_pid = vmm_pid(&db_dir).expect("db's VMM runs");
    // db's VMM, every thread of it, runs on its dedicated CPU only.
    let pinned = thread_affinities(db_pid);
    assert!(
        !pinned.is_empty()
            && pinned
                .iter()
                .all(|cpus| cpus == &pinned[0] && !cpus.contains('0')),
        "db's threads keep to its dedicated CPU: {pinned:?}"
    );
    // db's guest burns: its loop counter is its share of the CPU.
    assert_eq!(
        control(&db_dir, r#"{"op":"set-burn","on":true}"#)["ok"],
        true,
        "set-burn on db"
    );
    let alone = loop_rate(&db_dir, Duration::from_secs(1));
    let ambient = cpu_pressure_over(Duration::from_secs(1));

    // The load starts, and lab-1's agent is restarted watching CPU pressure. db's
    // fence deadline, pushed by the old agent, must be renewed by the new one before
    // it lapses (the new agent renews before it adopts; its calls wait T/3 of the
    // granted lease).
    let (fence_before, fence_left) = fence(&db_dir);
    let (burners, loaded, watching, stopped) =
        load_lab_1_until_stopped(&ha, &flags, batch_pid, &[db_pid]);
    let renewed = loop {
        let (deadline, _) = fence(&db_dir);
        if deadline > fence_before {
            break loaded.elapsed();
        }
        assert!(
            loaded.elapsed() < Duration::from_secs(30),
            "db's fence deadline was not renewed within 30 s of lab-1's agent restart ({fence_left:.0} ms left before it)"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let under_load = loop_rate(&db_dir, Duration::from_secs(1));
    let pressure = cpu_pressure_over(Duration::from_millis(500));
    let moved_to = ha.wait(
        "batch running on another node",
        Duration::from_secs(60),
        |s| {
            let row = vm_row(s, "batch")?;
            (row["state"] == "running" && row["node"] != "lab-1")
                .then(|| row["node"].as_str().unwrap_or_default().to_owned())
        },
    );
    let running_elsewhere = loaded.elapsed();
    // Still loaded, the cluster settled: db's guest against alone again after.
    let loaded_settled = loop_rate(&db_dir, Duration::from_secs(1));
    drop(burners);
    let alone_after = loop_rate(&db_dir, Duration::from_secs(1));
    // lab-1's on-demand VM web-2 never runs on db's CPU.
    let web_2 = vmm_pid(&ha.vm_dir("web-2")).expect("web-2's VMM runs");
    let dedicated = pinned[0].clone();
    let shared = thread_affinities(web_2);
    assert!(
        !shared.is_empty() && shared.iter().all(|cpus| !cpus.contains(dedicated.as_str())),
        "web-2 keeps off db's CPU {dedicated}: {shared:?}"
    );

    // The reserved VM ran on, in its own VMM, on its dedicated CPU.
    assert!(alive(db_pid), "db's VMM still runs");
    let after = thread_affinities(db_pid);
    assert!(
        !after.is_empty() && after.iter().all(|cpus| *cpus == pinned[0]),
        "db keeps its CPU {}: {after:?}",
        pinned[0]
    );
    let status = ha.status();
    let db = vm_row(&status, "db").expect("db in status");
    assert_eq!(
        (&db["node"], &db["state"]),
        (&Value::from("lab-1"), &Value::from("running"))
    );
    // Only batch moved; lab-1's on-demand VMs were not stopped.
    for (vm, node) in &ha.placement {
        if vm != "batch" {
            let row = vm_row(&status, vm).expect("in status");
            assert_eq!(
                (&row["node"], &row["state"]),
                (&Value::from(node.as_str()), &Value::from("running")),
                "{vm} stayed and runs"
            );
        }
    }
    assert_preemption_events(
        &ha,
        "vm batch was stopped by lab-1 (preempted: node lab-1 runs short of CPU",
        &moved_to,
    );
    let alone_mean = ((alone + alone_after) / 2.0).max(1.0);
    eprintln!(
        "cpu preemption re-placed: 3 busy loops on CPU 0 from t=0 (host CPU pressure {ambient:.0}% before, {pressure:.0}% under load; threshold {THRESHOLD_PERCENT}%); lab-1's agent restarted watching at {:.0} ms; db's fence ({fence_left:.0} ms left at the restart) renewed by the new agent at {:.0} ms; batch's VMM gone on lab-1 at {:.0} ms; batch running on {moved_to} at {:.0} ms; db's guest on its dedicated CPU {dedicated}, loops/s: {alone:.0} alone, {under_load:.0} during the re-placement, {loaded_settled:.0} loaded after it, {alone_after:.0} alone again (ratios to the mean alone {:.2}, {:.2})",
        watching.as_secs_f64() * 1000.0,
        renewed.as_secs_f64() * 1000.0,
        stopped.as_secs_f64() * 1000.0,
        running_elsewhere.as_secs_f64() * 1000.0,
        under_load / alone_mean,
        loaded_settled / alone_mean,
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The quickstart with `batch` bound to lab-1 (a hard affinity): no other node may
/// take it.
fn bound_to_lab_1(dir: &Path) {
    spot_on_lab_1(dir);
    let workloads = dir.join("workloads.kdl");
    let text = std::fs::read_to_string(&workloads).expect("read workloads.kdl");
    let text = text.replacen(
        "affinity \"batch-on-lab-1\" kind=\"node\" hard=#false",
        "affinity \"batch-on-lab-1\" kind=\"node\" hard=#true",
        1,
    );
    std::fs::write(&workloads, text).expect("write workloads.kdl");
    // 30 s like the test above: this one restarts lab-1's agent the same way, and a
    // restart under CI load can outlast a 10 s lease.
    on_loopback(dir, 87, "30s");
}

#[test]
fn a_spot_vm_preempted_for_cpu_with_no_room_elsewhere_waits_stopped_and_says_why() {
    if psi_cpu_some_total().is_none() {
        eprintln!("skipped: no /proc/pressure/cpu (PSI), which lab-1 watches");
        return;
    }
    let scratch = std::env::temp_dir().join(format!("d-cpu-pending-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let flags = scratch.join("lab-1-flags");
    std::fs::write(&flags, "").expect("flags file");
    let wrapper = lab_1_node_wrapper(&scratch, &format!("$(cat {})", flags.display()));
    let Some(ha) =
        HaCluster::up_with_binaries("d-cpu-pending", bound_to_lab_1, None, Some(wrapper))
    else {
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    };
    assert_eq!(ha.node_of("batch"), "lab-1", "{:?}", ha.placement);
    let batch_pid = vmm_pid(&ha.vm_dir("batch")).expect("batch's VMM runs");
    let (burners, loaded, watching, stopped) =
        load_lab_1_until_stopped(&ha, &flags, batch_pid, &[]);
    let why = ha.wait("batch pending, with why", Duration::from_secs(60), |_| {
        let events: Value =
            serde_json::from_str(&crate::ha_timers::get(&ha, "/api/v1/events?kind=preempted"))
                .unwrap_or(Value::Null);
        events.as_array()?.iter().find_map(|e| {
            (e["result"] == "pending").then(|| e["reason"].as_str().unwrap_or_default().to_owned())
        })
    });
    let pending = loaded.elapsed();
    drop(burners);
    assert!(
        why.starts_with("vm batch is pending: preempted on lab-1 (short of memory or CPU), and no other node of its site takes it (affinity:batch-on-lab-1: ")
            && why.contains("it is tried on lab-1 again after 120 s"),
        "{why}"
    );
    // It waits stopped on lab-1, the only node it may run on, and nothing else moved.
    let status = ha.status();
    let row = vm_row(&status, "batch").expect("batch in status");
    assert_eq!(row["node"], "lab-1", "{row:#}");
    assert_ne!(row["state"], "running", "{row:#}");
    assert_others_stayed(&ha, &status);
    eprintln!(
        "cpu preemption, no room elsewhere: lab-1 watching at {:.0} ms, batch's VMM gone at {:.0} ms, pending at {:.0} ms: {why}",
        watching.as_secs_f64() * 1000.0,
        stopped.as_secs_f64() * 1000.0,
        pending.as_secs_f64() * 1000.0
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
