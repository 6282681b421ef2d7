//! `cairn-node --name NAME --listen ADDR --data-dir DIR`: the node runtime daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc, not glibc's malloc: a simulator serving 3,000 nodes builds and drops
/// millions of small answers, and glibc's arenas kept what it had freed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use node_runtime::local_volumes::DiskLayout;
use node_runtime::node::NodeConfig;

/// The cairn node runtime: serves the node API over gRPC until SIGTERM or SIGINT.
#[derive(Debug, Parser)]
#[command(name = "cairn-node", version)]
struct Args {
    /// The node's name (a DNS label, as in the spec).
    #[arg(long, required_unless_present = "simulate")]
    name: Option<String>,
    /// Address to serve gRPC on, e.g. 127.0.0.1:7100 (port 0 picks a free port; the
    /// chosen address is written to DATA_DIR/listen-address).
    #[arg(long)]
    listen: SocketAddr,
    /// Data directory: identity, records (node.redb), disks and volumes, VM run files.
    #[arg(long)]
    data_dir: PathBuf,
    /// File of trusted controller public keys (hex, one per line, optional name after
    /// the key). Default: DATA_DIR/trusted-controllers, which `cairn dev up` writes.
    #[arg(long)]
    trusted_controller_keys: Option<PathBuf>,
    /// File of trusted peer node keys for replication (same format). Default:
    /// DATA_DIR/trusted-peers; controllers can also push peers with SetPeers.
    #[arg(long)]
    trusted_peer_keys: Option<PathBuf>,
    #[arg(long, value_name = "TOKEN", conflicts_with_all = ["trusted_controller_keys", "simulate"])]
    enroll: Option<String>,
    #[arg(long, value_name = "ADDR")]
    controller: Option<String>,
    /// Before serving, have the controller (--controller, else --lease-from) pin a
    /// new key for this node, signed by the pinned key and the new one, then sign with
    /// the new key (`identity.key`; the old one kept as `identity.key.old`). Run it as
    /// an agent restart: the VMs keep running and are adopted.
    #[arg(long)]
    rotate_key: bool,
    /// Path of the cairn-vmm binary (default: next to cairn-node, then PATH).
    #[arg(long)]
    vmm_binary: Option<PathBuf>,
    /// Network namespace (a name under /run/netns) holding the node's NICs and bonds;
    /// default: the namespace cairn-node runs in. `cairn dev up` gives each node one.
    #[arg(long)]
    netns: Option<String>,
    /// Refuse every network action (ApplyBond, DeleteBond) with REASON and never touch
    /// the network; Inventory and Observe report the reason. `cairn dev up` passes it
    /// when it cannot give the node its own network namespace.
    #[arg(long, value_name = "REASON", conflicts_with = "netns")]
    network_disabled: Option<String>,
    /// Seconds a request id's recorded outcome is kept (default 7 days); a retry later
    /// than that is carried out again.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    request_retention: u64,
    /// Milliseconds a StartVm waits to see the VM running (its cairn-vmm alive and the
    /// guest's first heartbeat reported) before it kills the VMM and fails.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    vm_start_timeout_ms: u64,
    /// The address a VM migrating to this node is received on (a live migration's
    /// destination VMM listens there, port chosen by the kernel). It must be reachable
    /// from the other nodes' VMMs; inside `--netns` for VMs with NICs (their VMMs run
    /// there). Default: the --listen address's host (127.0.0.1 when unspecified).
    #[arg(long)]
    migration_address: Option<std::net::IpAddr>,
    /// Number of file disks created under DATA_DIR/volumes/disks on first start.
    /// With --simulate it may be 0: nodes without disks (no volume can be placed on
    /// them), which spares each simulated node a disk file and its 4 MiB journal.
    #[arg(long, default_value_t = 4)]
    disks: u32,
    /// Capacity of each file disk in bytes (sparse; default 16 GiB).
    #[arg(long, default_value_t = 16 << 30)]
    disk_capacity: u64,
    /// The controller's gRPC address (`host:port`) to renew this node's lease with.
    /// With it, the node pushes the end of its quorum (the lease, or a majority of its
    /// site's peers) into each HA and FT VM as its fence deadline; without it no VM is
    /// ever fenced.
    #[arg(long, value_name = "ADDR")]
    lease_from: Option<String>,
    /// The lease length asked for until the controller grants one (T; renewals every T/3).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(300..=600_000))]
    lease_ttl_ms: u64,
    /// Kill every VM process when cairn-node stops gracefully (the old behaviour). By
    /// default VMs keep running through a restart of the agent (an upgrade, a crash)
    /// and the next agent adopts them after verifying each one's identity.
    #[arg(long)]
    stop_vms_on_exit: bool,
    /// `own` (default): each cairn-vmm runs in a process group of its own, so a signal
    /// to the agent's group does not reach the VMs; `agent`: VMMs stay in the agent's
    /// group (`cairn dev up`, where a node's process group stands for the machine and
    /// is killed as one).
    #[arg(long, value_name = "own|agent", default_value = "own", value_parser = ["own", "agent"])]
    vmm_process_group: String,
    /// `auto` (default): each VMM runs in a cgroup of its VM's SLA class (cgroup v2
    /// when it offers cpu and memory, else v1), under `cairn-NAME`; `off`: none.
    #[arg(long, value_name = "auto|off", default_value = "auto", value_parser = ["auto", "off"])]
    cgroups: String,
    /// The cgroup (a path below each hierarchy's mount) to make the node's
    /// `cairn-NAME` parent in; default: the agent's own cgroup.
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<String>,
    /// The CPUs this node may dedicate to reserved VMs whose SLA profile has
    /// `cpu-pinning=#true` (a kernel CPU list, e.g. 4-15); each such VM gets as many of
    /// them as it has vCPUs, in a cpuset no other VM of the node holds. Default: every
    /// CPU of the node's cpuset but the lowest.
    #[arg(long, value_name = "LIST")]
    dedicated_cpus: Option<String>,
    /// Serve the node's Prometheus `/metrics` (per-VM usage with vm, tenant and sla
    /// labels, node totals, KSM) on this address, e.g. 127.0.0.1:9100; the bound
    /// address is written to DATA_DIR/metrics-address.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Runtime preemption: while the host's available memory (MemAvailable) is below
    /// this size (e.g. 2GiB), stop spot VMs, lowest priority first, one every 0.5 s,
    /// each with an event saying why. Default: off.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    preempt_below_available: Option<u64>,
    /// Runtime preemption for CPU: while some runnable task waits for a CPU more than
    /// this percentage of a 1 s window (PSI /proc/pressure/cpu "some"; without PSI,
    /// /proc/stat procs_running against the CPUs), stop spot VMs, lowest priority
    /// first, one per window, each with an event saying why. 1-100; default: off.
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(1..=100))]
    preempt_above_cpu_pressure: Option<u32>,
    /// A watchdog device (e.g. /dev/watchdog) to arm and pet while the node holds
    /// quorum; when it loses quorum the node stops petting and the device resets the
    /// machine at its timeout. A graceful exit disarms it. Needs --lease-from. Never
    /// armed without this flag.
    #[arg(long, value_name = "PATH", requires = "lease_from")]
    watchdog: Option<PathBuf>,
    /// Serve N simulated nodes from this process (scale and fault tests): the same
    /// node API over a simulated hypervisor and network. Node i is named
    /// `--simulate-prefix` + i, listens on the --listen port + i and keeps its data in
    /// DATA_DIR/NAME; fault commands (kill, start, slow, fail) on the loopback address
    /// written to DATA_DIR/control-address.
    #[arg(long, value_name = "N", conflicts_with_all = ["name", "netns", "network_disabled", "watchdog", "vmm_binary"], value_parser = clap::value_parser!(u64).range(1..=60_000))]
    simulate: Option<u64>,
    /// With --simulate: the node names' prefix (`n`: n0, n1, … as `cairn gen` names them).
    #[arg(long, default_value = "n", requires = "simulate")]
    simulate_prefix: String,
    /// With --simulate: the nodes' names and addresses instead, one `NAME HOST:PORT` a
    /// line (what `cairn dev up --simulate` writes); N must be their number.
    #[arg(long, value_name = "FILE", requires = "simulate")]
    simulate_nodes: Option<PathBuf>,
    /// With --simulate: every node answers on the --listen address itself, and each
    /// call reaches the node its `cairn-node` metadata names (a controller sends it),
    /// instead of a port per node. Controller calls only: no node leases, and peers
    /// do not replicate to each other.
    #[arg(long, requires = "simulate", conflicts_with_all = ["simulate_nodes", "lease_from"])]
    simulate_one_port: bool,
    /// With --simulate: the number of the first node (`n{FIRST}` …), so that several
    /// simulator processes can serve one cluster.
    #[arg(
        long,
        default_value_t = 0,
        requires = "simulate",
        conflicts_with = "simulate_nodes"
    )]
    simulate_first: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(name) = &args.name
        && let Err(error) = node_runtime::validate::name("--name", name)
    {
        eprintln!("cairn-node: {}", error.message());
        return ExitCode::from(2);
    }
    let fewest = if args.simulate.is_some() { 0 } else { 1 };
    if args.disks < fewest || args.disks > 64 {
        eprintln!(
            "cairn-node: --disks must be between {fewest} and 64, got {}",
            args.disks
        );
        return ExitCode::from(2);
    }
    if args.disk_capacity < 1 << 20 || !args.disk_capacity.is_multiple_of(4096) {
        eprintln!(
            "cairn-node: --disk-capacity must be a multiple of 4096 and at least 1 MiB, got {}",
            args.disk_capacity
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cairn-node: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let disks = DiskLayout {
        count: args.disks,
        capacity_bytes: args.disk_capacity,
    };
    if let Some(nodes) = args.simulate {
        return simulate(&runtime, &args, nodes as usize, disks);
    }
    if let Some(token) = &args.enroll {
        let Some(controller) = args.controller.as_deref().or(args.lease_from.as_deref()) else {
            eprintln!(
                "cairn-node: --enroll needs the controller's gRPC address: --controller ADDR (or --lease-from ADDR)"
            );
            return ExitCode::from(2);
        };
        let name = args.name.clone().unwrap_or_default();
        match runtime.block_on(node_runtime::enroll::enroll(
            &args.data_dir,
            &name,
            token,
            controller,
        )) {
            Ok(node_runtime::enroll::Enrolled::Now(keys)) => eprintln!(
                "cairn-node: node {name} enrolled at {controller}: it trusts {keys} controller key(s) ({})",
                args.data_dir
                    .join(node_runtime::trust::DEV_CONTROLLERS_FILE)
                    .display()
            ),
            Ok(node_runtime::enroll::Enrolled::Before(keys)) => eprintln!(
                "cairn-node: node {name} is already enrolled (it trusts {keys} controller key(s)); --enroll is not used again"
            ),
            Err(error) => {
                eprintln!("cairn-node: enrollment refused: {error}");
                return ExitCode::from(2);
            }
        }
    }
    if args.rotate_key {
        let Some(controller) = args.controller.as_deref().or(args.lease_from.as_deref()) else {
            eprintln!(
                "cairn-node: --rotate-key needs the controller's gRPC address: --controller ADDR (or --lease-from ADDR)"
            );
            return ExitCode::from(2);
        };
        let name = args.name.clone().unwrap_or_default();
        match runtime.block_on(node_runtime::enroll::rotate_key(
            &args.data_dir,
            &name,
            controller,
        )) {
            Ok(key) => eprintln!(
                "cairn-node: node {name}'s key is rotated: the controller at {controller} pinned {key}"
            ),
            Err(error) => {
                eprintln!("cairn-node: key rotation refused: {error}");
                return ExitCode::from(2);
            }
        }
    }
    let config = NodeConfig {
        name: args.name.unwrap_or_default(),
        data_dir: args.data_dir,
        trusted_controller_keys: args.trusted_controller_keys,
        trusted_peer_keys: args.trusted_peer_keys,
        vmm_binary: args.vmm_binary,
        netns: args.netns,
        network_disabled: args.network_disabled,
        vm_start_timeout: std::time::Duration::from_millis(args.vm_start_timeout_ms),
        migration_address: args
            .migration_address
            .or_else(|| Some(args.listen.ip()).filter(|ip| !ip.is_unspecified())),
        request_retention: std::time::Duration::from_secs(args.request_retention),
        lease: args
            .lease_from
            .map(|controller| node_runtime::quorum::LeaseConfig {
                controller,
                ttl: std::time::Duration::from_millis(args.lease_ttl_ms),
                local_address: Some(args.listen.ip()).filter(|ip| !ip.is_unspecified()),
            }),
        stop_vms_on_exit: args.stop_vms_on_exit,
        vmm_own_process_group: args.vmm_process_group == "own",
        watchdog: args.watchdog,
        hypervisor: None,
        network: None,
        faults: None,
        sla: node_runtime::node::SlaConfig {
            enforce: args.cgroups == "auto",
            cgroup_parent: args.cgroup_parent,
            dedicated_cpus: args.dedicated_cpus,
            metrics_listen: args.metrics_listen,
            preempt_below_available: args.preempt_below_available.unwrap_or(0),
            preempt_above_cpu_pressure: args.preempt_above_cpu_pressure.unwrap_or(0),
        },
    };
    let shutdown = {
        let _context = runtime.enter();
        node_runtime::server::termination_signal()
    };
    let result = runtime.block_on(node_runtime::server::run(
        config,
        disks,
        args.listen,
        shutdown,
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cairn-node: {}", node_runtime::error_chain(&error));
            ExitCode::from(2)
        }
    }
}

/// `cairn-node --simulate N`.
fn simulate(
    runtime: &tokio::runtime::Runtime,
    args: &Args,
    nodes: usize,
    disks: DiskLayout,
) -> ExitCode {
    let listed = match &args.simulate_nodes {
        None if args.simulate_one_port => node_runtime::simulate::one_port(
            args.simulate_first..args.simulate_first + nodes,
            &args.simulate_prefix,
            args.listen,
        ),
        None => node_runtime::simulate::numbered(
            args.simulate_first..args.simulate_first + nodes,
            &args.simulate_prefix,
            args.listen,
        ),
        Some(file) => std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))
            .and_then(|text| {
                node_runtime::simulate::parse_nodes(&file.display().to_string(), &text)
            })
            .and_then(|listed| {
                if listed.len() == nodes {
                    Ok(listed)
                } else {
                    Err(format!(
                        "--simulate {nodes} but {} lists {} nodes",
                        file.display(),
                        listed.len()
                    ))
                }
            }),
    };
    let listed = match listed {
        Ok(listed) => listed,
        Err(error) => {
            eprintln!("cairn-node --simulate: {error}");
            return ExitCode::from(2);
        }
    };
    let config = node_runtime::simulate::SimulateConfig {
        nodes: listed,
        data_dir: args.data_dir.clone(),
        disks,
        lease: args
            .lease_from
            .clone()
            .map(|controller| node_runtime::quorum::LeaseConfig {
                controller,
                ttl: std::time::Duration::from_millis(args.lease_ttl_ms),
                local_address: None,
            }),
        trusted_controller_keys: args.trusted_controller_keys.clone(),
        request_retention: std::time::Duration::from_secs(args.request_retention),
        one_port: args.simulate_one_port,
    };
    let shutdown = {
        let _context = runtime.enter();
        node_runtime::server::termination_signal()
    };
    match runtime.block_on(node_runtime::simulate::run(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cairn-node --simulate: {error}");
            ExitCode::from(2)
        }
    }
}

/// A size on the command line ("2GiB", "512MiB", bytes), in the spec's grammar.
fn parse_size_arg(text: &str) -> Result<u64, String> {
    if let Ok(bytes) = text.parse::<u64>() {
        return Ok(bytes);
    }
    vm_config::size::parse_size(text).map_err(|error| error.to_string())
}
