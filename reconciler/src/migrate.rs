//! Live migration, the commander's half (issue 17): one `migrate_vm` step of a plan
//! carried out as the node API 1.4 sequence, with one commit point.
//!
//! 1. `CreateVm` and `PrepareIncomingVm` on the destination (its VMM listens);
//! 2. `MigrateVm` on the source: pre-copy until the rest fits the downtime target,
//!    then the source pauses, drains its in-flight requests and sends the final
//!    state; it answers `ready-to-commit` (or a failure phase);
//! 3. **the commit point**: a durable [`MigrationRecord`] naming the destination,
//!    and the volumes' new epochs naming it their writer (or a client), in one write
//!    ([`StateStore::commit_migration`]: the audit log, in the same store and the
//!    same signed chain as every other controller decision; with the redb store one
//!    transaction, one fsync, while the guest is paused);
//! 4. `CommitMigration` on the source (it tells the destination to start and exits)
//!    and on the destination (it starts the VM if the source's word did not arrive),
//!    once the destination and every copy installed the new epoch; the installs on
//!    the other clients and the fenced source run at the same time as the commits;
//! 5. `DeleteVm` on the source, and the record of what happened (figures).
//!
//! The rule that keeps exactly one VM running: the source is told to resume
//! (`AbortMigration`) only while no record names the destination, i.e. before 3.
//! After it, a failure never resumes the source: it stays paused until the
//! destination's commit is retried (`finish`, from `crate::apply::settle`).
//!
//! Disks do not move (issue 17: "their writer is handed over with an epoch change at
//! switch-over"). For a VM with volumes ([`MigratingVolume`]s in the step), through
//! the store's epoch authority ([`StateStore::epoch_authority`]):
//! - before the prepare ([`ready_volumes`]): a volume the authority holds no epoch of
//!   is adopted (epoch 0 on the nodes: the primary writes, every copy in sync); a
//!   destination holding a copy must hold an in-sync one (else the migration is not
//!   started); a destination without a copy is named among the volume's clients
//!   (its storage client reaches the copies; the source, a copy or a client, keeps
//!   writing); the peer set goes to the destination and every copy (the new writer
//!   reaches the others, they know its key);
//! - the commit record lists the hand-over it decides (`handover`), and the same
//!   write stores it ([`commit_point`]): a destination holding a copy becomes the
//!   writer, else it becomes a client, and a source that was a client leaves the
//!   clients, as one epoch change, a compare-and-swap on the epoch it was computed
//!   from (another change first: nothing is written, it is computed again). A store
//!   that cannot write both at once (etcd today) writes the record, then changes
//!   the epochs ([`hand_over`], also when a settle finishes the commit);
//! - after it ([`finish`]): the epoch is installed on the destination and every
//!   copy (a copy not told of it would refuse the new writer's writes, which the
//!   writer reports as a failed copy), and only then are the commits sent; on the
//!   other clients and the dropped source (fenced) at the same time as the
//!   commits. The destination's guest writes nothing before its commit, and the
//!   source's VMM drained its in-flight requests at the pause, so no write of
//!   either side is lost. An install the new writer or the destination did not
//!   take keeps the commit from being sent
//!   (the source stays paused, as for any failure after the record; the next
//!   settle tries again).

use std::time::{Duration, Instant};

use proto::v1;
use proto::v1::apply_request::Action;
use proto::v1::apply_response::Result as Answer;
use serde::{Deserialize, Serialize};

use crate::epochs::{EpochAuthority, EpochError, VolumeEpoch};
use crate::nodes::NodeApi;
use crate::plan::{MigratingVolume, NodeAction, PeerRef, Step};
use crate::state::{StateError, StateStore, now_ms};

/// The audit event a migration record is written as.
pub const MIGRATION_EVENT: &str = "migration";

/// How often the destination's commit is tried before the step fails (the source
/// stays paused; the next apply's settle tries again).
const COMMIT_ATTEMPTS: u32 = 3;

/// The figures of one migration (from the source's `MigrationResult`, and the
/// commander's clock for the downtime).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigrationFigures {
    /// `pre-copy` or `stop-and-copy`.
    pub mode: String,
    /// From the source's pause to the destination's commit answer (the VMM's
    /// paused time plus the commit's round trips): what the guest lost, at most.
    pub downtime_ms: f64,
    /// The source VMM's paused time (pause → the destination held the final state).
    pub paused_ms: f64,
    /// From `PrepareIncomingVm` to the destination running.
    pub total_ms: f64,
    /// Bytes the source sent.
    pub bytes_sent: u64,
    /// The guest's memory.
    pub memory_bytes: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
}

/// One migration as the store keeps it: the commit record and what came of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigrationRecord {
    /// The VM.
    pub vm: String,
    /// The source node.
    pub from: String,
    /// The destination node.
    pub to: String,
    /// `committed` (the commit point: the destination owns the VM), `completed`
    /// (it runs there) or `aborted` (it runs on the source; `error` says why).
    pub phase: String,
    /// The step's request id (`EXECUTION.STEP`).
    pub request_id: String,
    /// When.
    pub at_unix_ms: u64,
    /// What happened (completed migrations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figures: Option<MigrationFigures>,
    /// What went wrong (aborted; or a left-over a completed one could not clean).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The volumes' epoch hand-over the commit decides, one line per volume
    /// (`VOLUME: writer SRC -> DST` or `VOLUME: client SRC -> DST`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handover: Vec<String>,
}

impl MigrationRecord {
    /// The node that owns the VM by this record.
    pub fn owner(&self) -> &str {
        if self.phase == "aborted" {
            &self.from
        } else {
            &self.to
        }
    }
}

/// What [`StateStore::commit_migration`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// The record and every epoch change, in one durable write.
    WithEpochs,
    /// The record alone (a store that cannot write both at once): the commit
    /// changes the epochs after it ([`hand_over`]), as a settle does.
    RecordOnly,
    /// Nothing: `volume` is at epoch `found` (`None`: none), not at the one its
    /// change was computed from.
    Moved {
        /// The volume.
        volume: String,
        /// Its epoch now.
        found: Option<u64>,
    },
}

