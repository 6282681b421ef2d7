//! A VM's saved state as versioned serializable values, in the manner of Firecracker's
//! `persist.rs` and cloud-hypervisor's `vm-migration` snapshots: one value per vCPU
//! ([`VcpuState`]), one per in-kernel device (irqchip, PIT, KVM clock) and one per
//! emulated device (virtio transports and queues, the serial port, the cairn-guest port
//! interface), gathered in [`VmState`]. Live migration ([`crate::migration`]) sends it
//! after the last memory round; the destination restores it into a VM created without
//! loading a guest.
//!
//! Every value carries a `version`; a VMM refuses a version it does not read, naming
//! it, rather than misreading it. The KVM structures are serialized by kvm-bindings'
//! `serde` feature (their bytes), so a value saved, restored and saved again gives the
//! same bytes except where KVM itself moves time on (see [`VmState::without_clocks`]).
//!
//! Architecture invariant: state is saved only from stopped vCPUs whose pending I/O
//! was completed (`KVM_RUN` with `immediate_exit`, see [`complete_pending_io`]) and
//! after every in-flight block request finished; restore happens before any vCPU of the
//! destination has run.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::ports::PortsState;
use crate::devices::serial::ConsoleState;
use crate::devices::virtio::TransportState;

/// The format version of every value of this module this VMM writes and reads.
pub const STATE_VERSION: u16 = 1;

/// `MSR_IA32_TSC`: the guest's time-stamp counter (moves on by itself).
pub const MSR_IA32_TSC: u32 = 0x10;

/// The MSRs saved per vCPU, when the host's KVM lists them (`KVM_GET_MSR_INDEX_LIST`):
/// SYSENTER, the syscall MSRs, the kernel GS base, TSC and TSC_AUX, PAT, MISC_ENABLE,
/// the MTRR default type, the TSC deadline, and KVM's paravirtual MSRs (kvmclock,
/// async page faults, steal time, PV EOI). EFER and the APIC base are in the sregs.
pub const SAVED_MSRS: [u32; 18] = [
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    MSR_IA32_TSC,
    0xc000_0103, // TSC_AUX
    0x277,       // PAT
    0x1a0,       // MISC_ENABLE
    0x2ff,       // MTRR default type
    0x6e0,       // TSC_DEADLINE
    0x4b56_4d00, // KVM wall clock (new)
    0x4b56_4d01, // KVM system time (new)
    0x4b56_4d02, // KVM async PF
    0x4b56_4d03, // KVM steal time
];

/// Errors of saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which ioctl (and vCPU).
        what: String,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The state does not fit this VM or this VMM.
    #[error("the saved state does not fit: {0}")]
    Mismatch(String),
}

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    let what = what.into();
    move |source| StateError::Kvm { what, source }
}

/// One vCPU's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u16,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state (`KVM_GET_XSAVE`, the legacy 4 KiB area, as its 1024 words).
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The in-kernel local APIC (only with an in-kernel irqchip: Linux guests).
    pub lapic: Option<kvm_lapic_state>,
    /// Run state (running, halted, waiting for INIT/SIPI).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// `(index, value)` of the [`SAVED_MSRS`] the host supports.
    pub msrs: Vec<(u32, u64)>,
}

/// Completes the I/O a vCPU's last exit left pending (an `in` whose value KVM copies
/// into RAX on the next entry, an MMIO read): `KVM_RUN` with `immediate_exit` set does
/// that and returns at once. Without it the saved registers would miss the value.
pub fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    // EINTR is the expected answer; anything else surfaces in the state reads below.
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

