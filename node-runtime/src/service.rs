//! The tonic service implementations: authenticate, validate, delegate to [`Node`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::methods;
use proto::v1::{self, watch_event::Event};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::events::now_unix_ms;
use crate::inventory;
use crate::node::Node;
use crate::trust::Role;
use crate::validate;
use crate::volumes::ReplicationCaller;

/// Implements every service over one shared [`Node`].
#[derive(Debug, Clone)]
pub struct NodeService {
    node: Arc<Node>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl NodeService {
    /// A service over `node`; `shutdown` ends Watch streams when it turns true.
    pub fn new(node: Arc<Node>, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { node, shutdown }
    }
}

#[tonic::async_trait]
impl v1::inventory_server::Inventory for NodeService {
    async fn get_inventory(
        &self,
        request: Request<v1::GetInventoryRequest>,
    ) -> Result<Response<v1::GetInventoryResponse>, Status> {
        self.node
            .trust
            .check(methods::GET_INVENTORY, Role::Controller, &request)?;
        let data_dir = self.node.data_dir().to_path_buf();
        let local = self.node.volumes.local().clone();
        let netns = self.node.bonds.netns().clone();
        let in_named_netns = self.node.config.netns.is_some();
        let networking = self.node.bonds.networking().await;
        let probe_bonding = networking.unavailable_reason.is_empty();
        let (cpu, memory, mut disks, nics, kernel) = tokio::task::spawn_blocking(move || {
            let mut disks = inventory::disks(&data_dir);
            let (_, free) = inventory::filesystem_space(&data_dir).unwrap_or((0, 0));
            for disk in local.disks() {
                disks.push(v1::Disk {
                    name: disk.name,
                    path: disk.path.display().to_string(),
                    total_bytes: disk.capacity,
                    // A sparse file disk can hold no more than its unallocated capacity
                    // nor more than the filesystem below it has free.
                    free_bytes: disk.capacity.saturating_sub(disk.allocated).min(free),
                });
            }
            let nics = if in_named_netns {
                inventory::nics_in(&netns)
            } else {
                inventory::nics()
            };
            (
                inventory::cpu(),
                inventory::memory(),
                disks,
                nics,
                inventory::kernel(&netns, probe_bonding),
            )
        })
        .await
        .map_err(|error| Status::internal(error.to_string()))?;
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(v1::GetInventoryResponse {
            node_name: self.node.config.name.clone(),
            public_key_hex: self.node.identity.public_key_hex(),
            cpu: Some(cpu),
            memory: Some(memory),
            disks,
            nics,
            kernel: Some(kernel),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_unix_ms: self.node.started_at_unix_ms,
            networking: Some(networking),
            protocol_version: Some(proto::protocol::current()),
            audit_anchors: self.node.trust.audit_anchors(),
        }))
    }
}

