//! SLA classes on the node (issue 20), medians with a baseline from the same command.
//!
//! `cargo bench -p node-runtime --bench sla` (release): the measuring of `it sla::`
//! (`tests/it/sla.rs`: `contention_figures`, `ksm_figures`, `memory_pressure_run`),
//! included here with its harness; real `cairn-node` and `cairn-vmm` processes on KVM,
//! real cgroups, nodes on 127.0.0.81-83.
//! - (a) CPU: a reserved guest burning on one CPU beside a burning spot guest, as a
//!   ratio to its rate alone (each contended 1 s window between two alone ones),
//!   `CAIRN_SLA_RUNS` (default 7, at least 5) ratios; baseline in the same node: the
//!   spot VM switched to reserved, as many ratios (the measure sees contention).
//! - (b) KSM: `CAIRN_SLA_GUESTS` (default 20) identical guests, pages merged as the
//!   node reports them against `/sys/kernel/mm/ksm` (pages_sharing, pages_shared) and
//!   `/proc/PID/ksm_merging_pages`, `CAIRN_SLA_RUNS` reads; baseline: the host's
//!   counters before KSM was turned on.
//! - (c) memory pressure → the first spot VM seen stopped, `CAIRN_SLA_RUNS` runs each
//!   on a new node, each run printed as it ends (its figure or why it has none);
//!   baseline on the same nodes: a spot VM stopped by `StopVm` with grace 0 (the stop
//!   preemption makes), from the call to Observe saying stopped, so the ratio is what
//!   noticing the pressure adds; the node's poll period (100 ms, `preemption_loop`)
//!   beside it.
//!
//! Each part skips with a printed reason without KVM, cgroups, KSM or /dev/shm. Every
//! node and VMM is killed on every way out: `TestNode`'s drop on a return or a panic,
//! and on SIGINT, SIGTERM or SIGHUP the running part is dropped (so are its guards)
//! before the bench exits 130.

#![allow(dead_code, unused_imports)]

#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/sla.rs"]
mod sla;
#[path = "../tests/it/vms.rs"]
mod vms;

use std::time::Duration;

/// `preemption_loop`'s poll period in node-runtime/src/vms/sla.rs.
const NODE_POLL: Duration = Duration::from_millis(100);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // Every node and VMM a part starts is killed by its guard (`TestNode`'s drop) on
    // every way out of the part, a panic included. A signal would end the process
    // without running them, so SIGINT, SIGTERM and SIGHUP drop the running part
    // instead (its guards run), then the bench exits 130.
    let signal = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        tokio::select! {
            () = figures() => None,
            _ = int.recv() => Some("SIGINT"),
            _ = term.recv() => Some("SIGTERM"),
            _ = hup.recv() => Some("SIGHUP"),
        }
    });
    if let Some(signal) = signal {
        eprintln!("{signal}: stopped; the running part's node and VMMs were killed");
        std::process::exit(130);
    }
}

async fn figures() {
    let runs = env_usize("CAIRN_SLA_RUNS", 7).max(5);
    let guests = env_usize("CAIRN_SLA_GUESTS", 20).max(2);
    contention(runs).await;
    ksm(guests, runs).await;
    pressure(runs).await;
}

async fn contention(runs: usize) {
    let Some(mut c) = sla::contention_figures("o-sla-a", "127.0.0.81", runs, runs).await else {
        println!("(a) CPU contention: skipped (reason above)");
        return;
    };
    let alone = sla::median(&mut c.alone);
    let contended = sla::median(&mut c.contended);
    let ratio = sla::median(&mut c.ratios);
    let equal = sla::median(&mut c.equal);
    println!(
        "(a) CPU, one CPU, {runs} sandwiched runs of {} ms each: reserved guest alone {alone:.0} loops/s, beside a burning spot guest {contended:.0} loops/s; reserved-with-spot / reserved-alone median {ratio:.3} (runs {:.3?})",
        c.window.as_millis(),
        c.ratios
    );
    println!(
        "    baseline, both reserved (same node, same command): median {equal:.3} (runs {:.3?}); spot-class ratio / equal-class ratio {:.2}",
        c.equal,
        ratio / equal
    );
}

