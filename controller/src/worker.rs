//! The worker: one task that does every unit of work in turn (a sync of the
//! branch head, a drift check), so two applies of the controller never
//! overlap, and each is one idempotent pass from what git and the nodes say.
//!
//! What happens after a failed sync follows Flux's taxonomy: a commit refused by
//! trust, that does not compile, or whose plan is unacceptable is *stalled* —
//! tried again only when the input changes (a new commit, or the trusted-keys
//! file); anything else (a step failed, a node error, the apply lock held by a
//! manual apply) is retried with exponential backoff (5 s doubling to 5 min),
//! until a new commit arrives. Never a hot loop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use compiler::model::Reconcile;
use reconciler::apply::{ApplyEvents, ApplyOptions, StepOutcome};
use reconciler::observe::{NodeObservation, Observed, observe_except};
use reconciler::pipeline::{self, Planned};
use reconciler::plan::{ChangeKind, Plan};
use reconciler::state::StateStore;

use crate::replicas::ControllerStore;
use serde_json::json;

use crate::Shared;
use crate::events::{AppliedCommit, Event, LastSync};
use crate::source::GitSource;

mod gate_step;
mod lease_bound;

/// The commit applied last, compiled: what drift is planned against.
#[derive(Debug)]
pub struct Good {
    /// Full commit id.
    pub commit: String,
    /// Its compiled model (shared with the console's page loads, never copied).
    pub model: Arc<compiler::Model>,
    /// Its files, written out (image paths resolve against it).
    pub spec_root: PathBuf,
}

/// First delay of the retry backoff and of crash-loop restarts.
const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest delay.
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// A VM running this long after its last restart is no longer crash-looping.
const CRASH_LOOP_RESET: Duration = Duration::from_secs(600);

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_CAP)
}

/// What to do about a commit that did not sync.
#[derive(Debug, Clone)]
enum Retry {
    /// Until the input changes (the trusted-keys file's modification time).
    Stalled { keys_stamp: Option<SystemTime> },
    /// After `at`.
    Backoff { failures: u32, at: Instant },
    /// Held for approval: until a new commit, `cairn sync`, or `until` (the
    /// end of a freeze window).
    Held { until: Option<Instant> },
}

#[derive(Debug, Clone)]
struct Attempt {
    commit: String,
    retry: Retry,
}

/// How a sync ended.
enum SyncEnd {
    /// The commit is applied (converged or not).
    Applied,
    /// Not applied; try again when the input changes.
    Stalled,
    /// Not applied; retry with backoff.
    Transient,
    /// Paused before anything was applied.
    Held,
    /// Held by the gate (`crate::gate`) for approval.
    HeldForApproval { until: Option<Instant> },
}

#[derive(Debug)]
struct CrashLoop {
    restarts: u32,
    last_restart: Instant,
    reported_for: u32,
    /// When the controller restarted it in place: each follows a crash.
    restarted_at: Vec<Instant>,
    /// A move elsewhere was planned and no other node could take it: it stays in
    /// place, with the backoff.
    stays: bool,
}

/// Whether a VM that crashed again (its in-place restarts at `restarted_at`) has
/// now crashed `limit` times within `window`: then it is restarted elsewhere.
fn crashed_too_often(restarted_at: &[Instant], now: Instant, limit: u32, window: Duration) -> bool {
    let recent = restarted_at
        .iter()
        .filter(|at| now.saturating_duration_since(**at) <= window)
        .count();
    recent + 1 >= limit as usize
}

/// Per-node Watch streams: a VM crash wakes a drift check at once.
#[derive(Debug, Default)]
struct Watches {
    by_node: BTreeMap<String, (String, tokio::task::JoinHandle<()>)>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for (_, (_, task)) in std::mem::take(&mut self.by_node) {
            task.abort();
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    source: GitSource,
    good: Option<Arc<Good>>,
    attempt: Option<Attempt>,
    crash: BTreeMap<String, CrashLoop>,
    /// VM → the node it crashed on too often: the next repair restarts it elsewhere.
    crash_moves: BTreeMap<String, String>,
    /// When the first crash-looping VM's backoff runs out: a drift check then.
    crash_retry: Option<Instant>,
    /// Spot VMs their node preempted: placed again where there is room.
    preemptions: crate::preemption::Preemptions,
    /// What the protection schedules and replications last reported (issue 18).
    protection_events: crate::protection_events::ProtectionEvents,
    reachable: BTreeMap<String, bool>,
    last_drift: Option<Vec<String>>,
    held_reported: Option<String>,
    source_error: Option<String>,
    watches: Watches,
    /// The plan id `cairn sync --approve` approved, for the next sync.
    approval: Option<String>,
    /// The lowering of every spec file of the last sync's commit: a push that
    /// changes one file parses and lowers one file (issue 24;
    /// `compiler::session`, whose output is the full compile's).
    compile_session: compiler::session::Session,
    /// Each site's placement of the last sync: a push that changes one site
    /// places that site again, not the cloud (issue 24;
    /// `compiler::session::PlaceSession`, whose output is the full placement).
    place_session: compiler::session::PlaceSession,
    /// The last sync's desired state and plan: a push that changes a few VMs of
    /// a converged cloud builds and plans those VMs (issue 24;
    /// `reconciler::session`, whose output is the full plan's).
    plan_session: reconciler::session::PlanSession,
    /// Compiles so far, and the one the sessions last placed and planned: the
    /// compile session's changed VMs are a hint only for the compile after it.
    compiles: u64,
    planned_compile: u64,
}

/// Runs until `stop` turns true.
pub(crate) async fn run(
    shared: Arc<Shared>,
    source: GitSource,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut w = Worker {
        shared,
        source,
        good: None,
        attempt: None,
        crash: BTreeMap::new(),
        crash_moves: BTreeMap::new(),
        crash_retry: None,
        preemptions: Default::default(),
        protection_events: Default::default(),
        reachable: BTreeMap::new(),
        last_drift: None,
        held_reported: None,
        source_error: None,
        watches: Watches::default(),
        approval: None,
        compile_session: compiler::session::Session::new(),
        place_session: compiler::session::PlaceSession::new(),
        plan_session: reconciler::session::PlanSession::new(),
        compiles: 0,
        planned_compile: 0,
    };
    w.restore();
    let mut next_drift = Instant::now();
    loop {
        crate::replicas::wait_leader(&w.shared, &mut stop).await;
        if *stop.borrow() {
            break;
        }
        w.follow_shared_applied();
        w.follow_shared_pause();
        crate::replicas::follow_shared_held(&w.shared);
        w.update_watches();
        let asked = w.take_requests();
        if asked.iter().any(|r| r.ask == crate::sync_api::Ask::Sync) {
            next_drift = Instant::now();
        }
        let head = w.head();
        if head.is_some() && w.good.as_ref().map(|g| &g.commit) == head.as_ref() {
            // The branch is back on the applied commit (a force push): nothing
            // newer is pending, whatever failed before.
            w.attempt = None;
        }
        let mut did_sync = false;
        if let Some(head) = head
            && w.due(&head)
        {
            if w.shared.paused.load(Ordering::SeqCst) {
                if w.held_reported.as_deref() != Some(head.as_str()) {
                    w.shared.record(vec![Event::new("sync", "held").commit(&head).reason(
                        "the controller is paused: this commit is applied after `cairn controller resume`",
                    )]);
                    w.held_reported = Some(head.clone());
                }
            } else {
                did_sync = true;
                let end = w.sync(&head).await;
                w.after_sync(&head, end);
            }
        }
        if !did_sync && Instant::now() >= next_drift {
            w.drift_check().await;
            next_drift = Instant::now() + w.drift_interval();
        } else if did_sync {
            // The sync observed the nodes; the next drift check is a full interval away.
            next_drift = Instant::now() + w.drift_interval();
        }
        if let Some(at) = w.crash_retry {
            // A crash-looping VM is restarted when its backoff runs out, not at the
            // next drift interval.
            next_drift = next_drift.min(at);
        }
        w.answer(asked, did_sync);
        if w.good.is_none() && w.attempt.is_some() {
            // Nothing applied yet and nothing to observe: ready once the first
            // sync was tried.
            w.shared.ready.store(true, Ordering::SeqCst);
        }
        let mut wake_at = next_drift.min(Instant::now() + w.shared.config.poll);
        if let Some(Attempt {
            retry: Retry::Backoff { at, .. } | Retry::Held { until: Some(at) },
            ..
        }) = &w.attempt
        {
            wake_at = wake_at.min(*at);
        }
        tokio::select! {
            _ = w.shared.wake.notified() => {}
            _ = w.shared.wake_drift.notified() => { next_drift = Instant::now(); }
            _ = tokio::time::sleep_until(wake_at.into()) => {}
            _ = stop.changed() => {}
        }
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

fn keys_stamp(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Records step events as apply reports them; written in batches of up to a
/// quarter second (the journal, not these events, is what settling relies on,
/// and one commit per step would add a third fsync to every step).
struct StepEvents<'a> {
    shared: &'a Shared,
    commit: Option<String>,
    plan_id: String,
    buffer: std::sync::Mutex<(Vec<Event>, Option<Instant>)>,
}

impl StepEvents<'_> {
    fn flush(&self) {
        let events = std::mem::take(&mut self.buffer.lock().expect("buffer lock").0);
        if let Err(e) = self.shared.events.record_all(events) {
            eprintln!("warning: {e}");
        }
    }
}

impl ApplyEvents for StepEvents<'_> {
    fn step_ended(&self, outcome: &StepOutcome) {
        let result = serde_json::to_value(outcome.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".to_owned());
        self.shared
            .metrics
            .steps
            .with_label_values(&[&result])
            .inc();
        let mut e = Event::new("step", &result)
            .plan(&self.plan_id)
            .object(outcome.what.clone());
        if let Some(c) = &self.commit {
            e = e.commit(c);
        }
        if let Some(err) = &outcome.error {
            e = e.reason(err.clone());
        }
        if outcome.replayed {
            e = e.detail(json!({"replayed": true}));
        }
        let full = {
            let mut b = self.buffer.lock().expect("buffer lock");
            b.0.push(e);
            let oldest = *b.1.get_or_insert_with(Instant::now);
            if b.0.len() >= 64 || oldest.elapsed() >= Duration::from_millis(250) {
                b.1 = None;
                true
            } else {
                false
            }
        };
        if full {
            self.flush();
        }
    }

    fn finished(&self) {
        self.flush();
    }
}

/// The apply lock of the state store, released when dropped.
struct StoreLock<'a> {
    store: &'a ControllerStore,
    id: String,
}

impl Drop for StoreLock<'_> {
    fn drop(&mut self) {
        let _ = self.store.unlock(&self.id);
    }
}

