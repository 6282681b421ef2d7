//! Trust, per commit, before anything is compiled: every commit to be applied
//! must carry an SSH signature (SSHSIG, as `git commit -S` with
//! `gpg.format=ssh` makes it) by a key of the trusted-keys file (git's
//! allowed-signers format). The verification is `policy::commit::verify_commit`,
//! the one `cairn verify-commit` uses.

use std::path::Path;

use policy::commit::CommitError;
use policy::sshsig::{AllowedSigners, SigError};

/// A commit that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// Principals of the trusted key (`alice@example.com`).
    pub principals: Vec<String>,
    /// `SHA256:…` of the key.
    pub fingerprint: String,
}

impl Signer {
    /// `alice@example.com (SHA256:…)`.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.principals.join(", "), self.fingerprint)
    }
}

/// Why a commit was refused: the root cause, and how to get it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The commit refused.
    pub commit: String,
    /// The key that signed it (`SHA256:…`), when it was signed.
    pub signed_by: Option<String>,
    /// What happened and what to do.
    pub reason: String,
}

/// Reads the trusted keys; `Err` is the refusal reason (every commit is
/// refused while the file cannot be read).
pub fn read_signers(path: &Path) -> Result<AllowedSigners, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "the trusted keys {} cannot be read ({e}); nothing is applied until it lists the keys that may sign commits (git's allowed-signers format: `EMAIL ssh-ed25519 KEY`)",
            path.display()
        )
    })?;
    AllowedSigners::parse(&text).map_err(|e| {
        format!(
            "the trusted keys {} do not parse: {e}; nothing is applied until they do",
            path.display()
        )
    })
}

/// Verifies one commit.
pub fn verify(
    repo: &git2::Repository,
    commit: &str,
    signers: &AllowedSigners,
    keys_path: &Path,
) -> Result<Signer, Refusal> {
    let short = &commit[..commit.len().min(12)];
    let keys = keys_path.display();
    match policy::commit::verify_commit(repo, commit, signers) {
        Ok(v) => Ok(Signer {
            principals: v.principals,
            fingerprint: v.fingerprint,
        }),
        Err(CommitError::Unsigned { .. }) => Err(Refusal {
            commit: commit.to_owned(),
            signed_by: None,
            reason: format!(
                "commit {short} is not signed, so nothing was applied; sign it with a trusted key (`git -c gpg.format=ssh -c user.signingkey=KEY commit -S --amend`, then push) — the keys trusted are listed in {keys}"
            ),
        }),
        Err(CommitError::Signature {
            source: SigError::Untrusted { fingerprint },
            ..
        }) => Err(Refusal {
            commit: commit.to_owned(),
            signed_by: Some(fingerprint.clone()),
            reason: format!(
                "commit {short} is signed by key {fingerprint}, which is not trusted, so nothing was applied; to trust that key add a line `EMAIL ssh-ed25519 PUBLIC-KEY` for it to {keys} (`ssh-keygen -lf KEY.pub` shows a key's fingerprint), or sign the commit with a trusted key"
            ),
        }),
        Err(CommitError::Signature { source, .. }) => Err(Refusal {
            commit: commit.to_owned(),
            signed_by: None,
            reason: format!("commit {short} is refused, so nothing was applied: {source}"),
        }),
        Err(e @ CommitError::NoCommit { .. }) => Err(Refusal {
            commit: commit.to_owned(),
            signed_by: None,
            reason: e.to_string(),
        }),
    }
}
