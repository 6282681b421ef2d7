//! Copies rebuilt and moved, never lost or recreated empty (issue 15 item 7).
//!
//! Every drift check, after the epochs were tended ([`crate::volume_epochs::tend`]),
//! each volume the epoch authority holds is looked at ([`tend`]). A copy is *lost*
//! when its node left the spec (removed or drained out of it), or is failed or
//! unreachable and has not renewed its lease for at least the rebuild delay
//! ([`REBUILD_DELAY`], `CAIRN_REBUILD_DELAY_MS`; a dead node's state goes from
//! `failed` to `unreachable` and back, its silence only grows): a node that comes
//! back sooner only resynchronises what changed. For a volume with
//! lost copies, one step at a time ([`next_step`]):
//! 1. while it has fewer live copies than its pool keeps (`replicas`),
//!    a new copy goes to a node the pool allows: in the writer's site, not in
//!    maintenance, holding no copy and no client of the volume, in a failure domain (node, rack or site as
//!    the pool says) no live copy is in, with enough room left on the pool's disks
//!    there by the placement's accounting; most room first. `AddVolumeCopy` on the
//!    writer first (it makes the copy and marks every allocated byte dirty for it),
//!    then the authority's `new_copy` (the copy outside the in-sync set); the writer
//!    ships the whole volume and reports it caught up, and the authority adds it to
//!    the in-sync set ([`reconciler::epochs::react`]);
//! 2. while a new copy catches up, nothing else happens to the volume;
//! 3. once enough live copies are in sync, the lost copy is dropped: the authority's
//!    `drop_copy` (installed on the live copies, the writer last), then
//!    `RemoveVolumeCopy` on the writer (which deletes it on its node if it answers).
//!
//! A copy the writer still lists but the authority dropped is removed from the
//! writer again on the next check (a lost `RemoveVolumeCopy` is retried). A lost
//! writer's copy is left alone: the fail-over moves the writer first.
//!
//! A copy on a node in maintenance (the spec's `maintenance=#true`, "drain live", or
//! the operator's `cairn node maintenance --on`) is *leaving*: it is moved live by the
//! same steps. It stays in the in-sync set and takes every write while its
//! replacement catches up from the writer, so the volume never has fewer in-sync
//! copies than before; only once the replacement joined the set under a new epoch is
//! the leaving copy dropped (and deleted on its node, which still answers). A leaving
//! *writer's* copy gets its replacement too, but is dropped only after the writer
//! moved (the VM's live migration hands the writer over; nothing here does).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use compiler::place::Placement;
use reconciler::desired::DesiredNode;
use reconciler::epochs::{EpochAuthority, EpochStore, Install, VolumeEpoch};
use reconciler::nodes::NodeApi;
use reconciler::observe::{NodeObservation, Observed};

use crate::Shared;
use crate::events::Event;

/// How long a node stays `failed` before its copies are rebuilt elsewhere: long
/// enough for a reboot, whose copies then resynchronise only what changed.
pub const REBUILD_DELAY: Duration = Duration::from_secs(60);

/// Environment variable overriding [`REBUILD_DELAY`], in milliseconds (tests).
pub const REBUILD_DELAY_ENV: &str = "CAIRN_REBUILD_DELAY_MS";

/// How long one `AddVolumeCopy` may take (the new copy is created, the whole volume
/// marked dirty; the shipping happens afterwards).
const ADD_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one `RemoveVolumeCopy` or `SetVolumeEpoch` may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The rebuild delay from the environment, else [`REBUILD_DELAY`].
pub fn rebuild_delay() -> Duration {
    std::env::var(REBUILD_DELAY_ENV)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(REBUILD_DELAY)
}

/// A node a new copy may go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The node.
    pub node: String,
    /// Its failure domain for the volume's pool (its name, rack or site).
    pub domain: String,
    /// Bytes left on the pool's disks there.
    pub free_bytes: u64,
}

/// What happens next to one volume's copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A new copy on `node`.
    Add {
        /// The node.
        node: String,
    },
    /// The lost copy on `node` is forgotten.
    Drop {
        /// The node.
        node: String,
    },
    /// Nothing now, and why.
    Wait(String),
}

