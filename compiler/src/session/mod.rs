//! Incremental compilation: a [`Session`] keeps, per spec file, its text and
//! what lowering made of it, so a push that changes one file parses and lowers
//! one file (issue 24, item 6).
//!
//! Lowering is a function of one file alone (`lower::lower_all` appends each
//! file's objects to the set in path order, and nothing it does reads another
//! file), so the set of a new revision is the cached sets of the unchanged
//! files and the new sets of the changed ones, concatenated in path order: the
//! same [`SpecSet`] as a full lowering, element for element. The cross-file
//! phase (`check`: names, duplicates, quotas, affinities, IPAM, expansion)
//! then runs over that whole set as in [`crate::compile`], so a session's
//! [`Compilation`] is the full compile's, byte for byte (the differential test
//! `compiler/tests/it/session.rs` compares model JSON and diagnostics over
//! generated commit histories).
//!
//! A file is reused only when its path, its place in the path order (its
//! [`FileId`], which every span carries) and its text are all unchanged. The
//! text is compared whole, not by hash: a `memcmp` of the repository costs
//! less than hashing it, and no collision can hand back a stale lowering.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::diag::{self, Diagnostic};
use crate::source::{FileId, Sources};
use crate::spec::SpecSet;
use crate::{Compilation, check, lower};

pub mod place;
pub use place::{PlaceReuse, PlaceSession};

/// What one file lowered to.
#[derive(Debug)]
struct Lowered {
    file: FileId,
    text: Arc<String>,
    set: SpecSet,
    diagnostics: Vec<Diagnostic>,
}

/// A compile session: the lowering of every file of the last compile.
#[derive(Debug, Default)]
pub struct Session {
    files: BTreeMap<String, Lowered>,
}

/// What the last [`Session::compile`] reused and redid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reuse {
    /// Files whose lowering was reused.
    pub reused: usize,
    /// Files parsed and lowered anew (changed, added or moved in path order).
    pub lowered: usize,
    /// Files of the previous compile that are gone.
    pub removed: usize,
}

impl Session {
    /// A session with nothing cached: its first compile lowers every file.
    pub fn new() -> Session {
        Session::default()
    }

    /// Compiles `sources` as [`crate::compile`] does, lowering only the files
    /// that differ from the previous call's.
    pub fn compile(&mut self, sources: &Sources) -> (Compilation, Reuse) {
        let mut reuse = Reuse::default();
        let mut kept = BTreeMap::new();
        for (file, source) in sources.files() {
            let cached = self.files.remove(&source.path).filter(|c| {
                c.file == file
                    && (Arc::ptr_eq(&c.text, &source.text)
                        || c.text.as_str() == source.text.as_str())
            });
            let lowered = match cached {
                Some(c) => {
                    reuse.reused += 1;
                    c
                }
                None => {
                    reuse.lowered += 1;
                    lower_one(file, &source.text)
                }
            };
            kept.insert(source.path.clone(), lowered);
        }
        reuse.removed = self.files.len();
        self.files = kept;
        (self.check(sources), reuse)
    }

    /// The cross-file phase over the cached lowering of `sources` (which
    /// [`Session::compile`] has just brought up to date).
    fn check(&self, sources: &Sources) -> Compilation {
        let mut diagnostics = vec![];
        if sources.is_empty() {
            diagnostics.push(crate::no_specs());
        }
        let mut set = SpecSet::default();
        // `self.files` is keyed by path, which is the order of `sources`.
        for lowered in self.files.values() {
            diagnostics.extend(lowered.diagnostics.iter().cloned());
            append(&mut set, &lowered.set);
        }
        let (model, spans) = check::check(sources, &set, &mut diagnostics);
        diag::sort(sources, &mut diagnostics);
        diagnostics.dedup();
        Compilation {
            model,
            diagnostics,
            spans,
        }
    }
}

/// Parses and lowers one file into a set of its own.
fn lower_one(file: FileId, text: &Arc<String>) -> Lowered {
    let mut diagnostics = vec![];
    let set = lower::lower_file(file, text, &mut diagnostics);
    Lowered {
        file,
        text: Arc::clone(text),
        set,
        diagnostics,
    }
}

/// Appends `part`'s objects to `set`, kind by kind, as lowering one more file
/// into `set` would.
fn append(set: &mut SpecSet, part: &SpecSet) {
    let SpecSet {
        node_classes,
        sites,
        tenants,
        sla_profiles,
        images,
        vms,
        vm_groups,
        affinities,
        protection_plans,
        reconcile,
    } = part;
    set.node_classes.extend(node_classes.iter().cloned());
    set.sites.extend(sites.iter().cloned());
    set.tenants.extend(tenants.iter().cloned());
    set.sla_profiles.extend(sla_profiles.iter().cloned());
    set.images.extend(images.iter().cloned());
    set.vms.extend(vms.iter().cloned());
    set.vm_groups.extend(vm_groups.iter().cloned());
    set.affinities.extend(affinities.iter().cloned());
    set.protection_plans
        .extend(protection_plans.iter().cloned());
    set.reconcile.extend(reconcile.iter().cloned());
}
