//! Stripe placement: each volume is cut into `stripe-width` columns; each
//! column has `replicas` copies on disks of the pool's class, in distinct
//! failure domains, on the disks with the most free space (capacity ×
//! thin-overcommit minus what is already provisioned there). Previous
//! columns stay where they are while all their disks are alive.

use std::collections::{BTreeMap, BTreeSet};

use super::{Engine, Placement, Reason, VolumePlacement};
use crate::model::{Domain, Model, Vm};

#[derive(Debug)]
struct DiskState {
    id: String,
    domain: String,
    /// `domain` interned per pool (comparisons on the hot path are integers).
    domain_id: usize,
    capacity: u64,
    used: u64,
    alive: bool,
    /// Its node is not in maintenance: a new copy may go there.
    open: bool,
}

impl DiskState {
    fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used)
    }
}

/// The live, open disks of one pool by most free room, then lowest index,
/// grouped by failure domain: each domain knows its best disk, and a
/// tournament tree over the domains (each tree node holds the domain with the
/// best disk below it) gives the best disk outside the domains a column
/// already uses in a few steps. Kept across volumes: an update is a walk over
/// the disk's domain and one leaf-to-root walk, not a rebuild of the pool.
///
/// A column's copies are the best disk, then the best disk of another domain,
/// and so on: what popping every disk in (free, lowest index) order and
/// skipping those of a chosen domain gives, without popping the (usually
/// many) disks of the chosen domains that rank next (ties go to the lowest
/// index, so after a rack's first disk come its other disks).
struct FreeHeap {
    /// Each disk's free room while it may take a copy (`None`: dead or closed).
    key: Vec<Option<u64>>,
    /// Each disk's failure domain (`DiskState::domain_id`).
    domain_of: Vec<usize>,
    /// The disks of each domain, by index.
    members: Vec<Vec<u32>>,
    /// Each domain's best disk (`NONE`: none may take a copy).
    best: Vec<u32>,
    /// `winner[k]` is the domain with the best disk below tree node `k`
    /// (`NONE`: none); the leaves are `leaves..2 * leaves`, domain `d` at
    /// `leaves + d`.
    winner: Vec<u32>,
    leaves: usize,
}

const NONE: u32 = u32::MAX;

impl FreeHeap {
    fn new(disks: &[DiskState]) -> FreeHeap {
        let domains = disks.iter().map(|d| d.domain_id + 1).max().unwrap_or(0);
        let mut members = vec![vec![]; domains];
        for (i, d) in disks.iter().enumerate() {
            members[d.domain_id].push(i as u32);
        }
        let leaves = domains.next_power_of_two().max(1);
        let mut heap = FreeHeap {
            key: disks
                .iter()
                .map(|d| (d.alive && d.open).then(|| d.free()))
                .collect(),
            domain_of: disks.iter().map(|d| d.domain_id).collect(),
            members,
            best: vec![NONE; domains],
            winner: vec![NONE; 2 * leaves],
            leaves,
        };
        for d in 0..domains {
            heap.best[d] = heap.members[d]
                .iter()
                .fold(NONE, |b, &i| heap.better_disk(b, i));
            heap.winner[leaves + d] = if heap.best[d] == NONE { NONE } else { d as u32 };
        }
        for k in (1..leaves).rev() {
            heap.winner[k] = heap.better_domain(heap.winner[2 * k], heap.winner[2 * k + 1]);
        }
        heap
    }

    fn key_of(&self, disk: u32) -> Option<u64> {
        self.key.get(disk as usize).copied().flatten()
    }

    /// The better of two disks (either may be `NONE`): more free room, then
    /// the lower index.
    #[inline]
    fn better_disk(&self, a: u32, b: u32) -> u32 {
        match (self.key_of(a), self.key_of(b)) {
            (Some(ka), Some(kb)) => {
                if kb > ka || (kb == ka && b < a) {
                    b
                } else {
                    a
                }
            }
            (Some(_), None) => a,
            (None, Some(_)) => b,
            (None, None) => NONE,
        }
    }

