//! Protection schedules (issue 18): the writer of a protected VM's volumes holds the
//! VM's snapshot schedule (`SetProtection`) and takes the snapshots itself; the plan
//! only gives it the schedule, changes it, and takes it away.

use super::build::Builder;
use super::{Change, ChangeKind, LeftAlone, NodeAction, PeerRef};
use crate::desired::{DesiredProtection, DesiredReplication};
use crate::observe::{NodeObservation, ObservedProtection, ObservedReplication};

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
    let mut volume_makers: Option<std::collections::HashMap<String, Vec<usize>>> = None;
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
        // The steps that make volumes, by volume, indexed once (a scan of every
        // step per protected VM was quadratic: minutes for a plan from nothing at
        // 100,000 VMs).
        let makers = volume_makers.get_or_insert_with(|| {
            let mut by_volume: std::collections::HashMap<String, Vec<usize>> = Default::default();
            for s in &b.steps {
                if let NodeAction::CreateVolume { name, .. }
                | NodeAction::CloneVolume { name, .. } = &s.action
                {
                    by_volume.entry(name.clone()).or_default().push(s.id);
                }
            }
            by_volume
        });
        let mut makes_volumes: Vec<usize> = want
            .volumes
            .iter()
            .filter_map(|v| makers.get(v))
            .flatten()
            .copied()
            .collect();
        makes_volumes.sort_unstable();
        makes_volumes.dedup();
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
    plan_replications(b);
}

/// The definition of a restore drill's VM (issue 18): `vm`'s definition named `name`,
/// attaching `volumes` (clones of its disks' replicated snapshots at the DR site),
/// without its NICs (a drill must not reach the production networks).
pub fn drill_definition(
    vm: &crate::desired::DesiredVm,
    desired: &crate::desired::Desired,
    name: &str,
    volumes: Vec<String>,
) -> NodeAction {
    let mut definition = super::vms::vm_definition(vm, desired);
    if let NodeAction::CreateVm {
        name: n,
        volumes: v,
        nics,
        addresses,
        ..
    } = &mut definition
    {
        *n = name.to_owned();
        *v = volumes;
        nics.clear();
        addresses.clear();
    }
    definition
}

/// The definition (`CreateVm`) the plan gives `vm` on its node: what a failover
/// defines at the DR site and a failback at the VM's own site.
pub fn vm_definition_of(
    vm: &crate::desired::DesiredVm,
    desired: &crate::desired::Desired,
) -> NodeAction {
    super::vms::vm_definition(vm, desired)
}

fn replication_text(r: &DesiredReplication, target: &str) -> String {
    format!(
        "plan {}: its snapshots shipped every {} to DR copy {} on {target} (site {}, pool {}), as the 4 KiB blocks changed since the newest snapshot both hold; the newest {} kept there",
        r.plan,
        compiler::units::format_duration(r.every_ms),
        r.target_volume,
        r.site,
        r.pool,
        r.keep
    )
}

/// The node's view of a replication it holds: `(role, peer)`.
fn observed_replication<'o>(
    b: &Builder<'o>,
    node: &str,
    volume: &str,
) -> Option<&'o ObservedReplication> {
    match b.observed.nodes.get(node) {
        Some(NodeObservation::Reachable { replications, .. }) => replications.get(volume),
        _ => None,
    }
}

