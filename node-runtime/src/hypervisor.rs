//! The hypervisor seam: how the node launches, asks, fences and signals a VM's VMM.
//!
//! [`Vms`](crate::vms::Vms) decides everything about a VM (its states, records, disk
//! servers, start timeout, supervision); a [`Hypervisor`] only carries out the four
//! things that touch a VMM. [`ProcessHypervisor`] is the real one: a `cairn-vmm`
//! process per VM (KVM), reached over its control socket, signalled by pid. The
//! simulator (`crate::simulate`, `cairn-node --simulate N`) puts a simulated
//! hypervisor behind the same calls, as cloud-hypervisor keeps KVM and MSHV behind its
//! `Hypervisor` and `Vm` traits: the service code above does not know which it runs on.

use std::fmt::Debug;
use std::future::Future;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use network::NetNs;
use tonic::Status;

/// How a VMM ended: its exit status as text, and whether it exited 0.
pub type Exit = Pin<Box<dyn Future<Output = (String, bool)> + Send + 'static>>;

/// A VMM launched by [`Hypervisor::launch`].
pub struct Launched {
    /// Its process id (for a simulated VMM, a number no Linux process can have).
    pub pid: u32,
    /// Resolves when it ends.
    pub exit: Exit,
}

impl Debug for Launched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launched").field("pid", &self.pid).finish()
    }
}

/// What a running VMM reports of itself (its `status` over the control socket).
#[derive(Debug, Clone, PartialEq)]
pub struct VmmStatus {
    /// vCPUs it runs.
    pub vcpus: u32,
    /// Guest memory it runs.
    pub memory_bytes: u64,
    /// Guest heartbeats so far.
    pub total: u64,
    /// Age of the last heartbeat.
    pub age_ms: Option<f64>,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
    /// Its NICs.
    pub nics: Vec<vmm::control::NicStatus>,
    /// Its virtio-blk devices.
    pub disks: Vec<vmm::control::BlockStatus>,
    /// The guest's own disk counters.
    pub guest_disks: Vec<vmm::control::GuestDiskCounters>,
    /// The built-in guest's block self-test result.
    pub block_test: Option<String>,
    /// Self-tests run.
    pub block_tests: u64,
    /// The self-test's checksum.
    pub block_checksum: u64,
    /// Boots of the guest in this process (1 after a start; a reboot adds one).
    pub boot_count: u64,
    /// Fault tolerance, when this VMM is or was one side of a pair.
    pub ft: Option<vmm::control::wire::FtStatus>,
}

/// The operations of a hypervisor backend. Blocking methods are called off the async
/// runtime (`spawn_blocking`).
pub trait Hypervisor: Send + Sync + Debug {
    /// Why VMs cannot be started on this node, if they cannot (no VMM binary, no
    /// `/dev/kvm`).
    fn unavailable(&self) -> Option<String>;

    /// Launches the VMM of `config` (its run directory `vm_dir`); with `netns` it runs
    /// in that network namespace (where its taps are); with `placement` it enters the
    /// VM's cgroup before it runs (between fork and exec).
    fn launch(
        &self,
        config: &vm_config::VmConfig,
        vm_dir: &Path,
        netns: Option<&NetNs>,
        placement: Option<crate::cgroups::Placement>,
    ) -> Result<Launched, Status>;

    /// Asks the VMM behind `socket` for its status; `None` when it does not answer
    /// within `timeout`. Blocking.
    fn status(&self, socket: &Path, timeout: Duration) -> Option<VmmStatus>;

    /// Sets the fence deadline of the VMM behind `socket` (0 disarms). Blocking.
    fn set_fence(&self, socket: &Path, deadline_boottime_ns: u64) -> Result<(), String>;

    /// Sends `signal` (`SIGTERM`, `SIGKILL`) to the VMM with process id `pid`.
    fn signal(&self, pid: u32, signal: libc::c_int);

    /// Whether a VM's volumes are served to its VMM (NBD servers, one per disk). A
    /// simulated VMM reads no disk: none are started for it.
    fn serves_disks(&self) -> bool {
        true
    }

    /// Whether [`Hypervisor::status`] blocks (asks a VMM over its socket): callers
    /// then run it on tokio's blocking pool. A simulated hypervisor answers from
    /// memory, so it runs inline (at 10,000 simulated nodes the hand-offs to the pool
    /// were a quarter of a simulator's Observe).
    fn blocks(&self) -> bool {
        true
    }

