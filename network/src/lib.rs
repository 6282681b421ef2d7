//! network crate (being built).
