//! The witness's side of fault tolerance on the node (issue 22 item 3): which side of
//! a fault-tolerant pair may run when the two lose each other.
//!
//! `StartFt` and `PrepareFtSecondary` with a `witness` put the VM under guard here; one
//! loop ([`run`], every [`EVERY`]) looks at each guarded VM's VMM (`ft-status`) and
//! claims the VM's key `vm/NAME` at the witness (signed by this node's key, leaving
//! from its `--listen` address), as the VMM's phase asks:
//!
//! | side, VMM phase | granted | refused (another holds it) | witness unreachable |
//! |---|---|---|---|
//! | primary, protecting | holds it (no fence deadline: a witness outage stops no healthy pair) | fenced | nothing |
//! | primary, `secondary-lost` or acknowledgements stalled ([`stale_after`]) | the grant's end becomes the VMM's fence deadline, then `ft-stop` (held output released, runs alone) | fenced | output stays held; the VMM stops at its last grant's end (fenced at once when that has passed) |
//! | secondary, `primary-lost` or checkpoints stalled | PromoteFt | waits while the holder's grant runs out; gives up (`ft-stop`) once the holder proves it lives (two renewals, [`Guard::holder_renewed`]) with the link broken | waits: never promotes without a grant |
//! | running alone (`unprotected`, `promoted`) | renews; the fence deadline moves to the claim's send time + the lease | fenced | the VMM stops at its deadline |
//!
//! A silent partition blocks the VMMs' reads without an error: hence the stalls.
//! At most one side ever holds the grant (the witness), the primary releases output
//! only while a checkpoint's acknowledgement or its own grant says it may, and the
//! secondary runs only with the grant: exactly one side runs on, and with the witness
//! out of reach of both, neither runs alone (the primary holds its output, the
//! secondary waits).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::v1;
use vmm::control::wire::FtStatus;

use crate::node::Node;

/// How often each guarded VM is looked at and its grant renewed.
pub const EVERY: Duration = Duration::from_millis(100);

/// The witness lease asked for when the action names none: a failover through the
/// witness takes about this long (the secondary wins once the dead primary's grant has
/// ended), so it is what keeps FT's failover under the 1 s budget. Five renewals
/// (every [`EVERY`]) fit in it, so a loaded node that misses a few keeps its grant.
pub const DEFAULT_LEASE_MS: u64 = 500;

/// One guarded VM.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// The witness's `HOST:PORT`.
    pub witness: String,
    /// The lease asked for, ms.
    pub lease_ms: u64,
    /// Who holds `vm/NAME` as last answered.
    pub holder: String,
    /// The holder's grant number.
    pub number: u64,
    /// The last thing the guard did or saw, in words (Observe's `VmFt.guard`).
    pub last: String,
    /// Secondary, refused: the latest the holder's grant could end (`CLOCK_BOOTTIME`
    /// ns) as of the first refusal, then as of its last proven renewal.
    refused_end_ns: u64,
    /// Secondary, refused: renewals by the holder proven since the first refusal (one
    /// can be a claim the holder sent before it died; two mean it lives).
    renewals_seen: u8,
    /// Running alone after this guard's `ft-stop` or promotion.
    alone: bool,
    /// The end of this side's last grant (`CLOCK_BOOTTIME` ns; 0: none).
    until_ns: u64,
    /// Whether this guard set the VMM's fence deadline.
    armed: bool,
    /// The pair's progress (primary: last acknowledged; secondary: last complete
    /// checkpoint) and when it last moved.
    progress: Option<(u64, std::time::Instant)>,
    /// Done: nothing more to guard (the VMM ended, fenced, or stopped).
    done: bool,
    /// Which [`Guards::set`] made it (a newer one replaces what an older look saw).
    generation: u64,
}

