//! The web console: read-only pages of the controller's state at `/` on its
//! `--listen` address (issue 23).
//!
//! | route | page |
//! |---|---|
//! | `GET /` | overview: last sync, held plan, counts, problems linked to their causes |
//! | `GET /topology` | sites → racks → nodes: CPU and memory bars, VMs, disks, bonds |
//! | `GET /vms?tenant&sla&availability&state&q&page` | the VM table (filtered and paginated on the server) |
//! | `GET /vms/NAME` | one VM: placement explanation, disks and copies, NICs, events |
//! | `GET /syncs`, `/syncs/SEQ`, `/plans/ID` | syncs, a sync's policy results, plan and apply report |
//! | `GET /events?kind&result&object&commit&before` | the event log, the audit chain's verification, its newest entries summarized |
//! | `GET /audit/N` | one audit entry whole (an apply's report of every step) |
//! | `GET /graph` | the applied commit's dependency graph (SVG made here) |
//! | `GET /tenants` | quota and budget use |
//! | `GET /events/live` | Server-Sent Events: VM and node states, new events |
//! | `GET /login`, `POST /login`, `POST /logout` | the session (below) |
//!
//! Access: the HTTP guard ([`crate::http`]) checks `Host` (DNS rebinding) and
//! `Origin` (CSRF) first. Then every page needs either the controller's
//! bearer token (`Authorization: Bearer …`, for scripts) or a session cookie,
//! which `POST /login` gives for the token: `cairn_console=EXPIRY.MAC`,
//! MAC = HMAC-SHA256 keyed by the token over the expiry, `HttpOnly;
//! SameSite=Strict`, 12 hours. The server keeps no session table: changing
//! `DATA_DIR/controller.token` ends every session.
//!
//! Architecture invariant: the console is read-only; no route here changes the
//! controller or a node (log in and out change only the browser's cookie).

mod assets;
pub mod data;
pub mod graph;
pub mod pages;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::Markup;
use reconciler::state::StateStore as _;

pub use data::Snapshot;

use crate::Shared;
use crate::events::Event;
use crate::fresh;

/// The session cookie's name.
pub const COOKIE: &str = "cairn_console";
/// How long a session lasts.
pub const SESSION_MS: u64 = 12 * 3600 * 1000;

/// The console's routes (merged into the HTTP router, inside its guard).
pub(crate) fn router(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(overview))
        .route("/topology", get(topology))
        .route("/vms", get(vms))
        .route("/vms/{name}", get(vm))
        .route("/syncs", get(syncs))
        .route("/syncs/{seq}", get(sync))
        .route("/plans/{plan_id}", get(plan))
        .route("/events", get(events))
        .route("/events/live", get(live))
        .route("/audit/{index}", get(audit_entry))
        .route("/graph", get(graph_page))
        .route("/tenants", get(tenants))
        .route("/logout", axum::routing::post(logout))
        .layer(axum::middleware::from_fn_with_state(
            shared,
            require_session,
        ))
        // Open to all who pass the guard: the login form and its style sheet.
        .route("/login", get(login_form).post(login))
        .route("/console.css", get(css))
        .route("/console.js", get(js))
        // Browsers ask for it on their own; there is none.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

/// The cookie value of a session that ends at `expires_unix_ms`.
pub fn session_cookie(token: &str, expires_unix_ms: u64) -> String {
    let mac = crate::webhook::signature(
        token.as_bytes(),
        format!("cairn-console-session\0{expires_unix_ms}").as_bytes(),
    );
    format!("{expires_unix_ms}.{mac}")
}

/// Whether a cookie value is a live session of `token`.
pub fn session_valid(token: &str, value: &str, now_unix_ms: u64) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some((expires, _)) = value.split_once('.') else {
        return false;
    };
    let Ok(expires) = expires.parse::<u64>() else {
        return false;
    };
    if expires <= now_unix_ms || expires > now_unix_ms + SESSION_MS {
        return false;
    }
    let want = session_cookie(token, expires);
    want.len() == value.len() && bool::from(want.as_bytes().ct_eq(value.as_bytes()))
}

