//! The controller's side of node leases (issue 16, item 1): `Lease.Renew` on the
//! gRPC listener (`--grpc-listen`), and each node's lease state.
//!
//! A node renews every T/3 and counts its lease from the moment it SENT the renewal;
//! this side counts from its grant, which is later, so the node's lease always ends
//! first. With each grant the node gets its site's peers (for its quorum probes) and
//! the names of its VMs that must stop when it loses quorum: its HA and FT VMs of
//! the applied commit's placement ([`node_runtime`'s `quorum`] pushes the deadline into
//! each one's VMM).
//!
//! Timer rules (T = the site's `failure-detect after=`, default 3 s; the figures
//! come from [`compiler::model::timers::HaTimers`]):
//! - renewal every T/3 (the node's loop; the grant says T and T/3), each call
//!   bounded by T/3;
//! - a node is `ready` while its last grant is younger than T, `suspect` after T;
//! - it may only be declared `failed` once T + margin have passed since its last
//!   grant AND a majority of its site reports not having heard from it: the node may
//!   still hold quorum through its peers otherwise. The margin is the larger of T/3
//!   and the fence check, VM kill and drift: it covers the VMM's fence check
//!   (immediate, plus one vCPU kick), the time to stop its vCPUs (measured:
//!   4–36 ms), clock drift of CLOCK_BOOTTIME over T (≤ 100 ppm), and the T/3 its
//!   peers take to report;
//! - a controller that starts waits T + margin before it calls any node `failed`
//!   (it cannot know which grants its predecessor gave).
//!
//! - where the site has a quorum witness (`witness address= [alternate=]`), a node cut
//!   off from the controller may keep quorum through the witness's grant of
//!   `node/NAME` instead of its peers; so a node that would be `failed` by the rules
//!   above stays `suspect` until this controller holds that grant itself at every
//!   witness the node may be using (the one it reported in its last renewal and the
//!   one the last grant named), and the key has been free of anyone else's grant for
//!   the margin ([`witness_claims`], every 100 ms). The consent holds until the node
//!   renews again. A node that holds the grant is never declared failed; with the
//!   witness out of reach, neither side gets it: the node fences, and its VMs are
//!   not restarted elsewhere (never twice, at the cost of availability).
//!
//! When a node becomes `failed`, [`watch_failures`] starts a drift check at once; its
//! plan places the node's diskless HA and FT VMs elsewhere (nothing else moves; VMs
//! with disks wait for their volumes' new writer, issue 15).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::auth::{NodeTarget, TrustedKeys, Verifier};
use proto::methods;
use proto::v1;
use reconciler::state::StateStore as _;
use tonic::{Request, Response, Status};

use crate::Shared;
use compiler::model::timers::HaTimers;

/// The lease length granted (T) when a site does not say (`failure-detect after=`).
pub const DEFAULT_TTL: Duration = Duration::from_millis(compiler::model::timers::DEFAULT_DETECT_MS);

/// A site's T and margin as durations.
fn site_timers(site: &compiler::model::Site) -> (Duration, Duration) {
    let t = HaTimers::of(site);
    (
        Duration::from_millis(t.detect_ms),
        Duration::from_millis(t.margin_ms),
    )
}

/// One node's lease as this controller process granted it.
#[derive(Debug, Clone)]
struct Granted {
    last: Instant,
    grants: u64,
    incarnation: String,
    /// Its site peers it had not heard from within T at its last renewal (what the
    /// failure rule asks; an empty set, a small etcd record, while its site is whole).
    not_hearing: std::collections::BTreeSet<String>,
    /// The witness the node said it uses at its last renewal ("" none).
    witness_used: String,
    /// The witness this controller's last grant to it named ("" none).
    witness_sent: String,
}

/// The HA witness grant's length, ms (sent to the nodes in every lease grant): a node
/// cut off from the controller renews it every 100 ms
/// (`node_runtime::quorum::WITNESS_EVERY`); the controller holds it as long.
///
/// Every stall between two of the node's granted claims must fit in it: the 100 ms
/// period, a claim that times out (a third of the lease) and its retry, and the push
/// of the new deadline into the VMMs (`set-fence`, up to 500 ms per VMM). 800 ms did
/// not even cover one timed-out claim and one slow push; on the loaded 2-core build
/// machine pushes took up to 531 ms and granted claims came up to 626 ms apart, and
/// about one run in five of the alternate-witness test fenced a node that held its
/// grant. 2 s (the witness's default `--max-lease-ms`, so it is never cut) tolerates
/// a stall as long as a lost controller renewal does (T - T/3 at the default T). It
/// costs nothing when a node dies or is cut off from the witness too at once (it never
/// claims, the key is free); only a node that held its grant and then lost the
/// witness as well is restarted elsewhere up to 1.2 s later than with 800 ms.
pub const WITNESS_LEASE_MS: u64 = 2000;

/// The controller's hold of one node's grant at one witness.
#[derive(Debug, Clone, Copy)]
struct Hold {
    /// Until when (counted from the claim's send time).
    until: Instant,
    /// Since when the key was free of anyone else's grant (None: never held).
    free_since: Option<Instant>,
}

/// What the controller knows of the witnesses.
#[derive(Debug, Default)]
struct WitnessBook {
    /// Node → witness address → this controller's hold of `node/NAME` there.
    holds: BTreeMap<String, BTreeMap<String, Hold>>,
    /// Node → its last grant's time when the witness consented to its failure.
    consent: BTreeMap<String, Instant>,
    /// Node → the last witness answer, in words.
    notes: BTreeMap<String, String>,
    /// Witness address → when it last answered this controller.
    answered: BTreeMap<String, Instant>,
    /// Clients by address.
    clients: BTreeMap<String, Arc<proto::witness::WitnessClient>>,
}

/// The leases of every node, shared by the gRPC service and the status.
#[derive(Debug)]
pub struct Leases {
    /// The default T: the fenced-VM cache is re-read after T/3 (a placement
    /// change, not a timer rule).
    ttl: Duration,
    started: Instant,
    granted: Mutex<BTreeMap<String, Granted>>,
    /// Node name → its public key, learned from its Inventory (as every controller
    /// call to it is addressed).
    pub(crate) keys: tokio::sync::Mutex<BTreeMap<String, String>>,
    /// Node → its HA and FT VMs in the stored placement, and when that was read:
    /// every node renews every T/3, so the state store is read at most once per T/3
    /// for all of them.
    fenced: Mutex<Option<(Instant, FencedByNode)>>,
    /// Failed node → when this controller declared it failed, and its last grant.
    failed_at: Mutex<BTreeMap<String, FailedAt>>,
    /// VM → its last HA restart, measured.
    restarts: Mutex<BTreeMap<String, HaRestart>>,
    /// Node → whether it answered the last observation.
    reachable: Mutex<BTreeMap<String, bool>>,
    /// The witnesses' grants this controller holds and their consents.
    witness: Mutex<WitnessBook>,
    /// With controller replicas: every replica's grants through etcd, and this
    /// replica's URL (issue 24 item 3).
    shared: Option<(Arc<state_etcd::NodeLeases>, String)>,
}

