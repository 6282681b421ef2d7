//! The HA timers of a site (issue 16): detect T (`failure-detect after=`), the
//! lease renewal interval, the margin, and the worst-case restart time they imply.
//!
//! One place computes them for the controller (leases, failure detection), the
//! nodes (through the controller's `Lease.Renew` answer) and `cairn place --fail`
//! (the declared worst case), so the declared figure is the one the cluster runs by.
//!
//! Rules (controller/ARCHITECTURE.md, "Leases"):
//! - detect ≤ T: a node whose last grant is T old is `suspect` (here detect = T);
//! - renewal every T/3 (each call bounded by T/3), so two renewals can be lost
//!   before the lease lapses;
//! - margin = max(T/3, fence check + VM kill + clock drift): the node's lease ends at
//!   its renewal's send time + T (before the controller's grant + T); its VMMs check
//!   the deadline before every `KVM_RUN` re-entry and tap write and their watcher
//!   kicks the vCPUs at it (≤ [`FENCE_CHECK_MS`]), stopping the vCPUs takes
//!   ≤ [`VM_KILL_MS`] (4–36 ms measured), and CLOCK_BOOTTIME drifts ≤ 100 ppm of T.
//!   The T/3 term lets the site's peers report the silence: they renew every T/3;
//! - restart begins at max(detect, T + margin) after the node's last grant.

use serde::{Deserialize, Serialize};

use super::{Model, Site};

/// Detect T when the site does not say (`failure-detect after=`).
pub const DEFAULT_DETECT_MS: u64 = 3_000;
/// The shortest `failure-detect after=`: renewals every T/3 must fit round trips.
pub const MIN_DETECT_MS: u64 = 300;
/// The longest `failure-detect after=`.
pub const MAX_DETECT_MS: u64 = 300_000;
/// The VMM's fence check: before every `KVM_RUN` re-entry and tap write, and its
/// watcher kicks the vCPUs at the deadline.
pub const FENCE_CHECK_MS: u64 = 10;
/// Stopping a VM's vCPUs once its deadline passed (measured 4–36 ms).
pub const VM_KILL_MS: u64 = 50;
/// How often the controller looks at the leases for failed nodes.
pub const FAILURE_POLL_MS: u64 = 100;
/// Estimated time from the restart's start to the VM running elsewhere with its
/// first guest heartbeat: the plan, the start step, the VMM, the guest (measured
/// about 0.5 s for a diskless VM on the dev cluster).
pub const RESTART_ESTIMATE_MS: u64 = 700;
/// Estimated extra per disk: the volume's epoch is raised and a new writer attached.
pub const RESTART_PER_DISK_MS: u64 = 200;

/// A site's HA timers, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HaTimers {
    /// Detect T: the lease length and the silence after which a node is `suspect`.
    pub detect_ms: u64,
    /// How often a node renews its lease (T/3).
    pub renew_every_ms: u64,
    /// What T + margin adds to T before a node may be declared `failed`.
    pub margin_ms: u64,
}

impl HaTimers {
    /// The timers for detect T = `detect_ms`.
    pub fn with_detect(detect_ms: u64) -> HaTimers {
        let drift = detect_ms / 10_000 + 1;
        HaTimers {
            detect_ms,
            renew_every_ms: detect_ms / 3,
            margin_ms: (detect_ms / 3).max(FENCE_CHECK_MS + VM_KILL_MS + drift),
        }
    }

    /// The timers of `site` (`failure-detect after=`, default 3 s).
    pub fn of(site: &Site) -> HaTimers {
        HaTimers::with_detect(site.failure_detect_ms.unwrap_or(DEFAULT_DETECT_MS))
    }

    /// After the node's last grant, when its HA VMs may be restarted elsewhere:
    /// max(detect, T + margin).
    pub fn restart_after_ms(&self) -> u64 {
        self.detect_ms.max(self.detect_ms + self.margin_ms)
    }

    /// The worst-case time from a node's failure to a VM with `disks` disks running
    /// elsewhere with its first heartbeat: the node may fail just after a grant, so
    /// restart begins at most [`HaTimers::restart_after_ms`] after the failure, plus
    /// the controller's poll and the restart itself (estimated).
    pub fn worst_restart_ms(&self, disks: usize) -> u64 {
        self.restart_after_ms()
            + FAILURE_POLL_MS
            + RESTART_ESTIMATE_MS
            + RESTART_PER_DISK_MS * disks as u64
    }

    /// `detect 3s + margin 1s + poll 100ms + restart 700ms`.
    pub fn explain(&self, disks: usize) -> String {
        let ms = |v: u64| crate::units::format_duration(v);
        let mut restart = ms(RESTART_ESTIMATE_MS);
        if disks > 0 {
            restart = format!(
                "{restart} + {disks} disk{} × {}",
                if disks == 1 { "" } else { "s" },
                ms(RESTART_PER_DISK_MS)
            );
        }
        format!(
            "detect {} + margin {} + poll {} + restart {restart}",
            ms(self.detect_ms),
            ms(self.margin_ms),
            ms(FAILURE_POLL_MS)
        )
    }
}

/// The worst-case restart time of VM `name` after its node fails (its site's
/// timers and its disks), and how it adds up; `None` for an unknown VM.
pub fn vm_worst_restart(model: &Model, name: &str) -> Option<(u64, String)> {
    let vm = model.vm(name)?;
    let timers = model
        .sites
        .iter()
        .find(|s| s.name == vm.site)
        .map_or_else(|| HaTimers::with_detect(DEFAULT_DETECT_MS), HaTimers::of);
    let disks = vm.disks.len();
    Some((timers.worst_restart_ms(disks), timers.explain(disks)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_meet_the_five_second_budget() {
        let t = HaTimers::with_detect(DEFAULT_DETECT_MS);
        assert_eq!(t.renew_every_ms, 1_000);
        assert_eq!(t.margin_ms, 1_000);
        assert_eq!(t.restart_after_ms(), 4_000);
        assert_eq!(t.worst_restart_ms(0), 4_800);
        assert!(t.worst_restart_ms(0) < 5_000);
        assert_eq!(
            t.explain(2),
            "detect 3s + margin 1s + poll 100ms + restart 700ms + 2 disks × 200ms"
        );
    }

    #[test]
    fn a_short_detect_keeps_a_margin_for_the_fence_check_and_the_kill() {
        let t = HaTimers::with_detect(MIN_DETECT_MS);
        assert_eq!(t.renew_every_ms, 100);
        assert_eq!(t.margin_ms, 100);
        let t = HaTimers::with_detect(150);
        assert!(t.margin_ms >= FENCE_CHECK_MS + VM_KILL_MS);
        let long = HaTimers::with_detect(60_000);
        assert_eq!(long.margin_ms, 20_000);
        assert!(long.renew_every_ms * 3 <= long.detect_ms);
    }
}
