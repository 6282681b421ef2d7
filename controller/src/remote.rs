//! Remote sources: `--repo https://…`, `--repo ssh://…` and scp-like
//! `--repo user@host:path`, fetched with git2 into a bare mirror,
//! `DATA_DIR/mirror.git`, that the rest of the controller reads exactly as it
//! reads a local repository (`source::GitSource`).
//!
//! One task, the fetcher ([`run_fetcher`]), owns the mirror: it fetches the
//! followed branch only (`+refs/heads/B:refs/heads/B`, forced, so a force push
//! is mirrored as it is and the worker's first-parent path handles it as in
//! the local case), at start, every `--poll`, and at once when a webhook says
//! the branch moved ([`crate::Shared::fetch`]). A fetch that moved the branch
//! wakes the worker. A fetch that fails (unreachable remote, refused
//! credentials, unknown host key) is a `fetch failed` event with its reason;
//! the mirror, and so the applied commit, stays as it was, and the next poll
//! or webhook tries again.
//!
//! Credentials come from files and the environment, never from the
//! repository: for `https://`, `--git-credentials FILE` (`USER:TOKEN`, or a
//! token alone) or `CAIRN_GIT_TOKEN` (user `CAIRN_GIT_USERNAME`, else the URL's
//! user, else `git`); for `ssh://`, `--ssh-key FILE` (a private key file, its
//! passphrase in `CAIRN_SSH_KEY_PASSPHRASE` if it has one), and the server's
//! host key must be in `--known-hosts FILE` (default `DATA_DIR/known_hosts`):
//! an unknown or changed host key refuses the fetch, saying the key's
//! fingerprint and how to add it. `--git-ca FILE` adds certificate
//! authorities for `https://` (a private forge), on top of the system's.
//! A URL with a password in it is refused (it would show in `ps` and in
//! every event).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use git2::{Oid, Repository};
use sha2::Digest as _;

use crate::Shared;
use crate::events::Event;

/// Environment variable: the token for `https://` remotes (when no
/// `--git-credentials` file is given).
pub const TOKEN_ENV: &str = "CAIRN_GIT_TOKEN";
/// Environment variable: the user name sent with [`TOKEN_ENV`].
pub const USERNAME_ENV: &str = "CAIRN_GIT_USERNAME";
/// Environment variable: the passphrase of `--ssh-key`.
pub const PASSPHRASE_ENV: &str = "CAIRN_SSH_KEY_PASSPHRASE";

/// How long connecting to a remote may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a remote may stay silent in the middle of a fetch.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A remote repository and how to reach it (`cairn controller` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// `https://…`, `ssh://…` or `user@host:path`.
    pub url: String,
    /// `--git-credentials FILE`: `USER:TOKEN` or a token alone, for https.
    pub git_credentials: Option<PathBuf>,
    /// `--ssh-key FILE`: the private key for ssh.
    pub ssh_key: Option<PathBuf>,
    /// `--known-hosts FILE` (default `DATA_DIR/known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// `--git-ca FILE`: more certificate authorities (PEM) for https.
    pub ca: Option<PathBuf>,
}

/// How a remote is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `https://`.
    Https,
    /// `ssh://` or scp-like.
    Ssh,
}

/// Where a remote is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// How.
    pub transport: Transport,
    /// The user named in the URL.
    pub user: Option<String>,
    /// The host (an IPv6 address without its brackets).
    pub host: String,
    /// The port (443 and 22 when not given).
    pub port: u16,
}

/// Whether `--repo ARG` names a remote rather than a local path: a URL with
/// a scheme (`https://`, `ssh://`; other schemes are refused by [`parse`]), or
/// scp-like `[user@]host:path` (a `:` before any `/`) that is not an existing
/// local path.
pub fn is_remote(arg: &str) -> bool {
    if arg.contains("://") {
        return true;
    }
    scp_like(arg).is_some() && !Path::new(arg).exists()
}

