//! Audit anchors: the head of the controller's audit log, sent to nodes with every
//! request so that the log's tail cannot be cut without a node noticing.
//!
//! The audit log (`reconciler::audit`) is hash-chained and signed with the
//! controller key, which lives on the same disk as the log: whoever can delete
//! the newest entries can also re-sign, so the chain alone cannot show that its
//! tail was cut. Every signed request therefore carries the log's head as
//! [`HEADER`] (`x-cairn-audit-head: SEQ:HASH_HEX`); each node keeps, per
//! controller key, the highest sequence number it has seen and that entry's hash,
//! and reports them in `GetInventoryResponse.audit_anchors`. `cairn audit verify`
//! compares: a node that saw seq N with hash H while the log ends before N (or
//! has another hash at N) proves the log was cut or rewritten.
//!
//! The header is not part of the signed payload (`cairn-req-v2` binds method,
//! target, time, nonce and body): putting it there would make every node older
//! than this one refuse every request. A node records it only from a request
//! whose signature verified with a trusted controller key, and only ever raises
//! its anchor, so the most a forger on the wire can do is raise an anchor and
//! make `audit verify` fail — it can never hide a cut.

use std::sync::{Arc, Mutex};

/// Metadata key of the audit log's head (`SEQ:HASH_HEX`; not signed, see above).
pub const HEADER: &str = "x-cairn-audit-head";

/// The head of an audit log: the newest entry's sequence number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Sequence number of the newest entry.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

impl Head {
    /// `SEQ:HASH_HEX`, the header value.
    pub fn header_value(&self) -> String {
        format!("{}:{}", self.seq, crate::auth::to_hex(&self.hash))
    }

    /// Parses a header value.
    pub fn parse(text: &str) -> Result<Head, String> {
        let (seq, hash) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}` is not SEQ:HASH_HEX"))?;
        let seq = seq
            .parse()
            .map_err(|_| format!("`{seq}` is not a sequence number"))?;
        let hash = crate::auth::from_hex::<32>(hash)?;
        Ok(Head { seq, hash })
    }
}

/// The current head, shared by the store that appends to the log and the signer
/// that sends it (cheap to clone; clones share the value).
#[derive(Debug, Clone, Default)]
pub struct SharedHead(Arc<Mutex<Option<Head>>>);

impl SharedHead {
    /// Sets the head (only forward: an older head never replaces a newer one).
    pub fn advance(&self, head: Head) {
        let mut current = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_none_or(|c| c.seq <= head.seq) {
            *current = Some(head);
        }
    }

    /// The head, if known.
    pub fn get(&self) -> Option<Head> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_round_trips_and_only_advances() {
        let head = Head {
            seq: 42,
            hash: [7; 32],
        };
        assert_eq!(Head::parse(&head.header_value()).unwrap(), head);
        assert!(Head::parse("42").is_err());
        assert!(Head::parse("x:00").is_err());
        let shared = SharedHead::default();
        shared.advance(head);
        shared.advance(Head {
            seq: 3,
            hash: [1; 32],
        });
        assert_eq!(shared.get(), Some(head));
    }
}
