//! Diagnostics: what went wrong, where, and what would be right.
//!
//! Every phase reports problems as [`Diagnostic`] values instead of stopping at
//! the first one. A diagnostic carries a stable code (`cairn::resolve::unknown_tenant`),
//! labelled spans into the loaded sources and an optional help text. Rendering is
//! separate from reporting so that the same diagnostic can be shown as a miette
//! report on a terminal, as a one-line summary, or as JSON.

use std::fmt;
use std::sync::Arc;

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource};
use schemars::JsonSchema;
use serde::Serialize;

use crate::source::{FileId, Sources};

/// A byte range in one loaded source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    /// The file the range is in.
    pub file: FileId,
    /// Byte offset of the first byte.
    pub start: usize,
    /// Length in bytes.
    pub len: usize,
}

impl Span {
    /// A span from a file and a miette span.
    pub fn new(file: FileId, span: miette::SourceSpan) -> Span {
        Span {
            file,
            start: span.offset(),
            len: span.len(),
        }
    }
}

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The specs are not acceptable.
    Error,
    /// Worth a look; does not fail a command.
    Warning,
}

/// A span with the text shown next to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// Where.
    pub span: Span,
    /// What the reader should notice there.
    pub message: String,
}

/// One problem found in the specs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Stable code, e.g. `cairn::resolve::unknown_tenant`.
    pub code: &'static str,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong, in one sentence without a trailing period.
    pub message: String,
    /// Primary label first; further labels may point into other files.
    pub labels: Vec<Label>,
    /// What would be right.
    pub help: Option<String>,
}

impl Diagnostic {
    /// An error with a primary label.
    pub fn error(code: &'static str, span: Span, message: impl Into<String>) -> Diagnostic {
        let message = message.into();
        Diagnostic {
            code,
            severity: Severity::Error,
            labels: vec![Label {
                span,
                message: String::new(),
            }],
            message,
            help: None,
        }
    }

    /// A warning with a primary label.
    pub fn warning(code: &'static str, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, span, message)
        }
    }

    /// Sets the text of the primary label.
    pub fn with_label(mut self, text: impl Into<String>) -> Diagnostic {
        if let Some(first) = self.labels.first_mut() {
            first.message = text.into();
        }
        self
    }

    /// Adds a secondary label.
    pub fn and_label(mut self, span: Span, text: impl Into<String>) -> Diagnostic {
        self.labels.push(Label {
            span,
            message: text.into(),
        });
        self
    }

    /// Sets the help text.
    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// The primary span.
    pub fn primary_span(&self) -> Option<Span> {
        self.labels.first().map(|l| l.span)
    }

    /// Whether this is an error.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// Orders diagnostics by file path, then position, then code, so output never
