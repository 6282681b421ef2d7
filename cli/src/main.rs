//! `cairn`: the command-line front end.
//!
//! `fn main` parses arguments with clap, runs the command and maps the result
//! to the exit codes of CLI.md: 0 success, 1 the specs (or cluster) are not
//! acceptable, 2 usage error or internal failure, 3 changes pending
//! (`plan --detailed-exitcode`).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc, not glibc's malloc: at 10,000 nodes / 100,000 VMs the controller's
/// syncs build and drop millions of small strings and maps, and glibc's arenas
/// kept gigabytes it had freed (controller/ARCHITECTURE.md, "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod audit;
mod authz;
mod cli;
mod commands;
mod ctx;
mod dev;
mod diff;
mod failover;
mod frontend;
mod gitops;
mod incrbench;
mod keys;
mod packbench;
mod placecmd;
mod policy_cmd;
mod progress;
mod simulate;
mod site_failover;
mod statebackup;
mod tokens;
mod verify;
mod vmcmd;
mod volumecmd;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {e}");
            for cause in e.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {cause}");
            }
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