/// When a node was declared failed.
#[derive(Debug, Clone, Copy)]
struct FailedAt {
    detected: Instant,
    last_grant: Option<Instant>,
}

/// One HA restart as it happened: the time it took against the declared worst case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HaRestart {
    /// The VM.
    pub vm: String,
    /// The failed node it ran on.
    pub from: String,
    /// Where it runs now.
    pub to: String,
    /// From its node's last lease grant (the latest the node can have failed) to
    /// the VM running on `to` with its first heartbeat: what the declared figure
    /// bounds.
    pub measured_ms: u64,
    /// Of that, until the node was declared failed.
    pub detected_ms: u64,
    /// From the declaration to running elsewhere (placement, start, first heartbeat).
    pub restart_ms: u64,
    /// The declared worst case ([`HaTimers::worst_restart_ms`]).
    pub declared_ms: u64,
    /// Whether it started (else `measured_ms` is when the attempt ended).
    pub succeeded: bool,
    /// When it ended (RFC 3339).
    pub at: String,
}

/// One HA VM's declared worst-case restart time beside its last measured one.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HaTimesRow {
    /// The VM.
    pub vm: String,
    /// Its site's timers, as `detect 3s + margin 1s + poll 100ms + restart 700ms`.
    pub declared: String,
    /// The declared worst case, ms.
    pub declared_ms: u64,
    /// Its last HA restart (none yet: `null`).
    pub last_restart: Option<HaRestart>,
}

/// Node → the names of its HA and FT VMs.
/// By node: its HA and FT VMs (fenced), and its VMs of availability `none`
/// (unguarded: the only ones it disarms).
type FencedByNode = BTreeMap<String, (Vec<String>, Vec<String>)>;

/// A node's lease state, as status and metrics say it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LeaseRow {
    /// Node.
    pub node: String,
    /// `ready`, `suspect`, `failed` or `unknown` (never renewed with this controller).
    pub state: &'static str,
    /// Since its last grant.
    pub last_grant_ms_ago: Option<u64>,
    /// Grants given by this controller process.
    pub grants: u64,
    /// The node agent's incarnation at its last renewal.
    pub incarnation: String,
    /// Why it is in that state.
    pub reason: String,
    /// Its site's detect T (`failure-detect after=`), ms.
    pub detect_ms: u64,
    /// It would be `failed`, but the site's witness has not consented yet (this
    /// controller claims the node's witness grant while this is true).
    #[serde(skip)]
    pub awaits_witness: bool,
}

impl Leases {
    /// Leases of length `ttl`.
    pub fn new(ttl: Duration) -> Leases {
        Leases {
            ttl,
            started: Instant::now(),
            granted: Mutex::default(),
            keys: tokio::sync::Mutex::default(),
            fenced: Mutex::default(),
            failed_at: Mutex::default(),
            restarts: Mutex::default(),
            reachable: Mutex::default(),
            witness: Mutex::default(),
            shared: None,
        }
    }

    /// As if this controller had started at `at` (its start-up grace, T + margin
    /// in which no node is failed, counts from it; tests and `bench --leases`).
    pub(crate) fn started_at(mut self, at: Instant) -> Leases {
        self.started = at;
        self
    }

    /// With controller replicas: records every grant in etcd (`replicas.node_leases`)
    /// and counts each node from the latest grant any replica gave, so a new leader
    /// knows the grants its predecessor gave and waits T + margin from them
    /// (issue 24 item 3).
    pub fn shared_through(mut self, replicas: Option<&crate::replicas::Replicas>) -> Leases {
        self.shared = replicas.map(|r| (r.node_leases.clone(), r.me.clone()));
        self
    }

    /// Every node's latest grant: this process's, or another replica's seen in etcd
    /// (counted from when this replica first saw it, and only up to its last
    /// complete read of etcd: `state_etcd::NodeLeases::seen`), whichever is later.
    /// Both only make a node look younger: none is declared failed sooner than by the
    /// replica that granted its last lease.
    fn merged(&self) -> BTreeMap<String, Granted> {
        let mut granted = self.lock().clone();
        let Some((shared, _)) = &self.shared else {
            return granted;
        };
        for (node, seen) in shared.seen() {
            if granted.get(&node).is_none_or(|g| g.last < seen.at) {
                let lease = seen.lease;
                granted.insert(
                    node,
                    Granted {
                        last: seen.at,
                        grants: lease.grants,
                        incarnation: lease.incarnation,
                        not_hearing: lease.not_hearing,
                        witness_used: lease.witness_used,
                        witness_sent: lease.witness_sent,
                    },
                );
            }
        }
        granted
    }

    /// [`Leases::merged`] of the nodes of `site` other than `node` whose lease is
    /// two thirds over (they missed a renewal: their HA and FT VMs may be restarted
    /// on any node of the site soon; [`crate::fence_list::with_moving`]). Asked on
    /// every renewal, so it looks up the site's nodes only: O(site), where
    /// [`Leases::rows`] is O(cluster).
    pub fn quiet_peers(&self, site: &compiler::model::Site, node: &str) -> BTreeSet<String> {
        let (ttl, _) = site_timers(site);
        let granted = self.lock();
        site.nodes
            .iter()
            .filter(|n| n.name != node)
            .filter(|n| {
                // Never granted: not quiet.
                self.last_heard(&granted, &n.name).is_some_and(|last| {
                    last.elapsed().as_millis().saturating_mul(3)
                        >= ttl.as_millis().saturating_mul(2)
                })
            })
            .map(|n| n.name.clone())
            .collect()
    }

    /// Per node, (peers hearing it, peers no longer hearing it) among the site's
    /// nodes that renew themselves, counted the way `rows` counted them before it
    /// counted each site's reports once: per node, over its peers, O(site²). Kept
    /// as the reference of `rows`' test and the baseline of `bench --leases`.
    pub(crate) fn per_node_counts(&self, model: &compiler::Model) -> Vec<(String, usize, usize)> {
        let granted = self.merged();
        let mut out = vec![];
        for site in &model.sites {
            let (ttl, _) = site_timers(site);
            for node in &site.nodes {
                let reports: Vec<bool> = site
                    .nodes
                    .iter()
                    .filter(|p| p.name != node.name)
                    .filter_map(|p| granted.get(&p.name))
                    .filter(|p| p.last.elapsed() < ttl)
                    .map(|p| !p.not_hearing.contains(&node.name))
                    .collect();
                let not_hearing = reports.iter().filter(|h| !**h).count();
                out.push((node.name.clone(), reports.len() - not_hearing, not_hearing));
            }
        }
        out
    }

