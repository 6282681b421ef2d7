//! Loading the policies of a spec root.
//!
//! Layout under the policy directory (by default `<spec root>/policies/`):
//! `NAME.rego` is the policy `NAME`; `NAME_test.rego` holds its unit tests;
//! `data/*.json` are data documents merged into `data` of every policy (as
//! Conftest and OPA do, the top-level keys of each file become `data.KEY`).
//!
//! A policy declares its enforcement level in a package-scoped `# METADATA`
//! block (OPA's annotation syntax, ignored by `opa`/`conftest`, so the same
//! files run there too):
//!
//! ```rego
//! # METADATA
//! # title: No spot capacity for regulated tenants
//! # custom:
//! #   enforcement: soft-mandatory
//! package cairn
//! ```
//!
//! Without one, the level is `hard-mandatory`: a `deny` blocks, as in Conftest.

use std::path::{Path, PathBuf};

use compiler::source::{Take, TreeError, TreeRoot, read_tree};

use crate::eval::Enforcement;

/// Errors of loading policies.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A directory or file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// What was read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A policy file is not UTF-8.
    #[error("{path} is not UTF-8")]
    NotUtf8 {
        /// The file.
        path: String,
    },
    /// A policy has no `package` line.
    #[error("{path}: no `package` declaration")]
    NoPackage {
        /// The file.
        path: String,
    },
    /// A policy's METADATA names an unknown enforcement level.
    #[error(
        "{path}: unknown enforcement level `{level}` (use advisory, soft-mandatory or hard-mandatory)"
    )]
    BadEnforcement {
        /// The file.
        path: String,
        /// What it said.
        level: String,
    },
    /// A data document is not a JSON object.
    #[error("{path}: a data document must be a JSON object: {message}")]
    BadData {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The git revision could not be read.
    #[error("cannot read policies at revision `{rev}`: {message}")]
    Git {
        /// The revision.
        rev: String,
        /// git's message.
        message: String,
    },
}

/// One policy module.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The file stem: what results and `--override` name.
    pub name: String,
    /// Path relative to the spec root (`policies/NAME.rego`).
    pub path: String,
    /// The Rego package, e.g. `cairn`.
    pub package: String,
    /// Its enforcement level.
    pub enforcement: Enforcement,
    /// `title` from METADATA.
    pub title: Option<String>,
    /// `description` from METADATA.
    pub description: Option<String>,
    /// `custom.overridable-by`: tenant member roles whose keys may override
    /// this (soft-mandatory) policy in a commit, besides platform keys.
    pub overridable_by: Vec<String>,
    /// The module text.
    pub text: String,
}

/// A unit-test module (`NAME_test.rego`).
#[derive(Debug, Clone, PartialEq)]
pub struct TestModule {
    /// Path relative to the spec root.
    pub path: String,
    /// The policy it tests (`NAME`), when `NAME.rego` exists.
    pub policy: Option<String>,
    /// The Rego package.
    pub package: String,
    /// The module text.
    pub text: String,
}

/// Every policy, test and data document of a spec root, in path order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicySet {
    /// Policies.
    pub policies: Vec<Policy>,
    /// Unit tests.
    pub tests: Vec<TestModule>,
    /// Data documents (path, JSON text).
    pub data: Vec<(String, String)>,
}

