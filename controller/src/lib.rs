//! The GitOps controller (`cairn controller`): a daemon that follows one branch
//! (and optionally one subdirectory) of a local git repository and makes the
//! cluster match its head, then keeps it matching between commits.
//!
//! Per new commit (learned within a second by watching the repository's refs,
//! with a poll as backup): verify the signature of every commit on the
//! first-parent path since the last applied one ([`trust`]), compile, plan
//! (`reconciler::pipeline::plan_revision`), refuse unacceptable plans, settle an
//! interrupted execution, apply (`reconciler::pipeline::execute`). Between
//! commits: observe every node on an interval (and at once when a node's Watch
//! stream reports a VM crash), plan the applied commit again, and repair drift
//! (self-heal), restarting a crash-looping VM with exponential backoff.
//! Everything it does is an [`events::Event`]; its HTTP interface ([`http`])
//! serves health, readiness, Prometheus metrics, status and events.
//!
//! It is built on the `reconciler` library, never on the CLI: the `cairn`
//! binary only parses flags into a [`Config`] and calls [`run`].
//!
//! Architecture invariant: the controller applies only commits that passed
//! trust, compile and the plan's acceptability; a commit that fails any of them
//! sends nothing to any node.
//!
//! Architecture invariant: every write to a node goes through
//! `reconciler::pipeline::execute` under the state store's apply lock, so the
//! journal, settling and request-id rules of the reconciler hold for the
//! controller as for `cairn apply`.

#![warn(missing_docs)]

pub mod actions;
pub mod bench;
pub mod console;
pub mod control;
pub mod enroll;
pub mod events;
pub mod fence_list;
pub mod fresh;
pub mod gate;
mod grpc;
pub mod http;
pub mod keys;
pub mod lease;
pub mod maintenance;
pub mod metrics;
pub mod node_keys;
pub mod notifications;
pub mod preemption;
pub mod protection_events;
pub mod rebuild;
pub mod remote;
pub mod replicas;
pub mod source;
pub mod sync_api;
pub mod trust;
pub mod usage_metrics;
pub mod vm_actions;
pub mod volume_epochs;
pub mod webhook;
pub mod witness;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use proto::auth::RequestSigner;
use reconciler::nodes::GrpcNodes;

use crate::events::{Event, EventLog, LastSync};
use crate::metrics::Metrics;

/// How the controller runs (`cairn controller` flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// The repository (bare or a work tree).
    pub repo: PathBuf,
    /// The branch followed.
    pub branch: String,
    /// The spec root inside the repository (empty: its top).
    pub subdir: PathBuf,
    /// Holds `controller.key`, the state store, the event log, the token.
    pub data_dir: PathBuf,
    /// Trusted keys (allowed-signers format); default `DATA_DIR/allowed-signers`.
    pub trusted_keys: Option<PathBuf>,
    /// State store file; default `DATA_DIR/state.redb`; `etcd://HOSTS/PREFIX`: shared
    /// with controller replicas, one of which leads ([`replicas`]).
    pub state: Option<PathBuf>,
    /// HTTP address.
    pub listen: SocketAddr,
    /// Address of the standard gRPC health service (`grpc.health.v1`); none: off.
    pub grpc_listen: Option<SocketAddr>,
    /// How often the branch is read even without a change notice.
    pub poll: Duration,
    /// How often every node is observed and drift planned.
    pub drift_interval: Duration,
    /// Repair drift (else only report it).
    pub self_heal: bool,
    /// Node actions in flight at once.
    pub parallelism: usize,
    /// A remote the repository is fetched from (`--repo https://…|ssh://…`):
    /// `repo` is then ignored and the mirror `DATA_DIR/mirror.git` is read.
    pub remote: Option<remote::Remote>,
    /// `--webhook-secret FILE`: turns `POST /api/v1/webhook` on.
    pub webhook_secret: Option<PathBuf>,
    /// `--notify FILE`: the notification receivers (default
    /// `DATA_DIR/notify.kdl` when it exists; see [`notifications`]).
    pub notify: Option<PathBuf>,
}

