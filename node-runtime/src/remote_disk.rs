//! Remote data, the client's side: the node's storage client for volumes it holds no
//! copy of (issue 15, item 2).
//!
//! A VM may run on a node without a copy of its volume (after a restart elsewhere or a
//! move). The controller then names that node in the volume's epoch
//! (`SetVolumeEpoch.clients`) and installs the epoch here too: a node holding no copy
//! keeps it as a [`ClientVolumeRecord`] (`client_volumes` in node.redb; a node holding a
//! replica keeps it with its copy). When the VM starts, `Exports::attach_vm` serves its
//! disk from a [`RemoteDevice`], which forwards every request over the `Replication`
//! service, signed by this node's key:
//! - reads go to the nearest copy of the epoch's in-sync set (nearest: lowest round
//!   trip of a second `ClientOpen`, on a warm connection, measured when the disk is
//!   attached and again when the in-sync set changes), and on a failure to the next
//!   one; a copy that failed goes to the end of the order;
//! - writes go to the epoch's writer (`ClientWrite`), which replicates them to every
//!   in-sync copy exactly as a local write and answers only when every one holds the
//!   write durably; the guest's request completes only then;
//! - every request carries the epoch installed here. A copy refuses an older one (this
//!   client was fenced by a newer epoch): the device then waits for the controller's
//!   newer epoch to reach this node (installs go to the copies first), and goes on
//!   under it if it still names this node a client, or fails the request if it does
//!   not (the VM was moved away) or none comes within the freeze bound.
//!
//! Bytes are checked end to end: a read's data against the crc32c of each 4 KiB block
//! the copy computed (a mismatch counts as a failure of that copy), a write's
//! checksums by the writer before it writes anything.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::auth::{NodeTarget, RequestSigner};
use proto::client::NodeClient;
use proto::v1;
use storage::{BlockDevice, StorageError};
use tonic::{Code, Status};

use crate::records::{self, ClientVolumeRecord, Records};
use crate::trust::PeerDirectory;
use crate::validate::{self, MAX_IO_BYTES};
use crate::volumes::{
    CLIENT_FENCED, ClientView, NOT_INSTALLED, Volumes, block_checksums, sessions,
};

/// How long one read is given on one copy before the next copy is tried.
const READ_ATTEMPT: Duration = Duration::from_secs(5);
/// How often a request waiting for a copy or an epoch tries again.
const RETRY: Duration = Duration::from_millis(100);
/// A write may wait this much longer than the writer's own freeze bound (the writer
/// answers by then, acknowledged or not).
const WRITE_MARGIN: Duration = Duration::from_secs(5);

/// The volumes this node reaches remotely, and the disks it serves from them.
#[derive(Debug)]
pub struct RemoteVolumes {
    node_name: String,
    records: Arc<Records>,
    volumes: Arc<Volumes>,
    signer: RequestSigner,
    peer_directory: PeerDirectory,
    /// The epochs installed here for volumes with no copy here, by volume.
    epochs: Mutex<BTreeMap<String, ClientView>>,
    /// What each attached remote disk does now, by volume (for Observe).
    served: Mutex<BTreeMap<String, std::sync::Weak<Mutex<Route>>>>,
    clients: Mutex<BTreeMap<String, NodeClient>>,
    freeze_bound: Duration,
}

/// Where a remote disk's requests go now.
#[derive(Debug, Clone, Default)]
pub struct Route {
    /// The epoch its requests carry.
    pub view: ClientView,
    /// In-sync copies, nearest first, with the round trip measured when opened
    /// (`None`: it did not answer then).
    pub order: Vec<(String, Option<Duration>)>,
    /// The copy that served the last read.
    pub last_read_from: String,
    /// Reads that went to another copy because one failed.
    pub failovers: u64,
    /// This node was fenced: the volume's epoch no longer names it a client.
    pub fenced: Option<String>,
}

impl Route {
    /// "reads from lab-2 (nearest, 0.21 ms), then lab-1; writes through lab-1 (the
    /// writer) at epoch 4".
    pub fn describe(&self) -> String {
        if let Some(why) = &self.fenced {
            return why.clone();
        }
        let copies: Vec<String> = self
            .order
            .iter()
            .enumerate()
            .map(|(index, (name, rtt))| {
                let rtt = match rtt {
                    Some(rtt) => format!("{:.2} ms", rtt.as_secs_f64() * 1000.0),
                    None => "did not answer when opened".into(),
                };
                if index == 0 {
                    format!("{name} (nearest, {rtt})")
                } else {
                    format!("{name} ({rtt})")
                }
            })
            .collect();
        let mut text = format!(
            "data on other nodes: reads from {}; writes through {} (the writer) at epoch {}",
            copies.join(", then "),
            self.view.writer,
            self.view.epoch
        );
        if self.failovers > 0 {
            text.push_str(&format!(
                "; {} read(s) failed over, last served by {}",
                self.failovers, self.last_read_from
            ));
        }
        text
    }
}

