//! The sync's gate, between a commit's plan and its apply: the repository's
//! `reconcile` block (auto-apply, freeze windows, the blast-radius budget,
//! prune, self-heal, the drift-check interval) and the policy gate.
//!
//! Architecture invariant: a commit never loosens its own gate. The limits
//! and the policies that judge a commit are those of the commit applied last;
//! only the first sync, with nothing applied before, is judged by the new
//! commit's own block and policies (it was signed by a trusted key, and there
//! is no earlier gate to keep).
//!
//! A plan held by the gate waits for `cairn sync --approve PLAN_ID`; the
//! approval is carried out only when the commit plans to the same plan id again
//! (the same commit against the same observed cluster), so an approval never
//! applies something the approver did not see. High-availability failover
//! (later) is not held by freeze windows or the blast radius.

use compiler::model::Reconcile;
use policy::eval::Override;
use reconciler::plan::{ChangeKind, Plan};
use serde::{Deserialize, Serialize};

/// The limits a sync is judged by, and where they come from.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The settings.
    pub reconcile: Reconcile,
    /// For people: whose block it is.
    pub source: String,
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

impl Limits {
    /// The limits of the commit applied last (`applied`: its id and model),
    /// or, when nothing was applied yet, of the new commit.
    pub fn of(applied: Option<(&str, &compiler::Model)>, new: (&str, &compiler::Model)) -> Limits {
        let (commit, model, whose) = match applied {
            Some((c, m)) => (c, m, "applied last"),
            None => (new.0, new.1, "synced first: nothing was applied before"),
        };
        match &model.reconcile {
            Some(r) => Limits {
                reconcile: r.clone(),
                source: format!("the reconcile block of commit {} ({whose})", short(commit)),
            },
            None => Limits {
                reconcile: Reconcile::default(),
                source: format!(
                    "the defaults (commit {} has no reconcile block; {whose})",
                    short(commit)
                ),
            },
        }
    }

    /// The limits of the applied commit alone (drift checks).
    pub fn applied(commit: &str, model: &compiler::Model) -> Limits {
        Limits::of(Some((commit, model)), (commit, model))
    }
}

/// Why a plan is held for approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hold {
    /// `auto-apply`, `freeze` or `blast-radius`.
    pub kind: &'static str,
    /// For people.
    pub reason: String,
}

/// A hold as recorded (controller replicas share the held plan through etcd).
#[derive(Deserialize)]
struct HoldRecord {
    kind: String,
    reason: String,
}

impl<'de> serde::Deserialize<'de> for Hold {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hold, D::Error> {
        let record = HoldRecord::deserialize(d)?;
        let kind = ["auto-apply", "freeze", "blast-radius"]
            .into_iter()
            .find(|k| *k == record.kind)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown hold `{}`: expected auto-apply, freeze or blast-radius",
                    record.kind
                ))
            })?;
        Ok(Hold {
            kind,
            reason: record.reason,
        })
    }
}

/// The changes that count against the blast radius: deletes, replacements,
/// preemptions and moves (`delete vm web-1 on lab-1`).
pub fn destructive(plan: &Plan) -> Vec<String> {
    destructive_except(plan, &Default::default())
}

/// [`destructive`] without the changes of the VMs in `skip`.
fn destructive_except(plan: &Plan, skip: &std::collections::BTreeSet<String>) -> Vec<String> {
    plan.changes
        .iter()
        .filter(|c| {
            matches!(
                c.kind,
                ChangeKind::Delete | ChangeKind::Replace | ChangeKind::Preempt | ChangeKind::Move
            ) && !(c.object == "vm" && skip.contains(&c.name))
        })
        .map(|c| match &c.was_node {
            Some(from) if c.kind == ChangeKind::Move => {
                format!("move {} {} from {from} to {}", c.object, c.name, c.node)
            }
            _ => format!("{} {} {} on {}", c.kind.word(), c.object, c.name, c.node),
        })
        .collect()
}

/// The VMs a placement moves off a failed node (HA restarts), each as
/// `vm NAME from NODE to NODE`.
pub fn ha_restarts(
    placement: &compiler::place::Placement,
    failed_nodes: &std::collections::BTreeSet<String>,
) -> Vec<(String, String)> {
    placement
        .moves
        .iter()
        .filter(|m| failed_nodes.contains(&m.from))
        .map(|m| {
            (
                m.vm.clone(),
                format!("vm {} from {} to {}", m.vm, m.from, m.to),
            )
        })
        .collect()
}

