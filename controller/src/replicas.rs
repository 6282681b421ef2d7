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
//! A new leader waits until its predecessor has certainly stopped before its first
//! node call (a margin once it knows the predecessor's lease is gone, one lease TTL
//! from a cold start: `state_etcd::election`), then settles
//! the execution its predecessor left unfinished from the journal in etcd
//! (`reconciler::pipeline::settle_interrupted`: every step in flight is asked
//! about, never sent again) and plans afresh: no step is carried out twice.
//!
//! Node leases are shared too: each replica records the grants it gives in etcd and
//! sees everyone's (`state_etcd::NodeLeases`, used by `lease::Leases`), so a new
//! leader knows the grants its predecessor gave. The volume epochs are in etcd too
//! ([`ControllerStore::epoch_store`]). What stays per replica: the event log
//! (`events.redb`: what this replica did) and held plans; the applied commit, the
//! nodes in maintenance and the pause are etcd's `controller/…` records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::fence::SharedFence;
use reconciler::desired::Placement;
use reconciler::epochs::{EpochChange, EpochStore, Swapped, VolumeEpoch};
use reconciler::state::{
    Applied, AuditEntry, LockInfo, PlanRecord, RedbStore, StateError, StateStore, StepRecord,
};
use state_etcd::{Election, EtcdStore, NodeLeases};

use crate::Shared;
use crate::gate::HeldPlan;

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

/// The etcd record (`PREFIX/controller/held`) of the plan held for approval.
const HELD: &str = "held";

/// The plan held for approval (`GET /api/v1/plans`, the approval's check, the
/// console). A follower reads the leader's from etcd (its own is not kept); the
/// leader and a single controller answer from `Shared::held`.
pub fn held_plan(shared: &Shared) -> Option<HeldPlan> {
    held_in(shared.replicas.as_ref(), &shared.held)
}

/// Holds `plan` for approval (or none): kept in `Shared::held` and, with replicas,
/// written to etcd (fenced: only the leader's lands) when it changed, so that every
/// replica shows it and a new leader takes it over.
pub fn set_held_plan(shared: &Shared, plan: Option<HeldPlan>) {
    set_held_in(shared.replicas.as_ref(), &shared.held, plan);
}

/// With replicas, at the top of every round as leader: the held plan recorded in
/// etcd (a new leader holds its predecessor's plan at once, so `cairn sync
/// --approve ID` reaches it before its first sync holds the head again).
pub fn follow_shared_held(shared: &Shared) {
    follow_held_in(shared.replicas.as_ref(), &shared.held);
}

/// The etcd record (`PREFIX/controller/last_sync`) of the leader's last sync.
const LAST_SYNC: &str = "last_sync";

/// What the controller shows of itself (`controller` in `/api/v1/status`, the
/// console): a follower shows the leader's last sync from etcd, not its own (it
/// syncs nothing, or synced when it led before).
pub fn view(shared: &Shared) -> crate::View {
    let mut view = shared.view.lock().expect("view lock").clone();
    if let Some(replicas) = &shared.replicas
        && replicas.election.acting_token().is_err()
    {
        match replicas
            .store
            .controller_record::<crate::events::LastSync>(LAST_SYNC)
        {
            Ok(Some(last)) => view.last_sync = Some(last),
            Ok(None) => {}
            Err(e) => eprintln!("cairn controller: the shared last sync: {e}"),
        }
    }
    view
}

/// With replicas, the leader records each sync's summary in etcd (fenced).
pub fn record_last_sync(shared: &Shared, last: &crate::events::LastSync) {
    if let Some(replicas) = &shared.replicas
        && let Err(e) = replicas.store.set_controller_record(LAST_SYNC, last)
    {
        eprintln!("cairn controller: cannot record the last sync in the shared store: {e}");
    }
}

type HeldSlot = std::sync::Mutex<Option<HeldPlan>>;

fn held_in(replicas: Option<&Replicas>, local: &HeldSlot) -> Option<HeldPlan> {
    if let Some(replicas) = replicas
        && replicas.election.acting_token().is_err()
    {
        match replicas.store.controller_record::<Option<HeldPlan>>(HELD) {
            Ok(held) => return held.flatten(),
            Err(e) => eprintln!("cairn controller: the shared held plan: {e}"),
        }
    }
    local.lock().expect("held lock").clone()
}

