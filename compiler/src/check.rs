//! Resolution, checking and expansion: the typed spec to the [`Model`].
//!
//! Resolves every name (with "did you mean" for unknown ones), applies
//! node-class inheritance and defaults, expands vm-groups, and checks every
//! rule of SPEC.md that does not need placement. Like the lowering, it keeps
//! going after an error and always returns the model it could build.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::diag::{Diagnostic, Span, suggestion};
use crate::lower::is_dns_label;
use crate::model::*;
use crate::source::Sources;
use crate::spec::{self, Name, Spanned, SpecSet};
use crate::units::{format_bandwidth, format_size};
use vm_config::limits::LINUX_VCPUS;

/// Where each named object was declared, for messages of later phases
/// (placement explanations, policy results).
#[derive(Debug, Clone, Default)]
pub struct SpanIndex {
    objects: BTreeMap<(&'static str, String), Span>,
}

impl SpanIndex {
    fn insert(&mut self, kind: &'static str, name: &str, span: Span) {
        self.objects.entry((kind, name.to_owned())).or_insert(span);
    }

    /// The span of an object: kind is `vm`, `site`, `node`, `tenant`, `pool`
    /// (as `site/pool`), `affinity`, … as in the spec language.
    pub fn get(&self, kind: &'static str, name: &str) -> Option<Span> {
        self.objects.get(&(kind, name.to_owned())).copied()
    }
}

/// The built-in SLA profiles.
pub const BUILTIN_SLA: &[(&str, SlaClass, u32)] = &[
    ("reserved", SlaClass::Reserved, 1000),
    ("on-demand", SlaClass::OnDemand, 500),
    ("spot", SlaClass::Spot, 0),
];

/// The built-in guest images the runtime ships.
pub const BUILTIN_IMAGES: &[&str] = &[vm_config::BUILTIN_GUEST];

/// Checks a spec set and builds the model.
pub fn check(sources: &Sources, set: &SpecSet, diags: &mut Vec<Diagnostic>) -> (Model, SpanIndex) {
    let mut c = Checker {
        sources,
        diags,
        spans: SpanIndex::default(),
    };
    let model = c.run(set);
    (model, c.spans)
}

struct Checker<'a> {
    sources: &'a Sources,
    diags: &'a mut Vec<Diagnostic>,
    spans: SpanIndex,
}

/// Reports names declared twice, pointing at both. Returns the first
/// declaration of each name.
fn unique<'n>(
    diags: &mut Vec<Diagnostic>,
    kind: &str,
    scope: &str,
    names: impl IntoIterator<Item = &'n Name>,
) -> BTreeMap<String, Span> {
    let mut seen: BTreeMap<String, Span> = BTreeMap::new();
    for name in names {
        if let Some(first) = seen.get(&name.value) {
            diags.push(
                Diagnostic::error(
                    "cairn::resolve::duplicate_name",
                    name.span,
                    format!("{kind} `{}` is defined twice{scope}", name.value),
                )
                .with_label("defined again here")
                .and_label(*first, "first defined here")
                .with_help(format!(
                    "{kind} names must be unique{scope}; rename or remove one of them"
                )),
            );
        } else {
            seen.insert(name.value.clone(), name.span);
        }
    }
    seen
}

fn unknown(
    code: &'static str,
    r: &Name,
    what: &str,
    owner: &str,
    candidates: &[&str],
) -> Diagnostic {
    Diagnostic::error(
        code,
        r.span,
        format!(
            "{owner} refers to {what} `{}`, which is not defined",
            r.value
        ),
    )
    .with_label(format!("unknown {what}"))
    .with_help(suggestion(&r.value, candidates, what))
}

fn keys(map: &BTreeMap<String, impl Sized>) -> Vec<&str> {
    map.keys().map(String::as_str).collect()
}

/// Adds `disks`/`nics` by name, letting later ones (the node's) replace
/// earlier ones (the class's) of the same name.
fn merge_by_name<T: Clone>(base: &[T], extra: &[T], name: impl Fn(&T) -> &str) -> Vec<T> {
    let mut out: Vec<T> = base.to_vec();
    for e in extra {
        match out.iter().position(|b| name(b) == name(e)) {
            Some(i) => out[i] = e.clone(),
            None => out.push(e.clone()),
        }
    }
    out
}

