//! Tenant network measurements (issue 19): `cargo bench -p network --bench overlay`.
//! Needs root (network namespaces), iperf3 and nft; says why and exits 0 otherwise.
//! Prints medians with their baseline in the same run:
//! - latency: ping round trips, same node (bridge) and across nodes (VXLAN), against
//!   a raw veth;
//! - throughput: iperf3 across the overlay against a raw veth of the same MTU;
//! - a changed security group: the time to program it on the nodes (the node's
//!   group table and each tenant router) and until the first connection it allows.

#[path = "../tests/it/overlay_support.rs"]
mod support;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use network::NetNs;
use network::overlay::apply_segment;
use network::secgroup::{
    AllowRule, FirewallSpec, GuardedNic, Zone, apply_firewall, apply_router_firewall, zone_id,
};
use support::*;

fn main() {
    if let Err(reason) = network::netns_capability() {
        println!("skipped: network namespaces are not available here ({reason})");
        return;
    }
    for tool in ["iperf3", "nft"] {
        if Command::new(tool).arg("-v").output().is_err() {
            println!("skipped: {tool} is not installed");
            return;
        }
    }
    latency_and_throughput();
    security_group_change();
}

fn latency_and_throughput() {
    let c = Cluster::new();
    let a1 = probe(&c, 1, "a1", "alpha", "app", ip(10, 20, 0, 11));
    let a2 = probe(&c, 2, "a2", "alpha", "app", ip(10, 20, 0, 12));
    let a3 = probe(&c, 1, "a3", "alpha", "app", ip(10, 20, 0, 13));
    let gw = ip(10, 20, 0, 1);
    apply_segment(
        &c.ns(1),
        &segment("alpha", "app", 5001, 1, gw, vec![remote(&a2, 2)]),
    )
    .expect("n1");
    apply_segment(
        &c.ns(2),
        &segment(
            "alpha",
            "app",
            5001,
            2,
            gw,
            vec![remote(&a1, 1), remote(&a3, 1)],
        ),
    )
    .expect("n2");
    assert!(ping_within(&a1, a2.ip, Duration::from_secs(3)));
    assert!(ping_within(&a1, a3.ip, Duration::from_secs(3)));
    // Raw baseline: two namespaces joined by one veth, same MTU as the segment.
    let (r1, r2) = (format!("{}raw1", c.prefix), format!("{}raw2", c.prefix));
    network::netns::create_netns(&r1).expect("raw1");
    network::netns::create_netns(&r2).expect("raw2");
    ok(&[
        "ip", "-n", &r1, "link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name",
        "eth0", "netns", &r2,
    ]);
    ok(&[
        "ip",
        "-n",
        &r1,
        "addr",
        "add",
        "10.99.0.1/24",
        "dev",
        "eth0",
    ]);
    ok(&[
        "ip",
        "-n",
        &r2,
        "addr",
        "add",
        "10.99.0.2/24",
        "dev",
        "eth0",
    ]);
    ok(&["ip", "-n", &r1, "link", "set", "eth0", "up"]);
    ok(&["ip", "-n", &r2, "link", "set", "eth0", "up"]);
    let raw_ip = ip(10, 99, 0, 2);
    let same = rtts(&a1.netns, a3.ip, 200);
    let cross = rtts(&a1.netns, a2.ip, 200);
    let raw = rtts(&r1, raw_ip, 200);
    let (ms, mc, mr) = (
        median(same.clone()),
        median(cross.clone()),
        median(raw.clone()),
    );
    println!(
        "latency (ping, 200 each, median): raw veth {mr:.3} ms, same node (bridge) {ms:.3} ms, \
         across nodes (VXLAN) {mc:.3} ms; cross/same {:.2}",
        mc / ms
    );
    let mut overlay = Vec::new();
    let mut baseline = Vec::new();
    for _ in 0..3 {
        baseline.push(iperf(&r2, &r1, raw_ip));
        overlay.push(iperf(&a2.netns, &a1.netns, a2.ip));
    }
    let (o, b) = (median(overlay.clone()), median(baseline.clone()));
    println!(
        "throughput (iperf3 -t 2, 3 runs, median): raw veth {b:.2} Gbit/s {baseline:.2?}, \
         overlay across nodes {o:.2} Gbit/s {overlay:.2?}; overlay/raw {:.2}",
        o / b
    );
    assert!(
        same.len() >= 190 && cross.len() >= 190 && raw.len() >= 190,
        "ping lost replies"
    );
    assert!(o > 0.0 && b > 0.0);
}

