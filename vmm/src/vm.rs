//! One VM: configuration, the build recipe ([`Vm::create`]), the vCPU threads and their
//! state machine, and the supervising loop that turns guest and control events into a
//! [`VmOutcome`].
//!
//! Architecture invariant: vCPU threads never decide the VM's fate themselves; they
//! report [`VmEvent`]s to the one supervising loop ([`RunningVm::wait`]), which alone
//! stops, reboots or ends the VM. A vCPU that reported a terminal event parks until it
//! is told to exit, so no thread touches the VM after the outcome is decided.

use std::fs;
use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::{self, ArchError};
use crate::control::{BlockStatus, ExitCounts, VmStatus};
use crate::devices::block::BlockBackend;
use crate::devices::ports::{GuestTelemetry, PortAction};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN, Console, SerialInterrupt};
use crate::devices::virtio_blk::{BlockStats, Interrupt, VirtioMmioBlock};
use crate::exit_code;
use crate::guest::{self, abi};
use crate::kvm::{self, KvmError};
use crate::linux::{self, LinuxError};
use crate::memory::{DirtyBitmap, GuestRam, MemoryError};

/// Most vCPUs a VM may have (the built-in guest's stack layout has room for 64).
pub const MAX_VCPUS: u8 = 64;
/// ISA interrupt lines of the virtio-blk devices for Linux guests, in disk order (4 is
/// COM1, 8 the RTC, 12 and 13 are left to PS/2 and the FPU by convention).
pub const VIRTIO_BLK_IRQS: [u32; 8] = [5, 6, 7, 9, 10, 11, 14, 15];
/// ISA interrupt line of the first virtio-blk device.
pub const VIRTIO_BLK_IRQ: u32 = VIRTIO_BLK_IRQS[0];
/// Most disks a VM may have.
pub const MAX_DISKS: usize = VIRTIO_BLK_IRQS.len();

/// Guest-physical base of the virtio-MMIO window of disk `index` (one 4 KiB window each,
/// from `VIRTIO_BLK_MMIO_BASE` on; the built-in guest uses disk 0).
pub fn disk_mmio_base(index: usize) -> u64 {
    abi::VIRTIO_BLK_MMIO_BASE + index as u64 * abi::VIRTIO_MMIO_SIZE
}
/// Guest-physical address of the TSS region KVM needs on Intel hosts.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// The embedded `cairn-guest`.
    Builtin,
    /// A Linux bzImage with optional initrd and a command line.
    Linux {
        /// Path of the bzImage.
        kernel: PathBuf,
        /// Path of the initrd, if any.
        initrd: Option<PathBuf>,
        /// Kernel command line (a virtio_mmio device entry is appended for the disk).
        cmdline: String,
    },
}

/// A validated description of one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in bytes (multiple of 4 KiB, at least 4 MiB).
    pub memory_bytes: u64,
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u8,
    /// What to boot.
    pub boot: BootSource,
    /// The disks, each behind its own virtio-blk device (at most [`MAX_DISKS`]).
    pub disks: Vec<Arc<dyn BlockBackend>>,
    /// File the serial console is appended to.
    pub console_log: PathBuf,
    /// The built-in guest's main-loop period.
    pub tick: Duration,
    /// Initial dirty-page rate of the built-in guest, pages per second.
    pub dirty_pages_per_second: u64,
    /// How long a graceful power-off waits for the guest's acknowledgement.
    pub power_off_grace: Duration,
}

impl VmConfig {
    /// A built-in-guest VM with defaults (10 ms tick, no dirtying, 2 s grace, no disk).
    pub fn builtin(memory_bytes: u64, vcpus: u8, console_log: PathBuf) -> Self {
        Self {
            memory_bytes,
            vcpus,
            boot: BootSource::Builtin,
            disks: Vec::new(),
            console_log,
            tick: Duration::from_millis(10),
            dirty_pages_per_second: 0,
            power_off_grace: Duration::from_secs(2),
        }
    }
}