    /// Launches the VMM of `config` as a live migration's destination listening on
    /// `listen` (`cairn-vmm --incoming`; see [`Hypervisor::launch`] for the rest).
    /// A hypervisor that cannot migrate refuses.
    fn launch_incoming(
        &self,
        config: &vm_config::VmConfig,
        vm_dir: &Path,
        netns: Option<&NetNs>,
        placement: Option<crate::cgroups::Placement>,
        listen: &str,
    ) -> Result<Launched, Status> {
        let _ = (config, vm_dir, netns, placement, listen);
        Err(Status::failed_precondition(
            "this node's hypervisor cannot migrate VMs live",
        ))
    }

    /// Launches the VMM of `config` as a fault-tolerant VM's secondary receiving
    /// checkpoints on `listen` (`cairn-vmm --ft-secondary`; see [`Hypervisor::launch`]
    /// for the rest). A hypervisor that cannot checkpoint refuses.
    fn launch_ft_secondary(
        &self,
        config: &vm_config::VmConfig,
        vm_dir: &Path,
        netns: Option<&NetNs>,
        placement: Option<crate::cgroups::Placement>,
        listen: &str,
    ) -> Result<Launched, Status> {
        let _ = (config, vm_dir, netns, placement, listen);
        Err(Status::failed_precondition(
            "this node's hypervisor cannot run fault-tolerant VMs",
        ))
    }
}

/// The real hypervisor: one `cairn-vmm` process per VM on KVM.
#[derive(Debug, Clone)]
pub struct ProcessHypervisor {
    /// The `cairn-vmm` binary (`None`: not found; starts are refused saying so).
    pub binary: Option<PathBuf>,
    /// Each VMM in a process group of its own (not the agent's).
    pub own_process_group: bool,
}

