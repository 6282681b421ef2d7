//! Parsing and lowering: KDL text to the typed [`SpecSet`].
//!
//! Parsing uses kdl 6 (KDL v2) and keeps spans. Lowering checks every node
//! against the [`crate::shape`] table (unknown names get a "did you mean"),
//! converts values (units, keywords, ranges) and records what each file
//! declares. It never stops early: every problem becomes a diagnostic and the
//! rest of the file is still lowered.

use kdl::{KdlDocument, KdlEntry, KdlNode, KdlValue};

use crate::diag::{Diagnostic, Span, suggestion};
use crate::shape::{Shape, child_path, shape};
use crate::source::{FileId, Sources};
use crate::spec::*;
use crate::units;
use vm_config::limits::{self, Limit};

mod reconcile;

/// Parses every file and lowers it into one [`SpecSet`].
///
/// Files are lowered on two threads when the repository is large (lowering
/// reads nothing of other files): the first half of the text on this thread,
/// the rest on another, appended after it. The set and the diagnostics are
/// those of lowering every file in order.
pub fn lower_all(sources: &Sources, diags: &mut Vec<Diagnostic>) -> SpecSet {
    lower_all_in(sources, diags, PARALLEL_FROM_BYTES)
}

/// [`lower_all`], on two threads from `parallel_from` bytes of text.
fn lower_all_in(sources: &Sources, diags: &mut Vec<Diagnostic>, parallel_from: usize) -> SpecSet {
    let files: Vec<(FileId, &str)> = sources
        .files()
        .map(|(file, source)| (file, source.text.as_str()))
        .collect();
    let bytes: usize = files.iter().map(|(_, text)| text.len()).sum();
    let lower_run = |run: &[(FileId, &str)], diags: &mut Vec<Diagnostic>| {
        let mut set = SpecSet::default();
        for &(file, text) in run {
            lower_into(file, text, diags, &mut set);
        }
        set
    };
    if bytes < parallel_from || !crate::threads::second() {
        return lower_run(&files, diags);
    }
    // The first files that hold half the text, and the rest.
    let mut seen = 0;
    let split = files
        .iter()
        .position(|(_, text)| {
            seen += text.len();
            seen * 2 >= bytes
        })
        .map_or(files.len(), |at| at + 1);
    let (first, rest) = files.split_at(split);
    let (mut set, (later, later_diags)) = std::thread::scope(|scope| {
        let later = scope.spawn(|| {
            let mut diags = vec![];
            (lower_run(rest, &mut diags), diags)
        });
        let set = lower_run(first, diags);
        (set, crate::threads::join(later))
    });
    set.append(later);
    diags.extend(later_diags);
    set
}

/// From how much spec text [`lower_all`] lowers on two threads (1 MiB, about
/// 7,000 VMs).
const PARALLEL_FROM_BYTES: usize = 1 << 20;

/// Parses and lowers one file into a set of its own: what [`lower_all`] adds to
/// its set for this file (lowering reads nothing of other files), which lets
/// [`crate::session::Session`] lower only the files that changed.
pub fn lower_file(file: FileId, text: &str, diags: &mut Vec<Diagnostic>) -> SpecSet {
    let mut set = SpecSet::default();
    lower_into(file, text, diags, &mut set);
    set
}

fn lower_into(file: FileId, text: &str, diags: &mut Vec<Diagnostic>, set: &mut SpecSet) {
    let Some(doc) = parse_for_lowering(file, text, diags) else {
        return;
    };
    let mut cx = Cx {
        file,
        diags,
        suggested: vec![],
    };
    cx.document(&doc, set);
}

/// Parses one file for lowering: with the fast parser of
/// [`crate::kdl_fast`] when it handles the text, otherwise with [`parse`]
/// (kdl-rs), so every syntax diagnostic is still kdl-rs's. The document has
/// names, values and spans but no formatting details; the formatter, which
/// needs those, calls [`parse`].
pub fn parse_for_lowering(
    file: FileId,
    text: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<KdlDocument> {
    crate::kdl_fast::parse(text).or_else(|| parse(file, text, diags))
}

/// Parses one file with kdl-rs, keeping every formatting detail, and turns
/// KDL syntax errors into diagnostics.
pub fn parse(file: FileId, text: &str, diags: &mut Vec<Diagnostic>) -> Option<KdlDocument> {
    match KdlDocument::parse_v2(text) {
        Ok(doc) => Some(doc),
        Err(err) => {
            for d in &err.diagnostics {
                let message = d
                    .message
                    .clone()
                    .unwrap_or_else(|| "invalid KDL syntax".to_owned());
                let span = clamp(Span::new(file, d.span), text.len());
                let mut diag = Diagnostic::error("cairn::parse::syntax", span, message)
                    .with_label(d.label.clone().unwrap_or_else(|| "here".to_owned()));
                diag.help = Some(d.help.clone().unwrap_or_else(|| {
                    "spec files are KDL v2 (https://kdl.dev): `name \"arg\" key=value { children }`".to_owned()
                }));
                diags.push(diag);
            }
            if err.diagnostics.is_empty() {
                diags.push(Diagnostic::error(
                    "cairn::parse::syntax",
                    Span {
                        file,
                        start: 0,
                        len: 0,
                    },
                    "invalid KDL syntax",
                ));
            }
            None
        }
    }
}

fn clamp(mut span: Span, len: usize) -> Span {
    span.start = span.start.min(len);
    span.len = span.len.min(len - span.start);
    span
}

struct Cx<'a> {
    file: FileId,
    diags: &'a mut Vec<Diagnostic>,
    /// Node names suggested for misspelt ones ("did you mean `cpu`?"), so
    /// a "missing `cpu`" error is not piled on top of the typo.
    suggested: Vec<&'static str>,
}

/// A child node that passed the shape check.
struct Child<'n> {
    node: &'n KdlNode,
    name: &'n str,
}

