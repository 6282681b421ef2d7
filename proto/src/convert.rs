//! Hand-written conversions between the wire enums and the words `cairn status` and
//! the reconciler use ("running", "degraded", ...). Written out once, here.

use crate::v1::{Health, VmState, VolumeRole};

impl VmState {
    /// The state as `cairn status --format json` spells it: `running`, `stopped`,
    /// `crashed`, `pending` (starting or unknown).
    pub fn status_name(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Starting | VmState::Unspecified => "pending",
        }
    }

    /// The state of a wire value; unknown numbers (a newer node) read as `Unspecified`.
    pub fn from_wire(value: i32) -> Self {
        VmState::try_from(value).unwrap_or(VmState::Unspecified)
    }
}

impl Health {
    /// `healthy`, `degraded`, `failed` or `unknown`.
    pub fn status_name(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Failed => "failed",
            Health::Unspecified => "unknown",
        }
    }

    /// The health of a wire value; unknown numbers read as `Unspecified`.
    pub fn from_wire(value: i32) -> Self {
        Health::try_from(value).unwrap_or(Health::Unspecified)
    }

    /// The worse of two healths (failed > degraded > unknown > healthy), for rolling
    /// object health up to a node or a cluster.
    pub fn worst(self, other: Health) -> Health {
        fn rank(health: Health) -> u8 {
            match health {
                Health::Healthy => 0,
                Health::Unspecified => 1,
                Health::Degraded => 2,
                Health::Failed => 3,
            }
        }
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

impl VolumeRole {
    /// `primary`, `replica` or `unknown`.
    pub fn status_name(self) -> &'static str {
        match self {
            VolumeRole::Primary => "primary",
            VolumeRole::Replica => "replica",
            VolumeRole::Unspecified => "unknown",
        }
    }

    /// The role of a wire value; unknown numbers read as `Unspecified`.
    pub fn from_wire(value: i32) -> Self {
        VolumeRole::try_from(value).unwrap_or(VolumeRole::Unspecified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_words_match_the_cli_contract() {
        assert_eq!(
            VmState::from_wire(VmState::Running as i32).status_name(),
            "running"
        );
        assert_eq!(VmState::from_wire(99).status_name(), "pending");
        assert_eq!(Health::Healthy.worst(Health::Degraded), Health::Degraded);
        assert_eq!(Health::Failed.worst(Health::Degraded), Health::Failed);
        assert_eq!(VolumeRole::from_wire(2).status_name(), "replica");
    }
}
