//! The authorization section of a PR preview (`cairn diff`, `cairn check
//! --base`): what a controller following the base branch would say about the
//! head's commits, with the same code (`controller::trust::judge` on every
//! commit of the head's first-parent path since the base, and on the commits
//! a merge brings in). The keys and roles are the base's (the last applied
//! commit, once merged is the controller's); the platform keys are
//! `--trusted-keys` (without it, only member keys are known, and every other
//! signer shows as not trusted).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

/// The section.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Authorization {
    /// Whether a controller following the base would accept every commit.
    pub allowed: bool,
    /// One line: the verdict and why.
    pub summary: String,
    /// The platform keys file given (`--trusted-keys`), if any.
    pub trusted_keys: Option<String>,
    /// Every commit judged (the head's first-parent path since the base,
    /// oldest first); empty when the head is the working tree.
    pub commits: Vec<CommitResult>,
}

/// One commit's result.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct CommitResult {
    /// Full commit id.
    pub commit: String,
    /// Who signed it, when the signature and signer were accepted.
    pub signer: Option<String>,
    /// The key that signed it (`SHA256:…`), when refused after signing.
    pub signed_by: Option<String>,
    /// Whether it passes.
    pub allowed: bool,
    /// Why not.
    pub reason: Option<String>,
    /// The objects its signer may not change.
    pub refusals: Vec<policy::authorize::Refusal>,
}

/// Judges `base..head` (`head` `None`: the working tree, which is not signed).
pub fn preview(
    repo: &git2::Repository,
    prefix: &Path,
    base_rev: &str,
    head_rev: Option<&str>,
    trusted_keys: Option<&Path>,
) -> anyhow::Result<Authorization> {
    let keys_shown = trusted_keys.map(|p| p.display().to_string());
    let Some(head_rev) = head_rev else {
        return Ok(Authorization {
            allowed: false,
            summary: "the head is the working tree, which is not a signed commit: a controller refuses unsigned commits; commit it with `git commit -S` (gpg.format=ssh) and pass --head to see who may push it".to_owned(),
            trusted_keys: keys_shown,
            commits: vec![],
        });
    };
    let id = |rev: &str| -> anyhow::Result<String> {
        Ok(repo
            .revparse_single(rev)
            .and_then(|o| o.peel_to_commit())
            .with_context(|| format!("cannot find commit `{rev}`"))?
            .id()
            .to_string())
    };
    let (base, head) = (id(base_rev)?, id(head_rev)?);
    let signers = match trusted_keys {
        Some(p) => controller::trust::read_signers(p).map_err(anyhow::Error::msg)?,
        None => Default::default(),
    };
    let keys_path = trusted_keys.unwrap_or(Path::new("the platform keys (--trusted-keys FILE)"));
    // The base's keys and roles; a base that does not compile has none.
    let sources = compiler::source::load_git_tree(repo, &base, prefix)?;
    let compilation = compiler::compile(&sources);
    let authority = (!compilation.has_errors()).then_some(&compilation.model);
    let source = controller::source::GitSource {
        repo: repo.path().to_owned(),
        branch: String::new(),
        subdir: prefix.to_owned(),
    };
    let path = source.path(Some(&base), &head)?;
    let mut commits = vec![];
    for c in &path {
        commits.push(
            match controller::trust::judge(repo, prefix, c, authority, &signers, keys_path) {
                Ok(s) => CommitResult {
                    commit: c.clone(),
                    signer: Some(s.describe()),
                    signed_by: Some(s.fingerprint),
                    allowed: true,
                    reason: None,
                    refusals: vec![],
                },
                Err(r) => CommitResult {
                    commit: c.clone(),
                    signer: None,
                    signed_by: r.signed_by,
                    allowed: false,
                    reason: Some(r.reason),
                    refusals: r.objects,
                },
            },
        );
    }
    let refused: Vec<&CommitResult> = commits.iter().filter(|c| !c.allowed).collect();
    let summary = match (&refused[..], commits.len()) {
        (_, 0) => "no commits since the base: nothing to judge".to_owned(),
        ([], n) => format!(
            "a controller following {base_rev} would accept {n} commit{}: every signer may make its changes",
            if n == 1 { "" } else { "s" }
        ),
        ([first, ..], n) => format!(
            "a controller following {base_rev} would refuse this push: {} of {n} commit{} refused (the first: {})",
            refused.len(),
            if n == 1 { "" } else { "s" },
            short(&first.commit)
        ),
    };
    Ok(Authorization {
        allowed: refused.is_empty(),
        summary,
        trusted_keys: keys_shown,
        commits,
    })
}