    /// Records a grant as the renewal handler does, at `last`, with the node's
    /// report of the site peers it no longer hears (tests and `bench --leases`).
    pub(crate) fn note_grant(&self, node: &str, last: Instant, not_hearing: BTreeSet<String>) {
        self.lock().insert(
            node.to_owned(),
            Granted {
                last,
                grants: 1,
                incarnation: String::new(),
                not_hearing,
                witness_used: String::new(),
                witness_sent: String::new(),
            },
        );
    }

    fn witness_book(&self) -> std::sync::MutexGuard<'_, WitnessBook> {
        self.witness.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The witness a node of `site` must use: the preferred one, unless it has not
    /// answered this controller for 2 s and the alternate answered since. Once on
    /// the alternate, the grants name it until the preferred answers again: a slow
    /// answer or two of the alternate (under load) must not switch the nodes back to
    /// a preferred witness that is still gone, which fenced a node cut off right
    /// after (every switch costs a round in which the node is claimed at both).
    fn active_witness(&self, site: &compiler::model::Site) -> Option<String> {
        let preferred = site.witness.clone()?;
        let Some(alternate) = site.witness_alternate.clone() else {
            return Some(preferred);
        };
        let book = self.witness_book();
        let last = |address: &str| book.answered.get(address).copied();
        let preferred_recent =
            last(&preferred).is_some_and(|at| at.elapsed() < Duration::from_secs(2));
        let alternate_since = match (last(&preferred), last(&alternate)) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(p), Some(a)) => a > p,
        };
        if !preferred_recent && alternate_since {
            Some(alternate)
        } else {
            Some(preferred)
        }
    }

    /// Whether the witness consented to `node`'s failure since its grant at `last`.
    fn witness_consents(&self, node: &str, last: Instant) -> bool {
        self.witness_book().consent.get(node) == Some(&last)
    }

    fn witness_note(&self, node: &str) -> String {
        self.witness_book()
            .notes
            .get(node)
            .cloned()
            .unwrap_or_else(|| "not asked yet".to_owned())
    }

    /// Records that `nodes` were declared failed now (those not failed any more are
    /// forgotten).
    fn note_failed(&self, nodes: &std::collections::BTreeSet<String>) {
        let grants = self.merged();
        let mut failed = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        failed.retain(|n, _| nodes.contains(n));
        for node in nodes {
            failed.entry(node.clone()).or_insert(FailedAt {
                detected: Instant::now(),
                last_grant: grants.get(node).map(|g| g.last),
            });
        }
    }

    /// Records the HA restarts `moves` (VM, from, to) as ended now, each measured
    /// from its failed node's last grant, beside its declared worst case.
    pub fn note_restarts(
        &self,
        model: &compiler::Model,
        moves: &[(String, String, String)],
        succeeded: bool,
    ) -> Vec<HaRestart> {
        let now = Instant::now();
        let failed = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = vec![];
        for (vm, from, to) in moves {
            let Some(at) = failed.get(from) else { continue };
            let since_grant = at.last_grant.unwrap_or(at.detected);
            let record = HaRestart {
                vm: vm.clone(),
                from: from.clone(),
                to: to.clone(),
                measured_ms: now.duration_since(since_grant).as_millis() as u64,
                detected_ms: at.detected.duration_since(since_grant).as_millis() as u64,
                restart_ms: now.duration_since(at.detected).as_millis() as u64,
                declared_ms: declared(model, vm).0,
                succeeded,
                at: crate::events::rfc3339(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                ),
            };
            self.restarts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(vm.clone(), record.clone());
            out.push(record);
        }
        out
    }

    /// Every HA VM of `model`: its declared worst-case restart time and its last
    /// measured one.
    pub fn ha_times(&self, model: &compiler::Model) -> Vec<HaTimesRow> {
        let restarts = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
        model
            .vms
            .iter()
            .filter(|vm| vm.availability == compiler::model::Availability::Ha)
            .map(|vm| {
                let (declared_ms, declared) = declared(model, &vm.name);
                HaTimesRow {
                    vm: vm.name.clone(),
                    declared,
                    declared_ms,
                    last_restart: restarts.get(&vm.name).cloned(),
                }
            })
            .collect()
    }

    /// Which nodes answered the last observation.
    pub fn note_reachable(&self, reachable: BTreeMap<String, bool>) {
        *self.reachable.lock().unwrap_or_else(|p| p.into_inner()) = reachable;
    }

    /// Each node's state: `ready`, `suspect`, `failed`, `fenced` (it answers but
    /// its lease lapsed and its site no longer hears it: it has lost quorum and its
    /// HA VMs stopped themselves) or
    /// `unreachable` (it does not answer the controller's calls while its lease is
    /// held, or it takes no leases).
    pub fn node_states(&self, model: &compiler::Model) -> Vec<(String, &'static str)> {
        let reachable = self
            .reachable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.rows(model)
            .into_iter()
            .map(|row| {
                let answers = reachable.get(&row.node).copied();
                let state = node_state(row.state, answers);
                (row.node, state)
            })
            .collect()
    }

    /// The VMs `node` must fence (its HA and FT VMs in the stored placement) and those
    /// it may disarm (its VMs of availability `none`), re-read when older than T/3.
    /// A VM in neither list (an HA VM restarted there a moment ago) stays armed.
    pub(crate) fn fenced_vms(
        &self,
        node: &str,
        model: &compiler::Model,
        shared: &Shared,
    ) -> (Vec<String>, Vec<String>) {
        let mut cache = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = cache
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < self.ttl / 3);
        if !fresh {
            let guarded: BTreeMap<&str, bool> = model
                .vms
                .iter()
                .map(|m| {
                    let guarded = m.availability != compiler::model::Availability::None;
                    (m.name.as_str(), guarded)
                })
                .collect();
            // A store that cannot be read now (a sync holds it open) keeps the last
            // lists.
            let placement = shared
                .state_store()
                .and_then(|store| store.placement().map_err(|e| e.to_string()));
            match placement {
                Ok(placement) => {
                    let mut by_node = FencedByNode::new();
                    for vm in placement.iter().flat_map(|p| &p.vms) {
                        let lists = by_node.entry(vm.node.clone()).or_default();
                        match guarded.get(vm.name.as_str()) {
                            Some(true) => lists.0.push(vm.name.clone()),
                            Some(false) => lists.1.push(vm.name.clone()),
                            None => {}
                        }
                    }
                    *cache = Some((Instant::now(), by_node));
                }
                Err(error) if cache.is_none() => {
                    eprintln!("cairn controller: the fenced VMs are not known yet: {error}");
                }
                Err(_) => {}
            }
        }
        cache
            .as_ref()
            .and_then(|(_, by_node)| by_node.get(node).cloned())
            .unwrap_or_default()
    }

    /// How long `node` has not renewed its lease: since its last grant, else since
    /// this controller started. (A dead node's state goes from `failed` to
    /// `unreachable` and back; its silence only grows.)
    pub fn silent_for(&self, node: &str) -> Duration {
        self.merged()
            .get(node)
            .map(|granted| granted.last.elapsed())
            .unwrap_or_else(|| self.started.elapsed())
    }

    /// Whether a node of `model` has gone its site's TTL + margin without a
    /// renewal, by the later of this replica's grant and etcd's view (as
    /// [`Leases::merged`] has it): the first condition of `failed` and of
    /// `awaits_witness` in [`Leases::rows`]. The failure watchers ask it every
    /// 100 ms before the rows, which are O(cluster) with a copy of every lease
    /// (16 ms at 10,000 nodes, `cairn controller bench --leases`); this reads one
    /// instant per node and copies nothing.
    pub fn any_lapsed(&self, model: &compiler::Model) -> bool {
        let granted = self.lock();
        model.sites.iter().any(|site| {
            let (ttl, margin) = site_timers(site);
            site.nodes.iter().any(|n| {
                self.last_heard(&granted, &n.name)
                    .is_some_and(|last| last.elapsed() >= ttl + margin)
            })
        })
    }

    /// When `node` last renewed, as [`Leases::merged`] has it (the later of
    /// this replica's grant, in `granted`, and etcd's view) without copying
    /// the leases; `None`: never.
    fn last_heard(&self, granted: &BTreeMap<String, Granted>, node: &str) -> Option<Instant> {
        let local = granted.get(node).map(|g| g.last);
        let seen = self.shared.as_ref().and_then(|(s, _)| s.seen_at(node));
        local.max(seen)
    }

    /// The rows the failure watchers read: [`Leases::rows`], or none while no
    /// lease has lapsed ([`Leases::any_lapsed`]: then no row is `failed` or
    /// awaits the witness).
    pub fn lapsed_rows(&self, model: &compiler::Model) -> Vec<LeaseRow> {
        if self.any_lapsed(model) {
            self.rows(model)
        } else {
            vec![]
        }
    }

    /// The nodes in state `failed` ([`Leases::rows`]).
    pub fn failed_nodes(&self, model: &compiler::Model) -> std::collections::BTreeSet<String> {
        self.lapsed_rows(model)
            .into_iter()
            .filter(|r| r.state == "failed")
            .map(|r| r.node)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Granted>> {
        self.granted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each node's state, for `site` membership from `model`. O(cluster): each
    /// site's reports of who no longer hears whom are counted once, not per node.
    pub fn rows(&self, model: &compiler::Model) -> Vec<LeaseRow> {
        let granted = self.merged();
        let mut rows = Vec::new();
        for site in &model.sites {
            let (ttl, margin) = site_timers(site);
            // The site's nodes that renew themselves (whose reports are fresh), and
            // for each node how many of them no longer hear it.
            let mut fresh: BTreeSet<&str> = BTreeSet::new();
            let mut not_hearing_of: BTreeMap<&str, usize> = BTreeMap::new();
            for n in &site.nodes {
                if let Some(g) = granted.get(&n.name).filter(|g| g.last.elapsed() < ttl) {
                    fresh.insert(&n.name);
                    for other in &g.not_hearing {
                        *not_hearing_of.entry(other.as_str()).or_default() += 1;
                    }
                }
            }
            for node in &site.nodes {
                let Some(g) = granted.get(&node.name) else {
                    rows.push(LeaseRow {
                        node: node.name.clone(),
                        state: "unknown",
                        last_grant_ms_ago: None,
                        grants: 0,
                        incarnation: String::new(),
                        reason: "it has not renewed a lease with this controller (started without --lease-from?)".into(),
                        detect_ms: ttl.as_millis() as u64,
                        awaits_witness: false,
                    });
                    continue;
                };
                let age = g.last.elapsed();
                let peer_count = site.nodes.len() - 1;
                // Of the peers that renew themselves (whose reports are fresh), those
                // that no longer hear this node's probes; the others may still. (A
                // node's own report never names itself.)
                let reports = fresh.len() - usize::from(fresh.contains(node.name.as_str()));
                let not_hearing = not_hearing_of.get(node.name.as_str()).copied().unwrap_or(0);
                let hearing = reports - not_hearing;
                let site_size = peer_count + 1;
                let mut awaits_witness = false;
                let (state, reason) = if age < ttl {
                    ("ready", format!("renewed {} ms ago", age.as_millis()))
                } else if age < ttl + margin || self.started.elapsed() < ttl + margin {
                    ("suspect", format!("no renewal for {} ms", age.as_millis()))
                } else if not_hearing * 2 >= site_size
                    && site.witness.is_some()
                    && !self.witness_consents(&node.name, g.last)
                {
                    awaits_witness = true;
                    (
                        "suspect",
                        format!(
                            "no renewal for {} ms and {not_hearing} of its {} site peers no longer hear it, but the site's witness has not consented yet ({}): the node may hold its witness grant, so its VMs are not restarted elsewhere",
                            age.as_millis(),
                            peer_count,
                            self.witness_note(&node.name)
                        ),
                    )
                } else if not_hearing * 2 >= site_size {
                    (
                        "failed",
                        format!(
                            "no renewal for {} ms and {not_hearing} of its {} site peers no longer hear it: it has lost quorum, so its HA VMs' fences have lapsed; they are restarted elsewhere",
                            age.as_millis(),
                            peer_count
                        ),
                    )
                } else {
                    (
                        "suspect",
                        format!(
                            "no renewal for {} ms, but only {not_hearing} of its {} site peers report no longer hearing it ({hearing} still do; a majority of the site is needed): it may still hold quorum through them, so its VMs are not restarted elsewhere",
                            age.as_millis(),
                            peer_count
                        ),
                    )
                };
                rows.push(LeaseRow {
                    node: node.name.clone(),
                    state,
                    last_grant_ms_ago: Some(age.as_millis() as u64),
                    grants: g.grants,
                    incarnation: g.incarnation.clone(),
                    reason,
                    detect_ms: ttl.as_millis() as u64,
                    awaits_witness,
                });
            }
        }
        rows
    }
}

/// The witness client of `address` (made once), signed by the controller's key.
fn witness_client(
    shared: &Shared,
    address: &str,
) -> Result<Arc<proto::witness::WitnessClient>, String> {
    let mut book = shared.leases.witness_book();
    if let Some(client) = book.clients.get(address) {
        return Ok(Arc::clone(client));
    }
    let client = Arc::new(proto::witness::WitnessClient::new(
        address,
        shared.signer.clone(),
        Duration::from_millis(300),
        None,
    )?);
    book.clients.insert(address.to_owned(), Arc::clone(&client));
    Ok(client)
}

/// Every 100 ms: claims `node/NAME` as `controller` at each witness a node that
/// would be `failed` (or is) may be using, and consents to its failure once every
/// one of them is held and has been free of the node's grant for the site's margin;
/// every 500 ms it asks each declared witness who is there, so that the lease
/// replies name the alternate while the preferred is out of reach.
pub async fn witness_claims(shared: Arc<Shared>) {
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ticks += 1;
        let good = shared.good.lock().expect("good lock").clone();
        let Some(good) = good else { continue };
        // Nothing to do (and no second pass over every lease) without a witness.
        if good.model.sites.iter().all(|s| s.witness.is_none()) {
            continue;
        }
        if ticks.is_multiple_of(5) {
            let addresses: std::collections::BTreeSet<String> = good
                .model
                .sites
                .iter()
                .flat_map(|s| s.witness.iter().chain(&s.witness_alternate))
                .cloned()
                .collect();
            let asks = addresses.into_iter().map(|address| {
                let shared = Arc::clone(&shared);
                async move {
                    let client = witness_client(&shared, &address)?;
                    client
                        .query(&proto::witness::node_key("-"))
                        .await
                        .map_err(|s| s.message().to_owned())?;
                    shared
                        .leases
                        .witness_book()
                        .answered
                        .insert(address, Instant::now());
                    Ok::<(), String>(())
                }
            });
            let _ = futures_util::future::join_all(asks).await;
        }
        let rows = shared.leases.lapsed_rows(&good.model);
        let wanted: Vec<(String, compiler::model::Site)> =
            rows.iter()
                .filter(|r| r.awaits_witness || r.state == "failed")
                .filter_map(|r| {
                    let site = good.model.sites.iter().find(|s| {
                        s.witness.is_some() && s.nodes.iter().any(|n| n.name == r.node)
                    })?;
                    Some((r.node.clone(), site.clone()))
                })
                .collect();
        {
            let mut book = shared.leases.witness_book();
            book.holds.retain(|n, _| wanted.iter().any(|(w, _)| w == n));
        }
        let claims = wanted.into_iter().map(|(node, site)| {
            let shared = Arc::clone(&shared);
            async move { claim_for(&shared, &node, &site).await }
        });
        let _ = futures_util::future::join_all(claims).await;
    }
}

