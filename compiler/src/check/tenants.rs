//! `tenant`: networks (CIDRs, gateways, overlaps), security groups,
//! members, quota and budget.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::{Checker, unique, unknown};
use crate::cidr::Cidr;
use crate::diag::{Diagnostic, suggestion};
use crate::model::*;
use crate::spec::{self, SpecSet};

impl Checker<'_> {
    pub(super) fn tenants(&mut self, set: &SpecSet, sites: &[Site]) -> Vec<Tenant> {
        unique(
            self.diags,
            "tenant",
            "",
            set.tenants.iter().map(|t| &t.name),
        );
        let site_names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        let mut seen = BTreeSet::new();
        let mut out = vec![];
        for t in &set.tenants {
            if !seen.insert(&t.name.value) {
                continue;
            }
            self.spans.insert("tenant", &t.name.value, t.name.span);
            let scope = format!(" in tenant `{}`", t.name.value);
            unique(
                self.diags,
                "network",
                &scope,
                t.networks.iter().map(|n| &n.name),
            );
            unique(
                self.diags,
                "security-group",
                &scope,
                t.security_groups.iter().map(|n| &n.name),
            );
            unique(
                self.diags,
                "member",
                &scope,
                t.members.iter().map(|m| &m.email),
            );
            let mut networks = vec![];
            let mut parsed: Vec<(&spec::NetworkSpec, Cidr)> = vec![];
            for n in &t.networks {
                let owner = format!("network `{}`", n.name.value);
                if let Some(site) = &n.site
                    && !site_names.contains(&site.value.as_str())
                {
                    self.push(unknown(
                        "cairn::resolve::unknown_site",
                        site,
                        "site",
                        &owner,
                        &site_names,
                    ));
                }
                let cidr = n.cidr.as_ref().and_then(|c| match Cidr::parse(&c.value) {
                    Ok(v) => Some(v),
                    Err(why) => {
                        self.push(
                            Diagnostic::error("cairn::check::invalid_cidr", c.span, format!("`{}` is not a valid CIDR: {why}", c.value))
                                .with_help("write an address and a prefix length with no host bits set, e.g. \"10.20.0.0/24\""),
                        );
                        None
                    }
                });
                if let (Some(cidr), Some(g)) = (&cidr, &n.gateway) {
                    match g.value.parse::<IpAddr>() {
                        Ok(ip) if cidr.contains(ip) && !cidr.is_network_address(ip) => {}
                        Ok(_) => self.push(
                            Diagnostic::error(
                                "cairn::check::gateway_outside_network",
                                g.span,
                                format!("gateway {} is not a host address of {}", g.value, cidr),
                            )
                            .with_help(format!(
                                "choose an address inside {cidr}, e.g. {}",
                                cidr.first_host()
                            )),
                        ),
                        Err(_) => self.push(
                            Diagnostic::error(
                                "cairn::check::invalid_address",
                                g.span,
                                format!("`{}` is not an IP address", g.value),
                            )
                            .with_help("write an IPv4 or IPv6 address, e.g. \"10.20.0.1\""),
                        ),
                    }
                }
                if let Some(cidr) = cidr {
                    parsed.push((n, cidr));
                }
                networks.push(Network {
                    name: n.name.value.clone(),
                    site: n.site.as_ref().map(|s| s.value.clone()).unwrap_or_default(),
                    cidr: n.cidr.as_ref().map(|c| c.value.clone()).unwrap_or_default(),
                    gateway: n.gateway.as_ref().map(|g| g.value.clone()),
                });
            }
            for (i, (a, ca)) in parsed.iter().enumerate() {
                for (b, cb) in &parsed[..i] {
                    let same_site =
                        a.site.as_ref().map(|s| &s.value) == b.site.as_ref().map(|s| &s.value);
                    if same_site && ca.overlaps(cb) {
                        let (Some(sa), Some(sb)) = (&a.cidr, &b.cidr) else {
                            continue;
                        };
                        self.push(
                            Diagnostic::error(
                                "cairn::check::overlapping_cidr",
                                sa.span,
                                format!(
                                    "network `{}` ({}) overlaps network `{}` ({}) of tenant `{}` on the same site",
                                    a.name.value, sa.value, b.name.value, sb.value, t.name.value
                                ),
                            )
                            .with_label("overlaps")
                            .and_label(sb.span, format!("`{}` is here", b.name.value))
                            .with_help("networks of one tenant on one site need disjoint address ranges"),
                        );
                    }
                }
            }
            let network_names: Vec<&str> =
                t.networks.iter().map(|n| n.name.value.as_str()).collect();
            let mut groups = vec![];
            for sg in &t.security_groups {
                let mut allow = vec![];
                for a in &sg.allow {
                    if let Some(from) = &a.from
                        && !network_names.contains(&from.value.as_str())
                        && Cidr::parse(&from.value).is_err()
                    {
                        self.push(
                            Diagnostic::error(
                                "cairn::resolve::unknown_network",
                                from.span,
                                format!("security-group `{}` allows from `{}`, which is neither a network of tenant `{}` nor a CIDR", sg.name.value, from.value, t.name.value),
                            )
                            .with_help(suggestion(&from.value, &network_names, "network")),
                        );
                    }
                    allow.push(AllowRule {
                        from: a.from.as_ref().map(|f| f.value.clone()).unwrap_or_default(),
                        proto: a.proto.as_ref().map_or(Proto::Tcp, |p| p.value),
                        port: a.port.as_ref().map(|p| p.value),
                    });
                }
                groups.push(SecurityGroup {
                    name: sg.name.value.clone(),
                    allow,
                });
            }
            networks.sort_by(|a, b| a.name.cmp(&b.name));
            groups.sort_by(|a, b| a.name.cmp(&b.name));
            let mut members: Vec<Member> = t
                .members
                .iter()
                .map(|m| Member {
                    email: m.email.value.clone(),
                    role: m.role.as_ref().map_or(Role::Viewer, |r| r.value),
                    key: m.key.as_ref().map(|k| k.value.clone()),
                })
                .collect();
            members.sort_by(|a, b| a.email.cmp(&b.email));
            out.push(Tenant {
                name: t.name.value.clone(),
                quota: t.quota.as_ref().map(|q| Quota {
                    vcpus: q.vcpus.as_ref().map(|v| v.value),
                    memory_bytes: q.memory.as_ref().map(|v| v.value),
                    storage_bytes: q.storage.as_ref().map(|v| v.value),
                    vms: q.vms.as_ref().map(|v| v.value),
                }),
                usage: Usage::default(),
                members,
                budget: t.budget.as_ref().and_then(|b| {
                    Some(Budget {
                        monthly: b.monthly.as_ref()?.value,
                        currency: b
                            .currency
                            .as_ref()
                            .map_or_else(|| "USD".to_owned(), |c| c.value.clone()),
                    })
                }),
                networks,
                security_groups: groups,
            });
        }
        out
    }
}
