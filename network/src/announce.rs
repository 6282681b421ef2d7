//! Announcements after a fallback failover, so switches and neighbours
//! relearn the bond's MAC on the new member's port at once instead of when
//! the next frame happens to leave through it (what the bonding driver's
//! `num_grat_arp` and `num_unsol_na` do for real bonds).
//!
//! IPv4 gets one gratuitous ARP per address ([`send_gratuitous_arp`]); IPv6
//! gets one unsolicited Neighbor Advertisement per global and link-local
//! address (RFC 4861 §7.2.6, [`send_unsolicited_na`]); [`announce`] sends
//! both. Frames are built here and sent on an `AF_PACKET` socket bound to
//! the device, so the source MAC is exactly the device's.
//!
//! Invariant: nothing is announced for an address the device does not yet
//! (tentative, optimistic) or cannot (DAD failed) own, so an announcement
//! never overrides a neighbour's cache entry for another host's address.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::NetworkError;
use crate::netns::NetNs;
use crate::nl::{Ipv6AddressState, Rtnl};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// Neighbor Advertisement flags byte: Router 0x80, Solicited 0x40, Override 0x20.
const NA_FLAG_OVERRIDE: u8 = 0x20;
/// NDP option type of the Target Link-Layer Address option.
const NDP_OPT_TARGET_LLADDR: u8 = 2;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;

/// The all-nodes link-local multicast address `ff02::1`.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Ethernet multicast address of `ff02::1` (`33:33` + its low 32 bits, RFC 2464 §7).
pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
/// Length of an unsolicited NA frame: Ethernet 14 + IPv6 40 + ICMPv6 NA 24
/// + Target Link-Layer Address option 8.
pub const NA_FRAME_LEN: usize = 86;

/// Builds a gratuitous ARP request frame (broadcast, sender = target = `ip`).
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address stays zero; target protocol address = ip.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Builds an unsolicited Neighbor Advertisement frame for `target`, owned by
/// the device with MAC `mac` (RFC 4861 §7.2.6): Ethernet to
/// [`ALL_NODES_MAC`] from `mac`; IPv6 from `target` to [`ALL_NODES`] with
/// hop limit 255; ICMPv6 type 136 code 0 with only the Override flag set,
/// target `target`, and one Target Link-Layer Address option carrying `mac`.
/// The source address is the target itself, as Linux does for its own
/// unsolicited NAs (any address of the interface is allowed).
pub fn unsolicited_na_frame(mac: [u8; 6], target: Ipv6Addr) -> [u8; NA_FRAME_LEN] {
    let mut f = [0u8; NA_FRAME_LEN];
    // Ethernet.
    f[0..6].copy_from_slice(&ALL_NODES_MAC);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    // IPv6: version 6, traffic class 0, flow label 0.
    f[14] = 0x60;
    let icmp_len = (NA_FRAME_LEN - 54) as u16;
    f[18..20].copy_from_slice(&icmp_len.to_be_bytes());
    f[20] = IPPROTO_ICMPV6;
    f[21] = 255; // Receivers drop NDP with any other hop limit (§7.1.2).
    f[22..38].copy_from_slice(&target.octets());
    f[38..54].copy_from_slice(&ALL_NODES.octets());
    // ICMPv6 Neighbor Advertisement.
    f[54] = ICMPV6_NEIGHBOR_ADVERTISEMENT;
    f[55] = 0; // code
    f[58] = NA_FLAG_OVERRIDE; // R = 0, S = 0 (multicast), O = 1; rest reserved.
    f[62..78].copy_from_slice(&target.octets());
    f[78] = NDP_OPT_TARGET_LLADDR;
    f[79] = 1; // option length in units of 8 bytes
    f[80..86].copy_from_slice(&mac);
    let checksum = icmpv6_checksum(target, ALL_NODES, &f[54..]);
    f[56..58].copy_from_slice(&checksum.to_be_bytes());
    f
}

/// The ICMPv6 checksum (RFC 4443 §2.3) of `icmp` (with its checksum field
/// zero) sent from `src` to `dst`: the one's complement of the one's
/// complement sum over the IPv6 pseudo-header (RFC 8200 §8.1) and `icmp`.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for chunk in bytes.chunks(2) {
            let hi = u32::from(chunk[0]) << 8;
            let lo = chunk.get(1).map_or(0, |b| u32::from(*b));
            sum = sum.wrapping_add(hi | lo);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether an unsolicited NA may be sent for this address: global or
