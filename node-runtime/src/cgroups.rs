//! SLA classes on the node: one cgroup per VMM process, cgroup v1 or v2.
//!
//! At start the node detects which hierarchy holds the `cpu` and `memory` controllers
//! ([`Cgroups::detect`]): cgroup v2 when its root offers both, else the v1 `cpu` and
//! `memory` hierarchies, else none (the node runs its VMs without enforcement and says
//! why in its log and in Observe). Every VM gets a cgroup of its own, `vm-NAME`, under a
//! parent named by the node, `cairn-NODE-HASH` (the node's data directory hashed:
//! several nodes, even of one name, may share one host), below the
//! agent's own cgroup in that hierarchy (or `--cgroup-parent`). The VMM is placed in it
//! between fork and exec ([`Placement`]): it never runs a guest instruction outside it.
//!
//! What each class asks ([`Settings::of`]):
//!
//! | class | CPU weight (v2; v1 cpu.shares = weight × 1024 / 100) | memory |
//! |---|---|---|
//! | reserved | 1000 per vCPU (at most 10000) | limit = size + overhead; v2 `memory.min` = limit (never reclaimed); v1 no soft limit |
//! | on-demand | 100 per vCPU | limit; v2 `memory.low` = size; v1 soft limit = size |
//! | spot | 1 (v1: 2, the least) | limit; nothing protected; v1 soft limit 0 (reclaimed first) |
//!
//! Observe reads every value back ([`Cgroups::observe`]); a value that differs is
//! drift, which [`Cgroups::ensure`] (run by a CreateVm of the same definition, and at
//! every start) writes back.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use proto::v1;

/// Memory the VMM itself needs beside the guest's: 64 MiB plus 1/32 of the guest's.
pub fn overhead_bytes(memory_bytes: u64) -> u64 {
    (64 << 20) + memory_bytes / 32
}

/// v1 reads "no limit" back as the largest page-aligned counter value.
const V1_UNLIMITED: u64 = 0x7FFF_FFFF_FFFF_F000;

/// An SLA class as the node enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlaClass {
    /// Guaranteed CPU and memory.
    Reserved,
    /// Proportional shares of what remains.
    OnDemand,
    /// The lowest shares; reclaimed and preempted first.
    Spot,
}

impl SlaClass {
    /// The class a definition names (empty: on-demand). `None` for an unknown name.
    pub fn parse(name: &str) -> Option<SlaClass> {
        match name {
            "reserved" => Some(SlaClass::Reserved),
            "" | "on-demand" => Some(SlaClass::OnDemand),
            "spot" => Some(SlaClass::Spot),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            SlaClass::Reserved => "reserved",
            SlaClass::OnDemand => "on-demand",
            SlaClass::Spot => "spot",
        }
    }
}

/// The values a VM's cgroup should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// CPU weight, cgroup v2's scale (1..=10000).
    pub cpu_weight: u64,
    /// Memory limit, bytes.
    pub memory_max: u64,
    /// v2 memory.min.
    pub memory_min: u64,
    /// v2 memory.low.
    pub memory_low: u64,
    /// v1 memory.soft_limit_in_bytes (`None`: no soft limit).
    pub soft_limit: Option<u64>,
    /// CPUs of its own (a cpuset of dedicated CPUs, `crate::cpusets`); 0: it shares
    /// the node's CPUs.
    pub dedicated_cpus: u32,
}

impl Settings {
    /// What `class` asks for a VM of `vcpus` and `memory_bytes`.
    pub fn of(class: SlaClass, vcpus: u32, memory_bytes: u64) -> Settings {
        let vcpus = u64::from(vcpus.max(1));
        let limit = memory_bytes + overhead_bytes(memory_bytes);
        match class {
            SlaClass::Reserved => Settings {
                cpu_weight: (1000 * vcpus).min(10_000),
                memory_max: limit,
                memory_min: limit,
                memory_low: 0,
                soft_limit: None,
                dedicated_cpus: 0,
            },
            SlaClass::OnDemand => Settings {
                cpu_weight: (100 * vcpus).min(10_000),
                memory_max: limit,
                memory_min: 0,
                memory_low: memory_bytes,
                soft_limit: Some(memory_bytes),
                dedicated_cpus: 0,
            },
            SlaClass::Spot => Settings {
                cpu_weight: 1,
                memory_max: limit,
                memory_min: 0,
                memory_low: 0,
                soft_limit: Some(0),
                dedicated_cpus: 0,
            },
        }
    }

    /// v1 cpu.shares for this weight (2..=262144; the least weight, spot's, is the
    /// least share, 2).
    pub fn cpu_shares(&self) -> u64 {
        if self.cpu_weight <= 1 {
            return 2;
        }
        (self.cpu_weight * 1024 / 100).clamp(2, 262_144)
    }
}

/// A VMM thread outside the cpu cgroup it belongs in ([`Cgroups::ensure`] moves it).
#[derive(Debug)]
struct MisplacedThread {
    tid: u32,
    comm: String,
    /// The cgroup it belongs in (`vm-NAME` or `svc-NAME`: [`Cgroups::service_leaf`]).
    belongs: String,
    /// That cgroup's `tasks` file.
    tasks: PathBuf,
}

impl MisplacedThread {
    /// Whether the thread still runs (any process's: `/proc/TID` names threads too).
    fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.tid)).exists()
    }
}

/// Which hierarchy the node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1: the `cpu` and `memory` hierarchies (their parent directories).
    V1 {
        /// `MOUNT/OWN/cairn-NODE` in the cpu hierarchy.
        cpu: PathBuf,
        /// The same in the memory hierarchy.
        memory: PathBuf,
    },
    /// cgroup v2: the unified hierarchy's `MOUNT/OWN/cairn-NODE`.
    V2 {
        /// The parent directory.
        parent: PathBuf,
    },
}