fn take_store_lock<'a>(
    shared: &Shared,
    store: &'a ControllerStore,
    command: &str,
) -> Result<StoreLock<'a>, String> {
    match store.lock(command) {
        Ok((mine, previous)) => {
            if let Some(dead) = previous {
                shared.record(vec![Event::new("settled", "ok").reason(format!(
                    "took over the apply lock of {} (pid {} is gone)",
                    dead.command, dead.pid
                ))]);
            }
            Ok(StoreLock { store, id: mine.id })
        }
        Err(e) => Err(e.to_string()),
    }
}

impl Worker {
    /// The applied commit recorded by an earlier run (with replicas: by whichever
    /// replica led, from etcd), compiled again.
    fn restore(&mut self) {
        let applied: Option<AppliedCommit> = self
            .shared_applied()
            .or_else(|| self.shared.events.get("applied").ok().flatten());
        let Some(applied) = applied else {
            return;
        };
        match self.compile_good(&applied.commit) {
            Ok(good) => self.set_good(good),
            Err(why) => self.shared.record(vec![
                Event::new("controller", "reported")
                    .commit(&applied.commit)
                    .reason(format!(
                        "the commit applied last cannot be read again ({why}); drift is not checked until the next commit is applied"
                    )),
            ]),
        }
    }

    /// With replicas: the applied commit the leader recorded in etcd.
    fn shared_applied(&self) -> Option<AppliedCommit> {
        let replicas = self.shared.replicas.as_ref()?;
        match replicas.store.controller_record("applied") {
            Ok(applied) => applied,
            Err(e) => {
                eprintln!("cairn controller: the shared applied commit: {e}");
                None
            }
        }
    }

    /// With replicas, at the top of every round as leader: takes over the applied
    /// commit another replica recorded (a new leader verifies new commits from it,
    /// with its member keys, and checks drift against it).
    fn follow_shared_applied(&mut self) {
        let Some(applied) = self.shared_applied() else {
            return;
        };
        if self
            .good
            .as_ref()
            .is_some_and(|g| g.commit == applied.commit)
        {
            return;
        }
        let _ = self.shared.events.put("applied", &applied);
        self.restore();
    }

    /// With replicas, at the top of every round as leader: the pause another
    /// replica recorded (a leader that took over keeps an operator's pause, and a
    /// resume given to the previous leader is followed here).
    fn follow_shared_pause(&mut self) {
        let Some(record) = self.shared.shared_pause() else {
            return;
        };
        if self.shared.set_paused_flag(record.paused) != record.paused {
            let (kind, what) = if record.paused {
                (
                    "paused",
                    "nothing is applied automatically until `cairn controller resume`",
                )
            } else {
                ("resumed", "the branch head is applied again")
            };
            self.shared
                .record(vec![Event::new(kind, "ok").reason(format!(
                    "taken over from the shared store (set by {}): {what}",
                    record.by
                ))]);
        }
    }

    fn compile_good(&self, commit: &str) -> Result<Good, String> {
        let sources = self.source.load(commit).map_err(|e| e.to_string())?;
        let compilation = compiler::compile(&sources);
        if compilation.has_errors() {
            return Err("its specs no longer compile".to_owned());
        }
        let spec_root = self.shared.config.data_dir.join("checkout");
        self.source
            .materialize(commit, &spec_root)
            .map_err(|e| e.to_string())?;
        Ok(Good {
            commit: commit.to_owned(),
            model: Arc::new(compilation.model),
            spec_root,
        })
    }

    fn set_good(&mut self, good: Good) {
        let good = Arc::new(good);
        self.publish_good(&good);
        self.adopt_good(good);
    }

    /// Makes `good` the commit the status and the console judge against.
    fn publish_good(&self, good: &Arc<Good>) {
        self.shared.view.lock().expect("view lock").revision = Some(good.commit.clone());
        *self.shared.good.lock().expect("good lock") = Some(Arc::clone(good));
    }

    /// Makes `good` (published) the commit this worker reconciles to.
    fn adopt_good(&mut self, good: Arc<Good>) {
        self.good = Some(good);
        self.update_watches();
    }

    fn head(&mut self) -> Option<String> {
        match self.source.head() {
            Ok(head) => {
                if self.source_error.take().is_some() {
                    self.shared.record(vec![
                        Event::new("source", "ok").reason("the repository can be read again"),
                    ]);
                }
                self.shared.view.lock().expect("view lock").head = head.clone();
                head
            }
            Err(e) => {
                let msg = e.to_string();
                if self.source_error.as_deref() != Some(msg.as_str()) {
                    self.shared.record(vec![Event::new("source", "failed").reason(format!(
                        "{msg}; nothing changes until it can be read (the cluster keeps the commit applied last)"
                    ))]);
                    self.source_error = Some(msg);
                }
                None
            }
        }
    }

    /// Whether `head` should be synced now.
    fn due(&self, head: &str) -> bool {
        if self.good.as_ref().is_some_and(|g| g.commit == head) {
            return false;
        }
        match &self.attempt {
            Some(a) if a.commit == head => match &a.retry {
                Retry::Stalled { keys_stamp: stamp } => {
                    *stamp != keys_stamp(&self.shared.config.trusted_keys_path())
                }
                Retry::Backoff { at, .. } => Instant::now() >= *at,
                Retry::Held { until } => until.is_some_and(|at| Instant::now() >= at),
            },
            _ => true,
        }
    }

    fn after_sync(&mut self, head: &str, end: SyncEnd) {
        self.attempt = match end {
            SyncEnd::Applied | SyncEnd::Held => None,
            SyncEnd::HeldForApproval { until } => Some(Attempt {
                commit: head.to_owned(),
                retry: Retry::Held { until },
            }),
            SyncEnd::Stalled => Some(Attempt {
                commit: head.to_owned(),
                retry: Retry::Stalled {
                    keys_stamp: keys_stamp(&self.shared.config.trusted_keys_path()),
                },
            }),
            SyncEnd::Transient => {
                let failures = match &self.attempt {
                    Some(Attempt {
                        commit,
                        retry: Retry::Backoff { failures, .. },
                    }) if commit == head => failures + 1,
                    _ => 1,
                };
                let delay = backoff(failures);
                self.shared.record(vec![
                    Event::new("sync", "scheduled")
                        .commit(head)
                        .reason(format!(
                            "retrying in {} s (attempt {} failed; backoff doubles up to {} s, and stops when a new commit arrives)",
                            delay.as_secs(),
                            failures,
                            BACKOFF_CAP.as_secs()
                        )),
                ]);
                Some(Attempt {
                    commit: head.to_owned(),
                    retry: Retry::Backoff {
                        failures,
                        at: Instant::now() + delay,
                    },
                })
            }
        };
    }

