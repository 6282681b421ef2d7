//! Tenant network segments (issue 19): per node, each segment `desired.segments`
//! names is made, changed or repaired; segments the node keeps that are no longer
//! wanted there are deleted.

use std::collections::{BTreeMap, BTreeSet};

use super::build::Builder;
use super::{Change, ChangeKind, LeftAlone, NodeAction};
use crate::observe::{NodeObservation, ObservedSegment};
use crate::segments::DesiredSegment;

fn segment_details(s: &DesiredSegment) -> Vec<String> {
    let mut out = vec![format!(
        "vni {} over {}, mtu {}, {} remote NIC(s){}{}",
        s.vni,
        s.local_vtep,
        s.mtu,
        s.remotes.len(),
        if s.gateway.is_empty() {
            String::new()
        } else {
            format!(", gateway {}/{}", s.gateway, s.prefix_len)
        },
        if s.external { ", external" } else { "" },
    )];
    out.extend(
        s.remotes
            .iter()
            .map(|r| format!("{} {} ({}) -> {}", r.vm, r.ipv4, r.mac, r.vtep)),
    );
    out
}

/// What differs between the wanted segment and the one read back (empty: none).
pub(crate) fn segment_diff(want: &DesiredSegment, have: &ObservedSegment) -> Vec<String> {
    let mut out = vec![];
    if want.vni != have.vni {
        out.push(format!("vni {} -> {}", have.vni, want.vni));
    }
    if want.local_vtep != have.local_vtep {
        out.push(format!(
            "local vtep {} -> {}",
            if have.local_vtep.is_empty() {
                "none"
            } else {
                &have.local_vtep
            },
            want.local_vtep
        ));
    }
    if want.mtu != have.mtu {
        out.push(format!("mtu {} -> {}", have.mtu, want.mtu));
    }
    if !same_fdb(want, have) {
        let want_fdb = want.fdb();
        let have_fdb: BTreeSet<String> = have.fdb.iter().cloned().collect();
        for entry in want_fdb.difference(&have_fdb) {
            out.push(format!("+ fdb {entry}"));
        }
        for entry in have_fdb.difference(&want_fdb) {
            out.push(format!("- fdb {entry}"));
        }
    }
    if out.is_empty() {
        out.extend(have.drift.iter().map(|d| format!("repair: {d}")));
    }
    // Everything else the node keeps (security groups, gateway, external, underlay)
    // is compared by digest: a node that reports none (older) is not asked again.
    if out.is_empty()
        && !have.definition_digest.is_empty()
        && have.definition_digest != super::actions::segment_digest(want)
    {
        out.push(
            "definition changed (security groups, gateway, external or underlay; digest differs)"
                .to_owned(),
        );
    }
    out
}

/// Whether the node's forwarding entries are the wanted ones, compared as
/// [`DesiredSegment::fdb_pairs`] without making a string per entry.
fn same_fdb(want: &DesiredSegment, have: &ObservedSegment) -> bool {
    let Some(have) = have
        .fdb
        .iter()
        .map(|e| e.split_once(" -> "))
        .collect::<Option<std::collections::HashSet<(&str, &str)>>>()
    else {
        return false;
    };
    let wanted: std::collections::HashSet<(&str, &str)> = want.fdb_pairs().collect();
    wanted == have
}

/// The VTEP a migrating VM's source node has on segment `key`: the one the plan
/// wants there, else the one the node reports (its last VM of the tenant leaving).
fn source_vtep(b: &Builder<'_>, from: &str, key: &str) -> Option<String> {
    if let Some(s) = b.desired.segments.get(from).and_then(|s| s.get(key)) {
        return Some(s.local_vtep.clone());
    }
    match b.observed.nodes.get(from) {
        Some(NodeObservation::Reachable { networking, .. }) => networking
            .segments
            .get(key)
            .map(|s| s.local_vtep.clone())
            .filter(|v| !v.is_empty()),
        _ => None,
    }
}

