//! Live migration between two `cairn-vmm` processes on loopback (127.0.0.22), for a
//! 256 MiB and a 1 GiB built-in guest, idle and dirtying at a set rate, each as pre-copy
//! and as the baseline stop-and-copy of the same VM in the same run (not a test:
//! nothing asserts a time). Per case, medians over the runs of:
//!
//! - downtime: the source's last heartbeat → the destination's first (`CLOCK_BOOTTIME`
//!   from both heartbeat logs; the guest heartbeats every 1 ms here), which includes the
//!   commander's commit round trip (this bench commits as soon as the source is ready);
//! - paused: the source's stop → the destination's READY (`paused_ms`);
//! - total: the `migrate` request → the destination running;
//! - bytes sent ÷ guest memory, and rounds.
//!
//! Before each run the guest touches all of its RAM (so bytes ÷ memory means
//! something), then dirties at the case's rate during the migration.
//!
//! Run: `cargo bench -p vmm --bench migration` (`CAIRN_BENCH_RUNS=N`, default 5;
//! `CAIRN_BENCH_MIGRATION_SIZES=256` to skip the 1 GiB cases).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::control::{ControlClient, MigrationStatus, Request, Response, VmStatus};
use vmm::kvm::HostKvm;

const LOOPBACK: &str = "127.0.0.22";