/// The node's cgroups: where its VMs' cgroups live.
#[derive(Debug, Clone)]
pub struct Cgroups {
    version: Version,
    /// The parent's path below the (v1: cpu) hierarchy's mount ("/cairn-lab-1").
    relative: String,
    /// v1: the parent's path below the memory hierarchy's mount, when it differs.
    memory_relative: Option<String>,
    /// Dedicated CPUs (`None`: the host has no cpuset controller the node can use;
    /// `cpuset_detail` says why).
    cpusets: Option<std::sync::Arc<crate::cpusets::Cpusets>>,
    cpuset_detail: String,
}

/// What was read back of one VM's cgroup.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// v1 cpu.shares (0 on v2).
    pub cpu_shares: u64,
    /// CPU weight (v2 cpu.weight; v1 derived from cpu.shares).
    pub cpu_weight: u64,
    /// memory.max / memory.limit_in_bytes (u64::MAX for none).
    pub memory_max: u64,
    /// v2 memory.min.
    pub memory_min: u64,
    /// v2 memory.low.
    pub memory_low: u64,
    /// v1 soft limit (u64::MAX for none).
    pub soft_limit: u64,
    /// Process ids in the cgroup (v1: the cpu hierarchy's and the memory one's).
    pub pids: Vec<u32>,
    /// v1: pids of the memory hierarchy (equal to `pids` when placed right).
    pub memory_pids: Vec<u32>,
}

/// The cgroup.procs files a VMM writes itself into between fork and exec, and (cgroup
/// v1) the `tasks` file its vCPU threads move themselves into.
#[derive(Debug, Default)]
pub struct Placement {
    /// Opened for writing (close-on-exec).
    pub procs: Vec<File>,
    /// v1: the VM's cpu cgroup's `tasks`, which the VMM inherits (`--vcpu-cgroup-fd`):
    /// each vCPU thread writes "0" there before it first runs the guest, so the class's
    /// CPU share holds the guest alone, while the process entered the VM's service cpu
    /// cgroup `svc-NAME` ([`Cgroups::service_leaf`]) through `procs`.
    pub vcpu_tasks: Option<File>,
}

impl Placement {
    /// Writes "0" (the calling process) into every file, and lets the VMM inherit the
    /// vCPU threads' `tasks` file. Only async-signal-safe calls: this runs in the child
    /// between fork and exec.
    pub fn enter(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        for file in &self.procs {
            // SAFETY: write(2) of a 1-byte static buffer to an open descriptor.
            let written = unsafe { libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(file) = &self.vcpu_tasks {
            // SAFETY: fcntl(2) clearing FD_CLOEXEC of an open descriptor.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The descriptor the VMM's vCPU threads write themselves into (the same number in
    /// the child), for `--vcpu-cgroup-fd`.
    pub fn vcpu_fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd as _;
        self.vcpu_tasks.as_ref().map(|file| file.as_raw_fd())
    }
}

/// Whether a thread of a VMM (its `comm`) runs the guest's work and so belongs in the
/// class's cpu cgroup: a vCPU (`cairn-vmm` names them `vcpuN`), or a worker KVM starts
/// in the process for the VM (`kvm-nx-lpage-recovery`, created by the first vCPU to
/// run, so in its cgroup already).
pub fn is_guest_thread(comm: &str) -> bool {
    let comm = comm.trim_end();
    comm.starts_with("kvm-")
        || comm
            .strip_prefix("vcpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The threads of process `pid`: (tid, comm). Empty when it is gone.
fn threads_of(pid: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    let mut threads: Vec<(u32, String)> = entries
        .flatten()
        .filter_map(|entry| {
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            Some((tid, comm.trim_end().to_string()))
        })
        .collect();
    threads.sort();
    threads
}

fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))
}

fn write_value(path: &Path, value: &str) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
    file.write_all(value.as_bytes())
        .map_err(|error| format!("cannot write {value} to {}: {error}", path.display()))
}

fn read_u64(path: &Path) -> Result<u64, String> {
    let text = read_text(path)?;
    let text = text.trim();
    if text == "max" {
        return Ok(u64::MAX);
    }
    text.parse()
        .map_err(|_| format!("{} holds `{text}`, not a number", path.display()))
}

/// The numbers (pids, tids) a cgroup file lists, one a line.
pub(crate) fn read_pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// A mount of `/proc/self/mounts`: mount point, type, options.
fn mounts(text: &str) -> Vec<(String, String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 4).then(|| {
                (
                    fields[1].replace("\\040", " "),
                    fields[2].to_string(),
                    fields[3].split(',').map(str::to_string).collect(),
                )
            })
        })
        .collect()
}

/// The agent's own cgroup in the v1 hierarchy of `controller` (or v2 for `None`), from
/// `/proc/self/cgroup`.
fn own_path(proc_self_cgroup: &str, controller: Option<&str>) -> String {
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let matches = match controller {
            None => controllers.is_empty(),
            Some(wanted) => controllers.split(',').any(|c| c == wanted),
        };
        if matches {
            return path.to_string();
        }
    }
    "/".into()
}

