//! The source: one branch (and optionally one subdirectory) of a local git
//! repository, bare or not, read with git2; and the watcher that wakes the
//! controller when the branch moves.
//!
//! The repository is opened anew for every question: operators push to it while
//! the controller runs, and a fresh open sees packed refs and new objects.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use git2::{Oid, Repository};

/// Why the source could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("repository {repo}: {message}")]
pub struct SourceError {
    /// The repository.
    pub repo: String,
    /// Why.
    pub message: String,
}

/// A commit as people see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// Full id.
    pub id: String,
    /// `Name <email>`.
    pub author: String,
    /// First line of the message.
    pub summary: String,
}

/// One branch (and subdirectory) of a local repository.
#[derive(Debug, Clone)]
pub struct GitSource {
    /// The repository (bare or a work tree).
    pub repo: PathBuf,
    /// The branch followed.
    pub branch: String,
    /// The spec root inside the repository ("" for its top).
    pub subdir: PathBuf,
}

impl GitSource {
    fn err(&self, message: impl Into<String>) -> SourceError {
        SourceError {
            repo: self.repo.display().to_string(),
            message: message.into(),
        }
    }

    /// Opens the repository.
    pub fn open(&self) -> Result<Repository, SourceError> {
        Repository::open(&self.repo).map_err(|e| self.err(e.message().to_owned()))
    }

    /// The git directory (what to watch): `.git` of a work tree, or the bare
    /// repository itself.
    pub fn git_dir(&self) -> Result<PathBuf, SourceError> {
        Ok(self.open()?.path().to_owned())
    }

    /// The branch's head; `None` when the branch does not exist yet.
    pub fn head(&self) -> Result<Option<String>, SourceError> {
        let repo = self.open()?;
        let name = format!("refs/heads/{}", self.branch);
        match repo.find_reference(&name) {
            Ok(r) => {
                let commit = r
                    .peel_to_commit()
                    .map_err(|e| self.err(format!("{name}: {}", e.message())))?;
                Ok(Some(commit.id().to_string()))
            }
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(self.err(format!("{name}: {}", e.message()))),
        }
    }

    /// The commits to verify before `to` is applied, oldest first: every commit
    /// on `to`'s first-parent path that `from` (the last applied commit) does not
    /// contain. Without `from`, only `to`. After a force push that rewrote
    /// history, every new commit down to where the histories meet.
    pub fn path(&self, from: Option<&str>, to: &str) -> Result<Vec<String>, SourceError> {
        let repo = self.open()?;
        let to_oid = Oid::from_str(to).map_err(|e| self.err(e.message().to_owned()))?;
        let Some(from) = from else {
            return Ok(vec![to.to_owned()]);
        };
        let mut walk = repo
            .revwalk()
            .map_err(|e| self.err(e.message().to_owned()))?;
        walk.simplify_first_parent()
            .map_err(|e| self.err(e.message().to_owned()))?;
        walk.push(to_oid)
            .map_err(|e| self.err(e.message().to_owned()))?;
        // An applied commit that is gone (history rewritten and collected) hides
        // nothing: then every commit of the branch is checked.
        if let Ok(from_oid) = Oid::from_str(from)
            && repo.find_commit(from_oid).is_ok()
        {
            walk.hide(from_oid)
                .map_err(|e| self.err(e.message().to_owned()))?;
        }
        let mut out = vec![];
        for oid in walk {
            out.push(
                oid.map_err(|e| self.err(e.message().to_owned()))?
                    .to_string(),
            );
        }
        out.reverse();
        Ok(out)
    }

    /// Author and summary of a commit.
    pub fn info(&self, commit: &str) -> Result<CommitInfo, SourceError> {
        let repo = self.open()?;
        let oid = Oid::from_str(commit).map_err(|e| self.err(e.message().to_owned()))?;
        let c = repo
            .find_commit(oid)
            .map_err(|e| self.err(e.message().to_owned()))?;
        let author = c.author();
        Ok(CommitInfo {
            id: commit.to_owned(),
            author: format!(
                "{} <{}>",
                author.name().unwrap_or(""),
                author.email().unwrap_or("")
            ),
            summary: c.summary().ok().flatten().unwrap_or("").to_owned(),
        })
    }