impl Guard {
    /// A secondary refused with the holder's grant ending between `earliest` and
    /// `latest`: whether the holder has proved it lives, by renewing twice since the
    /// first refusal. A renewal counts only when its earliest end passes the latest the
    /// previous one could end, so a late answer proves nothing; and one renewal can be
    /// a claim the holder sent just before its VMM died. With the link broken (the
    /// primary VMM is gone or ended it), such a secondary gives up; with checkpoints
    /// only stalled, it waits (never promoted meanwhile).
    fn holder_renewed(&mut self, earliest: u64, latest: u64) -> bool {
        if self.refused_end_ns == 0 {
            self.refused_end_ns = latest;
        } else if earliest > self.refused_end_ns {
            self.refused_end_ns = latest;
            self.renewals_seen = self.renewals_seen.saturating_add(1);
        }
        self.renewals_seen >= 2
    }
}

/// The node's guarded VMs.
#[derive(Debug, Default)]
pub struct Guards {
    table: Mutex<BTreeMap<String, Guard>>,
    /// The last generation given out (never reused, even after a removal).
    generations: std::sync::atomic::AtomicU64,
    /// Signalled by every [`Guards::set`]: the loop waits on it while nothing is
    /// guarded (its permit is kept when the loop is busy, so no set is missed).
    changed: tokio::sync::Notify,
}

