//! A fast, single-pass KDL v2 parser for the subset of KDL that spec files
//! use, producing the same [`kdl::KdlDocument`] (names, entries, values,
//! type annotations, children and every span) that `KdlDocument::parse_v2`
//! would, without the formatting details (whitespace, comments, value
//! representations).
//!
//! It is a fast path, not a second parser: whenever it meets anything it does
//! not handle exactly like kdl-rs, or any syntax error, it returns `None` and
//! the caller parses with kdl-rs instead, so every syntax diagnostic still
//! comes from kdl-rs, byte for byte.
//!
//! Handled: bare identifiers (ASCII), quoted strings with the single-character
//! and `\u{…}` escapes, single-line raw strings (`#"…"#`), decimal, hex, octal
//! and binary integers, decimal floats with exponents, `#true #false #null
//! #inf #-inf #nan`, type annotations, properties (with spaces around `=`),
//! children blocks, `;` and newline terminators, `//` and nested `/* */`
//! comments (any Unicode inside, except line separators and the characters
//! KDL disallows), and slashdash on nodes, entries and children blocks.
//!
//! Not handled (falls back): any non-ASCII character outside comments and
//! strings (Unicode identifiers and spaces, a byte-order mark), `\r` and the
//! other non-`\n` newlines, control characters, line continuations (`\`),
//! multi-line strings, whitespace escapes in strings, a slashdash not preceded
//! by whitespace inside a node, nesting deeper than [`MAX_DEPTH`].
//!
//! Architecture invariant: `parse(text)` is either `None` or a document equal
//! to `KdlDocument::parse_v2(text)` in everything but formatting; it never
//! returns a document for text kdl-rs rejects. The differential tests in
//! `tests/it/kdl_fast.rs` check this on the examples, generated repos and
//! thousands of mutations of them.

use kdl::{KdlDocument, KdlEntry, KdlIdentifier, KdlNode, KdlValue};

/// How deeply children blocks may nest before the fast path gives up.
pub const MAX_DEPTH: usize = 64;

/// Parses `text` as KDL v2, or returns `None` when the text is not valid KDL
/// or uses something this parser leaves to kdl-rs.
pub fn parse(text: &str) -> Option<KdlDocument> {
    let mut p = Parser {
        text,
        b: text.as_bytes(),
        i: 0,
        depth: 0,
    };
    let doc = p.nodes(false)?;
    (p.i == p.b.len()).then_some(doc)
}

/// Returns `None` from the enclosing function unless the condition holds.
macro_rules! ensure {
    ($cond:expr) => {
        if !$cond {
            return None;
        }
    };
}

struct Parser<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    depth: usize,
}

/// Characters that end a bare identifier besides whitespace and newlines.
fn is_ident_byte(c: u8) -> bool {
    matches!(c, 0x21..=0x7e)
        && !matches!(
            c,
            b'\\' | b'/' | b'(' | b')' | b'{' | b'}' | b'[' | b']' | b';' | b'"' | b'#' | b'='
        )
}

