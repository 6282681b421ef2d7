//! Incremental placement: a [`PlaceSession`] places each site on its own and
//! keeps, per site, the model of that site alone and the result of its last
//! placement, and the whole last result; a push that changes one site's VMs
//! places that site again and reuses the others (issue 24, item 6).
//!
//! Placement is a function of each site's own inputs: a VM goes to a node of
//! its site, volumes to a pool of its site, `ha-reserve` admission and packing
//! are per site, and a network's addresses and nodes come from the VMs of its
//! site. A site's inputs are its [`Site`](crate::model::Site), its VMs, its
//! tenants' networks at the site, its vm-groups, every affinity rule with its
//! members at the site, and the part of the previous placement that is about
//! it (its VMs, unplaced VMs, volumes, nodes, moves, networks and addresses).
//!
//! The usual push places from the session's last result
//! ([`PlaceSession::place_next`], or [`PlaceSession::place`] with that result
//! as the previous placement). A site is then reused when its model alone is
//! the one it was last placed with and that placement was *settled*: its
//! result was the previous placement it was placed from, so placing it again
//! from its result gives its result. Any other site is placed again with
//! [`place::place`] on its model alone from its part of the last result, and
//! that part of the kept whole result is patched in place (entries replaced,
//! removed or inserted by key; no list is rebuilt or re-sorted). So a push
//! costs the changed sites' placements plus one comparison of the model's
//! VMs, networks, affinity rules and vm-groups with the memos', not a pass
//! that copies the cloud. A site changed at one push is usually placed once
//! more at the next (its result then is not yet settled).
//!
//! From any other previous placement the session splits it by site and
//! reuses a site whose part is its settled result and whose model alone is
//! unchanged; the result is merged anew.
//!
//! What crosses sites is refused, not approximated: on any of the cases below
//! the session places the whole model with [`place::place`] and says why in
//! [`PlaceReuse::full`]. No previous placement (the first placement; VNIs are
//! chosen against every network); failed nodes, racks or sites; DR copies,
//! failovers or a protection plan that replicates to another site; an
//! affinity rule of scope `site`, or a hard `together`/`apart` rule; a rack
//! name two sites share (affinity scores count by rack name); a VM of a site
//! the model does not have, that changed sites, or with a NIC on another
//! site's network; a network without a previous VNI, or one gone or moved; a
//! previous placement naming a site, network or VM's site the model does not
//! have.
//!
//! The differential test `compiler/tests/it/session.rs` compares the session
//! with [`place::place`] of the whole model over generated histories of
//! commits.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::model::{Affinity, AffinityKind, Domain, Model, Network, Tenant, Vm, VmGroup};
use crate::place::{self, FailureSet, PlaceOptions, Placement};

/// A placement session: each site's last inputs and result, and the whole
/// last result.
#[derive(Debug, Default)]
pub struct PlaceSession {
    sites: BTreeMap<String, SiteMemo>,
    /// The last result: the sites' parts merged (or the whole placement's).
    last: Option<Placement>,
    /// The whole-model inputs the memos were made with.
    shared: Option<Shared>,
    /// How the last call made its result from the one before: the sites it
    /// placed again, each with its part before (`None`: it merged the sites'
    /// parts anew or placed the whole model).
    patches: Option<Vec<SitePatch>>,
    /// Calls so far ([`PlaceSession::calls`]).
    calls: u64,
}

/// A site the last [`PlaceSession::place_next_hinted`] placed again: its
/// part of the result before, and where its nodes are in the whole.
#[derive(Debug)]
struct SitePatch {
    site: String,
    offset: usize,
    before: Placement,
}

/// One site's last placement: the model of the site alone and the result,
/// and whether the result is the previous placement it was placed with
/// (`settled`: placing the site again from its result gives the result).
#[derive(Debug)]
struct SiteMemo {
    model: Model,
    placed: Placement,
    settled: bool,
}

/// What every site's model alone is cut from, beyond its own VMs: kept to
/// tell, in one comparison, that no site's share of them changed.
#[derive(Debug, PartialEq)]
struct Shared {
    format_version: u32,
    sites: Vec<String>,
    /// Each tenant's name and networks.
    networks: Vec<(String, Vec<Network>)>,
    affinities: Vec<Affinity>,
    vm_groups: Vec<VmGroup>,
}

impl Shared {
    fn of(model: &Model) -> Shared {
        Shared {
            format_version: model.format_version,
            sites: model.sites.iter().map(|s| s.name.clone()).collect(),
            networks: model
                .tenants
                .iter()
                .map(|t| (t.name.clone(), t.networks.clone()))
                .collect(),
            affinities: model.affinities.clone(),
            vm_groups: model.vm_groups.clone(),
        }
    }

