//! The reconciler's state store in etcd (`--state etcd://HOST:PORT[,…]/PREFIX`) and
//! the election of one leader among controller replicas (issue 24, items 1–2).
//!
//! [`EtcdStore`] implements `reconciler::state::StateStore` with the same records as
//! the redb store, under `PREFIX/`; [`election::Election`] elects one controller
//! through an etcd lease and gives it a fencing token (the election key's create
//! revision) that every write of the store compares in its transaction and every
//! node request carries (`proto::fence`).
//!
//! This is a crate of its own, not a module of `reconciler`: the reconciler depends
//! on `compiler`, `policy` and `proto` only, and the etcd client (generated gRPC code
//! and its own runtime thread) is needed only by the controller.

#![warn(missing_docs)]

pub mod backup;
pub mod election;
mod enroll;
mod epochs;
pub mod log;
pub mod node_leases;
mod store;
#[doc(hidden)]
pub mod testing;

pub use election::Election;
pub use log::SharedLog;
pub use node_leases::{NodeLease, NodeLeases};
pub use store::{EtcdStore, Target};
