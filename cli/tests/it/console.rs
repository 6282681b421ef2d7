//! The controller's web console (`controller::console`, issue 23).
//!
//! - Golden HTML of every page for the quickstart, rendered from a fixed
//!   snapshot (the quickstart compiled and placed, every VM running but
//!   `web-1` crashed, a fixed clock, events and plan): `golden-tests/console-quickstart/console/*.html`.
//!   Re-bless with `UPDATE_GOLDEN=1 cargo test -p cli --test it golden`.
//! - Escaping: a tag value `<script>` is text.
//! - A headless Chromium against a dev cluster's controller (`browser` below).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use controller::console::data::{Applied, Snapshot};
use controller::console::pages::{self, AuditView, EventFilter, PlanView, VmExtra, VmFilter};
use controller::events::{Event, LastSync};
use reconciler::observe::NodeObservation;

use crate::repo_root;

mod browser;
mod stale;

/// The clock of the golden pages: 2025-12-01T14:40:00Z.
const NOW: u64 = 1_764_600_000_000;
const APPLIED: &str = "3f1c2a9be0d14c6f8a5b7e2d9c0f1a2b3c4d5e6f";
const REFUSED: &str = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b";

fn event(seq: u64, kind: &str, result: &str) -> Event {
    let at_unix_ms = NOW - (20 - seq) * 60_000;
    Event {
        seq,
        at: controller::events::rfc3339(at_unix_ms),
        at_unix_ms,
        kind: kind.to_owned(),
        commit: None,
        plan_id: None,
        object: None,
        result: result.to_owned(),
        reason: None,
        detail: None,
        replica: None,
    }
}

/// The quickstart as the console sees it, with the desired state it was built from.
struct Fixture {
    snapshot: Snapshot,
    desired: reconciler::desired::Desired,
    plan: PlanView,
}

