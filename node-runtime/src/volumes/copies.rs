//! Copies added to and removed from a volume on its writer (issue 15 item 7: copies are
//! rebuilt and moved, never lost or recreated empty).
//!
//! `AddVolumeCopy{volume, peer}` goes to the epoch's writer. Under the volume's lock
//! taken whole it creates the copy on `peer` (`EnsureReplica`, forwarding the
//! controller's signed request and the list of the volume's copies, so the new copy
//! accepts in-sync sets that name them), marks *every allocated region* of the volume
//! dirty for it (the new copy is empty), and records it among the volume's copies (the
//! writer's volume record, durably, and in memory). From then on every write marks
//! the new copy dirty too (it is outside the in-sync set), and the writer's catch-up
//! (`epochs.rs`) ships the union of its dirty regions, which is the whole volume, and
//! only then reports it `caught_up`; the controller adds it to the in-sync set.
//! Nothing is ever read from the new copy before that: it is outside the set.
//!
//! `RemoveVolumeCopy{volume, node}` forgets a copy outside the in-sync set (the
//! controller removes it from the set first) and its dirty regions, then deletes it on
//! its node (`DeleteReplica`, forwarding the signed request) when that node answers
//! within [`DELETE_TIMEOUT`]; a dead node's copy is only forgotten.
//!
//! Both refuse before the controller installed an epoch: at epoch 0 every copy counts
//! as in sync, an empty one included.

use std::time::Duration;

use proto::v1;
use redb::Durability;
use tonic::Status;

use super::epochs::{dirty_prefix, merge_ranges};
use super::{ReplicationCaller, VolumeEntry, Volumes, parse_intent_key, peer_failure};
use crate::records::{self, Peer, VolumeRecord, VolumeRole};
use crate::validate;

/// How long the writer waits for a removed copy's node to delete it.
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(3);

/// A copy set changed on this writer, and the progress of the catch-up running now.
#[derive(Debug, Default)]
pub struct CopiesState {
    /// The other copies once AddVolumeCopy or RemoveVolumeCopy changed them (`None`:
    /// as the volume record loaded or created names them).
    pub changed: Option<Vec<Peer>>,
    /// Bytes the catch-up running now has shipped of the dirty regions it took.
    pub shipping: u64,
}

impl VolumeEntry {
    pub(super) fn copies_state(&self) -> std::sync::MutexGuard<'_, CopiesState> {
        self.copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn changed_copies(&self) -> Option<Vec<Peer>> {
        self.copies_state().changed.clone()
    }
}

/// The fields of `AddVolumeCopy` and `RemoveVolumeCopy`.
fn validate_action(action: &v1::apply_request::Action) -> Result<(), Status> {
    use v1::apply_request::Action;
    match action {
        Action::AddVolumeCopy(add) => {
            validate::name("add_volume_copy.volume", &add.volume)?;
            let Some(peer) = &add.peer else {
                return Err(validate::invalid(
                    "add_volume_copy.peer",
                    "is missing; name the node that gets the new copy",
                ));
            };
            validate::name("add_volume_copy.peer.name", &peer.name)
        }
        Action::RemoveVolumeCopy(remove) => {
            validate::name("remove_volume_copy.volume", &remove.volume)?;
            validate::name("remove_volume_copy.node", &remove.node)
        }
        _ => Err(Status::internal("not a copy action")),
    }
}

