//! The desired state: what should run on which node, from the compiled model and
//! the placement.
//!
//! [`place`] is the one function that decides VM → node and where each volume's
//! copies go: the compiler's placement solver (`compiler::place`), from the
//! previous placement. There is one placement type, the compiler's.

use std::collections::BTreeMap;

pub mod failover;

use compiler::Model;
use serde::{Deserialize, Serialize};

/// Where every VM and volume goes: the compiler's placement, stored as it is
/// (VM → node and FT secondary; volume → stripe columns, primary and replicas).
pub use compiler::place::Placement;

/// A node of the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredNode {
    /// Name.
    pub name: String,
    /// Site.
    pub site: String,
    /// `host:port` of its cairn-node.
    pub address: String,
}

/// The image a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootImage {
    /// Built into the VMM.
    Builtin(String),
    /// A kernel (absolute paths).
    Kernel {
        /// Kernel path.
        kernel: String,
        /// Initrd path.
        initrd: String,
        /// Command line.
        cmdline: String,
    },
}

/// A VM as it should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredVm {
    /// Name.
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// Node.
    pub node: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_bytes: u64,
    /// Image.
    pub image: BootImage,
    /// Its volumes (names).
    pub volumes: Vec<String>,
    /// Its NICs' tenant networks, in order.
    pub nics: Vec<String>,
    /// Its SLA class ("reserved", "spot"; empty: on-demand), enforced by the node's
    /// cgroups.
    #[serde(default)]
    pub sla: String,
    /// A spot VM's SLA priority (spot VMs are preempted lowest first); 0 otherwise.
    #[serde(default)]
    pub priority: u32,
    /// Its SLA profile's `cpu-pinning=#true`: the node gives it dedicated CPUs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dedicated_cpus: bool,
    /// `power "off"`: defined on its node but not running (a running one is
    /// stopped; removing it starts the VM again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub power_off: bool,
    /// `availability "ft"` with a placed secondary: the pair (issue 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<DesiredFt>,
}

/// An FT VM's pair: the secondary's node and what both sides are told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredFt {
    /// The secondary's node (another failure domain than `DesiredVm::node`).
    pub secondary: String,
    /// The site's witness `HOST:PORT` (the preferred one; empty: none, the
    /// commander alone decides).
    pub witness: String,
    /// Checkpoint epoch (ms; 0: the node's default, 30).
    pub epoch_ms: u32,
}

/// A volume as it should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredVolume {
    /// Name (`VM-DISK`).
    pub name: String,
    /// VM it belongs to.
    pub vm: String,
    /// Tenant.
    pub tenant: String,
    /// Primary node.
    pub node: String,
    /// Replica nodes.
    pub replicas: Vec<String>,
    /// Size.
    pub size_bytes: u64,
    /// Stripe columns.
    pub stripe_width: u32,
    /// Stripe unit.
    pub stripe_unit_bytes: u64,
    /// A `from-image=#true` disk of an image with a disk file: the base volume it is
    /// cloned from (`crate::images`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_image: Option<crate::images::ImageBase>,
}

/// A QoS traffic class of a bond.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DesiredTraffic {
    /// `storage`, `migration`, `guest`, `management`, `replication`.
    pub name: String,
    /// Guaranteed rate (bit/s).
    pub min_bps: u64,
    /// Ceiling (bit/s).
    pub max_bps: u64,
    /// Share of the excess.
    pub weight: u32,
}

/// A bond of a node's site, as that node should have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredBond {
    /// Name (the Linux device name).
    pub name: String,
    /// Node.
    pub node: String,
    /// Site.
    pub site: String,
    /// `active-backup`, `balance-rr`, `balance-xor`, `802.3ad`.
    pub mode: String,
    /// Member NICs.
    pub members: Vec<String>,
    /// MTU.
    pub mtu: u32,
    /// Link-monitoring interval (ms).
    pub miimon_ms: u32,
    /// Capacity on this node (bit/s): its members' speeds from the spec, one
    /// member's for active-backup, the sum otherwise.
    pub capacity_bps: u64,
    /// Traffic classes, in spec order.
    pub traffic: Vec<DesiredTraffic>,
}

