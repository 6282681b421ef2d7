//! Plan: diff(desired, observed) → changes (what an operator reads) and steps
//! (the node actions that carry them out), ordered into waves.
//!
//! A change is one object (`vm web-1`, `volume web-1-root`) with a kind (create,
//! update, replace, delete, start, stop, move, preempt). A step is one idempotent
//! `Apply` call to one node with a request id `PLAN_ID.STEP`; steps depend on steps
//! (creates forward: volume → VM definition → start; deletes backward: stop → delete
//! VM → delete volume; a VM created on a node waits for the VMs deleted there).
//! The wave of a step is the length of its longest dependency chain.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::desired::{BootImage, Desired, DesiredBond, DesiredTraffic, DesiredVm, DesiredVolume};
use proto::v1::{VmState, VolumeRole};

use crate::drift::{self, bond_definition_diff};
use crate::observe::{NodeObservation, Observed};

/// Version of the plan JSON (`cairn plan --format json`, plan files).
pub const PLAN_FORMAT_VERSION: u32 = 1;

/// What happens to one object.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Made new.
    Create,
    /// Changed in place.
    Update,
    /// Deleted and made new (the node cannot change it in place).
    Replace,
    /// Removed.
    Delete,
    /// Started (stopped or crashed).
    Start,
    /// Stopped.
    Stop,
    /// Moved to another node.
    Move,
    /// Removed to make room for a higher-priority VM.
    Preempt,
}

impl Change {
    /// A change with no details and no steps yet, not site infrastructure, not a move.
    fn new(kind: ChangeKind, object: &str, name: &str, tenant: &str, node: &str) -> Change {
        Change {
            kind,
            object: object.to_owned(),
            name: name.to_owned(),
            tenant: tenant.to_owned(),
            site: None,
            node: node.to_owned(),
            was_node: None,
            details: vec![],
            steps: vec![],
            data_loss: false,
        }
    }
}

impl ChangeKind {
    /// The Terraform-style symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            ChangeKind::Create => "+",
            ChangeKind::Update | ChangeKind::Start | ChangeKind::Stop => "~",
            ChangeKind::Replace => "-/+",
            ChangeKind::Delete | ChangeKind::Preempt => "-",
            ChangeKind::Move => "->",
        }
    }

    /// The word.
    pub fn word(self) -> &'static str {
        match self {
            ChangeKind::Create => "create",
            ChangeKind::Update => "update",
            ChangeKind::Replace => "replace",
            ChangeKind::Delete => "delete",
            ChangeKind::Start => "start",
            ChangeKind::Stop => "stop",
            ChangeKind::Move => "move",
            ChangeKind::Preempt => "preempt",
        }
    }
}

/// A change to one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Change {
    /// Kind.
    pub kind: ChangeKind,
    /// `vm`, `volume` or `bond`.
    pub object: String,
    /// Name.
    pub name: String,
    /// Tenant (empty when unknown: an object no spec mentions, or a site's bond).
    pub tenant: String,
    /// The site, for site infrastructure (bonds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The node it ends up on (or is removed from).
    pub node: String,
    /// For moves: the node it leaves.
    pub was_node: Option<String>,
    /// Readable details ("memory 64 MiB → 128 MiB").
    pub details: Vec<String>,
    /// The steps that carry it out.
    pub steps: Vec<usize>,
    /// It deletes data that exists (a volume that left the spec): always shown,
    /// and counted against the controller's blast-radius budget.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_loss: bool,
}

/// A replica peer of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PeerRef {
    /// Node name.
    pub name: String,
    /// Address.
    pub address: String,
    /// Public key (hex), empty when the node did not answer.
    pub public_key_hex: String,
}

/// One node action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum NodeAction {
    /// `CreateVolume`.
    CreateVolume {
        /// Name.
        name: String,
        /// Size.
        size_bytes: u64,
        /// Stripe columns.
        stripe_width: u32,
        /// Stripe unit.
        stripe_unit_bytes: u64,
        /// Replica peers.
        replicas: Vec<PeerRef>,
    },
    /// `DeleteVolume`.
    DeleteVolume {
        /// Name.
        name: String,
    },
    /// `ResizeVolume`: grow in place, keeping the data (the node refuses a shrink).
    ResizeVolume {
        /// Name.
        name: String,
        /// The new size.
        size_bytes: u64,
    },
    /// `CreateVm`.
    CreateVm {
        /// Name.
        name: String,
        /// vCPUs.
        vcpus: u32,
        /// Memory.
        memory_bytes: u64,
        /// Image.
        image: BootImage,
        /// Volumes attached.
        volumes: Vec<String>,
        /// Tenant (its NICs' bridges are per tenant network).
        #[serde(default)]
        tenant: String,
        /// NICs: tenant network names, in order.
        #[serde(default)]
        nics: Vec<String>,
    },
    /// `StartVm`.
    StartVm {
        /// Name.
        name: String,
    },
    /// `StopVm`.
    StopVm {
        /// Name.
        name: String,
    },
    /// `DeleteVm`.
    DeleteVm {
        /// Name.
        name: String,
    },
    /// `ApplyBond`: create, change or repair a bond and its QoS classes.
    ApplyBond {
        /// Name (the device).
        name: String,
        /// Mode.
        mode: String,
        /// Member NICs.
        members: Vec<String>,
        /// MTU.
        mtu: u32,
        /// Link-monitoring interval (ms).
        miimon_ms: u32,
        /// Capacity for the HTB root (bit/s).
        capacity_bps: u64,
        /// Traffic classes.
        traffic: Vec<DesiredTraffic>,
    },
    /// `DeleteBond`.
    DeleteBond {
        /// Name.
        name: String,
    },
}

