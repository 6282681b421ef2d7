//! Argument definitions and dispatch.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::frontend;

/// cairn: a declarative GitOps compiler and reconciler for private clouds.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats of commands that print a model or diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable text.
    Text,
    /// Versioned JSON.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, parse, resolve, check and expand the specs; print every diagnostic.
    Validate {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Read the specs as they are in this git revision instead of the working tree.
        #[arg(long)]
        rev: Option<String>,
        /// Output format of the diagnostics.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Format every spec file canonically (comments kept).
    Fmt {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// List files that would change and exit 1 instead of writing them.
        #[arg(long)]
        check: bool,
    },
    /// Print the compiled model.
    Compile {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Read the specs as they are in this git revision.
        #[arg(long)]
        rev: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Place every VM and volume; explain, what-if and rebalance.
    Place {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// A previous placement (the JSON `place --format json` printed): VMs stay where they are.
        #[arg(long)]
        previous: Option<PathBuf>,
        /// Rank the candidate nodes for one VM, with the parts of each score.
        #[arg(long, value_name = "VM")]
        explain: Option<String>,
        /// What if these failed: node=NAME, rack=NAME or site=NAME (repeatable).
        #[arg(long, value_name = "KIND=NAME")]
        fail: Vec<String>,
        /// Move VMs toward the strategy's optimum within max-moves and max-unavailable.
        #[arg(long)]
        rebalance: bool,
    },
    /// Print the dependency graph and its waves.
    Graph {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "dot")]
        format: crate::placecmd::GraphFormat,
    },
    /// Compare the specs with what the node runtimes report and print the ordered actions.
    Plan {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Write the plan, signed and bound to the observed state, to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Output format (JSON: versioned, see reconciler/ARCHITECTURE-section.md).
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Exit 0 when there is nothing to do and 3 when there are changes.
        #[arg(long)]
        detailed_exitcode: bool,
        /// One line per change, no details and no wave list.
        #[arg(long)]
        concise: bool,
        /// Plan against a recorded observation (JSON, the `observed` object of a plan
        /// file) instead of asking the nodes; uses no state store (offline review, tests).
        #[arg(long, value_name = "FILE", conflicts_with = "out")]
        observed: Option<PathBuf>,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
    /// Carry out a plan: the current one for a spec root, or a saved plan file.
    Apply {
        /// Spec root or a plan file written by `cairn plan --out`.
        #[arg(default_value = ".")]
        target: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// Node actions in flight at once.
        #[arg(long, default_value_t = 8)]
        parallelism: usize,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
    /// What runs where, health and drift.
    Status {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
    /// Volumes of VMs: export one to local NBD clients.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// The local dev cluster: one cairn-node per node of the spec.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Remove the apply lock of a dead `cairn apply` (its id is in the lock error).
    ForceUnlock {
        /// The lock id.
        id: String,
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
        /// Remove the lock even when its holder may still be running.
        #[arg(long)]
        force: bool,
    },
    /// Write the JSON Schemas of the spec language, the compiled model and every JSON output.
    Schema {
        /// Directory to write into.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
    /// Write a synthetic spec repository (for benchmarks and scale tests).
    Gen {
        /// Directory to create (must be empty or absent).
        #[arg(long)]
        out: PathBuf,
        /// Physical nodes.
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// VMs (after group expansion).
        #[arg(long, default_value_t = 1000)]
        vms: usize,
        /// Seed of the pseudo-random choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Measure the compiler on generated repositories and print medians.
    Bench {
        /// Physical nodes.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// VMs.
        #[arg(long, default_value_t = 10_000)]
        vms: usize,
        /// Runs per measurement.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Run the policies (policies/*.rego) against the model, placement and plan.
    Check(crate::policy_cmd::CheckArgs),
    /// Policy tools: unit tests, benchmark.
    Policy {
        #[command(subcommand)]
        command: crate::policy_cmd::PolicyCommand,
    },
    /// Preview what a change between two git revisions would do (for pull requests).
    Diff(crate::diff::DiffArgs),
    /// Verify a commit's SSH signature against trusted keys (git's allowed-signers format).
    VerifyCommit(crate::verify::VerifyArgs),
}

/// `cairn dev` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Start one cairn-node per node of the spec on its address; wait until all answer.
    Up {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Stop the dev nodes (and their VMs) of a spec root.
    Down {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

/// `cairn volume …`.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Export a VM disk's volume over NBD to local clients on the node holding its
    /// primary copy: an owner-only unix socket that closes after its lifetime.
    /// Prints the `nbd+unix://` URI.
    Export {
        /// `VM/DISK`.
        target: String,
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// How long the export stays open (`30m`, `2h`; `0s` = until unexported).
        #[arg(long, default_value = "1h")]
        lifetime: String,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
}

/// Runs a command; returns the exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Validate { dir, rev, format } => frontend::validate(&dir, rev.as_deref(), format),
        Command::Fmt { dir, check } => frontend::fmt(&dir, check),
        Command::Compile { dir, rev, format } => frontend::compile(&dir, rev.as_deref(), format),
        Command::Place {
            dir,
            format,
            previous,
            explain,
            fail,
            rebalance,
        } => crate::placecmd::place(&crate::placecmd::PlaceArgs {
            dir,
            format,
            previous,
            explain,
            fail,
            rebalance,
        }),
        Command::Graph { dir, format } => crate::placecmd::graph(&dir, format),
        Command::Plan {
            dir,
            out,
            format,
            detailed_exitcode,
            concise,
            observed,
            state,
        } => crate::commands::plan_cmd(crate::commands::PlanArgs {
            dir,
            state,
            out,
            format,
            detailed_exitcode,
            concise,
            observed,
        }),
        Command::Apply {
            target,
            auto_approve,
            parallelism,
            state,
        } => crate::commands::apply_cmd(crate::commands::ApplyArgs {
            target,
            state,
            auto_approve,
            parallelism,
        }),
        Command::Status { dir, format, state } => {
            crate::commands::status_cmd(&dir, state.as_deref(), format)
        }
        Command::Volume { command } => match command {
            VolumeCommand::Export {
                target,
                dir,
                lifetime,
                state,
            } => crate::commands::volume_export(&dir, state.as_deref(), &target, &lifetime),
        },
        Command::Dev { command } => match command {
            DevCommand::Up { dir } => crate::commands::dev_up(&dir),
            DevCommand::Down { dir } => crate::commands::dev_down(&dir),
        },
        Command::ForceUnlock {
            id,
            dir,
            state,
            force,
        } => crate::commands::force_unlock(&dir, state.as_deref(), &id, force),
        Command::Schema { out } => frontend::schema(&out),
        Command::Gen {
            out,
            nodes,
            vms,
            seed,
        } => frontend::generate(&out, nodes, vms, seed),
        Command::Bench { nodes, vms, runs } => frontend::bench(nodes, vms, runs),
        Command::Check(args) => crate::policy_cmd::check(args),
        Command::Policy { command } => crate::policy_cmd::policy(command),
        Command::Diff(args) => crate::diff::run(args),
        Command::VerifyCommit(args) => crate::verify::run(args),
    }
}