    /// Whether `model`'s shared inputs are these (without copying them).
    fn same(&self, model: &Model) -> bool {
        self.format_version == model.format_version
            && self.sites.iter().eq(model.sites.iter().map(|s| &s.name))
            && self.networks.len() == model.tenants.len()
            && self
                .networks
                .iter()
                .zip(&model.tenants)
                .all(|((name, nets), t)| *name == t.name && *nets == t.networks)
            && self.affinities == model.affinities
            && self.vm_groups == model.vm_groups
    }
}

/// What the last [`PlaceSession::place`] reused and redid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaceReuse {
    /// Sites whose last result was reused.
    pub sites_reused: usize,
    /// Sites placed again.
    pub sites_placed: usize,
    /// Why the whole model was placed at once instead (`None`: site by site).
    pub full: Option<String>,
}

impl PlaceSession {
    /// A session with nothing kept: its first placement places every site.
    pub fn new() -> PlaceSession {
        PlaceSession::default()
    }

    /// Places `model` as [`place::place`]`(model, options, None)` does,
    /// placing again only the sites whose inputs changed since the last call.
    /// A copy of what [`PlaceSession::place_ref`] keeps.
    pub fn place(&mut self, model: &Model, options: &PlaceOptions) -> (Placement, PlaceReuse) {
        let (p, reuse) = self.place_ref(model, options);
        (p.clone(), reuse)
    }

    /// Places `model` as [`place::place`]`(model, options, None)` does; the
    /// placement stays in the session. When `options.previous` is the
    /// session's last result (compared whole), this is
    /// [`PlaceSession::place_next`].
    pub fn place_ref(&mut self, model: &Model, options: &PlaceOptions) -> (&Placement, PlaceReuse) {
        self.place_ref_hinted(model, options, None)
    }

    /// [`PlaceSession::place_ref`] told what may have changed since the last
    /// call's model (see [`PlaceSession::place_next_hinted`]; the hint is used
    /// only when `options.previous` is the last result).
    pub fn place_ref_hinted(
        &mut self,
        model: &Model,
        options: &PlaceOptions,
        changed: Option<&BTreeSet<String>>,
    ) -> (&Placement, PlaceReuse) {
        self.calls += 1;
        let Some(previous) = options.previous.as_ref() else {
            return self.full(model, options, "no previous placement".to_owned());
        };
        if options.failed.is_empty() && self.follows(previous) {
            return self.next(model, changed);
        }
        self.by_sites(model, options)
    }

    /// Whether `previous` is this session's last result, each site memoized.
    fn follows(&self, previous: &Placement) -> bool {
        !self.sites.is_empty() && self.last.as_ref() == Some(previous)
    }

    /// [`PlaceSession::place_ref_hinted`] from `previous` with no failed
    /// nodes, without copying `previous` when it is the last result (at
    /// 100,000 VMs a copy is tens of milliseconds of a push's).
    pub fn place_after(
        &mut self,
        model: &Model,
        previous: &Placement,
        changed: Option<&BTreeSet<String>>,
    ) -> (&Placement, PlaceReuse) {
        if self.follows(previous) {
            self.calls += 1;
            return self.next(model, changed);
        }
        let options = PlaceOptions {
            previous: Some(previous.clone()),
            failed: FailureSet::default(),
        };
        self.place_ref_hinted(model, &options, changed)
    }

    /// The last result (what the last call returned).
    pub fn last(&self) -> Option<&Placement> {
        self.last.as_ref()
    }

    /// How many placements this session made: a caller that keeps a copy of
    /// a result and patches it with [`PlaceSession::patch_copy`] checks that
    /// its copy is of the call before the last.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Places `model` with the session's last result as the previous
    /// placement, as [`place::place`]`(model, {previous: last}, None)` does,
    /// without comparing a previous placement: what a controller whose stored
    /// placement is the session's last result calls. With no last result it
    /// is the first placement.
    pub fn place_next(&mut self, model: &Model) -> (&Placement, PlaceReuse) {
        self.place_next_hinted(model, None)
    }

    /// [`PlaceSession::place_next`] told what may have changed: every VM
    /// `changed` does not name, and every site, is as the model of this
    /// session's last placement had it (a compile [`Session`](super::Session)
    /// says so with [`Session::changed_vms`](super::Session::changed_vms) when
    /// each of its compiles is placed). A site none of them is in is then
    /// compared by its VM count and its share of the shared inputs alone, not
    /// VM by VM and node by node. The model's VMs are sorted by name, as a
    /// compile gives them. `None` is [`PlaceSession::place_next`]. Debug
    /// builds compare every site and VM anyway and panic on a wrong hint.
    pub fn place_next_hinted(
        &mut self,
        model: &Model,
        changed: Option<&BTreeSet<String>>,
    ) -> (&Placement, PlaceReuse) {
        self.calls += 1;
        match &self.last {
            None => self.full(
                model,
                &PlaceOptions::default(),
                "no previous placement".to_owned(),
            ),
            Some(last) if self.sites.is_empty() => {
                let options = PlaceOptions {
                    previous: Some(last.clone()),
                    failed: FailureSet::default(),
                };
                self.by_sites(model, &options)
            }
            Some(_) => self.next(model, changed),
        }
    }

