//! The fast KDL parser against kdl-rs, differentially: for every input,
//! either the fast parser declines (`None`) or it returns a document equal to
//! kdl-rs's in everything lowering reads (names, entries, values, type
//! annotations, children, every span); for text kdl-rs rejects it must
//! decline. Inputs: the examples and golden tests, generated repos, hand
//! written edge cases and thousands of deterministic mutations of them.

use std::path::{Path, PathBuf};

use compiler::generate::{GenConfig, generate};
use compiler::kdl_fast;

use crate::Rng;
use kdl::{KdlDocument, KdlEntry, KdlIdentifier, KdlNode, KdlValue};

fn kdl_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("directory exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            kdl_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "kdl") {
            out.push(p);
        }
    }
}

fn repo_files(top: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(top);
    let mut paths = vec![];
    kdl_files(&root, &mut paths);
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read spec file");
            (p.display().to_string(), text)
        })
        .collect()
}

fn generated() -> Vec<(String, String)> {
    let mut files = vec![];
    for (seed, nodes, vms) in [(1, 4, 20), (2, 12, 60), (3, 30, 150), (7, 8, 400)] {
        for (path, text) in generate(&GenConfig { nodes, vms, seed }) {
            files.push((format!("gen seed {seed}: {path}"), text));
        }
    }
    files
}

// ---- the comparison walker ---------------------------------------------

fn ident(what: &str, a: &KdlIdentifier, b: &KdlIdentifier) -> Result<(), String> {
    if a.value() != b.value() {
        return Err(format!("{what}: `{}` vs `{}`", a.value(), b.value()));
    }
    if a.span() != b.span() {
        return Err(format!("{what} span: {:?} vs {:?}", a.span(), b.span()));
    }
    Ok(())
}

fn opt_ident(
    what: &str,
    a: Option<&KdlIdentifier>,
    b: Option<&KdlIdentifier>,
) -> Result<(), String> {
    match (a, b) {
        (None, None) => Ok(()),
        (Some(a), Some(b)) => ident(what, a, b),
        _ => Err(format!("{what}: {a:?} vs {b:?}")),
    }
}

fn value(what: &str, a: &KdlValue, b: &KdlValue) -> Result<(), String> {
    let same = match (a, b) {
        (KdlValue::Float(x), KdlValue::Float(y)) => {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        }
        (KdlValue::String(x), KdlValue::String(y)) => x == y,
        (KdlValue::Integer(x), KdlValue::Integer(y)) => x == y,
        (KdlValue::Bool(x), KdlValue::Bool(y)) => x == y,
        (KdlValue::Null, KdlValue::Null) => true,
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(format!("{what}: {a:?} vs {b:?}"))
    }
}

fn entry(what: &str, a: &KdlEntry, b: &KdlEntry) -> Result<(), String> {
    opt_ident(&format!("{what} key"), a.name(), b.name())?;
    opt_ident(&format!("{what} type"), a.ty(), b.ty())?;
    value(&format!("{what} value"), a.value(), b.value())?;
    if a.span() != b.span() {
        return Err(format!("{what} span: {:?} vs {:?}", a.span(), b.span()));
    }
    Ok(())
}

fn node(what: &str, a: &KdlNode, b: &KdlNode) -> Result<(), String> {
    let what = format!("{what}/{}", a.name().value());
    ident(&format!("{what} name"), a.name(), b.name())?;
    opt_ident(&format!("{what} type"), a.ty(), b.ty())?;
    if a.span() != b.span() {
        return Err(format!("{what} span: {:?} vs {:?}", a.span(), b.span()));
    }
    if a.entries().len() != b.entries().len() {
        return Err(format!(
            "{what}: {} entries vs {}",
            a.entries().len(),
            b.entries().len()
        ));
    }
    for (i, (x, y)) in a.entries().iter().zip(b.entries()).enumerate() {
        entry(&format!("{what} entry {i}"), x, y)?;
    }
    match (a.children(), b.children()) {
        (None, None) => Ok(()),
        (Some(x), Some(y)) => document(&what, x, y),
        (x, y) => Err(format!(
            "{what}: children {} vs {}",
            x.is_some(),
            y.is_some()
        )),
    }
}

/// Compares everything lowering reads; `Err` names the first difference.
fn document(what: &str, a: &KdlDocument, b: &KdlDocument) -> Result<(), String> {
    if a.span() != b.span() {
        return Err(format!("{what} span: {:?} vs {:?}", a.span(), b.span()));
    }
    if a.nodes().len() != b.nodes().len() {
        return Err(format!(
            "{what}: {} nodes vs {}",
            a.nodes().len(),
            b.nodes().len()
        ));
    }
    for (x, y) in a.nodes().iter().zip(b.nodes()) {
        node(what, x, y)?;
    }
    Ok(())
}

