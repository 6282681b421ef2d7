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
/// ping reaches the built-in guest over virtio-net,
/// git builds fixture repositories, binutils assembles the built-in guest.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("iperf3", "iperf3"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("git", "git"),
    // The GitOps quickstart and the controller tests sign commits (gpg.format ssh).
    ("ssh-keygen", "openssh-client"),
    ("ping", "iputils-ping"),
    ("objcopy", "binutils"),
    // NBD clients the storage and export tests run (nbdinfo --map, nbdcopy).
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("qemu-io", "qemu-utils"),
    // The controller's /metrics is checked with Prometheus's own tool.
    ("promtool", "prometheus"),
    // The controller's ssh:// remote test runs a private sshd.
    ("sshd", "openssh-server"),
    // The HA partition tests and `controller bench --failover --partition` cut a
    // node's address with nftables.
    ("nft", "nftables"),
    // The console's browser test drives a headless Chromium over the DevTools protocol.
    ("chromium", "chromium"),
    // Controller replicas on etcd: the state-etcd tests and the replicas test start a
    // real etcd; the etcd-client crate's build compiles etcd's protos with protoc.
    ("etcd", "etcd-server"),
    ("protoc", "protobuf-compiler"),
    // Tenant networks' DHCP: cairn-node runs dnsmasq per network (issue 19); the
    // tests' probe "VMs" ask for leases with busybox's udhcpc.
    ("/usr/sbin/dnsmasq", "dnsmasq-base"),
    ("busybox", "busybox"),
    // protoc alone has no well-known types: etcd-client's protos import
    // google/protobuf/descriptor.proto (a fresh machine failed the build without it).
    (
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
    ),
];

/// Python modules of Debian's own python3 the tests use, and their packages: the
/// controller's gRPC health service is probed with a real grpcio client
/// (`grpc_health_probe` is not packaged in Debian).
const PYTHON_MODULES: &[(&str, &str)] = &[("grpc", "python3-grpcio")];