/// `zswap` and `zswapped` of a cgroup v2 `memory.stat` (`None` when it lists neither).
pub fn zswap_in_memory_stat(stat: &str) -> Option<(u64, u64)> {
    let field = |key: &str| {
        stat.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    match (field("zswap"), field("zswapped")) {
        (None, None) => None,
        (zswap, zswapped) => Some((zswap.unwrap_or(0), zswapped.unwrap_or(0))),
    }
}

/// The VMs that have a cgroup (a `vm-NAME` directory) under any of `parents`, sorted.
pub(crate) fn vm_names(parents: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = parents
        .iter()
        .filter_map(|parent| std::fs::read_dir(parent).ok())
        .flatten()
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_prefix("vm-"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

pub(crate) fn join(mount: &str, relative: &str) -> PathBuf {
    PathBuf::from(format!(
        "{}/{}",
        mount.trim_end_matches('/'),
        relative.trim_start_matches('/')
    ))
}

/// The name of a node's parent cgroup below `cairn-`: `NAME-HASH`, the hash of its
/// data directory as given (nodes of several dev clusters or tests share a host and
/// their names, lab-1; each prunes only its own parent's VM cgroups).
pub fn node_id(name: &str, data_dir: &std::ffi::OsStr) -> String {
    format!(
        "{name}-{:08x}",
        network::fnv1a(data_dir.as_encoded_bytes()) as u32
    )
}

/// The node ids ([`node_id`]) of the `cairn-node` processes running on this host, from
/// their command lines (`--name`, `--data-dir`).
pub fn live_node_ids() -> std::collections::BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter_map(|cmdline| node_id_of_cmdline(&cmdline))
        .collect()
}

/// The node id of a `cairn-node` command line (NUL-separated), if it is one.
fn node_id_of_cmdline(cmdline: &[u8]) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let program = std::path::Path::new(std::ffi::OsStr::from_bytes(args.first()?));
    if program.file_name()? != "cairn-node" {
        return None;
    }
    let value = |flag: &str| {
        let with_equals = format!("{flag}=");
        args.iter().enumerate().find_map(|(i, arg)| {
            if *arg == flag.as_bytes() {
                args.get(i + 1).copied()
            } else {
                arg.strip_prefix(with_equals.as_bytes())
            }
        })
    };
    let name = std::str::from_utf8(value("--name")?).ok()?;
    Some(node_id(
        name,
        std::ffi::OsStr::from_bytes(value("--data-dir")?),
    ))
}

/// Whether `dir` names a node parent of the node called `name`: `cairn-NAME-HASH`.
fn is_parent_of(dir: &str, name: &str) -> bool {
    dir.strip_prefix("cairn-")
        .and_then(|rest| rest.strip_prefix(name))
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hash| hash.len() == 8 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Removes `dir` and the cgroups below it, deepest first, where no process is in
/// them (rmdir only: the kernel refuses a cgroup with tasks or children). Returns
/// whether `dir` is gone.
fn remove_empty_tree(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&entry.path());
            }
        }
    }
    if !read_pids(&dir.join("cgroup.procs")).is_empty() {
        return false;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(error) => error.kind() == std::io::ErrorKind::NotFound,
    }
}

impl Cgroups {
    /// Detects the hierarchy on this host and makes the node's parent cgroup,
    /// `cairn-NODE`, below `parent` (a path below each hierarchy's mount) or else the
    /// agent's own cgroup. `Err` says why SLA classes cannot be enforced.
    /// `dedicated`: the CPUs it may dedicate to VMs (`--dedicated-cpus`; `None`: every
    /// CPU of its cpuset but the lowest).
    pub fn detect(
        node: &str,
        parent: Option<&str>,
        dedicated: Option<&str>,
    ) -> Result<Cgroups, String> {
        let mounts_text = read_text(Path::new("/proc/self/mounts"))?;
        let self_cgroup = read_text(Path::new("/proc/self/cgroup"))?;
        let mut cgroups = Self::detect_in(&mounts_text, &self_cgroup, node, parent)?;
        cgroups.detect_cpusets(&mounts_text, &self_cgroup, node, parent, dedicated);
        Ok(cgroups)
    }

    /// Sets up the node's cpusets (dedicated CPUs): in the v2 parent when cgroup v2 is
    /// used and offers `cpuset`, else in the v1 cpuset hierarchy. Where neither can be
    /// used, `cpuset_detail` says why and VMs that ask for dedicated CPUs are refused.
    pub fn detect_cpusets(
        &mut self,
        mounts_text: &str,
        self_cgroup: &str,
        node: &str,
        parent: Option<&str>,
        dedicated: Option<&str>,
    ) {
        let leaf = format!("cairn-{node}");
        let made = match &self.version {
            Version::V2 { parent: dir } => {
                let controllers = read_text(&dir.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "cpuset") {
                    crate::cpusets::Cpusets::v2(dir.clone(), self.relative.clone(), dedicated)
                } else {
                    Err(format!(
                        "cgroup v2 offers `{}` to {}, not cpuset",
                        controllers.trim(),
                        dir.display()
                    ))
                }
            }
            Version::V1 { .. } => {
                let mount = mounts(mounts_text).into_iter().find(|(_, kind, options)| {
                    kind == "cgroup" && options.iter().any(|o| o == "cpuset")
                });
                match mount {
                    Some((mount, _, _)) => {
                        let base = parent
                            .map(str::to_string)
                            .unwrap_or_else(|| own_path(self_cgroup, Some("cpuset")));
                        crate::cpusets::Cpusets::v1(&mount, &base, &leaf, dedicated)
                    }
                    None => Err("the cgroup v1 cpuset hierarchy is not mounted".into()),
                }
            }
        };
        match made {
            Ok(cpusets) => {
                self.cpuset_detail.clear();
                self.cpusets = Some(std::sync::Arc::new(cpusets));
            }
            Err(why) => {
                self.cpuset_detail = format!("no dedicated CPUs: {why}");
                self.cpusets = None;
            }
        }
    }

    /// The CPUs the node may dedicate and those of them free now (formatted lists;
    /// both empty without cpusets).
    pub fn dedicated_summary(&self) -> (String, String) {
        self.cpusets.as_ref().map_or_else(Default::default, |c| {
            (
                crate::cpusets::format_list(&c.dedicable()),
                crate::cpusets::format_list(&c.free()),
            )
        })
    }

    /// The CPUs dedicated to `vm` ("1-2"; empty: it shares).
    pub fn dedicated_to(&self, vm: &str) -> String {
        self.cpusets
            .as_ref()
            .and_then(|c| c.assigned(vm))
            .map(|cpus| crate::cpusets::format_list(&cpus))
            .unwrap_or_default()
    }

