//! `cairn-node --simulate N`: N nodes served from one process, for scale and fault
//! tests of the controller.
//!
//! Each simulated node is a real node agent ([`crate::server::run`]: the same gRPC
//! services, signatures, request-id records, volume store and Watch stream) on a port
//! of its own, with two backends swapped: a [`SimHypervisor`] instead of `cairn-vmm`
//! processes (a VM "runs" as soon as it is started, reports heartbeats, vCPUs and
//! memory of its definition, and stops when signalled) and a [`SimNetwork`] instead of
//! netlink (bonds, VM NICs and tenant network segments are recorded, reported
//! healthy and as defined, and never touch the host). Volumes are the real volume store in each node's data directory (sparse
//! file disks, nothing is written by a plan), replicated between simulated nodes over
//! the real Replication service.
//!
//! By default one port per node: peers replicate to `address` from the peer set, node
//! leases probe peers by address, and a dead node refuses connections exactly like a
//! dead machine. With `one_port` ([`SimulateConfig::one_port`], `--simulate-one-port`)
//! every node answers on one address, each call routed by the node its
//! [`proto::client::NODE_NAME_METADATA`] names ([`SharedPort`]): the same routes
//! ([`crate::server::run_on`]). The spec gives such a node the address
//! `NAME@HOST:PORT`, and the controller shares one connection per port
//! (`reconciler::nodes::connect`), so 10,000 nodes do not need 10,000 sockets on either
//! side. Controller calls only: no leases, no replication between nodes.
//!
//! Faults (a line protocol on a loopback TCP port, its address written to
//! `DATA_DIR/control-address`; one command per line, answered `ok …` or `error …`):
//! - `kill NODE`: the node dies (its server stops, connections are refused, its lease
//!   renewals stop, its simulated VMs are gone with it);
//! - `start NODE`: it comes back (same data directory: records kept; its VMs crashed);
//! - `slow NODE MS`: every call to it waits MS milliseconds first (0: off);
//! - `fail NODE METHOD|* [off]`: calls whose gRPC path contains METHOD (`Apply`,
//!   `Observe`, `*` for all) fail `UNAVAILABLE` "injected fault" until `off`;
//! - `nodes`: one line, every node with `up`/`down`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use network::{BondBackend, BondSpec, NetNs, NetworkError, bond::BondCapability};
use proto::v1::{self, BondStatus, Health, VmNicStatus};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tonic::Status;
use tonic::codegen::http;

use crate::hypervisor::{Hypervisor, Launched, VmmStatus};
use crate::local_volumes::DiskLayout;
use crate::network_backend::NetworkBackend;
use crate::node::NodeConfig;
use crate::vm_nics::VmNics;

/// Process ids of simulated VMMs start here: above any Linux `pid_max` (at most
/// 2^22), so a signal or pidfd for one can never reach a real process.
const FIRST_SIM_PID: u32 = 1 << 30;
static NEXT_PID: AtomicU32 = AtomicU32::new(FIRST_SIM_PID);

#[derive(Debug)]
struct SimVm {
    pid: u32,
    vcpus: u32,
    memory_bytes: u64,
    started: Instant,
    fence_ns: u64,
    ended: Option<tokio::sync::oneshot::Sender<(String, bool)>>,
}

/// A hypervisor whose VMs run nowhere: started at once, heartbeating while they run.
#[derive(Debug, Default)]
pub struct SimHypervisor {
    /// By control socket path (unique per VM and node).
    vms: Mutex<HashMap<PathBuf, SimVm>>,
}

impl SimHypervisor {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, SimVm>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every VM ends (the node lost power).
    pub fn power_off(&self) {
        for (_, mut vm) in self.lock().drain() {
            if let Some(ended) = vm.ended.take() {
                let _ = ended.send(("the simulated node died".into(), false));
            }
        }
    }

    /// VMs running now.
    pub fn running(&self) -> usize {
        self.lock().len()
    }
}

impl Hypervisor for SimHypervisor {
    fn unavailable(&self) -> Option<String> {
        None
    }