    /// The domain with the better best disk (either may be `NONE`).
    #[inline]
    fn better_domain(&self, x: u32, y: u32) -> u32 {
        let disk = |d: u32| self.best.get(d as usize).copied().unwrap_or(NONE);
        let b = self.better_disk(disk(x), disk(y));
        if b == NONE {
            NONE
        } else if b == disk(x) {
            x
        } else {
            y
        }
    }

    /// The best domain below tree node `k` that is not in `skip`.
    fn best_outside(&self, k: usize, skip: &[usize]) -> u32 {
        let w = self.winner[k];
        if w == NONE || !skip.contains(&(w as usize)) {
            return w;
        }
        if k >= self.leaves {
            return NONE;
        }
        self.better_domain(
            self.best_outside(2 * k, skip),
            self.best_outside(2 * k + 1, skip),
        )
    }

    /// The disk with the most free room (then the lowest index) outside the
    /// domains `skip`, with its free room.
    fn pick(&self, skip: &[usize]) -> Option<(u64, usize)> {
        let d = self.best_outside(1, skip);
        let disk = *self.best.get(d as usize)?;
        Some((self.key_of(disk)?, disk as usize))
    }

    /// Records disk `i`'s free room (it may take a copy).
    fn update(&mut self, i: usize, free: u64) {
        let old = self.key[i].replace(free);
        let d = self.domain_of[i];
        let cur = self.best[d];
        self.best[d] = if cur as usize != i {
            // The others are as they were, and `cur` the best of them.
            self.better_disk(cur, i as u32)
        } else if old.is_some_and(|o| free >= o) {
            cur
        } else {
            self.members[d]
                .iter()
                .fold(NONE, |b, &m| self.better_disk(b, m))
        };
        let mut k = self.leaves + d;
        self.winner[k] = if self.best[d] == NONE { NONE } else { d as u32 };
        while k > 1 {
            k /= 2;
            self.winner[k] = self.better_domain(self.winner[2 * k], self.winner[2 * k + 1]);
        }
    }
}

/// Which nodes are alive: what volume placement reads of the engine, taken
/// apart so that volumes can be placed while the engine places VMs.
pub(crate) struct Alive {
    node_index: super::fasthash::FxHashMap<String, usize>,
    alive: Vec<bool>,
}

impl Alive {
    /// The engine's nodes (whether a node is alive is fixed for a run).
    pub(crate) fn of(engine: &Engine<'_>) -> Alive {
        Alive {
            node_index: engine.node_index.clone(),
            alive: engine.nodes.iter().map(|n| n.alive).collect(),
        }
    }

    fn node(&self, name: &str) -> bool {
        self.node_index.get(name).is_some_and(|&i| self.alive[i])
    }
}