impl NodeAction {
    /// `create_volume`, ...
    pub fn word(&self) -> &'static str {
        match self {
            NodeAction::CreateVolume { .. } => "create_volume",
            NodeAction::DeleteVolume { .. } => "delete_volume",
            NodeAction::ResizeVolume { .. } => "resize_volume",
            NodeAction::CreateVm { .. } => "create_vm",
            NodeAction::StartVm { .. } => "start_vm",
            NodeAction::StopVm { .. } => "stop_vm",
            NodeAction::DeleteVm { .. } => "delete_vm",
            NodeAction::ApplyBond { .. } => "apply_bond",
            NodeAction::DeleteBond { .. } => "delete_bond",
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        match self {
            NodeAction::CreateVolume { name, .. }
            | NodeAction::DeleteVolume { name }
            | NodeAction::ResizeVolume { name, .. }
            | NodeAction::CreateVm { name, .. }
            | NodeAction::StartVm { name }
            | NodeAction::StopVm { name }
            | NodeAction::DeleteVm { name }
            | NodeAction::ApplyBond { name, .. }
            | NodeAction::DeleteBond { name } => name,
        }
    }

    /// The wire request (the one place actions become protobuf).
    pub fn to_request(&self, request_id: &str) -> proto::v1::ApplyRequest {
        use proto::v1::apply_request::Action;
        use proto::v1::create_vm::Image;
        let action = match self {
            NodeAction::CreateVolume {
                name,
                size_bytes,
                stripe_width,
                stripe_unit_bytes,
                replicas,
            } => Action::CreateVolume(proto::v1::CreateVolume {
                name: name.clone(),
                size_bytes: *size_bytes,
                stripe_width: *stripe_width,
                stripe_unit_bytes: *stripe_unit_bytes,
                replica_peers: replicas
                    .iter()
                    .map(|p| proto::v1::Peer {
                        name: p.name.clone(),
                        address: p.address.clone(),
                        public_key_hex: p.public_key_hex.clone(),
                    })
                    .collect(),
            }),
            NodeAction::DeleteVolume { name } => {
                Action::DeleteVolume(proto::v1::DeleteVolume { name: name.clone() })
            }
            NodeAction::ResizeVolume { name, size_bytes } => {
                Action::ResizeVolume(proto::v1::ResizeVolume {
                    name: name.clone(),
                    size_bytes: *size_bytes,
                })
            }
            NodeAction::CreateVm {
                name,
                vcpus,
                memory_bytes,
                image,
                volumes,
                tenant,
                nics,
            } => Action::CreateVm(proto::v1::CreateVm {
                name: name.clone(),
                vcpus: *vcpus,
                memory_bytes: *memory_bytes,
                image: Some(match image {
                    BootImage::Builtin(b) => Image::Builtin(b.clone()),
                    BootImage::Kernel {
                        kernel,
                        initrd,
                        cmdline,
                    } => Image::Kernel(proto::v1::KernelImage {
                        kernel_path: kernel.clone(),
                        initrd_path: initrd.clone(),
                        cmdline: cmdline.clone(),
                    }),
                }),
                volumes: volumes.clone(),
                tenant: tenant.clone(),
                nics: nics
                    .iter()
                    .map(|network| proto::v1::VmNic {
                        network: network.clone(),
                        mtu: 0,
                        ipv4: String::new(),
                    })
                    .collect(),
            }),
            NodeAction::StartVm { name } => {
                Action::StartVm(proto::v1::StartVm { name: name.clone() })
            }
            NodeAction::StopVm { name } => Action::StopVm(proto::v1::StopVm {
                name: name.clone(),
                grace_ms: 0,
            }),
            NodeAction::DeleteVm { name } => {
                Action::DeleteVm(proto::v1::DeleteVm { name: name.clone() })
            }
            NodeAction::ApplyBond {
                name,
                mode,
                members,
                mtu,
                miimon_ms,
                capacity_bps,
                traffic,
            } => Action::ApplyBond(proto::v1::ApplyBond {
                name: name.clone(),
                mode: mode.clone(),
                members: members.clone(),
                mtu: *mtu,
                traffic: traffic
                    .iter()
                    .map(|t| proto::v1::TrafficClass {
                        name: t.name.clone(),
                        min_bps: t.min_bps,
                        max_bps: t.max_bps,
                        weight: t.weight,
                    })
                    .collect(),
                capacity_bps: *capacity_bps,
                miimon_ms: *miimon_ms,
            }),
            NodeAction::DeleteBond { name } => {
                Action::DeleteBond(proto::v1::DeleteBond { name: name.clone() })
            }
        };
        proto::v1::ApplyRequest {
            request_id: request_id.to_owned(),
            action: Some(action),
        }
    }
}

