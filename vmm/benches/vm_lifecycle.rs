//! Benchmarks of the VMM against DESIGN.md's budgets, each printed as a median next to a
//! baseline measured in the same run (not a test: nothing here asserts a time).
//!
//! - built-in guest: create VM -> first heartbeat (budget < 20 ms), in-process and as a
//!   spawned `cairn-vmm` process, against bare `KVM_CREATE_VM` + close;
//! - VMs created, heartbeating and destroyed per second (sequential), in one process and
//!   as `cairn-vmm` processes;
//! - VMM memory overhead per VM (process RSS minus guest-resident memory; goal <= 5 MiB);
//! - Linux create -> init: only where KVM is hardware-backed.
//!
//! Run: `cargo bench -p vmm --bench vm_lifecycle` (`CAIRN_BENCH_RUNS=N` to change runs).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vmm::control::ControlClient;
use vmm::kvm::HostKvm;
use vmm::{Vm, VmConfig};

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(samples: &mut [Duration], percent: usize) -> Duration {
    samples.sort();
    samples[(samples.len() * percent / 100).min(samples.len() - 1)]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Bare KVM: open /dev/kvm, KVM_CREATE_VM, close both.
fn bare_create_vm() -> Duration {
    let start = Instant::now();
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    drop(vm);
    drop(kvm);
    start.elapsed()
}

/// In-process: Vm::create -> start -> first heartbeat; then forced power-off and join.
/// Returns (create -> first heartbeat, whole cycle).
fn builtin_in_process(vm_dir: &std::path::Path) -> (Duration, Duration) {
    let start = Instant::now();
    let vm = Vm::create(VmConfig::builtin("bench", 1, 64 << 20, vm_dir)).expect("create VM");
    let running = vm.start().expect("start VM");
    let handle = running.handle();
    let first = handle
        .wait_first_heartbeat(Duration::from_secs(10))
        .expect("first heartbeat");
    handle.power_off(true).expect("power off");
    let outcome = running.wait();
    assert_eq!(outcome.exit_code(), 0, "{outcome:?}");
    (first, start.elapsed())
}

/// As a process: spawn cairn-vmm, read stdout until the first-heartbeat event, SIGKILL.
fn builtin_process(dir: &std::path::Path) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-vmm"))
        .args(["--memory", "64MiB", "--vm-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cairn-vmm");
    let stdout = child.stdout.take().expect("stdout");
    let mut elapsed = None;
    for line in BufReader::new(stdout).lines() {
        if line.expect("read stdout").contains("first-heartbeat") {
            elapsed = Some(start.elapsed());
            break;
        }
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
    elapsed.expect("first-heartbeat event")
}

fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn memory_overhead(count: usize) -> Vec<(u64, u64)> {
    let dirs: Vec<tempfile::TempDir> = (0..count)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let mut children: Vec<_> = dirs
        .iter()
        .map(|dir| {
            Command::new(env!("CARGO_BIN_EXE_cairn-vmm"))
                .args(["--memory", "256MiB", "--vm-dir"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn cairn-vmm")
        })
        .collect();
    let mut results = Vec::new();
    for (child, dir) in children.iter().zip(&dirs) {
        let socket = dir.path().join("control.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut client = loop {
            if let Ok(client) = ControlClient::connect(&socket, Duration::from_secs(5)) {
                break client;
            }
            assert!(Instant::now() < deadline, "control socket never appeared");
            std::thread::sleep(Duration::from_millis(5));
        };
        // Let the guest settle in its main loop for a few ticks.
        while client.status().expect("status").heartbeat_total < 20 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = client.status().expect("status");
        results.push((rss_of(child.id()), status.guest_resident_bytes));
    }
    for child in &mut children {
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
    results
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent; keep that quick.
    let benchmarking = std::env::args().any(|argument| argument == "--bench");
    let host = HostKvm::detect();
    if host == HostKvm::Missing {
        eprintln!("vm_lifecycle: no usable /dev/kvm on this host; nothing to measure");
        return;
    }
    let runs: usize = std::env::var("CAIRN_BENCH_RUNS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if benchmarking { 200 } else { 3 });
    println!("host KVM: {host:?}; {runs} runs per measurement");

    let mut bare: Vec<Duration> = (0..runs).map(|_| bare_create_vm()).collect();

    let dir = tempfile::tempdir().expect("temp dir");
    let mut first_heartbeat = Vec::with_capacity(runs);
    let mut cycle = Vec::with_capacity(runs);
    let sequential_start = Instant::now();
    for _ in 0..runs {
        let (first, whole) = builtin_in_process(dir.path());
        first_heartbeat.push(first);
        cycle.push(whole);
    }
    let per_second = runs as f64 / sequential_start.elapsed().as_secs_f64();

    let process_runs = (runs / 4).max(3);
    let process_start = Instant::now();
    let mut process: Vec<Duration> = (0..process_runs)
        .map(|_| {
            let dir = tempfile::tempdir().expect("temp dir");
            builtin_process(dir.path())
        })
        .collect();

    let process_per_second = process_runs as f64 / process_start.elapsed().as_secs_f64();
    let bare_median = median(&mut bare);
    let first_median = median(&mut first_heartbeat);
    let process_median = median(&mut process);
    println!();
    println!("{:<58} {:>10} {:>10}", "measurement", "median ms", "p90 ms");
    println!(
        "{:<58} {:>10.3} {:>10.3}",
        "baseline: open /dev/kvm + KVM_CREATE_VM + close",
        ms(bare_median),
        ms(percentile(&mut bare, 90))
    );
    println!(
        "{:<58} {:>10.3} {:>10.3}",
        "built-in guest, in-process: create VM -> first heartbeat",
        ms(first_median),
        ms(percentile(&mut first_heartbeat, 90))
    );
    println!(
        "{:<58} {:>10.3} {:>10.3}",
        format!("built-in guest, cairn-vmm process x{process_runs}: -> first heartbeat"),
        ms(process_median),
        ms(percentile(&mut process, 90))
    );
    println!(
        "{:<58} {:>10.3} {:>10.3}",
        "built-in guest: create -> heartbeat -> power-off -> joined",
        ms(median(&mut cycle)),
        ms(percentile(&mut cycle, 90))
    );
    println!();
    println!(
        "ratio create->first heartbeat / bare KVM_CREATE_VM: {:.1}x (in-process), {:.1}x (process)",
        first_median.as_secs_f64() / bare_median.as_secs_f64(),
        process_median.as_secs_f64() / bare_median.as_secs_f64()
    );
    println!(
        "budget create -> first heartbeat < 20 ms: in-process median {:.3} ms, process median {:.3} ms",
        ms(first_median),
        ms(process_median)
    );
    println!(
        "VMs created, heartbeating and destroyed per second (sequential, in-process): {per_second:.0}"
    );
    println!(
        "VM processes spawned, heartbeating, SIGKILLed and reaped per second (sequential): {process_per_second:.0}"
    );

    let overhead = memory_overhead(if benchmarking { 5 } else { 1 });
    let mut per_vm: Vec<u64> = overhead
        .iter()
        .map(|(rss, guest)| rss.saturating_sub(*guest))
        .collect();
    per_vm.sort();
    for (index, (rss, guest)) in overhead.iter().enumerate() {
        println!(
            "VMM process {index}: RSS {:.2} MiB, guest-resident {:.2} MiB, overhead {:.2} MiB",
            *rss as f64 / 1048576.0,
            *guest as f64 / 1048576.0,
            rss.saturating_sub(*guest) as f64 / 1048576.0
        );
    }
    println!(
        "VMM memory overhead per VM (RSS - guest-resident), median: {:.2} MiB (goal <= 5 MiB)",
        per_vm[per_vm.len() / 2] as f64 / 1048576.0
    );
    match host.linux_unbootable_reason() {
        Some(reason) => println!("Linux create -> init: not measurable here: {reason}"),
        None => println!(
            "Linux create -> init: hardware KVM present; run the linux_boot integration test with CAIRN_TEST_KERNEL"
        ),
    }
}
