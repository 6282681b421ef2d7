//! The controller as the volumes' epoch authority (issues 15 and 16).
//!
//! Every drift check, before it plans, the controller tends the epochs from the
//! observation it just made ([`tend`]):
//! 1. the failed nodes' copies leave their volumes' in-sync sets, and a volume whose
//!    writer was on a failed node gets a new writer from its in-sync copies on live
//!    nodes, never on a node in maintenance ([`reconciler::epochs::fail_over_avoiding`]);
//!    a volume with none left is reported unavailable and its VM is not restarted;
//! 2. the writers' reports are acted on ([`reconciler::epochs::react`]): a copy the
//!    writer froze on leaves the in-sync set, a copy that caught up comes back, and a
//!    copy at an older epoch (a returning node) is told the current one;
//! 3. every decided `SetVolumeEpoch` is sent, the writer's last.
//!
//! The plan then places a failed node's HA VMs with disks on their first disk's new
//! writer ([`Tended::disk_writers`]), so the epoch is raised on every reachable copy
//! before any VM restarts: a stale writer that wakes up is refused by every copy.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reconciler::desired::DesiredNode;
use reconciler::epochs::{EpochAuthority, EpochStore, Install, Unavailable};
use reconciler::nodes::NodeApi;
use reconciler::observe::Observed;

use crate::Shared;
use crate::events::Event;

/// How long one `SetVolumeEpoch` may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What tending the epochs left for the plan.
#[derive(Debug, Default)]
pub struct Tended {
    /// Each volume's writer at its current epoch (runtime name → node), for volumes
    /// whose writer holds that epoch (its install succeeded or it reported it).
    pub disk_writers: BTreeMap<String, String>,
    /// Volumes that lost every in-sync copy.
    pub unavailable: Vec<Unavailable>,
}

/// Tends the volumes' epochs from one observation (see the module documentation).
pub async fn tend(
    shared: &Shared,
    store: &dyn EpochStore,
    nodes: &BTreeMap<String, DesiredNode>,
    observed: &Observed,
    failed: &BTreeSet<String>,
    maintenance: &BTreeSet<String>,
) -> Tended {
    let statuses = reconciler::epochs::statuses_of(observed);
    let decided = tokio::task::block_in_place(|| {
        let authority = EpochAuthority::new(store);
        let (failover, unavailable) =
            reconciler::epochs::fail_over_avoiding(&authority, &statuses, failed, maintenance)?;
        let reaction = reconciler::epochs::react(&authority, &statuses)?;
        Ok::<_, reconciler::epochs::EpochError>((failover, reaction, unavailable))
    });
    let (failover, reaction, unavailable) = match decided {
        Ok(decided) => decided,
        Err(error) => {
            shared
                .record(vec![Event::new("volume-epoch", "failed").reason(format!(
                    "the epoch authority could not decide: {error}"
                ))]);
            return Tended::default();
        }
    };
    let mut events = Vec::new();
    for change in failover.changes.iter().chain(&reaction.changes) {
        let journal =
            tokio::task::block_in_place(|| EpochAuthority::new(store).journal(&change.volume));
        let what = journal
            .ok()
            .and_then(|journal| journal.into_iter().find(|c| c.state.epoch == change.epoch))
            .map(|c| format!("{} ({})", c.change, c.reason))
            .unwrap_or_default();
        events.push(
            Event::new("volume-epoch", "changed")
                .object(format!("volume {}", change.volume))
                .reason(format!(
                    "epoch {}: writer {}, in sync: {}{}",
                    change.epoch,
                    change.writer,
                    change
                        .in_sync
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if what.is_empty() {
                        String::new()
                    } else {
                        format!("; {what}")
                    }
                )),
        );
    }
    for lost in &unavailable {
        events.push(
            Event::new("volume", "unavailable")
                .object(format!("volume {}", lost.volume))
                .reason(lost.why.clone()),
        );
    }
    // One volume's installs in order (the writer's last); the volumes at once, so a
    // slow node delays only its own volumes' new epochs.
    let mut by_volume: BTreeMap<&str, Vec<&Install>> = BTreeMap::new();
    let mut sent: BTreeSet<&str> = BTreeSet::new();
    for install in failover.installs.iter().chain(&reaction.installs) {
        if sent.insert(install.request_id.as_str()) {
            by_volume
                .entry(install.request.name.as_str())
                .or_default()
                .push(install);
        }
    }
    let outcomes =
        futures_util::future::join_all(by_volume.into_values().map(|installs| async move {
            let mut failures = Vec::new();
            for install in installs {
                if let Err(why) = send(shared, nodes, install).await {
                    failures.push((install, why));
                }
            }
            failures
        }))
        .await;
    let mut refused: BTreeSet<String> = BTreeSet::new();
    for (install, why) in outcomes.into_iter().flatten() {
        if install.node == install.request.writer {
            refused.insert(install.request.name.clone());
        }
        events.push(
            Event::new("volume-epoch", "not installed")
                .object(format!(
                    "volume {} on node {}",
                    install.request.name, install.node
                ))
                .reason(why),
        );
    }
    if !events.is_empty() {
        shared.record(events);
    }
    let all = tokio::task::block_in_place(|| EpochAuthority::new(store).all());
    let disk_writers = all
        .unwrap_or_default()
        .into_iter()
        .filter(|state| !refused.contains(&state.volume))
        .map(|state| (state.volume, state.writer))
        .collect();
    Tended {
        disk_writers,
        unavailable,
    }
}

