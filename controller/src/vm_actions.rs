//! The operator's day-to-day actions on one VM, through the controller (issue 20,
//! item 4): `cairn vm reboot VM` and `cairn vm console VM`. Like every API call that
//! changes something they need the bearer token and an action signed by a platform
//! key ([`crate::actions`]), which the audit log records with its signer
//! (`action-reboot:VM`, `action-console:VM`); each also becomes an event.
//!
//! - `POST /api/v1/vms/{vm}/reboot` (action `reboot:VM`): the controller finds the
//!   node that runs the VM in its observation and sends it `Apply.RebootVm`, signed
//!   with the controller key, under a request id made from the action's nonce (a
//!   retried call never reboots twice). The answer waits for the new boot. The
//!   desired state is unchanged: a reboot is not drift.
//! - `POST /api/v1/vms/{vm}/console` (action `console:VM`) opens a console session
//!   on the node that holds the VM: `{session, vm, node}`. The session id (256
//!   random bits) then stands for the signed action, for [`SESSION_IDLE`] after its
//!   last use: `GET /api/v1/console/{session}?offset=N&from_end=B&wait_ms=M` reads
//!   the console from a byte offset (`Apply.ReadConsole`, waiting up to `wait_ms`
//!   for output), `POST /api/v1/console/{session}/input` types bytes
//!   (`Apply.WriteConsole`), `DELETE /api/v1/console/{session}` detaches (the event
//!   says how many bytes were typed). Bytes travel base64 in JSON.
//!
//! Sessions are kept in memory: a restarted controller forgets them and the client
//! attaches again (a new signed action).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::events::Event;

/// A console session unused this long is forgotten.
pub const SESSION_IDLE: Duration = Duration::from_secs(15 * 60);
/// The longest a console read waits at the node.
pub const MAX_WAIT_MS: u32 = 20_000;

/// The signed action's name for `verb` (`reboot`, `console`) on `vm`: the VM is part
/// of what is signed.
pub fn action(verb: &str, vm: &str) -> String {
    format!("{verb}:{vm}")
}

#[derive(Debug, Clone)]
struct Session {
    vm: String,
    node: String,
    address: String,
    signer: String,
    controller: std::net::SocketAddr,
    last_used: Instant,
    typed: u64,
}

fn sessions() -> &'static Mutex<HashMap<String, Session>> {
    static SESSIONS: OnceLock<Mutex<HashMap<String, Session>>> = OnceLock::new();
    SESSIONS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    (status, format!("{}\n", why.into())).into_response()
}

/// Where `vm` is in the controller's observation: its node, that node's address and
/// whether it runs there. A refusal when the applied commit has no such VM or no
/// node that answered holds it.
async fn locate(shared: &Shared, vm: &str) -> Result<(String, String, bool), Response> {
    let good = shared.good.lock().expect("good lock").clone();
    let Some(good) = good else {
        return Err(refuse(
            StatusCode::CONFLICT,
            "the controller has applied no commit yet; it knows no VM",
        ));
    };
    if good.model.vm(vm).is_none() {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("vm `{vm}` is not in the applied commit"),
        ));
    }
    let observation = shared
        .observation(&good.model, Duration::from_secs(2))
        .await;
    let spec = reconciler::pipeline::spec_nodes(&good.model);
    let mut found: Option<(String, bool)> = None;
    for (node, observed) in &observation.observed.nodes {
        if let reconciler::observe::NodeObservation::Reachable { vms, .. } = observed
            && let Some(status) = vms.get(vm)
        {
            let running = status.is_running();
            // Prefer the node where it runs (a stopped copy may linger elsewhere).
            if found.as_ref().is_none_or(|(_, r)| !r && running) {
                found = Some((node.clone(), running));
            }
        }
    }
    let Some((node, running)) = found else {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!(
                "vm `{vm}` is on no node that answered (not yet created, or its node is unreachable); `cairn status` shows where it is"
            ),
        ));
    };
    let Some(address) = spec.get(&node).map(|n| n.address.clone()) else {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!("vm `{vm}` is on node {node}, which the applied commit no longer has"),
        ));
    };
    Ok((node, address, running))
}

/// [`locate`], then the signed action `verb:VM` checked (and audited).
async fn locate_signed(
    shared: &Shared,
    verb: &str,
    vm: &str,
    body: &[u8],
) -> Result<(String, String, bool, crate::actions::Authorized), Response> {
    let (node, address, running) = locate(shared, vm).await?;
    let binding = crate::actions::Binding::current(shared);
    let signed = crate::actions::authorize(shared, &action(verb, vm), body, &binding)
        .map_err(IntoResponse::into_response)?;
    Ok((node, address, running, signed))
}

