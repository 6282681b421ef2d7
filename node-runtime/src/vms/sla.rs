//! A VM's SLA class on the node and what it uses: the class's cgroup settings
//! ([`crate::cgroups`], dedicated CPUs [`crate::cpusets`]), and usage read from `/proc` and `/sys/kernel/mm/ksm`.

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
    Settings {
        dedicated_cpus: if definition.dedicated_cpus {
            definition.vcpus.max(1)
        } else {
            0
        },
        ..Settings::of(
            class_of(definition),
            definition.vcpus,
            definition.memory_bytes,
        )
    }
}

/// Whether two definitions differ only in their SLA class, priority or dedicated CPUs
/// (applied in place: the VM's cgroup is rewritten, the VM keeps running).
pub fn only_sla_differs(a: &v1::CreateVm, b: &v1::CreateVm) -> bool {
    let strip = |definition: &v1::CreateVm| v1::CreateVm {
        sla: String::new(),
        priority: 0,
        dedicated_cpus: false,
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

/// A `KEY:  N kB` field of `/proc/PID/status` in bytes (the format of /proc/meminfo).
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    crate::inventory::meminfo_bytes(&status, key.trim_end_matches(':'))
}

fn read_u64(path: impl AsRef<Path>) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// What the VMM process `pid` uses: CPU time, resident memory, KSM-merged pages.
/// Disk and network I/O are added from its VMM's counters by [`add_io`].
pub fn process_usage(pid: u32) -> v1::VmUsage {
    // No Linux process has a pid above 2^22 (`pid_max`'s limit): a simulated VMM's
    // (`cairn-node --simulate`) has nothing to read, and three failed opens per VM
    // were a tenth of a simulator's Observe at 10,000 nodes.
    if pid > PID_MAX_LIMIT {
        return v1::VmUsage::default();
    }
    let merging = read_u64(format!("/proc/{pid}/ksm_merging_pages")).unwrap_or(0);
    v1::VmUsage {
        cpu_ns: cpu_ns(pid).unwrap_or(0),
        resident_bytes: status_kib(pid, "VmRSS:").unwrap_or(0),
        ksm_merging_pages: merging,
        ksm_shared_bytes: merging * page_size(),
        ..Default::default()
    }
}

/// The kernel's upper bound on `/proc/sys/kernel/pid_max` (`PID_MAX_LIMIT`, 2^22).
const PID_MAX_LIMIT: u32 = 1 << 22;

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

/// zswap on this host: whether it is on, its compressor, what it holds
/// (`/proc/meminfo` `Zswap`, `Zswapped`) and the swap behind it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zswap {
    /// `/sys/module/zswap/parameters/enabled` is Y.
    pub enabled: bool,
    /// Its compressor ("lzo", "zstd").
    pub compressor: String,
    /// The compressed pool (`Zswap`), bytes.
    pub pool_bytes: u64,
    /// The pages in the pool, uncompressed (`Zswapped`), bytes.
    pub stored_bytes: u64,
    /// SwapTotal, bytes: the swap behind zswap.
    pub swap_total_bytes: u64,
    /// SwapFree, bytes.
    pub swap_free_bytes: u64,
    /// Why it is absent or off; empty when on.
    pub detail: String,
}

impl Zswap {
    /// From the text of `/proc/meminfo` and zswap's `enabled` and `compressor`
    /// parameters (`None`: the kernel has no zswap module).
    pub fn from_texts(meminfo: &str, enabled: Option<&str>, compressor: Option<&str>) -> Zswap {
        let field = |key: &str| crate::inventory::meminfo_bytes(meminfo, key);
        let enabled_now = enabled.is_some_and(|e| matches!(e.trim(), "Y" | "y" | "1"));
        let swap_total_bytes = field("SwapTotal").unwrap_or(0);
        let detail = if enabled.is_none() || field("Zswap").is_none() {
            "this kernel has no zswap".to_string()
        } else if !enabled_now {
            "zswap is off (/sys/module/zswap/parameters/enabled is N; the host's setting)"
                .to_string()
        } else if swap_total_bytes == 0 {
            "zswap is on but the host has no swap, so it holds nothing".to_string()
        } else {
            String::new()
        };
        Zswap {
            enabled: enabled_now,
            compressor: compressor.map(|c| c.trim().to_string()).unwrap_or_default(),
            pool_bytes: field("Zswap").unwrap_or(0),
            stored_bytes: field("Zswapped").unwrap_or(0),
            swap_total_bytes,
            swap_free_bytes: field("SwapFree").unwrap_or(0),
            detail,
        }
    }

