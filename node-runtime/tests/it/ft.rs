//! Fault-tolerant VMs through the node API (issue 22): two `cairn-node` processes in two
//! node namespaces on one switch (checkpoints over the underlay 192.168.43.0/24), a
//! built-in guest with a NIC whose beacon (a UDP datagram carrying an increasing
//! counter every 10 ms tick) goes to a collector on its node's tenant bridge. The
//! commander's sequence as the controller would run it: CreateVm on both,
//! PrepareFtSecondary on n2, StartFt on n1; the secondary's VMM killed (the primary
//! holds its output until StopFt), re-protection, then the primary's VMM killed and
//! PromoteFt on n2. The collectors' counters never repeat or go back. Nodes on
//! 127.0.0.51/52 (helper Q's range), namespaces `q-ft…`.

use std::net::UdpSocket;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use network::dev_cluster;
use proto::v1::{self, VmState, apply_request::Action, apply_response};
use tonic::Code;
use vmm::control::{ControlClient, Request};

use crate::harness::{apply_ok, controller, request};

const COLLECTOR_IP: &str = "10.30.0.1";
const BEACON_PORT: u16 = 7091;
const MAGIC: u64 = u64::from_le_bytes(*b"CAIRNBCN");
const VM: &str = "ft-1";

/// Tears the namespaces down and kills the VMMs of both nodes, even when the test
/// fails half-way (the VMMs lead process groups of their own and outlive the nodes).
struct Cleanup {
    prefix: String,
    dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            crate::harness::kill_vmms_of(dir);
        }
        let _ = dev_cluster::teardown(&self.prefix);
    }
}

struct Node {
    client: proto::client::NodeClient,
    _node: crate::harness::TestNode,
    dir: tempfile::TempDir,
}

impl Node {
    async fn start(name: &str, netns: &str, listen: &str, migration: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let controller = controller();
        std::fs::write(
            dir.path().join("trusted-controllers"),
            format!("{}\n", controller.public_key_hex()),
        )
        .unwrap();
        let node = crate::harness::TestNode::start_with_args(
            name,
            dir.path(),
            listen,
            &["--netns", netns, "--migration-address", migration],
        );
        let client = node.client(&controller).await;
        Self {
            client,
            _node: node,
            dir,
        }
    }

    async fn vm(&mut self) -> v1::VmStatus {
        let observed = self.client.observe().await.expect("observe");
        observed
            .vms
            .into_iter()
            .find(|vm| vm.name == VM)
            .expect("the VM is defined here")
    }