fn cookie_of<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn bearer_ok(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|given| {
            let given = given.trim().as_bytes();
            given.len() == token.len() && bool::from(given.ct_eq(token.as_bytes()))
        })
}

/// Whether a request carries the token or a live session.
pub fn signed_in(headers: &HeaderMap, token: &str, now_unix_ms: u64) -> bool {
    bearer_ok(headers, token)
        || cookie_of(headers, COOKIE).is_some_and(|v| session_valid(token, v, now_unix_ms))
}

async fn require_session(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    if signed_in(
        request.headers(),
        &shared.token,
        reconciler::state::now_ms(),
    ) {
        return with_security_headers(next.run(request).await);
    }
    let path = request.uri().path();
    if request.method() == axum::http::Method::GET && path != "/events/live" {
        let target = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        return Redirect::to(&format!("/login?next={}", data::path_segment(target)))
            .into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        "log in at /login, or send `Authorization: Bearer $(cat DATA_DIR/controller.token)`\n",
    )
        .into_response()
}

/// No framing (clickjacking), no inline script or style, no referrer to other
/// sites (`no-referrer` would make browsers send `Origin: null` with the login
/// form, which the guard refuses), no cache.
fn with_security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

fn page(m: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        m.into_string(),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    let body = pages::layout(
        "Not found",
        pages::Nav::None,
        maud::html! { h1 { "Not found" } p { (what) } p { a href="/" { "the overview" } } },
    );
    (StatusCode::NOT_FOUND, page(body)).into_response()
}

/// A relative path on this console (`next=` must not lead elsewhere).
fn local_path(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

#[derive(Debug, serde::Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: String,
}

async fn login_form(Query(q): Query<LoginQuery>) -> Response {
    with_security_headers(page(pages::login(None, local_path(&q.next))))
}

#[derive(Debug, serde::Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(
    State(shared): State<Arc<Shared>>,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    use subtle::ConstantTimeEq as _;
    let given = form.token.trim().as_bytes();
    let next = local_path(&form.next);
    if given.len() != shared.token.len() || !bool::from(given.ct_eq(shared.token.as_bytes())) {
        let body = pages::login(Some("That is not the controller's token."), next);
        return with_security_headers((StatusCode::UNAUTHORIZED, page(body)).into_response());
    }
    let expires = reconciler::state::now_ms() + SESSION_MS;
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        session_cookie(&shared.token, expires),
        SESSION_MS / 1000
    );
    let mut r = Redirect::to(next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    with_security_headers(r)
}

async fn logout() -> Response {
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("cairn_console=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        assets::CSS,
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        assets::JS,
    )
        .into_response()
}

/// How old a status a page serves without starting a new one behind it: older,
/// the page still shows it at once (with its age) and a new one is made in the
/// background for the next load (stale-while-revalidate).
pub const PAGE_STATUS_MAX_AGE: Duration = Duration::from_secs(2);

/// How long the console counts as in use after a page load: while it is,
/// [`keep_status`] renews the status before it is [`PAGE_STATUS_MAX_AGE`] old.
const IN_USE: Duration = Duration::from_secs(60);

/// Unused, the status is renewed when it is this old (and for a new commit, from
/// the worker's own observation when that is newer, which costs no node call).
const IDLE_MAX_AGE: Duration = Duration::from_secs(30);

/// How often [`keep_status`] looks.
const KEEP_TICK: Duration = Duration::from_millis(250);

/// The console's use: the last page load.
#[derive(Debug, Default)]
pub struct Use {
    last_load_unix_ms: std::sync::atomic::AtomicU64,
}

