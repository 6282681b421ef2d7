//! The election of one leader among controller replicas, through an etcd lease.
//!
//! A replica that finds the election key (`PREFIX/election`) absent grants itself a
//! lease of TTL seconds and, in one transaction, creates the key on that lease if it
//! is still absent. The winner's fencing token is the key's create revision (etcd
//! revisions only grow; lease ids do not). It renews the lease every TTL/3 and counts
//! its leadership from each keepalive's SEND time plus the TTL etcd granted: the
//! lease cannot expire at etcd before that, so the leader always stops first
//! ([`proto::fence::SharedFence`], checked before every node request and every
//! store write). A keepalive that fails or is not answered before that time ends the
//! leadership: the token stays (so the signer refuses), the lease is revoked
//! (the key, and the apply lock on the lease, go at once) and the replica campaigns
//! again. The others poll the key every TTL/10; the first to find it gone wins.
//!
//! A new leader waits before its first node call (`not_before`) until the previous
//! leader has certainly stopped acting: a node it could still reach has by then either
//! seen it stop by its own timer, or the new leader's higher token first. How long
//! depends on what the new leader knows of the previous term's lease:
//! - The winning transaction also records the winner's lease id (`PREFIX/election_lease`,
//!   not on a lease). A follower remembers the lease of the election key it last saw
//!   (`kv.lease()`). When it finds the key gone and the record still names that lease,
//!   it asks etcd for the lease's time to live, and campaigns with a compare on the
//!   record's mod revision (no other term began since it looked).
//! - The lease no longer exists (TTL -1: expired or revoked): the previous leader
//!   stopped before etcd let the lease go (its timer counts from its keepalive's send,
//!   etcd's from the receipt; it revokes only after it stopped), so the new leader
//!   waits a margin only, `max(TTL/10, 100 ms)`: for clock rates and a request
//!   signed just before the old timer ran out and still on its way.
//! - The lease lives (the key was deleted by hand): its remaining TTL (etcd says whole
//!   seconds, the lease ends in under TTL + 1 s) plus the margin, from etcd's answer.
//! - Anything else (a cold start: no key seen, no record, another term's record, or
//!   etcd did not answer the question): one full TTL after winning, as before.
//!
//! The token nodes see is the create revision plus the store's token base
//! (`PREFIX/meta/token_base`, absent: 0). A restore into a new etcd
//! ([`crate::backup`]) starts its revisions low again; it sets the base above every
//! token the backed-up cluster could have issued, so the nodes, which refuse a token
//! lower than the highest they have seen, accept the restored control plane's leader.
//! etcd's own compares use the revision ([`Election::revision_of`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use proto::fence::{FenceState, SharedFence};

use crate::store::EtcdStore;

/// The default lease TTL of the election.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

/// The key (under the prefix) that names the lease of the last term that began: the
/// winning transaction writes it beside the election key.
pub(crate) const LEASE_RECORD: &str = "election_lease";

/// What a replica knows of the election.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// This replica leads (and may act now: its timer has not lapsed).
    pub leading: bool,
    /// The fencing token of this replica's leadership (0: it never led).
    pub token: i64,
    /// Who leads, as the leader named itself (its HTTP URL), when known.
    pub leader: Option<String>,
    /// How many times this replica won.
    pub terms: u64,
}

#[derive(Debug, Default)]
struct Inner {
    lease: Option<i64>,
    leader: Option<String>,
    terms: u64,
    won_at: Option<Instant>,
    /// How long after winning this term's first node call waits, and why.
    first_call: Option<(Duration, &'static str)>,
    /// The token base read when the current term began.
    base: u64,
}

/// What a replica that found the election key gone knows of the previous term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Previous {
    /// Not enough to shorten the wait: one full TTL.
    Unknown,
    /// Its lease no longer exists at etcd (expired or revoked).
    Gone,
    /// Its lease lives (its key was deleted by hand): it ends before this instant.
    LivesUntil(Instant),
}

