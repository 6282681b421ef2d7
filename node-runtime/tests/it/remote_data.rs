//! Remote data (issue 15, item 2): a VM runs on a node that holds no copy of its
//! volume. The controller names that node a client in the volume's epoch; its storage
//! client reads from the nearest in-sync copy and writes through the writer, which
//! replicates every write to the in-sync copies before the guest hears of it. Real
//! `cairn-node`s on 127.0.0.121-124: rd-a (primary, the writer), rd-b (replica),
//! rd-c (the client), rd-d (another node); real KVM guests where /dev/kvm is usable.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proto::auth::{Identity, RequestSigner};
use proto::methods;
use proto::v1::{
    ClientOpenRequest, ClientReadRequest, ClientWriteRequest, CreateVm, CreateVolume,
    ReadVolumeRequest, SetVolumeEpoch, StartVm, StopVm, VmDiskStatus, VmState, VmStatus,
    apply_request::Action, create_vm::Image, replication_client::ReplicationClient,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, pattern, request};
use crate::lab::{client_as, identity_of, peer_of, push_peers, start_at_ip, target_of};
use crate::vm_disks::{await_block_tests, observe_vm};
use crate::vms::vms_can_run;
use crate::write_intents::session_refusal;

const VOLUME_BYTES: u64 = 8 << 20;

/// rd-a (primary of `volume`, replica on rd-b), rd-c and, with `fourth`, rd-d; every
/// node knows every other (SetPeers).
async fn cluster(base: &Path, controller: &Identity, volume: &str, fourth: bool) -> Vec<TestNode> {
    let mut names = vec![("rd-a", "121"), ("rd-b", "122"), ("rd-c", "123")];
    if fourth {
        names.push(("rd-d", "124"));
    }
    let nodes: Vec<TestNode> = names
        .iter()
        .map(|(name, ip)| start_at_ip(name, &base.join(name), controller, &format!("127.0.0.{ip}")))
        .collect();
    push_peers(&nodes.iter().collect::<Vec<_>>(), controller).await;
    let mut primary = nodes[0].client(controller).await;
    apply_ok(
        &mut primary,
        "create-volume",
        Action::CreateVolume(CreateVolume {
            name: volume.into(),
            size_bytes: VOLUME_BYTES,
            stripe_width: 2,
            stripe_unit_bytes: 1 << 20,
            replica_peers: vec![peer_of(&nodes[1])],
        }),
    )
    .await;
    nodes
}

/// Installs an epoch of `volume` (writer rd-a, in sync rd-a and rd-b) with `clients` on
/// `nodes`, in order: the copies first, the writer last, as the authority does.
async fn install(
    nodes: &[&TestNode],
    controller: &Identity,
    volume: &str,
    epoch: u64,
    clients: &[&str],
) -> Vec<Result<(), tonic::Status>> {
    let mut results = Vec::new();
    for node in nodes {
        let mut client = node.client(controller).await;
        let result = client
            .apply(request(
                &format!("epoch.{volume}.{epoch}.{}.{}", node.name, clients.join(".")),
                Action::SetVolumeEpoch(SetVolumeEpoch {
                    name: volume.into(),
                    epoch,
                    writer: "rd-a".into(),
                    in_sync: vec!["rd-a".into(), "rd-b".into()],
                    clients: clients.iter().map(|name| name.to_string()).collect(),
                }),
            ))
            .await
            .map(|_| ());
        results.push(result);
    }
    results
}

async fn install_ok(
    nodes: &[&TestNode],
    controller: &Identity,
    volume: &str,
    epoch: u64,
    clients: &[&str],
) {
    for (node, result) in nodes
        .iter()
        .zip(install(nodes, controller, volume, epoch, clients).await)
    {
        if let Err(status) = result {
            panic!(
                "install epoch {epoch} of {volume} on {}: {status:?}",
                node.name
            );
        }
    }
}

/// `length` bytes of `volume` at `offset` on `node`'s copy, read as the controller.
async fn copy_bytes(
    node: &TestNode,
    controller: &Identity,
    volume: &str,
    offset: u64,
    length: u64,
) -> Vec<u8> {
    let mut client = node.client(controller).await;
    let mut bytes = Vec::new();
    // At most 4 MiB per call.
    for at in (offset..offset + length).step_by(4 << 20) {
        let piece = client
            .read_volume(ReadVolumeRequest {
                name: volume.into(),
                offset: at,
                length: (offset + length - at).min(4 << 20),
            })
            .await
            .unwrap_or_else(|status| panic!("read {volume} on {}: {status:?}", node.name));
        bytes.extend(piece);
    }
    bytes
}

fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    parts: &[&str],
) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    for part in parts {
        assert!(
            status.message().contains(part),
            "`{}` does not say `{part}`",
            status.message()
        );
    }
}

fn write_request(epoch: u64, offset: u64, data: &[u8]) -> ClientWriteRequest {
    ClientWriteRequest {
        volume: "v".into(),
        offset,
        data: data.to_vec(),
        epoch,
        checksums: data.chunks(4096).map(crc32c::crc32c).collect(),
        writer_boot: Vec::new(),
    }
}

/// A client write in the writer's session (`ClientWriteRequest.writer_boot`, protocol
/// 1.6) keeps its nonce in memory only on the writer; a captured copy is refused as a
/// replay while the writer runs, and after the writer restarts (kill -9) it names a
/// session that no longer exists and is refused before anything is written, with the
/// new session in `x-cairn-replica-boot`.
#[tokio::test(flavor = "multi_thread")]
async fn a_captured_client_write_is_refused_again_and_after_the_writer_restarts() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut nodes = cluster(base.path(), &controller, "v", false).await;
    install_ok(
        &[&nodes[1], &nodes[2], &nodes[0]],
        &controller,
        "v",
        1,
        &["rd-c"],
    )
    .await;
    // rd-c's first write names no session and learns the writer's.
    let first = client_as(&nodes[2], &nodes[0])
        .await
        .client_write(write_request(1, 0, &pattern(21, 8192)))
        .await
        .expect("a client write outside a session");
    let boot = first.writer_boot;
    assert_eq!(boot.len(), 16, "the writer names its session");
    // A signed write in that session, captured.
    let data = pattern(22, 8192);
    let mut in_session = write_request(1, 1 << 20, &data);
    in_session.writer_boot = boot.clone();
    let signed = RequestSigner::new(identity_of(&nodes[2]))
        .sign(methods::CLIENT_WRITE, &target_of(&nodes[0]), in_session)
        .unwrap();
    let copy = |signed: &tonic::Request<ClientWriteRequest>| {
        let mut again = tonic::Request::new(signed.get_ref().clone());
        *again.metadata_mut() = signed.metadata().clone();
        again
    };
    let mut raw = ReplicationClient::connect(format!("http://{}", nodes[0].address))
        .await
        .unwrap();
    let answer = raw.client_write(copy(&signed)).await.unwrap().into_inner();
    assert_eq!(
        (answer.copies, answer.writer_boot.clone()),
        (2, boot.clone()),
        "written on both copies, in the same session"
    );
    for copy in [&nodes[0], &nodes[1]] {
        assert!(
            copy_bytes(copy, &controller, "v", 1 << 20, data.len() as u64).await == data,
            "{} holds the session write",
            copy.name
        );
    }
    let replayed = raw.client_write(copy(&signed)).await.unwrap_err();
    assert_eq!(replayed.code(), Code::Unauthenticated, "{replayed:?}");
    assert!(replayed.message().contains("replayed"), "{replayed:?}");

    // The writer restarts: its in-memory nonces are gone, and so is the session.
    nodes[0].kill_9();
    let address = nodes[0].address.clone();
    nodes[0] = TestNode::start_at("rd-a", &base.path().join("rd-a"), &address);
    let mut raw = ReplicationClient::connect(format!("http://{}", nodes[0].address))
        .await
        .unwrap();
    let refused = raw.client_write(copy(&signed)).await.unwrap_err();
    let offered = session_refusal(&refused);
    let old: String = boot.iter().map(|byte| format!("{byte:02x}")).collect();
    assert!(offered.len() == 32 && offered != old, "{offered} vs {old}");
    // Nothing was written by the refused copy: overwrite the range in the new session
    // and compare both copies.
    let again = pattern(23, 8192);
    let written = client_as(&nodes[2], &nodes[0])
        .await
        .client_write(write_request(1, 1 << 20, &again))
        .await
        .expect("a client write after the writer's restart");
    assert_eq!(written.copies, 2);
    for copy in [&nodes[0], &nodes[1]] {
        assert!(
            copy_bytes(copy, &controller, "v", 1 << 20, again.len() as u64).await == again,
            "{} holds the write after the restart",
            copy.name
        );
    }
}

