//! The reconciler: what should run (desired), what runs (observe), how they
//! differ and what to do about it (plan), doing it (apply), and the records that
//! outlive a process (state). The `cairn` command line (crate `cli`) and the
//! GitOps controller are built on it; neither prints from inside it.
//!
//! Data flow of a plan and its apply:
//! specs → [`compiler::compile`] → [`desired::place`] (starting from the previous
//! placement in the [`state`] store, or from what the nodes run) → [`desired::desired`]
//! → [`observe::observe`] (every node in parallel, with a timeout) →
//! [`plan::plan`] (diff → changes + steps in waves) → [`render`] (text, JSON,
//! signed plan file) → [`apply::apply`] (waves, bounded parallelism, journal).
//!
//! Architecture invariant: the only writes to node runtimes are the steps of a
//! plan's execution, each sent with the request id recorded in the journal before
//! it is sent, and a request id is sent by one execution only.
//! Architecture invariant: the state store holds nothing git or the nodes know
//! (placement, applied revision, protected volumes, executions and their journal,
//! audit log, lock).
//! Architecture invariant: this crate links no netlink, KVM or storage code and
//! prints nothing; progress reaches the caller through [`apply::ApplyEvents`].

#![warn(missing_docs)]

pub mod apply;
pub mod audit;
pub mod desired;
pub mod drift;
pub mod enroll;
pub mod epochs;
pub mod ft;
pub mod images;
pub mod migrate;
pub mod nodes;
pub mod observe;
pub mod pipeline;
pub mod plan;
pub mod render;
pub mod segments;
pub mod session;
pub mod state;
pub mod status;
pub mod usage;