/// One round of claims for `node` (see [`witness_claims`]).
async fn claim_for(shared: &Shared, node: &str, site: &compiler::model::Site) {
    let Some(last) = shared.leases.merged().get(node).cloned() else {
        return;
    };
    // The witnesses the node may be using; one that never had any cannot hold one.
    let addresses: std::collections::BTreeSet<String> = [&last.witness_used, &last.witness_sent]
        .into_iter()
        .filter(|a| !a.is_empty())
        .cloned()
        .collect();
    let margin = Duration::from_millis(HaTimers::of(site).margin_ms);
    let mut notes = Vec::new();
    let mut all_held = true;
    for address in &addresses {
        let sent = Instant::now();
        let answer = match witness_client(shared, address) {
            Ok(client) => client
                .claim(
                    &proto::witness::node_key(node),
                    proto::witness::CONTROLLER,
                    WITNESS_LEASE_MS,
                )
                .await
                .map_err(|s| s.message().to_owned()),
            Err(error) => Err(error),
        };
        // The witness answered before this: the key's lapse it reports (`free_ms`
        // before its answer) is counted back from now, never from the send, so the
        // margin is never shortened by the round trip.
        let received = Instant::now();
        let mut book = shared.leases.witness_book();
        match answer {
            Ok(grant) if grant.granted => {
                book.answered.insert(address.clone(), Instant::now());
                let holds = book.holds.entry(node.to_owned()).or_default();
                let until = sent + Duration::from_millis(grant.lease_ms);
                let free_since = match holds.get(address) {
                    // Held without a gap: the key stayed free of anyone else.
                    Some(hold) if hold.until > sent => hold.free_since,
                    _ if grant.free_ms == u64::MAX => None,
                    _ => Some(
                        received
                            .checked_sub(Duration::from_millis(grant.free_ms))
                            .unwrap_or(received),
                    ),
                };
                holds.insert(address.clone(), Hold { until, free_since });
                let waited = free_since.is_none_or(|since| since.elapsed() >= margin);
                if !waited {
                    all_held = false;
                }
                notes.push(format!(
                    "{address}: held by the controller, grant {}{}",
                    grant.number,
                    if waited {
                        String::new()
                    } else {
                        format!(
                            ", free for {} ms of the {} ms margin",
                            free_since.map_or(0, |s| s.elapsed().as_millis()),
                            margin.as_millis()
                        )
                    }
                ));
            }
            Ok(grant) => {
                book.answered.insert(address.clone(), Instant::now());
                if let Some(holds) = book.holds.get_mut(node) {
                    holds.remove(address);
                }
                all_held = false;
                notes.push(format!(
                    "{address}: `{}` holds it (grant {}, {} ms left)",
                    grant.holder, grant.number, grant.valid_ms
                ));
            }
            Err(error) => {
                // No answer is no consent this round, but the hold stays until its
                // end: a claim that only timed out (under load) must not restart
                // the margin if the next one renews the same grant in time.
                all_held = false;
                notes.push(format!("{address}: unreachable ({error})"));
            }
        }
    }
    let mut book = shared.leases.witness_book();
    if addresses.is_empty() {
        notes.push("the node was never given a witness".to_owned());
    }
    if all_held && book.consent.get(node) != Some(&last.last) {
        book.consent.insert(node.to_owned(), last.last);
    }
    book.notes.insert(node.to_owned(), notes.join("; "));
}

