//! Controller replicas on etcd (issue 24, items 1-2): three `cairn controller`
//! processes share one etcd (127.0.0.31) and one dev cluster; one leads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::controller::{GitOps, VM_APP, run_ok, skip_without_tools};
use crate::engine::{free_port, kvm_usable};

/// The election's lease TTL in these tests.
const TTL: Duration = Duration::from_secs(3);

/// One `cairn controller --state etcd://…` process.
struct Replica {
    name: String,
    child: Option<Child>,
    listen: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Replica {
    fn start(g: &GitOps, n: usize, url: &str, env: &[(&str, &str)]) -> Replica {
        let name = format!("ctl-{n}");
        let data_dir = g.keys.0.join(&name);
        std::fs::create_dir_all(&data_dir).expect("data dir");
        // Every replica signs with the one controller key the nodes trust.
        for file in ["controller.key", "controller.pub"] {
            std::fs::copy(g.data_dir().join(file), data_dir.join(file)).expect("controller key");
        }
        let log = g.keys.0.join(format!("{name}.log"));
        let listen = format!("127.0.0.{}:{}", 31 + n, free_port());
        let file = std::fs::File::create(&log).expect("log");
        let mut cmd = g.cluster.command(&[
            "controller",
            "--data-dir",
            &data_dir.display().to_string(),
            "--trusted-keys",
            &g.keys.0.join("allowed-signers").display().to_string(),
            "--listen",
            &listen,
            "--grpc-listen",
            "none",
            "--drift-interval",
            "1s",
            "--parallelism",
            "1",
            "--state",
            url,
            "--repo",
            &g.bare.display().to_string(),
        ]);
        cmd.env("CAIRN_ETCD_LEASE_TTL_S", TTL.as_secs().to_string());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("cairn controller starts");
        Replica {
            name,
            child: Some(child),
            listen,
            data_dir,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn log(&self) -> String {
        format!(
            "--- {} ({}):\n{}",
            self.name,
            self.listen,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    fn get(&self, path: &str) -> Option<Value> {
        let token = std::fs::read_to_string(self.data_dir.join("controller.token")).ok()?;
        let answer = ::controller::control::request(
            &format!("http://{}", self.listen),
            "GET",
            path,
            Some(token.trim()),
            Duration::from_secs(10),
        )
        .ok()?;
        (answer.status == 200)
            .then(|| serde_json::from_str(&answer.body).ok())
            .flatten()
    }

    fn replicas(&self) -> Value {
        self.get("/api/v1/status")
            .map(|s| s["controller"]["replicas"].clone())
            .unwrap_or(Value::Null)
    }

    fn leading(&self) -> bool {
        self.replicas()["leading"] == true
    }

    /// The events this replica recorded (every replica shows one shared history).
    fn events(&self) -> Vec<Value> {
        let me = self.url();
        self.all_events()
            .into_iter()
            .filter(|e| e["replica"] == me.as_str())
            .collect()
    }

    /// The shared history, as this replica shows it.
    fn all_events(&self) -> Vec<Value> {
        self.get("/api/v1/events?limit=2000")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Its HTTP URL (how events and followers name it).
    fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    fn has_event(&self, kind: &str, commit: &str) -> Option<Value> {
        self.events()
            .into_iter()
            .find(|e| e["kind"] == kind && e["commit"] == commit && e["result"] != "scheduled")
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn wait<T>(
    what: &str,
    timeout: Duration,
    logs: &dyn Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {timeout:?}:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Why these tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if skip_without_tools() {
        return Some("tools missing (see above)".into());
    }
    if !kvm_usable() {
        return Some("/dev/kvm is not usable here, and the syncs start VMs".into());
    }
    state_etcd::testing::binary().err()
}

fn vms(g: &GitOps) -> Vec<Value> {
    g.cluster.status_json()["vms"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Every VM of `names` runs, each started exactly once (the nodes' own counters).
fn all_running_once(g: &GitOps, names: &[String], logs: &dyn Fn() -> String) {
    let vms = wait("every VM running", Duration::from_secs(90), logs, || {
        let vms = vms(g);
        let running = names.iter().all(|n| {
            vms.iter()
                .any(|v| v["name"] == n.as_str() && v["state"] == "running")
        });
        running.then_some(vms)
    });
    for vm in &vms {
        assert_eq!(vm["starts"], 1, "started exactly once: {vm}\n{}", logs());
    }
    assert_eq!(vms.len(), names.len(), "{vms:?}");
}

/// Appends the VM `name` (the quickstart's app VM renamed) to the specs and commits
/// it, signed by the trusted key; the commit's id.
fn add_vm(g: &GitOps, name: &str, message: &str) -> String {
    let workloads = g.dir().join("workloads.kdl");
    let before = std::fs::read_to_string(&workloads).unwrap();
    let vm = VM_APP.replace("\"app\"", &format!("\"{name}\""));
    std::fs::write(&workloads, format!("{before}{vm}")).unwrap();
    g.commit("trusted", message)
}

fn node_tokens(dir: &Path) -> Vec<u64> {
    ["lab-1", "lab-2", "lab-3"]
        .iter()
        .map(|node| {
            let text =
                std::fs::read_to_string(dir.join("dev").join(node).join("fence-tokens.json"))
                    .unwrap_or_default();
            let tokens: std::collections::BTreeMap<String, u64> =
                serde_json::from_str(&text).unwrap_or_default();
            tokens.values().copied().max().unwrap_or(0)
        })
        .collect()
}

#[test]
fn three_controllers_on_etcd_the_leader_killed_mid_sync_another_finishes_it_and_a_frozen_one_is_refused()
 {
    if let Some(why) = missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let (g, first) = GitOps::prepare("replicas", None, &[]);
    let etcd_dir = crate::TempDir::new("replicas-etcd");
    let etcd = state_etcd::testing::Etcd::start(
        "127.0.0.31",
        crate::simulate::free_ports("127.0.0.31", 2),
        &etcd_dir.0,
    )
    .expect("etcd starts");
    let url = etcd.url("cairn");
    let delay = [("CAIRN_APPLY_STEP_DELAY_MS", "400")];
    let mut replicas: Vec<Replica> = (1..=3)
        .map(|n| Replica::start(&g, n, &url, &delay))
        .collect();
    let logs = |replicas: &[Replica]| {
        replicas
            .iter()
            .map(Replica::log)
            .collect::<Vec<_>>()
            .join("\n")
    };
    // One leads; the first commit is synced by it alone.
    let leader = wait(
        "a leader",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || replicas.iter().position(Replica::leading),
    );
    let first_sync = wait(
        "the first sync",
        Duration::from_secs(60),
        &|| logs(&replicas),
        || replicas[leader].has_event("sync", &first),
    );
    assert!(
        first_sync["result"] == "succeeded" || first_sync["result"] == "partial",
        "{first_sync}\n{}",
        logs(&replicas)
    );
    for (i, r) in replicas.iter().enumerate() {
        if i != leader {
            assert!(
                r.has_event("sync-started", &first).is_none(),
                "{}",
                logs(&replicas)
            );
            assert_eq!(
                r.replicas()["leader"],
                format!("http://{}", replicas[leader].listen)
            );
        }
    }
    // A follower refuses writes, naming the leader.
    let follower = (leader + 1) % 3;
    let answer = ::controller::control::request(
        &format!("http://{}", replicas[follower].listen),
        "POST",
        "/api/v1/sync",
        std::fs::read_to_string(replicas[follower].data_dir.join("controller.token"))
            .ok()
            .as_deref()
            .map(str::trim),
        Duration::from_secs(10),
    )
    .expect("the follower answers");
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(
        answer.body.contains(&replicas[leader].listen),
        "{}",
        answer.body
    );

    // The controller key is rotated through the leader: the followers, which hold a
    // copy of the same key, switch with it (`keys::follow_rotation`), so whichever
    // replica leads next is trusted by the nodes (the kill, the freeze and the
    // restore below run on the rotated key). A follower refuses the rotation.
    let refused = controller_action(&g, &replicas[follower], &["key", "rotate"]);
    assert_eq!(refused.code, 2, "{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains(&replicas[leader].listen),
        "{}",
        refused.stderr
    );
    let rotated = controller_action(
        &g,
        &replicas[leader],
        &["key", "rotate", "--format", "json"],
    );
    assert_eq!(rotated.code, 0, "{}{}", rotated.stdout, rotated.stderr);
    let report: Value = serde_json::from_str(&rotated.stdout).expect("a key report");
    let next = report["to"].as_str().expect("the next key").to_owned();
    let public = |r: &Replica| {
        std::fs::read_to_string(r.data_dir.join("controller.pub"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    wait(
        "every replica signs with the next key",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || replicas.iter().all(|r| public(r) == next).then_some(()),
    );
    // The operator's copy of the key (the audit verification and the restore below).
    for file in ["controller.key", "controller.pub"] {
        std::fs::copy(
            replicas[leader].data_dir.join(file),
            g.data_dir().join(file),
        )
        .expect("the rotated key");
    }

    // Four VMs; the leader is killed after its third step.
    let names: Vec<String> = (1..=4).map(|i| format!("app{i}")).collect();
    let specs: String = names
        .iter()
        .map(|n| VM_APP.replace("\"app\"", &format!("\"{n}\"")))
        .collect();
    std::fs::write(g.dir().join("workloads.kdl"), specs).expect("workloads");
    let commit = g.commit("trusted", "four VMs");
    g.push(false);
    wait(
        "three steps",
        Duration::from_secs(60),
        &|| logs(&replicas),
        || {
            let steps = replicas[leader]
                .events()
                .iter()
                .filter(|e| e["kind"] == "step" && e["commit"] == commit.as_str())
                .count();
            (steps >= 3).then_some(())
        },
    );
    let old_token = replicas[leader].replicas()["fencing_token"]
        .as_u64()
        .unwrap();
    replicas[leader].kill9();
    let killed = Instant::now();
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let second = wait(
        "a new leader",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || others.iter().copied().find(|i| replicas[*i].leading()),
    );
    let elected = killed.elapsed();
    wait(
        "the new leader's sync",
        Duration::from_secs(60),
        &|| logs(&replicas),
        || replicas[second].has_event("sync-started", &commit),
    );
    let syncing = killed.elapsed();
    let sync = wait(
        "the sync's end",
        Duration::from_secs(90),
        &|| logs(&replicas),
        || replicas[second].has_event("sync", &commit),
    );
    eprintln!(
        "failover (lease TTL {} ms): leader killed -> new leader elected {} ms, -> syncing {} ms",
        TTL.as_millis(),
        elected.as_millis(),
        syncing.as_millis()
    );
    assert!(
        sync["result"] == "succeeded" || sync["result"] == "partial",
        "{sync}\n{}",
        logs(&replicas)
    );
    assert!(
        replicas[second]
            .events()
            .iter()
            .any(|e| e["kind"] == "settled"),
        "the new leader settled the killed one's execution:\n{}",
        logs(&replicas)
    );
    all_running_once(&g, &names, &|| logs(&replicas));
    // Every replica shows the one history: the follower shows the killed leader's
    // steps and the new leader's sync, and the new leader's last sync as its own.
    let follower = others.iter().copied().find(|i| *i != second).unwrap();
    let history = replicas[follower].all_events();
    let by = |replica: usize, kind: &str| {
        history.iter().any(|e| {
            e["replica"] == replicas[replica].url().as_str()
                && e["kind"] == kind
                && e["commit"] == commit.as_str()
        })
    };
    assert!(
        by(leader, "step") && by(second, "sync"),
        "the follower's events hold the killed leader's steps and the new leader's sync:\n{history:#?}"
    );
    let status = replicas[follower].get("/api/v1/status").unwrap();
    assert_eq!(
        status["controller"]["last_sync"]["commit"], sync["commit"],
        "a follower shows the leader's last sync: {:#}",
        status["controller"]
    );
    let second_token = replicas[second].replicas()["fencing_token"]
        .as_u64()
        .unwrap();
    assert!(second_token > old_token);

    // SIGSTOP the leader past its lease: the third takes over and its drift checks
    // reach every node with its higher token.
    let third = others.iter().copied().find(|i| *i != second).unwrap();
    let frozen = replicas[second].pid().to_string();
    run_ok(Command::new("kill").args(["-STOP", &frozen]));
    wait(
        "the third leads",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || replicas[third].leading().then_some(()),
    );
    let third_token = replicas[third].replicas()["fencing_token"]
        .as_u64()
        .unwrap();
    assert!(third_token > second_token);
    wait(
        "every node saw the third's token",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || {
            node_tokens(&g.data_dir())
                .iter()
                .all(|t| *t == third_token)
                .then_some(())
        },
    );
    let before = std::fs::read_to_string(&replicas[second].log)
        .unwrap_or_default()
        .len();
    run_ok(Command::new("kill").args(["-CONT", &frozen]));
    // The woken leader stops by its own timer: it says so, and acts no more.
    let after = wait(
        "the woken leader steps down",
        Duration::from_secs(15),
        &|| logs(&replicas),
        || {
            let log = std::fs::read_to_string(&replicas[second].log).unwrap_or_default();
            log[before..]
                .contains("lost leadership")
                .then(|| log[before..].to_owned())
        },
    );
    assert!(!replicas[second].leading(), "{after}");
    // Its token is refused by every node and by etcd.
    let key = proto::auth::Identity::load(&g.data_dir().join("controller.key")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for node in g.cluster.status_json()["nodes"].as_array().unwrap() {
        let fence = proto::fence::SharedFence::default();
        fence.set(proto::fence::FenceState {
            token: second_token,
            acting_until: Some(Instant::now() + Duration::from_secs(60)),
            not_before: None,
        });
        let signer = proto::auth::RequestSigner::new(key.clone()).with_fence(fence);
        let address = node["address"].as_str().unwrap().to_owned();
        let refused = runtime.block_on(async move {
            let mut client = proto::client::NodeClient::connect(&address, signer)
                .await
                .expect("connects");
            client.get_inventory().await.unwrap_err()
        });
        assert_eq!(
            format!("{:?}", refused.code()),
            "FailedPrecondition",
            "{refused:?}"
        );
        assert!(
            refused.message().contains("fenced"),
            "{}",
            refused.message()
        );
    }
    // Nothing ran twice through all of it, and a new commit is the third's to apply.
    let fifth = add_vm(&g, "app5", "a fifth VM");
    g.push(false);
    wait(
        "the third syncs it",
        Duration::from_secs(60),
        &|| logs(&replicas),
        || replicas[third].has_event("sync", &fifth),
    );
    assert!(replicas[second].has_event("sync-started", &fifth).is_none());
    let mut all = names.clone();
    all.push("app5".into());
    all_running_once(&g, &all, &|| logs(&replicas));
    // The audit log the three leaders wrote in etcd is one intact chain, signed by the
    // controller key (`cairn audit verify --state etcd://…`).
    let verified = crate::cairn(
        g.dir(),
        &["audit", "verify", ".", "--state", &url, "--offline"],
    );
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    assert!(
        verified
            .stdout
            .contains(&format!("audit log {url}: intact:")),
        "{}",
        verified.stdout
    );

    // An operator's pause outlives the leader that took it: paused through the
    // third, which is then killed, the second (woken above, still running) leads
    // paused and holds a new commit until it is resumed through it.
    let paused = controller_action(&g, &replicas[third], &["pause"]);
    assert_eq!(paused.code, 0, "{}{}", paused.stdout, paused.stderr);
    replicas[third].kill9();
    wait(
        "the second leads again",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || replicas[second].leading().then_some(()),
    );
    let sixth = add_vm(&g, "app6", "a sixth VM, pushed while paused");
    g.push(false);
    let held = wait(
        "the new leader holds it, paused",
        Duration::from_secs(60),
        &|| logs(&replicas),
        || replicas[second].has_event("sync", &sixth),
    );
    assert_eq!(held["result"], "held", "{held:#}");
    assert!(
        replicas[second]
            .events()
            .iter()
            .any(|e| e["kind"] == "paused"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("taken over from the shared store"))),
        "{}",
        logs(&replicas)
    );
    let resumed = controller_action(&g, &replicas[second], &["resume"]);
    assert_eq!(resumed.code, 0, "{}{}", resumed.stdout, resumed.stderr);
    wait(
        "the second syncs it once resumed",
        Duration::from_secs(60),
        &|| logs(&replicas),
        || {
            replicas[second].events().into_iter().find(|e| {
                e["kind"] == "sync"
                    && e["commit"] == sixth.as_str()
                    && e["result"] != "held"
                    && e["result"] != "scheduled"
            })
        },
    );

    // The control plane lost and restored from a backup into a new etcd: the restored
    // controller leads with a token above every token the nodes saw (its etcd's
    // revisions start low again), syncs a new commit, ran nothing twice, and its
    // audit chain is the old one.
    let file = g.keys.0.join("state-backup.jsonl");
    let backed = crate::cairn(
        g.dir(),
        &[
            "controller",
            "backup",
            "--state",
            &url,
            "--out",
            &file.display().to_string(),
        ],
    );
    assert_eq!(backed.code, 0, "{}{}", backed.stdout, backed.stderr);
    assert!(backed.stdout.contains("backed up"), "{}", backed.stdout);
    let last_token = node_tokens(&g.data_dir()).into_iter().max().unwrap();
    drop(replicas);
    drop(etcd);
    let new_dir = crate::TempDir::new("replicas-etcd-restored");
    let new_etcd = state_etcd::testing::Etcd::start(
        "127.0.0.31",
        crate::simulate::free_ports("127.0.0.31", 2),
        &new_dir.0,
    )
    .expect("the new etcd starts");
    let new_url = new_etcd.url("restored");
    let restored = crate::cairn(
        g.dir(),
        &[
            "controller",
            "restore",
            "--state",
            &new_url,
            &file.display().to_string(),
        ],
    );
    assert_eq!(restored.code, 0, "{}{}", restored.stdout, restored.stderr);
    let again = crate::cairn(
        g.dir(),
        &[
            "controller",
            "restore",
            "--state",
            &new_url,
            &file.display().to_string(),
        ],
    );
    assert_eq!(again.code, 1, "{}{}", again.stdout, again.stderr);
    assert!(
        again.stderr.contains("only into an empty prefix"),
        "{}",
        again.stderr
    );
    let replicas = vec![Replica::start(&g, 0, &new_url, &[])];
    wait(
        "the restored controller leads",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || replicas[0].leading().then_some(()),
    );
    let restored_token = replicas[0].replicas()["fencing_token"].as_u64().unwrap();
    assert!(
        restored_token > last_token,
        "the restored leader's token {restored_token} outranks the nodes' {last_token}"
    );
    wait(
        "every node accepted the restored leader's token",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || {
            node_tokens(&g.data_dir())
                .iter()
                .all(|t| *t == restored_token)
                .then_some(())
        },
    );
    let seventh = add_vm(&g, "app7", "a seventh VM, after the restore");
    g.push(false);
    let synced = wait(
        "the restored controller syncs it",
        Duration::from_secs(90),
        &|| logs(&replicas),
        || replicas[0].has_event("sync", &seventh),
    );
    assert!(
        synced["result"] == "succeeded" || synced["result"] == "partial",
        "{synced}\n{}",
        logs(&replicas)
    );
    let mut all = all.clone();
    all.push("app6".into());
    all.push("app7".into());
    all_running_once(&g, &all, &|| logs(&replicas));
    let verified = crate::cairn(
        g.dir(),
        &["audit", "verify", ".", "--state", &new_url, "--offline"],
    );
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    eprintln!(
        "restore: {} / {}; the restored leader's token {restored_token} (the nodes had {last_token})",
        backed.stdout.trim(),
        restored.stdout.trim()
    );
    drop(replicas);
    drop(new_etcd);
}

/// `cairn controller ARGS…` (pause, resume, key rotate) through replica `r`, signed
/// with the trusted key.
fn controller_action(g: &GitOps, r: &Replica, args: &[&str]) -> crate::Run {
    let key = g.keys.0.join("trusted").display().to_string();
    let data_dir = r.data_dir.display().to_string();
    let mut all = vec!["controller"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--data-dir", &data_dir, "--key", &key]);
    g.cluster
        .command(&all)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::null())
        .output()
        .expect("cairn runs")
        .into()
}
