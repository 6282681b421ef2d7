//! The controller key's lifecycle (issue 24, item 7): `cairn controller key rotate`
//! and `cairn controller key revoke KEY`, carried out by the running controller
//! (a signed action, [`crate::actions`], `POST /api/v1/controller/key/rotate|revoke`),
//! the way Vault's `operator rotate` and Nomad's `operator root keyring rotate` ask
//! their running server: the process that holds the key, the node list of the applied
//! commit and the audit chain does the work, and no restart is needed.
//!
//! A rotation, in three steps that each can be run again (the state is
//! `DATA_DIR/controller-key-rotation.json`; the next key waits in
//! `DATA_DIR/controller.key.next`, mode 0600):
//!
//! 1. **adding**: a next key is drawn and added to the set nodes are told
//!    (`DATA_DIR/controller-keys`); the set `{old, next, recovery…}` is pushed to every
//!    node of the applied commit (`ControllerTrust.SetControllerKeys`), signed by the
//!    old key. A node that does not take it is named with the reason, and the rotation
//!    stops there: nothing is switched while a node would not trust the next key.
//!    Running the command again pushes again (a node that has the set accepts it
//!    again).
//! 2. **switching**: the audit entry `controller-key-rotated` (sealed by the old key,
//!    naming the next) is written, the old key is kept as `controller.key.old`, the next
//!    key replaces `controller.key`, and the running controller signs with it from its
//!    next request on ([`proto::auth::RequestSigner::set_identity`]). A controller
//!    killed within this step finishes it (or goes back to step 1 when the audit entry
//!    was not written) when it starts again ([`settle_at_start`]).
//! 3. **retiring**: the set without the old key is pushed, signed by the next key. A
//!    node that does not take it keeps the old key in the controller's set (so it is
//!    not locked out, and its renewals addressed to the old key are still accepted)
//!    until the command, run again, reaches it; then `controller.key.old` and the state
//!    file are removed.
//!
//! Revocation: `revoke KEY` pushes the set without KEY, signed by the signing key; the
//! signing key itself is revoked by rotating. Lease renewals are accepted when
//! addressed to any key of the controller's set ([`lease_targets`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub mod recover;

use proto::auth::{Identity, NodeTarget, RequestSigner, TrustedKeys};
use proto::v1;
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::enroll::CONTROLLER_KEYS_FILE;
use crate::events::Event;

/// The state of an unfinished rotation, in the data directory.
pub const ROTATION_FILE: &str = "controller-key-rotation.json";
/// The next key's secret while a rotation is not switched yet.
pub const NEXT_KEY_FILE: &str = "controller.key.next";
/// The previous key's secret until every node has the set without it.
pub const OLD_KEY_FILE: &str = "controller.key.old";
/// How long one node is given to take a pushed set.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an unfinished rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The next key is being added to every node.
    Adding,
    /// The audit entry may be written; the key files not switched yet.
    Switching,
    /// The controller signs with the next key; the old one is being retired.
    Retiring,
}

/// `DATA_DIR/controller-key-rotation.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// The key rotated out (hex).
    pub from: String,
    /// The key rotated in (hex).
    pub to: String,
    /// Where it stands.
    pub phase: Phase,
    /// When it started (Unix ms).
    pub started_at_ms: u64,
}

/// A node that did not take a pushed set, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    /// The node.
    pub node: String,
    /// Its address.
    pub address: String,
    /// Why.
    pub reason: String,
}

/// What one run of `rotate` or `revoke` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `rotate` or `revoke`.
    pub action: String,
    /// The key the controller signs with after this run.
    pub signing_key: String,
    /// The key being rotated out or revoked.
    pub from: String,
    /// The key rotated in (rotation).
    pub to: Option<String>,
    /// Where the rotation stands: `adding`, `retiring`, `done`.
    pub phase: String,
    /// Nodes that took the set.
    pub pushed: Vec<String>,
    /// Nodes that did not: run the command again once they are reachable.
    pub missed: Vec<Missed>,
    /// The set nodes are told to trust now (`HEX NAME`).
    pub keys: Vec<String>,
    /// One sentence for the operator.
    pub message: String,
}

