//! The cairn spec compiler: KDL specs in, a checked model or precise errors out.
//!
//! Phases, each a function from data to data (see ARCHITECTURE.md):
//! [`source`] loads files (a directory or a git revision) → [`lower`] parses
//! them with spans and checks their shape → [`check`] resolves names, checks
//! the rules of SPEC.md and expands vm-groups into the [`model::Model`].
//! [`fmt`] rewrites specs canonically; [`generate`] writes synthetic spec repos.
//!
//! Architecture invariant: the compiler does no I/O beyond reading sources
//! (in [`source`]); it never talks to a node, the network or the state store.
//! Architecture invariant: every phase returns what it could build plus every
//! diagnostic it found; nothing stops at the first error, nothing panics on
//! user input.

#![warn(missing_docs)]

pub mod check;
pub mod cidr;
pub mod diag;
pub mod fmt;
pub mod generate;
pub mod ipam;
pub mod kdl_fast;
pub mod lower;
pub mod model;
pub mod place;
pub mod session;
pub mod shape;
pub mod source;
pub mod spec;
pub mod sshkey;
mod threads;
pub mod units;

pub use diag::{Diagnostic, Severity, Span};
pub use model::Model;
pub use source::{FileId, LoadError, Sources};

/// The result of compiling a spec root.
#[derive(Debug, Clone)]
pub struct Compilation {
    /// The model; present (possibly partial) even when there are errors.
    pub model: Model,
    /// Every problem found, sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
    /// Where each named object was declared.
    pub spans: check::SpanIndex,
}

impl Compilation {
    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// The model if there are no errors.
    pub fn ok(&self) -> Option<&Model> {
        (!self.has_errors()).then_some(&self.model)
    }
}

/// Compiles loaded sources: parse, lower, resolve, check, expand.
pub fn compile(sources: &Sources) -> Compilation {
    let mut diagnostics = vec![];
    if sources.is_empty() {
        diagnostics.push(no_specs());
    }
    let set = lower::lower_all(sources, &mut diagnostics);
    let (model, spans) = check::check(sources, &set, &mut diagnostics);
    diag::sort(sources, &mut diagnostics);
    diagnostics.dedup();
    Compilation {
        model,
        diagnostics,
        spans,
    }
}

/// The error of a root with no spec file.
fn no_specs() -> Diagnostic {
    Diagnostic {
        code: "cairn::load::no_specs",
        severity: Severity::Error,
        message: "no spec files (*.kdl) were found".to_owned(),
        labels: vec![],
        help: Some(
            "run cairn in a spec repository, or pass its directory: `cairn validate path/to/specs`"
                .to_owned(),
        ),
    }
}

/// The compiled model as pretty JSON (the `cairn compile --format json` output).
pub fn model_json(model: &Model) -> String {
    let mut s = serde_json::to_string_pretty(model)
        .expect("the model serializes: it holds only strings, numbers and maps");
    s.push('\n');
    s
}

/// The JSON Schema of the compiled model.
pub fn model_schema() -> String {
    let schema = schemars::schema_for!(Model);
    let mut s = serde_json::to_string_pretty(&schema).expect("schemas serialize");
    s.push('\n');
    s
}

/// The JSON Schema of a JSON *output* (what a command prints), as pretty
/// JSON. It is generated for serialization: a field that is always printed
/// is `required`, even when it may be `null`.
pub fn output_schema<T: schemars::JsonSchema>() -> String {
    let generator = schemars::generate::SchemaSettings::default()
        .for_serialize()
        .into_generator();
    let schema = generator.into_root_schema_for::<T>();
    let mut s = serde_json::to_string_pretty(&schema).expect("schemas serialize");
    s.push('\n');
    s
}

/// The JSON Schemas `cairn schema` writes: file name and text. (The
/// reconciler adds the schemas of its own outputs: plan, status, check, diff.)
pub fn schemas() -> Vec<(&'static str, String)> {
    vec![
        ("model.schema.json", model_schema()),
        ("spec.schema.json", shape::spec_schema()),
        ("placement.schema.json", place::placement_schema()),
        ("graph.schema.json", output_schema::<place::Graph>()),
        (
            "diagnostics.schema.json",
            output_schema::<diag::DiagnosticsJson>(),
        ),
    ]
}
