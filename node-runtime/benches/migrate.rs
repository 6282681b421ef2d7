//! Live-migration downtime of a VM with a disk through the whole node path (issue 17).
//!
//! `cargo bench -p node-runtime --bench migrate` (release): two `cairn-node`
//! processes on 127.0.0.46-47, a 256 MiB built-in guest with a 64 MiB disk whose
//! volume has a copy on each node (stripe width 1), all guest RAM touched, then
//! dirtying 5,000 pages/s (20 MB/s, "moderate writes"); the guest ticks every 1 ms
//! (the VMM's config rewritten by a wrapper). The VM moves back and forth, each run
//! as the commander (`reconciler::migrate`) does it: CreateVm + PrepareIncomingVm on
//! the destination (its copy is served to the incoming VMM and refuses writes until
//! the epoch names it), MigrateVm on the source up to `ready-to-commit`, then the
//! disk's hand-over — the epoch naming the destination the writer, installed on both
//! copies at once — then CommitMigration on the source, then on the destination, DeleteVm
//! on the source. (`CAIRN_BENCH_COMMIT=at-once` sends both commits at once, as the
//! reconciler does; on 2026-12-03 the destination's node then at times answered "cannot
//! commit a migration whose destination is committed" and did not report the VM running
//! within 15 s, which stops the bench: a race to look into.)
//! Not included: the commander's commit record (an fsync of its state store) and its
//! compare-and-swap on the epoch authority, which the reconciler does between
//! `ready-to-commit` and the installs.
//!
//! Downtime = the source's last heartbeat → the destination's first (the VMMs'
//! heartbeat logs, `CLOCK_BOOTTIME`). Baseline in the same command: the same path with
//! `stop_and_copy` (the whole memory sent while paused), runs interleaved. Also
//! printed per mode: the time from `ready-to-commit` to both installs' answers (the
//! hand-over) and to both commits' answers. Medians of `CAIRN_BENCH_RUNS` (default 5)
//! runs per mode. Not a test: it asserts nothing but that each step succeeds.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Node, apply, median, push_peers, setup};
use proto::auth::RequestSigner;
use proto::client::NodeClient;
use proto::v1::{
    CommitMigration, CreateVm, CreateVolume, DeleteVm, MigrateVm, PrepareIncomingVm,
    SetVolumeEpoch, StartVm, StopVm, apply_request::Action, apply_response, create_vm::Image,
};

const VOLUME: &str = "mb-disk";
const MEMORY: u64 = 256 << 20;

/// The `cairn-vmm` to wrap: `CAIRN_VMM_BINARY`, else the newest build next to the node.
fn vmm_binary() -> Result<PathBuf, String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm is not usable".into());
    }
    if let Some(path) = std::env::var_os("CAIRN_VMM_BINARY") {
        return Ok(path.into());
    }
    let directory = Path::new(env!("CARGO_BIN_EXE_cairn-node"))
        .parent()
        .unwrap();
    ["cairn-vmm", "../release/cairn-vmm"]
        .iter()
        .map(|candidate| directory.join(candidate))
        .filter_map(|candidate| Some((candidate.metadata().ok()?.modified().ok()?, candidate)))
        .max()
        .map(|(_, candidate)| candidate)
        .ok_or_else(|| "cairn-vmm is not built (cargo build --release -p vmm)".into())
}