impl Report {
    /// A rotation's report: where `rotation` stands (`phase`), the nodes the last push
    /// reached and missed, and the set they are told to trust.
    fn of_rotation(
        signing: &Identity,
        rotation: &Rotation,
        phase: &str,
        (pushed, missed): (Vec<String>, Vec<Missed>),
        set: &[(String, String)],
        message: String,
    ) -> Report {
        Report {
            action: "rotate".into(),
            signing_key: signing.public_key_hex(),
            from: rotation.from.clone(),
            to: Some(rotation.to.clone()),
            phase: phase.into(),
            pushed,
            missed,
            keys: set.iter().map(|(k, n)| format!("{k} {n}")).collect(),
            message,
        }
    }

    /// Whether the run finished what it was asked.
    pub fn finished(&self) -> bool {
        self.phase == "done"
    }
}

/// With replicas on etcd (which all hold a copy of the one controller key): the
/// rotation as the leader carried it out, so that the other replicas follow it. The
/// next key's secret travels sealed with a pad only holders of the key rotated out
/// can derive ([`seal`]): etcd alone does not learn it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedRotation {
    /// The rotation (phase `retiring` once switched, then the leader's last word).
    pub rotation: Rotation,
    /// Whether the old key is retired everywhere (the set below is the final one).
    pub done: bool,
    /// The next key's secret seed XOR the pad (hex).
    pub sealed_next: String,
    /// The set the nodes are told to trust, `(hex, name)`.
    pub set: Vec<(String, String)>,
}

/// The etcd record ([`state_etcd::EtcdStore::controller_record`]) of the rotation.
pub const SHARED_ROTATION: &str = "key-rotation";

/// How often a replica looks for a rotation the leader carried out.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The pad that seals the next key `to_hex` for holders of `from`: HMAC-SHA256 keyed
/// by `from`'s secret seed over the purpose and `to_hex` (one pad per rotation).
fn pad(from: &Identity, to_hex: &str) -> [u8; 32] {
    use hmac::{KeyInit as _, Mac as _};
    let seed = proto::auth::from_hex::<32>(&from.secret_seed_hex()).expect("seeds are hex");
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(&seed).expect("HMAC takes keys of any length");
    mac.update(b"cairn-controller-key-rotation-v1\n");
    mac.update(to_hex.as_bytes());
    mac.finalize().into_bytes().into()
}

/// `next`'s secret seed sealed for holders of `from` (hex).
pub fn seal(from: &Identity, next: &Identity) -> String {
    let seed = proto::auth::from_hex::<32>(&next.secret_seed_hex()).expect("seeds are hex");
    let pad = pad(from, &next.public_key_hex());
    seed.iter()
        .zip(pad)
        .map(|(s, p)| format!("{:02x}", s ^ p))
        .collect()
}

/// The next key `to_hex` from `sealed`, with the key rotated out; `Err` when it does
/// not give `to_hex` (another key, or a damaged record).
pub fn unseal(from: &Identity, to_hex: &str, sealed: &str) -> Result<Identity, String> {
    let sealed = proto::auth::from_hex::<32>(sealed).map_err(|e| format!("the sealed key: {e}"))?;
    let pad = pad(from, to_hex);
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = sealed[i] ^ pad[i];
    }
    let next = Identity::from_seed(seed);
    if next.public_key_hex() != to_hex.to_ascii_lowercase() {
        return Err(format!(
            "the sealed key does not open to {}… with key {}…",
            short(to_hex),
            short(&from.public_key_hex())
        ));
    }
    Ok(next)
}

/// Publishes the rotation for the other replicas (with replicas only); a failure is
/// the caller's error (the switch waits for it).
async fn publish(shared: &Arc<Shared>, record: SharedRotation) -> Result<(), String> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || match shared.replicas.as_ref() {
        Some(r) => r
            .store
            .set_controller_record(SHARED_ROTATION, &record)
            .map_err(|e| e.to_string()),
        None => Ok(()),
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The rotation the leader shared, if any (with replicas).
async fn shared_rotation(shared: &Arc<Shared>) -> Option<SharedRotation> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        shared.replicas.as_ref().and_then(|r| {
            r.store
                .controller_record::<SharedRotation>(SHARED_ROTATION)
                .ok()
                .flatten()
        })
    })
    .await
    .ok()
    .flatten()
}

