//! `cairn controller key recover`: a new controller key after `controller.key` was
//! lost (or must be forsaken), put in place by an offline recovery key the nodes
//! already trust (a `HEX recovery` line of `DATA_DIR/controller-keys` when they
//! enrolled or at a rotation's push), the way Vault's recovery keys authorize a new
//! root token when the old one is gone.
//!
//! The lost key cannot hand over, so the recovery key does, in three steps that each
//! can be run again (the state is `DATA_DIR/controller-key-recovery.json`; the new key
//! waits in `controller.key.next` until the switch):
//!
//! 1. **drawn**: a new key is drawn and the recovery is recorded: the lost key is the
//!    set's `controller` key (else `controller.pub`).
//! 2. **switched**: the audit entry `controller-key-recovered`, sealed by the new key
//!    and carrying the recovery key's signature over the lost and the new key
//!    (`reconciler::audit::recovery_detail`: `cairn audit verify` accepts the change
//!    only with it), is written; a `controller.key` still present is kept aside as
//!    `controller.key.lost`; the new key becomes `controller.key`; the set without the
//!    lost key, with the new one as `controller`, becomes `controller-keys`. An
//!    unfinished rotation is dropped (it rotated the lost key).
//! 3. **pushed**: that set, signed by the recovery key, is pushed to every node of the
//!    specs (`DATA_DIR/checkout`, the last commit the controller compiled, unless
//!    `--specs DIR`). A node that does not take it is named, and the command run again
//!    pushes again; the state file is removed once every node took it.
//!
//! The controller must not run for steps 1 and 2 (it would sign with the key being
//! replaced); step 3 may run beside the controller started on the new key, so the
//! nodes already reached are managed while the others are retried. A controller whose
//! `controller.key` is missing while `controller.pub` names the key the nodes trust
//! refuses to start and names this command ([`load_controller_key`]), instead of
//! drawing a key no node trusts.
//!
//! Replicas on etcd hold copies of one key, each the others' backup (copy it from
//! another replica); recovering them all at once, with the audit in etcd, is not built
//! (the command refuses `--state etcd://…`).

use std::path::{Path, PathBuf};

use proto::auth::{Identity, TrustedKeys};
use serde::{Deserialize, Serialize};

use super::{
    NEXT_KEY_FILE, OLD_KEY_FILE, ROTATION_FILE, Report, missed_text, push_to_nodes, short,
};
use crate::enroll::CONTROLLER_KEYS_FILE;

/// The state of an unfinished recovery, in the data directory.
pub const RECOVERY_FILE: &str = "controller-key-recovery.json";
/// Where a `controller.key` that was still present is kept by a recovery.
pub const LOST_KEY_FILE: &str = "controller.key.lost";

/// `DATA_DIR/controller-key-recovery.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// The key given up (hex).
    pub lost: String,
    /// The new key (hex).
    pub to: String,
    /// The recovery key that authorizes the change (hex).
    pub recovery_key: String,
    /// When it started (Unix ms).
    pub started_at_ms: u64,
}

/// What `recover` is given.
#[derive(Debug)]
pub struct RecoverInput {
    /// The controller's data directory.
    pub data_dir: PathBuf,
    /// The offline recovery key's secret.
    pub recovery: Identity,
    /// The specs whose nodes are pushed to (default `DATA_DIR/checkout`).
    pub specs: Option<PathBuf>,
    /// The state store file whose audit log hands over (default `DATA_DIR/state.redb`).
    pub state_file: Option<PathBuf>,
}

/// The controller key of `data_dir`, drawn on the first start. Refused when
/// `controller.key` is missing but `controller.pub` says there was one: the nodes
/// trust that key, and a new one drawn here would be refused by every node.
pub fn load_controller_key(data_dir: &Path) -> Result<Identity, String> {
    let key = data_dir.join("controller.key");
    let public = data_dir.join("controller.pub");
    if !key.exists()
        && let Ok(text) = std::fs::read_to_string(&public)
    {
        let text = text.trim();
        return Err(format!(
            "{} is missing, but this controller had the key {}… ({}): the nodes trust that key and would refuse a new one. Put controller.key back from a backup, or with an offline recovery key the nodes trust run `cairn controller key recover --recovery-key FILE --data-dir {}`; to start over with a new key on purpose (the nodes enroll again), remove {} too",
            key.display(),
            short(text),
            public.display(),
            data_dir.display(),
            public.display()
        ));
    }
    Identity::load_or_create(&key, &public).map_err(|e| format!("the controller key: {e}"))
}

fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join(RECOVERY_FILE)
}

/// The unfinished recovery of `data_dir`, if any.
pub fn load_recovery(data_dir: &Path) -> Result<Option<Recovery>, String> {
    super::load_state(&state_path(data_dir))
}

