//! `cairn fmt` never changes what a file means.
//!
//! For every input the formatter accepts, its output must parse (kdl-rs
//! `parse_v2`) to the same document — node names, type annotations,
//! arguments in order, properties, children — and formatting the output
//! again must give the same bytes. Inputs: every valid case of the official
//! KDL test suite (shipped inside the kdl crate's source), hand-written edge
//! cases, deterministic mutations of both, the examples, and spec edits that
//! once changed a compiled model (checked on the compiled model itself).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use compiler::fmt::format_text;
use compiler::{FileId, Sources, compile, model_json};
use kdl::{KdlDocument, KdlNode, KdlValue};

use crate::Rng;

// ---- meaning ------------------------------------------------------------

/// One value as the document means it: its type annotation and value
/// (floats by their bits, so `#nan` equals itself).
#[derive(Debug, PartialEq)]
struct Value {
    ty: Option<String>,
    value: String,
}

/// A node as the document means it, without spans or formatting.
/// Properties are unordered in KDL (so the formatter may sort them); a key
/// written twice keeps its values in order, so "the rightmost wins" holds
/// before and after. An empty children block means the same as none.
#[derive(Debug, PartialEq)]
struct Node {
    ty: Option<String>,
    name: String,
    args: Vec<Value>,
    props: BTreeMap<String, Vec<Value>>,
    children: Vec<Node>,
}

fn value(ty: Option<&kdl::KdlIdentifier>, v: &KdlValue) -> Value {
    let value = match v {
        KdlValue::Float(f) => format!("float {:#x}", f.to_bits()),
        other => format!("{other:?}"),
    };
    Value {
        ty: ty.map(|t| t.value().to_owned()),
        value,
    }
}

fn node_meaning(n: &KdlNode) -> Node {
    let mut args = vec![];
    let mut props: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in n.entries() {
        let v = value(e.ty(), e.value());
        match e.name() {
            None => args.push(v),
            Some(k) => props.entry(k.value().to_owned()).or_default().push(v),
        }
    }
    Node {
        ty: n.ty().map(|t| t.value().to_owned()),
        name: n.name().value().to_owned(),
        args,
        props,
        children: n.children().map(meaning).unwrap_or_default(),
    }
}

fn meaning(doc: &KdlDocument) -> Vec<Node> {
    doc.nodes().iter().map(node_meaning).collect()
}

/// What formatting one text did.
struct Verdict {
    /// The output; `None` when the formatter refused the text.
    formatted: Option<String>,
    /// The output parses to the same document as the input.
    same_meaning: bool,
    /// Formatting the output again gives the same bytes.
    idempotent: bool,
    /// What went wrong, for the failure message.
    problems: Vec<String>,
}