/// One step: one action on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Step {
    /// Index in `Plan::steps`.
    pub id: usize,
    /// Wave (0-based): every dependency is in an earlier wave.
    pub wave: usize,
    /// Node name.
    pub node: String,
    /// Node address.
    pub address: String,
    /// The action.
    #[serde(flatten)]
    pub action: NodeAction,
    /// Steps that must succeed first.
    pub depends_on: Vec<usize>,
}

/// Counts of the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Summary {
    /// Objects created (replacements count here and in `destroy`).
    pub add: usize,
    /// Objects updated, started or stopped.
    pub change: usize,
    /// Objects deleted or preempted.
    pub destroy: usize,
    /// VMs moved to another node.
    #[serde(rename = "move")]
    pub moves: usize,
}

/// An object left alone because its node did not answer, or refuses to carry it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LeftAlone {
    /// `vm`, `volume` or `bond`.
    pub object: String,
    /// Name.
    pub name: String,
    /// The node that did not answer (or refuses).
    pub node: String,
    /// Why, when the node answered but cannot carry it out (empty: it did not answer).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A change the specs ask for that no plan carries out, because it would destroy
/// data or the runtime cannot make it: the specs must change instead. A plan with
/// one is not acceptable (exit 1) and is never applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Refused {
    /// `vm` or `volume`.
    pub object: String,
    /// Name.
    pub name: String,
    /// The node that holds it.
    pub node: String,
    /// What was asked, why it is refused and what would be right.
    pub reason: String,
}

/// A plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Plan {
    /// [`PLAN_FORMAT_VERSION`].
    pub format_version: u32,
    /// Hash of revision, observed state and steps (16 hex digits).
    pub plan_id: String,
    /// Digest of the spec sources it was made from.
    pub revision: String,
    /// Digest of the observed state it is bound to.
    pub observed_digest: String,
    /// The summary counts.
    pub summary: Summary,
    /// Changes, by tenant then object then name.
    pub changes: Vec<Change>,
    /// Steps, in dependency order.
    pub steps: Vec<Step>,
    /// Number of waves.
    pub waves: usize,
    /// Nodes that did not answer: name → reason.
    pub unreachable: BTreeMap<String, String>,
    /// Objects not touched because their node did not answer.
    pub left_alone: Vec<LeftAlone>,
    /// VMs with no node: name → reason.
    pub unplaced: BTreeMap<String, String>,
    /// Those of them that are spot VMs (they wait for room by design; not an error).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub spot_unplaced: std::collections::BTreeSet<String>,
    /// Changes refused because they would destroy data or cannot be made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refused>,
    /// Volumes the specs of this plan protect with `prevent-destroy` (recorded
    /// when it is applied: a later plan may not delete them until specs that
    /// lift the protection were applied).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub protected: std::collections::BTreeSet<String>,
    /// The placement this plan carries out (recorded after apply).
    pub placement: crate::desired::Placement,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// VMs the specs want that cannot be placed, apart from those preempted by
    /// design (spot VMs): the specs do not validate, so the plan is never applied.
    pub fn blocking_unplaced(&self) -> impl Iterator<Item = (&String, &String)> {
        self.unplaced.iter().filter(|(vm, _)| {
            !self.placement.preempted.contains_key(*vm) && !self.spot_unplaced.contains(*vm)
        })
    }

    /// Why carrying this plan out would not make the cluster match the specs
    /// (empty: applying it converges). One line each.
    pub fn not_converged(&self) -> Vec<String> {
        let mut out = vec![];
        for (node, error) in &self.unreachable {
            out.push(format!("node {node} did not answer ({error})"));
        }
        let waiting = self
            .left_alone
            .iter()
            .filter(|l| l.reason.is_empty())
            .count();
        if waiting > 0 {
            out.push(format!(
                "{waiting} object{} wait{} for nodes that did not answer",
                if waiting == 1 { "" } else { "s" },
                if waiting == 1 { "s" } else { "" }
            ));
        }
        for l in self.left_alone.iter().filter(|l| !l.reason.is_empty()) {
            out.push(format!(
                "{} {} on {}: {}",
                l.object, l.name, l.node, l.reason
            ));
        }
        for (vm, reason) in self.blocking_unplaced() {
            out.push(format!("vm {vm} cannot be placed: {reason}"));
        }
        for r in &self.refused {
            out.push(format!(
                "{} {} on {}: {}",
                r.object, r.name, r.node, r.reason
            ));
        }
        out
    }
}

