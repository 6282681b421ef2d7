//! Dedicated CPUs for reserved VMs (an SLA profile's `cpu-pinning=#true`): cpuset
//! cgroups, v1 or v2.
//!
//! The node may dedicate the CPUs of `--dedicated-cpus` (default: every CPU of its
//! parent cpuset but the lowest, which stays for the host and the shared VMs). Every
//! VM has a cpuset of its own, `vm-NAME` under the node's parent (v1: in the cpuset
//! hierarchy; v2: its one cgroup): a VM with dedicated CPUs holds exactly `vcpus` CPUs
//! that no other VM of the node holds; every other VM holds the node's *shared* set,
//! the parent's CPUs that no VM has to itself. The VMM is placed in its cpuset between
//! fork and exec ([`crate::cgroups::Placement`]), so its vCPU threads (and its device
//! and control threads) never run anywhere else.
//!
//! The assignment is the cpusets themselves: at start the node takes back every
//! `vm-*` cpuset whose CPUs are all dedicable (a shared VM always holds at least one
//! CPU that is not), so an agent restart keeps each running VM on its CPUs.
//!
//! Host processes outside the node's cgroups are not moved (that is the host's
//! business: `isolcpus=`, systemd's `AllowedCPUs=` for `system.slice`, or a v2
//! cpuset partition); the node keeps its own VMs apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proto::v1;

use crate::cgroups::read_pids as ids;

