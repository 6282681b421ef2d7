//! Exit statuses of the `cairn-vmm` process, the contract with the node agent.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | stopped: powered off by the guest or by a `power-off` request; or, on a live migration's source, the move was committed (`migrate-commit`) and the VM runs at the destination |
//! | 2 | usage or configuration error (bad flags, unreadable kernel, disk, VM directory) |
//! | 3 | the host cannot run the VM: no `/dev/kvm`, wrong API version, missing capability, guest memory or VM creation failed |
//! | 4 | the guest crashed: triple fault (`KVM_EXIT_SHUTDOWN`), KVM internal or entry failure, an exit the VMM cannot handle |
//! | 5 | the VMM itself failed while the VM ran (an ioctl error in a vCPU loop, a vCPU thread panic) |
//! | 6 | fenced: the fence deadline the node set lapsed without a renewal ([`crate::fence`]); the vCPUs stopped and no frame was sent after it |
//! | 7 | a live migration's destination (`--incoming`) never ran the VM: the migration was aborted or failed before the commit |
//!
//! A VMM killed by a signal (SIGKILL from the agent) has no exit code; the agent sees
//! the signal.

/// The VM stopped because it was asked to (guest power-off or control `power-off`).
pub const STOPPED: u8 = 0;
/// Usage or configuration error, detected before the VM started.
pub const USAGE: u8 = 2;
/// The host cannot run the VM (KVM missing or lacking a capability, memory, VM creation).
pub const HOST: u8 = 3;
/// The guest crashed.
pub const GUEST_CRASHED: u8 = 4;
/// The VMM failed while running the VM.
pub const VMM_FAILED: u8 = 5;
/// The fence deadline lapsed: the VM stopped itself ([`crate::fence`]).
pub const FENCED: u8 = 6;
/// A migration's destination ended without running the VM (aborted, or failed before
/// the commit).
pub const MIGRATION_NOT_COMMITTED: u8 = 7;
