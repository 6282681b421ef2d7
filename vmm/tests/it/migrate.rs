//! Live migration between two real `cairn-vmm` processes on loopback (127.0.0.21, this
//! test's address): memory, vCPU and device state, the commit point, and the failure
//! cases (destination killed, link cut after the final state).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::control::{MigrationStatus, Request, Response, VmStatus};

use crate::support::{VmProcess, wait_until};

/// This helper's loopback address (its range is 127.0.0.21-29).
const LOOPBACK: &str = "127.0.0.21";

/// Spawns the destination (`--incoming 127.0.0.21:0`) with `args`; returns it and the
/// address it listens on (from its `incoming` event).
fn spawn_destination(args: &[&str]) -> (VmProcess, String) {
    let listen = format!("{LOOPBACK}:0");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--incoming", &listen]);
    let mut destination = VmProcess::spawn(&all);
    let stdout = destination.child.stdout.take().expect("stdout piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the destination's first event");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|error| {
        panic!(
            "the destination's first line is not an event ({error}): {line:?} {}",
            destination.stderr()
        )
    });
    assert_eq!(event["event"], "incoming", "{event}");
    let address = event["listening"].as_str().expect("listening").to_string();
    (destination, address)
}

/// Spawns the source with `args` and waits for its first heartbeats.
fn spawn_source(args: &[&str]) -> VmProcess {
    let mut source = VmProcess::spawn(args);
    source.wait_status(Duration::from_secs(10), |status| status.heartbeat_total > 3);
    source
}

/// Sends `migrate` to the source and checks it began.
fn start_migration(source: &mut VmProcess, to: String, max_downtime_ms: u64) {
    let response = call(
        source,
        &Request::Migrate {
            to,
            max_downtime_ms,
            stop_and_copy: false,
        },
    );
    assert!(response.ok, "{response:?}");
}

fn call(vm: &mut VmProcess, request: &Request) -> Response {
    vm.client()
        .call(request)
        .expect("the control socket answers")
}

fn migration(vm: &mut VmProcess) -> MigrationStatus {
    let response = call(vm, &Request::MigrationStatus);
    match response.migration {
        Some(status) => status,
        None => panic!("no migration status: {:?}", response.error),
    }
}

fn wait_phase(vm: &mut VmProcess, timeout: Duration, phases: &[&str]) -> MigrationStatus {
    let mut last = migration(vm);
    let reached = wait_until(timeout, || {
        last = migration(vm);
        phases.contains(&last.phase.as_str())
    });
    assert!(
        reached,
        "phase {phases:?} not reached in {timeout:?}: {last:#?}"
    );
    last
}

fn heartbeats_advance(vm: &mut VmProcess) -> bool {
    let before = vm.status().heartbeat_total;
    std::thread::sleep(Duration::from_millis(300));
    vm.status().heartbeat_total > before
}

/// `first` and `last` heartbeat `CLOCK_BOOTTIME` ns of the VM directory's incarnations.
fn heartbeat_windows(dir: &Path) -> Vec<(u64, u64)> {
    let mut windows = Vec::new();
    for entry in std::fs::read_dir(dir.join("heartbeats")).expect("heartbeat logs") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
        let boottime = |tag: &str| -> u64 {
            text.lines()
                .find(|line| line.starts_with(tag))
                .and_then(|line| line.split_whitespace().nth(2))
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("`{tag}` in {text:?}"))
        };
        windows.push((boottime("first"), boottime("last")));
    }
    windows
}

/// The received state and the state the destination saved again after restoring it,
/// with time-derived fields zeroed, as JSON bytes.
fn states_without_clocks(destination: &mut VmProcess) -> (String, String, vmm::state::VmState) {
    // The destination saves again just after it answers ready.
    let mut response = call(destination, &Request::MigrationState);
    let deadline = Instant::now() + Duration::from_secs(10);
    while response.vm_states.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        response = call(destination, &Request::MigrationState);
    }
    let Some([received, resaved]) = response.vm_states else {
        panic!("no states: {:?}", response.error);
    };
    let parse = |text: &str| -> vmm::state::VmState { serde_json::from_str(text).expect("state") };
    let received = parse(&received);
    let resaved = parse(&resaved);
    (
        serde_json::to_string(&received.without_clocks()).expect("json"),
        serde_json::to_string(&resaved.without_clocks()).expect("json"),
        received,
    )
}