/// The node states, in the order status and metrics list them (CLI.md).
pub const NODE_STATES: [&str; 6] = [
    "ready",
    "suspect",
    "failed",
    "fenced",
    "maintenance",
    "unreachable",
];

/// A node's state from its lease state and whether it answered the last
/// observation (`None`: not observed yet).
pub fn node_state(lease: &str, answers: Option<bool>) -> &'static str {
    match (lease, answers) {
        ("failed", Some(true)) => "fenced",
        ("failed", _) => "failed",
        ("suspect", _) => "suspect",
        (_, Some(false)) => "unreachable",
        _ => "ready",
    }
}

/// A VM's declared worst-case HA restart time, and how it adds up.
fn declared(model: &compiler::Model, vm: &str) -> (u64, String) {
    compiler::model::timers::vm_worst_restart(model, vm).unwrap_or_default()
}

/// Sets the node state and HA restart time metrics from the leases, the last
/// observation and the applied commit.
pub fn node_metrics(shared: &Shared) {
    let good = shared.good.lock().expect("good lock").clone();
    let Some(good) = good else { return };
    let metrics = &shared.metrics;
    let states: BTreeMap<String, &'static str> =
        crate::maintenance::node_states(shared, &good.model)
            .into_iter()
            .collect();
    let mut counts: BTreeMap<String, i64> =
        NODE_STATES.iter().map(|s| ((*s).to_owned(), 0)).collect();
    for state in states.values() {
        *counts.entry((*state).to_owned()).or_default() += 1;
    }
    // Only the nodes whose state changed (or that came or went) are written.
    let mut shown = metrics.node_state_shown.lock().expect("node states lock");
    for (node, was) in shown.iter() {
        if states.get(node) != Some(was) {
            let _ = metrics
                .node_state
                .remove_label_values(&[node.as_str(), was]);
        }
    }
    for (node, state) in &states {
        if shown.get(node) != Some(state) {
            metrics
                .node_state
                .with_label_values(&[node.as_str(), state])
                .set(1);
        }
    }
    *shown = states;
    drop(shown);
    crate::metrics::Metrics::set_all(&metrics.nodes, &counts);
    metrics.ha_declared.reset();
    metrics.ha_measured.reset();
    for row in shared.leases.ha_times(&good.model) {
        metrics
            .ha_declared
            .with_label_values(&[row.vm.as_str()])
            .set(row.declared_ms as f64 / 1000.0);
        if let Some(last) = &row.last_restart {
            metrics
                .ha_measured
                .with_label_values(&[row.vm.as_str()])
                .set(last.measured_ms as f64 / 1000.0);
        }
    }
}

