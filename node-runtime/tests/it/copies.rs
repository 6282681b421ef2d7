//! Copies rebuilt, never lost or recreated empty (issue 15 item 7): real `cairn-node`s
//! on 127.0.0.201-203 and the controller's epoch authority in a real state store. A
//! volume on cp-a (writer) and cp-b holds data; cp-b is killed for good; a new copy on
//! cp-c is added through the writer, receives every allocated byte, is caught up and
//! joins the in-sync set, byte for byte the writer's; cp-b's copy is then removed
//! while its node is dead.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use proto::auth::Identity;
use proto::v1::{
    AddVolumeCopy, CreateVolume, RemoveVolumeCopy, apply_request::Action,
    apply_response::Result as ApplyResult,
};

use crate::epochs::{
    CHUNK, VOLUME_BYTES, assert_refused, controller_step, read_copy, start, status, write_ok,
};
use crate::harness::{TestNode, apply_ok, controller, request};
use crate::lab::{peer_of, push_peers};

/// Sends the authority's epoch `state` to `node` (as the controller does).
async fn send_epoch(
    node: &TestNode,
    controller: &Identity,
    state: &reconciler::epochs::VolumeEpoch,
) {
    let mut client = node.client(controller).await;
    client
        .apply(request(
            &reconciler::epochs::request_id(state, &node.name),
            Action::SetVolumeEpoch(reconciler::epochs::install(state)),
        ))
        .await
        .unwrap_or_else(|status| {
            panic!("install epoch {} on {}: {status:?}", state.epoch, node.name)
        });
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|name| name.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_copy_is_rebuilt_on_another_node_from_the_writer_and_joins_only_when_it_holds_every_byte()
 {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut nodes: Vec<TestNode> = [("cp-a", "201"), ("cp-b", "202"), ("cp-c", "203")]
        .iter()
        .map(|(name, ip)| {
            start(
                name,
                &base.path().join(name),
                &controller,
                &format!("127.0.0.{ip}:0"),
                &[],
            )
        })
        .collect();
    push_peers(&nodes.iter().collect::<Vec<_>>(), &controller).await;
    let mut writer = nodes[0].client(&controller).await;
    apply_ok(
        &mut writer,
        "create-v",
        Action::CreateVolume(CreateVolume {
            name: "v".into(),
            size_bytes: VOLUME_BYTES,
            stripe_width: 2,
            stripe_unit_bytes: 1 << 20,
            replica_peers: vec![peer_of(&nodes[1])],
        }),
    )
    .await;
    let state = reconciler::state::RedbStore::open(&base.path().join("state.redb")).unwrap();
    let authority = reconciler::epochs::EpochAuthority::new(&state);

    // Before any epoch, no copy may be added: at epoch 0 every copy counts as in sync.
    let early = writer
        .apply(request(
            "add-early",
            Action::AddVolumeCopy(AddVolumeCopy {
                volume: "v".into(),
                peer: Some(peer_of(&nodes[2])),
            }),
        ))
        .await;
    assert_refused(early, &["no epoch from the controller yet"]);

    // The authority adopts the volume (writer cp-a, in sync cp-a and cp-b).
    let all: Vec<&TestNode> = nodes.iter().collect();
    controller_step(&authority, &all, &controller).await;
    // 3 MiB written, spread over the volume, on both copies.
    let written: Vec<u64> = (0..48).map(|i| i * 7 % (VOLUME_BYTES / CHUNK)).collect();
    for (n, index) in written.iter().enumerate() {
        let copies = write_ok(&mut writer, &format!("w{n}"), *index, *index + 1).await;
        assert_eq!(copies, 2);
    }

    // cp-b dies for good; the authority takes it out of the in-sync set.
    nodes[1].kill_9();
    let epoch = authority.get("v").unwrap().unwrap();
    let failed = authority
        .fail_over("v", epoch.epoch, &names(&["cp-b"]), "cp-a", "cp-b failed")
        .unwrap();
    send_epoch(&nodes[0], &controller, &failed).await;
    let before = status(&nodes[0], &controller).await;
    assert_eq!(before.in_sync, ["cp-a"]);
    let allocated = before.allocated_bytes;
    assert!(allocated >= written.len() as u64 * CHUNK, "{before:?}");

    let add = Action::AddVolumeCopy(AddVolumeCopy {
        volume: "v".into(),
        peer: Some(peer_of(&nodes[2])),
    });

    // The rebuild: a new copy on cp-c in the authority, then through the writer.
    let grown = authority
        .new_copy("v", failed.epoch, "cp-c", "cp-b lost")
        .unwrap();
    assert_eq!(grown.in_sync, names(&["cp-a"]));
    let added = apply_ok(&mut writer, "add-c", add.clone()).await;
    match added.result {
        Some(ApplyResult::Volume(volume)) => {
            assert_eq!(volume.replica_peers, ["cp-b", "cp-c"], "{volume:?}")
        }
        other => panic!("unexpected result {other:?}"),
    }
    // Adding it again changes nothing.
    apply_ok(&mut writer, "add-c-again", add).await;
    let shipped_before = status(&nodes[0], &controller).await.resync_bytes;
    let seen = status(&nodes[0], &controller).await;
    assert_eq!(seen.copies, ["cp-a", "cp-b", "cp-c"]);
    assert!(!seen.caught_up.contains(&"cp-c".to_string()), "{seen:?}");
    // The new copy is not at the writer's epoch yet: nothing is shipped to it, and
    // its whole allocation stays to be shipped.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let waiting = status(&nodes[0], &controller).await;
    assert!(waiting.caught_up.is_empty(), "{waiting:?}");
    assert!(
        waiting.resync_pending_bytes >= allocated,
        "pending {} < allocated {allocated}",
        waiting.resync_pending_bytes
    );
    // A write meanwhile is acknowledged by the writer alone, and owed to cp-c.
    assert_eq!(write_ok(&mut writer, "w-during", 3, 1000).await, 1);

    // The controller steps: the epoch reaches cp-c, the writer ships, reports it caught
    // up, and the authority adds it to the in-sync set. Never before every allocated
    // byte was shipped.
    let started = Instant::now();
    let live: Vec<&TestNode> = vec![&nodes[0], &nodes[2]];
    let mut progress = Vec::new();
    loop {
        controller_step(&authority, &live, &controller).await;
        let seen = status(&nodes[0], &controller).await;
        let shipped = seen.resync_bytes - shipped_before;
        progress.push((shipped, seen.resync_pending_bytes));
        let joined = seen.in_sync.contains(&"cp-c".to_string());
        if joined || seen.caught_up.contains(&"cp-c".to_string()) {
            assert!(
                shipped >= allocated,
                "cp-c reported caught up after {shipped} of {allocated} bytes: {seen:?}"
            );
        }
        if joined {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cp-c did not join within 30 s: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = status(&nodes[0], &controller).await;
    let shipped = seen.resync_bytes - shipped_before;
    eprintln!(
        "rebuild of cp-c: {shipped} bytes shipped for {allocated} allocated on the writer, in sync after {:?}; (shipped, pending) seen: {progress:?}",
        started.elapsed()
    );
    assert_eq!(seen.in_sync, ["cp-a", "cp-c"]);
    // Only what the dead cp-b is owed (the write made while cp-c caught up) is left.
    assert_eq!(seen.resync_pending_bytes, CHUNK);
    let on_c = status(&nodes[2], &controller).await;
    assert_eq!(on_c.epoch, seen.epoch);
    assert_eq!(on_c.allocated_bytes, allocated, "{on_c:?}");
    let (a_bytes, a_sums) = read_copy(&nodes[0], &controller, 0, VOLUME_BYTES).await;
    let (c_bytes, c_sums) = read_copy(&nodes[2], &controller, 0, VOLUME_BYTES).await;
    assert_eq!(a_sums, c_sums, "block checksums of cp-a and cp-c differ");
    assert!(a_bytes == c_bytes, "bytes of cp-a and cp-c differ");
    // Copies change only through the writer.
    let mut on_c = nodes[2].client(&controller).await;
    let elsewhere = Action::AddVolumeCopy(AddVolumeCopy {
        volume: "v".into(),
        peer: Some(peer_of(&nodes[1])),
    });
    assert_refused(
        on_c.apply(request("add-b-on-c", elsewhere)).await,
        &["node cp-c is not the writer", "on its writer, node cp-a"],
    );

    // A copy in the in-sync set is not removed; cp-b's, on a dead node, is forgotten.
    let remove = |node: &str| {
        Action::RemoveVolumeCopy(RemoveVolumeCopy {
            volume: "v".into(),
            node: node.into(),
        })
    };
    assert_refused(
        writer.apply(request("remove-c", remove("cp-c"))).await,
        &["in the in-sync set"],
    );
    let current = authority.get("v").unwrap().unwrap();
    let dropped = authority
        .drop_copy("v", current.epoch, "cp-b", "cp-b lost")
        .unwrap();
    for node in [&nodes[2], &nodes[0]] {
        send_epoch(node, &controller, &dropped).await;
    }
    let removing = Instant::now();
    apply_ok(&mut writer, "remove-b", remove("cp-b")).await;
    eprintln!(
        "removed cp-b's copy (node dead) in {:?}",
        removing.elapsed()
    );
    let seen = status(&nodes[0], &controller).await;
    assert_eq!(seen.copies, ["cp-a", "cp-c"]);
    assert_eq!(seen.replica_peers, ["cp-c"]);
    assert_eq!(seen.resync_pending_bytes, 0);
    assert_eq!(
        seen.health,
        proto::v1::Health::Healthy as i32,
        "{}",
        seen.detail
    );
    // Writes reach both copies again.
    assert_eq!(write_ok(&mut writer, "w-after", 5, 2000).await, 2);

    // The writer's copy list survives a restart of its node.
    let address = nodes[0].address.clone();
    nodes[0].kill_9();
    nodes[0] = start(
        "cp-a",
        &base.path().join("cp-a"),
        &controller,
        &address,
        &[],
    );
    let after = status(&nodes[0], &controller).await;
    assert_eq!(after.copies, ["cp-a", "cp-c"]);
    let mut writer = nodes[0].client(&controller).await;
    assert_eq!(write_ok(&mut writer, "w-restarted", 6, 3000).await, 2);
    let (a_bytes, a_sums) = read_copy(&nodes[0], &controller, 0, VOLUME_BYTES).await;
    let (c_bytes, c_sums) = read_copy(&nodes[2], &controller, 0, VOLUME_BYTES).await;
    assert_eq!(a_sums, c_sums);
    assert!(a_bytes == c_bytes);
}