impl Checker<'_> {
    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn run(&mut self, set: &SpecSet) -> Model {
        let node_classes = self.node_classes(set);
        let sites = self.sites(set, &node_classes);
        let sla_profiles = self.sla_profiles(set);
        let images = self.images(set);
        let mut tenants = self.tenants(set, &sites);
        let (mut vms, vm_groups) = self.vms(set, &sites, &tenants, &sla_profiles, &images);
        // Everything derived from the VM list below (affinity and plan
        // membership) follows name order, not declaration order.
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        self.quotas(set, &mut tenants, &vms);
        self.reserved_capacity(set, &sites, &vms);
        let affinities = self.affinities(set, &vms);
        let protection_plans = self.protection_plans(set, &sites, &mut vms);
        let mut model = Model {
            format_version: FORMAT_VERSION,
            node_classes: node_classes.into_values().collect(),
            sites,
            tenants,
            sla_profiles: sla_profiles.into_values().collect(),
            images: images.into_values().collect(),
            vms,
            vm_groups,
            affinities,
            protection_plans,
        };
        model.sites.sort_by(|a, b| a.name.cmp(&b.name));
        model.tenants.sort_by(|a, b| a.name.cmp(&b.name));
        model.vms.sort_by(|a, b| a.name.cmp(&b.name));
        model.vm_groups.sort_by(|a, b| a.name.cmp(&b.name));
        model.affinities.sort_by(|a, b| a.name.cmp(&b.name));
        model.protection_plans.sort_by(|a, b| a.name.cmp(&b.name));
        model
    }

    fn node_classes(&mut self, set: &SpecSet) -> BTreeMap<String, NodeClass> {
        unique(
            self.diags,
            "node-class",
            "",
            set.node_classes.iter().map(|c| &c.name),
        );
        let mut out = BTreeMap::new();
        for c in &set.node_classes {
            if out.contains_key(&c.name.value) {
                continue;
            }
            self.spans.insert("node-class", &c.name.value, c.name.span);
            let capacity = Resources {
                cpu: c.cpu.as_ref().map_or(0, |v| u64::from(v.value)),
                memory_bytes: c.memory.as_ref().map_or(0, |v| v.value),
            };
            let host_reserve = Resources {
                cpu: c.reserve_cpu.as_ref().map_or(0, |v| u64::from(v.value)),
                memory_bytes: c.reserve_memory.as_ref().map_or(0, |v| v.value),
            };
            if let Some(r) = &c.reserve_cpu
                && c.cpu.is_some()
                && host_reserve.cpu >= capacity.cpu
            {
                self.push(
                    Diagnostic::error(
                        "cairn::check::host_reserve_too_large",
                        r.span,
                        format!("node-class `{}` reserves {} of its {} CPUs for the host, leaving none for VMs", c.name.value, host_reserve.cpu, capacity.cpu),
                    )
                    .with_help("reserve fewer CPUs than the class has"),
                );
            }
            if let Some(r) = &c.reserve_memory
                && c.memory.is_some()
                && host_reserve.memory_bytes >= capacity.memory_bytes
            {
                self.push(
                    Diagnostic::error(
                        "cairn::check::host_reserve_too_large",
                        r.span,
                        format!(
                            "node-class `{}` reserves {} of its {} of memory for the host, leaving none for VMs",
                            c.name.value,
                            format_size(host_reserve.memory_bytes),
                            format_size(capacity.memory_bytes)
                        ),
                    )
                    .with_help("reserve less memory than the class has"),
                );
            }
            unique(
                self.diags,
                "disk",
                &format!(" in node-class `{}`", c.name.value),
                c.disks.iter().map(|d| &d.name),
            );
            unique(
                self.diags,
                "nic",
                &format!(" in node-class `{}`", c.name.value),
                c.nics.iter().map(|d| &d.name),
            );
            out.insert(
                c.name.value.clone(),
                NodeClass {
                    name: c.name.value.clone(),
                    capacity,
                    host_reserve,
                    disks: c.disks.iter().map(disk).collect(),
                    nics: c.nics.iter().map(nic).collect(),
                    labels: labels(&c.labels),
                },
            );
        }
        out
    }

    fn sites(&mut self, set: &SpecSet, classes: &BTreeMap<String, NodeClass>) -> Vec<Site> {
        unique(self.diags, "site", "", set.sites.iter().map(|s| &s.name));
        unique(
            self.diags,
            "rack",
            "",
            set.sites
                .iter()
                .flat_map(|s| s.racks.iter().map(|r| &r.name)),
        );
        unique(
            self.diags,
            "node",
            "",
            set.sites
                .iter()
                .flat_map(|s| s.racks.iter().flat_map(|r| r.nodes.iter().map(|n| &n.name))),
        );
        let addresses: Vec<Name> = set
            .sites
            .iter()
            .flat_map(|s| {
                s.racks
                    .iter()
                    .flat_map(|r| r.nodes.iter().filter_map(|n| n.address.clone()))
            })
            .collect();
        unique(self.diags, "node address", "", addresses.iter());
        let class_names: Vec<&str> = classes.keys().map(String::as_str).collect();
        let mut seen_sites = BTreeSet::new();
        let mut out = vec![];
        for s in &set.sites {
            if !seen_sites.insert(s.name.value.clone()) {
                continue;
            }
            self.spans.insert("site", &s.name.value, s.name.span);
            let mut nodes = vec![];
            let mut racks = vec![];
            for r in &s.racks {
                self.spans.insert("rack", &r.name.value, r.name.span);
                racks.push(Rack {
                    name: r.name.value.clone(),
                    nodes: r.nodes.iter().map(|n| n.name.value.clone()).collect(),
                });
                for n in &r.nodes {
                    self.spans.insert("node", &n.name.value, n.name.span);
                    let class = n.class.as_ref().and_then(|c| match classes.get(&c.value) {
                        Some(class) => Some(class),
                        None => {
                            let owner = format!("node `{}`", n.name.value);
                            self.push(unknown(
                                "cairn::resolve::unknown_node_class",
                                c,
                                "node-class",
                                &owner,
                                &class_names,
                            ));
                            None
                        }
                    });
                    let own_disks: Vec<Disk> = n.disks.iter().map(disk).collect();
                    let own_nics: Vec<Nic> = n.nics.iter().map(nic).collect();
                    let class_disks = class.map(|c| c.disks.clone()).unwrap_or_default();
                    for d in &n.disks {
                        if class_disks.iter().any(|cd| cd.name == d.name.value) {
                            self.push(
                                Diagnostic::error(
                                    "cairn::resolve::duplicate_name",
                                    d.name.span,
                                    format!("node `{}` already has disk `{}` from its class", n.name.value, d.name.value),
                                )
                                .with_help("a node's own `disk` adds to its class's disks; give it another device name"),
                            );
                        }
                    }
                    unique(
                        self.diags,
                        "disk",
                        &format!(" on node `{}`", n.name.value),
                        n.disks.iter().map(|d| &d.name),
                    );
                    unique(
                        self.diags,
                        "nic",
                        &format!(" on node `{}`", n.name.value),
                        n.nics.iter().map(|d| &d.name),
                    );
                    let mut labels_map = class.map(|c| c.labels.clone()).unwrap_or_default();
                    labels_map.extend(labels(&n.labels));
                    let capacity = class.map(|c| c.capacity).unwrap_or_default();
                    let reserve = class.map(|c| c.host_reserve).unwrap_or_default();
                    nodes.push(Node {
                        name: n.name.value.clone(),
                        site: s.name.value.clone(),
                        rack: r.name.value.clone(),
                        class: n
                            .class
                            .as_ref()
                            .map(|c| c.value.clone())
                            .unwrap_or_default(),
                        address: n
                            .address
                            .as_ref()
                            .map(|a| a.value.clone())
                            .unwrap_or_default(),
                        capacity,
                        allocatable: Resources {
                            cpu: capacity.cpu.saturating_sub(reserve.cpu),
                            memory_bytes: capacity
                                .memory_bytes
                                .saturating_sub(reserve.memory_bytes),
                        },
                        disks: merge_by_name(&class_disks, &own_disks, |d| &d.name),
                        nics: merge_by_name(
                            &class.map(|c| c.nics.clone()).unwrap_or_default(),
                            &own_nics,
                            |n| &n.name,
                        ),
                        labels: labels_map,
                    });
                }
            }
            let scope = format!(" in site `{}`", s.name.value);
            unique(self.diags, "bond", &scope, s.bonds.iter().map(|b| &b.name));
            unique(self.diags, "pool", &scope, s.pools.iter().map(|p| &p.name));
            let bonds = s
                .bonds
                .iter()
                .map(|b| self.bond(s, b, &nodes))
                .collect::<Vec<_>>();
            let pools = s
                .pools
                .iter()
                .map(|p| self.pool(s, p, &nodes))
                .collect::<Vec<_>>();
            let allocatable = Resources {
                cpu: nodes.iter().map(|n| n.allocatable.cpu).sum(),
                memory_bytes: nodes.iter().map(|n| n.allocatable.memory_bytes).sum(),
            };
            if let Some(h) = &s.ha_reserve
                && h.value as usize >= nodes.len()
                && h.value > 0
            {
                self.push(
                    Diagnostic::error(
                        "cairn::check::ha_reserve_too_large",
                        h.span,
                        format!(
                            "site `{}` reserves capacity for the loss of {} nodes but has only {}",
                            s.name.value,
                            h.value,
                            nodes.len()
                        ),
                    )
                    .with_help(
                        "the HA reserve must be smaller than the number of nodes in the site",
                    ),
                );
            }
            let mut site = Site {
                name: s.name.value.clone(),
                overcommit: Overcommit {
                    cpu: s.overcommit_cpu.as_ref().map_or(1.0, |v| v.value),
                    memory: s.overcommit_memory.as_ref().map_or(1.0, |v| v.value),
                },
                ha_reserve_nodes: s.ha_reserve.as_ref().map_or(0, |v| v.value),
                scheduler: Scheduler {
                    strategy: s.strategy.as_ref().map_or(Strategy::Spread, |v| v.value),
                    rebalance_threshold: s.rebalance_threshold.as_ref().map_or(0.2, |v| v.value),
                    max_moves: s.max_moves.as_ref().map_or(10, |v| v.value),
                },
                witness: s.witness.as_ref().map(|w| w.value.clone()),
                racks,
                nodes,
                bonds,
                pools,
                allocatable,
            };
            site.racks.sort_by(|a, b| a.name.cmp(&b.name));
            site.nodes.sort_by(|a, b| a.name.cmp(&b.name));
            site.bonds.sort_by(|a, b| a.name.cmp(&b.name));
            site.pools.sort_by(|a, b| a.name.cmp(&b.name));
            out.push(site);
        }
        out
    }

    fn bond(&mut self, s: &spec::SiteSpec, b: &spec::BondSpec, nodes: &[Node]) -> Bond {
        self.spans.insert(
            "bond",
            &format!("{}/{}", s.name.value, b.name.value),
            b.name.span,
        );
        if b.name.value.len() > 15 {
            self.push(
                Diagnostic::error(
                    "cairn::check::bond_name_too_long",
                    b.name.span,
                    format!("bond name `{}` is {} characters; Linux device names hold at most 15", b.name.value, b.name.value.len()),
                )
                .with_help("the bond becomes a network device of the same name: choose a name of 15 characters or fewer"),
            );
        }
        let mode = b.mode.as_ref().map_or(BondMode::ActiveBackup, |m| m.value);
        if b.members.is_empty() {
            self.push(
                Diagnostic::error(
                    "cairn::check::bond_without_members",
                    b.members_span,
                    format!("bond `{}` has no members", b.name.value),
                )
                .with_help(
                    "add `members \"ens1f0\" \"ens1f1\"` naming NICs every node of the site has",
                ),
            );
        }
        let mut members_dup = BTreeSet::new();
        for m in &b.members {
            if !members_dup.insert(&m.value) {
                self.push(Diagnostic::error(
                    "cairn::check::bond_member_repeated",
                    m.span,
                    format!(
                        "NIC `{}` is listed twice in bond `{}`",
                        m.value, b.name.value
                    ),
                ));
            }
        }
        // Every node must have every member NIC.
        let mut capacity: Option<u64> = None;
        for m in &b.members {
            let missing: Vec<&str> = nodes
                .iter()
                .filter(|n| !n.nics.iter().any(|x| x.name == m.value))
                .map(|n| n.name.as_str())
                .collect();
            if !missing.is_empty() {
                self.push(
                    Diagnostic::error(
                        "cairn::check::bond_member_missing",
                        m.span,
                        format!(
                            "bond `{}` member `{}` is missing on {} of {} nodes of site `{}`: {}",
                            b.name.value,
                            m.value,
                            missing.len(),
                            nodes.len(),
                            s.name.value,
                            list(&missing, 5)
                        ),
                    )
                    .with_label("not on every node")
                    .with_help("every node of the site must have each member NIC: add it to the node-class or to those nodes"),
                );
            }
        }
        for n in nodes {
            let speeds: Vec<u64> = b
                .members
                .iter()
                .filter_map(|m| {
                    n.nics
                        .iter()
                        .find(|x| x.name == m.value)
                        .map(|x| x.speed_bps)
                })
                .collect();
            if speeds.is_empty() {
                continue;
            }
            let node_capacity = match mode {
                BondMode::ActiveBackup => speeds.iter().copied().min().unwrap_or(0),
                _ => speeds.iter().sum(),
            };
            capacity = Some(capacity.map_or(node_capacity, |c| c.min(node_capacity)));
        }
        let capacity = capacity.unwrap_or(0);
        let mut seen_traffic: Vec<Name> = vec![];
        let mut traffic = vec![];
        for t in &b.traffic {
            seen_traffic.push(t.name.clone());
            let Some(kind) = TrafficKind::parse(&t.name.value) else {
                continue;
            };
            let min = t.min.as_ref().map_or(0, |v| v.value);
            let max = t.max.as_ref().map_or(capacity, |v| v.value);
            if let (Some(lo), Some(hi)) = (&t.min, &t.max)
                && lo.value > hi.value
            {
                self.push(
                    Diagnostic::error(
                        "cairn::check::traffic_min_above_max",
                        hi.span,
                        format!(
                            "traffic `{}` has a ceiling of {} below its guarantee of {}",
                            t.name.value,
                            format_bandwidth(hi.value),
                            format_bandwidth(lo.value)
                        ),
                    )
                    .and_label(lo.span, "guarantee")
                    .with_help("`max` must be at least `min`"),
                );
            }
            if let Some(hi) = &t.max
                && capacity > 0
                && hi.value > capacity
            {
                self.push(
                    Diagnostic::warning(
                        "cairn::check::traffic_max_above_capacity",
                        hi.span,
                        format!(
                            "traffic `{}` has a ceiling of {} above the bond's capacity of {}",
                            t.name.value,
                            format_bandwidth(hi.value),
                            format_bandwidth(capacity)
                        ),
                    )
                    .with_help("the ceiling can never be reached; lower it or leave it out"),
                );
            }
            traffic.push(TrafficClass {
                name: kind,
                min_bps: min,
                max_bps: max.min(capacity.max(min)),
                weight: t.weight.as_ref().map_or(1, |w| w.value),
            });
        }
        unique(
            self.diags,
            "traffic class",
            &format!(" in bond `{}`", b.name.value),
            seen_traffic.iter(),
        );
        let total_min: u64 = traffic.iter().map(|t| t.min_bps).sum();
        if capacity > 0 && total_min > capacity {
            let mut d = Diagnostic::error(
                "cairn::check::bond_over_capacity",
                b.name.span,
                format!(
                    "bond `{}` guarantees {} in total but its capacity is {} ({} of {})",
                    b.name.value,
                    format_bandwidth(total_min),
                    format_bandwidth(capacity),
                    mode,
                    b.members
                        .iter()
                        .map(|m| m.value.as_str())
                        .collect::<Vec<_>>()
                        .join(" + ")
                ),
            )
            .with_label("over capacity");
            for t in &b.traffic {
                if let Some(m) = &t.min {
                    d = d.and_label(m.span, format!("{} guaranteed", format_bandwidth(m.value)));
                }
            }
            self.push(d.with_help(format!(
                "lower the `min` rates to fit {} (active-backup bonds carry one member's speed; the other modes the sum)",
                format_bandwidth(capacity)
            )));
        }
        traffic.sort_by_key(|t| t.name);
        Bond {
            name: b.name.value.clone(),
            mode,
            mtu: b.mtu.as_ref().map_or(1500, |v| v.value),
            miimon_ms: b.miimon.as_ref().map_or(100, |v| v.value),
            members: b.members.iter().map(|m| m.value.clone()).collect(),
            capacity_bps: capacity,
            traffic,
        }
    }

    fn pool(&mut self, s: &spec::SiteSpec, p: &spec::PoolSpec, nodes: &[Node]) -> Pool {
        self.spans.insert(
            "pool",
            &format!("{}/{}", s.name.value, p.name.value),
            p.name.span,
        );
        let class = p
            .disk_class
            .as_ref()
            .map(|c| c.value.clone())
            .unwrap_or_default();
        let domain = p.failure_domain.as_ref().map_or(Domain::Node, |d| d.value);
        let replicas = p.replicas.as_ref().map_or(1, |r| r.value);
        let mut disks = vec![];
        let mut domains = BTreeSet::new();
        let mut raw = 0u64;
        for n in nodes {
            for d in n.disks.iter().filter(|d| d.class == class) {
                disks.push(format!("{}/{}", n.name, d.name));
                raw = raw.saturating_add(d.size_bytes);
                domains.insert(match domain {
                    Domain::Node => n.name.clone(),
                    Domain::Rack => n.rack.clone(),
                    Domain::Site => n.site.clone(),
                });
            }
        }
        disks.sort();
        if p.disk_class.is_some() && (domains.len() as u32) < replicas {
            let span = p.replicas.as_ref().map_or(p.name.span, |r| r.span);
            let classes: BTreeSet<&str> = nodes
                .iter()
                .flat_map(|n| n.disks.iter().map(|d| d.class.as_str()))
                .collect();
            let help = if domains.is_empty() && !classes.is_empty() {
                format!(
                    "no node of site `{}` has a disk of class `{class}`; {}",
                    s.name.value,
                    suggestion(
                        &class,
                        &classes.into_iter().collect::<Vec<_>>(),
                        "disk class"
                    )
                )
            } else {
                format!(
                    "lower `replicas` to at most {}, choose a smaller failure domain, or add {domain}s with `{class}` disks",
                    domains.len()
                )
            };
            self.push(
                Diagnostic::error(
                    "cairn::check::pool_too_few_failure_domains",
                    span,
                    format!(
                        "pool `{}` keeps {replicas} replicas in distinct {domain}s, but site `{}` has only {} {domain}{} with `{class}` disks",
                        p.name.value,
                        s.name.value,
                        domains.len(),
                        if domains.len() == 1 { "" } else { "s" }
                    ),
                )
                .with_label(format!("{replicas} replicas"))
                .with_help(help),
            );
        }
        let thin = p.thin_overcommit.as_ref().map_or(1.0, |v| v.value);
        let provisionable = ((raw / u64::from(replicas.max(1))) as f64 * thin) as u64;
        Pool {
            name: p.name.value.clone(),
            disk_class: class,
            replicas,
            failure_domain: domain,
            stripe_width: p.stripe_width.as_ref().map_or(1, |v| v.value),
            stripe_unit_bytes: p.stripe_unit.as_ref().map_or(1 << 20, |v| v.value),
            thin_overcommit: thin,
            disks,
            failure_domains: domains.into_iter().collect(),
            raw_bytes: raw,
            provisionable_bytes: provisionable,
        }
    }

    fn sla_profiles(&mut self, set: &SpecSet) -> BTreeMap<String, SlaProfile> {
        let mut out: BTreeMap<String, SlaProfile> = BTreeMap::new();
        for (name, class, priority) in BUILTIN_SLA {
            out.insert(
                (*name).to_owned(),
                SlaProfile {
                    name: (*name).to_owned(),
                    class: *class,
                    priority: *priority,
                    builtin: true,
                },
            );
        }
        unique(
            self.diags,
            "sla-profile",
            "",
            set.sla_profiles.iter().map(|p| &p.name),
        );
        for p in &set.sla_profiles {
            if let Some(existing) = out.get(&p.name.value) {
                if existing.builtin {
                    self.push(
                        Diagnostic::error(
                            "cairn::resolve::duplicate_name",
                            p.name.span,
                            format!("sla-profile `{}` is built in and cannot be redefined", p.name.value),
                        )
                        .with_help("the built-in profiles are `reserved` (priority 1000), `on-demand` (500) and `spot` (0); choose another name"),
                    );
                }
                continue;
            }
            self.spans.insert("sla-profile", &p.name.value, p.name.span);
            out.insert(
                p.name.value.clone(),
                SlaProfile {
                    name: p.name.value.clone(),
                    class: p.class.as_ref().map_or(SlaClass::OnDemand, |c| c.value),
                    priority: p.priority.as_ref().map_or(500, |v| v.value),
                    builtin: false,
                },
            );
        }
        out
    }

    fn images(&mut self, set: &SpecSet) -> BTreeMap<String, Image> {
        unique(self.diags, "image", "", set.images.iter().map(|i| &i.name));
        let mut out = BTreeMap::new();
        for i in &set.images {
            if out.contains_key(&i.name.value) {
                continue;
            }
            self.spans.insert("image", &i.name.value, i.name.span);
            if let Some(b) = &i.builtin {
                if !BUILTIN_IMAGES.contains(&b.value.as_str()) {
                    self.push(
                        Diagnostic::error(
                            "cairn::resolve::unknown_builtin_image",
                            b.span,
                            format!("`{}` is not a built-in image", b.value),
                        )
                        .with_help(suggestion(
                            &b.value,
                            BUILTIN_IMAGES,
                            "built-in image",
                        )),
                    );
                }
                if let Some(k) = &i.kernel {
                    self.push(
                        Diagnostic::error("cairn::check::image_builtin_and_kernel", k.span, format!("image `{}` is built in and also names a kernel", i.name.value))
                            .and_label(b.span, "built in")
                            .with_help("an image is either `builtin=\"cairn-guest\"` or a kernel with an optional initrd and cmdline"),
                    );
                }
            } else if i.kernel.is_none() {
                self.push(
                    Diagnostic::error("cairn::check::image_without_kernel", i.name.span, format!("image `{}` has neither a kernel nor `builtin`", i.name.value))
                        .with_help("add `kernel \"images/NAME/vmlinuz\"` inside the image, or write `image \"NAME\" builtin=\"cairn-guest\"`"),
                );
            }
            for path in [&i.kernel, &i.initrd].into_iter().flatten() {
                if !self.sources.has_other_file(&path.value) {
                    self.push(
                        Diagnostic::warning("cairn::check::image_file_missing", path.span, format!("image file `{}` is not in the spec repository", path.value))
                            .with_help("paths are relative to the spec root; the file may be staged on the nodes later, but `apply` needs it"),
                    );
                }
            }
            out.insert(
                i.name.value.clone(),
                Image {
                    name: i.name.value.clone(),
                    builtin: i.builtin.as_ref().map(|b| b.value.clone()),
                    kernel: i.kernel.as_ref().map(|v| v.value.clone()),
                    initrd: i.initrd.as_ref().map(|v| v.value.clone()),
                    cmdline: i.cmdline.as_ref().map(|v| v.value.clone()),
                },
            );
        }
        out
    }

    fn tenants(&mut self, set: &SpecSet, sites: &[Site]) -> Vec<Tenant> {
        unique(
            self.diags,
            "tenant",
            "",
            set.tenants.iter().map(|t| &t.name),
        );
        let site_names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        let mut seen = BTreeSet::new();
        let mut out = vec![];
        for t in &set.tenants {
            if !seen.insert(&t.name.value) {
                continue;
            }
            self.spans.insert("tenant", &t.name.value, t.name.span);
            let scope = format!(" in tenant `{}`", t.name.value);
            unique(
                self.diags,
                "network",
                &scope,
                t.networks.iter().map(|n| &n.name),
            );
            unique(
                self.diags,
                "security-group",
                &scope,
                t.security_groups.iter().map(|n| &n.name),
            );
            unique(
                self.diags,
                "member",
                &scope,
                t.members.iter().map(|m| &m.email),
            );
            let mut networks = vec![];
            let mut parsed: Vec<(&spec::NetworkSpec, Cidr)> = vec![];
            for n in &t.networks {
                let owner = format!("network `{}`", n.name.value);
                if let Some(site) = &n.site
                    && !site_names.contains(&site.value.as_str())
                {
                    self.push(unknown(
                        "cairn::resolve::unknown_site",
                        site,
                        "site",
                        &owner,
                        &site_names,
                    ));
                }
                let cidr = n.cidr.as_ref().and_then(|c| match Cidr::parse(&c.value) {
                    Ok(v) => Some(v),
                    Err(why) => {
                        self.push(
                            Diagnostic::error("cairn::check::invalid_cidr", c.span, format!("`{}` is not a valid CIDR: {why}", c.value))
                                .with_help("write an address and a prefix length with no host bits set, e.g. \"10.20.0.0/24\""),
                        );
                        None
                    }
                });
                if let (Some(cidr), Some(g)) = (&cidr, &n.gateway) {
                    match g.value.parse::<IpAddr>() {
                        Ok(ip) if cidr.contains(ip) && !cidr.is_network_address(ip) => {}
                        Ok(_) => self.push(
                            Diagnostic::error(
                                "cairn::check::gateway_outside_network",
                                g.span,
                                format!("gateway {} is not a host address of {}", g.value, cidr),
                            )
                            .with_help(format!(
                                "choose an address inside {cidr}, e.g. {}",
                                cidr.first_host()
                            )),
                        ),
                        Err(_) => self.push(
                            Diagnostic::error(
                                "cairn::check::invalid_address",
                                g.span,
                                format!("`{}` is not an IP address", g.value),
                            )
                            .with_help("write an IPv4 or IPv6 address, e.g. \"10.20.0.1\""),
                        ),
                    }
                }
                if let Some(cidr) = cidr {
                    parsed.push((n, cidr));
                }
                networks.push(Network {
                    name: n.name.value.clone(),
                    site: n.site.as_ref().map(|s| s.value.clone()).unwrap_or_default(),
                    cidr: n.cidr.as_ref().map(|c| c.value.clone()).unwrap_or_default(),
                    gateway: n.gateway.as_ref().map(|g| g.value.clone()),
                });
            }
            for (i, (a, ca)) in parsed.iter().enumerate() {
                for (b, cb) in &parsed[..i] {
                    let same_site =
                        a.site.as_ref().map(|s| &s.value) == b.site.as_ref().map(|s| &s.value);
                    if same_site && ca.overlaps(cb) {
                        let (Some(sa), Some(sb)) = (&a.cidr, &b.cidr) else {
                            continue;
                        };
                        self.push(
                            Diagnostic::error(
                                "cairn::check::overlapping_cidr",
                                sa.span,
                                format!(
                                    "network `{}` ({}) overlaps network `{}` ({}) of tenant `{}` on the same site",
                                    a.name.value, sa.value, b.name.value, sb.value, t.name.value
                                ),
                            )
                            .with_label("overlaps")
                            .and_label(sb.span, format!("`{}` is here", b.name.value))
                            .with_help("networks of one tenant on one site need disjoint address ranges"),
                        );
                    }
                }
            }
            let network_names: Vec<&str> =
                t.networks.iter().map(|n| n.name.value.as_str()).collect();
            let mut groups = vec![];
            for sg in &t.security_groups {
                let mut allow = vec![];
                for a in &sg.allow {
                    if let Some(from) = &a.from
                        && !network_names.contains(&from.value.as_str())
                        && Cidr::parse(&from.value).is_err()
                    {
                        self.push(
                            Diagnostic::error(
                                "cairn::resolve::unknown_network",
                                from.span,
                                format!("security-group `{}` allows from `{}`, which is neither a network of tenant `{}` nor a CIDR", sg.name.value, from.value, t.name.value),
                            )
                            .with_help(suggestion(&from.value, &network_names, "network")),
                        );
                    }
                    allow.push(AllowRule {
                        from: a.from.as_ref().map(|f| f.value.clone()).unwrap_or_default(),
                        proto: a.proto.as_ref().map_or(Proto::Tcp, |p| p.value),
                        port: a.port.as_ref().map(|p| p.value),
                    });
                }
                groups.push(SecurityGroup {
                    name: sg.name.value.clone(),
                    allow,
                });
            }
            networks.sort_by(|a, b| a.name.cmp(&b.name));
            groups.sort_by(|a, b| a.name.cmp(&b.name));
            let mut members: Vec<Member> = t
                .members
                .iter()
                .map(|m| Member {
                    email: m.email.value.clone(),
                    role: m.role.as_ref().map_or(Role::Viewer, |r| r.value),
                })
                .collect();
            members.sort_by(|a, b| a.email.cmp(&b.email));
            out.push(Tenant {
                name: t.name.value.clone(),
                quota: t.quota.as_ref().map(|q| Quota {
                    vcpus: q.vcpus.as_ref().map(|v| v.value),
                    memory_bytes: q.memory.as_ref().map(|v| v.value),
                    storage_bytes: q.storage.as_ref().map(|v| v.value),
                    vms: q.vms.as_ref().map(|v| v.value),
                }),
                usage: Usage::default(),
                members,
                budget: t.budget.as_ref().and_then(|b| {
                    Some(Budget {
                        monthly: b.monthly.as_ref()?.value,
                        currency: b
                            .currency
                            .as_ref()
                            .map_or_else(|| "USD".to_owned(), |c| c.value.clone()),
                    })
                }),
                networks,
                security_groups: groups,
            });
        }
        out
    }

    /// Resolves VMs and expands vm-groups.
    fn vms(
        &mut self,
        set: &SpecSet,
        sites: &[Site],
        tenants: &[Tenant],
        slas: &BTreeMap<String, SlaProfile>,
        images: &BTreeMap<String, Image>,
    ) -> (Vec<Vm>, Vec<VmGroup>) {
        unique(
            self.diags,
            "vm-group",
            "",
            set.vm_groups.iter().map(|g| &g.name),
        );
        // Expanded names first, so duplicates between VMs and group members
        // point at both declarations.
        let mut all_names: Vec<Name> = set.vms.iter().map(|v| v.name.clone()).collect();
        for g in &set.vm_groups {
            let n = g.replicas.as_ref().map_or(0, |r| r.value);
            for i in 0..n {
                all_names.push(Spanned {
                    value: format!("{}-{i}", g.name.value),
                    span: g.name.span,
                });
            }
        }
        unique(self.diags, "vm", "", all_names.iter());
        let mut out = vec![];
        let mut seen = BTreeSet::new();
        for v in &set.vms {
            if !seen.insert(v.name.value.clone()) {
                continue;
            }
            self.spans.insert("vm", &v.name.value, v.name.span);
            let owner = format!("vm `{}`", v.name.value);
            if let Some(vm) = self.vm(
                &v.name.value,
                None,
                &owner,
                v.tenant.as_ref(),
                v.site.as_ref(),
                &v.body,
                sites,
                tenants,
                slas,
                images,
            ) {
                out.push(vm);
            }
        }
        let mut groups = vec![];
        let mut seen_groups = BTreeSet::new();
        for g in &set.vm_groups {
            if !seen_groups.insert(g.name.value.clone()) {
                continue;
            }
            self.spans.insert("vm-group", &g.name.value, g.name.span);
            let replicas = g.replicas.as_ref().map_or(0, |r| r.value);
            let mut members = vec![];
            for i in 0..replicas {
                let name = format!("{}-{i}", g.name.value);
                if name.len() > 63 {
                    self.push(
                        Diagnostic::error(
                            "cairn::check::invalid_name",
                            g.name.span,
                            format!(
                                "vm-group `{}` expands to `{name}`, longer than 63 characters",
                                g.name.value
                            ),
                        )
                        .with_help("shorten the group name"),
                    );
                    break;
                }
                debug_assert!(is_dns_label(&name) || !is_dns_label(&g.name.value));
                members.push(name.clone());
                if !seen.insert(name.clone()) {
                    continue;
                }
                self.spans.insert("vm", &name, g.name.span);
                // Report resolution problems once per group, not once per replica.
                let owner = format!("vm-group `{}`", g.name.value);
                let before = self.diags.len();
                let vm = self.vm(
                    &name,
                    Some(&g.name.value),
                    &owner,
                    g.tenant.as_ref(),
                    g.site.as_ref(),
                    &g.body,
                    sites,
                    tenants,
                    slas,
                    images,
                );
                if i > 0 {
                    self.diags.truncate(before);
                }
                out.extend(vm);
            }
            if let Some(m) = &g.max_unavailable
                && m.value > replicas.max(1)
            {
                self.push(
                    Diagnostic::warning(
                        "cairn::check::max_unavailable_above_replicas",
                        m.span,
                        format!(
                            "max-unavailable {} is more than the group's {replicas} replicas",
                            m.value
                        ),
                    )
                    .with_help("it allows taking the whole group down at once; lower it"),
                );
            }
            groups.push(VmGroup {
                name: g.name.value.clone(),
                tenant: g
                    .tenant
                    .as_ref()
                    .map(|t| t.value.clone())
                    .unwrap_or_default(),
                site: g.site.as_ref().map(|t| t.value.clone()).unwrap_or_default(),
                replicas,
                spread: g.spread.as_ref().map(|s| s.value),
                max_unavailable: g.max_unavailable.as_ref().map_or(1, |m| m.value),
                vms: members,
            });
        }
        (out, groups)
    }

    #[allow(clippy::too_many_arguments)]
    fn vm(
        &mut self,
        name: &str,
        group: Option<&str>,
        owner: &str,
        tenant: Option<&Name>,
        site: Option<&Name>,
        body: &spec::VmBody,
        sites: &[Site],
        tenants: &[Tenant],
        slas: &BTreeMap<String, SlaProfile>,
        images: &BTreeMap<String, Image>,
    ) -> Option<Vm> {
        let tenant_names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
        let site_names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        let t = tenant.and_then(|t| {
            let found = tenants.iter().find(|x| x.name == t.value);
            if found.is_none() {
                self.push(unknown(
                    "cairn::resolve::unknown_tenant",
                    t,
                    "tenant",
                    owner,
                    &tenant_names,
                ));
            }
            found
        });
        let s = site.and_then(|s| {
            let found = sites.iter().find(|x| x.name == s.value);
            if found.is_none() {
                self.push(unknown(
                    "cairn::resolve::unknown_site",
                    s,
                    "site",
                    owner,
                    &site_names,
                ));
            }
            found
        });
        let sla_name = body.sla.as_ref().map_or("on-demand", |s| s.value.as_str());
        let sla = match slas.get(sla_name) {
            Some(p) => VmSla {
                name: p.name.clone(),
                class: p.class,
                priority: p.priority,
            },
            None => {
                if let Some(r) = &body.sla {
                    self.push(unknown(
                        "cairn::resolve::unknown_sla_profile",
                        r,
                        "sla-profile",
                        owner,
                        &keys(slas),
                    ));
                }
                VmSla {
                    name: sla_name.to_owned(),
                    class: SlaClass::OnDemand,
                    priority: 500,
                }
            }
        };
        if let Some(img) = &body.image
            && !images.contains_key(&img.value)
        {
            self.push(unknown(
                "cairn::resolve::unknown_image",
                img,
                "image",
                owner,
                &keys(images),
            ));
        }
        // Linux finds its CPUs in cairn-vmm's MP table, which has less room than
        // the built-in guest: a limit only the image says applies.
        if let (Some(img), Some(cpu)) = (&body.image, &body.cpu)
            && images.get(&img.value).is_some_and(|i| i.kernel.is_some())
            && LINUX_VCPUS.check(u64::from(cpu.value)).is_err()
        {
            self.push(
                Diagnostic::error(
                    "cairn::check::linux_vcpus",
                    cpu.span,
                    format!("{owner} boots the Linux image `{}` on {} vCPUs; a Linux guest has at most {}", img.value, cpu.value, LINUX_VCPUS.max),
                )
                .and_label(img.span, "a Linux kernel")
                .with_help(format!("{}; for example `cpu {}`", LINUX_VCPUS.rule(), LINUX_VCPUS.max)),
            );
        }
        let mut disks = vec![];
        let disk_names: Vec<Name> = body.disks.iter().map(|d| d.name.clone()).collect();
        unique(
            self.diags,
            "disk",
            &format!(" on {owner}"),
            disk_names.iter(),
        );
        for d in &body.disks {
            if let (Some(p), Some(s)) = (&d.pool, s)
                && !s.pools.iter().any(|x| x.name == p.value)
            {
                let pools: Vec<&str> = s.pools.iter().map(|x| x.name.as_str()).collect();
                let mut diag = unknown("cairn::resolve::unknown_pool", p, "pool", owner, &pools);
                diag.message = format!(
                    "{owner} puts disk `{}` in pool `{}`, which site `{}` does not have",
                    d.name.value, p.value, s.name
                );
                self.push(diag);
            }
            disks.push(VmDisk {
                name: d.name.value.clone(),
                size_bytes: d.size.as_ref().map_or(0, |v| v.value),
                pool: d.pool.as_ref().map(|p| p.value.clone()).unwrap_or_default(),
                from_image: d.from_image.as_ref().is_some_and(|f| f.value),
                prevent_destroy: d.prevent_destroy.as_ref().is_some_and(|f| f.value),
            });
        }
        let mut nics = vec![];
        for n in &body.nics {
            if let (Some(net), Some(t)) = (&n.network, t) {
                match t.networks.iter().find(|x| x.name == net.value) {
                    None => {
                        let nets: Vec<&str> = t.networks.iter().map(|x| x.name.as_str()).collect();
                        let mut diag = unknown(
                            "cairn::resolve::unknown_network",
                            net,
                            "network",
                            owner,
                            &nets,
                        );
                        diag.message = format!(
                            "{owner} attaches to network `{}`, which tenant `{}` does not have",
                            net.value, t.name
                        );
                        self.push(diag);
                    }
                    Some(found) => {
                        if let Some(s) = s
                            && found.site != s.name
                            && !found.site.is_empty()
                        {
                            self.push(
                                Diagnostic::error(
                                    "cairn::check::network_on_other_site",
                                    net.span,
                                    format!("{owner} runs in site `{}` but network `{}` is in site `{}`", s.name, net.value, found.site),
                                )
                                .with_help("attach VMs to networks of their own site"),
                            );
                        }
                    }
                }
            }
            if let Some(t) = t {
                for g in &n.security_groups {
                    if !t.security_groups.iter().any(|x| x.name == g.value) {
                        let sgs: Vec<&str> =
                            t.security_groups.iter().map(|x| x.name.as_str()).collect();
                        self.push(unknown(
                            "cairn::resolve::unknown_security_group",
                            g,
                            "security-group",
                            owner,
                            &sgs,
                        ));
                    }
                }
            }
            nics.push(VmNic {
                network: n
                    .network
                    .as_ref()
                    .map(|x| x.value.clone())
                    .unwrap_or_default(),
                security_groups: n.security_groups.iter().map(|g| g.value.clone()).collect(),
            });
        }
        let availability = body
            .availability
            .as_ref()
            .map_or(Availability::None, |a| a.value);
        if availability == Availability::Ft
            && let Some(a) = &body.availability
        {
            if sla.class != SlaClass::Reserved {
                let mut d = Diagnostic::error(
                    "cairn::check::ft_requires_reserved",
                    a.span,
                    format!("{owner} is fault tolerant but its SLA profile `{}` is of class `{}`", sla.name, sla.class),
                )
                .with_help("FT keeps a full secondary; it needs a profile of class `reserved` (e.g. `sla \"reserved\"`)");
                if let Some(r) = &body.sla {
                    d = d.and_label(r.span, "not reserved");
                }
                self.push(d);
            }
            if let Some(s) = s {
                if s.witness.is_none() {
                    self.push(
                        Diagnostic::error("cairn::check::ft_without_witness", a.span, format!("{owner} is fault tolerant but site `{}` has no witness", s.name))
                            .with_help("add `witness address=\"HOST:PORT\"` to the site: FT pairs need a quorum witness against split brain"),
                    );
                }
                let domains = if s.racks.len() >= 2 {
                    s.racks.len()
                } else {
                    s.nodes.len()
                };
                if domains < 2 {
                    self.push(
                        Diagnostic::error(
                            "cairn::check::ft_without_failure_domains",
                            a.span,
                            format!("{owner} is fault tolerant but site `{}` has only {} node{}", s.name, s.nodes.len(), if s.nodes.len() == 1 { "" } else { "s" }),
                        )
                        .with_help("FT needs two failure domains (racks, or at least nodes) for its primary and secondary"),
                    );
                }
            }
        }
        Some(Vm {
            name: name.to_owned(),
            tenant: tenant.map(|t| t.value.clone()).unwrap_or_default(),
            site: site.map(|s| s.value.clone()).unwrap_or_default(),
            group: group.map(str::to_owned),
            cpu: body.cpu.as_ref().map_or(0, |c| c.value),
            memory_bytes: body.memory.as_ref().map_or(0, |m| m.value),
            sla,
            availability,
            image: body
                .image
                .as_ref()
                .map(|i| i.value.clone())
                .unwrap_or_default(),
            disks,
            nics,
            tags: labels(&body.tags),
            protection_plans: vec![],
        })
    }

    fn quotas(&mut self, set: &SpecSet, tenants: &mut [Tenant], vms: &[Vm]) {
        for t in tenants.iter_mut() {
            let mut mine: Vec<&Vm> = vms.iter().filter(|v| v.tenant == t.name).collect();
            mine.sort_by(|a, b| a.name.cmp(&b.name));
            let copies = |v: &Vm| {
                if v.availability == Availability::Ft {
                    2
                } else {
                    1
                }
            };
            let usage = Usage {
                vcpus: mine.iter().map(|v| u64::from(v.cpu) * copies(v)).sum(),
                memory_bytes: mine.iter().map(|v| v.memory_bytes * copies(v)).sum(),
                storage_bytes: mine
                    .iter()
                    .flat_map(|v| v.disks.iter().map(|d| d.size_bytes))
                    .sum(),
                vms: mine.len() as u64,
            };
            t.usage = usage.clone();
            let Some(spec) = set.tenants.iter().find(|x| x.name.value == t.name) else {
                continue;
            };
            let Some(q) = &spec.quota else { continue };
            type Measure = fn(&Vm) -> u64;
            type Show = fn(u64) -> String;
            type QuotaCheck<'q> = (&'static str, Option<&'q Spanned<u64>>, u64, Measure, Show);
            let checks: [QuotaCheck<'_>; 4] = [
                (
                    "vcpus",
                    q.vcpus.as_ref(),
                    usage.vcpus,
                    |v| {
                        u64::from(v.cpu)
                            * if v.availability == Availability::Ft {
                                2
                            } else {
                                1
                            }
                    },
                    |n| format!("{n} vCPUs"),
                ),
                (
                    "memory",
                    q.memory.as_ref(),
                    usage.memory_bytes,
                    |v| {
                        v.memory_bytes
                            * if v.availability == Availability::Ft {
                                2
                            } else {
                                1
                            }
                    },
                    format_size,
                ),
                (
                    "storage",
                    q.storage.as_ref(),
                    usage.storage_bytes,
                    |v| v.disks.iter().map(|d| d.size_bytes).sum(),
                    format_size,
                ),
                (
                    "vms",
                    q.vms.as_ref(),
                    usage.vms,
                    |_| 1,
                    |n| format!("{n} {}", if n == 1 { "VM" } else { "VMs" }),
                ),
            ];
            for (what, limit, used, measure, show) in checks {
                let Some(limit) = limit else { continue };
                if used <= limit.value {
                    continue;
                }
                // The VMs, in name order, from the one whose demand first
                // crosses the quota onwards.
                let mut running = 0u64;
                let mut over = vec![];
                for v in &mine {
                    let m = measure(v);
                    running += m;
                    if running > limit.value && m > 0 {
                        over.push(format!("{} ({})", v.name, show(m)));
                    }
                }
                let mut d = Diagnostic::error(
                    "cairn::check::quota_exceeded",
                    limit.span,
                    format!(
                        "tenant `{}` asks for {} but its {what} quota is {}",
                        t.name,
                        show(used),
                        show(limit.value)
                    ),
                )
                .with_label(format!("quota {}", show(limit.value)));
                for v in mine
                    .iter()
                    .filter(|v| over.iter().any(|o| o.starts_with(&format!("{} (", v.name))))
                    .take(3)
                {
                    if let Some(span) = self.spans.get("vm", &v.name) {
                        d = d.and_label(span, format!("`{}` pushes it over", v.name));
                    }
                }
                self.push(d.with_help(format!(
                    "VMs beyond the quota, in name order: {}; raise the quota or shrink or remove VMs (FT VMs count twice for vCPUs and memory)",
                    list(&over.iter().map(String::as_str).collect::<Vec<_>>(), 6)
                )));
            }
        }
    }

    fn reserved_capacity(&mut self, set: &SpecSet, sites: &[Site], vms: &[Vm]) {
        for s in sites {
            let n_reserve = s.ha_reserve_nodes as usize;
            let mut cpus: Vec<u64> = s.nodes.iter().map(|n| n.allocatable.cpu).collect();
            let mut mems: Vec<u64> = s.nodes.iter().map(|n| n.allocatable.memory_bytes).collect();
            cpus.sort_unstable_by(|a, b| b.cmp(a));
            mems.sort_unstable_by(|a, b| b.cmp(a));
            let cpu_cap: u64 = cpus.iter().skip(n_reserve).sum();
            let mem_cap: u64 = mems.iter().skip(n_reserve).sum();
            let reserved: Vec<&Vm> = vms
                .iter()
                .filter(|v| v.site == s.name && v.sla.class == SlaClass::Reserved)
                .collect();
            let copies = |v: &Vm| {
                if v.availability == Availability::Ft {
                    2
                } else {
                    1
                }
            };
            let cpu_need: u64 = reserved.iter().map(|v| u64::from(v.cpu) * copies(v)).sum();
            let mem_need: u64 = reserved.iter().map(|v| v.memory_bytes * copies(v)).sum();
            let Some(spec) = set.sites.iter().find(|x| x.name.value == s.name) else {
                continue;
            };
            let after = if n_reserve > 0 {
                format!(
                    " after reserving {n_reserve} node{} for HA",
                    if n_reserve == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            };
            if cpu_need > cpu_cap {
                self.push(
                    Diagnostic::error(
                        "cairn::check::reserved_over_capacity",
                        spec.name.span,
                        format!("site `{}` has {cpu_cap} CPUs for reserved VMs{after}, but reserved VMs need {cpu_need}", s.name),
                    )
                    .with_help(format!("{} reserved VMs ask for it (FT counts twice); add nodes, lower `ha-reserve`, or move VMs to `on-demand`", reserved.len())),
                );
            }
            if mem_need > mem_cap {
                self.push(
                    Diagnostic::error(
                        "cairn::check::reserved_over_capacity",
                        spec.name.span,
                        format!(
                            "site `{}` has {} of memory for reserved VMs{after}, but reserved VMs need {}",
                            s.name,
                            format_size(mem_cap),
                            format_size(mem_need)
                        ),
                    )
                    .with_help(format!("{} reserved VMs ask for it (FT counts twice); add nodes, lower `ha-reserve`, or move VMs to `on-demand`", reserved.len())),
                );
            }
        }
    }

    fn affinities(&mut self, set: &SpecSet, vms: &[Vm]) -> Vec<Affinity> {
        unique(
            self.diags,
            "affinity",
            "",
            set.affinities.iter().map(|a| &a.name),
        );
        let mut out = vec![];
        let mut seen = BTreeSet::new();
        for a in &set.affinities {
            if !seen.insert(&a.name.value) {
                continue;
            }
            self.spans.insert("affinity", &a.name.value, a.name.span);
            let kind = a.kind.as_ref().map_or(AffinityKind::Apart, |k| k.value);
            if a.select.is_none() {
                self.push(
                    Diagnostic::error(
                        "cairn::check::affinity_without_select",
                        a.name.span,
                        format!("affinity `{}` has no `select`", a.name.value),
                    )
                    .with_help("add `select KEY=\"VALUE\"` choosing the VMs the rule applies to"),
                );
            }
            match (kind, &a.nodes) {
                (AffinityKind::Node, None) => self.push(
                    Diagnostic::error(
                        "cairn::check::affinity_without_nodes",
                        a.name.span,
                        format!(
                            "affinity `{}` of kind `node` has no `nodes` selector",
                            a.name.value
                        ),
                    )
                    .with_help(
                        "add `nodes rack=\"r2\"` (labels, or the built-in keys site, rack, node)",
                    ),
                ),
                (AffinityKind::Apart | AffinityKind::Together, Some(n)) => self.push(
                    Diagnostic::error(
                        "cairn::check::nodes_selector_unused",
                        n.span,
                        format!(
                            "affinity `{}` of kind `{kind}` cannot use a `nodes` selector",
                            a.name.value
                        ),
                    )
                    .with_help(
                        "only `kind=\"node\"` rules pick nodes; use `scope` for apart/together",
                    ),
                ),
                _ => {}
            }
            if let (Some(h), Some(w)) = (&a.hard, &a.weight)
                && h.value
            {
                self.push(
                    Diagnostic::warning(
                        "cairn::check::weight_on_hard_rule",
                        w.span,
                        format!(
                            "affinity `{}` is hard; its weight is not used",
                            a.name.value
                        ),
                    )
                    .with_help("remove `weight`, or make the rule soft with `hard=#false`"),
                );
            }
            let select = a.select.as_ref().map(selector).unwrap_or_default();
            let matched: Vec<String> = vms
                .iter()
                .filter(|v| a.select.is_some() && matches_vm(&select, v))
                .map(|v| v.name.clone())
                .collect();
            if matched.is_empty()
                && let Some(sel) = &a.select
                && !sel.pairs.is_empty()
            {
                self.push(
                    Diagnostic::warning("cairn::check::selector_matches_nothing", sel.span, format!("affinity `{}` selects no VM", a.name.value))
                        .with_help("VM selectors match tags and the built-in keys tenant, site, group, sla and availability"),
                );
            }
            out.push(Affinity {
                name: a.name.value.clone(),
                kind,
                scope: a.scope.as_ref().map_or(Domain::Node, |s| s.value),
                hard: a.hard.as_ref().is_some_and(|h| h.value),
                weight: a.weight.as_ref().map_or(50, |w| w.value),
                select,
                nodes: a.nodes.as_ref().map(selector).unwrap_or_default(),
                vms: matched,
            });
        }
        out
    }

    fn protection_plans(
        &mut self,
        set: &SpecSet,
        sites: &[Site],
        vms: &mut [Vm],
    ) -> Vec<ProtectionPlan> {
        unique(
            self.diags,
            "protection-plan",
            "",
            set.protection_plans.iter().map(|p| &p.name),
        );
        let site_names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        let mut out = vec![];
        let mut seen = BTreeSet::new();
        for p in &set.protection_plans {
            if !seen.insert(&p.name.value) {
                continue;
            }
            self.spans
                .insert("protection-plan", &p.name.value, p.name.span);
            let owner = format!("protection-plan `{}`", p.name.value);
            if p.snapshot.is_none() && p.replicate.is_empty() {
                self.push(
                    Diagnostic::warning("cairn::check::plan_does_nothing", p.name.span, format!("{owner} neither snapshots nor replicates"))
                        .with_help("add `snapshot every=\"15m\" keep=96` or `replicate to-site=… pool=… every=\"1h\" keep=24`"),
                );
            }
            let applies = p.applies_to.as_ref().map(selector).unwrap_or_default();
            if p.applies_to.is_none() {
                self.push(
                    Diagnostic::error("cairn::check::plan_without_applies_to", p.name.span, format!("{owner} has no `applies-to`"))
                        .with_help("add `applies-to tenant=\"finance\"` (tags and the built-in keys tenant, site, group, sla, availability)"),
                );
            }
            let mut matched = vec![];
            for v in vms.iter_mut() {
                if p.applies_to.is_some() && matches_vm(&applies, v) {
                    matched.push(v.name.clone());
                    v.protection_plans.push(p.name.value.clone());
                }
            }
            let mut replicate = vec![];
            for r in &p.replicate {
                let target = r.to_site.as_ref().and_then(|t| {
                    let found = sites.iter().find(|s| s.name == t.value);
                    if found.is_none() {
                        self.push(unknown(
                            "cairn::resolve::unknown_site",
                            t,
                            "site",
                            &owner,
                            &site_names,
                        ));
                    }
                    found
                });
                if let (Some(target), Some(pool)) = (target, &r.pool)
                    && !target.pools.iter().any(|x| x.name == pool.value)
                {
                    let pools: Vec<&str> = target.pools.iter().map(|x| x.name.as_str()).collect();
                    let mut d =
                        unknown("cairn::resolve::unknown_pool", pool, "pool", &owner, &pools);
                    d.message = format!(
                        "{owner} replicates into pool `{}`, which site `{}` does not have",
                        pool.value, target.name
                    );
                    self.push(d);
                }
                if let (Some(target), Some(to)) = (target, &r.to_site) {
                    let same: Vec<&str> = vms
                        .iter()
                        .filter(|v| matched.contains(&v.name) && v.site == target.name)
                        .map(|v| v.name.as_str())
                        .collect();
                    if !same.is_empty() {
                        self.push(
                            Diagnostic::error(
                                "cairn::check::replicate_to_own_site",
                                to.span,
                                format!("{owner} replicates to site `{}`, where {} of its VMs already run: {}", target.name, same.len(), list(&same, 5)),
                            )
                            .with_help("disaster-recovery copies must go to another site than the VM's"),
                        );
                    }
                }
                replicate.push(Replication {
                    to_site: r
                        .to_site
                        .as_ref()
                        .map(|t| t.value.clone())
                        .unwrap_or_default(),
                    pool: r.pool.as_ref().map(|t| t.value.clone()).unwrap_or_default(),
                    every_ms: r.every.as_ref().map_or(0, |e| e.value),
                    keep: r.keep.as_ref().map_or(1, |k| k.value),
                });
            }
            out.push(ProtectionPlan {
                name: p.name.value.clone(),
                snapshot: p.snapshot.as_ref().map(|s| Schedule {
                    every_ms: s.every.as_ref().map_or(0, |e| e.value),
                    keep: s.keep.as_ref().map_or(1, |k| k.value),
                }),
                replicate,
                applies_to: applies,
                vms: matched,
            });
        }
        for v in vms.iter_mut() {
            v.protection_plans.sort();
        }
        out
    }
}

