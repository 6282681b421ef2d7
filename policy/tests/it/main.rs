//! Integration tests of the policy crate: SSHSIG against real `ssh-keygen`
//! signatures, and evaluation through the public API.

mod eval;
mod sshsig;
