//! The shape of the spec language: which nodes may appear where, with how
//! many arguments and which properties.
//!
//! One table serves the lowering (unknown names, with suggestions) and the
//! formatter (canonical property order), so the two cannot disagree.

/// How many positional arguments a node takes.
#[derive(Debug, Clone, Copy)]
pub struct Args {
    /// At least.
    pub min: usize,
    /// At most (`usize::MAX` for any number).
    pub max: usize,
    /// What the arguments are, for messages ("a name", "key and value").
    pub what: &'static str,
}

/// The shape of one kind of node at one place in the tree.
#[derive(Debug)]
pub struct Shape {
    /// Dotted path from the top, e.g. `site.rack.node`.
    pub path: &'static str,
    /// Positional arguments.
    pub args: Args,
    /// Properties in canonical order; `None` means any key (selectors).
    pub props: Option<&'static [&'static str]>,
    /// Child node names allowed inside `{ }`.
    pub children: &'static [&'static str],
}

const NAME: Args = Args {
    min: 1,
    max: 1,
    what: "a name",
};
const NONE: Args = Args {
    min: 0,
    max: 0,
    what: "no arguments",
};
const ONE: Args = Args {
    min: 1,
    max: 1,
    what: "one value",
};
const PAIR: Args = Args {
    min: 2,
    max: 2,
    what: "a key and a value",
};
const MANY: Args = Args {
    min: 1,
    max: usize::MAX,
    what: "one or more names",
};

const VM_BODY: &[&str] = &[
    "cpu",
    "memory",
    "sla",
    "availability",
    "ft-epoch",
    "power",
    "image",
    "disk",
    "nic",
    "tag",
];
const GROUP_BODY: &[&str] = &[
    "spread",
    "max-unavailable",
    "cpu",
    "memory",
    "sla",
    "availability",
    "ft-epoch",
    "power",
    "image",
    "disk",
    "nic",
    "tag",
];

macro_rules! shape {
    ($path:literal, $args:expr, [$($p:literal),*], [$($c:literal),*]) => {
        Shape { path: $path, args: $args, props: Some(&[$($p),*]), children: &[$($c),*] }
    };
    ($path:literal, $args:expr, any, []) => {
        Shape { path: $path, args: $args, props: None, children: &[] }
    };
    ($path:literal, $args:expr, [$($p:literal),*], $children:expr) => {
        Shape { path: $path, args: $args, props: Some(&[$($p),*]), children: $children }
    };
}

