//! Per-VM networking groundwork: one bridge per tenant network on a node,
//! one persistent tap device per VM NIC attached to it.
//!
//! Names are deterministic (FNV-1a of the tenant/network or VM name) and fit
//! the kernel's 15-character limit: bridge `cbr` + 12 hex digits, tap `ct` +
//! 10 hex digits + NIC index in hex (at most 3 digits).

use std::os::fd::AsRawFd;

use serde::Serialize;

use crate::NetworkError;
use crate::netns::NetNs;
use crate::nl::Rtnl;

/// Bridge name of a tenant network (`cbr` + 12 hex digits).
pub fn tenant_bridge_name(tenant: &str, network: &str) -> String {
    let h = crate::fnv1a(format!("{tenant}/{network}").as_bytes());
    format!("cbr{:012x}", h & 0xffff_ffff_ffff)
}

/// Tap name of a VM NIC (`ct` + 10 hex digits + index in hex).
pub fn vm_tap_name(vm: &str, nic_index: u16) -> String {
    let h = crate::fnv1a(vm.as_bytes());
    format!("ct{:010x}{:x}", h & 0xff_ffff_ffff, nic_index.min(0xfff))
}

/// A tenant bridge as observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedTenantNetwork {
    /// Bridge name.
    pub bridge: String,
    /// Exists.
    pub exists: bool,
    /// Administratively up.
    pub up: bool,
    /// MTU.
    pub mtu: u32,
    /// Attached ports (taps, uplinks), sorted.
    pub ports: Vec<String>,
}

/// Ensures the tenant network's bridge exists and is up. Returns the changes made.
pub fn ensure_tenant_bridge(
    ns: &NetNs,
    tenant: &str,
    network: &str,
    mtu: u32,
) -> Result<Vec<String>, NetworkError> {
    let nl = |e| NetworkError::netlink(ns, e);
    let name = tenant_bridge_name(tenant, network);
    let mut rtnl = Rtnl::open(ns).map_err(nl)?;
    let mut actions = Vec::new();
    let link = match rtnl.link(&name).map_err(nl)? {
        Some(l) => l,
        None => match rtnl.create_bridge(&name, None, Some(mtu)) {
            Ok(()) => {
                actions.push(format!("create bridge {name} for {tenant}/{network}"));
                rtnl.require_link(&name).map_err(nl)?
            }
            // Made in between by the other path that makes it (a VM's NICs and the
            // network's segment are made at once; seen: "File exists" failing a
            // CreateVm on the dev cluster): the checks below still apply.
            Err(e) => rtnl.link(&name).map_err(nl)?.ok_or_else(|| nl(e))?,
        },
    };
    if link.kind.as_deref() != Some("bridge") {
        return Err(NetworkError::DeviceConflict {
            node: ns.node().to_owned(),
            name,
            kind: link.kind.unwrap_or_default(),
        });
    }
    if link.mtu != mtu {
        rtnl.set_mtu(link.index, mtu).map_err(nl)?;
        actions.push(format!("set mtu {mtu} on {name}"));
    }
    if !link.admin_up {
        rtnl.set_link_up(link.index, true).map_err(nl)?;
        actions.push(format!("set {name} up"));
    }
    Ok(actions)
}

