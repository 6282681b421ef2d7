//! SSH ed25519 public keys as a tenant `member` writes them
//! (`key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA… alice@laptop"`, the line of an
//! `id_ed25519.pub` file).
//!
//! The compiler checks the text (type, base64, the blob's own type, 32 key
//! bytes) and carries the key in the model as `ssh-ed25519 BASE64` without its
//! comment: the comment is a label, the blob is the identity. Whoever trusts the
//! key (the controller's per-object authorization) compares blobs.

use base64::Engine as _;

/// The only key type members may have.
pub const ED25519: &str = "ssh-ed25519";

/// A parsed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The wire blob (`string "ssh-ed25519" string KEY32`).
    pub blob: Vec<u8>,
    /// The 32 bytes of the ed25519 point.
    pub key: [u8; 32],
    /// The comment after the key, if any.
    pub comment: Option<String>,
}

impl PublicKey {
    /// `ssh-ed25519 BASE64`: how the model carries the key.
    pub fn canonical(&self) -> String {
        format!(
            "{ED25519} {}",
            base64::engine::general_purpose::STANDARD.encode(&self.blob)
        )
    }
}

/// The wire blob of a 32-byte ed25519 key.
pub fn ed25519_blob(key: &[u8; 32]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(51);
    blob.extend_from_slice(&(ED25519.len() as u32).to_be_bytes());
    blob.extend_from_slice(ED25519.as_bytes());
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(key);
    blob
}

/// Parses `ssh-ed25519 BASE64 [COMMENT]`; `Err` says what is wrong (the
/// caller adds what would be right).
pub fn parse(text: &str) -> Result<PublicKey, String> {
    let mut parts = text.split_whitespace();
    let Some(kind) = parts.next() else {
        return Err("the key is empty".to_owned());
    };
    if kind != ED25519 {
        let what = if kind.starts_with("AAAA") {
            "the key type is missing (the text starts with the base64 blob)".to_owned()
        } else if kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-")
        {
            format!("`{kind}` keys are not supported, only `{ED25519}`")
        } else {
            format!("`{kind}` is not an SSH key type")
        };
        return Err(what);
    }
    let Some(b64) = parts.next() else {
        return Err(format!("`{ED25519}` is not followed by the base64 key"));
    };
    let comment = {
        let rest: Vec<&str> = parts.collect();
        (!rest.is_empty()).then(|| rest.join(" "))
    };
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("the key is not valid base64 ({e})"))?;
    let key = key_of_blob(&blob)?;
    Ok(PublicKey { blob, key, comment })
}

/// The 32 key bytes of an `ssh-ed25519` blob.
pub fn key_of_blob(blob: &[u8]) -> Result<[u8; 32], String> {
    let (kind, rest) = ssh_string(blob).ok_or("the key blob is truncated")?;
    if kind != ED25519.as_bytes() {
        return Err(format!(
            "the key blob is of type `{}`, not `{ED25519}`",
            String::from_utf8_lossy(kind)
        ));
    }
    let (key, rest) = ssh_string(rest).ok_or("the key blob is truncated")?;
    if !rest.is_empty() {
        return Err("the key blob has trailing bytes".to_owned());
    }
    key.try_into()
        .map_err(|_| format!("an ed25519 key is 32 bytes, this one is {}", key.len()))
}

fn ssh_string(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let s = b.get(4..4usize.checked_add(n)?)?;
    Some((s, &b[4 + n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6qQ6Pl7FHZ9w0yG9Yxq0pl3JQh0k2c8bJf3X2Yh0Bd alice@laptop";

    #[test]
    fn a_public_key_line_parses_and_loses_its_comment() {
        let k = parse(KEY).expect("parses");
        assert_eq!(k.comment.as_deref(), Some("alice@laptop"));
        assert_eq!(
            k.canonical(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6qQ6Pl7FHZ9w0yG9Yxq0pl3JQh0k2c8bJf3X2Yh0Bd"
        );
        assert_eq!(ed25519_blob(&k.key), k.blob);
    }

    #[test]
    fn bad_keys_say_what_is_wrong() {
        let cases = [
            ("", "empty"),
            ("ssh-rsa AAAAB3NzaC1yc2E", "not supported"),
            ("AAAAC3NzaC1lZDI1NTE5AAAAIB6q", "type is missing"),
            ("hello", "not an SSH key type"),
            ("ssh-ed25519", "not followed"),
            ("ssh-ed25519 !!!", "not valid base64"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6qQ6Pl", "truncated"),
            ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQAB", "type `ssh-rsa`"),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
