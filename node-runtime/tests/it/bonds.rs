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
    let prefix = format!("cni{}-", std::process::id() % 100_000);
    let _ = dev_cluster::teardown(&prefix);
    let _cleanup = Namespaces(prefix.clone());
    let switch = dev_cluster::create_switch(&prefix).expect("switch namespace");
    let netns = format!("{prefix}node");
    dev_cluster::add_node(&switch, &netns, "bond-node", 2).expect("node namespace");

    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    std::fs::write(
        dir.path().join("trusted-controllers"),
        format!("{}\n", controller.public_key_hex()),
    )
    .unwrap();
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
