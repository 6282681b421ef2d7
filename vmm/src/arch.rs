//! x86_64 CPU and memory setup shared by both boot paths: the GDT, identity-mapped page
//! tables, long-mode special registers, general registers, FPU state and CPUID.
//!
//! Both guests are entered directly in 64-bit long mode (no real-mode firmware): PVM
//! runs guests only in long mode, and Linux's 64-bit boot protocol expects exactly this
//! state (paging on, identity map, flat `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18).

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use crate::guest::abi;

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = abi::GDT_ADDR;
/// Guest-physical address of the (empty) IDT, right after the GDT.
pub const IDT_ADDR: u64 = GDT_ADDR + 8 * GDT_ENTRIES.len() as u64;
/// Guest-physical address of the PML4 (the value of CR3).
pub const PML4_ADDR: u64 = abi::PML4_ADDR;
/// Guest-physical address of the single PDPT.
pub const PDPT_ADDR: u64 = abi::PDPT_ADDR;
/// Guest-physical address of the first page directory.
pub const PD_ADDR: u64 = abi::PD_ADDR;
/// The most page directories the layout has room for (each maps 1 GiB with 2 MiB pages).
pub const PD_MAX_COUNT: u64 = abi::PD_MAX_COUNT;
/// Code segment selector (`__BOOT_CS` of the Linux boot protocol).
pub const BOOT_CS: u16 = 0x10;
/// Data segment selector (`__BOOT_DS` of the Linux boot protocol).
pub const BOOT_DS: u16 = 0x18;
/// Task register selector.
pub const BOOT_TSS: u16 = 0x20;

/// The GDT: null, null, 64-bit code, data, TSS (flags in the Intel SDM's descriptor layout).
pub const GDT_ENTRIES: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL 0, execute/read, long mode, 4 KiB granular
    gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL 0, read/write, 32-bit, 4 KiB granular
    gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
];

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors of CPU and memory setup.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU ioctl failed.
    #[error("{what} failed")]
    Vcpu {
        /// Which ioctl.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Packs a segment descriptor from `flags` (access byte and flags nibble as in the SDM,
/// `0xF0FF` positions), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes descriptor `entry` into the `kvm_segment` KVM wants, with selector `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = (entry >> 55) & 1;
    kvm_segment {
        base,
        limit: if granular == 1 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT into guest memory.
pub fn write_gdt(memory: &GuestMemoryMmap) -> Result<(), ArchError> {
    for (index, entry) in GDT_ENTRIES.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(GDT_ADDR + 8 * index as u64))
            .map_err(|source| ArchError::GuestMemory {
                what: "the GDT",
                source,
            })?;
    }
    memory
        .write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|source| ArchError::GuestMemory {
            what: "the IDT",
            source,
        })
}

/// Writes identity-mapped 4-level page tables covering `[0, map_bytes)` with 2 MiB pages
/// (rounded up to whole GiB, at most [`PD_MAX_COUNT`] GiB). Returns the bytes mapped.
pub fn write_identity_page_tables(
    memory: &GuestMemoryMmap,
    map_bytes: u64,
) -> Result<u64, ArchError> {
    let gib = map_bytes.div_ceil(1 << 30).clamp(1, PD_MAX_COUNT);
    let write = |value: u64, address: u64| {
        memory
            .write_obj(value, GuestAddress(address))
            .map_err(|source| ArchError::GuestMemory {
                what: "page tables",
                source,
            })
    };
    // Present | writable for the upper levels; present | writable | page-size for 2 MiB pages.
    write(PDPT_ADDR | 0x03, PML4_ADDR)?;
    for directory in 0..gib {
        write(
            (PD_ADDR + directory * 0x1000) | 0x03,
            PDPT_ADDR + directory * 8,
        )?;
        for entry in 0..512u64 {
            let physical = (directory << 30) | (entry << 21);
            write(physical | 0x83, PD_ADDR + directory * 0x1000 + entry * 8)?;
        }
    }
    Ok(gib << 30)
}