impl PolicySet {
    /// Builds a set from in-memory files; paths are relative to the spec
    /// root and start with the policy directory name (`policies/x.rego`,
    /// `policies/data/prices.json`). Other files are ignored.
    pub fn from_files(mut files: Vec<(String, String)>) -> Result<PolicySet, LoadError> {
        files.sort();
        let mut set = PolicySet::default();
        let stems: Vec<String> = files
            .iter()
            .filter_map(|(p, _)| rego_stem(p))
            .filter(|s| !s.ends_with("_test"))
            .collect();
        for (path, text) in files {
            if let Some(stem) = rego_stem(&path) {
                let package =
                    package_of(&text).ok_or_else(|| LoadError::NoPackage { path: path.clone() })?;
                if let Some(tested) = stem.strip_suffix("_test") {
                    let policy = stems.iter().find(|s| *s == tested).cloned();
                    set.tests.push(TestModule {
                        path,
                        policy,
                        package,
                        text,
                    });
                } else {
                    let meta = metadata(&text);
                    let enforcement = match &meta.enforcement {
                        None => Enforcement::HardMandatory,
                        Some(level) => {
                            Enforcement::parse(level).ok_or_else(|| LoadError::BadEnforcement {
                                path: path.clone(),
                                level: level.clone(),
                            })?
                        }
                    };
                    set.policies.push(Policy {
                        name: stem,
                        path,
                        package,
                        enforcement,
                        title: meta.title,
                        description: meta.description,
                        overridable_by: meta.overridable_by,
                        text,
                    });
                }
            } else if is_data_path(&path) {
                match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(serde_json::Value::Object(_)) => set.data.push((path, text)),
                    Ok(_) => {
                        return Err(LoadError::BadData {
                            path,
                            message: "the top level is not an object".to_owned(),
                        });
                    }
                    Err(e) => {
                        return Err(LoadError::BadData {
                            path,
                            message: e.to_string(),
                        });
                    }
                }
            }
        }
        Ok(set)
    }

    /// Loads `dir` (a policy directory, usually `<spec root>/policies`);
    /// an absent directory is an empty set. Paths in the set are
    /// `policies/…` whatever the directory is called.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, LoadError> {
        PolicySet::load_tree(TreeRoot::Dir(dir))
    }

    /// Loads a policy directory, on disk or in a git revision
    /// (`<spec root>/policies` at `rev`), with the compiler's tree reader
    /// (the one spec files are read with): `NAME.rego` at its top and
    /// `data/*.json`. An absent directory is an empty set.
    pub fn load_tree(root: TreeRoot<'_>) -> Result<PolicySet, LoadError> {
        if let TreeRoot::Dir(dir) = root
            && !dir.is_dir()
        {
            return Ok(PolicySet::default());
        }
        PolicySet::from_tree(root)
    }

    fn from_tree(root: TreeRoot<'_>) -> Result<PolicySet, LoadError> {
        let relative = |path: &str| format!("policies/{path}");
        let read = read_tree(&root, |path, is_dir| {
            let path = relative(path);
            let wanted = if is_dir {
                path == "policies/data"
            } else {
                rego_stem(&path).is_some() || is_data_path(&path)
            };
            if wanted { Take::Read } else { Take::Skip }
        });
        let files = match (read, root) {
            (Ok(files), _) => files,
            (Err(TreeError::NoDirectory(_) | TreeError::NotADirectory(_)), _) => {
                return Ok(PolicySet::default());
            }
            (Err(TreeError::NotUtf8 { path }), _) => {
                return Err(LoadError::NotUtf8 {
                    path: relative(&path),
                });
            }
            (
                Err(TreeError::ReadDir { path, source } | TreeError::ReadFile { path, source }),
                _,
            ) => {
                return Err(LoadError::Read { path, source });
            }
            (Err(e @ TreeError::Git(_)), TreeRoot::Git { rev, .. }) => {
                return Err(LoadError::Git {
                    rev: rev.to_owned(),
                    message: e.to_string(),
                });
            }
            (Err(e @ TreeError::Git(_)), TreeRoot::Dir(dir)) => {
                return Err(LoadError::Read {
                    path: dir.to_owned(),
                    source: std::io::Error::other(e.to_string()),
                });
            }
        };
        PolicySet::from_files(
            files
                .into_iter()
                .filter_map(|f| Some((relative(&f.path), f.text?)))
                .collect(),
        )
    }

    /// A policy by name.
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }
}

/// `policies/NAME.rego` → `NAME` (top level of the policy directory only).
fn rego_stem(path: &str) -> Option<String> {
    let rest = path.strip_prefix("policies/")?;
    if rest.contains('/') {
        return None;
    }
    rest.strip_suffix(".rego").map(str::to_owned)
}

