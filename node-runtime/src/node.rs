//! The node: its identity, records and subsystems, and the one place where an
//! `ApplyRequest` is validated, de-duplicated by request id, carried out and recorded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::auth::{Envelope, Identity, NodeTarget, RequestSigner};
use proto::v1::{
    self, ApplyRequest, ApplyResponse, apply_request::Action, apply_response::Result as ApplyResult,
};
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::events::{EventBus, now_unix_ms};
use crate::exports::Exports;
use crate::local_volumes::LocalVolumes;
use crate::records::{self, PeerRecord, Records, RequestRecord};
use crate::trust::Trust;
use crate::validate;
use crate::vms::Vms;
use crate::volumes::Volumes;

/// How a node is configured (from the command line).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node name (DNS label).
    pub name: String,
    /// Data directory: identity, records, volumes, VM run files.
    pub data_dir: PathBuf,
    /// Trusted controller keys file (default `DATA_DIR/trusted-controllers`).
    pub trusted_controller_keys: Option<PathBuf>,
    /// Trusted peer keys file (default `DATA_DIR/trusted-peers`).
    pub trusted_peer_keys: Option<PathBuf>,
    /// Path of `cairn-vmm` (default: next to cairn-node, then PATH).
    pub vmm_binary: Option<PathBuf>,
    /// How long request-id records are kept. A retry older than this is carried out
    /// again (actions are idempotent, but a very late WriteVolume retry would write old
    /// data), so it must exceed any retry horizon of the reconciler.
    pub request_retention: Duration,
    /// Named network namespace (`/run/netns/NAME`) where bonds live; `None` is the
    /// agent's own namespace (production).
    pub netns: Option<String>,
    /// When set, network actions are refused with this reason and the node's network
    /// is never touched (`cairn dev up` on a machine where it cannot give the node its
    /// own namespace: a dev node must not change the host's network).
    pub network_disabled: Option<String>,
    /// How long a StartVm waits to see the VM running (its VMM alive and the first
    /// guest heartbeat reported) before it kills the VMM and fails (default 10 s).
    pub vm_start_timeout: Duration,
    /// Where a VM migrating to this node is received (`--migration-address`); `None`:
    /// 127.0.0.1.
    pub migration_address: Option<std::net::IpAddr>,
    /// Where to renew the lease that keeps HA and FT VMs running (`--lease-from`);
    /// `None`: no fence is ever armed ([`crate::quorum`]).
    pub lease: Option<crate::quorum::LeaseConfig>,
    /// Kill every VMM when the agent stops gracefully (`--stop-vms-on-exit`, the old
    /// behaviour); by default they keep running and the next agent adopts them.
    pub stop_vms_on_exit: bool,
    /// Each VMM in a process group of its own (default), or in the agent's
    /// (`--vmm-process-group agent`: `cairn dev up`, whose per-node group stands for
    /// the whole machine).
    pub vmm_own_process_group: bool,
    /// The watchdog device to pet while the node holds quorum (`--watchdog PATH`);
    /// `None`: none is armed ([`crate::watchdog`]).
    pub watchdog: Option<PathBuf>,
    /// The hypervisor VMs run on; `None`: a `cairn-vmm` process per VM
    /// ([`crate::hypervisor::ProcessHypervisor`]). `cairn-node --simulate` sets a
    /// simulated one ([`crate::simulate`]).
    pub hypervisor: Option<Arc<dyn crate::hypervisor::Hypervisor>>,
    /// The network bonds and VM NICs are made in; `None`: the host's (netlink,
    /// [`crate::network_backend::HostNetwork`]). `cairn-node --simulate` sets a
    /// simulated one.
    pub network: Option<Arc<dyn crate::network_backend::NetworkBackend>>,
    /// Faults injected into every call (`cairn-node --simulate`); `None` for a real node.
    pub faults: Option<Arc<crate::simulate::Faults>>,
    /// SLA classes on the node: cgroups, preemption, the metrics listener.
    pub sla: SlaConfig,
}

/// How the node enforces SLA classes and reports usage.
#[derive(Debug, Clone, Default)]
pub struct SlaConfig {
    /// Put every VMM in a cgroup of its VM's class (`--cgroups auto`, the default of a
    /// real node; a simulated node enforces none).
    pub enforce: bool,
    /// The cgroup (below each hierarchy's mount) under which the node's parent
    /// `cairn-NODE` is made (`--cgroup-parent`); `None`: the agent's own cgroup.
    pub cgroup_parent: Option<String>,
    /// The CPUs the node may dedicate to VMs whose SLA profile pins them
    /// (`--dedicated-cpus`, a kernel CPU list); `None`: every CPU of its cpuset but the
    /// lowest.
    pub dedicated_cpus: Option<String>,
    /// Where to serve `/metrics` (`--metrics-listen`); `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Stop spot VMs while memory available is below this many bytes
    /// (`--preempt-below-available`); 0: never.
    pub preempt_below_available: u64,
    /// Stop busy spot VMs while CPU pressure (percent of a 1 s window in which some
    /// runnable task waited for a CPU) is above this (`--preempt-above-cpu-pressure`);
    /// 0: never.
    pub preempt_above_cpu_pressure: u32,
}

