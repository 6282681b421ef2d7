//! `cairn-vmm`: runs exactly one VM in this process, for the node agent to supervise.
//!
//! ```text
//! cairn-vmm --config VM.json
//! cairn-vmm --vm-dir DIR --memory 64MiB [--name NAME] [--vcpus N] [--builtin cairn-guest]
//!           [--disk FILE [--disk-read-only]] [--nic tap=NAME[,mac=MAC][,ipv4=ADDRESS]]
//!           [--kernel BZIMAGE [--initrd FILE] [--cmdline TEXT]]
//!           [--serial-log FILE] [--control-socket PATH] [--memory-mib N]
//!           [--tick-ms 10] [--dirty-rate PAGES_PER_SECOND] [--grace-ms 2000]
//! cairn-vmm (--config VM.json | VM flags) --incoming HOST:PORT
//! cairn-vmm (--config VM.json | VM flags) --ft-secondary HOST:PORT
//! cairn-vmm --host-info
//! ```
//!
//! With `--incoming` the process is a live migration's destination: it builds the same
//! VM without loading a guest, serves its control socket, listens on HOST:PORT for one
//! source (`migrate` control request there), and runs the VM only after
//! `migrate-commit` (exit 7 when aborted or failed before that; see vmm/ARCHITECTURE.md,
//! "Live migration").
//!
//! With `--ft-secondary` the process is a fault-tolerant VM's secondary: built the same
//! way, it receives one primary's checkpoints (`ft-start` control request there) on
//! HOST:PORT, holds the last complete one, and runs the VM from it only after
//! `ft-promote` (exit 7 after `ft-stop` or when nothing can be resumed; see
//! vmm/ARCHITECTURE.md, "Fault tolerance").
//!
//! The VM is a `vm_config::VmConfig`: read from `--config` (what the node writes), or
//! built from the flags (for people and tests); either way it is validated once and
//! built by one recipe (`Vm::create`). Sizes are parsed by `vm_config::size`, the
//! grammar the compiler uses. With flags it appends the serial console to
//! `DIR/console.log`, serves the control socket `DIR/control.sock` (see
//! `vmm::control`); it creates the directories of both if needed, prints one JSON event per
//! line on stdout (`started`, `first-heartbeat`, `rebooted`, `exited`) and exits with the
//! status documented in `vmm::exit_code` (0 stopped, 2 usage, 3 host, 4 guest crashed,
//! 5 VMM failed). Without `--kernel` it boots the built-in guest `cairn-guest`.
//! SIGTERM or SIGINT request a graceful power-off (exit 0); SIGKILL is the hard stop.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use vm_config::{BootSource, DiskConfig, MacAddress, NicConfig, VmConfig};
use vmm::devices::virtio_net::{NicArg, default_mac};
use vmm::kvm::HostKvm;
use vmm::vm::Notification;
use vmm::{Vm, control, exit_code};

#[derive(Debug, Parser)]
#[command(
    name = "cairn-vmm",
    version,
    about = "cairn's KVM micro-VMM: runs one VM in this process"
)]
struct Cli {
    /// Print what this host's KVM offers, as JSON, and exit.
    #[arg(long, exclusive = true)]
    host_info: bool,
    /// Run the VM this JSON file describes (a `vm_config::VmConfig`, as cairn-node
    /// writes it); no other VM flag may be given.
    #[arg(long, conflicts_with_all = ["vm_dir", "memory", "memory_mib", "serial_log", "control_socket", "builtin", "disk", "nic", "kernel"])]
    config: Option<PathBuf>,
    #[arg(long)]
    incoming: Option<String>,
    /// Be a fault-tolerant VM's secondary: receive checkpoints on HOST:PORT and run
    /// the VM only once promoted (`ft-promote`).
    #[arg(long, conflicts_with = "incoming")]
    ft_secondary: Option<String>,
    /// An open descriptor (inherited from cairn-node) of the cpu cgroup file each vCPU
    /// thread writes itself into before it runs the guest (cgroup v1 `tasks`): the
    /// SLA class's CPU share then holds the guest alone, not the VMM's control and I/O
    /// threads.
    #[arg(long, value_name = "FD")]
    vcpu_cgroup_fd: Option<i32>,
    /// The VM's directory: console.log and control.sock live here unless
    /// --serial-log / --control-socket say otherwise.
    #[arg(long, required_unless_present_any = ["host_info", "control_socket", "config"])]
    vm_dir: Option<PathBuf>,
    /// The VM's name (shown in events and errors).
    #[arg(long, default_value = "vm")]
    name: String,
    /// Guest RAM, with a unit (e.g. 64MiB, 1GiB): the compiler's size grammar.
    #[arg(long, value_parser = parse_size, required_unless_present_any = ["host_info", "memory_mib", "config"])]
    memory: Option<u64>,
    /// Guest RAM in MiB (alternative to --memory).
    #[arg(long, conflicts_with = "memory")]
    memory_mib: Option<u64>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Where the serial console is appended (default: VM_DIR/console.log).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Where the control socket is served (default: VM_DIR/control.sock).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Boot a built-in guest; the only one is `cairn-guest` (the default without --kernel).
    #[arg(long, conflicts_with = "kernel")]
    builtin: Option<String>,
    /// A file (or block device) served as a virtio-blk disk; repeat for more disks (at
    /// most 8; the built-in guest self-tests the first).
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// A network device on an existing tap of this namespace:
    /// `tap=NAME[,mac=aa:bb:cc:dd:ee:ff][,ipv4=ADDRESS]`; repeat for more (at most 8).
    /// The built-in guest answers ARP and ping for the first NIC's ipv4.
    #[arg(long)]
    nic: Vec<NicArg>,
    /// Serve every disk read-only.
    #[arg(long, requires = "disk")]
    disk_read_only: bool,
    /// Boot this Linux bzImage instead of the built-in guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd for --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(
        long,
        requires = "kernel",
        default_value = vm_config::DEFAULT_CMDLINE
    )]
    cmdline: String,
    /// Main-loop period of the built-in guest, in milliseconds.
    #[arg(long, default_value_t = 10)]
    tick_ms: u64,
    /// Pages per second the built-in guest dirties from the start.
    #[arg(long, default_value_t = 0)]
    dirty_rate: u64,
    /// How long a graceful power-off waits for the guest, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    grace_ms: u64,
}

