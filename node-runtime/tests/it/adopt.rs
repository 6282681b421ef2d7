//! Agent restarts are not node failures (issue 16, item 5): VMMs outlive `cairn-node`
//! (kill -9 of the agent alone, or a graceful stop), and the next agent adopts each
//! one only after it has proved to be the process recorded at spawn (pidfd, start
//! time, `identify` with the incarnation id). Real processes, real KVM.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::v1::{
    self, CreateVm, CreateVolume, StopVm, VmState, VmStatus, apply_request::Action,
    create_vm::Image,
};

use crate::harness::{TestNode, apply_ok, controller};
use crate::vms::{observe_vm, start, vms_can_run};

/// This helper's loopback address.
const IP: &str = "127.0.0.161";
/// The lease the fake controller grants: the VMMs' fence deadlines lapse this long
/// after the last renewal was sent. Longer than the 3 s default: an agent restart of a
/// debug build took up to 5.8 s while other builds loaded this 2-core machine (the
/// fence, renewed up to T/3 before the kill, then lapsed first).
const TTL_MS: u64 = 8_000;

/// A controller that only grants leases: every VM it names is fenced, those it names
/// as `unguarded` (availability `none`) disarmed.
#[derive(Clone)]
struct FakeController {
    fenced: Vec<String>,
    unguarded: Vec<String>,
    grants: Arc<AtomicU64>,
    /// How long every renewal after the first waits before it is answered.
    slow: Duration,
}

#[tonic::async_trait]
impl v1::lease_server::Lease for FakeController {
    async fn renew(
        &self,
        _request: tonic::Request<v1::RenewLeaseRequest>,
    ) -> Result<tonic::Response<v1::RenewLeaseReply>, tonic::Status> {
        let grant = self.grants.fetch_add(1, Ordering::SeqCst) + 1;
        if grant > 1 {
            tokio::time::sleep(self.slow).await;
        }
        Ok(tonic::Response::new(v1::RenewLeaseReply {
            ttl_ms: TTL_MS,
            grant,
            site_peers: vec![],
            fenced_vms: self.fenced.clone(),
            renew_every_ms: 0,
            unguarded_vms: self.unguarded.clone(),
            witness: String::new(),
            witness_lease_ms: 0,
        }))
    }
}

/// Serves the fake controller on this helper's address; returns its `host:port`.
async fn fake_controller(fenced: &[&str]) -> (String, Arc<AtomicU64>) {
    fake_controller_with(fenced, &[]).await
}

/// [`fake_controller`] that also names `unguarded` VMs (availability `none`).
async fn fake_controller_with(fenced: &[&str], unguarded: &[&str]) -> (String, Arc<AtomicU64>) {
    fake_controller_on(IP, fenced, unguarded, Duration::ZERO).await
}

/// [`fake_controller_with`] on `ip`, answering every renewal after the first `slow`
/// late.
async fn fake_controller_on(
    ip: &str,
    fenced: &[&str],
    unguarded: &[&str],
    slow: Duration,
) -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind the fake controller");
    let address = listener.local_addr().expect("address").to_string();
    let grants = Arc::new(AtomicU64::new(0));
    let service = FakeController {
        fenced: fenced.iter().map(|vm| vm.to_string()).collect(),
        unguarded: unguarded.iter().map(|vm| vm.to_string()).collect(),
        grants: grants.clone(),
        slow,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::lease_server::LeaseServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, grants)
}

/// Starts (or restarts) agent `name` of `dir` (one small disk) trusting `controller`,
/// with `extra` arguments.
fn agent_with(
    name: &str,
    dir: &Path,
    controller: &proto::auth::Identity,
    extra: &[&str],
) -> TestNode {
    agent_on(IP, name, dir, controller, extra, &[])
}

