//! Protection schedules held by the node (issue 18): once told a VM's schedule, the
//! writer takes group snapshots of the VM's volumes itself (no controller runs in these
//! tests after the one `SetProtection`), keeps the newest `keep` on every copy, goes on
//! after a restart and reports the runs it missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::client::NodeClient;
use proto::v1::{
    CloneVolume, CreateVolume, DeleteVolume, Peer, ProtectionStatus, ReadVolumeRequest,
    SetProtection, WriteVolume, apply_request::Action,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern, request};
use crate::lab::push_peers;
use crate::snapshots::status_of;

const KIB: u64 = 1024;
const UNIT: u64 = 64 * KIB;
const SIZE: u64 = 16 * UNIT;
const VOLUMES: [&str; 2] = ["db-data", "db-log"];

fn protect(every_ms: u64, keep: u32) -> Action {
    Action::SetProtection(SetProtection {
        vm: "db".into(),
        plan: "gold".into(),
        volumes: VOLUMES.iter().map(|v| v.to_string()).collect(),
        every_ms,
        keep,
    })
}

fn write(volume: &str, offset: u64, data: Vec<u8>) -> Action {
    Action::WriteVolume(WriteVolume {
        name: volume.into(),
        offset,
        data,
    })
}

/// Block 0 of a volume holds the number of the last write of the writer below.
fn counter_block(k: u64) -> Vec<u8> {
    let mut block = pattern(k, 4096);
    block[..8].copy_from_slice(&k.to_le_bytes());
    block
}

async fn read(client: &mut NodeClient, volume: &str, offset: u64, length: u64) -> Vec<u8> {
    client
        .read_volume(ReadVolumeRequest {
            name: volume.into(),
            offset,
            length,
        })
        .await
        .unwrap_or_else(|status| panic!("read {volume}: {status:?}"))
}

async fn protection_status(client: &mut NodeClient) -> Option<ProtectionStatus> {
    client
        .observe()
        .await
        .unwrap()
        .protections
        .into_iter()
        .find(|p| p.vm == "db")
}

