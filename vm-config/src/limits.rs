//! The runtime's limits on one VM: one table, read by the compiler (a spec that asks
//! for more is a compile error with a span), the node (`CreateVm` is refused naming the
//! field) and `cairn-vmm` ([`crate::VmConfig::validate`]). Each limit says why it is what
//! it is; the long reasons are on the constants, the short `why` goes into messages.
//!
//! Architecture invariant: a value one of the three accepts, the others accept too. The
//! VMM's own constants (`vmm::vm::MAX_VCPUS`, `MAX_DISKS`, `MAX_NICS`,
//! `mptable::MAX_CPUS`, `memory::MIN_MEMORY_BYTES`) and the storage engine's block size
//! are tied to this table by compile-time assertions and tests in those crates.

use crate::size::format_size;

/// What a limit counts, for formatting values in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes, shown with the largest binary unit that divides them (`16MiB`).
    Bytes,
    /// A plain count.
    Count,
}

/// One limit: `min..=max` in steps of `granularity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// What is limited, for messages ("guest memory", "vCPUs").
    pub what: &'static str,
    /// The least value accepted.
    pub min: u64,
    /// The most.
    pub max: u64,
    /// Every accepted value is a multiple of this (1 for counts).
    pub granularity: u64,
    /// How values are shown.
    pub unit: Unit,
    /// Why, in a few words, for help texts.
    pub why: &'static str,
}

/// A value outside a [`Limit`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Not a multiple of the granularity.
    #[error("{} is not a multiple of {}", limit.show(*value), limit.show(limit.granularity))]
    NotMultiple {
        /// The value refused.
        value: u64,
        /// The limit.
        limit: Limit,
    },
    /// Less than the minimum.
    #[error("{} is less than the minimum of {}", limit.show(*value), limit.show(limit.min))]
    Below {
        /// The value refused.
        value: u64,
        /// The limit.
        limit: Limit,
    },
    /// More than the maximum.
    #[error("{} is more than the maximum of {}", limit.show(*value), limit.show(limit.max))]
    Above {
        /// The value refused.
        value: u64,
        /// The limit.
        limit: Limit,
    },
}

impl LimitError {
    /// The limit the value broke.
    pub fn limit(&self) -> &Limit {
        match self {
            Self::NotMultiple { limit, .. }
            | Self::Below { limit, .. }
            | Self::Above { limit, .. } => limit,
        }
    }
}

impl Limit {
    /// Whether `value` is accepted; the granularity is checked first, so `1000` bytes of
    /// memory is "not a multiple of 1MiB" rather than "less than 16MiB".
    pub fn check(&self, value: u64) -> Result<(), LimitError> {
        let limit = *self;
        if !value.is_multiple_of(self.granularity) {
            return Err(LimitError::NotMultiple { value, limit });
        }
        if value < self.min {
            return Err(LimitError::Below { value, limit });
        }
        if value > self.max {
            return Err(LimitError::Above { value, limit });
        }
        Ok(())
    }

    /// `value` as messages show it: `16MiB`, `64`, and a size that is not a multiple of
    /// the granularity in bytes (`64000000 bytes`), since that is what is wrong with it.
    pub fn show(&self, value: u64) -> String {
        match self.unit {
            Unit::Count => value.to_string(),
            Unit::Bytes if value.is_multiple_of(self.granularity) && value > 0 => {
                format_size(value)
            }
            Unit::Bytes => format!("{value} bytes"),
        }
    }

    /// The accepted values in words: `1 to 64`, `at most 8`,
    /// `a multiple of 1MiB from 16MiB to 8TiB`.
    pub fn accepted(&self) -> String {
        let range = if self.min == 0 {
            format!("at most {}", self.show(self.max))
        } else {
            format!("from {} to {}", self.show(self.min), self.show(self.max))
        };
        if self.granularity > 1 {
            format!("a multiple of {} {range}", self.show(self.granularity))
        } else if self.min == 0 {
            range
        } else {
            format!("{} to {}", self.show(self.min), self.show(self.max))
        }
    }

    /// The whole rule in one sentence: `guest memory must be a multiple of 1MiB from
    /// 16MiB to 8TiB (why)`.
    pub fn rule(&self) -> String {
        format!("{} must be {} ({})", self.what, self.accepted(), self.why)
    }

    /// The accepted value nearest above `value` (below it when above the maximum), for
    /// "for example" hints.
    pub fn nearest(&self, value: u64) -> u64 {
        let rounded = value
            .div_ceil(self.granularity)
            .saturating_mul(self.granularity);
        rounded.clamp(self.min, self.max)
    }
}

/// Guest memory.
///
/// - Granularity 1 MiB: the node has always counted guest RAM in whole MiB (as
///   Firecracker's `mem_size_mib` does); `cairn-vmm` itself needs only whole 4 KiB
///   pages, so this is the stricter of the two and the one specs are held to.
/// - Minimum 16 MiB: `cairn-vmm` needs 4 MiB for the built-in guest (its image at 1 MiB,
///   its dirty region from 2 MiB; `vmm::memory::MIN_MEMORY_BYTES`); the node has refused
///   anything below 16 MiB since it was written, and a spec below it has never run, so
///   the floor stays there rather than opening sizes no one has started.
/// - Maximum 8 TiB: RAM above the 3 GiB below the 32-bit MMIO hole is one KVM memory
///   slot, and KVM refuses a slot of more than 2^31 − 1 pages (`KVM_MEM_MAX_NR_PAGES`,
///   just under 8 TiB). A host whose CPU addresses fewer physical bits refuses less at
///   start; no node of that size exists to place such a VM on.
pub const MEMORY: Limit = Limit {
    what: "guest memory",
    min: 16 << 20,
    max: 8 << 40,
    granularity: 1 << 20,
    unit: Unit::Bytes,
    why: "whole MiB as the node counts it; 16MiB is the least the node starts; one KVM memory slot holds at most 8TiB",
};