fn set_held_in(replicas: Option<&Replicas>, local: &HeldSlot, plan: Option<HeldPlan>) {
    let mut held = local.lock().expect("held lock");
    if *held == plan {
        return;
    }
    if let Some(replicas) = replicas
        && let Err(e) = replicas.store.set_controller_record(HELD, &plan)
    {
        eprintln!("cairn controller: cannot record the held plan in the shared store: {e}");
    }
    *held = plan;
}

fn follow_held_in(replicas: Option<&Replicas>, local: &HeldSlot) {
    let Some(replicas) = replicas else {
        return;
    };
    match replicas.store.controller_record::<Option<HeldPlan>>(HELD) {
        Ok(recorded) => *local.lock().expect("held lock") = recorded.flatten(),
        Err(e) => eprintln!("cairn controller: the shared held plan: {e}"),
    }
}

/// The controller's state store: the shared etcd store with replicas, else the redb
/// file. The volume epochs (`reconciler::epochs::EpochStore`) are where the rest is:
/// in etcd with replicas, so a new leader holds every epoch its predecessor raised.
/// It dereferences to the data directory's redb store.
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

impl ControllerStore {
    /// Where the volume epochs are: etcd with replicas, else the redb file.
    pub fn epoch_store(&self) -> &dyn EpochStore {
        match &self.shared {
            Some(store) => store,
            None => &self.local,
        }
    }
}

impl ControllerStore {
    /// Where node enrollment tokens and enrolled keys are: etcd with replicas, else
    /// the redb file (`crate::enroll`).
    pub fn enrollment_store(&self) -> &dyn reconciler::enroll::EnrollmentStore {
        match &self.shared {
            Some(store) => store,
            None => &self.local,
        }
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
            // The volumes' epochs: in etcd with replicas, else the redb file.
            fn epoch_authority(&self) -> Option<reconciler::epochs::EpochAuthority<'_>> {
                Some(reconciler::epochs::EpochAuthority::new(self.epoch_store()))
            }

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
    fn commit_migration(&self, record: &reconciler::migrate::MigrationRecord, epochs: &[EpochChange]) -> Result<reconciler::migrate::Committed, StateError>;
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
    fn last_execution(&self) -> Result<Option<(String, PlanRecord)>, StateError>;
    fn last_execution_summary(&self) -> Result<Option<reconciler::state::ExecutionSummary>, StateError>;
    fn finish_execution(&self, execution_id: &str, ended: Option<String>) -> Result<(), StateError>;
    fn journal(&self, execution_id: &str, record: &StepRecord) -> Result<(), StateError>;
    fn journal_many(&self, execution_id: &str, records: &[StepRecord]) -> Result<(), StateError>;
    fn journal_of(&self, execution_id: &str) -> Result<Vec<StepRecord>, StateError>;
    fn audit(&self, event: &str, detail: serde_json::Value) -> Result<(), StateError>;
    fn audit_log(&self) -> Result<Vec<AuditEntry>, StateError>;
    fn recent_audit(&self, n: usize) -> Result<Vec<AuditEntry>, StateError>;
    fn migrations(&self) -> Result<Vec<reconciler::migrate::MigrationRecord>, StateError>;
}

impl EpochStore for ControllerStore {
    fn epoch_store_name(&self) -> String {
        self.epoch_store().epoch_store_name()
    }

    fn epoch(&self, volume: &str) -> Result<Option<VolumeEpoch>, StateError> {
        self.epoch_store().epoch(volume)
    }

    fn epochs(&self) -> Result<Vec<VolumeEpoch>, StateError> {
        self.epoch_store().epochs()
    }

    fn epoch_journal(&self, volume: &str) -> Result<Vec<EpochChange>, StateError> {
        self.epoch_store().epoch_journal(volume)
    }

