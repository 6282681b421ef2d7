//! One VM: the build recipe ([`Vm::create`]) that turns a [`VmConfig`] (data, validated
//! once) into live resources — disk files, taps, kernel bytes, `/dev/kvm`, guest RAM,
//! devices, vCPUs — and the supervising loop ([`RunningVm::wait`]) that turns guest and
//! control events into a [`VmOutcome`]. The vCPU threads live in [`crate::vcpu`], the
//! handle for steering a running VM in [`crate::handle`].
//!
//! Architecture invariant: vCPU threads never decide the VM's fate themselves; they
//! report [`VmEvent`]s to the one supervising loop ([`RunningVm::wait`]), which alone
//! stops, reboots or ends the VM. A vCPU that reported a terminal event parks until it
//! is told to exit, so no thread touches the VM after the outcome is decided.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_config::{BootSource, VmConfig, VmConfigError};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::{self, ArchError};
use crate::devices::block::{BlockBackend, FileBackend};
use crate::devices::nbd_client::NbdBackend;
use crate::devices::ports::GuestTelemetry;
use crate::devices::serial::{COM1_IRQ, Console, SerialInterrupt};
use crate::devices::virtio::Interrupt;
use crate::devices::virtio_blk::VirtioMmioBlock;
use crate::devices::virtio_net::{Delivery, MAX_FRAME, VirtioMmioNet, open_tap};
use crate::exit_code;
use crate::guest::{self, abi};
use crate::kvm::{self, KvmError};
use crate::linux::{self, LinuxError};
use crate::memory::{GuestRam, MemoryError};
use crate::mptable::{self, MpTableError};
use crate::vcpu::{ExitCounters, NetSlot, RunControl, Shared, install_kick_handler, spawn_vcpus};

pub use crate::handle::{ControlError, VmHandle, process_rss_bytes};
pub use crate::vcpu::RunState;

/// Most vCPUs a VM may have (the built-in guest's stack layout has room for 64).
pub const MAX_VCPUS: u8 = 64;
/// ISA interrupt lines of the virtio-blk devices for Linux guests, in disk order (4 is
/// COM1, 8 the RTC, 12 and 13 are left to PS/2 and the FPU by convention).
pub const VIRTIO_BLK_IRQS: [u32; 8] = [5, 6, 7, 9, 10, 11, 14, 15];
/// ISA interrupt line of the first virtio-blk device.
pub const VIRTIO_BLK_IRQ: u32 = VIRTIO_BLK_IRQS[0];
/// Most disks a VM may have.
pub const MAX_DISKS: usize = VIRTIO_BLK_IRQS.len();

/// Interrupt lines of the virtio-net devices for Linux guests, in NIC order (I/O APIC
/// pins above the ISA range; the MP table routes 0..=23).
pub const VIRTIO_NET_IRQS: [u32; 8] = [16, 17, 18, 19, 20, 21, 22, 23];
/// Most network devices a VM may have.
pub const MAX_NICS: usize = VIRTIO_NET_IRQS.len();

/// Guest-physical base of the virtio-MMIO window of NIC `index` (one 4 KiB window each,
/// from `VIRTIO_NET_MMIO_BASE` on, after the disks' windows; the built-in guest uses NIC 0).
pub fn nic_mmio_base(index: usize) -> u64 {
    abi::VIRTIO_NET_MMIO_BASE + index as u64 * abi::VIRTIO_MMIO_SIZE
}

/// Guest-physical base of the virtio-MMIO window of disk `index` (one 4 KiB window each,
/// from `VIRTIO_BLK_MMIO_BASE` on; the built-in guest uses disk 0).
pub fn disk_mmio_base(index: usize) -> u64 {
    abi::VIRTIO_BLK_MMIO_BASE + index as u64 * abi::VIRTIO_MMIO_SIZE
}
/// Guest-physical address of the TSS region KVM needs on Intel hosts.
const TSS_ADDRESS: usize = 0xfffb_d000;

// `vm_config::limits` is the table the compiler and the node check against; these are
// the VMM's own reasons for it, and the build fails if the two ever disagree.
const _: () = {
    assert!(vm_config::limits::VCPUS.max == MAX_VCPUS as u64);
    assert!(vm_config::limits::LINUX_VCPUS.max == mptable::MAX_CPUS as u64);
    assert!(vm_config::limits::DISKS.max == MAX_DISKS as u64);
    assert!(vm_config::limits::NICS.max == MAX_NICS as u64);
    assert!(vm_config::limits::MEMORY.min >= crate::memory::MIN_MEMORY_BYTES);
    assert!(
        vm_config::limits::MEMORY
            .granularity
            .is_multiple_of(crate::memory::PAGE_SIZE)
    );
};