/// [`agent_with`] listening on `ip`, with environment variables `env`.
fn agent_on(
    ip: &str,
    name: &str,
    dir: &Path,
    controller: &proto::auth::Identity,
    extra: &[&str],
    env: &[(&str, &str)],
) -> TestNode {
    std::fs::write(
        dir.join("trusted-controllers"),
        format!("{} test-controller\n", controller.public_key_hex()),
    )
    .unwrap();
    let disk = ["--disks", "1", "--disk-capacity", "268435456"];
    TestNode::start_with_env(
        name,
        dir,
        &format!("{ip}:0"),
        &[&disk[..], extra].concat(),
        env,
    )
}

/// Starts (or restarts) the agent of `dir`, renewing its lease at `lease`.
fn agent(dir: &Path, controller: &proto::auth::Identity, lease: &str) -> TestNode {
    let ttl = TTL_MS.to_string();
    agent_with(
        "adopter",
        dir,
        controller,
        &["--lease-from", lease, "--lease-ttl-ms", &ttl],
    )
}

fn control(dir: &Path, vm: &str) -> PathBuf {
    dir.join("vms").join(vm).join("control.sock")
}

/// The VMM's own status, asked on its control socket (no agent involved).
fn vmm_status(dir: &Path, vm: &str) -> vmm::control::VmStatus {
    vmm::control::ControlClient::connect(&control(dir, vm), Duration::from_secs(2))
        .and_then(|mut client| client.status())
        .expect("the VMM answers on its control socket")
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim().chars().next());
        !matches!(state, Some('Z') | Some('X') | None)
    })
}

/// Polls Observe until `done` holds for VM `name`.
async fn observe_until(
    client: &mut proto::client::NodeClient,
    name: &str,
    what: &str,
    done: impl Fn(&VmStatus) -> bool,
) -> VmStatus {
    crate::vms::observe_until(client, what, |vms| vms.get(name).is_some_and(&done))
        .await
        .remove(name)
        .expect("observed")
}

fn builtin_vm(name: &str, volumes: &[&str]) -> Action {
    Action::CreateVm(CreateVm {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 32 << 20,
        image: Some(Image::Builtin("cairn-guest".into())),
        volumes: volumes.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    })
}