    fn launch(
        &self,
        config: &vm_config::VmConfig,
        vm_dir: &Path,
        _netns: Option<&NetNs>,
        _placement: Option<crate::cgroups::Placement>,
    ) -> Result<Launched, Status> {
        let pid = NEXT_PID.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.lock().insert(
            vm_dir.join("control.sock"),
            SimVm {
                pid,
                vcpus: config.vcpus,
                memory_bytes: config.memory_bytes,
                started: Instant::now(),
                fence_ns: config.fence_deadline_boottime_ns,
                ended: Some(sender),
            },
        );
        Ok(Launched {
            pid,
            exit: Box::pin(async move {
                receiver
                    .await
                    .unwrap_or_else(|_| ("the simulated node stopped".into(), false))
            }),
        })
    }

    fn status(&self, socket: &Path, _timeout: Duration) -> Option<VmmStatus> {
        let vms = self.lock();
        let vm = vms.get(socket)?;
        let uptime_ms = vm.started.elapsed().as_millis() as u64;
        Some(VmmStatus {
            vcpus: vm.vcpus,
            memory_bytes: vm.memory_bytes,
            // One heartbeat at start and every 500 ms after, like the built-in guest.
            total: 1 + uptime_ms / 500,
            age_ms: Some((uptime_ms % 500) as f64),
            uptime_ms,
            nics: Vec::new(),
            disks: Vec::new(),
            guest_disks: Vec::new(),
            block_test: None,
            block_tests: 0,
            block_checksum: 0,
            boot_count: 1,
            ft: None,
        })
    }

    fn set_fence(&self, socket: &Path, deadline_boottime_ns: u64) -> Result<(), String> {
        match self.lock().get_mut(socket) {
            Some(vm) => {
                vm.fence_ns = deadline_boottime_ns;
                Ok(())
            }
            None => Err("no such simulated VM".into()),
        }
    }

    fn signal(&self, pid: u32, signal: libc::c_int) {
        let mut vms = self.lock();
        let Some(key) = vms
            .iter()
            .find(|(_, vm)| vm.pid == pid)
            .map(|(key, _)| key.clone())
        else {
            return;
        };
        if let Some(mut vm) = vms.remove(&key)
            && let Some(ended) = vm.ended.take()
        {
            // cairn-vmm powers off and exits 0 on SIGTERM; SIGKILL is a kill.
            let exit = if signal == libc::SIGTERM {
                ("exit status: 0".to_string(), true)
            } else {
                (format!("signal: {signal} (simulated)"), false)
            };
            let _ = ended.send(exit);
        }
    }

    fn serves_disks(&self) -> bool {
        false
    }

    fn blocks(&self) -> bool {
        false
    }
}

/// A network whose bonds and taps exist only in memory, always healthy.
#[derive(Debug, Default)]
pub struct SimNetwork {
    bonds: Mutex<BTreeMap<String, BondSpec>>,
}

impl NetworkBackend for SimNetwork {
    fn unavailable(&self, _netns: &NetNs) -> Option<String> {
        None
    }

    fn blocks(&self) -> bool {
        false
    }

    fn bonding(&self, _netns: &NetNs) -> Result<BondCapability, NetworkError> {
        Ok(BondCapability {
            backend: BondBackend::KernelBond,
            reason: "simulated".into(),
        })
    }

