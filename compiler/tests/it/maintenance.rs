//! Nodes in maintenance (`node … maintenance=#true`, issue 16): a node in
//! maintenance keeps the VMs it has and takes no new one (a new VM, an HA restart
//! off a failed node), and `ha-reserve` admission counts no room on it.

use compiler::model::{Availability, Model};
use compiler::place::{FailureSet, PlaceOptions, Placement, place};
use compiler::{Sources, compile};

/// Four 4-vCPU nodes in two racks, a1 a2 | b1 b2, with `ha-reserve nodes=1`.
fn base() -> String {
    let node = |name: &str, ip: u8| {
        format!("        node \"{name}\" class=\"n\" address=\"127.0.0.{ip}:1\"\n")
    };
    format!(
        "node-class \"n\" {{\n    cpu 4\n    memory \"16GiB\"\n}}\nsite \"s\" {{\n    ha-reserve nodes=1\n    rack \"a\" {{\n{}{}    }}\n    rack \"b\" {{\n{}{}    }}\n}}\ntenant \"t\"\nimage \"tiny\" builtin=\"cairn-guest\"\n",
        node("a1", 1),
        node("a2", 2),
        node("b1", 3),
        node("b2", 4)
    )
}

fn vms(prefix: &str, n: usize, sla: &str, availability: &str) -> String {
    (0..n)
        .map(|i| {
            format!(
                "vm \"{prefix}{i}\" tenant=\"t\" site=\"s\" {{\n    cpu 1\n    memory \"1GiB\"\n    sla \"{sla}\"\n    availability \"{availability}\"\n    image \"tiny\"\n}}\n"
            )
        })
        .collect()
}

/// The site with `node` in maintenance (none: as written).
fn site(maintenance: Option<&str>, ha_reserve: bool) -> String {
    let mut s = base();
    if let Some(node) = maintenance {
        let line = format!("node \"{node}\" class=\"n\"");
        s = s.replace(&line, &format!("{line} maintenance=#true"));
    }
    if !ha_reserve {
        s = s.replace("ha-reserve nodes=1", "");
    }
    s
}

pub(crate) fn compiled(files: Vec<(String, String)>) -> (Model, Vec<String>) {
    let sources = Sources::from_files(files);
    let c = compile(&sources);
    let errors = c
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| compiler::diag::render(&sources, d))
        .collect();
    (c.model, errors)
}

fn model_of(files: Vec<(String, String)>) -> Model {
    let (model, errors) = compiled(files);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    model
}

fn on<'p>(p: &'p Placement, node: &str) -> Vec<&'p str> {
    p.vms
        .iter()
        .filter(|v| v.node == node)
        .map(|v| v.name.as_str())
        .collect()
}

fn after(previous: &Placement) -> PlaceOptions {
    PlaceOptions {
        previous: Some(previous.clone()),
        ..Default::default()
    }
}

#[test]
fn the_spec_flag_is_read_into_the_model_and_only_a_boolean_is_taken() {
    let model = model_of(vec![("a.kdl".into(), site(Some("a2"), false))]);
    let flagged: Vec<&str> = model.sites[0]
        .nodes
        .iter()
        .filter(|n| n.maintenance)
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(flagged, ["a2"]);
    assert_eq!(
        model.nodes_in_maintenance().into_iter().collect::<Vec<_>>(),
        ["a2"]
    );
    let (_, errors) = compiled(vec![(
        "a.kdl".into(),
        site(None, false).replace(
            "node \"a2\" class=\"n\"",
            "node \"a2\" class=\"n\" maintenance=\"yes\"",
        ),
    )]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("maintenance")
            && errors[0].contains("#true")
            && errors[0].contains("a.kdl:"),
        "{}",
        errors[0]
    );
}

#[test]
fn a_node_in_maintenance_keeps_its_vms_and_takes_no_new_one() {
    let first = vms("web", 8, "on-demand", "none");
    let before = model_of(vec![
        ("a.kdl".into(), site(None, false)),
        ("b.kdl".into(), first.clone()),
    ]);
    let p1 = place(&before, &PlaceOptions::default(), None);
    assert_eq!(p1.vms.len(), 8);
    let kept = on(&p1, "a1");
    assert!(!kept.is_empty(), "spread puts VMs on a1: {p1:?}");
    // a1 enters maintenance and 8 more VMs come: they fill what the other three
    // nodes have free, and the rest find no node (a1's free room does not count).
    let more = vms("new", 8, "on-demand", "none");
    let model = model_of(vec![
        ("a.kdl".into(), site(Some("a1"), false)),
        ("b.kdl".into(), first + &more),
    ]);
    let p2 = place(&model, &after(&p1), None);
    assert_eq!(on(&p2, "a1"), kept, "a1's VMs stay, and nothing joins them");
    for v in &p1.vms {
        let now = p2.vms.iter().find(|w| w.name == v.name).expect("kept");
        assert_eq!(now.node, v.node, "{} moved", v.name);
    }
    let free_elsewhere: usize = ["a2", "b1", "b2"]
        .iter()
        .map(|n| 4 - on(&p1, n).len())
        .sum();
    let placed_new = p2.vms.iter().filter(|v| v.name.starts_with("new")).count();
    assert_eq!(placed_new, free_elsewhere, "new VMs fill the other nodes");
    assert!(!p2.unplaced.is_empty());
    for u in &p2.unplaced {
        let why: Vec<&str> = u.reasons.iter().map(|r| r.constraint.as_str()).collect();
        assert!(why.contains(&"maintenance"), "{}: {:?}", u.name, u.reasons);
        let text = u.reason_text();
        assert!(text.contains("in maintenance"), "{text}");
    }
    // Out of maintenance, a1 takes new VMs again.
    let open = model_of(vec![
        ("a.kdl".into(), site(None, false)),
        ("b.kdl".into(), vms("web", 8, "on-demand", "none") + &more),
    ]);
    let p3 = place(&open, &after(&p2), None);
    assert!(on(&p3, "a1").len() > kept.len(), "{:?}", on(&p3, "a1"));
}

