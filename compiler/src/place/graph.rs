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
use crate::threads::join;

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

/// Vertex ids and edges, in insertion order until [`finish`] sorts them.
///
/// The vertices many VMs share (sites, nodes, pools, images, networks…) are
/// interned through `index`, before the VMs; a VM's own vertices (`vm/`,
/// `volume/`, `vm-secondary/`) are pushed without a lookup (see [`VmPart`]).
/// A name given two ids (two VMs of one name in a model with errors, a node
/// or image the model does not list) is one vertex once [`finish`] sorts the
/// names, so the graph is the same whichever way a vertex was added.
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
        format_into(&mut self.buf, args);
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

fn format_into(buf: &mut String, args: std::fmt::Arguments<'_>) {
    buf.clear();
    buf.write_fmt(args)
        .expect("formatting into a String cannot fail");
}

/// The vertices and edges the VMs of one slice of `model.vms` add: ids below
/// `shared` are the [`Interner`]'s, the others `shared + ` the place in
/// `names`.
struct VmPart<'g> {
    shared: u32,
    index: &'g FxHashMap<Arc<str>, u32>,
    /// The shared vertices by the names they are made of.
    by_key: &'g ByKey<'g>,
    names: Vec<Arc<str>>,
    edges: Vec<(u32, u32)>,
    buf: String,
}

impl VmPart<'_> {
    /// A vertex no other VM names: pushed, not looked up.
    fn own(&mut self, args: std::fmt::Arguments<'_>) -> u32 {
        format_into(&mut self.buf, args);
        self.push()
    }

    fn push(&mut self) -> u32 {
        let i = u32::try_from(self.names.len())
            .ok()
            .and_then(|i| i.checked_add(self.shared))
            .expect("fewer than 2^32 graph vertices");
        self.names.push(Arc::from(self.buf.as_str()));
        i
    }

    /// A vertex VMs share: the interned one, or pushed when the model does
    /// not list it.
    fn shared(&mut self, args: std::fmt::Arguments<'_>) -> u32 {
        format_into(&mut self.buf, args);
        match self.index.get(self.buf.as_str()) {
            Some(&i) => i,
            None => self.push(),
        }
    }

    /// A shared vertex: `found` by the model's names ([`ByKey`]), else by its
    /// id formatted from `args` (formatted only then).
    fn shared_or(&mut self, found: Option<&u32>, args: std::fmt::Arguments<'_>) -> u32 {
        match found {
            Some(&id) => id,
            None => self.shared(args),
        }
    }

    /// The vertex of node `name`.
    fn node(&mut self, name: &str) -> u32 {
        let by_key = self.by_key;
        self.shared_or(by_key.nodes.get(name), format_args!("node/{name}"))
    }

    fn edge(&mut self, from: u32, to: u32) {
        self.edges.push((from, to));
    }
}

/// The ids of the shared vertices a VM names, by the model's names they are
/// formatted from: a VM finds them without formatting its id. A name not
/// here is formatted and looked up in the [`Interner`]'s index, as before.
#[derive(Default)]
struct ByKey<'m> {
    nodes: FxHashMap<&'m str, u32>,
    images: FxHashMap<&'m str, u32>,
    /// (site, pool).
    pools: FxHashMap<(&'m str, &'m str), u32>,
    /// (tenant, network).
    networks: FxHashMap<(&'m str, &'m str), u32>,
    /// (tenant, security group).
    security_groups: FxHashMap<(&'m str, &'m str), u32>,
    plans: FxHashMap<&'m str, u32>,
}

/// From how many VMs [`build_graph`] adds the VMs' vertices on two threads.
const PARALLEL_FROM: usize = 512;

/// Builds the graph of a model and its placement.
///
/// Vertex ids are integers while the graph is built; ids are sorted once at
/// the end and every edge is renumbered by sorted rank, so sorting the
/// integer pairs orders edges exactly as sorting their `(from, to)` strings
/// would. With many VMs, the VMs' vertices and edges are added on two threads
/// (each half of `model.vms` on one), and the edges renumbered and the waves
/// found on two: the graph is the same.
pub fn build_graph(model: &Model, placement: &Placement) -> Graph {
    build_graph_in(
        model,
        placement,
        crate::threads::second() && model.vms.len() >= PARALLEL_FROM,
    )
}

