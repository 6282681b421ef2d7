//! Replicated volume throughput through real `cairn-node` processes on loopback,
//! against a baseline measured in the same run: the same bytes written with plain
//! `pwrite` + `fdatasync` to a file on the same filesystem.
//!
//! `cargo bench -p node-runtime --bench replication` prints, for each case, the
//! median of `ROUNDS` runs in MiB/s and the ratio to the baseline:
//! - `file`: plain file, 1 MiB writes, fdatasync after each (the baseline);
//! - `api-1copy`: Apply.WriteVolume of 1 MiB each, striped volume, no replicas;
//! - `api-3copies`: the same with 2 replicas on loopback peers;
//! - `nbd-1copy` / `nbd-3copies`: `qemu-img convert` of an image into the exported volume.
//!
//! Not a test: it asserts nothing and prints figures.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Node, apply, median, push_peers, setup};
use proto::auth::RequestSigner;
use proto::client::NodeClient;
use proto::v1::{
    CreateVolume, ExportVolume, Peer, WriteVolume, apply_request::Action,
    apply_response::Result as ApplyResult,
};

const ROUNDS: usize = 3;
const TOTAL_BYTES: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

fn mib_per_second(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / elapsed.as_secs_f64()
}

fn data() -> Vec<u8> {
    (0..CHUNK).map(|index| (index * 31 % 251) as u8).collect()
}

fn file_baseline(dir: &Path, round: usize) -> f64 {
    let path = dir.join(format!("baseline-{round}.img"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let chunk = data();
    let started = Instant::now();
    let mut offset = 0;
    while offset < TOTAL_BYTES {
        file.write_all_at(&chunk, offset).unwrap();
        file.sync_data().unwrap();
        offset += CHUNK as u64;
    }
    let speed = mib_per_second(TOTAL_BYTES, started.elapsed());
    drop(file);
    let _ = std::fs::remove_file(path);
    speed
}

fn create(name: &str, replicas: &[&Node]) -> Action {
    Action::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: TOTAL_BYTES,
        stripe_width: 4,
        stripe_unit_bytes: 1 << 20,
        replica_peers: replicas
            .iter()
            .map(|node| Peer {
                name: node.name.clone(),
                address: node.address.clone(),
                public_key_hex: String::new(),
            })
            .collect(),
    })
}

async fn api_writes(client: &mut NodeClient, volume: &str) -> f64 {
    let chunk = data();
    let started = Instant::now();
    let mut offset = 0;
    while offset < TOTAL_BYTES {
        apply(
            client,
            format!("{volume}-{offset}"),
            Action::WriteVolume(WriteVolume {
                name: volume.into(),
                offset,
                data: chunk.clone(),
            }),
        )
        .await;
        offset += CHUNK as u64;
    }
    mib_per_second(TOTAL_BYTES, started.elapsed())
}

async fn nbd_writes(client: &mut NodeClient, volume: &str, image: &Path) -> f64 {
    let response = apply(
        client,
        format!("export-{volume}"),
        Action::ExportVolume(ExportVolume {
            name: volume.into(),
            lifetime_seconds: 0,
            read_only: false,
        }),
    )
    .await;
    let Some(ApplyResult::ExportVolume(export)) = response.result else {
        panic!("export failed: {response:?}");
    };
    let started = Instant::now();
    let status = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(image)
        .arg(&export.uri)
        .status()
        .expect("qemu-img");
    assert!(status.success());
    mib_per_second(TOTAL_BYTES, started.elapsed())
}

fn main() {
    if std::env::args().any(|argument| argument == "--list") {
        return;
    }
    let (base, runtime, controller) = setup();
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|suffix| {
            Node::start(
                &format!("bench-{suffix}"),
                &base.path().join(suffix),
                &controller,
                "127.0.0.1:0",
                4,
                4 << 30,
            )
        })
        .collect();
    let have_qemu = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let image = base.path().join("image.raw");
    {
        let mut file = std::fs::File::create(&image).unwrap();
        for _ in 0..(TOTAL_BYTES as usize / CHUNK) {
            file.write_all(&data()).unwrap();
        }
    }

    let mut results: Vec<(&str, Vec<f64>)> = vec![
        ("file", Vec::new()),
        ("api-1copy", Vec::new()),
        ("api-3copies", Vec::new()),
        ("nbd-1copy", Vec::new()),
        ("nbd-3copies", Vec::new()),
    ];
    runtime.block_on(async {
        let signer = RequestSigner::new(controller.clone());
        push_peers(&nodes.iter().collect::<Vec<_>>(), &signer).await;
        let mut primary = NodeClient::connect(&nodes[0].address, signer.clone())
            .await
            .unwrap();
        for round in 0..ROUNDS {
            results[0].1.push(file_baseline(&nodes[0].dir, round));
            let single = format!("single-{round}");
            apply(
                &mut primary,
                format!("create-{single}"),
                create(&single, &[]),
            )
            .await;
            results[1].1.push(api_writes(&mut primary, &single).await);
            let replicated = format!("replicated-{round}");
            apply(
                &mut primary,
                format!("create-{replicated}"),
                create(&replicated, &[&nodes[1], &nodes[2]]),
            )
            .await;
            results[2]
                .1
                .push(api_writes(&mut primary, &replicated).await);
            if have_qemu {
                let single = format!("nbd-single-{round}");
                apply(
                    &mut primary,
                    format!("create-{single}"),
                    create(&single, &[]),
                )
                .await;
                results[3]
                    .1
                    .push(nbd_writes(&mut primary, &single, &image).await);
                let replicated = format!("nbd-replicated-{round}");
                apply(
                    &mut primary,
                    format!("create-{replicated}"),
                    create(&replicated, &[&nodes[1], &nodes[2]]),
                )
                .await;
                results[4]
                    .1
                    .push(nbd_writes(&mut primary, &replicated, &image).await);
            }
        }
    });
    let baseline = median(results[0].1.clone());
    println!(
        "replication bench: {} MiB per run, 1 MiB writes, median of {ROUNDS} runs",
        TOTAL_BYTES >> 20
    );
    for (name, values) in results {
        if values.is_empty() {
            println!("{name:<12} skipped (qemu-img not installed)");
            continue;
        }
        let value = median(values);
        println!(
            "{name:<12} {value:>9.1} MiB/s   {:>5.2}x file",
            value / baseline
        );
    }
}