impl VcpuState {
    /// Saves a stopped vCPU. `msr_indices` are the [`SAVED_MSRS`] the host supports;
    /// `lapic` whether the VM has an in-kernel irqchip.
    pub fn save(
        vcpu: &VcpuFd,
        index: usize,
        msr_indices: &[u32],
        lapic: bool,
    ) -> Result<Self, StateError> {
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|error| StateError::Mismatch(format!("MSR list: {error:?}")))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm(format!("KVM_GET_MSRS on vCPU {index}")))?;
        if read != entries.len() {
            return Err(StateError::Mismatch(format!(
                "vCPU {index}: KVM read {read} of {} MSRs (stopped at {:#x})",
                entries.len(),
                entries[read].index
            )));
        }
        Ok(Self {
            version: STATE_VERSION,
            regs: vcpu
                .get_regs()
                .map_err(kvm(format!("KVM_GET_REGS on vCPU {index}")))?,
            sregs: vcpu
                .get_sregs()
                .map_err(kvm(format!("KVM_GET_SREGS on vCPU {index}")))?,
            xsave: vcpu
                .get_xsave()
                .map_err(kvm(format!("KVM_GET_XSAVE on vCPU {index}")))?
                .region
                .to_vec(),
            xcrs: vcpu
                .get_xcrs()
                .map_err(kvm(format!("KVM_GET_XCRS on vCPU {index}")))?,
            debug_regs: vcpu
                .get_debug_regs()
                .map_err(kvm(format!("KVM_GET_DEBUGREGS on vCPU {index}")))?,
            lapic: lapic
                .then(|| vcpu.get_lapic())
                .transpose()
                .map_err(kvm(format!("KVM_GET_LAPIC on vCPU {index}")))?,
            mp_state: vcpu
                .get_mp_state()
                .map_err(kvm(format!("KVM_GET_MP_STATE on vCPU {index}")))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm(format!("KVM_GET_VCPU_EVENTS on vCPU {index}")))?,
            msrs: msrs
                .as_slice()
                .iter()
                .map(|entry| (entry.index, entry.data))
                .collect(),
        })
    }

    /// Restores into a vCPU that has not run (its CPUID already set). The order follows
    /// what KVM needs: sregs (APIC base, EFER) before the LAPIC, MSRs after the sregs,
    /// events and MP state last.
    pub fn restore(&self, vcpu: &VcpuFd, index: usize) -> Result<(), StateError> {
        if self.version != STATE_VERSION {
            return Err(StateError::Mismatch(format!(
                "vCPU {index} state version {} (this VMM reads {STATE_VERSION})",
                self.version
            )));
        }
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm(format!("KVM_SET_SREGS on vCPU {index}")))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm(format!("KVM_SET_REGS on vCPU {index}")))?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(kvm(format!("KVM_SET_XCRS on vCPU {index}")))?;
        let mut xsave = kvm_xsave::default();
        if self.xsave.len() != xsave.region.len() {
            return Err(StateError::Mismatch(format!(
                "vCPU {index}: an XSAVE area of {} words (KVM's legacy area has {})",
                self.xsave.len(),
                xsave.region.len()
            )));
        }
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: the area is the legacy 4 KiB `kvm_xsave` that KVM_GET_XSAVE filled on
        // the source; this VMM never enables dynamic XSAVE features (AMX), so KVM needs
        // no larger buffer (KVM_CAP_XSAVE2) for this vCPU.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm(format!("KVM_SET_XSAVE on vCPU {index}")))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm(format!("KVM_SET_DEBUGREGS on vCPU {index}")))?;
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic)
                .map_err(kvm(format!("KVM_SET_LAPIC on vCPU {index}")))?;
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|error| StateError::Mismatch(format!("MSR list: {error:?}")))?;
        let written = vcpu
            .set_msrs(&msrs)
            .map_err(kvm(format!("KVM_SET_MSRS on vCPU {index}")))?;
        if written != entries.len() {
            return Err(StateError::Mismatch(format!(
                "vCPU {index}: KVM took {written} of {} MSRs (refused {:#x})",
                entries.len(),
                entries[written].index
            )));
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm(format!("KVM_SET_VCPU_EVENTS on vCPU {index}")))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm(format!("KVM_SET_MP_STATE on vCPU {index}")))?;
        Ok(())
    }
}

/// The in-kernel interrupt controllers (Linux guests): both 8259 PICs and the I/O APIC.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u16,
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The I/O APIC.
    pub ioapic: kvm_irqchip,
}

/// The in-kernel i8254 PIT (Linux guests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PitState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u16,
    /// Its three channels and flags.
    pub pit: kvm_pit_state2,
}

/// The VM's KVM clock (kvmclock's time base).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClockState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u16,
    /// `KVM_GET_CLOCK` at the save.
    pub clock: kvm_clock_data,
}

/// The saved state of one virtio device (block or net): its MMIO transport and queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u16,
    /// Registers and queues.
    pub transport: TransportState,
}

