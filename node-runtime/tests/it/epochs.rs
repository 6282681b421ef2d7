//! Volume epochs as fencing, and the write semantics built on them (issue 15): real
//! `cairn-node`s on 127.0.0.111-113 and the controller's epoch authority
//! (`reconciler::epochs`, in a real state store): each controller step observes the
//! reachable nodes, lets `react` decide and sends its signed `SetVolumeEpoch`s. The
//! stale-epoch test sends its (mostly refused) installs by hand.

use std::path::Path;
use std::time::{Duration, Instant};

use proto::auth::Identity;
use proto::client::NodeClient;
use proto::v1::{
    CreateVolume, ReadVolumeRequest, ReplicaReadRequest, ReplicaWriteRequest, SetVolumeEpoch,
    VolumeStatus, WriteVolume, apply_request::Action, apply_response::Result as ApplyResult,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern, request};
use crate::lab::{client_as, peer_of, push_peers};

pub(crate) const VOLUME_BYTES: u64 = 32 << 20;
pub(crate) const CHUNK: u64 = 64 << 10;

pub(crate) fn start(
    name: &str,
    dir: &Path,
    controller: &Identity,
    listen: &str,
    env: &[(&str, &str)],
) -> TestNode {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("trusted-controllers"),
        format!("{} test-controller\n", controller.public_key_hex()),
    )
    .unwrap();
    // Every node's volume store records what a power cut would lose (debug builds).
    let undo = undo_log(dir);
    let mut env = env.to_vec();
    env.push((storage::power_loss::ENV, undo.to_str().unwrap()));
    TestNode::start_with_env(
        name,
        dir,
        listen,
        &["--disks", "2", "--disk-capacity", "268435456"],
        &env,
    )
}

/// One step of the controller: observe the reachable `nodes`, let the epoch authority
/// react, send what it decided. Returns the epoch changes it made.
pub(crate) async fn controller_step(
    authority: &reconciler::epochs::EpochAuthority<'_>,
    nodes: &[&TestNode],
    controller: &Identity,
) -> Vec<reconciler::epochs::VolumeEpoch> {
    let mut observed = Vec::new();
    for node in nodes {
        let mut client = node.client(controller).await;
        observed.push((node.name.clone(), client.observe().await.unwrap().volumes));
    }
    let reaction = reconciler::epochs::react(authority, &observed).unwrap();
    for install in &reaction.installs {
        let node = nodes.iter().find(|node| node.name == install.node).unwrap();
        let mut client = node.client(controller).await;
        client
            .apply(request(
                &install.request_id,
                Action::SetVolumeEpoch(install.request.clone()),
            ))
            .await
            .unwrap_or_else(|status| panic!("install on {}: {status:?}", node.name));
    }
    reaction.changes
}

fn undo_log(dir: &Path) -> std::path::PathBuf {
    dir.with_extension("power-loss")
}

/// kill -9 as a power cut: the node dies, then every write its volume store had not
/// synced is discarded (`storage::power_loss`).
pub(crate) fn power_cut(node: &mut TestNode) {
    node.kill_9();
    let cut = storage::power_loss::cut(&undo_log(&node.data_dir)).unwrap();
    eprintln!(
        "power cut of {}: {} unsynced writes discarded ({} bytes restored)",
        node.name, cut.writes_discarded, cut.bytes_restored
    );
}

/// ep-a (primary) with replicas ep-b and ep-c, volume `v`.
async fn cluster(base: &Path, controller: &Identity, env: &[(&str, &str)]) -> Vec<TestNode> {
    let names = [("ep-a", "111"), ("ep-b", "112"), ("ep-c", "113")];
    cluster_of(base, controller, env, &names).await
}

/// `names` (name, last byte of its 127.0.0.X address): the first is the primary of
/// volume `v`, the others its replicas.
pub(crate) async fn cluster_of(
    base: &Path,
    controller: &Identity,
    env: &[(&str, &str)],
    names: &[(&str, &str)],
) -> Vec<TestNode> {
    let nodes: Vec<TestNode> = names
        .iter()
        .map(|(name, ip)| {
            start(
                name,
                &base.join(name),
                controller,
                &format!("127.0.0.{ip}:0"),
                env,
            )
        })
        .collect();
    push_peers(&nodes.iter().collect::<Vec<_>>(), controller).await;
    let mut primary = nodes[0].client(controller).await;
    apply_ok(
        &mut primary,
        "create-v",
        Action::CreateVolume(CreateVolume {
            name: "v".into(),
            size_bytes: VOLUME_BYTES,
            stripe_width: 2,
            stripe_unit_bytes: 1 << 20,
            replica_peers: nodes[1..].iter().map(peer_of).collect(),
        }),
    )
    .await;
    nodes
}