/// `[user@]host:path` with no `/` before the `:` (git's rule) → (user, host).
fn scp_like(arg: &str) -> Option<(Option<&str>, &str)> {
    let colon = arg.find(':')?;
    if arg[..colon].contains('/') || colon == 0 {
        return None;
    }
    let authority = &arg[..colon];
    Some(match authority.rsplit_once('@') {
        Some((user, host)) => (Some(user), host),
        None => (None, authority),
    })
}

/// Parses a remote URL, refusing what the controller does not fetch from.
pub fn parse(url: &str) -> Result<Endpoint, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        let Some((user, host)) = scp_like(url) else {
            return Err(format!(
                "{url}: not a remote URL (https://HOST/PATH, ssh://[USER@]HOST[:PORT]/PATH or USER@HOST:PATH)"
            ));
        };
        if host.is_empty() {
            return Err(format!("{url}: no host before the ':'"));
        }
        return Ok(Endpoint {
            transport: Transport::Ssh,
            user: user.map(str::to_owned),
            host: host.trim_matches(['[', ']']).to_owned(),
            port: 22,
        });
    };
    let (transport, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "https" => (Transport::Https, 443),
        "ssh" | "git+ssh" | "ssh+git" => (Transport::Ssh, 22),
        "http" => {
            return Err(format!(
                "{url}: plain http is refused (anyone on the way could change the specs and read the credentials); use https://"
            ));
        }
        other => {
            return Err(format!(
                "{url}: the controller fetches from https:// and ssh:// remotes, not {other}:// (a local repository is given as a path)"
            ));
        }
    };
    let authority = rest.split('/').next().unwrap_or("");
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(u) = userinfo
        && u.contains(':')
    {
        return Err(format!(
            "{}: a password in the URL is refused (it shows in `ps` and in every event); give it in --git-credentials FILE or ${TOKEN_ENV}",
            redact(url)
        ));
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url}: an IPv6 address needs its closing ']'"))?;
        (h, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let port = match port {
        None | Some("") => default_port,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("{url}: the port {p:?} is not a number from 1 to 65535"))?,
    };
    Ok(Endpoint {
        transport,
        user: userinfo.map(str::to_owned),
        host: host.to_owned(),
        port,
    })
}

/// The URL without any password (for messages).
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

impl Remote {
    /// The known-hosts file.
    pub fn known_hosts_path(&self, data_dir: &Path) -> PathBuf {
        self.known_hosts
            .clone()
            .unwrap_or_else(|| data_dir.join("known_hosts"))
    }

    /// What can be checked before the first fetch: the URL, and that the
    /// files named exist. Network faults are events later, never a refusal to
    /// start.
    pub fn check(&self) -> Result<Endpoint, String> {
        let endpoint = parse(&self.url)?;
        let must_exist = |flag: &str, path: &Option<PathBuf>| match path {
            Some(p) if !p.is_file() => Err(format!("{flag} {}: no such file", p.display())),
            _ => Ok(()),
        };
        must_exist("--git-credentials", &self.git_credentials)?;
        must_exist("--ssh-key", &self.ssh_key)?;
        must_exist("--git-ca", &self.ca)?;
        match endpoint.transport {
            Transport::Ssh if self.ssh_key.is_none() => Err(format!(
                "{}: an ssh remote needs --ssh-key FILE (the controller does not use an ssh agent or ~/.ssh)",
                self.url
            )),
            Transport::Https if self.ssh_key.is_some() => Err(format!(
                "{}: --ssh-key is for ssh remotes; an https remote takes --git-credentials FILE or ${TOKEN_ENV}",
                self.url
            )),
            _ => Ok(endpoint),
        }
    }
}

/// Where the mirror of a remote lives.
pub fn mirror_path(data_dir: &Path) -> PathBuf {
    data_dir.join("mirror.git")
}

/// Opens the mirror, making an empty bare repository the first time.
pub fn open_mirror(path: &Path) -> Result<Repository, String> {
    if path.join("HEAD").is_file() {
        Repository::open_bare(path)
    } else {
        Repository::init_bare(path)
    }
    .map_err(|e| format!("the mirror {}: {}", path.display(), e.message()))
}