    /// The sites the last call placed again, each with its part of the
    /// result before and after, when it patched the result before it site by
    /// site; `None` when it merged the sites' parts anew or placed the whole
    /// model (anything may have changed). An empty list: nothing changed.
    pub fn last_patches(&self) -> Option<Vec<(&str, &Placement, &Placement)>> {
        self.patches.as_ref().map(|patches| {
            patches
                .iter()
                .map(|p| (p.site.as_str(), &p.before, &self.sites[&p.site].placed))
                .collect()
        })
    }

    /// Makes `whole`, a copy of the result before the last call's, that
    /// call's result, as the call patched its own (entries replaced, removed
    /// or inserted by key); false, changing nothing, when the last call did
    /// not patch (see [`PlaceSession::last_patches`]).
    pub fn patch_copy(&self, whole: &mut Placement) -> bool {
        let Some(patches) = &self.patches else {
            return false;
        };
        for p in patches {
            patch_site(whole, &p.before, &self.sites[&p.site].placed, p.offset);
        }
        true
    }

    fn full(
        &mut self,
        model: &Model,
        options: &PlaceOptions,
        why: String,
    ) -> (&Placement, PlaceReuse) {
        self.patches = None;
        self.sites.clear();
        self.shared = None;
        self.last = Some(place::place(model, options, None));
        (
            self.last.as_ref().expect("placed"),
            PlaceReuse {
                full: Some(why),
                ..PlaceReuse::default()
            },
        )
    }

    /// The whole model placed with the last result as the previous placement.
    fn full_from_last(&mut self, model: &Model, why: String) -> (&Placement, PlaceReuse) {
        let options = PlaceOptions {
            previous: self.last.take(),
            failed: FailureSet::default(),
        };
        self.full(model, &options, why)
    }