/// Sends the controller's `SetVolumeEpoch` to one node.
async fn install(
    node: &TestNode,
    controller: &Identity,
    epoch: u64,
    writer: &str,
    in_sync: &[&str],
) -> Result<(), tonic::Status> {
    let mut client = node.client(controller).await;
    client
        .apply(request(
            &format!(
                "epoch.v.{epoch}.{}.{writer}.{}",
                node.name,
                in_sync.join(".")
            ),
            Action::SetVolumeEpoch(SetVolumeEpoch {
                name: "v".into(),
                epoch,
                writer: writer.into(),
                in_sync: in_sync.iter().map(|name| name.to_string()).collect(),
                clients: Vec::new(),
            }),
        ))
        .await
        .map(|_| ())
}

/// Installs an epoch on `nodes`, in order (the writer last, as the authority does).
async fn install_all(
    nodes: &[&TestNode],
    controller: &Identity,
    epoch: u64,
    writer: &str,
    in_sync: &[&str],
) {
    for node in nodes {
        install(node, controller, epoch, writer, in_sync)
            .await
            .unwrap_or_else(|status| panic!("install epoch {epoch} on {}: {status:?}", node.name));
    }
}

pub(crate) async fn status(node: &TestNode, controller: &Identity) -> VolumeStatus {
    let mut client = node.client(controller).await;
    client
        .observe()
        .await
        .unwrap()
        .volumes
        .into_iter()
        .find(|volume| volume.name == "v")
        .expect("volume v observed")
}

pub(crate) fn write(index: u64, seed: u64) -> Action {
    Action::WriteVolume(WriteVolume {
        name: "v".into(),
        offset: index * CHUNK,
        data: pattern(seed, CHUNK as usize),
    })
}

/// Writes through the primary; the number of copies that hold it.
pub(crate) async fn write_ok(client: &mut NodeClient, id: &str, index: u64, seed: u64) -> u32 {
    let response = apply_ok(client, id, write(index, seed)).await;
    match response.result {
        Some(ApplyResult::WriteVolume(result)) => result.copies,
        other => panic!("unexpected result {other:?}"),
    }
}

fn stale_write(epoch: u64) -> ReplicaWriteRequest {
    let data = vec![0xEE; 4096];
    ReplicaWriteRequest {
        volume: "v".into(),
        offset: 0,
        checksums: vec![crc32c::crc32c(&data)],
        data,
        sequence: 1_000_000,
        resync: false,
        epoch,
        replica_boot: Vec::new(),
    }
}

pub(crate) fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, parts: &[&str]) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    for part in parts {
        assert!(
            status.message().contains(part),
            "`{}` does not say `{part}`",
            status.message()
        );
    }
}

/// `offset..offset+length` in pieces of at most 4 MiB (the API's limit per call).
fn pieces(offset: u64, length: u64) -> impl Iterator<Item = (u64, u64)> {
    (offset..offset + length)
        .step_by(4 << 20)
        .map(move |at| (at, (offset + length - at).min(4 << 20)))
}

/// The bytes of `offset..offset+length` of a copy and the crc32c of every block, as
/// the copy verified them (ReplicaRead, as the controller).
pub(crate) async fn read_copy(
    node: &TestNode,
    controller: &Identity,
    offset: u64,
    length: u64,
) -> (Vec<u8>, Vec<u32>) {
    let mut client = node.client(controller).await;
    let (mut data, mut sums) = (Vec::new(), Vec::new());
    for (at, chunk) in pieces(offset, length) {
        let request = ReplicaReadRequest {
            volume: "v".into(),
            offset: at,
            length: chunk,
        };
        let read = client.replica_read(request).await;
        let read = read.unwrap_or_else(|status| panic!("read {}: {status:?}", node.name));
        data.extend(read.data);
        sums.extend(read.checksums);
    }
    (data, sums)
}

