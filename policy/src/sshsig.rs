//! SSHSIG signatures (OpenSSH's `PROTOCOL.sshsig`, what `ssh-keygen -Y sign`
//! and `git commit -S` with `gpg.format=ssh` make) and git's allowed-signers
//! files (`gpg.ssh.allowedSignersFile`, `ssh-keygen -Y verify -f`).
//!
//! The signature (its armor, its blob, the signed data and the ed25519
//! verification) is RustCrypto's `ssh-key` crate: a controller trusts it with
//! the whole cluster, so it is the maintained implementation, not a hand
//! parser. Only `ssh-ed25519` keys are accepted (and weak, small-order keys
//! are refused); anything else is refused with a reason rather than waved
//! through. The allowed-signers file has no crate: its parser is here, and
//! `fuzz/fuzz_targets/allowed_signers.rs` fuzzes it with the armor.

use base64::Engine as _;
use sha2::{Digest, Sha256};
use ssh_key::Algorithm;
use ssh_key::encoding::Encode as _;

const BEGIN: &str = "-----BEGIN SSH SIGNATURE-----";

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// Not an armored SSH signature.
    #[error("the signature is not an SSH signature (no `{BEGIN}` armor){hint}")]
    NotSsh {
        /// A hint (e.g. OpenPGP found).
        hint: String,
    },
    /// The blob does not parse.
    #[error("malformed SSH signature: {0}")]
    Malformed(String),
    /// A key or signature algorithm other than ssh-ed25519.
    #[error("unsupported signature algorithm `{0}`: only ssh-ed25519 keys are supported")]
    Unsupported(String),
    /// The namespace is not the expected one.
    #[error("the signature is for namespace `{found}`, not `{expected}`")]
    Namespace {
        /// What it says.
        found: String,
        /// What was expected.
        expected: String,
    },
    /// Neither sha256 nor sha512.
    #[error("unsupported hash algorithm `{0}` (sha256 or sha512 expected)")]
    Hash(String),
    /// The signature does not match the data: the content was changed after signing.
    #[error(
        "the signature does not match the signed content: the commit was changed after it was signed, or the signature was forged"
    )]
    BadSignature,
    /// A good signature by a key that is not trusted.
    #[error("signed by key {fingerprint}, which is not in the trusted keys for namespace `git`")]
    Untrusted {
        /// `SHA256:…` of the key.
        fingerprint: String,
    },
    /// The key is trusted only outside the signature time.
    #[error("key {fingerprint} is trusted only {window}; the commit was signed at {time}")]
    OutsideValidity {
        /// `SHA256:…` of the key.
        fingerprint: String,
        /// e.g. `after 20260101`.
        window: String,
        /// Unix time of the commit.
        time: i64,
    },
    /// The allowed-signers file does not parse.
    #[error("trusted keys line {line}: {message}")]
    SignersFile {
        /// 1-based line.
        line: usize,
        /// Why.
        message: String,
    },
}

/// A parsed SSHSIG (by `ssh-key`), with its fields as cairn reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSig {
    /// The public key blob (`string "ssh-ed25519" string key`).
    pub public_key: Vec<u8>,
    /// Namespace (`git` for commits).
    pub namespace: String,
    /// `sha256` or `sha512`.
    pub hash_algorithm: String,
    /// The raw signature bytes (64 for ed25519).
    pub signature: Vec<u8>,
    inner: ssh_key::SshSig,
}

impl SshSig {
    /// Parses the armored form.
    pub fn parse_armored(text: &str) -> Result<SshSig, SigError> {
        let text = text.trim();
        if !text.starts_with(BEGIN) {
            let hint = if text.starts_with("-----BEGIN PGP SIGNATURE-----") {
                " (it is an OpenPGP signature; cairn verifies SSH signatures, `gpg.format=ssh`)"
            } else if text.starts_with("-----BEGIN SIGNED MESSAGE-----") {
                " (it is an X.509/S/MIME signature; cairn verifies SSH signatures, `gpg.format=ssh`)"
            } else {
                ""
            };
            return Err(SigError::NotSsh {
                hint: hint.to_owned(),
            });
        }
        let inner = ssh_key::SshSig::from_pem(text).map_err(|e| match e {
            // Built for ed25519 only, ssh-key does not know the other key
            // types: say which one it was.
            ssh_key::Error::AlgorithmUnknown | ssh_key::Error::AlgorithmUnsupported { .. } => {
                SigError::Unsupported(peek_key_type(text).unwrap_or_else(|| e.to_string()))
            }
            e => SigError::Malformed(e.to_string()),
        })?;
        SshSig::from_inner(inner)
    }

    /// Parses the binary blob (what the armor holds).
    pub fn parse_blob(blob: &[u8]) -> Result<SshSig, SigError> {
        use ssh_key::encoding::Decode as _;
        let mut reader = blob;
        let inner =
            ssh_key::SshSig::decode(&mut reader).map_err(|e| SigError::Malformed(e.to_string()))?;
        if !reader.is_empty() {
            return Err(SigError::Malformed("trailing bytes".to_owned()));
        }
        SshSig::from_inner(inner)
    }