impl Config {
    /// What is followed, as people name it: the remote's URL or the path.
    pub fn source_name(&self) -> String {
        match &self.remote {
            Some(r) => r.url.clone(),
            None => self.repo.display().to_string(),
        }
    }

    /// The trusted-keys file.
    pub fn trusted_keys_path(&self) -> PathBuf {
        self.trusted_keys
            .clone()
            .unwrap_or_else(|| self.data_dir.join("allowed-signers"))
    }

    /// The state store file (with an etcd store: the local one of the volume epochs).
    pub fn state_path(&self) -> PathBuf {
        self.state
            .clone()
            .filter(|s| !replicas::is_etcd(s))
            .unwrap_or_else(|| self.data_dir.join("state.redb"))
    }
}

/// What the controller shows of itself (`controller` in `/api/v1/status`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct View {
    /// The applied commit.
    pub revision: Option<String>,
    /// The last sync.
    pub last_sync: Option<LastSync>,
    /// Whether it is paused.
    pub paused: bool,
    /// The repository followed.
    pub repo: String,
    /// The branch followed.
    pub branch: String,
    /// The branch head when last read.
    pub head: Option<String>,
    /// The digest of the last observation of the nodes (signed actions are bound to it).
    #[serde(skip)]
    pub observed_digest: Option<String>,
}

/// State shared by the worker and the HTTP interface.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// The event log.
    pub events: EventLog,
    /// The metrics.
    pub metrics: Metrics,
    /// The bearer token of `/api/*`.
    pub token: String,
    /// Ready: the nodes were observed once (or there is nothing to observe yet).
    pub ready: AtomicBool,
    /// Paused.
    pub paused: AtomicBool,
    /// Wakes the worker: the branch may have moved, or it was resumed.
    pub wake: tokio::sync::Notify,
    /// Wakes the worker for a drift check now (a node reported a VM crash).
    pub wake_drift: tokio::sync::Notify,
    /// The VMs the plan being carried out changes: their `Stopped` Watch events
    /// are the plan's own and wake no drift check ([`worker::PlannedVms`]).
    pub planned_vms: Mutex<worker::PlannedVms>,
    /// Wakes the fetcher of a remote source now (a webhook).
    pub fetch: tokio::sync::Notify,
    /// The rate limit of refused webhooks' events.
    pub webhooks: webhook::Limiter,
    /// Held by the worker while it plans and applies: pausing waits for it.
    pub busy: tokio::sync::Mutex<()>,
    /// What `/api/v1/status` says of the controller.
    pub view: Mutex<View>,
    /// The applied commit, compiled (for `/api/v1/status`).
    pub good: Mutex<Option<Arc<worker::Good>>>,
    /// The nodes, reached with the controller key.
    pub nodes: GrpcNodes,
    /// The controller key's signer (Watch streams).
    pub signer: RequestSigner,
    /// The address the HTTP interface listens on.
    pub address: SocketAddr,
    /// The plan held for approval, if any (`GET /api/v1/plans`).
    pub held: Mutex<Option<gate::HeldPlan>>,
    /// `cairn sync` requests waiting for the worker.
    pub requests: Mutex<Vec<sync_api::Request>>,
    /// Sends chosen events to the receivers of `DATA_DIR/notify.kdl`.
    pub notifier: std::sync::OnceLock<notifications::Notifier>,
    /// The nodes' leases (`Lease.Renew` on the gRPC listener).
    pub leases: Arc<lease::Leases>,
    /// The etcd store and the election, with `--state etcd://…`.
    pub replicas: Option<replicas::Replicas>,
    /// The nodes an operator put in maintenance.
    pub maintenance: maintenance::Maintenance,
    /// The newest observation of the applied commit's nodes: the worker's own
    /// (each sync and drift check puts it), else made by whoever needs a younger
    /// one (the console, `/api/v1/status`); forgotten once an event is recorded
    /// (the worker hands it over again after a sync that sent nothing).
    pub observed: fresh::Fresh<Arc<Observation>>,
    /// The status the console's pages share (`/api/v1/status`'s value, parsed
    /// once), kept by `console::keep_status` from the controller's start and
    /// served stale-while-revalidate: stale once an event is recorded.
    pub status_view: Arc<fresh::Fresh<Arc<console::StatusView>>>,
    /// The VM and node states the console's live streams share.
    pub live_view: fresh::Fresh<Option<serde_json::Value>>,
    /// When a console page was last loaded (Unix ms): while the console is in use
    /// its status is kept younger.
    pub console_use: console::Use,
}

