//! The built-in guest `cairn-guest` and its ABI with the VMM.
//!
//! The guest is written in assembly in `guest/cairn-guest.S`, assembled and linked by
//! `build.rs` with the system binutils into a flat image loaded at
//! [`abi::LOAD_ADDR`]. [`abi`] is generated from `guest/abi.inc`, so the guest and the
//! VMM share one definition of ports, commands and the memory layout.

/// Constants of the guest/VMM contract, generated from `guest/abi.inc`.
#[allow(missing_docs)]
pub mod abi {
    include!(concat!(env!("OUT_DIR"), "/guest_abi.rs"));
}

/// The flat binary image of `cairn-guest`, entered in 64-bit mode at [`abi::LOAD_ADDR`].
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cairn-guest.bin"));

/// `cairn-linux-probe`: a tiny image in the Linux bzImage format (from
/// `guest/linux-probe.S`) whose 64-bit entry prints the command line, e820 map, initrd
/// placement and checksum, loader type and code segment it finds, then powers off. It
/// tests the Linux boot path end to end where a real kernel cannot boot (PVM).
pub static LINUX_PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/linux-probe.bin"));

/// The name the spec uses for the built-in guest (`image "tiny" builtin="cairn-guest"`).
pub const BUILTIN_NAME: &str = "cairn-guest";

/// Result of the guest's block self-test, as reported on `PORT_BLOCK_RESULT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockTestResult {
    /// The test has not run (yet).
    NotRun,
    /// The pattern written to the disk read back identically.
    Pass,
    /// The data read back differs from what was written.
    Mismatch,
    /// No virtio-blk device was found.
    NoDevice,
    /// The device failed a request.
    DeviceError,
    /// The disk is smaller than the 4 KiB the test needs.
    TooSmall,
    /// The device refused the features the guest needs.
    FeaturesRejected,
    /// The guest reported a value this VMM does not know.
    Unknown,
}

impl BlockTestResult {
    /// Decodes the value the guest wrote to `PORT_BLOCK_RESULT` (0 means not run).
    pub fn from_port_value(value: u64) -> Self {
        match value {
            0 => Self::NotRun,
            abi::BLOCK_PASS => Self::Pass,
            abi::BLOCK_MISMATCH => Self::Mismatch,
            abi::BLOCK_NO_DEVICE => Self::NoDevice,
            abi::BLOCK_DEVICE_ERROR => Self::DeviceError,
            abi::BLOCK_TOO_SMALL => Self::TooSmall,
            abi::BLOCK_FEATURES_REJECTED => Self::FeaturesRejected,
            _ => Self::Unknown,
        }
    }
}

/// The 4 KiB the built-in guest's block self-test writes in round `round` (1 at boot,
/// then one more per `block-test`) to the disk's last 8 sectors, from sector
/// `first_sector` (guest/cairn-guest.S `pattern_value`: qword `i` is
/// `(first_sector + i) * 0x9E3779B97F4A7C15 ^ round << 48`, little-endian).
pub fn block_test_pattern(first_sector: u64, round: u64) -> Vec<u8> {
    (0..512u64)
        .flat_map(|index| {
            ((first_sector + index).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (round << 48))
                .to_le_bytes()
        })
        .collect()
}

/// The checksum the built-in guest reports (`PORT_BLOCK_CHECKSUM`) of the bytes its
/// self-test read back: the low 32 bits of the wrapping sum of their qwords, qword `i`
/// rotated left by `i mod 64`.
pub fn block_checksum(bytes: &[u8]) -> u64 {
    let sum = bytes
        .chunks_exact(8)
        .enumerate()
        .fold(0u64, |sum, (index, qword)| {
            let qword = u64::from_le_bytes(qword.try_into().expect("8 bytes"));
            sum.wrapping_add(qword.rotate_left(index as u32 % 64))
        });
    sum & 0xFFFF_FFFF
}

/// The bytes the built-in guest's `write-pattern` puts at byte `offset` (a multiple of
/// 8) of a disk for `seed`: the little-endian qword at disk offset `8q` is output `q + 1`
/// of splitmix64 seeded with `seed` (guest/cairn-guest.S `fill_io_pattern`). The same
/// bytes land at the same place whatever the range of the command that wrote them.
pub fn disk_pattern(offset: u64, length: u64, seed: u64) -> Vec<u8> {
    let first = offset / 8;
    (first..first + length.div_ceil(8))
        .flat_map(|q| {
            splitmix64(seed.wrapping_add((q + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))).to_le_bytes()
        })
        .take(length as usize)
        .collect()
}

/// The splitmix64 finalizer of `state`.
fn splitmix64(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The checksum the built-in guest reports for a disk I/O command: CRC-32C
/// (Castagnoli) of the bytes, as `crc32c::crc32c` computes it.
pub fn disk_checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_depends_on_the_disk_offset_not_the_range() {
        let whole = disk_pattern(0, 8192, 42);
        assert_eq!(&whole[4096..], disk_pattern(4096, 4096, 42).as_slice());
        assert_ne!(whole, disk_pattern(0, 8192, 43), "the seed matters");
        // splitmix64 seeded with 0: its first output (a published test value).
        assert_eq!(
            &disk_pattern(0, 8, 0),
            &0xE220_A839_7B1D_CDAFu64.to_le_bytes()
        );
    }

    #[test]
    fn the_checksum_is_crc32c() {
        assert_eq!(disk_checksum(b"123456789"), 0xE306_9283);
    }
}
