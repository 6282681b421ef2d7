//! `node-class`: capacity, host reserve, disks, NICs and labels that nodes inherit.

use std::collections::BTreeMap;

use super::{Checker, labels, unique};
use crate::diag::Diagnostic;
use crate::model::*;
use crate::spec::{self, SpecSet};
use crate::units::format_size;

impl Checker<'_> {
    pub(super) fn node_classes(&mut self, set: &SpecSet) -> BTreeMap<String, NodeClass> {
        unique(
            self.diags,
            "node-class",
            "",
            set.node_classes.iter().map(|c| &c.name),
        );
        let mut out = BTreeMap::new();
        for c in &set.node_classes {
            if out.contains_key(&c.name.value) {
                continue;
            }
            self.spans.insert("node-class", &c.name.value, c.name.span);
            let capacity = Resources {
                cpu: c.cpu.as_ref().map_or(0, |v| u64::from(v.value)),
                memory_bytes: c.memory.as_ref().map_or(0, |v| v.value),
            };
            let host_reserve = Resources {
                cpu: c.reserve_cpu.as_ref().map_or(0, |v| u64::from(v.value)),
                memory_bytes: c.reserve_memory.as_ref().map_or(0, |v| v.value),
            };
            if let Some(r) = &c.reserve_cpu
                && c.cpu.is_some()
                && host_reserve.cpu >= capacity.cpu
            {
                self.push(
                    Diagnostic::error(
                        "cairn::check::host_reserve_too_large",
                        r.span,
                        format!("node-class `{}` reserves {} of its {} CPUs for the host, leaving none for VMs", c.name.value, host_reserve.cpu, capacity.cpu),
                    )
                    .with_help("reserve fewer CPUs than the class has"),
                );
            }
            if let Some(r) = &c.reserve_memory
                && c.memory.is_some()
                && host_reserve.memory_bytes >= capacity.memory_bytes
            {
                self.push(
                    Diagnostic::error(
                        "cairn::check::host_reserve_too_large",
                        r.span,
                        format!(
                            "node-class `{}` reserves {} of its {} of memory for the host, leaving none for VMs",
                            c.name.value,
                            format_size(host_reserve.memory_bytes),
                            format_size(capacity.memory_bytes)
                        ),
                    )
                    .with_help("reserve less memory than the class has"),
                );
            }
            unique(
                self.diags,
                "disk",
                &format!(" in node-class `{}`", c.name.value),
                c.disks.iter().map(|d| &d.name),
            );
            unique(
                self.diags,
                "nic",
                &format!(" in node-class `{}`", c.name.value),
                c.nics.iter().map(|d| &d.name),
            );
            out.insert(
                c.name.value.clone(),
                NodeClass {
                    name: c.name.value.clone(),
                    capacity,
                    host_reserve,
                    disks: c.disks.iter().map(disk).collect(),
                    nics: c.nics.iter().map(nic).collect(),
                    labels: labels(&c.labels),
                },
            );
        }
        out
    }
}

pub(super) fn disk(d: &spec::HostDisk) -> Disk {
    Disk {
        name: d.name.value.clone(),
        size_bytes: d.size.as_ref().map_or(0, |s| s.value),
        class: d
            .class
            .as_ref()
            .map(|c| c.value.clone())
            .unwrap_or_default(),
    }
}

pub(super) fn nic(n: &spec::HostNic) -> Nic {
    Nic {
        name: n.name.value.clone(),
        speed_bps: n.speed.as_ref().map_or(0, |s| s.value),
    }
}
