//! Canonical formatting of spec files (`cairn fmt`).
//!
//! The formatter re-emits the parsed document itself instead of using kdl's
//! `autoformat` (which drops end-of-line comments and unquotes strings):
//! four-space indentation, one node per line, one space between entries,
//! properties in the canonical order of [`crate::shape`] (known properties
//! in table order, then unknown ones by name), values exactly as written
//! (`"32GiB"`, `0.20`, `#true`), every comment kept, at most one blank line in
//! a row, none at the start or end of a block. The spaces before an
//! end-of-line comment are kept as written, so comments aligned in a column
//! stay aligned.
//!
//! Invariants (tested against every valid input of the KDL test suite in
//! `compiler/tests/it/fmt.rs`): the output parses to the same document
//! (names, entries, values, type annotations, children), and formatting
//! formatted text changes nothing.
//!
//! The text between the tokens of a node line — spaces, `/* */` comments,
//! line continuations (`\`, optionally followed by a `//` comment), and
//! slashdashed (`/-`) entries and child blocks — is read with a small lexer
//! ([`inline_trivia`]) instead of being joined onto one line: a `//` comment
//! ends its line, so nothing may be placed after it. A continuation without
//! a comment is joined; one with a comment keeps its line break (the comment
//! stays on its line, the rest continues one level deeper); slashdashed text
//! is kept verbatim. Anything the lexer does not know keeps the node's
//! original text, which is always safe.

use kdl::{KdlDocument, KdlEntry, KdlIdentifier, KdlNode};

use crate::diag::Diagnostic;
use crate::shape::{child_path, shape};
use crate::source::FileId;

const INDENT: &str = "    ";
const BOM: char = '\u{feff}';

/// Formats one file. Returns the diagnostics of a syntax error instead of
/// touching a file that does not parse.
pub fn format_text(file: FileId, text: &str) -> Result<String, Vec<Diagnostic>> {
    let mut diags = vec![];
    let Some(doc) = crate::lower::parse(file, text, &mut diags) else {
        return Err(diags);
    };
    // Text without a final newline is formatted with one: the same document
    // (a continuation or a `//` comment ends at a newline as at the end of
    // the file), and so what ends a slashdashed region is the same on every
    // pass.
    if !text.is_empty() && !text.ends_with(is_newline) {
        let with_newline = format!("{text}\n");
        if let Some(doc) = crate::lower::parse(file, &with_newline, &mut vec![]) {
            return Ok(format_document(&with_newline, &doc));
        }
    }
    Ok(format_document(text, &doc))
}

fn format_document(text: &str, doc: &KdlDocument) -> String {
    let mut f = Formatter {
        text,
        lines: Lines::default(),
    };
    if let Some(df) = doc.format() {
        // A byte-order mark is kept at the start of the file, outside the
        // trivia (as trivia it would become a line of its own).
        f.lines
            .trivia(df.leading.trim_start_matches(BOM), 0, Attach::No);
    }
    f.document(doc, "", 0);
    if let Some(df) = doc.format() {
        let attach = f.attach_after(doc.nodes().last(), false);
        f.lines.trivia(&df.trailing, 0, attach);
    }
    let mut out = f.lines.finish();
    if text.starts_with(BOM) {
        out.insert(0, BOM);
    }
    out
}

// ---- output lines -----------------------------------------------------------

/// One output line. A value, a `/* */` comment, a continuation or verbatim
/// text can make it span several physical lines.
struct Line {
    text: String,
    /// Opens a block (`{`): no blank line may follow.
    open: bool,
    /// Its last physical line may end in a `//` comment, so nothing may be
    /// appended to it.
    comment: bool,
}

/// What of the text between nodes that starts on the line before may go
/// back on it (when that line does not end in a `//` comment).
#[derive(Clone, Copy)]
enum Attach {
    /// The text starts on a line of its own.
    No,
    /// The text follows `{`: anything.
    Any,
    /// The text follows a `;` that ended a node, which the formatter drops:
    /// only a `//` comment (text that could continue the node may not).
    LineComment,
}

/// Output lines with blank-line normalization.
#[derive(Default)]
struct Lines {
    out: Vec<Line>,
}

