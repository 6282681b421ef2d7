//! Fault-tolerant VMs, the commander's half (issue 22): one `protect_vm` step of a
//! plan carried out as the node API 1.6 sequence.
//!
//! 1. `CreateVm` on the secondary's node (the same definition as the primary's);
//! 2. `PrepareFtSecondary` there: its VMM waits for checkpoints and answers the
//!    address it listens on;
//! 3. `StartFt` on the primary's node, to that address: the initial copy, then a
//!    checkpoint every epoch; it answers once the first checkpoint is acknowledged
//!    (`protected`), or with the phase it could not get past.
//!
//! Both requests name the site's witness: from then on the nodes themselves decide
//! which side runs when the two lose each other (node-runtime/ARCHITECTURE.md,
//! "Fault-tolerant VMs on the node"); the commander never promotes. After a
//! promotion the plan finds the VM running on its secondary's node and the
//! placement swaps the pair ([`crate::pipeline::swap_promoted`]), so the next
//! `protect_vm` makes the former primary's node (or another) the new secondary.
//!
//! Every request is idempotent on its node (request ids `STEP.create`,
//! `STEP.prepare`, `STEP.start`), so an interrupted step is settled by running it
//! again ([`settle_step`]).

use proto::v1;
use proto::v1::apply_request::Action;
use proto::v1::apply_response::Result as Answer;

use crate::migrate::call;
use crate::nodes::NodeApi;
use crate::plan::{NodeAction, Step};

/// Phases of a primary that mean the pair is (being) protected.
pub const PRIMARY_PROTECTING: [&str; 3] = ["connecting", "initial-copy", "protected"];

/// Phases of a secondary that hold (or are receiving) the primary's checkpoints.
pub const SECONDARY_HOLDING: [&str; 3] = ["waiting", "initial-copy", "protected"];

/// Carries out a `protect_vm` step (`request_id`: the step's). `Ok` once the
/// primary's first checkpoint is acknowledged; `Err` says which side failed and how.
pub async fn run<N: NodeApi>(step: &Step, request_id: &str, nodes: &N) -> Result<(), String> {
    let NodeAction::ProtectVm {
        name,
        secondary,
        secondary_address,
        definition,
        witness,
        epoch_ms,
    } = &step.action
    else {
        return Err(format!("{} is not a protect_vm step", step.action.word()));
    };
    let id = |what: &str| format!("{request_id}.{what}");
    // 1. and 2.: the secondary, defined and waiting.
    call(
        nodes,
        secondary,
        secondary_address,
        id("create"),
        definition
            .to_request("")
            .action
            .ok_or("the definition has no action")?,
    )
    .await
    .map_err(|e| format!("defining its secondary on {secondary}: {e}"))?;
    let prepare = |what: &str| {
        call(
            nodes,
            secondary,
            secondary_address,
            id(what),
            Action::PrepareFtSecondary(v1::PrepareFtSecondary {
                name: name.clone(),
                witness: witness.clone(),
                witness_lease_ms: 0,
            }),
        )
    };
    let mut prepared = prepare("prepare").await;
    if prepared
        .as_ref()
        .is_err_and(|e| e.contains("no migration address"))
    {
        // A node learns the underlay address of a segment this plan just made at its
        // next Observe (it reports it as its migration address from then): one
        // Observe, and the secondary is asked again.
        let node = crate::desired::DesiredNode {
            name: secondary.clone(),
            site: String::new(),
            address: secondary_address.clone(),
        };
        let _ = nodes.observe(&node).await;
        prepared = prepare("prepare-again").await;
    }
    let listen = match prepared {
        Ok(Some(Answer::Ft(ft))) if !ft.listen_address.is_empty() => ft.listen_address,
        Ok(other) => {
            return Err(format!(
                "preparing its secondary on {secondary}: unexpected answer {other:?}"
            ));
        }
        Err(e) => return Err(format!("preparing its secondary on {secondary}: {e}")),
    };
    // 3. The primary.
    let started = call(
        nodes,
        &step.node,
        &step.address,
        id("start"),
        Action::StartFt(v1::StartFt {
            name: name.clone(),
            to: listen.clone(),
            epoch_ms: *epoch_ms,
            sync_disks: true,
            timeout_ms: 0,
            witness: witness.clone(),
            witness_lease_ms: 0,
        }),
    )
    .await
    .map_err(|e| format!("starting fault tolerance on {} to {listen}: {e}", step.node))?;
    match started {
        Some(Answer::Ft(v1::FtResult { ft: Some(ft), .. }))
            if ft.phase == "protected" && ft.last_acked > 0 =>
        {
            Ok(())
        }
        Some(Answer::Ft(v1::FtResult { ft: Some(ft), .. })) => Err(format!(
            "the primary on {} is `{}` with its secondary on {secondary} ({listen}){}",
            step.node,
            ft.phase,
            if ft.error.is_empty() {
                String::new()
            } else {
                format!(": {}", ft.error)
            }
        )),
        other => Err(format!(
            "starting fault tolerance on {}: unexpected answer {other:?}",
            step.node
        )),
    }
}

/// Settles a `protect_vm` step an interrupted apply left `started`: every request of
/// the sequence is idempotent, so it is run again under new request ids.
pub async fn settle_step<N: NodeApi>(
    step: &Step,
    request_id: &str,
    nodes: &N,
) -> Result<(), String> {
    let settle_id = format!("{request_id}.settle-{}", crate::state::now_ms());
    run(step, &settle_id, nodes).await
}