    fn swap_epoch(
        &self,
        expected: Option<u64>,
        change: &EpochChange,
    ) -> Result<Swapped, StateError> {
        self.epoch_store().swap_epoch(expected, change)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::BufRead;
    use std::time::{Duration, Instant};

    use reconciler::epochs::{EpochAuthority, EpochError};

    use super::*;

    const CHILD: &str = "CAIRN_TEST_EPOCH_LEADER";
    const CHILD_DIR: &str = "CAIRN_TEST_EPOCH_LEADER_DIR";
    const NAME: &str = "replicas::tests::the_epochs_and_the_held_plan_a_leader_recorded_are_the_next_leaders_after_a_kill_9";

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A replica as the controller makes it: its epochs in etcd when replicated.
    fn replica(url: &str, me: &str, dir: &std::path::Path) -> (Replicas, ControllerStore) {
        let replicas = Replicas::start(url, me, SharedFence::default()).unwrap();
        let local =
            RedbStore::open(&dir.join(format!("{}.redb", me.replace(['/', ':'], "_")))).unwrap();
        let store = ControllerStore {
            local,
            shared: Some(replicas.store.clone()),
        };
        (replicas, store)
    }

    fn plan() -> HeldPlan {
        HeldPlan {
            plan_id: "p-1234".to_owned(),
            commit: "c0ffee".repeat(6),
            at: "2026-12-03T00:00:00.000Z".to_owned(),
            holds: vec![crate::gate::Hold {
                kind: "auto-apply",
                reason: "auto-apply is off".to_owned(),
            }],
            destructive: vec!["delete vm web-1 on lab-1".to_owned()],
            summary: Default::default(),
            steps: 3,
        }
    }

    /// The held plan recorded in etcd, as any replica reads it.
    fn recorded(replicas: &Replicas) -> Option<HeldPlan> {
        replicas
            .store
            .controller_record::<Option<HeldPlan>>(HELD)
            .unwrap()
            .flatten()
    }

    fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !f() {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `f` as the leader: waits until this replica leads, and again after a term
    /// that lapsed meanwhile (under load a keepalive can go unanswered for a TTL; the
    /// write is then refused before it is sent, or by etcd's fencing compare).
    fn as_leader<T>(replicas: &Replicas, mut f: impl FnMut() -> Result<T, EpochError>) -> T {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            wait("this replica leads", Duration::from_secs(90), || {
                replicas.election.acting_token().is_ok()
            });
            match f() {
                Err(EpochError::State(StateError::Fenced { why, .. })) => {
                    assert!(Instant::now() < deadline, "fenced until the end: {why}");
                    eprintln!("fenced ({why}); again with the next term");
                }
                other => return other.unwrap(),
            }
        }
    }

    /// The first leader, in a process of its own (this test binary run again): it
    /// leads, raises the volume's epoch twice, says so, and waits to be killed.
    fn leader_child(url: &str) {
        // Under the test's directory, which the test removes (this process is killed).
        let dir = std::path::PathBuf::from(std::env::var_os(CHILD_DIR).unwrap());
        let (replicas, store) = replica(url, "http://127.0.0.36:1", &dir);
        let authority = EpochAuthority::new(store.epoch_store());
        let abc = names(&["a", "b", "c"]);
        // Each step only if not done yet, so a term that lapsed between two is resumed.
        let moved = as_leader(&replicas, || {
            let state = match authority.get("vol")? {
                Some(state) => state,
                None => authority.adopt("vol", "a", &abc, &abc, 0, "first seen")?,
            };
            if state.epoch > 1 {
                return Ok(state);
            }
            authority.fail_over("vol", state.epoch, &names(&["a"]), "b", "node a failed")
        });
        // A plan held for approval, recorded as the worker does.
        let slot = std::sync::Mutex::new(None);
        as_leader(&replicas, || {
            set_held_in(Some(&replicas), &slot, Some(plan()));
            if recorded(&replicas) == Some(plan()) {
                return Ok(());
            }
            // Not written (the term lapsed): the next term writes it again.
            *slot.lock().unwrap() = None;
            Err(EpochError::State(StateError::Fenced {
                url: url.to_owned(),
                why: "the held plan was not recorded".to_owned(),
            }))
        });
        println!(
            "EPOCH {} TOKEN {}",
            moved.epoch,
            replicas.election.status().token
        );
        // Nothing in the local file: a successor could not read it.
        assert!(store.local.epoch("vol").unwrap().is_none());
        std::thread::sleep(Duration::from_secs(120));
        std::process::exit(1);
    }

    /// Kills the first leader if the test ends early.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn the_epochs_and_the_held_plan_a_leader_recorded_are_the_next_leaders_after_a_kill_9() {
        if let Ok(url) = std::env::var(CHILD) {
            return leader_child(&url);
        }
        if let Err(why) = state_etcd::testing::binary() {
            eprintln!("skipped: {why}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("cairn-replica-epochs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let etcd = state_etcd::testing::Etcd::start("127.0.0.35", 23804, &dir).expect("etcd");
        let url = etcd.url("epochs");
        let mut child = Child(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, &url)
                .env(CHILD_DIR, &dir)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // Its line, read on a thread so a silent child fails the test on time.
        let stdout = child.0.stdout.take().unwrap();
        let (lines, said) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                // After the harness's "test NAME ... " on the same line.
                if let Some(at) = line.find("EPOCH ") {
                    let _ = lines.send(line[at + "EPOCH ".len()..].to_owned());
                }
            }
        });
        let line = said
            .recv_timeout(Duration::from_secs(90))
            .expect("the first leader raised the epoch");
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (epoch, first_token): (u64, i64) =
            (parts[0].parse().unwrap(), parts[2].parse().unwrap());
        assert_eq!(epoch, 2);

