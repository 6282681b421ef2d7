//! `vm` and `vm-group`: names (groups expanded), references to tenant, site,
//! SLA profile, image, pools, networks and security groups, and the rules of
//! one VM (FT needs a reserved profile, a witness and two failure domains;
//! Linux vCPU limit).

use std::collections::{BTreeMap, BTreeSet};

use super::{Checker, SpanIndex, keys, labels, unique, unknown};
use crate::diag::Diagnostic;
use crate::lower::is_dns_label;
use crate::model::*;
use crate::spec::{self, Name, Spanned, SpecSet};
use vm_config::limits::LINUX_VCPUS;

/// From how many VMs (group replicas counted) [`Checker::vms`] resolves them
/// on two threads, and `Checker::run` runs IPAM beside the affinities.
pub(super) const PARALLEL_FROM_VMS: usize = 2_000;

/// A vm-group's replica names in order, `GROUP-0` on: each one that is longer
/// than a name may be (63 characters) is an `Err`; `vm_group` reports the
/// first and takes no more (the names only grow).
fn replica_names(g: &spec::VmGroupSpec) -> impl Iterator<Item = Result<String, String>> + '_ {
    let replicas = g.replicas.as_ref().map_or(0, |r| r.value);
    (0..replicas).map(|i| {
        let name = format!("{}-{i}", g.name.value);
        if name.len() > 63 { Err(name) } else { Ok(name) }
    })
}

/// Two lists of VMs sorted by name merged into one, `first`'s VM before
/// `second`'s on equal names (as a stable sort of the two concatenated).
fn merge_by_name(first: Vec<Vm>, second: Vec<Vm>) -> Vec<Vm> {
    let mut out = Vec::with_capacity(first.len() + second.len());
    let mut first = first.into_iter().peekable();
    let mut second = second.into_iter().peekable();
    while let (Some(a), Some(b)) = (first.peek(), second.peek()) {
        let next = if b.name < a.name {
            second.next()
        } else {
            first.next()
        };
        out.extend(next);
    }
    out.extend(first);
    out.extend(second);
    out
}

