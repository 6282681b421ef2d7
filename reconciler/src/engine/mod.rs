//! The cluster side of `cairn`: state store, observe, plan, apply, dev cluster,
//! status.
//!
//! Data flow of `cairn plan` / `cairn apply`:
//! specs → [`compiler::compile`] → [`desired::place`] (starting from the previous
//! placement in the [`state`] store, or from what the nodes run) → [`desired::desired`]
//! → [`observe::observe`] (every node in parallel, with a timeout) →
//! [`plan::plan`] (diff → changes + steps in waves) → [`render`] (text, JSON,
//! signed plan file) → [`apply::apply`] (waves, bounded parallelism, journal).
//!
//! Architecture invariant: the only writes to node runtimes are the steps of a plan,
//! each sent with the request id recorded in the journal before it is sent.
//! Architecture invariant: the state store holds nothing git or the nodes know
//! (placement, applied revision, journal, audit log, lock).

pub mod apply;
pub mod commands;
pub mod desired;
pub mod dev;
pub mod observe;
pub mod plan;
pub mod render;
pub mod state;
pub mod status;

use std::path::{Path, PathBuf};

use anyhow::Context;
use proto::auth::Identity;

/// Where a command works: the spec root, the `.cairn` directory, the state file.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The spec root, absolute.
    pub spec_root: PathBuf,
    /// `SPEC_ROOT/.cairn`.
    pub cairn_dir: PathBuf,
    /// The state store file.
    pub state_path: PathBuf,
}

impl Ctx {
    /// The context of a spec root; `state` overrides `.cairn/state.redb`.
    pub fn new(dir: &Path, state: Option<&Path>) -> anyhow::Result<Self> {
        let spec_root = std::fs::canonicalize(dir)
            .with_context(|| format!("spec root {} does not exist", dir.display()))?;
        let cairn_dir = spec_root.join(".cairn");
        let state_path = match state {
            Some(p) => std::path::absolute(p)?,
            None => cairn_dir.join("state.redb"),
        };
        Ok(Self {
            spec_root,
            cairn_dir,
            state_path,
        })
    }

    /// The controller identity (`.cairn/controller.key`, created on first use):
    /// signs node requests and plan files.
    pub fn identity(&self) -> anyhow::Result<Identity> {
        std::fs::create_dir_all(&self.cairn_dir)
            .with_context(|| format!("cannot create {}", self.cairn_dir.display()))?;
        Identity::load_or_create(
            &self.cairn_dir.join("controller.key"),
            &self.cairn_dir.join("controller.pub"),
        )
        .context("controller identity")
    }

    /// The state store.
    pub fn store(&self) -> anyhow::Result<state::StateStore> {
        Ok(state::StateStore::open(&self.state_path)?)
    }
}
