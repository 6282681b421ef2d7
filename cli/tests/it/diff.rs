//! `cairn diff`: previews of a change between two revisions of a real git repository.

use std::path::Path;
use std::process::Command;

use crate::{TempDir, cairn, copy_dir, repo_root};

/// Runs git with a fixed identity and clock, so commit ids are stable.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Alice")
        .env("GIT_AUTHOR_EMAIL", "alice@example.com")
        .env("GIT_COMMITTER_NAME", "Alice")
        .env("GIT_COMMITTER_EMAIL", "alice@example.com")
        .env("GIT_AUTHOR_DATE", "2026-01-01T12:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T12:00:00Z")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A repository holding the enterprise example and the shipped policies on
/// branch `main`.
pub fn enterprise_repo() -> TempDir {
    let tmp = TempDir::new("diff");
    copy_dir(&repo_root().join("examples/enterprise"), &tmp.0);
    copy_dir(&repo_root().join("policies"), &tmp.0.join("policies"));
    git(&tmp.0, &["init", "-q", "-b", "main"]);
    git(&tmp.0, &["add", "."]);
    git(&tmp.0, &["commit", "-q", "-m", "the cloud"]);
    tmp
}

const SPOT_VM: &str = "\nvm \"ledger-etl\" tenant=\"finance\" site=\"hq\" {\n    cpu 4\n    memory \"16GiB\"\n    sla \"batch\"\n    image \"debian-12\"\n    tag \"app\" \"ledger\"\n}\n";

fn append(path: &Path, text: &str) {
    let mut s = std::fs::read_to_string(path).expect("read");
    s.push_str(text);
    std::fs::write(path, s).expect("write");
}

#[test]
fn a_branch_adding_a_spot_vm_for_finance_gets_a_failing_preview_naming_it() {
    let repo = enterprise_repo();
    git(&repo.0, &["checkout", "-q", "-b", "spot"]);
    append(&repo.0.join("workloads.kdl"), SPOT_VM);
    git(&repo.0, &["commit", "-q", "-am", "finance etl on spot"]);

    let check = cairn(&repo.0, &["check"]);
    assert_eq!(check.code, 1, "{}", check.stdout);
    assert!(
        check
            .stdout
            .contains("vm ledger-etl: finance workloads may not run on spot capacity")
    );

    let run = cairn(&repo.0, &["diff", "--base", "main", "--head", "spot"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let md = &run.stdout;
    assert!(
        md.starts_with("### cairn preview: ❌ policies fail"),
        "{md}"
    );
    assert!(md.contains("**tenant finance**"), "{md}");
    assert!(
        md.contains("- ➕ added vm `ledger-etl` (workloads.kdl:44:4)"),
        "{md}"
    );
    assert!(
        md.contains("- ❌ **deny** `no-spot-for-finance` [hard-mandatory]: vm ledger-etl: finance workloads may not run on spot capacity (workloads.kdl:44:4) *(new)*"),
        "{md}"
    );
    assert!(md.contains("| finance vcpus |"), "quota headroom: {md}");
    assert!(
        md.contains("Placement: 1 new VM placed, 0 moves, 0 preemptions, 0 unplaceable."),
        "{md}"
    );
    assert!(md.contains("- new vm `ledger-etl` → hq-"), "{md}");

    let json = cairn(
        &repo.0,
        &[
            "diff", "--base", "main", "--head", "spot", "--format", "json",
        ],
    );
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(doc["format_version"], 1);
    assert_eq!(doc["policy"]["passed"], false);
    let added: Vec<&str> = doc["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .filter(|o| o["change"] == "added")
        .map(|o| o["name"].as_str().expect("name"))
        .collect();
    assert_eq!(added, vec!["ledger-etl"]);
}

#[test]
fn changed_fields_are_listed_and_the_working_tree_is_the_default_head() {
    let repo = enterprise_repo();
    let w = repo.0.join("workloads.kdl");
    let text = std::fs::read_to_string(&w).expect("read");
    std::fs::write(
        &w,
        text.replacen(
            "    cpu 4\n    memory \"8GiB\"",
            "    cpu 6\n    memory \"8GiB\"",
            1,
        ),
    )
    .expect("write");
    let run = cairn(&repo.0, &["diff", "--base", "HEAD", "--format", "text"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("HEAD "), "{}", run.stdout);
    assert!(run.stdout.contains("-> working tree"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("~ vm ledger-app: cpu 4 → 6 (workloads.kdl:14:4)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("0 added, 1 changed, 0 removed"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_head_that_does_not_compile_shows_its_errors() {
    let repo = enterprise_repo();
    append(
        &repo.0.join("workloads.kdl"),
        "\nvm \"bad\" tenant=\"nobody\" site=\"hq\" {\n    cpu 1\n    memory \"1GiB\"\n    image \"tiny\"\n}\n",
    );
    let run = cairn(&repo.0, &["diff", "--base", "HEAD"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout
            .starts_with("### cairn preview: ❌ does not compile"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("#### Spec errors"), "{}", run.stdout);
    assert!(run.stdout.contains("nobody"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("Not evaluated: the head does not compile."),
        "{}",
        run.stdout
    );
}

#[test]
fn policy_changes_in_the_head_do_not_judge_the_head() {
    let repo = enterprise_repo();
    git(&repo.0, &["checkout", "-q", "-b", "sneaky"]);
    append(&repo.0.join("workloads.kdl"), SPOT_VM);
    std::fs::remove_file(repo.0.join("policies/no-spot-for-finance.rego")).expect("rm");
    git(
        &repo.0,
        &["commit", "-q", "-am", "drop the policy and add a spot vm"],
    );
    let run = cairn(&repo.0, &["diff", "--base", "main", "--head", "sneaky"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout
            .contains("vm ledger-etl: finance workloads may not run on spot capacity")
    );
    assert!(
        run.stdout
            .contains("`policies/no-spot-for-finance.rego (removed)`"),
        "{}",
        run.stdout
    );
}
