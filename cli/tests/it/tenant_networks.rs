//! Tenant networks on the quickstart's dev cluster (issue 19), with real traffic.
//!
//! The quickstart (whose nodes have `underlay=` addresses on their bonds) gains, in
//! tenant `dev`, a second network `dev-admin` and SPEC.md's security group `db`
//! (`allow from="dev-net" proto="tcp" port=5432`), and probe VMs declared
//! `power "off"`: they are placed, addressed and programmed on the other nodes like
//! any VM, but never run, so a namespace can stand in for each on its node — a veth
//! named as the VM's tap, on the network's bridge, with the VM's MAC and address.
//! The built-in guest only answers ARP and ICMP echo; the probes start the pings
//! and speak TCP. The checks:
//! - two probes of dev-net on different nodes ping each other both ways, and both
//!   ping every built-in guest of dev-net (web-0..2 and db, on all three nodes) and
//!   the distributed gateway;
//! - a probe of tenant ops reaches its own gateway but nothing of tenant dev; a probe
//!   of dev-admin reaches its gateway but not dev-net (no rule routes it);
//! - and the other way: dev-net's probes reach neither ops (its probe, its built-in
//!   guest `backup`) nor dev-admin;
//! - `pg` lists group `db`: TCP 5432 from dev-net connects (from both nodes), 5433
//!   does not, ping does not, and dev-admin and ops cannot reach 5432; pg itself
//!   pings and connects out (the group filters what arrives; answers pass), and
//!   still nobody pings it;
//! - the group changed to also allow dev-admin: the plan sees it by the segment
//!   digest alone, apply reprograms every node, and dev-admin then connects (the
//!   time from the apply's start to the first connection is printed);
//! - `cairn status` shows each NIC's address, VNI and groups, and the segments.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::engine::{Cluster, kvm_usable};

