//! vCPU threads: the run-state machine every vCPU follows, the VM-exit dispatch (the
//! device bus) and the kick that gets a vCPU out of `KVM_RUN`.
//!
//! Architecture invariant: a vCPU enters `KVM_RUN` only in [`RunState::Running`]; pause
//! and stop are requested through the shared run state and made prompt by kicking
//! (SIGRTMIN with a no-op handler) until every vCPU has acknowledged.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::{self, JoinHandle};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::ports::{GuestTelemetry, PortAction};
use crate::devices::serial::{COM1_BASE, COM1_LEN, Console};
use crate::devices::virtio_blk::{BlockStats, VirtioMmioBlock};
use crate::devices::virtio_net::{NetStats, VirtioMmioNet};
use crate::guest::abi;
use crate::memory::GuestRam;
use crate::vm::{VmError, VmEvent};

/// The state every vCPU thread follows. Transitions: Running ⇄ Paused (control
/// requests), Running/Paused → Exiting (stop, reboot, outcome decided). A vCPU thread
/// only enters `KVM_RUN` in `Running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs execute guest code.
    Running,
    /// vCPUs wait outside `KVM_RUN`; guest time stands still for the guest's view.
    Paused,
    /// vCPU threads return; the VM is being stopped or reset.
    Exiting,
}

impl RunState {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Exiting => "exiting",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct ExitCounters {
    pub(crate) io_in: AtomicU64,
    pub(crate) io_out: AtomicU64,
    pub(crate) mmio_read: AtomicU64,
    pub(crate) mmio_write: AtomicU64,
    pub(crate) hlt: AtomicU64,
    pub(crate) shutdown: AtomicU64,
    pub(crate) interrupted: AtomicU64,
    pub(crate) other: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct RunControl {
    pub(crate) state: RunState,
    pub(crate) paused: usize,
}

/// One network device with what its receive pump and status need beside it.
#[derive(Debug)]
pub(crate) struct NetSlot {
    pub(crate) device: Mutex<VirtioMmioNet>,
    /// Notified when the driver posts receive buffers (a queue 0 notify).
    pub(crate) rx_ready: Condvar,
    pub(crate) stats: Arc<NetStats>,
    pub(crate) tap: Arc<std::fs::File>,
    pub(crate) tap_name: String,
    /// Times the receive pump attached to the tap again after it was deleted.
    pub(crate) tap_reattached: AtomicU64,
    pub(crate) mac: [u8; 6],
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) run: Mutex<RunControl>,
    pub(crate) run_changed: Condvar,
    pub(crate) telemetry: GuestTelemetry,
    pub(crate) exits: ExitCounters,
    pub(crate) console: Mutex<Console>,
    pub(crate) blocks: Vec<Mutex<VirtioMmioBlock>>,
    pub(crate) block_stats: Vec<Arc<BlockStats>>,
    pub(crate) nets: Vec<NetSlot>,
    /// Set when the VM has ended: the network receive pumps return.
    pub(crate) pumps_stop: AtomicBool,
    /// The fence deadline ([`crate::fence`]), checked before every `KVM_RUN`.
    pub(crate) fence: Arc<crate::fence::Fence>,
    /// This incarnation's first and last heartbeat on the host's clocks, if its file
    /// could be made ([`crate::heartbeat_log`]).
    pub(crate) heartbeat_log: Option<crate::heartbeat_log::HeartbeatLog>,
    pub(crate) vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    pub(crate) events: Sender<VmEvent>,
    pub(crate) boot_count: AtomicU64,
    pub(crate) vcpus: usize,
    pub(crate) builtin: bool,
    /// The live migration under way or last done ([`crate::migration`]).
    pub(crate) migration: crate::migration::MigrationCell,
    /// Fault tolerance ([`crate::ft`]): status, decisions, the NICs' output gate.
    pub(crate) ft: crate::ft::FtCell,
    /// Every disk's write journal (the disks' backends, in `--disk` order).
    pub(crate) disk_journals: Vec<Arc<crate::ft::DiskJournal>>,
}

impl Shared {
    pub(crate) fn lock_run(&self) -> MutexGuard<'_, RunControl> {
        self.run.lock().expect("run-state lock")
    }

