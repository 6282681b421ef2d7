//! The dependency graph of the desired state and its waves.
//!
//! Vertices are the objects cairn creates (sites, nodes, bonds, pools,
//! networks, security groups, images, volumes, VMs, FT secondaries,
//! protection plans); an edge `a → b` means `a` must exist before `b`.
//! Waves are the longest-path layers: everything in a wave depends only on
//! earlier waves, so a wave's actions can run in parallel; creates walk the
//! waves forward, deletes backward. Built with petgraph, inserted in sorted
//! order so the output is deterministic.

use std::collections::{BTreeMap, BTreeSet};

use petgraph::graph::{DiGraph, NodeIndex};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Placement;
use crate::model::{Availability, Model};

/// A vertex of the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GraphNode {
    /// `KIND/NAME…`, e.g. `vm/ledger-db`, `volume/ledger-db/root`, `bond/hq-r1-n1/data`.
    pub id: String,
    /// Object kind.
    pub kind: String,
    /// The wave it belongs to (0 first).
    pub wave: usize,
}

/// An edge: `from` must exist before `to`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub struct GraphEdge {
    /// Dependency.
    pub from: String,
    /// Dependent.
    pub to: String,
}

/// The dependency graph (`cairn graph --format json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Graph {
    /// Version of this JSON shape.
    pub format_version: u32,
    /// Vertices, by id.
    pub nodes: Vec<GraphNode>,
    /// Edges, sorted.
    pub edges: Vec<GraphEdge>,
    /// Vertex ids per wave.
    pub waves: Vec<Vec<String>>,
}