/// Errors of starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The network namespace given cannot be used.
    #[error("{0}")]
    Netns(String),
    /// The data directory cannot be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The identity cannot be loaded or created.
    #[error("node identity: {0}")]
    Identity(#[from] proto::auth::AuthError),
    /// The node's records cannot be opened.
    #[error(transparent)]
    Records(#[from] records::RecordsError),
    /// Trust files are bad.
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    /// The volume store cannot be opened.
    #[error("volume store: {0}")]
    VolumeStore(String),
}

/// A running node's shared state.
#[derive(Debug)]
pub struct Node {
    /// Configuration.
    pub config: NodeConfig,
    /// The node's key pair.
    pub identity: Identity,
    /// Who may call.
    pub trust: Trust,
    /// Durable records (`node.redb`).
    pub records: Arc<Records>,
    /// Event bus.
    pub events: Arc<EventBus>,
    /// Volumes.
    pub volumes: Arc<Volumes>,
    /// Volumes this node reaches remotely (remote data: `remote_disk.rs`).
    pub remote: Arc<crate::remote_disk::RemoteVolumes>,
    /// NBD exports.
    pub exports: Arc<Exports>,
    /// VMs.
    pub vms: Vms,
    /// Bonds.
    pub bonds: crate::bonds::Bonds,
    /// Tenant network segments and security groups (issue 19).
    pub segments: crate::segments::Segments,
    /// Leases and the site's quorum: the fence deadline of HA and FT VMs.
    pub quorum: crate::quorum::Quorum,
    /// Fault-tolerant VMs under the witness's guard (`vms::ft_guard`).
    pub ft_guards: crate::vms::ft_guard::Guards,
    /// When the process started.
    pub started_at_unix_ms: u64,
    in_flight: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// File names inside the data directory.
pub mod files {
    /// The node's secret key (hex seed, mode 0600).
    pub const IDENTITY_KEY: &str = "identity.key";
    /// The node's public key (hex).
    pub const IDENTITY_PUB: &str = "identity.pub";
    /// The node's records (redb).
    pub const RECORDS: &str = "node.redb";
    /// The address the node listens on, written once bound.
    pub const LISTEN_ADDRESS: &str = "listen-address";
    /// The volume store's directory.
    pub const VOLUMES: &str = "volumes";
    /// Per-VM run directories.
    pub const VMS: &str = "vms";
}

impl Node {
    /// Opens (or initialises) a node in its data directory.
    pub fn open(config: NodeConfig, local: LocalVolumes) -> Result<Arc<Self>, NodeError> {
        let data_dir = &config.data_dir;
        std::fs::create_dir_all(data_dir).map_err(|source| NodeError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let identity = Identity::load_or_create(
            &data_dir.join(files::IDENTITY_KEY),
            &data_dir.join(files::IDENTITY_PUB),
        )?;
        let records = Arc::new(Records::open(&data_dir.join(files::RECORDS))?);
        let pushed_peers: Vec<v1::Peer> = records
            .list::<PeerRecord>()?
            .into_iter()
            .map(|(_, record)| records::wire_peer(&record.peer))
            .collect();
        let trust = Trust::load(
            data_dir,
            config.trusted_controller_keys.as_deref(),
            config.trusted_peer_keys.as_deref(),
            pushed_peers,
            NodeTarget::of(config.name.clone(), &identity),
            records.clone(),
        )?;
        let events = Arc::new(EventBus::new(&config.name));
        let signer = RequestSigner::new(identity.clone());
        let volumes = Arc::new(Volumes::open(
            &config.name,
            local,
            records.clone(),
            events.clone(),
            signer,
            trust.peer_directory(),
        )?);
        let exports = Arc::new(Exports::new(
            volumes.clone(),
            records.clone(),
            data_dir.join(crate::exports::SOCKET_DIR),
        ));
        let remote = Arc::new(crate::remote_disk::RemoteVolumes::open(
            &config.name,
            records.clone(),
            volumes.clone(),
            RequestSigner::new(identity.clone()),
            trust.peer_directory(),
        )?);
        exports.set_remote(remote.clone());
        let hypervisor = config.hypervisor.clone().unwrap_or_else(|| {
            Arc::new(crate::hypervisor::ProcessHypervisor {
                binary: crate::vms::find_vmm_binary(config.vmm_binary.as_deref()),
                own_process_group: config.vmm_own_process_group,
            })
        });
        let mut vms = Vms::open(
            hypervisor,
            data_dir.join(files::VMS),
            records.clone(),
            events.clone(),
            exports.clone(),
        )?;
        if config.sla.enforce {
            // Named by the node and its data directory: nodes of several dev clusters or
            // tests share a host and their names (lab-1), and a node prunes the VM
            // cgroups under its parent that it does not keep (CI saw one node remove
            // another's fresh VM cgroup: its VMM's spawn failed with ENODEV).
            let id = crate::cgroups::node_id(&config.name, data_dir.as_os_str());
            vms.set_cgroups(crate::cgroups::Cgroups::detect(
                &id,
                config.sla.cgroup_parent.as_deref(),
                config.sla.dedicated_cpus.as_deref(),
            ));
        } else {
            vms.set_cgroups(Err("--cgroups off".into()));
        }
        let netns = match &config.netns {
            Some(name) => network::NetNs::named_for_node(name.clone(), config.name.clone()),
            None => network::NetNs::current(config.name.clone()),
        };
        if config.network_disabled.is_none() && !netns.exists() {
            return Err(NodeError::Netns(format!(
                "network namespace `{}` does not exist (/run/netns/{0}); create it (`ip netns add {0}`) or leave out --netns",
                config.netns.as_deref().unwrap_or_default()
            )));
        }
        let bonds = crate::bonds::Bonds::open(
            netns,
            config.network_disabled.clone(),
            records.clone(),
            events.clone(),
            config
                .network
                .clone()
                .unwrap_or_else(|| Arc::new(crate::network_backend::HostNetwork)),
        )?
        .with_migration_address(
            config
                .migration_address
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        );
        let quorum = crate::quorum::Quorum::open(data_dir);
        let segments = crate::segments::Segments::open(data_dir).map_err(|error| {
            NodeError::Netns(format!("cannot read the segment definitions: {error}"))
        })?;
        Ok(Arc::new(Self {
            exports,
            quorum,
            config,
            identity,
            trust,
            records,
            events,
            volumes,
            remote,
            vms,
            bonds,
            segments,
            ft_guards: crate::vms::ft_guard::Guards::default(),
            started_at_unix_ms: now_unix_ms(),
            in_flight: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// Where a VM defined here receives a peer VMM's stream (a migration's, or a
    /// fault-tolerant primary's checkpoints), and the namespace its VMM runs in: a VM
    /// with NICs is received in the node's namespace, where its VMM runs, on the
    /// address reported as `Networking.migration_address`; any other on the node's
    /// `--migration-address`. Makes (or repairs) the VM's NIC taps first.
    async fn receive_address(
        &self,
        name: &str,
        without: &str,
    ) -> Result<(std::net::IpAddr, Option<network::NetNs>), Status> {
        let definition = self.vms.definition(name).await;
        if let Some(definition) = &definition {
            self.ensure_vm_nics(definition).await?;
        }
        let network = self
            .bonds
            .refusal()
            .is_none()
            .then(|| self.bonds.netns().clone());
        let general = self
            .config
            .migration_address
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let ip = if definition.as_ref().is_some_and(|d| !d.nics.is_empty()) && network.is_some() {
            self.bonds.nic_migration_address().await.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "node {}: VM {name} has NICs, but this node has no migration address in its network namespace (neither --migration-address nor a tenant segment's underlay address is on a device there); {without}",
                    self.config.name
                ))
            })?
        } else {
            general
        };
        Ok((ip, network))
    }

    /// The live-migration actions (`vms::migration`).
    async fn migration_action(&self, action: &Action) -> Result<ApplyResult, Status> {
        let result = match action {
            Action::PrepareIncomingVm(prepare) => {
                validate::name("prepare_incoming_vm.name", &prepare.name)?;
                let (ip, network) = self.receive_address(&prepare.name, "move it cold").await?;
                return Ok(ApplyResult::Incoming(
                    self.vms
                        .prepare_incoming(
                            &prepare.name,
                            network.as_ref(),
                            ip,
                            self.config.vm_start_timeout,
                        )
                        .await?,
                ));
            }
            Action::MigrateVm(migrate) => {
                validate::name("migrate_vm.name", &migrate.name)?;
                validate::address("migrate_vm.to", &migrate.to)?;
                let timeout = max_wait(migrate.timeout_ms, "migrate_vm.timeout_ms")?;
                let downtime = if migrate.max_downtime_ms == 0 {
                    50
                } else {
                    u64::from(migrate.max_downtime_ms)
                };
                self.vms
                    .migrate(
                        &migrate.name,
                        &migrate.to,
                        downtime,
                        migrate.stop_and_copy,
                        timeout,
                    )
                    .await?
            }
            Action::CommitMigration(commit) => {
                validate::name("commit_migration.name", &commit.name)?;
                self.vms
                    .commit_migration(&commit.name, self.config.vm_start_timeout)
                    .await?
            }
            Action::AbortMigration(abort) => {
                validate::name("abort_migration.name", &abort.name)?;
                self.vms.abort_migration(&abort.name).await?
            }
            _ => return Err(Status::internal("not a migration action")),
        };
        Ok(ApplyResult::Migration(result))
    }

    /// Puts a fault-tolerant VM under the witness's guard, or (no witness) ends its
    /// guard.
    async fn guard_ft(&self, name: &str, witness: &str, lease_ms: u64) {
        if witness.is_empty() {
            crate::vms::ft_guard::release(self, name).await;
        } else {
            self.ft_guards.set(name, witness, lease_ms);
        }
    }

    /// The fault-tolerance actions (`vms::ft`).
    async fn ft_action(&self, action: &Action) -> Result<ApplyResult, Status> {
        let result = match action {
            Action::PrepareFtSecondary(prepare) => {
                validate::name("prepare_ft_secondary.name", &prepare.name)?;
                let (ip, network) = self
                    .receive_address(
                        &prepare.name,
                        "its secondary cannot receive checkpoints here",
                    )
                    .await?;
                let lease = witness_of(
                    "prepare_ft_secondary",
                    &prepare.witness,
                    prepare.witness_lease_ms,
                )?;
                let prepared = self
                    .vms
                    .prepare_ft_secondary(
                        &prepare.name,
                        network.as_ref(),
                        ip,
                        self.config.vm_start_timeout,
                    )
                    .await?;
                self.guard_ft(&prepare.name, &prepare.witness, lease).await;
                prepared
            }
            Action::StartFt(start) => {
                validate::name("start_ft.name", &start.name)?;
                validate::address("start_ft.to", &start.to)?;
                if start.epoch_ms > 10_000 {
                    return Err(validate::invalid(
                        "start_ft.epoch_ms",
                        format!(
                            "{} is more than 10000 (10 s); an epoch is 1 to 10000 ms, 0 for the default 30",
                            start.epoch_ms
                        ),
                    ));
                }
                let epoch_ms = if start.epoch_ms == 0 {
                    vmm::ft::DEFAULT_EPOCH_MS
                } else {
                    u64::from(start.epoch_ms)
                };
                let timeout = max_wait(start.timeout_ms, "start_ft.timeout_ms")?;
                let lease = witness_of("start_ft", &start.witness, start.witness_lease_ms)?;
                let started = self
                    .vms
                    .start_ft(&start.name, &start.to, epoch_ms, start.sync_disks, timeout)
                    .await?;
                self.guard_ft(&start.name, &start.witness, lease).await;
                started
            }
            Action::PromoteFt(promote) => {
                validate::name("promote_ft.name", &promote.name)?;
                crate::vms::ft_guard::release(self, &promote.name).await;
                self.vms
                    .promote_ft(&promote.name, self.config.vm_start_timeout)
                    .await?
            }
            Action::StopFt(stop) => {
                validate::name("stop_ft.name", &stop.name)?;
                crate::vms::ft_guard::release(self, &stop.name).await;
                self.vms.stop_ft(&stop.name).await?
            }
            _ => return Err(Status::internal("not a fault-tolerance action")),
        };
        Ok(ApplyResult::Ft(result))
    }

    /// Makes (or repairs) a VM's NIC taps, unless network actions are refused here
    /// (then Observe reports the NICs as not made, with the reason).
    async fn ensure_vm_nics(&self, definition: &v1::CreateVm) -> Result<(), Status> {
        if definition.nics.is_empty() || self.bonds.refusal().is_some() {
            return Ok(());
        }
        let netns = self.bonds.netns().clone();
        let definition = definition.clone();
        let network = self.bonds.network();
        tokio::task::spawn_blocking(move || {
            network.ensure_vm_nics(
                &netns,
                &definition.name,
                &definition.tenant,
                &definition.nics,
            )
        })
        .await
        .map_err(|error| Status::internal(error.to_string()))?
    }

    /// Whether segments are made here: not where network actions are refused, and
    /// never by a simulated network (`--simulate` keeps the definitions only).
    fn segments_refusal(&self) -> Option<String> {
        if let Some(reason) = self.bonds.refusal() {
            return Some(reason);
        }
        (!self.bonds.network().is_host())
            .then(|| "the node's network is simulated: segments are kept, not made".to_owned())
    }

    /// Converges a tenant network segment, the tenant's router rules and the node's
    /// security groups; keeps the definition once it is made.
    async fn apply_segment(&self, segment: &v1::ApplyNetworkSegment) -> Result<(), Status> {
        // Every field is checked before anything else (an MTU of 0 is resolved
        // against the real underlay later).
        crate::segments::segment_spec(segment, Some(1500))?;
        crate::segments::underlay_request(segment)?;
        let _changing = self.segments.changing().await;
        if let Some(reason) = self.segments_refusal() {
            if self.bonds.refusal().is_some() {
                return Err(Status::failed_precondition(format!(
                    "node {}: network actions are refused here: {reason}",
                    self.config.name
                )));
            }
            return self
                .segments
                .put(segment)
                .await
                .map_err(crate::segments::internal);
        }
        let mut all: Vec<v1::ApplyNetworkSegment> = self
            .segments
            .all()
            .await
            .into_iter()
            .filter(|s| (&s.tenant, &s.network) != (&segment.tenant, &segment.network))
            .collect();
        all.push(segment.clone());
        let definitions = self.vms.definitions().await;
        let netns = self.bonds.netns().clone();
        let wanted = segment.clone();
        let dhcp_dir = self.segments.dhcp_dir();
        tokio::task::spawn_blocking(move || {
            crate::segments::apply_blocking(&netns, &dhcp_dir, &wanted, &all, &definitions)
        })
        .await
        .map_err(crate::segments::internal)??;
        self.segments
            .put(segment)
            .await
            .map_err(crate::segments::internal)
    }

    async fn delete_segment(&self, delete: &v1::DeleteNetworkSegment) -> Result<(), Status> {
        validate::name("delete_network_segment.tenant", &delete.tenant)?;
        validate::name("delete_network_segment.network", &delete.network)?;
        let _changing = self.segments.changing().await;
        self.segments
            .remove(&delete.tenant, &delete.network)
            .await
            .map_err(crate::segments::internal)?;
        if self.segments_refusal().is_some() {
            return Ok(());
        }
        let remaining = self.segments.all().await;
        let definitions = self.vms.definitions().await;
        let netns = self.bonds.netns().clone();
        let (tenant, network) = (delete.tenant.clone(), delete.network.clone());
        let dhcp_dir = self.segments.dhcp_dir();
        tokio::task::spawn_blocking(move || {
            crate::segments::remove_blocking(
                &netns,
                &dhcp_dir,
                &tenant,
                &network,
                &remaining,
                &definitions,
            )
        })
        .await
        .map_err(crate::segments::internal)?
        .map_err(|error| Status::failed_precondition(error.to_string()))
    }

    /// Converges the tenant routers' rules and the node's security groups (after a
    /// VM is defined or deleted: its NICs join or leave them).
    async fn program_segments(&self) -> Result<(), Status> {
        if self.segments_refusal().is_some() {
            return Ok(());
        }
        let _changing = self.segments.changing().await;
        let all = self.segments.all().await;
        if all.is_empty() {
            return Ok(());
        }
        let definitions = self.vms.definitions().await;
        let netns = self.bonds.netns().clone();
        let dhcp_dir = self.segments.dhcp_dir();
        tokio::task::spawn_blocking(move || {
            crate::segments::program_blocking(&netns, &dhcp_dir, &all, &definitions)
        })
        .await
        .map_err(crate::segments::internal)?
        .map(|_| ())
        .map_err(|error| Status::failed_precondition(error.to_string()))
    }

    /// Every segment as read back, and the node's security-group drift (Observe).
    pub async fn segment_statuses(
        &self,
        definitions: &std::collections::BTreeMap<String, v1::CreateVm>,
    ) -> (Vec<v1::NetworkSegmentStatus>, Vec<String>) {
        let all = self.segments.all().await;
        if self.bonds.refusal().is_none() && !self.bonds.network().is_host() {
            // A simulated network made each kept segment as defined.
            return (crate::simulate::segment_statuses(&all), Vec::new());
        }
        if let Some(reason) = self.segments_refusal() {
            let statuses = all
                .iter()
                .map(|s| v1::NetworkSegmentStatus {
                    tenant: s.tenant.clone(),
                    network: s.network.clone(),
                    vni: s.vni,
                    definition_digest: crate::segments::definition_digest(s),
                    drift: vec![format!("not made: {reason}")],
                    ..Default::default()
                })
                .collect();
            return (statuses, Vec::new());
        }
        if all.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let definitions = definitions.clone();
        let netns = self.bonds.netns().clone();
        let dhcp_dir = self.segments.dhcp_dir();
        tokio::task::spawn_blocking(move || {
            crate::segments::statuses_blocking(&netns, &dhcp_dir, &all, &definitions)
        })
        .await
        .unwrap_or_else(|error| {
            (
                Vec::new(),
                vec![format!("cannot read the segments: {error}")],
            )
        })
    }

    /// Drops request-id records older than the retention period.
    pub fn prune_requests(&self) -> Result<u64, records::RecordsError> {
        let retention_ms = self.config.request_retention.as_millis() as u64;
        self.records
            .prune_requests(now_unix_ms().saturating_sub(retention_ms))
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Carries out an `ApplyRequest` at most once per request id. `signed` is the
    /// controller's verified signature of it: a primary forwards it to its replicas as
    /// its authority to create or delete them.
    ///
    /// Callers that can be cancelled (a gRPC handler whose client goes away) run this
    /// in a task of its own: once an action started it must be finished and recorded,
    /// or a retry would carry it out a second time.
    pub async fn apply(
        &self,
        request: ApplyRequest,
        signed: Envelope,
    ) -> Result<ApplyResponse, Status> {
        validate::request_id(&request.request_id)?;
        let Some(action) = request.action.as_ref() else {
            return Err(validate::invalid(
                "apply_request.action",
                "must be set to one action",
            ));
        };
        let digest = Sha256::digest(prost::Message::encode_to_vec(&request)).to_vec();

        // One request id is handled by one task at a time, so a retry racing the
        // original waits for its outcome instead of doing the action twice.
        let lock = {
            let mut in_flight = self.in_flight.lock().await;
            in_flight
                .entry(request.request_id.clone())
                .or_default()
                .clone()
        };
        let _guard = lock.lock().await;
        let result = self.apply_once(&request, action, digest, &signed).await;
        {
            let mut in_flight = self.in_flight.lock().await;
            if Arc::strong_count(&lock) <= 2 {
                in_flight.remove(&request.request_id);
            }
        }
        let action_name = proto::action_name(action);
        match &result {
            Ok(response) if !response.replayed => {
                self.events
                    .publish(v1::watch_event::Event::Action(v1::ActionEvent {
                        request_id: request.request_id.clone(),
                        action: action_name.to_string(),
                        ok: true,
                        error: String::new(),
                    }));
            }
            Ok(_) => {}
            Err(status) => {
                self.events
                    .publish(v1::watch_event::Event::Action(v1::ActionEvent {
                        request_id: request.request_id.clone(),
                        action: action_name.to_string(),
                        ok: false,
                        error: status.message().to_string(),
                    }));
            }
        }
        result
    }

    /// Carries out the requests of an `ApplyBatch` (checked by
    /// [`crate::validate::apply_batch`]) concurrently, each as [`Node::apply`] does
    /// alone, and answers each in order with its response or its status.
    pub async fn apply_batch(
        &self,
        requests: Vec<ApplyRequest>,
        signed: Envelope,
    ) -> Vec<v1::ApplyBatchResult> {
        let runs = requests.into_iter().map(|request| {
            let signed = signed.clone();
            async move {
                let request_id = request.request_id.clone();
                let outcome = match self.apply(request, signed).await {
                    Ok(response) => v1::apply_batch_result::Outcome::Response(response),
                    Err(status) => v1::apply_batch_result::Outcome::Error(v1::ApplyError {
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                    }),
                };
                v1::ApplyBatchResult {
                    request_id,
                    outcome: Some(outcome),
                }
            }
        });
        futures_util::future::join_all(runs).await
    }

    /// What became of `request_id`, from the durable request log: SUCCEEDED with the
    /// recorded response (`replayed = true`) or NOT_FOUND (never carried out, failed, or
    /// pruned). While an Apply of this request id is being carried out it waits for that
    /// to finish first (it takes the same per-request-id lock). Never carries anything out.
    pub async fn outcome(&self, request_id: &str) -> Result<v1::GetOutcomeResponse, Status> {
        validate::request_id_field("get_outcome_request.request_id", request_id)?;
        let running = self.in_flight.lock().await.get(request_id).cloned();
        if let Some(lock) = running {
            drop(lock.lock().await);
            let mut in_flight = self.in_flight.lock().await;
            if Arc::strong_count(&lock) <= 2 {
                in_flight.remove(request_id);
            }
        }
        let records = self.records.clone();
        let owned = request_id.to_string();
        let record = tokio::task::spawn_blocking(move || records.request(&owned))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| Status::internal(error.to_string()))?;
        let Some(record) = record else {
            return Ok(v1::GetOutcomeResponse {
                request_id: request_id.to_string(),
                outcome: v1::Outcome::NotFound as i32,
                response: None,
            });
        };
        let mut response: ApplyResponse = prost::Message::decode(record.response.as_slice())
            .map_err(|error| Status::internal(format!("recorded response is corrupt: {error}")))?;
        response.replayed = true;
        Ok(v1::GetOutcomeResponse {
            request_id: request_id.to_string(),
            outcome: v1::Outcome::Succeeded as i32,
            response: Some(response),
        })
    }

    async fn apply_once(
        &self,
        request: &ApplyRequest,
        action: &Action,
        digest: Vec<u8>,
        signed: &Envelope,
    ) -> Result<ApplyResponse, Status> {
        let records = self.records.clone();
        let request_id = request.request_id.clone();
        let existing = tokio::task::spawn_blocking(move || records.request(&request_id))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| Status::internal(error.to_string()))?;
        if let Some(record) = existing {
            if record.action_digest != digest {
                return Err(Status::already_exists(format!(
                    "request id `{}` was already used for a different action on this node; use a new request id",
                    request.request_id
                )));
            }
            let mut response: ApplyResponse = prost::Message::decode(record.response.as_slice())
                .map_err(|error| {
                    Status::internal(format!("recorded response is corrupt: {error}"))
                })?;
            response.replayed = true;
            return Ok(response);
        }

        let result = self.carry_out(request, action, signed).await?;
        let response = ApplyResponse {
            request_id: request.request_id.clone(),
            replayed: false,
            applied_at_unix_ms: now_unix_ms(),
            result: Some(result),
        };
        // Only successes are recorded: a failed action changed nothing a retry cannot
        // finish (every action is idempotent), so a retry after a failure runs again.
        let record = RequestRecord::new(
            digest,
            prost::Message::encode_to_vec(&response),
            now_unix_ms(),
        );
        let records = self.records.clone();
        let request_id = request.request_id.clone();
        tokio::task::spawn_blocking(move || records.put_request(&request_id, &record))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| Status::internal(format!("action done but not recorded: {error}")))?;
        Ok(response)
    }

    async fn carry_out(
        &self,
        request: &ApplyRequest,
        action: &Action,
        signed: &Envelope,
    ) -> Result<ApplyResult, Status> {
        match action {
            Action::ResizeVolume(resize) => {
                validate::name("resize_volume.name", &resize.name)?;
                validate::volume_size("resize_volume.size_bytes", resize.size_bytes)?;
                let record = self
                    .volumes
                    .resize(
                        &resize.name,
                        resize.size_bytes,
                        signed.to_grant(request.clone()),
                    )
                    .await?;
                Ok(ApplyResult::Volume(crate::volumes::volume_result(record)))
            }
            Action::CreateVolume(create) => {
                validate::name("create_volume.name", &create.name)?;
                validate::volume_geometry(
                    "create_volume",
                    create.size_bytes,
                    create.stripe_width,
                    create.stripe_unit_bytes,
                )?;
                let peers = self.resolve_replica_peers(&create.replica_peers)?;
                let record = self
                    .volumes
                    .create_primary(create, peers, signed.to_grant(request.clone()))
                    .await?;
                Ok(ApplyResult::Volume(crate::volumes::volume_result(record)))
            }
            Action::AddVolumeCopy(_) | Action::RemoveVolumeCopy(_) => {
                self.volumes
                    .apply_copy_action(action, signed.to_grant(request.clone()))
                    .await
            }
            Action::SnapshotVolume(_) | Action::DeleteSnapshot(_) | Action::CloneVolume(_) => {
                self.volumes
                    .apply_snapshot_action(action, signed.to_grant(request.clone()))
                    .await
            }
            Action::SetProtection(set) => {
                self.volumes.set_protection(set).await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::ReplicateVolume(set) => Ok(match self.volumes.replicate_volume(set).await? {
                Some(result) => ApplyResult::Replication(result),
                None => ApplyResult::Done(v1::Done {}),
            }),
            Action::AcceptReplication(set) => {
                self.volumes.accept_replication(set).await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::ImportImage(import) => {
                crate::import::import(&self.volumes, &self.exports, import).await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::SetVolumeEpoch(set) => {
                if self.volumes.exists(&set.name).await {
                    self.volumes.set_epoch(set).await?;
                } else {
                    // No copy here: a client's epoch (remote data, `remote_disk.rs`).
                    self.remote.set_epoch(set).await?;
                }
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::DeleteVolume(delete) => {
                validate::name("delete_volume.name", &delete.name)?;
                self.volumes
                    .refuse_delete_with_snapshots(&delete.name)
                    .await?;
                self.exports.unexport(&delete.name).await?;
                self.volumes
                    .delete(&delete.name, signed.to_grant(request.clone()))
                    .await?;
                self.remote.forget(&delete.name).await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::WriteVolume(write) => {
                validate::name("write_volume.name", &write.name)?;
                if write.data.is_empty() {
                    return Err(validate::invalid("write_volume.data", "must not be empty"));
                }
                let ack = self
                    .volumes
                    .write(&write.name, write.offset, write.data.clone())
                    .await?;
                Ok(ApplyResult::WriteVolume(v1::WriteVolumeResult {
                    bytes_written: write.data.len() as u64,
                    copies: ack.copies,
                }))
            }
            Action::ExportVolume(export) => {
                validate::name("export_volume.name", &export.name)?;
                if export.lifetime_seconds > crate::exports::MAX_LIFETIME_SECONDS {
                    return Err(validate::invalid(
                        "export_volume.lifetime_seconds",
                        format!(
                            "is {}, at most {} (a year) allowed; 0 means no lifetime",
                            export.lifetime_seconds,
                            crate::exports::MAX_LIFETIME_SECONDS
                        ),
                    ));
                }
                let lifetime = (export.lifetime_seconds > 0)
                    .then(|| std::time::Duration::from_secs(export.lifetime_seconds));
                let info = self
                    .exports
                    .export(&export.name, lifetime, export.read_only)
                    .await?;
                Ok(ApplyResult::ExportVolume(v1::ExportVolumeResult {
                    uri: info.uri,
                    socket_path: info.socket_path.display().to_string(),
                    expires_at_unix_ms: info.expires_at_unix_ms,
                    read_only: info.read_only,
                }))
            }
            Action::UnexportVolume(unexport) => {
                validate::name("unexport_volume.name", &unexport.name)?;
                self.exports.unexport(&unexport.name).await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::CreateVm(create) => {
                validate_create_vm(create)?;
                validate::image_files(create, &self.config.name)?;
                crate::vm_nics::validate(create)?;
                for (index, volume) in create.volumes.iter().enumerate() {
                    if !self.remote.knows(volume) && !self.volumes.exists(volume).await {
                        return Err(validate::invalid(
                            &format!("create_vm.volumes[{index}]"),
                            format!(
                                "volume `{volume}` does not exist on this node (no copy, and no epoch of it names this node a client)"
                            ),
                        ));
                    }
                }
                let existing = self.vms.definition(&create.name).await;
                if existing.as_ref().is_none_or(|d| d == create) {
                    // NICs first (a new VM) or again (the same definition: repairs a
                    // tap deleted behind the node's back); never for a VM defined
                    // otherwise, whose taps are in use.
                    self.ensure_vm_nics(create).await?;
                }
                let created = self.vms.create(create.clone()).await?;
                // A NIC that lists security groups is filtered from its first frame.
                self.program_segments().await?;
                Ok(ApplyResult::Vm(created))
            }
            Action::StartVm(start) => {
                validate::name("start_vm.name", &start.name)?;
                if let Some(definition) = self.vms.definition(&start.name).await {
                    self.ensure_vm_nics(&definition).await?;
                }
                let network = self
                    .bonds
                    .refusal()
                    .is_none()
                    .then(|| self.bonds.netns().clone());
                Ok(ApplyResult::Vm(
                    self.vms
                        .start(&start.name, network.as_ref(), self.config.vm_start_timeout)
                        .await?,
                ))
            }
            Action::PrepareIncomingVm(_)
            | Action::MigrateVm(_)
            | Action::CommitMigration(_)
            | Action::AbortMigration(_) => self.migration_action(action).await,
            Action::PrepareFtSecondary(_)
            | Action::StartFt(_)
            | Action::PromoteFt(_)
            | Action::StopFt(_) => self.ft_action(action).await,
            Action::StopVm(stop) => {
                validate::name("stop_vm.name", &stop.name)?;
                if stop.grace_ms > 600_000 {
                    return Err(validate::invalid(
                        "stop_vm.grace_ms",
                        format!("{} is more than 600000 (10 minutes)", stop.grace_ms),
                    ));
                }
                let grace = if stop.grace_ms == 0 {
                    5000
                } else {
                    stop.grace_ms
                };
                Ok(ApplyResult::Vm(
                    self.vms
                        .stop(&stop.name, Duration::from_millis(u64::from(grace)))
                        .await?,
                ))
            }
            Action::RebootVm(reboot) => Ok(ApplyResult::Vm(
                crate::operate::reboot(&self.vms, reboot).await?,
            )),
            Action::DeleteVm(delete) => {
                validate::name("delete_vm.name", &delete.name)?;
                let nics = self
                    .vms
                    .definition(&delete.name)
                    .await
                    .map_or(0, |d| d.nics.len());
                self.vms.delete(&delete.name).await?;
                if nics > 0 && self.bonds.refusal().is_none() {
                    let netns = self.bonds.netns().clone();
                    let name = delete.name.clone();
                    let network = self.bonds.network();
                    tokio::task::spawn_blocking(move || {
                        network.remove_vm_nics(&netns, &name, nics)
                    })
                    .await
                    .map_err(|error| Status::internal(error.to_string()))?;
                    self.program_segments().await?;
                }
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::ApplyNetworkSegment(segment) => {
                self.apply_segment(segment).await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::DeleteNetworkSegment(delete) => {
                self.delete_segment(delete).await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::ApplyBond(bond) => Ok(ApplyResult::Bond(self.bonds.apply(bond).await?)),
            Action::DeleteBond(delete) => {
                self.bonds.delete(&delete.name).await?;
                Ok(ApplyResult::Done(v1::Done {}))
            }
            Action::SetPeers(set) => {
                let mut peers: Vec<(String, PeerRecord)> = Vec::with_capacity(set.peers.len());
                for (index, peer) in set.peers.iter().enumerate() {
                    validate::name(&format!("set_peers.peers[{index}].name"), &peer.name)?;
                    validate::address(&format!("set_peers.peers[{index}].address"), &peer.address)?;
                    proto::auth::parse_public_key(&peer.public_key_hex).map_err(|error| {
                        validate::invalid(
                            &format!("set_peers.peers[{index}].public_key_hex"),
                            error,
                        )
                    })?;
                    if peers.iter().any(|(name, _)| name == &peer.name) {
                        return Err(validate::invalid(
                            &format!("set_peers.peers[{index}].name"),
                            format!("peer `{}` is listed twice", peer.name),
                        ));
                    }
                    peers.push((peer.name.clone(), records::peer_record(peer)));
                }
                self.records
                    .replace_all(&peers)
                    .map_err(|error| Status::internal(error.to_string()))?;
                self.trust.set_pushed_peers(set.peers.clone());
                Ok(ApplyResult::Done(v1::Done {}))
            }
        }
    }

    /// Fills in peer addresses and keys from the pushed peer set and validates them.
    /// A key the controller put in the request wins; one it left empty is taken from
    /// the peer set it pushed, or stays empty (then that replica is recognised by name
    /// through the peer set later, and cannot read from this copy until it is there).
    fn resolve_replica_peers(&self, peers: &[v1::Peer]) -> Result<Vec<v1::Peer>, Status> {
        let mut resolved: Vec<v1::Peer> = Vec::with_capacity(peers.len());
        for (index, peer) in peers.iter().enumerate() {
            let field = format!("create_volume.replica_peers[{index}]");
            validate::name(&format!("{field}.name"), &peer.name)?;
            if peer.name == self.config.name {
                return Err(validate::invalid(
                    &format!("{field}.name"),
                    format!(
                        "`{}` is this node; a replica must live on another node",
                        peer.name
                    ),
                ));
            }
            if resolved.iter().any(|other| other.name == peer.name) {
                return Err(validate::invalid(
                    &format!("{field}.name"),
                    format!("peer `{}` is listed twice", peer.name),
                ));
            }
            let mut peer = peer.clone();
            let known = self.trust.peer_by_name(&peer.name);
            if peer.address.is_empty() {
                let Some(known) = &known else {
                    return Err(validate::invalid(
                        &format!("{field}.address"),
                        format!(
                            "is empty and `{}` is not in this node's peer set (SetPeers)",
                            peer.name
                        ),
                    ));
                };
                peer.address = known.address.clone();
            }
            validate::address(&format!("{field}.address"), &peer.address)?;
            if peer.public_key_hex.is_empty() {
                peer.public_key_hex = known.map(|known| known.public_key_hex).unwrap_or_default();
            }
            if !peer.public_key_hex.is_empty() {
                // One spelling (lower case), so a retry compares equal.
                peer.public_key_hex = NodeTarget::new(&peer.name, &peer.public_key_hex)
                    .map_err(|error| {
                        validate::invalid(&format!("{field}.public_key_hex"), error.to_string())
                    })?
                    .public_key_hex;
            }
            resolved.push(peer);
        }
        Ok(resolved)
    }
}

/// The witness lease of a fault-tolerance action naming `witness` (0 = the default;
/// at most 10 s), with the witness's address checked.
fn witness_of(action: &str, witness: &str, lease_ms: u32) -> Result<u64, Status> {
    if !witness.is_empty() {
        validate::address(&format!("{action}.witness"), witness)?;
    }
    if lease_ms > 10_000 {
        return Err(validate::invalid(
            &format!("{action}.witness_lease_ms"),
            format!("{lease_ms} is more than 10000 (10 s); 0 for the default 1000"),
        ));
    }
    Ok(u64::from(lease_ms))
}

/// A wait of a live-migration or fault-tolerance action: `ms` (0 = the most), at most
/// [`crate::vms::migration::MAX_WAIT_MS`] (within the node API's 30 s call timeout).
fn max_wait(ms: u32, field: &str) -> Result<Duration, Status> {
    let most = crate::vms::migration::MAX_WAIT_MS;
    if ms > most {
        return Err(validate::invalid(
            field,
            format!("{ms} is more than {most} (the node API's calls time out at 30 s)"),
        ));
    }
    Ok(Duration::from_millis(u64::from(if ms == 0 {
        most
    } else {
        ms
    })))
}

fn validate_create_vm(create: &v1::CreateVm) -> Result<(), Status> {
    validate::name("create_vm.name", &create.name)?;
    validate::vm_resources(create)?;
    match &create.image {
        None => Err(validate::invalid(
            "create_vm.image",
            "must be set: `builtin` or `kernel`",
        )),
        Some(v1::create_vm::Image::Builtin(builtin)) if builtin != "cairn-guest" => {
            Err(validate::invalid(
                "create_vm.builtin",
                format!("`{builtin}` is not a built-in image; the only one is `cairn-guest`"),
            ))
        }
        Some(v1::create_vm::Image::Kernel(kernel)) if !kernel.kernel_path.starts_with('/') => {
            Err(validate::invalid(
                "create_vm.kernel.kernel_path",
                format!(
                    "`{}` must be an absolute path on the node",
                    kernel.kernel_path
                ),
            ))
        }
        Some(_) => Ok(()),
    }
}
