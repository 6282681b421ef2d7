//! A VM disk's data path, measured through the whole node path against the same engine
//! in-process and a raw file, in one run.
//!
//! `cargo bench -p node-runtime --bench vm_disk` drives cairn-vmm's virtio-blk backend
//! for node volumes (`vmm::devices::nbd_client::NbdBackend`) directly — what a
//! virtio-blk request of the guest becomes in the VMM — against a real `cairn-node`
//! process: NBD on the node's owner-only unix socket → the node's replicated write
//! path → the local copy and, with 2 copies, a replica `cairn-node` over gRPC on
//! loopback. (The built-in guest issues one 4 KiB request per tick and cannot drive a
//! load; its requests take exactly this path: same backend, same socket kind, same
//! node code.) Baselines, on the same filesystem:
//! - `engine`: the same volume store (`storage::Store`) in this process, writing the
//!   same number of copies (2 copies: two stores, written in parallel, like the node's
//!   primary and replica);
//! - `file`: `pwrite` + `fdatasync` on a plain file.
//!
//! Cases: sequential 1 MiB writes (MiB/s) one at a time and with `DEPTH` in flight (as
//! many threads, each writing every `DEPTH`-th MiB: the VMM's backend has that many
//! connections, the node serves writes to one volume side by side), and 4 KiB random
//! overwrites one at a time (latency p50 and p99), each write durable on every copy
//! when it returns. Medians of `ROUNDS` runs;
//! ratios against the in-process engine; the loopback round trip (TCP ping-pong of one
//! byte) is printed for the latency budget (p50 < 2 × engine + one RTT per replica).
//!
//! Remote data (`remote-*`, when /dev/kvm and a built `cairn-vmm` are there): the same
//! backend on the disk socket of a VM running on a third node, `vd-c`, that holds no
//! copy (the volume's epoch names it a client): its storage client forwards every
//! write to the writer (`Replication.ClientWrite`), which writes it like a local one.
//! Compared with the local node path of the same number of copies.
//!
//! `node-1copy-kbuf` and `node-2copies-kbuf`: the same node path with the backend's
//! connections at the kernel's default socket buffer instead of cairn-vmm's
//! (`nbd_client::SOCKET_BUFFER`), run right after the case they compare with in each
//! round; the ratio of the two is printed.
//!
//! Not a test: it asserts nothing and prints figures.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use common::{Node, apply, median, push_peers, setup};
use proto::auth::RequestSigner;
use proto::client::NodeClient;
use proto::v1::{
    CreateVm, CreateVolume, ExportVolume, Peer, SetVolumeEpoch, StartVm, StopVm,
    apply_request::Action, apply_response::Result as ApplyResult, create_vm::Image,
};
use storage::{DiskSource, Store, StoreOptions, VolumeSpec};
use vmm::devices::block::BlockBackend;
use vmm::devices::nbd_client::{NbdBackend, SOCKET_BUFFER};

/// Rounds per case (`CAIRN_BENCH_ROUNDS=N` for more); every figure is their median.
const ROUNDS: usize = 3;

fn rounds() -> usize {
    std::env::var("CAIRN_BENCH_ROUNDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .filter(|&rounds| rounds > 0)
        .unwrap_or(ROUNDS)
}
const SEQUENTIAL_BYTES: u64 = 128 << 20;
const VOLUME_BYTES: u64 = 256 << 20;
const CHUNK: usize = 1 << 20;
const RANDOM_WRITES: usize = 400;
const STRIPE_WIDTH: u32 = 2;
const STRIPE_UNIT: u64 = 1 << 20;
/// Writes in flight for the queue-depth case.
const DEPTH: usize = 4;

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

/// A write of `data` at `offset` that is durable on every copy when it returns.
type Writer<'a> = dyn Fn(&[u8], u64) + Sync + 'a;

/// Sequential 1 MiB writes: MiB/s.
fn sequential(write: &Writer<'_>) -> f64 {
    let chunk: Vec<u8> = (0..CHUNK).map(|index| (index * 31 % 251) as u8).collect();
    let started = Instant::now();
    for index in 0..SEQUENTIAL_BYTES / CHUNK as u64 {
        write(&chunk, index * CHUNK as u64);
    }
    SEQUENTIAL_BYTES as f64 / f64::from(1 << 20) / started.elapsed().as_secs_f64()
}

/// Sequential 1 MiB writes with `DEPTH` in flight: MiB/s.
fn sequential_in_flight(write: &Writer<'_>) -> f64 {
    let chunk: Vec<u8> = (0..CHUNK).map(|index| (index * 37 % 251) as u8).collect();
    let chunks = SEQUENTIAL_BYTES / CHUNK as u64;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for first in 0..DEPTH as u64 {
            let chunk = &chunk;
            scope.spawn(move || {
                for index in (first..chunks).step_by(DEPTH) {
                    write(chunk, index * CHUNK as u64);
                }
            });
        }
    });
    SEQUENTIAL_BYTES as f64 / f64::from(1 << 20) / started.elapsed().as_secs_f64()
}

