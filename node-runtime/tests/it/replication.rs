//! Three nodes serving a replicated, striped volume: qemu-img over NBD, and kill -9
//! during a stream of writes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proto::auth::Identity;
use proto::client::NodeClient;
use proto::v1::{
    CreateVolume, ExportVolume, Health, Peer, ReadVolumeRequest, SetPeers, WriteVolume,
    apply_request::Action, apply_response::Result as ApplyResult,
};

use crate::harness::{TestNode, apply_ok, controller, pattern, request};

const VOLUME_BYTES: u64 = 32 << 20;

/// Three nodes that trust each other as peers.
fn cluster(base: &Path, controller: &Identity, prefix: &str) -> Vec<TestNode> {
    ["a", "b", "c"]
        .iter()
        .map(|suffix| {
            TestNode::start(
                &format!("{prefix}-{suffix}"),
                &base.join(suffix),
                controller,
            )
        })
        .collect()
}

pub(crate) async fn push_peers(nodes: &[TestNode], controller: &Identity) {
    let peers: Vec<Peer> = nodes
        .iter()
        .map(|node| Peer {
            name: node.name.clone(),
            address: node.address.clone(),
            public_key_hex: node.public_key_hex(),
        })
        .collect();
    for node in nodes {
        let mut client = node.client(controller).await;
        apply_ok(
            &mut client,
            "peers",
            Action::SetPeers(SetPeers {
                peers: peers.clone(),
            }),
        )
        .await;
    }
}

fn create_replicated(name: &str, replicas: &[&TestNode]) -> Action {
    Action::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: VOLUME_BYTES,
        stripe_width: 4,
        stripe_unit_bytes: 64 << 10,
        replica_peers: replicas
            .iter()
            .map(|node| Peer {
                name: node.name.clone(),
                address: String::new(),
                public_key_hex: String::new(),
            })
            .collect(),
    })
}

async fn read_all(client: &mut NodeClient, name: &str, length: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(length as usize);
    let mut offset = 0;
    while offset < length {
        let chunk = (length - offset).min(4 << 20);
        out.extend(
            client
                .read_volume(ReadVolumeRequest {
                    name: name.into(),
                    offset,
                    length: chunk,
                })
                .await
                .unwrap(),
        );
        offset += chunk;
    }
    out
}

fn qemu_img(args: &[&str]) {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        output.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_serve_a_replicated_striped_volume_that_qemu_img_reads_and_writes_byte_exactly()
{
    if !have_qemu_img() {
        eprintln!("skipping: qemu-img is not installed (apt-get install qemu-utils)");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let nodes = cluster(base.path(), &controller, "q");
    push_peers(&nodes, &controller).await;
    let mut primary = nodes[0].client(&controller).await;
    let created = apply_ok(
        &mut primary,
        "create",
        create_replicated("disk", &[&nodes[1], &nodes[2]]),
    )
    .await;
    let Some(ApplyResult::Volume(volume)) = created.result else {
        panic!("unexpected result {created:?}");
    };
    assert_eq!(volume.replica_peers, ["q-b", "q-c"]);

    let exported = apply_ok(
        &mut primary,
        "export",
        Action::ExportVolume(ExportVolume {
            name: "disk".into(),
            lifetime_seconds: 0,
            read_only: false,
        }),
    )
    .await;
    let Some(ApplyResult::ExportVolume(export)) = exported.result else {
        panic!("unexpected result {exported:?}");
    };
    assert!(
        export.uri.starts_with("nbd+unix:///disk?socket=") && export.uri.ends_with("/disk.sock"),
        "{}",
        export.uri
    );

    // An image that is not a multiple of the stripe unit and starts mid-volume data.
    let image_bytes = pattern(42, (5 << 20) + 12288);
    let source = base.path().join("source.img");
    std::fs::write(&source, &image_bytes).unwrap();
    qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        source.to_str().unwrap(),
        &export.uri,
    ]);

    let readback = base.path().join("readback.img");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &export.uri,
        readback.to_str().unwrap(),
    ]);
    let read = std::fs::read(&readback).unwrap();
    assert_eq!(read.len() as u64, VOLUME_BYTES);
    assert!(
        read[..image_bytes.len()] == image_bytes[..],
        "qemu-img reads back what it wrote"
    );
    assert!(
        read[image_bytes.len()..].iter().all(|byte| *byte == 0),
        "the rest of the thin volume reads as zeros"
    );
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        source.to_str().unwrap(),
        &export.uri,
    ]);

    // Every replica holds the same bytes: the NBD writes went through replication.
    for node in &nodes[1..] {
        let mut client = node.client(&controller).await;
        let replica = read_all(&mut client, "disk", image_bytes.len() as u64).await;
        assert!(replica == image_bytes, "replica on {} differs", node.name);
    }
    let observed = primary.observe().await.unwrap();
    let status = observed
        .volumes
        .iter()
        .find(|volume| volume.name == "disk")
        .unwrap();
    assert_eq!(status.health, Health::Healthy as i32);
    assert_eq!(status.export_uri, export.uri);
}

