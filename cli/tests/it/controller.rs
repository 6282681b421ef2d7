//! The GitOps controller as operators run it: `cairn controller` against a dev
//! cluster (quickstart copy on free ports), following a bare repository that a
//! work clone pushes to, with commits signed by ed25519 keys made by
//! `ssh-keygen` (`git -c gpg.format=ssh -c user.signingkey=KEY commit -S`).
//! Every process started here is stopped when the test ends (also on failure).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::TempDir;
use crate::engine::{Cluster, free_port, kvm_usable};

pub(crate) fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub(crate) fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) const VM_APP: &str = "vm \"app\" tenant=\"dev\" site=\"lab\" {\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n}\n";

/// A dev cluster whose spec directory is a git work clone pushing to a bare
/// repository that a `cairn controller` follows.
pub(crate) struct GitOps {
    // Dropped first: the controller stops before the cluster goes down.
    controller: Option<Child>,
    pub(crate) cluster: Cluster,
    pub(crate) keys: TempDir,
    pub(crate) bare: PathBuf,
    pub(crate) listen: String,
    /// How the controller is told its source (default `--repo BARE`).
    pub(crate) source_args: Vec<String>,
    grpc_listen: String,
    extra_env: Vec<(String, String)>,
}

impl Drop for GitOps {
    fn drop(&mut self) {
        self.stop(false);
    }
}

impl GitOps {
    /// The quickstart without its workloads (plus `workloads`, when given), committed
    /// with the trusted key, pushed, and a controller following it.
    fn up(tag: &str, workloads: Option<&str>, env: &[(&str, &str)]) -> GitOps {
        let (mut g, first) = Self::prepare(tag, workloads, env);
        g.start();
        g.wait_sync(&first, Duration::from_secs(60));
        g
    }

