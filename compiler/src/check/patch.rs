//! Re-checking a change to VMs alone (issue 24, item 6): the last check's
//! model and span index brought up to date by checking only the VMs and
//! vm-groups of the files a push changed, when that provably gives what the
//! whole [`super::check`] would.
//!
//! The dependency index is explicit and small. A VM's entry in the model is a
//! function of its spec and of the sites, tenants, SLA profiles and images
//! ([`Checker::vm`]); the caller guarantees those are unchanged (the changed
//! files declare VMs and vm-groups only, with the same names, and the other
//! files' lowering is reused). What reads a VM after that, across objects:
//!
//! - IPAM (`check::ipam`): its name, tenant and NICs (networks, pins);
//! - affinity and protection-plan selectors: tenant, site, group, SLA,
//!   availability, name, tags;
//! - tenant quotas: vCPUs, memory (twice for FT), disk sizes, the VM count;
//! - reserved capacity per site: vCPUs and memory of the reserved VMs.
//!
//! So a re-checked VM that differs from its last entry in nothing but `cpu`
//! and `memory_bytes` changes only its own entry, its tenant's usage and, if
//! reserved, its site's need: those are patched, and the quota and reserved
//! room are checked for the tenants and sites touched; the re-checked VMs'
//! own warnings ([`PER_VM`]) replace theirs of the last check, and every other
//! diagnostic of the last check stays as it was. Anything else (another
//! field, another diagnostic from the re-check, a pinned address, a quota or a
//! site's room exceeded) returns `None` and the caller runs the whole check;
//! the test `compiler/tests/it/session.rs` compares both over generated
//! histories.

use std::collections::{BTreeMap, BTreeSet};

use super::capacity::{demand, reserved_room};
use super::vms::Known;
use super::{Checker, SpanIndex};
use crate::diag::Diagnostic;
use crate::model::*;
use crate::source::Sources;
use crate::spec::{self, SpecSet};

/// The warnings a VM's own check reports from its own spec alone (every label
/// in its declaration) and nothing else reports: re-checking every VM of a
/// file gives all of that file's again, so they need no whole check.
pub(crate) const PER_VM: &[&str] = &[
    "cairn::check::ft_disks_unprotected",
    "cairn::check::from_image_without_disk",
];