impl Volumes {
    /// Carries out `AddVolumeCopy` or `RemoveVolumeCopy` (validated here; `grant` is
    /// the controller's signed request, forwarded to the copy's node).
    pub async fn apply_copy_action(
        &self,
        action: &v1::apply_request::Action,
        grant: v1::ControllerGrant,
    ) -> Result<v1::apply_response::Result, Status> {
        use v1::apply_request::Action;
        use v1::apply_response::Result as ApplyResult;
        validate_action(action)?;
        match action {
            Action::AddVolumeCopy(add) => {
                let peer = add.peer.clone().unwrap_or_default();
                let record = self.add_copy(&add.volume, peer, grant).await?;
                Ok(ApplyResult::Volume(super::snapshots::volume_result(record)))
            }
            Action::RemoveVolumeCopy(remove) => {
                self.remove_copy(&remove.volume, &remove.node, grant)
                    .await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            _ => Err(Status::internal("not a copy action")),
        }
    }

    /// The entry of a volume whose copies this node may change: it is the writer of
    /// an epoch the controller installed.
    async fn copies_writer(
        &self,
        volume: &str,
        verb: &str,
    ) -> Result<std::sync::Arc<VolumeEntry>, Status> {
        let entry = self.entry(volume).await?;
        let epoch = entry.epoch();
        if epoch.epoch == 0 {
            return Err(Status::failed_precondition(format!(
                "volume `{volume}` on node {} has no epoch from the controller yet (at epoch 0 every copy counts as in sync, an empty new one too); install one (SetVolumeEpoch) before you {verb}",
                self.node_name
            )));
        }
        if self.writer_name(&entry) != self.node_name {
            return Err(Status::failed_precondition(format!(
                "node {} is not the writer of volume `{volume}` at {}; {verb} on its writer, node {}",
                self.node_name,
                epoch.describe(),
                self.writer_name(&entry)
            )));
        }
        self.check_writer(&entry)?;
        Ok(entry)
    }

    /// `AddVolumeCopy`: see the module documentation. Returns the volume with its
    /// copies (`replica_peers`: every copy but this writer's).
    async fn add_copy(
        &self,
        volume: &str,
        peer: v1::Peer,
        grant: v1::ControllerGrant,
    ) -> Result<VolumeRecord, Status> {
        if peer.name == self.node_name {
            return Err(validate::invalid(
                "add_volume_copy.peer.name",
                format!(
                    "`{}` is this node, the writer, which holds a copy already",
                    peer.name
                ),
            ));
        }
        let entry = self.copies_writer(volume, "add a copy").await?;
        let _whole = entry.write_lock.lock().await;
        self.check_writer(&entry)?;
        let mut others = self.other_copies(&entry);
        if others.iter().any(|copy| copy.name == peer.name) {
            return Ok(self.with_copies(&entry, &others));
        }
        let mut added = records::peer(&peer);
        if added.address.is_empty() {
            let directory = self
                .peer_directory
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match directory.iter().find(|known| known.name == added.name) {
                Some(known) => added.address = known.address.clone(),
                None => {
                    return Err(validate::invalid(
                        "add_volume_copy.peer.address",
                        format!(
                            "is empty and `{}` is not in node {}'s peer set (SetPeers)",
                            added.name, self.node_name
                        ),
                    ));
                }
            }
        }
        others.push(added.clone());
        let mut client = self.peer_client(&added)?;
        client
            .ensure_replica(v1::EnsureReplicaRequest {
                volume: volume.to_string(),
                primary: self.node_name.clone(),
                size_bytes: entry.size(),
                stripe_width: entry.record.stripe_width,
                stripe_unit_bytes: entry.record.stripe_unit_bytes,
                grant: Some(grant),
                copies: others.iter().map(records::wire_peer).collect(),
            })
            .await
            .map_err(|status| peer_failure(&added, "create the new copy", &status))?;
        // The new copy is empty: every allocated byte is dirty for it, before it is
        // a copy (no write runs meanwhile: the lock is held whole).
        let regions = self.allocated_ranges(&entry).await?;
        for (offset, length) in &regions {
            self.mark_dirty(&entry, &added.name, *offset, *length)?;
        }
        let record = self.keep_copies(&entry, others)?;
        let bytes: u64 = regions.iter().map(|(_, length)| length).sum();
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: volume.to_string(),
                health: v1::Health::Degraded as i32,
                detail: format!(
                    "new copy on {}: {bytes} allocated bytes to ship before it may join the in-sync set",
                    added.name
                ),
                deleted: false,
            }));
        Ok(record)
    }

    /// `RemoveVolumeCopy`: see the module documentation.
    async fn remove_copy(
        &self,
        volume: &str,
        node: &str,
        grant: v1::ControllerGrant,
    ) -> Result<(), Status> {
        if node == self.node_name {
            return Err(validate::invalid(
                "remove_volume_copy.node",
                format!("`{node}` is this node, the writer; make another copy the writer first"),
            ));
        }
        let entry = self.copies_writer(volume, "remove a copy").await?;
        let removed = {
            let _whole = entry.write_lock.lock().await;
            self.check_writer(&entry)?;
            let epoch = entry.epoch();
            if epoch.in_sync.iter().any(|name| name == node) {
                return Err(Status::failed_precondition(format!(
                    "the copy of volume `{volume}` on node {node} is in the in-sync set of {}; the controller removes it from the set first",
                    epoch.describe()
                )));
            }
            let mut others = self.other_copies(&entry);
            let Some(position) = others.iter().position(|copy| copy.name == node) else {
                return Ok(());
            };
            let removed = others.remove(position);
            self.keep_copies(&entry, others)?;
            for key in self
                .records
                .intents(&dirty_prefix(volume, node))
                .map_err(super::records_status)?
            {
                self.records
                    .remove_intent(&key, Durability::Immediate)
                    .map_err(super::records_status)?;
            }
            let mut writer = entry.writer_state();
            writer.caught_up.remove(node);
            writer.awaiting_removal.remove(node);
            removed
        };
        let deleted = match self.peer_client(&removed) {
            Ok(mut client) => {
                let call = client.delete_replica(v1::DeleteReplicaRequest {
                    volume: volume.to_string(),
                    grant: Some(grant),
                });
                match tokio::time::timeout(DELETE_TIMEOUT, call).await {
                    Ok(Ok(_)) => "deleted there".to_string(),
                    Ok(Err(status)) => format!("not deleted there: {}", status.message()),
                    Err(_) => format!(
                        "not deleted there: node {node} did not answer within {} ms",
                        DELETE_TIMEOUT.as_millis()
                    ),
                }
            }
            Err(status) => format!("not deleted there: {}", status.message()),
        };
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: volume.to_string(),
                health: v1::Health::Healthy as i32,
                detail: format!("copy on {node} removed ({deleted})"),
                deleted: false,
            }));
        Ok(())
    }

    /// Keeps `others` as the volume's other copies: in the writer's volume record
    /// (durably) and in memory. A primary's record lists them as its replicas; a
    /// replica that became the writer lists them with itself as the volume's copies,
    /// and becomes the volume's primary once the primary's copy is gone.
    fn keep_copies(&self, entry: &VolumeEntry, others: Vec<Peer>) -> Result<VolumeRecord, Status> {
        let mut record = entry.record_now();
        let keeps_primary = others.iter().any(|copy| copy.name == record.primary);
        if record.role == VolumeRole::Primary || !keeps_primary {
            record.role = VolumeRole::Primary;
            record.replica_peers = others.clone();
            record.primary = String::new();
            record.primary_key_hex = String::new();
            record.copies = Vec::new();
        } else {
            record.copies = others
                .iter()
                .filter(|copy| copy.name != record.primary)
                .cloned()
                .chain(std::iter::once(Peer {
                    name: self.node_name.clone(),
                    address: String::new(),
                    public_key_hex: self.own_key_hex.clone(),
                }))
                .collect();
        }
        self.records
            .put(&record.name, &record)
            .map_err(super::records_status)?;
        entry.copies_state().changed = Some(others.clone());
        // The health names the copies outside the in-sync set (unless writes are
        // frozen: that says more).
        if entry.writer_state().awaiting_removal.is_empty() {
            let (health, detail) = self.epoch_health(entry, &entry.epoch());
            self.set_health(entry, health, detail);
        }
        Ok(self.with_copies(entry, &others))
    }

    /// A copy that is not the writer learns the copies an epoch's in-sync set names
    /// that it does not know (`in_sync`): a copy the writer added after this one was
    /// made (`AddVolumeCopy` tells only the new copy the others, not the others the
    /// new one) and the authority put in the set once the writer reported it caught
    /// up (the epoch is the controller's, signed: the authority over the copies). Each
    /// is recorded among the volume's copies, durably, so a later writer here (after a
    /// fail-over) writes it too.
    pub(super) fn learn_copies(
        &self,
        entry: &VolumeEntry,
        in_sync: &[String],
    ) -> Result<(), Status> {
        if self.is_writer(entry) {
            return Ok(());
        }
        let known = self.copy_names(entry);
        let strangers: Vec<&String> = in_sync
            .iter()
            .filter(|node| !known.contains(node.as_str()) && **node != self.node_name)
            .collect();
        if strangers.is_empty() {
            return Ok(());
        }
        let mut others = self.other_copies(entry);
        {
            let directory = self
                .peer_directory
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for stranger in strangers {
                // By name, as the new copy itself records the others: the address and
                // key are looked up when the copy is written (`other_copies`,
                // `key_of`), from the pushed peer set when there is one.
                others.push(match directory.iter().find(|peer| peer.name == *stranger) {
                    Some(peer) => records::peer(peer),
                    None => Peer {
                        name: stranger.clone(),
                        address: String::new(),
                        public_key_hex: String::new(),
                    },
                });
            }
        }
        self.keep_copies(entry, others)?;
        Ok(())
    }

    /// The volume's record as a result: `replica_peers` are its other copies.
    fn with_copies(&self, entry: &VolumeEntry, others: &[Peer]) -> VolumeRecord {
        VolumeRecord {
            replica_peers: others.to_vec(),
            ..entry.record_now()
        }
    }

    /// The replica record of a new copy the writer makes for a forwarded
    /// `AddVolumeCopy` (`grant`'s target must be the caller, checked already): the
    /// request must name this node (this key) and the caller as the one it was sent
    /// to; the copies are the ones the writer lists.
    pub(super) fn added_copy_record(
        &self,
        mut record: VolumeRecord,
        request: &v1::EnsureReplicaRequest,
        caller: &ReplicationCaller,
        envelope: &proto::auth::Envelope,
        add: &v1::AddVolumeCopy,
    ) -> Result<VolumeRecord, Status> {
        let volume = &request.volume;
        let refuse = |why: String| Err(self.denied(caller, "create", volume, &why));
        if add.volume != *volume {
            return refuse(format!(
                "the controller's AddVolumeCopy is for volume `{}`",
                add.volume
            ));
        }
        if envelope.target.name != request.primary {
            return refuse(format!(
                "the controller sent its AddVolumeCopy to node {}, not to `{}`",
                envelope.target, request.primary
            ));
        }
        let named_here = add.peer.as_ref().is_some_and(|peer| {
            peer.name == self.node_name
                && (peer.public_key_hex.is_empty()
                    || peer.public_key_hex.eq_ignore_ascii_case(&self.own_key_hex))
        });
        if !named_here {
            return refuse(format!(
                "the controller's AddVolumeCopy does not name node {} (this key) as the new copy",
                self.node_name
            ));
        }
        record.primary_key_hex = envelope.target.public_key_hex.clone();
        record.copies = request
            .copies
            .iter()
            .filter(|peer| peer.name != request.primary)
            .map(|peer| Peer {
                name: peer.name.clone(),
                address: String::new(),
                public_key_hex: peer.public_key_hex.to_ascii_lowercase(),
            })
            .collect();
        Ok(record)
    }

    /// Every allocated byte range of the volume here, in order.
    async fn allocated_ranges(&self, entry: &VolumeEntry) -> Result<Vec<(u64, u64)>, Status> {
        let (name, size) = (entry.record.name.clone(), entry.size());
        let local = self.local.clone();
        super::blocking(move || {
            let mut ranges = Vec::new();
            let mut at = 0;
            while at < size {
                let runs = local.allocation(&name, at, size - at)?;
                let before = at;
                for run in runs {
                    if run.allocated {
                        ranges.push((at, run.length));
                    }
                    at += run.length;
                }
                if at == before {
                    break;
                }
            }
            Ok(ranges)
        })
        .await
    }

    /// Whether a forwarded `RemoveVolumeCopy` lets `caller` delete this node's copy.
    pub(super) fn removal_granted(signed: &v1::ApplyRequest, volume: &str, node: &str) -> bool {
        matches!(
            &signed.action,
            Some(v1::apply_request::Action::RemoveVolumeCopy(remove))
                if remove.volume == volume && remove.node == node
        )
    }

    /// Writer only: the bytes still to ship to copies outside the in-sync set that
    /// are not caught up (their dirty regions, merged, less what the catch-up running
    /// now has shipped).
    pub(super) fn resync_pending_bytes(&self, entry: &VolumeEntry) -> u64 {
        if self.writer_name(entry) != self.node_name {
            return 0;
        }
        let (_, _, catching, outside) = self.targets(entry);
        let name = &entry.record.name;
        let mut pending = 0;
        for peer in outside {
            if catching.iter().any(|caught| caught.name == peer.name) {
                continue;
            }
            let ranges = self
                .records
                .intents(&dirty_prefix(name, &peer.name))
                .unwrap_or_default()
                .iter()
                .filter_map(|key| parse_intent_key(key))
                .collect();
            pending += merge_ranges(ranges, u64::MAX)
                .iter()
                .map(|(_, length)| length)
                .sum::<u64>();
        }
        pending.saturating_sub(entry.copies_state().shipping)
    }
}
