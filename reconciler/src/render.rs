//! Plan text output (Terraform-style) and signed plan files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proto::auth::Identity;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use std::collections::BTreeMap;

use crate::desired::DesiredNode;
use crate::observe::Observed;
use crate::plan::{ChangeKind, Plan};

/// The plan as text. `concise` prints one line per change.
pub fn plan_text(plan: &Plan, concise: bool) -> String {
    let mut out = String::new();
    for (node, error) in &plan.unreachable {
        let _ = writeln!(out, "! node {node} did not answer: {error}");
    }
    let waiting: Vec<String> = plan
        .left_alone
        .iter()
        .filter(|l| l.reason.is_empty())
        .map(|l| format!("{} {} (on {})", l.object, l.name, l.node))
        .collect();
    if !waiting.is_empty() {
        let _ = writeln!(
            out,
            "! left alone because their node did not answer: {}",
            waiting.join(", ")
        );
    }
    for l in plan.left_alone.iter().filter(|l| !l.reason.is_empty()) {
        let _ = writeln!(
            out,
            "! {} {} on {} is left alone: {}",
            l.object, l.name, l.node, l.reason
        );
    }
    for (vm, reason) in plan.blocking_unplaced() {
        let _ = writeln!(out, "! vm {vm} cannot be placed: {reason}");
    }
    for vm in &plan.spot_unplaced {
        let reason = plan.unplaced.get(vm).map_or("", String::as_str);
        let _ = writeln!(out, "  spot vm {vm} waits for room: {reason}");
    }
    for r in &plan.refused {
        let _ = writeln!(
            out,
            "! {} {} on {}: refused: {}",
            r.object, r.name, r.node, r.reason
        );
    }
    if !out.is_empty() {
        out.push('\n');
    }
    let problems = plan.not_converged();
    if plan.is_empty() && !problems.is_empty() {
        let _ = writeln!(
            out,
            "No changes can be made now, and the cluster does not match the specs: {} problem{} (above).",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        return out;
    }
    if plan.is_empty() {
        out.push_str("No changes. The cluster matches the specs.\n");
        return out;
    }
    if !concise {
        let _ = writeln!(
            out,
            "cairn will perform these actions (plan {}, {} step{} in {} wave{}):",
            plan.plan_id,
            plan.steps.len(),
            if plan.steps.len() == 1 { "" } else { "s" },
            plan.waves,
            if plan.waves == 1 { "" } else { "s" }
        );
        out.push_str("  + create   ~ change in place   - destroy   -/+ replace   -> move\n\n");
    }
    let mut group: Option<String> = None;
    for change in &plan.changes {
        let heading = match (&change.site, change.tenant.as_str()) {
            (Some(site), _) => format!("site {site}:"),
            (None, "") => "not in any spec:".to_owned(),
            (None, tenant) => format!("tenant {tenant}:"),
        };
        if group.as_ref() != Some(&heading) {
            let _ = writeln!(out, "{heading}");
            group = Some(heading);
        }
        let place = match (&change.was_node, change.kind) {
            (Some(was), _) => format!("on {}, was {was}", change.node),
            (None, ChangeKind::Delete | ChangeKind::Preempt) => format!("from {}", change.node),
            (None, _) => format!("on {}", change.node),
        };
        let what = match change.kind {
            ChangeKind::Create => "",
            _ => change.kind.word(),
        };
        let _ = writeln!(
            out,
            "  {:<3} {} {} {place}{}{}",
            change.kind.symbol(),
            change.object,
            change.name,
            if what.is_empty() { "" } else { " — " },
            what
        );
        if !concise {
            for detail in &change.details {
                let _ = writeln!(out, "        {detail}");
            }
        }
    }
    if !concise {
        out.push_str("\norder:\n");
        for wave in 0..plan.waves {
            let steps: Vec<String> = plan
                .steps
                .iter()
                .filter(|s| s.wave == wave)
                .map(|s| format!("{} {}@{}", s.action.word(), s.action.name(), s.node))
                .collect();
            let _ = writeln!(out, "  wave {}: {}", wave + 1, steps.join(", "));
        }
    }
    let _ = writeln!(out, "\n{}", summary_line(plan));
    let data_loss: Vec<String> = plan
        .changes
        .iter()
        .filter(|c| c.data_loss)
        .map(|c| format!("{} {}", c.object, c.name))
        .collect();
    if !data_loss.is_empty() {
        let _ = writeln!(
            out,
            "DATA LOSS: this plan deletes the data of {} (no spec names {} any more).",
            data_loss.join(", "),
            if data_loss.len() == 1 { "it" } else { "them" }
        );
    }
    if !problems.is_empty() {
        let _ = writeln!(
            out,
            "Even after these changes the cluster will not match the specs: {} problem{} (above).",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
    }
    out
}

/// "Plan: 3 to add, 1 to change, 0 to destroy, 2 to move."
pub fn summary_line(plan: &Plan) -> String {
    let s = &plan.summary;
    format!(
        "Plan: {} to add, {} to change, {} to destroy, {} to move.",
        s.add, s.change, s.destroy, s.moves
    )
}

/// A plan file: the plan, the observation it is bound to, and a signature.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanFile {
    /// [`crate::plan::PLAN_FORMAT_VERSION`].
    pub format_version: u32,
    /// Always `cairn-plan`.
    pub kind: String,
    /// The spec root the plan was made for (absolute).
    pub spec_root: PathBuf,
    /// The state store it was made against.
    pub state: PathBuf,
    /// The plan.
    pub plan: Plan,
    /// The observation it is bound to (its digest is `plan.observed_digest`).
    pub observed: Observed,
    /// The nodes observed (name → address), to observe them again at apply time.
    pub nodes: BTreeMap<String, DesiredNode>,
    /// The controller's signature.
    pub signature: PlanSignature,
}

/// An ed25519 signature of a plan file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanSignature {
    /// The signer's public key, hex.
    pub public_key_hex: String,
    /// The signature over [`signed_bytes`], hex.
    pub signature_hex: String,
}

