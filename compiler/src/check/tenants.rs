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
                let ipv6 = n.ipv6.as_ref().and_then(|p| {
                    let problem = match Cidr::parse(&p.value) {
                        Ok(c) if c.prefix() == 64 && c.ipv4_bounds().is_none() => {
                            return Some(p.value.clone());
                        }
                        Ok(c) if c.ipv4_bounds().is_some() => {
                            "an IPv4 CIDR (the network's IPv4 CIDR is `cidr`)".to_owned()
                        }
                        Ok(c) => format!(
                            "a /{}: guests take their addresses by SLAAC, which needs a /64",
                            c.prefix()
                        ),
                        Err(why) => format!("not a valid CIDR: {why}"),
                    };
                    self.push(
                        Diagnostic::error(
                            "cairn::check::invalid_ipv6_prefix",
                            p.span,
                            format!("`{}` is {problem}", p.value),
                        )
                        .with_help(
                            "write an IPv6 /64 with no host bits set, e.g. \"fd00:20::/64\"",
                        ),
                    );
                    None
                });
                if let (Some(p), None) = (&n.ipv6, &n.gateway) {
                    self.push(
                        Diagnostic::error(
                            "cairn::check::ipv6_without_gateway",
                            p.span,
                            format!("network `{}` has an IPv6 prefix but no gateway: its IPv6 gateway and router advertisements live beside the IPv4 gateway", n.name.value),
                        )
                        .with_help("give it a gateway, e.g. gateway=\"10.20.0.1\", or remove ipv6="),
                    );
                }
                let external = n.external.as_ref().is_some_and(|e| e.value);
                if let Some(e) = &n.external
                    && e.value
                    && n.gateway.is_none()
                {
                    let example = cidr.map_or_else(|| "10.20.0.1".to_owned(), |c| c.first_host());
                    self.push(
                        Diagnostic::error(
                            "cairn::check::external_without_gateway",
                            e.span,
                            format!("network `{}` is external but has no gateway: its VMs reach outside through the gateway, which SNATs them to the node's management address", n.name.value),
                        )
                        .with_help(format!("give it a gateway, e.g. gateway=\"{example}\", or remove external=#true")),
                    );
                }
                let span = n.cidr.as_ref().map_or(n.name.span, |c| c.span);
                self.spans.insert(
                    "network",
                    &format!("{}/{}", t.name.value, n.name.value),
                    span,
                );
                if let Some(cidr) = cidr {
                    parsed.push((n, cidr));
                }
                networks.push(Network {
                    name: n.name.value.clone(),
                    site: n.site.as_ref().map(|s| s.value.clone()).unwrap_or_default(),
                    cidr: n.cidr.as_ref().map(|c| c.value.clone()).unwrap_or_default(),
                    gateway: n.gateway.as_ref().map(|g| g.value.clone()),
                    vni: 0,
                    external,
                    ipv6,
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
            let mut groups = vec![];
            for sg in &t.security_groups {
                let mut allow = vec![];
                for a in &sg.allow {
                    let from_cidr = a
                        .from
                        .as_ref()
                        .and_then(|f| self.rule_end(t, &sg.name.value, "from", f, &parsed));
                    let to_cidr =
                        a.to.as_ref()
                            .and_then(|f| self.rule_end(t, &sg.name.value, "to", f, &parsed));
                    let proto = a.proto.as_ref().map_or(Proto::Tcp, |p| p.value);
                    let ports = a.port.as_ref().filter(|p| {
                        let takes_ports = matches!(proto, Proto::Tcp | Proto::Udp);
                        if !takes_ports {
                            self.push(
                                Diagnostic::error(
                                    "cairn::check::port_without_ports",
                                    p.span,
                                    format!(
                                        "security-group `{}` gives a port for proto=\"{}\", which has no ports",
                                        sg.name.value,
                                        proto.as_str()
                                    ),
                                )
                                .with_help("ports apply to proto=\"tcp\" and proto=\"udp\"; remove `port`, or choose one of them"),
                            );
                        }
                        takes_ports
                    });
                    allow.push(AllowRule {
                        from: a.from.as_ref().map(|f| f.value.clone()).unwrap_or_default(),
                        from_cidr: from_cidr.unwrap_or_default(),
                        to: a.to.as_ref().map(|f| f.value.clone()),
                        to_cidr,
                        proto,
                        port: ports.map(|p| p.value.first),
                        port_end: ports
                            .filter(|p| p.value.last != p.value.first)
                            .map(|p| p.value.last),
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

impl Checker<'_> {
    /// One end (`from` or `to`) of an allow rule as a CIDR: the network of
    /// the tenant by that name, or the CIDR written; an error otherwise.
    fn rule_end(
        &mut self,
        t: &spec::TenantSpec,
        group: &str,
        key: &str,
        end: &spec::Spanned<String>,
        networks: &[(&spec::NetworkSpec, Cidr)],
    ) -> Option<String> {
        if let Some((_, cidr)) = networks.iter().find(|(n, _)| n.name.value == end.value) {
            return Some(cidr.to_string());
        }
        if t.networks.iter().any(|n| n.name.value == end.value) {
            // A network whose own CIDR is invalid: reported there.
            return None;
        }
        match Cidr::parse(&end.value) {
            Ok(c) => Some(c.to_string()),
            Err(why) => {
                let names: Vec<&str> = t.networks.iter().map(|n| n.name.value.as_str()).collect();
                let looks_like_cidr =
                    end.value.contains('/') || end.value.parse::<IpAddr>().is_ok();
                let help = match (looks_like_cidr, why.contains("network address")) {
                    (true, true) => format!("`{}` is not a valid CIDR: {why}", end.value),
                    (true, false) => format!(
                        "`{}` is not a valid CIDR: {why}; write e.g. \"10.20.0.0/24\"",
                        end.value
                    ),
                    (false, _) => suggestion(&end.value, &names, "network"),
                };
                let direction = if key == "from" { "from" } else { "to" };
                self.push(
                    Diagnostic::error(
                        "cairn::resolve::unknown_network",
                        end.span,
                        format!(
                            "security-group `{group}` allows {direction} `{}`, which is neither a network of tenant `{}` nor a CIDR",
                            end.value, t.name.value
                        ),
                    )
                    .with_help(help),
                );
                None
            }
        }
    }
}
