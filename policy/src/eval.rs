//! Evaluating policies against the input document.
//!
//! The input document is the compiled model's JSON (so `input.vms`,
//! `input.tenants`, … work as SPEC.md shows) with two more top-level keys:
//! `placement` (the placement JSON, when there is one) and `plan` (the plan
//! JSON, when one is given). Absent ones are undefined, so a policy guards
//! with `input.placement` before reading it.
//!
//! Every policy is evaluated alone (see the crate docs); its `deny` and
//! `warn` rules (Conftest's conventions) yield messages, each a string or an
//! object `{"msg": STRING, "object": {"kind": KIND, "name": NAME}}`. A string
//! message that starts `KIND NAME:` (`vm ledger-app: …`) names its object too.

use std::collections::BTreeMap;

use compiler::check::SpanIndex;
use compiler::{Model, Sources};
use serde::Serialize;

use crate::set::PolicySet;

mod to_value;

/// How much a policy's `deny` counts (Sentinel's levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    /// Denials are reported and never block.
    Advisory,
    /// Denials block unless overridden with `--override POLICY --reason TEXT`.
    SoftMandatory,
    /// Denials always block.
    HardMandatory,
}

impl Enforcement {
    /// Parses `advisory`, `soft-mandatory` or `hard-mandatory`.
    pub fn parse(s: &str) -> Option<Enforcement> {
        match s {
            "advisory" => Some(Enforcement::Advisory),
            "soft-mandatory" => Some(Enforcement::SoftMandatory),
            "hard-mandatory" => Some(Enforcement::HardMandatory),
            _ => None,
        }
    }

    /// The level as written in METADATA.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Advisory => "advisory",
            Enforcement::SoftMandatory => "soft-mandatory",
            Enforcement::HardMandatory => "hard-mandatory",
        }
    }
}

/// Which rule produced a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// `deny`.
    Deny,
    /// `warn`.
    Warn,
}

/// The object a message is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
pub struct ObjectRef {
    /// Spec kind (`vm`, `tenant`, `site`, …).
    pub kind: String,
    /// Name.
    pub name: String,
}

/// A spec location.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
pub struct Location {
    /// Path relative to the spec root.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// One message of one policy.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Finding {
    /// Policy name.
    pub policy: String,
    /// `deny` or `warn`.
    pub rule: RuleKind,
    /// The policy's level.
    pub enforcement: Enforcement,
    /// The message.
    pub message: String,
    /// The object it names, if any.
    pub object: Option<ObjectRef>,
    /// Where that object is declared, if it has a spec span.
    pub location: Option<Location>,
    /// Whether this finding makes the check fail.
    pub blocking: bool,
    /// The override's reason, when an override waived it.
    pub overridden: Option<String>,
}

/// An override asked for on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    /// Policy name.
    pub policy: String,
    /// Why (recorded).
    pub reason: String,
}

/// What happened to an override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct OverrideOutcome {
    /// Policy name.
    pub policy: String,
    /// The reason given.
    pub reason: String,
    /// `applied`, `refused` (hard-mandatory) or `unused` (nothing to waive).
    pub status: &'static str,
    /// Denials it waived.
    pub waived: usize,
    /// For operators.
    pub note: String,
}

/// The verdict of one policy.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct PolicyResult {
    /// Name.
    pub name: String,
    /// Path relative to the spec root.
    pub path: String,
    /// Level.
    pub enforcement: Enforcement,
    /// METADATA title.
    pub title: Option<String>,
    /// Number of denials.
    pub denies: usize,
    /// Number of warnings.
    pub warnings: usize,
    /// `pass`, `fail`, `advisory` (denied but advisory), `overridden` or `error`.
    pub status: &'static str,
    /// The evaluation error (the policy does not parse or fails at run time).
    pub error: Option<String>,
}

/// The result of a check.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Report {
    /// Per policy, in path order.
    pub policies: Vec<PolicyResult>,
    /// Every message, by policy, denials first.
    pub findings: Vec<Finding>,
    /// What became of each override.
    pub overrides: Vec<OverrideOutcome>,
}

impl Report {
    /// Denials that make the check fail.
    pub fn blocking(&self) -> usize {
        self.findings.iter().filter(|f| f.blocking).count()
    }

    /// Policies that could not be evaluated (they fail the check: closed).
    pub fn errors(&self) -> usize {
        self.policies.iter().filter(|p| p.error.is_some()).count()
    }

