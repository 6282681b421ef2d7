//! Notifications: events of chosen kinds sent to configured receivers, as a
//! generic JSON webhook or a Slack-compatible one (`{"text": ...}`).
//!
//! Receivers are operator configuration, not repository content (their URLs and
//! secrets must not be in the spec repository anyone with push access reads):
//! `cairn controller --notify FILE`, default `DATA_DIR/notify.kdl` (next to
//! the controller key and the API token), read when the controller starts
//! (absent: no notifications; malformed: the controller does not start,
//! naming the line):
//!
//! ```kdl
//! receiver "ops" {
//!     format "json"              // or "slack"
//!     url "http://127.0.0.1:9000/cairn"
//!     events "sync:failed" "held" "drift:found" "node:unreachable"
//!     secret-file "/etc/cairn/ops.secret"   // json only, optional
//! }
//! ```
//!
//! `events` lists `KIND` or `KIND:RESULT` of [`crate::events::Event`] (the
//! common ones: `sync:failed`, `sync:refused`, `held` (a plan held for approval;
//! `sync:held` also covers a paused controller), `drift:found`,
//! `node:unreachable`, `crash-loop`). The JSON format
//! posts `{"format_version": 1, "receiver", "repo", "branch", "event": EVENT}`
//! with `X-Cairn-Event: KIND:RESULT` and, with a secret, `X-Cairn-Signature:
//! sha256=HEX`, the HMAC-SHA256 of the body with the secret file's content
//! (trimmed), as forges sign their webhooks. Only `http://` URLs: cairn carries
//! no TLS stack (as for the node API), so an `https://` receiver (Slack itself)
//! is reached through a local relay; such a URL is refused when the file is read.
//!
//! Delivery never blocks the worker: [`Notifier::offer`] only puts the event in
//! each matching receiver's bounded queue ([`QUEUE`]); each receiver has its own
//! task that posts in order, with a 5 s timeout and up to [`ATTEMPTS`] tries
//! (1 s, 2 s, 4 s between), so a receiver that is down delays only itself. A
//! full queue drops the event. Sent, failed and dropped notifications are
//! counted in `/metrics` (`cairn_controller_notifications_total{receiver,result}`),
//! and a failure or drop is an event of kind `notify`, which is never notified
//! (no loop through a receiver that is down).

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::Shared;
use crate::events::Event;

/// The configuration file's name in the data directory.
pub const FILE: &str = "notify.kdl";
/// Events waiting per receiver; more are dropped (and counted).
pub const QUEUE: usize = 256;
/// Tries per notification.
pub const ATTEMPTS: u32 = 4;
/// The kind of the controller's own events about notifications (never notified).
pub const KIND: &str = "notify";

/// How a receiver wants its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The event as JSON, optionally HMAC-signed.
    Json,
    /// `{"text": "..."}`.
    Slack,
}

