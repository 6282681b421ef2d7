//! Fuzz target: the parsers of untrusted signing material that cairn keeps by
//! hand or feeds to a crate: git's allowed-signers format
//! (`policy::sshsig::AllowedSigners::parse`, the controller's trusted keys),
//! the SSHSIG armor and blob (parsed by `ssh-key`, wrapped by
//! `policy::sshsig::SshSig`), and a member's `key=` (`compiler::sshkey`).
//! None may panic; what parses must hold together.
//!
//! Run: `cargo install cargo-fuzz && cargo +nightly fuzz run allowed_signers`
//! (from this directory's parent; seeds: `fuzz/corpus/allowed_signers/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cairn_fuzz::check_signing_input(data);
});
