//! The dependency graph of the applied commit as an SVG, laid out on the
//! server: one column per wave (everything in a column can be made at once),
//! vertices in id order down each column, an edge as a cubic curve from the
//! right of a dependency to the left of its dependent. Built as a string with
//! every text escaped (the SVG is inlined into the page).

use std::collections::HashMap;
use std::fmt::Write as _;

use compiler::place::Graph;

const COLUMN: usize = 230;
const ROW: usize = 24;
const BOX_W: usize = 200;
const BOX_H: usize = 18;
const MARGIN: usize = 10;

/// Above this many vertices, each wave's vertices are drawn as one box per
/// kind with its count (a page stays small; `cairn graph` has every vertex).
pub const MAX_VERTICES: usize = 1500;

/// The SVG of `graph`.
pub fn svg(graph: &Graph) -> String {
    if graph.nodes.len() > MAX_VERTICES {
        return svg(&by_kind(graph));
    }
    let mut position: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut rows = 0;
    for (wave, ids) in graph.waves.iter().enumerate() {
        for (row, id) in ids.iter().enumerate() {
            position.insert(id.as_str(), (wave, row));
        }
        rows = rows.max(ids.len());
    }
    let width = MARGIN * 2 + graph.waves.len().max(1) * COLUMN;
    let height = MARGIN * 2 + (rows.max(1) + 1) * ROW;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-labelledby="graph-title"><title id="graph-title">Dependency graph: {} objects, {} waves</title>"#,
        graph.nodes.len(),
        graph.waves.len()
    );
    for wave in 0..graph.waves.len() {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}">wave {wave}</text>"#,
            MARGIN + wave * COLUMN,
            MARGIN + 12
        );
    }
    let xy = |(wave, row): (usize, usize)| (MARGIN + wave * COLUMN, MARGIN + (row + 1) * ROW);
    for e in &graph.edges {
        let (Some(&from), Some(&to)) = (position.get(&*e.from), position.get(&*e.to)) else {
            continue;
        };
        let ((fx, fy), (tx, ty)) = (xy(from), xy(to));
        let (x1, y1, x2, y2) = (fx + BOX_W, fy + BOX_H / 2, tx, ty + BOX_H / 2);
        let mid = (x1 + x2) / 2;
        let _ = write!(
            out,
            r#"<path class="edge" d="M{x1} {y1} C{mid} {y1} {mid} {y2} {x2} {y2}"><title>{} → {}</title></path>"#,
            escape(&e.from),
            escape(&e.to)
        );
    }
    for n in &graph.nodes {
        let Some(&p) = position.get(n.id.as_str()) else {
            continue;
        };
        let (x, y) = xy(p);
        let label = if n.id.len() > 32 {
            format!("{}…", n.id.chars().take(31).collect::<String>())
        } else {
            n.id.clone()
        };
        let link = n.id.strip_prefix("vm/").map(super::data::vm_path);
        if let Some(href) = &link {
            let _ = write!(out, r#"<a href="{}">"#, escape(href));
        }
        let _ = write!(
            out,
            r#"<g class="k-{}"><title>{} (wave {})</title><rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="3"/><text x="{}" y="{}">{}</text></g>"#,
            escape(&n.kind),
            escape(&n.id),
            n.wave,
            x + 4,
            y + 13,
            escape(&label)
        );
        if link.is_some() {
            out.push_str("</a>");
        }
    }
    out.push_str("</svg>");
    out
}

/// The graph of kinds: one vertex `KIND ×N` per wave and kind, an edge
/// where any of their vertices had one.
fn by_kind(graph: &Graph) -> Graph {
    use std::collections::{BTreeMap, BTreeSet};
    let mut count: BTreeMap<(usize, &str), usize> = BTreeMap::new();
    let mut group: HashMap<&str, (usize, &str)> = HashMap::new();
    for n in &graph.nodes {
        *count.entry((n.wave, n.kind.as_str())).or_default() += 1;
        group.insert(n.id.as_str(), (n.wave, n.kind.as_str()));
    }
    let id =
        |(wave, kind): (usize, &str)| format!("{kind} ×{} (wave {wave})", count[&(wave, kind)]);
    let mut waves = vec![vec![]; graph.waves.len()];
    let mut nodes = vec![];
    for &(wave, kind) in count.keys() {
        waves[wave].push(id((wave, kind)));
        nodes.push(compiler::place::GraphNode {
            id: id((wave, kind)),
            kind: kind.to_owned(),
            wave,
        });
    }
    let edges: BTreeSet<(String, String)> = graph
        .edges
        .iter()
        .filter_map(|e| Some((id(*group.get(&*e.from)?), id(*group.get(&*e.to)?))))
        .collect();
    Graph {
        format_version: graph.format_version,
        nodes,
        edges: edges
            .into_iter()
            .map(|(from, to)| compiler::place::GraphEdge {
                from: from.into(),
                to: to.into(),
            })
            .collect(),
        waves,
    }
}

/// Escapes text and attribute values for XML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use compiler::place::{GraphEdge, GraphNode};

    #[test]
    fn every_vertex_is_drawn_in_its_wave_and_names_are_escaped() {
        let g = Graph {
            format_version: 1,
            nodes: vec![
                GraphNode {
                    id: "site/<b>".into(),
                    kind: "site".into(),
                    wave: 0,
                },
                GraphNode {
                    id: "vm/web-0".into(),
                    kind: "vm".into(),
                    wave: 1,
                },
            ],
            edges: vec![GraphEdge {
                from: "site/<b>".into(),
                to: "vm/web-0".into(),
            }],
            waves: vec![vec!["site/<b>".into()], vec!["vm/web-0".into()]],
        };
        let s = svg(&g);
        assert!(s.contains("site/&lt;b&gt;") && !s.contains("<b>"), "{s}");
        assert!(s.contains(r#"<a href="/vms/web-0">"#), "{s}");
        assert_eq!(s.matches("<rect").count(), 2);
        assert_eq!(s.matches(r#"class="edge""#).count(), 1);
    }
}
