//! `cairn check` and `cairn policy test`.

use std::path::Path;

use crate::{TempDir, cairn, copy_dir, repo_root};

/// The enterprise example with the shipped policies, in a temp dir.
fn enterprise() -> TempDir {
    let tmp = TempDir::new("policy");
    copy_dir(&repo_root().join("examples/enterprise"), &tmp.0);
    copy_dir(&repo_root().join("policies"), &tmp.0.join("policies"));
    tmp
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

/// Puts ledger-app (finance) on the spot profile `batch`.
fn finance_on_spot(dir: &Path) {
    edit(
        &dir.join("workloads.kdl"),
        "    availability \"ha\"\n    image \"debian-12\"",
        "    availability \"ha\"\n    sla \"batch\"\n    image \"debian-12\"",
    );
}

#[test]
fn shipped_policies_pass_their_own_tests() {
    let run = cairn(&repo_root(), &["policy", "test", "."]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    for file in [
        "budget_test.rego",
        "ft-witness-racks_test.rego",
        "max-vm-size_test.rego",
        "naming-conventions_test.rego",
        "no-spot-for-finance_test.rego",
    ] {
        assert!(
            run.stdout.contains(file),
            "{file} did not run:\n{}",
            run.stdout
        );
    }
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
}

#[test]
fn a_failing_policy_test_fails_the_run_and_is_named() {
    let tmp = TempDir::new("policy-test");
    let p = tmp.0.join("policies");
    std::fs::create_dir_all(&p).expect("mkdir");
    std::fs::write(
        p.join("small.rego"),
        "package small\nimport rego.v1\ndeny contains \"too big\" if input.size > 10\n",
    )
    .expect("write");
    std::fs::write(
        p.join("small_test.rego"),
        "package small\nimport rego.v1\ntest_big_denied if { deny == {\"too big\"} with input as {\"size\": 11} }\ntest_wrong if { count(deny) == 1 with input as {\"size\": 1} }\n",
    )
    .expect("write");
    let run = cairn(&tmp.0, &["policy", "test"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout.contains("data.small.test_big_denied: PASS"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("data.small.test_wrong: FAIL"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("PASS: 1/2"), "{}", run.stdout);
}

#[test]
fn the_example_passes_and_a_spot_vm_for_finance_is_denied_with_its_location() {
    let tmp = enterprise();
    let ok = cairn(&tmp.0, &["check"]);
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    assert!(ok.stdout.contains("check passed"), "{}", ok.stdout);

    finance_on_spot(&tmp.0);
    let run = cairn(&tmp.0, &["check"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(
            "DENY no-spot-for-finance [hard-mandatory]: vm ledger-app: finance workloads may not run on spot capacity\n  --> workloads.kdl:14:4"
        ),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("check failed"), "{}", run.stdout);
}

#[test]
fn soft_mandatory_denials_can_be_overridden_and_the_override_is_recorded() {
    let tmp = enterprise();
    // A budget the ledger cannot meet.
    edit(&tmp.0.join("tenants.kdl"), "monthly=4000", "monthly=100");
    let run = cairn(&tmp.0, &["check", "--format", "json"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    let denial = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["policy"] == "budget" && f["rule"] == "deny")
        .expect("a budget denial");
    assert_eq!(denial["object"]["kind"], "tenant");
    assert_eq!(denial["object"]["name"], "finance");
    assert_eq!(denial["enforcement"], "soft-mandatory");
    assert!(denial["location"]["file"] == "tenants.kdl", "{denial}");

    let run = cairn(
        &tmp.0,
        &[
            "check",
            "--override",
            "budget",
            "--reason",
            "Q4 migration, approved by CFO",
        ],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("OVERRIDDEN budget"), "{}", run.stdout);
    assert!(
        run.stdout.contains("override budget applied: 1 denial of policy budget waived: Q4 migration, approved by CFO"),
        "{}",
        run.stdout
    );
    let log = std::fs::read_to_string(tmp.0.join(".cairn/overrides.log")).expect("the log");
    let entry: serde_json::Value =
        serde_json::from_str(log.lines().next().expect("a line")).expect("a JSON line");
    assert_eq!(entry["policy"], "budget");
    assert_eq!(entry["reason"], "Q4 migration, approved by CFO");
    assert!(
        entry["waived"][0]
            .as_str()
            .expect("message")
            .starts_with("tenant finance:")
    );
}

#[test]
fn hard_mandatory_policies_refuse_overrides_and_unknown_ones_are_usage_errors() {
    let tmp = enterprise();
    finance_on_spot(&tmp.0);
    let run = cairn(
        &tmp.0,
        &[
            "check",
            "--override",
            "no-spot-for-finance",
            "--reason",
            "please",
        ],
    );
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout.contains("override no-spot-for-finance refused"),
        "{}",
        run.stdout
    );

    let run = cairn(&tmp.0, &["check", "--override", "nope", "--reason", "x"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("there is no policy of that name"),
        "{}",
        run.stderr
    );

    let run = cairn(&tmp.0, &["check", "--override", "budget"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--reason"), "{}", run.stderr);
}

#[test]
fn sarif_and_junit_carry_the_denial() {
    let tmp = enterprise();
    finance_on_spot(&tmp.0);
    let run = cairn(&tmp.0, &["check", "--format", "sarif"]);
    assert_eq!(run.code, 1);
    let sarif: serde_json::Value = serde_json::from_str(&run.stdout).expect("SARIF is JSON");
    assert_eq!(sarif["version"], "2.1.0");
    let result = sarif["runs"][0]["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["ruleId"] == "no-spot-for-finance")
        .expect("the denial");
    assert_eq!(result["level"], "error");
    let region = &result["locations"][0]["physicalLocation"];
    assert_eq!(region["artifactLocation"]["uri"], "workloads.kdl");
    assert_eq!(region["region"]["startLine"], 14);

    let run = cairn(&tmp.0, &["check", "--format", "junit"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.starts_with("<?xml"), "{}", run.stdout);
    assert!(
        run.stdout.contains("<testcase classname=\"cairn.policies\" name=\"no-spot-for-finance\" file=\"policies/no-spot-for-finance.rego\">\n      <failure message=\"1 blocking denial (hard-mandatory)\">"),
        "{}",
        run.stdout
    );
}

#[test]
fn advisory_policies_report_without_blocking_and_object_messages_are_located() {
    let tmp = enterprise();
    std::fs::write(
        tmp.0.join("policies/big-vms.rego"),
        "# METADATA\n# title: Big VMs\n# custom:\n#   enforcement: advisory\npackage cairn.big\n\nimport rego.v1\n\ndeny contains {\"msg\": sprintf(\"%s has %d vCPUs\", [vm.name, vm.cpu]), \"object\": {\"kind\": \"vm\", \"name\": vm.name}} if {\n\tsome vm in input.vms\n\tvm.cpu >= 16\n}\n",
    )
    .expect("write");
    let run = cairn(&tmp.0, &["check"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(
            "ADVISORY big-vms [advisory]: nightly-etl has 16 vCPUs\n  --> workloads.kdl:37:4"
        ),
        "{}",
        run.stdout
    );
}

#[test]
fn a_broken_policy_fails_closed() {
    let tmp = enterprise();
    std::fs::write(
        tmp.0.join("policies/broken.rego"),
        "package cairn.broken\n\ndeny contains msg if {\n",
    )
    .expect("write");
    let run = cairn(&tmp.0, &["check"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout
            .contains("ERROR broken (policies/broken.rego): the policy could not be evaluated"),
        "{}",
        run.stdout
    );
}

#[test]
fn placement_is_part_of_the_input() {
    let tmp = enterprise();
    // The FT pair on two nodes of one rack.
    let placement = serde_json::json!({
        "format_version": 1,
        "vms": [{"name": "ledger-db", "node": "hq-r1-n1", "secondary": "hq-r1-n2"}],
        "unplaced": [],
    });
    let file = tmp.0.join("placement.json");
    std::fs::write(&file, placement.to_string()).expect("write");
    let run = cairn(&tmp.0, &["check", "--placement", "placement.json"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("vm ledger-db: primary on hq-r1-n1 and secondary on hq-r1-n2 share rack r1\n  --> workloads.kdl:1:4"),
        "{}",
        run.stdout
    );
}