/// Parses a size with `vm_config::size`, the one size grammar.
fn parse_size(text: &str) -> Result<u64, String> {
    vm_config::size::parse_size(text).map_err(|error| {
        let units: Vec<&str> = vm_config::size::SIZE_UNITS
            .iter()
            .map(|(unit, _)| *unit)
            .collect();
        format!("{error} (units: {})", units.join(" "))
    })
}

fn emit(event: serde_json::Value) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (the agent stopped reading) must not stop the VM.
    let _ = writeln!(stdout, "{event}");
    let _ = stdout.flush();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.host_info {
        let host = HostKvm::detect();
        let check = vmm::kvm::open_checked()
            .err()
            .map(|error| error.to_string());
        emit(json!({
            "kvm": host,
            "usable": check.is_none(),
            "problem": check,
            "linux_bootable": host.linux_unbootable_reason().is_none(),
            "linux_unbootable_reason": host.linux_unbootable_reason(),
        }));
        return ExitCode::SUCCESS;
    }
    ExitCode::from(run(cli))
}

/// Blocks SIGTERM and SIGINT in every thread (call before any thread starts) and returns
/// the set, for a dedicated thread to `sigwait` on: termination becomes a graceful
/// power-off instead of killing the VM mid-write.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use and
    // pthread_sigmask only changes this thread's mask (inherited by threads spawned later).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Takes the inherited descriptor `fd` as the vCPU threads' cgroup file (close-on-exec
/// from now on: nothing this process runs inherits it further).
fn take_vcpu_cgroup(fd: i32) -> Result<(), String> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: fcntl(2) on a descriptor number only reads or sets its flags; a number
    // that is not open fails with EBADF, checked before the descriptor is owned.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(format!(
            "not an open descriptor ({})",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is open (checked above) and inherited for this process alone to own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    vmm::vcpu::set_vcpu_cgroup(file)
}

/// Reads the VM a `--config` file describes (not yet validated: `Vm::create` does that).
fn read_config(path: &std::path::Path) -> Result<VmConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read the VM config {}: {error}", path.display()))?;
    serde_json::from_str(&text).map_err(|error| {
        format!(
            "the VM config {} is not a cairn-vmm VM description: {error}",
            path.display()
        )
    })
}

