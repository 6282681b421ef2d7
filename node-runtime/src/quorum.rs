//! Quorum and fencing on the node (issue 16): whether this node may keep running its
//! HA and FT VMs, and the fence deadline it pushes into their `cairn-vmm`s.
//!
//! The node holds quorum while it holds either
//! - a lease from the controller: renewed every `ttl / 3` with `Lease.Renew`, valid
//!   until the renewal's SEND time + `ttl` (`CLOCK_BOOTTIME`); the controller counts
//!   from its grant, which is later, so a late or retransmitted grant never stretches
//!   the lease past what the controller believes; or
//! - a majority of its site: itself and the site peers that answered a
//!   `Quorum.Probe` sent in the same round, valid until that round's send time + `ttl`.
//!   A controller that is down, restarting or failing over therefore stops nothing
//!   while the site's nodes still reach each other.
//!
//! As soon as a round extends either part, the node pushes `max(lease, peers)` into
//! each running VM with the VMM's `set-fence` request ([`vmm::fence`]), only ever
//! moving it later, except the VMs the controller's grant names as of availability
//! `none` (`unguarded_vms`), which it disarms. A VM that no grant names yet (an HA VM
//! restarted here a moment ago) is therefore fenced like the HA VMs it may be, never
//! disarmed by a list that lags the placement. When the node loses quorum,
//! or is frozen (SIGSTOP) or killed, nothing moves the deadline any more and each VMM
//! stops its vCPUs and its tap writes at the deadline by itself.
//!
//! - or, where its site has a quorum witness (`cairn witness`), the witness's grant of
//!   `node/NAME`: once a renewal is overdue (less than T/2 of the lease left) the
//!   node claims it every 100 ms at the witness the controller's last grant named,
//!   and holds quorum until the claim's SEND time + the witness lease (2 s, as the
//!   grant says: it covers a timed-out claim and a slow push of the deadlines under
//!   load, `controller::lease::WITNESS_LEASE_MS`). The controller claims the same
//!   key before it declares this node failed, so at most one of them wins: a node
//!   that holds it is never restarted elsewhere, a node that cannot get it (the
//!   controller has it, or the witness is out of reach) fences at the end of what it
//!   holds.
//!
//! The site's peers and the fenced VMs come with each grant and are kept in
//! `DATA_DIR/quorum.json`, so a node restarted during a controller outage still probes
//! its peers. A node started without `--lease-from` never arms a fence (there is no
//! controller to restart its VMs elsewhere, so stopping them would buy nothing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::auth::{NodeTarget, RequestSigner};
use proto::methods;
use proto::v1;
use serde::{Deserialize, Serialize};

use crate::node::Node;

/// How the node takes part in leases.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The controller's gRPC address (`host:port`), where `Lease.Renew` is served;
    /// with controller replicas, each replica's, comma-separated: a renewal goes to
    /// one, and after a failed one the next renewal goes to the next (a follower
    /// grants leases once it knows the applied commit; every grant is shared through
    /// etcd, issue 24 item 3).
    pub controller: String,
    /// The lease's length asked for until the controller says otherwise (T).
    pub ttl: Duration,
    /// The node's own address (its `--listen` IP, unless unspecified): renewals and
    /// probes leave from it, so a partition of that address cuts them too (on one host
    /// with several node addresses the route would otherwise pick 127.0.0.1).
    pub local_address: Option<std::net::IpAddr>,
}

/// What is kept across restarts (`DATA_DIR/quorum.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Kept {
    /// The other nodes of this node's site: name, address, key.
    peers: Vec<(String, String, String)>,
    /// The VMs to fence (HA and FT VMs placed here).
    fenced_vms: BTreeSet<String>,
    /// The VMs of availability `none` placed here: the only ones disarmed.
    #[serde(default)]
    unguarded_vms: BTreeSet<String>,
    /// The lease length the controller grants, ms (its site's detect T).
    ttl_ms: u64,
    /// How often the controller asks this node to renew, ms (0: `ttl_ms / 3`).
    #[serde(default)]
    renew_every_ms: u64,
    /// The site's witness this node claims at ("" none).
    #[serde(default)]
    witness: String,
    /// The witness grant's length, ms.
    #[serde(default)]
    witness_lease_ms: u64,
}

