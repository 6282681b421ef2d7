//! Helpers shared by the overlay tests (`overlay.rs`) and the overlay benchmark
//! (`network/benches/overlay.rs`, which includes this file by path): three node
//! namespaces on one switch, probe namespaces standing in for VMs, traffic tools.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use network::NetNs;
use network::dev_cluster::{self, DevNode};
use network::overlay::{Gateway, RemoteNic, SegmentSpec, format_mac};
use network::secgroup::{AllowRule, Prefix, Proto};
use network::tenant::{ensure_tenant_bridge, tenant_bridge_name, vm_tap_name};

pub static NEXT: AtomicU32 = AtomicU32::new(0);

/// Three node namespaces on one switch, each with `nic0` holding its underlay
/// address 192.168.41.N/24 (MTU 1500). Everything is named `i-…` and removed on drop.
pub struct Cluster {
    pub prefix: String,
    pub nodes: Vec<DevNode>,
}

impl Cluster {
    pub fn new() -> Self {
        Self::named("i-ov")
    }

    /// The same with namespaces named `<tag><pid>x<n>-…`.
    pub fn named(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{tag}{}x{n}-", std::process::id() % 100_000);
        let _ = dev_cluster::teardown(&prefix);
        let switch = dev_cluster::create_switch(&prefix).expect("switch");
        let nodes = (1..=3)
            .map(|i| {
                let node =
                    dev_cluster::add_node(&switch, &format!("{prefix}n{i}"), &format!("n{i}"), 1)
                        .expect("node");
                dev_cluster::add_address(&node.ns(), "nic0", IpAddr::V4(vtep(i)), 24)
                    .expect("underlay address");
                node
            })
            .collect();
        Self { prefix, nodes }
    }

    pub fn ns(&self, i: usize) -> NetNs {
        self.nodes[i - 1].ns()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = dev_cluster::teardown(&self.prefix) {
            eprintln!("teardown of {} failed: {e}", self.prefix);
        }
    }
}

pub fn vtep(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 41, i as u8)
}

pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command")
}