/// Builds the graph of a model and its placement.
pub fn build_graph(model: &Model, placement: &Placement) -> Graph {
    let mut ids: BTreeSet<String> = BTreeSet::new();
    let mut edges: BTreeSet<GraphEdge> = BTreeSet::new();
    let mut edge = |from: &str, to: &str, ids: &mut BTreeSet<String>| {
        ids.insert(from.to_owned());
        ids.insert(to.to_owned());
        edges.insert(GraphEdge {
            from: from.to_owned(),
            to: to.to_owned(),
        });
    };
    for site in &model.sites {
        let s = format!("site/{}", site.name);
        ids.insert(s.clone());
        for n in &site.nodes {
            let nid = format!("node/{}", n.name);
            edge(&s, &nid, &mut ids);
            for b in &site.bonds {
                edge(&nid, &format!("bond/{}/{}", n.name, b.name), &mut ids);
            }
        }
        for p in &site.pools {
            edge(&s, &format!("pool/{}/{}", site.name, p.name), &mut ids);
        }
    }
    for t in &model.tenants {
        for net in &t.networks {
            let id = format!("network/{}/{}", t.name, net.name);
            edge(&format!("site/{}", net.site), &id, &mut ids);
        }
        for sg in &t.security_groups {
            let id = format!("security-group/{}/{}", t.name, sg.name);
            ids.insert(id.clone());
            for rule in &sg.allow {
                if t.networks.iter().any(|n| n.name == rule.from) {
                    edge(&format!("network/{}/{}", t.name, rule.from), &id, &mut ids);
                }
            }
        }
    }
    for img in &model.images {
        ids.insert(format!("image/{}", img.name));
    }
    let placed: BTreeMap<&str, &super::VmPlacement> =
        placement.vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let volumes: BTreeMap<&str, &super::VolumePlacement> = placement
        .volumes
        .iter()
        .map(|v| (v.name.as_str(), v))
        .collect();
    for vm in &model.vms {
        let Some(p) = placed.get(vm.name.as_str()) else {
            continue;
        };
        let vid = format!("vm/{}", vm.name);
        edge(&format!("node/{}", p.node), &vid, &mut ids);
        edge(&format!("image/{}", vm.image), &vid, &mut ids);
        for d in &vm.disks {
            let vol = format!("volume/{}/{}", vm.name, d.name);
            edge(&format!("pool/{}/{}", vm.site, d.pool), &vol, &mut ids);
            if let Some(vp) = volumes.get(format!("{}/{}", vm.name, d.name).as_str()) {
                let holders: BTreeSet<&str> = vp
                    .columns
                    .iter()
                    .flatten()
                    .filter_map(|c| c.split('/').next())
                    .collect();
                for h in holders {
                    edge(&format!("node/{h}"), &vol, &mut ids);
                }
            }
            if d.from_image {
                edge(&format!("image/{}", vm.image), &vol, &mut ids);
            }
            edge(&vol, &vid, &mut ids);
        }
        for nic in &vm.nics {
            edge(
                &format!("network/{}/{}", vm.tenant, nic.network),
                &vid,
                &mut ids,
            );
            for sg in &nic.security_groups {
                edge(
                    &format!("security-group/{}/{}", vm.tenant, sg),
                    &vid,
                    &mut ids,
                );
            }
        }
        if vm.availability == Availability::Ft
            && let Some(sec) = &p.secondary
        {
            let sid = format!("vm-secondary/{}", vm.name);
            edge(&vid, &sid, &mut ids);
            edge(&format!("node/{sec}"), &sid, &mut ids);
        }
        for plan in &vm.protection_plans {
            edge(&vid, &format!("protection-plan/{plan}"), &mut ids);
        }
    }
    for plan in &model.protection_plans {
        let pid = format!("protection-plan/{}", plan.name);
        ids.insert(pid.clone());
        for r in &plan.replicate {
            edge(&format!("pool/{}/{}", r.to_site, r.pool), &pid, &mut ids);
        }
    }

    let mut g: DiGraph<String, ()> = DiGraph::new();
    let index: BTreeMap<String, NodeIndex> = ids
        .iter()
        .map(|id| (id.clone(), g.add_node(id.clone())))
        .collect();
    for e in &edges {
        g.add_edge(index[&e.from], index[&e.to], ());
    }
    // Longest-path layering in topological order. The graph is acyclic by
    // construction (edges follow kinds: site → node → … → vm → plan).
    let topo = petgraph::algo::toposort(&g, None).unwrap_or_else(|_| g.node_indices().collect());
    let mut wave: BTreeMap<NodeIndex, usize> = BTreeMap::new();
    for n in topo {
        let w = g
            .neighbors_directed(n, petgraph::Direction::Incoming)
            .map(|p| wave.get(&p).map_or(0, |w| w + 1))
            .max()
            .unwrap_or(0);
        wave.insert(n, w);
    }
    let n_waves = wave.values().max().map_or(0, |m| m + 1);
    let mut waves: Vec<Vec<String>> = vec![vec![]; n_waves];
    let nodes: Vec<GraphNode> = index
        .iter()
        .map(|(id, &i)| {
            let w = wave.get(&i).copied().unwrap_or(0);
            waves[w].push(id.clone());
            GraphNode {
                id: id.clone(),
                kind: id.split('/').next().unwrap_or_default().to_owned(),
                wave: w,
            }
        })
        .collect();
    Graph {
        format_version: 1,
        nodes,
        edges: edges.into_iter().collect(),
        waves,
    }
}

impl Graph {
    /// Graphviz DOT, one rank per wave.
    pub fn to_dot(&self) -> String {
        let mut s = String::from(
            "digraph cairn {\n    rankdir=LR;\n    node [shape=box, fontname=\"monospace\"];\n",
        );
        for (i, wave) in self.waves.iter().enumerate() {
            s.push_str(&format!("    subgraph wave_{i} {{\n        rank=same;\n"));
            for id in wave {
                s.push_str(&format!("        \"{id}\";\n"));
            }
            s.push_str("    }\n");
        }
        for e in &self.edges {
            s.push_str(&format!("    \"{}\" -> \"{}\";\n", e.from, e.to));
        }
        s.push_str("}\n");
        s
    }
}
