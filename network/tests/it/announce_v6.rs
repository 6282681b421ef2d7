//! IPv6 announcement after a member swap: one unsolicited Neighbor
//! Advertisement per owned address of the bond device, seen on the wire by a
//! peer and honoured by the peer's kernel (its stale neighbour entry is
//! overridden with the bond's MAC).
//!
//! The "bond" is a bridge with a fixed MAC and one member NIC, the shape of
//! the bridge fallback, built directly so this test does not depend on
//! `apply_bond` or `tc`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use network::announce::{self, NA_FRAME_LEN, announceable, unsolicited_na_frame};
use network::dev_cluster;
use network::nl::Rtnl;
use network::{NetNs, netns_capability};

static NEXT: AtomicU32 = AtomicU32::new(0);

const BOND: &str = "data";
const BOND_MAC: [u8; 6] = [0x02, 0xca, 0xfe, 0x76, 0x00, 0x01];
const STALE_MAC: &str = "02:00:00:00:be:ef";
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x76, 0, 0, 0, 0, 0, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x76, 0, 0, 0, 0, 0, 2);
const TENTATIVE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x76, 0, 0, 0, 0, 0, 0x99);

fn skip_reason() -> Option<String> {
    if let Err(why) = netns_capability() {
        return Some(why);
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the iproute2 `ip` binary is not installed".to_owned());
    }
    None
}

/// Deletes the test's namespaces when dropped, even after a failed assert.
struct Scratch(String);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = dev_cluster::teardown(&self.0) {
            eprintln!("teardown of {} failed: {e}", self.0);
        }
    }
}

fn ip(ns: &NetNs, args: &[&str]) -> String {
    let name = ns.name().expect("named namespace");
    let out = Command::new("ip")
        .args(["-n", name])
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {name} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A raw `AF_PACKET` socket receiving the IPv6 frames of one device.
struct Capture {
    fd: OwnedFd,
}

impl Capture {
    fn open(ns: &NetNs, dev_index: u32) -> Self {
        let fd = ns
            .run(move || -> std::io::Result<OwnedFd> {
                let proto = 0x86ddu16.to_be();
                // SAFETY: plain socket(2) call; the fd is owned by OwnedFd below.
                let raw = unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        i32::from(proto),
                    )
                };
                if raw < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: raw is a fresh, valid fd that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = dev_index as i32;
                // SAFETY: fd is a valid packet socket; sll is valid for the
                // length passed.
                let rc = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                // SAFETY: fd is valid; tv is a valid timeval of the size passed.
                let rc = unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(fd)
            })
            .expect("enter peer namespace")
            .expect("open capture socket");
        Self { fd }
    }

    /// Received (not locally sent) Neighbor Advertisements from `src_mac`,
    /// until `want` arrived or `timeout` passed.
    fn neighbor_advertisements(
        &self,
        src_mac: [u8; 6],
        want: usize,
        timeout: Duration,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while out.len() < want && Instant::now() < deadline {
            // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: fd is a valid socket; buf, from and from_len are valid
            // for the lengths passed and outlive the call.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                continue; // receive timeout: check the deadline again
            }
            let frame = &buf[..n as usize];
            let is_na = frame.len() >= 55
                && frame[6..12] == src_mac
                && frame[12..14] == [0x86, 0xdd]
                && frame[20] == 58
                && frame[54] == 136;
            if from.sll_pkttype != libc::PACKET_OUTGOING && is_na {
                out.push(frame.to_vec());
            }
        }
        out
    }
}

/// The peer's neighbour entry for `addr` as `ip -6 neigh show` prints it.
fn peer_neighbour(peer: &NetNs, addr: Ipv6Addr) -> String {
    ip(
        peer,
        &["-6", "neigh", "show", &addr.to_string(), "dev", "nic0"],
    )
}

