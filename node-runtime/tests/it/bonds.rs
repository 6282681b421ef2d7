//! Bonds applied through the node API into a throwaway network namespace.

use network::dev_cluster;
use proto::v1::{
    ApplyBond, DeleteBond, Health, TrafficClass, apply_request::Action,
    apply_response::Result as ApplyResult,
};

use crate::harness::{apply_ok, controller};

const MBIT: u64 = 1_000_000;

struct Namespaces(String);

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = dev_cluster::teardown(&self.0);
    }
}

/// A throwaway switch namespace and a node namespace `PREFIXnode` with `nics`
/// NICs (`nic0`…); both go when the guard drops.
fn node_namespace(tag: &str, node: &str, nics: usize) -> (Namespaces, String) {
    let prefix = format!("{tag}{}-", std::process::id() % 100_000);
    let _ = dev_cluster::teardown(&prefix);
    let cleanup = Namespaces(prefix.clone());
    let switch = dev_cluster::create_switch(&prefix).expect("switch namespace");
    let netns = format!("{prefix}node");
    dev_cluster::add_node(&switch, &netns, node, nics).expect("node namespace");
    (cleanup, netns)
}

/// A node data directory that trusts a fresh controller key.
fn data_dir() -> (tempfile::TempDir, proto::auth::Identity) {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    std::fs::write(
        dir.path().join("trusted-controllers"),
        format!("{}\n", controller.public_key_hex()),
    )
    .unwrap();
    (dir, controller)
}

/// A node started with `--netns` in a throwaway namespace with one NIC, and a client
/// of it. Fields drop in order: the node stops before its namespace goes.
struct NodeInNamespace {
    client: proto::client::NodeClient,
    _node: crate::harness::TestNode,
    _dir: tempfile::TempDir,
    netns: String,
    _cleanup: Namespaces,
}

impl NodeInNamespace {
    async fn start(tag: &str, node: &str) -> Self {
        let (cleanup, netns) = node_namespace(tag, node, 1);
        let (dir, controller) = data_dir();
        let started = crate::harness::TestNode::start_with_args(
            node,
            dir.path(),
            "127.0.0.1:0",
            &["--netns", &netns],
        );
        let client = started.client(&controller).await;
        Self {
            client,
            _node: started,
            _dir: dir,
            netns,
            _cleanup: cleanup,
        }
    }
}

