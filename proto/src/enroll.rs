//! Node enrollment by a one-time token (protocol 1.7, `enroll.proto`).
//!
//! The token is the authority of the one call that carries it: `cairn node token
//! create NODE` draws 32 random bytes and prints them as [`TOKEN_PREFIX`] + 64 hex
//! characters; the controller's state store keeps only their SHA-256
//! ([`token_hash`]), the node name and the expiry, so a copy of the state (a backup)
//! holds no usable token. The node sends the token with its name and public key,
//! signed with that key ([`proof_payload`]: it holds the key it asks the controller
//! to record); the controller consumes the token once and answers with the
//! controller keys to trust, authenticated by an HMAC keyed with the token
//! ([`keys_mac`]): a node never trusts keys from anyone who does not hold its token.
//!
//! What it does not give: the call is plain HTTP/2 like every other cairn call, so
//! someone who can read the management network can read a token in flight and race
//! the node to it. The node then finds its token used (the refusal names the key
//! that used it) and the operator sees an enrolled key that is not the node's
//! (`cairn node list`); tokens are short-lived (15 minutes by default) for that
//! reason.

use ed25519_dalek::{Signature, Verifier as _};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::auth::{Identity, from_hex, parse_public_key, to_hex};
use crate::v1;

/// What every token starts with (so a token pasted into the wrong place is recognised).
pub const TOKEN_PREFIX: &str = "cairn-enroll-";
/// The format tag at the start of the node's signed proof.
pub const PROOF_CONTEXT: &str = "cairn-enroll-v1";
/// Accepted clock difference between the node and the controller.
pub const WINDOW_MS: u64 = 30_000;

/// A fresh token: [`TOKEN_PREFIX`] and 32 random bytes in hex.
pub fn new_token() -> Result<String, crate::auth::AuthError> {
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        to_hex(&crate::auth::session_id()?) + &to_hex(&crate::auth::session_id()?)
    ))
}

/// Checks a token's form: the prefix and 64 hex characters.
pub fn check_token(token: &str) -> Result<(), String> {
    let Some(secret) = token.strip_prefix(TOKEN_PREFIX) else {
        return Err(format!(
            "an enrollment token starts with `{TOKEN_PREFIX}` (as `cairn node token create` prints it)"
        ));
    };
    from_hex::<32>(secret)
        .map(|_| ())
        .map_err(|problem| format!("the token's secret after `{TOKEN_PREFIX}`: {problem}"))
}

/// What the store keeps of a token: SHA-256 of its text, lower-case hex.
pub fn token_hash(token: &str) -> String {
    to_hex(&Sha256::digest(token.trim().as_bytes()))
}

/// The bytes the node signs: format tag, node, key, token hash, timestamp, one a line.
pub fn proof_payload(node: &str, key_hex: &str, token_hash: &str, timestamp_ms: u64) -> Vec<u8> {
    format!("{PROOF_CONTEXT}\n{node}\n{key_hex}\n{token_hash}\n{timestamp_ms}").into_bytes()
}

/// The request of node `node` with `identity` presenting `token`.
pub fn request(identity: &Identity, node: &str, token: &str, now_ms: u64) -> v1::EnrollRequest {
    let key_hex = identity.public_key_hex();
    let signature = identity.sign_bytes(&proof_payload(node, &key_hex, &token_hash(token), now_ms));
    v1::EnrollRequest {
        token: token.trim().to_owned(),
        node: node.to_owned(),
        public_key_hex: key_hex,
        timestamp_unix_ms: now_ms,
        signature_hex: to_hex(&signature.to_bytes()),
    }
}

/// The controller's check of a request's form and proof (the token itself is judged
/// against the store afterwards). `Err` says what is wrong.
pub fn verify_request(request: &v1::EnrollRequest, now_ms: u64) -> Result<(), String> {
    check_token(&request.token)?;
    if request.node.is_empty() {
        return Err("the request names no node".into());
    }
    let key = parse_public_key(&request.public_key_hex)
        .map_err(|e| format!("the node's public key: {e}"))?;
    let skew = now_ms.abs_diff(request.timestamp_unix_ms);
    if skew > WINDOW_MS {
        return Err(format!(
            "the request was signed {skew} ms away from the controller's clock, more than the {WINDOW_MS} ms allowed (check clocks)"
        ));
    }
    let signature = from_hex::<64>(&request.signature_hex)
        .map_err(|problem| format!("the request's signature: {problem}"))?;
    let payload = proof_payload(
        &request.node,
        &request.public_key_hex.to_ascii_lowercase(),
        &token_hash(&request.token),
        request.timestamp_unix_ms,
    );
    key.verify(&payload, &Signature::from_bytes(&signature))
        .map_err(|_| {
            format!(
                "the request's signature does not verify with the key it names ({}…): the node must sign with its own identity",
                &request.public_key_hex[..16]
            )
        })
}

