//! Integration tests of the block store, one topic per module.

mod bad_input;
mod crash;
mod format;
mod grow;
mod integrity;
mod nbd;
mod replication;
mod snapshot;
mod volume;

use storage::{DiskSource, EngineKind, Store, StoreOptions, Volume, VolumeSpec};

/// A store in a fresh temp dir with `n_disks` file disks of `capacity` bytes each.
pub fn store_with_disks(
    n_disks: usize,
    capacity: u64,
    engine: EngineKind,
) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), StoreOptions { engine }).expect("open store");
    for i in 0..n_disks {
        store
            .add_disk(&format!("d{i}"), DiskSource::File { capacity })
            .expect("add disk");
    }
    (dir, store)
}

/// A volume spec with automatic disk choice.
pub fn spec(name: &str, size: u64, stripe_unit: u64, stripe_width: usize) -> VolumeSpec {
    VolumeSpec {
        name: name.to_owned(),
        size,
        stripe_unit,
        stripe_width,
        disks: Vec::new(),
    }
}

/// Deterministic, block-distinct test data: every 8 bytes encode `seed` and the position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0u64;
    while out.len() < len {
        let word =
            (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        out.extend_from_slice(&word.to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Reads `len` bytes at `offset` and compares them with `expected`.
pub fn check_read(volume: &Volume, offset: u64, expected: &[u8]) {
    let mut buf = vec![0u8; expected.len()];
    volume
        .read_at(offset, &mut buf)
        .unwrap_or_else(|e| panic!("read at {offset}: {e}"));
    assert!(
        buf == expected,
        "data at offset {offset} differs from what was written"
    );
}
