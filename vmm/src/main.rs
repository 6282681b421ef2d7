//! `cairn-vmm`: runs exactly one VM in this process, for the node agent to supervise.
//!
//! ```text
//! cairn-vmm --vm-dir DIR --memory 64MiB [--name NAME] [--vcpus N] [--builtin cairn-guest]
//!           [--disk FILE [--disk-read-only]] [--nic tap=NAME[,mac=MAC][,ipv4=ADDRESS]]
//!           [--kernel BZIMAGE [--initrd FILE] [--cmdline TEXT]]
//!           [--serial-log FILE] [--control-socket PATH] [--memory-mib N]
//!           [--tick-ms 10] [--dirty-rate PAGES_PER_SECOND] [--grace-ms 2000]
//! cairn-vmm --host-info
//! ```
//!
//! It creates `DIR` if needed, appends the serial console to `DIR/console.log`, serves
//! the control socket `DIR/control.sock` (see `vmm::control`), prints one JSON event per
//! line on stdout (`started`, `first-heartbeat`, `rebooted`, `exited`) and exits with the
//! status documented in `vmm::exit_code` (0 stopped, 2 usage, 3 host, 4 guest crashed,
//! 5 VMM failed). Without `--kernel` it boots the built-in guest `cairn-guest`.
//! SIGTERM or SIGINT request a graceful power-off (exit 0); SIGKILL is the hard stop.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use vmm::devices::block::{BlockBackend, FileBackend};
use vmm::devices::virtio_net::{NicArg, default_mac, open_tap};
use vmm::kvm::HostKvm;
use vmm::vm::{NicConfig, Notification};
use vmm::{BootSource, Vm, VmConfig, control, exit_code};

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
    /// The VM's directory: console.log and control.sock live here unless
    /// --serial-log / --control-socket say otherwise.
    #[arg(long, required_unless_present_any = ["host_info", "control_socket"])]
    vm_dir: Option<PathBuf>,
    /// The VM's name (shown in events and errors).
    #[arg(long, default_value = "vm")]
    name: String,
    /// Guest RAM, with a unit: B, KiB, MiB, GiB (e.g. 64MiB).
    #[arg(long, value_parser = parse_size, required_unless_present_any = ["host_info", "memory_mib"])]
    memory: Option<u64>,
    /// Guest RAM in MiB (alternative to --memory).
    #[arg(long, conflicts_with = "memory")]
    memory_mib: Option<u64>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
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
        default_value = "console=ttyS0 reboot=k panic=1"
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

/// Parses `64MiB`, `1GiB`, `4096B` or a bare byte count.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 64MiB"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
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

fn run(cli: Cli) -> u8 {
    let termination = block_termination_signals();
    let vm_dir = match (&cli.vm_dir, &cli.control_socket) {
        (Some(directory), _) => directory.clone(),
        (None, Some(socket)) => socket
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".")),
        (None, None) => unreachable!("clap requires --vm-dir or --control-socket"),
    };
    if let Err(error) = std::fs::create_dir_all(&vm_dir) {
        eprintln!(
            "error: vm {}: cannot create the VM directory {}: {error}",
            cli.name,
            vm_dir.display()
        );
        return exit_code::USAGE;
    }
    if let Some(builtin) = &cli.builtin
        && builtin != vmm::guest::BUILTIN_NAME
    {
        eprintln!(
            "error: vm {}: unknown built-in guest `{builtin}` (the only one is `{}`)",
            cli.name,
            vmm::guest::BUILTIN_NAME
        );
        return exit_code::USAGE;
    }
    let memory_bytes = match (cli.memory, cli.memory_mib) {
        (Some(bytes), _) => bytes,
        (None, Some(mib)) => mib << 20,
        (None, None) => unreachable!("clap requires --memory or --memory-mib"),
    };
    let mut disks: Vec<Arc<dyn BlockBackend>> = Vec::with_capacity(cli.disk.len());
    for path in &cli.disk {
        match FileBackend::open(path, cli.disk_read_only) {
            Ok(backend) => disks.push(Arc::new(backend)),
            Err(error) => {
                eprintln!(
                    "error: vm {}: cannot open the disk {}: {error}",
                    cli.name,
                    path.display()
                );
                return exit_code::USAGE;
            }
        }
    }
    let mut nics = Vec::with_capacity(cli.nic.len());
    for (index, nic) in cli.nic.iter().enumerate() {
        match open_tap(&nic.tap) {
            Ok(tap) => nics.push(NicConfig {
                tap_name: nic.tap.clone(),
                tap: Arc::new(tap),
                mac: nic.mac.unwrap_or_else(|| default_mac(&cli.name, index)),
                ipv4: nic.ipv4,
            }),
            Err(error) => {
                eprintln!(
                    "error: vm {}: cannot attach to the tap {}: {error} (the tap must exist in this network namespace, and attaching needs CAP_NET_ADMIN or the tap's owner)",
                    cli.name, nic.tap
                );
                return exit_code::USAGE;
            }
        }
    }
    let boot = match cli.kernel {
        None => BootSource::Builtin,
        Some(kernel) => BootSource::Linux {
            kernel,
            initrd: cli.initrd,
            cmdline: cli.cmdline,
        },
    };
    let console_log = cli.serial_log.unwrap_or_else(|| vm_dir.join("console.log"));
    let socket = cli
        .control_socket
        .unwrap_or_else(|| vm_dir.join("control.sock"));
    let config = VmConfig {
        memory_bytes,
        vcpus: cli.vcpus,
        boot,
        disks,
        nics,
        console_log: console_log.clone(),
        tick: Duration::from_millis(cli.tick_ms.max(1)),
        dirty_pages_per_second: cli.dirty_rate,
        power_off_grace: Duration::from_millis(cli.grace_ms),
    };
    let name = cli.name;
    let vm = match Vm::create(config) {
        Ok(vm) => vm,
        Err(error) => return fail(&name, &error, error.exit_code()),
    };
    let running = match vm.start() {
        Ok(running) => running,
        Err(error) => return fail(&name, &error, error.exit_code()),
    };
    let server = match control::serve(&socket, running.controller()) {
        Ok(server) => server,
        Err(error) => {
            eprintln!(
                "error: vm {name}: cannot serve the control socket {}: {error}",
                socket.display()
            );
            let _ = running.controller().power_off(true);
            let _ = running.wait();
            return exit_code::USAGE;
        }
    };
    let controller = running.controller();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: `termination` is an initialised signal set blocked in every thread;
            // sigwait writes the received signal number into `signal`.
            while unsafe { libc::sigwait(&termination, &mut signal) } == 0 {
                let _ = controller.power_off(false);
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