    /// This host's.
    pub fn read() -> Zswap {
        let parameter = |name: &str| {
            std::fs::read_to_string(format!("/sys/module/zswap/parameters/{name}")).ok()
        };
        Zswap::from_texts(
            &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
            parameter("enabled").as_deref(),
            parameter("compressor").as_deref(),
        )
    }
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

/// PSI `some` of CPU: (`avg10` percent, `total` microseconds); `None` without PSI.
pub fn cpu_pressure_psi() -> Option<(f64, u64)> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    let some = text.lines().find(|line| line.starts_with("some "))?;
    let field = |name: &str| {
        some.split_whitespace()
            .find_map(|field| field.strip_prefix(name))
            .map(str::to_string)
    };
    Some((
        field("avg10=")?.parse().ok()?,
        field("total=")?.parse().ok()?,
    ))
}

/// Runnable tasks (`procs_running` of /proc/stat, the reader included).
fn procs_running() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("procs_running "))?
        .trim()
        .parse()
        .ok()
}

/// Where CPU pressure is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuPressureSource {
    /// PSI: /proc/pressure/cpu `some total`, the time in which at least one runnable
    /// task waited for a CPU.
    Psi,
    /// Without PSI: /proc/stat `procs_running` sampled against the online CPUs; a
    /// sample with more runnable tasks (besides the reader) than CPUs counts as
    /// waiting.
    RunQueue,
}

impl CpuPressureSource {
    /// PSI where the kernel has it, else the run queue.
    pub fn detect() -> Self {
        if cpu_pressure_psi().is_some() {
            Self::Psi
        } else {
            Self::RunQueue
        }
    }

    /// Its name in Observe and the preemption reason.
    pub fn name(self) -> &'static str {
        match self {
            Self::Psi => "psi",
            Self::RunQueue => "run-queue",
        }
    }
}

/// One sample of CPU pressure: when, and the cumulative stall (PSI `total`, µs) or
/// whether the run queue had a task waiting.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    /// When it was taken.
    pub at: std::time::Instant,
    /// PSI: cumulative `some` stall, µs. Run queue: 1 when a task waited, else 0.
    pub value: u64,
}

/// CPU pressure over a sliding window: the share (percent) of the window in which
/// some runnable task waited for a CPU.
#[derive(Debug)]
pub struct CpuPressureWindow {
    source: CpuPressureSource,
    window: std::time::Duration,
    samples: std::collections::VecDeque<CpuSample>,
}

impl CpuPressureWindow {
    /// An empty window of `window` over `source`.
    pub fn new(source: CpuPressureSource, window: std::time::Duration) -> Self {
        Self {
            source,
            window,
            samples: Default::default(),
        }
    }

    /// Takes a sample now from the kernel; false when it cannot be read.
    pub fn sample(&mut self) -> bool {
        let value = match self.source {
            CpuPressureSource::Psi => cpu_pressure_psi().map(|(_, total)| total),
            CpuPressureSource::RunQueue => procs_running().map(|running| {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
                u64::from(running.saturating_sub(1) > cpus)
            }),
        };
        match value {
            Some(value) => {
                self.push(CpuSample {
                    at: std::time::Instant::now(),
                    value,
                });
                true
            }
            None => false,
        }
    }