impl Use {
    fn note(&self) {
        self.last_load_unix_ms.store(
            reconciler::state::now_ms(),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    fn in_use(&self) -> bool {
        let last = self
            .last_load_unix_ms
            .load(std::sync::atomic::Ordering::SeqCst);
        last > 0 && reconciler::state::now_ms().saturating_sub(last) <= IN_USE.as_millis() as u64
    }
}

/// The status the pages show: what `/api/v1/status` answers, kept as the status
/// itself (never written out and parsed back for the pages).
#[derive(Debug)]
pub struct StatusView {
    /// `/api/v1/status`'s answer.
    pub answer: crate::worker::StatusAnswer,
    /// When its nodes were observed (ms since the Unix epoch; none before the
    /// first applied commit).
    pub observed_unix_ms: Option<u64>,
    /// The applied commit it was made for.
    pub commit: Option<String>,
}

impl StatusView {
    /// A status answer, observed at `observed_unix_ms`, of `commit`.
    pub fn new(
        answer: crate::worker::StatusAnswer,
        observed_unix_ms: Option<u64>,
        commit: Option<String>,
    ) -> StatusView {
        StatusView {
            answer,
            observed_unix_ms,
            commit,
        }
    }

    /// The status, and why there is none.
    pub fn parsed(&self) -> (Option<Arc<reconciler::status::Status>>, Option<String>) {
        (self.answer.status.clone(), self.answer.error.clone())
    }
}

/// The commit the controller has applied, if any.
pub(crate) fn applied_commit(shared: &Shared) -> Option<String> {
    shared
        .good
        .lock()
        .expect("good lock")
        .as_ref()
        .map(|g| g.commit.clone())
}

/// Makes the pages' status: observed at most `max_age` ago (the worker's
/// observation when it is that young), and parsed for the pages.
async fn make_status(shared: &Shared, max_age: Duration) -> Arc<StatusView> {
    let commit = applied_commit(shared);
    let (answer, observed) = crate::worker::status_answer(shared, max_age).await;
    Arc::new(StatusView::new(answer, observed, commit))
}

/// Keeps the pages' status from the controller's start: made at once (so the
/// first page does not wait), renewed each second while the console is in use,
/// rebuilt from the worker's own observation whenever that is newer (no node
/// call) while in use or when the applied commit changed, and otherwise renewed
/// when it is [`IDLE_MAX_AGE`] old (a new commit's, from an observation at most that
/// old, when the console is unused). Pages never wait
/// for it ([`snapshot`] serves the newest and, when it is old, revalidates).
pub(crate) async fn keep_status(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let in_use = shared.console_use.in_use();
        let renew_at = if in_use {
            PAGE_STATUS_MAX_AGE / 2
        } else {
            IDLE_MAX_AGE
        };
        let current = shared.status_view.peek();
        let now = reconciler::state::now_ms();
        let commit = applied_commit(&shared);
        // The worker observed since (and nothing happened since): free to use.
        let newer_observation = shared.observed.peek().is_some_and(|(o, _, stale)| {
            !stale
                && current
                    .as_ref()
                    .is_none_or(|(v, _, _)| v.observed_unix_ms.is_none_or(|at| o.at_unix_ms > at))
        });
        let due = match &current {
            None => Some(renew_at),
            Some((view, age, stale)) => {
                // How old what it shows is: its observation's age.
                let age = view
                    .observed_unix_ms
                    .map(|at| Duration::from_millis(now.saturating_sub(at)))
                    .unwrap_or(*age);
                // Unused, a newer observation of the same commit waits for the
                // idle renewal: rebuilding the status after every sync was a third
                // of the controller's CPU at 10,000 simulated nodes, and a new
                // commit takes the worker's observation when that is fresh rather
                // than observing every node again behind the sync.
                if newer_observation && (in_use || view.commit != commit) {
                    Some(Duration::MAX)
                } else if view.commit != commit {
                    Some(if in_use { Duration::ZERO } else { renew_at })
                } else if age >= renew_at || (in_use && *stale) {
                    Some(renew_at)
                } else {
                    None
                }
            }
        };
        if let Some(max_age) = due {
            let s = shared.clone();
            shared
                .status_view
                .refresh(|| async move { make_status(&s, max_age).await })
                .await;
        }
        drop(shared);
        tokio::time::sleep(KEEP_TICK).await;
    }
}

/// What one page load reads: the controller's view, the applied commit, the
/// held plan, recent events, and with `observe` the status (the newest the
/// controller has, however old, with its age: see [`keep_status`]).
pub(crate) async fn snapshot(shared: &Arc<Shared>, observe: bool) -> Snapshot {
    shared.console_use.note();
    let (status, status_error, status_observed_unix_ms, status_revalidating) = if observe {
        let s = shared.clone();
        let mut served = shared
            .status_view
            .serve(PAGE_STATUS_MAX_AGE, move || async move {
                make_status(&s, PAGE_STATUS_MAX_AGE).await
            })
            .await;
        // A status made before the controller had a commit (it just started and
        // restored its applied commit since) shows nothing of it: this is the
        // one wait, for the first status of the commit. A status of the previous
        // commit (one was just applied) is shown, marked as being renewed.
        let commit = applied_commit(shared);
        if served.value.commit.is_some() && served.value.commit != commit {
            served.revalidating = true;
        }
        for _ in 0..2 {
            if served.value.commit.is_some() || commit.is_none() {
                break;
            }
            let s = shared.clone();
            shared
                .status_view
                .refresh(|| async move { make_status(&s, PAGE_STATUS_MAX_AGE).await })
                .await;
            if let Some((value, age, stale)) = shared.status_view.peek() {
                served = fresh::Served {
                    value,
                    age,
                    revalidating: stale,
                };
            }
        }
        let (status, error) = served.value.parsed();
        (
            status,
            error,
            served.value.observed_unix_ms,
            served.revalidating,
        )
    } else {
        (None, None, None, false)
    };
    let applied = shared
        .good
        .lock()
        .expect("good lock")
        .clone()
        .map(|g| data::Applied {
            commit: g.commit.clone(),
            model: Arc::clone(&g.model),
        });
    Snapshot {
        now_unix_ms: reconciler::state::now_ms(),
        controller: crate::replicas::view(shared),
        applied,
        status,
        status_error,
        status_observed_unix_ms,
        status_revalidating,
        held: crate::replicas::held_plan(shared),
        events: shared.events.newest(20, None).unwrap_or_default(),
    }
}

async fn overview(State(shared): State<Arc<Shared>>) -> Response {
    page(pages::overview(&snapshot(&shared, true).await))
}

#[derive(Debug, serde::Deserialize)]
struct RackQuery {
    rack: Option<String>,
}

async fn topology(State(shared): State<Arc<Shared>>, Query(q): Query<RackQuery>) -> Response {
    page(pages::topology(
        &snapshot(&shared, true).await,
        q.rack.as_deref(),
    ))
}

async fn vms(State(shared): State<Arc<Shared>>, Query(f): Query<pages::VmFilter>) -> Response {
    page(pages::vms(&snapshot(&shared, true).await, &f))
}

/// Whether an event is about VM `name` (`vm NAME`, a step `start_vm NAME@node`).
pub fn about_vm(e: &Event, name: &str) -> bool {
    let Some(o) = e.object.as_deref() else {
        return false;
    };
    o == format!("vm {name}")
        || o.starts_with(&format!("vm {name} "))
        || o.contains(&format!(" {name}@"))
        || o.ends_with(&format!(" {name}"))
}

async fn vm(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let s = snapshot(&shared, true).await;
    let previous = shared
        .state_store()
        .ok()
        .and_then(|store| store.placement().ok().flatten());
    let candidates = s.model().and_then(|model| {
        let options = compiler::place::PlaceOptions {
            previous,
            failed: Default::default(),
        };
        compiler::place::explain_vm(model, &options, None, &name)
    });
    let events = shared
        .events
        .newest_where(5_000, pages::PAGE_SIZE, None, |e| about_vm(e, &name))
        .unwrap_or_default();
    let extra = pages::VmExtra { candidates, events };
    match pages::vm(&s, &name, &extra) {
        Some(m) => page(m),
        None => not_found(&format!(
            "No VM named {name} in the applied commit or on a node."
        )),
    }
}

#[derive(Debug, serde::Deserialize)]
struct PageQuery {
    page: Option<usize>,
}

async fn syncs(State(shared): State<Arc<Shared>>, Query(q): Query<PageQuery>) -> Response {
    let s = snapshot(&shared, false).await;
    let page_no = q.page.unwrap_or(1).max(1);
    let all = shared
        .events
        .newest(page_no * pages::PAGE_SIZE + 1, Some("sync"))
        .unwrap_or_default();
    let more = all.len() > page_no * pages::PAGE_SIZE;
    let shown: Vec<Event> = all
        .into_iter()
        .skip((page_no - 1) * pages::PAGE_SIZE)
        .take(pages::PAGE_SIZE)
        .collect();
    page(pages::syncs(&s, &shown, page_no, more))
}

/// A plan and its executions from the state store, if it was ever applied.
pub(crate) fn plan_view(shared: &Shared, plan_id: &str) -> Option<pages::PlanView> {
    let store = shared.state_store().ok()?;
    let records: Vec<reconciler::state::PlanRecord> = store
        .executions()
        .ok()?
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r.plan.get("plan_id").and_then(|p| p.as_str()) == Some(plan_id))
        .collect();
    let plan: reconciler::plan::Plan =
        serde_json::from_value(records.first()?.plan.clone()).ok()?;
    let text = reconciler::render::plan_text(&plan, false);
    let executions = records
        .into_iter()
        .map(|r| {
            let journal = store.journal_of(&r.execution_id).unwrap_or_default();
            (r, journal)
        })
        .collect();
    Some(pages::PlanView {
        plan,
        text,
        executions,
    })
}