#[tonic::async_trait]
impl v1::observe_server::Observe for NodeService {
    async fn observe(
        &self,
        request: Request<v1::ObserveRequest>,
    ) -> Result<Response<v1::ObserveResponse>, Status> {
        self.node
            .trust
            .check(methods::OBSERVE, Role::Controller, &request)?;
        let exports = &self.node.exports;
        let mut vms = self.node.vms.statuses().await;
        self.node.ft_guards.fill(&mut vms);
        let definitions = self.node.vms.definitions().await;
        let refusal = self.node.bonds.refusal();
        let netns = self.node.bonds.netns().clone();
        let network = self.node.bonds.network();
        let blocks = network.blocks();
        let (segments, firewall_drift) = self.node.segment_statuses(&definitions).await;
        self.node
            .bonds
            .set_segment_statuses(segments, firewall_drift);
        let read_nics = move || {
            let views: Vec<crate::vm_nics::VmNics<'_>> = definitions
                .values()
                .filter(|d| !d.nics.is_empty())
                .map(|d| crate::vm_nics::VmNics {
                    vm: &d.name,
                    tenant: &d.tenant,
                    nics: &d.nics,
                })
                .collect();
            network.vm_nic_statuses(&netns, refusal.as_deref(), &views)
        };
        let mut nics = crate::maybe_blocking(blocks, read_nics)
            .await
            .map_err(|error| Status::internal(error.to_string()))?;
        for vm in &mut vms {
            // The node's view (tap, bridge, ready) with the running VMM's (guest up,
            // frames) merged in by tap.
            let from_vmm = std::mem::take(&mut vm.nics);
            vm.nics = nics.remove(&vm.name).unwrap_or_default();
            for nic in &mut vm.nics {
                if let Some(live) = from_vmm.iter().find(|live| live.tap == nic.tap) {
                    nic.guest_up = live.guest_up;
                    nic.rx_frames = live.rx_frames;
                    nic.tx_frames = live.tx_frames;
                }
            }
        }
        let volumes = self
            .node
            .volumes
            .statuses(|name| exports.uri_of(name))
            .await;
        crate::vms::fill_disk_copies(&self.node.config.name, &mut vms, &volumes);
        self.node.remote.fill_remote_disks(&mut vms).await;
        let (cgroup_version, cgroup_detail) = self.node.vms.cgroup_summary();
        let mut usage = crate::vms::sla::node_usage(
            &vms,
            &cgroup_version,
            &cgroup_detail,
            self.node.config.sla.preempt_below_available,
            self.node.config.sla.preempt_above_cpu_pressure,
        );
        (usage.dedicated_cpus, usage.dedicated_cpus_free) = self.node.vms.dedicated_summary();
        Ok(Response::new(v1::ObserveResponse {
            usage: Some(usage),
            node_name: self.node.config.name.clone(),
            observed_at_unix_ms: now_unix_ms(),
            vms,
            volumes,
            bonds: self.node.bonds.statuses().await,
            peers: self.node.trust.pushed_peers(),
            networking: Some(self.node.bonds.networking().await),
            protections: self.node.volumes.protection_statuses(),
            replications: self.node.volumes.replication_statuses(),
            // A node emulating 1.6 leaves it unset, as a 1.6 build does.
            protocol_version: proto::protocol::speaks(7).then(proto::protocol::current),
        }))
    }
}

