//! The fence deadline through the real binary: a VM whose node stops renewing stops
//! itself, on time, with exit 6; renewals keep it running; a late renewal is refused.

use std::time::{Duration, Instant};

use vmm::control::Request;
use vmm::fence::boottime_ns;

use crate::support::{VmProcess, kvm_available};

const TIMEOUT: Duration = Duration::from_secs(10);

fn set_fence(vm: &mut VmProcess, deadline_boottime_ns: u64) -> vmm::control::Response {
    vm.request(&Request::SetFence {
        deadline_boottime_ns,
    })
}

#[test]
fn a_vm_whose_fence_is_renewed_runs_and_stops_itself_when_renewals_stop() {
    if !kvm_available("a_vm_whose_fence_is_renewed_runs_and_stops_itself_when_renewals_stop") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB", "--vcpus", "2", "--name", "fenced"]);
    vm.wait_status(TIMEOUT, |status| status.heartbeat_total >= 3);
    // Renew a 1 s lease every 100 ms for two seconds, as a node holding quorum does
    // (the lease is long enough that a loaded test machine never misses one).
    let renewing = Instant::now();
    while renewing.elapsed() < Duration::from_secs(2) {
        assert!(set_fence(&mut vm, boottime_ns() + 1_000_000_000).ok);
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = vm.status();
    assert_eq!(status.state, "running", "renewed in time: {status:#?}");
    assert!(status.fence_deadline_boottime_ns.is_some());
    let before = status.heartbeat_total;
    vm.wait_status(TIMEOUT, |s| s.heartbeat_total > before);

    // The last renewal: the VMM must stop by itself at its deadline.
    let deadline = boottime_ns() + 300_000_000;
    assert!(set_fence(&mut vm, deadline).ok);
    let exit = vm.wait_exit(TIMEOUT);
    let exited_at = boottime_ns();
    assert_eq!(exit.code(), Some(6), "a lapsed fence exits 6 (fenced)");
    assert!(
        exited_at >= deadline,
        "the VM did not stop before its deadline"
    );
    let late_ms = (exited_at - deadline) as f64 / 1e6;
    // The exit is noticed by polling try_wait every 5 ms; the VMM itself stops its
    // vCPUs within a kick of the deadline.
    assert!(
        late_ms < 250.0,
        "stopped {late_ms:.1} ms after the deadline"
    );
    eprintln!("fence lapse → process exit observed {late_ms:.1} ms after the deadline");
    let stdout = vm.stdout();
    assert!(
        stdout.contains(r#""outcome":"fenced""#) && stdout.contains("fence deadline lapsed"),
        "{stdout}"
    );
}

#[test]
fn an_unarmed_vm_is_never_fenced_and_disarming_works() {
    if !kvm_available("an_unarmed_vm_is_never_fenced_and_disarming_works") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB", "--name", "unfenced"]);
    vm.wait_status(TIMEOUT, |status| status.heartbeat_total >= 2);
    assert!(vm.status().fence_deadline_boottime_ns.is_none());
    assert!(set_fence(&mut vm, boottime_ns() + 200_000_000).ok);
    assert!(set_fence(&mut vm, 0).ok, "0 disarms");
    std::thread::sleep(Duration::from_millis(400));
    let status = vm.status();
    assert_eq!(status.state, "running", "{status:#?}");
    assert!(status.fence_deadline_boottime_ns.is_none());
    vm.request(&Request::PowerOff { force: true });
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}
