//! The console's pages: pure functions from a [`Snapshot`] (and what one page
//! adds to it) to HTML. maud checks the templates when the crate compiles and
//! escapes every value it inserts, so a tenant-controlled name is text, never
//! markup.

use std::collections::{BTreeMap, HashMap};

use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::data::{self, Problem, Snapshot, Use, ago, bytes, first_line, short, vm_path};
use crate::events::Event;

/// The sections of the navigation bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// `/`.
    Overview,
    /// `/topology`.
    Topology,
    /// `/vms`.
    Vms,
    /// `/syncs`.
    Syncs,
    /// `/events`.
    Events,
    /// `/graph`.
    Graph,
    /// `/tenants`.
    Tenants,
    /// `/login`.
    None,
}

const NAV: [(Nav, &str, &str); 7] = [
    (Nav::Overview, "/", "Overview"),
    (Nav::Topology, "/topology", "Topology"),
    (Nav::Vms, "/vms", "VMs"),
    (Nav::Syncs, "/syncs", "Plans & syncs"),
    (Nav::Events, "/events", "Events & audit"),
    (Nav::Graph, "/graph", "Graph"),
    (Nav::Tenants, "/tenants", "Tenants"),
];

/// Rows per page of the VM, sync and event tables.
pub const PAGE_SIZE: usize = 50;