/// Waits until the VMM's fence deadline is armed, returning it.
async fn fence_armed(dir: &Path, vm: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(at) = vmm_status(dir, vm).fence_deadline_boottime_ns {
            return at;
        }
        assert!(
            Instant::now() < deadline,
            "no fence pushed into {vm} in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running, fenced VM `guest` on a fresh agent.
struct Setup {
    dir: tempfile::TempDir,
    identity: proto::auth::Identity,
    lease: String,
    node: TestNode,
    pid: u32,
}

async fn running_fenced_vm(volumes: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let identity = controller();
    let (lease, _grants) = fake_controller(&["guest"]).await;
    let node = agent(dir.path(), &identity, &lease);
    let mut client = node.client(&identity).await;
    for volume in volumes {
        apply_ok(
            &mut client,
            &format!("volume-{volume}"),
            Action::CreateVolume(CreateVolume {
                name: volume.to_string(),
                size_bytes: 8 << 20,
                stripe_width: 1,
                stripe_unit_bytes: 1 << 20,
                replica_peers: vec![],
            }),
        )
        .await;
    }
    apply_ok(&mut client, "create", builtin_vm("guest", volumes)).await;
    apply_ok(&mut client, "start", start("guest")).await;
    let running = observe_vm(&mut client, "guest").await;
    assert_eq!(running.state, VmState::Running as i32, "{running:?}");
    fence_armed(dir.path(), "guest").await;
    Setup {
        pid: running.pid,
        dir,
        identity,
        lease,
        node,
    }
}

/// Restarts the agent and waits until it reports `guest` running again; returns the
/// new agent, its client, the VM and how long from spawn to that answer.
async fn restart_and_adopt(
    setup: &Setup,
) -> (TestNode, proto::client::NodeClient, VmStatus, Duration) {
    let started = Instant::now();
    let node = agent(setup.dir.path(), &setup.identity, &setup.lease);
    let mut client = node.client(&setup.identity).await;
    let vm = observe_vm(&mut client, "guest").await;
    let took = started.elapsed();
    (node, client, vm, took)
}

/// The agent's log says it adopted the cairn-vmm `pid`.
fn assert_logged_adoption(node: &TestNode, pid: u32) {
    let log = node.log();
    assert!(
        log.contains(&format!("adopted cairn-vmm pid {pid}")),
        "{log}"
    );
}

/// What a restarted agent must show: the same VMM adopted, running, heartbeating,
/// its fence renewed past 2 × T.
async fn assert_adopted(
    setup: &Setup,
    mut client: proto::client::NodeClient,
    vm: VmStatus,
    when_the_agent_went: u64,
) {
    let dir = setup.dir.path();
    assert_eq!(
        vm.state,
        VmState::Running as i32,
        "{vm:?}\nvmm.log:\n{}",
        std::fs::read_to_string(dir.join("vms/guest/vmm.log")).unwrap_or_default()
    );
    assert_eq!(vm.pid, setup.pid, "the same cairn-vmm, not a new one");
    assert_eq!(vm.starts, 1, "no second process was started: {vm:?}");
    observe_until(&mut client, "guest", "a fresh heartbeat", |vm| {
        vm.heartbeat_fresh
    })
    .await;
    // Past the deadline the VMM held when its agent went away (+1 s), and at least
    // two renewal intervals (T/3) after the adoption: only the new agent's renewals
    // can have kept it running (it would have fenced itself, exit 6).
    let past = when_the_agent_went + 1_000_000_000;
    let wait = Duration::from_nanos(past.saturating_sub(vmm::fence::boottime_ns()))
        .max(Duration::from_millis(2 * TTL_MS / 3 + 500));
    tokio::time::sleep(wait).await;
    assert!(alive(setup.pid), "the adopted VMM ended");
    let later = vmm_status(dir, "guest");
    let renewed = later.fence_deadline_boottime_ns.unwrap_or(0);
    assert!(
        renewed > when_the_agent_went,
        "fence not renewed by the new agent: {when_the_agent_went} then {renewed}"
    );
    assert!(later.fence_remaining_ms.unwrap_or(-1.0) > 0.0, "{later:?}");
    let vm = observe_vm(&mut client, "guest").await;
    assert_eq!(
        (vm.state, vm.pid),
        (VmState::Running as i32, setup.pid),
        "{vm:?}"
    );
    assert!(vm.heartbeat_fresh, "{vm:?}");
    // The adopted VMM's exit is watched (pidfd): a stop is reported STOPPED.
    apply_ok(
        &mut client,
        "stop-adopted",
        Action::StopVm(StopVm {
            name: "guest".into(),
            grace_ms: 5_000,
        }),
    )
    .await;
    let stopped = observe_until(&mut client, "guest", "stopped", |vm| {
        vm.state == VmState::Stopped as i32
    })
    .await;
    assert_eq!(stopped.pid, 0);
    assert!(!alive(setup.pid));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_outlives_a_kill_9_of_its_agent_and_the_next_agent_adopts_it() {
    if !vms_can_run() {
        return;
    }
    let mut setup = running_fenced_vm(&[]).await;
    // A process group of its own: a signal to the agent's group does not reach it.
    assert_eq!(pgid(setup.pid), Some(setup.pid));
    let before = vmm_status(setup.dir.path(), "guest").heartbeat_total;
    setup.node.kill_9();
    let deadline = fence_armed(setup.dir.path(), "guest").await;
    // The agent is gone; the VMM is not, and its guest goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(setup.pid), "the VMM died with its agent");
    let during = vmm_status(setup.dir.path(), "guest").heartbeat_total;
    assert!(
        during > before,
        "heartbeats stopped: {before} then {during}"
    );
    let (node, client, vm, took) = restart_and_adopt(&setup).await;
    eprintln!("kill -9 of the agent: restarted agent answered with the VM adopted after {took:?}");
    assert_logged_adoption(&node, setup.pid);
    assert_adopted(&setup, client, vm, deadline).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vmm_slow_to_answer_the_handshake_is_adopted_not_killed() {
    if !vms_can_run() {
        return;
    }
    let mut setup = running_fenced_vm(&[]).await;
    setup.node.kill_9();
    let deadline = fence_armed(setup.dir.path(), "guest").await;
    // The VMM cannot answer for 1.5 s (SIGSTOP), longer than one handshake read
    // waits (1 s): as on a loaded machine, where a CI run's new agent killed a VM it
    // should have adopted.
    let pid = setup.pid as i32;
    // SAFETY: kill takes a pid and a signal number; the pid is this test's VMM.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    let (node, client, vm, took) = restart_and_adopt(&setup).await;
    resume.join().unwrap();
    eprintln!("a VMM stopped 1.5 s at the agent's start: adopted after {took:?}");
    assert_logged_adoption(&node, setup.pid);
    assert_adopted(&setup, client, vm, deadline).await;
}

/// Issue 20's CPU test restarts a loaded node's agent: there the spot VM's starved
/// VMM answered its handshake on the third try (5.8 s), and the reserved HA VM, verified
/// after it, fenced itself before the new agent renewed its lease (exit 6, its control
/// socket gone). A slow VMM must hold back neither the others' adoption nor their
/// fences.
#[tokio::test(flavor = "multi_thread")]
async fn a_vmm_slow_to_answer_holds_back_neither_the_adoption_nor_the_fence_of_the_others() {
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let identity = controller();
    // `guest` is fenced (HA); `a-slow` is of availability `none` (as a spot VM: never
    // fenced, so its stop cannot end it) and sorts first: one VM at a time, it would
    // be verified before `guest`.
    let (lease, _grants) = fake_controller_with(&["guest"], &["a-slow"]).await;
    let mut node = agent(dir.path(), &identity, &lease);
    let mut client = node.client(&identity).await;
    let mut pids = Vec::new();
    for vm in ["a-slow", "guest"] {
        apply_ok(&mut client, &format!("create-{vm}"), builtin_vm(vm, &[])).await;
        apply_ok(&mut client, &format!("start-{vm}"), start(vm)).await;
        let running = observe_vm(&mut client, vm).await;
        assert_eq!(running.state, VmState::Running as i32, "{running:?}");
        pids.push(running.pid);
    }
    let (slow_pid, guest_pid) = (pids[0], pids[1]);
    fence_armed(dir.path(), "guest").await;
    let disarmed = Instant::now() + Duration::from_secs(10);
    while vmm_status(dir.path(), "a-slow")
        .fence_deadline_boottime_ns
        .is_some()
    {
        assert!(Instant::now() < disarmed, "a-slow not disarmed within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent goes when guest's fence has little left (it is renewed every T/3, so
    // between 2/3 T and T): its deadline then falls within the new agent's handshake
    // with a-slow (1 + 2 + 4 s).
    let late = Instant::now() + Duration::from_secs(10);
    while vmm_status(dir.path(), "guest")
        .fence_remaining_ms
        .is_none_or(|left| left > (2 * TTL_MS / 3 + 300) as f64)
    {
        assert!(Instant::now() < late, "guest's fence not renewed for 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.kill_9();
    let deadline = fence_armed(dir.path(), "guest").await;
    // a-slow cannot answer until 700 ms past guest's deadline (SIGSTOP).
    // SAFETY: kill takes a pid and a signal number; the pid is this test's VMM.
    assert_eq!(unsafe { libc::kill(slow_pid as i32, libc::SIGSTOP) }, 0);
    let resume = std::thread::spawn(move || {
        let at = deadline + 700_000_000;
        std::thread::sleep(Duration::from_nanos(
            at.saturating_sub(vmm::fence::boottime_ns()),
        ));
        // SAFETY: as above.
        unsafe { libc::kill(slow_pid as i32, libc::SIGCONT) };
    });
    let left_ms = deadline.saturating_sub(vmm::fence::boottime_ns()) / 1_000_000;
    let started = Instant::now();
    let node = agent(dir.path(), &identity, &lease);
    let mut client = node.client(&identity).await;
    let serving = started.elapsed();
    resume.join().unwrap();
    // guest ran on past the deadline it held when its agent went: the new agent pushed
    // it a later one while a-slow was still being asked who it is.
    let past = deadline + 1_000_000_000;
    tokio::time::sleep(Duration::from_nanos(
        past.saturating_sub(vmm::fence::boottime_ns()),
    ))
    .await;
    let log = node.log();
    assert!(
        alive(guest_pid),
        "guest's VMM ended (its fence lapsed {left_ms} ms after the kill); vmm.log:\n{}\nnode log:\n{log}",
        std::fs::read_to_string(dir.path().join("vms/guest/vmm.log")).unwrap_or_default()
    );
    let guest = observe_vm(&mut client, "guest").await;
    assert_eq!(
        (guest.state, guest.pid, guest.starts),
        (VmState::Running as i32, guest_pid, 1),
        "{guest:?}\n{log}"
    );
    let renewed = vmm_status(dir.path(), "guest")
        .fence_deadline_boottime_ns
        .unwrap_or(0);
    assert!(renewed > deadline, "{deadline} then {renewed}");
    assert_logged_adoption(&node, guest_pid);
    let slow = observe_vm(&mut client, "a-slow").await;
    eprintln!(
        "guest's fence had {left_ms} ms left at the kill; a-slow stopped until 700 ms past it; the new agent served after {serving:?}; a-slow: {} (pid {}, was {slow_pid})",
        VmState::try_from(slow.state).map_or("?", |s| s.as_str_name()),
        slow.pid,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_of_the_agent_leaves_its_vms_running_for_the_next_to_adopt() {
    if !vms_can_run() {
        return;
    }
    let mut setup = running_fenced_vm(&[]).await;
    assert_eq!(setup.node.terminate(), Some(0), "graceful stop exits 0");
    let deadline = fence_armed(setup.dir.path(), "guest").await;
    assert!(
        alive(setup.pid),
        "a graceful stop killed the VM; vmm.log:\n{}",
        std::fs::read_to_string(setup.dir.path().join("vms/guest/vmm.log")).unwrap_or_default()
    );
    let (_node, client, vm, took) = restart_and_adopt(&setup).await;
    eprintln!("graceful restart of the agent: VM adopted, answered after {took:?}");
    assert_adopted(&setup, client, vm, deadline).await;
}

/// Points the VM's record at `pid`, as if the kernel had given the recorded pid of its
/// dead VMM to another process (the agent is down; the record keeps the VMM's start
/// time and incarnation). Rewinding the host's pid counter (`ns_last_pid`) would do it
/// for real, but on a shared host it makes stale pids that other tests hold point at
/// fresh processes.
fn record_pid(dir: &Path, vm: &str, pid: u32) {
    use node_runtime::records::{Records, VmRecord};
    let records = Records::open(&dir.join("node.redb")).expect("open the node's records");
    let mut record: VmRecord = records.get(vm).expect("read").expect("the VM's record");
    record.last_pid = pid;
    records.put(vm, &record).expect("write");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_reuses_the_recorded_pid_is_neither_adopted_nor_killed() {
    if !vms_can_run() {
        return;
    }
    let mut setup = running_fenced_vm(&[]).await;
    setup.node.kill_9();
    // The VMM dies while no agent watches, and its pid goes to someone else.
    // SAFETY: kill of the VMM this test started (its pid from Observe).
    unsafe { libc::kill(setup.pid as libc::pid_t, libc::SIGKILL) };
    let mut impostor = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    record_pid(setup.dir.path(), "guest", impostor.id());
    let (_node, mut client, vm, _) = restart_and_adopt(&setup).await;
    assert_eq!(vm.state, VmState::Crashed as i32, "{vm:?}");
    assert_eq!(vm.pid, 0, "{vm:?}");
    assert!(
        vm.last_exit
            .contains(&format!("pid {} is now another process", impostor.id()))
            && vm.last_exit.contains("not adopted and not touched"),
        "{}",
        vm.last_exit
    );
    assert!(
        matches!(impostor.try_wait(), Ok(None)),
        "the process at the recorded pid was killed"
    );
    let _ = impostor.kill();
    let _ = impostor.wait();
    // The reconciler may start it again: a new process.
    apply_ok(&mut client, "start-again", start("guest")).await;
    let again = observe_vm(&mut client, "guest").await;
    assert_eq!(again.state, VmState::Running as i32);
    assert_ne!(again.pid, setup.pid);
}

/// Puts a fake control server in place of the VMM's socket (the VMM keeps its
/// listener on the unlinked one) that says it is `guest` in another incarnation.
fn impostor_socket(path: &Path, pid: u32) -> std::thread::JoinHandle<()> {
    let fresh = path.with_extension("impostor");
    let _ = std::fs::remove_file(&fresh);
    let listener = std::os::unix::net::UnixListener::bind(&fresh).unwrap();
    std::fs::rename(&fresh, path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(stream) = stream else { continue };
            let mut writer = stream.try_clone().unwrap();
            let mut line = String::new();
            if BufReader::new(stream).read_line(&mut line).is_err() {
                continue;
            }
            let answer = serde_json::json!({
                "ok": true,
                "identity": {"name": "guest", "incarnation": "impostor", "pid": pid},
            });
            let _ = writeln!(writer, "{answer}");
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vmm_whose_handshake_gives_another_incarnation_is_not_adopted() {
    if !vms_can_run() {
        return;
    }
    let mut setup = running_fenced_vm(&[]).await;
    setup.node.kill_9();
    let _impostor = impostor_socket(&control(setup.dir.path(), "guest"), setup.pid);
    let (_node, _client, vm, _) = restart_and_adopt(&setup).await;
    assert_eq!(vm.state, VmState::Crashed as i32, "{vm:?}");
    assert!(
        vm.last_exit
            .contains("answered as vm `guest` incarnation `impostor`")
            && vm.last_exit.contains("not adopted"),
        "{}",
        vm.last_exit
    );
    // It is this node's VMM of the VM (pid, start time, command line) but not provably
    // this incarnation: killed through its pidfd so a new start cannot run beside it.
    assert!(!alive(setup.pid), "the unverified VMM still runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_disk_writes_across_an_agent_restart_wait_and_none_fails() {
    if !vms_can_run() {
        return;
    }
    let mut setup = running_fenced_vm(&["guest-root"]).await;
    let dir = setup.dir.path().to_path_buf();
    let socket = control(&dir, "guest");
    // The guest writes its disk (its block self-test: 4 KiB written, read back and
    // compared) over and over, through the agent's NBD server, while the agent is
    // killed and started again.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver = {
        let (stop, socket) = (stop.clone(), socket.clone());
        std::thread::spawn(move || {
            let mut asked = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // A long timeout: a request waits while the disk's server is gone.
                if let Ok(mut client) =
                    vmm::control::ControlClient::connect(&socket, Duration::from_secs(30))
                    && client.request(&vmm::control::Request::BlockTest).is_ok()
                {
                    asked += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            asked
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = vmm_status(&dir, "guest");
    setup.node.kill_9();
    // Without its agent the guest's next write waits (its one vCPU with it): the
    // self-tests stop advancing, and nothing fails.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = vmm_status(&dir, "guest");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = vmm_status(&dir, "guest");
    assert_eq!(
        still.block_tests, waiting.block_tests,
        "the guest's disk I/O went on without the agent's NBD server"
    );
    assert_eq!(still.disks.first().map(|d| d.errors), Some(0), "{still:?}");
    let (_node, mut client, vm, took) = restart_and_adopt(&setup).await;
    eprintln!("agent restarted under guest disk writes; VM adopted after {took:?}");
    assert_eq!(
        (vm.state, vm.pid),
        (VmState::Running as i32, setup.pid),
        "{vm:?}"
    );
    let disk = vm.disks.first().expect("the disk");
    assert!(disk.attached, "the disk is served again: {disk:?}");
    // Self-tests go on after the restart, and pass.
    let target = before.block_tests + 5;
    let vm = observe_until(&mut client, "guest", "five more self-tests", |vm| {
        vm.guest_block_tests >= target
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let asked = driver.join().unwrap();
    let after = vmm_status(&dir, "guest");
    assert!(asked > 5, "only {asked} self-tests were asked for");
    assert_eq!(vm.guest_block_test, "pass", "{vm:?}");
    let counters = after.disks.first().expect("disk counters");
    assert_eq!(
        counters.errors, 0,
        "a guest disk request failed: {counters:?}"
    );
    assert!(
        counters.writes > before.disks.first().map_or(0, |d| d.writes),
        "{counters:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_stop_vms_on_exit_a_graceful_stop_still_kills_the_vms() {
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let identity = controller();
    let mut node = agent_with(
        "stopper",
        dir.path(),
        &identity,
        &["--stop-vms-on-exit", "--vmm-process-group", "agent"],
    );
    let mut client = node.client(&identity).await;
    apply_ok(&mut client, "create", builtin_vm("guest", &[])).await;
    apply_ok(&mut client, "start", start("guest")).await;
    let pid = observe_vm(&mut client, "guest").await.pid;
    // `--vmm-process-group agent` (what `cairn dev up` passes): the agent's group.
    assert_eq!(pgid(pid), pgid(node.pid()));
    assert_ne!(pgid(pid), Some(pid));
    assert_eq!(node.terminate(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the VMM outlived --stop-vms-on-exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next agent reports it crashed by the restart.
    let node = agent_with("stopper", dir.path(), &identity, &[]);
    let vm = observe_vm(&mut node.client(&identity).await, "guest").await;
    assert_eq!(vm.state, VmState::Crashed as i32, "{vm:?}");
    assert!(
        vm.last_exit.contains("ended while the node agent was down"),
        "{vm:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_is_armed_only_when_asked_petted_while_the_lease_holds_and_disarmed_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let identity = controller();
    std::fs::write(
        dir.path().join("trusted-controllers"),
        format!("{} test-controller\n", identity.public_key_hex()),
    )
    .unwrap();
    // A start that must fail: its exit code and what it said.
    let refused = |extra: &[&std::ffi::OsStr]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-node"))
            .args([
                "--name",
                "dog",
                "--listen",
                &format!("{IP}:0"),
                "--data-dir",
            ])
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // Without a lease the node never holds quorum: a watchdog would reset the host.
    let (code, stderr) = refused(&["--watchdog".as_ref(), "/dev/null".as_ref()]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--lease-from"), "{stderr}");
    // A device that cannot be opened stops the start, naming it.
    let (lease, _) = fake_controller(&[]).await;
    let missing = dir.path().join("no-such-watchdog");
    let (code, stderr) = refused(&[
        "--lease-from".as_ref(),
        lease.as_ref(),
        "--watchdog".as_ref(),
        missing.as_os_str(),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("cannot open the watchdog device") && stderr.contains("no-such-watchdog"),
        "{stderr}"
    );
    // A plain file stands in for /dev/watchdog: each pet is a byte written, the magic
    // close a `V`.
    let device = dir.path().join("watchdog");
    std::fs::write(&device, b"").unwrap();
    let mut node = agent_with(
        "dog",
        dir.path(),
        &identity,
        &[
            "--lease-from",
            &lease,
            "--watchdog",
            device.to_str().unwrap(),
        ],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pets = std::fs::read(&device).unwrap();
    assert!(
        pets.len() >= 2 && pets.iter().all(|b| *b == 0),
        "pets while the lease holds: {pets:?}"
    );
    assert_eq!(node.terminate(), Some(0), "{}", node.log());
    let written = std::fs::read(&device).unwrap();
    assert_eq!(
        written.last(),
        Some(&b'V'),
        "no magic close on a graceful exit"
    );
}

/// A renewal may take a third of the lease the controller GRANTED, not of the one asked
/// for before the first grant: the node's channels to its controller and peers were
/// made at its first round, with that round's call timeout (T/3 of the 3 s default:
/// 1 s), and kept, so every later renewal or probe slower than 1 s failed ("Timeout
/// expired") though a 10 s grant allows 3.3 s; under load a node whose renewals and
/// probes all failed so for T fenced its VMs while the controller still granted its
/// lease. Here the controller grants 8 s (`TTL_MS`: a 2.7 s call timeout) and answers
/// every renewal after the first 1.5 s late: each must count, and so must the first
/// renewal of the agent restarted on the same data directory. No VM and no KVM needed; the
/// node's rounds are read from its log (`CAIRN_QUORUM_TRACE`).
#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_slower_than_a_third_of_the_asked_lease_but_within_the_granted_one_counts() {
    let (address, grants) =
        fake_controller_on("127.0.0.85", &[], &[], Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let start = || {
        agent_on(
            "127.0.0.85",
            "slow-lease",
            dir.path(),
            &controller,
            &["--lease-from", &address, "--lease-ttl-ms", "3000"],
            &[("CAIRN_QUORUM_TRACE", "1")],
        )
    };
    // Waits (30 s at most) until the controller was asked `count` renewals in all.
    let asked = |count: u64| {
        let grants = grants.clone();
        async move {
            let started = Instant::now();
            while grants.load(Ordering::SeqCst) < count
                && started.elapsed() < Duration::from_secs(30)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let node = start();
    // The first grant at once, then rounds every 2.7 s, each answered after 1.5 s.
    asked(5).await;
    // The fifth request was sent: the fourth was answered (or timed out) before it.
    let log = node.log();
    let rounds: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("cairn-node: quorum round: "))
        .collect();
    assert!(rounds.len() >= 4, "four rounds within 30 s: {log}");
    for round in &rounds[..4] {
        assert!(
            round.contains("renewal granted;"),
            "every renewal is granted, the slow ones too: {round}\n{log}"
        );
    }
    assert!(!log.contains("Timeout expired"), "{log}");
    // Restarted, the agent's first round already waits T/3 of the grant it kept in
    // quorum.json: on the asked-for 3 s it timed out at 1 s, counted a site majority
    // for 3 s only, and the next round came the kept T/3 later, while the fences its
    // predecessor pushed ran out.
    drop(node);
    let before = grants.load(Ordering::SeqCst);
    let node = start();
    asked(before + 2).await;
    let log = node.log();
    let first = log
        .lines()
        .find(|l| l.starts_with("cairn-node: quorum round: "))
        .unwrap_or_else(|| panic!("a round of the restarted agent within 30 s: {log}"));
    assert!(
        first.contains("renewal granted;"),
        "the restarted agent's first renewal, 1.5 s late, is granted: {first}\n{log}"
    );
    println!(
        "slow renewals: {} rounds with the controller answering 1.5 s late (the granted 8 s lease allows 2.7 s; the asked-for 3 s one 1 s): {}; restarted, its first round: {first}",
        rounds.len(),
        rounds[..4].join(" | ")
    );
}
