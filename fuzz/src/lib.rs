//! What the fuzz targets check, as plain functions so that a stable
//! `cargo test` runs them over the seed corpus too (`tests/corpus.rs`).

/// Allowed-signers text, SSHSIG armor and blob, and a member key, from the
/// same bytes: none may panic, and what parses must be consistent.
pub fn check_signing_input(data: &[u8]) {
    let _ = policy::sshsig::SshSig::parse_blob(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(signers) = policy::sshsig::AllowedSigners::parse(text) {
        let lines = text.lines().count();
        for s in &signers.signers {
            assert!(s.line >= 1 && s.line <= lines, "line {} of {lines}", s.line);
            assert!(!s.principals.is_empty());
            if let (Some(a), Some(b)) = (s.valid_after, s.valid_before) {
                let _ = a <= b;
            }
        }
    }
    if let Ok(sig) = policy::sshsig::SshSig::parse_armored(text) {
        assert!(sig.fingerprint().starts_with("SHA256:"));
        // Verification of garbage must refuse, never panic.
        let _ = sig.verify(data, "git");
    }
    if let Ok(k) = compiler::sshkey::parse(text) {
        assert_eq!(k.blob, compiler::sshkey::ed25519_blob(&k.key));
        let again = compiler::sshkey::parse(&k.canonical()).expect("canonical parses");
        assert_eq!(again.blob, k.blob);
    }
}
