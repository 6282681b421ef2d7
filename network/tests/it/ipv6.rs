//! IPv6 on a tenant network (issue 19): a network with an IPv6 /64 gets the gateway's
//! IPv6 address on every node, router advertisements from the gateway's dnsmasq
//! (SLAAC prefix, MTU, DNS), neighbour-proxy entries for the remote NICs' SLAAC and
//! link-local addresses, names that answer AAAA, and security groups with IPv6
//! sources. Probe namespaces stand in for VMs with the kernel's own SLAAC.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use network::NetNs;
use network::dhcp::{DhcpHost, DhcpSpec, converge_dhcp, stop_dhcp};
use network::overlay::{
    apply_segment, gateway_leg_name, gateway_mac, link_local_address, plan_segment, slaac_address,
    vxlan_name,
};
use network::secgroup::{
    AllowRule, FirewallSpec, GuardedNic, Prefix, Proto, Zone, apply_firewall, firewall_drift,
    zone_id,
};

use crate::common::require_netns;
use crate::dhcp::dhcp_tools_missing;
use crate::overlay_support::{
    Cluster, Probe, ip, listen_at, ok, ping_addr, probe, remote, segment, sh, wait_for,
};

const PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 1);

/// The nodes' RA/DHCP servers, stopped on drop (before the namespaces go).
struct Servers(Vec<PathBuf>);

