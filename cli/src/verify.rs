//! `cairn verify-commit`: accept a commit only when it carries a good SSH
//! signature by a trusted key.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use policy::sshsig::AllowedSigners;

/// `cairn verify-commit`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The commit (any revision git understands: a hash, a branch, HEAD~1).
    pub rev: String,
    /// The repository (default: the one containing the current directory).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Trusted keys in git's allowed-signers format (gpg.ssh.allowedSignersFile).
    #[arg(long, value_name = "FILE")]
    pub trusted_keys: PathBuf,
}

/// Runs the command: 0 verified, 1 refused (with the reason on stderr).
pub fn run(args: VerifyArgs) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(&args.trusted_keys).with_context(|| {
        format!(
            "cannot read the trusted keys {}",
            args.trusted_keys.display()
        )
    })?;
    let signers = AllowedSigners::parse(&text)
        .with_context(|| format!("in {}", args.trusted_keys.display()))?;
    let repo = git2::Repository::discover(&args.repo)
        .with_context(|| format!("no git repository at {}", args.repo.display()))?;
    match policy::commit::verify_commit(&repo, &args.rev, &signers) {
        Ok(v) => {
            println!(
                "ok: commit {} has a good signature by {} (key {}, {} line {})",
                v.id,
                v.principals.join(", "),
                v.fingerprint,
                args.trusted_keys.display(),
                v.line
            );
            if !v.principals.iter().any(|p| p == &v.committer_email) {
                println!(
                    "note: the committer e-mail {} is not among the key's principals",
                    v.committer_email
                );
            }
            Ok(0)
        }
        Err(policy::commit::CommitError::NoCommit { rev, message }) => {
            anyhow::bail!("cannot find commit `{rev}`: {message}")
        }
        Err(e) => {
            eprintln!("refused: {e}");
            Ok(1)
        }
    }
}
