//! Incremental placement: a [`PlaceSession`] places each site on its own and
//! keeps, per site, the inputs and the result of its last placement, so a push
//! that changes one site's VMs places that site again and reuses the others
//! (issue 24, item 6).
//!
//! Placement is a function of each site's own inputs: a VM goes to a node of
//! its site, volumes to a pool of its site, `ha-reserve` admission and packing
//! are per site, and a network's addresses and nodes come from the VMs of its
//! site. A site's inputs are its [`Site`], its VMs, every affinity rule, its
//! tenants' networks and the part of the previous placement that is about it
//! (its VMs, unplaced VMs, volumes, nodes, moves, networks and addresses).
//! When they equal the inputs the site was last placed with, its last result
//! is the result; otherwise the site is placed again with [`place::place`]
//! on a model of that site alone. The results are merged in the orders
//! [`place::place`] gives its lists.
//!
//! What crosses sites is refused, not approximated: on any of the cases below
//! the session places the whole model with [`place::place`] and says why in
//! [`PlaceReuse::full`]. No previous placement (the first placement; VNIs are
//! chosen against every network); failed nodes, racks or sites; DR copies,
//! failovers or a protection plan that replicates to another site; an
//! affinity rule of scope `site`, or a hard `together`/`apart` rule; a rack
//! name two sites share (affinity scores count by rack name); a VM of a site
//! the model does not have, or with a NIC on another site's network; a network
//! without a previous VNI; a previous placement naming a site, network or
//! VM's site the model does not have.
//!
//! The differential test `compiler/tests/it/session.rs` compares the session
//! with [`place::place`] of the whole model over generated one-change edits.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{AffinityKind, Domain, Model, Site, Tenant, Vm};
use crate::place::{self, PlaceOptions, Placement};

/// A placement session: each site's last inputs and result.
#[derive(Debug, Default)]
pub struct PlaceSession {
    sites: BTreeMap<String, SiteMemo>,
}

/// One site's last placement: the model of the site alone, the previous
/// placement's part about it, and the result.
#[derive(Debug)]
struct SiteMemo {
    model: Model,
    previous: Placement,
    placed: Placement,
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
    pub fn place(&mut self, model: &Model, options: &PlaceOptions) -> (Placement, PlaceReuse) {
        let previous = match options.previous.as_ref() {
            Some(p) => p,
            None => return self.full(model, options, "no previous placement".to_owned()),
        };
        let owners = match Owners::of(model, previous) {
            Ok(o) => o,
            Err(why) => return self.full(model, options, why),
        };
        if let Some(why) = crosses_sites(model, options) {
            return self.full(model, options, why);
        }
        let mut reuse = PlaceReuse::default();
        let mut parts = vec![];
        let mut memos = BTreeMap::new();
        let mut split = owners.split(previous);
        for site in &model.sites {
            let part = split.remove(&site.name).unwrap_or_else(|| Placement {
                format_version: previous.format_version,
                ..Placement::default()
            });
            let memo = match self.sites.remove(&site.name) {
                Some(m) if m.previous == part && same_site(&m.model, model, site) => {
                    reuse.sites_reused += 1;
                    m
                }
                _ => {
                    reuse.sites_placed += 1;
                    let alone = site_model(model, site);
                    let placed = place::place(
                        &alone,
                        &PlaceOptions {
                            previous: Some(part.clone()),
                            failed: Default::default(),
                        },
                        None,
                    );
                    SiteMemo {
                        model: alone,
                        previous: part,
                        placed,
                    }
                }
            };
            parts.push(memo.placed.clone());
            memos.insert(site.name.clone(), memo);
        }
        self.sites = memos;
        (merge(previous, parts), reuse)
    }

    fn full(
        &mut self,
        model: &Model,
        options: &PlaceOptions,
        why: String,
    ) -> (Placement, PlaceReuse) {
        self.sites.clear();
        let placed = place::place(model, options, None);
        (
            placed,
            PlaceReuse {
                full: Some(why),
                ..PlaceReuse::default()
            },
        )
    }
}

/// Why the model cannot be placed site by site (`None`: it can).
fn crosses_sites(model: &Model, options: &PlaceOptions) -> Option<String> {
    let failed = &options.failed;
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

fn site_vms<'m>(model: &'m Model, site: &'m str) -> impl Iterator<Item = &'m Vm> + 'm {
    model.vms.iter().filter(move |v| v.site == site)
}

/// The model of one site alone, as placement reads it.
fn site_model(model: &Model, site: &Site) -> Model {
    Model {
        format_version: model.format_version,
        node_classes: vec![],
        sites: vec![site.clone()],
        tenants: site_tenants(model, &site.name),
        sla_profiles: vec![],
        images: vec![],
        vms: site_vms(model, &site.name).cloned().collect(),
        vm_groups: vec![],
        affinities: model.affinities.clone(),
        protection_plans: model.protection_plans.clone(),
        reconcile: None,
    }
}

/// Whether `alone` is [`site_model`]`(model, site)`, without building it.
fn same_site(alone: &Model, model: &Model, site: &Site) -> bool {
    alone.sites.len() == 1
        && &alone.sites[0] == site
        && alone.format_version == model.format_version
        && alone.affinities == model.affinities
        && alone.protection_plans == model.protection_plans
        && alone.vms.iter().eq(site_vms(model, &site.name))
        && alone.tenants == site_tenants(model, &site.name)
}

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