/// Runs a command, returning whether it succeeded.
fn runs(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a command that must succeed.
fn must(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace standing in for a powered-off VM's first NIC; deleted on drop.
struct Probe {
    vm: String,
    ns: String,
    address: String,
    node: String,
    /// The TCP listener started in the namespace, killed with it.
    listener: Option<std::process::Child>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(mut child) = self.listener.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

impl Probe {
    fn ping(&self, to: &str) -> bool {
        runs(&[
            "ip", "netns", "exec", &self.ns, "ping", "-c", "1", "-W", "1", to,
        ])
    }

    /// Gives up the address and asks DHCP for one, as a guest's client would
    /// (busybox udhcpc; its script puts the address and the default route back).
    /// Returns the lease's `address router mtu`, or None without a lease.
    fn dhcp(&self) -> Option<String> {
        let script = std::env::temp_dir().join(format!("{}.udhcpc", self.ns));
        let out = std::env::temp_dir().join(format!("{}.lease", self.ns));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\necho \"$ip $router $mtu\" > {}\nip addr add $ip/$mask dev $interface\nip route add default via $router\n",
                out.display()
            ),
        )
        .unwrap();
        must(&["chmod", "+x", script.to_str().unwrap()]);
        must(&["ip", "-n", &self.ns, "addr", "flush", "dev", "eth0"]);
        let leased = runs(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "busybox",
            "udhcpc",
            "-i",
            "eth0",
            "-n",
            "-q",
            "-f",
            "-t",
            "3",
            "-T",
            "1",
            "-O",
            "mtu",
            "-s",
            script.to_str().unwrap(),
        ]);
        let lease = std::fs::read_to_string(&out).ok().filter(|_| leased);
        let _ = std::fs::remove_file(&script);
        let _ = std::fs::remove_file(&out);
        lease.map(|l| l.trim().to_owned())
    }

    /// Pings with a few tries (the first may wait for the neighbour entry).
    fn reaches(&self, to: &str) -> bool {
        (0..3).any(|_| self.ping(to))
    }

    /// A TCP connection to `to:port` within `timeout_ms`.
    fn connects(&self, to: &str, port: u16, timeout_ms: u64) -> bool {
        let code = format!(
            "import socket,sys\ns=socket.socket()\ns.settimeout({})\ntry:\n s.connect(('{to}',{port}))\nexcept Exception as e:\n sys.exit(1)\n",
            timeout_ms as f64 / 1000.0
        );
        runs(&["ip", "netns", "exec", &self.ns, "python3", "-c", &code])
    }

    /// Serves TCP on `ports` (accepts and closes) until the namespace goes.
    fn listen(&mut self, ports: &[u16]) {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let code = format!(
            "import socket,threading\ndef serve(p):\n s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(('0.0.0.0',p)); s.listen(64)\n while True:\n  c,_=s.accept(); c.close()\nfor p in [{}]: threading.Thread(target=serve,args=(p,),daemon=True).start()\nimport time\nwhile True: time.sleep(3600)\n",
            ports.join(",")
        );
        self.listener = Some(
            Command::new("ip")
                .args(["netns", "exec", &self.ns, "python3", "-c", &code])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("python3 listens"),
        );
        // Ready when the sockets answer from inside.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runs(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "python3",
            "-c",
            &format!(
                "import socket; socket.create_connection(('127.0.0.1',{}),1)",
                ports[0]
            ),
        ]) {
            assert!(Instant::now() < deadline, "{}: listener not up", self.vm);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The spec additions: dev-admin and group `db` in tenant dev, and the probes.
fn extend_quickstart(cluster: &Cluster) {
    let tenants = cluster.path().join("tenants.kdl");
    let text = std::fs::read_to_string(&tenants).expect("tenants.kdl");
    let dev_net = r#"network "dev-net" site="lab" cidr="10.77.0.0/24" gateway="10.77.0.1""#;
    assert!(text.contains(dev_net));
    let text = text.replace(
        dev_net,
        &format!(
            "{dev_net}\n    network \"dev-admin\" site=\"lab\" cidr=\"10.79.0.0/24\" gateway=\"10.79.0.1\"\n    security-group \"db\" {{\n        allow from=\"dev-net\" proto=\"tcp\" port=5432\n    }}"
        ),
    );
    std::fs::write(&tenants, text).expect("write tenants.kdl");
    let workloads = cluster.path().join("workloads.kdl");
    let mut text = std::fs::read_to_string(&workloads).expect("workloads.kdl");
    let probe = |name: &str, tenant: &str, nic: &str| {
        format!(
            "\nvm \"{name}\" tenant=\"{tenant}\" site=\"lab\" {{\n    power \"off\"\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n    nic {nic}\n}}\n"
        )
    };
    text.push_str(
        "\nvm-group \"probe\" tenant=\"dev\" site=\"lab\" replicas=2 {\n    spread \"node\"\n    power \"off\"\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n    nic network=\"dev-net\"\n}\n",
    );
    text.push_str(&probe(
        "pg",
        "dev",
        "network=\"dev-net\" security-groups=\"db\"",
    ));
    text.push_str(&probe("admin", "dev", "network=\"dev-admin\""));
    text.push_str(&probe("intruder", "ops", "network=\"ops-net\""));
    std::fs::write(&workloads, text).expect("write workloads.kdl");
}

/// The status's NIC row of `vm`.
fn nic_row<'a>(status: &'a Value, vm: &str) -> &'a Value {
    status["networks"]
        .as_array()
        .and_then(|n| n.iter().find(|r| r["vm"] == vm))
        .unwrap_or_else(|| panic!("no networks row for {vm}: {status}"))
}

/// Puts a namespace in place of powered-off `vm`'s NIC on its node.
fn stand_in(cluster: &Cluster, status: &Value, vm: &str, gateway: &str) -> Probe {
    let row = nic_row(status, vm);
    let (tenant, network, node, address) = (
        row["tenant"].as_str().unwrap(),
        row["network"].as_str().unwrap(),
        row["node"].as_str().unwrap(),
        row["address"].as_str().unwrap(),
    );
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(cluster.path().join(".cairn/dev/network.json")).unwrap(),
    )
    .unwrap();
    let node_ns = record["nodes"][node].as_str().expect("node namespace");
    let tap = network::tenant::vm_tap_name(vm, 0);
    let bridge = network::tenant::tenant_bridge_name(tenant, network);
    let mac = reconciler::segments::default_mac(vm, 0);
    let ns = format!("f-tn{}-{vm}", std::process::id() % 100_000);
    let probe = Probe {
        vm: vm.to_owned(),
        ns: ns.clone(),
        address: address.to_owned(),
        node: node.to_owned(),
        listener: None,
    };
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    must(&["ip", "netns", "add", &ns]);
    // A powered-off VM's tap may be there (made at definition, unused): the veth
    // takes its name and place on the bridge.
    let _ = runs(&["ip", "-n", node_ns, "link", "del", &tap]);
    must(&[
        "ip", "-n", node_ns, "link", "add", &tap, "mtu", "1450", "type", "veth", "peer", "name",
        "eth0", "netns", &ns,
    ]);
    must(&["ip", "-n", node_ns, "link", "set", &tap, "master", &bridge]);
    must(&["ip", "-n", node_ns, "link", "set", &tap, "up"]);
    must(&[
        "ip", "-n", &ns, "link", "set", "eth0", "address", &mac, "mtu", "1450", "up",
    ]);
    must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    must(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{address}/24"),
        "dev",
        "eth0",
    ]);
    must(&["ip", "-n", &ns, "route", "add", "default", "via", gateway]);
    probe
}

