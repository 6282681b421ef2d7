//! What the nodes' VMs use (issue 20): per VM its CPU time, resident and KSM-shared
//! memory, disk and network I/O; per node its totals against its capacity. Every
//! Observe answer carries them (`VmStatus.usage`, `ObserveResponse.usage`), and
//! [`crate::nodes::GrpcNodes`] keeps the last answer of each node here, in a
//! [`UsageBoard`], beside the observation and never in it: these counters move
//! every second, and [`crate::observe::Observed::digest`] binds plan files and
//! signed actions, which would go stale whenever a counter moved.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proto::v1;

/// One VM's usage as its node reported it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmUsageRow {
    /// The VM.
    pub vm: Arc<str>,
    /// Its tenant.
    pub tenant: Arc<str>,
    /// Its SLA class as the node enforces it (`on-demand` when the node names none).
    pub sla: Arc<str>,
    /// Whether its process runs (a stopped VM reports no usage).
    pub running: bool,
    /// Its defined vCPUs and memory.
    pub vcpus: u32,
    /// Defined memory, bytes.
    pub memory_bytes: u64,
    /// The node's counters and gauges for it.
    pub usage: v1::VmUsage,
    /// CPUs it used between this node's last two answers (CPU time over wall
    /// time); `None` after the first answer, or when its process restarted.
    pub cpu_cores: Option<f64>,
}

/// A node's last usage report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeUsageReport {
    /// When the controller received it (Unix ms).
    pub at_unix_ms: u64,
    /// The node's totals and capacity.
    pub node: v1::NodeUsage,
    /// Its VMs, by name. The names, tenants and classes are shared with the node's
    /// report before when they are the same (see [`NodeUsageReport::of`]).
    pub vms: BTreeMap<Arc<str>, VmUsageRow>,
}

impl NodeUsageReport {
    /// The report in an Observe answer received at `at_unix_ms`; `previous` (the
    /// node's report a rate starts from) gives each VM's CPU rate, and `last` (the
    /// node's newest report) the strings a row shares when they are the same: a
    /// node's VMs rarely change name, tenant or class between two answers, and at
    /// 100,000 VMs a copy of each per answer kept was most of the board's memory.
    pub fn of(
        response: &v1::ObserveResponse,
        at_unix_ms: u64,
        previous: Option<&NodeUsageReport>,
        last: Option<&NodeUsageReport>,
    ) -> Self {
        let vms = response
            .vms
            .iter()
            .map(|vm| {
                let before = last.and_then(|l| l.vms.get(vm.name.as_str()));
                let sla = if vm.sla.is_empty() {
                    "on-demand"
                } else {
                    vm.sla.as_str()
                };
                let name = shared(before.map(|b| &b.vm), &vm.name);
                let tenant = shared(before.map(|b| &b.tenant), &vm.tenant);
                let sla = shared(before.map(|b| &b.sla), sla);
                let usage = vm.usage.unwrap_or_default();
                let running = vm.state == v1::VmState::Running as i32;
                let cpu_cores = previous
                    .and_then(|p| Some((p.at_unix_ms, p.vms.get(vm.name.as_str())?)))
                    .filter(|(_, before)| before.running && running)
                    .and_then(|(then, before)| {
                        let wall_ns = at_unix_ms.checked_sub(then)?.checked_mul(1_000_000)?;
                        let used = usage.cpu_ns.checked_sub(before.usage.cpu_ns)?;
                        (wall_ns > 0).then(|| used as f64 / wall_ns as f64)
                    });
                let row = VmUsageRow {
                    vm: name.clone(),
                    tenant,
                    sla,
                    running,
                    vcpus: vm.vcpus,
                    memory_bytes: vm.memory_bytes,
                    usage,
                    cpu_cores,
                };
                (name, row)
            })
            .collect();
        Self {
            at_unix_ms,
            node: response.usage.clone().unwrap_or_default(),
            vms,
        }
    }

    /// The CPUs its running VMs used between the node's last two answers (the VMs
    /// without a rate yet count nothing), and whether every running VM had one.
    pub fn vm_cpu_cores(&self) -> (f64, bool) {
        let running = self.vms.values().filter(|vm| vm.running);
        let mut complete = true;
        let mut sum = 0.0;
        for vm in running {
            match vm.cpu_cores {
                Some(cores) => sum += cores,
                None => complete = false,
            }
        }
        (sum, complete)
    }
}

/// `before` when it is `text`, else `text` in a new `Arc`.
fn shared(before: Option<&Arc<str>>, text: &str) -> Arc<str> {
    match before {
        Some(b) if **b == *text => b.clone(),
        _ => Arc::from(text),
    }
}

