//! Snapshots and clones: copy-on-write layers.
//!
//! A snapshot freezes a volume's top layer and gives the volume a new empty one on top
//! (two rows: O(1)); a clone is a new empty layer on top of a snapshot's layer. Layers
//! are refcounted (volume, snapshot, child layer); the last release frees the layer's
//! extents and checksums and cascades to its parent. A layer that only one child layer
//! still references once its snapshot is deleted is folded into that child
//! ([`fold_into_only_child`]): the stripe units the child overwrote are freed (the
//! blocks unique to the deleted snapshot), the others move up a layer. That is what
//! makes retention of a chain of snapshots free space: deleting the oldest snapshot of
//! a volume frees exactly the data that no newer snapshot and not the volume still see.

use std::collections::BTreeMap;

use super::checkpoint::write_disk_rows;
use super::state::{Layer, State};
use super::volume::Volume;
use super::{BLOCK_SIZE, SnapshotInfo, Store, validate_name};
use crate::allocator::Allocator;
use crate::crcs;
use crate::error::{Result, StorageError};
use crate::meta::{
    CRCS, EXTENTS, Extent, LAYERS, META, PENDING, SNAPSHOTS, SnapshotRecord, VOLUMES, VolumeRecord,
};

impl Store {
    /// Takes a read-only snapshot of `volume` in O(1): the volume's layer is frozen and the
    /// volume continues on a new, empty layer on top of it.
    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<Snapshot> {
        validate_name("snapshot", name)?;
        let mut st = self.write_state();
        let mut rec = st.volume(volume)?.clone();
        let key = (volume.to_owned(), name.to_owned());
        if st.snapshots.contains_key(&key) {
            return Err(StorageError::AlreadyExists {
                kind: "snapshot",
                name: format!("{volume}@{name}"),
            });
        }
        let frozen = rec.top;
        let new_top = st.next_layer;
        let mut frozen_layer = st.layers[&frozen];
        // The volume's reference moves to the new layer; the snapshot and the new child
        // layer each hold one on the frozen layer.
        frozen_layer.refs += 1;
        let snap = SnapshotRecord {
            geometry: rec.geometry.clone(),
            layer: frozen,
            seq: rec.seq,
        };
        rec.top = new_top;
        let txn = self.inner.db.begin_write()?;
        {
            txn.open_table(META)?.insert("next_layer", new_top + 1)?;
            let mut layers = txn.open_table(LAYERS)?;
            layers.insert(frozen, (frozen_layer.parent, frozen_layer.refs))?;
            layers.insert(new_top, (frozen, 1))?;
            txn.open_table(VOLUMES)?
                .insert(volume, rec.encode().as_slice())?;
            txn.open_table(SNAPSHOTS)?
                .insert((volume, name), snap.encode().as_slice())?;
        }
        self.checkpoint_commit(txn, &mut st)?;
        st.next_layer = new_top + 1;
        st.layers.insert(frozen, frozen_layer);
        st.layers.insert(
            new_top,
            Layer {
                parent: frozen,
                refs: 1,
            },
        );
        st.volumes.insert(volume.to_owned(), rec);
        st.snapshots.insert(key, snap);
        Ok(Snapshot {
            store: self.clone(),
            volume: volume.to_owned(),
            name: name.to_owned(),
        })
    }

