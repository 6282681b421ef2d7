//! The GitOps quickstart: `cairn dev up DIR --gitops` leaves a controller that a
//! newcomer drives with `git commit && git push` from the working clone it made.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::engine::{Cluster, gitops_up_args, kvm_usable, quickstart_copy};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.code().is_some())
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cairn status --format json` of the spec root (through the controller).
fn status(cluster: &Cluster) -> Value {
    let out = cluster
        .command(&["status", ".", "--format", "json"])
        .output()
        .expect("cairn status runs");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Waits until the controller's last sync is `commit` and succeeded.
fn wait_synced(cluster: &Cluster, commit: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(cluster);
        let last = &s["controller"]["last_sync"];
        if last["commit"] == commit && last["result"] == "succeeded" {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "commit {commit} not synced in {timeout:?}; status: {s:#}\ncontroller log:\n{}",
            std::fs::read_to_string(cluster.path().join(".cairn/dev/controller.log"))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn dev_up_gitops_ends_with_a_controller_that_a_signed_git_push_drives() {
    for tool in ["git", "ssh-keygen"] {
        if !have(tool) {
            eprintln!("skipped: `{tool}` is not installed; the GitOps quickstart needs it");
            return;
        }
    }
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and the pushed commits start VMs");
        return;
    }
    // Dropping the cluster runs `dev down`, which stops the controller too.
    let cluster = Cluster {
        dir: quickstart_copy("gitops-quickstart"),
    };
    let args = gitops_up_args();
    let out = cluster
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .expect("cairn dev up runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dev up --gitops failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let work = cluster.path().join(".cairn/dev/gitops/work");
    assert!(
        stdout.contains(&format!("cd {}", work.display())) && stdout.contains("git push"),
        "dev up says where to push from: {stdout}"
    );

    // The seed commit is signed by the dev key, which the controller trusts.
    let seed = git(&work, &["rev-parse", "HEAD"]).trim().to_owned();
    let verified = git(&work, &["log", "--show-signature", "-1"]);
    assert!(verified.contains("Good \"git\" signature"), "{verified}");
    let s = wait_synced(&cluster, &seed, Duration::from_secs(60));
    let running = |s: &Value| -> Vec<String> {
        s["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["state"] == "running")
            .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        running(&s).len(),
        5,
        "the seed commit runs the quickstart: {s:#}"
    );

    // The newcomer's loop: edit, commit (signed by the clone's config), push.
    let workloads = work.join("workloads.kdl");
    let text = std::fs::read_to_string(&workloads).expect("read workloads.kdl");
    assert!(text.contains("replicas=3"), "{text}");
    std::fs::write(&workloads, text.replace("replicas=3", "replicas=4")).expect("write");
    git(&work, &["commit", "-q", "-am", "web: a fourth replica"]);
    git(&work, &["push", "-q", "origin", "main"]);
    let head = git(&work, &["rev-parse", "HEAD"]).trim().to_owned();
    let s = wait_synced(&cluster, &head, Duration::from_secs(60));
    let vms = running(&s);
    assert!(vms.iter().any(|v| v == "web-3"), "web-3 runs: {s:#}");
    // Status judges against the applied commit, not DIR's older files: web-3 is
    // in the spec there, so nothing has drifted.
    let drifted: Vec<&Value> = s["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["drift"] != "none")
        .collect();
    assert!(drifted.is_empty(), "no drift after the sync: {drifted:#?}");
    let text = cluster
        .command(&["status", "."])
        .output()
        .expect("cairn status runs");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        !text.contains("not-in-spec") && text.contains("Controller:"),
        "{text}"
    );
}
