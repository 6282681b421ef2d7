//! Rendering a [`Report`]: text for people, JSON for scripts, SARIF 2.1.0 for
//! code-scanning UIs (GitHub, GitLab), JUnit XML for CI test tabs.
//!
//! Every format is deterministic (no clock, no absolute paths), so the
//! outputs can be pinned by golden tests.

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::Serialize;
use serde_json::json;

use crate::eval::{Enforcement, Finding, Report, RuleKind};

/// The version of the JSON shape of `cairn check --format json`.
pub const FORMAT_VERSION: u32 = 1;

fn tag(f: &Finding) -> &'static str {
    match (f.rule, f.blocking, f.overridden.is_some(), f.enforcement) {
        (RuleKind::Warn, ..) => "WARN",
        (RuleKind::Deny, _, true, _) => "OVERRIDDEN",
        (RuleKind::Deny, _, _, Enforcement::Advisory) => "ADVISORY",
        (RuleKind::Deny, ..) => "DENY",
    }
}

/// The one-line verdict.
pub fn summary(report: &Report) -> String {
    let n = report.policies.len();
    let verdict = if report.passed() { "passed" } else { "failed" };
    let mut s = format!(
        "{n} {}: {} blocking {}, {} {}",
        if n == 1 { "policy" } else { "policies" },
        report.blocking(),
        if report.blocking() == 1 {
            "denial"
        } else {
            "denials"
        },
        report.count(RuleKind::Warn),
        if report.count(RuleKind::Warn) == 1 {
            "warning"
        } else {
            "warnings"
        },
    );
    let advisory = report
        .findings
        .iter()
        .filter(|f| f.rule == RuleKind::Deny && f.enforcement == Enforcement::Advisory)
        .count();
    if advisory > 0 {
        let _ = write!(s, ", {advisory} advisory");
    }
    if report.overridden() > 0 {
        let _ = write!(s, ", {} overridden", report.overridden());
    }
    if report.errors() > 0 {
        let _ = write!(
            s,
            ", {} {} could not be evaluated",
            report.errors(),
            if report.errors() == 1 {
                "policy"
            } else {
                "policies"
            }
        );
    }
    let _ = write!(s, ": check {verdict}");
    s
}

/// Text: one block per finding, then errors, overrides and the verdict.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    for f in &report.findings {
        let _ = writeln!(
            out,
            "{} {} [{}]: {}",
            tag(f),
            f.policy,
            f.enforcement.as_str(),
            f.message
        );
        if let Some(l) = &f.location {
            let _ = writeln!(out, "  --> {l}");
        }
        if let Some(r) = &f.overridden {
            let _ = writeln!(out, "  overridden: {r}");
        }
    }
    for p in &report.policies {
        if let Some(e) = &p.error {
            let _ = writeln!(
                out,
                "ERROR {} ({}): the policy could not be evaluated: {e}",
                p.name, p.path
            );
        }
    }
    for o in &report.overrides {
        let _ = writeln!(out, "override {} {}: {}", o.policy, o.status, o.note);
    }
    let _ = writeln!(out, "{}", summary(report));
    out
}

/// The `cairn check --format json` document.
///
/// It is printed through [`serde_json::Value`], so every object's keys come
/// out sorted, as they always have.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CheckJson<'a> {
    /// Version of this JSON shape: [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Whether the check passes (no blocking denial, no policy error).
    pub passed: bool,
    /// Counts.
    pub summary: CheckSummary,
    /// Policies, findings and overrides.
    #[serde(flatten)]
    pub report: &'a Report,
}

/// The counts of a [`CheckJson`].
#[derive(Debug, Serialize, JsonSchema)]
pub struct CheckSummary {
    /// Policies evaluated.
    pub policies: usize,
    /// Denials that fail the check.
    pub blocking: usize,
    /// Denials, blocking or not.
    pub denies: usize,
    /// Warnings.
    pub warnings: usize,
    /// Denials waived by an override.
    pub overridden: usize,
    /// Policies that could not be evaluated.
    pub errors: usize,
}

