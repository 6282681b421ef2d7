//! The control channel between the node agent and one `cairn-vmm` process: a Unix stream
//! socket (`control.sock` in the VM directory) speaking line-delimited JSON. Each request
//! is one JSON object on one line; each gets exactly one JSON response line, in order.
//! A connection may carry any number of requests; several connections may be open.
//!
//! Requests (`"op"` selects the operation):
//!
//! ```text
//! {"op":"status"}                                   -> {"ok":true,"status":{...VmStatus...}}
//! {"op":"pause"}                                    -> {"ok":true}   (all vCPUs out of KVM_RUN)
//! {"op":"resume"}                                   -> {"ok":true}
//! {"op":"power-off","force":false}                  -> {"ok":true}   (the process then exits 0)
//! {"op":"reboot"}                                   -> {"ok":true}
//! {"op":"set-dirty-rate","pages_per_second":1000}   -> {"ok":true}
//! {"op":"set-burn","on":true}                         -> {"ok":true}   (tick sleeps skipped)
//! {"op":"dirty-log","action":"start"|"stop"|"fetch"} -> {"ok":true,"dirty_pages":N} (fetch)
//! {"op":"block-test"}                               -> {"ok":true}   (result in status.block_test)
//! {"op":"guest-crash"}                              -> {"ok":true}   (the process then exits 4)
//! {"op":"console-tail","bytes":4096}                -> {"ok":true,"console":"..."}
//! {"op":"console-input","data":[104,105,10]}        -> {"ok":true,"console_accepted":3}
//!                                                      (into the UART's 64-byte receive FIFO)
//! {"op":"guest-disk-io","disk":0,"action":"write-pattern","offset":0,"length":65536,"seed":7}
//!                                                   -> {"ok":true,"guest_disk_io":{"crc32c":N,"counters":{..},"elapsed_ms":N}}
//!                                                      (also "read-checksum"; optional "timeout_ms", default 30000)
//! {"op":"set-fence","deadline_boottime_ns":N}       -> {"ok":true}   (0 disarms; refused once lapsed)
//! {"op":"identify"}                                 -> {"ok":true,"identity":{"name":..,"incarnation":..,"pid":N}}
//! ```
//!
//! Errors: `{"ok":false,"error":"..."}`; the connection stays usable.
//!
//! Three parts along the protocol's seams: [`wire`] is the contract (the serde types,
//! nothing else: both ends depend on it and it depends on nothing of the VMM),
//! [`server`] serves it inside `cairn-vmm` over a [`crate::handle::VmHandle`], and
//! [`client`] is the agent's side. `server` → `handle` → `wire` ← `client`: no cycle.
//!
//! Architecture invariant: the types of [`wire`] are the wire contract (serde lives
//! there and on nothing internal); fields are only ever added.

pub mod client;
pub mod server;
pub mod wire;

pub use client::{ClientError, ControlClient};
pub use server::{ControlServer, execute, serve};
pub use wire::{
    BlockStatus, DirtyLogAction, ExitCounts, MigrationStatus, NicStatus, PROTOCOL_VERSION, Request,
    Response, VmIdentity, VmStatus,
};
pub use wire::{GuestDiskAction, GuestDiskCounters, GuestDiskIoRequest, GuestDiskIoResult};
