//! Canonical formatting of spec files (`cairn fmt`).
//!
//! The formatter re-emits the parsed document itself instead of using kdl's
//! `autoformat` (which drops end-of-line comments and unquotes strings):
//! four-space indentation, one space between entries, properties in the
//! canonical order of [`crate::shape`] (known properties in table order, then
//! unknown ones by name), values exactly as written (`"32GiB"`, `0.20`,
//! `#true`), every comment kept (end-of-line comments stay at the end of
//! their line), at most one blank line in a row, none at the start or end of
//! a block. Formatting is idempotent: formatting formatted text changes
//! nothing.

use kdl::{KdlDocument, KdlEntry, KdlIdentifier, KdlNode};

use crate::diag::Diagnostic;
use crate::shape::{child_path, shape};
use crate::source::FileId;

const INDENT: &str = "    ";

/// Formats one file. Returns the diagnostics of a syntax error instead of
/// touching a file that does not parse.
pub fn format_text(file: FileId, text: &str) -> Result<String, Vec<Diagnostic>> {
    let mut diags = vec![];
    let Some(doc) = crate::lower::parse(file, text, &mut diags) else {
        return Err(diags);
    };
    let mut lines = Lines::default();
    if let Some(f) = doc.format() {
        lines.trivia(&f.leading, 0, false);
    }
    document(&doc, "", 0, &mut lines);
    if let Some(f) = doc.format() {
        lines.trivia(&f.trailing, 0, false);
    }
    Ok(lines.finish())
}

/// Output lines with blank-line normalization.
#[derive(Default)]
struct Lines {
    out: Vec<String>,
}

impl Lines {
    fn blank(&mut self) {
        // No blank line at the start of the file or a block, never two in a row.
        match self.out.last() {
            None => {}
            Some(l) if l.is_empty() || l.trim_end().ends_with('{') => {}
            Some(_) => self.out.push(String::new()),
        }
    }

    fn line(&mut self, depth: usize, text: &str) {
        self.out.push(format!("{}{}", INDENT.repeat(depth), text));
    }

    fn close(&mut self, depth: usize) {
        while self.out.last().is_some_and(String::is_empty) {
            self.out.pop();
        }
        self.line(depth, "}");
    }

    /// Whitespace and comments between nodes: comments on their own lines,
    /// re-indented; runs of blank lines become one. The text starts at the
    /// beginning of a line, except after `{`, where `attach_first` puts a
    /// comment of that first line back on the `{` line.
    fn trivia(&mut self, text: &str, depth: usize, attach_first: bool) {
        let segments: Vec<&str> = text.split('\n').collect();
        let last = segments.len() - 1;
        for (i, raw) in segments.iter().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                // A complete empty line is a blank line; the last segment is
                // only the indentation of what follows.
                if i < last {
                    self.blank();
                }
                continue;
            }
            if i == 0
                && attach_first
                && let Some(prev) = self.out.last_mut()
            {
                prev.push(' ');
                prev.push_str(line);
                continue;
            }
            self.line(depth, line);
        }
    }

    fn finish(mut self) -> String {
        while self.out.last().is_some_and(String::is_empty) {
            self.out.pop();
        }
        let mut s = self.out.join("\n");
        s.push('\n');
        s
    }
}

fn ident(i: &KdlIdentifier) -> String {
    i.repr().map_or_else(|| i.value().to_owned(), str::to_owned)
}

/// The comments in a piece of whitespace-and-comment text, on one line.
fn inline_comments(text: &str) -> Option<String> {
    let parts: Vec<&str> = text
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != ";")
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

fn entry(e: &KdlEntry) -> String {
    let mut s = String::new();
    if let Some(c) = e.format().and_then(|f| inline_comments(&f.leading)) {
        s.push_str(&c);
        s.push(' ');
    }
    if let Some(name) = e.name() {
        s.push_str(&ident(name));
        s.push('=');
    }
    if let Some(ty) = e.ty() {
        s.push_str(&format!("({})", ident(ty)));
    }
    match e.format() {
        Some(f) if !f.value_repr.is_empty() => s.push_str(&f.value_repr),
        _ => s.push_str(&e.value().to_string()),
    }
    if let Some(c) = e.format().and_then(|f| inline_comments(&f.trailing)) {
        s.push(' ');
        s.push_str(&c);
    }
    s
}

fn document(doc: &KdlDocument, parent: &str, depth: usize, lines: &mut Lines) {
    for (i, n) in doc.nodes().iter().enumerate() {
        let path = child_path(parent, n.name().value());
        node(n, &path, depth, i == 0 && depth > 0, lines);
    }
}

fn node(n: &KdlNode, path: &str, depth: usize, first_in_block: bool, lines: &mut Lines) {
    let f = n.format();
    if let Some(f) = f {
        lines.trivia(&f.leading, depth, first_in_block);
    }
    let mut head = String::new();
    if let Some(ty) = n.ty() {
        head.push_str(&format!("({})", ident(ty)));
    }
    head.push_str(&ident(n.name()));
    let mut entries: Vec<&KdlEntry> = n.entries().iter().collect();
    let order: &[&str] = shape(path).and_then(|s| s.props).unwrap_or(&[]);
    // Positional arguments keep their relative order (the sort is stable).
    entries.sort_by_key(|e| match e.name() {
        None => (0, 0, String::new()),
        Some(k) => match order.iter().position(|p| *p == k.value()) {
            Some(i) => (1, i, String::new()),
            None => (2, 0, k.value().to_owned()),
        },
    });
    for e in entries {
        head.push(' ');
        head.push_str(&entry(e));
    }
    let mut trailing_comment = vec![];
    if let Some(f) = f {
        trailing_comment.extend(inline_comments(&f.before_children));
        trailing_comment.extend(inline_comments(&f.before_terminator));
        trailing_comment.extend(inline_comments(&f.terminator));
    }
    let children = n.children().filter(|c| {
        !c.nodes().is_empty()
            || c.format()
                .is_some_and(|cf| inline_comments(&cf.trailing).is_some())
    });
    match children {
        None => {
            for c in &trailing_comment {
                head.push(' ');
                head.push_str(c);
            }
            lines.line(depth, &head);
        }
        Some(c) => {
            head.push_str(" {");
            // Comments written before `{` or after `}` stay on the opening line.
            for t in &trailing_comment {
                head.push(' ');
                head.push_str(t);
            }
            lines.line(depth, &head);
            if let Some(cf) = c.format() {
                lines.trivia(&cf.leading, depth + 1, true);
            }
            document(c, path, depth + 1, lines);
            if let Some(cf) = c.format() {
                lines.trivia(&cf.trailing, depth + 1, c.nodes().is_empty());
            }
            lines.close(depth);
        }
    }
    if let Some(f) = f {
        lines.trivia(&f.trailing, depth, false);
    }
}