fn short(c: &str) -> &str {
    &c[..c.len().min(12)]
}

/// The text lines (`cairn diff --format text`, `cairn check --base`).
pub fn text(a: &Authorization) -> String {
    let mut out = format!("\nauthorization: {}\n", a.summary);
    for c in &a.commits {
        match (&c.signer, &c.reason) {
            (Some(s), _) => {
                let _ = writeln!(out, "  ok      {} signed by {s}", short(&c.commit));
            }
            (None, _) if !c.refusals.is_empty() => {
                let n = c.refusals.len();
                let _ = writeln!(
                    out,
                    "  refused {} (signed by {}): its signer may not change {n} object{}:",
                    short(&c.commit),
                    c.signed_by.as_deref().unwrap_or("?"),
                    if n == 1 { "" } else { "s" }
                );
            }
            (None, reason) => {
                let _ = writeln!(
                    out,
                    "  refused {}: {}",
                    short(&c.commit),
                    reason.as_deref().unwrap_or("")
                );
            }
        }
        for r in &c.refusals {
            let _ = writeln!(out, "          {}", r.line());
        }
    }
    if a.trusted_keys.is_none() {
        let _ = writeln!(
            out,
            "  (no --trusted-keys given: platform keys are unknown, member keys are the base's)"
        );
    }
    out
}

/// The markdown section (`cairn diff`).
pub fn markdown(a: &Authorization) -> String {
    let mark = if a.allowed { "✅" } else { "❌" };
    let mut out = format!("#### Authorization {mark}\n\n{}\n\n", a.summary);
    if !a.commits.is_empty() {
        out.push_str("| commit | signer | result |\n|---|---|---|\n");
        for c in &a.commits {
            let signer = c
                .signer
                .clone()
                .or_else(|| c.signed_by.clone())
                .unwrap_or_else(|| "unsigned".to_owned());
            let result = if c.allowed {
                "passes".to_owned()
            } else if c.refusals.is_empty() {
                c.reason.clone().unwrap_or_default()
            } else {
                c.refusals
                    .iter()
                    .map(|r| r.line())
                    .collect::<Vec<_>>()
                    .join("<br>")
            };
            let _ = writeln!(
                out,
                "| `{}` | {} | {} |",
                short(&c.commit),
                signer.replace('|', "\\|"),
                result.replace('|', "\\|")
            );
        }
        out.push('\n');
    }
    if a.trusted_keys.is_none() {
        out.push_str("_No `--trusted-keys` given: platform keys are unknown; member keys are the base's._\n\n");
    }
    out
}

/// `cairn check --base REV`: the authorization of the commits of `dir`'s
/// repository from `base` to `HEAD`, appended to the rendered report (text:
/// the section; JSON: an `authorization` member, the shape of `cairn diff`'s;
/// SARIF and JUnit: unchanged). Returns the output and whether a controller
/// would accept the push (always true without `--trusted-keys`: informational).
pub fn append_to_check(
    dir: &Path,
    base: &str,
    trusted_keys: Option<&Path>,
    json: Option<bool>,
    rendered: String,
) -> anyhow::Result<(String, bool)> {
    let repo = git2::Repository::discover(dir).with_context(|| {
        format!(
            "--base needs a git repository; {} is in none",
            dir.display()
        )
    })?;
    let workdir = repo
        .workdir()
        .context("the repository is bare")?
        .canonicalize()?;
    let prefix = dir
        .canonicalize()?
        .strip_prefix(&workdir)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let a = preview(&repo, &prefix, base, Some("HEAD"), trusted_keys)?;
    let ok = trusted_keys.is_none() || a.allowed;
    let out = match json {
        None => rendered,
        Some(false) => format!("{rendered}{}", text(&a)),
        Some(true) => {
            let mut v: serde_json::Value = serde_json::from_str(&rendered)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("authorization".to_owned(), serde_json::to_value(&a)?);
            }
            let mut s = serde_json::to_string_pretty(&v)?;
            s.push('\n');
            s
        }
    };
    Ok((out, ok))
}