/// The writers' freeze bound (`CAIRN_VOLUME_FREEZE_MS`, else 30 s): how long a request
/// waits for a copy or an epoch, as the writer waits for the authority.
fn freeze_bound() -> Duration {
    std::env::var(crate::volumes::FREEZE_ENV)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(crate::volumes::DEFAULT_FREEZE)
}

fn records_status(error: records::RecordsError) -> Status {
    Status::internal(error.to_string())
}

impl RemoteVolumes {
    /// Loads the client records.
    pub fn open(
        node_name: &str,
        records: Arc<Records>,
        volumes: Arc<Volumes>,
        signer: RequestSigner,
        peer_directory: PeerDirectory,
    ) -> Result<Self, records::RecordsError> {
        let epochs = records
            .list::<ClientVolumeRecord>()?
            .into_iter()
            .map(|(name, record)| {
                let view = ClientView {
                    epoch: record.epoch,
                    writer: record.writer,
                    in_sync: record.in_sync,
                    clients: record.clients,
                };
                (name, view)
            })
            .collect();
        Ok(Self {
            node_name: node_name.to_string(),
            records,
            volumes,
            signer,
            peer_directory,
            epochs: Mutex::new(epochs),
            served: Mutex::default(),
            clients: Mutex::default(),
            freeze_bound: freeze_bound(),
        })
    }

