//! Apply: carry out one execution of a plan, wave by wave with bounded
//! parallelism, journaling every step before and after it.
//!
//! Every execution has its own id, and every step its own request id
//! (`EXECUTION_ID.STEP`), so the same plan applied twice (the same specs and
//! observation) is carried out twice, while a retry of one step inside one
//! execution is answered by the node from its request log. An execution that was
//! interrupted is never resumed blindly: the next apply settles the steps it left
//! in flight (`settle`, a read-only question to their nodes) and plans again from
//! what the cluster runs then (`commands::apply_cmd`).
//!
//! A failed step skips every step that depends on it; independent steps go on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::nodes::NodeApi;
use crate::plan::{Plan, Step};
use crate::state::{StateStore, StepRecord, StepStatus, now_ms, request_id};

/// Outcome of one step in this run.
#[derive(Debug, Clone, Serialize)]
pub struct StepOutcome {
    /// Step id.
    pub step: usize,
    /// `create_vm web-1@lab-1`.
    pub what: String,
    /// Final status.
    pub status: StepStatus,
    /// The node answered with a recorded outcome (done before a crash, not repeated).
    pub replayed: bool,
    /// Error or skip reason.
    pub error: Option<String>,
    /// Milliseconds the node took (0 when not sent).
    pub millis: u64,
}

/// The end report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Plan id.
    pub plan_id: String,
    /// This execution's id.
    pub execution_id: String,
    /// Every step.
    pub steps: Vec<StepOutcome>,
    /// Wall time.
    pub millis: u64,
}

impl Report {
    fn count(&self, f: impl Fn(&StepOutcome) -> bool) -> usize {
        self.steps.iter().filter(|s| f(s)).count()
    }

    /// Whether any step failed.
    pub fn failed(&self) -> bool {
        self.count(|s| s.status == StepStatus::Failed) > 0
    }

    /// The end report as text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let ok = self.count(|s| s.status == StepStatus::Succeeded);
        let failed: Vec<&StepOutcome> = self
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Failed)
            .collect();
        let skipped: Vec<&StepOutcome> = self
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Skipped)
            .collect();
        let replayed = self.count(|s| s.status == StepStatus::Succeeded && s.replayed);
        for f in &failed {
            out.push_str(&format!(
                "failed:  {} — {}\n",
                f.what,
                f.error.as_deref().unwrap_or("")
            ));
        }
        for s in &skipped {
            out.push_str(&format!(
                "skipped: {} — {}\n",
                s.what,
                s.error.as_deref().unwrap_or("")
            ));
        }
        out.push_str(&format!(
            "Apply {}: {ok} succeeded ({} carried out now, {replayed} already done by the node), {} failed, {} skipped, in {:.1} s.\n",
            if failed.is_empty() && skipped.is_empty() { "complete" } else { "incomplete" },
            ok.saturating_sub(replayed),
            failed.len(),
            skipped.len(),
            self.millis as f64 / 1000.0
        ));
        if !failed.is_empty() {
            out.push_str("Fix what failed, then run `cairn plan` to see what is left.\n");
        }
        out
    }
}

/// Steps in flight on one node at once by default ([`ApplyOptions::per_node`]): a
/// one-node cluster keeps the 8 it had when 8 was the only limit.
pub const PER_NODE_DEFAULT: usize = 8;

/// How to run.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Steps in flight at once, over every node.
    pub parallelism: usize,
    /// Steps in flight on one node at once.
    pub per_node: usize,
}

impl ApplyOptions {
    /// `parallelism` steps in flight, at most [`PER_NODE_DEFAULT`] on one node.
    pub fn new(parallelism: usize) -> Self {
        Self {
            parallelism,
            per_node: PER_NODE_DEFAULT,
        }
    }
}

/// The steps of a wave that are ready to send, queued per node, and which nodes
/// may be sent one more: at most `per_node` in flight on a node, the nodes served
/// in turn (round robin), each node's steps in plan order. O(1) per step.
struct Ready {
    /// Per node: its steps not sent yet, and how many of its steps are in flight.
    nodes: Vec<(std::collections::VecDeque<(Step, u32)>, usize)>,
    /// Node name → index in `nodes`.
    index: std::collections::HashMap<String, usize>,
    /// Nodes with a step to send and room for it, each at most once.
    runnable: std::collections::VecDeque<usize>,
    /// Whether a node is in `runnable`.
    queued: Vec<bool>,
    per_node: usize,
}