/// The format tag of a node key rotation's signed payload.
pub const ROTATION_CONTEXT: &str = "cairn-node-key-rotate-v1";

/// The bytes both keys sign in a node key rotation: format tag, node, old key, new
/// key, timestamp, one a line.
pub fn rotation_payload(node: &str, old_hex: &str, new_hex: &str, timestamp_ms: u64) -> Vec<u8> {
    format!("{ROTATION_CONTEXT}\n{node}\n{old_hex}\n{new_hex}\n{timestamp_ms}").into_bytes()
}

/// Node `node`'s request to replace its pinned key `old` with `new`.
pub fn rotation_request(
    old: &Identity,
    new: &Identity,
    node: &str,
    now_ms: u64,
) -> v1::RotateNodeKeyRequest {
    let (old_hex, new_hex) = (old.public_key_hex(), new.public_key_hex());
    let payload = rotation_payload(node, &old_hex, &new_hex, now_ms);
    v1::RotateNodeKeyRequest {
        node: node.to_owned(),
        old_signature_hex: to_hex(&old.sign_bytes(&payload).to_bytes()),
        new_signature_hex: to_hex(&new.sign_bytes(&payload).to_bytes()),
        old_public_key_hex: old_hex,
        new_public_key_hex: new_hex,
        timestamp_unix_ms: now_ms,
    }
}

/// The controller's check of a rotation request's form and both signatures (the old
/// key is then compared with the pinned one). `Err` says what is wrong.
pub fn verify_rotation(request: &v1::RotateNodeKeyRequest, now_ms: u64) -> Result<(), String> {
    if request.node.is_empty() {
        return Err("the request names no node".into());
    }
    let skew = now_ms.abs_diff(request.timestamp_unix_ms);
    if skew > WINDOW_MS {
        return Err(format!(
            "the request was signed {skew} ms away from the controller's clock, more than the {WINDOW_MS} ms allowed (check clocks)"
        ));
    }
    let (old_hex, new_hex) = (
        request.old_public_key_hex.to_ascii_lowercase(),
        request.new_public_key_hex.to_ascii_lowercase(),
    );
    let payload = rotation_payload(&request.node, &old_hex, &new_hex, request.timestamp_unix_ms);
    for (what, key_hex, signature_hex) in [
        ("old", &old_hex, &request.old_signature_hex),
        ("new", &new_hex, &request.new_signature_hex),
    ] {
        let key = parse_public_key(key_hex).map_err(|e| format!("the {what} key: {e}"))?;
        let signature = from_hex::<64>(signature_hex)
            .map_err(|problem| format!("the {what} key's signature: {problem}"))?;
        key.verify(&payload, &Signature::from_bytes(&signature))
            .map_err(|_| {
                format!(
                    "the {what} key's signature ({}…) does not verify over the rotation",
                    &key_hex[..16]
                )
            })?;
    }
    Ok(())
}

/// The keys of a reply as the MAC covers them: `HEX NAME` lines, in the reply's order.
pub fn keys_payload(keys: &[v1::ControllerKey]) -> Vec<u8> {
    keys.iter()
        .map(|k| format!("{} {}\n", k.public_key_hex, k.name))
        .collect::<String>()
        .into_bytes()
}

