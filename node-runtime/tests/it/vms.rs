//! VMs supervised as cairn-vmm processes: running, crashed, stopped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use proto::v1::{
    CreateVm, DeleteVm, Health, StartVm, StopVm, VmState, VmStatus, apply_request::Action,
    create_vm::Image,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, request};

pub(crate) fn vmm_binary() -> Option<PathBuf> {
    let node = PathBuf::from(env!("CARGO_BIN_EXE_cairn-node"));
    let candidate = node.parent()?.join("cairn-vmm");
    candidate.is_file().then_some(candidate)
}

fn create_vm(name: &str) -> Action {
    Action::CreateVm(CreateVm {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 32 << 20,
        image: Some(Image::Builtin("cairn-guest".into())),
        volumes: vec![],
        ..Default::default()
    })
}

/// Whether VMs can run here; prints why not.
pub(crate) fn vms_can_run() -> bool {
    if vmm_binary().is_none() {
        eprintln!("skipping: cairn-vmm is not built next to cairn-node (cargo build -p vmm)");
        return false;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipping: /dev/kvm is not usable here");
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_runs_crashes_and_stops_as_a_supervised_process() {
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("vm-node", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    apply_ok(&mut client, "create", create_vm("guest")).await;
    apply_ok(
        &mut client,
        "start",
        Action::StartVm(StartVm {
            name: "guest".into(),
        }),
    )
    .await;

    let mut events = client.watch(1000).await.unwrap();
    let running = client
        .observe()
        .await
        .unwrap()
        .vms
        .into_iter()
        .find(|vm| vm.name == "guest")
        .unwrap();
    assert_eq!(running.state, VmState::Running as i32);
    assert!(running.pid > 0);

    // A crash: the VMM process dies without being asked to.
    // SAFETY: kill takes a pid and a signal number; it has no memory effects.
    unsafe { libc::kill(running.pid as libc::pid_t, libc::SIGKILL) };
    let mut crashed = None;
    for _ in 0..100 {
        let vm = client
            .observe()
            .await
            .unwrap()
            .vms
            .into_iter()
            .find(|vm| vm.name == "guest")
            .unwrap();
        if vm.state == VmState::Crashed as i32 {
            crashed = Some(vm);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let crashed = crashed.expect("the VM is reported crashed");
    // Watch reported the crash as it happened.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, tokio_stream::StreamExt::next(&mut events))
            .await
            .expect("a crash event within 10 s")
            .expect("stream open")
            .expect("event");
        if let Some(proto::v1::watch_event::Event::Vm(vm)) = event.event
            && vm.name == "guest"
            && vm.state == VmState::Crashed as i32
        {
            assert_eq!(vm.health, proto::v1::Health::Failed as i32);
            break;
        }
    }
    assert_eq!(crashed.crash_count, 1);
    assert!(
        crashed.last_exit.contains("signal"),
        "{}",
        crashed.last_exit
    );

    // Restarted and stopped on request: stopped, not crashed.
    apply_ok(
        &mut client,
        "start-2",
        Action::StartVm(StartVm {
            name: "guest".into(),
        }),
    )
    .await;
    apply_ok(
        &mut client,
        "stop",
        Action::StopVm(StopVm {
            name: "guest".into(),
            grace_ms: 3000,
        }),
    )
    .await;
    let stopped = client
        .observe()
        .await
        .unwrap()
        .vms
        .into_iter()
        .find(|vm| vm.name == "guest")
        .unwrap();
    assert_eq!(stopped.state, VmState::Stopped as i32);
    assert_eq!(stopped.crash_count, 1);
    apply_ok(
        &mut client,
        "delete",
        Action::DeleteVm(DeleteVm {
            name: "guest".into(),
        }),
    )
    .await;
    assert!(client.observe().await.unwrap().vms.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_definitions_are_idempotent_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut node = TestNode::start("vm-def", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    apply_ok(&mut client, "c-1", create_vm("web")).await;
    apply_ok(&mut client, "c-2", create_vm("web")).await;
    let other = Action::CreateVm(CreateVm {
        name: "web".into(),
        vcpus: 2,
        memory_bytes: 32 << 20,
        image: Some(Image::Builtin("cairn-guest".into())),
        volumes: vec![],
        ..Default::default()
    });
    let status = client.apply(request("c-3", other)).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    node.kill_9();
    let node = TestNode::start_at("vm-def", dir.path(), "127.0.0.1:0");
    let vms = node.client(&controller).await.observe().await.unwrap().vms;
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].state, VmState::Stopped as i32);
    assert_eq!(vms[0].vcpus, 1);
}

/// Whether process `pid` holds a KVM VM file descriptor (it is a real KVM VM to the host).
fn holds_kvm_vm_fd(pid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:kvm-vm")
    })
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists; no memory effects.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

async fn observe_vms(client: &mut proto::client::NodeClient) -> BTreeMap<String, VmStatus> {
    client
        .observe()
        .await
        .unwrap()
        .vms
        .into_iter()
        .map(|vm| (vm.name.clone(), vm))
        .collect()
}

/// Polls Observe (up to 5 s) until `done` holds for the VMs, returning them.
pub(crate) async fn observe_until(
    client: &mut proto::client::NodeClient,
    what: &str,
    done: impl Fn(&BTreeMap<String, VmStatus>) -> bool,
) -> BTreeMap<String, VmStatus> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let vms = observe_vms(client).await;
        if done(&vms) {
            return vms;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}: {vms:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn several_vms_run_as_separate_kvm_processes_with_fresh_heartbeats_and_one_crash_is_isolated()
{
    if !vms_can_run() {
        return;
    }
    let names = ["vm-a", "vm-b", "vm-c"];
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("multi-vm", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    for name in names {
        apply_ok(&mut client, &format!("create-{name}"), create_vm(name)).await;
        apply_ok(
            &mut client,
            &format!("start-{name}"),
            Action::StartVm(StartVm { name: name.into() }),
        )
        .await;
    }

    let first = observe_until(&mut client, "all VMs run with fresh heartbeats", |vms| {
        names.iter().all(|name| {
            vms.get(*name).is_some_and(|vm| {
                vm.state == VmState::Running as i32 && vm.heartbeat_fresh && vm.heartbeats > 0
            })
        })
    })
    .await;
    for name in names {
        let vm = &first[name];
        assert_eq!(vm.health, Health::Healthy as i32, "{vm:?}");
        assert!(vm.heartbeat_age_ms <= 2_000, "{vm:?}");
    }
    // Heartbeats keep coming on every VM.
    let second = observe_until(&mut client, "every VM's heartbeats increase", |vms| {
        names
            .iter()
            .all(|name| vms[*name].heartbeats > first[*name].heartbeats)
    })
    .await;

    // Separate, live processes, each holding its own KVM VM.
    let pids: BTreeMap<&str, u32> = names
        .iter()
        .map(|name| (*name, second[*name].pid))
        .collect();
    let mut distinct: Vec<u32> = pids.values().copied().collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), names.len(), "pids {pids:?}");
    for (name, pid) in &pids {
        assert!(*pid > 0 && process_alive(*pid), "{name}: pid {pid}");
        assert!(
            holds_kvm_vm_fd(*pid),
            "{name}: pid {pid} holds no anon_inode:kvm-vm fd"
        );
    }

    // Kill one VMM: only that VM crashes.
    let victim = "vm-b";
    // SAFETY: kill takes a pid and a signal number; it has no memory effects.
    unsafe { libc::kill(pids[victim] as libc::pid_t, libc::SIGKILL) };
    let crashed = observe_until(&mut client, "the killed VM is reported crashed", |vms| {
        vms[victim].state == VmState::Crashed as i32
    })
    .await;
    assert_eq!(crashed[victim].health, Health::Failed as i32);
    assert_eq!(crashed[victim].pid, 0);
    assert_eq!(crashed[victim].crash_count, 1);
    assert!(!crashed[victim].heartbeat_fresh);
    let survivors = ["vm-a", "vm-c"];
    let after = observe_until(&mut client, "the other VMs keep heartbeating", |vms| {
        survivors.iter().all(|name| {
            vms[*name].heartbeats > crashed[*name].heartbeats && vms[*name].heartbeat_fresh
        })
    })
    .await;
    for name in survivors {
        let vm = &after[name];
        assert_eq!(vm.state, VmState::Running as i32, "{vm:?}");
        assert_eq!(vm.health, Health::Healthy as i32, "{vm:?}");
        assert_eq!(vm.pid, pids[name], "{name} was restarted");
        assert_eq!(vm.crash_count, 0, "{vm:?}");
        assert!(process_alive(vm.pid));
    }

    for name in names {
        apply_ok(
            &mut client,
            &format!("stop-{name}"),
            Action::StopVm(StopVm {
                name: name.into(),
                grace_ms: 3000,
            }),
        )
        .await;
        apply_ok(
            &mut client,
            &format!("delete-{name}"),
            Action::DeleteVm(DeleteVm { name: name.into() }),
        )
        .await;
    }
    assert!(observe_vms(&mut client).await.is_empty());
    for (name, pid) in &pids {
        assert!(!process_alive(*pid), "{name}: pid {pid} still runs");
    }
}

pub(crate) fn start(name: &str) -> Action {
    Action::StartVm(StartVm { name: name.into() })
}

fn stop(name: &str) -> Action {
    Action::StopVm(StopVm {
        name: name.into(),
        grace_ms: 3000,
    })
}

fn kernel_vm(name: &str, kernel_path: &str, initrd_path: &str) -> Action {
    Action::CreateVm(CreateVm {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        image: Some(Image::Kernel(proto::v1::KernelImage {
            kernel_path: kernel_path.into(),
            initrd_path: initrd_path.into(),
            cmdline: "console=ttyS0 quiet".into(),
        })),
        ..Default::default()
    })
}

pub(crate) async fn observe_vm(client: &mut proto::client::NodeClient, name: &str) -> VmStatus {
    observe_vms(client)
        .await
        .remove(name)
        .unwrap_or_else(|| panic!("vm {name} is not observed"))
}

#[tokio::test(flavor = "multi_thread")]
async fn start_vm_answers_once_the_guest_heartbeats_and_starts_count_every_process_across_restarts()
{
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let mut node = TestNode::start_on("vm-starts", dir.path(), &controller, "127.0.0.74");
    let mut client = node.client(&controller).await;
    apply_ok(&mut client, "create", create_vm("guest")).await;
    let defined = observe_vm(&mut client, "guest").await;
    assert_eq!(defined.starts, 0);
    assert_eq!(defined.image_builtin, "cairn-guest");
    assert_eq!(defined.kernel_path, "");

    let started = apply_ok(&mut client, "start-1", start("guest")).await;
    let Some(proto::v1::apply_response::Result::Vm(result)) = started.result else {
        panic!("unexpected result {started:?}");
    };
    assert_eq!(result.state, "VM_STATE_RUNNING");
    // Seen running before the answer: the first heartbeat is already there.
    let running = observe_vm(&mut client, "guest").await;
    assert_eq!(running.state, VmState::Running as i32, "{running:?}");
    assert!(running.heartbeats > 0, "{running:?}");
    assert_eq!(running.starts, 1);

    // A retry of the same request is answered from the record: no second process.
    assert!(
        apply_ok(&mut client, "start-1", start("guest"))
            .await
            .replayed
    );
    // A new StartVm of a running VM changes nothing either.
    apply_ok(&mut client, "start-2", start("guest")).await;
    let still = observe_vm(&mut client, "guest").await;
    assert_eq!((still.starts, still.pid), (1, running.pid));

    // Stop does not reset the count; the next start adds one.
    apply_ok(&mut client, "stop-1", stop("guest")).await;
    assert_eq!(observe_vm(&mut client, "guest").await.starts, 1);
    apply_ok(&mut client, "start-3", start("guest")).await;
    assert_eq!(observe_vm(&mut client, "guest").await.starts, 2);

    // The count is durable: a node killed and restarted still reports it (and has
    // adopted the VM's process, which outlived the agent: no new start).
    node.kill_9();
    let node = TestNode::start_at("vm-starts", dir.path(), "127.0.0.74:0");
    let mut client = node.client(&controller).await;
    let after = observe_vm(&mut client, "guest").await;
    assert_eq!(after.starts, 2, "{after:?}");
    assert_eq!(after.state, VmState::Running as i32, "{after:?}");
    apply_ok(&mut client, "stop-2", stop("guest")).await;
    apply_ok(&mut client, "start-4", start("guest")).await;
    let again = observe_vm(&mut client, "guest").await;
    assert_eq!(again.starts, 3);
    assert!(again.heartbeats > 0, "{again:?}");
    apply_ok(
        &mut client,
        "delete",
        Action::DeleteVm(DeleteVm {
            name: "guest".into(),
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn start_vm_of_a_kernel_that_is_not_a_kernel_fails_with_the_vmm_error_and_the_vm_is_not_running()
 {
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start_on(
        "vm-bad-kernel",
        &dir.path().join("node"),
        &controller,
        "127.0.0.75",
    );
    let mut client = node.client(&controller).await;
    let kernel = dir.path().join("zeros.bzImage");
    std::fs::write(&kernel, vec![0u8; 1 << 20]).unwrap();
    let kernel = kernel.display().to_string();
    apply_ok(&mut client, "create", kernel_vm("linux", &kernel, "")).await;
    let defined = observe_vm(&mut client, "linux").await;
    assert_eq!(defined.image_builtin, "");
    assert_eq!(defined.kernel_path, kernel);
    assert_eq!(defined.initrd_path, "");
    assert_eq!(defined.cmdline, "console=ttyS0 quiet");

    let status = client
        .apply(request("start", start("linux")))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::FailedPrecondition | Code::Aborted),
        "{status:?}"
    );
    let message = status.message();
    assert!(message.contains("vm `linux` did not start"), "{message}");
    assert!(message.contains("exit status"), "{message}");
    // The VMM's own words, from its log.
    assert!(message.contains("vmm.log"), "{message}");
    assert!(message.contains("error: vm linux"), "{message}");

    let vm = observe_vm(&mut client, "linux").await;
    assert_ne!(vm.state, VmState::Running as i32, "{vm:?}");
    assert!(
        vm.state == VmState::Crashed as i32 || vm.state == VmState::Stopped as i32,
        "{vm:?}"
    );
    assert_eq!(vm.pid, 0);
    assert_eq!(vm.starts, 1, "the VMM process was started once");
    assert!(vm.last_exit.contains("exit status"), "{vm:?}");
    // A failed start is not recorded: asking again tries again.
    assert_eq!(
        client.get_outcome("start").await.unwrap().outcome,
        proto::v1::Outcome::NotFound as i32
    );
}

/// A stand-in `cairn-vmm` that never heartbeats (it only sleeps).
fn silent_vmm(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("silent-cairn-vmm");
    std::fs::write(
        &path,
        "#!/bin/sh\necho \"silent vmm: booting nothing\"\nexec sleep 60\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vmm_not_seen_running_within_the_start_timeout_is_killed_and_the_start_fails() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm does not exist (the node refuses StartVm before the check)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let data_dir = dir.path().join("node");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(
        data_dir.join("trusted-controllers"),
        format!("{}\n", controller.public_key_hex()),
    )
    .unwrap();
    let vmm = silent_vmm(dir.path());
    let node = TestNode::start_with_args(
        "vm-timeout",
        &data_dir,
        "127.0.0.76:0",
        &[
            "--vmm-binary",
            vmm.to_str().unwrap(),
            "--vm-start-timeout-ms",
            "700",
        ],
    );
    let mut client = node.client(&controller).await;
    apply_ok(&mut client, "create", create_vm("quiet")).await;
    let begun = std::time::Instant::now();
    let status = client
        .apply(request("start", start("quiet")))
        .await
        .unwrap_err();
    assert!(begun.elapsed() >= Duration::from_millis(700));
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let message = status.message();
    assert!(
        message.contains("did not report a first guest heartbeat within 700 ms"),
        "{message}"
    );
    assert!(message.contains("silent vmm: booting nothing"), "{message}");
    let vm = observe_vm(&mut client, "quiet").await;
    assert_eq!(vm.state, VmState::Crashed as i32, "{vm:?}");
    assert_eq!(vm.pid, 0);
    assert!(vm.last_exit.contains("was killed"), "{vm:?}");
    assert_eq!(vm.starts, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_vm_refuses_a_kernel_or_initrd_that_is_not_on_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start_on("lab-1", &dir.path().join("node"), &controller, "127.0.0.77");
    let mut client = node.client(&controller).await;
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let kernel = kernel.display().to_string();
    let missing = dir.path().join("x/y").display().to_string();
    let directory = dir.path().display().to_string();
    let cases = [
        (
            kernel_vm("a", &missing, ""),
            "create_vm.kernel.kernel_path",
            format!("kernel {missing} does not exist on node lab-1"),
        ),
        (
            kernel_vm("b", &kernel, &missing),
            "create_vm.kernel.initrd_path",
            format!("initrd {missing} does not exist on node lab-1"),
        ),
        (
            kernel_vm("c", &directory, ""),
            "create_vm.kernel.kernel_path",
            format!("kernel {directory} is a directory on node lab-1"),
        ),
        (
            kernel_vm("d", &kernel, "relative/initrd"),
            "create_vm.kernel.initrd_path",
            "must be an absolute path".to_string(),
        ),
    ];
    for (index, (action, field, problem)) in cases.into_iter().enumerate() {
        let status = client
            .apply(request(&format!("bad-{index}"), action))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{}", status.message());
        assert!(status.message().contains(&problem), "{}", status.message());
    }
    assert!(observe_vms(&mut client).await.is_empty());
    // Files that are there are accepted (whether they boot is StartVm's business).
    apply_ok(&mut client, "good", kernel_vm("e", &kernel, &kernel)).await;
    let vm = observe_vm(&mut client, "e").await;
    assert_eq!(
        (vm.kernel_path.as_str(), vm.initrd_path.as_str()),
        (kernel.as_str(), kernel.as_str())
    );
}

/// A `cairn-vmm` run through a wrapper that hands the real VMM the node's `VmConfig`
/// with 48 MiB and 2 vCPUs instead of the definition's 32 MiB and 1: a VMM that runs
/// something other than what the node stored (the case Observe exists to reveal). The
/// VMM is real and so is what it reports; nothing but its input differs.
fn vmm_running_other_than_defined(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let real = vmm_binary().expect("cairn-vmm is built");
    let path = dir.join("resizing-cairn-vmm");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             # cairn-node runs: cairn-vmm --config FILE\n\
             [ \"$1\" = --config ] || exit 2\n\
             sed -e 's/\"memory_bytes\": *[0-9]*/\"memory_bytes\": {}/' \
                 -e 's/\"vcpus\": *[0-9]*/\"vcpus\": 2/' \"$2\" > \"$2.vmm\" || exit 2\n\
             exec {} --config \"$2.vmm\"\n",
            48u64 << 20,
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_reports_the_vcpus_and_memory_the_vmm_runs_not_the_stored_definition() {
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let data_dir = dir.path().join("node");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(
        data_dir.join("trusted-controllers"),
        format!("{}\n", controller.public_key_hex()),
    )
    .unwrap();
    let vmm = vmm_running_other_than_defined(dir.path());
    let node = TestNode::start_with_args(
        "vm-effective",
        &data_dir,
        "127.0.0.81:0",
        &["--vmm-binary", vmm.to_str().unwrap()],
    );
    let mut client = node.client(&controller).await;
    apply_ok(&mut client, "create", create_vm("sized")).await;
    let defined = observe_vm(&mut client, "sized").await;
    assert_eq!((defined.vcpus, defined.memory_bytes), (1, 32 << 20));

    apply_ok(&mut client, "start", start("sized")).await;
    // The node handed the VMM its definition, as a VmConfig beside the VM's run files.
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("vms/sized/vm-config.json")).unwrap())
            .unwrap();
    assert_eq!(written["memory_bytes"], 32 << 20);
    assert_eq!(written["vcpus"], 1);
    let running = observe_vm(&mut client, "sized").await;
    assert_eq!(running.state, VmState::Running as i32, "{running:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", running.pid)).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("vm-config.json.vmm"),
        "the real cairn-vmm runs the wrapper's config"
    );
    // What runs, asked of the VMM, not the stored definition.
    assert_eq!(
        (running.vcpus, running.memory_bytes),
        (2, 48 << 20),
        "{running:?}"
    );

    // Stopped, there is no VMM to ask: the definition is what there is.
    apply_ok(&mut client, "stop", stop("sized")).await;
    let stopped = observe_vm(&mut client, "sized").await;
    assert_eq!(stopped.state, VmState::Stopped as i32, "{stopped:?}");
    assert_eq!((stopped.vcpus, stopped.memory_bytes), (1, 32 << 20));
}
