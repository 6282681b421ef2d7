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
            out.insert(
                p.name.value.clone(),
                SlaProfile {
                    name: p.name.value.clone(),
                    class: p.class.as_ref().map_or(SlaClass::OnDemand, |c| c.value),
                    priority: p.priority.as_ref().map_or(500, |v| v.value),
                    builtin: false,
                },
            );
        }
        out
    }
}
