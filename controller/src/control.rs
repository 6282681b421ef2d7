//! The controller's files in its data directory, and what other `cairn`
//! commands learn from them:
//!
//! - `controller.lock`: who manages this data directory (pid, host, listen
//!   address, repository, branch); a lock whose pid is dead is stale;
//! - `controller.url`: where its HTTP interface listens (`cairn status` finds
//!   the controller through it);
//! - `controller.token`: the bearer token of `/api/*` (0600; kept across restarts);
//! - `controller.paused`: present while the controller is paused (manual
//!   `cairn apply` allowed, nothing applied automatically).
//!
//! And a small HTTP/1.1 client for `cairn controller pause|resume` and
//! `cairn status`, so the CLI needs no HTTP client crate.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The lock file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerLock {
    /// The controller's pid.
    pub pid: u32,
    /// Its host.
    pub host: String,
    /// Its HTTP address.
    pub listen: String,
    /// The repository it follows.
    pub repo: String,
    /// The branch.
    pub branch: String,
    /// When it started.
    pub since_unix_ms: u64,
}

/// `DATA_DIR/controller.lock`.
pub fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("controller.lock")
}

/// `DATA_DIR/controller.url`.
pub fn url_path(data_dir: &Path) -> PathBuf {
    data_dir.join("controller.url")
}

/// `DATA_DIR/controller.token`.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("controller.token")
}

/// `DATA_DIR/controller.paused`.
pub fn paused_path(data_dir: &Path) -> PathBuf {
    data_dir.join("controller.paused")
}

/// The name of the pause's record in the shared store with controller replicas
/// (`PREFIX/controller/paused`).
pub const SHARED_PAUSE: &str = "paused";

/// The pause, as controller replicas share it through etcd (issue 24): the leader
/// writes it, every replica follows it at the top of each round, and a replica
/// that becomes leader starts from it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedPause {
    /// Paused.
    pub paused: bool,
    /// Who signed the pause or resume.
    pub by: String,
    /// When, seconds since the Unix epoch.
    pub at_unix: u64,
}

/// The controller that manages `data_dir`, if one runs (its lock names a live
/// process on this host; a lock of another host is believed).
pub fn running(data_dir: &Path) -> Option<ControllerLock> {
    let text = std::fs::read_to_string(lock_path(data_dir)).ok()?;
    let lock: ControllerLock = serde_json::from_str(&text).ok()?;
    let here = lock.host == reconciler::state::hostname();
    if here && (lock.pid == std::process::id() || !reconciler::state::process_alive(lock.pid)) {
        return None;
    }
    Some(lock)
}

/// Whether the controller of `data_dir` is paused.
pub fn is_paused(data_dir: &Path) -> bool {
    paused_path(data_dir).exists()
}

/// Why a manual `cairn apply` on the spec root whose data directory is
/// `data_dir` must be refused: a live controller manages it and is not paused.
pub fn manual_apply_refusal(data_dir: &Path) -> Option<String> {
    let lock = running(data_dir)?;
    if is_paused(data_dir) {
        return None;
    }
    Some(format!(
        "refusing to apply: a cairn controller (pid {} on {}, following branch {} of {}) manages {}; a manual apply would fight it. Push a commit to that branch instead, or hand the cluster to manual apply with `cairn controller pause --data-dir {}` (and back with `cairn controller resume --data-dir {}`)",
        lock.pid,
        lock.host,
        lock.branch,
        lock.repo,
        data_dir.display(),
        data_dir.display(),
        data_dir.display()
    ))
}

/// Takes the lock for this process; `Err` names the live controller that holds it.
pub fn take_lock(data_dir: &Path, lock: &ControllerLock) -> Result<(), String> {
    if let Some(other) = running(data_dir) {
        return Err(format!(
            "another cairn controller (pid {} on {}, listening on {}) already manages {}; stop it first",
            other.pid,
            other.host,
            other.listen,
            data_dir.display()
        ));
    }
    let text = serde_json::to_string_pretty(lock).expect("locks serialize") + "\n";
    std::fs::write(lock_path(data_dir), text)
        .map_err(|e| format!("cannot write {}: {e}", lock_path(data_dir).display()))
}

/// Removes the lock and URL files if they are this process's.
pub fn release(data_dir: &Path) {
    let mine = std::fs::read_to_string(lock_path(data_dir))
        .ok()
        .and_then(|t| serde_json::from_str::<ControllerLock>(&t).ok())
        .is_some_and(|l| l.pid == std::process::id());
    if mine {
        let _ = std::fs::remove_file(lock_path(data_dir));
        let _ = std::fs::remove_file(url_path(data_dir));
    }
}

