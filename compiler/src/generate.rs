//! Synthetic spec repositories for benchmarks and scale tests.
//!
//! `generate(&GenConfig)` returns the files of a valid spec repository with
//! the requested numbers of nodes and VMs: several sites of 16-node racks
//! with a bond and a replicated pool, tenants with networks and quotas,
//! standalone VMs and vm-groups (two volumes per VM), a mix of SLA classes and
//! availabilities, and affinity rules. The output is a pure function of the
//! configuration (a seeded generator, no clock, no hash maps).

use std::fmt::Write as _;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// Physical nodes in total.
    pub nodes: usize,
    /// VMs in total (after group expansion).
    pub vms: usize,
    /// Seed of the pseudo-random choices.
    pub seed: u64,
}

/// A small deterministic generator (SplitMix64).
#[derive(Debug)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Generates the files (relative path, text) of a spec repository.
pub fn generate(config: &GenConfig) -> Vec<(String, String)> {
    let mut rng = Rng(config.seed);
    let n_nodes = config.nodes.max(2);
    let n_sites = n_nodes.div_ceil(500).max(1);
    let nodes_per_site = n_nodes.div_ceil(n_sites);
    let mut files = vec![];

    let mut infra = String::new();
    infra.push_str(
        "node-class \"std\" {\n    cpu 64\n    memory \"512GiB\"\n    host-reserve cpu=2 memory=\"16GiB\"\n    disk \"nvme0\" size=\"3840GB\" class=\"ssd\"\n    disk \"nvme1\" size=\"3840GB\" class=\"ssd\"\n    nic \"ens1f0\" speed=\"25Gbps\"\n    nic \"ens1f1\" speed=\"25Gbps\"\n}\n\n",
    );
    infra.push_str("sla-profile \"gold\" class=\"reserved\" priority=900\nsla-profile \"batch\" class=\"spot\" priority=10\nimage \"tiny\" builtin=\"cairn-guest\"\n\n");
    let mut node_index = 0;
    let mut site_racks: Vec<Vec<String>> = vec![];
    for s in 0..n_sites {
        let _ = writeln!(infra, "site \"site-{s}\" {{");
        infra.push_str("    overcommit cpu=4.0 memory=1.5\n    ha-reserve nodes=1\n    scheduler strategy=\"spread\" {\n        rebalance threshold=0.2 max-moves=50\n    }\n");
        let _ = writeln!(infra, "    witness address=\"10.255.{s}.1:7400\"");
        let here = nodes_per_site.min(n_nodes - node_index);
        let mut racks = vec![];
        for r in 0..here.div_ceil(16) {
            let rack = format!("s{s}-r{r}");
            let _ = writeln!(infra, "    rack \"{rack}\" {{");
            for _ in 0..16.min(here - r * 16) {
                let _ = writeln!(
                    infra,
                    "        node \"n{node_index}\" class=\"std\" address=\"10.{}.{}.{}:7100\"",
                    node_index / 65536,
                    (node_index / 256) % 256,
                    node_index % 256
                );
                node_index += 1;
            }
            infra.push_str("    }\n");
            racks.push(rack);
        }
        infra.push_str("    bond \"data\" mode=\"802.3ad\" mtu=9000 {\n        members \"ens1f0\" \"ens1f1\"\n        traffic \"storage\" min=\"10Gbps\" weight=4\n        traffic \"migration\" min=\"5Gbps\" max=\"20Gbps\" weight=1\n        traffic \"guest\" min=\"10Gbps\" weight=4\n        traffic \"management\" min=\"1Gbps\" weight=1\n    }\n");
        let replicas = if racks.len() >= 3 { 3 } else { 2.min(here) };
        let domain = if racks.len() >= 3 { "rack" } else { "node" };
        let _ = writeln!(
            infra,
            "    pool \"fast\" disk-class=\"ssd\" replicas={replicas} failure-domain=\"{domain}\" {{\n        stripe-width 4\n        stripe-unit \"1MiB\"\n        thin-overcommit 2.0\n    }}\n}}\n"
        );
        site_racks.push(racks);
    }
    files.push(("infra.kdl".to_owned(), infra));

    let n_tenants = config.vms.div_ceil(250).max(2);
    let mut tenants = String::new();
    for t in 0..n_tenants {
        let _ = writeln!(tenants, "tenant \"t{t}\" {{");
        let _ = writeln!(
            tenants,
            "    member \"owner{t}@example.com\" role=\"admin\""
        );
        let _ = writeln!(
            tenants,
            "    budget monthly={} currency=\"USD\"",
            10_000 + 1000 * (t % 7)
        );
        for s in 0..n_sites {
            // A /20 per tenant and site (4,093 addresses: room for every NIC
            // IPAM gives out), disjoint across the whole repository.
            let idx = (t * n_sites + s) % 4096;
            let (b, c) = (idx / 16, (idx % 16) * 16);
            let _ = writeln!(
                tenants,
                "    network \"net-{s}\" site=\"site-{s}\" cidr=\"10.{b}.{c}.0/20\" gateway=\"10.{b}.{c}.1\""
            );
        }
        tenants.push_str("    security-group \"web\" {\n        allow from=\"0.0.0.0/0\" proto=\"tcp\" port=443\n    }\n}\n");
    }
    files.push(("tenants.kdl".to_owned(), tenants));

    // VMs: about a third in groups, the rest standalone; spread per tenant.
    let mut per_tenant: Vec<String> = vec![String::new(); n_tenants];
    let mut made = 0usize;
    let mut k = 0usize;
    while made < config.vms {
        let t = k % n_tenants;
        let site = (k / n_tenants) % n_sites;
        let app = k % 97;
        let out = &mut per_tenant[t];
        let roll = rng.below(100);
        let (sla, avail) = match roll {
            0..=1 => ("gold", "ft"),
            2..=9 => ("gold", "ha"),
            10..=19 => ("batch", "none"),
            20..=49 => ("on-demand", "ha"),
            _ => ("on-demand", "none"),
        };
        let cpu = [1, 2, 2, 4, 4, 8][rng.below(6) as usize];
        let mem = [2, 4, 8, 8, 16, 32][rng.below(6) as usize];
        let group = rng.below(3) == 0 && config.vms - made >= 4 && avail != "ft";
        if group {
            let replicas = (4 + rng.below(5) as usize).min(config.vms - made);
            let _ = writeln!(
                out,
                "vm-group \"g{k}\" tenant=\"t{t}\" site=\"site-{site}\" replicas={replicas} {{"
            );
            out.push_str("    spread \"rack\"\n    max-unavailable 1\n");
            made += replicas;
        } else {
            let _ = writeln!(out, "vm \"vm{k}\" tenant=\"t{t}\" site=\"site-{site}\" {{");
            made += 1;
        }
        let _ = writeln!(
            out,
            "    cpu {cpu}\n    memory \"{mem}GiB\"\n    sla \"{sla}\"\n    availability \"{avail}\"\n    image \"tiny\""
        );
        let _ = writeln!(
            out,
            "    disk \"root\" size=\"20GiB\" pool=\"fast\" from-image=#true\n    disk \"data\" size=\"{}GiB\" pool=\"fast\"",
            10 * (1 + rng.below(10))
        );
        let _ = writeln!(
            out,
            "    nic network=\"net-{site}\" security-groups=\"web\"\n    tag \"app\" \"app{app}\"\n    tag \"tier\" \"{}\"\n}}",
            ["web", "db", "batch"][k % 3]
        );
        k += 1;
    }
    for (t, text) in per_tenant.into_iter().enumerate() {
        if !text.is_empty() {
            files.push((format!("workloads/t{t}.kdl"), text));
        }
    }

    let mut rules = String::new();
    for app in 0..97.min(config.vms) {
        match app % 3 {
            0 => {
                let _ = writeln!(
                    rules,
                    "affinity \"app{app}-apart\" kind=\"apart\" scope=\"node\" hard=#false weight=60 {{\n    select app=\"app{app}\"\n}}"
                );
            }
            1 => {
                let _ = writeln!(
                    rules,
                    "affinity \"app{app}-together\" kind=\"together\" scope=\"rack\" weight=20 {{\n    select app=\"app{app}\" tier=\"web\"\n}}"
                );
            }
            _ => {
                let rack = &site_racks[app % n_sites][0];
                let _ = writeln!(
                    rules,
                    "affinity \"app{app}-rack\" kind=\"node\" hard=#false weight=30 {{\n    select app=\"app{app}\"\n    nodes rack=\"{rack}\"\n}}"
                );
            }
        }
    }
    rules.push_str("protection-plan \"standard\" {\n    snapshot every=\"1h\" keep=24\n    applies-to tier=\"db\"\n}\n");
    files.push(("rules.kdl".to_owned(), rules));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_repos_compile_cleanly() {
        for (nodes, vms) in [(3, 10), (40, 300), (1200, 2000)] {
            let files = generate(&GenConfig {
                nodes,
                vms,
                seed: 7,
            });
            let sources = crate::Sources::from_files(files);
            let c = crate::compile(&sources);
            let errors: Vec<String> = c
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| crate::diag::render(&sources, d))
                .collect();
            assert!(
                errors.is_empty(),
                "{nodes} nodes / {vms} vms: {}",
                errors.join("\n")
            );
            assert_eq!(c.model.vms.len(), vms);
            assert_eq!(
                c.model.sites.iter().map(|s| s.nodes.len()).sum::<usize>(),
                nodes
            );
        }
    }

    #[test]
    fn generation_is_deterministic() {
        let a = generate(&GenConfig {
            nodes: 50,
            vms: 200,
            seed: 1,
        });
        let b = generate(&GenConfig {
            nodes: 50,
            vms: 200,
            seed: 1,
        });
        assert_eq!(a, b);
    }
}