async fn sync(State(shared): State<Arc<Shared>>, Path(seq): Path<u64>) -> Response {
    let s = snapshot(&shared, false).await;
    let found = shared
        .events
        .newest(crate::events::KEEP as usize, Some("sync"))
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.seq == seq);
    let Some(e) = found else {
        return not_found(&format!(
            "No sync event {seq} (the newest 20,000 events are kept)."
        ));
    };
    let plan = e.plan_id.as_deref().and_then(|p| plan_view(&shared, p));
    page(pages::sync(&s, &e, plan.as_ref()))
}

async fn plan(State(shared): State<Arc<Shared>>, Path(plan_id): Path<String>) -> Response {
    let s = snapshot(&shared, false).await;
    match plan_view(&shared, &plan_id) {
        Some(p) => page(pages::plan(&s, &p)),
        None => not_found(&format!(
            "No execution of plan {plan_id} in the state store (a plan that was never applied is not kept)."
        )),
    }
}

/// The audit log's verification and newest entries.
pub(crate) fn audit_view(shared: &Shared, newest: usize) -> pages::AuditView {
    let store = match shared.state_store() {
        Ok(s) => s,
        Err(e) => {
            return pages::AuditView {
                verified: Err(e),
                entries: vec![],
            };
        }
    };
    let key = shared.signer.identity().public_key();
    let verified = match store.audit_records() {
        Ok(records) => reconciler::audit::verify(&records, &key)
            .map(|s| {
                format!(
                    "{} entries ({} before the chain), head {} {}",
                    s.entries,
                    s.unchained,
                    s.head_seq,
                    data::short(&s.head_hash)
                )
            })
            .map_err(|b| format!("entry {}: {}", b.seq, b.problem)),
        Err(e) => Err(e.to_string()),
    };
    let entries: Vec<(usize, reconciler::state::AuditEntry)> = store
        .audit_log()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .rev()
        .take(newest)
        .collect();
    pages::AuditView { verified, entries }
}

