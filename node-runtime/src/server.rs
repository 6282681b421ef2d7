//! Starting and stopping the gRPC server.

use std::net::SocketAddr;
use std::time::Duration;

use proto::client::MAX_MESSAGE_BYTES;
use proto::v1;
use tonic::transport::Server;

use crate::local_volumes::{DiskLayout, LocalVolumes};
use crate::node::{Node, NodeConfig, files};
use crate::service::NodeService;

/// Errors of running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The node could not be opened.
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reflection could not be built from the descriptor set.
    #[error("grpc reflection: {0}")]
    Reflection(String),
    /// The server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The watchdog device given cannot be opened.
    #[error("cannot open the watchdog device {path} (--watchdog): {source}")]
    Watchdog {
        /// The device.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file in the data directory could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Opens the node in its data directory, listens on `listen` and serves until
/// `shutdown` completes (SIGTERM/SIGINT in the binary). On return every connection
/// is closed; VM processes keep running for the next agent to adopt (killed only with
/// `stop_vms_on_exit`), and the watchdog, if armed, is disarmed.
pub async fn run(
    config: NodeConfig,
    disks: DiskLayout,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_on(config, disks, Listen::Tcp(listen), shutdown).await
}

/// Where a node's services answer.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A port of its own (every real node).
    Tcp(SocketAddr),
    /// A port shared with other simulated nodes (`cairn-node --simulate --one-port`):
    /// the services are registered under the node's name on `port` while the node
    /// runs, and calls naming it in metadata reach them.
    Shared {
        /// The port's address (what the node reports as its listen address).
        address: SocketAddr,
        /// The routing table of that port.
        port: std::sync::Arc<crate::simulate::SharedPort>,
    },
}

impl Listen {
    fn address(&self) -> SocketAddr {
        match self {
            Listen::Tcp(address) | Listen::Shared { address, .. } => *address,
        }
    }
}