    pub(crate) fn send(&self, event: VmEvent) {
        // The receiver lives as long as the supervising loop; after it ends nobody listens.
        let _ = self.events.send(event);
    }

    /// Interrupts every vCPU thread that is inside `KVM_RUN` (EINTR).
    pub(crate) fn kick_vcpus(&self) {
        for thread in self.vcpu_threads.lock().expect("thread list lock").iter() {
            // SAFETY: the pthread_t values come from live JoinHandles of this process's
            // vCPU threads; they are removed before those threads are joined, so the id
            // never names an exited thread. The signal has a no-op handler installed by
            // `install_kick_handler`, so delivery only interrupts KVM_RUN.
            unsafe {
                libc::pthread_kill(*thread, kick_signal());
            }
        }
    }

    /// Wakes every NIC's receive pump (after a pause or freeze ends): a frame it held
    /// while the vCPUs were stopped is delivered now, not at its next poll. Takes each
    /// device lock, so it must not be called with the run-state lock held (the pump
    /// takes the run-state lock under the device lock).
    pub(crate) fn wake_receive_pumps(&self) {
        for net in &self.nets {
            let _device = net.device.lock().expect("net lock");
            net.rx_ready.notify_all();
        }
    }

    pub(crate) fn set_state(&self, state: RunState) {
        let mut run = self.lock_run();
        run.state = state;
        self.run_changed.notify_all();
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub(crate) fn install_kick_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .expect("SIGRTMIN is a valid signal for a handler");
    });
}

/// The cpu cgroup `tasks` file the node opened for this VMM's vCPU threads
/// (`--vcpu-cgroup-fd`), which each writes itself into before it runs the guest.
static VCPU_CGROUP: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Makes every vCPU thread started from now on move itself into the cgroup whose
/// `tasks` (cgroup v1) or `cgroup.threads` (v2) file `file` is, before its first
/// `KVM_RUN`. Set once, before the VM starts; a second call is refused.
pub fn set_vcpu_cgroup(file: std::fs::File) -> Result<(), String> {
    VCPU_CGROUP
        .set(file)
        .map_err(|_| "the vCPU cgroup is set already".to_string())
}

/// Moves the calling thread into the vCPU cgroup, if one was set.
fn enter_vcpu_cgroup() -> std::io::Result<()> {
    use std::io::Write as _;
    match VCPU_CGROUP.get() {
        // "0": the writing thread (cgroup v1 `tasks`, v2 `cgroup.threads`).
        Some(mut file) => file.write_all(b"0"),
        None => Ok(()),
    }
}

pub(crate) fn spawn_vcpus(
    shared: &Arc<Shared>,
    ram: &Arc<GuestRam>,
    vcpus: Vec<VcpuFd>,
) -> Result<Vec<JoinHandle<VcpuFd>>, VmError> {
    shared.set_state(RunState::Running);
    let mut handles = Vec::with_capacity(vcpus.len());
    let mut threads = shared.vcpu_threads.lock().expect("thread list lock");
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        let shared_for_thread = Arc::clone(shared);
        let ram = Arc::clone(ram);
        let handle = thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run_vcpu(index, vcpu, &shared_for_thread, &ram))
            .map_err(VmError::Thread)?;
        threads.push(handle.as_pthread_t());
        handles.push(handle);
    }
    Ok(handles)
}

/// Tells the supervising loop when a vCPU thread unwinds from a panic, so the VM ends as
/// "VMM failed" (exit 5) instead of waiting forever for an event.
struct PanicReporter<'a> {
    shared: &'a Shared,
    index: usize,
}

impl Drop for PanicReporter<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.shared.send(VmEvent::Failed(format!(
                "vCPU {} thread panicked",
                self.index
            )));
        }
    }
}

