//! The desired state: what should run on which node, from the compiled model and
//! the placement.
//!
//! [`place`] is the one function that decides VM → node: it runs the compiler's
//! placement solver from the previous placement and adds where each volume's
//! primary and replicas go on the node runtimes.

use std::collections::BTreeMap;

use compiler::Model;
use serde::{Deserialize, Serialize};

/// Where every VM and volume goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Placement {
    /// VM name → node name.
    pub vms: BTreeMap<String, String>,
    /// Volume name → its primary node and replica nodes.
    pub volumes: BTreeMap<String, VolumePlacement>,
    /// VMs that could not be placed, with the reason.
    pub unplaced: BTreeMap<String, String>,
    /// VMs pushed out by higher-priority VMs: victim → why.
    pub preempted: BTreeMap<String, String>,
}

/// Where one volume's copies are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VolumePlacement {
    /// Primary node.
    pub node: String,
    /// Replica nodes.
    pub replicas: Vec<String>,
}

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
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// Nodes by name.
    pub nodes: BTreeMap<String, DesiredNode>,
    /// Bonds by node, then bond name.
    pub bonds: BTreeMap<String, BTreeMap<String, DesiredBond>>,
    /// VMs by name (placed ones only).
    pub vms: BTreeMap<String, DesiredVm>,
    /// Volumes by name.
    pub volumes: BTreeMap<String, DesiredVolume>,
    /// The placement they came from.
    pub placement: Placement,
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
}

/// The name of a VM disk's volume.
pub fn volume_name(vm: &str, disk: &str) -> String {
    format!("{vm}-{disk}")
}

/// Places every VM and volume of the model, starting from `previous`.
///
/// VMs go where the compiler's placement solver (`compiler::place`) puts them,
/// with the previous placement as its starting point (stability, preemption and
/// explanations are the solver's). Volumes: the primary copy is on the VM's node
/// (a node's volume engine serves the VM locally) and stays where it was (data
/// does not move); replicas go to the other nodes the solver chose for the
/// volume's stripe copies, else to the nodes of the site with the fewest copies.
pub fn place(model: &Model, previous: Option<&Placement>) -> Placement {
    place_solved(model, previous).0
}