    /// [`Cgroups::detect`] from the given `/proc/self/mounts` and `/proc/self/cgroup`.
    pub fn detect_in(
        mounts_text: &str,
        self_cgroup: &str,
        node: &str,
        parent: Option<&str>,
    ) -> Result<Cgroups, String> {
        let mounts = mounts(mounts_text);
        let leaf = format!("cairn-{node}");
        let mut why_not_v2 = "cgroup2 is not mounted".to_string();
        if let Some((mount, _, _)) = mounts.iter().find(|(_, kind, _)| kind == "cgroup2") {
            let root = Path::new(mount);
            let controllers = read_text(&root.join("cgroup.controllers")).unwrap_or_default();
            let have = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if have("cpu") && have("memory") {
                let base = parent
                    .map(str::to_string)
                    .unwrap_or_else(|| own_path(self_cgroup, None));
                let relative = format!("{}/{leaf}", base.trim_end_matches('/'));
                let cgroups = Cgroups {
                    version: Version::V2 {
                        parent: join(mount, &relative),
                    },
                    relative,
                    memory_relative: None,
                    cpusets: None,
                    cpuset_detail: "no dedicated CPUs: cpusets not set up".into(),
                };
                cgroups.make_parent_v2(mount, &base)?;
                return Ok(cgroups);
            }
            why_not_v2 = format!(
                "cgroup2 at {mount} offers `{}`, not cpu and memory",
                controllers.trim()
            );
        }
        let v1 = |controller: &str| {
            mounts
                .iter()
                .find(|(_, kind, options)| {
                    kind == "cgroup" && options.iter().any(|o| o == controller)
                })
                .map(|(mount, _, _)| mount.clone())
        };
        let (Some(cpu_mount), Some(memory_mount)) = (v1("cpu"), v1("memory")) else {
            return Err(format!(
                "no cgroup hierarchy holds the cpu and memory controllers ({why_not_v2}; cgroup v1 cpu: {}, memory: {})",
                if v1("cpu").is_some() {
                    "mounted"
                } else {
                    "not mounted"
                },
                if v1("memory").is_some() {
                    "mounted"
                } else {
                    "not mounted"
                },
            ));
        };
        let base_cpu = parent
            .map(str::to_string)
            .unwrap_or_else(|| own_path(self_cgroup, Some("cpu")));
        let base_memory = parent
            .map(str::to_string)
            .unwrap_or_else(|| own_path(self_cgroup, Some("memory")));
        let cpu = join(
            &cpu_mount,
            &format!("{}/{leaf}", base_cpu.trim_end_matches('/')),
        );
        let memory = join(
            &memory_mount,
            &format!("{}/{leaf}", base_memory.trim_end_matches('/')),
        );
        for dir in [&cpu, &memory] {
            std::fs::create_dir_all(dir)
                .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        }
        Ok(Cgroups {
            relative: format!("{}/{leaf}", base_cpu.trim_end_matches('/')),
            memory_relative: (base_cpu != base_memory)
                .then(|| format!("{}/{leaf}", base_memory.trim_end_matches('/'))),
            version: Version::V1 { cpu, memory },
            cpusets: None,
            cpuset_detail: "no dedicated CPUs: cpusets not set up".into(),
        })
    }

    /// v2: makes the parent and enables cpu and memory for its children (and in every
    /// cgroup between the mount and it).
    fn make_parent_v2(&self, mount: &str, base: &str) -> Result<(), String> {
        let Version::V2 { parent } = &self.version else {
            return Ok(());
        };
        std::fs::create_dir_all(parent)
            .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
        let mut dir = PathBuf::from(mount);
        let mut chain = vec![dir.clone()];
        for part in base.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            chain.push(dir.clone());
        }
        chain.push(parent.clone());
        let offers_cpuset = read_text(&Path::new(mount).join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .any(|c| c == "cpuset");
        for dir in chain {
            let control = dir.join("cgroup.subtree_control");
            let enabled = read_text(&control).unwrap_or_default();
            let has = |c: &str| enabled.split_whitespace().any(|x| x == c);
            if has("cpu") && has("memory") && (has("cpuset") || !offers_cpuset) {
                continue;
            }
            // cpuset where the hierarchy offers it (dedicated CPUs); a failure to enable
            // it leaves cpu and memory, and the node says why it dedicates none.
            if offers_cpuset && write_value(&control, "+cpu +memory +cpuset").is_ok() {
                continue;
            }
            write_value(&control, "+cpu +memory").map_err(|error| {
                format!(
                    "{error} (a cgroup v2 cgroup that holds processes cannot enable controllers for its children: pass --cgroup-parent naming a delegated cgroup without processes)"
                )
            })?;
        }
        Ok(())
    }