    fn store(&self) -> Result<ControllerStore, String> {
        self.shared.state_store()
    }

    /// Ends a sync as failed for a reason that may pass (retried with backoff).
    fn transient_failure(
        &self,
        commit: &str,
        reason: String,
        detail: serde_json::Value,
        started: Instant,
    ) -> SyncEnd {
        self.end_sync(
            commit,
            "failed",
            Some(reason),
            None,
            detail,
            started,
            vec![],
        );
        SyncEnd::Transient
    }

    /// Ends a sync: the sync event, the last sync, metrics.
    #[allow(clippy::too_many_arguments)]
    fn end_sync(
        &self,
        commit: &str,
        result: &str,
        reason: Option<String>,
        plan_id: Option<&str>,
        detail: serde_json::Value,
        started: Instant,
        extra: Vec<Event>,
    ) {
        // Every sync's end is in the audit log, whatever its result.
        let audited = self.shared.state_store().and_then(|store| {
            store
                .audit(
                    "controller-sync",
                    json!({"commit": commit, "plan_id": plan_id, "result": result, "reason": reason, "signer": detail["signer"], "author": detail["author"]}),
                )
                .map_err(|e| e.to_string())
        });
        if let Err(e) = audited {
            eprintln!("warning: the sync of {commit} is not in the audit log: {e}");
        }
        let mut event = Event::new("sync", result).commit(commit).detail(detail);
        if let Some(p) = plan_id {
            event = event.plan(p);
        }
        if let Some(r) = &reason {
            event = event.reason(r.clone());
        }
        let last = LastSync {
            commit: commit.to_owned(),
            result: result.to_owned(),
            at: event.at.clone(),
            plan_id: plan_id.map(str::to_owned),
            reason,
        };
        if result != "held" {
            crate::replicas::set_held_plan(&self.shared, None);
        }
        let _ = self.shared.events.put("last_sync", &last);
        crate::replicas::record_last_sync(&self.shared, &last);
        self.shared.view.lock().expect("view lock").last_sync = Some(last);
        let m = &self.shared.metrics;
        m.syncs.with_label_values(&[result]).inc();
        m.sync_seconds
            .with_label_values(&[result])
            .observe(started.elapsed().as_secs_f64());
        let mut events = extra;
        events.push(event);
        self.shared.record(events);
    }

    /// Syncs the branch head.
    async fn sync(&mut self, commit: &str) -> SyncEnd {
        let started = Instant::now();
        let previous = self.good.as_ref().map(|g| g.commit.clone());
        self.shared.record(vec![
            Event::new("sync-started", "started")
                .commit(commit)
                .detail(json!({"previous": previous})),
        ]);
        let mut phases = serde_json::Map::new();
        let mut detail = json!({});
        let metrics = self.shared.metrics.clone();
        let phase_done = |phases: &mut serde_json::Map<String, serde_json::Value>,
                          name: &str,
                          since: Instant| {
            let secs = since.elapsed().as_secs_f64();
            metrics
                .phase_seconds
                .with_label_values(&[name])
                .observe(secs);
            phases.insert(
                format!("{name}_ms"),
                json!(since.elapsed().as_millis() as u64),
            );
        };

        // Verify every commit since the one applied last.
        let t = Instant::now();
        let keys = self.shared.config.trusted_keys_path();
        let info = self.source.info(commit).ok();
        if let Some(i) = &info {
            detail["author"] = json!(i.author);
            detail["summary"] = json!(i.summary);
        }
        let path = match self.source.path(previous.as_deref(), commit) {
            Ok(p) => p,
            Err(e) => {
                return self.transient_failure(commit, e.to_string(), detail, started);
            }
        };
        let signers = match crate::trust::read_signers(&keys) {
            Ok(s) => s,
            Err(why) => {
                self.shared.metrics.commits_refused.inc();
                self.end_sync(commit, "refused", Some(why), None, detail, started, vec![]);
                return SyncEnd::Stalled;
            }
        };
        let repo = match self.source.open() {
            Ok(r) => r,
            Err(e) => {
                return self.transient_failure(commit, e.to_string(), detail, started);
            }
        };
        let mut signer = None;
        for c in &path {
            let authority = self.good.as_ref().map(|g| &*g.model);
            let subdir = &self.source.subdir;
            match tokio::task::block_in_place(|| {
                crate::trust::judge(&repo, subdir, c, authority, &signers, &keys)
            }) {
                Ok(s) => {
                    if c == commit {
                        signer = Some(s);
                    }
                }
                Err(refusal) => {
                    self.shared.metrics.commits_refused.inc();
                    detail["refused_commit"] = json!(refusal.commit);
                    detail["signed_by"] = json!(refusal.signed_by);
                    detail["refused_objects"] = json!(refusal.objects);
                    detail["checked"] = json!(path.len());
                    let reason = if refusal.commit == commit {
                        refusal.reason
                    } else {
                        format!(
                            "{} (it lies on the first-parent path from the commit applied last to {}; every commit on it must pass)",
                            refusal.reason,
                            short(commit)
                        )
                    };
                    self.end_sync(
                        commit,
                        "refused",
                        Some(reason),
                        None,
                        detail,
                        started,
                        vec![],
                    );
                    return SyncEnd::Stalled;
                }
            }
        }
        drop(repo);
        detail["signer"] = json!(signer.as_ref().map(crate::trust::Signer::describe));
        detail["verified_commits"] = json!(path.len());
        phase_done(&mut phases, "verify", t);

        // Compile.
        let t = Instant::now();
        let sources = match self.source.load(commit) {
            Ok(s) => s,
            Err(e) => {
                detail["phases"] = json!(phases);
                self.end_sync(
                    commit,
                    "failed",
                    Some(e.to_string()),
                    None,
                    detail,
                    started,
                    vec![],
                );
                return SyncEnd::Stalled;
            }
        };
        let loaded_ms = t.elapsed().as_millis() as u64;
        // The session keeps its compilation; the sync copies the model alone (the
        // diagnostics' errors when there are any), not the span index beside it.
        let (model, errors, reuse) = tokio::task::block_in_place(|| {
            let (compiled, reuse) = self.compile_session.compile_ref(&sources);
            let errors: Vec<compiler::diag::Diagnostic> = compiled
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .cloned()
                .collect();
            let model = errors.is_empty().then(|| compiled.model.clone());
            (model, errors, reuse)
        });
        let compiled_ms = t.elapsed().as_millis() as u64 - loaded_ms;
        self.compiles += 1;
        let this_compile = self.compiles;
        // What the compile session reused (the lowering of unchanged files).
        detail["compile_session"] = json!({"files_reused": reuse.reused, "files_lowered": reuse.lowered, "files_removed": reuse.removed, "vms_rechecked": reuse.vms_rechecked, "load_ms": loaded_ms, "compile_ms": compiled_ms});
        let Some(model) = model else {
            let first = &errors[0];
            let place = first
                .primary_span()
                .map(|s| compiler::diag::location(&sources, s))
                .unwrap_or_else(|| "(no file)".to_owned());
            let mut reason = format!(
                "the specs of commit {} do not compile, so nothing was applied: {place}: {}",
                short(commit),
                first.message
            );
            if let Some(help) = &first.help {
                reason.push_str(&format!(" (help: {help})"));
            }
            if errors.len() > 1 {
                reason.push_str(&format!(
                    "; {} more error{} (`cairn validate --rev {}` lists them)",
                    errors.len() - 1,
                    if errors.len() == 2 { "" } else { "s" },
                    short(commit)
                ));
            }
            detail["errors"] = json!(errors.len());
            detail["first_error"] =
                json!({"location": place, "message": first.message, "code": first.code});
            phase_done(&mut phases, "compile", t);
            detail["phases"] = json!(phases);
            self.end_sync(
                commit,
                "failed",
                Some(reason),
                None,
                detail,
                started,
                vec![],
            );
            return SyncEnd::Stalled;
        };
        let spec_root = self.shared.config.data_dir.join("checkout");
        if let Err(e) = self.source.materialize(commit, &spec_root) {
            return self.transient_failure(commit, e.to_string(), detail, started);
        }
        phase_done(&mut phases, "compile", t);

        // Plan and apply, under the apply lock.
        let shared = self.shared.clone();
        let _busy = shared.busy.lock().await;
        if shared.paused.load(Ordering::SeqCst) {
            self.shared
                .record(vec![Event::new("sync", "held").commit(commit).reason(
                "the controller was paused: this commit is applied after `cairn controller resume`",
            )]);
            self.held_reported = Some(commit.to_owned());
            return SyncEnd::Held;
        }
        let t = Instant::now();
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => {
                return self.transient_failure(commit, e, detail, started);
            }
        };
        let lock = match take_store_lock(
            &self.shared,
            &store,
            &format!("cairn controller (sync of {})", short(commit)),
        ) {
            Ok(l) => l,
            Err(e) => {
                return self.transient_failure(commit, e, detail, started);
            }
        };
        let nodes = lease_bound::LeaseBound::new(self.shared.clone());
        let interrupted = match pipeline::settle_interrupted(&store, &nodes).await {
            Ok(i) => i,
            Err(e) => {
                return self.transient_failure(commit, e.to_string(), detail, started);
            }
        };
        let mut extra = vec![];
        if let Some(i) = &interrupted {
            extra.push(
                Event::new("settled", "ok")
                    .plan(&i.plan.plan_id)
                    .reason(i.describe().trim().to_owned()),
            );
        }
        let limits = self.limits_for(commit, &model);
        let options = reconciler::plan::PlanOptions {
            prune: limits.reconcile.prune,
            failed_nodes: self.shared.leases.failed_nodes(&model),
            disk_writers: crate::volume_epochs::writers(&store),
            maintenance: self.shared.maintenance.nodes(),
            ..Default::default()
        };
        let prepare_ms = t.elapsed().as_millis() as u64;
        // The compile session's changed VMs are what changed since the model the
        // sessions last placed and planned only when that was the compile before.
        let changed_vms = (self.planned_compile + 1 == this_compile)
            .then(|| self.compile_session.changed_vms().cloned())
            .flatten();
        self.planned_compile = 0;
        let sessions = pipeline::Sessions {
            places: &mut self.place_session,
            plans: &mut self.plan_session,
            changed_vms: changed_vms.as_ref(),
            digests: None,
        };
        let planned = pipeline::plan_revision_session(
            &model,
            &spec_root,
            commit,
            &store,
            &nodes,
            &options,
            Some(sessions),
        )
        .await;
        if planned.is_ok() && options.failed_nodes.is_empty() {
            // The sessions placed and planned this compile's model.
            self.planned_compile = this_compile;
        }
        let mut planned = match planned {
            Ok(p) => p,
            Err(e) => {
                self.end_sync(
                    commit,
                    "failed",
                    Some(e.to_string()),
                    None,
                    detail,
                    started,
                    extra,
                );
                return SyncEnd::Transient;
            }
        };
        let handover = Instant::now();
        // Its desired state is the status's once the commit is applied, unless a
        // node was failed (the plan leaves the failed node's segments out, the
        // status wants them: reconciler pipeline test the_status_of_the_plans_...).
        let desired = options
            .failed_nodes
            .is_empty()
            .then_some((commit, &planned.desired));
        let handed = self.note_observation(
            &planned.observed,
            Some(&planned.plan.observed_digest),
            desired,
        );
        let handed_generation = self.shared.observed.generation();
        planned.timings.prepare_ms = prepare_ms;
        planned.timings.handover_ms = handover.elapsed().as_millis() as u64;
        let plan = &planned.plan;
        phase_done(&mut phases, "plan", t);
        // The plan phase's parts, beside the phases (they overlap `plan_ms`).
        detail["plan_parts"] = json!(planned.timings);
        if let Some(reuse) = &planned.reuse {
            // What the plan session redid (the whole, and why, or a part).
            detail["plan_session"] = json!(reuse);
        }
        detail["steps"] = json!(plan.steps.len());
        detail["changes"] = json!(plan.changes.len());
        if let Some(why) = pipeline::unacceptable(plan) {
            let _ = store.audit(
                "apply-refused",
                json!({"plan_id": plan.plan_id, "commit": commit, "reason": why, "by": "controller"}),
            );
            detail["phases"] = json!(phases);
            self.end_sync(
                commit,
                "refused",
                Some(format!(
                    "the plan for commit {} cannot be applied, so nothing was sent: {why}",
                    short(commit)
                )),
                Some(&plan.plan_id),
                detail,
                started,
                extra,
            );
            return SyncEnd::Stalled;
        }
        if !plan.unpruned.is_empty() {
            detail["unpruned"] = json!(
                plan.unpruned
                    .iter()
                    .map(|u| format!("{} {} on {}", u.object, u.name, u.node))
                    .collect::<Vec<_>>()
            );
        }
        let judged = gate_step::Judged {
            commit,
            model: &model,
            planned: &planned,
            limits: &limits,
            signer: signer.as_ref(),
            store: &store,
            started,
        };
        if let Some(end) = self.judge(&judged, &mut detail, &mut phases, &mut extra) {
            return end;
        }

