//! Signed, single-use actions: every request that changes something (pause,
//! resume, and sync/approve) carries a document signed with an operator's SSH
//! key, because loopback is no security boundary (any local user, or a web page
//! through CSRF or DNS rebinding, can reach 127.0.0.1) and the bearer token is
//! a file that leaks. The token stays required too.
//!
//! The exchange:
//!
//! 1. `GET /api/v1/actions/challenge` → [`Challenge`]: a fresh nonce (256
//!    random bits, recorded in `events.redb`, valid [`CHALLENGE_TTL`]) and what
//!    the action will be bound to ([`Binding`]: the applied commit, the digest
//!    of the controller's last observation of the nodes, the held plan when the
//!    action approves one).
//! 2. The client writes an [`ActionDocument`] (the action, the nonce, the
//!    binding, an expiry) as one line of JSON, signs it with
//!    `ssh-keygen -Y sign -n cairn-action -f KEY` (the tooling operators sign
//!    commits with; a public key file signs through ssh-agent), and POSTs
//!    [`SignedAction`] `{document, signature}` to the action's route.
//! 3. [`authorize`] checks, in this order: the SSHSIG over the document's exact
//!    bytes, in namespace [`NAMESPACE`]; that its key is a platform key (a line
//!    of `--trusted-keys` valid for that namespace); that the document names
//!    this action and has not expired; that the nonce was issued here, is
//!    unexpired and unused; that the binding still holds (else 409: "the
//!    cluster changed since you asked; run again"); then it marks the nonce
//!    used, in the same redb transaction as the last check, so a document works
//!    once, across restarts too.
//!
//! The handler then acts and records the signer ([`Authorized::audit`] in the
//! state store's audit log, and in its event).
//!
//! Tenant keys: a document may name a `tenant`; the actions that belong to a
//! tenant will accept that tenant's keys for it. No action is a tenant's yet,
//! so a document naming a tenant is refused, rather than judged by platform
//! keys.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::events::{Event, NonceRecord};

/// The SSHSIG namespace of action documents (`ssh-keygen -Y sign -n`).
pub const NAMESPACE: &str = "cairn-action";

/// The format tag of [`ActionDocument`].
pub const FORMAT: &str = "cairn-action/v1";

/// How long a challenge's nonce may be used.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(300);

/// What an action is bound to: it is refused when any of these changed
/// between the challenge and the action.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The commit the controller applied last.
    pub commit: Option<String>,
    /// The digest of the controller's last observation of the nodes
    /// (`reconciler::observe::Observed::digest`).
    pub observed_digest: Option<String>,
    /// The plan or execution the action approves, when it approves one.
    pub plan_id: Option<String>,
}

impl Binding {
    /// What the controller's actions are bound to now.
    pub fn current(shared: &Shared) -> Binding {
        let view = shared.view.lock().expect("view lock");
        Binding {
            commit: view.revision.clone(),
            observed_digest: view.observed_digest.clone(),
            plan_id: None,
        }
    }

    /// The first field that differs from `now`, as `(name, signed, now)`.
    fn changed(&self, now: &Binding) -> Option<(&'static str, String, String)> {
        let show = |v: &Option<String>| {
            v.as_deref()
                .map(|s| s[..s.len().min(12)].to_owned())
                .unwrap_or_else(|| "none".to_owned())
        };
        [
            ("applied commit", &self.commit, &now.commit),
            (
                "observed digest",
                &self.observed_digest,
                &now.observed_digest,
            ),
            ("plan", &self.plan_id, &now.plan_id),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b)
        .map(|(name, a, b)| (name, show(a), show(b)))
    }
}

/// `GET /api/v1/actions/challenge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Use once, before `expires_unix`.
    pub nonce: String,
    /// What the action will be bound to.
    #[serde(flatten)]
    pub binding: Binding,
    /// Unix seconds after which the nonce is refused.
    pub expires_unix: u64,
    /// The SSHSIG namespace to sign in.
    pub namespace: String,
}

/// The document an operator signs (one line of JSON, fields in this order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionDocument {
    /// [`FORMAT`].
    pub format: String,
    /// `pause`, `resume`, `sync`, `approve`.
    pub action: String,
    /// The challenge's nonce.
    pub nonce: String,
    /// [`Binding::commit`].
    pub commit: Option<String>,
    /// [`Binding::observed_digest`].
    pub observed_digest: Option<String>,
    /// [`Binding::plan_id`].
    pub plan_id: Option<String>,
    /// The tenant whose action it is (none: a platform action).
    pub tenant: Option<String>,
    /// Unix seconds after which the document is refused.
    pub expires_unix: u64,
}

