//! Signatures made by `ssh-keygen -Y sign`, verified by `policy::sshsig`.

use std::path::{Path, PathBuf};
use std::process::Command;

use policy::sshsig::{AllowedSigners, SigError, SshSig};

fn temp_dir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("policy-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}

fn keygen(dir: &Path, name: &str) -> Option<(PathBuf, String)> {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    Some((key, public.trim().to_owned()))
}

fn sign(key: &Path, namespace: &str, message: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", namespace, "-f"])
        .arg(key)
        .arg(message)
        .output()
        .expect("ssh-keygen -Y sign runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(message.with_extension("txt.sig")).expect("the .sig file")
}

#[test]
fn ssh_keygen_signatures_verify_and_everything_else_is_refused() {
    let dir = temp_dir("sshsig");
    let Some((alice, alice_pub)) = keygen(&dir, "alice") else {
        eprintln!("skipped: ssh-keygen is not installed (apt-get install openssh-client)");
        return;
    };
    let (_, bob_pub) = keygen(&dir, "bob").expect("ssh-keygen works");
    let message = dir.join("msg.txt");
    std::fs::write(&message, "vm ledger-db: cpu 8\n").expect("write");
    let armored = sign(&alice, "file", &message);
    let sig = SshSig::parse_armored(&armored).expect("parses");
    assert_eq!(sig.namespace, "file");
    assert_eq!(sig.hash_algorithm, "sha512");

    sig.verify(b"vm ledger-db: cpu 8\n", "file")
        .expect("good signature");
    assert_eq!(
        sig.verify(b"vm ledger-db: cpu 9\n", "file"),
        Err(SigError::BadSignature)
    );
    assert!(matches!(
        sig.verify(b"vm ledger-db: cpu 8\n", "git"),
        Err(SigError::Namespace { .. })
    ));

    let trusted =
        AllowedSigners::parse(&format!("alice@example.com {alice_pub}\n")).expect("parses");
    let t = trusted.check(&sig, "file", 0).expect("trusted");
    assert_eq!(t.principals, vec!["alice@example.com".to_owned()]);
    // The fingerprint is the one ssh-keygen prints.
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(alice.with_extension("pub"))
        .output()
        .expect("ssh-keygen -l runs");
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listed.contains(&t.fingerprint),
        "{listed} vs {}",
        t.fingerprint
    );

    let others = AllowedSigners::parse(&format!("bob@example.com {bob_pub}\n")).expect("parses");
    assert!(matches!(
        others.check(&sig, "file", 0),
        Err(SigError::Untrusted { .. })
    ));

    // A flipped byte inside the armor is refused, not accepted.
    let mut blob_line: Vec<char> = armored
        .lines()
        .nth(1)
        .expect("a base64 line")
        .chars()
        .collect();
    blob_line[40] = if blob_line[40] == 'A' { 'B' } else { 'A' };
    let tampered = armored.replacen(
        armored.lines().nth(1).expect("line"),
        &blob_line.into_iter().collect::<String>(),
        1,
    );
    let refused = SshSig::parse_armored(&tampered)
        .and_then(|s| s.verify(b"vm ledger-db: cpu 8\n", "file").map(|()| s));
    assert!(refused.is_err(), "a tampered signature verified");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rsa_and_ecdsa_signatures_are_refused_as_unsupported_not_waved_through() {
    let dir = temp_dir("sshsig-types");
    let message = dir.join("msg.txt");
    std::fs::write(&message, "vm ledger-db: cpu 8\n").expect("write");
    for (kind, want) in [("rsa", "ssh-rsa"), ("ecdsa", "ecdsa-sha2-nistp256")] {
        let key = dir.join(kind);
        let Ok(out) = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-C", kind, "-f"])
            .arg(&key)
            .output()
        else {
            eprintln!("skipped: ssh-keygen is not installed (apt-get install openssh-client)");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let armored = sign(&key, "git", &message);
        let _ = std::fs::remove_file(message.with_extension("txt.sig"));
        let refused =
            SshSig::parse_armored(&armored).and_then(|s| s.verify(b"vm ledger-db: cpu 8\n", "git"));
        match refused {
            Err(SigError::Unsupported(alg)) => assert!(alg.starts_with(want), "{kind}: {alg}"),
            other => panic!("{kind}: {other:?}"),
        }
    }
    // Garbage inside a well-formed armor is malformed, not a panic.
    let bad = "-----BEGIN SSH SIGNATURE-----\nU1NIU0lHAAAAAQ==\n-----END SSH SIGNATURE-----\n";
    assert!(matches!(
        SshSig::parse_armored(bad),
        Err(SigError::Malformed(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
