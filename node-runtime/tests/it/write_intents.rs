//! What replaced the two per-write syncs of a replicated write (issue 15's throughput
//! budget): the writer's activity log (`volumes/activity.rs`) and the replicas'
//! sessions (`volumes/sessions.rs`). Real `cairn-node`s on 127.0.0.51-52, faults by
//! signal.

use std::time::{Duration, Instant};

use proto::auth::RequestSigner;
use proto::methods;
use proto::v1::ReplicaWriteRequest;
use proto::v1::replication_client::ReplicationClient;
use tonic::Code;

use crate::epochs::{
    CHUNK, VOLUME_BYTES, cluster_of, power_cut, read_copy, start, write, write_ok,
};
use crate::harness::{TestNode, controller, pattern, request};
use crate::lab::{client_as, identity_of};

/// Sends a signal to a test node's process.
fn signal(node: &TestNode, signal: libc::c_int) {
    let pid = node.pid() as libc::pid_t;
    // SAFETY: kill(2) with the pid of our own child and a valid signal touches no memory.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(sent, 0, "signal {signal} to {}", node.name);
}

/// ia-a (the writer) and ia-b (its replica), volume `v` of 32 MiB, epoch 0.
async fn pair(
    base: &std::path::Path,
    controller: &proto::auth::Identity,
    env: &[(&str, &str)],
) -> Vec<TestNode> {
    cluster_of(base, controller, env, &[("ia-a", "51"), ("ia-b", "52")]).await
}