struct Builder<'a> {
    desired: &'a Desired,
    observed: &'a Observed,
    steps: Vec<Step>,
    changes: Vec<Change>,
}

impl Builder<'_> {
    fn address(&self, node: &str) -> String {
        self.desired
            .nodes
            .get(node)
            .map(|n| n.address.clone())
            .unwrap_or_default()
    }

    fn step(&mut self, node: &str, action: NodeAction, depends_on: Vec<usize>) -> usize {
        let id = self.steps.len();
        let wave = depends_on
            .iter()
            .map(|d| self.steps[*d].wave + 1)
            .max()
            .unwrap_or(0);
        self.steps.push(Step {
            id,
            wave,
            node: node.to_owned(),
            address: self.address(node),
            action,
            depends_on,
        });
        id
    }

    fn public_key(&self, node: &str) -> String {
        match self.observed.nodes.get(node) {
            Some(NodeObservation::Reachable { public_key_hex, .. }) => public_key_hex.clone(),
            _ => String::new(),
        }
    }

    fn create_volume(&mut self, v: &DesiredVolume, depends_on: Vec<usize>) -> usize {
        let replicas = v
            .replicas
            .iter()
            .map(|r| PeerRef {
                name: r.clone(),
                address: self.address(r),
                public_key_hex: self.public_key(r),
            })
            .collect();
        self.step(
            &v.node,
            NodeAction::CreateVolume {
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                stripe_width: v.stripe_width,
                stripe_unit_bytes: v.stripe_unit_bytes,
                replicas,
            },
            depends_on,
        )
    }

    fn create_vm(&mut self, vm: &DesiredVm, depends_on: Vec<usize>) -> Vec<usize> {
        let create = self.step(&vm.node, vm_definition(vm), depends_on);
        let start = self.step(
            &vm.node,
            NodeAction::StartVm {
                name: vm.name.clone(),
            },
            vec![create],
        );
        vec![create, start]
    }

    /// Stop (when it runs) and delete a VM; returns the steps and the delete step.
    fn remove_vm(&mut self, node: &str, name: &str, running: bool) -> (Vec<usize>, usize) {
        let mut steps = vec![];
        let mut deps = vec![];
        if running {
            let stop = self.step(
                node,
                NodeAction::StopVm {
                    name: name.to_owned(),
                },
                vec![],
            );
            steps.push(stop);
            deps.push(stop);
        }
        let delete = self.step(
            node,
            NodeAction::DeleteVm {
                name: name.to_owned(),
            },
            deps,
        );
        steps.push(delete);
        (steps, delete)
    }
}

fn bond_action(bond: &DesiredBond) -> NodeAction {
    NodeAction::ApplyBond {
        name: bond.name.clone(),
        mode: bond.mode.clone(),
        members: bond.members.clone(),
        mtu: bond.mtu,
        miimon_ms: bond.miimon_ms,
        capacity_bps: bond.capacity_bps,
        traffic: bond.traffic.clone(),
    }
}

fn bond_details(bond: &DesiredBond) -> Vec<String> {
    let mut out = vec![format!(
        "{} over {}, mtu {}, {} capacity on this node",
        bond.mode,
        bond.members.join(" "),
        bond.mtu,
        compiler::units::format_bandwidth(bond.capacity_bps)
    )];
    out.extend(bond.traffic.iter().map(drift::traffic_text));
    out
}