    /// Observes until `done` holds (or panics after `timeout` with the last status).
    async fn wait_vm(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&v1::VmStatus) -> bool,
    ) -> v1::VmStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let vm = self.vm().await;
            if done(&vm) {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; last status {vm:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the VM here and points its beacon at the collector on this node's bridge.
    async fn start_beaconing(&mut self, collector: &Collector) {
        apply_ok(
            &mut self.client,
            "start",
            Action::StartVm(v1::StartVm { name: VM.into() }),
        )
        .await;
        let beacon = control(
            &self.socket(),
            &Request::SetBeacon {
                target: Some(format!("{COLLECTOR_IP}:{BEACON_PORT}")),
            },
        );
        assert!(beacon.ok, "{beacon:?}");
        collector
            .wait_count(20, "the unprotected primary's beacons")
            .await;
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("vms").join(VM).join("control.sock")
    }

    async fn ft(&mut self, id: &str, action: Action) -> v1::FtResult {
        let response = apply_ok(&mut self.client, id, action).await;
        match response.result {
            Some(apply_response::Result::Ft(result)) => result,
            other => panic!("{id}: not an FT result: {other:?}"),
        }
    }
}

/// A UDP socket on `COLLECTOR_IP:BEACON_PORT` inside `namespace` (a thread that entered
/// it), recording each beacon's counter and arrival.
struct Collector {
    received: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    fn start(namespace: &str) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("{}/{namespace}", network::netns::NETNS_RUN_DIR);
        let thread = {
            let received = Arc::clone(&received);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let file = std::fs::File::open(&path).expect("the namespace's file");
                // SAFETY: a valid namespace fd; only this thread changes namespace.
                let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(entered, 0, "setns into {path}");
                let socket =
                    UdpSocket::bind((COLLECTOR_IP, BEACON_PORT)).expect("bind the collector");
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
            .recv_timeout(Duration::from_secs(10))
            .expect("the collector is listening");
        Self {
            received,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    fn snapshot(&self) -> Vec<(u64, Instant)> {
        self.received.lock().expect("lock").clone()
    }

    async fn wait_count(&self, at_least: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.count() < at_least {
            assert!(
                Instant::now() < deadline,
                "{what}: {} beacons, expected {at_least}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

fn run(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("command runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn guest() -> v1::CreateVm {
    v1::CreateVm {
        name: VM.into(),
        vcpus: 1,
        memory_bytes: 32 << 20,
        image: Some(v1::create_vm::Image::Builtin("cairn-guest".into())),
        tenant: "alpha".into(),
        nics: vec![v1::VmNic {
            network: "db".into(),
            mtu: 1450,
            ipv4: "10.30.0.5".into(),
        }],
        ..Default::default()
    }
}

fn control(socket: &Path, request: &Request) -> vmm::control::Response {
    let mut client =
        ControlClient::connect(socket, Duration::from_secs(5)).expect("the control socket");
    client.request(request).expect("the control socket answers")
}

/// Every counter the outside world saw, in the order it saw them, only increases.
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

fn start_ft(to: &str) -> Action {
    Action::StartFt(v1::StartFt {
        name: VM.into(),
        to: to.into(),
        epoch_ms: 30,
        sync_disks: true,
        timeout_ms: 0,
        ..Default::default()
    })
}

fn prepare() -> Action {
    Action::PrepareFtSecondary(v1::PrepareFtSecondary {
        name: VM.into(),
        ..Default::default()
    })
}

fn promote() -> Action {
    Action::PromoteFt(v1::PromoteFt { name: VM.into() })
}

fn stop_ft() -> Action {
    Action::StopFt(v1::StopFt { name: VM.into() })
}

/// Two nodes in namespaces on one switch, the VM defined on both, a collector on
/// each node's tenant bridge.
struct Setup {
    names: Vec<String>,
    cleanup: Cleanup,
    n1: Node,
    n2: Node,
    on_n1: Collector,
    on_n2: Collector,
}

async fn setup(tag: &str) -> Option<Setup> {
    if let Err(why) = network::netns_capability() {
        eprintln!("skipping: {why}");
        return None;
    }
    if !crate::vms::vms_can_run() {
        return None;
    }
    let prefix = format!("q-ft{tag}{}-", std::process::id() % 100_000);
    let _ = dev_cluster::teardown(&prefix);
    let mut cleanup = Cleanup {
        prefix: prefix.clone(),
        dirs: Vec::new(),
    };
    let switch = dev_cluster::create_switch(&prefix).expect("switch");
    let mut names = Vec::new();
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        let netns = format!("{prefix}{name}");
        let node = dev_cluster::add_node(&switch, &netns, name, 1).expect("node namespace");
        let ip: std::net::IpAddr = format!("192.168.43.{}", i + 1).parse().unwrap();
        dev_cluster::add_address(&node.ns(), "nic0", ip, 24).expect("underlay");
        names.push(netns);
    }
    let mut n1 = Node::start("n1", &names[0], "127.0.0.51:0", "192.168.43.1").await;
    cleanup.dirs.push(n1.dir.path().to_path_buf());
    let mut n2 = Node::start("n2", &names[1], "127.0.0.52:0", "192.168.43.2").await;
    cleanup.dirs.push(n2.dir.path().to_path_buf());

    // The VM defined on both nodes; each node's tenant bridge gets the collector's
    // address (the beacon is an Ethernet broadcast on the guest's NIC).
    for node in [&mut n1, &mut n2] {
        apply_ok(&mut node.client, "create", Action::CreateVm(guest())).await;
    }
    let bridge = network::tenant::tenant_bridge_name("alpha", "db");
    for netns in &names {
        run(&[
            "ip",
            "-n",
            netns,
            "addr",
            "add",
            &format!("{COLLECTOR_IP}/24"),
            "dev",
            &bridge,
        ]);
        run(&["ip", "-n", netns, "link", "set", &bridge, "up"]);
    }
    let on_n1 = Collector::start(&names[0]);
    let on_n2 = Collector::start(&names[1]);

    Some(Setup {
        names,
        cleanup,
        n1,
        n2,
        on_n1,
        on_n2,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_protected_guest_survives_its_primarys_vmm_killed_with_no_repeated_output() {
    let Some(Setup {
        names: _,
        cleanup,
        mut n1,
        mut n2,
        on_n1,
        on_n2,
    }) = setup("a").await
    else {
        return;
    };

    // Bad requests are refused, naming what is wrong.
    let refused = n2
        .client
        .apply(request("bad-promote", promote()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("no fault-tolerance secondary here"),
        "{refused:?}"
    );
    let mut too_long = start_ft("192.168.43.2:1");
    if let Action::StartFt(start) = &mut too_long {
        start.epoch_ms = 20_000;
    }
    let refused = n1
        .client
        .apply(request("bad-epoch", too_long))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("start_ft.epoch_ms"),
        "{refused:?}"
    );

    n1.start_beaconing(&on_n1).await;

    // A running VM cannot be a secondary; the one defined on n2 can.
    let refused = n1
        .client
        .apply(request("bad-prepare", prepare()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("runs on this node already"),
        "{refused:?}"
    );

    // --- protect, lose the secondary, run alone, protect again ---
    let secondary = n2.ft("prepare-1", prepare()).await;
    assert!(
        secondary.listen_address.starts_with("192.168.43.2:"),
        "{secondary:?}"
    );
    let again = n2.ft("prepare-1b", prepare()).await;
    assert_eq!(again.listen_address, secondary.listen_address, "idempotent");
    let protected = n1
        .ft("protect-1", start_ft(&secondary.listen_address))
        .await;
    let ft = protected.ft.expect("ft status");
    assert_eq!(
        (ft.role.as_str(), ft.phase.as_str()),
        ("primary", "protected"),
        "{ft:?}"
    );
    assert!(ft.last_acked > 0, "{ft:?}");
    let on_secondary = n2.vm().await;
    assert_eq!(on_secondary.state, VmState::Starting as i32);
    let side = on_secondary.ft.expect("the secondary reports its ft block");
    assert_eq!(side.role, "secondary", "{side:?}");
    assert_eq!(side.phase, "protected", "{side:?}");

    // Kill the secondary's VMM: the primary holds its output until StopFt.
    let secondary_pid = on_secondary.pid as i32;
    // SAFETY: kill takes a pid and a signal number.
    unsafe { libc::kill(secondary_pid, libc::SIGKILL) };
    n1.wait_vm(
        Duration::from_secs(20),
        "the primary sees its secondary lost",
        |vm| {
            vm.ft
                .as_ref()
                .is_some_and(|ft| ft.phase == "secondary-lost")
        },
    )
    .await;
    let n2_stopped = n2
        .wait_vm(
            Duration::from_secs(20),
            "the killed secondary is stopped",
            |vm| vm.state == VmState::Stopped as i32,
        )
        .await;
    assert!(
        n2_stopped.last_exit.contains("not promoted"),
        "{n2_stopped:?}"
    );
    let held_from = on_n1.count();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        on_n1.count(),
        held_from,
        "no beacon may leave a primary whose secondary is lost before StopFt"
    );
    let alone = n1.ft("alone", stop_ft()).await;
    assert_eq!(alone.ft.expect("ft").phase, "unprotected");
    on_n1
        .wait_count(held_from + 80, "the held and new beacons after StopFt")
        .await;

    // Re-protection: a new secondary on n2, a full copy again.
    let secondary = n2.ft("prepare-2", prepare()).await;
    let protected = n1
        .ft("protect-2", start_ft(&secondary.listen_address))
        .await;
    assert_eq!(protected.ft.expect("ft").phase, "protected");
    let before = on_n1.count();
    on_n1
        .wait_count(before + 30, "beacons of the protected primary")
        .await;
    let primary = n1.vm().await;
    let ft = primary.ft.clone().expect("ft");
    assert!(ft.last_acked > 1, "{ft:?}");
    assert!(ft.median_output_delay_ms > 0.0, "{ft:?}");

    // --- the failover: the primary's VMM killed, the secondary promoted ---
    let killed_at = Instant::now();
    // SAFETY: kill takes a pid and a signal number.
    unsafe { libc::kill(primary.pid as i32, libc::SIGKILL) };
    n1.wait_vm(
        Duration::from_secs(20),
        "the killed primary is reaped",
        |vm| vm.pid == 0,
    )
    .await;
    let asked = Instant::now();
    let promoted = n2.ft("promote", promote()).await;
    let promote_call = asked.elapsed();
    let running = promoted.vm.expect("the promoted VM runs");
    assert_eq!(running.state, "VM_STATE_RUNNING", "{running:?}");
    on_n2
        .wait_count(50, "the promoted secondary's beacons")
        .await;
    let first_after = on_n2.snapshot()[0].1;
    let last_before = on_n1.snapshot().last().expect("beacons").1;

    let mut seen = on_n1.snapshot();
    seen.extend(on_n2.snapshot());
    check_counters(&seen);
    let n1_last = on_n1.snapshot().last().expect("beacons").0;
    let n2_first = on_n2.snapshot()[0].0;
    println!(
        "failover: kill -9 of the primary's VMM -> the promoted guest's first beacon {:?} (PromoteFt answered in {promote_call:?}, VMM promote_ms {:.2}); last beacon before {n1_last}, first after {n2_first} ({} lost, none repeated); outside gap {:?}; per checkpoint: median {:.0} bytes, output held {:.2} ms",
        first_after - killed_at,
        promoted.ft.as_ref().map_or(0.0, |ft| ft.promote_ms),
        n2_first - n1_last - 1,
        first_after - last_before,
        ft.median_epoch_bytes,
        ft.median_output_delay_ms,
    );
    let now_on_n2 = n2.vm().await;
    assert_eq!(now_on_n2.state, VmState::Running as i32, "{now_on_n2:?}");
    assert_eq!(now_on_n2.ft.map(|ft| ft.phase).as_deref(), Some("promoted"));
    // Replays: promoting again answers the running VM; StopFt with no VMM is fine.
    let again = n2.ft("promote-again", promote()).await;
    assert_eq!(again.vm.expect("running").state, "VM_STATE_RUNNING");
    n1.ft("stop-dead", stop_ft()).await;
    assert_eq!(n1.vm().await.state, VmState::Crashed as i32);
    drop(cleanup);
}

/// A `cairn witness` process (the `cairn` binary built next to the test's), trusting
/// both nodes' keys; killed on drop.
struct Witness {
    child: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Witness {
    fn start(address: &str, nodes: &[(&str, String)]) -> Option<Witness> {
        let exe = std::env::current_exe().ok()?;
        let binary = exe.parent()?.parent()?.join("cairn");
        if !binary.exists() {
            eprintln!(
                "skipping: {} is not built (cargo build -p cli --bin cairn)",
                binary.display()
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let trusted: String = nodes
            .iter()
            .map(|(name, key)| format!("{key} {name}\n"))
            .collect();
        std::fs::write(dir.path().join("trusted-nodes"), trusted).unwrap();
        let child = std::process::Command::new(binary)
            .args(["witness", "--listen", address, "--data-dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("cairn witness starts");
        let socket: std::net::SocketAddr = address.parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&socket, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < deadline, "the witness did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Witness {
            child,
            address: address.to_owned(),
            _dir: dir,
        })
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`setup`] and a witness at `address` trusting both nodes.
async fn setup_with_witness(tag: &str, address: &str) -> Option<(Setup, Witness)> {
    let setup = setup(tag).await?;
    let keys = [
        ("n1", setup.n1._node.public_key_hex()),
        ("n2", setup.n2._node.public_key_hex()),
    ];
    let witness = Witness::start(address, &keys)?;
    Some((setup, witness))
}

fn guarded(mut action: Action, witness: &str) -> Action {
    match &mut action {
        Action::StartFt(start) => start.witness = witness.into(),
        Action::PrepareFtSecondary(prepare) => prepare.witness = witness.into(),
        _ => {}
    }
    action
}

/// Issue 22 item 3 with a real `cairn witness` (127.0.0.53): the nodes decide by
/// themselves which side of a pair runs, with no commander after StartFt. (1) The
/// primary's VMM killed -9: the secondary's node waits for the primary's grant of
/// `vm/ft-1` to lapse, wins it and promotes; the beacons never repeat or go back.
/// (2) Protected again the other way round, then the underlay between the nodes cut
/// (a silent partition: no error on either VMM's link) while both reach the witness:
/// the primary's node holds the grant and runs alone, releasing its output; the
/// secondary's node is refused and never promotes. Exactly one side runs. (3) Healed,
/// protected again, the witness killed -9 (the healthy pair runs on) and the same
/// partition: the primary's node fences its VMM (its last grant has ended), the
/// secondary's never promotes: neither side runs alone without a lease.
#[tokio::test(flavor = "multi_thread")]
async fn the_witness_lets_exactly_one_side_of_a_pair_run() {
    let Some((
        Setup {
            names,
            cleanup,
            mut n1,
            mut n2,
            on_n1,
            on_n2,
        },
        witness,
    )) = setup_with_witness("w", "127.0.0.53:7453").await
    else {
        return;
    };
    let at = witness.address.clone();

    n1.start_beaconing(&on_n1).await;
    let secondary = n2.ft("prepare-1", guarded(prepare(), &at)).await;
    let protected = n1
        .ft(
            "protect-1",
            guarded(start_ft(&secondary.listen_address), &at),
        )
        .await;
    assert_eq!(protected.ft.expect("ft").phase, "protected");
    let primary = n1
        .wait_vm(Duration::from_secs(20), "n1 holds vm/ft-1", |vm| {
            vm.ft.as_ref().is_some_and(|ft| ft.witness_holder == "n1")
        })
        .await;
    println!("n1 guard: {}", primary.ft.as_ref().unwrap().guard);

    // (1) kill -9 of the primary's VMM; nobody but the nodes and the witness acts.
    let before = on_n1.count();
    on_n1
        .wait_count(before + 20, "beacons of the protected primary")
        .await;
    let killed_at = Instant::now();
    // SAFETY: kill takes a pid and a signal number.
    unsafe { libc::kill(primary.pid as i32, libc::SIGKILL) };
    let promoted = n2
        .wait_vm(Duration::from_secs(30), "n2 promotes by itself", |vm| {
            vm.state == VmState::Running as i32
        })
        .await;
    let ft = promoted.ft.clone().expect("ft");
    assert_eq!(ft.witness_holder, "n2", "{ft:?}");
    on_n2
        .wait_count(30, "the promoted secondary's beacons")
        .await;
    let failover = on_n2.snapshot()[0].1 - killed_at;
    let mut seen = on_n1.snapshot();
    seen.extend(on_n2.snapshot());
    check_counters(&seen);
    println!(
        "witness failover: kill -9 of the primary's VMM -> the promoted guest's first beacon {failover:?} (witness lease {} ms, grant {}); n2 guard: {}",
        node_runtime::vms::ft_guard::DEFAULT_LEASE_MS,
        ft.witness_number,
        ft.guard
    );
    assert!(
        ft.witness_number > primary.ft.as_ref().unwrap().witness_number,
        "a new holder gets a higher number: {ft:?}"
    );

    // (2) The other way round: n2 primary (running alone, guarded), n1 secondary.
    let secondary = n1.ft("prepare-2", guarded(prepare(), &at)).await;
    let protected = n2
        .ft(
            "protect-2",
            guarded(start_ft(&secondary.listen_address), &at),
        )
        .await;
    assert_eq!(protected.ft.expect("ft").phase, "protected");
    n2.wait_vm(
        Duration::from_secs(20),
        "n2 holds vm/ft-1 protected",
        |vm| {
            vm.ft
                .as_ref()
                .is_some_and(|ft| ft.guard.starts_with("protected, holding"))
        },
    )
    .await;
    let n1_beacons = on_n1.count();
    // The silent partition: the underlay between the nodes goes down.
    run(&["ip", "-n", &names[1], "link", "set", "nic0", "down"]);
    let cut_at = Instant::now();
    let alone = n2
        .wait_vm(Duration::from_secs(30), "n2 runs alone", |vm| {
            vm.ft.as_ref().is_some_and(|ft| ft.phase == "unprotected")
        })
        .await;
    println!(
        "partition: n2 (holding the grant) runs alone {:?} after the cut: {}",
        cut_at.elapsed(),
        alone.ft.as_ref().unwrap().guard
    );
    let released = on_n2.count();
    on_n2
        .wait_count(released + 50, "n2's beacons after it runs alone")
        .await;
    // n1's secondary saw no checkpoint for as long: refused, never promoted.
    let waiting = n1
        .wait_vm(Duration::from_secs(30), "n1's secondary is refused", |vm| {
            vm.ft
                .as_ref()
                .is_some_and(|ft| ft.guard.contains("not promoted"))
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = n1.vm().await;
    assert_eq!(still.state, VmState::Starting as i32, "{still:?}");
    assert_eq!(
        on_n1.count(),
        n1_beacons,
        "n1's secondary never ran: no beacon left n1 after the failover"
    );
    println!("n1 guard: {}", waiting.ft.unwrap().guard);
    let mut seen = on_n1.snapshot();
    seen.extend(on_n2.snapshot());
    check_counters(&seen);

    // (3) Healed and protected again, then the witness killed and the same partition:
    // without a lease neither side runs alone.
    run(&["ip", "-n", &names[1], "link", "set", "nic0", "up"]);
    n1.ft("give-up", stop_ft()).await;
    n1.wait_vm(
        Duration::from_secs(20),
        "n1's old secondary stopped",
        |vm| vm.state == VmState::Stopped as i32,
    )
    .await;
    let secondary = n1.ft("prepare-3", guarded(prepare(), &at)).await;
    let protected = n2
        .ft(
            "protect-3",
            guarded(start_ft(&secondary.listen_address), &at),
        )
        .await;
    assert_eq!(protected.ft.expect("ft").phase, "protected");
    n2.wait_vm(Duration::from_secs(20), "n2 holds vm/ft-1 again", |vm| {
        vm.ft
            .as_ref()
            .is_some_and(|ft| ft.guard.starts_with("protected, holding"))
    })
    .await;
    drop(witness);
    n2.wait_vm(Duration::from_secs(20), "n2 sees the witness gone", |vm| {
        vm.ft
            .as_ref()
            .is_some_and(|ft| ft.guard.contains("does not answer"))
    })
    .await;
    let protected_on = on_n2.count();
    on_n2
        .wait_count(
            protected_on + 20,
            "a healthy pair runs on without its witness",
        )
        .await;
    let n1_beacons = on_n1.count();
    run(&["ip", "-n", &names[1], "link", "set", "nic0", "down"]);
    let cut_at = Instant::now();
    let stopped = n2
        .wait_vm(
            Duration::from_secs(30),
            "n2's primary stops without a lease",
            |vm| vm.pid == 0,
        )
        .await;
    assert!(stopped.last_exit.contains("fenced"), "{stopped:?}");
    let n2_beacons = on_n2.count();
    let waiting = n1
        .wait_vm(
            Duration::from_secs(30),
            "n1's secondary finds no witness",
            |vm| {
                vm.ft
                    .as_ref()
                    .is_some_and(|ft| ft.guard.contains("does not answer"))
            },
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = n1.vm().await;
    assert_eq!(still.state, VmState::Starting as i32, "{still:?}");
    assert_eq!(on_n1.count(), n1_beacons, "n1's secondary never ran");
    assert_eq!(on_n2.count(), n2_beacons, "n2 sent nothing once stopped");
    println!(
        "witness gone, then partitioned: n2 fenced {:?} after the cut ({}); n1: {}",
        cut_at.elapsed(),
        stopped.last_exit,
        waiting.ft.expect("ft").guard
    );
    let mut seen = on_n1.snapshot();
    seen.extend(on_n2.snapshot());
    check_counters(&seen);
    drop(cleanup);
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The first beacon `collector` saw at or after `from`, as time after `from`.
fn first_beacon_after(collector: &Collector, from: Instant) -> Option<Duration> {
    collector
        .snapshot()
        .iter()
        .find(|(_, at)| *at >= from)
        .map(|(_, at)| *at - from)
}

/// Failover figures through the whole node path, `CAIRN_FT_RUNS` rounds (default 5),
/// the pair swapping nodes each round: (a) the commander's path: the primary's VMM
/// killed -9, the test sees it reaped (Observe) and sends PromoteFt: kill → PromoteFt
/// answered (the promoted guest's first heartbeat seen by the node) and kill → its
/// first beacon at the collector; (b) the witness's path (a real `cairn witness`,
/// lease `CAIRN_FT_LEASE_MS`, default the node's `DEFAULT_LEASE_MS`): kill → the first beacon, the nodes deciding alone. Baseline in the
/// same command: a cold StartVm of the same VM (spawn → first heartbeat, answered).
/// Medians printed.
/// The failover benchmark (`cargo bench -p node-runtime --bench ft`, which includes
/// this file): prints figures, asserts none.
#[allow(dead_code)]
pub(crate) async fn failover_figures() {
    let Some((
        Setup {
            names: _,
            cleanup,
            mut n1,
            mut n2,
            on_n1,
            on_n2,
        },
        witness,
    )) = setup_with_witness("b", "127.0.0.54:7454").await
    else {
        return;
    };
    let at = witness.address.clone();
    let runs: usize = std::env::var("CAIRN_FT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let lease_ms: u32 = std::env::var("CAIRN_FT_LEASE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(node_runtime::vms::ft_guard::DEFAULT_LEASE_MS as u32);
    // Baseline: cold starts on n2 (the VM is defined there, not running).
    let mut cold = Vec::new();
    for run in 0..runs {
        let started = Instant::now();
        apply_ok(
            &mut n2.client,
            &format!("cold-{run}"),
            Action::StartVm(v1::StartVm { name: VM.into() }),
        )
        .await;
        cold.push(started.elapsed().as_secs_f64() * 1000.0);
        apply_ok(
            &mut n2.client,
            &format!("cold-stop-{run}"),
            Action::StopVm(v1::StopVm {
                name: VM.into(),
                grace_ms: 0,
            }),
        )
        .await;
    }
    n1.start_beaconing(&on_n1).await;
    let (mut answered, mut beacon, mut through_witness) = (Vec::new(), Vec::new(), Vec::new());
    let mut primary_on_n1 = true;
    for round in 0..2 * runs {
        let by_witness = round >= runs;
        let witness_of = |action: Action| {
            if !by_witness {
                return action;
            }
            match guarded(action, &at) {
                Action::StartFt(mut start) => {
                    start.witness_lease_ms = lease_ms;
                    Action::StartFt(start)
                }
                Action::PrepareFtSecondary(mut prepare) => {
                    prepare.witness_lease_ms = lease_ms;
                    Action::PrepareFtSecondary(prepare)
                }
                other => other,
            }
        };
        let (primary, secondary, collector) = if primary_on_n1 {
            (&mut n1, &mut n2, &on_n2)
        } else {
            (&mut n2, &mut n1, &on_n1)
        };
        let prepared = secondary
            .ft(&format!("b-prepare-{round}"), witness_of(prepare()))
            .await;
        primary
            .ft(
                &format!("b-protect-{round}"),
                witness_of(start_ft(&prepared.listen_address)),
            )
            .await;
        let vm = primary
            .wait_vm(Duration::from_secs(20), "protected a while", |vm| {
                vm.ft.as_ref().is_some_and(|ft| ft.last_acked > 20)
                    && (!by_witness
                        || vm
                            .ft
                            .as_ref()
                            .is_some_and(|ft| ft.guard.starts_with("protected, holding")))
            })
            .await;
        let killed_at = Instant::now();
        // SAFETY: kill takes a pid and a signal number.
        unsafe { libc::kill(vm.pid as i32, libc::SIGKILL) };
        if by_witness {
            secondary
                .wait_vm(Duration::from_secs(30), "promoted by its node", |vm| {
                    vm.state == VmState::Running as i32
                })
                .await;
        } else {
            primary
                .wait_vm(Duration::from_secs(20), "reaped", |vm| vm.pid == 0)
                .await;
            secondary.ft(&format!("b-promote-{round}"), promote()).await;
            answered.push(killed_at.elapsed().as_secs_f64() * 1000.0);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let first = loop {
            if let Some(first) = first_beacon_after(collector, killed_at) {
                break first;
            }
            assert!(Instant::now() < deadline, "no beacon after the promotion");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let ms = first.as_secs_f64() * 1000.0;
        if by_witness {
            through_witness.push(ms);
        } else {
            beacon.push(ms);
        }
        primary_on_n1 = !primary_on_n1;
    }
    let mut seen: Vec<(u64, Instant)> = on_n1.snapshot();
    seen.extend(on_n2.snapshot());
    seen.sort_by_key(|(_, at)| *at);
    let monotonic = seen.windows(2).all(|pair| pair[1].0 > pair[0].0);
    let base = median(cold.clone());
    println!(
        "FT failover, {runs} runs each (medians): commander path kill -9 -> PromoteFt answered {:.1} ms, -> first beacon {:.1} ms; witness path (lease {lease_ms} ms) kill -9 -> first beacon {:.1} ms; baseline cold StartVm -> first heartbeat {:.1} ms; ratios {:.2} / {:.2} / {:.2}; beacons monotonic over all rounds: {monotonic}",
        median(answered.clone()),
        median(beacon.clone()),
        median(through_witness.clone()),
        base,
        median(answered.clone()) / base,
        median(beacon.clone()) / base,
        median(through_witness.clone()) / base,
    );
    println!(
        "runs: commander answered {answered:.1?}; beacon {beacon:.1?}; witness {through_witness:.1?}; cold {cold:.1?}"
    );
    drop(witness);
    drop(cleanup);
}