/// Process-wide libgit2 settings for remotes: timeouts, and the extra
/// certificate authorities. Called once, at start, before any fetch.
pub fn configure_libgit2(remote: &Remote) -> Result<(), String> {
    // SAFETY: libgit2's global options are set before the fetcher starts, so
    // no other thread uses libgit2's network code while they change.
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(
            CONNECT_TIMEOUT.as_millis() as libc::c_int
        )
        .map_err(|e| e.message().to_owned())?;
        git2::opts::set_server_timeout_in_milliseconds(READ_TIMEOUT.as_millis() as libc::c_int)
            .map_err(|e| e.message().to_owned())?;
    }
    if let Some(ca) = &remote.ca {
        // SAFETY: as above; libgit2 adds the file to the TLS context's trust store.
        unsafe { git2::opts::set_ssl_cert_file(ca) }.map_err(|e| {
            format!(
                "--git-ca {}: {} (a PEM file of certificate authorities)",
                ca.display(),
                e.message()
            )
        })?;
    }
    Ok(())
}

/// At start: checks the remote's flags, sets libgit2's options and makes
/// the mirror; its path (what the worker reads as the repository).
pub fn prepare(data_dir: &Path, remote: &Remote) -> Result<PathBuf, String> {
    remote.check()?;
    configure_libgit2(remote)?;
    let path = mirror_path(data_dir);
    open_mirror(&path)?;
    Ok(path)
}

/// What a fetch did to the mirror's branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The branch before.
    pub before: Option<String>,
    /// The branch after.
    pub after: Option<String>,
    /// The remote rewrote history: `before` is not an ancestor of `after`.
    pub forced: bool,
}

/// The credentials of an https remote: `--git-credentials FILE` (its first
/// line that is neither empty nor a `#` comment: `USER:TOKEN`, or the token
/// alone) else `CAIRN_GIT_TOKEN`; read at every fetch, so a rotated token is
/// used without a restart. `None`: none given.
fn https_credentials(
    remote: &Remote,
    url_user: Option<&str>,
) -> Result<Option<(String, String, String)>, String> {
    let default_user = || {
        url_user
            .map(str::to_owned)
            .or_else(|| std::env::var(USERNAME_ENV).ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "git".to_owned())
    };
    if let Some(path) = &remote.git_credentials {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--git-credentials {}: {e}", path.display()))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| {
                format!(
                    "--git-credentials {}: empty (write USER:TOKEN, or the token alone)",
                    path.display()
                )
            })?;
        let (user, secret) = match line.split_once(':') {
            Some((u, s)) if !u.is_empty() => (u.to_owned(), s.to_owned()),
            _ => (default_user(), line.to_owned()),
        };
        return Ok(Some((user, secret, format!("{}", path.display()))));
    }
    match std::env::var(TOKEN_ENV) {
        Ok(token) if !token.is_empty() => {
            Ok(Some((default_user(), token, format!("${TOKEN_ENV}"))))
        }
        _ => Ok(None),
    }
}

