//! The Linux boot path: a bzImage, an optional initrd and a command line, entered through
//! the 64-bit boot protocol (Documentation/arch/x86/boot.rst) with linux-loader.
//!
//! Guest-physical layout: zero page at [`ZERO_PAGE_ADDR`], command line at
//! [`CMDLINE_ADDR`], the protected-mode kernel at [`KERNEL_LOAD_ADDR`] (1 MiB), the initrd
//! page-aligned at the top of low RAM (below the MMIO hole and `initrd_addr_max`), page
//! tables and GDT shared with the built-in guest ([`crate::arch`]). The vCPU starts at
//! `kernel + 0x200` (`startup_64`) with `rsi` pointing at the zero page.
//!
//! Proven here by unit tests against the boot protocol; booting a real kernel needs
//! hardware KVM (see [`crate::kvm::HostKvm::linux_unbootable_reason`]).

use std::io::{Cursor, Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{Cmdline, KernelLoader, bzimage::BzImage, load_cmdline};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use crate::memory::{MMIO_HOLE_END, ram_ranges};

/// Guest-physical address of the zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Guest-physical address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// The most command-line bytes this layout has room for (up to the next structure).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Where the protected-mode kernel is loaded (1 MiB, the protocol's default).
pub const KERNEL_LOAD_ADDR: u64 = 0x10_0000;
/// Offset of the 64-bit entry point (`startup_64`) from the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Start of the Extended BIOS Data Area: RAM below it is usable in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;

/// Errors of the Linux boot path.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// linux-loader refused the kernel image.
    #[error("cannot load the kernel (is it an x86_64 bzImage?)")]
    Kernel(#[source] linux_loader::loader::Error),
    /// The kernel has no 64-bit entry point.
    #[error(
        "the kernel has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64); boot protocol 2.12+ bzImage needed"
    )]
    No64BitEntry,
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit below the kernel's limit.
    #[error(
        "the initrd of {size} bytes does not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
        /// Highest address the initrd may end at.
        limit: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write the {what} into guest memory")]
    GuestMemory {
        /// What was written.
        what: &'static str,
    },
}

/// Where the kernel was placed and how to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    /// Entry point (`startup_64`).
    pub rip: u64,
    /// Zero page address, passed in `rsi`.
    pub boot_params: u64,
    /// End of the loaded kernel image.
    pub kernel_end: u64,
    /// Initrd address and size, when there is one.
    pub initrd: Option<(u64, u64)>,
}

