//! Addresses and VNIs at compile time: pinned NIC addresses are checked
//! (IPv4, inside the network, not its network, broadcast or gateway address,
//! not pinned twice) by `pins`, then [`crate::ipam::allocate`] runs with no
//! previous placement (`Checker::run` calls it) and `allocated` writes its
//! result into the model; a network that runs out of addresses is an error at
//! its CIDR.

use std::collections::BTreeMap;

use super::{Checker, list};
use crate::diag::{Diagnostic, Span};
use crate::ipam::{Hosts, PinError};
use crate::model::*;

impl Checker<'_> {
    /// The pinned NIC addresses checked; a wrong one is reported and dropped
    /// (the NIC then gets one from IPAM).
    pub(super) fn pins(&mut self, tenants: &[Tenant], vms: &mut [Vm]) {
        // (tenant, network, address) → the first VM NIC that pinned it.
        let mut pins: BTreeMap<(String, String, u32), (String, Span)> = BTreeMap::new();
        let mut spans = std::mem::take(&mut self.pinned);
        for vm in vms.iter_mut() {
            for (i, nic) in vm.nics.iter_mut().enumerate() {
                let Some(span) = spans.remove(&(vm.name.clone(), i)) else {
                    continue;
                };
                let text = nic.address.clone().unwrap_or_default();
                let net = tenants
                    .iter()
                    .find(|t| t.name == vm.tenant)
                    .and_then(|t| t.networks.iter().find(|n| n.name == nic.network));
                // An unknown network is reported where the NIC names it.
                let Some(net) = net else { continue };
                let Some(hosts) = Hosts::of(net) else {
                    if text.parse::<std::net::Ipv4Addr>().is_err()
                        || crate::cidr::Cidr::parse(&net.cidr).is_ok()
                    {
                        self.push(
                            Diagnostic::error(
                                "cairn::check::invalid_address",
                                span,
                                format!("vm `{}` pins `{text}` on network `{}` ({}); cairn gives out IPv4 addresses only", vm.name, net.name, net.cidr),
                            )
                            .with_help("attach the NIC to an IPv4 network, or remove `address`"),
                        );
                    }
                    nic.address = None;
                    nic.pinned = false;
                    continue;
                };
                let range = hosts.range_text();
                let cidr = hosts.cidr();
                let wrong = |what: String| {
                    Diagnostic::error("cairn::check::invalid_address", span, what)
                        .with_label("pinned here")
                };
                let bad = match hosts.check_pin(&text) {
                    Ok(a) => {
                        let key = (vm.tenant.clone(), net.name.clone(), a);
                        if let Some((other, first)) = pins.get(&key) {
                            Some(
                                Diagnostic::error(
                                    "cairn::check::duplicate_address",
                                    span,
                                    format!("vm `{}` pins {text} on network `{}`, which vm `{other}` already pinned", vm.name, net.name),
                                )
                                .with_label("pinned again here")
                                .and_label(*first, format!("`{other}` pins it here"))
                                .with_help(format!("every NIC of a network needs its own address; choose another in {range}, or remove `address` to let IPAM choose")),
                            )
                        } else {
                            pins.insert(key, (vm.name.clone(), span));
                            None
                        }
                    }
                    Err(PinError::NotIpv4) => Some(
                        wrong(format!("`{text}` is not an IPv4 address"))
                            .with_help(format!("write a dotted quad of network `{}` ({cidr}), e.g. one in {range}", net.name)),
                    ),
                    Err(PinError::Outside) => Some(
                        wrong(format!("address {text} is outside network `{}` ({cidr})", net.name))
                            .with_help(format!("choose an address in {range}")),
                    ),
                    Err(PinError::NetworkAddress) => Some(
                        wrong(format!("address {text} is the network address of `{}` ({cidr}), which no host may take", net.name))
                            .with_help(format!("choose an address in {range}")),
                    ),
                    Err(PinError::Broadcast) => Some(
                        wrong(format!("address {text} is the broadcast address of `{}` ({cidr}), which no host may take", net.name))
                            .with_help(format!("choose an address in {range}")),
                    ),
                    Err(PinError::Gateway) => Some(
                        wrong(format!("address {text} is the gateway of network `{}`", net.name))
                            .with_help(format!("the gateway answers on every node; choose another address in {range}")),
                    ),
                };
                if let Some(d) = bad {
                    self.push(d);
                    nic.address = None;
                    nic.pinned = false;
                }
            }
        }
    }

    /// IPAM's allocation (with no previous placement) written into the model,
    /// and a network that ran out of addresses reported at its CIDR.
    pub(super) fn allocated(
        &mut self,
        alloc: &crate::ipam::Allocation,
        tenants: &mut [Tenant],
        vms: &mut [Vm],
    ) {
        for vm in vms.iter_mut() {
            for (i, nic) in vm.nics.iter_mut().enumerate() {
                if !nic.pinned {
                    nic.address = alloc.address(&vm.name, i).map(str::to_owned);
                }
            }
        }
        for t in tenants.iter_mut() {
            for n in &mut t.networks {
                n.vni = alloc
                    .vnis
                    .get(&(t.name.clone(), n.name.clone()))
                    .copied()
                    .unwrap_or(0);
            }
        }
        // Starved NICs, per network.
        let mut starved: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
        for (vm, _, tenant, network) in &alloc.starved {
            starved.entry((tenant, network)).or_default().push(vm);
        }
        for ((tenant, network), short) in starved {
            let Some(net) = tenants
                .iter()
                .find(|t| t.name == tenant)
                .and_then(|t| t.networks.iter().find(|n| n.name == network))
            else {
                continue;
            };
            let Some(hosts) = Hosts::of(net) else {
                continue;
            };
            let needed = vms
                .iter()
                .flat_map(|v| v.nics.iter().filter(move |_| v.tenant == tenant))
                .filter(|n| n.network == network)
                .count();
            let Some(span) = self.spans.get("network", &format!("{tenant}/{network}")) else {
                continue;
            };
            let bigger = hosts.cidr().prefix().saturating_sub(1);
            self.push(
                Diagnostic::error(
                    "cairn::check::network_full",
                    span,
                    format!(
                        "network `{network}` of tenant `{tenant}` ({}) runs out of addresses: {needed} NICs need one and it has {} to give out ({}); no address is left for {}",
                        hosts.cidr(),
                        hosts.capacity(),
                        hosts.range_text(),
                        list(&short, 5)
                    ),
                )
                .with_label("too small")
                .with_help(format!(
                    "widen the network (a /{bigger} has twice the room), or attach fewer NICs to it"
                )),
            );
        }
    }
}