/// link-local scope, and owned outright. Tentative and DAD-failed addresses
/// are not ours; optimistic ones (RFC 4429 §3.3) must not set Override.
pub fn announceable(addr: &Ipv6AddressState) -> bool {
    matches!(addr.scope, RT_SCOPE_UNIVERSE | RT_SCOPE_LINK)
        && !addr.tentative
        && !addr.dad_failed
        && !addr.optimistic
        && !addr.addr.is_multicast()
        && !addr.addr.is_unspecified()
        && !addr.addr.is_loopback()
}

/// Sends one gratuitous ARP per IPv4 address of `dev` out of `dev`.
/// Returns how many were sent (0 when the device has no MAC or no IPv4
/// address).
pub fn send_gratuitous_arp(ns: &NetNs, rtnl: &mut Rtnl, dev: &str) -> Result<usize, NetworkError> {
    let link = rtnl
        .require_link(dev)
        .map_err(|e| NetworkError::netlink(ns, e))?;
    let Some(mac) = link.mac else { return Ok(0) };
    let addrs = rtnl
        .ipv4_addresses(link.index)
        .map_err(|e| NetworkError::netlink(ns, e))?;
    let frames: Vec<Vec<u8>> = addrs
        .iter()
        .map(|ip| garp_frame(mac, *ip).to_vec())
        .collect();
    send_frames(ns, dev, link.index, ETH_P_ARP, [0xff; 6], &frames)
}

/// Sends one unsolicited Neighbor Advertisement (see
/// [`unsolicited_na_frame`]) per global and link-local IPv6 address of `dev`
/// out of `dev`, skipping tentative, optimistic and DAD-failed addresses.
/// Returns how many were sent (0 when the device has no MAC or no such
/// address, e.g. IPv6 disabled on it).
pub fn send_unsolicited_na(ns: &NetNs, rtnl: &mut Rtnl, dev: &str) -> Result<usize, NetworkError> {
    let link = rtnl
        .require_link(dev)
        .map_err(|e| NetworkError::netlink(ns, e))?;
    let Some(mac) = link.mac else { return Ok(0) };
    let addrs = rtnl
        .ipv6_addresses(link.index)
        .map_err(|e| NetworkError::netlink(ns, e))?;
    let frames: Vec<Vec<u8>> = addrs
        .iter()
        .filter(|a| announceable(a))
        .map(|a| unsolicited_na_frame(mac, a.addr).to_vec())
        .collect();
    send_frames(ns, dev, link.index, ETH_P_IPV6, ALL_NODES_MAC, &frames)
}

/// Announces `dev` after a member swap: gratuitous ARPs for its IPv4
/// addresses, then unsolicited NAs for its IPv6 addresses. Returns
/// `(arps sent, neighbor advertisements sent)`. A failure to send ARP stops
/// before the NAs; the error names the node and device.
pub fn announce(ns: &NetNs, rtnl: &mut Rtnl, dev: &str) -> Result<(usize, usize), NetworkError> {
    let arps = send_gratuitous_arp(ns, rtnl, dev)?;
    let nas = send_unsolicited_na(ns, rtnl, dev)?;
    Ok((arps, nas))
}

