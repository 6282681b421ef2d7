//! The guest guard (issue 19): a guest that runs its own DHCP server, DHCPv6 server
//! or router advertisements must not configure its neighbours. A probe namespace
//! plays the rogue guest (a real dnsmasq on its NIC: DHCPv4, DHCPv6 and RAs with a
//! SLAAC prefix), other probes play victims (busybox udhcpc, the kernel's own RA
//! handling, a DHCPv6 Solicit). Without the guard the victim takes the rogue's
//! lease and route (so the test can fail); with it the rogue's answers are dropped
//! on the node, counted by the guard's rules, and a planned NIC still gets its lease
//! from the gateway.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use network::NetNs;
use network::dhcp::{DhcpHost, converge_dhcp};
use network::secgroup::{FirewallSpec, GUARD_TABLE, apply_firewall, firewall_drift};

use crate::common::require_netns;
use crate::dhcp::{DhcpNode, dhcp_tools_missing};
use crate::overlay_support::{Nic, ok, sh, wait_for};

/// The rogue guest's dnsmasq; killed on drop (before the namespaces go).
struct Rogue {
    child: Child,
    log: std::path::PathBuf,
}

impl Rogue {
    fn start(nic: &Nic, dir: &std::path::Path) -> Self {
        for (addr, dad) in [("10.20.0.250/24", None), ("fd00:bad::1/64", Some("nodad"))] {
            let mut args = vec!["ip", "-n", &nic.netns, "addr", "add", addr, "dev", "eth0"];
            args.extend(dad);
            ok(&args);
        }
        std::fs::create_dir_all(dir).expect("dir");
        let log = dir.join("rogue.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &nic.netns])
            .arg(network::dhcp::dnsmasq_binary().expect("dnsmasq"))
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--interface=eth0",
                "--except-interface=lo",
                "--bind-interfaces",
                "--port=0",
                "--no-ping",
                "--user=root",
                "--dhcp-authoritative",
                "--dhcp-range=10.20.0.200,10.20.0.209,255.255.255.0,1h",
                "--dhcp-option=option:router,10.20.0.250",
                "--dhcp-range=fd00:bad::100,fd00:bad::1ff,slaac,64,1h",
                "--enable-ra",
                "--log-dhcp",
            ])
            .arg(format!(
                "--dhcp-leasefile={}",
                dir.join("rogue.leases").display()
            ))
            .arg(format!("--pid-file={}", dir.join("rogue.pid").display()))
            .arg(format!("--log-facility={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rogue dnsmasq");
        let rogue = Self { child, log };
        // Started once its DHCP socket is bound (dnsmasq logs its start after).
        assert!(
            wait_for(Duration::from_secs(20), || rogue
                .log()
                .contains("DHCP, IP range")),
            "the rogue dnsmasq did not start: {}",
            rogue.log()
        );
        rogue
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many DHCPOFFERs (v4) and ADVERTISEs (v6) the rogue logged for `mac`.
    fn answers_to(&self, mac: &str) -> (usize, usize) {
        let log = self.log();
        let v4 = log
            .lines()
            .filter(|l| l.contains("DHCPOFFER") && l.contains(mac))
            .count();
        let v6 = log.lines().filter(|l| l.contains("DHCPADVERTISE")).count();
        (v4, v6)
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    network::overlay::format_mac(&mac)
}

/// The victim's global IPv6 addresses and default routes (what RAs configure).
fn v6_config(nic: &Nic) -> String {
    let a = nic.run(&["ip", "-6", "addr", "show", "dev", "eth0", "scope", "global"]);
    let r = nic.run(&["ip", "-6", "route", "show", "default"]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&r.stdout)
    )
}

/// Sends DHCPv6 Solicits from the victim's link-local address (one a second) and
/// returns the first answer's message type and source, if one comes in `within`.
fn solicit(nic: &Nic, mac: [u8; 6], within: Duration) -> Option<(u8, std::net::SocketAddr)> {
    // The link-local address must have finished duplicate address detection.
    assert!(
        wait_for(Duration::from_secs(20), || {
            let t = nic.run(&["ip", "-6", "addr", "show", "dev", "eth0", "scope", "link"]);
            let t = String::from_utf8_lossy(&t.stdout).into_owned();
            t.contains("inet6") && !t.contains("tentative")
        }),
        "no usable link-local address on {}",
        nic.netns
    );
    let link = nic.run(&["ip", "-o", "link", "show", "eth0"]);
    let ifindex: u32 = String::from_utf8_lossy(&link.stdout)
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .expect("ifindex");
    let mut msg = vec![1u8, 0x12, 0x34, 0x56];
    msg.extend_from_slice(&[0, 1, 0, 10, 0, 3, 0, 1]); // client id: DUID-LL, ethernet
    msg.extend_from_slice(&mac);
    msg.extend_from_slice(&[0, 8, 0, 2, 0, 0]); // elapsed time
    msg.extend_from_slice(&[0, 3, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]); // IA_NA
    NetNs::named(nic.netns.clone())
        .run(move || {
            let sock = UdpSocket::bind("[::]:546").expect("bind 546");
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            let to = SocketAddrV6::new("ff02::1:2".parse::<Ipv6Addr>().unwrap(), 547, 0, ifindex);
            let deadline = Instant::now() + within;
            let mut buf = [0u8; 1500];
            let mut sent = Instant::now() - Duration::from_secs(2);
            while Instant::now() < deadline {
                if sent.elapsed() >= Duration::from_secs(1) {
                    sock.send_to(&msg, to).expect("send solicit");
                    sent = Instant::now();
                }
                if let Ok((n, from)) = sock.recv_from(&mut buf)
                    && n >= 4
                    && buf[1..4] == [0x12, 0x34, 0x56]
                {
                    return Some((buf[0], from));
                }
            }
            None
        })
        .expect("enter the victim's namespace")
}

/// The guard's drop counters, in rule order (DHCP, DHCPv6, RA/redirect, ICMP
/// redirect, VLAN tags).
fn drops(node: &NetNs) -> Vec<u64> {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        node.name().unwrap(),
        "nft",
        "-j",
        "list",
        "table",
        "bridge",
        GUARD_TABLE,
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("rule"))
        .filter_map(|r| {
            r["expr"]
                .as_array()?
                .iter()
                .find_map(|e| e["counter"]["packets"].as_u64())
        })
        .collect()
}

