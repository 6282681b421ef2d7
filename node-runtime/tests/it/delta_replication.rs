//! Delta replication to another site (issue 18): a writer on one site ships its
//! snapshots to a volume on a node of another site over the signed Replication API,
//! the first whole, then only the 4 KiB blocks that changed (trims and zeroed ranges
//! as zero ranges), verified by SHA-256 manifests; a transfer cut by an nftables drop
//! or by `kill -9` of the receiver resumes where the receiver's progress mark says.
//! Nodes on 127.0.0.63 (source) and 127.0.0.64 (target).

use std::time::{Duration, Instant};

use proto::client::NodeClient;
use proto::v1::{
    AcceptReplication, CloneVolume, CreateVolume, DeltaStatusRequest, DeltaWriteRequest, Peer,
    ReadVolumeRequest, ReplicateVolume, ReplicationResult, SnapshotVolume, WriteVolume,
    apply_request::Action, apply_response,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern, request};
use crate::lab::{client_as, push_peers};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const UNIT: u64 = MIB;
const SIZE: u64 = 64 * MIB;

fn write(offset: u64, data: Vec<u8>) -> Action {
    Action::WriteVolume(WriteVolume {
        name: "vol".into(),
        offset,
        data,
    })
}

async fn read_all(client: &mut NodeClient, volume: &str, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize);
    for offset in (0..size).step_by((4 * MIB) as usize) {
        out.extend(
            client
                .read_volume(ReadVolumeRequest {
                    name: volume.into(),
                    offset,
                    length: 4 * MIB,
                })
                .await
                .unwrap_or_else(|status| panic!("read {volume}: {status:?}")),
        );
    }
    out
}

