//! The gateway's DNS upstream (issue 19): an external network's gateway forwards
//! names outside `.cairn` to the node's resolvers through the tenant's uplink, an
//! isolated network's gateway refuses them; both answer the network's VM names and
//! keep every other `.cairn` name to themselves. The node's resolver is a real
//! dnsmasq on the node namespace's underlay address that knows `example.test` and
//! logs every query it gets; the guest is a probe namespace asking with busybox
//! `nslookup`.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use network::dhcp::{DhcpHost, converge_dhcp, dhcp_drift};
use network::overlay::ensure_egress;

use crate::common::require_netns;
use crate::dhcp::{DhcpNode, dhcp_tools_missing};
use crate::overlay_support::{Nic, ok};

/// The node's resolver: answers `example.test` names with 192.0.2.7, logs queries.
struct Resolver {
    child: Child,
    log: std::path::PathBuf,
}

impl Resolver {
    fn start(node: &DhcpNode, address: &str) -> Self {
        std::fs::create_dir_all(&node.dir).expect("dir");
        let log = node.dir.join("resolver.log");
        let child = Command::new("ip")
            .args(["netns", "exec", node.ns.name().unwrap()])
            .arg(network::dhcp::dnsmasq_binary().expect("dnsmasq"))
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--pid-file=",
                "--address=/example.test/192.0.2.7",
                "--log-queries",
            ])
            .arg(format!("--listen-address={address}"))
            .arg(format!("--log-facility={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("resolver dnsmasq");
        let r = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !r.log().contains("started") {
            assert!(Instant::now() < deadline, "the resolver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many A queries for `name` reached the resolver.
    fn asked(&self, name: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(&format!("query[A] {name} ")))
            .count()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lookup(nic: &Nic, name: &str) -> String {
    let out = nic.run(&["busybox", "nslookup", name, "10.20.0.1"]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_external_network_resolves_outside_names_through_the_node_and_an_isolated_one_refuses() {
    require_netns!();
    if let Some(why) = dhcp_tools_missing() {
        eprintln!("skipping: {why}");
        return;
    }
    let node = DhcpNode::named("u-dn", 1450);
    let mac = [2, 0xc1, 0, 0, 0, 15];
    let web = node.nic("web-0", mac);
    ok(&[
        "ip",
        "-n",
        &web.netns,
        "addr",
        "add",
        "10.20.0.15/24",
        "dev",
        "eth0",
    ]);
    // The tenant's uplink, as for an external network, and the node's resolver on
    // its underlay address.
    ensure_egress(&node.ns, "alpha").expect("uplink");
    let resolver = Resolver::start(&node, "192.168.49.1");
    let hosts = vec![DhcpHost {
        mac,
        ipv4: Ipv4Addr::new(10, 20, 0, 15),
        name: "web-0".into(),
    }];
    let external = network::dhcp::DhcpSpec {
        upstream: vec![Ipv4Addr::new(192, 168, 49, 1)],
        ..node.spec(1450, hosts.clone())
    };
    converge_dhcp(&node.ns, &node.dir, &external).expect("external gateway");

    let text = lookup(&web, "www.example.test");
    assert!(text.contains("192.0.2.7"), "forwarded and answered: {text}");
    assert_eq!(resolver.asked("www.example.test"), 1, "{}", resolver.log());
    let text = lookup(&web, "web-0.app.alpha.cairn");
    assert!(
        text.contains("10.20.0.15"),
        "the network's own name: {text}"
    );
    // Another network's name is not found, and never asked of the node's resolver.
    let text = lookup(&web, "db-0.secret.alpha.cairn");
    assert!(!text.contains("Address: 1"), "{text}");
    assert_eq!(resolver.asked("db-0.secret.alpha.cairn"), 0);

    // Isolated: the same network without upstream refuses outside names.
    let isolated = node.spec(1450, hosts);
    assert_eq!(
        dhcp_drift(&node.ns, &node.dir, &isolated),
        vec!["dhcp: configuration differs (gateway, prefix, MTU or upstream resolvers)".to_owned()]
    );
    converge_dhcp(&node.ns, &node.dir, &isolated).expect("isolated gateway");
    let text = lookup(&web, "www.example.test");
    assert!(
        text.contains("REFUSED") && !text.contains("192.0.2.7"),
        "an isolated network's gateway refuses: {text}"
    );
    assert_eq!(
        resolver.asked("www.example.test"),
        1,
        "nothing more forwarded"
    );
    let text = lookup(&web, "web-0.app.alpha.cairn");
    assert!(
        text.contains("10.20.0.15"),
        "still answers its own names: {text}"
    );
    drop(resolver);
}