    /// [`GitOps::up`] without starting the controller: the first commit is
    /// pushed; its id.
    pub(crate) fn prepare(
        tag: &str,
        workloads: Option<&str>,
        env: &[(&str, &str)],
    ) -> (GitOps, String) {
        let cluster = Cluster::up_with(tag, &["workloads.kdl"]);
        let keys = TempDir::new(&format!("{tag}-keys"));
        for name in ["trusted", "other"] {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                    .arg(keys.0.join(name)),
            );
        }
        let public = std::fs::read_to_string(keys.0.join("trusted.pub")).expect("public key");
        std::fs::write(
            keys.0.join("allowed-signers"),
            format!("ops@example.com {public}"),
        )
        .expect("write allowed signers");
        let bare = keys.0.join("origin.git");
        let dir = cluster.path().to_owned();
        std::fs::write(dir.join(".gitignore"), ".cairn/\n").expect("gitignore");
        if let Some(w) = workloads {
            std::fs::write(dir.join("workloads.kdl"), w).expect("workloads");
        }
        run_ok(
            Command::new("git")
                .current_dir(&dir)
                .args(["init", "-q", "-b", "main"]),
        );
        run_ok(
            Command::new("git")
                .args(["init", "-q", "--bare", "-b", "main"])
                .arg(&bare),
        );
        let g = GitOps {
            controller: None,
            cluster,
            keys,
            bare: bare.clone(),
            listen: format!("127.0.0.1:{}", free_port()),
            grpc_listen: format!("127.0.0.1:{}", free_port()),
            extra_env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            source_args: vec!["--repo".to_owned(), bare.display().to_string()],
        };
        g.git(&["remote", "add", "origin", &bare.display().to_string()]);
        let first = g.commit("trusted", "the cluster");
        g.push(false);
        (g, first)
    }

    pub(crate) fn dir(&self) -> &Path {
        self.cluster.path()
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir().join(".cairn")
    }

    pub(crate) fn git(&self, args: &[&str]) -> String {
        run_ok(
            Command::new("git")
                .current_dir(self.dir())
                .args([
                    "-c",
                    "user.name=Op",
                    "-c",
                    "user.email=ops@example.com",
                    "-c",
                    "gpg.format=ssh",
                ])
                .args(args),
        )
    }

    /// Commits everything, signed with `key` (`trusted`, `other`) or unsigned
    /// (`none`); returns the commit id.
    pub(crate) fn commit(&self, key: &str, message: &str) -> String {
        self.git(&["add", "-A"]);
        if key == "none" {
            self.git(&[
                "-c",
                "commit.gpgsign=false",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                message,
            ]);
        } else {
            let signing = format!("user.signingkey={}", self.keys.0.join(key).display());
            self.git(&[
                "-c",
                &signing,
                "commit",
                "-q",
                "--allow-empty",
                "-S",
                "-m",
                message,
            ]);
        }
        self.git(&["rev-parse", "HEAD"]).trim().to_owned()
    }

    pub(crate) fn push(&self, force: bool) {
        let mut args = vec!["push", "-q"];
        if force {
            args.push("-f");
        }
        args.extend(["origin", "HEAD:main"]);
        self.git(&args);
    }

    pub(crate) fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.keys.0.join("controller.log"))
            .expect("controller log");
        let mut cmd = self.cluster.command(&[
            "controller",
            "--data-dir",
            ".cairn",
            "--trusted-keys",
            &self.keys.0.join("allowed-signers").display().to_string(),
            "--listen",
            &self.listen,
            "--grpc-listen",
            &self.grpc_listen,
            "--drift-interval",
            "1s",
            "--parallelism",
            "1",
        ]);
        cmd.args(&self.source_args);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cairn controller starts");
        self.controller = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.get("/healthz", false).is_none_or(|(s, _)| s != 200) {
            assert!(
                Instant::now() < deadline,
                "the controller did not serve /healthz: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the controller: SIGTERM (graceful), or SIGKILL with `kill9`.
    pub(crate) fn stop(&mut self, kill9: bool) {
        let Some(mut child) = self.controller.take() else {
            return;
        };
        if !kill9 {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub(crate) fn log(&self) -> String {
        let mut out =
            std::fs::read_to_string(self.keys.0.join("controller.log")).unwrap_or_default();
        for node in ["lab-1", "lab-2", "lab-3"] {
            let log =
                std::fs::read_to_string(self.data_dir().join("dev").join(node).join("node.log"))
                    .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            out.push_str(&format!(
                "\n--- {node} node.log (last lines, newest first):\n{}",
                tail.join("\n")
            ));
        }
        out
    }

    pub(crate) fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("controller.token"))
            .expect("controller.token")
            .trim()
            .to_owned()
    }

    pub(crate) fn get(&self, path: &str, auth: bool) -> Option<(u16, String)> {
        let token = auth.then(|| self.token());
        ::controller::control::request(
            &format!("http://{}", self.listen),
            "GET",
            path,
            token.as_deref(),
            Duration::from_secs(30),
        )
        .ok()
        .map(|a| (a.status, a.body))
    }

    pub(crate) fn events(&self) -> Vec<Value> {
        let (status, body) = self
            .get("/api/v1/events?limit=2000", true)
            .expect("the controller answers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("events JSON")
    }

    /// Waits for an event of `kind` about `commit` (not a retry notice).
    pub(crate) fn wait_event(&self, kind: &str, commit: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .events()
                .into_iter()
                .find(|e| e["kind"] == kind && e["commit"] == commit && e["result"] != "scheduled")
            {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} event for {commit} in {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `cairn controller pause|resume --key KEY`, with no git configuration
    /// but the repository's (so no user.signingkey of this machine's).
    fn cairn_signed(&self, verb: &str, key: &str) -> crate::Run {
        let key = self.keys.0.join(key).display().to_string();
        let mut args = vec!["controller", verb, "--data-dir", ".cairn"];
        if !key.ends_with("none") {
            args.extend(["--key", key.as_str()]);
        }
        self.cluster
            .command(&args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .output()
            .expect("cairn runs")
            .into()
    }

    pub(crate) fn wait_sync(&self, commit: &str, timeout: Duration) -> Value {
        self.wait_event("sync", commit, timeout)
    }

    fn vm_names(&self) -> Vec<String> {
        self.cluster.status_json()["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .map(|v| v["name"].as_str().unwrap_or("").to_owned())
            .collect()
    }
}

/// The pid of the cairn-vmm process of VM `vm` of this cluster.
pub(crate) fn vmm_pid(cluster_dir: &Path, vm: &str) -> Option<u32> {
    let needle = format!("{}/", cluster_dir.display());
    let vm_dir = format!("/vms/{vm}/");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("cairn-vmm") && cmdline.contains(&needle) && cmdline.contains(&vm_dir) {
            return Some(pid);
        }
    }
    None
}

pub(crate) fn skip_without_tools() -> bool {
    for tool in ["git", "ssh-keygen"] {
        if !have(tool) {
            eprintln!("skipped: `{tool}` is not installed, and the test makes signed commits");
            return true;
        }
    }
    false
}

#[test]
fn a_pushed_signed_commit_runs_without_apply_and_manual_apply_waits_for_pause() {
    if skip_without_tools() {
        return;
    }
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and the pushed commit starts a VM");
        return;
    }
    let g = GitOps::up("ctl-push", None, &[]);
    assert!(g.vm_names().is_empty());
    std::fs::write(g.dir().join("workloads.kdl"), VM_APP).expect("workloads");
    let commit = g.commit("trusted", "add vm app");
    let pushed = reconciler::state::now_ms();
    g.push(false);
    // The notify path: the branch moved, the controller learns it from inotify.
    let started = g.wait_event("sync-started", &commit, Duration::from_secs(5));
    let detect_ms = started["at_unix_ms"]
        .as_u64()
        .unwrap()
        .saturating_sub(pushed);
    eprintln!("push → sync started: {detect_ms} ms (git push included)");
    assert!(detect_ms < 5000, "{started}");
    let sync = g.wait_sync(&commit, Duration::from_secs(60));
    assert_eq!(sync["result"], "succeeded", "{sync}");
    assert!(sync["plan_id"].is_string(), "{sync}");
    let detail = &sync["detail"];
    assert_eq!(detail["author"], "Op <ops@example.com>", "{sync}");
    assert!(
        detail["signer"]
            .as_str()
            .unwrap()
            .starts_with("ops@example.com (SHA256:"),
        "{sync}"
    );
    for phase in ["verify_ms", "compile_ms", "plan_ms", "apply_ms"] {
        assert!(detail["phases"][phase].is_u64(), "{phase}: {sync}");
    }
    assert!(
        g.events().iter().any(|e| e["kind"] == "step"
            && e["commit"] == commit.as_str()
            && e["object"]
                .as_str()
                .unwrap_or("")
                .starts_with("start_vm app@")),
        "a step event per step"
    );
    let status = g.cluster.status_json();
    let app = status["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "app")
        .expect("vm app in status");
    assert_eq!(app["state"], "running", "{status}");
    assert_eq!(
        status["controller"]["revision"],
        commit.as_str(),
        "{status}"
    );
    assert_eq!(
        status["controller"]["last_sync"]["result"], "succeeded",
        "{status}"
    );
    let text = g.cluster.cairn(&["status", "."]);
    assert!(text.stdout.contains("Controller: http://"), "{text:?}");
    assert!(
        text.stdout
            .contains(&format!("last sync: commit {} succeeded", &commit[..12])),
        "{text:?}"
    );

    // While the controller runs unpaused, a manual apply is refused.
    let refused = g
        .cluster
        .cairn_unattended(&["apply", ".", "--auto-approve"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("a cairn controller (pid")
            && refused.stderr.contains("cairn controller pause --data-dir"),
        "{refused:?}"
    );
    // Paused: manual apply is allowed (nothing to do: the same specs).
    let paused = g.cairn_signed("pause", "trusted");
    assert_eq!(paused.code, 0, "{paused:?}");
    // (Its exit code is the cluster's business: on a loaded machine a node may
    // answer too late and the apply says so. It is not refused.)
    let manual = g
        .cluster
        .cairn_unattended(&["apply", ".", "--auto-approve"]);
    assert!(
        !manual.stderr.contains("a cairn controller") && manual.code != 2,
        "{manual:?}"
    );
    assert_eq!(g.cluster.status_json()["controller"]["paused"], true);
    // A commit pushed while paused is held, and applied after resume.
    std::fs::write(
        g.dir().join("workloads.kdl"),
        format!("{VM_APP}{}", VM_APP.replace("\"app\"", "\"app2\"")),
    )
    .expect("workloads");
    let second = g.commit("trusted", "add vm app2");
    g.push(false);
    let held = g.wait_event("sync", &second, Duration::from_secs(10));
    assert_eq!(held["result"], "held", "{held}");
    let resumed = g.cairn_signed("resume", "trusted");
    assert_eq!(resumed.code, 0, "{resumed:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = g.events().into_iter().find(|e| {
            e["kind"] == "sync" && e["commit"] == second.as_str() && e["result"] == "succeeded"
        });
        if done.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", g.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(g.vm_names().contains(&"app2".to_owned()));
    let kinds: Vec<String> = g
        .events()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(kinds.contains(&"paused".to_owned()) && kinds.contains(&"resumed".to_owned()));
}

#[test]
fn unsigned_untrusted_and_broken_commits_are_refused_with_their_reason_and_change_nothing() {
    if skip_without_tools() {
        return;
    }
    let g = GitOps::up("ctl-trust", None, &[]);
    let before = g.cluster.status_json();

    // Unsigned.
    std::fs::write(g.dir().join("workloads.kdl"), VM_APP).expect("workloads");
    let unsigned = g.commit("none", "unsigned: add vm app");
    g.push(false);
    let e = g.wait_sync(&unsigned, Duration::from_secs(10));
    assert_eq!(e["result"], "refused", "{e}");
    let reason = e["reason"].as_str().unwrap();
    assert!(reason.contains("is not signed"), "{reason}");
    assert!(
        reason.contains("allowed-signers"),
        "names the trusted keys: {reason}"
    );
    assert!(g.vm_names().is_empty(), "nothing applied");

    // Signed by a key nobody trusts (the unsigned commit is dropped by a force
    // push: a rewritten history is checked again from the commit applied last).
    g.git(&["reset", "-q", "--hard", "HEAD~1"]);
    std::fs::write(g.dir().join("workloads.kdl"), VM_APP).expect("workloads");
    let untrusted = g.commit("other", "untrusted: add vm app");
    g.push(true);
    let e = g.wait_sync(&untrusted, Duration::from_secs(10));
    assert_eq!(e["result"], "refused", "{e}");
    let other_fp = run_ok(
        Command::new("ssh-keygen")
            .arg("-lf")
            .arg(g.keys.0.join("other.pub")),
    );
    let fingerprint = other_fp.split_whitespace().nth(1).unwrap();
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "signed by key {fingerprint}, which is not trusted"
        )),
        "{reason}"
    );
    assert!(reason.contains("to trust that key add a line"), "{reason}");
    assert_eq!(e["detail"]["signed_by"], fingerprint, "{e}");
    assert!(g.vm_names().is_empty(), "nothing applied");

    // A trusted commit on top of an untrusted one is refused too: every commit
    // since the one applied last must pass.
    let on_top = g.commit("trusted", "trusted, on top of the untrusted one");
    g.push(false);
    let e = g.wait_sync(&on_top, Duration::from_secs(10));
    assert_eq!(e["result"], "refused", "{e}");
    assert!(
        e["reason"].as_str().unwrap().contains("first-parent path"),
        "{e}"
    );
    assert_eq!(e["detail"]["refused_commit"], untrusted.as_str(), "{e}");

    // Signed and trusted, but it does not compile.
    g.git(&["reset", "-q", "--hard", "HEAD~2"]);
    std::fs::write(
        g.dir().join("workloads.kdl"),
        VM_APP.replace("tenant=\"dev\"", "tenant=\"nope\""),
    )
    .expect("workloads");
    let broken = g.commit("trusted", "broken: unknown tenant");
    g.push(true);
    let e = g.wait_sync(&broken, Duration::from_secs(10));
    assert_eq!(e["result"], "failed", "{e}");
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.contains("do not compile") && reason.contains("workloads.kdl:1:"),
        "names the first file:line: {reason}"
    );
    assert!(reason.contains("nope"), "{reason}");
    // The controller keeps running; the cluster is unchanged; status says why.
    assert_eq!(g.get("/healthz", false).map(|(s, _)| s), Some(200));
    let after = g.cluster.status_json();
    assert_eq!(after["vms"], before["vms"]);
    assert_eq!(
        after["controller"]["last_sync"]["result"], "failed",
        "{after}"
    );
    assert_eq!(
        after["controller"]["revision"], before["controller"]["revision"],
        "the last good commit stays applied"
    );
    // A stalled commit is not retried in a loop: one sync-started per commit.
    std::thread::sleep(Duration::from_secs(3));
    let starts = g
        .events()
        .iter()
        .filter(|e| e["kind"] == "sync-started" && e["commit"] == broken.as_str())
        .count();
    assert_eq!(starts, 1, "{}", g.log());

    // Fixed by a new commit (history kept): applied.
    std::fs::write(g.dir().join("workloads.kdl"), "// nothing yet\n").expect("workloads");
    let fixed = g.commit("trusted", "fix: no workloads yet");
    g.push(false);
    let e = g.wait_sync(&fixed, Duration::from_secs(30));
    assert_eq!(e["result"], "succeeded", "{e}");
    assert_eq!(e["detail"]["verified_commits"], 2, "{e}");
}

#[test]
fn the_http_interface_checks_token_and_host_and_its_metrics_pass_promtool() {
    if skip_without_tools() {
        return;
    }
    let g = GitOps::up("ctl-http", None, &[]);
    assert_eq!(g.get("/healthz", false).map(|(s, _)| s), Some(200));
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.get("/readyz", false).map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "never ready: {}", g.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(g.get("/api/v1/events", false).map(|(s, _)| s), Some(401));
    // DNS rebinding: a Host that is not the listen address nor localhost.
    let mut stream = std::net::TcpStream::connect(&g.listen).expect("connect");
    std::io::Write::write_all(
        &mut stream,
        b"GET /healthz HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n",
    )
    .expect("write");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    // Pause and resume are signed actions: no key, a key that is not a
    // platform key, then the platform key.
    let unsigned = g.cairn_signed("pause", "none");
    assert_eq!(unsigned.code, 2, "{unsigned:?}");
    assert!(unsigned.stderr.contains("pass --key FILE"), "{unsigned:?}");
    let untrusted = g.cairn_signed("pause", "other");
    assert_eq!(untrusted.code, 2, "{untrusted:?}");
    let other = run_ok(
        Command::new("ssh-keygen")
            .arg("-lf")
            .arg(g.keys.0.join("other.pub")),
    );
    let other = other.split_whitespace().nth(1).expect("a fingerprint");
    assert!(
        untrusted.stderr.contains("answered 403")
            && untrusted.stderr.contains(other)
            && untrusted.stderr.contains("not a platform key"),
        "{untrusted:?}"
    );
    assert_eq!(g.cluster.status_json()["controller"]["paused"], false);
    let paused = g.cairn_signed("pause", "trusted");
    assert_eq!(paused.code, 0, "{paused:?}");
    assert_eq!(g.cluster.status_json()["controller"]["paused"], true);
    let resumed = g.cairn_signed("resume", "trusted");
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert_eq!(g.cluster.status_json()["controller"]["paused"], false);
    let signed: Vec<Value> = g
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "paused" || e["kind"] == "resumed")
        .collect();
    assert_eq!(signed.len(), 2, "{signed:?}");
    assert!(
        signed.iter().all(|e| e["detail"]["signer"]
            .as_str()
            .unwrap_or("")
            .starts_with("ops@example.com (SHA256:")),
        "{signed:?}"
    );
    // The gRPC health service, asked by a real external client when Debian's
    // python3-grpcio is installed: SERVING (field 1 = 1).
    let probe = format!(
        "import grpc\nch = grpc.insecure_channel('{}')\ncall = ch.unary_unary('/grpc.health.v1.Health/Check', request_serializer=lambda b: b, response_deserializer=lambda b: b)\nprint(call(b'', timeout=5).hex())\n",
        g.grpc_listen
    );
    match Command::new("/usr/bin/python3")
        .args(["-c", &probe])
        .output()
    {
        Ok(out) if out.status.success() => {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0801");
        }
        other => {
            eprintln!("skipping the grpc.health.v1 probe (python3-grpcio missing?): {other:?}")
        }
    }

    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(g.data_dir().join("controller.token"))
            .expect("token")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let (status, metrics) = g.get("/metrics", false).expect("metrics");
    assert_eq!(status, 200);
    for name in [
        "cairn_controller_syncs_total{result=\"succeeded\"} 1",
        "cairn_controller_sync_duration_seconds_bucket",
        "cairn_controller_nodes{state=\"ready\"} 3",
        // Every node state is exported, 0 included, and each node's own.
        "cairn_controller_nodes{state=\"suspect\"} 0",
        "cairn_controller_nodes{state=\"failed\"} 0",
        "cairn_controller_nodes{state=\"fenced\"} 0",
        "cairn_controller_nodes{state=\"maintenance\"} 0",
        "cairn_controller_nodes{state=\"unreachable\"} 0",
        "cairn_controller_node_state{node=\"lab-1\",state=\"ready\"} 1",
        "cairn_controller_apply_steps_total",
        "cairn_controller_drift_found_total",
        "cairn_controller_drift_repaired_total",
    ] {
        if name.starts_with("cairn_controller_apply_steps_total")
            && crate::engine::bond_steps() == 0
        {
            continue;
        }
        assert!(metrics.contains(name), "{name} in:\n{metrics}");
    }
    promtool_check(&metrics);
}