fn nft(rules: &str) -> bool {
    let mut child = std::process::Command::new("nft")
        .arg("-f")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

/// Deletes the drop rule's table however the test ends.
struct DropRule(&'static str);

impl Drop for DropRule {
    fn drop(&mut self) {
        nft(&format!("delete table inet {}\n", self.0));
    }
}

fn target_peer(node: &TestNode) -> Peer {
    Peer {
        name: node.name.clone(),
        address: node.address.clone(),
        public_key_hex: node.public_key_hex(),
    }
}

fn replicate(target: &TestNode) -> Action {
    Action::ReplicateVolume(ReplicateVolume {
        volume: "vol".into(),
        target: Some(target_peer(target)),
        target_volume: "vol-dr".into(),
        every_ms: 0,
        keep: 2,
        now: true,
    })
}

async fn ship(source: &mut NodeClient, id: &str, target: &TestNode) -> ReplicationResult {
    match apply_ok(source, id, replicate(target)).await.result {
        Some(apply_response::Result::Replication(result)) => result,
        other => panic!("ReplicateVolume answered {other:?}"),
    }
}

async fn snapshot(source: &mut NodeClient, name: &str) {
    apply_ok(
        source,
        &format!("snap-{name}"),
        Action::SnapshotVolume(SnapshotVolume {
            volume: "vol".into(),
            snapshot: name.into(),
        }),
    )
    .await;
}

/// Writes `data` at `offset` in 4 MiB requests, mirrored into `now`, then takes
/// snapshot `name`.
async fn write_and_snapshot(
    source: &mut NodeClient,
    now: &mut [u8],
    offset: u64,
    data: &[u8],
    name: &str,
) {
    for (i, chunk) in data.chunks((4 * MIB) as usize).enumerate() {
        let at = offset + i as u64 * 4 * MIB;
        apply_ok(source, &format!("w-{name}-{i}"), write(at, chunk.to_vec())).await;
        now[at as usize..at as usize + chunk.len()].copy_from_slice(chunk);
    }
    snapshot(source, name).await;
}

/// Ships in the background (the caller cuts the link meanwhile).
async fn ship_in_background(
    source: &TestNode,
    controller: &proto::auth::Identity,
    target: &TestNode,
    id: &str,
) -> tokio::task::JoinHandle<Result<proto::v1::ApplyResponse, tonic::Status>> {
    let mut client = source.client(controller).await;
    let ship = request(id, replicate(target));
    tokio::spawn(async move { client.apply(ship).await })
}

/// The bytes of snapshot `name` of `vol-dr` on the target, through a clone.
async fn target_snapshot(target: &mut NodeClient, name: &str, size: u64) -> Vec<u8> {
    let clone = format!("check-{name}");
    apply_ok(
        target,
        &format!("clone-{name}"),
        Action::CloneVolume(CloneVolume {
            volume: "vol-dr".into(),
            snapshot: name.into(),
            name: clone.clone(),
        }),
    )
    .await;
    read_all(target, &clone, size).await
}

/// Waits until the target has durably received part of snapshot `name`.
async fn wait_for_progress(as_source: &mut NodeClient, name: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = as_source
            .delta_status(DeltaStatusRequest {
                volume: "vol-dr".into(),
            })
            .await
            .unwrap();
        if status.receiving == name && status.next_offset > 0 {
            return status.next_offset;
        }
        assert!(Instant::now() < deadline, "no progress on {name}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_ship_as_deltas_verified_and_resume_after_a_drop_and_a_kill() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let source = TestNode::start_on(
        "dr-src",
        &base.path().join("src"),
        &controller,
        "127.0.0.63",
    );
    let mut target = TestNode::start_on(
        "dr-dst",
        &base.path().join("dst"),
        &controller,
        "127.0.0.64",
    );
    push_peers(&[&source, &target], &controller).await;
    let mut on_source = source.client(&controller).await;
    let mut on_target = target.client(&controller).await;
    for (client, name) in [(&mut on_source, "vol"), (&mut on_target, "vol-dr")] {
        apply_ok(
            client,
            &format!("create-{name}"),
            Action::CreateVolume(CreateVolume {
                name: name.into(),
                size_bytes: SIZE,
                stripe_width: 2,
                stripe_unit_bytes: UNIT,
                replica_peers: vec![],
            }),
        )
        .await;
    }

    // 1. The first snapshot goes whole: the 8 MiB written, not the 64 MiB volume.
    let mut now = vec![0u8; SIZE as usize];
    let first = pattern(1, (8 * MIB) as usize);
    write_and_snapshot(&mut on_source, &mut now, 0, &first, "s1").await;
    let points = vec![("s1", now.clone())];
    // Nothing is accepted before the target is told whom to accept it from.
    let refused = on_source
        .apply(request("early", replicate(&target)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("accepts no replication"),
        "{refused:?}"
    );
    apply_ok(
        &mut on_target,
        "accept",
        Action::AcceptReplication(AcceptReplication {
            volume: "vol-dr".into(),
            source: Some(target_peer(&source)),
        }),
    )
    .await;

    let full = ship(&mut on_source, "ship-s1", &target).await;
    assert_eq!((full.base.as_str(), full.data_bytes), ("", 8 * MIB));
    assert_eq!(full.changed_unit_bytes, 8 * MIB);
    assert_eq!(full.manifest_sha256.len(), 32);

    // 2. Small changes: three 4 KiB blocks, a 64 KiB range, a 4 KiB range zeroed, and
    // a block rewritten with its own bytes. Only what differs is shipped.
    let mut changed = 0;
    for (n, offset) in [(0u64, 0u64), (1, 3 * MIB + 8 * KIB), (2, 7 * MIB + 4 * KIB)] {
        let data = pattern(100 + n, 4096);
        apply_ok(
            &mut on_source,
            &format!("w2-{n}"),
            write(offset, data.clone()),
        )
        .await;
        now[offset as usize..offset as usize + 4096].copy_from_slice(&data);
        changed += 4096;
    }
    let data = pattern(200, (64 * KIB) as usize);
    apply_ok(&mut on_source, "w2-range", write(5 * MIB, data.clone())).await;
    now[(5 * MIB) as usize..(5 * MIB + 64 * KIB) as usize].copy_from_slice(&data);
    changed += 64 * KIB;
    apply_ok(&mut on_source, "w2-zero", write(2 * MIB, vec![0; 4096])).await;
    now[(2 * MIB) as usize..(2 * MIB + 4096) as usize].fill(0);
    let same = now[(6 * MIB) as usize..(6 * MIB + 4096) as usize].to_vec();
    apply_ok(&mut on_source, "w2-same", write(6 * MIB, same)).await;
    snapshot(&mut on_source, "s2").await;
    let delta = ship(&mut on_source, "ship-s2", &target).await;
    eprintln!("small delta: {delta:?}");
    assert_eq!(delta.base, "s1");
    assert_eq!(
        delta.data_bytes, changed,
        "only the changed blocks: {delta:?}"
    );
    assert_eq!(delta.zero_bytes, 4096, "the zeroed block as a zero range");
    assert_eq!(delta.changed_unit_bytes, 6 * MIB, "units 0, 2, 3, 5, 6, 7");
    assert!(
        delta.wire_bytes < changed + 16 * KIB,
        "on the wire {} for {changed} changed",
        delta.wire_bytes
    );
    let mut points = points;
    points.push(("s2", now.clone()));
    assert_eq!(read_all(&mut on_target, "vol-dr", SIZE).await, now);
    assert!(
        target_snapshot(&mut on_target, "s1", SIZE).await == points[0].1,
        "s1 on the target is the source's s1"
    );

    // 3. A dropped link in the middle of a 24 MiB delta: the transfer fails, and the
    // next one resumes where the target's progress mark is.
    let big = pattern(300, (24 * MIB) as usize);
    write_and_snapshot(&mut on_source, &mut now, 16 * MIB, &big, "s3").await;
    points.push(("s3", now.clone()));
    let mut as_source = client_as(&source, &target).await;
    let port = target.address.rsplit(':').next().unwrap().to_string();
    let table = "k_dr_drop";
    let shipping = ship_in_background(&source, &controller, &target, "ship-s3").await;
    let progress = wait_for_progress(&mut as_source, "s3").await;
    assert!(
        nft(&format!(
            "table inet {table} {{\n chain out {{\n  type filter hook output priority 0;\n  ip daddr 127.0.0.64 tcp dport {port} drop\n }}\n}}\n"
        )),
        "nft could not install the drop rule"
    );
    let rule = DropRule(table);
    let failed = shipping.await.unwrap();
    drop(rule);
    let failed = failed.expect_err("the transfer fails while the link drops everything");
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    let resumed = ship(&mut on_source, "ship-s3-again", &target).await;
    eprintln!("after the drop (progress seen {progress}): {resumed:?}");
    assert_eq!(resumed.base, "s2");
    assert!(
        resumed.resumed_from >= progress && resumed.resumed_from > 16 * MIB,
        "resumed from {} (progress seen {progress})",
        resumed.resumed_from
    );
    assert_eq!(
        resumed.data_bytes,
        40 * MIB - resumed.resumed_from,
        "nothing below the progress mark is sent again"
    );
    assert_eq!(read_all(&mut on_target, "vol-dr", SIZE).await, now);

    // 4. kill -9 of the receiver in the middle of a delta, restarted on its address.
    let more = pattern(400, (16 * MIB) as usize);
    write_and_snapshot(&mut on_source, &mut now, 44 * MIB, &more, "s4").await;
    points.push(("s4", now.clone()));
    let shipping = ship_in_background(&source, &controller, &target, "ship-s4").await;
    let progress = wait_for_progress(&mut as_source, "s4").await;
    target.kill_9();
    let failed = shipping.await.unwrap().expect_err("the receiver is gone");
    eprintln!("the transfer to the killed receiver: {failed:?}");
    let address = target.address.clone();
    target = TestNode::start_at("dr-dst", &base.path().join("dst"), &address);
    let mut on_target = target.client(&controller).await;
    let resumed = ship(&mut on_source, "ship-s4-again", &target).await;
    eprintln!("after kill -9 (progress seen {progress}): {resumed:?}");
    assert_eq!(resumed.base, "s3");
    assert!(
        resumed.resumed_from >= progress,
        "resumed from {} (progress seen {progress})",
        resumed.resumed_from
    );
    assert_eq!(resumed.data_bytes, 60 * MIB - resumed.resumed_from);

    // The target keeps the newest 2; each is the source's point in time, block for
    // block (the manifests matched already, or the commit would have failed).
    let mut as_source = client_as(&source, &target).await;
    let status = as_source
        .delta_status(DeltaStatusRequest {
            volume: "vol-dr".into(),
        })
        .await
        .unwrap();
    assert_eq!(status.snapshots, vec!["s3", "s4"]);
    for (name, bytes) in &points[2..] {
        assert!(
            &target_snapshot(&mut on_target, name, SIZE).await == bytes,
            "snapshot {name} on the target holds the source's bytes of that time"
        );
    }

    // Only the named source may ship into the volume.
    let refused = on_target
        .delta_write(DeltaWriteRequest {
            volume: "vol-dr".into(),
            snapshot: "evil".into(),
            offset: 0,
            data: vec![1; 4096],
            checksums: vec![crc32c::crc32c(&[1; 4096])],
            covered_to: 4096,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("only node dr-src"),
        "{refused:?}"
    );
}

/// The schedules alone (no controller after the first actions): the source takes a
/// snapshot every second and ships the newest every second; a writer appends
/// numbered blocks; the source is killed with kill -9. The target then holds a
/// crash-consistent point in time: every write acknowledged before the newest
/// replicated snapshot was taken, none after, and that point is at most a few
/// intervals old (the RPO). Nodes on 127.0.0.68 (source) and 127.0.0.69 (target).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduled_replication_leaves_the_target_a_recent_point_in_time_when_the_source_dies() {
    const SMALL: u64 = 16 * MIB;
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut source = TestNode::start_on(
        "sched-src",
        &base.path().join("src"),
        &controller,
        "127.0.0.68",
    );
    let target = TestNode::start_on(
        "sched-dst",
        &base.path().join("dst"),
        &controller,
        "127.0.0.69",
    );
    push_peers(&[&source, &target], &controller).await;
    let mut on_source = source.client(&controller).await;
    let mut on_target = target.client(&controller).await;
    for (client, name) in [(&mut on_source, "vol"), (&mut on_target, "vol-dr")] {
        apply_ok(
            client,
            &format!("create-{name}"),
            Action::CreateVolume(CreateVolume {
                name: name.into(),
                size_bytes: SMALL,
                stripe_width: 2,
                stripe_unit_bytes: UNIT,
                replica_peers: vec![],
            }),
        )
        .await;
    }
    apply_ok(
        &mut on_target,
        "accept",
        Action::AcceptReplication(AcceptReplication {
            volume: "vol-dr".into(),
            source: Some(target_peer(&source)),
        }),
    )
    .await;
    apply_ok(
        &mut on_source,
        "protect",
        Action::SetProtection(proto::v1::SetProtection {
            vm: "db".into(),
            plan: "gold".into(),
            volumes: vec!["vol".into()],
            every_ms: 1000,
            keep: 2,
        }),
    )
    .await;
    let schedule = Action::ReplicateVolume(ReplicateVolume {
        volume: "vol".into(),
        target: Some(target_peer(&target)),
        target_volume: "vol-dr".into(),
        every_ms: 1000,
        keep: 3,
        now: false,
    });
    apply_ok(&mut on_source, "replicate", schedule).await;

    // Block k holds write k; each write's acknowledgement time is kept.
    let block = |k: u64| {
        let mut data = pattern(1000 + k, 4096);
        data[..8].copy_from_slice(&k.to_le_bytes());
        data
    };
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let mut acked = Vec::new();
    let started = Instant::now();
    let mut k = 0u64;
    while started.elapsed() < Duration::from_secs(6) {
        apply_ok(&mut on_source, &format!("w{k}"), write(k * 4096, block(k))).await;
        acked.push(now_ms());
        k += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The source's retention keeps its newest 2 plus the pinned base (and a snapshot
    // in transfer).
    let kept = crate::snapshots::status_of(&mut on_source, "vol")
        .await
        .snapshots
        .len();
    assert!((2..=4).contains(&kept), "the source keeps {kept} snapshots");
    // Observe on both sides: the last replicated snapshot and its age (the RPO).
    let sent = on_source.observe().await.unwrap().replications;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (sent[0].role.as_str(), sent[0].peer.as_str()),
        ("source", "sched-dst")
    );
    assert!(sent[0].last_replicated.starts_with("auto-"), "{sent:?}");
    assert!(sent[0].rpo_ms > 0 && sent[0].rpo_ms < 5000, "{sent:?}");
    assert_eq!(sent[0].last_error, "");
    let received = on_target.observe().await.unwrap().replications;
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].role, "target");
    assert!(
        received[0].rpo_ms > 0 && received[0].rpo_ms < 5000,
        "{received:?}"
    );
    source.kill_9();
    let lost_at = now_ms();

    let mut as_source = client_as(&source, &target).await;
    let status = as_source
        .delta_status(DeltaStatusRequest {
            volume: "vol-dr".into(),
        })
        .await
        .unwrap();
    assert!(
        (1..=3).contains(&status.snapshots.len()),
        "the target keeps at most 3: {:?}",
        status.snapshots
    );
    let newest = status.snapshots.last().unwrap().clone();
    let taken_at: u64 = newest.strip_prefix("auto-").unwrap().parse().unwrap();
    let rpo = lost_at - taken_at;
    let bytes = target_snapshot(&mut on_target, &newest, SMALL).await;
    let present = (0..k)
        .take_while(|&i| bytes[(i * 4096) as usize..((i + 1) * 4096) as usize] == block(i))
        .count() as u64;
    assert!(
        bytes[(present * 4096) as usize..].iter().all(|&b| b == 0),
        "a prefix of the writes and nothing after it: write {present} is missing but a later one is there"
    );
    let before = acked.iter().filter(|&&at| at < taken_at).count() as u64;
    eprintln!(
        "{k} writes; the newest replicated snapshot {newest} holds {present} ({before} acknowledged before it was taken); RPO at the loss {rpo} ms; target holds {:?}",
        status.snapshots
    );
    assert!(
        present >= before && present <= before + 1,
        "every write acknowledged before the snapshot, none much after: {present} present, {before} acknowledged before"
    );
    assert!(
        rpo < 5000,
        "snapshot and replication every 1 s: the newest replicated point is {rpo} ms old"
    );
}