fn parse_errors(e: &kdl::KdlError) -> String {
    e.diagnostics
        .iter()
        .map(|d| {
            format!(
                "{} at byte {}",
                d.message.as_deref().unwrap_or("invalid KDL"),
                d.span.offset()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn fmt_verdict(text: &str) -> Verdict {
    let mut v = Verdict {
        formatted: None,
        same_meaning: false,
        idempotent: false,
        problems: vec![],
    };
    let Ok(formatted) = format_text(FileId(0), text) else {
        if KdlDocument::parse_v2(text).is_ok() {
            v.problems
                .push("fmt refused text that kdl-rs parses".to_owned());
        }
        return v;
    };
    match (
        KdlDocument::parse_v2(text),
        KdlDocument::parse_v2(&formatted),
    ) {
        (Ok(before), Ok(after)) if meaning(&before) == meaning(&after) => v.same_meaning = true,
        (Ok(before), Ok(after)) => v.problems.push(format!(
            "the output means something else\n--- before ---\n{:#?}\n--- after ---\n{:#?}",
            meaning(&before),
            meaning(&after)
        )),
        (Err(e), _) => v
            .problems
            .push(format!("kdl-rs rejects the input: {}", parse_errors(&e))),
        (_, Err(e)) => v
            .problems
            .push(format!("the output does not parse: {}", parse_errors(&e))),
    }
    match format_text(FileId(0), &formatted) {
        Ok(again) if again == formatted => v.idempotent = true,
        Ok(again) => v
            .problems
            .push(format!("not idempotent; formatted again:\n{again}")),
        Err(_) => v.problems.push("the output does not format".to_owned()),
    }
    v.formatted = Some(formatted);
    v
}

/// Formats `text` and checks that the output means the same and is a fixed
/// point. `Ok(None)`: the formatter (rightly) refused text that does not
/// parse.
fn check_fmt(text: &str) -> Result<Option<String>, String> {
    let v = fmt_verdict(text);
    if !v.problems.is_empty() {
        return Err(format!(
            "{}\n--- output ---\n{}",
            v.problems.join("\n"),
            v.formatted.unwrap_or_default()
        ));
    }
    Ok(v.formatted)
}

// ---- the KDL test suite ---------------------------------------------------

fn host_triple() -> Option<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let out = std::process::Command::new(rustc).arg("-vV").output().ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
}

/// The kdl crate's `tests/test_cases` directory, found through `cargo
/// metadata` (the kdl package the compiler depends on), so the test needs no
/// machine-specific path.
fn kdl_test_cases() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").map_err(|_| "CARGO is not set".to_owned())?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    // Only the host's packages: the others need not be downloaded.
    let mut command = std::process::Command::new(cargo);
    command
        .args(["metadata", "--format-version", "1", "--offline"])
        .arg("--manifest-path")
        .arg(&manifest);
    if let Some(host) = host_triple() {
        command.args(["--filter-platform", &host]);
    }
    let out = command
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("cargo metadata output is not JSON: {e}"))?;
    // The kdl package the compiler itself resolves to.
    let compiler_id = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "compiler")
        .and_then(|p| p["id"].as_str())
        .ok_or("no compiler package in cargo metadata")?;
    let kdl_id = meta["resolve"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == compiler_id)
        .and_then(|n| {
            n["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["name"] == "kdl")
        })
        .and_then(|d| d["pkg"].as_str())
        .ok_or("the compiler has no kdl dependency in cargo metadata")?;
    let manifest_path = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"] == kdl_id)
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or("no manifest_path for the kdl package")?;
    let dir = Path::new(manifest_path)
        .parent()
        .ok_or("kdl manifest_path has no parent")?
        .join("tests")
        .join("test_cases");
    if dir.join("input").is_dir() {
        Ok(dir)
    } else {
        Err(format!("{} does not exist", dir.join("input").display()))
    }
}

/// Every valid input of the KDL test suite, by name: the suite's README
/// says an input is valid when `expected_kdl/` has a file of the same name
/// (the invalid ones are also named `*_fail.kdl`).
fn valid_suite_inputs() -> Result<Vec<(String, Vec<u8>)>, String> {
    let cases = kdl_test_cases()?;
    let mut names: Vec<String> = std::fs::read_dir(cases.join("input"))
        .map_err(|e| format!("cannot read {}: {e}", cases.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".kdl") && cases.join("expected_kdl").join(n).exists())
        .collect();
    names.sort();
    let inputs: Vec<(String, Vec<u8>)> = names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(cases.join("input").join(&n)).unwrap_or_default();
            (n, bytes)
        })
        .collect();
    if inputs.len() < 200 {
        return Err(format!(
            "only {} valid inputs in {}",
            inputs.len(),
            cases.display()
        ));
    }
    Ok(inputs)
}

#[test]
fn fmt_keeps_meaning_of_every_valid_kdl_test_suite_input() {
    let inputs = match valid_suite_inputs() {
        Ok(inputs) => inputs,
        Err(why) => {
            println!("SKIPPED: the KDL test suite was not found: {why}");
            return;
        }
    };
    let valid = inputs.len();
    let mut same_meaning = 0;
    let mut idempotent = 0;
    let mut failures = vec![];
    for (name, bytes) in inputs {
        let Ok(text) = String::from_utf8(bytes) else {
            failures.push(format!("{name}: not UTF-8"));
            continue;
        };
        let v = fmt_verdict(&text);
        same_meaning += usize::from(v.same_meaning);
        idempotent += usize::from(v.idempotent);
        if v.formatted.is_none() && v.problems.is_empty() {
            failures.push(format!("{name}: kdl-rs rejects a valid input"));
        } else if !v.problems.is_empty() {
            failures.push(format!(
                "{name}: {}\n--- input ---\n{text}\n--- output ---\n{}",
                v.problems.join("\n"),
                v.formatted.unwrap_or_default()
            ));
        }
    }
    println!(
        "KDL test suite, {valid} valid inputs: {same_meaning} format to the same document, \
         {idempotent} idempotently"
    );
    assert!(
        failures.is_empty(),
        "{} of {valid} valid inputs fail:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The characters of a text that formatting must keep, as a sorted bag:
/// all but whitespace and what the formatter may drop (`;` between nodes,
/// `\` of a joined continuation, the braces of an empty block).
fn kept_characters(text: &str) -> Vec<char> {
    let mut chars: Vec<char> = text
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, ';' | '\\' | '{' | '}'))
        .collect();
    chars.sort_unstable();
    chars
}