fn is_data_path(path: &str) -> bool {
    path.strip_prefix("policies/data/")
        .is_some_and(|rest| !rest.contains('/') && rest.ends_with(".json"))
}

/// The package of a module: the first `package` line.
fn package_of(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("package ")?;
        let package = rest.split('#').next()?.trim();
        (!package.is_empty()).then(|| package.to_owned())
    })
}

#[derive(Debug, Default)]
struct Metadata {
    title: Option<String>,
    description: Option<String>,
    enforcement: Option<String>,
    overridable_by: Vec<String>,
}

/// Reads `title`, `description`, `custom.enforcement` and
/// `custom.overridable-by` (a list of member roles) from the first
/// `# METADATA` block: a run of comment lines after a `# METADATA` line.
fn metadata(text: &str) -> Metadata {
    let mut meta = Metadata::default();
    let mut lines = text.lines().map(str::trim);
    if !lines.any(|l| l == "# METADATA") {
        return meta;
    }
    for line in lines {
        let Some(body) = line.strip_prefix('#') else {
            break;
        };
        let body = body.strip_prefix(' ').unwrap_or(body);
        let key_value = body.trim_start();
        let top_level = key_value.len() == body.len();
        let Some((key, value)) = key_value.split_once(':') else {
            continue;
        };
        let value = unquote(value.trim());
        if value.is_empty() {
            continue;
        }
        match (key, top_level) {
            ("title", true) => meta.title = Some(value),
            ("description", true) => meta.description = Some(value),
            ("enforcement", false) => meta.enforcement = Some(value),
            ("overridable-by", false) => {
                meta.overridable_by = value
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .split(',')
                    .map(|r| unquote(r.trim()))
                    .filter(|r| !r.is_empty())
                    .collect();
            }
            _ => {}
        }
    }
    meta
}

