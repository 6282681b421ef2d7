//! Controller replicas (issue 24): `cairn controller --state etcd://HOSTS/PREFIX`.
//!
//! Several controllers follow the same branch with the same `controller.key` and
//! share one state store in etcd (`state_etcd::EtcdStore`). One of them leads,
//! elected through an etcd lease (`state_etcd::Election`): only the leader syncs,
//! checks drift and calls nodes; its every store write is fenced by its token and
//! every node request carries it (`proto::fence`). The others serve the read-only
//! API (status, events, plans, the console) from the shared store and refuse the
//! writes (pause, resume, sync, approve, maintenance, signed actions) with the
//! leader's address.
//!
//! A new leader waits out one lease TTL before its first node call, then settles
//! the execution its predecessor left unfinished from the journal in etcd
//! (`reconciler::pipeline::settle_interrupted`: every step in flight is asked
//! about, never sent again) and plans afresh: no step is carried out twice.
//!
//! Node leases are shared too: each replica records the grants it gives in etcd and
//! sees everyone's (`state_etcd::NodeLeases`, used by `lease::Leases`), so a new
//! leader knows the grants its predecessor gave. What stays per replica: the event
//! log (`events.redb`: what this replica did), the volume epochs (`state.redb` in the
//! data directory: not yet in etcd) and held plans; the applied commit, the nodes in
//! maintenance and the pause are etcd's `controller/…` records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::fence::SharedFence;
use reconciler::desired::Placement;
use reconciler::state::{
    Applied, AuditEntry, LockInfo, PlanRecord, RedbStore, StateError, StateStore, StepRecord,
};
use state_etcd::{Election, EtcdStore, NodeLeases};

use crate::Shared;

/// The leader election's lease TTL (`CAIRN_ETCD_LEASE_TTL_S`, whole seconds, at least
/// 2; default 3).
pub fn lease_ttl() -> Duration {
    std::env::var("CAIRN_ETCD_LEASE_TTL_S")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(state_etcd::election::DEFAULT_TTL, |s| {
            Duration::from_secs(s.max(2))
        })
}

/// The shared store and this replica's side of the election.
#[derive(Debug)]
pub struct Replicas {
    /// The store, its writes fenced by the election.
    pub store: EtcdStore,
    /// The election.
    pub election: Arc<Election>,
    /// Every replica's node lease grants (issue 24 item 3).
    pub node_leases: Arc<NodeLeases>,
    /// This replica's HTTP URL (how followers name it, and who granted a lease).
    pub me: String,
}

impl Replicas {
    /// Connects to `url` and starts campaigning as `me` (this replica's HTTP URL);
    /// `fence` is the request signer's.
    pub fn start(url: &str, me: &str, fence: SharedFence) -> Result<Replicas, StateError> {
        let store = EtcdStore::open(url)?;
        let election = Election::start(&store, me, lease_ttl(), fence);
        let node_leases = NodeLeases::start(&store, Some(election.clone()));
        Ok(Replicas {
            store: store.with_election(election.clone()),
            election,
            node_leases,
            me: me.to_owned(),
        })
    }

    /// What `/api/v1/status` says of the election.
    pub fn status(&self) -> serde_json::Value {
        let status = self.election.status();
        serde_json::json!({
            "store": self.store.url(),
            "leading": status.leading,
            "fencing_token": status.token,
            "leader": status.leader,
            "terms": status.terms,
            "lease_ttl_ms": self.election.ttl().as_millis() as u64,
        })
    }
}

/// Whether `url` names an etcd store rather than a redb file.
pub fn is_etcd(state: &std::path::Path) -> bool {
    state.to_str().is_some_and(|s| s.starts_with("etcd://"))
}

