//! Compiler integration tests: robustness against arbitrary input, the
//! fast parser against kdl-rs, placement, and `cairn fmt` keeping meaning.

mod fmt;
mod ipam;
mod kdl_fast;
mod packing;
mod placement;
mod robustness;

/// A small deterministic xorshift generator for the mutation tests.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

// Nodes in maintenance (issue 16).
mod maintenance;
// The site's quorum witness (issues 16 and 22).
mod witness;
// Incremental compilation (issue 24).
mod session;