/// Everything desired.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Nodes by name (shared: a plan of a part carries every node).
    pub nodes: std::sync::Arc<BTreeMap<String, DesiredNode>>,
    /// Bonds by node, then bond name.
    pub bonds: BTreeMap<String, BTreeMap<String, DesiredBond>>,
    /// Tenant network segments by node, then `tenant/network` (issue 19). Shared
    /// with the plan's steps that apply them (one `Arc` each, not a copy per step).
    pub segments:
        BTreeMap<String, BTreeMap<String, std::sync::Arc<crate::segments::DesiredSegment>>>,
    /// VMs by name (placed ones only).
    pub vms: BTreeMap<String, DesiredVm>,
    /// Volumes by name.
    pub volumes: BTreeMap<String, DesiredVolume>,
    /// The placement they came from (shared with the plan made from it).
    pub placement: std::sync::Arc<Placement>,
    /// VMs without a node: name → why.
    pub unplaced: BTreeMap<String, String>,
    /// VMs pushed out by higher-priority VMs: name → why.
    pub preempted: BTreeMap<String, String>,
    /// VM → tenant for every VM of the model (placed or not).
    pub tenants: BTreeMap<String, String>,
    /// Every volume the model names (its VM placed or not) → its VM. A volume in
    /// this map is never deleted by a plan: only leaving the spec deletes data.
    pub spec_volumes: BTreeMap<String, String>,
    /// VMs of the spot class (unplaced, they wait for room by design).
    pub spot_vms: std::collections::BTreeSet<String>,
    /// Volumes no plan may delete: `prevent-destroy` in these specs or in the last
    /// applied ones (so removing the disk and its protection in one change is
    /// still refused).
    pub protected_volumes: std::collections::BTreeSet<String>,
    /// Volumes whose writer (at the epoch authority's current epoch) is not the node
    /// of their layout's primary: volume → writer. A VM on the writer's node attaches
    /// the volume there, and its layout's primary being down does not hold the VM.
    pub moved_writers: BTreeMap<String, String>,
    /// Snapshot schedules by VM (`protections`).
    pub protections: BTreeMap<String, DesiredProtection>,
    /// Delta replications to another site, by source volume (`replicate to-site=`).
    pub replications: BTreeMap<String, DesiredReplication>,
    /// `image-NAME` of every image with a disk file: base volumes of these images are
    /// kept (`crate::images::base_image`).
    pub image_bases: std::collections::BTreeSet<String>,
    /// VMs of a failed-over site (`failover`) → that site: they run at the DR
    /// site from their DR copies, and a copy left at the lost site is only deleted.
    pub failed_over: BTreeMap<String, String>,
}

/// A VM's snapshot schedule (its protection plan's `snapshot every=… keep=…`), held by
/// the writer of the VM's volumes (`Apply.SetProtection`, issue 18).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredProtection {
    /// The plan it comes from.
    pub plan: String,
    /// The VM's volumes (all its disks, in spec order).
    pub volumes: Vec<String>,
    /// Interval (ms).
    pub every_ms: u64,
    /// Scheduled snapshots kept per volume.
    pub keep: u32,
}

/// A protected disk's delta replication to its DR copy at another site (the
/// protection plan's `replicate to-site= pool= every= keep=`, issue 18): the source
/// volume's writer ships its snapshots (`Apply.ReplicateVolume`), the DR copy's
/// writer accepts them from that node only (`Apply.AcceptReplication`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredReplication {
    /// The protected VM.
    pub vm: String,
    /// The plan it comes from.
    pub plan: String,
    /// The source volume (`VM-DISK`).
    pub volume: String,
    /// The target site and its pool.
    pub site: String,
    /// Pool at the target site.
    pub pool: String,
    /// The DR copy (`VM-DISK-dr-SITE`), a volume of `desired.volumes`.
    pub target_volume: String,
    /// Interval (ms).
    pub every_ms: u64,
    /// Snapshots the DR copy keeps.
    pub keep: u32,
}

/// The first `replicate` of `vm`'s plans (in spec order) that names `site`, with
/// its plan.
fn replication_to<'m>(
    model: &'m Model,
    vm: &compiler::model::Vm,
    site: &str,
) -> Option<(
    &'m compiler::model::ProtectionPlan,
    &'m compiler::model::Replication,
)> {
    model
        .protection_plans
        .iter()
        .filter(|p| vm.protection_plans.contains(&p.name))
        .flat_map(|p| p.replicate.iter().map(move |r| (p, r)))
        .find(|(_, r)| r.to_site == site)
}