impl ActionDocument {
    /// The document for `action` from a challenge.
    pub fn new(action: &str, challenge: &Challenge) -> ActionDocument {
        ActionDocument {
            format: FORMAT.to_owned(),
            action: action.to_owned(),
            nonce: challenge.nonce.clone(),
            commit: challenge.binding.commit.clone(),
            observed_digest: challenge.binding.observed_digest.clone(),
            plan_id: challenge.binding.plan_id.clone(),
            tenant: None,
            expires_unix: challenge.expires_unix,
        }
    }

    /// What it is bound to.
    pub fn binding(&self) -> Binding {
        Binding {
            commit: self.commit.clone(),
            observed_digest: self.observed_digest.clone(),
            plan_id: self.plan_id.clone(),
        }
    }

    /// The bytes signed: one line of JSON and a newline.
    pub fn text(&self) -> String {
        serde_json::to_string(self).expect("documents serialize") + "\n"
    }
}

/// The body of an action's POST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAction {
    /// [`ActionDocument::text`], exactly as signed.
    pub document: String,
    /// The armored SSHSIG of `document` (`-----BEGIN SSH SIGNATURE-----`).
    pub signature: String,
}

/// An action that passed [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// The document.
    pub document: ActionDocument,
    /// Principals of the trusted-keys line that matched.
    pub principals: Vec<String>,
    /// `SHA256:…` of the key.
    pub fingerprint: String,
}

impl Authorized {
    /// `ops@example.com (SHA256:…)`.
    pub fn signer(&self) -> String {
        format!("{} ({})", self.principals.join(", "), self.fingerprint)
    }

    /// What events and the audit log say of it.
    pub fn detail(&self) -> serde_json::Value {
        serde_json::json!({
            "action": self.document.action,
            "signer": self.signer(),
            "fingerprint": self.fingerprint,
            "nonce": self.document.nonce,
            "commit": self.document.commit,
            "observed_digest": self.document.observed_digest,
            "plan_id": self.document.plan_id,
        })
    }

    /// Appends `action-ACTION` with the signer to the state store's audit log
    /// (a failure is printed: the action is still taken, and its event names
    /// the signer).
    fn audit(&self, shared: &Shared) {
        use reconciler::state::StateStore as _;
        let written = shared.state_store().and_then(|store| {
            store
                .audit(&format!("action-{}", self.document.action), self.detail())
                .map_err(|e| e.to_string())
        });
        if let Err(e) = written {
            eprintln!(
                "warning: the {} by {} is not in the audit log: {e}",
                self.document.action,
                self.signer()
            );
        }
    }
}

/// Why an action was refused: an HTTP status and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400 (malformed), 403 (not signed, not trusted, not this action, nonce
    /// not usable), 409 (the cluster changed), 500.
    pub status: StatusCode,
    /// For people.
    pub reason: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, format!("{}\n", self.reason)).into_response()
    }
}

fn now_ms() -> u64 {
    reconciler::state::now_ms()
}

/// Issues a challenge (`GET /api/v1/actions/challenge`).
pub fn challenge(shared: &Shared, binding: Binding) -> Result<Challenge, Refusal> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let nonce = proto::auth::to_hex(&bytes);
    let issued = now_ms();
    let expires = issued + CHALLENGE_TTL.as_millis() as u64;
    shared
        .events
        .issue_nonce(
            &nonce,
            &NonceRecord {
                issued_unix_ms: issued,
                expires_unix_ms: expires,
                used_unix_ms: None,
                used_by: None,
            },
        )
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Challenge {
        nonce,
        binding,
        expires_unix: expires / 1000,
        namespace: NAMESPACE.to_owned(),
    })
}

const HOW: &str = "get a challenge from GET /api/v1/actions/challenge, sign the action document with `ssh-keygen -Y sign -n cairn-action -f KEY` and POST {document, signature} (`cairn controller pause|resume --key KEY` does all of this)";