fn build_graph_in(model: &Model, placement: &Placement, parallel: bool) -> Graph {
    let mut g = Interner::default();
    let mut by_key = ByKey::default();
    for site in &model.sites {
        let s = g.id(format_args!("site/{}", site.name));
        for n in &site.nodes {
            let nid = g.id(format_args!("node/{}", n.name));
            by_key.nodes.insert(&n.name, nid);
            g.edge(s, nid);
            for b in &site.bonds {
                let bid = g.id(format_args!("bond/{}/{}", n.name, b.name));
                g.edge(nid, bid);
            }
        }
        for p in &site.pools {
            let pid = g.id(format_args!("pool/{}/{}", site.name, p.name));
            by_key.pools.insert((&site.name, &p.name), pid);
            g.edge(s, pid);
        }
    }
    for t in &model.tenants {
        for net in &t.networks {
            let s = g.id(format_args!("site/{}", net.site));
            let id = g.id(format_args!("network/{}/{}", t.name, net.name));
            by_key.networks.insert((&t.name, &net.name), id);
            g.edge(s, id);
        }
        for sg in &t.security_groups {
            let id = g.id(format_args!("security-group/{}/{}", t.name, sg.name));
            by_key.security_groups.insert((&t.name, &sg.name), id);
            for rule in &sg.allow {
                if t.networks.iter().any(|n| n.name == rule.from) {
                    let net = g.id(format_args!("network/{}/{}", t.name, rule.from));
                    g.edge(net, id);
                }
            }
        }
    }
    for img in &model.images {
        let id = g.id(format_args!("image/{}", img.name));
        by_key.images.insert(&img.name, id);
    }
    for plan in &model.protection_plans {
        let pid = g.id(format_args!("protection-plan/{}", plan.name));
        by_key.plans.insert(&plan.name, pid);
        for r in &plan.replicate {
            let pool = g.id(format_args!("pool/{}/{}", r.to_site, r.pool));
            g.edge(pool, pid);
        }
    }
    let placed_by_name = || -> FxHashMap<&str, &super::VmPlacement> {
        placement.vms.iter().map(|v| (v.name.as_str(), v)).collect()
    };
    let volumes_by_name = || -> FxHashMap<(&str, &str), &super::VolumePlacement> {
        placement
            .volumes
            .iter()
            .filter_map(|v| Some((v.name.split_once('/')?, v)))
            .collect()
    };
    let (placed, volumes) = if parallel {
        std::thread::scope(|scope| {
            let volumes = scope.spawn(volumes_by_name);
            (placed_by_name(), join(volumes))
        })
    } else {
        (placed_by_name(), volumes_by_name())
    };
    let shared = u32::try_from(g.names.len()).expect("fewer than 2^32 graph vertices");
    let part = |vms: &[std::sync::Arc<crate::model::Vm>]| {
        let mut part = VmPart {
            shared,
            index: &g.index,
            by_key: &by_key,
            names: vec![],
            edges: vec![],
            buf: String::new(),
        };
        vm_vertices(&mut part, vms, &placed, &volumes);
        (part.names, part.edges)
    };
    let parts = if parallel {
        let (first, rest) = model.vms.split_at(model.vms.len() / 2);
        std::thread::scope(|scope| {
            let later = scope.spawn(|| part(rest));
            let first = part(first);
            vec![first, join(later)]
        })
    } else {
        vec![part(&model.vms)]
    };
    let Interner {
        index,
        mut names,
        mut edges,
        buf: _,
    } = g;
    drop(index);
    for (part_names, part_edges) in parts {
        // This part's own ids follow the names of the parts before it.
        let offset = u32::try_from(names.len()).expect("fewer than 2^32 graph vertices") - shared;
        let renumber = |i: u32| if i < shared { i } else { i + offset };
        edges.extend(
            part_edges
                .into_iter()
                .map(|(f, t)| (renumber(f), renumber(t))),
        );
        names.extend(part_names);
    }
    finish(names, edges, parallel)
}

