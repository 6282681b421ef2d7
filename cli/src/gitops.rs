//! `cairn dev up DIR --gitops`: the dev cluster driven by `git push`.
//!
//! It makes, under `DIR/.cairn/dev/gitops/` (each only when missing, so a second
//! `dev up --gitops` keeps what the operator pushed):
//! - `operator_ed25519` (+ `.pub`): a dev signing key, made with `ssh-keygen`,
//!   whose public half is appended to `DIR/.cairn/allowed-signers`, the
//!   controller's default trusted keys (so it is a *platform* key);
//! - `specs.git`: a bare repository, branch `main`, the one the controller follows;
//! - `work/`: a clone of it configured to sign every commit with that key
//!   (`gpg.format ssh`, `commit.gpgsign true`), seeded with one signed commit of the
//!   spec root's files (`*.kdl`, `policies/`, and whatever else is not `.cairn/`).
//!
//! Then the controller starts on `specs.git` with `DIR/.cairn` as its data
//! directory (the key the dev nodes trust and the state store `apply` uses), and
//! the operator's loop is `cd work && edit && git commit && git push`.
//!
//! Everything goes through the `git` and `ssh-keygen` commands, exactly as an
//! operator would run them, so the commit the controller verifies is the kind a
//! real `git commit -S` makes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::ctx::Ctx;

/// The files of the GitOps dev setup of one spec root.
#[derive(Debug, Clone)]
pub struct GitopsPaths {
    /// `DIR/.cairn/dev/gitops`.
    pub dir: PathBuf,
    /// The bare repository the controller follows.
    pub bare: PathBuf,
    /// The operator's working clone.
    pub work: PathBuf,
    /// The operator's private signing key.
    pub key: PathBuf,
    /// The controller's trusted keys (`DIR/.cairn/allowed-signers`).
    pub allowed_signers: PathBuf,
}

impl GitopsPaths {
    pub fn of(ctx: &Ctx) -> GitopsPaths {
        let dir = ctx.cairn_dir.join("dev/gitops");
        GitopsPaths {
            bare: dir.join("specs.git"),
            work: dir.join("work"),
            key: dir.join("operator_ed25519"),
            allowed_signers: ctx.cairn_dir.join("allowed-signers"),
            dir,
        }
    }
}

/// The principal the dev key signs as (git's allowed-signers format).
const PRINCIPAL: &str = "operator@cairn.dev";

fn run(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn git(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .current_dir(dir)
        // Nothing of the user's global git setup (hooks, templates, signing
        // programs) changes what the seed commit is.
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE");
    command
}

/// Makes what is missing of the GitOps setup; returns its paths.
pub fn prepare(ctx: &Ctx) -> anyhow::Result<GitopsPaths> {
    let paths = GitopsPaths::of(ctx);
    std::fs::create_dir_all(&paths.dir)
        .with_context(|| format!("cannot create {}", paths.dir.display()))?;
    if !paths.key.exists() {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", PRINCIPAL, "-f"])
            .arg(&paths.key))?;
    }
    let public = std::fs::read_to_string(paths.key.with_extension("pub"))
        .with_context(|| format!("cannot read {}.pub", paths.key.display()))?;
    let public = public.trim();
    let key_part = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let signers = std::fs::read_to_string(&paths.allowed_signers).unwrap_or_default();
    if !signers.lines().any(|l| l.contains(&key_part)) {
        let mut text = signers;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{PRINCIPAL} {key_part}\n"));
        std::fs::write(&paths.allowed_signers, text)
            .with_context(|| format!("cannot write {}", paths.allowed_signers.display()))?;
    }
    if !paths.bare.exists() {
        run(git(&paths.dir)
            .args(["init", "-q", "--bare", "--initial-branch=main"])
            .arg(&paths.bare))?;
    }
    if !paths.work.exists() {
        seed(ctx, &paths)?;
    }
    Ok(paths)
}

/// Clones the bare repository, configures signing, copies the spec root's files
/// in and pushes them as one signed commit.
fn seed(ctx: &Ctx, paths: &GitopsPaths) -> anyhow::Result<()> {
    run(git(&paths.dir)
        .args(["clone", "-q"])
        .arg(&paths.bare)
        .arg(&paths.work))?;
    let key = std::path::absolute(&paths.key)?;
    for (name, value) in [
        ("user.name", "cairn operator"),
        ("user.email", PRINCIPAL),
        ("gpg.format", "ssh"),
        ("commit.gpgsign", "true"),
        ("init.defaultBranch", "main"),
    ] {
        run(git(&paths.work).args(["config", name, value]))?;
    }
    run(git(&paths.work)
        .args(["config", "user.signingkey"])
        .arg(&key))?;
    // `git log --show-signature` checks against what the controller trusts.
    run(git(&paths.work)
        .args(["config", "gpg.ssh.allowedSignersFile"])
        .arg(std::path::absolute(&paths.allowed_signers)?))?;
    // The branch is main whatever the clone's default was (an empty clone).
    run(git(&paths.work).args(["checkout", "-q", "-B", "main"]))?;
    copy_specs(&ctx.spec_root, &paths.work)?;
    run(git(&paths.work).args(["add", "-A"]))?;
    run(git(&paths.work).args([
        "commit",
        "-q",
        "-S",
        "-m",
        "The dev cluster's specs, as `cairn dev up --gitops` found them",
    ]))?;
    run(git(&paths.work).args(["push", "-q", "origin", "main"]))?;
    Ok(())
}

/// Copies the spec root's files, leaving out `.cairn/` (state, sockets, this
/// setup) and any `.git`.
fn copy_specs(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".cairn" || name == ".git" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_specs(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// What to tell the operator once the controller runs.
pub fn next_steps(ctx: &Ctx, paths: &GitopsPaths, listen: &str) -> String {
    format!(
        "\nGitOps: the controller follows branch main of {bare}.\n\
         Your working clone signs every commit with {key} (a platform key, in {signers}):\n\
         \n    cd {work}\n    $EDITOR workloads.kdl        # e.g. count=4 on a VM group\n    git commit -am 'more VMs' && git push\n\
         \nand watch it converge without `apply`: cairn status {root}   (or http://{listen}/api/v1/status with the token)\n",
        bare = paths.bare.display(),
        key = paths.key.display(),
        signers = paths.allowed_signers.display(),
        work = paths.work.display(),
        root = ctx.spec_root.display(),
    )
}