#[test]
fn a_guest_running_dhcp_and_router_advertisements_configures_no_neighbour() {
    require_netns!();
    if let Some(why) = dhcp_tools_missing() {
        eprintln!("skipping: {why}");
        return;
    }
    let node = DhcpNode::named("u-gd", 1450);
    let planned_mac = [2, 0xc1, 0, 0, 0, 15];
    let (before_mac, after_mac) = ([2, 0xc1, 0, 0, 0, 0x61], [2, 0xc1, 0, 0, 0, 0x62]);
    let web = node.nic("web-0", planned_mac);
    let rogue_nic = node.nic("rogue", [2, 0xc1, 0, 0, 0, 0x66]);
    let early = node.nic("early", before_mac);
    // cairn's own server for the network (static leases: only web-0 is planned).
    let hosts = vec![DhcpHost {
        mac: planned_mac,
        ipv4: Ipv4Addr::new(10, 20, 0, 15),
        name: "web-0".into(),
    }];
    converge_dhcp(&node.ns, &node.dir, &node.spec(1450, hosts)).expect("gateway dhcp");
    let rogue = Rogue::start(&rogue_nic, &node.dir);

    // Without the guard the rogue configures its neighbour: the test can fail.
    // Up to 3 tries: a positive check on a loaded machine.
    let lease = (0..3).find_map(|_| early.udhcpc().0);
    let lease = lease.expect("without the guard the rogue's offer is taken");
    assert!(lease.ip.starts_with("10.20.0.20"), "{lease:?}");
    assert_eq!(lease.router, "10.20.0.250");
    assert!(
        wait_for(Duration::from_secs(30), || v6_config(&early)
            .contains("fd00:bad:")),
        "without the guard the rogue's RA gives a SLAAC address: {}",
        v6_config(&early)
    );
    let (kind, from) = solicit(&early, before_mac, Duration::from_secs(20))
        .expect("without the guard the rogue answers DHCPv6");
    assert_eq!(kind, 2, "an ADVERTISE from {from}");

    // The guard, as cairn-node programs it: every guest tap of the node.
    let victim = node.nic("victim", after_mac);
    let spec = FirewallSpec {
        guests: [&web, &rogue_nic, &early, &victim]
            .iter()
            .map(|n| n.tap.clone())
            .collect(),
        ..FirewallSpec::default()
    };
    let made = apply_firewall(&node.ns, &spec).expect("guard");
    assert!(
        made.iter().any(|d| d.contains("cairn_guard is missing")),
        "{made:?}"
    );
    assert_eq!(
        firewall_drift(&node.ns, &spec).expect("read"),
        Vec::<String>::new()
    );

    // The victim gets nothing from the rogue, though the rogue answered it.
    let (lease, _) = victim.udhcpc();
    assert!(lease.is_none(), "the rogue's offer got through: {lease:?}");
    assert!(
        rogue.answers_to(&mac_text(after_mac)).0 > 0,
        "the rogue did offer: {}",
        rogue.log()
    );
    let v6_before = rogue.answers_to("").1;
    assert_eq!(solicit(&victim, after_mac, Duration::from_secs(4)), None);
    assert!(
        wait_for(Duration::from_secs(10), || rogue.answers_to("").1
            > v6_before),
        "the rogue did advertise DHCPv6"
    );
    // RAs: the victim's solicitations reached the rogue, whose answers were dropped.
    assert!(
        wait_for(Duration::from_secs(30), || drops(&node.ns)
            .get(2)
            .copied()
            .unwrap_or(0)
            > 0),
        "no RA was dropped: {:?}",
        drops(&node.ns)
    );
    let config = v6_config(&victim);
    assert!(
        !config.contains("fd00:bad:") && !config.contains("default"),
        "the rogue's RA configured the victim: {config}"
    );
    let counts = drops(&node.ns);
    assert!(
        counts.len() == 5 && counts[..3].iter().all(|c| *c > 0),
        "every DHCP and RA rule of the guard dropped something: {counts:?}"
    );

    // The gateway's own DHCP still reaches a planned NIC.
    let lease = web.udhcpc().0.expect("the planned NIC's lease");
    assert_eq!(
        (lease.ip.as_str(), lease.router.as_str()),
        ("10.20.0.15", "10.20.0.1")
    );

    // Deleted by hand: drift, then repaired.
    ok(&[
        "ip",
        "netns",
        "exec",
        node.ns.name().unwrap(),
        "nft",
        "delete",
        "table",
        "bridge",
        GUARD_TABLE,
    ]);
    assert_eq!(
        firewall_drift(&node.ns, &spec).expect("read"),
        vec![format!("table bridge {GUARD_TABLE} is missing")]
    );
    apply_firewall(&node.ns, &spec).expect("repair");
    assert!(firewall_drift(&node.ns, &spec).expect("read").is_empty());
    // No guest left: the table goes.
    apply_firewall(&node.ns, &FirewallSpec::default()).expect("no guests");
    assert!(
        firewall_drift(&node.ns, &FirewallSpec::default())
            .expect("read")
            .is_empty()
    );
    drop(rogue);
}

