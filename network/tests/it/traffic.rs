//! Real traffic through the bond device with iperf3: ceilings and
//! guarantees under contention. Senders mark DSCP with iperf3's `-S`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use network::TrafficKind;

use crate::common::{MBIT, Topology, require_netns, spec};

fn iperf3_missing() -> Option<String> {
    match Command::new("iperf3").arg("--version").output() {
        Ok(_) => None,
        Err(_) => Some("iperf3 is not installed (apt-get install -y iperf3)".to_owned()),
    }
}

/// An iperf3 server that is killed if the test fails before it exits.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn server(topo: &Topology, port: u16) -> Server {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.peer.netns,
            "iperf3",
            "-s",
            "-1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    Server(child)
}

fn client(topo: &Topology, port: u16, kind: TrafficKind, seconds: u32) -> Child {
    let mut args: Vec<String> = ["netns", "exec", &topo.node.netns, "iperf3", "-J", "-c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([
        topo.peer_ip.to_string(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        seconds.to_string(),
    ]);
    if let Some(tos) = kind.tos() {
        args.extend(["-S".into(), format!("0x{tos:02x}")]);
    }
    Command::new("ip")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start iperf3 client")
}

/// Receiver-side goodput in bits per second from iperf3's JSON.
fn received_bps(child: Child) -> f64 {
    let out = child.wait_with_output().expect("iperf3 client");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 JSON: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no sum_received in iperf3 output: {json}"))
}

// Goodput is compared with the HTB rates as is: HTB counts frame bytes, so
// TCP/IP/Ethernet headers (at most ~4.4% at MTU 1500, far less with GSO's
// large segments on veth) eat into the 10% tolerance rather than widening it.

#[test]
fn ceiling_caps_a_lone_class() {
    require_netns!();
    if let Some(why) = iperf3_missing() {
        eprintln!("skipping: {why}");
        return;
    }
    let topo = Topology::new();
    topo.apply_with_address(&spec());
    let _srv = server(&topo, 5301);
    std::thread::sleep(Duration::from_millis(300));
    let bps = received_bps(client(&topo, 5301, TrafficKind::Migration, 2));
    let max = 50.0 * MBIT as f64;
    eprintln!(
        "migration alone (max 50Mbit/s): {:.1} Mbit/s goodput",
        bps / 1e6
    );
    assert!(bps <= max * 1.10, "migration exceeded its max: {bps}");
    assert!(bps >= max * 0.90, "migration far below its ceiling: {bps}");
}

#[test]
fn guarantees_hold_under_contention() {
    require_netns!();
    if let Some(why) = iperf3_missing() {
        eprintln!("skipping: {why}");
        return;
    }
    let topo = Topology::new();
    let spec = spec();
    topo.apply_with_address(&spec);
    let kinds = [
        (TrafficKind::Storage, 5311),
        (TrafficKind::Guest, 5312),
        (TrafficKind::Migration, 5313),
        (TrafficKind::Management, 5314),
    ];
    let _servers: Vec<Server> = kinds.iter().map(|(_, p)| server(&topo, *p)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let clients: Vec<(TrafficKind, Child)> = kinds
        .iter()
        .map(|(k, p)| (*k, client(&topo, *p, *k, 3)))
        .collect();
    let results: Vec<(TrafficKind, f64)> = clients
        .into_iter()
        .map(|(k, c)| (k, received_bps(c)))
        .collect();
    let total: f64 = results.iter().map(|(_, b)| b).sum();
    for (kind, bps) in &results {
        let class = spec.class(*kind).expect("class");
        eprintln!(
            "{kind}: {:.1} Mbit/s goodput (min {} max {})",
            bps / 1e6,
            class.min_bps / MBIT,
            class.max_bps.unwrap_or(100 * MBIT) / MBIT
        );
        let min = class.min_bps as f64;
        assert!(*bps >= min * 0.90, "{kind} got {bps}, below its min");
        let max = class.max_bps.unwrap_or(100 * MBIT) as f64;
        assert!(*bps <= max * 1.10, "{kind} got {bps}, above its max");
    }
    eprintln!("total: {:.1} Mbit/s on a 100 Mbit/s bond", total / 1e6);
    assert!(total <= 100.0 * MBIT as f64 * 1.10);
}

#[test]
fn excess_is_shared_by_weight() {
    require_netns!();
    if let Some(why) = iperf3_missing() {
        eprintln!("skipping: {why}");
        return;
    }
    let topo = Topology::new();
    let mut spec = spec();
    spec.classes = vec![
        network::TrafficClassSpec {
            name: TrafficKind::Storage,
            min_bps: 10 * MBIT,
            max_bps: None,
            weight: 4,
        },
        network::TrafficClassSpec {
            name: TrafficKind::Guest,
            min_bps: 10 * MBIT,
            max_bps: None,
            weight: 1,
        },
    ];
    topo.apply_with_address(&spec);
    let kinds = [(TrafficKind::Storage, 5321), (TrafficKind::Guest, 5322)];
    let _servers: Vec<Server> = kinds.iter().map(|(_, p)| server(&topo, *p)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let clients: Vec<Child> = kinds
        .iter()
        .map(|(k, p)| client(&topo, *p, *k, 3))
        .collect();
    let results: Vec<f64> = clients.into_iter().map(received_bps).collect();
    let (storage, guest) = (results[0], results[1]);
    eprintln!(
        "weights 4:1, mins 10/10 of 100 Mbit/s: storage {:.1} Mbit/s, guest {:.1} Mbit/s (ideal 74/26)",
        storage / 1e6,
        guest / 1e6
    );
    assert!(
        guest >= 10.0 * MBIT as f64 * 0.9,
        "guest lost its guarantee"
    );
    // The 80 Mbit/s excess is split 4:1: storage well ahead of guest.
    assert!(
        storage > 2.0 * guest,
        "excess not shared by weight: {storage} vs {guest}"
    );
}