/// When a hold ends by itself (the end of the freeze windows), in seconds from
/// now; `None`: only an approval or a new commit releases it.
pub fn releases_in(holds: &[Hold], limits: &Reconcile, now_unix_s: i64) -> Option<i64> {
    if holds.iter().any(|h| h.kind != "freeze") {
        return None;
    }
    limits
        .frozen_at(now_unix_s)
        .iter()
        .filter_map(|w| w.ends_in(now_unix_s))
        .max()
}

/// Why a commit's plan may not be carried out without approval (empty: it
/// may). A plan with nothing to do is never held.
pub fn holds(limits: &Limits, plan: &Plan, now_unix_s: i64) -> Vec<Hold> {
    let r = &limits.reconcile;
    let mut out = vec![];
    if plan.is_empty() {
        return out;
    }
    if !r.auto_apply {
        out.push(Hold {
            kind: "auto-apply",
            reason: format!(
                "auto-apply is off ({}): every plan waits for `cairn sync --approve {}`",
                limits.source, plan.plan_id
            ),
        });
    }
    for w in r.frozen_at(now_unix_s) {
        let left = w.ends_in(now_unix_s).unwrap_or(0);
        out.push(Hold {
            kind: "freeze",
            reason: format!(
                "freeze window {} is in force ({}; it ends in {}): nothing is applied automatically until it ends, or `cairn sync --approve {}`",
                w.describe(),
                limits.source,
                human_secs(left),
                plan.plan_id
            ),
        });
    }
    if let Some(max) = r.blast_radius {
        let hits = destructive(plan);
        if hits.len() > max as usize {
            out.push(Hold {
                kind: "blast-radius",
                reason: format!(
                    "blast radius {} > budget {max} ({}): the plan would {}; held for `cairn sync --approve {}`",
                    hits.len(),
                    limits.source,
                    list(&hits, 20),
                    plan.plan_id
                ),
            });
        }
    }
    out
}

fn list(items: &[String], max: usize) -> String {
    let mut s = items
        .iter()
        .take(max)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > max {
        s.push_str(&format!(" and {} more", items.len() - max));
    }
    s
}

