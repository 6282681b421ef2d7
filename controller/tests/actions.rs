//! Signed single-use actions and the gRPC health service, on a controller
//! started in-process (`controller::start`) that follows a repository whose
//! only commit is unsigned (refused, so no node is ever contacted and the
//! controller is ready at once). Keys are made by `ssh-keygen`, documents are
//! signed by `ssh-keygen -Y sign` through `controller::actions::sign`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use controller::actions::{ActionDocument, Challenge, SignedAction};
use controller::control::{Answer, request, request_with_body};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A repository with one unsigned commit, keys `trusted` (a platform key of
/// `allowed-signers`) and `other`.
fn setup(tag: &str) -> Dir {
    let dir = Dir(std::env::temp_dir().join(format!(
        "cairn-actions-{tag}-{}",
        reconciler::state::random_id()
    )));
    std::fs::create_dir_all(dir.0.join("repo")).unwrap();
    for name in ["trusted", "other"] {
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(dir.0.join(name)),
        );
    }
    let public = std::fs::read_to_string(dir.0.join("trusted.pub")).unwrap();
    std::fs::write(
        dir.0.join("allowed-signers"),
        format!("ops@example.com {public}"),
    )
    .unwrap();
    std::fs::write(dir.0.join("repo/cluster.kdl"), "// nothing\n").unwrap();
    let git = |args: &[&str]| {
        run_ok(
            Command::new("git")
                .current_dir(dir.0.join("repo"))
                .args([
                    "-c",
                    "user.name=Op",
                    "-c",
                    "user.email=ops@example.com",
                    "-c",
                    "commit.gpgsign=false",
                ])
                .args(args),
        )
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "unsigned"]);
    dir
}

fn config(dir: &Path) -> controller::Config {
    controller::Config {
        repo: dir.join("repo"),
        branch: "main".to_owned(),
        subdir: PathBuf::new(),
        data_dir: dir.join("data"),
        trusted_keys: Some(dir.join("allowed-signers")),
        state: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        grpc_listen: Some("127.0.0.1:0".parse().unwrap()),
        poll: Duration::from_secs(60),
        drift_interval: Duration::from_secs(60),
        self_heal: true,
        parallelism: 1,
        remote: None,
        webhook_secret: None,
        notify: None,
    }
}

struct Api {
    url: String,
    token: String,
}

impl Api {
    fn of(handle: &controller::Handle) -> Api {
        Api {
            url: format!("http://{}", handle.address),
            token: handle.shared.token.clone(),
        }
    }