struct Process {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn spawn(memory_mib: u64, incoming: bool) -> (Self, Option<String>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let memory = format!("{memory_mib}MiB");
        let listen = format!("{LOOPBACK}:0");
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn-vmm"));
        command
            .arg("--vm-dir")
            .arg(dir.path())
            .args(["--memory", &memory, "--tick-ms", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if incoming {
            command.args(["--incoming", &listen]);
        }
        let mut child = command.spawn().expect("spawn cairn-vmm");
        let mut address = None;
        if incoming {
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("incoming event");
            let event: serde_json::Value = serde_json::from_str(&line).expect("event");
            address = event["listening"].as_str().map(str::to_string);
        }
        (Self { child, dir }, address)
    }

    fn call(&self, request: &Request) -> Response {
        let socket = self.dir.path().join("control.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ControlClient::connect(&socket, Duration::from_secs(60))
                .and_then(|mut client| client.call(request))
            {
                Ok(response) => return response,
                Err(error) if Instant::now() > deadline => panic!("control: {error}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn status(&self) -> VmStatus {
        self.call(&Request::Status).status.expect("status")
    }

    fn wait(&self, timeout: Duration, mut done: impl FnMut(&VmStatus) -> bool) -> VmStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "timed out: {status:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// `(first, last)` heartbeat `CLOCK_BOOTTIME` ns of this process's incarnation.
    fn heartbeat_window(&self) -> (u64, u64) {
        let entry = std::fs::read_dir(self.dir.path().join("heartbeats"))
            .expect("heartbeat logs")
            .next()
            .expect("one log")
            .expect("entry");
        window(&entry.path())
    }
}

fn window(path: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(path).expect("read");
    let field = |tag: &str| -> u64 {
        text.lines()
            .find(|line| line.starts_with(tag))
            .and_then(|line| line.split_whitespace().nth(2))
            .and_then(|value| value.parse().ok())
            .expect("boottime")
    };
    (field("first"), field("last"))
}

struct Sample {
    downtime_ms: f64,
    paused_ms: f64,
    total_ms: f64,
    bytes_per_memory: f64,
    bytes_per_resident: f64,
    rounds: f64,
    throttle: f64,
}

fn one_run(memory_mib: u64, dirty_rate: u64, stop_and_copy: bool) -> Sample {
    let memory = memory_mib << 20;
    let (mut source, _) = Process::spawn(memory_mib, false);
    source.wait(Duration::from_secs(10), |status| status.heartbeat_total > 0);
    // Touch all RAM once, then dirty at the case's rate.
    source.call(&Request::SetDirtyRate {
        pages_per_second: 400_000,
    });
    let pages = (memory - (2 << 20)) / 4096;
    source.wait(Duration::from_secs(120), |status| {
        status.pages_dirtied >= pages
    });
    source.call(&Request::SetDirtyRate {
        pages_per_second: dirty_rate,
    });
    // The guest may still be working through a large grant of the touch phase (no
    // heartbeats meanwhile): wait until it ticks steadily at the case's rate.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let before = source.status().heartbeat_total;
        std::thread::sleep(Duration::from_millis(100));
        let after = source.status();
        if after.heartbeat_total >= before + 20
            && after.last_heartbeat_age_ms.is_some_and(|age| age < 5.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never settled: {after:?}"
        );
    }
    let (destination, address) = Process::spawn(memory_mib, true);
    let started = Instant::now();
    let response = source.call(&Request::Migrate {
        to: address.expect("listening address"),
        max_downtime_ms: 50,
        stop_and_copy,
    });
    assert!(response.ok, "{response:?}");
    let status: MigrationStatus = loop {
        let status = source
            .call(&Request::MigrationStatus)
            .migration
            .expect("migration");
        match status.phase.as_str() {
            "ready-to-commit" => break status,
            "pre-copy" | "stop-and-copy" => std::thread::sleep(Duration::from_millis(1)),
            other => panic!("migration {other}: {status:?}"),
        }
    };
    let committed = source.call(&Request::MigrateCommit);
    assert!(committed.ok, "{committed:?}");
    destination.wait(Duration::from_secs(30), |status| status.state == "running");
    let total = started.elapsed();
    // The committed source exits 0; its heartbeat log is final then.
    let exit = source.child.wait().expect("source exit");
    assert_eq!(exit.code(), Some(0), "the source exits 0 after the commit");
    let (_, source_last) = source.heartbeat_window();
    let first_on_destination = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(entries) = std::fs::read_dir(destination.dir.path().join("heartbeats")) {
                let paths: Vec<_> = entries.flatten().map(|entry| entry.path()).collect();
                if let Some(path) = paths.first()
                    && std::fs::read_to_string(path).is_ok_and(|text| text.starts_with("first"))
                {
                    break window(path).0;
                }
            }
            assert!(Instant::now() < deadline, "no heartbeat on the destination");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    Sample {
        downtime_ms: (first_on_destination as f64 - source_last as f64) / 1e6,
        paused_ms: status.paused_ms,
        total_ms: total.as_secs_f64() * 1000.0,
        bytes_per_memory: status.bytes as f64 / memory as f64,
        bytes_per_resident: status.bytes as f64 / status.resident_bytes.max(1) as f64,
        rounds: f64::from(status.rounds),
        throttle: f64::from(status.throttle_percent),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Summary {
    downtime_ms: f64,
    paused_ms: f64,
    total_ms: f64,
    bytes_per_memory: f64,
    bytes_per_resident: f64,
    rounds: f64,
    throttle: f64,
}

fn summarize(samples: &[Sample]) -> Summary {
    let pick = |get: fn(&Sample) -> f64| median(&mut samples.iter().map(get).collect::<Vec<_>>());
    Summary {
        downtime_ms: pick(|s| s.downtime_ms),
        paused_ms: pick(|s| s.paused_ms),
        total_ms: pick(|s| s.total_ms),
        bytes_per_memory: pick(|s| s.bytes_per_memory),
        bytes_per_resident: pick(|s| s.bytes_per_resident),
        rounds: pick(|s| s.rounds),
        throttle: pick(|s| s.throttle),
    }
}

fn main() {
    if HostKvm::detect() == HostKvm::Missing {
        eprintln!("skipping the migration bench: no usable /dev/kvm");
        return;
    }
    let runs: usize = std::env::var("CAIRN_BENCH_RUNS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(5)
        .max(1);
    let sizes: Vec<u64> = std::env::var("CAIRN_BENCH_MIGRATION_SIZES")
        .ok()
        .map(|value| {
            value
                .split(',')
                .filter_map(|size| size.parse().ok())
                .collect()
        })
        .unwrap_or_else(|| vec![256, 1024]);
    // Idle, moderate writes (5,000 pages/s = 20 MB/s) and heavy ones (50,000 = 200 MB/s).
    let rates = [0u64, 5_000, 50_000];
    println!(
        "live migration, built-in guest, loopback, medians of {runs} runs (downtime = last heartbeat on the source -> first on the destination, commit round trip included)"
    );
    println!(
        "{:>8} {:>10} {:>14} {:>12} {:>10} {:>10} {:>12} {:>12} {:>7} {:>9}",
        "memory",
        "dirty/s",
        "mode",
        "downtime ms",
        "paused ms",
        "total ms",
        "bytes/mem",
        "bytes/res",
        "rounds",
        "throttle"
    );
    for &size in &sizes {
        for &rate in &rates {
            let mut results = Vec::new();
            for stop_and_copy in [false, true] {
                let samples: Vec<Sample> = (0..runs)
                    .map(|_| one_run(size, rate, stop_and_copy))
                    .collect();
                let summary = summarize(&samples);
                println!(
                    "{:>7}M {:>10} {:>14} {:>12.1} {:>10.1} {:>10.0} {:>12.2} {:>12.2} {:>7.0} {:>8.0}%",
                    size,
                    rate,
                    if stop_and_copy {
                        "stop-and-copy"
                    } else {
                        "pre-copy"
                    },
                    summary.downtime_ms,
                    summary.paused_ms,
                    summary.total_ms,
                    summary.bytes_per_memory,
                    summary.bytes_per_resident,
                    summary.rounds,
                    summary.throttle
                );
                results.push(summary);
            }
            println!(
                "{:>7}M {:>10} downtime pre-copy / stop-and-copy = {:.3}",
                size,
                rate,
                results[0].downtime_ms / results[1].downtime_ms
            );
        }
    }
}