/// Waits until this replica leads and may call nodes (at once without replicas), or
/// until `stop`. Logs when it starts waiting and when it takes over.
pub async fn wait_leader(shared: &Shared, stop: &mut tokio::sync::watch::Receiver<bool>) {
    let Some(replicas) = &shared.replicas else {
        return;
    };
    if replicas.election.ready() {
        return;
    }
    let waiting = Instant::now();
    let mut said = false;
    while !replicas.election.ready() {
        if *stop.borrow() {
            return;
        }
        if !said && replicas.election.won_at().is_none() {
            eprintln!(
                "cairn controller: follower of {}; serving the read-only API",
                replicas
                    .election
                    .status()
                    .leader
                    .unwrap_or_else(|| "no leader yet".to_owned())
            );
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.changed() => {}
        }
    }
    eprintln!(
        "cairn controller: leading (fencing token {}) after {} ms; settling and syncing",
        replicas.election.status().token,
        waiting.elapsed().as_millis()
    );
}

/// Why a write must go to the leader, when this replica is a follower.
pub fn refusal(shared: &Shared) -> Option<String> {
    let replicas = shared.replicas.as_ref()?;
    if replicas.election.acting_token().is_ok() {
        return None;
    }
    Some(format!(
        "this controller is a follower: changes go to the leader ({})",
        replicas
            .election
            .status()
            .leader
            .unwrap_or_else(|| "none elected yet; try again in a few seconds".to_owned())
    ))
}

/// The controller's state store: the shared etcd store with replicas, else the redb
/// file. It dereferences to the data directory's redb store, which keeps the volume
/// epochs in both cases (`reconciler::epochs` is redb only so far).
#[derive(Debug)]
pub struct ControllerStore {
    local: RedbStore,
    shared: Option<EtcdStore>,
}

impl ControllerStore {
    /// The store of `shared`'s configuration, its audit log signed with `identity`.
    pub(crate) fn open(
        local: RedbStore,
        replicas: Option<&Replicas>,
        identity: &proto::auth::Identity,
        head: proto::anchor::SharedHead,
    ) -> Result<ControllerStore, StateError> {
        let shared = match replicas {
            Some(r) => Some(r.store.clone().with_audit_key(identity.clone(), head)?),
            None => None,
        };
        Ok(ControllerStore { local, shared })
    }
}

impl std::ops::Deref for ControllerStore {
    type Target = RedbStore;

    fn deref(&self) -> &RedbStore {
        &self.local
    }
}

/// Calls the method on the etcd store when there is one, else on the redb store.
macro_rules! delegate {
    ($( fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        impl StateStore for ControllerStore {
            $(
                fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match &self.shared {
                        Some(store) => store.$name($($arg),*),
                        None => self.local.$name($($arg),*),
                    }
                }
            )*
        }
    };
}

delegate! {
    fn placement(&self) -> Result<Option<Placement>, StateError>;
    fn set_placement(&self, placement: &Placement) -> Result<(), StateError>;
    fn protected_volumes(&self) -> Result<std::collections::BTreeSet<String>, StateError>;
    fn set_protected_volumes(&self, volumes: &std::collections::BTreeSet<String>) -> Result<(), StateError>;
    fn applied(&self) -> Result<Option<Applied>, StateError>;
    fn set_applied(&self, applied: &Applied) -> Result<(), StateError>;
    fn lock_holder(&self) -> Result<Option<LockInfo>, StateError>;
    fn lock(&self, command: &str) -> Result<(LockInfo, Option<LockInfo>), StateError>;
    fn unlock(&self, id: &str) -> Result<(), StateError>;
    fn start_execution(&self, record: &PlanRecord) -> Result<(), StateError>;
    fn unfinished_executions(&self) -> Result<Vec<(String, PlanRecord)>, StateError>;
    fn executions(&self) -> Result<Vec<(String, PlanRecord)>, StateError>;
    fn finish_execution(&self, execution_id: &str, ended: Option<String>) -> Result<(), StateError>;
    fn journal(&self, execution_id: &str, record: &StepRecord) -> Result<(), StateError>;
    fn journal_many(&self, execution_id: &str, records: &[StepRecord]) -> Result<(), StateError>;
    fn journal_of(&self, execution_id: &str) -> Result<Vec<StepRecord>, StateError>;
    fn audit(&self, event: &str, detail: serde_json::Value) -> Result<(), StateError>;
    fn audit_log(&self) -> Result<Vec<AuditEntry>, StateError>;
}