fn quickstart() -> Fixture {
    let root = repo_root().join("examples/quickstart");
    let sources = compiler::Sources::load_dir(&root).expect("the quickstart loads");
    let compilation = compiler::compile(&sources);
    assert!(!compilation.has_errors(), "the quickstart compiles");
    let model = compilation.model;
    let placement = reconciler::desired::place(&model, None);
    let desired = reconciler::desired::desired(&model, Path::new("/spec"), placement);
    let mut observed = controller::bench::noop::observation_of(&desired);
    // web-1 crashed where it runs: the overview's problem, a red VM.
    for answer in observed.nodes.values_mut() {
        if let NodeObservation::Reachable { vms, .. } = answer
            && let Some(vm) = vms.get_mut("web-1")
        {
            vm.state = proto::v1::VmState::Crashed;
            vm.crash_count = 1;
        }
    }
    // The plan of the first sync: everything made on empty nodes.
    let mut empty = observed.clone();
    for answer in empty.nodes.values_mut() {
        if let NodeObservation::Reachable {
            vms,
            volumes,
            bonds,
            networking,
            ..
        } = answer
        {
            vms.clear();
            volumes.clear();
            bonds.clear();
            networking.segments.clear();
        }
    }
    let plan = reconciler::plan::plan(&desired, &empty, "a1b2c3d4e5f60718");
    let execution_id = format!("{}-0badc0de", plan.plan_id);
    let journal = plan
        .steps
        .iter()
        .map(|s| reconciler::state::StepRecord {
            step: s.id,
            request_id: reconciler::state::request_id(&execution_id, s.id),
            status: reconciler::state::StepStatus::Succeeded,
            replayed: false,
            attempts: 1,
            error: None,
            at_unix_ms: NOW - 15 * 60_000,
        })
        .collect();
    let record = reconciler::state::PlanRecord {
        execution_id,
        plan: serde_json::to_value(&plan).expect("plan JSON"),
        finished: true,
        ended: None,
        started_at_unix_ms: NOW - 16 * 60_000,
    };
    let audit = vec![reconciler::state::AuditEntry {
        at_unix_ms: NOW - 15 * 60_000,
        user: "controller".into(),
        event: "controller-sync".into(),
        detail: serde_json::json!({"commit": APPLIED, "result": "succeeded"}),
    }];
    let status = reconciler::status::status(
        &desired,
        &observed,
        Some(reconciler::state::Applied {
            revision: "a1b2c3d4e5f60718".into(),
            plan_id: plan.plan_id.clone(),
            at_unix_ms: NOW - 15 * 60_000,
        }),
        Some(reconciler::status::LastApply {
            plan_id: plan.plan_id.clone(),
            execution_id: record.execution_id.clone(),
            finished: true,
            ended: None,
            succeeded: plan.steps.len(),
            failed: 0,
            skipped: 0,
            in_flight: 0,
            abandoned: 0,
            replayed: 0,
            resent: 0,
            steps: plan.steps.len(),
        }),
        audit,
    );
    let mut events = vec![
        event(1, "controller", "started"),
        event(2, "sync-started", "started"),
        event(3, "sync", "succeeded"),
        event(4, "step", "succeeded"),
        event(5, "drift", "found"),
        event(6, "sync-started", "started"),
        event(7, "sync", "refused"),
    ];
    events[1].commit = Some(APPLIED.into());
    events[2].commit = Some(APPLIED.into());
    events[2].plan_id = Some(plan.plan_id.clone());
    events[2].detail = Some(serde_json::json!({
        "author": "Ops <ops@example.com>",
        "summary": "the cluster",
        "signer": "ops@example.com (platform key SHA256:abc)",
        "steps": plan.steps.len(),
        "succeeded": plan.steps.len(), "failed": 0, "skipped": 0,
        "phases": {"verify_ms": 3, "compile_ms": 12, "plan_ms": 40, "apply_ms": 2100},
        "policy": {"checked": 2, "violations": []},
    }));
    events[3].commit = Some(APPLIED.into());
    events[3].object = Some(format!("start_vm web-0@{}", status_node(&status, "web-0")));
    events[4].object = Some("vm web-1".into());
    events[4].reason = Some("web-1 crashed on its node; self-heal starts it again".into());
    events[5].commit = Some(REFUSED.into());
    events[6].commit = Some(REFUSED.into());
    events[6].reason = Some(
        "the policy gate denied the plan: deny-spot-db: vm db may not be spot\nsecond line".into(),
    );
    events[6].detail = Some(serde_json::json!({
        "author": "Dev <dev@example.com>",
        "summary": "db: cheaper",
        "signer": "dev@example.com (member of tenant dev, operator)",
        "policy_denied": ["deny-spot-db: vm db may not be spot (policies/sla.rego:12)"],
    }));
    events.reverse();
    let snapshot = Snapshot {
        now_unix_ms: NOW,
        controller: controller::View {
            revision: Some(APPLIED.into()),
            last_sync: Some(LastSync {
                commit: REFUSED.into(),
                result: "refused".into(),
                at: events[0].at.clone(),
                plan_id: None,
                reason: events[0].reason.clone(),
            }),
            paused: false,
            repo: "/srv/git/cluster.git".into(),
            branch: "main".into(),
            head: Some(REFUSED.into()),
            observed_digest: None,
        },
        applied: Some(Applied {
            commit: APPLIED.into(),
            model: Arc::new(model),
        }),
        status: Some(Arc::new(status)),
        status_error: None,
        // Observed 3 s before the page: pages show its age.
        status_observed_unix_ms: Some(NOW - 3_000),
        status_revalidating: false,
        held: None,
        events,
    };
    let text = reconciler::render::plan_text(&plan, false);
    let plan = PlanView {
        plan,
        text,
        executions: vec![(record, journal)],
    };
    Fixture {
        snapshot,
        desired,
        plan,
    }
}

