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

#[cfg(test)]
mod tests {
    use crate::desired;
    use crate::observe::{NodeObservation, Observed};
    use crate::plan::{ChangeKind, NodeAction, plan};

    /// `examples/dr` with `previous` as the stored placement.
    fn two_sites(previous: Option<&desired::Placement>) -> desired::Desired {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/dr");
        let sources = compiler::source::Sources::load_dir(&root).expect("examples/dr");
        let compilation = compiler::compile(&sources);
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        let placement = desired::place(&compilation.model, previous);
        desired::desired(&compilation.model, &root, placement)
    }

    /// Both nodes answer; east-1 still holds `db` in `state` (it returned).
    fn returned(desired: &desired::Desired, state: &str) -> Observed {
        let mut observed = Observed::default();
        for node in desired.nodes.keys() {
            let mut vms = std::collections::BTreeMap::new();
            if node == "east-1" {
                vms.insert(
                    "db".to_owned(),
                    serde_json::from_value(serde_json::json!({
                        "name": "db", "state": state, "health": "healthy", "vcpus": 1,
                        "memory_bytes": 64 << 20, "crash_count": 0, "volumes": ["db-data"],
                    }))
                    .unwrap(),
                );
            }
            observed.nodes.insert(
                node.clone(),
                NodeObservation::Reachable {
                    public_key_hex: format!("{:0>64}", node.len()),
                    vms,
                    volumes: Default::default(),
                    bonds: Default::default(),
                    networking: Default::default(),
                    protections: Default::default(),
                    replications: Default::default(),
                },
            );
        }
        observed
    }

    #[test]
    fn a_failed_over_vm_runs_from_its_dr_copy_and_its_copy_at_the_lost_site_is_only_deleted() {
        let before = two_sites(None);
        assert_eq!(before.vms["db"].node, "east-1");
        let mut placement = before.placement.clone();
        placement.failovers.push(compiler::place::SiteFailover {
            site: "east".into(),
            to_site: "west".into(),
            epoch: placement.site_epoch("east") + 1,
            at_unix_ms: 1,
            failed_back_at_unix_ms: None,
            vms: vec![compiler::place::FailedOverVm {
                name: "db".into(),
                node: "west-1".into(),
                volumes: vec!["db-data-dr-west".into()],
                snapshot: "auto-1".into(),
                snapshot_at_unix_ms: 1,
            }],
        });
        // The record survives the next placement, and the desired state follows it.
        let after = two_sites(Some(&placement));
        assert_eq!(after.placement.site_epoch("east"), 1);
        assert!(after.placement.failover_of("east").is_some());
        let db = &after.vms["db"];
        assert_eq!(
            (db.node.as_str(), db.volumes.clone()),
            ("west-1", vec!["db-data-dr-west".to_owned()])
        );
        assert!(after.protections.is_empty() && after.replications.is_empty());
        assert_eq!(after.failed_over["db"], "east");
        // Both volumes stay wanted (the source is the failback's base).
        assert!(after.volumes.contains_key("db-data"));

        // East returns holding db, even running: it is deleted there, never the
        // source of a move to west (a live migration would carry its state over).
        for state in ["crashed", "running"] {
            let observed = returned(&after, state);
            let p = plan(&after, &observed, "r");
            let on_east: Vec<(ChangeKind, &str)> = p
                .changes
                .iter()
                .filter(|c| c.node == "east-1" && c.object == "vm")
                .map(|c| (c.kind, c.details.join(" ")))
                .map(|(k, d)| {
                    (
                        k,
                        if d.contains("its site failed over") {
                            "fo"
                        } else {
                            "?"
                        },
                    )
                })
                .collect();
            assert_eq!(on_east, [(ChangeKind::Delete, "fo")], "{state}: {p:#?}");
            assert!(
                p.steps.iter().all(|s| !matches!(
                    s.action,
                    NodeAction::MigrateVm { .. } | NodeAction::StartVm { .. }
                        if s.node == "east-1"
                )),
                "{state}"
            );
            assert!(
                p.steps.iter().any(|s| s.node == "west-1"
                    && matches!(&s.action, NodeAction::StartVm { name } if name == "db")),
                "{state}: db starts at west"
            );
        }

        // Failed back: the VM belongs to east again, and the epoch stays.
        placement.failovers[0].failed_back_at_unix_ms = Some(2);
        let back = two_sites(Some(&placement));
        assert_eq!(back.vms["db"].node, "east-1");
        assert!(back.failed_over.is_empty());
        assert!(back.replications.contains_key("db-data"));
        assert_eq!(back.placement.site_epoch("east"), 1);
        assert!(back.placement.failover_of("east").is_none());
    }
}