/// `promtool check metrics` passes on `metrics` (skipped, saying why, without
/// promtool; Debian's prometheus package is installed when it can be).
pub(crate) fn promtool_check(metrics: &str) {
    if !have("promtool") && is_root() && have("apt-get") {
        // Debian's prometheus package ships promtool; the package lists may need
        // an update on a fresh machine.
        for update in [false, true] {
            if update {
                let _ = Command::new("apt-get").args(["update", "-qq"]).output();
            }
            let _ = Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "prometheus",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output();
            if have("promtool") {
                break;
            }
        }
    }
    if !have("promtool") {
        eprintln!(
            "skipped the promtool check: promtool (Debian's prometheus package) is not installed and cannot be installed here"
        );
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), metrics.as_bytes()).expect("stdin");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

#[test]
fn a_vm_process_killed_by_hand_is_running_again_by_self_heal() {
    if skip_without_tools() {
        return;
    }
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and the test runs a VM");
        return;
    }
    let g = GitOps::up("ctl-heal", Some(VM_APP), &[]);
    let pid = vmm_pid(g.dir(), "app").expect("app's cairn-vmm runs");
    let killed = Instant::now();
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = g.cluster.status_json();
        let app = status["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "app")
            .cloned()
            .expect("app");
        if app["state"] == "running" && app["starts"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "not healed: {app}\n{}", g.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "killed → running again: {} ms",
        killed.elapsed().as_millis()
    );
    // The event follows the repair's end (journal and placement written).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !g.events().iter().any(|e| {
        e["kind"] == "drift"
            && e["result"] == "repaired"
            && e["object"].as_str().unwrap_or("").contains("vm app")
    }) {
        assert!(
            Instant::now() < deadline,
            "no drift repaired event: {}",
            g.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(vmm_pid(g.dir(), "app"), Some(pid));
    let (_, metrics) = g.get("/metrics", false).expect("metrics");
    assert!(
        !metrics.contains("cairn_controller_drift_repaired_total 0"),
        "{metrics}"
    );

    // Killed again right after the controller restarted it: crash-looping. It is
    // not restarted at once (backoff 5 s after the first restart), and is running
    // again after the backoff.
    let pid = vmm_pid(g.dir(), "app").expect("app's cairn-vmm runs again");
    let again = Instant::now();
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let looping = loop {
        if let Some(e) = g
            .events()
            .into_iter()
            .find(|e| e["kind"] == "crash-loop" && e["object"] == "vm app")
        {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no crash-loop event: {}",
            g.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        looping["reason"]
            .as_str()
            .unwrap()
            .contains("crash-looping; next restart in"),
        "{looping}"
    );
    let (_, metrics) = g.get("/metrics", false).expect("metrics");
    assert!(
        metrics.contains("cairn_controller_vms{state=\"crash-looping\"} 1"),
        "{metrics}"
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = g.cluster.status_json();
        let app = status["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "app")
            .cloned()
            .expect("app");
        if app["state"] == "running" && app["starts"] == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not restarted after its backoff: {app}\n{}",
            g.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let waited = again.elapsed();
    eprintln!("crash-looping VM restarted after {} ms", waited.as_millis());
    assert!(
        waited >= Duration::from_secs(3),
        "restarted at once, not after a backoff: {waited:?}"
    );
}

#[test]
fn kill_9_of_the_controller_during_a_sync_is_settled_after_a_restart_and_no_step_runs_twice() {
    if skip_without_tools() {
        return;
    }
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and the sync starts VMs");
        return;
    }
    let mut g = GitOps::up("ctl-kill", None, &[("CAIRN_APPLY_STEP_DELAY_MS", "300")]);
    let vms: String = (1..=4)
        .map(|i| VM_APP.replace("\"app\"", &format!("\"app{i}\"")))
        .collect();
    std::fs::write(g.dir().join("workloads.kdl"), vms).expect("workloads");
    let commit = g.commit("trusted", "four VMs");
    g.push(false);
    // Wait until some steps are done (step events are written at most a
    // quarter second after their step), then kill -9 in the middle.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = g
            .events()
            .iter()
            .filter(|e| e["kind"] == "step" && e["commit"] == commit.as_str())
            .count();
        if done >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", g.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    g.stop(true);
    assert!(
        !g.events_after_kill_contain_sync(&commit),
        "the sync ended before the kill; the test needs a longer step delay"
    );
    let status = g.cluster.status_json();
    let last = status["last_apply"].clone();
    assert_eq!(last["finished"], false, "{status}");

    // Restart without the delay: it settles the interrupted execution and finishes.
    g.extra_env.clear();
    g.start();
    let e = g.wait_sync(&commit, Duration::from_secs(60));
    // `partial` when a node was too slow to answer on a loaded machine: drift
    // checks then finish the commit.
    assert!(
        e["result"] == "succeeded" || e["result"] == "partial",
        "{e}\n{}",
        g.log()
    );
    let events = g.events();
    assert!(
        events.iter().any(|e| e["kind"] == "settled"),
        "settled event: {events:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = g.cluster.status_json();
        let vms: Vec<&Value> = status["vms"].as_array().unwrap().iter().collect();
        if vms.len() == 4 && vms.iter().all(|v| v["state"] == "running") {
            break status;
        }
        assert!(Instant::now() < deadline, "{status}\n{}", g.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["last_apply"]["in_flight"], 0, "{status}");
    for vm in status["vms"].as_array().unwrap() {
        assert_eq!(vm["starts"], 1, "started exactly once: {vm}");
    }
}

impl GitOps {
    /// Reads the controller's event file after the controller died (nobody holds it).
    fn events_after_kill_contain_sync(&self, commit: &str) -> bool {
        let log = ::controller::events::EventLog::open(&self.data_dir().join("events.redb"))
            .expect("events.redb opens once the controller is dead");
        log.newest(2000, Some("sync"))
            .expect("events")
            .iter()
            .any(|e| e.commit.as_deref() == Some(commit))
    }
}

#[test]
fn a_node_that_stops_answering_is_reported_and_the_controller_keeps_going() {
    if skip_without_tools() {
        return;
    }
    let mut g = GitOps::up("ctl-node", None, &[]);
    let (_, pid) = g
        .cluster
        .pids()
        .into_iter()
        .find(|(name, _)| name == "lab-3")
        .expect("lab-3 runs");
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let event = loop {
        if let Some(e) = g
            .events()
            .into_iter()
            .find(|e| e["kind"] == "node" && e["object"] == "node lab-3")
        {
            break e;
        }
        assert!(Instant::now() < deadline, "{}", g.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(event["result"], "unreachable", "{event}");
    assert!(
        event["reason"]
            .as_str()
            .unwrap()
            .contains("its objects are left alone"),
        "{event}"
    );
    let (_, metrics) = g.get("/metrics", false).expect("metrics");
    let unreachable: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cairn_controller_nodes{state=\"unreachable\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(unreachable >= 1, "{metrics}");
    // Still serving, and a new commit is still synced (its plan leaves lab-3 alone).
    assert_eq!(g.get("/readyz", false).map(|(s, _)| s), Some(200));
    std::fs::write(g.dir().join("workloads.kdl"), "// still nothing\n").expect("workloads");
    let commit = g.commit("trusted", "a commit while lab-3 is down");
    g.push(false);
    let e = g.wait_sync(&commit, Duration::from_secs(60));
    assert!(
        e["result"] == "succeeded" || e["result"] == "partial",
        "{e}"
    );
    // SIGTERM: a graceful stop removes the lock and URL files, so `cairn apply`
    // and `cairn status` no longer see a controller.
    g.stop(false);
    assert!(!g.data_dir().join("controller.lock").exists());
    assert!(!g.data_dir().join("controller.url").exists());
    let apply = g
        .cluster
        .cairn_unattended(&["apply", ".", "--auto-approve"]);
    assert!(!apply.stderr.contains("a cairn controller"), "{apply:?}");
}
