//! Tenant network measurements (issue 19): `cargo bench -p network --bench overlay`
//! (`-- dhcp`, `-- latency`, `-- security`: only those sections).
//! Needs root (network namespaces), iperf3 and nft; says why and exits 0 otherwise.
//! Prints medians with their baseline in the same run:
//! - latency: ping round trips, same node (bridge) and across nodes (VXLAN), against
//!   a raw veth;
//! - throughput: iperf3 across the overlay against a raw veth of the same MTU;
//! - a changed security group: the time to program it on the nodes (the node's
//!   group table and each tenant router) and until the first connection it allows;
//! - DHCP (needs dnsmasq and busybox): the time to a lease (busybox udhcpc, from its
//!   start to the address) from cairn's dnsmasq on a segment, and from a NIC added
//!   to the plan (the server reloaded) to its lease, against the same dnsmasq
//!   options on a raw veth;
//! - a moved VM: its forwarding entry re-pointed on the client's node, until the
//!   first ping answered at the new node, against a ping round trip.

#[path = "../tests/it/overlay_support.rs"]
mod support;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use network::NetNs;
use network::dhcp::{DhcpHost, DhcpSpec, converge_dhcp};
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
    // `cargo bench -p network --bench overlay -- dhcp` runs only the sections named.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    if wanted("latency_and_throughput") {
        latency_and_throughput();
    }
    if wanted("security_group_change") {
        security_group_change();
    }
    if wanted("dhcp_lease") {
        dhcp_lease();
    }
    if wanted("moved_vm") {
        moved_vm();
    }
}

/// A VM that moves between two nodes: from the start of re-pointing the client
/// node's forwarding entry (what a plan's segment update does) to the first ping
/// answered at the new node, against a ping round trip across nodes.
fn moved_vm() {
    let c = Cluster::new();
    let gw = ip(10, 20, 0, 1);
    let a1 = probe(&c, 1, "a1", "alpha", "app", ip(10, 20, 0, 11));
    let mut at = 2usize;
    let mut a2 = probe(&c, at, "a2", "alpha", "app", ip(10, 20, 0, 12));
    apply_segment(
        &c.ns(1),
        &segment("alpha", "app", 5001, 1, gw, vec![remote(&a2, at)]),
    )
    .expect("n1");
    for n in [2, 3] {
        apply_segment(
            &c.ns(n),
            &segment("alpha", "app", 5001, n, gw, vec![remote(&a1, 1)]),
        )
        .expect("n2/n3");
    }
    assert!(ping_within(&a1, a2.ip, Duration::from_secs(3)), "a1 -> a2");
    let baseline = median(rtts(&a1.netns, a2.ip, 50));
    let mut moves = Vec::new();
    for _ in 0..6 {
        let to = if at == 2 { 3 } else { 2 };
        remove_probe(&c, at, &a2);
        a2 = probe(&c, to, "a2", "alpha", "app", ip(10, 20, 0, 12));
        let start = Instant::now();
        apply_segment(
            &c.ns(1),
            &segment("alpha", "app", 5001, 1, gw, vec![remote(&a2, to)]),
        )
        .expect("re-point");
        assert!(
            ping_within(&a1, a2.ip, Duration::from_secs(3)),
            "a1 -> a2 on n{to}"
        );
        moves.push(start.elapsed().as_secs_f64() * 1000.0);
        at = to;
    }
    let m = median(moves.clone());
    println!(
        "moved VM (6 moves between two nodes): entry re-pointed and first ping answered at the new node, median {m:.1} ms (runs {moves:.1?}); a ping round trip across nodes {baseline:.3} ms (ratio {:.0})",
        m / baseline
    );
}