/// A group on db (node 2, network db) changes 10 times (port 5433 added, removed):
/// each change programmed on node 2's table and both nodes' tenant routers, then
/// a1 (node 1, network app) connects to the port until it gets through (added) or
/// not (removed).
fn security_group_change() {
    let c = Cluster::new();
    let (n1, n2) = (c.ns(1), c.ns(2));
    let a1 = probe(&c, 1, "a1", "alpha", "app", ip(10, 20, 0, 11));
    let db = probe(&c, 2, "db", "alpha", "db", ip(10, 30, 0, 5));
    let (app_gw, db_gw) = (ip(10, 20, 0, 1), ip(10, 30, 0, 1));
    for (ns, s) in [
        (&n1, segment("alpha", "app", 5001, 1, app_gw, vec![])),
        (
            &n2,
            segment("alpha", "app", 5001, 2, app_gw, vec![remote(&a1, 1)]),
        ),
        (
            &n1,
            segment("alpha", "db", 5002, 1, db_gw, vec![remote(&db, 2)]),
        ),
        (&n2, segment("alpha", "db", 5002, 2, db_gw, vec![])),
    ] {
        apply_segment(ns, &s).expect("segment");
    }
    let _l1 = listen(&db, 5432);
    let _l2 = listen(&db, 5433);
    let seg_ports = |network: &str| {
        vec![
            network::overlay::vxlan_name("alpha", network),
            network::overlay::gateway_leg_name("alpha", network),
        ]
    };
    let program = |rules: Vec<AllowRule>| {
        let mut db_ports = seg_ports("db");
        db_ports.push(db.tap.clone());
        let node2 = FirewallSpec {
            nics: vec![GuardedNic {
                tap: db.tap.clone(),
                ipv4: Some(db.ip),
                rules: rules.clone(),
                dhcp_server: None,
            }],
            zones: vec![
                Zone {
                    id: zone_id("alpha", "db"),
                    ports: db_ports,
                },
                Zone {
                    id: zone_id("alpha", "app"),
                    ports: seg_ports("app"),
                },
            ],
        };
        let routed: Vec<(Ipv4Addr, AllowRule)> = rules.iter().map(|r| (db.ip, r.clone())).collect();
        apply_firewall(&n2, &node2).expect("node table");
        for i in 1..=2 {
            let router = NetNs::named(network::overlay::router_netns_name(&c.ns(i), "alpha"));
            apply_router_firewall(&router, &routed).expect("router");
        }
    };
    program(vec![db_rule(5432)]);
    assert!(connects(&a1, db.ip, 5432), "the first rule lets app in");
    let (mut programmed, mut effective) = (vec![], vec![]);
    for round in 0..10 {
        let added = round % 2 == 0;
        let rules = if added {
            vec![db_rule(5432), db_rule(5433)]
        } else {
            vec![db_rule(5432)]
        };
        let start = Instant::now();
        program(rules);
        programmed.push(start.elapsed().as_secs_f64() * 1000.0);
        if added {
            loop {
                if connects(&a1, db.ip, 5433) {
                    effective.push(start.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "5433 never opened"
                );
            }
        } else {
            assert!(!connects(&a1, db.ip, 5433), "5433 closed again");
        }
    }
    let baseline: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            assert!(connects(&a1, db.ip, 5432));
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    let (p, e, b) = (
        median(programmed.clone()),
        median(effective.clone()),
        median(baseline),
    );
    println!(
        "changed security group (2 nodes: node table + 2 routers), 10 changes: programmed median {p:.1} ms {programmed:.1?}; \
         first allowed connection median {e:.1} ms after the change began {effective:.1?}; \
         a connection on an unchanged rule takes {b:.1} ms (ratio {:.1})",
        e / b
    );
}