/// The token of `data_dir`, created (0600, 256 random bits) when missing.
pub fn token(data_dir: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = token_path(data_dir);
    if let Ok(t) = std::fs::read_to_string(&path)
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token = proto::auth::to_hex(&bytes);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(token)
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: String,
}

/// One HTTP/1.1 request to `url` (`http://HOST:PORT`) with the bearer token.
pub fn request(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Answer, String> {
    request_with_body(url, method, path, token, None, timeout)
}

/// [`request`] with a JSON body.
pub fn request_with_body(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Answer, String> {
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}` is not an http:// URL"))?
        .trim_end_matches('/');
    let address = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)
        .map_err(|e| format!("cannot reach the controller at {url}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let kind = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}{kind}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("{url}: {e}"))?;
    let mut raw = vec![];
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("{url}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    let body = if head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"))
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(Answer { status, body })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The URL and token of the controller of `data_dir`, from its files.
pub fn endpoint(data_dir: &Path) -> Option<(String, Option<String>)> {
    let url = std::fs::read_to_string(url_path(data_dir)).ok()?;
    let token = std::fs::read_to_string(token_path(data_dir))
        .ok()
        .map(|t| t.trim().to_owned());
    Some((url.trim().to_owned(), token))
}

/// `cairn controller pause|resume --data-dir DIR [--key KEY]`: asks the
/// running controller with an action signed by `key` (or git's
/// `user.signingkey`; see `crate::actions`) — it waits for a sync in progress,
/// then records the change — or, when none runs, writes the marker it reads
/// when it starts. Returns the exit code.
pub fn pause_or_resume(data_dir: &Path, pause: bool, key: Option<&Path>) -> u8 {
    let verb = if pause { "pause" } else { "resume" };
    if running(data_dir).is_some() {
        let Some((url, token)) = endpoint(data_dir) else {
            eprintln!(
                "error: a controller runs for {} but wrote no {}; is it still starting?",
                data_dir.display(),
                url_path(data_dir).display()
            );
            return 2;
        };
        let action = crate::actions::Request {
            action: verb,
            path: &format!("/api/v1/{verb}"),
            plan_id: None,
        };
        match crate::actions::perform(
            &url,
            token.as_deref(),
            action,
            key,
            Duration::from_secs(600),
        ) {
            Ok(a) if a.status == 200 => {}
            Ok(a) => {
                eprintln!(
                    "error: the controller at {url} answered {}: {}",
                    a.status,
                    a.body.trim()
                );
                return 2;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        }
    } else if pause {
        if let Err(e) = std::fs::write(
            paused_path(data_dir),
            "paused by `cairn controller pause`\n",
        ) {
            eprintln!(
                "error: cannot write {}: {e}",
                paused_path(data_dir).display()
            );
            return 2;
        }
    } else if let Err(e) = std::fs::remove_file(paused_path(data_dir))
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!(
            "error: cannot remove {}: {e}",
            paused_path(data_dir).display()
        );
        return 2;
    }
    if pause {
        println!(
            "paused: the controller of {} applies nothing automatically; manual `cairn apply` is allowed. Hand control back with `cairn controller resume --data-dir {}`.",
            data_dir.display(),
            data_dir.display()
        );
    } else {
        println!(
            "resumed: the controller of {} applies the branch head again (manual `cairn apply` is refused while it runs).",
            data_dir.display()
        );
    }
    0
}

/// The data directory a `cairn apply TARGET` works in: `TARGET/.cairn` for a
/// spec root, the plan file's spec root's `.cairn` for a plan file.
pub fn apply_data_dir(target: &Path) -> PathBuf {
    if target.is_file() {
        let spec_root = std::fs::read_to_string(target)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("spec_root")
                    .and_then(|s| s.as_str())
                    .map(PathBuf::from)
            });
        if let Some(root) = spec_root {
            return root.join(".cairn");
        }
    }
    target.join(".cairn")
}

/// Where `cairn status DIR` finds a controller: `--controller URL` (token from
/// `DIR/.cairn/controller.token` or `CAIRN_CONTROLLER_TOKEN`), else the
/// controller that runs for `DIR/.cairn`.
pub fn status_endpoint(data_dir: &Path, url: Option<&str>) -> Option<(String, Option<String>)> {
    let env_token = std::env::var("CAIRN_CONTROLLER_TOKEN").ok();
    match url {
        Some(u) => {
            let token = env_token.or_else(|| endpoint(data_dir).and_then(|(_, t)| t));
            Some((u.trim_end_matches('/').to_owned(), token))
        }
        None => {
            running(data_dir)?;
            let (u, t) = endpoint(data_dir)?;
            Some((u, env_token.or(t)))
        }
    }
}

/// `GET /api/v1/status`.
pub fn fetch_status(url: &str, token: Option<&str>) -> Result<serde_json::Value, String> {
    fetch_json(url, "/api/v1/status", token)
}

/// `GET path` of the controller at `url`, its JSON answer.
pub fn fetch_json(url: &str, path: &str, token: Option<&str>) -> Result<serde_json::Value, String> {
    let answer = request(url, "GET", path, token, Duration::from_secs(30))?;
    if answer.status != 200 {
        return Err(format!(
            "the controller at {url} answered {}: {}",
            answer.status,
            answer.body.trim()
        ));
    }
    serde_json::from_str(&answer.body)
        .map_err(|e| format!("the controller at {url} answered with bad JSON: {e}"))
}

/// The controller part of `cairn status` as text.
pub fn status_text(status: &serde_json::Value, url: &str) -> String {
    let c = &status["controller"];
    let short = |v: &serde_json::Value| {
        v.as_str()
            .map(|s| s[..s.len().min(12)].to_owned())
            .unwrap_or_else(|| "none".to_owned())
    };
    let mut out = format!(
        "\nController: {url}, following branch {} of {}{}\n  applied commit: {}\n",
        c["branch"].as_str().unwrap_or("?"),
        c["repo"].as_str().unwrap_or("?"),
        if c["paused"].as_bool().unwrap_or(false) {
            " (PAUSED: nothing is applied automatically)"
        } else {
            ""
        },
        short(&c["revision"])
    );
    let last = &c["last_sync"];
    if last.is_null() {
        out.push_str("  last sync: none yet\n");
    } else {
        out.push_str(&format!(
            "  last sync: commit {} {} at {}{}\n",
            short(&last["commit"]),
            last["result"].as_str().unwrap_or("?"),
            last["at"].as_str().unwrap_or("?"),
            last["plan_id"]
                .as_str()
                .map(|p| format!(" (plan {p})"))
                .unwrap_or_default()
        ));
        if let Some(reason) = last["reason"].as_str() {
            out.push_str(&format!("    {reason}\n"));
        }
    }
    let leases = c["leases"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !leases.is_empty() {
        let states: Vec<String> = leases
            .iter()
            .map(|l| {
                format!(
                    "{} {}",
                    l["node"].as_str().unwrap_or("?"),
                    l["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        out.push_str(&format!("  node leases: {}\n", states.join(", ")));
        for lease in leases.iter().filter(|l| l["state"] != "ready") {
            out.push_str(&format!(
                "    {}: {}\n",
                lease["node"].as_str().unwrap_or("?"),
                lease["reason"].as_str().unwrap_or("")
            ));
        }
    }
    out.push_str(&ha_times_text(&c["ha_restart_times"]));
    out
}

/// `HA restart times (declared worst case | last measured):` and one line per HA VM.
fn ha_times_text(rows: &serde_json::Value) -> String {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        return String::new();
    }
    let seconds =
        |ms: &serde_json::Value| format!("{:.2} s", ms.as_u64().unwrap_or(0) as f64 / 1000.0);
    let mut out =
        "  HA restart times (declared worst case after a node failure | last measured):\n"
            .to_owned();
    for row in rows {
        let last = &row["last_restart"];
        let measured = if last.is_null() {
            "not restarted yet".to_owned()
        } else {
            format!(
                "{} from {} to {} at {}{} (detected after {}, restarted in {})",
                seconds(&last["measured_ms"]),
                last["from"].as_str().unwrap_or("?"),
                last["to"].as_str().unwrap_or("?"),
                last["at"].as_str().unwrap_or("?"),
                if last["succeeded"].as_bool().unwrap_or(false) {
                    ""
                } else {
                    ", FAILED"
                },
                seconds(&last["detected_ms"]),
                seconds(&last["restart_ms"]),
            )
        };
        out.push_str(&format!(
            "    {}: {} ({}) | {measured}\n",
            row["vm"].as_str().unwrap_or("?"),
            seconds(&row["declared_ms"]),
            row["declared"].as_str().unwrap_or(""),
        ));
    }
    out
}
