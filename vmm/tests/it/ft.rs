//! Fault tolerance between two real `cairn-vmm` processes (issue 22 items 1-2): a
//! primary checkpointing every epoch to a secondary, output commit, `kill -9` of the
//! primary and promotion of the secondary. The guests' beacon (a UDP datagram with an
//! increasing counter every tick) goes to a collector on the host side of a bridge, in
//! a network namespace of the test's own (`m-ft-PID-N`); the checkpoint link is on that
//! namespace's loopback, 127.0.0.81 (this helper's range).

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmm::control::wire::FtStatus;
use vmm::control::{GuestDiskAction, GuestDiskIoRequest, Request, Response};

use crate::support::{TestNamespace, VmProcess, kvm_available, wait_until};

pub(crate) const LOOPBACK: &str = "127.0.0.81";
const HOST_IP: &str = "10.214.0.1";
pub(crate) const GUEST_IP: &str = "10.214.0.2";
const GUEST_MAC: &str = "02:ca:00:00:00:81";
const BEACON_PORT: u16 = 7081;
const MAGIC: u64 = u64::from_le_bytes(*b"CAIRNBCN");

/// A network namespace with a bridge (the host's address) and two taps on it, one for
/// each side of the pair.
pub(crate) fn pair_namespace(test: &str) -> Option<TestNamespace> {
    TestNamespace::new(
        test,
        "m-ft",
        &[
            "ip link set lo up",
            "ip link add br0 type bridge",
            &format!("ip addr add {HOST_IP}/24 dev br0"),
            "ip link set br0 up",
            "ip tuntap add dev mtap0 mode tap vnet_hdr",
            "ip tuntap add dev mtap1 mode tap vnet_hdr",
            "ip link set mtap0 master br0",
            "ip link set mtap1 master br0",
            "ip link set mtap0 up",
            "ip link set mtap1 up",
        ],
    )
}

/// Spawns a VMM in `namespace` on `tap` with the pair's MAC and address, a 1 MiB disk
/// of its own, and `extra` (e.g. its tick); returns it and its disk's path.
pub(crate) fn spawn_side(
    namespace: &TestNamespace,
    tap: &str,
    extra: &[&str],
) -> (VmProcess, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = crate::support::disk_image(dir.path(), 1 << 20);
    let nic = format!("tap={tap},mac={GUEST_MAC},ipv4={GUEST_IP}");
    let mut args = vec![
        "--memory",
        "32MiB",
        "--nic",
        &nic,
        "--disk",
        disk.to_str().expect("utf-8"),
    ];
    args.extend(extra);
    let vm = VmProcess::spawn_via(&["ip", "netns", "exec", &namespace.name], dir, &args);
    (vm, disk)
}

/// A primary and a secondary in a pair namespace, the beacon aimed at the collector.
pub(crate) struct Pair {
    pub(crate) primary: VmProcess,
    pub(crate) secondary: VmProcess,
    pub(crate) secondary_disk: std::path::PathBuf,
    /// The secondary's checkpoint address.
    pub(crate) address: String,
    pub(crate) collector: Collector,
    pub(crate) namespace: TestNamespace,
}

impl Pair {
    /// `None` (the reason printed) where this host cannot run it.
    pub(crate) fn start(test: &str) -> Option<Self> {
        if !kvm_available(test) {
            return None;
        }
        let namespace = pair_namespace(test)?;
        let collector = Collector::start(&namespace.name);
        let (mut primary, _) = spawn_side(&namespace, "mtap0", &["--tick-ms", "10"]);
        let listen = format!("{LOOPBACK}:0");
        let (mut secondary, secondary_disk) = spawn_side(
            &namespace,
            "mtap1",
            &["--tick-ms", "10", "--ft-secondary", &listen],
        );
        let address = listening_address(&mut secondary);
        primary.wait_status(Duration::from_secs(10), |status| {
            status.nics.first().is_some_and(|nic| nic.driver_ok)
        });
        let response = call(
            &mut primary,
            &Request::SetBeacon {
                target: Some(format!("{HOST_IP}:{BEACON_PORT}")),
            },
        );
        assert!(response.ok, "{response:?}");
        Some(Self {
            primary,
            secondary,
            secondary_disk,
            address,
            collector,
            namespace,
        })
    }

