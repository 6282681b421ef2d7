//! A fast, deterministic hasher for the placement's and the graph's in-memory
//! maps (the Fx hash of rustc: a rotate, a xor and a multiply per word).
//!
//! SipHash (std's default) guards against hash flooding by untrusted keys; the
//! keys here are interned integers and the spec's own names, looked up millions
//! of times per placement at 100,000 VMs. These maps serve point lookups only:
//! nothing iterates them, so no output depends on their order.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`FxHasher`].
pub(crate) type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
/// A `HashSet` with [`FxHasher`].
pub(crate) type FxHashSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// The Fx hash (rustc's `FxHasher`, 64-bit).
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_hash_equal_and_lookups_find_them() {
        let mut m: FxHashMap<String, u32> = FxHashMap::default();
        for i in 0..10_000u32 {
            m.insert(format!("volume/vm-{i}/root"), i);
        }
        for i in 0..10_000u32 {
            assert_eq!(m.get(format!("volume/vm-{i}/root").as_str()), Some(&i));
        }
        assert_eq!(m.get("volume/vm-10000/root"), None);
        let mut n: FxHashMap<u32, usize> = FxHashMap::default();
        *n.entry(7).or_default() += 2;
        assert_eq!(n.get(&7), Some(&2));
        assert_eq!(n.get(&8), None);
    }
}
