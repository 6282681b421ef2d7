//! Integration tests of `cairn-node`: real processes on 127.0.0.1 with temporary
//! data directories, spoken to over real gRPC.

mod adopt;
mod apply;
mod auth;
mod auto_snapshots;
mod bad_input;
mod bonds;
mod cgroup_parents;
mod copies;
mod counters;
mod delta_replication;
mod epochs;
mod exports;
mod ft;
mod guest_io;
mod harness;
mod health;
mod inventory;
mod lab;
mod migrate;
mod outcome;
mod pinning;
mod protocol;
mod remote_data;
mod replication;
mod resize;
mod segments;
mod skew;
mod sla;
mod snapshots;
mod upgrade;
mod vm_disks;
mod vms;
mod volume_access;
mod write_intents;
mod write_queue;
