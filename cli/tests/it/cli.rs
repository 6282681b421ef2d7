//! CLI behaviour: determinism, git revisions, schemas, fmt, exit codes and
//! the contract with SPEC.md.

use std::path::Path;
use std::process::Command;

use crate::{TempDir, cairn, copy_dir, repo_root};

fn compile_json(dir: &Path) -> String {
    let run = cairn(dir, &["compile", ".", "--format", "json"]);
    assert_eq!(run.code, 0, "compile failed: {}", run.stderr);
    run.stdout
}

/// Splits a KDL file into its top-level nodes (with their leading comments).
fn top_level_nodes(text: &str) -> Vec<String> {
    let mut nodes = vec![];
    let mut current = String::new();
    let mut depth = 0i32;
    for line in text.lines() {
        current.push_str(line);
        current.push('\n');
        depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
        let is_node = !line.trim().is_empty() && !line.trim_start().starts_with("//");
        if depth == 0 && is_node {
            nodes.push(std::mem::take(&mut current));
        }
    }
    nodes
}

#[test]
fn model_is_identical_whatever_the_file_names_and_order() {
    let example = repo_root().join("examples/enterprise");
    let expected = compile_json(&example);
    // Take every top-level node of every file, shuffle them with a fixed
    // permutation over differently named files, and compile again.
    let mut nodes = vec![];
    let mut names: Vec<_> = std::fs::read_dir(&example)
        .expect("read")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    names.sort();
    for path in names
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "kdl"))
    {
        nodes.extend(top_level_nodes(
            &std::fs::read_to_string(path).expect("read"),
        ));
    }
    assert!(nodes.len() > 15, "the example has its nodes");
    for (round, stride) in [(0, 7usize), (1, 5), (2, 3)] {
        let tmp = TempDir::new("shuffle");
        let n = nodes.len();
        let stride = if n % stride == 0 { stride + 1 } else { stride };
        let mut files: Vec<String> = vec![String::new(); 4];
        for i in 0..n {
            let node = &nodes[(i * stride + round) % n];
            files[(i * 3 + round) % 4].push_str(node);
        }
        for (i, text) in files.iter().enumerate() {
            let dir = tmp.0.join(format!("z{}", 3 - i));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join(format!("part-{round}-{i}.kdl")), text).expect("write");
        }
        assert_eq!(
            compile_json(&tmp.0),
            expected,
            "round {round}: the model changed with file names or order"
        );
    }
}

