//! `protection-plan`: snapshots and replication to another site, and the
//! VMs each plan applies to.

use std::collections::BTreeSet;

use super::selectors::{matches_vm, selector};
use super::{Checker, list, unique, unknown};
use crate::diag::Diagnostic;
use crate::model::*;
use crate::spec::SpecSet;

impl Checker<'_> {
    pub(super) fn protection_plans(
        &mut self,
        set: &SpecSet,
        sites: &[Site],
        vms: &mut [Vm],
    ) -> Vec<ProtectionPlan> {
        unique(
            self.diags,
            "protection-plan",
            "",
            set.protection_plans.iter().map(|p| &p.name),
        );
        let site_names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        let mut out = vec![];
        let mut seen = BTreeSet::new();
        for p in &set.protection_plans {
            if !seen.insert(&p.name.value) {
                continue;
            }
            self.spans
                .insert("protection-plan", &p.name.value, p.name.span);
            let owner = format!("protection-plan `{}`", p.name.value);
            if p.snapshot.is_none() && p.replicate.is_empty() {
                self.push(
                    Diagnostic::warning("cairn::check::plan_does_nothing", p.name.span, format!("{owner} neither snapshots nor replicates"))
                        .with_help("add `snapshot every=\"15m\" keep=96` or `replicate to-site=… pool=… every=\"1h\" keep=24`"),
                );
            }
            let applies = p.applies_to.as_ref().map(selector).unwrap_or_default();
            if p.applies_to.is_none() {
                self.push(
                    Diagnostic::error("cairn::check::plan_without_applies_to", p.name.span, format!("{owner} has no `applies-to`"))
                        .with_help("add `applies-to tenant=\"finance\"` (tags and the built-in keys tenant, site, group, sla, availability)"),
                );
            }
            let mut matched = vec![];
            for v in vms.iter_mut() {
                if p.applies_to.is_some() && matches_vm(&applies, v) {
                    matched.push(v.name.clone());
                    v.protection_plans.push(p.name.value.clone());
                }
            }
            let mut replicate = vec![];
            for r in &p.replicate {
                let target = r.to_site.as_ref().and_then(|t| {
                    let found = sites.iter().find(|s| s.name == t.value);
                    if found.is_none() {
                        self.push(unknown(
                            "cairn::resolve::unknown_site",
                            t,
                            "site",
                            &owner,
                            &site_names,
                        ));
                    }
                    found
                });
                if let (Some(target), Some(pool)) = (target, &r.pool)
                    && !target.pools.iter().any(|x| x.name == pool.value)
                {
                    let pools: Vec<&str> = target.pools.iter().map(|x| x.name.as_str()).collect();
                    let mut d =
                        unknown("cairn::resolve::unknown_pool", pool, "pool", &owner, &pools);
                    d.message = format!(
                        "{owner} replicates into pool `{}`, which site `{}` does not have",
                        pool.value, target.name
                    );
                    self.push(d);
                }
                if let (Some(target), Some(to)) = (target, &r.to_site) {
                    let same: Vec<&str> = vms
                        .iter()
                        .filter(|v| matched.contains(&v.name) && v.site == target.name)
                        .map(|v| v.name.as_str())
                        .collect();
                    if !same.is_empty() {
                        self.push(
                            Diagnostic::error(
                                "cairn::check::replicate_to_own_site",
                                to.span,
                                format!("{owner} replicates to site `{}`, where {} of its VMs already run: {}", target.name, same.len(), list(&same, 5)),
                            )
                            .with_help("disaster-recovery copies must go to another site than the VM's"),
                        );
                    }
                }
                replicate.push(Replication {
                    to_site: r
                        .to_site
                        .as_ref()
                        .map(|t| t.value.clone())
                        .unwrap_or_default(),
                    pool: r.pool.as_ref().map(|t| t.value.clone()).unwrap_or_default(),
                    every_ms: r.every.as_ref().map_or(0, |e| e.value),
                    keep: r.keep.as_ref().map_or(1, |k| k.value),
                });
            }
            out.push(ProtectionPlan {
                name: p.name.value.clone(),
                snapshot: p.snapshot.as_ref().map(|s| Schedule {
                    every_ms: s.every.as_ref().map_or(0, |e| e.value),
                    keep: s.keep.as_ref().map_or(1, |k| k.value),
                }),
                replicate,
                applies_to: applies,
                vms: matched,
            });
        }
        for v in vms.iter_mut() {
            v.protection_plans.sort();
        }
        out
    }
}