/// Errors of building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is unusable.
    #[error("invalid VM configuration")]
    Config(#[from] VmConfigError),
    /// A disk could not be opened.
    #[error("cannot open the disk {path}")]
    Disk {
        /// The disk's path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A NIC's tap could not be attached.
    #[error(
        "cannot attach to the tap {tap} (the tap must exist in this network namespace, and attaching needs CAP_NET_ADMIN or the tap's owner)"
    )]
    Tap {
        /// The tap's name.
        tap: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
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
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
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
            Self::Config(_)
            | Self::Linux(_)
            | Self::File { .. }
            | Self::Disk { .. }
            | Self::Tap { .. } => exit_code::USAGE,
            Self::Kvm(_)
            | Self::Memory(_)
            | Self::Arch(_)
            | Self::MpTable(_)
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
    /// The fence deadline lapsed without a renewal: the VM stopped itself.
    Fenced {
        /// How late the vCPUs were stopped, after the deadline.
        reason: String,
    },
    /// The VM was live-migrated and the move committed: it runs at the destination.
    Migrated {
        /// The destination's address.
        to: String,
    },
}

impl VmOutcome {
    /// The process exit status for this outcome ([`exit_code`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::PoweredOff { .. } | Self::Migrated { .. } => exit_code::STOPPED,
            Self::Crashed { .. } => exit_code::GUEST_CRASHED,
            Self::Failed { .. } => exit_code::VMM_FAILED,
            Self::Fenced { .. } => exit_code::FENCED,
        }
    }

    /// Short name: `stopped`, `crashed` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PoweredOff { .. } => "stopped",
            Self::Crashed { .. } => "crashed",
            Self::Failed { .. } => "failed",
            Self::Fenced { .. } => "fenced",
            Self::Migrated { .. } => "migrated",
        }
    }

    /// Human-readable detail.
    pub fn detail(&self) -> &str {
        match self {
            Self::PoweredOff { by } => by,
            Self::Crashed { reason } | Self::Failed { reason } | Self::Fenced { reason } => reason,
            Self::Migrated { to } => to,
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
    /// The fence deadline lapsed ([`crate::fence`]).
    Fenced,
    /// Migration: stop the vCPUs for the switch-over, drain and flush block I/O, save
    /// the state (answered through [`crate::migration::MigrationCell`]).
    MigrationFreeze,
    /// Migration: start the stopped vCPUs again (the migration failed or was aborted).
    MigrationResume,
    /// Migration: the commander committed; the VM runs at this destination now.
    MigrationCommitted(String),
    /// Fault tolerance: stop the vCPUs for a checkpoint and save the state, without
    /// flushing the disks (the secondary's copy is the durable one; answered through
    /// the migration cell like [`VmEvent::MigrationFreeze`]).
    CheckpointFreeze,
}

/// Something the supervising loop reports to its caller (the binary prints them).
#[derive(Debug, Clone, PartialEq)]
pub enum Notification {
    /// The first heartbeat arrived this long after [`Vm::create`] began.
    FirstHeartbeat(Duration),
    /// The VM rebooted; this is boot number `n` (the first boot is 1).
    Rebooted(u64),
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
    /// The [`crate::state::SAVED_MSRS`] this host's KVM supports.
    msr_indices: Vec<u32>,
}

impl Vm {
    /// The build recipe, the one place a [`VmConfig`] becomes a VM: validates it (once,
    /// here), opens its disks and taps and reads its kernel and initrd (so every
    /// configuration and file problem is a usage error before KVM is touched), then
    /// checks `/dev/kvm`, creates the VM, maps and registers memory, creates devices and
    /// vCPUs, and loads the guest. Nothing runs yet.
    pub fn create(config: VmConfig) -> Result<Self, VmError> {
        Self::build(config, false)
    }

    /// [`Vm::create`] for the destination of a live migration (`cairn-vmm --incoming`):
    /// the same VM — memory, devices, vCPUs with their CPUID — but no guest loaded and
    /// its vCPUs paused: memory and state come from the source ([`crate::migration`]).
    pub fn create_incoming(config: VmConfig) -> Result<Self, VmError> {
        Self::build(config, true)
    }

    fn build(config: VmConfig, incoming: bool) -> Result<Self, VmError> {
        config.validate()?;
        for file in [&config.console_log, &config.control_socket] {
            if let Some(directory) = file.parent() {
                fs::create_dir_all(directory).map_err(|source| VmError::File {
                    path: directory.to_path_buf(),
                    source,
                })?;
            }
        }
        // Shared by the vCPUs, the NICs and the NBD disks (which stop reconnecting
        // once it lapses).
        let fence = Arc::new(crate::fence::Fence::default());
        if config.fence_deadline_boottime_ns != 0 {
            // Armed from the start (the node's quorum end at spawn).
            let _ = fence.set(config.fence_deadline_boottime_ns);
        }
        let open_disk = |disk: &vm_config::DiskConfig| -> Result<Arc<dyn BlockBackend>, VmError> {
            let opened: std::io::Result<Arc<dyn BlockBackend>> = match &disk.nbd_export {
                Some(export) => NbdBackend::connect(&disk.path, export, disk.read_only)
                    .map(|d| Arc::new(d.with_fence(Arc::clone(&fence))) as _),
                None => FileBackend::open(&disk.path, disk.read_only).map(|d| Arc::new(d) as _),
            };
            opened.map_err(|source| VmError::Disk {
                path: disk.path.clone(),
                source,
            })
        };
        // Every disk behind its write journal: fault tolerance records the writes of
        // each epoch there (nothing is recorded otherwise) and a secondary writes its
        // checkpoints through it ([`crate::ft`]).
        let disk_journals: Vec<Arc<crate::ft::DiskJournal>> = config
            .disks
            .iter()
            .map(|disk| open_disk(disk).map(|opened| Arc::new(crate::ft::DiskJournal::new(opened))))
            .collect::<Result<_, _>>()?;
        let disks: Vec<Arc<dyn BlockBackend>> = disk_journals
            .iter()
            .map(|journal| Arc::clone(journal) as Arc<dyn BlockBackend>)
            .collect();
        let taps: Vec<Arc<fs::File>> = config
            .nics
            .iter()
            .map(|nic| {
                open_tap(&nic.tap)
                    .map(Arc::new)
                    .map_err(|source| VmError::Tap {
                        tap: nic.tap.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        let kernel = match &config.boot {
            BootSource::Builtin { .. } => None,
            BootSource::Kernel {
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
                // Each virtio-MMIO window (disks, then NICs) is announced to Linux on
                // the command line with its interrupt line.
                let disks = (0..disks.len()).map(|i| (disk_mmio_base(i), VIRTIO_BLK_IRQS[i]));
                let nics = (0..taps.len()).map(|i| (nic_mmio_base(i), VIRTIO_NET_IRQS[i]));
                for (base, irq) in disks.chain(nics) {
                    cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
                }
                Some((kernel_bytes, initrd_bytes, cmdline))
            }
        };
        // Validated: at most MAX_VCPUS (64), so it fits.
        let vcpu_count = config.vcpus as u8;
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
        let blocks: Vec<VirtioMmioBlock> = disks
            .iter()
            .zip(VIRTIO_BLK_IRQS)
            .map(|(backend, irq)| {
                let interrupt = (!builtin).then(|| line_interrupt(&vm_fd, irq));
                VirtioMmioBlock::new(Arc::clone(backend), interrupt)
            })
            .collect();
        let block_stats = blocks.iter().map(VirtioMmioBlock::stats).collect();
        let ft = crate::ft::FtCell::default();
        let nets: Vec<NetSlot> = config
            .nics
            .iter()
            .zip(taps)
            .zip(VIRTIO_NET_IRQS)
            .map(|((nic, tap), irq)| {
                let interrupt = (!builtin).then(|| line_interrupt(&vm_fd, irq));
                let device = VirtioMmioNet::new(Arc::clone(&tap), nic.mac.0, interrupt)
                    .with_fence(Arc::clone(&fence))
                    .with_gate(Arc::clone(&ft.gate));
                NetSlot {
                    stats: device.stats(),
                    device: Mutex::new(device),
                    rx_ready: Condvar::new(),
                    tap,
                    tap_name: nic.tap.clone(),
                    tap_reattached: AtomicU64::new(0),
                    mac: nic.mac.0,
                }
            })
            .collect();

        let (sender, events) = mpsc::channel();
        let mut telemetry = GuestTelemetry::new(
            usize::from(vcpu_count),
            Duration::from_millis(config.tick_ms),
            config.dirty_pages_per_second,
            ram.low_end(),
            telemetry_epoch_start,
        );
        if let Some(address) = config.nics.first().and_then(|nic| nic.ipv4) {
            telemetry = telemetry.with_net_ipv4(address);
        }
        let shared = Arc::new(Shared {
            run: Mutex::new(RunControl {
                state: if incoming {
                    RunState::Paused
                } else {
                    RunState::Running
                },
                paused: 0,
            }),
            run_changed: Condvar::new(),
            telemetry,
            exits: ExitCounters::default(),
            console: Mutex::new(console),
            blocks: blocks.into_iter().map(Mutex::new).collect(),
            block_stats,
            nets,
            pumps_stop: AtomicBool::new(false),
            fence,
            heartbeat_log: config
                .control_socket
                .parent()
                .and_then(|dir| crate::heartbeat_log::HeartbeatLog::create(dir).ok()),
            vcpu_threads: Mutex::new(Vec::new()),
            events: sender,
            boot_count: AtomicU64::new(1),
            vcpus: usize::from(vcpu_count),
            builtin,
            migration: crate::migration::MigrationCell::default(),
            ft,
            disk_journals,
        });

        let cpuid = arch::supported_cpuid(&kvm)?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|list| {
                crate::state::SAVED_MSRS
                    .into_iter()
                    .filter(|index| list.as_slice().contains(index))
                    .collect()
            })
            .map_err(|source| VmError::Create {
                what: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?;
        let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
        for index in 0..vcpu_count {
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
            msr_indices,
        };
        if incoming {
            // Before the control socket is served: it answers `incoming` from the start.
            let _ = vm.shared.migration.begin(crate::control::MigrationStatus {
                role: "destination".into(),
                phase: "incoming".into(),
                memory_bytes: vm.config.memory_bytes,
                ..Default::default()
            });
            for (index, vcpu) in vm.vcpus.iter().enumerate() {
                arch::setup_cpuid(vcpu, &vm.cpuid, index as u8, vcpu_count)?;
            }
        } else {
            vm.load_guest(true)?;
        }
        Ok(vm)
    }

    /// Saves the state of the stopped VM (its vCPU fds are here, not in threads):
    /// completes each vCPU's pending I/O, then saves vCPUs, in-kernel devices and the
    /// emulated devices ([`crate::state`]).
    pub fn save_state(&mut self) -> Result<crate::state::VmState, String> {
        self.save_state_with(true)
    }

    /// [`Vm::save_state`]; `complete_io` false for vCPUs that never ran (the destination
    /// saving again what it restored: it has no pending I/O, and a first `KVM_RUN` there
    /// costs time on some hosts).
    fn save_state_with(&mut self, complete_io: bool) -> Result<crate::state::VmState, String> {
        let irqchip = !self.shared.builtin;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (index, vcpu) in self.vcpus.iter_mut().enumerate() {
            if complete_io {
                crate::state::complete_pending_io(vcpu);
            }
            vcpus.push(
                crate::state::VcpuState::save(vcpu, index, &self.msr_indices, irqchip)
                    .map_err(|error| error_chain(&error))?,
            );
        }
        let (irqchip_state, pit, clock) = crate::state::save_vm_devices(&self.vm_fd, irqchip)
            .map_err(|error| error_chain(&error))?;
        let shared = &self.shared;
        let virtio = |transport| crate::state::VirtioDeviceState {
            version: crate::state::STATE_VERSION,
            transport,
        };
        Ok(crate::state::VmState {
            version: crate::state::STATE_VERSION,
            vcpus,
            irqchip: irqchip_state,
            pit,
            clock,
            serial: shared.console.lock().expect("console lock").save_state(),
            ports: shared.telemetry.save_state(),
            blocks: shared
                .blocks
                .iter()
                .map(|block| virtio(block.lock().expect("block lock").save_state()))
                .collect(),
            nets: shared
                .nets
                .iter()
                .map(|net| virtio(net.device.lock().expect("net lock").save_state()))
                .collect(),
            boot_count: shared.boot_count.load(Ordering::Acquire),
        })
    }

    /// Restores a saved state into this VM, which must not have run (the destination
    /// of a migration, built by [`Vm::create_incoming`]).
    pub fn restore_state(&mut self, state: &crate::state::VmState) -> Result<(), String> {
        let shared = &self.shared;
        let mismatch = |what: &str, theirs: usize, ours: usize| {
            format!("the state has {theirs} {what}, this VM {ours}")
        };
        if state.vcpus.len() != self.vcpus.len() {
            return Err(mismatch("vCPUs", state.vcpus.len(), self.vcpus.len()));
        }
        if state.blocks.len() != shared.blocks.len() {
            return Err(mismatch("disks", state.blocks.len(), shared.blocks.len()));
        }
        if state.nets.len() != shared.nets.len() {
            return Err(mismatch("NICs", state.nets.len(), shared.nets.len()));
        }
        if state.irqchip.is_some() == shared.builtin {
            return Err(
                "the state's interrupt controller does not match this VM's guest kind".into(),
            );
        }
        crate::state::restore_vm_devices(&self.vm_fd, state)
            .map_err(|error| error_chain(&error))?;
        for (index, (vcpu, saved)) in self.vcpus.iter().zip(&state.vcpus).enumerate() {
            saved
                .restore(vcpu, index)
                .map_err(|error| error_chain(&error))?;
        }
        shared
            .console
            .lock()
            .expect("console lock")
            .restore_state(&state.serial)?;
        shared.telemetry.restore_state(&state.ports)?;
        for (block, saved) in shared.blocks.iter().zip(&state.blocks) {
            block
                .lock()
                .expect("block lock")
                .restore_state(&saved.transport)?;
        }
        for (net, saved) in shared.nets.iter().zip(&state.nets) {
            net.device
                .lock()
                .expect("net lock")
                .restore_state(&saved.transport)?;
        }
        shared.boot_count.store(state.boot_count, Ordering::Release);
        Ok(())
    }

    /// A handle on this VM before it starts (the destination of a migration serves its
    /// control socket while it receives).
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: Arc::clone(&self.shared),
            vm_fd: Arc::clone(&self.vm_fd),
            ram: Arc::clone(&self.ram),
            started: Instant::now(),
            console_log: self.config.console_log.clone(),
            name: self.config.name.clone(),
            incarnation: self.config.incarnation.clone(),
        }
    }

    /// What a migration's source and destination compare before memory moves.
    pub fn migration_hello(&self) -> crate::migration::Hello {
        crate::migration::Hello {
            protocol: crate::migration::PROTOCOL_VERSION,
            memory_bytes: self.config.memory_bytes,
            vcpus: self.config.vcpus,
            disks: self.config.disks.len() as u32,
            nics: self.config.nics.len() as u32,
            builtin: self.shared.builtin,
        }
    }

    /// [`Vm::create`] for a fault-tolerance secondary (`cairn-vmm --ft-secondary`):
    /// built like a migration's destination (no guest loaded, vCPUs paused), its memory,
    /// disks and state come from the primary's checkpoints ([`crate::ft`]).
    pub fn create_ft_secondary(config: VmConfig) -> Result<Self, VmError> {
        let vm = Self::build(config, true)?;
        vm.shared.migration.clear();
        crate::ft::begin_secondary(&vm.handle());
        Ok(vm)
    }

    /// Runs as a fault-tolerance secondary on `listener` until the commander promotes
    /// it ([`crate::ft::run_secondary`]); then restores the last complete checkpoint
    /// into this VM, which the caller starts. An error: stopped, or nothing to resume.
    pub fn run_ft_secondary(&mut self, listener: &std::net::TcpListener) -> Result<(), String> {
        let listener = listener
            .try_clone()
            .map_err(|error| format!("listening socket: {error}"))?;
        let state = crate::ft::run_secondary(&self.handle(), listener)?;
        self.restore_state(&state)
            .map_err(|error| format!("restoring the checkpoint: {error}"))
    }

    /// Receives a live migration on `listener` ([`crate::migration::receive`]): memory,
    /// then state, then the commander's decision.
    pub fn receive_migration(
        &mut self,
        listener: &std::net::TcpListener,
    ) -> Result<(crate::migration::Decision, Option<std::net::TcpStream>), String> {
        // The cell's status began in `create_incoming`, before the socket was served.
        let result = crate::migration::receive(self, listener);
        let phase = match &result {
            Ok((crate::migration::Decision::Commit, _)) => "committed",
            Ok((crate::migration::Decision::Abort, _)) => "aborted",
            Err(_) => "failed",
        };
        let error = result.as_ref().err().cloned();
        self.shared.migration.update(|status| {
            status.phase = phase.into();
            status.error = error;
        });
        self.shared.migration.end();
        result
    }

    /// Writes the guest into memory and puts every vCPU in its boot state (first boot and
    /// every reboot). CPUID is set on the first boot only: KVM refuses to change it once a
    /// vCPU has run, and it does not change across a reboot.
    fn load_guest(&self, first_boot: bool) -> Result<(), VmError> {
        let memory = self.ram.memory();
        // A network device keeps receiving while nothing runs: forget the previous
        // boot's queues so no frame lands in memory the new boot has not offered.
        for net in &self.shared.nets {
            net.device.lock().expect("net lock").reset();
        }
        arch::write_gdt(memory)?;
        // Validated in `create`: at most MAX_VCPUS (64).
        let count = self.config.vcpus as u8;
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
                mptable::write(memory, count)?;
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

    /// How long a graceful power-off or reboot waits for the built-in guest.
    fn power_off_grace(&self) -> Duration {
        Duration::from_millis(self.config.power_off_grace_ms)
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The VM's KVM file descriptor (for inspection, e.g. by tests).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// After a live migration, before the guest runs here: each NIC announces itself
    /// on its tap ([`crate::devices::virtio_net::announcement`]: a gratuitous ARP with
    /// the guest's address where the config names one, else a RARP for its MAC), so the
    /// bridge and the neighbours find the VM on this node at once. Returns how many
    /// frames left (none once the fence lapsed).
    pub fn announce_nics(&self) -> usize {
        if self.shared.fence.lapsed() {
            return 0;
        }
        let mut sent = 0;
        for (slot, nic) in self.shared.nets.iter().zip(&self.config.nics) {
            let frame = crate::devices::virtio_net::announcement(
                slot.mac,
                nic.ipv4.map(|address| address.octets()),
            );
            if io::Write::write(&mut &*slot.tap, &frame).is_ok() {
                sent += 1;
            }
        }
        sent
    }

    /// Starts the vCPU threads.
    pub fn start(mut self) -> Result<RunningVm, VmError> {
        install_kick_handler();
        let vcpus = std::mem::take(&mut self.vcpus);
        let handles = spawn_vcpus(&self.shared, &self.ram, vcpus)?;
        for index in 0..self.shared.nets.len() {
            let shared = Arc::clone(&self.shared);
            let ram = Arc::clone(&self.ram);
            thread::Builder::new()
                .name(format!("net{index}-rx"))
                .spawn(move || receive_pump(&shared, &ram, index))
                .map_err(VmError::Thread)?;
        }
        {
            let shared = Arc::clone(&self.shared);
            thread::Builder::new()
                .name("fence".into())
                .spawn(move || fence_watch(&shared))
                .map_err(VmError::Thread)?;
        }
        let handle = self.handle();
        Ok(RunningVm {
            vm: self,
            vcpu_threads: handles,
            handle,
        })
    }
}

/// A started VM. [`RunningVm::wait`] supervises it until it ends.
#[derive(Debug)]
pub struct RunningVm {
    vm: Vm,
    vcpu_threads: Vec<JoinHandle<VcpuFd>>,
    handle: VmHandle,
}

impl Drop for RunningVm {
    /// However the VM ends (waited for or dropped), its receive pumps stop with it.
    fn drop(&mut self) {
        self.vm.shared.pumps_stop.store(true, Ordering::Release);
    }
}

impl crate::migration::DestinationVm for Vm {
    fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn cell(&self) -> &crate::migration::MigrationCell {
        &self.shared.migration
    }

    fn hello(&self) -> crate::migration::Hello {
        self.migration_hello()
    }

    fn restore(&mut self, state: &crate::state::VmState) -> Result<(), String> {
        self.restore_state(state)
    }

    fn resave(&mut self) -> Result<crate::state::VmState, String> {
        self.save_state_with(false)
    }
}

impl RunningVm {
    /// A handle to query and steer the VM from other threads.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
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
                VmEvent::Fenced => {
                    let late = shared
                        .fence
                        .lapsed_at_ns()
                        .zip(shared.fence.deadline_ns())
                        .map_or(0, |(at, deadline)| at.saturating_sub(deadline));
                    break VmOutcome::Fenced {
                        reason: format!(
                            "the fence deadline lapsed without a renewal (noticed {:.1} ms after it); vCPUs stopped, {} frames dropped at the tap",
                            late as f64 / 1e6,
                            shared.fence.frames_dropped()
                        ),
                    };
                }
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
                    power_off_deadline.get_or_insert(Instant::now() + self.vm.power_off_grace());
                }
                VmEvent::MigrationFreeze => {
                    let result = self.freeze_for_migration(true);
                    shared.migration.set_freeze(result);
                }
                VmEvent::CheckpointFreeze => {
                    let result = self.freeze_for_migration(false);
                    shared.migration.set_freeze(result);
                }
                VmEvent::MigrationResume => {
                    let result = self.resume_after_migration();
                    shared.migration.set_resume(result);
                }
                VmEvent::MigrationCommitted(to) => break VmOutcome::Migrated { to },
                VmEvent::RequestReboot => {
                    if shared.builtin {
                        shared
                            .telemetry
                            .pending_command
                            .store(abi::CMD_REBOOT, Ordering::Release);
                        reboot_deadline.get_or_insert(Instant::now() + self.vm.power_off_grace());
                    } else if let Err(outcome) = self.reboot(&mut notify) {
                        break outcome;
                    }
                }
            }
        };
        // Collecting the vCPUs can fail only if a thread panicked; the outcome says why.
        let outcome = match self.stop_vcpus() {
            Ok(_) => outcome,
            Err(reason) => match outcome {
                VmOutcome::PoweredOff { .. } => VmOutcome::Failed { reason },
                other => other,
            },
        };
        // A panicked vCPU may have poisoned the lock; the console is still worth flushing.
        let mut console = shared
            .console
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        console.flush();
        outcome
    }

    /// Sets `Exiting`, kicks every vCPU out of `KVM_RUN` until its thread returns, and
    /// collects the vCPU fds.
    fn stop_vcpus(&mut self) -> Result<Vec<VcpuFd>, String> {
        let shared = &self.vm.shared;
        shared.set_state(RunState::Exiting);
        while self.vcpu_threads.iter().any(|handle| !handle.is_finished()) {
            shared.kick_vcpus();
            thread::sleep(Duration::from_micros(200));
        }
        shared
            .vcpu_threads
            .lock()
            .expect("thread list lock")
            .clear();
        let mut vcpus = Vec::with_capacity(self.vcpu_threads.len());
        let mut panicked = None;
        for (index, handle) in self.vcpu_threads.drain(..).enumerate() {
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

    /// Migration's switch-over on the source: stops the vCPU threads (a block request
    /// completes inside the exit that issued it, so once every vCPU thread has returned
    /// none is in flight), waits out a receive delivery in progress, flushes every disk,
    /// and saves the state. The vCPU fds stay here until a resume or the end. A
    /// checkpoint of fault tolerance does not `flush` (its writes are made durable on
    /// the secondary's copy).
    fn freeze_for_migration(&mut self, flush: bool) -> Result<crate::state::VmState, String> {
        if !self.vm.vcpus.is_empty() {
            return Err("the vCPUs are already stopped".into());
        }
        let vcpus = self.stop_vcpus()?;
        self.vm.vcpus = vcpus;
        let shared = &self.vm.shared;
        for net in &shared.nets {
            // A delivery that began while the vCPUs ran finishes under this lock; the
            // pump checks the run state under it, so none begins after.
            drop(net.device.lock().expect("net lock"));
        }
        for (index, block) in shared.blocks.iter().enumerate().filter(|_| flush) {
            block
                .lock()
                .expect("block lock")
                .flush_backend()
                .map_err(|error| format!("flushing disk {index}: {error}"))?;
        }
        self.vm.save_state()
    }

    /// Starts the vCPUs stopped by [`RunningVm::freeze_for_migration`] again.
    fn resume_after_migration(&mut self) -> Result<(), String> {
        if self.vm.vcpus.is_empty() {
            return Ok(());
        }
        let vcpus = std::mem::take(&mut self.vm.vcpus);
        self.vcpu_threads = spawn_vcpus(&self.vm.shared, &self.vm.ram, vcpus)
            .map_err(|error| format!("restarting the vCPUs: {error}"))?;
        // A checkpoint pauses the VM every epoch: what arrived meanwhile goes in now.
        self.vm.shared.wake_receive_pumps();
        Ok(())
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
        self.vcpu_threads =
            spawn_vcpus(shared, &self.vm.ram, vcpus).map_err(|error| VmOutcome::Failed {
                reason: format!("reboot failed: {error}"),
            })?;
        let boot = shared.boot_count.fetch_add(1, Ordering::AcqRel) + 1;
        notify(&Notification::Rebooted(boot));
        Ok(())
    }
}

/// An error and its sources, one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// An interrupt that pulses ISA/I/O APIC line `irq` (edge) on the in-kernel irqchip.
fn line_interrupt(vm_fd: &Arc<VmFd>, irq: u32) -> Interrupt {
    let vm_fd = Arc::clone(vm_fd);
    Interrupt(Box::new(move || {
        let _ = vm_fd.set_irq_line(irq, true);
        let _ = vm_fd.set_irq_line(irq, false);
    }))
}

/// How long the receive pump sleeps in one wait, so it notices the VM ending.
const PUMP_POLL: Duration = Duration::from_millis(100);

/// The receive side of NIC `index`: reads a frame from its tap when it has none held,
/// and hands it to the device while the VM runs, waiting for the driver to post a
/// buffer when none is free (the tap's queue holds what arrives meanwhile). Writes no
/// guest memory while the vCPUs are paused or a reboot is under way. Ends when the VM
/// does ([`Shared::pumps_stop`]).
fn receive_pump(shared: &Shared, ram: &GuestRam, index: usize) {
    let slot = &shared.nets[index];
    let mut tap = Arc::clone(&slot.tap);
    let mut buffer = vec![0u8; MAX_FRAME];
    let mut held: Option<usize> = None;
    while !shared.pumps_stop.load(Ordering::Acquire) {
        let length = match held {
            Some(length) => length,
            None => {
                let mut poll = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&*tap),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `poll` is one valid pollfd that outlives the call.
                let ready = unsafe { libc::poll(&mut poll, 1, PUMP_POLL.as_millis() as i32) };
                if ready <= 0 {
                    continue;
                }
                match io::Read::read(&mut &*tap, &mut buffer) {
                    Ok(length) => length,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        // The tap was deleted under us (EBADFD). When the node makes
                        // it again (its repair), attach to the new one: the guest
                        // keeps its device and traffic resumes.
                        thread::sleep(PUMP_POLL);
                        if let Ok(reopened) = open_tap(&slot.tap_name) {
                            tap = Arc::new(reopened);
                            slot.tap_reattached.fetch_add(1, Ordering::Relaxed);
                            slot.device
                                .lock()
                                .expect("net lock")
                                .set_tap(Arc::clone(&tap));
                        }
                        continue;
                    }
                }
            }
        };
        // The run state is read under the device lock, so a migration's freeze, which
        // takes this lock after stopping the vCPUs, knows no delivery follows it.
        let mut device = slot.device.lock().expect("net lock");
        let running = shared.lock_run().state == RunState::Running;
        if !running {
            held = Some(length);
            drop(
                slot.rx_ready
                    .wait_timeout(device, PUMP_POLL)
                    .expect("net lock"),
            );
            continue;
        }
        match device.deliver(ram.memory(), &buffer[..length]) {
            Delivery::Delivered | Delivery::Dropped => held = None,
            Delivery::NoBuffer => {
                held = Some(length);
                drop(
                    slot.rx_ready
                        .wait_timeout(device, PUMP_POLL)
                        .expect("net lock"),
                );
            }
        }
    }
}

/// Waits for the fence deadline ([`crate::fence`]); when it lapses, kicks every vCPU
/// out of `KVM_RUN` (each then sees the lapse before it enters again) and ends the VM.
/// Returns when the VM ends for another reason.
fn fence_watch(shared: &Shared) {
    let ended = || shared.pumps_stop.load(Ordering::Acquire);
    if shared.fence.wait_lapse(ended, Duration::from_millis(500)) {
        shared.kick_vcpus();
        shared.send(VmEvent::Fenced);
    }
}
