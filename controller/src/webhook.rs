//! `POST /api/v1/webhook`: push events from GitHub, GitLab, Gitea and Forgejo.
//!
//! A webhook is only a hint to fetch now: a valid one wakes the fetcher (a
//! remote source) or the worker (a local one), and nothing in its body is
//! trusted. Its `ref`, when it names another branch, only lets the hint be
//! ignored (and fetching anyway would be harmless: every commit is verified
//! before it is applied). Each forge's own scheme authenticates it, against
//! the secret of `--webhook-secret FILE` (read at each request, so it can be
//! rotated without a restart; trailing newlines are not part of it):
//!
//! | forge | header | value |
//! |---|---|---|
//! | GitHub | `X-Hub-Signature-256` | `sha256=` + hex HMAC-SHA256 of the body |
//! | Gitea | `X-Gitea-Signature` | hex HMAC-SHA256 of the body |
//! | Forgejo | `X-Forgejo-Signature` | hex HMAC-SHA256 of the body |
//! | GitLab | `X-Gitlab-Token` | the secret itself |
//!
//! (Gitea and Forgejo also send `X-Hub-Signature-256`, which is taken when
//! their own header is missing.) The comparison is constant-time in every case.
//!
//! The route is outside the API's guard: forges cannot send the bearer token,
//! and they send the `Host` of the URL configured in the forge (a public name,
//! a reverse proxy's), not the listen address. Neither is needed here: the
//! HMAC is the authentication, the answer carries nothing secret, and the only
//! effect of a valid request is a fetch. A request with an `Origin` header is
//! refused (403): forges never send one, browsers always do on a cross-site
//! POST. A bad or missing signature is 401 and a `webhook refused` event with
//! the reason (at most [`BURST`] such events, then one per [`REFILL`], the
//! rest counted in the next one's detail, so a flood cannot fill the event log).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{KeyInit as _, Mac as _};
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

use crate::Shared;
use crate::events::Event;

/// Largest body read (GitHub caps push payloads at 25 MB).
pub const MAX_BODY: usize = 25 * 1024 * 1024;
/// Refusal events recorded at once before the rate limit applies.
pub const BURST: u32 = 10;
/// One more refusal event per this much time.
pub const REFILL: Duration = Duration::from_secs(6);

/// The forge a webhook says it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    /// GitHub (`X-GitHub-Event`, `X-Hub-Signature-256`).
    GitHub,
    /// GitLab (`X-Gitlab-Event`, `X-Gitlab-Token`).
    GitLab,
    /// Gitea (`X-Gitea-Event`, `X-Gitea-Signature`).
    Gitea,
    /// Forgejo (`X-Forgejo-Event`, `X-Forgejo-Signature`).
    Forgejo,
}

impl Forge {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Forge::GitHub => "GitHub",
            Forge::GitLab => "GitLab",
            Forge::Gitea => "Gitea",
            Forge::Forgejo => "Forgejo",
        }
    }

    fn event_header(self) -> &'static str {
        match self {
            Forge::GitHub => "x-github-event",
            Forge::GitLab => "x-gitlab-event",
            Forge::Gitea => "x-gitea-event",
            Forge::Forgejo => "x-forgejo-event",
        }
    }

    /// Whether its event header names a push to a branch or a tag.
    fn is_push(self, event: &str) -> bool {
        match self {
            Forge::GitLab => event == "Push Hook",
            _ => event == "push",
        }
    }
}

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The hex HMAC-SHA256 of `body` keyed by `secret`: what GitHub (after
/// `sha256=`), Gitea and Forgejo send.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks a webhook's authentication: which forge sent it, or why it is refused.
pub fn verify(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<Forge, String> {
    let named = [Forge::Forgejo, Forge::Gitea, Forge::GitLab, Forge::GitHub]
        .into_iter()
        .find(|f| headers.contains_key(f.event_header()));
    if named == Some(Forge::GitLab) || headers.contains_key("x-gitlab-token") {
        let Some(given) = headers.get("x-gitlab-token") else {
            return Err("a GitLab event without X-Gitlab-Token (set the webhook's secret token to the controller's --webhook-secret)".to_owned());
        };
        // Digests of equal length: the comparison leaks neither content nor length.
        let (a, b) = (
            sha2::Sha256::digest(given.as_bytes()),
            sha2::Sha256::digest(secret),
        );
        return if bool::from(a.as_slice().ct_eq(b.as_slice())) {
            Ok(Forge::GitLab)
        } else {
            Err("X-Gitlab-Token is not the controller's --webhook-secret".to_owned())
        };
    }
    let (forge, header, value) = [
        (Forge::Forgejo, "X-Forgejo-Signature"),
        (Forge::Gitea, "X-Gitea-Signature"),
        (Forge::GitHub, "X-Hub-Signature-256"),
    ]
    .into_iter()
    .find_map(|(forge, h)| text(headers, h).map(|v| (named.unwrap_or(forge), h, v)))
    .ok_or_else(|| {
        if headers.contains_key("x-hub-signature") {
            "only X-Hub-Signature (HMAC-SHA1) is given: the controller takes X-Hub-Signature-256 (HMAC-SHA256)".to_owned()
        } else {
            "no signature: none of X-Hub-Signature-256 (GitHub), X-Gitea-Signature (Gitea), X-Forgejo-Signature (Forgejo), X-Gitlab-Token (GitLab); set the webhook's secret to the controller's --webhook-secret".to_owned()
        }
    })?;
    let digest = if header == "X-Hub-Signature-256" {
        value
            .strip_prefix("sha256=")
            .ok_or_else(|| format!("{header} is not `sha256=` followed by 64 hex digits"))?
    } else {
        value
    };
    let signature = hex(digest.trim())
        .filter(|s| s.len() == 32)
        .ok_or_else(|| format!("{header} is not 64 hex digits"))?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
        .map_err(|e| format!("the webhook secret: {e}"))?;
    mac.update(body);
    mac.verify_slice(&signature).map_err(|_| {
        format!(
            "{header} does not match the body ({} signature made with another secret than --webhook-secret, or a body changed on the way)",
            forge.name()
        )
    })?;
    Ok(forge)
}

/// The rate limit of refusal events (a token bucket).
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<(f64, Instant, u64)>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            state: Mutex::new((f64::from(BURST), Instant::now(), 0)),
        }
    }
}