fn create_persistent_tap(ns: &NetNs, name: &str) -> Result<(), NetworkError> {
    let owned = name.to_owned();
    let result = ns
        .run(move || -> std::io::Result<()> {
            const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
            const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
            const IFF_TAP: libc::c_short = 0x0002;
            const IFF_NO_PI: libc::c_short = 0x1000;
            const IFF_VNET_HDR: libc::c_short = 0x4000;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            // SAFETY: ifreq is plain old data; all-zero is valid.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(owned.as_bytes()) {
                *d = *s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
            // SAFETY: the fd is an open /dev/net/tun; ifr is a valid ifreq
            // with a nul-terminated name (15 chars max, checked by caller).
            if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut ifr) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: same fd; TUNSETPERSIST takes an int argument by value.
            if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
        .map_err(NetworkError::Netns)?;
    result.map_err(|source| NetworkError::Tap {
        node: ns.node().to_owned(),
        tap: name.to_owned(),
        source,
    })
}

/// Ensures a persistent tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, ready for
/// virtio-net) exists for the VM NIC, is up and attached to `bridge`.
/// Returns the tap name and the changes made.
pub fn ensure_vm_tap(
    ns: &NetNs,
    vm: &str,
    nic_index: u16,
    bridge: &str,
    mtu: u32,
) -> Result<(String, Vec<String>), NetworkError> {
    let nl = |e| NetworkError::netlink(ns, e);
    let tap = vm_tap_name(vm, nic_index);
    let mut rtnl = Rtnl::open(ns).map_err(nl)?;
    let br = rtnl.require_link(bridge).map_err(nl)?;
    let mut actions = Vec::new();
    let link = match rtnl.link(&tap).map_err(nl)? {
        Some(l) => l,
        None => {
            create_persistent_tap(ns, &tap)?;
            actions.push(format!("create tap {tap} for {vm} nic {nic_index}"));
            rtnl.require_link(&tap).map_err(nl)?
        }
    };
    if link.kind.as_deref() != Some("tun") {
        return Err(NetworkError::DeviceConflict {
            node: ns.node().to_owned(),
            name: tap,
            kind: link.kind.unwrap_or_default(),
        });
    }
    if link.mtu != mtu {
        rtnl.set_mtu(link.index, mtu).map_err(nl)?;
        actions.push(format!("set mtu {mtu} on {tap}"));
    }
    if link.controller != Some(br.index) {
        rtnl.set_controller(link.index, br.index).map_err(nl)?;
        actions.push(format!("attach {tap} to {bridge}"));
    }
    if !link.admin_up {
        rtnl.set_link_up(link.index, true).map_err(nl)?;
        actions.push(format!("set {tap} up"));
    }
    Ok((tap, actions))
}

/// Removes a VM NIC's tap; missing is not an error.
pub fn remove_vm_tap(ns: &NetNs, vm: &str, nic_index: u16) -> Result<(), NetworkError> {
    let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
    rtnl.delete_link(&vm_tap_name(vm, nic_index))
        .map_err(|e| NetworkError::netlink(ns, e))
}

/// Reads a tenant network's bridge and its ports.
pub fn observe_tenant_network(
    ns: &NetNs,
    tenant: &str,
    network: &str,
) -> Result<ObservedTenantNetwork, NetworkError> {
    let nl = |e| NetworkError::netlink(ns, e);
    let bridge = tenant_bridge_name(tenant, network);
    let mut rtnl = Rtnl::open(ns).map_err(nl)?;
    let links = rtnl.links().map_err(nl)?;
    let Some(br) = links.iter().find(|l| l.name == bridge) else {
        return Ok(ObservedTenantNetwork {
            bridge,
            exists: false,
            up: false,
            mtu: 0,
            ports: Vec::new(),
        });
    };
    let mut ports: Vec<String> = links
        .iter()
        .filter(|l| l.controller == Some(br.index))
        .map(|l| l.name.clone())
        .collect();
    ports.sort();
    Ok(ObservedTenantNetwork {
        bridge: bridge.clone(),
        exists: true,
        up: br.admin_up,
        mtu: br.mtu,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_and_fit_ifnamsiz() {
        let b = tenant_bridge_name("finance", "fin-app");
        assert_eq!(b, tenant_bridge_name("finance", "fin-app"));
        assert_ne!(b, tenant_bridge_name("finance", "fin-db"));
        assert!(b.len() <= 15 && crate::spec::valid_ifname(&b), "{b}");
        for nic in [0u16, 1, 15, 4095, u16::MAX] {
            let t = vm_tap_name("a-vm-with-a-very-long-name-0001", nic);
            assert!(t.len() <= 15 && crate::spec::valid_ifname(&t), "{t}");
        }
        assert_ne!(vm_tap_name("vm", 0), vm_tap_name("vm", 1));
    }
}
