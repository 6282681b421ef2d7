//! The nodes' usage on the controller's `/metrics` (issue 20): every running VM's
//! CPU time, resident and KSM-shared memory, disk and network I/O, labelled with its
//! node, VM, tenant and SLA class, and each node's totals against its capacity (the
//! spec's `capacity`/`allocatable` beside what the node reports: online CPUs,
//! MemTotal, MemAvailable). From each node's last Observe answer
//! ([`reconciler::usage::UsageBoard`], kept out of the observation and its digest).
//! Written as Prometheus text 0.0.4 after the registry's families.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use reconciler::usage::UsageReports;

/// A label value, escaped for the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One family: its samples as (labels, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }
}

/// The usage families for the spec's nodes (`capacity`: node → (capacity CPUs,
/// capacity memory, allocatable CPUs, allocatable memory)) from their last reports;
/// a node of the spec that never answered gets its capacity only. `now_ms`: for
/// each report's age.
pub fn render(
    capacity: &BTreeMap<String, (u64, u64, u64, u64)>,
    reports: &UsageReports,
    now_ms: u64,
) -> String {
    let vm_families = [
        (
            "cairn_controller_vm_cpu_seconds_total",
            "counter",
            "CPU time of the VM's VMM process (every vCPU and device thread), as its node reported it.",
        ),
        (
            "cairn_controller_vm_cpu_usage_cores",
            "gauge",
            "CPUs the VM used between its node's last two answers.",
        ),
        (
            "cairn_controller_vm_resident_bytes",
            "gauge",
            "Resident memory of the VM's VMM process (VmRSS).",
        ),
        (
            "cairn_controller_vm_shared_bytes",
            "gauge",
            "The VM's memory KSM merged with other pages (ksm_merging_pages times the page size).",
        ),
        (
            "cairn_controller_vm_disk_read_bytes_total",
            "counter",
            "Bytes the guest read from its disks.",
        ),
        (
            "cairn_controller_vm_disk_written_bytes_total",
            "counter",
            "Bytes the guest wrote to its disks.",
        ),
        (
            "cairn_controller_vm_network_receive_frames_total",
            "counter",
            "Frames the guest received over its NICs.",
        ),
        (
            "cairn_controller_vm_network_transmit_frames_total",
            "counter",
            "Frames the guest sent over its NICs.",
        ),
        (
            "cairn_controller_vm_vcpus",
            "gauge",
            "The VM's defined vCPUs.",
        ),
        (
            "cairn_controller_vm_memory_bytes",
            "gauge",
            "The VM's defined memory.",
        ),
        (
            "cairn_controller_vm_zswap_bytes",
            "gauge",
            "zswap's compressed bytes of the VM's pages (cgroup v2 memory.stat zswap; 0 on v1).",
        ),
        (
            "cairn_controller_vm_zswapped_bytes",
            "gauge",
            "The VM's pages zswap holds, uncompressed (cgroup v2 memory.stat zswapped; 0 on v1).",
        ),
    ];
    let mut vms: Vec<Family> = vm_families
        .iter()
        .map(|(name, kind, help)| Family::new(name, kind, help))
        .collect();
    let node_families = [
        (
            "cairn_controller_node_capacity_cpus",
            "The node's CPUs as the spec declares them (capacity).",
        ),
        (
            "cairn_controller_node_allocatable_cpus",
            "The node's CPUs VMs may be placed on (the spec's allocatable).",
        ),
        (
            "cairn_controller_node_capacity_memory_bytes",
            "The node's memory as the spec declares it (capacity).",
        ),
        (
            "cairn_controller_node_allocatable_memory_bytes",
            "The node's memory VMs may be placed in (the spec's allocatable).",
        ),
        (
            "cairn_controller_node_online_cpus",
            "CPUs the node reports online.",
        ),
        (
            "cairn_controller_node_memory_total_bytes",
            "Memory the node reports (MemTotal).",
        ),
        (
            "cairn_controller_node_memory_available_bytes",
            "Memory available on the node (MemAvailable).",
        ),
        (
            "cairn_controller_node_vm_vcpus",
            "vCPUs of the node's running VMs.",
        ),
        (
            "cairn_controller_node_vm_memory_bytes",
            "Defined memory of the node's running VMs.",
        ),
        (
            "cairn_controller_node_vm_cpu_usage_cores",
            "CPUs the node's running VMs used between its last two answers.",
        ),
        (
            "cairn_controller_node_vm_cpu_usage_ratio",
            "CPUs the node's running VMs used, over its allocatable CPUs.",
        ),
        (
            "cairn_controller_node_vm_resident_bytes",
            "Resident memory of the node's running VMs.",
        ),
        (
            "cairn_controller_node_vm_resident_ratio",
            "Resident memory of the node's running VMs, over its allocatable memory.",
        ),
        (
            "cairn_controller_node_ksm_saved_bytes",
            "Memory KSM saves on the node (pages_sharing times the page size).",
        ),
        (
            "cairn_controller_node_cpu_pressure_some_avg10",
            "PSI cpu some avg10 on the node, percent (-1: no PSI).",
        ),
        (
            "cairn_controller_node_memory_pressure_some_avg10",
            "PSI memory some avg10 on the node, percent (-1: no PSI).",
        ),
        (
            "cairn_controller_node_usage_age_seconds",
            "Age of the node's last usage report.",
        ),
        (
            "cairn_controller_node_zswap_enabled",
            "1 when zswap is on on the node (the host's setting).",
        ),
        (
            "cairn_controller_node_zswap_pool_bytes",
            "zswap's compressed pool on the node (/proc/meminfo Zswap).",
        ),
        (
            "cairn_controller_node_zswapped_bytes",
            "Pages zswap holds on the node, uncompressed (/proc/meminfo Zswapped).",
        ),
        (
            "cairn_controller_node_zswap_saved_bytes",
            "Memory zswap saves on the node (Zswapped - Zswap).",
        ),
        (
            "cairn_controller_node_swap_total_bytes",
            "Swap on the node (SwapTotal), which zswap needs behind it.",
        ),
        (
            "cairn_controller_node_swap_free_bytes",
            "Swap free on the node (SwapFree).",
        ),
    ];
    let mut nodes: Vec<Family> = node_families
        .iter()
        .map(|(name, help)| Family::new(name, "gauge", help))
        .collect();
    let mut vm_cpu_seconds = Family::new(
        "cairn_controller_node_vm_cpu_seconds_total",
        "counter",
        "CPU time of the node's running VMs (their VMM processes).",
    );
    for (node, &(cap_cpu, cap_mem, alloc_cpu, alloc_mem)) in capacity {
        let label = format!("node=\"{}\"", escape(node));
        let mut put = |i: usize, value: f64| nodes[i].samples.push((label.clone(), value));
        put(0, cap_cpu as f64);
        put(1, alloc_cpu as f64);
        put(2, cap_mem as f64);
        put(3, alloc_mem as f64);
        let Some(report) = reports.get(node) else {
            continue;
        };
        let usage = &report.node;
        let (cores, _) = report.vm_cpu_cores();
        put(4, f64::from(usage.cpus));
        put(5, usage.memory_bytes as f64);
        put(6, usage.memory_available_bytes as f64);
        put(7, f64::from(usage.vm_vcpus));
        put(8, usage.vm_memory_bytes as f64);
        put(9, cores);
        put(10, cores / alloc_cpu.max(1) as f64);
        put(11, usage.vm_resident_bytes as f64);
        put(12, usage.vm_resident_bytes as f64 / alloc_mem.max(1) as f64);
        put(13, (usage.ksm_pages_sharing * usage.page_size) as f64);
        put(14, usage.cpu_pressure_some_avg10);
        put(15, usage.memory_pressure_some_avg10);
        put(16, now_ms.saturating_sub(report.at_unix_ms) as f64 / 1000.0);
        put(17, f64::from(u8::from(usage.zswap_enabled)));
        put(18, usage.zswap_pool_bytes as f64);
        put(19, usage.zswapped_bytes as f64);
        put(
            20,
            usage.zswapped_bytes.saturating_sub(usage.zswap_pool_bytes) as f64,
        );
        put(21, usage.swap_total_bytes as f64);
        put(22, usage.swap_free_bytes as f64);
        vm_cpu_seconds
            .samples
            .push((label.clone(), usage.vm_cpu_ns as f64 / 1e9));
        for row in report.vms.values().filter(|row| row.running) {
            let labels = format!(
                "node=\"{}\",vm=\"{}\",tenant=\"{}\",sla=\"{}\"",
                escape(node),
                escape(&row.vm),
                escape(&row.tenant),
                escape(&row.sla)
            );
            let u = &row.usage;
            let values = [
                Some(u.cpu_ns as f64 / 1e9),
                row.cpu_cores,
                Some(u.resident_bytes as f64),
                Some(u.ksm_shared_bytes as f64),
                Some(u.disk_bytes_read as f64),
                Some(u.disk_bytes_written as f64),
                Some(u.net_rx_frames as f64),
                Some(u.net_tx_frames as f64),
                Some(f64::from(row.vcpus)),
                Some(row.memory_bytes as f64),
                Some(u.zswap_bytes as f64),
                Some(u.zswapped_bytes as f64),
            ];
            for (family, value) in vms.iter_mut().zip(values) {
                if let Some(value) = value {
                    family.samples.push((labels.clone(), value));
                }
            }
        }
    }
    nodes.push(vm_cpu_seconds);
    let mut out = String::new();
    for family in vms.iter().chain(nodes.iter()) {
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
        for (labels, value) in &family.samples {
            let _ = writeln!(out, "{}{{{labels}}} {value}", family.name);
        }
    }
    out
}

