//! Delta replication to another site (issue 18: a protection plan's `replicate
//! to-site=… every=… keep=…`).
//!
//! The writer of a protected volume ships its snapshots to a volume on a node of the
//! target site (`Apply.ReplicateVolume` on the source, `Apply.AcceptReplication` on the
//! target, both signed by the controller):
//! - **What is shipped.** The newest snapshot, as a delta from the newest snapshot both
//!   sides hold (the *base*; none the first time: a full copy of the units holding
//!   data). The volume store says which stripe units some layer between the two holds
//!   (`storage::Store::changed_units`); of those, only the 4 KiB blocks whose bytes
//!   differ from the base are sent (byte comparison on the source, never crc32c), data
//!   as data and blocks that became zero (trims, zeroed ranges) as zero ranges, so the
//!   copy matches block for block. A unit rewritten with the same bytes costs nothing on
//!   the wire.
//! - **Order and progress.** Pieces (≤ 1 MiB) go in ascending offset order
//!   (`Replication.DeltaWrite`); the target applies each durably through its own
//!   replicated write path (so the DR site's copies hold it too) and records, in the
//!   same `node.redb` record, the offset up to which everything is durable. A sender that
//!   lost the link or restarted asks `DeltaStatus` and resumes there: nothing is sent
//!   twice beyond the piece in flight.
//! - **Verification.** `DeltaCommit` carries the SHA-256 manifest of the snapshot (the
//!   SHA-256 of the concatenated SHA-256 of every stripe unit); the target computes the
//!   same over what it holds and only if they are equal takes the snapshot (sequenced
//!   on its copies, like any snapshot) and applies its retention (`keep`). Otherwise it
//!   answers `DATA_LOSS` with both manifests.
//! - **Pins.** The base of the next delta (`last_shipped`) and the snapshot in transfer
//!   (`shipping`) are kept from local retention (`protection.rs`), so the next delta
//!   always has its base and an interrupted one resumes with the same content.
//! - **Authorisation.** The target accepts `Delta*` calls on a volume only from the
//!   node its `AcceptReplication` named, by name and key (the caller must also be a
//!   trusted peer, like any Replication call).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proto::v1;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::{Volumes, blocking, records_status};
use crate::events::now_unix_ms;
use crate::records::{Peer, ReplicationReceive, ReplicationRecord, ReplicationSend};
use crate::validate;

