//! Placement behaviour on generated and hand-written clouds: stability,
//! determinism, hard constraints, FT domains, spread, spot preemption, HA
//! admission and rebalancing bounds.

use std::collections::{BTreeMap, BTreeSet};

use compiler::generate::{GenConfig, generate};
use compiler::model::{Availability, Model};
use compiler::place::{PlaceOptions, Placement, place, rebalance};
use compiler::{Sources, compile};

pub(crate) fn model_of(files: Vec<(String, String)>) -> Model {
    let sources = Sources::from_files(files);
    let c = compile(&sources);
    let errors: Vec<String> = c
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| compiler::diag::render(&sources, d))
        .collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    c.model
}

fn generated(nodes: usize, vms: usize) -> Vec<(String, String)> {
    generate(&GenConfig {
        nodes,
        vms,
        seed: 11,
    })
}

fn nodes_of(p: &Placement) -> BTreeMap<String, (String, Option<String>)> {
    p.vms
        .iter()
        .map(|v| (v.name.clone(), (v.node.clone(), v.secondary.clone())))
        .collect()
}

#[test]
fn a_change_to_one_vm_moves_no_other_vm() {
    let files = generated(120, 1500);
    let model = model_of(files.clone());
    let first = place(&model, &PlaceOptions::default(), None);
    assert!(
        first.unplaced.is_empty(),
        "the generated cloud fits: {:?}",
        first.unplaced.first()
    );
    // Grow one VM (the first standalone VM of the first workload file).
    let mut changed = files.clone();
    let (_, text) = changed
        .iter_mut()
        .find(|(p, _)| p.starts_with("workloads/"))
        .expect("workloads");
    let at = text.find("vm \"").expect("a standalone VM");
    let name = text[at + 4..].split('"').next().expect("name").to_owned();
    let cpu_at = at + text[at..].find("    cpu ").expect("cpu line");
    let line_end = cpu_at + text[cpu_at..].find('\n').expect("eol");
    text.replace_range(cpu_at..line_end, "    cpu 16");
    let model2 = model_of(changed);
    let second = place(
        &model2,
        &PlaceOptions {
            previous: Some(first.clone()),
            ..Default::default()
        },
        None,
    );
    let (a, b) = (nodes_of(&first), nodes_of(&second));
    let moved: Vec<&String> = a
        .keys()
        .filter(|k| *k != &name && a.get(*k) != b.get(*k))
        .collect();
    assert!(
        moved.is_empty(),
        "changing {name} moved {} other VMs: {:?}",
        moved.len(),
        &moved[..moved.len().min(5)]
    );
    let vols = |p: &Placement| {
        p.volumes
            .iter()
            .filter(|v| v.vm != name)
            .map(|v| (v.name.clone(), v.columns.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        vols(&first),
        vols(&second),
        "no other volume's stripes moved"
    );
    // And with no change at all, nothing moves.
    let third = place(
        &model2,
        &PlaceOptions {
            previous: Some(second.clone()),
            ..Default::default()
        },
        None,
    );
    assert_eq!(third, second);
}

#[test]
fn placement_is_deterministic_whatever_the_file_order_and_names() {
    let files = generated(60, 600);
    let a = place(&model_of(files.clone()), &PlaceOptions::default(), None);
    let mut renamed: Vec<(String, String)> = files
        .into_iter()
        .rev()
        .enumerate()
        .map(|(i, (_, t))| (format!("z/{i}-x.kdl"), t))
        .collect();
    renamed.swap(0, 1);
    let b = place(&model_of(renamed), &PlaceOptions::default(), None);
    assert_eq!(
        compiler::place::placement_json(&a),
        compiler::place::placement_json(&b)
    );
}

#[test]
fn hard_constraints_hold_on_a_generated_cloud() {
    let model = model_of(generated(200, 2500));
    let p = place(&model, &PlaceOptions::default(), None);
    let node = |n: &str| {
        model
            .sites
            .iter()
            .flat_map(|s| s.nodes.iter())
            .find(|x| x.name == n)
            .expect("node")
            .clone()
    };
    for v in &p.vms {
        let vm = model.vm(&v.name).expect("vm");
        assert_eq!(
            node(&v.node).site,
            vm.site,
            "{} placed outside its site",
            v.name
        );
        if vm.availability == Availability::Ft {
            let sec = v.secondary.as_ref().expect("FT VMs have a secondary");
            let site = model.site(&vm.site).expect("site");
            if site.racks.len() >= 2 {
                assert_ne!(
                    node(sec).rack,
                    node(&v.node).rack,
                    "{}: FT pair in one rack",
                    v.name
                );
            } else {
                assert_ne!(sec, &v.node);
            }
        } else {
            assert!(v.secondary.is_none());
        }
    }
    // Capacity: no node holds more than its overcommitted capacity.
    for n in &p.nodes {
        assert!(
            n.cpu_reserved <= n.cpu_allocatable,
            "{}: reserved vCPUs over capacity",
            n.name
        );
        assert!(
            n.memory_reserved_bytes + n.memory_shared_bytes
                <= (n.memory_allocatable_bytes as f64 * 1.5) as u64 + 1,
            "{}: memory over capacity",
            n.name
        );
    }
    // Spread: per group, replicas per rack differ by at most one.
    for g in &model.vm_groups {
        let Some(scope) = g.spread else { continue };
        let site = model.site(&g.site).expect("site");
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in &site.racks {
            counts.insert(r.name.clone(), 0);
        }
        for v in p.vms.iter().filter(|v| g.vms.contains(&v.name)) {
            assert_eq!(scope, compiler::model::Domain::Rack);
            *counts.entry(node(&v.node).rack).or_default() += 1;
        }
        let (min, max) = (
            counts.values().min().copied().unwrap_or(0),
            counts.values().max().copied().unwrap_or(0),
        );
        assert!(
            max - min <= 1,
            "group {} is spread {min}..{max} over racks",
            g.name
        );
    }
    // Stripes: copies of a column are in distinct failure domains.
    for vol in &p.volumes {
        for col in &vol.columns {
            let racks: BTreeSet<String> = col
                .iter()
                .map(|c| node(c.split('/').next().expect("node/disk")).rack)
                .collect();
            assert_eq!(racks.len(), col.len(), "{}: copies share a rack", vol.name);
        }
    }
}

const SMALL: &str = r#"
node-class "n" {
    cpu 4
    memory "16GiB"
    disk "d" size="100GB" class="ssd"
}
site "s" {
    ha-reserve nodes=1
    rack "a" {
        node "a1" class="n" address="127.0.0.1:1"
        node "a2" class="n" address="127.0.0.2:1"
    }
    rack "b" {
        node "b1" class="n" address="127.0.0.3:1"
        node "b2" class="n" address="127.0.0.4:1"
    }
}
tenant "t"
image "tiny" builtin="cairn-guest"
"#;

fn vm(name: &str, cpu: u32, sla: &str, availability: &str) -> String {
    format!(
        "vm \"{name}\" tenant=\"t\" site=\"s\" {{\n    cpu {cpu}\n    memory \"1GiB\"\n    sla \"{sla}\"\n    availability \"{availability}\"\n    image \"tiny\"\n}}\n"
    )
}

#[test]
fn spot_vms_are_preempted_lowest_priority_first_when_capacity_is_claimed() {
    let spots: String = (0..4)
        .map(|i| vm(&format!("spot{i}"), 4, "spot", "none"))
        .collect();
    let before = model_of(vec![
        ("a.kdl".into(), SMALL.replace("ha-reserve nodes=1", "")),
        ("b.kdl".into(), spots.clone()),
    ]);
    let p1 = place(&before, &PlaceOptions::default(), None);
    assert_eq!(p1.vms.len(), 4, "four spot VMs fill four nodes");
    let reserved: String = (0..2)
        .map(|i| vm(&format!("gold{i}"), 4, "reserved", "none"))
        .collect();
    let after = model_of(vec![
        ("a.kdl".into(), SMALL.replace("ha-reserve nodes=1", "")),
        ("b.kdl".into(), spots + &reserved),
    ]);
    let p2 = place(
        &after,
        &PlaceOptions {
            previous: Some(p1),
            ..Default::default()
        },
        None,
    );
    assert!(p2.vms.iter().any(|v| v.name == "gold0") && p2.vms.iter().any(|v| v.name == "gold1"));
    let preempted: Vec<&str> = p2.unplaced.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(preempted.len(), 2, "two spot VMs make room: {preempted:?}");
    for u in &p2.unplaced {
        assert_eq!(
            u.reasons[0].constraint, "preempted",
            "{}: {:?}",
            u.name, u.reasons
        );
        assert!(u.previous_node.is_some());
    }
}

#[test]
fn every_ha_vm_survives_the_loss_of_any_one_node() {
    let vms: String = (0..8)
        .map(|i| vm(&format!("ha{i}"), 1, "on-demand", "ha"))
        .collect::<String>()
        + &vm("big", 3, "reserved", "ha");
    let model = model_of(vec![
        ("a.kdl".into(), SMALL.to_owned()),
        ("b.kdl".into(), vms),
    ]);
    let p = place(&model, &PlaceOptions::default(), None);
    for node in ["a1", "a2", "b1", "b2"] {
        let failed = PlaceOptions {
            previous: Some(p.clone()),
            failed: compiler::place::FailureSet::of_nodes([node.to_owned()]),
        };
        let after = place(&model, &failed, None);
        for v in p.vms.iter().filter(|v| {
            model
                .vm(&v.name)
                .is_some_and(|m| m.availability == Availability::Ha)
        }) {
            assert!(
                after.vms.iter().any(|a| a.name == v.name),
                "losing {node} strands HA VM {}: {:?}",
                v.name,
                after.unplaced
            );
        }
    }
    // Admission refused what would not survive, and said why.
    for u in &p.unplaced {
        assert_eq!(u.reasons[0].constraint, "ha-reserve", "{:?}", u.reasons);
    }
}

#[test]
fn rebalance_stays_within_max_moves_and_max_unavailable() {
    let spec = SMALL.replace("ha-reserve nodes=1", "overcommit cpu=4.0\n    scheduler strategy=\"spread\" {\n        rebalance threshold=0.1 max-moves=3\n    }");
    let group = "vm-group \"g\" tenant=\"t\" site=\"s\" replicas=4 {\n    max-unavailable 1\n    cpu 1\n    memory \"1GiB\"\n    image \"tiny\"\n}\n";
    let singles: String = (0..4)
        .map(|i| vm(&format!("v{i}"), 1, "on-demand", "none"))
        .collect();
    let model = model_of(vec![
        ("a.kdl".into(), spec),
        ("b.kdl".into(), group.to_owned() + &singles),
    ]);
    // Start from everything crammed on a1 (as after a bad day).
    let mut crammed = place(&model, &PlaceOptions::default(), None);
    for v in &mut crammed.vms {
        v.node = "a1".to_owned();
    }
    let kept = place(
        &model,
        &PlaceOptions {
            previous: Some(crammed.clone()),
            ..Default::default()
        },
        None,
    );
    assert!(
        kept.vms.iter().all(|v| v.node == "a1"),
        "stability keeps VMs where they are while they fit"
    );
    let r = rebalance(&model, &kept, &PlaceOptions::default(), None);
    assert!(
        !r.moves.is_empty() && r.moves.len() <= 3,
        "moves: {:?}",
        r.moves
    );
    let group_moves = r.moves.iter().filter(|m| m.vm.starts_with("g-")).count();
    assert!(
        group_moves <= 1,
        "max-unavailable 1, moved {group_moves} of group g"
    );
    for m in &r.moves {
        assert_eq!(m.from, "a1");
        assert!(r.vms.iter().any(|v| v.name == m.vm && v.node == m.to));
    }
}