/// Fetches the branch of `remote` into the mirror. `cancel` stops a transfer
/// in progress (the controller is stopping).
pub fn fetch(
    remote: &Remote,
    data_dir: &Path,
    branch: &str,
    cancel: &AtomicBool,
) -> Result<Fetched, String> {
    let endpoint = parse(&remote.url)?;
    let mirror = open_mirror(&mirror_path(data_dir))?;
    let refname = format!("refs/heads/{branch}");
    let read_ref = |repo: &Repository| {
        repo.refname_to_id(&refname)
            .ok()
            .map(|oid: Oid| oid.to_string())
    };
    let before = read_ref(&mirror);
    // Why a callback refused, in our words (libgit2's message is often only
    // "authentication required" or "user cancelled").
    let why: RefCell<Option<String>> = RefCell::new(None);
    let mut tries = 0u32;
    let known_hosts = remote.known_hosts_path(data_dir);
    let mut callbacks = git2::RemoteCallbacks::new();
    callbacks.credentials(|_url, url_user, allowed| {
        let refuse = |msg: String| {
            *why.borrow_mut() = Some(msg.clone());
            Err(git2::Error::from_str(&msg))
        };
        match endpoint.transport {
            Transport::Https => {
                let creds = match https_credentials(remote, url_user) {
                    Ok(c) => c,
                    Err(e) => return refuse(e),
                };
                let Some((user, secret, from)) = creds else {
                    return refuse(format!(
                        "the remote asks for credentials and none are given: pass --git-credentials FILE (USER:TOKEN) or set ${TOKEN_ENV}"
                    ));
                };
                tries += 1;
                if tries > 1 {
                    return refuse(format!(
                        "the remote refused the credentials of {from} (user {user}): check the token and its access to the repository"
                    ));
                }
                if !allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) {
                    return refuse(format!(
                        "the remote asks for credentials of a kind the controller does not send ({allowed:?})"
                    ));
                }
                git2::Cred::userpass_plaintext(&user, &secret)
            }
            Transport::Ssh => {
                let user = url_user.unwrap_or("git");
                if allowed.contains(git2::CredentialType::USERNAME) {
                    return git2::Cred::username(user);
                }
                let key = remote.ssh_key.as_deref().unwrap_or(Path::new(""));
                tries += 1;
                if tries > 1 {
                    return refuse(format!(
                        "the ssh server refused the key {} for user {user}: add its public key to that user's authorized keys (or the forge's deploy keys)",
                        key.display()
                    ));
                }
                if !allowed.contains(git2::CredentialType::SSH_KEY) {
                    return refuse(format!(
                        "the ssh server does not take key authentication for user {user} ({allowed:?})"
                    ));
                }
                let passphrase = std::env::var(PASSPHRASE_ENV).ok();
                git2::Cred::ssh_key(user, None, key, passphrase.as_deref()).inspect_err(|e| {
                    *why.borrow_mut() = Some(format!(
                        "--ssh-key {}: {} (an OpenSSH private key; its passphrase in ${PASSPHRASE_ENV})",
                        key.display(),
                        e.message()
                    ));
                })
            }
        }
    });
    callbacks.certificate_check(|cert, _host| {
        if endpoint.transport != Transport::Ssh {
            // TLS: libgit2 has verified the chain and the name (system CAs
            // plus --git-ca); its verdict stands.
            return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
        }
        let Some(key) = cert.as_hostkey().and_then(|h| h.hostkey()) else {
            let msg =
                "the ssh server's host key could not be read, so it cannot be checked".to_owned();
            *why.borrow_mut() = Some(msg.clone());
            return Err(git2::Error::from_str(&msg));
        };
        match check_host_key(&known_hosts, &endpoint.host, endpoint.port, key) {
            Ok(()) => Ok(git2::CertificateCheckStatus::CertificateOk),
            Err(msg) => {
                *why.borrow_mut() = Some(msg.clone());
                Err(git2::Error::from_str(&msg))
            }
        }
    });
    callbacks.transfer_progress(|_| !cancel.load(Ordering::SeqCst));
    callbacks.sideband_progress(|_| !cancel.load(Ordering::SeqCst));
    let mut options = git2::FetchOptions::new();
    options
        .remote_callbacks(callbacks)
        .download_tags(git2::AutotagOption::None)
        .update_fetchhead(false);
    let refspec = format!("+{refname}:{refname}");
    let result = mirror
        .remote_anonymous(&remote.url)
        .and_then(|mut r| r.fetch(&[refspec.as_str()], Some(&mut options), None));
    drop(options);
    if let Err(e) = result {
        return Err(why.into_inner().unwrap_or_else(|| {
            if cancel.load(Ordering::SeqCst) {
                "cancelled: the controller is stopping".to_owned()
            } else {
                e.message().to_owned()
            }
        }));
    }
    let after = read_ref(&mirror);
    let forced = match (&before, &after) {
        (Some(b), Some(a)) if a != b => {
            let (b, a) = (Oid::from_str(b), Oid::from_str(a));
            match (b, a) {
                (Ok(b), Ok(a)) => !mirror.graph_descendant_of(a, b).unwrap_or(false),
                _ => false,
            }
        }
        _ => false,
    };
    Ok(Fetched {
        before,
        after,
        forced,
    })
}