/// Everything but guest memory: what the destination needs to run the VM on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u16,
    /// The vCPUs, by index.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel irqchip (Linux guests only).
    pub irqchip: Option<IrqchipState>,
    /// The PIT (Linux guests only).
    pub pit: Option<PitState>,
    /// The KVM clock.
    pub clock: ClockState,
    /// The 16550 UART.
    pub serial: ConsoleState,
    /// The cairn-guest port interface.
    pub ports: PortsState,
    /// The virtio-blk devices, in disk order.
    pub blocks: Vec<VirtioDeviceState>,
    /// The virtio-net devices, in NIC order.
    pub nets: Vec<VirtioDeviceState>,
    /// Boots so far (the destination continues the count: a migration is no reboot).
    pub boot_count: u64,
}

impl VmState {
    /// A copy with the fields that KVM moves on by itself between a save and the next
    /// (time, not state) set to zero: the KVM clock's value, realtime and host TSC, the
    /// PIT channels' load times, each vCPU's TSC MSR and its LAPIC's current-count
    /// register. Everything else of a restored VM saves to the same bytes; the tests
    /// compare these copies.
    pub fn without_clocks(&self) -> Self {
        let mut state = self.clone();
        state.clock.clock.clock = 0;
        state.clock.clock.realtime = 0;
        state.clock.clock.host_tsc = 0;
        if let Some(pit) = &mut state.pit {
            for channel in &mut pit.pit.channels {
                channel.count_load_time = 0;
            }
        }
        for vcpu in &mut state.vcpus {
            for (index, value) in &mut vcpu.msrs {
                if *index == MSR_IA32_TSC {
                    *value = 0;
                }
            }
            if let Some(lapic) = &mut vcpu.lapic {
                // APIC_TMCCT, the timer's current count, is computed at each read.
                for byte in &mut lapic.regs[0x390..0x394] {
                    *byte = 0;
                }
            }
        }
        state
    }
}

/// Saves the VM-level in-kernel devices: irqchip and PIT when `irqchip`, and the clock.
pub fn save_vm_devices(
    vm: &VmFd,
    irqchip: bool,
) -> Result<(Option<IrqchipState>, Option<PitState>, ClockState), StateError> {
    let chip = |id: u32, what: &'static str| -> Result<kvm_irqchip, StateError> {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(kvm(what))?;
        Ok(chip)
    };
    let (irqchip_state, pit) = if irqchip {
        (
            Some(IrqchipState {
                version: STATE_VERSION,
                pic_master: chip(KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
                pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
                ioapic: chip(KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (I/O APIC)")?,
            }),
            Some(PitState {
                version: STATE_VERSION,
                pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            }),
        )
    } else {
        (None, None)
    };
    let clock = ClockState {
        version: STATE_VERSION,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    };
    Ok((irqchip_state, pit, clock))
}

/// Restores the VM-level in-kernel devices saved by [`save_vm_devices`].
pub fn restore_vm_devices(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    for (version, what) in [
        (state.version, "VM"),
        (state.clock.version, "clock"),
        (
            state.irqchip.as_ref().map_or(STATE_VERSION, |c| c.version),
            "irqchip",
        ),
        (
            state.pit.as_ref().map_or(STATE_VERSION, |p| p.version),
            "PIT",
        ),
    ] {
        if version != STATE_VERSION {
            return Err(StateError::Mismatch(format!(
                "{what} state version {version} (this VMM reads {STATE_VERSION})"
            )));
        }
    }
    if let Some(chips) = &state.irqchip {
        vm.set_irqchip(&chips.pic_master)
            .map_err(kvm("KVM_SET_IRQCHIP (PIC master)"))?;
        vm.set_irqchip(&chips.pic_slave)
            .map_err(kvm("KVM_SET_IRQCHIP (PIC slave)"))?;
        vm.set_irqchip(&chips.ioapic)
            .map_err(kvm("KVM_SET_IRQCHIP (I/O APIC)"))?;
    }
    if let Some(pit) = &state.pit {
        vm.set_pit2(&pit.pit).map_err(kvm("KVM_SET_PIT2"))?;
    }
    // Only the clock value is set: KVM refuses flags it did not produce itself here
    // (KVM_CLOCK_REALTIME would ask it to add the time elapsed since the save, which
    // a pre-copy migration does not want: the guest was paused meanwhile).
    let clock = kvm_clock_data {
        clock: state.clock.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}
