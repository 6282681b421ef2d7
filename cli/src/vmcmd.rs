//! `cairn vm disk-io VM --disk DISK write-pattern|checksum`: the built-in guest of a
//! running VM writes a seeded pattern to, or reads and checksums (CRC-32C), a range of
//! one of its disks through its own virtio-blk driver, on the node that runs it
//! (`Apply.GuestDiskIo`, signed with the controller key like every node call). Prints
//! the guest's checksum and its own I/O counters of that disk.
//!
//! `cairn vm reboot VM` and `cairn vm console VM` go through the controller
//! (`controller::vm_actions`): actions signed with the operator's key and audited
//! with their signer (issue 20).

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use reconciler::observe::{NodeObservation, observe};

use crate::commands::{load, runtime};

/// `cairn vm …`.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Have the built-in guest (cairn-guest) of a running VM write a seeded pattern to,
    /// or read and checksum, a range of one of its disks through its own virtio-blk
    /// driver. Prints `crc32c 0x…` (CRC-32C of the bytes written or read) and the
    /// guest's own counters of that disk. The same range written with the same seed
    /// always holds the same bytes, so `checksum` after `write-pattern` prints the same
    /// CRC while the data is intact.
    DiskIo(DiskIo),
    /// Reboot a running VM now, through the controller (an action signed with your
    /// key, audited with its signer). The desired state is unchanged: the VM keeps
    /// its node, disks and NICs. Prints when the new boot began.
    Reboot(OperatorArgs),
    /// Attach to a VM's serial console through the controller (an action signed with
    /// your key, audited with its signer): what the guest prints shows here, what you
    /// type goes to the guest. Detach with Ctrl-] (`--detach-key`). With stdin not a
    /// terminal, what it holds is typed and the console detaches once stdin ends
    /// and the output has been quiet for `--linger`.
    Console(ConsoleArgs),
}

/// The VM and the controller to ask (`cairn vm reboot`, `cairn vm console`).
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// The VM.
    vm: String,
    #[command(flatten)]
    to: crate::cli::ActionFlags,
}

/// The arguments of `cairn vm console`.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    target: OperatorArgs,
    /// The key that detaches: `^]` (Ctrl-], the default), `^A` … `^Z`, `^\\`, `^^`, `^_`.
    #[arg(long, default_value = "^]", value_parser = detach_key)]
    detach_key: u8,
    /// How much of the output before attaching to show first (`4KiB`; `0` for none).
    #[arg(long, default_value = "4KiB", value_parser = |t: &str| size_arg("tail", t))]
    tail: u64,
    /// With stdin not a terminal: how long to go on showing output after stdin ended.
    #[arg(long, default_value = "2s", value_parser = |t: &str| compiler::units::parse_duration(t)
        .map_err(|e| format!("{e} (for example `2s`)")))]
    linger: u64,
}

/// `^]` → 0x1d.
fn detach_key(text: &str) -> Result<u8, String> {
    let bytes = text.as_bytes();
    match bytes {
        [b'^', c] if (b'@'..=b'_').contains(&c.to_ascii_uppercase()) => {
            Ok(c.to_ascii_uppercase() - b'@')
        }
        _ => Err(format!(
            "`{text}` is not a control key; write it as `^]`, `^A` … `^Z`, `^\\`, `^^` or `^_`"
        )),
    }
}

/// What the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiskIoOp {
    /// Write the pattern of `--seed` over the range.
    WritePattern,
    /// Read the range and print its CRC-32C.
    Checksum,
}

/// Runs `cairn vm …`; returns the exit code.
pub fn run(command: VmCommand) -> anyhow::Result<u8> {
    match command {
        VmCommand::DiskIo(args) => disk_io(&args),
        VmCommand::Reboot(args) => Ok(controller::vm_actions::reboot_command(
            &args.to.data_dir,
            args.to.controller.as_deref(),
            &args.vm,
            args.to.key.as_deref(),
        )),
        VmCommand::Console(args) => Ok(controller::vm_actions::console_command(
            &args.target.to.data_dir,
            args.target.to.controller.as_deref(),
            &args.target.vm,
            args.target.to.key.as_deref(),
            &controller::vm_actions::ConsoleOptions {
                detach: args.detach_key,
                tail_bytes: args.tail,
                linger: std::time::Duration::from_millis(args.linger),
            },
        )),
    }
}

/// The arguments of `cairn vm disk-io`.
#[derive(Debug, clap::Args)]
pub struct DiskIo {
    /// The VM.
    vm: String,
    /// `write-pattern` or `checksum`.
    #[arg(value_enum)]
    op: DiskIoOp,
    /// Spec root (default: the current directory).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// The disk: its name in the spec, or its index (0 = the VM's first disk).
    #[arg(long)]
    disk: String,
    /// Where the range starts, in bytes or with a unit (`4KiB`); a multiple of 512.
    #[arg(long, default_value = "0")]
    offset: String,
    /// How long the range is (`1MiB`); a multiple of 512, at most 1GiB.
    #[arg(long, default_value = "1MiB")]
    length: String,
    /// The pattern's seed (write-pattern).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How long to wait for the guest (at most 25s).
    #[arg(long, default_value = "20s")]
    timeout: String,
    /// State store file (default: DIR/.cairn/state.redb).
    #[arg(long, value_name = "PATH")]
    state: Option<PathBuf>,
}

