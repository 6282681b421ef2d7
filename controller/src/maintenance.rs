//! Nodes in maintenance, set by an operator (`cairn node maintenance NODE --on|--off`,
//! `POST /api/v1/nodes/NODE/maintenance/{on,off}`: the token and a signed action, as
//! every API call that changes something).
//!
//! What maintenance means (as a Nomad node made ineligible, or a vSphere host in
//! maintenance mode): no VM is placed on the node that was not there before, so a
//! new VM, an HA restart off a failed node and a crash move go elsewhere
//! (`reconciler::pipeline::keep_off`, through `PlanOptions::maintenance`, in syncs
//! and drift checks); the VMs on it that can move live (their disks stay and their
//! writer is handed over; with NICs when both nodes report a migration address) are
//! drained by live migrations (`reconciler::migrate`, ordered within `max-moves` and
//! `max-unavailable`); the others stay and keep running, and stay protected (HA,
//! crash restarts in place). Entering maintenance with VMs on the node is accepted,
//! and the answer names every VM there: those that stay must be moved (or stopped)
//! before the node may be powered off; until then an operator powering it off gets
//! an HA failover. The node shows `maintenance` in `cairn status`, `/api/v1/status`
//! (`nodes[].state`, `controller.maintenance[]`) and `/metrics`, unless its lease
//! says `failed` or `fenced` (then HA acts on its VMs, and that is what is shown).
//!
//! Kept in `DATA_DIR/controller.maintenance` (JSON, replaced atomically), read when
//! the controller starts: maintenance survives restarts of the controller.
//!
//! A spec can say the same (`node … maintenance=#true`, docs/spec-reference.md): the
//! compiler's placement then does it for every command, and the controller treats
//! the union of both sets alike ([`closed_nodes`]); `--off` ends only the operator's
//! (the spec's ends with a commit).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::events::Event;

/// One node in maintenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The node.
    pub node: String,
    /// Since when (RFC 3339).
    pub since: String,
    /// Who set it (the action's signer).
    pub by: String,
}

/// The nodes in maintenance, with their file.
#[derive(Debug)]
pub struct Maintenance {
    path: PathBuf,
    nodes: Mutex<BTreeMap<String, Entry>>,
    /// With controller replicas the set lives in etcd (`controller/maintenance`), so
    /// every replica sees what the leader set, and a new leader keeps it; read again
    /// when the copy here is older than [`SHARED_MAX_AGE`].
    shared: Option<(state_etcd::EtcdStore, Mutex<Option<std::time::Instant>>)>,
}

/// How old the copy of the shared set may be before it is read again.
pub const SHARED_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// `DATA_DIR/controller.maintenance`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("controller.maintenance")
}

impl Maintenance {
    /// Reads the file (none: no node is in maintenance).
    pub fn load(data_dir: &Path) -> Result<Maintenance, String> {
        let path = path(data_dir);
        let nodes = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Vec<Entry>>(&bytes)
                .map_err(|e| {
                    format!(
                        "{} is not a list of nodes in maintenance ({e}); fix or remove it",
                        path.display()
                    )
                })?
                .into_iter()
                .map(|e| (e.node.clone(), e))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Maintenance {
            path,
            nodes: Mutex::new(nodes),
            shared: None,
        })
    }

    /// With controller replicas: the set is the one in `store` (issue 24), not the
    /// file (which is left as it is).
    pub fn shared_through(mut self, store: Option<state_etcd::EtcdStore>) -> Maintenance {
        self.shared = store.map(|s| (s, Mutex::new(None)));
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((store, read_at)) = &self.shared {
            let mut read_at = read_at.lock().unwrap_or_else(|p| p.into_inner());
            if read_at.is_none_or(|at| at.elapsed() >= SHARED_MAX_AGE) {
                // Unreadable now: the last copy stands.
                match store.controller_record::<Vec<Entry>>("maintenance") {
                    Ok(list) => {
                        *nodes = list
                            .unwrap_or_default()
                            .into_iter()
                            .map(|e| (e.node.clone(), e))
                            .collect();
                        *read_at = Some(std::time::Instant::now());
                    }
                    Err(e) => eprintln!("cairn controller: the nodes in maintenance: {e}"),
                }
            }
        }
        nodes
    }

    /// The nodes in maintenance.
    pub fn nodes(&self) -> BTreeSet<String> {
        self.lock().keys().cloned().collect()
    }

    /// Every entry, by node.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().values().cloned().collect()
    }

    /// Puts `node` in maintenance or takes it out, durably; whether it changed.
    pub fn set(&self, node: &str, on: bool, by: &str) -> Result<bool, String> {
        let mut nodes = self.lock();
        let mut next = nodes.clone();
        let changed = if on {
            if next.contains_key(node) {
                false
            } else {
                next.insert(
                    node.to_owned(),
                    Entry {
                        node: node.to_owned(),
                        since: crate::events::rfc3339(reconciler::state::now_ms()),
                        by: by.to_owned(),
                    },
                );
                true
            }
        } else {
            next.remove(node).is_some()
        };
        if changed && let Some((store, _)) = &self.shared {
            let list: Vec<&Entry> = next.values().collect();
            store
                .set_controller_record("maintenance", &list)
                .map_err(|e| e.to_string())?;
            *nodes = next;
        } else if changed {
            let list: Vec<&Entry> = next.values().collect();
            let text = serde_json::to_vec_pretty(&list).expect("entries serialize");
            let tmp = self.path.with_extension("maintenance.tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, &self.path))
                .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
            *nodes = next;
        }
        Ok(changed)
    }
}