    /// The spec files of a commit.
    pub fn load(&self, commit: &str) -> Result<compiler::Sources, SourceError> {
        let repo = self.open()?;
        compiler::source::load_git_tree(&repo, commit, &self.subdir)
            .map_err(|e| self.err(e.to_string()))
    }

    /// Writes the commit's files below the spec root into `dir` (replaced
    /// whole): the spec root the plan resolves image paths against, so a kernel
    /// file is read as the commit has it, never from someone's work tree.
    pub fn materialize(&self, commit: &str, dir: &Path) -> Result<(), SourceError> {
        let repo = self.open()?;
        let oid = Oid::from_str(commit).map_err(|e| self.err(e.message().to_owned()))?;
        let mut tree = repo
            .find_commit(oid)
            .and_then(|c| c.tree())
            .map_err(|e| self.err(e.message().to_owned()))?;
        if !self.subdir.as_os_str().is_empty() {
            let entry = tree
                .get_path(&self.subdir)
                .map_err(|_| self.err(format!("no directory {}", self.subdir.display())))?;
            tree = entry
                .to_object(&repo)
                .and_then(|o| o.peel_to_tree())
                .map_err(|e| self.err(e.message().to_owned()))?;
        }
        let fresh = dir.with_extension("new");
        let _ = std::fs::remove_dir_all(&fresh);
        std::fs::create_dir_all(&fresh)
            .map_err(|e| self.err(format!("{}: {e}", fresh.display())))?;
        let mut failure = None;
        tree.walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
            let Ok(name) = entry.name() else {
                return git2::TreeWalkResult::Skip;
            };
            let path = fresh.join(parent).join(name);
            let result = match entry.kind() {
                Some(git2::ObjectType::Tree) => std::fs::create_dir_all(&path),
                Some(git2::ObjectType::Blob) => match repo.find_blob(entry.id()) {
                    Ok(blob) => std::fs::write(&path, blob.content()),
                    Err(e) => Err(std::io::Error::other(e.message().to_owned())),
                },
                _ => Ok(()),
            };
            match result {
                Ok(()) => git2::TreeWalkResult::Ok,
                Err(e) => {
                    failure = Some(format!("{}: {e}", path.display()));
                    git2::TreeWalkResult::Abort
                }
            }
        })
        .map_err(|e| self.err(e.message().to_owned()))?;
        if let Some(f) = failure {
            return Err(self.err(f));
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&fresh, dir).map_err(|e| self.err(format!("{}: {e}", dir.display())))
    }
}

