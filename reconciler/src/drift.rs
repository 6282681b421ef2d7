//! One comparison of what should run with what runs, read by the plan (what to
//! do about it), status (what to show) and, later, self-heal and metrics: a
//! difference is worded once, here (Argo CD's single compare result feeding its
//! UI, metrics and self-heal; the network crate's `Drift`).

use proto::v1::VmState;

use crate::desired::{BootImage, DesiredBond, DesiredTraffic, DesiredVm, DesiredVolume};
use crate::observe::{ObservedBond, ObservedVm, ObservedVolume};

/// How a VM differs from its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmDrift {
    /// As specified, running.
    None,
    /// It runs with another definition (vCPUs, memory, image, NICs): one line each.
    Definition(Vec<String>),
    /// Stopped or crashed.
    NotRunning,
    /// Its spec says `power "off"` but it runs.
    NotStopped,
    /// NICs not ready on a node that can make them: one `repair:` line each.
    Nics(Vec<String>),
    /// Its node enforces another SLA class or priority, or its cgroup drifted: one
    /// `repair:` line each (the same definition again repairs it in place).
    Sla(Vec<String>),
    /// It runs on another node than the placement's.
    WrongNode,
    /// Its node answered but does not have it.
    Missing,
    /// Its node did not answer.
    Unknown,
    /// In the specs but without a node now: it is kept where it runs.
    Unplaced,
    /// No spec names it.
    NotInSpec,
}

impl VmDrift {
    /// The word of `cairn status` (`none`, `definition`, `not-running`,
    /// `not-stopped`, `nics`, `wrong-node`, `missing`, `unknown`, `unplaced`,
    /// `not-in-spec`).
    pub fn word(&self) -> &'static str {
        match self {
            VmDrift::None => "none",
            VmDrift::Definition(_) => "definition",
            VmDrift::NotRunning => "not-running",
            VmDrift::NotStopped => "not-stopped",
            VmDrift::Nics(_) => "nics",
            VmDrift::Sla(_) => "sla",
            VmDrift::WrongNode => "wrong-node",
            VmDrift::Missing => "missing",
            VmDrift::Unknown => "unknown",
            VmDrift::Unplaced => "unplaced",
            VmDrift::NotInSpec => "not-in-spec",
        }
    }

    /// What differs, one line each (empty when the word says it all).
    pub fn detail(&self) -> &[String] {
        match self {
            VmDrift::Definition(lines) | VmDrift::Nics(lines) | VmDrift::Sla(lines) => lines,
            _ => &[],
        }
    }
}

/// How a VM running on its node differs from its spec (`have` is the copy on
/// the placement's node; `can_network`: that node makes NICs).
pub fn vm(want: &DesiredVm, have: &ObservedVm, can_network: bool) -> VmDrift {
    let definition = vm_definition(want, have);
    if !definition.is_empty() {
        return VmDrift::Definition(definition);
    }
    if want.power_off {
        // Kept defined and stopped: its NICs and cgroup are made when it starts.
        return if have.is_running() {
            VmDrift::NotStopped
        } else {
            VmDrift::None
        };
    }
    if have.state != VmState::Running {
        return VmDrift::NotRunning;
    }
    let repairs = nic_repairs(have, can_network);
    if !repairs.is_empty() {
        return VmDrift::Nics(repairs);
    }
    let repairs = sla_repairs(want, have);
    if !repairs.is_empty() {
        return VmDrift::Sla(repairs);
    }
    VmDrift::None
}

/// What a VM runs with that its spec does not say, one line each
/// (`memory 64MiB → 128MiB`): a change the node cannot make in place.
pub fn vm_definition(want: &DesiredVm, have: &ObservedVm) -> Vec<String> {
    let human = compiler::units::human_size;
    let mut diffs = vec![];
    if have.vcpus != want.vcpus {
        diffs.push(format!("vcpus {} → {}", have.vcpus, want.vcpus));
    }
    if have.memory_bytes != want.memory_bytes {
        diffs.push(format!(
            "memory {} → {}",
            human(have.memory_bytes),
            human(want.memory_bytes)
        ));
    }
    if let Some(image) = &have.image
        && *image != want.image
    {
        diffs.push(format!(
            "image {} → {}",
            image_text(image),
            image_text(&want.image)
        ));
    }
    let have_nics = have.nic_networks();
    if have_nics != want.nics {
        diffs.push(format!(
            "nics [{}] → [{}]",
            have_nics.join(" "),
            want.nics.join(" ")
        ));
    }
    diffs
}

