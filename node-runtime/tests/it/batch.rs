//! `Apply.ApplyBatch` (protocol 1.8) against a real `cairn-node` on 127.0.0.171: each
//! request of a batch is carried out as its own Apply would be (recorded under its
//! request id, answered by GetOutcome, replayed when sent again, failing alone), and a
//! batch that breaks the batch's rules is refused whole with nothing carried out.

use proto::v1::{
    ApplyBatchResult, CreateVolume, DeleteVolume, Outcome, ReadVolumeRequest, WriteVolume,
    apply_batch_result::Outcome as BatchOutcome, apply_request::Action,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern, request};

fn write(name: &str, offset: u64, seed: u64) -> Action {
    Action::WriteVolume(WriteVolume {
        name: name.into(),
        offset,
        data: pattern(seed, 4096),
    })
}

/// Each result's request id, and whether it was replayed (`Ok`) or the code it failed
/// with (`Err`).
fn outcomes(results: &[ApplyBatchResult]) -> Vec<(String, Result<bool, Code>)> {
    results
        .iter()
        .map(|r| {
            let outcome = match r.outcome.as_ref().expect("every result has an outcome") {
                BatchOutcome::Response(response) => Ok(response.replayed),
                BatchOutcome::Error(error) => Err(Code::from_i32(error.code)),
            };
            (r.request_id.clone(), outcome)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batchs_requests_are_carried_out_recorded_and_failed_one_by_one_and_a_bad_batch_not_at_all()
 {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start_on("batch-1", dir.path(), &controller, "127.0.0.171");
    let mut client = node.client(&controller).await;
    for name in ["a", "b"] {
        let create = Action::CreateVolume(CreateVolume {
            name: name.into(),
            size_bytes: 16 << 20,
            stripe_width: 1,
            stripe_unit_bytes: 64 << 10,
            replica_peers: vec![],
        });
        apply_ok(&mut client, &format!("create-{name}"), create).await;
    }

    let writes = || {
        vec![
            request("w-a", write("a", 0, 1)),
            request("w-missing", write("missing", 0, 2)),
            request("w-b", write("b", 4096, 3)),
        ]
    };
    let results = client.apply_batch(writes()).await.unwrap();
    let ok = |id: &str, replayed| (id.to_owned(), Ok(replayed));
    assert_eq!(
        outcomes(&results),
        vec![
            ok("w-a", false),
            ("w-missing".into(), Err(Code::NotFound)),
            ok("w-b", false)
        ]
    );
    let BatchOutcome::Error(error) = results[1].outcome.as_ref().unwrap() else {
        unreachable!()
    };
    assert!(error.message.contains("missing"), "{error:?}");
    let read = |name: &str, offset| ReadVolumeRequest {
        name: name.into(),
        offset,
        length: 4096,
    };
    assert_eq!(
        client.read_volume(read("a", 0)).await.unwrap(),
        pattern(1, 4096)
    );
    assert_eq!(
        client.read_volume(read("b", 4096)).await.unwrap(),
        pattern(3, 4096)
    );
    // Recorded as an Apply's: GetOutcome knows the done ones, not the failed one.
    let asker = client.clone();
    let outcome = |id: &'static str| {
        let mut client = asker.clone();
        async move { client.get_outcome(id).await.unwrap().outcome }
    };
    assert_eq!(outcome("w-a").await, Outcome::Succeeded as i32);
    assert_eq!(outcome("w-b").await, Outcome::Succeeded as i32);
    assert_eq!(outcome("w-missing").await, Outcome::NotFound as i32);
    // Sent again (a new signature, the same request ids): the done ones are replayed,
    // the failed one runs, and fails, again.
    let again = client.apply_batch(writes()).await.unwrap();
    assert_eq!(
        outcomes(&again),
        vec![
            ok("w-a", true),
            ("w-missing".into(), Err(Code::NotFound)),
            ok("w-b", true)
        ]
    );
    // A request id used for another action fails alone.
    let reused = client
        .apply_batch(vec![
            request("w-a", write("a", 0, 9)),
            request("w-b-2", write("b", 0, 4)),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes(&reused),
        vec![("w-a".into(), Err(Code::AlreadyExists)), ok("w-b-2", false)]
    );
    assert_eq!(
        client.read_volume(read("a", 0)).await.unwrap(),
        pattern(1, 4096)
    );

    // Batches refused whole, naming the field, with nothing carried out.
    let sender = client.clone();
    let refused = |batch| {
        let mut client = sender.clone();
        async move { client.apply_batch(batch).await.unwrap_err() }
    };
    let delete = Action::DeleteVolume(DeleteVolume { name: "a".into() });
    let status = refused(vec![
        request("w-before", write("b", 8192, 5)),
        request("delete-a", delete),
    ])
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("apply_batch_request.requests[1].action")
            && status.message().contains("delete_volume")
            && status.message().contains("sent alone in an Apply"),
        "{status:?}"
    );
    assert_eq!(outcome("w-before").await, Outcome::NotFound as i32);
    assert_eq!(outcome("delete-a").await, Outcome::NotFound as i32);
    assert_eq!(client.observe().await.unwrap().volumes.len(), 2);

    let status = refused(vec![
        request("twice", write("b", 0, 6)),
        request("twice", write("a", 0, 6)),
    ])
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("apply_batch_request.requests[1].request_id"),
        "{status:?}"
    );
    assert_eq!(outcome("twice").await, Outcome::NotFound as i32);

    let status = refused(vec![]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("has 0 requests"), "{status:?}");
    let many = (0..=proto::APPLY_BATCH_MAX)
        .map(|i| request(&format!("many-{i}"), write("b", 0, 7)))
        .collect();
    let status = refused(many).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("has 65 requests"), "{status:?}");
    assert_eq!(outcome("many-0").await, Outcome::NotFound as i32);

    // Controllers only.
    let stranger = crate::harness::controller();
    let status = node
        .client(&stranger)
        .await
        .apply_batch(vec![request("w-stranger", write("b", 0, 8))])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(outcome("w-stranger").await, Outcome::NotFound as i32);
}