/// The largest piece of a delta (data bytes per `DeltaWrite`).
const PIECE_BYTES: u64 = 1024 * 1024;
const BLOCK: usize = storage::BLOCK_SIZE as usize;
const MIN_EVERY_MS: u64 = 1000;
const MAX_EVERY_MS: u64 = 365 * 24 * 3600 * 1000;
const MAX_KEEP: u32 = 100_000;
/// How soon a failed scheduled transfer is tried again.
const RETRY_MS: u64 = 2000;
/// How long one call to the target may take before the link counts as lost (a dropped
/// link otherwise waits for TCP's own timeout, minutes); the next run resumes.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `call` within [`CALL_TIMEOUT`], `UNAVAILABLE` after it.
async fn within<T>(
    target: &str,
    what: &str,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(Status::unavailable(format!(
            "node {target} did not answer {what} within {} s (link down?); the transfer resumes where it stopped",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// The replication schedules' clocks and the locks of this node's transfers.
#[derive(Debug, Default)]
pub(super) struct State {
    /// When each schedule is due next (Unix ms), by volume.
    next_due: std::sync::Mutex<BTreeMap<String, u64>>,
    /// One transfer shipped at a time.
    shipping: tokio::sync::Mutex<()>,
    /// One piece (or commit) received at a time.
    receiving: tokio::sync::Mutex<()>,
    /// Per-unit SHA-256 of the last snapshot shipped (source) or committed (target),
    /// by volume: the next manifest rehashes only the units that changed.
    hashes: std::sync::Mutex<UnitHashes>,
    /// On the target, the ranges written by the transfer in progress, by volume, and
    /// whether they are all of it (false when this process did not see it start).
    touched: std::sync::Mutex<BTreeMap<String, Touched>>,
    /// Why the last scheduled transfer of each volume failed (removed on success).
    errors: std::sync::Mutex<BTreeMap<String, String>>,
}

/// By volume: a snapshot and the SHA-256 of each of its stripe units.
type UnitHashes = BTreeMap<String, (String, Vec<[u8; 32]>)>;

/// What a transfer in progress wrote on the target.
#[derive(Debug, Default)]
struct Touched {
    snapshot: String,
    complete: bool,
    ranges: Vec<(u64, u64)>,
}

/// One piece to send: data, or a range that reads as zeros.
enum Piece {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// The SHA-256 manifest of a point of a volume: the SHA-256 of the concatenated SHA-256
/// of each `unit_bytes` range, read by `read(offset, length)`.
fn manifest(
    size: u64,
    unit_bytes: u64,
    mut unit_hash: impl FnMut(u64, u64, u64) -> Result<[u8; 32], storage::StorageError>,
) -> Result<(Vec<u8>, Vec<[u8; 32]>), storage::StorageError> {
    let mut units = Vec::new();
    let mut offset = 0;
    while offset < size {
        let length = unit_bytes.min(size - offset);
        units.push(unit_hash(offset / unit_bytes, offset, length)?);
        offset += length;
    }
    Ok((root_of(&units), units))
}

/// The manifest over the per-unit hashes.
fn root_of(units: &[[u8; 32]]) -> Vec<u8> {
    let mut root = Sha256::new();
    for unit in units {
        root.update(unit);
    }
    root.finalize().to_vec()
}

/// The SHA-256 of `length` zero bytes (a unit no layer holds).
fn zero_hash(length: u64) -> [u8; 32] {
    Sha256::digest(vec![0u8; length as usize]).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// The pieces of one range: the 4 KiB blocks of `new` that differ from `old` (zeros
/// when there is no base), runs of data and runs of zeros, each at most
/// [`PIECE_BYTES`].
fn diff_pieces(offset: u64, new: &[u8], old: Option<&[u8]>, out: &mut Vec<Piece>) {
    let mut run: Option<Piece> = None;
    for (index, block) in new.chunks(BLOCK).enumerate() {
        let at = offset + (index * BLOCK) as u64;
        let same = match old {
            Some(old) => &old[index * BLOCK..index * BLOCK + block.len()] == block,
            None => is_zero(block),
        };
        let zero = !same && is_zero(block);
        // Extend the current run if this block continues it, else close it.
        let extended = match (&mut run, same, zero) {
            (Some(Piece::Data(start, data)), false, false)
                if *start + data.len() as u64 == at && (data.len() as u64) < PIECE_BYTES =>
            {
                data.extend_from_slice(block);
                true
            }
            (Some(Piece::Zero(start, length)), false, true) if *start + *length == at => {
                *length += block.len() as u64;
                true
            }
            _ => false,
        };
        if extended {
            continue;
        }
        if let Some(piece) = run.take() {
            out.push(piece);
        }
        if !same {
            run = Some(if zero {
                Piece::Zero(at, block.len() as u64)
            } else {
                Piece::Data(at, block.to_vec())
            });
        }
    }
    if let Some(piece) = run {
        out.push(piece);
    }
}

impl Volumes {
    fn replication_record(&self, volume: &str) -> Result<ReplicationRecord, Status> {
        Ok(self
            .records
            .get::<ReplicationRecord>(volume)
            .map_err(records_status)?
            .unwrap_or_default())
    }

    fn put_replication_record(
        &self,
        volume: &str,
        mut record: ReplicationRecord,
    ) -> Result<(), Status> {
        if record.send.is_none() && record.receive.is_none() {
            return self
                .records
                .remove::<ReplicationRecord>(volume)
                .map_err(records_status);
        }
        record.version = ReplicationRecord::VERSION;
        self.records.put(volume, &record).map_err(records_status)
    }

    fn delta_hashes(&self) -> std::sync::MutexGuard<'_, UnitHashes> {
        self.delta
            .hashes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn delta_touched(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Touched>> {
        self.delta
            .touched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn replication_due(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.delta
            .next_due
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The snapshots of `volume` that retention must keep: the base of its next delta
    /// and the one being shipped.
    pub(super) fn replication_pins(&self, volume: &str) -> Vec<String> {
        match self.replication_record(volume) {
            Ok(ReplicationRecord {
                send: Some(send), ..
            }) => [send.last_shipped, send.shipping]
                .into_iter()
                .filter(|name| !name.is_empty())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Every volume's replication state, for Observe.
    pub fn replication_statuses(&self) -> Vec<v1::ReplicationStatus> {
        let records = self.records.list::<ReplicationRecord>().unwrap_or_default();
        let errors = self
            .delta
            .errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let now = now_unix_ms();
        let mut out = Vec::new();
        for (volume, record) in records {
            if let Some(send) = record.send {
                let at = self
                    .snapshot_records(&volume)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|(name, _)| *name == send.last_shipped)
                    .map_or(0, |(_, snapshot)| snapshot.created_at_unix_ms);
                out.push(v1::ReplicationStatus {
                    volume: volume.clone(),
                    role: "source".into(),
                    peer: send.target.name,
                    peer_volume: send.target_volume,
                    every_ms: send.every_ms,
                    keep: send.keep,
                    last_replicated: send.last_shipped,
                    last_replicated_at_unix_ms: at,
                    rpo_ms: if at == 0 { 0 } else { now.saturating_sub(at) },
                    in_transfer: send.shipping,
                    transferred_to: 0,
                    last_error: errors.get(&volume).cloned().unwrap_or_default(),
                });
            }
            if let Some(receive) = record.receive {
                let newest = receive.snapshots.last().cloned().unwrap_or_default();
                // Scheduled snapshots carry the source's time in their name.
                let at = super::protection::scheduled_at(&newest).unwrap_or(0);
                out.push(v1::ReplicationStatus {
                    volume,
                    role: "target".into(),
                    peer: receive.source.name,
                    last_replicated: newest,
                    last_replicated_at_unix_ms: at,
                    rpo_ms: if at == 0 { 0 } else { now.saturating_sub(at) },
                    in_transfer: receive.receiving,
                    transferred_to: receive.next_offset,
                    ..Default::default()
                });
            }
        }
        out
    }

    // --- the source -------------------------------------------------------------

    /// `Apply.ReplicateVolume`: holds (or drops) the volume's replication schedule;
    /// with `now`, ships once and says what it sent.
    pub async fn replicate_volume(
        &self,
        set: &v1::ReplicateVolume,
    ) -> Result<Option<v1::ReplicationResult>, Status> {
        validate::name("replicate_volume.volume", &set.volume)?;
        validate::name("replicate_volume.target_volume", &set.target_volume)?;
        let target = set.target.as_ref().ok_or_else(|| {
            validate::invalid(
                "replicate_volume.target",
                "must name the target node (name, address and key)",
            )
        })?;
        validate::name("replicate_volume.target.name", &target.name)?;
        if target.address.is_empty() {
            return Err(validate::invalid(
                "replicate_volume.target.address",
                "must be the target node's gRPC address (host:port)",
            ));
        }
        if target.name == self.node_name {
            return Err(validate::invalid(
                "replicate_volume.target.name",
                format!(
                    "is this node ({}); a volume is replicated to a node of another site",
                    self.node_name
                ),
            ));
        }
        if set.every_ms != 0 && !(MIN_EVERY_MS..=MAX_EVERY_MS).contains(&set.every_ms) {
            return Err(validate::invalid(
                "replicate_volume.every_ms",
                format!(
                    "is {} ms; replication runs every {MIN_EVERY_MS} ms (1 s) to {MAX_EVERY_MS} ms (a year), 0 removes the schedule",
                    set.every_ms
                ),
            ));
        }
        if !(1..=MAX_KEEP).contains(&set.keep) {
            return Err(validate::invalid(
                "replicate_volume.keep",
                format!(
                    "is {}; the target keeps 1 to {MAX_KEEP} snapshots",
                    set.keep
                ),
            ));
        }
        self.writer_entry(&set.volume, "replicate").await?;
        let mut record = self.replication_record(&set.volume)?;
        let target = crate::records::peer(target);
        let same_target = record.send.as_ref().is_some_and(|send| {
            send.target.name == target.name && send.target_volume == set.target_volume
        });
        let (last_shipped, shipping) = match (&record.send, same_target) {
            (Some(send), true) => (send.last_shipped.clone(), send.shipping.clone()),
            _ => (String::new(), String::new()),
        };
        if set.every_ms == 0 && !set.now {
            record.send = None;
            self.replication_due().remove(&set.volume);
        } else {
            record.send = Some(ReplicationSend {
                target,
                target_volume: set.target_volume.clone(),
                every_ms: set.every_ms,
                keep: set.keep,
                last_shipped,
                shipping,
            });
        }
        self.put_replication_record(&set.volume, record)?;
        if set.now {
            return Ok(Some(self.ship_delta(&set.volume).await?));
        }
        Ok(None)
    }

    /// Runs the replication schedules until the node stops. With none it sleeps until
    /// a record changes.
    pub async fn replication_loop(self: std::sync::Arc<Self>, tick: Duration) {
        let mut changes = self.records.changes();
        loop {
            tokio::time::sleep(tick).await;
            changes.borrow_and_update();
            let Ok(records) = self.records.list::<ReplicationRecord>() else {
                continue;
            };
            if records.is_empty() {
                let _ = changes.changed().await;
                continue;
            }
            for (volume, record) in records {
                let Some(send) = record.send else { continue };
                if send.every_ms == 0 {
                    continue;
                }
                let now = now_unix_ms();
                let due = *self.replication_due().entry(volume.clone()).or_insert(now);
                if now < due {
                    continue;
                }
                let shipped = self.ship_delta(&volume).await;
                let mut errors = self
                    .delta
                    .errors
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                match &shipped {
                    Ok(_) => errors.remove(&volume),
                    Err(status) => errors.insert(volume.clone(), status.message().to_string()),
                };
                drop(errors);
                let next = match shipped {
                    Ok(_) => due.max(now.saturating_sub(send.every_ms)) + send.every_ms,
                    Err(status) => {
                        self.replication_event(
                            &volume,
                            &send,
                            &format!(
                                "transfer failed (tried again in {RETRY_MS} ms, resuming where it stopped): {}",
                                status.message()
                            ),
                        );
                        now + RETRY_MS.min(send.every_ms)
                    }
                };
                self.replication_due().insert(volume, next);
            }
        }
    }

    fn replication_event(&self, volume: &str, send: &ReplicationSend, what: &str) {
        eprintln!(
            "cairn-node: replication: volume {volume} to {}:{}: {what}",
            send.target.name, send.target_volume
        );
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: volume.to_string(),
                health: v1::Health::Degraded as i32,
                detail: format!(
                    "replication to node {} volume `{}`: {what}",
                    send.target.name, send.target_volume
                ),
                deleted: false,
            }));
    }

    /// Ships the snapshot in transfer (if any), else the newest snapshot, to the
    /// target (see the module docs).
    async fn ship_delta(&self, volume: &str) -> Result<v1::ReplicationResult, Status> {
        let _one_at_a_time = self.delta.shipping.lock().await;
        let result = self.ship_locked(volume).await;
        if result.is_err() {
            // A connection that lost packets may stay stuck in TCP's back-off for
            // minutes: the next attempt connects anew.
            if let Ok(ReplicationRecord {
                send: Some(send), ..
            }) = self.replication_record(volume)
            {
                let prefix = format!("{} ", send.target.name);
                self.peer_clients
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .retain(|key, _| !key.starts_with(&prefix));
            }
        }
        result
    }

    async fn ship_locked(&self, volume: &str) -> Result<v1::ReplicationResult, Status> {
        let started = Instant::now();
        let mut record = self.replication_record(volume)?;
        let mut send = record.send.clone().ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume `{volume}` on node {} has no replication target",
                self.node_name
            ))
        })?;
        let snapshots: BTreeMap<String, u64> = self
            .snapshot_records(volume)?
            .into_iter()
            .filter(|(_, snapshot)| snapshot.deleting.is_empty())
            .map(|(name, snapshot)| (name, snapshot.created_at_unix_ms))
            .collect();
        let newest = snapshots
            .iter()
            .max_by_key(|(name, at)| (**at, (*name).clone()))
            .map(|(name, _)| name.clone());
        let snapshot = if snapshots.contains_key(&send.shipping) {
            send.shipping.clone()
        } else {
            newest.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "volume `{volume}` on node {} has no snapshot to replicate yet",
                    self.node_name
                ))
            })?
        };
        let snapshot_at = snapshots[&snapshot];
        let mut client = self.peer_client(&send.target)?;
        let status = within(
            &send.target.name,
            "DeltaStatus",
            client.delta_status(v1::DeltaStatusRequest {
                volume: send.target_volume.clone(),
            }),
        )
        .await?;
        if status.snapshots.contains(&snapshot) {
            // Committed there already (the answer was lost): nothing to send.
            send.last_shipped = snapshot.clone();
            send.shipping.clear();
            record.send = Some(send);
            self.put_replication_record(volume, record)?;
            return Ok(v1::ReplicationResult {
                volume: volume.to_string(),
                snapshot,
                snapshot_at_unix_ms: snapshot_at,
                duration_ms: started.elapsed().as_millis() as u64,
                ..Default::default()
            });
        }
        // The base: the newest snapshot the target committed that is still here.
        let base = status
            .snapshots
            .iter()
            .rev()
            .find(|name| snapshots.contains_key(*name) && snapshots[*name] <= snapshot_at)
            .cloned()
            .unwrap_or_default();
        let resumed_from = if status.receiving == snapshot && status.receiving_base == base {
            status.next_offset
        } else {
            0
        };
        if send.shipping != snapshot {
            send.shipping = snapshot.clone();
            record.send = Some(send.clone());
            self.put_replication_record(volume, record.clone())?;
        }
        let local = self.local.clone();
        let (owned_volume, owned_snapshot, owned_base) =
            (volume.to_string(), snapshot.clone(), base.clone());
        let changed = blocking(move || {
            local.changed_units(
                &owned_volume,
                (!owned_base.is_empty()).then_some(owned_base.as_str()),
                &owned_snapshot,
            )
        })
        .await?;
        let unit = changed.unit_bytes;
        let mut result = v1::ReplicationResult {
            volume: volume.to_string(),
            snapshot: snapshot.clone(),
            base: base.clone(),
            resumed_from,
            snapshot_at_unix_ms: snapshot_at,
            changed_unit_bytes: changed
                .units
                .iter()
                .map(|u| unit.min(changed.size.saturating_sub(u * unit)))
                .sum(),
            ..Default::default()
        };
        let mut read_hashes: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
        for &index in &changed.units {
            let unit_start = index * unit;
            let unit_end = (unit_start + unit).min(changed.size);
            if unit_end <= resumed_from {
                continue;
            }
            let from = unit_start.max(resumed_from);
            let local = self.local.clone();
            let (owned_volume, owned_snapshot, owned_base) =
                (volume.to_string(), snapshot.clone(), base.clone());
            let (pieces, hash) = blocking(move || {
                let length = unit_end - from;
                let (new, _) = local.read_snapshot(&owned_volume, &owned_snapshot, from, length)?;
                let hash: Option<[u8; 32]> =
                    (from == unit_start).then(|| Sha256::digest(&new).into());
                let old = if owned_base.is_empty() {
                    None
                } else {
                    Some(
                        local
                            .read_snapshot(&owned_volume, &owned_base, from, length)?
                            .0,
                    )
                };
                let mut pieces = Vec::new();
                diff_pieces(from, &new, old.as_deref(), &mut pieces);
                Ok((pieces, hash))
            })
            .await?;
            if let Some(hash) = hash {
                read_hashes.insert(index, hash);
            }
            let count = pieces.len();
            for (n, piece) in pieces.into_iter().enumerate() {
                let mut request = v1::DeltaWriteRequest {
                    volume: send.target_volume.clone(),
                    snapshot: snapshot.clone(),
                    base: base.clone(),
                    ..Default::default()
                };
                let end = match piece {
                    Piece::Data(offset, data) => {
                        result.data_bytes += data.len() as u64;
                        request.offset = offset;
                        request.checksums = data.chunks(BLOCK).map(crc32c::crc32c).collect();
                        let end = offset + data.len() as u64;
                        request.data = data;
                        end
                    }
                    Piece::Zero(offset, length) => {
                        result.zero_bytes += length;
                        request.offset = offset;
                        request.zero_length = length;
                        offset + length
                    }
                };
                request.covered_to = if n + 1 == count { unit_end } else { end };
                result.wire_bytes += prost::Message::encoded_len(&request) as u64;
                within(&send.target.name, "DeltaWrite", client.delta_write(request)).await?;
            }
        }
        // The manifest: the base's unit hashes with the changed units rehashed when
        // this process shipped the base; else every unit holding data read (the others
        // are zeros).
        let cached = self
            .delta_hashes()
            .get(volume)
            .filter(|(name, _)| !base.is_empty() && *name == base)
            .map(|(_, hashes)| hashes.clone());
        let data_units: std::collections::BTreeSet<u64> = if cached.is_some() || base.is_empty() {
            changed.units.iter().copied().collect()
        } else {
            let local = self.local.clone();
            let (owned_volume, owned_snapshot) = (volume.to_string(), snapshot.clone());
            blocking(move || local.changed_units(&owned_volume, None, &owned_snapshot))
                .await?
                .units
                .into_iter()
                .collect()
        };
        let local = self.local.clone();
        let (owned_volume, owned_snapshot) = (volume.to_string(), snapshot.clone());
        let size = changed.size;
        let (ours, unit_hashes) = blocking(move || {
            manifest(size, unit, |index, offset, length| {
                if let Some(hash) = read_hashes.get(&index) {
                    return Ok(*hash);
                }
                if !data_units.contains(&index) {
                    return Ok(match &cached {
                        Some(hashes) if (index as usize) < hashes.len() => hashes[index as usize],
                        _ => zero_hash(length),
                    });
                }
                let (data, _) =
                    local.read_snapshot(&owned_volume, &owned_snapshot, offset, length)?;
                Ok(Sha256::digest(&data).into())
            })
        })
        .await?;
        let commit = v1::DeltaCommitRequest {
            volume: send.target_volume.clone(),
            snapshot: snapshot.clone(),
            base: base.clone(),
            created_at_unix_ms: snapshot_at,
            manifest_sha256: ours.clone(),
            unit_bytes: unit,
            keep: send.keep,
        };
        result.wire_bytes += prost::Message::encoded_len(&commit) as u64;
        let answer = within(
            &send.target.name,
            "DeltaCommit",
            client.delta_commit(commit),
        )
        .await?;
        if answer.manifest_sha256 != ours {
            return Err(Status::data_loss(format!(
                "node {} committed snapshot `{snapshot}` of volume `{}` with manifest {}, not {} as on node {}",
                send.target.name,
                send.target_volume,
                hex(&answer.manifest_sha256),
                hex(&ours),
                self.node_name
            )));
        }
        result.manifest_sha256 = ours;
        self.delta_hashes()
            .insert(volume.to_string(), (snapshot.clone(), unit_hashes));
        send.last_shipped = snapshot.clone();
        send.shipping.clear();
        record.send = Some(send.clone());
        self.put_replication_record(volume, record)?;
        result.duration_ms = started.elapsed().as_millis() as u64;
        eprintln!(
            "cairn-node: replication: volume {volume} snapshot {snapshot} (base {}) to {}:{}: {} data + {} zero bytes ({} on the wire) of {} changed-unit bytes, resumed from {}, {} ms, manifest {}",
            if base.is_empty() { "none" } else { &base },
            send.target.name,
            send.target_volume,
            result.data_bytes,
            result.zero_bytes,
            result.wire_bytes,
            result.changed_unit_bytes,
            resumed_from,
            result.duration_ms,
            hex(&result.manifest_sha256)
        );
        Ok(result)
    }

    // --- the target -------------------------------------------------------------

    /// `Apply.AcceptReplication`: lets `source` ship deltas into `volume` (written
    /// here); an empty source stops it.
    pub async fn accept_replication(&self, set: &v1::AcceptReplication) -> Result<(), Status> {
        validate::name("accept_replication.volume", &set.volume)?;
        let mut record = self.replication_record(&set.volume)?;
        let source = set.source.as_ref().map(crate::records::peer);
        let Some(source) = source.filter(|source| !source.name.is_empty()) else {
            record.receive = None;
            return self.put_replication_record(&set.volume, record);
        };
        validate::name("accept_replication.source.name", &source.name)?;
        if source.public_key_hex.len() != 64 {
            return Err(validate::invalid(
                "accept_replication.source.public_key_hex",
                "must be the source node's ed25519 public key (64 hex characters)",
            ));
        }
        self.writer_entry(&set.volume, "receive a replication into")
            .await?;
        let same = record.receive.as_ref().is_some_and(|receive| {
            receive.source.name == source.name
                && receive
                    .source
                    .public_key_hex
                    .eq_ignore_ascii_case(&source.public_key_hex)
        });
        if !same {
            // A new source starts from the snapshots this volume holds, oldest first:
            // one the source holds too is the base of its first delta (a reversed
            // replication after a failover ships only what changed since the common
            // snapshot). The delta then applies to this volume's live data, so a
            // caller seeding a volume written since its newest snapshot reverts it
            // first; the manifest comparison at the commit refuses it otherwise.
            let mut held: Vec<(String, u64)> = self
                .snapshot_records(&set.volume)?
                .into_iter()
                .filter(|(_, snapshot)| snapshot.deleting.is_empty())
                .map(|(name, snapshot)| (name, snapshot.created_at_unix_ms))
                .collect();
            held.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
            record.receive = Some(ReplicationReceive {
                source: Peer {
                    public_key_hex: source.public_key_hex.to_ascii_lowercase(),
                    ..source
                },
                snapshots: held.into_iter().map(|(name, _)| name).collect(),
                ..Default::default()
            });
            self.put_replication_record(&set.volume, record)?;
        }
        Ok(())
    }

    /// The receiving record of `volume`, if `caller_key` is its source.
    fn receiving(
        &self,
        volume: &str,
        caller_key: &str,
        caller: &str,
    ) -> Result<(ReplicationRecord, ReplicationReceive), Status> {
        let record = self.replication_record(volume)?;
        match &record.receive {
            Some(receive)
                if receive
                    .source
                    .public_key_hex
                    .eq_ignore_ascii_case(caller_key) =>
            {
                Ok((record.clone(), receive.clone()))
            }
            Some(receive) => Err(Status::permission_denied(format!(
                "{caller} may not replicate into volume `{volume}` on node {}: only node {} (key {}) ships into it",
                self.node_name, receive.source.name, receive.source.public_key_hex
            ))),
            None => Err(Status::permission_denied(format!(
                "{caller} may not replicate into volume `{volume}` on node {}: it accepts no replication (Apply.AcceptReplication)",
                self.node_name
            ))),
        }
    }

    /// `Replication.DeltaStatus`.
    pub async fn delta_status(
        &self,
        volume: &str,
        caller_key: &str,
        caller: &str,
    ) -> Result<v1::DeltaStatusResponse, Status> {
        let (_, receive) = self.receiving(volume, caller_key, caller)?;
        let size_bytes = self.size_of(volume).await?;
        Ok(v1::DeltaStatusResponse {
            snapshots: receive.snapshots,
            receiving: receive.receiving,
            receiving_base: receive.receiving_base,
            next_offset: receive.next_offset,
            size_bytes,
        })
    }

    /// `Replication.DeltaWrite`: one piece, applied durably, then the progress mark.
    pub async fn delta_write(
        &self,
        request: v1::DeltaWriteRequest,
        caller_key: &str,
        caller: &str,
    ) -> Result<v1::DeltaWriteResponse, Status> {
        let volume = request.volume.clone();
        self.writer_entry(&volume, "receive a replication into")
            .await?;
        let _one_at_a_time = self.delta.receiving.lock().await;
        let (mut record, mut receive) = self.receiving(&volume, caller_key, caller)?;
        validate::name("delta_write_request.snapshot", &request.snapshot)?;
        if receive.receiving != request.snapshot || receive.receiving_base != request.base {
            let newest = receive.snapshots.last().cloned().unwrap_or_default();
            if !request.base.is_empty() && request.base != newest {
                return Err(Status::failed_precondition(format!(
                    "volume `{volume}` on node {} holds snapshot `{newest}` as its newest; a delta from `{}` cannot be applied (ask DeltaStatus for the base)",
                    self.node_name, request.base
                )));
            }
            if !receive.receiving.is_empty() && receive.next_offset > 0 {
                return Err(Status::failed_precondition(format!(
                    "volume `{volume}` on node {} is receiving snapshot `{}` (base `{}`, {} bytes in); finish it before sending `{}`",
                    self.node_name,
                    receive.receiving,
                    receive.receiving_base,
                    receive.next_offset,
                    request.snapshot
                )));
            }
            receive.receiving = request.snapshot.clone();
            receive.receiving_base = request.base.clone();
            receive.next_offset = 0;
            self.delta_touched().insert(
                volume.clone(),
                Touched {
                    snapshot: request.snapshot.clone(),
                    complete: true,
                    ranges: Vec::new(),
                },
            );
        }
        let length = if request.data.is_empty() {
            request.zero_length
        } else {
            request.data.len() as u64
        };
        if length == 0
            || !length.is_multiple_of(BLOCK as u64)
            || !request.offset.is_multiple_of(BLOCK as u64)
        {
            return Err(validate::invalid(
                "delta_write_request",
                format!(
                    "offset {} and length {length} must be non-zero multiples of 4096 (data, or zero_length)",
                    request.offset
                ),
            ));
        }
        if request.covered_to < request.offset + length {
            return Err(validate::invalid(
                "delta_write_request.covered_to",
                format!(
                    "is {}, before the end of the piece ({})",
                    request.covered_to,
                    request.offset + length
                ),
            ));
        }
        if request.offset + length <= receive.next_offset {
            return Ok(v1::DeltaWriteResponse { applied: false });
        }
        if !request.data.is_empty() {
            let sums: Vec<u32> = request.data.chunks(BLOCK).map(crc32c::crc32c).collect();
            if sums != request.checksums {
                return Err(Status::data_loss(format!(
                    "delta piece of volume `{volume}` at offset {} arrived damaged (crc32c differs); nothing was written",
                    request.offset
                )));
            }
            self.write(&volume, request.offset, request.data).await?;
        } else {
            let mut at = request.offset;
            let end = request.offset + length;
            while at < end {
                let chunk = (end - at).min(4 * 1024 * 1024);
                self.write(&volume, at, vec![0u8; chunk as usize]).await?;
                at += chunk;
            }
        }
        {
            let mut touched = self.delta_touched();
            let entry = touched.entry(volume.clone()).or_default();
            if entry.snapshot != request.snapshot {
                // This process did not see the transfer start (a restart).
                *entry = Touched {
                    snapshot: request.snapshot.clone(),
                    complete: false,
                    ranges: Vec::new(),
                };
            }
            entry.ranges.push((request.offset, length));
        }
        receive.next_offset = receive.next_offset.max(request.covered_to);
        record.receive = Some(receive);
        self.put_replication_record(&volume, record)?;
        Ok(v1::DeltaWriteResponse { applied: true })
    }

    /// `Replication.DeltaCommit`: manifests compared, then the snapshot and retention.
    pub async fn delta_commit(
        &self,
        request: v1::DeltaCommitRequest,
        caller_key: &str,
        caller: &str,
    ) -> Result<v1::DeltaCommitResponse, Status> {
        let volume = request.volume.clone();
        self.writer_entry(&volume, "receive a replication into")
            .await?;
        let _one_at_a_time = self.delta.receiving.lock().await;
        let (mut record, mut receive) = self.receiving(&volume, caller_key, caller)?;
        if request.unit_bytes == 0 || !request.unit_bytes.is_multiple_of(BLOCK as u64) {
            return Err(validate::invalid(
                "delta_commit_request.unit_bytes",
                "must be a non-zero multiple of 4096",
            ));
        }
        let size = self.size_of(&volume).await?;
        let committed = receive.snapshots.contains(&request.snapshot);
        if !committed
            && (receive.receiving != request.snapshot || receive.receiving_base != request.base)
        {
            // A delta with nothing to send (no block changed) never wrote a piece.
            let newest = receive.snapshots.last().cloned().unwrap_or_default();
            if receive.next_offset > 0 || request.base != newest {
                return Err(Status::failed_precondition(format!(
                    "volume `{volume}` on node {} is not receiving snapshot `{}` from base `{}` (it holds `{newest}`, receiving `{}`)",
                    self.node_name, request.snapshot, request.base, receive.receiving
                )));
            }
        }
        // Incremental when this process committed the base and saw the whole transfer:
        // the base's unit hashes, the units the transfer wrote read again. Otherwise
        // every unit is read.
        let unit = request.unit_bytes;
        let incremental = if committed {
            None
        } else {
            let hashes = self.delta_hashes();
            let touched = self.delta_touched();
            match (hashes.get(&volume), touched.get(&volume)) {
                (Some((base, hashes)), touched)
                    if !request.base.is_empty() && *base == request.base =>
                {
                    match touched {
                        Some(t) if t.snapshot == request.snapshot && t.complete => {
                            let units: std::collections::BTreeSet<u64> = t
                                .ranges
                                .iter()
                                .flat_map(|&(offset, length)| {
                                    offset / unit..(offset + length).div_ceil(unit)
                                })
                                .collect();
                            Some((hashes.clone(), units))
                        }
                        // A delta that changed nothing wrote nothing.
                        None if receive.next_offset == 0 => {
                            Some((hashes.clone(), Default::default()))
                        }
                        _ => None,
                    }
                }
                _ => None,
            }
        };
        let local = self.local.clone();
        let (owned_volume, owned_snapshot) = (volume.clone(), request.snapshot.clone());
        let (ours, unit_hashes) = blocking(move || {
            manifest(size, unit, |index, offset, length| {
                if let Some((hashes, units)) = &incremental
                    && !units.contains(&index)
                    && (index as usize) < hashes.len()
                {
                    return Ok(hashes[index as usize]);
                }
                let data = if committed {
                    local
                        .read_snapshot(&owned_volume, &owned_snapshot, offset, length)?
                        .0
                } else {
                    local.read(&owned_volume, offset, length)?
                };
                Ok(Sha256::digest(&data).into())
            })
        })
        .await?;
        if ours != request.manifest_sha256 {
            return Err(Status::data_loss(format!(
                "volume `{volume}` on node {} does not match snapshot `{}` of the source: manifest {} here, {} there; the transfer is repeated",
                self.node_name,
                request.snapshot,
                hex(&ours),
                hex(&request.manifest_sha256)
            )));
        }
        self.delta_hashes()
            .insert(volume.clone(), (request.snapshot.clone(), unit_hashes));
        self.delta_touched().remove(&volume);
        if !committed {
            match self.snapshot(&volume, &request.snapshot).await {
                Ok(_) => {}
                Err(status) if status.code() == tonic::Code::AlreadyExists => {}
                Err(status) => return Err(status),
            }
            receive.snapshots.push(request.snapshot.clone());
            receive.receiving.clear();
            receive.receiving_base.clear();
            receive.next_offset = 0;
            record.receive = Some(receive.clone());
            self.put_replication_record(&volume, record.clone())?;
        }
        let keep = request.keep.max(1) as usize;
        while receive.snapshots.len() > keep {
            let oldest = receive.snapshots[0].clone();
            self.delete_snapshot(&volume, &oldest).await?;
            receive.snapshots.remove(0);
            record.receive = Some(receive.clone());
            self.put_replication_record(&volume, record.clone())?;
        }
        Ok(v1::DeltaCommitResponse {
            manifest_sha256: ours,
            snapshots: receive.snapshots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn describe(pieces: &[Piece]) -> Vec<(char, u64, u64)> {
        pieces
            .iter()
            .map(|piece| match piece {
                Piece::Data(offset, data) => ('d', *offset, data.len() as u64),
                Piece::Zero(offset, length) => ('z', *offset, *length),
            })
            .collect()
    }

    #[test]
    fn only_blocks_that_differ_are_pieces_zeros_apart() {
        let b = BLOCK as u64;
        let mut old = vec![1u8; 8 * BLOCK];
        old[7 * BLOCK..].fill(0);
        let mut new = old.clone();
        new[BLOCK..3 * BLOCK].fill(2); // blocks 1-2 rewritten
        new[4 * BLOCK..5 * BLOCK].fill(0); // block 4 zeroed
        new[5 * BLOCK..6 * BLOCK].fill(0); // block 5 zeroed too: one zero run
        new[7 * BLOCK] = 9; // block 7 written over a zero block
        let mut pieces = Vec::new();
        diff_pieces(100 * b, &new, Some(&old), &mut pieces);
        assert_eq!(
            describe(&pieces),
            vec![
                ('d', 101 * b, 2 * b),
                ('z', 104 * b, 2 * b),
                ('d', 107 * b, b)
            ]
        );
        // A full copy: the zero blocks are skipped (the target starts empty).
        let mut pieces = Vec::new();
        diff_pieces(0, &new, None, &mut pieces);
        assert_eq!(
            describe(&pieces),
            vec![('d', 0, 4 * b), ('d', 6 * b, 2 * b)]
        );
        // The same bytes again: nothing.
        let mut pieces = Vec::new();
        diff_pieces(0, &old, Some(&old), &mut pieces);
        assert!(pieces.is_empty());
    }

    #[test]
    fn pieces_are_at_most_a_mebibyte() {
        let new = vec![3u8; 3 * PIECE_BYTES as usize + BLOCK];
        let mut pieces = Vec::new();
        diff_pieces(0, &new, None, &mut pieces);
        let sizes: Vec<u64> = describe(&pieces).iter().map(|p| p.2).collect();
        assert_eq!(
            sizes,
            vec![PIECE_BYTES, PIECE_BYTES, PIECE_BYTES, BLOCK as u64]
        );
    }
}