#[test]
fn an_ha_restart_off_a_failed_node_never_lands_on_a_node_in_maintenance() {
    let ha = vms("ha", 4, "on-demand", "ha");
    let before = model_of(vec![
        ("a.kdl".into(), site(None, true)),
        ("b.kdl".into(), ha.clone()),
    ]);
    let p1 = place(&before, &PlaceOptions::default(), None);
    assert_eq!(p1.vms.len(), 4, "{:?}", p1.unplaced);
    let model = model_of(vec![
        ("a.kdl".into(), site(Some("a1"), true)),
        ("b.kdl".into(), ha),
    ]);
    for failed in ["a2", "b1", "b2"] {
        let stranded = on(&p1, failed);
        let p2 = place(
            &model,
            &PlaceOptions {
                previous: Some(p1.clone()),
                failed: FailureSet::of_nodes([failed.to_owned()]),
            },
            None,
        );
        for vm in &stranded {
            let now = p2.vms.iter().find(|v| v.name == *vm);
            let now = now.unwrap_or_else(|| panic!("{vm} stranded: {:?}", p2.unplaced));
            assert!(
                now.node != "a1" && now.node != failed,
                "{vm} restarted on {}",
                now.node
            );
        }
        assert_eq!(on(&p2, "a1"), on(&p1, "a1"), "a1 keeps what it had");
    }
}

#[test]
fn ha_reserve_admission_counts_no_room_on_a_node_in_maintenance() {
    // 12 one-vCPU HA VMs on four 4-vCPU nodes: 3 each, and losing any node
    // leaves 3 free vCPUs for its 3 VMs. With a1 in maintenance its free vCPU
    // takes no restart: losing another node leaves 2 for 3.
    let ha = vms("ha", 12, "on-demand", "ha");
    let before = model_of(vec![
        ("a.kdl".into(), site(None, true)),
        ("b.kdl".into(), ha.clone()),
    ]);
    let p1 = place(&before, &PlaceOptions::default(), None);
    assert_eq!(p1.vms.len(), 12, "{:?}", p1.unplaced);
    let model = model_of(vec![
        ("a.kdl".into(), site(Some("a1"), true)),
        ("b.kdl".into(), ha),
    ]);
    let p2 = place(&model, &after(&p1), None);
    assert!(!p2.unplaced.is_empty(), "admission must refuse some");
    for u in &p2.unplaced {
        assert_eq!(u.reasons[0].constraint, "ha-reserve", "{:?}", u.reasons);
    }
    // What it admitted survives the loss of any one node, a1 (the node in
    // maintenance, e.g. powered off) included, with no restart on a1. (The
    // restart itself is not held by admission, which kept the room before: the
    // reconciler places it without the reserve, as here.)
    let mut restart = model.clone();
    restart.sites[0].ha_reserve_nodes = 0;
    restart
        .vms
        .retain(|m| p2.vms.iter().any(|v| v.name == m.name));
    for failed in ["a1", "a2", "b1", "b2"] {
        let p3 = place(
            &restart,
            &PlaceOptions {
                previous: Some(p2.clone()),
                failed: FailureSet::of_nodes([failed.to_owned()]),
            },
            None,
        );
        for v in p2.vms.iter().filter(|v| {
            model
                .vm(&v.name)
                .is_some_and(|m| m.availability == Availability::Ha)
        }) {
            let now = p3.vms.iter().find(|a| a.name == v.name);
            let now = now.unwrap_or_else(|| {
                panic!(
                    "losing {failed} strands HA VM {}: {:?}",
                    v.name, p3.unplaced
                )
            });
            assert!(
                now.node == v.node || now.node != "a1",
                "{} restarted on a1 in maintenance",
                v.name
            );
        }
    }
}

#[test]
fn reserved_capacity_is_checked_without_the_nodes_in_maintenance() {
    // 12 reserved vCPUs: four 4-vCPU nodes less one for HA hold them; without a1
    // they do not (2 × 4 = 8).
    let reserved = vms("gold", 12, "reserved", "ha");
    let (_, errors) = compiled(vec![
        ("a.kdl".into(), site(None, true)),
        ("b.kdl".into(), reserved.clone()),
    ]);
    assert!(errors.is_empty(), "{errors:?}");
    let sources = Sources::from_files(vec![
        ("a.kdl".into(), site(Some("a1"), true)),
        ("b.kdl".into(), reserved),
    ]);
    let errors: Vec<String> = compile(&sources)
        .diagnostics
        .into_iter()
        .filter(|d| d.is_error())
        .map(|d| d.message)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("has 8 CPUs for reserved VMs after reserving 1 node for HA and without its 1 node in maintenance, but reserved VMs need 12"),
        "{}",
        errors[0]
    );
}
