//! DHCP of tenant networks (issue 19 item 4) with a real client: cairn's dnsmasq
//! in the tenant's router namespace of a node namespace, busybox `udhcpc` in probe
//! namespaces standing in for VM NICs (a veth named like the VM's tap on the
//! network's bridge, the VM's MAC on the other end, no address until DHCP gives one).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use network::NetNs;
use network::dev_cluster;
use network::dhcp::{
    DhcpFiles, DhcpHost, DhcpSpec, converge_dhcp, dhcp_drift, running_pid, stop_dhcp,
};
use network::overlay::{Gateway, SegmentSpec, apply_segment, vxlan_name};
use network::secgroup::{FirewallSpec, GuardedNic, Zone, apply_firewall, zone_id};
use network::tenant::{tenant_bridge_name, vm_tap_name};

use crate::common::require_netns;
use crate::overlay_support::{Nic, attach_nic, ok};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Skips (with the reason) when dnsmasq or busybox is missing.
pub fn dhcp_tools_missing() -> Option<String> {
    if network::dhcp::dnsmasq_binary().is_none() {
        return Some("dnsmasq is not installed (Debian package dnsmasq-base)".into());
    }
    if Command::new("busybox").arg("--help").output().is_err() {
        return Some("busybox (for udhcpc) is not installed".into());
    }
    None
}

/// One node namespace `i-dh…-n1` with a segment of tenant `alpha`, network `app`
/// (10.20.0.0/24, gateway 10.20.0.1); DHCP files under /tmp. Stops dnsmasq and
/// removes everything on drop.
pub struct DhcpNode {
    pub prefix: String,
    pub ns: NetNs,
    pub dir: PathBuf,
}

pub const GW: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);

impl DhcpNode {
    pub fn new(mtu: u32) -> Self {
        Self::named("i-dh", mtu)
    }

    /// The same with namespaces named `<tag><pid>x<n>-…`.
    pub fn named(tag: &str, mtu: u32) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{tag}{}x{n}-", std::process::id() % 100_000);
        let _ = dev_cluster::teardown(&prefix);
        let switch = dev_cluster::create_switch(&prefix).expect("switch");
        let node = dev_cluster::add_node(&switch, &format!("{prefix}n1"), "n1", 1).expect("node");
        let ns = node.ns();
        dev_cluster::add_address(&ns, "nic0", IpAddr::V4(Ipv4Addr::new(192, 168, 49, 1)), 24)
            .expect("underlay address");
        let spec = SegmentSpec {
            tenant: "alpha".into(),
            network: "app".into(),
            vni: 5001,
            mtu,
            local_vtep: Ipv4Addr::new(192, 168, 49, 1),
            gateway: Some(Gateway {
                address: GW,
                prefix_len: 24,
                ipv6: None,
            }),
            remotes: vec![],
        };
        apply_segment(&ns, &spec).expect("segment");
        let dir = std::env::temp_dir().join(format!("{tag}cp-{}", prefix.trim_end_matches('-')));
        Self { prefix, ns, dir }
    }

    /// A probe NIC of VM `vm` on the network's bridge, MAC `mac`, no address.
    pub fn nic(&self, vm: &str, mac: [u8; 6]) -> Nic {
        let netns = format!("{}vm-{vm}", self.prefix);
        network::netns::create_netns(&netns).expect("probe netns");
        let tap = vm_tap_name(vm, 0);
        let node = self.ns.name().unwrap().to_owned();
        attach_nic(
            &node,
            &tap,
            &netns,
            &tenant_bridge_name("alpha", "app"),
            &mac,
        );
        ok(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        Nic {
            netns,
            tap,
            script: self.dir.join(format!("udhcpc-{vm}.sh")),
            out: self.dir.join(format!("udhcpc-{vm}.out")),
        }
    }

    pub fn spec(&self, mtu: u32, hosts: Vec<DhcpHost>) -> DhcpSpec {
        DhcpSpec {
            tenant: "alpha".into(),
            network: "app".into(),
            gateway: GW,
            prefix_len: 24,
            mtu,
            hosts,
            upstream: vec![],
            ipv6_gateway: None,
        }
    }
}

