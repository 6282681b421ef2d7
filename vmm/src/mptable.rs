//! The Intel MultiProcessor Specification 1.4 table, so a Linux guest without ACPI finds
//! its application processors, the I/O APIC and the ISA interrupt routing.
//!
//! Layout: the MP floating pointer structure at [`MPTABLE_START`] (the last KiB below
//! 640 KiB, which Linux scans and the e820 map leaves out of RAM), the configuration
//! table right after it: one processor entry per vCPU (APIC ID = vCPU index, vCPU 0
//! the boot processor), an ISA bus, one I/O APIC (ID = vCPU count, at 0xfec00000), ISA
//! IRQs 0..=23 routed 1:1 to I/O APIC pins, LINT0 as ExtINT and LINT1 as NMI.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Guest-physical address of the MP floating pointer structure (639 KiB).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of the area the table may use (640 KiB).
pub const MPTABLE_END: u64 = 0xa0000;
/// Local APIC base address.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// I/O APIC base address.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Highest ISA/I/O APIC interrupt routed.
pub const IRQ_MAX: u8 = 23;
/// Most vCPUs whose entries fit below 640 KiB.
pub const MAX_CPUS: u8 = 32;

const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;
const SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IO_APIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IO_APIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;

/// Errors of writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More vCPUs than the table has room for.
    #[error("the MP table has room for {MAX_CPUS} vCPUs, the VM has {0}")]
    TooManyCpus(u8),
    /// Writing into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// The bytes of the floating pointer structure followed by the configuration table for
/// `cpus` vCPUs, to be placed at [`MPTABLE_START`] (pure, tested).
pub fn mptable_bytes(cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let table_address = MPTABLE_START as u32 + FLOATING_POINTER_SIZE as u32;
    let io_apic_id = cpus;

    let mut entries = Vec::new();
    for cpu in 0..cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu); // local APIC ID
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 });
        entries.extend_from_slice(&0x0600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x0201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.push(ENTRY_IO_APIC);
    entries.push(io_apic_id);
    entries.push(IO_APIC_VERSION);
    entries.push(1); // enabled
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    for irq in 0..=IRQ_MAX {
        // type, interrupt type, flags (u16, conforming), source bus, source IRQ,
        // destination I/O APIC, destination pin.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INTERRUPT_INT,
            0,
            0,
            0,
            irq,
            io_apic_id,
            irq,
        ]);
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INTERRUPT_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INTERRUPT_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(cpus) + 1 + 1 + u16::from(IRQ_MAX) + 1 + 2;
    debug_assert_eq!(
        entries.len(),
        usize::from(cpus) * PROCESSOR_ENTRY_SIZE
            + usize::from(entry_count - u16::from(cpus)) * SMALL_ENTRY_SIZE
    );

    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_SIZE + entries.len()) as u16).to_le_bytes());
    header.push(SPEC_REVISION);
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"CAIRN   ");
    header.extend_from_slice(b"cairn-vmm   ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    debug_assert_eq!(header.len(), HEADER_SIZE);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_SIZE);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_address.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(SPEC_REVISION);
    floating.push(0); // checksum, filled below
    floating.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    floating[10] = checksum(&floating);

    let mut bytes = floating;
    bytes.extend_from_slice(&table);
    debug_assert!(MPTABLE_START + bytes.len() as u64 <= MPTABLE_END);
    Ok(bytes)
}

/// The byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

/// Writes the MP table for `cpus` vCPUs at [`MPTABLE_START`].
pub fn write(memory: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = mptable_bytes(cpus)?;
    memory
        .write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte))
    }

    #[test]
    fn both_structures_checksum_to_zero_and_point_at_each_other() {
        for cpus in [1, 2, 7, MAX_CPUS] {
            let bytes = mptable_bytes(cpus).expect("table");
            let (floating, table) = bytes.split_at(FLOATING_POINTER_SIZE);
            assert_eq!(&floating[..4], b"_MP_");
            assert_eq!(sum(floating), 0, "floating pointer checksum, {cpus} cpus");
            let pointer = u32::from_le_bytes(floating[4..8].try_into().expect("4 bytes"));
            assert_eq!(
                u64::from(pointer),
                MPTABLE_START + FLOATING_POINTER_SIZE as u64
            );
            assert_eq!(&table[..4], b"PCMP");
            let length = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(length, table.len());
            assert_eq!(sum(table), 0, "configuration table checksum, {cpus} cpus");
            assert!(
                MPTABLE_START + bytes.len() as u64 <= MPTABLE_END,
                "fits below 640 KiB"
            );
        }
    }

    #[test]
    fn every_vcpu_has_an_enabled_processor_entry_and_only_vcpu_0_boots() {
        let bytes = mptable_bytes(4).expect("table");
        let table = &bytes[FLOATING_POINTER_SIZE..];
        let entry_count = u16::from_le_bytes([table[34], table[35]]);
        let mut offset = HEADER_SIZE;
        let mut processors = Vec::new();
        let mut kinds = [0usize; 5];
        for _ in 0..entry_count {
            let kind = table[offset];
            kinds[kind as usize] += 1;
            if kind == ENTRY_PROCESSOR {
                processors.push((table[offset + 1], table[offset + 3]));
                offset += PROCESSOR_ENTRY_SIZE;
            } else {
                offset += SMALL_ENTRY_SIZE;
            }
        }
        assert_eq!(offset, table.len(), "entry_count matches the entries");
        assert_eq!(processors, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(kinds, [4, 1, 1, usize::from(IRQ_MAX) + 1, 2]);
    }

    #[test]
    fn vcpu_counts_outside_the_table_are_refused() {
        assert!(matches!(
            mptable_bytes(0),
            Err(MpTableError::TooManyCpus(0))
        ));
        assert!(matches!(
            mptable_bytes(MAX_CPUS + 1),
            Err(MpTableError::TooManyCpus(_))
        ));
    }
}
