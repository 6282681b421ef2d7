//! Volumes: data is destroyed only when a volume leaves the specs.

use std::collections::BTreeMap;

use proto::v1::VolumeRole;

use super::build::Builder;
use super::{Change, ChangeKind, LeftAlone, NodeAction, Refused};
use crate::desired::DesiredVolume;
use crate::drift;
use crate::observe::NodeObservation;

pub(super) fn volume_details(v: &DesiredVolume) -> Vec<String> {
    let mut line = format!(
        "{}, {} × {} stripes",
        compiler::units::human_size(v.size_bytes),
        v.stripe_width,
        compiler::units::human_size(v.stripe_unit_bytes)
    );
    if !v.replicas.is_empty() {
        line.push_str(&format!(", replica on {}", v.replicas.join(", ")));
    }
    vec![line]
}

/// Volumes. Data is destroyed only when its volume left the spec; a volume
/// the spec still names is never deleted or made again: it grows in place, and
/// a shrink, a restripe or a change of its primary is refused.
pub(super) fn plan_volumes(b: &mut Builder<'_>) {
    let desired = b.desired;
    let observed = b.observed;
    let mut observed_primaries: BTreeMap<&str, (&str, &crate::observe::ObservedVolume)> =
        BTreeMap::new();
    for (node, obs) in &observed.nodes {
        if let NodeObservation::Reachable { volumes, .. } = obs {
            for v in volumes.values().filter(|v| v.role != VolumeRole::Replica) {
                observed_primaries.insert(v.name.as_str(), (node.as_str(), v));
            }
        }
    }
    for (name, (node, o)) in &observed_primaries {
        if desired.spec_volumes.contains_key(*name) || super::images::kept(b, name) {
            continue;
        }
        if b.keep_unpruned("volume", name, node) {
            continue;
        }
        if desired.protected_volumes.contains(*name) {
            b.refused.push(Refused {
                object: "volume".into(),
                name: (*name).to_owned(),
                node: (*node).to_owned(),
                reason: "no spec names it any more, but it is protected by `prevent-destroy` in the specs last applied; to delete it, first apply specs that keep the disk with `prevent-destroy=#false`, then remove the disk".to_owned(),
            });
            continue;
        }
        let mut steps = vec![];
        if crate::images::is_base(name) && !o.snapshots.is_empty() {
            // An image's base that left the spec: its snapshot goes first (clones
            // made from it stay).
            steps.push(b.step(
                node,
                NodeAction::DeleteSnapshot {
                    volume: (*name).to_owned(),
                    snapshot: crate::images::BASE_SNAPSHOT.to_owned(),
                },
                b.all_vm_deletes.clone(),
            ));
        }
        let delete = b.step(
            node,
            NodeAction::DeleteVolume {
                name: (*name).to_owned(),
            },
            if steps.is_empty() {
                b.all_vm_deletes.clone()
            } else {
                steps.clone()
            },
        );
        steps.push(delete);
        b.changes.push(Change {
            steps,
            details: vec![format!(
                "DATA LOSS: its {} of data{} are deleted; no spec names it any more",
                compiler::units::human_size(o.size_bytes),
                if o.replica_peers.is_empty() {
                    String::new()
                } else {
                    format!(" and its copies on {}", o.replica_peers.join(", "))
                }
            )],
            data_loss: true,
            ..Change::new(ChangeKind::Delete, "volume", name, "", node)
        });
    }
    let mut bases = super::images::Bases::new();
    for v in desired.volumes.values() {
        let observed_copy = observed_primaries.get(v.name.as_str());
        let in_sync =
            observed_copy.is_some_and(|(n, o)| *n == v.node && drift::volume_in_sync(v, o));
        if in_sync {
            continue;
        }
        // A volume that needs work is left alone while any node holding one of
        // its copies does not answer (creating it needs every replica).
        let nodes: Vec<&String> = std::iter::once(&v.node).chain(&v.replicas).collect();
        if let Some(down) = nodes.iter().find(|n| !observed.reachable(n)) {
            b.left_alone.push(LeftAlone {
                object: "volume".into(),
                name: v.name.clone(),
                node: (*down).clone(),
                reason: String::new(),
            });
            continue;
        }
        match observed_copy {
            None if v.from_image.is_some() => {
                let base = v.from_image.as_ref().expect("from an image");
                let steps = super::images::create_from_image(b, v, base, &mut bases);
                b.volume_steps.insert(v.name.clone(), steps);
            }
            None => {
                let s = b.create_volume(v, vec![]);
                b.volume_steps.insert(v.name.clone(), vec![s]);
                b.changes.push(Change {
                    details: volume_details(v),
                    steps: vec![s],
                    ..Change::new(ChangeKind::Create, "volume", &v.name, &v.tenant, &v.node)
                });
            }
            Some((node, o)) if *node == v.node => {
                let human = compiler::units::human_size;
                if o.stripe_width != v.stripe_width || o.stripe_unit_bytes != v.stripe_unit_bytes {
                    b.refused.push(Refused {
                        object: "volume".into(),
                        name: v.name.clone(),
                        node: (*node).to_owned(),
                        reason: format!(
                            "its pool now stripes {} × {} but it holds data striped {} × {}; restriping in place is not supported and would lose the data. Keep the pool's striping, or remove the disk from the spec to delete it",
                            v.stripe_width,
                            human(v.stripe_unit_bytes),
                            o.stripe_width,
                            human(o.stripe_unit_bytes)
                        ),
                    });
                    continue;
                }
                if v.size_bytes < o.size_bytes {
                    b.refused.push(Refused {
                        object: "volume".into(),
                        name: v.name.clone(),
                        node: (*node).to_owned(),
                        reason: format!(
                            "shrinking it from {} to {} would lose data. Set its size back to {} or more, or remove the disk from the spec to delete it",
                            human(o.size_bytes),
                            human(v.size_bytes),
                            human(o.size_bytes)
                        ),
                    });
                    continue;
                }
                let grow = b.step(
                    node,
                    NodeAction::ResizeVolume {
                        name: v.name.clone(),
                        size_bytes: v.size_bytes,
                    },
                    vec![],
                );
                b.volume_steps.insert(v.name.clone(), vec![grow]);
                b.changes.push(Change {
                    details: vec![format!(
                        "size {} → {}, grown in place (the data is kept)",
                        human(o.size_bytes),
                        human(v.size_bytes)
                    )],
                    steps: vec![grow],
                    ..Change::new(ChangeKind::Update, "volume", &v.name, &v.tenant, &v.node)
                });
            }
            Some((node, _)) => {
                // The placement keeps a volume's primary where its data is, so this
                // is reached only when that node left the spec or the state store
                // was lost; a change of writer is never a recreation.
                b.refused.push(Refused {
                    object: "volume".into(),
                    name: v.name.clone(),
                    node: (*node).to_owned(),
                    reason: format!(
                        "its data is on {node} but the placement wants its primary on {}; moving a volume's writer is not supported yet, and recreating it would lose the data. Keep node {node} in the spec",
                        v.node
                    ),
                });
            }
        }
    }
}
