//! Apply, observe, idempotence and drift repair of a bond with classes.

use network::{BondBackend, Drift, TrafficKind, apply_bond, observe_bond};

use crate::common::{MBIT, Topology, require_netns, spec};

#[test]
fn apply_creates_device_members_and_htb_classes_at_spec_rates() {
    require_netns!();
    let topo = Topology::new();
    let spec = spec();
    let report = topo.apply_with_address(&spec);
    assert!(report.changed(), "first apply must create the bond");
    eprintln!(
        "backend: {} ({})",
        report.backend.as_str(),
        report.backend_reason
    );
    let obs = observe_bond(&topo.node_ns(), &spec).expect("observe");
    assert!(obs.exists);
    assert!(obs.up);
    assert_eq!(obs.mtu, 1500);
    assert!(
        obs.drift.is_empty(),
        "fresh bond has drift: {:?}",
        obs.drift
    );
    assert_eq!(obs.members.len(), 2);
    assert!(obs.members.iter().all(|m| m.present && m.admin_up));
    match obs.backend {
        BondBackend::BridgeFallback => {
            assert_eq!(obs.kind.as_deref(), Some("bridge"));
            assert_eq!(obs.active_member.as_deref(), Some("nic0"));
            assert_eq!(obs.members.iter().filter(|m| m.attached).count(), 1);
        }
        BondBackend::KernelBond => {
            assert_eq!(obs.kind.as_deref(), Some("bond"));
            assert!(obs.members.iter().all(|m| m.attached));
        }
    }
    let root = obs.qos.root.as_ref().expect("root qdisc");
    assert_eq!(root.kind, "htb");
    assert_eq!(root.default_minor, Some(TrafficKind::Guest.class_minor()));
    for class in &spec.classes {
        let live = obs
            .qos
            .class(class.name)
            .unwrap_or_else(|| panic!("class {} missing", class.name));
        assert_eq!(live.rate_bps, class.min_bps, "{} rate", class.name);
        assert_eq!(
            live.ceil_bps,
            class.max_bps.unwrap_or(100 * MBIT),
            "{} ceil",
            class.name
        );
        assert_eq!(
            live.quantum,
            class.weight * network::qos::QUANTUM_PER_WEIGHT
        );
    }
    // storage, migration and management are DSCP-marked: two filters each.
    assert_eq!(obs.qos.filters.len(), 6);
}

#[test]
fn applying_twice_changes_nothing() {
    require_netns!();
    let topo = Topology::new();
    let spec = spec();
    topo.apply_with_address(&spec);
    let second = apply_bond(&topo.node_ns(), &spec).expect("second apply");
    assert!(
        second.drift_before.is_empty(),
        "drift after apply: {:?}",
        second.drift_before
    );
    assert_eq!(second.actions, Vec::<String>::new());
}