/// Checks a signed action for `action` against `binding` (what it must still
/// be bound to), and uses its nonce. An authorized action is appended to the
/// audit log (`action-ACTION`, with its signer) before the handler acts; a
/// refusal is recorded as an `action refused` event.
pub fn authorize(
    shared: &Shared,
    action: &str,
    body: &[u8],
    binding: &Binding,
) -> Result<Authorized, Refusal> {
    let outcome = check(shared, action, body, binding);
    match &outcome {
        Ok(authorized) => authorized.audit(shared),
        Err(r) => shared.record(vec![
            Event::new("action", "refused")
                .object(action)
                .reason(r.reason.clone()),
        ]),
    }
    outcome
}

fn check(
    shared: &Shared,
    action: &str,
    body: &[u8],
    binding: &Binding,
) -> Result<Authorized, Refusal> {
    let forbidden = |reason: String| Refusal::new(StatusCode::FORBIDDEN, reason);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(forbidden(format!(
            "`{action}` changes the cluster, so it must be signed by a platform key and was refused unsigned: {HOW}"
        )));
    }
    let signed: SignedAction = serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not a signed action {{document, signature}} ({e}): {HOW}"),
        )
    })?;
    let sig = policy::sshsig::SshSig::parse_armored(&signed.signature)
        .map_err(|e| forbidden(format!("`{action}` refused: {e}: {HOW}")))?;
    sig.verify(signed.document.as_bytes(), NAMESPACE)
        .map_err(|e| forbidden(format!("`{action}` refused: {e}")))?;
    let keys_path = shared.config.trusted_keys_path();
    let signers = crate::trust::read_signers(&keys_path)
        .map_err(|e| forbidden(format!("`{action}` refused: {e}")))?;
    let now = now_ms();
    let trusted = signers
        .check(&sig, NAMESPACE, (now / 1000) as i64)
        .map_err(|e| {
            let why = match e {
                policy::sshsig::SigError::Untrusted { fingerprint } => format!(
                    "signed by key {fingerprint}, which is not a platform key: the keys that may sign actions are the lines of {} valid for namespace `{NAMESPACE}` (add `EMAIL ssh-ed25519 PUBLIC-KEY` for it; `ssh-keygen -lf KEY.pub` shows a key's fingerprint)",
                    keys_path.display()
                ),
                other => other.to_string(),
            };
            forbidden(format!("`{action}` refused: {why}"))
        })?;
    let signer = format!(
        "{} ({})",
        trusted.principals.join(", "),
        trusted.fingerprint
    );
    let document: ActionDocument = serde_json::from_str(&signed.document).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the signed document is not a {FORMAT} document: {e}"),
        )
    })?;
    if document.format != FORMAT {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the signed document is `{}`, this controller reads `{FORMAT}`",
                document.format
            ),
        ));
    }
    if document.action != action {
        return Err(forbidden(format!(
            "the document {signer} signed is for `{}`, not `{action}`",
            document.action
        )));
    }
    if let Some(tenant) = &document.tenant {
        return Err(forbidden(format!(
            "`{action}` is a platform action; the document names tenant `{tenant}`, and no tenant may take it"
        )));
    }
    if document.expires_unix * 1000 <= now {
        return Err(forbidden(format!(
            "the `{action}` document {signer} signed expired at Unix time {}; run the command again",
            document.expires_unix
        )));
    }
    let nonce_refusal = |found: Option<NonceRecord>| match found {
        None => forbidden(format!(
            "the nonce of the `{action}` document {signer} signed was not issued by this controller; run the command again"
        )),
        Some(r) if r.used_unix_ms.is_some() => forbidden(format!(
            "the `{action}` document {signer} signed was already used{}{}: every signed action works once; run the command again for a new one",
            r.used_unix_ms
                .map(|t| format!(" at {}", crate::events::rfc3339(t)))
                .unwrap_or_default(),
            r.used_by.map(|b| format!(" ({b})")).unwrap_or_default()
        )),
        Some(r) => forbidden(format!(
            "the challenge of the `{action}` document {signer} signed expired at {}; run the command again",
            crate::events::rfc3339(r.expires_unix_ms)
        )),
    };
    let internal = |e: crate::events::EventError| {
        Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    };
    match shared.events.nonce(&document.nonce).map_err(internal)? {
        Some(r) if r.used_unix_ms.is_none() && r.expires_unix_ms > now => {}
        other => return Err(nonce_refusal(other)),
    }
    if let Some((what, signed_for, now_is)) = document.binding().changed(binding) {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            format!(
                "{CHANGED}: {signer} signed `{action}` for {what} {signed_for}, and it is now {now_is}; nothing was done; run the command again"
            ),
        ));
    }
    shared
        .events
        .use_nonce(&document.nonce, now, &format!("{action} by {signer}"))
        .map_err(internal)?
        .map_err(nonce_refusal)?;
    Ok(Authorized {
        document,
        principals: trusted.principals,
        fingerprint: trusted.fingerprint,
    })
}