fn unquote(s: &str) -> String {
    let s = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s);
    s.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_gives_title_and_enforcement() {
        let text = "# METADATA\n# title: Budget\n# description: \"Costs\"\n# custom:\n#   enforcement: soft-mandatory\npackage cairn.budget\n";
        let set = PolicySet::from_files(vec![("policies/budget.rego".into(), text.into())])
            .expect("loads");
        let p = &set.policies[0];
        assert_eq!(p.name, "budget");
        assert_eq!(p.package, "cairn.budget");
        assert_eq!(p.enforcement, Enforcement::SoftMandatory);
        assert_eq!(p.title.as_deref(), Some("Budget"));
        assert!(p.overridable_by.is_empty());
        let text = "# METADATA\n# custom:\n#   enforcement: soft-mandatory\n#   overridable-by: [admin, \"operator\"]\npackage cairn.x\n";
        let set = PolicySet::from_files(vec![("policies/x.rego".into(), text.into())]).unwrap();
        assert_eq!(set.policies[0].overridable_by, ["admin", "operator"]);
        assert_eq!(p.description.as_deref(), Some("Costs"));
    }

    #[test]
    fn no_metadata_is_hard_mandatory_and_tests_pair_with_policies() {
        let set = PolicySet::from_files(vec![
            ("policies/a.rego".into(), "package cairn\n".into()),
            ("policies/a_test.rego".into(), "package cairn\n".into()),
            ("policies/orphan_test.rego".into(), "package x\n".into()),
            ("policies/data/prices.json".into(), "{\"p\": 1}".into()),
            ("policies/README.md".into(), "ignored".into()),
        ])
        .expect("loads");
        assert_eq!(set.policies.len(), 1);
        assert_eq!(set.policies[0].enforcement, Enforcement::HardMandatory);
        assert_eq!(set.tests[0].policy.as_deref(), Some("a"));
        assert_eq!(set.tests[1].policy, None);
        assert_eq!(set.data.len(), 1);
    }

    /// A repository whose commit holds a spec root `cloud/` with policies.
    fn repository(files: &[(&str, &str)]) -> (std::path::PathBuf, git2::Repository) {
        let dir = std::env::temp_dir().join(format!("cairn-policy-git-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let repo = git2::Repository::init(&dir).expect("init");
        let mut index = repo.index().expect("index");
        for (path, text) in files {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(&file, text).expect("write");
            index.add_path(Path::new(path)).expect("add");
        }
        let tree = repo
            .find_tree(index.write_tree().expect("tree"))
            .expect("tree");
        let who = git2::Signature::new("t", "t@example.com", &git2::Time::new(0, 0)).expect("sig");
        repo.commit(Some("HEAD"), &who, &who, "specs", &tree, &[])
            .expect("commit");
        drop(tree);
        (dir, repo)
    }

    fn at_head<'a>(repo: &'a git2::Repository, dir: &'a Path) -> TreeRoot<'a> {
        TreeRoot::Git {
            repo,
            rev: "HEAD",
            dir,
        }
    }

    #[test]
    fn one_tree_reader_serves_specs_and_policies_from_git_and_disk() {
        let (dir, repo) = repository(&[
            ("cloud/a.kdl", "site \"s\"\n"),
            ("cloud/images/k", "kernel"),
            ("cloud/.hidden/b.kdl", "ignored"),
            ("cloud/policies/p.rego", "package cairn\n"),
            ("cloud/policies/p_test.rego", "package cairn\n"),
            ("cloud/policies/README.md", "ignored"),
            ("cloud/policies/data/prices.json", "{\"p\": 1}"),
            ("cloud/policies/deeper/q.rego", "ignored"),
        ]);
        let cloud = Path::new("cloud");
        let policies = Path::new("cloud/policies");
        let sources = compiler::Sources::load_tree(at_head(&repo, cloud)).expect("specs");
        let paths: Vec<&str> = sources.files().map(|(_, f)| f.path.as_str()).collect();
        assert_eq!(paths, ["a.kdl"]);
        assert!(sources.has_other_file("images/k"));
        let set = PolicySet::load_tree(at_head(&repo, policies)).expect("policies");
        assert_eq!(set.policies.len(), 1);
        assert_eq!(set.policies[0].path, "policies/p.rego");
        assert_eq!(set.tests[0].policy.as_deref(), Some("p"));
        assert_eq!(
            set.data,
            [(
                "policies/data/prices.json".to_owned(),
                "{\"p\": 1}".to_owned()
            )]
        );
        // No policies directory: an empty set; no spec root: an error.
        assert_eq!(
            PolicySet::load_tree(at_head(&repo, Path::new("cloud/none"))).expect("empty"),
            PolicySet::default()
        );
        let err = compiler::Sources::load_tree(at_head(&repo, Path::new("nowhere")))
            .expect_err("no such directory");
        assert!(
            err.to_string()
                .contains("the revision has no directory nowhere"),
            "{err}"
        );
        // The working tree holds the same files: the directory gives the same.
        let on_disk = compiler::Sources::load_dir(&dir.join(cloud)).expect("specs on disk");
        let disk_paths: Vec<&str> = on_disk.files().map(|(_, f)| f.path.as_str()).collect();
        assert_eq!(disk_paths, paths);
        assert!(on_disk.has_other_file("images/k"));
        assert_eq!(
            PolicySet::load_dir(&dir.join("cloud/policies")).expect("policies on disk"),
            set
        );
        let revision = TreeRoot::Git {
            repo: &repo,
            rev: "no-such-rev",
            dir: policies,
        };
        let err = PolicySet::load_tree(revision).expect_err("no revision");
        assert!(err.to_string().contains("`no-such-rev`"), "{err}");
        drop(repo);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_levels_and_data_are_refused() {
        let bad = "# METADATA\n# custom:\n#   enforcement: mandatory\npackage cairn\n";
        let err = PolicySet::from_files(vec![("policies/x.rego".into(), bad.into())])
            .expect_err("refused");
        assert!(
            err.to_string()
                .contains("unknown enforcement level `mandatory`")
        );
        let err = PolicySet::from_files(vec![("policies/data/x.json".into(), "[1]".into())])
            .expect_err("refused");
        assert!(err.to_string().contains("must be a JSON object"));
    }
}