/// How the fast parser fared on one input.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Both parsed, to equal documents.
    Same,
    /// The fast parser declined valid KDL (allowed: kdl-rs parses it).
    Declined,
    /// Both rejected the text.
    BothRejected,
}

/// The differential check; panics with the input on any disagreement.
fn check(name: &str, text: &str) -> Outcome {
    let expected = KdlDocument::parse_v2(text);
    let fast = kdl_fast::parse(text);
    match (expected, fast) {
        (Ok(e), Some(f)) => {
            if let Err(diff) = document("doc", &f, &e) {
                panic!("{name}: fast parser differs from kdl-rs: {diff}\n--- input ---\n{text:?}");
            }
            Outcome::Same
        }
        (Ok(_), None) => Outcome::Declined,
        (Err(_), None) => Outcome::BothRejected,
        (Err(err), Some(_)) => panic!(
            "{name}: fast parser accepted text kdl-rs rejects ({err:?})\n--- input ---\n{text:?}"
        ),
    }
}

#[test]
fn fast_path_is_taken_and_equal_on_examples() {
    let files = repo_files("examples");
    assert!(files.len() >= 8, "examples found: {}", files.len());
    for (name, text) in &files {
        assert_eq!(check(name, text), Outcome::Same, "{name}");
    }
}

#[test]
fn fast_path_is_taken_and_equal_on_generated_repos() {
    let files = generated();
    assert!(files.len() > 10);
    for (name, text) in &files {
        assert_eq!(check(name, text), Outcome::Same, "{name}");
    }
}

#[test]
fn golden_tests_agree() {
    let files = repo_files("golden-tests");
    assert!(files.len() > 50, "golden files found: {}", files.len());
    let mut same = 0;
    for (name, text) in &files {
        if check(name, text) == Outcome::Same {
            same += 1;
        }
    }
    // The golden tests that are not about syntax errors take the fast path.
    assert!(
        same * 10 >= files.len() * 8,
        "fast path on {same} of {}",
        files.len()
    );
}

/// Inputs exercising each construct the fast parser handles, and some it
/// must leave to kdl-rs.
const CASES: &[(&str, bool)] = &[
    ("", true),
    ("  \n// only a comment\n", true),
    ("a", true),
    (
        "a 1 2.5 -3 +4 1_000 0x1F -0o17 0b1010 1e3 1.5E-2 -0.0",
        true,
    ),
    ("a #true #false #null #inf #-inf #nan", true),
    (
        "a \"q\\n\\t\\\"\\\\\\s\\u{1F600}\\u{e9}\" #\"raw \"x\" \\n\"# ##\"a\"#b\"##",
        true,
    ),
    ("a k=1 \"quoted key\"=2 k2 = x k3= (t)y", true),
    ("(ty)a (u)1 ( v )\"s\" (w) #true", true),
    (" a 1 ;b x = \"q\" /* c */ // z\n c { d 1; e; } \n", true),
    (" /-a\nb /-1 2 /-{ x } { y }  /-{z}\n", true),
    ("a /- 1 2 /-k=v /-\n  3 {\n  b\n\n  c 1   \n}\n", true),
    ("a { b { c { d; }; }; }\nz", true),
    ("a /* nested /* comments */ here */ 1", true),
    ("a {}\n/-b {}\nc{ }", true),
    ("a 1{}", true),
    ("- + -x +y .z a,b <c> ~", true),
    ("a \"é → ü\" // ünïcode comment\n/* ❄ */ b", true),
    ("a \"\"", true),
    ("a #\"\"#", true),
    ("node {\n    child 1; child 2\n}\n", true),
    // Left to kdl-rs (valid KDL).
    ("a \\\n  1", false),
    ("a 1\r\nb 2\r\n", false),
    ("a \"\"\"\n  multi\n  \"\"\"", false),
    ("ünï 1", false),
    ("a {}/-{}", false),
    ("/-a {} b", false),
    ("\u{feff}a 1", false),
    // Invalid KDL: both reject.
    ("a 1 = 2", false),
    ("a true", false),
    ("a 10GiB", false),
    ("a \"x\"y", false),
    ("a {", false),
    ("}", false),
    ("a 1.", false),
    ("a 0x", false),
    ("a 99999999999999999999999999999999999999999", false),
    ("a 99999999999999999999999999999999999999999.5", false),
    ("a #truex", false),
    ("a \"unterminated", false),
    ("a /* unterminated", false),
    ("a /-", false),
    ("/-a; b", false),
    ("a {} 1", false),
    ("a (t)k=v", false),
    ("a #\"\"\"#", false),
    ("a \"\\u{110000}\"", false),
    ("a \"\\q\"", false),
];