impl Cx<'_> {
    fn sp(&self, s: miette::SourceSpan) -> Span {
        Span::new(self.file, s)
    }

    fn err(
        &mut self,
        code: &'static str,
        span: Span,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.diags.push(Diagnostic::error(code, span, message));
        self.diags.last_mut().expect("just pushed")
    }

    // ---- shape checks -------------------------------------------------

    /// The known children of a node (or of the document), each checked
    /// against its shape; unknown ones are reported and left out.
    fn children<'n>(
        &mut self,
        doc: Option<&'n KdlDocument>,
        parent: &str,
        parent_desc: &str,
    ) -> Vec<Child<'n>> {
        let Some(doc) = doc else { return vec![] };
        let allowed = shape(parent).map_or(&[][..], |s| s.children);
        let mut out = vec![];
        for node in doc.nodes() {
            let name = node.name().value();
            let path = child_path(parent, name);
            let Some(shape) = allowed.contains(&name).then(|| shape(&path)).flatten() else {
                let span = self.sp(node.name().span());
                let help = if allowed.is_empty() {
                    format!("{parent_desc} takes no children block")
                } else {
                    if let Some(s) = crate::diag::did_you_mean(name, allowed.iter().copied()) {
                        self.suggested.push(s);
                    }
                    suggestion(name, allowed, "node")
                };
                self.err(
                    "cairn::schema::unknown_node",
                    span,
                    format!("unknown node `{name}` in {parent_desc}"),
                )
                .help = Some(help);
                continue;
            };
            self.entries(node, shape);
            out.push(Child { node, name });
        }
        out
    }

    fn entries(&mut self, node: &KdlNode, shape: &Shape) {
        let name = node.name().value();
        let mut n_args = 0;
        let mut seen: Vec<&str> = vec![];
        for entry in node.entries() {
            let Some(key) = entry.name() else {
                n_args += 1;
                if n_args > shape.args.max {
                    let span = self.sp(entry.span());
                    self.err(
                        "cairn::schema::unexpected_argument",
                        span,
                        format!("`{name}` takes {}", shape.args.what),
                    )
                    .help = Some(match shape.props {
                        Some(p) if !p.is_empty() => format!(
                            "write settings as properties: {}",
                            p.iter()
                                .map(|p| format!("`{p}=…`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        _ => "remove the extra value".to_owned(),
                    });
                }
                continue;
            };
            let key = key.value();
            if let Some(props) = shape.props
                && !props.contains(&key)
            {
                let span = self.sp(entry.span());
                let help = if props.is_empty() {
                    format!("`{name}` takes no properties")
                } else {
                    suggestion(key, props, "property")
                };
                self.err(
                    "cairn::schema::unknown_property",
                    span,
                    format!("unknown property `{key}` on `{name}`"),
                )
                .help = Some(help);
            }
            if seen.contains(&key) {
                let span = self.sp(entry.span());
                self.err(
                    "cairn::schema::duplicate_property",
                    span,
                    format!("property `{key}` is given twice on `{name}`"),
                )
                .help = Some("keep one; KDL would silently use the last".to_owned());
            }
            seen.push(key);
        }
        if n_args < shape.args.min {
            let span = self.sp(node.name().span());
            self.err(
                "cairn::schema::missing_argument",
                span,
                format!("`{name}` needs {}", shape.args.what),
            )
            .help = Some(format!("write it after the node name, e.g. `{name} \"…\"`"));
        }
        if shape.children.is_empty()
            && let Some(children) = node.children()
            && !children.nodes().is_empty()
        {
            let span = self.sp(children.span());
            self.err(
                "cairn::schema::unexpected_children",
                span,
                format!("`{name}` takes no children block"),
            );
        }
    }

    // ---- value conversion -------------------------------------------

    fn arg<'n>(&self, node: &'n KdlNode, index: usize) -> Option<&'n KdlEntry> {
        node.entries()
            .iter()
            .filter(|e| e.name().is_none())
            .nth(index)
    }

    fn prop<'n>(&self, node: &'n KdlNode, key: &str) -> Option<&'n KdlEntry> {
        node.entries()
            .iter()
            .rev()
            .find(|e| e.name().is_some_and(|n| n.value() == key))
    }

    fn wrong_type(&mut self, entry: &KdlEntry, what: &str, expected: &str, example: &str) {
        let span = self.sp(entry.span());
        let found = describe(entry.value());
        self.err(
            "cairn::schema::wrong_type",
            span,
            format!("{what} must be {expected}, found {found}"),
        )
        .help = Some(format!("for example {example}"));
    }

    fn string(&mut self, entry: &KdlEntry, what: &str) -> Option<Spanned<String>> {
        match entry.value() {
            KdlValue::String(s) => Some(Spanned {
                value: s.clone(),
                span: self.sp(entry.span()),
            }),
            _ => {
                self.wrong_type(entry, what, "a string", "\"text\"");
                None
            }
        }
    }

    fn name_value(&mut self, entry: &KdlEntry, what: &str) -> Option<Name> {
        let s = self.string(entry, what)?;
        if !is_dns_label(&s.value) {
            self.err("cairn::schema::invalid_name", s.span, format!("{what} `{}` is not a valid name", s.value)).help =
                Some("names are DNS labels: lower-case letters, digits and `-`, starting and ending with a letter or digit, at most 63 characters".to_owned());
        }
        Some(s)
    }

    /// The node's name argument.
    fn name(&mut self, node: &KdlNode) -> Option<Name> {
        let entry = self.arg(node, 0)?;
        let what = format!("the name of `{}`", node.name().value());
        self.name_value(entry, &what)
    }

    fn integer(
        &mut self,
        entry: &KdlEntry,
        what: &str,
        min: i128,
        max: i128,
    ) -> Option<Spanned<i128>> {
        let span = self.sp(entry.span());
        let value = match entry.value() {
            KdlValue::Integer(i) => *i,
            _ => {
                self.wrong_type(entry, what, "a whole number", &format!("`{min}`"));
                return None;
            }
        };
        if value < min || value > max {
            let range = if max >= i128::from(u32::MAX) {
                format!("at least {min}")
            } else {
                format!("between {min} and {max}")
            };
            self.err(
                "cairn::schema::out_of_range",
                span,
                format!("{what} is {value}, outside the valid range"),
            )
            .help = Some(format!("{what} must be {range}"));
            return None;
        }
        Some(Spanned { value, span })
    }

    fn u32(&mut self, entry: &KdlEntry, what: &str, min: u32, max: u32) -> Option<Spanned<u32>> {
        let v = self.integer(entry, what, i128::from(min), i128::from(max))?;
        Some(Spanned {
            value: v.value as u32,
            span: v.span,
        })
    }

    /// A port (`5432`) or an inclusive port range (`"8000-8100"`), each port
    /// 1..=65535, the first not above the last.
    fn port_range(&mut self, entry: &KdlEntry) -> Option<Spanned<PortRange>> {
        let what = "the port";
        let span = self.sp(entry.span());
        let text = match entry.value() {
            KdlValue::Integer(_) => {
                let p = self.u32(entry, what, 1, 65_535)?;
                return Some(Spanned {
                    value: PortRange {
                        first: p.value,
                        last: p.value,
                    },
                    span,
                });
            }
            KdlValue::String(s) => s.clone(),
            _ => {
                self.wrong_type(
                    entry,
                    what,
                    "a whole number or a range",
                    "`5432` or \"8000-8100\"",
                );
                return None;
            }
        };
        let port = |t: &str| t.trim().parse::<u64>().ok();
        let parsed = match text.split_once('-') {
            Some((a, b)) => port(a).zip(port(b)),
            None => port(&text).map(|p| (p, p)),
        };
        let valid = |p: u64| (1..=65_535).contains(&p);
        if parsed.is_some_and(|(a, b)| !valid(a) || !valid(b)) {
            self.err(
                "cairn::schema::out_of_range",
                span,
                format!("the port `{text}` is outside 1..=65535"),
            )
            .help = Some("TCP and UDP ports are 1 to 65535".to_owned());
            return None;
        }
        let parsed = parsed.map(|(a, b)| (a as u32, b as u32));
        match parsed {
            Some((first, last)) if first <= last => Some(Spanned {
                value: PortRange { first, last },
                span,
            }),
            Some((first, last)) => {
                self.err(
                    "cairn::schema::out_of_range",
                    span,
                    format!("the port range `{text}` runs backwards ({first} is above {last})"),
                )
                .help = Some(format!("write the lower port first: \"{last}-{first}\""));
                None
            }
            None => {
                self.err(
                    "cairn::schema::wrong_type",
                    span,
                    format!("the port `{text}` is neither a port nor a range of ports"),
                )
                .help = Some(
                    "write a port 1..=65535 (`port=5432`) or a range FIRST-LAST (`port=\"8000-8100\"`)"
                        .to_owned(),
                );
                None
            }
        }
    }

    /// A VM's vCPU count, checked against what the runtime runs.
    fn vcpu_count(&mut self, entry: &KdlEntry) -> Option<Spanned<u32>> {
        let what = "the vCPU count";
        let KdlValue::Integer(value) = *entry.value() else {
            self.wrong_type(entry, what, "a whole number", "`1`");
            return None;
        };
        let span = self.sp(entry.span());
        if !self.within_runtime_limit(span, what, value, &limits::VCPUS, |c| format!("`cpu {c}`")) {
            return None;
        }
        Some(Spanned {
            value: value as u32,
            span,
        })
    }

    /// Whether `value` is within one of the runtime's limits on a VM
    /// (`vm_config::limits`, the table the node and cairn-vmm check too); if
    /// not, one `out_of_range` error saying the rule, why, and the nearest
    /// accepted value written as `example` writes it.
    fn within_runtime_limit(
        &mut self,
        span: Span,
        what: &str,
        value: i128,
        limit: &Limit,
        example: impl Fn(u64) -> String,
    ) -> bool {
        let problem = match u64::try_from(value) {
            Ok(value) => match limit.check(value) {
                Ok(()) => return true,
                Err(error) => error.to_string(),
            },
            Err(_) if value < 0 => format!(
                "{value} is less than the minimum of {}",
                limit.show(limit.min)
            ),
            Err(_) => format!(
                "{value} is more than the maximum of {}",
                limit.show(limit.max)
            ),
        };
        let nearest = limit.nearest(u64::try_from(value.max(0)).unwrap_or(u64::MAX));
        self.err(
            "cairn::schema::out_of_range",
            span,
            format!("{what}: {problem}"),
        )
        .help = Some(format!(
            "{}; for example {}",
            limit.rule(),
            example(nearest)
        ));
        false
    }

    fn u64(&mut self, entry: &KdlEntry, what: &str, min: u64) -> Option<Spanned<u64>> {
        let v = self.integer(entry, what, i128::from(min), i128::from(u64::MAX))?;
        Some(Spanned {
            value: v.value as u64,
            span: v.span,
        })
    }

    fn float(&mut self, entry: &KdlEntry, what: &str, min: f64, max: f64) -> Option<Spanned<f64>> {
        let span = self.sp(entry.span());
        let value = match entry.value() {
            KdlValue::Float(f) => *f,
            KdlValue::Integer(i) => *i as f64,
            _ => {
                self.wrong_type(entry, what, "a number", &format!("`{min:.1}`"));
                return None;
            }
        };
        if !value.is_finite() || value < min || value > max {
            self.err(
                "cairn::schema::out_of_range",
                span,
                format!("{what} is {value}, outside the valid range"),
            )
            .help = Some(format!("{what} must be between {min} and {max}"));
            return None;
        }
        Some(Spanned { value, span })
    }

    fn bool(&mut self, entry: &KdlEntry, what: &str) -> Option<Spanned<bool>> {
        match entry.value() {
            KdlValue::Bool(b) => Some(Spanned {
                value: *b,
                span: self.sp(entry.span()),
            }),
            KdlValue::String(s) if s == "true" || s == "false" => {
                let span = self.sp(entry.span());
                self.err(
                    "cairn::schema::wrong_type",
                    span,
                    format!("{what} must be a boolean, found the string \"{s}\""),
                )
                .help = Some(format!("KDL v2 booleans are written `#{s}`"));
                None
            }
            _ => {
                self.wrong_type(entry, what, "a boolean", "`#true` or `#false`");
                None
            }
        }
    }

    fn quantity(
        &mut self,
        entry: &KdlEntry,
        what: &str,
        parse: fn(&str) -> Result<u64, units::UnitError>,
        table: &[(&str, u128)],
        example: &str,
    ) -> Option<Spanned<u64>> {
        let span = self.sp(entry.span());
        let accepted = table.iter().map(|(u, _)| *u).collect::<Vec<_>>().join(" ");
        let text = match entry.value() {
            KdlValue::String(s) => s.clone(),
            KdlValue::Integer(i) => {
                self.err(
                    "cairn::schema::missing_unit",
                    span,
                    format!("{what} needs a unit, found the bare number {i}"),
                )
                .help = Some(format!(
                    "write it as a string with a unit, e.g. {example}; units: {accepted}"
                ));
                return None;
            }
            _ => {
                self.wrong_type(entry, what, "a string with a unit", example);
                return None;
            }
        };
        match parse(&text) {
            Ok(v) => Some(Spanned { value: v, span }),
            Err(units::UnitError::MissingUnit(_)) => {
                self.err(
                    "cairn::schema::missing_unit",
                    span,
                    format!("{what} `{text}` has no unit"),
                )
                .help = Some(format!("add a unit, e.g. {example}; units: {accepted}"));
                None
            }
            Err(units::UnitError::UnknownUnit { unit, .. }) => {
                let units: Vec<&str> = table.iter().map(|(u, _)| *u).collect();
                let hint = crate::diag::did_you_mean(&unit, units.iter().copied())
                    .map(|s| format!("did you mean `{s}`? "))
                    .unwrap_or_default();
                self.err(
                    "cairn::schema::unknown_unit",
                    span,
                    format!("{what} `{text}` has an unknown unit `{unit}`"),
                )
                .help = Some(format!("{hint}units: {accepted}"));
                None
            }
            Err(e) => {
                self.err("cairn::schema::invalid_value", span, format!("{what}: {e}"))
                    .help = Some(format!("write a number followed by a unit, e.g. {example}"));
                None
            }
        }
    }

    fn size(&mut self, entry: &KdlEntry, what: &str) -> Option<Spanned<u64>> {
        self.quantity(
            entry,
            what,
            units::parse_size,
            units::SIZE_UNITS,
            "\"32GiB\"",
        )
    }

    fn bandwidth(&mut self, entry: &KdlEntry, what: &str) -> Option<Spanned<u64>> {
        self.quantity(
            entry,
            what,
            units::parse_bandwidth,
            units::BANDWIDTH_UNITS,
            "\"10Gbps\"",
        )
    }

    fn duration(&mut self, entry: &KdlEntry, what: &str) -> Option<Spanned<u64>> {
        self.quantity(
            entry,
            what,
            units::parse_duration,
            units::DURATION_UNITS,
            "\"15m\" or \"1h30m\"",
        )
    }

    /// A duration between `min` and `max` ms; outside, an out-of-range error at
    /// the value naming both bounds.
    fn duration_within(
        &mut self,
        entry: &KdlEntry,
        what: &str,
        min: u64,
        max: u64,
    ) -> Option<Spanned<u64>> {
        let v = self.duration(entry, what)?;
        if (min..=max).contains(&v.value) {
            return Some(v);
        }
        // Whole days read better in hours (`24h`).
        let bound = |ms: u64| {
            if ms >= 86_400_000 && ms.is_multiple_of(3_600_000) {
                format!("{}h", ms / 3_600_000)
            } else {
                units::format_duration(ms)
            }
        };
        self.err(
            "cairn::schema::out_of_range",
            v.span,
            format!(
                "{what} is {}, outside the valid range",
                units::format_duration(v.value)
            ),
        )
        .help = Some(format!(
            "{what} must be between {} and {}",
            bound(min),
            bound(max)
        ));
        None
    }

    fn keyword<T: Copy>(
        &mut self,
        entry: &KdlEntry,
        what: &str,
        keywords: &[&str],
        parse: fn(&str) -> Option<T>,
    ) -> Option<Spanned<T>> {
        let s = self.string(entry, what)?;
        match parse(&s.value) {
            Some(v) => Some(Spanned {
                value: v,
                span: s.span,
            }),
            None => {
                let help = suggestion(&s.value, keywords, "value");
                self.err(
                    "cairn::schema::invalid_value",
                    s.span,
                    format!("{what} `{}` is not one of the accepted values", s.value),
                )
                .help = Some(help);
                None
            }
        }
    }

    /// A required property: reports its absence at the node's name.
    fn required<'n>(
        &mut self,
        node: &'n KdlNode,
        key: &str,
        example: &str,
    ) -> Option<&'n KdlEntry> {
        let found = self.prop(node, key);
        if found.is_none() {
            let name = node.name().value();
            let span = self.sp(node.name().span());
            self.err(
                "cairn::schema::missing_property",
                span,
                format!("`{name}` is missing the property `{key}`"),
            )
            .help = Some(format!("add `{key}={example}`"));
        }
        found
    }

    fn single_value<'n>(&self, node: &'n KdlNode) -> Option<&'n KdlEntry> {
        self.arg(node, 0)
    }

    fn once<T>(
        &mut self,
        slot: &mut Option<T>,
        value: Option<T>,
        node: &KdlNode,
        first: Option<Span>,
    ) {
        if slot.is_some() || first.is_some() {
            let span = self.sp(node.name().span());
            let name = node.name().value();
            let mut d = Diagnostic::error(
                "cairn::schema::duplicate_node",
                span,
                format!("`{name}` is given twice"),
            )
            .with_label("given again here")
            .with_help(format!("keep one `{name}`"));
            if let Some(first) = first {
                d = d.and_label(first, "first given here");
            }
            self.diags.push(d);
            return;
        }
        *slot = value;
    }

    // ---- the language ---------------------------------------------------

    fn document(&mut self, doc: &KdlDocument, set: &mut SpecSet) {
        for child in self.children(Some(doc), "", "a spec file") {
            let node = child.node;
            match child.name {
                "node-class" => {
                    if let Some(x) = self.node_class(node) {
                        set.node_classes.push(x);
                    }
                }
                "site" => {
                    if let Some(x) = self.site(node) {
                        set.sites.push(x);
                    }
                }
                "tenant" => {
                    if let Some(x) = self.tenant(node) {
                        set.tenants.push(x);
                    }
                }
                "sla-profile" => {
                    if let Some(name) = self.name(node) {
                        let class = self.required(node, "class", "\"reserved\"").and_then(|e| {
                            self.keyword(e, "the SLA class", SlaClass::KEYWORDS, SlaClass::parse)
                        });
                        let priority = self
                            .required(node, "priority", "500")
                            .and_then(|e| self.u32(e, "the priority", 0, 1000));
                        let cpu_pinning = self
                            .prop(node, "cpu-pinning")
                            .and_then(|e| self.bool(e, "cpu-pinning"));
                        set.sla_profiles.push(SlaProfileSpec {
                            name,
                            class,
                            priority,
                            cpu_pinning,
                        });
                    }
                }
                "image" => {
                    if let Some(x) = self.image(node) {
                        set.images.push(x);
                    }
                }
                "vm" => {
                    if let Some(name) = self.name(node) {
                        let tenant = self
                            .required(node, "tenant", "\"finance\"")
                            .and_then(|e| self.name_value(e, "the tenant"));
                        let site = self
                            .required(node, "site", "\"hq\"")
                            .and_then(|e| self.name_value(e, "the site"));
                        let body = self.vm_body(node, "vm", &mut None, &mut None);
                        set.vms.push(VmSpec {
                            name,
                            tenant,
                            site,
                            body,
                        });
                    }
                }
                "vm-group" => {
                    if let Some(name) = self.name(node) {
                        let tenant = self
                            .required(node, "tenant", "\"shop\"")
                            .and_then(|e| self.name_value(e, "the tenant"));
                        let site = self
                            .required(node, "site", "\"hq\"")
                            .and_then(|e| self.name_value(e, "the site"));
                        let replicas = self
                            .required(node, "replicas", "3")
                            .and_then(|e| self.u32(e, "the replica count", 0, 10_000));
                        let mut spread = None;
                        let mut max_unavailable = None;
                        let body =
                            self.vm_body(node, "vm-group", &mut spread, &mut max_unavailable);
                        set.vm_groups.push(VmGroupSpec {
                            name,
                            tenant,
                            site,
                            replicas,
                            spread,
                            max_unavailable,
                            body,
                        });
                    }
                }
                "affinity" => {
                    if let Some(x) = self.affinity(node) {
                        set.affinities.push(x);
                    }
                }
                "protection-plan" => {
                    if let Some(x) = self.protection_plan(node) {
                        set.protection_plans.push(x);
                    }
                }
                "reconcile" => set.reconcile.push(self.reconcile(node)),
                _ => {}
            }
        }
    }

    fn host_disk(&mut self, node: &KdlNode) -> Option<HostDisk> {
        let name = self.name(node)?;
        let size = self
            .required(node, "size", "\"1600GB\"")
            .and_then(|e| self.size(e, "the disk size"));
        let class = self
            .required(node, "class", "\"ssd\"")
            .and_then(|e| self.name_value(e, "the disk class"));
        Some(HostDisk { name, size, class })
    }

    fn host_nic(&mut self, node: &KdlNode) -> Option<HostNic> {
        let name = self
            .arg(node, 0)
            .and_then(|e| self.string(e, "the NIC name"))?;
        let speed = self
            .required(node, "speed", "\"25Gbps\"")
            .and_then(|e| self.bandwidth(e, "the NIC speed"));
        Some(HostNic { name, speed })
    }

    fn key_value(&mut self, node: &KdlNode, what: &str) -> Option<KeyValue> {
        let key = self
            .arg(node, 0)
            .and_then(|e| self.string(e, &format!("the {what} key")))?;
        let value = self
            .arg(node, 1)
            .and_then(|e| self.string(e, &format!("the {what} value")))?;
        Some(KeyValue { key, value })
    }

    fn node_class(&mut self, node: &KdlNode) -> Option<NodeClassSpec> {
        let name = self.name(node)?;
        let mut spec = NodeClassSpec {
            name,
            cpu: None,
            memory: None,
            reserve_cpu: None,
            reserve_memory: None,
            disks: vec![],
            nics: vec![],
            labels: vec![],
        };
        let mut reserve_seen = None;
        // Whether a `cpu` node is written at all: one whose value was refused
        // (out of range, not a number) has had its diagnostic and is not also
        // missing.
        let mut cpu_given = false;
        let mut memory_given = false;
        self.suggested.clear();
        for c in self.children(node.children(), "node-class", "a `node-class`") {
            let n = c.node;
            match c.name {
                "cpu" => {
                    cpu_given = true;
                    let v = self
                        .single_value(n)
                        .and_then(|e| self.u32(e, "the CPU count", 1, 1 << 20));
                    let first = spec.cpu.as_ref().map(|s| s.span);
                    self.once(&mut spec.cpu, v, n, first);
                }
                "memory" => {
                    memory_given = true;
                    let v = self
                        .single_value(n)
                        .and_then(|e| self.size(e, "the memory size"));
                    let first = spec.memory.as_ref().map(|s| s.span);
                    self.once(&mut spec.memory, v, n, first);
                }
                "host-reserve" => {
                    let mut slot: Option<()> = reserve_seen.map(|_| ());
                    let first = reserve_seen;
                    self.once(&mut slot, Some(()), n, first);
                    if reserve_seen.is_none() {
                        reserve_seen = Some(self.sp(n.span()));
                        spec.reserve_cpu = self
                            .prop(n, "cpu")
                            .and_then(|e| self.u32(e, "the reserved CPU count", 0, 1 << 20));
                        spec.reserve_memory = self
                            .prop(n, "memory")
                            .and_then(|e| self.size(e, "the reserved memory"));
                    }
                }
                "disk" => spec.disks.extend(self.host_disk(n)),
                "nic" => spec.nics.extend(self.host_nic(n)),
                "label" => spec.labels.extend(self.key_value(n, "label")),
                _ => {}
            }
        }
        let span = self.sp(node.name().span());
        let typos = std::mem::take(&mut self.suggested);
        if !cpu_given && !typos.contains(&"cpu") {
            self.err(
                "cairn::schema::missing_node",
                span,
                format!("node-class `{}` has no `cpu`", spec.name.value),
            )
            .help = Some("add `cpu 32` (hardware threads)".to_owned());
        }
        if !memory_given && !typos.contains(&"memory") {
            self.err(
                "cairn::schema::missing_node",
                span,
                format!("node-class `{}` has no `memory`", spec.name.value),
            )
            .help = Some("add `memory \"256GiB\"`".to_owned());
        }
        Some(spec)
    }

    fn site(&mut self, node: &KdlNode) -> Option<SiteSpec> {
        let name = self.name(node)?;
        let mut site = SiteSpec {
            name,
            overcommit_cpu: None,
            overcommit_memory: None,
            ha_reserve: None,
            strategy: None,
            rebalance_threshold: None,
            max_moves: None,
            witness: None,
            witness_alternate: None,
            failure_detect: None,
            racks: vec![],
            bonds: vec![],
            pools: vec![],
        };
        let mut seen: Vec<(&str, Span)> = vec![];
        for c in self.children(node.children(), "site", "a `site`") {
            let n = c.node;
            if matches!(
                c.name,
                "overcommit" | "ha-reserve" | "scheduler" | "witness" | "failure-detect"
            ) {
                let first = seen.iter().find(|(k, _)| *k == c.name).map(|(_, s)| *s);
                if first.is_some() {
                    self.once(&mut Some(()), Some(()), n, first);
                    continue;
                }
                seen.push((c.name, self.sp(n.name().span())));
            }
            match c.name {
                "overcommit" => {
                    site.overcommit_cpu = self
                        .prop(n, "cpu")
                        .and_then(|e| self.float(e, "the CPU overcommit", 1.0, 64.0));
                    site.overcommit_memory = self
                        .prop(n, "memory")
                        .and_then(|e| self.float(e, "the memory overcommit", 1.0, 16.0));
                }
                "ha-reserve" => {
                    site.ha_reserve = self
                        .required(n, "nodes", "1")
                        .and_then(|e| self.u32(e, "the HA reserve node count", 0, 1000));
                }
                "scheduler" => {
                    site.strategy = self.prop(n, "strategy").and_then(|e| {
                        self.keyword(
                            e,
                            "the scheduler strategy",
                            Strategy::KEYWORDS,
                            Strategy::parse,
                        )
                    });
                    for r in self.children(n.children(), "site.scheduler", "`scheduler`") {
                        let rn = r.node;
                        site.rebalance_threshold = self
                            .prop(rn, "threshold")
                            .and_then(|e| self.float(e, "the rebalance threshold", 0.0, 1.0));
                        site.max_moves = self
                            .prop(rn, "max-moves")
                            .and_then(|e| self.u32(e, "the rebalance move budget", 0, 1_000_000));
                    }
                }
                "witness" => {
                    site.witness = self
                        .required(n, "address", "\"10.0.9.5:7400\"")
                        .and_then(|e| self.address(e, "the witness address"));
                    site.witness_alternate = self
                        .prop(n, "alternate")
                        .and_then(|e| self.address(e, "the alternate witness address"));
                    if let (Some(preferred), Some(alternate)) =
                        (&site.witness, &site.witness_alternate)
                        && preferred.value == alternate.value
                    {
                        let span = alternate.span;
                        self.err(
                            "cairn::schema::invalid_value",
                            span,
                            format!(
                                "the alternate witness `{}` is the preferred one",
                                alternate.value
                            ),
                        )
                        .help = Some(
                            "name a second witness on another host, or leave `alternate=` out"
                                .to_owned(),
                        );
                    }
                }
                "failure-detect" => {
                    site.failure_detect = self.required(n, "after", "\"3s\"").and_then(|e| {
                        self.duration_within(
                            e,
                            "the failure-detect time",
                            crate::model::timers::MIN_DETECT_MS,
                            crate::model::timers::MAX_DETECT_MS,
                        )
                    });
                }
                "rack" => site.racks.extend(self.rack(n)),
                "bond" => site.bonds.extend(self.bond(n)),
                "pool" => site.pools.extend(self.pool(n)),
                _ => {}
            }
        }
        Some(site)
    }

    fn address(&mut self, entry: &KdlEntry, what: &str) -> Option<Spanned<String>> {
        let s = self.string(entry, what)?;
        if parse_host_port(&s.value).is_none() {
            self.err("cairn::schema::invalid_value", s.span, format!("{what} `{}` is not `host:port`", s.value)).help =
                Some("write an IP address or host name and a port, e.g. \"10.0.1.11:7100\" or \"[::1]:7100\"".to_owned());
            return None;
        }
        Some(s)
    }

    /// A node's `underlay="A.B.C.D/N"`: an IPv4 host address (not the network's
    /// or broadcast address) with a prefix length of 8 to 30.
    fn underlay(&mut self, entry: &KdlEntry) -> Option<Spanned<String>> {
        let s = self.string(entry, "the underlay address")?;
        if let Err(problem) = crate::cidr::underlay_host(&s.value) {
            self.err(
                "cairn::schema::invalid_value",
                s.span,
                format!("underlay address `{}` {problem}", s.value),
            )
            .help = Some(
                "write the node's tunnel endpoint address on its guest bond with its prefix, e.g. \"10.255.0.11/24\"".to_owned(),
            );
            return None;
        }
        Some(s)
    }

    fn rack(&mut self, node: &KdlNode) -> Option<RackSpec> {
        let name = self.name(node)?;
        let mut rack = RackSpec {
            name,
            nodes: vec![],
        };
        for c in self.children(node.children(), "site.rack", "a `rack`") {
            let n = c.node;
            let Some(name) = self.name(n) else { continue };
            let class = self
                .required(n, "class", "\"std\"")
                .and_then(|e| self.name_value(e, "the node class"));
            let address = self
                .required(n, "address", "\"10.0.1.11:7100\"")
                .and_then(|e| self.address(e, "the node address"));
            let underlay = self.prop(n, "underlay").and_then(|e| self.underlay(e));
            let maintenance = self
                .prop(n, "maintenance")
                .and_then(|e| self.bool(e, "maintenance"));
            let mut spec = NodeSpec {
                name,
                class,
                address,
                underlay,
                maintenance,
                labels: vec![],
                disks: vec![],
                nics: vec![],
            };
            for cc in self.children(n.children(), "site.rack.node", "a `node`") {
                match cc.name {
                    "label" => spec.labels.extend(self.key_value(cc.node, "label")),
                    "disk" => spec.disks.extend(self.host_disk(cc.node)),
                    "nic" => spec.nics.extend(self.host_nic(cc.node)),
                    _ => {}
                }
            }
            rack.nodes.push(spec);
        }
        Some(rack)
    }

    fn bond(&mut self, node: &KdlNode) -> Option<BondSpec> {
        let name = self.name(node)?;
        let mode = self
            .required(node, "mode", "\"active-backup\"")
            .and_then(|e| self.keyword(e, "the bond mode", BondMode::KEYWORDS, BondMode::parse));
        let mtu = self
            .prop(node, "mtu")
            .and_then(|e| self.u32(e, "the MTU", 68, 65_535));
        let miimon = self
            .prop(node, "miimon")
            .and_then(|e| self.u32(e, "the link monitor interval (ms)", 1, 60_000));
        let mut bond = BondSpec {
            name,
            mode,
            mtu,
            miimon,
            members: vec![],
            members_span: self.sp(node.name().span()),
            traffic: vec![],
        };
        let mut members_seen = None;
        for c in self.children(node.children(), "site.bond", "a `bond`") {
            let n = c.node;
            match c.name {
                "members" => {
                    let first = members_seen;
                    if first.is_some() {
                        self.once(&mut Some(()), Some(()), n, first);
                        continue;
                    }
                    members_seen = Some(self.sp(n.name().span()));
                    bond.members_span = self.sp(n.span());
                    for e in n.entries().iter().filter(|e| e.name().is_none()) {
                        bond.members.extend(self.string(e, "a bond member"));
                    }
                }
                "traffic" => {
                    let Some(name) = self
                        .arg(n, 0)
                        .and_then(|e| self.string(e, "the traffic class"))
                    else {
                        continue;
                    };
                    if TrafficKind::parse(&name.value).is_none() {
                        let help = suggestion(&name.value, TrafficKind::KEYWORDS, "traffic class");
                        self.err(
                            "cairn::schema::invalid_value",
                            name.span,
                            format!("`{}` is not a traffic class the runtime knows", name.value),
                        )
                        .help = Some(help);
                    }
                    let min = self
                        .prop(n, "min")
                        .and_then(|e| self.bandwidth(e, "the guaranteed rate"));
                    let max = self
                        .prop(n, "max")
                        .and_then(|e| self.bandwidth(e, "the rate ceiling"));
                    let weight = self
                        .prop(n, "weight")
                        .and_then(|e| self.u32(e, "the weight", 1, 100));
                    bond.traffic.push(TrafficSpec {
                        name,
                        min,
                        max,
                        weight,
                    });
                }
                _ => {}
            }
        }
        Some(bond)
    }

    fn pool(&mut self, node: &KdlNode) -> Option<PoolSpec> {
        let name = self.name(node)?;
        let disk_class = self
            .required(node, "disk-class", "\"ssd\"")
            .and_then(|e| self.name_value(e, "the disk class"));
        let replicas = self
            .required(node, "replicas", "3")
            .and_then(|e| self.u32(e, "the replica count", 1, 16));
        let failure_domain = self
            .required(node, "failure-domain", "\"rack\"")
            .and_then(|e| self.keyword(e, "the failure domain", Domain::KEYWORDS, Domain::parse));
        let mut pool = PoolSpec {
            name,
            disk_class,
            replicas,
            failure_domain,
            stripe_width: None,
            stripe_unit: None,
            thin_overcommit: None,
        };
        for c in self.children(node.children(), "site.pool", "a `pool`") {
            let n = c.node;
            match c.name {
                "stripe-width" => {
                    let v = self
                        .single_value(n)
                        .and_then(|e| self.u32(e, "the stripe width", 1, 64));
                    let first = pool.stripe_width.as_ref().map(|s| s.span);
                    self.once(&mut pool.stripe_width, v, n, first);
                }
                "stripe-unit" => {
                    let v = self
                        .single_value(n)
                        .and_then(|e| self.size(e, "the stripe unit"));
                    if let Some(v) = &v
                        && (!v.value.is_power_of_two() || v.value < 4096 || v.value > 64 << 20)
                    {
                        self.err(
                            "cairn::schema::out_of_range",
                            v.span,
                            format!(
                                "the stripe unit {} is not a power of two between 4KiB and 64MiB",
                                units::format_size(v.value)
                            ),
                        )
                        .help = Some("use one of 4KiB, 8KiB, …, 1MiB, …, 64MiB".to_owned());
                    }
                    let first = pool.stripe_unit.as_ref().map(|s| s.span);
                    self.once(&mut pool.stripe_unit, v, n, first);
                }
                "thin-overcommit" => {
                    let v = self
                        .single_value(n)
                        .and_then(|e| self.float(e, "the thin overcommit", 1.0, 100.0));
                    let first = pool.thin_overcommit.as_ref().map(|s| s.span);
                    self.once(&mut pool.thin_overcommit, v, n, first);
                }
                _ => {}
            }
        }
        Some(pool)
    }

    fn tenant(&mut self, node: &KdlNode) -> Option<TenantSpec> {
        let name = self.name(node)?;
        let mut t = TenantSpec {
            name,
            quota: None,
            members: vec![],
            budget: None,
            networks: vec![],
            security_groups: vec![],
        };
        for c in self.children(node.children(), "tenant", "a `tenant`") {
            let n = c.node;
            match c.name {
                "quota" => {
                    let q = QuotaSpec {
                        span: self.sp(n.name().span()),
                        vcpus: self
                            .prop(n, "vcpus")
                            .and_then(|e| self.u64(e, "the vCPU quota", 0)),
                        memory: self
                            .prop(n, "memory")
                            .and_then(|e| self.size(e, "the memory quota")),
                        storage: self
                            .prop(n, "storage")
                            .and_then(|e| self.size(e, "the storage quota")),
                        vms: self
                            .prop(n, "vms")
                            .and_then(|e| self.u64(e, "the VM quota", 0)),
                    };
                    let first = t.quota.as_ref().map(|q| q.span);
                    self.once(&mut t.quota, Some(q), n, first);
                }
                "member" => {
                    let Some(email) = self.arg(n, 0).and_then(|e| self.string(e, "the member"))
                    else {
                        continue;
                    };
                    if !is_email(&email.value) {
                        self.err(
                            "cairn::schema::invalid_value",
                            email.span,
                            format!("`{}` is not an e-mail address", email.value),
                        )
                        .help = Some(
                            "members are e-mail addresses, e.g. \"alice@example.com\"".to_owned(),
                        );
                    }
                    let role = self
                        .required(n, "role", "\"viewer\"")
                        .and_then(|e| self.keyword(e, "the role", Role::KEYWORDS, Role::parse));
                    let key = self
                        .prop(n, "key")
                        .and_then(|e| self.string(e, "the member's key"))
                        .and_then(|k| self.member_key(k));
                    t.members.push(MemberSpec { email, role, key });
                }
                "budget" => {
                    let b = BudgetSpec {
                        span: self.sp(n.name().span()),
                        monthly: self
                            .required(n, "monthly", "4000")
                            .and_then(|e| self.float(e, "the monthly budget", 0.0, 1e15)),
                        currency: self
                            .prop(n, "currency")
                            .and_then(|e| self.string(e, "the currency")),
                    };
                    if let Some(c) = &b.currency
                        && !(c.value.len() == 3
                            && c.value.chars().all(|ch| ch.is_ascii_uppercase()))
                    {
                        self.err(
                            "cairn::schema::invalid_value",
                            c.span,
                            format!("`{}` is not an ISO 4217 currency code", c.value),
                        )
                        .help = Some(
                            "use three upper-case letters, e.g. \"USD\" or \"EUR\"".to_owned(),
                        );
                    }
                    let first = t.budget.as_ref().map(|b| b.span);
                    self.once(&mut t.budget, Some(b), n, first);
                }
                "network" => {
                    let Some(name) = self.name(n) else { continue };
                    let site = self
                        .required(n, "site", "\"hq\"")
                        .and_then(|e| self.name_value(e, "the site"));
                    let cidr = self
                        .required(n, "cidr", "\"10.20.0.0/24\"")
                        .and_then(|e| self.string(e, "the CIDR"));
                    let gateway = self
                        .prop(n, "gateway")
                        .and_then(|e| self.string(e, "the gateway"));
                    let external = self
                        .prop(n, "external")
                        .and_then(|e| self.bool(e, "external"));
                    let ipv6 = self
                        .prop(n, "ipv6")
                        .and_then(|e| self.string(e, "the IPv6 prefix"));
                    t.networks.push(NetworkSpec {
                        name,
                        site,
                        cidr,
                        gateway,
                        external,
                        ipv6,
                    });
                }
                "security-group" => {
                    let Some(name) = self.name(n) else { continue };
                    let mut sg = SecurityGroupSpec {
                        name,
                        allow: vec![],
                    };
                    for a in
                        self.children(n.children(), "tenant.security-group", "a `security-group`")
                    {
                        let an = a.node;
                        sg.allow.push(AllowSpec {
                            span: self.sp(an.span()),
                            from: self
                                .required(an, "from", "\"fin-app\"")
                                .and_then(|e| self.string(e, "the source")),
                            to: self
                                .prop(an, "to")
                                .and_then(|e| self.string(e, "the destination")),
                            proto: self.prop(an, "proto").and_then(|e| {
                                self.keyword(e, "the protocol", Proto::KEYWORDS, Proto::parse)
                            }),
                            port: self.prop(an, "port").and_then(|e| self.port_range(e)),
                        });
                    }
                    t.security_groups.push(sg);
                }
                _ => {}
            }
        }
        Some(t)
    }

    fn image(&mut self, node: &KdlNode) -> Option<ImageSpec> {
        let name = self.name(node)?;
        let builtin = self
            .prop(node, "builtin")
            .and_then(|e| self.string(e, "the built-in image"));
        let mut img = ImageSpec {
            name,
            builtin,
            kernel: None,
            initrd: None,
            cmdline: None,
            disk: None,
        };
        for c in self.children(node.children(), "image", "an `image`") {
            let n = c.node;
            if c.name == "disk" {
                let path = self
                    .single_value(n)
                    .and_then(|e| self.string(e, "the disk file"));
                let format = self
                    .prop(n, "format")
                    .and_then(|e| self.string(e, "the disk format"));
                let first = img.disk.as_ref().map(|d| d.path.span);
                let disk = path.map(|path| ImageDiskSpec { path, format });
                self.once(&mut img.disk, disk, n, first);
                continue;
            }
            let what = format!("the {}", c.name);
            let v = self.single_value(n).and_then(|e| self.string(e, &what));
            let slot = match c.name {
                "kernel" => &mut img.kernel,
                "initrd" => &mut img.initrd,
                _ => &mut img.cmdline,
            };
            let first = slot.as_ref().map(|s| s.span);
            self.once(slot, v, n, first);
        }
        Some(img)
    }

    fn vm_body(
        &mut self,
        node: &KdlNode,
        path: &str,
        spread: &mut Option<Spanned<Domain>>,
        max_unavailable: &mut Option<Spanned<u32>>,
    ) -> VmBody {
        let mut b = VmBody::default();
        let desc = format!("a `{path}`");
        // Whether a `cpu` node is written at all: one whose value was refused
        // (out of range, not a number) has had its diagnostic and is not also
        // missing.
        let mut image_given = false;
        let mut cpu_given = false;
        self.suggested.clear();
        for c in self.children(node.children(), path, &desc) {
            let n = c.node;
            match c.name {
                "cpu" => {
                    cpu_given = true;
                    let v = self.single_value(n).and_then(|e| self.vcpu_count(e));
                    let first = b.cpu.as_ref().map(|s| s.span);
                    self.once(&mut b.cpu, v, n, first);
                }
                "memory" => {
                    let v = self
                        .single_value(n)
                        .and_then(|e| self.size(e, "the memory size"));
                    // Refused but kept: the VM has its one diagnostic and is not
                    // also reported as having no memory.
                    if let Some(v) = &v {
                        self.within_runtime_limit(
                            v.span,
                            "the memory size",
                            i128::from(v.value),
                            &limits::MEMORY,
                            |m| format!("`memory \"{}\"`", units::format_size(m)),
                        );
                    }
                    let first = b.memory.as_ref().map(|s| s.span);
                    self.once(&mut b.memory, v, n, first);
                }
                "sla" => {
                    let v = self
                        .single_value(n)
                        .and_then(|e| self.name_value(e, "the SLA profile"));
                    let first = b.sla.as_ref().map(|s| s.span);
                    self.once(&mut b.sla, v, n, first);
                }
                "availability" => {
                    let v = self.single_value(n).and_then(|e| {
                        self.keyword(
                            e,
                            "the availability",
                            Availability::KEYWORDS,
                            Availability::parse,
                        )
                    });
                    let first = b.availability.as_ref().map(|s| s.span);
                    self.once(&mut b.availability, v, n, first);
                }
                "ft-epoch" => {
                    let v = self.single_value(n).and_then(|e| {
                        self.duration_within(
                            e,
                            "the FT epoch",
                            crate::model::FT_EPOCH_MIN_MS,
                            crate::model::FT_EPOCH_MAX_MS,
                        )
                    });
                    let first = b.ft_epoch.as_ref().map(|s| s.span);
                    self.once(&mut b.ft_epoch, v, n, first);
                }
                "power" => {
                    let v = self.single_value(n).and_then(|e| {
                        self.keyword(e, "the power state", Power::KEYWORDS, Power::parse)
                    });
                    let first = b.power.as_ref().map(|s| s.span);
                    self.once(&mut b.power, v, n, first);
                }
                "image" => {
                    image_given = true;
                    let v = self
                        .single_value(n)
                        .and_then(|e| self.name_value(e, "the image"));
                    let first = b.image.as_ref().map(|s| s.span);
                    self.once(&mut b.image, v, n, first);
                }
                "disk" => {
                    let Some(name) = self.name(n) else { continue };
                    let size = self
                        .required(n, "size", "\"40GiB\"")
                        .and_then(|e| self.size(e, "the disk size"));
                    if let Some(size) = &size {
                        self.within_runtime_limit(
                            size.span,
                            "the disk size",
                            i128::from(size.value),
                            &limits::DISK_SIZE,
                            // Rounded up to whole MiB, so `"1GB"` suggests `"954MiB"`
                            // rather than `"976564KiB"` (still a multiple of 4KiB).
                            |bytes| {
                                let mib = bytes.div_ceil(1 << 20) << 20;
                                format!("`size=\"{}\"`", units::format_size(mib))
                            },
                        );
                    }
                    let pool = self
                        .required(n, "pool", "\"fast\"")
                        .and_then(|e| self.name_value(e, "the pool"));
                    let from_image = self
                        .prop(n, "from-image")
                        .and_then(|e| self.bool(e, "from-image"));
                    let prevent_destroy = self
                        .prop(n, "prevent-destroy")
                        .and_then(|e| self.bool(e, "prevent-destroy"));
                    if let Err(error) = limits::DISKS.check(b.disks.len() as u64 + 1) {
                        self.err(
                            "cairn::schema::out_of_range",
                            name.span,
                            format!("{}: {error}", limits::DISKS.what),
                        )
                        .help = Some(limits::DISKS.rule());
                    }
                    b.disks.push(VmDiskSpec {
                        name,
                        size,
                        pool,
                        from_image,
                        prevent_destroy,
                    });
                }
                "nic" => {
                    let network = self
                        .required(n, "network", "\"fin-app\"")
                        .and_then(|e| self.name_value(e, "the network"));
                    let mut security_groups = vec![];
                    if let Some(e) = self.prop(n, "security-groups")
                        && let Some(s) = self.string(e, "the security groups")
                    {
                        for part in s.value.split([',', ' ']).filter(|p| !p.is_empty()) {
                            security_groups.push(Spanned {
                                value: part.to_owned(),
                                span: s.span,
                            });
                        }
                    }
                    let span = self.sp(n.span());
                    if let Err(error) = limits::NICS.check(b.nics.len() as u64 + 1) {
                        self.err(
                            "cairn::schema::out_of_range",
                            span,
                            format!("{}: {error}", limits::NICS.what),
                        )
                        .help = Some(limits::NICS.rule());
                    }
                    let address = self
                        .prop(n, "address")
                        .and_then(|e| self.string(e, "the address"));
                    b.nics.push(VmNicSpec {
                        span,
                        network,
                        security_groups,
                        address,
                    });
                }
                "tag" => b.tags.extend(self.key_value(n, "tag")),
                "spread" => {
                    let v = self.single_value(n).and_then(|e| {
                        self.keyword(e, "the spread scope", Domain::KEYWORDS, Domain::parse)
                    });
                    let first = spread.as_ref().map(|s| s.span);
                    self.once(spread, v, n, first);
                }
                "max-unavailable" => {
                    let v = self
                        .single_value(n)
                        .and_then(|e| self.u32(e, "max-unavailable", 1, 10_000));
                    let first = max_unavailable.as_ref().map(|s| s.span);
                    self.once(max_unavailable, v, n, first);
                }
                _ => {}
            }
        }
        let span = self.sp(node.name().span());
        let kind = node.name().value();
        let typos = std::mem::take(&mut self.suggested);
        if !cpu_given && !typos.contains(&"cpu") {
            self.err(
                "cairn::schema::missing_node",
                span,
                format!("this `{kind}` has no `cpu`"),
            )
            .help = Some("add `cpu 2` (vCPUs)".to_owned());
        }
        if b.memory.is_none() && !typos.contains(&"memory") {
            self.err(
                "cairn::schema::missing_node",
                span,
                format!("this `{kind}` has no `memory`"),
            )
            .help = Some("add `memory \"4GiB\"`".to_owned());
        }
        if !image_given && !typos.contains(&"image") {
            self.err(
                "cairn::schema::missing_node",
                span,
                format!("this `{kind}` has no `image`"),
            )
            .help = Some(
                "add `image \"tiny\"` (the built-in guest) or the name of an `image`".to_owned(),
            );
        }
        b
    }

    fn selector(&mut self, node: &KdlNode) -> SelectorSpec {
        let mut pairs = vec![];
        for e in node.entries() {
            let Some(key) = e.name() else { continue };
            let Some(value) = self.string(e, &format!("selector value for `{}`", key.value()))
            else {
                continue;
            };
            pairs.push(KeyValue {
                key: Spanned {
                    value: key.value().to_owned(),
                    span: self.sp(key.span()),
                },
                value,
            });
        }
        let span = self.sp(node.span());
        if pairs.is_empty() {
            let name = node.name().value();
            self.err(
                "cairn::schema::empty_selector",
                span,
                format!("`{name}` selects nothing: it has no KEY=VALUE pairs"),
            )
            .help = Some(format!("for example `{name} app=\"ledger\"`"));
        }
        SelectorSpec { span, pairs }
    }

    fn affinity(&mut self, node: &KdlNode) -> Option<AffinitySpec> {
        let name = self.name(node)?;
        let kind = self.required(node, "kind", "\"apart\"").and_then(|e| {
            self.keyword(
                e,
                "the affinity kind",
                AffinityKind::KEYWORDS,
                AffinityKind::parse,
            )
        });
        let scope = self
            .prop(node, "scope")
            .and_then(|e| self.keyword(e, "the scope", Domain::KEYWORDS, Domain::parse));
        let hard = self.prop(node, "hard").and_then(|e| self.bool(e, "hard"));
        let weight = self
            .prop(node, "weight")
            .and_then(|e| self.u32(e, "the weight", 1, 100));
        let mut a = AffinitySpec {
            name,
            kind,
            scope,
            hard,
            weight,
            select: None,
            nodes: None,
        };
        for c in self.children(node.children(), "affinity", "an `affinity`") {
            let n = c.node;
            let sel = self.selector(n);
            let slot = if c.name == "select" {
                &mut a.select
            } else {
                &mut a.nodes
            };
            let first = slot.as_ref().map(|s| s.span);
            self.once(slot, Some(sel), n, first);
        }
        Some(a)
    }

    fn protection_plan(&mut self, node: &KdlNode) -> Option<ProtectionPlanSpec> {
        let name = self.name(node)?;
        let mut p = ProtectionPlanSpec {
            name,
            snapshot: None,
            replicate: vec![],
            applies_to: None,
        };
        for c in self.children(node.children(), "protection-plan", "a `protection-plan`") {
            let n = c.node;
            let span = self.sp(n.span());
            match c.name {
                "snapshot" => {
                    let s = SnapshotSpec {
                        span,
                        every: self
                            .required(n, "every", "\"15m\"")
                            .and_then(|e| self.duration(e, "the snapshot interval")),
                        keep: self
                            .required(n, "keep", "96")
                            .and_then(|e| self.u32(e, "the snapshots kept", 1, 100_000)),
                    };
                    let first = p.snapshot.as_ref().map(|s| s.span);
                    self.once(&mut p.snapshot, Some(s), n, first);
                }
                "replicate" => {
                    p.replicate.push(ReplicateSpec {
                        span,
                        to_site: self
                            .required(n, "to-site", "\"dr\"")
                            .and_then(|e| self.name_value(e, "the target site")),
                        pool: self
                            .required(n, "pool", "\"archive\"")
                            .and_then(|e| self.name_value(e, "the target pool")),
                        every: self
                            .required(n, "every", "\"1h\"")
                            .and_then(|e| self.duration(e, "the replication interval")),
                        keep: self
                            .required(n, "keep", "24")
                            .and_then(|e| self.u32(e, "the copies kept", 1, 100_000)),
                    });
                }
                "applies-to" => {
                    let sel = self.selector(n);
                    let first = p.applies_to.as_ref().map(|s| s.span);
                    self.once(&mut p.applies_to, Some(sel), n, first);
                }
                _ => {}
            }
        }
        Some(p)
    }
}