/// The next step for a volume at `state` whose copies on `lost` nodes are lost and
/// whose copies on `leaving` nodes (in maintenance: still live) are to be moved, with
/// `wanted` copies in its layout and `size_bytes`; `domains` gives each node's
/// failure domain, `candidates` the nodes a copy may go to. `None`: nothing is lost
/// or leaving.
pub fn next_step(
    state: &VolumeEpoch,
    lost: &BTreeSet<String>,
    leaving: &BTreeSet<String>,
    wanted: usize,
    size_bytes: u64,
    domains: &BTreeMap<String, String>,
    candidates: &[Candidate],
) -> Option<Step> {
    let lost_here: Vec<&String> = state.copies.intersection(lost).collect();
    let leaving_here: Vec<&String> = state
        .copies
        .intersection(leaving)
        .filter(|node| !lost.contains(*node))
        .collect();
    if lost_here.is_empty() && leaving_here.is_empty() {
        return None;
    }
    if lost_here.contains(&&state.writer) {
        return Some(Step::Wait(format!(
            "the writer's copy on node {} is lost: the writer moves first",
            state.writer
        )));
    }
    // Lost copies go first, then leaving ones; the writer's copy never (it is
    // dropped after the writer moved).
    let droppable = lost_here
        .iter()
        .chain(leaving_here.iter())
        .find(|node| ***node != state.writer);
    let live: Vec<&String> = state
        .copies
        .iter()
        .filter(|node| !lost.contains(*node) && !leaving.contains(*node))
        .collect();
    let catching: Vec<&str> = live
        .iter()
        .filter(|node| !state.in_sync.contains(**node))
        .map(|node| node.as_str())
        .collect();
    if !catching.is_empty() {
        return Some(Step::Wait(format!(
            "the copy on {} is catching up",
            catching.join(", ")
        )));
    }
    if live.len() >= wanted {
        return Some(match droppable {
            Some(node) => Step::Drop {
                node: (**node).clone(),
            },
            None => Step::Wait(format!(
                "the writer's copy on node {} is leaving (its node is in maintenance): {} in sync without it; it is dropped once the writer moved (the VM's live migration hands it over)",
                state.writer,
                live.iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        });
    }
    let taken: BTreeSet<&str> = live
        .iter()
        .filter_map(|node| domains.get(*node).map(String::as_str))
        .collect();
    let best = candidates
        .iter()
        .filter(|c| !state.copies.contains(&c.node) && !state.clients.contains(&c.node))
        .filter(|c| !taken.contains(c.domain.as_str()))
        .filter(|c| c.free_bytes >= size_bytes)
        .max_by(|a, b| {
            a.free_bytes
                .cmp(&b.free_bytes)
                .then_with(|| b.node.cmp(&a.node))
        });
    Some(match best {
        Some(candidate) => Step::Add {
            node: candidate.node.clone(),
        },
        None => Step::Wait(format!(
            "no node the pool allows has {size_bytes} bytes free in a failure domain without a live copy (live copies: {}; candidates: {})",
            live.iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if candidates.is_empty() {
                "none".to_string()
            } else {
                candidates
                    .iter()
                    .map(|c| format!("{} ({}, {} bytes free)", c.node, c.domain, c.free_bytes))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )),
    })
}

/// The failure domains of every node of `site` for `pool`, the nodes a copy of the
/// pool may go to there (reachable, not failed) with the room the placement leaves on
/// the pool's disks, and how many copies the pool keeps (`None`: no such pool).
fn candidates_of(
    model: &compiler::Model,
    placement: &Placement,
    site: &str,
    pool: &str,
    usable: impl Fn(&str) -> bool,
) -> Option<(BTreeMap<String, String>, Vec<Candidate>, usize)> {
    let mut domains = BTreeMap::new();
    let mut candidates = Vec::new();
    let site = model.sites.iter().find(|s| s.name == site)?;
    let pool = site.pools.iter().find(|p| p.name == pool)?;
    let mut used: BTreeMap<&str, u64> = BTreeMap::new();
    for volume in &placement.volumes {
        for copy in volume.columns.iter().flatten() {
            *used.entry(copy.as_str()).or_default() += volume.column_bytes;
        }
    }
    for node in &site.nodes {
        let domain = match pool.failure_domain {
            compiler::model::Domain::Node => node.name.clone(),
            compiler::model::Domain::Rack => node.rack.clone(),
            compiler::model::Domain::Site => node.site.clone(),
        };
        domains.insert(node.name.clone(), domain.clone());
        let disks: Vec<&compiler::model::Disk> = node
            .disks
            .iter()
            .filter(|d| d.class == pool.disk_class)
            .collect();
        if disks.is_empty() || !usable(&node.name) {
            continue;
        }
        let free_bytes = disks
            .iter()
            .map(|d| {
                let capacity = (d.size_bytes as f64 * pool.thin_overcommit) as u64;
                let taken = used
                    .get(format!("{}/{}", node.name, d.name).as_str())
                    .copied()
                    .unwrap_or(0);
                capacity.saturating_sub(taken)
            })
            .sum();
        candidates.push(Candidate {
            node: node.name.clone(),
            domain,
            free_bytes,
        });
    }
    Some((domains, candidates, pool.replicas.max(1) as usize))
}

/// One rebuild check (see the module documentation).
pub async fn tend(
    shared: &Shared,
    store: &dyn EpochStore,
    model: &compiler::Model,
    spec: &BTreeMap<String, DesiredNode>,
    placement: &Placement,
    observed: &Observed,
    failed: &BTreeSet<String>,
) {
    let delay = rebuild_delay();
    let reachable = |node: &str| {
        matches!(
            observed.nodes.get(node),
            Some(NodeObservation::Reachable { .. })
        )
    };
    let lost: BTreeSet<String> = {
        let all = tokio::task::block_in_place(|| EpochAuthority::new(store).all());
        all.unwrap_or_default()
            .iter()
            .flat_map(|state| state.copies.iter())
            .filter(|node| {
                !spec.contains_key(*node)
                    || ((failed.contains(*node) || !reachable(node))
                        && shared.leases.silent_for(node) >= delay)
            })
            .cloned()
            .collect()
    };
    let states =
        tokio::task::block_in_place(|| EpochAuthority::new(store).all()).unwrap_or_default();
    let closed = crate::maintenance::closed_nodes(shared, model);
    let mut events = Vec::new();
    for state in states {
        // A copy the authority dropped that the writer still lists.
        if let Some(NodeObservation::Reachable { volumes, .. }) = observed.nodes.get(&state.writer)
            && let Some(volume) = volumes.get(&state.volume)
        {
            for stale in volume
                .replica_peers
                .iter()
                .filter(|node| !state.copies.contains(*node))
            {
                events.push(remove_on_writer(shared, spec, &state, stale, "dropped copy").await);
            }
        }
        let Some(layout) = placement
            .volumes
            .iter()
            .find(|v| v.runtime_name() == state.volume)
        else {
            continue;
        };
        let site = spec
            .get(&state.writer)
            .map(|n| n.site.clone())
            .unwrap_or_default();
        // The copies the pool keeps (the stored layout may list a new copy beside the
        // lost one already).
        // A node in maintenance (the spec's flag or the operator's) takes no new copy,
        // as the placement gives it none.
        let usable = |node: &str| {
            reachable(node)
                && !failed.contains(node)
                && spec.contains_key(node)
                && !closed.contains(node)
        };
        let Some((domains, candidates, wanted)) =
            candidates_of(model, placement, &site, &layout.pool, usable)
        else {
            continue;
        };
        let Some(step) = next_step(
            &state,
            &lost,
            &closed,
            wanted,
            layout.size_bytes,
            &domains,
            &candidates,
        ) else {
            continue;
        };
        let event = match step {
            Step::Wait(why) => Event::new("volume-copy", "waiting")
                .object(format!("volume {}", state.volume))
                .reason(why),
            Step::Add { node } => {
                let why = replaced(&state, &lost, &closed);
                add(shared, store, spec, &state, &node, &why).await
            }
            Step::Drop { node } => {
                let why = if lost.contains(&node) {
                    "its node failed long ago or left the spec, and enough copies are in sync without it".to_string()
                } else {
                    format!(
                        "moved off node {node} (in maintenance): enough copies are in sync without it"
                    )
                };
                drop_copy(shared, store, spec, &state, &node, &why).await
            }
        };
        events.push(event);
    }
    if !events.is_empty() {
        shared.record(events);
    }
}

async fn call(
    shared: &Shared,
    spec: &BTreeMap<String, DesiredNode>,
    node: &str,
    request_id: String,
    action: proto::v1::apply_request::Action,
    within: Duration,
) -> Result<(), String> {
    let Some(desired) = spec.get(node) else {
        return Err(format!("node {node} is not in the spec"));
    };
    let request = proto::v1::ApplyRequest {
        request_id,
        action: Some(action),
    };
    match tokio::time::timeout(within, shared.nodes.apply(node, &desired.address, request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!(
            "node {node} gave no answer within {} s",
            within.as_secs()
        )),
    }
}

/// Why a volume gets a new copy: the copies it replaces, lost ones first, then those
/// on nodes in maintenance (`leaving`).
fn replaced(state: &VolumeEpoch, lost: &BTreeSet<String>, leaving: &BTreeSet<String>) -> String {
    let names = |set: &BTreeSet<String>, skip: &BTreeSet<String>| -> Vec<String> {
        state
            .copies
            .intersection(set)
            .filter(|node| !skip.contains(*node))
            .cloned()
            .collect()
    };
    let lost_here = names(lost, &BTreeSet::new());
    let leaving_here = names(leaving, lost);
    let mut why = Vec::new();
    if !lost_here.is_empty() {
        why.push(format!(
            "rebuild of the lost copy on {}",
            lost_here.join(", ")
        ));
    }
    if !leaving_here.is_empty() {
        why.push(format!(
            "live move of the copy on {} (in maintenance)",
            leaving_here.join(", ")
        ));
    }
    why.join("; ")
}

/// A new copy on `node`: made by the writer, then the authority's; `reason` says which
/// copies it replaces.
async fn add(
    shared: &Shared,
    store: &dyn EpochStore,
    spec: &BTreeMap<String, DesiredNode>,
    state: &VolumeEpoch,
    node: &str,
    reason: &str,
) -> Event {
    let object = format!("volume {}", state.volume);
    let action = proto::v1::apply_request::Action::AddVolumeCopy(proto::v1::AddVolumeCopy {
        volume: state.volume.clone(),
        peer: Some(proto::v1::Peer {
            name: node.to_string(),
            address: spec
                .get(node)
                .map(|n| n.address.clone())
                .unwrap_or_default(),
            public_key_hex: String::new(),
        }),
    });
    let id = format!("copy.add.{}.{node}.{}", state.volume, state.epoch);
    if let Err(why) = call(shared, spec, &state.writer, id, action, ADD_TIMEOUT).await {
        return Event::new("volume-copy", "not added")
            .object(object)
            .reason(format!(
                "a new copy on {node} (writer {}): {why}",
                state.writer
            ));
    }
    let changed = tokio::task::block_in_place(|| {
        EpochAuthority::new(store).new_copy(&state.volume, state.epoch, node, reason)
    });
    match changed {
        Ok(next) => {
            // The new copy gets the epoch now, so the writer starts shipping at once
            // (it ships nothing to a copy that lacks it); a refusal is retried by the
            // next observation's `react`.
            if let Err(event) = install_everywhere(shared, spec, &next).await {
                shared.record(vec![event]);
            }
            Event::new("volume-copy", "rebuilding").object(object).reason(format!(
                "epoch {}: new copy on {node} made by the writer {} ({reason}); it joins the in-sync set once it holds every allocated byte",
                next.epoch, state.writer
            ))
        }
        Err(error) => Event::new("volume-copy", "not added")
            .object(object)
            .reason(format!(
                "the writer made the copy on {node}; the authority: {error}"
            )),
    }
}

/// The copy on `node` (lost, or moved off a node in maintenance) is forgotten: the
/// authority (`why` journaled), its epoch on the remaining copies (the writer last),
/// then the writer, which deletes it on its node if that answers.
async fn drop_copy(
    shared: &Shared,
    store: &dyn EpochStore,
    spec: &BTreeMap<String, DesiredNode>,
    state: &VolumeEpoch,
    node: &str,
    why: &str,
) -> Event {
    let object = format!("volume {}", state.volume);
    let changed = tokio::task::block_in_place(|| {
        EpochAuthority::new(store).drop_copy(&state.volume, state.epoch, node, why)
    });
    let next = match changed {
        Ok(next) => next,
        Err(error) => {
            return Event::new("volume-copy", "not dropped")
                .object(object)
                .reason(error.to_string());
        }
    };
    if let Err(event) = install_everywhere(shared, spec, &next).await {
        return event;
    }
    let what = if why.starts_with("moved off") {
        "moved copy"
    } else {
        "lost copy"
    };
    remove_on_writer(shared, spec, &next, node, what).await
}

/// Installs `next` on every copy it names (the writer last), so the change takes
/// effect now rather than at the next observation. A copy outside the in-sync set
/// that does not take it (a lost node) is passed over; an in-sync one stops the
/// install before the writer (whose writes it would refuse), and is the event.
async fn install_everywhere(
    shared: &Shared,
    spec: &BTreeMap<String, DesiredNode>,
    next: &VolumeEpoch,
) -> Result<(), Event> {
    let mut order: Vec<&String> = next.copies.iter().collect();
    order.sort_by_key(|copy| **copy == next.writer);
    for copy in order {
        let install = Install {
            node: copy.clone(),
            request_id: reconciler::epochs::request_id(next, copy),
            request: reconciler::epochs::install(next),
        };
        let action = proto::v1::apply_request::Action::SetVolumeEpoch(install.request);
        if let Err(why) = call(shared, spec, copy, install.request_id, action, CALL_TIMEOUT).await
            && next.in_sync.contains(copy)
        {
            return Err(Event::new("volume-epoch", "not installed")
                .object(format!("volume {} on node {copy}", next.volume))
                .reason(why));
        }
    }
    Ok(())
}

/// `RemoveVolumeCopy` of `node`'s copy on the writer; `what` names it in the event
/// ("lost copy", "moved copy").
async fn remove_on_writer(
    shared: &Shared,
    spec: &BTreeMap<String, DesiredNode>,
    state: &VolumeEpoch,
    node: &str,
    what: &str,
) -> Event {
    let action = proto::v1::apply_request::Action::RemoveVolumeCopy(proto::v1::RemoveVolumeCopy {
        volume: state.volume.clone(),
        node: node.to_string(),
    });
    let id = format!("copy.remove.{}.{node}.{}", state.volume, state.epoch);
    let object = format!("volume {}", state.volume);
    match call(shared, spec, &state.writer, id, action, CALL_TIMEOUT).await {
        Ok(()) => Event::new("volume-copy", "dropped")
            .object(object)
            .reason(format!(
                "epoch {}: the {what} on {node} is forgotten (copies: {})",
                state.epoch,
                state.copies.iter().cloned().collect::<Vec<_>>().join(", ")
            )),
        Err(why) => Event::new("volume-copy", "not dropped")
            .object(object)
            .reason(format!(
                "RemoveVolumeCopy of {node} on the writer {}: {why}",
                state.writer
            )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    fn state(copies: &[&str], in_sync: &[&str]) -> VolumeEpoch {
        VolumeEpoch {
            volume: "web-0-data".into(),
            epoch: 4,
            writer: "a".into(),
            in_sync: names(in_sync),
            copies: names(copies),
            clients: names(&["e"]),
        }
    }

    fn candidate(node: &str, domain: &str, free_bytes: u64) -> Candidate {
        Candidate {
            node: node.into(),
            domain: domain.into(),
            free_bytes,
        }
    }

    #[test]
    fn a_lost_copy_is_rebuilt_where_the_pool_allows_then_dropped() {
        let domains: BTreeMap<String, String> = [
            ("a", "r1"),
            ("b", "r2"),
            ("c", "r1"),
            ("d", "r3"),
            ("e", "r4"),
        ]
        .iter()
        .map(|(n, d)| (n.to_string(), d.to_string()))
        .collect();
        let candidates = vec![
            candidate("a", "r1", 1 << 40),
            candidate("c", "r1", 1 << 40),
            candidate("d", "r3", 10 << 30),
            candidate("e", "r4", 1 << 40),
            candidate("f", "r5", 1 << 20),
        ];
        let lost = names(&["b"]);
        let none = BTreeSet::new();
        // Nothing lost: nothing to do.
        assert_eq!(
            next_step(
                &state(&["a", "c"], &["a", "c"]),
                &lost,
                &none,
                2,
                1 << 30,
                &domains,
                &candidates
            ),
            None
        );
        // b lost: not on a (holds a copy), c (rack r1 holds a's copy), e (a client),
        // f (too small): on d.
        let lost_b = state(&["a", "b"], &["a"]);
        assert_eq!(
            next_step(&lost_b, &lost, &none, 2, 1 << 30, &domains, &candidates),
            Some(Step::Add { node: "d".into() })
        );
        // While d catches up, nothing else.
        let catching = state(&["a", "b", "d"], &["a"]);
        assert!(matches!(
            next_step(&catching, &lost, &none, 2, 1 << 30, &domains, &candidates),
            Some(Step::Wait(why)) if why.contains("on d is catching up")
        ));
        // d in sync: b is dropped.
        let rebuilt = state(&["a", "b", "d"], &["a", "d"]);
        assert_eq!(
            next_step(&rebuilt, &lost, &none, 2, 1 << 30, &domains, &candidates),
            Some(Step::Drop { node: "b".into() })
        );
        // No room anywhere allowed: waits, saying why.
        assert!(matches!(
            next_step(&lost_b, &lost, &none, 2, 1 << 40, &domains, &candidates),
            Some(Step::Wait(why)) if why.contains("no node the pool allows")
        ));
        // The writer's own copy lost: the writer moves first.
        assert!(matches!(
            next_step(&lost_b, &names(&["a"]), &none, 2, 1 << 30, &domains, &candidates),
            Some(Step::Wait(why)) if why.contains("the writer moves first")
        ));
    }

    #[test]
    fn a_copy_on_a_node_in_maintenance_is_moved_live_and_dropped_only_once_its_replacement_is_in_sync()
     {
        let domains: BTreeMap<String, String> = [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]
            .iter()
            .map(|(n, d)| (n.to_string(), d.to_string()))
            .collect();
        let candidates = vec![candidate("c", "c", 1 << 40), candidate("d", "d", 1 << 30)];
        let none = BTreeSet::new();
        let leaving = names(&["b"]);
        // b is in maintenance, its copy in sync and live: a new copy goes to c (the
        // most room) while b keeps taking writes.
        let before = state(&["a", "b"], &["a", "b"]);
        assert_eq!(
            next_step(&before, &none, &leaving, 2, 1 << 30, &domains, &candidates),
            Some(Step::Add { node: "c".into() })
        );
        // b is never dropped while c catches up.
        let catching = state(&["a", "b", "c"], &["a", "b"]);
        assert!(matches!(
            next_step(&catching, &none, &leaving, 2, 1 << 30, &domains, &candidates),
            Some(Step::Wait(why)) if why.contains("on c is catching up")
        ));
        // c in sync: b is dropped (though it is in sync itself).
        let moved = state(&["a", "b", "c"], &["a", "b", "c"]);
        assert_eq!(
            next_step(&moved, &none, &leaving, 2, 1 << 30, &domains, &candidates),
            Some(Step::Drop { node: "b".into() })
        );
        // Out of maintenance before the end: nothing more moves (three copies stay).
        assert_eq!(
            next_step(&moved, &none, &none, 2, 1 << 30, &domains, &candidates),
            None
        );
        // A lost copy is dropped before a leaving one.
        assert_eq!(
            next_step(
                &state(&["a", "b", "c", "d"], &["a", "b", "c", "d"]),
                &names(&["d"]),
                &leaving,
                2,
                1 << 30,
                &domains,
                &candidates
            ),
            Some(Step::Drop { node: "d".into() })
        );
        // The writer's node in maintenance: its replacement is made, but the writer's
        // copy stays until the writer moved.
        let writer_leaving = names(&["a"]);
        let only = state(&["a", "b"], &["a", "b"]);
        assert_eq!(
            next_step(
                &only,
                &none,
                &writer_leaving,
                2,
                1 << 30,
                &domains,
                &candidates
            ),
            Some(Step::Add { node: "c".into() })
        );
        let replaced = state(&["a", "b", "c"], &["a", "b", "c"]);
        assert!(matches!(
            next_step(&replaced, &none, &writer_leaving, 2, 1 << 30, &domains, &candidates),
            Some(Step::Wait(why)) if why.contains("dropped once the writer moved")
        ));
        // A leaving copy is replaced in another failure domain than the live ones.
        let racks: BTreeMap<String, String> = [("a", "r1"), ("b", "r2"), ("c", "r1"), ("d", "r3")]
            .iter()
            .map(|(n, d)| (n.to_string(), d.to_string()))
            .collect();
        let in_racks = vec![candidate("c", "r1", 1 << 40), candidate("d", "r3", 1 << 30)];
        assert_eq!(
            next_step(&before, &none, &leaving, 2, 1 << 30, &racks, &in_racks),
            Some(Step::Add { node: "d".into() })
        );
    }
}