/// One replica's side of the election.
#[derive(Debug)]
pub struct Election {
    key: String,
    record: String,
    me: String,
    ttl: Duration,
    fence: SharedFence,
    inner: Mutex<Inner>,
}

impl Election {
    /// Starts campaigning on `store`'s runtime as `me` (how followers name the leader:
    /// its HTTP URL). `fence` is shared with the request signer.
    pub fn start(
        store: &EtcdStore,
        me: impl Into<String>,
        ttl: Duration,
        fence: SharedFence,
    ) -> Arc<Election> {
        let election = Arc::new(Election {
            key: store.target().key("election"),
            record: store.target().key(LEASE_RECORD),
            me: me.into(),
            ttl: ttl.max(Duration::from_secs(2)),
            fence,
            inner: Mutex::new(Inner::default()),
        });
        let client = store.client();
        let running = election.clone();
        store.spawn(async move { running.run(client).await });
        election
    }

    /// The election key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The fence this election sets.
    pub fn fence(&self) -> &SharedFence {
        &self.fence
    }

    /// The election key's create revision that `token` (as given to nodes) stands for.
    pub fn revision_of(&self, token: i64) -> i64 {
        token - self.inner().base as i64
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leader's lease, while this replica leads.
    pub fn lease(&self) -> Option<i64> {
        self.inner().lease
    }

    /// The fencing token while this replica may act (its timer has not lapsed), else
    /// why not.
    pub fn acting_token(&self) -> Result<i64, String> {
        let state = self.fence.get();
        if state.token == 0 {
            return Err(format!(
                "this controller is not the leader{}",
                self.inner()
                    .leader
                    .as_ref()
                    .map(|l| format!(" ({l} leads)"))
                    .unwrap_or_default()
            ));
        }
        match state.acting_until {
            Some(until) if Instant::now() < until => Ok(state.token as i64),
            _ => Err(format!(
                "this controller's leadership (fencing token {}) has lapsed",
                state.token
            )),
        }
    }

    /// What this replica knows.
    pub fn status(&self) -> Status {
        let leading = self.acting_token().is_ok();
        let inner = self.inner();
        Status {
            leading,
            token: self.fence.get().token as i64,
            leader: inner.leader.clone(),
            terms: inner.terms,
        }
    }

    /// Whether this replica may call nodes now: it leads, its timer holds, and it
    /// waited out the TTL since it won.
    pub fn ready(&self) -> bool {
        matches!(self.fence.check(Instant::now()), Ok(Some(_)))
    }

    /// Waits until [`Election::ready`].
    pub async fn wait_ready(&self) {
        while !self.ready() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// When this replica last won, if it leads.
    pub fn won_at(&self) -> Option<Instant> {
        self.inner().won_at
    }

    /// How long after winning its last term this replica waited (or waits) before its
    /// first node call: one TTL, the previous lease's remaining time plus the margin,
    /// or the margin alone (see the module's doc).
    pub fn first_call_wait(&self) -> Option<Duration> {
        self.inner().first_call.map(|(wait, _)| wait)
    }

    /// The wait after the previous leader's lease is known gone: for clock rates and a
    /// request the previous leader signed just before its timer ran out.
    pub fn margin(&self) -> Duration {
        (self.ttl / 10).max(Duration::from_millis(100))
    }

    /// A store write found another controller's key: this replica is deposed.
    pub(crate) fn deposed(&self, token: i64) {
        let mut state = self.fence.get();
        if state.token as i64 == token {
            state.acting_until = None;
            self.fence.set(state);
        }
    }

    async fn run(self: Arc<Self>, client: Client) {
        loop {
            if let Err(e) = self.term(client.clone()).await {
                eprintln!("cairn controller: election: {e}");
                tokio::time::sleep(self.poll()).await;
            }
        }
    }

    fn poll(&self) -> Duration {
        (self.ttl / 10).max(Duration::from_millis(100))
    }

    /// Waits for the key to be free, campaigns once, and leads until the lease is lost.
    async fn term(&self, mut client: Client) -> Result<(), etcd_client::Error> {
        // The lease of the election key this replica saw last (None: none seen, or
        // the key was on no lease).
        let mut seen = None;
        loop {
            let current = client.get(self.key.as_str(), None).await?;
            match current.kvs().first() {
                Some(kv) => {
                    self.inner().leader = Some(String::from_utf8_lossy(kv.value()).into_owned());
                    seen = Some(kv.lease()).filter(|lease| *lease != 0);
                    tokio::time::sleep(self.poll()).await;
                }
                None => break,
            }
        }
        let (previous, recorded) = self.previous_term(&mut client, seen).await?;
        let base = token_base(&mut client, &self.key).await?;
        let sent = Instant::now();
        let lease = client.lease_grant(self.ttl.as_secs() as i64, None).await?;
        let granted = Duration::from_secs(lease.ttl().max(0) as u64);
        let txn = Txn::new()
            .when([
                Compare::create_revision(self.key.as_str(), CompareOp::Equal, 0),
                // No other term began since the record was read (absent: 0).
                Compare::mod_revision(self.record.as_str(), CompareOp::Equal, recorded),
            ])
            .and_then([
                TxnOp::put(
                    self.key.as_str(),
                    self.me.as_str(),
                    Some(PutOptions::new().with_lease(lease.id())),
                ),
                TxnOp::put(self.record.as_str(), lease.id().to_string(), None),
            ]);
        let won = client.txn(txn).await?;
        if !won.succeeded() {
            let _ = client.lease_revoke(lease.id()).await;
            return Ok(());
        }
        let revision = won.header().map_or(0, |h| h.revision());
        let token = revision + base as i64;
        let now = Instant::now();
        let (not_before, why) = match previous {
            Previous::Gone => (now + self.margin(), "the previous leader's lease is gone"),
            Previous::LivesUntil(end) => (
                (end + self.margin()).max(now + self.margin()),
                "the previous leader's lease lives on",
            ),
            Previous::Unknown => (now + granted, "one lease TTL: no previous lease known"),
        };
        let wait = not_before - now;
        {
            let mut inner = self.inner();
            inner.base = base;
            inner.lease = Some(lease.id());
            inner.leader = Some(self.me.clone());
            inner.terms += 1;
            inner.won_at = Some(now);
            inner.first_call = Some((wait, why));
        }
        self.fence.set(FenceState {
            token: token as u64,
            acting_until: Some(sent + granted),
            not_before: Some(not_before),
        });
        eprintln!(
            "cairn controller: elected leader (fencing token {token}, lease TTL {} s); first node call in {} ms ({why})",
            granted.as_secs(),
            wait.as_millis()
        );
        let why = self.lead(&mut client, lease.id()).await;
        let mut state = self.fence.get();
        state.acting_until = None;
        self.fence.set(state);
        self.inner().lease = None;
        eprintln!("cairn controller: lost leadership (fencing token {token}): {why}");
        let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease.id())).await;
        Ok(())
    }