impl Ready {
    fn new(per_node: usize) -> Self {
        Self {
            nodes: vec![],
            index: std::collections::HashMap::new(),
            runnable: std::collections::VecDeque::new(),
            queued: vec![],
            per_node: per_node.max(1),
        }
    }

    fn push(&mut self, step: Step, attempts: u32) {
        let next = self.nodes.len();
        let at = *self.index.entry(step.node.clone()).or_insert(next);
        if at == next {
            self.nodes.push((std::collections::VecDeque::new(), 0));
            self.queued.push(false);
        }
        self.nodes[at].0.push_back((step, attempts));
        self.wake(at);
    }

    /// Puts the node in turn if it has a step to send and room for it.
    fn wake(&mut self, at: usize) {
        let (steps, in_flight) = &self.nodes[at];
        if !self.queued[at] && !steps.is_empty() && *in_flight < self.per_node {
            self.queued[at] = true;
            self.runnable.push_back(at);
        }
    }

    /// The next node's steps to send, as many as it has room for and at most `most`
    /// (each counted in flight on it); empty when no node has room. A node's steps
    /// go together so that they can share one call ([`NodeApi::apply_batch`]).
    fn pop_node(&mut self, most: usize) -> Vec<(Step, u32)> {
        let Some(at) = self.runnable.pop_front() else {
            return vec![];
        };
        self.queued[at] = false;
        let (steps, in_flight) = &mut self.nodes[at];
        let take = (self.per_node - *in_flight).min(most).min(steps.len());
        let next: Vec<(Step, u32)> = steps.drain(..take).collect();
        *in_flight += next.len();
        self.wake(at);
        next
    }

    /// How many nodes have a step to send and room for it.
    fn waiting_nodes(&self) -> usize {
        self.runnable.len()
    }

    /// A step sent to `node` is answered: its node has room again.
    fn done(&mut self, node: &str) {
        if let Some(&at) = self.index.get(node) {
            self.nodes[at].1 = self.nodes[at].1.saturating_sub(1);
            self.wake(at);
        }
    }
}