/// The DR copies of the placement as desired volumes, and the replications into
/// them from the VMs' placed volumes. A DR copy is wanted whether its VM is placed
/// or not (it outlives the VM's site); its replication only while the source volume
/// is placed.
fn dr_copies(model: &Model, placement: &Placement, desired: &mut Desired) {
    for dr in &placement.dr_volumes {
        let Some((stand_in, disk)) = dr.name.split_once('/') else {
            continue;
        };
        let Some((_, site)) = stand_in.split_once(".dr.") else {
            continue;
        };
        let Some(vm) = model.vms.iter().find(|v| v.name == dr.vm) else {
            continue;
        };
        let target = compiler::place::dr_volume_name(&vm.name, site, disk);
        desired.spec_volumes.insert(target.clone(), vm.name.clone());
        if dr.primary.is_empty() {
            continue;
        }
        let pool = model
            .site(site)
            .and_then(|s| s.pools.iter().find(|p| p.name == dr.pool));
        desired.volumes.insert(
            target.clone(),
            DesiredVolume {
                name: target.clone(),
                vm: vm.name.clone(),
                tenant: vm.tenant.clone(),
                node: dr.primary.clone(),
                replicas: dr.replicas.clone(),
                size_bytes: dr.size_bytes,
                stripe_width: pool.map(|p| p.stripe_width).unwrap_or(1),
                stripe_unit_bytes: pool.map(|p| p.stripe_unit_bytes).unwrap_or(1 << 20),
                from_image: None,
            },
        );
        let source = volume_name(&vm.name, disk);
        let (Some((plan, r)), true) = (
            replication_to(model, vm, site),
            desired.volumes.contains_key(&source),
        ) else {
            continue;
        };
        desired.replications.insert(
            source.clone(),
            DesiredReplication {
                vm: vm.name.clone(),
                plan: plan.name.clone(),
                volume: source,
                site: site.to_owned(),
                pool: r.pool.clone(),
                target_volume: target,
                every_ms: r.every_ms,
                keep: r.keep,
            },
        );
    }
    failover::apply(placement, desired);
}

/// The snapshot schedule of a placed VM with disks (`volumes`) when a protection plan
/// with a `snapshot` schedule applies to it. Of several such plans the one with the
/// shortest interval wins (it protects at least as well as the others), the larger
/// `keep` on a tie.
fn protection_of(
    model: &Model,
    vm: &compiler::model::Vm,
    volumes: &[String],
) -> Option<DesiredProtection> {
    if volumes.is_empty() {
        return None;
    }
    let schedule = model
        .protection_plans
        .iter()
        .filter(|p| vm.protection_plans.contains(&p.name))
        .filter_map(|p| p.snapshot.as_ref().map(|s| (p, s)))
        .filter(|(_, s)| s.every_ms > 0 && s.keep > 0)
        .min_by_key(|(p, s)| (s.every_ms, std::cmp::Reverse(s.keep), p.name.clone()))
        .map(|(p, s)| (p, s.every_ms, s.keep))
        // Replication ships snapshots: a plan that replicates without a `snapshot`
        // schedule snapshots at its replication's interval and keeps as many.
        .or_else(|| {
            model
                .protection_plans
                .iter()
                .filter(|p| vm.protection_plans.contains(&p.name))
                .flat_map(|p| p.replicate.iter().map(move |r| (p, r)))
                .filter(|(_, r)| r.every_ms > 0 && r.keep > 0 && r.to_site != vm.site)
                .min_by_key(|(p, r)| (r.every_ms, std::cmp::Reverse(r.keep), p.name.clone()))
                .map(|(p, r)| (p, r.every_ms, r.keep))
        });
    let (plan, every_ms, keep) = schedule?;
    Some(DesiredProtection {
        plan: plan.name.clone(),
        volumes: volumes.to_vec(),
        every_ms,
        keep,
    })
}

/// The name of a VM disk's volume.
pub fn volume_name(vm: &str, disk: &str) -> String {
    format!("{vm}-{disk}")
}

/// Places every VM and volume of the model, starting from `previous` (the
/// compiler's solver: stability, preemption, explanations, and each volume's
/// primary and replicas are its decisions).
pub fn place(model: &Model, previous: Option<&Placement>) -> Placement {
    compiler::place::place(
        model,
        &compiler::place::PlaceOptions {
            previous: previous.cloned(),
            failed: Default::default(),
        },
        None,
    )
}

