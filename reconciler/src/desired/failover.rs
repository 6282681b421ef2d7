//! Site failover in the desired state (issue 18, `cairn failover --site SITE`).
//!
//! The placement records every failover of a site (`Placement::failovers`, the site
//! epoch). While one is in force, each of its VMs is desired on the DR site's node
//! that writes its DR copies, with those copies as its disks and without NICs (the
//! mapping of networks to the DR site is not built). Its snapshot schedule and its
//! replication from the lost site are no longer desired, so when the lost site's
//! nodes return the plan stops what they still hold (their schedule, their shipping
//! into the DR copies, which the failover already refused at the DR copy's node) and
//! deletes their copy of the VM instead of starting or moving it: a VM of a failed
//! over site never runs there again, and nothing is taken from there, until
//! `cairn failback` closes the record.

use super::Desired;

/// Applies the failovers in force to `desired` (called by `desired::desired`).
pub(crate) fn apply(placement: &compiler::place::Placement, desired: &mut Desired) {
    for failover in placement
        .failovers
        .iter()
        .filter(|f| f.failed_back_at_unix_ms.is_none())
    {
        // Only the newest record of a site counts.
        if placement.failover_of(&failover.site) != Some(failover) {
            continue;
        }
        for vm in &failover.vms {
            let Some(d) = desired.vms.get_mut(&vm.name) else {
                continue;
            };
            d.node = vm.node.clone();
            d.volumes = vm.volumes.clone();
            d.nics.clear();
            desired.protections.remove(&vm.name);
            desired.replications.retain(|_, r| r.vm != vm.name);
            desired
                .failed_over
                .insert(vm.name.clone(), failover.site.clone());
        }
    }
}

/// Whether `node`'s copy of `vm` is one a failover left behind at its lost site:
/// never moved from (nor started), only deleted.
pub(crate) fn left_behind(desired: &Desired, vm: &str, node: &str) -> bool {
    desired
        .failed_over
        .get(vm)
        .is_some_and(|site| desired.nodes.get(node).is_some_and(|n| n.site == *site))
}
