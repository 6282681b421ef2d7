//! compiler crate (being built).