impl State {
    /// The quorum's end: the latest of the lease, the site majority and the witness.
    fn holds_until_ns(&self) -> u64 {
        self.lease_until_ns
            .max(self.peers_until_ns)
            .max(self.witness_until_ns)
    }
}

#[derive(Debug, Default)]
struct State {
    kept: Kept,
    /// `CLOCK_BOOTTIME` ns the controller's lease lasts until (0: none yet).
    lease_until_ns: u64,
    /// `CLOCK_BOOTTIME` ns the site majority lasts until (0: none yet).
    peers_until_ns: u64,
    /// Grants received by this process.
    grants: u64,
    /// Peers whose probe reached this node, and when.
    heard: BTreeMap<String, Instant>,
    /// The deadline last pushed into each VM.
    pushed: BTreeMap<String, u64>,
    /// Why the last renewal failed, if it did.
    last_error: Option<String>,
    /// `CLOCK_BOOTTIME` ns the witness grant lasts until (0: none yet).
    witness_until_ns: u64,
    /// Who holds this node's witness grant, and its number, as last answered.
    witness_holder: (String, u64),
    /// Why the last witness claim failed, if it did.
    witness_error: Option<String>,
}

/// The node's quorum state; the probe service writes `heard`, the loop the rest.
#[derive(Debug)]
pub struct Quorum {
    path: PathBuf,
    state: Mutex<State>,
    /// Random per process: tells the controller an agent restart from a renewal.
    incarnation: String,
    /// gRPC channels to the controller and the peers, by address and call timeout.
    channels: Mutex<BTreeMap<(String, Duration), tonic::transport::Channel>>,
    /// One push of fence deadlines at a time: a renewal and a probe majority each push
    /// as soon as they extend the quorum, and two pushes racing could leave a VMM with
    /// the earlier deadline while `pushed` records the later one.
    pushing: tokio::sync::Mutex<()>,
    /// The witness client, by address.
    witnesses: Mutex<BTreeMap<String, Arc<proto::witness::WitnessClient>>>,
    /// Which of the controller addresses renewals go to (moves on after a failure).
    controller_at: std::sync::atomic::AtomicUsize,
}

/// What Observe or a test can see of the quorum.
#[derive(Debug, Clone, PartialEq)]
pub struct QuorumView {
    /// Until when (`CLOCK_BOOTTIME` ns) the node holds quorum; 0 when it never has.
    pub holds_until_ns: u64,
    /// The lease's end (0: none).
    pub lease_until_ns: u64,
    /// The site majority's end (0: none).
    pub peers_until_ns: u64,
    /// The witness grant's end (0: none).
    pub witness_until_ns: u64,
    /// Who holds this node's witness grant (as last answered), and its number.
    pub witness_holder: (String, u64),
    /// Grants received.
    pub grants: u64,
    /// VMs that are fenced.
    pub fenced_vms: Vec<String>,
    /// Why the last renewal failed.
    pub last_error: Option<String>,
}