fn status_node(status: &reconciler::status::Status, vm: &str) -> String {
    status
        .vms
        .iter()
        .find(|v| v.name == vm)
        .map(|v| v.node.clone())
        .unwrap_or_default()
}

/// Every page of the fixture: file name → HTML.
fn pages_of(f: &Fixture) -> Vec<(&'static str, String)> {
    let s = &f.snapshot;
    let vm_extra = VmExtra {
        candidates: compiler::place::explain_vm(
            s.model().expect("model"),
            &Default::default(),
            None,
            "web-0",
        ),
        events: s
            .events
            .iter()
            .filter(|e| controller::console::about_vm(e, "web-0"))
            .cloned()
            .collect(),
    };
    let syncs: Vec<Event> = s
        .events
        .iter()
        .filter(|e| e.kind == "sync")
        .cloned()
        .collect();
    let audit = AuditView {
        verified: Ok("1 entries (0 before the chain), head 1 0123456789ab".into()),
        entries: s
            .status
            .as_ref()
            .map(|st| st.audit.iter().cloned().enumerate().collect())
            .unwrap_or_default(),
    };
    let (svg, vertices, waves) = controller::console::graph_svg(s.model().expect("model"));
    let sync_of = |seq: u64| s.events.iter().find(|e| e.seq == seq).expect("sync event");
    vec![
        ("login.html", pages::login(None, "/vms").into_string()),
        ("overview.html", pages::overview(s).into_string()),
        ("topology.html", pages::topology(s, None).into_string()),
        (
            "vms.html",
            pages::vms(s, &VmFilter::default()).into_string(),
        ),
        (
            "vms-tenant-dev-crashed.html",
            pages::vms(
                s,
                &VmFilter {
                    tenant: "dev".into(),
                    state: "crashed".into(),
                    ..VmFilter::default()
                },
            )
            .into_string(),
        ),
        (
            "vm-web-0.html",
            pages::vm(s, "web-0", &vm_extra)
                .expect("web-0")
                .into_string(),
        ),
        (
            "syncs.html",
            pages::syncs(s, &syncs, 1, false).into_string(),
        ),
        (
            "sync-3-succeeded.html",
            pages::sync(s, sync_of(3), Some(&f.plan)).into_string(),
        ),
        (
            "sync-7-refused-by-policy.html",
            pages::sync(s, sync_of(7), None).into_string(),
        ),
        (
            "events.html",
            pages::events(s, &EventFilter::default(), &s.events, &audit).into_string(),
        ),
        (
            "graph.html",
            pages::graph(Some(&svg), vertices, waves).into_string(),
        ),
        ("tenants.html", pages::tenants(s).into_string()),
    ]
}

fn golden_dir() -> PathBuf {
    repo_root().join("golden-tests/console-quickstart/console")
}

/// One line per element: a readable diff (the pages are served as rendered).
fn readable(html: &str) -> String {
    html.replace("><", ">\n<") + "\n"
}

