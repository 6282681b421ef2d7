//! What the expanded VMs ask for against what is promised: tenant quotas
//! (naming the VMs that push one over) and sites' capacity for reserved VMs
//! after `ha-reserve`.

use std::collections::BTreeMap;

use super::{Checker, list};
use crate::diag::Diagnostic;
use crate::model::*;
use crate::spec::{Spanned, SpecSet, TenantSpec};
use crate::units::format_size;

impl Checker<'_> {
    pub(super) fn quotas(&mut self, set: &SpecSet, tenants: &mut [Tenant], vms: &[Vm]) {
        // The VMs of each tenant and each tenant's spec, grouped once (not a
        // pass over every VM and every spec per tenant).
        let mut by_tenant: BTreeMap<&str, Vec<&Vm>> = BTreeMap::new();
        for v in vms {
            by_tenant.entry(v.tenant.as_str()).or_default().push(v);
        }
        let mut specs: BTreeMap<&str, &TenantSpec> = BTreeMap::new();
        for x in &set.tenants {
            specs.entry(x.name.value.as_str()).or_insert(x);
        }
        for t in tenants.iter_mut() {
            let mut mine: Vec<&Vm> = by_tenant.get(t.name.as_str()).cloned().unwrap_or_default();
            mine.sort_by(|a, b| a.name.cmp(&b.name));
            let usage = Usage {
                vcpus: mine.iter().map(|v| demand(v).0).sum(),
                memory_bytes: mine.iter().map(|v| demand(v).1).sum(),
                storage_bytes: mine
                    .iter()
                    .flat_map(|v| v.disks.iter().map(|d| d.size_bytes))
                    .sum(),
                vms: mine.len() as u64,
            };
            t.usage = usage.clone();
            let Some(spec) = specs.get(t.name.as_str()) else {
                continue;
            };
            let Some(q) = &spec.quota else { continue };
            type Measure = fn(&Vm) -> u64;
            type Show = fn(u64) -> String;
            type QuotaCheck<'q> = (&'static str, Option<&'q Spanned<u64>>, u64, Measure, Show);
            let checks: [QuotaCheck<'_>; 4] = [
                (
                    "vcpus",
                    q.vcpus.as_ref(),
                    usage.vcpus,
                    |v| demand(v).0,
                    |n| format!("{n} vCPUs"),
                ),
                (
                    "memory",
                    q.memory.as_ref(),
                    usage.memory_bytes,
                    |v| demand(v).1,
                    format_size,
                ),
                (
                    "storage",
                    q.storage.as_ref(),
                    usage.storage_bytes,
                    |v| v.disks.iter().map(|d| d.size_bytes).sum(),
                    format_size,
                ),
                (
                    "vms",
                    q.vms.as_ref(),
                    usage.vms,
                    |_| 1,
                    |n| format!("{n} {}", if n == 1 { "VM" } else { "VMs" }),
                ),
            ];
            for (what, limit, used, measure, show) in checks {
                let Some(limit) = limit else { continue };
                if used <= limit.value {
                    continue;
                }
                // The VMs, in name order, from the one whose demand first
                // crosses the quota onwards.
                let mut running = 0u64;
                let mut over = vec![];
                for v in &mine {
                    let m = measure(v);
                    running += m;
                    if running > limit.value && m > 0 {
                        over.push(format!("{} ({})", v.name, show(m)));
                    }
                }
                let mut d = Diagnostic::error(
                    "cairn::check::quota_exceeded",
                    limit.span,
                    format!(
                        "tenant `{}` asks for {} but its {what} quota is {}",
                        t.name,
                        show(used),
                        show(limit.value)
                    ),
                )
                .with_label(format!("quota {}", show(limit.value)));
                for v in mine
                    .iter()
                    .filter(|v| over.iter().any(|o| o.starts_with(&format!("{} (", v.name))))
                    .take(3)
                {
                    if let Some(span) = self.spans.get("vm", &v.name) {
                        d = d.and_label(span, format!("`{}` pushes it over", v.name));
                    }
                }
                self.push(d.with_help(format!(
                    "VMs beyond the quota, in name order: {}; raise the quota or shrink or remove VMs (FT VMs count twice for vCPUs and memory)",
                    list(&over.iter().map(String::as_str).collect::<Vec<_>>(), 6)
                )));
            }
        }
    }

    pub(super) fn reserved_capacity(&mut self, set: &SpecSet, sites: &[Site], vms: &[Vm]) {
        // Reserved VMs per site, in list order, grouped once.
        let mut by_site: BTreeMap<&str, Vec<&Vm>> = BTreeMap::new();
        for v in vms.iter().filter(|v| v.sla.class == SlaClass::Reserved) {
            by_site.entry(v.site.as_str()).or_default().push(v);
        }
        for s in sites {
            let n_reserve = s.ha_reserve_nodes as usize;
            let closed = s.nodes.iter().filter(|n| n.maintenance).count();
            let (cpu_cap, mem_cap) = reserved_room(s);
            let reserved: Vec<&Vm> = by_site.get(s.name.as_str()).cloned().unwrap_or_default();
            let cpu_need: u64 = reserved.iter().map(|v| demand(v).0).sum();
            let mem_need: u64 = reserved.iter().map(|v| demand(v).1).sum();
            let Some(spec) = set.sites.iter().find(|x| x.name.value == s.name) else {
                continue;
            };
            let mut after = if n_reserve > 0 {
                format!(
                    " after reserving {n_reserve} node{} for HA",
                    if n_reserve == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            };
            if closed > 0 {
                after.push_str(&format!(
                    "{} without its {closed} node{} in maintenance",
                    if n_reserve > 0 { " and" } else { "" },
                    if closed == 1 { "" } else { "s" }
                ));
            }
            if cpu_need > cpu_cap {
                self.push(
                    Diagnostic::error(
                        "cairn::check::reserved_over_capacity",
                        spec.name.span,
                        format!("site `{}` has {cpu_cap} CPUs for reserved VMs{after}, but reserved VMs need {cpu_need}", s.name),
                    )
                    .with_help(format!("{} reserved VMs ask for it (FT counts twice); add nodes, lower `ha-reserve`, or move VMs to `on-demand`", reserved.len())),
                );
            }
            if mem_need > mem_cap {
                self.push(
                    Diagnostic::error(
                        "cairn::check::reserved_over_capacity",
                        spec.name.span,
                        format!(
                            "site `{}` has {} of memory for reserved VMs{after}, but reserved VMs need {}",
                            s.name,
                            format_size(mem_cap),
                            format_size(mem_need)
                        ),
                    )
                    .with_help(format!("{} reserved VMs ask for it (FT counts twice); add nodes, lower `ha-reserve`, or move VMs to `on-demand`", reserved.len())),
                );
            }
        }
    }
}

/// A site's CPUs and memory for reserved VMs: its open nodes' (a node in
/// maintenance takes no VM) without the `ha-reserve` largest.
pub(super) fn reserved_room(s: &Site) -> (u64, u64) {
    let n_reserve = s.ha_reserve_nodes as usize;
    let open = || s.nodes.iter().filter(|n| !n.maintenance);
    let mut cpus: Vec<u64> = open().map(|n| n.allocatable.cpu).collect();
    let mut mems: Vec<u64> = open().map(|n| n.allocatable.memory_bytes).collect();
    cpus.sort_unstable_by(|a, b| b.cmp(a));
    mems.sort_unstable_by(|a, b| b.cmp(a));
    (
        cpus.iter().skip(n_reserve).sum(),
        mems.iter().skip(n_reserve).sum(),
    )
}

/// What a VM asks of its tenant's quota and its site's reserved room: vCPUs
/// and memory bytes, twice for an FT VM (its secondary).
pub(super) fn demand(v: &Vm) -> (u64, u64) {
    let copies = if v.availability == Availability::Ft {
        2
    } else {
        1
    };
    (u64::from(v.cpu) * copies, v.memory_bytes * copies)
}
