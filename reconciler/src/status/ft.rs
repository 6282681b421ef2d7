//! `cairn status`'s fault-tolerance section (issue 22): per FT pair its primary and
//! secondary, the pair's state (`protected`, `re-protecting`, `unprotected`), the
//! epoch length and the last acknowledged checkpoint, the bytes per checkpoint and
//! the added latency of output, as the two nodes report them.

use std::fmt::Write as _;

use serde::Serialize;

use crate::desired::Desired;
use crate::observe::{Observed, ObservedFt, ObservedVm};

/// One FT pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct FtRow {
    /// VM.
    pub vm: String,
    /// Tenant.
    pub tenant: String,
    /// The node the guest runs on (the primary, or a promoted secondary).
    pub primary: String,
    /// The secondary's node (the placement's; empty when it has none).
    pub secondary: String,
    /// `protected` (the secondary holds the primary's acknowledged checkpoints),
    /// `re-protecting` (a secondary is being brought up to date), `unprotected` (the
    /// guest runs alone, or not at all), `unknown` (a node of the pair did not answer
    /// and the other reports nothing).
    pub state: String,
    /// The primary's phase and the secondary's, as their nodes report them (empty:
    /// not reported).
    pub primary_phase: String,
    /// The secondary's phase.
    pub secondary_phase: String,
    /// Checkpoint epoch (ms).
    pub epoch_ms: u64,
    /// The last checkpoint taken, and the last the secondary acknowledged.
    pub epoch: u64,
    /// The last acknowledged checkpoint.
    pub last_acked: u64,
    /// Median bytes per checkpoint.
    pub median_epoch_bytes: u64,
    /// The added latency of output: how long a frame was held (median, µs).
    pub output_delay_us: u64,
    /// Who holds `vm/NAME` at the witness (as the primary's node last heard).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub witness_holder: String,
    /// The last error either side reports.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Every FT VM of `desired` with its pair as observed.
pub fn rows(desired: &Desired, observed: &Observed) -> Vec<FtRow> {
    let copies = observed.vms();
    let mut rows = vec![];
    for vm in desired.vms.values() {
        let Some(ft) = &vm.ft else {
            continue;
        };
        let of = |node: &str| -> Option<&ObservedVm> {
            copies
                .get(vm.name.as_str())?
                .iter()
                .find(|(n, _)| *n == node)
                .map(|(_, o)| *o)
        };
        let side = |node: &str| of(node).and_then(|o| o.ft.as_ref());
        // A promoted secondary the placement has not swapped yet runs the guest.
        let promoted = side(&ft.secondary).is_some_and(|f| f.phase == "promoted")
            && of(&ft.secondary).is_some_and(ObservedVm::is_running);
        let (primary, secondary) = if promoted {
            (ft.secondary.clone(), vm.node.clone())
        } else {
            (vm.node.clone(), ft.secondary.clone())
        };
        let p = side(&primary).filter(|f| f.role == "primary");
        let s = side(&secondary).filter(|f| f.role == "secondary");
        let state = pair_state(
            p,
            s,
            observed.reachable(&primary) || observed.reachable(&secondary),
        );
        let empty = ObservedFt::default();
        let figures = p.unwrap_or(&empty);
        rows.push(FtRow {
            vm: vm.name.clone(),
            tenant: vm.tenant.clone(),
            primary_phase: side(&primary).map(|f| f.phase.clone()).unwrap_or_default(),
            secondary_phase: s.map(|f| f.phase.clone()).unwrap_or_default(),
            primary,
            secondary,
            state: state.to_owned(),
            epoch_ms: figures.epoch_ms,
            epoch: figures.epoch,
            last_acked: figures.last_acked,
            median_epoch_bytes: figures.median_epoch_bytes,
            output_delay_us: figures.median_output_delay_us,
            witness_holder: figures.witness_holder.clone(),
            error: [p, s]
                .into_iter()
                .flatten()
                .map(|f| f.error.as_str())
                .find(|e| !e.is_empty())
                .unwrap_or_default()
                .to_owned(),
        });
    }
    rows
}

/// The pair's state from its two sides.
fn pair_state(
    primary: Option<&ObservedFt>,
    secondary: Option<&ObservedFt>,
    any: bool,
) -> &'static str {
    let p = primary.map(|f| f.phase.as_str());
    let s = secondary.map(|f| f.phase.as_str());
    match (p, s) {
        (Some("protected"), Some("protected")) if primary.is_some_and(|f| f.last_acked > 0) => {
            "protected"
        }
        (Some("connecting" | "initial-copy" | "protected"), _)
        | (_, Some("waiting" | "initial-copy")) => "re-protecting",
        _ if !any => "unknown",
        _ => "unprotected",
    }
}

/// The section's text (nothing without FT VMs).
pub fn text(rows: &[FtRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nfault tolerance:\n");
    let mut table = vec![vec![
        "VM".to_owned(),
        "PRIMARY".to_owned(),
        "SECONDARY".to_owned(),
        "STATE".to_owned(),
        "EPOCH".to_owned(),
        "LAST ACKED".to_owned(),
        "BYTES/EPOCH".to_owned(),
        "OUTPUT DELAY".to_owned(),
    ]];
    for r in rows {
        let phase = |node: &str, phase: &str| {
            if phase.is_empty() {
                node.to_owned()
            } else {
                format!("{node} ({phase})")
            }
        };
        table.push(vec![
            r.vm.clone(),
            phase(&r.primary, &r.primary_phase),
            phase(&r.secondary, &r.secondary_phase),
            r.state.clone(),
            if r.epoch_ms == 0 {
                "-".to_owned()
            } else {
                format!("{} ms", r.epoch_ms)
            },
            r.last_acked.to_string(),
            if r.median_epoch_bytes == 0 {
                "-".to_owned()
            } else {
                compiler::units::human_size(r.median_epoch_bytes)
            },
            if r.output_delay_us == 0 {
                "-".to_owned()
            } else {
                format!("{:.1} ms", r.output_delay_us as f64 / 1000.0)
            },
        ]);
    }
    out.push_str(&super::table(&table));
    for r in rows.iter().filter(|r| !r.error.is_empty()) {
        let _ = writeln!(out, "  ! vm {}: {}", r.vm, r.error);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(role: &str, phase: &str, acked: u64) -> ObservedFt {
        ObservedFt {
            role: role.into(),
            phase: phase.into(),
            epoch_ms: 30,
            epoch: acked,
            last_acked: acked,
            ..ObservedFt::default()
        }
    }

    #[test]
    fn a_pairs_state_comes_from_both_sides() {
        let p = side("primary", "protected", 12);
        let s = side("secondary", "protected", 12);
        assert_eq!(pair_state(Some(&p), Some(&s), true), "protected");
        let first = side("primary", "protected", 0);
        assert_eq!(pair_state(Some(&first), Some(&s), true), "re-protecting");
        let copying = side("primary", "initial-copy", 0);
        let waiting = side("secondary", "waiting", 0);
        assert_eq!(
            pair_state(Some(&copying), Some(&waiting), true),
            "re-protecting"
        );
        assert_eq!(pair_state(None, Some(&waiting), true), "re-protecting");
        let lost = side("primary", "secondary-lost", 12);
        assert_eq!(pair_state(Some(&lost), None, true), "unprotected");
        let alone = side("primary", "unprotected", 12);
        assert_eq!(pair_state(Some(&alone), None, true), "unprotected");
        assert_eq!(pair_state(None, None, true), "unprotected");
        assert_eq!(pair_state(None, None, false), "unknown");
    }
}
