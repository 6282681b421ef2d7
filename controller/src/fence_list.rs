//! HA VMs on the move are fenced wherever they start (issue 16, "never twice").
//!
//! A grant's `fenced_vms` names the node's HA and FT VMs of the stored placement, and
//! a node disarms every running VM its last grant does not name (a VMM starts armed,
//! so that a VM of availability `none` must be disarmed). A VM restarted by HA is in
//! the stored placement of its new node only once the drift check's execution ended,
//! so its new node disarmed it in between; cut off then, the node never fenced it and
//! the controller restarted it once more elsewhere: it ran twice
//! (`ha_faults::a_vm_restarted_by_ha_is_fenced_on_its_new_node_cut_off_at_once`).
//!
//! [`with_moving`] adds, for every node, the HA and FT VMs of its site whose stored
//! node has not renewed its lease for 2T/3 (it missed a renewal): those are the VMs
//! an HA restart may start on any node of the site. A node is declared failed no
//! sooner than T + margin (margin ≥ T/3) after its last grant, so every peer renews
//! at least once (every T/3) with those VMs named before one of them is restarted,
//! and its VMM stays armed from its first instruction. Naming a VM a node does not
//! run costs nothing (the node only arms VMs it runs); a node that missed one renewal
//! and comes back only had its VMs named to its peers for a while.

use std::collections::BTreeSet;

use crate::Shared;

/// `fenced` (the node's own HA and FT VMs) and the HA and FT VMs of its site whose
/// node went quiet.
pub fn with_moving(
    shared: &Shared,
    model: &compiler::Model,
    node: &str,
    mut fenced: Vec<String>,
) -> Vec<String> {
    let Some(site) = model
        .sites
        .iter()
        .find(|s| s.nodes.iter().any(|n| n.name == node))
    else {
        return fenced;
    };
    // Per renewal: the site's nodes only (`Leases::rows` is O(cluster) and ran here
    // on every renewal, O(cluster²) per renewal period).
    let quiet: BTreeSet<String> = shared.leases.quiet_peers(site, node);
    if quiet.is_empty() {
        return fenced;
    }
    // Their HA and FT VMs from the lease service's lists by node (the stored
    // placement, read at most every T/3), not the store on every renewal: with a
    // peer quiet (a node failing) every renewal of its site would read and decode
    // the whole placement.
    for peer in &quiet {
        for vm in shared.leases.fenced_vms(peer, model, shared).0 {
            if !fenced.contains(&vm) {
                fenced.push(vm);
            }
        }
    }
    fenced
}
