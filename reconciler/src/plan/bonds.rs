//! Bonds: per node, each bond of its site.

use super::build::Builder;
use super::{Change, ChangeKind, LeftAlone, NodeAction};
use crate::desired::DesiredBond;
use crate::drift::{self, bond_definition_diff};
use crate::observe::NodeObservation;

fn bond_action(bond: &DesiredBond) -> NodeAction {
    NodeAction::ApplyBond {
        name: bond.name.clone(),
        mode: bond.mode.clone(),
        members: bond.members.clone(),
        mtu: bond.mtu,
        miimon_ms: bond.miimon_ms,
        capacity_bps: bond.capacity_bps,
        traffic: bond.traffic.clone(),
    }
}

fn bond_details(bond: &DesiredBond) -> Vec<String> {
    let mut out = vec![format!(
        "{} over {}, mtu {}, {} capacity on this node",
        bond.mode,
        bond.members.join(" "),
        bond.mtu,
        compiler::units::format_bandwidth(bond.capacity_bps)
    )];
    out.extend(bond.traffic.iter().map(drift::traffic_text));
    out
}

/// Bonds: per node, each bond of its site is created, changed to the spec's
/// definition, or repaired when the device drifted from it (a member detached,
/// a class deleted or its rate changed: the node reads the device back over
/// netlink); bonds the node keeps that its site no longer has are deleted.
/// Bonds depend on nothing and nothing depends on them (VM NICs use tenant
/// bridges, not the bond), so their steps are in the first wave. A node that
/// refuses network actions (no namespace of its own, not root) has its bonds
/// left alone with its reason.
pub(super) fn plan_bonds(b: &mut Builder<'_>) {
    let desired = b.desired;
    for (node, wanted) in &desired.bonds {
        let Some(NodeObservation::Reachable {
            bonds: have,
            networking,
            ..
        }) = b.observed.nodes.get(node)
        else {
            // Unreachable: its bonds wait with it.
            if b.observed.nodes.contains_key(node) {
                b.left_alone.extend(wanted.keys().map(|name| LeftAlone {
                    object: "bond".into(),
                    name: name.clone(),
                    node: node.clone(),
                    reason: String::new(),
                }));
            }
            continue;
        };
        let site = desired.nodes.get(node).map(|n| n.site.clone());
        let refused = !networking.unavailable.is_empty();
        for want in wanted.values() {
            let observed = have.get(&want.name);
            let (kind, details) = match observed {
                None => (ChangeKind::Create, bond_details(want)),
                Some(o) => {
                    let mut details = bond_definition_diff(want, o);
                    if details.is_empty() {
                        if !o.exists {
                            details.push("the device is gone: make it again".into());
                        } else if !o.drift.is_empty() {
                            details.extend(o.drift.iter().map(|d| format!("repair: {d}")));
                        } else {
                            continue;
                        }
                    }
                    (ChangeKind::Update, details)
                }
            };
            if refused {
                b.left_alone.push(LeftAlone {
                    object: "bond".into(),
                    name: want.name.clone(),
                    node: node.clone(),
                    reason: format!(
                        "network actions are refused there: {}",
                        networking.unavailable
                    ),
                });
                continue;
            }
            let mut details = details;
            if networking.bond_implementation == "bridge-fallback" && want.mode != "active-backup" {
                details.push(format!(
                    "this node has no bonding driver (bridge fallback): it will refuse mode {}",
                    want.mode
                ));
            }
            let step = b.step(node, bond_action(want), vec![]);
            b.changes.push(Change {
                site: site.clone(),
                details,
                steps: vec![step],
                ..Change::new(kind, "bond", &want.name, "", node)
            });
        }
        for name in have.keys().filter(|n| !wanted.contains_key(*n)) {
            if refused || b.keep_unpruned("bond", name, node) {
                continue;
            }
            let step = b.step(node, NodeAction::DeleteBond { name: name.clone() }, vec![]);
            b.changes.push(Change {
                site: site.clone(),
                details: vec!["its site no longer has this bond".into()],
                steps: vec![step],
                ..Change::new(ChangeKind::Delete, "bond", name, "", node)
            });
        }
    }
}
