//! `cairn dev up` plumbing: nodes in namespaces, NICs into a shared switch,
//! a bond on every node, node-to-node traffic, and a clean `down`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use network::dev_cluster;
use network::{apply_bond, observe_bond};

use crate::common::{require_netns, spec};

#[test]
fn two_bonded_nodes_talk_through_the_switch_and_down_removes_everything() {
    require_netns!();
    let prefix = format!("cnd{}-", std::process::id() % 100_000);
    let _ = dev_cluster::down(&prefix);
    // Removes the namespaces even if an assertion below fails.
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = dev_cluster::down(&self.0);
        }
    }
    let _down = Down(prefix.clone());
    let nics: &[&str] = &["ens1f0", "ens1f1"];
    let cluster = dev_cluster::up(&prefix, &[("hq-n1", nics), ("hq-n2", nics)]).expect("dev up");
    let again = dev_cluster::up(&prefix, &[("hq-n1", nics), ("hq-n2", nics)])
        .expect("dev up is idempotent");
    assert_eq!(again, cluster);
    let mut spec = spec();
    spec.members = nics.iter().map(|n| (*n).to_owned()).collect();
    for (i, node) in cluster.nodes.iter().enumerate() {
        assert_eq!(node.nics, nics);
        apply_bond(&node.ns(), &spec).expect("apply");
        let ip = IpAddr::V4(Ipv4Addr::new(10, 78, 0, 1 + i as u8));
        dev_cluster::add_address(&node.ns(), &spec.name, ip, 24).expect("address");
        let obs = observe_bond(&node.ns(), &spec).expect("observe");
        assert!(obs.drift.is_empty(), "{}: {:?}", node.node, obs.drift);
    }
    let n1 = cluster.node("hq-n1").unwrap().ns();
    let n2 = cluster.node("hq-n2").unwrap().ns();
    let addr = SocketAddr::from((Ipv4Addr::new(10, 78, 0, 2), 7300));
    let _listener = n2
        .run(|| TcpListener::bind(addr))
        .expect("enter")
        .expect("bind");
    let conn = n1
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        .expect("enter");
    assert!(
        conn.is_ok(),
        "hq-n1 cannot reach hq-n2 through both bonds: {conn:?}"
    );

    let removed = dev_cluster::down(&prefix).expect("dev down");
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert!(network::netns::list_netns(&prefix).is_empty());
}