/// Adds the vertices and edges of `vms` (the placed ones).
fn vm_vertices(
    g: &mut VmPart<'_>,
    vms: &[std::sync::Arc<crate::model::Vm>],
    placed: &FxHashMap<&str, &super::VmPlacement>,
    volumes: &FxHashMap<(&str, &str), &super::VolumePlacement>,
) {
    let mut holders: Vec<&str> = vec![];
    let by_key = g.by_key;
    for vm in vms {
        let Some(p) = placed.get(vm.name.as_str()) else {
            continue;
        };
        let vid = g.own(format_args!("vm/{}", vm.name));
        let node = g.node(&p.node);
        g.edge(node, vid);
        let image = g.shared_or(
            by_key.images.get(vm.image.as_str()),
            format_args!("image/{}", vm.image),
        );
        g.edge(image, vid);
        for d in &vm.disks {
            let vol = g.own(format_args!("volume/{}/{}", vm.name, d.name));
            let pool = g.shared_or(
                by_key.pools.get(&(vm.site.as_str(), d.pool.as_str())),
                format_args!("pool/{}/{}", vm.site, d.pool),
            );
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
                    let hid = g.node(h);
                    g.edge(hid, vol);
                }
            }
            if d.from_image {
                g.edge(image, vol);
            }
            g.edge(vol, vid);
        }
        for nic in &vm.nics {
            let net = g.shared_or(
                by_key
                    .networks
                    .get(&(vm.tenant.as_str(), nic.network.as_str())),
                format_args!("network/{}/{}", vm.tenant, nic.network),
            );
            g.edge(net, vid);
            for sg in &nic.security_groups {
                let sid = g.shared_or(
                    by_key
                        .security_groups
                        .get(&(vm.tenant.as_str(), sg.as_str())),
                    format_args!("security-group/{}/{}", vm.tenant, sg),
                );
                g.edge(sid, vid);
            }
        }
        if vm.availability == Availability::Ft
            && let Some(sec) = &p.secondary
        {
            let sid = g.own(format_args!("vm-secondary/{}", vm.name));
            g.edge(vid, sid);
            let snode = g.node(sec);
            g.edge(snode, sid);
        }
        for plan in &vm.protection_plans {
            let pid = g.shared_or(
                by_key.plans.get(plan.as_str()),
                format_args!("protection-plan/{plan}"),
            );
            g.edge(vid, pid);
        }
    }
}

