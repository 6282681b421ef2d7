//! What a cairn VM is, as plain data, shared by every crate that has a rule about one.
//!
//! - [`limits`]: the one table of runtime limits on a VM (memory, vCPUs, disk sizes,
//!   disk and NIC counts), each with why. The compiler checks specs against it, the
//!   node checks `CreateVm` against it and `cairn-vmm` checks its [`VmConfig`] against
//!   it, so a value is refused in the first place that sees it, with the same rule.
//! - [`size`]: the one size grammar (`"64MiB"`, `"1.5TiB"`, `"100MB"`): exact decimal
//!   arithmetic, no floating point; the compiler's `units` and `cairn-vmm --memory`
//!   both parse with it.
//! - [`VmConfig`]: a VM to run, as the node hands it to `cairn-vmm` (`--config
//!   FILE.json`): name, vCPUs, memory, boot source, disks, NICs, control socket. It
//!   holds paths and names, never open files, so it can be written, read back and sent
//!   to another host (a migration target) unchanged; [`VmConfig::validate`] checks it
//!   against [`limits`] in one function with one error enum, naming the field.
//!
//! What it does not do: open, map or create anything. Whether a path exists, a tap can
//! be attached or `/dev/kvm` is usable is the VMM's business when it builds the VM.
//!
//! Architecture invariant: no I/O and no dependencies beyond serde and thiserror; the
//! compiler links it.
#![warn(missing_docs)]

mod config;
pub mod limits;
pub mod size;

pub use config::{
    BUILTIN_GUEST, BootSource, DEFAULT_CMDLINE, DiskConfig, FORMAT_VERSION, MacAddress, NicConfig,
    VmConfig, VmConfigError,
};
pub use limits::{Limit, LimitError};