/// With replicas: follows the rotations the leader carries out. A replica that
/// still signs with the key rotated out opens the next key, switches its files (the
/// old key kept as `controller.key.old`), its set and its signer; one that signs
/// with the next key takes the final set. Runs for the process's life; returns at
/// once without replicas.
pub async fn follow_rotation(shared: Arc<Shared>) {
    if shared.replicas.is_none() {
        return;
    }
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        let Some(record) = shared_rotation(&shared).await else {
            continue;
        };
        if let Err(e) = follow(&shared, &record) {
            shared.record(vec![
                Event::new("controller-key", "incomplete")
                    .reason(format!("following the leader's key rotation: {e}")),
            ]);
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }
}

/// One look at the leader's rotation `record` ([`follow_rotation`]).
fn follow(shared: &Arc<Shared>, record: &SharedRotation) -> Result<(), String> {
    let data_dir = &shared.config.data_dir;
    if data_dir.join(ROTATION_FILE).exists() {
        return Ok(()); // this replica carries out a rotation itself
    }
    let signing = shared.signer.identity();
    let rotation = &record.rotation;
    if signing.public_key_hex() == rotation.from && rotation.phase == Phase::Retiring {
        let next = unseal(&signing, &rotation.to, &record.sealed_next)?;
        write_secret(&data_dir.join(OLD_KEY_FILE), &signing)?;
        install_key(data_dir, &next)?;
        write_set(data_dir, &record.set)?;
        shared.signer.set_identity(next);
        shared.record(vec![Event::new("controller-key", "switched").reason(
            format!(
                "following the leader's rotation: this replica signs with {}… from now on (was {}…)",
                short(&rotation.to),
                short(&rotation.from)
            ),
        )]);
    } else if signing.public_key_hex() == rotation.to && read_set(data_dir, &signing)? != record.set
    {
        write_set(data_dir, &record.set)?;
        if record.done {
            let _ = std::fs::remove_file(data_dir.join(OLD_KEY_FILE));
        }
    }
    Ok(())
}

/// Only one key change at a time in a process.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rotation_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ROTATION_FILE)
}

/// The unfinished rotation of `data_dir`, if any.
pub fn load_rotation(data_dir: &Path) -> Result<Option<Rotation>, String> {
    load_state(&rotation_path(data_dir))
}

fn save_rotation(data_dir: &Path, rotation: &Rotation) -> Result<(), String> {
    save_state(&rotation_path(data_dir), rotation)
}

/// A key change's state file (JSON), if it exists.
fn load_state<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn save_state<T: Serialize>(path: &Path, state: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(state).expect("key states serialize") + "\n";
    proto::auth::write_file_atomically(path, &text, 0o600).map_err(|e| e.to_string())
}

/// Makes `key` the controller key of `data_dir`: `controller.key` and `controller.pub`.
fn install_key(data_dir: &Path, key: &Identity) -> Result<(), String> {
    write_secret(&data_dir.join("controller.key"), key)?;
    proto::auth::write_file_atomically(
        &data_dir.join("controller.pub"),
        &format!("{}\n", key.public_key_hex()),
        0o644,
    )
    .map_err(|e| e.to_string())
}

fn write_secret(path: &Path, identity: &Identity) -> Result<(), String> {
    proto::auth::write_file_atomically(path, &format!("{}\n", identity.secret_seed_hex()), 0o600)
        .map_err(|e| e.to_string())
}

/// The set nodes are told to trust, as `(hex, name)` in file order.
pub fn read_set(data_dir: &Path, signing: &Identity) -> Result<Vec<(String, String)>, String> {
    Ok(crate::enroll::trust_set(data_dir, signing)?
        .into_iter()
        .map(|k| (k.public_key_hex, k.name))
        .collect())
}

