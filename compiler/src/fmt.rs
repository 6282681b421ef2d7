//! Canonical formatting of spec files (`cairn fmt`).
//!
//! Keeps comments and node order; normalizes indentation (four spaces),
//! spacing and quoting, and puts each node's properties in the canonical order
//! of [`crate::shape`] (known properties in table order, then unknown ones by
//! name). Formatting is idempotent: formatting formatted text changes nothing.

use kdl::{KdlDocument, KdlNode};

use crate::diag::Diagnostic;
use crate::shape::{child_path, shape};
use crate::source::FileId;

/// Formats one file. Returns the diagnostics of a syntax error instead of
/// touching a file that does not parse.
pub fn format_text(file: FileId, text: &str) -> Result<String, Vec<Diagnostic>> {
    let mut diags = vec![];
    let Some(mut doc) = crate::lower::parse(file, text, &mut diags) else {
        return Err(diags);
    };
    reorder(&mut doc, "");
    doc.autoformat();
    let mut out = doc.to_string();
    // One trailing newline, no leading blank lines.
    while out.ends_with("\n\n") {
        out.pop();
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

fn reorder(doc: &mut KdlDocument, parent: &str) {
    for node in doc.nodes_mut() {
        let path = child_path(parent, node.name().value());
        reorder_entries(node, &path);
        if let Some(children) = node.children_mut() {
            reorder(children, &path);
        }
    }
}

fn reorder_entries(node: &mut KdlNode, path: &str) {
    let order: &[&str] = shape(path).and_then(|s| s.props).unwrap_or(&[]);
    let rank = |e: &kdl::KdlEntry| -> (u8, usize, String) {
        match e.name() {
            None => (0, 0, String::new()),
            Some(k) => match order.iter().position(|p| *p == k.value()) {
                Some(i) => (1, i, String::new()),
                None => (2, 0, k.value().to_owned()),
            },
        }
    };
    // Positional arguments keep their relative order (the sort is stable).
    node.entries_mut().sort_by_key(|a| rank(a));
}
