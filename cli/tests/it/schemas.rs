//! JSON Schemas under `schemas/`: the real JSON outputs of `cairn` validate
//! against them, and the schemas are strict enough to reject broken documents.

use std::path::Path;

use serde_json::{Value, json};

use crate::diff::{enterprise_repo, git};
use crate::{TempDir, cairn, copy_dir, repo_root};

/// The checked-in schema `schemas/NAME`.
fn schema(name: &str) -> Value {
    let path = repo_root().join("schemas").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
}

/// A validator for a schema, after checking that the schema itself is a
/// valid JSON Schema and that it demands `format_version` at the top.
fn validator(name: &str) -> jsonschema::Validator {
    let s = schema(name);
    assert!(
        jsonschema::meta::is_valid(&s),
        "{name} is not a valid JSON Schema"
    );
    let required: Vec<&str> = s["required"]
        .as_array()
        .unwrap_or_else(|| panic!("{name} has no top-level `required`"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        required.contains(&"format_version"),
        "{name} does not require format_version: {required:?}"
    );
    jsonschema::validator_for(&s).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Asserts that a document validates, listing every error if not.
fn assert_valid(v: &jsonschema::Validator, name: &str, doc: &Value) {
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "a real output does not validate against {name}:\n{}",
        errors.join("\n")
    );
}

/// Asserts that a mutated copy of a document is rejected.
fn assert_rejected(
    v: &jsonschema::Validator,
    name: &str,
    doc: &Value,
    what: &str,
    f: impl FnOnce(&mut Value),
) {
    let mut bad = doc.clone();
    f(&mut bad);
    assert_ne!(&bad, doc, "the mutation `{what}` changed nothing");
    assert!(!v.is_valid(&bad), "{name} accepts a document with {what}");
}

/// The mutations every versioned document must be rejected for.
fn assert_version_required(v: &jsonschema::Validator, name: &str, doc: &Value) {
    assert_rejected(v, name, doc, "no format_version", |d| {
        d.as_object_mut()
            .expect("an object")
            .remove("format_version");
    });
    assert_rejected(v, name, doc, "a string format_version", |d| {
        d["format_version"] = json!("1");
    });
    assert_rejected(v, name, doc, "a document that is an array", |d| {
        *d = json!([d.clone()]);
    });
}

/// Runs `cairn` in `dir` and parses its stdout as JSON; the exit code must be
/// one of `codes`.
fn output(dir: &Path, args: &[&str], codes: &[i32]) -> Value {
    let run = cairn(dir, args);
    assert!(
        codes.contains(&run.code),
        "cairn {args:?} exited {}: {}{}",
        run.code,
        run.stdout,
        run.stderr
    );
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("cairn {args:?} printed no JSON ({e}): {}", run.stdout))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn plan_json_matches_its_schema() {
    let v = validator("plan.schema.json");
    for case in ["plan-drift", "plan-bond-drift"] {
        let dir = repo_root().join("golden-tests").join(case);
        let commands = std::fs::read_to_string(dir.join("commands")).expect("commands");
        let line = commands
            .lines()
            .find(|l| l.contains("--format json"))
            .expect("a JSON plan command");
        let args: Vec<&str> = line.split_whitespace().collect();
        // plan-bond-drift has a node that refuses bonds: not converged, exit 1.
        let doc = output(&dir, &args, &[0, 1]);
        assert!(
            !doc["steps"].as_array().expect("steps").is_empty(),
            "{case}: the plan has steps, so their schema is exercised"
        );
        assert_valid(&v, "plan.schema.json", &doc);
        assert_version_required(&v, "plan.schema.json", &doc);
        assert_rejected(&v, "plan", &doc, "an unknown action", |d| {
            d["steps"][0]["action"] = json!("explode_vm");
        });
        assert_rejected(&v, "plan", &doc, "a negative wave", |d| {
            d["steps"][0]["wave"] = json!(-1);
        });
        assert_rejected(&v, "plan", &doc, "an unknown change kind", |d| {
            d["changes"][0]["kind"] = json!("teleport");
        });
        assert_rejected(&v, "plan", &doc, "a step without its node", |d| {
            d["steps"][0].as_object_mut().expect("step").remove("node");
        });
    }
}

#[test]
fn place_and_graph_json_match_their_schemas() {
    let enterprise = repo_root().join("examples/enterprise");
    let tmp = TempDir::new("schemas-place");

    let v = validator("placement.schema.json");
    let doc = output(
        &tmp.0,
        &["place", path(&enterprise), "--format", "json"],
        &[0],
    );
    assert!(!doc["vms"].as_array().expect("vms").is_empty());
    assert_valid(&v, "placement.schema.json", &doc);
    assert_version_required(&v, "placement.schema.json", &doc);
    assert_rejected(&v, "placement", &doc, "a number for a node name", |d| {
        d["vms"][0]["node"] = json!(5);
    });
    assert_rejected(&v, "placement", &doc, "a VM without `secondary`", |d| {
        d["vms"][0].as_object_mut().expect("vm").remove("secondary");
    });

    // A placement with unplaced VMs exercises their reasons.
    let full = repo_root().join("golden-tests/place-unplaced-capacity/specs");
    let doc = output(&tmp.0, &["place", path(&full), "--format", "json"], &[0, 1]);
    assert!(!doc["unplaced"].as_array().expect("unplaced").is_empty());
    assert_valid(&v, "placement.schema.json", &doc);
    assert_rejected(
        &v,
        "placement",
        &doc,
        "a reason count that is a string",
        |d| {
            d["unplaced"][0]["reasons"][0]["nodes_filtered"] = json!("3");
        },
    );

    let v = validator("graph.schema.json");
    let doc = output(
        &tmp.0,
        &["graph", path(&enterprise), "--format", "json"],
        &[0],
    );
    assert!(!doc["edges"].as_array().expect("edges").is_empty());
    assert_valid(&v, "graph.schema.json", &doc);
    assert_version_required(&v, "graph.schema.json", &doc);
    assert_rejected(&v, "graph", &doc, "a wave that is a string", |d| {
        d["nodes"][0]["wave"] = json!("first");
    });
    assert_rejected(&v, "graph", &doc, "an edge without `to`", |d| {
        d["edges"][0].as_object_mut().expect("edge").remove("to");
    });
}

#[test]
fn place_explain_and_what_if_json_match_their_schemas() {
    let enterprise = repo_root().join("examples/enterprise");
    let tmp = TempDir::new("schemas-place-explain");

    let v = validator("place-explain.schema.json");
    let doc = output(
        &tmp.0,
        &[
            "place",
            path(&enterprise),
            "--explain",
            "ledger-app",
            "--format",
            "json",
        ],
        &[0],
    );
    let candidates = doc["candidates"].as_array().expect("candidates");
    assert!(candidates.iter().any(|c| c["chosen"] == json!(true)));
    assert!(
        candidates.iter().any(|c| c["feasible"] == json!(false)),
        "a node ruled out exercises ruled_out_by"
    );
    assert_valid(&v, "place-explain.schema.json", &doc);
    assert_version_required(&v, "place-explain.schema.json", &doc);
    assert_rejected(&v, "place-explain", &doc, "no VM name", |d| {
        d.as_object_mut().expect("doc").remove("vm");
    });
    assert_rejected(
        &v,
        "place-explain",
        &doc,
        "a candidate without `chosen`",
        |d| {
            d["candidates"][0]
                .as_object_mut()
                .expect("candidate")
                .remove("chosen");
        },
    );
    assert_rejected(&v, "place-explain", &doc, "a score that is a string", |d| {
        d["candidates"][0]["parts"][0]["value"] = json!("97");
    });

    let v = validator("place-fail.schema.json");
    // A rack: VMs restart and fail over. A site: every VM is lost (null
    // new nodes, broken promises, exit 1).
    for (fail, code) in [("rack=r1", 0), ("node=hq-r3-n1", 0), ("site=hq", 1)] {
        let doc = output(
            &tmp.0,
            &[
                "place",
                path(&enterprise),
                "--fail",
                fail,
                "--format",
                "json",
            ],
            &[code],
        );
        assert!(!doc["affected"].as_array().expect("affected").is_empty());
        // A failed node is named alone; racks and sites keep their kind.
        let named = fail.strip_prefix("node=").unwrap_or(fail);
        assert_eq!(doc["failed"], json!([named]));
        assert_valid(&v, "place-fail.schema.json", &doc);
        assert_version_required(&v, "place-fail.schema.json", &doc);
        assert_rejected(&v, "place-fail", &doc, "an unknown outcome", |d| {
            d["affected"][0]["outcome"] = json!("vanishes");
        });
        assert_rejected(&v, "place-fail", &doc, "an unknown availability", |d| {
            d["affected"][0]["availability"] = json!("always");
        });
        assert_rejected(&v, "place-fail", &doc, "an entry without `new_node`", |d| {
            d["affected"][0]
                .as_object_mut()
                .expect("entry")
                .remove("new_node");
        });
        assert_rejected(&v, "place-fail", &doc, "a promise that is a string", |d| {
            d["promises"]["ha_kept"] = json!("yes");
        });
        assert_rejected(&v, "place-fail", &doc, "a negative reserved count", |d| {
            d["promises"]["reserved_lost"] = json!(-1);
        });
        assert_rejected(&v, "place-fail", &doc, "the same failure twice", |d| {
            d["failed"] = json!([named, named]);
        });
    }
    let site = output(
        &tmp.0,
        &[
            "place",
            path(&enterprise),
            "--fail",
            "site=hq",
            "--format",
            "json",
        ],
        &[1],
    );
    assert!(
        site["affected"]
            .as_array()
            .expect("affected")
            .iter()
            .all(|a| a["outcome"] == json!("lost") && a["new_node"].is_null()),
        "{site}"
    );
    assert_eq!(site["promises"]["ha_kept"], json!(false));
}

#[test]
fn validate_json_matches_its_schema() {
    let v = validator("diagnostics.schema.json");
    let specs = repo_root().join("golden-tests/many-errors-at-once/specs");
    let tmp = TempDir::new("schemas-validate");
    let doc = output(
        &tmp.0,
        &["validate", path(&specs), "--format", "json"],
        &[1],
    );
    assert!(doc["diagnostics"].as_array().expect("diagnostics").len() > 1);
    assert_valid(&v, "diagnostics.schema.json", &doc);
    assert_version_required(&v, "diagnostics.schema.json", &doc);
    assert_rejected(&v, "diagnostics", &doc, "an unknown severity", |d| {
        d["diagnostics"][0]["severity"] = json!("fatal");
    });
    assert_rejected(
        &v,
        "diagnostics",
        &doc,
        "a diagnostic without a code",
        |d| {
            d["diagnostics"][0]
                .as_object_mut()
                .expect("diagnostic")
                .remove("code");
        },
    );
    // A clean spec root: an empty list is a valid document too.
    let clean = output(
        &tmp.0,
        &[
            "validate",
            path(&repo_root().join("examples/enterprise")),
            "--format",
            "json",
        ],
        &[0],
    );
    assert_valid(&v, "diagnostics.schema.json", &clean);
}

#[test]
fn check_json_matches_its_schema() {
    let v = validator("check.schema.json");
    let policies = repo_root().join("policies");
    let tmp = TempDir::new("schemas-check");
    let enterprise = repo_root().join("examples/enterprise");
    let violations = repo_root().join("golden-tests/check-violations/specs");
    for (specs, code) in [(&enterprise, 0), (&violations, 1)] {
        let doc = output(
            &tmp.0,
            &[
                "check",
                path(specs),
                "--policies",
                path(&policies),
                "--format",
                "json",
            ],
            &[code],
        );
        assert!(!doc["policies"].as_array().expect("policies").is_empty());
        assert_valid(&v, "check.schema.json", &doc);
        assert_version_required(&v, "check.schema.json", &doc);
        assert_rejected(&v, "check", &doc, "no summary", |d| {
            d.as_object_mut().expect("doc").remove("summary");
        });
        assert_rejected(&v, "check", &doc, "an unknown enforcement", |d| {
            d["policies"][0]["enforcement"] = json!("optional");
        });
        if code == 1 {
            assert!(!doc["findings"].as_array().expect("findings").is_empty());
            assert_rejected(&v, "check", &doc, "an unknown rule", |d| {
                d["findings"][0]["rule"] = json!("maybe");
            });
        }
    }
}

#[test]
fn diff_json_matches_its_schema() {
    let v = validator("diff.schema.json");
    let repo = enterprise_repo();
    git(&repo.0, &["checkout", "-q", "-b", "bigger"]);
    let w = repo.0.join("workloads.kdl");
    let mut text = std::fs::read_to_string(&w).expect("read");
    text.push_str("\nvm \"ledger-etl\" tenant=\"finance\" site=\"hq\" {\n    cpu 4\n    memory \"16GiB\"\n    sla \"batch\"\n    image \"debian-12\"\n}\n");
    std::fs::write(&w, text).expect("write");
    git(&repo.0, &["commit", "-q", "-am", "a spot VM for finance"]);
    let doc = output(
        &repo.0,
        &[
            "diff", "--base", "main", "--head", "bigger", "--format", "json",
        ],
        &[1],
    );
    assert!(
        !doc["placement"]["placed"]
            .as_array()
            .expect("placed")
            .is_empty()
    );
    assert!(doc["policy"]["report"].is_object());
    assert_valid(&v, "diff.schema.json", &doc);
    assert_version_required(&v, "diff.schema.json", &doc);
    assert_rejected(&v, "diff", &doc, "a placed VM without its name", |d| {
        d["placement"]["placed"][0]
            .as_object_mut()
            .expect("placed")
            .remove("vm");
    });
    assert_rejected(&v, "diff", &doc, "a verdict that is a string", |d| {
        d["policy"]["passed"] = json!("no");
    });
}

#[test]
fn status_json_matches_its_schema() {
    // No node of the copy runs (or, if a dev cluster of the quickstart runs,
    // they answer): either way a real status document. A plan first puts an
    // entry in the audit log, which status shows.
    let v = validator("status.schema.json");
    let tmp = TempDir::new("schemas-status");
    copy_dir(&repo_root().join("examples/quickstart"), &tmp.0);
    let state = tmp.0.join("state.redb");
    // With no node answering the plan is not acceptable (exit 1); it still
    // audits, and with a dev cluster of the quickstart running it is 0.
    let plan = cairn(&tmp.0, &["plan", "--state", path(&state)]);
    assert!(
        [0, 1].contains(&plan.code),
        "{}{}",
        plan.stdout,
        plan.stderr
    );
    let doc = output(
        &tmp.0,
        &["status", "--state", path(&state), "--format", "json"],
        &[0],
    );
    assert!(!doc["nodes"].as_array().expect("nodes").is_empty());
    assert!(!doc["vms"].as_array().expect("vms").is_empty());
    assert!(!doc["audit"].as_array().expect("audit").is_empty());
    assert_valid(&v, "status.schema.json", &doc);
    assert_version_required(&v, "status.schema.json", &doc);
    assert_rejected(&v, "status", &doc, "a VM without its state", |d| {
        d["vms"][0].as_object_mut().expect("vm").remove("state");
    });
    assert_rejected(&v, "status", &doc, "a reachability that is a string", |d| {
        d["nodes"][0]["reachable"] = json!("no");
    });
    assert_rejected(&v, "status", &doc, "an audit time that is a string", |d| {
        d["audit"][0]["at_unix_ms"] = json!("yesterday");
    });
}
