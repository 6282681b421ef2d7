//! `Apply.GetOutcome`: what became of a request id, read from the request log, waiting
//! for an Apply of that id that is still being carried out.

use std::time::Duration;

use proto::v1::{
    CreateVolume, Outcome, Peer, SetPeers, WriteVolume, apply_request::Action,
    apply_response::Result as ApplyResult,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern, request};

fn create(name: &str, replica_peers: Vec<Peer>) -> Action {
    Action::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: 16 << 20,
        stripe_width: 2,
        stripe_unit_bytes: 64 << 10,
        replica_peers,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn get_outcome_answers_succeeded_for_a_done_request_and_not_found_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start_on("outcome-1", dir.path(), &controller, "127.0.0.71");
    let mut client = node.client(&controller).await;

    let done = apply_ok(&mut client, "create-v", create("v", vec![])).await;
    let outcome = client.get_outcome("create-v").await.unwrap();
    assert_eq!(outcome.request_id, "create-v");
    assert_eq!(outcome.outcome, Outcome::Succeeded as i32);
    let recorded = outcome.response.expect("the recorded response");
    assert!(recorded.replayed, "nothing was carried out now");
    assert_eq!(recorded.applied_at_unix_ms, done.applied_at_unix_ms);
    assert_eq!(recorded.result, done.result);
    assert!(matches!(recorded.result, Some(ApplyResult::Volume(_))));

    // Never seen: NOT_FOUND, and asking carries nothing out.
    let unknown = client.get_outcome("never-sent").await.unwrap();
    assert_eq!(unknown.outcome, Outcome::NotFound as i32);
    assert!(unknown.response.is_none());
    // A failure is not recorded: NOT_FOUND too.
    let failed = client
        .apply(request(
            "write-missing",
            Action::WriteVolume(WriteVolume {
                name: "missing".into(),
                offset: 0,
                data: vec![1; 4096],
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::NotFound);
    let outcome = client.get_outcome("write-missing").await.unwrap();
    assert_eq!(outcome.outcome, Outcome::NotFound as i32);
    assert_eq!(client.observe().await.unwrap().volumes.len(), 1);

    // A bad request id names the field.
    let status = client.get_outcome("bad id").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("get_outcome_request.request_id"),
        "{}",
        status.message()
    );
    // Controllers only.
    let stranger = crate::harness::controller();
    let status = node
        .client(&stranger)
        .await
        .get_outcome("create-v")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_outcome_waits_for_an_apply_of_the_same_id_that_is_still_running() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let primary = TestNode::start_on(
        "outcome-p",
        &base.path().join("p"),
        &controller,
        "127.0.0.72",
    );
    let replica = TestNode::start_on(
        "outcome-r",
        &base.path().join("r"),
        &controller,
        "127.0.0.73",
    );
    let peers: Vec<Peer> = [&primary, &replica]
        .iter()
        .map(|node| Peer {
            name: node.name.clone(),
            address: node.address.clone(),
            public_key_hex: node.public_key_hex(),
        })
        .collect();
    for node in [&primary, &replica] {
        let mut client = node.client(&controller).await;
        apply_ok(
            &mut client,
            "peers",
            Action::SetPeers(SetPeers {
                peers: peers.clone(),
            }),
        )
        .await;
    }
    let mut client = primary.client(&controller).await;
    let replica_peer = Peer {
        name: replica.name.clone(),
        ..Default::default()
    };
    apply_ok(&mut client, "create", create("v", vec![replica_peer])).await;

    // A write that cannot finish while its replica is frozen: the slow action.
    // SAFETY: kill takes a pid and a signal number; it has no memory effects.
    unsafe { libc::kill(replica.pid() as libc::pid_t, libc::SIGSTOP) };
    let data = pattern(7, 64 << 10);
    let mut writer = client.clone();
    let write = tokio::spawn(async move {
        writer
            .apply(request(
                "slow-write",
                Action::WriteVolume(WriteVolume {
                    name: "v".into(),
                    offset: 0,
                    data,
                }),
            ))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut asker = client.clone();
    let outcome = tokio::spawn(async move { asker.get_outcome("slow-write").await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let still_waiting = !outcome.is_finished();
    let write_still_running = !write.is_finished();
    // SAFETY: as above.
    unsafe { libc::kill(replica.pid() as libc::pid_t, libc::SIGCONT) };
    assert!(
        write_still_running,
        "the write finished with its replica frozen"
    );
    assert!(
        still_waiting,
        "GetOutcome answered while the request was still being carried out"
    );

    let written = write
        .await
        .unwrap()
        .expect("the write succeeds once the replica thaws");
    let outcome = tokio::time::timeout(Duration::from_secs(30), outcome)
        .await
        .expect("GetOutcome answers once the write is done")
        .unwrap()
        .unwrap();
    assert_eq!(outcome.outcome, Outcome::Succeeded as i32);
    let recorded = outcome.response.unwrap();
    assert_eq!(recorded.result, written.result);
    assert_eq!(recorded.applied_at_unix_ms, written.applied_at_unix_ms);
}