#[tonic::async_trait]
impl v1::apply_server::Apply for NodeService {
    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let caller = self
            .node
            .trust
            .check(methods::APPLY, Role::Controller, &request)?;
        // The action runs in a task of its own. If the caller goes away mid-call (a
        // killed CLI, a timeout), tonic drops this future, but not the task: the action
        // is finished and recorded under its request id, so a retry gets the recorded
        // outcome (replayed) instead of a second run.
        let node = self.node.clone();
        let request = request.into_inner();
        let work = tokio::spawn(async move { node.apply(request, caller.envelope).await });
        let response = work
            .await
            .map_err(|error| Status::internal(format!("apply task failed: {error}")))??;
        Ok(Response::new(response))
    }

    async fn apply_batch(
        &self,
        request: Request<v1::ApplyBatchRequest>,
    ) -> Result<Response<v1::ApplyBatchResponse>, Status> {
        if !proto::protocol::speaks(proto::protocol::APPLY_BATCH.minor) {
            // A node emulating 1.7 (`CAIRN_PROTOCOL_EMULATE`) answers as a 1.7 build.
            return Err(Status::unimplemented(format!(
                "unknown method ApplyBatch of cairn.node.v1.Apply (this node speaks cairn.node protocol {})",
                proto::protocol::header_value()
            )));
        }
        let caller = self
            .node
            .trust
            .check(methods::APPLY_BATCH, Role::Controller, &request)?;
        let batch = request.into_inner();
        validate::apply_batch(&batch)?;
        // As for Apply: the actions finish and are recorded even if the caller goes.
        let node = self.node.clone();
        let work =
            tokio::spawn(async move { node.apply_batch(batch.requests, caller.envelope).await });
        let results = work
            .await
            .map_err(|error| Status::internal(format!("apply task failed: {error}")))?;
        Ok(Response::new(v1::ApplyBatchResponse { results }))
    }

    async fn read_volume(
        &self,
        request: Request<v1::ReadVolumeRequest>,
    ) -> Result<Response<v1::ReadVolumeResponse>, Status> {
        self.node
            .trust
            .check(methods::READ_VOLUME, Role::Controller, &request)?;
        let request = request.into_inner();
        validate::name("read_volume_request.name", &request.name)?;
        let data = self
            .node
            .volumes
            .read(
                &request.name,
                request.offset,
                request.length,
                "read_volume_request",
            )
            .await?;
        Ok(Response::new(v1::ReadVolumeResponse { data }))
    }

    async fn guest_disk_io(
        &self,
        request: Request<v1::GuestDiskIoRequest>,
    ) -> Result<Response<v1::GuestDiskIoResponse>, Status> {
        self.node
            .trust
            .check(methods::GUEST_DISK_IO, Role::Controller, &request)?;
        let response = crate::guest_io::run(&self.node.vms, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn read_console(
        &self,
        request: Request<v1::ReadConsoleRequest>,
    ) -> Result<Response<v1::ReadConsoleResponse>, Status> {
        self.node
            .trust
            .check(methods::READ_CONSOLE, Role::Controller, &request)?;
        let response = crate::operate::read_console(&self.node.vms, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn write_console(
        &self,
        request: Request<v1::WriteConsoleRequest>,
    ) -> Result<Response<v1::WriteConsoleResponse>, Status> {
        self.node
            .trust
            .check(methods::WRITE_CONSOLE, Role::Controller, &request)?;
        let response = crate::operate::write_console(&self.node.vms, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn get_outcome(
        &self,
        request: Request<v1::GetOutcomeRequest>,
    ) -> Result<Response<v1::GetOutcomeResponse>, Status> {
        self.node
            .trust
            .check(methods::GET_OUTCOME, Role::Controller, &request)?;
        Ok(Response::new(
            self.node.outcome(&request.get_ref().request_id).await?,
        ))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::quorum_server::Quorum for NodeService {
    /// A site peer's quorum probe: signed by a trusted peer (or a controller).
    async fn probe(
        &self,
        request: Request<v1::QuorumProbe>,
    ) -> Result<Response<v1::QuorumProbeReply>, Status> {
        let caller =
            self.node
                .trust
                .check(methods::QUORUM_PROBE, Role::ControllerOrPeer, &request)?;
        self.node.quorum.heard(&caller.name);
        let (witness_holder, witness_number) = self.node.quorum.witness_holder();
        Ok(Response::new(v1::QuorumProbeReply {
            node: self.node.config.name.clone(),
            witness_holder,
            witness_number,
        }))
    }
}

#[tonic::async_trait]
impl v1::watch_server::Watch for NodeService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        self.node
            .trust
            .check(methods::WATCH, Role::Controller, &request)?;
        let interval_ms = match request.get_ref().heartbeat_interval_ms {
            0 => 1000,
            ms @ 100..=60_000 => ms,
            other => {
                return Err(validate::invalid(
                    "watch_request.heartbeat_interval_ms",
                    format!("{other} is out of range 100..=60000 (or 0 for the default 1000)"),
                ));
            }
        };
        let node = self.node.clone();
        let mut shutdown = self.shutdown.clone();
        let mut receiver = node.events.subscribe();
        let (sender, output) = tokio::sync::mpsc::channel::<Result<v1::WatchEvent, Status>>(64);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(u64::from(interval_ms)));
            // This stream's numbering: one more per event sent on it, and as many more
            // as it missed when it lagged (the watcher sees that gap). It is the
            // stream's, not the node's: a heartbeat goes to this stream only, and a
            // number shared by two watchers made each one's heartbeats gaps in the
            // other's sequence (every gap wakes a controller's drift check).
            let mut sequence: u64 = 0;
            loop {
                let mut event = tokio::select! {
                    _ = ticker.tick() => {
                        let heartbeat = v1::Heartbeat {
                            uptime_ms: now_unix_ms().saturating_sub(node.started_at_unix_ms),
                            vms_running: node.vms.running().await,
                            volumes: node.volumes.count().await as u32,
                        };
                        node.events.stamp(Event::Heartbeat(heartbeat))
                    }
                    received = receiver.recv() => match received {
                        Ok(event) => event,
                        // Lagged: the watcher sees the gap in sequence numbers.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            sequence += missed;
                            continue;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                    _ = shutdown.changed() => break,
                };
                sequence += 1;
                event.sequence = sequence;
                if sender.send(Ok(event)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(output),
        )))
    }
}

impl NodeService {
    /// Authenticates a `Replication` call and says who made it, for the per-volume
    /// checks in `volumes.rs`; a forwarded controller grant is verified here.
    fn replication_caller<T: prost::Message>(
        &self,
        method: &str,
        request: &Request<T>,
        grant: Option<&v1::ControllerGrant>,
    ) -> Result<ReplicationCaller, Status> {
        self.replication_caller_as(method, request, grant, false)
    }

    /// [`NodeService::replication_caller`] for a request that may be bound to this
    /// process's replica session (`in_session`: its nonce is kept in memory only).
    fn replication_caller_as<T: prost::Message>(
        &self,
        method: &str,
        request: &Request<T>,
        grant: Option<&v1::ControllerGrant>,
        in_session: bool,
    ) -> Result<ReplicationCaller, Status> {
        let trust = &self.node.trust;
        let caller = if in_session {
            trust.check_in_session(method, Role::ControllerOrPeer, request)?
        } else {
            trust.check(method, Role::ControllerOrPeer, request)?
        };
        Ok(ReplicationCaller {
            controller: trust.is_controller(&caller.key_hex),
            description: trust.describe(&caller.key_hex),
            grant: grant.map(|grant| trust.verify_grant(grant)),
            key_hex: caller.key_hex,
        })
    }
}

#[tonic::async_trait]
impl v1::replication_server::Replication for NodeService {
    async fn ensure_replica(
        &self,
        request: Request<v1::EnsureReplicaRequest>,
    ) -> Result<Response<v1::EnsureReplicaResponse>, Status> {
        let caller = self.replication_caller(
            methods::ENSURE_REPLICA,
            &request,
            request.get_ref().grant.as_ref(),
        )?;
        let request = request.into_inner();
        validate::name("ensure_replica_request.volume", &request.volume)?;
        validate::name("ensure_replica_request.primary", &request.primary)?;
        validate::volume_geometry(
            "ensure_replica_request",
            request.size_bytes,
            request.stripe_width,
            request.stripe_unit_bytes,
        )?;
        Ok(Response::new(
            self.node.volumes.ensure_replica(&request, &caller).await?,
        ))
    }

    async fn replica_write(
        &self,
        request: Request<v1::ReplicaWriteRequest>,
    ) -> Result<Response<v1::ReplicaWriteResponse>, Status> {
        // A write naming this run's session keeps its nonce in memory only; one naming
        // another run's is refused before anything is done (`volumes/sessions.rs`).
        let in_session = self
            .node
            .volumes
            .in_session(&request.get_ref().replica_boot)?;
        let caller =
            self.replication_caller_as(methods::REPLICA_WRITE, &request, None, in_session)?;
        let request = request.into_inner();
        validate::name("replica_write_request.volume", &request.volume)?;
        self.node
            .volumes
            .authorize_write(&request.volume, &caller)
            .await?;
        self.node.volumes.replica_write(request, &caller).await?;
        Ok(Response::new(v1::ReplicaWriteResponse {
            replica_boot: self.node.volumes.boot_id().to_vec(),
        }))
    }

    async fn replica_read(
        &self,
        request: Request<v1::ReplicaReadRequest>,
    ) -> Result<Response<v1::ReplicaReadResponse>, Status> {
        let caller = self.replication_caller(methods::REPLICA_READ, &request, None)?;
        let request = request.into_inner();
        validate::name("replica_read_request.volume", &request.volume)?;
        self.node
            .volumes
            .authorize_read(&request.volume, &caller)
            .await?;
        let (data, checksums) = self
            .node
            .volumes
            .read_with_checksums(
                &request.volume,
                request.offset,
                request.length,
                "replica_read_request",
            )
            .await?;
        Ok(Response::new(v1::ReplicaReadResponse { data, checksums }))
    }

    async fn replica_recent(
        &self,
        request: Request<v1::ReplicaRecentRequest>,
    ) -> Result<Response<v1::ReplicaRecentResponse>, Status> {
        let caller = self.replication_caller(methods::REPLICA_RECENT, &request, None)?;
        let request = request.into_inner();
        validate::name("replica_recent_request.volume", &request.volume)?;
        self.node
            .volumes
            .authorize_read(&request.volume, &caller)
            .await?;
        let response = self
            .node
            .volumes
            .recent(&request.volume, request.reconcile)
            .await?;
        Ok(Response::new(response))
    }

    async fn delete_replica(
        &self,
        request: Request<v1::DeleteReplicaRequest>,
    ) -> Result<Response<v1::DeleteReplicaResponse>, Status> {
        let caller = self.replication_caller(
            methods::DELETE_REPLICA,
            &request,
            request.get_ref().grant.as_ref(),
        )?;
        let request = request.into_inner();
        validate::name("delete_replica_request.volume", &request.volume)?;
        self.node
            .volumes
            .delete_replica(&request.volume, &caller)
            .await?;
        Ok(Response::new(v1::DeleteReplicaResponse {}))
    }

    async fn resize_replica(
        &self,
        request: Request<v1::ResizeReplicaRequest>,
    ) -> Result<Response<v1::ResizeReplicaResponse>, Status> {
        let caller = self.replication_caller(
            methods::RESIZE_REPLICA,
            &request,
            request.get_ref().grant.as_ref(),
        )?;
        let request = request.into_inner();
        validate::name("resize_replica_request.volume", &request.volume)?;
        validate::volume_size("resize_replica_request.size_bytes", request.size_bytes)?;
        Ok(Response::new(
            self.node
                .volumes
                .resize_replica(&request.volume, request.size_bytes, &caller)
                .await?,
        ))
    }

    async fn replica_snapshot(
        &self,
        request: Request<v1::ReplicaSnapshotRequest>,
    ) -> Result<Response<v1::ReplicaSnapshotResponse>, Status> {
        let caller = self.replication_caller(methods::REPLICA_SNAPSHOT, &request, None)?;
        let request = request.into_inner();
        validate::name("replica_snapshot_request.volume", &request.volume)?;
        validate::name("replica_snapshot_request.snapshot", &request.snapshot)?;
        self.node
            .volumes
            .authorize_write(&request.volume, &caller)
            .await?;
        Ok(Response::new(
            self.node
                .volumes
                .replica_snapshot(&request, &caller)
                .await?,
        ))
    }

    async fn clone_replica(
        &self,
        request: Request<v1::CloneReplicaRequest>,
    ) -> Result<Response<v1::CloneReplicaResponse>, Status> {
        let caller = self.replication_caller(
            methods::CLONE_REPLICA,
            &request,
            request.get_ref().grant.as_ref(),
        )?;
        let request = request.into_inner();
        validate::name("clone_replica_request.volume", &request.volume)?;
        validate::name("clone_replica_request.snapshot", &request.snapshot)?;
        validate::name("clone_replica_request.name", &request.name)?;
        Ok(Response::new(
            self.node.volumes.clone_replica(&request, &caller).await?,
        ))
    }

    async fn delta_status(
        &self,
        request: Request<v1::DeltaStatusRequest>,
    ) -> Result<Response<v1::DeltaStatusResponse>, Status> {
        let caller = self.replication_caller(methods::DELTA_STATUS, &request, None)?;
        let request = request.into_inner();
        validate::name("delta_status_request.volume", &request.volume)?;
        Ok(Response::new(
            self.node
                .volumes
                .delta_status(&request.volume, &caller.key_hex, &caller.description)
                .await?,
        ))
    }

    async fn delta_write(
        &self,
        request: Request<v1::DeltaWriteRequest>,
    ) -> Result<Response<v1::DeltaWriteResponse>, Status> {
        let caller = self.replication_caller(methods::DELTA_WRITE, &request, None)?;
        let request = request.into_inner();
        validate::name("delta_write_request.volume", &request.volume)?;
        Ok(Response::new(
            self.node
                .volumes
                .delta_write(request, &caller.key_hex, &caller.description)
                .await?,
        ))
    }

    async fn delta_commit(
        &self,
        request: Request<v1::DeltaCommitRequest>,
    ) -> Result<Response<v1::DeltaCommitResponse>, Status> {
        let caller = self.replication_caller(methods::DELTA_COMMIT, &request, None)?;
        let request = request.into_inner();
        validate::name("delta_commit_request.volume", &request.volume)?;
        validate::name("delta_commit_request.snapshot", &request.snapshot)?;
        Ok(Response::new(
            self.node
                .volumes
                .delta_commit(request, &caller.key_hex, &caller.description)
                .await?,
        ))
    }

    async fn client_open(
        &self,
        request: Request<v1::ClientOpenRequest>,
    ) -> Result<Response<v1::ClientOpenResponse>, Status> {
        let caller = self.replication_caller(methods::CLIENT_OPEN, &request, None)?;
        let request = request.into_inner();
        validate::name("client_open_request.volume", &request.volume)?;
        Ok(Response::new(
            self.node.volumes.client_open(&request, &caller).await?,
        ))
    }

    async fn client_read(
        &self,
        request: Request<v1::ClientReadRequest>,
    ) -> Result<Response<v1::ClientReadResponse>, Status> {
        let caller = self.replication_caller(methods::CLIENT_READ, &request, None)?;
        let request = request.into_inner();
        validate::name("client_read_request.volume", &request.volume)?;
        Ok(Response::new(
            self.node.volumes.client_read(&request, &caller).await?,
        ))
    }

    async fn client_write(
        &self,
        request: Request<v1::ClientWriteRequest>,
    ) -> Result<Response<v1::ClientWriteResponse>, Status> {
        // In the writer's session like a ReplicaWrite (`volumes/sessions.rs`): a remote
        // write naming this run's boot id keeps its nonce in memory only.
        let in_session = self
            .node
            .volumes
            .in_session(&request.get_ref().writer_boot)?;
        let caller =
            self.replication_caller_as(methods::CLIENT_WRITE, &request, None, in_session)?;
        let request = request.into_inner();
        validate::name("client_write_request.volume", &request.volume)?;
        Ok(Response::new(
            self.node.volumes.client_write(request, &caller).await?,
        ))
    }
}

#[tonic::async_trait]
impl v1::controller_trust_server::ControllerTrust for NodeService {
    /// Replaces the trusted controller keys (`Trust::set_controllers`): controller
    /// key rotation and revocation, and recovery by an offline key of the set.
    async fn set_controller_keys(
        &self,
        request: Request<v1::SetControllerKeysRequest>,
    ) -> Result<Response<v1::SetControllerKeysReply>, Status> {
        if !proto::protocol::speaks(7) {
            // A node emulating 1.6 (`CAIRN_PROTOCOL_EMULATE`) answers as a 1.6 build.
            return Err(Status::unimplemented(
                "unknown service cairn.node.v1.ControllerTrust (this node speaks cairn.node protocol 1.6)",
            ));
        }
        let caller =
            self.node
                .trust
                .check(methods::SET_CONTROLLER_KEYS, Role::Controller, &request)?;
        let mut keys = proto::auth::TrustedKeys::new();
        for key in &request.get_ref().keys {
            let parsed = proto::auth::parse_public_key(&key.public_key_hex).map_err(|e| {
                Status::invalid_argument(format!("controller key `{}`: {e}", key.name))
            })?;
            if key.name.contains(['\n', '\r', '#']) {
                return Err(Status::invalid_argument(format!(
                    "controller key name `{}` is not one line without `#`",
                    key.name.escape_debug()
                )));
            }
            keys.insert(parsed, key.name.clone());
        }
        self.node.trust.set_controllers(keys, &caller.key_hex)?;
        let now = self.node.trust.controllers();
        let keys = now
            .render()
            .lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(key, name)| v1::ControllerKey {
                public_key_hex: key.to_owned(),
                name: name.to_owned(),
            })
            .collect();
        Ok(Response::new(v1::SetControllerKeysReply { keys }))
    }
}
