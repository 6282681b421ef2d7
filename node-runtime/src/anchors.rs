//! Audit anchors: the newest head of each controller's audit log this node has
//! seen (`x-cairn-audit-head` on its signed requests, see `proto::anchor`), kept in
//! `DATA_DIR/audit-anchors.json` and reported in `GetInventoryResponse`.
//!
//! Only a request whose signature verified with a trusted controller key moves an
//! anchor, and only forward (a higher sequence number), so an anchor is the
//! highest head that controller ever showed: `cairn audit verify` fails when the
//! log ends before it or has another hash there (the log's tail was cut).
//! The file is small (one line per controller key) and written only when an
//! anchor moves (once per audit entry, not per request), atomically (temporary
//! file, fsync, rename). An unreadable file is reported at start and replaced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proto::v1::AuditAnchor;

/// File name inside the data directory.
pub const FILE: &str = "audit-anchors.json";

/// The anchors, per controller key.
#[derive(Debug)]
pub struct Anchors {
    path: PathBuf,
    by_key: Mutex<BTreeMap<String, (u64, String, u64)>>,
}

impl Anchors {
    /// Loads `DATA_DIR/audit-anchors.json` (absent: none seen yet).
    pub fn load(data_dir: &Path) -> Anchors {
        let path = data_dir.join(FILE);
        let by_key = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                eprintln!(
                    "cairn-node: {} is unreadable ({e}); audit anchors start afresh",
                    path.display()
                );
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Anchors {
            path,
            by_key: Mutex::new(by_key),
        }
    }

    /// Notes the head a verified controller request carried (`header`: the value of
    /// `x-cairn-audit-head`); a malformed one is ignored with a log line.
    pub fn note(&self, controller_key_hex: &str, header: &str) {
        let head = match proto::anchor::Head::parse(header) {
            Ok(h) => h,
            Err(e) => {
                eprintln!(
                    "cairn-node: ignoring a malformed {}: {e}",
                    proto::anchor::HEADER
                );
                return;
            }
        };
        let mut by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if by_key
            .get(controller_key_hex)
            .is_some_and(|(seq, _, _)| *seq >= head.seq)
        {
            return;
        }
        by_key.insert(
            controller_key_hex.to_owned(),
            (
                head.seq,
                proto::auth::to_hex(&head.hash),
                crate::events::now_unix_ms(),
            ),
        );
        if let Err(e) = write_atomically(&self.path, &*by_key) {
            eprintln!(
                "cairn-node: cannot record the audit anchor in {}: {e}",
                self.path.display()
            );
        }
    }

    /// Every anchor, by controller key.
    pub fn list(&self) -> Vec<AuditAnchor> {
        self.by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(key, (seq, hash, at))| AuditAnchor {
                controller_key_hex: key.clone(),
                seq: *seq,
                hash_hex: hash.clone(),
                seen_at_unix_ms: *at,
            })
            .collect()
    }
}

/// Writes `value` as JSON to `path` atomically (temporary file, fsync, rename); also
/// the fencing tokens' file (`crate::fencing`).
pub(crate) fn write_atomically<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&serde_json::to_vec(value).expect("JSON values serialize"))?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anchor_only_moves_forward_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let anchors = Anchors::load(dir.path());
        let head = |seq, byte| {
            proto::anchor::Head {
                seq,
                hash: [byte; 32],
            }
            .header_value()
        };
        anchors.note("aa", &head(5, 1));
        anchors.note("aa", &head(3, 2));
        anchors.note("aa", "garbage");
        anchors.note("bb", &head(1, 3));
        let again = Anchors::load(dir.path());
        let list = again.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].controller_key_hex, "aa");
        assert_eq!(list[0].seq, 5);
        assert_eq!(list[0].hash_hex, proto::auth::to_hex(&[1; 32]));
        assert_eq!(list[1].seq, 1);
    }
}