    fn apply_bond(&self, _netns: &NetNs, spec: &BondSpec) -> Result<BondBackend, NetworkError> {
        self.bonds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.name.clone(), spec.clone());
        Ok(BondBackend::KernelBond)
    }

    fn remove_bond(&self, _netns: &NetNs, name: &str) -> Result<(), NetworkError> {
        self.bonds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        Ok(())
    }

    fn observe_bond(&self, _netns: &NetNs, name: &str, bond: &v1::ApplyBond) -> BondStatus {
        let exists = self
            .bonds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name);
        BondStatus {
            name: name.to_string(),
            mode: bond.mode.clone(),
            members: bond.members.clone(),
            active_members: if exists {
                bond.members.clone()
            } else {
                Vec::new()
            },
            health: if exists {
                Health::Healthy
            } else {
                Health::Failed
            } as i32,
            implementation: BondBackend::KernelBond.as_str().to_string(),
            detail: if exists {
                String::new()
            } else {
                "the bond device does not exist".into()
            },
            mtu: bond.mtu,
            traffic: bond.traffic.clone(),
            capacity_bps: bond.capacity_bps,
            miimon_ms: bond.miimon_ms,
            exists,
            drift: Vec::new(),
        }
    }

    fn ensure_vm_nics(
        &self,
        _netns: &NetNs,
        _vm: &str,
        _tenant: &str,
        _nics: &[v1::VmNic],
    ) -> Result<(), Status> {
        Ok(())
    }

    fn remove_vm_nics(&self, _netns: &NetNs, _vm: &str, _count: usize) {}

    fn vm_nic_statuses(
        &self,
        _netns: &NetNs,
        _refusal: Option<&str>,
        vms: &[VmNics<'_>],
    ) -> BTreeMap<String, Vec<VmNicStatus>> {
        vms.iter()
            .map(|vm| {
                let nics = vm
                    .nics
                    .iter()
                    .enumerate()
                    .map(|(index, nic)| VmNicStatus {
                        network: nic.network.clone(),
                        tap: format!("sim{index}"),
                        bridge: format!("sim-{}", nic.network),
                        ready: true,
                        mac: crate::vm_nics::mac(vm.vm, index),
                        ..VmNicStatus::default()
                    })
                    .collect();
                (vm.vm.to_string(), nics)
            })
            .collect()
    }

    fn is_host(&self) -> bool {
        false
    }
}

/// The faults injected into one simulated node's calls.
#[derive(Debug, Default)]
pub struct Faults {
    delay_ms: AtomicU64,
    failing: Mutex<Vec<String>>,
}

impl Faults {
    /// Every call waits `ms` first (0: off).
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Calls whose path contains `pattern` (`*`: all) fail, or no longer (`on` false).
    pub fn set_failing(&self, pattern: &str, on: bool) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing.retain(|p| p != pattern);
        if on {
            failing.push(pattern.to_string());
        }
    }

    fn fails(&self, path: &str) -> bool {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|p| p == "*" || path.contains(p.as_str()))
    }
}

/// A tower layer that applies a node's [`Faults`] to every gRPC call; without faults
/// (every real node) it passes each call straight through. It also hashes each
/// request's first message as received ([`proto::received`]), for the signature check.
#[derive(Debug, Clone, Default)]
pub struct FaultLayer(pub Option<Arc<Faults>>);

impl<S> tower_layer::Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultService {
            inner,
            faults: self.0.clone(),
        }
    }
}

/// The service of [`FaultLayer`].
#[derive(Debug, Clone)]
pub struct FaultService<S> {
    inner: S,
    faults: Option<Arc<Faults>>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for FaultService<S>
where
    S: tonic::codegen::Service<
            http::Request<proto::received::HashFirstMessage<B>>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Every node's calls (simulated or not) pass here: the signature is checked
        // against the bytes received (`proto::received`, version skew).
        let request = proto::received::hash_first_message(request);
        let Some(faults) = self.faults.clone() else {
            return Box::pin(self.inner.call(request));
        };
        // The clone is not ready; the one polled ready takes this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let delay = faults.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let path = request.uri().path().to_string();
            if faults.fails(&path) {
                return Ok(Status::unavailable(format!("injected fault: {path} fails")).into_http());
            }
            inner.call(request).await
        })
    }
}

/// How `cairn-node --simulate` runs.
#[derive(Debug, Clone)]
pub struct SimulateConfig {
    /// Each node's name and address.
    pub nodes: Vec<(String, SocketAddr)>,
    /// Data directories: `DATA_DIR/NAME`; the control address in `DATA_DIR/control-address`.
    pub data_dir: PathBuf,
    /// File disks of each node's volume store, and their size.
    pub disks: DiskLayout,
    /// The controller to renew leases with (`None`: no leases).
    pub lease: Option<crate::quorum::LeaseConfig>,
    /// Trusted controller keys of every node (default `DATA_DIR/NAME/trusted-controllers`,
    /// else `DATA_DIR/trusted-controllers`).
    pub trusted_controller_keys: Option<PathBuf>,
    /// Request-id retention.
    pub request_retention: Duration,
    /// Every node on the first node's address, routed by the `cairn-node` metadata
    /// of each call ([`SharedPort`]); else a port per node.
    pub one_port: bool,
}