async fn audit_entry(State(shared): State<Arc<Shared>>, Path(index): Path<usize>) -> Response {
    let entry = shared
        .state_store()
        .ok()
        .and_then(|store| store.audit_log().ok())
        .and_then(|mut log| (index < log.len()).then(|| log.swap_remove(index)));
    match entry {
        Some(e) => page(pages::audit_entry(index, &e, reconciler::state::now_ms())),
        None => not_found(&format!("No audit entry {index}.")),
    }
}

async fn events(
    State(shared): State<Arc<Shared>>,
    Query(f): Query<pages::EventFilter>,
) -> Response {
    let s = snapshot(&shared, false).await;
    let kind = (!f.kind.is_empty()).then_some(f.kind.as_str());
    let shown: Vec<Event> = shared
        .events
        .newest_where(usize::MAX, pages::PAGE_SIZE, kind, |e| f.admits(e))
        .unwrap_or_default();
    let audit = audit_view(&shared, 20);
    page(pages::events(&s, &f, &shown, &audit))
}

/// The dependency graph of `model` as SVG, with its vertex and wave counts.
pub fn graph_svg(model: &compiler::Model) -> (String, usize, usize) {
    let placement = reconciler::desired::place(model, None);
    let g = compiler::place::build_graph(model, &placement);
    (graph::svg(&g), g.nodes.len(), g.waves.len())
}

