//! Guest RAM: mapped exactly as configured, registered with KVM, measured, dirty-tracked.
//!
//! Layout (x86_64): RAM starts at guest-physical 0. RAM that would overlap the 32-bit
//! MMIO hole `[MMIO_HOLE_START, 4 GiB)` continues at 4 GiB instead, so guest-physical
//! addresses in the hole are free for devices (virtio-MMIO lives there).
//!
//! Architecture invariant: the mapping is anonymous, private and `MAP_NORESERVE` (vm-memory's
//! `from_ranges`), advised `MADV_MERGEABLE` so KSM can merge identical guest pages; the
//! VMM never pre-faults it, so resident memory grows only with what the guest touches.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Guest memory as the VMM maps it: every write the VMM makes through vm-memory's
/// accessors (virtio-net receive buffers, virtio-blk data and used rings, the guest
/// loader) sets the page's bit in a VMM-side bitmap, because KVM's dirty log sees only
/// what the vCPUs write. Live migration ORs the two ([`GuestRam::take_dirty_bitmap`]).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole (3 GiB); RAM above it is relocated to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The smallest guest this VMM runs (the built-in guest needs its first 2 MiB).
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The configured size is not usable.
    #[error("guest memory of {bytes} bytes is invalid: {reason}")]
    InvalidSize {
        /// The configured size.
        bytes: u64,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// mmap of the guest memory failed.
    #[error("cannot map {bytes} bytes of guest memory")]
    Map {
        /// The configured size.
        bytes: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A KVM memory ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The guest-physical ranges `(start, length)` of `size_bytes` of RAM.
pub fn ram_ranges(size_bytes: u64) -> Vec<(u64, u64)> {
    if size_bytes <= MMIO_HOLE_START {
        vec![(0, size_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size_bytes - MMIO_HOLE_START),
        ]
    }
}

/// Guest RAM of one VM.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    size_bytes: u64,
    dirty_logging: AtomicBool,
    mergeable: bool,
}

/// Pages written since the previous read of the dirty log, per RAM range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// `(guest-physical start, bitmap)` per KVM slot; bit `i` of word `w` is page
    /// `start + (64 * w + i) * PAGE_SIZE`.
    pub ranges: Vec<(u64, Vec<u64>)>,
}

impl DirtyBitmap {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.ranges
            .iter()
            .flat_map(|(_, words)| words)
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }

    /// Guest-physical addresses of the dirty pages, ascending within each range.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|(start, words)| {
            words
                .iter()
                .enumerate()
                .flat_map(move |(word_index, word)| {
                    (0..64u64)
                        .filter(move |bit| word & (1 << bit) != 0)
                        .map(move |bit| start + (word_index as u64 * 64 + bit) * PAGE_SIZE)
                })
        })
    }
}

