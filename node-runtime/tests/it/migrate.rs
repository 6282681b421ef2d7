//! Live migration through the node API (issue 17): real `cairn-node`s on
//! 127.0.0.51-53 (helper D's range) and real KVM guests. mg-a holds the primary copy
//! of the VM's disk and runs the VM, mg-b an in-sync replica, mg-c no copy. The test
//! is the commander: it defines the VM on the destination, prepares it, migrates,
//! "records" the commit as the epoch naming the destination, and commits or aborts,
//! in the order the controller does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::auth::Identity;
use proto::client::NodeClient;
use proto::v1::{
    AbortMigration, CommitMigration, CreateVm, CreateVolume, GuestDiskIoRequest, GuestDiskOp,
    MigrateVm, MigrationResult, PrepareIncomingVm, SetVolumeEpoch, StartVm, VmState, VmStatus,
    apply_request::Action, apply_response, create_vm::Image,
};

use crate::harness::{TestNode, apply_ok, controller};
use crate::lab::{peer_of, push_peers, start_at_ip};
use crate::vms::vms_can_run;

const VOLUME: &str = "mv-disk";
const VOLUME_BYTES: u64 = 16 << 20;

fn definition() -> CreateVm {
    CreateVm {
        name: "mv".into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        image: Some(Image::Builtin("cairn-guest".into())),
        volumes: vec![VOLUME.into()],
        ..Default::default()
    }
}

/// mg-a (primary of the disk, replica on mg-b, epoch 1 written by mg-a) and mg-b, the
/// VM defined and running on mg-a.
async fn lab(base: &Path, controller: &Identity) -> Vec<TestNode> {
    let nodes: Vec<TestNode> = [("mg-a", "51"), ("mg-b", "52")]
        .iter()
        .map(|(name, ip)| start_at_ip(name, &base.join(name), controller, &format!("127.0.0.{ip}")))
        .collect();
    push_peers(&nodes.iter().collect::<Vec<_>>(), controller).await;
    let mut a = nodes[0].client(controller).await;
    apply_ok(
        &mut a,
        "create-volume",
        Action::CreateVolume(CreateVolume {
            name: VOLUME.into(),
            size_bytes: VOLUME_BYTES,
            stripe_width: 1,
            stripe_unit_bytes: 1 << 20,
            replica_peers: vec![peer_of(&nodes[1])],
        }),
    )
    .await;
    install(&nodes, controller, 1, "mg-a").await;
    apply_ok(&mut a, "create-vm", Action::CreateVm(definition())).await;
    apply_ok(
        &mut a,
        "start-vm",
        Action::StartVm(StartVm { name: "mv".into() }),
    )
    .await;
    nodes
}

/// The epoch authority's install: `writer` writes, both copies in sync; the copy that
/// does not write first, the writer last.
async fn install(nodes: &[TestNode], controller: &Identity, epoch: u64, writer: &str) {
    let mut order: Vec<&TestNode> = nodes.iter().filter(|n| n.name != writer).collect();
    order.extend(nodes.iter().filter(|n| n.name == writer));
    for node in order {
        let mut client = node.client(controller).await;
        apply_ok(
            &mut client,
            &format!("epoch-{epoch}"),
            Action::SetVolumeEpoch(SetVolumeEpoch {
                name: VOLUME.into(),
                epoch,
                writer: writer.into(),
                in_sync: vec!["mg-a".into(), "mg-b".into()],
                clients: vec![],
            }),
        )
        .await;
    }
}

fn migration(response: proto::v1::ApplyResponse) -> MigrationResult {
    match response.result {
        Some(apply_response::Result::Migration(result)) => result,
        other => panic!("not a migration result: {other:?}"),
    }
}

async fn vm_on(client: &mut NodeClient) -> VmStatus {
    let observed = client.observe().await.expect("observe");
    observed
        .vms
        .into_iter()
        .find(|vm| vm.name == "mv")
        .expect("vm mv is defined")
}

