//! Gratuitous ARP after a fallback failover, so switches relearn the bond's
//! MAC on the new member's port at once instead of when the next frame
//! happens to leave through it (what the bonding driver's `num_grat_arp`
//! does for real bonds).

use std::net::Ipv4Addr;

use crate::NetworkError;
use crate::netns::NetNs;
use crate::nl::Rtnl;

/// Builds a gratuitous ARP request frame (broadcast, sender = target = `ip`).
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
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

/// Sends one gratuitous ARP per IPv4 address of `dev` out of `dev`.
/// Returns how many were sent (0 when the device has no IPv4 address).
pub fn send_gratuitous_arp(ns: &NetNs, rtnl: &mut Rtnl, dev: &str) -> Result<usize, NetworkError> {
    let link = rtnl
        .require_link(dev)
        .map_err(|e| NetworkError::netlink(ns, e))?;
    let Some(mac) = link.mac else { return Ok(0) };
    let addrs = rtnl
        .ipv4_addresses(link.index)
        .map_err(|e| NetworkError::netlink(ns, e))?;
    if addrs.is_empty() {
        return Ok(0);
    }
    let index = link.index;
    let sent = ns.run(move || -> std::io::Result<usize> {
        let proto = 0x0806u16.to_be();
        // SAFETY: plain socket(2) call; the fd is closed below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let mut result = Ok(0);
        for ip in &addrs {
            let frame = garp_frame(mac, *ip);
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
}