async fn read_range(node: &TestNode, controller: &Identity, offset: u64, length: u64) -> Vec<u8> {
    read_copy(node, controller, offset, length).await.0
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_a_stale_epoch_is_refused_by_every_copy() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let nodes = cluster(base.path(), &controller, &[]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let all = ["ep-a", "ep-b", "ep-c"];
    install_all(&[b, c, a], &controller, 1, "ep-a", &all).await;
    let mut primary = a.client(&controller).await;
    assert_eq!(write_ok(&mut primary, "w1", 0, 1).await, 3);
    // The authority raises the epoch (as it does before any writer change).
    install_all(&[b, c, a], &controller, 2, "ep-a", &all).await;
    assert_eq!(write_ok(&mut primary, "w2", 1, 2).await, 3);
    for node in &nodes {
        let seen = status(node, &controller).await;
        assert_eq!(
            (seen.epoch, seen.epoch_writer.as_str()),
            (2, "ep-a"),
            "{}",
            node.name
        );
        assert_eq!(seen.in_sync, all, "{}", node.name);
    }

    // A ReplicaWrite of the writer under epoch 1 (a writer frozen since then) is
    // refused by every replica, naming the volume, both epochs and the writer.
    for replica in [b, c] {
        let mut as_writer = client_as(a, replica).await;
        assert_refused(
            as_writer.replica_write(stale_write(1)).await,
            &[
                "volume `v`",
                "under epoch 1",
                "epoch 2 (writer ep-a",
                "node ep-a",
                "fenced",
            ],
        );
        // ... and so is resynchronisation under the old epoch.
        let mut resync = stale_write(1);
        resync.resync = true;
        resync.sequence = 0;
        assert_refused(
            as_writer.replica_write(resync).await,
            &["under epoch 1", "fenced"],
        );
        // An epoch no authority installed here is refused too.
        assert_refused(
            as_writer.replica_write(stale_write(3)).await,
            &["under epoch 3", "not installed it here"],
        );
    }
    // A new writer's claim under an older epoch is refused by every copy, the primary's
    // included.
    for node in &nodes {
        assert_refused(
            install(node, &controller, 1, "ep-b", &["ep-b", "ep-c"]).await,
            &[
                "volume `v`",
                "epoch 1 (writer ep-b) is older than epoch 2 (writer ep-a",
            ],
        );
        // The same epoch with another writer is no new epoch.
        assert_refused(
            install(node, &controller, 2, "ep-b", &all).await,
            &["a change needs a new epoch"],
        );
    }
    // Epoch 3 reaches the replicas before the writer (as the authority sends it): the
    // writer's next write, refused by both as stale, is not acknowledged but waits, and
    // goes through once epoch 3 reaches the writer too.
    install_all(&[b, c], &controller, 3, "ep-a", &all).await;
    let racing = {
        let address = a.address.clone();
        let controller = controller.clone();
        tokio::spawn(async move {
            let signer = proto::auth::RequestSigner::new(controller);
            let mut client = NodeClient::connect_lazy(&address, signer).unwrap();
            client.apply(request("w-race", write(1, 2))).await
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!racing.is_finished(), "a write refused as stale waits");
    install(a, &controller, 3, "ep-a", &all).await.unwrap();
    match racing
        .await
        .unwrap()
        .expect("acknowledged at epoch 3")
        .result
    {
        Some(ApplyResult::WriteVolume(result)) => assert_eq!(result.copies, 3),
        other => panic!("{other:?}"),
    }
    // The authority makes ep-b the writer at epoch 4: ep-a is fenced, its writes fail
    // and its old-epoch replica writes are refused.
    install_all(&[b, c, a], &controller, 4, "ep-b", &all).await;
    let fenced = primary.apply(request("w3", write(2, 3))).await;
    assert_refused(fenced, &["node ep-a is fenced", "writer ep-b", "epoch 4"]);
    let mut old_writer = client_as(a, c).await;
    let denied = old_writer
        .replica_write(stale_write(4))
        .await
        .expect_err("the old writer may not write");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("only its writer, node ep-b"),
        "{}",
        denied.message()
    );
    // Nothing of the refused requests reached a copy; every copy holds what was
    // acknowledged.
    let expected: Vec<u8> = [pattern(1, CHUNK as usize), pattern(2, CHUNK as usize)].concat();
    for node in &nodes {
        assert!(
            read_range(node, &controller, 0, 2 * CHUNK).await == expected,
            "copy on {} changed",
            node.name
        );
    }
    // Epochs survive a restart (node.redb): the stale claim is still refused.
    let mut restarted = nodes;
    let address = restarted[2].address.clone();
    power_cut(&mut restarted[2]);
    restarted[2] = start(
        "ep-c",
        &base.path().join("ep-c"),
        &controller,
        &address,
        &[],
    );
    assert_eq!(status(&restarted[2], &controller).await.epoch, 4);
    let mut as_writer = client_as(&restarted[1], &restarted[2]).await;
    assert_refused(
        as_writer.replica_write(stale_write(3)).await,
        &["under epoch 3", "epoch 4 (writer ep-b", "fenced"],
    );
}

/// Waits until `check` holds for the writer's status, or panics after `within`.
pub(crate) async fn wait_status(
    node: &TestNode,
    controller: &Identity,
    within: Duration,
    what: &str,
    check: impl Fn(&VolumeStatus) -> bool,
) -> VolumeStatus {
    let deadline = Instant::now() + within;
    loop {
        let seen = status(node, controller).await;
        if check(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_replica_freezes_the_writer_until_the_authority_removes_it_and_returns_with_only_what_changed()
 {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    // Frozen writes fail after 3 s here (30 s by default).
    let env = [("CAIRN_VOLUME_FREEZE_MS", "3000")];
    let mut nodes = cluster(base.path(), &controller, &env).await;
    let all = ["ep-a", "ep-b", "ep-c"];
    let state = reconciler::state::RedbStore::open(&base.path().join("state.redb")).unwrap();
    let authority = reconciler::epochs::EpochAuthority::new(&state);
    // The controller's first observation: it adopts the volume at epoch 1.
    let changes = controller_step(&authority, &nodes.iter().collect::<Vec<_>>(), &controller).await;
    assert_eq!(changes.len(), 1);
    for node in &nodes {
        assert_eq!(status(node, &controller).await.epoch, 1, "{}", node.name);
    }
    let mut primary = nodes[0].client(&controller).await;
    // 4 MiB written and acknowledged by all three copies.
    for index in 0..64 {
        assert_eq!(
            write_ok(&mut primary, &format!("w{index}"), index, index).await,
            3
        );
    }

    // Cut the power of the replica ep-c while writes go on.
    let c_address = nodes[2].address.clone();
    power_cut(&mut nodes[2]);
    // The next write freezes: it is not acknowledged, and fails after the bound.
    let started = Instant::now();
    let frozen = primary.apply(request("w-frozen", write(100, 100))).await;
    let waited = started.elapsed();
    let status_of = frozen.expect_err("a write without the failed copy is not acknowledged");
    assert_eq!(status_of.code(), Code::Unavailable, "{status_of:?}");
    assert!(
        status_of.message().contains("frozen") && status_of.message().contains("ep-c"),
        "{}",
        status_of.message()
    );
    assert!(
        waited >= Duration::from_millis(2900),
        "failed after {waited:?}, before the bound"
    );
    let seen = wait_status(
        &nodes[0],
        &controller,
        Duration::from_secs(5),
        "frozen",
        |s| s.awaiting_removal == ["ep-c"],
    )
    .await;
    assert!(
        seen.detail.contains("waiting for the authority"),
        "{}",
        seen.detail
    );

    // A write sent now waits (frozen) until the authority removes ep-c under epoch 2.
    let writer = {
        let address = nodes[0].address.clone();
        let controller = controller.clone();
        tokio::spawn(async move {
            let signer = proto::auth::RequestSigner::new(controller);
            let mut client = NodeClient::connect_lazy(&address, signer).unwrap();
            let started = Instant::now();
            let result = client.apply(request("w-waits", write(101, 101))).await;
            (started.elapsed(), result)
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!writer.is_finished(), "the write waited for the authority");
    // The controller's next observation (ep-c unreachable) sees the frozen writer
    // and removes ep-c under epoch 2.
    let changes = controller_step(&authority, &[&nodes[0], &nodes[1]], &controller).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].epoch, 2);
    let (waited, result) = writer.await.unwrap();
    let response = result.expect("acknowledged once the authority removed ep-c");
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    match response.result {
        Some(ApplyResult::WriteVolume(result)) => assert_eq!(result.copies, 2),
        other => panic!("{other:?}"),
    }
    // Writes continue, degraded: new regions and overwrites of old ones.
    let mut changed: Vec<(u64, u64)> = vec![(100, 100), (101, 101)];
    for index in 102..140 {
        assert_eq!(
            write_ok(&mut primary, &format!("w{index}"), index, index).await,
            2
        );
        changed.push((index, index));
    }
    for index in [5, 6, 101] {
        let seed = 1000 + index;
        assert_eq!(
            write_ok(&mut primary, &format!("o{index}"), index, seed).await,
            2
        );
        changed.push((index, seed));
    }

    // ep-c returns (still at epoch 1). The authority installs epoch 2 on it: it is
    // outside the in-sync set, so it serves no reads though its checksums verify.
    nodes[2] = start(
        "ep-c",
        &base.path().join("ep-c"),
        &controller,
        &c_address,
        &env,
    );
    assert_eq!(status(&nodes[2], &controller).await.epoch, 1);
    let changes = controller_step(&authority, &nodes.iter().collect::<Vec<_>>(), &controller).await;
    assert!(
        changes.is_empty(),
        "a copy that is back changes no epoch by itself"
    );
    assert_eq!(status(&nodes[2], &controller).await.epoch, 2);
    let mut stale = nodes[2].client(&controller).await;
    assert_refused(
        stale
            .read_volume(ReadVolumeRequest {
                name: "v".into(),
                offset: 0,
                length: 4096,
            })
            .await,
        &["outside the in-sync set of epoch 2", "may be stale"],
    );
    // The writer catches it up with only what changed since it left.
    let seen = wait_status(
        &nodes[0],
        &controller,
        Duration::from_secs(20),
        "caught up",
        |s| s.caught_up == ["ep-c"],
    )
    .await;
    let distinct: std::collections::BTreeSet<u64> =
        changed.iter().map(|(index, _)| *index).collect();
    let changed_bytes = distinct.len() as u64 * CHUNK;
    eprintln!(
        "resync shipped {} bytes to the returning copy ({} distinct 64 KiB regions changed; {} bytes were written in all)",
        seen.resync_bytes,
        distinct.len(),
        (64 + changed.len() as u64) * CHUNK
    );
    assert_eq!(
        seen.resync_bytes, changed_bytes,
        "only what changed is shipped"
    );
    // The authority adds it back under epoch 3.
    let changes = controller_step(&authority, &nodes.iter().collect::<Vec<_>>(), &controller).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].epoch, 3);
    let journal: Vec<String> = authority
        .journal("v")
        .unwrap()
        .into_iter()
        .map(|change| {
            format!(
                "{} {}: {}",
                change.state.epoch, change.change, change.reason
            )
        })
        .collect();
    assert_eq!(
        journal,
        [
            "1 adopted: first seen on node ep-a",
            "2 removed copy ep-c: writer ep-a cannot write it and froze its writes",
            "3 added copy ep-c: writer ep-a reports it caught up",
        ]
    );
    assert_eq!(write_ok(&mut primary, "after", 140, 140).await, 3);
    let length = 141 * CHUNK;
    let reference = read_range(&nodes[0], &controller, 0, length).await;
    for (index, seed) in changed.iter().chain([(140, 140)].iter()) {
        let at = (*index * CHUNK) as usize;
        // The last write of each region wins.
        let last = changed
            .iter()
            .rev()
            .find(|(i, _)| i == index)
            .map_or(*seed, |(_, s)| *s);
        assert!(
            reference[at..at + CHUNK as usize] == pattern(last, CHUNK as usize)[..],
            "region {index}"
        );
    }
    let (_, primary_sums) = read_copy(&nodes[0], &controller, 0, length).await;
    for node in &nodes[1..] {
        assert!(
            read_range(node, &controller, 0, length).await == reference,
            "copy on {} differs",
            node.name
        );
        assert_eq!(
            read_copy(node, &controller, 0, length).await.1,
            primary_sums,
            "checksums of {}",
            node.name
        );
    }
    let healthy = status(&nodes[0], &controller).await;
    assert_eq!(healthy.in_sync, all);
    assert!(healthy.awaiting_removal.is_empty() && healthy.caught_up.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_replica_holds_the_writer_no_longer_than_its_bound() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let env = [("CAIRN_VOLUME_FREEZE_MS", "2000")];
    let nodes = cluster(base.path(), &controller, &env).await;
    let state = reconciler::state::RedbStore::open(&base.path().join("state.redb")).unwrap();
    let authority = reconciler::epochs::EpochAuthority::new(&state);
    controller_step(&authority, &nodes.iter().collect::<Vec<_>>(), &controller).await;
    let mut primary = nodes[0].client(&controller).await;
    assert_eq!(write_ok(&mut primary, "w0", 0, 0).await, 3);
    // SIGSTOP: the replica's connections stay open and nothing answers.
    let stopped = nodes[2].pid() as libc::pid_t;
    // SAFETY: kill(2) with a pid of our own child and a valid signal touches no memory.
    assert_eq!(unsafe { libc::kill(stopped, libc::SIGSTOP) }, 0);
    let started = Instant::now();
    let frozen = primary.apply(request("w1", write(1, 1))).await;
    let waited = started.elapsed();
    let refused = frozen.expect_err("not acknowledged without the stopped copy");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(6),
        "failed after {waited:?}: the bound is 2 s"
    );
    // The authority removes it; writes go on at once although it still does not answer.
    let changes = controller_step(&authority, &[&nodes[0], &nodes[1]], &controller).await;
    assert_eq!(changes.len(), 1);
    let started = Instant::now();
    for index in 2..10 {
        assert_eq!(
            write_ok(&mut primary, &format!("w{index}"), index, index).await,
            2
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "8 writes took {:?} beside a stopped copy",
        started.elapsed()
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(stopped, libc::SIGCONT) }, 0);
    controller_step(&authority, &nodes.iter().collect::<Vec<_>>(), &controller).await;
    wait_status(
        &nodes[0],
        &controller,
        Duration::from_secs(20),
        "caught up",
        |s| s.caught_up == ["ep-c"],
    )
    .await;
    let changes = controller_step(&authority, &nodes.iter().collect::<Vec<_>>(), &controller).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(write_ok(&mut primary, "w10", 10, 10).await, 3);
    let reference = read_range(&nodes[0], &controller, 0, 11 * CHUNK).await;
    for node in &nodes[1..] {
        assert!(
            read_range(node, &controller, 0, 11 * CHUNK).await == reference,
            "copy on {} differs",
            node.name
        );
    }
}

/// The observed volume statuses of `nodes`, as the controller gives them to the
/// authority.
async fn observe_all(
    nodes: &[&TestNode],
    controller: &Identity,
) -> Vec<(String, Vec<VolumeStatus>)> {
    let mut observed = Vec::new();
    for node in nodes {
        let mut client = node.client(controller).await;
        observed.push((node.name.clone(), client.observe().await.unwrap().volumes));
    }
    observed
}

#[tokio::test(flavor = "multi_thread")]
async fn the_writers_node_fails_an_in_sync_replica_becomes_the_writer_and_the_old_one_returns_as_its_copy()
 {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let state = reconciler::state::RedbStore::open(&base.path().join("state.redb")).unwrap();
    let authority = reconciler::epochs::EpochAuthority::new(&state);
    let mut nodes = cluster(base.path(), &controller, &[]).await;
    {
        let all: Vec<&TestNode> = nodes.iter().collect();
        let adopted = controller_step(&authority, &all, &controller).await;
        assert_eq!(adopted.len(), 1, "{adopted:?}");
        assert_eq!(adopted[0].writer, "ep-a");
    }
    let mut primary = nodes[0].client(&controller).await;
    for index in 0..4 {
        assert_eq!(
            write_ok(&mut primary, &format!("w{index}"), index, index).await,
            3
        );
    }
    // A write the writer had in flight when its node died: it reached ep-c only, and
    // was never acknowledged.
    let in_flight = 5 * CHUNK;
    {
        let data = pattern(99, 4096);
        let mut as_writer = client_as(&nodes[0], &nodes[2]).await;
        as_writer
            .replica_write(ReplicaWriteRequest {
                volume: "v".into(),
                offset: in_flight,
                checksums: vec![crc32c::crc32c(&data)],
                data,
                sequence: 1 << 30,
                resync: false,
                epoch: 1,
                replica_boot: Vec::new(),
            })
            .await
            .unwrap();
    }
    assert_ne!(
        read_range(&nodes[1], &controller, in_flight, 4096).await,
        read_range(&nodes[2], &controller, in_flight, 4096).await,
        "the in-flight write is on ep-c only"
    );
    let a_address = nodes[0].address.clone();
    power_cut(&mut nodes[0]);

    // The authority: ep-a failed. ep-b (in sync, reachable) becomes the writer.
    let failed: std::collections::BTreeSet<String> = ["ep-a".to_string()].into();
    let survivors = [&nodes[1], &nodes[2]];
    let observed = observe_all(&survivors, &controller).await;
    let started = Instant::now();
    let (failover, unavailable) =
        reconciler::epochs::fail_over(&authority, &observed, &failed).unwrap();
    assert!(unavailable.is_empty(), "{unavailable:?}");
    assert_eq!(failover.changes.len(), 1);
    let epoch = &failover.changes[0];
    assert_eq!(epoch.writer, "ep-b");
    assert_eq!(
        epoch.in_sync.iter().map(String::as_str).collect::<Vec<_>>(),
        ["ep-b", "ep-c"]
    );
    assert_eq!(
        failover.installs.last().map(|i| i.node.as_str()),
        Some("ep-b"),
        "the new writer is told last"
    );
    for install in &failover.installs {
        let node = survivors.iter().find(|n| n.name == install.node).unwrap();
        let mut client = node.client(&controller).await;
        client
            .apply(request(
                &install.request_id,
                Action::SetVolumeEpoch(install.request.clone()),
            ))
            .await
            .unwrap();
    }
    let journal = authority.journal("v").unwrap();
    assert!(
        journal
            .last()
            .is_some_and(|c| c.change == "writer ep-a → ep-b, removed copy ep-a"
                && c.reason.contains("ep-a failed")),
        "{journal:?}"
    );

    // The new writer writes (2 copies), after reconciling the in-flight region: ep-c
    // now holds what ep-b holds there.
    let mut writer = nodes[1].client(&controller).await;
    assert_eq!(write_ok(&mut writer, "w-after", 6, 6).await, 2);
    eprintln!(
        "failover to ep-b and its first write: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(
        read_range(&nodes[1], &controller, in_flight, 4096).await,
        read_range(&nodes[2], &controller, in_flight, 4096).await,
        "the new writer reconciled the region the old writer had in flight"
    );
    // A write through ep-c (not the writer) is refused, naming the writer.
    let mut not_writer = nodes[2].client(&controller).await;
    let refused = not_writer
        .apply(request("w-c", write(7, 7)))
        .await
        .expect_err("ep-c is not the writer");
    assert!(refused.message().contains("ep-b"), "{refused:?}");
    // Every acknowledged write is on both survivors.
    for index in [0, 1, 2, 3, 6] {
        for node in survivors {
            assert_eq!(
                read_range(node, &controller, index * CHUNK, CHUNK).await,
                pattern(index, CHUNK as usize),
                "write {index} on {}",
                node.name
            );
        }
    }

    // ep-a returns: told the current epoch, it is a copy of ep-b; it refuses writes,
    // is caught up by ep-b and comes back into the in-sync set.
    nodes[0] = start(
        "ep-a",
        &base.path().join("ep-a"),
        &controller,
        &a_address,
        &[],
    );
    let all: Vec<&TestNode> = nodes.iter().collect();
    let changes = controller_step(&authority, &all, &controller).await;
    assert!(changes.is_empty(), "{changes:?}");
    let mut old_writer = nodes[0].client(&controller).await;
    let refused = old_writer
        .apply(request("w-a", write(8, 8)))
        .await
        .expect_err("ep-a is no longer the writer");
    assert!(refused.message().contains("ep-b"), "{refused:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        controller_step(&authority, &all, &controller).await;
        let seen = status(&nodes[1], &controller).await;
        if seen.in_sync.iter().any(|n| n == "ep-a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ep-a was not brought back in sync: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let length = 8 * CHUNK;
    let (_, reference) = read_copy(&nodes[1], &controller, 0, length).await;
    for node in &nodes {
        let (_, sums) = read_copy(node, &controller, 0, length).await;
        assert_eq!(
            sums, reference,
            "checksums of {} differ from ep-b's",
            node.name
        );
    }
}