#[test]
fn golden_console_pages_of_the_quickstart() {
    let f = quickstart();
    let bless = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v != "0");
    let mut failures = vec![];
    for (name, html) in pages_of(&f) {
        let path = golden_dir().join(name);
        let actual = readable(&html);
        if bless {
            std::fs::create_dir_all(golden_dir()).expect("golden dir");
            if std::fs::read_to_string(&path).ok().as_deref() != Some(&actual) {
                std::fs::write(&path, &actual).expect("write golden");
                eprintln!("blessed {}", path.display());
            }
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(format!(
                "{name} differs:\n{}",
                similar::TextDiff::from_lines(&expected, &actual)
                    .unified_diff()
                    .context_radius(2)
                    .header("expected", "actual")
            )),
            Err(_) => failures.push(format!(
                "{name}: no expectation; run UPDATE_GOLDEN=1 cargo test -p cli --test it golden"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn golden_console_pages_show_what_the_quickstart_has() {
    let f = quickstart();
    let pages: std::collections::BTreeMap<&str, String> = pages_of(&f).into_iter().collect();
    let overview = &pages["overview.html"];
    // The refused sync and the crashed VM are problems linking to their causes.
    assert!(
        overview.contains(r#"<a href="/syncs/7">the last sync of 9a8b7c6d5e4f refused"#),
        "{overview}"
    );
    assert!(
        overview.contains(r#"<a href="/vms/web-1">vm web-1 is crashed"#),
        "{overview}"
    );
    let sync = &pages["sync-7-refused-by-policy.html"];
    assert!(
        sync.contains("deny-spot-db: vm db may not be spot"),
        "{sync}"
    );
    // Every VM of the quickstart is on the topology, coloured by its state.
    let topology = &pages["topology.html"];
    for vm in f.desired.vms.keys() {
        assert!(
            topology.contains(&format!(r#"data-vm="{vm}""#)),
            "{vm}: {topology}"
        );
    }
    assert!(
        topology.contains(r#"class="vmchip s-bad" href="/vms/web-1""#),
        "{topology}"
    );
    // The filtered table holds web-1 only.
    let filtered = &pages["vms-tenant-dev-crashed.html"];
    assert!(
        filtered.contains("1 of 6 VMs") && filtered.contains(r#"href="/vms/web-1""#),
        "{filtered}"
    );
    // The succeeded sync shows its plan as `cairn plan` and each step succeeded.
    let done = &pages["sync-3-succeeded.html"];
    assert!(
        done.contains(&f.plan.plan.plan_id) && done.contains("Apply "),
        "{done}"
    );
    assert_eq!(
        done.matches(r#"<span class="state s-ok">succeeded</span></td><td>1</td>"#)
            .count(),
        f.plan.plan.steps.len()
    );
}

#[test]
fn a_script_tag_in_a_tag_value_or_a_name_is_shown_as_text() {
    let mut f = quickstart();
    let mut model = f.snapshot.model().expect("model").clone();
    let web0 = model
        .vms
        .iter_mut()
        .find(|v| v.name == "web-0")
        .expect("web-0");
    std::sync::Arc::make_mut(web0)
        .tags
        .insert("owner".into(), "<script>alert(1)</script>".into());
    f.snapshot.applied = Some(Applied {
        commit: APPLIED.into(),
        model: Arc::new(model),
    });
    // A VM no spec names, reported by a node under a hostile name.
    let status = Arc::make_mut(f.snapshot.status.as_mut().expect("status"));
    let mut stray = status.vms[0].clone();
    stray.name = "<img src=x onerror=alert(2)>".into();
    status.vms.push(stray);
    let vm = pages::vm(&f.snapshot, "web-0", &VmExtra::default())
        .expect("web-0")
        .into_string();
    assert!(
        vm.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !vm.contains("<script>alert"),
        "{vm}"
    );
    let list = pages::vms(&f.snapshot, &VmFilter::default()).into_string();
    assert!(
        list.contains("&lt;img src=x onerror=alert(2)&gt;") && !list.contains("<img"),
        "{list}"
    );
    // Its link is percent-encoded, not a way out of the attribute.
    assert!(
        list.contains(r#"href="/vms/%3Cimg%20src%3Dx%20onerror%3Dalert%282%29%3E""#),
        "{list}"
    );
}

/// Specs of `nodes` nodes (racks of 50) and `vms` VMs.
fn large_specs(dir: &Path, nodes: usize, vms: usize) {
    let mut racks = String::new();
    for r in 0..nodes.div_ceil(50) {
        racks.push_str(&format!("    rack \"r{r}\" {{\n"));
        for n in (r * 50)..((r + 1) * 50).min(nodes) {
            racks.push_str(&format!(
                "        node \"n{n}\" class=\"big\" address=\"127.0.0.1:{}\"\n",
                10_000 + n
            ));
        }
        racks.push_str("    }\n");
    }
    let cluster = format!(
        r#"node-class "big" {{
    cpu 64
    memory "64GiB"
    host-reserve cpu=1 memory="512MiB"
    disk "disk0" size="2GiB" class="ssd"
    nic "eth0" speed="1Gbps"
}}

site "dc" {{
    overcommit cpu=4.0 memory=1.0
{racks}}}

tenant "t" {{
    quota vcpus={vms} memory="1TiB" storage="10GiB" vms={vms}
    member "ops@example.com" role="admin"
}}

image "tiny" builtin="cairn-guest"

vm-group "app" tenant="t" site="dc" replicas={vms} {{
    cpu 1
    memory "64MiB"
    image "tiny"
}}
"#
    );
    std::fs::write(dir.join("cluster.kdl"), cluster).expect("write specs");
}

#[test]
fn a_1000_node_10000_vm_cluster_is_filtered_and_paginated_on_the_server() {
    let dir = crate::TempDir::new("console-large");
    large_specs(&dir.0, 1000, 10_000);
    let sources = compiler::Sources::load_dir(&dir.0).expect("load");
    let compilation = compiler::compile(&sources);
    assert!(
        !compilation.has_errors(),
        "{:?}",
        compilation.diagnostics.first()
    );
    let model = compilation.model;
    let placement = reconciler::desired::place(&model, None);
    let desired = reconciler::desired::desired(&model, &dir.0, placement);
    let observed = controller::bench::noop::observation_of(&desired);
    let status = reconciler::status::status(&desired, &observed, None, None, vec![]);
    assert_eq!(status.vms.len(), 10_000);
    let s = Snapshot {
        now_unix_ms: NOW,
        applied: Some(Applied {
            commit: APPLIED.into(),
            model: Arc::new(model),
        }),
        status: Some(Arc::new(status)),
        ..Snapshot::default()
    };
    let timed = |name: &str, render: &dyn Fn() -> String| {
        let started = std::time::Instant::now();
        let html = render();
        eprintln!(
            "render {name}: {:.1} ms, {} KiB",
            started.elapsed().as_secs_f64() * 1e3,
            html.len() / 1024
        );
        html
    };
    timed("overview", &|| pages::overview(&s).into_string());
    let vms = timed("vms", &|| {
        pages::vms(&s, &VmFilter::default()).into_string()
    });
    assert!(
        vms.contains("10000 of 10000 VMs; page 1 of 200"),
        "{}",
        &vms[..2000]
    );
    assert_eq!(
        vms.matches("<tr><td><a href=\"/vms/").count(),
        pages::PAGE_SIZE
    );
    let filtered = timed("vms?q=app-999&page=2", &|| {
        pages::vms(
            &s,
            &VmFilter {
                q: "app-999".into(),
                page: Some(2),
                ..VmFilter::default()
            },
        )
        .into_string()
    });
    assert!(
        filtered.contains("11 of 10000 VMs; page 1 of 1"),
        "a page past the last is the last"
    );
    timed("vm app-42", &|| {
        pages::vm(&s, "app-42", &VmExtra::default())
            .expect("app-42")
            .into_string()
    });
    let racks = timed("topology", &|| pages::topology(&s, None).into_string());
    assert!(
        racks.contains(r#"<a href="/topology?rack=r7">Rack r7</a>: 50 nodes, 500 VMs"#)
            && !racks.contains("article"),
        "a large cluster's topology lists its racks"
    );
    let rack = timed("topology?rack=r7", &|| {
        pages::topology(&s, Some("r7")).into_string()
    });
    assert_eq!(rack.matches("<article").count(), 50);
    timed("tenants", &|| pages::tenants(&s).into_string());
    timed("graph", &|| {
        let (svg, n, w) = controller::console::graph_svg(s.model().expect("model"));
        pages::graph(Some(&svg), n, w).into_string()
    });
}
