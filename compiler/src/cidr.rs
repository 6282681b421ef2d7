//! IPv4 and IPv6 networks (`ADDRESS/PREFIX`): parsing with no host bits
//! set, containment and overlap. Used by the tenant network checks and by
//! IPAM ([`crate::ipam`]), which hands out addresses from them.

use std::net::IpAddr;

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDRESS/PREFIX` with no host bits set.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').ok_or("it has no `/PREFIX`")?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or(format!("the prefix length must be 0..={max}"))?;
        let c = Cidr { addr, prefix };
        if c.bits(addr) & !c.mask() != 0 {
            return Err(format!(
                "host bits are set; the network address is {}",
                c.network_string()
            ));
        }
        Ok(c)
    }

    fn width(&self) -> u32 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    fn bits(&self, ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v) => u128::from(u32::from(v)),
            IpAddr::V6(v) => u128::from(v),
        }
    }

    fn mask(&self) -> u128 {
        let w = self.width();
        let all = if w == 32 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        if self.prefix == 0 {
            0
        } else {
            all & !((1u128 << (w - u32::from(self.prefix))) - 1)
        }
    }

    fn network_string(&self) -> String {
        let bits = self.bits(self.addr) & self.mask();
        let ip: IpAddr = if self.addr.is_ipv4() {
            IpAddr::V4((bits as u32).into())
        } else {
            IpAddr::V6(bits.into())
        };
        format!("{ip}/{}", self.prefix)
    }

    /// Whether the network contains an address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && self.bits(ip) & self.mask() == self.bits(self.addr)
    }

    /// Whether `ip` is the network's own address (its first, all host bits
    /// zero), which no host may take; /31 and /32 (/127, /128) have none.
    pub fn is_network_address(&self, ip: IpAddr) -> bool {
        self.width() - u32::from(self.prefix) > 1 && self.bits(ip) == self.bits(self.addr)
    }

    /// The first host address: the one after the network address.
    pub fn first_host(&self) -> String {
        let bits = self.bits(self.addr) + 1;
        let ip: IpAddr = if self.addr.is_ipv4() {
            IpAddr::V4((bits as u32).into())
        } else {
            IpAddr::V6(bits.into())
        };
        ip.to_string()
    }

    /// An IPv4 network's first and last address (network and broadcast
    /// included) as integers; none for IPv6.
    pub fn ipv4_bounds(&self) -> Option<(u32, u32)> {
        let std::net::IpAddr::V4(a) = self.addr else {
            return None;
        };
        let first = u32::from(a);
        let size = 1u64 << (32 - u32::from(self.prefix));
        Some((first, (u64::from(first) + size - 1) as u32))
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let shorter = if self.prefix <= other.prefix {
            self
        } else {
            other
        };
        shorter.contains(if shorter == self {
            other.addr
        } else {
            self.addr
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Checks a node's underlay address `A.B.C.D/N` (issue 19): an IPv4 host address
/// with a prefix of 8 to 30 that is neither the network's nor its broadcast address.
/// Returns the address and the prefix length, or what is wrong.
pub fn underlay_host(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or("has no `/PREFIX` (the underlay subnet's length)")?;
    let addr: std::net::Ipv4Addr = a
        .parse()
        .map_err(|_| format!("has `{a}`, which is not an IPv4 address"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or("needs a prefix length of 8 to 30")?;
    let host_bits = (1u32 << (32 - u32::from(prefix))) - 1;
    let bits = u32::from(addr) & host_bits;
    if bits == 0 {
        return Err("is its subnet's network address".to_owned());
    }
    if bits == host_bits {
        return Err("is its subnet's broadcast address".to_owned());
    }
    Ok((addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_underlay_is_a_host_address_with_its_prefix() {
        assert_eq!(
            underlay_host("10.255.0.11/24").expect("valid"),
            ("10.255.0.11".parse().expect("ip"), 24)
        );
        for (bad, why) in [
            ("10.255.0.11", "has no `/PREFIX`"),
            ("fd00::1/64", "not an IPv4 address"),
            ("10.255.0.11/31", "8 to 30"),
            ("10.255.0.0/24", "network address"),
            ("10.255.0.255/24", "broadcast address"),
        ] {
            let e = underlay_host(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn parse_refuses_what_is_not_a_network_and_says_why() {
        assert_eq!(Cidr::parse("10.0.0.0").unwrap_err(), "it has no `/PREFIX`");
        assert_eq!(
            Cidr::parse("10.0.0/8").unwrap_err(),
            "`10.0.0` is not an IP address"
        );
        assert_eq!(
            Cidr::parse("10.0.0.0/33").unwrap_err(),
            "the prefix length must be 0..=32"
        );
        assert_eq!(
            Cidr::parse("10.0.0.1/24").unwrap_err(),
            "host bits are set; the network address is 10.0.0.0/24"
        );
        assert_eq!(
            Cidr::parse("fd00::1/64").unwrap_err(),
            "host bits are set; the network address is fd00::/64"
        );
        assert_eq!(
            Cidr::parse("0.0.0.0/0").expect("all").to_string(),
            "0.0.0.0/0"
        );
    }

    #[test]
    fn hosts_containment_and_overlap() {
        let net = Cidr::parse("10.20.0.0/24").expect("valid");
        assert!(net.contains(ip("10.20.0.255")));
        assert!(!net.contains(ip("10.20.1.0")));
        assert!(!net.contains(ip("::1")));
        assert!(net.is_network_address(ip("10.20.0.0")));
        assert_eq!(net.first_host(), "10.20.0.1");
        // A /31 has no network address to keep free.
        assert!(
            !Cidr::parse("10.0.0.0/31")
                .expect("valid")
                .is_network_address(ip("10.0.0.0"))
        );
        let wide = Cidr::parse("10.0.0.0/8").expect("valid");
        assert!(net.overlaps(&wide) && wide.overlaps(&net));
        assert!(!net.overlaps(&Cidr::parse("10.20.1.0/24").expect("valid")));
        assert!(!net.overlaps(&Cidr::parse("::/0").expect("valid")));
        assert_eq!(
            Cidr::parse("fd00::/64").expect("valid").first_host(),
            "fd00::1"
        );
    }
}