/// 4 KiB writes at pseudo-random 4 KiB-aligned offsets in the first
/// `SEQUENTIAL_BYTES` (already written: overwrites): (p50, p99) in microseconds.
fn random(write: &Writer<'_>, seed: u64) -> (f64, f64) {
    let block = vec![0x5Au8; 4096];
    let mut state = seed | 1;
    let mut latencies: Vec<f64> = (0..RANDOM_WRITES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let offset = (state % (SEQUENTIAL_BYTES / 4096)) * 4096;
            let started = Instant::now();
            write(&block, offset);
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
}

/// Loopback TCP round trip of one byte, median of 2000, in microseconds.
fn loopback_rtt_us() -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).is_ok() {
            if stream.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut byte = [1u8; 1];
    let samples: Vec<f64> = (0..2000)
        .map(|_| {
            let started = Instant::now();
            stream.write_all(&byte).unwrap();
            stream.read_exact(&mut byte).unwrap();
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    drop(stream);
    echo.join().unwrap();
    median(samples)
}

fn engine_store(dir: &Path) -> Store {
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    for disk in 0..STRIPE_WIDTH {
        let capacity = 2u64 << 30;
        store
            .add_disk(&format!("d{disk}"), DiskSource::File { capacity })
            .unwrap();
    }
    store
}

fn engine_volume(store: &Store, name: &str) -> storage::Volume {
    store
        .create_volume(&VolumeSpec {
            name: name.into(),
            size: VOLUME_BYTES,
            stripe_unit: STRIPE_UNIT,
            stripe_width: STRIPE_WIDTH as usize,
            disks: vec![],
        })
        .unwrap()
}

/// A node volume with `replicas`, exported on the node's unix socket, as the backend
/// cairn-vmm attaches for a VM disk.
/// `socket_buffer`: what the backend's connections ask for (`nbd_client::SOCKET_BUFFER`
/// as cairn-vmm does, or 0 for the kernel's default: the `-kbuf` cases).
async fn node_backend(
    client: &mut NodeClient,
    name: &str,
    replicas: &[&Node],
    socket_buffer: usize,
) -> Arc<NbdBackend> {
    let create = Action::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: VOLUME_BYTES,
        stripe_width: STRIPE_WIDTH,
        stripe_unit_bytes: STRIPE_UNIT,
        replica_peers: replicas
            .iter()
            .map(|node| Peer {
                name: node.name.clone(),
                ..Default::default()
            })
            .collect(),
    });
    apply(client, format!("create-{name}"), create).await;
    let export = Action::ExportVolume(ExportVolume {
        name: name.into(),
        lifetime_seconds: 0,
        read_only: false,
    });
    let response = apply(client, format!("export-{name}"), export).await;
    let Some(ApplyResult::ExportVolume(export)) = response.result else {
        panic!("export failed: {response:?}");
    };
    let socket = PathBuf::from(export.socket_path);
    Arc::new(tokio::task::block_in_place(|| {
        NbdBackend::connect_with_buffer(&socket, name, false, socket_buffer)
            .expect("connect to the export")
    }))
}

/// The `cairn-vmm` the client node runs its VMs with (its own I/O is not measured: the
/// bench drives the node's disk socket itself), or why remote cases are skipped.
fn vmm_for_remote() -> Result<PathBuf, String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm is not usable".into());
    }
    if let Some(path) = std::env::var_os("CAIRN_VMM_BINARY") {
        return Ok(path.into());
    }
    // The newest build: an older one may not read this node's VM config.
    let directory = Path::new(env!("CARGO_BIN_EXE_cairn-node"))
        .parent()
        .unwrap();
    ["cairn-vmm", "../release/cairn-vmm", "../debug/cairn-vmm"]
        .iter()
        .map(|candidate| directory.join(candidate))
        .filter_map(|candidate| Some((candidate.metadata().ok()?.modified().ok()?, candidate)))
        .max()
        .map(|(_, candidate)| candidate)
        .ok_or_else(|| "cairn-vmm is not built (cargo build -p vmm)".into())
}