/// Sets each node's state in a status (`nodes[].state`) and adds
/// `ha_restart_times[]` to its controller part (each HA VM's declared worst case
/// beside its last measured restart).
pub fn status_overlay(
    shared: &Shared,
    model: &compiler::Model,
    status: &mut reconciler::status::Status,
    controller: &mut serde_json::Value,
) {
    let states: BTreeMap<String, &str> = crate::maintenance::node_states(shared, model)
        .into_iter()
        .collect();
    for node in &mut status.nodes {
        if let Some(state) = states.get(&node.name) {
            node.state = (*state).to_owned();
        }
    }
    controller["ha_restart_times"] = serde_json::json!(shared.leases.ha_times(model));
}

/// `Lease.Renew` over the shared controller state.
#[derive(Debug, Clone)]
pub struct LeaseService {
    shared: Arc<Shared>,
    leases: Arc<Leases>,
    verifier: Arc<Verifier>,
    /// The controller keys renewals may be addressed to, and what they were read
    /// from (the signing key and `controller-keys`' modification time): read again
    /// when either changes ([`crate::keys::lease_targets`]).
    targets: Arc<Mutex<LeaseTargets>>,
    /// The applied model's [`NodeIndex`], made again when the model changes (the
    /// model is kept with it, so a new one is never mistaken for it).
    index: Arc<Mutex<Option<IndexedModel>>>,
}

/// The controller keys renewals may be addressed to, with what they were read from
/// (the signing key, `controller-keys`' modification time).
type LeaseTargets = (
    Option<(String, Option<std::time::SystemTime>)>,
    Vec<NodeTarget>,
);

/// A model with its [`NodeIndex`].
type IndexedModel = (Arc<compiler::Model>, Arc<NodeIndex>);

/// Where each node of a model is: name → (site, node) positions. Made once per
/// applied model, O(cluster), so that a renewal finds its node and site in O(1)
/// instead of scanning every site's nodes.
#[derive(Debug, Default)]
pub struct NodeIndex(std::collections::HashMap<String, (usize, usize)>);

impl NodeIndex {
    /// The index of `model`'s nodes.
    pub fn of(model: &compiler::Model) -> NodeIndex {
        NodeIndex(
            model
                .sites
                .iter()
                .enumerate()
                .flat_map(|(s, site)| {
                    site.nodes
                        .iter()
                        .enumerate()
                        .map(move |(n, node)| (node.name.clone(), (s, n)))
                })
                .collect(),
        )
    }

    /// The site and node named `name` in `model` (the model the index was made of).
    pub fn locate<'m>(
        &self,
        model: &'m compiler::Model,
        name: &str,
    ) -> Option<(&'m compiler::model::Site, &'m compiler::model::Node)> {
        let (s, n) = *self.0.get(name)?;
        let site = model.sites.get(s)?;
        Some((site, site.nodes.get(n)?))
    }
}

impl LeaseService {
    /// The service; requests must be addressed to this controller's key.
    pub fn new(shared: Arc<Shared>, leases: Arc<Leases>) -> LeaseService {
        let this = NodeTarget::of("controller", &shared.signer.identity());
        LeaseService {
            shared,
            leases,
            verifier: Arc::new(Verifier::new(proto::auth::DEFAULT_WINDOW, this)),
            targets: Arc::default(),
            index: Arc::new(Mutex::new(None)),
        }
    }

    /// Checks that a renewal is addressed to one of the controller's keys now (the
    /// signing key, a key being rotated in or out, a recovery key), and lets the
    /// verifier accept it: a node addresses its renewals to the key of the newest
    /// controller call it verified, which changes during a rotation. A key retired or
    /// revoked is refused, naming the key the controller signs with.
    fn check_addressed<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let signing = self.shared.signer.identity();
        let data_dir = &self.shared.config.data_dir;
        let stamp = (
            signing.public_key_hex(),
            std::fs::metadata(data_dir.join(crate::enroll::CONTROLLER_KEYS_FILE))
                .and_then(|m| m.modified())
                .ok(),
        );
        let targets = {
            let mut cached = self.targets.lock().expect("targets lock");
            if cached.0.as_ref() != Some(&stamp) {
                let targets = crate::keys::lease_targets(data_dir, &signing);
                self.verifier.answer_also_to(targets.clone());
                *cached = (Some(stamp), targets);
            }
            cached.1.clone()
        };
        let addressed = request
            .metadata()
            .get(proto::auth::HEADER_TARGET_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        match addressed {
            Some(key) if !targets.iter().any(|t| t.public_key_hex == key) => {
                let this = NodeTarget::of("controller", &signing);
                Err(Status::from(proto::auth::AuthError::WrongTarget {
                    addressed: NodeTarget {
                        name: "controller".into(),
                        public_key_hex: key,
                    },
                    this,
                }))
            }
            _ => Ok(()),
        }
    }