fn disk(d: &spec::HostDisk) -> Disk {
    Disk {
        name: d.name.value.clone(),
        size_bytes: d.size.as_ref().map_or(0, |s| s.value),
        class: d
            .class
            .as_ref()
            .map(|c| c.value.clone())
            .unwrap_or_default(),
    }
}

fn nic(n: &spec::HostNic) -> Nic {
    Nic {
        name: n.name.value.clone(),
        speed_bps: n.speed.as_ref().map_or(0, |s| s.value),
    }
}

fn labels(kv: &[spec::KeyValue]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|l| (l.key.value.clone(), l.value.value.clone()))
        .collect()
}

fn selector(s: &spec::SelectorSpec) -> BTreeMap<String, String> {
    s.pairs
        .iter()
        .map(|p| (p.key.value.clone(), p.value.value.clone()))
        .collect()
}

/// Whether a VM matches a selector: every pair must hold. The keys
/// `tenant`, `site`, `group`, `sla` and `availability` are built in; any
/// other key is a tag.
pub fn matches_vm(selector: &BTreeMap<String, String>, vm: &Vm) -> bool {
    selector.iter().all(|(k, v)| match k.as_str() {
        "tenant" => &vm.tenant == v,
        "site" => &vm.site == v,
        "group" => vm.group.as_deref() == Some(v.as_str()),
        "sla" => &vm.sla.name == v || vm.sla.class.as_str() == v,
        "availability" => vm.availability.as_str() == v,
        "name" => &vm.name == v,
        _ => vm.tags.get(k) == Some(v),
    })
}

