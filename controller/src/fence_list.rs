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

use reconciler::state::StateStore as _;

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
    let quiet: BTreeSet<String> = shared
        .leases
        .rows(model)
        .into_iter()
        .filter(|r| r.node != node && site.nodes.iter().any(|n| n.name == r.node))
        .filter(|r| {
            r.last_grant_ms_ago
                .is_some_and(|ago| ago.saturating_mul(3) >= r.detect_ms.saturating_mul(2))
        })
        .map(|r| r.node)
        .collect();
    if quiet.is_empty() {
        return fenced;
    }
    let guarded: BTreeSet<&str> = model
        .vms
        .iter()
        .filter(|m| m.availability != compiler::model::Availability::None && m.site == site.name)
        .map(|m| m.name.as_str())
        .collect();
    let placement = shared
        .state_store()
        .ok()
        .and_then(|store| store.placement().ok().flatten());
    for vm in placement.iter().flat_map(|p| &p.vms) {
        if quiet.contains(&vm.node)
            && guarded.contains(vm.name.as_str())
            && !fenced.contains(&vm.name)
        {
            fenced.push(vm.name.clone());
        }
    }
    fenced
}