/// Names of the scheduled snapshots of `volume` on a copy, oldest first.
async fn scheduled(client: &mut NodeClient, volume: &str) -> Vec<String> {
    let mut names: Vec<(u64, String)> = status_of(client, volume)
        .await
        .snapshots
        .into_iter()
        .filter(|s| s.name.starts_with("auto-"))
        .map(|s| (s.created_at_unix_ms, s.name))
        .collect();
    names.sort();
    names.into_iter().map(|(_, name)| name).collect()
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A writer on 127.0.0.61 and a replica on .62 holding two 2-copy volumes of VM db.
async fn two_nodes_with_db(
    base: &std::path::Path,
    controller: &proto::auth::Identity,
) -> (TestNode, TestNode, NodeClient, NodeClient) {
    let writer = TestNode::start_on("prot-w", &base.join("w"), controller, "127.0.0.61");
    let replica = TestNode::start_on("prot-r", &base.join("r"), controller, "127.0.0.62");
    push_peers(&[&writer, &replica], controller).await;
    let mut on_writer = writer.client(controller).await;
    let on_replica = replica.client(controller).await;
    for volume in VOLUMES {
        apply_ok(
            &mut on_writer,
            &format!("create-{volume}"),
            Action::CreateVolume(CreateVolume {
                name: volume.into(),
                size_bytes: SIZE,
                stripe_width: 2,
                stripe_unit_bytes: UNIT,
                replica_peers: vec![Peer {
                    name: replica.name.clone(),
                    ..Default::default()
                }],
            }),
        )
        .await;
    }
    (writer, replica, on_writer, on_replica)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_snapshots_every_disk_of_a_vm_at_one_instant_on_schedule_and_keeps_the_newest() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let (_writer, _replica, mut on_writer, mut on_replica) =
        two_nodes_with_db(base.path(), &controller).await;

    // Bad schedules are refused naming the field.
    for (id, action, field) in [
        ("bad-every", protect(10, 3), "set_protection.every_ms"),
        ("bad-keep", protect(1000, 0), "set_protection.keep"),
    ] {
        let refused = on_writer
            .apply(request(id, action))
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(field), "{}", refused.message());
    }

    // The VM's writes: write k puts k in block 0 of db-data, then of db-log, one after
    // the other. At any one instant the two hold k and k, or k and k - 1.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let vm_writes = {
        let mut client = on_writer.clone();
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        tokio::spawn(async move {
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                k += 1;
                for volume in VOLUMES {
                    client
                        .apply(request(
                            &format!("{volume}-{k}"),
                            write(volume, 0, counter_block(k)),
                        ))
                        .await
                        .unwrap_or_else(|status| panic!("write {k} to {volume}: {status:?}"));
                }
                acknowledged.store(k, Ordering::SeqCst);
            }
            k
        })
    };
    while acknowledged.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let set_at = Instant::now();
    apply_ok(&mut on_writer, "protect", protect(1000, 3)).await;
    // The same schedule again keeps its clock (and is no new action).
    apply_ok(&mut on_writer, "protect-again", protect(1000, 3)).await;

    // No controller from here on: the node takes them itself, once a second, keeping 3.
    wait_for(
        "5 scheduled group snapshots",
        Duration::from_secs(30),
        || {
            let mut client = on_writer.clone();
            async move {
                protection_status(&mut client)
                    .await
                    .is_some_and(|p| p.last_snapshot_at_unix_ms > 0 && p.missed == 0)
                    && scheduled(&mut client, "db-data").await.len() == 3
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::SeqCst);
    let last = vm_writes.await.unwrap();
    let elapsed = set_at.elapsed();

    let status = protection_status(&mut on_writer).await.unwrap();
    // Removing the schedule stops the snapshots and keeps the ones taken (and lets the
    // checks below read them without retention deleting one under them).
    apply_ok(&mut on_writer, "unprotect", protect(0, 0)).await;
    assert!(protection_status(&mut on_writer).await.is_none());
    // (a run already under way finishes)
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let kept = scheduled(&mut on_writer, "db-data").await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(scheduled(&mut on_writer, "db-data").await, kept);
    assert_eq!(
        (status.plan.as_str(), status.every_ms, status.keep),
        ("gold", 1000, 3)
    );
    assert_eq!(status.missed, 0, "{status:?}");
    let data = scheduled(&mut on_writer, "db-data").await;
    assert_eq!(data.len(), 3, "retention keeps the newest 3: {data:?}");
    assert_eq!(
        data,
        scheduled(&mut on_writer, "db-log").await,
        "one group: every disk has the same snapshots"
    );
    for volume in VOLUMES {
        assert_eq!(
            scheduled(&mut on_replica, volume).await,
            data,
            "the replica holds the same chain of {volume}"
        );
    }
    assert!(
        data.last().unwrap() >= &status.last_snapshot,
        "{status:?} {data:?}"
    );

    // Each group snapshot is one instant of the VM's writes: read through clones.
    for (index, snapshot) in data.iter().enumerate() {
        let mut counters = vec![];
        for volume in VOLUMES {
            let clone = format!("c{index}-{volume}");
            apply_ok(
                &mut on_writer,
                &format!("clone-{clone}"),
                Action::CloneVolume(CloneVolume {
                    volume: volume.into(),
                    snapshot: snapshot.clone(),
                    name: clone.clone(),
                }),
            )
            .await;
            let block = read(&mut on_writer, &clone, 0, 4096).await;
            assert_eq!(
                block,
                read(&mut on_replica, &clone, 0, 4096).await,
                "{snapshot} of {volume} is the same on both copies"
            );
            counters.push(u64::from_le_bytes(block[..8].try_into().unwrap()));
            apply_ok(
                &mut on_writer,
                &format!("delete-{clone}"),
                Action::DeleteVolume(DeleteVolume { name: clone }),
            )
            .await;
        }
        let (on_data, on_log) = (counters[0], counters[1]);
        assert!(
            on_data == on_log || on_data == on_log + 1,
            "{snapshot}: db-data after write {on_data}, db-log after write {on_log}: not one instant"
        );
        println!("{snapshot}: db-data after write {on_data}, db-log after write {on_log}");
    }
    println!(
        "{last} writes per disk in {elapsed:?}; kept {data:?} on both copies; missed {}",
        status.missed
    );

    // Unique bytes: the oldest kept snapshot's block-0 unit was rewritten since.
    let oldest = status_of(&mut on_writer, "db-data")
        .await
        .snapshots
        .into_iter()
        .find(|s| s.name == data[0])
        .unwrap();
    assert_eq!(oldest.unique_bytes, UNIT, "{oldest:?}");

    // A volume whose disk left the specs is deleted with its scheduled snapshots (on
    // every copy); a snapshot of another name would still refuse it.
    apply_ok(
        &mut on_writer,
        "delete-data",
        Action::DeleteVolume(DeleteVolume {
            name: "db-data".into(),
        }),
    )
    .await;
    for client in [&mut on_writer, &mut on_replica] {
        let volumes = client.observe().await.unwrap().volumes;
        assert!(
            volumes.iter().all(|v| v.name != "db-data"),
            "db-data is gone from both copies"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_survives_a_node_restart_and_the_runs_it_missed_are_reported() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let (mut writer, _replica, mut on_writer, _on_replica) =
        two_nodes_with_db(base.path(), &controller).await;
    let before = pattern(7, SIZE as usize);
    for volume in VOLUMES {
        for (n, chunk) in before.chunks(UNIT as usize).enumerate() {
            apply_ok(
                &mut on_writer,
                &format!("fill-{volume}-{n}"),
                write(volume, n as u64 * UNIT, chunk.to_vec()),
            )
            .await;
        }
    }
    apply_ok(&mut on_writer, "protect", protect(1000, 5)).await;
    wait_for(
        "a first scheduled snapshot",
        Duration::from_secs(20),
        || {
            let mut client = on_writer.clone();
            async move { !scheduled(&mut client, "db-log").await.is_empty() }
        },
    )
    .await;
    let first = scheduled(&mut on_writer, "db-log").await[0].clone();

    // Overwrite after the snapshot; the snapshot still holds the bytes before.
    let after = pattern(8, SIZE as usize);
    for (n, chunk) in after.chunks(UNIT as usize).enumerate() {
        apply_ok(
            &mut on_writer,
            &format!("over-{n}"),
            write("db-log", n as u64 * UNIT, chunk.to_vec()),
        )
        .await;
    }

    // kill -9, 3.5 intervals down, start again on the same address: the schedule is in
    // its records and goes on by itself, and the runs it missed are counted and said.
    let address = writer.address.clone();
    writer.kill_9();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let writer = TestNode::start_at("prot-w", &base.path().join("w"), &address);
    let mut on_writer = writer.client(&controller).await;
    let before_restart = scheduled(&mut on_writer, "db-log").await;
    wait_for(
        "a snapshot after the restart",
        Duration::from_secs(20),
        || {
            let mut client = on_writer.clone();
            let known = before_restart.clone();
            async move {
                scheduled(&mut client, "db-log")
                    .await
                    .iter()
                    .any(|name| !known.contains(name))
            }
        },
    )
    .await;
    let status = protection_status(&mut on_writer).await.unwrap();
    assert!(status.missed >= 2, "missed runs counted: {status:?}");
    assert!(
        writer
            .log()
            .contains("protection: vm db (plan gold): missed"),
        "the node says so:\n{}",
        writer.log()
    );

    // The first snapshot, restored as a new volume, is the bytes before the overwrite.
    apply_ok(
        &mut on_writer,
        "restore-as",
        Action::CloneVolume(CloneVolume {
            volume: "db-log".into(),
            snapshot: first.clone(),
            name: "db-log-restored".into(),
        }),
    )
    .await;
    let mut restored = vec![];
    for n in 0..SIZE / (4 * UNIT) {
        restored.extend(read(&mut on_writer, "db-log-restored", n * 4 * UNIT, 4 * UNIT).await);
    }
    assert_eq!(
        crc32c::crc32c(&restored),
        crc32c::crc32c(&before),
        "{first} restored is the volume before the overwrite"
    );
    let mut now = vec![];
    for n in 0..SIZE / (4 * UNIT) {
        now.extend(read(&mut on_writer, "db-log", n * 4 * UNIT, 4 * UNIT).await);
    }
    assert!(now == after, "the volume itself holds the overwrite");
    println!(
        "restart: missed {} run(s), last {} ; {first} restored: crc32c {:08x}",
        status.missed,
        status.last_snapshot,
        crc32c::crc32c(&restored)
    );
}
