//! Specs the node cannot honour are refused before anything changes.

use network::{BondBackend, BondMode, NetworkError, apply_bond, observe_bond};

use crate::common::{MBIT, Topology, require_netns, spec};

#[test]
fn fallback_refuses_modes_it_cannot_do() {
    require_netns!();
    let topo = Topology::new();
    let cap = network::detect_bonding(&topo.node_ns()).expect("detect");
    if cap.backend == BondBackend::KernelBond {
        eprintln!("skipping: this kernel has bonding, every mode is available");
        return;
    }
    for mode in [BondMode::Lacp, BondMode::BalanceRr, BondMode::BalanceXor] {
        let mut s = spec();
        s.mode = mode;
        let err = apply_bond(&topo.node_ns(), &s).expect_err("mode must be refused");
        assert!(matches!(err, NetworkError::ModeUnsupported { .. }), "{err}");
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains("node-a") && msg.contains("`data`") && msg.contains(mode.as_str()),
            "{msg}"
        );
        assert!(msg.contains("no bonding driver"), "{msg}");
    }
    assert!(
        !observe_bond(&topo.node_ns(), &spec())
            .expect("observe")
            .exists,
        "nothing created"
    );
}

#[test]
fn missing_member_nic_is_refused_with_node_bond_and_nic_named() {
    require_netns!();
    let topo = Topology::new();
    let mut s = spec();
    s.members.push("ens9f1".to_owned());
    let err = apply_bond(&topo.node_ns(), &s).expect_err("missing NIC");
    let msg = err.to_string();
    assert!(matches!(err, NetworkError::MemberMissing { .. }), "{msg}");
    assert!(
        msg.contains("node-a") && msg.contains("data") && msg.contains("ens9f1"),
        "{msg}"
    );
    assert!(
        !observe_bond(&topo.node_ns(), &spec())
            .expect("observe")
            .exists,
        "nothing created"
    );
}

#[test]
fn minimums_above_capacity_are_refused() {
    require_netns!();
    let topo = Topology::new();
    let mut s = spec();
    s.classes[0].min_bps = 90 * MBIT;
    let err = apply_bond(&topo.node_ns(), &s).expect_err("over capacity");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, NetworkError::Spec(_)), "{msg}");
    assert!(
        msg.contains("node-a") && msg.contains("data") && msg.contains("above the bond's capacity"),
        "{msg}"
    );
}

#[test]
fn capacity_defaults_to_member_link_speed() {
    require_netns!();
    let topo = Topology::new();
    let mut s = spec();
    s.capacity_bps = None;
    let report = apply_bond(&topo.node_ns(), &s).expect("apply");
    // veth reports 10000 Mbit/s; active-backup capacity is one member's.
    assert_eq!(report.capacity_bps, 10_000 * MBIT);
}

#[test]
fn deleted_member_nic_is_drift_and_apply_refuses_naming_it() {
    require_netns!();
    let topo = Topology::new();
    let s = spec();
    topo.apply_with_address(&s);
    let st = std::process::Command::new("ip")
        .args(["-n", &topo.node.netns, "link", "del", "nic1"])
        .status()
        .expect("ip");
    assert!(st.success());
    let obs = observe_bond(&topo.node_ns(), &s).expect("observe");
    assert!(
        obs.drift.contains(&network::Drift::MemberGone {
            member: "nic1".into()
        }),
        "{:?}",
        obs.drift
    );
    let err = apply_bond(&topo.node_ns(), &s).expect_err("a member NIC is gone");
    let msg = err.to_string();
    assert!(matches!(err, NetworkError::MemberMissing { .. }), "{msg}");
    assert!(
        msg.contains("node-a") && msg.contains("data") && msg.contains("nic1"),
        "{msg}"
    );
    // The bond keeps running on the remaining member meanwhile.
    assert_eq!(
        observe_bond(&topo.node_ns(), &s)
            .unwrap()
            .active_member
            .as_deref(),
        Some("nic0")
    );
}
