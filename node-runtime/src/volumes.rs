//! Volumes as the agent serves them: a local copy in the volume store ([`LocalVolumes`])
//! plus, for a primary, replicas on peer nodes kept in step over the `Replication` service.
//!
//! Write path of a replicated volume (one write at a time per volume):
//! 1. push any pending write intents to the replicas (see below); if that fails the
//!    write is refused with `UNAVAILABLE` and nothing is written;
//! 2. record a write intent for the region in the node's records, durably;
//! 3. write locally and to every replica concurrently; each copy answers only when the
//!    bytes are on stable storage;
//! 4. when every copy succeeded remove the intent and acknowledge; otherwise keep the
//!    intent, mark the volume degraded and refuse the write with `UNAVAILABLE`.
//!
//! An intent therefore names every region where a replica may differ from the
//! primary: a write that failed on some copy, or one interrupted by a crash of the
//! primary. A background task (and every later write) copies those regions from the
//! primary to the replicas until they agree. Acknowledged writes are on every copy.
//!
//! Who may touch a copy (checked here, for `Replication` calls, after the signature):
//! every copy's record names the volume's copies as the controller set them up — on
//! the primary its replicas, on a replica the primary (its writer) and the replicas,
//! each with the node key the controller gave (in the signed CreateVolume, else in its
//! signed peer set). Only the primary writes a replica; only a node holding another
//! copy reads one (read repair, a returning copy catching up); a copy is created or
//! deleted only on a controller's signature, which the primary forwards
//! ([`v1::ControllerGrant`]). Anything else is `PERMISSION_DENIED` naming the caller,
//! the volume and this node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use proto::auth::{Envelope, NodeTarget, RequestSigner};
use proto::client::NodeClient;
use proto::v1::{self, Health, VolumeStatus};
use redb::Durability;
use tokio::sync::RwLock;
use tonic::Status;

mod activity;
mod clients;
mod copies;
mod epochs;
mod lock;
mod promotion;
mod protection;
pub(crate) mod sessions;
mod snapshots;

pub use snapshots::volume_result;

pub use clients::{CLIENT_FENCED, ClientView, NOT_INSTALLED, block_checksums, validate_clients};
pub use epochs::{DEFAULT_FREEZE, FREEZE_ENV};
use epochs::{EpochState, WriterState};
use promotion::Recent;

use crate::events::EventBus;
use crate::local_volumes::{self, Geometry, LocalVolumes};
use crate::records::{self, Count, Peer, Records, VolumeEpochRecord, VolumeRecord, VolumeRole};
use crate::validate;

impl VolumeRecord {
    fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: self.size_bytes,
            stripe_width: self.stripe_width,
            stripe_unit_bytes: self.stripe_unit_bytes,
        }
    }

    fn is_primary(&self) -> bool {
        self.role == VolumeRole::Primary
    }

    /// The same volume as `other` asks for (keys aside: they are fixed when a copy is
    /// made, so a retry that spells them otherwise is not a conflict).
    fn same_definition(&self, other: &VolumeRecord) -> bool {
        let names = |peers: &[Peer]| -> Vec<(String, String)> {
            peers
                .iter()
                .map(|peer| (peer.name.clone(), peer.address.clone()))
                .collect()
        };
        self.name == other.name
            && self.role == other.role
            && self.geometry() == other.geometry()
            && self.primary == other.primary
            && names(&self.replica_peers) == names(&other.replica_peers)
            && names(&self.copies) == names(&other.copies)
    }
}

/// A verified caller of a `Replication` method, as far as a volume's copies care.
#[derive(Debug, Clone)]
pub struct ReplicationCaller {
    /// Its public key, lower-case hex.
    pub key_hex: String,
    /// A controller: it may create, delete and read any copy (and writes through the
    /// primary's `Apply.WriteVolume`, never to a replica directly).
    pub controller: bool,
    /// How messages name it ("node lab-2 (key …)").
    pub description: String,
    /// The controller signature it forwarded, already checked: its envelope and the
    /// signed request, or why it does not hold.
    pub grant: Option<Result<(Envelope, v1::ApplyRequest), String>>,
}

#[derive(Debug)]
struct VolumeEntry {
    /// The record as created or loaded; its `size_bytes` is not updated by a grow (read
    /// [`VolumeEntry::size`] or [`VolumeEntry::record_now`]).
    record: VolumeRecord,
    /// The volume's size now: ResizeVolume grows it in place (under the write lock, after
    /// the volume store and the stored record grew).
    size_bytes: AtomicU64,
    /// Writes hold it shared with their byte range; everything else (settling,
    /// resynchronisation, epochs, resize, delete) whole (`lock.rs`).
    write_lock: lock::VolumeLock,
    health: std::sync::Mutex<(Health, String)>,
    applied_writes: AtomicU64,
    /// Next sequence number shipped to replicas. Always above every number ever
    /// shipped: it starts above the durable high-water mark, which is raised before
    /// a number is used.
    next_sequence: AtomicU64,
    /// The highest epoch this copy was told of (mirrors `volume_epochs`).
    epoch: std::sync::Mutex<EpochState>,
    /// Woken when a new epoch is installed (a frozen writer waits for it).
    epoch_changed: tokio::sync::Notify,
    /// The writer's view of copies that failed or caught up.
    writer_state: std::sync::Mutex<WriterState>,
    /// Bytes shipped to copies catching up.
    resync_bytes: AtomicU64,
    /// This copy's recent replica writes (see `promotion.rs`).
    recent: std::sync::Mutex<Recent>,
    /// The other copies once AddVolumeCopy or RemoveVolumeCopy changed them on this
    /// writer, and a catch-up's progress (`copies.rs`).
    copies: std::sync::Mutex<copies::CopiesState>,
}

impl VolumeEntry {
    fn new(record: VolumeRecord) -> Self {
        Self {
            size_bytes: AtomicU64::new(record.size_bytes),
            record,
            write_lock: lock::VolumeLock::default(),
            health: std::sync::Mutex::new((Health::Healthy, String::new())),
            applied_writes: AtomicU64::new(0),
            next_sequence: AtomicU64::new(1),
            epoch: std::sync::Mutex::new(EpochState::default()),
            epoch_changed: tokio::sync::Notify::new(),
            writer_state: std::sync::Mutex::new(WriterState::default()),
            resync_bytes: AtomicU64::new(0),
            recent: std::sync::Mutex::new(Recent::at_start(true)),
            copies: std::sync::Mutex::default(),
        }
    }