    /// Site by site from the session's last result (`self.last`, with every
    /// site memoized): a site whose model alone is unchanged and whose
    /// result was settled is reused; the others are placed from their part
    /// of the last result, which is then patched with their new part.
    fn next(
        &mut self,
        model: &Model,
        changed: Option<&BTreeSet<String>>,
    ) -> (&Placement, PlaceReuse) {
        let last = self.last.as_ref().expect("a last result");
        if let Some(why) = crosses_sites(model, &FailureSet::default()) {
            return self.full_from_last(model, why);
        }
        if !(last.dr_volumes.is_empty() && last.dr_unplaced.is_empty() && last.failovers.is_empty())
        {
            return self.full_from_last(
                model,
                "the previous placement has DR copies or failovers".to_owned(),
            );
        }
        let shared_same = self.shared.as_ref().is_some_and(|s| s.same(model));
        let same_sites = model.sites.len() == self.sites.len()
            && model.sites.iter().all(|s| self.sites.contains_key(&s.name));
        if !same_sites {
            let options = PlaceOptions {
                previous: self.last.clone(),
                failed: FailureSet::default(),
            };
            return self.by_sites(model, &options);
        }
        if !shared_same && let Err(why) = networks_kept(model, last) {
            return self.full_from_last(model, why);
        }
        // The VMs of each site (model order), in one pass.
        let index: BTreeMap<&str, usize> = model
            .sites
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut grouped: Vec<Vec<&Arc<Vm>>> = vec![vec![]; model.sites.len()];
        for v in &model.vms {
            match index.get(v.site.as_str()) {
                Some(&i) => grouped[i].push(v),
                None => {
                    return self.full_from_last(
                        model,
                        format!(
                            "vm `{}` is in site `{}`, which the model does not have",
                            v.name, v.site
                        ),
                    );
                }
            }
        }
        // Each site's share of the shared inputs, when they changed.
        let inputs = (!shared_same).then(|| site_inputs(model));
        let mut network_site: Option<BTreeMap<(&str, &str), &str>> = None;
        let mut reuse = PlaceReuse::default();
        let mut placed_sites: Vec<(usize, Placement, SiteMemo)> = vec![];
        // The sites a VM the hint names is in, now or at the last placement.
        let hinted: Option<BTreeSet<&str>> = changed.map(|names| {
            let mut sites = BTreeSet::new();
            for name in names {
                // The model's VMs are sorted by name, as a compile gives them.
                if let Ok(i) = model.vms.binary_search_by(|v| v.name.as_str().cmp(name)) {
                    sites.insert(model.vms[i].site.as_str());
                }
                sites.extend(site_in(last, name));
            }
            sites
        });
        // Which sites are as their memos have them: every VM compared (on
        // two threads, half the sites each, when there are many VMs), or,
        // with a hint, only the VMs of the sites it names.
        let same_as_memo = |i: usize, trust_hint: bool| {
            let site = &model.sites[i];
            let memo = &self.sites[&site.name];
            let vms = &grouped[i];
            // A site the hint does not name has its VMs and is the site it
            // was.
            let as_hinted = match &hinted {
                Some(hinted) => trust_hint && !hinted.contains(site.name.as_str()),
                None => false,
            };
            memo.settled
                && memo.model.vms.len() == vms.len()
                && (as_hinted
                    || (memo.model.sites[0] == *site
                        && same_vms(memo.model.vms.iter(), vms.iter().copied())))
                && inputs
                    .as_ref()
                    .is_none_or(|inputs| inputs[i].is(&memo.model))
        };
        if cfg!(debug_assertions) && hinted.is_some() {
            for i in 0..model.sites.len() {
                assert_eq!(
                    same_as_memo(i, true),
                    same_as_memo(i, false),
                    "PlaceSession::place_next_hinted: site `{}` has a changed VM the hint does not name",
                    model.sites[i].name
                );
            }
        }
        let same_as_memo = |i: usize| same_as_memo(i, true);
        let same: Vec<bool> = if hinted.is_some() {
            (0..model.sites.len()).map(same_as_memo).collect()
        } else if crate::threads::second() && model.vms.len() >= COMPARE_ON_TWO_THREADS_FROM {
            let half = model.sites.len() / 2;
            std::thread::scope(|scope| {
                let later = scope.spawn(|| {
                    (half..model.sites.len())
                        .map(same_as_memo)
                        .collect::<Vec<_>>()
                });
                let mut same: Vec<bool> = (0..half).map(same_as_memo).collect();
                same.extend(crate::threads::join(later));
                same
            })
        } else {
            (0..model.sites.len()).map(same_as_memo).collect()
        };
        for (i, site) in model.sites.iter().enumerate() {
            let vms = &grouped[i];
            if same[i] {
                reuse.sites_reused += 1;
                continue;
            }
            // What would cross sites: a NIC on another site's network, a VM
            // that was in another site.
            let network_site = network_site.get_or_insert_with(|| network_sites(model));
            for v in vms {
                if let Err(why) = own_networks(v, network_site) {
                    return self.full_from_last(model, why);
                }
                if let Some(before) = site_in(last, &v.name)
                    && before != v.site
                {
                    return self.full_from_last(model, format!("vm `{}` changed sites", v.name));
                }
            }
            reuse.sites_placed += 1;
            // The site's model alone: the memo's, its VMs brought up to date
            // (only those that differ are copied).
            let SiteMemo {
                model: mut alone,
                placed: before,
                ..
            } = self
                .sites
                .remove(&site.name)
                .expect("every site has a memo");
            alone.format_version = model.format_version;
            if alone.sites[0] != *site {
                alone.sites[0] = site.clone();
            }
            if let Some(inputs) = &inputs {
                alone.tenants = inputs[i].tenants.clone();
                alone.affinities = inputs[i].affinities.clone();
                alone.vm_groups = inputs[i].vm_groups.clone();
            }
            if alone.vms.len() == vms.len() {
                for (slot, v) in alone.vms.iter_mut().zip(vms) {
                    if !Arc::ptr_eq(slot, v) {
                        slot.clone_from(v);
                    }
                }
            } else {
                alone.vms = vms.iter().map(|v| Arc::clone(v)).collect();
            }
            let options = PlaceOptions {
                previous: Some(before),
                failed: FailureSet::default(),
            };
            let placed = place::place(&alone, &options, None);
            let before = options.previous.expect("given above");
            let settled = placed == before;
            placed_sites.push((
                i,
                before,
                SiteMemo {
                    model: alone,
                    placed,
                    settled,
                },
            ));
        }
        let mut last = self.last.take().expect("a last result");
        let mut patches = vec![];
        for (i, before, memo) in placed_sites {
            let site = &model.sites[i];
            // The site's nodes are the run after the earlier sites' nodes (a
            // re-placed site's node count is its model's, before and after).
            let offset: usize = model.sites[..i].iter().map(|s| s.nodes.len()).sum();
            patch_site(&mut last, &before, &memo.placed, offset);
            self.sites.insert(site.name.clone(), memo);
            patches.push(SitePatch {
                site: site.name.clone(),
                offset,
                before,
            });
        }
        self.patches = Some(patches);
        self.last = Some(last);
        if !shared_same {
            self.shared = Some(Shared::of(model));
        }
        (self.last.as_ref().expect("kept"), reuse)
    }

