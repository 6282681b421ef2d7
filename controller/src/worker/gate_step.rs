//! The worker's side of the gate (`crate::gate`): the policy gate and the
//! holds of a sync, `cairn sync` requests, and the limits drift checks follow.

use std::time::{Duration, Instant};

use reconciler::pipeline::{self, PipelineError, Planned};
use reconciler::state::StateStore;

use crate::replicas::ControllerStore;
use serde_json::json;

use super::{SyncEnd, Worker, short};
use crate::events::Event;
use crate::gate::{self, Limits};
use crate::sync_api::{Ask, Request};

/// What the gate needs of a sync in progress.
pub(super) struct Judged<'a> {
    pub commit: &'a str,
    pub model: &'a compiler::Model,
    pub planned: &'a Planned,
    pub limits: &'a Limits,
    pub signer: Option<&'a crate::trust::Signer>,
    pub store: &'a ControllerStore,
    pub started: Instant,
}

impl Worker {
    /// Takes the waiting `cairn sync` requests: each makes the head due now
    /// (a stalled, backing-off or held commit is tried again); an approval is
    /// remembered for that sync.
    pub(super) fn take_requests(&mut self) -> Vec<Request> {
        let asked = std::mem::take(&mut *self.shared.requests.lock().expect("requests lock"));
        for r in &asked {
            self.attempt = None;
            if let Ask::Approve(id) = &r.ask {
                self.approval = Some(id.clone());
            }
        }
        asked
    }

    /// Answers the requests taken this turn with what happened.
    pub(super) fn answer(&mut self, asked: Vec<Request>, did_sync: bool) {
        self.approval = None;
        if asked.is_empty() {
            return;
        }
        let value = if did_sync {
            let last = self
                .shared
                .view
                .lock()
                .expect("view lock")
                .last_sync
                .clone();
            serde_json::to_value(last).unwrap_or_default()
        } else if self.shared.paused.load(std::sync::atomic::Ordering::SeqCst) {
            json!({"result": "paused", "reason": "the controller is paused: nothing is applied until `cairn controller resume`"})
        } else {
            let held = crate::replicas::held_plan(&self.shared);
            match (held, &self.good) {
                (Some(h), _) => json!({
                    "result": "held", "commit": h.commit, "plan_id": h.plan_id,
                    "reason": h.holds.iter().map(|x| x.reason.clone()).collect::<Vec<_>>().join("; "),
                }),
                (None, Some(g)) => json!({
                    "result": "up-to-date", "commit": g.commit,
                    "reason": "the branch head is the commit applied last; a drift check ran",
                }),
                (None, None) => {
                    json!({"result": "unknown", "reason": "nothing was synced yet (the branch has no commit, or the repository cannot be read)"})
                }
            }
        };
        for r in asked {
            let _ = r.reply.send(value.clone());
        }
    }

    /// The drift-check interval: the applied commit's `drift-check every=`,
    /// else `--drift-interval`.
    pub(super) fn drift_interval(&self) -> Duration {
        self.good
            .as_ref()
            .and_then(|g| g.model.reconcile.as_ref()?.drift_check_ms)
            .map(Duration::from_millis)
            .unwrap_or(self.shared.config.drift_interval)
    }

    /// The limits of the applied commit.
    pub(super) fn applied_limits(&self) -> Option<Limits> {
        self.good
            .as_ref()
            .map(|g| Limits::applied(&g.commit, &g.model))
    }

    /// The limits a sync of `commit` is judged by.
    pub(super) fn limits_for(&self, commit: &str, model: &compiler::Model) -> Limits {
        Limits::of(
            self.good.as_ref().map(|g| (g.commit.as_str(), &*g.model)),
            (commit, model),
        )
    }