fn dhcp_lease() {
    if network::dhcp::dnsmasq_binary().is_none()
        || Command::new("busybox").arg("--help").output().is_err()
    {
        println!("dhcp: skipped: dnsmasq (dnsmasq-base) or busybox is not installed");
        return;
    }
    let c = Cluster::new();
    let n1 = c.ns(1);
    let gw = ip(10, 20, 0, 1);
    apply_segment(&n1, &segment("alpha", "app", 5001, 1, gw, vec![])).expect("segment");
    let dir = std::env::temp_dir().join(format!("{}dhcp", c.prefix));
    std::fs::create_dir_all(&dir).expect("scratch");
    let node_ns = n1.name().unwrap().to_owned();
    let bridge = network::tenant::tenant_bridge_name("alpha", "app");
    let nic = |name: &str, mac: [u8; 6]| {
        let netns = format!("{}vm-{name}", c.prefix);
        network::netns::create_netns(&netns).expect("probe netns");
        let tap = network::tenant::vm_tap_name(name, 0);
        attach_nic(&node_ns, &tap, &netns, &bridge, &mac);
        Nic {
            netns,
            tap,
            script: dir.join(format!("{name}.sh")),
            out: dir.join(format!("{name}.out")),
        }
    };
    let host = |mac: [u8; 6], last: u8| DhcpHost {
        mac,
        ipv4: ip(10, 20, 0, last),
        name: format!("vm-{last}"),
    };
    let mut spec = DhcpSpec {
        tenant: "alpha".into(),
        network: "app".into(),
        gateway: gw,
        prefix_len: 24,
        mtu: 1450,
        hosts: vec![host([2, 0xd0, 0, 0, 0, 21], 21)],
        upstream: vec![],
        ipv6_gateway: None,
    };
    converge_dhcp(&n1, &dir, &spec).expect("dhcp");
    let d1 = nic("d1", [2, 0xd0, 0, 0, 0, 21]);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let lease_ms = |n: &Nic, want: &str| {
        let (lease, took) = n.udhcpc();
        assert_eq!(lease.expect("a lease").ip, want);
        ms(took)
    };
    let segment_runs: Vec<f64> = (0..10).map(|_| lease_ms(&d1, "10.20.0.21")).collect();
    // A NIC added to the plan: from the change (hosts rewritten, SIGHUP) to its lease.
    let d2 = nic("d2", [2, 0xd0, 0, 0, 0, 30]);
    let mut added = Vec::new();
    for i in 0..5u8 {
        let mac = [2, 0xd0, 0, 0, 1, i];
        let out = Command::new("ip")
            .args(["-n", &d2.netns, "link", "set", "eth0", "address"])
            .arg(network::overlay::format_mac(&mac))
            .output()
            .expect("ip");
        assert!(out.status.success());
        spec.hosts.push(host(mac, 40 + i));
        let start = Instant::now();
        converge_dhcp(&n1, &dir, &spec).expect("reload");
        let (lease, _) = d2.udhcpc();
        assert_eq!(
            lease.expect("added NIC leased").ip,
            format!("10.20.0.{}", 40 + i)
        );
        added.push(ms(start.elapsed()));
    }
    // Baseline: the same dnsmasq options on a raw veth (no bridge, no segment).
    let (rs, rc) = (format!("{}rawsrv", c.prefix), format!("{}rawcli", c.prefix));
    network::netns::create_netns(&rs).expect("raw server");
    network::netns::create_netns(&rc).expect("raw client");
    ok(&[
        "ip", "-n", &rs, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
        &rc,
    ]);
    ok(&[
        "ip",
        "-n",
        &rs,
        "addr",
        "add",
        "10.20.0.1/24",
        "dev",
        "eth0",
    ]);
    ok(&["ip", "-n", &rs, "link", "set", "eth0", "up"]);
    ok(&[
        "ip",
        "-n",
        &rc,
        "link",
        "set",
        "eth0",
        "address",
        &network::overlay::format_mac(&[2, 0xd0, 0, 0, 0, 21]),
        "up",
    ]);
    let raw_spec = DhcpSpec {
        hosts: vec![host([2, 0xd0, 0, 0, 0, 21], 21)],
        ..spec.clone()
    };
    let raw_files = network::dhcp::DhcpFiles::new(&dir, "raw", "raw");
    std::fs::write(&raw_files.hosts, network::dhcp::hosts_text(&raw_spec)).expect("hosts");
    std::fs::write(&raw_files.names, network::dhcp::names_text(&raw_spec)).expect("names");
    std::fs::write(
        &raw_files.conf,
        network::dhcp::config_text(&raw_spec, &raw_files, "eth0", 0),
    )
    .expect("conf");
    let mut raw_server = Command::new("ip")
        .args(["netns", "exec", &rs])
        .arg(network::dhcp::dnsmasq_binary().unwrap())
        .arg("--keep-in-foreground")
        .arg(format!("--conf-file={}", raw_files.conf.display()))
        .spawn()
        .expect("raw dnsmasq");
    std::thread::sleep(Duration::from_millis(300));
    let raw_nic = Nic {
        netns: rc.clone(),
        tap: String::new(),
        script: dir.join("raw.sh"),
        out: dir.join("raw.out"),
    };
    let raw_runs: Vec<f64> = (0..10).map(|_| lease_ms(&raw_nic, "10.20.0.21")).collect();
    let _ = raw_server.kill();
    let _ = raw_server.wait();
    network::dhcp::stop_dhcp(&dir, "alpha", "app");
    let _ = std::fs::remove_dir_all(&dir);
    let (s, a, r) = (
        median(segment_runs.clone()),
        median(added.clone()),
        median(raw_runs.clone()),
    );
    println!(
        "dhcp: time to a lease (udhcpc start to address, median of 10): segment {s:.1} ms, raw veth {r:.1} ms, segment/raw {:.2}; runs segment {segment_runs:.1?}, raw {raw_runs:.1?}",
        s / r
    );
    println!(
        "dhcp: a NIC added to the plan, change to lease (median of 5): {a:.1} ms (runs {added:.1?}); /raw lease {:.2}",
        a / r
    );
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
            guests: vec![],
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