/// Runs the guest's dirtier fast until it has touched every page of its dirty region
/// once, so resident memory is (nearly) all of it.
fn touch_all_memory(source: &mut VmProcess, memory: u64) {
    call(
        source,
        &Request::SetDirtyRate {
            pages_per_second: 200_000,
        },
    );
    let pages = (memory - (2 << 20)) / 4096;
    source.wait_status(Duration::from_secs(30), |status| {
        status.pages_dirtied >= pages
    });
    call(
        source,
        &Request::SetDirtyRate {
            pages_per_second: 0,
        },
    );
    // The guest may still be working through the last large grant (no heartbeats
    // meanwhile): wait until it ticks again.
    let settled = wait_until(Duration::from_secs(60), || {
        source
            .status()
            .last_heartbeat_age_ms
            .is_some_and(|age| age < 30.0)
            && heartbeats_advance(source)
    });
    assert!(settled, "the guest never went back to its tick");
    let resident = source.status().guest_resident_bytes;
    assert!(
        resident >= memory * 9 / 10,
        "the guest touched its RAM: {resident} of {memory} bytes resident"
    );
}

fn disk_path(dir: &Path) -> PathBuf {
    let path = dir.join("data.img");
    std::fs::write(&path, vec![0u8; 4 << 20]).expect("disk");
    path
}

