//! The controller's gate (issue 14, item 3): the repository's `reconcile`
//! block (auto-apply, blast radius, freeze windows, prune) taken from the
//! commit applied last, `cairn sync --approve PLAN_ID`, and the policy gate
//! with `Policy-Override` trailers. Real git repositories, a real dev
//! cluster, a real `cairn controller` (the harness of `controller.rs`).

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::controller::{GitOps, skip_without_tools};
use crate::engine::kvm_usable;

fn vm(name: &str, memory: &str) -> String {
    format!(
        "vm \"{name}\" tenant=\"dev\" site=\"lab\" {{\n    cpu 1\n    memory \"{memory}\"\n    image \"tiny\"\n}}\n"
    )
}

fn vms(names: &[&str]) -> String {
    names.iter().map(|n| vm(n, "64MiB")).collect()
}

fn skip() -> bool {
    if skip_without_tools() {
        return true;
    }
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and the commits start VMs");
        return true;
    }
    false
}

/// `cairn sync ARGS --data-dir .cairn --key TRUSTED` in the cluster directory
/// (a signed action).
fn cairn_sync(g: &GitOps, args: &[&str]) -> crate::Run {
    let key = g.keys.0.join("trusted").display().to_string();
    let mut all = vec!["sync", "--data-dir", ".cairn", "--key", key.as_str()];
    all.extend_from_slice(args);
    let out = g
        .cluster
        .command(&all)
        .stdin(Stdio::null())
        .output()
        .expect("cairn runs");
    crate::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes `workloads.kdl`, commits it signed by the trusted key, pushes; the id.
fn push(g: &GitOps, workloads: &str, message: &str) -> String {
    std::fs::write(g.dir().join("workloads.kdl"), workloads).expect("workloads");
    let c = g.commit("trusted", message);
    g.push(false);
    c
}

fn running(g: &GitOps) -> Vec<String> {
    // Before any commit is applied the controller's status has no `vms`.
    let status = g.cluster.status_json();
    let mut names: Vec<String> = status["vms"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|v| v["state"] == "running")
        .map(|v| v["name"].as_str().unwrap_or("").to_owned())
        .collect();
    names.sort();
    names
}

fn held_plans(g: &GitOps) -> Vec<Value> {
    let (status, body) = g.get("/api/v1/plans", true).expect("answers");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("plans JSON");
    v["plans"].as_array().expect("plans").clone()
}

#[test]
fn auto_apply_off_holds_every_plan_until_approved_and_a_commit_cannot_loosen_its_own_gate() {
    if skip() {
        return;
    }
    let first_specs = format!("reconcile {{\n    auto-apply #false\n}}\n{}", vms(&["app"]));
    let (mut g, first) = GitOps::prepare("rc-auto", Some(&first_specs), &[]);
    g.start();
    // The first sync: nothing applied before, so the commit's own block holds it.
    let held = g.wait_sync(&first, Duration::from_secs(60));
    assert_eq!(held["result"], "held", "{held}");
    let reason = held["reason"].as_str().unwrap();
    assert!(reason.contains("auto-apply is off"), "{reason}");
    assert!(reason.contains("synced first"), "{reason}");
    let plan_id = held["plan_id"].as_str().unwrap().to_owned();
    assert!(
        reason.contains(&format!("cairn sync --approve {plan_id}")),
        "{reason}"
    );
    let event = g.wait_event("held", &first, Duration::from_secs(5));
    assert_eq!(event["plan_id"], plan_id.as_str(), "{event}");
    let plans = held_plans(&g);
    assert_eq!(plans.len(), 1, "{plans:?}");
    assert_eq!(plans[0]["plan_id"], plan_id.as_str());
    assert_eq!(plans[0]["holds"][0]["kind"], "auto-apply");
    assert!(running(&g).is_empty(), "nothing is applied while held");

    // A wrong id is refused: the plan changed (or never was).
    let wrong = cairn_sync(&g, &["--approve", "0123456789abcdef"]);
    assert_eq!(wrong.code, 1, "{wrong:?}");
    assert!(wrong.stdout.contains("plan changed"), "{wrong:?}");
    assert!(running(&g).is_empty());

    let ok = cairn_sync(&g, &["--approve", &plan_id]);
    assert_eq!(ok.code, 0, "{ok:?}\n{}", g.log());
    assert!(ok.stdout.contains("succeeded"), "{ok:?}");
    assert_eq!(running(&g), ["app"]);
    let sync = g
        .events()
        .into_iter()
        .find(|e| {
            e["kind"] == "sync" && e["commit"] == first.as_str() && e["result"] == "succeeded"
        })
        .expect("the approved sync");
    assert_eq!(
        sync["detail"]["approved"]["plan_id"],
        plan_id.as_str(),
        "{sync}"
    );
    assert!(held_plans(&g).is_empty());

    // A commit that turns auto-apply on is judged by the block applied last.
    let second = push(
        &g,
        &format!(
            "reconcile {{\n    auto-apply #true\n}}\n{}",
            vms(&["app", "app2"])
        ),
        "auto-apply on, and app2",
    );
    let held = g.wait_sync(&second, Duration::from_secs(60));
    assert_eq!(held["result"], "held", "{held}");
    let reason = held["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("commit {} (applied last)", &first[..12])),
        "{reason}"
    );
    assert_eq!(running(&g), ["app"]);
    let id = held["plan_id"].as_str().unwrap().to_owned();
    let ok = cairn_sync(&g, &["--approve", &id]);
    assert_eq!(ok.code, 0, "{ok:?}");
    assert_eq!(running(&g), ["app", "app2"]);

    // Its block now governs: the next commit is applied without approval.
    let third = push(
        &g,
        &format!(
            "reconcile {{\n    auto-apply #true\n}}\n{}",
            vms(&["app", "app2", "app3"])
        ),
        "app3",
    );
    let sync = g.wait_sync(&third, Duration::from_secs(60));
    assert_eq!(sync["result"], "succeeded", "{sync}");
    assert_eq!(running(&g), ["app", "app2", "app3"]);

    // `cairn sync` with nothing new: up to date (a drift check ran).
    let now = cairn_sync(&g, &[]);
    assert_eq!(now.code, 0, "{now:?}");
    assert!(now.stdout.contains("up-to-date"), "{now:?}");
}

#[test]
fn blast_radius_and_freeze_windows_hold_and_prune_off_leaves_a_removed_vm_running() {
    if skip() {
        return;
    }
    let budget = "reconcile {\n    blast-radius max=1\n}\n";
    let first_specs = format!("{budget}{}", vms(&["a", "b", "c"]));
    let (mut g, first) = GitOps::prepare("rc-blast", Some(&first_specs), &[]);
    g.start();
    let sync = g.wait_sync(&first, Duration::from_secs(60));
    assert_eq!(
        sync["result"], "succeeded",
        "creates are not destructive: {sync}"
    );
    assert_eq!(running(&g), ["a", "b", "c"]);

    // Deleting three VMs is over the budget of one.
    let big = push(&g, budget, "remove a, b and c");
    let held = g.wait_sync(&big, Duration::from_secs(60));
    assert_eq!(held["result"], "held", "{held}");
    let reason = held["reason"].as_str().unwrap();
    assert!(reason.contains("blast radius 3 > budget 1"), "{reason}");
    for name in ["a", "b", "c"] {
        assert!(
            reason.contains(&format!("delete vm {name} on lab-")),
            "{reason}"
        );
    }
    assert_eq!(held["detail"]["destructive"].as_array().unwrap().len(), 3);
    assert_eq!(running(&g), ["a", "b", "c"], "a held plan deletes nothing");

    // Back to the three VMs, with a freeze window that holds now and prune off:
    // nothing to do, so it is applied, and its block governs from then on.
    let now_s = (reconciler::state::now_ms() / 1000) as i64;
    // `YYYY-MM-DD HH:MM` (UTC) of an instant, from the controller's RFC 3339.
    let fmt = |s: i64| {
        let t = ::controller::events::rfc3339(s as u64 * 1000);
        format!("{} {}", &t[..10], &t[11..16])
    };
    let frozen = format!(
        "reconcile {{\n    prune #false\n    freeze \"release\" from=\"{}\" to=\"{}\" zone=\"UTC\"\n}}\n",
        fmt(now_s - 3600),
        fmt(now_s + 7200)
    );
    let calm = push(
        &g,
        &format!("{frozen}{}", vms(&["a", "b", "c"])),
        "freeze and keep",
    );
    let sync = g.wait_sync(&calm, Duration::from_secs(60));
    assert_eq!(sync["result"], "succeeded", "{sync}");
    assert!(held_plans(&g).is_empty());

    let more = push(
        &g,
        &format!("{frozen}{}", vms(&["a", "b", "c", "d"])),
        "add d",
    );
    let held = g.wait_sync(&more, Duration::from_secs(60));
    assert_eq!(held["result"], "held", "{held}");
    let reason = held["reason"].as_str().unwrap();
    assert!(reason.contains("freeze window release ("), "{reason}");
    assert!(reason.contains("UTC+00:00"), "{reason}");
    assert_eq!(running(&g), ["a", "b", "c"]);
    let id = held["plan_id"].as_str().unwrap().to_owned();
    let ok = cairn_sync(&g, &["--approve", &id]);
    assert_eq!(ok.code, 0, "{ok:?}");
    assert_eq!(running(&g), ["a", "b", "c", "d"]);

    // Prune off: removing a from git leaves it running, reported.
    let removed = push(
        &g,
        &format!("{frozen}{}", vms(&["b", "c", "d"])),
        "remove a",
    );
    let sync = g.wait_sync(&removed, Duration::from_secs(60));
    assert_eq!(sync["result"], "succeeded", "{sync}");
    let unpruned = sync["detail"]["unpruned"].as_array().expect("unpruned");
    assert_eq!(unpruned.len(), 1, "{sync}");
    assert!(
        unpruned[0].as_str().unwrap().starts_with("vm a on lab-"),
        "{sync}"
    );
    assert_eq!(running(&g), ["a", "b", "c", "d"]);
    // Drift checks (every second here) leave it alone too.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(running(&g), ["a", "b", "c", "d"]);
    let events = g.events();
    let drift: Vec<_> = events.iter().filter(|e| e["kind"] == "drift").collect();
    assert!(
        !drift.iter().any(|e| e["result"] == "repaired"),
        "drift events: {drift:#?}\n{}",
        g.log()
    );
}

const NO_BIG_VMS: &str = "# METADATA\n# title: No VM over 100 MiB\n# custom:\n#   enforcement: hard-mandatory\npackage cairn.nobig\n\nimport rego.v1\n\ndeny contains msg if {\n\tsome vm in input.vms\n\tvm.memory_bytes > 104857600\n\tmsg := sprintf(\"vm %s: %d bytes of memory is over 100 MiB\", [vm.name, vm.memory_bytes])\n}\n";

/// A soft-mandatory policy `max-N-vms` denying more than `n` VMs (`word`: N
/// in words); `roles`: its `overridable-by` list, when any.
fn max_vms(n: usize, word: &str, roles: Option<&str>) -> String {
    let roles = roles
        .map(|r| format!("#   overridable-by: [{r}]\n"))
        .unwrap_or_default();
    format!(
        "# METADATA\n# title: At most {word} VMs\n# custom:\n#   enforcement: soft-mandatory\n{roles}package cairn.max{n}\n\nimport rego.v1\n\ndeny contains msg if {{\n\tcount(input.vms) > {n}\n\tmsg := sprintf(\"%d VMs is over {word}\", [count(input.vms)])\n}}\n"
    )
}

#[test]
fn the_policies_applied_last_gate_a_commit_and_a_soft_override_by_a_platform_key_is_recorded() {
    if skip() {
        return;
    }
    let (mut g, _) = GitOps::prepare("rc-policy", None, &[]);
    let policies = g.dir().join("policies");
    std::fs::create_dir_all(&policies).expect("policies dir");
    std::fs::write(policies.join("no-big-vms.rego"), NO_BIG_VMS).expect("policy");
    std::fs::write(policies.join("max-two-vms.rego"), max_vms(2, "two", None)).expect("policy");
    let first = push(&g, &vms(&["app"]), "policies and app");
    g.start();
    let sync = g.wait_sync(&first, Duration::from_secs(60));
    assert_eq!(sync["result"], "succeeded", "{sync}");
    assert_eq!(sync["detail"]["policy"]["policies"], 2, "{sync}");

    // The commit removes the hard-mandatory policy and adds a big VM: the
    // policies of the commit applied last still judge it.
    std::fs::remove_file(policies.join("no-big-vms.rego")).expect("rm policy");
    let big = push(
        &g,
        &format!("{}{}", vms(&["app"]), vm("big", "128MiB")),
        "a big VM, and no policy against it",
    );
    let refused = g.wait_sync(&big, Duration::from_secs(60));
    assert_eq!(refused["result"], "refused", "{refused}");
    let reason = refused["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "the policies of commit {} (applied last)",
            &first[..12]
        )),
        "{reason}"
    );
    assert!(
        reason.contains("no-big-vms: vm big: 134217728 bytes of memory is over 100 MiB"),
        "{reason}"
    );
    assert_eq!(running(&g), ["app"]);

    // Three small VMs: the soft-mandatory policy denies them without an override.
    std::fs::write(policies.join("no-big-vms.rego"), NO_BIG_VMS).expect("policy");
    let three = push(&g, &vms(&["app", "b", "c"]), "three VMs");
    let refused = g.wait_sync(&three, Duration::from_secs(60));
    assert_eq!(refused["result"], "refused", "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("max-two-vms: 3 VMs is over two"),
        "{refused}"
    );
    // An override may not waive a hard-mandatory policy.
    std::fs::write(
        g.dir().join("workloads.kdl"),
        format!("{}{}", vms(&["app", "b"]), vm("big", "128MiB")),
    )
    .expect("workloads");
    let hard = g.commit(
        "trusted",
        "big again\n\nPolicy-Override: no-big-vms: please\nPolicy-Override: max-two-vms: please",
    );
    g.push(false);
    let refused = g.wait_sync(&hard, Duration::from_secs(60));
    assert_eq!(refused["result"], "refused", "{refused}");
    assert!(
        refused["reason"].as_str().unwrap().contains("no-big-vms"),
        "{refused}"
    );

    // The trusted (platform) key overrides the soft-mandatory policy with a reason.
    std::fs::write(g.dir().join("workloads.kdl"), vms(&["app", "b", "c"])).expect("workloads");
    let overridden = g.commit(
        "trusted",
        "three VMs for the load test\n\nPolicy-Override: max-two-vms: load test until Friday (OPS-42)",
    );
    g.push(false);
    let sync = g.wait_sync(&overridden, Duration::from_secs(60));
    assert_eq!(sync["result"], "succeeded", "{sync}\n{}", g.log());
    eprintln!(
        "sync phases with the policy gate (2 policies, 3 VMs): {}",
        sync["detail"]["phases"]
    );
    let o = &sync["detail"]["policy"]["overrides"][0];
    assert_eq!(o["policy"], "max-two-vms", "{sync}");
    assert_eq!(o["status"], "applied", "{sync}");
    assert_eq!(o["reason"], "load test until Friday (OPS-42)", "{sync}");
    assert!(
        sync["detail"]["signer"]
            .as_str()
            .unwrap()
            .starts_with("ops@example.com")
    );
    let findings = sync["detail"]["policy"]["findings"].as_array().unwrap();
    assert!(
        findings
            .iter()
            .any(|f| f["policy"] == "max-two-vms" && f["overridden"].is_string()),
        "{sync}"
    );
    assert_eq!(running(&g), ["app", "b", "c"]);
}