/// The frame of every page.
pub fn layout(title: &str, active: Nav, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · cairn" }
                link rel="stylesheet" href="/console.css";
                @if active != Nav::None {
                    script src="/console.js" defer {}
                }
            }
            body {
                header {
                    a.brand href="/" { "cairn" }
                    @if active != Nav::None {
                        nav aria-label="Sections" {
                            ul {
                                @for (nav, href, label) in NAV {
                                    li {
                                        @if nav == active {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        span #live .live aria-live="polite" { "static" }
                        form method="post" action="/logout" {
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The CSS class of a state word.
pub fn state_class(state: &str) -> &'static str {
    match state {
        "running" | "ready" | "healthy" | "none" | "succeeded" | "ok" | "repaired" | "in-sync" => {
            "s-ok"
        }
        "pending" | "suspect" | "maintenance" | "degraded" | "unknown" | "held" | "partial"
        | "scheduled" | "started" | "found" | "reported" | "changed" => "s-warn",
        "stopped" | "skipped" => "s-idle",
        _ => "s-bad",
    }
}

fn state(word: &str) -> Markup {
    html! { span class={ "state " (state_class(word)) } { (word) } }
}

/// A VM's state, painted live by the script (`data-vm`).
fn vm_state(vm: &str, word: &str) -> Markup {
    html! {
        span class={ "state " (state_class(word)) } data-vm=(vm) data-state=(word) data-state-text { (word) }
    }
}

/// A node's state, painted live by the script (`data-node`).
fn node_state(node: &str, word: &str) -> Markup {
    html! {
        span class={ "state " (state_class(word)) } data-node=(node) data-state=(word) data-state-text { (word) }
    }
}

fn time(at: &str, at_unix_ms: u64, now: u64) -> Markup {
    html! { time datetime=(at) title=(at) { (ago(now, at_unix_ms)) } }
}

/// How old the status a page shows is: pages show the newest the controller has
/// at once and never wait for the nodes; an old or stale one is renewed behind
/// the page (the live updates then paint the change).
fn observed_note(s: &Snapshot) -> Markup {
    html! {
        @if let Some(at) = s.status_observed_unix_ms {
            p.small.observed {
                "Nodes observed "
                (time(&crate::events::rfc3339(at), at, s.now_unix_ms))
                @if s.status_revalidating { "; a newer observation is being made (reload to see it)" }
                "."
            }
        }
    }
}

/// The login page: the controller's token, exchanged for a session cookie.
pub fn login(error: Option<&str>, next: &str) -> Markup {
    layout(
        "Log in",
        Nav::None,
        html! {
            div.login {
                h1 { "Log in to the cairn console" }
                p {
                    "Paste the controller's token, from "
                    code { "DATA_DIR/controller.token" }
                    " (readable by the controller's user only). It is exchanged for a session cookie for 12 hours."
                }
                @if let Some(e) = error {
                    p.error role="alert" { (e) }
                }
                form method="post" action="/login" {
                    input type="hidden" name="next" value=(next);
                    label for="token" { "Token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Log in" }
                }
            }
        },
    )
}

/// `/`: the last sync, the held plan, drift, counts, problems.
pub fn overview(s: &Snapshot) -> Markup {
    let (vm_counts, node_counts) = s.counts();
    let problems = s.problems();
    let last_sync_event = s.controller.last_sync.as_ref().and_then(|last| {
        s.events
            .iter()
            .find(|e| e.kind == "sync" && e.commit.as_deref() == Some(&last.commit))
    });
    let body = html! {
        h1 { "Overview" }
        (observed_note(s))
        div.cards {
            section.card aria-labelledby="h-sync" {
                h2 #h-sync { "Last sync" }
                @if let Some(last) = &s.controller.last_sync {
                    dl.kv {
                        dt { "commit" } dd { code { (short(&last.commit)) } }
                        dt { "result" } dd { (state(&last.result)) }
                        @if let Some(e) = last_sync_event {
                            @if let Some(author) = detail_str(e, "author") { dt { "author" } dd { (author) } }
                            @if let Some(signer) = detail_str(e, "signer") { dt { "signer" } dd { (signer) } }
                            @if let Some(message) = detail_str(e, "summary") { dt { "message" } dd { (message) } }
                            dt { "time" } dd { (time(&e.at, e.at_unix_ms, s.now_unix_ms)) }
                            dt { "details" } dd { a href={ "/syncs/" (e.seq) } { "the sync" } }
                        } @else {
                            dt { "time" } dd { (last.at) }
                        }
                        @if let Some(r) = &last.reason { dt { "reason" } dd { (first_line(r)) } }
                    }
                } @else {
                    p { "No sync yet." }
                }
            }
            section.card aria-labelledby="h-branch" {
                h2 #h-branch { "Source" }
                dl.kv {
                    dt { "repository" } dd { (s.controller.repo) }
                    dt { "branch" } dd { (s.controller.branch) }
                    dt { "head" } dd { code { (s.controller.head.as_deref().map(short).unwrap_or("—")) } }
                    dt { "applied" } dd { code { (s.applied.as_ref().map(|a| short(&a.commit)).unwrap_or("—")) } }
                    dt { "mode" } dd { @if s.controller.paused { (state("paused")) } @else { (state("ok")) " following" } }
                }
            }
            section.card aria-labelledby="h-vms" {
                h2 #h-vms { "VMs" }
                (count_list(&vm_counts, "/vms?state="))
                @if let Some(st) = &s.status { p.small { (st.drifted) " object(s) drifted" } }
            }
            section.card aria-labelledby="h-nodes" {
                h2 #h-nodes { "Nodes" }
                (count_list(&node_counts, "/topology#state-"))
            }
        }
        @if let Some(held) = &s.held {
            h2 { "Held plan" }
            (held_plan(held))
        }
        h2 { "Problems" }
        (problem_list(&problems))
        h2 { "Recent events" }
        ul #recent-events .small {
            @for e in s.events.iter().take(10) {
                li { (event_line(e)) }
            }
        }
    };
    layout("Overview", Nav::Overview, body)
}

fn count_list(counts: &std::collections::BTreeMap<String, usize>, link: &str) -> Markup {
    html! {
        @if counts.is_empty() { p { "none" } }
        ul {
            @for (word, n) in counts {
                li { a href={ (link) (word) } { (n) " " } (state(word)) }
            }
        }
    }
}

fn problem_list(problems: &[Problem]) -> Markup {
    html! {
        @if problems.is_empty() {
            p { (state("ok")) " Nothing needs you." }
        } @else {
            ul.problems {
                @for p in problems {
                    li { a href=(p.link) { (p.what) } }
                }
            }
        }
    }
}

fn held_plan(held: &crate::gate::HeldPlan) -> Markup {
    html! {
        section #held {
            p {
                "Plan " code { (held.plan_id) } " of commit " code { (short(&held.commit)) }
                " (" (held.steps) " steps, +" (held.summary.add) " ~" (held.summary.change)
                " −" (held.summary.destroy) " ↔" (held.summary.moves) ") is held since " (held.at)
                ". Approve with " code { "cairn sync --approve " (held.plan_id) } "."
            }
            ul { @for h in &held.holds { li { strong { (h.kind) } ": " (h.reason) } } }
            @if !held.destructive.is_empty() {
                p { "It would:" }
                ul { @for d in &held.destructive { li { (d) } } }
            }
        }
    }
}

fn detail_str<'a>(e: &'a Event, key: &str) -> Option<&'a str> {
    e.detail.as_ref()?.get(key)?.as_str()
}

fn event_line(e: &Event) -> Markup {
    html! {
        (e.at) " " (e.kind) " " (state(&e.result))
        @if let Some(o) = &e.object { " " (o) }
        @if let Some(r) = &e.reason { ": " (first_line(r)) }
    }
}

/// A horizontal bar of one resource: reserved, on-demand, spot, free.
fn bar(label: &str, u: &Use, show: fn(u64) -> String) -> Markup {
    const W: u64 = 300;
    let cap = u.capacity.max(1);
    let px = |v: u64| (v.min(cap) * W / cap).to_string();
    let (r, o, sp) = (u.reserved, u.on_demand, u.spot);
    let used = r + o + sp;
    let text = format!(
        "{label}: reserved {}, on-demand {}, spot {}, free {} of {}",
        show(r),
        show(o),
        show(sp),
        show(u.free()),
        show(u.capacity)
    );
    html! {
        div {
            span.small { (label) " " (show(used)) " / " (show(u.capacity)) }
            svg.bar width=(W) height="12" role="img" aria-label=(text) {
                title { (text) }
                rect.f x="0" y="0" width=(W) height="12" {}
                rect.r x="0" y="0" width=(px(r)) height="12" {}
                rect.o x=(px(r)) y="0" width=(px(o)) height="12" {}
                rect.sp x=(px(r + o)) y="0" width=(px(sp)) height="12" {}
            }
        }
    }
}

fn vcpus(n: u64) -> String {
    format!("{n} vCPU")
}

/// `/topology`: sites, racks, nodes with their use, VMs, disks and bonds.
pub fn topology(s: &Snapshot, rack: Option<&str>) -> Markup {
    let Some(model) = s.model() else {
        return layout("Topology", Nav::Topology, no_commit());
    };
    let by = ByNode::of(s);
    let nodes: usize = model.sites.iter().map(|site| site.nodes.len()).sum();
    // A large cluster shows its racks first, one rack's nodes per page.
    let shown = |name: &str| match rack {
        Some(r) => r == name,
        None => nodes <= TOPOLOGY_ALL_NODES,
    };
    let body = html! {
        h1 { "Topology" }
        (observed_note(s))
        p.legend {
            span { i.r {} "reserved" } span { i.o {} "on-demand" } span { i.sp {} "spot" } span { i.f {} "free (of the overcommitted capacity)" }
        }
        @for site in &model.sites {
            section.site aria-labelledby={ "site-" (site.name) } {
                h2 id={ "site-" (site.name) } { "Site " (site.name) }
                p.small { "overcommit cpu ×" (site.overcommit.cpu) ", memory ×" (site.overcommit.memory) }
                @for rack in &site.racks {
                    @if shown(&rack.name) {
                        h3 { "Rack " (rack.name) }
                        div.rack {
                            @for name in &rack.nodes {
                                @if let Some(node) = site.nodes.iter().find(|n| &n.name == name) {
                                    (node_box(s, node, &by))
                                }
                            }
                        }
                    } @else {
                        p {
                            a href={ "/topology?rack=" (data::path_segment(&rack.name)) } { "Rack " (rack.name) }
                            ": " (rack.nodes.len()) " nodes, "
                            (rack.nodes.iter().map(|n| by.vms.get(n.as_str()).map_or(0, Vec::len)).sum::<usize>()) " VMs; not ready: "
                            (rack.nodes.iter().filter(|n| by.rows.get(n.as_str()).is_none_or(|r| data::node_state(r) != "ready")).count())
                        }
                    }
                }
            }
        }
    };
    layout("Topology", Nav::Topology, body)
}

/// Up to this many nodes the topology shows every node at once.
pub const TOPOLOGY_ALL_NODES: usize = 200;

/// What the topology shows of each node, grouped once.
struct ByNode<'a> {
    rows: HashMap<&'a str, &'a reconciler::status::NodeRow>,
    vms: std::collections::BTreeMap<&'a str, Vec<&'a reconciler::status::VmRow>>,
    bonds: HashMap<&'a str, Vec<&'a reconciler::status::BondRow>>,
    volumes: HashMap<&'a str, Vec<&'a reconciler::status::VolumeRow>>,
}

impl<'a> ByNode<'a> {
    fn of(s: &'a Snapshot) -> ByNode<'a> {
        let mut by = ByNode {
            rows: HashMap::new(),
            vms: s.vms_by_node(),
            bonds: HashMap::new(),
            volumes: HashMap::new(),
        };
        if let Some(st) = &s.status {
            by.rows = st.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
            for b in &st.bonds {
                by.bonds.entry(b.node.as_str()).or_default().push(b);
            }
            for v in &st.volumes {
                by.volumes.entry(v.node.as_str()).or_default().push(v);
                for r in v.replicas.iter().filter(|r| **r != v.node) {
                    by.volumes.entry(r.as_str()).or_default().push(v);
                }
            }
        }
        by
    }
}

fn node_box(s: &Snapshot, node: &compiler::model::Node, by: &ByNode<'_>) -> Markup {
    let name = node.name.as_str();
    let row = by.rows.get(name).copied();
    let word = row
        .map(data::node_state)
        .unwrap_or_else(|| "unknown".into());
    let vms: &[&reconciler::status::VmRow] = by.vms.get(name).map(|v| &v[..]).unwrap_or_default();
    let (cpu, mem) = s.node_use(name, vms);
    let bonds: &[&reconciler::status::BondRow] =
        by.bonds.get(name).map(|v| &v[..]).unwrap_or_default();
    let volumes: &[&reconciler::status::VolumeRow] =
        by.volumes.get(name).map(|v| &v[..]).unwrap_or_default();
    let disk_total: u64 = node.disks.iter().map(|d| d.size_bytes).sum();
    let volume_bytes: u64 = volumes.iter().map(|v| v.size_bytes).sum();
    html! {
        article.node id={ "node-" (node.name) } aria-labelledby={ "h-node-" (node.name) } {
            h4 id={ "h-node-" (node.name) } { span { "Node " (node.name) } (node_state(&node.name, &word)) }
            @if let Some(e) = row.and_then(|r| r.error.as_deref()) { p.small.error { (first_line(e)) } }
            (bar("CPU", &cpu, vcpus))
            (bar("Memory", &mem, bytes))
            div.vmchips aria-label={ "VMs on " (node.name) } {
                @for v in vms {
                    a class={ "vmchip " (state_class(&v.state)) } href=(vm_path(&v.name)) data-vm=(v.name) data-state=(v.state)
                        aria-label={ "vm " (v.name) ": " (v.state) } { (v.name) }
                }
                @if vms.is_empty() { span.small { "no VMs" } }
            }
            p.small {
                "disks " (bytes(disk_total)) " (" (node.disks.len()) "), volumes here " (bytes(volume_bytes))
                " (" (volumes.len()) ")"
            }
            @for b in bonds {
                p.small {
                    "bond " strong { (b.name) } " " (b.mode) " " (state(&b.health)) "; active "
                    @if b.active_members.is_empty() { "none" } @else { (b.active_members.join(", ")) }
                    " of " (b.members.join(", "))
                    @if !b.traffic.is_empty() { br; "traffic: " (b.traffic.join("; ")) }
                }
            }
        }
    }
}

fn no_commit() -> Markup {
    html! {
        h1 { "Nothing applied yet" }
        p { "The controller has not applied a commit: see " a href="/syncs" { "the syncs" } "." }
    }
}

/// The filters of `/vms` (query parameters).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VmFilter {
    /// Tenant.
    #[serde(default)]
    pub tenant: String,
    /// SLA profile name.
    #[serde(default)]
    pub sla: String,
    /// `none`, `ha`, `ft`.
    #[serde(default)]
    pub availability: String,
    /// State word.
    #[serde(default)]
    pub state: String,
    /// Part of the name.
    #[serde(default)]
    pub q: String,
    /// 1-based page.
    #[serde(default)]
    pub page: Option<usize>,
}

impl VmFilter {
    fn query(&self, page: usize) -> String {
        let mut parts = vec![];
        for (k, v) in [
            ("tenant", &self.tenant),
            ("sla", &self.sla),
            ("availability", &self.availability),
            ("state", &self.state),
            ("q", &self.q),
        ] {
            if !v.is_empty() {
                parts.push(format!("{k}={}", data::path_segment(v)));
            }
        }
        parts.push(format!("page={page}"));
        format!("?{}", parts.join("&"))
    }
}

struct VmLine<'a> {
    row: &'a reconciler::status::VmRow,
    sla: &'a str,
    availability: &'a str,
}

/// `/vms`: the filtered, paginated table.
pub fn vms(s: &Snapshot, f: &VmFilter) -> Markup {
    let model = s.model();
    let lines: Vec<VmLine> = s
        .vms()
        .iter()
        .map(|row| {
            let vm = model.and_then(|m| m.vm(&row.name));
            VmLine {
                row,
                sla: vm.map(|v| v.sla.name.as_str()).unwrap_or(""),
                availability: vm.map(|v| v.availability.as_str()).unwrap_or(""),
            }
        })
        .collect();
    let chosen: Vec<&VmLine> = lines
        .iter()
        .filter(|l| f.tenant.is_empty() || l.row.tenant == f.tenant)
        .filter(|l| f.sla.is_empty() || l.sla == f.sla)
        .filter(|l| f.availability.is_empty() || l.availability == f.availability)
        .filter(|l| f.state.is_empty() || l.row.state == f.state)
        .filter(|l| f.q.is_empty() || l.row.name.contains(&f.q))
        .collect();
    let pages = chosen.len().div_ceil(PAGE_SIZE).max(1);
    let page = f.page.unwrap_or(1).clamp(1, pages);
    let options = |values: Vec<&str>| {
        let mut v: Vec<String> = values.into_iter().map(str::to_owned).collect();
        v.sort();
        v.dedup();
        v
    };
    let tenants = options(lines.iter().map(|l| l.row.tenant.as_str()).collect());
    let slas = options(lines.iter().map(|l| l.sla).collect());
    let states = options(lines.iter().map(|l| l.row.state.as_str()).collect());
    let body = html! {
        h1 { "VMs" }
        (observed_note(s))
        form.filters method="get" action="/vms" {
            (select("tenant", "Tenant", &tenants, &f.tenant))
            (select("sla", "SLA", &slas, &f.sla))
            (select("availability", "Availability", &["none".into(), "ha".into(), "ft".into()], &f.availability))
            (select("state", "State", &states, &f.state))
            label { "Name contains" input type="search" name="q" value=(f.q); }
            button type="submit" { "Filter" }
            a href="/vms" { "clear" }
        }
        p.small { (chosen.len()) " of " (lines.len()) " VMs; page " (page) " of " (pages) }
        table {
            caption.small { "VMs, by name" }
            thead { tr { th { "name" } th { "tenant" } th { "SLA" } th { "availability" } th { "node" } th { "state" } th { "health" } th { "drift" } } }
            tbody {
                @for l in chosen.iter().skip((page - 1) * PAGE_SIZE).take(PAGE_SIZE) {
                    tr {
                        td { a href=(vm_path(&l.row.name)) { (l.row.name) } }
                        td { (l.row.tenant) }
                        td { (l.sla) }
                        td { (l.availability) }
                        td { a href={ "/topology#node-" (l.row.node) } { (l.row.node) } }
                        td { (vm_state(&l.row.name, &l.row.state)) }
                        td { (state(&l.row.health)) }
                        td { (state(&l.row.drift)) }
                    }
                }
            }
        }
        nav.pager aria-label="Pages" {
            @if page > 1 { a href={ "/vms" (f.query(page - 1)) } rel="prev" { "← previous" } }
            @if page < pages { a href={ "/vms" (f.query(page + 1)) } rel="next" { "next →" } }
        }
    };
    layout("VMs", Nav::Vms, body)
}

fn select(name: &str, label: &str, values: &[String], chosen: &str) -> Markup {
    html! {
        label {
            (label)
            select name=(name) {
                option value="" { "any" }
                @for v in values {
                    option value=(v) selected[v == chosen] { (v) }
                }
            }
        }
    }
}

/// What a VM's page adds to the snapshot.
#[derive(Debug, Clone, Default)]
pub struct VmExtra {
    /// `cairn place --explain`'s ranking of the site's nodes.
    pub candidates: Option<Vec<compiler::place::Candidate>>,
    /// The events about it, newest first.
    pub events: Vec<Event>,
}

/// `/vms/NAME`.
pub fn vm(s: &Snapshot, name: &str, extra: &VmExtra) -> Option<Markup> {
    let row = s.vms().iter().find(|v| v.name == name);
    let spec = s.model().and_then(|m| m.vm(name));
    if row.is_none() && spec.is_none() {
        return None;
    }
    let last_move = extra.events.iter().find(|e| {
        e.object.as_deref().is_some_and(|o| o.contains("move")) || e.kind == "ha-restart"
    });
    let body = html! {
        h1 { "VM " (name) }
        (observed_note(s))
        div.cards {
            section.card aria-labelledby="h-now" {
                h2 #h-now { "Now" }
                dl.kv {
                    @if let Some(r) = row {
                        dt { "state" } dd { (vm_state(name, &r.state)) }
                        dt { "health" } dd { (state(&r.health)) }
                        dt { "node" } dd { a href={ "/topology#node-" (r.node) } { (r.node) } }
                        dt { "wanted on" } dd { (if r.desired_node.is_empty() { "nowhere" } else { &r.desired_node }) }
                        dt { "drift" } dd { (state(&r.drift)) }
                        dt { "starts" } dd { (r.starts) }
                        dt { "crashes" } dd { (r.crash_count) }
                        @if !r.guest_block_test.is_empty() { dt { "guest block test" } dd { (r.guest_block_test) } }
                    }
                }
                @if let Some(r) = row { @if !r.detail.is_empty() { ul { @for d in &r.detail { li { (d) } } } } }
            }
            @if let Some(v) = spec {
                section.card aria-labelledby="h-spec" {
                    h2 #h-spec { "Spec" }
                    dl.kv {
                        dt { "tenant" } dd { a href={ "/tenants#tenant-" (v.tenant) } { (v.tenant) } }
                        dt { "site" } dd { (v.site) }
                        dt { "size" } dd { (v.cpu) " vCPU, " (bytes(v.memory_bytes)) }
                        dt { "SLA" } dd { (v.sla.name) " (" (v.sla.class.as_str()) ", priority " (v.sla.priority) ")" }
                        dt { "availability" } dd { (v.availability.as_str()) }
                        dt { "image" } dd { (v.image) }
                        dt { "protection" } dd { @if v.protection_plans.is_empty() { "none" } @else { (v.protection_plans.join(", ")) } }
                        @for (k, val) in &v.tags { dt { "tag " (k) } dd { (val) } }
                    }
                }
            }
            section.card aria-labelledby="h-move" {
                h2 #h-move { "Last migration" }
                @if let Some(e) = last_move { p { (event_line(e)) } } @else { p { "none recorded" } }
            }
        }
        h2 { "Why it sits on its node" }
        @if let Some(cands) = &extra.candidates {
            p.small { "The placement's ranking of the site's nodes, as " code { "cairn place --explain " (name) } " gives it (* chosen)." }
            table {
                thead { tr { th { "" } th { "node" } th { "score" } th { "parts, or what rules it out" } } }
                tbody {
                    @for c in cands {
                        tr {
                            td { @if c.chosen { "*" } }
                            td { (c.node) }
                            td { @if c.feasible { (c.total) } @else { "—" } }
                            td {
                                @if c.feasible {
                                    (c.parts.iter().map(|p| format!("{} {:+}", p.name, p.value)).collect::<Vec<_>>().join(", "))
                                } @else {
                                    "ruled out: " (c.ruled_out_by.clone().unwrap_or_default())
                                }
                            }
                        }
                    }
                }
            }
        } @else { p { "No explanation: the VM is not in the applied commit." } }
        h2 { "Disks and their copies" }
        @let disks = row.map(|r| &r.disks[..]).unwrap_or_default();
        @if disks.is_empty() && spec.is_none_or(|v| v.disks.is_empty()) { p { "no disks" } }
        @if let Some(v) = spec {
            @if !v.disks.is_empty() {
                table {
                    thead { tr { th { "disk" } th { "size" } th { "pool" } th { "attached" } th { "data" } th { "copies in sync" } th { "I/O" } } }
                    tbody {
                        @for d in &v.disks {
                            @let volume = reconciler::desired::volume_name(&v.name, &d.name);
                            @let seen = disks.iter().find(|o| o.volume == volume);
                            tr {
                                td { (d.name) }
                                td { (bytes(d.size_bytes)) }
                                td { (d.pool) }
                                @if let Some(o) = seen {
                                    td { (if o.attached { "yes" } else { "no" }) }
                                    td { (o.data) }
                                    td { (o.copies_in_sync) " / " (o.copies) }
                                    td { (o.reads) " reads, " (o.writes) " writes, " (o.errors) " errors" }
                                } @else {
                                    td colspan="4" { "not reported" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "NICs" }
        @let nics = row.map(|r| &r.nics[..]).unwrap_or_default();
        @if nics.is_empty() { p { "none reported" } } @else {
            table {
                thead { tr { th { "network" } th { "tap" } th { "bridge" } th { "MAC" } th { "ready" } th { "detail" } } }
                tbody {
                    @for n in nics {
                        tr { td { (n.network) } td { (n.tap) } td { (n.bridge) } td { (n.mac) } td { (if n.ready { "yes" } else { "no" }) } td { (n.detail) } }
                    }
                }
            }
        }
        h2 { "Events" }
        (event_table(&extra.events, s.now_unix_ms))
    };
    Some(layout(&format!("VM {name}"), Nav::Vms, body))
}

fn event_table(events: &[Event], now: u64) -> Markup {
    html! {
        @if events.is_empty() { p { "none" } } @else {
            table {
                thead { tr { th { "when" } th { "kind" } th { "result" } th { "object" } th { "commit / plan" } th { "why" } } }
                tbody {
                    @for e in events {
                        tr {
                            td { (time(&e.at, e.at_unix_ms, now)) }
                            td { (e.kind) }
                            td { (state(&e.result)) }
                            td { (e.object.as_deref().unwrap_or("")) }
                            td {
                                @if e.kind == "sync" { a href={ "/syncs/" (e.seq) } { "sync " (e.seq) } " " }
                                @if let Some(c) = &e.commit { code { (short(c)) } " " }
                                @if let Some(p) = &e.plan_id { a href={ "/plans/" (data::path_segment(p)) } { "plan " (p) } }
                            }
                            td { (e.reason.as_deref().map(first_line).unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

/// `/syncs`: every sync, newest first, and the held plan.
pub fn syncs(s: &Snapshot, syncs: &[Event], page: usize, more: bool) -> Markup {
    let body = html! {
        h1 { "Plans and syncs" }
        @if let Some(held) = &s.held { h2 { "Held plan" } (held_plan(held)) }
        table {
            caption.small { "Syncs, newest first" }
            thead { tr { th { "sync" } th { "when" } th { "commit" } th { "author" } th { "result" } th { "plan" } th { "why" } } }
            tbody {
                @for e in syncs {
                    tr {
                        td { a href={ "/syncs/" (e.seq) } { "sync " (e.seq) } }
                        td { (time(&e.at, e.at_unix_ms, s.now_unix_ms)) }
                        td { code { (e.commit.as_deref().map(short).unwrap_or("")) } }
                        td { (detail_str(e, "author").unwrap_or("")) }
                        td { (state(&e.result)) }
                        td { @if let Some(p) = &e.plan_id { a href={ "/plans/" (data::path_segment(p)) } { (p) } } }
                        td { (e.reason.as_deref().map(first_line).unwrap_or("")) }
                    }
                }
            }
        }
        nav.pager aria-label="Pages" {
            @if page > 1 { a href={ "/syncs?page=" (page - 1) } rel="prev" { "← newer" } }
            @if more { a href={ "/syncs?page=" (page + 1) } rel="next" { "older →" } }
        }
    };
    layout("Plans and syncs", Nav::Syncs, body)
}

/// A plan and its executions, from the state store's journal.
#[derive(Debug, Clone)]
pub struct PlanView {
    /// The plan.
    pub plan: reconciler::plan::Plan,
    /// `cairn plan`'s text of it.
    pub text: String,
    /// Each execution (oldest first) with its journal.
    pub executions: Vec<(
        reconciler::state::PlanRecord,
        Vec<reconciler::state::StepRecord>,
    )>,
}

/// `/syncs/SEQ`: one sync with its policy results, plan and apply report.
pub fn sync(s: &Snapshot, e: &Event, plan: Option<&PlanView>) -> Markup {
    let d = e.detail.clone().unwrap_or_default();
    let body = html! {
        h1 { "Sync " (e.seq) " · " (state(&e.result)) }
        dl.kv {
            dt { "when" } dd { (e.at) }
            @if let Some(c) = &e.commit { dt { "commit" } dd { code { (c) } } }
            @if let Some(a) = d["author"].as_str() { dt { "author" } dd { (a) } }
            @if let Some(m) = d["summary"].as_str() { dt { "message" } dd { (m) } }
            @if let Some(sg) = d["signer"].as_str() { dt { "signer" } dd { (sg) } }
            @if let Some(p) = &e.plan_id { dt { "plan" } dd { a href={ "/plans/" (data::path_segment(p)) } { (p) } } }
            @if let Some(ph) = d["phases"].as_object() {
                dt { "phases" } dd { (ph.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")) }
            }
            @if let Some(parts) = d["plan_parts"].as_object() {
                dt { "plan_ms of which" } dd { (parts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")) }
            }
        }
        @if let Some(r) = &e.reason {
            h2 { "Why" }
            pre.reason { (r) }
        }
        @if let Some(first) = d.get("first_error").filter(|v| !v.is_null()) {
            h2 { "Compile error" }
            p { code { (first["location"].as_str().unwrap_or("")) } " " (first["message"].as_str().unwrap_or("")) }
        }
        @if let Some(objects) = d["refused_objects"].as_array() {
            h2 { "Objects refused" }
            ul { @for o in objects { li { (json_text(o)) } } }
        }
        h2 { "Policy results" }
        @if let Some(denied) = d["policy_denied"].as_array() {
            p { (state("refused")) " The policy gate denied this plan:" }
            ul.policy { @for l in denied { li { (json_text(l)) } } }
        } @else if let Some(policy) = d.get("policy").filter(|v| !v.is_null()) {
            (json_list(policy))
        } @else {
            p { "No policy was evaluated for this sync." }
        }
        @match plan {
            Some(p) => (plan_view(p, s)),
            None => {
                h2 { "Plan" }
                p { "No plan was made or kept for this sync." }
            }
        }
    };
    layout(&format!("Sync {}", e.seq), Nav::Syncs, body)
}

fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn json_list(v: &serde_json::Value) -> Markup {
    html! {
        @match v {
            serde_json::Value::Object(map) => {
                dl.kv { @for (k, val) in map { dt { (k) } dd { (json_list(val)) } } }
            }
            serde_json::Value::Array(items) => {
                @if items.is_empty() { "none" }
                ul { @for i in items { li { (json_list(i)) } } }
            }
            other => (json_text(other)),
        }
    }
}

/// A plan rendered as `cairn plan` prints it, and its apply report step by step.
pub fn plan_view(p: &PlanView, _s: &Snapshot) -> Markup {
    let steps = &p.plan.steps;
    html! {
        h2 { "Plan " (p.plan.plan_id) }
        pre.plan { (p.text) }
        @for (record, journal) in &p.executions {
            h2 { "Apply " (record.execution_id) }
            p.small {
                @if record.finished { "finished" } @else { "not finished" }
                @if let Some(end) = &record.ended { "; " (end) }
            }
            table {
                thead { tr { th { "step" } th { "wave" } th { "node" } th { "action" } th { "status" } th { "attempts" } th { "error" } } }
                tbody {
                    @for step in steps {
                        @let rec = journal.iter().find(|r| r.step == step.id);
                        tr {
                            td { (step.id) }
                            td { (step.wave) }
                            td { (step.node) }
                            td { code { (step_action(step)) } }
                            @if let Some(r) = rec {
                                td { (state(step_status(r.status))) }
                                td { (r.attempts) }
                                td { (r.error.as_deref().unwrap_or("")) }
                            } @else {
                                td { (state("skipped")) } td { "0" } td { "not sent" }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn step_action(step: &reconciler::plan::Step) -> String {
    serde_json::to_value(&step.action)
        .ok()
        .and_then(|v| {
            let action = v.get("action")?.as_str()?.to_owned();
            let name = ["vm", "volume", "bond", "name"]
                .iter()
                .find_map(|k| v.get(*k).and_then(|n| n.as_str()))
                .unwrap_or_default()
                .to_owned();
            Some(format!("{action} {name}"))
        })
        .unwrap_or_else(|| "step".to_owned())
}

fn step_status(s: reconciler::state::StepStatus) -> &'static str {
    use reconciler::state::StepStatus as S;
    match s {
        S::Started => "started",
        S::Succeeded => "succeeded",
        S::Failed => "failed",
        S::Skipped => "skipped",
        S::Abandoned => "abandoned",
    }
}

/// `/plans/ID`.
pub fn plan(s: &Snapshot, p: &PlanView) -> Markup {
    layout(
        &format!("Plan {}", p.plan.plan_id),
        Nav::Syncs,
        plan_view(p, s),
    )
}

/// The filters of `/events`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EventFilter {
    /// Kind.
    #[serde(default)]
    pub kind: String,
    /// Result.
    #[serde(default)]
    pub result: String,
    /// Part of the object.
    #[serde(default)]
    pub object: String,
    /// Commit prefix.
    #[serde(default)]
    pub commit: String,
    /// Events older than this sequence number (the next page).
    #[serde(default)]
    pub before: Option<u64>,
}

impl EventFilter {
    /// Whether `e` passes.
    pub fn admits(&self, e: &Event) -> bool {
        (self.kind.is_empty() || e.kind == self.kind)
            && (self.result.is_empty() || e.result == self.result)
            && (self.object.is_empty()
                || e.object
                    .as_deref()
                    .is_some_and(|o| o.contains(&self.object)))
            && (self.commit.is_empty()
                || e.commit
                    .as_deref()
                    .is_some_and(|c| c.starts_with(&self.commit)))
            && self.before.is_none_or(|b| e.seq < b)
    }

    fn next(&self, before: u64) -> String {
        let mut q = format!("/events?before={before}");
        for (k, v) in [
            ("kind", &self.kind),
            ("result", &self.result),
            ("object", &self.object),
            ("commit", &self.commit),
        ] {
            if !v.is_empty() {
                q.push_str(&format!("&{k}={}", data::path_segment(v)));
            }
        }
        q
    }
}

/// The audit chain's verification, as `cairn audit verify` reports it.
#[derive(Debug, Clone)]
pub struct AuditView {
    /// `Ok(summary line)` or `Err(what is broken)`.
    pub verified: Result<String, String>,
    /// The newest entries, newest first, each with its position in the log
    /// (`/audit/N` shows its whole detail).
    pub entries: Vec<(usize, reconciler::state::AuditEntry)>,
}

/// An audit entry's detail in one short line: its plain fields, lists and
/// objects as counts, an apply report as its step results. Entries such as an
/// apply of 10,000 steps carry megabytes; the events page shows this and links
/// to the whole (`/audit/N`).
pub fn audit_summary(detail: &serde_json::Value) -> String {
    use serde_json::Value;
    const LONGEST: usize = 200;
    let Some(fields) = detail.as_object() else {
        let text = detail.to_string();
        return data::clip(&text, LONGEST);
    };
    let mut parts = vec![];
    if let Some(steps) = detail["steps"].as_array() {
        let mut by: BTreeMap<&str, usize> = BTreeMap::new();
        for step in steps {
            *by.entry(step["status"].as_str().unwrap_or("?"))
                .or_default() += 1;
        }
        let counts: Vec<String> = by.iter().map(|(k, n)| format!("{n} {k}")).collect();
        parts.push(format!("{} steps ({})", steps.len(), counts.join(", ")));
    }
    for (key, value) in fields {
        if key == "steps" && value.is_array() {
            continue;
        }
        let shown = match value {
            Value::String(text) => data::clip(text, 80),
            Value::Array(items) => format!("{} items", items.len()),
            Value::Object(inner) => format!("{} fields", inner.len()),
            other => other.to_string(),
        };
        parts.push(format!("{key}={shown}"));
    }
    data::clip(&parts.join(" "), LONGEST)
}

/// `/audit/N`: one audit entry whole.
pub fn audit_entry(index: usize, entry: &reconciler::state::AuditEntry, now: u64) -> Markup {
    let at = crate::events::rfc3339(entry.at_unix_ms);
    let plan = ["plan_id", "plan"]
        .iter()
        .find_map(|k| entry.detail[*k].as_str());
    let body = html! {
        h1 { "Audit entry " (index) }
        dl.kv {
            dt { "when" } dd { (time(&at, entry.at_unix_ms, now)) }
            dt { "user" } dd { (entry.user) }
            dt { "event" } dd { (entry.event) }
            @if let Some(p) = plan { dt { "plan" } dd { a href={ "/plans/" (data::path_segment(p)) } { (p) } } }
        }
        h2 { "Detail" }
        pre { (serde_json::to_string_pretty(&entry.detail).unwrap_or_default()) }
        p { a href="/events#audit" { "the audit log" } }
    };
    layout("Audit entry", Nav::Events, body)
}

/// `/events`: the filtered event log and the audit log.
pub fn events(s: &Snapshot, f: &EventFilter, events: &[Event], audit: &AuditView) -> Markup {
    let kinds = [
        "sync",
        "sync-started",
        "step",
        "drift",
        "crash-loop",
        "node",
        "settled",
        "paused",
        "resumed",
        "source",
        "controller",
        "held",
    ];
    let body = html! {
        h1 { "Events and audit" }
        form.filters method="get" action="/events" {
            label { "Kind" select name="kind" { option value="" { "any" } @for k in kinds { option value=(k) selected[k == f.kind] { (k) } } } }
            label { "Result" input name="result" value=(f.result); }
            label { "Object contains" input name="object" value=(f.object); }
            label { "Commit" input name="commit" value=(f.commit); }
            button type="submit" { "Filter" }
            a href="/events" { "clear" }
        }
        (event_table(events, s.now_unix_ms))
        nav.pager aria-label="Pages" {
            @if let Some(last) = events.last() { @if events.len() >= PAGE_SIZE { a href=(f.next(last.seq)) rel="next" { "older →" } } }
        }
        h2 #audit { "Audit log" }
        @match &audit.verified {
            Ok(line) => p { (state("ok")) " The chain verifies: " (line) },
            Err(why) => p { (state("broken")) " The chain does not verify: " (why) },
        }
        table {
            thead { tr { th { "when" } th { "user" } th { "event" } th { "detail" } } }
            tbody {
                @for (index, a) in &audit.entries {
                    tr {
                        td { (crate::events::rfc3339(a.at_unix_ms)) }
                        td { (a.user) }
                        td { (a.event) }
                        td { code { (audit_summary(&a.detail)) } " " a href={ "/audit/" (index) } { "detail" } }
                    }
                }
            }
        }
    };
    layout("Events and audit", Nav::Events, body)
}

/// `/graph`: the dependency graph of the applied commit.
pub fn graph(svg: Option<&str>, vertices: usize, waves: usize) -> Markup {
    let body = html! {
        h1 { "Dependency graph" }
        @if let Some(svg) = svg {
            p.small { (vertices) " objects in " (waves) " waves; an arrow means “must exist before”. Everything in a column can be made at once." }
            div.graph { (PreEscaped(svg)) }
        } @else { (no_commit()) }
    };
    layout("Dependency graph", Nav::Graph, body)
}

/// `/tenants`: quota and budget use.
pub fn tenants(s: &Snapshot) -> Markup {
    let Some(model) = s.model() else {
        return layout("Tenants", Nav::Tenants, no_commit());
    };
    let body = html! {
        h1 { "Tenants" }
        @for t in &model.tenants {
            section.card id={ "tenant-" (t.name) } aria-labelledby={ "h-tenant-" (t.name) } {
                h2 id={ "h-tenant-" (t.name) } { "Tenant " (t.name) }
                table {
                    thead { tr { th { "resource" } th { "used" } th { "limit" } th { "use" } } }
                    tbody {
                        (quota_row("vCPUs", t.usage.vcpus, t.quota.as_ref().and_then(|q| q.vcpus), |n| n.to_string()))
                        (quota_row("memory", t.usage.memory_bytes, t.quota.as_ref().and_then(|q| q.memory_bytes), bytes))
                        (quota_row("storage", t.usage.storage_bytes, t.quota.as_ref().and_then(|q| q.storage_bytes), bytes))
                        (quota_row("VMs", t.usage.vms, t.quota.as_ref().and_then(|q| q.vms), |n| n.to_string()))
                    }
                }
                p {
                    "Budget: "
                    @if let Some(b) = &t.budget { (format!("{:.2}", b.monthly)) " " (b.currency) " a month" } @else { "none" }
                    " · " a href={ "/vms?tenant=" (data::path_segment(&t.name)) } { "its VMs" }
                    " · members: " (t.members.iter().map(|m| format!("{} ({})", m.email, m.role.as_str())).collect::<Vec<_>>().join(", "))
                }
            }
        }
    };
    layout("Tenants", Nav::Tenants, body)
}

fn quota_row(what: &str, used: u64, limit: Option<u64>, show: fn(u64) -> String) -> Markup {
    let u = Use {
        reserved: used,
        capacity: limit.unwrap_or(used).max(1),
        ..Use::default()
    };
    html! {
        tr {
            td { (what) }
            td { (show(used)) }
            td { (limit.map(show).unwrap_or_else(|| "unlimited".into())) }
            td {
                @if let Some(l) = limit {
                    @let pct = used.saturating_mul(100) / l.max(1);
                    span class=(if pct > 100 { "s-bad" } else if pct >= 90 { "s-warn" } else { "s-ok" }) { (pct) " %" }
                    (bar("", &u, show))
                }
            }
        }
    }
}