/// [`place`], and the solver's own placement (its unplaced VMs carry the
/// reasons, constraint by constraint, that diagnostics print with spans).
pub fn place_solved(
    model: &Model,
    previous: Option<&Placement>,
) -> (Placement, compiler::place::Placement) {
    let mut placement = Placement::default();
    let empty = Placement::default();
    let previous = previous.unwrap_or(&empty);
    let solver_previous = compiler::place::Placement {
        format_version: compiler::place::FORMAT_VERSION,
        vms: previous
            .vms
            .iter()
            .filter_map(|(name, node)| {
                let vm = model.vm(name)?;
                Some(compiler::place::VmPlacement {
                    name: name.clone(),
                    tenant: vm.tenant.clone(),
                    site: vm.site.clone(),
                    node: node.clone(),
                    secondary: None,
                })
            })
            .collect(),
        unplaced: vec![],
        volumes: vec![],
        nodes: vec![],
        moves: vec![],
    };
    let solved = compiler::place::place(
        model,
        &compiler::place::PlaceOptions {
            previous: Some(solver_previous),
            failed_nodes: Default::default(),
        },
        None,
    );
    for vm in &solved.vms {
        placement.vms.insert(vm.name.clone(), vm.node.clone());
    }
    for u in &solved.unplaced {
        let reasons: Vec<String> = u.reasons.iter().map(|r| r.message.clone()).collect();
        if u.reasons.iter().any(|r| r.constraint == "preempted") {
            placement
                .preempted
                .insert(u.name.clone(), reasons.join("; "));
        }
        placement
            .unplaced
            .insert(u.name.clone(), reasons.join("; "));
    }
    // Nodes the solver put each volume's stripe copies on, in column order.
    let mut solver_nodes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for v in &solved.volumes {
        let nodes = solver_nodes.entry(v.name.replace('/', "-")).or_default();
        for copy in v.columns.iter().flatten() {
            let node = copy.split('/').next().unwrap_or(copy).to_owned();
            if !nodes.contains(&node) {
                nodes.push(node);
            }
        }
    }
    let site_of: BTreeMap<&str, &str> = model
        .sites
        .iter()
        .flat_map(|s| {
            s.nodes
                .iter()
                .map(move |n| (n.name.as_str(), s.name.as_str()))
        })
        .collect();
    // Volumes: primary on the VM's node (kept where it was: data does not move),
    // replicas where the solver put stripe copies, then on the other nodes of the
    // site with the fewest copies, by name.
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for vm in &model.vms {
        let Some(node) = placement.vms.get(&vm.name) else {
            continue;
        };
        let site = model.site(&vm.site);
        for disk in &vm.disks {
            let name = volume_name(&vm.name, &disk.name);
            let n_replicas = site
                .and_then(|s| s.pools.iter().find(|p| p.name == disk.pool))
                .map(|p| p.replicas.saturating_sub(1) as usize)
                .unwrap_or(0);
            // The primary is where the data is: a volume that exists keeps its
            // primary and the replicas it has (a replica count change adds or
            // drops copies; it never moves the data to a new primary).
            let previous_copy = previous
                .volumes
                .get(&name)
                .filter(|prev| site_of.contains_key(prev.node.as_str()));
            let primary = previous_copy.map_or(node, |prev| &prev.node).clone();
            let mut replicas: Vec<String> = previous_copy
                .map(|prev| {
                    prev.replicas
                        .iter()
                        .filter(|r| site_of.contains_key(r.as_str()) && **r != primary)
                        .take(n_replicas)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            for candidate in solver_nodes.get(&name).into_iter().flatten() {
                if replicas.len() >= n_replicas {
                    break;
                }
                if *candidate != primary && !replicas.contains(candidate) {
                    replicas.push(candidate.clone());
                }
            }
            // Fallback only when the solver named too few nodes: the site's
            // other nodes with the fewest copies (O(nodes) per volume).
            if replicas.len() < n_replicas {
                let mut others: Vec<(usize, &str)> = site_of
                    .iter()
                    .filter(|(n, s)| **s == vm.site && **n != primary)
                    .filter(|(n, _)| !replicas.iter().any(|r| r == *n))
                    .map(|(n, _)| (copies.get(*n).copied().unwrap_or(0), *n))
                    .collect();
                others.sort_unstable();
                let missing = n_replicas - replicas.len();
                replicas.extend(others.into_iter().take(missing).map(|(_, n)| n.to_owned()));
            }
            let placed = VolumePlacement {
                node: primary,
                replicas,
            };
            for n in std::iter::once(&placed.node).chain(&placed.replicas) {
                *copies.entry(n.clone()).or_default() += 1;
            }
            placement.volumes.insert(name, placed);
        }
    }
    (placement, solved)
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
    for site in &model.sites {
        for node in &site.nodes {
            desired.nodes.insert(
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
        let Some(node) = placement.vms.get(&vm.name) else {
            continue;
        };
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
        for disk in &vm.disks {
            let name = volume_name(&vm.name, &disk.name);
            let Some(vp) = placement.volumes.get(&name) else {
                continue;
            };
            let pool = site.and_then(|s| s.pools.iter().find(|p| p.name == disk.pool));
            desired.volumes.insert(
                name.clone(),
                DesiredVolume {
                    name: name.clone(),
                    vm: vm.name.clone(),
                    tenant: vm.tenant.clone(),
                    node: vp.node.clone(),
                    replicas: vp.replicas.clone(),
                    size_bytes: disk.size_bytes.div_ceil(4096) * 4096,
                    stripe_width: pool.map(|p| p.stripe_width).unwrap_or(1),
                    stripe_unit_bytes: pool.map(|p| p.stripe_unit_bytes).unwrap_or(1 << 20),
                },
            );
            volumes.push(name);
        }
        desired.vms.insert(
            vm.name.clone(),
            DesiredVm {
                name: vm.name.clone(),
                tenant: vm.tenant.clone(),
                node: node.clone(),
                vcpus: vm.cpu,
                memory_bytes: vm.memory_bytes,
                image,
                volumes,
                nics: vm.nics.iter().map(|n| n.network.clone()).collect(),
            },
        );
    }
    desired.placement = placement;
    desired
}
