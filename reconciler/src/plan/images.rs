//! `from-image` disks (issue 15 item 5): the image's disk file imported once per
//! version (its content hash, `images::file_version`) into a base volume where the
//! disk's copies go, snapshotted, and cloned copy on write. A changed file gets a new
//! base beside the old one; existing disks keep the version they were cloned from.
//!
//! Steps for a new `from-image` disk whose base is not there yet, all on the disk's
//! primary node: `create_volume` (the base: the file's virtual size, the disk's pool
//! striping and copies) → `import_image` (qemu-img, on the node) → `snapshot_volume`
//! (`image`) → `clone_volume` (the disk) → `resize_volume` (to the disk's size, when
//! larger). A base that exists with its snapshot is only cloned again; a base that
//! exists without it (an import that failed) is imported again. Two disks that share
//! a base in one plan share its steps.

use std::collections::BTreeMap;

use proto::v1::VolumeRole;

use super::build::Builder;
use super::{Change, ChangeKind, NodeAction, Refused};
use crate::desired::DesiredVolume;
use crate::images::{BASE_SNAPSHOT, ImageBase};
use crate::observe::NodeObservation;

/// Bases planned so far in this plan: name → the step after which it can be cloned
/// (none: it was ready).
pub(super) type Bases = BTreeMap<String, Option<usize>>;

fn refuse(b: &mut Builder<'_>, v: &DesiredVolume, reason: String) {
    b.refused.push(Refused {
        object: "volume".into(),
        name: v.name.clone(),
        node: v.node.clone(),
        reason,
    });
}

/// The base `base` as `v`'s primary node reports it: `None` if it has none, else
/// whether it holds the snapshot clones are made from.
fn observed_base(b: &Builder<'_>, node: &str, base: &str) -> Option<bool> {
    match b.observed.nodes.get(node) {
        Some(NodeObservation::Reachable { volumes, .. }) => volumes
            .get(base)
            .filter(|o| o.role != VolumeRole::Replica)
            .map(|o| o.snapshots.iter().any(|s| s == BASE_SNAPSHOT)),
        _ => None,
    }
}

/// Bases of `base`'s image on `v`'s primary node that hold another version of the
/// file (or another file): the current version with their copies would have another
/// name.
fn older_bases(b: &Builder<'_>, v: &DesiredVolume, base: &ImageBase) -> Vec<String> {
    let Some(image) = crate::images::base_image(&base.name) else {
        return vec![];
    };
    match b.observed.nodes.get(&v.node) {
        Some(NodeObservation::Reachable { volumes, .. }) => volumes
            .values()
            .filter(|o| o.role != VolumeRole::Replica && o.name != base.name)
            .filter(|o| crate::images::base_image(&o.name) == Some(image))
            .filter(|o| {
                let now = crate::images::base_name(
                    &base.image,
                    &base.path,
                    &base.version,
                    &v.node,
                    &o.replica_peers,
                );
                now != o.name
            })
            .map(|o| o.name.clone())
            .collect(),
        _ => vec![],
    }
}