    /// Whether the check passes.
    pub fn passed(&self) -> bool {
        self.blocking() == 0 && self.errors() == 0
    }

    /// Count of findings of a rule.
    pub fn count(&self, rule: RuleKind) -> usize {
        self.findings.iter().filter(|f| f.rule == rule).count()
    }

    /// Denials waived by an override.
    pub fn overridden(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.overridden.is_some())
            .count()
    }
}

/// Errors of evaluation that are the caller's mistake.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// `--override` names no policy.
    #[error("--override {policy}: there is no policy of that name (policies: {known})")]
    UnknownOverride {
        /// What was named.
        policy: String,
        /// The known names.
        known: String,
    },
    /// An override without a reason.
    #[error("--override {policy}: a reason is required (--reason TEXT); it is recorded")]
    NoReason {
        /// What was named.
        policy: String,
    },
    /// A data document does not load into the engine.
    #[error("policy data {path}: {message}")]
    Data {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The input could not be built.
    #[error("cannot build the policy input: {0}")]
    Input(String),
}

/// The input document, built once and shared by every policy.
#[derive(Debug, Clone)]
pub struct Input {
    value: regorus::Value,
}

impl Input {
    /// The model's fields at the top level, plus `placement` and `plan`
    /// when given.
    pub fn new(
        model: &Model,
        placement: Option<&serde_json::Value>,
        plan: Option<&serde_json::Value>,
    ) -> Result<Input, EvalError> {
        let mut input = Input::of_model(model)?;
        if let Some(p) = placement {
            input = input.with("placement", p)?;
        }
        if let Some(p) = plan {
            input = input.with("plan", p)?;
        }
        Ok(input)
    }

    /// The model's fields at the top level.
    pub fn of_model(model: &Model) -> Result<Input, EvalError> {
        let value = to_value::to_value(model).map_err(|e| EvalError::Input(e.to_string()))?;
        if !matches!(value, regorus::Value::Object(_)) {
            return Err(EvalError::Input("the model is not an object".to_owned()));
        }
        Ok(Input { value })
    }

    /// The input with one more top-level key (`placement`, `plan`), made
    /// straight from `value` (no JSON tree in between: at 10,000 VMs the
    /// placement and the plan are large).
    pub fn with<T: Serialize + ?Sized>(mut self, key: &str, value: &T) -> Result<Input, EvalError> {
        let value = to_value::to_value(value).map_err(|e| EvalError::Input(e.to_string()))?;
        self.value
            .as_object_mut()
            .map_err(|e| EvalError::Input(e.to_string()))?
            .insert(regorus::Value::from(key), value);
        Ok(self)
    }

    /// An input from any JSON document (tests, `policy test` fixtures).
    pub fn from_json(doc: &serde_json::Value) -> Input {
        Input {
            value: regorus::Value::from(doc.clone()),
        }
    }
}

/// Resolves objects to spec locations.
#[derive(Debug, Clone, Copy)]
pub struct SpecLocator<'a> {
    /// The loaded specs.
    pub sources: &'a Sources,
    /// Where objects were declared.
    pub spans: &'a SpanIndex,
}

/// Object kinds a message may name, as the spec language spells them.
pub(crate) const KINDS: &[&str] = &[
    "vm",
    "vm-group",
    "tenant",
    "site",
    "node",
    "node-class",
    "rack",
    "sla-profile",
    "image",
    "affinity",
    "pool",
    "network",
    "bond",
    "protection-plan",
];

impl SpecLocator<'_> {
    fn locate(&self, object: &ObjectRef) -> Option<Location> {
        let kind = KINDS.iter().find(|k| **k == object.kind)?;
        let span = self.spans.get(kind, &object.name)?;
        let lc = compiler::diag::line_col(self.sources.text(span.file), span.start);
        Some(Location {
            file: self.sources.path(span.file).to_owned(),
            line: lc.line,
            column: lc.column,
        })
    }
}