/// A guest sends what the bridge would carry to its neighbours unless the guard
/// drops it: an 802.1Q-tagged frame (VLAN 100; a tagged DHCP answer or RA would
/// pass the untagged rules and reach a guest that configured that VLAN) and an
/// IPv4 ICMP redirect to its neighbour. Both are sent raw (this kernel has no VLAN
/// devices) and counted at the neighbour's NIC. Without the guard both arrive (the
/// test can fail); with it neither does, the guard counts them, and untagged
/// traffic between the two still passes.
#[test]
fn a_guest_sends_neither_tagged_frames_nor_icmp_redirects_to_its_neighbours() {
    require_netns!();
    use crate::overlay_support::{Cluster, ip, ping, probe};
    use network::overlay::format_mac;
    let c = Cluster::named("f-gg");
    let a = probe(&c, 1, "ga", "alpha", "app", ip(10, 20, 0, 11));
    let b = probe(&c, 1, "gb", "alpha", "app", ip(10, 20, 0, 12));
    // b counts the tagged frames and the ICMP redirects that reach its NIC.
    let script = "table netdev f {\n chain rx {\n type filter hook ingress device \"eth0\" priority 0;\n vlan id 100 counter\n icmp type redirect counter\n }\n}\n";
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &b.netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut nft.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success());
    // (tagged frames, redirects) seen at b.
    let at_b = || {
        let out = sh(&[
            "ip", "netns", "exec", &b.netns, "nft", "list", "table", "netdev", "f",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let n: Vec<u64> = text
            .split("counter packets ")
            .skip(1)
            .filter_map(|t| t.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(n.len(), 2, "{text}");
        (n[0], n[1])
    };
    let hex = |m: &[u8; 6]| format_mac(m).replace(':', "");
    // A VLAN 100 frame from a to b's MAC, and an ICMP host redirect from a to b
    // (for 198.51.100.7, via 10.20.0.66) quoting an IP header and 8 bytes, as a
    // router would send it.
    let send = format!(
        r#"
import socket, struct, sys
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
if sys.argv[1] == "vlan":
    p = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    p.bind(("eth0", 0))
    p.send(bytes.fromhex("{bmac}{amac}") + struct.pack("!HHH", 0x8100, 100, 0x0800) + b"\x45" + b"\0" * 45)
else:
    quoted = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0,
                         socket.inet_aton("{b}"), socket.inet_aton("198.51.100.7")) + b"\0" * 8
    body = struct.pack("!BBH4s", 5, 1, 0, socket.inet_aton("10.20.0.66")) + quoted
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.sendto(body, ("{b}", 0))
"#,
        b = b.ip,
        bmac = hex(&b.mac),
        amac = hex(&a.mac),
    );
    let send_both = || {
        for what in ["vlan", "redirect"] {
            ok(&[
                "ip", "netns", "exec", &a.netns, "python3", "-c", &send, what,
            ]);
        }
    };
    // Without the guard.
    assert!(ping(&a, b.ip), "untagged a -> b");
    send_both();
    assert!(
        wait_for(Duration::from_secs(2), || at_b() == (1, 1)),
        "the tagged frame and the redirect reached b: {:?}",
        at_b()
    );
    // With it.
    let node = c.ns(1);
    let spec = FirewallSpec {
        guests: vec![a.tap.clone(), b.tap.clone()],
        ..FirewallSpec::default()
    };
    apply_firewall(&node, &spec).expect("guard");
    assert!(firewall_drift(&node, &spec).unwrap().is_empty());
    send_both();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        at_b(),
        (1, 1),
        "a tagged frame or a redirect crossed the guard"
    );
    assert!(ping(&a, b.ip), "untagged traffic still passes");
    let counts = drops(&node);
    assert_eq!(counts, vec![0, 0, 0, 1, 1], "the guard's counters");
    apply_firewall(&node, &FirewallSpec::default()).expect("no guests");
}