impl Checker<'_> {
    /// Resolves VMs and expands vm-groups.
    pub(super) fn vms(
        &mut self,
        set: &SpecSet,
        sites: &[Site],
        tenants: &[Tenant],
        slas: &BTreeMap<String, SlaProfile>,
        images: &BTreeMap<String, Image>,
    ) -> (Vec<Vm>, Vec<VmGroup>) {
        unique(
            self.diags,
            "vm-group",
            "",
            set.vm_groups.iter().map(|g| &g.name),
        );
        // Expanded names first, so duplicates between VMs and group members
        // point at both declarations.
        let mut all_names: Vec<Name> = set.vms.iter().map(|v| v.name.clone()).collect();
        for g in &set.vm_groups {
            let n = g.replicas.as_ref().map_or(0, |r| r.value);
            for i in 0..n {
                all_names.push(Spanned {
                    value: format!("{}-{i}", g.name.value),
                    span: g.name.span,
                });
            }
        }
        unique(self.diags, "vm", "", all_names.iter());
        let known = Known::new(sites, tenants, slas, images);
        let mut out = vec![];
        let mut seen = BTreeSet::new();
        let singles: Vec<&spec::VmSpec> = set
            .vms
            .iter()
            .filter(|v| seen.insert(v.name.value.clone()))
            .collect();
        let mut seen_groups = BTreeSet::new();
        let unique_groups: Vec<&spec::VmGroupSpec> = set
            .vm_groups
            .iter()
            .filter(|g| seen_groups.insert(g.name.value.clone()))
            .collect();
        // With many VMs the groups from `later` on are resolved on a second
        // thread, with a checker of their own whose diagnostics, spans and
        // pinned addresses follow this one's: what resolving them here, after
        // the others, gives.
        let replicas = |g: &spec::VmGroupSpec| g.replicas.as_ref().map_or(0, |r| r.value) as usize;
        let total = singles.len() + unique_groups.iter().map(|g| replicas(g)).sum::<usize>();
        let mut later = unique_groups.len();
        if self.threads && total >= PARALLEL_FROM_VMS {
            let mut first = singles.len();
            later = unique_groups
                .iter()
                .position(|g| {
                    first += replicas(g);
                    first * 2 >= total
                })
                .map_or(unique_groups.len(), |at| at + 1);
        }
        let (here, there) = unique_groups.split_at(later);
        // The names `vm_group` sees as taken when it reaches `there`.
        let mut seen_there = (!there.is_empty()).then(|| seen.clone());
        if let Some(seen_there) = &mut seen_there {
            for g in here {
                seen_there.extend(replica_names(g).map_while(Result::ok));
            }
        }
        let sources = self.sources;
        let resolve_there = |seen: &mut BTreeSet<String>| {
            let mut diags = vec![];
            let mut c = Checker {
                sources,
                diags: &mut diags,
                spans: SpanIndex::default(),
                pinned: BTreeMap::new(),
                threads: false,
            };
            let mut out = vec![];
            let mut groups = vec![];
            for g in there {
                let (group, members) = c.vm_group(g, seen, &known);
                out.extend(members);
                groups.push(group);
            }
            let (spans, pinned) = (c.spans, c.pinned);
            out.sort_by(|a, b| a.name.cmp(&b.name));
            (out, groups, diags, spans, pinned)
        };
        let mut groups = vec![];
        let resolved_there = std::thread::scope(|scope| {
            let resolving =
                seen_there.map(|mut seen| scope.spawn(move || resolve_there(&mut seen)));
            for v in &singles {
                out.extend(self.single_vm(v, &known));
            }
            for g in here {
                let (group, members) = self.vm_group(g, &mut seen, &known);
                out.extend(members);
                groups.push(group);
            }
            if resolving.is_some() {
                out.sort_by(|a, b| a.name.cmp(&b.name));
            }
            resolving.map(crate::threads::join)
        });
        if let Some((vms, there_groups, diags, spans, pinned)) = resolved_there {
            // Each half sorted by name on its thread, merged here: the order
            // `Checker::run` sorts the VMs into, which it then only confirms.
            out = merge_by_name(out, vms);
            groups.extend(there_groups);
            self.diags.extend(diags);
            self.spans.append(spans);
            self.pinned.extend(pinned);
        }
        (out, groups)
    }

    /// One `vm`.
    pub(super) fn single_vm(&mut self, v: &spec::VmSpec, known: &Known<'_>) -> Option<Vm> {
        self.spans.insert("vm", &v.name.value, v.name.span);
        let owner = format!("vm `{}`", v.name.value);
        self.vm(
            &v.name.value,
            None,
            &owner,
            v.tenant.as_ref(),
            v.site.as_ref(),
            &v.body,
            known,
        )
    }

    /// One vm-group: its replicas, checked as VMs (a name `seen` already is
    /// skipped), and the group.
    pub(super) fn vm_group(
        &mut self,
        g: &spec::VmGroupSpec,
        seen: &mut BTreeSet<String>,
        known: &Known<'_>,
    ) -> (VmGroup, Vec<Vm>) {
        let mut out = vec![];
        self.spans.insert("vm-group", &g.name.value, g.name.span);
        let replicas = g.replicas.as_ref().map_or(0, |r| r.value);
        let mut members = vec![];
        for (i, name) in replica_names(g).enumerate() {
            let name = match name {
                Ok(name) => name,
                Err(name) => {
                    self.push(
                        Diagnostic::error(
                            "cairn::check::invalid_name",
                            g.name.span,
                            format!(
                                "vm-group `{}` expands to `{name}`, longer than 63 characters",
                                g.name.value
                            ),
                        )
                        .with_help("shorten the group name"),
                    );
                    break;
                }
            };
            debug_assert!(is_dns_label(&name) || !is_dns_label(&g.name.value));
            members.push(name.clone());
            if !seen.insert(name.clone()) {
                continue;
            }
            self.spans.insert("vm", &name, g.name.span);
            // Report resolution problems once per group, not once per replica.
            let owner = format!("vm-group `{}`", g.name.value);
            let before = self.diags.len();
            let vm = self.vm(
                &name,
                Some(&g.name.value),
                &owner,
                g.tenant.as_ref(),
                g.site.as_ref(),
                &g.body,
                known,
            );
            if i > 0 {
                self.diags.truncate(before);
            }
            out.extend(vm);
        }
        if let Some(m) = &g.max_unavailable
            && m.value > replicas.max(1)
        {
            self.push(
                Diagnostic::warning(
                    "cairn::check::max_unavailable_above_replicas",
                    m.span,
                    format!(
                        "max-unavailable {} is more than the group's {replicas} replicas",
                        m.value
                    ),
                )
                .with_help("it allows taking the whole group down at once; lower it"),
            );
        }
        let group = VmGroup {
            name: g.name.value.clone(),
            tenant: g
                .tenant
                .as_ref()
                .map(|t| t.value.clone())
                .unwrap_or_default(),
            site: g.site.as_ref().map(|t| t.value.clone()).unwrap_or_default(),
            replicas,
            spread: g.spread.as_ref().map(|s| s.value),
            max_unavailable: g.max_unavailable.as_ref().map_or(1, |m| m.value),
            vms: members,
        };
        (group, out)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn vm(
        &mut self,
        name: &str,
        group: Option<&str>,
        owner: &str,
        tenant: Option<&Name>,
        site: Option<&Name>,
        body: &spec::VmBody,
        known: &Known<'_>,
    ) -> Option<Vm> {
        let (sites, tenants, slas, images) =
            (known.site_list, known.tenant_list, known.slas, known.images);
        let t = tenant.and_then(|t| {
            let found = known.tenants.get(t.value.as_str()).copied();
            if found.is_none() {
                let tenant_names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
                self.push(unknown(
                    "cairn::resolve::unknown_tenant",
                    t,
                    "tenant",
                    owner,
                    &tenant_names,
                ));
            }
            found
        });
        let s = site.and_then(|s| {
            let found = known.sites.get(s.value.as_str()).copied();
            if found.is_none() {
                let site_names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
                self.push(unknown(
                    "cairn::resolve::unknown_site",
                    s,
                    "site",
                    owner,
                    &site_names,
                ));
            }
            found
        });
        let sla_name = body.sla.as_ref().map_or("on-demand", |s| s.value.as_str());
        let sla = match slas.get(sla_name) {
            Some(p) => VmSla {
                name: p.name.clone(),
                class: p.class,
                priority: p.priority,
                cpu_pinning: p.cpu_pinning,
            },
            None => {
                if let Some(r) = &body.sla {
                    self.push(unknown(
                        "cairn::resolve::unknown_sla_profile",
                        r,
                        "sla-profile",
                        owner,
                        &keys(slas),
                    ));
                }
                VmSla {
                    name: sla_name.to_owned(),
                    class: SlaClass::OnDemand,
                    priority: 500,
                    cpu_pinning: false,
                }
            }
        };
        if let Some(img) = &body.image
            && !images.contains_key(&img.value)
        {
            self.push(unknown(
                "cairn::resolve::unknown_image",
                img,
                "image",
                owner,
                &keys(images),
            ));
        }
        // Linux finds its CPUs in cairn-vmm's MP table, which has less room than
        // the built-in guest: a limit only the image says applies.
        if let (Some(img), Some(cpu)) = (&body.image, &body.cpu)
            && images.get(&img.value).is_some_and(|i| i.kernel.is_some())
            && LINUX_VCPUS.check(u64::from(cpu.value)).is_err()
        {
            self.push(
                Diagnostic::error(
                    "cairn::check::linux_vcpus",
                    cpu.span,
                    format!("{owner} boots the Linux image `{}` on {} vCPUs; a Linux guest has at most {}", img.value, cpu.value, LINUX_VCPUS.max),
                )
                .and_label(img.span, "a Linux kernel")
                .with_help(format!("{}; for example `cpu {}`", LINUX_VCPUS.rule(), LINUX_VCPUS.max)),
            );
        }
        let mut disks = vec![];
        let disk_names: Vec<Name> = body.disks.iter().map(|d| d.name.clone()).collect();
        unique(
            self.diags,
            "disk",
            &format!(" on {owner}"),
            disk_names.iter(),
        );
        for d in &body.disks {
            if let (Some(from), Some(img)) = (&d.from_image, &body.image)
                && from.value
                && let Some(image) = images.get(&img.value)
                && image.builtin.is_none()
                && image.disk.is_none()
            {
                // A warning, not an error: SPEC.md's own examples start disks from a
                // kernel image without a disk file, and every one of them validates.
                self.push(
                    Diagnostic::warning(
                        "cairn::check::from_image_without_disk",
                        from.span,
                        format!("{owner} starts disk `{}` from image `{}`, which has no disk file: the disk starts empty", d.name.value, img.value),
                    )
                    .and_label(img.span, "this image")
                    .with_help(format!("add `disk \"images/{}/root.qcow2\" format=\"qcow2\"` inside `image \"{}\"`, or drop `from-image=#true`", img.value, img.value)),
                );
            }
            if let (Some(p), Some(s)) = (&d.pool, s)
                && !s.pools.iter().any(|x| x.name == p.value)
            {
                let pools: Vec<&str> = s.pools.iter().map(|x| x.name.as_str()).collect();
                let mut diag = unknown("cairn::resolve::unknown_pool", p, "pool", owner, &pools);
                diag.message = format!(
                    "{owner} puts disk `{}` in pool `{}`, which site `{}` does not have",
                    d.name.value, p.value, s.name
                );
                self.push(diag);
            }
            disks.push(VmDisk {
                name: d.name.value.clone(),
                size_bytes: d.size.as_ref().map_or(0, |v| v.value),
                pool: d.pool.as_ref().map(|p| p.value.clone()).unwrap_or_default(),
                from_image: d.from_image.as_ref().is_some_and(|f| f.value),
                prevent_destroy: d.prevent_destroy.as_ref().is_some_and(|f| f.value),
            });
        }
        let mut nics = vec![];
        for n in &body.nics {
            if let (Some(net), Some(t)) = (&n.network, t) {
                match t.networks.iter().find(|x| x.name == net.value) {
                    None => {
                        let nets: Vec<&str> = t.networks.iter().map(|x| x.name.as_str()).collect();
                        let mut diag = unknown(
                            "cairn::resolve::unknown_network",
                            net,
                            "network",
                            owner,
                            &nets,
                        );
                        diag.message = format!(
                            "{owner} attaches to network `{}`, which tenant `{}` does not have",
                            net.value, t.name
                        );
                        self.push(diag);
                    }
                    Some(found) => {
                        if let Some(s) = s
                            && found.site != s.name
                            && !found.site.is_empty()
                        {
                            self.push(
                                Diagnostic::error(
                                    "cairn::check::network_on_other_site",
                                    net.span,
                                    format!("{owner} runs in site `{}` but network `{}` is in site `{}`", s.name, net.value, found.site),
                                )
                                .with_help("attach VMs to networks of their own site"),
                            );
                        }
                    }
                }
            }
            if let Some(t) = t {
                for g in &n.security_groups {
                    if !t.security_groups.iter().any(|x| x.name == g.value) {
                        let sgs: Vec<&str> =
                            t.security_groups.iter().map(|x| x.name.as_str()).collect();
                        self.push(unknown(
                            "cairn::resolve::unknown_security_group",
                            g,
                            "security-group",
                            owner,
                            &sgs,
                        ));
                    }
                }
            }
            let mut address = None;
            if let Some(a) = &n.address {
                if let Some(group) = group {
                    self.push(
                        Diagnostic::error(
                            "cairn::check::pinned_address_in_group",
                            a.span,
                            format!("vm-group `{group}` pins the address {} on a NIC: every replica would have it", a.value),
                        )
                        .with_help("remove `address` (IPAM gives each replica its own), or pin addresses on single `vm`s"),
                    );
                } else {
                    self.pinned.insert((name.to_owned(), nics.len()), a.span);
                    address = Some(a.value.clone());
                }
            }
            nics.push(VmNic {
                network: n
                    .network
                    .as_ref()
                    .map(|x| x.value.clone())
                    .unwrap_or_default(),
                security_groups: n.security_groups.iter().map(|g| g.value.clone()).collect(),
                pinned: address.is_some(),
                address,
            });
        }
        let availability = body
            .availability
            .as_ref()
            .map_or(Availability::None, |a| a.value);
        if let Some(e) = &body.ft_epoch
            && availability != Availability::Ft
        {
            self.push(
                Diagnostic::error(
                    "cairn::check::ft_epoch_without_ft",
                    e.span,
                    format!("{owner} has an `ft-epoch` but is not fault tolerant (availability `{}`)", availability.as_str()),
                )
                .with_help("`ft-epoch` is how often an FT VM checkpoints to its secondary: add `availability \"ft\"`, or leave `ft-epoch` out"),
            );
        }
        if availability == Availability::Ft
            && let Some(a) = &body.availability
        {
            if sla.class != SlaClass::Reserved {
                let mut d = Diagnostic::error(
                    "cairn::check::ft_requires_reserved",
                    a.span,
                    format!("{owner} is fault tolerant but its SLA profile `{}` is of class `{}`", sla.name, sla.class),
                )
                .with_help("FT keeps a full secondary; it needs a profile of class `reserved` (e.g. `sla \"reserved\"`)");
                if let Some(r) = &body.sla {
                    d = d.and_label(r.span, "not reserved");
                }
                self.push(d);
            }
            if let Some(s) = s {
                if s.witness.is_none() {
                    self.push(
                        Diagnostic::error("cairn::check::ft_without_witness", a.span, format!("{owner} is fault tolerant but site `{}` has no witness", s.name))
                            .with_help("add `witness address=\"HOST:PORT\"` to the site: FT pairs need a quorum witness against split brain"),
                    );
                }
                let domains = if s.racks.len() >= 2 {
                    s.racks.len()
                } else {
                    s.nodes.len()
                };
                if domains < 2 {
                    self.push(
                        Diagnostic::error(
                            "cairn::check::ft_without_failure_domains",
                            a.span,
                            format!("{owner} is fault tolerant but site `{}` has only {} node{}", s.name, s.nodes.len(), if s.nodes.len() == 1 { "" } else { "s" }),
                        )
                        .with_help("FT needs two failure domains (racks, or at least nodes) for its primary and secondary"),
                    );
                }
            }
            if let Some(d) = body.disks.first() {
                self.push(
                    Diagnostic::warning(
                        "cairn::check::ft_disks_unprotected",
                        a.span,
                        format!("{owner} is fault tolerant and has disks: the node runtime does not yet keep a secondary's copy of a volume, so it runs unprotected"),
                    )
                    .and_label(d.name.span, "a disk")
                    .with_help("its secondary's place stays reserved and every plan lists it as not protected; for protection now, keep the data off an FT VM or use `availability \"ha\"`"),
                );
            }
        }
        Some(Vm {
            name: name.to_owned(),
            tenant: tenant.map(|t| t.value.clone()).unwrap_or_default(),
            site: site.map(|s| s.value.clone()).unwrap_or_default(),
            group: group.map(str::to_owned),
            cpu: body.cpu.as_ref().map_or(0, |c| c.value),
            memory_bytes: body.memory.as_ref().map_or(0, |m| m.value),
            sla,
            availability,
            ft_epoch_ms: body
                .ft_epoch
                .as_ref()
                .and_then(|e| u32::try_from(e.value).ok()),
            power: body.power.as_ref().map_or(Power::On, |p| p.value),
            image: body
                .image
                .as_ref()
                .map(|i| i.value.clone())
                .unwrap_or_default(),
            disks,
            nics,
            tags: labels(&body.tags),
            protection_plans: vec![],
        })
    }
}