/// Patches `model` and `spans` (the last whole check's, none of whose
/// diagnostics is a quota's or a site's reserved room, or points at the
/// changed files: the caller sees to it) for re-lowered `vms` and `groups` of
/// the same names; `set` is the whole new spec set. Returns how many VMs were
/// re-checked, the names of those whose entry changed (their vCPUs or
/// memory) and the re-check's own warnings ([`PER_VM`]), or `None` (leaving `model` and `spans` untouched) when the change
/// reaches further than the VMs' own entries.
pub(crate) fn patch_vms(
    sources: &Sources,
    set: &SpecSet,
    model: &mut Model,
    spans: &mut SpanIndex,
    vms: &[&spec::VmSpec],
    groups: &[&spec::VmGroupSpec],
) -> Option<(usize, Vec<String>, Vec<Diagnostic>)> {
    let mut diags = vec![];
    let mut c = Checker {
        sources,
        diags: &mut diags,
        spans: SpanIndex::default(),
        pinned: BTreeMap::new(),
        threads: false,
    };
    let slas: BTreeMap<String, SlaProfile> = model
        .sla_profiles
        .iter()
        .map(|p| (p.name.clone(), p.clone()))
        .collect();
    let images: BTreeMap<String, Image> = model
        .images
        .iter()
        .map(|i| (i.name.clone(), i.clone()))
        .collect();
    let (sites, tenants) = (&model.sites, &model.tenants);
    let known = Known::new(sites, tenants, &slas, &images);
    let mut fresh = vec![];
    let mut fresh_groups = vec![];
    let mut seen = BTreeSet::new();
    for v in vms {
        fresh.extend(c.single_vm(v, &known));
    }
    for g in groups {
        let (group, members) = c.vm_group(g, &mut seen, &known);
        fresh.extend(members);
        fresh_groups.push(group);
    }
    let (new_spans, pinned) = (c.spans, c.pinned);
    if !diags.iter().all(|d| PER_VM.contains(&d.code)) || !pinned.is_empty() {
        return None;
    }

    // Each re-checked VM against its last entry: equal but for vCPUs and
    // memory once the cross-object passes' outputs (addresses, plans) are
    // carried over.
    let mut at = Vec::with_capacity(fresh.len());
    // The VMs whose entries change: their vCPUs or memory moved (all else is
    // found equal below, or nothing is patched).
    let mut changed = vec![];
    let mut tenant_delta: BTreeMap<String, (i128, i128)> = BTreeMap::new();
    let mut site_delta: BTreeMap<String, (i128, i128)> = BTreeMap::new();
    for v in &mut fresh {
        let i = model
            .vms
            .binary_search_by(|x| x.name.as_str().cmp(&v.name))
            .ok()?;
        let old = &model.vms[i];
        if v.nics.len() != old.nics.len() {
            return None;
        }
        for (n, o) in v.nics.iter_mut().zip(&old.nics) {
            n.address.clone_from(&o.address);
        }
        v.protection_plans.clone_from(&old.protection_plans);
        let (cpu, memory) = (v.cpu, v.memory_bytes);
        (v.cpu, v.memory_bytes) = (old.cpu, old.memory_bytes);
        let same = *v == **old;
        (v.cpu, v.memory_bytes) = (cpu, memory);
        if !same {
            return None;
        }
        if (cpu, memory) != (old.cpu, old.memory_bytes) {
            changed.push(v.name.clone());
        }
        let (now, before) = (demand(v), demand(old));
        let d = (
            i128::from(now.0) - i128::from(before.0),
            i128::from(now.1) - i128::from(before.1),
        );
        if d != (0, 0) {
            let t = tenant_delta.entry(v.tenant.clone()).or_default();
            (t.0, t.1) = (t.0 + d.0, t.1 + d.1);
            if v.sla.class == SlaClass::Reserved {
                let s = site_delta.entry(v.site.clone()).or_default();
                (s.0, s.1) = (s.0 + d.0, s.1 + d.1);
            }
        }
        at.push(i);
    }
    let mut group_at = Vec::with_capacity(fresh_groups.len());
    for g in &fresh_groups {
        group_at.push(
            model
                .vm_groups
                .binary_search_by(|x| x.name.as_str().cmp(&g.name))
                .ok()?,
        );
    }

    // Quotas of the tenants touched: the usage moves by the deltas; over a
    // quota is an error the whole check reports.
    let mut usage = vec![];
    for (name, (dc, dm)) in &tenant_delta {
        let Ok(t) = model
            .tenants
            .binary_search_by(|x| x.name.as_str().cmp(name))
        else {
            // No such tenant: the whole check says so.
            return None;
        };
        let u = &model.tenants[t].usage;
        let vcpus = u64::try_from(i128::from(u.vcpus) + dc).ok()?;
        let memory = u64::try_from(i128::from(u.memory_bytes) + dm).ok()?;
        let quota = set
            .tenants
            .iter()
            .find(|x| x.name.value == *name)
            .and_then(|x| x.quota.as_ref());
        if let Some(q) = quota
            && (q.vcpus.as_ref().is_some_and(|l| vcpus > l.value)
                || q.memory.as_ref().is_some_and(|l| memory > l.value))
        {
            return None;
        }
        usage.push((t, vcpus, memory));
    }
    // Reserved room of the sites touched.
    for (name, (dc, dm)) in &site_delta {
        let s = model
            .sites
            .binary_search_by(|x| x.name.as_str().cmp(name))
            .ok()?;
        let site = &model.sites[s];
        let (mut cpu_need, mut mem_need) = (*dc, *dm);
        for v in model
            .vms
            .iter()
            .filter(|v| v.site == *name && v.sla.class == SlaClass::Reserved)
        {
            let (c, m) = demand(v);
            cpu_need += i128::from(c);
            mem_need += i128::from(m);
        }
        let (cpu_cap, mem_cap) = reserved_room(site);
        if cpu_need > i128::from(cpu_cap) || mem_need > i128::from(mem_cap) {
            return None;
        }
    }

    // Every check held: patch.
    let n = fresh.len();
    for (v, i) in fresh.into_iter().zip(at) {
        model.vms[i] = std::sync::Arc::new(v);
    }
    for (t, vcpus, memory) in usage {
        let u = &mut model.tenants[t].usage;
        (u.vcpus, u.memory_bytes) = (vcpus, memory);
    }
    for (g, i) in fresh_groups.into_iter().zip(group_at) {
        model.vm_groups[i] = g;
    }
    // The declarations moved within their files (a longer or shorter line
    // above them): their spans are the new ones.
    spans.objects.extend(new_spans.objects);
    Some((n, changed, diags))
}
