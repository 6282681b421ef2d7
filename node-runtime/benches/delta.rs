//! Delta replication to another site (issue 18) through two real `cairn-node`
//! processes on loopback (127.0.0.66 source, 127.0.0.67 target), against a baseline
//! measured in the same run: the same snapshot shipped whole (a full copy into a fresh
//! target volume, what a replication without deltas sends every time).
//!
//! `cargo bench -p node-runtime --bench delta` prints:
//! - **bytes shipped ÷ bytes changed** at 4 KiB granularity: each round overwrites
//!   `CAIRN_BENCH_BLOCKS` (default 256) random 4 KiB blocks of a 256 MiB volume that
//!   holds 128 MiB of data, snapshots it and ships the delta (`ReplicateVolume`
//!   with `now`); medians over `CAIRN_BENCH_ROUNDS` (default 5) of the data bytes
//!   sent, the bytes on the wire and the time, and of the stripe-unit bytes the
//!   volume store reported changed (what a unit-granular delta would send);
//! - the **baseline**: the last round's snapshot shipped whole to a second target
//!   volume, bytes and time, and the ratio of the delta to it;
//! - the **RPO achieved** with a protection schedule (`snapshot every=2s`) and a
//!   replication schedule (`every=2s`) while a writer changes `CAIRN_BENCH_RATE`
//!   (default 1) MiB/s of 4 KiB blocks for `CAIRN_BENCH_SECONDS` (default 30):
//!   sampled every 100 ms as the age of the newest snapshot the target committed
//!   (its name carries the source's time), median, 95th percentile and maximum,
//!   against the plan's interval.
//!
//! Not a test: it asserts nothing and prints figures.

mod common;

use std::time::{Duration, Instant};

use common::{Node, apply, median, push_peers, setup};
use proto::auth::{Identity, RequestSigner};
use proto::client::NodeClient;
use proto::v1::{
    AcceptReplication, CreateVolume, DeltaStatusRequest, ReplicateVolume, ReplicationResult,
    SetProtection, SnapshotVolume, WriteVolume, apply_request::Action, apply_response,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
const FILLED: u64 = 128 * MIB;
const BLOCK: u64 = 4096;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift: reproducible offsets and contents.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, length: usize) -> Vec<u8> {
        (0..length / 8)
            .flat_map(|_| self.next().to_le_bytes())
            .collect()
    }
}

fn create(name: &str) -> Action {
    Action::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: SIZE,
        stripe_width: 4,
        stripe_unit_bytes: MIB,
        replica_peers: vec![],
    })
}

fn write(offset: u64, data: Vec<u8>) -> Action {
    Action::WriteVolume(WriteVolume {
        name: "vol".into(),
        offset,
        data,
    })
}

fn replicate(target: &Node, volume: &str, every_ms: u64, now: bool) -> Action {
    Action::ReplicateVolume(ReplicateVolume {
        volume: "vol".into(),
        target: Some(target.peer()),
        target_volume: volume.into(),
        every_ms,
        keep: 4,
        now,
    })
}

async fn ship(client: &mut NodeClient, id: String, action: Action) -> ReplicationResult {
    match apply(client, id, action).await.result {
        Some(apply_response::Result::Replication(result)) => result,
        other => panic!("ReplicateVolume answered {other:?}"),
    }
}

async fn accept(target: &mut NodeClient, volume: &str, source: &Node) {
    apply(
        target,
        format!("accept-{volume}"),
        Action::AcceptReplication(AcceptReplication {
            volume: volume.into(),
            source: Some(source.peer()),
        }),
    )
    .await;
}

fn mib(bytes: f64) -> String {
    format!("{:.3} MiB", bytes / MIB as f64)
}

fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let (base, runtime, controller) = setup();
    let source = Node::start(
        "delta-src",
        &base.path().join("src"),
        &controller,
        "127.0.0.66:0",
        4,
        1 << 30,
    );
    let target = Node::start(
        "delta-dst",
        &base.path().join("dst"),
        &controller,
        "127.0.0.67:0",
        4,
        1 << 30,
    );
    runtime.block_on(run(&source, &target, &controller));
}

