//! `sla-profile`: the built-in profiles and the spec's own.

use std::collections::BTreeMap;

use super::{Checker, unique};
use crate::diag::Diagnostic;
use crate::model::*;
use crate::spec::SpecSet;

/// The built-in SLA profiles.
pub const BUILTIN_SLA: &[(&str, SlaClass, u32)] = &[
    ("reserved", SlaClass::Reserved, 1000),
    ("on-demand", SlaClass::OnDemand, 500),
    ("spot", SlaClass::Spot, 0),
];

impl Checker<'_> {
    pub(super) fn sla_profiles(&mut self, set: &SpecSet) -> BTreeMap<String, SlaProfile> {
        let mut out: BTreeMap<String, SlaProfile> = BTreeMap::new();
        for (name, class, priority) in BUILTIN_SLA {
            out.insert(
                (*name).to_owned(),
                SlaProfile {
                    name: (*name).to_owned(),
                    class: *class,
                    priority: *priority,
                    builtin: true,
                    cpu_pinning: false,
                },
            );
        }
        unique(
            self.diags,
            "sla-profile",
            "",
            set.sla_profiles.iter().map(|p| &p.name),
        );
        for p in &set.sla_profiles {
            if let Some(existing) = out.get(&p.name.value) {
                if existing.builtin {
                    self.push(
                        Diagnostic::error(
                            "cairn::resolve::duplicate_name",
                            p.name.span,
                            format!("sla-profile `{}` is built in and cannot be redefined", p.name.value),
                        )
                        .with_help("the built-in profiles are `reserved` (priority 1000), `on-demand` (500) and `spot` (0); choose another name"),
                    );
                }
                continue;
            }
            self.spans.insert("sla-profile", &p.name.value, p.name.span);
            let class = p.class.as_ref().map_or(SlaClass::OnDemand, |c| c.value);
            let cpu_pinning = p.cpu_pinning.as_ref().is_some_and(|pin| pin.value);
            if let Some(pin) = p.cpu_pinning.as_ref().filter(|pin| pin.value)
                && class != SlaClass::Reserved
            {
                self.push(
                    Diagnostic::error(
                        "cairn::check::cpu_pinning",
                        pin.span,
                        format!(
                            "sla-profile `{}` has cpu-pinning=#true, but its class is \"{class}\": only reserved VMs get dedicated CPUs",
                            p.name.value
                        ),
                    )
                    .with_help("set class=\"reserved\" (pinned VMs hold their CPUs whether they use them or not, like every reserved VM), or remove cpu-pinning"),
                );
            }
            out.insert(
                p.name.value.clone(),
                SlaProfile {
                    name: p.name.value.clone(),
                    class,
                    priority: p.priority.as_ref().map_or(500, |v| v.value),
                    builtin: false,
                    cpu_pinning: cpu_pinning && class == SlaClass::Reserved,
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod pinning_tests {
    use crate::place::{PlaceOptions, place};
    use crate::source::Sources;

    /// One node of 4 hardware threads (no host reserve), CPU overcommit 4.0, the
    /// profile `pinned` of `class` with `cpu-pinning=#true`, and `vms` (name, profile,
    /// vCPUs).
    fn compiled(class: &str, vms: &[(&str, &str, u32)]) -> crate::Compilation {
        crate::compile(&Sources::from_files([(
            "main.kdl".to_owned(),
            spec_text(class, vms),
        )]))
    }

    fn spec_text(class: &str, vms: &[(&str, &str, u32)]) -> String {
        let mut text = format!(
            "node-class \"n\" {{\n    cpu 4\n    memory \"16GiB\"\n}}\nsite \"s\" {{\n    overcommit cpu=4.0 memory=1.0\n    rack \"r\" {{\n        node \"n1\" class=\"n\" address=\"127.0.0.1:1\"\n    }}\n}}\ntenant \"t\"\nimage \"tiny\" builtin=\"cairn-guest\"\nsla-profile \"pinned\" class=\"{class}\" priority=900 cpu-pinning=#true\n"
        );
        for (name, sla, cpu) in vms {
            text.push_str(&format!(
                "vm \"{name}\" tenant=\"t\" site=\"s\" {{\n    sla \"{sla}\"\n    cpu {cpu}\n    memory \"64MiB\"\n    image \"tiny\"\n}}\n"
            ));
        }
        text
    }

    #[test]
    fn pinning_is_for_reserved_profiles_only_and_the_error_points_at_it() {
        let bad = compiled("on-demand", &[]);
        let error = bad
            .diagnostics
            .iter()
            .find(|d| d.is_error())
            .expect("an error");
        assert_eq!(error.code, "cairn::check::cpu_pinning");
        assert_eq!(
            error.message,
            "sla-profile `pinned` has cpu-pinning=#true, but its class is \"on-demand\": only reserved VMs get dedicated CPUs"
        );
        assert!(
            error
                .help
                .as_deref()
                .unwrap_or("")
                .contains("class=\"reserved\""),
            "{error:?}"
        );
        // The label is the property itself, on the profile's line (line 13).
        let span = error.labels[0].span;
        let text = spec_text("on-demand", &[]);
        assert_eq!(
            &text[span.start..span.start + span.len],
            "cpu-pinning=#true"
        );
        assert_eq!(text[..span.start].lines().count(), 13);
        let not_bool = crate::compile(&Sources::from_files([(
            "main.kdl".to_owned(),
            "sla-profile \"p\" class=\"reserved\" priority=1 cpu-pinning=\"yes\"\n".to_owned(),
        )]));
        assert!(
            not_bool
                .diagnostics
                .iter()
                .any(|d| d.is_error() && d.message.contains("cpu-pinning")),
            "{:?}",
            not_bool.diagnostics
        );
    }

    #[test]
    fn pinned_vms_take_whole_cpus_that_overcommit_does_not_stretch() {
        // Two pinned VMs of 2 vCPUs take all 4 threads: an on-demand VM that would
        // need a quarter of one (overcommit 4.0) finds no room.
        let full = compiled(
            "reserved",
            &[
                ("p1", "pinned", 2),
                ("p2", "pinned", 2),
                ("od", "on-demand", 1),
            ],
        );
        assert!(!full.has_errors(), "{:?}", full.diagnostics);
        let vm = |name: &str| full.model.vms.iter().find(|v| v.name == name).unwrap();
        assert!(vm("p1").sla.cpu_pinning && !vm("od").sla.cpu_pinning);
        let json = serde_json::to_string(vm("p1")).unwrap();
        assert!(json.contains("\"cpu_pinning\":true"), "{json}");
        assert!(
            !serde_json::to_string(vm("od"))
                .unwrap()
                .contains("cpu_pinning")
        );
        let placed = place(&full.model, &PlaceOptions::default(), None);
        let unplaced: Vec<&str> = placed.unplaced.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(unplaced, vec!["od"], "{placed:?}");
        assert!(
            placed.unplaced[0]
                .reasons
                .iter()
                .any(|r| r.constraint == "cpu"),
            "{:?}",
            placed.unplaced[0].reasons
        );
        // One pinned VM of 3 leaves one whole thread: four on-demand vCPUs share it.
        let shared = compiled(
            "reserved",
            &[
                ("p1", "pinned", 3),
                ("a", "on-demand", 2),
                ("b", "on-demand", 2),
            ],
        );
        let placed = place(&shared.model, &PlaceOptions::default(), None);
        assert!(placed.unplaced.is_empty(), "{:?}", placed.unplaced);
        assert_eq!(placed.nodes[0].cpu_reserved, 3);
        assert_eq!(placed.nodes[0].cpu_shared, 4);
    }
}
