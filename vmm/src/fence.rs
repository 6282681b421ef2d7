//! The fence deadline: the moment after which this VM must not run or send.
//!
//! HA restarts a failed node's VMs elsewhere once that node's lease has certainly
//! expired. A `cairn-node` that is frozen (SIGSTOP), partitioned or killed cannot stop
//! its VMs then, so the node pushes the lease's expiry into each VMM it runs, and the
//! VMM enforces it by itself:
//! - a vCPU checks [`Fence::lapsed`] before every entry into `KVM_RUN`;
//! - a virtio-net transmit checks it before every tap write (frames are dropped and
//!   counted, never written);
//! - a watcher thread sleeps until the deadline, then kicks every vCPU out of `KVM_RUN`
//!   (a guest that never exits would otherwise keep running) and ends the VM with
//!   [`crate::exit_code::FENCED`].
//!
//! The deadline is an absolute `CLOCK_BOOTTIME` time in nanoseconds, the clock the node
//! counts its lease on: the node and its VMMs share one kernel, so no conversion
//! happens, and time spent suspended counts (a host that slept must not wake up with
//! VMs that think their lease is still good). Renewals only move it; 0 means "not
//! armed" (VMs that are not HA or FT are never fenced: killing them buys no safety).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Nanoseconds of `CLOCK_BOOTTIME` now.
pub fn boottime_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    assert_eq!(rc, 0, "CLOCK_BOOTTIME is available on every Linux KVM host");
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

/// The fence deadline of one VM, shared by its vCPUs, its NICs and the watcher.
#[derive(Debug, Default)]
pub struct Fence {
    /// `CLOCK_BOOTTIME` ns; 0 = not armed.
    deadline_ns: AtomicU64,
    /// Set once the deadline lapsed; it never clears (a lapsed VM only exits).
    lapsed_at_ns: AtomicU64,
    /// Wakes the watcher when the deadline moves.
    moved: Condvar,
    lock: Mutex<()>,
    /// Frames a NIC dropped because the fence had lapsed.
    pub(crate) frames_dropped: AtomicU64,
}

impl Fence {
    /// Sets the deadline (`CLOCK_BOOTTIME` ns; 0 disarms). Refused once it has lapsed:
    /// a renewal that arrives late must not revive a VM that already stopped sending.
    pub fn set(&self, deadline_ns: u64) -> Result<(), String> {
        if self.lapsed_at_ns.load(Ordering::Acquire) != 0 {
            return Err("the fence deadline has already lapsed; this VM is stopping".into());
        }
        let _guard = self.lock.lock().expect("fence lock");
        self.deadline_ns.store(deadline_ns, Ordering::Release);
        self.moved.notify_all();
        Ok(())
    }

    /// The deadline, if armed.
    pub fn deadline_ns(&self) -> Option<u64> {
        match self.deadline_ns.load(Ordering::Acquire) {
            0 => None,
            d => Some(d),
        }
    }

    /// Whether the VM must stop: the deadline is armed and has passed. Latches.
    pub fn lapsed(&self) -> bool {
        if self.lapsed_at_ns.load(Ordering::Acquire) != 0 {
            return true;
        }
        let deadline = self.deadline_ns.load(Ordering::Acquire);
        if deadline == 0 {
            return false;
        }
        let now = boottime_ns();
        if now < deadline {
            return false;
        }
        let _ = self
            .lapsed_at_ns
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        true
    }

    /// When it lapsed (`CLOCK_BOOTTIME` ns), once it has.
    pub fn lapsed_at_ns(&self) -> Option<u64> {
        match self.lapsed_at_ns.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// Frames dropped at the tap because the fence had lapsed.
    pub fn frames_dropped(&self) -> u64 {
        self.frames_dropped.load(Ordering::Relaxed)
    }

    /// Blocks until the deadline lapses (returns true) or `stop` says the VM ended
    /// (false). Wakes when the deadline moves and at least every `poll` to look at `stop`.
    pub fn wait_lapse(&self, stop: impl Fn() -> bool, poll: Duration) -> bool {
        let mut guard = self.lock.lock().expect("fence lock");
        loop {
            if stop() {
                return false;
            }
            if self.lapsed() {
                return true;
            }
            let wait = match self.deadline_ns() {
                None => poll,
                Some(deadline) => {
                    Duration::from_nanos(deadline.saturating_sub(boottime_ns())).min(poll)
                }
            };
            guard = self.moved.wait_timeout(guard, wait).expect("fence lock").0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn an_unarmed_fence_never_lapses_and_an_armed_one_lapses_at_its_deadline() {
        let fence = Fence::default();
        assert!(!fence.lapsed());
        fence.set(boottime_ns() + 50_000_000).unwrap();
        assert!(!fence.lapsed());
        std::thread::sleep(Duration::from_millis(60));
        assert!(fence.lapsed());
        // Latched: a late renewal does not revive it.
        assert!(fence.set(boottime_ns() + 10_000_000_000).is_err());
        assert!(fence.lapsed());
        assert!(fence.lapsed_at_ns().is_some());
    }

    #[test]
    fn a_renewal_moves_the_deadline_and_the_watcher_wakes_at_the_new_one() {
        let fence = Arc::new(Fence::default());
        fence.set(boottime_ns() + 100_000_000).unwrap();
        let watcher = {
            let fence = Arc::clone(&fence);
            std::thread::spawn(move || {
                let started = Instant::now();
                assert!(fence.wait_lapse(|| false, Duration::from_secs(5)));
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        fence.set(boottime_ns() + 200_000_000).unwrap();
        let waited = watcher.join().unwrap();
        assert!(
            waited >= Duration::from_millis(240) && waited < Duration::from_millis(600),
            "lapsed after {waited:?}: at the renewed deadline, not the first one"
        );
    }

    #[test]
    fn the_watcher_returns_when_the_vm_ends() {
        let fence = Fence::default();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let w = s.spawn(|| {
                fence.wait_lapse(|| stop.load(Ordering::Acquire), Duration::from_millis(10))
            });
            stop.store(true, Ordering::Release);
            assert!(!w.join().unwrap());
        });
    }
}