/// The e820 map for `ram_bytes` of RAM: low RAM below the EBDA, RAM from 1 MiB to the end
/// of low RAM, and RAM above 4 GiB when the guest has more than fits below the hole.
pub fn e820_map(ram_bytes: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    for (start, length) in ram_ranges(ram_bytes) {
        let start = start.max(KERNEL_LOAD_ADDR);
        let end = if start >= MMIO_HOLE_END {
            start + length
        } else {
            length
        };
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Fills the zero page from the kernel's setup header (pure, so it can be tested).
pub fn boot_params_for(
    header: setup_header,
    ram_bytes: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.code32_start = KERNEL_LOAD_ADDR as u32;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00; // end of the real-mode heap, as the protocol suggests
    if let Some((address, size)) = initrd {
        params.hdr.ramdisk_image = address as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (address >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820_map(ram_bytes);
    params.e820_entries = map.len() as u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        *slot = entry;
    }
    params
}

/// Where the initrd goes: page-aligned, as high as possible below both the end of low RAM
/// and the kernel's `initrd_addr_max`, and above the kernel.
pub fn initrd_address(
    size: u64,
    low_ram_end: u64,
    initrd_addr_max: u32,
    kernel_end: u64,
) -> Result<u64, LinuxError> {
    // Protocols before 2.03 leave initrd_addr_max 0: the limit is then 0x37ffffff.
    let max = if initrd_addr_max == 0 {
        0x37ff_ffff
    } else {
        u64::from(initrd_addr_max)
    };
    let limit = low_ram_end.min(max + 1);
    let too_large = LinuxError::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or(too_large)? & !0xfff;
    if start < kernel_end.next_multiple_of(0x1000) {
        return Err(LinuxError::InitrdTooLarge {
            size,
            kernel_end,
            limit,
        });
    }
    Ok(start)
}

/// Loads `kernel` (bzImage bytes or file), `initrd` and `cmdline` into `memory` of
/// `ram_bytes` and writes the zero page. Page tables and GDT are the caller's
/// ([`crate::arch`]).
pub fn load<K: Read + Seek + vm_memory::ReadVolatile>(
    memory: &GuestMemoryMmap,
    ram_bytes: u64,
    kernel: &mut K,
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<LinuxEntry, LinuxError> {
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(|_| LinuxError::Kernel(linux_loader::loader::Error::InvalidKernelStartAddress))?;
    let loaded = BzImage::load(
        memory,
        Some(GuestAddress(KERNEL_LOAD_ADDR)),
        kernel,
        Some(GuestAddress(KERNEL_LOAD_ADDR)),
    )
    .map_err(LinuxError::Kernel)?;
    let header = loaded
        .setup_header
        .expect("bzImage loading yields the setup header");
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxError::No64BitEntry);
    }

    // The kernel's own limit on the command line, when it states one (protocol 2.06+).
    let kernel_limit = if header.cmdline_size == 0 {
        255
    } else {
        header.cmdline_size as usize
    };
    let capacity = kernel_limit.min(CMDLINE_MAX_SIZE - 1) + 1;
    let parsed = Cmdline::try_from(cmdline, capacity)
        .map_err(|error| LinuxError::Cmdline(error.to_string()))?;
    load_cmdline(memory, GuestAddress(CMDLINE_ADDR), &parsed).map_err(|_| {
        LinuxError::GuestMemory {
            what: "command line",
        }
    })?;

    let low_ram_end = ram_ranges(ram_bytes)[0].1;
    let initrd = match initrd {
        None => None,
        Some(bytes) => {
            let size = bytes.len() as u64;
            let address =
                initrd_address(size, low_ram_end, header.initrd_addr_max, loaded.kernel_end)?;
            memory
                .write_slice(bytes, GuestAddress(address))
                .map_err(|_| LinuxError::GuestMemory { what: "initrd" })?;
            Some((address, size))
        }
    };

    let params = boot_params_for(header, ram_bytes, cmdline.len(), initrd);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        memory,
    )
    .map_err(|_| LinuxError::GuestMemory { what: "zero page" })?;
    Ok(LinuxEntry {
        rip: KERNEL_LOAD_ADDR + ENTRY_64_OFFSET,
        boot_params: ZERO_PAGE_ADDR,
        kernel_end: loaded.kernel_end,
        initrd,
    })
}

/// [`load`] from kernel bytes in memory.
pub fn load_from_bytes(
    memory: &GuestMemoryMmap,
    ram_bytes: u64,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<LinuxEntry, LinuxError> {
    load(memory, ram_bytes, &mut Cursor::new(kernel), initrd, cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::ByteValued;

    const SETUP_SECTS: u8 = 4;
    const PAYLOAD: usize = 256 * 1024;

    /// A minimal bzImage as the boot protocol describes it: boot sector + setup sectors
    /// with the setup header at 0x1f1, then the protected-mode payload.
    fn fake_bzimage(
        version: u16,
        xloadflags: u16,
        cmdline_size: u32,
        initrd_addr_max: u32,
    ) -> Vec<u8> {
        let setup = (usize::from(SETUP_SECTS) + 1) * 512;
        let mut image = vec![0u8; setup + PAYLOAD];
        image[0x1f1] = SETUP_SECTS;
        image[0x1fe..0x200].copy_from_slice(&KERNEL_BOOT_FLAG_MAGIC.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        image[0x211] = 0x01; // LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&(KERNEL_LOAD_ADDR as u32).to_le_bytes());
        image[0x22c..0x230].copy_from_slice(&initrd_addr_max.to_le_bytes());
        image[0x230..0x234].copy_from_slice(&0x0100_0000u32.to_le_bytes()); // kernel_alignment
        image[0x234] = 1; // relocatable
        image[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        image[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
        for (index, byte) in image[setup..].iter_mut().enumerate() {
            *byte = (index % 251) as u8;
        }
        image
    }

    fn memory(bytes: u64) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(bytes)
            .into_iter()
            .map(|(start, length)| (GuestAddress(start), length as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("memory")
    }

    fn zero_page(memory: &GuestMemoryMmap) -> boot_params {
        let mut params = boot_params::default();
        memory
            .read_slice(params.as_mut_slice(), GuestAddress(ZERO_PAGE_ADDR))
            .expect("zero page");
        params
    }

    /// One boot: load a fake kernel and return what the guest would see.
    fn check_boot(
        ram: u64,
        initrd: Option<&[u8]>,
        cmdline: &str,
    ) -> (GuestMemoryMmap, LinuxEntry, boot_params) {
        let memory = memory(ram);
        let image = fake_bzimage(0x020f, 0x3, 2048, 0x7fff_ffff);
        let entry = load_from_bytes(&memory, ram, &image, initrd, cmdline).expect("load");
        let params = zero_page(&memory);
        (memory, entry, params)
    }

    #[test]
    fn kernel_payload_lands_at_1_mib_and_entry_is_startup_64() {
        let (memory, entry, _) = check_boot(256 << 20, None, "console=ttyS0");
        assert_eq!(entry.rip, 0x10_0200);
        assert_eq!(entry.boot_params, ZERO_PAGE_ADDR);
        assert_eq!(entry.kernel_end, KERNEL_LOAD_ADDR + PAYLOAD as u64);
        let mut loaded = vec![0u8; PAYLOAD];
        memory
            .read_slice(&mut loaded, GuestAddress(KERNEL_LOAD_ADDR))
            .expect("kernel");
        assert!(
            loaded
                .iter()
                .enumerate()
                .all(|(index, byte)| *byte == (index % 251) as u8)
        );
    }

    #[test]
    fn zero_page_carries_the_boot_protocol_fields() {
        let (_, _, params) = check_boot(256 << 20, None, "console=ttyS0 quiet");
        let header = params.hdr;
        assert_eq!({ header.boot_flag }, 0xaa55);
        assert_eq!({ header.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ header.type_of_loader }, 0xff);
        assert_eq!({ header.version }, 0x020f);
        assert_eq!({ header.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ header.cmdline_size }, "console=ttyS0 quiet".len() as u32);
        assert_eq!({ header.code32_start }, KERNEL_LOAD_ADDR as u32);
        assert_eq!(header.loadflags & 0x01, 0x01, "LOADED_HIGH kept");
        assert_eq!(header.loadflags & CAN_USE_HEAP, CAN_USE_HEAP);
        assert_eq!({ header.ramdisk_image }, 0);
        assert_eq!({ header.ramdisk_size }, 0);
    }

    #[test]
    fn command_line_is_nul_terminated_at_its_pointer() {
        let (memory, _, _) = check_boot(64 << 20, None, "console=ttyS0 init=/init panic=-1");
        let mut bytes = vec![0u8; 40];
        memory
            .read_slice(&mut bytes, GuestAddress(CMDLINE_ADDR))
            .expect("cmdline");
        assert_eq!(&bytes[..34], b"console=ttyS0 init=/init panic=-1\0");
    }

    #[test]
    fn e820_map_describes_ram_and_leaves_the_hole() {
        let (_, _, params) = check_boot(256 << 20, None, "x");
        let entries: Vec<(u64, u64, u32)> = params.e820_table[..usize::from(params.e820_entries)]
            .iter()
            .map(|entry| (entry.addr, entry.size, entry.r#type))
            .collect();
        assert_eq!(
            entries,
            vec![
                (0, EBDA_START, E820_RAM),
                (KERNEL_LOAD_ADDR, (256 << 20) - KERNEL_LOAD_ADDR, E820_RAM)
            ]
        );

        let big = e820_map(6 << 30);
        let big: Vec<(u64, u64)> = big.iter().map(|entry| (entry.addr, entry.size)).collect();
        assert_eq!(
            big,
            vec![
                (0, EBDA_START),
                (KERNEL_LOAD_ADDR, 0xC000_0000 - KERNEL_LOAD_ADDR),
                (1 << 32, 3 << 30)
            ]
        );
        let total: u64 = big.iter().map(|(_, size)| size).sum();
        assert!(total <= 6 << 30, "never more RAM than configured");
    }

    #[test]
    fn initrd_is_page_aligned_at_the_top_of_low_ram() {
        let initrd: Vec<u8> = (0..100_000u32).map(|index| (index % 13) as u8).collect();
        let (memory, entry, params) = check_boot(128 << 20, Some(&initrd), "x");
        let (address, size) = entry.initrd.expect("initrd placed");
        assert_eq!(size, 100_000);
        assert_eq!(address % 4096, 0);
        assert!(address + size <= 128 << 20);
        assert!(
            address + size > (128 << 20) - 4096,
            "as high as alignment allows"
        );
        assert!(address >= entry.kernel_end, "no overlap with the kernel");
        assert_eq!({ params.hdr.ramdisk_image }, address as u32);
        assert_eq!({ params.hdr.ramdisk_size }, 100_000);
        let mut loaded = vec![0u8; initrd.len()];
        memory
            .read_slice(&mut loaded, GuestAddress(address))
            .expect("initrd");
        assert_eq!(loaded, initrd);
    }

    #[test]
    fn initrd_respects_initrd_addr_max_and_the_hole() {
        assert_eq!(
            initrd_address(0x1000, 8 << 30, 0x7fff_ffff, 2 << 20).expect("fits"),
            0x8000_0000 - 0x1000
        );
        assert_eq!(
            initrd_address(0x1000, 0xC000_0000, u32::MAX, 2 << 20).expect("fits"),
            0xC000_0000 - 0x1000
        );
        assert_eq!(
            initrd_address(0x1000, 1 << 30, 0, 2 << 20).expect("old protocol"),
            0x3800_0000 - 0x1000
        );
        assert!(matches!(
            initrd_address(64 << 20, 64 << 20, u32::MAX, 2 << 20),
            Err(LinuxError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn refuses_what_the_protocol_does_not_allow() {
        let memory = memory(64 << 20);
        let no_64_bit = fake_bzimage(0x020f, 0, 2048, 0x7fff_ffff);
        assert!(matches!(
            load_from_bytes(&memory, 64 << 20, &no_64_bit, None, "x"),
            Err(LinuxError::No64BitEntry)
        ));
        let short_cmdline = fake_bzimage(0x020f, 0x3, 16, 0x7fff_ffff);
        let long = "console=ttyS0 loglevel=8 panic=1";
        assert!(matches!(
            load_from_bytes(&memory, 64 << 20, &short_cmdline, None, long),
            Err(LinuxError::Cmdline(_))
        ));
        let mut not_a_kernel = fake_bzimage(0x020f, 0x3, 2048, 0x7fff_ffff);
        not_a_kernel[0x202] = b'X';
        assert!(matches!(
            load_from_bytes(&memory, 64 << 20, &not_a_kernel, None, "x"),
            Err(LinuxError::Kernel(_))
        ));
    }
}
