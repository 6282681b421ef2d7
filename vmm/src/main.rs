//! `cairn-vmm`: runs exactly one VM in this process, for the node agent to supervise.
//!
//! ```text
//! cairn-vmm run --vm-dir DIR --memory 64MiB [--vcpus N] [--disk FILE [--disk-read-only]]
//!               [--kernel BZIMAGE [--initrd FILE] [--cmdline TEXT]]
//!               [--tick-ms 10] [--dirty-rate PAGES_PER_SECOND] [--grace-ms 2000]
//! cairn-vmm host-info
//! ```
//!
//! `run` creates `DIR` if needed, appends the serial console to `DIR/console.log`, serves
//! the control socket `DIR/control.sock` (see `vmm::control`), prints one JSON event per
//! line on stdout (`started`, `first-heartbeat`, `rebooted`, `exited`) and exits with the
//! status documented in `vmm::exit_code` (0 stopped, 2 usage, 3 host, 4 guest crashed,
//! 5 VMM failed). Without `--kernel` it boots the built-in guest `cairn-guest`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;
use vmm::devices::block::{BlockBackend, FileBackend};
use vmm::kvm::HostKvm;
use vmm::vm::Notification;
use vmm::{BootSource, Vm, VmConfig, control, exit_code};

#[derive(Debug, Parser)]
#[command(
    name = "cairn-vmm",
    version,
    about = "cairn's KVM micro-VMM: one VM per process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one VM until it powers off, crashes or is killed.
    Run(RunArgs),
    /// Print what this host's KVM offers, as JSON.
    HostInfo,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The VM's directory: console.log and control.sock live here.
    #[arg(long)]
    vm_dir: PathBuf,
    /// Guest RAM, with a unit: B, KiB, MiB, GiB (e.g. 64MiB).
    #[arg(long, value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// A file (or block device) served as the virtio-blk disk.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Serve the disk read-only.
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
    match cli.command {
        Command::HostInfo => {
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
            ExitCode::SUCCESS
        }
        Command::Run(args) => ExitCode::from(run(args)),
    }
}

fn run(args: RunArgs) -> u8 {
    if let Err(error) = std::fs::create_dir_all(&args.vm_dir) {
        eprintln!(
            "error: cannot create the VM directory {}: {error}",
            args.vm_dir.display()
        );
        return exit_code::USAGE;
    }
    let disk: Option<Arc<dyn BlockBackend>> = match &args.disk {
        None => None,
        Some(path) => match FileBackend::open(path, args.disk_read_only) {
            Ok(backend) => Some(Arc::new(backend)),
            Err(error) => {
                eprintln!("error: cannot open the disk {}: {error}", path.display());
                return exit_code::USAGE;
            }
        },
    };
    let boot = match args.kernel {
        None => BootSource::Builtin,
        Some(kernel) => BootSource::Linux {
            kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
        },
    };
    let config = VmConfig {
        memory_bytes: args.memory,
        vcpus: args.vcpus,
        boot,
        disk,
        console_log: args.vm_dir.join("console.log"),
        tick: Duration::from_millis(args.tick_ms.max(1)),
        dirty_pages_per_second: args.dirty_rate,
        power_off_grace: Duration::from_millis(args.grace_ms),
    };
    let vm = match Vm::create(config) {
        Ok(vm) => vm,
        Err(error) => return fail(&error, error.exit_code()),
    };
    let running = match vm.start() {
        Ok(running) => running,
        Err(error) => return fail(&error, error.exit_code()),
    };
    let socket = args.vm_dir.join("control.sock");
    if let Err(error) = control::serve(&socket, running.controller()) {
        eprintln!(
            "error: cannot serve the control socket {}: {error}",
            socket.display()
        );
        let _ = running.controller().power_off(true);
        let _ = running.wait();
        return exit_code::USAGE;
    }
    emit(json!({
        "event": "started",
        "pid": std::process::id(),
        "control_socket": socket,
        "console_log": args.vm_dir.join("console.log"),
    }));
    let outcome = running.wait_with(|notification| match notification {
        Notification::FirstHeartbeat(after) => {
            emit(json!({"event": "first-heartbeat", "after_us": after.as_micros() as u64}));
        }
        Notification::Rebooted(boot) => emit(json!({"event": "rebooted", "boot_count": boot})),
    });
    let _ = std::fs::remove_file(&socket);
    let code = outcome.exit_code();
    emit(
        json!({"event": "exited", "outcome": outcome.kind(), "detail": outcome.detail(), "exit_code": code}),
    );
    if code != exit_code::STOPPED {
        eprintln!("error: the VM {}: {}", outcome.kind(), outcome.detail());
    }
    code
}

fn fail(error: &dyn std::error::Error, code: u8) -> u8 {
    let mut message = format!("error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    code
}
