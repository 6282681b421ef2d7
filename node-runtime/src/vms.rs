//! VMs: one `cairn-vmm` process per running VM, supervised by the agent.
//!
//! A VM is *defined* by `CreateVm` (persisted), *started* by spawning `cairn-vmm` and
//! *stopped* by SIGTERM then SIGKILL after a grace period. A start is answered only once
//! the VM is seen running (the VMM alive and the guest's first heartbeat on its control
//! socket) or has failed (the VMM's exit status and last log lines; the VM `CRASHED`).
//! Every spawned VMM counts in the VM's `starts` (in the node's records, kept across restarts
//! and deletes). A process that exits
//! without being asked to makes the VM `CRASHED` (with its exit status and a crash
//! count); one that exits after a stop request makes it `STOPPED`. The agent never
//! restarts a crashed VM on its own: healing is the reconciler's decision.
//!
//! VMMs outlive the agent ([`adopt`]): each runs in its own process group (unless
//! `--vmm-process-group agent`), a graceful stop of the agent leaves them running
//! (unless `--stop-vms-on-exit`), and the next agent adopts each one that proves to be
//! the process it recorded at spawn (pidfd, start time, command line, and the
//! incarnation id over the control socket).

pub mod adopt;
pub mod ft;
pub mod ft_guard;
pub mod migration;
pub mod sla;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use network::NetNs;
use proto::v1::{self, Health, VmState, VmStatus};
use tokio::sync::Mutex;
use tonic::Status;

use crate::events::EventBus;
use crate::exports::{Exports, VmDisk};
use crate::hypervisor::{Hypervisor, VmmStatus as Heartbeat};
use crate::records::{self, Count, Records};

/// What the node keeps of a VM across restarts, stored as a [`records::VmRecord`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeptVm {
    /// The definition as created.
    pub definition: Option<v1::CreateVm>,
    /// Whether the VM should be running (it was started and not stopped).
    pub desired_running: bool,
    /// Process id of the last cairn-vmm process, for the next agent to adopt it.
    pub last_pid: u32,
    /// Its start time (clock ticks since boot, `/proc/PID/stat` field 22); 0: unknown.
    pub last_start_ticks: u64,
    /// The incarnation id it was given at spawn.
    pub incarnation: String,
}

impl From<records::VmRecord> for KeptVm {
    fn from(record: records::VmRecord) -> Self {
        Self {
            definition: record.definition.map(records::create_vm),
            desired_running: record.desired_running,
            last_pid: record.last_pid,
            last_start_ticks: record.last_start_ticks,
            incarnation: record.incarnation,
        }
    }
}

impl From<&KeptVm> for records::VmRecord {
    fn from(kept: &KeptVm) -> Self {
        records::VmRecord {
            last_start_ticks: kept.last_start_ticks,
            incarnation: kept.incarnation.clone(),
            ..records::vm_record(
                kept.definition.as_ref(),
                kept.desired_running,
                kept.last_pid,
            )
        }
    }
}

#[derive(Debug)]
struct VmRuntime {
    record: KeptVm,
    state: VmState,
    pid: u32,
    last_exit: String,
    crash_count: u32,
    stop_requested: bool,
    /// Bumped on every start so a supervisor task of an older process does not
    /// overwrite the state of a newer one.
    generation: u64,
    /// Why the node ended a VMM itself: not seen running in time, or preempted under
    /// memory pressure (its last exit says so once it is reaped).
    start_failure: Option<String>,
    /// How the VM's disks were attached when its VMM was last spawned (empty while it
    /// does not run).
    disks: Vec<VmDisk>,
    /// While its VMM is a live migration's destination not yet committed: the address
    /// it listens on ([`migration`]).
    incoming: Option<String>,
    /// While its VMM is a fault-tolerant VM's secondary not yet promoted: the address
    /// it receives checkpoints on ([`ft`]).
    ft_secondary: Option<String>,
}

/// Whom a VMM spawned without running its guest waits for ([`Vms::launch_vmm`]).
#[derive(Debug, Clone, Copy)]
enum PeerWait<'a> {
    /// A live migration's source; the VMM listens on this address.
    Migration(&'a str),
    /// A fault-tolerant VM's primary; the VMM receives checkpoints on this address.
    FtPrimary(&'a str),
}

/// What [`Vms::spawn`] did.
#[derive(Debug)]
enum Spawned {
    /// The VM runs already.
    Running(v1::VmResult),
    /// A VMM was spawned and is starting.
    Started(Started),
    /// A VMM spawned by another StartVm is starting.
    AnotherStartRunning,
}

/// A VMM spawned by this StartVm.
#[derive(Debug)]
struct Started {
    pid: u32,
    generation: u64,
    builtin: bool,
}

/// What records a VMM's end: the VM table, events, records and disk servers, and
/// which VM and process generation it watches.
struct Supervisor {
    vms: Arc<Mutex<BTreeMap<String, VmRuntime>>>,
    events: Arc<EventBus>,
    records: Arc<Records>,
    exports: Arc<Exports>,
    name: String,
    generation: u64,
}

impl Supervisor {
    /// The VMM of this generation ended with `exit` (`clean`: exit status 0).
    async fn ended(self, exit: String, clean: bool) {
        let mut vms = self.vms.lock().await;
        let Some(runtime) = vms.get_mut(&self.name) else {
            return;
        };
        if runtime.generation != self.generation {
            return;
        }
        // Under the lock, so a start that follows never has its servers stopped.
        self.exports.detach_vm(&self.name).await;
        runtime.disks.clear();
        let failed_start = runtime.state == VmState::Starting;
        let not_committed = runtime.incoming.take().is_some();
        let not_promoted = runtime.ft_secondary.take().is_some();
        runtime.pid = 0;
        runtime.last_exit = match runtime.start_failure.take() {
            Some(reason) => format!("{reason} ({exit})"),
            None => exit.clone(),
        };
        if not_promoted {
            // A fault-tolerance secondary that was never promoted (stopped, its
            // primary gone before a complete checkpoint, or killed): it never ran here.
            runtime.record.desired_running = false;
            runtime.state = VmState::Stopped;
            runtime.last_exit = format!(
                "fault-tolerance secondary not promoted: {}",
                runtime.last_exit
            );
            Vms::publish(
                &self.events,
                &self.name,
                VmState::Stopped,
                &runtime.last_exit,
            );
        } else if not_committed {
            // A migration's destination that never ran (aborted or failed before the
            // commit): the VM did not run here, nothing crashed.
            runtime.record.desired_running = false;
            runtime.state = VmState::Stopped;
            runtime.last_exit = format!("migration not committed: {}", runtime.last_exit);
            Vms::publish(
                &self.events,
                &self.name,
                VmState::Stopped,
                &runtime.last_exit,
            );
        } else if runtime.stop_requested || (clean && !failed_start) {
            // cairn-vmm exits 0 only for a requested or guest-initiated power-off.
            runtime.record.desired_running = false;
            runtime.state = VmState::Stopped;
            Vms::publish(
                &self.events,
                &self.name,
                VmState::Stopped,
                &runtime.last_exit,
            );
        } else {
            if failed_start {
                // It never ran: nothing to report as interrupted after a restart.
                runtime.record.desired_running = false;
            }
            runtime.state = VmState::Crashed;
            runtime.crash_count += 1;
            Vms::publish(
                &self.events,
                &self.name,
                VmState::Crashed,
                &runtime.last_exit,
            );
        }
        runtime.record.last_pid = 0;
        let _ = self
            .records
            .put(&self.name, &records::VmRecord::from(&runtime.record));
    }
}

/// How often a start looks at its VMM.
const START_POLL: Duration = Duration::from_millis(20);

/// The last lines of a VMM's log (stdout events and stderr errors), for an error.
fn log_tail(path: &Path) -> String {
    const LINES: usize = 12;
    const MAX_BYTES: usize = 4096;
    let Ok(text) = std::fs::read(path) else {
        return format!("; its log {} cannot be read", path.display());
    };
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    if lines.is_empty() {
        return format!("; its log {} is empty", path.display());
    }
    let mut tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
    if tail.len() > MAX_BYTES {
        let mut cut = tail.len() - MAX_BYTES;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = format!("…{}", &tail[cut..]);
    }
    format!("; the last lines of {}:\n{tail}", path.display())
}

/// Every VM of the node.
#[derive(Debug)]
pub struct Vms {
    /// Launches, asks, fences and signals the VMMs (`cairn-vmm` processes, or simulated).
    hypervisor: Arc<dyn Hypervisor>,
    run_dir: PathBuf,
    records: Arc<Records>,
    events: Arc<EventBus>,
    exports: Arc<Exports>,
    vms: Arc<Mutex<BTreeMap<String, VmRuntime>>>,
    /// The end of this node's quorum (`CLOCK_BOOTTIME` ns; 0: no lease is kept), set
    /// by the quorum loop: a VMM starts with it as its fence deadline, so a VM
    /// restarted here by HA is fenced before this node's next lease names it.
    quorum_end_ns: std::sync::atomic::AtomicU64,
    /// Told each time a VMM is adopted: the quorum loop pushes its fence at once
    /// rather than at its next round (`quorum::run`).
    adopted: tokio::sync::Notify,
    /// The node's cgroups, where each VMM runs in a cgroup of its VM's SLA class;
    /// `None`: not enforced (`cgroup_detail` says why).
    cgroups: Option<Arc<crate::cgroups::Cgroups>>,
    /// How SLA classes are enforced, or why not.
    cgroup_detail: String,
}

/// Finds `cairn-vmm`: an explicit path, else next to the running `cairn-node`, else `PATH`.
pub fn find_vmm_binary(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_path_buf());
    }
    if let Ok(current) = std::env::current_exe()
        && let Some(directory) = current.parent()
    {
        for candidate in [directory.join("cairn-vmm"), directory.join("../cairn-vmm")] {
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|directory| directory.join("cairn-vmm"))
            .find(|candidate| candidate.is_file())
    })
}