    /// What this replica knows of the previous term, having found the election key
    /// gone after it last saw it on lease `seen`; and the record's mod revision (0:
    /// none), which the campaign compares.
    async fn previous_term(
        &self,
        client: &mut Client,
        seen: Option<i64>,
    ) -> Result<(Previous, i64), etcd_client::Error> {
        let record = client.get(self.record.as_str(), None).await?;
        let (recorded, revision) = record.kvs().first().map_or((None, 0), |kv| {
            (
                std::str::from_utf8(kv.value())
                    .ok()
                    .and_then(|v| v.trim().parse::<i64>().ok()),
                kv.mod_revision(),
            )
        });
        let Some(lease) = seen.filter(|seen| recorded == Some(*seen)) else {
            return Ok((Previous::Unknown, revision));
        };
        let previous = match client.lease_time_to_live(lease, None).await {
            // etcd answers -1 for a lease it no longer has.
            Ok(answer) if answer.ttl() < 0 => Previous::Gone,
            // Whole seconds: the lease ends in under TTL + 1 s from the answer.
            Ok(answer) => {
                Previous::LivesUntil(Instant::now() + Duration::from_secs(answer.ttl() as u64 + 1))
            }
            Err(e) if e.to_string().contains("requested lease not found") => Previous::Gone,
            Err(e) => {
                eprintln!(
                    "cairn controller: election: the previous leader's lease {lease:x}: {e}; a full TTL before the first node call"
                );
                Previous::Unknown
            }
        };
        Ok((previous, revision))
    }