/// Errors of plan files.
#[derive(Debug, thiserror::Error)]
pub enum PlanFileError {
    /// Unreadable.
    #[error("cannot read plan file {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a plan.
    #[error("{path} is not a cairn plan file: {problem}")]
    Malformed {
        /// Path.
        path: String,
        /// Why.
        problem: String,
    },
    /// Signed by someone else or tampered with.
    #[error("plan file {path} {problem}; make a new one with `cairn plan --out`")]
    BadSignature {
        /// Path.
        path: String,
        /// Why.
        problem: String,
    },
}

fn signed_bytes(file: &PlanFile) -> Vec<u8> {
    let body = serde_json::to_vec(&(
        &file.format_version,
        &file.kind,
        &file.spec_root,
        &file.state,
        &file.plan,
        &file.observed,
        &file.nodes,
    ))
    .expect("plans serialize");
    let mut message = b"cairn-plan-v1\n".to_vec();
    message.extend_from_slice(&Sha256::digest(&body));
    message
}

/// Signs and writes a plan file.
pub fn write_plan_file(
    path: &Path,
    spec_root: &Path,
    state: &Path,
    plan: &Plan,
    observed: &Observed,
    nodes: &BTreeMap<String, DesiredNode>,
    identity: &Identity,
) -> std::io::Result<()> {
    let mut file = PlanFile {
        format_version: crate::plan::PLAN_FORMAT_VERSION,
        kind: "cairn-plan".into(),
        spec_root: spec_root.to_owned(),
        state: state.to_owned(),
        plan: plan.clone(),
        observed: observed.clone(),
        nodes: nodes.clone(),
        signature: PlanSignature {
            public_key_hex: identity.public_key_hex(),
            signature_hex: String::new(),
        },
    };
    file.signature.signature_hex =
        proto::auth::to_hex(&identity.sign_bytes(&signed_bytes(&file)).to_bytes());
    let mut text = serde_json::to_string_pretty(&file).expect("plans serialize");
    text.push('\n');
    std::fs::write(path, text)
}

/// Reads a plan file and checks that `trusted_key_hex` signed exactly this content.
pub fn read_plan_file(path: &Path, trusted_key_hex: &str) -> Result<PlanFile, PlanFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PlanFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let file: PlanFile = serde_json::from_str(&text).map_err(|e| PlanFileError::Malformed {
        path: shown.clone(),
        problem: e.to_string(),
    })?;
    if file.kind != "cairn-plan" || file.format_version != crate::plan::PLAN_FORMAT_VERSION {
        return Err(PlanFileError::Malformed {
            path: shown,
            problem: if file.kind == "cairn-plan"
                && file.format_version < crate::plan::PLAN_FORMAT_VERSION
            {
                format!(
                    "it was made by an older cairn (plan format {}, this one applies {}): its steps carry request ids, which now belong to each execution; run `cairn plan --out FILE` again",
                    file.format_version,
                    crate::plan::PLAN_FORMAT_VERSION
                )
            } else {
                format!(
                    "kind `{}` version {} (expected cairn-plan version {})",
                    file.kind,
                    file.format_version,
                    crate::plan::PLAN_FORMAT_VERSION
                )
            },
        });
    }
    let bad = |problem: String| PlanFileError::BadSignature {
        path: shown.clone(),
        problem,
    };
    if file.signature.public_key_hex != trusted_key_hex {
        return Err(bad(format!(
            "is signed by key {}, not by this controller's key {trusted_key_hex}",
            file.signature.public_key_hex
        )));
    }
    let key = proto::auth::parse_public_key(&file.signature.public_key_hex)
        .map_err(|e| bad(format!("has an unusable key: {e}")))?;
    let signature = proto::auth::from_hex::<64>(&file.signature.signature_hex)
        .map_err(|e| bad(format!("has an unreadable signature: {e}")))?;
    let signature = ed25519_dalek::Signature::from_bytes(&signature);
    key.verify_strict(&signed_bytes(&file), &signature)
        .map_err(|_| {
            bad("was changed after it was signed (the signature does not verify)".into())
        })?;
    if file.observed.digest() != file.plan.observed_digest {
        return Err(bad(
            "holds an observation that does not match its plan".into()
        ));
    }
    Ok(file)
}