/// The steps that make the base ready to clone (none when it is), once per plan.
fn ready_base(
    b: &mut Builder<'_>,
    v: &DesiredVolume,
    base: &ImageBase,
    size: u64,
    bases: &mut Bases,
) -> Option<usize> {
    if let Some(ready) = bases.get(&base.name) {
        return *ready;
    }
    let human = compiler::units::human_size;
    let ready = match observed_base(b, &v.node, &base.name) {
        Some(true) => None,
        seen => {
            let mut steps = vec![];
            if seen.is_none() {
                let as_volume = DesiredVolume {
                    name: base.name.clone(),
                    vm: String::new(),
                    tenant: String::new(),
                    size_bytes: size,
                    from_image: None,
                    ..v.clone()
                };
                steps.push(b.create_volume(&as_volume, vec![]));
            }
            let import = b.step(
                &v.node,
                NodeAction::ImportImage {
                    volume: base.name.clone(),
                    path: base.path.clone(),
                    format: base.format.clone(),
                    source: base.at.clone(),
                },
                steps.clone(),
            );
            steps.push(import);
            let snapshot = b.step(
                &v.node,
                NodeAction::SnapshotVolume {
                    volume: base.name.clone(),
                    snapshot: BASE_SNAPSHOT.to_owned(),
                },
                vec![import],
            );
            steps.push(snapshot);
            let mut details = vec![format!(
                "image `{}`: {} ({}, {}, sha256 {}) imported with qemu-img, snapshot `{BASE_SNAPSHOT}`",
                base.image,
                base.file_text(),
                base.format,
                human(size),
                base.version.get(..12).unwrap_or(&base.version)
            )];
            let older = older_bases(b, v, base);
            if seen.is_none() && !older.is_empty() {
                details.push(format!(
                    "the disk file changed since {} was imported: disks cloned before keep that version, new ones start from this one",
                    older.join(", ")
                ));
            }
            if !v.replicas.is_empty() {
                details.push(format!("replica on {}", v.replicas.join(", ")));
            }
            b.changes.push(Change {
                details,
                steps,
                ..Change::new(
                    if seen.is_none() {
                        ChangeKind::Create
                    } else {
                        ChangeKind::Update
                    },
                    "volume",
                    &base.name,
                    "",
                    &v.node,
                )
            });
            Some(snapshot)
        }
    };
    bases.insert(base.name.clone(), ready);
    ready
}

/// A new `from-image` volume: a clone of its image's base (made first when needed),
/// grown to the disk's size. Returns the steps its VM waits for; refuses (no steps)
/// when the image's file cannot be imported or does not fit the disk.
pub(super) fn create_from_image(
    b: &mut Builder<'_>,
    v: &DesiredVolume,
    base: &ImageBase,
    bases: &mut Bases,
) -> Vec<usize> {
    let human = compiler::units::human_size;
    let size = match &base.size {
        Ok(size) => *size,
        Err(why) => {
            refuse(
                b,
                v,
                format!(
                    "it starts from image `{}`, whose {} cannot be imported: {why}. Fix the file, or drop `from-image=#true`",
                    base.image,
                    base.file_text()
                ),
            );
            return vec![];
        }
    };
    if size > v.size_bytes {
        refuse(
            b,
            v,
            format!(
                "it starts from image `{}`, whose {} holds {}, more than the disk's {}. Set the disk's size to {} or more",
                base.image,
                base.file_text(),
                human(size),
                human(v.size_bytes),
                human(size)
            ),
        );
        return vec![];
    }
    let ready = ready_base(b, v, base, size, bases);
    let clone = b.step(
        &v.node,
        NodeAction::CloneVolume {
            volume: base.name.clone(),
            snapshot: BASE_SNAPSHOT.to_owned(),
            name: v.name.clone(),
        },
        ready.into_iter().collect(),
    );
    let mut steps = vec![clone];
    if v.size_bytes > size {
        steps.push(b.step(
            &v.node,
            NodeAction::ResizeVolume {
                name: v.name.clone(),
                size_bytes: v.size_bytes,
            },
            vec![clone],
        ));
    }
    let mut details = super::volumes::volume_details(v);
    details.push(format!(
        "a copy-on-write clone of image `{}` (base volume {})",
        base.image, base.name
    ));
    b.changes.push(Change {
        details,
        steps: steps.clone(),
        ..Change::new(ChangeKind::Create, "volume", &v.name, &v.tenant, &v.node)
    });
    steps.last().copied().into_iter().collect()
}

/// A base volume the plan keeps: its image is in the spec.
pub(super) fn kept(b: &Builder<'_>, volume: &str) -> bool {
    crate::images::base_image(volume).is_some_and(|i| b.desired.image_bases.contains(i))
}