    /// The [`NodeIndex`] of `model` (made on the first renewal after it changed).
    fn index_of(&self, model: &Arc<compiler::Model>) -> Arc<NodeIndex> {
        let mut cached = self.index.lock().expect("index lock");
        match &*cached {
            Some((of, index)) if Arc::ptr_eq(of, model) => index.clone(),
            _ => {
                let index = Arc::new(NodeIndex::of(model));
                *cached = Some((model.clone(), index.clone()));
                index
            }
        }
    }

    /// The node's key: asked once with a controller-signed Inventory call.
    async fn node_key(&self, name: &str, address: &str) -> Result<String, Status> {
        if let Some(key) = self.leases.keys.lock().await.get(name) {
            return Ok(key.clone());
        }
        // An enrolled node's key is the one it enrolled with (`crate::enroll`); a
        // revoked one is refused, and not learned again from the node.
        if let Some(pin) = crate::node_keys::pinned(&self.shared, name).await {
            if pin.how == crate::node_keys::REVOKED {
                return Err(Status::permission_denied(crate::node_keys::refusal(
                    name, &pin,
                )));
            }
            self.leases
                .keys
                .lock()
                .await
                .insert(name.to_owned(), pin.key_hex.clone());
            return Ok(pin.key_hex);
        }
        let mut client = reconciler::nodes::connect(address, self.shared.signer.clone())
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "cannot reach node {name} at {address} to learn its key: {e}"
                ))
            })?;
        let inventory = client
            .get_inventory()
            .await
            .map_err(|s| Status::unavailable(format!("inventory of {name}: {}", s.message())))?;
        if inventory.node_name != name {
            return Err(Status::permission_denied(format!(
                "the node at {address} calls itself `{}`, not `{name}`",
                inventory.node_name
            )));
        }
        self.leases
            .keys
            .lock()
            .await
            .insert(name.to_owned(), inventory.public_key_hex.clone());
        Ok(inventory.public_key_hex)
    }
}

#[tonic::async_trait]
impl v1::lease_server::Lease for LeaseService {
    async fn renew(
        &self,
        request: Request<v1::RenewLeaseRequest>,
    ) -> Result<Response<v1::RenewLeaseReply>, Status> {
        let good = self
            .shared
            .good
            .lock()
            .expect("good lock")
            .clone()
            .ok_or_else(|| Status::unavailable("no commit is applied yet: no lease to grant"))?;
        let name = request.get_ref().node.clone();
        let index = self.index_of(&good.model);
        let Some((site, node)) = index.locate(&good.model, &name) else {
            return Err(Status::permission_denied(format!(
                "node `{name}` is not in the applied commit {}",
                good.commit
            )));
        };
        let key = self.node_key(&name, &node.address).await?;
        let mut trusted = TrustedKeys::new();
        trusted.insert(
            proto::auth::parse_public_key(&key).map_err(|e| Status::internal(e.to_string()))?,
            name.clone(),
        );
        self.check_addressed(&request)?;
        self.verifier
            .verify(methods::RENEW_LEASE, &request, &trusted, "node")
            .map_err(Status::from)?;
        // Every peer's key, so that the node can address its probes (learned once).
        for peer in site.nodes.iter().filter(|n| n.name != name) {
            let _ = self.node_key(&peer.name, &peer.address).await;
        }
        // The site's keys only (not a copy of every node's, per renewal).
        let site_peers = {
            let keys = self.leases.keys.lock().await;
            site.nodes
                .iter()
                .filter(|n| n.name != name)
                .map(|n| v1::Peer {
                    name: n.name.clone(),
                    address: n.address.clone(),
                    public_key_hex: keys.get(&n.name).cloned().unwrap_or_default(),
                })
                .collect()
        };
        let (fenced_vms, unguarded_vms) = self.leases.fenced_vms(&name, &good.model, &self.shared);
        let witness = self.leases.active_witness(site).unwrap_or_default();
        // HA VMs a restart may start here are armed from their first instruction.
        let fenced_vms =
            crate::fence_list::with_moving(&self.shared, &good.model, &name, fenced_vms);
        let body = request.into_inner();
        let timers = HaTimers::of(site);
        let heard: BTreeMap<String, u64> =
            body.heard.into_iter().map(|h| (h.node, h.age_ms)).collect();
        let not_hearing = site
            .nodes
            .iter()
            .filter(|n| n.name != name)
            .filter(|n| {
                heard
                    .get(&n.name)
                    .is_none_or(|age| *age >= timers.detect_ms)
            })
            .map(|n| n.name.clone())
            .collect();
        let granted = {
            let mut granted = self.leases.lock();
            let entry = granted.entry(name.clone()).or_insert(Granted {
                last: Instant::now(),
                grants: 0,
                incarnation: String::new(),
                not_hearing: Default::default(),
                witness_used: String::new(),
                witness_sent: String::new(),
            });
            entry.last = Instant::now();
            entry.grants += 1;
            entry.incarnation = body.incarnation;
            entry.witness_used = body.witness;
            entry.witness_sent = witness.clone();
            entry.not_hearing = not_hearing;
            entry.clone()
        };
        let grants = granted.grants;
        if let Some((shared, me)) = &self.leases.shared {
            shared.granted(
                &name,
                state_etcd::NodeLease {
                    grants,
                    incarnation: granted.incarnation,
                    not_hearing: granted.not_hearing,
                    granted_by: me.clone(),
                    witness_used: granted.witness_used,
                    witness_sent: granted.witness_sent,
                },
            );
        }
        Ok(Response::new(v1::RenewLeaseReply {
            ttl_ms: timers.detect_ms,
            grant: grants,
            site_peers,
            fenced_vms,
            renew_every_ms: timers.renew_every_ms,
            unguarded_vms,
            witness_lease_ms: if witness.is_empty() {
                0
            } else {
                WITNESS_LEASE_MS
            },
            witness,
        }))
    }
}