fn size_arg(flag: &str, text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .or_else(|_| compiler::units::parse_size(text))
        .map_err(|e| format!("--{flag} {text}: {e} (bytes, or a size such as `4KiB`)"))
}

fn disk_io(args: &DiskIo) -> anyhow::Result<u8> {
    let parsed = size_arg("offset", &args.offset).and_then(|offset| {
        let length = size_arg("length", &args.length)?;
        let timeout = compiler::units::parse_duration(&args.timeout)
            .map_err(|e| format!("--timeout {}: {e} (for example `20s`)", args.timeout))?;
        Ok((offset, length, timeout))
    });
    let (offset, length, timeout_ms) = match parsed {
        Ok(values) => values,
        Err(message) => {
            eprintln!("error: {message}");
            return Ok(2);
        }
    };
    let loaded = match load(&args.dir, args.state.as_deref())? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let Some(vm) = loaded.model().vm(&args.vm) else {
        eprintln!("error: no vm `{}` in the specs", args.vm);
        return Ok(1);
    };
    let names: Vec<&str> = vm.disks.iter().map(|d| d.name.as_str()).collect();
    let index = names
        .iter()
        .position(|name| *name == args.disk)
        .or_else(|| args.disk.parse::<usize>().ok().filter(|i| *i < names.len()));
    let Some(index) = index else {
        eprintln!(
            "error: vm `{}` has no disk `{}`; its disks: {}",
            args.vm,
            args.disk,
            if names.is_empty() {
                "none".to_owned()
            } else {
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("{n} ({i})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        return Ok(1);
    };
    let signer = loaded.ctx.signer()?;
    let nodes = reconciler::nodes::GrpcNodes::new(signer.clone());
    let spec = reconciler::pipeline::spec_nodes(loaded.model());
    let rt = runtime()?;
    let observed = rt.block_on(observe(&spec, &nodes));
    // A VM that runs beats one starting: during a live migration the destination's
    // copy is starting (it waits for the state) while the source's runs.
    let on = |running: fn(&reconciler::observe::ObservedVm) -> bool| {
        observed.nodes.iter().find_map(|(node, o)| match o {
            NodeObservation::Reachable { vms, .. } => vms
                .get(&args.vm)
                .filter(|vm| running(vm))
                .map(|_| node.clone()),
            NodeObservation::Unreachable { .. } => None,
        })
    };
    let running =
        on(|vm| vm.state == proto::v1::VmState::Running).or_else(|| on(|vm| vm.is_running()));
    let Some(node) = running else {
        eprintln!(
            "error: vm `{}` is not running on any node that answered; `cairn status` shows where it is",
            args.vm
        );
        return Ok(1);
    };
    let request = proto::v1::GuestDiskIoRequest {
        vm: args.vm.clone(),
        disk: index as u32,
        op: match args.op {
            DiskIoOp::WritePattern => proto::v1::GuestDiskOp::WritePattern,
            DiskIoOp::Checksum => proto::v1::GuestDiskOp::ReadChecksum,
        } as i32,
        offset,
        length,
        seed: args.seed,
        timeout_ms: u32::try_from(timeout_ms).unwrap_or(u32::MAX),
    };
    let address = spec[&node].address.clone();
    let answer = rt.block_on(async {
        let mut client = reconciler::nodes::connect(&address, signer).await?;
        client
            .guest_disk_io(request)
            .await
            .map_err(|status| status.message().to_owned())
    });
    let response = match answer {
        Ok(response) => response,
        Err(message) => {
            eprintln!("error: node {node}: {message}");
            return Ok(1);
        }
    };
    let units = |bytes: u64| compiler::units::human_size(bytes);
    println!("crc32c 0x{:08x}", response.crc32c);
    println!(
        "{} {} at offset {}{} of {}/{} (volume {}, vd{}) on node {node} in {} ms",
        match args.op {
            DiskIoOp::WritePattern => "wrote",
            DiskIoOp::Checksum => "read",
        },
        units(length),
        offset,
        match args.op {
            DiskIoOp::WritePattern => format!(" with seed {}", args.seed),
            DiskIoOp::Checksum => String::new(),
        },
        args.vm,
        names[index],
        response.volume,
        (b'a' + (response.device % 26) as u8) as char,
        response.elapsed_ms
    );
    println!(
        "guest count: {} requests, {} read, {} written, {} errors",
        response.guest_requests,
        units(response.guest_bytes_read),
        units(response.guest_bytes_written),
        response.guest_errors
    );
    Ok(0)
}