    fn from_inner(inner: ssh_key::SshSig) -> Result<SshSig, SigError> {
        let public_key = inner
            .public_key()
            .encode_vec()
            .map_err(|e| SigError::Malformed(e.to_string()))?;
        Ok(SshSig {
            public_key,
            namespace: inner.namespace().to_owned(),
            hash_algorithm: inner.hash_alg().as_str().to_owned(),
            signature: inner.signature_bytes().to_vec(),
            inner,
        })
    }

    /// `SHA256:…` of the signing key, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_key)
    }

    /// Checks the signature over `message` in `namespace`, with the key the
    /// signature carries. Trust in that key is a separate question
    /// ([`AllowedSigners::check`]).
    pub fn verify(&self, message: &[u8], namespace: &str) -> Result<(), SigError> {
        if self.namespace != namespace {
            return Err(SigError::Namespace {
                found: self.namespace.clone(),
                expected: namespace.to_owned(),
            });
        }
        let key = self.inner.public_key();
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(SigError::Unsupported(key.algorithm().as_str().to_owned()));
        }
        if self.inner.algorithm() != Algorithm::Ed25519 {
            return Err(SigError::Unsupported(
                self.inner.algorithm().as_str().to_owned(),
            ));
        }
        // A small-order ("weak") key verifies signatures over many messages;
        // ssh-key's verification does not refuse it, so this does.
        if let Some(k) = key.ed25519()
            && ed25519_dalek::VerifyingKey::from_bytes(&k.0).is_ok_and(|v| v.is_weak())
        {
            return Err(SigError::Malformed(
                "the ed25519 key is a weak (small-order) point".to_owned(),
            ));
        }
        ssh_key::PublicKey::from(key.clone())
            .verify(namespace, message, &self.inner)
            .map_err(|_| SigError::BadSignature)
    }
}

/// The key type named inside an armored signature (`ecdsa-sha2-nistp256`),
/// for the message refusing it: `SSHSIG` u32 version, then the key blob,
/// whose first string is its type.
fn peek_key_type(armored: &str) -> Option<String> {
    let b64: String = armored
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let key_blob = blob.get(14..)?;
    let n = u32::from_be_bytes(key_blob.get(..4)?.try_into().ok()?) as usize;
    let name = key_blob.get(4..4usize.checked_add(n)?)?;
    let name = std::str::from_utf8(name).ok()?;
    name.chars()
        .all(|c| c.is_ascii_graphic())
        .then(|| name.to_owned())
}

/// `SHA256:` + unpadded base64 of the SHA-256 of a key blob.
pub fn fingerprint(key_blob: &[u8]) -> String {
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(key_blob))
    )
}

/// One line of an allowed-signers file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// Principals (e-mail addresses or patterns).
    pub principals: Vec<String>,
    /// Key blob.
    pub key: Vec<u8>,
    /// Key type as written.
    pub key_type: String,
    /// `namespaces="…"` (none: every namespace).
    pub namespaces: Option<Vec<String>>,
    /// `valid-after` as Unix time.
    pub valid_after: Option<i64>,
    /// `valid-before` as Unix time.
    pub valid_before: Option<i64>,
    /// `cert-authority`: the key signs certificates (not supported for verification).
    pub cert_authority: bool,
    /// 1-based line.
    pub line: usize,
}

/// git's allowed-signers file: `PRINCIPALS [OPTIONS] KEYTYPE BASE64 [COMMENT]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedSigners {
    /// Entries in file order.
    pub signers: Vec<Signer>,
}

/// The principals a verified signature belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted {
    /// Principals of the matching line.
    pub principals: Vec<String>,
    /// `SHA256:…` of the key.
    pub fingerprint: String,
    /// Line of the trusted-keys file.
    pub line: usize,
}

