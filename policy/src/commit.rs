//! Verifying a git commit's SSH signature against trusted keys.
//!
//! The signed content is the commit object without its `gpgsig` header
//! (what libgit2's `extract_signature` returns); the signature must be an
//! SSHSIG in namespace `git` by an ed25519 key listed in the allowed-signers
//! file, valid at the commit's committer time.

use crate::sshsig::{AllowedSigners, SigError, SshSig};

/// Why a commit was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The revision does not resolve to a commit.
    #[error("cannot find commit `{rev}`: {message}")]
    NoCommit {
        /// The revision.
        rev: String,
        /// git's message.
        message: String,
    },
    /// The commit carries no signature.
    #[error("commit {id} is not signed; sign it with `git commit -S` (gpg.format=ssh)")]
    Unsigned {
        /// Commit id.
        id: String,
    },
    /// The signature is not acceptable.
    #[error("commit {id}: {source}")]
    Signature {
        /// Commit id.
        id: String,
        /// Why.
        #[source]
        source: SigError,
    },
}

/// A verified commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCommit {
    /// Full commit id.
    pub id: String,
    /// Principals of the trusted key.
    pub principals: Vec<String>,
    /// `SHA256:…` of the key.
    pub fingerprint: String,
    /// Committer e-mail.
    pub committer_email: String,
    /// Line of the trusted-keys file that trusts the key.
    pub line: usize,
}

/// A commit whose signature is good, by a key not yet judged: who may sign
/// is the caller's question (the controller asks the platform keys and then
/// the members of the last applied commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCommit {
    /// Full commit id.
    pub id: String,
    /// The signature, verified over the commit's content.
    pub signature: SshSig,
    /// Committer time (Unix seconds), what allowed-signers validity checks.
    pub time: i64,
    /// Committer e-mail.
    pub committer_email: String,
}

/// Checks that `rev` carries a good SSHSIG (namespace `git`, ed25519) over
/// its content, whoever the key belongs to.
pub fn signature_of(repo: &git2::Repository, rev: &str) -> Result<SignedCommit, CommitError> {
    let commit = repo
        .revparse_single(rev)
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| CommitError::NoCommit {
            rev: rev.to_owned(),
            message: e.message().to_owned(),
        })?;
    let id = commit.id().to_string();
    let (signature, signed) = match repo.extract_signature(&commit.id(), None) {
        Ok(x) => x,
        Err(e) if e.code() == git2::ErrorCode::NotFound => {
            return Err(CommitError::Unsigned { id });
        }
        Err(e) => {
            return Err(CommitError::NoCommit {
                rev: rev.to_owned(),
                message: e.message().to_owned(),
            });
        }
    };
    let sig_err = |source: SigError| CommitError::Signature {
        id: id.clone(),
        source,
    };
    let text = std::str::from_utf8(&signature)
        .map_err(|_| sig_err(SigError::Malformed("the signature is not text".to_owned())))?;
    let sig = SshSig::parse_armored(text).map_err(sig_err)?;
    sig.verify(&signed, "git").map_err(sig_err)?;
    Ok(SignedCommit {
        id,
        signature: sig,
        time: commit.committer().when().seconds(),
        committer_email: commit.committer().email().unwrap_or("").to_owned(),
    })
}

/// Verifies `rev` of `repo` against `signers`.
pub fn verify_commit(
    repo: &git2::Repository,
    rev: &str,
    signers: &AllowedSigners,
) -> Result<VerifiedCommit, CommitError> {
    let signed = signature_of(repo, rev)?;
    let trusted = signers
        .check(&signed.signature, "git", signed.time)
        .map_err(|source| CommitError::Signature {
            id: signed.id.clone(),
            source,
        })?;
    Ok(VerifiedCommit {
        id: signed.id,
        principals: trusted.principals,
        fingerprint: trusted.fingerprint,
        committer_email: signed.committer_email,
        line: trusted.line,
    })
}