#[test]
fn a_member_key_overrides_only_the_policies_whose_metadata_names_its_role() {
    if skip() {
        return;
    }
    let (mut g, _) = GitOps::prepare("rc-member", None, &[]);
    let other = std::fs::read_to_string(g.keys.0.join("other.pub")).expect("other.pub");
    let key: Vec<&str> = other.split_whitespace().take(2).collect();
    let tenants = g.dir().join("tenants.kdl");
    let text = std::fs::read_to_string(&tenants).expect("tenants.kdl");
    let text = text.replace(
        "member \"dev@example.com\" role=\"admin\"",
        &format!(
            "member \"dev@example.com\" role=\"admin\" key=\"{}\"",
            key.join(" ")
        ),
    );
    assert!(text.contains("key=\"ssh-ed25519 "), "{text}");
    std::fs::write(&tenants, text).expect("tenants.kdl");
    let policies = g.dir().join("policies");
    std::fs::create_dir_all(&policies).expect("policies dir");
    std::fs::write(
        policies.join("max-two-vms.rego"),
        max_vms(2, "two", Some("admin")),
    )
    .expect("policy");
    std::fs::write(
        policies.join("max-three-vms.rego"),
        max_vms(3, "three", None),
    )
    .expect("policy");
    let first = push(&g, &vms(&["app"]), "dev's admin key, two policies");
    g.start();
    let sync = g.wait_sync(&first, Duration::from_secs(60));
    assert_eq!(sync["result"], "succeeded", "{sync}\n{}", g.log());

    // dev's admin (a member key) may override max-two-vms, not max-three-vms.
    std::fs::write(g.dir().join("workloads.kdl"), vms(&["app", "b", "c", "d"])).expect("w");
    let four = g.commit(
        "other",
        "four VMs\n\nPolicy-Override: max-two-vms: demo\nPolicy-Override: max-three-vms: demo",
    );
    g.push(false);
    let refused = g.wait_sync(&four, Duration::from_secs(60));
    assert_eq!(refused["result"], "refused", "{refused}");
    let reason = refused["reason"].as_str().unwrap();
    assert!(
        reason.contains("is not a platform key (member roles: admin)"),
        "{reason}"
    );
    assert!(
        reason.contains("may not override max-three-vms (only platform keys may override it"),
        "{reason}"
    );
    assert!(!reason.contains("may not override max-two-vms"), "{reason}");

    std::fs::write(g.dir().join("workloads.kdl"), vms(&["app", "b", "c"])).expect("w");
    let three = g.commit(
        "other",
        "three VMs\n\nPolicy-Override: max-two-vms: demo for dev",
    );
    g.push(false);
    let sync = g.wait_sync(&three, Duration::from_secs(60));
    assert_eq!(sync["result"], "succeeded", "{sync}\n{}", g.log());
    assert_eq!(
        sync["detail"]["policy"]["overrides"][0]["policy"],
        "max-two-vms"
    );
    assert_eq!(
        sync["detail"]["policy"]["overrides"][0]["status"],
        "applied"
    );
    assert_eq!(running(&g), ["app", "b", "c"]);
}

