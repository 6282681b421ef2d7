//! Fault tolerance (issue 22) between two real `cairn-vmm` processes, each figure with
//! its baseline from the same run (not a test: nothing asserts a time). Medians over
//! `CAIRN_BENCH_RUNS` runs (default 3):
//!
//! 1. guest throughput: the built-in guest in burn mode counts its main-loop passes
//!    (its heartbeat counter) over 2 s, protected with 25 and 50 ms epochs against the
//!    same VM unprotected running beside it in the same seconds (64 MiB, no NIC);
//! 2. checkpoint bytes, pages, pause and acknowledgement per epoch (30 ms) with the
//!    guest idle and dirtying 5,000 pages/s (20 MB/s);
//! 3. the added latency of network output: `ping` RTT of the guest (tick 1 ms) from the
//!    host side of its bridge, unprotected vs protected (30 ms epochs), and the VMM's
//!    own hold time of frames (needs root for the network namespace; skipped otherwise);
//! 4. promotion: `kill -9` of the primary → `ft-promote` answered → the promoted
//!    guest's first new heartbeat, against a cold start of the same VM (spawn → first
//!    heartbeat).
//!
//! Run: `cargo bench -p vmm --bench ft` (release).

#[allow(dead_code)]
#[path = "../tests/it/support.rs"]
mod support;

#[allow(dead_code, unused_imports)]
#[path = "../tests/it/ft.rs"]
mod ft;

use std::time::{Duration, Instant};

use vmm::control::Request;
use vmm::kvm::HostKvm;

use crate::support::{VmProcess, wait_until};

