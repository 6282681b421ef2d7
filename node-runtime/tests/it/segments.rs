//! Tenant network segments through the node API (issue 19): two `cairn-node`
//! processes in two node namespaces on one switch, a built-in guest on one, probe
//! namespaces on the other's tenant bridge, VXLAN between them, a security group on
//! the guest's NIC. Namespaces are named `c-…`, nodes listen on 127.0.0.41/42.

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
    _dir: tempfile::TempDir,
}

async fn start(name: &str, netns: &str, listen: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    std::fs::write(
        dir.path().join("trusted-controllers"),
        format!("{}\n", controller.public_key_hex()),
    )
    .unwrap();
    let node =
        crate::harness::TestNode::start_with_args(name, dir.path(), listen, &["--netns", netns]);
    let client = node.client(&controller).await;
    Node {
        client,
        netns: netns.to_owned(),
        _node: node,
        _dir: dir,
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
    let prefix = format!("c-seg{}-", std::process::id() % 100_000);
    let _ = dev_cluster::teardown(&prefix);
    let _cleanup = Namespaces(prefix.clone());
    let switch = dev_cluster::create_switch(&prefix).expect("switch");
    let mut names = Vec::new();
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        let netns = format!("{prefix}{name}");
        let node = dev_cluster::add_node(&switch, &netns, name, 1).expect("node namespace");
        let vtep: IpAddr = format!("192.168.42.{}", i + 1).parse().unwrap();
        dev_cluster::add_address(&node.ns(), "nic0", vtep, 24).expect("underlay");
        names.push(netns);
    }
    let mut n1 = start("n1", &names[0], "127.0.0.41:0").await;
    let mut n2 = start("n2", &names[1], "127.0.0.42:0").await;

    // The guest db-1 on n2 (its NIC at the segment MTU), started.
    let vm = proto::v1::CreateVm {
        name: "db-1".into(),
        vcpus: 1,
        memory_bytes: 32 << 20,
        image: Some(proto::v1::create_vm::Image::Builtin("cairn-guest".into())),
        tenant: "alpha".into(),
        nics: vec![proto::v1::VmNic {
            network: "db".into(),
            mtu: 1450,
            ipv4: "10.30.0.5".into(),
        }],
        ..Default::default()
    };
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