/// Places the volumes of VMs in placement order. Returns the placements
/// and, per VM whose volumes do not fit, the reason.
pub(crate) fn place_volumes(
    model: &Model,
    alive: &Alive,
    previous: Option<&Placement>,
    ordered: &[&Vm],
) -> (Vec<VolumePlacement>, Vec<(String, Reason)>) {
    // Disks per (site, pool): the pools in model order, found by name pair
    // without building a key per disk.
    let mut pools: Vec<Vec<DiskState>> = vec![];
    let mut pool_info: Vec<(u32, u32, u64, Domain)> = vec![];
    let mut indexes: Vec<super::fasthash::FxHashMap<String, usize>> = vec![];
    let mut pool_of: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for site in &model.sites {
        for p in &site.pools {
            let mut disks = vec![];
            let mut domain_ids: BTreeMap<String, usize> = BTreeMap::new();
            for n in &site.nodes {
                let alive = alive.node(&n.name);
                let open = !n.maintenance;
                for d in n.disks.iter().filter(|d| d.class == p.disk_class) {
                    let domain = match p.failure_domain {
                        Domain::Node => n.name.clone(),
                        Domain::Rack => n.rack.clone(),
                        Domain::Site => n.site.clone(),
                    };
                    let next = domain_ids.len();
                    let domain_id = *domain_ids.entry(domain.clone()).or_insert(next);
                    disks.push(DiskState {
                        id: format!("{}/{}", n.name, d.name),
                        domain,
                        domain_id,
                        capacity: (d.size_bytes as f64 * p.thin_overcommit) as u64,
                        used: 0,
                        alive,
                        open,
                    });
                }
            }
            let index = disks
                .iter()
                .enumerate()
                .map(|(i, d)| (d.id.clone(), i))
                .collect();
            // A pool name given twice in a site: the last one, as a map
            // keyed by (site, pool) would hold.
            pool_of.insert((site.name.as_str(), p.name.as_str()), pools.len());
            indexes.push(index);
            pools.push(disks);
            pool_info.push((
                p.stripe_width.max(1),
                p.replicas.max(1),
                p.stripe_unit_bytes.max(1),
                p.failure_domain,
            ));
        }
    }
    // Point lookups only.
    let prev: super::fasthash::FxHashMap<&str, &VolumePlacement> = previous
        .iter()
        .flat_map(|p| p.volumes.iter().chain(&p.dr_volumes))
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mut out = vec![];
    let mut failures = vec![];
    // Two passes: volumes that keep their previous columns claim their space
    // first, so a new volume never pushes an existing one off its disks.
    let mut pending: Vec<(&Vm, usize)> = vec![];
    // Scratch for a volume's name (its lookup allocates nothing).
    let mut name = String::new();
    for vm in ordered {
        for (k, disk) in vm.disks.iter().enumerate() {
            let Some(&k_pool) = pool_of.get(&(vm.site.as_str(), disk.pool.as_str())) else {
                continue;
            };
            let (disks, (width, replicas, unit, _), index) =
                (&mut pools[k_pool], pool_info[k_pool], &indexes[k_pool]);
            let column = column_bytes(disk.size_bytes, width, unit);
            // A previous volume stays while every column keeps at least one
            // live copy; dead copies are replaced where a distinct domain
            // has room, else the column runs degraded.
            let kept = (!prev.is_empty())
                .then(|| {
                    name.clear();
                    name.push_str(&vm.name);
                    name.push('/');
                    name.push_str(&disk.name);
                    prev.get(name.as_str())
                })
                .flatten()
                .filter(|p| {
                    p.pool == disk.pool
                        && p.column_bytes == column
                        && p.columns.len() == width as usize
                        && p.columns.iter().all(|c| {
                            c.iter().all(|id| index.contains_key(id))
                                && c.iter()
                                    .any(|id| index.get(id).is_some_and(|&i| disks[i].alive))
                        })
                });
            match kept {
                Some(p) => {
                    let mut vp = (*p).clone();
                    vp.degraded_columns = 0;
                    for col in &mut vp.columns {
                        col.retain(|id| index.get(id).is_some_and(|&i| disks[i].alive));
                        for id in col.iter() {
                            if let Some(&i) = index.get(id) {
                                disks[i].used += column;
                            }
                        }
                        while col.len() < replicas as usize {
                            let domains: Vec<String> = col
                                .iter()
                                .filter_map(|id| index.get(id).map(|&i| &disks[i]))
                                .map(|d| d.domain.clone())
                                .collect();
                            let best = disks
                                .iter_mut()
                                .filter(|d| {
                                    d.alive
                                        && d.open
                                        && !domains.contains(&d.domain)
                                        && d.capacity.saturating_sub(d.used) >= column
                                })
                                .max_by(|a, b| {
                                    (a.capacity - a.used)
                                        .cmp(&(b.capacity - b.used))
                                        .then(b.id.cmp(&a.id))
                                });
                            match best {
                                Some(d) => {
                                    d.used += column;
                                    col.push(d.id.clone());
                                }
                                None => break,
                            }
                        }
                        if col.len() < replicas as usize {
                            vp.degraded_columns += 1;
                        }
                    }
                    out.push(vp);
                }
                None => pending.push((vm, k)),
            }
        }
    }
    // Built on first use, after the first pass claimed its space.
    let mut heaps: Vec<Option<FreeHeap>> = (0..pools.len()).map(|_| None).collect();
    for (vm, k) in pending {
        let disk = &vm.disks[k];
        let Some(&k_pool) = pool_of.get(&(vm.site.as_str(), disk.pool.as_str())) else {
            continue;
        };
        let (disks, (width, replicas, unit, domain)) = (&mut pools[k_pool], pool_info[k_pool]);
        let column = column_bytes(disk.size_bytes, width, unit);
        let heap = heaps[k_pool].get_or_insert_with(|| FreeHeap::new(disks));
        let mut columns: Vec<Vec<usize>> = vec![];
        let mut ok = true;
        for _ in 0..width {
            let mut chosen: Vec<usize> = vec![];
            let mut domains: Vec<usize> = vec![];
            while chosen.len() < replicas as usize {
                match heap.pick(&domains) {
                    Some((free, i)) if free >= column => {
                        chosen.push(i);
                        domains.push(disks[i].domain_id);
                    }
                    _ => break,
                }
            }
            if chosen.len() < replicas as usize {
                ok = false;
                break;
            }
            for &i in &chosen {
                disks[i].used += column;
                heap.update(i, disks[i].free());
            }
            columns.push(chosen);
        }
        if !ok {
            // Give back what the partial volume took.
            for c in &columns {
                for &i in c {
                    disks[i].used -= column;
                    heap.update(i, disks[i].free());
                }
            }
            let free_domains = {
                let mut by_domain: BTreeMap<&str, u64> = BTreeMap::new();
                for d in disks
                    .iter()
                    .filter(|d| d.alive && d.open && d.capacity.saturating_sub(d.used) >= column)
                {
                    *by_domain.entry(d.domain.as_str()).or_default() += 1;
                }
                by_domain.len()
            };
            let full: Vec<String> = disks
                .iter()
                .filter(|d| d.capacity.saturating_sub(d.used) < column || !d.alive || !d.open)
                .map(|d| d.id.clone())
                .collect();
            failures.push((
                vm.name.clone(),
                Reason {
                    constraint: "pool".to_owned(),
                    message: format!(
                        "pool `{}` cannot hold disk `{}`: each of its {width} columns needs {replicas} copies of {} in distinct {domain}s, and only {free_domains} {domain}{} {} a disk with that much room",
                        disk.pool,
                        disk.name,
                        crate::units::human_size(column),
                        if free_domains == 1 { "" } else { "s" },
                        if free_domains == 1 { "has" } else { "have" },
                    ),
                    nodes_filtered: full.len(),
                    nodes: full.into_iter().take(5).collect(),
                    source: None,
                },
            ));
            continue;
        }
        out.push(VolumePlacement {
            name: format!("{}/{}", vm.name, disk.name),
            vm: vm.name.clone(),
            pool: disk.pool.clone(),
            size_bytes: disk.size_bytes,
            column_bytes: column,
            columns: columns
                .iter()
                .map(|c| c.iter().map(|&i| disks[i].id.clone()).collect())
                .collect(),
            degraded_columns: 0,
            primary: String::new(),
            replicas: vec![],
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    failures.sort_by(|a, b| a.0.cmp(&b.0));
    failures.dedup_by(|a, b| a.0 == b.0);
    (out, failures)
}

/// Bytes of one column copy: the size split over the columns, rounded up to
/// whole stripe units.
fn column_bytes(size: u64, width: u32, unit: u64) -> u64 {
    let per = size.div_ceil(u64::from(width));
    per.div_ceil(unit) * unit
}

/// The stand-in VM whose disks are `vm`'s DR copies at `site`: `VM.dr.SITE`.
fn dr_name(vm: &str, site: &str) -> String {
    format!("{vm}.dr.{site}")
}

/// `(VM, SITE)` of a DR stand-in's name `VM.dr.SITE`, or of a DR copy's
/// `VM.dr.SITE/DISK` (VM names are DNS labels, so no VM or disk of the spec is
/// named like that).
pub(crate) fn dr_of(name: &str) -> Option<(&str, &str)> {
    let stand_in = name.split('/').next().unwrap_or_default();
    stand_in.split_once(".dr.")
}

/// One stand-in VM per protected VM with disks and per site a protection plan of it
/// replicates to (`replicate to-site= pool=`; the first plan naming a site gives the
/// pool): the VM's disks, of the same sizes, in that pool of that site.
pub(crate) fn dr_stand_ins(model: &Model) -> Vec<std::sync::Arc<Vm>> {
    let mut out = vec![];
    for vm in model.vms.iter().filter(|v| !v.disks.is_empty()) {
        let mut sites: Vec<&str> = vec![];
        let replications = model
            .protection_plans
            .iter()
            .filter(|p| vm.protection_plans.contains(&p.name))
            .flat_map(|p| &p.replicate);
        for r in replications {
            if r.to_site == vm.site || sites.contains(&r.to_site.as_str()) {
                continue;
            }
            sites.push(&r.to_site);
            let mut stand_in = Vm::clone(vm);
            stand_in.name = dr_name(&vm.name, &r.to_site);
            stand_in.site = r.to_site.clone();
            for disk in &mut stand_in.disks {
                disk.pool = r.pool.clone();
                disk.from_image = false;
            }
            out.push(std::sync::Arc::new(stand_in));
        }
    }
    out
}

/// The runtime layout of the DR copies (`primary`, `replicas`): the previous
/// primary while its node is in the target site (the data is there), else the node
/// of the first column's first copy; replicas are the other nodes of the columns'
/// copies, then the site's other nodes by name, up to the pool's `replicas - 1`.
/// Each copy's `vm` becomes the protected VM.
pub(crate) fn dr_layout(
    model: &Model,
    engine: &Engine<'_>,
    mut dr: Vec<VolumePlacement>,
    previous: Option<&Placement>,
) -> Vec<VolumePlacement> {
    if dr.is_empty() {
        return dr;
    }
    // The volumes a node reported (`previous.volumes`, by runtime name) win over
    // the stored layout: the data decides.
    let before: BTreeMap<String, &str> = previous
        .iter()
        .flat_map(|p| p.dr_volumes.iter().chain(&p.volumes))
        .filter(|v| !v.primary.is_empty())
        .map(|v| {
            let name = super::dr_runtime_name(&v.name).unwrap_or_else(|| v.runtime_name());
            (name, v.primary.as_str())
        })
        .collect();
    // The nodes of each site in engine order, and as a set, built once (not a
    // pass over every node per DR volume).
    let mut by_site: BTreeMap<&str, (Vec<&str>, BTreeSet<&str>)> = BTreeMap::new();
    for n in &engine.nodes {
        let (list, set) = by_site.entry(n.site.as_str()).or_default();
        list.push(n.name.as_str());
        set.insert(n.name.as_str());
    }
    let no_nodes = (vec![], BTreeSet::new());
    for volume in &mut dr {
        let Some((vm, site)) = dr_of(&volume.name).map(|(v, s)| (v.to_owned(), s.to_owned()))
        else {
            continue;
        };
        let (site_nodes, site_set) = by_site.get(site.as_str()).unwrap_or(&no_nodes);
        let n_replicas = model
            .site(&site)
            .and_then(|s| s.pools.iter().find(|p| p.name == volume.pool))
            .map(|p| p.replicas.saturating_sub(1) as usize)
            .unwrap_or(0);
        let column_nodes: Vec<&str> = volume
            .columns
            .iter()
            .flatten()
            .map(|copy| copy.split('/').next().unwrap_or(copy))
            .collect();
        let runtime = super::dr_runtime_name(&volume.name).unwrap_or_default();
        let primary = before
            .get(&runtime)
            .copied()
            .filter(|p| site_set.contains(p))
            .or_else(|| column_nodes.first().copied())
            .unwrap_or_default()
            .to_owned();
        let mut replicas: Vec<String> = vec![];
        for candidate in column_nodes.iter().chain(site_nodes) {
            if replicas.len() >= n_replicas {
                break;
            }
            if *candidate != primary && !replicas.iter().any(|r| r == candidate) {
                replicas.push((*candidate).to_owned());
            }
        }
        volume.primary = primary;
        volume.replicas = replicas;
        volume.vm = vm;
    }
    dr
}