/// Whether the process `pid` is the `cairn-vmm` this node started for the VM whose
/// config is `config`: its program is a `cairn-vmm` and it runs exactly that config.
/// A pid is reused by the kernel, and on a one-host dev cluster another node's VMM is
/// also a `cairn-vmm`: matching the program name alone could kill someone else's VM.
fn process_is_vmm_of(pid: u32, config: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| cmdline_is_vmm_of(&cmdline, config))
}

fn cmdline_is_vmm_of(cmdline: &[u8], config: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let mut args = cmdline.split(|byte| *byte == 0);
    let program_is_vmm = args.next().is_some_and(|program| {
        Path::new(std::ffi::OsStr::from_bytes(program)).file_name()
            == Some(std::ffi::OsStr::new("cairn-vmm"))
    });
    let args: Vec<&[u8]> = args.collect();
    program_is_vmm
        && args
            .windows(2)
            .any(|pair| pair[0] == b"--config" && pair[1] == config.as_os_str().as_bytes())
}

/// Per read and per write on a VMM control socket while observing.
pub const CONTROL_TIMEOUT: Duration = Duration::from_millis(200);

/// A running VM whose last heartbeat is older than this (or that has had none this
/// long after boot) is reported `HEALTH_DEGRADED`.
pub const HEARTBEAT_STALE_AFTER: Duration = Duration::from_secs(2);

impl Heartbeat {
    /// Fills the fields of a running VM's status that its VMM knows — the vCPUs and
    /// memory it runs (not the definition's), heartbeats, NICs — and degrades its
    /// health when the guest has gone quiet.
    fn apply(self, status: &mut VmStatus) {
        status.vcpus = self.vcpus;
        status.memory_bytes = self.memory_bytes;
        status.ft = self.ft.as_ref().map(ft::wire);
        // The VMM's view of each NIC, by tap; the node's Observe adds its own view
        // (tap, bridge) to the same entries.
        status.nics = self
            .nics
            .iter()
            .map(|nic| proto::v1::VmNicStatus {
                tap: nic.tap.clone(),
                mac: nic.mac.clone(),
                guest_up: nic.driver_ok,
                rx_frames: nic.rx_frames,
                tx_frames: nic.tx_frames,
                ..Default::default()
            })
            .collect();
        // The VMM's virtio-blk devices are the attached disks, in order.
        let attached = status.disks.iter_mut().filter(|disk| disk.attached);
        for (disk, counters) in attached.zip(&self.disks) {
            disk.reads = counters.reads;
            disk.writes = counters.writes;
            disk.bytes_read = counters.bytes_read;
            disk.bytes_written = counters.bytes_written;
            disk.errors = counters.errors;
        }
        crate::guest_io::fill_guest_counters(&mut status.disks, &self.guest_disks);
        if let Some(result) = self.block_test {
            status.guest_block_test = result;
            status.guest_block_tests = self.block_tests;
            status.guest_block_checksum = self.block_checksum;
        }
        let stale_ms = HEARTBEAT_STALE_AFTER.as_millis() as f64;
        status.heartbeats = self.total;
        status.boot_count = self.boot_count;
        status.heartbeat_age_ms = self.age_ms.map_or(0, |age| age.max(0.0).round() as u64);
        status.heartbeat_fresh = self.age_ms.is_some_and(|age| age <= stale_ms);
        let stale = match self.age_ms {
            Some(age) => age > stale_ms,
            None => self.uptime_ms as f64 > stale_ms,
        };
        if stale && status.health == Health::Healthy as i32 {
            status.health = Health::Degraded as i32;
        }
    }
}

/// The counter (in the node's records) of how many times a VM of this name had its
/// process started here.
fn starts_counter(vm: &str) -> String {
    format!("vm-starts/{vm}")
}

/// The file in a VM's run directory that holds the `VmConfig` its `cairn-vmm` runs.
pub const VM_CONFIG_FILE: &str = "vm-config.json";

/// The VM `definition` as `cairn-vmm` runs it: console and control socket in `vm_dir`,
/// NICs on their taps when `network` allows them (else none: Observe says why).
fn vmm_config(
    definition: &v1::CreateVm,
    vm_dir: &Path,
    network: Option<&NetNs>,
    disks: &[VmDisk],
) -> Result<vm_config::VmConfig, Status> {
    let boot = match &definition.image {
        Some(v1::create_vm::Image::Builtin(builtin)) => vm_config::BootSource::Builtin {
            name: builtin.clone(),
        },
        Some(v1::create_vm::Image::Kernel(kernel)) => vm_config::BootSource::Kernel {
            kernel: PathBuf::from(&kernel.kernel_path),
            initrd: (!kernel.initrd_path.is_empty()).then(|| PathBuf::from(&kernel.initrd_path)),
            cmdline: if kernel.cmdline.is_empty() {
                vm_config::DEFAULT_CMDLINE.to_string()
            } else {
                kernel.cmdline.clone()
            },
        },
        None => return Err(crate::validate::invalid("create_vm.image", "must be set")),
    };
    let nics = match network {
        Some(_) => crate::vm_nics::vmm_nics(&definition.name, &definition.nics),
        None => Vec::new(),
    };
    let mut config = vm_config::VmConfig::builtin(
        &definition.name,
        definition.vcpus,
        definition.memory_bytes,
        vm_dir,
    );
    config.boot = boot;
    config.nics = nics;
    config.disks = disks
        .iter()
        .filter_map(|disk| disk.config.clone())
        .collect();
    Ok(config)
}

/// The disks of a VM as its definition lists them: attached (with the guest device
/// index) when its running VMM was given them. [`fill_disk_copies`] adds where the
/// data is and its copies; the VMM's counters are added by [`Heartbeat::apply`].
fn disk_statuses(volumes: &[String], attached: &[VmDisk]) -> Vec<v1::VmDiskStatus> {
    let mut device = 0u32;
    volumes
        .iter()
        .map(|volume| {
            let mut status = v1::VmDiskStatus {
                volume: volume.clone(),
                ..Default::default()
            };
            if let Some(disk) = attached.iter().find(|disk| &disk.volume == volume) {
                status.detail = disk.detail.clone();
                if disk.config.is_some() {
                    status.attached = true;
                    status.device = device;
                    device += 1;
                }
            }
            status
        })
        .collect()
}

