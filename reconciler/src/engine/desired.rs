//! The desired state: what should run on which node, from the compiled model and
//! the placement.
//!
//! [`place`] is the one function that decides VM → node. Until the compiler's
//! placement solver (`compiler::place`) lands, it is a small deterministic
//! spread placer here: it keeps every VM on its previous node when that node still
//! exists in the VM's site and has room (stability), and puts new VMs on the node
//! of their site with the most free memory (ties by fewest VMs of the same group,
//! then by name). When no node has room for a VM whose SLA priority is higher than
//! some placed VMs', the lowest-priority VMs on one node are preempted.
//! Switching to the real solver changes only [`place`].

use std::collections::BTreeMap;

use compiler::Model;
use serde::{Deserialize, Serialize};

/// Where every VM and volume goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// VM name → node name.
    pub vms: BTreeMap<String, String>,
    /// Volume name → its primary node and replica nodes.
    pub volumes: BTreeMap<String, VolumePlacement>,
    /// VMs that could not be placed, with the reason.
    pub unplaced: BTreeMap<String, String>,
    /// VMs pushed out by a higher-priority VM: victim → preemptor.
    pub preempted: BTreeMap<String, String>,
}

/// Where one volume's copies are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Everything desired.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// Nodes by name.
    pub nodes: BTreeMap<String, DesiredNode>,
    /// VMs by name (placed ones only).
    pub vms: BTreeMap<String, DesiredVm>,
    /// Volumes by name.
    pub volumes: BTreeMap<String, DesiredVolume>,
    /// The placement they came from.
    pub placement: Placement,
    /// VM → tenant for every VM of the model (placed or not).
    pub tenants: BTreeMap<String, String>,
}

/// The name of a VM disk's volume.
pub fn volume_name(vm: &str, disk: &str) -> String {
    format!("{vm}-{disk}")
}

