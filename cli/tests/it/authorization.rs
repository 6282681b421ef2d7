//! Per-object authorization by tenant member keys (issue 14, item 2), on a
//! real controller, real git and keys made by `ssh-keygen`: the quickstart's
//! tenants gain member keys in a commit a platform key signs; then a
//! viewer's commit is refused naming the VM and the rule, an operator's
//! commit that also touches its quota is refused naming the quota, the same
//! operator's commit to its own tenant's VMs is applied, and a merge by a
//! platform key that brings in a viewer's commit is refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::controller::{GitOps, run_ok, skip_without_tools};
use crate::engine::kvm_usable;

const APP: &str = "vm \"app\" tenant=\"dev\" site=\"lab\" {\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n}\n";

fn vm(name: &str) -> String {
    APP.replace("\"app\"", &format!("\"{name}\""))
}

/// A key `dir/NAME` made by ssh-keygen; its public line.
fn keygen(dir: &Path, name: &str) -> String {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(dir.join(name)),
    );
    std::fs::read_to_string(dir.join(format!("{name}.pub")))
        .expect("public key")
        .trim()
        .to_owned()
}

fn vm_names(g: &GitOps) -> Vec<String> {
    g.cluster.status_json()["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| v["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Drops the branch's last commit (force-pushed next) and writes the
/// workloads with app-2 added.
fn drop_head_and_add_app_2(g: &GitOps) {
    g.git(&["reset", "-q", "--hard", "HEAD~1"]);
    std::fs::write(
        g.dir().join("workloads.kdl"),
        format!("{APP}{}", vm("app-2")),
    )
    .expect("workloads");
}

#[test]
fn a_viewers_commit_is_refused_naming_the_object_and_an_operators_own_vm_is_applied() {
    if skip_without_tools() {
        return;
    }
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and the operator's commit starts a VM");
        return;
    }
    let (mut g, _) = GitOps::prepare("ctl-authz", Some(APP), &[]);
    let operator = keygen(&g.keys.0, "operator");
    let viewer = keygen(&g.keys.0, "viewer");
    let tenants_path = g.dir().join("tenants.kdl");
    let tenants = std::fs::read_to_string(&tenants_path).expect("tenants.kdl");
    let with_keys = tenants.replace(
        "member \"dev@example.com\" role=\"admin\"",
        &format!(
            "member \"dev@example.com\" role=\"admin\"\n    member \"op@example.com\" role=\"operator\" key=\"{operator}\"\n    member \"viewer@example.com\" role=\"viewer\" key=\"{viewer}\""
        ),
    );
    assert_ne!(
        with_keys, tenants,
        "the quickstart's dev tenant has its admin"
    );
    std::fs::write(&tenants_path, &with_keys).expect("tenants.kdl");
    let keys_commit = g.commit("trusted", "members of dev get keys");
    g.push(false);
    g.start();
    let e = g.wait_sync(&keys_commit, Duration::from_secs(90));
    assert_eq!(e["result"], "succeeded", "{e}");

    // The viewer adds a VM: refused, naming it, where it is, and the rule.
    std::fs::write(
        g.dir().join("workloads.kdl"),
        format!("{APP}{}", vm("app-2")),
    )
    .expect("workloads");
    let by_viewer = g.commit("viewer", "viewer: add app-2");
    g.push(false);
    let e = g.wait_sync(&by_viewer, Duration::from_secs(30));
    assert_eq!(e["result"], "refused", "{e}");
    let reason = e["reason"].as_str().expect("reason");
    assert!(
        reason.contains("viewer@example.com, viewer of tenant dev"),
        "names the signer: {reason}"
    );
    assert!(
        reason.contains("vm app-2 (workloads.kdl:6:4) added"),
        "names the object and its place: {reason}"
    );
    assert!(
        reason.contains("viewer@example.com is a viewer of tenant dev"),
        "{reason}"
    );
    assert!(
        reason.contains("op@example.com (operator)"),
        "says who may: {reason}"
    );
    let objects = e["detail"]["refused_objects"].as_array().expect("objects");
    assert_eq!(objects.len(), 1, "{e}");
    assert_eq!(objects[0]["kind"], "vm");
    assert_eq!(objects[0]["name"], "app-2");
    assert!(
        !vm_names(&g).contains(&"app-2".to_owned()),
        "nothing applied"
    );

    // The operator raises its own quota and adds the VM: the quota is
    // refused (platform-only), so nothing is applied.
    drop_head_and_add_app_2(&g);
    std::fs::write(&tenants_path, with_keys.replace("vms=8", "vms=9")).expect("tenants");
    let quota = g.commit("operator", "operator: more VMs and app-2");
    g.push(true);
    let e = g.wait_sync(&quota, Duration::from_secs(30));
    assert_eq!(e["result"], "refused", "{e}");
    let reason = e["reason"].as_str().expect("reason");
    assert!(reason.contains("quota dev (tenants.kdl:"), "{reason}");
    assert!(reason.contains("platform-only"), "{reason}");
    assert!(
        !reason.contains("vm app-2"),
        "its own VM is allowed: {reason}"
    );
    assert!(
        !vm_names(&g).contains(&"app-2".to_owned()),
        "nothing applied"
    );

    // The same operator, its own tenant's VM only: applied.
    drop_head_and_add_app_2(&g);
    let own = g.commit("operator", "operator: add app-2");
    g.push(true);
    let e = g.wait_sync(&own, Duration::from_secs(90));
    assert_eq!(e["result"], "succeeded", "{e}");
    assert!(
        e["detail"]["signer"]
            .as_str()
            .unwrap_or("")
            .contains("op@example.com (operator of tenant dev)"),
        "{e}"
    );
    assert!(vm_names(&g).contains(&"app-2".to_owned()), "applied");

    // A merge signed by the platform key that brings in a viewer's commit:
    // the viewer's commit is judged on its own and refused.
    g.git(&["checkout", "-q", "-b", "side"]);
    std::fs::write(
        g.dir().join("workloads.kdl"),
        format!("{APP}{}{}", vm("app-2"), vm("app-3")),
    )
    .expect("workloads");
    let side = g.commit("viewer", "viewer: add app-3 on a branch");
    g.git(&["checkout", "-q", "main"]);
    std::fs::write(g.dir().join("README.md"), "docs\n").expect("readme");
    g.commit("trusted", "platform: a readme");
    let signing = format!("user.signingkey={}", g.keys.0.join("trusted").display());
    g.git(&[
        "-c",
        &signing,
        "merge",
        "-q",
        "--no-ff",
        "-S",
        "-m",
        "merge side",
        "side",
    ]);
    let merge = g.git(&["rev-parse", "HEAD"]).trim().to_owned();
    g.push(false);
    let e = g.wait_sync(&merge, Duration::from_secs(30));
    assert_eq!(e["result"], "refused", "{e}");
    let reason = e["reason"].as_str().expect("reason");
    assert!(
        reason.contains(&side[..12]),
        "names the side commit: {reason}"
    );
    assert!(reason.contains("brought in by merge"), "{reason}");
    assert!(reason.contains("vm app-3"), "{reason}");
    assert!(
        !vm_names(&g).contains(&"app-3".to_owned()),
        "nothing applied"
    );
}

/// `cairn diff` shows a reviewer, before merging, what the controller would
/// say: the same refusal for a viewer's commit, acceptance for an operator's,
/// and an unsigned head named as such.
#[test]
fn cairn_diff_shows_the_controllers_authorization_verdict_before_merging() {
    if skip_without_tools() {
        return;
    }
    let tmp = crate::TempDir::new("authz-diff");
    let dir = tmp.0.join("repo");
    crate::copy_dir(&crate::repo_root().join("examples/quickstart"), &dir);
    let key = |name: &str| keygen(&tmp.0, name);
    let (platform, operator, viewer) = (key("platform"), key("operator"), key("viewer"));
    let keys = tmp.0.join("allowed-signers");
    std::fs::write(&keys, format!("root@example.com {platform}\n")).expect("keys");
    let tenants = std::fs::read_to_string(dir.join("tenants.kdl")).expect("tenants");
    std::fs::write(
        dir.join("tenants.kdl"),
        tenants.replace(
            "member \"dev@example.com\" role=\"admin\"",
            &format!(
                "member \"dev@example.com\" role=\"admin\"\n    member \"op@example.com\" role=\"operator\" key=\"{operator}\"\n    member \"v@example.com\" role=\"viewer\" key=\"{viewer}\""
            ),
        ),
    )
    .expect("tenants");
    let git = |args: &[&str]| crate::diff::git(&dir, args);
    let commit = |signer: Option<&str>, message: &str| {
        git(&["add", "-A"]);
        match signer {
            Some(k) => {
                let signing = format!("user.signingkey={}", tmp.0.join(k).display());
                git(&[
                    "-c",
                    "gpg.format=ssh",
                    "-c",
                    &signing,
                    "commit",
                    "-q",
                    "-S",
                    "-m",
                    message,
                ]);
            }
            None => {
                git(&["-c", "commit.gpgsign=false", "commit", "-q", "-m", message]);
            }
        }
    };
    git(&["init", "-q", "-b", "main"]);
    commit(Some("platform"), "base");
    git(&["branch", "base"]);
    let workloads = dir.join("workloads.kdl");
    let w = std::fs::read_to_string(&workloads).expect("workloads");
    std::fs::write(
        &workloads,
        w.replace("memory \"128MiB\"", "memory \"192MiB\""),
    )
    .expect("w");
    commit(Some("viewer"), "viewer: more memory for db");
    let keys_arg = keys.display().to_string();
    let diff = |format: &str| {
        crate::cairn(
            &dir,
            &[
                "diff",
                "--base",
                "base",
                "--head",
                "HEAD",
                "--trusted-keys",
                &keys_arg,
                "--format",
                format,
            ],
        )
    };
    let run = diff("text");
    assert_eq!(
        run.code, 1,
        "a refused push fails the check: {}{}",
        run.stdout, run.stderr
    );
    assert!(
        run.stdout
            .contains("authorization: a controller following base would refuse this push"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("vm db (workloads.kdl:13:4) changed"),
        "{}",
        run.stdout
    );
    let json: serde_json::Value = serde_json::from_str(&diff("json").stdout).expect("JSON");
    let a = &json["authorization"];
    assert_eq!(a["allowed"], false, "{a}");
    assert_eq!(a["commits"][0]["refusals"][0]["kind"], "vm");
    assert_eq!(a["commits"][0]["refusals"][0]["name"], "db");
    let md = crate::cairn(
        &dir,
        &[
            "diff",
            "--base",
            "base",
            "--head",
            "HEAD",
            "--trusted-keys",
            &keys_arg,
        ],
    );
    assert!(md.stdout.contains("#### Authorization ❌"), "{}", md.stdout);
    // `cairn check --base` says the same after the policy report.
    let check = crate::cairn(
        &dir,
        &["check", ".", "--base", "base", "--trusted-keys", &keys_arg],
    );
    assert_eq!(check.code, 1, "{}{}", check.stdout, check.stderr);
    assert!(
        check
            .stdout
            .contains("authorization: a controller following base would refuse")
            && check.stdout.contains("vm db (workloads.kdl:13:4) changed"),
        "{}",
        check.stdout
    );
    let check = crate::cairn(&dir, &["check", ".", "--base", "base", "--format", "json"]);
    assert_eq!(
        check.code, 0,
        "informational without --trusted-keys: {}",
        check.stderr
    );
    let json: serde_json::Value = serde_json::from_str(&check.stdout).expect("JSON");
    assert_eq!(json["authorization"]["allowed"], false, "{json}");
    assert_eq!(json["passed"], true);

    // The operator's commit instead: accepted.
    git(&["reset", "-q", "--hard", "base"]);
    std::fs::write(
        &workloads,
        w.replace("memory \"128MiB\"", "memory \"192MiB\""),
    )
    .expect("w");
    commit(Some("operator"), "operator: more memory for db");
    let run = diff("text");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("would accept 1 commit")
            && run
                .stdout
                .contains("signed by op@example.com (operator of tenant dev)"),
        "{}",
        run.stdout
    );

    // Unsigned on top: said so.
    std::fs::write(dir.join("README.md"), "x\n").expect("readme");
    commit(None, "unsigned");
    let run = diff("text");
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stdout.contains("is not signed"), "{}", run.stdout);
}
