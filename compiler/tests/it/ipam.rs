//! IPAM and VNIs (issue 19): every NIC gets an address of its network that
//! is never reserved, kept across placements, held back after a removal;
//! pinned addresses are checked with spans; VNIs are unique and kept.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use compiler::cidr::Cidr;
use compiler::model::Model;
use compiler::place::{PlaceOptions, Placement, place};
use compiler::{Compilation, Sources, compile};

const QUICKSTART: [(&str, &str); 3] = [
    (
        "cluster.kdl",
        include_str!("../../../examples/quickstart/cluster.kdl"),
    ),
    (
        "tenants.kdl",
        include_str!("../../../examples/quickstart/tenants.kdl"),
    ),
    (
        "workloads.kdl",
        include_str!("../../../examples/quickstart/workloads.kdl"),
    ),
];

fn compiled(files: &[(&str, String)]) -> (Sources, Compilation) {
    let sources = Sources::from_files(
        files
            .iter()
            .map(|(p, t)| ((*p).to_owned(), t.clone()))
            .collect::<Vec<_>>(),
    );
    let c = compile(&sources);
    (sources, c)
}

fn model_of(files: &[(&str, String)]) -> Model {
    crate::placement::model_of(
        files
            .iter()
            .map(|(p, t)| ((*p).to_owned(), t.clone()))
            .collect(),
    )
}

fn place_after(model: &Model, previous: Option<&Placement>) -> Placement {
    place(
        model,
        &PlaceOptions {
            previous: previous.cloned(),
            ..Default::default()
        },
        None,
    )
}

fn quickstart() -> Vec<(&'static str, String)> {
    QUICKSTART
        .iter()
        .map(|(p, t)| (*p, (*t).to_owned()))
        .collect()
}

/// VM/NIC → address.
fn addresses(p: &Placement) -> BTreeMap<(String, u32), String> {
    p.addresses
        .iter()
        .map(|a| ((a.vm.clone(), a.nic), a.address.clone()))
        .collect()
}

/// Every address lies in its network, is no network, broadcast or gateway
/// address, and no two NICs of a network share one.
fn assert_sound(model: &Model, p: &Placement) {
    let mut seen = BTreeSet::new();
    for a in &p.addresses {
        let net = model
            .tenants
            .iter()
            .find(|t| t.name == a.tenant)
            .and_then(|t| t.networks.iter().find(|n| n.name == a.network))
            .expect("a network of the model");
        let cidr = Cidr::parse(&net.cidr).expect("valid");
        let ip: Ipv4Addr = a.address.parse().expect("IPv4");
        let (lo, hi) = cidr.ipv4_bounds().expect("IPv4 network");
        let n = u32::from(ip);
        assert!(
            lo < n && n < hi,
            "{} outside the hosts of {}",
            a.address,
            net.cidr
        );
        assert_ne!(
            Some(a.address.as_str()),
            net.gateway.as_deref(),
            "the gateway was given out"
        );
        assert!(
            seen.insert((a.tenant.clone(), a.network.clone(), a.address.clone())),
            "{} given twice",
            a.address
        );
    }
    let nics: usize = model.vms.iter().map(|v| v.nics.len()).sum();
    assert_eq!(p.addresses.len(), nics, "every NIC has an address");
}