/// The commit point: the record naming the destination and the volumes' epoch
/// changes it decides ([`EpochAuthority::migration_change`]), written together
/// ([`StateStore::commit_migration`]); read again and retried when a volume's epoch
/// moved meanwhile (then nothing was written). Fills `record.handover`. Returns the
/// volumes' states the record's write stored, `None` when the store wrote the record
/// alone (the hand-over changes the epochs after it). `Err`: nothing was written.
fn commit_point(
    record: &mut MigrationRecord,
    p: &Parts<'_>,
    store: &dyn StateStore,
) -> Result<Option<Vec<VolumeEpoch>>, String> {
    let reason = format!(
        "the live migration of {} from {} to {} committed",
        p.name, p.from, p.to
    );
    for _ in 0..EPOCH_ATTEMPTS {
        let mut states = vec![];
        let mut changes = vec![];
        record.handover.clear();
        if let Some(authority) = authority(p, store)? {
            for volume in p.volumes {
                let (current, change) = authority
                    .migration_change(&volume.name, p.from, p.to, &reason)
                    .map_err(|e| e.to_string())?;
                record.handover.push(if current.copies.contains(p.to) {
                    format!("{}: writer {} -> {}", volume.name, current.writer, p.to)
                } else if current.clients.contains(p.from) {
                    format!("{}: client {} -> {}", volume.name, p.from, p.to)
                } else {
                    format!(
                        "{}: client {} (writer {})",
                        volume.name, p.to, current.writer
                    )
                });
                match change {
                    Some(change) => {
                        states.push(change.state.clone());
                        changes.push(change);
                    }
                    None => states.push(current),
                }
            }
        }
        match store.commit_migration(record, &changes) {
            Ok(Committed::WithEpochs) => return Ok(Some(states)),
            Ok(Committed::RecordOnly) => return Ok(None),
            Ok(Committed::Moved { .. }) => continue,
            Err(e) => return Err(format!("the commit record could not be written: {e}")),
        }
    }
    Err(format!(
        "the commit record was not written: the volumes' epochs kept changing under it ({EPOCH_ATTEMPTS} tries)"
    ))
}

/// The migration records among audit entries (oldest first, as given).
pub fn records_in(audit: &[crate::audit::AuditEntry]) -> Vec<MigrationRecord> {
    audit
        .iter()
        .filter(|e| e.event == MIGRATION_EVENT)
        .filter_map(|e| serde_json::from_value(e.detail.clone()).ok())
        .collect()
}

/// The last migration record of each VM, from `records` (oldest first).
pub fn last_of(
    records: Vec<MigrationRecord>,
) -> std::collections::BTreeMap<String, MigrationRecord> {
    let mut last = std::collections::BTreeMap::new();
    for r in records {
        last.insert(r.vm.clone(), r);
    }
    last
}

struct Parts<'a> {
    name: &'a str,
    from: &'a str,
    from_address: &'a str,
    to: &'a str,
    to_address: &'a str,
    max_downtime_ms: u32,
    definition: &'a NodeAction,
    volumes: &'a [MigratingVolume],
    peers: &'a [PeerRef],
}

fn parts(step: &Step) -> Option<Parts<'_>> {
    match &step.action {
        NodeAction::MigrateVm {
            name,
            from,
            from_address,
            max_downtime_ms,
            definition,
            volumes,
            peers,
        } => Some(Parts {
            name,
            from,
            from_address,
            to: &step.node,
            to_address: &step.address,
            max_downtime_ms: *max_downtime_ms,
            definition,
            volumes,
            peers,
        }),
        _ => None,
    }
}

/// One request of a commander's sequence (also `crate::ft`'s): the node's answer.
pub(crate) async fn call<N: NodeApi>(
    nodes: &N,
    node: &str,
    address: &str,
    request_id: String,
    action: Action,
) -> Result<Option<Answer>, String> {
    nodes
        .apply(
            node,
            address,
            v1::ApplyRequest {
                request_id,
                action: Some(action),
            },
        )
        .await
        .map(|r| r.result)
        .map_err(|e| e.to_string())
}