    /// Installs an epoch the controller signed (`SetVolumeEpoch`) for a volume this
    /// node holds no copy of. Like a copy: an older epoch is refused, the same one with
    /// other contents too, the same one again changes nothing. A node not named a
    /// client refuses a first install (there is nothing to keep), but takes a newer
    /// epoch that drops it: that fences its remote disk.
    pub async fn set_epoch(&self, request: &v1::SetVolumeEpoch) -> Result<(), Status> {
        validate::name("set_volume_epoch.name", &request.name)?;
        if request.epoch == 0 {
            return Err(validate::invalid(
                "set_volume_epoch.epoch",
                "must be at least 1 (0 is the epoch before the controller sets one)",
            ));
        }
        validate::name("set_volume_epoch.writer", &request.writer)?;
        for (index, node) in request.in_sync.iter().enumerate() {
            validate::name(&format!("set_volume_epoch.in_sync[{index}]"), node)?;
        }
        crate::volumes::validate_clients(request)?;
        if !request.in_sync.contains(&request.writer) {
            return Err(validate::invalid(
                "set_volume_epoch.in_sync",
                format!(
                    "must name the writer {} (the writer holds every acknowledged write)",
                    request.writer
                ),
            ));
        }
        let wanted = ClientView {
            epoch: request.epoch,
            writer: request.writer.clone(),
            in_sync: request.in_sync.clone(),
            clients: request.clients.clone(),
        };
        let current = self.view_of_record(&request.name);
        let name = &request.name;
        match &current {
            None if !wanted.clients.contains(&self.node_name) => {
                return Err(Status::failed_precondition(format!(
                    "node {} holds no copy of volume `{name}`, and epoch {} does not name it a client (clients: {}); install the epoch on the copies and on the clients that run a VM using it",
                    self.node_name,
                    request.epoch,
                    if wanted.clients.is_empty() {
                        "none".to_string()
                    } else {
                        wanted.clients.join(", ")
                    }
                )));
            }
            Some(current) if request.epoch < current.epoch => {
                return Err(Status::failed_precondition(format!(
                    "volume `{name}` on node {} (a client, no copy): epoch {} (writer {}) is older than {} this node holds; refusing it",
                    self.node_name,
                    request.epoch,
                    request.writer,
                    describe(current)
                )));
            }
            Some(current) if request.epoch == current.epoch => {
                if *current == wanted {
                    return Ok(());
                }
                return Err(Status::failed_precondition(format!(
                    "volume `{name}` on node {} (a client, no copy) holds {}, and the request gives epoch {} other contents ({}); a change needs a new epoch",
                    self.node_name,
                    describe(current),
                    request.epoch,
                    describe(&wanted)
                )));
            }
            _ => {}
        }
        let record = records::client_volume_record(request);
        let records = self.records.clone();
        let key = name.clone();
        tokio::task::spawn_blocking(move || records.put(&key, &record))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(records_status)?;
        self.epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), wanted);
        Ok(())
    }

    /// Forgets the client record of a deleted volume (missing is fine).
    pub async fn forget(&self, name: &str) -> Result<(), Status> {
        let records = self.records.clone();
        let key = name.to_string();
        tokio::task::spawn_blocking(move || records.remove::<ClientVolumeRecord>(&key))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(records_status)?;
        self.epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }

    /// Whether an epoch of volume `name` was installed here with no copy here.
    pub fn knows(&self, name: &str) -> bool {
        self.view_of_record(name).is_some()
    }

    fn view_of_record(&self, name: &str) -> Option<ClientView> {
        self.epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The epoch this node uses for client I/O on `name`: its client record, else the
    /// epoch its own copy holds (a node with a replica may be a client too).
    pub async fn view(&self, name: &str) -> Option<ClientView> {
        match self.view_of_record(name) {
            Some(view) => Some(view),
            None => self.volumes.client_view(name).await,
        }
    }

    /// A signed client for node `name`, from the pushed peer set.
    fn client(&self, name: &str) -> Result<NodeClient, Status> {
        let peer = self
            .peer_directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|peer| peer.name == name)
            .cloned()
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "node {name} is not in the peer set of node {} (SetPeers): its address is unknown",
                    self.node_name
                ))
            })?;
        let cache_key = format!("{} {} {}", peer.name, peer.address, peer.public_key_hex);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&cache_key) {
            return Ok(client.clone());
        }
        let client = NodeClient::connect_lazy(&peer.address, self.signer.clone())
            .map_err(|error| Status::unavailable(format!("node {name}: {error}")))?;
        let client = if peer.public_key_hex.is_empty() {
            client.for_node(name)
        } else {
            let target = NodeTarget::new(name, &peer.public_key_hex)
                .map_err(|error| Status::unavailable(format!("node {name}: {error}")))?;
            client.with_target(target)
        };
        clients.insert(cache_key, client.clone());
        Ok(client)
    }

    /// Opens volume `name` for client I/O under `view`: every in-sync copy is asked
    /// (`ClientOpen`) at once, their round trips rank them, and the volume's size comes
    /// from the answers. Fails when no copy answers.
    async fn open_route(&self, name: &str, view: ClientView) -> Result<(u64, Route), Status> {
        if !view.clients.contains(&self.node_name) {
            return Err(Status::failed_precondition(format!(
                "node {} is not a client of volume `{name}` at {} (clients: {}): it holds no copy the VM could use and may not reach the others",
                self.node_name,
                describe(&view),
                if view.clients.is_empty() {
                    "none".to_string()
                } else {
                    view.clients.join(", ")
                }
            )));
        }
        let probes = view.in_sync.iter().map(|copy| {
            let copy = copy.clone();
            let epoch = view.epoch;
            async move {
                // Twice: the second round trip, on a warm connection, ranks the copy.
                let mut last = (Duration::ZERO, Err(Status::unavailable("not asked")));
                for _ in 0..2 {
                    let started = Instant::now();
                    let result = match self.client(&copy) {
                        Ok(mut client) => tokio::time::timeout(
                            READ_ATTEMPT,
                            client.client_open(v1::ClientOpenRequest {
                                volume: name.to_string(),
                                epoch,
                            }),
                        )
                        .await
                        .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer within 5 s"))),
                        Err(status) => Err(status),
                    };
                    let failed = result.is_err();
                    last = (started.elapsed(), result);
                    if failed {
                        break;
                    }
                }
                (copy, last.0, last.1)
            }
        });
        let answers = futures_util::future::join_all(probes).await;
        let mut size = None;
        let mut failures = Vec::new();
        let mut order: Vec<(String, Option<Duration>)> = Vec::new();
        for (copy, rtt, result) in answers {
            match result {
                Ok(open) => {
                    if copy == view.writer || size.is_none() {
                        size = Some(open.size_bytes);
                    }
                    order.push((copy, Some(rtt)));
                }
                Err(status) => {
                    failures.push(format!("{copy}: {}", status.message()));
                    order.push((copy, None));
                }
            }
        }
        order.sort_by_key(|(_, rtt)| rtt.unwrap_or(Duration::MAX));
        let Some(size) = size else {
            return Err(Status::unavailable(format!(
                "no in-sync copy of volume `{name}` answered node {} at {}: {}",
                self.node_name,
                describe(&view),
                failures.join("; ")
            )));
        };
        Ok((
            size,
            Route {
                view,
                order,
                ..Route::default()
            },
        ))
    }

    /// The device a VM's disk on volume `name` is served from, when this node may reach
    /// it remotely (`Ok(None)`: no epoch names this node a client).
    pub async fn device(self: &Arc<Self>, name: &str) -> Result<Option<RemoteDevice>, Status> {
        let Some(view) = self.view(name).await else {
            return Ok(None);
        };
        if view.epoch == 0 || !view.clients.contains(&self.node_name) {
            return Ok(None);
        }
        let (size_bytes, route) = self.open_route(name, view).await?;
        let route = Arc::new(Mutex::new(route));
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::downgrade(&route));
        Ok(Some(RemoteDevice {
            remote: self.clone(),
            name: name.to_string(),
            size_bytes,
            route,
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// Fills in each VM disk this node serves remotely: `data` "remote", the epoch's
    /// copies and which node serves reads and which writes.
    pub async fn fill_remote_disks(&self, vms: &mut [v1::VmStatus]) {
        let served = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for disk in vms.iter_mut().flat_map(|vm| vm.disks.iter_mut()) {
            // A route lives as long as its device (the NBD server of a running VM, and
            // a connection finishing after it stopped).
            let route = served.get(&disk.volume).and_then(std::sync::Weak::upgrade);
            if let Some(route) = route.filter(|_| disk.attached) {
                let route = route.lock().unwrap_or_else(|p| p.into_inner()).clone();
                disk.data = "remote".into();
                disk.copies_in_sync = route.view.in_sync.len() as u32;
                disk.copies = disk.copies.max(disk.copies_in_sync);
                disk.detail = route.describe();
            } else if disk.data == "missing"
                && let Some(view) = self.view_of_record(&disk.volume)
            {
                disk.data = "remote".into();
                disk.copies_in_sync = view.in_sync.len() as u32;
                disk.copies = disk.copies.max(disk.copies_in_sync);
                if disk.detail.is_empty() {
                    disk.detail = format!(
                        "data on other nodes at {} (reached when the VM runs)",
                        describe(&view)
                    );
                }
            }
        }
    }
}

fn describe(view: &ClientView) -> String {
    format!(
        "epoch {} (writer {}, in sync: {}, clients: {})",
        view.epoch,
        view.writer,
        view.in_sync.join(", "),
        view.clients.join(", ")
    )
}

/// Whether a failed call may succeed on another copy or later (the copy is down,
/// slow, damaged or no longer in sync), as opposed to a refusal that holds everywhere.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::DataLoss
    ) || (status.code() == Code::FailedPrecondition && !stale_epoch(status))
}

