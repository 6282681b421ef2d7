//! Protection schedules (issue 18): the writer of a protected VM's volumes holds the
//! VM's snapshot schedule (`SetProtection`) and takes the snapshots itself; the plan
//! only gives it the schedule, changes it, and takes it away.

use super::build::Builder;
use super::{Change, ChangeKind, NodeAction};
use crate::desired::DesiredProtection;
use crate::observe::{NodeObservation, ObservedProtection};

fn set(vm: &str, p: &DesiredProtection) -> NodeAction {
    NodeAction::SetProtection {
        vm: vm.to_owned(),
        plan: p.plan.clone(),
        volumes: p.volumes.clone(),
        every_ms: p.every_ms,
        keep: p.keep,
    }
}

fn schedule_text(plan: &str, every_ms: u64, keep: u32) -> String {
    format!(
        "plan {plan}: a snapshot of every disk at once every {}, the newest {keep} kept",
        compiler::units::format_duration(every_ms)
    )
}

fn same(want: &DesiredProtection, have: &ObservedProtection) -> bool {
    want.plan == have.plan
        && want.volumes == have.volumes
        && want.every_ms == have.every_ms
        && want.keep == have.keep
}

/// Schedules: each protected VM's goes to the node that writes its first disk (where
/// the VM runs its disks from), after the steps that make its volumes; a schedule a
/// node holds that is not wanted there any more (the VM left the specs or its plan,
/// or its disks' writer moved) is removed (`every_ms` 0; the snapshots taken stay).
/// Planned last: it changes nothing any other step needs.
pub(super) fn plan_protections(b: &mut Builder<'_>) {
    let desired = b.desired;
    let observed = b.observed;
    let mut wanted_on: std::collections::BTreeMap<&str, &str> = Default::default();
    for (vm, want) in &desired.protections {
        let Some(writer) = want.volumes.first().and_then(|first| {
            desired
                .moved_writers
                .get(first)
                .or_else(|| desired.volumes.get(first).map(|v| &v.node))
        }) else {
            continue;
        };
        wanted_on.insert(vm.as_str(), writer.as_str());
        let Some(NodeObservation::Reachable { protections, .. }) = observed.nodes.get(writer)
        else {
            continue;
        };
        let (kind, details) = match protections.get(vm) {
            Some(have) if same(want, have) => continue,
            Some(have) => (
                ChangeKind::Update,
                vec![format!(
                    "{} (was {})",
                    schedule_text(&want.plan, want.every_ms, want.keep),
                    schedule_text(&have.plan, have.every_ms, have.keep)
                )],
            ),
            None => (
                ChangeKind::Create,
                vec![format!(
                    "{}; disks {}",
                    schedule_text(&want.plan, want.every_ms, want.keep),
                    want.volumes.join(" ")
                )],
            ),
        };
        let makes_volumes: Vec<usize> = b
            .steps
            .iter()
            .filter(|s| {
                matches!(&s.action,
                    NodeAction::CreateVolume { name, .. } | NodeAction::CloneVolume { name, .. }
                        if want.volumes.contains(name))
            })
            .map(|s| s.id)
            .collect();
        let step = b.step(writer, set(vm, want), makes_volumes);
        let tenant = desired.tenants.get(vm).cloned().unwrap_or_default();
        b.changes.push(Change {
            details,
            steps: vec![step],
            ..Change::new(kind, "protection", vm, &tenant, writer)
        });
    }
    for (node, observation) in &observed.nodes {
        let NodeObservation::Reachable { protections, .. } = observation else {
            continue;
        };
        for (vm, have) in protections {
            if wanted_on.get(vm.as_str()) == Some(&node.as_str()) {
                continue;
            }
            let step = b.step(
                node,
                NodeAction::SetProtection {
                    vm: vm.clone(),
                    plan: have.plan.clone(),
                    volumes: have.volumes.clone(),
                    every_ms: 0,
                    keep: 0,
                },
                vec![],
            );
            let tenant = desired.tenants.get(vm).cloned().unwrap_or_default();
            b.changes.push(Change {
                details: vec![format!(
                    "no plan protects it here any more: the node stops taking its snapshots (those taken stay); was {}",
                    schedule_text(&have.plan, have.every_ms, have.keep)
                )],
                steps: vec![step],
                ..Change::new(ChangeKind::Delete, "protection", vm, &tenant, node)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::desired;
    use crate::observe::{NodeObservation, Observed, ObservedProtection};
    use crate::plan::{ChangeKind, NodeAction, Plan, plan};

    /// The quickstart with a protection plan for tenant dev (web-0..2 and db).
    fn protected_quickstart() -> desired::Desired {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let mut files: Vec<(String, String)> = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "kdl"))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read_to_string(&p).unwrap(),
                )
            })
            .collect();
        files.push((
            "protection.kdl".into(),
            "protection-plan \"gold\" {\n    snapshot every=\"15m\" keep=96\n    applies-to tenant=\"dev\"\n}\nprotection-plan \"hourly\" {\n    snapshot every=\"1h\" keep=24\n    applies-to tenant=\"dev\"\n}\n".into(),
        ));
        let compilation = compiler::compile(&compiler::source::Sources::from_files(files));
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        let placement = desired::place(&compilation.model, None);
        desired::desired(&compilation.model, &root, placement)
    }

    fn empty_nodes(desired: &desired::Desired) -> Observed {
        let mut observed = Observed::default();
        for node in desired.nodes.keys() {
            observed.nodes.insert(
                node.clone(),
                NodeObservation::Reachable {
                    public_key_hex: String::new(),
                    vms: Default::default(),
                    volumes: Default::default(),
                    bonds: Default::default(),
                    networking: Default::default(),
                    protections: Default::default(),
                },
            );
        }
        observed
    }

    fn protection_changes(plan: &Plan) -> Vec<(ChangeKind, String, String)> {
        plan.changes
            .iter()
            .filter(|c| c.object == "protection")
            .map(|c| (c.kind, c.name.clone(), c.node.clone()))
            .collect()
    }

    #[test]
    fn each_protected_vm_gets_its_schedule_on_its_writer_once_and_loses_it_when_unprotected() {
        let desired = protected_quickstart();
        // The most frequent of the two plans wins.
        let db = &desired.protections["db"];
        assert_eq!(
            (db.plan.as_str(), db.every_ms, db.keep),
            ("gold", 900_000, 96)
        );
        assert_eq!(db.volumes, vec!["db-data".to_owned()]);
        assert!(!desired.protections.contains_key("backup"), "tenant ops");

        // A new cluster: every protected VM's schedule, on its volume's primary,
        // after the step that creates the volume.
        let mut observed = empty_nodes(&desired);
        let first = plan(&desired, &observed, "r1");
        let changes = protection_changes(&first);
        let vms: Vec<&str> = changes.iter().map(|(_, vm, _)| vm.as_str()).collect();
        assert_eq!(vms, vec!["db", "web-0", "web-1", "web-2"]);
        for (kind, vm, node) in &changes {
            assert_eq!(*kind, ChangeKind::Create);
            assert_eq!(
                node,
                &desired.volumes[&desired.protections[vm].volumes[0]].node
            );
            let step = first
                .steps
                .iter()
                .find(|s| matches!(&s.action, NodeAction::SetProtection { vm: v, .. } if v == vm))
                .unwrap();
            let creates: Vec<&NodeAction> = step
                .depends_on
                .iter()
                .map(|d| &first.steps[*d].action)
                .collect();
            assert!(
                matches!(creates.as_slice(), [NodeAction::CreateVolume { name, .. }] if name == &desired.protections[vm].volumes[0]),
                "{vm}: {creates:?}"
            );
            let request = step.action.to_request("p.1");
            let Some(proto::v1::apply_request::Action::SetProtection(set)) = request.action else {
                panic!("{request:?}");
            };
            assert_eq!((set.every_ms, set.keep), (900_000, 96));
        }

        // Once the nodes hold them: nothing to do.
        for (vm, p) in &desired.protections {
            let node = &desired.volumes[&p.volumes[0]].node;
            let Some(NodeObservation::Reachable { protections, .. }) = observed.nodes.get_mut(node)
            else {
                panic!("{node}");
            };
            protections.insert(
                vm.clone(),
                ObservedProtection {
                    plan: p.plan.clone(),
                    volumes: p.volumes.clone(),
                    every_ms: p.every_ms,
                    keep: p.keep,
                    last_snapshot: "auto-1".into(),
                    ..Default::default()
                },
            );
        }
        let again = plan(&desired, &observed, "r1");
        assert!(protection_changes(&again).is_empty(), "{:?}", again.changes);

        // A schedule the specs do not want (another keep; a VM no plan protects) is
        // changed or removed.
        let db_node = desired.volumes["db-data"].node.clone();
        let Some(NodeObservation::Reachable { protections, .. }) = observed.nodes.get_mut(&db_node)
        else {
            panic!();
        };
        protections.get_mut("db").unwrap().keep = 10;
        protections.insert(
            "backup".into(),
            ObservedProtection {
                plan: "old".into(),
                volumes: vec!["backup-scratch".into()],
                every_ms: 60_000,
                keep: 5,
                ..Default::default()
            },
        );
        let fix = plan(&desired, &observed, "r1");
        let changes: BTreeMap<String, ChangeKind> = protection_changes(&fix)
            .into_iter()
            .map(|(kind, vm, _)| (vm, kind))
            .collect();
        assert_eq!(
            changes,
            BTreeMap::from([
                ("backup".to_owned(), ChangeKind::Delete),
                ("db".to_owned(), ChangeKind::Update)
            ])
        );
        assert!(fix.steps.iter().any(|s| matches!(
            &s.action,
            NodeAction::SetProtection { vm, every_ms: 0, .. } if vm == "backup"
        )));
    }
}