    /// "v1" or "v2".
    pub fn version_name(&self) -> &'static str {
        match self.version {
            Version::V1 { .. } => "v1",
            Version::V2 { .. } => "v2",
        }
    }

    /// The version and where the parent is, for the node's log.
    pub fn describe(&self) -> String {
        let base = match &self.version {
            Version::V1 { cpu, memory } => format!(
                "cgroup v1: VM cgroups under {} and {}",
                cpu.display(),
                memory.display()
            ),
            Version::V2 { parent } => format!("cgroup v2: VM cgroups under {}", parent.display()),
        };
        match &self.cpusets {
            Some(cpusets) => format!(
                "{base}; dedicated CPUs {} (cpusets under {})",
                crate::cpusets::format_list(&cpusets.dedicable()),
                cpusets.parent_dir().display()
            ),
            None => format!("{base}; {}", self.cpuset_detail),
        }
    }

    fn leaf(vm: &str) -> String {
        format!("vm-{vm}")
    }

    /// The VM's cgroup path below the hierarchy's mount.
    pub fn path_of(&self, vm: &str) -> String {
        format!("{}/{}", self.relative, Self::leaf(vm))
    }

    /// v1: the VM's path below the memory hierarchy's mount where it differs from
    /// [`Cgroups::path_of`]; empty otherwise.
    pub fn memory_path_of(&self, vm: &str) -> String {
        self.memory_relative
            .as_ref()
            .map_or(String::new(), |relative| {
                format!("{relative}/{}", Self::leaf(vm))
            })
    }

    fn dirs(&self, vm: &str) -> Vec<PathBuf> {
        match &self.version {
            Version::V1 { cpu, memory } => {
                vec![
                    cpu.join(Self::leaf(vm)),
                    memory.join(Self::leaf(vm)),
                    cpu.join(Self::service_leaf(vm)),
                ]
            }
            Version::V2 { parent } => vec![parent.join(Self::leaf(vm))],
        }
    }

    /// Makes the VM's cgroup if needed and writes every value `settings` asks that it
    /// does not hold yet; with `pid`, moves that process in if it is not there.
    /// Returns one line per value written (nothing: it held them all).
    pub fn ensure(
        &self,
        vm: &str,
        settings: &Settings,
        pid: Option<u32>,
    ) -> Result<Vec<String>, String> {
        for dir in self.dirs(vm) {
            std::fs::create_dir_all(&dir)
                .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        }
        let observed = self.read(vm)?;
        let mut written = Vec::new();
        // v1, thread by thread: the vCPUs into the VM's cpu cgroup, the rest into the
        // VM's `svc-NAME` (a VMM an older agent placed whole is split here).
        for thread in pid.map_or_else(Vec::new, |pid| self.misplaced_threads(vm, pid)) {
            match write_value(&thread.tasks, &thread.tid.to_string()) {
                Ok(()) => written.push(format!(
                    "cpu tasks: thread {} ({}) into {}",
                    thread.tid, thread.comm, thread.belongs
                )),
                // It ended meanwhile: nothing to place.
                Err(_) if !thread.alive() => {}
                Err(error) => return Err(error),
            }
        }
        let mut set = |path: PathBuf, value: String, what: String| -> Result<(), String> {
            write_value(&path, &value)?;
            written.push(what);
            Ok(())
        };
        match &self.version {
            Version::V1 { cpu, memory } => {
                let cpu = cpu.join(Self::leaf(vm));
                let memory = memory.join(Self::leaf(vm));
                if observed.cpu_shares != settings.cpu_shares() {
                    set(
                        cpu.join("cpu.shares"),
                        settings.cpu_shares().to_string(),
                        format!("cpu.shares {}", settings.cpu_shares()),
                    )?;
                }
                if observed.memory_max != settings.memory_max {
                    set(
                        memory.join("memory.limit_in_bytes"),
                        settings.memory_max.to_string(),
                        format!("memory.limit_in_bytes {}", settings.memory_max),
                    )?;
                }
                let soft = settings.soft_limit.unwrap_or(V1_UNLIMITED);
                if observed.soft_limit != soft {
                    let value = settings
                        .soft_limit
                        .map_or("-1".to_string(), |v| v.to_string());
                    set(
                        memory.join("memory.soft_limit_in_bytes"),
                        value.clone(),
                        format!("memory.soft_limit_in_bytes {value}"),
                    )?;
                }
                if let Some(pid) = pid
                    && !observed.memory_pids.contains(&pid)
                {
                    set(
                        memory.join("cgroup.procs"),
                        pid.to_string(),
                        format!("memory cgroup.procs {pid}"),
                    )?;
                }
            }
            Version::V2 { parent } => {
                let dir = parent.join(Self::leaf(vm));
                if observed.cpu_weight != settings.cpu_weight {
                    set(
                        dir.join("cpu.weight"),
                        settings.cpu_weight.to_string(),
                        format!("cpu.weight {}", settings.cpu_weight),
                    )?;
                }
                if observed.memory_max != settings.memory_max {
                    set(
                        dir.join("memory.max"),
                        settings.memory_max.to_string(),
                        format!("memory.max {}", settings.memory_max),
                    )?;
                }
                if observed.memory_min != settings.memory_min {
                    set(
                        dir.join("memory.min"),
                        settings.memory_min.to_string(),
                        format!("memory.min {}", settings.memory_min),
                    )?;
                }
                if observed.memory_low != settings.memory_low {
                    set(
                        dir.join("memory.low"),
                        settings.memory_low.to_string(),
                        format!("memory.low {}", settings.memory_low),
                    )?;
                }
                if let Some(pid) = pid
                    && !observed.pids.contains(&pid)
                {
                    set(
                        dir.join("cgroup.procs"),
                        pid.to_string(),
                        format!("cgroup.procs {pid}"),
                    )?;
                }
            }
        }
        match &self.cpusets {
            Some(cpusets) => written.extend(cpusets.ensure(vm, settings.dedicated_cpus, pid)?),
            None if settings.dedicated_cpus > 0 => {
                return Err(format!(
                    "it asks for {} dedicated CPUs, and this node has none to give ({})",
                    settings.dedicated_cpus, self.cpuset_detail
                ));
            }
            None => {}
        }
        Ok(written)
    }

    /// cgroup v1: the cpu cgroup, beside the VM's `vm-NAME`, of every thread of its VMM
    /// but the guest's (control socket, device I/O, migration, fault tolerance), with
    /// the default share: one ordinary process's. The class's share then holds the
    /// guest alone: a spot VM's guest gets the least (2 against 1024), and when every
    /// thread shared it, its control thread could not answer a restarted agent's
    /// identity handshake beside three busy loops and the agent killed the VM (session
    /// 14's CI run). Per VM, not one per node: a group's CPU weight is spread over the
    /// CPUs by where its load is, so one shared group weighed next to nothing on a
    /// reserved VM's dedicated CPU, beside its burning guest (libvirt splits a VM's
    /// emulator and vCPU threads the same way, inside the VM's share).
    fn service_leaf(vm: &str) -> String {
        format!("svc-{vm}")
    }

    /// Opens the cgroup files a VMM enters between fork and exec: v1 the VM's service
    /// cpu cgroup (`svc-NAME`) and its memory one, with the VM's cpu `tasks` for
    /// its vCPU threads; v2 the VM's cgroup. Then the VM's cpuset, where it has one.
    pub fn placement(&self, vm: &str) -> Result<Placement, String> {
        let open = |path: PathBuf| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|error| format!("cannot open {}: {error}", path.display()))
        };
        let (mut dirs, vcpu_tasks) = match &self.version {
            Version::V1 { cpu, memory } => (
                vec![
                    cpu.join(Self::service_leaf(vm)),
                    memory.join(Self::leaf(vm)),
                ],
                Some(open(cpu.join(Self::leaf(vm)).join("tasks"))?),
            ),
            Version::V2 { .. } => (self.dirs(vm), None),
        };
        if let Some(cpusets) = self.cpusets.as_ref().filter(|c| c.separate()) {
            dirs.push(cpusets.dir(vm));
        }
        let procs = dirs
            .into_iter()
            .map(|dir| open(dir.join("cgroup.procs")))
            .collect::<Result<_, _>>()?;
        Ok(Placement { procs, vcpu_tasks })
    }

    /// v1: the threads of VMM `pid` outside the cpu cgroup they belong in (its vCPUs in
    /// the VM's, the others in its `svc-NAME`). Empty on v2.
    fn misplaced_threads(&self, vm: &str, pid: u32) -> Vec<MisplacedThread> {
        // A vCPU thread is born in the VMM's service cgroup and writes itself into the
        // VM's before its first KVM_RUN; an FT primary starts new vCPU threads after
        // every checkpoint (every 30 ms). One caught in that moment is not misplaced:
        // only what is outside at each of four looks, 5 ms apart, is (a VMM whose
        // threads are misplaced for good is outside at every look, whichever threads).
        let mut misplaced = self.misplaced_now(vm, pid);
        for _ in 0..3 {
            if misplaced.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            misplaced = self.misplaced_now(vm, pid);
        }
        misplaced
    }

    /// [`Self::misplaced_threads`], one look.
    fn misplaced_now(&self, vm: &str, pid: u32) -> Vec<MisplacedThread> {
        let Version::V1 { cpu, .. } = &self.version else {
            return vec![];
        };
        let leaf = Self::leaf(vm);
        let service = Self::service_leaf(vm);
        // The threads first, then the cgroups' members: a thread the VMM starts
        // meanwhile (a control connection's, say, while this node asks the VMM its
        // status) is not listed, rather than listed and not yet seen in its cgroup.
        let threads = threads_of(pid);
        let in_vm = read_pids(&cpu.join(&leaf).join("tasks"));
        let in_service = read_pids(&cpu.join(&service).join("tasks"));
        threads
            .into_iter()
            .filter_map(|(tid, comm)| {
                let (members, belongs) = if is_guest_thread(&comm) {
                    (&in_vm, &leaf)
                } else {
                    (&in_service, &service)
                };
                // A thread that ended between the two reads is in neither: only a
                // live one is misplaced (the next look tells the rest).
                (!members.contains(&tid) && Path::new(&format!("/proc/{pid}/task/{tid}")).exists())
                    .then(|| MisplacedThread {
                        tid,
                        comm,
                        tasks: cpu.join(belongs).join("tasks"),
                        belongs: belongs.clone(),
                    })
            })
            .collect()
    }

    /// Reads the VM's cgroup back.
    pub fn read(&self, vm: &str) -> Result<Observed, String> {
        match &self.version {
            Version::V1 { cpu, memory } => {
                let cpu = cpu.join(Self::leaf(vm));
                let memory = memory.join(Self::leaf(vm));
                let shares = read_u64(&cpu.join("cpu.shares"))?;
                Ok(Observed {
                    cpu_shares: shares,
                    cpu_weight: (shares * 100).div_ceil(1024).clamp(1, 10_000),
                    memory_max: read_u64(&memory.join("memory.limit_in_bytes"))?,
                    memory_min: 0,
                    memory_low: 0,
                    soft_limit: read_u64(&memory.join("memory.soft_limit_in_bytes"))?,
                    pids: read_pids(&cpu.join("cgroup.procs")),
                    memory_pids: read_pids(&memory.join("cgroup.procs")),
                })
            }
            Version::V2 { parent } => {
                let dir = parent.join(Self::leaf(vm));
                let pids = read_pids(&dir.join("cgroup.procs"));
                Ok(Observed {
                    cpu_shares: 0,
                    cpu_weight: read_u64(&dir.join("cpu.weight"))?,
                    memory_max: read_u64(&dir.join("memory.max"))?,
                    memory_min: read_u64(&dir.join("memory.min"))?,
                    memory_low: read_u64(&dir.join("memory.low"))?,
                    soft_limit: 0,
                    memory_pids: pids.clone(),
                    pids,
                })
            }
        }
    }

    /// The VM's cgroup for Observe: the values read back, whether `pid` (its running
    /// VMM, 0: none) is in it, and one drift line per value that is not what
    /// `settings` asks.
    pub fn observe(&self, vm: &str, settings: &Settings, pid: u32) -> v1::VmCgroup {
        let mut status = v1::VmCgroup {
            version: self.version_name().into(),
            path: self.path_of(vm),
            memory_path: self.memory_path_of(vm),
            ..Default::default()
        };
        let observed = match self.read(vm) {
            Ok(observed) => observed,
            Err(error) => {
                status.detail = error.clone();
                status.drift.push(format!("cgroup missing: {error}"));
                return status;
            }
        };
        let mut drift = Vec::new();
        let mut differs = |name: &str, have: u64, want: u64| {
            if have != want {
                drift.push(format!("{name} is {have}, the class asks {want}"));
            }
        };
        match self.version {
            Version::V1 { .. } => {
                differs("cpu.shares", observed.cpu_shares, settings.cpu_shares());
                differs(
                    "memory.limit_in_bytes",
                    observed.memory_max,
                    settings.memory_max,
                );
                differs(
                    "memory.soft_limit_in_bytes",
                    observed.soft_limit,
                    settings.soft_limit.unwrap_or(V1_UNLIMITED),
                );
            }
            Version::V2 { .. } => {
                differs("cpu.weight", observed.cpu_weight, settings.cpu_weight);
                differs("memory.max", observed.memory_max, settings.memory_max);
                differs("memory.min", observed.memory_min, settings.memory_min);
                differs("memory.low", observed.memory_low, settings.memory_low);
            }
        }
        match self.version {
            Version::V1 { .. } if pid != 0 => {
                let misplaced = self.misplaced_threads(vm, pid);
                status.holds_vmm = observed.memory_pids.contains(&pid) && misplaced.is_empty();
                if !observed.memory_pids.contains(&pid) {
                    drift.push(format!("the VMM (pid {pid}) is not in the memory cgroup"));
                }
                drift.extend(misplaced.into_iter().map(|thread| {
                    format!(
                        "the VMM's thread {} ({}) is not in the cpu cgroup {}",
                        thread.tid, thread.comm, thread.belongs
                    )
                }));
            }
            _ => {
                status.holds_vmm =
                    pid != 0 && observed.pids.contains(&pid) && observed.memory_pids.contains(&pid);
                if pid != 0 && !status.holds_vmm {
                    drift.push(format!("the VMM (pid {pid}) is not in the cgroup"));
                }
            }
        }
        if let Some(cpusets) = &self.cpusets {
            cpusets.observe(vm, settings.dedicated_cpus, pid, &mut status, &mut drift);
        } else if settings.dedicated_cpus > 0 {
            drift.push(format!(
                "it has no dedicated CPUs; its definition asks {} ({})",
                settings.dedicated_cpus, self.cpuset_detail
            ));
        }
        status.cpu_shares = observed.cpu_shares;
        status.cpu_weight = observed.cpu_weight;
        status.memory_max_bytes = if observed.memory_max >= V1_UNLIMITED {
            0
        } else {
            observed.memory_max
        };
        status.memory_min_bytes = observed.memory_min;
        status.memory_low_bytes = observed.memory_low;
        status.memory_soft_limit_bytes = observed.soft_limit;
        status.drift = drift;
        status
    }

    /// cgroup v2: the VM's zswap (`memory.stat` `zswap`, the compressed bytes of its
    /// pages in the pool, and `zswapped`, those pages uncompressed). `None` on v1, which
    /// does not count zswap per cgroup, and where the kernel does not list them.
    pub fn zswap_of(&self, vm: &str) -> Option<(u64, u64)> {
        let Version::V2 { parent } = &self.version else {
            return None;
        };
        let stat = std::fs::read_to_string(parent.join(Self::leaf(vm)).join("memory.stat")).ok()?;
        zswap_in_memory_stat(&stat)
    }

    /// Removes the VM's cgroup (its VMM has ended), giving back its dedicated CPUs.
    /// Missing is fine.
    pub fn remove(&self, vm: &str) -> Result<(), String> {
        if let Some(cpusets) = &self.cpusets {
            cpusets.remove(vm)?;
        }
        for dir in self.dirs(vm) {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(format!("cannot remove {}: {error}", dir.display())),
            }
        }
        Ok(())
    }

    /// The node's parent directories: v1 cpu, memory and (when it has one) cpuset;
    /// v2 the one parent.
    pub fn parents(&self) -> Vec<PathBuf> {
        let mut parents = match &self.version {
            Version::V1 { cpu, memory } => vec![cpu.clone(), memory.clone()],
            Version::V2 { parent } => vec![parent.clone()],
        };
        if let Some(cpusets) = self.cpusets.as_ref().filter(|c| c.separate()) {
            parents.push(cpusets.parent_dir().to_path_buf());
        }
        parents.dedup();
        parents
    }

    /// Whether no process is in any of the VM's cgroups.
    fn vm_is_empty(&self, vm: &str) -> bool {
        let mut dirs = self.dirs(vm);
        if let Some(cpusets) = self.cpusets.as_ref().filter(|c| c.separate()) {
            dirs.push(cpusets.dir(vm));
        }
        dirs.iter()
            .all(|dir| read_pids(&dir.join("cgroup.procs")).is_empty())
    }

    /// At a clean exit: removes the cgroups of the VMs no process runs in, then the
    /// node's parents where they are empty. A VMM that outlives the agent (to be
    /// adopted by the next one) keeps its cgroup, its dedicated CPUs and so the
    /// parent. Returns one line per parent: removed, or why it stays.
    pub fn remove_on_exit(&self) -> Vec<String> {
        let vms = self.list();
        let running: Vec<&String> = vms.iter().filter(|vm| !self.vm_is_empty(vm)).collect();
        for vm in vms.iter().filter(|vm| !running.contains(vm)) {
            let _ = self.remove(vm);
        }
        self.parents()
            .into_iter()
            .map(|parent| match std::fs::remove_dir(&parent) {
                Ok(()) => format!("removed its cgroup {}", parent.display()),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    format!("its cgroup {} was gone", parent.display())
                }
                Err(error) => format!(
                    "its cgroup {} stays ({error}): {} VM(s) still run in it{}",
                    parent.display(),
                    running.len(),
                    if running.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " ({})",
                            running
                                .iter()
                                .map(|v| v.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                ),
            })
            .collect()
    }

    /// At start: removes the parents of earlier nodes of this node's name (`cairn-NAME-*`
    /// beside its own, in every hierarchy it uses) that no running `cairn-node` owns
    /// (`live`: [`live_node_ids`]) and no process is in: nodes killed before their
    /// exit (kill -9, a crash, a test's end) leave them. Returns the directories
    /// removed.
    pub fn remove_stale_parents(
        &self,
        name: &str,
        live: &std::collections::BTreeSet<String>,
    ) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for parent in self.parents() {
            let Some(beside) = parent.parent() else {
                continue;
            };
            let Ok(entries) = std::fs::read_dir(beside) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(dir) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if path == parent
                    || !is_parent_of(&dir, name)
                    || live.contains(&dir["cairn-".len()..])
                    || !entry.file_type().is_ok_and(|t| t.is_dir())
                {
                    continue;
                }
                if remove_empty_tree(&path) {
                    removed.push(path);
                }
            }
        }
        removed
    }

    /// The VMs that have a cgroup under the node's parent (any hierarchy).
    pub fn list(&self) -> Vec<String> {
        vm_names(&self.parents())
    }

    /// Whether the VM's cgroup exists (any of its directories).
    pub fn exists(&self, vm: &str) -> bool {
        self.dirs(vm).iter().any(|dir| dir.exists())
            || self
                .cpusets
                .as_ref()
                .is_some_and(|c| c.separate() && c.dir(vm).exists())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_ask_for_different_weights_and_protection() {
        let reserved = Settings::of(SlaClass::Reserved, 2, 256 << 20);
        let on_demand = Settings::of(SlaClass::OnDemand, 2, 256 << 20);
        let spot = Settings::of(SlaClass::Spot, 2, 256 << 20);
        assert_eq!(reserved.cpu_weight, 2000);
        assert_eq!(reserved.cpu_shares(), 20480);
        assert_eq!(on_demand.cpu_shares(), 2048);
        assert_eq!(spot.cpu_shares(), 2);
        assert_eq!(reserved.memory_min, reserved.memory_max);
        assert_eq!(reserved.memory_max, (256 << 20) + (64 << 20) + (8 << 20));
        assert_eq!(spot.memory_min + spot.memory_low, 0);
        assert_eq!(spot.soft_limit, Some(0));
        assert_eq!(reserved.soft_limit, None);
        assert_eq!(
            Settings::of(SlaClass::Reserved, 64, 1 << 30).cpu_weight,
            10_000
        );
        assert_eq!(SlaClass::parse(""), Some(SlaClass::OnDemand));
        assert_eq!(SlaClass::parse("gold"), None);
    }

    #[test]
    fn vcpus_and_kvms_own_workers_are_the_guests_threads() {
        for comm in ["vcpu0", "vcpu15", "vcpu3\n", "kvm-nx-lpage-re"] {
            assert!(is_guest_thread(comm), "{comm}");
        }
        for comm in ["vcpu", "vcpux", "control", "net0-rx", "cairn-vmm", "vcpu-1"] {
            assert!(!is_guest_thread(comm), "{comm}");
        }
    }

    #[test]
    fn v1_is_chosen_when_cgroup2_lacks_the_controllers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["unified", "cpu", "memory"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::write(root.join("unified/cgroup.controllers"), "pids\n").unwrap();
        let mounts = format!(
            "cgroup2 {r}/unified cgroup2 rw 0 0\ncgroup {r}/cpu cgroup rw,relatime,cpu 0 0\ncgroup {r}/memory cgroup rw,memory 0 0\n",
            r = root.display()
        );
        let self_cgroup = "4:memory:/sandbox/x\n1:cpu:/\n0::/\n";
        let cgroups = Cgroups::detect_in(&mounts, self_cgroup, "lab-1", None).unwrap();
        assert_eq!(cgroups.version_name(), "v1");
        assert!(root.join("cpu/cairn-lab-1").is_dir());
        assert!(root.join("memory/sandbox/x/cairn-lab-1").is_dir());
        // No cgroup at all: why.
        let error =
            Cgroups::detect_in("proc /proc proc rw 0 0\n", self_cgroup, "lab-1", None).unwrap_err();
        assert!(error.contains("cgroup2 is not mounted"), "{error}");
    }

    #[test]
    fn v2_values_are_written_read_back_and_drift_is_named() {
        // A fake unified hierarchy: files the kernel would create are made by hand.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let mounts = format!("cgroup2 {} cgroup2 rw 0 0\n", root.display());
        std::fs::create_dir_all(root.join("cairn-n1")).unwrap();
        std::fs::write(root.join("cairn-n1/cgroup.subtree_control"), "").unwrap();
        let cgroups = Cgroups::detect_in(&mounts, "0::/\n", "n1", None).unwrap();
        assert_eq!(cgroups.version_name(), "v2");
        let vm = root.join("cairn-n1/vm-db");
        std::fs::create_dir_all(&vm).unwrap();
        for (file, value) in [
            ("cpu.weight", "100"),
            ("memory.max", "max"),
            ("memory.min", "0"),
            ("memory.low", "0"),
            ("cgroup.procs", ""),
        ] {
            std::fs::write(vm.join(file), value).unwrap();
        }
        let settings = Settings::of(SlaClass::Reserved, 1, 128 << 20);
        let before = cgroups.observe("db", &settings, 0);
        assert_eq!(before.drift.len(), 3, "{:?}", before.drift);
        let written = cgroups.ensure("db", &settings, None).unwrap();
        assert_eq!(written.len(), 3, "{written:?}");
        let after = cgroups.observe("db", &settings, 0);
        assert!(after.drift.is_empty(), "{:?}", after.drift);
        assert_eq!(after.cpu_weight, 1000);
        assert_eq!(after.memory_min_bytes, settings.memory_max);
        assert_eq!(after.path, "/cairn-n1/vm-db");
        assert!(cgroups.ensure("db", &settings, None).unwrap().is_empty());
        std::fs::write(vm.join("cpu.weight"), "50").unwrap();
        let drifted = cgroups.observe("db", &settings, 0);
        assert_eq!(
            drifted.drift,
            vec!["cpu.weight is 50, the class asks 1000".to_string()]
        );
        assert_eq!(
            std::fs::read_to_string(root.join("cairn-n1/cgroup.subtree_control")).unwrap(),
            "+cpu +memory +cpuset"
        );
    }
}
