//! Integration tests of the `vmm` crate. Tests that need KVM run the real `cairn-vmm`
//! binary as a child process (so a crash cannot leak a VM into the test process) and
//! skip with a printed reason where `/dev/kvm` is missing.

mod block;
mod dirty;
mod fence;
mod ft;
mod guest_io;
mod lifecycle;
mod linux_boot;
mod migrate;
mod net;
mod support;
mod usage;
