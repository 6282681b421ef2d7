//! Integration tests of the network crate. Every test that touches the
//! kernel builds throwaway network namespaces (switch, node, peer) and
//! deletes them at the end; without root or namespaces it prints why it
//! skips. Traffic only flows between addresses inside those namespaces.

mod announce_v6;
mod bond;
mod common;
mod dev_cluster;
mod dhcp;
mod dns;
mod failover;
mod guest_guard;
mod ipv6;
mod netns;
mod overlay;
mod overlay_support;
mod refusal;
mod steering;
mod tenant;
mod traffic;