#[test]
fn a_builtin_guest_moves_live_with_its_memory_disk_writes_and_heartbeats() {
    if !crate::support::kvm_available("a_builtin_guest_moves_live…") {
        return;
    }
    let shared = tempfile::tempdir().expect("dir");
    let disk = disk_path(shared.path());
    let disk = disk.to_str().expect("utf-8");
    let memory: u64 = 64 << 20;
    let args = ["--memory", "64MiB", "--vcpus", "2", "--disk", disk];
    let mut source = spawn_source(&args);
    touch_all_memory(&mut source, memory);
    call(
        &mut source,
        &Request::SetDirtyRate {
            pages_per_second: 2_000,
        },
    );
    let (mut destination, address) = spawn_destination(&args);

    // A 2 MiB write by the guest's own driver (several seconds here) that spans the
    // move: its completions are written by the VMM (used ring, status byte), which
    // KVM's dirty log does not see.
    let (offset, length, seed) = (128u64 << 10, 2u64 << 20, 0x5eed_u64);
    let socket = source.path("control.sock");
    let writer = std::thread::spawn(move || {
        let mut client =
            vmm::control::ControlClient::connect(&socket, Duration::from_secs(5)).expect("client");
        // The guest finishes it on the destination; this waiter stays on the source.
        let _ = client.call(&Request::GuestDiskIo(vmm::control::GuestDiskIoRequest {
            disk: 0,
            action: vmm::control::GuestDiskAction::WritePattern,
            offset,
            length,
            seed,
            timeout_ms: Some(60_000),
        }));
    });
    source.wait_status(Duration::from_secs(30), |status| {
        // The VMM has carried out the first of the command's 32 requests of 64 KiB.
        status.disks[0].writes >= 2
    });
    start_migration(&mut source, address, 50);
    let status = wait_phase(&mut source, Duration::from_secs(60), &["ready-to-commit"]);
    assert_eq!(
        wait_phase(&mut destination, Duration::from_secs(5), &["ready"]).phase,
        "ready"
    );

    // At the switch-over both sides are paused with the same memory and state.
    assert_eq!(source.status().state, "paused");
    let source_hash = call(&mut source, &Request::MemoryHash).memory_crc32c;
    let destination_hash = call(&mut destination, &Request::MemoryHash).memory_crc32c;
    assert!(source_hash.is_some());
    assert_eq!(
        source_hash, destination_hash,
        "guest RAM differs at the switch-over"
    );
    let (received, resaved, state) = states_without_clocks(&mut destination);
    assert_eq!(received, resaved, "save → restore → save changed the state");
    assert_eq!(state.vcpus.len(), 2);
    assert!(
        state.irqchip.is_none(),
        "the built-in guest has no in-kernel irqchip"
    );
    let frozen_heartbeats = source.status().heartbeat_total;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        source.status().heartbeat_total,
        frozen_heartbeats,
        "the source is paused"
    );
    assert_eq!(
        destination.status().heartbeat_total,
        frozen_heartbeats,
        "restored counters"
    );
    eprintln!(
        "migrated {} MiB: {} rounds, dirty pages per round {:?} (VMM-written {:?}), {} bytes = {:.2} × resident, paused {:.1} ms, total {:.0} ms",
        memory >> 20,
        status.rounds,
        status.dirty_pages_per_round,
        status.vmm_dirty_pages_per_round,
        status.bytes,
        status.bytes as f64 / status.resident_bytes as f64,
        status.paused_ms,
        status.total_ms
    );
    assert!(status.bytes >= status.resident_bytes * 9 / 10, "{status:?}");
    // (Whether one of the command's completions falls inside this short migration is a
    // matter of timing, so the VMM-written count is printed above, not asserted; the
    // bitmap itself is tested in vmm::memory's unit tests.)

    // The commit: the source relays it, the destination starts, the source exits 0.
    let committed = call(&mut source, &Request::MigrateCommit);
    let committed = committed.migration.expect("status");
    assert_eq!(committed.phase, "committed");
    assert!(committed.destination_started, "{committed:?}");
    let exit = source.wait_exit(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "{}", source.stderr());
    assert!(source.stdout().contains("\"outcome\":\"migrated\""));

    // The guest goes on where it was: no reboot, the counters continue.
    let running: VmStatus = destination.wait_status(Duration::from_secs(30), |status| {
        status.state == "running" && status.heartbeat_total > frozen_heartbeats + 5
    });
    assert_eq!(running.boot_count, 1, "a migration is not a reboot");
    assert_eq!(
        running.boot_stage, 2,
        "the guest is in its main loop, not booting"
    );
    // The disk write that spanned the move completes on the destination, and the disk
    // holds exactly the pattern.
    destination.wait_status(Duration::from_secs(60), |status| {
        status.guest_disks[0].bytes_written >= 4096 + length
    });
    let _ = writer.join();
    let bytes = std::fs::read(disk).expect("disk");
    let written = &bytes[offset as usize..(offset + length) as usize];
    assert_eq!(
        vmm::guest::disk_checksum(written),
        vmm::guest::disk_checksum(&vmm::guest::disk_pattern(offset, length, seed)),
        "the disk holds the guest's write"
    );
    // Exactly one VM ran at any time: the source's last heartbeat precedes the
    // destination's first.
    let source_windows = heartbeat_windows(source.dir.path());
    let destination_windows = heartbeat_windows(destination.dir.path());
    assert_eq!(destination_windows.len(), 1);
    let downtime_ns = i128::from(destination_windows[0].0) - i128::from(source_windows[0].1);
    assert!(
        downtime_ns > 0,
        "overlap: {source_windows:?} {destination_windows:?}"
    );
    eprintln!(
        "heartbeat gap (downtime, including the test's commit round trip): {:.1} ms",
        downtime_ns as f64 / 1e6
    );
}

