//! The dependency graph of the desired state and its waves.
//!
//! Vertices are the objects cairn creates (sites, nodes, bonds, pools,
//! networks, security groups, images, volumes, VMs, FT secondaries,
//! protection plans); an edge `a → b` means `a` must exist before `b`.
//! Waves are the longest-path layers: everything in a wave depends only on
//! earlier waves, so a wave's actions can run in parallel; creates walk the
//! waves forward, deletes backward. Vertex ids are interned to integers while
//! the graph is built and sorted once at the end, so the output is
//! deterministic and independent of insertion order.

use std::collections::BTreeSet;

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

/// Interned vertex ids and deduplicated edges, in insertion order until
/// [`Interner::finish`] sorts them.
#[derive(Default)]
struct Interner {
    index: std::collections::HashMap<String, u32>,
    names: Vec<String>,
    edges: Vec<(u32, u32)>,
}

impl Interner {
    fn id(&mut self, name: String) -> u32 {
        if let Some(&i) = self.index.get(&name) {
            return i;
        }
        let i = u32::try_from(self.names.len()).expect("fewer than 2^32 graph vertices");
        self.names.push(name.clone());
        self.index.insert(name, i);
        i
    }

    fn edge(&mut self, from: String, to: String) {
        let (f, t) = (self.id(from), self.id(to));
        self.edges.push((f, t));
    }
}

/// Builds the graph of a model and its placement.
///
/// Vertex ids are interned to integers while the graph is built; ids are
/// sorted once at the end and every edge is renumbered by sorted rank, so
/// sorting the integer pairs orders edges exactly as sorting their
/// `(from, to)` strings would.
pub fn build_graph(model: &Model, placement: &Placement) -> Graph {
    let mut g = Interner::default();
    for site in &model.sites {
        let s = format!("site/{}", site.name);
        g.id(s.clone());
        for n in &site.nodes {
            let nid = format!("node/{}", n.name);
            g.edge(s.clone(), nid.clone());
            for b in &site.bonds {
                g.edge(nid.clone(), format!("bond/{}/{}", n.name, b.name));
            }
        }
        for p in &site.pools {
            g.edge(s.clone(), format!("pool/{}/{}", site.name, p.name));
        }
    }
    for t in &model.tenants {
        for net in &t.networks {
            let id = format!("network/{}/{}", t.name, net.name);
            g.edge(format!("site/{}", net.site), id);
        }
        for sg in &t.security_groups {
            let id = format!("security-group/{}/{}", t.name, sg.name);
            g.id(id.clone());
            for rule in &sg.allow {
                if t.networks.iter().any(|n| n.name == rule.from) {
                    g.edge(format!("network/{}/{}", t.name, rule.from), id.clone());
                }
            }
        }
    }
    for img in &model.images {
        g.id(format!("image/{}", img.name));
    }
    let placed: std::collections::HashMap<&str, &super::VmPlacement> =
        placement.vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let volumes: std::collections::HashMap<&str, &super::VolumePlacement> = placement
        .volumes
        .iter()
        .map(|v| (v.name.as_str(), v))
        .collect();
    for vm in &model.vms {
        let Some(p) = placed.get(vm.name.as_str()) else {
            continue;
        };
        let vid = format!("vm/{}", vm.name);
        g.edge(format!("node/{}", p.node), vid.clone());
        g.edge(format!("image/{}", vm.image), vid.clone());
        for d in &vm.disks {
            let vol = format!("volume/{}/{}", vm.name, d.name);
            g.edge(format!("pool/{}/{}", vm.site, d.pool), vol.clone());
            if let Some(vp) = volumes.get(format!("{}/{}", vm.name, d.name).as_str()) {
                let holders: BTreeSet<&str> = vp
                    .columns
                    .iter()
                    .flatten()
                    .filter_map(|c| c.split('/').next())
                    .collect();
                for h in holders {
                    g.edge(format!("node/{h}"), vol.clone());
                }
            }
            if d.from_image {
                g.edge(format!("image/{}", vm.image), vol.clone());
            }
            g.edge(vol, vid.clone());
        }
        for nic in &vm.nics {
            g.edge(
                format!("network/{}/{}", vm.tenant, nic.network),
                vid.clone(),
            );
            for sg in &nic.security_groups {
                g.edge(format!("security-group/{}/{}", vm.tenant, sg), vid.clone());
            }
        }
        if vm.availability == Availability::Ft
            && let Some(sec) = &p.secondary
        {
            let sid = format!("vm-secondary/{}", vm.name);
            g.edge(vid.clone(), sid.clone());
            g.edge(format!("node/{sec}"), sid);
        }
        for plan in &vm.protection_plans {
            g.edge(vid.clone(), format!("protection-plan/{plan}"));
        }
    }
    for plan in &model.protection_plans {
        let pid = format!("protection-plan/{}", plan.name);
        g.id(pid.clone());
        for r in &plan.replicate {
            g.edge(format!("pool/{}/{}", r.to_site, r.pool), pid.clone());
        }
    }
    g.finish()
}