    /// Adds a sample, dropping those older than the window (one is kept just older,
    /// as the window's start).
    pub fn push(&mut self, sample: CpuSample) {
        self.samples.push_back(sample);
        while self.samples.len() > 2 && sample.at.duration_since(self.samples[1].at) >= self.window
        {
            self.samples.pop_front();
        }
    }

    /// Forgets every sample (after a preemption: the next decision sees only what
    /// followed it).
    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// The pressure (percent) over the samples held, once they span the whole
    /// window; `None` before.
    pub fn percent(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let span = last.at.duration_since(first.at);
        if span < self.window {
            return None;
        }
        Some(match self.source {
            CpuPressureSource::Psi => {
                let stalled = last.value.saturating_sub(first.value) as f64;
                (stalled / span.as_micros().max(1) as f64 * 100.0).min(100.0)
            }
            CpuPressureSource::RunQueue => {
                let waited = self.samples.iter().skip(1).filter(|s| s.value > 0).count();
                waited as f64 / (self.samples.len() - 1).max(1) as f64 * 100.0
            }
        })
    }

    /// The span the samples cover.
    pub fn span(&self) -> std::time::Duration {
        match (self.samples.front(), self.samples.back()) {
            (Some(first), Some(last)) => last.at.duration_since(first.at),
            _ => std::time::Duration::ZERO,
        }
    }
}

/// How long the host's readings in a node's usage are shared: an Observe within it
/// reuses them instead of reading a dozen /proc and /sys files again.
const HOST_READINGS_FRESH: std::time::Duration = std::time::Duration::from_millis(500);

/// What a node's usage reports of the host itself (memory, zswap, KSM, pressure),
/// the same for every node agent of the host.
#[derive(Debug, Clone)]
struct HostReadings {
    memory: v1::Memory,
    zswap: Zswap,
    ksm_run: u64,
    ksm_pages_shared: u64,
    ksm_pages_sharing: u64,
    memory_pressure: f64,
    cpu_pressure: f64,
    cpu_pressure_source: &'static str,
    cpus: u32,
}

