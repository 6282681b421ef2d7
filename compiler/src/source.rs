//! Loading spec sources from a directory or from a git revision.
//!
//! This is the only module of the compiler that performs I/O. It returns the
//! text of every `*.kdl` file below the spec root (and the list of all other
//! files, so that checks such as "the image's kernel file exists" need no I/O
//! later), sorted by path so that nothing downstream depends on directory order.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Index of a file in [`Sources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId(pub u32);

/// One loaded spec file.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path relative to the spec root, with `/` separators.
    pub path: String,
    /// The file's text.
    pub text: Arc<String>,
}

/// Every spec file of a spec root, sorted by path.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    files: Vec<SourceFile>,
    /// Every other (non-spec) file below the root, relative, `/`-separated.
    other_files: BTreeSet<String>,
}

/// Errors while loading sources.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The spec root cannot be read.
    #[error("cannot read spec directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A spec file cannot be read.
    #[error("cannot read spec file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A spec file is not UTF-8.
    #[error("spec file {path} is not valid UTF-8 text")]
    NotUtf8 {
        /// The file.
        path: String,
    },
    /// Git could not give the revision.
    #[error("cannot read revision `{rev}` of the git repository at {repo}: {message}")]
    Git {
        /// The revision asked for.
        rev: String,
        /// The repository path.
        repo: PathBuf,
        /// git's message.
        message: String,
    },
}

impl Sources {
    /// Sources from in-memory files (tests, fuzzing, generators).
    pub fn from_files(files: impl IntoIterator<Item = (String, String)>) -> Sources {
        let mut sources = Sources::default();
        for (path, text) in files {
            sources.push(path, text);
        }
        sources.finish()
    }

    fn push(&mut self, path: String, text: String) {
        self.files.push(SourceFile {
            path,
            text: Arc::new(text),
        });
    }

    fn finish(mut self) -> Sources {
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
        self
    }

    /// Declares that a non-spec file exists below the root.
    pub fn add_other_file(&mut self, path: impl Into<String>) {
        self.other_files.insert(path.into());
    }

    /// Whether a non-spec file exists below the root.
    pub fn has_other_file(&self, path: &str) -> bool {
        self.other_files.contains(path)
    }

    /// The loaded files in path order.
    pub fn files(&self) -> impl Iterator<Item = (FileId, &SourceFile)> {
        self.files
            .iter()
            .enumerate()
            .map(|(i, f)| (FileId(i as u32), f))
    }

    /// The number of spec files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether no spec file was found.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The relative path of a file.
    pub fn path(&self, id: FileId) -> &str {
        &self.files[id.0 as usize].path
    }

    /// The text of a file.
    pub fn text(&self, id: FileId) -> &str {
        &self.files[id.0 as usize].text
    }

    /// The shared text of a file.
    pub fn text_arc(&self, id: FileId) -> Arc<String> {
        self.files[id.0 as usize].text.clone()
    }

    /// Loads every `*.kdl` below `root`, skipping hidden directories, `target/`
    /// and `policies/`.
    pub fn load_dir(root: &Path) -> Result<Sources, LoadError> {
        let mut sources = Sources::default();
        walk(root, root, &mut sources)?;
        Ok(sources.finish())
    }

    /// Loads the spec root `dir` as it is in revision `rev` of the git
    /// repository that contains `dir`.
    pub fn load_git(dir: &Path, rev: &str) -> Result<Sources, LoadError> {
        let git_err = |message: String| LoadError::Git {
            rev: rev.to_owned(),
            repo: dir.to_owned(),
            message,
        };
        let repo = git2::Repository::discover(dir).map_err(|e| git_err(e.message().to_owned()))?;
        let workdir = repo
            .workdir()
            .ok_or_else(|| git_err("the repository is bare".to_owned()))?;
        let abs_dir = dir.canonicalize().map_err(|e| git_err(e.to_string()))?;
        let abs_work = workdir.canonicalize().map_err(|e| git_err(e.to_string()))?;
        let prefix = abs_dir
            .strip_prefix(&abs_work)
            .unwrap_or(Path::new(""))
            .to_owned();
        load_git_tree(&repo, rev, &prefix).map_err(|e| match e {
            LoadError::Git { message, .. } => git_err(message),
            other => other,
        })
    }
}

/// Loads the spec root at `prefix` (relative to the repository's top) in
/// revision `rev` of an open repository.
pub fn load_git_tree(
    repo: &git2::Repository,
    rev: &str,
    prefix: &Path,
) -> Result<Sources, LoadError> {
    let git_err = |message: String| LoadError::Git {
        rev: rev.to_owned(),
        repo: repo.path().to_owned(),
        message,
    };
    let object = repo
        .revparse_single(rev)
        .map_err(|e| git_err(e.message().to_owned()))?;
    let commit = object
        .peel_to_commit()
        .map_err(|e| git_err(e.message().to_owned()))?;
    let mut tree = commit.tree().map_err(|e| git_err(e.message().to_owned()))?;
    if !prefix.as_os_str().is_empty() {
        let entry = tree.get_path(prefix).map_err(|_| {
            git_err(format!(
                "the revision has no directory {}",
                prefix.display()
            ))
        })?;
        let object = entry
            .to_object(repo)
            .map_err(|e| git_err(e.message().to_owned()))?;
        tree = object.into_tree().map_err(|_| {
            git_err(format!(
                "{} is not a directory in the revision",
                prefix.display()
            ))
        })?;
    }
    let mut sources = Sources::default();
    let mut failure = None;
    tree.walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
        let name = entry.name().unwrap_or("");
        let path = format!("{parent}{name}");
        if entry.kind() == Some(git2::ObjectType::Tree) {
            return if skip_dir(parent.is_empty(), name) {
                git2::TreeWalkResult::Skip
            } else {
                git2::TreeWalkResult::Ok
            };
        }
        if !name.ends_with(".kdl") {
            sources.add_other_file(path);
            return git2::TreeWalkResult::Ok;
        }
        let blob = match repo.find_blob(entry.id()) {
            Ok(b) => b,
            Err(e) => {
                failure = Some(git_err(e.message().to_owned()));
                return git2::TreeWalkResult::Abort;
            }
        };
        match String::from_utf8(blob.content().to_vec()) {
            Ok(text) => sources.push(path, text),
            Err(_) => {
                failure = Some(LoadError::NotUtf8 { path });
                return git2::TreeWalkResult::Abort;
            }
        }
        git2::TreeWalkResult::Ok
    })
    .map_err(|e| {
        failure
            .take()
            .unwrap_or_else(|| git_err(e.message().to_owned()))
    })?;
    if let Some(f) = failure {
        return Err(f);
    }
    Ok(sources.finish())
}

fn skip_dir(at_root: bool, name: &str) -> bool {
    name.starts_with('.') || (at_root && (name == "target" || name == "policies"))
}

fn walk(root: &Path, dir: &Path, sources: &mut Sources) -> Result<(), LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths = vec![];
    for entry in entries {
        let entry = entry.map_err(|source| LoadError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        paths.push(entry.path());
    }
    paths.sort();
    for path in paths {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let rel = relative(root, &path);
        if path.is_dir() {
            if !skip_dir(dir == root, name) {
                walk(root, &path, sources)?;
            }
            continue;
        }
        if !name.ends_with(".kdl") {
            sources.add_other_file(rel);
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|source| LoadError::File {
            path: path.clone(),
            source,
        })?;
        let text =
            String::from_utf8(bytes).map_err(|_| LoadError::NotUtf8 { path: rel.clone() })?;
        sources.push(rel, text);
    }
    Ok(())
}

fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}