/// Watches the leases: when a node becomes `failed`, records a `node failed` event
/// and starts a drift check at once, whose plan places the node's diskless HA VMs
/// elsewhere (`PlanOptions::failed_nodes`); when it is back, `node returned`.
pub async fn watch_failures(shared: Arc<Shared>) {
    // The witness claims and, with replicas, the revocations' refresh run beside it
    // and end with it.
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _claims = Abort(tokio::spawn(witness_claims(Arc::clone(&shared))));
    let _revoked = Abort(tokio::spawn(crate::node_keys::forget_revoked(Arc::clone(
        &shared,
    ))));
    let mut failed = std::collections::BTreeSet::new();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let good = shared.good.lock().expect("good lock").clone();
        let Some(good) = good else { continue };
        let rows = shared.leases.lapsed_rows(&good.model);
        let now: std::collections::BTreeSet<String> = rows
            .iter()
            .filter(|r| r.state == "failed")
            .map(|r| r.node.clone())
            .collect();
        for row in rows
            .iter()
            .filter(|r| now.contains(&r.node) && !failed.contains(&r.node))
        {
            shared.record(vec![
                crate::events::Event::new("node", "failed")
                    .object(format!("node {}", row.node))
                    .reason(row.reason.clone()),
            ]);
        }
        shared.leases.note_failed(&now);
        for node in failed.difference(&now) {
            shared.record(vec![
                crate::events::Event::new("node", "returned").object(format!("node {node}")),
            ]);
        }
        if now.difference(&failed).next().is_some() {
            shared.wake_drift.notify_one();
        }
        failed = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bench::leases::{leases_for, model_of};

    #[test]
    fn the_node_index_finds_every_node_and_its_site_as_the_scan_did() {
        let model = model_of(1_200);
        assert!(model.sites.len() >= 3, "several sites");
        let index = NodeIndex::of(&model);
        for site in &model.sites {
            for node in &site.nodes {
                let (found_site, found) = index.locate(&model, &node.name).unwrap();
                assert_eq!(found_site.name, site.name);
                assert_eq!(found.name, node.name);
                assert!(std::ptr::eq(found, node));
            }
        }
        assert!(index.locate(&model, "no-such-node").is_none());
    }

    #[test]
    fn rows_count_each_sites_reports_as_the_per_node_count_did() {
        let model = model_of(40);
        let (mut suspects, mut failed) = (0, 0);
        for seed in 1..=20 {
            let leases = leases_for(&model, seed);
            let rows = leases.rows(&model);
            let reference = leases.per_node_counts(&model);
            assert_eq!(rows.len(), reference.len());
            for (row, (node, hearing, not_hearing)) in rows.iter().zip(&reference) {
                assert_eq!(&row.node, node);
                // The counts are in the reasons of suspect and failed rows, and
                // decide between them.
                if row.state == "suspect" && row.reason.contains("site peers report") {
                    suspects += 1;
                    assert!(
                        row.reason.contains(&format!("only {not_hearing} of"))
                            && row.reason.contains(&format!("({hearing} still do")),
                        "{node}: hearing {hearing}, not {not_hearing}: {}",
                        row.reason
                    );
                }
                // Failed, or (the generated site has a witness) waiting for the
                // witness's consent to be.
                if row.reason.contains("site peers no longer hear it") {
                    failed += 1;
                    assert!(
                        row.reason.contains(&format!("and {not_hearing} of its")),
                        "{node}: not hearing {not_hearing}: {}",
                        row.reason
                    );
                }
            }
        }
        // Both counted outcomes occur, so the comparison above is not vacuous.
        assert!(
            suspects > 0 && failed > 0,
            "suspect {suspects}, failed {failed}"
        );
    }

    /// With no lease lapsed the watchers skip the rows: then no row is `failed`
    /// or awaits the witness. With one lapsed they are every row.
    #[test]
    fn no_row_fails_while_no_lease_has_lapsed() {
        let model = model_of(40);
        let (mut lapsed, mut clear) = (0, 0);
        for seed in 1..=20u64 {
            let now = Instant::now();
            let leases = Leases::new(DEFAULT_TTL).started_at(now - Duration::from_secs(60));
            for site in &model.sites {
                for (i, node) in site.nodes.iter().enumerate() {
                    // Every node unheard by every peer (a majority), so a
                    // lapsed one fails; in odd seeds one node per site is
                    // 9 s old, in even ones every grant is under 1.5 s.
                    let age = if seed % 2 == 1 && i as u64 == seed % 5 {
                        Duration::from_secs(9)
                    } else {
                        Duration::from_millis((seed * 97 + i as u64 * 37) % 1_500)
                    };
                    let unheard = site
                        .nodes
                        .iter()
                        .filter(|n| n.name != node.name)
                        .map(|n| n.name.clone())
                        .collect();
                    leases.note_grant(&node.name, now - age, unheard);
                }
            }
            let rows = leases.rows(&model);
            let failing = rows.iter().any(|r| r.state == "failed" || r.awaits_witness);
            if leases.any_lapsed(&model) {
                lapsed += 1;
                assert!(failing, "seed {seed}: a lease lapsed and no row failed");
                assert_eq!(leases.lapsed_rows(&model).len(), rows.len());
            } else {
                clear += 1;
                assert!(!failing, "seed {seed}: a failed row with no lease lapsed");
                assert!(leases.lapsed_rows(&model).is_empty());
                assert!(leases.failed_nodes(&model).is_empty());
            }
        }
        assert!(lapsed > 0 && clear > 0, "lapsed {lapsed}, clear {clear}");
    }

    #[test]
    fn quiet_peers_are_the_site_nodes_whose_grant_is_two_thirds_old() {
        let model = model_of(40);
        let leases = leases_for(&model, 3);
        let rows = leases.rows(&model);
        for site in &model.sites {
            for node in &site.nodes {
                let expected: BTreeSet<String> = rows
                    .iter()
                    .filter(|r| r.node != node.name && site.nodes.iter().any(|n| n.name == r.node))
                    .filter(|r| {
                        r.last_grant_ms_ago.is_some_and(|ago| {
                            ago.saturating_mul(3) >= r.detect_ms.saturating_mul(2)
                        })
                    })
                    .map(|r| r.node.clone())
                    .collect();
                assert_eq!(
                    leases.quiet_peers(site, &node.name),
                    expected,
                    "{}",
                    node.name
                );
            }
        }
    }

    #[test]
    fn a_node_state_combines_its_lease_and_whether_it_answers() {
        assert_eq!(node_state("ready", Some(true)), "ready");
        assert_eq!(node_state("ready", None), "ready");
        assert_eq!(node_state("ready", Some(false)), "unreachable");
        assert_eq!(node_state("unknown", Some(false)), "unreachable");
        assert_eq!(node_state("unknown", Some(true)), "ready");
        assert_eq!(node_state("suspect", Some(true)), "suspect");
        assert_eq!(node_state("suspect", Some(false)), "suspect");
        assert_eq!(node_state("failed", Some(false)), "failed");
        assert_eq!(node_state("failed", None), "failed");
        // Alive but cut off from its lease and its site: it fenced itself.
        assert_eq!(node_state("failed", Some(true)), "fenced");
        for state in ["ready", "suspect", "failed", "fenced", "unreachable"] {
            assert!(NODE_STATES.contains(&state));
        }
    }
}