/// Whether a node matches a selector: labels, plus the built-in keys
/// `site`, `rack`, `node` and `class`.
pub fn matches_node(selector: &BTreeMap<String, String>, node: &Node) -> bool {
    selector.iter().all(|(k, v)| match k.as_str() {
        "site" => &node.site == v,
        "rack" => &node.rack == v,
        "node" => &node.name == v,
        "class" => &node.class == v,
        _ => node.labels.get(k) == Some(v),
    })
}

fn list(items: &[&str], max: usize) -> String {
    let shown: Vec<&str> = items.iter().copied().take(max).collect();
    let more = items.len().saturating_sub(max);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDRESS/PREFIX` with no host bits set.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').ok_or("it has no `/PREFIX`")?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or(format!("the prefix length must be 0..={max}"))?;
        let c = Cidr { addr, prefix };
        if c.bits(addr) & !c.mask() != 0 {
            return Err(format!(
                "host bits are set; the network address is {}",
                c.network_string()
            ));
        }
        Ok(c)
    }

    fn width(&self) -> u32 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    fn bits(&self, ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v) => u128::from(u32::from(v)),
            IpAddr::V6(v) => u128::from(v),
        }
    }

    fn mask(&self) -> u128 {
        let w = self.width();
        let all = if w == 32 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        if self.prefix == 0 {
            0
        } else {
            all & !((1u128 << (w - u32::from(self.prefix))) - 1)
        }
    }

    fn network_string(&self) -> String {
        let bits = self.bits(self.addr) & self.mask();
        let ip: IpAddr = if self.addr.is_ipv4() {
            IpAddr::V4((bits as u32).into())
        } else {
            IpAddr::V6(bits.into())
        };
        format!("{ip}/{}", self.prefix)
    }

    /// Whether the network contains an address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && self.bits(ip) & self.mask() == self.bits(self.addr)
    }

    fn is_network_address(&self, ip: IpAddr) -> bool {
        self.width() - u32::from(self.prefix) > 1 && self.bits(ip) == self.bits(self.addr)
    }

    fn first_host(&self) -> String {
        let bits = self.bits(self.addr) + 1;
        let ip: IpAddr = if self.addr.is_ipv4() {
            IpAddr::V4((bits as u32).into())
        } else {
            IpAddr::V6(bits.into())
        };
        ip.to_string()
    }

    /// Whether two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let shorter = if self.prefix <= other.prefix {
            self
        } else {
            other
        };
        shorter.contains(if shorter == self {
            other.addr
        } else {
            self.addr
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
