//! `pool` of a site: its disks by class, failure domains for its replicas,
//! provisionable capacity.

use std::collections::BTreeSet;

use super::Checker;
use crate::diag::{Diagnostic, suggestion};
use crate::model::*;
use crate::spec;

impl Checker<'_> {
    pub(super) fn pool(&mut self, s: &spec::SiteSpec, p: &spec::PoolSpec, nodes: &[Node]) -> Pool {
        self.spans.insert(
            "pool",
            &format!("{}/{}", s.name.value, p.name.value),
            p.name.span,
        );
        let class = p
            .disk_class
            .as_ref()
            .map(|c| c.value.clone())
            .unwrap_or_default();
        let domain = p.failure_domain.as_ref().map_or(Domain::Node, |d| d.value);
        let replicas = p.replicas.as_ref().map_or(1, |r| r.value);
        let mut disks = vec![];
        let mut domains = BTreeSet::new();
        let mut raw = 0u64;
        for n in nodes {
            for d in n.disks.iter().filter(|d| d.class == class) {
                disks.push(format!("{}/{}", n.name, d.name));
                raw = raw.saturating_add(d.size_bytes);
                domains.insert(match domain {
                    Domain::Node => n.name.clone(),
                    Domain::Rack => n.rack.clone(),
                    Domain::Site => n.site.clone(),
                });
            }
        }
        disks.sort();
        if p.disk_class.is_some() && (domains.len() as u32) < replicas {
            let span = p.replicas.as_ref().map_or(p.name.span, |r| r.span);
            let classes: BTreeSet<&str> = nodes
                .iter()
                .flat_map(|n| n.disks.iter().map(|d| d.class.as_str()))
                .collect();
            let help = if domains.is_empty() && !classes.is_empty() {
                format!(
                    "no node of site `{}` has a disk of class `{class}`; {}",
                    s.name.value,
                    suggestion(
                        &class,
                        &classes.into_iter().collect::<Vec<_>>(),
                        "disk class"
                    )
                )
            } else {
                format!(
                    "lower `replicas` to at most {}, choose a smaller failure domain, or add {domain}s with `{class}` disks",
                    domains.len()
                )
            };
            self.push(
                Diagnostic::error(
                    "cairn::check::pool_too_few_failure_domains",
                    span,
                    format!(
                        "pool `{}` keeps {replicas} replicas in distinct {domain}s, but site `{}` has only {} {domain}{} with `{class}` disks",
                        p.name.value,
                        s.name.value,
                        domains.len(),
                        if domains.len() == 1 { "" } else { "s" }
                    ),
                )
                .with_label(format!("{replicas} replicas"))
                .with_help(help),
            );
        }
        let thin = p.thin_overcommit.as_ref().map_or(1.0, |v| v.value);
        let provisionable = ((raw / u64::from(replicas.max(1))) as f64 * thin) as u64;
        Pool {
            name: p.name.value.clone(),
            disk_class: class,
            replicas,
            failure_domain: domain,
            stripe_width: p.stripe_width.as_ref().map_or(1, |v| v.value),
            stripe_unit_bytes: p.stripe_unit.as_ref().map_or(1 << 20, |v| v.value),
            thin_overcommit: thin,
            disks,
            failure_domains: domains.into_iter().collect(),
            raw_bytes: raw,
            provisionable_bytes: provisionable,
        }
    }
}
