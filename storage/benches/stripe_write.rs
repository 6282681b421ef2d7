//! Sequential write (and read) throughput of a striped volume against the same bytes
//! written to one raw file with io_uring on the same filesystem, in the same run.
//!
//! Both sides make every chunk durable before the next (raw: write + fdatasync; volume:
//! write + fdatasync + metadata commit), which is what an acknowledged write costs.
//! Budget (DESIGN.md): striped / raw >= 0.9.
//!
//! `cargo bench -p storage --bench stripe_write`; environment knobs:
//! `CAIRN_BENCH_MIB` (total MiB per run, default 256), `CAIRN_BENCH_CHUNK_KIB` (request size,
//! default 4096), `CAIRN_BENCH_STRIPE_KIB` (stripe unit, default 1024), `CAIRN_BENCH_WIDTH`
//! (columns, default 4), `CAIRN_BENCH_RUNS` (default 5), `CAIRN_BENCH_DIR` (default: system
//! temp dir).
//!
//! A third case writes the same bytes round-robin over `width` raw files with io_uring (one
//! fdatasync per file touched), to separate what striping over files of one filesystem
//! costs from what the store (checksums, metadata) costs.

use std::fs::OpenOptions;
use std::time::{Duration, Instant};

use storage::{DiskSource, EngineKind, FileEngine, Store, StoreOptions, VolumeSpec};

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

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / d.as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`. Under `cargo test --all-targets` this binary runs
    // without it: do nothing there, a benchmark is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("stripe_write: benchmark only; run `cargo bench -p storage --bench stripe_write`");
        return;
    }
    let total_mib = env_u64("CAIRN_BENCH_MIB", 256);
    let chunk = env_u64("CAIRN_BENCH_CHUNK_KIB", 4096) << 10;
    let runs = env_u64("CAIRN_BENCH_RUNS", 5).max(1);
    let total = total_mib << 20;
    let width = env_u64("CAIRN_BENCH_WIDTH", 4) as usize;
    let stripe_unit = env_u64("CAIRN_BENCH_STRIPE_KIB", 1024) << 10;
    let base = std::env::var("CAIRN_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(&base).expect("bench dir");
    let data: Vec<u8> = (0..chunk)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 12)) as u8)
        .collect();

    let engine =
        FileEngine::new(EngineKind::IoUring).expect("io_uring is required for this benchmark");
    let store = Store::open(
        dir.path().join("store"),
        StoreOptions {
            engine: EngineKind::IoUring,
        },
    )
    .unwrap();
    for i in 0..width {
        store
            .add_disk(&format!("d{i}"), DiskSource::File { capacity: total })
            .unwrap();
    }
    println!(
        "stripe_write: {total_mib} MiB per run in {} KiB durable requests, {runs} runs, dir {}",
        chunk >> 10,
        dir.path().display()
    );
    println!(
        "volume: stripe unit {} KiB x {width} columns (4 disk files, same filesystem)",
        stripe_unit >> 10
    );

    let stripe_files: Vec<std::fs::File> = (0..width)
        .map(|i| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(format!("raw-col{i}.img")))
                .unwrap();
            f.set_len(total).unwrap();
            f
        })
        .collect();
    let mut raws_w = Vec::new();
    let mut raw_w = Vec::new();
    let mut vol_w = Vec::new();
    let mut raw_r = Vec::new();
    let mut vol_r = Vec::new();
    let mut buf = vec![0u8; chunk as usize];
    // The raw file is sized like a disk file (sparse) and kept across runs, as the disk
    // files are: the first run of each side allocates filesystem blocks, later runs reuse them.
    let path = dir.path().join("raw.img");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(total).unwrap();
    for run in 0..runs {
        // Baseline: one raw file, io_uring write + fdatasync per request.
        let t = Instant::now();
        let mut off = 0;
        while off < total {
            engine.write_all_at(&file, off, &data).unwrap();
            engine.sync_data(&[&file]).unwrap();
            off += chunk;
        }
        raw_w.push(t.elapsed());
        let t = Instant::now();
        let mut off = 0;
        while off < total {
            engine.read_exact_at(&file, off, &mut buf).unwrap();
            off += chunk;
        }
        raw_r.push(t.elapsed());

        // Raw striping: the same layout as the volume without checksums or metadata.
        let t = Instant::now();
        let mut off = 0;
        while off < total {
            let mut ops = Vec::new();
            let mut touched = Vec::new();
            let mut pos = off;
            while pos < off + chunk {
                let unit = pos / stripe_unit;
                let len = (stripe_unit - pos % stripe_unit).min(off + chunk - pos);
                let col = (unit % width as u64) as usize;
                let file_off = (unit / width as u64) * stripe_unit + pos % stripe_unit;
                let from = (pos - off) as usize;
                ops.push(storage::IoOp::Write {
                    file: &stripe_files[col],
                    offset: file_off,
                    buf: &data[from..from + len as usize],
                });
                if !touched.contains(&col) {
                    touched.push(col);
                }
                pos += len;
            }
            engine.run(&mut ops).unwrap();
            let files: Vec<&std::fs::File> = touched.iter().map(|&c| &stripe_files[c]).collect();
            engine.sync_data(&files).unwrap();
            off += chunk;
        }
        raws_w.push(t.elapsed());

        // Striped volume, fresh each run so every request allocates (the thin path).
        let name = format!("bench{run}");
        let spec = VolumeSpec {
            name: name.clone(),
            size: total,
            stripe_unit,
            stripe_width: width,
            disks: Vec::new(),
        };
        let vol = store.create_volume(&spec).unwrap();
        let t = Instant::now();
        let mut off = 0;
        while off < total {
            vol.write_at(off, &data).unwrap();
            off += chunk;
        }
        vol_w.push(t.elapsed());
        let t = Instant::now();
        let mut off = 0;
        while off < total {
            vol.read_at(off, &mut buf).unwrap();
            off += chunk;
        }
        vol_r.push(t.elapsed());
        assert!(buf == data, "read back what was written");
        store.delete_volume(&name).unwrap();
    }
    if std::env::var("CAIRN_BENCH_VERBOSE").is_ok() {
        println!("raw file runs:     {raw_w:?}");
        println!("raw striped runs:  {raws_w:?}");
        println!("volume runs:       {vol_w:?}");
    }
    let (rw, vw, rr, vr) = (median(raw_w), median(vol_w), median(raw_r), median(vol_r));
    let sw = median(raws_w);
    let row =
        |name: &str, d: Duration| println!("{name:<36} {:>10.1?} {:>10.0}", d, mib_s(total, d));
    println!("{:<36} {:>10} {:>10}", "case", "median", "MiB/s");
    row("write raw file (io_uring)", rw);
    row("write raw striped files (io_uring)", sw);
    row("write striped volume", vw);
    row("read raw file (io_uring, cached)", rr);
    row("read striped volume (cached)", vr);
    let ratio = |base: Duration, ours: Duration| base.as_secs_f64() / ours.as_secs_f64();
    println!(
        "ratio write volume/raw file:          {:.2}x (budget >= 0.90x)",
        ratio(rw, vw)
    );
    println!(
        "ratio write volume/raw striped files: {:.2}x",
        ratio(sw, vw)
    );
    println!(
        "ratio read  volume/raw file:          {:.2}x",
        ratio(rr, vr)
    );
    random_writes(&engine, &store, dir.path());
    nbd_qemu_img(&store, dir.path());
}

/// 4 KiB writes at random block offsets, each durable before the next (queue depth 1):
/// into fresh thin space, and over existing data (which journals its checksums first).
fn random_writes(engine: &FileEngine, store: &Store, dir: &std::path::Path) {
    let n = env_u64("CAIRN_BENCH_RANDOM_OPS", 1000);
    let size = 256u64 << 20;
    let blocks = size / 4096;
    let block = vec![0x5au8; 4096];
    let offsets: Vec<u64> = {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % blocks) * 4096
            })
            .collect()
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("rand.img"))
        .unwrap();
    let fill = vec![1u8; 1 << 20];
    for off in (0..size).step_by(1 << 20) {
        engine.write_all_at(&file, off, &fill).unwrap();
    }
    engine.sync_data(&[&file]).unwrap();
    let t = Instant::now();
    for &off in &offsets {
        engine.write_all_at(&file, off, &block).unwrap();
        engine.sync_data(&[&file]).unwrap();
    }
    let raw = t.elapsed();
    let spec = VolumeSpec {
        name: "rand".into(),
        size,
        stripe_unit: 64 << 10,
        stripe_width: store.disks().len(),
        disks: Vec::new(),
    };
    let vol = store.create_volume(&spec).unwrap();
    let t = Instant::now();
    for &off in &offsets {
        vol.write_at(off, &block).unwrap();
    }
    let fresh = t.elapsed();
    let t = Instant::now();
    for &off in &offsets {
        vol.write_at(off, &block).unwrap();
    }
    let over = t.elapsed();
    store.delete_volume("rand").unwrap();
    let iops = |d: Duration| n as f64 / d.as_secs_f64();
    println!("4 KiB random durable writes, queue depth 1, {n} ops:");
    println!(
        "  raw file (io_uring write + fdatasync)  {:>8.0} IOPS",
        iops(raw)
    );
    println!(
        "  volume, fresh thin blocks              {:>8.0} IOPS ({:.2}x raw)",
        iops(fresh),
        raw.as_secs_f64() / fresh.as_secs_f64()
    );
    println!(
        "  volume, overwriting written blocks     {:>8.0} IOPS ({:.2}x raw)",
        iops(over),
        raw.as_secs_f64() / over.as_secs_f64()
    );
}

/// `qemu-img convert` of a 64 MiB image into a volume over NBD, against the same into a raw
/// file on the same filesystem.
fn nbd_qemu_img(store: &Store, dir: &std::path::Path) {
    use std::process::Command;
    if !Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("qemu-img over NBD: skipped, qemu-img is not installed");
        return;
    }
    let size = 64u64 << 20;
    let image: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let src = dir.join("src.img");
    std::fs::write(&src, &image).unwrap();
    let target = dir.join("target.img");
    std::fs::write(&target, vec![0u8; size as usize]).unwrap();
    let spec = VolumeSpec {
        name: "nbd".into(),
        size,
        stripe_unit: 1 << 20,
        stripe_width: store.disks().len(),
        disks: Vec::new(),
    };
    let vol = store.create_volume(&spec).unwrap();
    let exports = std::sync::Arc::new(storage::nbd::Exports::new());
    exports.insert("nbd", std::sync::Arc::new(vol));
    let server = storage::nbd::NbdServer::start("127.0.0.1:0".parse().unwrap(), exports).unwrap();
    let run = |to: &str| {
        let t = Instant::now();
        let out = Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(to)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed()
    };
    let raw = run(target.to_str().unwrap());
    let nbd = run(&server.uri("nbd"));
    println!("qemu-img convert -n, 64 MiB image:");
    println!("  into a raw file                        {raw:>10.1?}");
    println!(
        "  into a striped volume over NBD         {nbd:>10.1?} ({:.2}x raw)",
        raw.as_secs_f64() / nbd.as_secs_f64()
    );
    server.shutdown();
}