/// Adds to each VM disk where its data is (`local`: this node's copy is the writer's,
/// the epoch's or else the primary; `remote`: only a replica, `missing`) and its
/// copies, from the volumes of this node (`node`).
pub fn fill_disk_copies(node: &str, vms: &mut [VmStatus], volumes: &[v1::VolumeStatus]) {
    for disk in vms.iter_mut().flat_map(|vm| vm.disks.iter_mut()) {
        let Some(volume) = volumes.iter().find(|volume| volume.name == disk.volume) else {
            disk.data = "missing".into();
            continue;
        };
        let primary = volume.role == v1::VolumeRole::Primary as i32;
        let writer = if volume.epoch_writer.is_empty() {
            primary
        } else {
            volume.epoch_writer == node
        };
        disk.data = if writer { "local" } else { "remote" }.into();
        if writer {
            disk.copies = if primary {
                1 + volume.replica_peers.len() as u32
            } else {
                // A replica promoted to writer: its layout's primary and the in-sync
                // copies (other replicas outside the set are not named here).
                let mut names: std::collections::BTreeSet<&str> =
                    volume.in_sync.iter().map(String::as_str).collect();
                names.insert(volume.primary.as_str());
                names.insert(node);
                names.len() as u32
            };
            disk.copies_in_sync = if volume.health == Health::Healthy as i32 {
                disk.copies
            } else {
                1
            };
            if disk.detail.is_empty() && !volume.detail.is_empty() {
                disk.detail = volume.detail.clone();
            }
            disk.copies_state = crate::guest_io::copies_state(volume).into();
        } else if disk.detail.is_empty() {
            disk.detail = format!("the primary copy is on node {}", volume.primary);
        }
    }
}

fn state_name(state: VmState) -> String {
    state.as_str_name().to_string()
}

impl Vms {
    /// Loads VM definitions. A VM that should be running is reported `CRASHED`
    /// ("agent restarted") until [`Vms::adopt_all`] adopts its running VMM; the
    /// reconciler decides whether to start one that was not adopted again.
    /// `hypervisor` launches the VMMs ([`crate::hypervisor::ProcessHypervisor`]: a
    /// `cairn-vmm` process each).
    pub fn open(
        hypervisor: Arc<dyn Hypervisor>,
        run_dir: PathBuf,
        records: Arc<Records>,
        events: Arc<EventBus>,
        exports: Arc<Exports>,
    ) -> Result<Self, records::RecordsError> {
        let mut vms = BTreeMap::new();
        for (name, record) in records.list::<records::VmRecord>()? {
            let record = KeptVm::from(record);
            let mut runtime = VmRuntime {
                state: VmState::Stopped,
                pid: 0,
                last_exit: String::new(),
                crash_count: 0,
                stop_requested: false,
                generation: 0,
                start_failure: None,
                disks: Vec::new(),
                incoming: None,
                ft_secondary: None,
                record,
            };
            if runtime.record.desired_running {
                // Adopted (or not, saying why) by `adopt_all` before the node serves.
                runtime.state = VmState::Crashed;
                runtime.last_exit = "the node agent restarted while the VM was running".into();
            }
            vms.insert(name, runtime);
        }
        Ok(Self {
            hypervisor,
            run_dir,
            records,
            events,
            exports,
            vms: Arc::new(Mutex::new(vms)),
            quorum_end_ns: std::sync::atomic::AtomicU64::new(0),
            adopted: tokio::sync::Notify::new(),
            cgroups: None,
            cgroup_detail: "SLA classes are not enforced: no cgroups were set up".into(),
        })
    }

    /// Enforces SLA classes with `cgroups` (`Err`: why they cannot be).
    pub fn set_cgroups(&mut self, cgroups: Result<crate::cgroups::Cgroups, String>) {
        match cgroups {
            Ok(cgroups) => {
                self.cgroup_detail = cgroups.describe();
                self.cgroups = Some(Arc::new(cgroups));
            }
            Err(why) => {
                self.cgroup_detail = format!("SLA classes are not enforced: {why}");
                self.cgroups = None;
            }
        }
    }

    /// The cgroup version SLA classes are enforced with ("v1", "v2"; empty: none),
    /// and the detail (where, or why not).
    pub fn cgroup_summary(&self) -> (String, String) {
        (
            self.cgroups
                .as_ref()
                .map_or(String::new(), |c| c.version_name().to_string()),
            self.cgroup_detail.clone(),
        )
    }

    /// The CPUs the node may dedicate and those free now (empty without cpusets).
    pub fn dedicated_summary(&self) -> (String, String) {
        self.cgroups
            .as_ref()
            .map(|cgroups| cgroups.dedicated_summary())
            .unwrap_or_default()
    }

    /// Stops the running spot VM of the lowest priority (ties: the largest resident
    /// memory first, then by name), saying `why` in its event and last exit; the VMM
    /// is killed at once (memory pressure does not wait for a grace period). Returns
    /// the VM stopped, or `None` when no spot VM runs.
    pub async fn preempt_one(&self, why: &str) -> Option<String> {
        let victim = {
            let mut vms = self.vms.lock().await;
            let victim = vms
                .iter()
                .filter(|(_, vm)| vm.state == VmState::Running && vm.pid != 0)
                .filter_map(|(name, vm)| {
                    let definition = vm.record.definition.as_ref()?;
                    (sla::class_of(definition) == crate::cgroups::SlaClass::Spot).then(|| {
                        let resident = sla::process_usage(vm.pid).resident_bytes;
                        (
                            definition.priority,
                            std::cmp::Reverse(resident),
                            name.clone(),
                        )
                    })
                })
                .min()?
                .2;
            let runtime = vms.get_mut(&victim)?;
            let reason = format!("preempted: {why}");
            runtime.start_failure = Some(reason.clone());
            Self::publish(&self.events, &victim, VmState::Running, &reason);
            victim
        };
        let _ = self.stop(&victim, Duration::ZERO).await;
        Some(victim)
    }

    /// Removes the cgroups of VMs this node no longer keeps (left by a node killed
    /// before it deleted them, or by a data directory that was wiped); one line each.
    pub async fn prune_cgroups(&self) -> Vec<String> {
        let Some(cgroups) = &self.cgroups else {
            return Vec::new();
        };
        let vms = self.vms.lock().await;
        cgroups
            .list()
            .into_iter()
            .filter(|name| !vms.contains_key(name))
            .map(|name| match cgroups.remove(&name) {
                Ok(()) => {
                    format!("removed the cgroup of vm `{name}`, which this node does not keep")
                }
                Err(error) => format!(
                    "the cgroup of vm `{name}`, which this node does not keep, stays: {error}"
                ),
            })
            .collect()
    }

    /// At start: removes the empty parent cgroups that earlier nodes of this name left
    /// (killed before their exit) and no running node owns; one line per removal.
    pub fn remove_stale_cgroup_parents(&self, name: &str) -> Vec<String> {
        let Some(cgroups) = &self.cgroups else {
            return Vec::new();
        };
        cgroups
            .remove_stale_parents(name, &crate::cgroups::live_node_ids())
            .into_iter()
            .map(|dir| {
                format!(
                    "removed {}, an empty cgroup an earlier node of this name left",
                    dir.display()
                )
            })
            .collect()
    }

    /// At a clean exit, before any VMM is killed (`--stop-vms-on-exit`): the cgroups of
    /// VMs no process runs in, then the node's parent cgroups where empty (a VMM that
    /// outlives the agent keeps its own and the parent). It does not wait for VMMs to
    /// end: an agent that saw its VMM end would record the exit itself, and the next
    /// agent could no longer say it ended while the agent was down. Parents left
    /// behind go at the next start of a node of this name. One line per parent.
    pub fn remove_cgroups_on_exit(&self) -> Vec<String> {
        self.cgroups
            .as_ref()
            .map(|cgroups| cgroups.remove_on_exit())
            .unwrap_or_default()
    }

    /// Writes the class's values into the VM's cgroup where they differ (and, for a
    /// running VMM, moves it in if it is not there), publishing what was repaired.
    fn repair_cgroup(&self, definition: &v1::CreateVm, pid: u32, state: VmState) {
        let Some(cgroups) = &self.cgroups else {
            return;
        };
        if pid == 0 && !cgroups.exists(&definition.name) {
            return;
        }
        let settings = sla::settings_of(definition);
        match cgroups.ensure(&definition.name, &settings, (pid != 0).then_some(pid)) {
            Ok(written) if written.is_empty() => {}
            Ok(written) => Self::publish(
                &self.events,
                &definition.name,
                state,
                &format!(
                    "cgroup of class {} repaired: {}",
                    sla::class_of(definition).name(),
                    written.join(", ")
                ),
            ),
            Err(error) => Self::publish(
                &self.events,
                &definition.name,
                state,
                &format!("cgroup not repaired: {error}"),
            ),
        }
    }

    fn persist(&self, name: &str, record: &KeptVm) -> Result<(), Status> {
        self.records
            .put(name, &records::VmRecord::from(record))
            .map_err(|error| Status::internal(error.to_string()))
    }

    /// What records the end of the VMM of `name`'s process generation `generation`.
    fn supervisor(&self, name: &str, generation: u64) -> Supervisor {
        Supervisor {
            vms: self.vms.clone(),
            events: self.events.clone(),
            records: self.records.clone(),
            exports: self.exports.clone(),
            name: name.to_string(),
            generation,
        }
    }