/// `GET /api/v1/actions/challenge` (the HTTP handler).
pub(crate) async fn challenge_handler(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
) -> Response {
    let binding = Binding::current(&shared);
    match challenge(&shared, binding) {
        Ok(c) => axum::Json(c).into_response(),
        Err(r) => r.into_response(),
    }
}

// ---- The client side (`cairn controller pause|resume`, `cairn sync`). ----

/// The key that signs actions: `--key FILE`, else git's `user.signingkey` (a
/// file, or a literal `ssh-ed25519 …`/`key::…` public key whose private half
/// ssh-agent holds; written to a temporary file for ssh-keygen). `Err` says
/// what to pass.
pub fn signing_key(flag: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = flag {
        if !path.exists() {
            return Err(format!(
                "--key {}: no such file (an SSH private key, or a public key whose private half ssh-agent holds)",
                path.display()
            ));
        }
        return Ok(path.to_owned());
    }
    let configured = std::process::Command::new("git")
        .args(["config", "--get", "user.signingkey"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty());
    let Some(value) = configured else {
        return Err(format!(
            "actions on a running controller are signed: pass --key FILE (an SSH key listed in the controller's trusted keys for namespace `{NAMESPACE}`), or set git's user.signingkey"
        ));
    };
    let literal = value.strip_prefix("key::").unwrap_or(&value);
    if literal.starts_with("ssh-") || literal.starts_with("ecdsa-") || literal.starts_with("sk-") {
        let path =
            std::env::temp_dir().join(format!("cairn-action-key-{}.pub", std::process::id()));
        std::fs::write(&path, format!("{literal}\n"))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        return Ok(path);
    }
    let path = match value.strip_prefix("~/") {
        Some(rest) => PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(rest),
        None => PathBuf::from(&value),
    };
    if !path.exists() {
        return Err(format!(
            "git's user.signingkey is {value}, which is not a file; pass --key FILE"
        ));
    }
    Ok(path)
}

/// Signs `document` with `key` through `ssh-keygen -Y sign -n cairn-action`
/// (a passphrase is asked on the terminal; a public key file signs with ssh-agent).
pub fn sign(document: &str, key: &Path) -> Result<String, String> {
    let mut child = std::process::Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", NAMESPACE, "-f"])
        .arg(key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ssh-keygen to sign the action: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(document.as_bytes())
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    let signature = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !signature.contains("BEGIN SSH SIGNATURE") {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("Signing data"))
            .collect();
        return Err(format!(
            "`ssh-keygen -Y sign -n {NAMESPACE} -f {}` did not sign the action: {}",
            key.display(),
            said.join("; ")
        ));
    }
    Ok(signature)
}

/// An action as the client sends it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `pause`, `resume`, `sync`, `approve`.
    pub action: &'a str,
    /// Where it is POSTed (`/api/v1/pause`).
    pub path: &'a str,
    /// The plan the action approves (`cairn sync --approve PLAN_ID`: the
    /// controller refuses it unless that plan is the one it holds).
    pub plan_id: Option<&'a str>,
}

/// The prefix of a 409 whose binding moved between challenge and action.
const CHANGED: &str = "the cluster changed since you asked";

/// How many times [`perform`] asks again when the cluster moved meanwhile.
const ATTEMPTS: usize = 3;