        let t = Instant::now();
        let outcome = self
            .carry_out(&store, &planned, interrupted.as_ref(), Some(commit))
            .await;
        drop(lock);
        phase_done(&mut phases, "apply", t);
        detail["phases"] = json!(phases);
        match outcome {
            Ok(done) => {
                detail["succeeded"] = json!(done.succeeded);
                detail["failed"] = json!(done.failed);
                detail["skipped"] = json!(done.skipped);
                if done.failed > 0 || done.skipped > 0 {
                    self.end_sync(
                        commit,
                        "failed",
                        Some(format!(
                            "{} of {} steps failed and {} were skipped{}; the cluster keeps what was done, and the commit is tried again",
                            done.failed,
                            plan.steps.len(),
                            done.skipped,
                            done.first_failure
                                .as_deref()
                                .map(|f| format!(" (first: {f})"))
                                .unwrap_or_default()
                        )),
                        Some(&plan.plan_id),
                        detail,
                        started,
                        extra,
                    );
                    return SyncEnd::Transient;
                }
                let result = if done.problems.is_empty() {
                    "succeeded"
                } else {
                    "partial"
                };
                let reason = (!done.problems.is_empty()).then(|| {
                    format!(
                        "applied, but the cluster does not match the commit yet: {}",
                        done.problems.join("; ")
                    )
                });
                let applied = AppliedCommit {
                    commit: commit.to_owned(),
                    plan_id: plan.plan_id.clone(),
                    at_unix_ms: reconciler::state::now_ms(),
                };
                let _ = self.shared.events.put("applied", &applied);
                // With replicas, every replica (a new leader above all) knows it.
                if let Some(replicas) = &self.shared.replicas
                    && let Err(e) = replicas.store.set_controller_record("applied", &applied)
                {
                    eprintln!("cairn controller: the applied commit not shared: {e}");
                }
                // New volumes get their epochs (the authority adopts them) at once,
                // not at the next drift interval: a node may fail before that.
                if plan.changes.iter().any(|c| c.object == "volume") {
                    self.shared.wake_drift.notify_one();
                }
                // The status judges against the applied commit before the sync's end
                // is recorded: a status that shows the sync succeeded never judges
                // its VMs against the commit before (seen in CI: the new replica
                // `not-in-spec` in the status that reported its sync).
                let good = Arc::new(Good {
                    commit: commit.to_owned(),
                    model: Arc::new(model),
                    spec_root,
                });
                self.publish_good(&good);
                self.end_sync(
                    commit,
                    result,
                    reason,
                    Some(&plan.plan_id),
                    detail,
                    started,
                    extra,
                );
                self.adopt_good(good);
                // A plan that sent nothing changed nothing: its observation still
                // shows the cluster, unless something else happened meanwhile (one
                // event recorded since the handover: this sync's end). The console's
                // status is then made from it and the sync's desired state, not from
                // every node observed again behind the sync.
                if plan.is_empty() && self.shared.observed.generation() == handed_generation + 1 {
                    self.shared.observed.put(handed);
                }
                self.last_drift = None;
                SyncEnd::Applied
            }
            Err(failure) => {
                // Missing files of the commit itself fail the same way every time,
                // so it waits for a new commit; anything else is retried.
                let (e, end) = match failure {
                    Failure::MissingImages(e) => (e, SyncEnd::Stalled),
                    Failure::Other(e) => (e, SyncEnd::Transient),
                };
                self.end_sync(
                    commit,
                    "failed",
                    Some(e),
                    Some(&plan.plan_id),
                    detail,
                    started,
                    extra,
                );
                end
            }
        }
    }

    /// Executes a plan (or records that there is nothing to do).
    async fn carry_out(
        &self,
        store: &ControllerStore,
        planned: &Planned,
        interrupted: Option<&pipeline::Interrupted>,
        commit: Option<&str>,
    ) -> Result<Done, Failure> {
        let plan = &planned.plan;
        if plan.is_empty() {
            pipeline::nothing_to_do(store, plan, interrupted)
                .map_err(|e| Failure::Other(e.to_string()))?;
            return Ok(Done {
                problems: plan.not_converged(),
                ..Done::default()
            });
        }
        // A VM placed on a node without a copy of its volume reaches it as a client.
        let unreachable: std::collections::BTreeSet<String> =
            plan.unreachable.keys().cloned().collect();
        crate::volume_epochs::set_clients(
            &self.shared,
            store,
            &planned.desired,
            &planned.observed,
            &unreachable,
        )
        .await;
        let events = StepEvents {
            shared: &self.shared,
            commit: commit.map(str::to_owned),
            plan_id: plan.plan_id.clone(),
            buffer: std::sync::Mutex::new((vec![], None)),
        };
        // The VMs it stops, deletes and creates (defined, stopped) send `Stopped`
        // on their nodes' Watch streams: those are this plan's, not drift.
        self.shared
            .planned_vms
            .lock()
            .expect("planned vms lock")
            .begin(plan);
        // Each step waits on its node only while the node holds its lease.
        let nodes = lease_bound::LeaseBound::new(self.shared.clone());
        let executed = pipeline::execute(
            store,
            &nodes,
            plan,
            &pipeline::images_of(&planned.desired),
            &ApplyOptions::new(self.shared.config.parallelism),
            interrupted,
            &events,
        )
        .await;
        self.shared
            .planned_vms
            .lock()
            .expect("planned vms lock")
            .end(Instant::now());
        events.flush();
        let executed = executed.map_err(|e| match e {
            pipeline::PipelineError::MissingImages(_) => Failure::MissingImages(e.to_string()),
            e => Failure::Other(e.to_string()),
        })?;
        let count = |s: reconciler::state::StepStatus| {
            executed
                .report
                .steps
                .iter()
                .filter(|o| o.status == s)
                .count()
        };
        Ok(Done {
            succeeded: count(reconciler::state::StepStatus::Succeeded),
            failed: count(reconciler::state::StepStatus::Failed),
            skipped: count(reconciler::state::StepStatus::Skipped),
            first_failure: executed
                .report
                .steps
                .iter()
                .find(|o| o.status == reconciler::state::StepStatus::Failed)
                .map(|o| format!("{}: {}", o.what, o.error.as_deref().unwrap_or(""))),
            problems: executed.problems.clone(),
        })
    }

    /// Node state changes become events; node and VM metrics follow the observation.
    /// Hands a new observation to the console and the metrics, with its digest
    /// (a plan made from it has it: `plan.observed_digest`; else `None`, computed
    /// here, a second at 100,000 VMs) and the desired state of the sync planned
    /// against it (`commit`'s); gives what it handed over.
    fn note_observation(
        &mut self,
        observed: &Arc<Observed>,
        digest: Option<&str>,
        desired: Option<(&str, &Arc<reconciler::desired::Desired>)>,
    ) -> Arc<crate::Observation> {
        let digest = digest.map_or_else(|| observed.digest(), str::to_owned);
        self.shared.view.lock().expect("view lock").observed_digest = Some(digest);
        // The console's status and live states are made from it while it is young.
        let handed = Arc::new(crate::Observation {
            at_unix_ms: reconciler::state::now_ms(),
            observed: Arc::clone(observed),
            desired: desired.map(|(commit, d)| (commit.to_owned(), Arc::clone(d))),
        });
        self.shared.observed.put(Arc::clone(&handed));
        let mut events = vec![];
        for (node, obs) in &observed.nodes {
            let (up, error) = match obs {
                NodeObservation::Reachable { .. } => (true, None),
                NodeObservation::Unreachable { error } => (false, Some(error.clone())),
            };
            let before = self.reachable.insert(node.clone(), up);
            if before != Some(up) && (before.is_some() || !up) {
                let mut e = Event::new("node", if up { "ready" } else { "unreachable" })
                    .object(format!("node {node}"));
                if let Some(err) = error {
                    e = e.reason(format!(
                        "{err}; its objects are left alone until it answers again"
                    ));
                } else {
                    e = e.reason("answers again");
                }
                events.push(e);
            }
        }
        self.shared.leases.note_reachable(self.reachable.clone());
        crate::lease::node_metrics(&self.shared);
        // Counted from the observation itself: a JSON copy of it was seconds and
        // gigabytes at 100,000 VMs.
        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
        for obs in observed.nodes.values() {
            let NodeObservation::Reachable { vms, .. } = obs else {
                continue;
            };
            for vm in vms.values() {
                let looping = vm.state == proto::v1::VmState::Crashed
                    && self.crash.get(&vm.name).is_some_and(|c| c.restarts > 0);
                let label = if looping {
                    "crash-looping"
                } else {
                    vm.state.status_name()
                };
                *counts.entry(label).or_default() += 1;
            }
        }
        let vm_states: BTreeMap<String, i64> =
            counts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        crate::metrics::Metrics::set_all(&self.shared.metrics.vms, &vm_states);
        self.shared.ready.store(true, Ordering::SeqCst);
        if !events.is_empty() {
            self.shared.record(events);
        }
        handed
    }

    /// Hides from the planner the crashed VMs whose restart backoff has not run
    /// out (they are shown as running, so the plan leaves them alone), and
    /// reports them as crash-looping.
    ///
    /// A VM that has crashed `crash-restart limit=` times within `window=` (the
    /// applied `reconcile` block) is not masked: it goes into `crash_moves`, and the
    /// repair places it on another node.
    fn mask_crash_loops(
        &mut self,
        observed: &Arc<Observed>,
        model: &compiler::Model,
        limits: &Reconcile,
    ) -> Arc<Observed> {
        let now = Instant::now();
        let window = Duration::from_millis(limits.crash_restart_window_ms);
        let healing = self.repair_blocked().is_none();
        self.crash_retry = None;
        let mut events = vec![];
        let mut running = BTreeSet::new();
        // (node, VM) seen running while its backoff lasts.
        let mut masks: Vec<(&str, &str)> = vec![];
        for (node_name, node) in &observed.nodes {
            let NodeObservation::Reachable { vms, .. } = node else {
                continue;
            };
            for vm in vms.values() {
                let name = vm.name.clone();
                match vm.state {
                    proto::v1::VmState::Running => {
                        running.insert(name);
                    }
                    proto::v1::VmState::Crashed => {
                        let restarted_at = self
                            .crash
                            .get(&name)
                            .map_or(&[][..], |c| &c.restarted_at[..]);
                        // A VM with disks stays (its volume needs a new writer
                        // first, as for HA): in place, with the backoff. Nothing
                        // moves while repairs are off (self-heal, paused).
                        let movable = model.vm(&name).is_some_and(|m| m.disks.is_empty())
                            && !self.crash.get(&name).is_some_and(|c| c.stays);
                        if movable
                            && healing
                            && crashed_too_often(
                                restarted_at,
                                now,
                                limits.crash_restart_limit,
                                window,
                            )
                        {
                            if self
                                .crash_moves
                                .insert(name.clone(), node_name.clone())
                                .is_none()
                            {
                                events.push(
                                    Event::new("crash-loop", "moving")
                                        .object(format!("vm {name}"))
                                        .reason(format!(
                                            "vm {name} crashed {} times on {node_name} within {} (crash-restart limit={} window=\"{}\"): restarted on another node",
                                            restarted_at.len() + 1,
                                            compiler::units::format_duration(limits.crash_restart_window_ms),
                                            limits.crash_restart_limit,
                                            compiler::units::format_duration(limits.crash_restart_window_ms),
                                        )),
                                );
                            }
                            continue;
                        }
                        let Some(c) = self.crash.get_mut(&name) else {
                            continue;
                        };
                        let until = c.last_restart + backoff(c.restarts);
                        if now < until {
                            self.crash_retry =
                                Some(self.crash_retry.map_or(until, |at| at.min(until)));
                            masks.push((node_name, &vm.name));
                            if c.reported_for != c.restarts {
                                c.reported_for = c.restarts;
                                events.push(
                                    Event::new("crash-loop", "reported")
                                        .object(format!("vm {name}"))
                                        .reason(format!(
                                            "vm {name} crashed again after {} restart{} by the controller: crash-looping; next restart in {} s (backoff doubles up to {} s)",
                                            c.restarts,
                                            if c.restarts == 1 { "" } else { "s" },
                                            until.saturating_duration_since(now).as_secs().max(1),
                                            BACKOFF_CAP.as_secs()
                                        )),
                                );
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        self.crash
            .retain(|name, c| !(running.contains(name) && now - c.last_restart > CRASH_LOOP_RESET));
        if !events.is_empty() {
            self.shared.record(events);
        }
        if masks.is_empty() {
            // Nothing masked: the plan shares the observation (no copy of 100,000 VMs).
            return Arc::clone(observed);
        }
        let mut masked = Observed::clone(observed);
        for (node, vm) in masks {
            if let Some(NodeObservation::Reachable { vms, .. }) = masked.nodes.get_mut(node)
                && let Some(vm) = vms.get_mut(vm)
            {
                vm.state = proto::v1::VmState::Running;
            }
        }
        Arc::new(masked)
    }

    /// Why drift may not be repaired now, before looking at the plan.
    fn repair_blocked(&self) -> Option<String> {
        let limits = self.applied_limits();
        if !self.shared.config.self_heal {
            Some("self-heal is off: reported, not repaired".to_owned())
        } else if let Some(l) = limits.as_ref().filter(|l| !l.reconcile.self_heal) {
            Some(format!(
                "self-heal is off ({}): reported, not repaired",
                l.source
            ))
        } else if self.shared.paused.load(Ordering::SeqCst) {
            Some("the controller is paused: reported, not repaired".to_owned())
        } else if matches!(
            &self.attempt,
            Some(Attempt {
                retry: Retry::Backoff { .. },
                ..
            })
        ) {
            Some("a newer commit's sync failed half-way and is retried: self-heal waits for it, so it never undoes half of a commit".to_owned())
        } else {
            None
        }
    }

    /// Observes every node of the applied commit, plans it again, and repairs
    /// the drift (self-heal) or reports it. An execution a dead controller (or
    /// apply) left unfinished is settled first, and superseded by the repair or,
    /// when nothing is left to do, marked so.
    async fn drift_check(&mut self) {
        let Some(good) = self.good.clone() else {
            return;
        };
        let fail = |shared: &Shared, e: String| {
            shared.record(vec![Event::new("drift", "failed").reason(e)]);
        };
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => return fail(&self.shared, e),
        };
        let shared = self.shared.clone();
        let mut busy = None;
        let mut lock = None;
        let mut interrupted = None;
        let pending = store.unfinished_executions().is_ok_and(|u| !u.is_empty());
        if pending && self.repair_blocked().is_none() {
            busy = Some(shared.busy.lock().await);
            match take_store_lock(
                &self.shared,
                &store,
                &format!("cairn controller (settling, {})", short(&good.commit)),
            ) {
                Ok(l) => lock = Some(l),
                Err(e) => return fail(&self.shared, e),
            }
            let nodes = lease_bound::LeaseBound::new(self.shared.clone());
            match pipeline::settle_interrupted(&store, &nodes).await {
                Ok(i) => {
                    if let Some(i) = &i {
                        self.shared.record(vec![
                            Event::new("settled", "ok")
                                .plan(&i.plan.plan_id)
                                .reason(i.describe().trim().to_owned()),
                        ]);
                    }
                    interrupted = i;
                }
                Err(e) => return fail(&self.shared, e.to_string()),
            }
        }
        let spec = pipeline::spec_nodes(&good.model);
        let failed = self.shared.leases.failed_nodes(&good.model);
        let nodes = lease_bound::LeaseBound::new(self.shared.clone());
        let observed = Arc::new(observe_except(&spec, &nodes, &failed).await);
        let _ = self.note_observation(&observed, None, None);
        let protection_events = self.protection_events.observe(&observed);
        if !protection_events.is_empty() {
            self.shared.record(protection_events);
        }
        let applied_reconcile = crate::gate::Limits::applied(&good.commit, &good.model).reconcile;
        let masked = self.mask_crash_loops(&observed, &good.model, &applied_reconcile);
        let mut preempt_events = vec![];
        let preempted = self.preemptions.observe(&observed, &mut preempt_events);
        let (stored, protected) = match (store.placement(), store.protected_volumes()) {
            (Ok(p), Ok(v)) => (p, v),
            (Err(e), _) | (_, Err(e)) => return fail(&self.shared, e.to_string()),
        };
        let previous = pipeline::previous_placement(stored, &observed);
        let limits = crate::gate::Limits::applied(&good.commit, &good.model);
        let failed_nodes = self.shared.leases.failed_nodes(&good.model);
        // The volumes' epochs first: a failed node's volumes get their new writer
        // before any VM of theirs restarts (safety, so not gated by self-heal).
        let closed = crate::maintenance::closed_nodes(&self.shared, &good.model);
        let tended = crate::volume_epochs::tend(
            &self.shared,
            &store,
            &spec,
            &observed,
            &failed_nodes,
            &closed,
        )
        .await;
        // Copies on nodes failed for good or gone from the spec are rebuilt (a repair).
        if self.repair_blocked().is_none() {
            let (model, placement) = (&good.model, &previous);
            let (observed, failed) = (&observed, &failed_nodes);
            crate::rebuild::tend(
                &self.shared,
                &store,
                model,
                &spec,
                placement,
                observed,
                failed,
            )
            .await;
        }
        let planned = tokio::task::block_in_place(|| {
            pipeline::plan_against_with(
                &good.model,
                &good.spec_root,
                &good.commit,
                masked,
                &previous,
                protected,
                &reconciler::plan::PlanOptions {
                    prune: limits.reconcile.prune,
                    failed_nodes: failed_nodes.clone(),
                    crash_moves: self.crash_moves.clone(),
                    disk_writers: tended.disk_writers.clone(),
                    maintenance: self.shared.maintenance.nodes(),
                    preempted: preempted.clone(),
                    ..Default::default()
                },
            )
        });
        self.preemptions
            .planned(&preempted, &planned.desired, &mut preempt_events);
        if !preempt_events.is_empty() {
            self.shared.record(preempt_events);
        }
        let plan = &planned.plan;
        if plan.is_empty() {
            if interrupted.is_some()
                && let Err(e) = pipeline::nothing_to_do(&store, plan, interrupted.as_ref())
            {
                fail(&self.shared, e.to_string());
            }
            self.last_drift = None;
            return;
        }
        let objects = drifted(plan);
        let ha_restarts = crate::gate::ha_restarts(&planned.desired.placement, &failed_nodes);
        let restarted_vms: std::collections::BTreeSet<String> =
            ha_restarts.iter().map(|(vm, _)| vm.clone()).collect();
        let new = self.last_drift.as_ref() != Some(&objects);
        if new {
            self.shared.metrics.drift_found.inc_by(objects.len() as u64);
        }
        let why_not = self
            .repair_blocked()
            .or_else(|| {
                pipeline::unacceptable(plan).map(|w| format!("the repair cannot be applied: {w}"))
            })
            .or_else(|| crate::gate::repair_over_budget(&limits, plan, &restarted_vms));
        if let Some(why) = why_not {
            if new {
                self.shared.record(vec![
                    Event::new("drift", "found")
                        .commit(&good.commit)
                        .plan(&plan.plan_id)
                        .object(objects.join(", "))
                        .reason(why)
                        .detail(drift_detail(plan)),
                ]);
            }
            self.last_drift = Some(objects);
            return;
        }
        self.shared.record(vec![
            Event::new("drift", "found")
                .commit(&good.commit)
                .plan(&plan.plan_id)
                .object(objects.join(", "))
                .reason("repairing (self-heal)")
                .detail(drift_detail(plan)),
        ]);
        if busy.is_none() {
            busy = Some(shared.busy.lock().await);
            if shared.paused.load(Ordering::SeqCst) {
                return;
            }
        }
        if lock.is_none() {
            match take_store_lock(
                &self.shared,
                &store,
                &format!("cairn controller (repair of {})", short(&good.commit)),
            ) {
                Ok(l) => lock = Some(l),
                Err(e) => return fail(&self.shared, e),
            }
        }
        // Crash restarts in place, for the crash-loop backoff; an HA restart on
        // another node is not a crash of the VM (its node failed).
        let restarted: Vec<String> = plan
            .changes
            .iter()
            .filter(|c| c.object == "vm" && matches!(c.kind, ChangeKind::Start))
            .filter(|c| !restarted_vms.contains(&c.name))
            .map(|c| c.name.clone())
            .collect();
        let crash_moved: Vec<(String, String, String)> = planned
            .desired
            .placement
            .moves
            .iter()
            .filter(|m| self.crash_moves.get(&m.vm) == Some(&m.from))
            .map(|m| (m.vm.clone(), m.from.clone(), m.to.clone()))
            .collect();
        let outcome = self
            .carry_out(&store, &planned, interrupted.as_ref(), None)
            .await;
        let succeeded = matches!(&outcome, Ok(done) if done.failed == 0 && done.skipped == 0);
        let ha_moves: Vec<(String, String, String)> = planned
            .desired
            .placement
            .moves
            .iter()
            .filter(|m| failed_nodes.contains(&m.from))
            .map(|m| (m.vm.clone(), m.from.clone(), m.to.clone()))
            .collect();
        let measured = self
            .shared
            .leases
            .note_restarts(&good.model, &ha_moves, succeeded);
        let unmoved: Vec<String> = self
            .crash_moves
            .keys()
            .filter(|vm| !crash_moved.iter().any(|(moved, _, _)| moved == *vm))
            .cloned()
            .collect();
        for vm in unmoved {
            // No other node could take it (or it left the plan): in place, with the
            // backoff, until it runs long enough to be forgiven.
            if let Some(from) = self.crash_moves.remove(&vm) {
                if let Some(c) = self.crash.get_mut(&vm) {
                    c.stays = true;
                }
                self.shared.record(vec![
                    Event::new("crash-loop", "stays")
                        .object(format!("vm {vm}"))
                        .reason(format!(
                            "vm {vm} crashed too often on {from}, but no other node of its site can take it: restarted there, with the backoff"
                        )),
                ]);
            }
        }
        for (vm, from, to) in &crash_moved {
            // Moved: its crash count starts again on the new node.
            self.crash_moves.remove(vm);
            self.crash.remove(vm);
            let _ = store.audit(
                "crash-move",
                json!({
                    "commit": good.commit,
                    "plan_id": plan.plan_id,
                    "vm": vm,
                    "from": from,
                    "to": to,
                    "crash_restart_limit": applied_reconcile.crash_restart_limit,
                    "crash_restart_window_ms": applied_reconcile.crash_restart_window_ms,
                    "result": if succeeded { "succeeded" } else { "failed" },
                }),
            );
            self.shared.record(vec![
                Event::new("crash-loop", if succeeded { "moved" } else { "failed" })
                    .commit(&good.commit)
                    .plan(&plan.plan_id)
                    .object(format!("vm {vm}"))
                    .reason(format!(
                        "vm {vm} restarted on {to} after crashing too often on {from}"
                    )),
            ]);
        }
        if !measured.is_empty() {
            self.shared.record(
                measured
                    .iter()
                    .map(|r| {
                        Event::new("ha-restart", if r.succeeded { "ok" } else { "failed" })
                            .commit(&good.commit)
                            .plan(&plan.plan_id)
                            .object(format!("vm {}", r.vm))
                            .reason(format!(
                                "vm {} from {} to {}: running {} ms after its node's last lease grant (declared worst case {} ms): detected after {} ms, restarted {} ms after that",
                                r.vm, r.from, r.to, r.measured_ms, r.declared_ms, r.detected_ms, r.restart_ms
                            ))
                            .detail(json!(r))
                    })
                    .collect(),
            );
        }
        if !ha_restarts.is_empty() {
            // Every HA restart is audited (it is not held by the blast radius).
            let _ = store.audit(
                "ha-restart",
                json!({
                    "commit": good.commit,
                    "plan_id": plan.plan_id,
                    "failed_nodes": failed_nodes,
                    "restarts": ha_restarts.iter().map(|(_, what)| what).collect::<Vec<_>>(),
                    "measured": measured,
                    "result": match &outcome {
                        Ok(done) if done.failed == 0 && done.skipped == 0 => "succeeded",
                        _ => "failed",
                    },
                }),
            );
        }
        drop(lock);
        drop(busy);
        let now = Instant::now();
        for vm in restarted {
            let c = self.crash.entry(vm).or_insert(CrashLoop {
                restarts: 0,
                last_restart: now,
                reported_for: 0,
                restarted_at: vec![],
                stays: false,
            });
            c.restarts += 1;
            c.last_restart = now;
            c.restarted_at.push(now);
        }
        match outcome {
            Ok(done) if done.failed == 0 && done.skipped == 0 => {
                self.shared
                    .metrics
                    .drift_repaired
                    .inc_by(objects.len() as u64);
                self.shared.record(vec![
                    Event::new("drift", "repaired")
                        .commit(&good.commit)
                        .plan(&plan.plan_id)
                        .object(objects.join(", ")),
                ]);
                self.last_drift = None;
            }
            Ok(done) => {
                self.shared.record(vec![
                    Event::new("drift", "failed")
                        .commit(&good.commit)
                        .plan(&plan.plan_id)
                        .object(objects.join(", "))
                        .reason(format!(
                            "{} steps failed, {} skipped{}; tried again at the next drift check",
                            done.failed,
                            done.skipped,
                            done.first_failure
                                .map(|f| format!(" (first: {f})"))
                                .unwrap_or_default()
                        )),
                ]);
                self.last_drift = Some(objects);
            }
            Err(e) => {
                self.shared.record(vec![
                    Event::new("drift", "failed")
                        .commit(&good.commit)
                        .plan(&plan.plan_id)
                        .reason(e.to_string()),
                ]);
                self.last_drift = Some(objects);
            }
        }
    }

    /// Keeps one Watch stream per node of the applied commit.
    fn update_watches(&mut self) {
        let Some(good) = &self.good else {
            return;
        };
        // A follower calls no node (it knows the applied commit from etcd, to serve
        // and grant leases); it opens the streams once it leads.
        if self
            .shared
            .replicas
            .as_ref()
            .is_some_and(|r| !r.election.ready())
        {
            return;
        }
        let spec = pipeline::spec_nodes(&good.model);
        let stale: Vec<String> = self
            .watches
            .by_node
            .iter()
            .filter(|(n, (addr, _))| spec.get(*n).is_none_or(|d| d.address != *addr))
            .map(|(n, _)| n.clone())
            .collect();
        for n in stale {
            if let Some((_, task)) = self.watches.by_node.remove(&n) {
                task.abort();
            }
        }
        for (name, node) in spec {
            if self.watches.by_node.contains_key(&name) {
                continue;
            }
            let task = tokio::spawn(watch_node(
                self.shared.clone(),
                name.clone(),
                node.address.clone(),
            ));
            self.watches.by_node.insert(name, (node.address, task));
        }
    }
}

/// Why an execution did not run.
#[derive(Debug)]
enum Failure {
    /// Kernel or initrd files of the commit are missing; nothing was sent.
    MissingImages(String),
    /// Anything else (the state store, a journaled plan).
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::MissingImages(e) | Failure::Other(e) => f.write_str(e),
        }
    }
}

/// What an execution did.
#[derive(Debug, Default)]
struct Done {
    succeeded: usize,
    failed: usize,
    skipped: usize,
    first_failure: Option<String>,
    problems: Vec<String>,
}

/// `vm web-1 (start on lab-1)` per change.
/// A drift event's detail: each change's plan lines (what differs), under the
/// object it names in the event, so an operator sees why without planning again.
fn drift_detail(plan: &Plan) -> serde_json::Value {
    let changes: Vec<serde_json::Value> = plan
        .changes
        .iter()
        .map(|c| json!({"object": format!("{} {}", c.object, c.name), "node": c.node, "details": c.details}))
        .collect();
    json!({ "changes": changes })
}

fn drifted(plan: &Plan) -> Vec<String> {
    plan.changes
        .iter()
        .map(|c| {
            let kind = serde_json::to_value(c.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            format!("{} {} ({kind} on {})", c.object, c.name, c.node)
        })
        .collect()
}

/// The VMs a plan being carried out changes (stops, deletes, creates, moves,
/// starts): a `Stopped` Watch event of one of them is the plan's own while it runs
/// and for [`PLANNED_STOP_GRACE`] after (a node's event may arrive after its step's
/// answer). A crash is never the plan's: `Crashed` always wakes a drift check.
#[derive(Debug, Default)]
pub struct PlannedVms {
    names: std::collections::HashSet<String>,
    /// When its stops stop being the plan's; `None` while it runs.
    until: Option<Instant>,
}

/// How long after a plan was carried out its VMs' `Stopped` events are its own.
pub const PLANNED_STOP_GRACE: Duration = Duration::from_secs(5);

impl PlannedVms {
    /// A plan starts: its VMs (the names of its `vm` changes) replace the last
    /// plan's.
    pub fn begin(&mut self, plan: &reconciler::plan::Plan) {
        self.begin_with(
            plan.changes
                .iter()
                .filter(|c| c.object == "vm")
                .map(|c| c.name.clone()),
        );
    }

    fn begin_with(&mut self, vms: impl IntoIterator<Item = String>) {
        self.names = vms.into_iter().collect();
        self.until = None;
    }

    /// The plan ended at `now`.
    pub fn end(&mut self, now: Instant) {
        self.until = Some(now + PLANNED_STOP_GRACE);
    }

    /// Whether `vm` stopping at `now` is the plan's doing.
    pub fn expects_stop(&self, vm: &str, now: Instant) -> bool {
        self.names.contains(vm) && self.until.is_none_or(|until| now < until)
    }
}

/// Follows one node's Watch stream; a VM that crashed or stopped, or a gap in
/// the sequence, wakes a drift check. Reconnects every few seconds, and a stream
/// opened after one was lost wakes a drift check too: the events in between are
/// gone (an agent restarted, say for an upgrade, that preempts a spot VM before the
/// controller watches again; that stop waited for the next poll, 29 s in the
/// cpu_preemption test).
async fn watch_node(shared: Arc<Shared>, node: String, address: String) {
    use proto::v1::watch_event::Event as WatchKind;
    let mut watched_before = false;
    loop {
        if let Ok(mut client) = reconciler::nodes::connect(&address, shared.signer.clone()).await
            && let Ok(mut stream) = client.watch(5000).await
        {
            if std::mem::replace(&mut watched_before, true) {
                shared.wake_drift.notify_one();
            }
            let mut last_seq = None;
            while let Ok(Some(event)) = stream.message().await {
                let gap = last_seq.is_some_and(|s: u64| event.sequence != s + 1);
                last_seq = Some(event.sequence);
                // A stop the running plan made (or made moments ago) is not drift:
                // after a sync that removed VMs, the drift check it woke held the
                // next commit for a whole observation (4.4 s at 100,000 VMs).
                let vm_down = matches!(
                    &event.event,
                    Some(WatchKind::Vm(vm)) if vm.state == proto::v1::VmState::Crashed as i32
                        || (vm.state == proto::v1::VmState::Stopped as i32
                            && !shared
                                .planned_vms
                                .lock()
                                .expect("planned vms lock")
                                .expects_stop(&vm.name, Instant::now()))
                );
                // A writer frozen on a copy, or a copy that caught up, waits for the
                // epoch authority (`volume_epochs`).
                let volume_waits = matches!(
                    &event.event,
                    Some(WatchKind::Volume(volume)) if volume.detail.contains("waiting for the authority")
                        || volume.detail.contains("caught up")
                );
                // A crash is an event of its own, at once: the console paints the VM
                // red from it even when self-heal restarts it before the next
                // observation (the browser test under CI load never saw `crashed`).
                if let Some(WatchKind::Vm(vm)) = &event.event
                    && vm.state == proto::v1::VmState::Crashed as i32
                {
                    shared.record(vec![
                        crate::events::Event::new("vm", "crashed")
                            .object(format!("vm {}", vm.name))
                            .reason(format!("on {node}: {}", vm.detail)),
                    ]);
                }
                if vm_down || gap || volume_waits {
                    shared.wake_drift.notify_one();
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// `/api/v1/status`: `cairn status` of the applied commit, observed at most
/// `max_age` ago (`Duration::ZERO`: now), plus the controller; and when the nodes
/// were observed (none before the first applied commit). Kept as the status
/// itself, not as a JSON value: the console's pages read it as it is, and the
/// answer is written out when asked for ([`StatusAnswer`]'s `Serialize`).
pub(crate) async fn status_answer(
    shared: &Shared,
    max_age: Duration,
) -> (StatusAnswer, Option<u64>) {
    let view = crate::replicas::view(shared);
    let mut controller = json!({
        "revision": view.revision,
        "last_sync": view.last_sync,
        "paused": view.paused,
        "repo": view.repo,
        "branch": view.branch,
        "head": view.head,
    });
    if let Some(replicas) = &shared.replicas {
        controller["replicas"] = replicas.status();
    }
    let good = shared.good.lock().expect("good lock").clone();
    let Some(good) = good else {
        let answer = StatusAnswer {
            status: None,
            controller,
            error: None,
        };
        return (answer, None);
    };
    let observation = shared.observation(&good.model, max_age).await;
    let observed = &observation.observed;
    let leases = shared.leases.rows(&good.model);
    let built = (|| -> Result<reconciler::status::Status, String> {
        let store = shared.state_store()?;
        // The sync's own desired state when this is its observation and its
        // commit was applied since; else placed here from the stored placement.
        let desired = match &observation.desired {
            Some((commit, desired)) if *commit == good.commit => Arc::clone(desired),
            _ => {
                let stored = store.placement().map_err(|e| e.to_string())?;
                let previous = pipeline::previous_placement(stored, observed);
                let placement = reconciler::desired::place(&good.model, Some(&previous));
                Arc::new(reconciler::desired::desired(
                    &good.model,
                    &good.spec_root,
                    placement,
                ))
            }
        };
        let last = store
            .last_execution_summary()
            .map_err(|e| e.to_string())?
            .map(|record| reconciler::status::last_apply(&record, &store));
        let audit = store.recent_audit(5).map_err(|e| e.to_string())?;
        let migrations = store.migrations().map_err(|e| e.to_string())?;
        let mut status = reconciler::status::status(
            &desired,
            observed,
            store.applied().map_err(|e| e.to_string())?,
            last,
            audit,
        );
        reconciler::status::mark_migrations(&mut status, migrations);
        Ok(status)
    })();
    let answer = match built {
        Ok(mut status) => {
            controller["leases"] = json!(leases);
            controller["maintenance"] = json!(crate::maintenance::all_entries(shared, &good.model));
            crate::lease::status_overlay(shared, &good.model, &mut status, &mut controller);
            StatusAnswer {
                status: Some(Arc::new(status)),
                controller,
                error: None,
            }
        }
        Err(e) => StatusAnswer {
            status: None,
            controller,
            error: Some(e),
        },
    };
    (answer, Some(observation.at_unix_ms))
}

/// What `/api/v1/status` answers: the status (none before the first applied
/// commit, or when it could not be made: then `error` says why) and the
/// controller's own part. Written out as one object: the status's fields and
/// `controller` (without a status: `format_version`, `controller`, `error`).
#[derive(Debug)]
pub struct StatusAnswer {
    /// `cairn status` of the applied commit, with the controller's node states.
    pub status: Option<Arc<reconciler::status::Status>>,
    /// `controller`: revision, last sync, pause, source, replicas, leases,
    /// maintenance, HA restart times.
    pub controller: serde_json::Value,
    /// Why there is no status.
    pub error: Option<String>,
}

impl serde::Serialize for StatusAnswer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct With<'a> {
            #[serde(flatten)]
            status: &'a reconciler::status::Status,
            controller: &'a serde_json::Value,
        }
        #[derive(serde::Serialize)]
        struct Without<'a> {
            format_version: u32,
            controller: &'a serde_json::Value,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<&'a str>,
        }
        match &self.status {
            Some(status) => With {
                status,
                controller: &self.controller,
            }
            .serialize(serializer),
            None => Without {
                format_version: reconciler::status::STATUS_FORMAT_VERSION,
                controller: &self.controller,
                error: self.error.as_deref(),
            }
            .serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plans_own_stops_are_expected_while_it_runs_and_briefly_after_and_no_others() {
        let mut planned = PlannedVms::default();
        let t0 = Instant::now();
        assert!(!planned.expects_stop("web", t0), "nothing planned yet");
        planned.begin_with(["web".to_owned(), "db".to_owned()]);
        assert!(planned.expects_stop("web", t0 + Duration::from_secs(3600)));
        assert!(!planned.expects_stop("cache", t0), "not in the plan");
        planned.end(t0);
        assert!(planned.expects_stop("db", t0 + PLANNED_STOP_GRACE / 2));
        assert!(!planned.expects_stop("db", t0 + PLANNED_STOP_GRACE));
        // The next plan's VMs replace the last one's.
        planned.begin_with(["cache".to_owned()]);
        assert!(planned.expects_stop("cache", t0));
        assert!(!planned.expects_stop("web", t0));
    }

    #[test]
    fn the_kth_crash_within_the_window_moves_the_vm() {
        let now = Instant::now();
        let window = Duration::from_secs(600);
        let ago = |s: u64| now.checked_sub(Duration::from_secs(s)).unwrap_or(now);
        // limit 3: two restarts in place, the third crash moves it.
        assert!(!crashed_too_often(&[], now, 3, window));
        assert!(!crashed_too_often(&[ago(10)], now, 3, window));
        assert!(crashed_too_often(&[ago(20), ago(10)], now, 3, window));
        // Restarts older than the window do not count.
        assert!(!crashed_too_often(&[ago(700), ago(10)], now, 3, window));
        // limit 1: the first crash moves it.
        assert!(crashed_too_often(&[], now, 1, window));
    }

    #[test]
    fn backoff_doubles_from_five_seconds_and_stops_at_five_minutes() {
        let secs: Vec<u64> = [1, 2, 3, 4, 5, 6, 7, 40, u32::MAX]
            .iter()
            .map(|n| backoff(*n).as_secs())
            .collect();
        assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