/// Watches the repository's refs and calls `wake` on every change: git updates
/// a branch by renaming `refs/heads/BRANCH.lock` over it (or rewriting
/// `packed-refs`), both seen by inotify within milliseconds. Dropping the
/// watcher stops it.
pub fn watch_refs(
    git_dir: &Path,
    wake: Arc<dyn Fn() + Send + Sync>,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            wake();
        }
    })?;
    watcher.watch(git_dir, notify::RecursiveMode::NonRecursive)?;
    let heads = git_dir.join("refs/heads");
    if heads.is_dir() {
        watcher.watch(&heads, notify::RecursiveMode::Recursive)?;
    }
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit of `files` (path → text) on top of `parents`, moving `main` when asked.
    fn commit(
        repo: &Repository,
        files: &[(&str, &str)],
        parents: &[Oid],
        update_main: bool,
    ) -> Oid {
        let mut index = git2::Index::new().unwrap();
        for (path, text) in files {
            let blob = repo.blob(text.as_bytes()).unwrap();
            index
                .add(&git2::IndexEntry {
                    ctime: git2::IndexTime::new(0, 0),
                    mtime: git2::IndexTime::new(0, 0),
                    dev: 0,
                    ino: 0,
                    mode: 0o100644,
                    uid: 0,
                    gid: 0,
                    file_size: text.len() as u32,
                    id: blob,
                    flags: 0,
                    flags_extended: 0,
                    path: path.as_bytes().to_vec(),
                })
                .unwrap();
        }
        let tree = repo.find_tree(index.write_tree_to(repo).unwrap()).unwrap();
        let sig = git2::Signature::now("Op", "ops@example.com").unwrap();
        let parents: Vec<git2::Commit> = parents
            .iter()
            .map(|p| repo.find_commit(*p).unwrap())
            .collect();
        let refs: Vec<&git2::Commit> = parents.iter().collect();
        let oid = repo.commit(None, &sig, &sig, "c", &tree, &refs).unwrap();
        if update_main {
            repo.reference("refs/heads/main", oid, true, "test")
                .unwrap();
        }
        oid
    }

    #[test]
    fn the_path_to_verify_is_the_first_parent_history_since_the_applied_commit() {
        let dir =
            std::env::temp_dir().join(format!("cairn-source-{}", reconciler::state::random_id()));
        let repo = Repository::init_bare(&dir).unwrap();
        let source = GitSource {
            repo: dir.clone(),
            branch: "main".into(),
            subdir: PathBuf::from("specs"),
        };
        assert_eq!(source.head().unwrap(), None, "no branch yet");
        let spec = "tenant \"t\" {}\n";
        let a = commit(&repo, &[("specs/a.kdl", spec), ("README", "x")], &[], true);
        let b = commit(
            &repo,
            &[("specs/a.kdl", spec), ("specs/b.kdl", spec)],
            &[a],
            true,
        );
        let c = commit(&repo, &[("specs/a.kdl", spec)], &[b], true);
        let ids = |v: &[Oid]| v.iter().map(Oid::to_string).collect::<Vec<_>>();
        assert_eq!(source.head().unwrap(), Some(c.to_string()));
        assert_eq!(source.path(None, &c.to_string()).unwrap(), ids(&[c]));
        assert_eq!(
            source.path(Some(&a.to_string()), &c.to_string()).unwrap(),
            ids(&[b, c])
        );
        // A merge: only the first-parent path (the side commit is not on it).
        let side = commit(&repo, &[("specs/a.kdl", spec)], &[b], false);
        let merge = commit(&repo, &[("specs/a.kdl", spec)], &[c, side], true);
        assert_eq!(
            source
                .path(Some(&c.to_string()), &merge.to_string())
                .unwrap(),
            ids(&[merge])
        );
        // A force push onto a rewritten history: every new commit down to where
        // the histories meet.
        let d = commit(&repo, &[("specs/a.kdl", spec)], &[a], false);
        let e = commit(&repo, &[("specs/a.kdl", spec)], &[d], true);
        assert_eq!(
            source
                .path(Some(&merge.to_string()), &e.to_string())
                .unwrap(),
            ids(&[d, e])
        );
        // An applied commit that is gone hides nothing.
        assert_eq!(
            source
                .path(
                    Some("0123456789012345678901234567890123456789"),
                    &e.to_string()
                )
                .unwrap(),
            ids(&[a, d, e])
        );
        // The subdirectory is the spec root; materialize writes the commit's files.
        let sources = source.load(&b.to_string()).unwrap();
        let paths: Vec<&str> = sources.files().map(|(id, _)| sources.path(id)).collect();
        assert_eq!(paths, vec!["a.kdl", "b.kdl"]);
        let out = dir.join("checkout");
        source.materialize(&b.to_string(), &out).unwrap();
        assert!(out.join("b.kdl").is_file() && !out.join("README").exists());
        source.materialize(&c.to_string(), &out).unwrap();
        assert!(!out.join("b.kdl").exists(), "replaced whole");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
