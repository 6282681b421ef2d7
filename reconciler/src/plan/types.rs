//! The plan's JSON contract (`cairn plan --format json`, plan files):
//! changes for people, steps for nodes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::actions::NodeAction;

/// Version of the plan JSON (`cairn plan --format json`, plan files). 2: steps
/// carry no request id (request ids belong to an execution), and plans carry
/// `refused`, `spot_unplaced`, `protected` and changes `data_loss`.
pub const PLAN_FORMAT_VERSION: u32 = 2;

/// What happens to one object.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Made new.
    Create,
    /// Changed in place.
    Update,
    /// Deleted and made new (the node cannot change it in place).
    Replace,
    /// Removed.
    Delete,
    /// Started (stopped or crashed).
    Start,
    /// Stopped.
    Stop,
    /// Moved to another node.
    Move,
    /// Removed to make room for a higher-priority VM.
    Preempt,
}

impl Change {
    /// A change with no details and no steps yet, not site infrastructure, not a move.
    pub(super) fn new(
        kind: ChangeKind,
        object: &str,
        name: &str,
        tenant: &str,
        node: &str,
    ) -> Change {
        Change {
            kind,
            object: object.to_owned(),
            name: name.to_owned(),
            tenant: tenant.to_owned(),
            site: None,
            node: node.to_owned(),
            was_node: None,
            details: vec![],
            steps: vec![],
            data_loss: false,
        }
    }
}

impl ChangeKind {
    /// The Terraform-style symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            ChangeKind::Create => "+",
            ChangeKind::Update | ChangeKind::Start | ChangeKind::Stop => "~",
            ChangeKind::Replace => "-/+",
            ChangeKind::Delete | ChangeKind::Preempt => "-",
            ChangeKind::Move => "->",
        }
    }

    /// The word.
    pub fn word(self) -> &'static str {
        match self {
            ChangeKind::Create => "create",
            ChangeKind::Update => "update",
            ChangeKind::Replace => "replace",
            ChangeKind::Delete => "delete",
            ChangeKind::Start => "start",
            ChangeKind::Stop => "stop",
            ChangeKind::Move => "move",
            ChangeKind::Preempt => "preempt",
        }
    }
}

/// A change to one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Change {
    /// Kind.
    pub kind: ChangeKind,
    /// `vm`, `volume` or `bond`.
    pub object: String,
    /// Name.
    pub name: String,
    /// Tenant (empty when unknown: an object no spec mentions, or a site's bond).
    pub tenant: String,
    /// The site, for site infrastructure (bonds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The node it ends up on (or is removed from).
    pub node: String,
    /// For moves: the node it leaves.
    pub was_node: Option<String>,
    /// Readable details ("memory 64 MiB → 128 MiB").
    pub details: Vec<String>,
    /// The steps that carry it out.
    pub steps: Vec<usize>,
    /// It deletes data that exists (a volume that left the spec): always shown,
    /// and counted against the controller's blast-radius budget.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_loss: bool,
}

/// One step: one action on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Step {
    /// Index in `Plan::steps`.
    pub id: usize,
    /// Wave (0-based): every dependency is in an earlier wave.
    pub wave: usize,
    /// Node name.
    pub node: String,
    /// Node address.
    pub address: String,
    /// The action.
    #[serde(flatten)]
    pub action: NodeAction,
    /// Steps that must succeed first.
    pub depends_on: Vec<usize>,
}

/// Counts of the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Summary {
    /// Objects created (replacements count here and in `destroy`).
    pub add: usize,
    /// Objects updated, started or stopped.
    pub change: usize,
    /// Objects deleted or preempted.
    pub destroy: usize,
    /// VMs moved to another node.
    #[serde(rename = "move")]
    pub moves: usize,
}

/// An object left alone because its node did not answer, or refuses to carry it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LeftAlone {
    /// `vm`, `volume` or `bond`.
    pub object: String,
    /// Name.
    pub name: String,
    /// The node that did not answer (or refuses).
    pub node: String,
    /// Why, when the node answered but cannot carry it out (empty: it did not answer).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A change the specs ask for that no plan carries out, because it would destroy
/// data or the runtime cannot make it: the specs must change instead. A plan with
/// one is not acceptable (exit 1) and is never applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Refused {
    /// `vm` or `volume`.
    pub object: String,
    /// Name.
    pub name: String,
    /// The node that holds it.
    pub node: String,
    /// What was asked, why it is refused and what would be right.
    pub reason: String,
}

/// A plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Plan {
    /// [`PLAN_FORMAT_VERSION`].
    pub format_version: u32,
    /// Hash of revision, observed state and steps (16 hex digits).
    pub plan_id: String,
    /// Digest of the spec sources it was made from.
    pub revision: String,
    /// Digest of the observed state it is bound to.
    pub observed_digest: String,
    /// The summary counts.
    pub summary: Summary,
    /// Changes, by tenant then object then name.
    pub changes: Vec<Change>,
    /// Steps, in dependency order.
    pub steps: Vec<Step>,
    /// Number of waves.
    pub waves: usize,
    /// Nodes that did not answer: name → reason.
    pub unreachable: BTreeMap<String, String>,
    /// Objects not touched because their node did not answer.
    pub left_alone: Vec<LeftAlone>,
    /// Objects no spec names any more, kept because the plan was made with
    /// prune off (they are not deleted, and do not count as not converged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unpruned: Vec<LeftAlone>,
    /// VMs with no node: name → reason.
    pub unplaced: BTreeMap<String, String>,
    /// Those of them that are spot VMs (they wait for room by design; not an error).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub spot_unplaced: std::collections::BTreeSet<String>,
    /// Changes refused because they would destroy data or cannot be made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refused>,
    /// Volumes the specs of this plan protect with `prevent-destroy` (recorded
    /// when it is applied: a later plan may not delete them until specs that
    /// lift the protection were applied).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub protected: std::collections::BTreeSet<String>,
    /// The placement this plan carries out (recorded after apply).
    pub placement: std::sync::Arc<crate::desired::Placement>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// VMs the specs want that cannot be placed, apart from those preempted by
    /// design (spot VMs): the specs do not validate, so the plan is never applied.
    pub fn blocking_unplaced(&self) -> impl Iterator<Item = (&String, &String)> {
        self.unplaced.iter().filter(|(vm, _)| {
            !self
                .placement
                .unplaced_vm(vm)
                .is_some_and(compiler::place::Unplaced::preempted)
                && !self.spot_unplaced.contains(*vm)
        })
    }

    /// Why carrying this plan out would not make the cluster match the specs
    /// (empty: applying it converges). One line each.
    pub fn not_converged(&self) -> Vec<String> {
        let mut out = vec![];
        for (node, error) in &self.unreachable {
            out.push(format!("node {node} did not answer ({error})"));
        }
        let waiting = self
            .left_alone
            .iter()
            .filter(|l| l.reason.is_empty())
            .count();
        if waiting > 0 {
            out.push(format!(
                "{waiting} object{} wait{} for nodes that did not answer",
                if waiting == 1 { "" } else { "s" },
                if waiting == 1 { "s" } else { "" }
            ));
        }
        for l in self.left_alone.iter().filter(|l| !l.reason.is_empty()) {
            out.push(format!(
                "{} {} on {}: {}",
                l.object, l.name, l.node, l.reason
            ));
        }
        for (vm, reason) in self.blocking_unplaced() {
            out.push(format!("vm {vm} cannot be placed: {reason}"));
        }
        for r in &self.refused {
            out.push(format!(
                "{} {} on {}: {}",
                r.object, r.name, r.node, r.reason
            ));
        }
        out
    }
}
