//! `affinity`: apart/together/node rules and the VMs their selectors match.

use std::collections::BTreeSet;

use super::selectors::{VmIndex, selector};
use super::{Checker, unique};
use crate::diag::Diagnostic;
use crate::model::*;
use crate::spec::SpecSet;

impl Checker<'_> {
    pub(super) fn affinities(&mut self, set: &SpecSet, vms: &[Vm]) -> Vec<Affinity> {
        unique(
            self.diags,
            "affinity",
            "",
            set.affinities.iter().map(|a| &a.name),
        );
        let selectors: Vec<_> = set
            .affinities
            .iter()
            .filter_map(|a| a.select.as_ref().map(selector))
            .collect();
        let index = VmIndex::new(vms, &selectors);
        let mut out = vec![];
        let mut seen = BTreeSet::new();
        for a in &set.affinities {
            if !seen.insert(&a.name.value) {
                continue;
            }
            self.spans.insert("affinity", &a.name.value, a.name.span);
            let kind = a.kind.as_ref().map_or(AffinityKind::Apart, |k| k.value);
            if a.select.is_none() {
                self.push(
                    Diagnostic::error(
                        "cairn::check::affinity_without_select",
                        a.name.span,
                        format!("affinity `{}` has no `select`", a.name.value),
                    )
                    .with_help("add `select KEY=\"VALUE\"` choosing the VMs the rule applies to"),
                );
            }
            match (kind, &a.nodes) {
                (AffinityKind::Node, None) => self.push(
                    Diagnostic::error(
                        "cairn::check::affinity_without_nodes",
                        a.name.span,
                        format!(
                            "affinity `{}` of kind `node` has no `nodes` selector",
                            a.name.value
                        ),
                    )
                    .with_help(
                        "add `nodes rack=\"r2\"` (labels, or the built-in keys site, rack, node)",
                    ),
                ),
                (AffinityKind::Apart | AffinityKind::Together, Some(n)) => self.push(
                    Diagnostic::error(
                        "cairn::check::nodes_selector_unused",
                        n.span,
                        format!(
                            "affinity `{}` of kind `{kind}` cannot use a `nodes` selector",
                            a.name.value
                        ),
                    )
                    .with_help(
                        "only `kind=\"node\"` rules pick nodes; use `scope` for apart/together",
                    ),
                ),
                _ => {}
            }
            if let (Some(h), Some(w)) = (&a.hard, &a.weight)
                && h.value
            {
                self.push(
                    Diagnostic::warning(
                        "cairn::check::weight_on_hard_rule",
                        w.span,
                        format!(
                            "affinity `{}` is hard; its weight is not used",
                            a.name.value
                        ),
                    )
                    .with_help("remove `weight`, or make the rule soft with `hard=#false`"),
                );
            }
            let select = a.select.as_ref().map(selector).unwrap_or_default();
            let matched: Vec<String> = match &a.select {
                Some(_) => index
                    .matching(&select)
                    .into_iter()
                    .map(|v| v.name.clone())
                    .collect(),
                None => vec![],
            };
            if matched.is_empty()
                && let Some(sel) = &a.select
                && !sel.pairs.is_empty()
            {
                self.push(
                    Diagnostic::warning("cairn::check::selector_matches_nothing", sel.span, format!("affinity `{}` selects no VM", a.name.value))
                        .with_help("VM selectors match tags and the built-in keys tenant, site, group, sla and availability"),
                );
            }
            out.push(Affinity {
                name: a.name.value.clone(),
                kind,
                scope: a.scope.as_ref().map_or(Domain::Node, |s| s.value),
                hard: a.hard.as_ref().is_some_and(|h| h.value),
                weight: a.weight.as_ref().map_or(50, |w| w.value),
                select,
                nodes: a.nodes.as_ref().map(selector).unwrap_or_default(),
                vms: matched,
            });
        }
        out
    }
}
