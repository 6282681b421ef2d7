//! What the console's pages show: one [`Snapshot`] of the controller, built
//! from the same values `/api/v1/status`, `/api/v1/events` and
//! `/api/v1/plans` answer with, and the figures the pages derive from it.
//!
//! Architecture invariant: the pages are pure functions of these values
//! (`pages.rs`); nothing here talks to a node except through
//! `worker::status_answer`, the function behind `/api/v1/status`.

use std::collections::BTreeMap;
use std::sync::Arc;

use compiler::model::{Model, SlaClass};
use reconciler::status::{Status, VmRow};

use crate::events::Event;

/// The controller as one page load sees it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The clock of the page (milliseconds since the Unix epoch); injected so
    /// the rendering tests are deterministic.
    pub now_unix_ms: u64,
    /// What `/api/v1/status` says of the controller.
    pub controller: crate::View,
    /// The applied commit and its compiled model.
    pub applied: Option<Applied>,
    /// `cairn status` of the applied commit, as last observed (none before the
    /// first applied commit).
    pub status: Option<Arc<Status>>,
    /// Why the status could not be built.
    pub status_error: Option<String>,
    /// When the status's nodes were observed (ms since the Unix epoch): the
    /// pages show its age.
    pub status_observed_unix_ms: Option<u64>,
    /// The status was stale or old, and a newer one is being made behind it.
    pub status_revalidating: bool,
    /// The plan held for approval.
    pub held: Option<crate::gate::HeldPlan>,
    /// Recent events, newest first.
    pub events: Vec<Event>,
}

/// The applied commit, compiled.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Full commit id.
    pub commit: String,
    /// Its model.
    pub model: Arc<Model>,
}

/// A problem the overview lists, with a link to its cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong, for people.
    pub what: String,
    /// Where the cause is shown (a console path).
    pub link: String,
}

/// CPU or memory of one node, split by SLA class (VMs the status places on it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Use {
    /// Reserved VMs.
    pub reserved: u64,
    /// On-demand VMs.
    pub on_demand: u64,
    /// Spot VMs.
    pub spot: u64,
    /// What the node offers: allocatable × the site's overcommit ratio.
    pub capacity: u64,
}

impl Use {
    /// What is left (never below zero).
    pub fn free(&self) -> u64 {
        self.capacity
            .saturating_sub(self.reserved + self.on_demand + self.spot)
    }
}

impl Snapshot {
    /// The model of the applied commit.
    pub fn model(&self) -> Option<&Model> {
        self.applied.as_ref().map(|a| a.model.as_ref())
    }

    /// The status's VMs (none without a status).
    pub fn vms(&self) -> &[VmRow] {
        self.status.as_ref().map(|s| &s.vms[..]).unwrap_or_default()
    }