#[test]
fn the_linux_path_probe_saves_restores_and_saves_the_same_kvm_state() {
    if !crate::support::kvm_available("the_linux_path_probe_saves…") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let kernel = dir.path().join("probe.bzImage");
    std::fs::write(&kernel, vmm::guest::LINUX_PROBE).expect("probe");
    let disk = disk_path(dir.path());
    let args = [
        "--memory",
        "128MiB",
        "--vcpus",
        "2",
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--disk",
        disk.to_str().expect("utf-8"),
        "--cmdline",
        "console=ttyS0 cairn.probe=stay",
    ];
    let mut source = spawn_source(&args);
    let (mut destination, address) = spawn_destination(&args);
    start_migration(&mut source, address, 50);
    wait_phase(&mut source, Duration::from_secs(30), &["ready-to-commit"]);
    let (received, resaved, state) = states_without_clocks(&mut destination);
    assert_eq!(
        received, resaved,
        "save → restore → save changed the KVM state"
    );
    // What was compared: both vCPUs (the AP still waiting for INIT/SIPI) with their
    // LAPICs, the PICs and I/O APIC, the PIT, MSRs.
    assert_eq!(state.vcpus.len(), 2);
    assert!(state.vcpus.iter().all(|vcpu| vcpu.lapic.is_some()));
    assert!(state.irqchip.is_some() && state.pit.is_some());
    assert!(state.vcpus[0].msrs.len() >= 8, "{:?}", state.vcpus[0].msrs);
    assert_ne!(
        state.vcpus[0].mp_state.mp_state,
        state.vcpus[1].mp_state.mp_state
    );
    assert_eq!(
        call(&mut source, &Request::MemoryHash).memory_crc32c,
        call(&mut destination, &Request::MemoryHash).memory_crc32c
    );
    let before = source.status().heartbeat_total;
    // The commander may commit on the destination directly (a link that broke after
    // the state left leaves this as its only path); the source is told separately.
    let committed = call(&mut destination, &Request::MigrateCommit);
    assert_eq!(committed.migration.expect("status").phase, "committed");
    destination.wait_status(Duration::from_secs(10), |status| {
        status.heartbeat_total > before + 5
    });
    assert_eq!(
        source.status().heartbeat_total,
        before,
        "the source stays paused"
    );
    let committed = call(&mut source, &Request::MigrateCommit);
    assert!(committed.ok, "{committed:?}");
    assert_eq!(source.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn a_destination_killed_during_pre_copy_leaves_the_source_running() {
    if !crate::support::kvm_available("a_destination_killed_during_pre_copy…") {
        return;
    }
    let memory: u64 = 256 << 20;
    let args = ["--memory", "256MiB"];
    let mut source = spawn_source(&args);
    // 256 MiB touched: the first round alone takes a few hundred ms on loopback.
    touch_all_memory(&mut source, memory);
    let (mut destination, address) = spawn_destination(&args);
    start_migration(&mut source, address, 50);
    let receiving = &mut destination;
    assert!(wait_until(Duration::from_secs(30), || migration(receiving)
        .pages
        > 0));
    destination.child.kill().expect("kill -9 the destination");
    let _ = destination.child.wait();
    let failed = wait_phase(&mut source, Duration::from_secs(30), &["failed-resumed"]);
    assert!(failed.error.is_some(), "{failed:?}");
    assert_eq!(source.status().state, "running");
    assert!(heartbeats_advance(&mut source), "the source runs on");
    assert!(!source.status().dirty_logging, "dirty logging is off again");
}

#[test]
fn a_destination_killed_after_the_final_state_leaves_the_source_paused_until_told() {
    if !crate::support::kvm_available("a_destination_killed_after_the_final_state…") {
        return;
    }
    let args = ["--memory", "32MiB"];
    let mut source = spawn_source(&args);
    let (mut destination, address) = spawn_destination(&args);
    start_migration(&mut source, address, 50);
    wait_phase(&mut source, Duration::from_secs(30), &["ready-to-commit"]);
    destination.child.kill().expect("kill -9 the destination");
    let _ = destination.child.wait();
    // The source cannot know whether the commander committed: it stays paused.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(migration(&mut source).phase, "ready-to-commit");
    assert!(!heartbeats_advance(&mut source), "the source stays paused");
    // The commander, whose record does not name the destination, aborts.
    let aborted = call(&mut source, &Request::MigrateAbort);
    assert_eq!(aborted.migration.expect("status").phase, "aborted");
    assert!(heartbeats_advance(&mut source), "the source runs again");
}

/// The protocol's READY frame kind (vmm::migration, "frame").
const READY_FRAME: u8 = 5;

/// A TCP relay between source and destination that forwards everything except the
/// destination's `READY` frame: the link breaks right after the destination has
/// received the final state.
fn relay_dropping_ready(destination: String) -> String {
    let listener = TcpListener::bind(format!("{LOOPBACK}:0")).expect("bind relay");
    let address = listener.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        let (source, _) = listener.accept().expect("source connects");
        let upstream = TcpStream::connect(&destination).expect("destination");
        let (mut source_read, mut upstream_write) = (
            source.try_clone().expect("clone"),
            upstream.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut source_read, &mut upstream_write);
        });
        let mut upstream_read = upstream;
        let mut source_write = source;
        loop {
            let mut header = [0u8; 5];
            if upstream_read.read_exact(&mut header).is_err() {
                break;
            }
            let length = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
            let mut payload = vec![0u8; length as usize];
            if upstream_read.read_exact(&mut payload).is_err() {
                break;
            }
            if header[0] == READY_FRAME {
                // READY: cut both ways instead.
                let _ = source_write.shutdown(Shutdown::Both);
                let _ = upstream_read.shutdown(Shutdown::Both);
                break;
            }
            let _ = source_write.write_all(&header);
            let _ = source_write.write_all(&payload);
        }
    });
    address
}