impl Limiter {
    /// Whether an event may be recorded now, and how many were suppressed before it.
    fn admit(&self) -> Option<u64> {
        let mut s = self.state.lock().expect("limiter lock");
        let now = Instant::now();
        let tokens = (s.0 + now.duration_since(s.1).as_secs_f64() / REFILL.as_secs_f64())
            .min(f64::from(BURST));
        s.1 = now;
        if tokens >= 1.0 {
            s.0 = tokens - 1.0;
            Some(std::mem::take(&mut s.2))
        } else {
            s.0 = tokens;
            s.2 += 1;
            None
        }
    }
}

/// The secret of `--webhook-secret FILE` (trailing newlines are not part of it).
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let mut secret = std::fs::read(path)
        .map_err(|e| format!("cannot read --webhook-secret {}: {e}", path.display()))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.is_empty() {
        return Err(format!(
            "--webhook-secret {} is empty (write the secret given to the forge's webhook)",
            path.display()
        ));
    }
    Ok(secret)
}

/// At start: the secret file can be read and is not empty; its absolute path.
/// A file others can read is allowed (secrets mounted by an orchestrator
/// often are), with a warning.
pub fn check_secret(path: &std::path::Path) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    read_secret(&path)?;
    if let Ok(meta) = std::fs::metadata(&path)
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "warning: --webhook-secret {} can be read by other users (chmod 600 it)",
            path.display()
        );
    }
    Ok(path)
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// A valid webhook that asks for nothing (another event or branch, a ping).
fn ignored(shared: &Shared, status: StatusCode, body: serde_json::Value) -> Response {
    shared
        .metrics
        .webhooks
        .with_label_values(&["ignored"])
        .inc();
    answer(status, body)
}

fn refused(shared: &Shared, status: StatusCode, reason: String) -> Response {
    shared
        .metrics
        .webhooks
        .with_label_values(&["refused"])
        .inc();
    if let Some(suppressed) = shared.webhooks.admit() {
        let mut e = Event::new("webhook", "refused").reason(reason.clone());
        if suppressed > 0 {
            e = e.detail(serde_json::json!({"suppressed_before": suppressed}));
        }
        shared.record(vec![e]);
    }
    answer(
        status,
        serde_json::json!({"accepted": false, "reason": reason}),
    )
}