/// The usage families for the applied model's nodes, from the nodes' last reports.
pub fn of_model(model: &compiler::Model, reports: &UsageReports) -> String {
    let capacity = model
        .sites
        .iter()
        .flat_map(|site| &site.nodes)
        .map(|node| {
            (
                node.name.clone(),
                (
                    node.capacity.cpu,
                    node.capacity.memory_bytes,
                    node.allocatable.cpu,
                    node.allocatable.memory_bytes,
                ),
            )
        })
        .collect();
    render(&capacity, reports, reconciler::state::now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1;

    fn answer(cpu_s: u64) -> v1::ObserveResponse {
        let vm = |name: &str, tenant: &str, sla: &str, state: v1::VmState| v1::VmStatus {
            name: name.into(),
            tenant: tenant.into(),
            sla: sla.into(),
            state: state as i32,
            vcpus: 2,
            memory_bytes: 1 << 30,
            usage: (state == v1::VmState::Running).then_some(v1::VmUsage {
                cpu_ns: cpu_s * 1_000_000_000,
                resident_bytes: 200 << 20,
                ksm_merging_pages: 10,
                ksm_shared_bytes: 40960,
                disk_bytes_read: 4096,
                disk_bytes_written: 8192,
                net_rx_frames: 5,
                net_tx_frames: 6,
                zswap_bytes: 1024,
                zswapped_bytes: 8192,
            }),
            ..Default::default()
        };
        v1::ObserveResponse {
            vms: vec![
                vm("db", "dev", "reserved", v1::VmState::Running),
                vm("batch\"1", "ops", "", v1::VmState::Running),
                vm("off", "dev", "spot", v1::VmState::Stopped),
            ],
            usage: Some(v1::NodeUsage {
                cpus: 8,
                memory_bytes: 32 << 30,
                memory_available_bytes: 20 << 30,
                vm_vcpus: 4,
                vm_memory_bytes: 2 << 30,
                vm_cpu_ns: 2 * cpu_s * 1_000_000_000,
                vm_resident_bytes: 400 << 20,
                ksm_pages_sharing: 10,
                page_size: 4096,
                cpu_pressure_some_avg10: 1.5,
                memory_pressure_some_avg10: -1.0,
                zswap_enabled: true,
                zswap_pool_bytes: 6 << 20,
                zswapped_bytes: 138 << 20,
                swap_total_bytes: 512 << 20,
                swap_free_bytes: 300 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn every_running_vm_and_every_node_against_its_capacity() {
        let board = reconciler::usage::UsageBoard::default();
        board.record_at("lab-1", &answer(10), 1_000);
        board.record_at("lab-1", &answer(12), 3_000);
        let capacity: BTreeMap<String, (u64, u64, u64, u64)> = [
            ("lab-1".to_owned(), (8, 32 << 30, 6, 28 << 30)),
            ("lab-2".to_owned(), (4, 16 << 30, 4, 16 << 30)),
        ]
        .into_iter()
        .collect();
        let text = render(&capacity, &board.snapshot(), 5_000);
        for line in [
            "cairn_controller_vm_cpu_seconds_total{node=\"lab-1\",vm=\"db\",tenant=\"dev\",sla=\"reserved\"} 12",
            // 2 s of CPU over 2 s.
            "cairn_controller_vm_cpu_usage_cores{node=\"lab-1\",vm=\"db\",tenant=\"dev\",sla=\"reserved\"} 1",
            "cairn_controller_vm_resident_bytes{node=\"lab-1\",vm=\"batch\\\"1\",tenant=\"ops\",sla=\"on-demand\"} 209715200",
            "cairn_controller_vm_shared_bytes{node=\"lab-1\",vm=\"db\",tenant=\"dev\",sla=\"reserved\"} 40960",
            "cairn_controller_vm_network_transmit_frames_total{node=\"lab-1\",vm=\"db\",tenant=\"dev\",sla=\"reserved\"} 6",
            "cairn_controller_node_vm_cpu_usage_cores{node=\"lab-1\"} 2",
            "cairn_controller_node_vm_cpu_usage_ratio{node=\"lab-1\"} 0.3333333333333333",
            "cairn_controller_node_allocatable_cpus{node=\"lab-2\"} 4",
            "cairn_controller_node_usage_age_seconds{node=\"lab-1\"} 2",
            "cairn_controller_node_vm_cpu_seconds_total{node=\"lab-1\"} 24",
            "cairn_controller_vm_zswapped_bytes{node=\"lab-1\",vm=\"db\",tenant=\"dev\",sla=\"reserved\"} 8192",
            "cairn_controller_vm_zswap_bytes{node=\"lab-1\",vm=\"db\",tenant=\"dev\",sla=\"reserved\"} 1024",
            "cairn_controller_node_zswap_enabled{node=\"lab-1\"} 1",
            "cairn_controller_node_zswap_pool_bytes{node=\"lab-1\"} 6291456",
            "cairn_controller_node_zswapped_bytes{node=\"lab-1\"} 144703488",
            "cairn_controller_node_zswap_saved_bytes{node=\"lab-1\"} 138412032",
            "cairn_controller_node_swap_total_bytes{node=\"lab-1\"} 536870912",
            "cairn_controller_node_swap_free_bytes{node=\"lab-1\"} 314572800",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // A stopped VM shows nothing; a node that never answered only its capacity.
        assert!(!text.contains("vm=\"off\""), "{text}");
        assert!(!text.contains("cairn_controller_node_online_cpus{node=\"lab-2\"}"));
        promtool_accepts(&text);
    }

    /// `promtool check metrics` accepts the text (skipped, saying so, without it).
    fn promtool_accepts(text: &str) {
        use std::io::Write as _;
        let Ok(mut child) = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("promtool is not installed: not checked");
            return;
        };
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let output = child.wait_with_output().expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
