//! `cairn sync`: sync now, and approve a held plan.
//!
//! HTTP (behind the same Host/Origin/token guard as pause and resume):
//!
//! | route | what |
//! |---|---|
//! | `POST /api/v1/sync` (signed action `sync`) | sync the branch head now (a stalled or backing-off commit is tried again; nothing new: a drift check); answers when done |
//! | `GET /api/v1/plans` | the plan held for approval (`{"plans": [...]}`, at most one: the head's) |
//! | `POST /api/v1/plans/PLAN_ID/approve` (signed action `approve`, bound to PLAN_ID) | carry out the held plan, only if the head still plans to PLAN_ID (409 otherwise) |
//!
//! The worker does the work: a request waits in `Shared::requests`, the worker
//! takes it at the top of its loop and answers once the sync (or drift check)
//! is done, so the answer is the sync's result.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::Shared;
use crate::control;

/// What `cairn sync` asks of the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// Sync the branch head now.
    Sync,
    /// Carry out this held plan, if the head still plans to it.
    Approve(String),
}

/// A request from the HTTP interface, answered when the worker is done.
#[derive(Debug)]
pub struct Request {
    /// What.
    pub ask: Ask,
    /// The answer (`{result, commit?, plan_id?, reason?}`).
    pub reply: tokio::sync::oneshot::Sender<serde_json::Value>,
}

async fn ask(shared: &Shared, what: Ask) -> Result<serde_json::Value, Response> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    shared
        .requests
        .lock()
        .expect("requests lock")
        .push(Request { ask: what, reply });
    shared.wake.notify_one();
    answer.await.map_err(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping; nothing was done\n",
        )
            .into_response()
    })
}

/// `POST /api/v1/sync` (a signed action: `crate::actions`).
pub async fn sync_handler(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let binding = crate::actions::Binding::current(&shared);
    if let Err(refusal) = crate::actions::authorize(&shared, "sync", &body, &binding) {
        return refusal.into_response();
    }
    match ask(&shared, Ask::Sync).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(r) => r,
    }
}

/// `GET /api/v1/plans`.
pub async fn plans_handler(State(shared): State<Arc<Shared>>) -> Response {
    let held = crate::replicas::held_plan(&shared);
    axum::Json(json!({"plans": held.into_iter().collect::<Vec<_>>()})).into_response()
}

/// `POST /api/v1/plans/PLAN_ID/approve` (a signed action bound to PLAN_ID).
pub async fn approve_handler(
    State(shared): State<Arc<Shared>>,
    UrlPath(plan_id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let held = crate::replicas::held_plan(&shared);
    let Some(held) = held else {
        return conflict(format!(
            "no plan is held, so plan {plan_id} was not carried out (`cairn sync` syncs the branch head now)"
        ));
    };
    if held.plan_id != plan_id {
        return conflict(format!(
            "plan changed: plan {plan_id} is not the plan held now; commit {} is held with plan {} — review it and approve that id",
            &held.commit[..held.commit.len().min(12)],
            held.plan_id
        ));
    }
    let binding = crate::actions::Binding {
        plan_id: Some(plan_id.clone()),
        ..crate::actions::Binding::current(&shared)
    };
    if let Err(refusal) = crate::actions::authorize(&shared, "approve", &body, &binding) {
        return refusal.into_response();
    }
    match ask(&shared, Ask::Approve(plan_id.clone())).await {
        Ok(v) => {
            let carried_out = v["plan_id"].as_str() == Some(plan_id.as_str())
                && matches!(
                    v["result"].as_str(),
                    Some("succeeded" | "partial" | "failed")
                );
            if carried_out {
                axum::Json(v).into_response()
            } else {
                (StatusCode::CONFLICT, axum::Json(v)).into_response()
            }
        }
        Err(r) => r,
    }
}

fn conflict(reason: String) -> Response {
    (
        StatusCode::CONFLICT,
        axum::Json(json!({"result": "refused", "reason": reason})),
    )
        .into_response()
}

/// `cairn sync [--controller URL] [--approve PLAN_ID] [--key KEY]` against the
/// controller of `data_dir` (or `url`), an action signed by `key` (or git's
/// `user.signingkey`); prints the outcome; the exit code (0: applied or
/// nothing to do, 1: held, refused or failed, 2: no controller, not signed or
/// refused as unsigned).
pub fn sync_command(
    data_dir: &Path,
    url: Option<&str>,
    approve: Option<&str>,
    key: Option<&Path>,
) -> u8 {
    let Some((url, token)) = control::status_endpoint(data_dir, url) else {
        eprintln!(
            "error: no cairn controller runs for {} (pass --controller URL, or --data-dir DIR of a running controller)",
            data_dir.display()
        );
        return 2;
    };
    let path = match approve {
        Some(id) => {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                eprintln!(
                    "error: `{id}` is not a plan id (16 hex digits, as `cairn status` and `GET /api/v1/plans` show)"
                );
                return 2;
            }
            format!("/api/v1/plans/{id}/approve")
        }
        None => "/api/v1/sync".to_owned(),
    };
    let action = crate::actions::Request {
        action: if approve.is_some() { "approve" } else { "sync" },
        path: &path,
        plan_id: approve,
    };
    let answer = match crate::actions::perform(
        &url,
        token.as_deref(),
        action,
        key,
        Duration::from_secs(900),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&answer.body) else {
        eprintln!(
            "error: the controller at {url} answered {}: {}",
            answer.status,
            answer.body.trim()
        );
        return 2;
    };
    let result = v["result"].as_str().unwrap_or("unknown");
    let commit = v["commit"]
        .as_str()
        .map(|c| format!(" commit {}", &c[..c.len().min(12)]))
        .unwrap_or_default();
    let plan = v["plan_id"]
        .as_str()
        .map(|p| format!(" (plan {p})"))
        .unwrap_or_default();
    println!("sync{commit}: {result}{plan}");
    if let Some(reason) = v["reason"].as_str() {
        println!("  {reason}");
    }
    let ok = answer.status == 200 && matches!(result, "succeeded" | "partial" | "up-to-date");
    if ok { 0 } else { 1 }
}
