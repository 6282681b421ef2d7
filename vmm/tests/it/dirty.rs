//! The dirty-page request is observable in KVM's dirty log.

use std::time::Duration;

use vmm::control::{DirtyLogAction, Request};

use crate::support::{VmProcess, kvm_available};

fn fetch(vm: &mut VmProcess) -> u64 {
    vm.request(&Request::DirtyLog {
        action: DirtyLogAction::Fetch,
    })
    .dirty_pages
    .expect("dirty page count")
}

#[test]
fn requested_dirty_rate_shows_in_the_dirty_log() {
    if !kvm_available("requested_dirty_rate_shows_in_the_dirty_log") {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "64MiB"]);
    vm.wait_status(Duration::from_secs(10), |status| status.boot_stage == 2);
    vm.request(&Request::DirtyLog {
        action: DirtyLogAction::Start,
    });
    fetch(&mut vm);
    std::thread::sleep(Duration::from_millis(300));
    let idle = fetch(&mut vm);

    vm.request(&Request::SetDirtyRate {
        pages_per_second: 4000,
    });
    std::thread::sleep(Duration::from_millis(500));
    let busy = fetch(&mut vm);
    let status = vm.status();
    assert_eq!(status.dirty_rate_pages_per_second, 4000);
    assert!(
        status.pages_dirtied >= 1000,
        "the guest reports its work: {}",
        status.pages_dirtied
    );
    assert!(
        busy >= 1000,
        "about 2000 pages in 0.5 s at 4000/s, got {busy} (idle {idle})"
    );
    assert!(
        busy > 10 * idle.max(1),
        "dirtying dominates the idle guest's writes: busy {busy}, idle {idle}"
    );

    vm.request(&Request::DirtyLog {
        action: DirtyLogAction::Stop,
    });
    let refused = vm
        .client()
        .call(&Request::DirtyLog {
            action: DirtyLogAction::Fetch,
        })
        .expect("answer");
    assert!(!refused.ok, "fetching without logging is refused");
}