    /// Counts of VMs by state, and of nodes by state.
    pub fn counts(&self) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
        let mut vms = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        if let Some(s) = &self.status {
            for v in &s.vms {
                *vms.entry(v.state.clone()).or_default() += 1;
            }
            for n in &s.nodes {
                *nodes.entry(node_state(n)).or_default() += 1;
            }
        }
        (vms, nodes)
    }

    /// Everything that needs a person, each with where its cause is shown.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = vec![];
        if let Some(last) = &self.controller.last_sync
            && !matches!(last.result.as_str(), "succeeded" | "partial")
        {
            let link = self
                .events
                .iter()
                .find(|e| e.kind == "sync" && e.commit.as_deref() == Some(&last.commit))
                .map(|e| format!("/syncs/{}", e.seq))
                .unwrap_or_else(|| "/syncs".to_owned());
            out.push(Problem {
                what: format!(
                    "the last sync of {} {}{}",
                    short(&last.commit),
                    last.result,
                    last.reason
                        .as_deref()
                        .map(|r| format!(": {}", first_line(r)))
                        .unwrap_or_default()
                ),
                link,
            });
        }
        if let Some(held) = &self.held {
            out.push(Problem {
                what: format!(
                    "plan {} of commit {} is held for approval",
                    held.plan_id,
                    short(&held.commit)
                ),
                link: "/syncs#held".to_owned(),
            });
        }
        if self.controller.paused {
            out.push(Problem {
                what: "the controller is paused: nothing is applied automatically".to_owned(),
                link: "/events?kind=paused".to_owned(),
            });
        }
        if let Some(e) = &self.status_error {
            out.push(Problem {
                what: format!("the status cannot be read: {e}"),
                link: "/events".to_owned(),
            });
        }
        let Some(status) = &self.status else {
            return out;
        };
        for n in &status.nodes {
            let state = node_state(n);
            if state != "ready" {
                out.push(Problem {
                    what: format!(
                        "node {} is {state}{}",
                        n.name,
                        n.error
                            .as_deref()
                            .map(|e| format!(": {}", first_line(e)))
                            .unwrap_or_default()
                    ),
                    link: format!("/topology#node-{}", n.name),
                });
            }
        }
        for v in &status.vms {
            if v.state != "running" || v.drift != "none" {
                let why = if v.drift != "none" {
                    format!(" (drift: {})", v.drift)
                } else {
                    String::new()
                };
                out.push(Problem {
                    what: format!("vm {} is {} on {}{why}", v.name, v.state, v.node),
                    link: vm_path(&v.name),
                });
            }
        }
        for name in &status.unplaced {
            out.push(Problem {
                what: format!("vm {name} has no node"),
                link: vm_path(name),
            });
        }
        for b in &status.bonds {
            if b.health != "healthy" {
                out.push(Problem {
                    what: format!("bond {} on {} is {}", b.name, b.node, b.health),
                    link: format!("/topology#node-{}", b.node),
                });
            }
        }
        for v in &status.volumes {
            if v.health != "healthy" {
                out.push(Problem {
                    what: format!("volume {} on {} is {}", v.name, v.node, v.health),
                    link: format!("/topology#node-{}", v.node),
                });
            }
        }
        out
    }

    /// The status's VMs by the node they are on.
    pub fn vms_by_node(&self) -> BTreeMap<&str, Vec<&VmRow>> {
        let mut out: BTreeMap<&str, Vec<&VmRow>> = BTreeMap::new();
        for v in self.vms() {
            out.entry(v.node.as_str()).or_default().push(v);
        }
        out
    }

    /// CPU (vCPUs) and memory (bytes) of `node`: `vms` (those on it) by SLA
    /// class against its overcommitted capacity.
    pub fn node_use(&self, node: &str, vms: &[&VmRow]) -> (Use, Use) {
        let (mut cpu, mut mem) = (Use::default(), Use::default());
        let Some(model) = self.model() else {
            return (cpu, mem);
        };
        if let Some((site, n)) = model
            .sites
            .iter()
            .find_map(|s| s.nodes.iter().find(|n| n.name == node).map(|n| (s, n)))
        {
            cpu.capacity = scaled(n.allocatable.cpu, site.overcommit.cpu);
            mem.capacity = scaled(n.allocatable.memory_bytes, site.overcommit.memory);
        }
        for row in vms {
            let Some(vm) = model.vm(&row.name) else {
                continue;
            };
            let (c, m) = match vm.sla.class {
                SlaClass::Reserved => (&mut cpu.reserved, &mut mem.reserved),
                SlaClass::OnDemand => (&mut cpu.on_demand, &mut mem.on_demand),
                SlaClass::Spot => (&mut cpu.spot, &mut mem.spot),
            };
            *c += u64::from(vm.cpu);
            *m += vm.memory_bytes;
        }
        (cpu, mem)
    }
}

fn scaled(value: u64, ratio: f64) -> u64 {
    (value as f64 * ratio.max(0.0)) as u64
}

/// A node's state word: the controller's lease state, or `unreachable`.
pub fn node_state(n: &reconciler::status::NodeRow) -> String {
    if n.state.is_empty() {
        if n.reachable { "ready" } else { "unreachable" }.to_owned()
    } else {
        n.state.clone()
    }
}

/// The console path of a VM's page.
pub fn vm_path(name: &str) -> String {
    format!("/vms/{}", path_segment(name))
}

/// Percent-encodes a path segment (names are `[a-z0-9-]` in valid specs, but
/// a VM no spec names comes from a node).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The first 12 digits of a commit id.
pub fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// `text` cut to its first `longest` characters, with `…` when cut.
pub fn clip(text: &str, longest: usize) -> String {
    match text.char_indices().nth(longest) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The first line of a text.
pub fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// `3 s ago`, `4 min ago`, `2 h ago`, `5 d ago` (the clock of the snapshot).
pub fn ago(now_unix_ms: u64, at_unix_ms: u64) -> String {
    let s = now_unix_ms.saturating_sub(at_unix_ms) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// Bytes for people: `512 MiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_as_people_write_them() {
        assert_eq!(bytes(512 * 1024 * 1024), "512 MiB");
        assert_eq!(bytes(1536 * 1024 * 1024), "1.5 GiB");
        assert_eq!(bytes(10), "10 B");
        assert_eq!(ago(10_000, 7_000), "3 s ago");
        assert_eq!(ago(3_600_000 * 3, 0), "3 h ago");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path_segment("web-0"), "web-0");
        assert_eq!(path_segment("<a b>/"), "%3Ca%20b%3E%2F");
    }
}