#[test]
fn a_link_cut_after_the_final_state_leaves_exactly_one_vm_running() {
    if !crate::support::kvm_available("a_link_cut_after_the_final_state…") {
        return;
    }
    let args = ["--memory", "32MiB"];
    let mut source = spawn_source(&args);
    let (mut destination, address) = spawn_destination(&args);
    let relay = relay_dropping_ready(address);
    start_migration(&mut source, relay, 50);
    let failed = wait_phase(&mut source, Duration::from_secs(30), &["failed-paused"]);
    assert!(failed.error.is_some());
    assert_eq!(
        wait_phase(&mut destination, Duration::from_secs(5), &["ready"]).phase,
        "ready"
    );
    // Neither runs: the source does not know, the destination waits for the commit.
    assert_eq!(source.status().state, "paused");
    let deadline = Instant::now() + Duration::from_millis(300);
    let source_before = source.status().heartbeat_total;
    let destination_before = destination.status().heartbeat_total;
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    assert_eq!(source.status().heartbeat_total, source_before);
    assert_eq!(destination.status().heartbeat_total, destination_before);
    // The commander's record names the destination: it commits on both sides.
    let started = call(&mut destination, &Request::MigrateCommit);
    assert_eq!(started.migration.expect("status").phase, "committed");
    assert!(heartbeats_advance(&mut destination), "the destination runs");
    let committed = call(&mut source, &Request::MigrateCommit);
    let committed = committed.migration.expect("status");
    assert_eq!(committed.phase, "committed");
    assert!(
        !committed.destination_started,
        "the link is gone: no confirmation"
    );
    assert_eq!(source.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn an_abort_before_the_source_connects_ends_the_destination_without_running() {
    if !crate::support::kvm_available("an_abort_before…") {
        return;
    }
    let (mut destination, _address) = spawn_destination(&["--memory", "32MiB"]);
    assert_eq!(migration(&mut destination).phase, "incoming");
    let refused = call(&mut destination, &Request::MigrateCommit);
    assert!(!refused.ok, "a commit before ready is refused: {refused:?}");
    let aborted = call(&mut destination, &Request::MigrateAbort);
    assert!(aborted.ok, "{aborted:?}");
    let exit = destination.wait_exit(Duration::from_secs(10));
    assert_eq!(
        exit.code(),
        Some(i32::from(vmm::exit_code::MIGRATION_NOT_COMMITTED))
    );
}

/// A TCP relay that carries the source's stream at most `bytes_per_second` (a slow
/// link), and the destination's answers unchanged.
fn slow_relay(destination: String, bytes_per_second: u64) -> String {
    let listener = TcpListener::bind(format!("{LOOPBACK}:0")).expect("bind relay");
    let address = listener.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        let (source, _) = listener.accept().expect("source connects");
        let upstream = TcpStream::connect(&destination).expect("destination");
        let (mut back_read, mut back_write) = (
            upstream.try_clone().expect("clone"),
            source.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_read, &mut back_write);
        });
        let (mut source, mut upstream) = (source, upstream);
        let started = Instant::now();
        let mut carried = 0u64;
        let mut buffer = vec![0u8; 64 << 10];
        while let Ok(read) = source.read(&mut buffer) {
            if read == 0 || upstream.write_all(&buffer[..read]).is_err() {
                break;
            }
            carried += read as u64;
            let due = Duration::from_secs_f64(carried as f64 / bytes_per_second as f64);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
        let _ = upstream.shutdown(Shutdown::Both);
    });
    address
}