/// An FT VM's pair from its placement: `None` unless its availability is `ft` and
/// the placement gave it a secondary.
fn ft_pair(
    vm: &compiler::model::Vm,
    placement: &Placement,
    site: Option<&compiler::model::Site>,
) -> Option<DesiredFt> {
    if vm.availability != compiler::model::Availability::Ft {
        return None;
    }
    // The placement's VMs are sorted by name: a scan per FT VM was quadratic.
    let secondary = placement.vm(&vm.name)?.secondary.clone()?;
    Some(DesiredFt {
        secondary,
        witness: site.and_then(|s| s.witness.clone()).unwrap_or_default(),
        epoch_ms: vm.ft_epoch_ms.unwrap_or(0),
    })
}

/// The placement when `failed` nodes are gone (HA, issue 16): only HA and FT VMs that
/// ran on a failed node and have no disk are placed again elsewhere; nothing else
/// moves. A VM with availability `none` stays down where it was (reported, left
/// alone). A VM with disks moves only once every disk's volume has a writer on a
/// live node (`disk_writers`: the epoch authority promoted an in-sync copy), and it
/// goes to its first disk's writer, where its data is; until then it stays (a volume
/// is never made again empty elsewhere). Every volume keeps its previous layout.
pub fn place_without(
    model: &Model,
    previous: &Placement,
    failed: &std::collections::BTreeSet<String>,
    disk_writers: &BTreeMap<String, String>,
) -> Placement {
    let mut placement = compiler::place::place(
        model,
        &compiler::place::PlaceOptions {
            previous: Some(previous.clone()),
            failed: compiler::place::FailureSet {
                nodes: failed.clone(),
                ..Default::default()
            },
        },
        None,
    );
    let before: BTreeMap<&str, &compiler::place::VmPlacement> =
        previous.vms.iter().map(|v| (v.name.as_str(), v)).collect();
    // Where a VM with disks can run now: its first disk's writer, when every disk
    // has a writer on a live node.
    let disk_node = |m: &compiler::model::Vm| -> Option<String> {
        let writers: Vec<&String> = m
            .disks
            .iter()
            .map(|d| disk_writers.get(&volume_name(&m.name, &d.name)))
            .collect::<Option<Vec<_>>>()?;
        if writers.iter().any(|w| failed.contains(*w)) {
            return None;
        }
        writers.first().map(|w| (*w).clone())
    };
    let stays = |vm: &str| -> bool {
        model.vms.iter().find(|m| m.name == vm).is_none_or(|m| {
            m.availability == compiler::model::Availability::None
                || (!m.disks.is_empty() && disk_node(m).is_none())
        })
    };
    let mut kept = Vec::new();
    for vm in &mut placement.vms {
        let Some(was) = before.get(vm.name.as_str()) else {
            continue;
        };
        if !failed.contains(&was.node) {
            continue;
        }
        if stays(&vm.name) {
            *vm = (*was).clone();
            kept.push(vm.name.clone());
        } else if let Some(node) = model
            .vms
            .iter()
            .find(|m| m.name == vm.name && !m.disks.is_empty())
            .and_then(|m| disk_node(m))
        {
            // Its data is on its writer's node: it runs there.
            vm.node = node.clone();
            placement.unplaced.retain(|u| u.name != vm.name);
            match placement.moves.iter_mut().find(|m| m.vm == vm.name) {
                Some(m) => m.to = node,
                None => placement.moves.push(compiler::place::Move {
                    vm: vm.name.clone(),
                    from: was.node.clone(),
                    to: node,
                    reason: "its node failed; its disks' new writer is here".to_owned(),
                }),
            }
        }
    }
    // A VM with disks the placement could not fit goes to its writer all the same
    // (`ha-reserve` admission kept the room).
    for was in previous.vms.iter().filter(|v| failed.contains(&v.node)) {
        if placement.vms.iter().any(|v| v.name == was.name) {
            continue;
        }
        let Some(node) = model
            .vms
            .iter()
            .find(|m| {
                m.name == was.name
                    && !m.disks.is_empty()
                    && m.availability != compiler::model::Availability::None
            })
            .and_then(|m| disk_node(m))
        else {
            continue;
        };
        placement.unplaced.retain(|u| u.name != was.name);
        placement.vms.push(compiler::place::VmPlacement {
            node: node.clone(),
            ..was.clone()
        });
        placement.moves.push(compiler::place::Move {
            vm: was.name.clone(),
            from: was.node.clone(),
            to: node,
            reason: "its node failed; its disks' new writer is here".to_owned(),
        });
    }
    // A VM left where it was is placed after all (it was not placed elsewhere).
    for name in &kept {
        placement.unplaced.retain(|u| &u.name != name);
        if !placement.vms.iter().any(|v| &v.name == name)
            && let Some(was) = before.get(name.as_str())
        {
            placement.vms.push((*was).clone());
        }
    }
    placement.moves.retain(|m| !kept.contains(&m.vm));
    let volumes_before: BTreeMap<&str, &compiler::place::VolumePlacement> = previous
        .volumes
        .iter()
        .map(|v| (v.name.as_str(), v))
        .collect();
    for volume in &mut placement.volumes {
        if let Some(was) = volumes_before.get(volume.name.as_str()) {
            *volume = (*was).clone();
        }
    }
    placement
}

