//! The u32 filters steer each traffic type, by DSCP, into its HTB class,
//! over IPv4 and IPv6; unmarked traffic lands in the default (guest) class.
//! Checked with the classes' packet counters read over netlink.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use network::{TrafficClassSpec, TrafficKind, observe_bond};

use crate::common::{MBIT, Topology, require_netns, spec};

fn set_tos(sock: &UdpSocket, v6: bool, tos: u8) {
    let value = libc::c_int::from(tos);
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_TCLASS)
    } else {
        (libc::IPPROTO_IP, libc::IP_TOS)
    };
    // SAFETY: valid socket fd; value is a c_int whose size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt tos: {}", std::io::Error::last_os_error());
}

fn class_packets(topo: &Topology, spec: &network::BondSpec) -> Vec<(TrafficKind, u64)> {
    let obs = observe_bond(&topo.node_ns(), spec).expect("observe");
    spec.classes
        .iter()
        .map(|c| (c.name, obs.qos.class(c.name).expect("class").sent_packets))
        .collect()
}

#[test]
fn dscp_marks_land_in_their_classes_over_ipv4_and_ipv6() {
    require_netns!();
    let topo = Topology::new();
    let mut spec = spec();
    spec.classes = vec![
        TrafficClassSpec {
            name: TrafficKind::Storage,
            min_bps: 30 * MBIT,
            max_bps: None,
            weight: 4,
        },
        TrafficClassSpec {
            name: TrafficKind::Migration,
            min_bps: 10 * MBIT,
            max_bps: Some(50 * MBIT),
            weight: 1,
        },
        TrafficClassSpec {
            name: TrafficKind::Guest,
            min_bps: 20 * MBIT,
            max_bps: None,
            weight: 4,
        },
        TrafficClassSpec {
            name: TrafficKind::Management,
            min_bps: 5 * MBIT,
            max_bps: None,
            weight: 1,
        },
        TrafficClassSpec {
            name: TrafficKind::Replication,
            min_bps: 10 * MBIT,
            max_bps: None,
            weight: 2,
        },
    ];
    topo.apply_with_address(&spec);
    let node6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
    let peer6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
    network::dev_cluster::add_address(&topo.node_ns(), "data", IpAddr::V6(node6), 64)
        .expect("node v6");
    network::dev_cluster::add_address(&topo.peer.ns(), "nic0", IpAddr::V6(peer6), 64)
        .expect("peer v6");

    for peer in [IpAddr::V4(topo.peer_ip), IpAddr::V6(peer6)] {
        let v6 = peer.is_ipv6();
        let bind: SocketAddr = if v6 {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let sock = topo
            .node_ns()
            .run(|| UdpSocket::bind(bind))
            .expect("enter node")
            .expect("bind");
        let target = SocketAddr::new(peer, 9);
        // Resolve ARP/ND first so the counted packets are only ours.
        sock.send_to(b"warm-up", target).expect("send");
        std::thread::sleep(Duration::from_millis(200));
        for kind in TrafficKind::ALL {
            set_tos(&sock, v6, kind.tos().unwrap_or(0));
            let before = class_packets(&topo, &spec);
            for _ in 0..20 {
                sock.send_to(&[0u8; 200], target).expect("send");
            }
            std::thread::sleep(Duration::from_millis(50));
            let after = class_packets(&topo, &spec);
            for ((k, b), (_, a)) in before.iter().zip(&after) {
                let delta = a - b;
                if *k == kind {
                    assert!(
                        delta >= 20,
                        "{} {kind}: only {delta} packets in its class",
                        if v6 { "ipv6" } else { "ipv4" }
                    );
                } else if *k != TrafficKind::Guest {
                    // Guest is the default class: stray ARP/ND may land there.
                    assert_eq!(
                        delta,
                        0,
                        "{} {kind} traffic leaked into {k}",
                        if v6 { "ipv6" } else { "ipv4" }
                    );
                }
            }
        }
        eprintln!(
            "{} steering ok: {:?}",
            if v6 { "ipv6" } else { "ipv4" },
            class_packets(&topo, &spec)
        );
    }
}