/// vCPUs of any VM: `cairn-vmm` creates at most 64 (`vmm::vm::MAX_VCPUS`), the room
/// the built-in guest's stack layout has (one 4 KiB stack per vCPU below `0x9F000`).
pub const VCPUS: Limit = Limit {
    what: "the vCPU count",
    min: 1,
    max: 64,
    granularity: 1,
    unit: Unit::Count,
    why: "cairn-vmm runs at most 64 vCPUs, the built-in guest's stack room",
};

/// vCPUs of a VM booting a Linux kernel: Linux finds its CPUs in the MP table
/// `cairn-vmm` writes (no ACPI), which has room for 32 (`vmm::mptable::MAX_CPUS`).
pub const LINUX_VCPUS: Limit = Limit {
    what: "the vCPU count of a Linux guest",
    min: 1,
    max: 32,
    granularity: 1,
    unit: Unit::Count,
    why: "Linux finds its CPUs in cairn-vmm's MP table, which has room for 32",
};

/// The size of one disk (a volume of the storage engine).
///
/// - Granularity 4 KiB: the engine stores whole 4 KiB blocks (`storage::BLOCK_SIZE`)
///   and refuses a volume size that is not a multiple of it.
/// - Maximum 64 TiB: the largest volume a node creates.
pub const DISK_SIZE: Limit = Limit {
    what: "a disk's size",
    min: 4 << 10,
    max: 64 << 40,
    granularity: 4 << 10,
    unit: Unit::Bytes,
    why: "the volume engine stores whole 4KiB blocks; 64TiB is the largest volume a node creates",
};

/// Disks per VM: `cairn-vmm` has 8 virtio-blk devices, one interrupt line each
/// (`vmm::vm::MAX_DISKS`).
pub const DISKS: Limit = Limit {
    what: "the number of disks",
    min: 0,
    max: 8,
    granularity: 1,
    unit: Unit::Count,
    why: "cairn-vmm has 8 virtio-blk slots, one interrupt line each",
};

/// NICs per VM: `cairn-vmm` has 8 virtio-net devices, one interrupt line each
/// (`vmm::vm::MAX_NICS`).
pub const NICS: Limit = Limit {
    what: "the number of NICs",
    min: 0,
    max: 8,
    granularity: 1,
    unit: Unit::Count,
    why: "cairn-vmm has 8 virtio-net slots, one interrupt line each",
};

// A Linux guest is a VM: its vCPU limit cannot exceed every VM's.
const _: () = assert!(LINUX_VCPUS.max <= VCPUS.max);

/// Every limit, for documentation and tests.
pub const ALL: &[&Limit] = &[&MEMORY, &VCPUS, &LINUX_VCPUS, &DISK_SIZE, &DISKS, &NICS];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_disagreements_are_settled() {
        // `memory "100MB"` compiled, placed and planned, and failed only at apply.
        assert!(matches!(
            MEMORY.check(100_000_000),
            Err(LimitError::NotMultiple { .. })
        ));
        assert_eq!(
            MEMORY.check(100_000_000).unwrap_err().to_string(),
            "100000000 bytes is not a multiple of 1MiB"
        );
        assert!(matches!(
            MEMORY.check(1 << 20),
            Err(LimitError::Below { .. })
        ));
        assert!(MEMORY.check(16 << 20).is_ok());
        assert!(MEMORY.check(8 << 40).is_ok());
        assert!(matches!(
            MEMORY.check((8 << 40) + (1 << 20)),
            Err(LimitError::Above { .. })
        ));
        // `cpu 300`: 1-1024 in the compiler, 1-255 in the node, 1-64 in the VMM.
        assert_eq!(
            VCPUS.check(300).unwrap_err().to_string(),
            "300 is more than the maximum of 64"
        );
        assert!(VCPUS.check(0).is_err());
        assert!(VCPUS.check(64).is_ok());
    }

    #[test]
    fn every_limit_is_consistent_and_says_why() {
        for limit in ALL {
            assert!(limit.min <= limit.max, "{limit:?}");
            assert!(limit.granularity >= 1, "{limit:?}");
            assert!(limit.min.is_multiple_of(limit.granularity), "{limit:?}");
            assert!(limit.max.is_multiple_of(limit.granularity), "{limit:?}");
            assert!(!limit.why.is_empty(), "{limit:?}");
            assert!(limit.check(limit.min).is_ok() && limit.check(limit.max).is_ok());
        }
    }

    #[test]
    fn rules_read_as_sentences() {
        assert_eq!(MEMORY.accepted(), "a multiple of 1MiB from 16MiB to 8TiB");
        assert_eq!(VCPUS.accepted(), "1 to 64");
        assert_eq!(NICS.accepted(), "at most 8");
        assert_eq!(
            DISK_SIZE.accepted(),
            "a multiple of 4KiB from 4KiB to 64TiB"
        );
        assert!(VCPUS.rule().starts_with("the vCPU count must be 1 to 64 ("));
    }

    #[test]
    fn the_nearest_accepted_value_rounds_up_into_the_range() {
        assert_eq!(MEMORY.nearest(100_000_000), 96 << 20);
        assert_eq!(MEMORY.nearest(1 << 20), 16 << 20);
        assert_eq!(MEMORY.nearest(u64::MAX), 8 << 40);
        assert_eq!(VCPUS.nearest(300), 64);
    }
}