#[test]
fn self_heal_off_in_the_applied_block_reports_a_killed_vm_and_leaves_it() {
    if skip() {
        return;
    }
    let specs = format!(
        "reconcile {{\n    self-heal #false\n    drift-check every=\"1s\"\n}}\n{}",
        vms(&["app"])
    );
    let (mut g, first) = GitOps::prepare("rc-heal", Some(&specs), &[]);
    g.start();
    let sync = g.wait_sync(&first, Duration::from_secs(60));
    assert_eq!(sync["result"], "succeeded", "{sync}");
    let pid = crate::controller::vmm_pid(g.dir(), "app").expect("app's cairn-vmm runs");
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let found = loop {
        if let Some(e) = g
            .events()
            .into_iter()
            .find(|e| e["kind"] == "drift" && e["result"] == "found")
        {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no drift event: {}",
            g.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let reason = found["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "self-heal is off (the reconcile block of commit {} (applied last))",
            &first[..12]
        )),
        "{found}"
    );
    assert!(
        found["object"].as_str().unwrap().contains("vm app"),
        "{found}"
    );
    // Several drift checks later it is still down, and nothing was repaired.
    std::thread::sleep(Duration::from_secs(4));
    assert!(running(&g).is_empty(), "{}", g.log());
    assert!(crate::controller::vmm_pid(g.dir(), "app").is_none());
    assert!(
        !g.events()
            .iter()
            .any(|e| e["kind"] == "drift" && e["result"] == "repaired")
    );
}
