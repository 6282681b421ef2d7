//! Fuzz target: any bytes as a spec file, beside the quickstart example.
//! The front end must not panic, every span must lie inside its file, and
//! `fmt` output must parse and be a fixed point.
//!
//! Run: `cargo install cargo-fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run compile`
//! (from this directory's parent; seeds: `fuzz/corpus/compile/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

const QUICKSTART: &str = include_str!("../../examples/quickstart/cluster.kdl");

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let sources = compiler::Sources::from_files([
        ("cluster.kdl".to_owned(), QUICKSTART.to_owned()),
        ("fuzz.kdl".to_owned(), text.to_owned()),
    ]);
    let c = compiler::compile(&sources);
    for d in &c.diagnostics {
        for l in &d.labels {
            assert!(l.span.start + l.span.len <= sources.text(l.span.file).len());
        }
        let _ = compiler::diag::render(&sources, d);
    }
    if let Ok(formatted) = compiler::fmt::format_text(compiler::FileId(1), text) {
        let again = compiler::fmt::format_text(compiler::FileId(1), &formatted).expect("fmt output parses");
        assert_eq!(again, formatted);
    }
});