/// The handler of `POST /api/v1/webhook`.
pub(crate) async fn receive(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if headers.contains_key(header::ORIGIN) {
        return refused(
            &shared,
            StatusCode::FORBIDDEN,
            "a webhook with an Origin header (sent by a browser, never by a forge)".to_owned(),
        );
    }
    let Some(path) = &shared.config.webhook_secret else {
        return answer(
            StatusCode::NOT_FOUND,
            serde_json::json!({"accepted": false, "reason": "webhooks are off: start the controller with --webhook-secret FILE"}),
        );
    };
    let secret = match read_secret(path) {
        Ok(s) => s,
        Err(e) => return refused(&shared, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let forge = match verify(&headers, &body, &secret) {
        Ok(f) => f,
        Err(reason) => return refused(&shared, StatusCode::UNAUTHORIZED, reason),
    };
    let event = text(&headers, forge.event_header()).unwrap_or("push");
    if event == "ping" {
        return ignored(
            &shared,
            StatusCode::OK,
            serde_json::json!({"accepted": true, "forge": forge.name(), "pong": true}),
        );
    }
    if !forge.is_push(event) {
        return ignored(
            &shared,
            StatusCode::ACCEPTED,
            serde_json::json!({"accepted": false, "forge": forge.name(), "reason": format!("{event:?} is not a push event: ignored")}),
        );
    }
    // The body is signed but still not trusted: its ref only lets a push to
    // another branch be ignored.
    let wanted = format!("refs/heads/{}", shared.config.branch);
    let pushed = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("ref").and_then(|r| r.as_str()).map(str::to_owned));
    if let Some(r) = &pushed
        && *r != wanted
    {
        return ignored(
            &shared,
            StatusCode::ACCEPTED,
            serde_json::json!({"accepted": false, "forge": forge.name(), "reason": format!("a push to {r}; the controller follows {wanted}")}),
        );
    }
    shared
        .metrics
        .webhooks
        .with_label_values(&["accepted"])
        .inc();
    if shared.config.remote.is_some() {
        shared.fetch.notify_one();
    } else {
        shared.wake.notify_one();
    }
    shared.record(vec![
        Event::new("webhook", "accepted")
            .object(forge.name())
            .reason(format!(
                "{} push to {}: fetching now",
                forge.name(),
                pushed.as_deref().unwrap_or(&wanted)
            )),
    ]);
    answer(
        StatusCode::ACCEPTED,
        serde_json::json!({"accepted": true, "forge": forge.name()}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/webhooks")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const SECRET: &[u8] = b"It's a Secret to Everybody";

    #[test]
    fn github_gives_its_own_example_signature() {
        // The example of GitHub's documentation ("Validating webhook deliveries").
        let h = headers(&[(
            "x-hub-signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17".into(),
        )]);
        assert_eq!(verify(&h, b"Hello, World!", SECRET), Ok(Forge::GitHub));
    }

    #[test]
    fn each_forge_is_checked_with_its_own_scheme_on_its_recorded_payload() {
        for (file, forge) in [
            ("github-push.json", Forge::GitHub),
            ("gitea-push.json", Forge::Gitea),
            ("forgejo-push.json", Forge::Forgejo),
            ("gitlab-push.json", Forge::GitLab),
        ] {
            let body = data(file);
            let sig = signature(SECRET, &body);
            let good = match forge {
                Forge::GitHub => headers(&[
                    ("x-github-event", "push".into()),
                    ("x-hub-signature-256", format!("sha256={sig}")),
                ]),
                Forge::Gitea => headers(&[
                    ("x-gitea-event", "push".into()),
                    ("x-gitea-signature", sig.clone()),
                    ("x-hub-signature-256", format!("sha256={sig}")),
                ]),
                Forge::Forgejo => headers(&[
                    ("x-forgejo-event", "push".into()),
                    ("x-gitea-event", "push".into()),
                    ("x-forgejo-signature", sig.to_uppercase()),
                    ("x-gitea-signature", sig.clone()),
                ]),
                Forge::GitLab => headers(&[
                    ("x-gitlab-event", "Push Hook".into()),
                    (
                        "x-gitlab-token",
                        String::from_utf8(SECRET.to_vec()).unwrap(),
                    ),
                ]),
            };
            assert_eq!(verify(&good, &body, SECRET), Ok(forge), "{file}");
            // The same delivery with a changed body, or checked with another secret.
            let mut changed = body.clone();
            changed.extend_from_slice(b" ");
            let err = verify(&good, &changed, SECRET);
            if forge == Forge::GitLab {
                // GitLab's token does not cover the body (its scheme).
                assert_eq!(err, Ok(Forge::GitLab));
            } else {
                assert!(
                    err.unwrap_err().contains("does not match the body"),
                    "{file}"
                );
            }
            assert!(verify(&good, &body, b"another secret").is_err(), "{file}");
            let payload: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(payload["ref"], "refs/heads/main", "{file}");
        }
    }

    #[test]
    fn missing_and_malformed_signatures_are_refused_saying_why() {
        let body = data("github-push.json");
        let sig = signature(SECRET, &body);
        for (header, value, why) in [
            ("x-github-event", "push".to_owned(), "no signature"),
            ("x-hub-signature", "sha1=00".to_owned(), "HMAC-SHA1"),
            ("x-hub-signature-256", sig.clone(), "sha256="),
            ("x-gitea-signature", sig[..62].to_owned(), "64 hex digits"),
            (
                "x-gitlab-event",
                "Push Hook".to_owned(),
                "without X-Gitlab-Token",
            ),
            (
                "x-gitlab-token",
                "It's a secret".to_owned(),
                "is not the controller's",
            ),
        ] {
            let err = verify(&headers(&[(header, value)]), &body, SECRET).unwrap_err();
            assert!(err.contains(why), "{header}: {err}");
        }
    }

    #[test]
    fn refusal_events_are_rate_limited() {
        let l = Limiter::default();
        for _ in 0..BURST {
            assert_eq!(l.admit(), Some(0));
        }
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        l.state.lock().unwrap().1 -= REFILL;
        assert_eq!(l.admit(), Some(2), "the suppressed ones are counted");
    }
}