/// One port serving many simulated nodes (`--simulate-one-port`): each running node's
/// services (the same [`crate::server::run_on`] routes a port of its own would serve,
/// behind its [`FaultLayer`]) by name. A call is routed by its
/// [`proto::client::NODE_NAME_METADATA`]; a call naming a node that is down or unknown
/// fails `UNAVAILABLE`, as a refused connection would; one naming none reaches the
/// port's own health service.
#[derive(Default)]
pub struct SharedPort {
    nodes: std::sync::RwLock<HashMap<String, FaultService<tonic::service::Routes>>>,
}

impl std::fmt::Debug for SharedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPort")
            .field("nodes", &self.read().len())
            .finish()
    }
}

impl SharedPort {
    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<String, FaultService<tonic::service::Routes>>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner())
    }

    /// `name`'s services answer from now on.
    pub fn register(&self, name: &str, routes: FaultService<tonic::service::Routes>) {
        self.nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), routes);
    }

    /// `name` no longer answers.
    pub fn remove(&self, name: &str) {
        self.nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Nodes answering now.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no node answers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The service of a [`SharedPort`]: routes each call to the node it names.
#[derive(Clone)]
struct Dispatch {
    port: Arc<SharedPort>,
    own: tonic::service::Routes,
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Dispatch {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        type Request = http::Request<tonic::body::Body>;
        let name = request
            .headers()
            .get(proto::client::NODE_NAME_METADATA)
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let Some(name) = name else {
            let mut own = self.own.clone();
            return Box::pin(async move {
                tonic::codegen::Service::<Request>::call(&mut own, request).await
            });
        };
        let Some(mut node) = self.port.read().get(&name).cloned() else {
            return Box::pin(async move {
                Ok(Status::unavailable(format!(
                    "simulated node `{name}` is not running on this port"
                ))
                .into_http())
            });
        };
        Box::pin(async move {
            std::future::poll_fn(|cx| {
                tonic::codegen::Service::<Request>::poll_ready(&mut node, cx)
            })
            .await?;
            tonic::codegen::Service::<Request>::call(&mut node, request).await
        })
    }
}

/// The nodes of `cairn-node --simulate N --simulate-one-port`: `PREFIX{i}` for each
/// `i` of `numbers`, all on `listen`.
pub fn one_port(
    numbers: std::ops::Range<usize>,
    prefix: &str,
    listen: SocketAddr,
) -> Result<Vec<(String, SocketAddr)>, String> {
    if listen.port() == 0 {
        return Err("--simulate-one-port needs a fixed --listen port".into());
    }
    Ok(numbers.map(|i| (format!("{prefix}{i}"), listen)).collect())
}

struct SimNode {
    config: NodeConfig,
    listen: crate::server::Listen,
    faults: Arc<Faults>,
    hypervisor: Arc<SimHypervisor>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimNode {
    fn up(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn start(&mut self, disks: DiskLayout) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = self.config.clone();
        let listen = self.listen.clone();
        let name = config.name.clone();
        self.task = Some(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(error) = crate::server::run_on(config, disks, listen, shutdown).await {
                eprintln!(
                    "cairn-node --simulate: node {name}: {}",
                    crate::error_chain(&error)
                );
            }
        }));
        self.stop = Some(stop);
    }

    async fn kill(&mut self) {
        // Calls that arrive while it stops fail, as on a machine that lost power.
        self.faults.set_failing("*", true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(10), &mut task)
                .await
                .is_err()
        {
            eprintln!(
                "cairn-node --simulate: node {} did not stop within 10 s; aborted",
                self.config.name
            );
            task.abort();
        }
        self.faults.set_failing("*", false);
        self.hypervisor.power_off();
    }
}