    /// Site by site from any previous placement: each site's part of it is
    /// compared with the memo's, the whole result merged anew.
    fn by_sites(&mut self, model: &Model, options: &PlaceOptions) -> (&Placement, PlaceReuse) {
        let previous = options.previous.as_ref().expect("a previous placement");
        let owners = match Owners::of(model, previous) {
            Ok(o) => o,
            Err(why) => return self.full(model, options, why),
        };
        if let Some(why) = crosses_sites(model, &options.failed) {
            return self.full(model, options, why);
        }
        self.patches = None;
        let mut reuse = PlaceReuse::default();
        let mut parts = vec![];
        let mut memos = BTreeMap::new();
        let mut split = owners.split(previous);
        let inputs = site_inputs(model);
        for (i, site) in model.sites.iter().enumerate() {
            let part = split.remove(&site.name).unwrap_or_else(|| Placement {
                format_version: previous.format_version,
                ..Placement::default()
            });
            let vms = site_vms(model, &site.name);
            let memo = match self.sites.remove(&site.name) {
                Some(m)
                    if m.settled
                        && m.placed == part
                        && m.model.sites[0] == *site
                        && same_vms(m.model.vms.iter(), site_vms(model, &site.name))
                        && inputs[i].is(&m.model) =>
                {
                    reuse.sites_reused += 1;
                    m
                }
                _ => {
                    reuse.sites_placed += 1;
                    let input = &inputs[i];
                    let alone = Model {
                        format_version: model.format_version,
                        node_classes: vec![],
                        sites: vec![site.clone()],
                        tenants: input.tenants.clone(),
                        sla_profiles: vec![],
                        images: vec![],
                        vms: vms.cloned().collect(),
                        vm_groups: input.vm_groups.clone(),
                        affinities: input.affinities.clone(),
                        protection_plans: vec![],
                        reconcile: None,
                    };
                    let options = PlaceOptions {
                        previous: Some(part),
                        failed: FailureSet::default(),
                    };
                    let placed = place::place(&alone, &options, None);
                    let settled = options.previous.as_ref() == Some(&placed);
                    SiteMemo {
                        model: alone,
                        placed,
                        settled,
                    }
                }
            };
            parts.push(memo.placed.clone());
            memos.insert(site.name.clone(), memo);
        }
        self.sites = memos;
        self.shared = Some(Shared::of(model));
        self.last = Some(merge(previous, parts));
        (self.last.as_ref().expect("merged"), reuse)
    }
}

/// The site of a VM in a placement (placed or unplaced), if it has it.
fn site_in<'p>(placement: &'p Placement, vm: &str) -> Option<&'p str> {
    if let Ok(i) = placement.vms.binary_search_by(|v| v.name.as_str().cmp(vm)) {
        return Some(&placement.vms[i].site);
    }
    placement
        .unplaced
        .binary_search_by(|v| v.name.as_str().cmp(vm))
        .ok()
        .map(|i| placement.unplaced[i].site.as_str())
}

/// The site of every tenant network.
fn network_sites(model: &Model) -> BTreeMap<(&str, &str), &str> {
    let mut out = BTreeMap::new();
    for t in &model.tenants {
        for n in &t.networks {
            out.insert((t.name.as_str(), n.name.as_str()), n.site.as_str());
        }
    }
    out
}

/// Whether every NIC of `vm` is on a network of its own site.
fn own_networks(vm: &Vm, network_site: &BTreeMap<(&str, &str), &str>) -> Result<(), String> {
    for nic in &vm.nics {
        if network_site.get(&(vm.tenant.as_str(), nic.network.as_str())) != Some(&vm.site.as_str())
        {
            return Err(format!(
                "vm `{}` has a NIC on network `{}` of another site",
                vm.name, nic.network
            ));
        }
    }
    Ok(())
}

/// Whether every network of the model has its VNI in `last`, at the same
/// site, and every network of `last` is still the model's, at the same site.
fn networks_kept(model: &Model, last: &Placement) -> Result<(), String> {
    let before: BTreeMap<(&str, &str), &str> = last
        .networks
        .iter()
        .map(|n| ((n.tenant.as_str(), n.name.as_str()), n.site.as_str()))
        .collect();
    let now = network_sites(model);
    for ((tenant, name), site) in &now {
        match before.get(&(*tenant, *name)) {
            None => {
                return Err(format!(
                    "network `{tenant}/{name}` is new (its VNI is chosen against every network)"
                ));
            }
            Some(s) if s != site => {
                return Err(format!("network `{tenant}/{name}` moved sites"));
            }
            Some(_) => {}
        }
    }
    if let Some((tenant, name)) = before.keys().find(|k| !now.contains_key(*k)) {
        return Err(format!("network `{tenant}/{name}` is gone"));
    }
    Ok(())
}

/// One site's share of the model's tenants, affinity rules and vm-groups,
/// as its model alone holds them.
struct SiteInputs {
    tenants: Vec<Tenant>,
    affinities: Vec<Affinity>,
    vm_groups: Vec<VmGroup>,
}

impl SiteInputs {
    /// Whether `alone` was cut with these.
    fn is(&self, alone: &Model) -> bool {
        alone.tenants == self.tenants
            && alone.affinities == self.affinities
            && alone.vm_groups == self.vm_groups
    }
}