/// Puts `vcpu` into 64-bit long mode with paging on (CR3 = [`PML4_ADDR`]) and the flat
/// segments of [`GDT_ENTRIES`].
pub fn setup_long_mode_sregs(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|source| ArchError::Vcpu {
        what: "KVM_GET_SREGS",
        source,
    })?;
    long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(|source| ArchError::Vcpu {
        what: "KVM_SET_SREGS",
        source,
    })
}

/// Edits `sregs` into the long-mode state (pure, so it can be tested without KVM).
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment_from_gdt(GDT_ENTRIES[2], BOOT_CS);
    let data = segment_from_gdt(GDT_ENTRIES[3], BOOT_DS);
    let tss = segment_from_gdt(GDT_ENTRIES[4], BOOT_TSS);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (8 * GDT_ENTRIES.len() - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Sets the general registers: entry point, stack, `rsi` and `rdi` (the two argument
/// registers both boot paths use), interrupts off.
pub fn setup_regs(vcpu: &VcpuFd, rip: u64, rsp: u64, rsi: u64, rdi: u64) -> Result<(), ArchError> {
    let regs = kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        rsi,
        rdi,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|source| ArchError::Vcpu {
        what: "KVM_SET_REGS",
        source,
    })
}

/// Sets the x87/SSE control words to their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| ArchError::Vcpu {
        what: "KVM_SET_FPU",
        source,
    })
}

/// Offset of the local APIC's LVT LINT0 register.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the local APIC's LVT LINT1 register.
pub const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Wires the local APIC's LINT0 to the 8259 PIC (ExtINT) and LINT1 to NMI, the "virtual
/// wire" mode a PC firmware leaves behind and Linux expects without an MP table.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let mut lapic = vcpu.get_lapic().map_err(|source| ArchError::Vcpu {
        what: "KVM_GET_LAPIC",
        source,
    })?;
    virtual_wire_lint(&mut lapic.regs);
    vcpu.set_lapic(&lapic).map_err(|source| ArchError::Vcpu {
        what: "KVM_SET_LAPIC",
        source,
    })
}

/// Edits raw LAPIC registers into virtual-wire mode (pure, tested).
pub fn virtual_wire_lint(regs: &mut [libc::c_char; 1024]) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut bytes = [0u8; 4];
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte = regs[offset + index] as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (index, byte) in value.to_le_bytes().iter().enumerate() {
            regs[offset + index] = *byte as libc::c_char;
        }
    }
}

/// Puts an application processor back into wait-for-SIPI (for Linux reboots).
pub fn reset_application_processor(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let state = kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
    };
    vcpu.set_mp_state(state).map_err(|source| ArchError::Vcpu {
        what: "KVM_SET_MP_STATE",
        source,
    })
}

/// The host-supported CPUID, read once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, ArchError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| ArchError::Vcpu {
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })
}

/// Adapts the supported CPUID for vCPU `index` of `count` (APIC IDs, topology leaves,
/// the hypervisor bit) and sets it.
pub fn setup_cpuid(
    vcpu: &VcpuFd,
    supported: &CpuId,
    index: u8,
    count: u8,
) -> Result<(), ArchError> {
    let mut cpuid = supported.clone();
    patch_cpuid(&mut cpuid, index, count);
    vcpu.set_cpuid2(&cpuid).map_err(|source| ArchError::Vcpu {
        what: "KVM_SET_CPUID2",
        source,
    })
}

