//! Evaluation through the public API: levels, overrides, message shapes.

use policy::eval::{Input, Override, evaluate};
use policy::{PolicySet, RuleKind};

fn set(files: &[(&str, &str)]) -> PolicySet {
    PolicySet::from_files(
        files
            .iter()
            .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
            .collect(),
    )
    .expect("loads")
}

const SOFT: &str = "# METADATA\n# custom:\n#   enforcement: soft-mandatory\npackage t.soft\nimport rego.v1\ndeny contains sprintf(\"vm %s: big\", [vm.name]) if { some vm in input.vms; vm.cpu > 4 }\nwarn contains \"note\" if true\n";
const HARD: &str = "package t.hard\nimport rego.v1\ndeny contains {\"msg\": \"no\", \"object\": {\"kind\": \"tenant\", \"name\": \"a\"}} if input.vms[0]\n";

#[test]
fn levels_overrides_and_message_shapes() {
    let s = set(&[("policies/soft.rego", SOFT), ("policies/hard.rego", HARD)]);
    let input = Input::from_json(&serde_json::json!({"vms": [{"name": "x", "cpu": 8}]}));
    let r = evaluate(&s, &input, None, &[]).expect("evaluates");
    assert_eq!(r.blocking(), 2);
    assert_eq!(r.count(RuleKind::Warn), 1);
    let hard = r
        .findings
        .iter()
        .find(|f| f.policy == "hard")
        .expect("hard");
    assert_eq!(hard.message, "no");
    assert_eq!(hard.object.as_ref().map(|o| o.name.as_str()), Some("a"));
    let soft = r
        .findings
        .iter()
        .find(|f| f.policy == "soft" && f.rule == RuleKind::Deny)
        .expect("soft");
    assert_eq!(soft.object.as_ref().map(|o| o.kind.as_str()), Some("vm"));

    let overrides = [
        Override {
            policy: "soft".into(),
            reason: "ok'd".into(),
        },
        Override {
            policy: "hard".into(),
            reason: "please".into(),
        },
    ];
    let r = evaluate(&s, &input, None, &overrides).expect("evaluates");
    assert_eq!(r.blocking(), 1, "only the hard denial is left");
    assert!(!r.passed());
    let statuses: Vec<(&str, &str)> = r
        .overrides
        .iter()
        .map(|o| (o.policy.as_str(), o.status))
        .collect();
    assert_eq!(statuses, vec![("hard", "refused"), ("soft", "applied")]);

    let err = evaluate(
        &s,
        &input,
        None,
        &[Override {
            policy: "nope".into(),
            reason: "x".into(),
        }],
    )
    .expect_err("unknown policy");
    assert!(err.to_string().contains("hard, soft"), "{err}");
}
