//! Compiler integration tests: robustness against arbitrary input.

mod placement;
mod robustness;