/// Before a plan is carried out: each volume used by a VM placed on a node without a
/// copy names that node among its clients (the node's storage client forwards the
/// VM's I/O to the copies), under a new epoch installed on the copies first, then on
/// the clients (a node no longer named is fenced by it). Nodes in `unreachable` are
/// not asked.
pub async fn set_clients(
    shared: &Shared,
    store: &dyn EpochStore,
    desired: &reconciler::desired::Desired,
    observed: &Observed,
    unreachable: &BTreeSet<String>,
) {
    let mut wanted: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for vm in desired.vms.values() {
        for volume in &vm.volumes {
            let Some(layout) = desired.volumes.get(volume) else {
                continue;
            };
            if layout.node != vm.node && !layout.replicas.contains(&vm.node) {
                wanted
                    .entry(volume.as_str())
                    .or_default()
                    .insert(vm.node.clone());
            }
        }
    }
    keep_sources(&mut wanted, desired, observed);
    let changed = tokio::task::block_in_place(|| {
        let authority = EpochAuthority::new(store);
        let mut changed = Vec::new();
        for state in authority.all()? {
            let want = wanted
                .get(state.volume.as_str())
                .cloned()
                .unwrap_or_default();
            if want == state.clients {
                continue;
            }
            let before = state.clients.clone();
            let next = authority.set_clients(
                &state.volume,
                state.epoch,
                &want,
                "a VM using it runs on a node without a copy (or no longer does)",
            )?;
            changed.push((next, before));
        }
        Ok::<_, reconciler::epochs::EpochError>(changed)
    });
    let changed = match changed {
        Ok(changed) => changed,
        Err(error) => {
            shared.record(vec![Event::new("volume-epoch", "failed").reason(format!(
                "the epoch authority could not set a volume's clients: {error}"
            ))]);
            return;
        }
    };
    let mut events = Vec::new();
    for (next, before) in changed {
        events.push(
            Event::new("volume-epoch", "changed")
                .object(format!("volume {}", next.volume))
                .reason(format!(
                    "epoch {}: writer {}, clients: {}",
                    next.epoch,
                    next.writer,
                    if next.clients.is_empty() {
                        "none".to_owned()
                    } else {
                        next.clients.iter().cloned().collect::<Vec<_>>().join(", ")
                    }
                )),
        );
        let mut copies: Vec<&String> = next.copies.iter().collect();
        copies.sort_by_key(|node| **node == next.writer);
        let targets = copies
            .into_iter()
            .chain(next.clients.iter())
            .chain(before.difference(&next.clients))
            .filter(|node| !unreachable.contains(*node));
        for node in targets {
            // The client finds the copies, and the copies know the client's key, in
            // the peer set.
            if let Err(why) = push_peers(shared, desired, observed, node).await {
                events.push(
                    Event::new("volume-epoch", "not installed")
                        .object(format!("peer set of node {node}"))
                        .reason(why),
                );
            }
            let install = Install {
                node: node.clone(),
                request_id: reconciler::epochs::request_id(&next, node),
                request: reconciler::epochs::install(&next),
            };
            if let Err(why) = send(shared, &desired.nodes, &install).await {
                events.push(
                    Event::new("volume-epoch", "not installed")
                        .object(format!("volume {} on node {node}", next.volume))
                        .reason(why),
                );
            }
        }
    }
    if !events.is_empty() {
        shared.record(events);
    }
}