/// Bonds: per node, each bond of its site is created, changed to the spec's
/// definition, or repaired when the device drifted from it (a member detached,
/// a class deleted or its rate changed: the node reads the device back over
/// netlink); bonds the node keeps that its site no longer has are deleted.
/// Bonds depend on nothing and nothing depends on them (VM NICs use tenant
/// bridges, not the bond), so their steps are in the first wave. A node that
/// refuses network actions (no namespace of its own, not root) has its bonds
/// left alone with its reason.
fn plan_bonds(b: &mut Builder<'_>, left_alone: &mut Vec<LeftAlone>) {
    let desired = b.desired;
    for (node, wanted) in &desired.bonds {
        let Some(NodeObservation::Reachable {
            bonds: have,
            networking,
            ..
        }) = b.observed.nodes.get(node)
        else {
            // Unreachable: its bonds wait with it.
            if b.observed.nodes.contains_key(node) {
                left_alone.extend(wanted.keys().map(|name| LeftAlone {
                    object: "bond".into(),
                    name: name.clone(),
                    node: node.clone(),
                    reason: String::new(),
                }));
            }
            continue;
        };
        let site = desired.nodes.get(node).map(|n| n.site.clone());
        let refused = !networking.unavailable.is_empty();
        for want in wanted.values() {
            let observed = have.get(&want.name);
            let (kind, details) = match observed {
                None => (ChangeKind::Create, bond_details(want)),
                Some(o) => {
                    let mut details = bond_definition_diff(want, o);
                    if details.is_empty() {
                        if !o.exists {
                            details.push("the device is gone: make it again".into());
                        } else if !o.drift.is_empty() {
                            details.extend(o.drift.iter().map(|d| format!("repair: {d}")));
                        } else {
                            continue;
                        }
                    }
                    (ChangeKind::Update, details)
                }
            };
            if refused {
                left_alone.push(LeftAlone {
                    object: "bond".into(),
                    name: want.name.clone(),
                    node: node.clone(),
                    reason: format!(
                        "network actions are refused there: {}",
                        networking.unavailable
                    ),
                });
                continue;
            }
            let mut details = details;
            if networking.bond_implementation == "bridge-fallback" && want.mode != "active-backup" {
                details.push(format!(
                    "this node has no bonding driver (bridge fallback): it will refuse mode {}",
                    want.mode
                ));
            }
            let step = b.step(node, bond_action(want), vec![]);
            b.changes.push(Change {
                site: site.clone(),
                details,
                steps: vec![step],
                ..Change::new(kind, "bond", &want.name, "", node)
            });
        }
        for name in have.keys().filter(|n| !wanted.contains_key(*n)) {
            if refused {
                continue;
            }
            let step = b.step(node, NodeAction::DeleteBond { name: name.clone() }, vec![]);
            b.changes.push(Change {
                site: site.clone(),
                details: vec!["its site no longer has this bond".into()],
                steps: vec![step],
                ..Change::new(ChangeKind::Delete, "bond", name, "", node)
            });
        }
    }
}

/// The `CreateVm` of a VM (also re-sent, unchanged, to repair its NICs).
fn vm_definition(vm: &DesiredVm) -> NodeAction {
    NodeAction::CreateVm {
        name: vm.name.clone(),
        vcpus: vm.vcpus,
        memory_bytes: vm.memory_bytes,
        image: vm.image.clone(),
        volumes: attached_volumes(vm),
        tenant: vm.tenant.clone(),
        nics: vm.nics.clone(),
    }
}

/// The volumes a VM definition attaches. `cairn-vmm` cannot attach engine volumes
/// yet (node-runtime refuses `StartVm` of a VM with volumes), so VMs are defined
/// without attachments and their volumes are created beside them; switching this
/// function to `vm.volumes.clone()` attaches them once the node supports it.
fn attached_volumes(_vm: &DesiredVm) -> Vec<String> {
    vec![]
}

fn vm_details(vm: &DesiredVm) -> Vec<String> {
    let image = match &vm.image {
        BootImage::Builtin(b) => format!("image {b} (built in)"),
        BootImage::Kernel { kernel, .. } => format!("kernel {kernel}"),
    };
    let mut line = format!(
        "{} vCPU, {} memory, {image}",
        vm.vcpus,
        compiler::units::human_size(vm.memory_bytes)
    );
    if !vm.volumes.is_empty() {
        line.push_str(&format!(", volumes {}", vm.volumes.join(" ")));
    }
    if !vm.nics.is_empty() {
        line.push_str(&format!(", nics {}", vm.nics.join(" ")));
    }
    vec![line]
}

fn volume_details(v: &DesiredVolume) -> Vec<String> {
    let mut line = format!(
        "{}, {} × {} stripes",
        compiler::units::human_size(v.size_bytes),
        v.stripe_width,
        compiler::units::human_size(v.stripe_unit_bytes)
    );
    if !v.replicas.is_empty() {
        line.push_str(&format!(", replica on {}", v.replicas.join(", ")));
    }
    vec![line]
}