#[test]
fn edge_cases_agree() {
    for (text, fast) in CASES {
        let outcome = check(text, text);
        if *fast {
            assert_eq!(
                outcome,
                Outcome::Same,
                "expected the fast path for {text:?}"
            );
        } else {
            assert_ne!(outcome, Outcome::Same, "expected a fallback for {text:?}");
        }
    }
}

/// Fragments that stress the grammar when spliced into a spec file.
const FRAGMENTS: &[&str] = &[
    "\"",
    "#",
    "##",
    "#\"",
    "\"#",
    "{",
    "}",
    "(",
    ")",
    "(t)",
    "=",
    " = ",
    ";",
    "\n",
    " ",
    "\t",
    "/-",
    "/- ",
    "//",
    "/*",
    "*/",
    "\\",
    "\\n",
    "\\u{41}",
    "\\u{",
    "-",
    "+",
    ".",
    "_",
    "0",
    "1",
    "-1",
    "+1",
    ".5",
    "1.",
    "1.5",
    "1e",
    "1e5",
    "0x",
    "0xfF",
    "0o7",
    "0b2",
    "0b1",
    "#true",
    "#false",
    "#null",
    "#inf",
    "#-inf",
    "#nan",
    "#tru",
    "true",
    "inf",
    "é",
    "\u{2028}",
    "\u{a0}",
    "\r",
    "\r\n",
    "\u{0}",
    "\u{7f}",
    "\"\"\"",
    "k=v",
    "/-{ x }",
    "{}",
    "99999999999999999999999999999999999999999",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut s = text.to_owned();
    for _ in 0..1 + rng.below(4) / 3 {
        let boundaries: Vec<usize> = (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect();
        let at = boundaries[rng.below(boundaries.len())];
        let end = boundaries
            .iter()
            .copied()
            .filter(|&b| b >= at)
            .nth(1 + rng.below(3))
            .unwrap_or(at);
        match rng.below(4) {
            0 => s.insert_str(at, FRAGMENTS[rng.below(FRAGMENTS.len())]),
            1 => s.replace_range(at..end, ""),
            2 => s.replace_range(at..end, FRAGMENTS[rng.below(FRAGMENTS.len())]),
            _ => {
                // Duplicate a short stretch of the text somewhere else.
                let piece = s[at..end].to_owned();
                let to = boundaries[rng.below(boundaries.len())].min(s.len());
                if s.is_char_boundary(to) {
                    s.insert_str(to, &piece);
                }
            }
        }
    }
    s
}

/// Keeps mutated inputs small so thousands of them run in about a second.
fn windows(text: &str, rng: &mut Rng) -> String {
    if text.len() <= 600 {
        return text.to_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    let start = rng.below(lines.len());
    let n = 5 + rng.below(25);
    lines[start..(start + n).min(lines.len())].join("\n")
}

#[test]
fn mutations_agree() {
    let mut seeds: Vec<(String, String)> = repo_files("examples");
    seeds.extend(repo_files("golden-tests"));
    seeds.extend(generated().into_iter().step_by(7));
    seeds.extend(
        CASES
            .iter()
            .map(|(t, _)| ((*t).to_owned(), (*t).to_owned())),
    );
    // CAIRN_KDL_FAST_ROUNDS=1000000 (and _SEED) for a longer run.
    let rounds = std::env::var("CAIRN_KDL_FAST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000usize);
    let seed = std::env::var("CAIRN_KDL_FAST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let mut rng = Rng(seed.max(1));
    let (mut same, mut declined, mut rejected) = (0, 0, 0);
    for round in 0..rounds {
        let (name, text) = &seeds[round % seeds.len()];
        let base = windows(text, &mut rng);
        let input = mutate(&mut rng, &base);
        match check(&format!("mutation {round} of {name}"), &input) {
            Outcome::Same => same += 1,
            Outcome::Declined => declined += 1,
            Outcome::BothRejected => rejected += 1,
        }
    }
    eprintln!("mutations: {same} same, {declined} declined, {rejected} rejected by both");
    // The mutations reach both sides of the fast parser.
    assert!(
        same > 2000 && rejected > 2000,
        "{same} same, {rejected} rejected"
    );
}