/// Volume `name` on `primary` (with `replicas`), its epoch naming `client` a client
/// (installed on the replicas, the client, then the writer), and VM `name` running on
/// `client` with it as its disk: the backend that VM's cairn-vmm has, on the client
/// node's socket, whose storage client forwards every request.
async fn remote_backend(
    signer: &RequestSigner,
    primary: &Node,
    replicas: &[&Node],
    client: &Node,
    name: &str,
) -> Result<Arc<NbdBackend>, String> {
    let mut on_primary = NodeClient::connect(&primary.address, signer.clone())
        .await
        .unwrap();
    let create = Action::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: VOLUME_BYTES,
        stripe_width: STRIPE_WIDTH,
        stripe_unit_bytes: STRIPE_UNIT,
        replica_peers: replicas.iter().map(|node| node.peer()).collect(),
    });
    apply(&mut on_primary, format!("create-{name}"), create).await;
    let in_sync: Vec<String> = std::iter::once(primary)
        .chain(replicas.iter().copied())
        .map(|node| node.name.clone())
        .collect();
    for node in replicas.iter().copied().chain([client, primary]) {
        let mut on_node = NodeClient::connect(&node.address, signer.clone())
            .await
            .unwrap();
        let epoch = Action::SetVolumeEpoch(SetVolumeEpoch {
            name: name.into(),
            epoch: 1,
            writer: primary.name.clone(),
            in_sync: in_sync.clone(),
            clients: vec![client.name.clone()],
        });
        apply(&mut on_node, format!("epoch-{name}"), epoch).await;
    }
    let mut on_client = NodeClient::connect(&client.address, signer.clone())
        .await
        .unwrap();
    let vm = Action::CreateVm(CreateVm {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 32 << 20,
        image: Some(Image::Builtin("cairn-guest".into())),
        volumes: vec![name.into()],
        ..Default::default()
    });
    apply(&mut on_client, format!("vm-{name}"), vm).await;
    let start = Action::StartVm(StartVm { name: name.into() });
    on_client
        .apply(proto::v1::ApplyRequest {
            request_id: format!("start-{name}"),
            action: Some(start),
        })
        .await
        .map_err(|status| format!("StartVm on {}: {}", client.name, status.message()))?;
    let socket = client.dir.join(format!("exports/vm-{name}-0.sock"));
    let backend = tokio::task::block_in_place(|| NbdBackend::connect(&socket, name, false))
        .map_err(|error| format!("connect to {}: {error}", socket.display()))?;
    Ok(Arc::new(backend))
}

async fn stop_vm(signer: &RequestSigner, node: &Node, name: &str) {
    let mut on_node = NodeClient::connect(&node.address, signer.clone())
        .await
        .unwrap();
    let stop = Action::StopVm(StopVm {
        name: name.into(),
        grace_ms: 1000,
    });
    apply(&mut on_node, format!("stop-{name}"), stop).await;
}

#[derive(Default)]
struct Figures {
    sequential: Vec<f64>,
    in_flight: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

impl Figures {
    fn run(&mut self, write: &Writer<'_>, seed: u64) {
        self.sequential.push(sequential(write));
        self.in_flight.push(sequential_in_flight(write));
        let (p50, p99) = random(write, seed);
        self.p50.push(p50);
        self.p99.push(p99);
    }

    /// Medians; NaN for a case that was skipped.
    fn medians(&self) -> (f64, f64, f64, f64) {
        if self.sequential.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
        }
        (
            median(self.sequential.clone()),
            median(self.in_flight.clone()),
            median(self.p50.clone()),
            median(self.p99.clone()),
        )
    }
}

