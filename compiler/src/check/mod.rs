//! Resolution, checking and expansion: the typed spec to the [`Model`].
//!
//! Resolves every name (with "did you mean" for unknown ones), applies
//! node-class inheritance and defaults, expands vm-groups, and checks every
//! rule of SPEC.md that does not need placement. Like the lowering, it keeps
//! going after an error and always returns the model it could build.
//!
//! One module per object kind, in the order [`check`] runs them:
//! `node_classes`, `sites` (racks and nodes) with `bonds` and `pools`,
//! `slas`, `images`, `tenants` (networks, security groups, members), `vms`
//! (VMs and vm-groups), `capacity` (quotas and reserved capacity over the
//! expanded VMs), `affinities`, `protection`; `selectors` is what `select`,
//! `applies-to` and `nodes` match. Each adds methods to the one `Checker`
//! (the diagnostics and the span index); the helpers every kind uses
//! (duplicate names, unknown references) are here.

use std::collections::BTreeMap;

use crate::diag::{Diagnostic, Span, suggestion};
use crate::model::*;
use crate::source::Sources;
use crate::spec::{self, Name, SpecSet};

mod affinities;
mod bonds;
mod capacity;
mod images;
mod ipam;
mod node_classes;
mod patch;
mod pools;
mod protection;
mod reconcile;
mod selectors;
mod sites;
mod slas;
mod tenants;
mod vms;

pub use images::BUILTIN_IMAGES;
pub(crate) use patch::{PER_VM, patch_vms};
pub use selectors::{matches_node, matches_vm};
pub use slas::BUILTIN_SLA;

/// Where each named object was declared, for messages of later phases
/// (placement explanations, policy results).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpanIndex {
    objects: BTreeMap<(&'static str, String), Span>,
}

impl SpanIndex {
    fn insert(&mut self, kind: &'static str, name: &str, span: Span) {
        self.objects.entry((kind, name.to_owned())).or_insert(span);
    }

    /// Adds what `later` holds after what this index holds: the index of
    /// inserting this one's objects, then `later`'s (the first span of an
    /// object stays).
    fn append(&mut self, later: SpanIndex) {
        for (key, span) in later.objects {
            self.objects.entry(key).or_insert(span);
        }
    }

    /// The span of an object: kind is `vm`, `site`, `node`, `tenant`, `pool`
    /// (as `site/pool`), `affinity`, … as in the spec language.
    pub fn get(&self, kind: &'static str, name: &str) -> Option<Span> {
        self.objects.get(&(kind, name.to_owned())).copied()
    }
}

/// Checks a spec set and builds the model.
pub fn check(sources: &Sources, set: &SpecSet, diags: &mut Vec<Diagnostic>) -> (Model, SpanIndex) {
    check_in(sources, set, diags, crate::threads::second())
}

/// [`check`], resolving VMs on two threads when `threads` allows and there
/// are many: the same model, diagnostics and spans either way.
fn check_in(
    sources: &Sources,
    set: &SpecSet,
    diags: &mut Vec<Diagnostic>,
    threads: bool,
) -> (Model, SpanIndex) {
    let mut c = Checker {
        sources,
        diags,
        spans: SpanIndex::default(),
        pinned: BTreeMap::new(),
        threads,
    };
    let model = c.run(set);
    (model, c.spans)
}

struct Checker<'a> {
    sources: &'a Sources,
    diags: &'a mut Vec<Diagnostic>,
    spans: SpanIndex,
    /// The span of each pinned NIC address: (VM, NIC index) → `address=`.
    pinned: BTreeMap<(String, usize), Span>,
    /// Whether work may go to a second thread.
    threads: bool,
}

/// Reports names declared twice, pointing at both. Returns the first
/// declaration of each name.
fn unique<'n>(
    diags: &mut Vec<Diagnostic>,
    kind: &str,
    scope: &str,
    names: impl IntoIterator<Item = &'n Name>,
) -> BTreeMap<String, Span> {
    let mut seen: BTreeMap<String, Span> = BTreeMap::new();
    for name in names {
        if let Some(first) = seen.get(&name.value) {
            diags.push(
                Diagnostic::error(
                    "cairn::resolve::duplicate_name",
                    name.span,
                    format!("{kind} `{}` is defined twice{scope}", name.value),
                )
                .with_label("defined again here")
                .and_label(*first, "first defined here")
                .with_help(format!(
                    "{kind} names must be unique{scope}; rename or remove one of them"
                )),
            );
        } else {
            seen.insert(name.value.clone(), name.span);
        }
    }
    seen
}

fn unknown(
    code: &'static str,
    r: &Name,
    what: &str,
    owner: &str,
    candidates: &[&str],
) -> Diagnostic {
    Diagnostic::error(
        code,
        r.span,
        format!(
            "{owner} refers to {what} `{}`, which is not defined",
            r.value
        ),
    )
    .with_label(format!("unknown {what}"))
    .with_help(suggestion(&r.value, candidates, what))
}

fn keys(map: &BTreeMap<String, impl Sized>) -> Vec<&str> {
    map.keys().map(String::as_str).collect()
}