#[test]
fn a_guest_dirtying_faster_than_the_target_allows_is_throttled_until_it_converges() {
    if !crate::support::kvm_available("a_guest_dirtying_faster…") {
        return;
    }
    let args = ["--memory", "32MiB"];
    let mut source = spawn_source(&args);
    call(
        &mut source,
        &Request::SetDirtyRate {
            pages_per_second: 20_000,
        },
    );
    let (mut destination, address) = spawn_destination(&args);
    // An 8 MB/s link (2,000 pages/s) against a guest asked to dirty 20,000 pages/s:
    // pre-copy does not converge by itself, so auto-converge must throttle the guest.
    let relay = slow_relay(address, 8_000_000);
    start_migration(&mut source, relay, 50);
    let status = wait_phase(&mut source, Duration::from_secs(120), &["ready-to-commit"]);
    eprintln!(
        "slow link: {} rounds, dirty pages per round {:?}, throttle {} %, paused {:.1} ms, total {:.0} ms",
        status.rounds,
        status.dirty_pages_per_round,
        status.throttle_percent,
        status.paused_ms,
        status.total_ms
    );
    assert!(
        status.throttle_percent >= 20,
        "auto-converge engaged: {status:?}"
    );
    assert!(status.rounds >= 3, "{status:?}");
    assert_eq!(
        call(&mut source, &Request::MemoryHash).memory_crc32c,
        call(&mut destination, &Request::MemoryHash).memory_crc32c,
        "same memory despite the dirtying"
    );
    // Aborted: the source runs again at its full rate, unthrottled.
    let aborted = call(&mut source, &Request::MigrateAbort);
    assert_eq!(aborted.migration.expect("status").phase, "aborted");
    let before = source.status().pages_dirtied;
    // (It reports a batch when it is done; a batch of 50,000 pages takes a while here.)
    source.wait_status(Duration::from_secs(30), |status| {
        status.state == "running" && status.pages_dirtied > before + 10_000
    });
    let exit = destination.wait_exit(Duration::from_secs(10));
    assert_eq!(
        exit.code(),
        Some(i32::from(vmm::exit_code::MIGRATION_NOT_COMMITTED)),
        "the destination was told to abort"
    );
}

#[test]
fn an_abort_during_pre_copy_keeps_the_source_running_and_ends_the_destination() {
    if !crate::support::kvm_available("an_abort_during_pre_copy…") {
        return;
    }
    let args = ["--memory", "32MiB"];
    let mut source = spawn_source(&args);
    call(
        &mut source,
        &Request::SetDirtyRate {
            pages_per_second: 20_000,
        },
    );
    let (mut destination, address) = spawn_destination(&args);
    // A slow link keeps the migration in pre-copy long enough to abort it there.
    let relay = slow_relay(address, 4_000_000);
    start_migration(&mut source, relay, 50);
    let status = &mut source;
    assert!(wait_until(Duration::from_secs(30), || migration(status)
        .rounds
        >= 1));
    let aborted = call(&mut source, &Request::MigrateAbort);
    assert!(aborted.ok, "{aborted:?}");
    let status = wait_phase(&mut source, Duration::from_secs(30), &["aborted"]);
    assert!(status.rounds < 30, "{status:?}");
    assert_eq!(source.status().state, "running");
    assert!(heartbeats_advance(&mut source), "the source runs on");
    let exit = destination.wait_exit(Duration::from_secs(30));
    assert_eq!(
        exit.code(),
        Some(i32::from(vmm::exit_code::MIGRATION_NOT_COMMITTED))
    );
}