impl Quorum {
    /// The quorum state of the node whose data directory holds `quorum.json`.
    pub fn open(data_dir: &std::path::Path) -> Quorum {
        let path = data_dir.join("quorum.json");
        let kept = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Quorum {
            path,
            state: Mutex::new(State {
                kept,
                ..State::default()
            }),
            channels: Mutex::default(),
            pushing: tokio::sync::Mutex::new(()),
            witnesses: Mutex::default(),
            controller_at: Default::default(),
            incarnation: format!("{}-{}", std::process::id(), vmm::fence::boottime_ns()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A peer's probe arrived.
    pub fn heard(&self, peer: &str) {
        self.lock().heard.insert(peer.to_owned(), Instant::now());
    }

    /// The current view.
    pub fn view(&self) -> QuorumView {
        let state = self.lock();
        QuorumView {
            holds_until_ns: state.holds_until_ns(),
            lease_until_ns: state.lease_until_ns,
            peers_until_ns: state.peers_until_ns,
            witness_until_ns: state.witness_until_ns,
            witness_holder: state.witness_holder.clone(),
            grants: state.grants,
            fenced_vms: state.kept.fenced_vms.iter().cloned().collect(),
            last_error: state.last_error.clone(),
        }
    }

    /// Who holds this node's witness grant as last answered ("" when it has not
    /// asked), and its number: what a peer's probe is told.
    pub fn witness_holder(&self) -> (String, u64) {
        self.lock().witness_holder.clone()
    }

    fn keep(&self, kept: &Kept) {
        if let Ok(bytes) = serde_json::to_vec_pretty(kept) {
            let temporary = self.path.with_extension("json.tmp");
            if std::fs::write(&temporary, bytes).is_ok() {
                let _ = std::fs::rename(&temporary, &self.path);
            }
        }
    }
}

/// The renewal interval: what the controller asks for, never more than T/3 (two
/// renewals may be lost before the lease lapses), and T/3 when it does not say.
fn renew_interval(ttl: Duration, asked_ms: u64) -> Duration {
    let third = ttl / 3;
    if asked_ms == 0 {
        third
    } else {
        Duration::from_millis(asked_ms).min(third)
    }
}

/// One round's timeout for each call: a third of the lease, so a round ends before
/// the next is due.
fn call_timeout(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

impl Quorum {
    /// The channel to `address` whose calls wait `timeout`, made once and kept: it
    /// reconnects by itself, so a round every T/3 does not open a new connection to
    /// the controller and to each peer. Kept per timeout too, since the channel
    /// enforces it on every call: the first rounds run with T/3 of the lease asked
    /// for (`--lease-ttl-ms`, 3 s by default: 1 s), and a channel kept from them held
    /// every later call to that 1 s though the controller's grant (10 s in the dev
    /// clusters) allows 3.3 s. Under load every renewal and probe slower than 1 s then
    /// failed ("Timeout expired" at 1,003-1,170 ms in `cli it cpu_preemption`'s
    /// rounds), and a node whose renewals and probes both failed for T fenced its VMs
    /// although the controller still granted its lease.
    fn channel(
        &self,
        address: &str,
        timeout: Duration,
        local_address: Option<std::net::IpAddr>,
    ) -> Result<tonic::transport::Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (address.to_owned(), timeout);
        if let Some(channel) = channels.get(&key) {
            return Ok(channel.clone());
        }
        // A channel of an older timeout is not used again.
        channels.retain(|(kept, _), _| kept != address);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .timeout(timeout)
            .local_address(local_address)
            .connect_lazy();
        channels.insert(key, channel.clone());
        Ok(channel)
    }
}

/// Renews the lease once; on success records it from `sent_ns`.
async fn renew(node: &Node, config: &LeaseConfig, sent_ns: u64) -> Result<(), String> {
    let quorum = &node.quorum;
    let (heard, witness) = {
        let state = quorum.lock();
        let heard = state
            .heard
            .iter()
            .map(|(name, at)| v1::PeerHeard {
                node: name.clone(),
                age_ms: at.elapsed().as_millis() as u64,
            })
            .collect();
        (heard, state.kept.witness.clone())
    };
    let controller_key = node
        .trust
        .lease_controller_key()
        .ok_or("this node trusts no controller key")?;
    let target = NodeTarget::new("controller", &controller_key).map_err(|e| e.to_string())?;
    let request = RequestSigner::new(node.identity.clone())
        .sign(
            methods::RENEW_LEASE,
            &target,
            v1::RenewLeaseRequest {
                node: node.config.name.clone(),
                incarnation: quorum.incarnation.clone(),
                heard,
                witness,
            },
        )
        .map_err(|e| e.to_string())?;
    let timeout = call_timeout(config.ttl);
    let controllers: Vec<&str> = config
        .controller
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    let at = quorum
        .controller_at
        .load(std::sync::atomic::Ordering::Relaxed)
        % controllers.len().max(1);
    let address = controllers
        .get(at)
        .copied()
        .unwrap_or(config.controller.as_str());
    let mut client = v1::lease_client::LeaseClient::new(quorum.channel(
        address,
        timeout,
        config.local_address,
    )?);
    let reply = client
        .renew(request)
        .await
        // Not "refused": most failures are a timeout or a lost connection, and the
        // message says which (or what the controller answered).
        .map_err(|status| {
            // With replicas, the next renewal asks the next one.
            quorum
                .controller_at
                .store(at + 1, std::sync::atomic::Ordering::Relaxed);
            format!("the renewal to the controller failed: {}", status.message())
        })?
        .into_inner();
    let ttl_ns = reply.ttl_ms.saturating_mul(1_000_000);
    let kept = Kept {
        peers: reply
            .site_peers
            .iter()
            .map(|p| (p.name.clone(), p.address.clone(), p.public_key_hex.clone()))
            .collect(),
        fenced_vms: reply.fenced_vms.into_iter().collect(),
        unguarded_vms: reply.unguarded_vms.into_iter().collect(),
        ttl_ms: reply.ttl_ms,
        renew_every_ms: reply.renew_every_ms,
        witness: reply.witness,
        witness_lease_ms: reply.witness_lease_ms,
    };
    let changed = {
        let mut state = quorum.lock();
        state.lease_until_ns = state.lease_until_ns.max(sent_ns + ttl_ns);
        state.grants += 1;
        let changed = state.kept != kept;
        state.kept = kept.clone();
        changed
    };
    if changed {
        quorum.keep(&kept);
    }
    Ok(())
}

/// Probes every site peer at once; a majority (this node included) extends the
/// peers' part of the quorum from `sent_ns`. True when it did.
async fn probe_peers(node: &Node, config: &LeaseConfig, sent_ns: u64) -> bool {
    let ttl = config.ttl;
    let peers = node.quorum.lock().kept.peers.clone();
    if peers.is_empty() {
        return false;
    }
    let timeout = call_timeout(ttl);
    let signer = RequestSigner::new(node.identity.clone());
    let started = Instant::now();
    let probes = peers.iter().map(|(name, address, key)| {
        let signer = signer.clone();
        let me = node.config.name.clone();
        async move {
            let target = NodeTarget::new(name.clone(), key).map_err(|e| e.to_string())?;
            let request = signer
                .sign(methods::QUORUM_PROBE, &target, v1::QuorumProbe { node: me })
                .map_err(|e| e.to_string())?;
            let mut client = v1::quorum_client::QuorumClient::new(node.quorum.channel(
                address,
                timeout,
                config.local_address,
            )?);
            tokio::time::timeout(timeout, client.probe(request))
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|s| s.message().to_owned())
        }
    });
    let results = futures_util::future::join_all(probes).await;
    let answered = results.iter().filter(|r| r.is_ok()).count();
    // A majority of the site: this node and the peers that answered.
    let majority = (answered + 1) * 2 > peers.len() + 1;
    if majority {
        let mut state = node.quorum.lock();
        state.peers_until_ns = state.peers_until_ns.max(sent_ns + ttl.as_nanos() as u64);
    } else {
        let failed: Vec<String> = peers
            .iter()
            .zip(&results)
            .filter_map(|((name, _, _), result)| {
                result.as_ref().err().map(|e| format!("{name}: {e}"))
            })
            .collect();
        eprintln!(
            "cairn-node: quorum: {answered} of {} site peers answered within {} ms (round took {} ms; {}); the site majority is not renewed",
            peers.len(),
            timeout.as_millis(),
            started.elapsed().as_millis(),
            failed.join("; ")
        );
    }
    majority
}

/// Pushes the quorum's end into every running fenced VM (only ever later), and
/// disarms VMs that left the list.
async fn push_fences(node: &Arc<Node>) {
    let _one_at_a_time = node.quorum.pushing.lock().await;
    let (until, unguarded, pushed) = {
        let state = node.quorum.lock();
        (
            state.holds_until_ns(),
            state.kept.unguarded_vms.clone(),
            state.pushed.clone(),
        )
    };
    // New VMMs start armed with the quorum's end (`Vms::set_quorum_end`).
    node.vms.set_quorum_end(until);
    let running = node.vms.running_control_sockets().await;
    let mut updates = Vec::new();
    for (vm, socket) in running {
        // Only a VM the controller names as of availability `none` is disarmed. Every
        // other one keeps the quorum's end, also one the controller's `fenced_vms`
        // does not name yet: an HA VM restarted here a moment ago, before the
        // placement that puts it here was stored, was disarmed by that gap, and with
        // this node cut off then it ran on while the controller restarted it elsewhere.
        let deadline = if !unguarded.contains(&vm) {
            if until == 0 || pushed.get(&vm).is_some_and(|p| *p >= until) {
                continue;
            }
            until
        } else if until != 0 || pushed.get(&vm).is_none_or(|p| *p != 0) {
            // Disarmed every round while the node holds quorum (a new incarnation of
            // it started armed, `Vms::set_quorum_end`).
            0
        } else {
            continue;
        };
        updates.push((vm, socket, deadline));
    }
    // All at once: one slow VMM (up to the 500 ms timeout) must not delay the others'
    // renewal.
    // Through the hypervisor seam (`cairn-vmm`'s `set-fence`, or a simulated VM's).
    let hypervisor = node.vms.hypervisor();
    let sends = updates.into_iter().map(|(vm, socket, deadline)| {
        let hypervisor = hypervisor.clone();
        async move {
            let sent = tokio::task::spawn_blocking(move || hypervisor.set_fence(&socket, deadline))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            (vm, deadline, sent)
        }
    });
    for (vm, deadline, sent) in futures_util::future::join_all(sends).await {
        match sent {
            Ok(()) => {
                node.quorum.lock().pushed.insert(vm, deadline);
            }
            Err(error) => {
                eprintln!("cairn-node: quorum: the fence deadline of {vm} was not pushed: {error}")
            }
        }
    }
}

/// How often the node claims its witness grant while its lease is overdue.
pub const WITNESS_EVERY: Duration = Duration::from_millis(100);

/// The witness client of `address`, made once (the HA claims and the FT guard,
/// `vms::ft_guard`, share it).
pub(crate) fn witness_client(
    node: &Node,
    address: &str,
    timeout: Duration,
    local_address: Option<std::net::IpAddr>,
) -> Result<Arc<proto::witness::WitnessClient>, String> {
    let mut clients = node
        .quorum
        .witnesses
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(client) = clients.get(address) {
        return Ok(Arc::clone(client));
    }
    let client = Arc::new(proto::witness::WitnessClient::new(
        address,
        RequestSigner::new(node.identity.clone()),
        timeout,
        local_address,
    )?);
    clients.insert(address.to_owned(), Arc::clone(&client));
    Ok(client)
}

/// The witness loop: every [`WITNESS_EVERY`], while the controller's lease has less
/// than half of T left (a renewal is overdue) and the site has a witness, claims
/// `node/NAME` there; a grant extends the quorum to the claim's send time + the
/// witness lease and pushes the fences at once.
async fn witness_loop(node: Arc<Node>, config: LeaseConfig) {
    let trace = std::env::var_os("CAIRN_QUORUM_TRACE").is_some();
    // The send time of the last granted claim (0: none in this stretch).
    let mut last_granted_ns = 0u64;
    loop {
        let tick = tokio::time::Instant::now();
        let (address, lease_ms, ttl, lease_until) = {
            let state = node.quorum.lock();
            let ttl = if state.kept.ttl_ms > 0 {
                Duration::from_millis(state.kept.ttl_ms)
            } else {
                config.ttl
            };
            (
                state.kept.witness.clone(),
                state.kept.witness_lease_ms,
                ttl,
                state.lease_until_ns,
            )
        };
        let sent_ns = vmm::fence::boottime_ns();
        let overdue = lease_until < sent_ns + (ttl / 2).as_nanos() as u64;
        if !address.is_empty() && lease_ms > 0 && overdue {
            let timeout = Duration::from_millis(lease_ms / 3).max(WITNESS_EVERY);
            let claimed = Instant::now();
            let answer = match witness_client(&node, &address, timeout, config.local_address) {
                Ok(client) => client
                    .claim(
                        &proto::witness::node_key(&node.config.name),
                        &node.config.name,
                        lease_ms,
                    )
                    .await
                    .map_err(|status| status.message().to_owned()),
                Err(error) => Err(error),
            };
            let granted = {
                let mut state = node.quorum.lock();
                let (granted, error) = match answer {
                    Ok(grant) if grant.granted => {
                        let until = sent_ns + grant.lease_ms.min(lease_ms) * 1_000_000;
                        state.witness_until_ns = state.witness_until_ns.max(until);
                        state.witness_holder = (grant.holder, grant.number);
                        (true, None)
                    }
                    Ok(grant) => {
                        let reason = format!("refused: {}", grant.reason);
                        state.witness_holder = (grant.holder, grant.number);
                        (false, Some(reason))
                    }
                    Err(error) => (false, Some(error)),
                };
                let took = claimed.elapsed().as_millis();
                let left_ms = (i128::from(state.holds_until_ns())
                    - i128::from(vmm::fence::boottime_ns()))
                    / 1_000_000;
                match (&error, &state.witness_error) {
                    (Some(error), None) => eprintln!(
                        "cairn-node: quorum: the witness {address} did not grant node/{}: {error} (the claim took {took} ms; the quorum holds {left_ms} ms more)",
                        node.config.name
                    ),
                    (None, last) if trace || last.is_some() => eprintln!(
                        "cairn-node: quorum: the witness {address} grants node/{} (number {}; last failure: {last:?})",
                        node.config.name, state.witness_holder.1
                    ),
                    _ => {}
                }
                // Two granted claims further apart than half the witness lease: the
                // node came close to losing its grant (the claims or the pushes were
                // slow); said always, for diagnosis.
                if granted {
                    let gap_ms = sent_ns.saturating_sub(last_granted_ns) / 1_000_000;
                    if last_granted_ns != 0 && gap_ms * 2 > lease_ms {
                        eprintln!(
                            "cairn-node: quorum: the witness {address} granted node/{} {gap_ms} ms after the last grant's claim (of its {lease_ms} ms lease; this claim took {took} ms)",
                            node.config.name
                        );
                    }
                    last_granted_ns = sent_ns;
                }
                state.witness_error = error;
                granted
            };
            if granted {
                let pushing = Instant::now();
                push_fences(&node).await;
                let pushed_ms = pushing.elapsed().as_millis();
                if u64::try_from(pushed_ms).unwrap_or(u64::MAX) * 4 > lease_ms {
                    eprintln!(
                        "cairn-node: quorum: pushing the fence deadlines after a witness grant took {pushed_ms} ms (of its {lease_ms} ms lease)"
                    );
                }
            }
        } else {
            last_granted_ns = 0;
        }
        tokio::time::sleep_until(tick + WITNESS_EVERY).await;
    }
}

/// The lease loop: renew, probe, push, every `ttl / 3`, until the process ends.
/// The controller's answer sets both (the site's `failure-detect after=`); until the
/// first one, the node's own `--lease-ttl-ms`.
pub async fn run(node: Arc<Node>, config: LeaseConfig) {
    let mut ttl = config.ttl;
    let mut every = ttl / 3;
    // A restarted agent starts with the T of the last grant it kept, not the one it
    // asks for (`--lease-ttl-ms`, 3 s by default): its first round, which must renew
    // the fences its predecessor pushed, otherwise waited 1 s per call and counted a
    // site majority for only 3 s, then waited the kept T/3 (3.3 s) for the next round.
    // Under load that gap let a fence lapse with its VMM adopted and running (`cli it
    // cpu_preemption`: "site majority 1941 ms left" after the first round, db fenced
    // before the second).
    {
        let state = node.quorum.lock();
        if state.kept.ttl_ms > 0 {
            ttl = Duration::from_millis(state.kept.ttl_ms);
            every = renew_interval(ttl, state.kept.renew_every_ms);
        }
    }
    let witness = tokio::spawn(witness_loop(Arc::clone(&node), config.clone()));
    // The witness loop ends with this one (it holds the node).
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _witness = Abort(witness);
    // Every round's outcome on stderr, for diagnosis.
    let trace = std::env::var_os("CAIRN_QUORUM_TRACE").is_some();
    loop {
        let round = tokio::time::Instant::now();
        let sent_ns = vmm::fence::boottime_ns();
        let this_round = LeaseConfig {
            ttl,
            ..config.clone()
        };
        // Each half pushes the deadlines as soon as it extends the quorum: a controller
        // that is frozen holds its renewal for the whole call timeout (T/3), and a push
        // only after both would leave the VMMs a third of T less margin.
        let renewal = async {
            let renewed = renew(&node, &this_round, sent_ns).await;
            if renewed.is_ok() {
                push_fences(&node).await;
            }
            renewed
        };
        let probes = async {
            if probe_peers(&node, &this_round, sent_ns).await {
                push_fences(&node).await;
            }
        };
        let (renewed, ()) = tokio::join!(renewal, probes);
        if trace {
            let state = node.quorum.lock();
            let now = vmm::fence::boottime_ns();
            eprintln!(
                "cairn-node: quorum round: {} ms; renewal {}; lease {} ms left, site majority {} ms left",
                round.elapsed().as_millis(),
                match &renewed {
                    Ok(()) => "granted".to_string(),
                    Err(error) => error.clone(),
                },
                (i128::from(state.lease_until_ns) - i128::from(now)) / 1_000_000,
                (i128::from(state.peers_until_ns) - i128::from(now)) / 1_000_000,
            );
        }
        match renewed {
            Err(error) => {
                let mut state = node.quorum.lock();
                if state.last_error.is_none() {
                    eprintln!("cairn-node: quorum: the lease was not renewed: {error}");
                }
                state.last_error = Some(error);
            }
            Ok(()) => {
                let mut state = node.quorum.lock();
                if let Some(error) = state.last_error.take() {
                    eprintln!(
                        "cairn-node: quorum: the lease is renewed again (last failure: {error})"
                    );
                }
            }
        }
        let (granted, asked_every) = {
            let state = node.quorum.lock();
            (state.kept.ttl_ms, state.kept.renew_every_ms)
        };
        if granted > 0 {
            ttl = Duration::from_millis(granted);
            every = renew_interval(ttl, asked_every);
        }
        push_fences(&node).await;
        // Until the next round, a VMM adopted after an agent restart gets the quorum's
        // end at once: the agent starts this loop before it adopts (`server::run_on`),
        // and an adopted VMM's fence still counts down from the old agent's last push.
        let next = tokio::time::sleep_until(round + every);
        tokio::pin!(next);
        loop {
            tokio::select! {
                () = &mut next => break,
                () = node.vms.adopted().notified() => push_fences(&node).await,
            }
        }
    }
}