/// Deterministic mutations of the suite's valid inputs and the edge cases
/// below (KDL's separators, continuations, slashdashes and comments
/// inserted, deleted and swapped in): every mutant kdl-rs accepts keeps its
/// meaning and its text (no comment or slashdashed part lost) and formats
/// to a fixed point.
#[test]
fn fmt_keeps_meaning_of_mutated_inputs() {
    let mut inputs: Vec<String> = EDGE_CASES.iter().map(|c| (*c).to_owned()).collect();
    match valid_suite_inputs() {
        Ok(suite) => inputs.extend(
            suite
                .into_iter()
                .filter_map(|(_, bytes)| String::from_utf8(bytes).ok()),
        ),
        Err(why) => {
            println!("the KDL test suite was not found ({why}): mutating the edge cases only")
        }
    }
    const TOKENS: &[&str] = &[
        "\\",
        "\n",
        "\r\n",
        " ",
        ";",
        "{",
        "}",
        "=",
        "\"",
        "#",
        "/-",
        "//",
        "/*",
        "*/",
        "\\\n",
        " \\ // c\n",
        "/* c */",
        "(t)",
        "\"\"\"\n",
        "x",
        "1",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for round in 0..4000 {
        let mut text = inputs[rng.below(inputs.len())].clone();
        for _ in 0..=rng.below(3) {
            let mut at = rng.below(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let mut to = (at + 1 + rng.below(3)).min(text.len());
            while !text.is_char_boundary(to) {
                to += 1;
            }
            let token = TOKENS[rng.below(TOKENS.len())];
            match rng.below(3) {
                0 => text.insert_str(at, token),
                1 => text.replace_range(at..to, ""),
                _ => text.replace_range(at..to, token),
            }
        }
        if KdlDocument::parse_v2(&text).is_err() {
            continue;
        }
        accepted += 1;
        let out = check_fmt(&text)
            .unwrap_or_else(|e| panic!("round {round}: {e}\n--- input ---\n{text:?}"))
            .unwrap_or_else(|| panic!("round {round}: fmt refused {text:?}"));
        assert_eq!(
            kept_characters(&out),
            kept_characters(&text),
            "round {round}: text lost or added\n--- input ---\n{text:?}\n--- output ---\n{out:?}"
        );
    }
    println!("{accepted} mutants accepted by kdl-rs kept their meaning");
    assert!(accepted > 500, "only {accepted} mutants parsed");
}

// ---- edge cases ------------------------------------------------------------

/// Text around nodes that kdl-rs keeps in unusual places (or not at all:
/// a comment after `}` behind a space). Every `noteN` is in a comment.
const EDGE_CASES: &[&str] = &[
    "a { b }  // note1 after close\nc { d }// note2 tight\n",
    "e { } /* note3 */ ; f\ng {\n}\nh { /* note4 only comment */ }\n",
    "i {   // note5 aligned\n    j\n}\n",
    "k x=1 \\ // note6\n  y=2 \\\n  z=3 // note7\n",
    "l /-{ x } { y } /-{ z }   // note8\n",
    "m; // note9 after a semicolon\nm2; /-m3 { m4 }\nm5\n",
    "n \"a\" \\ // note10 before the brace\n    {\n    o\n}\n",
    "p \\\n  /* note11 */ q=1\n",
    "(t)r (u8)1 key = (i32) 2 /* note12 */ key=3\n",
    "s ( t /* note13 */ )name\n",
    "u { v; w; } // note14\n/- x { y } // note15\nz\n",
    "vm \"a\" \\ // note16\n    cpu=2 {\n    tag \"x\" \\\n        \"y\" // note17\n}\n",
    "doc \"\"\"\n    multi\n      line\n    \"\"\" \\ // note18\n  next\n",
    "/* note19\n   spans lines */ a\n\n\n\n// note20\nb /* note21\n*/ c\n",
    "\u{feff}// note22 after a byte-order mark\na\n",
    "a key= \\ // note23\n  1 b=2\n(t) /* note24 */ name x\n",
    // Found by the mutation test: a slashdash and continuation at the end
    // of a file without a final newline, and before a `;`.
    "nod /- {\n}\\",
    "node /-  x  \\\n;  //  note25\n",
];

/// The edge cases (and their CRLF variants) keep their meaning, every
/// comment, and are fixed points after one pass.
#[test]
fn fmt_keeps_meaning_and_comments_of_edge_cases() {
    for case in EDGE_CASES {
        for text in [case.to_string(), case.replace('\n', "\r\n")] {
            let out = check_fmt(&text)
                .unwrap_or_else(|e| panic!("{text:?}: {e}"))
                .unwrap_or_else(|| panic!("{text:?} does not parse"));
            let notes = |t: &str| {
                let mut words: Vec<String> = t
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|w| w.starts_with("note"))
                    .map(str::to_owned)
                    .collect();
                words.sort();
                words
            };
            assert_eq!(
                notes(&out),
                notes(&text),
                "comments lost or doubled:\n--- input ---\n{text}\n--- output ---\n{out}"
            );
        }
    }
}

// ---- compiled meaning -----------------------------------------------------

fn example_files(example: &str) -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(example);
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("examples exist")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "kdl"))
        .map(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read_to_string(&p).expect("read example"))
        })
        .collect();
    files.sort();
    files
}

