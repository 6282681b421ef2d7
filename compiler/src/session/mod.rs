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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::diag::{self, Diagnostic};
use crate::source::{FileId, Sources};
use crate::spec::SpecSet;
use crate::{Compilation, check, lower};

pub mod place;
pub use place::{PlaceReuse, PlaceSession};

/// What one file lowered to: how many objects of each kind it added to the
/// session's set (in [`SpecSet`]'s field order), and its diagnostics.
#[derive(Debug)]
struct Lowered {
    file: FileId,
    text: Arc<String>,
    counts: [usize; KINDS],
    diagnostics: Vec<Diagnostic>,
}

/// The kinds of object a [`SpecSet`] holds.
const KINDS: usize = 10;

/// A compile session: the lowering of every file of the last compile, as one
/// [`SpecSet`] in path order (each file's objects a run of each list).
#[derive(Debug, Default)]
pub struct Session {
    files: BTreeMap<String, Lowered>,
    set: SpecSet,
    /// The last compilation, kept so that a change to VMs alone patches it
    /// (`check::patch_vms`) instead of checking the whole set again.
    last: Option<Kept>,
    /// The VMs whose entries the last compile changed when it patched
    /// (`None`: it checked the whole set).
    changed_vms: Option<BTreeSet<String>>,
}

/// The last compilation and what its check depended on beyond the set.
#[derive(Debug)]
struct Kept {
    compilation: Compilation,
    /// What its check reported, in the order the check reported it (before
    /// the sort). A patch keeps them when none can change: none is a quota's
    /// or a site's reserved room (which follow vCPUs and memory), and none
    /// points into a changed file (where the re-checked VMs are).
    checked: Vec<Diagnostic>,
    /// The non-spec files it was checked against (image files).
    other_files: BTreeSet<String>,
}

/// The objects one re-lowered file had before the push: its VMs' names and
/// its vm-groups' names and replica counts, in order.
#[derive(Debug, Default, PartialEq, Eq)]
struct Declared {
    vms: Vec<String>,
    groups: Vec<(String, Option<u32>)>,
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
    /// `Some(n)`: the last check was patched by re-checking the `n` VMs of
    /// the changed files (they changed nothing but their own vCPUs and
    /// memory); `None`: the whole set was checked.
    pub vms_rechecked: Option<usize>,
}

impl Session {
    /// A session with nothing cached: its first compile lowers every file.
    pub fn new() -> Session {
        Session::default()
    }

    /// What the last compile changed in the model's VMs: when it patched the
    /// compilation before it, the names of the VMs whose entries changed (their
    /// vCPUs or memory; every other VM, and every list but the VMs', the
    /// vm-groups' and the tenants', is as that compilation had it; the
    /// tenants' usage may have moved with the VMs), or `None` when it checked
    /// the whole set (anything may have changed). A [`PlaceSession`] that
    /// placed the compilation before takes it as a hint
    /// ([`PlaceSession::place_next_hinted`]).
    pub fn changed_vms(&self) -> Option<&BTreeSet<String>> {
        self.changed_vms.as_ref()
    }

    /// The last compilation (what the last [`Session::compile_ref`] returned),
    /// beside [`Session::changed_vms`].
    pub fn last(&self) -> Option<&Compilation> {
        self.last.as_ref().map(|k| &k.compilation)
    }

    /// Compiles `sources` as [`crate::compile`] does, lowering only the files
    /// that differ from the previous call's. A copy of what
    /// [`Session::compile_ref`] keeps.
    pub fn compile(&mut self, sources: &Sources) -> (Compilation, Reuse) {
        let (c, reuse) = self.compile_ref(sources);
        (c.clone(), reuse)
    }