/// Every site's share, in model site order: the tenants with that site's
/// networks; every affinity rule with its members at that site (a rule
/// counts members per node or rack, and no rack is in two sites here); the
/// site's vm-groups.
fn site_inputs(model: &Model) -> Vec<SiteInputs> {
    let index: BTreeMap<&str, usize> = model
        .sites
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let vm_site: crate::place::fasthash::FxHashMap<&str, usize> = model
        .vms
        .iter()
        .filter_map(|v| index.get(v.site.as_str()).map(|&i| (v.name.as_str(), i)))
        .collect();
    model
        .sites
        .iter()
        .enumerate()
        .map(|(i, site)| SiteInputs {
            tenants: site_tenants(model, &site.name),
            affinities: model
                .affinities
                .iter()
                .map(|a| Affinity {
                    name: a.name.clone(),
                    kind: a.kind,
                    scope: a.scope,
                    hard: a.hard,
                    weight: a.weight,
                    select: a.select.clone(),
                    nodes: a.nodes.clone(),
                    vms: a
                        .vms
                        .iter()
                        .filter(|v| vm_site.get(v.as_str()) == Some(&i))
                        .cloned()
                        .collect(),
                })
                .collect(),
            vm_groups: model
                .vm_groups
                .iter()
                .filter(|g| g.site == site.name)
                .cloned()
                .collect(),
        })
        .collect()
}

/// Why the model cannot be placed site by site (`None`: it can).
fn crosses_sites(model: &Model, failed: &FailureSet) -> Option<String> {
    if !(failed.nodes.is_empty() && failed.racks.is_empty() && failed.sites.is_empty()) {
        return Some("nodes, racks or sites are failed".to_owned());
    }
    if let Some(p) = model
        .protection_plans
        .iter()
        .find(|p| !p.replicate.is_empty())
    {
        return Some(format!(
            "protection plan `{}` replicates to another site",
            p.name
        ));
    }
    for a in &model.affinities {
        if a.scope == Domain::Site {
            return Some(format!("affinity `{}` has scope site", a.name));
        }
        if a.hard && a.kind != AffinityKind::Node {
            return Some(format!(
                "affinity `{}` is a hard {} rule",
                a.name,
                a.kind.as_str()
            ));
        }
    }
    let mut racks = BTreeSet::new();
    for site in &model.sites {
        for rack in &site.racks {
            if !racks.insert(rack.name.as_str()) {
                return Some(format!("rack name `{}` is used in two sites", rack.name));
            }
        }
    }
    None
}

/// Which site each VM, network and node of the model and of the previous
/// placement belongs to.
struct Owners<'a> {
    vm: BTreeMap<&'a str, &'a str>,
    network: BTreeMap<(&'a str, &'a str), &'a str>,
}