/// The vCPU state machine: run while `Running`, wait while `Paused`, return the vCPU fd on
/// `Exiting` (so a reboot can reuse it).
fn run_vcpu(index: usize, mut vcpu: VcpuFd, shared: &Shared, ram: &GuestRam) -> VcpuFd {
    let _report_panic = PanicReporter { shared, index };
    // The guest runs in its SLA class's CPU share, never outside it: a vCPU that cannot
    // enter its cgroup fails the VM instead.
    if let Err(error) = enter_vcpu_cgroup() {
        shared.send(VmEvent::Failed(format!(
            "vCPU {index} cannot enter its cpu cgroup: {error}"
        )));
        return vcpu;
    }
    loop {
        {
            let mut run = shared.lock_run();
            loop {
                match run.state {
                    RunState::Exiting => return vcpu,
                    RunState::Running => break,
                    RunState::Paused => {
                        run.paused += 1;
                        shared.run_changed.notify_all();
                        run = shared
                            .run_changed
                            .wait_while(run, |run| run.state == RunState::Paused)
                            .expect("run-state lock");
                        run.paused -= 1;
                    }
                }
            }
        }
        // The fence is checked before every entry: once the deadline lapses this vCPU
        // never runs guest code again (the watcher kicks it out of a long KVM_RUN).
        let terminal = if shared.fence.lapsed() {
            Some(VmEvent::Fenced)
        } else {
            match vcpu.run() {
                Ok(exit) => handle_exit(index, exit, shared, ram),
                Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                    shared.exits.interrupted.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(error) => Some(VmEvent::Failed(format!(
                    "KVM_RUN on vCPU {index} failed: {error}"
                ))),
            }
        };
        if let Some(event) = terminal {
            let parks = matches!(
                event,
                VmEvent::Crashed(_) | VmEvent::Failed(_) | VmEvent::GuestPowerOff | VmEvent::Fenced
            );
            shared.send(event);
            if parks {
                let run = shared.lock_run();
                drop(
                    shared
                        .run_changed
                        .wait_while(run, |run| run.state != RunState::Exiting)
                        .expect("run-state lock"),
                );
                return vcpu;
            }
        }
    }
}