fn save_recovery(data_dir: &Path, recovery: &Recovery) -> Result<(), String> {
    super::save_state(&state_path(data_dir), recovery)
}

/// The set `DATA_DIR/controller-keys` lists, as `(hex, name)`.
fn listed_set(data_dir: &Path) -> Result<Vec<(String, String)>, String> {
    let path = data_dir.join(CONTROLLER_KEYS_FILE);
    let keys = TrustedKeys::load(&path).map_err(|e| {
        format!(
            "{e}: a recovery needs the set the nodes were told to trust, with the recovery key in it (`HEX recovery`)"
        )
    })?;
    Ok(keys
        .render()
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(key, name)| (key.to_owned(), name.to_owned()))
        .collect())
}

/// The nodes of the specs at `root`: `(name, address)`.
fn spec_nodes(root: &Path) -> Result<Vec<(String, String)>, String> {
    let sources = compiler::source::Sources::load_dir(root).map_err(|e| {
        format!(
            "the specs at {} (the nodes to push the new key to): {e}",
            root.display()
        )
    })?;
    let compilation = compiler::compile(&sources);
    if compilation.has_errors() {
        return Err(format!(
            "the specs at {} do not compile ({} error(s); `cairn validate {}`): their nodes are the ones pushed to",
            root.display(),
            compilation
                .diagnostics
                .iter()
                .filter(|d| d.severity == compiler::diag::Severity::Error)
                .count(),
            root.display()
        ));
    }
    Ok(compilation
        .model
        .sites
        .iter()
        .flat_map(|site| site.nodes.iter())
        .map(|node| (node.name.clone(), node.address.clone()))
        .collect())
}

/// Steps 1 and 2 (module docs): the recovery recorded, the audit entry written, the
/// files switched. Returns the recovery and a note on what was dropped.
fn switch(
    data_dir: &Path,
    state_file: &Path,
    recovery_key: &Identity,
    set: &[(String, String)],
) -> Result<(Recovery, Vec<String>), String> {
    let mut notes = vec![];
    let state = match load_recovery(data_dir)? {
        Some(state) => {
            if state.recovery_key != recovery_key.public_key_hex() {
                return Err(format!(
                    "the recovery in {} is authorized by recovery key {}…, not by the key given ({}…); give that key, or remove the file and {} to start again",
                    state_path(data_dir).display(),
                    short(&state.recovery_key),
                    short(&recovery_key.public_key_hex()),
                    NEXT_KEY_FILE
                ));
            }
            state
        }
        None => {
            let lost = set
                .iter()
                .find(|(_, name)| name == "controller")
                .map(|(key, _)| key.clone())
                .or_else(|| {
                    std::fs::read_to_string(data_dir.join("controller.pub"))
                        .ok()
                        .map(|t| t.trim().to_ascii_lowercase())
                })
                .ok_or_else(|| {
                    format!(
                        "neither {} names a `controller` key nor {} exists: there is no key to recover from",
                        data_dir.join(CONTROLLER_KEYS_FILE).display(),
                        data_dir.join("controller.pub").display()
                    )
                })?;
            let next = Identity::generate().map_err(|e| e.to_string())?;
            super::write_secret(&data_dir.join(NEXT_KEY_FILE), &next)?;
            let state = Recovery {
                lost,
                to: next.public_key_hex(),
                recovery_key: recovery_key.public_key_hex(),
                started_at_ms: reconciler::state::now_ms(),
            };
            save_recovery(data_dir, &state)?;
            state
        }
    };
    let key_path = data_dir.join("controller.key");
    let current = Identity::load(&key_path).ok();
    if current.as_ref().map(Identity::public_key_hex).as_deref() == Some(state.to.as_str()) {
        return Ok((state, notes)); // switched before
    }
    let next = Identity::load(&data_dir.join(NEXT_KEY_FILE)).map_err(|e| {
        format!(
            "the new key of the recovery to {}…: {e}; remove {} to start again",
            short(&state.to),
            state_path(data_dir).display()
        )
    })?;
    if next.public_key_hex() != state.to {
        return Err(format!(
            "{} holds key {}…, not the recovery's {}…",
            data_dir.join(NEXT_KEY_FILE).display(),
            short(&next.public_key_hex()),
            short(&state.to)
        ));
    }
    // The audit entry first, sealed by the new key: the chain hands over to it.
    if state_file.exists() {
        let store = reconciler::state::RedbStore::open(state_file)
            .and_then(|s| s.with_audit_key(next.clone(), Default::default()))
            .map_err(|e| e.to_string())?;
        let written = store
            .audit_records()
            .map_err(|e| e.to_string())?
            .iter()
            .any(|(_, bytes)| {
                matches!(reconciler::audit::Record::decode(bytes),
                    reconciler::audit::Record::Sealed(s)
                        if s.entry.event == reconciler::audit::KEY_RECOVERED
                            && s.entry.detail["to"].as_str() == Some(state.to.as_str()))
            });
        if !written {
            reconciler::state::StateStore::audit(
                &store,
                reconciler::audit::KEY_RECOVERED,
                reconciler::audit::recovery_detail(&state.lost, &state.to, recovery_key),
            )
            .map_err(|e| format!("the audit entry of the recovery: {e}; nothing is switched"))?;
        }
    } else {
        notes.push(format!(
            "no state store at {}: no audit entry written",
            state_file.display()
        ));
    }
    if let Some(current) = current {
        super::write_secret(&data_dir.join(LOST_KEY_FILE), &current)?;
        notes.push(format!(
            "the controller.key that was there ({}…) is kept as {LOST_KEY_FILE}",
            short(&current.public_key_hex())
        ));
    }
    super::install_key(data_dir, &next)?;
    let _ = std::fs::remove_file(data_dir.join(NEXT_KEY_FILE));
    if data_dir.join(ROTATION_FILE).exists() {
        for file in [ROTATION_FILE, OLD_KEY_FILE] {
            let _ = std::fs::remove_file(data_dir.join(file));
        }
        notes.push("the unfinished rotation of the lost key was dropped".into());
    }
    // The set: the lost key (and a rotation's leftovers) out, the new key in.
    let mut new_set = vec![(state.to.clone(), "controller".to_owned())];
    new_set.extend(
        set.iter()
            .filter(|(key, name)| {
                *key != state.lost
                    && *key != state.to
                    && !matches!(name.as_str(), "controller" | "controller-next")
            })
            .cloned(),
    );
    super::write_set(data_dir, &new_set)?;
    Ok((state, notes))
}