/// The copy refused the request's epoch (this client is behind, or ahead).
fn stale_epoch(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition
        && (status.message().contains(CLIENT_FENCED) || status.message().contains(NOT_INSTALLED))
}

/// A volume reached over the network, as the NBD server sees it.
pub struct RemoteDevice {
    remote: Arc<RemoteVolumes>,
    name: String,
    size_bytes: u64,
    route: Arc<Mutex<Route>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RemoteDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDevice")
            .field("name", &self.name)
            .field("size_bytes", &self.size_bytes)
            .finish_non_exhaustive()
    }
}

fn io_error(context: String, status: &Status) -> StorageError {
    StorageError::Io {
        context,
        source: std::io::Error::other(status.message().to_string()),
    }
}

impl RemoteDevice {
    /// How the disk's requests are routed now (for the attach's detail).
    pub fn describe(&self) -> String {
        self.route().describe()
    }

    fn route(&self) -> Route {
        self.route.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After a copy refused the request's epoch: waits for a newer epoch to be
    /// installed here (until `deadline`) and routes by it; fails when it no longer
    /// names this node a client.
    async fn follow_epoch(&self, refused: &Status, deadline: Instant) -> Result<(), Status> {
        let held = self.route().view.epoch;
        loop {
            let view = self.remote.view(&self.name).await.unwrap_or_default();
            if view.epoch > held {
                if !view.clients.contains(&self.remote.node_name) {
                    let why = format!(
                        "{CLIENT_FENCED}: volume `{}` is at {}, which no longer names node {} a client (its VM was moved away?); its I/O fails",
                        self.name,
                        describe(&view),
                        self.remote.node_name
                    );
                    self.route.lock().unwrap_or_else(|p| p.into_inner()).fenced = Some(why.clone());
                    return Err(Status::failed_precondition(why));
                }
                let in_sync_changed = view.in_sync != self.route().view.in_sync;
                if in_sync_changed {
                    let (_, route) = self.remote.open_route(&self.name, view).await?;
                    *self.route.lock().unwrap_or_else(|p| p.into_inner()) = route;
                } else {
                    self.route.lock().unwrap_or_else(|p| p.into_inner()).view = view;
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "volume `{}` from node {}: no newer epoch reached this node within {} ms after a copy refused epoch {held}: {}",
                    self.name,
                    self.remote.node_name,
                    self.remote.freeze_bound.as_millis(),
                    refused.message()
                )));
            }
            tokio::time::sleep(RETRY).await;
            if refused.message().contains(NOT_INSTALLED) {
                // The copy is behind this node (the controller installs it there too):
                // ask again.
                return Ok(());
            }
        }
    }

    /// One read of at most `MAX_IO_BYTES`: the copies in order, the next after a
    /// failure, until one answers with bytes that verify.
    async fn read_chunk(&self, offset: u64, length: u64) -> Result<Vec<u8>, Status> {
        let deadline = Instant::now() + self.remote.freeze_bound;
        loop {
            let route = self.route();
            if let Some(why) = &route.fenced {
                return Err(Status::failed_precondition(why.clone()));
            }
            let mut failures = Vec::new();
            let mut refused = None;
            for (index, (copy, _)) in route.order.iter().enumerate() {
                let result = match self.remote.client(copy) {
                    Ok(mut client) => tokio::time::timeout(
                        READ_ATTEMPT,
                        client.client_read(v1::ClientReadRequest {
                            volume: self.name.clone(),
                            offset,
                            length,
                            epoch: route.view.epoch,
                        }),
                    )
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer within 5 s"))),
                    Err(status) => Err(status),
                };
                let result = result.and_then(|read| {
                    if read.data.len() as u64 == length
                        && block_checksums(&read.data) == read.checksums
                    {
                        Ok(read.data)
                    } else {
                        Err(Status::data_loss(format!(
                            "{} bytes from {copy} do not match their checksums",
                            read.data.len()
                        )))
                    }
                });
                match result {
                    Ok(data) => {
                        let mut now = self.route.lock().unwrap_or_else(|p| p.into_inner());
                        if index > 0 {
                            now.failovers += 1;
                            // The copies that failed go after the others (stable, so
                            // reads failing over at once agree on the order).
                            let failed = &route.order[..index];
                            now.order
                                .sort_by_key(|(name, _)| failed.iter().any(|(f, _)| f == name));
                        }
                        now.last_read_from = copy.clone();
                        return Ok(data);
                    }
                    Err(status) if stale_epoch(&status) => {
                        refused = Some(status);
                        break;
                    }
                    Err(status) if transient(&status) => {
                        failures.push(format!("{copy}: {}", status.message()));
                    }
                    Err(status) => return Err(status),
                }
            }
            if let Some(refused) = refused {
                self.follow_epoch(&refused, deadline).await?;
                continue;
            }
            if Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "no in-sync copy of volume `{}` could be read from node {} for {} ms: {}",
                    self.name,
                    self.remote.node_name,
                    self.remote.freeze_bound.as_millis(),
                    failures.join("; ")
                )));
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// One write of at most `MAX_IO_BYTES` through the epoch's writer.
    async fn write_chunk(&self, offset: u64, data: &[u8]) -> Result<(), Status> {
        let deadline = Instant::now() + self.remote.freeze_bound;
        let checksums = block_checksums(data);
        let volumes = &self.remote.volumes;
        // Re-sends with a boot id the writer offered, at most once per new id.
        let mut offered_before: Option<Vec<u8>> = None;
        loop {
            let route = self.route();
            if let Some(why) = &route.fenced {
                return Err(Status::failed_precondition(why.clone()));
            }
            let writer = route.view.writer.clone();
            let result = match self.remote.client(&writer) {
                Ok(mut client) => tokio::time::timeout(
                    self.remote.freeze_bound + WRITE_MARGIN,
                    client.client_write(v1::ClientWriteRequest {
                        volume: self.name.clone(),
                        offset,
                        data: data.to_vec(),
                        epoch: route.view.epoch,
                        checksums: checksums.clone(),
                        // In the writer's session when this node knows it: no durable
                        // nonce on the writer (`volumes/sessions.rs`).
                        writer_boot: volumes.replica_session(&writer),
                    }),
                )
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("the writer did not answer"))),
                Err(status) => Err(status),
            };
            match result {
                Ok(answer) => {
                    volumes.learn_session(&writer, answer.writer_boot);
                    return Ok(());
                }
                // The writer restarted since this node learned its session: it refused
                // the write before doing anything and named its new one; the same
                // bytes again, in that session.
                Err(status)
                    if sessions::offered_boot(&status)
                        .is_some_and(|boot| offered_before.as_ref() != Some(&boot)) =>
                {
                    let boot = sessions::offered_boot(&status).unwrap_or_default();
                    volumes.learn_session(&writer, boot.clone());
                    offered_before = Some(boot);
                }
                Err(status) if stale_epoch(&status) => {
                    self.follow_epoch(&status, deadline).await?;
                }
                // The writer is unreachable (not a refusal): the same bytes again are
                // harmless, until the bound.
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::Unknown)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(RETRY).await;
                }
                Err(status) => {
                    return Err(Status::new(
                        status.code(),
                        format!(
                            "write to volume `{}` through its writer {writer}: {}",
                            self.name,
                            status.message()
                        ),
                    ));
                }
            }
        }
    }
}