    fn health(&self) -> (Health, String) {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The volume's size now.
    fn size(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// The record with the size now.
    fn record_now(&self) -> VolumeRecord {
        VolumeRecord {
            size_bytes: self.size(),
            ..self.record.clone()
        }
    }
}

/// Every volume of the node.
#[derive(Debug)]
pub struct Volumes {
    node_name: String,
    own_key_hex: String,
    local: LocalVolumes,
    records: Arc<Records>,
    events: Arc<EventBus>,
    /// Delta replication to another site: its schedules and locks (`delta.rs`).
    delta: delta::State,
    signer: RequestSigner,
    peer_directory: crate::trust::PeerDirectory,
    volumes: RwLock<BTreeMap<String, Arc<VolumeEntry>>>,
    peer_clients: std::sync::Mutex<BTreeMap<String, NodeClient>>,
    /// How long a frozen write waits for the controller (see `epochs.rs`).
    freeze_bound: Duration,
    /// What the protection schedules did since the node started (`protection.rs`).
    protection_runs: std::sync::Mutex<BTreeMap<String, protection::Run>>,
    /// This process's replica session (`sessions.rs`).
    boot_id: [u8; 16],
    /// The replicas' sessions this writer learned, by peer.
    replica_boots: std::sync::Mutex<BTreeMap<String, Vec<u8>>>,
}

/// After a start: the extents a writer left hot (`activity.rs`) become pending intents
/// of their regions (at most [`validate::MAX_IO_BYTES`] each, within the volume),
/// durably, so the settle before the next write ships them to the in-sync copies.
fn activity_to_intents(
    records: &Records,
    volume: &str,
    size: u64,
) -> Result<(), records::RecordsError> {
    let hot = records.intents(&activity::hot_prefix(volume))?;
    if hot.is_empty() {
        return Ok(());
    }
    let mut keys = Vec::new();
    for index in hot.iter().filter_map(|key| activity::parse_hot_key(key)) {
        let end = index
            .saturating_add(1)
            .saturating_mul(activity::EXTENT)
            .min(size);
        let mut offset = index.saturating_mul(activity::EXTENT);
        while offset < end {
            let length = (end - offset).min(validate::MAX_IO_BYTES);
            keys.push(intent_key(volume, offset, length));
            offset += length;
        }
    }
    records.put_intents(volume, &keys, 0)?;
    for key in hot {
        records.remove_intent(&key, Durability::Immediate)?;
    }
    Ok(())
}

fn intent_key(volume: &str, offset: u64, length: u64) -> String {
    format!("{volume}/{offset:020}/{length:010}")
}

fn parse_intent_key(key: &str) -> Option<(u64, u64)> {
    let mut parts = key.rsplitn(3, '/');
    let length = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    Some((offset, length))
}

/// The counter (in the node's records) of how many times a volume of this name was
/// created here.
fn generation_counter(volume: &str) -> String {
    format!("volume-generation/{volume}")
}

fn records_status(error: records::RecordsError) -> Status {
    Status::internal(error.to_string())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, storage::StorageError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(local_volumes::status),
        Err(error) => Err(Status::internal(format!(
            "volume store task failed: {error}"
        ))),
    }
}

/// The outcome of an acknowledged write.
#[derive(Debug, Clone, Copy)]
pub struct WriteAck {
    /// Copies holding the write durably, this node included.
    pub copies: u32,
}

impl Volumes {
    /// Loads the volume records.
    pub fn open(
        node_name: &str,
        local: LocalVolumes,
        records: Arc<Records>,
        events: Arc<EventBus>,
        signer: RequestSigner,
        peer_directory: crate::trust::PeerDirectory,
    ) -> Result<Self, records::RecordsError> {
        let mut volumes = BTreeMap::new();
        for (name, record) in records.list::<VolumeRecord>()? {
            activity_to_intents(&records, &name, record.size_bytes)?;
            let entry = VolumeEntry::new(record);
            entry
                .next_sequence
                .store(records.sequence_high_water(&name)? + 1, Ordering::Relaxed);
            if let Some(epoch) = records.get::<VolumeEpochRecord>(&name)? {
                *entry.epoch.lock().unwrap_or_else(|p| p.into_inner()) =
                    EpochState::from_record(&epoch);
            }
            let writer = {
                let epoch = entry.epoch();
                if epoch.writer.is_empty() {
                    entry.record.is_primary()
                } else {
                    epoch.writer == node_name
                }
            };
            *entry.recent() = Recent::at_start(writer);
            // A promoted copy that restarted may have stopped before it reconciled
            // the in-sync copies (`promotion.rs`): it reconciles again (cheap: the
            // others' recent regions).
            entry.writer_state().reconcile_pending = writer && !entry.record.is_primary();
            volumes.insert(name, Arc::new(entry));
        }
        Ok(Self {
            delta: delta::State::default(),
            node_name: node_name.to_string(),
            own_key_hex: signer.identity().public_key_hex(),
            local,
            records,
            events,
            signer,
            peer_directory,
            volumes: RwLock::new(volumes),
            peer_clients: std::sync::Mutex::new(BTreeMap::new()),
            freeze_bound: epochs::freeze_bound(),
            protection_runs: std::sync::Mutex::new(BTreeMap::new()),
            boot_id: sessions::boot_id(),
            replica_boots: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// A client for a peer that signs every call for that peer: for its recorded key
    /// (or the one in the peer set), else for the name, learning the key from the node.
    fn peer_client(&self, peer: &Peer) -> Result<NodeClient, Status> {
        let key = self.key_of(&peer.name, &peer.public_key_hex);
        let cache_key = format!(
            "{} {} {}",
            peer.name,
            peer.address,
            key.as_deref().unwrap_or("")
        );
        let mut clients = self.peer_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&cache_key) {
            return Ok(client.clone());
        }
        let client = NodeClient::connect_lazy(&peer.address, self.signer.clone())
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let client = match key.map(|key| NodeTarget::new(&peer.name, &key)) {
            Some(Ok(target)) => client.with_target(target),
            Some(Err(error)) => {
                return Err(Status::invalid_argument(format!(
                    "peer {}: {error}",
                    peer.name
                )));
            }
            None => client.for_node(&peer.name),
        };
        clients.insert(cache_key, client.clone());
        Ok(client)
    }

    /// The key of the node `name`: the one recorded with it, else the one the
    /// controller pushed in the peer set; `None` when neither names one.
    fn key_of(&self, name: &str, recorded: &str) -> Option<String> {
        if !recorded.is_empty() {
            return Some(recorded.to_ascii_lowercase());
        }
        self.peer_directory
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .find(|peer| peer.name == name && !peer.public_key_hex.is_empty())
            .map(|peer| peer.public_key_hex.to_ascii_lowercase())
    }

    /// The nodes holding the other copies of a volume, as this copy's record names
    /// them, or as AddVolumeCopy and RemoveVolumeCopy changed them (keys may be empty:
    /// see [`Volumes::key_of`]).
    fn other_copies(&self, entry: &VolumeEntry) -> Vec<Peer> {
        let mut copies = entry
            .changed_copies()
            .unwrap_or_else(|| self.recorded_copies(&entry.record));
        let directory = self
            .peer_directory
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for copy in copies.iter_mut().filter(|copy| copy.address.is_empty()) {
            if let Some(known) = directory.iter().find(|peer| peer.name == copy.name) {
                copy.address = known.address.clone();
            }
        }
        copies
    }

    fn recorded_copies(&self, record: &VolumeRecord) -> Vec<Peer> {
        if record.is_primary() {
            return record.replica_peers.clone();
        }
        let primary = Peer {
            name: record.primary.clone(),
            address: String::new(),
            public_key_hex: record.primary_key_hex.clone(),
        };
        std::iter::once(primary)
            .chain(
                record
                    .copies
                    .iter()
                    .filter(|copy| copy.name != self.node_name)
                    .cloned(),
            )
            .collect()
    }

    fn denied(&self, caller: &ReplicationCaller, verb: &str, volume: &str, why: &str) -> Status {
        Status::permission_denied(format!(
            "{} may not {verb} volume `{volume}` on node {}: {why}",
            caller.description, self.node_name
        ))
    }

    /// A `ReplicaWrite` is allowed only from the volume's writer: the primary recorded
    /// in this replica's record.
    pub async fn authorize_write(
        &self,
        volume: &str,
        caller: &ReplicationCaller,
    ) -> Result<(), Status> {
        let Some(entry) = self.volumes.read().await.get(volume).cloned() else {
            return Err(self.denied(caller, "write", volume, "this node holds no copy of it"));
        };
        let record = &entry.record;
        if caller.controller {
            return Err(self.denied(
                caller,
                "write",
                volume,
                "only the volume's primary writes its replicas; controllers write through Apply.WriteVolume on the primary",
            ));
        }
        if self.is_writer(&entry) {
            return Err(self.denied(
                caller,
                "write",
                volume,
                &format!(
                    "this node is the volume's writer at {}, which only it writes",
                    entry.epoch().describe()
                ),
            ));
        }
        // The epoch's writer (the primary unless the controller named another).
        let writer = self.writer_name(&entry);
        let recorded = if writer == record.primary {
            record.primary_key_hex.as_str()
        } else {
            ""
        };
        match self.key_of(&writer, recorded) {
            Some(key) if key == caller.key_hex => Ok(()),
            Some(_) => Err(self.denied(
                caller,
                "write",
                volume,
                &format!("only its writer, node {writer}, writes its copies"),
            )),
            None => Err(self.denied(
                caller,
                "write",
                volume,
                &format!(
                    "only its writer, node {writer}, writes its copies, and this node does not know that node's key (push it with SetPeers)"
                ),
            )),
        }
    }

    /// A `ReplicaRead` is allowed to a controller and to the nodes holding the
    /// volume's other copies.
    pub async fn authorize_read(
        &self,
        volume: &str,
        caller: &ReplicationCaller,
    ) -> Result<(), Status> {
        if caller.controller {
            return Ok(());
        }
        let Some(entry) = self.volumes.read().await.get(volume).cloned() else {
            return Err(self.denied(caller, "read", volume, "this node holds no copy of it"));
        };
        let copies = self.other_copies(&entry);
        if copies.iter().any(|copy| {
            self.key_of(&copy.name, &copy.public_key_hex).as_deref() == Some(&caller.key_hex)
        }) {
            return Ok(());
        }
        let names: Vec<&str> = copies.iter().map(|copy| copy.name.as_str()).collect();
        Err(self.denied(
            caller,
            "read",
            volume,
            &format!(
                "only nodes holding a copy of it read it (the other copies are on {})",
                if names.is_empty() {
                    "no other node".to_string()
                } else {
                    names.join(", ")
                }
            ),
        ))
    }

    /// The checked grant of a peer caller, or the refusal naming what is missing.
    fn grant_of<'c>(
        &self,
        caller: &'c ReplicationCaller,
        verb: &str,
        volume: &str,
        needed: &str,
    ) -> Result<(&'c Envelope, &'c v1::ApplyRequest), Status> {
        match &caller.grant {
            None => Err(self.denied(
                caller,
                verb,
                volume,
                &format!("that needs the controller's signed {needed}, forwarded by the volume's primary, and none came with the call"),
            )),
            Some(Err(problem)) => Err(self.denied(
                caller,
                verb,
                volume,
                &format!("the forwarded controller signature does not hold: {problem}"),
            )),
            Some(Ok((envelope, request))) => {
                if envelope.target.public_key_hex != caller.key_hex {
                    return Err(self.denied(
                        caller,
                        verb,
                        volume,
                        &format!(
                            "the forwarded {needed} was signed for node {}, not for the caller",
                            envelope.target
                        ),
                    ));
                }
                Ok((envelope, request))
            }
        }
    }

    async fn entry(&self, name: &str) -> Result<Arc<VolumeEntry>, Status> {
        self.volumes.read().await.get(name).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "volume `{name}` does not exist on node {}",
                self.node_name
            ))
        })
    }

    /// Records a volume that now exists on this node and counts its creation (in the
    /// same transaction, and only when no record of that name was there: a retried
    /// create that finds its own record counts nothing).
    fn record_created(&self, record: &VolumeRecord) -> Result<u64, Status> {
        self.records
            .put_counted(
                &record.name,
                record,
                &generation_counter(&record.name),
                Count::IfNew,
            )
            .map_err(records_status)
    }

    /// Size of a volume, for request validation.
    pub async fn size_of(&self, name: &str) -> Result<u64, Status> {
        Ok(self.entry(name).await?.size())
    }

    fn set_health(&self, entry: &VolumeEntry, health: Health, detail: String) {
        let mut current = entry.health.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != health || current.1 != detail {
            *current = (health, detail.clone());
            self.events
                .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                    name: entry.record.name.clone(),
                    health: health as i32,
                    detail,
                    deleted: false,
                }));
        }
    }

    /// Creates a primary volume and its replicas (idempotent). `grant` is the
    /// controller's signed request, which each replica's node checks.
    pub async fn create_primary(
        &self,
        request: &v1::CreateVolume,
        replica_peers: Vec<v1::Peer>,
        grant: v1::ControllerGrant,
    ) -> Result<VolumeRecord, Status> {
        let record = VolumeRecord {
            version: VolumeRecord::VERSION,
            name: request.name.clone(),
            role: VolumeRole::Primary,
            size_bytes: request.size_bytes,
            stripe_width: request.stripe_width,
            stripe_unit_bytes: request.stripe_unit_bytes,
            replica_peers: replica_peers.iter().map(records::peer).collect(),
            primary: String::new(),
            primary_key_hex: String::new(),
            copies: Vec::new(),
        };
        if let Some(existing) = self.volumes.read().await.get(&request.name) {
            if existing.record_now().same_definition(&record) {
                return Ok(existing.record_now());
            }
            return Err(Status::already_exists(format!(
                "volume `{}` already exists on node {} with another definition (role {:?}, {} bytes, width {}, unit {}, peers {:?}); delete it first",
                request.name,
                self.node_name,
                existing.record.role,
                existing.size(),
                existing.record.stripe_width,
                existing.record.stripe_unit_bytes,
                existing
                    .record
                    .replica_peers
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>(),
            )));
        }
        let local = self.local.clone();
        let name = record.name.clone();
        let geometry = record.geometry();
        blocking(move || local.create(&name, geometry)).await?;
        // Replicas first exist everywhere, then the record makes the volume visible:
        // a crash in between leaves nothing a retry of the same request cannot finish.
        let ensure = record.replica_peers.iter().map(|peer| {
            let record = &record;
            let grant = grant.clone();
            async move {
                let mut client = self.peer_client(peer)?;
                client
                    .ensure_replica(v1::EnsureReplicaRequest {
                        volume: record.name.clone(),
                        primary: self.node_name.clone(),
                        size_bytes: record.size_bytes,
                        stripe_width: record.stripe_width,
                        stripe_unit_bytes: record.stripe_unit_bytes,
                        grant: Some(grant),
                        copies: Vec::new(),
                    })
                    .await
                    .map_err(|status| peer_failure(peer, "create the replica", &status))
            }
        });
        for result in join_all(ensure).await {
            result?;
        }
        self.record_created(&record)?;
        self.volumes.write().await.insert(
            record.name.clone(),
            Arc::new(VolumeEntry::new(record.clone())),
        );
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: record.name.clone(),
                health: Health::Healthy as i32,
                detail: "created".into(),
                deleted: false,
            }));
        Ok(record)
    }

    /// The record of a replica `caller` may create: any a controller asks for; for a
    /// peer, the one the controller's forwarded CreateVolume describes, which must make
    /// the caller the primary and name this node as a replica.
    fn replica_record(
        &self,
        request: &v1::EnsureReplicaRequest,
        caller: &ReplicationCaller,
    ) -> Result<VolumeRecord, Status> {
        let mut record = VolumeRecord {
            version: VolumeRecord::VERSION,
            name: request.volume.clone(),
            role: VolumeRole::Replica,
            size_bytes: request.size_bytes,
            stripe_width: request.stripe_width,
            stripe_unit_bytes: request.stripe_unit_bytes,
            replica_peers: Vec::new(),
            primary: request.primary.clone(),
            primary_key_hex: String::new(),
            copies: Vec::new(),
        };
        if caller.controller {
            return Ok(record);
        }
        let volume = &request.volume;
        let (envelope, signed) = self.grant_of(caller, "create", volume, "CreateVolume")?;
        if let Some(v1::apply_request::Action::AddVolumeCopy(add)) = &signed.action {
            return self.added_copy_record(record, request, caller, envelope, add);
        }
        let Some(v1::apply_request::Action::CreateVolume(create)) = &signed.action else {
            return Err(self.denied(
                caller,
                "create",
                volume,
                "the forwarded controller request is not a CreateVolume",
            ));
        };
        let refuse = |why: String| Err(self.denied(caller, "create", volume, &why));
        if create.name != *volume {
            return refuse(format!(
                "the controller's CreateVolume is for volume `{}`",
                create.name
            ));
        }
        if envelope.target.name != request.primary {
            return refuse(format!(
                "the controller made node {} the primary, not `{}`",
                envelope.target, request.primary
            ));
        }
        if (
            create.size_bytes,
            create.stripe_width,
            create.stripe_unit_bytes,
        ) != (
            request.size_bytes,
            request.stripe_width,
            request.stripe_unit_bytes,
        ) {
            return refuse(
                "its size or striping differs from the controller's CreateVolume".to_string(),
            );
        }
        let named_here = create.replica_peers.iter().any(|peer| {
            peer.name == self.node_name
                && (peer.public_key_hex.is_empty()
                    || peer.public_key_hex.eq_ignore_ascii_case(&self.own_key_hex))
        });
        if !named_here {
            return refuse(format!(
                "the controller's CreateVolume does not name node {} (this key) as a replica",
                self.node_name
            ));
        }
        record.primary_key_hex = envelope.target.public_key_hex.clone();
        record.copies = create
            .replica_peers
            .iter()
            .map(|peer| Peer {
                name: peer.name.clone(),
                address: String::new(),
                public_key_hex: peer.public_key_hex.to_ascii_lowercase(),
            })
            .collect();
        Ok(record)
    }

    /// Creates (or confirms) a replica on this node, if `caller` may.
    pub async fn ensure_replica(
        &self,
        request: &v1::EnsureReplicaRequest,
        caller: &ReplicationCaller,
    ) -> Result<v1::EnsureReplicaResponse, Status> {
        let record = self.replica_record(request, caller)?;
        if let Some(existing) = self.volumes.read().await.get(&request.volume) {
            if existing.record_now().same_definition(&record) {
                return Ok(v1::EnsureReplicaResponse {
                    created: false,
                    applied_writes: existing.applied_writes.load(Ordering::Relaxed),
                });
            }
            return Err(Status::already_exists(format!(
                "volume `{}` already exists on node {} with another definition; cannot hold it as a replica of {}",
                request.volume, self.node_name, request.primary
            )));
        }
        let local = self.local.clone();
        let name = record.name.clone();
        let geometry = record.geometry();
        blocking(move || local.create(&name, geometry)).await?;
        self.record_created(&record)?;
        self.volumes
            .write()
            .await
            .insert(record.name.clone(), Arc::new(VolumeEntry::new(record)));
        Ok(v1::EnsureReplicaResponse {
            created: true,
            applied_writes: 0,
        })
    }

    /// Deletes a volume (and, for a primary, its replicas, forwarding the controller's
    /// signed request `grant` to them). Missing is fine.
    pub async fn delete(&self, name: &str, grant: v1::ControllerGrant) -> Result<(), Status> {
        let Some(entry) = self.volumes.read().await.get(name).cloned() else {
            // A create that failed half-way (a replica was unreachable) may have left
            // the volume store's volume without a record; deleting removes it too.
            let local = self.local.clone();
            let owned = name.to_string();
            return blocking(move || local.delete(&owned)).await;
        };
        let _guard = entry.write_lock.lock().await;
        if entry.record.is_primary() {
            for peer in &entry.record.replica_peers {
                let mut client = self.peer_client(peer)?;
                client
                    .delete_replica(v1::DeleteReplicaRequest {
                        volume: name.to_string(),
                        grant: Some(grant.clone()),
                    })
                    .await
                    .map_err(|status| peer_failure(peer, "delete the replica", &status))?;
            }
        }
        self.remove_local(name).await
    }

    /// Deletes a replica at the request of `caller`: a controller, or the volume's
    /// primary forwarding the controller's signed DeleteVolume. Missing is fine.
    pub async fn delete_replica(
        &self,
        volume: &str,
        caller: &ReplicationCaller,
    ) -> Result<(), Status> {
        let existing = self.volumes.read().await.get(volume).cloned();
        if !caller.controller {
            let (_, signed) = self.grant_of(caller, "delete", volume, "DeleteVolume")?;
            // The writer forwarding the controller's RemoveVolumeCopy of this copy.
            let removal = Self::removal_granted(signed, volume, &self.node_name);
            match &signed.action {
                Some(v1::apply_request::Action::DeleteVolume(delete)) if delete.name == volume => {}
                _ if removal => {}
                _ => {
                    return Err(self.denied(
                        caller,
                        "delete",
                        volume,
                        "the forwarded controller request is not a DeleteVolume of this volume",
                    ));
                }
            }
            if let Some(entry) = &existing
                && !removal
                && !entry.record.is_primary()
                && self
                    .key_of(&entry.record.primary, &entry.record.primary_key_hex)
                    .as_deref()
                    != Some(&caller.key_hex)
            {
                return Err(self.denied(
                    caller,
                    "delete",
                    volume,
                    &format!(
                        "only its primary, node {}, drops its replicas",
                        entry.record.primary
                    ),
                ));
            }
        }
        if existing.is_some_and(|entry| entry.record.is_primary()) {
            return Err(Status::failed_precondition(format!(
                "volume `{volume}` is a primary on node {}, not a replica; refusing to delete it",
                self.node_name
            )));
        }
        self.remove_local(volume).await
    }

    /// Grows a primary volume in place to `size_bytes`, keeping its data: every replica
    /// first (`Replication.ResizeReplica`, forwarding the controller's signed request
    /// `grant`, as CreateVolume and DeleteVolume do), then the local copy in the volume store
    /// (durable), then the record, and only then may writes reach past the old end. Runs
    /// under the volume's write lock. A failure leaves the primary as it was (some
    /// replicas may be bigger already, which nothing sees); a retry finishes the grow.
    /// The same size changes nothing; a smaller one is `FAILED_PRECONDITION`.
    pub async fn resize(
        &self,
        name: &str,
        size_bytes: u64,
        grant: v1::ControllerGrant,
    ) -> Result<VolumeRecord, Status> {
        let entry = self.entry(name).await?;
        if !entry.record.is_primary() {
            return Err(Status::failed_precondition(format!(
                "volume `{name}` on node {} is a replica of node {}; resize it on its primary",
                self.node_name, entry.record.primary
            )));
        }
        let _guard = entry.write_lock.lock().await;
        let current = entry.size();
        self.refuse_shrink(name, current, size_bytes)?;
        if size_bytes == current {
            return Ok(entry.record_now());
        }
        let grows = entry.record.replica_peers.iter().map(|peer| {
            let grant = grant.clone();
            async move {
                let mut client = self.peer_client(peer)?;
                client
                    .resize_replica(v1::ResizeReplicaRequest {
                        volume: name.to_string(),
                        size_bytes,
                        grant: Some(grant),
                    })
                    .await
                    .map_err(|status| peer_failure(peer, "grow the replica", &status))
            }
        });
        for result in join_all(grows).await {
            result?;
        }
        self.grow_local(&entry, size_bytes).await?;
        Ok(entry.record_now())
    }

    /// Grows a replica at the request of `caller`: a controller, or the volume's primary
    /// forwarding the controller's signed ResizeVolume of this volume to this size.
    pub async fn resize_replica(
        &self,
        volume: &str,
        size_bytes: u64,
        caller: &ReplicationCaller,
    ) -> Result<v1::ResizeReplicaResponse, Status> {
        let entry = self.entry(volume).await?;
        if !caller.controller {
            let (_, signed) = self.grant_of(caller, "grow", volume, "ResizeVolume")?;
            match &signed.action {
                Some(v1::apply_request::Action::ResizeVolume(resize))
                    if resize.name == volume && resize.size_bytes == size_bytes => {}
                _ => {
                    return Err(self.denied(
                        caller,
                        "grow",
                        volume,
                        "the forwarded controller request is not a ResizeVolume of this volume to this size",
                    ));
                }
            }
            if !entry.record.is_primary()
                && self
                    .key_of(&entry.record.primary, &entry.record.primary_key_hex)
                    .as_deref()
                    != Some(&caller.key_hex)
            {
                return Err(self.denied(
                    caller,
                    "grow",
                    volume,
                    &format!(
                        "only its primary, node {}, grows its replicas",
                        entry.record.primary
                    ),
                ));
            }
        }
        if entry.record.is_primary() {
            return Err(Status::failed_precondition(format!(
                "volume `{volume}` is a primary on node {}, not a replica; grow it with ResizeVolume",
                self.node_name
            )));
        }
        let _guard = entry.write_lock.lock().await;
        let current = entry.size();
        self.refuse_shrink(volume, current, size_bytes)?;
        if size_bytes > current {
            self.grow_local(&entry, size_bytes).await?;
        }
        Ok(v1::ResizeReplicaResponse {
            size_bytes: entry.size(),
        })
    }

    fn refuse_shrink(&self, volume: &str, current: u64, size_bytes: u64) -> Result<(), Status> {
        if size_bytes < current {
            return Err(Status::failed_precondition(format!(
                "shrinking volume {volume} from {current} to {size_bytes} would lose data (sizes in bytes, node {}); volumes only grow",
                self.node_name
            )));
        }
        Ok(())
    }

    /// Grows this node's copy: the volume store (durable), then the stored record, then the
    /// size requests are checked against. Caller holds the volume's write lock.
    async fn grow_local(&self, entry: &VolumeEntry, size_bytes: u64) -> Result<(), Status> {
        let local = self.local.clone();
        let name = entry.record.name.clone();
        blocking(move || local.grow(&name, size_bytes)).await?;
        let record = VolumeRecord {
            size_bytes,
            ..entry.record.clone()
        };
        self.records
            .put(&record.name, &record)
            .map_err(records_status)?;
        entry.size_bytes.store(size_bytes, Ordering::Release);
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: record.name.clone(),
                health: entry.health().0 as i32,
                detail: format!("grown to {size_bytes} bytes"),
                deleted: false,
            }));
        Ok(())
    }

    /// Deletes the local copy only (a replica being dropped by its primary).
    pub async fn remove_local(&self, name: &str) -> Result<(), Status> {
        let local = self.local.clone();
        let owned = name.to_string();
        blocking(move || local.delete(&owned)).await?;
        for key in self
            .records
            .intents(&format!("{name}/"))
            .map_err(records_status)?
        {
            self.records
                .remove_intent(&key, Durability::Immediate)
                .map_err(records_status)?;
        }
        for key in self
            .records
            .intents(&format!("{name}@"))
            .map_err(records_status)?
            .into_iter()
            .chain(
                self.records
                    .intents(&activity::hot_prefix(name))
                    .map_err(records_status)?,
            )
        {
            self.records
                .remove_intent(&key, Durability::Immediate)
                .map_err(records_status)?;
        }
        self.records
            .remove_intent(name, Durability::Immediate)
            .map_err(records_status)?;
        self.records
            .remove::<VolumeEpochRecord>(name)
            .map_err(records_status)?;
        self.forget_snapshots(name)?;
        self.records
            .remove::<VolumeRecord>(name)
            .map_err(records_status)?;
        self.volumes.write().await.remove(name);
        self.events
            .publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                name: name.to_string(),
                health: Health::Unspecified as i32,
                detail: "deleted".into(),
                deleted: true,
            }));
        Ok(())
    }

    /// Writes to a primary volume, replicated; acknowledged only when every copy of the
    /// in-sync set holds it durably (see `epochs.rs` for the frozen writer).
    pub async fn write(&self, name: &str, offset: u64, data: Vec<u8>) -> Result<WriteAck, Status> {
        self.write_as(name, offset, data, false).await
    }

    /// [`Volumes::write`] called from a thread outside the runtime, which may block: an
    /// NBD connection's worker (a VM's disk, an export). A volume without other copies
    /// is written by that thread itself, so a guest's write goes from the socket to the
    /// store without a hand-off to the blocking pool and back (the 1-copy qd1 gap,
    /// ARCHITECTURE "Benchmarks"); with replicas the local copy is written on the
    /// blocking pool while the replicas are shipped, exactly as [`Volumes::write`] does.
    ///
    /// Must not be called from a runtime thread (`Handle::block_on` panics there).
    pub fn write_from_thread(
        &self,
        runtime: &tokio::runtime::Handle,
        name: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<WriteAck, Status> {
        runtime.block_on(self.write_as(name, offset, data, true))
    }

    /// [`Volumes::write`]; `on_own_thread`: the caller is a thread outside the runtime
    /// ([`Volumes::write_from_thread`]), which writes a single copy itself.
    async fn write_as(
        &self,
        name: &str,
        offset: u64,
        data: Vec<u8>,
        on_own_thread: bool,
    ) -> Result<WriteAck, Status> {
        let entry = self.entry(name).await?;
        self.check_writer(&entry)?;
        if !self.is_writer(&entry) {
            return Err(Status::failed_precondition(format!(
                "volume `{name}` on node {} is a replica of node {}; write to the primary",
                self.node_name,
                self.writer_name(&entry)
            )));
        }
        validate::io_range("write_volume", offset, data.len() as u64, entry.size())?;
        // Writes run side by side, overlapping ones in turn (`lock.rs`).
        let length = data.len() as u64;
        let mut range = entry.write_lock.range(offset, length).await;
        self.check_writer(&entry)?;
        if self.other_copies(&entry).is_empty() {
            if on_own_thread {
                // Still under the range lock: whatever takes the volume's lock whole
                // (a copy added, a snapshot, a resize) waits for this write.
                self.local
                    .write(name, offset, &data)
                    .map_err(local_volumes::status)?;
            } else {
                let local = self.local.clone();
                let owned = name.to_string();
                blocking(move || local.write(&owned, offset, &data)).await?;
            }
            drop(range);
            return Ok(WriteAck { copies: 1 });
        }
        let deadline = std::time::Instant::now() + self.freeze_bound;
        if self.needs_settle(&entry)? {
            drop(range);
            {
                let _whole = entry.write_lock.lock().await;
                self.check_writer(&entry)?;
                self.settle_locked(&entry, deadline).await?;
                self.settle_snapshots_locked(&entry, deadline).await?;
            }
            range = entry.write_lock.range(offset, length).await;
        }
        let key = intent_key(name, offset, length);
        // The sequence number is the agent's, not the volume store's, so the local write and
        // the replica writes can run at the same time. A durable high-water mark covers
        // it before it is used (reserved ahead, `activity.rs`), so no number is ever
        // shipped twice, even across a crash of the primary; and the write's extent is
        // hot, so a crash leaves its region to be settled.
        let sequence = self.take_sequence(&entry);
        let in_flight = entry.write_lock.begin_intent(&key);
        let intent = self
            .record_intent(&entry, key.clone(), offset, length, sequence)
            .await?;
        let (epoch, in_sync, catching, outside) = self.targets(&entry);
        // Every copy outside the in-sync set misses this write until it catches up.
        for peer in &outside {
            self.mark_dirty(&entry, &peer.name, offset, data.len() as u64)?;
        }
        let checksums: Vec<u32> = data
            .chunks(storage::BLOCK_SIZE as usize)
            .map(crc32c::crc32c)
            .collect();
        let data = Arc::new(data);
        let local_write = {
            let local = self.local.clone();
            let owned = name.to_string();
            let data = data.clone();
            blocking(move || local.write(&owned, offset, &data))
        };
        let ship_all = |peers: Vec<Peer>| {
            let data = data.clone();
            let checksums = checksums.clone();
            join_all(peers.into_iter().map(move |peer| {
                let data = data.clone();
                let checksums = checksums.clone();
                async move {
                    let result = self
                        .ship(
                            &peer,
                            name,
                            offset,
                            data,
                            checksums,
                            sequence,
                            epoch,
                            "write the replica",
                            epochs::remaining(deadline),
                        )
                        .await;
                    (peer, result)
                }
            }))
        };
        let (local_result, in_sync_results, catching_results) =
            tokio::join!(local_write, ship_all(in_sync), ship_all(catching));
        if let Err(status) = local_result {
            // The replicas may hold it: the region stays pending.
            intent.keep()?;
            let detail = format!(
                "write at offset {offset} failed on the local copy: {}",
                status.message()
            );
            self.set_health(&entry, Health::Degraded, detail);
            return Err(Status::unavailable(format!(
                "write to volume `{name}` was not acknowledged: local copy: {}",
                status.message()
            )));
        }
        let mut copies = 1;
        for (peer, result) in catching_results {
            match result {
                Ok(()) => {
                    copies += 1;
                    self.records
                        .remove_intent(
                            &epochs::dirty_key(name, &peer.name, offset, data.len() as u64),
                            Durability::None,
                        )
                        .map_err(records_status)?;
                }
                Err(_) => {
                    entry.writer_state().caught_up.remove(&peer.name);
                }
            }
        }
        let failures: Vec<Status> = in_sync_results
            .into_iter()
            .filter_map(|(_, result)| result.err())
            .collect();
        if failures.is_empty() {
            intent.done();
            drop(in_flight);
            drop(range);
        } else {
            intent.keep()?;
            // Frozen until the failed copies answer or leave the in-sync set: its
            // intent is pending now, settled with the volume's lock whole (after the
            // writes beside it, and before any that comes next).
            drop(in_flight);
            drop(range);
            let _whole = entry.write_lock.lock().await;
            self.settle_locked(&entry, deadline).await?;
        }
        let (_, in_sync_now, _, _) = self.targets(&entry);
        copies += in_sync_now.len() as u32;
        let (health, detail) = self.epoch_health(&entry, &entry.epoch());
        self.set_health(&entry, health, detail);
        Ok(WriteAck { copies })
    }

    /// One pass of background work over every primary with replicas: pending write
    /// intents are brought onto the in-sync copies (one attempt, no freeze), and copies
    /// outside the in-sync set catch up.
    pub async fn resync_all(&self) {
        let entries: Vec<Arc<VolumeEntry>> = self
            .volumes
            .read()
            .await
            .values()
            .filter(|entry| self.is_writer(entry) && !self.other_copies(entry).is_empty())
            .cloned()
            .collect();
        for entry in entries {
            let pending = entry.writer_state().reconcile_pending
                || self
                    .records
                    .intents(&format!("{}/", entry.record.name))
                    .map(|intents| intents.iter().any(|key| !entry.write_lock.in_flight(key)))
                    .unwrap_or(false);
            if pending {
                let _guard = entry.write_lock.lock().await;
                if self
                    .settle_locked(&entry, std::time::Instant::now())
                    .await
                    .is_ok()
                {
                    let (health, detail) = self.epoch_health(&entry, &entry.epoch());
                    self.set_health(&entry, health, detail);
                }
            }
            self.catch_up_all(&entry).await;
            self.cool(&entry).await;
        }
    }

    /// Runs [`Volumes::resync_all`] every `interval` forever.
    pub async fn resync_loop(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            self.resync_all().await;
        }
    }

    /// Writes to a replica (called by its writer, under the copy's current epoch).
    pub async fn replica_write(
        &self,
        request: v1::ReplicaWriteRequest,
        caller: &ReplicationCaller,
    ) -> Result<(), Status> {
        let entry = self.entry(&request.volume).await?;
        if self.is_writer(&entry) {
            return Err(Status::failed_precondition(format!(
                "volume `{}` on node {} is written by this node at {}; refusing a replica write",
                request.volume,
                self.node_name,
                entry.epoch().describe()
            )));
        }
        validate::io_range(
            "replica_write",
            request.offset,
            request.data.len() as u64,
            entry.size(),
        )?;
        if !request.resync && request.sequence == 0 {
            return Err(crate::validate::invalid(
                "replica_write.sequence",
                "must be at least 1 unless `resync` is set",
            ));
        }
        // Serialised with read repair of this replica, which must not overwrite a
        // newer write with the bytes it fetched before it.
        let _guard = entry.write_lock.lock().await;
        self.check_replica_epoch(&entry, request.epoch, caller)?;
        let local = self.local.clone();
        let v1::ReplicaWriteRequest {
            volume,
            offset,
            data,
            sequence,
            checksums,
            resync,
            epoch: _,
            replica_boot: _,
        } = request;
        let length = data.len() as u64;
        if resync {
            blocking(move || local.resync(&volume, offset, data, checksums)).await?;
        } else {
            // Writes in flight at once arrive in any order (`lock.rs`).
            match entry.write_lock.arrival(sequence, offset, length) {
                lock::Arrival::Seen | lock::Arrival::Stale => return Ok(()),
                lock::Arrival::New => {}
            }
            blocking(move || local.apply_replica(&volume, sequence, offset, data, checksums))
                .await?;
            entry.write_lock.applied(sequence, offset, length);
        }
        entry.applied_writes.fetch_add(1, Ordering::Relaxed);
        entry.recent().push(offset, length);
        Ok(())
    }

    /// Reads from the local copy (primary or replica).
    pub async fn read(
        &self,
        name: &str,
        offset: u64,
        length: u64,
        field: &str,
    ) -> Result<Vec<u8>, Status> {
        let entry = self.entry(name).await?;
        validate::io_range(field, offset, length, entry.size())?;
        self.check_readable(&entry)?;
        let local = self.local.clone();
        let owned = name.to_string();
        match blocking(move || local.read(&owned, offset, length)).await {
            Err(status) if status.code() == tonic::Code::DataLoss && entry.record.is_primary() => {
                self.repair_from_replicas(&entry, offset, length, status)
                    .await
            }
            Err(status) if status.code() == tonic::Code::DataLoss => {
                self.repair_from_primary(&entry, offset, length, status)
                    .await
            }
            other => other,
        }
    }

    /// Reads a range with its checksums (for a replica answering its primary).
    pub async fn read_with_checksums(
        &self,
        name: &str,
        offset: u64,
        length: u64,
        field: &str,
    ) -> Result<(Vec<u8>, Vec<u32>), Status> {
        let entry = self.entry(name).await?;
        validate::io_range(field, offset, length, entry.size())?;
        self.check_readable(&entry)?;
        let local = self.local.clone();
        let owned = name.to_string();
        blocking(move || local.read_with_checksums(&owned, offset, length)).await
    }

    /// A block of a replica failed its checksum: its primary (found by name in the
    /// pushed peer set) holds the good copy.
    async fn repair_from_primary(
        &self,
        entry: &VolumeEntry,
        offset: u64,
        length: u64,
        original: Status,
    ) -> Result<Vec<u8>, Status> {
        let primary = self
            .peer_directory
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .find(|peer| peer.name == entry.record.primary)
            .cloned()
            .map(|peer| Peer {
                // The key the controller's create named wins over the peer set's.
                public_key_hex: self
                    .key_of(&peer.name, &entry.record.primary_key_hex)
                    .unwrap_or_default(),
                ..records::peer(&peer)
            });
        let Some(primary) = primary else {
            return Err(Status::data_loss(format!(
                "{}; the primary {} is not in this node's peer set, so the block cannot be repaired",
                original.message(),
                entry.record.primary
            )));
        };
        self.repair(entry, offset, length, &[primary], "primary")
            .await
    }

    /// A block of the primary failed its checksum: its replicas hold good copies.
    async fn repair_from_replicas(
        &self,
        entry: &VolumeEntry,
        offset: u64,
        length: u64,
        original: Status,
    ) -> Result<Vec<u8>, Status> {
        if entry.record.replica_peers.is_empty() {
            return Err(original);
        }
        self.repair(
            entry,
            offset,
            length,
            &entry.record.replica_peers,
            "replica",
        )
        .await
    }

    /// Reads `offset..offset+length` block by block; every block that fails its
    /// checksum is fetched from the first of `sources` that has a good copy (checked
    /// end to end by crc32c) and written over the bad one. Writes to this copy wait
    /// meanwhile, so a fetched block is never older than the local one.
    async fn repair(
        &self,
        entry: &VolumeEntry,
        offset: u64,
        length: u64,
        sources: &[Peer],
        source_role: &str,
    ) -> Result<Vec<u8>, Status> {
        let name = &entry.record.name;
        let block = storage::BLOCK_SIZE;
        let _guard = entry.write_lock.lock().await;
        let mut out = Vec::with_capacity(length as usize);
        let mut block_offset = offset;
        while block_offset < offset + length {
            let local = self.local.clone();
            let owned = name.clone();
            let local = blocking(move || local.read(&owned, block_offset, block)).await;
            match local {
                Ok(data) => out.extend(data),
                Err(status) if status.code() == tonic::Code::DataLoss => {
                    let data = self
                        .repair_block(name, block_offset, sources, source_role, status)
                        .await?;
                    out.extend(data);
                }
                Err(status) => return Err(status),
            }
            block_offset += block;
        }
        Ok(out)
    }

    async fn repair_block(
        &self,
        name: &str,
        offset: u64,
        sources: &[Peer],
        source_role: &str,
        original: Status,
    ) -> Result<Vec<u8>, Status> {
        let mut failures = vec![original.message().to_string()];
        for peer in sources {
            let mut client = self.peer_client(peer)?;
            let response = match client
                .replica_read(v1::ReplicaReadRequest {
                    volume: name.to_string(),
                    offset,
                    length: storage::BLOCK_SIZE,
                })
                .await
            {
                Ok(response) => response,
                Err(status) => {
                    failures.push(
                        peer_failure(peer, "read its copy", &status)
                            .message()
                            .to_string(),
                    );
                    continue;
                }
            };
            let local = self.local.clone();
            let owned = name.to_string();
            let data = response.data.clone();
            match blocking(move || local.overwrite(&owned, offset, data, response.checksums)).await
            {
                Ok(()) => {
                    self.events.publish(v1::watch_event::Event::Volume(v1::VolumeEvent {
                        name: name.to_string(),
                        health: Health::Healthy as i32,
                        detail: format!(
                            "repaired the block at offset {offset} from the {source_role} on {}",
                            peer.name
                        ),
                        deleted: false,
                    }));
                    return Ok(response.data);
                }
                Err(status) => failures.push(format!(
                    "copy from {} did not verify: {}",
                    peer.name,
                    status.message()
                )),
            }
        }
        Err(Status::data_loss(format!(
            "volume `{name}` has a bad block at offset {offset} that no {source_role} could repair: {}",
            failures.join("; ")
        )))
    }

    /// The status of every volume, in name order.
    pub async fn statuses(&self, export_uri: impl Fn(&str) -> Option<String>) -> Vec<VolumeStatus> {
        let entries: Vec<Arc<VolumeEntry>> = self.volumes.read().await.values().cloned().collect();
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let record = &entry.record;
            let local = self.local.clone();
            let name = record.name.clone();
            let allocated = blocking(move || local.allocated_bytes(&name)).await;
            let (mut health, mut detail) = entry.health();
            let epoch = entry.epoch();
            let writer = {
                let state = entry.writer_state();
                (state.awaiting_removal.clone(), state.caught_up.clone())
            };
            let writer = WriterState {
                awaiting_removal: writer.0,
                caught_up: writer.1,
                reconcile_pending: false,
            };
            let allocated_bytes = match allocated {
                Ok(bytes) => bytes,
                Err(status) => {
                    health = Health::Failed;
                    detail = status.message().to_string();
                    0
                }
            };
            out.push(VolumeStatus {
                name: record.name.clone(),
                role: records::volume_role(record.role) as i32,
                size_bytes: entry.size(),
                stripe_width: record.stripe_width,
                stripe_unit_bytes: record.stripe_unit_bytes,
                allocated_bytes,
                health: health as i32,
                replica_peers: match entry.changed_copies() {
                    Some(others) => others.into_iter().map(|peer| peer.name).collect(),
                    None => record
                        .replica_peers
                        .iter()
                        .map(|peer| peer.name.clone())
                        .collect(),
                },
                primary: record.primary.clone(),
                export_uri: export_uri(&record.name).unwrap_or_default(),
                detail,
                generation: self
                    .records
                    .counter(&generation_counter(&record.name))
                    .unwrap_or(0),
                epoch: epoch.epoch,
                epoch_writer: epoch.writer.clone(),
                in_sync: epoch.in_sync.clone(),
                awaiting_removal: writer.awaiting_removal.iter().cloned().collect(),
                caught_up: writer.caught_up.iter().cloned().collect(),
                resync_bytes: entry.resync_bytes.load(Ordering::Relaxed),
                snapshots: self.snapshot_statuses(&record.name).await,
                resync_pending_bytes: self.resync_pending_bytes(&entry),
                copies: self.copy_names(&entry).into_iter().collect(),
            });
        }
        out
    }

    /// Number of volumes.
    pub async fn count(&self) -> usize {
        self.volumes.read().await.len()
    }

    /// Whether a volume exists.
    pub async fn exists(&self, name: &str) -> bool {
        self.volumes.read().await.contains_key(name)
    }
}

fn peer_failure(peer: &Peer, what: &str, status: &Status) -> Status {
    Status::unavailable(format!(
        "peer {} ({}) could not {what}: {} ({:?})",
        peer.name,
        peer.address,
        status.message(),
        status.code()
    ))
}

impl Volumes {
    /// This node's copies (for the NBD read path).
    pub fn local(&self) -> &LocalVolumes {
        &self.local
    }

    /// Whether this node writes the volume (its epoch's writer, else its primary),
    /// and its size: only the writer's copy serves a VM or a writable export.
    pub async fn role_and_size(&self, name: &str) -> Result<(bool, u64), Status> {
        let entry = self.entry(name).await?;
        Ok((self.is_writer(&entry), entry.size()))
    }
}

/// Delta replication to another site (issue 18).
mod delta;