    /// Compiles `sources` as [`crate::compile`] does, lowering only the files
    /// that differ from the previous call's and, when they changed VMs alone,
    /// checking only those; the compilation stays in the session.
    pub fn compile_ref(&mut self, sources: &Sources) -> (&Compilation, Reuse) {
        let mut reuse = Reuse::default();
        let mut kept = BTreeMap::new();
        let mut set = SpecSet::default();
        // The objects of the last compile are moved, never cloned, into the
        // new set: the unchanged files' runs in path order, the changed files'
        // new lowering in their place.
        let mut old_set = std::mem::take(&mut self.set);
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
        } = &mut old_set;
        let mut d0 = node_classes.drain(..);
        let mut d1 = sites.drain(..);
        let mut d2 = tenants.drain(..);
        let mut d3 = sla_profiles.drain(..);
        let mut d4 = images.drain(..);
        let mut d5 = vms.drain(..);
        let mut d6 = vm_groups.drain(..);
        let mut d7 = affinities.drain(..);
        let mut d8 = protection_plans.drain(..);
        let mut d9 = reconcile.drain(..);
        let mut take =
            |counts: &[usize; KINDS], keep: bool, set: &mut SpecSet, dropped: &mut Declared| {
                for _ in 0..counts[0] {
                    let x = d0.next().expect("the set holds every counted object");
                    if keep {
                        set.node_classes.push(x);
                    }
                }
                for _ in 0..counts[1] {
                    let x = d1.next().expect("the set holds every counted object");
                    if keep {
                        set.sites.push(x);
                    }
                }
                for _ in 0..counts[2] {
                    let x = d2.next().expect("the set holds every counted object");
                    if keep {
                        set.tenants.push(x);
                    }
                }
                for _ in 0..counts[3] {
                    let x = d3.next().expect("the set holds every counted object");
                    if keep {
                        set.sla_profiles.push(x);
                    }
                }
                for _ in 0..counts[4] {
                    let x = d4.next().expect("the set holds every counted object");
                    if keep {
                        set.images.push(x);
                    }
                }
                for _ in 0..counts[5] {
                    let x = d5.next().expect("the set holds every counted object");
                    if keep {
                        set.vms.push(x);
                    } else {
                        dropped.vms.push(x.name.value);
                    }
                }
                for _ in 0..counts[6] {
                    let x = d6.next().expect("the set holds every counted object");
                    if keep {
                        set.vm_groups.push(x);
                    } else {
                        dropped
                            .groups
                            .push((x.name.value, x.replicas.map(|r| r.value)));
                    }
                }
                for _ in 0..counts[7] {
                    let x = d7.next().expect("the set holds every counted object");
                    if keep {
                        set.affinities.push(x);
                    }
                }
                for _ in 0..counts[8] {
                    let x = d8.next().expect("the set holds every counted object");
                    if keep {
                        set.protection_plans.push(x);
                    }
                }
                for _ in 0..counts[9] {
                    let x = d9.next().expect("the set holds every counted object");
                    if keep {
                        set.reconcile.push(x);
                    }
                }
            };
        // Whether the check may be patched: every changed file is one of the
        // last compile's, in its place, declaring VMs and vm-groups only, the
        // same ones (by name, and replica count) as before. The new VMs and
        // vm-groups of the changed files, as ranges of the new set's lists.
        let mut patchable = true;
        let mut changed_vms = vec![];
        let mut changed_groups = vec![];
        let mut changed_files = BTreeSet::new();
        let vms_only = |counts: &[usize; KINDS]| {
            counts
                .iter()
                .enumerate()
                .all(|(kind, n)| *n == 0 || kind == 5 || kind == 6)
        };
        let mut scratch = Declared::default();
        let mut old = std::mem::take(&mut self.files).into_iter().peekable();
        for (file, source) in sources.files() {
            while let Some((_, gone)) = old.next_if(|(p, _)| p.as_str() < source.path.as_str()) {
                take(&gone.counts, false, &mut set, &mut scratch);
                reuse.removed += 1;
            }
            let cached = old.next_if(|(p, _)| *p == source.path).map(|(_, c)| c);
            let lowered = match cached {
                Some(c)
                    if c.file == file
                        && (Arc::ptr_eq(&c.text, &source.text)
                            || c.text.as_str() == source.text.as_str()) =>
                {
                    take(&c.counts, true, &mut set, &mut scratch);
                    reuse.reused += 1;
                    c
                }
                other => {
                    let mut before = Declared::default();
                    match other {
                        Some(c) => {
                            take(&c.counts, false, &mut set, &mut before);
                            patchable &= c.file == file && vms_only(&c.counts);
                        }
                        None => patchable = false,
                    }
                    reuse.lowered += 1;
                    let mut diagnostics = vec![];
                    let part = lower::lower_file(file, &source.text, &mut diagnostics);
                    let now = Declared {
                        vms: part.vms.iter().map(|v| v.name.value.clone()).collect(),
                        groups: part
                            .vm_groups
                            .iter()
                            .map(|g| (g.name.value.clone(), g.replicas.as_ref().map(|r| r.value)))
                            .collect(),
                    };
                    patchable &= now == before;
                    changed_files.insert(file);
                    changed_vms.push(set.vms.len()..set.vms.len() + part.vms.len());
                    changed_groups
                        .push(set.vm_groups.len()..set.vm_groups.len() + part.vm_groups.len());
                    let counts = [
                        part.node_classes.len(),
                        part.sites.len(),
                        part.tenants.len(),
                        part.sla_profiles.len(),
                        part.images.len(),
                        part.vms.len(),
                        part.vm_groups.len(),
                        part.affinities.len(),
                        part.protection_plans.len(),
                        part.reconcile.len(),
                    ];
                    set.append(part);
                    patchable &= vms_only(&counts);
                    Lowered {
                        file,
                        text: Arc::clone(&source.text),
                        counts,
                        diagnostics,
                    }
                }
            };
            kept.insert(source.path.clone(), lowered);
        }
        reuse.removed += old.count();
        patchable &= reuse.removed == 0;
        self.files = kept;
        self.set = set;
        self.changed_vms = None;
        if patchable
            && let Some((n, changed)) =
                self.patch(sources, &changed_files, &changed_vms, &changed_groups)
        {
            reuse.vms_rechecked = Some(n);
            self.changed_vms = Some(changed.into_iter().collect());
        } else {
            self.check(sources);
        }
        let kept = self.last.as_ref().expect("compiled");
        (&kept.compilation, reuse)
    }

    /// Patches the last compilation for the changed files' VMs and vm-groups
    /// (`vms` and `groups`: ranges of the set's lists, in `files`), when none
    /// of the last check's diagnostics can change but the changed files' VMs'
    /// own warnings (`check::PER_VM`, which the re-check reports again) and
    /// nothing else it read changed.
    fn patch(
        &mut self,
        sources: &Sources,
        files: &BTreeSet<FileId>,
        vms: &[std::ops::Range<usize>],
        groups: &[std::ops::Range<usize>],
    ) -> Option<(usize, Vec<String>)> {
        let kept = self.last.as_mut()?;
        let in_files = |d: &Diagnostic| d.labels.iter().any(|l| files.contains(&l.span.file));
        let unaffected = |d: &Diagnostic| {
            !matches!(
                d.code,
                "cairn::check::quota_exceeded" | "cairn::check::reserved_over_capacity"
            ) && (!in_files(d) || check::PER_VM.contains(&d.code))
        };
        if sources.is_empty()
            || kept.other_files != *sources.other_files()
            || !kept.checked.iter().all(unaffected)
        {
            return None;
        }
        let vms: Vec<_> = vms.iter().flat_map(|r| &self.set.vms[r.clone()]).collect();
        let groups: Vec<_> = groups
            .iter()
            .flat_map(|r| &self.set.vm_groups[r.clone()])
            .collect();
        let c = &mut kept.compilation;
        let (n, changed, warnings) = check::patch_vms(
            sources,
            &self.set,
            &mut c.model,
            &mut c.spans,
            &vms,
            &groups,
        )?;
        kept.checked.retain(|d| !in_files(d));
        kept.checked.extend(warnings);
        // The check reports what it reported (in the same order), after the
        // files' own diagnostics, as in `check`.
        let mut diagnostics = vec![];
        for lowered in self.files.values() {
            diagnostics.extend(lowered.diagnostics.iter().cloned());
        }
        diagnostics.extend(kept.checked.iter().cloned());
        diag::sort(sources, &mut diagnostics);
        diagnostics.dedup();
        c.diagnostics = diagnostics;
        Some((n, changed))
    }

    /// The cross-file phase over the cached lowering of `sources` (which
    /// [`Session::compile`] has just brought up to date), kept as the last
    /// compilation.
    fn check(&mut self, sources: &Sources) {
        let mut diagnostics = vec![];
        if sources.is_empty() {
            diagnostics.push(crate::no_specs());
        }
        // `self.files` is keyed by path, which is the order of `sources`.
        for lowered in self.files.values() {
            diagnostics.extend(lowered.diagnostics.iter().cloned());
        }
        let lowering = diagnostics.len();
        let (model, spans) = check::check(sources, &self.set, &mut diagnostics);
        let checked = diagnostics[lowering..].to_vec();
        diag::sort(sources, &mut diagnostics);
        diagnostics.dedup();
        self.last = Some(Kept {
            compilation: Compilation {
                model,
                diagnostics,
                spans,
            },
            checked,
            other_files: sources.other_files().clone(),
        });
    }
}