/// [`run`] on a port of its own or a shared one: the same node, services and
/// background loops either way.
pub async fn run_on(
    config: NodeConfig,
    disks: DiskLayout,
    on: Listen,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let listen = on.address();
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::Write {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let volumes_dir = config.data_dir.join(files::VOLUMES);
    let local = tokio::task::spawn_blocking(move || LocalVolumes::open(&volumes_dir, disks))
        .await
        .map_err(|error| crate::node::NodeError::VolumeStore(error.to_string()))?
        .map_err(|error| crate::node::NodeError::VolumeStore(error.to_string()))?;
    let node = Node::open(config, local)?;
    let converted = node.records.converted_on_open();
    if converted > 0 {
        println!(
            "cairn-node {}: converted {converted} record(s) of {} from the previous format to format {}",
            node.config.name,
            files::RECORDS,
            crate::records::FORMAT,
        );
    }
    // The lease is renewed from the start, before the slower steps below: the fences of
    // VMMs that outlived the previous agent count down from its last push, and each is
    // pushed the quorum's end as soon as it is adopted (`quorum::run`), whatever the
    // other VMMs' handshakes take.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let leases = node
        .config
        .lease
        .clone()
        .map(|lease| AbortOnDrop(tokio::spawn(crate::quorum::run(node.clone(), lease))));
    // Expired request records go before the first request can look one up.
    let pruned = node.clone();
    tokio::task::spawn_blocking(move || pruned.prune_requests())
        .await
        .map_err(|error| crate::node::NodeError::VolumeStore(error.to_string()))?
        .map_err(crate::node::NodeError::Records)?;
    // NBD exports kept from before the restart are served again before the node
    // answers (a client of such an export reconnects to the same URI).
    for problem in node.exports.restore().await {
        eprintln!("cairn-node {}: {problem}", node.config.name);
    }

    // VMMs that outlived the previous agent are adopted (or reported, saying why)
    // before the node answers, all at once: their disks are served again, their fences
    // renewed as each is adopted.
    for line in node.vms.adopt_all().await {
        println!("cairn-node {}: {line}", node.config.name);
    }
    // How SLA classes are enforced here (cgroup v1 or v2, where), or why not.
    println!(
        "cairn-node {}: {}",
        node.config.name,
        node.vms.cgroup_summary().1
    );
    for line in node.vms.prune_cgroups().await {
        println!("cairn-node {}: {line}", node.config.name);
    }
    for line in node.vms.remove_stale_cgroup_parents(&node.config.name) {
        println!("cairn-node {}: {line}", node.config.name);
    }
    let below = node.config.sla.preempt_below_available;
    if below > 0 {
        println!(
            "cairn-node {}: spot VMs are preempted while less than {} MiB of memory is available",
            node.config.name,
            below >> 20
        );
        tokio::spawn(crate::vms::sla::preemption_loop(node.clone(), below));
    }
    let above = node.config.sla.preempt_above_cpu_pressure;
    if above > 0 {
        println!(
            "cairn-node {}: busy spot VMs are preempted while some task waits for a CPU more than {above}% of a 1 s window ({})",
            node.config.name,
            crate::vms::sla::CpuPressureSource::detect().name()
        );
        tokio::spawn(crate::vms::sla::cpu_preemption_loop(node.clone(), above));
    }
    if let Some(listen) = node.config.sla.metrics_listen {
        let bound = crate::metrics::serve(node.clone(), listen)
            .await
            .map_err(|source| ServerError::Bind {
                address: listen.to_string(),
                source,
            })?;
        let _ = std::fs::write(
            node.data_dir().join("metrics-address"),
            format!("{bound}\n"),
        );
        println!(
            "cairn-node {}: /metrics on http://{bound}/metrics",
            node.config.name
        );
    }

    enum Serving {
        Own(tokio::net::TcpListener),
        Shared(std::sync::Arc<crate::simulate::SharedPort>),
    }
    let (serving, local) = match on {
        Listen::Tcp(_) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|source| ServerError::Bind {
                    address: listen.to_string(),
                    source,
                })?;
            let local = listener.local_addr().map_err(|source| ServerError::Bind {
                address: listen.to_string(),
                source,
            })?;
            (Serving::Own(listener), local)
        }
        Listen::Shared { address, port } => (Serving::Shared(port), address),
    };
    let address_file = node.data_dir().join(files::LISTEN_ADDRESS);
    std::fs::write(&address_file, format!("{local}\n")).map_err(|source| ServerError::Write {
        path: address_file.display().to_string(),
        source,
    })?;

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| ServerError::Reflection(error.to_string()))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|error| ServerError::Reflection(error.to_string()))?;

    // The standard gRPC health service (grpc.health.v1) that load balancers and
    // probes ask: the whole server and each cairn service report SERVING while
    // the node serves, NOT_SERVING once it shuts down. Unauthenticated, read-only.
    let (health, health_service) = tonic_health::server::health_reporter();
    for service in HEALTH_SERVICES {
        health
            .set_service_status(*service, tonic_health::ServingStatus::Serving)
            .await;
    }
    let (shutdown_sender, shutdown_receiver) = tokio::sync::watch::channel(false);
    let service = NodeService::new(node.clone(), shutdown_receiver);
    let resync = tokio::spawn(node.volumes.clone().resync_loop(Duration::from_secs(1)));
    let protection = tokio::spawn(
        node.volumes
            .clone()
            .protection_loop(Duration::from_millis(250)),
    );
    let replication = tokio::spawn(
        node.volumes
            .clone()
            .replication_loop(Duration::from_millis(250)),
    );
    // Fault-tolerant VMs under the witness's guard; claims leave from the listen address.
    let ft_guard = tokio::spawn(crate::vms::ft_guard::run(
        node.clone(),
        Some(listen.ip()).filter(|ip| !ip.is_unspecified()),
    ));
    let (watchdog_stop, watchdog_stopped) = tokio::sync::watch::channel(false);
    let watchdog = match &node.config.watchdog {
        None => None,
        Some(path) => {
            let device = crate::watchdog::DeviceWatchdog::open(path).map_err(|source| {
                ServerError::Watchdog {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            let quorum = node.clone();
            Some(tokio::spawn(crate::watchdog::run(
                Box::new(device),
                move || quorum.quorum.view().holds_until_ns,
                crate::watchdog::PET_EVERY,
                watchdog_stopped,
            )))
        }
    };
    let pruning = {
        let node = node.clone();
        tokio::spawn(async move {
            let hour = Duration::from_secs(3600);
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + hour, hour);
            loop {
                ticker.tick().await;
                let node = node.clone();
                let _ = tokio::task::spawn_blocking(move || node.prune_requests()).await;
            }
        })
    };

    println!(
        "cairn-node {} listening on {local} (data dir {}, public key {}, {} trusted controller key(s) from {})",
        node.config.name,
        node.data_dir().display(),
        node.identity.public_key_hex(),
        node.trust.controller_count(),
        node.trust.controllers_source(),
    );

    let signal = {
        let health = health.clone();
        async move {
            shutdown.await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            for service in HEALTH_SERVICES {
                health
                    .set_service_status(*service, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            let _ = shutdown_sender.send(true);
        }
    };
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(v1::inventory_server::InventoryServer::new(service.clone()))
        .add_service(v1::observe_server::ObserveServer::new(service.clone()))
        .add_service(
            v1::apply_server::ApplyServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(v1::watch_server::WatchServer::new(service.clone()))
        .add_service(v1::quorum_server::QuorumServer::new(service.clone()))
        .add_service(v1::controller_trust_server::ControllerTrustServer::new(
            service.clone(),
        ))
        .add_service(
            v1::replication_server::ReplicationServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .prepare();
    let faults = crate::simulate::FaultLayer(node.config.faults.clone());
    let result = match serving {
        Serving::Own(listener) => {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            Server::builder()
                .layer(faults)
                .serve_with_incoming_shutdown(routes, incoming, signal)
                .await
        }
        Serving::Shared(port) => {
            let name = node.config.name.clone();
            port.register(&name, tower_layer::Layer::layer(&faults, routes));
            signal.await;
            port.remove(&name);
            Ok(())
        }
    };
    resync.abort();
    protection.abort();
    replication.abort();
    ft_guard.abort();
    drop(leases);
    pruning.abort();
    if let Some(watchdog) = watchdog {
        // A graceful exit disarms it (the magic close); a crash does not.
        let _ = watchdog_stop.send(true);
        let _ = watchdog.await;
    }
    node.exports.shutdown().await;
    // A clean exit leaves no empty cgroup behind (a VMM that runs on keeps its own).
    for line in node.vms.remove_cgroups_on_exit() {
        println!("cairn-node {}: {line}", node.config.name);
    }
    if node.config.stop_vms_on_exit {
        node.vms.kill_all().await;
    }
    let _ = std::fs::remove_file(&address_file);
    result?;
    Ok(())
}

/// The services the health service reports on (besides the server as a whole, "").
const HEALTH_SERVICES: &[&str] = &[
    "cairn.node.v1.Inventory",
    "cairn.node.v1.Observe",
    "cairn.node.v1.Apply",
    "cairn.node.v1.Watch",
    "cairn.node.v1.Replication",
];

/// Installs SIGTERM and SIGINT handlers now (call it inside the tokio runtime, before
/// the node announces its address, so an early signal is never lost) and returns a
/// future that resolves on the first of them.
pub fn termination_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            // Without signal handlers there is nothing to wait for but the process's end.
            _ => std::future::pending::<()>().await,
        }
    }
}