    /// Adopts the running VMM of every VM that should be running, after an agent
    /// restart, once it has proved to be the process recorded at spawn
    /// ([`adopt::verify`]): its disks are served again on the same sockets, its exit
    /// is watched through its pidfd, and the quorum loop renews its fence as before. A
    /// VM whose VMM is gone, or fails a check, stays `CRASHED` with a detail saying
    /// why. Returns one line per VM, for the node's log.
    pub async fn adopt_all(&self) -> Vec<String> {
        let candidates: Vec<(String, KeptVm)> = self
            .vms
            .lock()
            .await
            .iter()
            .filter(|(_, vm)| vm.record.desired_running && vm.record.last_pid != 0 && vm.pid == 0)
            .map(|(name, vm)| (name.clone(), vm.record.clone()))
            .collect();
        // All at once: a VMM slow to answer its handshake (a starved spot VM waits up
        // to 1 + 2 + 4 + 8 s, `adopt::HANDSHAKE_TRIES`) must not hold back the adoption of
        // the others, whose fences count down until the quorum loop renews them (a
        // loaded CI run's reserved HA VM fenced itself that way behind a spot VM).
        futures_util::future::join_all(
            candidates
                .into_iter()
                .map(|(name, kept)| self.adopt_one(name, kept)),
        )
        .await
    }

    /// Verifies the recorded VMM of `name` and adopts it, or says why not (and kills
    /// it when it is ours but unverified); one line for the node's log.
    async fn adopt_one(&self, name: String, kept: KeptVm) -> String {
        let started = std::time::Instant::now();
        let vm_dir = self.run_dir.join(&name);
        let checked = {
            let (name, kept, vm_dir) = (name.clone(), kept.clone(), vm_dir.clone());
            tokio::task::spawn_blocking(move || {
                adopt::verify(&adopt::Recorded {
                    vm: &name,
                    pid: kept.last_pid,
                    start_ticks: kept.last_start_ticks,
                    incarnation: &kept.incarnation,
                    config: &vm_dir.join(VM_CONFIG_FILE),
                    socket: &vm_dir.join("control.sock"),
                })
            })
            .await
        };
        let verdict = checked.unwrap_or_else(|error| {
            adopt::Verdict::NotOurs(format!("the adoption checks did not run: {error}"))
        });
        match verdict {
            adopt::Verdict::Adopt(pidfd) => {
                let line = self.adopt(&name, &kept, pidfd).await;
                format!("{line} in {} ms", started.elapsed().as_millis())
            }
            adopt::Verdict::Gone(detail) | adopt::Verdict::NotOurs(detail) => {
                self.not_adopted(&name, &detail).await
            }
            adopt::Verdict::Unverified(pidfd, detail) => {
                // Ours for certain (pid, start time, command line), this incarnation
                // not: it must not run beside a new start of the VM.
                let killed = match pidfd.signal(libc::SIGKILL) {
                    Ok(()) => {
                        let until = std::time::Instant::now() + Duration::from_secs(2);
                        while !pidfd.exited() && std::time::Instant::now() < until {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        "killed through its pidfd".to_string()
                    }
                    Err(error) => format!("killing it through its pidfd failed: {error}"),
                };
                self.not_adopted(&name, &format!("{detail}; not adopted, {killed}"))
                    .await
            }
        }
    }

    /// Told after each adoption ([`Vms::adopt_all`]): the quorum loop then pushes the
    /// adopted VMM's fence without waiting for its next round.
    pub fn adopted(&self) -> &tokio::sync::Notify {
        &self.adopted
    }

    /// Makes the verified VMM `kept.last_pid` the VM's running process again.
    async fn adopt(&self, name: &str, kept: &KeptVm, pidfd: adopt::PidFd) -> String {
        let pid = kept.last_pid;
        let volumes = kept
            .definition
            .as_ref()
            .map(|definition| definition.volumes.clone())
            .unwrap_or_default();
        // Its disks are served again on the same sockets; its NBD client, which has
        // been retrying since the old agent's servers went away, reconnects there.
        let disks = match self.exports.attach_vm(name, &volumes).await {
            Ok(disks) => disks,
            Err(status) => volumes
                .iter()
                .map(|volume| VmDisk {
                    volume: volume.clone(),
                    config: None,
                    local: false,
                    detail: format!(
                        "not served again after the agent restart: {}",
                        status.message()
                    ),
                })
                .collect(),
        };
        let unserved = self.unserved_disks(name, &disks);
        let generation = {
            let mut vms = self.vms.lock().await;
            let Some(runtime) = vms.get_mut(name) else {
                return format!("vm `{name}`: deleted while it was being adopted");
            };
            runtime.generation += 1;
            runtime.pid = pid;
            runtime.state = VmState::Running;
            runtime.stop_requested = false;
            runtime.start_failure = None;
            runtime.last_exit.clear();
            runtime.disks = disks;
            runtime.generation
        };
        let supervisor = self.supervisor(name, generation);
        let log = self.run_dir.join(name).join("vmm.log");
        tokio::spawn(async move {
            pidfd.exit().await;
            let (exit, clean) = adopt::exit_from_log(&log);
            supervisor.ended(exit, clean).await;
        });
        let mut detail = format!(
            "adopted cairn-vmm pid {pid} after an agent restart (pidfd, start time, incarnation {} verified)",
            kept.incarnation
        );
        if !unserved.is_empty() {
            detail.push_str(&format!(
                "; not served again (its I/O there waits, then fails): {}",
                unserved.join(", ")
            ));
        }
        Self::publish(&self.events, name, VmState::Running, &detail);
        self.adopted.notify_one();
        format!("vm `{name}`: {detail}")
    }

    /// The disk sockets the VMM of `name` was given (its `vm-config.json`) that
    /// `disks` does not serve now.
    fn unserved_disks(&self, name: &str, disks: &[VmDisk]) -> Vec<String> {
        let path = self.run_dir.join(name).join(VM_CONFIG_FILE);
        let given: Vec<vm_config::DiskConfig> = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<vm_config::VmConfig>(&bytes).ok())
            .map(|config| config.disks)
            .unwrap_or_default();
        given
            .into_iter()
            .filter(|disk| disk.nbd_export.is_some())
            .filter(|disk| {
                !disks
                    .iter()
                    .filter_map(|served| served.config.as_ref())
                    .any(|served| served.path == disk.path)
            })
            .map(|disk| disk.path.display().to_string())
            .collect()
    }

    /// Reports a VM whose VMM was not adopted `CRASHED`, saying why.
    async fn not_adopted(&self, name: &str, detail: &str) -> String {
        let mut vms = self.vms.lock().await;
        let Some(runtime) = vms.get_mut(name) else {
            return format!("vm `{name}`: deleted while it was being adopted");
        };
        runtime.state = VmState::Crashed;
        runtime.last_exit = format!("the node agent restarted while the VM was running; {detail}");
        runtime.record.last_pid = 0;
        let _ = self.persist(name, &runtime.record);
        Self::publish(&self.events, name, VmState::Crashed, &runtime.last_exit);
        format!("vm `{name}`: {}", runtime.last_exit)
    }

    fn publish(events: &EventBus, name: &str, state: VmState, detail: &str) {
        let health = match state {
            VmState::Running | VmState::Starting | VmState::Stopped => Health::Healthy,
            VmState::Crashed => Health::Failed,
            VmState::Unspecified => Health::Unspecified,
        };
        events.publish(v1::watch_event::Event::Vm(v1::VmEvent {
            name: name.to_string(),
            state: state as i32,
            health: health as i32,
            detail: detail.to_string(),
        }));
    }