impl<'a> Owners<'a> {
    fn of(model: &'a Model, previous: &'a Placement) -> Result<Owners<'a>, String> {
        if !(previous.dr_volumes.is_empty()
            && previous.dr_unplaced.is_empty()
            && previous.failovers.is_empty())
        {
            return Err("the previous placement has DR copies or failovers".to_owned());
        }
        let sites: BTreeSet<&str> = model.sites.iter().map(|s| s.name.as_str()).collect();
        let mut network = BTreeMap::new();
        for t in &model.tenants {
            for n in &t.networks {
                network.insert((t.name.as_str(), n.name.as_str()), n.site.as_str());
            }
        }
        let mut vm = BTreeMap::new();
        for v in &model.vms {
            if !sites.contains(v.site.as_str()) {
                return Err(format!(
                    "vm `{}` is in site `{}`, which the model does not have",
                    v.name, v.site
                ));
            }
            for nic in &v.nics {
                if network.get(&(v.tenant.as_str(), nic.network.as_str())) != Some(&v.site.as_str())
                {
                    return Err(format!(
                        "vm `{}` has a NIC on network `{}` of another site",
                        v.name, nic.network
                    ));
                }
            }
            vm.insert(v.name.as_str(), v.site.as_str());
        }
        let old = previous
            .vms
            .iter()
            .map(|v| (v.name.as_str(), v.site.as_str()))
            .chain(
                previous
                    .unplaced
                    .iter()
                    .map(|u| (u.name.as_str(), u.site.as_str())),
            );
        for (name, site) in old {
            if !sites.contains(site) {
                return Err(format!(
                    "the previous placement has vm `{name}` in site `{site}`, which is gone"
                ));
            }
            if vm.get(name).is_some_and(|s| *s != site) {
                return Err(format!("vm `{name}` changed sites"));
            }
            vm.entry(name).or_insert(site);
        }
        let owners = Owners { vm, network };
        for v in &previous.volumes {
            if !owners.vm.contains_key(v.vm.as_str()) {
                return Err(format!(
                    "the previous placement has volume `{}` of an unknown VM",
                    v.name
                ));
            }
        }
        for m in &previous.moves {
            if !owners.vm.contains_key(m.vm.as_str()) {
                return Err(format!(
                    "the previous placement moves unknown vm `{}`",
                    m.vm
                ));
            }
        }
        for n in &previous.nodes {
            if !sites.contains(n.site.as_str()) {
                return Err(format!(
                    "the previous placement has node `{}` of a gone site",
                    n.name
                ));
            }
        }
        for a in &previous.addresses {
            if !owners
                .network
                .contains_key(&(a.tenant.as_str(), a.network.as_str()))
            {
                return Err(format!(
                    "the previous placement has an address on gone network `{}/{}`",
                    a.tenant, a.network
                ));
            }
        }
        let with_vni: BTreeSet<(&str, &str)> = previous
            .networks
            .iter()
            .map(|n| (n.tenant.as_str(), n.name.as_str()))
            .collect();
        for (tenant, name) in owners.network.keys() {
            if !with_vni.contains(&(*tenant, *name)) {
                return Err(format!(
                    "network `{tenant}/{name}` is new (its VNI is chosen against every network)"
                ));
            }
        }
        for n in &previous.networks {
            if owners.network.get(&(n.tenant.as_str(), n.name.as_str())) != Some(&n.site.as_str()) {
                return Err(format!(
                    "the previous placement has network `{}/{}`, which is gone or moved",
                    n.tenant, n.name
                ));
            }
        }
        Ok(owners)
    }

    fn site_of_vm(&self, vm: &str) -> &str {
        self.vm.get(vm).copied().unwrap_or_default()
    }

    /// The parts of `previous` about each site, in the same orders, in one
    /// pass over it (a site absent here has an empty part).
    fn split(&self, previous: &Placement) -> BTreeMap<String, Placement> {
        let mut parts: BTreeMap<String, Placement> = BTreeMap::new();
        let fv = previous.format_version;
        for v in &previous.vms {
            part_of(&mut parts, &v.site, fv).vms.push(v.clone());
        }
        for u in &previous.unplaced {
            part_of(&mut parts, &u.site, fv).unplaced.push(u.clone());
        }
        for v in &previous.volumes {
            part_of(&mut parts, self.site_of_vm(&v.vm), fv)
                .volumes
                .push(v.clone());
        }
        for n in &previous.nodes {
            part_of(&mut parts, &n.site, fv).nodes.push(n.clone());
        }
        for m in &previous.moves {
            part_of(&mut parts, self.site_of_vm(&m.vm), fv)
                .moves
                .push(m.clone());
        }
        for n in &previous.networks {
            part_of(&mut parts, &n.site, fv).networks.push(n.clone());
        }
        for a in &previous.addresses {
            let site = self
                .network
                .get(&(a.tenant.as_str(), a.network.as_str()))
                .copied()
                .unwrap_or_default();
            part_of(&mut parts, site, fv).addresses.push(a.clone());
        }
        parts
    }
}

/// The part of `site` in `parts`, made empty if it is not there yet.
fn part_of<'p>(
    parts: &'p mut BTreeMap<String, Placement>,
    site: &str,
    format_version: u32,
) -> &'p mut Placement {
    if !parts.contains_key(site) {
        parts.insert(
            site.to_owned(),
            Placement {
                format_version,
                ..Placement::default()
            },
        );
    }
    parts.get_mut(site).expect("inserted above")
}

/// The tenants as placement sees them at one site: names and that site's
/// networks (placement reads nothing else of a tenant; quotas and usage are
/// the compile's).
fn site_tenants(model: &Model, site: &str) -> Vec<Tenant> {
    model
        .tenants
        .iter()
        .map(|t| Tenant {
            name: t.name.clone(),
            quota: None,
            usage: Default::default(),
            members: vec![],
            budget: None,
            networks: t
                .networks
                .iter()
                .filter(|n| n.site == site)
                .cloned()
                .collect(),
            security_groups: vec![],
        })
        .collect()
}

/// Whether two runs of VMs are equal, element for element; a VM shared by
/// both (the compile session patches only the VMs that changed) is equal
/// without a comparison of its fields.
fn same_vms<'a>(
    a: impl Iterator<Item = &'a Arc<Vm>>,
    b: impl Iterator<Item = &'a Arc<Vm>>,
) -> bool {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if Arc::ptr_eq(x, y) || x == y => {}
            _ => return false,
        }
    }
}

fn site_vms<'m>(model: &'m Model, site: &'m str) -> impl Iterator<Item = &'m Arc<Vm>> + 'm {
    model.vms.iter().filter(move |v| v.site == site)
}

/// From how many VMs [`PlaceSession`] compares the sites with their memos on
/// two threads (the commit histories of `compiler/tests/it/session.rs`, 900
/// VMs on two sites, go through it).
const COMPARE_ON_TWO_THREADS_FROM: usize = 500;