/// Sorts vertices by id (one vertex per name) and edges by `(from, to)`,
/// and layers the vertices into waves (longest path from a source, Kahn's
/// order). With `parallel`, the edges are made and the waves found on two
/// threads.
fn finish(names: Vec<Arc<str>>, mut edges: Vec<(u32, u32)>, parallel: bool) -> Graph {
    let mut order: Vec<u32> =
        (0..u32::try_from(names.len()).expect("fewer than 2^32 graph vertices")).collect();
    let by_name = |a: &u32, b: &u32| names[*a as usize].cmp(&names[*b as usize]);
    if parallel {
        // Each half sorted on its own thread, then merged (the order of
        // equal names does not matter: they are one vertex).
        let (left, right) = order.split_at_mut(names.len() / 2);
        std::thread::scope(|scope| {
            let sorting = scope.spawn(|| right.sort_unstable_by(by_name));
            left.sort_unstable_by(by_name);
            join(sorting);
        });
        let (left, right) = order.split_at(names.len() / 2);
        let mut merged = Vec::with_capacity(order.len());
        let (mut l, mut r) = (0, 0);
        while l < left.len() && r < right.len() {
            if by_name(&right[r], &left[l]).is_lt() {
                merged.push(right[r]);
                r += 1;
            } else {
                merged.push(left[l]);
                l += 1;
            }
        }
        merged.extend_from_slice(&left[l..]);
        merged.extend_from_slice(&right[r..]);
        order = merged;
    } else {
        order.sort_unstable_by(by_name);
    }
    // Each name's rank among the distinct names.
    let mut rank = vec![0u32; names.len()];
    let mut sorted_names: Vec<Arc<str>> = Vec::with_capacity(names.len());
    for &i in &order {
        let name = &names[i as usize];
        if sorted_names.last().is_none_or(|last| last != name) {
            sorted_names.push(name.clone());
        }
        rank[i as usize] = (sorted_names.len() - 1) as u32;
    }
    drop(order);
    drop(names);
    for e in &mut edges {
        *e = (rank[e.0 as usize], rank[e.1 as usize]);
    }
    drop(rank);
    edges.sort_unstable();
    edges.dedup();
    let make_edges = || -> Vec<GraphEdge> {
        edges
            .iter()
            .map(|&(f, t)| GraphEdge {
                from: sorted_names[f as usize].clone(),
                to: sorted_names[t as usize].clone(),
            })
            .collect()
    };
    let make_nodes = || waves(&sorted_names, &edges);
    let (graph_edges, (nodes, waves)) = if parallel {
        std::thread::scope(|scope| {
            let later = scope.spawn(make_nodes);
            let graph_edges = make_edges();
            (graph_edges, join(later))
        })
    } else {
        (make_edges(), make_nodes())
    };
    Graph {
        format_version: 1,
        nodes,
        edges: graph_edges,
        waves,
    }
}

/// The vertices with their waves, and the ids of each wave: the longest path
/// to each vertex from a source, over `edges` (sorted, by sorted rank).
fn waves(sorted_names: &[Arc<str>], edges: &[(u32, u32)]) -> (Vec<GraphNode>, Vec<Vec<String>>) {
    // The graph is acyclic by construction (edges follow kinds: site → node
    // → … → vm → plan); a vertex left over by a cycle would keep wave 0.
    let n = sorted_names.len();
    let mut indegree = vec![0u32; n];
    let mut out_start = vec![0usize; n + 1];
    for &(f, t) in edges {
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
    (nodes, waves)
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

#[cfg(test)]
mod tests {
    use super::build_graph_in;
    use crate::place::{PlaceOptions, place};

    /// The VMs' vertices added on two threads give the graph of one thread,
    /// and a vertex added twice (an image no `image` declares, named by many
    /// VMs; a node only the placement names) is one vertex.
    #[test]
    fn two_threads_build_the_graph_one_thread_builds() {
        let files = crate::generate::generate(&crate::generate::GenConfig {
            nodes: 40,
            vms: 1_000,
            seed: 5,
        });
        let c = crate::compile(&crate::Sources::from_files(files));
        assert!(!c.has_errors(), "{:?}", c.diagnostics);
        let mut model = c.model;
        let mut placement = place(&model, &PlaceOptions::default(), None);
        let json = |g: &super::Graph| serde_json::to_string(g).expect("graphs serialize");
        assert_eq!(
            json(&build_graph_in(&model, &placement, true)),
            json(&build_graph_in(&model, &placement, false))
        );
        for vm in model.vms.iter_mut().step_by(3) {
            std::sync::Arc::make_mut(vm).image = "undeclared".to_owned();
        }
        for p in placement.vms.iter_mut().step_by(7) {
            p.node = "not-in-the-model".to_owned();
        }
        let one = build_graph_in(&model, &placement, false);
        let two = build_graph_in(&model, &placement, true);
        assert_eq!(json(&two), json(&one));
        for id in ["image/undeclared", "node/not-in-the-model"] {
            assert_eq!(one.nodes.iter().filter(|n| n.id == id).count(), 1, "{id}");
            let into = one.edges.iter().filter(|e| &*e.from == id).count();
            assert!(into > 100, "{id}: {into} edges");
        }
    }
}
