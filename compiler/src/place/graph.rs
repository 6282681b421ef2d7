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

use std::fmt::Write as _;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Placement;
use super::fasthash::FxHashMap;
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

// The ids are shared with the graph's other edges (a vertex has many): at
// 100,000 VMs the graph has about 2 million edges, and a `String` per end was
// most of `build_graph`'s time and memory. The JSON is the same. (A plain
// comment: doc comments reach the published JSON schema.)
/// An edge: `from` must exist before `to`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub struct GraphEdge {
    /// Dependency.
    pub from: Arc<str>,
    /// Dependent.
    pub to: Arc<str>,
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
    index: FxHashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
    edges: Vec<(u32, u32)>,
    /// Scratch for formatting an id: a lookup of a known id allocates nothing.
    buf: String,
}

impl Interner {
    /// The id of the vertex named by `args` (formatted into a reused buffer).
    fn id(&mut self, args: std::fmt::Arguments<'_>) -> u32 {
        self.buf.clear();
        self.buf
            .write_fmt(args)
            .expect("formatting into a String cannot fail");
        if let Some(&i) = self.index.get(self.buf.as_str()) {
            return i;
        }
        let i = u32::try_from(self.names.len()).expect("fewer than 2^32 graph vertices");
        let name: Arc<str> = Arc::from(self.buf.as_str());
        self.names.push(name.clone());
        self.index.insert(name, i);
        i
    }

    fn edge(&mut self, from: u32, to: u32) {
        self.edges.push((from, to));
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
        let s = g.id(format_args!("site/{}", site.name));
        for n in &site.nodes {
            let nid = g.id(format_args!("node/{}", n.name));
            g.edge(s, nid);
            for b in &site.bonds {
                let bid = g.id(format_args!("bond/{}/{}", n.name, b.name));
                g.edge(nid, bid);
            }
        }
        for p in &site.pools {
            let pid = g.id(format_args!("pool/{}/{}", site.name, p.name));
            g.edge(s, pid);
        }
    }
    for t in &model.tenants {
        for net in &t.networks {
            let s = g.id(format_args!("site/{}", net.site));
            let id = g.id(format_args!("network/{}/{}", t.name, net.name));
            g.edge(s, id);
        }
        for sg in &t.security_groups {
            let id = g.id(format_args!("security-group/{}/{}", t.name, sg.name));
            for rule in &sg.allow {
                if t.networks.iter().any(|n| n.name == rule.from) {
                    let net = g.id(format_args!("network/{}/{}", t.name, rule.from));
                    g.edge(net, id);
                }
            }
        }
    }
    for img in &model.images {
        g.id(format_args!("image/{}", img.name));
    }
    let placed: FxHashMap<&str, &super::VmPlacement> =
        placement.vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let volumes: FxHashMap<(&str, &str), &super::VolumePlacement> = placement
        .volumes
        .iter()
        .filter_map(|v| Some((v.name.split_once('/')?, v)))
        .collect();
    let mut holders: Vec<&str> = vec![];
    for vm in &model.vms {
        let Some(p) = placed.get(vm.name.as_str()) else {
            continue;
        };
        let vid = g.id(format_args!("vm/{}", vm.name));
        let node = g.id(format_args!("node/{}", p.node));
        g.edge(node, vid);
        let image = g.id(format_args!("image/{}", vm.image));
        g.edge(image, vid);
        for d in &vm.disks {
            let vol = g.id(format_args!("volume/{}/{}", vm.name, d.name));
            let pool = g.id(format_args!("pool/{}/{}", vm.site, d.pool));
            g.edge(pool, vol);
            if let Some(vp) = volumes.get(&(vm.name.as_str(), d.name.as_str())) {
                holders.clear();
                holders.extend(
                    vp.columns
                        .iter()
                        .flatten()
                        .filter_map(|c| c.split('/').next()),
                );
                holders.sort_unstable();
                holders.dedup();
                for h in &holders {
                    let hid = g.id(format_args!("node/{h}"));
                    g.edge(hid, vol);
                }
            }
            if d.from_image {
                g.edge(image, vol);
            }
            g.edge(vol, vid);
        }
        for nic in &vm.nics {
            let net = g.id(format_args!("network/{}/{}", vm.tenant, nic.network));
            g.edge(net, vid);
            for sg in &nic.security_groups {
                let sid = g.id(format_args!("security-group/{}/{}", vm.tenant, sg));
                g.edge(sid, vid);
            }
        }
        if vm.availability == Availability::Ft
            && let Some(sec) = &p.secondary
        {
            let sid = g.id(format_args!("vm-secondary/{}", vm.name));
            g.edge(vid, sid);
            let snode = g.id(format_args!("node/{sec}"));
            g.edge(snode, sid);
        }
        for plan in &vm.protection_plans {
            let pid = g.id(format_args!("protection-plan/{plan}"));
            g.edge(vid, pid);
        }
    }
    for plan in &model.protection_plans {
        let pid = g.id(format_args!("protection-plan/{}", plan.name));
        for r in &plan.replicate {
            let pool = g.id(format_args!("pool/{}/{}", r.to_site, r.pool));
            g.edge(pool, pid);
        }
    }
    g.finish()
}

impl Interner {
    /// Sorts vertices by id and edges by `(from, to)`, and layers the
    /// vertices into waves (longest path from a source, Kahn's order).
    fn finish(self) -> Graph {
        let Interner {
            index,
            names,
            mut edges,
            buf: _,
        } = self;
        drop(index);
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
        let sorted_names: Vec<Arc<str>> =
            order.iter().map(|&i| names[i as usize].clone()).collect();
        drop(names);
        let n_waves = wave.iter().max().map_or(0, |m| m + 1);
        let mut waves: Vec<Vec<String>> = vec![vec![]; n_waves];
        let nodes: Vec<GraphNode> = sorted_names
            .iter()
            .zip(&wave)
            .map(|(id, &w)| {
                waves[w].push(id.to_string());
                GraphNode {
                    id: id.to_string(),
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