/// Writes the set nodes are told to trust (`DATA_DIR/controller-keys`).
pub fn write_set(data_dir: &Path, keys: &[(String, String)]) -> Result<(), String> {
    let text: String = std::iter::once(
        "# the controller keys nodes are told to trust (cairn controller key rotate|revoke)\n"
            .to_owned(),
    )
    .chain(keys.iter().map(|(key, name)| format!("{key} {name}\n")))
    .collect();
    TrustedKeys::parse(&text, CONTROLLER_KEYS_FILE).map_err(|e| e.to_string())?;
    proto::auth::write_file_atomically(&data_dir.join(CONTROLLER_KEYS_FILE), &text, 0o644)
        .map_err(|e| e.to_string())
}

fn to_proto(keys: &[(String, String)]) -> Vec<v1::ControllerKey> {
    keys.iter()
        .map(|(key, name)| v1::ControllerKey {
            public_key_hex: key.clone(),
            name: name.clone(),
        })
        .collect()
}

/// The targets lease renewals may be addressed to: every key of the controller's set
/// (`DATA_DIR/controller-keys` plus the signing key), named `controller`.
pub fn lease_targets(data_dir: &Path, signing: &Identity) -> Vec<NodeTarget> {
    let mut keys = read_set(data_dir, signing).unwrap_or_default();
    if keys.is_empty() {
        keys.push((signing.public_key_hex(), "controller".into()));
    }
    keys.into_iter()
        .filter_map(|(key, _)| NodeTarget::new("controller", &key).ok())
        .collect()
}

/// Every node of the applied commit: `(name, address)`.
fn applied_nodes(shared: &Shared) -> Vec<(String, String)> {
    let good = shared.good.lock().expect("good lock").clone();
    good.map(|good| {
        good.model
            .sites
            .iter()
            .flat_map(|site| site.nodes.iter())
            .map(|node| (node.name.clone(), node.address.clone()))
            .collect()
    })
    .unwrap_or_default()
}

/// Pushes `keys` signed by `signer` to every node, at once; who took it and who not.
pub async fn push_to_nodes(
    nodes: &[(String, String)],
    signer: &Identity,
    keys: &[(String, String)],
) -> (Vec<String>, Vec<Missed>) {
    let mut tasks = tokio::task::JoinSet::new();
    for (name, address) in nodes.iter().cloned() {
        let signer = RequestSigner::new(signer.clone());
        let keys = to_proto(keys);
        tasks.spawn(async move {
            let push = async {
                let mut client = reconciler::nodes::connect(&address, signer).await?;
                client
                    .set_controller_keys(keys)
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            };
            let outcome = match tokio::time::timeout(PUSH_TIMEOUT, push).await {
                Ok(result) => result.map(|_| ()),
                Err(_) => Err(format!("no answer within {} s", PUSH_TIMEOUT.as_secs())),
            };
            (name, address, outcome)
        });
    }
    let (mut pushed, mut missed) = (vec![], vec![]);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, _, Ok(()))) => pushed.push(name),
            Ok((node, address, Err(reason))) => missed.push(Missed {
                node,
                address,
                reason,
            }),
            Err(e) => missed.push(Missed {
                node: "?".into(),
                address: "?".into(),
                reason: e.to_string(),
            }),
        }
    }
    pushed.sort();
    missed.sort_by(|a, b| a.node.cmp(&b.node));
    (pushed, missed)
}

/// The first 16 characters of a key, as messages show it (never panics).
pub(crate) fn short(key: &str) -> &str {
    &key[..key.len().min(16)]
}