/// Characters KDL forbids anywhere, plus the newlines other than `\n`,
/// which this parser leaves to kdl-rs.
fn is_refused_char(c: char) -> bool {
    matches!(c,
        '\u{0000}'..='\u{0008}'
        | '\u{000A}'..='\u{001F}'
        | '\u{007F}'
        | '\u{0085}'
        | '\u{200E}'..='\u{200F}'
        | '\u{2028}'..='\u{2029}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2066}'..='\u{2069}'
        | '\u{FEFF}'
    )
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn peek_at(&self, offset: usize) -> Option<u8> {
        self.b.get(self.i + offset).copied()
    }

    fn at_eof(&self) -> bool {
        self.i >= self.b.len()
    }

    /// The non-ASCII character at the cursor, if it is one this parser
    /// accepts inside comments and strings.
    fn accepted_unicode(&self) -> Option<char> {
        let c = self.text.get(self.i..)?.chars().next()?;
        (!is_refused_char(c)).then_some(c)
    }

    /// `node-space*` without line continuations: spaces, tabs and `/* */`
    /// comments. Returns whether anything was consumed.
    fn ws(&mut self) -> Option<bool> {
        let start = self.i;
        loop {
            match self.peek() {
                Some(b' ' | b'\t') => self.i += 1,
                Some(b'/') if self.peek_at(1) == Some(b'*') => self.block_comment()?,
                Some(b'\\') => return None,
                _ => return Some(self.i > start),
            }
        }
    }

    /// A nested `/* */` comment.
    fn block_comment(&mut self) -> Option<()> {
        self.i += 2;
        let mut depth = 1usize;
        while depth > 0 {
            match self.peek()? {
                b'*' if self.peek_at(1) == Some(b'/') => {
                    self.i += 2;
                    depth -= 1;
                }
                b'/' if self.peek_at(1) == Some(b'*') => {
                    self.i += 2;
                    depth += 1;
                }
                b'\t' | b'\n' | 0x20..=0x7e => self.i += 1,
                c if c >= 0x80 => self.i += self.accepted_unicode()?.len_utf8(),
                _ => return None,
            }
        }
        Some(())
    }

    /// A `//` comment up to and including its newline (or the end).
    fn line_comment(&mut self) -> Option<()> {
        self.i += 2;
        loop {
            match self.peek() {
                None => return Some(()),
                Some(b'\n') => {
                    self.i += 1;
                    return Some(());
                }
                Some(b'\t' | 0x20..=0x7e) => self.i += 1,
                Some(c) if c >= 0x80 => self.i += self.accepted_unicode()?.len_utf8(),
                Some(_) => return None,
            }
        }
    }

    /// `line-space*`, and with `slashdash_nodes` also `/-` commented-out
    /// nodes, as between nodes.
    fn line_space(&mut self, slashdash_nodes: bool) -> Option<()> {
        loop {
            self.ws()?;
            match self.peek() {
                Some(b'\n') => self.i += 1,
                Some(b'/') if self.peek_at(1) == Some(b'/') => self.line_comment()?,
                Some(b'/') if slashdash_nodes && self.peek_at(1) == Some(b'-') => {
                    self.i += 2;
                    self.line_space(false)?;
                    self.base_node()?;
                }
                _ => return Some(()),
            }
        }
    }

    /// `nodes` of the grammar: the document or the inside of a children
    /// block. The span runs from the first node to the end of the last one.
    fn nodes(&mut self, in_block: bool) -> Option<KdlDocument> {
        self.line_space(true)?;
        let start = self.i;
        let mut end = start;
        let mut doc = KdlDocument::new();
        loop {
            if self.at_eof() || (in_block && self.peek() == Some(b'}')) {
                break;
            }
            let node = self.base_node()?;
            end = self.i;
            doc.nodes_mut().push(node);
            match self.peek() {
                Some(b';' | b'\n') => self.i += 1,
                Some(b'/') if self.peek_at(1) == Some(b'/') => self.line_comment()?,
                None => break,
                Some(b'}') if in_block => break,
                Some(_) => return None,
            }
            self.line_space(true)?;
        }
        doc.set_span(start..end);
        Some(doc)
    }

    /// A node without its leading trivia and terminator; the cursor ends
    /// after the node's trailing spaces, as does its span.
    fn base_node(&mut self) -> Option<KdlNode> {
        let start = self.i;
        let ty = self.optional_type_annotation()?;
        let name = self.identifier()?;
        self.value_terminator()?;
        let mut node = KdlNode::new(name);
        node.clear_format();
        if let Some(ty) = ty {
            node.set_ty(ty);
        }
        // Entries, then (slashdashed) children blocks.
        let mut children_seen = false;
        let mut slashdashed_children_seen = false;
        loop {
            let had_ws = self.ws()?;
            match self.peek() {
                None | Some(b'\n' | b';' | b'}') => break,
                Some(b'/') if self.peek_at(1) == Some(b'/') => break,
                Some(b'{') => {
                    ensure!(!children_seen);
                    children_seen = true;
                    let children = self.children_block()?;
                    node.set_children(children);
                }
                Some(b'/') if self.peek_at(1) == Some(b'-') => {
                    ensure!(had_ws);
                    self.i += 2;
                    self.line_space(false)?;
                    if self.peek() == Some(b'{') {
                        self.children_block()?;
                        slashdashed_children_seen = true;
                    } else {
                        ensure!(!children_seen && !slashdashed_children_seen);
                        self.entry()?;
                    }
                }
                Some(_) => {
                    ensure!(had_ws && !children_seen && !slashdashed_children_seen);
                    let entry = self.entry()?;
                    node.entries_mut().push(entry);
                }
            }
        }
        node.set_span(start..self.i);
        Some(node)
    }

    fn children_block(&mut self) -> Option<KdlDocument> {
        ensure!(self.depth < MAX_DEPTH);
        self.depth += 1;
        self.i += 1;
        let doc = self.nodes(true)?;
        ensure!(self.peek() == Some(b'}'));
        self.i += 1;
        self.depth -= 1;
        Some(doc)
    }

    /// A `(name)` type annotation and the spaces after it, if one starts here;
    /// `Some(None)` when none does, `None` on anything the fast path does not handle.
    fn optional_type_annotation(&mut self) -> Option<Option<KdlIdentifier>> {
        if self.peek() != Some(b'(') {
            return Some(None);
        }
        let ty = self.type_annotation()?;
        self.ws()?;
        Some(Some(ty))
    }

    /// `(name)`, with optional spaces inside the parentheses.
    fn type_annotation(&mut self) -> Option<KdlIdentifier> {
        self.i += 1;
        self.ws()?;
        let ty = self.identifier()?;
        match self.peek()? {
            b' ' | b'\t' | b')' => {}
            b'/' if self.peek_at(1) == Some(b'*') => {}
            _ => return None,
        }
        self.ws()?;
        ensure!(self.peek() == Some(b')'));
        self.i += 1;
        Some(ty)
    }

    /// What may follow a value or a name: the end, a space, a newline, `;`,
    /// `=`, `)`, a brace or a comment.
    fn value_terminator(&self) -> Option<()> {
        match self.peek() {
            None | Some(b' ' | b'\t' | b'\n' | b';' | b'=' | b')' | b'{' | b'}') => Some(()),
            Some(b'/') if matches!(self.peek_at(1), Some(b'/' | b'*')) => Some(()),
            _ => None,
        }
    }

    /// A property or an argument.
    fn entry(&mut self) -> Option<KdlEntry> {
        let start = self.i;
        if self.peek() == Some(b'(') {
            let ty = self.type_annotation()?;
            self.ws()?;
            let value = self.value()?;
            self.value_terminator()?;
            let mut entry = KdlEntry::new(value);
            entry.set_ty(ty);
            entry.set_span(start..self.i);
            return Some(entry);
        }
        if !self.at_string() {
            let value = self.value()?;
            self.value_terminator()?;
            let mut entry = KdlEntry::new(value);
            entry.set_span(start..self.i);
            return Some(entry);
        }
        let key = self.identifier()?;
        self.value_terminator()?;
        let after_key = self.i;
        self.ws()?;
        if self.peek() != Some(b'=') {
            self.i = after_key;
            let mut entry = KdlEntry::new(KdlValue::String(key.value().to_owned()));
            entry.set_span(start..after_key);
            return Some(entry);
        }
        self.i += 1;
        self.ws()?;
        let ty = self.optional_type_annotation()?;
        let value = self.value()?;
        self.value_terminator()?;
        let mut entry = KdlEntry::new_prop(key, value);
        if let Some(ty) = ty {
            entry.set_ty(ty);
        }
        entry.set_span(start..self.i);
        Some(entry)
    }

    /// Whether a string (bare, quoted or raw) starts at the cursor.
    fn at_string(&self) -> bool {
        match self.peek() {
            Some(b'"') => true,
            Some(b'#') => matches!(self.peek_at(1), Some(b'#' | b'"')),
            Some(b'+' | b'-' | b'.') => !matches!(self.peek_at(1), Some(b'0'..=b'9' | b'.')),
            Some(c) => is_ident_byte(c) && !c.is_ascii_digit(),
            None => false,
        }
    }

    /// A string used as a name, with the span of its token.
    fn identifier(&mut self) -> Option<KdlIdentifier> {
        ensure!(self.at_string());
        let start = self.i;
        let value = self.string()?;
        let mut ident = KdlIdentifier::from(value);
        ident.set_span(start..self.i);
        Some(ident)
    }

    fn string(&mut self) -> Option<String> {
        match self.peek()? {
            b'"' => self.quoted_string(),
            b'#' => self.raw_string(),
            _ => self.bare_identifier(),
        }
    }

    fn bare_identifier(&mut self) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(is_ident_byte) {
            self.i += 1;
        }
        ensure!(self.peek().is_none_or(|c| c < 0x80));
        let s = &self.text[start..self.i];
        ensure!(!s.is_empty() && !matches!(s, "true" | "false" | "null" | "inf" | "-inf" | "nan"));
        Some(s.to_owned())
    }

    fn quoted_string(&mut self) -> Option<String> {
        self.i += 1;
        ensure!(!(self.peek() == Some(b'"') && self.peek_at(1) == Some(b'"')));
        let mut out = String::new();
        let mut run = self.i;
        loop {
            match self.peek()? {
                b'"' => {
                    out.push_str(&self.text[run..self.i]);
                    self.i += 1;
                    return Some(out);
                }
                b'\\' => {
                    out.push_str(&self.text[run..self.i]);
                    let c = match self.peek_at(1)? {
                        b'\\' => '\\',
                        b'"' => '"',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b's' => ' ',
                        b'u' => {
                            self.i += 2;
                            ensure!(self.peek() == Some(b'{'));
                            self.i += 1;
                            let digits = self.i;
                            while self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                                self.i += 1;
                            }
                            let n = self.i - digits;
                            ensure!((1..=6).contains(&n) && self.peek() == Some(b'}'));
                            let v = u32::from_str_radix(&self.text[digits..self.i], 16).ok()?;
                            out.push(char::from_u32(v)?);
                            self.i += 1;
                            run = self.i;
                            continue;
                        }
                        _ => return None,
                    };
                    out.push(c);
                    self.i += 2;
                    run = self.i;
                }
                b'\t' | 0x20..=0x7e => self.i += 1,
                c if c >= 0x80 => self.i += self.accepted_unicode()?.len_utf8(),
                _ => return None,
            }
        }
    }

    fn raw_string(&mut self) -> Option<String> {
        let hashes_start = self.i;
        while self.peek() == Some(b'#') {
            self.i += 1;
        }
        let n_hashes = self.i - hashes_start;
        ensure!(self.peek() == Some(b'"'));
        self.i += 1;
        ensure!(!(self.peek() == Some(b'"') && self.peek_at(1) == Some(b'"')));
        let body = self.i;
        loop {
            match self.peek()? {
                b'"' if self.b[self.i + 1..]
                    .iter()
                    .take(n_hashes)
                    .filter(|&&c| c == b'#')
                    .count()
                    == n_hashes =>
                {
                    let s = self.text[body..self.i].to_owned();
                    self.i += 1 + n_hashes;
                    return Some(s);
                }
                b'\t' | 0x20..=0x7e => self.i += 1,
                c if c >= 0x80 => self.i += self.accepted_unicode()?.len_utf8(),
                _ => return None,
            }
        }
    }

    /// A value after an optional type annotation: a string, a number or a
    /// keyword.
    fn value(&mut self) -> Option<KdlValue> {
        match self.peek()? {
            b'#' if !matches!(self.peek_at(1), Some(b'#' | b'"')) => self.keyword(),
            b'0'..=b'9' => self.number(),
            b'+' | b'-' if self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) => self.number(),
            _ if self.at_string() => self.string().map(KdlValue::String),
            _ => None,
        }
    }

    fn keyword(&mut self) -> Option<KdlValue> {
        let rest = &self.b[self.i + 1..];
        let (len, value) = if rest.starts_with(b"true") {
            (4, KdlValue::Bool(true))
        } else if rest.starts_with(b"false") {
            (5, KdlValue::Bool(false))
        } else if rest.starts_with(b"null") {
            (4, KdlValue::Null)
        } else if rest.starts_with(b"nan") {
            (3, KdlValue::Float(f64::NAN))
        } else if rest.starts_with(b"inf") {
            (3, KdlValue::Float(f64::INFINITY))
        } else if rest.starts_with(b"-inf") {
            (4, KdlValue::Float(f64::NEG_INFINITY))
        } else {
            return None;
        };
        self.i += 1 + len;
        Some(value)
    }

    /// Digits of `radix` with `_` separators after the first digit, pushed
    /// onto `out` without the separators. Like kdl-rs, every group of digits
    /// (also the parts of a float) must fit an `i128`.
    fn digits(&mut self, radix: u32, out: &mut String) -> Option<()> {
        ensure!(self.peek().is_some_and(|c| (c as char).is_digit(radix)));
        let group = out.len();
        while let Some(c) = self.peek() {
            if (c as char).is_digit(radix) {
                out.push(c as char);
            } else if c != b'_' {
                break;
            }
            self.i += 1;
        }
        i128::from_str_radix(&out[group..], radix).ok()?;
        Some(())
    }

    fn number(&mut self) -> Option<KdlValue> {
        let negative = match self.peek()? {
            b'-' => {
                self.i += 1;
                true
            }
            b'+' => {
                self.i += 1;
                false
            }
            _ => false,
        };
        let radix = match (self.peek(), self.peek_at(1)) {
            (Some(b'0'), Some(b'x' | b'X')) => 16,
            (Some(b'0'), Some(b'o' | b'O')) => 8,
            (Some(b'0'), Some(b'b' | b'B')) => 2,
            _ => 10,
        };
        let mut digits = String::new();
        if radix != 10 {
            self.i += 2;
            self.digits(radix, &mut digits)?;
        } else {
            if negative {
                digits.push('-');
            }
            self.digits(10, &mut digits)?;
            let mut is_float = false;
            if self.peek() == Some(b'.') {
                self.i += 1;
                digits.push('.');
                self.digits(10, &mut digits)?;
                is_float = true;
            }
            if matches!(self.peek(), Some(b'e' | b'E')) {
                self.i += 1;
                digits.push('e');
                if let Some(sign @ (b'+' | b'-')) = self.peek() {
                    digits.push(sign as char);
                    self.i += 1;
                }
                self.digits(10, &mut digits)?;
                is_float = true;
            }
            if is_float {
                return digits.parse::<f64>().ok().map(KdlValue::Float);
            }
            let digits = digits.trim_start_matches('-');
            let magnitude = digits.parse::<i128>().ok()?;
            return Some(KdlValue::Integer(if negative {
                magnitude.checked_neg()?
            } else {
                magnitude
            }));
        }
        let magnitude = i128::from_str_radix(&digits, radix).ok()?;
        Some(KdlValue::Integer(if negative {
            magnitude.checked_neg()?
        } else {
            magnitude
        }))
    }
}