/// Asks the controller at `url` for a challenge, signs `request.action` with
/// `key` ([`signing_key`] of the `--key` flag) and POSTs it to
/// `request.path`. When the cluster moved between the challenge and the action
/// (409 "the cluster changed since you asked": a drift check observed
/// something else, a commit was applied), it asks and signs again, up to
/// [`ATTEMPTS`] times: the operator asked for this action now, and each
/// signature is still bound to the state it was made against (an approval
/// stays bound to the plan id the operator gave). The answer (any status) or
/// why it could not be sent.
pub fn perform(
    url: &str,
    token: Option<&str>,
    request: Request<'_>,
    key: Option<&Path>,
    timeout: Duration,
) -> Result<crate::control::Answer, String> {
    let key = signing_key(key)?;
    let mut attempt = 1;
    loop {
        let challenge = crate::control::request(
            url,
            "GET",
            "/api/v1/actions/challenge",
            token,
            Duration::from_secs(30),
        )?;
        if challenge.status != 200 {
            return Err(format!(
                "the controller at {url} gave no challenge ({}): {}",
                challenge.status,
                challenge.body.trim()
            ));
        }
        let challenge: Challenge = serde_json::from_str(&challenge.body)
            .map_err(|e| format!("the controller at {url} gave a bad challenge: {e}"))?;
        let mut document = ActionDocument::new(request.action, &challenge);
        if let Some(plan) = request.plan_id {
            document.plan_id = Some(plan.to_owned());
        }
        let document = document.text();
        let signature = sign(&document, &key)?;
        let body = serde_json::to_string(&SignedAction {
            document,
            signature,
        })
        .expect("signed actions serialize");
        let answer = crate::control::request_with_body(
            url,
            "POST",
            request.path,
            token,
            Some(&body),
            timeout,
        )?;
        if answer.status != 409 || !answer.body.starts_with(CHANGED) || attempt >= ATTEMPTS {
            return Ok(answer);
        }
        eprintln!("note: {}; signing again", answer.body.trim());
        attempt += 1;
    }
}

/// Asks the controller of `data_dir` (or at `url`) to carry out the signed `action`
/// at `path` and prints the `message` it answers: exit 0 done, 1 the controller
/// answered 404 (what was named is not there), 2 anything else (said on stderr).
pub fn command(
    data_dir: &std::path::Path,
    url: Option<&str>,
    action: &str,
    path: &str,
    key: Option<&std::path::Path>,
) -> u8 {
    let Some((url, token)) = crate::control::status_endpoint(data_dir, url) else {
        eprintln!(
            "error: no cairn controller runs for {} (pass --controller URL, or --data-dir DIR of a running controller)",
            data_dir.display()
        );
        return 2;
    };
    let request = Request {
        action,
        path,
        plan_id: None,
    };
    let answer = match perform(
        &url,
        token.as_deref(),
        request,
        key,
        std::time::Duration::from_secs(60),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    match (
        answer.status,
        serde_json::from_str::<serde_json::Value>(&answer.body),
    ) {
        (200, Ok(v)) => {
            println!("{}", v["message"].as_str().unwrap_or_default());
            0
        }
        (404, _) => {
            eprintln!("error: {}", answer.body.trim());
            1
        }
        (status, _) => {
            eprintln!(
                "error: the controller at {url} answered {status}: {}",
                answer.body.trim()
            );
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_names_the_first_field_that_changed() {
        let signed = Binding {
            commit: Some("a".repeat(40)),
            observed_digest: Some("d1".into()),
            plan_id: None,
        };
        assert_eq!(signed.changed(&signed.clone()), None);
        let now = Binding {
            observed_digest: Some("d2".into()),
            ..signed.clone()
        };
        assert_eq!(
            signed.changed(&now),
            Some(("observed digest", "d1".into(), "d2".into()))
        );
        let now = Binding {
            commit: None,
            ..signed.clone()
        };
        assert_eq!(
            signed.changed(&now),
            Some(("applied commit", "a".repeat(12), "none".into()))
        );
    }

    #[test]
    fn the_document_is_one_line_of_json_in_field_order_and_reads_back() {
        let c = Challenge {
            nonce: "n".into(),
            binding: Binding {
                commit: Some("c".into()),
                observed_digest: None,
                plan_id: None,
            },
            expires_unix: 7,
            namespace: NAMESPACE.into(),
        };
        let text = ActionDocument::new("pause", &c).text();
        assert_eq!(
            text,
            "{\"format\":\"cairn-action/v1\",\"action\":\"pause\",\"nonce\":\"n\",\"commit\":\"c\",\"observed_digest\":null,\"plan_id\":null,\"tenant\":null,\"expires_unix\":7}\n"
        );
        let back: ActionDocument = serde_json::from_str(&text).unwrap();
        assert_eq!(back, ActionDocument::new("pause", &c));
        assert!(serde_json::from_str::<ActionDocument>(&text.replace("}\n", ",\"x\":1}")).is_err());
    }
}