/// Handles one VM exit; returns an event for the supervising loop when there is one.
fn handle_exit(
    index: usize,
    exit: VcpuExit<'_>,
    shared: &Shared,
    ram: &GuestRam,
) -> Option<VmEvent> {
    let exits = &shared.exits;
    match exit {
        VcpuExit::IoOut(port, data) => {
            exits.io_out.fetch_add(1, Ordering::Relaxed);
            if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
                shared
                    .console
                    .lock()
                    .expect("console lock")
                    .write((port - COM1_BASE) as u8, data[0]);
                return None;
            }
            if GuestTelemetry::owns(port) && data.len() == 4 {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                if u64::from(port) == crate::guest::abi::PORT_HEARTBEAT
                    && let Some(log) = &shared.heartbeat_log
                {
                    log.record(&shared.fence);
                }
                return match shared.telemetry.write(index, port, value) {
                    PortAction::Continue => None,
                    PortAction::FirstHeartbeat => Some(VmEvent::FirstHeartbeat),
                    PortAction::Sleep(duration) => {
                        let run = shared.lock_run();
                        drop(
                            shared
                                .run_changed
                                .wait_timeout_while(run, duration, |run| {
                                    run.state == RunState::Running
                                })
                                .expect("run-state lock"),
                        );
                        None
                    }
                    PortAction::PowerOff => Some(VmEvent::GuestPowerOff),
                    PortAction::Reboot => Some(VmEvent::GuestReboot),
                };
            }
            // The i8042 "pulse reset line" command: how Linux reboots a PC.
            if port == 0x64 && data.first() == Some(&0xfe) {
                return Some(VmEvent::GuestReboot);
            }
            None
        }
        VcpuExit::IoIn(port, data) => {
            exits.io_in.fetch_add(1, Ordering::Relaxed);
            if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
                data[0] = shared
                    .console
                    .lock()
                    .expect("console lock")
                    .read((port - COM1_BASE) as u8);
            } else if GuestTelemetry::owns(port) {
                let value = shared.telemetry.read(port).to_le_bytes();
                let length = data.len().min(4);
                data[..length].copy_from_slice(&value[..length]);
            } else {
                data.fill(0xff); // nothing decodes this port: the bus floats high
            }
            None
        }
        VcpuExit::MmioRead(address, data) => {
            exits.mmio_read.fetch_add(1, Ordering::Relaxed);
            match mmio_device(shared, address) {
                Some((MmioDevice::Block(block), offset)) => {
                    block.lock().expect("block lock").mmio_read(offset, data);
                }
                Some((MmioDevice::Net(net), offset)) => {
                    net.device.lock().expect("net lock").mmio_read(offset, data);
                }
                None => data.fill(0),
            }
            None
        }
        VcpuExit::MmioWrite(address, data) => {
            exits.mmio_write.fetch_add(1, Ordering::Relaxed);
            match mmio_device(shared, address) {
                Some((MmioDevice::Block(block), offset)) => {
                    block
                        .lock()
                        .expect("block lock")
                        .mmio_write(ram.memory(), offset, data);
                }
                Some((MmioDevice::Net(net), offset)) => {
                    let posted =
                        net.device
                            .lock()
                            .expect("net lock")
                            .mmio_write(ram.memory(), offset, data);
                    if posted {
                        net.rx_ready.notify_all();
                    }
                }
                None => {}
            }
            None
        }
        VcpuExit::Hlt => {
            exits.hlt.fetch_add(1, Ordering::Relaxed);
            // Without an in-kernel irqchip nothing can wake a halted vCPU: it is off.
            Some(VmEvent::GuestPowerOff)
        }
        VcpuExit::Shutdown => {
            exits.shutdown.fetch_add(1, Ordering::Relaxed);
            Some(VmEvent::Crashed(format!(
                "vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN)"
            )))
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmEvent::GuestPowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(VmEvent::GuestReboot),
            other => Some(VmEvent::Crashed(format!(
                "vCPU {index}: KVM system event {other}"
            ))),
        },
        VcpuExit::FailEntry(reason, cpu) => {
            exits.other.fetch_add(1, Ordering::Relaxed);
            Some(VmEvent::Crashed(format!(
                "vCPU {index}: VM entry failed (hardware reason {reason:#x} on cpu {cpu})"
            )))
        }
        VcpuExit::InternalError => {
            exits.other.fetch_add(1, Ordering::Relaxed);
            Some(VmEvent::Crashed(format!(
                "vCPU {index}: KVM internal error (often an instruction the emulator cannot handle)"
            )))
        }
        VcpuExit::Intr => {
            exits.interrupted.fetch_add(1, Ordering::Relaxed);
            None
        }
        other => {
            exits.other.fetch_add(1, Ordering::Relaxed);
            Some(VmEvent::Crashed(format!(
                "vCPU {index}: unexpected VM exit {other:?}"
            )))
        }
    }
}

enum MmioDevice<'a> {
    Block(&'a Mutex<VirtioMmioBlock>),
    Net(&'a NetSlot),
}

/// The virtio device whose 4 KiB window holds `address`, and the offset in it.
fn mmio_device(shared: &Shared, address: u64) -> Option<(MmioDevice<'_>, u64)> {
    let offset = address % abi::VIRTIO_MMIO_SIZE;
    if let Some(relative) = address.checked_sub(abi::VIRTIO_NET_MMIO_BASE) {
        let net = shared
            .nets
            .get(usize::try_from(relative / abi::VIRTIO_MMIO_SIZE).ok()?)?;
        return Some((MmioDevice::Net(net), offset));
    }
    let relative = address.checked_sub(abi::VIRTIO_BLK_MMIO_BASE)?;
    let block = shared
        .blocks
        .get(usize::try_from(relative / abi::VIRTIO_MMIO_SIZE).ok()?)?;
    Some((MmioDevice::Block(block), offset))
}