/// One observation of the applied commit's nodes, with when it was made.
#[derive(Debug)]
pub struct Observation {
    /// When it started (milliseconds since the Unix epoch; the worker's: when it
    /// was handed over, just after it was made).
    pub at_unix_ms: u64,
    /// What the nodes answered (failed nodes: unreachable, not asked); the
    /// worker's plan shares it.
    pub observed: Arc<reconciler::observe::Observed>,
    /// The desired state the worker planned a sync with against this observation,
    /// and the commit synced: once that commit is the applied one, the status
    /// reads it instead of placing the model again (none from a drift check, whose
    /// plan may hold moves it did not carry out, nor made here).
    pub desired: Option<(String, Arc<reconciler::desired::Desired>)>,
}

impl Shared {
    /// The applied commit's nodes observed at most `max_age` ago and with no event
    /// recorded since: the worker's or another reader's observation when there is
    /// one, else observed now (once for every concurrent caller).
    pub(crate) async fn observation(
        &self,
        model: &compiler::Model,
        max_age: Duration,
    ) -> Arc<Observation> {
        self.observed
            .get(max_age, || async {
                // Its start: what it shows is at most this old.
                let at_unix_ms = reconciler::state::now_ms();
                let spec = reconciler::pipeline::spec_nodes(model);
                let failed = self.leases.failed_nodes(model);
                let observed =
                    reconciler::observe::observe_except(&spec, &self.nodes, &failed).await;
                Arc::new(Observation {
                    at_unix_ms,
                    observed: Arc::new(observed),
                    desired: None,
                })
            })
            .await
    }
}

impl Shared {
    /// The state store, its audit log signed with the controller key; appends
    /// move the audit head every node request carries (`proto::anchor`).
    pub fn state_store(&self) -> Result<replicas::ControllerStore, String> {
        let head = self.signer.audit_head().cloned().unwrap_or_default();
        reconciler::state::RedbStore::open(&self.config.state_path())
            .and_then(|store| store.with_audit_key(self.signer.identity(), head.clone()))
            .and_then(|local| {
                replicas::ControllerStore::open(
                    local,
                    self.replicas.as_ref(),
                    &self.signer.identity(),
                    head,
                )
            })
            .map_err(|e| e.to_string())
    }