/// A VM that runs only on a node other than its placement's (a live migration not
/// committed yet, or a move the plan has yet to make) keeps that node among the
/// clients of each of its volumes it holds no copy of: the running VM's writes go on
/// being served until the migration's commit hands them over (`reconciler::migrate`),
/// and the destination can attach meanwhile.
fn keep_sources<'d>(
    wanted: &mut BTreeMap<&'d str, BTreeSet<String>>,
    desired: &'d reconciler::desired::Desired,
    observed: &Observed,
) {
    for (name, copies) in observed.vms() {
        let Some(vm) = desired.vms.get(name) else {
            continue;
        };
        let running: Vec<&str> = copies
            .iter()
            .filter(|(_, o)| o.is_running())
            .map(|(node, _)| *node)
            .collect();
        if running.contains(&vm.node.as_str()) {
            continue;
        }
        for node in running {
            for volume in &vm.volumes {
                let Some(layout) = desired.volumes.get(volume) else {
                    continue;
                };
                if layout.node != node && !layout.replicas.iter().any(|r| r == node) {
                    wanted
                        .entry(volume.as_str())
                        .or_default()
                        .insert(node.to_owned());
                }
            }
        }
    }
}

/// Pushes the peer set (every node of the spec that answered, with its address and
/// key) to a node of a volume with clients: a client's storage client finds the
/// copies there, and a copy recognises the client's key (`peers.NODE.DIGEST`, so the
/// same set is sent once).
async fn push_peers(
    shared: &Shared,
    desired: &reconciler::desired::Desired,
    observed: &Observed,
    node: &str,
) -> Result<(), String> {
    use reconciler::observe::NodeObservation;
    use sha2::{Digest, Sha256};
    let peers: Vec<proto::v1::Peer> = desired
        .nodes
        .values()
        .filter(|peer| peer.name != node)
        .filter_map(|peer| match observed.nodes.get(&peer.name) {
            Some(NodeObservation::Reachable { public_key_hex, .. }) => Some(proto::v1::Peer {
                name: peer.name.clone(),
                address: peer.address.clone(),
                public_key_hex: public_key_hex.clone(),
            }),
            _ => None,
        })
        .collect();
    let mut hash = Sha256::new();
    for peer in &peers {
        hash.update(format!(
            "{} {} {}\n",
            peer.name, peer.address, peer.public_key_hex
        ));
    }
    let digest = proto::auth::to_hex(&hash.finalize()[..8]);
    let action = proto::v1::apply_request::Action::SetPeers(proto::v1::SetPeers { peers });
    apply(
        shared,
        &desired.nodes,
        node,
        &format!("peers.{node}.{digest}"),
        action,
    )
    .await
}

/// The writers the authority holds now (runtime volume name → node), without tending.
pub fn writers(store: &dyn EpochStore) -> BTreeMap<String, String> {
    tokio::task::block_in_place(|| EpochAuthority::new(store).all())
        .unwrap_or_default()
        .into_iter()
        .map(|state| (state.volume, state.writer))
        .collect()
}

async fn send(
    shared: &Shared,
    nodes: &BTreeMap<String, DesiredNode>,
    install: &Install,
) -> Result<(), String> {
    let action = proto::v1::apply_request::Action::SetVolumeEpoch(install.request.clone());
    apply(shared, nodes, &install.node, &install.request_id, action).await
}

/// One action on one node, within [`INSTALL_TIMEOUT`].
async fn apply(
    shared: &Shared,
    nodes: &BTreeMap<String, DesiredNode>,
    node: &str,
    request_id: &str,
    action: proto::v1::apply_request::Action,
) -> Result<(), String> {
    let Some(target) = nodes.get(node) else {
        return Err(format!("node {node} is not in the spec"));
    };
    let request = proto::v1::ApplyRequest {
        request_id: request_id.to_owned(),
        action: Some(action),
    };
    match tokio::time::timeout(
        INSTALL_TIMEOUT,
        shared.nodes.apply(node, &target.address, request),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {} s", INSTALL_TIMEOUT.as_secs())),
    }
}
