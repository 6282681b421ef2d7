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
    /// Write the JSON Schemas of the spec language and of the compiled model.
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
}

/// Runs a command; returns the exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Validate { dir, rev, format } => frontend::validate(&dir, rev.as_deref(), format),
        Command::Fmt { dir, check } => frontend::fmt(&dir, check),
        Command::Compile { dir, rev, format } => frontend::compile(&dir, rev.as_deref(), format),
        Command::Schema { out } => frontend::schema(&out),
        Command::Gen {
            out,
            nodes,
            vms,
            seed,
        } => frontend::generate(&out, nodes, vms, seed),
        Command::Bench { nodes, vms, runs } => frontend::bench(nodes, vms, runs),
    }
}