/// depends on the order in which checks ran.
pub fn sort(sources: &Sources, diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by(|a, b| {
        let key = |d: &Diagnostic| {
            let span = d.primary_span();
            (
                span.map(|s| sources.path(s.file).to_owned()),
                span.map(|s| s.start),
                d.code,
                d.message.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
}

/// A 1-based line and column (in characters) of a byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LineCol {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
}

/// Computes the line and column of a byte offset in a text.
pub fn line_col(text: &str, offset: usize) -> LineCol {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    LineCol { line, column }
}

/// `file:line:column` of a span.
pub fn location(sources: &Sources, span: Span) -> String {
    let lc = line_col(sources.text(span.file), span.start);
    format!("{}:{}:{}", sources.path(span.file), lc.line, lc.column)
}

/// The JSON shape of a diagnostic (`cairn validate --format json`).
#[derive(Debug, Serialize, JsonSchema)]
pub struct DiagnosticJson {
    /// `error` or `warning`.
    pub severity: Severity,
    /// Stable code.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
    /// Spec file of the primary label, relative to the spec root.
    pub file: Option<String>,
    /// 1-based line of the primary label.
    pub line: Option<usize>,
    /// 1-based column of the primary label.
    pub column: Option<usize>,
    /// What would be right.
    pub help: Option<String>,
    /// Every label, primary first.
    pub labels: Vec<LabelJson>,
}

/// The JSON shape of a label.
#[derive(Debug, Serialize, JsonSchema)]
pub struct LabelJson {
    /// Spec file relative to the spec root.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Text shown at the span.
    pub message: String,
}

/// The whole `cairn validate --format json` document.
///
/// It is printed through [`serde_json::Value`], so its keys (and the keys of
/// every diagnostic in it) come out sorted, as they always have.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DiagnosticsJson {
    /// Version of this JSON shape: [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Every diagnostic, in the order they are reported.
    pub diagnostics: Vec<DiagnosticJson>,
}

/// Version of the `cairn validate --format json` shape.
pub const FORMAT_VERSION: u32 = 1;

/// Converts a diagnostic to its JSON shape.
pub fn to_json(sources: &Sources, d: &Diagnostic) -> DiagnosticJson {
    let labels: Vec<LabelJson> = d
        .labels
        .iter()
        .map(|l| {
            let lc = line_col(sources.text(l.span.file), l.span.start);
            LabelJson {
                file: sources.path(l.span.file).to_owned(),
                line: lc.line,
                column: lc.column,
                message: l.message.clone(),
            }
        })
        .collect();
    DiagnosticJson {
        severity: d.severity,
        code: d.code,
        message: d.message.clone(),
        file: labels.first().map(|l| l.file.clone()),
        line: labels.first().map(|l| l.line),
        column: labels.first().map(|l| l.column),
        help: d.help.clone(),
        labels,
    }
}

/// Renders a diagnostic as a miette report (no colour, fixed width, so the
/// text is the same on every terminal and in golden files).
pub fn render(sources: &Sources, d: &Diagnostic) -> String {
    let report = MietteView::new(sources, d);
    let handler = GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor())
        .with_width(100)
        .with_links(false);
    let mut out = String::new();
    // Rendering into a String cannot fail for lack of space; a formatting error
    // here would only come from our own Display impls, which do not fail.
    let _ = handler.render_report(&mut out, &report);
    // miette heads a related report with its severity and code; ours carry
    // no code, which would leave a bare "Advice: " line.
    out.replace("\nAdvice: \n", "\n")
}

/// Renders a list of diagnostics followed by a one-line summary.
pub fn render_all(sources: &Sources, diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diagnostics {
        out.push_str(&render(sources, d));
        out.push('\n');
    }
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = diagnostics.len() - errors;
    if !diagnostics.is_empty() {
        out.push_str(&format!(
            "{} {}, {} {}\n",
            errors,
            plural(errors, "error"),
            warnings,
            plural(warnings, "warning")
        ));
    }
    out
}

/// `1 error`, `2 errors`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// An adapter presenting one [`Diagnostic`] to miette. Labels in the primary
/// file are shown together; labels in other files become related reports.
struct MietteView {
    message: String,
    code: &'static str,
    severity: miette::Severity,
    help: Option<String>,
    source: Option<NamedSource<Arc<String>>>,
    labels: Vec<LabeledSpan>,
    related: Vec<MietteView>,
}

impl MietteView {
    fn new(sources: &Sources, d: &Diagnostic) -> MietteView {
        let severity = match d.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        };
        let Some(primary) = d.primary_span() else {
            return MietteView {
                message: d.message.clone(),
                code: d.code,
                severity,
                help: d.help.clone(),
                source: None,
                labels: vec![],
                related: vec![],
            };
        };
        let mut labels = vec![];
        let mut related = vec![];
        for l in &d.labels {
            let text = if l.message.is_empty() {
                None
            } else {
                Some(l.message.clone())
            };
            if l.span.file == primary.file {
                labels.push(LabeledSpan::new(text, l.span.start, l.span.len));
            } else {
                related.push(MietteView {
                    message: if l.message.is_empty() {
                        "related".to_owned()
                    } else {
                        l.message.clone()
                    },
                    code: d.code,
                    severity: miette::Severity::Advice,
                    help: None,
                    source: Some(named(sources, l.span.file)),
                    labels: vec![LabeledSpan::new(
                        Some(l.message.clone()),
                        l.span.start,
                        l.span.len,
                    )],
                    related: vec![],
                });
            }
        }
        MietteView {
            message: d.message.clone(),
            code: d.code,
            severity,
            help: d.help.clone(),
            source: Some(named(sources, primary.file)),
            labels,
            related,
        }
    }
}

fn named(sources: &Sources, file: FileId) -> NamedSource<Arc<String>> {
    NamedSource::new(sources.path(file), sources.text_arc(file))
}

impl fmt::Debug for MietteView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MietteView")
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for MietteView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MietteView {}

impl miette::Diagnostic for MietteView {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        if self.severity == miette::Severity::Advice {
            return None;
        }
        Some(Box::new(self.code))
    }
    fn severity(&self) -> Option<miette::Severity> {
        Some(self.severity)
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source.as_ref().map(|s| s as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.labels.is_empty() {
            return None;
        }
        Some(Box::new(self.labels.iter().cloned()))
    }
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        if self.related.is_empty() {
            return None;
        }
        Some(Box::new(
            self.related.iter().map(|r| r as &dyn miette::Diagnostic),
        ))
    }
}

/// The closest candidate to `word` by edit distance, if it is close enough to
/// be a plausible typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = strsim::damerau_levenshtein(word, c);
        let limit = (word.chars().count().max(c.chars().count()) / 3).max(1);
        let close = d <= limit
            || (c.starts_with(word) && word.len() >= 3)
            || (word.starts_with(c) && c.len() >= 3);
        if close && best.is_none_or(|(bd, bc)| (d, c) < (bd, bc)) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// `did you mean `x`?` or a list of what is accepted.
pub fn suggestion(word: &str, candidates: &[&str], what: &str) -> String {
    if let Some(s) = did_you_mean(word, candidates.iter().copied()) {
        return format!("did you mean `{s}`?");
    }
    if candidates.is_empty() {
        return format!("no {what} is defined");
    }
    let shown: Vec<String> = candidates
        .iter()
        .take(12)
        .map(|c| format!("`{c}`"))
        .collect();
    let more = if candidates.len() > 12 {
        format!(" and {} more", candidates.len() - 12)
    } else {
        String::new()
    };
    format!("expected one of {}{more}", shown.join(", "))
}
