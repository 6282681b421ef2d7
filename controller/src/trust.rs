//! Trust, per commit, before anything is applied.
//!
//! Signature: every commit to be applied must carry an SSH signature
//! (SSHSIG, as `git commit -S` with `gpg.format=ssh` makes it). The key is a
//! *platform key* when the trusted-keys file (git's allowed-signers format)
//! lists it, or a *member key* when a tenant `member` of the last applied
//! commit carries it (`key="ssh-ed25519 …"`). Any other key, and any member
//! key while nothing has been applied yet, is refused.
//!
//! Authorization: a platform key may change anything; a member key only what
//! its role allows (`policy::authorize`: its tenant's workloads, for admins
//! and operators). A member's commit is judged as the change from its parent's
//! tree to its own (a merge: what differs from every parent), with the keys
//! and roles of the last applied commit, never of the commit judged.
//!
//! A merge on the path also brings in the commits of its other parents: each
//! of them must pass on its own (signature and authorization), whoever signed
//! the merge.

use std::collections::HashMap;
use std::path::Path;

use git2::{Oid, Repository};
use policy::authorize::{self, Snapshot};
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
    /// The objects the signer may not change, when that is why.
    pub objects: Vec<authorize::Refusal>,
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
            objects: vec![],
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
            objects: vec![],
            reason: format!(
                "commit {short} is signed by key {fingerprint}, which is not trusted, so nothing was applied; to trust that key add a line `EMAIL ssh-ed25519 PUBLIC-KEY` for it to {keys} (`ssh-keygen -lf KEY.pub` shows a key's fingerprint), or sign the commit with a trusted key"
            ),
        }),
        Err(CommitError::Signature { source, .. }) => Err(Refusal {
            commit: commit.to_owned(),
            signed_by: None,
            objects: vec![],
            reason: format!("commit {short} is refused, so nothing was applied: {source}"),
        }),
        Err(e @ CommitError::NoCommit { .. }) => Err(Refusal {
            commit: commit.to_owned(),
            signed_by: None,
            objects: vec![],
            reason: e.to_string(),
        }),
    }
}

/// Judges one commit of the path: its signature and who signed it, what it
/// changes when a member signed it, and, when it is a merge, every commit it
/// brings in. `authority` is the last applied commit's model (`None`: nothing
/// applied yet, so only platform keys may sign).
pub fn judge(
    repo: &Repository,
    subdir: &Path,
    commit: &str,
    authority: Option<&compiler::Model>,
    signers: &AllowedSigners,
    keys_path: &Path,
) -> Result<Signer, Refusal> {
    let mut judge = Judge {
        repo,
        subdir,
        authority,
        signers,
        keys_path,
        snapshots: HashMap::new(),
    };
    let signer = judge.one(commit)?;
    let oid = Oid::from_str(commit).map_err(|e| refusal(commit, None, e.message().to_owned()))?;
    let parents: Vec<Oid> = repo
        .find_commit(oid)
        .map(|c| c.parent_ids().collect())
        .map_err(|e| refusal(commit, None, e.message().to_owned()))?;
    if parents.len() > 1 {
        for side in judge.brought_in(&parents)? {
            judge.one(&side).map_err(|mut r| {
                r.reason = format!(
                    "{} (it is brought in by merge {}: every commit a merge brings in must pass on its own)",
                    r.reason,
                    short(commit)
                );
                r
            })?;
        }
    }
    Ok(signer)
}

fn short(c: &str) -> &str {
    &c[..c.len().min(12)]
}

fn refusal(commit: &str, signed_by: Option<String>, reason: String) -> Refusal {
    Refusal {
        commit: commit.to_owned(),
        signed_by,
        reason,
        objects: vec![],
    }
}

/// A commit's compiled model and files, with what locates its objects.
struct Compiled {
    snapshot: Snapshot,
    sources: compiler::Sources,
    spans: compiler::check::SpanIndex,
}

struct Judge<'a> {
    repo: &'a Repository,
    subdir: &'a Path,
    authority: Option<&'a compiler::Model>,
    signers: &'a AllowedSigners,
    keys_path: &'a Path,
    snapshots: HashMap<Oid, std::rc::Rc<Compiled>>,
}

