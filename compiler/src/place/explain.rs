//! `cairn place --explain VM`: rank every node of the VM's site for it, with
//! the parts of each score and the constraint that rules a node out.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Engine, Locator, PlaceOptions, Verdict, order, place};
use crate::model::{Availability, Model};

/// One part of a node's score.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ScorePart {
    /// `spread`, `pack` or `affinity:NAME`.
    pub name: String,
    /// Points.
    pub value: i64,
}

/// A candidate node for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Candidate {
    /// Node.
    pub node: String,
    /// Whether every hard constraint holds there.
    pub feasible: bool,
    /// The constraint that rules it out.
    pub ruled_out_by: Option<String>,
    /// Score parts (feasible nodes only).
    pub parts: Vec<ScorePart>,
    /// Sum of the parts.
    pub total: i64,
    /// Whether the placement chose it.
    pub chosen: bool,
}

/// Ranks the candidate nodes for `vm_name` given everything else placed.
/// `None` when the VM does not exist.
pub fn explain_vm(
    model: &Model,
    options: &PlaceOptions,
    locator: Option<&Locator<'_>>,
    vm_name: &str,
) -> Option<Vec<Candidate>> {
    let vm = model.vm(vm_name)?;
    let placement = place(model, options, locator);
    let chosen = placement
        .vms
        .iter()
        .find(|v| v.name == vm_name)
        .map(|v| v.node.clone());
    // Rebuild the state as it was when this VM's turn came (the VMs placed
    // before it), so the ranking shows the decision the placement made.
    let mut engine = Engine::new(model, options);
    for other in order(model) {
        if other.name == vm_name {
            break;
        }
        if let Some(p) = placement.vms.iter().find(|v| v.name == other.name) {
            let node = engine.node_index[&p.node];
            let secondary = p.secondary.as_ref().map(|s| engine.node_index[s]);
            engine.assign(other, node, secondary);
        }
    }
    let mut out = vec![];
    for &i in engine
        .site_nodes
        .get(&vm.site)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let name = engine.nodes[i].name.clone();
        match engine.verdict(vm, i, None) {
            Verdict::Fits => {
                let parts = engine.score(vm, i);
                let total = parts.iter().map(|p| p.value).sum();
                let mut feasible = true;
                let mut ruled_out_by = None;
                if vm.availability == Availability::Ft && engine.best_secondary(vm, i).is_none() {
                    feasible = false;
                    ruled_out_by = Some(
                        "ft-domain: no room for the secondary in another failure domain".to_owned(),
                    );
                }
                out.push(Candidate {
                    chosen: chosen.as_deref() == Some(name.as_str()),
                    node: name,
                    feasible,
                    ruled_out_by,
                    parts,
                    total,
                });
            }
            Verdict::Ruled(kind, detail) => {
                let why = if detail.is_empty() {
                    kind.to_owned()
                } else {
                    format!("{kind}: {detail}")
                };
                out.push(Candidate {
                    node: name,
                    feasible: false,
                    ruled_out_by: Some(why),
                    parts: vec![],
                    total: 0,
                    chosen: false,
                });
            }
        }
    }
    out.sort_by(|a, b| {
        b.feasible
            .cmp(&a.feasible)
            .then(b.total.cmp(&a.total))
            .then(a.node.cmp(&b.node))
    });
    Some(out)
}