fn describe(v: &KdlValue) -> String {
    match v {
        KdlValue::String(s) => format!("the string \"{s}\""),
        KdlValue::Integer(i) => format!("the number {i}"),
        KdlValue::Float(f) => format!("the number {f}"),
        KdlValue::Bool(b) => format!("the boolean #{b}"),
        KdlValue::Null => "#null".to_owned(),
    }
}

/// Whether `s` is a DNS label (`[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`).
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl Cx<'_> {
    /// A member's `key=`: an SSH ed25519 public key; `None` (and a
    /// diagnostic saying what is wrong and what is right) otherwise.
    fn member_key(&mut self, k: Spanned<String>) -> Option<Spanned<String>> {
        match crate::sshkey::parse(&k.value) {
            Ok(key) => Some(Spanned {
                value: key.canonical(),
                span: k.span,
            }),
            Err(what) => {
                self.err(
                    "cairn::schema::invalid_key",
                    k.span,
                    format!("the member's key is not an SSH ed25519 public key: {what}"),
                )
                .help = Some(
                    "write the line of the member's `id_ed25519.pub` (`ssh-keygen -t ed25519` makes it), e.g. key=\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI… alice@laptop\"".to_owned(),
                );
                None
            }
        }
    }
}

fn is_email(s: &str) -> bool {
    let mut parts = s.splitn(2, '@');
    let (Some(local), Some(domain)) = (parts.next(), parts.next()) else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.contains(' ')
}

