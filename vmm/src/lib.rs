//! vmm crate (being built).
