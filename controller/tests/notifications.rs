//! Notifications (`--notify FILE`) from a controller started in-process
//! (`controller::start`) whose only commit is signed but does not compile: its
//! sync fails, and that one event reaches a generic JSON receiver (HMAC-signed)
//! and a Slack-compatible one, exactly once each, although the first receiver
//! in the file accepts connections and never answers. A flood of events for
//! that hung receiver returns at once (its queue drops, counted in /metrics),
//! and a receiver whose port is closed is counted as failed after its retries
//! and logged as a `notify` event.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use controller::events::Event;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One received POST: its headers (lower-case names) and body.
#[derive(Debug)]
struct Post {
    headers: Vec<(String, String)>,
    body: serde_json::Value,
    raw: Vec<u8>,
}

/// A receiver answering 200 to every POST; each one is sent to the channel.
fn receiver() -> (String, mpsc::Receiver<Post>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = vec![];
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let Some((name, value)) = line.trim_end().split_once(": ") else {
                    break;
                };
                headers.push((name.to_ascii_lowercase(), value.to_owned()));
            }
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .unwrap();
            let mut raw = vec![0; length];
            reader.read_exact(&mut raw).unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            let body = serde_json::from_slice(&raw).unwrap();
            if tx.send(Post { headers, body, raw }).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

fn setup(dir: &Path, receivers: &str) {
    std::fs::create_dir_all(dir.join("repo")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f"])
            .arg(dir.join("key")),
    );
    let public = std::fs::read_to_string(dir.join("key.pub")).unwrap();
    std::fs::write(
        dir.join("allowed-signers"),
        format!("ops@example.com {public}"),
    )
    .unwrap();
    std::fs::write(dir.join("secret"), "s3cret\n").unwrap();
    std::fs::write(dir.join("notify.kdl"), receivers).unwrap();
    std::fs::write(
        dir.join("repo/cluster.kdl"),
        "site \"a\" {\n  bogus-node 1\n}\n",
    )
    .unwrap();
    let key = dir.join("key");
    let git = |args: &[&str]| {
        run_ok(
            Command::new("git")
                .current_dir(dir.join("repo"))
                .args(["-c", "user.name=Op", "-c", "user.email=ops@example.com"])
                .args(["-c", "gpg.format=ssh", "-c"])
                .arg(format!("user.signingkey={}", key.display()))
                .args(args),
        )
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-S", "-m", "does not compile"]);
}

fn metric(handle: &controller::Handle, receiver: &str, result: &str) -> u64 {
    handle
        .shared
        .metrics
        .notifications
        .with_label_values(&[receiver, result])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_is_sent_once_in_each_format_and_a_hung_receiver_slows_nothing() {
    let dir =
        Dir(std::env::temp_dir().join(format!("cairn-notify-{}", reconciler::state::random_id())));
    let (json_url, json_posts) = receiver();
    let (slack_url, slack_posts) = receiver();
    // Accepts (the kernel's backlog) and never answers.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    setup(
        &dir.0,
        &format!(
            r#"receiver "hung" {{
    format "json"
    url "http://{}/"
    events "sync:failed" "flood"
}}
receiver "hook" {{
    format "json"
    url "{json_url}"
    events "sync:failed" "drift:found"
    secret-file "{}"
}}
receiver "chat" {{
    format "slack"
    url "{slack_url}"
    events "sync:failed"
}}
receiver "closed" {{
    format "slack"
    url "{closed_url}"
    events "closed-test"
}}
"#,
            hung.local_addr().unwrap(),
            dir.0.join("secret").display()
        ),
    );
    let handle = controller::start(controller::Config {
        repo: dir.0.join("repo"),
        branch: "main".to_owned(),
        subdir: PathBuf::new(),
        data_dir: dir.0.join("data"),
        trusted_keys: Some(dir.0.join("allowed-signers")),
        state: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        grpc_listen: None,
        poll: Duration::from_secs(60),
        drift_interval: Duration::from_secs(60),
        self_heal: true,
        parallelism: 1,
        remote: None,
        webhook_secret: None,
        notify: Some(dir.0.join("notify.kdl")),
    })
    .await
    .unwrap();

    let wait = |rx: &mpsc::Receiver<Post>| rx.recv_timeout(Duration::from_secs(20));
    let json = wait(&json_posts).expect("the json receiver is notified");
    let slack = wait(&slack_posts).expect("the slack receiver is notified");
    let failed = handle
        .shared
        .events
        .newest(50, Some("sync"))
        .unwrap()
        .into_iter()
        .find(|e| e.result == "failed")
        .expect("the sync failed");
    assert_eq!(json.body["event"]["kind"], "sync");
    assert_eq!(json.body["event"]["result"], "failed");
    assert_eq!(json.body["event"]["reason"], failed.reason.clone().unwrap());
    assert_eq!(json.body["branch"], "main");
    let header = |name: &str| {
        json.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("x-cairn-event").as_deref(), Some("sync:failed"));
    assert_eq!(
        header("x-cairn-signature"),
        Some(format!(
            "sha256={}",
            proto::auth::to_hex(&controller::notifications::hmac_sha256(
                b"s3cret", &json.raw
            ))
        ))
    );
    let text = slack.body["text"].as_str().unwrap();
    assert!(text.contains("sync failed at commit "), "{text}");
    assert!(text.contains("do not compile"), "{text}");
    // Delivered despite the hung receiver listed first: in the second after
    // the event, not after its 5 s timeout.
    let delay = reconciler::state::now_ms() - failed.at_unix_ms;
    assert!(delay < 4_000, "notified {delay} ms after the event");
    // Once each.
    std::thread::sleep(Duration::from_secs(1));
    assert!(json_posts.try_recv().is_err() && slack_posts.try_recv().is_err());
    assert_eq!(metric(&handle, "hook", "sent"), 1);
    assert_eq!(metric(&handle, "chat", "sent"), 1);

    // A flood for the hung receiver: never waits; beyond its queue, dropped.
    // Recording writes the event log (redb, fsync) whatever is notified, so the
    // flood is compared with as many events no receiver wants, recorded just
    // before: a hung receiver that made recording wait would add its 5 s timeout.
    let events = controller::notifications::QUEUE + 50;
    let t = Instant::now();
    for _ in 0..events {
        handle.shared.record(vec![Event::new("unwatched", "ok")]);
    }
    let baseline = t.elapsed();
    let t = Instant::now();
    for _ in 0..events {
        handle.shared.record(vec![Event::new("flood", "ok")]);
    }
    let flood = t.elapsed();
    assert!(
        flood < baseline * 2 + Duration::from_secs(2),
        "recording {events} events for a hung receiver took {flood:?}, {baseline:?} for none"
    );
    assert!(metric(&handle, "hung", "dropped") >= 40);

    // A closed port: failed after 4 tries (1 + 2 + 4 s apart), one event.
    handle.shared.record(vec![Event::new("closed-test", "ok")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&handle, "closed", "failed") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&handle, "closed", "failed"), 1);
    let logged = handle.shared.events.newest(20, Some("notify")).unwrap();
    assert!(
        logged.iter().any(|e| e.result == "failed"
            && e.object.as_deref() == Some("receiver closed")
            && e.reason
                .as_deref()
                .is_some_and(|r| r.contains("after 4 tries"))),
        "{logged:?}"
    );
    assert!(
        handle.shared.metrics.encode().contains(
            "cairn_controller_notifications_total{receiver=\"closed\",result=\"failed\"} 1"
        )
    );
    handle.stop(Duration::from_secs(10)).await;
    drop(hung);
}
