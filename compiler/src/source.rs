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

    /// Every non-spec file below the root, in path order.
    pub(crate) fn other_files(&self) -> &BTreeSet<String> {
        &self.other_files
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
        Sources::load_tree(TreeRoot::Dir(root))
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
        let root = TreeRoot::Git {
            repo: &repo,
            rev,
            dir: &prefix,
        };
        Sources::load_tree(root).map_err(|e| match e {
            LoadError::Git { message, .. } => git_err(message),
            other => other,
        })
    }
}

/// Loads the spec root at `prefix` (relative to the repository's top) in
/// revision `rev` of an open repository: [`Sources::load_tree`] of a
/// [`TreeRoot::Git`].
pub fn load_git_tree(
    repo: &git2::Repository,
    rev: &str,
    prefix: &Path,
) -> Result<Sources, LoadError> {
    Sources::load_tree(TreeRoot::Git {
        repo,
        rev,
        dir: prefix,
    })
}

impl Sources {
    /// Loads the spec root `root` (a directory, or one in a git revision of
    /// an open repository): every `*.kdl` below it and the names of the
    /// other files, skipping hidden directories and, at the top, `target/`
    /// and `policies/`.
    pub fn load_tree(root: TreeRoot<'_>) -> Result<Sources, LoadError> {
        let files = read_tree(&root, |path, is_dir| {
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
            match (is_dir, name.ends_with(".kdl")) {
                (true, _) if skip_dir(parent.is_empty(), name) => Take::Skip,
                (true, _) | (false, true) => Take::Read,
                (false, false) => Take::Name,
            }
        })
        .map_err(|e| match (e, &root) {
            (TreeError::ReadDir { path, source }, _) => LoadError::Dir { path, source },
            (TreeError::ReadFile { path, source }, _) => LoadError::File { path, source },
            (TreeError::NotUtf8 { path }, _) => LoadError::NotUtf8 { path },
            (other, TreeRoot::Git { repo, rev, .. }) => LoadError::Git {
                rev: (*rev).to_owned(),
                repo: repo.path().to_owned(),
                message: other.to_string(),
            },
            (other, TreeRoot::Dir(dir)) => LoadError::Dir {
                path: dir.to_path_buf(),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
        let mut sources = Sources::default();
        for file in files {
            match file.text {
                Some(text) => sources.push(file.path, text),
                None => sources.add_other_file(file.path),
            }
        }
        Ok(sources.finish())
    }
}

fn skip_dir(at_root: bool, name: &str) -> bool {
    name.starts_with('.') || (at_root && (name == "target" || name == "policies"))
}

/// Where [`read_tree`] reads: a directory, or a directory as it is in a git
/// revision.
#[derive(Clone, Copy)]
pub enum TreeRoot<'a> {
    /// A directory of the file system.
    Dir(&'a Path),
    /// The directory `dir` (relative to the repository's top; empty: the top)
    /// in revision `rev` of an open repository.
    Git {
        /// The repository.
        repo: &'a git2::Repository,
        /// The revision (anything `git rev-parse` takes).
        rev: &'a str,
        /// The directory inside it.
        dir: &'a Path,
    },
}

impl std::fmt::Debug for TreeRoot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TreeRoot::Dir(dir) => f.debug_tuple("Dir").field(dir).finish(),
            TreeRoot::Git { repo, rev, dir } => f
                .debug_struct("Git")
                .field("repo", &repo.path())
                .field("rev", rev)
                .field("dir", dir)
                .finish(),
        }
    }
}

/// What [`read_tree`] does with one entry of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// A file: read its text. A directory: walk into it.
    Read,
    /// A file: give its path without reading it. A directory: walk into it.
    Name,
    /// Leave it out; for a directory, everything below it too.
    Skip,
}

/// A file [`read_tree`] took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// The path below the root, with `/` separators.
    pub path: String,
    /// Its text; `None` when it was taken by name ([`Take::Name`]).
    pub text: Option<String>,
}

/// Errors of [`read_tree`].
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A directory cannot be listed.
    #[error("cannot read directory {}", .path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be read.
    #[error("cannot read {}", .path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file to read is not UTF-8 text.
    #[error("{path} is not valid UTF-8 text")]
    NotUtf8 {
        /// Its path below the root.
        path: String,
    },
    /// The revision has nothing at the root's path.
    #[error("the revision has no directory {}", .0.display())]
    NoDirectory(PathBuf),
    /// The revision has a file, not a directory, at the root's path.
    #[error("{} is not a directory in the revision", .0.display())]
    NotADirectory(PathBuf),
    /// git could not resolve the revision or read an object.
    #[error("{0}")]
    Git(String),
}