/// The nodes of `cairn-node --simulate N`: `PREFIX{i}` for each `i` of `numbers`,
/// the first on `listen`'s port and each next one on the next port.
pub fn numbered(
    numbers: std::ops::Range<usize>,
    prefix: &str,
    listen: SocketAddr,
) -> Result<Vec<(String, SocketAddr)>, String> {
    let first = numbers.start;
    let nodes = numbers.len();
    if listen.port() == 0 {
        return Err("--simulate needs a fixed --listen port (node i listens on PORT + i)".into());
    }
    if usize::from(listen.port()) + nodes > 65_536 {
        return Err(format!(
            "{nodes} nodes from port {} run past port 65535",
            listen.port()
        ));
    }
    Ok((0..nodes)
        .map(|i| {
            (
                format!("{prefix}{}", first + i),
                SocketAddr::new(listen.ip(), listen.port() + i as u16),
            )
        })
        .collect())
}

/// The nodes listed in `text` (`--simulate-nodes FILE`): one `NAME HOST:PORT` a line,
/// `#` comments.
pub fn parse_nodes(file: &str, text: &str) -> Result<Vec<(String, SocketAddr)>, String> {
    let mut nodes: Vec<(String, SocketAddr)> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{file}:{}", number + 1);
        let mut words = line.split_whitespace();
        let (Some(name), Some(address), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("{at}: expected `NAME HOST:PORT`, found `{line}`"));
        };
        let address: SocketAddr = address
            .parse()
            .map_err(|e| format!("{at}: `{address}` is not an IP address and port: {e}"))?;
        if nodes.iter().any(|(n, a)| n == name || *a == address) {
            return Err(format!(
                "{at}: node `{name}` or address {address} is listed twice"
            ));
        }
        nodes.push((name.to_string(), address));
    }
    if nodes.is_empty() {
        return Err(format!("{file}: lists no node"));
    }
    Ok(nodes)
}