/// An event of `vm` that names the action's signer.
fn signed_event(
    result: &str,
    vm: &str,
    reason: String,
    signed: &crate::actions::Authorized,
) -> Event {
    Event::new("vm", result)
        .object(format!("vm {vm}"))
        .reason(format!("{reason} (by {})", signed.signer()))
        .detail(signed.detail())
}

/// `POST /api/v1/vms/{vm}/reboot`.
pub(crate) async fn reboot_handler(
    State(shared): State<Arc<Shared>>,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let (node, address, running, signed) = match locate_signed(&shared, "reboot", &vm, &body).await
    {
        Ok(found) => found,
        Err(refusal) => return refusal,
    };
    if !running {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "vm `{vm}` does not run on {node}: only a running VM reboots (its spec starts it)"
            ),
        );
    }
    let request_id: String = format!(
        "reboot:{vm}:{}",
        signed.document.nonce.chars().take(32).collect::<String>()
    )
    .chars()
    .take(128)
    .collect();
    let started = Instant::now();
    let answer = async {
        let mut client = reconciler::nodes::connect(&address, shared.signer.clone()).await?;
        client
            .apply(proto::v1::ApplyRequest {
                request_id: request_id.clone(),
                action: Some(proto::v1::apply_request::Action::RebootVm(
                    proto::v1::RebootVm { name: vm.clone() },
                )),
            })
            .await
            .map_err(|status| status.message().to_owned())
    }
    .await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match answer {
        Ok(_) => {
            let message = format!("{vm} rebooted on {node} in {elapsed_ms} ms");
            shared.record(vec![signed_event(
                "rebooted",
                &vm,
                message.clone(),
                &signed,
            )]);
            axum::Json(serde_json::json!({
                "vm": vm,
                "node": node,
                "elapsed_ms": elapsed_ms,
                "message": message,
            }))
            .into_response()
        }
        Err(why) => {
            shared.record(vec![signed_event(
                "reboot failed",
                &vm,
                format!("node {node}: {why}"),
                &signed,
            )]);
            refuse(StatusCode::BAD_GATEWAY, format!("node {node}: {why}"))
        }
    }
}

/// `POST /api/v1/vms/{vm}/console`: a new session.
pub(crate) async fn attach_handler(
    State(shared): State<Arc<Shared>>,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let (node, address, running, signed) = match locate_signed(&shared, "console", &vm, &body).await
    {
        Ok(found) => found,
        Err(refusal) => return refusal,
    };
    let mut bytes = [0u8; 32];
    if let Err(e) = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
    {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("/dev/urandom: {e}"),
        );
    }
    let id = proto::auth::to_hex(&bytes);
    {
        let mut all = sessions().lock().expect("sessions lock");
        all.retain(|_, s| s.last_used.elapsed() < SESSION_IDLE);
        all.insert(
            id.clone(),
            Session {
                vm: vm.clone(),
                node: node.clone(),
                address,
                signer: signed.signer(),
                controller: shared.address,
                last_used: Instant::now(),
                typed: 0,
            },
        );
    }
    shared.record(vec![signed_event(
        "console attached",
        &vm,
        format!("on node {node}"),
        &signed,
    )]);
    axum::Json(serde_json::json!({
        "session": id,
        "vm": vm,
        "node": node,
        "running": running,
    }))
    .into_response()
}

fn session(shared: &Shared, id: &str) -> Result<Session, (StatusCode, &'static str)> {
    let mut all = sessions().lock().expect("sessions lock");
    all.retain(|_, s| s.last_used.elapsed() < SESSION_IDLE);
    match all.get_mut(id) {
        Some(s) if s.controller == shared.address => {
            s.last_used = Instant::now();
            Ok(s.clone())
        }
        _ => Err((
            StatusCode::NOT_FOUND,
            "no such console session (it ended, or was unused for 15 minutes, or the controller restarted); attach again",
        )),
    }
}

/// The query of a console read.
#[derive(Debug, Deserialize)]
pub(crate) struct ReadQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    from_end: bool,
    #[serde(default)]
    wait_ms: u32,
}