/// Splits on spaces outside double quotes.
fn tokens(line: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Splits options on commas outside quotes.
fn options(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn is_key_type(s: &str) -> bool {
    s.starts_with("ssh-") || s.starts_with("ecdsa-") || s.starts_with("sk-")
}

impl AllowedSigners {
    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<AllowedSigners, SigError> {
        let mut signers = vec![];
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| SigError::SignersFile { line, message };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let t = tokens(trimmed);
            let principals: Vec<String> = t[0]
                .trim_matches('"')
                .split(',')
                .map(str::to_owned)
                .collect();
            let (opts, rest) = match t.get(1) {
                Some(s) if !is_key_type(s) => (Some(s.as_str()), &t[2..]),
                _ => (None, &t[1..]),
            };
            let (Some(key_type), Some(b64)) = (rest.first(), rest.get(1)) else {
                return Err(err(
                    "expected `PRINCIPALS [OPTIONS] KEYTYPE BASE64-KEY [COMMENT]`".to_owned(),
                ));
            };
            let key = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| err(format!("the key is not base64: {e}")))?;
            let mut signer = Signer {
                principals,
                key,
                key_type: key_type.clone(),
                namespaces: None,
                valid_after: None,
                valid_before: None,
                cert_authority: false,
                line,
            };
            for o in opts.map(options).unwrap_or_default() {
                let (name, value) = o.split_once('=').unwrap_or((o.as_str(), ""));
                match name.to_ascii_lowercase().as_str() {
                    "namespaces" => {
                        signer.namespaces = Some(value.split(',').map(str::to_owned).collect());
                    }
                    "cert-authority" => signer.cert_authority = true,
                    "valid-after" => {
                        signer.valid_after = Some(
                            parse_time(value)
                                .ok_or_else(|| err(format!("bad valid-after `{value}`")))?,
                        );
                    }
                    "valid-before" => {
                        signer.valid_before = Some(
                            parse_time(value)
                                .ok_or_else(|| err(format!("bad valid-before `{value}`")))?,
                        );
                    }
                    other => return Err(err(format!("unknown option `{other}`"))),
                }
            }
            signers.push(signer);
        }
        Ok(AllowedSigners { signers })
    }

    /// Whether the key of `sig` is trusted for `namespace` at Unix time
    /// `time` (the commit's time, as git uses).
    pub fn check(&self, sig: &SshSig, namespace: &str, time: i64) -> Result<Trusted, SigError> {
        let fingerprint = sig.fingerprint();
        let mut outside = None;
        for s in &self.signers {
            if s.cert_authority || s.key != sig.public_key {
                continue;
            }
            if let Some(ns) = &s.namespaces
                && !ns.iter().any(|n| n == namespace)
            {
                continue;
            }
            let too_early = s.valid_after.is_some_and(|t| time < t);
            let too_late = s.valid_before.is_some_and(|t| time >= t);
            if too_early || too_late {
                let window = match (s.valid_after, s.valid_before) {
                    (Some(a), Some(b)) => format!("from {a} until {b} (Unix time)"),
                    (Some(a), None) => format!("from {a} (Unix time)"),
                    (None, Some(b)) => format!("until {b} (Unix time)"),
                    (None, None) => String::new(),
                };
                outside = Some(SigError::OutsideValidity {
                    fingerprint: fingerprint.clone(),
                    window,
                    time,
                });
                continue;
            }
            return Ok(Trusted {
                principals: s.principals.clone(),
                fingerprint,
                line: s.line,
            });
        }
        Err(outside.unwrap_or(SigError::Untrusted { fingerprint }))
    }
}

/// `YYYYMMDD[HHMM[SS]][Z]` as Unix time (UTC; OpenSSH reads it as local
/// time without `Z`, cairn as UTC always, so CI machines agree).
fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim_matches('"');
    let s = s.strip_suffix('Z').unwrap_or(s);
    if !s.bytes().all(|b| b.is_ascii_digit()) || ![8, 12, 14].contains(&s.len()) {
        return None;
    }
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().ok();
    let (y, m, d) = (n(0, 4)?, n(4, 6)?, n(6, 8)?);
    let (hh, mm) = if s.len() >= 12 {
        (n(8, 10)?, n(10, 12)?)
    } else {
        (0, 0)
    };
    let ss = if s.len() == 14 { n(12, 14)? } else { 0 };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_utc() {
        assert_eq!(parse_time("19700101"), Some(0));
        assert_eq!(parse_time("20260101Z"), Some(1_767_225_600));
        assert_eq!(parse_time("202601011230"), Some(1_767_225_600 + 45_000));
        assert_eq!(parse_time("2026"), None);
    }

    #[test]
    fn signers_lines_parse_with_quoted_options() {
        let text = "# trusted\nalice@example.com,bob@example.com namespaces=\"git,file\",valid-after=\"20200101\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6qQ6Pl7FHZ9w0yG9Yxq0pl3JQh0k2c8bJf3X2Yh0Bd alice\ncarol@example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6qQ6Pl7FHZ9w0yG9Yxq0pl3JQh0k2c8bJf3X2Yh0Bd\n";
        let s = AllowedSigners::parse(text).expect("parses");
        assert_eq!(s.signers.len(), 2);
        assert_eq!(s.signers[0].principals.len(), 2);
        assert_eq!(
            s.signers[0].namespaces.as_deref(),
            Some(&["git".to_owned(), "file".to_owned()][..])
        );
        assert!(s.signers[0].valid_after.is_some());
        assert_eq!(s.signers[1].line, 3);
        let bad = AllowedSigners::parse("alice ssh-ed25519\n").expect_err("refused");
        assert!(bad.to_string().contains("line 1"));
    }

    #[test]
    fn pgp_signatures_are_named() {
        let e =
            SshSig::parse_armored("-----BEGIN PGP SIGNATURE-----\nxx\n-----END PGP SIGNATURE-----")
                .expect_err("not ssh");
        assert!(e.to_string().contains("OpenPGP"));
    }
}