/// The graph of the applied commit, made once per commit: it places every VM
/// and lays out every object (282-439 ms a load at 10,000 VMs).
type Graph = Arc<(String, usize, usize)>;
static GRAPH: std::sync::Mutex<Option<(String, Graph)>> = std::sync::Mutex::new(None);

async fn graph_page(State(shared): State<Arc<Shared>>) -> Response {
    let s = snapshot(&shared, false).await;
    let m = match (&s.applied, s.model()) {
        (Some(applied), Some(model)) => {
            let kept = GRAPH
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|(commit, _)| *commit == applied.commit)
                .map(|(_, g)| g.clone());
            let graph = match kept {
                Some(g) => g,
                None => {
                    let g: Graph = Arc::new(graph_svg(model));
                    *GRAPH.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((applied.commit.clone(), g.clone()));
                    g
                }
            };
            let (svg, n, w) = &*graph;
            pages::graph(Some(svg), *n, *w)
        }
        _ => pages::graph(None, 0, 0),
    };
    page(m)
}

async fn tenants(State(shared): State<Arc<Shared>>) -> Response {
    page(pages::tenants(&snapshot(&shared, false).await))
}

/// VM and node states for the live updates: VM → state word, node → state. Every
/// open page's stream shares one observation per tick.
pub(crate) async fn live_states(shared: &Shared) -> Option<serde_json::Value> {
    shared
        .live_view
        .get(LIVE_OBSERVE / 2, || observe_live_states(shared))
        .await
}