/// Segments: each wanted segment the node lacks is created; one whose VNI, VTEP,
/// MTU or forwarding entries differ (a VM moved, a member joined or left), or that
/// the node reports drift for, is applied again (the node changes only what
/// differs). Security-group drift of the node is repaired by applying its first
/// wanted segment again (the node reprograms the groups from all its segments).
/// A node running its network in a named namespace (`networking.netns`, the dev
/// cluster) has no VTEP (see `crate::segments`) and is skipped.
/// Segments depend on nothing (their steps are in the first wave); a delete waits
/// for the VM deletes on that node. A node that refuses network actions has its
/// segments left alone with its reason.
pub(super) fn plan_segments(b: &mut Builder<'_>) {
    let desired = b.desired;
    let empty = Default::default();
    // A VM still in the specs that cannot be placed now keeps running where it runs
    // (`plan_vm_deletes`), but the wanted segments no longer count it: changing or
    // deleting its tenant's segments would cut a running VM off its network. Until
    // the specs give it room, its tenant's segments are only ever created, never
    // changed or deleted.
    let mut frozen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for left in b.left_alone.iter().filter(|l| l.object == "vm") {
        if desired.vms.contains_key(&left.name) || !desired.unplaced.contains_key(&left.name) {
            continue;
        }
        if let Some(tenant) = desired.tenants.get(&left.name) {
            frozen
                .entry(tenant.clone())
                .or_default()
                .push(left.name.clone());
        }
    }
    let frozen_reason = |tenant: &str| {
        frozen.get(tenant).map(|vms| {
            format!(
                "{} {} of its tenant cannot be placed now and {} on; its network stays as it is until the specs give it room",
                if vms.len() == 1 { "VM" } else { "VMs" },
                vms.join(", "),
                if vms.len() == 1 { "runs" } else { "run" }
            )
        })
    };
    let nodes: BTreeSet<&String> = desired
        .segments
        .keys()
        .chain(b.observed.nodes.keys())
        .collect();
    // Each node's bond steps (planned before the segments), indexed once: a scan of
    // every step per node was nodes × steps (175 s of a 100,000-VM plan).
    let mut bonds_of: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    for st in &b.steps {
        if let NodeAction::ApplyBond { name, .. } = &st.action {
            bonds_of
                .entry(st.node.clone())
                .or_default()
                .push((name.clone(), st.id));
        }
    }
    for node in nodes {
        let wanted = desired.segments.get(node).unwrap_or(&empty);
        let Some(NodeObservation::Reachable { networking, .. }) = b.observed.nodes.get(node) else {
            if b.observed.nodes.contains_key(node) {
                b.left_alone.extend(wanted.keys().map(|name| LeftAlone {
                    object: "segment".into(),
                    name: name.clone(),
                    node: node.clone(),
                    reason: String::new(),
                }));
            }
            continue;
        };
        if !networking.netns.is_empty() && wanted.values().any(|w| w.underlay_prefix_len == 0) {
            // Without `underlay=` the VTEP is the node's address
            // (crate::segments::vtep_of), which is not in a named namespace the node
            // runs its network in (the dev cluster's: its gRPC stays on the host's
            // loopback), so such a node gets no segment.
            continue;
        }
        // The node makes its underlay address on the bond: after that bond's step.
        let bond_steps: Vec<usize> = bonds_of
            .get(node.as_str())
            .into_iter()
            .flatten()
            .filter(|(name, _)| wanted.values().any(|w| &w.underlay_device == name))
            .map(|(_, id)| *id)
            .collect();
        let site = desired.nodes.get(node).map(|n| n.site.clone());
        let refused = !networking.unavailable.is_empty();
        let mut firewall_repaired = networking.firewall_drift.is_empty();
        for want in wanted.values() {
            let (kind, mut details) = match networking.segments.get(&want.key()) {
                None => (ChangeKind::Create, segment_details(want)),
                Some(have) => (ChangeKind::Update, segment_diff(want, have)),
            };
            if !firewall_repaired && kind == ChangeKind::Update {
                details.extend(
                    networking
                        .firewall_drift
                        .iter()
                        .map(|d| format!("repair: security groups: {d}")),
                );
            }
            if details.is_empty() {
                continue;
            }
            if refused {
                b.left_alone.push(LeftAlone {
                    object: "segment".into(),
                    name: want.key(),
                    node: node.clone(),
                    reason: format!(
                        "network actions are refused there: {}",
                        networking.unavailable
                    ),
                });
                continue;
            }
            if kind == ChangeKind::Update
                && let Some(reason) = frozen_reason(&want.tenant)
            {
                b.left_alone.push(LeftAlone {
                    object: "segment".into(),
                    name: want.key(),
                    node: node.clone(),
                    reason,
                });
                continue;
            }
            firewall_repaired = true;
            // A VM migrating live runs on its old node until the commit. On a third
            // node its entry names both nodes from the first wave (make before
            // break: the VXLAN device sends a copy to each, so the VM is reached
            // before and after the switch-over) and the old one is dropped after
            // its `migrate_vm` step. The node it leaves gets the entry after that
            // step (during pre-copy the VM is local there). The new node's own
            // segment (the VM's bridge there) does not wait.
            let mut depends = bond_steps.clone();
            // The VMs this node sends to both nodes meanwhile, with their source
            // node's VTEP, and those migrations' steps.
            let mut also_vteps: BTreeMap<String, String> = BTreeMap::new();
            let mut after_migrations = vec![];
            for (vm, step) in &b.moved {
                let NodeAction::MigrateVm { from, .. } = &b.steps[*step].action else {
                    continue;
                };
                let to = &b.steps[*step].node;
                if to == node || !want.remotes.iter().any(|r| r.vm == *vm) {
                    continue;
                }
                let from_vtep = (from != node)
                    .then(|| source_vtep(b, from, &want.key()))
                    .flatten();
                match from_vtep {
                    Some(from_vtep) => {
                        after_migrations.push(*step);
                        also_vteps.insert(vm.clone(), from_vtep.clone());
                        details.push(format!(
                            "during the live migration of {vm}: its frames go to both {from} ({from_vtep}) and {to}; {from} is dropped after the commit"
                        ));
                    }
                    None => {
                        depends.push(*step);
                        details.push(format!(
                            "after the live migration of {vm}: its entries point at {to} from the commit"
                        ));
                    }
                }
            }
            let mut steps = vec![];
            if !also_vteps.is_empty() {
                // A list of its own for this step only (the wanted one is shared
                // by every node's segment of the network).
                let mut during = DesiredSegment::clone(want);
                during.remotes = want
                    .remotes
                    .iter()
                    .map(|r| {
                        let mut r = r.clone();
                        if let Some(also) = also_vteps.get(&r.vm) {
                            r.also_vtep = also.clone();
                        }
                        r
                    })
                    .collect::<Vec<_>>()
                    .into();
                let first = b.step(
                    node,
                    NodeAction::ApplyNetworkSegment(std::sync::Arc::new(during)),
                    depends.clone(),
                );
                // The migrations start only once this node sends to both (unless
                // this node's step already waits for one of them: a drain's order).
                for m in &after_migrations {
                    b.add_dependency(*m, first);
                }
                steps.push(first);
                depends.push(first);
                depends.extend(after_migrations);
            }
            steps.push(b.step(node, NodeAction::ApplyNetworkSegment(want.clone()), depends));
            b.changes.push(Change {
                site: site.clone(),
                details,
                steps,
                ..Change::new(kind, "segment", &want.key(), &want.tenant, node)
            });
        }
        if refused {
            continue;
        }
        let deletes: Vec<String> = networking
            .segments
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in deletes {
            if b.keep_unpruned("segment", &key, node) {
                continue;
            }
            let (tenant, network) = key.split_once('/').unwrap_or(("", key.as_str()));
            if let Some(reason) = frozen_reason(tenant) {
                b.left_alone.push(LeftAlone {
                    object: "segment".into(),
                    name: key.clone(),
                    node: node.clone(),
                    reason,
                });
                continue;
            }
            let depends = b.deleted_vm_steps.get(node).cloned().unwrap_or_default();
            let step = b.step(
                node,
                NodeAction::DeleteNetworkSegment {
                    tenant: tenant.to_owned(),
                    network: network.to_owned(),
                },
                depends,
            );
            b.changes.push(Change {
                site: site.clone(),
                details: vec!["no VM of its tenant is placed on this node any more".into()],
                steps: vec![step],
                ..Change::new(ChangeKind::Delete, "segment", &key, tenant, node)
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use crate::desired::{self, Desired};
    use crate::observe::{NodeObservation, Observed, ObservedNetworking, ObservedSegment};
    use crate::plan::{ChangeKind, NodeAction, Plan, PlanOptions, plan, plan_with};

    fn quickstart() -> (compiler::Model, std::path::PathBuf) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let sources = compiler::source::Sources::load_dir(&root).unwrap();
        let compilation = compiler::compile(&sources);
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        (compilation.model, root)
    }

    pub(crate) fn desired_with(placement: Option<desired::Placement>) -> Desired {
        let (model, root) = quickstart();
        let placement = placement.unwrap_or_else(|| desired::place(&model, None));
        desired::desired(&model, &root, placement)
    }

    /// Every node reachable, with exactly the segments `desired` wants (converged).
    pub(crate) fn observed_as(desired: &Desired) -> Observed {
        let mut observed = Observed::default();
        for node in desired.nodes.keys() {
            let segments = desired
                .segments
                .get(node)
                .into_iter()
                .flatten()
                .map(|(k, s)| {
                    (
                        k.clone(),
                        ObservedSegment {
                            vni: s.vni,
                            mtu: s.mtu,
                            local_vtep: s.local_vtep.clone(),
                            fdb: s.fdb().into_iter().collect(),
                            drift: vec![],
                            definition_digest: crate::plan::actions::segment_digest(s),
                        },
                    )
                })
                .collect();
            observed.nodes.insert(
                node.clone(),
                NodeObservation::Reachable {
                    public_key_hex: String::new(),
                    vms: Default::default(),
                    volumes: Default::default(),
                    bonds: Default::default(),
                    networking: ObservedNetworking {
                        segments,
                        ..Default::default()
                    },
                    protections: Default::default(),
                    replications: Default::default(),
                },
            );
        }
        observed
    }

    fn networking<'a>(observed: &'a mut Observed, node: &str) -> &'a mut ObservedNetworking {
        match observed.nodes.get_mut(node) {
            Some(NodeObservation::Reachable { networking, .. }) => networking,
            _ => panic!("{node} not reachable"),
        }
    }

    /// `vm` observed running on `node` (as the node's Observe answer would say it).
    fn runs_on(observed: &mut Observed, node: &str, vm: &str) {
        let wire = proto::v1::ObserveResponse {
            vms: vec![proto::v1::VmStatus {
                name: vm.into(),
                state: proto::v1::VmState::Running as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let NodeObservation::Reachable { vms: running, .. } =
            crate::observe::from_wire(String::new(), wire)
        else {
            unreachable!("from_wire always answers Reachable")
        };
        let Some(NodeObservation::Reachable { vms, .. }) = observed.nodes.get_mut(node) else {
            panic!("{node} is observed")
        };
        vms.extend(running);
    }

    fn segment_changes(plan: &Plan) -> BTreeMap<(String, String), (ChangeKind, Vec<String>)> {
        plan.changes
            .iter()
            .filter(|c| c.object == "segment")
            .map(|c| {
                (
                    (c.node.clone(), c.name.clone()),
                    (c.kind, c.details.clone()),
                )
            })
            .collect()
    }

    #[test]
    fn a_network_spans_the_nodes_of_its_vms_with_entries_for_the_others() {
        let desired = desired_with(None);
        let dev = desired
            .placement
            .networks
            .iter()
            .find(|n| n.name == "dev-net")
            .unwrap();
        assert!(dev.nodes.len() >= 2, "dev-net spans {:?}", dev.nodes);
        let dev_nics = desired
            .placement
            .addresses
            .iter()
            .filter(|a| a.network == "dev-net")
            .count();
        assert_eq!(dev_nics, 5, "web-0..2, db and ledger");
        for node in &dev.nodes {
            let s = &desired.segments[node]["dev/dev-net"];
            assert_eq!(
                (s.vni, s.mtu, s.gateway.as_str()),
                (dev.vni, 1450, "10.77.0.1")
            );
            assert_eq!(s.prefix_len, 24);
            // The spec's `underlay=`, made by the node on the guest bond.
            assert_eq!(
                (
                    s.local_vtep.as_str(),
                    s.underlay_prefix_len,
                    s.underlay_device.as_str()
                ),
                (underlay(node), 24, "data")
            );
            let here = desired
                .vms
                .values()
                .filter(|v| &v.node == node && v.tenant == "dev")
                .count();
            assert_eq!(s.remotes.len(), dev_nics - here, "{node}: {:?}", s.remotes);
            for r in &s.remotes {
                let there = &desired.vms[&r.vm].node;
                assert_ne!(there, node);
                assert_eq!(r.vtep, underlay(there));
                assert_eq!(
                    Some(r.ipv4.as_str()),
                    desired.placement.nic_address(&r.vm, 0)
                );
            }
        }
        // A fresh cluster: a create per (node, segment).
        let mut empty = observed_as(&desired);
        for node in desired.nodes.keys() {
            networking(&mut empty, node).segments.clear();
        }
        let first = plan(&desired, &empty, "r1");
        let created = segment_changes(&first);
        let wanted: usize = desired.segments.values().map(|s| s.len()).sum();
        assert_eq!(created.len(), wanted);
        assert!(created.values().all(|(k, _)| *k == ChangeKind::Create));
        let step = first
            .steps
            .iter()
            .find(|s| s.action.word() == "apply_network_segment")
            .unwrap();
        // After the node's bond (`data`), where the node makes its underlay address.
        assert_eq!(step.wave, 1);
        assert!(step.depends_on.iter().all(|d| {
            let bond = &first.steps[*d];
            bond.node == step.node && bond.action.word() == "apply_bond"
        }));
        assert_eq!(step.depends_on.len(), 1);
        // The wire request carries what the desired segment says; VM NICs get its MTU.
        let NodeAction::ApplyNetworkSegment(seg) = &step.action else {
            panic!()
        };
        let request = step.action.to_request("x.1");
        let Some(proto::v1::apply_request::Action::ApplyNetworkSegment(wire)) = request.action
        else {
            panic!()
        };
        assert_eq!(
            (wire.vni, wire.mtu, wire.remotes.len()),
            (seg.vni, 1450, seg.remotes.len())
        );
        let create_vm = first
            .steps
            .iter()
            .find(|s| s.action.word() == "create_vm")
            .unwrap();
        let Some(proto::v1::apply_request::Action::CreateVm(vm)) =
            create_vm.action.to_request("x.2").action
        else {
            panic!()
        };
        assert!(vm.nics.iter().all(|n| n.mtu == 1450), "{:?}", vm.nics);
        // Converged: nothing to do.
        let again = plan(&desired, &observed_as(&desired), "r1");
        assert!(segment_changes(&again).is_empty(), "{:?}", again.changes);
    }

    #[test]
    fn the_segment_and_nic_mtu_follow_the_guest_bond() {
        // The quickstart's bond has MTU 1500: segments and NICs at 1450, and the
        // plan JSON keeps no nic_mtu (the default).
        let desired = desired_with(None);
        assert!(
            desired
                .segments
                .values()
                .flat_map(|s| s.values())
                .all(|s| s.mtu == 1450)
        );
        // A jumbo bond (9000): every segment and every VM NIC at 8950.
        let (mut model, root) = quickstart();
        for bond in model.sites.iter_mut().flat_map(|s| s.bonds.iter_mut()) {
            bond.mtu = 9000;
        }
        let placement = desired::place(&model, None);
        let jumbo = desired::desired(&model, &root, placement);
        let segments: Vec<u32> = jumbo
            .segments
            .values()
            .flat_map(|s| s.values().map(|s| s.mtu))
            .collect();
        assert!(!segments.is_empty() && segments.iter().all(|m| *m == 8950));
        let observed = observed_as(&jumbo);
        let made = plan(&jumbo, &observed, "r");
        let mut nics = 0;
        for step in &made.steps {
            if let NodeAction::CreateVm { nic_mtu, .. } = &step.action {
                assert_eq!(*nic_mtu, 8950);
                let Some(proto::v1::apply_request::Action::CreateVm(vm)) =
                    step.action.to_request("x").action
                else {
                    panic!("a CreateVm request");
                };
                for nic in &vm.nics {
                    assert_eq!(nic.mtu, 8950, "{}", vm.name);
                    nics += 1;
                }
            }
        }
        assert!(nics > 0, "{made:?}");
        let default = plan(&desired, &observed_as(&desired), "r");
        let json = serde_json::to_string(&default).unwrap();
        assert!(!json.contains("nic_mtu"), "left out at 1450");
    }

    #[test]
    fn a_moved_vm_updates_the_entries_on_every_node_of_its_network() {
        let before = desired_with(None);
        let observed = observed_as(&before);
        let mut placement = (*before.placement).clone();
        let was = before.vms["db"].node.clone();
        let to = before.nodes.keys().find(|n| **n != was).unwrap().clone();
        placement
            .vms
            .iter_mut()
            .find(|v| v.name == "db")
            .unwrap()
            .node = to.clone();
        for n in placement
            .networks
            .iter_mut()
            .filter(|n| n.name == "dev-net")
        {
            n.nodes.push(to.clone());
            n.nodes.sort();
            n.nodes.dedup();
        }
        let after = desired_with(Some(placement));
        let changes = segment_changes(&plan(&after, &observed, "r2"));
        let db_mac = crate::segments::default_mac("db", 0);
        // db's node of old now points at the new node; the new node no longer has
        // an entry for db (it is local there).
        for (node, s) in &after.segments {
            let Some(seg) = s.get("dev/dev-net") else {
                continue;
            };
            if before.segments.get(node).and_then(|s| s.get("dev/dev-net")) == Some(seg) {
                continue;
            }
            let (kind, details) = &changes[&(node.clone(), "dev/dev-net".to_owned())];
            if before
                .segments
                .get(node)
                .is_some_and(|s| s.contains_key("dev/dev-net"))
            {
                assert_eq!(*kind, ChangeKind::Update);
                assert!(
                    details.iter().any(|d| d.contains(&db_mac)),
                    "{node}: {details:?}"
                );
            }
        }
        // The node db left now sends db's frames to the node it moved to.
        let to_vtep = after.segments[&to]["dev/dev-net"].local_vtep.clone();
        let on_was = &changes[&(was.clone(), "dev/dev-net".to_owned())].1;
        assert!(
            on_was.contains(&format!("+ fdb {db_mac} -> {to_vtep}")),
            "{on_was:?}"
        );
        assert!(changes.contains_key(&(to.clone(), "dev/dev-net".to_owned())));
        assert!(changes.contains_key(&(was.clone(), "dev/dev-net".to_owned())));
        let on_to = &changes[&(to.clone(), "dev/dev-net".to_owned())].1;
        assert!(
            on_to
                .iter()
                .any(|d| d.starts_with("- fdb") && d.contains(&db_mac))
                || before
                    .segments
                    .get(&to)
                    .is_none_or(|s| !s.contains_key("dev/dev-net")),
            "{on_to:?}"
        );
    }

    /// Issue 17: a running VM with NICs moves live only when both nodes report a
    /// migration address in their namespaces; the same plan points the tenant
    /// segments' forwarding entries at its new node.
    #[test]
    fn a_running_vm_with_nics_moves_live_when_both_nodes_report_a_migration_address() {
        let before = desired_with(None);
        let was = before.vms["db"].node.clone();
        let to = before.nodes.keys().find(|n| **n != was).unwrap().clone();
        let mut observed = observed_as(&before);
        runs_on(&mut observed, &was, "db");
        let mut placement = (*before.placement).clone();
        placement
            .vms
            .iter_mut()
            .find(|v| v.name == "db")
            .unwrap()
            .node = to.clone();
        for n in placement
            .networks
            .iter_mut()
            .filter(|n| n.name == "dev-net")
        {
            n.nodes.push(to.clone());
            n.nodes.sort();
            n.nodes.dedup();
        }
        let mut after = desired_with(Some(placement));
        // Without disks (their writer's hand-over is not built): only the NIC decides.
        after.vms.get_mut("db").unwrap().volumes.clear();
        let db_change = |plan: &Plan| {
            plan.changes
                .iter()
                .find(|c| c.object == "vm" && c.name == "db")
                .cloned()
                .expect("db moves")
        };
        let migrates = |plan: &Plan| {
            plan.steps
                .iter()
                .filter(|s| matches!(&s.action, NodeAction::MigrateVm { name, .. } if name == "db"))
                .count()
        };
        // No node reports a migration address: cold, saying why.
        let cold = plan(&after, &observed, "r1");
        let change = db_change(&cold);
        assert_eq!(migrates(&cold), 0);
        assert!(
            change
                .details
                .iter()
                .any(|d| d.starts_with("not live: its NICs")
                    && d.contains(&was)
                    && d.contains(&to)
                    && d.contains("no migration address")),
            "{:?}",
            change.details
        );
        // Only the source reports one: still cold, naming the destination alone.
        networking(&mut observed, &was).migration_address = underlay(&was).to_owned();
        let change = db_change(&plan(&after, &observed, "r2"));
        assert!(
            change
                .details
                .iter()
                .any(|d| d.contains(&format!("and {to} reports no migration address"))),
            "{:?}",
            change.details
        );
        // A node whose network actions are refused has none, whatever it says.
        networking(&mut observed, &to).migration_address = underlay(&to).to_owned();
        networking(&mut observed, &to).unavailable = "not running as root".into();
        assert_eq!(migrates(&plan(&after, &observed, "r3")), 0);
        // Both report one: one migrate_vm step on the destination, from the source.
        networking(&mut observed, &to).unavailable.clear();
        let live = plan(&after, &observed, "r4");
        let change = db_change(&live);
        assert_eq!(change.steps.len(), 1, "{:?}", change.details);
        let step = &live.steps[change.steps[0]];
        assert_eq!(step.node, to);
        let NodeAction::MigrateVm {
            from, definition, ..
        } = &step.action
        else {
            panic!("not a migrate_vm: {:?}", step.action)
        };
        assert_eq!(from, &was);
        let NodeAction::CreateVm { nics, .. } = definition.as_ref() else {
            panic!("the definition is a create_vm")
        };
        assert_eq!(nics.len(), 1);
        assert!(!change.details.iter().any(|d| d.starts_with("not live")));
        // The node db left now sends its frames to the node it moved to.
        let db_mac = crate::segments::default_mac("db", 0);
        let to_vtep = after.segments[&to]["dev/dev-net"].local_vtep.clone();
        let changes = segment_changes(&live);
        let on_was = &changes[&(was.clone(), "dev/dev-net".to_owned())].1;
        assert!(
            on_was.contains(&format!("+ fdb {db_mac} -> {to_vtep}")),
            "{on_was:?}"
        );
        // ... once the migration committed, not during pre-copy; the new node's
        // segment does not wait.
        let segment_step = |node: &str| {
            live.steps
                .iter()
                .find(|s| {
                    s.node == node
                        && matches!(&s.action, NodeAction::ApplyNetworkSegment(w) if w.network == "dev-net")
                })
                .expect("a dev-net segment step")
        };
        assert!(segment_step(&was).depends_on.contains(&step.id));
        assert!(segment_step(&was).wave > step.wave);
        assert!(!segment_step(&to).depends_on.contains(&step.id));
        // Make before break on the third node: from the first wave db's frames go
        // to both nodes (its entry names the new node, also the old one: the node
        // turns that into the all-zero entry naming both), and a second step after
        // the migration drops the old node.
        let third = before
            .nodes
            .keys()
            .find(|n| **n != was && **n != to)
            .unwrap()
            .clone();
        let was_vtep = after.segments[&was]["dev/dev-net"].local_vtep.clone();
        let on_third: Vec<_> = live
            .steps
            .iter()
            .filter(|s| {
                s.node == third
                    && matches!(&s.action, NodeAction::ApplyNetworkSegment(w) if w.network == "dev-net")
            })
            .collect();
        assert_eq!(on_third.len(), 2, "{on_third:?}");
        let db_remote = |s: &crate::plan::Step| match &s.action {
            NodeAction::ApplyNetworkSegment(w) => {
                w.remotes.iter().find(|r| r.vm == "db").cloned().unwrap()
            }
            _ => unreachable!(),
        };
        let (during, after_step) = (on_third[0], on_third[1]);
        assert!(!during.depends_on.contains(&step.id));
        // The migration starts once the third node sends db's frames to both.
        assert!(
            step.depends_on.contains(&during.id),
            "{:?}",
            step.depends_on
        );
        assert!(during.wave < step.wave);
        let r = db_remote(during);
        assert_eq!(
            (r.vtep.as_str(), r.also_vtep.as_str()),
            (to_vtep.as_str(), was_vtep.as_str())
        );
        assert!(after_step.depends_on.contains(&step.id));
        assert!(after_step.depends_on.contains(&during.id));
        let r = db_remote(after_step);
        assert_eq!(
            (r.vtep.as_str(), r.also_vtep.as_str()),
            (to_vtep.as_str(), "")
        );
        let (_, details) = &changes[&(third.clone(), "dev/dev-net".to_owned())];
        assert!(
            details
                .iter()
                .any(|d| d.starts_with("during the live migration of db: its frames go to both")),
            "{details:?}"
        );
        // What the node reports during the migration (the all-zero entry naming
        // both nodes) is what the first step wants.
        let NodeAction::ApplyNetworkSegment(w) = &during.action else {
            unreachable!()
        };
        let fdb = w.fdb();
        assert!(
            fdb.contains(&format!("00:00:00:00:00:00 -> {to_vtep}")),
            "{fdb:?}"
        );
        assert!(
            fdb.contains(&format!("00:00:00:00:00:00 -> {was_vtep}")),
            "{fdb:?}"
        );
        assert!(!fdb.iter().any(|e| e.starts_with(&db_mac)), "{fdb:?}");
    }

    /// The quickstart's `underlay=` host for a node (`lab-2` -> 10.255.0.12).
    fn underlay(node: &str) -> &'static str {
        match node {
            "lab-1" => "10.255.0.11",
            "lab-2" => "10.255.0.12",
            "lab-3" => "10.255.0.13",
            _ => panic!("{node}"),
        }
    }

    #[test]
    fn a_changed_security_group_is_seen_by_its_digest_alone() {
        let desired = desired_with(None);
        let observed = observed_as(&desired);
        let (mut model, root) = quickstart();
        let dev = model.tenants.iter_mut().find(|t| t.name == "dev").unwrap();
        dev.security_groups.push(compiler::model::SecurityGroup {
            name: "db".into(),
            allow: vec![compiler::model::AllowRule {
                from: "dev-net".into(),
                from_cidr: "10.77.0.0/24".into(),
                to: None,
                to_cidr: None,
                proto: compiler::spec::Proto::Tcp,
                port: Some(5432),
                port_end: None,
            }],
        });
        let db = model.vms.iter_mut().find(|v| v.name == "db").unwrap();
        std::sync::Arc::make_mut(db).nics[0].security_groups = vec!["db".into()];
        let changed = desired::desired(&model, &root, (*desired.placement).clone());
        let changes = segment_changes(&plan(&changed, &observed, "r9"));
        // Nothing the node reads back differs (VNI, VTEP, MTU, entries): only the
        // digest of the definition tells. Every node of the tenant gets it again.
        let dev_nodes: Vec<&String> = changed
            .segments
            .iter()
            .filter(|(_, s)| s.contains_key("dev/dev-net"))
            .map(|(n, _)| n)
            .collect();
        assert!(!dev_nodes.is_empty());
        for node in dev_nodes {
            let (kind, details) = &changes[&(node.clone(), "dev/dev-net".to_owned())];
            assert_eq!(*kind, ChangeKind::Update);
            assert!(details[0].contains("digest differs"), "{details:?}");
        }
        assert!(
            changes.keys().all(|(_, k)| k == "dev/dev-net"),
            "ops is unchanged: {changes:?}"
        );
        // A node that reports no digest (older) is not asked again for it.
        let mut old = observed_as(&desired);
        for node in desired.nodes.keys() {
            for s in networking(&mut old, node).segments.values_mut() {
                s.definition_digest.clear();
            }
        }
        assert!(segment_changes(&plan(&changed, &old, "r10")).is_empty());
    }

    /// A spec mistake that leaves a running VM unplaced (the CI failure of session 10:
    /// three web VMs made too big) must not change or delete its tenant's segments:
    /// that would cut the VM, which keeps running, off its network.
    #[test]
    fn a_running_vm_that_cannot_be_placed_keeps_its_network_as_it_is() {
        let before = desired_with(None);
        let was = before.vms["web-0"].node.clone();
        let mut observed = observed_as(&before);
        runs_on(&mut observed, &was, "web-0");
        // The placer, as it answers when web-0 no longer fits: web-0 unplaced, and
        // dev-net only on the nodes its other VMs are on.
        let mut placement = (*before.placement).clone();
        placement.vms.retain(|v| v.name != "web-0");
        placement.unplaced.push(compiler::place::Unplaced {
            name: "web-0".into(),
            tenant: "dev".into(),
            site: "lab".into(),
            previous_node: None,
            reasons: vec![],
        });
        let still: BTreeMap<String, ()> = placement
            .vms
            .iter()
            .filter(|v| v.tenant == "dev")
            .map(|v| (v.node.clone(), ()))
            .collect();
        for n in placement.networks.iter_mut().filter(|n| n.tenant == "dev") {
            n.nodes.retain(|node| still.contains_key(node));
        }
        let after = desired_with(Some(placement));
        assert!(after.unplaced.contains_key("web-0"));
        // Without the guard, this desired state changes dev-net: web-0's entries
        // go from the other nodes (and its node's segment, if no other dev VM is there).
        let unguarded = plan(&after, &observed_as(&before), "r4");
        assert!(
            segment_changes(&unguarded)
                .values()
                .any(|(k, _)| matches!(k, ChangeKind::Update | ChangeKind::Delete)),
            "the case must be one that would change the segments: {:?}",
            unguarded.changes
        );
        let p = plan(&after, &observed, "r4");
        assert!(
            p.left_alone
                .iter()
                .any(|l| l.object == "vm" && l.name == "web-0"),
            "{:?}",
            p.left_alone
        );
        let changes = segment_changes(&p);
        assert!(
            changes
                .iter()
                .all(|((_, key), (k, _))| *k == ChangeKind::Create || !key.starts_with("dev/")),
            "{changes:?}"
        );
        let kept: Vec<_> = p
            .left_alone
            .iter()
            .filter(|l| l.object == "segment" && l.name == "dev/dev-net")
            .collect();
        assert!(!kept.is_empty(), "{:?}", p.left_alone);
        assert!(kept.iter().all(|l| l.reason.contains("web-0")), "{kept:?}");
    }

    #[test]
    fn a_segment_no_longer_wanted_is_deleted_unless_prune_is_off() {
        let desired = desired_with(None);
        let mut observed = observed_as(&desired);
        let node = desired.nodes.keys().next().unwrap().clone();
        networking(&mut observed, &node)
            .segments
            .insert("gone/old-net".into(), ObservedSegment::default());
        let p = plan(&desired, &observed, "r3");
        let changes = segment_changes(&p);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(
            changes[&(node.clone(), "gone/old-net".to_owned())].0,
            ChangeKind::Delete
        );
        assert!(p.steps.iter().any(|s| s.action
            == NodeAction::DeleteNetworkSegment {
                tenant: "gone".into(),
                network: "old-net".into()
            }));
        let kept = plan_with(
            &desired,
            &observed,
            "r3",
            &PlanOptions {
                prune: false,
                ..Default::default()
            },
        );
        assert!(segment_changes(&kept).is_empty());
        assert!(kept.unpruned.iter().any(|u| u.name == "gone/old-net"));
    }

    #[test]
    fn drift_is_repaired_and_refusing_nodes_are_left_alone() {
        let desired = desired_with(None);
        let mut observed = observed_as(&desired);
        let (node, segs) = desired.segments.iter().next().unwrap();
        let key = segs.keys().next().unwrap().clone();
        networking(&mut observed, node)
            .segments
            .get_mut(&key)
            .unwrap()
            .drift = vec!["fdb 02:ca:00:00:00:01: missing, want 127.0.0.12".into()];
        let changes = segment_changes(&plan(&desired, &observed, "r4"));
        assert_eq!(
            changes[&(node.clone(), key.clone())],
            (
                ChangeKind::Update,
                vec!["repair: fdb 02:ca:00:00:00:01: missing, want 127.0.0.12".into()]
            )
        );
        // Security-group drift: one segment of the node is applied again.
        let mut observed = observed_as(&desired);
        networking(&mut observed, node).firewall_drift = vec!["rule cairn:ab missing".into()];
        let changes = segment_changes(&plan(&desired, &observed, "r5"));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(changes[&(node.clone(), key.clone())].1[0].contains("security groups"));
        // A node whose network lives in a named namespace (the dev cluster) gets its
        // segments when the spec gives it an underlay (the node makes that address
        // on its bond, after the bond's own step)...
        let mut observed = observed_as(&desired);
        networking(&mut observed, node).segments.clear();
        networking(&mut observed, node).netns = "cairn-0123-lab-1".into();
        let p = plan(&desired, &observed, "r7");
        assert!(segment_changes(&p).iter().any(|((n, _), _)| n == node));
        // ... and none without one: its address is not in that namespace.
        let (mut model, root) = quickstart();
        for n in model.sites.iter_mut().flat_map(|s| s.nodes.iter_mut()) {
            n.underlay = None;
        }
        let bare = desired::desired(&model, &root, desired::place(&model, None));
        assert!(
            bare.segments
                .values()
                .flat_map(|s| s.values())
                .all(|s| { s.underlay_prefix_len == 0 && s.local_vtep.starts_with("127.0.0.") })
        );
        let mut observed = observed_as(&bare);
        networking(&mut observed, node).segments.clear();
        networking(&mut observed, node).netns = "cairn-0123-lab-1".into();
        let p = plan(&bare, &observed, "r8");
        assert!(segment_changes(&p).iter().all(|((n, _), _)| n != node));
        // A node that refuses network actions: left alone with its reason.
        let mut observed = observed_as(&desired);
        networking(&mut observed, node).segments.clear();
        networking(&mut observed, node).unavailable = "not running as root".into();
        let p = plan(&desired, &observed, "r6");
        assert!(segment_changes(&p).is_empty());
        assert!(p.left_alone.iter().any(|l| l.object == "segment"
            && &l.node == node
            && l.reason.contains("not running as root")));
    }
}