impl Judge<'_> {
    /// The commits of a merge's other parents that its first parent does not
    /// contain, oldest first.
    fn brought_in(&self, parents: &[Oid]) -> Result<Vec<String>, Refusal> {
        let err = |e: git2::Error| refusal(&parents[0].to_string(), None, e.message().to_owned());
        let mut walk = self.repo.revwalk().map_err(err)?;
        for p in &parents[1..] {
            walk.push(*p).map_err(err)?;
        }
        walk.hide(parents[0]).map_err(err)?;
        walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::REVERSE)
            .map_err(err)?;
        walk.map(|o| o.map(|o| o.to_string()).map_err(err))
            .collect()
    }

    /// One commit: signature, signer, and a member's change.
    fn one(&mut self, commit: &str) -> Result<Signer, Refusal> {
        let short = short(commit);
        let keys = self.keys_path.display();
        let signed = match policy::commit::signature_of(self.repo, commit) {
            Ok(s) => s,
            // The messages of `verify` for unsigned and malformed commits.
            Err(e) => {
                return Err(verify(self.repo, commit, self.signers, self.keys_path)
                    .err()
                    .unwrap_or_else(|| refusal(commit, None, e.to_string())));
            }
        };
        let fingerprint = signed.signature.fingerprint();
        match self.signers.check(&signed.signature, "git", signed.time) {
            Ok(t) => {
                return Ok(Signer {
                    principals: t.principals,
                    fingerprint: t.fingerprint,
                });
            }
            Err(SigError::Untrusted { .. }) => {}
            Err(e) => {
                return Err(refusal(
                    commit,
                    Some(fingerprint),
                    format!("commit {short} is refused, so nothing was applied: {e}"),
                ));
            }
        }
        let who = authorize::identify(
            &signed.signature.public_key,
            &AllowedSigners::default(),
            self.authority,
        );
        let authorize::Signer::Member { memberships, .. } = &who else {
            let reason = if self.authority.is_none() {
                format!(
                    "commit {short} is signed by key {fingerprint}, which is not a platform key; nothing has been applied yet, so the first commit must be signed by a platform key (a line `EMAIL ssh-ed25519 PUBLIC-KEY` of {keys}), so nothing was applied"
                )
            } else {
                format!(
                    "commit {short} is signed by key {fingerprint}, which is not trusted (neither a platform key nor a member key of the commit applied last), so nothing was applied; to trust that key add a line `EMAIL ssh-ed25519 PUBLIC-KEY` for it to {keys} (`ssh-keygen -lf KEY.pub` shows a key's fingerprint), or give it to a tenant member (`member \"EMAIL\" role=\"operator\" key=\"ssh-ed25519 …\"`) in a commit a platform key signs, or sign the commit with a trusted key"
                )
            };
            return Err(refusal(commit, Some(fingerprint), reason));
        };
        let principals = memberships
            .iter()
            .map(|m| format!("{} ({} of tenant {})", m.email, m.role, m.tenant))
            .collect();
        let verdict = self.authorize(commit, &who)?;
        if !verdict.allowed() {
            let n = verdict.refusals.len();
            return Err(Refusal {
                commit: commit.to_owned(),
                signed_by: Some(fingerprint),
                reason: format!(
                    "commit {short} is signed by {}, who may not change {n} object{} it changes, so nothing was applied: {}",
                    who.describe(),
                    if n == 1 { "" } else { "s" },
                    authorize::refusal_text(&verdict.refusals)
                ),
                objects: verdict.refusals,
            });
        }
        Ok(Signer {
            principals,
            fingerprint,
        })
    }

    /// What `commit` changes, judged for `who`.
    fn authorize(
        &mut self,
        commit: &str,
        who: &authorize::Signer,
    ) -> Result<authorize::Verdict, Refusal> {
        let err = |e: String| refusal(commit, Some(who.fingerprint().to_owned()), e);
        let oid = Oid::from_str(commit).map_err(|e| err(e.message().to_owned()))?;
        let parents: Vec<Oid> = self
            .repo
            .find_commit(oid)
            .map(|c| c.parent_ids().collect())
            .map_err(|e| err(e.message().to_owned()))?;
        let after = self.compiled(oid).map_err(|why| {
            err(format!(
                "commit {} is signed by {}, a member key, but {why}, so what it changes cannot be judged and nothing was applied (a member's commit must compile; or sign it with a platform key)",
                short(commit),
                who.describe()
            ))
        })?;
        let mut before = vec![];
        for p in &parents {
            let c = self.compiled(*p).map_err(|why| {
                err(format!(
                    "commit {} is signed by {}, a member key, but its parent {why}, so what it changes cannot be judged and nothing was applied",
                    short(commit),
                    who.describe()
                ))
            })?;
            before.push(c.snapshot.clone());
        }
        let locate = authorize::locator(&after.sources, &after.spans);
        Ok(if before.len() > 1 {
            authorize::authorize_merge(self.authority, who, &before, &after.snapshot, &locate)
        } else {
            let empty = Snapshot::default();
            authorize::authorize(
                self.authority,
                who,
                before.first().unwrap_or(&empty),
                &after.snapshot,
                &locate,
            )
        })
    }

    /// A commit compiled (once per judgement).
    fn compiled(&mut self, oid: Oid) -> Result<std::rc::Rc<Compiled>, String> {
        if let Some(c) = self.snapshots.get(&oid) {
            return Ok(c.clone());
        }
        let id = oid.to_string();
        let sources = compiler::source::load_git_tree(self.repo, &id, self.subdir)
            .map_err(|e| format!("commit {} cannot be read ({e})", short(&id)))?;
        let compilation = compiler::compile(&sources);
        if let Some(d) = compilation.diagnostics.iter().find(|d| d.is_error()) {
            let place = d
                .primary_span()
                .map(|s| compiler::diag::location(&sources, s))
                .unwrap_or_default();
            return Err(format!(
                "commit {} does not compile ({place}: {})",
                short(&id),
                d.message
            ));
        }
        let files = authorize::tree_files(self.repo, oid, self.subdir)
            .map_err(|e| format!("commit {} cannot be read ({})", short(&id), e.message()))?;
        let c = std::rc::Rc::new(Compiled {
            snapshot: Snapshot::new(&compilation.model, files),
            sources,
            spans: compilation.spans,
        });
        self.snapshots.insert(oid, c.clone());
        Ok(c)
    }
}
