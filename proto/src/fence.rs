//! Fencing tokens of controller replicas (issue 24): with `--state etcd://…` one of
//! several controllers leads, elected through an etcd lease, and its token is the
//! election key's create revision (etcd revisions only grow; lease ids do not).
//!
//! Every signed request of a leader carries its token as [`HEADER`]; a node keeps the
//! highest token it has seen per controller key (persisted, `node-runtime`'s
//! `fencing`) and refuses a request with a lower one, so a deposed leader that wakes
//! up is refused by every node the new leader has reached. The leader itself stops
//! first: [`SharedFence::check`] refuses to sign once its own timer, counted from its
//! last keepalive's send, could have lapsed, and before `not_before` (a new leader
//! waits until the previous leader has certainly stopped: one TTL, or less when it
//! knows the previous lease's fate; `state-etcd`'s election).
//!
//! Like the audit head the header is not in the signed payload (every older node
//! would refuse every request); a node takes it only from a request whose signature
//! verified with a trusted controller key.

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Metadata key of the fencing token (decimal; not signed, see above).
pub const HEADER: &str = "x-cairn-fence-token";

/// What a controller knows of its own leadership.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FenceState {
    /// The token (0: this process never led; nothing is sent).
    pub token: u64,
    /// Until when it may act: its last keepalive's send time plus the TTL etcd granted.
    pub acting_until: Option<Instant>,
    /// Not before (a new leader waits for the previous leader to stop before its first
    /// node call).
    pub not_before: Option<Instant>,
}

/// The fence shared by the election (which sets it) and the request signer (which
/// checks it before every signature). Cheap to clone; clones share the value.
#[derive(Debug, Clone, Default)]
pub struct SharedFence(Arc<Mutex<FenceState>>);

impl SharedFence {
    /// Replaces the state.
    pub fn set(&self, state: FenceState) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// The state.
    pub fn get(&self) -> FenceState {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token to send now (`None`: this process never led, send none), or why this
    /// process must not call a node now.
    pub fn check(&self, now: Instant) -> Result<Option<u64>, String> {
        let state = self.get();
        if state.token == 0 {
            return Ok(None);
        }
        if let Some(not_before) = state.not_before
            && now < not_before
        {
            return Err(format!(
                "leader with fencing token {} waits {} ms more for the previous leader's lease to run out",
                state.token,
                (not_before - now).as_millis()
            ));
        }
        match state.acting_until {
            Some(until) if now < until => Ok(Some(state.token)),
            _ => Err(format!(
                "this controller's leadership (fencing token {}) may have lapsed: no keepalive answered within the lease TTL",
                state.token
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fence_sends_its_token_only_while_acting() {
        let fence = SharedFence::default();
        let now = Instant::now();
        assert_eq!(fence.check(now), Ok(None));
        fence.set(FenceState {
            token: 7,
            acting_until: Some(now + Duration::from_secs(2)),
            not_before: Some(now + Duration::from_secs(1)),
        });
        assert!(fence.check(now).unwrap_err().contains("waits"));
        assert_eq!(fence.check(now + Duration::from_millis(1500)), Ok(Some(7)));
        let lapsed = fence.check(now + Duration::from_secs(2)).unwrap_err();
        assert!(lapsed.contains("lapsed"), "{lapsed}");
    }
}