    /// `ft-start` on the primary, then waits until `acked` checkpoints were acknowledged.
    pub(crate) fn protect(&mut self, epoch_ms: u64, sync_disks: bool, acked: u64) -> FtStatus {
        let response = call(
            &mut self.primary,
            &Request::FtStart {
                to: self.address.clone(),
                epoch_ms,
                sync_disks,
            },
        );
        assert!(response.ok, "{response:?}");
        wait_ft(&mut self.primary, Duration::from_secs(20), |status| {
            status.phase == "protected" && status.last_acked >= acked
        })
    }
}

/// The host's side of the beacon: a UDP socket on the bridge's address, inside the
/// namespace (a thread that entered it), recording each datagram's counter and arrival.
pub(crate) struct Collector {
    pub(crate) received: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Collector {
    pub(crate) fn start(namespace: &str) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let received = Arc::clone(&received);
            let stop = Arc::clone(&stop);
            let path = format!("/var/run/netns/{namespace}");
            thread::spawn(move || {
                let file = std::fs::File::open(&path).expect("the namespace's file");
                // SAFETY: a valid namespace fd; only this thread changes namespace.
                let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(entered, 0, "setns into {path}");
                let socket = UdpSocket::bind((HOST_IP, BEACON_PORT)).expect("bind the collector");
                socket
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                ready_tx.send(()).expect("ready");
                let mut buffer = [0u8; 64];
                while !stop.load(Ordering::Acquire) {
                    let Ok(length) = socket.recv(&mut buffer) else {
                        continue;
                    };
                    let at = Instant::now();
                    if length == 16
                        && u64::from_le_bytes(buffer[..8].try_into().expect("8")) == MAGIC
                    {
                        let counter = u64::from_le_bytes(buffer[8..16].try_into().expect("8"));
                        received.lock().expect("lock").push((counter, at));
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the collector is listening");
        Self {
            received,
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    pub(crate) fn snapshot(&self) -> Vec<(u64, Instant)> {
        self.received.lock().expect("lock").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads the secondary's first event and returns the address it listens on.
pub(crate) fn listening_address(secondary: &mut VmProcess) -> String {
    let stdout = secondary.child.stdout.take().expect("stdout piped");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("the secondary's first event");
    let event: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|error| panic!("not an event ({error}): {line:?} {}", secondary.stderr()));
    assert_eq!(event["event"], "ft-secondary", "{event}");
    // Keep reading its events so the pipe never fills.
    thread::spawn(move || for _ in reader.lines() {});
    event["listening"].as_str().expect("listening").to_string()
}

pub(crate) fn call(vm: &mut VmProcess, request: &Request) -> Response {
    vm.client()
        .call(request)
        .expect("the control socket answers")
}

pub(crate) fn ft(vm: &mut VmProcess) -> FtStatus {
    let response = call(vm, &Request::FtStatus);
    response
        .ft
        .unwrap_or_else(|| panic!("no ft status: {:?}", response.error))
}

pub(crate) fn wait_ft(
    vm: &mut VmProcess,
    timeout: Duration,
    condition: impl Fn(&FtStatus) -> bool,
) -> FtStatus {
    let mut last = ft(vm);
    let reached = wait_until(timeout, || {
        last = ft(vm);
        condition(&last)
    });
    assert!(reached, "not reached within {timeout:?}: {last:#?}");
    last
}

/// Checks the counters only ever increase.
fn check_counters(received: &[(u64, Instant)]) {
    for pair in received.windows(2) {
        assert!(
            pair[1].0 > pair[0].0,
            "the beacon counter went from {} to {}: a repeat or a rollback reached the outside world",
            pair[0].0,
            pair[1].0
        );
    }
}

fn longest_gap(received: &[(u64, Instant)]) -> (Duration, u64, u64) {
    received
        .windows(2)
        .map(|pair| (pair[1].1 - pair[0].1, pair[0].0, pair[1].0))
        .max_by_key(|(gap, _, _)| *gap)
        .unwrap_or_default()
}

#[test]
fn a_killed_primarys_secondary_resumes_with_no_repeated_output_and_the_acknowledged_disk_write() {
    let test = "a_killed_primarys_secondary_resumes_with_no_repeated_output_and_the_acknowledged_disk_write";
    let Some(mut pair) = Pair::start(test) else {
        return;
    };
    // Nothing to resume yet: promotion is refused, naming why.
    let refused = call(&mut pair.secondary, &Request::FtPromote);
    assert!(!refused.ok, "{refused:?}");
    assert!(
        refused
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no complete checkpoint"),
        "{refused:?}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || pair.collector.count() >= 20),
        "the collector got {} beacons from the unprotected primary",
        pair.collector.count()
    );
    let status = pair.protect(30, true, 10);
    let Pair {
        mut primary,
        mut secondary,
        secondary_disk,
        collector,
        // Deleted at the end of the test, after the VMMs in it are killed.
        namespace: _namespace,
        ..
    } = pair;
    println!("primary protected: {status:#?}");
    assert!(status.frames_released > 0, "{status:#?}");

    // A disk write the guest makes and is answered for (the answer waits for the
    // checkpoint holding it to be acknowledged).
    let write = GuestDiskIoRequest {
        disk: 0,
        action: GuestDiskAction::WritePattern,
        offset: 128 << 10,
        length: 32 << 10,
        seed: 81,
        timeout_ms: Some(30_000),
    };
    let written = call(&mut primary, &Request::GuestDiskIo(write.clone()));
    assert!(written.ok, "{written:?}");
    let expected = vmm::guest::disk_checksum(&vmm::guest::disk_pattern(
        write.offset,
        write.length,
        write.seed,
    ));
    assert_eq!(written.guest_disk_io.expect("result").crc32c, expected);

    // Let the pair run a little, then kill the primary (SIGKILL) and promote. (While
    // the guest writes, its main loop sends no beacon: the gaps counted start here.)
    let after_write = collector.count();
    thread::sleep(Duration::from_millis(500));
    let before_kill = collector.count();
    let secondary_before = ft(&mut secondary);
    let killed_at = Instant::now();
    primary.child.kill().expect("kill -9 the primary");
    primary.child.wait().expect("reap the primary");
    let promoted = call(&mut secondary, &Request::FtPromote);
    let promote_call = killed_at.elapsed();
    assert!(promoted.ok, "{promoted:?}");
    let promoted = promoted.ft.expect("status");
    assert_eq!(promoted.phase, "promoted", "{promoted:#?}");
    println!(
        "secondary before the kill: epoch {}, promoted: {promoted:#?}, kill -> promoted answer {promote_call:?}",
        secondary_before.epoch
    );

    assert!(
        wait_until(Duration::from_secs(10), || collector.count()
            >= before_kill + 50),
        "the promoted secondary's beacons did not arrive: {} then {}",
        before_kill,
        collector.count()
    );
    let received = collector.snapshot();
    check_counters(&received);
    let (gap, from, to) = longest_gap(&received[after_write..]);
    println!(
        "beacons: {} received, longest gap since the write {gap:?} (counter {from} -> {to}), the last before the kill {}",
        received.len(),
        received[before_kill - 1].0
    );
    // The failover as the outside world saw it: the last datagram before the kill to
    // the first one after it.
    let last_before = received.iter().rev().find(|(_, at)| *at < killed_at);
    let first_after = received.iter().find(|(_, at)| *at >= killed_at);
    if let (Some(last), Some(first)) = (last_before, first_after) {
        println!(
            "failover seen by the collector: {:?} (counter {} -> {}), {} datagrams of the last epochs lost, none repeated",
            first.1 - last.1,
            last.0,
            first.0,
            first.0 - last.0 - 1
        );
    }
    assert!(
        gap < Duration::from_secs(1),
        "the outside world saw a pause of {gap:?} (counter {from} -> {to})"
    );

    // The write the guest was answered for before the kill is on the promoted side's
    // disk: read by its guest and in the file.
    let read = GuestDiskIoRequest {
        action: GuestDiskAction::ReadChecksum,
        ..write.clone()
    };
    let read = call(&mut secondary, &Request::GuestDiskIo(read));
    assert!(read.ok, "{read:?}");
    assert_eq!(read.guest_disk_io.expect("result").crc32c, expected);
    let bytes = std::fs::read(&secondary_disk).expect("the secondary's disk");
    let range = &bytes[write.offset as usize..(write.offset + write.length) as usize];
    assert_eq!(
        crc32c::crc32c(range),
        expected,
        "the pattern is in the file"
    );

    let status = secondary.status();
    assert_eq!(status.state, "running", "{status:#?}");
    drop(collector);
}

#[test]
fn a_lost_secondary_keeps_the_primarys_output_held_until_ft_stop() {
    let test = "a_lost_secondary_keeps_the_primarys_output_held_until_ft_stop";
    let Some(mut pair) = Pair::start(test) else {
        return;
    };
    pair.protect(30, false, 5);
    let Pair {
        mut primary,
        mut secondary,
        collector,
        // Deleted at the end of the test, after the VMMs in it are killed.
        namespace: _namespace,
        ..
    } = pair;

    secondary.child.kill().expect("kill -9 the secondary");
    secondary.child.wait().expect("reap the secondary");
    let lost = wait_ft(&mut primary, Duration::from_secs(10), |status| {
        status.phase == "secondary-lost"
    });
    println!("{lost:#?}");
    // The secondary may have held a complete checkpoint: nothing leaves meanwhile,
    // though the guest keeps running and transmitting.
    thread::sleep(Duration::from_millis(100));
    let silent_from = collector.count();
    let heartbeats = primary.status().heartbeat_total;
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        collector.count(),
        silent_from,
        "no beacon may leave while the secondary might be promoted"
    );
    let held = ft(&mut primary);
    assert!(held.frames_held >= 10, "{held:#?}");
    assert!(
        primary.status().heartbeat_total > heartbeats,
        "the guest runs on"
    );

    // The commander decides this side runs on: what was held leaves, then the rest.
    let stopped = call(&mut primary, &Request::FtStop);
    assert!(stopped.ok, "{stopped:?}");
    let stopped = stopped.ft.expect("status");
    assert_eq!(stopped.phase, "unprotected", "{stopped:#?}");
    assert_eq!(stopped.frames_held, 0, "{stopped:#?}");
    assert!(
        wait_until(Duration::from_secs(5), || collector.count()
            >= silent_from + 60),
        "the held and new beacons arrive: {silent_from} then {}",
        collector.count()
    );
    check_counters(&collector.snapshot());
    assert!(!primary.status().dirty_logging);
}

#[test]
fn bad_requests_are_refused_and_a_stopped_secondary_exits_without_running() {
    let test = "bad_requests_are_refused_and_a_stopped_secondary_exits_without_running";
    if !kvm_available(test) {
        return;
    }
    let mut primary = VmProcess::spawn(&["--memory", "32MiB"]);
    primary.wait_status(Duration::from_secs(10), |status| status.heartbeat_total > 0);
    let refused = call(
        &mut primary,
        &Request::FtStart {
            to: format!("{LOOPBACK}:1"),
            epoch_ms: 0,
            sync_disks: false,
        },
    );
    let error = refused.error.unwrap_or_default();
    assert!(
        error.contains("epoch_ms 0 is out of range: give 1 to 10000"),
        "{error}"
    );
    let refused = call(
        &mut primary,
        &Request::SetBeacon {
            target: Some("10.0.0.1".into()),
        },
    );
    let error = refused.error.unwrap_or_default();
    assert!(
        error.contains("\"10.0.0.1\" is not an IPv4 address and port"),
        "{error}"
    );
    let refused = call(&mut primary, &Request::FtPromote);
    let error = refused.error.unwrap_or_default();
    assert!(error.contains("not a fault-tolerance secondary"), "{error}");
    // Nobody listens there: the primary stays unprotected and says why.
    let response = call(
        &mut primary,
        &Request::FtStart {
            to: format!("{LOOPBACK}:1"),
            epoch_ms: 30,
            sync_disks: false,
        },
    );
    assert!(response.ok, "{response:?}");
    let status = wait_ft(&mut primary, Duration::from_secs(10), |status| {
        status.phase == "unprotected"
    });
    assert!(
        status
            .error
            .as_deref()
            .unwrap_or("")
            .contains("connecting to the secondary"),
        "{status:#?}"
    );

    let listen = format!("{LOOPBACK}:0");
    let mut secondary = VmProcess::spawn(&["--memory", "32MiB", "--ft-secondary", &listen]);
    listening_address(&mut secondary);
    let stopped = call(&mut secondary, &Request::FtStop);
    assert!(stopped.ok, "{stopped:?}");
    let exit = secondary.wait_exit(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(7), "{}", secondary.stderr());
}