#[test]
fn unsolicited_na_overrides_the_peers_stale_neighbour_entry() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping: {why}");
        return;
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("cairnv6t-{}-{n}-", std::process::id());
    let _ = dev_cluster::teardown(&prefix);
    let _scratch = Scratch(prefix.clone());

    let switch = dev_cluster::create_switch(&prefix).expect("switch namespace");
    let node =
        dev_cluster::add_node(&switch, &format!("{prefix}node"), "node-v6", 1).expect("node");
    let peer =
        dev_cluster::add_endpoint(&switch, &format!("{prefix}peer"), IpAddr::V6(PEER_V6), 64)
            .expect("peer");
    let node_ns = node.ns();
    let peer_ns = peer.ns();

    // The fallback bond's shape: a bridge with the bond's MAC over nic0.
    let mut rtnl = Rtnl::open(&node_ns).expect("netlink in node");
    rtnl.create_bridge(BOND, Some(BOND_MAC), Some(1500))
        .expect("create bond bridge");
    let bond = rtnl.require_link(BOND).expect("bond link");
    let nic0 = rtnl.require_link("nic0").expect("nic0");
    rtnl.set_controller(nic0.index, bond.index)
        .expect("attach nic0");
    rtnl.set_link_up(bond.index, true).expect("bond up");
    rtnl.add_address(bond.index, IpAddr::V6(NODE_V6), 64)
        .expect("global address (nodad)");
    rtnl.add_address(bond.index, IpAddr::V4(Ipv4Addr::new(10, 76, 0, 1)), 24)
        .expect("ipv4 address");

    // The kernel's own link-local address goes through DAD first.
    let deadline = Instant::now() + Duration::from_secs(10);
    let link_local = loop {
        let addrs = rtnl.ipv6_addresses(bond.index).expect("ipv6 addresses");
        let ll = addrs
            .iter()
            .find(|a| a.addr.segments()[0] == 0xfe80 && !a.tentative);
        if let Some(ll) = ll {
            break ll.addr;
        }
        assert!(
            Instant::now() < deadline,
            "no usable link-local address on {BOND}: {addrs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // An address still in DAD (at least a second) must not be announced.
    ip(
        &node_ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{TENTATIVE_V6}/64"),
            "dev",
            BOND,
        ],
    );

    // The peer believes the node's addresses live at another MAC.
    for addr in [NODE_V6, link_local] {
        ip(
            &peer_ns,
            &[
                "-6",
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                STALE_MAC,
                "dev",
                "nic0",
                "nud",
                "stale",
            ],
        );
        assert!(
            peer_neighbour(&peer_ns, addr).contains(STALE_MAC),
            "stale entry for {addr} not in place"
        );
    }

    let peer_nic = Rtnl::open(&peer_ns)
        .expect("netlink in peer")
        .require_link("nic0")
        .expect("peer nic0");
    let capture = Capture::open(&peer_ns, peer_nic.index);
    let (arps, nas) = announce::announce(&node_ns, &mut rtnl, BOND).expect("announce");
    let addrs_after = rtnl.ipv6_addresses(bond.index).expect("ipv6 addresses");
    let captured = capture.neighbor_advertisements(BOND_MAC, nas, Duration::from_secs(3));

    assert_eq!(arps, 1, "one gratuitous ARP for the one IPv4 address");
    let owned: Vec<Ipv6Addr> = addrs_after
        .iter()
        .filter(|a| announceable(a))
        .map(|a| a.addr)
        .collect();
    assert!(owned.contains(&NODE_V6) && owned.contains(&link_local));
    assert_eq!(
        nas,
        owned.len(),
        "one NA per owned address: {addrs_after:?}"
    );
    assert_eq!(captured.len(), nas, "the peer saw every NA");
    let mut targets = Vec::new();
    for frame in &captured {
        assert_eq!(frame.len(), NA_FRAME_LEN);
        assert_eq!(&frame[0..6], &[0x33, 0x33, 0, 0, 0, 1], "to all-nodes");
        assert_eq!(frame[21], 255, "hop limit");
        assert_eq!(&frame[38..54], &announce::ALL_NODES.octets());
        assert_eq!(frame[58] & 0xe0, 0x20, "O set, R and S clear");
        assert_eq!(&frame[78..80], &[2, 1], "Target Link-Layer Address option");
        assert_eq!(&frame[80..86], &BOND_MAC, "TLLA is the bond's MAC");
        let mut target = [0u8; 16];
        target.copy_from_slice(&frame[62..78]);
        let target = Ipv6Addr::from(target);
        assert_eq!(frame[..], unsolicited_na_frame(BOND_MAC, target)[..]);
        targets.push(target);
    }
    targets.sort();
    let mut want = owned.clone();
    want.sort();
    assert_eq!(targets, want);
    let still_tentative = addrs_after
        .iter()
        .any(|a| a.addr == TENTATIVE_V6 && a.tentative);
    if still_tentative {
        assert!(!targets.contains(&TENTATIVE_V6), "tentative was announced");
    } else {
        eprintln!("{TENTATIVE_V6} finished DAD before the check; its skip was not observed");
    }

    // The peer's kernel accepted the NAs (hop limit, checksum, option) and
    // overrode its stale entries with the bond's MAC.
    let bond_mac = mac_string(BOND_MAC);
    for addr in [NODE_V6, link_local] {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let entry = peer_neighbour(&peer_ns, addr);
            if entry.contains(&format!("lladdr {bond_mac}")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "peer's entry for {addr} was not overridden: {entry}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // With IPv6 disabled on the device there is nothing to advertise.
    node_ns
        .run(|| std::fs::write(format!("/proc/sys/net/ipv6/conf/{BOND}/disable_ipv6"), "1"))
        .expect("enter node namespace")
        .expect("disable ipv6 on the bond");
    let (arps, nas) = announce::announce(&node_ns, &mut rtnl, BOND).expect("announce");
    assert_eq!((arps, nas), (1, 0));
}
