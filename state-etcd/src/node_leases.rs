//! Node leases in etcd (issue 24, item 3): every replica sees the grants every other
//! replica gave, so HA fencing does not depend on the one controller process a node
//! renews with.
//!
//! A replica that grants a node's lease (`Lease.Renew`, the controller's `lease.rs`)
//! queues a [`NodeLease`] record; a task writes the queue every [`FLUSH`] as puts of
//! `PREFIX/leases/NODE`, up to 100 per transaction. The records are not fenced: a
//! grant is a fact about a node that renewed, whoever answered it.
//!
//! Every replica reads the records changed since its last read every [`POLL`] (a
//! range read with `min_mod_revision`, so a poll costs what changed, not every node).
//! No clock is shared between machines: a replica notes a record when it first SEES
//! its new revision, which is never before the grant it records. The view is known
//! complete as of the last poll's send time (`fresh_at`); a consumer counts a node's
//! silence only up to that moment ([`NodeLeases::seen`]), so a replica whose polls
//! stall (etcd unreachable) sees silences stop growing instead of nodes failing.
//! Both rules only make a node look younger than it is: a node is never declared
//! failed earlier than by the replica that granted its last lease.
//!
//! etcd keeps every revision until it is compacted, and leases write one revision per
//! node per renewal (T/3). The replica that leads compacts the history older than
//! [`KEEP_HISTORY`] every [`COMPACT_EVERY`] ([`NodeLeases::start`] with its election).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::election::Election;
use crate::store::{EtcdStore, prefix_end};

/// How often queued grants are written.
pub const FLUSH: Duration = Duration::from_millis(100);
/// How often the records changed since the last read are read.
pub const POLL: Duration = Duration::from_millis(250);
/// History kept when the leader compacts.
pub const KEEP_HISTORY: Duration = Duration::from_secs(300);
/// How often the leader compacts.
pub const COMPACT_EVERY: Duration = Duration::from_secs(60);
/// Puts per transaction (etcd allows 128).
const PUTS_PER_TXN: usize = 100;
/// Keys per page of a read.
const PAGE: i64 = 1000;

/// One node's last lease grant, as the granting replica recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLease {
    /// Grants the granting replica gave this node.
    pub grants: u64,
    /// The node agent's incarnation at the renewal.
    pub incarnation: String,
    /// Its site peers it did not hear from within T at the renewal (an empty list
    /// while its site is whole: the record stays small).
    pub not_hearing: BTreeSet<String>,
    /// The replica that granted it (its HTTP URL).
    pub granted_by: String,
    /// The quorum witness the node said it uses ("" none).
    #[serde(default)]
    pub witness_used: String,
    /// The witness the grant named ("" none).
    #[serde(default)]
    pub witness_sent: String,
}

/// A record as this replica saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// When this replica first saw this revision of the record (never before the
    /// grant it records).
    pub at: Instant,
    /// The record.
    pub lease: NodeLease,
}

#[derive(Debug, Default)]
struct View {
    /// The view holds every write made before this instant (the last poll's send).
    fresh_at: Option<Instant>,
    /// Node → (the record's mod revision, what was seen).
    nodes: BTreeMap<String, (i64, Seen)>,
    /// The revision read up to.
    revision: i64,
    /// (when, revision) of recent polls, for compaction.
    history: VecDeque<(Instant, i64)>,
}

/// The node leases of every replica, shared through etcd.
#[derive(Debug)]
pub struct NodeLeases {
    /// Keeps the store's runtime (where the tasks run) alive.
    _store: EtcdStore,
    prefix: String,
    pending: Mutex<BTreeMap<String, NodeLease>>,
    view: Mutex<View>,
}

impl NodeLeases {
    /// Starts writing this replica's grants and reading everyone's on `store`'s
    /// runtime. With `election`, this replica compacts etcd's history while it leads.
    pub fn start(store: &EtcdStore, election: Option<Arc<Election>>) -> Arc<NodeLeases> {
        let leases = Arc::new(NodeLeases {
            _store: store.clone(),
            prefix: store.target().key("leases/"),
            pending: Mutex::default(),
            view: Mutex::default(),
        });
        // The tasks end once the last handle is dropped.
        let writer = Arc::downgrade(&leases);
        let client = store.client();
        store.spawn(async move { NodeLeases::flush(writer, client).await });
        let reader = Arc::downgrade(&leases);
        let client = store.client();
        store.spawn(async move { NodeLeases::poll(reader, client, election).await });
        leases
    }