impl Guards {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Guard>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `vm` under guard with `witness` (a new guard: what an older one saw is
    /// forgotten). An empty witness takes it out of guard. Returns whether the older
    /// guard had left a fence deadline in the VMM.
    pub fn set(&self, vm: &str, witness: &str, lease_ms: u64) -> bool {
        self.changed.notify_one();
        let mut table = self.lock();
        let old = table.get(vm);
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        // A fence deadline an older guard set stays the VMM's until this one moves it.
        let (armed, until_ns) = old.map_or((false, 0), |old| (old.armed, old.until_ns));
        if witness.is_empty() {
            table.remove(vm);
            return armed;
        }
        table.insert(
            vm.to_owned(),
            Guard {
                witness: witness.to_owned(),
                lease_ms: if lease_ms == 0 {
                    DEFAULT_LEASE_MS
                } else {
                    lease_ms
                },
                last: "guarding".into(),
                generation,
                armed,
                until_ns,
                ..Guard::default()
            },
        );
        armed
    }

    /// Fills each guarded VM's `ft` block with the guard's view.
    pub fn fill(&self, vms: &mut [v1::VmStatus]) {
        let table = self.lock();
        for vm in vms {
            if let (Some(guard), Some(ft)) = (table.get(&vm.name), vm.ft.as_mut()) {
                ft.witness = guard.witness.clone();
                ft.witness_holder = guard.holder.clone();
                ft.witness_number = guard.number;
                ft.guard = guard.last.clone();
            }
        }
    }
}

/// What a claim came to.
enum Claim {
    /// Granted, valid until this `CLOCK_BOOTTIME` ns (the claim's send time + lease).
    Granted(u64),
    /// Another holds it. The grant's end in `CLOCK_BOOTTIME` ns lies between the two:
    /// the claim's send time + the validity left, and its answer's arrival + the same
    /// (the witness counted it in between). A late answer moves only the upper bound.
    Refused { earliest: u64, latest: u64 },
    /// No answer.
    Unreachable(String),
}

async fn claim(
    node: &Node,
    vm: &str,
    guard: &mut Guard,
    local_address: Option<std::net::IpAddr>,
) -> Claim {
    let timeout = Duration::from_millis(guard.lease_ms / 3).max(EVERY);
    let client = match crate::quorum::witness_client(node, &guard.witness, timeout, local_address) {
        Ok(client) => client,
        Err(error) => return Claim::Unreachable(error),
    };
    let sent_ns = vmm::fence::boottime_ns();
    match client
        .claim(
            &proto::witness::vm_key(vm),
            &node.config.name,
            guard.lease_ms,
        )
        .await
    {
        Ok(grant) => {
            guard.holder = grant.holder.clone();
            guard.number = grant.number;
            let now = vmm::fence::boottime_ns();
            if grant.granted {
                Claim::Granted(sent_ns + grant.lease_ms.min(guard.lease_ms) * 1_000_000)
            } else {
                Claim::Refused {
                    earliest: sent_ns + grant.valid_ms * 1_000_000,
                    latest: now + grant.valid_ms * 1_000_000,
                }
            }
        }
        Err(status) => Claim::Unreachable(status.message().to_owned()),
    }
}

/// The VMM's fault-tolerance status, `None` when it does not answer or is no side.
async fn status_of(node: &Node, vm: &str) -> Option<FtStatus> {
    let (dir, _, pid) = node.vms.run_state(vm).await?;
    if pid == 0 {
        return None;
    }
    let hypervisor = node.vms.hypervisor();
    let socket = dir.join("control.sock");
    tokio::task::spawn_blocking(move || hypervisor.status(&socket, crate::vms::CONTROL_TIMEOUT))
        .await
        .ok()
        .flatten()
        .and_then(|status| status.ft)
}

/// Ends the VMM of `vm`: the witness gave the other side the VM.
async fn fence(node: &Node, vm: &str, why: &str) {
    eprintln!("cairn-node: ft: fencing vm {vm}: {why}");
    node.vms.fence_now(vm, why).await;
}

/// Ends the guard of `vm` (the commander decides from now on) and disarms the fence
/// deadline it had set, if any.
pub async fn release(node: &Node, vm: &str) {
    if node.ft_guards.set(vm, "", 0)
        && let Err(error) = push_deadline(node, vm, 0).await
    {
        eprintln!("cairn-node: ft: vm {vm}: cannot disarm the guard's fence deadline: {error}");
    }
}

/// Pushes the grant's end into the VMM as its fence deadline.
async fn push_deadline(node: &Node, vm: &str, until_ns: u64) -> Result<(), String> {
    let Some((dir, _, pid)) = node.vms.run_state(vm).await else {
        return Ok(());
    };
    if pid == 0 {
        return Ok(());
    }
    let hypervisor = node.vms.hypervisor();
    let socket = dir.join("control.sock");
    tokio::task::spawn_blocking(move || hypervisor.set_fence(&socket, until_ns))
        .await
        .map_err(|error| error.to_string())?
}

/// How long a pair's checkpoints may stop advancing (no acknowledgement on the
/// primary, no new complete checkpoint on the secondary) before the guard takes the
/// link for lost: a silent partition blocks the VMMs' reads without an error.
pub fn stale_after(epoch_ms: u64) -> Duration {
    Duration::from_millis((epoch_ms * 20).max(2000))
}

/// The guard's view of the pair's progress: false when its checkpoints stopped.
fn advancing(guard: &mut Guard, status: &FtStatus) -> bool {
    let progress = if status.role == "primary" {
        status.last_acked
    } else {
        status.epoch
    };
    let now = std::time::Instant::now();
    match guard.progress {
        Some((seen, _)) if seen == progress => {}
        _ => guard.progress = Some((progress, now)),
    }
    guard
        .progress
        .is_none_or(|(_, at)| now.duration_since(at) < stale_after(status.epoch_ms))
}

/// The other side has it: the VMM is ended.
async fn lost(node: &Node, vm: &str, guard: &mut Guard, when: &str) {
    let why = format!(
        "{when}the witness {} gave {} to {} (grant {})",
        guard.witness,
        proto::witness::vm_key(vm),
        guard.holder,
        guard.number
    );
    fence(node, vm, &why).await;
    guard.last = format!("fenced: {why}");
    guard.done = true;
}

/// Arms the VMM's fence at `until` (the end of this side's grant).
async fn arm(node: &Node, vm: &str, guard: &mut Guard, until: u64) -> bool {
    match push_deadline(node, vm, until).await {
        Ok(()) => {
            guard.armed = true;
            true
        }
        Err(error) => {
            guard.last = format!("could not push the grant's end as its fence deadline: {error}");
            false
        }
    }
}

/// One look at one guarded VM; the guard's new state.
async fn tend(
    node: &Node,
    vm: &str,
    mut guard: Guard,
    local_address: Option<std::net::IpAddr>,
) -> Guard {
    let Some(status) = status_of(node, vm).await else {
        let running = node
            .vms
            .run_state(vm)
            .await
            .is_some_and(|(_, _, pid)| pid != 0);
        if !running {
            guard.last = "its VMM does not run here: nothing to guard".into();
            guard.done = true;
        }
        return guard;
    };
    let key = proto::witness::vm_key(vm);
    let alone = guard.alone
        || (status.role == "primary" && status.phase == "unprotected")
        || (status.role == "secondary" && status.phase == "promoted");
    let healthy = advancing(&mut guard, &status);
    let primary = status.role == "primary";
    let protecting = matches!(
        status.phase.as_str(),
        "connecting" | "initial-copy" | "protected"
    );
    if alone {
        match claim(node, vm, &mut guard, local_address).await {
            Claim::Granted(until) => {
                guard.alone = true;
                guard.until_ns = until;
                if arm(node, vm, &mut guard, until).await {
                    guard.last = format!("runs alone, holding {key} (grant {})", guard.number);
                }
            }
            Claim::Refused { .. } => lost(node, vm, &mut guard, "").await,
            Claim::Unreachable(error) => {
                guard.last = format!(
                    "runs alone; the witness {} does not answer ({error}): the VMM stops at the end of its grant",
                    guard.witness
                );
            }
        }
    } else if primary && protecting && (healthy || status.phase != "protected") {
        // Protecting: hold the key, so that a secondary whose link broke cannot be
        // promoted while this side lives. No deadline: a witness outage alone does not
        // stop a healthy pair (the secondary claims only once its link is lost).
        match claim(node, vm, &mut guard, local_address).await {
            Claim::Granted(until) => {
                guard.until_ns = until;
                if guard.armed && push_deadline(node, vm, 0).await.is_ok() {
                    guard.armed = false;
                }
                guard.last = format!("protected, holding {key} (grant {})", guard.number);
            }
            Claim::Refused { .. } => {
                lost(node, vm, &mut guard, "while this primary was protected, ").await
            }
            Claim::Unreachable(error) => {
                guard.last = format!(
                    "protected; the witness {} does not answer ({error})",
                    guard.witness
                )
            }
        }
    } else if primary && (protecting || status.phase == "secondary-lost") {
        // The secondary is lost (its link broke, or checkpoints stopped being
        // acknowledged): run alone only with the grant; meanwhile the output stays held
        // and the VMM stops at the end of the last grant.
        let trouble = if status.phase == "secondary-lost" {
            "secondary lost"
        } else {
            "no checkpoint acknowledged lately"
        };
        match claim(node, vm, &mut guard, local_address).await {
            Claim::Granted(until) if vmm::fence::boottime_ns() + 50_000_000 < until => {
                guard.until_ns = until;
                // Within the grant: the secondary cannot be promoted before it lapses.
                if arm(node, vm, &mut guard, until).await {
                    match node.vms.stop_ft(vm).await {
                        Ok(_) => {
                            guard.alone = true;
                            guard.last = format!(
                                "{trouble}; won {key} (grant {}): runs alone, its held output released",
                                guard.number
                            );
                            eprintln!("cairn-node: ft: vm {vm}: {}", guard.last);
                        }
                        Err(error) => guard.last = format!("ft-stop failed: {}", error.message()),
                    }
                }
            }
            Claim::Granted(_) => guard.last = format!("{trouble}; the grant came too late to use"),
            Claim::Refused { .. } => lost(node, vm, &mut guard, &format!("{trouble}, and ")).await,
            Claim::Unreachable(error) => {
                // No lease, no running on: the VMM stops at the end of its last grant
                // (at once when that has passed); its output stays held until then.
                let until = guard.until_ns;
                if until <= vmm::fence::boottime_ns() {
                    let why = format!(
                        "{trouble}, and the witness {} does not answer ({error}) after its last grant ended",
                        guard.witness
                    );
                    fence(node, vm, &why).await;
                    guard.last = format!("fenced: {why}");
                    guard.done = true;
                } else {
                    if !guard.armed {
                        arm(node, vm, &mut guard, until).await;
                    }
                    guard.last = format!(
                        "{trouble}; the witness {} does not answer ({error}): the output stays held and the VMM stops at the end of its last grant",
                        guard.witness
                    );
                }
            }
        }
    } else if !primary
        && (status.phase == "primary-lost" || (status.phase == "protected" && !healthy))
    {
        let broken = status.phase == "primary-lost";
        match claim(node, vm, &mut guard, local_address).await {
            Claim::Granted(_) => {
                let promoted = node.vms.promote_ft(vm, node.config.vm_start_timeout).await;
                match promoted {
                    Ok(_) => {
                        guard.alone = true;
                        guard.last =
                            format!("primary lost; won {key} (grant {}): promoted", guard.number);
                        eprintln!("cairn-node: ft: vm {vm}: {}", guard.last);
                    }
                    Err(error) => {
                        guard.last =
                            format!("won {key} but the promotion failed: {}", error.message())
                    }
                }
            }
            Claim::Refused { earliest, latest } => {
                let renewed = guard.holder_renewed(earliest, latest);
                let until = latest;
                if renewed && broken {
                    let stopped = node.vms.stop_ft(vm).await;
                    guard.last = format!(
                        "primary lost, and {} renews {key} (grant {}): this secondary gave up{}",
                        guard.holder,
                        guard.number,
                        stopped
                            .err()
                            .map(|e| format!(" (ft-stop: {})", e.message()))
                            .unwrap_or_default()
                    );
                    eprintln!("cairn-node: ft: vm {vm}: {}", guard.last);
                    guard.done = true;
                } else {
                    guard.last = format!(
                        "{}; {} holds {key} (grant {}) for {} ms more: not promoted",
                        if broken {
                            "primary lost"
                        } else {
                            "no checkpoint lately"
                        },
                        guard.holder,
                        guard.number,
                        until.saturating_sub(vmm::fence::boottime_ns()) / 1_000_000
                    );
                }
            }
            Claim::Unreachable(error) => {
                guard.last = format!(
                    "primary lost; the witness {} does not answer ({error}): not promoted",
                    guard.witness
                )
            }
        }
    } else {
        guard.refused_end_ns = 0;
        guard.renewals_seen = 0;
        guard.last = format!("{} {}: nothing to claim", status.role, status.phase);
    }
    guard
}

/// The guard loop: every [`EVERY`], each guarded VM is tended (see the module's table).
/// With nothing to tend it sleeps until a guard is set.
pub async fn run(node: Arc<Node>, local_address: Option<std::net::IpAddr>) {
    loop {
        let tick = tokio::time::Instant::now();
        let guarded: Vec<(String, Guard)> = node
            .ft_guards
            .lock()
            .iter()
            .filter(|(_, guard)| !guard.done)
            .map(|(vm, guard)| (vm.clone(), guard.clone()))
            .collect();
        if guarded.is_empty() {
            // A set after the table was read left a permit: this returns at once.
            node.ft_guards.changed.notified().await;
            continue;
        }
        for (vm, guard) in guarded {
            let generation = guard.generation;
            let tended = tend(&node, &vm, guard, local_address).await;
            let mut table = node.ft_guards.lock();
            // Unless a new guard replaced it meanwhile.
            if table
                .get(&vm)
                .is_some_and(|kept| kept.generation == generation)
            {
                table.insert(vm, tended);
            }
        }
        tokio::time::sleep_until(tick + EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::Guard;

    const MS: u64 = 1_000_000;

    #[test]
    fn late_answers_and_one_last_claim_do_not_prove_the_holder_lives() {
        let mut guard = Guard::default();
        // First refusal at t=1000 ms, answered at once: the grant ends at 1900 ms.
        assert!(!guard.holder_renewed(1900 * MS, 1900 * MS));
        // The same grant, its answer 400 ms late: the upper bound moves, nothing proven.
        assert!(!guard.holder_renewed(1800 * MS, 2200 * MS));
        // One renewal the dead holder had in flight (sent before it died, ends 2300 ms),
        // then only the same grant seen again, late or not.
        assert!(!guard.holder_renewed(2300 * MS, 2350 * MS));
        assert!(!guard.holder_renewed(2250 * MS, 2600 * MS));
        assert!(!guard.holder_renewed(2300 * MS, 2300 * MS));
        assert_eq!(guard.renewals_seen, 1);
    }

    #[test]
    fn a_holder_renewing_every_tick_is_seen_alive_after_two_renewals() {
        let mut guard = Guard::default();
        assert!(!guard.holder_renewed(1000 * MS, 1010 * MS));
        // Renewed 100 ms later; answers take 10 ms.
        assert!(!guard.holder_renewed(1100 * MS, 1110 * MS));
        assert!(guard.holder_renewed(1200 * MS, 1210 * MS));
    }
}