fn have_python_module(module: &str) -> bool {
    Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo xtask` sets CARGO_MANIFEST_DIR when it runs us: prefer it to the
    // compile-time path, which names another checkout when target/ is shared.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let root = manifest_dir
        .parent()
        .context("xtask lives in the workspace")?
        .to_owned();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("quickstart") => quickstart(&root),
        Some("bless") => run(Command::new("cargo")
            .args(["test", "-p", "cli", "--test", "it", "golden"])
            .env("UPDATE_GOLDEN", "1")),
        Some("schemas") => run(Command::new("cargo").args([
            "run", "-q", "-p", "cli", "--bin", "cairn", "--", "schema", "--out", "schemas",
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

/// A program on the PATH, or a file when given as an absolute path.
fn have(program: &str) -> bool {
    if program.starts_with('/') {
        return Path::new(program).is_file();
    }
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
        .chain(
            PYTHON_MODULES
                .iter()
                .filter(|(module, _)| !have_python_module(module))
                .map(|(_, pkg)| *pkg),
        )
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

/// Free space a clean debug build and test run of the workspace needs, with margin
/// (measured: the target directory is 2.4 GiB after a clean `cargo xtask ci`; it was
/// 8.1 GiB with full debug info).
const CI_DISK_NEED_GIB: u64 = 8;

/// Free bytes on the filesystem holding `path`, from `df` (no libc binding needed).
fn free_bytes(path: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(path).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let kib: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Says up front when the disk is too full for a build, instead of letting the
/// linker fail later with ENOSPC deep inside cargo's output.
fn check_disk(root: &Path) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.to_owned());
    let probe = target
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(root)
        .to_owned();
    match free_bytes(&probe) {
        Some(free) if free < CI_DISK_NEED_GIB << 30 => eprintln!(
            "warning: {:.1} GiB free on the filesystem of {}; a clean build and test run needs about {CI_DISK_NEED_GIB} GiB. Free space (old target directories) if the build fails with \"No space left on device\".",
            free as f64 / (1u64 << 30) as f64,
            probe.display()
        ),
        Some(free) => eprintln!(
            "disk: {:.1} GiB free on the filesystem of {}",
            free as f64 / (1u64 << 30) as f64,
            probe.display()
        ),
        None => eprintln!(
            "disk: cannot tell the free space of {} (no df)",
            probe.display()
        ),
    }
}

fn ci() -> anyhow::Result<()> {
    check_disk(&std::env::current_dir()?);
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
    // cairn, cairn-node and cairn-vmm land in one directory: `cairn dev up` starts
    // the cairn-node beside it, and cairn-node the cairn-vmm beside itself.
    run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "cli",
        "-p",
        "node-runtime",
        "-p",
        "vmm",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    let bin: PathBuf = target.join("release/cairn");
    let specs = "examples/quickstart";
    run(Command::new(&bin)
        .current_dir(root)
        .args(["validate", specs]))?;
    // The dev cluster, and a controller following a bare repository seeded with
    // the quickstart's specs: the controller applies them (no `apply` typed).
    run(Command::new(&bin)
        .current_dir(root)
        .args(["dev", "up", specs, "--gitops"]))?;
    let work = root.join(specs).join(".cairn/dev/gitops/work");
    let head = String::from_utf8(
        Command::new("git")
            .current_dir(&work)
            .args(["rev-parse", "HEAD"])
            .output()
            .context("cannot run git")?
            .stdout,
    )?;
    let head = head.trim();
    eprintln!("waiting for the controller to apply commit {head} ...");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let out = Command::new(&bin)
            .current_dir(root)
            .args(["status", specs, "--format", "json"])
            .output()
            .context("cannot run cairn status")?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let last = &status["controller"]["last_sync"];
        if last["commit"] == head {
            match last["result"].as_str() {
                Some("succeeded") => break,
                Some(other) => {
                    let log = root.join(specs).join(".cairn/dev/controller.log");
                    bail!(
                        "the controller's sync of {head} ended `{other}`: {last}; see {} and `{} status {specs}`",
                        log.display(),
                        bin.display()
                    )
                }
                None => {}
            }
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the controller did not apply {head} within 3 minutes; see {}/.cairn/dev/controller.log",
                specs
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    run(Command::new(&bin).current_dir(root).args(["status", specs]))?;
    println!(
        "\nThe dev cluster keeps running: 3 cairn-node processes on 127.0.0.11-13:7100 and a controller on 127.0.0.1:7400, data under {specs}/.cairn/ (as root each node has its own network namespace: `ip netns list | grep cairn-`, and `tc -n NS class show dev data` shows the bond's classes).\n\
         Drive it with git: cd {work} && $EDITOR workloads.kdl && git commit -am 'change' && git push   (commits are signed with the dev key; the controller applies them)\n\
         Watch: {bin} status {specs}   |   stop it all with: {bin} dev down {specs}",
        work = work.display(),
        bin = bin.display()
    );
    Ok(())
}

fn bench() -> anyhow::Result<()> {
    run(Command::new("cargo").args(["build", "--release", "-p", "cli"]))?;
    run(Command::new("target/release/cairn").args(["bench", "--nodes", "1000", "--vms", "10000"]))?;
    run(Command::new("target/release/cairn").args([
        "bench", "--nodes", "10000", "--vms", "100000", "--runs", "3",
    ]))?;
    // The controller's budgets: a no-op sync at 1,000 nodes (no cluster), then on
    // a dev cluster (cairn-node and cairn-vmm beside cairn, /dev/kvm) push →
    // converged and HA failover.
    run(Command::new("target/release/cairn").args([
        "controller",
        "bench",
        "--noop",
        "--nodes",
        "1000",
        "--vms",
        "10000",
        "--runs",
        "5",
    ]))?;
    run(Command::new("cargo").args(["build", "--release", "-p", "node-runtime", "-p", "vmm"]))?;
    run(Command::new("target/release/cairn").args([
        "controller",
        "bench",
        "--vms",
        "100",
        "--runs",
        "3",
    ]))?;
    run(Command::new("target/release/cairn").args([
        "controller",
        "bench",
        "--failover",
        "--vms",
        "10",
        "--runs",
        "5",
    ]))
}