impl<'a> CheckJson<'a> {
    /// The document of a report.
    pub fn new(report: &'a Report) -> CheckJson<'a> {
        CheckJson {
            format_version: FORMAT_VERSION,
            passed: report.passed(),
            summary: CheckSummary {
                policies: report.policies.len(),
                blocking: report.blocking(),
                denies: report.count(RuleKind::Deny),
                warnings: report.count(RuleKind::Warn),
                overridden: report.overridden(),
                errors: report.errors(),
            },
            report,
        }
    }
}

/// JSON (`format_version` 1).
pub fn json(report: &Report) -> String {
    let doc = serde_json::to_value(CheckJson::new(report)).expect("the report serializes");
    let mut s = serde_json::to_string_pretty(&doc).expect("the report serializes");
    s.push('\n');
    s
}

/// The JSON Schema of `cairn check --format json`.
pub fn json_schema() -> String {
    compiler::output_schema::<CheckJson<'static>>()
}

/// SARIF 2.1.0: one rule per policy, one result per finding, overridden
/// denials as suppressed results with the reason as justification.
/// `uri_prefix` is put before spec paths (the spec root's path inside its
/// repository, e.g. `infra/`), so code-scanning UIs find the files.
pub fn sarif(report: &Report, uri_prefix: &str) -> String {
    let rules: Vec<_> = report
        .policies
        .iter()
        .map(|p| {
            let level = match p.enforcement {
                Enforcement::Advisory => "note",
                _ => "error",
            };
            json!({
                "id": p.name,
                "name": p.name,
                "shortDescription": { "text": p.title.clone().unwrap_or_else(|| p.name.clone()) },
                "defaultConfiguration": { "level": level },
                "properties": { "enforcement": p.enforcement.as_str(), "path": p.path },
            })
        })
        .collect();
    let results: Vec<_> = report
        .findings
        .iter()
        .map(|f| {
            let level = match (f.rule, f.enforcement) {
                (RuleKind::Warn, _) => "warning",
                (RuleKind::Deny, Enforcement::Advisory) => "note",
                (RuleKind::Deny, _) => "error",
            };
            let mut r = json!({
                "ruleId": f.policy,
                "level": level,
                "message": { "text": f.message },
            });
            let map = r.as_object_mut().expect("an object");
            if let Some(l) = &f.location {
                map.insert(
                    "locations".to_owned(),
                    json!([{
                        "physicalLocation": {
                            "artifactLocation": { "uri": format!("{uri_prefix}{}", l.file) },
                            "region": { "startLine": l.line, "startColumn": l.column },
                        },
                        "logicalLocations": f.object.as_ref().map(|o| vec![json!({
                            "kind": o.kind, "name": o.name,
                        })]).unwrap_or_default(),
                    }]),
                );
            } else if let Some(o) = &f.object {
                map.insert(
                    "locations".to_owned(),
                    json!([{ "logicalLocations": [{ "kind": o.kind, "name": o.name }] }]),
                );
            }
            if let Some(reason) = &f.overridden {
                map.insert(
                    "suppressions".to_owned(),
                    json!([{ "kind": "external", "justification": reason }]),
                );
            }
            r
        })
        .collect();
    let notifications: Vec<_> = report
        .policies
        .iter()
        .filter_map(|p| {
            p.error.as_ref().map(|e| {
                json!({
                    "level": "error",
                    "message": { "text": format!("policy {} could not be evaluated: {e}", p.name) },
                    "descriptor": { "id": p.name },
                })
            })
        })
        .collect();
    let doc = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "cairn",
                "informationUri": "https://github.com/cairn/cairn",
                "rules": rules,
            }},
            "invocations": [{
                "executionSuccessful": report.errors() == 0,
                "toolExecutionNotifications": notifications,
            }],
            "results": results,
        }],
    });
    let mut s = serde_json::to_string_pretty(&doc).expect("SARIF serializes");
    s.push('\n');
    s
}

/// XML-escapes text for attributes and bodies.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: a test case per policy; blocking denials are failures,
/// evaluation errors are errors, everything else goes to system-out.
pub fn junit(report: &Report) -> String {
    let failures = report
        .policies
        .iter()
        .filter(|p| {
            report
                .findings
                .iter()
                .any(|f| f.policy == p.name && f.blocking)
        })
        .count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"cairn check\" tests=\"{}\" failures=\"{failures}\" errors=\"{}\">",
        report.policies.len(),
        report.errors()
    );
    let _ = writeln!(
        out,
        "  <testsuite name=\"policies\" tests=\"{}\" failures=\"{failures}\" errors=\"{}\" skipped=\"0\">",
        report.policies.len(),
        report.errors()
    );
    for p in &report.policies {
        let _ = writeln!(
            out,
            "    <testcase classname=\"cairn.policies\" name=\"{}\" file=\"{}\">",
            xml(&p.name),
            xml(&p.path)
        );
        let mine: Vec<&Finding> = report
            .findings
            .iter()
            .filter(|f| f.policy == p.name)
            .collect();
        let blocking: Vec<&&Finding> = mine.iter().filter(|f| f.blocking).collect();
        if let Some(e) = &p.error {
            let _ = writeln!(
                out,
                "      <error message=\"the policy could not be evaluated\">{}</error>",
                xml(e)
            );
        } else if !blocking.is_empty() {
            let body: Vec<String> = blocking.iter().map(|f| line(f)).collect();
            let _ = writeln!(
                out,
                "      <failure message=\"{} blocking {} ({})\">{}</failure>",
                blocking.len(),
                if blocking.len() == 1 {
                    "denial"
                } else {
                    "denials"
                },
                p.enforcement.as_str(),
                xml(&body.join("\n"))
            );
        }
        let other: Vec<String> = mine
            .iter()
            .filter(|f| !f.blocking)
            .map(|f| line(f))
            .collect();
        if !other.is_empty() {
            let _ = writeln!(
                out,
                "      <system-out>{}</system-out>",
                xml(&other.join("\n"))
            );
        }
        out.push_str("    </testcase>\n");
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

fn line(f: &Finding) -> String {
    let mut s = format!("{} {}", tag(f), f.message);
    if let Some(l) = &f.location {
        let _ = write!(s, " ({l})");
    }
    if let Some(r) = &f.overridden {
        let _ = write!(s, " [overridden: {r}]");
    }
    s
}