/// Builds the VM the flags describe (not yet validated: `Vm::create` does that). Paths
/// are made absolute here, so the description means the same from any directory.
fn config_from_flags(cli: Cli) -> Result<VmConfig, String> {
    let absolute = |path: &std::path::Path| {
        std::path::absolute(path)
            .map_err(|error| format!("cannot make {} absolute: {error}", path.display()))
    };
    let vm_dir = match (&cli.vm_dir, &cli.control_socket) {
        (Some(directory), _) => directory.clone(),
        (None, Some(socket)) => socket
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".")),
        (None, None) => unreachable!("clap requires --vm-dir or --control-socket"),
    };
    let vm_dir = absolute(&vm_dir)?;
    let memory_bytes = match (cli.memory, cli.memory_mib) {
        (Some(bytes), _) => bytes,
        (None, Some(mib)) => mib.saturating_mul(1 << 20),
        (None, None) => unreachable!("clap requires --memory or --memory-mib"),
    };
    let boot = match cli.kernel {
        None => BootSource::Builtin {
            name: cli
                .builtin
                .unwrap_or_else(|| vm_config::BUILTIN_GUEST.to_string()),
        },
        Some(kernel) => BootSource::Kernel {
            kernel: absolute(&kernel)?,
            initrd: cli.initrd.as_deref().map(absolute).transpose()?,
            cmdline: cli.cmdline,
        },
    };
    let disks = cli
        .disk
        .iter()
        .map(|path| {
            Ok(DiskConfig {
                path: absolute(path)?,
                read_only: cli.disk_read_only,
                nbd_export: None,
            })
        })
        .collect::<Result<_, String>>()?;
    let nics = cli
        .nic
        .iter()
        .enumerate()
        .map(|(index, nic)| NicConfig {
            tap: nic.tap.clone(),
            mac: MacAddress(nic.mac.unwrap_or_else(|| default_mac(&cli.name, index))),
            ipv4: nic.ipv4,
        })
        .collect();
    let console_log = match cli.serial_log {
        Some(path) => absolute(&path)?,
        None => vm_dir.join("console.log"),
    };
    let control_socket = match cli.control_socket {
        Some(path) => absolute(&path)?,
        None => vm_dir.join("control.sock"),
    };
    Ok(VmConfig {
        format_version: vm_config::FORMAT_VERSION,
        name: cli.name,
        vcpus: cli.vcpus,
        memory_bytes,
        boot,
        disks,
        nics,
        control_socket,
        console_log,
        tick_ms: cli.tick_ms.max(1),
        dirty_pages_per_second: cli.dirty_rate,
        power_off_grace_ms: cli.grace_ms,
        incarnation: String::new(),
        fence_deadline_boottime_ns: 0,
    })
}

/// A VM built to receive its memory and state from a peer, before it runs.
struct Waiting {
    vm: Vm,
    listener: std::net::TcpListener,
    server: control::ControlServer,
    name: String,
    socket: PathBuf,
}

/// Whom a VM built without a guest waits for.
#[derive(Debug, Clone, Copy)]
enum Peer {
    /// A live migration's source (`--incoming`).
    MigrationSource,
    /// A fault-tolerant VM's primary (`--ft-secondary`).
    FtPrimary,
}

/// Builds the VM (no guest loaded), listens on `address` for its peer, serves the
/// control socket and prints its event with the address it listens on.
fn wait_for_peer(config: VmConfig, address: &str, peer: Peer) -> Result<Waiting, u8> {
    let name = config.name.clone();
    let socket = config.control_socket.clone();
    let (created, event, what) = match peer {
        Peer::MigrationSource => (Vm::create_incoming(config), "incoming", "the migration"),
        Peer::FtPrimary => (
            Vm::create_ft_secondary(config),
            "ft-secondary",
            "checkpoints",
        ),
    };
    let vm = created.map_err(|error| fail(&name, &error, error.exit_code()))?;
    let listener = std::net::TcpListener::bind(address).map_err(|error| {
        eprintln!("error: vm {name}: cannot listen for {what} on {address}: {error}");
        exit_code::USAGE
    })?;
    let server = control::serve(&socket, vm.handle()).map_err(|error| {
        eprintln!(
            "error: vm {name}: cannot serve the control socket {}: {error}",
            socket.display()
        );
        exit_code::USAGE
    })?;
    emit(json!({
        "event": event,
        "name": name,
        "pid": std::process::id(),
        "listening": listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "control_socket": socket,
    }));
    Ok(Waiting {
        vm,
        listener,
        server,
        name,
        socket,
    })
}

impl Waiting {
    /// The VM never ran here: lets the control socket's last answers out and exits
    /// with [`exit_code::MIGRATION_NOT_COMMITTED`].
    fn not_run(&self, outcome: &str, detail: String) -> u8 {
        self.server.drain(Duration::from_millis(500));
        let _ = std::fs::remove_file(&self.socket);
        let code = exit_code::MIGRATION_NOT_COMMITTED;
        emit(json!({"event": "exited", "outcome": outcome, "detail": detail, "exit_code": code}));
        code
    }

    /// Announces the NICs and starts the vCPUs from the state received.
    fn start(self) -> Result<(vmm::vm::RunningVm, control::ControlServer), u8> {
        let announced = self.vm.announce_nics();
        if announced > 0 {
            emit(json!({"event": "announced", "name": self.name, "frames": announced}));
        }
        let name = self.name;
        let running = self
            .vm
            .start()
            .map_err(|error| fail(&name, &error, error.exit_code()))?;
        Ok((running, self.server))
    }
}