/// A site's bond as `node` should have it: the capacity is this node's (its member
/// NICs' speeds in the spec), not the site's slowest.
fn desired_bond(
    site: &compiler::model::Site,
    node: &compiler::model::Node,
    bond: &compiler::model::Bond,
) -> DesiredBond {
    let speeds: Vec<u64> = bond
        .members
        .iter()
        .filter_map(|m| node.nics.iter().find(|n| n.name == *m).map(|n| n.speed_bps))
        .collect();
    let capacity_bps = match bond.mode {
        _ if speeds.is_empty() => bond.capacity_bps,
        compiler::spec::BondMode::ActiveBackup => speeds.iter().copied().min().unwrap_or(0),
        _ => speeds.iter().sum(),
    };
    DesiredBond {
        name: bond.name.clone(),
        node: node.name.clone(),
        site: site.name.clone(),
        mode: bond.mode.as_str().to_owned(),
        members: bond.members.clone(),
        mtu: bond.mtu,
        miimon_ms: bond.miimon_ms,
        capacity_bps,
        traffic: bond
            .traffic
            .iter()
            .map(|t| DesiredTraffic {
                name: t.name.as_str().to_owned(),
                min_bps: t.min_bps,
                max_bps: t.max_bps,
                weight: t.weight,
            })
            .collect(),
    }
}

/// The desired state for a model and placement.
pub fn desired(model: &Model, spec_root: &std::path::Path, placement: Placement) -> Desired {
    let mut desired = Desired::default();
    let vm_nodes: BTreeMap<&str, &str> = placement
        .vms
        .iter()
        .map(|v| (v.name.as_str(), v.node.as_str()))
        .collect();
    let volumes_by_name: BTreeMap<String, &compiler::place::VolumePlacement> = placement
        .volumes
        .iter()
        .map(|v| (v.runtime_name(), v))
        .collect();
    for u in &placement.unplaced {
        desired.unplaced.insert(u.name.clone(), u.reason_text());
        if u.preempted() {
            desired.preempted.insert(u.name.clone(), u.reason_text());
        }
    }
    for site in &model.sites {
        for node in &site.nodes {
            std::sync::Arc::make_mut(&mut desired.nodes).insert(
                node.name.clone(),
                DesiredNode {
                    name: node.name.clone(),
                    site: site.name.clone(),
                    address: node.address.clone(),
                },
            );
            let bonds = site
                .bonds
                .iter()
                .map(|b| (b.name.clone(), desired_bond(site, node, b)))
                .collect();
            desired.bonds.insert(node.name.clone(), bonds);
        }
    }
    desired.image_bases = crate::images::kept_bases(model);
    for vm in &model.vms {
        desired.tenants.insert(vm.name.clone(), vm.tenant.clone());
        if vm.sla.class == compiler::model::SlaClass::Spot {
            desired.spot_vms.insert(vm.name.clone());
        }
        for disk in &vm.disks {
            let name = volume_name(&vm.name, &disk.name);
            if disk.prevent_destroy {
                desired.protected_volumes.insert(name.clone());
            }
            desired.spec_volumes.insert(name, vm.name.clone());
        }
        let Some(node) = vm_nodes.get(vm.name.as_str()) else {
            continue;
        };
        let entries = vm_entries(model, spec_root, &placement, vm, node, |disk| {
            volumes_by_name.get(&volume_name(&vm.name, disk)).copied()
        });
        entries.insert_into(&mut desired);
    }
    dr_copies(model, &placement, &mut desired);
    desired.segments = crate::segments::desired_segments(model, &desired.nodes, &placement);
    desired.placement = std::sync::Arc::new(placement);
    desired
}