/// The NICs of a VM that are not ready on a node that makes NICs, one
/// `repair: nic N (NET): why` line each (the node makes them again from the
/// same definition).
pub fn nic_repairs(have: &ObservedVm, can_network: bool) -> Vec<String> {
    if !can_network {
        return vec![];
    }
    have.nics
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.ready)
        .map(|(i, n)| format!("repair: nic {i} ({}): {}", n.network, n.detail))
        .collect()
}

/// How a VM's SLA on its node differs from its spec, one `repair:` line each: another
/// class or priority (applied in place by a CreateVm with the new class), or cgroup
/// values that drifted from what the class asks (written back by the same CreateVm).
/// Nothing for a node that reports no class (an older node).
pub fn sla_repairs(want: &DesiredVm, have: &ObservedVm) -> Vec<String> {
    if have.sla.is_empty() {
        return vec![];
    }
    let class = if want.sla.is_empty() {
        "on-demand"
    } else {
        want.sla.as_str()
    };
    let mut lines = vec![];
    if have.sla != class || have.priority != want.priority {
        lines.push(format!(
            "repair: sla {} (priority {}) → {class} (priority {})",
            have.sla, have.priority, want.priority
        ));
    }
    // Dedicated CPUs: the node says which it gave (a node that reports a class
    // reports them too); the cgroup drift lines below name a cpuset that differs.
    if want.dedicated_cpus && have.dedicated_cpus.is_empty() {
        lines.push(format!(
            "repair: dedicated CPUs: none, its profile pins {} vCPU{}",
            want.vcpus,
            if want.vcpus == 1 { "" } else { "s" }
        ));
    } else if !want.dedicated_cpus && !have.dedicated_cpus.is_empty() {
        lines.push(format!(
            "repair: dedicated CPUs {} given back: its profile no longer pins",
            have.dedicated_cpus
        ));
    }
    lines.extend(
        have.cgroup_drift
            .iter()
            .map(|drift| format!("repair: cgroup: {drift}")),
    );
    lines
}

/// Whether a volume's primary copy has the size and striping of its spec.
pub fn volume_in_sync(want: &DesiredVolume, have: &ObservedVolume) -> bool {
    have.size_bytes == want.size_bytes
        && have.stripe_width == want.stripe_width
        && have.stripe_unit_bytes == want.stripe_unit_bytes
}

/// A traffic class as plan and status word it: `storage min 300Mbps max 1Gbps
/// weight 4`.
pub fn traffic_text(t: &DesiredTraffic) -> String {
    compiler::model::traffic_class_text(&t.name, t.min_bps, t.max_bps, t.weight)
}

/// `cairn-guest (built in)` or `kernel PATH [initrd PATH] [cmdline "…"]`.
pub fn image_text(image: &BootImage) -> String {
    match image {
        BootImage::Builtin(b) => format!("{b} (built in)"),
        BootImage::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            let mut out = format!("kernel {kernel}");
            if !initrd.is_empty() {
                out.push_str(&format!(" initrd {initrd}"));
            }
            if !cmdline.is_empty() {
                out.push_str(&format!(" cmdline {cmdline:?}"));
            }
            out
        }
    }
}

/// How the bond a node keeps differs from the spec's, one line per difference
/// (empty: same definition).
pub fn bond_definition_diff(want: &DesiredBond, have: &ObservedBond) -> Vec<String> {
    use compiler::units::format_bandwidth as bw;
    let mut out = vec![];
    if have.mode != want.mode {
        out.push(format!("mode {} → {}", have.mode, want.mode));
    }
    if have.members != want.members {
        out.push(format!(
            "members {} → {}",
            have.members.join(" "),
            want.members.join(" ")
        ));
    }
    if have.mtu != want.mtu {
        out.push(format!("mtu {} → {}", have.mtu, want.mtu));
    }
    if have.miimon_ms != want.miimon_ms {
        out.push(format!(
            "miimon {} ms → {} ms",
            have.miimon_ms, want.miimon_ms
        ));
    }
    if have.capacity_bps != want.capacity_bps {
        out.push(format!(
            "capacity {} → {}",
            bw(have.capacity_bps),
            bw(want.capacity_bps)
        ));
    }
    for t in &want.traffic {
        match have.traffic.iter().find(|h| h.name == t.name) {
            None => out.push(format!("traffic {} added", traffic_text(t))),
            Some(h) if h != t => {
                let mut parts = vec![];
                if h.min_bps != t.min_bps {
                    parts.push(format!("min {} → {}", bw(h.min_bps), bw(t.min_bps)));
                }
                if h.max_bps != t.max_bps {
                    parts.push(format!("max {} → {}", bw(h.max_bps), bw(t.max_bps)));
                }
                if h.weight != t.weight {
                    parts.push(format!("weight {} → {}", h.weight, t.weight));
                }
                out.push(format!("traffic {}: {}", t.name, parts.join(", ")));
            }
            Some(_) => {}
        }
    }
    for h in &have.traffic {
        if !want.traffic.iter().any(|t| t.name == h.name) {
            out.push(format!("traffic {} removed", h.name));
        }
    }
    out
}