/// A console read's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleOutput {
    /// The bytes, base64.
    pub data: String,
    /// Where the next read starts.
    pub next_offset: u64,
    /// The VM's state on its node (`VM_STATE_RUNNING`, …).
    pub state: String,
    /// Its boots in this VMM process (0 when not running).
    pub boot_count: u64,
}

/// `GET /api/v1/console/{session}`.
pub(crate) async fn read_handler(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<ReadQuery>,
) -> Response {
    let session = match session(&shared, &id) {
        Ok(s) => s,
        Err((status, why)) => return refuse(status, why),
    };
    let answer = async {
        let mut client =
            reconciler::nodes::connect(&session.address, shared.signer.clone()).await?;
        client
            .read_console(proto::v1::ReadConsoleRequest {
                vm: session.vm.clone(),
                offset: query.offset,
                from_end: query.from_end,
                wait_ms: query.wait_ms.min(MAX_WAIT_MS),
                max_bytes: 0,
            })
            .await
            .map_err(|status| status.message().to_owned())
    }
    .await;
    match answer {
        Ok(read) => axum::Json(ConsoleOutput {
            data: base64::engine::general_purpose::STANDARD.encode(&read.data),
            next_offset: read.next_offset,
            state: read.state,
            boot_count: read.boot_count,
        })
        .into_response(),
        Err(why) => refuse(
            StatusCode::BAD_GATEWAY,
            format!("node {}: {why}", session.node),
        ),
    }
}

/// A console write's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleInput {
    /// The bytes, base64.
    pub data: String,
}

/// `POST /api/v1/console/{session}/input`: `{accepted}`.
pub(crate) async fn input_handler(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    axum::Json(input): axum::Json<ConsoleInput>,
) -> Response {
    let session = match session(&shared, &id) {
        Ok(s) => s,
        Err((status, why)) => return refuse(status, why),
    };
    let Ok(data) = base64::engine::general_purpose::STANDARD.decode(&input.data) else {
        return refuse(StatusCode::BAD_REQUEST, "`data` is not base64");
    };
    let answer = async {
        let mut client =
            reconciler::nodes::connect(&session.address, shared.signer.clone()).await?;
        client
            .write_console(proto::v1::WriteConsoleRequest {
                vm: session.vm.clone(),
                data,
            })
            .await
            .map_err(|status| status.message().to_owned())
    }
    .await;
    match answer {
        Ok(written) => {
            if let Some(s) = sessions().lock().expect("sessions lock").get_mut(&id) {
                s.typed += u64::from(written.accepted);
            }
            axum::Json(serde_json::json!({ "accepted": written.accepted })).into_response()
        }
        Err(why) => refuse(
            StatusCode::BAD_GATEWAY,
            format!("node {}: {why}", session.node),
        ),
    }
}

/// `DELETE /api/v1/console/{session}`: detach.
pub(crate) async fn detach_handler(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let removed = {
        let mut all = sessions().lock().expect("sessions lock");
        match all.get(&id) {
            Some(s) if s.controller == shared.address => all.remove(&id),
            _ => None,
        }
    };
    let Some(session) = removed else {
        return refuse(StatusCode::NOT_FOUND, "no such console session");
    };
    shared.record(vec![
        Event::new("vm", "console detached")
            .object(format!("vm {}", session.vm))
            .reason(format!(
                "on node {}, {} bytes typed (by {})",
                session.node, session.typed, session.signer
            )),
    ]);
    axum::Json(serde_json::json!({ "vm": session.vm, "typed": session.typed })).into_response()
}

/// The controller of `data_dir` (or at `url`), or the exit code after saying why not.
fn endpoint_or_exit(
    data_dir: &std::path::Path,
    url: Option<&str>,
) -> Result<(String, Option<String>), u8> {
    crate::control::status_endpoint(data_dir, url).ok_or_else(|| {
        eprintln!(
            "error: no cairn controller runs for {} (pass --controller URL, or --data-dir DIR of a running controller)",
            data_dir.display()
        );
        2
    })
}

/// The exit code of a refused answer: 1 when the VM is unknown or not where it can
/// be acted on (404, 409), 2 otherwise; says why.
fn refused(url: &str, answer: &crate::control::Answer) -> u8 {
    match answer.status {
        404 | 409 => {
            eprintln!("error: {}", answer.body.trim());
            1
        }
        status => {
            eprintln!(
                "error: the controller at {url} answered {status}: {}",
                answer.body.trim()
            );
            2
        }
    }
}

