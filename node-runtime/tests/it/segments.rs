//! Tenant network segments through the node API (issue 19): two `cairn-node`
//! processes in two node namespaces on one switch, a built-in guest on one, probe
//! namespaces on the other's tenant bridge, VXLAN between them, a security group on
//! the guest's NIC, and the network's DHCP on n1 asked by a real client (busybox
//! udhcpc in a probe namespace with a defined VM's MAC). Namespaces are named `i-…`,
//! nodes listen on 127.0.0.94/95. Also a guest with a NIC moving live (`o-mig…`,
//! 127.0.0.91/92) and the outage a third node sees during such moves, with and
//! without make before break (`f-mv…`, 127.0.0.91-93).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use network::dev_cluster;
use proto::v1::{
    ApplyNetworkSegment, GuardedNic, SecurityRule, SegmentRemote, apply_request::Action,
};

use crate::harness::{apply_ok, controller};

struct Namespaces(String);

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = dev_cluster::teardown(&self.0);
    }
}

struct Node {
    client: proto::client::NodeClient,
    netns: String,
    _node: crate::harness::TestNode,
    dir: tempfile::TempDir,
}

impl Drop for Node {
    /// Stops the DHCP servers the node started (they outlive the agent by design,
    /// like its VMs).
    fn drop(&mut self) {
        let dir = self.dir.path().join("segments/dhcp");
        for (tenant, network) in network::dhcp::configured(&dir) {
            network::dhcp::stop_dhcp(&dir, &tenant, &network);
        }
    }
}

/// Node namespaces `PREFIXn1`, `PREFIXn2`, … on one switch, node i with
/// `vteps[i]`/24 on `nic0`; removed when the first value drops.
fn node_namespaces(prefix: &str, vteps: &[&str]) -> (Namespaces, Vec<String>) {
    let _ = dev_cluster::teardown(prefix);
    let cleanup = Namespaces(prefix.to_owned());
    let switch = dev_cluster::create_switch(prefix).expect("switch");
    let names = vteps
        .iter()
        .enumerate()
        .map(|(i, vtep)| {
            let name = format!("n{}", i + 1);
            let netns = format!("{prefix}{name}");
            let node = dev_cluster::add_node(&switch, &netns, &name, 1).expect("node namespace");
            let vtep: IpAddr = vtep.parse().unwrap();
            dev_cluster::add_address(&node.ns(), "nic0", vtep, 24).expect("underlay");
            netns
        })
        .collect();
    (cleanup, names)
}

async fn start(name: &str, netns: &str, listen: &str) -> Node {
    start_with(name, netns, listen, &[]).await
}

/// A node in `netns` with extra command-line arguments.
async fn start_with(name: &str, netns: &str, listen: &str, extra: &[&str]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    std::fs::write(
        dir.path().join("trusted-controllers"),
        format!("{}\n", controller.public_key_hex()),
    )
    .unwrap();
    let args: Vec<&str> = ["--netns", netns]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let node = crate::harness::TestNode::start_with_args(name, dir.path(), listen, &args);
    let client = node.client(&controller).await;
    Node {
        client,
        netns: netns.to_owned(),
        _node: node,
        dir,
    }
}

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("command runs")
}

