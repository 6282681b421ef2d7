//! A VM's SLA class on the node and what it uses: the class's cgroup settings
//! ([`crate::cgroups`]), and usage read from `/proc` and `/sys/kernel/mm/ksm`.

use std::path::Path;

use proto::v1;

use crate::cgroups::{Settings, SlaClass};

/// The class a definition names; an unknown name (refused at CreateVm) counts as
/// on-demand.
pub fn class_of(definition: &v1::CreateVm) -> SlaClass {
    SlaClass::parse(&definition.sla).unwrap_or(SlaClass::OnDemand)
}

/// The cgroup values the definition's class asks.
pub fn settings_of(definition: &v1::CreateVm) -> Settings {
    Settings::of(
        class_of(definition),
        definition.vcpus,
        definition.memory_bytes,
    )
}

/// Whether two definitions differ only in their SLA class or priority (applied in
/// place: the VM's cgroup is rewritten, the VM keeps running).
pub fn only_sla_differs(a: &v1::CreateVm, b: &v1::CreateVm) -> bool {
    let strip = |definition: &v1::CreateVm| v1::CreateVm {
        sla: String::new(),
        priority: 0,
        ..definition.clone()
    };
    strip(a) == strip(b)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// The page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

/// CPU time (utime + stime, every thread) of process `pid` in nanoseconds.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 1_000_000_000 / clock_ticks_per_second())
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
}

fn read_u64(path: impl AsRef<Path>) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// What the VMM process `pid` uses: CPU time, resident memory, KSM-merged pages.
/// Disk and network I/O are added from its VMM's counters by [`add_io`].
pub fn process_usage(pid: u32) -> v1::VmUsage {
    let merging = read_u64(format!("/proc/{pid}/ksm_merging_pages")).unwrap_or(0);
    v1::VmUsage {
        cpu_ns: cpu_ns(pid).unwrap_or(0),
        resident_bytes: status_kib(pid, "VmRSS:").unwrap_or(0),
        ksm_merging_pages: merging,
        ksm_shared_bytes: merging * page_size(),
        ..Default::default()
    }
}

/// Adds the VMM's disk and NIC counters of a VM status to its usage.
pub fn add_io(status: &mut v1::VmStatus) {
    let Some(usage) = status.usage.as_mut() else {
        return;
    };
    usage.disk_bytes_read = status.disks.iter().map(|disk| disk.bytes_read).sum();
    usage.disk_bytes_written = status.disks.iter().map(|disk| disk.bytes_written).sum();
    usage.net_rx_frames = status.nics.iter().map(|nic| nic.rx_frames).sum();
    usage.net_tx_frames = status.nics.iter().map(|nic| nic.tx_frames).sum();
}

/// Memory available now (MemAvailable), bytes.
pub fn memory_available() -> u64 {
    crate::inventory::memory().available_bytes
}

/// PSI `some avg10` of memory, percent; `None` without PSI.
pub fn memory_pressure() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    let some = text.lines().find(|line| line.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|field| field.strip_prefix("avg10="))
        .and_then(|value| value.parse().ok())
}

/// The node's usage: capacity, the sums over its VMs' statuses, KSM totals.
pub fn node_usage(
    vms: &[v1::VmStatus],
    cgroup_version: &str,
    cgroup_detail: &str,
    preempt_below: u64,
) -> v1::NodeUsage {
    let ksm = |name: &str| read_u64(format!("/sys/kernel/mm/ksm/{name}")).unwrap_or(0);
    let memory = crate::inventory::memory();
    let running: Vec<&v1::VmStatus> = vms
        .iter()
        .filter(|vm| vm.state == v1::VmState::Running as i32)
        .collect();
    let usage = |f: fn(&v1::VmUsage) -> u64| -> u64 {
        running
            .iter()
            .filter_map(|vm| vm.usage.as_ref())
            .map(f)
            .sum()
    };
    v1::NodeUsage {
        cgroup_version: cgroup_version.into(),
        cgroup_detail: cgroup_detail.into(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes: memory.total_bytes,
        memory_available_bytes: memory.available_bytes,
        vm_vcpus: running.iter().map(|vm| vm.vcpus).sum(),
        vm_memory_bytes: running.iter().map(|vm| vm.memory_bytes).sum(),
        vm_cpu_ns: usage(|u| u.cpu_ns),
        vm_resident_bytes: usage(|u| u.resident_bytes),
        ksm_run: ksm("run") as u32,
        ksm_pages_shared: ksm("pages_shared"),
        ksm_pages_sharing: ksm("pages_sharing"),
        page_size: page_size(),
        vm_ksm_merging_pages: usage(|u| u.ksm_merging_pages),
        memory_pressure_some_avg10: memory_pressure().unwrap_or(-1.0),
        preempt_below_available_bytes: preempt_below,
    }
}

/// Runtime preemption: while memory available (MemAvailable) is below `below` bytes,
/// stops the node's spot VMs one at a time, lowest priority first, each with an event
/// that says why, leaving `settle` for the memory to come back between two. Runs
/// until the process ends.
pub async fn preemption_loop(node: std::sync::Arc<crate::node::Node>, below: u64) {
    const POLL: std::time::Duration = std::time::Duration::from_millis(100);
    const SETTLE: std::time::Duration = std::time::Duration::from_millis(500);
    loop {
        tokio::time::sleep(POLL).await;
        let available = memory_available();
        if available == 0 || available >= below {
            continue;
        }
        let pressure = memory_pressure().map_or(String::new(), |avg10| {
            format!(", PSI memory some avg10 {avg10:.2}%")
        });
        let why = format!(
            "node {} runs short of memory: {} MiB available, below the {} MiB preemption threshold{pressure}; spot VMs are stopped first, lowest priority first",
            node.config.name,
            available >> 20,
            below >> 20
        );
        if let Some(vm) = node.vms.preempt_one(&why).await {
            println!("cairn-node {}: vm `{vm}` {why}", node.config.name);
            tokio::time::sleep(SETTLE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_resident_memory() {
        let mut spin = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            spin = spin.wrapping_add(1);
        }
        assert!(spin > 0);
        let usage = process_usage(std::process::id());
        assert!(usage.cpu_ns >= 10_000_000, "{usage:?}");
        assert!(usage.resident_bytes > 1 << 20, "{usage:?}");
    }

    #[test]
    fn a_changed_class_alone_is_applied_in_place() {
        let a = v1::CreateVm {
            name: "a".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            sla: "spot".into(),
            ..Default::default()
        };
        let b = v1::CreateVm {
            sla: "reserved".into(),
            priority: 1000,
            ..a.clone()
        };
        assert!(only_sla_differs(&a, &b));
        assert!(!only_sla_differs(&a, &v1::CreateVm { vcpus: 2, ..b }));
        assert_eq!(class_of(&a), SlaClass::Spot);
    }
}