/// What a VM is checked against, built once per compile: the sites, tenants,
/// SLA profiles and images, with the sites and tenants also by name, so a VM
/// resolves its tenant and site by lookup, not by a pass over every tenant (VMs x
/// tenants). The first of two of the same name wins, as a search in list order
/// would.
pub(super) struct Known<'a> {
    sites: BTreeMap<&'a str, &'a Site>,
    tenants: BTreeMap<&'a str, &'a Tenant>,
    site_list: &'a [Site],
    tenant_list: &'a [Tenant],
    slas: &'a BTreeMap<String, SlaProfile>,
    images: &'a BTreeMap<String, Image>,
}

impl<'a> Known<'a> {
    pub(super) fn new(
        sites: &'a [Site],
        tenants: &'a [Tenant],
        slas: &'a BTreeMap<String, SlaProfile>,
        images: &'a BTreeMap<String, Image>,
    ) -> Known<'a> {
        let mut known = Known {
            sites: BTreeMap::new(),
            tenants: BTreeMap::new(),
            site_list: sites,
            tenant_list: tenants,
            slas,
            images,
        };
        for s in sites {
            known.sites.entry(s.name.as_str()).or_insert(s);
        }
        for t in tenants {
            known.tenants.entry(t.name.as_str()).or_insert(t);
        }
        known
    }
}

