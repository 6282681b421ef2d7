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

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::auth::{Identity, RequestSigner};
use proto::client::NodeClient;
use proto::v1::{
    ApplyRequest, CreateVolume, ExportVolume, Peer, SetPeers, WriteVolume, apply_request::Action,
    apply_response::Result as ApplyResult,
};

const ROUNDS: usize = 3;
const TOTAL_BYTES: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

struct Node {
    name: String,
    dir: PathBuf,
    address: String,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(name: &str, dir: &Path, controller: &Identity) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("trusted-controllers"),
        format!("{}\n", controller.public_key_hex()),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cairn-node"))
        .args(["--name", name, "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(["--disks", "4", "--disk-capacity", &(4u64 << 30).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cairn-node");
    // The node is killed and reaped by `Node::drop`, also if it never starts.
    let mut node = Node {
        name: name.into(),
        dir: dir.into(),
        address: String::new(),
        child,
    };
    let file = dir.join("listen-address");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file)
            && text.ends_with('\n')
        {
            node.address = text.trim().into();
            return node;
        }
        assert!(Instant::now() < deadline, "node {name} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

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

async fn apply(client: &mut NodeClient, id: String, action: Action) -> proto::v1::ApplyResponse {
    client
        .apply(ApplyRequest {
            request_id: id,
            action: Some(action),
        })
        .await
        .expect("apply")
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
    let base = tempfile::tempdir_in(
        std::env::var_os("CAIRN_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()),
    )
    .unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let controller = Identity::generate().unwrap();
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|suffix| {
            start(
                &format!("bench-{suffix}"),
                &base.path().join(suffix),
                &controller,
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
        let peers: Vec<Peer> = nodes
            .iter()
            .map(|node| Peer {
                name: node.name.clone(),
                address: node.address.clone(),
                public_key_hex: std::fs::read_to_string(node.dir.join("identity.pub"))
                    .unwrap()
                    .trim()
                    .into(),
            })
            .collect();
        for node in &nodes {
            let mut client = NodeClient::connect(&node.address, signer.clone())
                .await
                .unwrap();
            apply(
                &mut client,
                "peers".into(),
                Action::SetPeers(SetPeers {
                    peers: peers.clone(),
                }),
            )
            .await;
        }
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