/// Every shape of the language.
pub static SHAPES: &[Shape] = &[
    shape!(
        "",
        NONE,
        [],
        [
            "node-class",
            "site",
            "tenant",
            "sla-profile",
            "image",
            "vm",
            "vm-group",
            "affinity",
            "protection-plan",
            "reconcile"
        ]
    ),
    shape!(
        "node-class",
        NAME,
        [],
        ["cpu", "memory", "host-reserve", "disk", "nic", "label"]
    ),
    shape!("node-class.cpu", ONE, [], []),
    shape!("node-class.memory", ONE, [], []),
    shape!("node-class.host-reserve", NONE, ["cpu", "memory"], []),
    shape!("node-class.disk", NAME, ["size", "class"], []),
    shape!("node-class.nic", NAME, ["speed"], []),
    shape!("node-class.label", PAIR, [], []),
    shape!(
        "site",
        NAME,
        [],
        [
            "overcommit",
            "ha-reserve",
            "scheduler",
            "witness",
            "failure-detect",
            "rack",
            "bond",
            "pool"
        ]
    ),
    shape!("site.overcommit", NONE, ["cpu", "memory"], []),
    shape!("site.ha-reserve", NONE, ["nodes"], []),
    shape!("site.failure-detect", NONE, ["after"], []),
    shape!("site.scheduler", NONE, ["strategy"], ["rebalance"]),
    shape!(
        "site.scheduler.rebalance",
        NONE,
        ["threshold", "max-moves"],
        []
    ),
    shape!("site.witness", NONE, ["address", "alternate"], []),
    shape!("site.rack", NAME, [], ["node"]),
    shape!(
        "site.rack.node",
        NAME,
        ["class", "address", "underlay", "maintenance"],
        ["label", "disk", "nic"]
    ),
    shape!("site.rack.node.label", PAIR, [], []),
    shape!("site.rack.node.disk", NAME, ["size", "class"], []),
    shape!("site.rack.node.nic", NAME, ["speed"], []),
    shape!(
        "site.bond",
        NAME,
        ["mode", "mtu", "miimon"],
        ["members", "traffic"]
    ),
    shape!("site.bond.members", MANY, [], []),
    shape!("site.bond.traffic", NAME, ["min", "max", "weight"], []),
    shape!(
        "site.pool",
        NAME,
        ["disk-class", "replicas", "failure-domain"],
        ["stripe-width", "stripe-unit", "thin-overcommit"]
    ),
    shape!("site.pool.stripe-width", ONE, [], []),
    shape!("site.pool.stripe-unit", ONE, [], []),
    shape!("site.pool.thin-overcommit", ONE, [], []),
    shape!(
        "tenant",
        NAME,
        [],
        ["quota", "member", "budget", "network", "security-group"]
    ),
    shape!(
        "tenant.quota",
        NONE,
        ["vcpus", "memory", "storage", "vms"],
        []
    ),
    shape!("tenant.member", NAME, ["role", "key"], []),
    shape!("tenant.budget", NONE, ["monthly", "currency"], []),
    shape!(
        "tenant.network",
        NAME,
        ["site", "cidr", "gateway", "external", "ipv6"],
        []
    ),
    shape!("tenant.security-group", NAME, [], ["allow"]),
    shape!(
        "tenant.security-group.allow",
        NONE,
        ["from", "to", "proto", "port"],
        []
    ),
    shape!(
        "sla-profile",
        NAME,
        ["class", "priority", "cpu-pinning"],
        []
    ),
    shape!(
        "image",
        NAME,
        ["builtin"],
        ["kernel", "initrd", "cmdline", "disk"]
    ),
    shape!("image.kernel", ONE, [], []),
    shape!("image.initrd", ONE, [], []),
    shape!("image.cmdline", ONE, [], []),
    shape!("image.disk", ONE, ["format"], []),
    shape!("vm", NAME, ["tenant", "site"], VM_BODY),
    shape!("vm.cpu", ONE, [], []),
    shape!("vm.memory", ONE, [], []),
    shape!("vm.sla", ONE, [], []),
    shape!("vm.availability", ONE, [], []),
    shape!("vm.ft-epoch", ONE, [], []),
    shape!("vm.power", ONE, [], []),
    shape!("vm.image", ONE, [], []),
    shape!(
        "vm.disk",
        NAME,
        ["size", "pool", "from-image", "prevent-destroy"],
        []
    ),
    shape!(
        "vm.nic",
        NONE,
        ["network", "security-groups", "address"],
        []
    ),
    shape!("vm.tag", PAIR, [], []),
    shape!("vm-group", NAME, ["tenant", "site", "replicas"], GROUP_BODY),
    shape!("vm-group.spread", ONE, [], []),
    shape!("vm-group.max-unavailable", ONE, [], []),
    shape!("vm-group.cpu", ONE, [], []),
    shape!("vm-group.memory", ONE, [], []),
    shape!("vm-group.sla", ONE, [], []),
    shape!("vm-group.availability", ONE, [], []),
    shape!("vm-group.ft-epoch", ONE, [], []),
    shape!("vm-group.power", ONE, [], []),
    shape!("vm-group.image", ONE, [], []),
    shape!(
        "vm-group.disk",
        NAME,
        ["size", "pool", "from-image", "prevent-destroy"],
        []
    ),
    shape!(
        "vm-group.nic",
        NONE,
        ["network", "security-groups", "address"],
        []
    ),
    shape!("vm-group.tag", PAIR, [], []),
    shape!(
        "affinity",
        NAME,
        ["kind", "scope", "hard", "weight"],
        ["select", "nodes"]
    ),
    shape!("affinity.select", NONE, any, []),
    shape!("affinity.nodes", NONE, any, []),
    shape!(
        "protection-plan",
        NAME,
        [],
        ["snapshot", "replicate", "applies-to"]
    ),
    shape!("protection-plan.snapshot", NONE, ["every", "keep"], []),
    shape!(
        "protection-plan.replicate",
        NONE,
        ["to-site", "pool", "every", "keep"],
        []
    ),
    shape!("protection-plan.applies-to", NONE, any, []),
    shape!(
        "reconcile",
        NONE,
        [],
        [
            "auto-apply",
            "self-heal",
            "prune",
            "drift-check",
            "crash-restart",
            "blast-radius",
            "freeze"
        ]
    ),
    shape!("reconcile.auto-apply", ONE, [], []),
    shape!("reconcile.self-heal", ONE, [], []),
    shape!("reconcile.prune", ONE, [], []),
    shape!("reconcile.drift-check", NONE, ["every"], []),
    shape!("reconcile.crash-restart", NONE, ["limit", "window"], []),
    shape!("reconcile.blast-radius", NONE, ["max"], []),
    shape!("reconcile.freeze", NAME, ["from", "to", "zone"], []),
];

/// The shape at a dotted path.
pub fn shape(path: &str) -> Option<&'static Shape> {
    SHAPES.iter().find(|s| s.path == path)
}

/// The path of a child of `parent` named `name`.
pub fn child_path(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// A JSON Schema of the spec language's structure, derived from [`SHAPES`]:
/// one definition per node kind with its argument count, properties and
/// children (the shape of a KDL document read as JSON-in-KDL style objects).
pub fn spec_schema() -> String {
    use serde_json::{Map, Value, json};
    let mut defs = Map::new();
    for s in SHAPES {
        let id = if s.path.is_empty() {
            "document".to_owned()
        } else {
            s.path.to_owned()
        };
        let props: Value = match s.props {
            None => json!({ "type": "object", "additionalProperties": { "type": "string" } }),
            Some(p) => {
                let fields: Map<String, Value> =
                    p.iter().map(|k| ((*k).to_owned(), json!({}))).collect();
                json!({ "type": "object", "properties": fields, "additionalProperties": false })
            }
        };
        let children: Map<String, Value> = s
            .children
            .iter()
            .map(|c| ((*c).to_owned(), json!({ "type": "array", "items": { "$ref": format!("#/$defs/{}", child_path(s.path, c)) } })))
            .collect();
        let mut args =
            json!({ "type": "array", "minItems": s.args.min, "description": s.args.what });
        if s.args.max != usize::MAX {
            args["maxItems"] = json!(s.args.max);
        }
        defs.insert(
            id,
            json!({
                "type": "object",
                "properties": {
                    "arguments": args,
                    "properties": props,
                    "children": { "type": "object", "properties": children, "additionalProperties": false }
                },
                "additionalProperties": false
            }),
        );
    }
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "cairn spec language",
        "description": "The structure of cairn's KDL spec files: each node kind with its arguments, properties and children. Values, units and references are checked by `cairn validate`; see SPEC.md.",
        "$ref": "#/$defs/document",
        "$defs": defs
    });
    let mut text = serde_json::to_string_pretty(&schema).expect("schemas serialize");
    text.push('\n');
    text
}