/// Parses a kernel CPU list ("0-3,5", "" for none).
pub fn parse_list(text: &str) -> Result<Vec<u32>, String> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.trim().is_empty()) {
        let part = part.trim();
        let number = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{part}` is not a CPU number or range (like 2-5)"))
        };
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last || last - first > 4096 {
                    return Err(format!("`{part}` is not a CPU range (like 2-5)"));
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(number(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// A CPU list as the kernel writes it ("0-3,5").
pub fn format_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut index = 0;
    while index < sorted.len() {
        let first = sorted[index];
        let mut last = first;
        while index + 1 < sorted.len() && sorted[index + 1] == last + 1 {
            index += 1;
            last = sorted[index];
        }
        parts.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
        index += 1;
    }
    parts.join(",")
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .map_err(|error| format!("cannot read {}: {error}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|error| format!("cannot write {value} to {}: {error}", path.display()))
}

/// The node's cpusets.
#[derive(Debug)]
pub struct Cpusets {
    /// cgroup v2 (the VM's one cgroup holds its cpuset) or v1 (a hierarchy of its own).
    v2: bool,
    /// The node's parent directory in the cpuset hierarchy.
    parent: PathBuf,
    /// Its path below the hierarchy's mount.
    relative: String,
    /// The parent's CPUs: every CPU the node's VMs may run on.
    all: Vec<u32>,
    /// v1: the parent's memory nodes (a v1 cpuset holds no task without them).
    mems: String,
    /// The CPUs the node may dedicate.
    dedicable: Vec<u32>,
    /// VM → its dedicated CPUs.
    assigned: Mutex<BTreeMap<String, Vec<u32>>>,
}

impl Cpusets {
    /// v1: makes the node's parent `leaf` below `base` (a path below the cpuset
    /// hierarchy's `mount`), giving it the CPUs and memory nodes of the cgroup it is in.
    pub fn v1(
        mount: &str,
        base: &str,
        leaf: &str,
        dedicated: Option<&str>,
    ) -> Result<Cpusets, String> {
        let base_dir = super::cgroups::join(mount, base);
        let relative = format!("{}/{leaf}", base.trim_end_matches('/'));
        let parent = base_dir.join(leaf);
        std::fs::create_dir_all(&parent)
            .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
        let effective = |dir: &Path| {
            read(&dir.join("cpuset.effective_cpus")).or_else(|_| read(&dir.join("cpuset.cpus")))
        };
        let cpus = effective(&base_dir)?;
        let mems = read(&base_dir.join("cpuset.effective_mems"))
            .or_else(|_| read(&base_dir.join("cpuset.mems")))?;
        if read(&parent.join("cpuset.mems"))?.is_empty() {
            write(&parent.join("cpuset.mems"), &mems)?;
        }
        if read(&parent.join("cpuset.cpus"))? != cpus {
            write(&parent.join("cpuset.cpus"), &cpus)?;
        }
        Self::new(false, parent, relative, parse_list(&cpus)?, mems, dedicated)
    }

    /// v2: the node's parent is its cgroup v2 parent, where `+cpuset` is enabled for
    /// the VMs' cgroups.
    pub fn v2(
        parent: PathBuf,
        relative: String,
        dedicated: Option<&str>,
    ) -> Result<Cpusets, String> {
        let cpus = read(&parent.join("cpuset.cpus.effective"))?;
        Self::new(
            true,
            parent,
            relative,
            parse_list(&cpus)?,
            String::new(),
            dedicated,
        )
    }

    fn new(
        v2: bool,
        parent: PathBuf,
        relative: String,
        all: Vec<u32>,
        mems: String,
        dedicated: Option<&str>,
    ) -> Result<Cpusets, String> {
        let dedicable = match dedicated {
            Some(list) => {
                let wanted =
                    parse_list(list).map_err(|error| format!("--dedicated-cpus: {error}"))?;
                if let Some(cpu) = wanted.iter().find(|cpu| !all.contains(cpu)) {
                    return Err(format!(
                        "--dedicated-cpus names CPU {cpu}, which the node's cpuset does not hold (it holds {})",
                        format_list(&all)
                    ));
                }
                if !wanted.is_empty() && wanted.len() >= all.len() {
                    return Err(format!(
                        "--dedicated-cpus {} leaves no CPU for the host and the VMs that share CPUs (the node's cpuset holds {})",
                        format_list(&wanted),
                        format_list(&all)
                    ));
                }
                wanted
            }
            None => all.iter().skip(1).copied().collect(),
        };
        let cpusets = Cpusets {
            v2,
            parent,
            relative,
            all,
            mems,
            dedicable,
            assigned: Mutex::new(BTreeMap::new()),
        };
        cpusets.take_back();
        Ok(cpusets)
    }

    /// Takes back the dedicated CPUs of the VM cpusets a previous agent made: those
    /// whose CPUs are all dedicable and held by no other.
    fn take_back(&self) {
        let mut assigned = self.lock();
        for vm in self.list() {
            let Ok(cpus) = read(&self.dir(&vm).join("cpuset.cpus")).and_then(|t| parse_list(&t))
            else {
                continue;
            };
            let taken = assigned.values().flatten().any(|cpu| cpus.contains(cpu));
            if !cpus.is_empty() && !taken && cpus.iter().all(|cpu| self.dedicable.contains(cpu)) {
                assigned.insert(vm, cpus);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u32>>> {
        self.assigned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The node's parent cpuset directory.
    pub fn parent_dir(&self) -> &Path {
        &self.parent
    }

    /// The VM's cpuset directory.
    pub fn dir(&self, vm: &str) -> PathBuf {
        self.parent.join(format!("vm-{vm}"))
    }

    /// The VM's cpuset path below the hierarchy's mount.
    pub fn path_of(&self, vm: &str) -> String {
        format!("{}/vm-{vm}", self.relative)
    }

    /// v1: the VM's cpuset is a directory of its own hierarchy (its VMM enters it at
    /// fork, beside the cpu and memory ones).
    pub fn separate(&self) -> bool {
        !self.v2
    }

    /// The VMs with a cpuset under the parent.
    pub fn list(&self) -> Vec<String> {
        crate::cgroups::vm_names(std::slice::from_ref(&self.parent))
    }

    /// The CPUs the node may dedicate.
    pub fn dedicable(&self) -> Vec<u32> {
        self.dedicable.clone()
    }

    /// The dedicable CPUs no VM holds.
    pub fn free(&self) -> Vec<u32> {
        let assigned = self.lock();
        self.free_in(&assigned)
    }

    fn free_in(&self, assigned: &BTreeMap<String, Vec<u32>>) -> Vec<u32> {
        self.dedicable
            .iter()
            .copied()
            .filter(|cpu| !assigned.values().flatten().any(|held| held == cpu))
            .collect()
    }

    fn shared_in(&self, assigned: &BTreeMap<String, Vec<u32>>) -> Vec<u32> {
        self.all
            .iter()
            .copied()
            .filter(|cpu| !assigned.values().flatten().any(|held| held == cpu))
            .collect()
    }

    /// The CPUs dedicated to `vm` (`None`: it shares).
    pub fn assigned(&self, vm: &str) -> Option<Vec<u32>> {
        self.lock().get(vm).cloned()
    }

    /// The CPUs the VM's cpuset should hold now: its own `dedicated` ones, or the
    /// shared set.
    fn wanted(&self, assigned: &BTreeMap<String, Vec<u32>>, vm: &str) -> Vec<u32> {
        assigned
            .get(vm)
            .cloned()
            .unwrap_or_else(|| self.shared_in(assigned))
    }

    /// Makes the VM's cpuset (v1: with the parent's memory nodes) and writes the CPUs it
    /// should hold: `dedicated` CPUs of its own (given now from the free ones when it
    /// has none or another number), or the shared set (giving back any it held). When
    /// the shared set changed, every VM that shares gets it. With `pid`, moves that
    /// process (every thread) in. Returns one line per value written.
    pub fn ensure(
        &self,
        vm: &str,
        dedicated: u32,
        pid: Option<u32>,
    ) -> Result<Vec<String>, String> {
        let dir = self.dir(vm);
        std::fs::create_dir_all(&dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let mut written = Vec::new();
        if !self.v2 && read(&dir.join("cpuset.mems"))?.is_empty() {
            write(&dir.join("cpuset.mems"), &self.mems)?;
            written.push(format!("cpuset.mems {}", self.mems));
        }
        let mut assigned = self.lock();
        let before = self.shared_in(&assigned);
        let wanted = dedicated as usize;
        if wanted == 0 {
            assigned.remove(vm);
        } else if assigned.get(vm).map(Vec::len) != Some(wanted) {
            assigned.remove(vm);
            let free = self.free_in(&assigned);
            if free.len() < wanted {
                let holders: Vec<String> = assigned
                    .iter()
                    .map(|(other, cpus)| format!("{} to vm `{other}`", format_list(cpus)))
                    .collect();
                return Err(format!(
                    "vm `{vm}` needs {wanted} dedicated CPU{}, and {} of this node's dedicable CPUs ({}) {} free{}",
                    if wanted == 1 { "" } else { "s" },
                    free.len(),
                    if self.dedicable.is_empty() {
                        "none".to_string()
                    } else {
                        format_list(&self.dedicable)
                    },
                    if free.len() == 1 { "is" } else { "are" },
                    if holders.is_empty() {
                        String::new()
                    } else {
                        format!(" (dedicated: {})", holders.join(", "))
                    }
                ));
            }
            assigned.insert(vm.to_string(), free[..wanted].to_vec());
        }
        let after = self.shared_in(&assigned);
        // Shrinking: the VMs that share leave the CPUs first, then the VM takes them.
        if after != before && after.len() < before.len() {
            self.write_shared(&assigned, &after, &mut written)?;
        }
        let own = self.wanted(&assigned, vm);
        let cpus_file = dir.join("cpuset.cpus");
        if parse_list(&read(&cpus_file)?)? != own {
            write(&cpus_file, &format_list(&own))?;
            written.push(format!("cpuset.cpus {}", format_list(&own)));
        }
        if after != before && after.len() >= before.len() {
            self.write_shared(&assigned, &after, &mut written)?;
        }
        drop(assigned);
        if let Some(pid) = pid
            && !self.v2
        {
            let threads = thread_ids(pid);
            let tasks = ids(&dir.join("tasks"));
            if threads.iter().any(|tid| !tasks.contains(tid)) {
                write(&dir.join("cgroup.procs"), &pid.to_string())?;
                written.push(format!("cpuset cgroup.procs {pid}"));
            }
        }
        Ok(written)
    }

    /// Writes `shared` into every VM cpuset that has no dedicated CPUs.
    fn write_shared(
        &self,
        assigned: &BTreeMap<String, Vec<u32>>,
        shared: &[u32],
        written: &mut Vec<String>,
    ) -> Result<(), String> {
        for other in self.list() {
            if assigned.contains_key(&other) {
                continue;
            }
            let file = self.dir(&other).join("cpuset.cpus");
            let Ok(have) = read(&file) else {
                continue;
            };
            if parse_list(&have).ok().as_deref() != Some(shared) {
                write(&file, &format_list(shared))?;
                written.push(format!("vm `{other}` cpuset.cpus {}", format_list(shared)));
            }
        }
        Ok(())
    }

    /// Fills the cpuset part of a VM's cgroup status and adds a drift line per
    /// difference: CPUs other than it should hold, a VMM thread outside it.
    pub fn observe(
        &self,
        vm: &str,
        dedicated: u32,
        pid: u32,
        status: &mut v1::VmCgroup,
        drift: &mut Vec<String>,
    ) {
        status.cpuset_path = self.path_of(vm);
        let assigned = self.lock();
        let own = assigned.get(vm).cloned();
        let wanted = self.wanted(&assigned, vm);
        drop(assigned);
        let dir = self.dir(vm);
        let have = match read(&dir.join("cpuset.cpus")).and_then(|t| parse_list(&t)) {
            Ok(have) => have,
            Err(error) => {
                drift.push(format!("cpuset missing: {error}"));
                return;
            }
        };
        status.cpuset_cpus = format_list(&have);
        match (dedicated, &own) {
            (0, Some(cpus)) => drift.push(format!(
                "it holds dedicated CPUs {} that its definition does not ask",
                format_list(cpus)
            )),
            (n, None) if n > 0 => {
                drift.push(format!("it has no dedicated CPUs; its definition asks {n}"))
            }
            _ => {}
        }
        if have != wanted {
            drift.push(format!(
                "cpuset.cpus is {}, {} {}",
                display(&have),
                if own.is_some() {
                    "its dedicated CPUs are"
                } else {
                    "the node's shared CPUs are"
                },
                display(&wanted)
            ));
        }
        if pid != 0 {
            // The threads first, then the members (a thread started meanwhile is not
            // listed); a thread outside is read again, as one that ended between the
            // two reads is in neither.
            let threads = thread_ids(pid);
            let members = || ids(&dir.join(if self.v2 { "cgroup.threads" } else { "tasks" }));
            let mut inside = members();
            if threads.iter().any(|tid| !inside.contains(tid)) {
                inside = members();
            }
            for tid in threads {
                if !inside.contains(&tid) && Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
                {
                    drift.push(format!(
                        "thread {} (tid {tid}) of the VMM is not in its cpuset",
                        thread_name(pid, tid)
                    ));
                }
            }
        }
    }

    /// Gives back the VM's dedicated CPUs (to the VMs that share) and removes its
    /// cpuset. Missing is fine.
    pub fn remove(&self, vm: &str) -> Result<(), String> {
        let mut assigned = self.lock();
        if assigned.remove(vm).is_some() {
            let shared = self.shared_in(&assigned);
            self.write_shared(&assigned, &shared, &mut Vec::new())?;
        }
        let dir = self.dir(vm);
        if !self.v2 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(format!("cannot remove {}: {error}", dir.display())),
            }
        }
        Ok(())
    }
}

fn display(cpus: &[u32]) -> String {
    if cpus.is_empty() {
        "none".into()
    } else {
        format_list(cpus)
    }
}

/// The thread ids of process `pid`.
pub fn thread_ids(pid: u32) -> Vec<u32> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    tids
}

/// A thread's name (`comm`: "vcpu0").
pub fn thread_name(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The CPUs a thread may run on (`Cpus_allowed_list` of its status).
pub fn thread_affinity(pid: u32, tid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))?;
    parse_list(list).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_format_as_the_kernel_writes_them() {
        assert_eq!(parse_list("0-3,5\n").unwrap(), vec![0, 1, 2, 3, 5]);
        assert_eq!(parse_list("").unwrap(), Vec::<u32>::new());
        assert_eq!(format_list(&[5, 0, 1, 2, 3, 7, 8]), "0-3,5,7-8");
        assert_eq!(format_list(&[1]), "1");
        assert!(parse_list("3-1").unwrap_err().contains("not a CPU range"));
        assert!(parse_list("x").unwrap_err().contains("not a CPU number"));
    }

    /// A fake v1 cpuset hierarchy: the files the kernel makes in a new cpuset are made
    /// by hand (empty cpus and mems).
    fn fake_v1(root: &Path, vms: &[&str]) {
        std::fs::write(root.join("cpuset.cpus"), "0-3\n").unwrap();
        std::fs::write(root.join("cpuset.mems"), "0\n").unwrap();
        let parent = root.join("cairn-n1");
        std::fs::create_dir_all(&parent).unwrap();
        for (file, value) in [("cpuset.cpus", ""), ("cpuset.mems", "")] {
            std::fs::write(parent.join(file), value).unwrap();
        }
        for vm in vms {
            let dir = parent.join(format!("vm-{vm}"));
            std::fs::create_dir_all(&dir).unwrap();
            for file in ["cpuset.cpus", "cpuset.mems", "tasks", "cgroup.procs"] {
                std::fs::write(dir.join(file), "").unwrap();
            }
        }
    }

    #[test]
    fn dedicated_cpus_are_given_kept_apart_from_the_shared_ones_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_v1(root, &["r", "r2", "o"]);
        let mount = root.display().to_string();
        let cpusets = Cpusets::v1(&mount, "/", "cairn-n1", None).unwrap();
        assert_eq!(cpusets.dedicable(), vec![1, 2, 3]);
        assert_eq!(
            std::fs::read_to_string(root.join("cairn-n1/cpuset.cpus")).unwrap(),
            "0-3"
        );
        // A VM that shares holds every CPU while nothing is dedicated.
        cpusets.ensure("o", 0, None).unwrap();
        let cpus = |vm: &str| {
            std::fs::read_to_string(root.join(format!("cairn-n1/vm-{vm}/cpuset.cpus"))).unwrap()
        };
        assert_eq!(cpus("o"), "0-3");
        // Two dedicated CPUs: the shared VM leaves them.
        let written = cpusets.ensure("r", 2, None).unwrap();
        assert_eq!(cpus("r"), "1-2");
        assert_eq!(cpus("o"), "0,3");
        assert!(
            written.contains(&"vm `o` cpuset.cpus 0,3".to_string()),
            "{written:?}"
        );
        assert_eq!(cpusets.free(), vec![3]);
        // Too few left: refused, naming who holds what.
        let error = cpusets.ensure("r2", 2, None).unwrap_err();
        assert!(
            error.contains("needs 2 dedicated CPUs, and 1 of this node's dedicable CPUs (1-3) is free (dedicated: 1-2 to vm `r`)"),
            "{error}"
        );
        // Drift: a CPU added by hand to the dedicated cpuset, and to the shared one.
        std::fs::write(root.join("cairn-n1/vm-r/cpuset.cpus"), "0-2").unwrap();
        let mut status = v1::VmCgroup::default();
        let mut drift = Vec::new();
        cpusets.observe("r", 2, 0, &mut status, &mut drift);
        assert_eq!(
            drift,
            vec!["cpuset.cpus is 0-2, its dedicated CPUs are 1-2".to_string()]
        );
        assert_eq!(status.cpuset_cpus, "0-2");
        assert_eq!(status.cpuset_path, "/cairn-n1/vm-r");
        assert_eq!(
            cpusets.ensure("r", 2, None).unwrap(),
            vec!["cpuset.cpus 1-2".to_string()]
        );
        // A restarted agent takes the dedicated CPUs back from the cpusets.
        let again = Cpusets::v1(&mount, "/", "cairn-n1", None).unwrap();
        assert_eq!(again.assigned("r"), Some(vec![1, 2]));
        assert_eq!(again.assigned("o"), None);
        // Deleting the VM gives its CPUs back to the shared VMs (the kernel's files
        // of a cgroup go with its directory; the fake's are removed first).
        for file in ["cpuset.cpus", "cpuset.mems", "tasks", "cgroup.procs"] {
            std::fs::remove_file(root.join("cairn-n1/vm-r").join(file)).unwrap();
        }
        cpusets.remove("r").unwrap();
        assert!(!root.join("cairn-n1/vm-r").exists());
        assert_eq!(cpus("o"), "0-3");
        assert_eq!(cpusets.free(), vec![1, 2, 3]);
        // A VM whose definition no longer asks gives them back in place.
        cpusets.ensure("r2", 1, None).unwrap();
        assert_eq!(cpus("o"), "0,2-3");
        cpusets.ensure("r2", 0, None).unwrap();
        assert_eq!(cpus("r2"), "0-3");
        assert_eq!(cpus("o"), "0-3");
    }

    #[test]
    fn v2_cpusets_live_in_each_vms_one_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("cairn-n1");
        std::fs::create_dir_all(&parent).unwrap();
        std::fs::write(parent.join("cpuset.cpus.effective"), "0-1\n").unwrap();
        for vm in ["r", "o"] {
            let vm_dir = parent.join(format!("vm-{vm}"));
            std::fs::create_dir_all(&vm_dir).unwrap();
            std::fs::write(vm_dir.join("cpuset.cpus"), "").unwrap();
            std::fs::write(vm_dir.join("cgroup.threads"), "").unwrap();
        }
        let cpusets = Cpusets::v2(parent.clone(), "/cairn-n1".into(), None).unwrap();
        assert!(!cpusets.separate());
        cpusets.ensure("o", 0, None).unwrap();
        cpusets.ensure("r", 1, None).unwrap();
        let cpus = |vm: &str| {
            std::fs::read_to_string(parent.join(format!("vm-{vm}/cpuset.cpus"))).unwrap()
        };
        assert_eq!((cpus("r").as_str(), cpus("o").as_str()), ("1", "0"));
        // A thread of the running VMM (this test process) outside the cgroup is drift.
        let mut status = v1::VmCgroup::default();
        let mut drift = Vec::new();
        cpusets.observe("r", 1, std::process::id(), &mut status, &mut drift);
        assert!(
            drift
                .iter()
                .any(|d| d.contains("of the VMM is not in its cpuset")),
            "{drift:?}"
        );
        // v2 removes the directory with the VM's one cgroup; the CPUs come back.
        cpusets.remove("r").unwrap();
        assert_eq!(cpus("o"), "0-1");
    }

    #[test]
    fn a_dedicated_cpu_list_must_leave_one_cpu_to_share() {
        let dir = tempfile::tempdir().unwrap();
        fake_v1(dir.path(), &[]);
        let mount = dir.path().display().to_string();
        let error = Cpusets::v1(&mount, "/", "cairn-n1", Some("0-3")).unwrap_err();
        assert!(error.contains("leaves no CPU for the host"), "{error}");
        let error = Cpusets::v1(&mount, "/", "cairn-n1", Some("2,9")).unwrap_err();
        assert!(error.contains("names CPU 9"), "{error}");
        let cpusets = Cpusets::v1(&mount, "/", "cairn-n1", Some("2-3")).unwrap();
        assert_eq!(cpusets.dedicable(), vec![2, 3]);
    }
}