/// Places every VM and volume of the model, starting from `previous`.
pub fn place(model: &Model, previous: Option<&Placement>) -> Placement {
    let mut placement = Placement::default();
    let empty = Placement::default();
    let previous = previous.unwrap_or(&empty);
    // Free memory and CPU per node (memory overcommit applied), group counts.
    let mut free_memory: BTreeMap<&str, i128> = BTreeMap::new();
    let mut free_cpu: BTreeMap<&str, f64> = BTreeMap::new();
    let mut site_of: BTreeMap<&str, &str> = BTreeMap::new();
    for site in &model.sites {
        for node in &site.nodes {
            free_memory.insert(
                &node.name,
                (node.allocatable.memory_bytes as f64 * site.overcommit.memory) as i128,
            );
            free_cpu.insert(
                &node.name,
                node.allocatable.cpu as f64 * site.overcommit.cpu,
            );
            site_of.insert(&node.name, &site.name);
        }
    }
    let mut group_count: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    let mut on_node: BTreeMap<&str, Vec<&compiler::model::Vm>> = BTreeMap::new();
    // Highest priority first so preemption only ever evicts lower priorities;
    // VMs with a previous node first within a priority (stability), then by name.
    let mut order: Vec<&compiler::model::Vm> = model.vms.iter().collect();
    order.sort_by(|a, b| {
        b.sla
            .priority
            .cmp(&a.sla.priority)
            .then_with(|| {
                previous
                    .vms
                    .contains_key(&b.name)
                    .cmp(&previous.vms.contains_key(&a.name))
            })
            .then_with(|| a.name.cmp(&b.name))
    });
    let fits = |node: &str,
                vm: &compiler::model::Vm,
                mem: &BTreeMap<&str, i128>,
                cpu: &BTreeMap<&str, f64>| {
        mem.get(node).copied().unwrap_or(0) >= i128::from(vm.memory_bytes)
            && cpu.get(node).copied().unwrap_or(0.0) >= f64::from(vm.cpu)
    };
    for vm in order {
        let candidates: Vec<&str> = site_of
            .iter()
            .filter(|(_, s)| **s == vm.site)
            .map(|(n, _)| *n)
            .collect();
        let kept = previous
            .vms
            .get(&vm.name)
            .map(String::as_str)
            .filter(|n| candidates.contains(n) && fits(n, vm, &free_memory, &free_cpu));
        let group = vm.group.as_deref().unwrap_or("");
        let chosen = kept.or_else(|| {
            candidates
                .iter()
                .copied()
                .filter(|n| fits(n, vm, &free_memory, &free_cpu))
                .min_by(|a, b| {
                    let ga = if group.is_empty() {
                        0
                    } else {
                        group_count.get(&(*a, group)).copied().unwrap_or(0)
                    };
                    let gb = if group.is_empty() {
                        0
                    } else {
                        group_count.get(&(*b, group)).copied().unwrap_or(0)
                    };
                    ga.cmp(&gb)
                        .then_with(|| free_memory[b].cmp(&free_memory[a]))
                        .then_with(|| a.cmp(b))
                })
        });
        let chosen = match chosen {
            Some(n) => n,
            None => {
                // Preemption: the node where evicting the fewest lower-priority
                // VMs (lowest priority first) makes room.
                let mut best: Option<(&str, Vec<&compiler::model::Vm>)> = None;
                for node in &candidates {
                    let mut victims: Vec<&compiler::model::Vm> = on_node
                        .get(node)
                        .map(|v| {
                            v.iter()
                                .copied()
                                .filter(|o| o.sla.priority < vm.sla.priority)
                                .collect()
                        })
                        .unwrap_or_default();
                    victims.sort_by(|a, b| {
                        a.sla
                            .priority
                            .cmp(&b.sla.priority)
                            .then_with(|| a.name.cmp(&b.name))
                    });
                    let mut mem = free_memory[node];
                    let mut cpu = free_cpu[node];
                    let mut taken = vec![];
                    for v in victims {
                        if mem >= i128::from(vm.memory_bytes) && cpu >= f64::from(vm.cpu) {
                            break;
                        }
                        mem += i128::from(v.memory_bytes);
                        cpu += f64::from(v.cpu);
                        taken.push(v);
                    }
                    if mem >= i128::from(vm.memory_bytes)
                        && cpu >= f64::from(vm.cpu)
                        && best.as_ref().is_none_or(|(_, b)| taken.len() < b.len())
                    {
                        best = Some((node, taken));
                    }
                }
                let Some((node, victims)) = best else {
                    placement.unplaced.insert(
                        vm.name.clone(),
                        format!(
                            "no node of site `{}` has {} free memory and {} free vCPUs, and no lower-priority VMs can be preempted",
                            vm.site,
                            compiler::units::human_size(vm.memory_bytes),
                            vm.cpu
                        ),
                    );
                    continue;
                };
                for victim in victims {
                    *free_memory.get_mut(node).expect("known node") +=
                        i128::from(victim.memory_bytes);
                    *free_cpu.get_mut(node).expect("known node") += f64::from(victim.cpu);
                    placement.vms.remove(&victim.name);
                    if let Some(g) = &victim.group {
                        *group_count.entry((node, g.as_str())).or_default() -= 1;
                    }
                    on_node
                        .get_mut(node)
                        .expect("victims came from this node")
                        .retain(|o| o.name != victim.name);
                    placement
                        .preempted
                        .insert(victim.name.clone(), vm.name.clone());
                    placement.unplaced.insert(
                        victim.name.clone(),
                        format!(
                            "preempted on {node} by `{}` (priority {} > {})",
                            vm.name, vm.sla.priority, victim.sla.priority
                        ),
                    );
                }
                node
            }
        };
        *free_memory.get_mut(chosen).expect("known node") -= i128::from(vm.memory_bytes);
        *free_cpu.get_mut(chosen).expect("known node") -= f64::from(vm.cpu);
        if !group.is_empty() {
            *group_count.entry((chosen, group)).or_default() += 1;
        }
        on_node.entry(chosen).or_default().push(vm);
        placement.vms.insert(vm.name.clone(), chosen.to_owned());
    }
    // Volumes: primary on the VM's node (kept where it was: data does not move),
    // replicas on the other nodes of the site with the fewest copies, by name.
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
            let placed = match previous.volumes.get(&name) {
                Some(prev)
                    if site_of.contains_key(prev.node.as_str())
                        && prev.replicas.len() == n_replicas =>
                {
                    prev.clone()
                }
                _ => {
                    let mut others: Vec<&str> = site_of
                        .iter()
                        .filter(|(n, s)| **s == vm.site && **n != node)
                        .map(|(n, _)| *n)
                        .collect();
                    others.sort_by_key(|n| (copies.get(*n).copied().unwrap_or(0), n.to_string()));
                    VolumePlacement {
                        node: node.clone(),
                        replicas: others
                            .into_iter()
                            .take(n_replicas)
                            .map(str::to_owned)
                            .collect(),
                    }
                }
            };
            for n in std::iter::once(&placed.node).chain(&placed.replicas) {
                *copies.entry(n.clone()).or_default() += 1;
            }
            placement.volumes.insert(name, placed);
        }
    }
    placement
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
        }
    }
    for vm in &model.vms {
        desired.tenants.insert(vm.name.clone(), vm.tenant.clone());
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
            },
        );
    }
    desired.placement = placement;
    desired
}
