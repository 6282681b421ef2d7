//! Selectors (`select`, `applies-to`, `nodes`): what they are and what they
//! match, for the checks here and for placement.

use std::collections::{BTreeMap, HashMap};

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

/// The values a VM has for selector key `key` (`sla` matches the profile's name and
/// its class).
fn vm_values<'v>(key: &str, vm: &'v Vm) -> [Option<&'v str>; 2] {
    match key {
        "tenant" => [Some(&vm.tenant), None],
        "site" => [Some(&vm.site), None],
        "group" => [vm.group.as_deref(), None],
        "sla" => [Some(&vm.sla.name), Some(vm.sla.class.as_str())],
        "availability" => [Some(vm.availability.as_str()), None],
        "name" => [Some(&vm.name), None],
        _ => [vm.tags.get(key).map(String::as_str), None],
    }
}

/// The VMs of a list by the (key, value) pairs of the selectors that will be asked,
/// so that matching a selector looks at the VMs of its rarest pair only, not at
/// every VM (rules x VMs comparisons made a 100,000-VM check superlinear).
pub(super) struct VmIndex<'v> {
    vms: &'v [Vm],
    /// key -> value -> the VMs' positions, ascending.
    by_pair: HashMap<String, HashMap<&'v str, Vec<usize>>>,
}

impl<'v> VmIndex<'v> {
    /// Indexes `vms` by the keys of `selectors`.
    pub(super) fn new<'s>(
        vms: &'v [Vm],
        selectors: impl IntoIterator<Item = &'s BTreeMap<String, String>>,
    ) -> VmIndex<'v> {
        let mut by_pair: HashMap<String, HashMap<&'v str, Vec<usize>>> = HashMap::new();
        for selector in selectors {
            for key in selector.keys() {
                if by_pair.contains_key(key) {
                    continue;
                }
                let mut values: HashMap<&'v str, Vec<usize>> = HashMap::new();
                for (i, vm) in vms.iter().enumerate() {
                    let [first, second] = vm_values(key, vm);
                    for value in [first, second.filter(|s| Some(*s) != first)]
                        .into_iter()
                        .flatten()
                    {
                        values.entry(value).or_default().push(i);
                    }
                }
                by_pair.insert(key.clone(), values);
            }
        }
        VmIndex { vms, by_pair }
    }

    /// The VMs (in list order) that match `selector`: every VM when it has no pair.
    pub(super) fn matching(&self, selector: &BTreeMap<String, String>) -> Vec<&'v Vm> {
        let rarest = selector
            .iter()
            .map(|(k, v)| {
                self.by_pair
                    .get(k.as_str())
                    .and_then(|values| values.get(v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|candidates| candidates.len());
        match rarest {
            None => self.vms.iter().collect(),
            Some(candidates) => candidates
                .iter()
                .map(|&i| &self.vms[i])
                .filter(|vm| matches_vm(selector, vm))
                .collect(),
        }
    }
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