impl Drop for Servers {
    fn drop(&mut self) {
        for dir in &self.0 {
            stop_dhcp(dir, "alpha", "app");
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn in_probe(p: &Probe, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", &p.netns];
    full.extend(args);
    let out = sh(&full);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Pings until an answer comes (10 s): a positive check under load.
fn ping6(from: &Probe, to: &str) -> bool {
    wait_for(Duration::from_secs(10), || ping_addr(from, to))
}

fn v6(p: &Probe) -> Ipv6Addr {
    slaac_address(PREFIX, &p.mac)
}

/// Waits for the probe's SLAAC address to be usable (the gateway's RA came).
fn slaac_ready(p: &Probe) -> bool {
    let want = v6(p).to_string();
    wait_for(Duration::from_secs(30), || {
        let a = in_probe(p, &["ip", "-6", "addr", "show", "dev", "eth0"]);
        a.lines()
            .any(|l| l.contains(&format!("{want}/64")) && !l.contains("tentative"))
    })
}

fn listen6(p: &Probe, port: u16) -> TcpListener {
    listen_at(&p.netns, SocketAddr::from((v6(p), port)))
}

fn connects6(from: &Probe, to: Ipv6Addr, port: u16) -> bool {
    let addr = SocketAddr::from((IpAddr::V6(to), port));
    NetNs::named(from.netns.clone())
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
        .expect("enter probe")
}

/// Connects until one succeeds (10 s): a positive check under load. A negative
/// check is one attempt of [`connects6`] (2 s).
fn connects6_within(from: &Probe, to: Ipv6Addr, port: u16) -> bool {
    wait_for(Duration::from_secs(10), || connects6(from, to, port))
}

#[test]
fn an_ipv6_network_gives_slaac_addresses_routes_names_and_groups_across_nodes() {
    require_netns!();
    if let Some(why) = dhcp_tools_missing() {
        eprintln!("skipping: {why}");
        return;
    }
    let c = Cluster::named("u-v6");
    let gw = ip(10, 20, 0, 1);
    let a = probe(&c, 1, "a", "alpha", "app", ip(10, 20, 0, 11));
    let b = probe(&c, 2, "b", "alpha", "app", ip(10, 20, 0, 12));
    let d = probe(&c, 2, "d", "alpha", "app", ip(10, 20, 0, 13));
    let with_v6 = |node: usize, remotes| {
        let mut s = segment("alpha", "app", 6001, node, gw, remotes);
        s.gateway.as_mut().unwrap().ipv6 = Some(GW6);
        s
    };
    let segs = [
        with_v6(1, vec![remote(&b, 2), remote(&d, 2)]),
        with_v6(2, vec![remote(&a, 1)]),
    ];
    let mut servers = Servers(Vec::new());
    let hosts: Vec<DhcpHost> = [&a, &b, &d]
        .iter()
        .map(|p| DhcpHost {
            mac: p.mac,
            ipv4: p.ip,
            name: format!("vm-{}", &p.netns[p.netns.len() - 1..]),
        })
        .collect();
    for (i, seg) in segs.iter().enumerate() {
        apply_segment(&c.ns(i + 1), seg).expect("segment");
        let dir = std::env::temp_dir().join(format!("{}dhcp-n{}", c.prefix, i + 1));
        servers.0.push(dir.clone());
        let spec = DhcpSpec {
            tenant: "alpha".into(),
            network: "app".into(),
            gateway: gw,
            prefix_len: 24,
            mtu: 1450,
            hosts: hosts.clone(),
            upstream: vec![],
            ipv6_gateway: Some(GW6),
        };
        converge_dhcp(&c.ns(i + 1), &dir, &spec).expect("RA server");
        let (_, steps) = plan_segment(&c.ns(i + 1), seg).expect("read back");
        assert!(steps.is_empty(), "converged: {steps:?}");
    }

    // SLAAC from the gateway's RA: the EUI-64 address, the gateway's link-local
    // (the same on every node: its MAC is) as default router, the segment MTU.
    for p in [&a, &b, &d] {
        assert!(
            slaac_ready(p),
            "{} took no SLAAC address {}: {}",
            p.netns,
            v6(p),
            in_probe(p, &["ip", "-6", "addr"])
        );
    }
    let gw_ll = link_local_address(&gateway_mac("alpha", "app")).to_string();
    assert!(
        wait_for(Duration::from_secs(10), || in_probe(
            &a,
            &["ip", "-6", "route", "show", "default"]
        )
        .contains(&format!("default via {gw_ll}"))),
        "{}",
        in_probe(&a, &["ip", "-6", "route"])
    );
    assert_eq!(
        in_probe(&a, &["cat", "/proc/sys/net/ipv6/conf/eth0/mtu"]).trim(),
        "1450"
    );

    // Across nodes over VXLAN (the proxy answers neighbour solicitations), to the
    // gateway, and on link-local addresses.
    assert!(ping6(&a, &v6(&b).to_string()), "a -> b across nodes");
    assert!(ping6(&b, &v6(&a).to_string()), "b -> a across nodes");
    assert!(ping6(&a, &GW6.to_string()), "a -> its gateway");
    assert!(
        ping6(&a, &format!("{}%eth0", link_local_address(&b.mac))),
        "a -> b's link-local address"
    );
    // The gateway's DNS answers AAAA with the SLAAC addresses.
    let text = in_probe(
        &a,
        &[
            "busybox",
            "nslookup",
            "-type=AAAA",
            "vm-b.app.alpha.cairn",
            "10.20.0.1",
        ],
    );
    assert!(text.contains(&v6(&b).to_string()), "{text}");

    // A remote's neighbour entry deleted by hand is drift, and repaired.
    let n1 = c.ns(1).name().unwrap().to_owned();
    let vx = vxlan_name("alpha", "app");
    ok(&[
        "ip",
        "-n",
        &n1,
        "-6",
        "neigh",
        "del",
        &v6(&b).to_string(),
        "dev",
        &vx,
    ]);
    let (observed, _) = plan_segment(&c.ns(1), &segs[0]).expect("read back");
    assert!(
        observed
            .drift
            .iter()
            .any(|d| d.starts_with(&format!("neighbour {}: want", v6(&b)))),
        "{:?}",
        observed.drift
    );
    apply_segment(&c.ns(1), &segs[0]).expect("repair");
    assert!(plan_segment(&c.ns(1), &segs[0]).unwrap().1.is_empty());

    // A security group with an IPv6 source on b (node 2): TCP 5432 from the
    // network's /64 passes (d's neighbour solicitation for b crosses b's chain),
    // 5433 and ping do not.
    let _l1 = listen6(&b, 5432);
    let _l2 = listen6(&b, 5433);
    let fw = FirewallSpec {
        nics: vec![GuardedNic {
            tap: b.tap.clone(),
            ipv4: Some(b.ip),
            rules: vec![AllowRule {
                group: "db".into(),
                from: Prefix::parse("fd00:20::/64").unwrap(),
                to: None,
                proto: Proto::Tcp,
                ports: Some((5432, 5432)),
            }],
            dhcp_server: Some(gw),
        }],
        zones: vec![Zone {
            id: zone_id("alpha", "app"),
            ports: vec![
                vxlan_name("alpha", "app"),
                gateway_leg_name("alpha", "app"),
                b.tap.clone(),
                d.tap.clone(),
            ],
        }],
        guests: vec![b.tap.clone(), d.tap.clone()],
    };
    apply_firewall(&c.ns(2), &fw).expect("groups");
    let n2 = c.ns(2).name().unwrap().to_owned();
    ok(&["ip", "-n", &d.netns, "-6", "neigh", "flush", "dev", "eth0"]);
    assert!(
        connects6_within(&d, v6(&b), 5432),
        "allowed from the /64, same node"
    );
    assert!(
        connects6_within(&a, v6(&b), 5432),
        "allowed from the /64, across nodes"
    );
    assert!(!connects6(&d, v6(&b), 5433), "5433 is not allowed");
    assert!(
        !ping6(&d, &v6(&b).to_string()),
        "ICMPv6 echo is not allowed"
    );
    // With IPv6 not passed to the inet hooks the group is bypassed: drift, repaired.
    ok(&[
        "ip",
        "netns",
        "exec",
        &n2,
        "sysctl",
        "-w",
        "net.bridge.bridge-nf-call-ip6tables=0",
    ]);
    assert!(
        connects6_within(&d, v6(&b), 5433),
        "bypassed while the switch is 0"
    );
    assert_eq!(
        firewall_drift(&c.ns(2), &fw).expect("read"),
        vec![
            "net.bridge.bridge-nf-call-ip6tables is 0: bridged IPv6 traffic bypasses the groups"
                .to_owned()
        ]
    );
    apply_firewall(&c.ns(2), &fw).expect("repair");
    assert!(firewall_drift(&c.ns(2), &fw).expect("read").is_empty());
    assert!(!connects6(&d, v6(&b), 5433), "enforced again");
    assert!(connects6_within(&d, v6(&b), 5432));
    drop(servers);
}