/// Runs the simulated nodes until `shutdown` completes.
pub async fn run(
    config: SimulateConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let Some(first) = config.nodes.first().map(|(_, address)| *address) else {
        return Err("no node to simulate".into());
    };
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", config.data_dir.display()))?;
    // Per node: its listener, its records' and volumes' files, the controller's and
    // peers' connections (10,000 nodes went past the default 20,000).
    let wanted = config.nodes.len() as u64 * 8 + 1024;
    if let Err(e) = proto::client::raise_open_file_limit(wanted) {
        eprintln!("warning: {e}");
    }
    if config.one_port && config.lease.is_some() {
        return Err("one port (--simulate-one-port) serves controller calls only: node leases need a port per node".into());
    }
    // One port: every node's routes behind one listener, routed by name.
    let shared = if config.one_port {
        let port = Arc::new(SharedPort::default());
        let listener = tokio::net::TcpListener::bind(first)
            .await
            .map_err(|e| format!("cannot listen on {first}: {e}"))?;
        let (_, health) = tonic_health::server::health_reporter();
        let dispatch = Dispatch {
            port: port.clone(),
            own: tonic::service::Routes::new(health).prepare(),
        };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(async move {
            // Every node's Watch stream stays open on the controller's one connection.
            let served = tonic::transport::Server::builder()
                .max_concurrent_streams(None)
                .serve_with_incoming(dispatch, incoming)
                .await;
            if let Err(error) = served {
                eprintln!("cairn-node --simulate: the shared port {first}: {error}");
            }
        });
        Some(port)
    } else {
        None
    };
    let shared_keys = config.data_dir.join("trusted-controllers");
    let mut nodes: BTreeMap<String, SimNode> = BTreeMap::new();
    for (index, (name, listen)) in config.nodes.iter().enumerate() {
        let (name, listen) = (name.clone(), *listen);
        crate::validate::name("--simulate node name", &name)
            .map_err(|s| s.message().to_string())?;
        let data_dir = config.data_dir.join(&name);
        let own_keys = data_dir.join("trusted-controllers");
        let trusted = config
            .trusted_controller_keys
            .clone()
            .or_else(|| (!own_keys.exists() && shared_keys.exists()).then(|| shared_keys.clone()));
        let faults = Arc::new(Faults::default());
        let hypervisor = Arc::new(SimHypervisor::default());
        let node_config = NodeConfig {
            name: name.clone(),
            data_dir,
            trusted_controller_keys: trusted,
            trusted_peer_keys: None,
            vmm_binary: None,
            netns: None,
            network_disabled: None,
            vm_start_timeout: Duration::from_secs(10),
            migration_address: None,
            request_retention: config.request_retention,
            lease: config
                .lease
                .clone()
                .map(|lease| crate::quorum::LeaseConfig {
                    local_address: Some(listen.ip()).filter(|ip| !ip.is_unspecified()),
                    ..lease
                }),
            stop_vms_on_exit: false,
            vmm_own_process_group: true,
            watchdog: None,
            hypervisor: Some(hypervisor.clone()),
            network: Some(Arc::new(SimNetwork::default())),
            faults: Some(faults.clone()),
            sla: crate::node::SlaConfig::default(),
        };
        let mut node = SimNode {
            config: node_config,
            listen: match &shared {
                Some(port) => crate::server::Listen::Shared {
                    address: listen,
                    port: port.clone(),
                },
                None => crate::server::Listen::Tcp(listen),
            },
            faults,
            hypervisor,
            stop: None,
            task: None,
        };
        node.start(config.disks);
        nodes.insert(name, node);
        // Let each node bind before the next opens its stores (a burst of opens
        // on 2 cores starves the first ones' servers).
        if index % 64 == 63 {
            tokio::task::yield_now().await;
        }
    }
    let control = tokio::net::TcpListener::bind(SocketAddr::new(first.ip(), 0))
        .await
        .map_err(|e| format!("cannot listen for fault commands: {e}"))?;
    let control_address = control.local_addr().map_err(|e| e.to_string())?;
    let control_file = config.data_dir.join("control-address");
    std::fs::write(&control_file, format!("{control_address}\n"))
        .map_err(|e| format!("cannot write {}: {e}", control_file.display()))?;
    println!(
        "cairn-node --simulate: {} nodes ({} on {first} first), fault commands on {control_address}",
        config.nodes.len(),
        config.nodes[0].0,
    );
    let nodes = Arc::new(tokio::sync::Mutex::new(nodes));
    let disks = config.disks;
    let serve = {
        let nodes = nodes.clone();
        async move {
            loop {
                let Ok((stream, _)) = control.accept().await else {
                    continue;
                };
                let nodes = nodes.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = tokio::io::BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let answer = command(&nodes, &line, disks).await;
                        if write
                            .write_all(format!("{answer}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        }
    };
    tokio::select! {
        () = shutdown => {}
        () = serve => {}
    }
    let mut nodes = nodes.lock().await;
    for node in nodes.values_mut() {
        if let Some(stop) = node.stop.take() {
            let _ = stop.send(());
        }
    }
    for node in nodes.values_mut() {
        if let Some(task) = node.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
    let _ = std::fs::remove_file(&control_file);
    Ok(())
}

/// Carries out one fault command; the answer line.
async fn command(
    nodes: &tokio::sync::Mutex<BTreeMap<String, SimNode>>,
    line: &str,
    disks: DiskLayout,
) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut nodes = nodes.lock().await;
    if words.first() == Some(&"nodes") {
        let list: Vec<String> = nodes
            .iter()
            .map(|(name, node)| format!("{name}={}", if node.up() { "up" } else { "down" }))
            .collect();
        return format!("ok {}", list.join(" "));
    }
    let (Some(verb), Some(name)) = (words.first(), words.get(1)) else {
        return "error expected `kill NODE`, `start NODE`, `slow NODE MS`, `fail NODE METHOD|* [off]` or `nodes`".into();
    };
    let Some(node) = nodes.get_mut(*name) else {
        return format!("error no simulated node `{name}`");
    };
    match (*verb, words.get(2)) {
        ("kill", None) => {
            node.kill().await;
            format!("ok {name} is down")
        }
        ("start", None) => {
            if node.up() {
                return format!("ok {name} is up already");
            }
            node.start(disks);
            format!("ok {name} started")
        }
        ("slow", Some(ms)) => match ms.parse::<u64>() {
            Ok(ms) => {
                node.faults.set_delay(ms);
                format!("ok {name} answers after {ms} ms")
            }
            Err(_) => format!("error `{ms}` is not a number of milliseconds"),
        },
        ("fail", Some(method)) => {
            let on = words.get(3) != Some(&"off");
            node.faults.set_failing(method, on);
            format!(
                "ok calls to {name} matching `{method}` {}",
                if on { "fail" } else { "no longer fail" }
            )
        }
        _ => format!("error cannot parse `{line}`"),
    }
}

/// What a node whose network is simulated reads back of its kept segments: each
/// as its definition makes it (its VNI, MTU, local VTEP and forwarding entries, a
/// migrating NIC's through the all-zero entry to both nodes), with no drift. A
/// definition the node would refuse reads back as that refusal.
pub fn segment_statuses(all: &[v1::ApplyNetworkSegment]) -> Vec<v1::NetworkSegmentStatus> {
    all.iter()
        .map(|seg| {
            let mut status = v1::NetworkSegmentStatus {
                tenant: seg.tenant.clone(),
                network: seg.network.clone(),
                vni: seg.vni,
                definition_digest: crate::segments::definition_digest(seg),
                ..Default::default()
            };
            let spec = match crate::segments::segment_spec(seg, Some(seg.mtu.max(1500) + 50)) {
                Ok(spec) => spec,
                Err(e) => {
                    status.drift.push(e.message().to_owned());
                    return status;
                }
            };
            status.mtu = spec.mtu;
            status.local_vtep = spec.local_vtep.to_string();
            status.fdb = spec
                .remotes
                .iter()
                .flat_map(|r| match r.also_vtep {
                    Some(also) => vec![
                        format!("{} -> {}", network::overlay::FLOOD_MAC, r.vtep),
                        format!("{} -> {also}", network::overlay::FLOOD_MAC),
                    ],
                    None => vec![format!(
                        "{} -> {}",
                        network::overlay::format_mac(&r.mac),
                        r.vtep
                    )],
                })
                .collect();
            status
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::auth::{Identity, RequestSigner};

    #[test]
    fn a_simulated_segment_reads_back_as_defined() {
        let seg = v1::ApplyNetworkSegment {
            tenant: "t0".into(),
            network: "net-0".into(),
            vni: 42,
            mtu: 8950,
            local_vtep: "10.9.0.1".into(),
            remotes: vec![
                v1::SegmentRemote {
                    vm: "a".into(),
                    mac: "02:CA:00:00:00:01".into(),
                    ipv4: "10.0.0.5".into(),
                    vtep: "10.9.0.2".into(),
                    also_vtep: String::new(),
                },
                v1::SegmentRemote {
                    vm: "b".into(),
                    mac: "02:ca:00:00:00:02".into(),
                    ipv4: String::new(),
                    vtep: "10.9.0.3".into(),
                    also_vtep: "10.9.0.4".into(),
                },
            ],
            ..Default::default()
        };
        let bad = v1::ApplyNetworkSegment {
            local_vtep: "nowhere".into(),
            ..seg.clone()
        };
        let statuses = segment_statuses(&[seg.clone(), bad]);
        let s = &statuses[0];
        assert_eq!(
            (s.vni, s.mtu, s.local_vtep.as_str()),
            (42, 8950, "10.9.0.1")
        );
        // The MAC as the plan writes it (lower case); a migrating NIC's frames
        // through the all-zero entry to both of its nodes.
        assert_eq!(
            s.fdb,
            [
                "02:ca:00:00:00:01 -> 10.9.0.2",
                "00:00:00:00:00:00 -> 10.9.0.3",
                "00:00:00:00:00:00 -> 10.9.0.4"
            ]
        );
        assert!(s.drift.is_empty(), "{:?}", s.drift);
        assert_eq!(
            s.definition_digest,
            crate::segments::definition_digest(&seg)
        );
        assert!(
            statuses[1].drift[0].contains("local_vtep"),
            "{:?}",
            statuses[1].drift
        );
    }

    /// Client-side connections from this process to `port` (ESTABLISHED, IPv4).
    fn connections_to(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(2).and_then(|r| r.rsplit(':').next())
                    == Some(format!("{port:04X}").as_str())
                    && fields.get(3) == Some(&"01")
            })
            .count()
    }

    async fn command(control: SocketAddr, line: &str) -> String {
        let stream = tokio::net::TcpStream::connect(control)
            .await
            .expect("control");
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("send");
        let mut lines = tokio::io::BufReader::new(read).lines();
        lines.next_line().await.expect("read").unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_port_serves_every_node_by_the_name_in_metadata_over_one_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let controller = Identity::generate().expect("key");
        std::fs::write(
            dir.path().join("trusted-controllers"),
            format!("{} cairn-controller\n", controller.public_key_hex()),
        )
        .expect("trust");
        let port = std::net::TcpListener::bind("127.0.0.37:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let listen: SocketAddr = format!("127.0.0.37:{port}").parse().expect("address");
        let nodes = one_port(0..20, "n", listen).expect("nodes");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let simulator = tokio::spawn(run(
            SimulateConfig {
                nodes,
                data_dir: dir.path().to_path_buf(),
                disks: DiskLayout {
                    count: 1,
                    capacity_bytes: 64 << 20,
                },
                lease: None,
                trusted_controller_keys: None,
                request_retention: Duration::from_secs(3600),
                one_port: true,
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let signer = RequestSigner::new(controller);
        let address = listen.to_string();
        // Every node answers, as itself, through the controller's node clients.
        let mut keys = std::collections::BTreeSet::new();
        let mut clients = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..20 {
            let name = format!("n{i}");
            loop {
                let routed = format!("{name}@{address}");
                let answer = match reconciler::nodes::connect(&routed, signer.clone()).await {
                    Ok(mut client) => client
                        .get_inventory()
                        .await
                        .map(|inventory| (client, inventory))
                        .map_err(|s| s.message().to_string()),
                    Err(e) => Err(e),
                };
                match answer {
                    Ok((client, inventory)) => {
                        assert_eq!(inventory.node_name, name);
                        keys.insert(inventory.public_key_hex);
                        clients.push(client);
                        break;
                    }
                    Err(e) if Instant::now() > deadline => panic!("{name} does not answer: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        assert_eq!(keys.len(), 20, "each node has its own identity");
        // Every node's client shares the port's one channel.
        assert_eq!(connections_to(port), 1, "connections for 20 nodes");
        // A call naming no node reaches no node; one naming an unknown node is
        // refused as a dead machine would be.
        let channel = reconciler::nodes::connect_channel(&address)
            .await
            .expect("channel");
        let unnamed = proto::client::NodeClient::from_channel(channel.clone(), signer.clone())
            .get_inventory()
            .await
            .expect_err("no node named");
        assert_ne!(unnamed.code(), tonic::Code::Ok);
        let unknown = proto::client::NodeClient::from_channel(channel, signer.clone())
            .named("n99")
            .get_inventory()
            .await
            .expect_err("no such node");
        assert_eq!(unknown.code(), tonic::Code::Unavailable, "{unknown:?}");
        assert!(unknown.message().contains("n99"), "{unknown:?}");
        // Faults act per node on the shared port.
        let control: SocketAddr = std::fs::read_to_string(dir.path().join("control-address"))
            .expect("control address")
            .trim()
            .parse()
            .expect("control address");
        assert!(command(control, "kill n3").await.starts_with("ok"));
        let dead = clients[3].get_inventory().await.expect_err("n3 is down");
        assert_eq!(dead.code(), tonic::Code::Unavailable, "{dead:?}");
        let alive = clients[4].get_inventory().await.expect("n4 still answers");
        assert_eq!(alive.node_name, "n4");
        assert!(command(control, "slow n4 300").await.starts_with("ok"));
        let t = Instant::now();
        clients[4].get_inventory().await.expect("n4 answers slowly");
        assert!(t.elapsed() >= Duration::from_millis(300));
        let t = Instant::now();
        clients[5].get_inventory().await.expect("n5");
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert!(command(control, "start n3").await.starts_with("ok"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match clients[3].get_inventory().await {
                Ok(inventory) => {
                    assert_eq!(inventory.node_name, "n3");
                    break;
                }
                Err(e) if Instant::now() > deadline => panic!("n3 did not come back: {e:?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let _ = stop.send(());
        simulator
            .await
            .expect("simulator task")
            .expect("simulator run");
    }
}