async fn run(source: &Node, target: &Node, controller: &Identity) {
    let signer = RequestSigner::new(controller.clone());
    push_peers(&[source, target], &signer).await;
    let mut on_source = NodeClient::connect(&source.address, signer.clone())
        .await
        .unwrap();
    let mut on_target = NodeClient::connect(&target.address, signer.clone())
        .await
        .unwrap();
    apply(&mut on_source, "create".into(), create("vol")).await;
    for volume in ["vol-dr", "vol-full"] {
        apply(&mut on_target, format!("create-{volume}"), create(volume)).await;
        accept(&mut on_target, volume, source).await;
    }
    let mut rng = Rng(0x5eed);
    for offset in (0..FILLED).step_by((4 * MIB) as usize) {
        let data = rng.bytes((4 * MIB) as usize);
        apply(
            &mut on_source,
            format!("fill-{offset}"),
            write(offset, data),
        )
        .await;
    }
    let snap = |name: String| {
        Action::SnapshotVolume(SnapshotVolume {
            volume: "vol".into(),
            snapshot: name,
        })
    };
    apply(&mut on_source, "snap-0".into(), snap("r0".into())).await;
    let first = ship(
        &mut on_source,
        "ship-0".into(),
        replicate(target, "vol-dr", 0, true),
    )
    .await;
    println!(
        "first transfer (full): {} data in {} ms",
        mib(first.data_bytes as f64),
        first.duration_ms
    );

    // Deltas of random 4 KiB blocks.
    let rounds = env("CAIRN_BENCH_ROUNDS", 5) as usize;
    let blocks = env("CAIRN_BENCH_BLOCKS", 256);
    let (mut sent, mut wire, mut units, mut times, mut ratios) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut changed_bytes = 0;
    for round in 1..=rounds {
        let mut offsets = std::collections::BTreeSet::new();
        while offsets.len() < blocks as usize {
            offsets.insert(rng.next() % (FILLED / BLOCK) * BLOCK);
        }
        for offset in &offsets {
            let data = rng.bytes(BLOCK as usize);
            apply(
                &mut on_source,
                format!("w-{round}-{offset}"),
                write(*offset, data),
            )
            .await;
        }
        changed_bytes = offsets.len() as u64 * BLOCK;
        apply(
            &mut on_source,
            format!("snap-{round}"),
            snap(format!("r{round}")),
        )
        .await;
        let result = ship(
            &mut on_source,
            format!("ship-{round}"),
            replicate(target, "vol-dr", 0, true),
        )
        .await;
        sent.push(result.data_bytes as f64);
        wire.push(result.wire_bytes as f64);
        units.push(result.changed_unit_bytes as f64);
        times.push(result.duration_ms as f64);
        ratios.push(result.data_bytes as f64 / changed_bytes as f64);
    }
    // The baseline: the same (last) snapshot shipped whole.
    let full = ship(
        &mut on_source,
        "ship-full".into(),
        replicate(target, "vol-full", 0, true),
    )
    .await;
    let (delta_wire, delta_ms) = (median(wire.clone()), median(times.clone()));
    println!(
        "delta of {blocks} random 4 KiB blocks ({}), medians of {rounds}: data sent {}, on the wire {}, sent/changed {:.3}, changed stripe units {} ({:.1}x the changed bytes), {delta_ms:.0} ms",
        mib(changed_bytes as f64),
        mib(median(sent)),
        mib(delta_wire),
        median(ratios),
        mib(median(units.clone())),
        median(units) / changed_bytes as f64,
    );
    println!(
        "baseline, the same snapshot shipped whole: {} on the wire, {} ms; delta/full: bytes {:.4}, time {:.3}",
        mib(full.wire_bytes as f64),
        full.duration_ms,
        delta_wire / full.wire_bytes as f64,
        delta_ms / full.duration_ms.max(1) as f64,
    );

    // RPO with the schedules running.
    let every_ms = 2000;
    apply(
        &mut on_source,
        "protect".into(),
        Action::SetProtection(SetProtection {
            vm: "bench".into(),
            plan: "bench".into(),
            volumes: vec!["vol".into()],
            every_ms,
            keep: 4,
        }),
    )
    .await;
    apply(
        &mut on_source,
        "replicate-schedule".into(),
        replicate(target, "vol-dr", 1000, false),
    )
    .await;
    let seconds = env("CAIRN_BENCH_SECONDS", 30);
    let rate = env("CAIRN_BENCH_RATE", 1) * MIB;
    let writer = {
        let mut client = NodeClient::connect(&source.address, signer.clone())
            .await
            .unwrap();
        let mut rng = Rng(0xfeed);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut written = 0u64;
            while started.elapsed() < Duration::from_secs(seconds + 4) {
                let offset = rng.next() % (FILLED / BLOCK) * BLOCK;
                let data = rng.bytes(BLOCK as usize);
                apply(&mut client, format!("rpo-{written}"), write(offset, data)).await;
                written += BLOCK;
                let due = Duration::from_secs_f64(written as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            written
        })
    };
    let mut as_source = NodeClient::connect(
        &target.address,
        RequestSigner::new(Identity::load(&source.dir.join("identity.key")).unwrap()),
    )
    .await
    .unwrap();
    // Warm up one interval, then sample.
    tokio::time::sleep(Duration::from_millis(2 * every_ms)).await;
    let mut rpo = Vec::new();
    let sampling = Instant::now();
    while sampling.elapsed() < Duration::from_secs(seconds) {
        let status = as_source
            .delta_status(DeltaStatusRequest {
                volume: "vol-dr".into(),
            })
            .await
            .unwrap();
        let newest = status
            .snapshots
            .iter()
            .filter_map(|name| name.strip_prefix("auto-")?.parse::<u64>().ok())
            .max();
        if let Some(at) = newest {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            rpo.push(now.saturating_sub(at) as f64);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written = writer.await.unwrap();
    println!(
        "RPO with snapshot every {every_ms} ms and replication every 1000 ms, writer at {} MiB/s ({} written): {} samples, median {:.0} ms, p95 {:.0} ms, max {:.0} ms (schedule interval {every_ms} ms)",
        rate / MIB,
        mib(written as f64),
        rpo.len(),
        median(rpo.clone()),
        percentile(rpo.clone(), 0.95),
        percentile(rpo, 1.0),
    );
}