fn write_action(index: u64) -> Action {
    Action::WriteVolume(WriteVolume {
        name: "log".into(),
        offset: index * (64 << 10),
        data: pattern(1000 + index, 64 << 10),
    })
}

/// What a writer has seen so far.
#[derive(Default)]
struct Progress {
    acked: BTreeMap<u64, ()>,
    refused: usize,
}

type Shared = std::sync::Arc<std::sync::Mutex<Progress>>;

/// Writes `range` one by one (each with its own request id) until the range ends or
/// `stop` is set, recording acknowledged indices. Refused writes (a node is down) are
/// not acknowledged and the writer moves on.
async fn write_stream(
    address: String,
    controller: Identity,
    range: std::ops::Range<u64>,
    progress: Shared,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let signer = proto::auth::RequestSigner::new(controller);
    let mut client = NodeClient::connect_lazy(&address, signer).unwrap();
    for index in range {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let result = client
            .apply(request(&format!("w-{index}"), write_action(index)))
            .await;
        let refused = {
            let mut progress = progress.lock().unwrap();
            match result {
                Ok(_) => {
                    progress.acked.insert(index, ());
                    false
                }
                Err(_) => {
                    progress.refused += 1;
                    true
                }
            }
        };
        if refused {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until the writer has `count` acknowledged writes (or 30 s pass).
async fn wait_for_acks(progress: &Shared, count: usize) {
    for _ in 0..3000 {
        if progress.lock().unwrap().acked.len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("writes did not reach {count} acknowledgements within 30 s");
}

/// One round: start writing `range`, kill -9 the node at `victim` once writes flow,
/// restart it at the same address, let writes flow again, stop. Returns the progress.
async fn crash_round(
    nodes: &mut [TestNode],
    victim: usize,
    base: &Path,
    controller: &Identity,
    range: std::ops::Range<u64>,
) -> Progress {
    let progress: Shared = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(write_stream(
        nodes[0].address.clone(),
        controller.clone(),
        range,
        progress.clone(),
        stop.clone(),
    ));
    wait_for_acks(&progress, 10).await;
    nodes[victim].kill_9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let name = nodes[victim].name.clone();
    let address = nodes[victim].address.clone();
    let suffix = ["a", "b", "c"][victim];
    nodes[victim] = TestNode::start_at(&name, &base.join(suffix), &address);
    let before = progress.lock().unwrap().acked.len();
    wait_for_acks(&progress, before + 10).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    std::sync::Arc::try_unwrap(progress)
        .ok()
        .expect("writer finished")
        .into_inner()
        .unwrap()
}

async fn wait_until_healthy(client: &mut NodeClient, volume: &str) {
    for _ in 0..300 {
        if let Ok(observed) = client.observe().await
            && observed
                .volumes
                .iter()
                .any(|status| status.name == volume && status.health == Health::Healthy as i32)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("volume {volume} did not become healthy within 30 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_writes_loses_no_acknowledged_write() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut nodes = cluster(base.path(), &controller, "k");
    push_peers(&nodes, &controller).await;
    {
        let mut primary = nodes[0].client(&controller).await;
        apply_ok(
            &mut primary,
            "create",
            create_replicated("log", &[&nodes[1], &nodes[2]]),
        )
        .await;
    }
    // Round 1: kill -9 a replica in the middle of a stream of writes; round 2: the
    // primary. Each round waits for writes to flow before the kill and after the restart.
    // While the replica is down the primary's writes freeze (nothing is acknowledged
    // without every in-sync copy, and no controller removes it here); they resume when
    // it is back, or fail after the freeze bound (30 s): no count is asserted.
    let round_1 = crash_round(&mut nodes, 1, base.path(), &controller, 0..250).await;
    let round_2 = crash_round(&mut nodes, 0, base.path(), &controller, 250..500).await;
    assert!(
        round_2.refused > 0,
        "writes were refused while the primary was down"
    );
    let mut acked = round_1.acked;
    acked.extend(round_2.acked);
    let highest = acked.keys().next_back().copied().unwrap_or(0);

    let mut primary = nodes[0].client(&controller).await;
    wait_until_healthy(&mut primary, "log").await;
    let length = (highest + 1) * (64 << 10);
    let mut copies = Vec::new();
    for node in &nodes {
        let mut client = node.client(&controller).await;
        copies.push((
            node.name.clone(),
            read_all(&mut client, "log", length).await,
        ));
    }
    for index in acked.keys() {
        let expected = pattern(1000 + index, 64 << 10);
        let range = (*index as usize * (64 << 10))..((*index as usize + 1) * (64 << 10));
        for (name, copy) in &copies {
            assert!(
                copy[range.clone()] == expected[..],
                "acknowledged write {index} missing on {name}"
            );
        }
    }
    // After resynchronisation the copies agree everywhere, unacknowledged regions too.
    for (name, copy) in &copies[1..] {
        assert!(
            copy == &copies[0].1,
            "replica {name} differs from the primary after resync"
        );
    }
}

/// Flips one byte of the block holding `offset` of `volume` in a stopped node's engine.
fn corrupt_block(data_dir: &Path, volume: &str, offset: u64) {
    let store =
        storage::Store::open(data_dir.join("volumes"), storage::StoreOptions::default()).unwrap();
    let location = store
        .volume(volume)
        .unwrap()
        .locate(offset)
        .unwrap()
        .expect("block is allocated");
    drop(store);
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&location.path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, location.physical_offset + 17)
        .unwrap();
    byte[0] ^= 0xff;
    file.write_all_at(&byte, location.physical_offset + 17)
        .unwrap();
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_blocks_are_repaired_from_the_other_copies() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut nodes: Vec<TestNode> = ["a", "b"]
        .iter()
        .map(|suffix| {
            TestNode::start(
                &format!("r-{suffix}"),
                &base.path().join(suffix),
                &controller,
            )
        })
        .collect();
    push_peers(&nodes, &controller).await;
    let data = pattern(7, 64 << 10);
    {
        let mut primary = nodes[0].client(&controller).await;
        apply_ok(
            &mut primary,
            "create",
            create_replicated("mirrored", &[&nodes[1]]),
        )
        .await;
        let solo = Action::CreateVolume(CreateVolume {
            name: "solo".into(),
            size_bytes: 1 << 20,
            stripe_width: 1,
            stripe_unit_bytes: 64 << 10,
            replica_peers: vec![],
        });
        apply_ok(&mut primary, "create-solo", solo).await;
        for volume in ["mirrored", "solo"] {
            let write = Action::WriteVolume(WriteVolume {
                name: volume.into(),
                offset: 0,
                data: data.clone(),
            });
            apply_ok(&mut primary, &format!("write-{volume}"), write).await;
        }
    }
    assert_eq!(nodes[0].terminate(), Some(0));
    assert_eq!(nodes[1].terminate(), Some(0));
    // Different blocks go bad on the primary and on the replica: each copy repairs
    // its block from the other.
    corrupt_block(&base.path().join("a"), "mirrored", 8192);
    corrupt_block(&base.path().join("a"), "solo", 8192);
    corrupt_block(&base.path().join("b"), "mirrored", 32768);
    for (index, suffix) in ["a", "b"].iter().enumerate() {
        let address = nodes[index].address.clone();
        nodes[index] =
            TestNode::start_at(&format!("r-{suffix}"), &base.path().join(suffix), &address);
    }
    let mut primary = nodes[0].client(&controller).await;
    let mut replica = nodes[1].client(&controller).await;

    let read = |name: &str| ReadVolumeRequest {
        name: name.into(),
        offset: 0,
        length: 64 << 10,
    };
    assert!(
        primary.read_volume(read("mirrored")).await.unwrap() == data,
        "the primary's bad block is repaired from the replica"
    );
    assert!(
        replica.read_volume(read("mirrored")).await.unwrap() == data,
        "the replica's bad block is repaired from the primary"
    );
    for client in [&mut primary, &mut replica] {
        assert!(
            client.read_volume(read("mirrored")).await.unwrap() == data,
            "repairs are persistent"
        );
    }
    let unrepairable = primary.read_volume(read("solo")).await.unwrap_err();
    assert_eq!(
        unrepairable.code(),
        tonic::Code::DataLoss,
        "{unrepairable:?}"
    );
    assert!(
        unrepairable.message().contains("checksum mismatch"),
        "{}",
        unrepairable.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_replica_refuses_creation_and_writes_naming_the_peer() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut nodes: Vec<TestNode> = ["a", "b"]
        .iter()
        .map(|suffix| {
            TestNode::start(
                &format!("u-{suffix}"),
                &base.path().join(suffix),
                &controller,
            )
        })
        .collect();
    push_peers(&nodes, &controller).await;
    let mut primary = nodes[0].client(&controller).await;

    // Creation with a peer nobody listens at fails and leaves nothing behind.
    let nowhere = Action::CreateVolume(CreateVolume {
        name: "lost".into(),
        size_bytes: 1 << 20,
        stripe_width: 1,
        stripe_unit_bytes: 64 << 10,
        replica_peers: vec![Peer {
            name: "ghost".into(),
            address: "127.0.0.1:1".into(),
            public_key_hex: String::new(),
        }],
    });
    let refused = primary.apply(request("lost", nowhere)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("ghost"), "{}", refused.message());
    apply_ok(
        &mut primary,
        "delete-lost",
        Action::DeleteVolume(proto::v1::DeleteVolume {
            name: "lost".into(),
        }),
    )
    .await;
    assert!(primary.observe().await.unwrap().volumes.is_empty());

    // With the replica down, writes are refused and the volume reports degraded.
    apply_ok(
        &mut primary,
        "create",
        create_replicated("vol", &[&nodes[1]]),
    )
    .await;
    nodes[1].kill_9();
    let write = Action::WriteVolume(WriteVolume {
        name: "vol".into(),
        offset: 0,
        data: pattern(3, 4096),
    });
    let refused = primary.apply(request("w-down", write)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("u-b"), "{}", refused.message());
    let observed = primary.observe().await.unwrap();
    assert_eq!(observed.volumes[0].health, Health::Degraded as i32);
    assert!(
        observed.volumes[0].detail.contains("u-b"),
        "{}",
        observed.volumes[0].detail
    );
}