    /// Defines a VM (idempotent for the same definition).
    pub async fn create(&self, definition: v1::CreateVm) -> Result<v1::VmResult, Status> {
        let mut vms = self.vms.lock().await;
        if let Some(existing) = vms.get_mut(&definition.name) {
            if existing.record.definition.as_ref() == Some(&definition) {
                // The same definition again is the repair path: the class's cgroup
                // values are written back where they drifted.
                self.repair_cgroup(&definition, existing.pid, existing.state);
                return Ok(v1::VmResult {
                    name: definition.name.clone(),
                    state: state_name(existing.state),
                    pid: existing.pid,
                });
            }
            if existing
                .record
                .definition
                .as_ref()
                .is_some_and(|kept| sla::only_sla_differs(kept, &definition))
            {
                // A new SLA class or priority is applied in place: the VM keeps running
                // and its cgroup gets the new class's values.
                let mut record = existing.record.clone();
                record.definition = Some(definition.clone());
                self.persist(&definition.name, &record)?;
                existing.record = record;
                self.repair_cgroup(&definition, existing.pid, existing.state);
                return Ok(v1::VmResult {
                    name: definition.name.clone(),
                    state: state_name(existing.state),
                    pid: existing.pid,
                });
            }
            return Err(Status::already_exists(format!(
                "vm `{}` is already defined on this node with another definition; delete it first",
                definition.name
            )));
        }
        let record = KeptVm {
            definition: Some(definition.clone()),
            ..KeptVm::default()
        };
        self.persist(&definition.name, &record)?;
        vms.insert(
            definition.name.clone(),
            VmRuntime {
                record,
                state: VmState::Stopped,
                pid: 0,
                last_exit: String::new(),
                crash_count: 0,
                stop_requested: false,
                generation: 0,
                start_failure: None,
                disks: Vec::new(),
                incoming: None,
                ft_secondary: None,
            },
        );
        Self::publish(&self.events, &definition.name, VmState::Stopped, "defined");
        Ok(v1::VmResult {
            name: definition.name,
            state: state_name(VmState::Stopped),
            pid: 0,
        })
    }

    /// The `VmConfig` the VMM of `definition` runs, checked.
    fn launch_config(
        &self,
        definition: &v1::CreateVm,
        network: Option<&NetNs>,
        disks: &[VmDisk],
        incarnation: &str,
    ) -> Result<vm_config::VmConfig, Status> {
        let vm_dir = self.run_dir.join(&definition.name);
        let mut config = vmm_config(definition, &vm_dir, network, disks)?;
        config.incarnation = incarnation.to_string();
        config.fence_deadline_boottime_ns = self
            .quorum_end_ns
            .load(std::sync::atomic::Ordering::Acquire);
        // The node's own output: a refusal here (a data directory whose control socket
        // path is too long, say) is this node's condition, not the request's.
        config.validate().map_err(|error| {
            Status::failed_precondition(format!(
                "vm `{}` cannot run on this node: {error}",
                definition.name
            ))
        })?;
        Ok(config)
    }

    /// The VM's disks: served to its VMM (one NBD server each), or, on a hypervisor
    /// that reads no disk (simulated), listed as not attached, saying so.
    async fn attach_disks(
        &self,
        name: &str,
        volumes: &[String],
        incoming: bool,
    ) -> Result<Vec<VmDisk>, Status> {
        if self.hypervisor.serves_disks() {
            return self.exports.attach_vm_as(name, volumes, incoming).await;
        }
        Ok(volumes
            .iter()
            .map(|volume| VmDisk {
                volume: volume.clone(),
                config: None,
                local: false,
                detail: "a simulated VM reads no disk: none is served".into(),
            })
            .collect())
    }

    /// Starts a defined VM (running already is fine) and waits until it is seen
    /// running: its `cairn-vmm` process alive and, for the built-in guest, a first
    /// heartbeat reported over its control socket (a Linux kernel has no heartbeat
    /// channel: for it the VMM answering on its control socket, which it serves only
    /// once the kernel is loaded and the vCPUs run, is the sign). A VMM that exits
    /// first, or is not seen running within `timeout` (it is then killed), fails the
    /// start with `FAILED_PRECONDITION` carrying its exit status and the last lines of
    /// its `vmm.log`; the VM is then reported `CRASHED`, never `RUNNING`.
    ///
    /// With `network` (the node's namespace, where network actions are allowed) the
    /// VMM runs there with a virtio-net device on each NIC's tap; without, the VM runs
    /// without its NICs, which Observe reports as not made, with why.
    pub async fn start(
        &self,
        name: &str,
        network: Option<&NetNs>,
        timeout: Duration,
    ) -> Result<v1::VmResult, Status> {
        let started = loop {
            match self.spawn(name, network).await? {
                Spawned::Running(result) => return Ok(result),
                Spawned::Started(started) => break started,
                // Another StartVm is waiting for this VM's process: wait for its
                // outcome, then start again if that one failed.
                Spawned::AnotherStartRunning => {
                    tokio::time::sleep(START_POLL).await;
                }
            }
        };
        self.await_running(name, started, timeout).await
    }

    /// Spawns the VM's `cairn-vmm` (state `STARTING`), unless it runs or is starting.
    async fn spawn(&self, name: &str, network: Option<&NetNs>) -> Result<Spawned, Status> {
        let mut vms = self.vms.lock().await;
        let Some(runtime) = vms.get_mut(name) else {
            return Err(Status::not_found(format!(
                "vm `{name}` is not defined on this node; create it first"
            )));
        };
        match runtime.state {
            VmState::Running => {
                return Ok(Spawned::Running(v1::VmResult {
                    name: name.to_string(),
                    state: state_name(runtime.state),
                    pid: runtime.pid,
                }));
            }
            VmState::Starting => return Ok(Spawned::AnotherStartRunning),
            _ => {}
        }
        if let Some(reason) = self.hypervisor.unavailable() {
            return Err(Status::failed_precondition(reason));
        }
        let Some(definition) = runtime.record.definition.clone() else {
            return Err(Status::internal(format!(
                "vm `{name}` has no stored definition"
            )));
        };
        let (pid, generation) = self
            .launch_vmm(runtime, name, &definition, network, None)
            .await?;
        let builtin = matches!(definition.image, Some(v1::create_vm::Image::Builtin(_)));
        Ok(Spawned::Started(Started {
            pid,
            generation,
            builtin,
        }))
    }

    /// Spawns the VMM of `definition` into `runtime` (state `STARTING`), with its disks
    /// served and its exit supervised; with `peer`, as a live migration's destination
    /// ([`migration`]) or a fault-tolerance secondary ([`ft`]) listening there.
    /// Returns its pid and generation.
    async fn launch_vmm(
        &self,
        runtime: &mut VmRuntime,
        name: &str,
        definition: &v1::CreateVm,
        network: Option<&NetNs>,
        peer: Option<PeerWait<'_>>,
    ) -> Result<(u32, u64), Status> {
        // Each volume is served to this VM's VMM alone, on its own socket, for as long
        // as the process runs (the supervisor below stops the servers when it ends).
        let disks = self
            .attach_disks(name, &definition.volumes, peer.is_some())
            .await?;
        let incarnation = adopt::new_incarnation();
        let vm_dir = self.run_dir.join(name);
        // The VMM joins the node's namespace only when it has NICs there.
        let netns = network.filter(|_| !definition.nics.is_empty());
        let launched = self.placement(definition).and_then(|placement| {
            self.launch_config(definition, network, &disks, &incarnation)
                .and_then(|config| match peer {
                    None => self.hypervisor.launch(&config, &vm_dir, netns, placement),
                    Some(PeerWait::Migration(listen)) => self
                        .hypervisor
                        .launch_incoming(&config, &vm_dir, netns, placement, listen),
                    Some(PeerWait::FtPrimary(listen)) => self
                        .hypervisor
                        .launch_ft_secondary(&config, &vm_dir, netns, placement, listen),
                })
        });
        let launched = match launched {
            Ok(launched) => launched,
            Err(status) => {
                self.exports.detach_vm(name).await;
                return Err(status);
            }
        };
        runtime.disks = disks;
        let pid = launched.pid;
        runtime.generation += 1;
        runtime.pid = pid;
        runtime.state = VmState::Starting;
        runtime.stop_requested = false;
        runtime.start_failure = None;
        // A migration's destination runs only once committed, a fault-tolerance
        // secondary only once promoted: nothing restarts either before.
        runtime.record.desired_running = peer.is_none();
        runtime.incoming = matches!(peer, Some(PeerWait::Migration(_))).then(String::new);
        runtime.ft_secondary = matches!(peer, Some(PeerWait::FtPrimary(_))).then(String::new);
        runtime.record.last_pid = pid;
        // What the next agent checks before it adopts this process.
        runtime.record.last_start_ticks = adopt::start_ticks(pid).unwrap_or(0);
        runtime.record.incarnation = incarnation;
        let record = runtime.record.clone();
        let generation = runtime.generation;
        // The record (with the new pid) and the start count move together.
        self.records
            .put_counted(
                name,
                &records::VmRecord::from(&record),
                &starts_counter(name),
                Count::Always,
            )
            .map_err(|error| Status::internal(error.to_string()))?;
        Self::publish(
            &self.events,
            name,
            VmState::Starting,
            &match peer {
                None => format!("cairn-vmm pid {pid}"),
                Some(PeerWait::Migration(_)) => format!("incoming migration: cairn-vmm pid {pid}"),
                Some(PeerWait::FtPrimary(_)) => {
                    format!("fault-tolerance secondary: cairn-vmm pid {pid}")
                }
            },
        );

        let supervisor = self.supervisor(name, generation);
        let exit = launched.exit;
        tokio::spawn(async move {
            let (exit, clean) = exit.await;
            supervisor.ended(exit, clean).await;
        });
        Ok((pid, generation))
    }