/// Errors of building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is unusable.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// `/dev/kvm` is missing or lacks something.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// CPU or boot structure setup failed.
    #[error(transparent)]
    Arch(#[from] ArchError),
    /// The Linux kernel, initrd or command line was refused.
    #[error(transparent)]
    Linux(#[from] LinuxError),
    /// A VM-level KVM ioctl failed.
    #[error("{what} failed")]
    Create {
        /// Which operation.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A file the VM needs could not be read or created.
    #[error("cannot open {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] io::Error),
}

impl VmError {
    /// The process exit status for this error ([`exit_code`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Linux(_) | Self::File { .. } => exit_code::USAGE,
            Self::Kvm(_)
            | Self::Memory(_)
            | Self::Arch(_)
            | Self::Create { .. }
            | Self::Thread(_) => exit_code::HOST,
        }
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// Stopped on purpose; `by` says who asked.
    PoweredOff {
        /// "guest", "request", or "request (forced: …)".
        by: String,
    },
    /// The guest crashed.
    Crashed {
        /// What KVM reported.
        reason: String,
    },
    /// The VMM failed while running the VM.
    Failed {
        /// What failed.
        reason: String,
    },
}

impl VmOutcome {
    /// The process exit status for this outcome ([`exit_code`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::PoweredOff { .. } => exit_code::STOPPED,
            Self::Crashed { .. } => exit_code::GUEST_CRASHED,
            Self::Failed { .. } => exit_code::VMM_FAILED,
        }
    }

    /// Short name: `stopped`, `crashed` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PoweredOff { .. } => "stopped",
            Self::Crashed { .. } => "crashed",
            Self::Failed { .. } => "failed",
        }
    }

    /// Human-readable detail.
    pub fn detail(&self) -> &str {
        match self {
            Self::PoweredOff { by } => by,
            Self::Crashed { reason } | Self::Failed { reason } => reason,
        }
    }
}

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

/// What vCPU threads and the control channel tell the supervising loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The first heartbeat of this boot arrived.
    FirstHeartbeat,
    /// The guest acknowledged a power-off, halted, or asked for it (KVM system event).
    GuestPowerOff,
    /// The guest acknowledged a reboot or reset itself (i8042 reset, KVM system event).
    GuestReboot,
    /// The guest crashed.
    Crashed(String),
    /// A vCPU loop failed.
    Failed(String),
    /// Control: power off (gracefully unless `force`).
    RequestPowerOff {
        /// Skip waiting for the guest.
        force: bool,
    },
    /// Control: reboot.
    RequestReboot,
}

/// Something the supervising loop reports to its caller (the binary prints them).
#[derive(Debug, Clone, PartialEq)]
pub enum Notification {
    /// The first heartbeat arrived this long after [`Vm::create`] began.
    FirstHeartbeat(Duration),
    /// The VM rebooted; this is boot number `n` (the first boot is 1).
    Rebooted(u64),
}

#[derive(Debug, Default)]
struct ExitCounters {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    hlt: AtomicU64,
    shutdown: AtomicU64,
    interrupted: AtomicU64,
    other: AtomicU64,
}

#[derive(Debug)]
struct RunControl {
    state: RunState,
    paused: usize,
}

#[derive(Debug)]
struct Shared {
    run: Mutex<RunControl>,
    run_changed: Condvar,
    telemetry: GuestTelemetry,
    exits: ExitCounters,
    console: Mutex<Console>,
    blocks: Vec<Mutex<VirtioMmioBlock>>,
    block_stats: Vec<Arc<BlockStats>>,
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    events: Sender<VmEvent>,
    boot_count: AtomicU64,
    vcpus: usize,
    builtin: bool,
}

impl Shared {
    fn lock_run(&self) -> MutexGuard<'_, RunControl> {
        self.run.lock().expect("run-state lock")
    }

    fn send(&self, event: VmEvent) {
        // The receiver lives as long as the supervising loop; after it ends nobody listens.
        let _ = self.events.send(event);
    }

    /// Interrupts every vCPU thread that is inside `KVM_RUN` (EINTR).
    fn kick_vcpus(&self) {
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

    fn set_state(&self, state: RunState) {
        let mut run = self.lock_run();
        run.state = state;
        self.run_changed.notify_all();
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .expect("SIGRTMIN is a valid signal for a handler");
    });
}