/// `cairn controller key recover` (module docs): goes as far as the nodes allow.
pub async fn recover(input: RecoverInput) -> Result<Report, String> {
    let data_dir = input.data_dir.as_path();
    let recovery_key = &input.recovery;
    let switched_before = load_recovery(data_dir)?.is_some_and(|state| {
        Identity::load(&data_dir.join("controller.key"))
            .is_ok_and(|key| key.public_key_hex() == state.to)
    });
    if !switched_before && let Some(lock) = crate::control::running(data_dir) {
        return Err(format!(
            "a cairn controller runs for {} (pid {} on {}): stop it first; a recovery replaces the key it signs with",
            data_dir.display(),
            lock.pid,
            lock.host
        ));
    }
    let set = listed_set(data_dir)?;
    let name = set
        .iter()
        .find(|(key, _)| *key == recovery_key.public_key_hex())
        .map(|(_, name)| name.clone());
    if !switched_before && !name.as_deref().is_some_and(|n| n.starts_with("recovery")) {
        return Err(format!(
            "the key given ({}…) is not a recovery key of {} ({}): the nodes trust only the keys listed there",
            short(&recovery_key.public_key_hex()),
            data_dir.join(CONTROLLER_KEYS_FILE).display(),
            name.map_or("not listed".to_owned(), |n| format!("listed as `{n}`"))
        ));
    }
    let specs = input
        .specs
        .clone()
        .unwrap_or_else(|| data_dir.join("checkout"));
    let nodes = spec_nodes(&specs)?;
    let state_file = input
        .state_file
        .clone()
        .unwrap_or_else(|| data_dir.join("state.redb"));
    let (state, notes) = switch(data_dir, &state_file, recovery_key, &set)?;
    let set = listed_set(data_dir)?;
    let (pushed, missed) = push_to_nodes(&nodes, recovery_key, &set).await;
    let noted = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    };
    let (phase, message) = if missed.is_empty() {
        let _ = std::fs::remove_file(state_path(data_dir));
        (
            "done",
            format!(
                "recovered: the controller signs with {}… and all {} node(s) of {} trust it and no longer trust the lost key {}…{noted}",
                short(&state.to),
                nodes.len(),
                specs.display(),
                short(&state.lost)
            ),
        )
    } else {
        (
            "pushing",
            format!(
                "the controller key is {}… now, but {} of {} node(s) do not trust it yet: {}; they still trust the lost key {}…: run `cairn controller key recover` again once they are reachable{noted}",
                short(&state.to),
                missed.len(),
                nodes.len(),
                missed_text(&missed),
                short(&state.lost)
            ),
        )
    };
    Ok(Report {
        action: "recover".into(),
        signing_key: state.to.clone(),
        from: state.lost.clone(),
        to: Some(state.to.clone()),
        phase: phase.into(),
        pushed,
        missed,
        keys: set.iter().map(|(k, n)| format!("{k} {n}")).collect(),
        message,
    })
}