#[test]
fn drift_from_hand_edits_is_reported_and_repaired() {
    require_netns!();
    let topo = Topology::new();
    let spec = spec();
    topo.apply_with_address(&spec);
    let ns = topo.node.netns.clone();
    let sh = |args: &str| {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(args)
            .status()
            .expect("sh");
        assert!(st.success(), "`{args}` failed");
    };
    // A changed rate, a deleted class, a member taken out of the bond.
    sh(&format!(
        "tc -n {ns} class change dev data parent 1:1 classid 1:10 htb rate 7mbit ceil 100mbit quantum 262144"
    ));
    sh(&format!("tc -n {ns} class del dev data classid 1:30"));
    sh(&format!("ip -n {ns} link set nic0 nomaster"));
    let obs = observe_bond(&topo.node_ns(), &spec).expect("observe");
    eprintln!(
        "drift: {}",
        obs.drift
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    assert!(obs.drift.contains(&Drift::ClassRateChanged {
        class: TrafficKind::Storage,
        want_bps: 50 * MBIT,
        have_bps: 7 * MBIT
    }));
    assert!(obs.drift.contains(&Drift::ClassMissing {
        class: TrafficKind::Guest
    }));
    let member_drift = match obs.backend {
        BondBackend::BridgeFallback => Drift::NoActiveMember,
        BondBackend::KernelBond => Drift::MemberDetached {
            member: "nic0".to_owned(),
        },
    };
    assert!(obs.drift.contains(&member_drift));

    let repair = apply_bond(&topo.node_ns(), &spec).expect("repair");
    assert!(repair.changed());
    eprintln!("repair actions: {:#?}", repair.actions);
    let after = observe_bond(&topo.node_ns(), &spec).expect("observe after repair");
    assert!(
        after.drift.is_empty(),
        "drift left after repair: {:?}",
        after.drift
    );
    let again = apply_bond(&topo.node_ns(), &spec).expect("apply after repair");
    assert_eq!(again.actions, Vec::<String>::new());
}

#[test]
fn changed_spec_rates_converge_in_place() {
    require_netns!();
    let topo = Topology::new();
    let mut spec = spec();
    topo.apply_with_address(&spec);
    spec.classes[1].max_bps = Some(40 * MBIT);
    spec.classes.retain(|c| c.name != TrafficKind::Management);
    let report = apply_bond(&topo.node_ns(), &spec).expect("apply changed spec");
    assert!(report.drift_before.contains(&Drift::ClassCeilChanged {
        class: TrafficKind::Migration,
        want_bps: 40 * MBIT,
        have_bps: 50 * MBIT
    }));
    assert!(report.drift_before.contains(&Drift::UnexpectedClass {
        minor: TrafficKind::Management.class_minor()
    }));
    let obs = observe_bond(&topo.node_ns(), &spec).expect("observe");
    assert!(obs.drift.is_empty(), "{:?}", obs.drift);
    assert!(obs.qos.class(TrafficKind::Management).is_none());
    assert_eq!(obs.qos.filters.len(), 4);
}

#[test]
fn capability_detection_names_the_backend() {
    require_netns!();
    let topo = Topology::new();
    let cap = network::detect_bonding(&topo.node_ns()).expect("detect");
    eprintln!(
        "bonding capability: {} ({})",
        cap.backend.as_str(),
        cap.reason
    );
    assert!(!cap.reason.is_empty());
    // The probe leaves nothing behind.
    let obs = observe_bond(&topo.node_ns(), &spec()).expect("observe");
    assert!(!obs.exists);
}

#[test]
fn real_kernel_bond_end_to_end() {
    require_netns!();
    let topo = Topology::new();
    let cap = network::detect_bonding(&topo.node_ns()).expect("detect");
    if cap.backend != BondBackend::KernelBond {
        eprintln!(
            "skipping: this kernel has no bonding driver ({})",
            cap.reason
        );
        return;
    }
    let mut spec = spec();
    spec.mode = network::BondMode::BalanceRr;
    spec.capacity_bps = Some(200 * MBIT);
    let report = topo.apply_with_address(&spec);
    assert_eq!(report.backend, BondBackend::KernelBond);
    let obs = observe_bond(&topo.node_ns(), &spec).expect("observe");
    assert_eq!(obs.mode.as_deref(), Some("balance-rr"));
    assert_eq!(obs.miimon, Some(50));
    assert!(obs.members.iter().all(|m| m.attached));
    assert!(obs.drift.is_empty(), "{:?}", obs.drift);
    assert!(
        apply_bond(&topo.node_ns(), &spec)
            .expect("again")
            .actions
            .is_empty()
    );
}

#[test]
fn inventory_reports_backend_tc_and_netns() {
    require_netns!();
    let topo = Topology::new();
    let inv = network::inventory(&topo.node_ns());
    eprintln!("{}", serde_json::to_string(&inv).unwrap());
    assert!(inv.netns_available);
    assert!(inv.tc.is_some());
    let cap = inv.bonding.expect("bonding detected");
    assert_eq!(cap, network::detect_bonding(&topo.node_ns()).unwrap());
}
