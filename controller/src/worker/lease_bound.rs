//! Node calls bounded by the node's lease (issue 16).
//!
//! The worker does one unit of work at a time, so a step its apply waits on holds
//! every HA restart behind it. A node cut off while a step to it is in flight (a VM
//! restarted by HA whose new node is cut off before it answered) used to hold the
//! drift check for the call's 60 s timeout. [`LeaseBound`] is the node API the
//! worker applies and settles with: each `Apply` and `GetOutcome` to a node runs
//! until it is answered or until the controller declares that node `failed` (its
//! lease lapsed T + margin ago and its site no longer hears it), whichever comes
//! first; a call to a node already failed is not sent. An observation too (a drift
//! check woken by a node's broken Watch stream observed it until the 5 s timeout
//! while the node was declared failed meanwhile). Steps to other nodes run on
//! (the apply engine has them in flight side by side), so one lost node costs the
//! round at most T + margin after its last grant, not 60 s.
//!
//! An abandoned step is journaled `failed` with why, exactly as a step whose call
//! timed out: its request id is never sent again (the next execution has new ids),
//! and whatever the node did is seen by the next observation; the next drift check
//! (woken by the failure itself, `lease::watch_failures`) decides again with that
//! node failed. A start the cut-off node still carries out is harmless: its VMM
//! starts fenced with its node's quorum end and stops itself when that lapses.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::v1;
use reconciler::desired::DesiredNode;
use reconciler::nodes::{NodeApi, NodeError};
use reconciler::observe::NodeObservation;

use crate::Shared;

/// How often a call in flight looks at its node's lease.
const POLL: Duration = Duration::from_millis(50);

/// The nodes declared failed, with why: when that was read and how long the read took.
type FailedNodes = Option<(Instant, Duration, Arc<BTreeMap<String, String>>)>;

/// The controller's nodes, each call bounded by its node's lease.
#[derive(Debug, Clone)]
pub(crate) struct LeaseBound {
    shared: Arc<Shared>,
    /// The failed nodes as last read, shared by every clone (every call of one
    /// operation): [`LeaseBound::failed`].
    failed: Arc<Mutex<FailedNodes>>,
}

impl LeaseBound {
    pub(crate) fn new(shared: Arc<Shared>) -> LeaseBound {
        LeaseBound {
            shared,
            failed: Arc::default(),
        }
    }

    /// Why `node` is declared failed now (as of at most [`POLL`] ago), if it is.
    ///
    /// Every node's state is one pass over the cluster ([`crate::lease::Leases::rows`],
    /// 34 ms at 10,000 nodes with leases). That pass used to be made for each call and
    /// again every [`POLL`] for each call in flight (256 at once): at 1,000 simulated
    /// nodes it was most of the controller's CPU in an apply or an observation. Now
    /// every call of one operation shares one pass, made again when older than
    /// [`POLL`] or ten times what the last pass took (at most a tenth of a core).
    fn failed(&self, node: &str) -> Option<String> {
        let mut cache = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = cache
            .as_ref()
            .is_some_and(|(at, took, _)| at.elapsed() < POLL.max(*took * 10));
        if !fresh {
            let began = Instant::now();
            let good = self.shared.good.lock().expect("good lock").clone();
            let failed: BTreeMap<String, String> = good
                .map(|good| {
                    self.shared
                        .leases
                        .rows(&good.model)
                        .into_iter()
                        .filter(|row| row.state == "failed")
                        .map(|row| (row.node, row.reason))
                        .collect()
                })
                .unwrap_or_default();
            *cache = Some((Instant::now(), began.elapsed(), Arc::new(failed)));
        }
        cache
            .as_ref()
            .and_then(|(_, _, failed)| failed.get(node).cloned())
    }

    /// Resolves once `node` is declared failed, with why.
    async fn lost(&self, node: &str) -> String {
        loop {
            if let Some(reason) = self.failed(node) {
                return reason;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `call` to `node`, unless or until `node` is declared failed.
    async fn bounded<T>(
        &self,
        node: &str,
        what: &str,
        call: impl Future<Output = Result<T, NodeError>>,
    ) -> Result<T, NodeError> {
        let abandoned = |reason: String, when: &str| NodeError::Unreachable {
            node: node.to_owned(),
            error: format!(
                "{what} abandoned {when}: {node} is declared failed ({reason}); what it did is seen by the next observation, and the next drift check decides again"
            ),
        };
        if let Some(reason) = self.failed(node) {
            return Err(abandoned(reason, "before it was sent"));
        }
        tokio::select! {
            biased;
            answer = call => answer,
            reason = self.lost(node) => Err(abandoned(reason, "in flight")),
        }
    }
}

impl NodeApi for LeaseBound {
    async fn observe(&self, node: &DesiredNode) -> Result<NodeObservation, String> {
        tokio::select! {
            biased;
            answer = self.shared.nodes.observe(node) => answer,
            reason = self.lost(&node.name) => Err(format!(
                "observation abandoned: {} is declared failed ({reason})",
                node.name
            )),
        }
    }

    async fn apply(
        &self,
        node: &str,
        address: &str,
        request: v1::ApplyRequest,
    ) -> Result<v1::ApplyResponse, NodeError> {
        let what = format!("request {}", request.request_id);
        self.bounded(node, &what, self.shared.nodes.apply(node, address, request))
            .await
    }

    /// The batch is bounded as one call: abandoned, each request fails with why.
    async fn apply_batch(
        &self,
        node: &str,
        address: &str,
        requests: Vec<v1::ApplyRequest>,
    ) -> Vec<Result<v1::ApplyResponse, NodeError>> {
        let count = requests.len();
        let what = match requests.first() {
            Some(first) if count > 1 => format!(
                "the batch of {count} requests {} … {}",
                first.request_id,
                requests[count - 1].request_id
            ),
            Some(first) => format!("request {}", first.request_id),
            None => return vec![],
        };
        let call = async {
            Ok::<_, NodeError>(self.shared.nodes.apply_batch(node, address, requests).await)
        };
        match self.bounded(node, &what, call).await {
            Ok(answers) => answers,
            Err(error) => vec![Err(error); count],
        }
    }

    async fn get_outcome(
        &self,
        node: &str,
        address: &str,
        request_id: &str,
    ) -> Result<v1::GetOutcomeResponse, NodeError> {
        let what = format!("the outcome of {request_id}");
        self.bounded(
            node,
            &what,
            self.shared.nodes.get_outcome(node, address, request_id),
        )
        .await
    }
}