/// Every node's last usage report, by node name (each report shared, not copied).
pub type UsageReports = BTreeMap<String, Arc<NodeUsageReport>>;

/// The last usage report of every node that answered (shared by clones).
#[derive(Debug, Clone, Default)]
pub struct UsageBoard {
    reports: Arc<Mutex<UsageReports>>,
    /// Each node's answers a CPU rate may still start from, oldest first (see
    /// [`UsageBoard::record_at`]); the newest is the node's report in `reports`.
    history: Arc<Mutex<BTreeMap<String, std::collections::VecDeque<Arc<NodeUsageReport>>>>>,
}

/// A CPU rate is taken over at least this long when the node answered that long ago.
/// The controller asks a node for every status and drift check, often a few
/// milliseconds apart; CPU time moves in clock ticks (10 ms), so a rate over two such
/// answers read 0 for a guest burning a whole CPU.
pub const RATE_WINDOW_MS: u64 = 1_000;

/// No rate over less than this (the node's first answers).
pub const MIN_RATE_WINDOW_MS: u64 = 250;

/// No rate over more than this: after a longer silence the node's next answer
/// starts anew.
pub const HISTORY_MS: u64 = 10_000;

impl UsageBoard {
    /// Keeps the usage in `node`'s Observe answer, received now.
    pub fn record(&self, node: &str, response: &v1::ObserveResponse) {
        self.record_at(node, response, crate::state::now_ms());
    }

    /// Keeps the usage in `node`'s Observe answer, received at `at_unix_ms`. A rate
    /// starts from the newest answer at least [`RATE_WINDOW_MS`] old, else from the
    /// oldest at least [`MIN_RATE_WINDOW_MS`] old. Kept for that: the answers
    /// younger than the window and the newest one older (none older than
    /// [`HISTORY_MS`]); an older one can never be the start again (a newer one is
    /// older than the window already), so it is dropped. At 100,000 VMs the ten
    /// seconds of answers kept before were a tenth of the controller's memory.
    pub fn record_at(&self, node: &str, response: &v1::ObserveResponse, at_unix_ms: u64) {
        let mut reports = self.reports.lock().expect("usage lock");
        let mut history = self.history.lock().expect("usage lock");
        let past = history.entry(node.to_owned()).or_default();
        // An answer "from the future" (the clock stepped back) starts nothing, nor
        // one older than HISTORY_MS.
        past.retain(|r| r.at_unix_ms <= at_unix_ms && at_unix_ms - r.at_unix_ms <= HISTORY_MS);
        let age = |r: &NodeUsageReport| at_unix_ms - r.at_unix_ms;
        let base = past
            .iter()
            .rev()
            .find(|r| age(r) >= RATE_WINDOW_MS)
            .or_else(|| past.front().filter(|r| age(r) >= MIN_RATE_WINDOW_MS));
        let report = Arc::new(NodeUsageReport::of(
            response,
            at_unix_ms,
            base.map(|r| &**r),
            reports.get(node).map(|r| &**r),
        ));
        // Every answer before the newest one at least a window old is dropped.
        if let Some(newest_old) = past.iter().rposition(|r| age(r) >= RATE_WINDOW_MS) {
            past.drain(..newest_old);
        }
        past.push_back(report.clone());
        reports.insert(node.to_owned(), report);
    }

    /// Every node's last report.
    pub fn snapshot(&self) -> UsageReports {
        self.reports.lock().expect("usage lock").clone()
    }
}

/// The measured load `cairn place --rebalance` weighs VMs by
/// ([`compiler::place::rebalance_measured`]): every running VM whose CPU rate is known
/// (two answers of its node) with its resident memory. A VM left out counts its
/// declared size there.
pub fn measured_load(reports: &UsageReports) -> compiler::place::MeasuredLoad {
    let vms = reports
        .values()
        .flat_map(|report| report.vms.values())
        .filter(|row| row.running)
        .filter_map(|row| {
            Some((
                row.vm.to_string(),
                compiler::place::VmLoad {
                    cpu_cores: row.cpu_cores?,
                    resident_bytes: row.usage.resident_bytes,
                },
            ))
        })
        .collect();
    compiler::place::MeasuredLoad { vms }
}

#[cfg(test)]
mod measured_tests {
    use super::*;

