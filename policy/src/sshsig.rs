//! SSHSIG signatures (OpenSSH's `PROTOCOL.sshsig`, what `ssh-keygen -Y sign`
//! and `git commit -S` with `gpg.format=ssh` make) and git's allowed-signers
//! files (`gpg.ssh.allowedSignersFile`, `ssh-keygen -Y verify -f`).
//!
//! Only `ssh-ed25519` keys are supported; anything else is refused with a
//! reason rather than waved through. Why not the `ssh-key` crate: the format
//! is 60 lines to parse, and ed25519-dalek + sha2 are already dependencies of
//! the workspace (plan signing), so this adds no new crate.

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256, Sha512};

const MAGIC: &[u8] = b"SSHSIG";
const BEGIN: &str = "-----BEGIN SSH SIGNATURE-----";
const END: &str = "-----END SSH SIGNATURE-----";

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

/// A parsed SSHSIG blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSig {
    /// The public key blob (`string "ssh-ed25519" string key`).
    pub public_key: Vec<u8>,
    /// Namespace (`git` for commits).
    pub namespace: String,
    /// `sha256` or `sha512`.
    pub hash_algorithm: String,
    /// The signature blob (`string "ssh-ed25519" string sig`).
    pub signature: Vec<u8>,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SigError> {
        if self.0.len() < n {
            return Err(SigError::Malformed("truncated".to_owned()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, SigError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<&'a [u8], SigError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn utf8(&mut self) -> Result<String, SigError> {
        String::from_utf8(self.string()?.to_vec())
            .map_err(|_| SigError::Malformed("a text field is not UTF-8".to_owned()))
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

impl SshSig {
    /// Parses the armored form.
    pub fn parse_armored(text: &str) -> Result<SshSig, SigError> {
        let text = text.trim();
        let Some(body) = text.strip_prefix(BEGIN) else {
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
        };
        let Some(body) = body.trim_end().strip_suffix(END) else {
            return Err(SigError::Malformed(format!("no `{END}` line")));
        };
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| SigError::Malformed(format!("bad base64: {e}")))?;
        SshSig::parse_blob(&blob)
    }

    /// Parses the binary blob.
    pub fn parse_blob(blob: &[u8]) -> Result<SshSig, SigError> {
        let mut r = Reader(blob);
        if r.take(6)? != MAGIC {
            return Err(SigError::Malformed("no SSHSIG preamble".to_owned()));
        }
        let version = r.u32()?;
        if version != 1 {
            return Err(SigError::Malformed(format!("unknown version {version}")));
        }
        let public_key = r.string()?.to_vec();
        let namespace = r.utf8()?;
        let _reserved = r.string()?;
        let hash_algorithm = r.utf8()?;
        let signature = r.string()?.to_vec();
        if !r.0.is_empty() {
            return Err(SigError::Malformed("trailing bytes".to_owned()));
        }
        Ok(SshSig {
            public_key,
            namespace,
            hash_algorithm,
            signature,
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
        let key = ed25519_key(&self.public_key)?;
        let mut r = Reader(&self.signature);
        let alg = String::from_utf8_lossy(r.string()?).into_owned();
        if alg != "ssh-ed25519" {
            return Err(SigError::Unsupported(alg));
        }
        let sig: [u8; 64] = r
            .string()?
            .try_into()
            .map_err(|_| SigError::Malformed("an ed25519 signature is 64 bytes".to_owned()))?;
        let digest: Vec<u8> = match self.hash_algorithm.as_str() {
            "sha512" => Sha512::digest(message).to_vec(),
            "sha256" => Sha256::digest(message).to_vec(),
            other => return Err(SigError::Hash(other.to_owned())),
        };
        let mut signed = MAGIC.to_vec();
        put_string(&mut signed, self.namespace.as_bytes());
        put_string(&mut signed, b"");
        put_string(&mut signed, self.hash_algorithm.as_bytes());
        put_string(&mut signed, &digest);
        key.verify_strict(&signed, &Signature::from_bytes(&sig))
            .map_err(|_| SigError::BadSignature)
    }
}

fn ed25519_key(blob: &[u8]) -> Result<VerifyingKey, SigError> {
    let mut r = Reader(blob);
    let alg = String::from_utf8_lossy(r.string()?).into_owned();
    if alg != "ssh-ed25519" {
        return Err(SigError::Unsupported(alg));
    }
    let bytes: [u8; 32] = r
        .string()?
        .try_into()
        .map_err(|_| SigError::Malformed("an ed25519 key is 32 bytes".to_owned()))?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| SigError::Malformed("not a valid ed25519 point".to_owned()))
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