async fn ksm(guests: usize, reads: usize) {
    let Some(k) = sla::ksm_figures("o-sla-b", "127.0.0.82", guests, reads).await else {
        println!("(b) KSM: skipped (reason above)");
        return;
    };
    let page = k.reads[0]
        .observed
        .usage
        .as_ref()
        .map_or(4096, |u| u.page_size);
    let mut merged = Vec::new();
    let mut node_sharing = Vec::new();
    let mut node_shared = Vec::new();
    let mut sys_sharing = Vec::new();
    let mut agree = 0;
    for read in &k.reads {
        let usage = read.observed.usage.clone().unwrap_or_default();
        merged.push(read.guests.iter().map(|g| g.1).sum::<u64>() as f64);
        node_sharing.push(usage.ksm_pages_sharing as f64);
        node_shared.push(usage.ksm_pages_shared as f64);
        sys_sharing.push(read.sys_after as f64);
        agree += read.guests.iter().filter(|g| g.1 == g.2).count();
    }
    let total = k.reads.iter().map(|r| r.guests.len()).sum::<usize>();
    let m = sla::median(&mut merged);
    let sharing = sla::median(&mut node_sharing);
    let shared = sla::median(&mut node_shared);
    let sys = sla::median(&mut sys_sharing);
    let kib = |pages: f64| pages * page as f64 / 1024.0;
    println!(
        "(b) KSM, {guests} identical guests (32 MiB each), {} reads 500 ms apart, settled {:.1} s after KSM started: merged across the guests median {m:.0} pages ({:.0} KiB), {:.1} pages ({:.1} KiB) per guest; per-guest figure equal to /proc/PID/ksm_merging_pages in {agree} of {total} guest reads",
        k.reads.len(),
        k.settled.as_secs_f64(),
        kib(m),
        m / guests as f64,
        kib(m / guests as f64),
    );
    println!(
        "    host /sys/kernel/mm/ksm as the node reports it: pages_sharing median {sharing:.0} (saved {:.0} KiB), pages_shared {shared:.0}; /sys read beside it: pages_sharing median {sys:.0}; baseline before KSM was turned on: pages_sharing {} pages_shared {}",
        kib(sharing),
        k.host_before.0,
        k.host_before.1
    );
}

async fn pressure(runs: usize) {
    let mut times = Vec::new();
    let mut baselines = Vec::new();
    let mut orders = Vec::new();
    for run in 0..runs {
        let Some(p) = sla::memory_pressure_run(&format!("o-sla-c{run}"), "127.0.0.83:0").await
        else {
            println!("(c) memory pressure: skipped (reason above)");
            return;
        };
        let baseline = p.explicit_stop.as_secs_f64() * 1000.0;
        match (&p.failed, p.first_stop) {
            (Some(why), _) => println!("    (c) run {run}: no figure: {why}"),
            (None, None) => println!(
                "    (c) run {run}: no figure: available memory went below the threshold ({} MiB) and no spot VM was seen stopped within 30 s",
                p.threshold >> 20
            ),
            (None, Some(t)) => {
                let t = t.as_secs_f64() * 1000.0;
                println!(
                    "    (c) run {run}: first spot VM stopped {t:.0} ms after available memory went below {} MiB; stopped in order {:?}; baseline StopVm {baseline:.0} ms",
                    p.threshold >> 20,
                    p.stopped
                );
                times.push(t);
                baselines.push(baseline);
                orders.push(p.stopped.join(","));
            }
        }
    }
    if times.is_empty() {
        println!(
            "(c) memory pressure: no figure: none of the {runs} runs measured one (each run's reason above)"
        );
        return;
    }
    let all = times.clone();
    let all_baselines = baselines.clone();
    let m = sla::median(&mut times);
    let b = sla::median(&mut baselines);
    println!(
        "(c) memory pressure -> first spot VM seen stopped, {} of {runs} runs (a new node each): median {m:.0} ms (runs {all:.0?}); stopped in order {orders:?}",
        all.len()
    );
    println!(
        "    baseline, same nodes and command: a spot VM stopped by StopVm (grace 0, the stop preemption makes) seen stopped median {b:.0} ms (runs {all_baselines:.0?}); ratio {:.2}; the node polls available memory every {} ms",
        m / b,
        NODE_POLL.as_millis(),
    );
}