async fn observe_live_states(shared: &Shared) -> Option<serde_json::Value> {
    let model = shared.good.lock().expect("good lock").clone()?;
    let model = &model.model;
    // The shared observation: the worker's, the status's or another stream's.
    let observation = shared.observation(model, LIVE_OBSERVE / 2).await;
    let observed = &observation.observed;
    let mut vms = serde_json::Map::new();
    for vm in &model.vms {
        vms.insert(vm.name.clone(), "pending".into());
    }
    let rank = |s: &str| match s {
        "running" => 4,
        "crashed" => 3,
        "pending" => 2,
        "stopped" => 1,
        _ => 0,
    };
    let mut nodes = serde_json::Map::new();
    for (node, answer) in &observed.nodes {
        match answer {
            reconciler::observe::NodeObservation::Reachable { vms: seen, .. } => {
                for (name, vm) in seen {
                    let word = serde_json::to_value(vm)
                        .ok()
                        .and_then(|v| v["state"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| "unknown".into());
                    let better = vms
                        .get(name)
                        .and_then(|w| w.as_str())
                        .is_none_or(|old| old == "pending" || rank(&word) > rank(old));
                    if better {
                        vms.insert(name.clone(), word.into());
                    }
                }
            }
            reconciler::observe::NodeObservation::Unreachable { .. } => {
                nodes.insert(node.clone(), "unreachable".into());
            }
        }
    }
    for (node, state) in shared.leases.node_states(model) {
        nodes.entry(node).or_insert_with(|| state.into());
    }
    Some(serde_json::json!({"vms": vms, "nodes": nodes}))
}

/// How often the live stream observes the nodes.
const LIVE_OBSERVE: Duration = Duration::from_millis(500);
/// How often it looks for new events.
const LIVE_EVENTS: Duration = Duration::from_millis(100);

struct Live {
    shared: Arc<Shared>,
    last_seq: u64,
    last_states: Option<serde_json::Value>,
    next_observe: tokio::time::Instant,
    queue: std::collections::VecDeque<SseEvent>,
}

async fn live(State(shared): State<Arc<Shared>>) -> Response {
    let last_seq = shared
        .events
        .newest(1, None)
        .ok()
        .and_then(|e| e.first().map(|e| e.seq))
        .unwrap_or(0);
    let state = Live {
        shared,
        last_seq,
        last_states: None,
        next_observe: tokio::time::Instant::now(),
        queue: Default::default(),
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            let fresh: Vec<Event> = st
                .shared
                .events
                .newest(50, None)
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.seq > st.last_seq)
                .collect();
            if let Some(newest) = fresh.first() {
                st.last_seq = newest.seq;
                // Something happened: observe now rather than at the next tick.
                st.next_observe = tokio::time::Instant::now();
            }
            for e in fresh.iter().rev() {
                if let Ok(data) = serde_json::to_string(e) {
                    st.queue
                        .push_back(SseEvent::default().event("event").data(data));
                }
            }
            if tokio::time::Instant::now() >= st.next_observe {
                st.next_observe = tokio::time::Instant::now() + LIVE_OBSERVE;
                if let Some(states) = live_states(&st.shared).await
                    && st.last_states.as_ref() != Some(&states)
                {
                    st.queue
                        .push_back(SseEvent::default().event("states").data(states.to_string()));
                    st.last_states = Some(states);
                }
            }
            if st.queue.is_empty() {
                tokio::time::sleep(LIVE_EVENTS).await;
            }
        }
    });
    // A comment every second when nothing else was sent: a closed page is
    // noticed on that write and its stream (and its observations) end.
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(1)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_the_tokens_mac_of_its_expiry_and_ends() {
        let now = 1_000_000;
        let v = session_cookie("t0ken", now + 1000);
        assert!(session_valid("t0ken", &v, now));
        assert!(!session_valid("other", &v, now), "another token's session");
        assert!(!session_valid("t0ken", &v, now + 1000), "expired");
        let forged = session_cookie("t0ken", now + SESSION_MS * 2);
        assert!(!session_valid("t0ken", &forged, now), "too far ahead");
        let (exp, mac) = v.split_once('.').unwrap();
        let moved = format!("{}.{mac}", exp.parse::<u64>().unwrap() + 1);
        assert!(!session_valid("t0ken", &moved, now), "expiry changed");
        assert!(!session_valid("t0ken", "garbage", now));
    }

    #[test]
    fn the_cookie_or_the_bearer_token_signs_in() {
        let mut h = HeaderMap::new();
        assert!(!signed_in(&h, "tok", 5));
        h.insert(
            header::COOKIE,
            format!("a=b; {COOKIE}={}", session_cookie("tok", 10))
                .parse()
                .unwrap(),
        );
        assert!(signed_in(&h, "tok", 5));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert!(signed_in(&h, "tok", 5));
    }

    #[test]
    fn next_leads_only_to_this_console() {
        assert_eq!(local_path("/vms?state=running"), "/vms?state=running");
        assert_eq!(local_path("//evil.example/"), "/");
        assert_eq!(local_path("https://evil.example/"), "/");
        assert_eq!(local_path("/\\evil.example"), "/");
    }
}