/// A probe namespace on `node_ns`'s bridge of alpha/db with `mac` and `ip/24`.
fn probe(prefix: &str, node_ns: &str, name: &str, mac: &str, ip: &str) -> String {
    let netns = format!("{prefix}{name}");
    network::netns::create_netns(&netns).expect("probe netns");
    let bridge = network::tenant::tenant_bridge_name("alpha", "db");
    let port = format!("p{name}");
    for args in [
        vec![
            "ip", "-n", node_ns, "link", "add", &port, "mtu", "1450", "type", "veth", "peer",
            "name", "eth0", "netns", &netns,
        ],
        vec![
            "ip", "-n", node_ns, "link", "set", &port, "master", &bridge, "up",
        ],
        vec![
            "ip", "-n", &netns, "link", "set", "eth0", "address", mac, "mtu", "1450", "up",
        ],
        vec![
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ],
    ] {
        let out = run(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    netns
}

fn ping(netns: &str, to: &str) -> bool {
    run(&[
        "ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "1", to,
    ])
    .status
    .success()
}

fn segment(local: &str, remotes: Vec<SegmentRemote>, icmp_from: &str) -> ApplyNetworkSegment {
    ApplyNetworkSegment {
        tenant: "alpha".into(),
        network: "db".into(),
        vni: 6001,
        mtu: 0,
        local_vtep: local.into(),
        gateway: "10.30.0.1".into(),
        prefix_len: 24,
        remotes,
        guarded: vec![GuardedNic {
            vm: "db-1".into(),
            nic: 0,
            network: "db".into(),
            ipv4: "10.30.0.5".into(),
            groups: vec!["db".into()],
            allow: vec![SecurityRule {
                group: "db".into(),
                from_cidr: icmp_from.into(),
                proto: "icmp".into(),
                ..Default::default()
            }],
        }],
        external: false,
        ..Default::default()
    }
}

fn remote(vm: &str, mac: &str, ip: &str, vtep: &str) -> SegmentRemote {
    SegmentRemote {
        vm: vm.into(),
        mac: mac.into(),
        ipv4: ip.into(),
        vtep: vtep.into(),
        also_vtep: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_is_reached_over_vxlan_only_by_the_sources_its_group_allows() {
    if let Err(why) = network::netns_capability() {
        eprintln!("skipping: {why}");
        return;
    }
    if !crate::vms::vms_can_run() {
        return;
    }
    let prefix = format!("i-seg{}-", std::process::id() % 100_000);
    let (_cleanup, names) = node_namespaces(&prefix, &["192.168.42.1", "192.168.42.2"]);
    let mut n1 = start("n1", &names[0], "127.0.0.94:0").await;
    let mut n2 = start("n2", &names[1], "127.0.0.95:0").await;

    // The guest db-1 on n2 (its NIC at the segment MTU), started.
    let vm = guest_on_db("db-1", "10.30.0.5");
    apply_ok(&mut n2.client, "vm", Action::CreateVm(vm)).await;
    apply_ok(
        &mut n2.client,
        "vm-start",
        Action::StartVm(proto::v1::StartVm {
            name: "db-1".into(),
        }),
    )
    .await;
    let guest_mac = n2.client.observe().await.unwrap().vms[0].nics[0]
        .mac
        .clone();

    // Segments: n1 has no VM of its own; two probes on its bridge stand in for
    // another VM's NIC (allowed, 10.30.0.8) and any other source (10.30.0.9).
    let (mac_a, mac_b) = ("02:c0:00:00:00:08", "02:c0:00:00:00:09");
    let on_n1 = segment(
        "192.168.42.1",
        vec![remote("db-1", &guest_mac, "10.30.0.5", "192.168.42.2")],
        "10.30.0.8/32",
    );
    let on_n2 = segment(
        "192.168.42.2",
        vec![
            remote("probe-a", mac_a, "10.30.0.8", "192.168.42.1"),
            remote("probe-b", mac_b, "10.30.0.9", "192.168.42.1"),
        ],
        "10.30.0.8/32",
    );
    apply_ok(
        &mut n1.client,
        "seg",
        Action::ApplyNetworkSegment(on_n1.clone()),
    )
    .await;
    let programmed = Instant::now();
    apply_ok(
        &mut n2.client,
        "seg",
        Action::ApplyNetworkSegment(on_n2.clone()),
    )
    .await;
    eprintln!(
        "segment and group applied on n2 in {:?}",
        programmed.elapsed()
    );
    let a = probe(&prefix, &n1.netns, "pa", mac_a, "10.30.0.8");
    let b = probe(&prefix, &n1.netns, "pb", mac_b, "10.30.0.9");

    let deadline = Instant::now() + Duration::from_secs(10);
    while !ping(&a, "10.30.0.5") {
        assert!(
            Instant::now() < deadline,
            "allowed probe never reached the guest over VXLAN"
        );
    }
    assert!(!ping(&b, "10.30.0.5"), "the group drops the other source");
    assert!(
        ping(&b, "10.30.0.1") && ping(&a, "10.30.0.1"),
        "the gateway answers on n1"
    );

    let observed = n2.client.observe().await.unwrap().networking.unwrap();
    assert_eq!(observed.segments.len(), 1);
    let seg = &observed.segments[0];
    assert!(seg.drift.is_empty(), "{:?}", seg.drift);
    assert_eq!((seg.vni, seg.mtu), (6001, 1450));
    assert_eq!(seg.fdb.len(), 2, "{:?}", seg.fdb);
    assert!(
        observed.firewall_drift.is_empty(),
        "{:?}",
        observed.firewall_drift
    );

    // The group's rule deleted by hand on n2: Observe reports it, the probe is cut
    // off, the same segment again repairs it.
    let chain = format!("nic_{}", network::tenant::vm_tap_name("db-1", 0));
    let listed = run(&[
        "ip", "netns", "exec", &n2.netns, "nft", "-a", "list", "chain", "inet", "cairn_sg", &chain,
    ]);
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    let handle = text
        .lines()
        .find(|l| l.contains("10.30.0.8") && l.contains("icmp"))
        .and_then(|l| l.rsplit("handle ").next())
        .unwrap_or_else(|| panic!("the icmp rule in {text}"))
        .trim()
        .to_owned();
    let out = run(&[
        "ip", "netns", "exec", &n2.netns, "nft", "delete", "rule", "inet", "cairn_sg", &chain,
        "handle", &handle,
    ]);
    assert!(out.status.success());
    let drift = n2
        .client
        .observe()
        .await
        .unwrap()
        .networking
        .unwrap()
        .firewall_drift;
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert!(
        drift[0].contains("rule missing") && drift[0].contains("allow icmp from 10.30.0.8/32"),
        "{drift:?}"
    );
    assert!(!ping(&a, "10.30.0.5"), "the deletion took effect");
    apply_ok(
        &mut n2.client,
        "seg-repair",
        Action::ApplyNetworkSegment(on_n2.clone()),
    )
    .await;
    assert!(
        n2.client
            .observe()
            .await
            .unwrap()
            .networking
            .unwrap()
            .firewall_drift
            .is_empty()
    );
    assert!(ping(&a, "10.30.0.5"), "repaired");

    dhcp_on_n1(&prefix, &mut n1, &on_n1).await;

    // A segment that would fragment over the 1500-byte underlay is refused, named.
    let mut too_big = on_n1.clone();
    too_big.mtu = 1500;
    let refused = n1
        .client
        .apply(crate::harness::request(
            "seg-big",
            Action::ApplyNetworkSegment(too_big),
        ))
        .await
        .unwrap_err();
    assert!(
        refused
            .message()
            .contains("segment MTU 1500 does not fit underlay device nic0"),
        "{}",
        refused.message()
    );
}

/// A built-in guest of tenant alpha with one NIC on db at the segment MTU.
fn guest_on_db(name: &str, ipv4: &str) -> proto::v1::CreateVm {
    proto::v1::CreateVm {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 32 << 20,
        image: Some(proto::v1::create_vm::Image::Builtin("cairn-guest".into())),
        tenant: "alpha".into(),
        nics: vec![proto::v1::VmNic {
            network: "db".into(),
            mtu: 1450,
            ipv4: ipv4.into(),
        }],
        ..Default::default()
    }
}

/// Runs busybox udhcpc once in `netns` (2 discovers 1 s apart); the lease's
/// `ip router mtu` when one came.
fn udhcpc(netns: &str, scratch: &std::path::Path) -> Option<String> {
    let script = scratch.join("udhcpc.sh");
    let out = scratch.join("udhcpc.out");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"$ip $router $mtu\" > {}\nexit 0\n",
            out.display()
        ),
    )
    .unwrap();
    assert!(
        run(&["chmod", "+x", script.to_str().unwrap()])
            .status
            .success()
    );
    let _ = std::fs::remove_file(&out);
    let status = run(&[
        "ip",
        "netns",
        "exec",
        netns,
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-f",
        "-t",
        "2",
        "-T",
        "1",
        "-O",
        "mtu",
        "-s",
        script.to_str().unwrap(),
    ]);
    status.status.success().then(|| {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .trim()
            .to_owned()
    })
}

/// DHCP through the node API: a VM defined on n1 (not started) is a static lease
/// of n1's server for alpha/db; a probe with its MAC on n1's bridge gets its address,
/// the gateway and the segment MTU. dnsmasq killed is drift in Observe, repaired by
/// the same segment; the segment deleted stops it.
async fn dhcp_on_n1(prefix: &str, n1: &mut Node, on_n1: &ApplyNetworkSegment) {
    if network::dhcp::dnsmasq_binary().is_none()
        || std::process::Command::new("busybox")
            .arg("--help")
            .output()
            .is_err()
    {
        eprintln!("skipping the DHCP part: dnsmasq (dnsmasq-base) or busybox is not installed");
        return;
    }
    let vm = guest_on_db("app-1", "10.30.0.20");
    apply_ok(&mut n1.client, "vm-app", Action::CreateVm(vm)).await;
    let mac = node_runtime::vm_nics::mac("app-1", 0);
    // The probe stands in for app-1's NIC: its MAC, no address.
    let netns = format!("{prefix}app1");
    network::netns::create_netns(&netns).expect("probe netns");
    let bridge = network::tenant::tenant_bridge_name("alpha", "db");
    for args in [
        vec![
            "ip", "-n", &n1.netns, "link", "add", "papp1", "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ],
        vec![
            "ip", "-n", &n1.netns, "link", "set", "papp1", "master", &bridge, "up",
        ],
        vec![
            "ip", "-n", &netns, "link", "set", "eth0", "address", &mac, "up",
        ],
    ] {
        assert!(run(&args).status.success(), "{args:?}");
    }
    let scratch = tempfile::tempdir().unwrap();
    let started = Instant::now();
    assert_eq!(
        udhcpc(&netns, scratch.path()).as_deref(),
        Some("10.30.0.20 10.30.0.1 1450"),
        "app-1's planned address, the gateway and the segment MTU"
    );
    eprintln!("lease through the node's DHCP in {:?}", started.elapsed());
    let drift = |o: proto::v1::ObserveResponse| o.networking.unwrap().segments[0].drift.clone();
    assert_eq!(
        drift(n1.client.observe().await.unwrap()),
        Vec::<String>::new()
    );

    // The fault: dnsmasq killed. Observe reports it; the same segment repairs it.
    let pid_file = n1.dir.path().join("segments/dhcp/alpha.db.pid");
    let pid = std::fs::read_to_string(&pid_file).expect("pid file");
    assert!(run(&["kill", "-9", pid.trim()]).status.success());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let d = drift(n1.client.observe().await.unwrap());
        if d == vec!["dhcp: dnsmasq is not running".to_owned()] {
            break;
        }
        assert!(Instant::now() < deadline, "drift never reported: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(udhcpc(&netns, scratch.path()), None, "no server, no lease");
    apply_ok(
        &mut n1.client,
        "seg-dhcp-repair",
        Action::ApplyNetworkSegment(on_n1.clone()),
    )
    .await;
    assert_eq!(
        drift(n1.client.observe().await.unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        udhcpc(&netns, scratch.path()).as_deref(),
        Some("10.30.0.20 10.30.0.1 1450")
    );

    // The segment goes: its server stops.
    let pid = std::fs::read_to_string(&pid_file).expect("pid file");
    apply_ok(
        &mut n1.client,
        "seg-delete",
        Action::DeleteNetworkSegment(proto::v1::DeleteNetworkSegment {
            tenant: "alpha".into(),
            network: "db".into(),
        }),
    )
    .await;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("dnsmasq"),
        "dnsmasq {pid} still runs"
    );
    assert!(!pid_file.exists());
}

/// Issue 17: a VM with NICs moves live between two nodes that run their network in
/// named namespaces. Each reports its migration address there (n1 from
/// `--migration-address`, a device of its namespace holding it; n2 from its
/// segment's underlay address, and none before it has a segment); the destination
/// listens on it, the source's VMM (in its namespace) sends to it over the
/// underlay, and after the commit and the segments re-pointed, a probe on n2's
/// bridge reaches the guest, now on n1, over VXLAN. Nodes on 127.0.0.91/92
/// (helper O's range), namespaces `o-mig…`.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_with_a_nic_moves_live_and_is_reached_on_its_network_after() {
    if let Err(why) = network::netns_capability() {
        eprintln!("skipping: {why}");
        return;
    }
    if !crate::vms::vms_can_run() {
        return;
    }
    let prefix = format!("o-mig{}-", std::process::id() % 100_000);
    let _ = dev_cluster::teardown(&prefix);
    let _cleanup = Namespaces(prefix.clone());
    let switch = dev_cluster::create_switch(&prefix).expect("switch");
    let mut names = Vec::new();
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        let netns = format!("{prefix}{name}");
        let node = dev_cluster::add_node(&switch, &netns, name, 1).expect("node namespace");
        let vtep: IpAddr = format!("192.168.43.{}", i + 1).parse().unwrap();
        dev_cluster::add_address(&node.ns(), "nic0", vtep, 24).expect("underlay");
        names.push(netns);
    }
    let start_n1 = async {
        let dir = tempfile::tempdir().unwrap();
        let controller = controller();
        std::fs::write(
            dir.path().join("trusted-controllers"),
            format!("{}\n", controller.public_key_hex()),
        )
        .unwrap();
        let node = crate::harness::TestNode::start_with_args(
            "n1",
            dir.path(),
            "127.0.0.91:0",
            &["--netns", &names[0], "--migration-address", "192.168.43.1"],
        );
        let client = node.client(&controller).await;
        Node {
            client,
            netns: names[0].clone(),
            _node: node,
            dir,
        }
    };
    let mut n1 = start_n1.await;
    let mut n2 = start("n2", &names[1], "127.0.0.92:0").await;
    let address = |o: proto::v1::ObserveResponse| o.networking.unwrap().migration_address;
    assert_eq!(address(n1.client.observe().await.unwrap()), "192.168.43.1");
    assert_eq!(
        address(n2.client.observe().await.unwrap()),
        "",
        "n2's --migration-address is its loopback gRPC host, not in its namespace, and it has no segment yet"
    );

    // db-1 runs on n2; both nodes have the segment (n1 the destination's bridge).
    let probe_mac = "02:c0:00:00:00:08";
    apply_ok(
        &mut n1.client,
        "seg",
        Action::ApplyNetworkSegment(segment("192.168.43.1", vec![], "10.30.0.0/24")),
    )
    .await;
    apply_ok(
        &mut n2.client,
        "seg",
        Action::ApplyNetworkSegment(segment("192.168.43.2", vec![], "10.30.0.0/24")),
    )
    .await;
    apply_ok(
        &mut n2.client,
        "vm",
        Action::CreateVm(guest_on_db("db-1", "10.30.0.5")),
    )
    .await;
    apply_ok(
        &mut n2.client,
        "vm-start",
        Action::StartVm(proto::v1::StartVm {
            name: "db-1".into(),
        }),
    )
    .await;
    assert_eq!(address(n2.client.observe().await.unwrap()), "192.168.43.2");
    let guest_mac = n2.client.observe().await.unwrap().vms[0].nics[0]
        .mac
        .clone();

    // The commander's sequence, as the controller runs it (reconciler::migrate).
    let (listen, ready) = migrate(&mut n2, &mut n1, "db-1", "10.30.0.5", "mig").await;
    assert!(listen.starts_with("192.168.43.1:"), "{listen}");
    let on_n1 = n1.client.observe().await.unwrap().vms;
    assert_eq!(on_n1.len(), 1);
    assert_eq!(on_n1[0].state, proto::v1::VmState::Running as i32);
    assert_eq!(on_n1[0].nics[0].mac, guest_mac, "the same NIC");
    eprintln!(
        "db-1 moved live n2 -> n1: {} rounds, paused {} ms, total {} ms",
        ready.rounds, ready.paused_ms, ready.total_ms
    );

    // The plan's next segments: db-1 local on n1, remote on n2 at n1's VTEP.
    apply_ok(
        &mut n1.client,
        "seg-2",
        Action::ApplyNetworkSegment(segment(
            "192.168.43.1",
            vec![remote("probe", probe_mac, "10.30.0.8", "192.168.43.2")],
            "10.30.0.0/24",
        )),
    )
    .await;
    apply_ok(
        &mut n2.client,
        "seg-2",
        Action::ApplyNetworkSegment(segment(
            "192.168.43.2",
            vec![remote("db-1", &guest_mac, "10.30.0.5", "192.168.43.1")],
            "10.30.0.0/24",
        )),
    )
    .await;
    let p = probe(&prefix, &n2.netns, "pr", probe_mac, "10.30.0.8");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ping(&p, "10.30.0.5") {
        assert!(
            Instant::now() < deadline,
            "the probe on n2 never reached the migrated guest on n1 over VXLAN"
        );
    }
    crate::harness::kill_vmms_of(n1.dir.path());
    crate::harness::kill_vmms_of(n2.dir.path());
}

/// How the other nodes' entries follow a VM that migrates live.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Entries {
    /// Re-pointed after the migration (the order before make before break).
    After,
    /// Make before break: a third node sends to both nodes during the migration.
    Both,
}

/// What a pinger on a third node saw of a live move.
struct Outage {
    /// The longest time between two answered pings, ms.
    gap_ms: f64,
    /// Pings sent and not answered.
    lost: usize,
    paused_ms: f64,
}

/// Issue 19: the client-visible outage of a live migration with a NIC, seen from
/// a third node. Guests move live between n1 and n2 (real cairn-nodes on
/// 127.0.0.91-93 in namespaces `f-mv…`, underlay 192.168.44.x); a probe on n3
/// pings it every 5 ms throughout. Each move runs the commander's sequence with the
/// segments in the reconciler's order, alternately the order before make before
/// break (n3's entry re-pointed once the migration ended) and with it (n3 sends
/// to both nodes from before the migration until after it). Prints each move's
/// longest gap between answers and the lost pings, and the medians; asserts
/// that both entries lose fewer pings (the requests wait for the guest on its new
/// node instead of going to the one it left) and that the probe reaches the guest
/// after every move.
#[tokio::test(flavor = "multi_thread")]
async fn the_outage_a_third_node_sees_during_a_live_move_with_a_nic() {
    if let Err(why) = network::netns_capability() {
        eprintln!("skipping: {why}");
        return;
    }
    if !crate::vms::vms_can_run() {
        return;
    }
    let prefix = format!("f-mv{}-", std::process::id() % 100_000);
    let vteps = ["192.168.44.1", "192.168.44.2", "192.168.44.3"];
    let (_cleanup, names) = node_namespaces(&prefix, &vteps);
    let mut nodes = vec![
        start_with(
            "n1",
            &names[0],
            "127.0.0.91:0",
            &["--migration-address", vteps[0]],
        )
        .await,
        start_with(
            "n2",
            &names[1],
            "127.0.0.92:0",
            &["--migration-address", vteps[1]],
        )
        .await,
    ];
    let mut n3 = start("n3", &names[2], "127.0.0.93:0").await;
    let probe_mac = "02:c0:00:00:00:09";
    let probe_remote = || remote("probe", probe_mac, "10.30.0.8", vteps[2]);
    let icmp = "10.30.0.0/24";
    for (i, node) in nodes.iter_mut().enumerate() {
        apply_ok(
            &mut node.client,
            "seg",
            Action::ApplyNetworkSegment(segment(vteps[i], vec![probe_remote()], icmp)),
        )
        .await;
    }
    apply_ok(
        &mut n3.client,
        "seg",
        Action::ApplyNetworkSegment(segment(vteps[2], vec![], icmp)),
    )
    .await;
    let p = probe(&prefix, &n3.netns, "pr", probe_mac, "10.30.0.8");
    let mut seen: Vec<(Entries, Outage)> = Vec::new();
    // Two guests, three moves each (n2 -> n1 -> n2 -> n1), the orders alternating
    // and the second guest starting with the other one: 3 moves of each order. (A
    // guest entering the same node a third time stayed "starting" here: see the
    // report of session 12, helper F.)
    let mut round = 0;
    for (k, (vm, ip)) in [("db-1", "10.30.0.5"), ("db-2", "10.30.0.6")]
        .into_iter()
        .enumerate()
    {
        let db = |mac: &str, vtep: &str| remote(vm, mac, ip, vtep);
        apply_ok(
            &mut nodes[1].client,
            &format!("{vm}-create"),
            Action::CreateVm(guest_on_db(vm, ip)),
        )
        .await;
        apply_ok(
            &mut nodes[1].client,
            &format!("{vm}-start"),
            Action::StartVm(proto::v1::StartVm { name: vm.into() }),
        )
        .await;
        let mac = nodes[1].client.observe().await.unwrap().vms[0].nics[0]
            .mac
            .clone();
        apply_ok(
            &mut n3.client,
            &format!("{vm}-seg"),
            Action::ApplyNetworkSegment(segment(vteps[2], vec![db(&mac, vteps[1])], icmp)),
        )
        .await;
        apply_ok(
            &mut nodes[0].client,
            &format!("{vm}-seg-0"),
            Action::ApplyNetworkSegment(segment(
                vteps[0],
                vec![probe_remote(), db(&mac, vteps[1])],
                icmp,
            )),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(&p, ip) {
            assert!(
                Instant::now() < deadline,
                "the probe on n3 never reached {vm} on n2"
            );
        }
        let mut on = 1; // the guest's node
        for move_ in 0..3 {
            let mode = if (move_ + k) % 2 == 0 {
                Entries::After
            } else {
                Entries::Both
            };
            let to = 1 - on;
            let tag = format!("r{round}");
            let pinger = Pinger::start(&p, ip);
            // Wave 0: the destination's own segment (the guest local there), and
            // with make before break n3 sending to both.
            apply_ok(
                &mut nodes[to].client,
                &format!("{tag}-seg-dst"),
                Action::ApplyNetworkSegment(segment(vteps[to], vec![probe_remote()], icmp)),
            )
            .await;
            if mode == Entries::Both {
                let mut both = db(&mac, vteps[to]);
                both.also_vtep = vteps[on].into();
                apply_ok(
                    &mut n3.client,
                    &format!("{tag}-seg-n3-both"),
                    Action::ApplyNetworkSegment(segment(vteps[2], vec![both], icmp)),
                )
                .await;
            }
            let (a, b) = nodes.split_at_mut(1);
            let (src, dst) = if on == 0 {
                (&mut a[0], &mut b[0])
            } else {
                (&mut b[0], &mut a[0])
            };
            let paused_ms = migrate(src, dst, vm, ip, &tag).await.1.paused_ms;
            // After the migrate_vm step: n3 and the node it left point at its new node.
            apply_ok(
                &mut n3.client,
                &format!("{tag}-seg-n3"),
                Action::ApplyNetworkSegment(segment(vteps[2], vec![db(&mac, vteps[to])], icmp)),
            )
            .await;
            apply_ok(
                &mut nodes[on].client,
                &format!("{tag}-seg-src"),
                Action::ApplyNetworkSegment(segment(
                    vteps[on],
                    vec![probe_remote(), db(&mac, vteps[to])],
                    icmp,
                )),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (gap_ms, lost) = pinger.stop();
            eprintln!(
                "move {round} of {vm} n{} -> n{} entries {mode:?}: longest gap {gap_ms:.1} ms, {lost} pings lost, paused {paused_ms:.1} ms",
                on + 1,
                to + 1
            );
            seen.push((
                mode,
                Outage {
                    gap_ms,
                    lost,
                    paused_ms,
                },
            ));
            on = to;
            round += 1;
            let deadline = Instant::now() + Duration::from_secs(5);
            while !ping(&p, ip) {
                assert!(
                    Instant::now() < deadline,
                    "the probe lost {vm} after move {round}"
                );
            }
        }
        apply_ok(
            &mut nodes[on].client,
            &format!("{vm}-delete"),
            Action::DeleteVm(proto::v1::DeleteVm { name: vm.into() }),
        )
        .await;
    }
    let rounds = round;
    let median = |mode: Entries, f: &dyn Fn(&Outage) -> f64| {
        let mut v: Vec<f64> = seen
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, o)| f(o))
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (after_gap, both_gap) = (
        median(Entries::After, &|o| o.gap_ms),
        median(Entries::Both, &|o| o.gap_ms),
    );
    eprintln!(
        "outage seen from n3 over {rounds} live moves, medians: entries after the migration {after_gap:.1} ms ({} pings lost), both during it {both_gap:.1} ms ({} lost); ratio {:.2}; paused {:.1} ms",
        median(Entries::After, &|o| o.lost as f64),
        median(Entries::Both, &|o| o.lost as f64),
        both_gap / after_gap,
        median(Entries::Both, &|o| o.paused_ms),
    );
    // Frames to the node the guest left are lost; with both entries every ping is
    // answered, late by the time the guest ran nowhere (the pause and the commit).
    assert!(
        median(Entries::Both, &|o| o.lost as f64) < median(Entries::After, &|o| o.lost as f64),
        "make before break lost as many pings"
    );
    for n in &nodes {
        crate::harness::kill_vmms_of(n.dir.path());
    }
}

/// Pings `to` from a probe namespace every 5 ms with timestamps until stopped.
struct Pinger {
    child: std::process::Child,
}

impl Pinger {
    fn start(netns: &str, to: &str) -> Self {
        let child = std::process::Command::new("ip")
            .args([
                "netns", "exec", netns, "ping", "-D", "-i", "0.005", "-W", "1", to,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ping runs");
        // Answers flow before anything changes.
        std::thread::sleep(Duration::from_millis(200));
        Self { child }
    }

    /// Stops it; the longest time between two answers (ms) and the pings sent
    /// before the last answer that got none.
    fn stop(self) -> (f64, usize) {
        // SAFETY: kill takes a pid and a signal number; it has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let out = self.child.wait_with_output().expect("ping ends");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut answers: Vec<(f64, u64)> = text
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| {
                let t = l
                    .strip_prefix('[')?
                    .split(']')
                    .next()?
                    .parse::<f64>()
                    .ok()?;
                let seq = l
                    .split("icmp_seq=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                Some((t, seq))
            })
            .collect();
        answers.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(answers.len() > 10, "too few answers: {text}");
        let gap = answers
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * 1000.0)
            .fold(0.0, f64::max);
        let last = answers.iter().map(|a| a.1).max().unwrap_or(0);
        let got: std::collections::BTreeSet<u64> = answers.iter().map(|a| a.1).collect();
        let lost = (1..=last).filter(|s| !got.contains(s)).count();
        (gap, lost)
    }
}

/// The commander's sequence of a live migration (reconciler::migrate): `vm` from
/// `src` to `dst`, returning where `dst` listened and the source's result.
async fn migrate(
    src: &mut Node,
    dst: &mut Node,
    vm: &str,
    ip: &str,
    tag: &str,
) -> (String, proto::v1::MigrationResult) {
    apply_ok(
        &mut dst.client,
        &format!("{tag}-create"),
        Action::CreateVm(guest_on_db(vm, ip)),
    )
    .await;
    let prepared = apply_ok(
        &mut dst.client,
        &format!("{tag}-prepare"),
        Action::PrepareIncomingVm(proto::v1::PrepareIncomingVm { name: vm.into() }),
    )
    .await;
    let Some(proto::v1::apply_response::Result::Incoming(incoming)) = prepared.result else {
        panic!("not an incoming result: {prepared:?}");
    };
    let migrated = apply_ok(
        &mut src.client,
        &format!("{tag}-migrate"),
        Action::MigrateVm(proto::v1::MigrateVm {
            name: vm.into(),
            to: incoming.listen_address.clone(),
            max_downtime_ms: 50,
            stop_and_copy: false,
            timeout_ms: 0,
        }),
    )
    .await;
    let Some(proto::v1::apply_response::Result::Migration(ready)) = migrated.result else {
        panic!("not a migration result: {migrated:?}");
    };
    assert_eq!(ready.phase, "ready-to-commit", "{ready:?}");
    let commit = || Action::CommitMigration(proto::v1::CommitMigration { name: vm.into() });
    let (mut sc, mut dc) = (src.client.clone(), dst.client.clone());
    let tag_s = format!("{tag}-commit-src");
    let tag_d = format!("{tag}-commit-dst");
    // The destination first, then the source. (Told both at once, as
    // reconciler::migrate does, the destination here sometimes started on the
    // source's word first, refused its own CommitMigration ("cannot commit a
    // migration whose destination is committed") and stayed "starting".)
    apply_ok(&mut dc, &tag_d, commit()).await;
    apply_ok(&mut sc, &tag_s, commit()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let vms = dst.client.observe().await.unwrap().vms;
        if vms
            .iter()
            .any(|v| v.name == vm && v.state == proto::v1::VmState::Running as i32)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{vm} does not run on the destination: {vms:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    apply_ok(
        &mut src.client,
        &format!("{tag}-delete"),
        Action::DeleteVm(proto::v1::DeleteVm { name: vm.into() }),
    )
    .await;
    (incoming.listen_address, ready)
}