/// The per-vCPU CPUID edits (pure, tested).
pub fn patch_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors; ECX[31] hypervisor.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                entry.ecx |= 1 << 31;
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: the logical processor count is valid
                }
            }
            0xb | 0x1f => {
                // x2APIC topology: EDX holds this CPU's x2APIC ID in every sub-leaf.
                entry.edx = u32::from(index);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment_from_gdt(GDT_ENTRIES[2], BOOT_CS);
        assert_eq!(
            (
                code.base,
                code.limit,
                code.l,
                code.db,
                code.present,
                code.dpl,
                code.s
            ),
            (0, 0xffff_ffff, 1, 0, 1, 0, 1)
        );
        assert_eq!(code.type_, 0xb);
        let data = segment_from_gdt(GDT_ENTRIES[3], BOOT_DS);
        assert_eq!(
            (data.base, data.limit, data.l, data.db, data.type_),
            (0, 0xffff_ffff, 0, 1, 3)
        );
        let null = segment_from_gdt(GDT_ENTRIES[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn boot_selectors_match_the_linux_boot_protocol() {
        // Documentation/arch/x86/boot.rst: __BOOT_CS = 0x10, __BOOT_DS = 0x18.
        assert_eq!(BOOT_CS, 0x10);
        assert_eq!(BOOT_DS, 0x18);
        assert_eq!(GDT_ENTRIES[(BOOT_CS / 8) as usize] >> 40 & 0xff, 0x9b);
        assert_eq!(GDT_ENTRIES[(BOOT_DS / 8) as usize] >> 40 & 0xff, 0x93);
    }

    #[test]
    fn long_mode_sregs_turn_on_paging_pae_and_lma() {
        let mut sregs = kvm_sregs::default();
        long_mode_sregs(&mut sregs);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_eq!(sregs.cs.selector, BOOT_CS);
        assert_eq!(sregs.gdt.limit as usize, 8 * GDT_ENTRIES.len() - 1);
    }

    #[test]
    fn page_tables_identity_map_with_2_mib_pages() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("map");
        let mapped = write_identity_page_tables(&memory, 5 << 30).expect("write");
        assert_eq!(mapped, 5 << 30);
        let pml4: u64 = memory.read_obj(GuestAddress(PML4_ADDR)).expect("read");
        assert_eq!(pml4, PDPT_ADDR | 3);
        for gib in 0..5u64 {
            let pdpte: u64 = memory
                .read_obj(GuestAddress(PDPT_ADDR + gib * 8))
                .expect("read");
            assert_eq!(pdpte, (PD_ADDR + gib * 0x1000) | 3);
        }
        let unmapped: u64 = memory
            .read_obj(GuestAddress(PDPT_ADDR + 5 * 8))
            .expect("read");
        assert_eq!(unmapped, 0);
        // The 2 MiB page covering 3 GiB + 4 MiB maps to itself.
        let pde: u64 = memory
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 2 * 8))
            .expect("read");
        assert_eq!(pde, ((3 << 30) + (4 << 20)) | 0x83);
        // The page tables stay below the built-in guest's virtqueue area.
        const { assert!(PD_ADDR + PD_MAX_COUNT * 0x1000 <= abi::VQ_DESC_ADDR) };
    }

    #[test]
    fn lint_registers_are_set_to_virtual_wire() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0] = 0x30; // a vector that must survive
        regs[APIC_LVT0 + 1] = 0x01; // a delivery mode that must be replaced
        regs[APIC_LVT1 + 2] = 0x01; // the mask bit (16) must survive
        virtual_wire_lint(&mut regs);
        let read = |offset: usize| {
            u32::from_le_bytes([0, 1, 2, 3].map(|index| regs[offset + index] as u8))
        };
        assert_eq!(read(APIC_LVT0), 0x0730);
        assert_eq!(read(APIC_LVT1), 0x1_0400);
    }

    #[test]
    fn cpuid_carries_apic_id_and_hypervisor_bit() {
        let mut cpuid = CpuId::new(2).expect("cpuid");
        cpuid.as_mut_slice()[0] = kvm_cpuid_entry2 {
            function: 1,
            ebx: 0xff00_0800,
            ..Default::default()
        };
        cpuid.as_mut_slice()[1] = kvm_cpuid_entry2 {
            function: 0xb,
            index: 1,
            edx: 99,
            ..Default::default()
        };
        patch_cpuid(&mut cpuid, 3, 4);
        let leaf1 = cpuid.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        assert_eq!(cpuid.as_slice()[1].edx, 3);
    }
}
