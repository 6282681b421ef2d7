//! cairn's KVM micro-VMM: runs exactly one virtual machine per process, the way
//! Firecracker does, so the node agent (`cairn-node`) can start, supervise and kill
//! each VM as its own process and a VM crash never takes the agent down.
//!
//! What it does:
//! - runs the VM a [`vm_config::VmConfig`] describes (`cairn-vmm --config FILE.json`, or
//!   flags turned into one): validated once, then built into live resources — disk
//!   files, taps, kernel bytes, KVM — by one recipe, [`Vm::create`];
//! - opens `/dev/kvm`, checks the API version and the capabilities it needs ([`kvm`]);
//! - maps guest memory exactly as configured (anonymous, `MAP_NORESERVE`,
//!   `MADV_MERGEABLE` for KSM) and reports its resident size ([`memory`]);
//! - boots either the built-in guest `cairn-guest` (assembled from `guest/` at build time
//!   and embedded, see [`guest`]) or a Linux bzImage + initrd + cmdline ([`linux`]);
//! - runs 1..N vCPU threads with an explicit state machine ([`vcpu::RunState`]);
//! - emulates a 16550 serial console logged to a file, the cairn-guest port interface
//!   (heartbeats, dirty-page rate, commands), virtio-blk devices backed by a
//!   [`devices::block::BlockBackend`] and virtio-net devices on host taps, over
//!   virtio-MMIO ([`devices`]);
//! - tracks dirty pages with `KVM_MEM_LOG_DIRTY_PAGES` and its own writes, saves and
//!   restores VM state as versioned values ([`state`]) and live-migrates a VM to another
//!   `cairn-vmm` over TCP with pre-copy, auto-converge and one commit point
//!   ([`migration`]);
//! - stops itself when the node's fence deadline lapses without a renewal ([`fence`]),
//!   so a frozen or cut-off node cannot keep an HA VM running past its lease;
//! - serves a line-delimited JSON control socket ([`control`]: the wire contract, the
//!   server over a [`VmHandle`], the agent's client) whose status reports what runs (the
//!   vCPUs created, the RAM mapped), and ends with an exit status that tells a clean
//!   stop from a crash ([`exit_code`]).
//!
//! What it does not do: attach storage-engine volumes (only files and block devices),
//! create taps (the node does), ACPI (Linux finds its CPUs through an MP table),
//! interrupts for the built-in guest (it polls), post-copy migration,
//! the migration's commit record (the node's), cgroups (the agent places the process in one).
//!
//! Invariants:
//! - one process, one VM: nothing here keeps global state that a second VM would share;
//! - guest memory is never touched by the VMM except through bounds-checked
//!   `vm-memory` accessors, so a malicious guest address cannot reach VMM memory;
//! - every exit of the process goes through [`exit_code`]: 0 means the VM stopped
//!   because someone asked it to, anything else is a documented failure.
#![warn(missing_docs)]

pub mod arch;
pub mod control;
pub mod devices;
pub mod exit_code;
pub mod fence;
pub mod ft;
pub mod guest;
pub mod handle;
pub mod heartbeat_log;
pub mod kvm;
pub mod linux;
pub mod memory;
pub mod migration;
pub mod mptable;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use handle::VmHandle;
pub use vcpu::RunState;
pub use vm::{Vm, VmOutcome};
pub use vm_config::{BootSource, VmConfig};