impl Drop for DhcpNode {
    fn drop(&mut self) {
        stop_dhcp(&self.dir, "alpha", "app");
        if let Err(e) = dev_cluster::teardown(&self.prefix) {
            eprintln!("teardown of {} failed: {e}", self.prefix);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn host(mac: [u8; 6], last: u8, name: &str) -> DhcpHost {
    DhcpHost {
        mac,
        ipv4: Ipv4Addr::new(10, 20, 0, last),
        name: name.into(),
    }
}

fn pid(dir: &Path) -> u32 {
    running_pid(&DhcpFiles::new(dir, "alpha", "app")).expect("dnsmasq runs")
}

#[test]
fn a_planned_nic_gets_its_address_gateway_dns_and_mtu_and_others_get_nothing() {
    require_netns!();
    if let Some(why) = dhcp_tools_missing() {
        eprintln!("skipping: {why}");
        return;
    }
    let node = DhcpNode::new(1450);
    let (web_mac, stranger_mac) = ([2, 0xc1, 0, 0, 0, 15], [2, 0xc1, 0, 0, 0, 99]);
    let web = node.nic("web-0", web_mac);
    let stranger = node.nic("stranger", stranger_mac);
    // A remote NIC of the network is listed too (it may move here and renew).
    let mut hosts = vec![
        host(web_mac, 15, "web-0"),
        host([2, 0xc1, 0, 0, 0, 16], 16, "web-1"),
    ];
    let spec = node.spec(1450, hosts.clone());
    let made = converge_dhcp(&node.ns, &node.dir, &spec).expect("dhcp");
    assert!(
        made.iter().any(|m| m.contains("started dnsmasq")),
        "{made:?}"
    );
    assert_eq!(
        converge_dhcp(&node.ns, &node.dir, &spec).expect("again"),
        Vec::<String>::new(),
        "converged: nothing to do"
    );
    assert_eq!(dhcp_drift(&node.ns, &node.dir, &spec), Vec::<String>::new());

    // The planned MAC gets exactly its IPAM address and the options.
    let (lease, took) = web.udhcpc();
    let lease = lease.expect("web-0 gets a lease");
    eprintln!("lease in {took:?}: {lease:?}");
    assert_eq!(lease.ip, "10.20.0.15");
    assert_eq!(lease.subnet, "255.255.255.0");
    assert_eq!(lease.router, "10.20.0.1");
    assert_eq!(lease.dns.trim(), "10.20.0.1");
    assert_eq!(lease.lease, "3600");
    assert_eq!(lease.mtu, "1450");
    assert_eq!(lease.hostname, "web-0");
    // With the address the guest reaches its gateway, and the gateway's DNS
    // answers the network's VM names (and only them).
    assert!(
        web.run(&["ping", "-c", "1", "-W", "1", "10.20.0.1"])
            .status
            .success()
    );
    let ns = web.run(&["busybox", "nslookup", "web-1.app.alpha.cairn", "10.20.0.1"]);
    let text = String::from_utf8_lossy(&ns.stdout);
    assert!(text.contains("10.20.0.16"), "DNS answers web-1: {text}");

    // A MAC that is not in the plan gets nothing.
    let (lease, _) = stranger.udhcpc();
    assert!(lease.is_none(), "an unplanned MAC got {lease:?}");

    // A NIC added to the plan: the hosts file is reloaded (no restart), and the
    // same MAC now gets its address.
    let before = pid(&node.dir);
    hosts.push(host(stranger_mac, 40, "late"));
    let spec = node.spec(1450, hosts.clone());
    assert_eq!(
        dhcp_drift(&node.ns, &node.dir, &spec),
        vec!["dhcp: static leases differ (2 kept, want 3)".to_owned()]
    );
    let made = converge_dhcp(&node.ns, &node.dir, &spec).expect("reload");
    assert!(
        made[0].contains("static leases reloaded (3 hosts)"),
        "{made:?}"
    );
    assert_eq!(pid(&node.dir), before, "reloaded, not restarted");
    let (lease, _) = stranger.udhcpc();
    assert_eq!(lease.expect("planned now").ip, "10.20.0.40");

    // A changed segment (MTU): restarted, and the next lease carries it.
    let spec = node.spec(1400, hosts.clone());
    assert_eq!(
        dhcp_drift(&node.ns, &node.dir, &spec),
        vec!["dhcp: configuration differs (gateway, prefix, MTU or upstream resolvers)".to_owned()]
    );
    let made = converge_dhcp(&node.ns, &node.dir, &spec).expect("restart");
    assert!(
        made.iter().any(|m| m.contains("configuration changed")),
        "{made:?}"
    );
    assert_ne!(pid(&node.dir), before);
    assert_eq!(web.udhcpc().0.expect("lease").mtu, "1400");

    // Killed (the fault itself, SIGKILL): drift, then repaired.
    let killed = pid(&node.dir);
    ok(&["kill", "-9", &killed.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(2);
    while dhcp_drift(&node.ns, &node.dir, &spec).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        dhcp_drift(&node.ns, &node.dir, &spec),
        vec!["dhcp: dnsmasq is not running".to_owned()]
    );
    assert!(web.udhcpc().0.is_none(), "no server, no lease");
    converge_dhcp(&node.ns, &node.dir, &spec).expect("repair");
    assert!(dhcp_drift(&node.ns, &node.dir, &spec).is_empty());
    assert_eq!(web.udhcpc().0.expect("repaired").ip, "10.20.0.15");

    // A NIC with a security group: its chain admits the gateway's DHCP answers
    // (they are not part of a tracked connection); without that rule the client
    // gets nothing, which shows the rule is what lets them in.
    let guarded = |dhcp_server: Option<Ipv4Addr>| FirewallSpec {
        nics: vec![GuardedNic {
            tap: web.tap.clone(),
            ipv4: Some(Ipv4Addr::new(10, 20, 0, 15)),
            rules: vec![],
            dhcp_server,
        }],
        zones: vec![Zone {
            id: zone_id("alpha", "app"),
            ports: vec![
                vxlan_name("alpha", "app"),
                network::overlay::gateway_leg_name("alpha", "app"),
                web.tap.clone(),
                stranger.tap.clone(),
            ],
        }],
        guests: vec![],
    };
    apply_firewall(&node.ns, &guarded(None)).expect("group without the DHCP rule");
    assert!(web.udhcpc().0.is_none(), "the group drops DHCP answers");
    apply_firewall(&node.ns, &guarded(Some(GW))).expect("group with it");
    assert_eq!(web.udhcpc().0.expect("admitted").ip, "10.20.0.15");
    assert!(
        !stranger
            .run(&["ping", "-c", "1", "-W", "1", "10.20.0.15"])
            .status
            .success(),
        "the group still drops the rest"
    );
    apply_firewall(&node.ns, &FirewallSpec::default()).expect("no groups");

    // The segment goes: the server stops and its files go.
    let last = pid(&node.dir);
    let stopped = stop_dhcp(&node.dir, "alpha", "app");
    assert_eq!(
        stopped,
        vec![format!("dhcp alpha/app: stopped dnsmasq {last}")]
    );
    assert!(
        !Path::new(&format!("/proc/{last}")).exists() || {
            std::fs::read_to_string(format!("/proc/{last}/cmdline"))
                .unwrap_or_default()
                .is_empty()
        }
    );
    assert!(network::dhcp::configured(&node.dir).is_empty());
    assert!(web.udhcpc().0.is_none());
}