/// A node's state with maintenance: `maintenance` unless its lease says `failed`
/// or `fenced` (HA acts on it then).
pub fn state(lease_state: &'static str, in_maintenance: bool) -> &'static str {
    match lease_state {
        "failed" | "fenced" => lease_state,
        _ if in_maintenance => "maintenance",
        other => other,
    }
}

/// The nodes in maintenance: the operator's and the applied spec's
/// (`maintenance=#true`).
pub fn closed_nodes(shared: &Shared, model: &compiler::Model) -> BTreeSet<String> {
    let mut nodes = shared.maintenance.nodes();
    nodes.extend(model.nodes_in_maintenance());
    nodes
}

/// Every entry: the operator's, then the spec's not set by the operator (`by`
/// is `spec`, `since` empty).
pub fn all_entries(shared: &Shared, model: &compiler::Model) -> Vec<Entry> {
    let mut entries = shared.maintenance.entries();
    for node in model.nodes_in_maintenance() {
        if !entries.iter().any(|e| e.node == node) {
            entries.push(Entry {
                node,
                since: String::new(),
                by: "spec".to_owned(),
            });
        }
    }
    entries
}

/// Each node's state (`lease::Leases::node_states`) with maintenance.
pub fn node_states(shared: &Shared, model: &compiler::Model) -> Vec<(String, &'static str)> {
    let maintenance = closed_nodes(shared, model);
    shared
        .leases
        .node_states(model)
        .into_iter()
        .map(|(node, s)| {
            let s = state(s, maintenance.contains(&node));
            (node, s)
        })
        .collect()
}

/// The VMs of the stored placement on `node`.
fn vms_on(shared: &Shared, node: &str) -> Result<Vec<String>, String> {
    use reconciler::state::StateStore as _;
    let store = shared.state_store()?;
    Ok(store
        .placement()
        .map_err(|e| e.to_string())?
        .iter()
        .flat_map(|p| &p.vms)
        .filter(|v| v.node == node || v.secondary.as_deref() == Some(node))
        .map(|v| v.name.clone())
        .collect())
}

fn refuse(status: StatusCode, why: String) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// `POST /api/v1/nodes/{node}/maintenance/{on|off}`: a signed action
/// `maintenance-on:NODE` or `maintenance-off:NODE` (the node is part of what is
/// signed). Answers `{node, maintenance, changed, vms_on_node, message}`.
pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    UrlPath((node, switch)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let on = match switch.as_str() {
        "on" => true,
        "off" => false,
        other => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("`{other}`: maintenance is switched `on` or `off`"),
            );
        }
    };
    let good = shared.good.lock().expect("good lock").clone();
    let known: Vec<String> = good
        .iter()
        .flat_map(|g| g.model.sites.iter().flat_map(|s| &s.nodes))
        .map(|n| n.name.clone())
        .collect();
    if !known.contains(&node) {
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "node `{node}` is not in the applied commit (its nodes: {})",
                if known.is_empty() {
                    "none yet".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        );
    }
    let action = action(&node, on);
    let binding = crate::actions::Binding::current(&shared);
    let signed = match crate::actions::authorize(&shared, &action, &body, &binding) {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    let changed = match shared.maintenance.set(&node, on, &signed.signer()) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let vms = match vms_on(&shared, &node) {
        Ok(v) => v,
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let mut message = message(&node, on, changed, &vms);
    let in_spec = good
        .iter()
        .any(|g| g.model.nodes_in_maintenance().contains(&node));
    if !on && in_spec {
        message.push_str(&format!(
            "; but the applied spec has `maintenance=#true` on {node}, which keeps it in maintenance until a commit removes it"
        ));
    }
    if changed {
        shared.record(vec![
            Event::new(
                "node",
                if on {
                    "maintenance"
                } else {
                    "maintenance ended"
                },
            )
            .object(format!("node {node}"))
            .reason(format!("{message} (by {})", signed.signer())),
        ]);
        crate::lease::node_metrics(&shared);
        // A drift check now: the node's volume copies start moving (`rebuild.rs`).
        shared.wake_drift.notify_one();
    }
    axum::Json(serde_json::json!({
        "node": node,
        "maintenance": on,
        "changed": changed,
        "vms_on_node": vms,
        "message": message,
    }))
    .into_response()
}

/// The signed action's name: the node and the switch are part of what is signed.
pub fn action(node: &str, on: bool) -> String {
    format!("maintenance-{}:{node}", if on { "on" } else { "off" })
}

/// What the operator is told.
fn message(node: &str, on: bool, changed: bool, vms: &[String]) -> String {
    if !on {
        return if changed {
            format!("{node} is out of maintenance: VMs may be placed on it again")
        } else {
            format!("{node} was not in maintenance")
        };
    }
    let head = if changed {
        format!(
            "{node} is in maintenance: no VM is placed on it any more (new VMs, HA restarts and crash moves go elsewhere), and every volume copy it holds is moved live to another node (`cairn status` shows each move's progress; a copy is deleted there once its replacement is in sync)"
        )
    } else {
        format!("{node} was already in maintenance")
    };
    if vms.is_empty() {
        format!("{head}; no VM is placed on it: it may be powered off")
    } else {
        format!(
            "{head}; {} VM{} still run{} on it: {}; they migrate live to other nodes (the plan shows the order; their disks stay, their writer is handed over), those with NICs only where both nodes report a migration address; a VM that cannot move live (power \"off\", a disk without a layout, NICs without a migration address, or no room elsewhere) stays: move it (a spec change, or stop it) before powering {node} off, or HA restarts the HA ones elsewhere when it fails",
            vms.len(),
            if vms.len() == 1 { "" } else { "s" },
            if vms.len() == 1 { "s" } else { "" },
            vms.join(", ")
        )
    }
}

/// `cairn node maintenance NODE --on|--off`: asks the controller (of `data_dir`, or
/// at `url`) with an action signed by `key`. Returns the exit code.
pub fn command(data_dir: &Path, url: Option<&str>, node: &str, on: bool, key: Option<&Path>) -> u8 {
    let path = format!(
        "/api/v1/nodes/{node}/maintenance/{}",
        if on { "on" } else { "off" }
    );
    crate::actions::command(data_dir, url, &action(node, on), &path, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintenance_shows_unless_the_lease_says_failed_or_fenced() {
        assert_eq!(state("ready", true), "maintenance");
        assert_eq!(state("suspect", true), "maintenance");
        assert_eq!(state("unreachable", true), "maintenance");
        assert_eq!(state("failed", true), "failed");
        assert_eq!(state("fenced", true), "fenced");
        assert_eq!(state("ready", false), "ready");
    }

    #[test]
    fn entering_maintenance_names_the_vms_still_there() {
        let m = message("lab-2", true, true, &["web-0".into(), "db".into()]);
        assert!(m.contains("2 VMs still run on it"), "{m}");
        assert!(m.contains("web-0, db"), "{m}");
        assert!(message("lab-2", true, true, &[]).contains("it may be powered off"));
        assert!(message("lab-2", false, false, &[]).contains("was not in maintenance"));
    }

    #[test]
    fn the_set_survives_a_reload() {
        let dir = std::env::temp_dir().join(format!("cairn-maint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = Maintenance::load(&dir).unwrap();
        assert!(m.set("lab-2", true, "alice").unwrap());
        assert!(!m.set("lab-2", true, "alice").unwrap());
        let again = Maintenance::load(&dir).unwrap();
        assert_eq!(again.nodes(), BTreeSet::from(["lab-2".to_owned()]));
        assert!(again.set("lab-2", false, "alice").unwrap());
        assert!(Maintenance::load(&dir).unwrap().nodes().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn with_replicas_the_set_is_the_one_in_etcd_and_every_replica_sees_it() {
        let dir = std::env::temp_dir().join(format!("cairn-maint-etcd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if let Err(why) = state_etcd::testing::binary() {
            eprintln!("skipped: {why}");
            return;
        }
        let etcd = state_etcd::testing::Etcd::start("127.0.0.71", 23798, &dir).expect("etcd");
        let store = || Some(state_etcd::EtcdStore::open(&etcd.url("m")).unwrap());
        let (a_dir, b_dir) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&a_dir).unwrap();
        std::fs::create_dir_all(&b_dir).unwrap();
        let a = Maintenance::load(&a_dir).unwrap().shared_through(store());
        let b = Maintenance::load(&b_dir).unwrap().shared_through(store());
        assert!(a.set("lab-2", true, "alice").unwrap());
        // Not in a's data directory: in etcd, where b reads it.
        assert!(!path(&a_dir).exists());
        std::thread::sleep(SHARED_MAX_AGE);
        assert_eq!(b.nodes(), BTreeSet::from(["lab-2".to_owned()]));
        assert_eq!(b.entries()[0].by, "alice");
        // A replica started later (a new leader) has it at once.
        let c = Maintenance::load(&dir).unwrap().shared_through(store());
        assert_eq!(c.nodes(), BTreeSet::from(["lab-2".to_owned()]));
        assert!(c.set("lab-2", false, "bob").unwrap());
        std::thread::sleep(SHARED_MAX_AGE);
        assert!(a.nodes().is_empty());
        drop(etcd);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
