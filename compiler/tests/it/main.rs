//! Compiler integration tests: robustness against arbitrary input.

mod kdl_fast;
mod placement;
mod robustness;