        // A second replica, a follower while the first lives, reads the epoch there.
        let (replicas, store) = replica(&url, "http://127.0.0.37:1", &dir);
        let authority = EpochAuthority::new(store.epoch_store());
        let held = authority.get("vol").unwrap().unwrap();
        assert_eq!((held.epoch, held.writer.as_str()), (2, "b"));
        assert_eq!(held.in_sync, names(&["b", "c"]));
        assert!(store.local.epoch("vol").unwrap().is_none());
        // And the held plan: a follower shows the leader's.
        let slot = std::sync::Mutex::new(None);
        assert_eq!(held_in(Some(&replicas), &slot), Some(plan()));

        // kill -9 of the leader; the follower leads once its lease lapsed.
        let killed = Instant::now();
        // SAFETY: kill(2) of the child this test spawned.
        assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGKILL) }, 0);
        let _ = child.0.wait();
        wait("the second replica leads", Duration::from_secs(60), || {
            replicas.election.acting_token().is_ok()
        });
        let token = replicas.election.status().token;
        assert!(token > first_token, "token {token} after {first_token}");
        eprintln!(
            "the second replica leads {} ms after the kill -9 (token {token})",
            killed.elapsed().as_millis()
        );

        // The new leader holds the epoch its predecessor set, with its journal, and
        // carries on from it; a change from an older epoch is refused.
        let held = authority.get("vol").unwrap().unwrap();
        assert_eq!((held.epoch, held.writer.as_str()), (2, "b"));
        let conflict = authority.raise_epoch("vol", 1, "stale").unwrap_err();
        assert!(
            matches!(
                conflict,
                EpochError::Conflict {
                    expected: 1,
                    found: 2,
                    ..
                }
            ),
            "{conflict}"
        );
        let back = as_leader(&replicas, || {
            authority.add_copy("vol", 2, "a", "a caught up")
        });
        assert_eq!(back.epoch, 3);
        // The plan held by the killed leader is this one's at the top of its round:
        // `cairn sync --approve p-1234` finds it here.
        follow_held_in(Some(&replicas), &slot);
        assert_eq!(held_in(Some(&replicas), &slot), Some(plan()));
        // Released (a new commit, or carried out): no replica shows it any more.
        as_leader(&replicas, || {
            set_held_in(Some(&replicas), &slot, None);
            if recorded(&replicas).is_none() {
                return Ok(());
            }
            *slot.lock().unwrap() = Some(plan());
            Err(EpochError::State(StateError::Fenced {
                url: url.clone(),
                why: "the release was not recorded".to_owned(),
            }))
        });
        let changes: Vec<String> = authority
            .journal("vol")
            .unwrap()
            .into_iter()
            .map(|c| c.change)
            .collect();
        assert_eq!(
            changes,
            ["adopted", "writer a → b, removed copy a", "added copy a"]
        );
        drop(replicas);
        drop(etcd);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