    /// Records events (a failure to record is printed, never fatal).
    pub fn record(&self, events: Vec<Event>) {
        for e in &events {
            eprintln!(
                "{} {} {}{}{}{}",
                e.at,
                e.kind,
                e.result,
                e.commit
                    .as_deref()
                    .map(|c| format!(" commit {}", &c[..c.len().min(12)]))
                    .unwrap_or_default(),
                e.object
                    .as_deref()
                    .map(|o| format!(" {o}"))
                    .unwrap_or_default(),
                e.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
        // Something happened: the console's next page load or live tick observes
        // anew (a page shows the stale status meanwhile, with its age). A stale
        // observation is never read (only a young one is), so it is let go at once:
        // at 100,000 VMs it was a third of the memory a sync added.
        self.observed.forget();
        self.status_view.invalidate();
        self.live_view.invalidate();
        // Notified once recorded (a receiver that looks finds the event).
        let notifier = self.notifier.get().filter(|n| n.receivers() > 0);
        let copy = notifier.map(|_| events.clone());
        let recorded = self
            .events
            .record_all(events)
            .map_err(|e| eprintln!("warning: {e}"))
            .ok();
        let Some(notifier) = notifier else { return };
        for e in recorded.or(copy).unwrap_or_default() {
            for receiver in notifier.offer(&e) {
                self.metrics.notification(&receiver, "dropped");
                eprintln!(
                    "warning: the queue of notification receiver {receiver} is full; the {} {} event is not sent to it",
                    e.kind, e.result
                );
            }
        }
    }

    /// Sets paused (the marker file and the flag), waiting for work in
    /// progress; the event names who signed the action.
    pub async fn set_paused(&self, paused: bool, by: &actions::Authorized) -> Result<(), String> {
        let _busy = self.busy.lock().await;
        let path = control::paused_path(&self.config.data_dir);
        if let Some(replicas) = &self.replicas {
            // With replicas the pause is etcd's `controller/paused` (written by the
            // leader, fenced), so a new leader stays paused; the file is not used.
            let record = control::SharedPause {
                paused,
                by: by.signer(),
                at_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            replicas
                .store
                .set_controller_record(control::SHARED_PAUSE, &record)
                .map_err(|e| format!("cannot record the pause in the shared store: {e}"))?;
        } else if paused {
            std::fs::write(&path, "paused through the controller's API\n")
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        } else if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(format!("cannot remove {}: {e}", path.display()));
        }
        let was = self.set_paused_flag(paused);
        if was != paused {
            let event = if paused {
                Event::new("paused", "ok").reason(format!(
                    "by {}: nothing is applied automatically; manual `cairn apply` is allowed until `cairn controller resume`",
                    by.signer()
                ))
            } else {
                Event::new("resumed", "ok").reason(format!(
                    "by {}: the branch head is applied again",
                    by.signer()
                ))
            };
            self.record(vec![event.detail(by.detail())]);
        }
        if !paused {
            self.wake.notify_one();
        }
        Ok(())
    }
}

impl Shared {
    /// Sets the paused flag, its metric and the status view; returns what it was.
    pub(crate) fn set_paused_flag(&self, paused: bool) -> bool {
        let was = self.paused.swap(paused, Ordering::SeqCst);
        self.metrics.paused.set(i64::from(paused));
        self.view.lock().expect("view lock").paused = paused;
        was
    }

    /// With replicas: the pause recorded in etcd (`None`: never recorded, or
    /// unreadable now, when the flag stays as it is).
    pub(crate) fn shared_pause(&self) -> Option<control::SharedPause> {
        let replicas = self.replicas.as_ref()?;
        match replicas.store.controller_record(control::SHARED_PAUSE) {
            Ok(record) => record,
            Err(e) => {
                eprintln!("cairn controller: the shared pause: {e}");
                None
            }
        }
    }
}

/// A running controller.
#[derive(Debug)]
pub struct Handle {
    /// Its shared state.
    pub shared: Arc<Shared>,
    /// The address its HTTP interface listens on.
    pub address: SocketAddr,
    /// The address of its gRPC health service.
    pub grpc_address: Option<SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
    worker: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<()>,
    grpc: Option<grpc::Health>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Handle {
    /// Stops it: the worker ends the unit of work it is in (at most `grace`;
    /// the journal makes an interrupted apply safe to settle later), then the
    /// lock and URL files are removed.
    pub async fn stop(self, grace: Duration) {
        if let Some(health) = &self.grpc {
            health.not_serving().await;
        }
        let _ = self.stop.send(true);
        self.shared.wake.notify_one();
        if tokio::time::timeout(grace, self.worker).await.is_err() {
            eprintln!(
                "note: the sync in progress did not end within {} s; the next start settles it",
                grace.as_secs()
            );
        }
        self.server.abort();
        let _ = self.server.await;
        if let Some(health) = self.grpc {
            health.end().await;
        }
        self.shared
            .record(vec![Event::new("controller", "stopped")]);
        control::release(&self.shared.config.data_dir);
    }
}

/// Starts a controller on the current tokio runtime.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    let data_dir = &config.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let data_dir = std::fs::canonicalize(data_dir)?;
    let config = Config {
        data_dir: data_dir.clone(),
        repo: match &config.remote {
            Some(r) => remote::prepare(&data_dir, r).map_err(|e| anyhow::anyhow!(e))?,
            None => std::fs::canonicalize(&config.repo).with_context(|| {
                format!("the repository {} does not exist", config.repo.display())
            })?,
        },
        webhook_secret: match &config.webhook_secret {
            Some(p) => Some(webhook::check_secret(p).map_err(|e| anyhow::anyhow!(e))?),
            None => None,
        },
        trusted_keys: match &config.trusted_keys {
            Some(p) => Some(std::path::absolute(p)?),
            None => None,
        },
        state: match &config.state {
            Some(p) if !replicas::is_etcd(p) => Some(std::path::absolute(p)?),
            Some(url) => Some(url.clone()),
            None => None,
        },
        ..config
    };
    let source = source::GitSource {
        repo: config.repo.clone(),
        branch: config.branch.clone(),
        subdir: config.subdir.clone(),
    };
    let git_dir = source
        .git_dir()
        .with_context(|| format!("cannot open the repository {}", config.repo.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (another controller? pass --listen ADDR)",
                config.listen
            )
        })?;
    let address = listener.local_addr()?;
    let grpc_listener = match config.grpc_listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| {
            format!(
                "cannot listen on {a} for the gRPC health service (another controller? pass --grpc-listen ADDR, or `none`)"
            )
        })?),
        None => None,
    };
    control::take_lock(
        &data_dir,
        &control::ControllerLock {
            pid: std::process::id(),
            host: reconciler::state::hostname(),
            listen: address.to_string(),
            repo: config.source_name(),
            branch: config.branch.clone(),
            since_unix_ms: reconciler::state::now_ms(),
        },
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    // A key rotation killed in its switch is finished or undone before the key is read.
    let state_for_settle = config.state.clone();
    match keys::settle_at_start(&data_dir, || {
        match state_for_settle.as_deref().filter(|s| replicas::is_etcd(s)) {
            Some(url) => state_etcd::EtcdStore::open(&url.to_string_lossy())
                .and_then(|store| store.audit_records())
                .map_err(|e| e.to_string()),
            None => reconciler::state::RedbStore::open(&config.state_path())
                .and_then(|store| store.audit_records())
                .map_err(|e| e.to_string()),
        }
    }) {
        Ok(Some(note)) => eprintln!("cairn controller: {note}"),
        Ok(None) => {}
        Err(e) => anyhow::bail!("the unfinished controller key rotation: {e}"),
    }
    let identity = keys::recover::load_controller_key(&data_dir).map_err(|e| anyhow::anyhow!(e))?;
    let fence = proto::fence::SharedFence::default();
    let signer = RequestSigner::new(identity)
        .with_audit_head(Default::default())
        .with_fence(fence.clone());
    let replicas = match config.state.as_deref().filter(|s| replicas::is_etcd(s)) {
        Some(url) => Some(
            replicas::Replicas::start(&url.to_string_lossy(), &format!("http://{address}"), fence)
                .context("the shared state store")?,
        ),
        None => None,
    };
    let token = control::token(&data_dir).context("the API token")?;
    let receivers =
        notifications::load(config.notify.as_deref(), &data_dir).map_err(|e| anyhow::anyhow!(e))?;
    let events = EventLog::open(&data_dir.join("events.redb"))?;
    if let Some(r) = &replicas {
        events.share_through(
            state_etcd::SharedLog::new(&r.store, "events", events::KEEP),
            &r.me,
        );
    }
    // With replicas, the pause is the shared one (a new leader stays paused); a
    // replica that never saw one recorded starts from its file as before.
    let paused = match replicas.as_ref().map(|r| {
        r.store
            .controller_record::<control::SharedPause>(control::SHARED_PAUSE)
    }) {
        Some(Ok(Some(record))) => record.paused,
        Some(Err(e)) => {
            // Followed again at the top of every round as leader.
            eprintln!(
                "cairn controller: the shared pause: {e}; this replica's file decides for now"
            );
            control::is_paused(&data_dir)
        }
        _ => control::is_paused(&data_dir),
    };
    let maintenance = maintenance::Maintenance::load(&data_dir)
        .map_err(|e| anyhow::anyhow!(e))?
        .shared_through(replicas.as_ref().map(|r| r.store.clone()));
    let metrics = Metrics::new();
    metrics.paused.set(i64::from(paused));
    let last_sync: Option<LastSync> = events.get("last_sync").ok().flatten();
    let shared = Arc::new(Shared {
        view: Mutex::new(View {
            paused,
            last_sync,
            repo: config.source_name(),
            branch: config.branch.clone(),
            ..View::default()
        }),
        config,
        events,
        metrics,
        token,
        ready: AtomicBool::new(false),
        paused: AtomicBool::new(paused),
        wake: tokio::sync::Notify::new(),
        wake_drift: tokio::sync::Notify::new(),
        planned_vms: Mutex::default(),
        fetch: tokio::sync::Notify::new(),
        webhooks: webhook::Limiter::default(),
        busy: tokio::sync::Mutex::new(()),
        good: Mutex::new(None),
        nodes: GrpcNodes::new(signer.clone()),
        signer,
        address,
        held: Mutex::new(None),
        requests: Mutex::new(vec![]),
        notifier: std::sync::OnceLock::new(),
        leases: Arc::new(lease::Leases::new(lease::DEFAULT_TTL).shared_through(replicas.as_ref())),
        replicas,
        maintenance,
        observed: fresh::Fresh::default(),
        status_view: Arc::default(),
        live_view: fresh::Fresh::default(),
        console_use: console::Use::default(),
    });
    // The console's status, from now on: the first page does not wait for it.
    tokio::spawn(console::keep_status(Arc::downgrade(&shared)));
    // With replicas, the leader's key rotations are followed (`keys::follow_rotation`).
    tokio::spawn(keys::follow_rotation(shared.clone()));
    std::fs::write(control::url_path(&data_dir), format!("http://{address}\n"))
        .with_context(|| format!("cannot write {}", control::url_path(&data_dir).display()))?;
    shared.record(vec![Event::new("controller", "started").reason(format!(
        "following branch {} of {} (pid {}, http://{address}){}",
        shared.config.branch,
        shared.config.source_name(),
        std::process::id(),
        if paused { "; paused" } else { "" }
    ))]);
    let _ = shared.notifier.set(notifications::Notifier::start(
        receivers,
        Arc::downgrade(&shared),
    ));
    let wake_shared = shared.clone();
    let watcher =
        match source::watch_refs(&git_dir, Arc::new(move || wake_shared.wake.notify_one())) {
            Ok(w) => Some(w),
            Err(e) => {
                shared.record(vec![Event::new("source", "reported").reason(format!(
                    "cannot watch {} for new commits ({e}); the branch is read every {} s instead",
                    git_dir.display(),
                    shared.config.poll.as_secs()
                ))]);
                None
            }
        };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(http::serve(listener, shared.clone(), stopped.clone()));
    let grpc = match grpc_listener {
        Some(l) => Some(grpc::Health::serve(l, shared.clone()).await?),
        None => None,
    };
    if let Some(r) = shared.config.remote.clone() {
        tokio::spawn(remote::run_fetcher(shared.clone(), r, stopped.clone()));
    }
    let worker = tokio::spawn(worker::run(shared.clone(), source, stopped));
    Ok(Handle {
        shared,
        address,
        grpc_address: grpc.as_ref().map(|g| g.address),
        stop,
        worker,
        server,
        grpc,
        _watcher: watcher,
    })
}

/// `cairn controller`: runs until SIGTERM or SIGINT; the exit code.
pub fn run(config: Config) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let handle = start(config).await?;
        eprintln!(
            "cairn controller: listening on http://{} (token in {}){}; stop with SIGTERM",
            handle.address,
            control::token_path(&handle.shared.config.data_dir).display(),
            handle
                .grpc_address
                .map(|a| format!(", gRPC health on {a}"))
                .unwrap_or_default()
        );
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        handle.stop(Duration::from_secs(30)).await;
        Ok(0)
    })
}
