//! Idempotent Apply: a request id is carried out at most once, also across restarts.

use proto::v1::{
    CreateVolume, DeleteVolume, ReadVolumeRequest, VolumeRole, WriteVolume, apply_request::Action,
    apply_response::Result as ApplyResult,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern, request};

fn create(name: &str) -> Action {
    Action::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: 16 << 20,
        stripe_width: 4,
        stripe_unit_bytes: 64 << 10,
        replica_peers: vec![],
    })
}

fn write(name: &str, offset: u64, data: Vec<u8>) -> Action {
    Action::WriteVolume(WriteVolume {
        name: name.into(),
        offset,
        data,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_request_id_returns_the_recorded_result_and_is_not_done_twice() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut node = TestNode::start("idem-1", dir.path(), &controller);
    let mut client = node.client(&controller).await;

    let created = apply_ok(&mut client, "create-v", create("v")).await;
    assert!(!created.replayed);
    let again = apply_ok(&mut client, "create-v", create("v")).await;
    assert!(again.replayed, "the retry is answered from the record");
    assert_eq!(again.applied_at_unix_ms, created.applied_at_unix_ms);
    assert_eq!(again.result, created.result);

    let first = pattern(1, 8192);
    let second = pattern(2, 8192);
    apply_ok(&mut client, "write-a", write("v", 65536, first.clone())).await;
    apply_ok(&mut client, "write-b", write("v", 65536, second.clone())).await;
    // Retrying write-a must not write `first` again over `second`.
    let retried = apply_ok(&mut client, "write-a", write("v", 65536, first.clone())).await;
    assert!(retried.replayed);
    let read = ReadVolumeRequest {
        name: "v".into(),
        offset: 65536,
        length: 8192,
    };
    assert_eq!(client.read_volume(read.clone()).await.unwrap(), second);

    // The request-id table is durable: after a crash the retry is still a replay.
    node.kill_9();
    let node = TestNode::start_at("idem-1", dir.path(), "127.0.0.1:0");
    let mut client = node.client(&controller).await;
    let after_restart = apply_ok(&mut client, "write-a", write("v", 65536, first)).await;
    assert!(after_restart.replayed);
    assert_eq!(
        client.read_volume(read).await.unwrap(),
        second,
        "acknowledged data survives kill -9"
    );
    let observed = client.observe().await.unwrap();
    assert_eq!(observed.volumes.len(), 1);
    assert_eq!(observed.volumes[0].role, VolumeRole::Primary as i32);
    assert_eq!(observed.volumes[0].stripe_width, 4);
    assert!(
        observed.volumes[0].allocated_bytes >= 64 << 10,
        "thin volume allocated on write"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_id_reused_for_another_action_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("idem-2", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    apply_ok(&mut client, "id-1", create("a")).await;
    let status = client
        .apply(request("id-1", create("b")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("id-1"), "{}", status.message());
    let observed = client.observe().await.unwrap();
    assert_eq!(
        observed
            .volumes
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_are_idempotent_under_new_request_ids_too() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("idem-3", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    apply_ok(&mut client, "c-1", create("v")).await;
    let second = apply_ok(&mut client, "c-2", create("v")).await;
    assert!(!second.replayed);
    assert!(matches!(second.result, Some(ApplyResult::Volume(_))));
    // The same name with another shape is a conflict, not a silent change.
    let conflicting = Action::CreateVolume(CreateVolume {
        name: "v".into(),
        size_bytes: 32 << 20,
        stripe_width: 4,
        stripe_unit_bytes: 64 << 10,
        replica_peers: vec![],
    });
    let status = client.apply(request("c-3", conflicting)).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    apply_ok(
        &mut client,
        "d-1",
        Action::DeleteVolume(DeleteVolume { name: "v".into() }),
    )
    .await;
    apply_ok(
        &mut client,
        "d-2",
        Action::DeleteVolume(DeleteVolume { name: "v".into() }),
    )
    .await;
    assert!(client.observe().await.unwrap().volumes.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_retries_of_one_request_id_do_the_action_once() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("idem-4", dir.path(), &controller);
    let client = node.client(&controller).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.apply(request("same", create("v"))).await
        }));
    }
    let mut fresh = 0;
    for task in tasks {
        let response = task.await.unwrap().expect("every retry succeeds");
        if !response.replayed {
            fresh += 1;
        }
    }
    assert_eq!(
        fresh, 1,
        "exactly one of the concurrent retries carried the action out"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_gives_a_clean_error_and_keeps_acknowledged_data() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("trusted-controllers"),
        format!("{}\n", controller.public_key_hex()),
    )
    .unwrap();
    // One 2 MiB disk under a thin 16 MiB volume.
    let node = TestNode::start_with_disks("full-1", dir.path(), "127.0.0.1:0", 1, 2 << 20);
    let mut client = node.client(&controller).await;
    apply_ok(
        &mut client,
        "create",
        Action::CreateVolume(CreateVolume {
            name: "thin".into(),
            size_bytes: 16 << 20,
            stripe_width: 1,
            stripe_unit_bytes: 64 << 10,
            replica_peers: vec![],
        }),
    )
    .await;
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for index in 0..64u64 {
        let data = pattern(index, 256 << 10);
        match client
            .apply(request(
                &format!("fill-{index}"),
                write("thin", index * (256 << 10), data.clone()),
            ))
            .await
        {
            Ok(_) => acknowledged.push((index, data)),
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("a 2 MiB disk cannot hold 16 MiB");
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        refusal.message().contains("no space"),
        "{}",
        refusal.message()
    );
    assert!(!acknowledged.is_empty());
    for (index, data) in &acknowledged {
        let read = client
            .read_volume(ReadVolumeRequest {
                name: "thin".into(),
                offset: index * (256 << 10),
                length: 256 << 10,
            })
            .await
            .unwrap();
        assert!(
            read == *data,
            "acknowledged write {index} intact after the disk filled up"
        );
    }
    assert_eq!(client.get_inventory().await.unwrap().node_name, "full-1");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_records_older_than_the_retention_are_pruned_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut node = TestNode::start("prune-1", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    apply_ok(&mut client, "old", create("v")).await;
    assert!(apply_ok(&mut client, "old", create("v")).await.replayed);
    assert_eq!(node.terminate(), Some(0));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let node = TestNode::start_with_args(
        "prune-1",
        dir.path(),
        "127.0.0.1:0",
        &["--request-retention", "1"],
    );
    let mut client = node.client(&controller).await;
    let again = apply_ok(&mut client, "old", create("v")).await;
    assert!(
        !again.replayed,
        "the record expired, so the (idempotent) action ran again"
    );
    assert_eq!(client.observe().await.unwrap().volumes.len(), 1);
}

/// Issue 12 item 6: a client that goes away mid-call (killed, timed out) must not make
/// the node carry an action out twice. The replica is stopped (SIGSTOP) so a replicated
/// write hangs after the primary wrote its own copy; the client gives up; the replica
/// resumes. The node finishes and records the write although nobody waits for it, and
/// the re-sent request is answered from the record.
#[tokio::test(flavor = "multi_thread")]
async fn an_apply_whose_caller_went_away_is_finished_recorded_and_replayed() {
    use crate::lab::{peer_of, pid_of, push_peers, start_at_ip};
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let primary = start_at_ip("lab-6", &base.path().join("p"), &controller, "127.0.0.58");
    let replica = start_at_ip("lab-7", &base.path().join("r"), &controller, "127.0.0.59");
    push_peers(&[&primary, &replica], &controller).await;
    let mut client = primary.client(&controller).await;
    apply_ok(
        &mut client,
        "create-v",
        Action::CreateVolume(CreateVolume {
            name: "v".into(),
            size_bytes: 16 << 20,
            stripe_width: 1,
            stripe_unit_bytes: 64 << 10,
            replica_peers: vec![peer_of(&replica)],
        }),
    )
    .await;
    let first = pattern(11, 8192);
    let second = pattern(12, 8192);

    let replica_pid = pid_of(&replica);
    // SAFETY: kill takes a pid and a signal number; it has no memory effects.
    unsafe { libc::kill(replica_pid, libc::SIGSTOP) };
    let abandoned = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        client.apply(request("write-1", write("v", 0, first.clone()))),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the write must hang while the replica is stopped"
    );
    // The client future is dropped: the call is cancelled (RST_STREAM). Give the node
    // time to notice before the replica comes back.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // SAFETY: as above.
    unsafe { libc::kill(replica_pid, libc::SIGCONT) };

    let resent = apply_ok(&mut client, "write-1", write("v", 0, first.clone())).await;
    assert!(
        resent.replayed,
        "the abandoned write was finished and recorded; the re-sent one is answered from the record"
    );
    apply_ok(&mut client, "write-2", write("v", 0, second.clone())).await;
    let again = apply_ok(&mut client, "write-1", write("v", 0, first.clone())).await;
    assert!(again.replayed);
    // write-1 happened once: it did not come back over write-2, on either copy.
    let read = ReadVolumeRequest {
        name: "v".into(),
        offset: 0,
        length: 8192,
    };
    assert!(client.read_volume(read.clone()).await.unwrap() == second);
    let mut on_replica = replica.client(&controller).await;
    assert!(on_replica.read_volume(read).await.unwrap() == second);
}