async fn await_heartbeats(client: &mut NodeClient, above: u64) -> VmStatus {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let vm = vm_on(client).await;
        if vm.state == VmState::Running as i32 && vm.heartbeats > above {
            return vm;
        }
        assert!(
            Instant::now() < deadline,
            "vm mv did not run with more than {above} heartbeats: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn socket(node: &TestNode) -> PathBuf {
    node.data_dir.join("vms/mv/control.sock")
}

fn memory_hash(socket: &Path) -> u32 {
    let mut client =
        vmm::control::ControlClient::connect(socket, Duration::from_secs(2)).expect("connect");
    let response = client
        .request(&vmm::control::Request::MemoryHash)
        .expect("memory-hash");
    response.memory_crc32c.expect("a hash")
}

/// The built-in guest's pattern (GuestDiskOp::WritePattern): qword q at byte 8q is
/// output q + 1 of splitmix64 seeded with `seed`.
fn pattern_crc(seed: u64, offset: u64, length: u64) -> u32 {
    let mut bytes = Vec::with_capacity(length as usize);
    for q in offset / 8..(offset + length) / 8 {
        let mut z = seed.wrapping_add((q + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        bytes.extend_from_slice(&z.to_le_bytes());
    }
    crc32c::crc32c(&bytes)
}

fn guest_io(op: GuestDiskOp, offset: u64, length: u64, seed: u64) -> GuestDiskIoRequest {
    GuestDiskIoRequest {
        vm: "mv".into(),
        disk: 0,
        op: op as i32,
        offset,
        length,
        seed,
        timeout_ms: 20_000,
    }
}

/// Defines the VM on mg-b, prepares it and migrates mg-a → mg-b up to ready-to-commit.
async fn migrate_to_b(a: &mut NodeClient, b: &mut NodeClient) -> MigrationResult {
    apply_ok(b, "create-vm", Action::CreateVm(definition())).await;
    let prepared = apply_ok(
        b,
        "prepare",
        Action::PrepareIncomingVm(PrepareIncomingVm { name: "mv".into() }),
    )
    .await;
    let Some(apply_response::Result::Incoming(incoming)) = prepared.result else {
        panic!("not an incoming result: {prepared:?}");
    };
    assert!(
        incoming.listen_address.starts_with("127.0.0.52:"),
        "the destination listens on its node's address: {incoming:?}"
    );
    migration(
        apply_ok(
            a,
            "migrate",
            Action::MigrateVm(MigrateVm {
                name: "mv".into(),
                to: incoming.listen_address,
                max_downtime_ms: 50,
                stop_and_copy: false,
                timeout_ms: 0,
            }),
        )
        .await,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_vm_moves_live_between_nodes_with_its_memory_heartbeats_and_disk_writes() {
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let nodes = lab(dir.path(), &controller).await;
    let mut a = nodes[0].client(&controller).await;
    let mut b = nodes[1].client(&controller).await;
    let before = await_heartbeats(&mut a, 3).await;
    let warm = a
        .guest_disk_io(guest_io(GuestDiskOp::WritePattern, 8 << 20, 1 << 20, 7))
        .await
        .expect("write on mg-a");
    eprintln!(
        "1 MiB guest write on mg-a (the primary writes): {} ms",
        warm.elapsed_ms
    );

    // A 512 KiB guest write in flight while the VM moves (it completes on mg-b).
    let (offset, length, seed) = (1 << 20, 512 << 10, 0x5eed_0017);
    let mut writer = nodes[0].client(&controller).await;
    let write = tokio::spawn(async move {
        writer
            .guest_disk_io(guest_io(GuestDiskOp::WritePattern, offset, length, seed))
            .await
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let ready = migrate_to_b(&mut a, &mut b).await;
    assert_eq!(ready.phase, "ready-to-commit", "{ready:?}");
    assert_eq!(ready.role, "source");
    assert!(ready.rounds >= 2 && ready.bytes_sent > 0, "{ready:?}");
    // Both paused on the same memory.
    let (source_hash, destination_hash) = (
        memory_hash(&socket(&nodes[0])),
        memory_hash(&socket(&nodes[1])),
    );
    assert_eq!(
        source_hash, destination_hash,
        "guest RAM differs at the switch-over"
    );
    eprintln!(
        "migrated 64 MiB: {} rounds, {} bytes, paused {:.1} ms, total {:.1} ms, RAM crc {source_hash:08x}",
        ready.rounds, ready.bytes_sent, ready.paused_ms, ready.total_ms
    );

    // The commit point: the epoch names mg-b the writer, then both sides are told.
    install(&nodes, &controller, 2, "mg-b").await;
    let source = commit(&mut a).await;
    assert_eq!(source.phase, "committed", "{source:?}");
    let destination = commit(&mut b).await;
    assert_eq!(destination.role, "destination");
    assert_eq!(
        destination.vm.as_ref().map(|vm| vm.state.as_str()),
        Some("VM_STATE_RUNNING"),
        "{destination:?}"
    );
    let on_a = vm_on(&mut a).await;
    assert_eq!(
        on_a.state,
        VmState::Stopped as i32,
        "the source stopped: {on_a:?}"
    );
    assert!(on_a.last_exit.contains("migrated"), "{}", on_a.last_exit);

    // The heartbeat counter goes on (no reboot) on mg-b.
    let after = await_heartbeats(&mut b, before.heartbeats).await;
    assert!(
        after.heartbeats > before.heartbeats,
        "{} → {}",
        before.heartbeats,
        after.heartbeats
    );

    // The write in flight lands: the guest finishes it on mg-b, through mg-b's copy.
    // Its waiter was on mg-a: the call ends with the source's VMM (or succeeded first).
    let _ = write.await.expect("join");

    let expected = pattern_crc(seed, offset, length);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The guest takes the read once it finished the write (slow here: ~6 s a MiB).
        let read = b
            .guest_disk_io(guest_io(GuestDiskOp::ReadChecksum, offset, length, 0))
            .await;
        let crc = match read {
            Ok(read) => read.crc32c,
            Err(status) if Instant::now() < deadline => {
                eprintln!("read on mg-b: {}", status.message());
                0
            }
            Err(status) => panic!(
                "read on mg-b: {status:?}\nits VMM's log:\n{}",
                std::fs::read_to_string(nodes[1].data_dir.join("vms/mv/vmm.log"))
                    .unwrap_or_default(),
            ),
        };
        if crc == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the disk write made during the migration is missing on mg-b"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And a write on mg-b now goes through its copy as the writer.
    let written = b
        .guest_disk_io(guest_io(GuestDiskOp::WritePattern, 8 << 20, 1 << 20, 7))
        .await
        .expect("write on mg-b");
    assert_eq!(written.crc32c, pattern_crc(7, 8 << 20, 1 << 20));
    eprintln!(
        "1 MiB guest write on mg-b (the replica made writer): {} ms",
        written.elapsed_ms
    );
    crate::harness::kill_vmms_of(&nodes[1].data_dir);
}

/// The commander's commit of the migration on one node.
async fn commit(client: &mut NodeClient) -> MigrationResult {
    let action = Action::CommitMigration(CommitMigration { name: "mv".into() });
    migration(apply_ok(client, "commit", action).await)
}

/// The commander's abort of the migration on one node.
async fn abort(client: &mut NodeClient) -> MigrationResult {
    let action = Action::AbortMigration(AbortMigration { name: "mv".into() });
    migration(apply_ok(client, "abort", action).await)
}

/// The lab with the VM migrated mg-a → mg-b up to ready-to-commit, and the source's
/// status before.
async fn paused_at_the_switch_over(
    base: &Path,
    controller: &Identity,
) -> (Vec<TestNode>, NodeClient, NodeClient, VmStatus) {
    let nodes = lab(base, controller).await;
    let mut a = nodes[0].client(controller).await;
    let mut b = nodes[1].client(controller).await;
    let before = await_heartbeats(&mut a, 3).await;
    let ready = migrate_to_b(&mut a, &mut b).await;
    assert_eq!(ready.phase, "ready-to-commit", "{ready:?}");
    (nodes, a, b, before)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_killed_before_the_commit_leaves_the_source_running_alone() {
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let (nodes, mut a, mut b, _) = paused_at_the_switch_over(dir.path(), &controller).await;
    // kill -9 of the destination's VMM: the record still names mg-a.
    let pid = vm_on(&mut b).await.pid;
    assert!(pid > 0);
    // SAFETY: kill takes a pid and a signal number.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let paused = vm_on(&mut a).await;
    let aborted = abort(&mut a).await;
    assert_eq!(aborted.phase, "aborted", "{aborted:?}");
    let resumed = await_heartbeats(&mut a, paused.heartbeats + 3).await;
    assert_eq!(resumed.state, VmState::Running as i32);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let on_b = vm_on(&mut b).await;
        if on_b.state == VmState::Stopped as i32 {
            assert!(
                on_b.last_exit.contains("not committed"),
                "{}",
                on_b.last_exit
            );
            break;
        }
        assert!(Instant::now() < deadline, "mg-b: {on_b:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Aborting the destination too (the commander's other half) is harmless.
    abort(&mut b).await;
    crate::harness::kill_vmms_of(&nodes[0].data_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_killed_after_the_commit_leaves_the_destination_running_alone() {
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let (nodes, mut a, mut b, before) = paused_at_the_switch_over(dir.path(), &controller).await;
    // The record names mg-b; then the source's VMM dies before it hears of it.
    install(&nodes, &controller, 2, "mg-b").await;
    let pid = vm_on(&mut a).await.pid;
    // SAFETY: kill takes a pid and a signal number.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let destination = commit(&mut b).await;
    assert_eq!(
        destination.vm.as_ref().map(|vm| vm.state.as_str()),
        Some("VM_STATE_RUNNING"),
        "{destination:?}"
    );
    await_heartbeats(&mut b, before.heartbeats).await;
    let on_a = vm_on(&mut a).await;
    assert_ne!(
        on_a.state,
        VmState::Running as i32,
        "two copies run: {on_a:?}"
    );
    assert_eq!(on_a.pid, 0);
    crate::harness::kill_vmms_of(&nodes[1].data_dir);
}

/// A `cairn-vmm` wrapper for the figures: the node's config with the guest ticking
/// every 1 ms (so a heartbeat log resolves the downtime to a millisecond), `--incoming`
/// passed on.
fn vmm_ticking_every_ms(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let real = crate::vms::vmm_binary().expect("cairn-vmm is built");
    let path = dir.join("fast-tick-cairn-vmm");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             [ \"$1\" = --config ] || exit 2\n\
             config=\"$2\"\n\
             sed -e 's/\"tick_ms\": *[0-9]*/\"tick_ms\": 1/' \"$config\" > \"$config.vmm\" || exit 2\n\
             shift 2\n\
             exec {} --config \"$config.vmm\" \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn vmm_request(socket: &Path, request: vmm::control::Request) -> vmm::control::Response {
    let mut client =
        vmm::control::ControlClient::connect(socket, Duration::from_secs(5)).expect("connect");
    client.request(&request).expect("request")
}

/// The heartbeat log of VMM `pid` under `vm_dir`: (first, last) `CLOCK_BOOTTIME` ns.
fn heartbeat_window(vm_dir: &Path, pid: u32) -> Option<(u64, u64)> {
    let entries = std::fs::read_dir(vm_dir.join("heartbeats")).ok()?;
    let path = entries.flatten().map(|entry| entry.path()).find(|path| {
        path.file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(&format!("{pid}-")))
    })?;
    let recorded = vmm::heartbeat_log::read(&path)?;
    Some((recorded.first.1, recorded.last.1))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Downtime through the whole node path (issue 17 step 5), not a test: run with
/// `cargo test --release -p node-runtime --test it migrate::node_path_downtime --
/// --ignored --nocapture` (`CAIRN_BENCH_RUNS`, default 5). A diskless 256 MiB built-in
/// guest, all RAM touched, then dirtying 5,000 pages/s (20 MB/s, the VMM bench's
/// "moderate writes"), moves back and forth between two nodes on loopback, each run as
/// the controller does it: CreateVm + PrepareIncomingVm on the destination, MigrateVm
/// on the source, CommitMigration on the source then the destination, DeleteVm on the
/// source. Downtime = the source's last heartbeat → the destination's first (heartbeat
/// logs, 1 ms tick), so it includes the commit's gRPC round trips. Baseline in the same
/// command: the same path with `stop_and_copy`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: prints figures, asserts none"]
async fn node_path_downtime() {
    if !vms_can_run() {
        return;
    }
    let runs: usize = std::env::var("CAIRN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let vmm = vmm_ticking_every_ms(dir.path());
    let nodes: Vec<TestNode> = [("mb-a", "55"), ("mb-b", "56")]
        .iter()
        .map(|(name, ip)| {
            let data_dir = dir.path().join(name);
            std::fs::create_dir_all(&data_dir).unwrap();
            std::fs::write(
                data_dir.join("trusted-controllers"),
                format!("{}\n", controller.public_key_hex()),
            )
            .unwrap();
            TestNode::start_with_args(
                name,
                &data_dir,
                &format!("127.0.0.{ip}:0"),
                &["--vmm-binary", vmm.to_str().unwrap()],
            )
        })
        .collect();
    let memory: u64 = 256 << 20;
    let definition = CreateVm {
        name: "mv".into(),
        vcpus: 1,
        memory_bytes: memory,
        image: Some(Image::Builtin("cairn-guest".into())),
        ..Default::default()
    };
    let mut clients = [
        nodes[0].client(&controller).await,
        nodes[1].client(&controller).await,
    ];
    apply_ok(
        &mut clients[0],
        "create-0",
        Action::CreateVm(definition.clone()),
    )
    .await;
    apply_ok(
        &mut clients[0],
        "start-0",
        Action::StartVm(StartVm { name: "mv".into() }),
    )
    .await;
    let mut figures: Vec<(bool, [f64; 4])> = Vec::new();
    let mut source = 0;
    for run in 0..2 * runs {
        let stop_and_copy = run % 2 == 1;
        let destination = 1 - source;
        let socket = socket(&nodes[source]);
        // Touch all RAM, then dirty at 5,000 pages/s; wait until it ticks steadily.
        vmm_request(
            &socket,
            vmm::control::Request::SetDirtyRate {
                pages_per_second: 400_000,
            },
        );
        let pages = (memory - (2 << 20)) / 4096;
        let touched_from = vmm_request(&socket, vmm::control::Request::Status)
            .status
            .unwrap()
            .pages_dirtied;
        loop {
            let status = vmm_request(&socket, vmm::control::Request::Status)
                .status
                .unwrap();
            if status.pages_dirtied >= touched_from + pages {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        vmm_request(
            &socket,
            vmm::control::Request::SetDirtyRate {
                pages_per_second: 5_000,
            },
        );
        loop {
            let before = vmm_request(&socket, vmm::control::Request::Status)
                .status
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let after = vmm_request(&socket, vmm::control::Request::Status)
                .status
                .unwrap();
            if after.heartbeat_total >= before.heartbeat_total + 20
                && after.last_heartbeat_age_ms.is_some_and(|age| age < 5.0)
            {
                break;
            }
        }
        let source_pid = vm_on(&mut clients[source]).await.pid;
        let started = Instant::now();
        let id = |what: &str| format!("{what}-{run}");
        apply_ok(
            &mut clients[destination],
            &id("create"),
            Action::CreateVm(definition.clone()),
        )
        .await;
        let prepared = apply_ok(
            &mut clients[destination],
            &id("prepare"),
            Action::PrepareIncomingVm(PrepareIncomingVm { name: "mv".into() }),
        )
        .await;
        let Some(apply_response::Result::Incoming(incoming)) = prepared.result else {
            panic!("{prepared:?}");
        };
        let ready = migration(
            apply_ok(
                &mut clients[source],
                &id("migrate"),
                Action::MigrateVm(MigrateVm {
                    name: "mv".into(),
                    to: incoming.listen_address.clone(),
                    max_downtime_ms: 50,
                    stop_and_copy,
                    timeout_ms: 0,
                }),
            )
            .await,
        );
        assert_eq!(ready.phase, "ready-to-commit", "{ready:?}");
        let commit = |what: &str| Action::CommitMigration(CommitMigration { name: what.into() });
        apply_ok(&mut clients[source], &id("commit"), commit("mv")).await;
        apply_ok(&mut clients[destination], &id("commit"), commit("mv")).await;
        let total_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (_, last) = heartbeat_window(&nodes[source].data_dir.join("vms/mv"), source_pid)
            .expect("the source's heartbeat log");
        let deadline = Instant::now() + Duration::from_secs(10);
        let first = loop {
            if let Some((first, _)) =
                heartbeat_window(&nodes[destination].data_dir.join("vms/mv"), incoming.pid)
            {
                break first;
            }
            assert!(Instant::now() < deadline, "no heartbeat on the destination");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let downtime_ms = first.saturating_sub(last) as f64 / 1e6;
        eprintln!(
            "run {run} ({}): downtime {downtime_ms:.1} ms, paused {:.1} ms, total {total_ms:.0} ms, {} rounds, bytes/memory {:.2}",
            if stop_and_copy {
                "stop-and-copy"
            } else {
                "pre-copy"
            },
            ready.paused_ms,
            ready.rounds,
            ready.bytes_sent as f64 / memory as f64
        );
        figures.push((
            stop_and_copy,
            [
                downtime_ms,
                ready.paused_ms,
                total_ms,
                ready.bytes_sent as f64 / memory as f64,
            ],
        ));
        apply_ok(
            &mut clients[source],
            &id("delete"),
            Action::DeleteVm(proto::v1::DeleteVm { name: "mv".into() }),
        )
        .await;
        source = destination;
    }
    let column = |stop: bool, i: usize| -> f64 {
        let mut values: Vec<f64> = figures
            .iter()
            .filter(|(s, _)| *s == stop)
            .map(|(_, f)| f[i])
            .collect();
        median(&mut values)
    };
    eprintln!(
        "256 MiB, 5,000 pages/s, medians of {runs}: pre-copy downtime {:.1} ms (paused {:.1} ms, total {:.0} ms, bytes/memory {:.2}); stop-and-copy downtime {:.1} ms; ratio {:.3}",
        column(false, 0),
        column(false, 1),
        column(false, 2),
        column(false, 3),
        column(true, 0),
        column(false, 0) / column(true, 0)
    );
    for node in &nodes {
        crate::harness::kill_vmms_of(&node.data_dir);
    }
}
