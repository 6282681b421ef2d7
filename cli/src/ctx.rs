//! Where a command works: the spec root, its `.cairn` directory, the state file.

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
    /// The audit log's head, shared by the store and the request signer
    /// (`proto::anchor`): every node request carries it.
    pub audit_head: proto::anchor::SharedHead,
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
            audit_head: proto::anchor::SharedHead::default(),
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

    /// The state store; its audit entries are signed with the controller key.
    pub fn store(&self) -> anyhow::Result<reconciler::state::RedbStore> {
        Ok(reconciler::state::RedbStore::open(&self.state_path)?
            .with_audit_key(self.identity()?, self.audit_head.clone())?)
    }

    /// The request signer (the controller key), sending the audit log's head.
    pub fn signer(&self) -> anyhow::Result<proto::auth::RequestSigner> {
        Ok(proto::auth::RequestSigner::new(self.identity()?)
            .with_audit_head(self.audit_head.clone()))
    }
}