impl Interner {
    /// Sorts vertices by id and edges by `(from, to)`, and layers the
    /// vertices into waves (longest path from a source, Kahn's order).
    fn finish(self) -> Graph {
        let Interner {
            index: _,
            names,
            mut edges,
        } = self;
        let n = names.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_unstable_by(|a, b| names[*a as usize].cmp(&names[*b as usize]));
        let mut rank = vec![0u32; n];
        for (r, &i) in order.iter().enumerate() {
            rank[i as usize] = r as u32;
        }
        for e in &mut edges {
            *e = (rank[e.0 as usize], rank[e.1 as usize]);
        }
        edges.sort_unstable();
        edges.dedup();
        // Longest-path layering. The graph is acyclic by construction (edges
        // follow kinds: site → node → … → vm → plan); a vertex left over by a
        // cycle would keep wave 0.
        let mut indegree = vec![0u32; n];
        let mut out_start = vec![0usize; n + 1];
        for &(f, t) in &edges {
            indegree[t as usize] += 1;
            out_start[f as usize + 1] += 1;
        }
        for i in 0..n {
            out_start[i + 1] += out_start[i];
        }
        // `edges` is sorted by `from`, so each vertex's out-edges are contiguous.
        let mut wave = vec![0usize; n];
        let mut ready: Vec<u32> = (0..n as u32)
            .filter(|v| indegree[*v as usize] == 0)
            .collect();
        while let Some(v) = ready.pop() {
            for &(_, t) in &edges[out_start[v as usize]..out_start[v as usize + 1]] {
                let t = t as usize;
                wave[t] = wave[t].max(wave[v as usize] + 1);
                indegree[t] -= 1;
                if indegree[t] == 0 {
                    ready.push(t as u32);
                }
            }
        }
        let mut sorted_names: Vec<String> = vec![String::new(); n];
        for (i, name) in names.into_iter().enumerate() {
            sorted_names[rank[i] as usize] = name;
        }
        let n_waves = wave.iter().max().map_or(0, |m| m + 1);
        let mut waves: Vec<Vec<String>> = vec![vec![]; n_waves];
        let nodes: Vec<GraphNode> = sorted_names
            .iter()
            .zip(&wave)
            .map(|(id, &w)| {
                waves[w].push(id.clone());
                GraphNode {
                    id: id.clone(),
                    kind: id.split('/').next().unwrap_or_default().to_owned(),
                    wave: w,
                }
            })
            .collect();
        let edges = edges
            .into_iter()
            .map(|(f, t)| GraphEdge {
                from: sorted_names[f as usize].clone(),
                to: sorted_names[t as usize].clone(),
            })
            .collect();
        Graph {
            format_version: 1,
            nodes,
            edges,
            waves,
        }
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