/// Builds an engine holding one policy and every data document.
pub(crate) fn engine_with(
    set: &PolicySet,
    modules: &[(&str, &str)],
) -> Result<regorus::Engine, String> {
    let mut engine = regorus::Engine::new();
    for (path, text) in modules {
        engine
            .add_policy((*path).to_owned(), (*text).to_owned())
            .map_err(|e| e.to_string())?;
    }
    for (path, text) in &set.data {
        let value = regorus::Value::from_json_str(text).map_err(|e| format!("{path}: {e}"))?;
        engine.add_data(value).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(engine)
}

/// Evaluates every policy of `set` against `input`, applies `overrides`,
/// and ties findings to spec locations through `locator`.
pub fn evaluate(
    set: &PolicySet,
    input: &Input,
    locator: Option<SpecLocator<'_>>,
    overrides: &[Override],
) -> Result<Report, EvalError> {
    let mut by_policy: BTreeMap<&str, &Override> = BTreeMap::new();
    for o in overrides {
        if set.policy(&o.policy).is_none() {
            let known: Vec<&str> = set.policies.iter().map(|p| p.name.as_str()).collect();
            return Err(EvalError::UnknownOverride {
                policy: o.policy.clone(),
                known: if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                },
            });
        }
        if o.reason.trim().is_empty() {
            return Err(EvalError::NoReason {
                policy: o.policy.clone(),
            });
        }
        by_policy.insert(&o.policy, o);
    }
    for (path, text) in &set.data {
        regorus::Value::from_json_str(text).map_err(|e| EvalError::Data {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }

    let mut report = Report {
        policies: vec![],
        findings: vec![],
        overrides: vec![],
    };
    let outcomes = judge_all(set, input);
    for (policy, outcome) in set.policies.iter().zip(outcomes) {
        let mut result = PolicyResult {
            name: policy.name.clone(),
            path: policy.path.clone(),
            enforcement: policy.enforcement,
            title: policy.title.clone(),
            denies: 0,
            warnings: 0,
            status: "pass",
            error: None,
        };
        let (deny, warn) = match outcome {
            Ok(x) => x,
            Err(e) => {
                result.status = "error";
                result.error = Some(e);
                report.policies.push(result);
                continue;
            }
        };
        let waiver = by_policy.get(policy.name.as_str());
        result.denies = deny.len();
        result.warnings = warn.len();
        let mut waived = 0;
        for (rule, messages) in [(RuleKind::Deny, deny), (RuleKind::Warn, warn)] {
            for raw in messages {
                let (message, object) = message_and_object(&raw);
                let location = match (&object, locator) {
                    (Some(o), Some(l)) => l.locate(o),
                    _ => None,
                };
                let mut blocking =
                    rule == RuleKind::Deny && policy.enforcement != Enforcement::Advisory;
                let mut overridden = None;
                if blocking
                    && policy.enforcement == Enforcement::SoftMandatory
                    && let Some(o) = waiver
                {
                    blocking = false;
                    overridden = Some(o.reason.clone());
                    waived += 1;
                }
                report.findings.push(Finding {
                    policy: policy.name.clone(),
                    rule,
                    enforcement: policy.enforcement,
                    message,
                    object,
                    location,
                    blocking,
                    overridden,
                });
            }
        }
        if result.denies > 0 {
            result.status = match policy.enforcement {
                Enforcement::Advisory => "advisory",
                Enforcement::SoftMandatory if waived > 0 => "overridden",
                _ => "fail",
            };
        }
        if let Some(o) = waiver {
            report.overrides.push(match (policy.enforcement, waived) {
                (Enforcement::HardMandatory, _) => OverrideOutcome {
                    policy: o.policy.clone(),
                    reason: o.reason.clone(),
                    status: "refused",
                    waived: 0,
                    note: format!(
                        "policy {} is hard-mandatory and cannot be overridden; fix the specs or change the policy in review",
                        o.policy
                    ),
                },
                (_, 0) => OverrideOutcome {
                    policy: o.policy.clone(),
                    reason: o.reason.clone(),
                    status: "unused",
                    waived: 0,
                    note: format!(
                        "policy {} has no blocking denial to override; nothing was waived",
                        o.policy
                    ),
                },
                (_, n) => OverrideOutcome {
                    policy: o.policy.clone(),
                    reason: o.reason.clone(),
                    status: "applied",
                    waived: n,
                    note: format!(
                        "{n} {} of policy {} waived: {}",
                        if n == 1 { "denial" } else { "denials" },
                        o.policy,
                        o.reason
                    ),
                },
            });
        }
        report.policies.push(result);
    }
    Ok(report)
}

/// The `deny` and `warn` messages of one policy, or why it could not be
/// evaluated.
type Outcome = Result<(Vec<serde_json::Value>, Vec<serde_json::Value>), String>;

/// Evaluates every policy of `set` (each alone, in its own engine), on as many
/// threads as there are cores and policies; the outcomes are in `set`'s order.
fn judge_all(set: &PolicySet, input: &Input) -> Vec<Outcome> {
    let judge = |policy: &crate::set::Policy| -> Outcome {
        let mut engine = engine_with(set, &[(&policy.path, &policy.text)])?;
        engine.set_input(input.value.clone());
        eval_deny_and_warn(&mut engine, &policy.package)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(set.policies.len());
    if threads <= 1 {
        return set.policies.iter().map(judge).collect();
    }
    // Each thread takes the next policy not taken yet; the slowest policy
    // bounds the wall time rather than the sum of all of them.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Outcome>>> =
        set.policies.iter().map(|_| Default::default()).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(policy) = set.policies.get(i) else {
                        break;
                    };
                    let outcome = judge(policy);
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err("the policy was not evaluated".to_owned()))
        })
        .collect()
}