/// The key type named inside an SSH public key blob.
fn key_type(blob: &[u8]) -> String {
    blob.get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n))
        .and_then(|t| std::str::from_utf8(t).ok())
        .unwrap_or("unknown")
        .to_owned()
}

/// `SHA256:…` as `ssh-keygen -lf` prints it.
pub fn fingerprint(blob: &[u8]) -> String {
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(blob))
    )
}

/// A `known_hosts` host pattern (`*` and `?` wildcards) against a name.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (
        pattern.to_ascii_lowercase().chars().collect(),
        name.to_ascii_lowercase().chars().collect(),
    );
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A hashed host (`|1|SALT|HASH`: HMAC-SHA1 of the name keyed by the salt).
fn hashed_matches(pattern: &str, name: &str) -> bool {
    use hmac::{KeyInit as _, Mac as _};
    let mut parts = pattern.split('|').skip(2);
    let (Some(salt), Some(hash)) = (parts.next(), parts.next()) else {
        return false;
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// Whether a comma-separated host field names `name` (a negated pattern
/// that matches excludes the line).
fn hosts_match(field: &str, name: &str) -> bool {
    let mut matched = false;
    for pattern in field.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if glob(negated, name) {
                return false;
            }
        } else if pattern.starts_with("|1|") {
            matched |= hashed_matches(pattern, name);
        } else {
            matched |= glob(pattern, name);
        }
    }
    matched
}

/// Checks the ssh server's host key against a `known_hosts` file (OpenSSH's
/// format: plain, `[host]:port`, wildcards, negations, hashed names,
/// `@revoked`; `@cert-authority` lines are not used). The refusal says the
/// key's fingerprint and how to add it.
pub fn check_host_key(file: &Path, host: &str, port: u16, key: &[u8]) -> Result<(), String> {
    let name = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let fp = fingerprint(key);
    let kind = key_type(key);
    let scan = format!(
        "check the fingerprint with the server's administrator, then add it: `ssh-keyscan{} {host} >> {}`",
        if port == 22 {
            String::new()
        } else {
            format!(" -p {port}")
        },
        file.display()
    );
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "the host key of {name} ({kind} {fp}) is unknown: {} does not exist; {scan}",
                file.display()
            ));
        }
        Err(e) => return Err(format!("--known-hosts {}: {e}", file.display())),
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut others = vec![];
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut first = fields.next().unwrap_or("");
        let marker = if first.starts_with('@') {
            let m = first;
            first = fields.next().unwrap_or("");
            Some(m)
        } else {
            None
        };
        let (Some(_kind), Some(blob)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !hosts_match(first, &name) {
            continue;
        }
        let Ok(blob) = b64.decode(blob) else {
            continue;
        };
        match marker {
            Some("@revoked") if blob == key => {
                return Err(format!(
                    "the host key of {name} ({kind} {fp}) is revoked in {}:{}",
                    file.display(),
                    n + 1
                ));
            }
            Some(_) => {}
            None if blob == key => return Ok(()),
            None => others.push(format!("{} {}", key_type(&blob), fingerprint(&blob))),
        }
    }
    if others.is_empty() {
        Err(format!(
            "the host key of {name} ({kind} {fp}) is unknown: not in {}; {scan}",
            file.display()
        ))
    } else {
        Err(format!(
            "the host key of {name} ({kind} {fp}) does not match the key {} has for it ({}): the server's key changed, or someone is in between; nothing is fetched. If the change is expected, replace its line",
            file.display(),
            others.join(", ")
        ))
    }
}