/// What apply reports while it runs: the CLI draws a progress bar or prints a
/// line per step, the controller records events. Apply itself prints nothing.
pub trait ApplyEvents: Send + Sync {
    /// The execution starts with this many steps.
    fn started(&self, _steps: usize) {}
    /// A step ended: succeeded, failed or skipped.
    fn step_ended(&self, _outcome: &StepOutcome) {}
    /// Every step ended.
    fn finished(&self) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl ApplyEvents for Silent {}

fn describe(step: &Step) -> String {
    format!(
        "{} {}@{}",
        step.action.word(),
        step.action.name(),
        step.node
    )
}

/// Test hook: `CAIRN_APPLY_STEP_DELAY_MS` holds every step this long after the node
/// answered and before the outcome is journaled (widens the window the crash-resume
/// test kills `cairn apply` in). Not for operators.
fn step_delay() -> Option<Duration> {
    std::env::var("CAIRN_APPLY_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

/// Carries out `plan` as the execution `execution_id` (already recorded with
/// `StateStore::start_execution`).
pub async fn apply<N: NodeApi>(
    plan: &Plan,
    execution_id: &str,
    store: &dyn StateStore,
    nodes: &N,
    options: &ApplyOptions,
    events: &dyn ApplyEvents,
) -> Result<Report, crate::state::StateError> {
    let started = Instant::now();
    events.started(plan.steps.len());
    let delay = step_delay();
    let mut outcomes: BTreeMap<usize, StepOutcome> = BTreeMap::new();
    for wave in 0..plan.waves {
        let mut tasks = tokio::task::JoinSet::new();
        let mut ready = Ready::new(options.per_node);
        for step in plan.steps.iter().filter(|s| s.wave == wave) {
            let what = describe(step);
            let blocked: Vec<usize> = step
                .depends_on
                .iter()
                .copied()
                .filter(|d| {
                    outcomes
                        .get(d)
                        .is_none_or(|o| o.status != StepStatus::Succeeded)
                })
                .collect();
            let attempts = 0;
            if !blocked.is_empty() {
                let reason = format!(
                    "depends on {} which did not succeed",
                    blocked
                        .iter()
                        .map(|d| describe(&plan.steps[*d]))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                store.journal(
                    execution_id,
                    &StepRecord {
                        step: step.id,
                        request_id: request_id(execution_id, step.id),
                        status: StepStatus::Skipped,
                        replayed: false,
                        attempts,
                        error: Some(reason.clone()),
                        at_unix_ms: now_ms(),
                    },
                )?;
                let outcome = StepOutcome {
                    step: step.id,
                    what,
                    status: StepStatus::Skipped,
                    replayed: false,
                    error: Some(reason),
                    millis: 0,
                };
                events.step_ended(&outcome);
                outcomes.insert(step.id, outcome);
                continue;
            }
            ready.push(step.clone(), attempts);
        }
        // At most `parallelism` steps in flight, and `per_node` on one node; each
        // is journaled `started` right before it is sent, so a crash leaves only
        // the in-flight ones `started`.
        // The outcomes that came in are journaled in the same transaction as the
        // next steps' `started` records (one store write per round, not two; a
        // crash before it leaves those steps `started`, which settling asks their
        // nodes about), and at the end of the wave.
        let parallelism = options.parallelism.max(1);
        let mut answered: Vec<StepRecord> = vec![];
        let mut ended: Vec<StepOutcome> = vec![];
        // Steps sent and not answered yet.
        let mut in_flight = 0;
        loop {
            let mut starting = vec![];
            // While every node waiting can have a step, the room is spread over them
            // (a small cluster's nodes all work at once); when more nodes wait than
            // there is room, each served node gets all it has room for, in one call.
            let room = parallelism.saturating_sub(in_flight);
            let waiting = ready.waiting_nodes().max(1);
            let share = if waiting > room {
                room
            } else {
                room.div_ceil(waiting)
            };
            while in_flight + starting.len() < parallelism {
                let room = parallelism - in_flight - starting.len();
                let next = ready.pop_node(share.min(room));
                if next.is_empty() {
                    break;
                }
                starting.extend(next);
            }
            in_flight += starting.len();
            // The steps sent together are journaled together (one transaction),
            // with the outcomes in since the last round.
            let mut records = std::mem::take(&mut answered);
            records.extend(starting.iter().map(|(step, attempts)| StepRecord {
                step: step.id,
                request_id: request_id(execution_id, step.id),
                status: StepStatus::Started,
                replayed: false,
                attempts: attempts + 1,
                error: None,
                at_unix_ms: now_ms(),
            }));
            if !records.is_empty() {
                store.journal_many(execution_id, &records)?;
            }
            for outcome in ended.drain(..) {
                events.step_ended(&outcome);
                outcomes.insert(outcome.step, outcome);
            }
            // A live migration runs here, not as a task: it writes its commit record
            // to the store (`crate::migrate`). The tasks in flight go on meanwhile.
            // A node's other steps that went out together share one call (one
            // signature, one nonce), except those the node forwards to others.
            let mut inline = vec![];
            // Per node in the order first met: its steps that go in one call.
            let mut together: Vec<Vec<(Step, u32, proto::v1::ApplyRequest)>> = vec![];
            let mut group_of: std::collections::HashMap<String, usize> = Default::default();
            for (step, attempts) in starting {
                let id = request_id(execution_id, step.id);
                if matches!(step.action, crate::plan::NodeAction::MigrateVm { .. }) {
                    let sent = Instant::now();
                    let result = crate::migrate::run(&step, &id, store, nodes)
                        .await
                        .map(|()| false);
                    inline.push((step, attempts + 1, result, sent.elapsed()));
                    continue;
                }
                if matches!(step.action, crate::plan::NodeAction::ProtectVm { .. }) {
                    // An FT pair's sequence (`crate::ft`), several requests.
                    let nodes = nodes.clone();
                    tasks.spawn(async move {
                        let sent = Instant::now();
                        let result = crate::ft::run(&step, &id, &nodes).await.map(|()| false);
                        vec![(step, attempts + 1, result, sent.elapsed())]
                    });
                    continue;
                }
                let request = step.action.to_request(&id);
                let alone = request.action.as_ref().is_none_or(proto::forwards_grant);
                if alone {
                    send(&mut tasks, nodes, vec![(step, attempts, request)], delay);
                    continue;
                }
                let next = together.len();
                let group = *group_of.entry(step.node.clone()).or_insert(next);
                if group == next {
                    together.push(vec![]);
                }
                together[group].push((step, attempts, request));
            }
            for steps in together {
                send(&mut tasks, nodes, steps, delay);
            }
            let mut joined = inline;
            if joined.is_empty() {
                let Some(next) = tasks.join_next().await else {
                    break;
                };
                joined.extend(next.into_iter().flatten());
            }
            // Every outcome that is in is journaled in one transaction.
            while let Some(more) = tasks.try_join_next() {
                joined.extend(more.into_iter().flatten());
            }
            for (step, attempts, result, elapsed) in joined {
                in_flight -= 1;
                ready.done(&step.node);
                let (status, replayed, error) = match result {
                    Ok(replayed) => (StepStatus::Succeeded, replayed, None),
                    Err(e) => (StepStatus::Failed, false, Some(e)),
                };
                answered.push(StepRecord {
                    step: step.id,
                    request_id: request_id(execution_id, step.id),
                    status,
                    replayed,
                    attempts,
                    error: error.clone(),
                    at_unix_ms: now_ms(),
                });
                ended.push(StepOutcome {
                    step: step.id,
                    what: describe(&step),
                    status,
                    replayed,
                    error,
                    millis: elapsed.as_millis() as u64,
                });
            }
        }
        if !answered.is_empty() {
            store.journal_many(execution_id, &answered)?;
        }
        for outcome in ended {
            events.step_ended(&outcome);
            outcomes.insert(outcome.step, outcome);
        }
    }
    events.finished();
    Ok(Report {
        plan_id: plan.plan_id.clone(),
        execution_id: execution_id.to_owned(),
        steps: outcomes.into_values().collect(),
        millis: started.elapsed().as_millis() as u64,
    })
}

/// A step sent, its attempt, whether the node replayed it (or why it failed), and
/// how long its call took.
type Sent = (Step, u32, Result<bool, String>, Duration);

/// Sends `steps` (one node's) with their requests: one `Apply`, or one
/// [`NodeApi::apply_batch`] for several.
fn send<N: NodeApi>(
    tasks: &mut tokio::task::JoinSet<Vec<Sent>>,
    nodes: &N,
    steps: Vec<(Step, u32, proto::v1::ApplyRequest)>,
    delay: Option<Duration>,
) {
    let nodes = nodes.clone();
    tasks.spawn(async move {
        let sent = Instant::now();
        let (node, address) = (steps[0].0.node.clone(), steps[0].0.address.clone());
        let (steps, mut requests): (Vec<(Step, u32)>, Vec<_>) = steps
            .into_iter()
            .map(|(step, attempts, request)| ((step, attempts), request))
            .unzip();
        let results = if requests.len() == 1 {
            let request = requests.pop().expect("one request");
            vec![nodes.apply(&node, &address, request).await]
        } else {
            nodes.apply_batch(&node, &address, requests).await
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let elapsed = sent.elapsed();
        // A step the answers leave out fails, named, rather than vanishing unjournaled.
        let mut results = results.into_iter();
        steps
            .into_iter()
            .map(|(step, attempts)| {
                let result = match results.next() {
                    Some(answer) => answer
                        .map(|response| response.replayed)
                        .map_err(|e| e.to_string()),
                    None => Err(format!(
                        "node {node} answered fewer requests than its call carried; this one has no answer"
                    )),
                };
                (step, attempts + 1, result, elapsed)
            })
            .collect()
    });
}

/// What settling an interrupted execution found about its in-flight steps.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    /// Carried out by their node (journaled succeeded, `replayed`).
    pub done: usize,
    /// Never carried out (journaled abandoned; not sent again).
    pub not_done: usize,
    /// Steps whose node did not answer: `create_vm web-1@lab-2: why`. They stay
    /// `started`; their request ids are never sent again, so whatever their node
    /// did is seen by the next observation.
    pub unknown: Vec<String>,
}

/// Asks the nodes, read-only, what became of every step an interrupted
/// execution left `started`, and journals the answer. Nothing is carried out.
pub async fn settle<N: NodeApi>(
    plan: &Plan,
    execution_id: &str,
    store: &dyn StateStore,
    nodes: &N,
) -> Result<Settled, crate::state::StateError> {
    let mut settled = Settled::default();
    for record in store.journal_of(execution_id)? {
        if record.status != StepStatus::Started {
            continue;
        }
        let Some(step) = plan.steps.get(record.step) else {
            continue;
        };
        let what = describe(step);
        // A migration: its record decides (finished if it names the destination,
        // else given up: the source resumes). Any other step: its node's outcome.
        let done = if matches!(step.action, crate::plan::NodeAction::MigrateVm { .. }) {
            crate::migrate::settle_step(step, &record.request_id, store, nodes)
                .await?
                .map_err(Some)
        } else if matches!(step.action, crate::plan::NodeAction::ProtectVm { .. }) {
            crate::ft::settle_step(step, &record.request_id, nodes)
                .await
                .map_err(Some)
        } else {
            match nodes
                .get_outcome(&step.node, &step.address, &record.request_id)
                .await
            {
                Ok(a) if a.outcome() == proto::v1::Outcome::Succeeded => Ok(()),
                Ok(_) => Err(None),
                Err(e) => {
                    settled.unknown.push(format!("{what}: {e}"));
                    continue;
                }
            }
        };
        let (status, error) = match done {
            Ok(()) => {
                settled.done += 1;
                (StepStatus::Succeeded, None)
            }
            Err(why) => {
                settled.not_done += 1;
                (
                    StepStatus::Abandoned,
                    Some(why.unwrap_or_else(|| {
                        "interrupted before its node carried it out; not sent again".to_owned()
                    })),
                )
            }
        };
        store.journal(
            execution_id,
            &StepRecord {
                replayed: status == StepStatus::Succeeded,
                status,
                error,
                at_unix_ms: now_ms(),
                ..record
            },
        )?;
    }
    Ok(settled)
}

#[cfg(test)]
mod tests {
    //! Apply and settle against an in-process fake of the node API (tests only):
    //! it records every request id it is sent and answers outcomes from that.

    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    use proto::v1;

    use super::*;
    use crate::desired::DesiredNode;
    use crate::nodes::NodeError;
    use crate::observe::NodeObservation;
    use crate::plan::NodeAction;
    use crate::state::{PlanRecord, RedbStore, new_execution_id, random_id};

    #[derive(Clone, Default)]
    struct FakeNodes {
        /// Request ids carried out.
        done: Arc<Mutex<Vec<String>>>,
        /// Nodes that do not answer.
        down: Arc<Mutex<BTreeSet<String>>>,
    }

    impl NodeApi for FakeNodes {
        async fn observe(&self, _node: &DesiredNode) -> Result<NodeObservation, String> {
            Err("not used".into())
        }

        async fn apply(
            &self,
            node: &str,
            _address: &str,
            request: v1::ApplyRequest,
        ) -> Result<v1::ApplyResponse, NodeError> {
            if self.down.lock().unwrap().contains(node) {
                return Err(NodeError::Unreachable {
                    node: node.into(),
                    error: "down".into(),
                });
            }
            let mut done = self.done.lock().unwrap();
            let replayed = done.contains(&request.request_id);
            if !replayed {
                done.push(request.request_id.clone());
            }
            Ok(v1::ApplyResponse {
                request_id: request.request_id,
                replayed,
                ..Default::default()
            })
        }

        async fn get_outcome(
            &self,
            node: &str,
            _address: &str,
            request_id: &str,
        ) -> Result<v1::GetOutcomeResponse, NodeError> {
            if self.down.lock().unwrap().contains(node) {
                return Err(NodeError::Unreachable {
                    node: node.into(),
                    error: "down".into(),
                });
            }
            let done = self.done.lock().unwrap().iter().any(|r| r == request_id);
            Ok(v1::GetOutcomeResponse {
                request_id: request_id.into(),
                outcome: if done {
                    v1::Outcome::Succeeded
                } else {
                    v1::Outcome::NotFound
                } as i32,
                response: None,
            })
        }
    }

    fn start(node: &str, name: &str, id: usize) -> Step {
        Step {
            id,
            wave: 0,
            node: node.into(),
            address: "fake".into(),
            action: NodeAction::StartVm { name: name.into() },
            depends_on: vec![],
        }
    }

    fn plan_of(steps: Vec<Step>) -> Plan {
        let mut plan: Plan = serde_json::from_value(serde_json::json!({
            "format_version": 2, "plan_id": "p1", "revision": "r", "observed_digest": "d",
            "summary": {"add": 0, "change": 0, "destroy": 0, "move": 0}, "changes": [],
            "steps": [], "waves": 1, "unreachable": {}, "left_alone": [], "unplaced": {},
            "placement": {"format_version": 1, "vms": [], "unplaced": [], "volumes": [], "nodes": [], "moves": []}
        }))
        .unwrap();
        plan.steps = steps;
        plan
    }

    fn store() -> (std::path::PathBuf, RedbStore) {
        let dir = std::env::temp_dir().join(format!("cairn-apply-{}", random_id()));
        let store = RedbStore::open(&dir.join("state.redb")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn the_same_plan_executed_twice_sends_new_request_ids_and_is_carried_out_twice() {
        let (dir, store) = store();
        let nodes = FakeNodes::default();
        let plan = plan_of(vec![start("n1", "a", 0), start("n2", "b", 1)]);
        for _ in 0..2 {
            let execution = new_execution_id(&plan.plan_id);
            let report = apply(
                &plan,
                &execution,
                &store,
                &nodes,
                &ApplyOptions::new(2),
                &Silent,
            )
            .await
            .unwrap();
            assert!(!report.failed());
            assert!(report.steps.iter().all(|s| !s.replayed), "{report:?}");
        }
        let done = nodes.done.lock().unwrap().clone();
        assert_eq!(done.len(), 4, "{done:?}");
        assert_eq!(done.iter().collect::<BTreeSet<_>>().len(), 4, "{done:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Answers after 20 ms and keeps, per node, the most requests it had in hand at once.
    #[derive(Clone, Default)]
    struct CountingNodes {
        now: Arc<Mutex<BTreeMap<String, usize>>>,
        most: Arc<Mutex<BTreeMap<String, usize>>>,
        total_now: Arc<Mutex<(usize, usize)>>,
    }

    impl NodeApi for CountingNodes {
        async fn observe(&self, _node: &DesiredNode) -> Result<NodeObservation, String> {
            Err("not used".into())
        }

        async fn apply(
            &self,
            node: &str,
            _address: &str,
            request: v1::ApplyRequest,
        ) -> Result<v1::ApplyResponse, NodeError> {
            {
                let mut now = self.now.lock().unwrap();
                let n = now.entry(node.to_owned()).or_default();
                *n += 1;
                let mut most = self.most.lock().unwrap();
                let m = most.entry(node.to_owned()).or_default();
                *m = (*m).max(*n);
                let mut total = self.total_now.lock().unwrap();
                total.0 += 1;
                total.1 = total.1.max(total.0);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            *self.now.lock().unwrap().get_mut(node).unwrap() -= 1;
            self.total_now.lock().unwrap().0 -= 1;
            Ok(v1::ApplyResponse {
                request_id: request.request_id,
                ..Default::default()
            })
        }

        async fn get_outcome(
            &self,
            _node: &str,
            _address: &str,
            _request_id: &str,
        ) -> Result<v1::GetOutcomeResponse, NodeError> {
            unreachable!("apply does not settle")
        }
    }

    /// Keeps every call: `apply` as one request, `apply_batch` as its requests;
    /// starting VM `broken` fails.
    #[derive(Clone, Default)]
    struct BatchingNodes {
        calls: Arc<Mutex<Vec<Call>>>,
    }

    /// A call's node and request ids.
    type Call = (String, Vec<String>);

    impl BatchingNodes {
        fn answer(request: &v1::ApplyRequest, node: &str) -> Result<v1::ApplyResponse, NodeError> {
            if let Some(v1::apply_request::Action::StartVm(start)) = &request.action
                && start.name == "broken"
            {
                return Err(NodeError::Refused {
                    node: node.into(),
                    code: tonic::Code::NotFound,
                    message: "no such VM".into(),
                });
            }
            Ok(v1::ApplyResponse {
                request_id: request.request_id.clone(),
                ..Default::default()
            })
        }
    }

    impl NodeApi for BatchingNodes {
        async fn observe(&self, _node: &DesiredNode) -> Result<NodeObservation, String> {
            Err("not used".into())
        }

        async fn apply(
            &self,
            node: &str,
            _address: &str,
            request: v1::ApplyRequest,
        ) -> Result<v1::ApplyResponse, NodeError> {
            let call = (node.to_owned(), vec![request.request_id.clone()]);
            self.calls.lock().unwrap().push(call);
            Self::answer(&request, node)
        }

        async fn apply_batch(
            &self,
            node: &str,
            _address: &str,
            requests: Vec<v1::ApplyRequest>,
        ) -> Vec<Result<v1::ApplyResponse, NodeError>> {
            let ids = requests.iter().map(|r| r.request_id.clone()).collect();
            self.calls.lock().unwrap().push((node.to_owned(), ids));
            requests.iter().map(|r| Self::answer(r, node)).collect()
        }

        async fn get_outcome(
            &self,
            _node: &str,
            _address: &str,
            _request_id: &str,
        ) -> Result<v1::GetOutcomeResponse, NodeError> {
            unreachable!("apply does not settle")
        }
    }

    /// A node's steps that go out together share one call, up to its room; an action
    /// the node forwards to other nodes (a volume's delete) goes alone; a request
    /// that fails in a batch fails its step only.
    #[tokio::test]
    async fn a_nodes_steps_sent_together_share_one_call_and_fail_alone() {
        let (dir, store) = store();
        let nodes = BatchingNodes::default();
        let mut steps: Vec<Step> = (0..6)
            .map(|i| start(if i < 5 { "n1" } else { "n2" }, &format!("vm{i}"), i))
            .collect();
        steps[2] = start("n1", "broken", 2);
        steps.push(Step {
            action: NodeAction::DeleteVolume { name: "old".into() },
            ..start("n1", "", 6)
        });
        let plan = plan_of(steps);
        let execution = new_execution_id(&plan.plan_id);
        let options = ApplyOptions {
            parallelism: 16,
            per_node: 4,
        };
        let report = apply(&plan, &execution, &store, &nodes, &options, &Silent)
            .await
            .unwrap();
        let calls = nodes.calls.lock().unwrap().clone();
        let id = |step: usize| request_id(&execution, step);
        // n1: steps 0-3 in one call (its room is 4), then 4 with the volume's delete
        // alone beside it; n2: its one step in an Apply.
        assert_eq!(calls[0], ("n1".into(), (0..4).map(id).collect::<Vec<_>>()));
        assert!(calls.contains(&("n2".into(), vec![id(5)])), "{calls:?}");
        assert!(calls.contains(&("n1".into(), vec![id(6)])), "{calls:?}");
        assert!(calls.contains(&("n1".into(), vec![id(4)])), "{calls:?}");
        assert_eq!(calls.len(), 4, "{calls:?}");
        let failed: Vec<usize> = report
            .steps
            .iter()
            .filter(|s| s.status != StepStatus::Succeeded)
            .map(|s| s.step)
            .collect();
        assert_eq!(failed, vec![2], "{}", report.text());
        let journal = store.journal_of(&execution).unwrap();
        assert_eq!(journal.len(), 7);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// With room for a step on every waiting node, the room is spread: a small
    /// cluster's nodes all get steps in the first round, none the whole room.
    #[tokio::test]
    async fn room_for_every_node_is_spread_over_the_nodes() {
        let (dir, store) = store();
        let nodes = BatchingNodes::default();
        let plan = plan_of(
            (0..12)
                .map(|i| start(&format!("n{}", i / 4), &format!("vm{i}"), i))
                .collect(),
        );
        let execution = new_execution_id(&plan.plan_id);
        let options = ApplyOptions {
            parallelism: 8,
            per_node: 8,
        };
        let report = apply(&plan, &execution, &store, &nodes, &options, &Silent)
            .await
            .unwrap();
        assert!(!report.failed(), "{}", report.text());
        let calls = nodes.calls.lock().unwrap().clone();
        let first: BTreeSet<&str> = calls[..3].iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(first, BTreeSet::from(["n0", "n1", "n2"]), "{calls:?}");
        // 8 of room over 3 nodes: 3, 3 and 2, each node's in one call.
        let sizes: Vec<usize> = calls[..3].iter().map(|(_, ids)| ids.len()).collect();
        assert_eq!(sizes, vec![3, 3, 2], "{calls:?}");
        assert_eq!(calls.iter().map(|(_, ids)| ids.len()).sum::<usize>(), 12);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_per_node_steps_are_in_flight_on_a_node_and_parallelism_over_all() {
        let (dir, store) = store();
        let nodes = CountingNodes::default();
        // 3 nodes, 20 steps each, in plan order node by node: the first node's steps
        // must not hold the other nodes back.
        let plan = plan_of(
            (0..60)
                .map(|i| start(&format!("n{}", i / 20), &format!("vm{i}"), i))
                .collect(),
        );
        let execution = new_execution_id(&plan.plan_id);
        let options = ApplyOptions {
            parallelism: 10,
            per_node: 4,
        };
        let report = apply(&plan, &execution, &store, &nodes, &options, &Silent)
            .await
            .unwrap();
        assert!(!report.failed(), "{}", report.text());
        assert_eq!(report.steps.len(), 60);
        let most = nodes.most.lock().unwrap().clone();
        assert_eq!(most.len(), 3, "{most:?}");
        // Never more than the limit on a node (each has 20 to do)...
        assert!(most.values().all(|m| *m <= 4), "{most:?}");
        // ... nor over all; and more than one node's worth at once (the first node's
        // queue does not hold the others back).
        let total = nodes.total_now.lock().unwrap().1;
        assert!(
            (5..=10).contains(&total),
            "at most 10 over all nodes: {total}"
        );
        // Every step journaled succeeded once.
        let journal = store.journal_of(&execution).unwrap();
        assert_eq!(journal.len(), 60);
        assert!(journal.iter().all(|r| r.status == StepStatus::Succeeded));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ready_serves_the_nodes_in_turn_within_their_limit() {
        let mut ready = Ready::new(2);
        for (i, node) in ["a", "a", "a", "b", "c", "c"].iter().enumerate() {
            ready.push(start(node, &format!("vm{i}"), i), 0);
        }
        let ids = |steps: Vec<(Step, u32)>| steps.iter().map(|(s, _)| s.id).collect::<Vec<_>>();
        // a, b, c in turn, each with as many as it has room for (and at most the
        // number asked); a's third waits for room.
        assert_eq!(ids(ready.pop_node(10)), vec![0, 1]);
        assert_eq!(ids(ready.pop_node(10)), vec![3]);
        assert_eq!(ids(ready.pop_node(1)), vec![4]);
        assert_eq!(ids(ready.pop_node(10)), vec![5]);
        assert!(ready.pop_node(10).is_empty());
        ready.done("a");
        assert_eq!(ids(ready.pop_node(10)), vec![2]);
        assert!(ready.pop_node(10).is_empty());
    }

    #[tokio::test]
    async fn settling_asks_the_nodes_and_never_sends_a_request_again() {
        let (dir, store) = store();
        let nodes = FakeNodes::default();
        let plan = plan_of(vec![
            start("n1", "a", 0),
            start("n1", "b", 1),
            start("n2", "c", 2),
        ]);
        let execution = new_execution_id(&plan.plan_id);
        store
            .start_execution(&PlanRecord {
                execution_id: execution.clone(),
                plan: serde_json::to_value(&plan).unwrap(),
                finished: false,
                ended: None,
                started_at_unix_ms: 1,
            })
            .unwrap();
        // The interrupted apply had three steps in flight: the node carried out
        // the first, never got the second, and the third's node is down now.
        for step in &plan.steps {
            store
                .journal(
                    &execution,
                    &StepRecord {
                        step: step.id,
                        request_id: request_id(&execution, step.id),
                        status: StepStatus::Started,
                        replayed: false,
                        attempts: 1,
                        error: None,
                        at_unix_ms: 1,
                    },
                )
                .unwrap();
        }
        nodes.done.lock().unwrap().push(request_id(&execution, 0));
        nodes.down.lock().unwrap().insert("n2".into());
        let settled = settle(&plan, &execution, &store, &nodes).await.unwrap();
        assert_eq!((settled.done, settled.not_done), (1, 1));
        assert_eq!(settled.unknown.len(), 1, "{:?}", settled.unknown);
        assert!(
            settled.unknown[0].contains("start_vm c@n2"),
            "{:?}",
            settled.unknown
        );
        let journal: Vec<StepStatus> = store
            .journal_of(&execution)
            .unwrap()
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(
            journal,
            vec![
                StepStatus::Succeeded,
                StepStatus::Abandoned,
                StepStatus::Started
            ]
        );
        // Settling asked; it sent nothing.
        assert_eq!(nodes.done.lock().unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