    /// A handle on an existing snapshot.
    pub fn snapshot(&self, volume: &str, name: &str) -> Result<Snapshot> {
        let st = self.read_state();
        if !st
            .snapshots
            .contains_key(&(volume.to_owned(), name.to_owned()))
        {
            if !st.volumes.contains_key(volume) {
                return Err(StorageError::UnknownVolume {
                    name: volume.to_owned(),
                });
            }
            return Err(StorageError::UnknownSnapshot {
                volume: volume.to_owned(),
                snapshot: name.to_owned(),
            });
        }
        Ok(Snapshot {
            store: self.clone(),
            volume: volume.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Snapshots of `volume`, by name.
    pub fn snapshots(&self, volume: &str) -> Vec<SnapshotInfo> {
        let st = self.read_state();
        st.snapshots
            .iter()
            .filter(|((v, _), _)| v == volume)
            .map(|((v, n), r)| SnapshotInfo {
                volume: v.clone(),
                name: n.clone(),
                size: r.geometry.size,
                seq: r.seq,
                allocated: st
                    .extents
                    .range((r.layer, 0)..=(r.layer, u64::MAX))
                    .filter(|(_, e)| matches!(e, Extent::At { .. }))
                    .count() as u64
                    * r.geometry.stripe_unit,
                unique: unique_units(&st, r.layer) * r.geometry.stripe_unit,
            })
            .collect()
    }

    /// The stripe units of `volume`'s snapshot `snapshot` that may differ from its
    /// snapshot `base` (every unit holding data or a zero marker when `base` is
    /// `None`): the units some layer between the two holds, `base`'s layer excluded.
    /// A snapshot's layer never changes while it exists, and folding a deleted
    /// snapshot's layer into its child keeps the union of both, so this is exact at
    /// stripe-unit granularity (delta replication, issue 18; the caller compares the
    /// two points per 4 KiB block to ship less). Sorted, each unit once. `base` must be
    /// an older snapshot of the same chain.
    pub fn changed_units(
        &self,
        volume: &str,
        base: Option<&str>,
        snapshot: &str,
    ) -> Result<ChangedUnits> {
        let st = self.read_state();
        let lookup = |name: &str| {
            st.snapshots
                .get(&(volume.to_owned(), name.to_owned()))
                .cloned()
                .ok_or_else(|| {
                    if st.volumes.contains_key(volume) {
                        StorageError::UnknownSnapshot {
                            volume: volume.to_owned(),
                            snapshot: name.to_owned(),
                        }
                    } else {
                        StorageError::UnknownVolume {
                            name: volume.to_owned(),
                        }
                    }
                })
        };
        let top = lookup(snapshot)?;
        let stop = match base {
            Some(base) => lookup(base)?.layer,
            None => 0,
        };
        let mut units = std::collections::BTreeSet::new();
        let mut layer = top.layer;
        while layer != stop {
            if layer == 0 {
                return Err(StorageError::invalid(
                    "base",
                    format!(
                        "snapshot `{}` of volume `{volume}` is not older than `{snapshot}` in its chain; a delta is taken from an older snapshot of the same volume",
                        base.unwrap_or_default()
                    ),
                ));
            }
            units.extend(
                st.extents
                    .range((layer, 0)..=(layer, u64::MAX))
                    .map(|(&(_, unit), _)| unit),
            );
            layer = st.parent(layer);
        }
        Ok(ChangedUnits {
            units: units.into_iter().collect(),
            unit_bytes: top.geometry.stripe_unit,
            size: top.geometry.size,
        })
    }

    /// Deletes a snapshot; its data stays as long as clones or the volume still see it.
    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<()> {
        let mut st = self.write_state();
        let key = (volume.to_owned(), name.to_owned());
        let Some(snap) = st.snapshots.get(&key).cloned() else {
            return Err(StorageError::UnknownSnapshot {
                volume: volume.to_owned(),
                snapshot: name.to_owned(),
            });
        };
        let mut plan = ReleasePlan::new(&st);
        let txn = self.inner.db.begin_write()?;
        let kept = release_layer(&mut plan, &st, &txn, snap.layer)?;
        if let Some(layer) = kept {
            fold_into_only_child(&mut plan, &st, &txn, layer, Some(&key))?;
        }
        txn.open_table(SNAPSHOTS)?.remove((volume, name))?;
        write_disk_rows(&txn, &st, &plan.disks)?;
        self.checkpoint_commit(txn, &mut st)?;
        plan.apply(&mut st);
        st.snapshots.remove(&key);
        Ok(())
    }

    /// Creates a writable volume `new_name` from a snapshot in O(1); it shares the
    /// snapshot's extents until it overwrites them.
    pub fn clone_snapshot(&self, volume: &str, snapshot: &str, new_name: &str) -> Result<Volume> {
        validate_name("name", new_name)?;
        let mut st = self.write_state();
        let Some(snap) = st
            .snapshots
            .get(&(volume.to_owned(), snapshot.to_owned()))
            .cloned()
        else {
            return Err(StorageError::UnknownSnapshot {
                volume: volume.to_owned(),
                snapshot: snapshot.to_owned(),
            });
        };
        if st.volumes.contains_key(new_name) {
            return Err(StorageError::AlreadyExists {
                kind: "volume",
                name: new_name.to_owned(),
            });
        }
        let layer = st.next_layer;
        let mut base = st.layers[&snap.layer];
        base.refs += 1;
        let rec = VolumeRecord {
            geometry: snap.geometry.clone(),
            top: layer,
            seq: 0,
        };
        let txn = self.inner.db.begin_write()?;
        {
            txn.open_table(META)?.insert("next_layer", layer + 1)?;
            let mut layers = txn.open_table(LAYERS)?;
            layers.insert(snap.layer, (base.parent, base.refs))?;
            layers.insert(layer, (snap.layer, 1))?;
            txn.open_table(VOLUMES)?
                .insert(new_name, rec.encode().as_slice())?;
        }
        self.checkpoint_commit(txn, &mut st)?;
        st.next_layer = layer + 1;
        st.layers.insert(snap.layer, base);
        st.layers.insert(
            layer,
            Layer {
                parent: snap.layer,
                refs: 1,
            },
        );
        st.volumes.insert(new_name.to_owned(), rec);
        Ok(Volume {
            store: self.clone(),
            name: new_name.to_owned(),
        })
    }
}

/// The parts of [`State`] a layer release changes, built aside so a failed commit changes
/// nothing in memory.
#[derive(Debug)]
pub(super) struct ReleasePlan {
    layers: BTreeMap<u64, Layer>,
    removed_extents: Vec<(u64, u64)>,
    /// Extents that moved to another layer (a fold), at their new key.
    added_extents: Vec<((u64, u64), Extent)>,
    /// Allocators of the disks that got space back.
    pub(super) disks: BTreeMap<u32, Allocator>,
}

impl ReleasePlan {
    pub(super) fn new(st: &State) -> Self {
        ReleasePlan {
            layers: st.layers.clone(),
            removed_extents: Vec::new(),
            added_extents: Vec::new(),
            disks: BTreeMap::new(),
        }
    }

    pub(super) fn apply(self, st: &mut State) {
        st.layers = self.layers;
        for key in self.removed_extents {
            st.extents.remove(&key);
        }
        for (key, extent) in self.added_extents {
            st.extents.insert(key, extent);
        }
        for (id, alloc) in self.disks {
            if let Some(d) = st.disks.get_mut(&id) {
                d.alloc = alloc;
            }
        }
    }
}

/// Drops one reference on `layer`; a layer nobody references any more is freed with its
/// extents and checksums, and its parent loses a reference in turn. Returns the layer
/// where the cascade stopped (still referenced), if any.
pub(super) fn release_layer(
    plan: &mut ReleasePlan,
    st: &State,
    txn: &redb::WriteTransaction,
    mut layer: u64,
) -> Result<Option<u64>> {
    let su = extent_size(st, layer);
    let mut layers_table = txn.open_table(LAYERS)?;
    let mut extents_table = txn.open_table(EXTENTS)?;
    let mut committed = txn.open_table(CRCS)?;
    let mut pending = txn.open_table(PENDING)?;
    while layer != 0 {
        let Some(entry) = plan.layers.get_mut(&layer) else {
            break;
        };
        entry.refs -= 1;
        if entry.refs > 0 {
            layers_table.insert(layer, (entry.parent, entry.refs))?;
            return Ok(Some(layer));
        }
        let parent = entry.parent;
        plan.layers.remove(&layer);
        layers_table.remove(layer)?;
        for (&(l, stripe), extent) in st.extents.range((layer, 0)..=(layer, u64::MAX)) {
            plan.removed_extents.push((l, stripe));
            extents_table.remove((l, stripe))?;
            if let Extent::At { disk, offset } = *extent {
                let blocks = (disk, offset / BLOCK_SIZE)..(disk, (offset + su) / BLOCK_SIZE);
                crcs::clear(&mut committed, disk, blocks.start.1, blocks.end.1)?;
                crcs::clear(&mut pending, disk, blocks.start.1, blocks.end.1)?;
                plan.disks
                    .entry(disk)
                    .or_insert_with(|| st.disks[&disk].alloc.clone())
                    .release(offset, su);
            }
        }
        layer = parent;
    }
    Ok(None)
}

/// The one child layer of `layer` when nothing else references it: no snapshot freezes
/// it (but `ignore`, being deleted), no volume writes on it, and exactly one layer has
/// it as parent. `layers` is the layer table as it will be.
fn only_child(
    layers: &BTreeMap<u64, Layer>,
    st: &State,
    layer: u64,
    ignore: Option<&(String, String)>,
) -> Option<u64> {
    let entry = layers.get(&layer)?;
    if entry.refs != 1
        || st.volumes.values().any(|v| v.top == layer)
        || st
            .snapshots
            .iter()
            .any(|(key, s)| s.layer == layer && Some(key) != ignore)
    {
        return None;
    }
    let mut children = layers
        .iter()
        .filter(|(_, l)| l.parent == layer)
        .map(|(&id, _)| id);
    let child = children.next()?;
    children.next().is_none().then_some(child)
}

/// Stripe units of `layer` holding data that its one child layer shadows (every reader
/// above goes through the child, which copied or zeroed the whole unit): the data only
/// a snapshot of `layer` still sees, freed when that snapshot is deleted. 0 when
/// `layer` has several children (clones) or none.
fn unique_units(st: &State, layer: u64) -> u64 {
    let mut children = st
        .layers
        .iter()
        .filter(|(_, l)| l.parent == layer)
        .map(|(&id, _)| id);
    let (Some(child), None) = (children.next(), children.next()) else {
        return 0;
    };
    st.extents
        .range((layer, 0)..=(layer, u64::MAX))
        .filter(|&(&(_, stripe), e)| {
            matches!(e, Extent::At { .. }) && st.extents.contains_key(&(child, stripe))
        })
        .count() as u64
}

/// Folds `layer` into its only child when nothing else references it (see
/// [`only_child`]): units the child shadows are freed with their checksums, the others
/// move into the child (an extent still belongs to exactly one layer; checksums are
/// keyed by physical block, so they move with it), and the child takes `layer`'s parent.
/// What every remaining reader sees is unchanged.
pub(super) fn fold_into_only_child(
    plan: &mut ReleasePlan,
    st: &State,
    txn: &redb::WriteTransaction,
    layer: u64,
    ignore: Option<&(String, String)>,
) -> Result<()> {
    let Some(child) = only_child(&plan.layers, st, layer, ignore) else {
        return Ok(());
    };
    let su = extent_size(st, layer);
    let mut layers_table = txn.open_table(LAYERS)?;
    let mut extents_table = txn.open_table(EXTENTS)?;
    let mut committed = txn.open_table(CRCS)?;
    let mut pending = txn.open_table(PENDING)?;
    for (&(l, stripe), &extent) in st.extents.range((layer, 0)..=(layer, u64::MAX)) {
        plan.removed_extents.push((l, stripe));
        extents_table.remove((l, stripe))?;
        if st.extents.contains_key(&(child, stripe)) {
            if let Extent::At { disk, offset } = extent {
                let blocks = offset / BLOCK_SIZE..(offset + su) / BLOCK_SIZE;
                crcs::clear(&mut committed, disk, blocks.start, blocks.end)?;
                crcs::clear(&mut pending, disk, blocks.start, blocks.end)?;
                plan.disks
                    .entry(disk)
                    .or_insert_with(|| st.disks[&disk].alloc.clone())
                    .release(offset, su);
            }
        } else {
            extents_table.insert((child, stripe), extent.to_raw())?;
            plan.added_extents.push(((child, stripe), extent));
        }
    }
    let parent = plan.layers.remove(&layer).map_or(0, |l| l.parent);
    layers_table.remove(layer)?;
    if let Some(entry) = plan.layers.get_mut(&child) {
        entry.parent = parent;
        layers_table.insert(child, (entry.parent, entry.refs))?;
    }
    Ok(())
}

/// The stripe unit of the chain `layer` belongs to (every layer of a chain shares it).
fn extent_size(st: &State, layer: u64) -> u64 {
    let reaches = |mut l: u64| {
        while l != 0 {
            if l == layer {
                return true;
            }
            l = st.parent(l);
        }
        false
    };
    st.volumes
        .values()
        .map(|v| (v.top, v.geometry.stripe_unit))
        .chain(
            st.snapshots
                .values()
                .map(|s| (s.layer, s.geometry.stripe_unit)),
        )
        .find(|&(top, _)| reaches(top))
        .map_or(BLOCK_SIZE, |(_, su)| su)
}

/// What [`Store::changed_units`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedUnits {
    /// Stripe-unit indexes, ascending.
    pub units: Vec<u64>,
    /// Bytes per stripe unit.
    pub unit_bytes: u64,
    /// The snapshot's size in bytes.
    pub size: u64,
}

/// A read-only snapshot of a volume.
#[derive(Debug, Clone)]
pub struct Snapshot {
    store: Store,
    volume: String,
    name: String,
}

impl Snapshot {
    /// `volume@snapshot`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.volume, self.name)
    }

    fn record(&self, st: &State) -> Result<SnapshotRecord> {
        st.snapshots
            .get(&(self.volume.clone(), self.name.clone()))
            .cloned()
            .ok_or_else(|| StorageError::UnknownSnapshot {
                volume: self.volume.clone(),
                snapshot: self.name.clone(),
            })
    }

    /// Size in bytes.
    pub fn size(&self) -> Result<u64> {
        Ok(self.record(&self.store.read_state())?.geometry.size)
    }

    /// Reads like [`Volume::read_at`], as the volume was when the snapshot was taken.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.store.read_state();
        let rec = self.record(&st)?;
        self.store
            .read_layer(&st, &self.label(), rec.layer, &rec.geometry, offset, buf)
    }
}