    /// The policy gate, then the holds. `Some`: the sync ends here (refused
    /// or held; its events are recorded).
    pub(super) fn judge(
        &mut self,
        j: &Judged<'_>,
        detail: &mut serde_json::Value,
        phases: &mut serde_json::Map<String, serde_json::Value>,
        extra: &mut Vec<Event>,
    ) -> Option<SyncEnd> {
        let plan = &j.planned.plan;
        let t = Instant::now();
        let refuse =
            |w: &Self, reason: String, detail: &serde_json::Value, extra: &mut Vec<Event>| {
                w.shared.metrics.commits_refused.inc();
                w.end_sync(
                    j.commit,
                    "refused",
                    Some(reason),
                    Some(&plan.plan_id),
                    detail.clone(),
                    j.started,
                    std::mem::take(extra),
                );
                SyncEnd::Stalled
            };

        // The policy gate: the policies of the commit applied last.
        let judge_commit = self
            .good
            .as_ref()
            .map_or(j.commit, |g| g.commit.as_str())
            .to_owned();
        let source = if judge_commit == j.commit {
            format!(
                "the policies of commit {} (synced first: nothing was applied before)",
                short(j.commit)
            )
        } else {
            format!(
                "the policies of commit {} (applied last)",
                short(&judge_commit)
            )
        };
        let repo = match self.source.open() {
            Ok(r) => r,
            Err(e) => return Some(refuse(self, e.to_string(), detail, extra)),
        };
        let policies = match gate::policies_at(&repo, &judge_commit, &self.source.subdir) {
            Ok(p) => p,
            Err(e) => {
                return Some(refuse(
                    self,
                    format!("{source} cannot be read, so nothing was sent: {e}"),
                    detail,
                    extra,
                ));
            }
        };
        let overrides =
            match gate::commit_message(&repo, j.commit).and_then(|m| gate::overrides(&m)) {
                Ok(o) => o,
                Err(e) => {
                    return Some(refuse(
                        self,
                        format!("commit {}: {e}; nothing was sent", short(j.commit)),
                        detail,
                        extra,
                    ));
                }
            };
        drop(repo);
        let platform =
            crate::trust::read_signers(&self.shared.config.trusted_keys_path()).unwrap_or_default();
        if let Some(why) = gate::waiver_refusal(
            j.signer,
            &platform,
            self.good.as_ref().map(|g| &*g.model),
            &policies,
            &overrides,
        ) {
            return Some(refuse(
                self,
                format!(
                    "commit {} asks to override policies, but {why}; nothing was sent",
                    short(j.commit)
                ),
                detail,
                extra,
            ));
        }
        let verdict = tokio::task::block_in_place(|| {
            pipeline::policy_gate(&policies, j.model, plan, &overrides)
        });
        phases.insert("policy_ms".into(), json!(t.elapsed().as_millis() as u64));
        detail["phases"] = json!(phases);
        self.shared
            .metrics
            .phase_seconds
            .with_label_values(&["policy"])
            .observe(t.elapsed().as_secs_f64());
        match verdict {
            Ok(report) => {
                detail["policy"] = gate::policy_detail(&report, &source);
                let applied: Vec<_> = report
                    .overrides
                    .iter()
                    .filter(|o| o.status == "applied")
                    .collect();
                if !applied.is_empty() {
                    let _ = j.store.audit(
                        "policy-override",
                        json!({"commit": j.commit, "plan_id": plan.plan_id, "signer": detail["signer"], "overrides": applied}),
                    );
                }
            }
            Err(PipelineError::PolicyDenied(lines)) => {
                detail["policy_denied"] = json!(lines);
                let _ = j.store.audit(
                    "apply-refused",
                    json!({"plan_id": plan.plan_id, "commit": j.commit, "reason": lines, "by": "controller (policy gate)"}),
                );
                return Some(refuse(
                    self,
                    format!(
                        "{source} refuse commit {}, so nothing was sent: {}",
                        short(j.commit),
                        lines.join("; ")
                    ),
                    detail,
                    extra,
                ));
            }
            Err(e) => {
                return Some(refuse(
                    self,
                    format!("{source}: {e}; nothing was sent"),
                    detail,
                    extra,
                ));
            }
        }

        // The holds of the reconcile block.
        let now_s = (reconciler::state::now_ms() / 1000) as i64;
        let holds = gate::holds(j.limits, plan, now_s);
        let approval = self.approval.take();
        detail["limits"] = json!(j.limits.source);
        if holds.is_empty() {
            return None;
        }
        if approval.as_deref() == Some(plan.plan_id.as_str()) {
            detail["approved"] = json!({"plan_id": plan.plan_id, "holds": holds});
            let _ = j.store.audit(
                "plan-approved",
                json!({"commit": j.commit, "plan_id": plan.plan_id, "holds": holds}),
            );
            return None;
        }
        let destructive = gate::destructive(plan);
        let mut reason = holds
            .iter()
            .map(|h| h.reason.clone())
            .collect::<Vec<_>>()
            .join("; ");
        if let Some(old) = approval {
            reason = format!(
                "plan changed: plan {old} was approved, but commit {} now plans {} (the branch or the cluster moved), so nothing was applied; it is held again: {reason}",
                short(j.commit),
                plan.plan_id
            );
        }
        let held = gate::HeldPlan {
            plan_id: plan.plan_id.clone(),
            commit: j.commit.to_owned(),
            at: crate::events::rfc3339(reconciler::state::now_ms()),
            holds: holds.clone(),
            destructive: destructive.clone(),
            summary: plan.summary.clone(),
            steps: plan.steps.len(),
        };
        detail["holds"] = json!(holds);
        detail["destructive"] = json!(destructive);
        extra.push(
            Event::new("held", "held")
                .commit(j.commit)
                .plan(&plan.plan_id)
                .reason(reason.clone())
                .detail(json!({"holds": holds, "destructive": destructive, "summary": plan.summary, "steps": plan.steps.len()})),
        );
        self.end_sync(
            j.commit,
            "held",
            Some(reason),
            Some(&plan.plan_id),
            detail.clone(),
            j.started,
            std::mem::take(extra),
        );
        crate::replicas::set_held_plan(&self.shared, Some(held));
        let until = gate::releases_in(&holds, &j.limits.reconcile, now_s)
            .map(|s| Instant::now() + Duration::from_secs(s.max(1) as u64));
        Some(SyncEnd::HeldForApproval { until })
    }
}
