//! Selectors (`select`, `applies-to`, `nodes`): what they are and what they
//! match, for the checks here and for placement.

use std::collections::BTreeMap;

use crate::model::*;
use crate::spec;

pub(super) fn selector(s: &spec::SelectorSpec) -> BTreeMap<String, String> {
    s.pairs
        .iter()
        .map(|p| (p.key.value.clone(), p.value.value.clone()))
        .collect()
}

/// Whether a VM matches a selector: every pair must hold. The keys
/// `tenant`, `site`, `group`, `sla` and `availability` are built in; any
/// other key is a tag.
pub fn matches_vm(selector: &BTreeMap<String, String>, vm: &Vm) -> bool {
    selector.iter().all(|(k, v)| match k.as_str() {
        "tenant" => &vm.tenant == v,
        "site" => &vm.site == v,
        "group" => vm.group.as_deref() == Some(v.as_str()),
        "sla" => &vm.sla.name == v || vm.sla.class.as_str() == v,
        "availability" => vm.availability.as_str() == v,
        "name" => &vm.name == v,
        _ => vm.tags.get(k) == Some(v),
    })
}

/// Whether a node matches a selector: labels, plus the built-in keys
/// `site`, `rack`, `node` and `class`.
pub fn matches_node(selector: &BTreeMap<String, String>, node: &Node) -> bool {
    selector.iter().all(|(k, v)| match k.as_str() {
        "site" => &node.site == v,
        "rack" => &node.rack == v,
        "node" => &node.name == v,
        "class" => &node.class == v,
        _ => node.labels.get(k) == Some(v),
    })
}