/// `2h5m`, `40s`.
pub fn human_secs(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    let mut out = String::new();
    for (n, unit) in [(d, "d"), (h, "h"), (m, "m")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() || (s > 0 && d == 0 && h == 0) {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// A plan held for approval (`GET /api/v1/plans`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldPlan {
    /// The plan id to approve.
    pub plan_id: String,
    /// The commit it carries out.
    pub commit: String,
    /// When it was held (RFC 3339).
    pub at: String,
    /// Why, one per hold.
    pub holds: Vec<Hold>,
    /// What it would delete, replace, preempt or move.
    pub destructive: Vec<String>,
    /// Its summary counts.
    pub summary: reconciler::plan::Summary,
    /// Its steps.
    pub steps: usize,
}

/// A repair (drift check) over the blast-radius budget is reported, not carried out.
pub fn repair_over_budget(
    limits: &Limits,
    plan: &Plan,
    restarted: &std::collections::BTreeSet<String>,
) -> Option<String> {
    let max = limits.reconcile.blast_radius?;
    // HA restarts (VMs moved off a node declared failed) are not held by the budget.
    let hits = destructive_except(plan, restarted);
    (hits.len() > max as usize).then(|| {
        format!(
            "the repair would {} (blast radius {} > budget {max}, {}): reported, not repaired",
            list(&hits, 20),
            hits.len(),
            limits.source
        )
    })
}

/// The trailer that overrides a soft-mandatory policy, in the commit message.
pub const OVERRIDE_TRAILER: &str = "Policy-Override";

/// The overrides a commit message asks for: lines `Policy-Override: POLICY:
/// REASON` (case-insensitive key; the reason is required). `Err` names a line
/// that is malformed.
pub fn overrides(message: &str) -> Result<Vec<Override>, String> {
    let mut out = vec![];
    for line in message.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        if !key.trim().eq_ignore_ascii_case(OVERRIDE_TRAILER) {
            continue;
        }
        match rest.split_once(':') {
            Some((policy, reason)) if !policy.trim().is_empty() && !reason.trim().is_empty() => {
                out.push(Override {
                    policy: policy.trim().to_owned(),
                    reason: reason.trim().to_owned(),
                });
            }
            _ => {
                return Err(format!(
                    "the commit message's line `{}` is not an override: write `{OVERRIDE_TRAILER}: POLICY: REASON` (the reason is recorded)",
                    line.trim()
                ));
            }
        }
    }
    Ok(out)
}

/// The full message of a commit.
pub fn commit_message(repo: &git2::Repository, commit: &str) -> Result<String, String> {
    let oid = git2::Oid::from_str(commit).map_err(|e| e.message().to_owned())?;
    let c = repo.find_commit(oid).map_err(|e| e.message().to_owned())?;
    Ok(c.message().unwrap_or("").to_owned())
}

/// The policies of `commit` (its `SUBDIR/policies`).
pub fn policies_at(
    repo: &git2::Repository,
    commit: &str,
    subdir: &std::path::Path,
) -> Result<policy::PolicySet, String> {
    let dir = subdir.join("policies");
    policy::PolicySet::load_tree(compiler::source::TreeRoot::Git {
        repo,
        rev: commit,
        dir: &dir,
    })
    .map_err(|e| e.to_string())
}

/// Why the signer of a commit may not make its overrides (`None`: it may). A
/// platform key (a key of the controller's trusted-keys file) may override any
/// soft-mandatory policy; a tenant member's key (of the commit applied last,
/// `authority`) only a policy whose metadata names one of its roles
/// (`custom: overridable-by: [admin]`).
pub fn waiver_refusal(
    signer: Option<&crate::trust::Signer>,
    platform: &policy::sshsig::AllowedSigners,
    authority: Option<&compiler::Model>,
    policies: &policy::PolicySet,
    overrides: &[Override],
) -> Option<String> {
    if overrides.is_empty() {
        return None;
    }
    let Some(signer) = signer else {
        return Some("the commit's signer is unknown, so it may not override policies".to_owned());
    };
    if platform
        .signers
        .iter()
        .any(|s| policy::sshsig::fingerprint(&s.key) == signer.fingerprint)
    {
        return None;
    }
    let roles: Vec<String> = authority
        .into_iter()
        .flat_map(|m| &m.tenants)
        .flat_map(|t| &t.members)
        .filter(|m| {
            m.key
                .as_deref()
                .and_then(|k| compiler::sshkey::parse(k).ok())
                .is_some_and(|k| policy::sshsig::fingerprint(&k.blob) == signer.fingerprint)
        })
        .filter_map(|m| {
            serde_json::to_value(m.role)
                .ok()?
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let refused: Vec<String> = overrides
        .iter()
        .filter_map(|o| {
            let p = policies.policy(&o.policy)?;
            if p.overridable_by.iter().any(|r| roles.contains(r)) {
                return None;
            }
            Some(if p.overridable_by.is_empty() {
                format!(
                    "{} (only platform keys may override it; its metadata may name roles that may: `overridable-by: [admin]` under `custom:`)",
                    o.policy
                )
            } else {
                format!(
                    "{} (the roles that may override it: {})",
                    o.policy,
                    p.overridable_by.join(", ")
                )
            })
        })
        .collect();
    (!refused.is_empty()).then(|| {
        format!(
            "its signer {} is not a platform key{} and may not override {}",
            signer.describe(),
            if roles.is_empty() {
                String::new()
            } else {
                format!(" (member roles: {})", roles.join(", "))
            },
            refused.join("; ")
        )
    })
}

/// The policy report's parts an event keeps: advisory and warning results,
/// overrides, and the source.
pub fn policy_detail(report: &policy::Report, source: &str) -> serde_json::Value {
    let reported: Vec<serde_json::Value> = report
        .findings
        .iter()
        .filter(|f| !f.blocking)
        .map(|f| {
            serde_json::json!({
                "policy": f.policy,
                "rule": f.rule,
                "enforcement": f.enforcement,
                "message": f.message,
                "overridden": f.overridden,
            })
        })
        .collect();
    serde_json::json!({
        "source": source,
        "policies": report.policies.len(),
        "findings": reported,
        "overrides": report.overrides,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_trailers_need_a_policy_and_a_reason() {
        let msg = "grow finance\n\nPolicy-Override: budget: year-end close, approved by CFO\nSigned-off-by: a\n";
        assert_eq!(
            overrides(msg).unwrap(),
            vec![Override {
                policy: "budget".into(),
                reason: "year-end close, approved by CFO".into()
            }]
        );
        assert!(
            overrides("x\n\npolicy-override: budget:\n")
                .unwrap_err()
                .contains("REASON")
        );
        assert!(overrides("x\n\nPolicy-Override: budget\n").is_err());
        assert!(overrides("no trailers: at all\n").unwrap().is_empty());
    }

    /// A plan with one change of each `kinds` (vm NAME-i on n1) and one step.
    fn plan(kinds: &[&str]) -> Plan {
        let changes: Vec<serde_json::Value> = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| {
                serde_json::json!({"kind": k, "object": "vm", "name": format!("vm-{i}"),
                    "tenant": "t", "node": "n1", "was_node": if *k == "move" { Some("n2") } else { None },
                    "details": [], "steps": [0]})
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "format_version": 2, "plan_id": "p1", "revision": "r", "observed_digest": "d",
            "summary": {"add": 0, "change": 0, "destroy": 0, "move": 0}, "changes": changes,
            "steps": [{"id": 0, "wave": 0, "node": "n1", "address": "a", "action": "start_vm",
                       "name": "vm-0", "depends_on": []}],
            "waves": 1, "unreachable": {}, "left_alone": [], "unplaced": {},
            "placement": {"format_version": 1, "vms": [], "unplaced": [], "volumes": [], "nodes": [], "moves": []}
        }))
        .unwrap()
    }

    fn limits(r: Reconcile) -> Limits {
        Limits {
            reconcile: r,
            source: "test".into(),
        }
    }

    #[test]
    fn the_blast_radius_counts_deletes_replaces_preemptions_and_moves() {
        let p = plan(&[
            "create", "update", "start", "delete", "replace", "preempt", "move",
        ]);
        assert_eq!(
            destructive(&p),
            [
                "delete vm vm-3 on n1",
                "replace vm vm-4 on n1",
                "preempt vm vm-5 on n1",
                "move vm vm-6 from n2 to n1"
            ]
        );
        let budget = |max| Reconcile {
            blast_radius: Some(max),
            ..Reconcile::default()
        };
        assert!(holds(&limits(budget(4)), &p, 0).is_empty());
        let held = holds(&limits(budget(3)), &p, 0);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].kind, "blast-radius");
        assert!(
            held[0]
                .reason
                .starts_with("blast radius 4 > budget 3 (test): the plan would delete vm vm-3"),
            "{}",
            held[0].reason
        );
        assert!(holds(&limits(Reconcile::default()), &p, 0).is_empty());
    }

    #[test]
    fn auto_apply_off_and_a_freeze_window_hold_a_plan_but_never_an_empty_one() {
        let p = plan(&["create"]);
        let off = Reconcile {
            auto_apply: false,
            ..Reconcile::default()
        };
        let held = holds(&limits(off.clone()), &p, 0);
        assert_eq!(held.len(), 1);
        assert!(
            held[0].reason.contains("cairn sync --approve p1"),
            "{}",
            held[0].reason
        );
        assert_eq!(
            releases_in(&held, &off, 0),
            None,
            "only an approval releases it"
        );
        let mut empty = p.clone();
        empty.steps.clear();
        assert!(holds(&limits(off), &empty, 0).is_empty());

        let window = compiler::model::FreezeWindow {
            name: "nights".into(),
            from: "22:00".into(),
            to: "06:00".into(),
            offset_minutes: 0,
            schedule: compiler::model::FreezeSchedule::Daily {
                from_minute: 22 * 60,
                to_minute: 6 * 60,
            },
        };
        let frozen = Reconcile {
            freezes: vec![window],
            ..Reconcile::default()
        };
        let at_23 = 23 * 3600;
        let held = holds(&limits(frozen.clone()), &p, at_23);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].kind, "freeze");
        assert!(
            held[0].reason.contains("it ends in 7h"),
            "{}",
            held[0].reason
        );
        assert_eq!(releases_in(&held, &frozen, at_23), Some(7 * 3600));
        assert!(holds(&limits(frozen), &p, 12 * 3600).is_empty());
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human_secs(40), "40s");
        assert_eq!(human_secs(3600 * 60 - 30), "2d11h59m");
        assert_eq!(human_secs(125), "2m5s");
        assert_eq!(human_secs(0), "0s");
    }
}