fn runs() -> usize {
    std::env::var("CAIRN_BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(3)
        .max(1)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A 64 MiB built-in guest without NIC, tick 1 ms, and (when `epoch_ms`) its secondary,
/// protected with that epoch.
fn spawn(epoch_ms: Option<u64>) -> (VmProcess, Option<VmProcess>) {
    let base = ["--memory", "64MiB", "--tick-ms", "1"];
    let mut primary = VmProcess::spawn(&base);
    primary.wait_status(Duration::from_secs(10), |status| status.heartbeat_total > 3);
    let Some(epoch_ms) = epoch_ms else {
        return (primary, None);
    };
    let listen = format!("{}:0", ft::LOOPBACK);
    let mut args = base.to_vec();
    args.extend(["--ft-secondary", &listen]);
    let mut secondary = VmProcess::spawn(&args);
    let address = ft::listening_address(&mut secondary);
    let response = ft::call(
        &mut primary,
        &Request::FtStart {
            to: address,
            epoch_ms,
            sync_disks: false,
        },
    );
    assert!(response.ok, "{response:?}");
    ft::wait_ft(&mut primary, Duration::from_secs(30), |status| {
        status.phase == "protected" && status.last_acked >= 3
    });
    (primary, Some(secondary))
}

/// The same VM unprotected and protected, side by side in the same 2 s (so both see
/// the same load from the rest of the machine), both in burn mode.
fn throughput() {
    println!(
        "1. guest throughput (burn mode: main-loop passes per second over 2 s, an unprotected and a protected VM side by side)"
    );
    for epoch_ms in [25, 50] {
        let (mut ratios, mut unprotected, mut protected, mut paused) =
            (vec![], vec![], vec![], vec![]);
        for _ in 0..runs() {
            let (mut plain, _) = spawn(None);
            let (mut primary, _secondary) = spawn(Some(epoch_ms));
            for vm in [&mut plain, &mut primary] {
                assert!(ft::call(vm, &Request::SetBurn { on: true }).ok);
            }
            std::thread::sleep(Duration::from_millis(300));
            let (plain_start, primary_start) = (
                plain.status().heartbeat_total,
                primary.status().heartbeat_total,
            );
            let at = Instant::now();
            std::thread::sleep(Duration::from_secs(2));
            let (plain_end, primary_end) = (
                plain.status().heartbeat_total,
                primary.status().heartbeat_total,
            );
            let seconds = at.elapsed().as_secs_f64();
            let plain_rate = (plain_end - plain_start) as f64 / seconds;
            let primary_rate = (primary_end - primary_start) as f64 / seconds;
            unprotected.push(plain_rate);
            protected.push(primary_rate);
            ratios.push(primary_rate / plain_rate);
            paused.push(ft::ft(&mut primary).median_paused_ms);
        }
        println!(
            "   epoch {epoch_ms} ms: unprotected {:.0} passes/s, protected {:.0} passes/s, ratio {:.3} (median of the runs' ratios); pause per checkpoint {:.2} ms",
            median(unprotected),
            median(protected),
            median(ratios),
            median(paused)
        );
    }
}

fn bytes_per_epoch() {
    println!("2. checkpoint per epoch (30 ms epochs, 64 MiB)");
    for rate in [0u64, 5_000] {
        let (mut bytes, mut pages, mut paused, mut acked) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs() {
            let (mut primary, _secondary) = spawn(Some(30));
            let response = ft::call(
                &mut primary,
                &Request::SetDirtyRate {
                    pages_per_second: rate,
                },
            );
            assert!(response.ok, "{response:?}");
            // Past the samples of the idle start (the status keeps the last 512).
            std::thread::sleep(Duration::from_secs(3));
            let status = ft::ft(&mut primary);
            bytes.push(status.median_epoch_bytes);
            pages.push(status.median_epoch_pages);
            paused.push(status.median_paused_ms);
            acked.push(status.median_ack_ms);
        }
        println!(
            "   dirtying {rate:>5} pages/s: {:>9.0} bytes, {:>5.0} pages per checkpoint; paused {:.2} ms, pause -> ack {:.2} ms",
            median(bytes),
            median(pages),
            median(paused),
            median(acked)
        );
    }
}

/// Median ping RTT of the guest in ms, from the bridge's side.
fn ping_median(namespace: &support::TestNamespace) -> f64 {
    let output = namespace.run(&format!("ping -c 40 -i 0.02 -W 1 {}", ft::GUEST_IP));
    let text = String::from_utf8_lossy(&output.stdout);
    let times: Vec<f64> = text
        .lines()
        .filter_map(|line| line.split("time=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|value| value.parse().ok())
        .collect();
    assert!(times.len() >= 30, "ping answered {}: {text}", times.len());
    median(times)
}

fn output_latency() {
    println!("3. added latency of network output (ping RTT of the guest, tick 1 ms)");
    let Some(namespace) = ft::pair_namespace("the output-latency bench") else {
        return;
    };
    let (mut unprotected, mut protected, mut held) = (vec![], vec![], vec![]);
    for _ in 0..runs() {
        let (mut primary, _) = ft::spawn_side(&namespace, "mtap0", &["--tick-ms", "1"]);
        let listen = format!("{}:0", ft::LOOPBACK);
        let (mut secondary, _) = ft::spawn_side(
            &namespace,
            "mtap1",
            &["--tick-ms", "1", "--ft-secondary", &listen],
        );
        let address = ft::listening_address(&mut secondary);
        primary.wait_status(Duration::from_secs(10), |status| {
            status.nics.first().is_some_and(|nic| nic.driver_ok)
        });
        unprotected.push(ping_median(&namespace));
        let response = ft::call(
            &mut primary,
            &Request::FtStart {
                to: address,
                epoch_ms: 30,
                sync_disks: false,
            },
        );
        assert!(response.ok, "{response:?}");
        ft::wait_ft(&mut primary, Duration::from_secs(30), |status| {
            status.phase == "protected" && status.last_acked >= 3
        });
        protected.push(ping_median(&namespace));
        held.push(ft::ft(&mut primary).median_output_delay_ms);
    }
    let (unprotected, protected) = (median(unprotected), median(protected));
    println!(
        "   unprotected {unprotected:.2} ms, ft 30 ms {protected:.2} ms: added {:.2} ms (ratio {:.1}); the VMM held each frame {:.2} ms (median)",
        protected - unprotected,
        protected / unprotected,
        median(held)
    );
}

fn promotion() {
    println!("4. promotion after kill -9 of the primary (64 MiB, tick 1 ms)");
    let (mut decided, mut answered, mut serving, mut cold) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs() {
        let (mut primary, secondary) = spawn(Some(30));
        let mut secondary = secondary.expect("secondary");
        std::thread::sleep(Duration::from_millis(500));
        let killed = Instant::now();
        primary.child.kill().expect("kill -9");
        primary.child.wait().expect("reap");
        let response = ft::call(&mut secondary, &Request::FtPromote);
        answered.push(killed.elapsed().as_secs_f64() * 1000.0);
        let status = response.ft.expect("promoted");
        assert_eq!(status.phase, "promoted", "{status:#?}");
        decided.push(status.promote_ms);
        let resumed_at = secondary.status().heartbeat_total;
        let mut client = secondary.client();
        assert!(wait_until(Duration::from_secs(10), || {
            client.status().expect("status").heartbeat_total > resumed_at
        }));
        serving.push(killed.elapsed().as_secs_f64() * 1000.0);

        let spawned = Instant::now();
        let mut fresh = VmProcess::spawn(&["--memory", "64MiB", "--tick-ms", "1"]);
        let mut client = fresh.client();
        assert!(wait_until(Duration::from_secs(10), || {
            client.status().expect("status").heartbeat_total > 0
        }));
        cold.push(spawned.elapsed().as_secs_f64() * 1000.0);
    }
    let serving = median(serving);
    let cold = median(cold);
    println!(
        "   ft-promote (decision -> vCPUs run) {:.2} ms; kill -> promote answered {:.2} ms; kill -> new heartbeat {serving:.2} ms; baseline cold start of the same VM (spawn -> first heartbeat) {cold:.2} ms (ratio {:.2})",
        median(decided),
        median(answered),
        serving / cold
    );
}

fn main() {
    if matches!(HostKvm::detect(), HostKvm::Missing) {
        println!("skipping the fault-tolerance bench: no usable /dev/kvm");
        return;
    }
    println!("fault tolerance, {} runs per case, medians", runs());
    throughput();
    bytes_per_epoch();
    output_latency();
    promotion();
}
