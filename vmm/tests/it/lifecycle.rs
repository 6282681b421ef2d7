//! VM lifecycle through the real binary: heartbeats, power-off, kill, pause/resume,
//! reboot, crash, signals, memory reporting.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use vmm::control::Request;

use crate::support::{VmProcess, kvm_available, wait_until};

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn heartbeats_arrive_on_every_vcpu_and_power_off_exits_0() {
    if !kvm_available("heartbeats_arrive_on_every_vcpu_and_power_off_exits_0") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "64MiB", "--vcpus", "3", "--name", "hb"]);
    let status = vm.wait_status(TIMEOUT, |status| {
        status.heartbeats.iter().all(|count| *count >= 3)
    });
    assert_eq!(status.state, "running");
    assert_eq!(status.boot, "cairn-guest");
    assert_eq!(status.heartbeats.len(), 3);
    assert!(status.last_heartbeat_age_ms.expect("heartbeat age") < 1000.0);
    assert!(status.first_heartbeat_us.is_some());
    assert!(status.exits.io_out > 0);

    vm.request(&Request::PowerOff { force: false });
    let exit = vm.wait_exit(TIMEOUT);
    assert_eq!(exit.code(), Some(0), "graceful power-off is a clean stop");
    let stdout = vm.stdout();
    assert!(stdout.contains(r#""event":"first-heartbeat""#), "{stdout}");
    assert!(
        stdout.contains(r#""outcome":"stopped""#) && stdout.contains(r#""detail":"guest""#),
        "{stdout}"
    );
    assert!(
        vm.console().contains("cairn-guest: up"),
        "serial log written: {:?}",
        vm.console()
    );
    assert!(
        !vm.path("control.sock").exists(),
        "the socket is removed on exit"
    );
}

#[test]
fn several_vms_run_at_once_and_killing_one_leaves_the_others_running() {
    if !kvm_available("several_vms_run_at_once_and_killing_one_leaves_the_others_running") {
        return;
    }
    let mut vms: Vec<VmProcess> = (0..3)
        .map(|_| VmProcess::spawn(&["--memory", "32MiB"]))
        .collect();
    for vm in &mut vms {
        vm.wait_status(TIMEOUT, |status| status.heartbeat_total >= 3);
    }
    vms[1].child.kill().expect("SIGKILL");
    let killed = vms[1].wait_exit(TIMEOUT);
    assert_eq!(
        killed.signal(),
        Some(libc::SIGKILL),
        "a killed VMM reports the signal, not a code"
    );

    for index in [0, 2] {
        let before = vms[index].status().heartbeat_total;
        vms[index].wait_status(TIMEOUT, |status| {
            status.heartbeat_total >= before + 5 && status.state == "running"
        });
    }
    for index in [0, 2] {
        vms[index].request(&Request::PowerOff { force: true });
        assert_eq!(vms[index].wait_exit(TIMEOUT).code(), Some(0));
    }
}

#[test]
fn pause_stops_heartbeats_and_resume_restarts_them() {
    if !kvm_available("pause_stops_heartbeats_and_resume_restarts_them") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB", "--vcpus", "2"]);
    vm.wait_status(TIMEOUT, |status| status.heartbeat_total >= 3);
    vm.request(&Request::Pause);
    let paused = vm.status();
    assert_eq!(paused.state, "paused");
    std::thread::sleep(Duration::from_millis(150));
    let still = vm.status();
    assert_eq!(
        still.heartbeat_total, paused.heartbeat_total,
        "no heartbeat while paused"
    );
    vm.request(&Request::Resume);
    vm.wait_status(TIMEOUT, |status| {
        status.state == "running" && status.heartbeat_total > paused.heartbeat_total + 3
    });
}

#[test]
fn reboot_restarts_the_guest_in_the_same_process() {
    if !kvm_available("reboot_restarts_the_guest_in_the_same_process") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB"]);
    vm.wait_status(TIMEOUT, |status| status.boot_stage == 2);
    vm.request(&Request::Reboot);
    vm.wait_status(TIMEOUT, |status| {
        status.boot_count == 2 && status.boot_stage == 2
    });
    assert_eq!(
        vm.console().matches("cairn-guest: up").count(),
        2,
        "{}",
        vm.console()
    );
    vm.request(&Request::PowerOff { force: false });
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    assert!(vm.stdout().contains(r#""event":"rebooted""#));
}

#[test]
fn console_input_reaches_the_guest_which_echoes_it() {
    if !kvm_available("console_input_reaches_the_guest_which_echoes_it") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB"]);
    vm.wait_status(TIMEOUT, |status| status.boot_stage == 2);
    let typed = b"typed-into-com1\r";
    let answer = vm.request(&Request::ConsoleInput {
        data: typed.to_vec(),
    });
    assert_eq!(answer.console_accepted, Some(typed.len() as u32));
    // The log holds only what the guest transmitted: the line is there because the
    // guest read each byte from the receive buffer and sent it back.
    assert!(
        wait_until(TIMEOUT, || vm.console().contains("typed-into-com1\r\n")),
        "no echo in {:?}",
        vm.console()
    );
    // The FIFO holds 64 bytes: a paused guest reads nothing, so the rest is refused
    // and the sender learns how much was taken.
    vm.request(&Request::Pause);
    let many = vec![b'x'; 100];
    let first = vm.request(&Request::ConsoleInput { data: many.clone() });
    assert_eq!(first.console_accepted, Some(64));
    let full = vm.request(&Request::ConsoleInput { data: many });
    assert_eq!(full.console_accepted, Some(0));
    vm.request(&Request::Resume);
    vm.request(&Request::PowerOff { force: true });
    vm.wait_exit(TIMEOUT);
}

#[test]
fn a_guest_crash_exits_with_status_4_and_says_why() {
    if !kvm_available("a_guest_crash_exits_with_status_4_and_says_why") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB"]);
    vm.wait_status(TIMEOUT, |status| status.boot_stage == 2);
    vm.request(&Request::GuestCrash);
    let exit = vm.wait_exit(TIMEOUT);
    assert_eq!(exit.code(), Some(i32::from(vmm::exit_code::GUEST_CRASHED)));
    let stdout = vm.stdout();
    assert!(stdout.contains(r#""outcome":"crashed""#), "{stdout}");
}

#[test]
fn sigterm_is_a_graceful_power_off() {
    if !kvm_available("sigterm_is_a_graceful_power_off") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB"]);
    vm.wait_status(TIMEOUT, |status| status.heartbeat_total >= 1);
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    let result = unsafe { libc::kill(vm.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(result, 0);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    assert!(
        vm.stdout().contains(r#""detail":"guest""#),
        "the guest acknowledged the power-off"
    );
}

#[test]
fn a_guest_that_ignores_power_off_is_stopped_after_the_grace_period() {
    if !kvm_available("a_guest_that_ignores_power_off_is_stopped_after_the_grace_period") {
        return;
    }
    // Paused vCPUs are resumed by power-off, so use a long tick instead: the guest only
    // polls its command port once a tick, so a 100 ms grace expires first.
    let mut vm = VmProcess::spawn(&[
        "--memory",
        "32MiB",
        "--tick-ms",
        "5000",
        "--grace-ms",
        "100",
    ]);
    vm.wait_status(TIMEOUT, |status| status.boot_stage == 2);
    vm.request(&Request::PowerOff { force: false });
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    assert!(
        vm.stdout().contains("forced"),
        "the outcome says the stop was forced"
    );
}

#[test]
fn memory_is_mapped_lazily_and_reported() {
    if !kvm_available("memory_is_mapped_lazily_and_reported") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "1GiB"]);
    let status = vm.wait_status(TIMEOUT, |status| status.boot_stage == 2);
    assert_eq!(status.memory_bytes, 1 << 30);
    assert!(
        status.guest_resident_bytes > 0,
        "the guest touched some pages"
    );
    assert!(
        status.guest_resident_bytes < 64 << 20,
        "MAP_NORESERVE: untouched memory is not resident: {status:?}"
    );
    assert!(status.vmm_rss_bytes >= status.guest_resident_bytes);
    if std::path::Path::new("/sys/kernel/mm/ksm").exists() {
        assert!(
            status.ksm_mergeable,
            "guest RAM is offered to KSM where the kernel has it"
        );
    }
}

#[test]
fn the_console_tail_is_served_over_the_control_socket() {
    if !kvm_available("the_console_tail_is_served_over_the_control_socket") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB"]);
    // Stage 2 (main loop) comes after the self-test's console line.
    vm.wait_status(TIMEOUT, |status| status.boot_stage == 2);
    let expected = "cairn-guest: no block device\r\n";
    let tail = vm
        .request(&Request::ConsoleTail {
            bytes: expected.len() as u64,
        })
        .console
        .expect("console text");
    assert_eq!(tail, expected);
    let whole = vm
        .request(&Request::ConsoleTail { bytes: 1 << 20 })
        .console
        .expect("console text");
    assert!(whole.starts_with("cairn-guest: up\r\n"), "{whole:?}");
}

#[test]
fn a_config_file_runs_the_vm_it_describes_and_status_reports_what_runs() {
    let test = "a_config_file_runs_the_vm_it_describes_and_status_reports_what_runs";
    if !kvm_available(test) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = vm_config::VmConfig::builtin("from-file", 2, 48 << 20, dir.path());
    let mut vm = VmProcess::spawn_config(dir, &config);
    let status = vm.wait_status(TIMEOUT, |status| {
        status.heartbeats.iter().all(|count| *count >= 1)
    });
    // What runs: the vCPUs created and the RAM mapped.
    assert_eq!((status.vcpus, status.memory_bytes), (2, 48 << 20));
    assert_eq!(status.heartbeats.len(), 2);
    vm.request(&Request::PowerOff { force: false });
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    assert!(vm.stdout().contains(r#""name":"from-file""#));
    assert!(vm.console().contains("cairn-guest: up"));
}