/// The host's readings, read at most once per [`HOST_READINGS_FRESH`] in this
/// process (one reader at a time; the others wait for its result). Each Observe read
/// them afresh: 19% of the CPU of 1,000 simulated nodes observed on one host, where
/// they are one host's, and cheap to share for a real node observed by several
/// callers at once (the drift check, the console, the metrics).
fn host_readings() -> HostReadings {
    static LAST: std::sync::Mutex<Option<(std::time::Instant, HostReadings)>> =
        std::sync::Mutex::new(None);
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((at, readings)) = last.as_ref()
        && at.elapsed() < HOST_READINGS_FRESH
    {
        return readings.clone();
    }
    let ksm = |name: &str| read_u64(format!("/sys/kernel/mm/ksm/{name}")).unwrap_or(0);
    let readings = HostReadings {
        memory: crate::inventory::memory(),
        zswap: Zswap::read(),
        ksm_run: ksm("run"),
        ksm_pages_shared: ksm("pages_shared"),
        ksm_pages_sharing: ksm("pages_sharing"),
        memory_pressure: memory_pressure().unwrap_or(-1.0),
        cpu_pressure: cpu_pressure_psi().map_or(-1.0, |(avg10, _)| avg10),
        cpu_pressure_source: CpuPressureSource::detect().name(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    *last = Some((std::time::Instant::now(), readings.clone()));
    readings
}

/// The node's usage: capacity, the sums over its VMs' statuses, KSM totals.
pub fn node_usage(
    vms: &[v1::VmStatus],
    cgroup_version: &str,
    cgroup_detail: &str,
    preempt_below: u64,
    preempt_above_cpu: u32,
) -> v1::NodeUsage {
    let host = host_readings();
    let memory = host.memory;
    let zswap = host.zswap;
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
        cpus: host.cpus,
        memory_bytes: memory.total_bytes,
        memory_available_bytes: memory.available_bytes,
        vm_vcpus: running.iter().map(|vm| vm.vcpus).sum(),
        vm_memory_bytes: running.iter().map(|vm| vm.memory_bytes).sum(),
        vm_cpu_ns: usage(|u| u.cpu_ns),
        vm_resident_bytes: usage(|u| u.resident_bytes),
        ksm_run: host.ksm_run as u32,
        ksm_pages_shared: host.ksm_pages_shared,
        ksm_pages_sharing: host.ksm_pages_sharing,
        page_size: page_size(),
        vm_ksm_merging_pages: usage(|u| u.ksm_merging_pages),
        memory_pressure_some_avg10: host.memory_pressure,
        preempt_below_available_bytes: preempt_below,
        cpu_pressure_some_avg10: host.cpu_pressure,
        preempt_above_cpu_pressure: preempt_above_cpu,
        cpu_pressure_source: host.cpu_pressure_source.into(),
        // Filled by the caller, which knows the node's cpusets.
        dedicated_cpus: String::new(),
        dedicated_cpus_free: String::new(),
        zswap_enabled: zswap.enabled,
        zswap_compressor: zswap.compressor,
        zswap_pool_bytes: zswap.pool_bytes,
        zswapped_bytes: zswap.stored_bytes,
        swap_total_bytes: zswap.swap_total_bytes,
        swap_free_bytes: zswap.swap_free_bytes,
        zswap_detail: zswap.detail,
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

/// Runtime preemption for CPU: every 100 ms a sample of CPU pressure
/// ([`CpuPressureWindow`], 1 s); while it is above `above` percent, stops the running
/// spot VM of the lowest priority, with an event that says why, then measures a whole
/// new window before the next. Runs until the process ends.
///
/// Whether a spot VM is busy is not asked: its low weight starves it under any
/// pressure, so from the host a burning spot VM and an idle one look the same
/// (measured: a burning spot guest got 20 ms of CPU in 30 s beside a shell loop on
/// its CPU, and an idle spot VMM, woken every tick, waited runnable 0.87-1.0 of the
/// time; the CPU it used, its run delay or its involuntary switches told them apart
/// in no run). A node short of CPU has no free CPU, and spot VMs run only while free
/// resources exist.
pub async fn cpu_preemption_loop(node: std::sync::Arc<crate::node::Node>, above: u32) {
    const POLL: std::time::Duration = std::time::Duration::from_millis(100);
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
    let source = CpuPressureSource::detect();
    let mut window = CpuPressureWindow::new(source, WINDOW);
    loop {
        tokio::time::sleep(POLL).await;
        if !window.sample() {
            continue;
        }
        let Some(percent) = window.percent() else {
            continue;
        };
        if percent <= f64::from(above) {
            continue;
        }
        let why = format!(
            "node {} runs short of CPU: some runnable task waited for a CPU {percent:.0}% of the last {:.1} s ({}), above the {above}% preemption threshold; spot VMs are stopped first, lowest priority first",
            node.config.name,
            window.span().as_secs_f64(),
            match source {
                CpuPressureSource::Psi => "PSI cpu some",
                CpuPressureSource::RunQueue => "run queue",
            },
        );
        if let Some(vm) = node.vms.preempt_one(&why).await {
            println!("cairn-node {}: vm `{vm}` {why}", node.config.name);
            window.clear();
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

    #[test]
    fn cpu_pressure_is_the_stalled_share_of_a_full_window() {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // PSI: 600 ms of stall over 1 s is 60%; nothing before the window is full.
        let mut psi = CpuPressureWindow::new(CpuPressureSource::Psi, Duration::from_secs(1));
        assert_eq!(psi.percent(), None);
        for (ms, total_us) in [(0, 5_000_000), (500, 5_100_000)] {
            psi.push(CpuSample {
                at: at(ms),
                value: total_us,
            });
        }
        assert_eq!(psi.percent(), None, "half a window");
        psi.push(CpuSample {
            at: at(1000),
            value: 5_600_000,
        });
        assert!((psi.percent().unwrap() - 60.0).abs() < 0.01);
        // The window slides: the stall of the first second leaves it.
        for (ms, total_us) in [(1500, 5_650_000), (2000, 5_700_000), (2100, 5_710_000)] {
            psi.push(CpuSample {
                at: at(ms),
                value: total_us,
            });
        }
        assert_eq!(psi.span(), Duration::from_millis(1100));
        assert!((psi.percent().unwrap() - 110_000.0 / 1_100_000.0 * 100.0).abs() < 0.01);
        psi.clear();
        assert_eq!(psi.percent(), None);
        // Run queue: the share of samples with a task waiting.
        let mut queue = CpuPressureWindow::new(CpuPressureSource::RunQueue, Duration::from_secs(1));
        for (i, waiting) in [0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1].into_iter().enumerate() {
            queue.push(CpuSample {
                at: at(i as u64 * 100),
                value: waiting,
            });
        }
        assert!((queue.percent().unwrap() - 80.0).abs() < 0.01);
    }

    #[test]
    fn this_kernel_gives_a_cpu_pressure_reading() {
        let mut window = CpuPressureWindow::new(
            CpuPressureSource::detect(),
            std::time::Duration::from_millis(200),
        );
        assert!(window.sample(), "{:?}", CpuPressureSource::detect());
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert!(window.sample());
        let percent = window.percent().unwrap();
        assert!((0.0..=100.0).contains(&percent), "{percent}");
    }

    #[test]
    fn zswap_is_read_from_meminfo_and_its_parameters_and_says_why_it_is_off() {
        let meminfo = "MemTotal:  8000000 kB\nSwapTotal:   524284 kB\nSwapFree:    400000 kB\nZswap:         6553 kB\nZswapped:    141824 kB\n";
        let on = Zswap::from_texts(meminfo, Some("Y\n"), Some("lzo\n"));
        assert_eq!(
            on,
            Zswap {
                enabled: true,
                compressor: "lzo".into(),
                pool_bytes: 6553 * 1024,
                stored_bytes: 141824 * 1024,
                swap_total_bytes: 524284 * 1024,
                swap_free_bytes: 400000 * 1024,
                detail: String::new(),
            }
        );
        let off = Zswap::from_texts(meminfo, Some("N\n"), Some("lzo\n"));
        assert!(
            !off.enabled && off.detail.contains("enabled is N"),
            "{off:?}"
        );
        let no_swap = Zswap::from_texts(
            "SwapTotal: 0 kB\nZswap: 0 kB\nZswapped: 0 kB\n",
            Some("Y"),
            None,
        );
        assert!(no_swap.detail.contains("no swap"), "{no_swap:?}");
        let absent = Zswap::from_texts("MemTotal: 1 kB\n", None, None);
        assert_eq!(absent.detail, "this kernel has no zswap");
        assert_eq!(
            crate::cgroups::zswap_in_memory_stat("anon 4096\nzswap 1234\nzswapped 8192\nfile 0\n"),
            Some((1234, 8192))
        );
        assert_eq!(crate::cgroups::zswap_in_memory_stat("anon 4096\n"), None);
    }

    #[test]
    fn this_kernels_zswap_reading_is_what_proc_and_sys_say() {
        let zswap = Zswap::read();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        // Read independently: the second word of the line, in KiB.
        let kib = |key: &str| {
            meminfo.lines().find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some(key))
                    .then(|| words.next().unwrap().parse::<u64>().unwrap() * 1024)
            })
        };
        assert_eq!(Some(zswap.swap_total_bytes), kib("SwapTotal:"));
        assert_eq!(Some(zswap.pool_bytes), kib("Zswap:").or(Some(0)));
        match std::fs::read_to_string("/sys/module/zswap/parameters/enabled") {
            Ok(enabled) => {
                assert_eq!(zswap.enabled, enabled.trim() == "Y", "{zswap:?}");
                assert!(!zswap.compressor.is_empty(), "{zswap:?}");
                eprintln!("zswap here: {zswap:?}");
            }
            Err(_) => assert_eq!(zswap.detail, "this kernel has no zswap"),
        }
    }
}