/// Carries out a `migrate_vm` step (`request_id`: the step's). `Ok` when the VM runs
/// on the destination; `Err` says what failed and where the VM runs.
pub async fn run<N: NodeApi>(
    step: &Step,
    request_id: &str,
    store: &dyn StateStore,
    nodes: &N,
) -> Result<(), String> {
    let Some(p) = parts(step) else {
        return Err(format!("{} is not a migrate_vm step", step.action.word()));
    };
    let id = |what: &str| format!("{request_id}.{what}");
    let started = Instant::now();
    let name = p.name.to_owned();
    // 0. The disks: adopted, the destination's copy in sync or the destination a client.
    if let Err(why) = ready_volumes(&p, request_id, store, nodes).await {
        return Err(abort(&p, request_id, store, nodes, why).await);
    }
    // 1. The destination: defined, then its VMM waiting for the state.
    let to_listen = async {
        call(
            nodes,
            p.to,
            p.to_address,
            id("create"),
            p.definition
                .to_request("")
                .action
                .ok_or("the definition has no action")?,
        )
        .await
        .map_err(|e| format!("defining it on {}: {e}", p.to))?;
        match call(
            nodes,
            p.to,
            p.to_address,
            id("prepare"),
            Action::PrepareIncomingVm(v1::PrepareIncomingVm { name: name.clone() }),
        )
        .await
        {
            Ok(Some(Answer::Incoming(incoming))) => Ok(incoming.listen_address),
            Ok(other) => Err(format!(
                "preparing it on {}: unexpected answer {other:?}",
                p.to
            )),
            Err(e) => Err(format!("preparing it on {}: {e}", p.to)),
        }
    }
    .await;
    let listen = match to_listen {
        Ok(listen) => listen,
        Err(why) => return Err(abort(&p, request_id, store, nodes, why).await),
    };
    hold("prepared").await;
    // 2. The source: pre-copy up to the switch-over.
    let migrated = call(
        nodes,
        p.from,
        p.from_address,
        id("migrate"),
        Action::MigrateVm(v1::MigrateVm {
            name: name.clone(),
            to: listen,
            max_downtime_ms: p.max_downtime_ms,
            stop_and_copy: false,
            timeout_ms: 0,
        }),
    )
    .await;
    let source = match migrated {
        Ok(Some(Answer::Migration(m))) if m.phase == "ready-to-commit" => m,
        Ok(Some(Answer::Migration(m))) => {
            let why = format!("the source {} answered `{}`: {}", p.from, m.phase, m.error);
            return Err(abort(&p, request_id, store, nodes, why).await);
        }
        Ok(other) => {
            let why = format!("the source {} answered {other:?}", p.from);
            return Err(abort(&p, request_id, store, nodes, why).await);
        }
        Err(e) => {
            let why = format!("migrating on the source {}: {e}", p.from);
            return Err(abort(&p, request_id, store, nodes, why).await);
        }
    };
    let ready = Instant::now();
    let mut trace = Trace::new(Some(ready));
    // 3. The commit point: the record and the disks' new epochs, one durable write.
    let mut record = MigrationRecord {
        vm: name.clone(),
        from: p.from.to_owned(),
        to: p.to.to_owned(),
        phase: "committed".to_owned(),
        request_id: request_id.to_owned(),
        at_unix_ms: now_ms(),
        figures: None,
        error: String::new(),
        handover: vec![],
    };
    let stored = match commit_point(&mut record, &p, store) {
        Ok(stored) => stored,
        Err(why) => return Err(abort(&p, request_id, store, nodes, why).await),
    };
    trace.mark("recorded");
    hold("committed").await;
    // 4. and 5.
    let finished = finish(&record, &p, request_id, store, nodes, &mut trace, stored).await;
    trace.print(&name);
    let downtime = ready.elapsed().as_secs_f64() * 1000.0 + source.paused_ms;
    match finished {
        Ok(leftover) => {
            record.phase = "completed".to_owned();
            record.at_unix_ms = now_ms();
            record.error = leftover;
            record.figures = Some(MigrationFigures {
                mode: source.mode.clone(),
                downtime_ms: (downtime * 10.0).round() / 10.0,
                paused_ms: (source.paused_ms * 10.0).round() / 10.0,
                total_ms: (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0,
                bytes_sent: source.bytes_sent,
                memory_bytes: source.memory_bytes,
                rounds: source.rounds,
            });
            store
                .record_migration(&record)
                .map_err(|e| format!("it runs on {}, but the record of it: {e}", p.to))
        }
        Err(e) => Err(e),
    }
}

/// Where a migration's switch-over spends its time, from the source's
/// `ready-to-commit` answer: printed to standard error when `CAIRN_MIGRATE_TRACE` is
/// set (the drain bench, `cargo bench -p cli --bench drain`; not for operators).
struct Trace {
    from: Option<Instant>,
    marks: Vec<(&'static str, Instant)>,
}

impl Trace {
    fn new(from: Option<Instant>) -> Trace {
        Trace {
            from: from.filter(|_| std::env::var_os("CAIRN_MIGRATE_TRACE").is_some()),
            marks: vec![],
        }
    }

    fn mark(&mut self, what: &'static str) {
        self.at(what, Instant::now());
    }

    fn at(&mut self, what: &'static str, at: Instant) {
        if self.from.is_some() {
            self.marks.push((what, at));
        }
    }

    fn print(&self, vm: &str) {
        let Some(from) = self.from else {
            return;
        };
        let marks: Vec<String> = self
            .marks
            .iter()
            .map(|(what, at)| format!("{what} +{:.1} ms", (*at - from).as_secs_f64() * 1e3))
            .collect();
        eprintln!("migrate trace {vm}: ready-to-commit, {}", marks.join(", "));
    }
}

/// Test hook (the fault tests of `cli/tests/it/migration.rs`; not for operators):
/// with `CAIRN_MIGRATE_HOLD=POINT:MARKER:MS`, a migration reaching `POINT`
/// (`prepared`: the destination listens, the source was not asked yet; `committed`:
/// the record names the destination, nobody was told) creates the file `MARKER`
/// and waits `MS` milliseconds, for the test to kill a process then.
async fn hold(point: &str) {
    let Ok(spec) = std::env::var("CAIRN_MIGRATE_HOLD") else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let (Some(at), Some(marker), Some(ms)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    if at != point {
        return;
    }
    let _ = std::fs::write(marker, point);
    tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
}

/// The commit, after the record named the destination: its disks' new epochs are
/// installed (`stored`: the states the record's write stored; `None`: changed now,
/// [`hand_over`]), the source is told (it may be gone: its word is not needed), the
/// destination is told until it answers (a few tries), then the source's copy is
/// deleted. `Ok` with a note of what was left over (a source that could not be
/// deleted, a copy that did not take the epoch), `Err` when the destination did not
/// start: the VM then runs nowhere and its source stays paused (never resumed: the
/// record names the destination) until a later `finish` gets through.
///
/// The installs on the destination and on every copy come before the commits (the
/// source relays its commit to the destination's VMM, so neither is sent before
/// them): a copy not told of the epoch refuses the new writer's write, and the writer
/// would report it for removal. The installs on the other clients and the fenced
/// source (the old writer is paused with its requests drained) run at the same time
/// as the commits.
async fn finish<N: NodeApi>(
    record: &MigrationRecord,
    p: &Parts<'_>,
    request_id: &str,
    store: &dyn StateStore,
    nodes: &N,
    trace: &mut Trace,
    stored: Option<Vec<VolumeEpoch>>,
) -> Result<String, String> {
    let (from_address, to_address) = (p.from_address, p.to_address);
    let id = |what: &str| format!("{request_id}.{what}");
    let not_handed_over = |why: String| {
        format!(
            "committed to {} (the record names it), but its disks were not handed over: {why}; the source {} stays paused, the next apply commits it again",
            record.to, record.from
        )
    };
    let states = match stored {
        Some(states) => states,
        None => hand_over(p, store).map_err(not_handed_over)?,
    };
    // Each volume's installs: (node, state), split into those the commit waits for.
    let mut first = vec![];
    let mut overlapped = vec![];
    for state in &states {
        let fenced: Vec<&str> = if state.copies.contains(p.from) {
            vec![]
        } else {
            vec![p.from]
        };
        for node in install_order(state, &fenced) {
            // Every copy too: a copy refuses a write under an epoch it was not told
            // of yet, and the writer reports such a copy for removal (it is not a
            // stale-epoch refusal); only the clients and the fenced source can wait.
            if node == p.to || state.copies.contains(node) {
                first.push((node.to_owned(), state));
            } else {
                overlapped.push((node.to_owned(), state));
            }
        }
    }
    let commit = || {
        Action::CommitMigration(v1::CommitMigration {
            name: record.vm.clone(),
        })
    };
    let switch_over = async {
        let installed = join_all(
            first
                .iter()
                .map(|(node, state)| install_on(p, state, node, nodes))
                .collect(),
        )
        .await;
        if let Some(e) = first
            .iter()
            .zip(installed)
            .find_map(|((node, state), r)| r.err().map(|e| install_failure(state, node, &e)))
        {
            return Err(not_handed_over(e));
        }
        let installed_at = Instant::now();
        // Both sides are told at once: the source relays the commit to the
        // destination and exits (its answer does not matter: it is committed either
        // way, and it may be gone); the destination starts on whichever word comes
        // first, and is told until it answers (a few tries). Waiting for the source's
        // exit first kept the destination's commit behind the source VMM's teardown
        // (~0.5 s with a disk).
        let source = async {
            let answer = call(
                nodes,
                &record.from,
                from_address,
                id("commit-src"),
                commit(),
            )
            .await;
            (answer, Instant::now())
        };
        let destination = async {
            let mut last = String::new();
            for attempt in 1..=COMMIT_ATTEMPTS {
                match call(
                    nodes,
                    &record.to,
                    to_address,
                    id(&format!("commit-dst-{attempt}")),
                    commit(),
                )
                .await
                {
                    Ok(_) => return (true, last, Instant::now()),
                    Err(e) => last = e,
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (false, last, Instant::now())
        };
        let ((_, source_at), (started, last, destination_at)) = tokio::join!(source, destination);
        Ok((installed_at, source_at, started, last, destination_at))
    };
    let others = async {
        let results = join_all(
            overlapped
                .iter()
                .map(|(node, state)| install_on(p, state, node, nodes))
                .collect(),
        )
        .await;
        let notes: Vec<String> = overlapped
            .iter()
            .zip(results)
            .filter_map(|((node, state), r)| r.err().map(|e| install_failure(state, node, &e)))
            .collect();
        (notes, Instant::now())
    };
    let (switched, (notes, others_at)) = tokio::join!(switch_over, others);
    let (installed_at, source_at, started, last, destination_at) = switched?;
    trace.at("writer installed", installed_at);
    trace.at("others installed", others_at);
    trace.at("source committed", source_at);
    trace.at("destination committed", destination_at);
    if !started {
        return Err(format!(
            "committed to {} (the record names it), but it did not start: {last}; the source {} stays paused, the next apply commits it again",
            record.to, record.from
        ));
    }
    let mut leftover = notes;
    if let Err(e) = call(
        nodes,
        &record.from,
        from_address,
        id("delete-src"),
        Action::DeleteVm(v1::DeleteVm {
            name: record.vm.clone(),
        }),
    )
    .await
    {
        leftover.push(format!(
            "its copy on {} is left (the next plan deletes it): {e}",
            record.from
        ));
    }
    Ok(leftover.join("; "))
}

/// Before the commit point: the source resumes (or never stopped), the destination's
/// VMM ends and its definition is removed (so the next plan migrates again rather
/// than starting a second copy), and the abort is recorded. Returns the error.
async fn abort<N: NodeApi>(
    p: &Parts<'_>,
    request_id: &str,
    store: &dyn StateStore,
    nodes: &N,
    why: String,
) -> String {
    abort_as(p, request_id, request_id, store, nodes, why).await
}

/// [`abort`] with its requests named after `ids` (settle's), recorded under the
/// step's `request_id`.
async fn abort_as<N: NodeApi>(
    p: &Parts<'_>,
    ids: &str,
    request_id: &str,
    store: &dyn StateStore,
    nodes: &N,
    why: String,
) -> String {
    let id = |what: &str| format!("{ids}.{what}");
    let abort = || {
        Action::AbortMigration(v1::AbortMigration {
            name: p.name.to_owned(),
        })
    };
    let mut notes = vec![];
    if let Err(e) = call(nodes, p.from, p.from_address, id("abort-src"), abort()).await {
        notes.push(format!("the source's abort: {e}"));
    }
    let _ = call(nodes, p.to, p.to_address, id("abort-dst"), abort()).await;
    let _ = call(
        nodes,
        p.to,
        p.to_address,
        id("undefine-dst"),
        Action::DeleteVm(v1::DeleteVm {
            name: p.name.to_owned(),
        }),
    )
    .await;
    notes.extend(release_destination(p, store, nodes).await);
    let mut error = format!("live migration to {} aborted: {why}", p.to);
    if !notes.is_empty() {
        error.push_str(&format!(" ({})", notes.join("; ")));
    }
    let record = MigrationRecord {
        vm: p.name.to_owned(),
        from: p.from.to_owned(),
        to: p.to.to_owned(),
        phase: "aborted".to_owned(),
        request_id: request_id.to_owned(),
        at_unix_ms: now_ms(),
        figures: None,
        error: error.clone(),
        handover: vec![],
    };
    if let Err(e) = store.record_migration(&record) {
        error.push_str(&format!(" (the abort's record: {e})"));
    }
    error
}

/// After an abort: a destination without a copy that [`ready_volumes`] made a client
/// of the VM's volumes leaves their clients again (the VM runs on the source alone,
/// so without this a `cairn apply` with no controller, whose `set_clients` would
/// drop it, left it there for good), and the new epoch is installed on the copies,
/// the clients and the destination. Returns notes for what failed: the abort
/// stands either way.
async fn release_destination<N: NodeApi>(
    p: &Parts<'_>,
    store: &dyn StateStore,
    nodes: &N,
) -> Vec<String> {
    let authority = match authority(p, store) {
        Ok(Some(authority)) => authority,
        Ok(None) => return vec![],
        Err(e) => return vec![e],
    };
    let to = p.to.to_owned();
    let reason = format!(
        "the live migration of {} to {to} was aborted: it runs on {} alone",
        p.name, p.from
    );
    let mut notes = vec![];
    for volume in p.volumes {
        let client =
            |state: &VolumeEpoch| !state.copies.contains(&to) && state.clients.contains(&to);
        match authority.get(&volume.name) {
            Ok(Some(state)) if client(&state) => {}
            Ok(_) => continue,
            Err(e) => {
                notes.push(format!("volume {}: {e}", volume.name));
                continue;
            }
        }
        let changed = change_epoch(&authority, &volume.name, |authority, state| {
            client(state).then(|| {
                let mut clients = state.clients.clone();
                clients.remove(&to);
                authority.set_clients(&state.volume, state.epoch, &clients, &reason)
            })
        });
        let installed = match changed {
            Ok(state) => install_everywhere(p, &state, &[p.to], &state.writer, true, nodes).await,
            Err(e) => Err(e),
        };
        match installed {
            Ok(more) => notes.extend(more),
            Err(e) => notes.push(format!(
                "{to} is still a client of volume {}: {e}",
                volume.name
            )),
        }
    }
    notes
}

/// Finishes every migration whose last record is `committed` (the record names the
/// destination, which was not seen running yet: its commit failed, or the apply
/// died after the record), whether or not its execution finished: run before a
/// plan, so that a plan never sees the paused source and the waiting destination as
/// two copies. Returns one line per migration it tried (`vm: finished` or why not).
pub async fn finish_pending<N: NodeApi>(
    store: &dyn StateStore,
    nodes: &N,
) -> Result<Vec<String>, StateError> {
    let pending: Vec<MigrationRecord> = last_of(store.migrations()?)
        .into_values()
        .filter(|r| r.phase == "committed")
        .collect();
    if pending.is_empty() {
        return Ok(vec![]);
    }
    let executions = store.executions()?;
    let mut out = vec![];
    for record in pending {
        let step = record
            .request_id
            .rsplit_once('.')
            .and_then(|(execution, step)| {
                let step: usize = step.parse().ok()?;
                let (_, e) = executions
                    .iter()
                    .find(|(_, e)| e.execution_id == execution)?;
                let plan: crate::plan::Plan = serde_json::from_value(e.plan.clone()).ok()?;
                plan.steps.get(step).cloned()
            });
        let Some(step) = step else {
            out.push(format!(
                "{}: its migration's step {} is not in the store; commit it on {} by hand",
                record.vm, record.request_id, record.to
            ));
            continue;
        };
        match settle_step(&step, &record.request_id, store, nodes).await? {
            Ok(()) => out.push(format!(
                "{}: migration to {} finished",
                record.vm, record.to
            )),
            Err(e) => out.push(format!("{}: {e}", record.vm)),
        }
    }
    Ok(out)
}

/// What settling an interrupted `migrate_vm` step did: the last record of its
/// request id decides. Named the destination (`committed`): the commit is finished
/// ([`finish`]); else (no record, the apply died before the commit point): the
/// source resumes and the destination's copy goes.
pub async fn settle_step<N: NodeApi>(
    step: &Step,
    request_id: &str,
    store: &dyn StateStore,
    nodes: &N,
) -> Result<Result<(), String>, StateError> {
    let Some(p) = parts(step) else {
        return Ok(Err("not a migrate_vm step".to_owned()));
    };
    let record = store
        .migrations()?
        .into_iter()
        .rev()
        .find(|r| r.request_id == request_id);
    let settle_id = format!("{request_id}.settle-{}", now_ms());
    Ok(match record {
        Some(r) if r.phase == "completed" => Ok(()),
        Some(r) if r.phase == "aborted" => Err(r.error),
        Some(mut r) => {
            match finish(
                &r,
                &p,
                &settle_id,
                store,
                nodes,
                &mut Trace::new(None),
                None,
            )
            .await
            {
                Ok(leftover) => {
                    r.phase = "completed".to_owned();
                    r.at_unix_ms = now_ms();
                    r.error = leftover;
                    store.record_migration(&r)?;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        None => Err(abort_as(
            &p,
            &settle_id,
            request_id,
            store,
            nodes,
            "the apply that ran it was interrupted before the commit".to_owned(),
        )
        .await),
    })
}

/// How often an epoch change is tried again after another change came first.
const EPOCH_ATTEMPTS: u32 = 3;

/// The authority the hand-over goes through; `None` for a VM without volumes.
fn authority<'s>(
    p: &Parts<'_>,
    store: &'s dyn StateStore,
) -> Result<Option<EpochAuthority<'s>>, String> {
    if p.volumes.is_empty() {
        return Ok(None);
    }
    store.epoch_authority().map(Some).ok_or_else(|| {
        format!(
            "its disks ({}) need their writer handed over, and this state store keeps no volume epochs",
            p.volumes
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        )
    })
}

/// A compare-and-swap on a volume's epoch, read again when another change came first:
/// `change` returns the new state to make from the current one, or `None` when
/// nothing is to change.
fn change_epoch(
    authority: &EpochAuthority<'_>,
    volume: &str,
    change: impl Fn(&EpochAuthority<'_>, &VolumeEpoch) -> Option<Result<VolumeEpoch, EpochError>>,
) -> Result<VolumeEpoch, String> {
    for _ in 0..EPOCH_ATTEMPTS {
        let state = authority
            .get(volume)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the epoch authority holds no epoch of volume {volume}"))?;
        match change(authority, &state) {
            None => return Ok(state),
            Some(Ok(next)) => return Ok(next),
            Some(Err(EpochError::Conflict { .. })) => continue,
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
    Err(format!(
        "volume {volume}'s epoch kept changing under the migration ({EPOCH_ATTEMPTS} tries)"
    ))
}

fn address_of<'a>(p: &'a Parts<'_>, node: &str) -> Option<&'a str> {
    if node == p.to {
        Some(p.to_address)
    } else if node == p.from {
        Some(p.from_address)
    } else {
        p.peers
            .iter()
            .find(|peer| peer.name == node)
            .map(|peer| peer.address.as_str())
    }
}

/// The nodes `state` is installed on: its copies (the writer last), its clients, then
/// `fenced` (nodes it no longer names).
fn install_order<'s>(state: &'s VolumeEpoch, fenced: &[&'s str]) -> Vec<&'s str> {
    let mut order: Vec<&str> = state
        .copies
        .iter()
        .map(String::as_str)
        .filter(|n| *n != state.writer)
        .collect();
    order.push(&state.writer);
    order.extend(state.clients.iter().map(String::as_str));
    order.extend(fenced.iter().copied());
    order
}

/// Installs `state` on `node`.
async fn install_on<N: NodeApi>(
    p: &Parts<'_>,
    state: &VolumeEpoch,
    node: &str,
    nodes: &N,
) -> Result<(), String> {
    match address_of(p, node) {
        Some(address) => call(
            nodes,
            node,
            address,
            crate::epochs::request_id(state, node),
            Action::SetVolumeEpoch(crate::epochs::install(state)),
        )
        .await
        .map(|_| ()),
        None => Err("its address is not known (it did not answer the plan)".to_owned()),
    }
}

fn install_failure(state: &VolumeEpoch, node: &str, error: &str) -> String {
    format!(
        "volume {} epoch {} not installed on {node}: {error}",
        state.volume, state.epoch
    )
}

/// Installs `state` on [`install_order`]'s nodes; with `at_once`, on all of them at
/// the same time. `Err` only when the writer (or `must`) did not take it; the other
/// refusals are returned as notes (the controller's drift check installs the current
/// epoch on a copy behind).
async fn install_everywhere<N: NodeApi>(
    p: &Parts<'_>,
    state: &VolumeEpoch,
    fenced: &[&str],
    must: &str,
    at_once: bool,
    nodes: &N,
) -> Result<Vec<String>, String> {
    let order = install_order(state, fenced);
    let results = if at_once {
        join_all(
            order
                .iter()
                .map(|node| install_on(p, state, node, nodes))
                .collect(),
        )
        .await
    } else {
        let mut results = vec![];
        for node in &order {
            results.push(install_on(p, state, node, nodes).await);
        }
        results
    };
    let mut notes = vec![];
    for (node, result) in order.into_iter().zip(results) {
        if let Err(e) = result {
            let line = install_failure(state, node, &e);
            if node == state.writer || node == must {
                return Err(line);
            }
            notes.push(line);
        }
    }
    Ok(notes)
}

/// Every future of `futures` run at once; their outputs in order.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|output| output.expect("every future is ready"))
        .collect()
}

/// Before the prepare (see the module documentation). `Err`: the migration is not
/// started, and why.
async fn ready_volumes<N: NodeApi>(
    p: &Parts<'_>,
    request_id: &str,
    store: &dyn StateStore,
    nodes: &N,
) -> Result<(), String> {
    let Some(authority) = authority(p, store)? else {
        return Ok(());
    };
    // The peer set first: a client finds the copies there, a copy its key.
    let peers = v1::SetPeers {
        peers: p
            .peers
            .iter()
            .map(|peer| v1::Peer {
                name: peer.name.clone(),
                address: peer.address.clone(),
                public_key_hex: peer.public_key_hex.clone(),
            })
            .collect(),
    };
    let mut told = std::collections::BTreeSet::new();
    for node in p
        .volumes
        .iter()
        .flat_map(|v| v.copies.iter().map(String::as_str))
        .chain([p.to])
    {
        if !told.insert(node) {
            continue;
        }
        if let Some(address) = address_of(p, node) {
            call(
                nodes,
                node,
                address,
                format!("{request_id}.peers-{node}"),
                Action::SetPeers(peers.clone()),
            )
            .await
            .map_err(|e| format!("the peer set on {node}: {e}"))?;
        }
    }
    for volume in p.volumes {
        let known = authority.get(&volume.name).map_err(|e| e.to_string())?;
        if known.is_none() {
            let copies: std::collections::BTreeSet<String> =
                volume.copies.iter().cloned().collect();
            let writer = volume.copies.first().cloned().unwrap_or_default();
            match authority.adopt(
                &volume.name,
                &writer,
                &copies,
                &copies,
                0,
                &format!(
                    "adopted for the live migration of {} (epoch 0 on the nodes: the primary writes, every copy in sync)",
                    p.name
                ),
            ) {
                Ok(_) | Err(EpochError::Conflict { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let to = p.to.to_owned();
        let state = change_epoch(&authority, &volume.name, |authority, state| {
            if state.copies.contains(&to) || state.clients.contains(&to) {
                return None;
            }
            let mut clients = state.clients.clone();
            clients.insert(to.clone());
            Some(authority.set_clients(
                &state.volume,
                state.epoch,
                &clients,
                &format!(
                    "{} migrates live to {to}, which holds no copy: it reads and writes as a client",
                    p.name
                ),
            ))
        })?;
        if state.copies.contains(&to) && !state.in_sync.contains(&to) {
            return Err(format!(
                "{to}'s copy of volume {} is not in sync (in sync: {}), so it cannot become the writer",
                volume.name,
                state.in_sync.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        install_everywhere(p, &state, &[], p.to, false, nodes).await?;
    }
    Ok(())
}

/// The epoch changes of a committed record that the store did not write with it
/// ([`Committed::RecordOnly`], or a settle finishing the commit; see the module
/// documentation): idempotent, a volume already handed over is left as it is.
/// Returns the volumes' states to install.
fn hand_over(p: &Parts<'_>, store: &dyn StateStore) -> Result<Vec<VolumeEpoch>, String> {
    let Some(authority) = authority(p, store)? else {
        return Ok(vec![]);
    };
    let mut states = vec![];
    for volume in p.volumes {
        let (to, from) = (p.to.to_owned(), p.from.to_owned());
        let reason = format!(
            "the live migration of {} from {from} to {to} committed",
            p.name
        );
        // The writer, where the destination holds a copy.
        change_epoch(&authority, &volume.name, |authority, state| {
            (state.copies.contains(&to) && state.writer != to)
                .then(|| authority.set_writer(&state.volume, state.epoch, &to, &reason))
        })?;
        // The clients: the source leaves them, the destination without a copy is one.
        states.push(change_epoch(
            &authority,
            &volume.name,
            |authority, state| {
                let mut clients = state.clients.clone();
                clients.remove(&from);
                if !state.copies.contains(&to) {
                    clients.insert(to.clone());
                }
                (clients != state.clients)
                    .then(|| authority.set_clients(&state.volume, state.epoch, &clients, &reason))
            },
        )?);
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    //! The commander's sequence against a fake node API that answers as the node
    //! does (the real nodes' half is tested in node-runtime/tests/it/migrate.rs; the
    //! whole path with real processes in cli/tests/it/migration.rs).

    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::desired::DesiredNode;
    use crate::nodes::NodeError;
    use crate::observe::NodeObservation;
    use crate::state::{RedbStore, random_id};

    /// Records `NODE ACTION` per request; fails the actions of `failing`.
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<String>>>,
        failing: Arc<Mutex<BTreeSet<String>>>,
        store: Arc<Mutex<Option<std::path::PathBuf>>>,
    }

    impl NodeApi for Fake {
        async fn observe(&self, _node: &DesiredNode) -> Result<NodeObservation, String> {
            Err("not used".into())
        }

        async fn apply(
            &self,
            node: &str,
            _address: &str,
            request: v1::ApplyRequest,
        ) -> Result<v1::ApplyResponse, NodeError> {
            let word = proto::action_name(request.action.as_ref().expect("an action"));
            let call = format!("{node} {word}");
            // The record must name the destination before any commit is sent.
            if word == "commit_migration"
                && let Some(path) = self.store.lock().unwrap().clone()
            {
                let store = RedbStore::open(&path).unwrap();
                let last = last_of(store.migrations().unwrap());
                assert_eq!(last["mv"].phase, "committed", "commit before the record");
                // ... and the disks' epoch hands them to the destination already.
                if let Some(state) = store.epoch_authority().unwrap().get("mv-data").unwrap() {
                    assert!(
                        state.writer == "dst" || state.clients.contains("dst"),
                        "commit before the epoch names the destination: {state:?}"
                    );
                }
            }
            self.calls.lock().unwrap().push(call.clone());
            if self.failing.lock().unwrap().contains(&call) {
                return Err(NodeError::Unreachable {
                    node: node.into(),
                    error: "link down".into(),
                });
            }
            let result = match request.action {
                Some(Action::PrepareIncomingVm(_)) => {
                    Some(Answer::Incoming(v1::IncomingVmResult {
                        name: "mv".into(),
                        listen_address: "127.0.0.1:4000".into(),
                        pid: 1,
                    }))
                }
                Some(Action::MigrateVm(_)) => Some(Answer::Migration(v1::MigrationResult {
                    phase: "ready-to-commit".into(),
                    mode: "pre-copy".into(),
                    rounds: 3,
                    bytes_sent: 70 << 20,
                    memory_bytes: 64 << 20,
                    paused_ms: 7.5,
                    ..Default::default()
                })),
                _ => None,
            };
            Ok(v1::ApplyResponse {
                request_id: request.request_id,
                result,
                ..Default::default()
            })
        }

        async fn get_outcome(
            &self,
            _node: &str,
            _address: &str,
            _request_id: &str,
        ) -> Result<v1::GetOutcomeResponse, NodeError> {
            Err(NodeError::Unreachable {
                node: "x".into(),
                error: "not used".into(),
            })
        }
    }

    fn step() -> Step {
        Step {
            id: 0,
            wave: 0,
            node: "dst".into(),
            address: "127.0.0.2:7100".into(),
            action: NodeAction::MigrateVm {
                name: "mv".into(),
                from: "src".into(),
                from_address: "127.0.0.1:7100".into(),
                max_downtime_ms: 50,
                definition: Box::new(NodeAction::CreateVm {
                    name: "mv".into(),
                    addresses: vec![],
                    vcpus: 1,
                    memory_bytes: 64 << 20,
                    image: crate::desired::BootImage::Builtin("cairn-guest".into()),
                    volumes: vec![],
                    tenant: "t".into(),
                    nics: vec![],
                    sla: String::new(),
                    priority: 0,
                    dedicated_cpus: false,
                    nic_mtu: 0,
                }),
                volumes: vec![],
                peers: vec![],
            },
            depends_on: vec![],
        }
    }

    fn lab() -> (std::path::PathBuf, RedbStore, Fake) {
        let dir = std::env::temp_dir().join(format!("cairn-migrate-{}", random_id()));
        let path = dir.join("state.redb");
        let store = RedbStore::open(&path).unwrap();
        // The audit log is signed with the controller key next to the store.
        proto::auth::Identity::load_or_create(
            &dir.join("controller.key"),
            &dir.join("controller.pub"),
        )
        .unwrap();
        let fake = Fake::default();
        *fake.store.lock().unwrap() = Some(path);
        (dir, store, fake)
    }

    fn calls(fake: &Fake) -> Vec<String> {
        fake.calls.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_migration_commits_after_its_record_and_deletes_the_source_last() {
        let (dir, store, fake) = lab();
        run(&step(), "e.0", &store, &fake).await.unwrap();
        assert_eq!(
            calls(&fake),
            [
                "dst create_vm",
                "dst prepare_incoming_vm",
                "src migrate_vm",
                "src commit_migration",
                "dst commit_migration",
                "src delete_vm"
            ]
        );
        let last = last_of(store.migrations().unwrap());
        let r = &last["mv"];
        assert_eq!((r.phase.as_str(), r.owner()), ("completed", "dst"));
        let f = r.figures.as_ref().unwrap();
        assert_eq!(
            (f.rounds, f.bytes_sent, f.mode.as_str()),
            (3, 70 << 20, "pre-copy")
        );
        assert!(f.downtime_ms >= f.paused_ms, "{f:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_failure_before_the_record_resumes_the_source_and_removes_the_destination() {
        let (dir, store, fake) = lab();
        fake.failing.lock().unwrap().insert("src migrate_vm".into());
        let error = run(&step(), "e.0", &store, &fake).await.unwrap_err();
        assert!(
            error.contains("aborted") && error.contains("link down"),
            "{error}"
        );
        let calls = calls(&fake);
        assert!(!calls.iter().any(|c| c.contains("commit")), "{calls:?}");
        assert!(
            calls.contains(&"src abort_migration".to_owned()),
            "{calls:?}"
        );
        assert!(calls.contains(&"dst delete_vm".to_owned()), "{calls:?}");
        let last = last_of(store.migrations().unwrap());
        assert_eq!(
            (last["mv"].phase.as_str(), last["mv"].owner()),
            ("aborted", "src")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn after_the_record_the_source_is_never_resumed_and_settle_finishes_the_commit() {
        let (dir, store, fake) = lab();
        // The link to the destination breaks after the record: its commit fails.
        fake.failing
            .lock()
            .unwrap()
            .insert("dst commit_migration".into());
        let error = run(&step(), "e.0", &store, &fake).await.unwrap_err();
        assert!(error.contains("stays paused"), "{error}");
        let before = calls(&fake);
        assert!(!before.iter().any(|c| c.contains("abort")), "{before:?}");
        assert!(!before.contains(&"src delete_vm".to_owned()), "{before:?}");
        let last = last_of(store.migrations().unwrap());
        assert_eq!(
            (last["mv"].phase.as_str(), last["mv"].owner()),
            ("committed", "dst")
        );
        // The link is back: settling the step finishes the commit, never an abort.
        fake.failing.lock().unwrap().clear();
        settle_step(&step(), "e.0", &store, &fake)
            .await
            .unwrap()
            .unwrap();
        let after = calls(&fake)[before.len()..].to_vec();
        assert_eq!(
            after,
            [
                "src commit_migration",
                "dst commit_migration",
                "src delete_vm"
            ]
        );
        let last = last_of(store.migrations().unwrap());
        assert_eq!(last["mv"].phase, "completed");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// `step()` with a disk whose copies are on `copies`.
    fn step_with_disk(copies: &[&str]) -> Step {
        let mut step = step();
        if let NodeAction::MigrateVm { volumes, peers, .. } = &mut step.action {
            *volumes = vec![MigratingVolume {
                name: "mv-data".into(),
                copies: copies.iter().map(|c| (*c).to_owned()).collect(),
            }];
            *peers = ["src", "dst", "third"]
                .iter()
                .map(|n| PeerRef {
                    name: (*n).into(),
                    address: format!("{n}:7100"),
                    public_key_hex: "00".into(),
                })
                .collect();
        }
        step
    }

    #[tokio::test]
    async fn a_disks_writer_moves_to_the_destinations_copy_before_either_commit() {
        let (dir, store, fake) = lab();
        run(&step_with_disk(&["src", "dst"]), "e.0", &store, &fake)
            .await
            .unwrap();
        let calls = calls(&fake);
        let at = |c: &str| calls.iter().position(|x| x == c).unwrap_or(usize::MAX);
        // Adopted (epoch 1, src writes) before the prepare; the writer moved (epoch 2)
        // and installed on src, then dst, before the first commit.
        assert!(
            at("dst set_peers") < at("dst prepare_incoming_vm"),
            "{calls:?}"
        );
        assert!(
            at("src set_volume_epoch") < at("dst prepare_incoming_vm"),
            "{calls:?}"
        );
        // Installed on both copies (the old writer's, then the new) before either
        // commit (the fake checks that the authority names dst when one is sent).
        let commit = calls
            .iter()
            .position(|c| c == "src commit_migration")
            .unwrap();
        assert_eq!(
            calls[commit - 2..commit],
            ["src set_volume_epoch", "dst set_volume_epoch"],
            "{calls:?}"
        );
        let state = store
            .epoch_authority()
            .unwrap()
            .get("mv-data")
            .unwrap()
            .unwrap();
        assert_eq!((state.epoch, state.writer.as_str()), (2, "dst"));
        let last = last_of(store.migrations().unwrap());
        assert_eq!(last["mv"].handover, ["mv-data: writer src -> dst"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_destination_without_a_copy_is_a_client_from_the_prepare_and_an_unsynced_copy_refuses()
     {
        let (dir, store, fake) = lab();
        run(&step_with_disk(&["src", "third"]), "e.0", &store, &fake)
            .await
            .unwrap();
        let authority = store.epoch_authority().unwrap();
        let state = authority.get("mv-data").unwrap().unwrap();
        assert_eq!(state.writer, "src", "the writer's copy stays where it is");
        assert_eq!(state.clients.iter().collect::<Vec<_>>(), ["dst"]);
        let seen = calls(&fake);
        assert!(
            seen.iter().position(|c| c == "dst set_volume_epoch")
                < seen.iter().position(|c| c == "dst prepare_incoming_vm"),
            "{seen:?}"
        );
        // dst's copy out of sync: not started, the source untouched.
        let (dir2, store2, fake2) = lab();
        let all: std::collections::BTreeSet<String> = ["src".to_owned(), "dst".to_owned()].into();
        let adopted = store2
            .epoch_authority()
            .unwrap()
            .adopt("mv-data", "src", &all, &all, 0, "test")
            .unwrap();
        store2
            .epoch_authority()
            .unwrap()
            .remove_copy("mv-data", adopted.epoch, "dst", "test")
            .unwrap();
        let error = run(&step_with_disk(&["src", "dst"]), "e.0", &store2, &fake2)
            .await
            .unwrap_err();
        assert!(error.contains("not in sync"), "{error}");
        assert!(
            !calls(&fake2).iter().any(|c| c.contains("migrate_vm")),
            "{:?}",
            calls(&fake2)
        );
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(dir2).unwrap();
    }

    #[tokio::test]
    async fn an_abort_before_the_commit_takes_a_copyless_destination_out_of_the_clients() {
        let (dir, store, fake) = lab();
        fake.failing.lock().unwrap().insert("src migrate_vm".into());
        let error = run(&step_with_disk(&["src", "third"]), "e.0", &store, &fake)
            .await
            .unwrap_err();
        assert!(error.contains("aborted"), "{error}");
        let state = store
            .epoch_authority()
            .unwrap()
            .get("mv-data")
            .unwrap()
            .unwrap();
        assert!(state.clients.is_empty(), "{state:?}");
        assert_eq!(state.writer, "src");
        // Adopted (1), dst a client (2), dst out again (3), installed on the copies
        // and on dst, after the destination's VM was deleted.
        assert_eq!(state.epoch, 3, "{state:?}");
        let calls = calls(&fake);
        let deleted = calls.iter().position(|c| c == "dst delete_vm").unwrap();
        let after: BTreeSet<&str> = calls[deleted..].iter().map(String::as_str).collect();
        for node in ["src", "third", "dst"] {
            assert!(
                after.contains(format!("{node} set_volume_epoch").as_str()),
                "{calls:?}"
            );
        }
        // A destination holding a copy keeps it: nothing changes at the abort.
        let (dir2, store2, fake2) = lab();
        fake2
            .failing
            .lock()
            .unwrap()
            .insert("src migrate_vm".into());
        run(&step_with_disk(&["src", "dst"]), "e.0", &store2, &fake2)
            .await
            .unwrap_err();
        let state = store2
            .epoch_authority()
            .unwrap()
            .get("mv-data")
            .unwrap()
            .unwrap();
        assert_eq!((state.epoch, state.writer.as_str()), (1, "src"));
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(dir2).unwrap();
    }

    #[tokio::test]
    async fn a_commit_point_that_cannot_be_written_changes_no_epoch_and_resumes_the_source() {
        // The record and the epochs are one write: without the key that signs the
        // audit log the record cannot be written, so neither is, and the source
        // resumes (before, the epoch changed after a record that was written).
        let (dir, store, fake) = lab();
        std::fs::remove_file(dir.join("controller.key")).unwrap();
        let error = run(&step_with_disk(&["src", "dst"]), "e.0", &store, &fake)
            .await
            .unwrap_err();
        assert!(
            error.contains("aborted") && error.contains("commit record"),
            "{error}"
        );
        let calls = calls(&fake);
        assert!(!calls.iter().any(|c| c.contains("commit")), "{calls:?}");
        assert!(
            calls.contains(&"src abort_migration".to_owned()),
            "{calls:?}"
        );
        let state = store
            .epoch_authority()
            .unwrap()
            .get("mv-data")
            .unwrap()
            .unwrap();
        assert_eq!((state.epoch, state.writer.as_str()), (1, "src"));
        assert!(store.migrations().unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_record_and_the_epochs_are_written_together_or_not_at_all() {
        let (dir, store, _) = lab();
        let authority = store.epoch_authority().unwrap();
        let all: BTreeSet<String> = ["src".to_owned(), "dst".to_owned()].into();
        authority
            .adopt("mv-data", "src", &all, &all, 0, "test")
            .unwrap();
        let record = MigrationRecord {
            vm: "mv".into(),
            from: "src".into(),
            to: "dst".into(),
            phase: "committed".into(),
            request_id: "e.0".into(),
            at_unix_ms: 1,
            figures: None,
            error: String::new(),
            handover: vec![],
        };
        let (_, change) = authority
            .migration_change("mv-data", "src", "dst", "test")
            .unwrap();
        let change = change.expect("the writer moves");
        // Another change came first (the controller removed nothing, just raised it):
        // the commit computed from epoch 1 writes nothing.
        authority.raise_epoch("mv-data", 1, "test").unwrap();
        assert_eq!(
            store
                .commit_migration(&record, std::slice::from_ref(&change))
                .unwrap(),
            Committed::Moved {
                volume: "mv-data".into(),
                found: Some(2)
            }
        );
        assert!(store.migrations().unwrap().is_empty());
        assert_eq!(authority.get("mv-data").unwrap().unwrap().writer, "src");
        // Computed again from epoch 2: both written.
        let (_, change) = authority
            .migration_change("mv-data", "src", "dst", "test")
            .unwrap();
        assert_eq!(
            store.commit_migration(&record, &[change.unwrap()]).unwrap(),
            Committed::WithEpochs
        );
        let state = authority.get("mv-data").unwrap().unwrap();
        assert_eq!((state.epoch, state.writer.as_str()), (3, "dst"));
        assert_eq!(store.migrations().unwrap(), [record]);
        assert_eq!(
            authority.journal("mv-data").unwrap().last().unwrap().change,
            "writer src → dst"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn settling_a_migration_with_no_record_gives_it_up_on_the_source() {
        let (dir, store, fake) = lab();
        let error = settle_step(&step(), "e.0", &store, &fake)
            .await
            .unwrap()
            .unwrap_err();
        assert!(error.contains("interrupted before the commit"), "{error}");
        let calls = calls(&fake);
        assert_eq!(
            calls,
            [
                "src abort_migration",
                "dst abort_migration",
                "dst delete_vm"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