#[test]
fn tenant_networks_span_nodes_isolate_tenants_and_enforce_security_groups() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and the quickstart starts VMs");
        return;
    }
    if let Err(reason) = network::netns_capability() {
        eprintln!("skipped: no network namespaces here ({reason})");
        return;
    }
    if !runs(&["python3", "-c", "pass"]) {
        eprintln!("skipped: python3 (the TCP probes) is not installed");
        return;
    }
    let cluster = Cluster::up("tenant-nets");
    extend_quickstart(&cluster);
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "converged: {again:?}");
    let status = cluster.status_json();
    // Every NIC has its address, VNI and groups; every segment is converged.
    let pg = nic_row(&status, "pg");
    assert_eq!(pg["security_groups"], serde_json::json!(["db"]), "{pg}");
    assert!(pg["vni"].as_u64().unwrap() >= 4096, "{pg}");
    let segments = status["segments"].as_array().expect("segments");
    assert!(
        segments.iter().all(|s| s["drift"] == "none"),
        "{segments:?}"
    );
    // dev-net, dev-admin on 3 nodes (the tenant's VMs span them), ops-net where
    // ops's VMs are.
    assert!(segments.len() >= 7, "{segments:?}");
    let text = cluster.cairn(&["status", "."]);
    assert!(
        text.stdout.contains("networks:") && text.stdout.contains("segments:"),
        "{}",
        text.stdout
    );

    let mut p0 = stand_in(&cluster, &status, "probe-0", "10.77.0.1");
    let p1 = stand_in(&cluster, &status, "probe-1", "10.77.0.1");
    assert_ne!(p0.node, p1.node, "spread \"node\" puts the probes apart");
    let mut pg = stand_in(&cluster, &status, "pg", "10.77.0.1");
    let admin = stand_in(&cluster, &status, "admin", "10.79.0.1");
    let intruder = stand_in(&cluster, &status, "intruder", "10.78.0.1");
    pg.listen(&[5432, 5433]);

    // One network across nodes: both ways between the probes, to every built-in
    // guest (the guests of dev-net sit on all three nodes) and to the gateway.
    assert!(p0.reaches(&p1.address), "{} -> {}", p0.node, p1.node);
    assert!(p1.reaches(&p0.address), "{} -> {}", p1.node, p0.node);
    let mut guest_nodes = std::collections::BTreeSet::new();
    for guest in ["web-0", "web-1", "web-2", "db"] {
        let row = nic_row(&status, guest);
        let address = row["address"].as_str().unwrap();
        guest_nodes.insert(row["node"].as_str().unwrap().to_owned());
        for p in [&p0, &p1] {
            assert!(
                p.reaches(address),
                "{} on {} -> {guest} {address} on {}",
                p.vm,
                p.node,
                row["node"]
            );
        }
    }
    assert_eq!(guest_nodes.len(), 3, "dev-net's guests span the nodes");
    assert!(p0.reaches("10.77.0.1") && p1.reaches("10.77.0.1"));

    // Isolation: the other tenant and the tenant's other network reach their own
    // gateway only.
    let web0 = nic_row(&status, "web-0")["address"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(intruder.reaches("10.78.0.1"), "ops's own gateway");
    assert!(!intruder.ping(&web0), "ops reached dev's web-0");
    assert!(!intruder.ping(&p0.address), "ops reached dev's probe");
    assert!(admin.reaches("10.79.0.1"), "dev-admin's own gateway");
    assert!(
        !admin.ping(&web0),
        "dev-admin reached dev-net with no rule routing it"
    );
    // And the other way: dev reaches nothing of ops (its stand-in, its built-in
    // guest backup) nor dev-admin.
    let backup = nic_row(&status, "backup");
    let backup_address = backup["address"].as_str().unwrap();
    assert!(
        intruder.reaches(backup_address),
        "ops's own guest answers ops"
    );
    for p in [&p0, &p1] {
        assert!(!p.ping(&intruder.address), "{} reached ops's probe", p.vm);
        assert!(!p.ping(backup_address), "{} reached ops's backup", p.vm);
        assert!(!p.ping(&admin.address), "{} reached dev-admin", p.vm);
    }

    // DHCP from the plan: each network's server on the probe's node hands the
    // probe its planned address, its gateway and the segment MTU (a guest that
    // asks instead of keeping a static address gets the same).
    if runs(&["busybox", "true"]) {
        for (p, gateway) in [(&p0, "10.77.0.1"), (&intruder, "10.78.0.1")] {
            assert_eq!(
                p.dhcp(),
                Some(format!("{} {gateway} 1450", p.address)),
                "{} on {}",
                p.vm,
                p.node
            );
        }
        assert!(p0.reaches(&p1.address), "the leased address works");
    } else {
        eprintln!("DHCP part skipped: busybox (udhcpc) is not installed");
    }

    // Security group db on pg: TCP 5432 from dev-net only.
    for p in [&p0, &p1] {
        assert!(
            p.connects(&pg.address, 5432, 2000),
            "{} on {} -> pg:5432 on {}",
            p.vm,
            p.node,
            pg.node
        );
        assert!(!p.connects(&pg.address, 5433, 500), "{} -> pg:5433", p.vm);
    }
    assert!(!p0.ping(&pg.address), "ping is not allowed to pg");
    assert!(
        !admin.connects(&pg.address, 5432, 500),
        "dev-admin -> pg:5432"
    );
    assert!(!intruder.connects(&pg.address, 5432, 500), "ops -> pg:5432");
    // The other direction: the group filters what reaches pg, not what pg starts,
    // and the answers to pg's own traffic come back (established): pg pings and
    // connects to p0, while p0 still cannot ping pg.
    p0.listen(&[8080]);
    assert!(
        pg.reaches(&p0.address),
        "pg -> p0 ping ({} -> {})",
        pg.node,
        p0.node
    );
    assert!(pg.connects(&p0.address, 8080, 2000), "pg -> p0:8080");
    assert!(!p0.ping(&pg.address), "p0 -> pg ping after pg's own pings");
    assert!(!intruder.connects(&p0.address, 8080, 500), "ops -> p0:8080");

    // The group changes: dev-admin may connect too. Only the segment digest shows it.
    let tenants = cluster.path().join("tenants.kdl");
    let text = std::fs::read_to_string(&tenants).unwrap();
    std::fs::write(
        &tenants,
        text.replace(
            "allow from=\"dev-net\" proto=\"tcp\" port=5432",
            "allow from=\"dev-net\" proto=\"tcp\" port=5432\n        allow from=\"dev-admin\" proto=\"tcp\" port=5432",
        ),
    )
    .unwrap();
    let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(plan.code, 3, "{plan:?}");
    assert!(plan.stdout.contains("digest differs"), "{}", plan.stdout);
    let json = cluster.cairn(&["plan", ".", "--format", "json"]);
    let doc: Value = serde_json::from_str(&json.stdout).expect("plan JSON");
    let changes = doc["changes"].as_array().expect("changes");
    assert!(
        changes
            .iter()
            .all(|c| c["object"] == "segment" && c["kind"] == "update"),
        "only segments change: {changes:?}"
    );
    // Every node holding a dev segment gets it again.
    assert!(changes.len() >= 3, "{changes:?}");
    let started = Instant::now();
    let apply = cluster
        .command(&["apply", ".", "--auto-approve"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let apply = apply.expect("cairn apply runs");
    let first = loop {
        if admin.connects(&pg.address, 5432, 100) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "dev-admin never got through"
        );
    };
    let done = apply.wait_with_output().expect("apply ends");
    let applied = started.elapsed();
    let output = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "apply of the changed group failed: {output}"
    );
    // The node steps: each node's tables reprogrammed (the step's own time).
    let steps: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("ok: apply_network_segment"))
        .collect();
    assert!(steps.len() >= 3, "{output}");
    eprintln!(
        "changed security group: {} (the whole `cairn apply`: compile, observe, plan, apply: {} ms); first allowed connection {} ms after it began",
        steps.join("; "),
        applied.as_millis(),
        first.as_millis()
    );
    assert!(admin.connects(&pg.address, 5432, 2000));
    assert!(!admin.connects(&pg.address, 5433, 500));
    assert!(
        !intruder.connects(&pg.address, 5432, 500),
        "ops still cannot"
    );
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "converged again: {again:?}");
}