/// Computes the plan.
pub fn plan(desired: &Desired, observed: &Observed, revision: &str) -> Plan {
    let mut b = Builder {
        desired,
        observed,
        steps: vec![],
        changes: vec![],
    };
    let mut left_alone = vec![];
    let observed_vms = observed.vms();
    let reachable = |n: &str| observed.reachable(n);

    plan_bonds(&mut b, &mut left_alone);

    // Deletes first (they free room; creates on the same node wait for them).
    let mut refused = vec![];
    let mut deleted_vm_steps: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut all_vm_deletes = vec![];
    for (name, copies) in &observed_vms {
        for (node, vm) in copies {
            let wanted_here = desired.vms.get(*name).is_some_and(|d| d.node == *node);
            let wanted_elsewhere = desired.vms.get(*name).is_some_and(|d| d.node != *node);
            if wanted_here {
                continue;
            }
            let in_spec = desired.tenants.contains_key(*name);
            let preempted = desired.placement.preempted.get(*name);
            if in_spec && !wanted_elsewhere && preempted.is_none() {
                // Still in the spec but it cannot be placed now: a spec mistake
                // (or a cluster too small) never deletes what runs. It stays.
                let why = desired
                    .placement
                    .unplaced
                    .get(*name)
                    .map_or("it has no node", String::as_str);
                left_alone.push(LeftAlone {
                    object: "vm".into(),
                    name: (*name).to_owned(),
                    node: (*node).to_owned(),
                    reason: format!(
                        "it cannot be placed now ({why}); it stays where it runs until the specs give it room"
                    ),
                });
                continue;
            }
            if wanted_elsewhere {
                // Handled as a move below when the target answers.
                let target = &desired.vms[*name].node;
                if !reachable(target) {
                    continue;
                }
                let already_there = copies.iter().any(|(n, _)| n == target);
                if !already_there {
                    continue;
                }
            }
            let running = vm.is_running();
            let (steps, delete) = b.remove_vm(node, name, running);
            deleted_vm_steps
                .entry((*node).to_owned())
                .or_default()
                .push(delete);
            all_vm_deletes.push(delete);
            let (kind, details) = match preempted {
                Some(why) => (
                    ChangeKind::Preempt,
                    vec![why.clone(), "its volumes are kept".to_owned()],
                ),
                None if wanted_elsewhere => (
                    ChangeKind::Delete,
                    vec![format!(
                        "duplicate: it also runs on {}",
                        desired.vms[*name].node
                    )],
                ),
                None => (ChangeKind::Delete, vec![]),
            };
            b.changes.push(Change {
                details,
                steps,
                ..Change::new(
                    kind,
                    "vm",
                    name,
                    desired.tenants.get(*name).map_or("", String::as_str),
                    node,
                )
            });
        }
    }

    // Volumes. Data is destroyed only when its volume left the spec; a volume
    // the spec still names is never deleted or made again: it grows in place, and
    // a shrink, a restripe or a change of its primary is refused.
    let mut observed_primaries: BTreeMap<&str, (&str, &crate::observe::ObservedVolume)> =
        BTreeMap::new();
    for (node, obs) in &observed.nodes {
        if let NodeObservation::Reachable { volumes, .. } = obs {
            for v in volumes.values().filter(|v| v.role != VolumeRole::Replica) {
                observed_primaries.insert(v.name.as_str(), (node.as_str(), v));
            }
        }
    }
    let mut volume_steps: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (name, (node, o)) in &observed_primaries {
        if desired.spec_volumes.contains_key(*name) {
            continue;
        }
        if desired.protected_volumes.contains(*name) {
            refused.push(Refused {
                object: "volume".into(),
                name: (*name).to_owned(),
                node: (*node).to_owned(),
                reason: "no spec names it any more, but it is protected by `prevent-destroy` in the specs last applied; to delete it, first apply specs that keep the disk with `prevent-destroy=#false`, then remove the disk".to_owned(),
            });
            continue;
        }
        let delete = b.step(
            node,
            NodeAction::DeleteVolume {
                name: (*name).to_owned(),
            },
            all_vm_deletes.clone(),
        );
        b.changes.push(Change {
            steps: vec![delete],
            details: vec![format!(
                "DATA LOSS: its {} of data{} are deleted; no spec names it any more",
                compiler::units::human_size(o.size_bytes),
                if o.replica_peers.is_empty() {
                    String::new()
                } else {
                    format!(" and its copies on {}", o.replica_peers.join(", "))
                }
            )],
            data_loss: true,
            ..Change::new(ChangeKind::Delete, "volume", name, "", node)
        });
    }
    for v in desired.volumes.values() {
        let observed_copy = observed_primaries.get(v.name.as_str());
        let in_sync =
            observed_copy.is_some_and(|(n, o)| *n == v.node && drift::volume_in_sync(v, o));
        if in_sync {
            continue;
        }
        // A volume that needs work is left alone while any node holding one of
        // its copies does not answer (creating it needs every replica).
        let nodes: Vec<&String> = std::iter::once(&v.node).chain(&v.replicas).collect();
        if let Some(down) = nodes.iter().find(|n| !reachable(n)) {
            left_alone.push(LeftAlone {
                object: "volume".into(),
                name: v.name.clone(),
                node: (*down).clone(),
                reason: String::new(),
            });
            continue;
        }
        match observed_copy {
            None => {
                let s = b.create_volume(v, vec![]);
                volume_steps.insert(v.name.clone(), vec![s]);
                b.changes.push(Change {
                    details: volume_details(v),
                    steps: vec![s],
                    ..Change::new(ChangeKind::Create, "volume", &v.name, &v.tenant, &v.node)
                });
            }
            Some((node, o)) if *node == v.node => {
                let human = compiler::units::human_size;
                if o.stripe_width != v.stripe_width || o.stripe_unit_bytes != v.stripe_unit_bytes {
                    refused.push(Refused {
                        object: "volume".into(),
                        name: v.name.clone(),
                        node: (*node).to_owned(),
                        reason: format!(
                            "its pool now stripes {} × {} but it holds data striped {} × {}; restriping in place is not supported and would lose the data. Keep the pool's striping, or remove the disk from the spec to delete it",
                            v.stripe_width,
                            human(v.stripe_unit_bytes),
                            o.stripe_width,
                            human(o.stripe_unit_bytes)
                        ),
                    });
                    continue;
                }
                if v.size_bytes < o.size_bytes {
                    refused.push(Refused {
                        object: "volume".into(),
                        name: v.name.clone(),
                        node: (*node).to_owned(),
                        reason: format!(
                            "shrinking it from {} to {} would lose data. Set its size back to {} or more, or remove the disk from the spec to delete it",
                            human(o.size_bytes),
                            human(v.size_bytes),
                            human(o.size_bytes)
                        ),
                    });
                    continue;
                }
                let grow = b.step(
                    node,
                    NodeAction::ResizeVolume {
                        name: v.name.clone(),
                        size_bytes: v.size_bytes,
                    },
                    vec![],
                );
                volume_steps.insert(v.name.clone(), vec![grow]);
                b.changes.push(Change {
                    details: vec![format!(
                        "size {} → {}, grown in place (the data is kept)",
                        human(o.size_bytes),
                        human(v.size_bytes)
                    )],
                    steps: vec![grow],
                    ..Change::new(ChangeKind::Update, "volume", &v.name, &v.tenant, &v.node)
                });
            }
            Some((node, _)) => {
                // The placement keeps a volume's primary where its data is, so this
                // is reached only when that node left the spec or the state store
                // was lost; a change of writer is never a recreation.
                refused.push(Refused {
                    object: "volume".into(),
                    name: v.name.clone(),
                    node: (*node).to_owned(),
                    reason: format!(
                        "its data is on {node} but the placement wants its primary on {}; moving a volume's writer is not supported yet, and recreating it would lose the data. Keep node {node} in the spec",
                        v.node
                    ),
                });
            }
        }
    }

    // VMs.
    for vm in desired.vms.values() {
        // Left alone with its node, or with a volume that is left alone.
        let down = if reachable(&vm.node) {
            left_alone
                .iter()
                .find(|l| l.object == "volume" && vm.volumes.contains(&l.name))
                .map(|l| l.node.clone())
        } else {
            Some(vm.node.clone())
        };
        if let Some(node) = down {
            left_alone.push(LeftAlone {
                object: "vm".into(),
                name: vm.name.clone(),
                node,
                reason: String::new(),
            });
            continue;
        }
        let copies = observed_vms
            .get(vm.name.as_str())
            .cloned()
            .unwrap_or_default();
        let here = copies.iter().find(|(n, _)| *n == vm.node).map(|(_, o)| *o);
        let elsewhere = copies.iter().find(|(n, _)| *n != vm.node);
        let mut deps: Vec<usize> = vm
            .volumes
            .iter()
            .filter_map(|v| volume_steps.get(v))
            .flatten()
            .copied()
            .collect();
        deps.extend(deleted_vm_steps.get(&vm.node).into_iter().flatten());
        match (here, elsewhere) {
            (None, None) => {
                let steps = b.create_vm(vm, deps);
                b.changes.push(Change {
                    details: vm_details(vm),
                    steps,
                    ..Change::new(ChangeKind::Create, "vm", &vm.name, &vm.tenant, &vm.node)
                });
            }
            (None, Some((old, o))) => {
                let running = o.is_running();
                let (mut steps, delete) = b.remove_vm(old, &vm.name, running);
                deps.push(delete);
                steps.extend(b.create_vm(vm, deps));
                b.changes.push(Change {
                    was_node: Some((*old).to_owned()),
                    details: vec!["cold move: stopped there, started here".into()],
                    steps,
                    ..Change::new(ChangeKind::Move, "vm", &vm.name, &vm.tenant, &vm.node)
                });
            }
            (Some(o), _) => {
                let diffs = drift::vm_definition(vm, o);
                let broken_nics = drift::nic_repairs(o, observed.can_network(&vm.node));
                let will_start = o.is_down();
                if diffs.is_empty() && !broken_nics.is_empty() && !will_start {
                    // Same definition again: the node makes the missing parts.
                    let repair = b.step(&vm.node, vm_definition(vm), vec![]);
                    b.changes.push(Change {
                        details: broken_nics,
                        steps: vec![repair],
                        ..Change::new(ChangeKind::Update, "vm", &vm.name, &vm.tenant, &vm.node)
                    });
                    continue;
                }
                if !diffs.is_empty() {
                    let running = o.is_running();
                    let (mut steps, delete) = b.remove_vm(&vm.node, &vm.name, running);
                    deps.push(delete);
                    steps.extend(b.create_vm(vm, deps));
                    b.changes.push(Change {
                        details: diffs,
                        steps,
                        ..Change::new(ChangeKind::Replace, "vm", &vm.name, &vm.tenant, &vm.node)
                    });
                } else if o.is_down() {
                    let start = b.step(
                        &vm.node,
                        NodeAction::StartVm {
                            name: vm.name.clone(),
                        },
                        vec![],
                    );
                    let detail = if o.state == VmState::Crashed && o.crash_count == 0 {
                        "not running (its process ended with its node); start it again".to_owned()
                    } else if o.state == VmState::Crashed {
                        format!(
                            "crashed ({} unrequested exits); start it again",
                            o.crash_count
                        )
                    } else {
                        "stopped; start it".to_owned()
                    };
                    b.changes.push(Change {
                        details: vec![detail],
                        steps: vec![start],
                        ..Change::new(ChangeKind::Start, "vm", &vm.name, &vm.tenant, &vm.node)
                    });
                }
            }
        }
    }

    let mut summary = Summary::default();
    for c in &b.changes {
        match c.kind {
            ChangeKind::Create => summary.add += 1,
            ChangeKind::Update | ChangeKind::Start | ChangeKind::Stop => summary.change += 1,
            ChangeKind::Replace => {
                summary.add += 1;
                summary.destroy += 1;
            }
            ChangeKind::Delete | ChangeKind::Preempt => summary.destroy += 1,
            ChangeKind::Move => summary.moves += 1,
        }
    }
    let mut changes = b.changes;
    // Site infrastructure (bonds) first, by site; then by tenant.
    changes.sort_by(|a, c| {
        (
            a.site.is_none(),
            a.site.as_deref().unwrap_or(""),
            a.tenant.as_str(),
            a.object.as_str(),
            a.name.as_str(),
            a.node.as_str(),
            a.kind,
        )
            .cmp(&(
                c.site.is_none(),
                c.site.as_deref().unwrap_or(""),
                c.tenant.as_str(),
                c.object.as_str(),
                c.name.as_str(),
                c.node.as_str(),
                c.kind,
            ))
    });
    let steps = b.steps;
    let waves = steps.iter().map(|s| s.wave + 1).max().unwrap_or(0);
    let observed_digest = observed.digest();
    let mut hasher = Sha256::new();
    hasher.update(revision.as_bytes());
    hasher.update(observed_digest.as_bytes());
    hasher.update(serde_json::to_vec(&steps).expect("steps serialize"));
    // The plan id names the plan (for display and signing); request ids are
    // per execution (`state::request_id`), so the same plan carried out twice
    // sends new requests.
    let plan_id = proto::auth::to_hex(&hasher.finalize()[..8]);
    let unreachable = observed
        .nodes
        .iter()
        .filter_map(|(n, o)| match o {
            NodeObservation::Unreachable { error } => Some((n.clone(), error.clone())),
            NodeObservation::Reachable { .. } => None,
        })
        .collect();
    let unplaced = desired.placement.unplaced.clone();
    let spot_unplaced = unplaced
        .keys()
        .filter(|vm| desired.spot_vms.contains(*vm))
        .cloned()
        .collect();
    Plan {
        format_version: PLAN_FORMAT_VERSION,
        plan_id,
        revision: revision.to_owned(),
        observed_digest,
        summary,
        changes,
        steps,
        waves,
        unreachable,
        left_alone,
        unplaced,
        spot_unplaced,
        refused,
        protected: desired
            .protected_volumes
            .iter()
            .filter(|v| desired.spec_volumes.contains_key(*v))
            .cloned()
            .collect(),
        placement: desired.placement.clone(),
    }
}