    /// Renews the lease every TTL/3 until it is lost; returns why.
    async fn lead(&self, client: &mut Client, lease: i64) -> String {
        let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) => return format!("keepalive stream: {e}"),
        };
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            let state = self.fence.get();
            let Some(until) = state.acting_until else {
                return "a store write found another leader's key".to_owned();
            };
            let sent = Instant::now();
            if sent >= until {
                return "the lease TTL passed since the last answered keepalive".to_owned();
            }
            let answer = tokio::time::timeout(until - sent, async {
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
            match answer {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {
                    // The key itself must still be this term's (deleted by hand, or
                    // this replica's lease outlived it): else another may lead.
                    match client.get(self.key.as_str(), None).await {
                        Ok(current)
                            if current.kvs().first().map(|kv| kv.create_revision())
                                == Some(self.revision_of(state.token as i64)) => {}
                        Ok(_) => return "the election key is no longer this term's".to_owned(),
                        Err(e) => return format!("reading the election key: {e}"),
                    }
                    let mut state = self.fence.get();
                    if state.acting_until.is_none() {
                        return "a store write found another leader's key".to_owned();
                    }
                    state.acting_until = Some(sent + Duration::from_secs(response.ttl() as u64));
                    self.fence.set(state);
                }
                Ok(Ok(Some(_))) => return "etcd says the lease expired".to_owned(),
                Ok(Ok(None)) => return "the keepalive stream ended".to_owned(),
                Ok(Err(e)) => return format!("keepalive: {e}"),
                Err(_) => return "no keepalive answered within the lease TTL".to_owned(),
            }
        }
    }
}