fn bond(capacity_bps: u64) -> ApplyBond {
    let class = |name: &str, min_mbit: u64, weight: u32| TrafficClass {
        name: name.into(),
        min_bps: min_mbit * MBIT,
        max_bps: 0,
        weight,
    };
    ApplyBond {
        name: "data".into(),
        mode: "active-backup".into(),
        members: vec!["nic0".into(), "nic1".into()],
        mtu: 1500,
        traffic: vec![
            class("storage", 40, 4),
            class("guest", 40, 4),
            class("management", 5, 1),
        ],
        capacity_bps,
        miimon_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bond_is_applied_observed_and_deleted_in_the_nodes_namespace() {
    if let Err(why) = network::netns_capability() {
        eprintln!("skipping: {why}");
        return;
    }
    if std::process::Command::new("tc").arg("-V").output().is_err() {
        eprintln!("skipping: the iproute2 `tc` binary is not installed");
        return;
    }
    let (_cleanup, netns) = node_namespace("cni", "bond-node", 2);
    let (dir, controller) = data_dir();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-node"))
        .args([
            "--name",
            "bond-node",
            "--listen",
            "127.0.0.1:0",
            "--netns",
            &netns,
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let address_file = dir.path().join("listen-address");
    let mut address = String::new();
    for _ in 0..1000 {
        if let Ok(text) = std::fs::read_to_string(&address_file)
            && text.ends_with('\n')
        {
            address = text.trim().to_string();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let node = NodeGuard(child.id());
    assert!(!address.is_empty(), "node did not start");
    let mut client =
        proto::client::NodeClient::connect(&address, proto::auth::RequestSigner::new(controller))
            .await
            .unwrap();

    let inventory = client.get_inventory().await.unwrap();
    let networking = inventory
        .networking
        .clone()
        .expect("inventory reports networking");
    assert_eq!(networking.netns, netns);
    assert_eq!(networking.unavailable_reason, "", "{networking:?}");
    assert!(
        ["kernel-bond", "bridge-fallback"].contains(&networking.bond_implementation.as_str()),
        "{networking:?}"
    );
    let nic_names: Vec<&str> = inventory.nics.iter().map(|nic| nic.name.as_str()).collect();
    assert!(
        nic_names.contains(&"nic0") && nic_names.contains(&"nic1"),
        "inventory lists the NICs of the node's namespace: {nic_names:?}"
    );

    let applied = apply_ok(&mut client, "bond-1", Action::ApplyBond(bond(100 * MBIT))).await;
    let Some(ApplyResult::Bond(result)) = applied.result else {
        panic!("unexpected result {applied:?}");
    };
    assert!(
        ["kernel-bond", "bridge-fallback"].contains(&result.implementation.as_str()),
        "{}",
        result.implementation
    );
    // Applying the same bond again (new request id) converges to the same device.
    apply_ok(&mut client, "bond-2", Action::ApplyBond(bond(100 * MBIT))).await;

    let observed = client.observe().await.unwrap();
    assert_eq!(observed.bonds.len(), 1);
    let status = &observed.bonds[0];
    assert_eq!(status.name, "data");
    assert_eq!(status.implementation, result.implementation);
    assert_eq!(status.health, Health::Healthy as i32, "{}", status.detail);
    assert!(!status.active_members.is_empty());
    // Observe carries the definition kept and the device read back, in sync.
    assert!(status.exists);
    assert!(status.drift.is_empty(), "{:?}", status.drift);
    assert_eq!(status.traffic, bond(100 * MBIT).traffic);
    assert_eq!(status.capacity_bps, 100 * MBIT);
    assert_eq!(
        observed.networking.as_ref().map(|n| n.netns.as_str()),
        Some(netns.as_str())
    );

    // Drift made behind the node's back is reported, and the same definition
    // applied again repairs it.
    let tc = |args: &[&str]| {
        let out = std::process::Command::new("tc")
            .args(["-n", &netns])
            .args(args)
            .output()
            .expect("tc runs");
        assert!(out.status.success(), "tc {args:?}: {out:?}");
    };
    tc(&[
        "class", "change", "dev", "data", "parent", "1:1", "classid", "1:40", "htb", "rate",
        "1Mbit", "ceil", "100Mbit",
    ]);
    tc(&["filter", "del", "dev", "data"]);
    let drifted = client.observe().await.unwrap();
    let status = &drifted.bonds[0];
    assert_eq!(status.health, Health::Degraded as i32, "{status:?}");
    assert!(
        status.drift.iter().any(|d| d.contains("management")),
        "the changed class is named: {:?}",
        status.drift
    );
    assert!(
        status.drift.iter().any(|d| d.contains("steering filters")),
        "the deleted filters are reported: {:?}",
        status.drift
    );
    apply_ok(
        &mut client,
        "bond-repair",
        Action::ApplyBond(bond(100 * MBIT)),
    )
    .await;
    let repaired = client.observe().await.unwrap();
    assert!(
        repaired.bonds[0].drift.is_empty(),
        "{:?}",
        repaired.bonds[0]
    );

    // More guaranteed bandwidth than the bond has is refused, naming the problem.
    let too_small = client
        .apply(crate::harness::request(
            "bond-3",
            Action::ApplyBond(bond(10 * MBIT)),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        too_small.code(),
        tonic::Code::InvalidArgument,
        "{too_small:?}"
    );

    apply_ok(
        &mut client,
        "bond-del",
        Action::DeleteBond(DeleteBond {
            name: "data".into(),
        }),
    )
    .await;
    assert!(client.observe().await.unwrap().bonds.is_empty());
    drop(node);
    let _ = child.wait();
}

struct NodeGuard(u32);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        // SAFETY: kill takes a pid and a signal number; it has no memory effects.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_networking_disabled_says_why_and_refuses_bonds_without_touching_anything() {
    let (dir, controller) = data_dir();
    let reason = "dev node without its own network namespace (not running as root)";
    let node = crate::harness::TestNode::start_with_args(
        "no-net",
        dir.path(),
        "127.0.0.1:0",
        &["--network-disabled", reason],
    );
    let mut client = node.client(&controller).await;
    let inventory = client.get_inventory().await.unwrap();
    let networking = inventory.networking.expect("inventory reports networking");
    assert_eq!(networking.unavailable_reason, reason);
    assert_eq!(networking.bond_implementation, "");
    assert!(
        !inventory.kernel.expect("kernel").bonding,
        "no probe device is made on a node that must not touch the network"
    );
    let refused = client
        .apply(crate::harness::request(
            "bond-refused",
            Action::ApplyBond(bond(100 * MBIT)),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("node no-net")
            && refused.message().contains("bond `data`")
            && refused.message().contains(reason),
        "{}",
        refused.message()
    );
    let observed = client.observe().await.unwrap();
    assert!(observed.bonds.is_empty());
    assert_eq!(
        observed.networking.map(|n| n.unavailable_reason),
        Some(reason.to_owned())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_nics_are_taps_on_tenant_bridges_repaired_by_the_same_definition_and_removed_with_the_vm()
 {
    if let Err(why) = network::netns_capability() {
        eprintln!("skipping: {why}");
        return;
    }
    let started = NodeInNamespace::start("cnv", "nic-node").await;
    let (netns, mut client) = (started.netns.clone(), started.client.clone());
    let vm = proto::v1::CreateVm {
        name: "web-1".into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        image: Some(proto::v1::create_vm::Image::Builtin("cairn-guest".into())),
        volumes: vec![],
        tenant: "dev".into(),
        nics: vec![
            proto::v1::VmNic {
                network: "dev-net".into(),
                mtu: 0,
                ipv4: String::new(),
            },
            proto::v1::VmNic {
                network: "dev-storage".into(),
                mtu: 9000,
                ipv4: String::new(),
            },
        ],
        ..Default::default()
    };
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["-n", &netns, "-o"])
            .args(args)
            .output()
            .expect("ip runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    apply_ok(&mut client, "vm-1", Action::CreateVm(vm.clone())).await;
    let observed = client.observe().await.unwrap();
    let nics = &observed.vms[0].nics;
    assert_eq!(nics.len(), 2, "{nics:?}");
    for nic in nics {
        assert!(nic.ready, "{nic:?}");
        let link = ip(&["link", "show", &nic.tap]);
        assert!(link.contains(&format!("master {}", nic.bridge)), "{link}");
        // Administratively up (no carrier yet: no VMM holds the tap).
        let bridge = ip(&["link", "show", &nic.bridge]);
        let flags = bridge.split(['<', '>']).nth(1).unwrap_or_default();
        assert!(flags.split(',').any(|f| f == "UP"), "{bridge}");
    }
    assert!(ip(&["link", "show", &nics[1].tap]).contains("mtu 9000"));
    assert_ne!(
        nics[0].bridge, nics[1].bridge,
        "one bridge per tenant network"
    );

    // A tap deleted behind the node's back: Observe says so; the same definition
    // again makes it.
    ip(&["link", "del", &nics[0].tap]);
    let broken = client.observe().await.unwrap();
    assert!(!broken.vms[0].nics[0].ready);
    assert!(
        broken.vms[0].nics[0].detail.contains("does not exist"),
        "{:?}",
        broken.vms[0].nics[0]
    );
    apply_ok(&mut client, "vm-1-again", Action::CreateVm(vm.clone())).await;
    assert!(
        client.observe().await.unwrap().vms[0]
            .nics
            .iter()
            .all(|n| n.ready)
    );

    // Invalid NICs are refused, naming the field.
    let mut bad = vm.clone();
    bad.name = "web-2".into();
    bad.nics[0].network = "Not A Label".into();
    let refused = client
        .apply(crate::harness::request("vm-bad", Action::CreateVm(bad)))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("create_vm.nics[0].network"),
        "{refused:?}"
    );

    let taps: Vec<String> = nics.iter().map(|n| n.tap.clone()).collect();
    apply_ok(
        &mut client,
        "vm-del",
        Action::DeleteVm(proto::v1::DeleteVm {
            name: "web-1".into(),
        }),
    )
    .await;
    for tap in taps {
        assert!(
            ip(&["link", "show", &tap]).is_empty(),
            "{tap} removed with the vm"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_started_vm_answers_ping_through_its_tap_on_the_tenant_bridge() {
    if let Err(why) = network::netns_capability() {
        eprintln!("skipping: {why}");
        return;
    }
    if !crate::vms::vms_can_run() {
        return;
    }
    if std::process::Command::new("ping")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipping: no ping (Debian package iputils-ping)");
        return;
    }
    let started = NodeInNamespace::start("cnp", "ping-node").await;
    let (netns, mut client) = (started.netns.clone(), started.client.clone());
    let vm = proto::v1::CreateVm {
        name: "web-1".into(),
        vcpus: 1,
        memory_bytes: 32 << 20,
        image: Some(proto::v1::create_vm::Image::Builtin("cairn-guest".into())),
        volumes: vec![],
        tenant: "dev".into(),
        nics: vec![proto::v1::VmNic {
            network: "dev-net".into(),
            mtu: 0,
            ipv4: "10.214.0.2".into(),
        }],
        ..Default::default()
    };
    apply_ok(&mut client, "vm-1", Action::CreateVm(vm)).await;
    apply_ok(
        &mut client,
        "vm-1-start",
        Action::StartVm(proto::v1::StartVm {
            name: "web-1".into(),
        }),
    )
    .await;

    // The guest's driver comes up on the tap the node made.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let nic = loop {
        let observed = client.observe().await.unwrap();
        let nic = observed.vms[0].nics[0].clone();
        if nic.guest_up || std::time::Instant::now() > deadline {
            break nic;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(nic.guest_up && nic.ready, "{nic:?}");
    assert!(nic.mac.starts_with("02:ca:"), "{nic:?}");

    // The node's side of the tenant network gets an address; the guest answers it.
    let in_ns = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &netns])
            .args(args)
            .output()
            .expect("ip netns exec")
    };
    let added = in_ns(&["ip", "addr", "add", "10.214.0.1/24", "dev", &nic.bridge]);
    assert!(added.status.success(), "{added:?}");
    let ping = in_ns(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.214.0.2"]);
    let report = String::from_utf8_lossy(&ping.stdout).into_owned();
    println!("{report}");
    assert!(
        ping.status.success() && report.contains("3 received"),
        "{report}"
    );
    let neighbour = in_ns(&["ip", "neigh", "show", "10.214.0.2"]);
    assert!(
        String::from_utf8_lossy(&neighbour.stdout).contains(&nic.mac),
        "{neighbour:?}"
    );
    let counted = client.observe().await.unwrap().vms[0].nics[0].clone();
    assert!(
        counted.rx_frames >= 4 && counted.tx_frames >= 4,
        "one ARP and three echoes each way: {counted:?}"
    );

    apply_ok(
        &mut client,
        "vm-1-stop",
        Action::StopVm(proto::v1::StopVm {
            name: "web-1".into(),
            grace_ms: 2000,
        }),
    )
    .await;
}