/// Reads a tree of files, from a directory or from a git revision: the one
/// reader for spec files and for policies alike (each caller says which
/// files it wants). `take(path, is_dir)` is asked for every entry below the
/// root (its path relative to the root, `/`-separated) and decides which
/// files are read, which are only named and which directories are walked.
/// Files come in walk order (each directory before what is below it);
/// callers that need an order sort.
pub fn read_tree(
    root: &TreeRoot<'_>,
    mut take: impl FnMut(&str, bool) -> Take,
) -> Result<Vec<TreeFile>, TreeError> {
    let mut files = vec![];
    match *root {
        TreeRoot::Dir(dir) => walk_dir(dir, "", &mut take, &mut files)?,
        TreeRoot::Git { repo, rev, dir } => walk_git(repo, rev, dir, &mut take, &mut files)?,
    }
    Ok(files)
}

/// Reads a file the caller takes, by [`Take`].
fn take_file(
    path: String,
    how: Take,
    read: impl FnOnce() -> Result<Vec<u8>, TreeError>,
    files: &mut Vec<TreeFile>,
) -> Result<(), TreeError> {
    let text = match how {
        Take::Skip => return Ok(()),
        Take::Name => None,
        Take::Read => match String::from_utf8(read()?) {
            Ok(text) => Some(text),
            Err(_) => return Err(TreeError::NotUtf8 { path }),
        },
    };
    files.push(TreeFile { path, text });
    Ok(())
}

fn walk_dir(
    root: &Path,
    rel: &str,
    take: &mut impl FnMut(&str, bool) -> Take,
    files: &mut Vec<TreeFile>,
) -> Result<(), TreeError> {
    let dir = if rel.is_empty() {
        root.to_owned()
    } else {
        root.join(rel)
    };
    let read_dir_err = |source| TreeError::ReadDir {
        path: dir.clone(),
        source,
    };
    let mut paths = vec![];
    for entry in std::fs::read_dir(&dir).map_err(read_dir_err)? {
        paths.push(entry.map_err(read_dir_err)?.path());
    }
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let child = if rel.is_empty() {
            name.into_owned()
        } else {
            format!("{rel}/{name}")
        };
        let is_dir = path.is_dir();
        let how = take(&child, is_dir);
        if is_dir {
            if how != Take::Skip {
                walk_dir(root, &child, take, files)?;
            }
            continue;
        }
        let read = || {
            std::fs::read(&path).map_err(|source| TreeError::ReadFile {
                path: path.clone(),
                source,
            })
        };
        take_file(child, how, read, files)?;
    }
    Ok(())
}

fn walk_git(
    repo: &git2::Repository,
    rev: &str,
    dir: &Path,
    take: &mut impl FnMut(&str, bool) -> Take,
    files: &mut Vec<TreeFile>,
) -> Result<(), TreeError> {
    let git_err = |e: git2::Error| TreeError::Git(e.message().to_owned());
    let commit = repo
        .revparse_single(rev)
        .and_then(|o| o.peel_to_commit())
        .map_err(git_err)?;
    let mut tree = commit.tree().map_err(git_err)?;
    if !dir.as_os_str().is_empty() {
        let entry = tree
            .get_path(dir)
            .map_err(|_| TreeError::NoDirectory(dir.to_owned()))?;
        let object = entry.to_object(repo).map_err(git_err)?;
        tree = object
            .into_tree()
            .map_err(|_| TreeError::NotADirectory(dir.to_owned()))?;
    }
    let mut failure = None;
    tree.walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
        let path = format!("{parent}{}", entry.name().unwrap_or(""));
        let is_dir = entry.kind() == Some(git2::ObjectType::Tree);
        let how = take(&path, is_dir);
        if is_dir {
            return match how {
                Take::Skip => git2::TreeWalkResult::Skip,
                Take::Read | Take::Name => git2::TreeWalkResult::Ok,
            };
        }
        let read = || {
            repo.find_blob(entry.id())
                .map(|blob| blob.content().to_vec())
                .map_err(git_err)
        };
        match take_file(path, how, read, files) {
            Ok(()) => git2::TreeWalkResult::Ok,
            Err(e) => {
                failure = Some(e);
                git2::TreeWalkResult::Abort
            }
        }
    })
    .map_err(|e| failure.take().unwrap_or_else(|| git_err(e)))?;
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}