/// A wrapper of `real` whose guest ticks every 1 ms (heartbeat resolution).
fn ticking_every_ms(dir: &Path, real: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
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

fn status(socket: &Path) -> vmm::control::VmStatus {
    vmm_request(socket, vmm::control::Request::Status)
        .status
        .expect("a status")
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

/// The epoch naming `writer`, both copies in sync, for both nodes at once.
async fn install(clients: &mut [NodeClient; 2], epoch: u64, writer: &str, id: &str) {
    let action = || {
        Action::SetVolumeEpoch(SetVolumeEpoch {
            name: VOLUME.into(),
            epoch,
            writer: writer.into(),
            in_sync: vec!["mb-a".into(), "mb-b".into()],
            clients: vec![],
        })
    };
    let [a, b] = clients;
    tokio::join!(
        apply(a, format!("{id}-a"), action()),
        apply(b, format!("{id}-b"), action())
    );
}

async fn vm_pid(client: &mut NodeClient) -> u32 {
    let observed = client.observe().await.expect("observe");
    observed
        .vms
        .into_iter()
        .find(|vm| vm.name == "mv")
        .expect("vm mv is defined")
        .pid
}

/// Touches all RAM, then dirties 5,000 pages/s; returns once the guest ticks steadily.
async fn load(socket: &Path) {
    vmm_request(
        socket,
        vmm::control::Request::SetDirtyRate {
            pages_per_second: 400_000,
        },
    );
    let pages = (MEMORY - (2 << 20)) / 4096;
    let from = status(socket).pages_dirtied;
    while status(socket).pages_dirtied < from + pages {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    vmm_request(
        socket,
        vmm::control::Request::SetDirtyRate {
            pages_per_second: 5_000,
        },
    );
    loop {
        let before = status(socket);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = status(socket);
        if after.heartbeat_total >= before.heartbeat_total + 20
            && after.last_heartbeat_age_ms.is_some_and(|age| age < 5.0)
        {
            return;
        }
    }
}

/// One run's figures, ms: downtime, paused, the hand-over, the commits, total.
type Figures = [f64; 5];

fn main() {
    let vmm = match vmm_binary() {
        Ok(vmm) => vmm,
        Err(why) => {
            println!("migrate bench skipped: {why}");
            return;
        }
    };
    let runs: usize = std::env::var("CAIRN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&runs| runs > 0)
        .unwrap_or(5);
    let (base, runtime, controller) = setup();
    let wrapper = ticking_every_ms(base.path(), &vmm);
    let extra = ["--vmm-binary", wrapper.to_str().unwrap()];
    let nodes: Vec<Node> = [("mb-a", "127.0.0.46"), ("mb-b", "127.0.0.47")]
        .iter()
        .map(|(name, ip)| {
            Node::start_with(
                name,
                &base.path().join(name),
                &controller,
                &format!("{ip}:0"),
                1,
                1 << 30,
                &extra,
            )
        })
        .collect();
    let signer = RequestSigner::new(controller);
    let mut figures: Vec<(bool, Figures)> = vec![];
    runtime.block_on(async {
        push_peers(&nodes.iter().collect::<Vec<_>>(), &signer).await;
        let mut clients = [
            NodeClient::connect(&nodes[0].address, signer.clone())
                .await
                .unwrap(),
            NodeClient::connect(&nodes[1].address, signer.clone())
                .await
                .unwrap(),
        ];
        apply(
            &mut clients[0],
            "create-volume".into(),
            Action::CreateVolume(CreateVolume {
                name: VOLUME.into(),
                size_bytes: 64 << 20,
                stripe_width: 1,
                stripe_unit_bytes: 1 << 20,
                replica_peers: vec![nodes[1].peer()],
            }),
        )
        .await;
        let mut epoch = 1;
        install(&mut clients, epoch, "mb-a", "first-epoch").await;
        let definition = CreateVm {
            name: "mv".into(),
            vcpus: 1,
            memory_bytes: MEMORY,
            image: Some(Image::Builtin("cairn-guest".into())),
            volumes: vec![VOLUME.into()],
            ..Default::default()
        };
        for (id, action) in [
            ("create-0", Action::CreateVm(definition.clone())),
            ("start-0", Action::StartVm(StartVm { name: "mv".into() })),
        ] {
            apply(&mut clients[0], id.into(), action).await;
        }
        let mut source = 0;
        for run in 0..2 * runs {
            let stop_and_copy = run % 2 == 1;
            let destination = 1 - source;
            let socket = nodes[source].dir.join("vms/mv/control.sock");
            load(&socket).await;
            let source_pid = vm_pid(&mut clients[source]).await;
            let id = |what: &str| format!("{what}-{run}");
            let started = Instant::now();
            for (what, action) in [
                ("create", Action::CreateVm(definition.clone())),
                (
                    "prepare",
                    Action::PrepareIncomingVm(PrepareIncomingVm { name: "mv".into() }),
                ),
            ] {
                let r = apply(&mut clients[destination], id(what), action).await;
                if let Some(apply_response::Result::Incoming(incoming)) = r.result {
                    let migrated = apply(
                        &mut clients[source],
                        id("migrate"),
                        Action::MigrateVm(MigrateVm {
                            name: "mv".into(),
                            to: incoming.listen_address.clone(),
                            max_downtime_ms: 50,
                            stop_and_copy,
                            timeout_ms: 0,
                        }),
                    )
                    .await;
                    let Some(apply_response::Result::Migration(ready)) = migrated.result else {
                        panic!("not a migration result: {migrated:?}");
                    };
                    assert_eq!(ready.phase, "ready-to-commit", "{ready:?}");
                    let at_ready = Instant::now();
                    // The hand-over: the destination's copy writes from this epoch.
                    epoch += 1;
                    let writer = nodes[destination].name.clone();
                    install(&mut clients, epoch, &writer, &id("epoch")).await;
                    let handover_ms = at_ready.elapsed().as_secs_f64() * 1e3;
                    let commit = || Action::CommitMigration(CommitMigration { name: "mv".into() });
                    // The source first, then the destination (`CAIRN_BENCH_COMMIT=at-once`:
                    // both at once, as `reconciler::migrate` sends them; here the
                    // destination's node then at times refused its commit and did not
                    // report the VM running, see the module documentation).
                    let [a, b] = &mut clients;
                    let (to_source, to_destination) = if source == 0 { (a, b) } else { (b, a) };
                    if std::env::var("CAIRN_BENCH_COMMIT").as_deref() == Ok("at-once") {
                        let request = |what: &str| proto::v1::ApplyRequest {
                            request_id: id(what),
                            action: Some(commit()),
                        };
                        let (_, _) = tokio::join!(
                            to_source.apply(request("commit-source")),
                            to_destination.apply(request("commit-destination"))
                        );
                    } else {
                        apply(to_source, id("commit-source"), commit()).await;
                        apply(to_destination, id("commit-destination"), commit()).await;
                    }
                    let commit_ms = at_ready.elapsed().as_secs_f64() * 1e3;
                    let total_ms = started.elapsed().as_secs_f64() * 1e3;
                    let (_, last) = heartbeat_window(&nodes[source].dir.join("vms/mv"), source_pid)
                        .expect("the source's heartbeat log");
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let first = loop {
                        if let Some((first, _)) = heartbeat_window(
                            &nodes[destination].dir.join("vms/mv"),
                            incoming.pid,
                        ) && first > last
                        {
                            break first;
                        }
                        assert!(Instant::now() < deadline, "no heartbeat on the destination");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    };
                    let downtime_ms = (first - last) as f64 / 1e6;
                    println!(
                        "run {run} ({}): downtime {downtime_ms:.1} ms, paused {:.1} ms, hand-over {handover_ms:.1} ms, commits {commit_ms:.1} ms, total {total_ms:.0} ms, {} rounds, bytes/memory {:.2}",
                        if stop_and_copy {
                            "stop-and-copy"
                        } else {
                            "pre-copy"
                        },
                        ready.paused_ms,
                        ready.rounds,
                        ready.bytes_sent as f64 / MEMORY as f64
                    );
                    figures.push((
                        stop_and_copy,
                        [
                            downtime_ms,
                            ready.paused_ms,
                            handover_ms,
                            commit_ms,
                            total_ms,
                        ],
                    ));
                }
            }
            // The destination's node sees it running before the next run moves it.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let observed = clients[destination].observe().await.expect("observe");
                if observed.vms.iter().any(|vm| {
                    vm.name == "mv" && vm.state == proto::v1::VmState::Running as i32
                }) {
                    break;
                }
                assert!(Instant::now() < deadline, "mv does not run on the destination");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            apply(
                &mut clients[source],
                id("delete"),
                Action::DeleteVm(DeleteVm { name: "mv".into() }),
            )
            .await;
            source = destination;
        }
        // The VM's VMM would outlive its node: stop and delete it.
        apply(
            &mut clients[source],
            "stop-last".into(),
            Action::StopVm(StopVm {
                name: "mv".into(),
                grace_ms: 0,
            }),
        )
        .await;
        apply(
            &mut clients[source],
            "delete-last".into(),
            Action::DeleteVm(DeleteVm { name: "mv".into() }),
        )
        .await;
    });
    let of = |stop: bool, i: usize| {
        median(
            figures
                .iter()
                .filter(|(s, _)| *s == stop)
                .map(|(_, f)| f[i])
                .collect(),
        )
    };
    let names = ["downtime", "paused", "hand-over", "commits", "total"];
    for (mode, stop) in [("pre-copy", false), ("stop-and-copy", true)] {
        let line: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{name} {:.1} ms", of(stop, i)))
            .collect();
        println!("{mode}, median of {runs}: {}", line.join(", "));
    }
    println!(
        "downtime ratio pre-copy / stop-and-copy (baseline): {:.3}",
        of(false, 0) / of(true, 0)
    );
}