/// One placed VM's entries of the desired state: the VM, its volumes and its
/// snapshot schedule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VmEntries {
    pub(crate) vm: DesiredVm,
    pub(crate) volumes: Vec<DesiredVolume>,
    pub(crate) protection: Option<DesiredProtection>,
}

impl VmEntries {
    pub(crate) fn insert_into(self, desired: &mut Desired) {
        for v in self.volumes {
            desired.volumes.insert(v.name.clone(), v);
        }
        match self.protection {
            Some(p) => {
                desired.protections.insert(self.vm.name.clone(), p);
            }
            None => {
                desired.protections.remove(&self.vm.name);
            }
        }
        desired.vms.insert(self.vm.name.clone(), self.vm);
    }
}

/// The entries of `vm`, placed on `node` (`volume_of`: its disk's placement, by
/// disk name).
pub(crate) fn vm_entries<'p>(
    model: &Model,
    spec_root: &std::path::Path,
    placement: &Placement,
    vm: &compiler::model::Vm,
    node: &str,
    volume_of: impl Fn(&str) -> Option<&'p compiler::place::VolumePlacement>,
) -> VmEntries {
    let image = model.images.iter().find(|i| i.name == vm.image);
    let absolute = |p: &Option<String>| {
        p.as_ref()
            .map(|p| spec_root.join(p).display().to_string())
            .unwrap_or_default()
    };
    let image = match image {
        Some(i) if i.builtin.is_none() && i.kernel.is_some() => BootImage::Kernel {
            kernel: absolute(&i.kernel),
            initrd: absolute(&i.initrd),
            cmdline: i.cmdline.clone().unwrap_or_default(),
        },
        Some(i) => BootImage::Builtin(
            i.builtin
                .clone()
                .unwrap_or_else(|| "cairn-guest".to_owned()),
        ),
        None => BootImage::Builtin("cairn-guest".to_owned()),
    };
    let site = model.site(&vm.site);
    let mut volumes = vec![];
    let mut entries = vec![];
    for disk in &vm.disks {
        let name = volume_name(&vm.name, &disk.name);
        let Some(vp) = volume_of(&disk.name) else {
            continue;
        };
        let pool = site.and_then(|s| s.pools.iter().find(|p| p.name == disk.pool));
        let from_image = disk
            .from_image
            .then(|| model.images.iter().find(|i| i.name == vm.image))
            .flatten()
            .and_then(|i| crate::images::desired_base(i, spec_root, vp));
        entries.push(DesiredVolume {
            name: name.clone(),
            vm: vm.name.clone(),
            tenant: vm.tenant.clone(),
            node: vp.primary.clone(),
            replicas: vp.replicas.clone(),
            size_bytes: disk.size_bytes,
            stripe_width: pool.map(|p| p.stripe_width).unwrap_or(1),
            stripe_unit_bytes: pool.map(|p| p.stripe_unit_bytes).unwrap_or(1 << 20),
            from_image,
        });
        volumes.push(name);
    }
    let protection = protection_of(model, vm, &volumes);
    VmEntries {
        vm: DesiredVm {
            name: vm.name.clone(),
            tenant: vm.tenant.clone(),
            node: node.to_owned(),
            vcpus: vm.cpu,
            memory_bytes: vm.memory_bytes,
            image,
            volumes,
            nics: vm.nics.iter().map(|n| n.network.clone()).collect(),
            // On-demand is what a node assumes when a definition names no class,
            // and only a spot VM's priority is used on the node (preemption order):
            // the plan carries neither otherwise.
            sla: if vm.sla.class == compiler::model::SlaClass::OnDemand {
                String::new()
            } else {
                vm.sla.class.to_string()
            },
            priority: if vm.sla.class == compiler::model::SlaClass::Spot {
                vm.sla.priority
            } else {
                0
            },
            power_off: vm.power == compiler::model::Power::Off,
            dedicated_cpus: vm.sla.cpu_pinning,
            ft: ft_pair(vm, placement, site),
        },
        volumes: entries,
        protection,
    }
}