    /// Queues the record of a grant this replica just gave.
    pub fn granted(&self, node: &str, lease: NodeLease) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_owned(), lease);
    }

    /// Every node's record as seen, each `at` moved later by how stale the view is
    /// (now − the last complete read): a node's silence is counted only up to what
    /// this replica knows. Empty until the first read.
    pub fn seen(&self) -> BTreeMap<String, Seen> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let Some(fresh_at) = view.fresh_at else {
            return BTreeMap::new();
        };
        let stale = fresh_at.elapsed();
        view.nodes
            .iter()
            .map(|(node, (_, seen))| {
                let at = (seen.at + stale).min(Instant::now());
                (
                    node.clone(),
                    Seen {
                        at,
                        lease: seen.lease.clone(),
                    },
                )
            })
            .collect()
    }

    /// [`NodeLeases::seen`]'s `at` of one node, without copying every node's (a
    /// lease renewal asks this of each node of its site).
    pub fn seen_at(&self, node: &str) -> Option<Instant> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let stale = view.fresh_at?.elapsed();
        let (_, seen) = view.nodes.get(node)?;
        Some((seen.at + stale).min(Instant::now()))
    }

    /// When the view was last known complete.
    pub fn fresh_at(&self) -> Option<Instant> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).fresh_at
    }

    async fn flush(weak: Weak<Self>, mut client: Client) {
        let mut said: Option<String> = None;
        loop {
            tokio::time::sleep(FLUSH).await;
            let Some(this) = weak.upgrade() else { return };
            let batch =
                std::mem::take(&mut *this.pending.lock().unwrap_or_else(|p| p.into_inner()));
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|(node, lease)| {
                    TxnOp::put(
                        format!("{}{node}", this.prefix),
                        serde_json::to_vec(lease).expect("lease records serialize"),
                        None,
                    )
                })
                .collect();
            for chunk in ops.chunks(PUTS_PER_TXN) {
                let txn = Txn::new().and_then(chunk.to_vec());
                match tokio::time::timeout(Duration::from_secs(5), client.txn(txn)).await {
                    Ok(Ok(_)) => said = None,
                    // Lost grants only make the nodes look older to the other
                    // replicas; the next renewal (T/3) writes again.
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "no answer within 5 s".to_owned(),
                        };
                        if said.as_deref() != Some(why.as_str()) {
                            eprintln!("cairn controller: node leases not written to etcd: {why}");
                            said = Some(why);
                        }
                    }
                }
            }
        }
    }

    /// Reads the records changed since `after` (every one when 0), paged at one
    /// revision; returns that revision and (node, mod revision, record).
    async fn read_since(
        &self,
        client: &mut Client,
        after: i64,
    ) -> Result<(i64, Vec<(String, i64, NodeLease)>), etcd_client::Error> {
        let end = prefix_end(&self.prefix);
        let mut from = self.prefix.clone().into_bytes();
        let mut revision = 0;
        let mut out = vec![];
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_revision(revision)
                .with_min_mod_revision(after + 1);
            let response = client.get(from.clone(), Some(options)).await?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            for kv in response.kvs() {
                let key = String::from_utf8_lossy(kv.key());
                let node = key[self.prefix.len().min(key.len())..].to_owned();
                if let Ok(lease) = serde_json::from_slice::<NodeLease>(kv.value()) {
                    out.push((node, kv.mod_revision(), lease));
                }
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((revision, out))
    }

    async fn poll(weak: Weak<Self>, mut client: Client, election: Option<Arc<Election>>) {
        let mut said: Option<String> = None;
        let mut compacted = Instant::now();
        loop {
            let Some(this) = weak.upgrade() else { return };
            let sent = Instant::now();
            let after = this.view.lock().unwrap_or_else(|p| p.into_inner()).revision;
            let read =
                tokio::time::timeout(Duration::from_secs(5), this.read_since(&mut client, after))
                    .await;
            match read {
                Ok(Ok((revision, changed))) => {
                    let now = Instant::now();
                    let mut view = this.view.lock().unwrap_or_else(|p| p.into_inner());
                    for (node, mod_revision, lease) in changed {
                        let known = view.nodes.get(&node).map(|(r, _)| *r);
                        if known != Some(mod_revision) {
                            view.nodes
                                .insert(node, (mod_revision, Seen { at: now, lease }));
                        }
                    }
                    view.revision = view.revision.max(revision);
                    view.fresh_at = Some(sent);
                    view.history.push_back((sent, revision));
                    while view
                        .history
                        .front()
                        .is_some_and(|(at, _)| at.elapsed() > KEEP_HISTORY * 2)
                    {
                        view.history.pop_front();
                    }
                    said = None;
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer within 5 s".to_owned(),
                    };
                    if said.as_deref() != Some(why.as_str()) {
                        eprintln!(
                            "cairn controller: node leases not read from etcd ({why}); silences stop counting until they are"
                        );
                        said = Some(why);
                    }
                }
            }
            if compacted.elapsed() >= COMPACT_EVERY
                && election.as_ref().is_some_and(|e| e.acting_token().is_ok())
            {
                compacted = Instant::now();
                let keep_from = {
                    let view = this.view.lock().unwrap_or_else(|p| p.into_inner());
                    view.history
                        .iter()
                        .rev()
                        .find(|(at, _)| at.elapsed() >= KEEP_HISTORY)
                        .map(|(_, r)| *r)
                };
                if let Some(revision) = keep_from {
                    match client.compact(revision, None).await {
                        Ok(_) => {}
                        // Compacted already (another replica led a moment ago).
                        Err(e) if e.to_string().contains("compacted") => {}
                        Err(e) => eprintln!(
                            "cairn controller: compacting etcd's history to revision {revision}: {e}"
                        ),
                    }
                }
            }
            drop(this);
            tokio::time::sleep(POLL.saturating_sub(sent.elapsed())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(grants: u64, by: &str) -> NodeLease {
        NodeLease {
            grants,
            incarnation: "i1".into(),
            not_hearing: BTreeSet::new(),
            granted_by: by.into(),
            witness_used: String::new(),
            witness_sent: String::new(),
        }
    }

    fn wait(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !f() {
            assert!(Instant::now() < deadline, "{what} within 15 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_grant_one_replica_gives_is_seen_by_another_never_before_it_was_given() {
        let Some((etcd, _dir)) = crate::store::tests::etcd(23794) else {
            return;
        };
        let a = NodeLeases::start(&EtcdStore::open(&etcd.url("nl")).unwrap(), None);
        let b = NodeLeases::start(&EtcdStore::open(&etcd.url("nl")).unwrap(), None);
        // Another prefix sees nothing of them.
        let other = NodeLeases::start(&EtcdStore::open(&etcd.url("other")).unwrap(), None);
        wait("b read once", || b.fresh_at().is_some());
        assert!(b.seen().is_empty());
        let given = Instant::now();
        a.granted("n1", lease(1, "http://a"));
        a.granted("n2", lease(1, "http://a"));
        wait("b sees both", || b.seen().len() == 2);
        let seen = b.seen();
        assert!(seen["n1"].at >= given, "seen before it was granted");
        assert_eq!(seen["n1"].lease, lease(1, "http://a"));
        // A renewal moves n1 on; n2's silence grows.
        std::thread::sleep(Duration::from_millis(600));
        let renewed = Instant::now();
        a.granted("n1", lease(2, "http://a"));
        wait("b sees n1's renewal", || b.seen()["n1"].lease.grants == 2);
        let seen = b.seen();
        assert!(seen["n1"].at >= renewed);
        assert!(seen["n2"].at < renewed, "n2 did not renew");
        // A's own grants come back to it the same way.
        wait("a sees its own", || a.seen().len() == 2);
        assert!(other.seen().is_empty(), "{:?}", other.seen());
        // While etcd answers, a silent node's silence grows with the clock: by as
        // much as the view's last complete read moved on (reads every POLL; how many
        // land in a given wall-clock window depends on the machine's load, so the
        // test waits for them instead of timing them).
        let silence = || Instant::now().saturating_duration_since(b.seen()["n2"].at);
        let (before, fresh_before) = (silence(), b.fresh_at().unwrap());
        wait("two reads later", || {
            b.fresh_at()
                .is_some_and(|f| f >= fresh_before + Duration::from_millis(400))
        });
        let (after, fresh_after) = (silence(), b.fresh_at().unwrap());
        let moved = fresh_after - fresh_before;
        assert!(
            after >= before + moved.saturating_sub(Duration::from_millis(50)),
            "n2's silence went from {before:?} to {after:?} while the view moved on {moved:?}"
        );
        // etcd stops answering (frozen): the view is no longer known complete, and
        // the silence stops growing at the last complete read, which was sent before
        // the freeze (a read in flight then may still land, late on a loaded machine).
        // (The CI runs of 2026-12-02 saw reads complete after the SIGSTOP: this
        // test's client port was the election test's etcd peer port, so its own etcd
        // never started and the other one, which serves gRPC on its peer port too,
        // answered. The ports are apart now and Etcd::start refuses a taken port.)
        let pid = etcd.pid();
        let stopped = Instant::now();
        // SAFETY: kill(2) of the etcd process this test started (SIGSTOP).
        unsafe { libc_kill(pid, 19) };
        std::thread::sleep(Duration::from_millis(2 * POLL.as_millis() as u64 + 1200));
        let frozen = silence();
        std::thread::sleep(Duration::from_millis(1200));
        let later = silence();
        let fresh = b.fresh_at().unwrap();
        // SAFETY: as above (SIGCONT).
        unsafe { libc_kill(pid, 18) };
        assert!(
            fresh <= stopped,
            "a read completed that was sent {:?} after etcd was frozen",
            fresh - stopped
        );
        assert!(
            later <= frozen + Duration::from_millis(50),
            "n2's silence grew from {frozen:?} to {later:?} while etcd was frozen"
        );
        wait("reads again", || b.fresh_at().is_some_and(|f| f > fresh));
    }

    unsafe extern "C" {
        #[link_name = "kill"]
        fn libc_kill(pid: i32, signal: i32) -> i32;
    }
}
