//! `cairn verify-commit` with real `git` and `ssh-keygen` keys.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::diff::{enterprise_repo, git};
use crate::{TempDir, cairn};

fn have_ssh_keygen() -> bool {
    Command::new("ssh-keygen").arg("-?").output().is_ok()
}

/// Makes an ed25519 key; returns (private key path, public key line).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    (key, public.trim().to_owned())
}

/// Configures the repository to sign with `key`.
fn sign_with(repo: &Path, key: &Path) {
    git(repo, &["config", "gpg.format", "ssh"]);
    git(
        repo,
        &["config", "user.signingkey", key.to_str().expect("utf-8")],
    );
}

fn commit_signed(repo: &Path, message: &str) -> String {
    std::fs::write(repo.join(format!("{message}.txt")), message).expect("write");
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-S", "-m", message]);
    git(repo, &["rev-parse", "HEAD"]).trim().to_owned()
}

#[test]
fn only_commits_signed_by_trusted_keys_are_accepted() {
    if !have_ssh_keygen() {
        eprintln!("skipped: ssh-keygen is not installed (apt-get install openssh-client)");
        return;
    }
    let repo = enterprise_repo();
    let keys = TempDir::new("keys");
    let (alice, alice_pub) = keygen(&keys.0, "alice");
    let (mallory, _) = keygen(&keys.0, "mallory");
    let trusted = keys.0.join("allowed_signers");
    std::fs::write(
        &trusted,
        format!("# who may change the cloud\nalice@example.com namespaces=\"git\" {alice_pub}\n"),
    )
    .expect("write");
    let trusted = trusted.to_str().expect("utf-8");

    // The first commit is unsigned.
    let run = cairn(
        &repo.0,
        &["verify-commit", "HEAD", "--trusted-keys", trusted],
    );
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stderr.contains("is not signed"), "{}", run.stderr);

    sign_with(&repo.0, &alice);
    let good = commit_signed(&repo.0, "signed-by-alice");
    let run = cairn(
        &repo.0,
        &["verify-commit", &good, "--trusted-keys", trusted],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "ok: commit {good} has a good signature by alice@example.com"
        )),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("line 2"), "{}", run.stdout);

    // git itself agrees with the file.
    git(&repo.0, &["config", "gpg.ssh.allowedSignersFile", trusted]);
    git(&repo.0, &["verify-commit", &good]);

    sign_with(&repo.0, &mallory);
    let bad = commit_signed(&repo.0, "signed-by-mallory");
    let run = cairn(&repo.0, &["verify-commit", &bad, "--trusted-keys", trusted]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.contains("which is not in the trusted keys"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("SHA256:"), "{}", run.stderr);
}

#[test]
fn a_tampered_commit_is_refused() {
    if !have_ssh_keygen() {
        eprintln!("skipped: ssh-keygen is not installed (apt-get install openssh-client)");
        return;
    }
    let repo = enterprise_repo();
    let keys = TempDir::new("keys");
    let (alice, alice_pub) = keygen(&keys.0, "alice");
    let trusted = keys.0.join("allowed_signers");
    std::fs::write(&trusted, format!("alice@example.com {alice_pub}\n")).expect("write");
    let trusted = trusted.to_str().expect("utf-8");
    sign_with(&repo.0, &alice);
    let good = commit_signed(&repo.0, "add-two-vms");

    // Same signature, different message: write the altered commit object.
    let raw = git(&repo.0, &["cat-file", "commit", &good]);
    let altered = raw.replace("add-two-vms", "add-ten-vms");
    assert_ne!(raw, altered);
    let path = keys.0.join("altered");
    std::fs::write(&path, altered).expect("write");
    let forged = git(
        &repo.0,
        &[
            "hash-object",
            "-t",
            "commit",
            "-w",
            path.to_str().expect("utf-8"),
        ],
    );
    let run = cairn(
        &repo.0,
        &["verify-commit", forged.trim(), "--trusted-keys", trusted],
    );
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr
            .contains("the signature does not match the signed content"),
        "{}",
        run.stderr
    );
    // The original still verifies.
    let run = cairn(
        &repo.0,
        &["verify-commit", &good, "--trusted-keys", trusted],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn namespace_and_validity_restrictions_of_the_trusted_keys_apply() {
    if !have_ssh_keygen() {
        eprintln!("skipped: ssh-keygen is not installed (apt-get install openssh-client)");
        return;
    }
    let repo = enterprise_repo();
    let keys = TempDir::new("keys");
    let (alice, alice_pub) = keygen(&keys.0, "alice");
    sign_with(&repo.0, &alice);
    let id = commit_signed(&repo.0, "c1");
    // Commits are dated 2026-01-01 by the test helper.
    for (options, expect) in [
        (
            "namespaces=\"file\"",
            "not in the trusted keys for namespace `git`",
        ),
        ("valid-after=\"20270101\"", "is trusted only from"),
        ("valid-before=\"20250101\"", "is trusted only until"),
    ] {
        let trusted = keys.0.join("allowed_signers");
        std::fs::write(
            &trusted,
            format!("alice@example.com {options} {alice_pub}\n"),
        )
        .expect("write");
        let run = cairn(
            &repo.0,
            &[
                "verify-commit",
                &id,
                "--trusted-keys",
                trusted.to_str().expect("utf-8"),
            ],
        );
        assert_eq!(run.code, 1, "{options}: {}", run.stdout);
        assert!(run.stderr.contains(expect), "{options}: {}", run.stderr);
    }
}