#[test]
fn adding_ten_vms_to_the_quickstart_changes_no_existing_address() {
    let files = quickstart();
    let model = model_of(&files);
    let first = place_after(&model, None);
    assert_sound(&model, &first);
    // The model (a compile with no previous placement) says the same.
    for vm in &model.vms {
        for (i, nic) in vm.nics.iter().enumerate() {
            assert_eq!(
                nic.address.as_deref(),
                first.nic_address(&vm.name, i),
                "{}",
                vm.name
            );
        }
    }
    let mut grown = files.clone();
    for (path, text) in &mut grown {
        if *path == "tenants.kdl" {
            *text = text
                .replace(
                    "vcpus=8 memory=\"1GiB\" storage=\"2GiB\" vms=8",
                    "vcpus=64 memory=\"8GiB\" storage=\"8GiB\" vms=64",
                )
                .replace(
                    "vcpus=4 memory=\"512MiB\" storage=\"1GiB\" vms=4",
                    "vcpus=64 memory=\"8GiB\" storage=\"8GiB\" vms=64",
                );
        }
        if *path == "workloads.kdl" {
            // Names that sort before, between and after the existing ones.
            for name in [
                "a0", "aa", "backup2", "c", "db0", "dz", "ops-1", "web", "web-9", "zz",
            ] {
                let net = if name.starts_with("ops") {
                    "ops-net"
                } else {
                    "dev-net"
                };
                let tenant = if name.starts_with("ops") {
                    "ops"
                } else {
                    "dev"
                };
                text.push_str(&format!(
                    "vm \"{name}\" tenant=\"{tenant}\" site=\"lab\" {{\n    cpu 1\n    memory \"16MiB\"\n    image \"tiny\"\n    nic network=\"{net}\"\n}}\n"
                ));
            }
        }
    }
    let grown_model = model_of(&grown);
    let second = place_after(&grown_model, Some(&first));
    assert_sound(&grown_model, &second);
    let before = addresses(&first);
    let after = addresses(&second);
    for (nic, address) in &before {
        assert_eq!(after.get(nic), Some(address), "{nic:?} was renumbered");
    }
    assert_eq!(after.len(), before.len() + 10);
    // The VNIs stay too.
    assert_eq!(first.networks.len(), 2);
    for n in &first.networks {
        assert_eq!(
            second.network(&n.tenant, &n.name).map(|x| x.vni),
            Some(n.vni)
        );
    }
    // And a third run from the second changes nothing.
    let third = place_after(&grown_model, Some(&second));
    assert_eq!(addresses(&third), after);
}

const SMALL: &str = r#"
node-class "c" {
    cpu 16
    memory "64GiB"
}
site "s" {
    rack "r" {
        node "n1" class="c" address="127.0.0.31:7100"
        node "n2" class="c" address="127.0.0.32:7100"
    }
}
image "tiny" builtin="cairn-guest"
tenant "t" {
    network "small" site="s" cidr="10.9.0.0/29" gateway="10.9.0.1"
    network "wide" site="s" cidr="10.10.0.0/24"
}
"#;

fn vm(name: &str, net: &str, extra: &str) -> String {
    format!(
        "vm \"{name}\" tenant=\"t\" site=\"s\" {{\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n    nic network=\"{net}\"{extra}\n}}\n"
    )
}

fn small(vms: &[String]) -> Vec<(&'static str, String)> {
    vec![("c.kdl", SMALL.to_owned()), ("w.kdl", vms.concat())]
}

#[test]
fn a_removed_vms_address_is_held_for_one_placement() {
    // A /29 with a gateway has 5 addresses; fill them.
    let names = ["a", "b", "c", "d", "e"];
    let vms: Vec<String> = names.iter().map(|n| vm(n, "small", "")).collect();
    let model = model_of(&small(&vms));
    let first = place_after(&model, None);
    assert_sound(&model, &first);
    let freed = first.nic_address("c", 0).expect("c has one").to_owned();
    // Remove c and add f in the same change: f must not get c's address.
    let mut next: Vec<String> = vms.clone();
    next.remove(2);
    next.push(vm("f", "small", ""));
    let model2 = model_of(&small(&next));
    let second = place_after(&model2, Some(&first));
    assert_eq!(second.nic_address("f", 0), None, "f took a held address");
    let why = second.unplaced_vm("f").expect("f waits for an address");
    assert_eq!(why.reasons[0].constraint, "address", "{why:?}");
    for n in ["a", "b", "d", "e"] {
        assert_eq!(second.nic_address(n, 0), first.nic_address(n, 0));
    }
    // The placement after that frees it.
    let third = place_after(&model2, Some(&second));
    assert_eq!(third.nic_address("f", 0), Some(freed.as_str()));
    assert!(third.unplaced.is_empty(), "{:?}", third.unplaced);
}