    fn challenge(&self) -> Challenge {
        let a = request(
            &self.url,
            "GET",
            "/api/v1/actions/challenge",
            Some(&self.token),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        serde_json::from_str(&a.body).unwrap()
    }

    /// A signed body for `action`, its document edited by `edit` before signing.
    fn signed(&self, action: &str, key: &Path, edit: impl FnOnce(&mut ActionDocument)) -> String {
        let mut doc = ActionDocument::new(action, &self.challenge());
        edit(&mut doc);
        let document = doc.text();
        let signature = controller::actions::sign(&document, key).unwrap();
        serde_json::to_string(&SignedAction {
            document,
            signature,
        })
        .unwrap()
    }

    fn post(&self, action: &str, body: &str, token: bool) -> Answer {
        request_with_body(
            &self.url,
            "POST",
            &format!("/api/v1/{action}"),
            token.then_some(self.token.as_str()),
            Some(body),
            Duration::from_secs(30),
        )
        .unwrap()
    }
}

async fn start_ready(dir: &Path) -> controller::Handle {
    // A restart in the same process: the last connections of the stopped
    // controller may hold its event log for a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let handle = loop {
        match controller::start(config(dir)).await {
            Ok(h) => break h,
            Err(e) if Instant::now() < deadline && format!("{e:#}").contains("already open") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:#}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !handle
        .shared
        .ready
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        assert!(Instant::now() < deadline, "the controller never got ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle
}

fn fingerprint(public: &Path) -> String {
    run_ok(Command::new("ssh-keygen").arg("-lf").arg(public))
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_fresh_action_signed_by_a_platform_key_pauses_and_each_works_once_across_restarts() {
    let dir = setup("pause");
    let handle = start_ready(&dir.0).await;
    let api = Api::of(&handle);
    let trusted = dir.0.join("trusted");
    let other = dir.0.join("other");

    // The token stays required.
    let body = api.signed("pause", &trusted, |_| {});
    let a = tokio::task::block_in_place(|| api.post("pause", &body, false));
    assert_eq!(a.status, 401, "{a:?}");

    // Unsigned: refused with how to sign.
    let a = tokio::task::block_in_place(|| api.post("pause", "", true));
    assert_eq!(a.status, 403, "{a:?}");
    assert!(
        a.body.contains("must be signed by a platform key")
            && a.body.contains("ssh-keygen -Y sign -n cairn-action"),
        "{a:?}"
    );
    // A document edited after signing: refused.
    let forged = body.replace("\\\"pause\\\"", "\\\"resume\\\"");
    let a = tokio::task::block_in_place(|| api.post("resume", &forged, true));
    assert_eq!(a.status, 403, "{a:?}");
    assert!(
        a.body.contains("does not match the signed content"),
        "{a:?}"
    );

    // Signed by a key that is not a platform key: refused, naming the key.
    let untrusted = tokio::task::block_in_place(|| api.signed("pause", &other, |_| {}));
    let a = tokio::task::block_in_place(|| api.post("pause", &untrusted, true));
    assert_eq!(a.status, 403, "{a:?}");
    let other_fp = fingerprint(&dir.0.join("other.pub"));
    assert!(
        a.body.contains(&other_fp) && a.body.contains("not a platform key"),
        "{a:?}"
    );

    // Bound to another commit than the applied one: refused, nothing done.
    let stale = tokio::task::block_in_place(|| {
        api.signed("pause", &trusted, |d| d.commit = Some("0".repeat(40)))
    });
    let a = tokio::task::block_in_place(|| api.post("pause", &stale, true));
    assert_eq!(a.status, 409, "{a:?}");
    assert!(
        a.body.contains("the cluster changed since you asked")
            && a.body.contains("applied commit 000000000000"),
        "{a:?}"
    );
    // A pause document sent to resume: refused.
    let a = tokio::task::block_in_place(|| api.post("resume", &body, true));
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.body.contains("is for `pause`, not `resume`"), "{a:?}");
    assert!(
        !handle
            .shared
            .paused
            .load(std::sync::atomic::Ordering::SeqCst)
    );

    // Signed by the platform key: paused, the signer recorded.
    let a = tokio::task::block_in_place(|| api.post("pause", &body, true));
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.contains("ops@example.com"), "{a:?}");
    assert!(
        handle
            .shared
            .paused
            .load(std::sync::atomic::Ordering::SeqCst)
    );
    let paused = handle.shared.events.newest(1, Some("paused")).unwrap();
    assert!(
        paused[0]
            .reason
            .as_deref()
            .unwrap()
            .starts_with("by ops@example.com (SHA256:"),
        "{paused:?}"
    );
    let refused = handle.shared.events.newest(10, Some("action")).unwrap();
    assert_eq!(refused.len(), 5, "{refused:?}");

    // The same document again: single-use.
    let a = tokio::task::block_in_place(|| api.post("pause", &body, true));
    assert_eq!(a.status, 403, "{a:?}");
    assert!(
        a.body.contains("already used") && a.body.contains("pause by ops@example.com"),
        "{a:?}"
    );

    // A resume used, and a challenge issued but not yet used, before a restart.
    let resume = tokio::task::block_in_place(|| api.signed("resume", &trusted, |_| {}));
    let a = tokio::task::block_in_place(|| api.post("resume", &resume, true));
    assert_eq!(a.status, 200, "{a:?}");
    let pending = api.challenge();
    handle.stop(Duration::from_secs(10)).await;

    let handle = start_ready(&dir.0).await;
    let api = Api::of(&handle);
    let a = tokio::task::block_in_place(|| api.post("resume", &resume, true));
    assert_eq!(
        a.status, 403,
        "a restart must not forget used nonces: {a:?}"
    );
    assert!(a.body.contains("already used"), "{a:?}");
    let a = tokio::task::block_in_place(|| api.post("pause", &body, true));
    assert_eq!(a.status, 403, "{a:?}");
    let document = ActionDocument::new("pause", &pending).text();
    let signature = controller::actions::sign(&document, &trusted).unwrap();
    let body = serde_json::to_string(&SignedAction {
        document,
        signature,
    })
    .unwrap();
    let a = tokio::task::block_in_place(|| api.post("pause", &body, true));
    assert_eq!(a.status, 200, "a challenge survives a restart: {a:?}");

    // The client half (what `cairn controller resume --key` runs).
    let url = api.url.clone();
    let token = api.token.clone();
    let a = tokio::task::block_in_place(|| {
        controller::actions::perform(
            &url,
            Some(&token),
            controller::actions::Request {
                action: "resume",
                path: "/api/v1/resume",
                plan_id: None,
            },
            Some(&trusted),
            Duration::from_secs(30),
        )
    })
    .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        !handle
            .shared
            .paused
            .load(std::sync::atomic::Ordering::SeqCst)
    );

    // `cairn sync` is a signed action too.
    let a = tokio::task::block_in_place(|| api.post("sync", "", true));
    assert_eq!(a.status, 403, "{a:?}");
    let sync = tokio::task::block_in_place(|| api.signed("sync", &trusted, |_| {}));
    let a = tokio::task::block_in_place(|| api.post("sync", &sync, true));
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.contains("\"result\""), "{a:?}");