/// The token base of the store whose election key is `key` (`PREFIX/election`).
async fn token_base(client: &mut Client, key: &str) -> Result<u64, etcd_client::Error> {
    let prefix = key.strip_suffix("/election").unwrap_or(key);
    let found = client
        .get(format!("{prefix}/{}", crate::backup::TOKEN_BASE), None)
        .await?;
    Ok(found
        .kvs()
        .first()
        .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.trim().parse().ok())
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reconciler::state::{StateError, StateStore, StepRecord, StepStatus};

    fn record() -> StepRecord {
        StepRecord {
            step: 0,
            request_id: "e.0".into(),
            status: StepStatus::Started,
            replayed: false,
            attempts: 1,
            error: None,
            at_unix_ms: 1,
        }
    }

    fn wait(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !f() {
            assert!(Instant::now() < deadline, "{what} within 15 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A replica under test: its name, its fenced store and its election.
    struct Replica {
        name: &'static str,
        store: EtcdStore,
        election: Arc<Election>,
    }

    /// How many terms a phase may be retried over (each retry needs a lapse).
    const TERMS: usize = 5;

    /// Runs `phase` with the replica that leads now (its index and token) until it
    /// passes within one term. Under load a leader's keepalive can go unanswered for a
    /// TTL (a fresh-clone CI run saw "lost leadership" right after an election): it then
    /// steps down and campaigns again, which is the design, not a failure. A phase that
    /// fails is retried only when that leader's term did end meanwhile (it no longer
    /// leads, or it won again: `terms` moved), at most [`TERMS`] times; a failure
    /// within one live term fails the test.
    fn in_one_term<T>(
        what: &str,
        replicas: &[&Replica],
        mut phase: impl FnMut(usize, i64) -> Result<T, String>,
    ) -> T {
        let mut lapses = vec![];
        for _ in 0..TERMS {
            let mut leader = None;
            wait(&format!("{what}: a leader"), || {
                leader = replicas.iter().position(|r| r.election.status().leading);
                leader.is_some()
            });
            let i = leader.expect("waited");
            let before = replicas[i].election.status();
            match phase(i, before.token) {
                Ok(done) => return done,
                Err(failure) => {
                    let after = replicas[i].election.status();
                    assert!(
                        !after.leading || after.terms != before.terms,
                        "{what}: failed while {} led in one live term (token {}): {failure}",
                        replicas[i].name,
                        before.token
                    );
                    eprintln!(
                        "{what}: {}'s term (token {}) lapsed meanwhile ({failure}); again with the next leader",
                        replicas[i].name, before.token
                    );
                    lapses.push(failure);
                }
            }
        }
        panic!("{what}: the leader's term lapsed {TERMS} times: {lapses:?}");
    }

    /// The reason of a fenced refusal, or what else happened.
    fn fenced(result: Result<(), StateError>) -> Result<String, String> {
        match result {
            Err(StateError::Fenced { why, .. }) => Ok(why),
            Err(other) => Err(format!("not a fenced refusal: {other}")),
            Ok(()) => Err("the write was accepted".to_owned()),
        }
    }

    #[test]
    fn one_replica_leads_a_follower_cannot_write_and_a_deposed_leader_is_refused_by_etcd() {
        let Some((etcd, _dir)) = crate::store::tests::etcd(23796) else {
            return;
        };
        let ttl = Duration::from_secs(3);
        let open = |name: &'static str| {
            let store = EtcdStore::open(&etcd.url("el")).unwrap();
            let election = Election::start(&store, name, ttl, SharedFence::default());
            Replica {
                name,
                store: store.with_election(election.clone()),
                election,
            }
        };
        let a = open("a");
        wait("a leads", || a.election.status().leading);
        if a.election.status().terms == 1 {
            // A cold start knows no previous lease: one full TTL.
            assert_eq!(a.election.first_call_wait(), Some(ttl));
        }
        let b = open("b");
        wait("b sees a leader", || b.election.status().leader.is_some());
        let replicas = [&a, &b];

        // The follower writes nothing, naming the leader; the leader writes, but calls
        // no node before it waited out one TTL since it won.
        in_one_term(
            "a follower is refused and the leader writes",
            &replicas,
            |i, _| {
                let (leader, follower) = (replicas[i], replicas[1 - i]);
                let name = leader.name;
                // The follower learns who leads by its poll (TTL/10).
                let deadline = Instant::now() + Duration::from_secs(5);
                while follower.election.status().leader.as_deref() != Some(name) {
                    if Instant::now() > deadline {
                        return Err(format!("{} does not see {name} lead", follower.name));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let why = fenced(follower.store.journal("e", &record()))?;
                // A follower that never led says who leads; one that led before says its
                // own leadership lapsed (it keeps its token, so nothing is signed with it).
                let expected = if follower.election.status().terms == 0 {
                    format!("not the leader ({name} leads)")
                } else {
                    "has lapsed".to_owned()
                };
                assert!(why.contains(&expected), "{}: {why}", follower.name);
                leader
                    .store
                    .journal("e", &record())
                    .map_err(|e| format!("{name}'s write: {e}"))?;
                // It may call nodes only once its wait passed since it won: one TTL
                // from a cold start (a term that began after a lapse may wait less).
                let won = leader.election.won_at().ok_or("no longer leads")?;
                let wait = leader.election.first_call_wait().ok_or("no longer leads")?;
                let before = won.elapsed();
                if leader.election.ready() {
                    assert!(
                        won.elapsed() >= wait,
                        "{name} ready {:?} after it won, to wait {wait:?}",
                        won.elapsed()
                    );
                } else if before >= wait + ttl {
                    return Err(format!("{name} not ready {before:?} after it won"));
                }
                let deadline = Instant::now() + ttl * 2;
                while !leader.election.ready() {
                    if Instant::now() > deadline {
                        return Err(format!("{name} not ready {:?} after it won", won.elapsed()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                assert!(
                    won.elapsed() >= wait,
                    "{name} ready {:?} after it won, to wait {wait:?}",
                    won.elapsed()
                );
                Ok(())
            },
        );
        // The key goes (as when the leader's lease expires while it is frozen): its
        // timer still holds, so its write reaches etcd, which refuses it by the token.
        let token = in_one_term(
            "a deposed leader is refused by etcd",
            &replicas,
            |i, token| {
                let leader = replicas[i];
                let mut client = leader.store.client();
                let key = leader.election.key().to_owned();
                let (done, deleted) = std::sync::mpsc::channel();
                leader.store.spawn(async move {
                    let _ = done.send(client.delete(key, None).await.map(|r| r.deleted()));
                });
                let deleted = deleted.recv().unwrap().map_err(|e| e.to_string())?;
                if deleted != 1 {
                    return Err("the election key was gone already".to_owned());
                }
                match leader.store.journal("e", &record()) {
                    // Refused by etcd's compare: the store names the token.
                    Err(StateError::Fenced { why, .. })
                        if why.contains(&format!("fencing token {token} (election revision")) =>
                    {
                        Ok(token)
                    }
                    // The leader saw its key go first (its keepalive loop reads the key each
                    // TTL/3) or lapsed: refused before etcd; the compare was not tested.
                    Err(StateError::Fenced { why, .. }) if why.contains("has lapsed") => {
                        Err(format!(
                            "{} stepped down before its write reached etcd: {why}",
                            leader.name
                        ))
                    }
                    Err(other) => panic!("{}: {other}", leader.name),
                    Ok(()) => {
                        // Only in a new term, with a higher token, never with `token`.
                        let now = leader.election.status();
                        assert!(
                            now.leading && now.token > token,
                            "{} wrote after its key was deleted without a new term: {now:?}",
                            leader.name
                        );
                        Err(format!("{} won a new term before its write", leader.name))
                    }
                }
            },
        );
        // A new term: the other replica, or the deposed one again (its lease is alive
        // and it campaigns again at once; a CI run saw that first). Either way the new
        // leader's token is higher and only its store writes.
        wait("a new term leads", || {
            replicas
                .iter()
                .any(|r| r.election.status().leading && r.election.status().token > token)
        });
        in_one_term("the new leader writes and only it", &replicas, |i, new| {
            assert!(
                new > token,
                "{} leads with token {new} after {token}",
                replicas[i].name
            );
            replicas[i]
                .store
                .journal("e", &record())
                .map_err(|e| format!("{}'s write: {e}", replicas[i].name))?;
            let why = fenced(replicas[1 - i].store.journal("e", &record()))?;
            if replicas[1 - i].election.status().leading {
                return Err(format!("both lead: {why}"));
            }
            Ok(())
        });
    }

    /// Waits until `b` names `leader` as the leader, which holds the election key on a
    /// lease (so `b` saw that lease).
    fn sees(b: &Election, leader: &str) {
        wait(&format!("{} sees {leader} lead", b.me), || {
            b.status().leader.as_deref() == Some(leader)
        });
    }

    #[test]
    fn after_the_leaders_lease_expired_the_next_leader_waits_a_margin_not_a_ttl() {
        let Some((etcd, _dir)) = crate::store::tests::etcd_on("127.0.0.38", 23832) else {
            return;
        };
        let ttl = Duration::from_secs(3);
        // `a` leads from a cold start: one TTL.
        let a_store = EtcdStore::open(&etcd.url("el")).unwrap();
        let a = Election::start(&a_store, "a", ttl, SharedFence::default());
        wait("a leads", || a.status().leading);
        if a.status().terms == 1 {
            assert_eq!(a.first_call_wait(), Some(ttl), "a cold start waits one TTL");
        }
        let b_store = EtcdStore::open(&etcd.url("el")).unwrap();
        let b = Election::start(&b_store, "b", ttl, SharedFence::default());
        sees(&b, "a");
        // `a` dies as with kill -9: its runtime goes, no keepalive, no revoke; its lease
        // expires at etcd within one TTL of its last keepalive.
        drop(a_store);
        let killed = Instant::now();
        wait("b leads", || b.status().leading);
        let elected = killed.elapsed();
        let wait_b = b.first_call_wait().expect("b leads");
        assert_eq!(
            wait_b,
            b.margin(),
            "b saw a's lease gone, so it waits the margin ({:?}), not the TTL",
            b.margin()
        );
        let won = b.won_at().expect("b leads");
        while !b.ready() {
            assert!(
                won.elapsed() < ttl,
                "b not ready {:?} after it won",
                won.elapsed()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(won.elapsed() >= wait_b, "b ready before its wait");
        eprintln!(
            "a killed -> b elected {elected:?}, b's first node call {:?} after it won (TTL {ttl:?})",
            wait_b
        );
        drop(a);
    }

    #[test]
    fn after_the_key_was_deleted_by_hand_the_next_leader_waits_the_lease_out() {
        let Some((etcd, _dir)) = crate::store::tests::etcd_on("127.0.0.38", 23834) else {
            return;
        };
        let ttl = Duration::from_secs(3);
        let store = EtcdStore::open(&etcd.url("el")).unwrap();
        // A leader planted by hand, as a winner records itself: the key on a lease of
        // 8 s (longer than the election's TTL, so the waits differ) and the record.
        let key = store.target().key("election");
        let record = store.target().key(LEASE_RECORD);
        let mut client = store.client();
        let granted = Instant::now();
        store
            .run("plant", {
                let (key, record) = (key.clone(), record.clone());
                async move {
                    let lease = client.lease_grant(8, None).await?.id();
                    let planted = client
                        .txn(Txn::new().and_then([
                            TxnOp::put(
                                key.as_str(),
                                "planted",
                                Some(PutOptions::new().with_lease(lease)),
                            ),
                            TxnOp::put(record.as_str(), lease.to_string(), None),
                        ]))
                        .await?;
                    assert!(planted.succeeded());
                    Ok(())
                }
            })
            .unwrap();
        let b_store = EtcdStore::open(&etcd.url("el")).unwrap();
        let b = Election::start(&b_store, "b", ttl, SharedFence::default());
        sees(&b, "planted");
        let mut client = store.client();
        let deleted = store
            .run("delete", async move { client.delete(key, None).await })
            .unwrap();
        assert_eq!(deleted.deleted(), 1);
        wait("b leads", || b.status().leading);
        let wait_b = b.first_call_wait().expect("b leads");
        let not_before = b.won_at().expect("b leads") + wait_b;
        // Not before the planted lease could have ended at etcd, and about then: etcd
        // says whole seconds (under TTL + 1 s), plus the margin and the calls' time.
        assert!(
            not_before >= granted + Duration::from_secs(8),
            "b's first node call {:?} after the lease's grant, before its 8 s ran out",
            not_before - granted
        );
        assert!(
            not_before
                <= granted + Duration::from_secs(8 + 1) + b.margin() + Duration::from_secs(1),
            "b waits {wait_b:?}: more than the lease's remaining time"
        );
        assert!(
            wait_b > ttl,
            "b waits the lease out, not one TTL: {wait_b:?}"
        );
        assert!(!b.ready(), "b calls no node before the lease ran out");
        wait("b ready", || b.ready());
        assert!(Instant::now() >= not_before);
        eprintln!(
            "key deleted while its 8 s lease lived: b waited {wait_b:?} ({:?} after the grant)",
            not_before - granted
        );
    }
}