/// The fetcher: fetches at start, on every webhook hint and every `--poll`,
/// until `stop`. Records what happened as `fetch` events (a failure once per
/// distinct reason, and when it works again) and wakes the worker when the
/// branch moved.
pub(crate) async fn run_fetcher(
    shared: Arc<Shared>,
    remote: Remote,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failing: Option<String> = None;
    let url = remote.url.clone();
    loop {
        if *stop.borrow() {
            break;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let task = {
            let (remote, cancel) = (remote.clone(), cancel.clone());
            let data_dir = shared.config.data_dir.clone();
            let branch = shared.config.branch.clone();
            tokio::task::spawn_blocking(move || fetch(&remote, &data_dir, &branch, &cancel))
        };
        tokio::pin!(task);
        let result = tokio::select! {
            r = &mut task => r,
            _ = stop.changed() => {
                cancel.store(true, Ordering::SeqCst);
                break;
            }
        };
        let result = result.unwrap_or_else(|e| Err(format!("the fetch panicked: {e}")));
        let ms = started.elapsed().as_millis() as u64;
        let outcome = match &result {
            Ok(f) if f.before != f.after => "updated",
            Ok(_) => "unchanged",
            Err(_) => "failed",
        };
        shared.metrics.fetches.with_label_values(&[outcome]).inc();
        match result {
            Ok(fetched) => {
                let mut events = vec![];
                if let Some(previous) = failing.take() {
                    events.push(
                        Event::new("fetch", "ok")
                            .reason(format!("fetched {url} again (it had failed: {previous})")),
                    );
                }
                if fetched.before != fetched.after {
                    let short = |c: &Option<String>| {
                        c.as_deref()
                            .map(|c| c[..c.len().min(12)].to_owned())
                            .unwrap_or_else(|| "nothing".to_owned())
                    };
                    let mut e = Event::new("fetch", "updated")
                        .reason(format!(
                            "{} of {url}: {} → {}{} ({ms} ms)",
                            shared.config.branch,
                            short(&fetched.before),
                            short(&fetched.after),
                            if fetched.forced {
                                ", history rewritten (force push): every new commit is verified again"
                            } else {
                                ""
                            }
                        ))
                        .detail(serde_json::json!({
                            "before": fetched.before, "after": fetched.after,
                            "forced": fetched.forced, "ms": ms,
                        }));
                    if let Some(after) = &fetched.after {
                        e = e.commit(after);
                    }
                    events.push(e);
                }
                if !events.is_empty() {
                    shared.record(events);
                }
                if fetched.before != fetched.after {
                    shared.wake.notify_one();
                }
            }
            Err(reason) => {
                if failing.as_deref() != Some(reason.as_str()) {
                    shared.record(vec![Event::new("fetch", "failed").reason(format!(
                        "fetch of {url} failed: {reason}; the cluster keeps the commit applied last, and the fetch is tried again every {} s and on each webhook",
                        shared.config.poll.as_secs()
                    ))]);
                    failing = Some(reason);
                }
            }
        }
        tokio::select! {
            _ = shared.fetch.notified() => {}
            _ = tokio::time::sleep(shared.config.poll) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_what_is_not_fetched_from_is_refused_saying_why() {
        let e = parse("https://git.example.com/org/specs.git").unwrap();
        assert_eq!(
            (e.transport, e.user, e.host.as_str(), e.port),
            (Transport::Https, None, "git.example.com", 443)
        );
        let e = parse("ssh://git@127.0.0.1:2222/srv/specs.git").unwrap();
        assert_eq!(
            (e.transport, e.user.as_deref(), e.host.as_str(), e.port),
            (Transport::Ssh, Some("git"), "127.0.0.1", 2222)
        );
        let e = parse("ssh://[::1]:2200/x").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 2200));
        let e = parse("git@github.com:org/specs.git").unwrap();
        assert_eq!(
            (e.transport, e.user.as_deref(), e.host.as_str(), e.port),
            (Transport::Ssh, Some("git"), "github.com", 22)
        );
        let e = parse("https://bot@forge.example/x.git").unwrap();
        assert_eq!(e.user.as_deref(), Some("bot"));
        let err = parse("https://bot:hunter2@forge.example/x.git").unwrap_err();
        assert!(
            err.contains("password in the URL is refused") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(
            parse("http://forge.example/x.git")
                .unwrap_err()
                .contains("plain http is refused")
        );
        assert!(
            parse("git://forge.example/x.git")
                .unwrap_err()
                .contains("not git://")
        );
        assert!(
            parse("https://forge.example:99999/x")
                .unwrap_err()
                .contains("port")
        );
        assert!(is_remote("https://x/y") && is_remote("git@host:org/repo.git"));
        assert!(!is_remote("/srv/specs.git") && !is_remote("./a:b/c") && !is_remote("specs"));
    }

    #[test]
    fn credentials_come_from_the_file_or_the_environment() {
        let dir = std::env::temp_dir().join(format!("cairn-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("creds");
        let remote = Remote {
            url: "https://h/x".into(),
            git_credentials: Some(file.clone()),
            ssh_key: None,
            known_hosts: None,
            ca: None,
        };
        std::fs::write(&file, "# a comment\n\nbot:tok3n\n").unwrap();
        let (u, s, _) = https_credentials(&remote, None).unwrap().unwrap();
        assert_eq!((u.as_str(), s.as_str()), ("bot", "tok3n"));
        std::fs::write(&file, "justatoken\n").unwrap();
        let (u, s, _) = https_credentials(&remote, Some("urluser"))
            .unwrap()
            .unwrap();
        assert_eq!((u.as_str(), s.as_str()), ("urluser", "justatoken"));
        std::fs::write(&file, "\n").unwrap();
        assert!(
            https_credentials(&remote, None)
                .unwrap_err()
                .contains("empty")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_keys_are_checked_against_known_hosts() {
        let dir = std::env::temp_dir().join(format!("cairn-kh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("known_hosts");
        // Blobs as ssh sends them: string "ssh-ed25519", string key.
        let blob = |byte: u8| {
            let mut b = vec![0, 0, 0, 11];
            b.extend_from_slice(b"ssh-ed25519");
            b.extend_from_slice(&[0, 0, 0, 32]);
            b.extend_from_slice(&[byte; 32]);
            b
        };
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let (good, other) = (blob(1), blob(2));
        let missing = check_host_key(&file, "127.0.0.1", 2222, &good).unwrap_err();
        assert!(
            missing.contains("does not exist")
                && missing.contains("ssh-keyscan -p 2222 127.0.0.1")
                && missing.contains(&fingerprint(&good)),
            "{missing}"
        );
        std::fs::write(
            &file,
            format!("# hosts\n[127.0.0.1]:2222 ssh-ed25519 {}\n", b64(&good)),
        )
        .unwrap();
        check_host_key(&file, "127.0.0.1", 2222, &good).unwrap();
        let changed = check_host_key(&file, "127.0.0.1", 2222, &other).unwrap_err();
        assert!(changed.contains("does not match"), "{changed}");
        let unknown = check_host_key(&file, "127.0.0.1", 22, &good).unwrap_err();
        assert!(unknown.contains("is unknown: not in"), "{unknown}");
        // Wildcards, negation, hashed names (`ssh-keygen -H`), revocation.
        std::fs::write(
            &file,
            format!(
                "*.example.com,!bad.example.com ssh-ed25519 {k}\n|1|{salt}|{hash} ssh-ed25519 {k}\n@revoked * ssh-ed25519 {o}\n",
                k = b64(&good),
                o = b64(&other),
                salt = b64(b"saltsaltsaltsaltsalt"),
                hash = {
                    use hmac::{KeyInit as _, Mac as _};
                    let mut mac =
                        hmac::Hmac::<sha1::Sha1>::new_from_slice(b"saltsaltsaltsaltsalt").unwrap();
                    mac.update(b"[forge.lan]:2200");
                    b64(&mac.finalize().into_bytes())
                }
            ),
        )
        .unwrap();
        check_host_key(&file, "git.example.com", 22, &good).unwrap();
        assert!(check_host_key(&file, "bad.example.com", 22, &good).is_err());
        check_host_key(&file, "forge.lan", 2200, &good).unwrap();
        assert!(check_host_key(&file, "forge.lan", 22, &good).is_err());
        let revoked = check_host_key(&file, "git.example.com", 22, &other).unwrap_err();
        assert!(revoked.contains("revoked"), "{revoked}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