/// Delta replications to another site (`replicate to-site=`): for every protected
/// disk the DR copy's writer accepts deltas from the source volume's writer
/// (`AcceptReplication`, after the step that creates the DR copy), then the source's
/// writer holds the schedule (`ReplicateVolume`, after the accept and the source
/// volume's creation); each is sent only when the node does not report it as wanted.
/// A schedule or an accept a node holds that no plan wants there any more is
/// removed (the DR copy and its snapshots stay while the specs name the disk).
fn plan_replications(b: &mut Builder<'_>) {
    let desired = b.desired;
    let observed = b.observed;
    let mut sources: std::collections::BTreeMap<&str, &str> = Default::default();
    let mut targets: std::collections::BTreeMap<&str, &str> = Default::default();
    for r in desired.replications.values() {
        let Some(source) = desired
            .moved_writers
            .get(&r.volume)
            .or_else(|| desired.volumes.get(&r.volume).map(|v| &v.node))
        else {
            continue;
        };
        let Some(target) = desired.volumes.get(&r.target_volume).map(|v| &v.node) else {
            continue;
        };
        sources.insert(&r.volume, source);
        targets.insert(&r.target_volume, target);
        if let Some(down) = [source, target]
            .into_iter()
            .find(|n| !observed.reachable(n))
        {
            b.left_alone.push(LeftAlone {
                object: "replication".into(),
                name: r.volume.clone(),
                node: down.clone(),
                reason: String::new(),
            });
            continue;
        }
        let have_source = observed_replication(b, source, &r.volume);
        let source_ok = have_source.is_some_and(|h| {
            h.role == "source"
                && h.peer == *target
                && h.peer_volume == r.target_volume
                && h.every_ms == r.every_ms
                && h.keep == r.keep
        });
        let target_ok = observed_replication(b, target, &r.target_volume)
            .is_some_and(|h| h.role == "target" && h.peer == *source);
        if source_ok && target_ok {
            continue;
        }
        let peer = |node: &str| PeerRef {
            name: node.to_owned(),
            address: b.address(node),
            public_key_hex: b.public_key(node),
        };
        let (source_peer, target_peer) = (peer(source), peer(target));
        let mut steps = vec![];
        let mut accept = vec![];
        if !target_ok {
            let after = b
                .volume_steps
                .get(&r.target_volume)
                .cloned()
                .unwrap_or_default();
            let step = b.step(
                target,
                NodeAction::AcceptReplication {
                    volume: r.target_volume.clone(),
                    source: source_peer,
                },
                after,
            );
            steps.push(step);
            accept.push(step);
        }
        if !source_ok || !target_ok {
            let mut after = accept;
            after.extend(b.volume_steps.get(&r.volume).cloned().unwrap_or_default());
            steps.push(b.step(
                source,
                NodeAction::ReplicateVolume {
                    volume: r.volume.clone(),
                    target: target_peer,
                    target_volume: r.target_volume.clone(),
                    every_ms: r.every_ms,
                    keep: r.keep,
                },
                after,
            ));
        }
        let text = replication_text(r, target);
        let (kind, details) = match have_source.filter(|h| h.role == "source") {
            None => (ChangeKind::Create, vec![text]),
            Some(h) => (
                ChangeKind::Update,
                vec![format!(
                    "{text} (was: every {} to {} on {}, {} kept{})",
                    compiler::units::format_duration(h.every_ms),
                    h.peer_volume,
                    h.peer,
                    h.keep,
                    if target_ok {
                        ""
                    } else {
                        "; the DR copy's node does not accept it yet"
                    }
                )],
            ),
        };
        let tenant = desired.tenants.get(&r.vm).cloned().unwrap_or_default();
        b.changes.push(Change {
            details,
            steps,
            ..Change::new(kind, "replication", &r.volume, &tenant, source)
        });
    }
    for (node, observation) in &observed.nodes {
        let NodeObservation::Reachable { replications, .. } = observation else {
            continue;
        };
        for (volume, have) in replications {
            let wanted = match have.role.as_str() {
                "source" => sources.get(volume.as_str()) == Some(&node.as_str()),
                _ => targets.get(volume.as_str()) == Some(&node.as_str()),
            };
            if wanted {
                continue;
            }
            let tenant = desired
                .spec_volumes
                .get(volume)
                .and_then(|vm| desired.tenants.get(vm))
                .cloned()
                .unwrap_or_default();
            let (action, detail) = if have.role == "source" {
                let address = b.address(&have.peer);
                (
                    NodeAction::ReplicateVolume {
                        volume: volume.clone(),
                        target: PeerRef {
                            name: have.peer.clone(),
                            address: if address.is_empty() {
                                have.peer.clone()
                            } else {
                                address
                            },
                            public_key_hex: b.public_key(&have.peer),
                        },
                        target_volume: have.peer_volume.clone(),
                        every_ms: 0,
                        keep: have.keep.max(1),
                    },
                    format!(
                        "no plan replicates it from here any more: the node stops shipping its snapshots to {} on {} (what was shipped stays there)",
                        have.peer_volume, have.peer
                    ),
                )
            } else {
                (
                    NodeAction::AcceptReplication {
                        volume: volume.clone(),
                        source: PeerRef {
                            name: String::new(),
                            address: String::new(),
                            public_key_hex: String::new(),
                        },
                    },
                    format!(
                        "no plan replicates into it from {} any more: the node stops accepting deltas (the snapshots received stay)",
                        have.peer
                    ),
                )
            };
            let step = b.step(node, action, vec![]);
            b.changes.push(Change {
                details: vec![detail],
                steps: vec![step],
                ..Change::new(ChangeKind::Delete, "replication", volume, &tenant, node)
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
                    replications: Default::default(),
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

    /// `examples/dr`: two sites, one node each; db (site east) is protected by a plan
    /// that snapshots and replicates to pool `dr` of site west every second.
    fn two_sites(previous: Option<&desired::Placement>) -> desired::Desired {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/dr");
        let sources = compiler::source::Sources::load_dir(&root).expect("examples/dr");
        let compilation = compiler::compile(&sources);
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        let placement = desired::place(&compilation.model, previous);
        desired::desired(&compilation.model, &root, placement)
    }

    fn keyed<'o>(
        observed: &'o mut Observed,
        node: &str,
    ) -> &'o mut BTreeMap<String, crate::observe::ObservedReplication> {
        let Some(NodeObservation::Reachable {
            public_key_hex,
            replications,
            ..
        }) = observed.nodes.get_mut(node)
        else {
            panic!("{node}");
        };
        *public_key_hex = format!("{:0>64}", node.len());
        replications
    }

    /// east-1 ships db's disk to west-1 (as the source reports it).
    fn shipping(
        target_volume: &str,
        every_ms: u64,
        keep: u32,
    ) -> crate::observe::ObservedReplication {
        crate::observe::ObservedReplication {
            role: "source".into(),
            peer: "west-1".into(),
            peer_volume: target_volume.into(),
            every_ms,
            keep,
            ..Default::default()
        }
    }

    /// west-1 accepts from east-1 (as the target reports it).
    fn receiving() -> crate::observe::ObservedReplication {
        crate::observe::ObservedReplication {
            role: "target".into(),
            peer: "east-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_replicated_disk_gets_a_dr_copy_at_the_target_site_and_both_ends_of_its_replication() {
        let desired = two_sites(None);
        // The DR copy: a volume of the target site's pool, with the source's size.
        let dr = &desired.volumes["db-data-dr-west"];
        assert_eq!(
            (dr.node.as_str(), dr.vm.as_str(), dr.size_bytes),
            ("west-1", "db", 16 << 20)
        );
        assert_eq!(desired.spec_volumes["db-data-dr-west"], "db");
        let r = &desired.replications["db-data"];
        assert_eq!(
            (
                r.target_volume.as_str(),
                r.site.as_str(),
                r.every_ms,
                r.keep
            ),
            ("db-data-dr-west", "west", 1000, 2)
        );
        // It stays where it is on the next placement.
        let again = two_sites(Some(&desired.placement));
        assert_eq!(again.placement.dr_volumes, desired.placement.dr_volumes);

        let mut observed = empty_nodes(&desired);
        keyed(&mut observed, "east-1");
        keyed(&mut observed, "west-1");
        let first = plan(&desired, &observed, "r1");
        let creates_dr = first
            .steps
            .iter()
            .find(|s| matches!(&s.action, NodeAction::CreateVolume { name, .. } if name == "db-data-dr-west"))
            .expect("the DR copy is created");
        assert_eq!(creates_dr.node, "west-1");
        let accept = first
            .steps
            .iter()
            .find(|s| matches!(&s.action, NodeAction::AcceptReplication { .. }))
            .expect("accept");
        assert_eq!(accept.node, "west-1");
        assert_eq!(accept.depends_on, vec![creates_dr.id]);
        let NodeAction::AcceptReplication { volume, source } = &accept.action else {
            unreachable!()
        };
        assert_eq!(
            (volume.as_str(), source.name.as_str()),
            ("db-data-dr-west", "east-1")
        );
        assert_eq!(source.public_key_hex.len(), 64);
        let ship = first
            .steps
            .iter()
            .find(|s| matches!(&s.action, NodeAction::ReplicateVolume { .. }))
            .expect("replicate");
        assert_eq!(ship.node, "east-1");
        assert!(
            ship.depends_on.contains(&accept.id),
            "{:?}",
            ship.depends_on
        );
        let creates_source = first
            .steps
            .iter()
            .find(
                |s| matches!(&s.action, NodeAction::CreateVolume { name, .. } if name == "db-data"),
            )
            .unwrap();
        assert!(ship.depends_on.contains(&creates_source.id));
        let request = ship.action.to_request("p.1");
        let Some(proto::v1::apply_request::Action::ReplicateVolume(set)) = request.action else {
            panic!("{request:?}");
        };
        assert_eq!(
            (set.target_volume.as_str(), set.every_ms, set.keep, set.now),
            ("db-data-dr-west", 1000, 2, false)
        );
        assert_eq!(set.target.unwrap().address, "127.0.0.22:7100");
        let change = first
            .changes
            .iter()
            .find(|c| c.object == "replication")
            .expect("a replication change");
        assert_eq!(
            (change.kind, change.name.as_str(), change.node.as_str()),
            (ChangeKind::Create, "db-data", "east-1")
        );
        assert!(
            change.details[0].contains("to DR copy db-data-dr-west on west-1 (site west, pool dr)"),
            "{:?}",
            change.details
        );

        // Both nodes report it: nothing to do for it.
        keyed(&mut observed, "east-1")
            .insert("db-data".into(), shipping("db-data-dr-west", 1000, 2));
        keyed(&mut observed, "west-1").insert("db-data-dr-west".into(), receiving());
        let held = plan(&desired, &observed, "r1");
        assert!(
            !held.changes.iter().any(|c| c.object == "replication"),
            "{:?}",
            held.changes
        );
        // Another keep is an update of the source's schedule only.
        keyed(&mut observed, "east-1")
            .get_mut("db-data")
            .unwrap()
            .keep = 5;
        let update = plan(&desired, &observed, "r1");
        let steps: Vec<(&str, &str)> = update
            .steps
            .iter()
            .filter(|s| {
                matches!(
                    s.action,
                    NodeAction::ReplicateVolume { .. } | NodeAction::AcceptReplication { .. }
                )
            })
            .map(|s| (s.node.as_str(), s.action.word()))
            .collect();
        assert_eq!(steps, vec![("east-1", "replicate_volume")]);
        // A replication no plan wants is removed at both ends.
        keyed(&mut observed, "east-1")
            .insert("old-data".into(), shipping("old-data-dr-west", 1000, 1));
        keyed(&mut observed, "west-1").insert("old-data-dr-west".into(), receiving());
        let removed = plan(&desired, &observed, "r1");
        let deletes: Vec<(&str, &str)> = removed
            .changes
            .iter()
            .filter(|c| c.object == "replication" && c.kind == ChangeKind::Delete)
            .map(|c| (c.name.as_str(), c.node.as_str()))
            .collect();
        assert_eq!(
            deletes,
            vec![("old-data", "east-1"), ("old-data-dr-west", "west-1")]
        );
        assert!(removed.steps.iter().any(|s| matches!(
            &s.action,
            NodeAction::ReplicateVolume { volume, every_ms: 0, .. } if volume == "old-data"
        )));
    }

    #[test]
    fn status_shows_each_protected_vms_last_snapshot_and_its_replications_recovery_point() {
        let desired = two_sites(None);
        let mut observed = empty_nodes(&desired);
        let status = crate::status::status(&desired, &observed, None, None, vec![]);
        let row = &status.protection[0];
        assert_eq!(
            (row.vm.as_str(), row.node.as_str(), row.state.as_str()),
            ("db", "east-1", "pending")
        );
        assert_eq!(row.replications[0].state, "pending");
        let Some(NodeObservation::Reachable { protections, .. }) = observed.nodes.get_mut("east-1")
        else {
            panic!();
        };
        protections.insert(
            "db".into(),
            ObservedProtection {
                plan: "dr".into(),
                volumes: vec!["db-data".into()],
                every_ms: 1000,
                keep: 3,
                last_snapshot: "auto-1000".into(),
                last_snapshot_at_unix_ms: 1000,
                ..Default::default()
            },
        );
        keyed(&mut observed, "east-1").insert(
            "db-data".into(),
            crate::observe::ObservedReplication {
                last_replicated: "auto-900".into(),
                last_error: "transfer failed: node west-1 unavailable".into(),
                ..shipping("db-data-dr-west", 1000, 2)
            },
        );
        keyed(&mut observed, "west-1").insert(
            "db-data-dr-west".into(),
            crate::observe::ObservedReplication {
                last_replicated: "auto-1000".into(),
                last_replicated_at_unix_ms: 1000,
                rpo_ms: 2300,
                in_transfer: "auto-2000".into(),
                transferred_to: 3 << 20,
                ..receiving()
            },
        );
        let status = crate::status::status(&desired, &observed, None, None, vec![]);
        let row = &status.protection[0];
        assert_eq!(
            (row.state.as_str(), row.last_snapshot.as_str()),
            ("ok", "auto-1000")
        );
        let r = &row.replications[0];
        // The target's word on what it committed; the source's on what failed.
        assert_eq!(
            (
                r.state.as_str(),
                r.last_replicated.as_str(),
                r.rpo_ms,
                r.in_transfer.as_str(),
                r.transferred_bytes
            ),
            ("failing", "auto-1000", 2300, "auto-2000", 3 << 20)
        );
        let text = crate::status::text(&status);
        for want in [
            "protection:",
            "db  dr    east-1  every 1s, 3 kept",
            "db-data-dr-west on west-1 (site west)",
            "auto-1000        2.3s",
            "failing (auto-2000 in transfer, 3MiB there)",
            "! replication of db-data: transfer failed: node west-1 unavailable",
        ] {
            assert!(text.contains(want), "{want}:\n{text}");
        }
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["protection"][0]["replications"][0]["rpo_ms"], 2300);
    }

    /// A failover of site east (`crate::desired::failover`): db runs at west from
    /// its DR copy; a returning east-1 gets its copy deleted, never started or moved.
    #[test]
    fn a_failed_over_vm_runs_from_its_dr_copy_and_its_copy_at_the_lost_site_is_only_deleted() {
        let before = two_sites(None);
        assert_eq!(before.vms["db"].node, "east-1");
        let mut placement = (*before.placement).clone();
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
            let mut observed = empty_nodes(&after);
            if let Some(NodeObservation::Reachable { vms, .. }) = observed.nodes.get_mut("east-1") {
                vms.insert(
                    "db".to_owned(),
                    serde_json::from_value(serde_json::json!({
                        "name": "db", "state": state, "health": "healthy", "vcpus": 1,
                        "memory_bytes": 64 << 20, "crash_count": 0, "volumes": ["db-data"],
                    }))
                    .unwrap(),
                );
            }
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