impl ProcessHypervisor {
    /// Spawns `cairn-vmm` for `config` (with `peer` = `("--incoming", ADDR)` for a
    /// migration's destination, `("--ft-secondary", ADDR)` for a fault-tolerance
    /// secondary).
    fn spawn_vmm(
        &self,
        config: &vm_config::VmConfig,
        vm_dir: &Path,
        netns: Option<&NetNs>,
        placement: Option<crate::cgroups::Placement>,
        peer: Option<(&str, &str)>,
    ) -> Result<Launched, Status> {
        let Some(binary) = &self.binary else {
            return Err(Status::failed_precondition(
                self.unavailable().unwrap_or_default(),
            ));
        };
        std::fs::create_dir_all(vm_dir).map_err(|error| {
            Status::internal(format!("cannot create {}: {error}", vm_dir.display()))
        })?;
        let config_path = vm_dir.join(crate::vms::VM_CONFIG_FILE);
        let text = serde_json::to_string_pretty(config).expect("a VmConfig serializes");
        std::fs::write(&config_path, text).map_err(|error| {
            Status::internal(format!("cannot write {}: {error}", config_path.display()))
        })?;
        let mut command = tokio::process::Command::new(binary);
        command.arg("--config").arg(&config_path);
        if let Some((flag, listen)) = peer {
            command.arg(flag).arg(listen);
        }
        if let Some(netns) = netns {
            // The taps live in the node's namespace: the VMM runs there too (its
            // control socket is a file, so the node still reaches it).
            if let Some(name) = netns.name() {
                let path = Path::new(network::netns::NETNS_RUN_DIR).join(name);
                let namespace = std::fs::File::open(&path).map_err(|error| {
                    Status::failed_precondition(format!(
                        "node {}: cannot open the network namespace {}: {error}",
                        netns.node(),
                        path.display()
                    ))
                })?;
                // SAFETY: the closure runs in the child between fork and exec and only
                // calls setns(2), which is async-signal-safe; `namespace` is an open
                // file (O_CLOEXEC, so the VMM does not inherit it) moved into it.
                unsafe {
                    command.pre_exec(move || {
                        if libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        }
        if let Some(placement) = placement {
            if let Some(fd) = placement.vcpu_fd() {
                command.arg("--vcpu-cgroup-fd").arg(fd.to_string());
            }
            // SAFETY: the closure runs in the child between fork and exec and only
            // calls write(2) and fcntl(2) on descriptors opened before the fork
            // (close-on-exec), which are async-signal-safe: the VMM is in its cgroups
            // before it runs.
            unsafe {
                command.pre_exec(move || placement.enter());
            }
        }
        let log = std::fs::File::create(vm_dir.join("vmm.log"))
            .map_err(|error| Status::internal(format!("cannot create the VMM log: {error}")))?;
        let log_err = log
            .try_clone()
            .map_err(|error| Status::internal(format!("cannot open the VMM log: {error}")))?;
        command
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(false);
        if self.own_process_group {
            // Not the agent's group: the VM outlives the agent (see `vms::adopt`).
            command.process_group(0);
        }
        let mut child = command.spawn().map_err(|error| {
            Status::internal(format!("cannot spawn {}: {error}", binary.display()))
        })?;
        let pid = child.id().unwrap_or(0);
        Ok(Launched {
            pid,
            exit: Box::pin(async move {
                match child.wait().await {
                    Ok(status) => (status.to_string(), status.success()),
                    Err(error) => (format!("cannot wait for the process: {error}"), false),
                }
            }),
        })
    }
}

impl Hypervisor for ProcessHypervisor {
    fn unavailable(&self) -> Option<String> {
        if self.binary.is_none() {
            return Some(
                "cannot start VMs: the `cairn-vmm` binary was not found next to cairn-node or on PATH (pass --vmm-binary)"
                    .into(),
            );
        }
        if !Path::new("/dev/kvm").exists() {
            return Some("cannot start VMs: /dev/kvm does not exist on this node".into());
        }
        None
    }

    fn launch(
        &self,
        config: &vm_config::VmConfig,
        vm_dir: &Path,
        netns: Option<&NetNs>,
        placement: Option<crate::cgroups::Placement>,
    ) -> Result<Launched, Status> {
        self.spawn_vmm(config, vm_dir, netns, placement, None)
    }

    fn launch_incoming(
        &self,
        config: &vm_config::VmConfig,
        vm_dir: &Path,
        netns: Option<&NetNs>,
        placement: Option<crate::cgroups::Placement>,
        listen: &str,
    ) -> Result<Launched, Status> {
        self.spawn_vmm(
            config,
            vm_dir,
            netns,
            placement,
            Some(("--incoming", listen)),
        )
    }

    fn launch_ft_secondary(
        &self,
        config: &vm_config::VmConfig,
        vm_dir: &Path,
        netns: Option<&NetNs>,
        placement: Option<crate::cgroups::Placement>,
        listen: &str,
    ) -> Result<Launched, Status> {
        self.spawn_vmm(
            config,
            vm_dir,
            netns,
            placement,
            Some(("--ft-secondary", listen)),
        )
    }

    fn status(&self, socket: &Path, timeout: Duration) -> Option<VmmStatus> {
        let mut client = vmm::control::ControlClient::connect(socket, timeout).ok()?;
        let status = client.status().ok()?;
        Some(VmmStatus {
            vcpus: status.vcpus,
            memory_bytes: status.memory_bytes,
            total: status.heartbeat_total,
            age_ms: status.last_heartbeat_age_ms,
            uptime_ms: status.uptime_ms,
            nics: status.nics,
            disks: status.disks,
            guest_disks: status.guest_disks,
            // Only the built-in guest runs the self-test.
            block_test: (status.boot != "linux")
                .then(|| serde_json::to_value(status.block_test).ok())
                .flatten()
                .and_then(|value| value.as_str().map(str::to_string)),
            block_tests: status.block_tests,
            block_checksum: status.block_checksum,
            boot_count: status.boot_count,
            ft: status.ft,
        })
    }

    fn set_fence(&self, socket: &Path, deadline_boottime_ns: u64) -> Result<(), String> {
        let mut client = vmm::control::ControlClient::connect(socket, Duration::from_millis(500))
            .map_err(|e| e.to_string())?;
        let response = client
            .request(&vmm::control::Request::SetFence {
                deadline_boottime_ns,
            })
            .map_err(|e| e.to_string())?;
        if response.ok {
            Ok(())
        } else {
            Err(response.error.unwrap_or_default())
        }
    }

    fn signal(&self, pid: u32, signal: libc::c_int) {
        // SAFETY: kill takes a pid and a signal number; it has no memory effects.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
}