/// `cairn vm reboot VM`: asks the controller with an action signed by `key`.
/// Returns the exit code.
pub fn reboot_command(
    data_dir: &std::path::Path,
    url: Option<&str>,
    vm: &str,
    key: Option<&std::path::Path>,
) -> u8 {
    let (url, token) = match endpoint_or_exit(data_dir, url) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let path = format!("/api/v1/vms/{vm}/reboot");
    let action = action("reboot", vm);
    let request = crate::actions::Request {
        action: &action,
        path: &path,
        plan_id: None,
    };
    match crate::actions::perform(
        &url,
        token.as_deref(),
        request,
        key,
        Duration::from_secs(60),
    ) {
        Ok(answer) if answer.status == 200 => {
            let v: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
            println!("{}", v["message"].as_str().unwrap_or("rebooted"));
            0
        }
        Ok(answer) => refused(&url, &answer),
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// How `cairn vm console` runs.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// The byte that detaches (Ctrl-] is 0x1d).
    pub detach: u8,
    /// How much of the output before attaching is shown first.
    pub tail_bytes: u64,
    /// When stdin is not a terminal and ends: how long output is still shown
    /// before detaching.
    pub linger: Duration,
}

/// Puts a terminal in raw mode while it lives (keys go to the guest as typed,
/// Ctrl-C included), and back when dropped.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only reads the descriptor's state.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for descriptor 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a termios owned by this frame.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only writes the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: a valid termios for descriptor 0.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same descriptor.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// What stopped the output loop.
enum OutputEnd {
    Detached,
    SessionGone(String),
}

/// Reads the console until `stop`, writing what comes to stdout.
fn follow_output(
    url: &str,
    token: Option<&str>,
    session: &str,
    tail_bytes: u64,
    stop: &std::sync::atomic::AtomicBool,
    last_output: &Mutex<Instant>,
) -> OutputEnd {
    use std::io::Write as _;
    use std::sync::atomic::Ordering;
    let mut offset: Option<u64> = None;
    let mut failures = 0;
    while !stop.load(Ordering::Acquire) {
        let query = match offset {
            None => format!("offset={tail_bytes}&from_end=true&wait_ms=0"),
            Some(at) => format!("offset={at}&wait_ms=1000"),
        };
        let answer = crate::control::request(
            url,
            "GET",
            &format!("/api/v1/console/{session}?{query}"),
            token,
            Duration::from_secs(30),
        );
        let answer = match answer {
            Ok(a) if a.status == 200 => a,
            Ok(a) if a.status == 404 => return OutputEnd::SessionGone(a.body.trim().to_owned()),
            Ok(a) => {
                failures += 1;
                if failures >= 5 {
                    return OutputEnd::SessionGone(a.body.trim().to_owned());
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Err(e) => {
                failures += 1;
                if failures >= 5 {
                    return OutputEnd::SessionGone(e);
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        failures = 0;
        let Ok(output) = serde_json::from_str::<ConsoleOutput>(&answer.body) else {
            return OutputEnd::SessionGone(format!("a bad answer: {}", answer.body.trim()));
        };
        let data = base64::engine::general_purpose::STANDARD
            .decode(&output.data)
            .unwrap_or_default();
        if !data.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&data);
            let _ = out.flush();
            *last_output.lock().expect("output lock") = Instant::now();
        }
        offset = Some(output.next_offset);
        if data.is_empty() && output.state != "VM_STATE_RUNNING" {
            // Nothing more will come until it starts again: look again slowly.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    OutputEnd::Detached
}

/// Types `bytes` into the console, retrying what the UART's FIFO did not take.
fn send_input(
    url: &str,
    token: Option<&str>,
    session: &str,
    mut bytes: &[u8],
) -> Result<(), String> {
    let mut idle = 0;
    while !bytes.is_empty() {
        let chunk = &bytes[..bytes.len().min(4096)];
        let body = serde_json::to_string(&ConsoleInput {
            data: base64::engine::general_purpose::STANDARD.encode(chunk),
        })
        .expect("input serializes");
        let answer = crate::control::request_with_body(
            url,
            "POST",
            &format!("/api/v1/console/{session}/input"),
            token,
            Some(&body),
            Duration::from_secs(30),
        )?;
        if answer.status != 200 {
            return Err(answer.body.trim().to_owned());
        }
        let accepted = serde_json::from_str::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["accepted"].as_u64())
            .unwrap_or(0) as usize;
        bytes = &bytes[accepted.min(bytes.len())..];
        if accepted == 0 {
            idle += 1;
            if idle > 100 {
                return Err("the guest reads no input (its receive FIFO stays full)".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        } else {
            idle = 0;
        }
    }
    Ok(())
}

/// `cairn vm console VM`: attaches through the controller (an action signed by
/// `key`) and relays the terminal until the detach key (or, with stdin not a
/// terminal, until stdin ends and the output has been quiet for `linger`).
/// Returns the exit code.
pub fn console_command(
    data_dir: &std::path::Path,
    url: Option<&str>,
    vm: &str,
    key: Option<&std::path::Path>,
    options: &ConsoleOptions,
) -> u8 {
    use std::io::Read as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (url, token) = match endpoint_or_exit(data_dir, url) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let path = format!("/api/v1/vms/{vm}/console");
    let action = action("console", vm);
    let request = crate::actions::Request {
        action: &action,
        path: &path,
        plan_id: None,
    };
    let answer = match crate::actions::perform(
        &url,
        token.as_deref(),
        request,
        key,
        Duration::from_secs(60),
    ) {
        Ok(a) if a.status == 200 => a,
        Ok(a) => return refused(&url, &a),
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let attached: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
    let Some(session) = attached["session"].as_str().map(str::to_owned) else {
        eprintln!(
            "error: the controller at {url} gave no session: {}",
            answer.body.trim()
        );
        return 2;
    };
    let node = attached["node"].as_str().unwrap_or("?").to_owned();
    let detach_name = match options.detach {
        byte @ 1..=26 => format!("Ctrl-{}", (b'a' + byte - 1) as char),
        0x1b => "Ctrl-[".into(),
        0x1c => "Ctrl-\\".into(),
        0x1d => "Ctrl-]".into(),
        0x1e => "Ctrl-^".into(),
        0x1f => "Ctrl-_".into(),
        other => format!("byte 0x{other:02x}"),
    };
    eprint!(
        "attached to the console of {vm} on {node}{}; detach with {detach_name}\r\n",
        if attached["running"].as_bool() == Some(false) {
            " (not running: its last output)"
        } else {
            ""
        }
    );
    let raw = RawTerminal::enter();
    let stop = Arc::new(AtomicBool::new(false));
    let last_output = Arc::new(Mutex::new(Instant::now()));
    let output = {
        let (url, token, session) = (url.clone(), token.clone(), session.clone());
        let (stop, last_output) = (stop.clone(), last_output.clone());
        let tail = options.tail_bytes;
        std::thread::spawn(move || {
            let end = follow_output(&url, token.as_deref(), &session, tail, &stop, &last_output);
            stop.store(true, Ordering::Release);
            end
        })
    };
    // Input: stdin is read on its own thread (a read blocks), chunks come here.
    let (sender, receiver) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = [0u8; 1024];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => {
                    let _ = sender.send(None);
                    return;
                }
                Ok(n) => {
                    if sender.send(Some(buffer[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut code = 0;
    let mut stdin_ended: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        if let Some(ended) = stdin_ended {
            let quiet = last_output.lock().expect("output lock").elapsed();
            if ended.elapsed() >= options.linger
                && quiet >= options.linger.min(Duration::from_secs(1))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match receiver.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(bytes)) => {
                let (typed, detach) = match bytes.iter().position(|b| *b == options.detach) {
                    Some(at) => (&bytes[..at], true),
                    None => (&bytes[..], false),
                };
                if !typed.is_empty()
                    && let Err(e) = send_input(&url, token.as_deref(), &session, typed)
                {
                    eprint!("\r\nerror: input not delivered: {e}\r\n");
                    code = 1;
                    break;
                }
                if detach {
                    break;
                }
            }
            Ok(None) => {
                if raw.is_some() {
                    break;
                }
                stdin_ended = Some(Instant::now());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    stop.store(true, Ordering::Release);
    let end = output.join();
    drop(raw);
    let _ = crate::control::request(
        &url,
        "DELETE",
        &format!("/api/v1/console/{session}"),
        token.as_deref(),
        Duration::from_secs(10),
    );
    match end {
        Ok(OutputEnd::SessionGone(why)) => {
            eprintln!("\nerror: the console of {vm} ended: {why}");
            if code == 0 {
                code = 1;
            }
        }
        Ok(OutputEnd::Detached) => eprintln!("\ndetached from {vm}"),
        Err(_) => code = 2,
    }
    code
}