fn missed_text(missed: &[Missed]) -> String {
    missed
        .iter()
        .map(|m| format!("{} at {} ({})", m.node, m.address, m.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Finishes a switch a controller was killed in, before it loads its key: the audit
/// entry `controller-key-rotated` naming the next key was written (the store's last
/// sealed entry says so) → the key files are switched and the rotation is retiring;
/// it was not → the rotation is adding again. `records` reads the audit log.
pub fn settle_at_start(
    data_dir: &Path,
    records: impl FnOnce() -> Result<Vec<(u64, Vec<u8>)>, String>,
) -> Result<Option<String>, String> {
    let Some(mut rotation) = load_rotation(data_dir)? else {
        return Ok(None);
    };
    if rotation.phase != Phase::Switching {
        return Ok(None);
    }
    let records = records()?;
    let rotated =
        records.iter().rev().find_map(|(_, bytes)| {
            match reconciler::audit::Record::decode(bytes) {
                reconciler::audit::Record::Sealed(sealed) => Some(sealed),
                _ => None,
            }
        });
    let written = rotated.is_some_and(|sealed| {
        sealed.entry.event == reconciler::audit::KEY_ROTATED
            && sealed.entry.detail["to"].as_str() == Some(rotation.to.as_str())
    });
    if written {
        switch_files(data_dir, &rotation)?;
        rotation.phase = Phase::Retiring;
        save_rotation(data_dir, &rotation)?;
        Ok(Some(format!(
            "the key rotation cut off in its switch was finished: the controller signs with {}…; run `cairn controller key rotate` to retire {}…",
            short(&rotation.to),
            short(&rotation.from)
        )))
    } else {
        rotation.phase = Phase::Adding;
        save_rotation(data_dir, &rotation)?;
        Ok(Some(format!(
            "the key rotation cut off before its switch still signs with {}…; run `cairn controller key rotate` to finish it",
            short(&rotation.from)
        )))
    }
}

/// Step 2's files: the old key kept aside, the next key in `controller.key`.
fn switch_files(data_dir: &Path, rotation: &Rotation) -> Result<(), String> {
    let key_path = data_dir.join("controller.key");
    let next_path = data_dir.join(NEXT_KEY_FILE);
    let current = Identity::load(&key_path).map_err(|e| e.to_string())?;
    if current.public_key_hex() == rotation.to {
        return Ok(()); // switched before
    }
    let next = Identity::load(&next_path).map_err(|e| {
        format!(
            "the next key of the rotation to {}…: {e}",
            short(&rotation.to)
        )
    })?;
    if next.public_key_hex() != rotation.to {
        return Err(format!(
            "{} holds key {}…, not the rotation's {}…",
            next_path.display(),
            short(&next.public_key_hex()),
            short(&rotation.to)
        ));
    }
    write_secret(&data_dir.join(OLD_KEY_FILE), &current)?;
    install_key(data_dir, &next)?;
    let _ = std::fs::remove_file(&next_path);
    Ok(())
}

/// `cairn controller key rotate` in the running controller: starts or resumes a
/// rotation and goes as far as the nodes allow (module docs).
pub async fn rotate(shared: &Arc<Shared>, by: &str) -> Result<Report, String> {
    let _one = ONE_AT_A_TIME.lock().await;
    let data_dir = shared.config.data_dir.clone();
    let signing = shared.signer.identity();
    let mut rotation = match load_rotation(&data_dir)? {
        Some(r) => r,
        None => {
            let next = Identity::generate().map_err(|e| e.to_string())?;
            write_secret(&data_dir.join(NEXT_KEY_FILE), &next)?;
            let rotation = Rotation {
                from: signing.public_key_hex(),
                to: next.public_key_hex(),
                phase: Phase::Adding,
                started_at_ms: reconciler::state::now_ms(),
            };
            save_rotation(&data_dir, &rotation)?;
            shared.record(vec![Event::new("controller-key", "rotating").reason(
                format!(
                    "by {by}: key {}… is rotated out for {}…",
                    short(&rotation.from),
                    short(&rotation.to)
                ),
            )]);
            rotation
        }
    };
    let nodes = applied_nodes(shared);
    if rotation.phase == Phase::Adding {
        if signing.public_key_hex() != rotation.from {
            return Err(format!(
                "the rotation in {} is from key {}…, but this controller signs with {}…; remove that file and {} to start again",
                rotation_path(&data_dir).display(),
                short(&rotation.from),
                short(&signing.public_key_hex()),
                NEXT_KEY_FILE
            ));
        }
        let mut set = read_set(&data_dir, &signing)?;
        if !set.iter().any(|(k, _)| *k == rotation.to) {
            set.push((rotation.to.clone(), "controller-next".into()));
        }
        write_set(&data_dir, &set)?;
        let (pushed, missed) = push_to_nodes(&nodes, &signing, &set).await;
        if !missed.is_empty() {
            let message = format!(
                "the next key {}… is not trusted by {} of {} node(s) yet: {}; nothing is switched, the controller still signs with {}…; run `cairn controller key rotate` again once they are reachable",
                short(&rotation.to),
                missed.len(),
                nodes.len(),
                missed_text(&missed),
                short(&rotation.from)
            );
            shared.record(vec![
                Event::new("controller-key", "incomplete").reason(message.clone()),
            ]);
            return Ok(Report::of_rotation(
                &signing,
                &rotation,
                "adding",
                (pushed, missed),
                &set,
                message,
            ));
        }
        // Step 2: the audit entry sealed by the old key, then the files, then the signer.
        rotation.phase = Phase::Switching;
        save_rotation(&data_dir, &rotation)?;
        let detail = reconciler::audit::rotation_detail(&rotation.from, &rotation.to);
        let audit = {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || {
                let store = shared.state_store()?;
                reconciler::state::StateStore::audit(&store, reconciler::audit::KEY_ROTATED, detail)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        };
        if let Err(e) = audit {
            rotation.phase = Phase::Adding;
            save_rotation(&data_dir, &rotation)?;
            return Err(format!(
                "the audit entry of the rotation could not be written ({e}); nothing is switched"
            ));
        }
        // With replicas, the others switch with this one (`follow_rotation`).
        if shared.replicas.is_some() {
            let next = Identity::load(&data_dir.join(NEXT_KEY_FILE)).map_err(|e| e.to_string())?;
            let mut kept = set.clone();
            for (key, name) in &mut kept {
                if *key == rotation.to {
                    *name = "controller".into();
                } else if *key == rotation.from {
                    *name = "controller-retiring".into();
                }
            }
            let record = SharedRotation {
                rotation: Rotation {
                    phase: Phase::Retiring,
                    ..rotation.clone()
                },
                done: false,
                sealed_next: seal(&signing, &next),
                set: kept,
            };
            if let Err(e) = publish(shared, record).await {
                rotation.phase = Phase::Adding;
                save_rotation(&data_dir, &rotation)?;
                return Err(format!(
                    "the rotation could not be shared with the other replicas ({e}); nothing is switched"
                ));
            }
        }
        switch_files(&data_dir, &rotation)?;
        let next = Identity::load(&data_dir.join("controller.key")).map_err(|e| e.to_string())?;
        rotation.phase = Phase::Retiring;
        save_rotation(&data_dir, &rotation)?;
        shared.signer.set_identity(next);
        shared.record(vec![Event::new("controller-key", "switched").reason(
            format!(
                "the controller signs with {}… from now on; {}… is retired next",
                short(&rotation.to),
                short(&rotation.from)
            ),
        )]);
    }
    // Step 3: retire the old key.
    let signing = shared.signer.identity();
    if signing.public_key_hex() != rotation.to {
        return Err(format!(
            "the rotation in {} is to key {}…, but this controller signs with {}…",
            rotation_path(&data_dir).display(),
            short(&rotation.to),
            short(&signing.public_key_hex())
        ));
    }
    let set: Vec<(String, String)> = read_set(&data_dir, &signing)?
        .into_iter()
        .filter(|(k, _)| *k != rotation.from)
        .map(|(k, n)| {
            if k == rotation.to {
                (k, "controller".to_owned())
            } else {
                (k, n)
            }
        })
        .collect();
    let (pushed, missed) = push_to_nodes(&nodes, &signing, &set).await;
    if !missed.is_empty() {
        // Kept in the set until every node has the set without it.
        let mut kept = set.clone();
        kept.push((rotation.from.clone(), "controller-retiring".into()));
        write_set(&data_dir, &kept)?;
        let message = format!(
            "the controller signs with {}…, but {} of {} node(s) still trust the old key {}…: {}; the old key stays in the set until they are reached: run `cairn controller key rotate` again",
            short(&rotation.to),
            missed.len(),
            nodes.len(),
            short(&rotation.from),
            missed_text(&missed)
        );
        shared.record(vec![
            Event::new("controller-key", "incomplete").reason(message.clone()),
        ]);
        return Ok(Report::of_rotation(
            &signing,
            &rotation,
            "retiring",
            (pushed, missed),
            &kept,
            message,
        ));
    }
    write_set(&data_dir, &set)?;
    if shared.replicas.is_some() {
        // The replicas take the final set; the sealed key stays (it opens only with
        // the retired key).
        let sealed = shared_rotation(shared)
            .await
            .filter(|r| r.rotation.to == rotation.to)
            .map(|r| r.sealed_next)
            .unwrap_or_default();
        publish(
            shared,
            SharedRotation {
                rotation: rotation.clone(),
                done: true,
                sealed_next: sealed,
                set: set.clone(),
            },
        )
        .await?;
    }
    let _ = std::fs::remove_file(data_dir.join(OLD_KEY_FILE));
    let _ = std::fs::remove_file(rotation_path(&data_dir));
    let message = format!(
        "rotated: the controller signs with {}…, and all {} node(s) of the applied commit no longer trust {}…",
        short(&rotation.to),
        nodes.len(),
        short(&rotation.from)
    );
    shared.record(vec![
        Event::new("controller-key", "rotated").reason(message.clone()),
    ]);
    Ok(Report::of_rotation(
        &signing,
        &rotation,
        "done",
        (pushed, missed),
        &set,
        message,
    ))
}

/// `cairn controller key revoke KEY` in the running controller: pushes the set
/// without KEY, signed by the signing key. KEY may not be the signing key (rotate it).
pub async fn revoke(shared: &Arc<Shared>, key: &str, by: &str) -> Result<Report, String> {
    let _one = ONE_AT_A_TIME.lock().await;
    let data_dir = shared.config.data_dir.clone();
    let key = key.to_ascii_lowercase();
    proto::auth::parse_public_key(&key).map_err(|e| format!("`{key}`: {e}"))?;
    let signing = shared.signer.identity();
    if key == signing.public_key_hex() {
        return Err(format!(
            "{}… is the key the controller signs with: rotate it (`cairn controller key rotate`) instead of revoking it",
            short(&key)
        ));
    }
    if let Some(rotation) = load_rotation(&data_dir)? {
        return Err(format!(
            "a rotation from {}… to {}… is unfinished: finish it first with `cairn controller key rotate`",
            short(&rotation.from),
            short(&rotation.to)
        ));
    }
    let before = read_set(&data_dir, &signing)?;
    let set: Vec<(String, String)> = before.iter().filter(|(k, _)| *k != key).cloned().collect();
    let was_in_set = set.len() != before.len();
    // Written first: enrollments from now on are not told the key.
    write_set(&data_dir, &set)?;
    let nodes = applied_nodes(shared);
    let (pushed, missed) = push_to_nodes(&nodes, &signing, &set).await;
    let phase = if missed.is_empty() { "done" } else { "pushing" };
    let message = if missed.is_empty() {
        format!(
            "revoked by {by}: {}…{} is trusted by none of the {} node(s) of the applied commit",
            short(&key),
            if was_in_set {
                ""
            } else {
                " (it was not in the controller's set)"
            },
            nodes.len()
        )
    } else {
        format!(
            "{}… is revoked on {} node(s), but {} node(s) still trust it: {}; run `cairn controller key revoke {key}` again once they are reachable",
            short(&key),
            pushed.len(),
            missed.len(),
            missed_text(&missed)
        )
    };
    let result = if missed.is_empty() {
        "revoked"
    } else {
        "incomplete"
    };
    shared.record(vec![
        Event::new("controller-key", result).reason(message.clone()),
    ]);
    Ok(Report {
        action: "revoke".into(),
        signing_key: signing.public_key_hex(),
        from: key,
        to: None,
        phase: phase.into(),
        pushed,
        missed,
        keys: set.iter().map(|(k, n)| format!("{k} {n}")).collect(),
        message,
    })
}

/// `POST /api/v1/controller/key/rotate` (signed action `controller-key-rotate`): the
/// [`Report`] as JSON, 200 whether finished or not (its `phase` and `missed` say).
pub(crate) async fn rotate_handler(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let binding = crate::actions::Binding::current(&shared);
    let signed = match crate::actions::authorize(&shared, ROTATE_ACTION, &body, &binding) {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    match rotate(&shared, &signed.signer()).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}\n"),
        )
            .into_response(),
    }
}

/// `POST /api/v1/controller/key/revoke/KEY` (signed action `controller-key-revoke:KEY`).
pub(crate) async fn revoke_handler(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    axum::extract::Path(key): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let key = key.to_ascii_lowercase();
    let binding = crate::actions::Binding::current(&shared);
    let action = revoke_action(&key);
    let signed = match crate::actions::authorize(&shared, &action, &body, &binding) {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    match revoke(&shared, &key, &signed.signer()).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => (axum::http::StatusCode::CONFLICT, format!("{e}\n")).into_response(),
    }
}

/// The signed action of a rotation.
pub const ROTATE_ACTION: &str = "controller-key-rotate";

/// The signed action of revoking `key` (the key is in what is signed).
pub fn revoke_action(key: &str) -> String {
    format!("controller-key-revoke:{}", key.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next key opens with the key rotated out, and with no other; the sealed
    /// bytes are not the seed.
    #[test]
    fn a_sealed_next_key_opens_only_with_the_key_rotated_out() {
        let (from, next, other) = (
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
        );
        let sealed = seal(&from, &next);
        assert_ne!(sealed, next.secret_seed_hex());
        let opened = unseal(&from, &next.public_key_hex(), &sealed).unwrap();
        assert_eq!(opened.secret_seed_hex(), next.secret_seed_hex());
        let err = unseal(&other, &next.public_key_hex(), &sealed).unwrap_err();
        assert!(err.contains("does not open"), "{err}");
        let err = unseal(&from, &other.public_key_hex(), &sealed).unwrap_err();
        assert!(err.contains("does not open"), "{err}");
    }

    #[test]
    fn a_switch_cut_off_is_finished_when_its_audit_entry_was_written_and_undone_otherwise() {
        let dir = std::env::temp_dir().join(format!("cairn-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (old, next) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        write_secret(&dir.join("controller.key"), &old).unwrap();
        write_secret(&dir.join(NEXT_KEY_FILE), &next).unwrap();
        let rotation = Rotation {
            from: old.public_key_hex(),
            to: next.public_key_hex(),
            phase: Phase::Switching,
            started_at_ms: 1,
        };
        save_rotation(&dir, &rotation).unwrap();
        // No audit entry: back to adding, the old key still in place.
        let said = settle_at_start(&dir, || Ok(vec![])).unwrap().unwrap();
        assert!(said.contains("still signs with"), "{said}");
        assert_eq!(load_rotation(&dir).unwrap().unwrap().phase, Phase::Adding);
        assert_eq!(
            Identity::load(&dir.join("controller.key"))
                .unwrap()
                .public_key_hex(),
            old.public_key_hex()
        );
        // The entry was written: the switch is finished.
        save_rotation(&dir, &rotation).unwrap();
        let store = reconciler::state::RedbStore::open(&dir.join("state.redb"))
            .unwrap()
            .with_audit_key(old.clone(), proto::anchor::SharedHead::default())
            .unwrap();
        reconciler::state::StateStore::audit(
            &store,
            reconciler::audit::KEY_ROTATED,
            reconciler::audit::rotation_detail(&rotation.from, &rotation.to),
        )
        .unwrap();
        let records = store.audit_records().unwrap();
        let said = settle_at_start(&dir, || Ok(records)).unwrap().unwrap();
        assert!(said.contains("was finished"), "{said}");
        assert_eq!(load_rotation(&dir).unwrap().unwrap().phase, Phase::Retiring);
        assert_eq!(
            Identity::load(&dir.join("controller.key"))
                .unwrap()
                .public_key_hex(),
            next.public_key_hex()
        );
        assert_eq!(
            Identity::load(&dir.join(OLD_KEY_FILE))
                .unwrap()
                .public_key_hex(),
            old.public_key_hex()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