pub fn ok(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A probe "VM": namespace `<prefix>vm-<name>`, eth0 with `mac` and `ip/24`,
/// default route via `gw`; the node side is a veth named like the VM's tap,
/// on the tenant network's bridge.
pub struct Probe {
    pub netns: String,
    pub tap: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

pub fn probe_mac(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = h.to_be_bytes();
    [0x02, 0xc0, b[0], b[1], b[2], b[3]]
}

pub fn probe(
    c: &Cluster,
    node: usize,
    name: &str,
    tenant: &str,
    network: &str,
    ip: Ipv4Addr,
) -> Probe {
    let ns = c.ns(node);
    ensure_tenant_bridge(&ns, tenant, network, 1450).expect("bridge");
    let netns = format!("{}vm-{name}", c.prefix);
    network::netns::create_netns(&netns).expect("probe netns");
    let tap = vm_tap_name(name, 0);
    let mac = probe_mac(name);
    let node_ns = ns.name().unwrap().to_owned();
    let gw = Ipv4Addr::new(ip.octets()[0], ip.octets()[1], ip.octets()[2], 1).to_string();
    attach_nic(
        &node_ns,
        &tap,
        &netns,
        &tenant_bridge_name(tenant, network),
        &mac,
    );
    ok(&[
        "ip",
        "-n",
        &netns,
        "addr",
        "add",
        &format!("{ip}/24"),
        "dev",
        "eth0",
    ]);
    ok(&["ip", "-n", &netns, "route", "add", "default", "via", &gw]);
    Probe {
        netns,
        tap,
        mac,
        ip,
    }
}

/// A veth from the node namespace's `bridge` (node side named `tap`, like a VM's
/// tap) to `eth0` in `netns` with `mac`, MTU 1450, both up.
pub fn attach_nic(node_ns: &str, tap: &str, netns: &str, bridge: &str, mac: &[u8; 6]) {
    ok(&[
        "ip", "-n", node_ns, "link", "add", tap, "mtu", "1450", "type", "veth", "peer", "name",
        "eth0", "netns", netns,
    ]);
    ok(&[
        "ip", "-n", node_ns, "link", "set", tap, "master", bridge, "up",
    ]);
    ok(&[
        "ip",
        "-n",
        netns,
        "link",
        "set",
        "eth0",
        "address",
        &format_mac(mac),
        "mtu",
        "1450",
        "up",
    ]);
}

pub fn remove_probe(c: &Cluster, node: usize, p: &Probe) {
    let node_ns = c.ns(node).name().unwrap().to_owned();
    let _ = sh(&["ip", "-n", &node_ns, "link", "del", &p.tap]);
    network::netns::delete_netns(&p.netns).expect("delete probe netns");
}

pub fn ping(from: &Probe, to: Ipv4Addr) -> bool {
    ping_addr(from, &to.to_string())
}

/// One ping (IPv4 or IPv6, `ADDR%eth0` for a link-local one), 1 s to answer.
pub fn ping_addr(from: &Probe, to: &str) -> bool {
    sh(&[
        "ip",
        "netns",
        "exec",
        &from.netns,
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        to,
    ])
    .status
    .success()
}

/// Pings until one answer arrives or `within` passes.
pub fn ping_within(from: &Probe, to: Ipv4Addr, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if ping(from, to) {
            return true;
        }
    }
    false
}

pub fn neighbour_mac(p: &Probe, ip: Ipv4Addr) -> String {
    let out = sh(&["ip", "-n", &p.netns, "neigh", "show", &ip.to_string()]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

pub fn remote(p: &Probe, node: usize) -> RemoteNic {
    RemoteNic {
        mac: p.mac,
        ipv4: Some(p.ip),
        vtep: vtep(node),
        also_vtep: None,
    }
}

pub fn segment(
    tenant: &str,
    network: &str,
    vni: u32,
    node: usize,
    gw: Ipv4Addr,
    remotes: Vec<RemoteNic>,
) -> SegmentSpec {
    SegmentSpec {
        tenant: tenant.into(),
        network: network.into(),
        vni,
        mtu: 1450,
        local_vtep: vtep(node),
        gateway: Some(Gateway {
            address: gw,
            prefix_len: 24,
            ipv6: None,
        }),
        remotes,
    }
}

/// Polls `cond` every 50 ms until it holds (true) or `within` passes (false).
pub fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// Accepts connections on `ip:port` inside the probe's namespace until dropped.
pub fn listen(p: &Probe, port: u16) -> TcpListener {
    listen_at(&p.netns, SocketAddr::from((p.ip, port)))
}

/// Accepts connections on `addr` inside namespace `netns` until dropped.
pub fn listen_at(netns: &str, addr: SocketAddr) -> TcpListener {
    let l = NetNs::named(netns.to_owned())
        .run(move || TcpListener::bind(addr))
        .expect("enter probe")
        .expect("bind");
    let accept = l.try_clone().expect("clone listener");
    std::thread::spawn(move || {
        for s in accept.incoming() {
            drop(s);
        }
    });
    l
}

pub fn connects(from: &Probe, to: Ipv4Addr, port: u16) -> bool {
    let addr = SocketAddr::from((to, port));
    NetNs::named(from.netns.clone())
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(700)).is_ok())
        .expect("enter probe")
}

pub fn db_rule(port: u16) -> AllowRule {
    AllowRule {
        group: "db".into(),
        from: Prefix::parse("10.20.0.0/24").unwrap(),
        to: None,
        proto: Proto::Tcp,
        ports: Some((port, port)),
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Round-trip times of `count` pings, in milliseconds.
pub fn rtts(from: &str, to: Ipv4Addr, count: u32) -> Vec<f64> {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        from,
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        "0.01",
        "-W",
        "1",
        &to.to_string(),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches(" ms").parse().ok())
        .collect()
}

/// iperf3 from `client` to `server_ip` (server in `server`), 2 s, Gbit/s received.
pub fn iperf(server: &str, client: &str, server_ip: Ipv4Addr) -> f64 {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", server, "iperf3", "-s", "-1", "-p", "5201"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        client,
        "iperf3",
        "-J",
        "-t",
        "2",
        "-p",
        "5201",
        "-c",
        &server_ip.to_string(),
    ]);
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

/// A probe NIC and its DHCP client's files.
pub struct Nic {
    pub netns: String,
    pub tap: String,
    pub script: PathBuf,
    pub out: PathBuf,
}

/// What a client got: the environment udhcpc gave its script on `bound`.
#[derive(Debug, Default)]
pub struct Lease {
    pub ip: String,
    pub subnet: String,
    pub router: String,
    pub dns: String,
    pub lease: String,
    pub mtu: String,
    pub hostname: String,
}

impl Nic {
    /// Runs `busybox udhcpc` once (2 discovers, 1 s apart); on a lease its script
    /// puts the address on eth0, as a guest's client would. Returns the lease and
    /// the time the client took.
    pub fn udhcpc(&self) -> (Option<Lease>, Duration) {
        std::fs::write(
            &self.script,
            format!(
                "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\n\
                 echo \"ip=$ip\nsubnet=$subnet\nrouter=$router\ndns=$dns\nlease=$lease\nmtu=$mtu\nhostname=$hostname\" > {out}\n\
                 ip -4 addr flush dev $interface\nip addr add $ip/$mask dev $interface\n",
                out = self.out.display()
            ),
        )
        .expect("script");
        ok(&["chmod", "+x", self.script.to_str().unwrap()]);
        let _ = std::fs::remove_file(&self.out);
        let start = Instant::now();
        let status = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "busybox",
                "udhcpc",
                "-i",
                "eth0",
            ])
            .args([
                "-n", "-q", "-f", "-t", "2", "-T", "1", "-O", "mtu", "-O", "hostname",
            ])
            .arg("-s")
            .arg(&self.script)
            .output()
            .expect("udhcpc");
        let took = start.elapsed();
        if !status.status.success() {
            return (None, took);
        }
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_default()
                .to_owned()
        };
        (
            Some(Lease {
                ip: get("ip"),
                subnet: get("subnet"),
                router: get("router"),
                dns: get("dns"),
                lease: get("lease"),
                mtu: get("mtu"),
                hostname: get("hostname"),
            }),
            took,
        )
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(args)
            .output()
            .expect("run in probe")
    }
}