#[test]
fn a_network_too_small_for_its_nics_is_an_error_at_its_cidr() {
    let vms: Vec<String> = ["a", "b", "c", "d", "e", "f"]
        .iter()
        .map(|n| vm(n, "small", ""))
        .collect();
    let (sources, c) = compiled(&small(&vms));
    let d = c
        .diagnostics
        .iter()
        .find(|d| d.code == "cairn::check::network_full")
        .expect("network_full");
    assert_eq!(
        d.message,
        "network `small` of tenant `t` (10.9.0.0/29) runs out of addresses: 6 NICs need one and it has 5 to give out (10.9.0.2 to 10.9.0.6); no address is left for f"
    );
    let text = compiler::diag::render(&sources, d);
    assert!(text.contains("c.kdl:14:30"), "the span is the CIDR: {text}");
}

#[test]
fn pinned_addresses_are_kept_and_checked() {
    let vms = vec![
        vm("a", "wide", " address=\"10.10.0.15\""),
        vm("b", "wide", ""),
    ];
    let model = model_of(&small(&vms));
    let a = model.vm("a").expect("a");
    assert_eq!(a.nics[0].address.as_deref(), Some("10.10.0.15"));
    assert!(a.nics[0].pinned);
    let p = place_after(&model, None);
    assert_eq!(p.nic_address("a", 0), Some("10.10.0.15"));
    // No gateway: the first host is kept for one and not given out.
    assert!(p.addresses.iter().all(|x| x.address != "10.10.0.1"));
    // A pin on an address another NIC had: the pin wins, the other moves.
    let b_had = p.nic_address("b", 0).expect("b").to_owned();
    let vms = vec![
        vm("a", "wide", " address=\"10.10.0.15\""),
        vm("b", "wide", ""),
        vm("c", "wide", &format!(" address=\"{b_had}\"")),
    ];
    let model = model_of(&small(&vms));
    let q = place_after(&model, Some(&p));
    assert_eq!(q.nic_address("c", 0), Some(b_had.as_str()));
    assert_ne!(q.nic_address("b", 0), Some(b_had.as_str()));
    assert_sound(&model, &q);

    let cases = [
        (
            "10.11.0.5",
            "address 10.11.0.5 is outside network `small` (10.9.0.0/29)",
            "choose an address in 10.9.0.2 to 10.9.0.6",
        ),
        (
            "10.9.0.1",
            "address 10.9.0.1 is the gateway of network `small`",
            "10.9.0.2 to 10.9.0.6",
        ),
        (
            "10.9.0.0",
            "is the network address of `small`",
            "10.9.0.2 to 10.9.0.6",
        ),
        (
            "10.9.0.7",
            "is the broadcast address of `small`",
            "10.9.0.2 to 10.9.0.6",
        ),
        (
            "10.9.0.300",
            "`10.9.0.300` is not an IPv4 address",
            "write a dotted quad",
        ),
        (
            "fd00::5",
            "`fd00::5` is not an IPv4 address",
            "write a dotted quad",
        ),
    ];
    for (address, message, help) in cases {
        let vms = vec![vm("a", "small", &format!(" address=\"{address}\""))];
        let (sources, c) = compiled(&small(&vms));
        let d = c
            .diagnostics
            .iter()
            .find(|d| d.code == "cairn::check::invalid_address")
            .unwrap_or_else(|| panic!("{address}: {:?}", c.diagnostics));
        let text = compiler::diag::render(&sources, d);
        assert!(text.contains(message), "{address}: {text}");
        assert!(text.contains(help), "{address}: {text}");
        assert!(
            text.contains(&format!("address=\"{address}\"")),
            "the span: {text}"
        );
    }
    // Pinned twice: both places are shown.
    let vms = vec![
        vm("a", "small", " address=\"10.9.0.3\""),
        vm("b", "small", " address=\"10.9.0.3\""),
    ];
    let (sources, c) = compiled(&small(&vms));
    let d = c
        .diagnostics
        .iter()
        .find(|d| d.code == "cairn::check::duplicate_address")
        .expect("duplicate");
    let text = compiler::diag::render(&sources, d);
    assert!(
        text.contains("vm `b` pins 10.9.0.3 on network `small`, which vm `a` already pinned"),
        "{text}"
    );
    assert_eq!(d.labels.len(), 2, "{text}");
    // A vm-group cannot pin: every replica would have it.
    let group = "vm-group \"g\" tenant=\"t\" site=\"s\" replicas=2 {\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n    nic network=\"small\" address=\"10.9.0.3\"\n}\n".to_owned();
    let (_, c) = compiled(&small(&[group]));
    assert_eq!(
        c.diagnostics
            .iter()
            .filter(|d| d.code == "cairn::check::pinned_address_in_group")
            .count(),
        1
    );
}