#[test]
fn spec_md_examples_are_the_enterprise_example_and_validate() {
    let spec_md = repo_root().join("../shared/SPEC.md");
    let Ok(spec) = std::fs::read_to_string(&spec_md) else {
        eprintln!(
            "skipped the SPEC.md comparison: {} is not beside the checkout",
            spec_md.display()
        );
        return;
    };
    let blocks: Vec<&str> = spec
        .split("```kdl\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or_default())
        .collect();
    let files = [
        "infra.kdl",
        "tenants.kdl",
        "workloads.kdl",
        "placement.kdl",
        "protection.kdl",
    ];
    assert_eq!(
        blocks.len(),
        files.len(),
        "SPEC.md has {} kdl examples; examples/enterprise mirrors them one file each",
        blocks.len()
    );
    for (block, file) in blocks.iter().zip(files) {
        let ours = std::fs::read_to_string(repo_root().join("examples/enterprise").join(file))
            .expect("read example");
        assert_eq!(
            &ours, block,
            "examples/enterprise/{file} differs from its SPEC.md block"
        );
    }
    let run = cairn(&repo_root(), &["validate", "examples/enterprise"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn the_spec_md_policy_reads_the_model_json() {
    let model = compile_json(&repo_root().join("examples/enterprise"));
    let policy = std::fs::read_to_string(repo_root().join("policies/no-spot-for-finance.rego"))
        .expect("policy");
    let eval = |model_json: &str| -> Vec<String> {
        let mut engine = regorus::Engine::new();
        engine
            .add_policy("no-spot-for-finance.rego".to_owned(), policy.clone())
            .expect("the policy parses");
        engine.set_input(regorus::Value::from_json_str(model_json).expect("model JSON"));
        let denies = engine
            .eval_rule("data.cairn.deny".to_owned())
            .expect("deny evaluates");
        denies
            .as_set()
            .expect("deny is a set")
            .iter()
            .map(|v| v.as_string().expect("messages are strings").to_string())
            .collect()
    };
    assert!(
        eval(&model).is_empty(),
        "the example has no finance VM on spot"
    );
    // Move a finance VM to a spot profile: the policy must name it.
    let tmp = TempDir::new("rego");
    copy_dir(&repo_root().join("examples/enterprise"), &tmp.0);
    let w = tmp.0.join("workloads.kdl");
    let text = std::fs::read_to_string(&w).expect("read").replace(
        "    availability \"ha\"\n    image \"debian-12\"",
        "    availability \"ha\"\n    sla \"batch\"\n    image \"debian-12\"",
    );
    std::fs::write(&w, text).expect("write");
    let denies = eval(&compile_json(&tmp.0));
    assert_eq!(
        denies,
        vec!["vm ledger-app: finance workloads may not run on spot capacity".to_owned()]
    );
}

#[test]
fn checked_in_schemas_match_the_generated_ones() {
    let tmp = TempDir::new("schema");
    let run = cairn(&tmp.0, &["schema", "--out", "out"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let mut written: Vec<String> = std::fs::read_dir(tmp.0.join("out"))
        .expect("out")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "check.schema.json",
            "diagnostics.schema.json",
            "diff.schema.json",
            "graph.schema.json",
            "model.schema.json",
            "place-explain.schema.json",
            "place-fail.schema.json",
            "placement.schema.json",
            "plan.schema.json",
            "spec.schema.json",
            "status.schema.json",
        ]
    );
    for name in &written {
        let generated = std::fs::read_to_string(tmp.0.join("out").join(name)).expect("generated");
        let checked_in =
            std::fs::read_to_string(repo_root().join("schemas").join(name)).unwrap_or_default();
        assert!(
            generated == checked_in,
            "schemas/{name} is out of date: run `cargo run -p cli --bin cairn -- schema --out schemas` (or `cargo xtask schemas`) and commit it"
        );
    }
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=cairn-test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validate_reads_a_git_revision() {
    let tmp = TempDir::new("git");
    let specs = tmp.0.join("specs");
    copy_dir(&repo_root().join("examples/quickstart"), &specs);
    git(&tmp.0, &["init", "-q", "-b", "main"]);
    git(&tmp.0, &["add", "."]);
    git(&tmp.0, &["commit", "-q", "-m", "quickstart"]);
    // Break the working tree; the committed revision stays valid.
    std::fs::write(specs.join("broken.kdl"), "vm \"x\" tenant=\"nobody\" site=\"lab\" {\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n}\n").expect("write");
    let head = cairn(&specs, &["validate", ".", "--rev", "HEAD"]);
    assert_eq!(head.code, 0, "HEAD should validate: {}", head.stderr);
    let work = cairn(&specs, &["validate", "."]);
    assert_eq!(work.code, 1);
    assert!(
        work.stderr.contains("cairn::resolve::unknown_tenant"),
        "{}",
        work.stderr
    );
    git(&tmp.0, &["add", "."]);
    git(&tmp.0, &["commit", "-q", "-m", "break it"]);
    let broken = cairn(&specs, &["validate", ".", "--rev", "HEAD"]);
    assert_eq!(broken.code, 1, "{}", broken.stderr);
    assert!(
        broken.stderr.contains("broken.kdl:1:"),
        "the diagnostic names the file: {}",
        broken.stderr
    );
    let previous = cairn(&specs, &["validate", ".", "--rev", "HEAD~1"]);
    assert_eq!(previous.code, 0, "{}", previous.stderr);
    let missing = cairn(&specs, &["validate", ".", "--rev", "no-such-branch"]);
    assert_eq!(missing.code, 2, "an unknown revision is a usage error");
    assert!(
        missing.stderr.contains("no-such-branch"),
        "{}",
        missing.stderr
    );
}

#[test]
fn fmt_keeps_the_model_and_is_idempotent_on_every_example() {
    for example in ["examples/enterprise", "examples/quickstart"] {
        let tmp = TempDir::new("fmt");
        copy_dir(&repo_root().join(example), &tmp.0);
        let before = compile_json(&tmp.0);
        let run = cairn(&tmp.0, &["fmt", "."]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(
            compile_json(&tmp.0),
            before,
            "{example}: formatting changed the model"
        );
        let check = cairn(&tmp.0, &["fmt", "--check", "."]);
        assert_eq!(check.code, 0, "{example}: not idempotent: {}", check.stdout);
        let original =
            std::fs::read_to_string(repo_root().join(example).join("tenants.kdl")).expect("read");
        let formatted = std::fs::read_to_string(tmp.0.join("tenants.kdl")).expect("read");
        for comment in original
            .lines()
            .filter_map(|l| l.split_once("//").map(|(_, c)| c.trim()))
        {
            assert!(
                formatted.contains(comment),
                "{example}: comment `{comment}` was lost"
            );
        }
    }
}

#[test]
fn fmt_check_lists_files_and_leaves_broken_files_alone() {
    let tmp = TempDir::new("fmtcheck");
    std::fs::write(tmp.0.join("a.kdl"), "tenant   \"a\"\n").expect("write");
    std::fs::write(tmp.0.join("b.kdl"), "tenant \"b\" {\n").expect("write");
    let check = cairn(&tmp.0, &["fmt", "--check", "."]);
    assert_eq!(check.code, 1);
    assert_eq!(check.stdout, "would reformat a.kdl\n");
    assert!(
        check.stderr.contains("cairn::parse::syntax"),
        "{}",
        check.stderr
    );
    let run = cairn(&tmp.0, &["fmt", "."]);
    assert_eq!(run.code, 1, "a file that does not parse fails fmt");
    assert_eq!(
        std::fs::read_to_string(tmp.0.join("a.kdl")).expect("read"),
        "tenant \"a\"\n"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.0.join("b.kdl")).expect("read"),
        "tenant \"b\" {\n",
        "a broken file is not touched"
    );
}

#[test]
fn exit_codes_follow_cli_md() {
    let root = repo_root();
    assert_eq!(cairn(&root, &["validate", "examples/quickstart"]).code, 0);
    assert_eq!(
        cairn(&root, &["validate", "golden-tests/unknown-tenant/specs"]).code,
        1
    );
    assert_eq!(cairn(&root, &["validate", "--no-such-flag"]).code, 2);
    assert_eq!(cairn(&root, &["validate", "/nonexistent/specs"]).code, 2);
    assert_eq!(cairn(&root, &["frobnicate"]).code, 2);
    assert_eq!(cairn(&root, &["--help"]).code, 0);
    let json = cairn(
        &root,
        &[
            "validate",
            "golden-tests/unknown-tenant/specs",
            "--format",
            "json",
        ],
    );
    assert_eq!(json.code, 1);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON diagnostics");
    assert_eq!(v["format_version"], 1);
    assert_eq!(
        v["diagnostics"][0]["code"],
        "cairn::resolve::unknown_tenant"
    );
    assert_eq!(v["diagnostics"][0]["file"], "vm.kdl");
    assert_eq!(v["diagnostics"][0]["line"], 1);
}

#[test]
fn gen_writes_a_repository_that_validates() {
    let tmp = TempDir::new("gen");
    let run = cairn(
        &tmp.0,
        &["gen", "--out", "repo", "--nodes", "60", "--vms", "400"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v = cairn(&tmp.0, &["validate", "repo"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(
        v.stdout.contains("60 nodes") && v.stdout.contains("400 VMs"),
        "{}",
        v.stdout
    );
    let again = cairn(&tmp.0, &["gen", "--out", "repo"]);
    assert_eq!(
        again.code, 2,
        "gen refuses to write into a non-empty directory"
    );
}