/// Evaluates `data.PACKAGE.deny` and `data.PACKAGE.warn` in one query, so the
/// rules both use (a budget's per-tenant costs) are evaluated once: regorus
/// forgets every rule's value between queries.
fn eval_deny_and_warn(engine: &mut regorus::Engine, package: &str) -> Outcome {
    // `[x | x := RULE]` is `[]` when the rule is undefined and `[value]`
    // otherwise, so neither rule can make the other's answer vanish.
    let query = format!(
        "cairn_deny__ := [x | x := data.{package}.deny]; cairn_warn__ := [x | x := data.{package}.warn]"
    );
    let results = engine.eval_query(query, false).map_err(|e| e.to_string())?;
    let bindings = results
        .result
        .first()
        .map(|r| r.bindings.clone())
        .unwrap_or(regorus::Value::Undefined);
    let deny = messages(&bindings, package, "deny", "cairn_deny__")?;
    let warn = messages(&bindings, package, "warn", "cairn_warn__")?;
    Ok((deny, warn))
}

/// The value of `data.PACKAGE.RULE` (bound to `var` as `[]` or `[value]`) as
/// a set (or array) of messages; an undefined rule is no messages.
fn messages(
    bindings: &regorus::Value,
    package: &str,
    rule: &str,
    var: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let query = format!("data.{package}.{rule}");
    let value = match &bindings[&regorus::Value::from(var)] {
        regorus::Value::Array(a) => match a.first() {
            Some(v) => v.clone(),
            None => return Ok(vec![]),
        },
        _ => return Ok(vec![]),
    };
    let json = serde_json::to_value(&value).map_err(|e| e.to_string())?;
    match json {
        serde_json::Value::Array(items) => Ok(items),
        serde_json::Value::Bool(_) | serde_json::Value::Null => Err(format!(
            "{query} must be a set of messages (`{rule} contains msg if {{ … }}`), not a boolean"
        )),
        other => Ok(vec![other]),
    }
}

/// The text and the named object of a message.
fn message_and_object(raw: &serde_json::Value) -> (String, Option<ObjectRef>) {
    match raw {
        serde_json::Value::String(s) => (s.clone(), object_of_text(s)),
        serde_json::Value::Object(map) => {
            let message = map
                .get("msg")
                .or_else(|| map.get("message"))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| raw.to_string());
            let object = map
                .get("object")
                .and_then(|o| {
                    Some(ObjectRef {
                        kind: o.get("kind")?.as_str()?.to_owned(),
                        name: o.get("name")?.as_str()?.to_owned(),
                    })
                })
                .or_else(|| object_of_text(&message));
            (message, object)
        }
        other => (other.to_string(), None),
    }
}

/// `vm ledger-app: …` → `vm` / `ledger-app`.
fn object_of_text(s: &str) -> Option<ObjectRef> {
    let (head, _) = s.split_once(':')?;
    let (kind, name) = head.split_once(' ')?;
    let name = name.trim();
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '/' || c == '.');
    (KINDS.contains(&kind) && valid).then(|| ObjectRef {
        kind: kind.to_owned(),
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_come_from_prefixes_and_fields() {
        let (m, o) = message_and_object(&serde_json::json!("vm web-1: too big"));
        assert_eq!(m, "vm web-1: too big");
        assert_eq!(
            o.map(|o| (o.kind, o.name)),
            Some(("vm".into(), "web-1".into()))
        );
        let (m, o) = message_and_object(
            &serde_json::json!({"msg": "over budget", "object": {"kind": "tenant", "name": "shop"}}),
        );
        assert_eq!(m, "over budget");
        assert_eq!(o.map(|o| o.kind), Some("tenant".into()));
        assert_eq!(object_of_text("note: nothing named"), None);
        assert_eq!(object_of_text("vm two words: x"), None);
    }
}