#[test]
fn vnis_are_unique_in_range_and_kept() {
    let vms = vec![vm("a", "small", ""), vm("b", "wide", "")];
    let model = model_of(&small(&vms));
    let p = place_after(&model, None);
    let vnis: BTreeSet<u32> = p.networks.iter().map(|n| n.vni).collect();
    assert_eq!(vnis.len(), 2);
    assert!(
        vnis.iter()
            .all(|v| (compiler::ipam::VNI_MIN..=compiler::ipam::VNI_MAX).contains(v))
    );
    for n in &model.tenants[0].networks {
        assert_eq!(p.network("t", &n.name).map(|x| x.vni), Some(n.vni));
    }
    // The segment spans the nodes of its VMs.
    let small_net = p.network("t", "small").expect("small");
    assert_eq!(
        small_net.nodes,
        vec![p.vm_node("a").expect("placed").to_owned()]
    );
    // A new network whose VNI the previous placement gave to another one
    // (a collision) probes on; the old owner keeps it.
    let extra = SMALL.replace(
        "    network \"wide\"",
        "    network \"more\" site=\"s\" cidr=\"10.11.0.0/24\"\n    network \"wide\"",
    );
    let files = vec![("c.kdl", extra.clone()), ("w.kdl", vms.concat())];
    let fresh = place_after(&model_of(&files), None);
    let wanted = fresh.network("t", "more").expect("more").vni;
    let mut previous = p.clone();
    previous
        .networks
        .iter_mut()
        .find(|n| n.name == "wide")
        .expect("wide")
        .vni = wanted;
    let q = place_after(&model_of(&files), Some(&previous));
    assert_eq!(q.network("t", "wide").map(|n| n.vni), Some(wanted));
    let more = q.network("t", "more").expect("more").vni;
    assert_ne!(more, wanted);
    let all: BTreeSet<u32> = q.networks.iter().map(|n| n.vni).collect();
    assert_eq!(all.len(), 3);
}

#[test]
fn security_group_rules_take_to_cidrs_icmp_and_port_ranges() {
    let tenants = r#"
tenant "u" {
    network "app" site="s" cidr="10.20.0.0/24" gateway="10.20.0.1"
    network "db" site="s" cidr="10.21.0.0/24" gateway="10.21.0.1" external=#true
    security-group "g" {
        allow from="app" to="db" proto="tcp" port=5432
        allow from="192.168.0.0/16" proto="tcp" port="8000-8100"
        allow from="0.0.0.0/0" proto="icmp"
        allow from="app" proto="udp" port="53"
    }
}
"#;
    let files = vec![("c.kdl", SMALL.to_owned()), ("u.kdl", tenants.to_owned())];
    let model = model_of(&files);
    let u = model.tenants.iter().find(|t| t.name == "u").expect("u");
    assert!(
        u.networks
            .iter()
            .find(|n| n.name == "db")
            .expect("db")
            .external
    );
    let rules = &u.security_groups[0].allow;
    assert_eq!(rules[0].from_cidr, "10.20.0.0/24");
    assert_eq!(rules[0].to_cidr.as_deref(), Some("10.21.0.0/24"));
    assert_eq!((rules[0].port, rules[0].port_end), (Some(5432), None));
    assert_eq!(rules[1].from_cidr, "192.168.0.0/16");
    assert_eq!((rules[1].port, rules[1].port_end), (Some(8000), Some(8100)));
    assert_eq!(rules[2].proto, compiler::model::Proto::Icmp);
    assert_eq!(rules[2].port, None);
    assert_eq!((rules[3].port, rules[3].port_end), (Some(53), None));

    let bad = r#"
tenant "u" {
    network "app" site="s" cidr="10.20.0.0/24" external=#true
    security-group "g" {
        allow from="app" proto="icmp" port=7
        allow from="app" to="dbb" proto="tcp"
        allow from="app" proto="tcp" port="9000-8000"
        allow from="app" proto="tcp" port="http"
        allow from="app" to="10.0.0.1/8" proto="tcp"
    }
}
"#;
    let files = vec![("c.kdl", SMALL.to_owned()), ("u.kdl", bad.to_owned())];
    let (sources, c) = compiled(&files);
    let rendered: Vec<String> = c
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| compiler::diag::render(&sources, d))
        .collect();
    let all = rendered.join("\n");
    for expected in [
        "network `app` is external but has no gateway",
        "gives a port for proto=\"icmp\", which has no ports",
        "allows to `dbb`, which is neither a network of tenant `u` nor a CIDR",
        "the port range `9000-8000` runs backwards",
        "the port `http` is neither a port nor a range of ports",
        "`10.0.0.1/8` is not a valid CIDR: host bits are set",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    assert_eq!(rendered.len(), 6, "{all}");
}

