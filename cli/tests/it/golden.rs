//! Data-driven golden cases under `golden-tests/`.
//!
//! A case is a directory holding its spec root in `specs/` (or a file
//! `specs.path` naming one, relative to the case). Expected outputs sit beside
//! it: `validate.txt` (exit code, stdout and stderr of `cairn validate`),
//! `validate.json` for cases named `many-*`, and for cases that validate,
//! `model.json` and `compile.txt`. A file `commands` lists further `cairn`
//! command lines (one per line, run in the case directory); each output is
//! pinned in `cmd-N.txt`. Cases named `fmt-*` also pin the output of
//! `cairn fmt` under `fmt/`. A missing expectation fails the test; re-bless
//! every case with `UPDATE_GOLDEN=1 cargo test -p cli --test it golden`
//! (or `cargo xtask bless`), then review the diff.

use std::path::{Path, PathBuf};

use crate::{TempDir, cairn, copy_dir, repo_root};

fn bless() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v != "0")
}

struct Checker {
    failures: Vec<String>,
    checked: usize,
}

impl Checker {
    fn expect(&mut self, path: &Path, actual: &str) {
        self.checked += 1;
        let rel = path
            .strip_prefix(repo_root())
            .unwrap_or(path)
            .display()
            .to_string();
        if bless() {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create golden dir");
            }
            if std::fs::read_to_string(path).ok().as_deref() != Some(actual) {
                std::fs::write(path, actual).expect("write golden file");
                eprintln!("blessed {rel}");
            }
            return;
        }
        match std::fs::read_to_string(path) {
            Err(_) => self.failures.push(format!(
                "{rel}: no expectation; run UPDATE_GOLDEN=1 cargo test -p cli --test it golden"
            )),
            Ok(expected) if expected == actual => {}
            Ok(expected) => {
                let diff = similar::TextDiff::from_lines(&expected, actual)
                    .unified_diff()
                    .context_radius(3)
                    .header("expected", "actual")
                    .to_string();
                self.failures.push(format!("{rel} differs:\n{diff}"));
            }
        }
    }
}

fn transcript(run: &crate::Run) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        run.code, run.stdout, run.stderr
    )
}

fn spec_dir(case: &Path) -> PathBuf {
    match std::fs::read_to_string(case.join("specs.path")) {
        Ok(p) => case.join(p.trim()),
        Err(_) => case.join("specs"),
    }
}

#[test]
fn golden_cases() {
    let root = repo_root().join("golden-tests");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("golden-tests/ exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 30,
        "expected the golden cases, found {}",
        cases.len()
    );
    let mut c = Checker {
        failures: vec![],
        checked: 0,
    };
    for case in &cases {
        let name = case
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let specs = spec_dir(case);
        let specs_arg = specs
            .strip_prefix(case)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| specs.clone());
        let specs_arg = specs_arg.to_str().expect("utf-8 path");
        let validate = cairn(case, &["validate", specs_arg]);
        assert!(
            validate.code == 0 || validate.code == 1,
            "{name}: validate exited {}: {}",
            validate.code,
            validate.stderr
        );
        assert!(
            !validate.stderr.contains("panicked"),
            "{name}: cairn panicked: {}",
            validate.stderr
        );
        c.expect(&case.join("validate.txt"), &transcript(&validate));
        if name.starts_with("many-") {
            let json = cairn(case, &["validate", specs_arg, "--format", "json"]);
            c.expect(&case.join("validate.json"), &json.stdout);
        }
        if validate.code == 0 {
            let json = cairn(case, &["compile", specs_arg, "--format", "json"]);
            assert_eq!(json.code, 0, "{name}: compile failed: {}", json.stderr);
            c.expect(&case.join("model.json"), &json.stdout);
            let text = cairn(case, &["compile", specs_arg]);
            c.expect(&case.join("compile.txt"), &text.stdout);
        }
        if let Ok(commands) = std::fs::read_to_string(case.join("commands")) {
            for (i, line) in commands
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .enumerate()
            {
                let args: Vec<&str> = line.split_whitespace().collect();
                let run = cairn(case, &args);
                assert!(
                    !run.stderr.contains("panicked"),
                    "{name}: `cairn {line}` panicked: {}",
                    run.stderr
                );
                c.expect(
                    &case.join(format!("cmd-{}.txt", i + 1)),
                    &format!("$ cairn {line}\n{}", transcript(&run)),
                );
            }
        }
        if name.starts_with("fmt-") {
            let tmp = TempDir::new("fmt");
            copy_dir(&specs, &tmp.0);
            let run = cairn(&tmp.0, &["fmt", "."]);
            assert_eq!(run.code, 0, "{name}: fmt failed: {}", run.stderr);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&tmp.0)
                .expect("read")
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).expect("read formatted");
                c.expect(
                    &case.join("fmt").join(f.file_name().expect("file name")),
                    &text,
                );
            }
            let again = cairn(&tmp.0, &["fmt", "--check", "."]);
            assert_eq!(
                again.code, 0,
                "{name}: fmt is not idempotent: {}",
                again.stdout
            );
        }
    }
    assert!(
        c.failures.is_empty(),
        "{} of {} golden expectations failed:\n\n{}",
        c.failures.len(),
        c.checked,
        c.failures.join("\n\n")
    );
    eprintln!(
        "{} golden expectations in {} cases hold",
        c.checked,
        cases.len()
    );
}
