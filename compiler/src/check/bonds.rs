//! `bond` of a site: members every node has, capacity, QoS traffic classes.

use std::collections::BTreeSet;

use super::{Checker, list, unique};
use crate::diag::Diagnostic;
use crate::model::*;
use crate::spec::{self, Name};
use crate::units::format_bandwidth;

impl Checker<'_> {
    pub(super) fn bond(&mut self, s: &spec::SiteSpec, b: &spec::BondSpec, nodes: &[Node]) -> Bond {
        self.spans.insert(
            "bond",
            &format!("{}/{}", s.name.value, b.name.value),
            b.name.span,
        );
        if b.name.value.len() > 15 {
            self.push(
                Diagnostic::error(
                    "cairn::check::bond_name_too_long",
                    b.name.span,
                    format!("bond name `{}` is {} characters; Linux device names hold at most 15", b.name.value, b.name.value.len()),
                )
                .with_help("the bond becomes a network device of the same name: choose a name of 15 characters or fewer"),
            );
        }
        let mode = b.mode.as_ref().map_or(BondMode::ActiveBackup, |m| m.value);
        if b.members.is_empty() {
            self.push(
                Diagnostic::error(
                    "cairn::check::bond_without_members",
                    b.members_span,
                    format!("bond `{}` has no members", b.name.value),
                )
                .with_help(
                    "add `members \"ens1f0\" \"ens1f1\"` naming NICs every node of the site has",
                ),
            );
        }
        let mut members_dup = BTreeSet::new();
        for m in &b.members {
            if !members_dup.insert(&m.value) {
                self.push(Diagnostic::error(
                    "cairn::check::bond_member_repeated",
                    m.span,
                    format!(
                        "NIC `{}` is listed twice in bond `{}`",
                        m.value, b.name.value
                    ),
                ));
            }
        }
        // Every node must have every member NIC.
        let mut capacity: Option<u64> = None;
        for m in &b.members {
            let missing: Vec<&str> = nodes
                .iter()
                .filter(|n| !n.nics.iter().any(|x| x.name == m.value))
                .map(|n| n.name.as_str())
                .collect();
            if !missing.is_empty() {
                self.push(
                    Diagnostic::error(
                        "cairn::check::bond_member_missing",
                        m.span,
                        format!(
                            "bond `{}` member `{}` is missing on {} of {} nodes of site `{}`: {}",
                            b.name.value,
                            m.value,
                            missing.len(),
                            nodes.len(),
                            s.name.value,
                            list(&missing, 5)
                        ),
                    )
                    .with_label("not on every node")
                    .with_help("every node of the site must have each member NIC: add it to the node-class or to those nodes"),
                );
            }
        }
        for n in nodes {
            let speeds: Vec<u64> = b
                .members
                .iter()
                .filter_map(|m| {
                    n.nics
                        .iter()
                        .find(|x| x.name == m.value)
                        .map(|x| x.speed_bps)
                })
                .collect();
            if speeds.is_empty() {
                continue;
            }
            let node_capacity = match mode {
                BondMode::ActiveBackup => speeds.iter().copied().min().unwrap_or(0),
                _ => speeds.iter().sum(),
            };
            capacity = Some(capacity.map_or(node_capacity, |c| c.min(node_capacity)));
        }
        let capacity = capacity.unwrap_or(0);
        let mut seen_traffic: Vec<Name> = vec![];
        let mut traffic = vec![];
        for t in &b.traffic {
            seen_traffic.push(t.name.clone());
            let Some(kind) = TrafficKind::parse(&t.name.value) else {
                continue;
            };
            let min = t.min.as_ref().map_or(0, |v| v.value);
            let max = t.max.as_ref().map_or(capacity, |v| v.value);
            if let (Some(lo), Some(hi)) = (&t.min, &t.max)
                && lo.value > hi.value
            {
                self.push(
                    Diagnostic::error(
                        "cairn::check::traffic_min_above_max",
                        hi.span,
                        format!(
                            "traffic `{}` has a ceiling of {} below its guarantee of {}",
                            t.name.value,
                            format_bandwidth(hi.value),
                            format_bandwidth(lo.value)
                        ),
                    )
                    .and_label(lo.span, "guarantee")
                    .with_help("`max` must be at least `min`"),
                );
            }
            if let Some(hi) = &t.max
                && capacity > 0
                && hi.value > capacity
            {
                self.push(
                    Diagnostic::warning(
                        "cairn::check::traffic_max_above_capacity",
                        hi.span,
                        format!(
                            "traffic `{}` has a ceiling of {} above the bond's capacity of {}",
                            t.name.value,
                            format_bandwidth(hi.value),
                            format_bandwidth(capacity)
                        ),
                    )
                    .with_help("the ceiling can never be reached; lower it or leave it out"),
                );
            }
            traffic.push(TrafficClass {
                name: kind,
                min_bps: min,
                max_bps: max.min(capacity.max(min)),
                weight: t.weight.as_ref().map_or(1, |w| w.value),
            });
        }
        unique(
            self.diags,
            "traffic class",
            &format!(" in bond `{}`", b.name.value),
            seen_traffic.iter(),
        );
        let total_min: u64 = traffic.iter().map(|t| t.min_bps).sum();
        if capacity > 0 && total_min > capacity {
            let mut d = Diagnostic::error(
                "cairn::check::bond_over_capacity",
                b.name.span,
                format!(
                    "bond `{}` guarantees {} in total but its capacity is {} ({} of {})",
                    b.name.value,
                    format_bandwidth(total_min),
                    format_bandwidth(capacity),
                    mode,
                    b.members
                        .iter()
                        .map(|m| m.value.as_str())
                        .collect::<Vec<_>>()
                        .join(" + ")
                ),
            )
            .with_label("over capacity");
            for t in &b.traffic {
                if let Some(m) = &t.min {
                    d = d.and_label(m.span, format!("{} guaranteed", format_bandwidth(m.value)));
                }
            }
            self.push(d.with_help(format!(
                "lower the `min` rates to fit {} (active-backup bonds carry one member's speed; the other modes the sum)",
                format_bandwidth(capacity)
            )));
        }
        traffic.sort_by_key(|t| t.name);
        Bond {
            name: b.name.value.clone(),
            mode,
            mtu: b.mtu.as_ref().map_or(1500, |v| v.value),
            miimon_ms: b.miimon.as_ref().map_or(100, |v| v.value),
            members: b.members.iter().map(|m| m.value.clone()).collect(),
            capacity_bps: capacity,
            traffic,
        }
    }
}