#[test]
fn a_network_takes_an_ipv6_slash_64_and_bad_ones_are_errors_at_the_value() {
    let tenants = r#"
tenant "u" {
    network "app" site="s" cidr="10.20.0.0/24" gateway="10.20.0.1" ipv6="fd00:20::/64"
    network "db" site="s" cidr="10.21.0.0/24" gateway="10.21.0.1"
}
"#;
    let files = vec![("c.kdl", SMALL.to_owned()), ("u.kdl", tenants.to_owned())];
    let model = model_of(&files);
    let u = model.tenants.iter().find(|t| t.name == "u").expect("u");
    let ipv6: Vec<Option<&str>> = u.networks.iter().map(|n| n.ipv6.as_deref()).collect();
    assert_eq!(ipv6, vec![Some("fd00:20::/64"), None]);

    for (value, expected) in [
        (
            "fd00:20::/48",
            "`fd00:20::/48` is a /48: guests take their addresses by SLAAC, which needs a /64",
        ),
        (
            "10.30.0.0/24",
            "`10.30.0.0/24` is an IPv4 CIDR (the network's IPv4 CIDR is `cidr`)",
        ),
        (
            "fd00:20::1/64",
            "`fd00:20::1/64` is not a valid CIDR: host bits are set",
        ),
        ("nonsense", "`nonsense` is not a valid CIDR"),
    ] {
        let bad = format!(
            "tenant \"u\" {{\n    network \"app\" site=\"s\" cidr=\"10.20.0.0/24\" gateway=\"10.20.0.1\" ipv6=\"{value}\"\n}}\n"
        );
        let files = vec![("c.kdl", SMALL.to_owned()), ("u.kdl", bad)];
        let (sources, c) = compiled(&files);
        let d = c
            .diagnostics
            .iter()
            .find(|d| d.code == "cairn::check::invalid_ipv6_prefix")
            .unwrap_or_else(|| panic!("{value}: {:?}", c.diagnostics));
        assert!(d.message.starts_with(expected), "{value}: {}", d.message);
        let text = compiler::diag::render(&sources, d);
        assert!(text.contains("u.kdl:2:"), "the span is the value: {text}");
    }
    let bad = "tenant \"u\" {\n    network \"app\" site=\"s\" cidr=\"10.20.0.0/24\" ipv6=\"fd00:20::/64\"\n}\n";
    let files = vec![("c.kdl", SMALL.to_owned()), ("u.kdl", bad.to_owned())];
    let (_, c) = compiled(&files);
    let d = c
        .diagnostics
        .iter()
        .find(|d| d.code == "cairn::check::ipv6_without_gateway")
        .unwrap_or_else(|| panic!("{:?}", c.diagnostics));
    assert!(
        d.message
            .contains("network `app` has an IPv6 prefix but no gateway"),
        "{}",
        d.message
    );
}