/// The writer dies (kill -9 and a power cut) while a write is on its own copy but not
/// on the replica, which never gets it. No per-write intent was recorded (the replica
/// did not fail: it was stopped, and the writer was still waiting for it); only the
/// extent the write made hot protects the region. After the restart the writer must
/// find that region and bring it onto the replica: if the intent were lost, the two
/// copies would keep different bytes there forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_writer_killed_mid_write_settles_the_region_after_its_restart() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    // The writer waits a minute for a copy that does not answer: it is killed first.
    let env = [("CAIRN_VOLUME_FREEZE_MS", "60000")];
    let mut nodes = pair(base.path(), &controller, &env).await;
    let mut writer = nodes[0].client(&controller).await;
    for index in 0..4 {
        assert_eq!(
            write_ok(&mut writer, &format!("w{index}"), index, 100 + index).await,
            2
        );
    }
    let region = (3 * CHUNK, CHUNK);
    let old = pattern(103, CHUNK as usize);
    let new = pattern(7, CHUNK as usize);
    assert_eq!(
        read_copy(&nodes[1], &controller, region.0, region.1)
            .await
            .0,
        old
    );

    // The replica stops answering; the write reaches the writer's copy only.
    signal(&nodes[1], libc::SIGSTOP);
    let writer_address = nodes[0].address.clone();
    let address = writer_address.clone();
    let in_flight = {
        let controller = controller.clone();
        tokio::spawn(async move {
            let mut client = proto::client::NodeClient::connect(
                &address,
                RequestSigner::new(controller.clone()),
            )
            .await
            .unwrap();
            client.apply(request("w-lost", write(3, 7))).await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if read_copy(&nodes[0], &controller, region.0, region.1)
            .await
            .0
            == new
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the write did not reach the writer's copy within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its fdatasync is done well before this.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!in_flight.is_finished(), "the write waits for the replica");
    power_cut(&mut nodes[0]);
    in_flight.abort();
    // The replica dies too, so the write still queued in its socket is never applied.
    signal(&nodes[1], libc::SIGCONT);
    nodes[1].kill_9();
    let b_address = nodes[1].address.clone();
    nodes[1] = start(
        "ia-b",
        &base.path().join("ia-b"),
        &controller,
        &b_address,
        &env,
    );
    nodes[0] = start(
        "ia-a",
        &base.path().join("ia-a"),
        &controller,
        &writer_address,
        &env,
    );
    assert_eq!(
        read_copy(&nodes[0], &controller, region.0, region.1)
            .await
            .0,
        new,
        "the writer's own copy kept the write (it was synced before the cut)"
    );
    // The background settle (every second) ships the region.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let replica = read_copy(&nodes[1], &controller, region.0, region.1).await;
        if replica.0 == new {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica still holds the old bytes 30 s after the writer's restart: the write's intent was lost\n{}",
            nodes[0].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let writer_copy = read_copy(&nodes[0], &controller, 0, VOLUME_BYTES).await;
    let replica_copy = read_copy(&nodes[1], &controller, 0, VOLUME_BYTES).await;
    assert!(
        writer_copy == replica_copy,
        "the copies differ after the settle"
    );
    // And the volume takes writes again, on both copies.
    let mut writer = nodes[0].client(&controller).await;
    assert_eq!(write_ok(&mut writer, "w-after", 5, 5).await, 2);
}

/// A replica write in the replica's session keeps its nonce in memory only; a copy of
/// it is refused as a replay while that process runs, and after the replica restarts
/// it names a session that no longer exists and is refused before anything is done
/// (the durable nonce used to refuse it).
#[tokio::test(flavor = "multi_thread")]
async fn a_captured_session_write_is_refused_again_and_after_the_replica_restarts() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut nodes = pair(base.path(), &controller, &[]).await;
    let data = pattern(9, 4096);
    let write = |boot: Vec<u8>, sequence: u64| ReplicaWriteRequest {
        volume: "v".into(),
        offset: 0,
        checksums: vec![crc32c::crc32c(&data)],
        data: data.clone(),
        sequence,
        resync: false,
        epoch: 0,
        replica_boot: boot,
    };
    // As the writer: the first write (no session) learns the replica's boot id.
    let mut as_writer = client_as(&nodes[0], &nodes[1]).await;
    let boot = as_writer
        .replica_write_in_session(write(Vec::new(), 1 << 40))
        .await
        .unwrap()
        .replica_boot;
    assert_eq!(boot.len(), 16);
    // A signed session write, captured.
    let target = proto::auth::NodeTarget {
        name: nodes[1].name.clone(),
        public_key_hex: nodes[1].public_key_hex(),
    };
    let signed = RequestSigner::new(identity_of(&nodes[0]))
        .sign(
            methods::REPLICA_WRITE,
            &target,
            write(boot.clone(), (1 << 40) + 1),
        )
        .unwrap();
    let copy = |signed: &tonic::Request<ReplicaWriteRequest>| {
        let mut again = tonic::Request::new(signed.get_ref().clone());
        *again.metadata_mut() = signed.metadata().clone();
        again
    };
    let endpoint = format!("http://{}", nodes[1].address);
    let mut raw = ReplicationClient::connect(endpoint.clone()).await.unwrap();
    let answer = raw.replica_write(copy(&signed)).await.unwrap().into_inner();
    assert_eq!(answer.replica_boot, boot, "the same session");
    let replayed = raw.replica_write(copy(&signed)).await.unwrap_err();
    assert_eq!(replayed.code(), Code::Unauthenticated, "{replayed:?}");
    assert!(replayed.message().contains("replayed"), "{replayed:?}");

    // The replica restarts: the in-memory nonce is gone, and so is the session.
    nodes[1].kill_9();
    let address = nodes[1].address.clone();
    nodes[1] = start(
        "ia-b",
        &base.path().join("ia-b"),
        &controller,
        &address,
        &[],
    );
    let mut raw = ReplicationClient::connect(format!("http://{}", nodes[1].address))
        .await
        .unwrap();
    let refused = raw.replica_write(copy(&signed)).await.unwrap_err();
    let offered = session_refusal(&refused);
    assert_eq!(offered.len(), 32);
    assert_ne!(
        offered,
        boot.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    // The writer's own path re-sends in the new session by itself.
    let mut writer = nodes[0].client(&controller).await;
    assert_eq!(write_ok(&mut writer, "w-new-session", 1, 1).await, 2);
    assert_eq!(write_ok(&mut writer, "w-in-session", 2, 2).await, 2);
    // (The first block holds the raw writes, sent to the replica only.)
    let a = read_copy(&nodes[0], &controller, CHUNK, 2 * CHUNK).await;
    let b = read_copy(&nodes[1], &controller, CHUNK, 2 * CHUNK).await;
    assert!(a == b, "the copies differ");
}

/// The new session a refusal of another session's write offers (hex), after checking
/// it is that refusal (`volumes/sessions.rs`).
pub(crate) fn session_refusal(refused: &tonic::Status) -> String {
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("another session"), "{refused:?}");
    refused
        .metadata()
        .get("x-cairn-replica-boot")
        .expect("the refusal names the new session")
        .to_str()
        .unwrap()
        .to_string()
}