#[cfg(test)]
mod power_tests {
    use crate::model::Power;
    use crate::source::Sources;

    fn compiled(power: &str) -> crate::Compilation {
        let text = format!(
            "node-class \"n\" {{\n    cpu 4\n    memory \"16GiB\"\n}}\nsite \"s\" {{\n    rack \"r\" {{\n        node \"n1\" class=\"n\" address=\"127.0.0.1:1\"\n    }}\n}}\ntenant \"t\"\nimage \"tiny\" builtin=\"cairn-guest\"\nvm \"a\" tenant=\"t\" site=\"s\" {{\n{power}    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n}}\nvm-group \"g\" tenant=\"t\" site=\"s\" replicas=2 {{\n{power}    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n}}\n"
        );
        crate::compile(&Sources::from_files([("main.kdl".to_owned(), text)]))
    }

    #[test]
    fn power_off_reaches_the_model_for_vms_and_group_replicas_and_on_is_the_default() {
        let off = compiled("    power \"off\"\n");
        assert!(!off.has_errors(), "{:?}", off.diagnostics);
        let powers: Vec<Power> = off.model.vms.iter().map(|v| v.power).collect();
        assert_eq!(powers, vec![Power::Off; 3]);
        let json = serde_json::to_string(&off.model).expect("model JSON");
        assert!(json.contains("\"power\":\"off\""), "{json}");
        let default = compiled("");
        assert!(default.model.vms.iter().all(|v| v.power == Power::On));
        // `on` is left out of the JSON: models without the line are unchanged.
        let json = serde_json::to_string(&default.model).expect("model JSON");
        assert!(!json.contains("\"power\""), "{json}");
    }

    #[test]
    fn an_unknown_power_state_is_an_error_naming_the_keywords() {
        let bad = compiled("    power \"sleep\"\n");
        let messages: Vec<String> = bad
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| format!("{} {}", d.message, d.help.clone().unwrap_or_default()))
            .collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("sleep") && m.contains("off")),
            "{messages:?}"
        );
    }
}