    // Every accepted action is in the audit log with its signer.
    use reconciler::state::StateStore as _;
    let store = reconciler::state::RedbStore::open(&handle.shared.config.state_path()).unwrap();
    let audit: Vec<String> = store
        .audit_log()
        .unwrap()
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .filter(|e| e.contains("action-"))
        .collect();
    drop(store);
    assert_eq!(audit.len(), 5, "{audit:?}");
    assert!(
        audit.iter().all(|e| e.contains("ops@example.com")),
        "{audit:?}"
    );
    handle.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_health_service_is_serving_while_ready_and_not_serving_from_shutdown() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let dir = setup("health");
    let handle = start_ready(&dir.0).await;
    let address = handle.grpc_address.expect("a gRPC address");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = client.check(check("")).await.unwrap().into_inner().status();
        if status == ServingStatus::Serving {
            break;
        }
        assert!(Instant::now() < deadline, "never SERVING: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unknown = client.check(check("cairn.Nothing")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");

    // A real external client (Debian's python3-grpcio), when installed.
    let probe = format!(
        "import grpc\nch = grpc.insecure_channel('{address}')\ncall = ch.unary_unary('/grpc.health.v1.Health/Check', request_serializer=lambda b: b, response_deserializer=lambda b: b)\nprint(call(b'', timeout=5).hex())\n"
    );
    match Command::new("/usr/bin/python3")
        .args(["-c", &probe])
        .output()
    {
        Ok(out) if out.status.success() => {
            // HealthCheckResponse{status: SERVING (1)}: field 1, varint 1.
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0801");
        }
        Ok(out) => eprintln!(
            "skipping the python3-grpcio probe (install Debian's python3-grpcio): {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => eprintln!("skipping the python3-grpcio probe: {e}"),
    }

    // From shutdown on: NOT_SERVING (a watch sees it before the server goes).
    let mut watch = client.watch(check("")).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(handle.stop(Duration::from_secs(10)));
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a status change within 10 s")
        .unwrap()
        .expect("a status before the stream ends");
    assert_eq!(next.status(), ServingStatus::NotServing);
    stopping.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the gRPC listener is closed after stop"
    );
}
