//! Writes to one volume in flight at once (issue 15, item 8): many overlapping NBD writes
//! pipelined on several connections to a replicated volume's export, checked against a
//! model on every copy, then a power cut of both nodes (`storage::power_loss`: every
//! write their volume stores had not synced is discarded) loses none of them. Nodes on
//! 127.0.0.151-152.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use proto::auth::Identity;
use proto::client::NodeClient;
use proto::v1::{
    CreateVolume, ExportVolume, ReadVolumeRequest, apply_request::Action,
    apply_response::Result as ApplyResult,
};

use crate::harness::{TestNode, apply_ok, controller};
use crate::lab::{peer_of, push_peers};

const VOLUME_BYTES: u64 = 16 << 20;
const BLOCK: u64 = 4096;
/// Connections writing at once, each in its own region and all in the shared one.
const CONNECTIONS: u64 = 4;
/// Writes per connection.
const WRITES: u64 = 150;
/// Requests a connection keeps in flight.
const WINDOW: usize = 16;
/// Each connection's own region (overlapping writes of one connection: exact order).
const OWN_REGION: u64 = 256 << 10;
/// The region every connection writes (overlapping writes of several connections).
const SHARED_AT: u64 = 8 << 20;
const SHARED_REGION: u64 = 128 << 10;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

fn u32_of(stream: &mut UnixStream) -> u32 {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes).unwrap();
    u32::from_be_bytes(bytes)
}

fn u64_of(stream: &mut UnixStream) -> u64 {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes).unwrap();
    u64::from_be_bytes(bytes)
}

/// A raw NBD client (simple replies) that keeps several requests in flight.
struct Pipelined {
    stream: UnixStream,
}

impl Pipelined {
    fn connect(socket: &Path, export: &str) -> Pipelined {
        let mut stream = UnixStream::connect(socket).unwrap();
        assert_eq!(u64_of(&mut stream), NBDMAGIC);
        assert_eq!(u64_of(&mut stream), IHAVEOPT);
        let mut handshake_flags = [0u8; 2];
        stream.read_exact(&mut handshake_flags).unwrap();
        // Fixed newstyle, no zeroes.
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        let mut go = (export.len() as u32).to_be_bytes().to_vec();
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        stream.write_all(&OPT_GO.to_be_bytes()).unwrap();
        stream.write_all(&(go.len() as u32).to_be_bytes()).unwrap();
        stream.write_all(&go).unwrap();
        loop {
            let _magic = u64_of(&mut stream);
            let _option = u32_of(&mut stream);
            let reply = u32_of(&mut stream);
            let length = u32_of(&mut stream);
            let mut data = vec![0u8; length as usize];
            stream.read_exact(&mut data).unwrap();
            assert!(reply < 1 << 31, "NBD_OPT_GO refused: {reply:#x}");
            if reply == REP_ACK {
                break;
            }
        }
        Pipelined { stream }
    }

    fn send(&mut self, command: u16, handle: u64, offset: u64, length: u32, data: &[u8]) {
        let mut header = Vec::with_capacity(28 + data.len());
        header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&command.to_be_bytes());
        header.extend_from_slice(&handle.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(data);
        self.stream.write_all(&header).unwrap();
    }

    /// Writes every `(offset, data)` in order with up to [`WINDOW`] in flight, then a
    /// flush; panics on an error reply. Returns the handles in the order their replies
    /// came (they need not come in request order).
    fn write_all(&mut self, writes: &[(u64, Vec<u8>)]) -> Vec<u64> {
        let mut reader = self.stream.try_clone().unwrap();
        let total = writes.len() + 1;
        let (sent, in_flight) = mpsc::sync_channel::<()>(WINDOW);
        let replies = std::thread::spawn(move || {
            let mut order = Vec::new();
            for _ in 0..total {
                assert_eq!(u32_of(&mut reader), SIMPLE_REPLY_MAGIC);
                let error = u32_of(&mut reader);
                let handle = u64_of(&mut reader);
                assert_eq!(error, 0, "request {handle} failed with errno {error}");
                order.push(handle);
                let _ = in_flight.recv();
            }
            order
        });
        for (index, (offset, data)) in writes.iter().enumerate() {
            sent.send(()).unwrap();
            self.send(CMD_WRITE, index as u64, *offset, data.len() as u32, data);
        }
        sent.send(()).unwrap();
        self.send(CMD_FLUSH, u64::MAX, 0, 0, &[]);
        let order = replies.join().unwrap();
        assert_eq!(
            order.last(),
            Some(&u64::MAX),
            "the flush is answered after every write sent before it"
        );
        order
    }

    fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        self.send(CMD_READ, 1, offset, length, &[]);
        assert_eq!(u32_of(&mut self.stream), SIMPLE_REPLY_MAGIC);
        assert_eq!(u32_of(&mut self.stream), 0, "read at {offset} failed");
        assert_eq!(u64_of(&mut self.stream), 1);
        let mut data = vec![0u8; length as usize];
        self.stream.read_exact(&mut data).unwrap();
        data
    }
}

/// xorshift, so every run writes the same requests.
struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// Block-aligned data whose every 4 KiB block says which write it came from.
fn tagged(connection: u64, index: u64, blocks: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity((blocks * BLOCK) as usize);
    for block in 0..blocks {
        let tag = (connection << 48) | (index << 16) | block;
        for word in 0..BLOCK / 8 {
            data.extend_from_slice(&(tag ^ (word << 56)).to_le_bytes());
        }
    }
    data
}

/// Connection `c`'s writes: overlapping ones in its own region, and some in the shared
/// region.
fn writes_of(connection: u64) -> Vec<(u64, Vec<u8>)> {
    let mut random = Random(0x9E37_79B9_7F4A_7C15 ^ (connection + 1));
    (0..WRITES)
        .map(|index| {
            let blocks = 1 + random.below(16);
            let (base, region) = if index % 3 == 2 {
                (SHARED_AT, SHARED_REGION)
            } else {
                (connection * (1 << 20), OWN_REGION)
            };
            let offset = base + random.below(region / BLOCK - blocks) * BLOCK;
            (offset, tagged(connection, index, blocks))
        })
        .collect()
}

/// What the volume must hold: the own regions exactly (one connection's overlapping
/// writes keep their order), and for every block of the shared region the set of
/// contents some write left there.
struct Model {
    exact: BTreeMap<u64, Vec<u8>>,
    shared: BTreeMap<u64, Vec<Vec<u8>>>,
}

impl Model {
    fn of(all: &[Vec<(u64, Vec<u8>)>]) -> Model {
        let mut model = Model {
            exact: BTreeMap::new(),
            shared: BTreeMap::new(),
        };
        for writes in all {
            for (offset, data) in writes {
                for (index, block) in data.chunks(BLOCK as usize).enumerate() {
                    let at = offset + index as u64 * BLOCK;
                    if at >= SHARED_AT {
                        model.shared.entry(at).or_default().push(block.to_vec());
                    } else {
                        model.exact.insert(at, block.to_vec());
                    }
                }
            }
        }
        model
    }

    /// Panics naming the first block of `image` (the volume from 0) that breaks it.
    fn check(&self, image: &[u8], copy: &str) {
        for (at, expected) in &self.exact {
            let got = &image[*at as usize..(*at + BLOCK) as usize];
            assert!(
                got == expected.as_slice(),
                "{copy}: block at {at} is not the last write of its connection there"
            );
        }
        for (at, candidates) in &self.shared {
            let got = &image[*at as usize..(*at + BLOCK) as usize];
            assert!(
                candidates
                    .iter()
                    .any(|candidate| candidate.as_slice() == got),
                "{copy}: block at {at} holds no write's data"
            );
        }
    }
}

fn undo_log(dir: &Path) -> PathBuf {
    dir.with_extension("power-loss")
}

fn start(name: &str, dir: &Path, controller: &Identity, ip: &str) -> TestNode {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("trusted-controllers"),
        format!("{} test-controller\n", controller.public_key_hex()),
    )
    .unwrap();
    let undo = undo_log(dir);
    TestNode::start_with_env(
        name,
        dir,
        &format!("{ip}:0"),
        &["--disks", "2", "--disk-capacity", "134217728"],
        &[(storage::power_loss::ENV, undo.to_str().unwrap())],
    )
}

/// The whole volume as a copy's `ReadVolume` returns it (4 MiB at a time).
async fn read_copy(client: &mut NodeClient) -> Vec<u8> {
    let mut image = Vec::with_capacity(VOLUME_BYTES as usize);
    for offset in (0..VOLUME_BYTES).step_by(4 << 20) {
        let read = client
            .read_volume(ReadVolumeRequest {
                name: "q".into(),
                offset,
                length: 4 << 20,
            })
            .await
            .unwrap();
        image.extend_from_slice(&read);
    }
    image
}

