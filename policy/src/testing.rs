//! `cairn policy test`: the `test_*` rules of `*_test.rego`, like `opa test`.
//!
//! `NAME_test.rego` is loaded with `NAME.rego` (and the data documents);
//! a test module without a policy of that name is loaded with every policy
//! whose package it shares. A test passes when its rule is `true`; it fails
//! when it is `false` or undefined (a failed `with`-mocked expectation), and
//! errors when evaluation fails.

use std::fmt::Write as _;

use crate::eval::engine_with;
use crate::set::PolicySet;

/// How a test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TestStatus {
    /// The rule is true.
    Pass,
    /// The rule is false or undefined.
    Fail,
    /// The module did not load or evaluation failed.
    Error,
}

/// One test.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TestResult {
    /// The test module.
    pub file: String,
    /// `data.PACKAGE.test_NAME`.
    pub rule: String,
    /// Outcome.
    pub status: TestStatus,
    /// Why it failed or errored.
    pub detail: Option<String>,
}

/// Runs every test of the set, in path and declaration order.
pub fn run_tests(set: &PolicySet) -> Vec<TestResult> {
    let mut results = vec![];
    for test in &set.tests {
        let mut modules: Vec<(&str, &str)> = match &test.policy {
            Some(name) => set
                .policies
                .iter()
                .filter(|p| &p.name == name)
                .map(|p| (p.path.as_str(), p.text.as_str()))
                .collect(),
            None => set
                .policies
                .iter()
                .filter(|p| p.package == test.package)
                .map(|p| (p.path.as_str(), p.text.as_str()))
                .collect(),
        };
        modules.push((&test.path, &test.text));
        let names = test_rule_names(&test.text);
        let mut engine = match engine_with(set, &modules) {
            Ok(e) => e,
            Err(e) => {
                results.push(TestResult {
                    file: test.path.clone(),
                    rule: format!("data.{}", test.package),
                    status: TestStatus::Error,
                    detail: Some(e),
                });
                continue;
            }
        };
        if names.is_empty() {
            results.push(TestResult {
                file: test.path.clone(),
                rule: format!("data.{}", test.package),
                status: TestStatus::Fail,
                detail: Some("the module has no test_* rules".to_owned()),
            });
        }
        for name in names {
            let rule = format!("data.{}.{name}", test.package);
            let (status, detail) = match engine.eval_query(rule.clone(), false) {
                Err(e) => (TestStatus::Error, Some(e.to_string())),
                Ok(r) => match r.result.first().and_then(|r| r.expressions.first()) {
                    Some(e) if e.value == regorus::Value::from(true) => (TestStatus::Pass, None),
                    Some(e) => (TestStatus::Fail, Some(format!("the rule is {}", e.value))),
                    None => (TestStatus::Fail, Some("the rule is undefined".to_owned())),
                },
            };
            results.push(TestResult {
                file: test.path.clone(),
                rule,
                status,
                detail,
            });
        }
    }
    results
}

/// Names of `test_*` rules in declaration order (each once; Rego allows
/// several definitions of one rule, which together are the test).
fn test_rule_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = vec![];
    for line in text.lines() {
        if !line.starts_with("test_") {
            continue;
        }
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// `opa test`-like text.
pub fn render(results: &[TestResult]) -> String {
    let mut out = String::new();
    let mut file = "";
    for r in results {
        if r.file != file {
            file = &r.file;
            let _ = writeln!(out, "{file}:");
        }
        let status = match r.status {
            TestStatus::Pass => "PASS",
            TestStatus::Fail => "FAIL",
            TestStatus::Error => "ERROR",
        };
        let _ = write!(out, "{}: {status}", r.rule);
        if let Some(d) = &r.detail {
            let _ = write!(out, " ({d})");
        }
        out.push('\n');
    }
    let passed = results
        .iter()
        .filter(|r| r.status == TestStatus::Pass)
        .count();
    let _ = writeln!(out, "{}", "-".repeat(80));
    if passed == results.len() {
        let _ = writeln!(out, "PASS: {passed}/{}", results.len());
    } else {
        let _ = writeln!(out, "PASS: {passed}/{}", results.len());
        let _ = writeln!(out, "FAIL: {}/{}", results.len() - passed, results.len());
    }
    out
}