impl GuestRam {
    /// Maps `size_bytes` of guest RAM (a multiple of 4 KiB, at least [`MIN_MEMORY_BYTES`]).
    pub fn new(size_bytes: u64) -> Result<Self, MemoryError> {
        if size_bytes < MIN_MEMORY_BYTES {
            return Err(MemoryError::InvalidSize {
                bytes: size_bytes,
                reason: "smaller than 4 MiB",
            });
        }
        if !size_bytes.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::InvalidSize {
                bytes: size_bytes,
                reason: "not a multiple of 4 KiB",
            });
        }
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size_bytes)
            .into_iter()
            .map(|(start, length)| (GuestAddress(start), length as usize))
            .collect();
        let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map {
            bytes: size_bytes,
            source,
        })?;
        let mut ram = Self {
            memory,
            size_bytes,
            dirty_logging: AtomicBool::new(false),
            mergeable: true,
        };
        for (host_address, length) in ram.host_ranges() {
            // SAFETY: the range is exactly one mapping that `memory` owns and keeps alive;
            // MADV_MERGEABLE only lets KSM share identical pages copy-on-write and never
            // changes their contents. Failure (KSM not built in) is harmless: it is only
            // reported.
            let result =
                unsafe { libc::madvise(host_address.cast(), length, libc::MADV_MERGEABLE) };
            ram.mergeable &= result == 0;
        }
        Ok(ram)
    }

    /// The vm-memory view, for bounds-checked access to guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Configured size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// End (exclusive) of the RAM below the MMIO hole.
    pub fn low_end(&self) -> u64 {
        self.size_bytes.min(MMIO_HOLE_START)
    }

    /// Highest guest-physical address of RAM plus one.
    pub fn top(&self) -> u64 {
        ram_ranges(self.size_bytes)
            .last()
            .map_or(0, |(start, length)| start + length)
    }

    fn host_ranges(&self) -> Vec<(*mut u8, usize)> {
        self.memory
            .iter()
            .map(|region| {
                let host = region
                    .get_host_address(MemoryRegionAddress(0))
                    .expect("offset 0 of a mapped region has a host address");
                (host, region.len() as usize)
            })
            .collect()
    }

    /// Registers (or re-registers with changed flags) every RAM range as a KVM memory
    /// slot, slot numbers 0.., with dirty-page logging on or off.
    pub fn register(&self, vm: &VmFd, dirty_logging: bool) -> Result<(), MemoryError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .expect("offset 0 of a mapped region has a host address");
            let descriptor = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if dirty_logging {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `self.memory`, which lives
            // as long as the VM (the `Vm` owns both and drops the VM fd first); slots do
            // not overlap because the ranges come from `ram_ranges`.
            unsafe { vm.set_user_memory_region(descriptor) }.map_err(|source| {
                MemoryError::Kvm {
                    what: "KVM_SET_USER_MEMORY_REGION",
                    source,
                }
            })?;
        }
        self.dirty_logging.store(dirty_logging, Ordering::SeqCst);
        Ok(())
    }

    /// Whether dirty-page logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(Ordering::SeqCst)
    }

    /// Whether every RAM range was accepted as `MADV_MERGEABLE` (KSM can merge it).
    pub fn mergeable(&self) -> bool {
        self.mergeable
    }

    /// The pages written since the previous call (or since logging started): those the
    /// vCPUs wrote (`KVM_GET_DIRTY_LOG` on every slot) and those the VMM itself wrote
    /// through vm-memory (its own bitmap, which KVM's log misses); the call clears both.
    /// This is what a live migration's pre-copy rounds read.
    pub fn take_dirty_bitmap(&self, vm: &VmFd) -> Result<DirtyBitmap, MemoryError> {
        let mut ranges = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let mut bitmap = vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| MemoryError::Kvm {
                    what: "KVM_GET_DIRTY_LOG",
                    source,
                })?;
            for (word, vmm_word) in bitmap
                .iter_mut()
                .zip(std::ops::Deref::deref(region).bitmap().get_and_reset())
            {
                *word |= vmm_word;
            }
            ranges.push((region.start_addr().0, bitmap));
        }
        Ok(DirtyBitmap { ranges })
    }

    /// The pages the VMM wrote since the previous read (its own bitmap only); clears it.
    pub fn take_vmm_dirty_bitmap(&self) -> DirtyBitmap {
        DirtyBitmap {
            ranges: self
                .memory
                .iter()
                .map(|region| {
                    (
                        region.start_addr().0,
                        std::ops::Deref::deref(region).bitmap().get_and_reset(),
                    )
                })
                .collect(),
        }
    }

    /// CRC-32C of all guest RAM, range after range: equal on both sides of a migration
    /// at switch-over. Meaningful while the vCPUs are paused.
    pub fn crc32c(&self) -> u32 {
        use vm_memory::Bytes as _;
        const CHUNK: u64 = 1 << 20;
        let mut crc = 0u32;
        let mut buffer = vec![0u8; CHUNK as usize];
        for (start, length) in ram_ranges(self.size_bytes) {
            let mut offset = 0;
            while offset < length {
                let chunk = CHUNK.min(length - offset) as usize;
                // In bounds: the range is mapped RAM.
                if self
                    .memory
                    .read_slice(&mut buffer[..chunk], GuestAddress(start + offset))
                    .is_ok()
                {
                    crc = crc32c::crc32c_append(crc, &buffer[..chunk]);
                }
                offset += chunk as u64;
            }
        }
        crc
    }

    /// Number of pages written since the previous read of the dirty log; clears the log.
    pub fn take_dirty_pages(&self, vm: &VmFd) -> Result<u64, MemoryError> {
        Ok(self.take_dirty_bitmap(vm)?.count())
    }

    /// Bytes of guest memory resident in host RAM now (mincore over the mapping).
    pub fn resident_bytes(&self) -> u64 {
        const CHUNK: usize = 1 << 30;
        let mut resident_pages = 0u64;
        let mut vector = Vec::new();
        for (host, length) in self.host_ranges() {
            let mut offset = 0;
            while offset < length {
                let chunk = CHUNK.min(length - offset);
                vector.clear();
                vector.resize(chunk.div_ceil(PAGE_SIZE as usize), 0u8);
                // SAFETY: `host + offset .. + chunk` lies inside one live mapping owned by
                // `self.memory` and is page aligned (mappings and CHUNK are); `vector`
                // holds one byte per page of the chunk, as mincore requires.
                let result =
                    unsafe { libc::mincore(host.add(offset).cast(), chunk, vector.as_mut_ptr()) };
                if result == 0 {
                    resident_pages += vector.iter().filter(|byte| **byte & 1 != 0).count() as u64;
                }
                offset += chunk;
            }
        }
        resident_pages * PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_memory_is_one_range_at_zero() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn memory_above_the_hole_moves_to_4_gib() {
        assert_eq!(
            ram_ranges(8 << 30),
            vec![
                (0, MMIO_HOLE_START),
                (MMIO_HOLE_END, (8 << 30) - MMIO_HOLE_START)
            ]
        );
    }

    #[test]
    fn dirty_bitmaps_name_their_pages() {
        let bitmap = DirtyBitmap {
            ranges: vec![(0, vec![0b101, 1 << 63]), (MMIO_HOLE_END, vec![1])],
        };
        assert_eq!(bitmap.count(), 4);
        let pages: Vec<u64> = bitmap.pages().collect();
        assert_eq!(
            pages,
            vec![0, 2 * PAGE_SIZE, 127 * PAGE_SIZE, MMIO_HOLE_END]
        );
    }

    #[test]
    fn the_vmms_own_writes_are_in_its_dirty_bitmap() {
        let ram = GuestRam::new(16 << 20).expect("map 16 MiB");
        let _ = ram.take_vmm_dirty_bitmap();
        ram.memory()
            .write_obj(7u32, GuestAddress(5 * PAGE_SIZE + 8))
            .expect("in bounds");
        ram.memory()
            .write_slice(&[1u8; 4096], GuestAddress(9 * PAGE_SIZE))
            .expect("in bounds");
        let pages: Vec<u64> = ram.take_vmm_dirty_bitmap().pages().collect();
        assert_eq!(pages, vec![5 * PAGE_SIZE, 9 * PAGE_SIZE]);
        assert_eq!(ram.take_vmm_dirty_bitmap().count(), 0, "reading clears it");
    }

    #[test]
    fn invalid_sizes_are_refused() {
        assert!(matches!(
            GuestRam::new(1 << 20),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            GuestRam::new((8 << 20) + 1),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn resident_memory_grows_only_with_touched_pages() {
        let ram = GuestRam::new(64 << 20).expect("map 64 MiB");
        let before = ram.resident_bytes();
        assert!(
            before < (1 << 20),
            "fresh NORESERVE mapping is not resident: {before}"
        );
        for page in 0..256u64 {
            ram.memory()
                .write_obj(page ^ 0xdead_beef, GuestAddress(page * PAGE_SIZE))
                .expect("in bounds");
        }
        let after = ram.resident_bytes();
        assert!(
            after >= 256 * PAGE_SIZE,
            "256 touched pages are resident: {after}"
        );
        assert!(after < (8 << 20), "untouched pages stay out: {after}");
    }
}