fn compiled(files: &[(String, String)]) -> String {
    let c = compile(&Sources::from_files(files.iter().cloned()));
    assert!(
        !c.has_errors(),
        "the spec must compile: {:#?}",
        c.diagnostics
    );
    model_json(&c.model)
}

/// Edits one quickstart file, then checks that formatting every file keeps
/// the compiled model byte for byte (and the text's meaning, idempotently).
fn check_quickstart_edit(file: &str, from: &str, to: &str) {
    let mut files = example_files("quickstart");
    let edited = files
        .iter_mut()
        .find(|(name, _)| name == file)
        .expect("the quickstart file exists");
    assert!(edited.1.contains(from), "{file} contains {from:?}");
    edited.1 = edited.1.replace(from, to);
    let before = compiled(&files);
    let formatted: Vec<(String, String)> = files
        .iter()
        .map(|(name, text)| {
            let out = check_fmt(text)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .unwrap_or_else(|| panic!("{name} does not parse"));
            (name.clone(), out)
        })
        .collect();
    assert_eq!(
        compiled(&formatted),
        before,
        "fmt changed the compiled model"
    );
}

/// Issue 12: `max_moves` went from 2 to 10 because the continuation was
/// joined after the `//` comment, which then swallowed `max-moves=2`.
#[test]
fn fmt_keeps_rebalance_continuation_with_trailing_comment() {
    check_quickstart_edit(
        "cluster.kdl",
        "rebalance threshold=0.25 max-moves=2",
        "rebalance threshold=0.25 \\  // at most two moves per run\n            max-moves=2",
    );
}

/// Issue 12: a continuation on a `node` line gave "No closing '}' for child
/// block".
#[test]
fn fmt_keeps_continuation_on_node_line() {
    check_quickstart_edit(
        "cluster.kdl",
        "node \"lab-2\" class=\"laptop\" address=\"127.0.0.12:7100\" underlay=\"10.255.0.12/24\"",
        "node \"lab-2\" \\ // the second laptop\n            class=\"laptop\" \\\n            address=\"127.0.0.12:7100\" underlay=\"10.255.0.12/24\" {\n        }",
    );
    check_quickstart_edit(
        "cluster.kdl",
        "rack \"desk\" {",
        "rack \\ // one rack\n        \"desk\" \\\n        {",
    );
}

// ---- the examples ---------------------------------------------------------

/// The README promises `cairn fmt --check examples/` passes: every shipped
/// spec file is already formatted (and formatting keeps its meaning).
#[test]
fn fmt_check_passes_on_examples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let sources = Sources::load_dir(&root).expect("load examples");
    assert!(sources.len() >= 8, "examples found: {}", sources.len());
    let mut unformatted = vec![];
    for (_, file) in sources.files() {
        let formatted = check_fmt(&file.text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.path))
            .unwrap_or_else(|| panic!("{} does not parse", file.path));
        if formatted != *file.text {
            unformatted.push(file.path.clone());
        }
    }
    assert!(
        unformatted.is_empty(),
        "`cairn fmt --check examples/` would reformat: {unformatted:?} (run `cairn fmt examples/`)"
    );
}