impl BlockDevice for RemoteDevice {
    fn size(&self) -> storage::Result<u64> {
        Ok(self.size_bytes)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> storage::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let chunk = (buf.len() - done).min(MAX_IO_BYTES as usize);
            let chunk_offset = offset + done as u64;
            // NBD connections run on their own OS threads, outside the tokio runtime.
            let data = self
                .runtime
                .block_on(self.read_chunk(chunk_offset, chunk as u64))
                .map_err(|status| {
                    io_error(
                        format!("reading volume `{}` at {chunk_offset} remotely", self.name),
                        &status,
                    )
                })?;
            buf[done..done + chunk].copy_from_slice(&data);
            done += chunk;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> storage::Result<()> {
        for (index, chunk) in data.chunks(MAX_IO_BYTES as usize).enumerate() {
            let chunk_offset = offset + (index as u64) * MAX_IO_BYTES;
            self.runtime
                .block_on(self.write_chunk(chunk_offset, chunk))
                .map_err(|status| {
                    io_error(
                        format!("writing volume `{}` at {chunk_offset} remotely", self.name),
                        &status,
                    )
                })?;
        }
        Ok(())
    }

    fn flush(&self) -> storage::Result<()> {
        // Every acknowledged write is durable on every in-sync copy already (the writer
        // answers only then); there is nothing to flush here.
        Ok(())
    }

    fn trim(&self, _offset: u64, _length: u64) -> storage::Result<()> {
        // Advisory in NBD, and skipped for local disks too (copies stay identical).
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_names_the_nearest_copy_the_writer_and_the_epoch() {
        let route = Route {
            view: ClientView {
                epoch: 4,
                writer: "lab-1".into(),
                in_sync: vec!["lab-1".into(), "lab-2".into()],
                clients: vec!["lab-3".into()],
            },
            order: vec![
                ("lab-2".into(), Some(Duration::from_micros(210))),
                ("lab-1".into(), None),
            ],
            ..Route::default()
        };
        assert_eq!(
            route.describe(),
            "data on other nodes: reads from lab-2 (nearest, 0.21 ms), then lab-1 (did not answer when opened); writes through lab-1 (the writer) at epoch 4"
        );
    }

    #[test]
    fn a_refused_epoch_is_followed_and_a_down_copy_is_skipped() {
        let fenced = Status::failed_precondition(format!("x {CLIENT_FENCED} y"));
        assert!(stale_epoch(&fenced) && !transient(&fenced));
        let behind = Status::failed_precondition(format!("epoch 5 is {NOT_INSTALLED}"));
        assert!(stale_epoch(&behind));
        let outside = Status::failed_precondition("outside the in-sync set");
        assert!(!stale_epoch(&outside) && transient(&outside));
        assert!(transient(&Status::unavailable("connection refused")));
        assert!(!transient(&Status::permission_denied("not a client")));
    }
}