/// A VM built and ready to start: memory mapped, devices and vCPUs created, guest loaded.
#[derive(Debug)]
pub struct Vm {
    config: VmConfig,
    vm_fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    vcpus: Vec<VcpuFd>,
    cpuid: kvm_bindings::CpuId,
    shared: Arc<Shared>,
    events: Receiver<VmEvent>,
    kernel: Option<(Vec<u8>, Option<Vec<u8>>, String)>,
}

impl Vm {
    /// The build recipe: checks `/dev/kvm`, creates the VM, maps and registers memory,
    /// creates devices and vCPUs, and loads the guest. Nothing runs yet.
    pub fn create(config: VmConfig) -> Result<Self, VmError> {
        if config.disks.len() > MAX_DISKS {
            return Err(VmError::Config(format!(
                "at most {MAX_DISKS} disks per VM, got {}",
                config.disks.len()
            )));
        }
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "vcpus must be 1..={MAX_VCPUS}, got {}",
                config.vcpus
            )));
        }
        let kernel = match &config.boot {
            BootSource::Builtin => None,
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let read = |path: &PathBuf| {
                    fs::read(path).map_err(|source| VmError::File {
                        path: path.clone(),
                        source,
                    })
                };
                let kernel_bytes = read(kernel)?;
                let initrd_bytes = initrd.as_ref().map(read).transpose()?;
                let mut cmdline = cmdline.clone();
                for (index, irq) in VIRTIO_BLK_IRQS.iter().enumerate().take(config.disks.len()) {
                    cmdline.push_str(&format!(
                        " virtio_mmio.device=4K@{:#x}:{irq}",
                        disk_mmio_base(index)
                    ));
                }
                Some((kernel_bytes, initrd_bytes, cmdline))
            }
        };
        let builtin = kernel.is_none();
        let telemetry_epoch_start = Instant::now();

        let kvm = kvm::open_checked()?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(|source| VmError::Create {
            what: "KVM_CREATE_VM",
            source,
        })?);
        vm_fd
            .set_tss_address(TSS_ADDRESS)
            .map_err(|source| VmError::Create {
                what: "KVM_SET_TSS_ADDR",
                source,
            })?;
        let ram = Arc::new(GuestRam::new(config.memory_bytes)?);
        ram.register(&vm_fd, false)?;
        if !builtin {
            vm_fd.create_irq_chip().map_err(|source| VmError::Create {
                what: "KVM_CREATE_IRQCHIP",
                source,
            })?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm_fd.create_pit2(pit).map_err(|source| VmError::Create {
                what: "KVM_CREATE_PIT2",
                source,
            })?;
        }

        let serial_interrupt = if builtin {
            SerialInterrupt::None
        } else {
            SerialInterrupt::IrqLine(Arc::clone(&vm_fd), COM1_IRQ)
        };
        let console = Console::new(&config.console_log, serial_interrupt).map_err(|source| {
            VmError::File {
                path: config.console_log.clone(),
                source,
            }
        })?;
        let blocks: Vec<VirtioMmioBlock> = config
            .disks
            .iter()
            .zip(VIRTIO_BLK_IRQS)
            .map(|(backend, irq)| {
                let interrupt = (!builtin).then(|| {
                    let vm_fd = Arc::clone(&vm_fd);
                    Interrupt(Box::new(move || {
                        let _ = vm_fd.set_irq_line(irq, true);
                        let _ = vm_fd.set_irq_line(irq, false);
                    }))
                });
                VirtioMmioBlock::new(Arc::clone(backend), interrupt)
            })
            .collect();
        let block_stats = blocks.iter().map(VirtioMmioBlock::stats).collect();

        let (sender, events) = mpsc::channel();
        let telemetry = GuestTelemetry::new(
            usize::from(config.vcpus),
            config.tick,
            config.dirty_pages_per_second,
            ram.low_end(),
            telemetry_epoch_start,
        );
        let shared = Arc::new(Shared {
            run: Mutex::new(RunControl {
                state: RunState::Running,
                paused: 0,
            }),
            run_changed: Condvar::new(),
            telemetry,
            exits: ExitCounters::default(),
            console: Mutex::new(console),
            blocks: blocks.into_iter().map(Mutex::new).collect(),
            block_stats,
            vcpu_threads: Mutex::new(Vec::new()),
            events: sender,
            boot_count: AtomicU64::new(1),
            vcpus: usize::from(config.vcpus),
            builtin,
        });

        let cpuid = arch::supported_cpuid(&kvm)?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(|source| VmError::Create {
                    what: "KVM_CREATE_VCPU",
                    source,
                })?;
            vcpus.push(vcpu);
        }
        let vm = Self {
            config,
            vm_fd,
            ram,
            vcpus,
            cpuid,
            shared,
            events,
            kernel,
        };
        vm.load_guest(true)?;
        Ok(vm)
    }

    /// Writes the guest into memory and puts every vCPU in its boot state (first boot and
    /// every reboot). CPUID is set on the first boot only: KVM refuses to change it once a
    /// vCPU has run, and it does not change across a reboot.
    fn load_guest(&self, first_boot: bool) -> Result<(), VmError> {
        let memory = self.ram.memory();
        arch::write_gdt(memory)?;
        let count = self.config.vcpus;
        match &self.kernel {
            None => {
                arch::write_identity_page_tables(
                    memory,
                    self.ram.top().max(crate::memory::MMIO_HOLE_END),
                )?;
                memory
                    .write_slice(guest::IMAGE, GuestAddress(abi::LOAD_ADDR))
                    .map_err(|source| ArchError::GuestMemory {
                        what: "the built-in guest",
                        source,
                    })?;
                for (index, vcpu) in self.vcpus.iter().enumerate() {
                    let index = index as u64;
                    if first_boot {
                        arch::setup_cpuid(vcpu, &self.cpuid, index as u8, count)?;
                    }
                    arch::setup_long_mode_sregs(vcpu)?;
                    arch::setup_fpu(vcpu)?;
                    let stack = abi::STACK_TOP - index * abi::STACK_SIZE;
                    arch::setup_regs(vcpu, abi::LOAD_ADDR, stack, 0, index)?;
                }
            }
            Some((kernel, initrd, cmdline)) => {
                arch::write_identity_page_tables(memory, crate::memory::MMIO_HOLE_END)?;
                let entry = linux::load_from_bytes(
                    memory,
                    self.ram.size_bytes(),
                    kernel,
                    initrd.as_deref(),
                    cmdline,
                )?;
                // Linux brings up application processors itself (INIT/SIPI through the
                // in-kernel LAPIC); only the boot processor gets a register state.
                for (index, vcpu) in self.vcpus.iter().enumerate() {
                    if first_boot {
                        arch::setup_cpuid(vcpu, &self.cpuid, index as u8, count)?;
                    }
                    arch::setup_lint(vcpu)?;
                    if index == 0 {
                        arch::setup_long_mode_sregs(vcpu)?;
                        arch::setup_fpu(vcpu)?;
                        arch::setup_regs(vcpu, entry.rip, 0, entry.boot_params, 0)?;
                    } else {
                        arch::reset_application_processor(vcpu)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The VM's KVM file descriptor (for inspection, e.g. by tests).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Starts the vCPU threads.
    pub fn start(mut self) -> Result<RunningVm, VmError> {
        install_kick_handler();
        let vcpus = std::mem::take(&mut self.vcpus);
        let handles = spawn_vcpus(&self.shared, &self.ram, vcpus)?;
        let controller = Controller {
            shared: Arc::clone(&self.shared),
            vm_fd: Arc::clone(&self.vm_fd),
            ram: Arc::clone(&self.ram),
            started: Instant::now(),
            memory_bytes: self.config.memory_bytes,
        };
        Ok(RunningVm {
            vm: self,
            handles,
            controller,
        })
    }
}

fn spawn_vcpus(
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

/// The vCPU state machine: run while `Running`, wait while `Paused`, return the vCPU fd on
/// `Exiting` (so a reboot can reuse it).
fn run_vcpu(index: usize, mut vcpu: VcpuFd, shared: &Shared, ram: &GuestRam) -> VcpuFd {
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
        let terminal = match vcpu.run() {
            Ok(exit) => handle_exit(index, exit, shared, ram),
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                shared.exits.interrupted.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(error) => Some(VmEvent::Failed(format!(
                "KVM_RUN on vCPU {index} failed: {error}"
            ))),
        };
        if let Some(event) = terminal {
            let parks = matches!(
                event,
                VmEvent::Crashed(_) | VmEvent::Failed(_) | VmEvent::GuestPowerOff
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
            match block_offset(shared, address) {
                Some((block, offset)) => block.lock().expect("block lock").mmio_read(offset, data),
                None => data.fill(0),
            }
            None
        }
        VcpuExit::MmioWrite(address, data) => {
            exits.mmio_write.fetch_add(1, Ordering::Relaxed);
            if let Some((block, offset)) = block_offset(shared, address) {
                block
                    .lock()
                    .expect("block lock")
                    .mmio_write(ram.memory(), offset, data);
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

fn block_offset(shared: &Shared, address: u64) -> Option<(&Mutex<VirtioMmioBlock>, u64)> {
    let offset = address.checked_sub(abi::VIRTIO_BLK_MMIO_BASE)?;
    let block = shared
        .blocks
        .get(usize::try_from(offset / abi::VIRTIO_MMIO_SIZE).ok()?)?;
    Some((block, offset % abi::VIRTIO_MMIO_SIZE))
}

/// A started VM. [`RunningVm::wait`] supervises it until it ends.
#[derive(Debug)]
pub struct RunningVm {
    vm: Vm,
    handles: Vec<JoinHandle<VcpuFd>>,
    controller: Controller,
}

impl RunningVm {
    /// A handle to query and steer the VM from other threads.
    pub fn controller(&self) -> Controller {
        self.controller.clone()
    }

    /// Supervises the VM until it powers off, crashes or fails: handles reboots and
    /// graceful power-off, then stops and joins every vCPU thread.
    pub fn wait(self) -> VmOutcome {
        self.wait_with(|_| {})
    }

    /// [`RunningVm::wait`], calling `notify` for each [`Notification`].
    pub fn wait_with(mut self, mut notify: impl FnMut(&Notification)) -> VmOutcome {
        let shared = Arc::clone(&self.vm.shared);
        let mut power_off_deadline: Option<Instant> = None;
        let mut reboot_deadline: Option<Instant> = None;
        let outcome = loop {
            let now = Instant::now();
            if power_off_deadline.is_some_and(|deadline| now >= deadline) {
                break VmOutcome::PoweredOff {
                    by: "request (forced: the guest did not acknowledge in time)".into(),
                };
            }
            if reboot_deadline.is_some_and(|deadline| now >= deadline) {
                reboot_deadline = None;
                if let Err(outcome) = self.reboot(&mut notify) {
                    break outcome;
                }
            }
            let timeout = [power_off_deadline, reboot_deadline]
                .into_iter()
                .flatten()
                .map(|deadline| deadline.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(3600));
            let event = match self.vm.events.recv_timeout(timeout) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    break VmOutcome::Failed {
                        reason: "the event channel closed".into(),
                    };
                }
            };
            match event {
                VmEvent::FirstHeartbeat => {
                    if let Some(first) = shared.telemetry.first_heartbeat() {
                        notify(&Notification::FirstHeartbeat(first));
                    }
                }
                VmEvent::GuestPowerOff => break VmOutcome::PoweredOff { by: "guest".into() },
                VmEvent::GuestReboot => {
                    reboot_deadline = None;
                    if let Err(outcome) = self.reboot(&mut notify) {
                        break outcome;
                    }
                }
                VmEvent::Crashed(reason) => break VmOutcome::Crashed { reason },
                VmEvent::Failed(reason) => break VmOutcome::Failed { reason },
                VmEvent::RequestPowerOff { force } => {
                    if force || !shared.builtin {
                        break VmOutcome::PoweredOff {
                            by: "request".into(),
                        };
                    }
                    shared
                        .telemetry
                        .pending_command
                        .store(abi::CMD_POWER_OFF, Ordering::Release);
                    power_off_deadline
                        .get_or_insert(Instant::now() + self.vm.config.power_off_grace);
                }
                VmEvent::RequestReboot => {
                    if shared.builtin {
                        shared
                            .telemetry
                            .pending_command
                            .store(abi::CMD_REBOOT, Ordering::Release);
                        reboot_deadline
                            .get_or_insert(Instant::now() + self.vm.config.power_off_grace);
                    } else if let Err(outcome) = self.reboot(&mut notify) {
                        break outcome;
                    }
                }
            }
        };
        // Collecting the vCPUs can fail only if a thread panicked; the outcome says why.
        match self.stop_vcpus() {
            Ok(_) => outcome,
            Err(reason) => match outcome {
                VmOutcome::PoweredOff { .. } => VmOutcome::Failed { reason },
                other => other,
            },
        }
        .tap(|_| shared.console.lock().expect("console lock").flush())
    }

    /// Sets `Exiting`, kicks every vCPU out of `KVM_RUN` until its thread returns, and
    /// collects the vCPU fds.
    fn stop_vcpus(&mut self) -> Result<Vec<VcpuFd>, String> {
        let shared = &self.vm.shared;
        shared.set_state(RunState::Exiting);
        while self.handles.iter().any(|handle| !handle.is_finished()) {
            shared.kick_vcpus();
            thread::sleep(Duration::from_micros(200));
        }
        shared
            .vcpu_threads
            .lock()
            .expect("thread list lock")
            .clear();
        let mut vcpus = Vec::with_capacity(self.handles.len());
        let mut panicked = None;
        for (index, handle) in self.handles.drain(..).enumerate() {
            match handle.join() {
                Ok(vcpu) => vcpus.push(vcpu),
                Err(_) => panicked = Some(format!("vCPU {index} thread panicked")),
            }
        }
        match panicked {
            Some(reason) => Err(reason),
            None => Ok(vcpus),
        }
    }

    /// Warm reboot: stop the vCPUs, reload the guest, reset registers, start again.
    fn reboot(&mut self, notify: &mut impl FnMut(&Notification)) -> Result<(), VmOutcome> {
        let vcpus = self
            .stop_vcpus()
            .map_err(|reason| VmOutcome::Failed { reason })?;
        // Drain events of the previous boot (late heartbeats, duplicate acks).
        while self.vm.events.try_recv().is_ok() {}
        let shared = &self.vm.shared;
        shared.telemetry.reset_for_boot();
        self.vm.vcpus = vcpus;
        self.vm
            .load_guest(false)
            .map_err(|error| VmOutcome::Failed {
                reason: format!("reboot failed: {error}"),
            })?;
        let vcpus = std::mem::take(&mut self.vm.vcpus);
        self.handles =
            spawn_vcpus(shared, &self.vm.ram, vcpus).map_err(|error| VmOutcome::Failed {
                reason: format!("reboot failed: {error}"),
            })?;
        let boot = shared.boot_count.fetch_add(1, Ordering::AcqRel) + 1;
        notify(&Notification::Rebooted(boot));
        Ok(())
    }
}

trait Tap: Sized {
    fn tap(self, effect: impl FnOnce(&Self)) -> Self {
        effect(&self);
        self
    }
}

impl Tap for VmOutcome {}

/// Errors of control operations.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The operation does not apply in the VM's current state.
    #[error("cannot {operation} a VM that is {state}")]
    WrongState {
        /// What was asked.
        operation: &'static str,
        /// The state it is in.
        state: &'static str,
    },
    /// The vCPUs did not stop in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// The operation needs the built-in guest.
    #[error("{0} needs the built-in guest (cairn-guest)")]
    NeedsBuiltinGuest(&'static str),
    /// The VM has no disk.
    #[error("the VM has no block device")]
    NoDisk,
    /// Dirty-page logging failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM is no longer supervised.
    #[error("the VM is shutting down")]
    Gone,
}

/// A cloneable handle to a running VM: status, pause/resume, power-off, reboot, the
/// dirty-page rate and the dirty log. Used by the control socket and by tests.
#[derive(Debug, Clone)]
pub struct Controller {
    shared: Arc<Shared>,
    vm_fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    started: Instant,
    memory_bytes: u64,
}

impl Controller {
    /// The current run state.
    pub fn state(&self) -> RunState {
        self.shared.lock_run().state
    }

    /// A snapshot of the VM's state and counters.
    pub fn status(&self) -> VmStatus {
        let shared = &self.shared;
        let telemetry = &shared.telemetry;
        let heartbeats: Vec<u64> = telemetry
            .heartbeats
            .iter()
            .map(|counter| counter.load(Ordering::Acquire))
            .collect();
        let exits = &shared.exits;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let disks: Vec<BlockStatus> = shared
            .block_stats
            .iter()
            .map(|stats| BlockStatus {
                reads: load(&stats.reads),
                writes: load(&stats.writes),
                flushes: load(&stats.flushes),
                bytes_read: load(&stats.bytes_read),
                bytes_written: load(&stats.bytes_written),
                errors: load(&stats.errors),
            })
            .collect();
        VmStatus {
            state: self.state().name().to_string(),
            boot: if shared.builtin {
                guest::BUILTIN_NAME.to_string()
            } else {
                "linux".to_string()
            },
            vcpus: shared.vcpus as u32,
            memory_bytes: self.memory_bytes,
            guest_resident_bytes: self.ram.resident_bytes(),
            vmm_rss_bytes: process_rss_bytes(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            boot_count: shared.boot_count.load(Ordering::Acquire),
            boot_stage: telemetry.boot_stage.load(Ordering::Acquire),
            heartbeat_total: heartbeats.iter().sum(),
            heartbeats,
            last_heartbeat_age_ms: telemetry
                .heartbeat_age()
                .map(|age| age.as_secs_f64() * 1000.0),
            first_heartbeat_us: telemetry
                .first_heartbeat()
                .map(|first| first.as_micros() as u64),
            dirty_rate_pages_per_second: telemetry.dirty_rate(),
            pages_dirtied: telemetry.pages_dirtied.load(Ordering::Acquire),
            dirty_logging: self.ram.dirty_logging(),
            ksm_mergeable: self.ram.mergeable(),
            block_test: telemetry.block_test(),
            block_tests: telemetry.block_tests.load(Ordering::Acquire),
            block: disks.first().cloned(),
            disks,
            exits: ExitCounts {
                io_in: load(&exits.io_in),
                io_out: load(&exits.io_out),
                mmio_read: load(&exits.mmio_read),
                mmio_write: load(&exits.mmio_write),
                hlt: load(&exits.hlt),
                shutdown: load(&exits.shutdown),
                interrupted: load(&exits.interrupted),
                other: load(&exits.other),
            },
        }
    }

    /// Pauses every vCPU; returns once all of them are outside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), ControlError> {
        const TIMEOUT: Duration = Duration::from_secs(2);
        let shared = &self.shared;
        {
            let mut run = shared.lock_run();
            match run.state {
                RunState::Paused => return Ok(()),
                RunState::Exiting => {
                    return Err(ControlError::WrongState {
                        operation: "pause",
                        state: "exiting",
                    });
                }
                RunState::Running => {
                    run.state = RunState::Paused;
                    shared.run_changed.notify_all();
                }
            }
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            shared.kick_vcpus();
            let run = shared.lock_run();
            let (run, _) = shared
                .run_changed
                .wait_timeout_while(run, Duration::from_millis(2), |run| {
                    run.state == RunState::Paused && run.paused < shared.vcpus
                })
                .expect("run-state lock");
            if run.state != RunState::Paused {
                return Err(ControlError::WrongState {
                    operation: "pause",
                    state: run.state.name(),
                });
            }
            if run.paused == shared.vcpus {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ControlError::PauseTimeout(TIMEOUT));
            }
        }
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut run = self.shared.lock_run();
        match run.state {
            RunState::Running => Ok(()),
            RunState::Exiting => Err(ControlError::WrongState {
                operation: "resume",
                state: "exiting",
            }),
            RunState::Paused => {
                run.state = RunState::Running;
                self.shared.run_changed.notify_all();
                Ok(())
            }
        }
    }

    /// Asks for power-off: the built-in guest acknowledges within a tick (or is stopped
    /// after the grace period); `force` or a Linux guest stops at once.
    pub fn power_off(&self, force: bool) -> Result<(), ControlError> {
        self.shared
            .events
            .send(VmEvent::RequestPowerOff { force })
            .map_err(|_| ControlError::Gone)?;
        // A paused guest cannot acknowledge: let it run so the request completes. The VM
        // may already be exiting because of this very request; that is success.
        match self.resume() {
            Ok(()) | Err(ControlError::WrongState { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Asks for a reboot (acknowledged by the built-in guest, immediate for Linux).
    pub fn reboot(&self) -> Result<(), ControlError> {
        self.shared
            .events
            .send(VmEvent::RequestReboot)
            .map_err(|_| ControlError::Gone)
    }

    /// Sets the built-in guest's dirty-page rate.
    pub fn set_dirty_rate(&self, pages_per_second: u64) -> Result<(), ControlError> {
        if !self.shared.builtin {
            return Err(ControlError::NeedsBuiltinGuest("set-dirty-rate"));
        }
        self.shared.telemetry.set_dirty_rate(pages_per_second);
        Ok(())
    }

    /// Turns `KVM_MEM_LOG_DIRTY_PAGES` on or off for all guest RAM.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), ControlError> {
        self.ram.register(&self.vm_fd, on)?;
        Ok(())
    }

    /// Pages written since the last call (or since logging started); clears the log.
    pub fn take_dirty_pages(&self) -> Result<u64, ControlError> {
        Ok(self.take_dirty_bitmap()?.count())
    }

    /// Which pages were written since the last read (or since logging started); clears
    /// the log. Live migration reads this between copy rounds.
    pub fn take_dirty_bitmap(&self) -> Result<DirtyBitmap, ControlError> {
        if !self.ram.dirty_logging() {
            return Err(ControlError::WrongState {
                operation: "read the dirty log of",
                state: "not dirty-logging",
            });
        }
        Ok(self.ram.take_dirty_bitmap(&self.vm_fd)?)
    }

    /// The guest's memory, for bounds-checked reads of dirty pages (migration).
    pub fn guest_memory(&self) -> &vm_memory::GuestMemoryMmap {
        self.ram.memory()
    }

    /// Asks the built-in guest to run its block self-test again.
    pub fn block_test(&self) -> Result<(), ControlError> {
        if !self.shared.builtin {
            return Err(ControlError::NeedsBuiltinGuest("block-test"));
        }
        if self.shared.blocks.is_empty() {
            return Err(ControlError::NoDisk);
        }
        self.shared
            .telemetry
            .pending_command
            .store(abi::CMD_BLOCK_TEST, Ordering::Release);
        Ok(())
    }

    /// Makes the built-in guest crash (triple fault), to exercise crash handling.
    pub fn guest_crash(&self) -> Result<(), ControlError> {
        if !self.shared.builtin {
            return Err(ControlError::NeedsBuiltinGuest("guest-crash"));
        }
        self.shared
            .telemetry
            .pending_command
            .store(abi::CMD_CRASH, Ordering::Release);
        Ok(())
    }

    /// Waits up to `timeout` for the first heartbeat; returns the time from the start of
    /// [`Vm::create`] to it.
    pub fn wait_first_heartbeat(&self, timeout: Duration) -> Option<Duration> {
        self.shared.telemetry.wait_first_heartbeat(timeout)
    }
}

/// Resident set size of this process (`/proc/self/statm`), in bytes.
pub fn process_rss_bytes() -> u64 {
    let Ok(statm) = fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page_size.max(0) as u64
}
