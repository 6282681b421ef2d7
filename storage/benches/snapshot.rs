//! Snapshot time with 1 GiB written, on a small and a large volume in the same run:
//! a snapshot freezes the volume's top layer and gives it a new empty one (two rows
//! and a metadata commit), so its time must not grow with the volume's size or with
//! what was written (issue 18's "O(1), independent of the volume's size").
//!
//! For each size: a fresh store (4 sparse file disks), a volume striped 1 MiB × 4,
//! 1 GiB written in 4 MiB requests (the same bytes for both), then `CAIRN_BENCH_RUNS`
//! snapshots one after the other, each timed; and the time to delete them again
//! (oldest first: each deletion folds a layer whose units the next one mostly does not
//! shadow, so it moves extent rows: O(units written), not O(volume size)). Prints
//! medians and the large / small ratio.
//!
//! `cargo bench -p storage --bench snapshot`; knobs: `CAIRN_BENCH_WRITE_MIB` (default
//! 1024), `CAIRN_BENCH_SMALL_GIB` (default 2), `CAIRN_BENCH_LARGE_GIB` (default 256),
//! `CAIRN_BENCH_RUNS` (default 9), `CAIRN_BENCH_DIR` (default: system temp dir).

use std::time::{Duration, Instant};

use storage::{DiskSource, Store, StoreOptions, VolumeSpec};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (snapshot median, snapshot max, delete median, write time) for one volume size.
fn measure(size: u64, written: u64, runs: u64) -> (Duration, Duration, Duration, Duration) {
    let base = std::env::var("CAIRN_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(&base).expect("bench dir");
    let store = Store::open(dir.path(), StoreOptions::default()).expect("store");
    for i in 0..4 {
        store
            .add_disk(
                &format!("d{i}"),
                DiskSource::File {
                    capacity: size / 4 + (256 << 20),
                },
            )
            .expect("disk");
    }
    let volume = store
        .create_volume(&VolumeSpec {
            name: "v".into(),
            size,
            stripe_unit: 1 << 20,
            disks: vec![],
            stripe_width: 4,
        })
        .expect("volume");
    let chunk: Vec<u8> = (0..4u64 << 20)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 12)) as u8)
        .collect();
    let started = Instant::now();
    let mut offset = 0;
    while offset < written {
        volume.write_at(offset, &chunk).expect("write");
        offset += chunk.len() as u64;
    }
    let write_time = started.elapsed();
    let mut times = vec![];
    for k in 0..runs {
        // One more write between snapshots, so each freezes a layer with data.
        volume.write_at(k * (4 << 20), &chunk).expect("write");
        let t = Instant::now();
        store
            .create_snapshot("v", &format!("s{k}"))
            .expect("snapshot");
        times.push(t.elapsed());
    }
    let max = *times.iter().max().expect("runs");
    let mut deletes = vec![];
    for k in 0..runs {
        let t = Instant::now();
        store
            .delete_snapshot("v", &format!("s{k}"))
            .expect("delete");
        deletes.push(t.elapsed());
    }
    (median(times), max, median(deletes), write_time)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("snapshot: benchmark only; run `cargo bench -p storage --bench snapshot`");
        return;
    }
    let written = env_u64("CAIRN_BENCH_WRITE_MIB", 1024) << 20;
    let small = env_u64("CAIRN_BENCH_SMALL_GIB", 2) << 30;
    let large = env_u64("CAIRN_BENCH_LARGE_GIB", 256) << 30;
    let runs = env_u64("CAIRN_BENCH_RUNS", 9).max(1);
    let mut rows = vec![];
    for size in [small, large] {
        let (snap, max, delete, write) = measure(size, written, runs);
        println!(
            "volume {:>4} GiB, {} MiB written ({:.1} s): snapshot median {:.2} ms (max {:.2} ms, {runs} runs), delete median {:.2} ms",
            size >> 30,
            written >> 20,
            write.as_secs_f64(),
            ms(snap),
            ms(max),
            ms(delete)
        );
        rows.push((snap, delete));
    }
    println!(
        "large / small: snapshot {:.2}×, delete {:.2}× (volume {}× larger)",
        ms(rows[1].0) / ms(rows[0].0),
        ms(rows[1].1) / ms(rows[0].1),
        large / small
    );
}
