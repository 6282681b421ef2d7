//! The fuzz checks over every seed, on stable Rust (no libFuzzer).

#[test]
fn every_seed_passes_the_checks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/allowed_signers");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("the seed corpus") {
        let data = std::fs::read(e.expect("entry").path()).expect("seed");
        cairn_fuzz::check_signing_input(&data);
        // Every prefix and a byte flipped at each position, as a mutator would.
        for cut in 0..data.len().min(600) {
            cairn_fuzz::check_signing_input(&data[..cut]);
            let mut flipped = data.clone();
            flipped[cut] ^= 0x5a;
            cairn_fuzz::check_signing_input(&flipped);
        }
        n += 1;
    }
    assert!(n >= 5, "{n} seeds");
}
