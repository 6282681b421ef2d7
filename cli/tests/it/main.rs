//! Integration tests of the `cairn` binary: golden cases and CLI behaviour.

mod audit;
mod authorization;
mod cli;
mod console;
mod controller;
mod controller_remote;
mod cpu_preemption;
mod diff;
mod dr_replication;
mod engine;
mod enroll;
mod ft;
mod gitops;
mod golden;
mod ha;
mod ha_faults;
mod ha_timers;
mod ha_witness;
mod image_disk;
mod incremental_plan;
mod key_rotation;
mod maintenance;
mod measured_usage;
mod migration;
mod migration_disks;
mod migration_nics;
mod policy;
mod ports;
mod protection;
mod rebuild;
mod reconcile;
mod remote_disk;
mod replicas;
mod safety;
mod schemas;
mod simulate;
mod spot_preemption;
mod tenant_networks;
mod verify;
mod vm_disk_io;
mod vm_operator;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_owned()
}

/// What a run of `cairn` produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `cairn` with arguments in a directory.
pub fn cairn(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("the cairn binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A fresh temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("cairn-it-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    /// Removes the directory, unless a failing test runs with `CAIRN_KEEP_FAILED` set
    /// (its logs are then left to read).
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("CAIRN_KEEP_FAILED").is_some() {
            eprintln!("kept {} (CAIRN_KEEP_FAILED)", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("dir entry");
        // A running dev cluster keeps state and sockets in `.cairn/`.
        if e.file_name() == ".cairn" {
            continue;
        }
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy file");
        }
    }
}