impl Checker<'_> {
    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn run(&mut self, set: &SpecSet) -> Model {
        let node_classes = self.node_classes(set);
        let sites = self.sites(set, &node_classes);
        let sla_profiles = self.sla_profiles(set);
        let images = self.images(set);
        let mut tenants = self.tenants(set, &sites);
        let (mut vms, vm_groups) = self.vms(set, &sites, &tenants, &sla_profiles, &images);
        // Everything derived from the VM list below (affinity and plan
        // membership) follows name order, not declaration order.
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        // The addresses (pins, then IPAM), the quotas, reserved capacity and
        // the affinities, reported in that order. IPAM (pure) runs while
        // reserved capacity and the affinities are checked, on a second
        // thread when there are many VMs; their diagnostics are put after the
        // addresses' and the quotas'.
        self.pins(&tenants, &mut vms);
        let parallel = self.threads && vms.len() >= vms::PARALLEL_FROM_VMS;
        let (alloc, affinities, later) = std::thread::scope(|scope| {
            let (tenants, vms) = (&tenants, &vms);
            let allocate = move || crate::ipam::allocate(tenants, vms, None);
            let allocating = parallel.then(|| scope.spawn(allocate));
            let mark = self.diags.len();
            self.reserved_capacity(set, &sites, vms);
            let affinities = self.affinities(set, vms);
            let later: Vec<Diagnostic> = self.diags.drain(mark..).collect();
            let alloc = allocating.map_or_else(allocate, crate::threads::join);
            (alloc, affinities, later)
        });
        self.allocated(&alloc, &mut tenants, &mut vms);
        self.quotas(set, &mut tenants, &vms);
        self.diags.extend(later);
        let protection_plans = self.protection_plans(set, &sites, &mut vms);
        let reconcile = self.reconcile(set);
        let mut model = Model {
            format_version: FORMAT_VERSION,
            node_classes: node_classes.into_values().collect(),
            sites,
            tenants,
            sla_profiles: sla_profiles.into_values().collect(),
            images: images.into_values().collect(),
            vms: vms.into_iter().map(std::sync::Arc::new).collect(),
            vm_groups,
            affinities,
            protection_plans,
            reconcile,
        };
        model.sites.sort_by(|a, b| a.name.cmp(&b.name));
        model.tenants.sort_by(|a, b| a.name.cmp(&b.name));
        model.vms.sort_by(|a, b| a.name.cmp(&b.name));
        model.vm_groups.sort_by(|a, b| a.name.cmp(&b.name));
        model.affinities.sort_by(|a, b| a.name.cmp(&b.name));
        model.protection_plans.sort_by(|a, b| a.name.cmp(&b.name));
        model
    }
}

fn labels(kv: &[spec::KeyValue]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|l| (l.key.value.clone(), l.value.value.clone()))
        .collect()
}

fn list(items: &[&str], max: usize) -> String {
    let shown: Vec<&str> = items.iter().copied().take(max).collect();
    let more = items.len().saturating_sub(max);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::check_in;

    /// Resolving VMs on two threads gives the model, diagnostics (in order)
    /// and spans of one thread, with errors on both sides of the split: a
    /// replica named like an earlier VM, an unknown tenant, an address pinned
    /// by a VM and by a group's replicas.
    #[test]
    fn two_threads_check_as_one_does() {
        let mut files = crate::generate::generate(&crate::generate::GenConfig {
            nodes: 60,
            vms: 2_600,
            seed: 11,
        });
        let body = |pin: &str| {
            format!(
                "    cpu 1\n    memory \"2GiB\"\n    sla \"on-demand\"\n    image \"tiny\"\n    nic network=\"net-0\"{pin}\n}}\n"
            )
        };
        let pin = " address=\"10.0.5.5\"";
        files.push((
            "aa-errors.kdl".to_owned(),
            format!(
                "vm \"dup-0\" tenant=\"t0\" site=\"site-0\" {{\n{}",
                body(pin)
            ),
        ));
        files.push((
            "zz-errors.kdl".to_owned(),
            format!(
                "vm-group \"dup\" tenant=\"t0\" site=\"site-0\" replicas=2 {{\n{}vm-group \"bad\" tenant=\"nope\" site=\"site-0\" replicas=3 {{\n{}vm-group \"pin\" tenant=\"t0\" site=\"site-0\" replicas=2 {{\n{}",
                body(""),
                body(""),
                body(pin)
            ),
        ));
        // A network too small for its NICs (IPAM's error) and an affinity
        // defined twice (the affinities'), checked at once on two threads.
        files.push((
            "mm-errors.kdl".to_owned(),
            format!(
                "tenant \"tiny\" {{\n    network \"n\" site=\"site-0\" cidr=\"10.200.0.0/30\" gateway=\"10.200.0.1\"\n}}\nvm-group \"crowd\" tenant=\"tiny\" site=\"site-0\" replicas=3 {{\n{}affinity \"twice\" kind=\"apart\" scope=\"node\" {{\n    select app=\"x\"\n}}\naffinity \"twice\" kind=\"apart\" scope=\"node\" {{\n    select app=\"x\"\n}}\n",
                body("").replace("net-0", "n")
            ),
        ));
        let sources = crate::Sources::from_files(files);
        let mut diags = vec![];
        let set = crate::lower::lower_all(&sources, &mut diags);
        assert!(diags.is_empty(), "{diags:?}");
        let (mut one, mut two) = (vec![], vec![]);
        let (model_one, spans_one) = check_in(&sources, &set, &mut one, false);
        let (model_two, spans_two) = check_in(&sources, &set, &mut two, true);
        for code in [
            "cairn::resolve::duplicate_name",
            "cairn::resolve::unknown_tenant",
            "cairn::check::network_full",
        ] {
            assert!(one.iter().any(|d| d.code == code), "no {code} in {one:?}");
        }
        assert!(
            one.iter().any(|d| d.message.contains("10.0.5.5")),
            "no pinned-twice error in {one:?}"
        );
        assert!(
            one.iter()
                .any(|d| d.message.contains("affinity `twice` is defined twice")),
            "no duplicate affinity in {one:?}"
        );
        assert_eq!(format!("{two:?}"), format!("{one:?}"));
        assert_eq!(crate::model_json(&model_two), crate::model_json(&model_one));
        assert_eq!(spans_two, spans_one);
    }
}