impl Lines {
    fn blank(&mut self) {
        // No blank line at the start of the file or a block, never two in a row.
        match self.out.last() {
            None => {}
            Some(l) if l.text.is_empty() || l.open => {}
            Some(_) => self.out.push(Line {
                text: String::new(),
                open: false,
                comment: false,
            }),
        }
    }

    fn push(&mut self, depth: usize, text: &str, open: bool, comment: bool) {
        self.out.push(Line {
            text: format!("{}{}", INDENT.repeat(depth), text),
            open,
            comment,
        });
    }

    fn close(&mut self, depth: usize, text: &str, comment: bool) {
        while self.out.last().is_some_and(|l| l.text.is_empty()) {
            self.out.pop();
        }
        self.push(depth, text, false, comment);
    }

    /// Whitespace, comments and slashdashed nodes between nodes: each line
    /// trimmed and re-indented (only the indentation of lines changes, which
    /// means nothing outside strings, and strings here are commented out);
    /// runs of blank lines become one. The text starts at the beginning of a
    /// line unless `attach` says what may go back on the line before.
    fn trivia(&mut self, text: &str, depth: usize, attach: Attach) {
        let text = normalize_newlines(text);
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
            let attachable = match attach {
                Attach::No => false,
                Attach::Any => true,
                Attach::LineComment => line.starts_with("//"),
            };
            if i == 0
                && attachable
                && let Some(prev) = self.out.last_mut()
                && !prev.comment
            {
                if !prev.text.ends_with(is_newline) {
                    prev.text
                        .push_str(gap_before(raw, raw.len() - raw.trim_start().len()));
                }
                prev.text.push_str(line);
                prev.comment = true;
                continue;
            }
            // The line may end in a `//` comment.
            self.push(depth, line, false, true);
        }
    }

    fn finish(mut self) -> String {
        while self.out.last().is_some_and(|l| l.text.is_empty()) {
            self.out.pop();
        }
        let mut s = self
            .out
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        s.push('\n');
        s
    }
}

// ---- the lexer for text inside a node line ---------------------------------

/// KDL's `unicode-space`.
fn is_space(c: char) -> bool {
    matches!(
        c,
        '\u{0009}' | '\u{0020}' | '\u{00A0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200A}' | '\u{202F}' | '\u{205F}' | '\u{3000}'
    )
}

/// The spaces that end `text[..at]` when they are plain spaces (kept before
/// an end-of-line comment), else one space.
fn gap_before(text: &str, at: usize) -> &str {
    let before = &text[..at];
    let gap = &before[before.trim_end_matches(is_space).len()..];
    if !gap.is_empty() && gap.bytes().all(|b| b == b' ') {
        gap
    } else {
        " "
    }
}

/// KDL's newlines other than CRLF (which starts with `\r`).
fn is_newline(c: char) -> bool {
    matches!(
        c,
        '\r' | '\n' | '\u{0085}' | '\u{000B}' | '\u{000C}' | '\u{2028}' | '\u{2029}'
    )
}

/// The length of the newline `s` starts with.
fn newline_len(s: &str) -> Option<usize> {
    if s.starts_with("\r\n") {
        return Some(2);
    }
    let c = s.chars().next()?;
    is_newline(c).then(|| c.len_utf8())
}

/// Every KDL newline written as `\n` (outside values only: a newline means
/// the same whichever is written, and in comments it does not matter).
fn normalize_newlines(text: &str) -> String {
    text.replace("\r\n", "\n").replace(is_newline, "\n")
}

