//! Fencing tokens (issue 24; `proto::fence`): the highest token each controller key
//! has sent this node, kept in `DATA_DIR/fence-tokens.json`.
//!
//! A request whose signature verified with a trusted controller key and that carries
//! `x-cairn-fence-token` is refused (`FAILED_PRECONDITION`, naming both tokens) when
//! its token is lower than the highest this node has seen from that key: it comes
//! from a deposed leader. A higher token is written to disk (temporary file, fsync,
//! rename) before the request is carried out, so a restarted node still refuses the
//! old leader. Requests without the header (one controller with a redb store, the
//! CLI) are not affected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// File name inside the data directory.
pub const FILE: &str = "fence-tokens.json";

/// The highest token per controller key.
#[derive(Debug)]
pub struct FenceTokens {
    path: PathBuf,
    by_key: Mutex<BTreeMap<String, u64>>,
}

impl FenceTokens {
    /// Loads `DATA_DIR/fence-tokens.json` (absent: none seen yet). An unreadable file
    /// is reported; the node then refuses nothing until a leader sends a token again.
    pub fn load(data_dir: &Path) -> FenceTokens {
        let path = data_dir.join(FILE);
        let by_key = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                eprintln!(
                    "cairn-node: {} is unreadable ({e}); fencing tokens start afresh",
                    path.display()
                );
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        FenceTokens {
            path,
            by_key: Mutex::new(by_key),
        }
    }

    /// Admits a verified controller request carrying `header` (the value of
    /// `x-cairn-fence-token`): refused when lower than the highest token seen from
    /// `controller_key_hex`; a higher one is recorded durably first.
    pub fn admit(&self, controller_key_hex: &str, header: &str) -> Result<(), tonic::Status> {
        let token: u64 = header.trim().parse().map_err(|_| {
            tonic::Status::invalid_argument(format!(
                "{} `{header}` is not a decimal token",
                proto::fence::HEADER
            ))
        })?;
        let mut by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let highest = by_key.get(controller_key_hex).copied().unwrap_or(0);
        if token < highest {
            return Err(tonic::Status::failed_precondition(format!(
                "fenced: this request carries fencing token {token}, but this node has seen token {highest} from a newer leader of the same controller key; the sender is no longer the leader"
            )));
        }
        if token > highest {
            let mut next = by_key.clone();
            next.insert(controller_key_hex.to_owned(), token);
            crate::anchors::write_atomically(&self.path, &next).map_err(|e| {
                tonic::Status::unavailable(format!(
                    "cannot record fencing token {token} in {}: {e}",
                    self.path.display()
                ))
            })?;
            *by_key = next;
        }
        Ok(())
    }

    /// The highest token seen from a controller key (0: none).
    pub fn highest(&self, controller_key_hex: &str) -> u64 {
        self.by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(controller_key_hex)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_token_is_refused_and_the_highest_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = FenceTokens::load(dir.path());
        tokens.admit("aa", "5").unwrap();
        tokens.admit("aa", "5").unwrap();
        let refused = tokens.admit("aa", "3").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("token 3"),
            "{}",
            refused.message()
        );
        // Another controller key has its own tokens.
        tokens.admit("bb", "1").unwrap();
        tokens.admit("aa", "9").unwrap();
        assert!(tokens.admit("aa", "x").is_err());
        let restarted = FenceTokens::load(dir.path());
        assert_eq!(restarted.highest("aa"), 9);
        assert!(restarted.admit("aa", "5").is_err());
        restarted.admit("bb", "1").unwrap();
    }
}
