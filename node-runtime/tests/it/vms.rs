//! VMs supervised as cairn-vmm processes: running, crashed, stopped.

use std::path::PathBuf;
use std::time::Duration;

use proto::v1::{
    CreateVm, DeleteVm, StartVm, StopVm, VmState, apply_request::Action, create_vm::Image,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, request};

fn vmm_binary() -> Option<PathBuf> {
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
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_runs_crashes_and_stops_as_a_supervised_process() {
    let Some(_binary) = vmm_binary() else {
        eprintln!("skipping: cairn-vmm is not built next to cairn-node (cargo build -p vmm)");
        return;
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipping: /dev/kvm is not usable here");
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
