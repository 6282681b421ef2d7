//! proto crate (being built).