/// HMAC-SHA256 keyed with the token of the reply's keys, hex.
pub fn keys_mac(token: &str, keys: &[v1::ControllerKey]) -> String {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(token.trim().as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(&keys_payload(keys));
    to_hex(&mac.finalize().into_bytes())
}

/// The node's check of the reply: the MAC is the token's, and every key parses. `Ok`
/// is the key file text to write (`HEX NAME` lines, [`crate::auth::TrustedKeys`]).
pub fn accept_reply(token: &str, reply: &v1::EnrollReply) -> Result<String, String> {
    let expected = keys_mac(token, &reply.controller_keys);
    let given = from_hex::<32>(&reply.mac_hex).map_err(|p| format!("the reply's MAC: {p}"))?;
    let expected_bytes = from_hex::<32>(&expected).expect("our own hex");
    // Constant time is not needed for a MAC the node only checks once, but cheap.
    if given
        .iter()
        .zip(expected_bytes.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        != 0
    {
        return Err("the reply's MAC is not the token's: the answer does not come from the controller that made the token (or was altered); nothing is trusted".into());
    }
    if reply.controller_keys.is_empty() {
        return Err("the controller sent no keys to trust".into());
    }
    let mut text = String::from("# written by cairn-node --enroll\n");
    for key in &reply.controller_keys {
        parse_public_key(&key.public_key_hex)
            .map_err(|e| format!("controller key `{}`: {e}", key.name))?;
        if key.name.contains(['\n', '#']) {
            return Err(format!(
                "controller key name `{}` is not one line",
                key.name
            ));
        }
        text.push_str(&format!("{} {}\n", key.public_key_hex, key.name));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_key_rotation_needs_both_keys_signatures() {
        let (old, new) = (Identity::from_seed([5; 32]), Identity::from_seed([6; 32]));
        let now = 2_000_000;
        let request = rotation_request(&old, &new, "lab-1", now);
        verify_rotation(&request, now + 1000).unwrap();
        assert!(
            verify_rotation(&request, now + WINDOW_MS + 1)
                .unwrap_err()
                .contains("check clocks")
        );
        // Another node's name, or a new key the node does not hold: refused.
        let renamed = v1::RotateNodeKeyRequest {
            node: "lab-2".into(),
            ..request.clone()
        };
        assert!(
            verify_rotation(&renamed, now)
                .unwrap_err()
                .contains("old key")
        );
        let stranger = Identity::from_seed([7; 32]);
        let swapped = v1::RotateNodeKeyRequest {
            new_public_key_hex: stranger.public_key_hex(),
            ..request.clone()
        };
        assert!(verify_rotation(&swapped, now).is_err());
        let unproven = v1::RotateNodeKeyRequest {
            new_signature_hex: request.old_signature_hex.clone(),
            ..request
        };
        assert!(
            verify_rotation(&unproven, now)
                .unwrap_err()
                .contains("new key")
        );
    }

    #[test]
    fn a_request_verifies_and_a_reply_is_accepted_only_with_the_tokens_mac() {
        let node = Identity::from_seed([3; 32]);
        let token = new_token().unwrap();
        check_token(&token).unwrap();
        assert!(check_token("abc").unwrap_err().contains(TOKEN_PREFIX));
        let now = 1_000_000;
        let request = request(&node, "lab-4", &token, now);
        verify_request(&request, now + 1000).unwrap();
        assert!(
            verify_request(&request, now + WINDOW_MS + 1)
                .unwrap_err()
                .contains("check clocks")
        );
        let renamed = v1::EnrollRequest {
            node: "lab-5".into(),
            ..request.clone()
        };
        assert!(
            verify_request(&renamed, now)
                .unwrap_err()
                .contains("does not verify")
        );
        let other_key = v1::EnrollRequest {
            public_key_hex: Identity::from_seed([4; 32]).public_key_hex(),
            ..request
        };
        assert!(verify_request(&other_key, now).is_err());

        let keys = vec![v1::ControllerKey {
            public_key_hex: Identity::from_seed([9; 32]).public_key_hex(),
            name: "controller".into(),
        }];
        let reply = v1::EnrollReply {
            mac_hex: keys_mac(&token, &keys),
            controller_keys: keys.clone(),
        };
        let text = accept_reply(&token, &reply).unwrap();
        assert!(text.contains(&keys[0].public_key_hex), "{text}");
        let forged = v1::EnrollReply {
            mac_hex: keys_mac(&new_token().unwrap(), &keys),
            controller_keys: keys,
        };
        assert!(
            accept_reply(&token, &forged)
                .unwrap_err()
                .contains("not the token's")
        );
    }
}