/// Splits `host:port` (IPv6 in brackets), checking the port.
pub fn parse_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        (h, p)
    } else {
        s.rsplit_once(':')?
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    (port != 0).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::lower_all_in;

    /// Lowering on two threads gives the set and the diagnostics, in order,
    /// of lowering every file on one, errors in both halves included.
    #[test]
    fn two_threads_lower_as_one_does() {
        let mut files = crate::generate::generate(&crate::generate::GenConfig {
            nodes: 30,
            vms: 400,
            seed: 3,
        });
        // Errors early and late in path order.
        files.push((
            "aa-broken.kdl".to_owned(),
            "vm \"x\" {\n    cpu \"many\"\n".to_owned(),
        ));
        files.push((
            "zz-broken.kdl".to_owned(),
            "vm \"y\" {\n    cpu -1\n    nope 1\n}\n".to_owned(),
        ));
        let sources = crate::Sources::from_files(files);
        let (mut one, mut two) = (vec![], vec![]);
        let set_one = lower_all_in(&sources, &mut one, usize::MAX);
        let set_two = lower_all_in(&sources, &mut two, 0);
        assert!(one.len() >= 2, "the test needs diagnostics: {one:?}");
        assert_eq!(format!("{two:?}"), format!("{one:?}"));
        assert_eq!(format!("{set_two:?}"), format!("{set_one:?}"));
        assert!(set_one.vms.len() > 100 && !set_one.vm_groups.is_empty());
    }
}