    /// A node's answer: VM `db` running, `cpu_ns` of CPU used, 3 GiB resident.
    fn db_running(cpu_ns: u64) -> v1::ObserveResponse {
        v1::ObserveResponse {
            vms: vec![v1::VmStatus {
                name: "db".into(),
                state: v1::VmState::Running as i32,
                usage: Some(v1::VmUsage {
                    cpu_ns,
                    resident_bytes: 3 << 30,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_boards_cpu_rates_and_resident_memory_become_the_measured_load() {
        let answer = |cpu_s: u64| db_running(cpu_s * 1_000_000_000);
        let board = UsageBoard::default();
        board.record_at("lab-1", &answer(10), 1_000);
        // One answer: no rate yet, so the VM is left out (its declared size counts).
        assert!(measured_load(&board.snapshot()).vms.is_empty());
        board.record_at("lab-1", &answer(13), 3_000);
        let load = measured_load(&board.snapshot());
        assert_eq!(
            load.vms.get("db"),
            Some(&compiler::place::VmLoad {
                cpu_cores: 1.5,
                resident_bytes: 3 << 30,
            })
        );
        // Answers a few ms apart (a status and a drift check at once) rate from the
        // answer a second or more before: 1.5 s of CPU more over 1.005 s.
        let answer_ms = |cpu_ms: u64| db_running(cpu_ms * 1_000_000);
        board.record_at("lab-1", &answer_ms(14_500), 4_000);
        board.record_at("lab-1", &answer_ms(14_500), 4_005);
        let cores = measured_load(&board.snapshot()).vms["db"].cpu_cores;
        assert!((cores - 1.5 / 1.005).abs() < 1e-9, "{cores}");
        // A node's first answers, less than 250 ms apart: no rate yet.
        board.record_at("lab-2", &answer(1), 10_000);
        board.record_at("lab-2", &answer(2), 10_100);
        assert_eq!(board.snapshot()["lab-2"].vms["db"].cpu_cores, None);
    }

    /// A VM's name, tenant and class are one string shared by the node's answers
    /// while they stay the same, and a new one when they change.
    #[test]
    fn a_vms_strings_are_shared_between_a_nodes_answers() {
        let board = UsageBoard::default();
        let with_tenant = |tenant: &str| {
            let mut answer = db_running(1);
            answer.vms[0].tenant = tenant.into();
            answer
        };
        board.record_at("lab-1", &with_tenant("ledger"), 1_000);
        let first = board.snapshot()["lab-1"].clone();
        board.record_at("lab-1", &with_tenant("ledger"), 2_000);
        let second = board.snapshot()["lab-1"].clone();
        let (a, b) = (&first.vms["db"], &second.vms["db"]);
        assert!(Arc::ptr_eq(&a.vm, &b.vm) && Arc::ptr_eq(&a.tenant, &b.tenant));
        assert!(Arc::ptr_eq(&a.sla, &b.sla) && &*b.sla == "on-demand");
        let key = second.vms.keys().next().unwrap();
        assert!(Arc::ptr_eq(key, &b.vm));
        board.record_at("lab-1", &with_tenant("shop"), 3_000);
        let third = board.snapshot()["lab-1"].clone();
        assert_eq!(&*third.vms["db"].tenant, "shop");
        assert!(Arc::ptr_eq(&third.vms["db"].vm, &b.vm));
    }

    /// The board keeps only the answers a rate may still start from, and rates as
    /// it did keeping every answer of the last ten seconds: checked against that
    /// rule over uneven answer times (a few ms to 12 s apart).
    #[test]
    fn the_answers_kept_give_the_rates_every_answer_of_ten_seconds_gave() {
        let board = UsageBoard::default();
        let mut every: Vec<(u64, u64)> = vec![];
        let (mut at, mut cpu, mut step) = (1_000u64, 0u64, 7u64);
        for i in 0..400 {
            // A deterministic walk of gaps: 1 ms to 12 s.
            step = (step * 7919 + 13) % 10_007;
            let gap = match i % 9 {
                0 => 12_000,
                1..=3 => step % 5 + 1,
                _ => step % 1_500,
            };
            at += gap;
            cpu += gap * 1_000_000 / 2 + step;
            board.record_at("lab-1", &db_running(cpu), at);
            // The old rule: every answer of the last HISTORY_MS before this one.
            every.retain(|(t, _)| at - t <= HISTORY_MS);
            let base = every
                .iter()
                .rev()
                .find(|(t, _)| at - t >= RATE_WINDOW_MS)
                .or_else(|| every.first().filter(|(t, _)| at - t >= MIN_RATE_WINDOW_MS));
            let want = base.map(|(t, c)| (cpu - c) as f64 / ((at - t) * 1_000_000) as f64);
            every.push((at, cpu));
            let got = board.snapshot()["lab-1"].vms["db"].cpu_cores;
            assert_eq!(got, want, "answer {i} at {at}");
            let kept = board.history.lock().unwrap()["lab-1"].len();
            // The ones younger than a second (at most one per ms) and one older.
            assert!(
                kept <= 1 + every
                    .iter()
                    .filter(|(t, _)| at - t < RATE_WINDOW_MS)
                    .count()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{NodeObservation, Observed, from_wire};

    /// An Observe answer: one running VM with a disk, whose usage and I/O counters
    /// are `n` times a base.
    fn answer(n: u64, state: v1::VmState) -> v1::ObserveResponse {
        v1::ObserveResponse {
            node_name: "lab-1".into(),
            observed_at_unix_ms: 1000 * n,
            vms: vec![v1::VmStatus {
                name: "db".into(),
                state: state as i32,
                vcpus: 2,
                memory_bytes: 1 << 30,
                pid: 100 + n as u32,
                tenant: "dev".into(),
                sla: "reserved".into(),
                priority: 1000,
                heartbeats: 7 * n,
                disks: vec![v1::VmDiskStatus {
                    volume: "db-data".into(),
                    attached: true,
                    data: "local".into(),
                    copies: 2,
                    copies_in_sync: 2,
                    reads: 10 * n,
                    writes: 20 * n,
                    bytes_read: 4096 * n,
                    bytes_written: 8192 * n,
                    guest_requests: 30 * n,
                    guest_bytes_read: 4096 * n,
                    guest_bytes_written: 8192 * n,
                    ..Default::default()
                }],
                usage: Some(v1::VmUsage {
                    cpu_ns: 500_000_000 * n,
                    resident_bytes: (100 << 20) + n * 4096,
                    ksm_merging_pages: 3 * n,
                    ksm_shared_bytes: 3 * n * 4096,
                    disk_bytes_read: 4096 * n,
                    disk_bytes_written: 8192 * n,
                    net_rx_frames: 11 * n,
                    net_tx_frames: 13 * n,
                    zswap_bytes: 1024 * n,
                    zswapped_bytes: 8192 * n,
                }),
                ..Default::default()
            }],
            usage: Some(v1::NodeUsage {
                cpus: 2,
                memory_bytes: 8 << 30,
                memory_available_bytes: (6 << 30) - n * 4096,
                vm_vcpus: 2,
                vm_cpu_ns: 500_000_000 * n,
                vm_resident_bytes: (100 << 20) + n * 4096,
                ksm_pages_sharing: 3 * n,
                memory_pressure_some_avg10: n as f64,
                cpu_pressure_some_avg10: 2.0 * n as f64,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn observed(response: v1::ObserveResponse) -> Observed {
        Observed {
            nodes: [("lab-1".to_owned(), from_wire("ab".repeat(32), response))]
                .into_iter()
                .collect(),
        }
    }

    /// A moving counter (CPU time, resident memory, KSM, a disk's and a NIC's I/O,
    /// the node's available memory and pressure) leaves the digest as it was, while
    /// the board sees it move; a change that matters (the VM stopped) moves it.
    #[test]
    fn moving_usage_counters_do_not_change_the_digest() {
        let (one, two) = (
            answer(1, v1::VmState::Running),
            answer(2, v1::VmState::Running),
        );
        let (first, second) = (observed(one.clone()), observed(two.clone()));
        assert_eq!(first.digest(), second.digest());
        // The counters are still in the observation (status shows them) …
        let NodeObservation::Reachable { vms, .. } = &second.nodes["lab-1"] else {
            panic!("reachable");
        };
        assert_eq!(vms["db"].disks[0].bytes_written, 16384);
        let json = serde_json::to_value(&vms["db"].disks[0]).unwrap();
        assert_eq!(json["bytes_written"], 16384);
        assert_eq!(json["guest"]["requests"], 60);
        // … and not in the digest, which still sees the state.
        assert_ne!(
            first.digest(),
            observed(answer(2, v1::VmState::Stopped)).digest()
        );
        // The board sees them move and derives the CPU rate: 0.5 s of CPU over 1 s.
        let board = UsageBoard::default();
        board.record_at("lab-1", &one, 10_000);
        let report = &board.snapshot()["lab-1"];
        assert_eq!(report.vms["db"].cpu_cores, None);
        board.record_at("lab-1", &two, 11_000);
        let report = &board.snapshot()["lab-1"];
        let db = &report.vms["db"];
        assert_eq!(db.usage.cpu_ns, 1_000_000_000);
        assert_eq!(db.usage.net_tx_frames, 26);
        assert_eq!((&*db.tenant, &*db.sla), ("dev", "reserved"));
        assert!((db.cpu_cores.unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(report.node.cpus, 2);
        assert_eq!(report.vm_cpu_cores(), (db.cpu_cores.unwrap(), true));
    }
}
