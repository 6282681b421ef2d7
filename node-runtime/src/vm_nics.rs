//! VM NICs: per NIC, a persistent tap on a bridge per tenant network, in the node's
//! network namespace (the `network` crate's `tenant` module does the kernel work).
//!
//! Taps are made when a VM is defined (and made again, idempotently, when it is
//! defined again with the same definition or started), and removed with the VM.
//! Bridges are shared by the tenant network's VMs and stay. At start, `cairn-vmm`
//! runs in the node's namespace and attaches a virtio-net device to each tap
//! ([`vmm_nics`]), with a MAC fixed by the VM's name and the NIC's index ([`mac`]).
//!
//! Architecture invariant: where network actions are refused (`Bonds::refusal`),
//! nothing here touches the kernel; Observe reports each NIC as not ready, with why.

use std::collections::BTreeMap;

use network::NetNs;
use network::tenant::{
    ensure_tenant_bridge, ensure_vm_tap, remove_vm_tap, tenant_bridge_name, vm_tap_name,
};
use proto::v1::{self, VmNicStatus};
use tonic::Status;

use crate::validate;

/// Default MTU of a VM NIC.
const DEFAULT_MTU: u32 = 1500;

fn mtu(nic: &v1::VmNic) -> u32 {
    if nic.mtu == 0 { DEFAULT_MTU } else { nic.mtu }
}

/// Checks the tenant and NICs of a `CreateVm`.
pub fn validate(create: &v1::CreateVm) -> Result<(), Status> {
    if create.nics.is_empty() {
        return Ok(());
    }
    validate::name("create_vm.tenant", &create.tenant)?;
    validate::within(
        "create_vm.nics",
        &vm_config::limits::NICS,
        create.nics.len() as u64,
    )?;
    for (index, nic) in create.nics.iter().enumerate() {
        validate::name(&format!("create_vm.nics[{index}].network"), &nic.network)?;
        if nic.mtu != 0 && !(68..=65535).contains(&nic.mtu) {
            return Err(validate::invalid(
                &format!("create_vm.nics[{index}].mtu"),
                format!("{} is out of range 68..=65535", nic.mtu),
            ));
        }
        if !nic.ipv4.is_empty() && nic.ipv4.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(validate::invalid(
                &format!("create_vm.nics[{index}].ipv4"),
                format!("{:?} is not an IPv4 address like 10.20.0.5", nic.ipv4),
            ));
        }
    }
    Ok(())
}

/// The guest's MAC on NIC `index` of `vm`: locally administered, fixed by the name.
pub fn mac(vm: &str, index: usize) -> String {
    vmm::devices::virtio_net::format_mac(vmm::devices::virtio_net::default_mac(vm, index))
}

/// `vm`'s NICs as `cairn-vmm` attaches them: each on its tap, with its MAC and, when
/// given, the IPv4 address the built-in guest answers for (validated at CreateVm).
pub fn vmm_nics(vm: &str, nics: &[v1::VmNic]) -> Vec<vm_config::NicConfig> {
    nics.iter()
        .enumerate()
        .map(|(index, nic)| vm_config::NicConfig {
            tap: vm_tap_name(vm, nic_index(index)),
            mac: vm_config::MacAddress(vmm::devices::virtio_net::default_mac(vm, index)),
            ipv4: nic.ipv4.parse().ok(),
        })
        .collect()
}

fn nic_index(index: usize) -> u16 {
    u16::try_from(index).unwrap_or(u16::MAX)
}

/// Makes (or repairs) every NIC of `vm`: the tenant network's bridge, the tap, the tap
/// on the bridge, both up. On failure the taps made for this VM are removed again.
pub fn ensure(netns: &NetNs, vm: &str, tenant: &str, nics: &[v1::VmNic]) -> Result<(), Status> {
    let result = nics.iter().enumerate().try_for_each(|(index, nic)| {
        ensure_tenant_bridge(netns, tenant, &nic.network, mtu(nic))?;
        let bridge = tenant_bridge_name(tenant, &nic.network);
        ensure_vm_tap(netns, vm, nic_index(index), &bridge, mtu(nic)).map(|_| ())
    });
    result.map_err(|error| {
        remove(netns, vm, nics.len());
        Status::failed_precondition(format!(
            "node {}: cannot make the NICs of vm `{vm}`: {error}",
            netns.node()
        ))
    })
}

/// Removes the taps of `vm`'s first `count` NICs (missing ones are fine).
pub fn remove(netns: &NetNs, vm: &str, count: usize) {
    for index in 0..count {
        let _ = remove_vm_tap(netns, vm, nic_index(index));
    }
}

/// A VM's NICs as the node sees them.
#[derive(Debug)]
pub struct VmNics<'a> {
    /// VM name.
    pub vm: &'a str,
    /// Tenant.
    pub tenant: &'a str,
    /// NICs, in order.
    pub nics: &'a [v1::VmNic],
}

/// The status of every NIC of `vms`, read with one link dump; `refusal` says why
/// nothing is made when network actions are refused.
pub fn statuses(
    netns: &NetNs,
    refusal: Option<&str>,
    vms: &[VmNics<'_>],
) -> BTreeMap<String, Vec<VmNicStatus>> {
    let links = match refusal {
        Some(reason) => Err(format!(
            "not made: network actions are refused here: {reason}"
        )),
        None => network::nl::Rtnl::open(netns)
            .and_then(|mut rtnl| rtnl.links())
            .map_err(|error| format!("cannot read the node's links: {error}")),
    };
    vms.iter()
        .map(|vm| {
            let nics = vm
                .nics
                .iter()
                .enumerate()
                .map(|(index, nic)| {
                    let tap = vm_tap_name(vm.vm, nic_index(index));
                    let bridge = tenant_bridge_name(vm.tenant, &nic.network);
                    let detail = match &links {
                        Err(why) => why.clone(),
                        Ok(links) => {
                            let find = |name: &str| links.iter().find(|l| l.name == name);
                            match (find(&tap), find(&bridge)) {
                                (None, _) => format!("tap {tap} does not exist"),
                                (_, None) => format!("bridge {bridge} does not exist"),
                                (Some(t), Some(b)) if t.controller != Some(b.index) => {
                                    format!("tap {tap} is not attached to bridge {bridge}")
                                }
                                (Some(t), _) if !t.admin_up => format!("tap {tap} is down"),
                                (_, Some(b)) if !b.admin_up => format!("bridge {bridge} is down"),
                                _ => String::new(),
                            }
                        }
                    };
                    VmNicStatus {
                        network: nic.network.clone(),
                        tap,
                        bridge,
                        ready: detail.is_empty(),
                        detail,
                        mac: mac(vm.vm, index),
                        ..VmNicStatus::default()
                    }
                })
                .collect();
            (vm.vm.to_string(), nics)
        })
        .collect()
}
