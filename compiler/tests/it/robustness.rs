//! No input may make the compiler or the formatter panic. A deterministic
//! mutator derives thousands of inputs from the examples (byte flips, cut
//! files, duplicated and swapped lines, numbers and units swapped) and runs
//! the whole front end on each. The same mutator drives the cargo-fuzz
//! target in `fuzz/` for longer runs.

use std::path::Path;

use compiler::{Sources, compile, fmt::format_text};

use crate::Rng;

fn examples() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = vec![];
    for example in ["enterprise", "quickstart"] {
        let mut names: Vec<_> = std::fs::read_dir(root.join(example))
            .expect("examples exist")
            .filter_map(Result::ok)
            .map(|e| e.path())
            // Spec files only: a quickstart run leaves its `.cairn/` state here.
            .filter(|p| p.extension().is_some_and(|x| x == "kdl"))
            .collect();
        names.sort();
        for p in names {
            files.push((
                format!(
                    "{example}/{}",
                    p.file_name().unwrap_or_default().to_string_lossy()
                ),
                std::fs::read_to_string(&p).expect("read example"),
            ));
        }
    }
    files
}

const TOKENS: &[&str] = &[
    "\"",
    "{",
    "}",
    "=",
    "#true",
    "#null",
    "-1",
    "0",
    "99999999999999999999999",
    "1.5",
    "\"0GiB\"",
    "\"1.GiB\"",
    "\"64MiB\"",
    "\"1h30\"",
    "\"10.0.0.0/33\"",
    "\"::1\"",
    "\"[::1]:0\"",
    "/-",
    "/*",
    "\\",
    "é",
    "\u{200b}",
    "replicas=0",
    "cpu",
    "vm",
    "site",
    ";",
    "\n",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut s: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(4) {
        if s.is_empty() {
            s.push('x');
        }
        let at = rng.below(s.len());
        match rng.below(6) {
            0 => {
                s.remove(at);
            }
            1 => s.truncate(at),
            2 => {
                let tok: Vec<char> = TOKENS[rng.below(TOKENS.len())].chars().collect();
                s.splice(at..at, tok);
            }
            3 => {
                let end = (at + 1 + rng.below(40)).min(s.len());
                let chunk: Vec<char> = s[at..end].to_vec();
                let to = rng.below(s.len());
                s.splice(to..to, chunk);
            }
            4 => s[at] = char::from_u32(rng.next() as u32 % 0x300).unwrap_or('?'),
            _ => {
                let t: String = s.iter().collect();
                let replaced = match rng.below(4) {
                    0 => t.replacen("GiB", "Gb", 1),
                    1 => t.replacen("\"hq\"", "\"dr\"", 1),
                    2 => t.replacen("replicas=", "replicas=9", 1),
                    _ => t.replacen("tenant=", "site=", 1),
                };
                s = replaced.chars().collect();
            }
        }
    }
    s.into_iter().collect()
}

#[test]
fn mutated_specs_never_panic_and_always_explain_errors() {
    let files = examples();
    let mut rng = Rng(0x5eed_cafe);
    let mut rejected = 0;
    for round in 0..1500 {
        let mut set = files.clone();
        let victim = rng.below(set.len());
        set[victim].1 = mutate(&mut rng, &set[victim].1);
        let text = set[victim].1.clone();
        let sources = Sources::from_files(set);
        let c = compile(&sources);
        for d in &c.diagnostics {
            // Every diagnostic renders and points inside its file.
            for l in &d.labels {
                assert!(
                    l.span.start + l.span.len <= sources.text(l.span.file).len(),
                    "round {round}: span out of range in {}",
                    d.code
                );
            }
            let _ = compiler::diag::render(&sources, d);
            assert!(
                d.code.starts_with("cairn::"),
                "round {round}: code {}",
                d.code
            );
        }
        if c.has_errors() {
            rejected += 1;
        } else {
            let _ = compiler::model_json(&c.model);
        }
        if let Ok(formatted) = format_text(compiler::FileId(0), &text) {
            // What fmt writes parses again and formats to itself.
            let again = format_text(compiler::FileId(0), &formatted).unwrap_or_else(|_| {
                panic!("round {round}: fmt output does not parse:\n{formatted}")
            });
            assert_eq!(again, formatted, "round {round}: fmt is not idempotent");
        }
    }
    assert!(
        rejected > 500,
        "the mutator should produce mostly invalid specs, got {rejected} rejections"
    );
}