/// One receiver.
#[derive(Clone)]
pub struct Receiver {
    /// Its name (metrics, events).
    pub name: String,
    /// The format.
    pub format: Format,
    /// `http://HOST:PORT/PATH`.
    pub url: String,
    /// `KIND` or `KIND:RESULT` filters.
    pub events: Vec<String>,
    /// HMAC secret (json only).
    pub secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl Receiver {
    /// Whether it wants `event`.
    pub fn wants(&self, event: &Event) -> bool {
        event.kind != KIND
            && self.events.iter().any(|f| match f.split_once(':') {
                Some((kind, result)) => kind == event.kind && result == event.result,
                None => *f == event.kind,
            })
    }
}

/// Reads `file` (`--notify FILE`: it must exist), else `DATA_DIR/notify.kdl`
/// (absent: no receivers).
pub fn load(file: Option<&Path>, data_dir: &Path) -> Result<Vec<Receiver>, String> {
    let path = file.map_or_else(|| data_dir.join(FILE), Path::to_path_buf);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text, &path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.is_none() => Ok(vec![]),
        Err(e) => Err(format!("--notify: cannot read {}: {e}", path.display())),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses a notification file (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<Vec<Receiver>, String> {
    let doc = kdl::KdlDocument::parse(text).map_err(|e| {
        let line = e
            .diagnostics
            .first()
            .map(|d| line_of(text, d.span.offset()))
            .unwrap_or(1);
        format!("{}:{line}: not valid KDL: {e}", path.display())
    })?;
    let mut receivers: Vec<Receiver> = vec![];
    for node in doc.nodes() {
        let at = format!("{}:{}", path.display(), line_of(text, node.span().offset()));
        if node.name().value() != "receiver" {
            return Err(format!(
                "{at}: unknown node `{}`; the file holds `receiver \"NAME\" {{ ... }}` nodes",
                node.name().value()
            ));
        }
        let name = node
            .entries()
            .first()
            .and_then(|e| e.value().as_string())
            .ok_or_else(|| format!("{at}: a receiver needs a name: `receiver \"ops\" {{ ... }}`"))?
            .to_owned();
        if receivers.iter().any(|r| r.name == name) {
            return Err(format!("{at}: receiver `{name}` is defined twice"));
        }
        let (mut format, mut url, mut events, mut secret) = (None, None, vec![], None);
        for child in node.children().map(|c| c.nodes()).unwrap_or_default() {
            let at = format!(
                "{}:{}",
                path.display(),
                line_of(text, child.span().offset())
            );
            let strings: Vec<&str> = child
                .entries()
                .iter()
                .filter_map(|e| e.value().as_string())
                .collect();
            let one = || match strings.as_slice() {
                [s] => Ok(*s),
                _ => Err(format!("{at}: `{}` takes one string", child.name().value())),
            };
            match child.name().value() {
                "format" => {
                    format = Some(match one()? {
                        "json" => Format::Json,
                        "slack" => Format::Slack,
                        other => {
                            return Err(format!(
                                "{at}: format `{other}` is not known; use \"json\" or \"slack\""
                            ));
                        }
                    })
                }
                "url" => {
                    let u = one()?;
                    if split_url(u).is_none() {
                        return Err(format!(
                            "{at}: url `{u}` is not http://HOST:PORT/PATH{}",
                            if u.starts_with("https://") {
                                " (cairn has no TLS client: send to a local relay that forwards to the https:// receiver)"
                            } else {
                                ""
                            }
                        ));
                    }
                    url = Some(u.to_owned());
                }
                "events" if !strings.is_empty() => {
                    events = strings.iter().map(|s| (*s).to_owned()).collect();
                }
                "secret-file" => {
                    let file = PathBuf::from(one()?);
                    let bytes = std::fs::read_to_string(&file).map_err(|e| {
                        format!("{at}: cannot read secret file {}: {e}", file.display())
                    })?;
                    secret = Some(bytes.trim().as_bytes().to_vec());
                }
                other => {
                    return Err(format!(
                        "{at}: `{other}` is not a receiver setting; use format, url, events (one or more strings), secret-file"
                    ));
                }
            }
        }
        let format = format.ok_or_else(|| {
            format!("{at}: receiver `{name}` needs `format \"json\"` or `format \"slack\"`")
        })?;
        let url = url.ok_or_else(|| format!("{at}: receiver `{name}` needs a `url`"))?;
        if events.is_empty() {
            return Err(format!(
                "{at}: receiver `{name}` needs `events` (e.g. \"sync:failed\" \"drift:found\")"
            ));
        }
        if secret.is_some() && format == Format::Slack {
            return Err(format!(
                "{at}: receiver `{name}`: a secret signs the json format only"
            ));
        }
        receivers.push(Receiver {
            name,
            format,
            url,
            events,
            secret,
        });
    }
    Ok(receivers)
}

/// `http://HOST:PORT/PATH` → (`HOST:PORT`, `/PATH`).
fn split_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return None;
    }
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Some((authority, path.to_owned()))
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The body of a notification, and its extra headers.
pub fn message(
    receiver: &Receiver,
    repo: &str,
    branch: &str,
    event: &Event,
) -> (Vec<u8>, Vec<(String, String)>) {
    match receiver.format {
        Format::Slack => {
            let mut text = format!("cairn ({repo} {branch}): {} {}", event.kind, event.result);
            if let Some(object) = &event.object {
                text.push_str(&format!(" {object}"));
            }
            if let Some(commit) = &event.commit {
                text.push_str(&format!(" at commit {}", &commit[..commit.len().min(12)]));
            }
            if let Some(reason) = &event.reason {
                text.push_str(&format!(": {reason}"));
            }
            let body =
                serde_json::to_vec(&serde_json::json!({ "text": text })).expect("json serializes");
            (body, vec![])
        }
        Format::Json => {
            let body = serde_json::to_vec(&serde_json::json!({
                "format_version": 1,
                "receiver": receiver.name,
                "repo": repo,
                "branch": branch,
                "event": event,
            }))
            .expect("json serializes");
            let mut headers = vec![(
                "X-Cairn-Event".to_owned(),
                format!("{}:{}", event.kind, event.result),
            )];
            if let Some(secret) = &receiver.secret {
                headers.push((
                    "X-Cairn-Signature".to_owned(),
                    format!(
                        "sha256={}",
                        proto::auth::to_hex(&hmac_sha256(secret, &body))
                    ),
                ));
            }
            (body, headers)
        }
    }
}

/// One HTTP/1.1 POST; `Ok` on a 2xx answer.
async fn post(url: &str, body: &[u8], headers: &[(String, String)]) -> Result<(), String> {
    let (authority, path) = split_url(url).ok_or_else(|| format!("bad url {url}"))?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: cairn-controller\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(body).await.map_err(|e| e.to_string())?;
        let mut answer = vec![0u8; 512];
        let mut read = 0;
        while read < 12 {
            let n = stream
                .read(&mut answer[read..])
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            read += n;
        }
        let status_line = String::from_utf8_lossy(&answer[..read]);
        let code = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "no HTTP answer".to_owned())?;
        if (200..300).contains(&code) {
            Ok(())
        } else {
            Err(format!("answered HTTP {code}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer in 5 s".to_owned())?
}

/// The delay before try `n` (1-based, n ≥ 2): 1 s, 2 s, 4 s.
pub fn retry_delay(n: u32) -> Duration {
    Duration::from_secs(1 << (n.saturating_sub(2)).min(5))
}

/// Sends events to the receivers (cheap to share; see the module doc).
#[derive(Debug, Default)]
pub struct Notifier {
    queues: Vec<(Receiver, mpsc::Sender<Event>)>,
}

impl Notifier {
    /// Starts one delivery task per receiver (on the current tokio runtime).
    /// Failures are recorded through `shared` (weak: the tasks end with it).
    pub fn start(receivers: Vec<Receiver>, shared: Weak<Shared>) -> Notifier {
        let queues = receivers
            .into_iter()
            .map(|receiver| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(deliver(receiver.clone(), rx, shared.clone()));
                (receiver, tx)
            })
            .collect();
        Notifier { queues }
    }

    /// Queues `event` for every receiver that wants it; never waits. Returns the
    /// receivers whose queue was full (the event is dropped for them).
    pub fn offer(&self, event: &Event) -> Vec<String> {
        let mut dropped = vec![];
        for (receiver, queue) in &self.queues {
            if receiver.wants(event) && queue.try_send(event.clone()).is_err() {
                dropped.push(receiver.name.clone());
            }
        }
        dropped
    }

    /// How many receivers it sends to.
    pub fn receivers(&self) -> usize {
        self.queues.len()
    }
}

async fn deliver(receiver: Receiver, mut queue: mpsc::Receiver<Event>, shared: Weak<Shared>) {
    while let Some(event) = queue.recv().await {
        let Some((repo, branch)) = shared
            .upgrade()
            .map(|s| (s.config.repo.display().to_string(), s.config.branch.clone()))
        else {
            return;
        };
        let (body, headers) = message(&receiver, &repo, &branch, &event);
        let mut outcome = Err(String::new());
        for attempt in 1..=ATTEMPTS {
            if attempt > 1 {
                tokio::time::sleep(retry_delay(attempt)).await;
            }
            outcome = post(&receiver.url, &body, &headers).await;
            if outcome.is_ok() {
                break;
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match outcome {
            Ok(()) => shared.metrics.notification(&receiver.name, "sent"),
            Err(e) => {
                // The event first: whoever sees the count finds the event.
                shared.record(vec![
                    Event::new(KIND, "failed")
                        .object(format!("receiver {}", receiver.name))
                        .reason(format!(
                            "the {} {} event was not delivered to {} after {ATTEMPTS} tries: {e}",
                            event.kind, event.result, receiver.url
                        )),
                ]);
                shared.metrics.notification(&receiver.name, "failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            proto::auth::to_hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_file_is_checked_line_by_line() {
        let path = Path::new("notify.kdl");
        let ok = parse(
            "receiver \"ops\" {\n  format \"json\"\n  url \"http://127.0.0.1:9/x\"\n  events \"sync:failed\" \"drift\"\n}\nreceiver \"chat\" {\n  format \"slack\"\n  url \"http://relay\"\n  events \"node:unreachable\"\n}\n",
            path,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let failed = Event::new("sync", "failed");
        assert!(ok[0].wants(&failed));
        assert!(ok[0].wants(&Event::new("drift", "found")));
        assert!(!ok[0].wants(&Event::new("sync", "succeeded")));
        assert!(!ok[1].wants(&failed));
        assert!(!ok[0].wants(&Event::new(KIND, "failed")));
        let err = parse(
            "receiver \"a\" {\n  format \"json\"\n  url \"https://hooks.slack.com/x\"\n}\n",
            path,
        )
        .unwrap_err();
        assert!(err.starts_with("notify.kdl:3: url"), "{err}");
        assert!(err.contains("local relay"), "{err}");
        let err = parse("receiver \"a\" {\n  format \"xml\"\n}\n", path).unwrap_err();
        assert!(err.starts_with("notify.kdl:2:"), "{err}");
        let err = parse(
            "receiver \"a\" {\n  format \"json\"\n  url \"http://h:1/\"\n}\n",
            path,
        )
        .unwrap_err();
        assert!(err.contains("needs `events`"), "{err}");
    }

    #[test]
    fn slack_text_and_signed_json() {
        let event = Event::new("sync", "failed")
            .commit("0123456789abcdef0123")
            .reason("node n1 unreachable");
        let slack = Receiver {
            name: "chat".into(),
            format: Format::Slack,
            url: "http://h:1/".into(),
            events: vec!["sync".into()],
            secret: None,
        };
        let (body, headers) = message(&slack, "/r", "main", &event);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["text"],
            "cairn (/r main): sync failed at commit 0123456789ab: node n1 unreachable"
        );
        assert!(headers.is_empty());
        let json = Receiver {
            format: Format::Json,
            secret: Some(b"s3cret".to_vec()),
            ..slack
        };
        let (body, headers) = message(&json, "/r", "main", &event);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["event"]["kind"], "sync");
        let signature = &headers
            .iter()
            .find(|(h, _)| h == "X-Cairn-Signature")
            .unwrap()
            .1;
        assert_eq!(
            *signature,
            format!(
                "sha256={}",
                proto::auth::to_hex(&hmac_sha256(b"s3cret", &body))
            )
        );
    }
}
