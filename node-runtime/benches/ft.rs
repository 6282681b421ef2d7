//! Failover of a fault-tolerant VM through the node API (issue 22), medians with a
//! baseline from the same command.
//!
//! `cargo bench -p node-runtime --bench ft` (release): the setup of `it ft::` (two
//! `cairn-node` processes in two node namespaces on one switch, checkpoints over the
//! underlay, a built-in guest with a NIC beaconing to a collector on each node's
//! tenant bridge, a real `cairn witness` at 127.0.0.54:7454), then `CAIRN_FT_RUNS`
//! (default 5) rounds of each path, the pair swapping nodes every round:
//! - commander path: kill -9 of the primary's VMM → `PromoteFt` answered, and → the
//!   promoted guest's first beacon at the collector;
//! - witness path (lease `CAIRN_FT_LEASE_MS`, default 1000): kill -9 of the primary's
//!   VMM → the secondary's node wins `vm/ft-1` and promotes by itself → first beacon;
//! - baseline: a cold `StartVm` of the same VM → its first heartbeat answered.
//!
//! It prints the medians, every run and the ratios to the baseline, and whether the
//! beacons' counters only increased over all rounds. The code is `it ft::`'s
//! (`tests/it/ft.rs`, `failover_figures`), included here with its harness.

#![allow(dead_code, unused_imports)]

#[path = "../tests/it/ft.rs"]
mod ft;
#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/vms.rs"]
mod vms;

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(ft::failover_figures());
}