/// The destination of a live migration: builds the VM without a guest, serves the
/// control socket, receives memory and state, and starts the VM once committed.
fn receive(
    config: VmConfig,
    address: &str,
) -> Result<(vmm::vm::RunningVm, control::ControlServer), u8> {
    let mut waiting = wait_for_peer(config, address, Peer::MigrationSource)?;
    match waiting.vm.receive_migration(&waiting.listener) {
        Ok((vmm::migration::Decision::Commit, link)) => {
            let started = waiting.start()?;
            vmm::migration::confirm_started(link);
            Ok(started)
        }
        Ok((vmm::migration::Decision::Abort, _)) => Err(waiting.not_run(
            "migration-aborted",
            "the migration was aborted before the commit; this VM never ran here".into(),
        )),
        Err(error) => {
            eprintln!(
                "error: vm {}: incoming migration failed: {error}",
                waiting.name
            );
            Err(waiting.not_run("migration-failed", error))
        }
    }
}

/// A fault-tolerance secondary: builds the VM without a guest, serves the control
/// socket, applies the primary's checkpoints, and starts the VM from the last complete
/// one once promoted.
fn secondary(
    config: VmConfig,
    address: &str,
) -> Result<(vmm::vm::RunningVm, control::ControlServer), u8> {
    let mut waiting = wait_for_peer(config, address, Peer::FtPrimary)?;
    if let Err(error) = waiting.vm.run_ft_secondary(&waiting.listener) {
        waiting.vm.handle().ft_failed(&error);
        return Err(waiting.not_run("ft-not-promoted", error));
    }
    let handle = waiting.vm.handle();
    let name = waiting.name.clone();
    let started = waiting.start()?;
    handle.ft_promoted();
    emit(json!({"event": "promoted", "name": name}));
    Ok(started)
}

fn run(cli: Cli) -> u8 {
    let termination = block_termination_signals();
    if let Some(fd) = cli.vcpu_cgroup_fd
        && let Err(error) = take_vcpu_cgroup(fd)
    {
        eprintln!("error: --vcpu-cgroup-fd {fd}: {error}");
        return exit_code::USAGE;
    }
    let incoming = cli.incoming.clone();
    let ft_secondary = cli.ft_secondary.clone();
    let config = match &cli.config {
        Some(path) => read_config(path),
        None => config_from_flags(cli),
    };
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return exit_code::USAGE;
        }
    };
    let name = config.name.clone();
    let socket = config.control_socket.clone();
    let console_log = config.console_log.clone();
    let (running, server) = match (incoming, ft_secondary) {
        (Some(address), _) => match receive(config, &address) {
            Ok(started) => started,
            Err(code) => return code,
        },
        (None, Some(address)) => match secondary(config, &address) {
            Ok(started) => started,
            Err(code) => return code,
        },
        (None, None) => {
            let vm = match Vm::create(config) {
                Ok(vm) => vm,
                Err(error) => return fail(&name, &error, error.exit_code()),
            };
            let running = match vm.start() {
                Ok(running) => running,
                Err(error) => return fail(&name, &error, error.exit_code()),
            };
            let server = match control::serve(&socket, running.handle()) {
                Ok(server) => server,
                Err(error) => {
                    eprintln!(
                        "error: vm {name}: cannot serve the control socket {}: {error}",
                        socket.display()
                    );
                    let _ = running.handle().power_off(true);
                    let _ = running.wait();
                    return exit_code::USAGE;
                }
            };
            (running, server)
        }
    };
    let handle = running.handle();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: `termination` is an initialised signal set blocked in every thread;
            // sigwait writes the received signal number into `signal`.
            while unsafe { libc::sigwait(&termination, &mut signal) } == 0 {
                let _ = handle.power_off(false);
            }
        });
    emit(json!({
        "event": "started",
        "name": name,
        "pid": std::process::id(),
        "control_socket": socket,
        "console_log": console_log,
    }));
    let outcome = running.wait_with(|notification| match notification {
        Notification::FirstHeartbeat(after) => {
            emit(json!({"event": "first-heartbeat", "after_us": after.as_micros() as u64}));
        }
        Notification::Rebooted(boot) => emit(json!({"event": "rebooted", "boot_count": boot})),
    });
    // Let the response to the request that ended the VM (power-off) reach its client.
    server.drain(Duration::from_millis(500));
    let _ = std::fs::remove_file(&socket);
    let code = outcome.exit_code();
    emit(
        json!({"event": "exited", "outcome": outcome.kind(), "detail": outcome.detail(), "exit_code": code}),
    );
    if code != exit_code::STOPPED {
        eprintln!("error: vm {name} {}: {}", outcome.kind(), outcome.detail());
    }
    code
}

fn fail(name: &str, error: &dyn std::error::Error, code: u8) -> u8 {
    let mut message = format!("error: vm {name}: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    code
}
