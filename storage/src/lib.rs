//! storage crate (being built).