fn main() {
    if std::env::args().any(|argument| argument == "--list") {
        return;
    }
    let (base, runtime, controller) = setup();
    let capacity = 2u64 << 30;
    // The nodes' loopback addresses: `CAIRN_BENCH_LOOPBACK=A,B,C` (a helper's own
    // range on a shared machine), else 127.0.0.73, .74 and .125.
    let loopback: Vec<String> = std::env::var("CAIRN_BENCH_LOOPBACK")
        .ok()
        .map(|list| {
            list.split(',')
                .map(|ip| format!("{}:0", ip.trim()))
                .collect()
        })
        .filter(|list: &Vec<String>| list.len() == 3)
        .unwrap_or_else(|| {
            ["127.0.0.73:0", "127.0.0.74:0", "127.0.0.125:0"]
                .map(String::from)
                .to_vec()
        });
    let primary = Node::start(
        "vd-a",
        &base.path().join("a"),
        &controller,
        &loopback[0],
        2,
        capacity,
    );
    let replica = Node::start(
        "vd-b",
        &base.path().join("b"),
        &controller,
        &loopback[1],
        2,
        capacity,
    );
    let remote = vmm_for_remote();
    let client_node = remote.as_ref().ok().map(|vmm| {
        let vmm = vmm.display().to_string();
        Node::start_with(
            "vd-c",
            &base.path().join("c"),
            &controller,
            &loopback[2],
            2,
            capacity,
            &["--vmm-binary", &vmm],
        )
    });
    let names = [
        "file",
        "engine-1copy",
        "node-1copy",
        "engine-2copies",
        "node-2copies",
        "remote-1copy",
        "remote-2copies",
        "node-1copy-kbuf",
        "node-2copies-kbuf",
    ];
    let mut figures: Vec<Figures> = names.iter().map(|_| Figures::default()).collect();
    // `CAIRN_BENCH_CASES=node-1copy,engine-1copy` runs only those cases (to profile one).
    let cases = std::env::var("CAIRN_BENCH_CASES").ok();
    let wanted = |index: usize| {
        cases
            .as_deref()
            .is_none_or(|list| list.split(',').any(|case| case.trim() == names[index]))
    };
    let rtt = loopback_rtt_us();
    let rounds = rounds();
    runtime.block_on(async {
        let signer = RequestSigner::new(controller.clone());
        match &client_node {
            Some(node) => push_peers(&[&primary, &replica, node], &signer).await,
            None => push_peers(&[&primary, &replica], &signer).await,
        }
        let mut client = NodeClient::connect(&primary.address, signer.clone())
            .await
            .unwrap();
        let stores = [
            engine_store(&base.path().join("engine-a")),
            engine_store(&base.path().join("engine-b")),
        ];
        for round in 0..rounds {
            let seed = round as u64 + 7;
            // Raw file.
            if wanted(0) {
                let path = base.path().join(format!("raw-{round}.img"));
                let file = std::fs::File::create(&path).unwrap();
                let write = |data: &[u8], offset: u64| {
                    file.write_all_at(data, offset).unwrap();
                    file.sync_data().unwrap();
                };
                figures[0].run(&write, seed);
                drop(file);
                let _ = std::fs::remove_file(&path);
            }
            // The engine in-process, 1 copy.
            if wanted(1) {
                let one = engine_volume(&stores[0], &format!("one-{round}"));
                figures[1].run(
                    &|data: &[u8], offset| {
                        one.write_at(offset, data).unwrap();
                    },
                    seed,
                );
            }
            // Through the node, 1 copy; then with the kernel's default socket buffer.
            for (index, buffer, name) in [(2usize, SOCKET_BUFFER, "one"), (7, 0, "onek")] {
                if wanted(index) {
                    let name = format!("{name}-{round}");
                    let backend = node_backend(&mut client, &name, &[], buffer).await;
                    tokio::task::block_in_place(|| {
                        figures[index].run(
                            &|data: &[u8], offset| backend.write_at(data, offset).unwrap(),
                            seed,
                        )
                    });
                }
            }
            // The engine in-process, 2 copies written in parallel.
            if wanted(3) {
                let copies = [
                    engine_volume(&stores[0], &format!("two-{round}")),
                    engine_volume(&stores[1], &format!("two-{round}")),
                ];
                let both = |data: &[u8], offset: u64| {
                    std::thread::scope(|scope| {
                        let other = scope.spawn(|| copies[1].write_at(offset, data).map(drop));
                        copies[0].write_at(offset, data).unwrap();
                        other.join().unwrap().unwrap();
                    });
                };
                figures[3].run(&both, seed);
            }
            // Through the node, 2 copies (the primary and a replica node); then with the
            // kernel's default socket buffer.
            for (index, buffer, name) in [(4usize, SOCKET_BUFFER, "two"), (8, 0, "twok")] {
                if wanted(index) {
                    let name = format!("{name}-{round}");
                    let backend = node_backend(&mut client, &name, &[&replica], buffer).await;
                    tokio::task::block_in_place(|| {
                        figures[index].run(
                            &|data: &[u8], offset| backend.write_at(data, offset).unwrap(),
                            seed,
                        )
                    });
                }
            }
            // Through a VM's disk on a node with no copy, 1 and 2 copies.
            if let Some(node) = &client_node {
                for (index, replicas) in [(5usize, &[][..]), (6, &[&replica][..])] {
                    if !wanted(index) {
                        continue;
                    }
                    let name = format!("r{}-{round}", index - 4);
                    let backend =
                        match remote_backend(&signer, &primary, replicas, node, &name).await {
                            Ok(backend) => backend,
                            Err(why) => {
                                println!("remote case {name} skipped: {why}");
                                continue;
                            }
                        };
                    tokio::task::block_in_place(|| {
                        figures[index].run(
                            &|data: &[u8], offset| backend.write_at(data, offset).unwrap(),
                            seed,
                        )
                    });
                    drop(backend);
                    stop_vm(&signer, node, &name).await;
                }
            }
        }
    });
    println!(
        "VM disk data path, {rounds} rounds, medians; sequential: {} MiB in 1 MiB writes, one at a time (qd1) and {DEPTH} in flight (qd{DEPTH}); random: {RANDOM_WRITES} 4 KiB overwrites one at a time; volumes {STRIPE_WIDTH} × {} MiB stripes; every write durable on every copy when it returns",
        SEQUENTIAL_BYTES >> 20,
        STRIPE_UNIT >> 20
    );
    println!("loopback round trip (1-byte TCP ping-pong, median): {rtt:.1} us");
    println!(
        "{:<16} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "case",
        "qd1 MiB/s",
        "qd4 MiB/s",
        "p50 us",
        "p99 us",
        "qd1/engine",
        "qd4/engine",
        "p50/engine"
    );
    let medians: Vec<(f64, f64, f64, f64)> = figures.iter().map(Figures::medians).collect();
    for (index, name) in names.iter().enumerate() {
        let (speed, in_flight, p50, p99) = medians[index];
        if speed.is_nan() {
            println!("{name:<16} skipped");
            continue;
        }
        let engine = if name.contains("2copies") {
            medians[3]
        } else {
            medians[1]
        };
        println!(
            "{name:<16} {speed:>10.1} {in_flight:>10.1} {p50:>9.0} {p99:>9.0} {:>9.2}× {:>9.2}× {:>9.2}×",
            speed / engine.0,
            in_flight / engine.1,
            p50 / engine.2
        );
    }
    let met = |ratio: f64| if ratio >= 0.7 { "met" } else { "NOT met" };
    for (node, engine, replicas) in [(2usize, 1usize, 0u32), (4, 3, 1)] {
        let (speed, in_flight, p50, _) = medians[node];
        let (engine_speed, engine_in_flight, engine_p50, _) = medians[engine];
        let p50_budget = 2.0 * engine_p50 + f64::from(replicas) * rtt;
        println!(
            "budget {}: throughput qd1 {:.2}× ({}), qd{DEPTH} {:.2}× ({}) (≥ 0.70×), p50 {p50:.0} us vs 2 × {engine_p50:.0} + {replicas} × {rtt:.0} = {p50_budget:.0} us ({})",
            names[node],
            speed / engine_speed,
            met(speed / engine_speed),
            in_flight / engine_in_flight,
            met(in_flight / engine_in_flight),
            if p50 < p50_budget { "met" } else { "NOT met" },
        );
    }
    // The socket buffer: cairn-vmm's against the kernel's default, the same path.
    for (node, default) in [(2usize, 7usize), (4, 8)] {
        let (speed, in_flight, p50, _) = medians[node];
        let (kernel_speed, kernel_in_flight, kernel_p50, _) = medians[default];
        if speed.is_nan() || kernel_speed.is_nan() {
            continue;
        }
        println!(
            "{} vs {}: throughput qd1 {:.2}×, qd{DEPTH} {:.2}×; p50 {:.2}×",
            names[node],
            names[default],
            speed / kernel_speed,
            in_flight / kernel_in_flight,
            p50 / kernel_p50
        );
    }
    // Remote data: the same number of copies, through a node without a copy.
    for (remote, local) in [(5usize, 2usize), (6, 4)] {
        let (speed, in_flight, p50, p99) = medians[remote];
        let (local_speed, local_in_flight, local_p50, local_p99) = medians[local];
        if speed.is_nan() {
            continue;
        }
        println!(
            "{} vs {}: throughput qd1 {:.2}×, qd{DEPTH} {:.2}×; p50 {:.2}× (+{:.0} us), p99 {:.2}×",
            names[remote],
            names[local],
            speed / local_speed,
            in_flight / local_in_flight,
            p50 / local_p50,
            p50 - local_p50,
            p99 / local_p99
        );
    }
    if let Err(why) = &remote {
        println!("remote cases skipped: {why}");
    }
}