#[cfg(test)]
mod pinning_tests {
    use super::*;

    #[test]
    fn a_pinned_profile_reaches_create_vm_and_missing_or_extra_dedicated_cpus_are_repaired() {
        let text = "node-class \"n\" {\n    cpu 4\n    memory \"16GiB\"\n}\nsite \"s\" {\n    rack \"r\" {\n        node \"n1\" class=\"n\" address=\"127.0.0.1:1\"\n    }\n}\ntenant \"t\"\nimage \"tiny\" builtin=\"cairn-guest\"\nsla-profile \"pinned\" class=\"reserved\" priority=900 cpu-pinning=#true\nvm \"db\" tenant=\"t\" site=\"s\" {\n    sla \"pinned\"\n    cpu 2\n    memory \"64MiB\"\n    image \"tiny\"\n}\nvm \"web\" tenant=\"t\" site=\"s\" {\n    sla \"reserved\"\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n}\n";
        let compilation = compiler::compile(&compiler::source::Sources::from_files([(
            "main.kdl".to_owned(),
            text.to_owned(),
        )]));
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        let placement = crate::desired::place(&compilation.model, None);
        let desired =
            crate::desired::desired(&compilation.model, std::path::Path::new("."), placement);
        let db = desired.vms.get("db").unwrap();
        let web = desired.vms.get("web").unwrap();
        assert!(db.dedicated_cpus && !web.dedicated_cpus);
        let request = crate::plan::NodeAction::CreateVm {
            addresses: vec![],
            name: db.name.clone(),
            vcpus: db.vcpus,
            memory_bytes: db.memory_bytes,
            image: db.image.clone(),
            volumes: vec![],
            tenant: db.tenant.clone(),
            nics: vec![],
            sla: db.sla.clone(),
            priority: db.priority,
            dedicated_cpus: db.dedicated_cpus,
            nic_mtu: 0,
        }
        .to_request("test");
        let Some(proto::v1::apply_request::Action::CreateVm(definition)) = request.action else {
            panic!("not a create_vm: {request:?}");
        };
        assert!(definition.dedicated_cpus && definition.sla == "reserved");

        let observed = |dedicated: &str, drift: &[&str]| -> ObservedVm {
            serde_json::from_value(serde_json::json!({
                "name": "db", "state": "running", "health": "healthy", "vcpus": 2,
                "memory_bytes": 64 << 20, "crash_count": 0, "volumes": [],
                "sla": "reserved", "dedicated_cpus": dedicated,
                "cgroup_drift": drift,
            }))
            .unwrap()
        };
        assert!(sla_repairs(db, &observed("1-2", &[])).is_empty());
        assert_eq!(
            sla_repairs(db, &observed("", &[])),
            vec!["repair: dedicated CPUs: none, its profile pins 2 vCPUs".to_string()]
        );
        assert_eq!(
            sla_repairs(
                db,
                &observed("1-2", &["cpuset.cpus is 0-3, its dedicated CPUs are 1-2"])
            ),
            vec!["repair: cgroup: cpuset.cpus is 0-3, its dedicated CPUs are 1-2".to_string()]
        );
        let unpinned = DesiredVm {
            dedicated_cpus: false,
            ..db.clone()
        };
        assert_eq!(
            sla_repairs(&unpinned, &observed("1-2", &[])),
            vec!["repair: dedicated CPUs 1-2 given back: its profile no longer pins".to_string()]
        );
    }
}
