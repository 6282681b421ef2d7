//! Repository tasks (`cargo xtask <task>`), in Rust rather than shell.
//!
//! - `ci`: install what the tests need (Debian packages), then format check,
//!   clippy and every test of the workspace. `.ci/run` calls exactly this.
//! - `quickstart`: build cairn and run the quickstart on the local dev cluster.
//! - `bless`: re-bless the golden files under `golden-tests/`.
//! - `schemas`: regenerate `schemas/`.
//! - `bench`: print the benchmark figures of every budget that has one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Debian packages the test suite uses: qemu-img/qemu-io speak NBD to
/// volumes, iperf3 measures QoS classes, iproute2 drives namespaces and tc,
/// git builds fixture repositories, binutils assembles the built-in guest.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("iperf3", "iperf3"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("git", "git"),
    ("objcopy", "binutils"),
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?
        .to_owned();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("quickstart") => quickstart(&root),
        Some("bless") => run(Command::new("cargo")
            .args(["test", "-p", "reconciler", "--test", "it", "golden"])
            .env("UPDATE_GOLDEN", "1")),
        Some("schemas") => run(Command::new("cargo").args([
            "run",
            "-q",
            "-p",
            "reconciler",
            "--bin",
            "cairn",
            "--",
            "schema",
            "--out",
            "schemas",
        ])),
        Some("bench") => bench(),
        _ => {
            eprintln!("usage: cargo xtask <ci|quickstart|bless|schemas|bench>");
            std::process::exit(2);
        }
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Installs the Debian packages the tests need, when missing and possible.
fn install_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        eprintln!(
            "note: missing {missing:?} and cannot install them (not root or no apt-get); the tests that need them will skip and say so"
        );
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ci() -> anyhow::Result<()> {
    install_packages()?;
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo").args(["test", "--workspace", "--no-fail-fast"]))
}

fn quickstart(root: &Path) -> anyhow::Result<()> {
    install_packages()?;
    run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "reconciler",
        "-p",
        "node-runtime",
    ]))?;
    let bin: PathBuf = root.join("target/release/cairn");
    let specs = "examples/quickstart";
    for args in [vec!["validate", specs], vec!["compile", specs]] {
        run(Command::new(&bin).args(&args))?;
    }
    Ok(())
}

fn bench() -> anyhow::Result<()> {
    run(Command::new("cargo").args(["build", "--release", "-p", "reconciler"]))?;
    run(Command::new("target/release/cairn").args(["bench", "--nodes", "1000", "--vms", "10000"]))?;
    run(Command::new("target/release/cairn").args([
        "bench", "--nodes", "10000", "--vms", "100000", "--runs", "3",
    ]))
}
