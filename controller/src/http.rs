//! The HTTP interface (axum, on `--listen`):
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 after the first observation of the nodes (503 before) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /api/v1/status` | the JSON of `cairn status` for the applied commit, plus `controller` |
//! | `GET /api/v1/events?limit=N&kind=K` | events, newest first |
//! | `GET /api/v1/actions/challenge` | a nonce and binding to sign an action with ([`crate::actions`]) |
//! | `POST /api/v1/pause`, `POST /api/v1/resume` | hand the cluster to manual apply and back (signed actions) |
//! | `POST /api/v1/sync`, `GET /api/v1/plans`, `POST /api/v1/plans/ID/approve` | sync now, held plans, approve one ([`crate::sync_api`]; signed actions `sync` and `approve`) |
//! | `POST /api/v1/nodes/NODE/revoke` | revoke a node's key ([`crate::node_keys`]; signed action `node-revoke:NODE`) |
//! | `POST /api/v1/nodes/NODE/maintenance/{on,off}` | a node in or out of maintenance ([`crate::maintenance`]; signed actions `maintenance-on:NODE`, `maintenance-off:NODE`) |
//! | `POST /api/v1/controller/key/rotate`, `POST /api/v1/controller/key/revoke/KEY` | rotate the controller key, revoke a key of its set ([`crate::keys`]; signed actions `controller-key-rotate`, `controller-key-revoke:KEY`) |
//! | `POST /api/v1/webhook` | a forge's push event: fetch now (HMAC, no token; [`crate::webhook`]) |
//!
//! Loopback is not a security boundary: every request must name the listen
//! address or localhost in its `Host` header (DNS rebinding), a browser's
//! `Origin` must be the same (CSRF), and `/api/*` needs the bearer token of
//! `DATA_DIR/controller.token` (0600).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::Shared;

/// Serves until `stop` turns true.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let app = router(shared);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/events", get(events))
        .route("/api/v1/usage", get(usage))
        .route(
            "/api/v1/actions/challenge",
            get(crate::actions::challenge_handler),
        )
        .route("/api/v1/pause", post(pause))
        .route("/api/v1/resume", post(resume))
        .route("/api/v1/sync", post(crate::sync_api::sync_handler))
        .route("/api/v1/plans", get(crate::sync_api::plans_handler))
        .route(
            "/api/v1/nodes/{node}/maintenance/{switch}",
            post(crate::maintenance::handler),
        )
        .route(
            "/api/v1/nodes/{node}/revoke",
            post(crate::node_keys::handler),
        )
        .route(
            "/api/v1/vms/{vm}/reboot",
            post(crate::vm_actions::reboot_handler),
        )
        .route(
            "/api/v1/vms/{vm}/console",
            post(crate::vm_actions::attach_handler),
        )
        .route(
            "/api/v1/console/{session}",
            get(crate::vm_actions::read_handler).delete(crate::vm_actions::detach_handler),
        )
        .route(
            "/api/v1/console/{session}/input",
            post(crate::vm_actions::input_handler),
        )
        .route(
            "/api/v1/controller/key/rotate",
            post(crate::keys::rotate_handler),
        )
        .route(
            "/api/v1/controller/key/revoke/{key}",
            post(crate::keys::revoke_handler),
        )
        .route(
            "/api/v1/plans/{plan_id}/approve",
            post(crate::sync_api::approve_handler),
        )
        // The web console (`crate::console`): its own session check inside.
        .merge(crate::console::router(shared.clone()))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), guard))
        // After the guard: forges send neither the token nor the listen
        // address as Host; the HMAC authenticates (crate::webhook).
        .route(
            "/api/v1/webhook",
            post(crate::webhook::receive).layer(axum::extract::DefaultBodyLimit::max(
                crate::webhook::MAX_BODY,
            )),
        )
        .with_state(shared)
}

/// Whether a `Host` header names the listen address or localhost on its port.
fn host_allowed(host: &str, listen: &std::net::SocketAddr) -> bool {
    let port = listen.port();
    let allowed = [
        listen.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ];
    allowed.iter().any(|a| a.eq_ignore_ascii_case(host))
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

async fn guard(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let listen = shared.address;
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, &listen) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "the Host header must be {listen} or localhost:{}",
                listen.port()
            ),
        );
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok()) {
        let bare = origin.trim_start_matches("http://");
        if !host_allowed(bare, &listen) {
            return refuse(StatusCode::FORBIDDEN, "cross-origin requests are refused");
        }
    }
    if request.uri().path().starts_with("/api/") && !authorized(headers, &shared.token) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required: `Authorization: Bearer $(cat DATA_DIR/controller.token)`",
        );
    }
    if request.uri().path().starts_with("/api/")
        && request.method() != axum::http::Method::GET
        && let Some(why) = crate::replicas::refusal(&shared)
    {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, &why);
    }
    next.run(request).await
}

/// Constant-time comparison of the bearer token.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.ready.load(Ordering::SeqCst) {
        "ready\n".into_response()
    } else {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the nodes have not been observed yet",
        )
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    crate::lease::node_metrics(&shared);
    let mut text = shared.metrics.encode();
    // The nodes' usage (per VM and per node against capacity) from their last answers.
    let good = shared.good.lock().expect("good lock").clone();
    if let Some(good) = good {
        text.push_str(&crate::usage_metrics::of_model(
            &good.model,
            &shared.nodes.usage().snapshot(),
        ));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The measured load of the running VMs (issue 20), what `cairn place --rebalance
/// --measured` weighs them by: `{"format_version": 1, "vms": {"db": {"cpu_cores":
/// 0.9, "resident_bytes": N}}}` from the nodes' answers, each CPU rate over a second
/// or more (`reconciler::usage::measured_load`, `RATE_WINDOW_MS`); a VM whose node
/// has not answered twice has no rate yet and is left out. The same JSON is a
/// `--usage FILE`.
async fn usage(State(shared): State<Arc<Shared>>) -> Response {
    let load = reconciler::usage::measured_load(&shared.nodes.usage().snapshot());
    axum::Json(serde_json::json!({
        "format_version": 1,
        "vms": load.vms,
    }))
    .into_response()
}

/// Observed now, always; the console's pages then show this answer.
async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let (value, observed_unix_ms) =
        crate::worker::status_answer(&shared, std::time::Duration::ZERO).await;
    let view = Arc::new(crate::console::StatusView::new(
        value,
        observed_unix_ms,
        crate::console::applied_commit(&shared),
    ));
    shared.status_view.put(view.clone());
    axum::Json(&view.answer).into_response()
}

/// `?limit=N&kind=K`.
#[derive(Debug, serde::Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
    kind: Option<String>,
}

async fn events(State(shared): State<Arc<Shared>>, Query(q): Query<EventsQuery>) -> Response {
    match shared
        .events
        .newest(q.limit.unwrap_or(200).min(10_000), q.kind.as_deref())
    {
        Ok(events) => axum::Json(events).into_response(),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn pause(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    set_paused(&shared, true, &body).await
}

async fn resume(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    set_paused(&shared, false, &body).await
}

/// A signed pause or resume ([`crate::actions::authorize`]).
async fn set_paused(shared: &Shared, paused: bool, body: &[u8]) -> Response {
    let action = if paused { "pause" } else { "resume" };
    let binding = crate::actions::Binding::current(shared);
    let signed = match crate::actions::authorize(shared, action, body, &binding) {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    match shared.set_paused(paused, &signed).await {
        Ok(()) => axum::Json(serde_json::json!({"paused": paused, "signer": signed.signer()}))
            .into_response(),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listen_address_and_localhost_are_allowed_hosts() {
        let listen: std::net::SocketAddr = "127.0.0.1:7400".parse().unwrap();
        for ok in [
            "127.0.0.1:7400",
            "localhost:7400",
            "LOCALHOST:7400",
            "[::1]:7400",
        ] {
            assert!(host_allowed(ok, &listen), "{ok}");
        }
        for bad in [
            "evil.example:7400",
            "127.0.0.1:7401",
            "localhost",
            "",
            "127.0.0.1",
        ] {
            assert!(!host_allowed(bad, &listen), "{bad}");
        }
    }

    #[test]
    fn the_token_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "abc"));
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert!(authorized(&h, "abc"));
        h.insert(header::AUTHORIZATION, "Bearer abd".parse().unwrap());
        assert!(!authorized(&h, "abc"));
        h.insert(header::AUTHORIZATION, "Bearer ab".parse().unwrap());
        assert!(!authorized(&h, "abc"));
    }
}