/// Sends complete Ethernet frames out of link `index` in `ns` on one
/// `AF_PACKET` raw socket. Returns how many were sent; stops at the first
/// error.
fn send_frames(
    ns: &NetNs,
    dev: &str,
    index: u32,
    ethertype: u16,
    dst_mac: [u8; 6],
    frames: &[Vec<u8>],
) -> Result<usize, NetworkError> {
    if frames.is_empty() {
        return Ok(0);
    }
    let sent = ns.run(move || -> std::io::Result<usize> {
        // Protocol 0: the socket only sends and never queues received frames.
        // SAFETY: plain socket(2) call; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = index as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&dst_mac);
        let mut result = Ok(0);
        for frame in frames {
            // SAFETY: fd is a valid packet socket; frame and sll are valid
            // for the lengths passed.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                result = Err(std::io::Error::last_os_error());
                break;
            }
            result = result.map(|n| n + 1);
        }
        // SAFETY: fd came from socket above and is closed once.
        unsafe { libc::close(fd) };
        result
    })?;
    sent.map_err(|source| NetworkError::Announce {
        node: ns.node().to_owned(),
        dev: dev.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_layout() {
        let mac = [0x02, 0xca, 1, 2, 3, 4];
        let f = garp_frame(mac, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[10, 0, 0, 1]);
        assert_eq!(
            &f[38..42],
            &[10, 0, 0, 1],
            "sender and target IP are the same"
        );
    }

    /// Independent check of an ICMPv6 checksum: the one's complement sum
    /// of a pseudo-header built by hand plus the message *including* its
    /// checksum field must be 0xffff (RFC 1071 §1, "verification").
    fn checksum_verifies(ipv6_packet: &[u8]) -> bool {
        let (header, payload) = ipv6_packet.split_at(40);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&header[8..24]); // source
        pseudo.extend_from_slice(&header[24..40]); // destination
        pseudo.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, header[6]]); // next header
        pseudo.extend_from_slice(payload);
        if pseudo.len() % 2 == 1 {
            pseudo.push(0);
        }
        let mut sum: u64 = pseudo
            .chunks_exact(2)
            .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn unsolicited_na_frame_is_byte_for_byte_rfc_4861() {
        let mac = [0x02, 0xca, 0xfe, 0x00, 0x00, 0x01];
        let target: Ipv6Addr = "fd00:77::1".parse().unwrap();
        let f = unsolicited_na_frame(mac, target);
        #[rustfmt::skip]
        let expected: [u8; NA_FRAME_LEN] = [
            // Ethernet: dst 33:33:00:00:00:01, src = mac, type IPv6
            0x33, 0x33, 0x00, 0x00, 0x00, 0x01,
            0x02, 0xca, 0xfe, 0x00, 0x00, 0x01,
            0x86, 0xdd,
            // IPv6: version 6, tc 0, flow 0; payload 32; next header 58; hop limit 255
            0x60, 0x00, 0x00, 0x00,
            0x00, 0x20, 58, 255,
            // source fd00:77::1
            0xfd, 0x00, 0x00, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            // destination ff02::1
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            // ICMPv6: type 136, code 0, checksum (computed separately with
            // Python's struct/ipaddress over the pseudo-header)
            136, 0, 0x5a, 0xe2,
            // flags: R=0 S=0 O=1, then 29 reserved bits
            0x20, 0x00, 0x00, 0x00,
            // target fd00:77::1
            0xfd, 0x00, 0x00, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            // option: Target Link-Layer Address, length 1 (8 bytes), the MAC
            2, 1, 0x02, 0xca, 0xfe, 0x00, 0x00, 0x01,
        ];
        assert_eq!(f, expected);
        assert!(checksum_verifies(&f[14..]));
    }

    #[test]
    fn link_local_na_checksum_matches_an_independent_computation() {
        let mac = [0x02, 0xca, 0xfe, 0x00, 0x00, 0x01];
        let target: Ipv6Addr = "fe80::ca:feff:fe00:1".parse().unwrap();
        let f = unsolicited_na_frame(mac, target);
        assert_eq!(&f[56..58], &[0x5d, 0x3a]);
        assert_eq!(&f[22..38], &target.octets(), "source is the target");
        assert_eq!(&f[62..78], &target.octets());
        assert!(checksum_verifies(&f[14..]));
        // Corrupting any byte of the message breaks verification.
        let mut bad = f;
        bad[70] ^= 0x01;
        assert!(!checksum_verifies(&bad[14..]));
    }

    #[test]
    fn checksum_handles_odd_lengths_and_carries() {
        let src: Ipv6Addr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        for icmp in [&[0xffu8, 0xff, 0, 0, 0xff][..], &[0x80, 0, 0, 0, 1, 2, 3]] {
            let c = icmpv6_checksum(src, ALL_NODES, icmp);
            let mut packet = vec![0x60, 0, 0, 0, 0, icmp.len() as u8, 58, 255];
            packet.extend_from_slice(&src.octets());
            packet.extend_from_slice(&ALL_NODES.octets());
            let mut msg = icmp.to_vec();
            msg[2..4].copy_from_slice(&c.to_be_bytes());
            packet.extend_from_slice(&msg);
            assert!(checksum_verifies(&packet), "{icmp:?} -> {c:#06x}");
        }
    }

    #[test]
    fn only_owned_global_and_link_local_addresses_are_announced() {
        let addr = |a: &str, scope: u8| Ipv6AddressState {
            addr: a.parse().unwrap(),
            prefix_len: 64,
            scope,
            tentative: false,
            dad_failed: false,
            optimistic: false,
        };
        assert!(announceable(&addr("2001:db8::1", RT_SCOPE_UNIVERSE)));
        assert!(announceable(&addr("fd00::1", RT_SCOPE_UNIVERSE)));
        assert!(announceable(&addr("fe80::1", RT_SCOPE_LINK)));
        assert!(!announceable(&addr("::1", 254)), "host scope");
        let tentative = Ipv6AddressState {
            tentative: true,
            ..addr("2001:db8::2", RT_SCOPE_UNIVERSE)
        };
        let dad_failed = Ipv6AddressState {
            dad_failed: true,
            ..addr("2001:db8::3", RT_SCOPE_UNIVERSE)
        };
        let optimistic = Ipv6AddressState {
            optimistic: true,
            ..addr("fe80::4", RT_SCOPE_LINK)
        };
        assert!(!announceable(&tentative));
        assert!(!announceable(&dad_failed));
        assert!(!announceable(&optimistic));
    }
}
