//! Ports for the processes the tests start.
//!
//! A port the kernel picks for `bind(0)` comes from the ephemeral range
//! (`net.ipv4.ip_local_port_range`, 32768–60999 by default), the range every
//! outgoing connection also takes its source port from. Released and handed to
//! a process a moment later, such a port can already be the source port of one
//! of the many connections the tests make: the process then fails with
//! "address already in use" (seen in CI for the controller's gRPC listener).
//! These ports come from below that range instead, where no connection takes a
//! port by itself, each handed out once per test process and checked free by a
//! bind on the address it is for.

use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out.
const LOW: u32 = 10_000;
/// One past the highest: the ephemeral range's start on Linux's default.
const HIGH: u32 = 32_768;

/// Offset of the next port, from a start that differs between test processes
/// (their pids differ), so that two test binaries running at once rarely try
/// the same ports.
static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

fn next_candidate() -> u16 {
    let span = HIGH - LOW;
    let start = (std::process::id().wrapping_mul(2_654_435_761) >> 8) % span;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    let offset = NEXT.fetch_add(1, Ordering::SeqCst) % span;
    (LOW + offset) as u16
}

/// A port free on `ip`, outside the ephemeral range, not handed out before by
/// this test process.
pub(crate) fn free_port_on(ip: &str) -> u16 {
    free_ports_on(ip, 1)
}

/// A base port from which `count` consecutive ports are free on `ip`, none
/// handed out before by this test process.
pub(crate) fn free_ports_on(ip: &str, count: u16) -> u16 {
    for _ in 0..(HIGH - LOW) {
        let base = next_candidate();
        if u32::from(base) + u32::from(count) > HIGH {
            continue;
        }
        // The rest of the run is this caller's too.
        for _ in 1..count {
            next_candidate();
        }
        let all = (0..count).all(|i| std::net::TcpListener::bind((ip, base + i)).is_ok());
        if all {
            return base;
        }
    }
    panic!("no {count} consecutive free ports on {ip} below {HIGH}");
}