fn read_request(epoch: u64, offset: u64, length: u64) -> ClientReadRequest {
    ClientReadRequest {
        volume: "v".into(),
        offset,
        length,
        epoch,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_io_under_a_stale_epoch_or_from_a_node_not_named_is_refused_by_every_copy() {
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let nodes = cluster(base.path(), &controller, "v", true).await;
    let (a, b, c, d) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);

    // A node holding no copy keeps an epoch only if it names it a client.
    let refused = install(&[d], &controller, "v", 1, &["rd-c"]).await;
    assert_refused(
        refused.into_iter().next().unwrap(),
        Code::FailedPrecondition,
        &[
            "rd-d holds no copy of volume `v`",
            "does not name it a client",
        ],
    );
    install_ok(&[b, c, a], &controller, "v", 1, &["rd-c"]).await;

    // rd-c, a client at epoch 1: opens, writes through the writer, reads either copy.
    let data = pattern(15, 64 << 10);
    for copy in [a, b] {
        let open = client_as(c, copy)
            .await
            .client_open(ClientOpenRequest {
                volume: "v".into(),
                epoch: 1,
            })
            .await
            .unwrap_or_else(|status| panic!("open on {}: {status:?}", copy.name));
        assert_eq!((open.size_bytes, open.epoch), (VOLUME_BYTES, 1));
    }
    let written = client_as(c, a)
        .await
        .client_write(write_request(1, 1 << 20, &data))
        .await
        .expect("a client write through the writer");
    assert_eq!(written.copies, 2, "acknowledged by both in-sync copies");
    for copy in [a, b] {
        assert!(
            copy_bytes(copy, &controller, "v", 1 << 20, data.len() as u64).await == data,
            "{} holds the client's write",
            copy.name
        );
        let read = client_as(c, copy)
            .await
            .client_read(read_request(1, 1 << 20, data.len() as u64))
            .await
            .unwrap();
        assert!(read.data == data && read.checksums.len() == 16);
    }
    // Writes go to the writer only; damaged data is refused before anything is written.
    assert_refused(
        client_as(c, b)
            .await
            .client_write(write_request(1, 0, &data))
            .await,
        Code::FailedPrecondition,
        &[
            "node rd-b is not the writer of volume `v`",
            "send client writes to node rd-a",
        ],
    );
    let mut damaged = write_request(1, 0, &data);
    damaged.data[5] ^= 1;
    assert_refused(
        client_as(c, a).await.client_write(damaged).await,
        Code::DataLoss,
        &["does not match its checksums", "nothing was written"],
    );

    // rd-d is a trusted peer but not a client: refused by every copy.
    for copy in [a, b] {
        assert_refused(
            client_as(d, copy)
                .await
                .client_read(read_request(1, 0, 4096))
                .await,
            Code::PermissionDenied,
            &[
                "node rd-d",
                "may not read volume `v`",
                &format!("on node {}", copy.name),
                "clients: rd-c",
            ],
        );
    }
    assert_refused(
        client_as(d, a)
            .await
            .client_write(write_request(1, 0, &data))
            .await,
        Code::PermissionDenied,
        &["node rd-d", "may not write volume `v` on node rd-a"],
    );

    // The VM moves to rd-d: epoch 2 names rd-d. rd-c is fenced on every copy, whatever
    // it asks, and told so; under epoch 2 it is not a client.
    install_ok(&[b, c, d, a], &controller, "v", 2, &["rd-d"]).await;
    let before: Vec<Vec<u8>> = futures_util::future::join_all(
        [a, b].map(|copy| copy_bytes(copy, &controller, "v", 0, 2 << 20)),
    )
    .await;
    for copy in [a, b] {
        let stale = [
            "under epoch 1",
            "holds epoch 2",
            "the client is fenced",
            "node rd-c",
        ];
        let mut as_c = client_as(c, copy).await;
        assert_refused(
            as_c.client_read(read_request(1, 0, 4096)).await,
            Code::FailedPrecondition,
            &stale,
        );
        assert_refused(
            as_c.client_open(ClientOpenRequest {
                volume: "v".into(),
                epoch: 1,
            })
            .await,
            Code::FailedPrecondition,
            &stale,
        );
        assert_refused(
            as_c.client_read(read_request(2, 0, 4096)).await,
            Code::PermissionDenied,
            &["node rd-c", "clients: rd-d"],
        );
    }
    assert_refused(
        client_as(c, a)
            .await
            .client_write(write_request(1, 0, &pattern(16, 4096)))
            .await,
        Code::FailedPrecondition,
        &["under epoch 1", "the client is fenced"],
    );
    assert_refused(
        client_as(c, a)
            .await
            .client_write(write_request(2, 0, &pattern(16, 4096)))
            .await,
        Code::PermissionDenied,
        &["node rd-c", "may not write volume `v`"],
    );
    // A newer epoch than the copy holds is refused too (not installed there yet).
    assert_refused(
        client_as(d, b)
            .await
            .client_read(read_request(3, 0, 4096))
            .await,
        Code::FailedPrecondition,
        &["under epoch 3", "not installed on this copy yet"],
    );
    let after: Vec<Vec<u8>> = futures_util::future::join_all(
        [a, b].map(|copy| copy_bytes(copy, &controller, "v", 0, 2 << 20)),
    )
    .await;
    assert!(before == after, "nothing refused reached a copy");
    // rd-c keeps the epoch that fenced it and refuses an older one (a new request).
    assert_refused(
        install(&[c], &controller, "v", 1, &["rd-c", "rd-d"])
            .await
            .into_iter()
            .next()
            .unwrap(),
        Code::FailedPrecondition,
        &["epoch 1 (writer rd-a) is older than epoch 2"],
    );
    // The new client works.
    let moved = pattern(17, 8192);
    client_as(d, a)
        .await
        .client_write(write_request(2, 0, &moved))
        .await
        .expect("rd-d writes at epoch 2");
    assert!(copy_bytes(b, &controller, "v", 0, 8192).await == moved);
}

/// What the built-in guest's self-test writes in round `round` to the disk's last 4 KiB.
fn guest_pattern(round: u64) -> Vec<u8> {
    crate::vm_disks::guest_pattern(VOLUME_BYTES, round)
}

/// rd-a and rd-b hold `g-root` (epoch 1 names rd-c a client); VM `g` runs on rd-c
/// (with `fourth`, rd-d is there too).
async fn remote_vm(base: &Path, controller: &Identity, fourth: bool) -> Vec<TestNode> {
    let nodes = cluster(base, controller, "g-root", fourth).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    install_ok(&[b, c, a], controller, "g-root", 1, &["rd-c"]).await;
    start_vm_on(c, controller).await;
    nodes
}

/// Defines and starts VM `g` (built-in guest, disk `g-root`) on `node`.
async fn start_vm_on(node: &TestNode, controller: &Identity) {
    let mut client = node.client(controller).await;
    apply_ok(
        &mut client,
        "create",
        Action::CreateVm(CreateVm {
            name: "g".into(),
            vcpus: 1,
            memory_bytes: 32 << 20,
            image: Some(Image::Builtin("cairn-guest".into())),
            volumes: vec!["g-root".into()],
            ..Default::default()
        }),
    )
    .await;
    apply_ok(
        &mut client,
        "start",
        Action::StartVm(StartVm { name: "g".into() }),
    )
    .await;
}

fn the_disk(vm: &VmStatus) -> &VmDiskStatus {
    let [disk] = &vm.disks[..] else {
        panic!("one disk: {:?}", vm.disks);
    };
    disk
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_on_a_node_without_a_copy_reads_and_writes_its_disk_on_the_others() {
    if !vms_can_run() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut nodes = remote_vm(base.path(), &controller, false).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    assert!(copy_less(c, &controller).await, "rd-c holds no copy");
    let mut on_c = c.client(&controller).await;
    assert!(c.data_dir.join("exports/vm-g-0.sock").exists());

    // The guest's boot-time self-test: 4 KiB written at the disk's end through
    // virtio-blk → NBD → rd-c's storage client → ClientWrite on rd-a → rd-a and rd-b.
    let vm = await_block_tests(&mut on_c, "g", 1).await;
    assert_eq!(vm.state, VmState::Running as i32);
    assert_eq!(vm.guest_block_test, "pass", "{vm:?}");
    let disk = the_disk(&vm);
    assert!(disk.attached, "{disk:?}");
    assert_eq!((disk.device, disk.data.as_str()), (0, "remote"), "{disk:?}");
    assert_eq!(disk.copies_in_sync, 2, "{disk:?}");
    assert!(
        disk.detail.contains("reads from rd-")
            && disk.detail.contains("(nearest, ")
            && disk
                .detail
                .contains("writes through rd-a (the writer) at epoch 1"),
        "status names the copy serving reads and the writer: {}",
        disk.detail
    );
    assert!(
        disk.writes >= 1 && disk.reads >= 1 && disk.errors == 0,
        "{disk:?}"
    );
    let expected = guest_pattern(1);
    assert_eq!(
        vm.guest_block_checksum,
        vmm::guest::block_checksum(&expected)
    );
    for copy in [a, b] {
        let tail = copy_bytes(copy, &controller, "g-root", VOLUME_BYTES - 4096, 4096).await;
        assert!(tail == expected, "{} holds the guest's write", copy.name);
    }

    // The writer is killed -9 and restarts: rd-c's storage client still names the old
    // process's session (`writer_boot`), so its next write is refused before anything
    // is written, names the new session, and is re-sent by the client itself.
    let address = a.address.clone();
    nodes[0].kill_9();
    nodes[0] = TestNode::start_at("rd-a", &base.path().join("rd-a"), &address);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // Round 2 (other bytes), asked of the VMM on rd-c.
    block_test(c).await;
    let vm = await_block_tests(&mut on_c, "g", 2).await;
    assert_eq!(vm.guest_block_test, "pass", "{vm:?}");
    let expected = guest_pattern(2);
    assert_eq!(
        vm.guest_block_checksum,
        vmm::guest::block_checksum(&expected)
    );
    for copy in [a, b] {
        let tail = copy_bytes(copy, &controller, "g-root", VOLUME_BYTES - 4096, 4096).await;
        assert!(
            tail == expected,
            "{} holds the guest's second write",
            copy.name
        );
    }

    apply_ok(
        &mut on_c,
        "stop",
        Action::StopVm(StopVm {
            name: "g".into(),
            grace_ms: 5000,
        }),
    )
    .await;
    let vm = observe_vm(&mut on_c, "g").await;
    let disk = the_disk(&vm);
    assert!(!disk.attached, "{disk:?}");
    assert_eq!(disk.data, "remote", "{disk:?}");
}

/// Whether rd-c's Observe lists no volume (it holds no copy).
async fn copy_less(node: &TestNode, controller: &Identity) -> bool {
    let mut client = node.client(controller).await;
    client.observe().await.unwrap().volumes.is_empty()
}

/// Asks the VMM of VM `g` on `node` for another block self-test.
async fn block_test(node: &TestNode) {
    let control = node.data_dir.join("vms/g/control.sock");
    tokio::task::spawn_blocking(move || {
        let mut vmm = vmm::control::ControlClient::connect(&control, Duration::from_secs(5))
            .expect("control socket");
        vmm.request(&vmm::control::Request::BlockTest)
            .expect("block-test");
    })
    .await
    .unwrap();
}

/// The whole disk of VM `g` read through its NBD socket on rd-c (its storage client),
/// with qemu-img: what the guest would read.
fn read_through_the_client(node: &TestNode, scratch: &Path) -> Vec<u8> {
    let socket = node.data_dir.join("exports/vm-g-0.sock");
    let uri = format!("nbd+unix:///g-root?socket={}", socket.display());
    let out = scratch.join("remote.img");
    let _ = std::fs::remove_file(&out);
    let output = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&out)
        .output()
        .expect("run qemu-img");
    assert!(
        output.status.success(),
        "qemu-img convert from {uri} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_fail_over_to_the_other_in_sync_copy_when_the_nearest_is_killed() {
    if !vms_can_run() {
        return;
    }
    if !Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
    {
        eprintln!("skipping: qemu-img is not installed (apt-get install qemu-utils)");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut nodes = remote_vm(base.path(), &controller, false).await;
    let mut on_c = nodes[2].client(&controller).await;
    await_block_tests(&mut on_c, "g", 1).await;
    let detail = the_disk(&observe_vm(&mut on_c, "g").await).detail.clone();
    let nearest = if detail.contains("reads from rd-a (nearest") {
        0
    } else {
        assert!(detail.contains("reads from rd-b (nearest"), "{detail}");
        1
    };
    let other = 1 - nearest;
    let whole = copy_bytes(&nodes[other], &controller, "g-root", 0, VOLUME_BYTES).await;
    assert!(whole[whole.len() - 4096..] == guest_pattern(1)[..]);
    let scratch = base.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let before = read_through_the_client(&nodes[2], &scratch);
    assert!(before == whole, "the client reads what the copies hold");

    let killed = nodes[nearest].name.clone();
    nodes[nearest].kill_9();
    let started = std::time::Instant::now();
    let after = read_through_the_client(&nodes[2], &scratch);
    let took = started.elapsed();
    assert!(
        after == whole,
        "after kill -9 of {killed} the same bytes come from the other copy"
    );
    let disk = the_disk(&observe_vm(&mut on_c, "g").await).clone();
    assert!(
        disk.detail.contains("failed over")
            && disk
                .detail
                .contains(&format!("last served by {}", nodes[other].name)),
        "status says reads failed over: {}",
        disk.detail
    );
    eprintln!(
        "reads of 8 MiB through rd-c after kill -9 of the nearest copy ({killed}): {} ms; {}",
        took.as_millis(),
        disk.detail
    );
    let vm = observe_vm(&mut on_c, "g").await;
    assert_eq!(vm.state, VmState::Running as i32, "the guest keeps running");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_vm_fences_its_old_node_and_finds_its_data_on_the_new_one() {
    if !vms_can_run() {
        return;
    }
    if !Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
    {
        eprintln!("skipping: qemu-img is not installed (apt-get install qemu-utils)");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let controller = controller();
    let nodes = remote_vm(base.path(), &controller, true).await;
    let (a, b, c, d) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    let mut on_c = c.client(&controller).await;
    let vm = await_block_tests(&mut on_c, "g", 1).await;
    assert_eq!(vm.guest_block_test, "pass", "{vm:?}");
    let whole = copy_bytes(a, &controller, "g-root", 0, VOLUME_BYTES).await;
    assert!(whole[whole.len() - 4096..] == guest_pattern(1)[..]);

    // The controller moves the VM to rd-d (epoch 2) while rd-c's guest still runs, as
    // if rd-c were cut off: rd-c's storage client is fenced by every copy, learns the
    // new epoch and fails the guest's I/O instead of writing.
    install_ok(&[b, c, d, a], &controller, "g-root", 2, &["rd-d"]).await;
    block_test(c).await;
    let vm = await_block_tests(&mut on_c, "g", 2).await;
    assert_ne!(
        vm.guest_block_test, "pass",
        "the fenced guest's write failed: {vm:?}"
    );
    let disk = the_disk(&vm);
    assert!(disk.errors >= 1, "{disk:?}");
    assert!(
        disk.detail
            .contains("the client is fenced: volume `g-root` is at epoch 2")
            && disk.detail.contains("no longer names node rd-c a client"),
        "status says rd-c is fenced: {}",
        disk.detail
    );
    for copy in [a, b] {
        let now = copy_bytes(copy, &controller, "g-root", 0, VOLUME_BYTES).await;
        assert!(
            now == whole,
            "the fenced client changed nothing on {}",
            copy.name
        );
    }

    // The VM starts on rd-d: the disk it reads there is the one it left.
    apply_ok(
        &mut on_c,
        "stop",
        Action::StopVm(StopVm {
            name: "g".into(),
            grace_ms: 1000,
        }),
    )
    .await;
    start_vm_on(d, &controller).await;
    let scratch = base.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert!(
        read_through_the_client(d, &scratch) == whole,
        "the moved VM's disk holds what it wrote before the move"
    );
    let mut on_d = d.client(&controller).await;
    let vm = await_block_tests(&mut on_d, "g", 1).await;
    assert_eq!(vm.guest_block_test, "pass", "{vm:?}");
    assert_eq!(
        vm.guest_block_checksum,
        vmm::guest::block_checksum(&guest_pattern(1))
    );
    block_test(d).await;
    let vm = await_block_tests(&mut on_d, "g", 2).await;
    assert_eq!(vm.guest_block_test, "pass", "{vm:?}");
    for copy in [a, b] {
        let tail = copy_bytes(copy, &controller, "g-root", VOLUME_BYTES - 4096, 4096).await;
        assert!(tail == guest_pattern(2), "{} holds rd-d's write", copy.name);
    }
}
