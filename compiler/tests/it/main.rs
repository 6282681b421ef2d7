//! Compiler integration tests: robustness against arbitrary input.

mod robustness;