/// The sites' placements as one, in the orders [`place::place`] gives.
fn merge(previous: &Placement, parts: Vec<Placement>) -> Placement {
    let mut out = Placement {
        format_version: place::FORMAT_VERSION,
        failovers: previous.failovers.clone(),
        ..Placement::default()
    };
    for p in parts {
        out.vms.extend(p.vms);
        out.unplaced.extend(p.unplaced);
        out.volumes.extend(p.volumes);
        out.nodes.extend(p.nodes);
        out.moves.extend(p.moves);
        out.networks.extend(p.networks);
        out.addresses.extend(p.addresses);
    }
    out.vms.sort_by(|a, b| a.name.cmp(&b.name));
    out.unplaced.sort_by(|a, b| a.name.cmp(&b.name));
    out.moves.sort_by(|a, b| a.vm.cmp(&b.vm));
    out.networks
        .sort_by(|a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)));
    out.addresses
        .sort_by(|a, b| (&a.vm, a.nic).cmp(&(&b.vm, b.nic)));
    out.volumes.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Replaces, in `whole` (the sites' parts merged), one site's part `before`
/// with `after`: every list but `nodes` is sorted by its key, so entries are
/// replaced, removed and inserted by binary search (a long run of inserts or
/// removes rebuilds the list once); the site's `nodes` are the run at
/// `offset`.
fn patch_site(whole: &mut Placement, before: &Placement, after: &Placement, offset: usize) {
    patch(&mut whole.vms, &before.vms, &after.vms, |a, b| {
        a.name.cmp(&b.name)
    });
    patch(
        &mut whole.unplaced,
        &before.unplaced,
        &after.unplaced,
        |a, b| a.name.cmp(&b.name),
    );
    patch(
        &mut whole.volumes,
        &before.volumes,
        &after.volumes,
        |a, b| a.name.cmp(&b.name),
    );
    patch(&mut whole.moves, &before.moves, &after.moves, |a, b| {
        a.vm.cmp(&b.vm)
    });
    patch(
        &mut whole.networks,
        &before.networks,
        &after.networks,
        |a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)),
    );
    patch(
        &mut whole.addresses,
        &before.addresses,
        &after.addresses,
        |a, b| (&a.vm, a.nic).cmp(&(&b.vm, b.nic)),
    );
    let end = offset + before.nodes.len();
    if before.nodes.len() == after.nodes.len() {
        for (slot, node) in whole.nodes[offset..end].iter_mut().zip(&after.nodes) {
            if slot != node {
                slot.clone_from(node);
            }
        }
    } else {
        whole.nodes.splice(offset..end, after.nodes.iter().cloned());
    }
}

/// Replaces `before`'s entries of the sorted `list` with `after`'s (`cmp`
/// orders all three by their key, no key twice).
fn patch<T, F>(list: &mut Vec<T>, before: &[T], after: &[T], cmp: F)
where
    T: Clone + PartialEq,
    F: Fn(&T, &T) -> Ordering,
{
    let mut old: Vec<&T> = before.iter().collect();
    old.sort_by(|a, b| cmp(a, b));
    let mut new: Vec<&T> = after.iter().collect();
    new.sort_by(|a, b| cmp(a, b));
    let (mut removed, mut inserted) = (vec![], vec![]);
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => cmp(a, b),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                removed.push(old[i]);
                i += 1;
            }
            Ordering::Greater => {
                inserted.push(new[j]);
                j += 1;
            }
            Ordering::Equal => {
                if old[i] != new[j]
                    && let Ok(at) = list.binary_search_by(|x| cmp(x, new[j]))
                {
                    list[at].clone_from(new[j]);
                }
                i += 1;
                j += 1;
            }
        }
    }
    if removed.len() + inserted.len() <= 64 {
        for r in removed {
            if let Ok(at) = list.binary_search_by(|x| cmp(x, r)) {
                list.remove(at);
            }
        }
        for n in inserted {
            match list.binary_search_by(|x| cmp(x, n)) {
                Ok(at) => list[at].clone_from(n),
                Err(at) => list.insert(at, n.clone()),
            }
        }
        return;
    }
    // `removed` is sorted: one merge pass drops them and adds `inserted`.
    let mut gone = removed.into_iter().peekable();
    let mut fresh = inserted.into_iter().peekable();
    let mut out = Vec::with_capacity(list.len() + fresh.len());
    for x in std::mem::take(list) {
        while gone.next_if(|r| cmp(r, &x) == Ordering::Less).is_some() {}
        if gone.next_if(|r| cmp(r, &x) == Ordering::Equal).is_some() {
            continue;
        }
        while let Some(n) = fresh.next_if(|n| cmp(n, &x) == Ordering::Less) {
            out.push(n.clone());
        }
        out.push(x);
    }
    out.extend(fresh.cloned());
    *list = out;
}
