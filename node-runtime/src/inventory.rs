//! What the node is made of and what its kernel offers, read from /proc, /sys and
//! a few probing system calls. Nothing here changes the system.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::v1::{Cpu, Disk, KernelCapabilities, Memory, Nic};

/// How long a probed answer about the host is kept ([`kept`]): what a probe finds
/// changes only with a sysctl, a module loaded or a reboot, and probing costs. A
/// network namespace made and torn down (sysctl tables, /proc entries, the kernel's
/// netns cleanup) and /proc/cpuinfo read in full on every GetInventory were most of a
/// first observation of 10,000 simulated nodes (10-12 s, against 3.3 s for the same
/// calls at another moment); a real node's inventory is asked at every new connection.
pub const PROBE_FRESH: Duration = Duration::from_secs(60);

/// `probe()`'s answer, from `cache` when it is younger than [`PROBE_FRESH`].
fn kept<T: Clone>(cache: &Mutex<Option<(Instant, T)>>, probe: impl FnOnce() -> T) -> T {
    let mut cached = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((at, answer)) = cached.as_ref()
        && at.elapsed() < PROBE_FRESH
    {
        return answer.clone();
    }
    let answer = probe();
    *cached = Some((Instant::now(), answer.clone()));
    answer
}

/// CPU threads, model and virtualisation flags from /proc/cpuinfo (read at most once
/// per [`PROBE_FRESH`]).
pub fn cpu() -> Cpu {
    static CPU: Mutex<Option<(Instant, Cpu)>> = Mutex::new(None);
    kept(&CPU, read_cpu)
}

fn read_cpu() -> Cpu {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut model = String::new();
    let mut flags: Vec<String> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "model name" if model.is_empty() => model = value.trim().to_string(),
            "flags" if flags.is_empty() => {
                flags = value
                    .split_whitespace()
                    .filter(|flag| matches!(*flag, "vmx" | "svm" | "hypervisor" | "ept" | "npt"))
                    .map(str::to_string)
                    .collect();
            }
            _ => {}
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Cpu {
        threads,
        model,
        virtualization_flags: flags,
    }
}

/// A field of /proc/meminfo's text (`key` without its colon) in bytes; `None` when
/// the kernel does not list it.
pub fn meminfo_bytes(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
}

/// Total and available memory from /proc/meminfo.
pub fn memory() -> Memory {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Memory {
        total_bytes: meminfo_bytes(&text, "MemTotal").unwrap_or(0),
        available_bytes: meminfo_bytes(&text, "MemAvailable").unwrap_or(0),
    }
}

/// Total and free bytes of the filesystem holding `path`.
pub fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero bytes are a valid `statvfs` (plain integers).
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call and `stats`
    // is a valid, writable `statvfs`.
    let result = unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) };
    if result != 0 {
        return None;
    }
    let block = stats.f_frsize;
    Some((stats.f_blocks * block, stats.f_bavail * block))
}

/// The node's disks: its data directory's filesystem (where volumes live).
pub fn disks(data_dir: &Path) -> Vec<Disk> {
    let (total_bytes, free_bytes) = filesystem_space(data_dir).unwrap_or((0, 0));
    vec![Disk {
        name: "data-dir".into(),
        path: data_dir.display().to_string(),
        total_bytes,
        free_bytes,
    }]
}

fn read_trimmed(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .unwrap_or_default()
}

