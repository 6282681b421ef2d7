//! Replica sessions: a replicated write without a durable nonce on the replica.
//!
//! Every signed request that changes something has its nonce committed to `node.redb`
//! (an fsync) before it is carried out, so that a request captured on the wire cannot be
//! replayed after a restart emptied the in-memory replay cache. For `ReplicaWrite` that
//! sync was one more flush round in every replicated write's critical path, on a disk
//! the data shares. A session replaces it:
//!
//! - each `cairn-node` process draws a *boot id* at start: 16 bytes from the operating
//!   system's random source, never stored;
//! - a replica answers every `ReplicaWrite` with its boot id, and the writer puts it in
//!   the signed body of its next writes to that replica (`replica_boot`);
//! - a replica keeps the nonce of a write naming its own boot id in memory only, and
//!   refuses (`FAILED_PRECONDITION`, before anything is done) a write naming any other
//!   boot id, giving its own in `x-cairn-replica-boot`; the writer then re-sends once
//!   with it. A write without a boot id (the first one, a 1.4 writer) has its nonce
//!   recorded durably, as before.
//!
//! `ClientWrite` (remote data: a client node writing through the volume's writer,
//! protocol 1.6) uses the same session, the writer's: the writer answers with its boot
//! id (`ClientWriteResponse.writer_boot`), the client names it in its next writes
//! (`ClientWriteRequest.writer_boot`, signed), and a write naming another run's is
//! refused before anything is written, with the current one in the same metadata. A
//! node keeps one boot id per peer for both (`replica_session`): one process answers
//! both calls. The argument below holds word for word with "writer" for "replica".
//!
//! Why a replay is still refused (the property the durable nonce gave):
//! - within one process: the signature covers the body (boot id included), the target
//!   node's name and key, the timestamp and the nonce; a timestamp is accepted within
//!   ±30 s and an accepted nonce is remembered in memory for 60 s, so a second copy is
//!   refused as replayed, exactly as before;
//! - across a restart: a captured session write names the boot id of the process that
//!   accepted it; the new process has drawn another (two draws collide with probability
//!   2^-128), so the copy is refused before its nonce is even looked at. Changing the
//!   boot id breaks the signature. A captured write without a boot id had its nonce
//!   recorded durably, and is refused from the log;
//! - the boot id is not a secret: it only has to differ between runs. A forged boot id
//!   in an answer (the answers are not signed) makes the writer's next write refused
//!   and re-sent once, then fail like an unreachable copy: a denial of service that a
//!   network attacker has anyway, never an accepted replay.
//!
//! What the durable nonce also gave, and what gives it now: a replayed write applied
//! *late* would overwrite newer data. Within a process the replica's sequence numbers
//! already make a retry or a stale write a no-op (`lock.rs`, `Arrival`), and a replay is
//! refused by the nonce before it gets there.

use tonic::Status;

use super::Volumes;

/// Metadata key of a replica's boot id (hex) in its refusal of another session's write.
pub const BOOT_HEADER: &str = "x-cairn-replica-boot";

/// This process's boot id: random; if the random source fails (it does not on Linux
/// after boot), the time and process id, which still differ between runs.
pub(super) fn boot_id() -> [u8; 16] {
    proto::auth::session_id().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        let mut id = [0u8; 16];
        id[..12].copy_from_slice(&nanos.to_le_bytes()[..12]);
        id[12..].copy_from_slice(&std::process::id().to_le_bytes());
        id
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

/// The boot id a replica's refusal offers (see [`Volumes::session_refusal`]).
pub(crate) fn offered_boot(status: &Status) -> Option<Vec<u8>> {
    let text = status.metadata().get(BOOT_HEADER)?.to_str().ok()?;
    unhex(text).filter(|boot| boot.len() == 16)
}

impl Volumes {
    /// This process's boot id (a replica's session).
    pub fn boot_id(&self) -> &[u8; 16] {
        &self.boot_id
    }

    /// Whether a `ReplicaWrite` or `ClientWrite` naming `offered` belongs to this
    /// process's session:
    /// `Ok(false)` when it names none (its nonce must be durable), `Ok(true)` when it
    /// names this one (in memory is enough), and the refusal when it names another.
    pub fn in_session(&self, offered: &[u8]) -> Result<bool, Status> {
        if offered.is_empty() {
            return Ok(false);
        }
        if offered == self.boot_id.as_slice() {
            return Ok(true);
        }
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Ok(value) = hex(&self.boot_id).parse() {
            metadata.insert(BOOT_HEADER, value);
        }
        Err(Status::with_metadata(
            tonic::Code::FailedPrecondition,
            format!(
                "node {} refuses a write of another session (boot id {}): this run's boot id is {} (the node restarted since the sender learned it); re-send naming this one",
                self.node_name,
                hex(offered),
                hex(&self.boot_id)
            ),
            metadata,
        ))
    }

    /// The session this node knows for `peer` (empty: none yet): the boot id of the
    /// peer's process, as its last `ReplicaWrite` or `ClientWrite` answer gave it (one
    /// process serves both, so one id covers both).
    pub(crate) fn replica_session(&self, peer: &str) -> Vec<u8> {
        self.replica_boots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(peer)
            .cloned()
            .unwrap_or_default()
    }

    /// Remembers the session `peer` answered with (an empty one is forgotten).
    pub(crate) fn learn_session(&self, peer: &str, boot: Vec<u8>) {
        let mut boots = self
            .replica_boots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if boot.is_empty() {
            boots.remove(peer);
        } else {
            boots.insert(peer.to_string(), boot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_the_boot_id_back() {
        let id = boot_id();
        assert_ne!(id, boot_id(), "two draws differ");
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(BOOT_HEADER, hex(&id).parse().unwrap());
        let status = Status::with_metadata(tonic::Code::FailedPrecondition, "x", metadata);
        assert_eq!(offered_boot(&status), Some(id.to_vec()));
        assert_eq!(offered_boot(&Status::internal("x")), None);
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }
}