    /// The VM's cgroup made with its class's values, opened for its VMM to enter
    /// before it runs; `None` where SLA classes are not enforced. A cgroup that cannot
    /// be made fails the start (the class would not hold).
    fn placement(
        &self,
        definition: &v1::CreateVm,
    ) -> Result<Option<crate::cgroups::Placement>, Status> {
        let Some(cgroups) = &self.cgroups else {
            if definition.dedicated_cpus {
                return Err(Status::failed_precondition(format!(
                    "vm `{}` asks for dedicated CPUs, and this node gives none: {}",
                    definition.name, self.cgroup_detail
                )));
            }
            return Ok(None);
        };
        let fail = |error: String| {
            Status::failed_precondition(format!(
                "vm `{}` cannot be given its {} cgroup on this node: {error}",
                definition.name,
                sla::class_of(definition).name()
            ))
        };
        cgroups
            .ensure(&definition.name, &sla::settings_of(definition), None)
            .map_err(fail)?;
        cgroups.placement(&definition.name).map(Some).map_err(fail)
    }

    /// Waits until the VMM spawned as `started` is seen running (then `RUNNING`), or
    /// fails the start: it exited, was stopped or deleted, or `timeout` passed (then it
    /// is killed).
    async fn await_running(
        &self,
        name: &str,
        started: Started,
        timeout: Duration,
    ) -> Result<v1::VmResult, Status> {
        let vm_dir = self.run_dir.join(name);
        let socket = vm_dir.join("control.sock");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let mut vms = self.vms.lock().await;
                let Some(runtime) = vms.get_mut(name) else {
                    return Err(Status::aborted(format!(
                        "vm `{name}` was deleted while it was starting"
                    )));
                };
                if runtime.generation != started.generation {
                    return Err(Status::aborted(format!(
                        "vm `{name}` was started again while this start was waiting"
                    )));
                }
                if runtime.pid == 0 {
                    if runtime.stop_requested {
                        return Err(Status::aborted(format!(
                            "vm `{name}` was stopped before it was seen running"
                        )));
                    }
                    return Err(Status::failed_precondition(format!(
                        "vm `{name}` did not start: cairn-vmm (pid {}) ended before it was seen running: {}{}",
                        started.pid,
                        runtime.last_exit,
                        log_tail(&vm_dir.join("vmm.log")),
                    )));
                }
            }
            let probe = socket.clone();
            let hypervisor = self.hypervisor.clone();
            let seen =
                tokio::task::spawn_blocking(move || hypervisor.status(&probe, CONTROL_TIMEOUT))
                    .await
                    .ok()
                    .flatten();
            if let Some(heartbeat) = seen
                && (heartbeat.total > 0 || !started.builtin)
            {
                let mut vms = self.vms.lock().await;
                if let Some(runtime) = vms.get_mut(name)
                    && runtime.generation == started.generation
                    && runtime.pid == started.pid
                    && runtime.state == VmState::Starting
                {
                    runtime.state = VmState::Running;
                    Self::publish(
                        &self.events,
                        name,
                        VmState::Running,
                        &format!("cairn-vmm pid {}", started.pid),
                    );
                    return Ok(v1::VmResult {
                        name: name.to_string(),
                        state: state_name(VmState::Running),
                        pid: started.pid,
                    });
                }
                // Stopped, deleted or exited meanwhile: the checks above say which.
                continue;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.kill_unseen(name, &started, timeout).await);
            }
            tokio::time::sleep(START_POLL).await;
        }
    }

    /// Kills a VMM that was not seen running in time and waits (briefly) until it is
    /// reaped, so the VM is reported `CRASHED` when the failed start is answered.
    async fn kill_unseen(&self, name: &str, started: &Started, timeout: Duration) -> Status {
        let what = if started.builtin {
            "report a first guest heartbeat"
        } else {
            "answer on its control socket"
        };
        let reason = format!(
            "cairn-vmm did not {what} within {} ms and was killed",
            timeout.as_millis()
        );
        {
            let mut vms = self.vms.lock().await;
            if let Some(runtime) = vms.get_mut(name)
                && runtime.generation == started.generation
                && runtime.pid == started.pid
            {
                runtime.start_failure = Some(reason.clone());
                self.hypervisor.signal(started.pid, libc::SIGKILL);
            }
        }
        let reaped_by = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < reaped_by {
            let reaped =
                self.vms.lock().await.get(name).is_none_or(|runtime| {
                    runtime.generation != started.generation || runtime.pid == 0
                });
            if reaped {
                break;
            }
            tokio::time::sleep(START_POLL).await;
        }
        Status::failed_precondition(format!(
            "vm `{name}` did not start: {reason}{}",
            log_tail(&self.run_dir.join(name).join("vmm.log"))
        ))
    }

    /// Stops a VM: SIGTERM, then SIGKILL after `grace`. Stopped already is fine.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<v1::VmResult, Status> {
        let pid = {
            let mut vms = self.vms.lock().await;
            let Some(runtime) = vms.get_mut(name) else {
                return Err(Status::not_found(format!(
                    "vm `{name}` is not defined on this node"
                )));
            };
            runtime.record.desired_running = false;
            let record = runtime.record.clone();
            self.persist(name, &record)?;
            if runtime.pid == 0 {
                if runtime.state != VmState::Stopped {
                    runtime.state = VmState::Stopped;
                    Self::publish(&self.events, name, VmState::Stopped, "stopped");
                }
                return Ok(v1::VmResult {
                    name: name.to_string(),
                    state: state_name(runtime.state),
                    pid: 0,
                });
            }
            runtime.stop_requested = true;
            runtime.pid
        };
        self.hypervisor.signal(pid, libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if self
                .vms
                .lock()
                .await
                .get(name)
                .is_none_or(|runtime| runtime.pid != pid)
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                self.hypervisor.signal(pid, libc::SIGKILL);
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self
                    .vms
                    .lock()
                    .await
                    .get(name)
                    .is_none_or(|runtime| runtime.pid != pid)
                {
                    break;
                }
                continue;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(v1::VmResult {
            name: name.to_string(),
            state: state_name(VmState::Stopped),
            pid: 0,
        })
    }

    /// The definitions of every VM, by name.
    pub async fn definitions(&self) -> BTreeMap<String, v1::CreateVm> {
        self.vms
            .lock()
            .await
            .iter()
            .filter_map(|(name, runtime)| {
                runtime
                    .record
                    .definition
                    .clone()
                    .map(|definition| (name.clone(), definition))
            })
            .collect()
    }

    /// The definition of one VM.
    pub async fn definition(&self, name: &str) -> Option<v1::CreateVm> {
        self.vms
            .lock()
            .await
            .get(name)
            .and_then(|runtime| runtime.record.definition.clone())
    }

    /// Stops (if needed) and forgets a VM. Missing is fine.
    pub async fn delete(&self, name: &str) -> Result<(), Status> {
        if !self.vms.lock().await.contains_key(name) {
            return Ok(());
        }
        self.stop(name, Duration::from_secs(5)).await?;
        self.vms.lock().await.remove(name);
        self.exports.detach_vm(name).await;
        if let Some(cgroups) = &self.cgroups
            && let Err(error) = cgroups.remove(name)
        {
            Self::publish(
                &self.events,
                name,
                VmState::Stopped,
                &format!("deleted; its cgroup was not removed: {error}"),
            );
        }
        self.records
            .remove::<records::VmRecord>(name)
            .map_err(|error| Status::internal(error.to_string()))?;
        let _ = std::fs::remove_dir_all(self.run_dir.join(name));
        Ok(())
    }

    /// Status of every VM in name order. Each running VM's VMM is asked over its
    /// control socket (concurrently, off the async runtime, at most [`CONTROL_TIMEOUT`]
    /// per read or write) what it runs — `vcpus` and `memory_bytes` are the VMM's, not
    /// the stored definition's — and for its heartbeats and NICs; a VM whose VMM does
    /// not answer, or that does not run, reports its definition's vCPUs and memory,
    /// zero heartbeat fields and its state-derived health.
    pub async fn statuses(&self) -> Vec<VmStatus> {
        let table = self.vms.lock().await;
        // Fault-tolerance secondaries waiting to be promoted: their VMM is asked for
        // its `ft` block only.
        let secondaries: std::collections::BTreeSet<String> = table
            .iter()
            .filter(|(_, runtime)| runtime.ft_secondary.is_some() && runtime.pid != 0)
            .map(|(name, _)| name.clone())
            .collect();
        let mut statuses: Vec<VmStatus> = table
            .iter()
            .map(|(name, runtime)| {
                let definition = runtime.record.definition.clone().unwrap_or_default();
                let class = sla::class_of(&definition);
                let cgroup = self.cgroups.as_ref().map(|cgroups| {
                    if runtime.pid == 0 && !cgroups.exists(name) {
                        v1::VmCgroup {
                            version: cgroups.version_name().into(),
                            path: cgroups.path_of(name),
                            memory_path: cgroups.memory_path_of(name),
                            detail: "made when the VM starts".into(),
                            ..Default::default()
                        }
                    } else {
                        cgroups.observe(name, &sla::settings_of(&definition), runtime.pid)
                    }
                });
                let usage = (runtime.state == VmState::Running && runtime.pid != 0).then(|| {
                    let mut usage = sla::process_usage(runtime.pid);
                    if let Some((zswap, zswapped)) =
                        self.cgroups.as_ref().and_then(|c| c.zswap_of(name))
                    {
                        (usage.zswap_bytes, usage.zswapped_bytes) = (zswap, zswapped);
                    }
                    usage
                });
                let (image_builtin, kernel) = match definition.image {
                    Some(v1::create_vm::Image::Builtin(builtin)) => (builtin, None),
                    Some(v1::create_vm::Image::Kernel(kernel)) => (String::new(), Some(kernel)),
                    None => (String::new(), None),
                };
                let kernel = kernel.unwrap_or_default();
                let disks = disk_statuses(&definition.volumes, &runtime.disks);
                VmStatus {
                    sla: class.name().into(),
                    priority: definition.priority,
                    dedicated_cpus: self
                        .cgroups
                        .as_ref()
                        .map(|cgroups| cgroups.dedicated_to(name))
                        .unwrap_or_default(),
                    cgroup: Some(cgroup.unwrap_or_else(|| v1::VmCgroup {
                        detail: self.cgroup_detail.clone(),
                        ..Default::default()
                    })),
                    usage,
                    name: name.clone(),
                    state: runtime.state as i32,
                    health: match runtime.state {
                        VmState::Crashed => Health::Failed,
                        _ => Health::Healthy,
                    } as i32,
                    vcpus: definition.vcpus,
                    memory_bytes: definition.memory_bytes,
                    pid: runtime.pid,
                    last_exit: runtime.last_exit.clone(),
                    crash_count: runtime.crash_count,
                    volumes: definition.volumes,
                    tenant: definition.tenant,
                    nics: Vec::new(),
                    heartbeats: 0,
                    heartbeat_age_ms: 0,
                    heartbeat_fresh: false,
                    starts: self.records.counter(&starts_counter(name)).unwrap_or(0),
                    image_builtin,
                    kernel_path: kernel.kernel_path,
                    initrd_path: kernel.initrd_path,
                    cmdline: kernel.cmdline,
                    disks,
                    guest_block_test: String::new(),
                    guest_block_tests: 0,
                    guest_block_checksum: 0,
                    boot_count: 0,
                    ft: None,
                }
            })
            .collect();
        drop(table);
        let running =
            |status: &VmStatus| status.state == VmState::Running as i32 && status.pid != 0;
        if self.hypervisor.blocks() {
            let queries: Vec<_> = statuses
                .iter()
                .enumerate()
                .filter(|(_, status)| running(status))
                .map(|(index, status)| {
                    let socket = self.run_dir.join(&status.name).join("control.sock");
                    let hypervisor = self.hypervisor.clone();
                    (
                        index,
                        tokio::task::spawn_blocking(move || {
                            hypervisor.status(&socket, CONTROL_TIMEOUT)
                        }),
                    )
                })
                .collect();
            for (index, query) in queries {
                if let Ok(Some(heartbeat)) = query.await {
                    heartbeat.apply(&mut statuses[index]);
                }
            }
        } else {
            for status in statuses.iter_mut().filter(|status| running(status)) {
                let socket = self.run_dir.join(&status.name).join("control.sock");
                if let Some(heartbeat) = self.hypervisor.status(&socket, CONTROL_TIMEOUT) {
                    heartbeat.apply(status);
                }
            }
        }
        for status in statuses
            .iter_mut()
            .filter(|status| secondaries.contains(&status.name))
        {
            let socket = self.run_dir.join(&status.name).join("control.sock");
            let hypervisor = self.hypervisor.clone();
            let seen = crate::maybe_blocking(hypervisor.blocks(), move || {
                hypervisor.status(&socket, CONTROL_TIMEOUT)
            })
            .await
            .ok()
            .flatten();
            status.ft = seen.and_then(|seen| seen.ft).map(|ft| ft::wire(&ft));
        }
        for status in &mut statuses {
            sla::add_io(status);
        }
        statuses
    }

    /// Sets the end of this node's quorum, the fence deadline new VMMs start with.
    pub fn set_quorum_end(&self, end_ns: u64) {
        self.quorum_end_ns
            .store(end_ns, std::sync::atomic::Ordering::Release);
    }

    /// The hypervisor the VMMs run on (the quorum loop fences through it).
    pub fn hypervisor(&self) -> Arc<dyn Hypervisor> {
        self.hypervisor.clone()
    }

    /// Each running VM's name and control socket (the quorum loop pushes fence
    /// deadlines through them).
    pub async fn running_control_sockets(&self) -> Vec<(String, PathBuf)> {
        self.vms
            .lock()
            .await
            .iter()
            .filter(|(_, vm)| vm.state == VmState::Running && vm.pid != 0)
            .map(|(name, _)| (name.clone(), self.run_dir.join(name).join("control.sock")))
            .collect()
    }

    /// A running VM's control socket, whether it runs the built-in guest, and its disks
    /// as its definition lists them (attached or not, with the guest device index).
    pub async fn running_disks(
        &self,
        name: &str,
    ) -> Result<(PathBuf, bool, Vec<v1::VmDiskStatus>), Status> {
        let vms = self.vms.lock().await;
        let Some(runtime) = vms.get(name) else {
            return Err(Status::not_found(format!(
                "no VM named {name} on this node"
            )));
        };
        if runtime.state != VmState::Running || runtime.pid == 0 {
            return Err(Status::failed_precondition(format!(
                "VM {name} is {}, not running",
                state_name(runtime.state)
            )));
        }
        let definition = runtime.record.definition.clone().unwrap_or_default();
        let builtin = matches!(definition.image, Some(v1::create_vm::Image::Builtin(_)));
        let disks = disk_statuses(&definition.volumes, &runtime.disks);
        Ok((self.run_dir.join(name).join("control.sock"), builtin, disks))
    }

    /// A VM's run directory (its console log and control socket are there), its state
    /// and its VMM's pid (0 when none runs); `None` for a VM not defined here.
    pub async fn run_state(&self, name: &str) -> Option<(PathBuf, VmState, u32)> {
        let vms = self.vms.lock().await;
        let runtime = vms.get(name)?;
        Some((self.run_dir.join(name), runtime.state, runtime.pid))
    }

    /// Number of running VMs.
    pub async fn running(&self) -> u32 {
        self.vms
            .lock()
            .await
            .values()
            .filter(|runtime| runtime.state == VmState::Running)
            .count() as u32
    }

    /// Kills every VM process (agent shutdown with `--stop-vms-on-exit`). The VMs stay
    /// `desired_running`, so the next agent reports them crashed-by-restart.
    pub async fn kill_all(&self) {
        for runtime in self.vms.lock().await.values() {
            if runtime.pid != 0 {
                self.hypervisor.signal(runtime.pid, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_vmm_of_this_vm_on_this_node_is_recognised_by_its_command_line() {
        let ours = std::path::Path::new("/data/lab-1/vms/web-0/vm-config.json");
        let cmdline =
            |program: &str, config: &str| format!("{program}\0--config\0{config}\0").into_bytes();
        assert!(super::cmdline_is_vmm_of(
            &cmdline(
                "/opt/cairn/cairn-vmm",
                "/data/lab-1/vms/web-0/vm-config.json"
            ),
            ours
        ));
        // Another node's VMM of a VM with the same name, on the same host.
        assert!(!super::cmdline_is_vmm_of(
            &cmdline(
                "/opt/cairn/cairn-vmm",
                "/data/lab-2/vms/web-0/vm-config.json"
            ),
            ours
        ));
        // A reused pid running something else that merely mentions the path.
        assert!(!super::cmdline_is_vmm_of(
            &cmdline("/usr/bin/less", "/data/lab-1/vms/web-0/vm-config.json"),
            ours
        ));
        assert!(!super::cmdline_is_vmm_of(
            b"cairn-vmm\0--vm-dir\0/x\0",
            ours
        ));
    }

    use super::*;

    fn running() -> VmStatus {
        VmStatus {
            state: VmState::Running as i32,
            health: Health::Healthy as i32,
            pid: 42,
            ..VmStatus::default()
        }
    }

    #[test]
    fn a_recent_heartbeat_is_fresh_and_healthy() {
        let mut status = running();
        Heartbeat {
            vcpus: 1,
            memory_bytes: 32 << 20,
            total: 17,
            age_ms: Some(12.6),
            uptime_ms: 5_000,
            nics: vec![],
            disks: vec![],
            guest_disks: vec![],
            block_test: None,
            block_tests: 0,
            block_checksum: 0,
            boot_count: 1,
            ft: None,
        }
        .apply(&mut status);
        assert_eq!(status.heartbeats, 17);
        assert_eq!(status.heartbeat_age_ms, 13);
        assert!(status.heartbeat_fresh);
        assert_eq!(status.health, Health::Healthy as i32);
    }

    #[test]
    fn a_running_vm_reports_what_its_vmm_runs_not_its_definition() {
        let mut status = VmStatus {
            vcpus: 1,
            memory_bytes: 32 << 20,
            ..running()
        };
        Heartbeat {
            vcpus: 2,
            memory_bytes: 48 << 20,
            total: 1,
            age_ms: Some(5.0),
            uptime_ms: 100,
            nics: vec![],
            disks: vec![],
            guest_disks: vec![],
            block_test: None,
            block_tests: 0,
            block_checksum: 0,
            boot_count: 1,
            ft: None,
        }
        .apply(&mut status);
        assert_eq!((status.vcpus, status.memory_bytes), (2, 48 << 20));
    }

    #[test]
    fn the_vmm_config_is_the_definition_with_the_nodes_paths() {
        let definition = v1::CreateVm {
            name: "app".into(),
            vcpus: 2,
            memory_bytes: 64 << 20,
            image: Some(v1::create_vm::Image::Kernel(v1::KernelImage {
                kernel_path: "/images/vmlinuz".into(),
                initrd_path: String::new(),
                cmdline: String::new(),
            })),
            nics: vec![v1::VmNic {
                network: "fin-app".into(),
                ipv4: "10.20.0.5".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let dir = Path::new("/var/lib/cairn/vms/app");
        let config = vmm_config(&definition, dir, None, &[]).expect("config");
        config.validate().expect("valid");
        assert_eq!((config.vcpus, config.memory_bytes), (2, 64 << 20));
        assert_eq!(config.control_socket, dir.join("control.sock"));
        assert_eq!(
            config.boot,
            vm_config::BootSource::Kernel {
                kernel: "/images/vmlinuz".into(),
                initrd: None,
                cmdline: vm_config::DEFAULT_CMDLINE.into(),
            }
        );
        // Without the node's network namespace the VM runs without its NICs.
        assert!(config.nics.is_empty());
    }

    #[test]
    fn each_disk_says_whether_it_is_attached_where_its_data_is_and_its_copies() {
        let volumes = [
            "a-root".to_string(),
            "a-data".into(),
            "a-logs".into(),
            "a-gone".into(),
        ];
        let served = |volume: &str| VmDisk {
            volume: volume.into(),
            config: Some(vm_config::DiskConfig {
                path: format!("/d/exports/{volume}.sock").into(),
                read_only: false,
                nbd_export: Some(volume.into()),
            }),
            local: true,
            detail: String::new(),
        };
        let attached = [
            served("a-root"),
            VmDisk {
                volume: "a-data".into(),
                config: None,
                local: false,
                detail: "this node holds a replica".into(),
            },
            served("a-logs"),
        ];
        let mut vm = VmStatus {
            disks: disk_statuses(&volumes, &attached),
            ..running()
        };
        let volume = |name: &str, role: v1::VolumeRole, health: Health| v1::VolumeStatus {
            name: name.into(),
            role: role as i32,
            health: health as i32,
            replica_peers: vec!["n2".into(), "n3".into()],
            primary: "n2".into(),
            detail: if health == Health::Healthy {
                ""
            } else {
                "n3 down"
            }
            .into(),
            ..Default::default()
        };
        fill_disk_copies(
            "n1",
            std::slice::from_mut(&mut vm),
            &[
                volume("a-root", v1::VolumeRole::Primary, Health::Healthy),
                volume("a-data", v1::VolumeRole::Replica, Health::Healthy),
                volume("a-logs", v1::VolumeRole::Primary, Health::Degraded),
            ],
        );
        let seen: Vec<_> = vm
            .disks
            .iter()
            .map(|d| {
                let attached = d.attached.then_some(d.device);
                (
                    d.volume.as_str(),
                    attached,
                    d.data.as_str(),
                    d.copies,
                    d.copies_in_sync,
                    d.detail.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("a-root", Some(0), "local", 3, 3, ""),
                ("a-data", None, "remote", 0, 0, "this node holds a replica"),
                // The second attached disk is the guest's second device.
                ("a-logs", Some(1), "local", 3, 1, "n3 down"),
                ("a-gone", None, "missing", 0, 0, ""),
            ]
        );
        // The VMM's counters go to the attached disks, in device order.
        let counters = |writes| vmm::control::BlockStatus {
            reads: 1,
            writes,
            flushes: 0,
            bytes_read: 4096,
            bytes_written: writes * 4096,
            errors: 0,
        };
        Heartbeat {
            vcpus: 1,
            memory_bytes: 32 << 20,
            total: 3,
            age_ms: Some(1.0),
            uptime_ms: 50,
            nics: vec![],
            disks: vec![counters(5), counters(7)],
            guest_disks: vec![],
            block_test: Some("pass".into()),
            block_tests: 1,
            block_checksum: 0x1234,
            boot_count: 1,
            ft: None,
        }
        .apply(&mut vm);
        let writes: Vec<u64> = vm.disks.iter().map(|d| d.writes).collect();
        assert_eq!(writes, [5, 0, 7, 0]);
        assert_eq!(
            (vm.guest_block_test.as_str(), vm.guest_block_tests),
            ("pass", 1)
        );
    }

    #[test]
    fn a_stale_or_missing_heartbeat_degrades_a_running_vm() {
        let mut stale = running();
        Heartbeat {
            vcpus: 1,
            memory_bytes: 32 << 20,
            total: 17,
            age_ms: Some(2_500.0),
            uptime_ms: 10_000,
            nics: vec![],
            disks: vec![],
            guest_disks: vec![],
            block_test: None,
            block_tests: 0,
            block_checksum: 0,
            boot_count: 1,
            ft: None,
        }
        .apply(&mut stale);
        assert!(!stale.heartbeat_fresh);
        assert_eq!(stale.heartbeat_age_ms, 2_500);
        assert_eq!(stale.health, Health::Degraded as i32);

        let mut booting = running();
        Heartbeat {
            vcpus: 1,
            memory_bytes: 32 << 20,
            total: 0,
            age_ms: None,
            uptime_ms: 300,
            nics: vec![],
            disks: vec![],
            guest_disks: vec![],
            block_test: None,
            block_tests: 0,
            block_checksum: 0,
            boot_count: 1,
            ft: None,
        }
        .apply(&mut booting);
        assert!(!booting.heartbeat_fresh);
        assert_eq!(booting.heartbeat_age_ms, 0);
        assert_eq!(booting.health, Health::Healthy as i32);

        let mut silent = running();
        Heartbeat {
            vcpus: 1,
            memory_bytes: 32 << 20,
            total: 0,
            age_ms: None,
            uptime_ms: 3_000,
            nics: vec![],
            disks: vec![],
            guest_disks: vec![],
            block_test: None,
            block_tests: 0,
            block_checksum: 0,
            boot_count: 1,
            ft: None,
        }
        .apply(&mut silent);
        assert_eq!(silent.health, Health::Degraded as i32);
    }
}