/// Network interfaces from /sys/class/net.
pub fn nics() -> Vec<Nic> {
    let mut nics: Vec<Nic> = std::fs::read_dir("/sys/class/net")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let base = entry.path();
                    Nic {
                        mac: read_trimmed(base.join("address")),
                        // `speed` reads -1 or fails for virtual links; report 0 then.
                        speed_mbps: read_trimmed(base.join("speed")).parse::<u64>().unwrap_or(0),
                        mtu: read_trimmed(base.join("mtu")).parse().unwrap_or(0),
                        oper_state: read_trimmed(base.join("operstate")),
                        name,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// [`io_uring_available`], kept for [`PROBE_FRESH`].
static IO_URING: Mutex<Option<(Instant, bool)>> = Mutex::new(None);
/// [`network_namespaces_available`], kept for [`PROBE_FRESH`].
static NETWORK_NAMESPACES: Mutex<Option<(Instant, bool)>> = Mutex::new(None);

fn io_uring_available() -> bool {
    // SAFETY: all-zero bytes are valid io_uring_params (plain integers).
    let mut params: [u8; 120] = [0; 120];
    // SAFETY: io_uring_setup reads and writes at most sizeof(struct io_uring_params)
    // (120 bytes) at the pointer, which points to a 120-byte buffer we own.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is a descriptor the kernel just returned to us and nobody else owns.
    unsafe { libc::close(fd as libc::c_int) };
    true
}

fn network_namespaces_available() -> bool {
    if !Path::new("/proc/self/ns/net").exists() {
        return false;
    }
    // unshare(CLONE_NEWNET) in a short-lived thread: the new namespace belongs to that
    // thread only and disappears with it, so the node's own sockets are untouched.
    std::thread::spawn(|| {
        // SAFETY: unshare takes a flag word and touches only the calling thread's namespaces.
        unsafe { libc::unshare(libc::CLONE_NEWNET) == 0 }
    })
    .join()
    .unwrap_or(false)
}

fn cgroups() -> (Vec<String>, bool, Vec<String>) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut v1: Vec<String> = Vec::new();
    let mut v2 = false;
    let mut v2_path = String::new();
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 {
            continue;
        }
        match fields[2] {
            "cgroup" => {
                for option in fields[3].split(',') {
                    if matches!(
                        option,
                        "cpu"
                            | "cpuacct"
                            | "memory"
                            | "cpuset"
                            | "blkio"
                            | "io"
                            | "pids"
                            | "devices"
                            | "freezer"
                    ) {
                        v1.push(option.to_string());
                    }
                }
            }
            "cgroup2" => {
                v2 = true;
                v2_path = fields[1].to_string();
            }
            _ => {}
        }
    }
    v1.sort();
    v1.dedup();
    let v2_controllers = if v2 {
        read_trimmed(Path::new(&v2_path).join("cgroup.controllers"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    } else {
        Vec::new()
    };
    (v1, v2, v2_controllers)
}

/// Whether the Linux bonding driver works in `netns` (the `network` crate probes by
/// creating and deleting a bond device).
pub fn bonding_available(netns: &network::NetNs) -> bool {
    network::detect_bonding(netns)
        .is_ok_and(|capability| capability.backend == network::BondBackend::KernelBond)
}

/// Network interfaces of a named namespace, over netlink (sysfs shows only the
/// agent's own namespace). Link speed is not available this way and reads 0.
pub fn nics_in(netns: &network::NetNs) -> Vec<Nic> {
    let Ok(mut rtnl) = network::nl::Rtnl::open(netns) else {
        return Vec::new();
    };
    let mut nics: Vec<Nic> = rtnl
        .links()
        .unwrap_or_default()
        .into_iter()
        .map(|link| Nic {
            mac: link
                .mac
                .map(|mac| {
                    mac.iter()
                        .map(|byte| format!("{byte:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                })
                .unwrap_or_default(),
            speed_mbps: 0,
            mtu: link.mtu,
            oper_state: if link.is_live() { "up" } else { "down" }.to_string(),
            name: link.name,
        })
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// What the kernel offers; bonding is probed in `netns` unless `probe_bonding` is
/// false (a node whose network actions are refused never touches the network, not
/// even with a probe device) and then reads false.
pub fn kernel(netns: &network::NetNs, probe_bonding: bool) -> KernelCapabilities {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let kvm_pvm = Path::new("/sys/module/kvm_pvm").exists();
    let (cgroup_v1_controllers, cgroup_v2, cgroup_v2_controllers) = cgroups();
    KernelCapabilities {
        kernel_release: read_trimmed("/proc/sys/kernel/osrelease"),
        kvm,
        kvm_pvm,
        io_uring: kept(&IO_URING, io_uring_available),
        network_namespaces: kept(&NETWORK_NAMESPACES, network_namespaces_available),
        cgroup_v1_controllers,
        cgroup_v2,
        cgroup_v2_controllers,
        bonding: probe_bonding && bonding_available(netns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_runs_once_while_its_answer_is_fresh_and_again_after() {
        let cache = Mutex::new(None);
        let mut runs = 0;
        for _ in 0..3 {
            assert!(kept(&cache, || {
                runs += 1;
                true
            }));
        }
        assert_eq!(runs, 1);
        // An answer older than PROBE_FRESH is probed again.
        let Some(old) = Instant::now().checked_sub(PROBE_FRESH + Duration::from_secs(1)) else {
            return;
        };
        *cache.lock().unwrap() = Some((old, false));
        assert!(kept(&cache, || {
            runs += 1;
            true
        }));
        assert_eq!(runs, 2);
    }
}
