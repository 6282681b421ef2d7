//! `site`: racks, nodes (with their class's defaults), the HA reserve and
//! the site's totals; bonds and pools are checked in their own modules.

use std::collections::{BTreeMap, BTreeSet};

use super::node_classes::{disk, nic};
use super::{Checker, labels, unique, unknown};
use crate::diag::Diagnostic;
use crate::model::*;
use crate::spec::{Name, SpecSet};

impl Checker<'_> {
    pub(super) fn sites(
        &mut self,
        set: &SpecSet,
        classes: &BTreeMap<String, NodeClass>,
    ) -> Vec<Site> {
        unique(self.diags, "site", "", set.sites.iter().map(|s| &s.name));
        unique(
            self.diags,
            "rack",
            "",
            set.sites
                .iter()
                .flat_map(|s| s.racks.iter().map(|r| &r.name)),
        );
        unique(
            self.diags,
            "node",
            "",
            set.sites
                .iter()
                .flat_map(|s| s.racks.iter().flat_map(|r| r.nodes.iter().map(|n| &n.name))),
        );
        let addresses: Vec<Name> = set
            .sites
            .iter()
            .flat_map(|s| {
                s.racks
                    .iter()
                    .flat_map(|r| r.nodes.iter().filter_map(|n| n.address.clone()))
            })
            .collect();
        unique(self.diags, "node address", "", addresses.iter());
        // Two nodes with one tunnel endpoint would swallow each other's VXLAN traffic.
        let underlays: Vec<Name> = set
            .sites
            .iter()
            .flat_map(|s| s.racks.iter().flat_map(|r| r.nodes.iter()))
            .filter_map(|n| n.underlay.clone())
            .map(|mut u| {
                if let Some((host, _)) = u.value.split_once('/') {
                    u.value = host.to_owned();
                }
                u
            })
            .collect();
        unique(self.diags, "node underlay address", "", underlays.iter());
        let class_names: Vec<&str> = classes.keys().map(String::as_str).collect();
        let mut seen_sites = BTreeSet::new();
        let mut out = vec![];
        for s in &set.sites {
            if !seen_sites.insert(s.name.value.clone()) {
                continue;
            }
            self.spans.insert("site", &s.name.value, s.name.span);
            let mut nodes = vec![];
            let mut racks = vec![];
            for r in &s.racks {
                self.spans.insert("rack", &r.name.value, r.name.span);
                racks.push(Rack {
                    name: r.name.value.clone(),
                    nodes: r.nodes.iter().map(|n| n.name.value.clone()).collect(),
                });
                for n in &r.nodes {
                    self.spans.insert("node", &n.name.value, n.name.span);
                    let class = n.class.as_ref().and_then(|c| match classes.get(&c.value) {
                        Some(class) => Some(class),
                        None => {
                            let owner = format!("node `{}`", n.name.value);
                            self.push(unknown(
                                "cairn::resolve::unknown_node_class",
                                c,
                                "node-class",
                                &owner,
                                &class_names,
                            ));
                            None
                        }
                    });
                    let own_disks: Vec<Disk> = n.disks.iter().map(disk).collect();
                    let own_nics: Vec<Nic> = n.nics.iter().map(nic).collect();
                    let class_disks = class.map(|c| c.disks.clone()).unwrap_or_default();
                    for d in &n.disks {
                        if class_disks.iter().any(|cd| cd.name == d.name.value) {
                            self.push(
                                Diagnostic::error(
                                    "cairn::resolve::duplicate_name",
                                    d.name.span,
                                    format!("node `{}` already has disk `{}` from its class", n.name.value, d.name.value),
                                )
                                .with_help("a node's own `disk` adds to its class's disks; give it another device name"),
                            );
                        }
                    }
                    unique(
                        self.diags,
                        "disk",
                        &format!(" on node `{}`", n.name.value),
                        n.disks.iter().map(|d| &d.name),
                    );
                    unique(
                        self.diags,
                        "nic",
                        &format!(" on node `{}`", n.name.value),
                        n.nics.iter().map(|d| &d.name),
                    );
                    let mut labels_map = class.map(|c| c.labels.clone()).unwrap_or_default();
                    labels_map.extend(labels(&n.labels));
                    let capacity = class.map(|c| c.capacity).unwrap_or_default();
                    let reserve = class.map(|c| c.host_reserve).unwrap_or_default();
                    nodes.push(Node {
                        name: n.name.value.clone(),
                        site: s.name.value.clone(),
                        rack: r.name.value.clone(),
                        class: n
                            .class
                            .as_ref()
                            .map(|c| c.value.clone())
                            .unwrap_or_default(),
                        address: n
                            .address
                            .as_ref()
                            .map(|a| a.value.clone())
                            .unwrap_or_default(),
                        underlay: n.underlay.as_ref().map(|u| u.value.clone()),
                        capacity,
                        allocatable: Resources {
                            cpu: capacity.cpu.saturating_sub(reserve.cpu),
                            memory_bytes: capacity
                                .memory_bytes
                                .saturating_sub(reserve.memory_bytes),
                        },
                        disks: merge_by_name(&class_disks, &own_disks, |d| &d.name),
                        nics: merge_by_name(
                            &class.map(|c| c.nics.clone()).unwrap_or_default(),
                            &own_nics,
                            |n| &n.name,
                        ),
                        labels: labels_map,
                        maintenance: n.maintenance.as_ref().is_some_and(|m| m.value),
                    });
                }
            }
            let scope = format!(" in site `{}`", s.name.value);
            unique(self.diags, "bond", &scope, s.bonds.iter().map(|b| &b.name));
            unique(self.diags, "pool", &scope, s.pools.iter().map(|p| &p.name));
            let bonds = s
                .bonds
                .iter()
                .map(|b| self.bond(s, b, &nodes))
                .collect::<Vec<_>>();
            let pools = s
                .pools
                .iter()
                .map(|p| self.pool(s, p, &nodes))
                .collect::<Vec<_>>();
            let allocatable = Resources {
                cpu: nodes.iter().map(|n| n.allocatable.cpu).sum(),
                memory_bytes: nodes.iter().map(|n| n.allocatable.memory_bytes).sum(),
            };
            if let Some(h) = &s.ha_reserve
                && h.value as usize >= nodes.len()
                && h.value > 0
            {
                self.push(
                    Diagnostic::error(
                        "cairn::check::ha_reserve_too_large",
                        h.span,
                        format!(
                            "site `{}` reserves capacity for the loss of {} nodes but has only {}",
                            s.name.value,
                            h.value,
                            nodes.len()
                        ),
                    )
                    .with_help(
                        "the HA reserve must be smaller than the number of nodes in the site",
                    ),
                );
            }
            let mut site = Site {
                name: s.name.value.clone(),
                overcommit: Overcommit {
                    cpu: s.overcommit_cpu.as_ref().map_or(1.0, |v| v.value),
                    memory: s.overcommit_memory.as_ref().map_or(1.0, |v| v.value),
                },
                ha_reserve_nodes: s.ha_reserve.as_ref().map_or(0, |v| v.value),
                scheduler: Scheduler {
                    strategy: s.strategy.as_ref().map_or(Strategy::Spread, |v| v.value),
                    rebalance_threshold: s.rebalance_threshold.as_ref().map_or(0.2, |v| v.value),
                    max_moves: s.max_moves.as_ref().map_or(10, |v| v.value),
                },
                witness: s.witness.as_ref().map(|w| w.value.clone()),
                witness_alternate: s.witness_alternate.as_ref().map(|w| w.value.clone()),
                failure_detect_ms: s.failure_detect.as_ref().map(|v| v.value),
                racks,
                nodes,
                bonds,
                pools,
                allocatable,
            };
            site.racks.sort_by(|a, b| a.name.cmp(&b.name));
            site.nodes.sort_by(|a, b| a.name.cmp(&b.name));
            site.bonds.sort_by(|a, b| a.name.cmp(&b.name));
            site.pools.sort_by(|a, b| a.name.cmp(&b.name));
            out.push(site);
        }
        out
    }
}

/// Adds `disks`/`nics` by name, letting later ones (the node's) replace
/// earlier ones (the class's) of the same name.
fn merge_by_name<T: Clone>(base: &[T], extra: &[T], name: impl Fn(&T) -> &str) -> Vec<T> {
    let mut out: Vec<T> = base.to_vec();
    for e in extra {
        match out.iter().position(|b| name(b) == name(e)) {
            Some(i) => out[i] = e.clone(),
            None => out.push(e.clone()),
        }
    }
    out
}