/// The length of the `/* */` comment (they nest) `s` starts with.
fn block_comment_len(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    let bytes = s.as_bytes();
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth = depth.checked_sub(1)?;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The `//` comment `s` starts with, without its newline, and the length of
/// the comment with its newline.
fn line_comment(s: &str) -> Option<(&str, usize)> {
    if !s.starts_with("//") {
        return None;
    }
    let end = s.find(is_newline).unwrap_or(s.len());
    let newline = newline_len(&s[end..]).unwrap_or(0);
    Some((s[..end].trim_end(), end + newline))
}

/// A piece of the text between the tokens of a node line.
#[derive(Debug)]
enum Trivia<'t> {
    /// A `/* */` comment, verbatim (it may span lines).
    Comment(&'t str),
    /// A line continuation `\`, with the `//` comment after it.
    Continuation(Option<&'t str>),
    /// A slashdash (`/-`) and everything after it in this piece of text,
    /// verbatim: commented-out entries or child blocks, whose end only a
    /// full parser finds.
    Slashdash(&'t str),
}

/// Lexes KDL `node-space` text (and what kdl-rs keeps with it: slashdashed
/// entries and child blocks). `None` for anything else, so the caller keeps
/// the original text.
fn inline_trivia(s: &str) -> Option<Vec<Trivia<'_>>> {
    let mut out = vec![];
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(is_space);
        if rest.is_empty() {
            return Some(out);
        }
        if rest.starts_with("/-") {
            out.push(Trivia::Slashdash(rest.trim_end_matches(is_space)));
            return Some(out);
        }
        if rest.starts_with("/*") {
            let n = block_comment_len(rest)?;
            out.push(Trivia::Comment(&rest[..n]));
            rest = &rest[n..];
            continue;
        }
        let mut after = rest.strip_prefix('\\')?;
        // `escline := '\\' ws* (single-line-comment | newline | eof)`
        loop {
            after = after.trim_start_matches(is_space);
            if !after.starts_with("/*") {
                break;
            }
            let n = block_comment_len(after)?;
            out.push(Trivia::Comment(&after[..n]));
            after = &after[n..];
        }
        if let Some((comment, n)) = line_comment(after) {
            out.push(Trivia::Continuation(Some(comment)));
            rest = &after[n..];
        } else if let Some(n) = newline_len(after) {
            out.push(Trivia::Continuation(None));
            rest = &after[n..];
        } else if after.is_empty() {
            return Some(out);
        } else {
            return None;
        }
    }
}

/// Builds one output line from words and trivia.
struct LineWriter {
    text: String,
    /// The indentation of continuation lines.
    continuation: String,
    at_line_start: bool,
    /// `//` comments for the end of the line, each with the spaces to
    /// write before it.
    end_comments: Vec<(String, String)>,
}

impl LineWriter {
    fn new(depth: usize, first: &str) -> LineWriter {
        LineWriter {
            text: first.to_owned(),
            continuation: INDENT.repeat(depth + 1),
            at_line_start: false,
            end_comments: vec![],
        }
    }

    fn word(&mut self, w: &str) {
        if !self.at_line_start {
            self.text.push(' ');
        }
        self.text.push_str(w);
        self.at_line_start = false;
        if w.ends_with(is_newline) {
            self.new_line();
        }
    }

    fn new_line(&mut self) {
        self.text.push_str(&self.continuation);
        self.at_line_start = true;
    }

    /// Trivia before a word: a continuation with a comment keeps its line
    /// break; one without is joined.
    fn before_word(&mut self, trivia: &[Trivia<'_>]) {
        for t in trivia {
            match t {
                Trivia::Comment(c) | Trivia::Slashdash(c) => self.word(c),
                Trivia::Continuation(None) => {}
                Trivia::Continuation(Some(c)) => {
                    self.word("\\");
                    self.word(c);
                    self.text.push('\n');
                    self.new_line();
                }
            }
        }
    }

    /// Trivia at the end of the line (before `{` or the node's end): the
    /// comment of a continuation becomes an end-of-line comment, since no
    /// entry follows it.
    fn at_end(&mut self, trivia: &[Trivia<'_>]) {
        for t in trivia {
            match t {
                Trivia::Comment(c) | Trivia::Slashdash(c) => self.word(c),
                Trivia::Continuation(None) => {}
                Trivia::Continuation(Some(c)) => {
                    self.end_comments.push((" ".to_owned(), (*c).to_owned()));
                }
            }
        }
    }

    /// The line, and whether it ends in a `//` comment.
    fn finish(mut self) -> (String, bool) {
        if self.at_line_start {
            // Verbatim text ended with a newline: no indentation on the
            // (then empty) line after it.
            let trimmed = self.text.trim_end_matches(' ').len();
            self.text.truncate(trimmed);
        }
        let comment = !self.end_comments.is_empty();
        for (i, (gap, c)) in self.end_comments.iter().enumerate() {
            if !self.text.ends_with(is_newline) {
                self.text.push_str(if i == 0 { gap } else { " " });
            }
            self.text.push_str(c);
        }
        (self.text, comment)
    }
}

// ---- nodes --------------------------------------------------------------------

fn ident(i: &KdlIdentifier) -> String {
    i.repr().map_or_else(|| i.value().to_owned(), str::to_owned)
}

fn only_spaces(s: &str) -> bool {
    s.chars().all(is_space)
}

fn end(span: miette::SourceSpan) -> usize {
    span.offset() + span.len()
}

/// The length of the node terminator `s` starts with (`;`, a newline, a
/// `//` comment with its newline; nothing before `}` or at the end).
fn terminator_len(s: &str) -> usize {
    if s.starts_with(';') {
        return 1;
    }
    if let Some((_, n)) = line_comment(s) {
        return n;
    }
    newline_len(s).unwrap_or(0)
}

struct Formatter<'t> {
    text: &'t str,
    lines: Lines,
}

impl Formatter<'_> {
    fn document(&mut self, doc: &KdlDocument, parent: &str, depth: usize) {
        let mut previous = None;
        for n in doc.nodes() {
            let path = child_path(parent, n.name().value());
            let attach = self.attach_after(previous, depth > 0);
            self.node(n, &path, depth, attach);
            previous = Some(n);
        }
    }

    /// How the text after `previous` (or after `{` when it is the first
    /// thing in a block) may attach to the line before.
    fn attach_after(&self, previous: Option<&KdlNode>, in_block: bool) -> Attach {
        match previous {
            None if in_block => Attach::Any,
            None => Attach::No,
            Some(p)
                if self
                    .text
                    .get(end(p.span())..)
                    .is_some_and(|t| t.starts_with(';')) =>
            {
                Attach::LineComment
            }
            Some(_) => Attach::No,
        }
    }

    fn node(&mut self, n: &KdlNode, path: &str, depth: usize, attach: Attach) {
        if let Some(f) = n.format() {
            self.lines.trivia(&f.leading, depth, attach);
        }
        if self.canonical_node(n, path, depth).is_none() {
            self.verbatim_node(n, depth);
        }
    }

    /// The `//` comment ending a node, with the spaces before it (kdl-rs
    /// does not keep it when the node has children and a space comes before
    /// it).
    fn terminator_comment(&self, n: &KdlNode) -> Option<(String, String)> {
        let at = end(n.span());
        let (comment, _) = line_comment(self.text.get(at..)?)?;
        Some((gap_before(self.text, at).to_owned(), comment.to_owned()))
    }

    /// The node's type annotation and name.
    fn node_name(&self, n: &KdlNode) -> Option<String> {
        let Some(ty) = n.ty() else {
            return Some(ident(n.name()));
        };
        let f = n.format()?;
        if only_spaces(&f.before_ty_name)
            && only_spaces(&f.after_ty_name)
            && only_spaces(&f.after_ty)
        {
            return Some(format!("({}){}", ident(ty), ident(n.name())));
        }
        // Comments or continuations inside: as written.
        let start = n.span().offset();
        Some(self.text.get(start..end(n.name().span()))?.to_owned())
    }

    fn entry(&self, e: &KdlEntry) -> Option<String> {
        let f = e.format()?;
        let canonical = [
            &f.after_key,
            &f.after_eq,
            &f.after_ty,
            &f.before_ty_name,
            &f.after_ty_name,
        ]
        .iter()
        .all(|s| only_spaces(s));
        if !canonical {
            return Some(self.text.get(e.span().offset()..end(e.span()))?.to_owned());
        }
        let mut s = String::new();
        if let Some(name) = e.name() {
            s.push_str(&ident(name));
            s.push('=');
        }
        if let Some(ty) = e.ty() {
            s.push_str(&format!("({})", ident(ty)));
        }
        if f.value_repr.is_empty() {
            s.push_str(&e.value().to_string());
        } else {
            s.push_str(&f.value_repr);
        }
        Some(s)
    }

    /// Where the children block opened at `open` closes, from what kdl-rs
    /// recorded (checked against the text).
    fn close_brace(&self, children: &KdlDocument, open: usize) -> Option<usize> {
        let f = children.format()?;
        let mut p = match children.nodes().last() {
            Some(last) => {
                let e = end(last.span());
                e + terminator_len(self.text.get(e..)?)
            }
            None => {
                let p = open + 1 + f.leading.len();
                p + usize::from(self.text.get(p..)?.starts_with(';'))
            }
        };
        p += f.trailing.len();
        self.text.get(p..)?.starts_with('}').then_some(p)
    }

    /// Emits the node in canonical form; `None` (having emitted nothing)
    /// when its text is not understood.
    fn canonical_node(&mut self, n: &KdlNode, path: &str, depth: usize) -> Option<()> {
        let f = n.format()?;
        let node_end = end(n.span());
        let mut line = LineWriter::new(depth, &self.node_name(n)?);

        let mut entries: Vec<&KdlEntry> = n.entries().iter().collect();
        let order: &[&str] = shape(path).and_then(|s| s.props).unwrap_or(&[]);
        // Positional arguments keep their relative order (the sort is
        // stable), and so do repeated properties: the last still wins.
        entries.sort_by_key(|e| match e.name() {
            None => (0, 0, String::new()),
            Some(k) => match order.iter().position(|p| *p == k.value()) {
                Some(i) => (1, i, String::new()),
                None => (2, 0, k.value().to_owned()),
            },
        });
        for e in entries {
            let leading = inline_trivia(&e.format()?.leading)?;
            line.before_word(&leading);
            line.word(&self.entry(e)?);
        }
        let head_end = n
            .entries()
            .iter()
            .map(|e| end(e.span()))
            .fold(end(n.name().span()), usize::max);

        let children = match n.children() {
            Some(c) => {
                let open = head_end + f.before_children.len();
                if !self.text.get(open..)?.starts_with('{') {
                    return None;
                }
                let close = self.close_brace(c, open)?;
                let before = inline_trivia(self.text.get(head_end..open)?)?;
                let after = inline_trivia(self.text.get(close + 1..node_end)?)?;
                Some((c, before, after))
            }
            None => None,
        };
        let terminator = self.terminator_comment(n);

        // An empty block is dropped (it means the same as none) unless it
        // holds comments.
        let block_has_text = |c: &KdlDocument| {
            !c.nodes().is_empty()
                || c.format().is_some_and(|cf| {
                    !cf.leading.trim().is_empty() || !cf.trailing.trim().is_empty()
                })
        };
        match children {
            Some((c, before, after)) if block_has_text(c) => {
                line.at_end(&before);
                line.word("{");
                let (head, comment) = line.finish();
                self.lines.push(depth, &head, true, comment);
                if let Some(cf) = c.format() {
                    self.lines.trivia(&cf.leading, depth + 1, Attach::Any);
                }
                self.document(c, path, depth + 1);
                if let Some(cf) = c.format() {
                    let attach = self.attach_after(c.nodes().last(), true);
                    self.lines.trivia(&cf.trailing, depth + 1, attach);
                }
                let mut close = LineWriter::new(depth, "}");
                close.at_end(&after);
                close.end_comments.extend(terminator);
                let (text, comment) = close.finish();
                self.lines.close(depth, &text, comment);
            }
            Some((_, before, after)) => {
                line.at_end(&before);
                line.at_end(&after);
                line.end_comments.extend(terminator);
                let (head, comment) = line.finish();
                self.lines.push(depth, &head, false, comment);
            }
            None => {
                line.at_end(&inline_trivia(self.text.get(head_end..node_end)?)?);
                line.end_comments.extend(terminator);
                let (head, comment) = line.finish();
                self.lines.push(depth, &head, false, comment);
            }
        }
        Some(())
    }

    /// The node as written (children included); only its first line is
    /// re-indented.
    fn verbatim_node(&mut self, n: &KdlNode, depth: usize) {
        let mut text = self.text.get(n.span().offset()..end(n.span())).map_or_else(
            || {
                // The span is always in the text; kdl-rs's own rendering
                // is the fallback, without the trivia already written.
                let mut m = n.clone();
                if let Some(f) = m.format_mut() {
                    f.leading.clear();
                    f.trailing.clear();
                }
                m.to_string().trim_end().to_owned()
            },
            |t| t.trim_end_matches(is_space).to_owned(),
        );
        if let Some((gap, c)) = self.terminator_comment(n) {
            text.push_str(&gap);
            text.push_str(&c);
        }
        self.lines.push(depth, &text, false, true);
    }
}