async fn export(client: &mut NodeClient, id: &str) -> PathBuf {
    let response = apply_ok(
        client,
        id,
        Action::ExportVolume(ExportVolume {
            name: "q".into(),
            lifetime_seconds: 0,
            read_only: false,
        }),
    )
    .await;
    let Some(ApplyResult::ExportVolume(export)) = response.result else {
        panic!("unexpected result {response:?}");
    };
    PathBuf::from(export.socket_path)
}

fn read_nbd(socket: &Path) -> Vec<u8> {
    let mut connection = Pipelined::connect(socket, "q");
    let mut image = Vec::with_capacity(VOLUME_BYTES as usize);
    for offset in (0..VOLUME_BYTES).step_by(1 << 20) {
        image.extend(connection.read(offset, 1 << 20));
    }
    image
}

#[tokio::test(flavor = "multi_thread")]
async fn overlapping_nbd_writes_in_flight_keep_their_order_on_every_copy_and_survive_a_power_cut() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut primary = start("wq-a", &base.path().join("a"), &controller, "127.0.0.151");
    let mut replica = start("wq-b", &base.path().join("b"), &controller, "127.0.0.152");
    push_peers(&[&primary, &replica], &controller).await;
    let mut client = primary.client(&controller).await;
    apply_ok(
        &mut client,
        "create-q",
        Action::CreateVolume(CreateVolume {
            name: "q".into(),
            size_bytes: VOLUME_BYTES,
            stripe_width: 2,
            stripe_unit_bytes: 64 << 10,
            replica_peers: vec![peer_of(&replica)],
        }),
    )
    .await;
    let socket = export(&mut client, "export-q").await;

    let all: Vec<Vec<(u64, Vec<u8>)>> = (0..CONNECTIONS).map(writes_of).collect();
    let started = Instant::now();
    let reordered = {
        let socket = socket.clone();
        let all = all.clone();
        tokio::task::spawn_blocking(move || {
            std::thread::scope(|scope| {
                let workers: Vec<_> = all
                    .iter()
                    .map(|writes| {
                        let socket = &socket;
                        scope.spawn(move || Pipelined::connect(socket, "q").write_all(writes))
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|worker| {
                        let order = worker.join().unwrap();
                        order.windows(2).filter(|pair| pair[0] > pair[1]).count()
                    })
                    .sum::<usize>()
            })
        })
        .await
        .unwrap()
    };
    eprintln!(
        "{} writes on {CONNECTIONS} connections, {WINDOW} in flight each: {:?}; {reordered} replies came before an earlier request's",
        CONNECTIONS * WRITES,
        started.elapsed()
    );
    assert!(
        reordered > 0,
        "replies always came in request order: the requests were not in flight at once"
    );

    let model = Model::of(&all);
    let through_nbd = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || read_nbd(&socket)
    })
    .await
    .unwrap();
    model.check(&through_nbd, "primary (NBD)");
    let mut replica_client = replica.client(&controller).await;
    let on_replica = read_copy(&mut replica_client).await;
    model.check(&on_replica, "replica");
    assert!(
        on_replica == through_nbd,
        "the copies differ: overlapping writes were applied in another order on one of them"
    );

    // A power cut of both nodes loses no acknowledged write.
    for node in [&mut primary, &mut replica] {
        node.kill_9();
        let cut = storage::power_loss::cut(&undo_log(&node.data_dir)).unwrap();
        eprintln!(
            "power cut of {}: {} unsynced writes discarded ({} bytes)",
            node.name, cut.writes_discarded, cut.bytes_restored
        );
    }
    let primary = start("wq-a", &base.path().join("a"), &controller, "127.0.0.151");
    let replica = start("wq-b", &base.path().join("b"), &controller, "127.0.0.152");
    // Each copy is read where it is (no replication needed).
    let mut client = primary.client(&controller).await;
    let after = read_copy(&mut client).await;
    assert!(
        after == through_nbd,
        "the primary lost acknowledged writes in the power cut"
    );
    // The export was kept: the same socket serves the same bytes again.
    let again = tokio::task::spawn_blocking(move || read_nbd(&socket))
        .await
        .unwrap();
    assert!(
        again == through_nbd,
        "the export after the restart reads other bytes"
    );
    let mut replica_client = replica.client(&controller).await;
    assert!(
        read_copy(&mut replica_client).await == after,
        "the replica lost acknowledged writes in the power cut"
    );
}
