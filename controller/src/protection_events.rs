//! Protection failures as controller events (issue 18). The nodes run the snapshot
//! schedules and the replications by themselves and report what failed in Observe
//! (`ProtectionStatus.last_error` and `missed`, `ReplicationStatus.last_error` on the
//! source); every drift check compares that with the previous observation and records
//! an event `protection` when a failure appears or changes (`failed`, the node's
//! words as the reason), when a schedule missed runs (`missed`), and when a failing
//! one works again (`ok`). A node that does not answer changes nothing here (its
//! silence is a `node` event already).

use std::collections::BTreeMap;

use reconciler::observe::{NodeObservation, Observed};

use crate::events::Event;

/// What each schedule and replication last reported: `snapshots VM on NODE` or
/// `replication VOLUME on NODE` → (error, missed runs).
#[derive(Debug, Default)]
pub struct ProtectionEvents {
    last: BTreeMap<String, (String, u64)>,
}

impl ProtectionEvents {
    /// The events of this observation against the previous one.
    pub fn observe(&mut self, observed: &Observed) -> Vec<Event> {
        let mut events = vec![];
        let mut seen = BTreeMap::new();
        for (node, observation) in &observed.nodes {
            let NodeObservation::Reachable {
                protections,
                replications,
                ..
            } = observation
            else {
                // Unknown now: keep what it last said.
                let prefix = format!(" on {node}");
                for (key, value) in self.last.iter().filter(|(k, _)| k.ends_with(&prefix)) {
                    seen.insert(key.clone(), value.clone());
                }
                continue;
            };
            for (vm, p) in protections {
                let key = format!("snapshots {vm} on {node}");
                let was = self.last.get(&key).cloned().unwrap_or_default();
                if p.missed > was.1 {
                    events.push(
                        Event::new("protection", "missed")
                            .object(key.clone())
                            .reason(format!(
                                "{} scheduled snapshot run(s) missed (plan {}, every {}){}",
                                p.missed - was.1,
                                p.plan,
                                compiler::units::format_duration(p.every_ms),
                                if p.last_error.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {}", p.last_error)
                                }
                            )),
                    );
                }
                changed(&mut events, &key, &was.0, &p.last_error, || {
                    format!("its last snapshot is {}", p.last_snapshot)
                });
                seen.insert(key, (p.last_error.clone(), p.missed));
            }
            for (volume, r) in replications.iter().filter(|(_, r)| r.role == "source") {
                let key = format!("replication {volume} on {node}");
                let was = self.last.get(&key).cloned().unwrap_or_default();
                changed(&mut events, &key, &was.0, &r.last_error, || {
                    format!(
                        "{} on {} holds {} now",
                        r.peer_volume, r.peer, r.last_replicated
                    )
                });
                seen.insert(key, (r.last_error.clone(), 0));
            }
        }
        self.last = seen;
        events
    }
}

/// A failure that appeared or changed: `failed`; one that cleared: `ok`.
fn changed(
    events: &mut Vec<Event>,
    key: &str,
    was: &str,
    now: &str,
    recovered: impl FnOnce() -> String,
) {
    if now == was {
        return;
    }
    if now.is_empty() {
        events.push(
            Event::new("protection", "ok")
                .object(key.to_owned())
                .reason(format!("works again: {}", recovered())),
        );
    } else {
        events.push(
            Event::new("protection", "failed")
                .object(key.to_owned())
                .reason(now.to_owned()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reconciler::observe::{ObservedProtection, ObservedReplication};

    fn node(protection: ObservedProtection, replication: ObservedReplication) -> NodeObservation {
        NodeObservation::Reachable {
            public_key_hex: String::new(),
            vms: Default::default(),
            volumes: Default::default(),
            bonds: Default::default(),
            networking: Default::default(),
            protections: [("db".to_owned(), protection)].into(),
            replications: [("db-data".to_owned(), replication)].into(),
        }
    }

    fn words(events: &[Event]) -> Vec<(String, String, String)> {
        events
            .iter()
            .map(|e| {
                (
                    e.result.clone(),
                    e.object.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn a_failure_is_one_event_when_it_appears_and_one_when_it_clears() {
        let mut tracker = ProtectionEvents::default();
        let source = |error: &str| ObservedReplication {
            role: "source".into(),
            peer: "west-1".into(),
            peer_volume: "db-data-dr-west".into(),
            last_replicated: "auto-5".into(),
            last_error: error.into(),
            ..Default::default()
        };
        let schedule = |missed: u64| ObservedProtection {
            plan: "dr".into(),
            every_ms: 1000,
            missed,
            last_snapshot: "auto-5".into(),
            ..Default::default()
        };
        let mut observed = Observed::default();
        observed
            .nodes
            .insert("east-1".into(), node(schedule(0), source("")));
        assert!(tracker.observe(&observed).is_empty());
        observed.nodes.insert(
            "east-1".into(),
            node(schedule(2), source("transfer failed: unavailable")),
        );
        let events = words(&tracker.observe(&observed));
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].0, "missed");
        assert!(
            events[0]
                .2
                .starts_with("2 scheduled snapshot run(s) missed"),
            "{events:?}"
        );
        assert_eq!(
            events[1],
            (
                "failed".to_owned(),
                "replication db-data on east-1".to_owned(),
                "transfer failed: unavailable".to_owned()
            )
        );
        // The same failure again: nothing new; the node silent: nothing either.
        assert!(tracker.observe(&observed).is_empty());
        observed.nodes.insert(
            "east-1".into(),
            NodeObservation::Unreachable {
                error: "timeout".into(),
            },
        );
        assert!(tracker.observe(&observed).is_empty());
        observed
            .nodes
            .insert("east-1".into(), node(schedule(2), source("")));
        let events = words(&tracker.observe(&observed));
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].0, "ok");
        assert!(
            events[0]
                .2
                .contains("db-data-dr-west on west-1 holds auto-5"),
            "{events:?}"
        );
    }
}
