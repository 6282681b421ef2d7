//! [`VmHandle`]: the handle through which the control socket's server (and tests) query
//! and steer a running VM. (In cairn, "controller" means the control plane that drives
//! the nodes; inside the VMM this is only a handle on one VM.)

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::control::wire::{
    BlockStatus, ExitCounts, GuestDiskAction, GuestDiskCounters, GuestDiskIoRequest,
    GuestDiskIoResult, NicStatus, VmStatus,
};
use crate::devices::ports::DiskIoArgs;
use crate::devices::virtio_net::format_mac;
use crate::guest::{self, abi};
use crate::memory::{DirtyBitmap, GuestRam, MemoryError};
use crate::vcpu::{RunState, Shared};
use crate::vm::VmEvent;

/// Errors of control operations.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The operation does not apply in the VM's current state.
    #[error("cannot {operation} a VM that is {state}")]
    WrongState {
        /// What was asked.
        operation: &'static str,
        /// The state it is in.
        state: &'static str,
    },
    /// The vCPUs did not stop in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// The operation needs the built-in guest.
    #[error("{0} needs the built-in guest (cairn-guest)")]
    NeedsBuiltinGuest(&'static str),
    /// The VM has no disk.
    #[error("the VM has no block device")]
    NoDisk,
    /// Dirty-page logging failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The console log could not be read.
    #[error("cannot read the console log")]
    Console(#[source] std::io::Error),
    /// The VM is no longer supervised.
    #[error("the VM is shutting down")]
    Gone,
    /// The fence deadline cannot be moved.
    #[error("{0}")]
    Fence(String),
    /// A live-migration request that cannot be carried out.
    #[error("migration: {0}")]
    Migration(String),
    /// A fault-tolerance request that cannot be carried out.
    #[error("fault tolerance: {0}")]
    Ft(String),
    /// A beacon target that is not one.
    #[error("beacon: {0}")]
    Beacon(String),
    /// A guest disk I/O command that cannot be carried out as asked.
    #[error("guest disk I/O: {0}")]
    GuestDiskIo(String),
}

/// A cloneable handle to a running VM: status, pause/resume, power-off, reboot, the
/// dirty-page rate and the dirty log. Used by the control socket and by tests.
#[derive(Debug, Clone)]
pub struct VmHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) started: Instant,
    pub(crate) console_log: std::path::PathBuf,
    /// The VM's name, from its config.
    pub(crate) name: String,
    /// The incarnation id the node gave this process (empty when none).
    pub(crate) incarnation: String,
}

impl VmHandle {
    /// The last `bytes` bytes of the console log (lossy UTF-8), flushing buffered output
    /// first.
    pub fn console_tail(&self, bytes: u64) -> Result<String, ControlError> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        self.shared.console.lock().expect("console lock").flush();
        let mut file = fs::File::open(&self.console_log).map_err(ControlError::Console)?;
        let length = file.metadata().map_err(ControlError::Console)?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(bytes)))
            .map_err(ControlError::Console)?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).map_err(ControlError::Console)?;
        Ok(String::from_utf8_lossy(&tail).into_owned())
    }

    /// Types `data` into the serial console; how many bytes its receive FIFO took.
    pub fn console_input(&self, data: &[u8]) -> u32 {
        let mut console = self.shared.console.lock().expect("console lock");
        console.enqueue_input(data) as u32
    }

    /// The current run state.
    pub fn state(&self) -> RunState {
        self.shared.lock_run().state
    }

    /// A snapshot of the VM's state and counters. `vcpus` and `memory_bytes` are what
    /// runs — the vCPUs created and the guest RAM mapped — not a copy of a definition.
    pub fn status(&self) -> VmStatus {
        let shared = &self.shared;
        let telemetry = &shared.telemetry;
        let heartbeats: Vec<u64> = telemetry
            .heartbeats
            .iter()
            .map(|counter| counter.load(Ordering::Acquire))
            .collect();
        let exits = &shared.exits;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let disks: Vec<BlockStatus> = shared
            .block_stats
            .iter()
            .map(|stats| BlockStatus {
                reads: load(&stats.reads),
                writes: load(&stats.writes),
                flushes: load(&stats.flushes),
                bytes_read: load(&stats.bytes_read),
                bytes_written: load(&stats.bytes_written),
                errors: load(&stats.errors),
            })
            .collect();
        let nics = shared
            .nets
            .iter()
            .map(|net| NicStatus {
                tap: net.tap_name.clone(),
                mac: format_mac(net.mac),
                driver_ok: net.device.lock().expect("net lock").driver_ok(),
                rx_frames: load(&net.stats.rx_frames),
                rx_bytes: load(&net.stats.rx_bytes),
                rx_dropped: load(&net.stats.rx_dropped),
                tx_frames: load(&net.stats.tx_frames),
                tx_bytes: load(&net.stats.tx_bytes),
                tx_errors: load(&net.stats.tx_errors),
                tap_reattached: load(&net.tap_reattached),
            })
            .collect();
        let migration = shared.migration.status();
        // A migration's source stops its vCPU threads at the switch-over; to the agent
        // that VM is paused (its threads come back on abort), not exiting.
        let frozen = migration.as_ref().is_some_and(|status| {
            status.role == "source"
                && matches!(
                    status.phase.as_str(),
                    "stop-and-copy" | "ready-to-commit" | "failed-paused"
                )
        });
        VmStatus {
            state: if frozen {
                RunState::Paused.name().to_string()
            } else {
                self.state().name().to_string()
            },
            boot: if shared.builtin {
                guest::BUILTIN_NAME.to_string()
            } else {
                "linux".to_string()
            },
            vcpus: shared.vcpus as u32,
            memory_bytes: self.ram.size_bytes(),
            guest_resident_bytes: self.ram.resident_bytes(),
            vmm_rss_bytes: process_rss_bytes(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            boot_count: shared.boot_count.load(Ordering::Acquire),
            boot_stage: telemetry.boot_stage.load(Ordering::Acquire),
            heartbeat_total: heartbeats.iter().sum(),
            heartbeats,
            last_heartbeat_age_ms: telemetry
                .heartbeat_age()
                .map(|age| age.as_secs_f64() * 1000.0),
            first_heartbeat_us: telemetry
                .first_heartbeat()
                .map(|first| first.as_micros() as u64),
            dirty_rate_pages_per_second: telemetry.dirty_rate(),
            pages_dirtied: telemetry.pages_dirtied.load(Ordering::Acquire),
            dirty_logging: self.ram.dirty_logging(),
            ksm_mergeable: self.ram.mergeable(),
            block_test: telemetry.block_test(),
            block_tests: telemetry.block_tests.load(Ordering::Acquire),
            block_checksum: telemetry.block_checksum.load(Ordering::Acquire),
            block: disks.first().cloned(),
            guest_disks: (0..disks.len())
                .map(|disk| {
                    let [requests, bytes_read, bytes_written, errors] =
                        telemetry.guest_disk_counters(disk);
                    GuestDiskCounters {
                        requests,
                        bytes_read,
                        bytes_written,
                        errors,
                    }
                })
                .collect(),
            disks,
            nics,
            net_replies: telemetry.net_replies(),
            fence_deadline_boottime_ns: shared.fence.deadline_ns(),
            fence_remaining_ms: shared
                .fence
                .deadline_ns()
                .map(|d| (d as f64 - crate::fence::boottime_ns() as f64) / 1e6),
            exits: ExitCounts {
                io_in: load(&exits.io_in),
                io_out: load(&exits.io_out),
                mmio_read: load(&exits.mmio_read),
                mmio_write: load(&exits.mmio_write),
                hlt: load(&exits.hlt),
                shutdown: load(&exits.shutdown),
                interrupted: load(&exits.interrupted),
                other: load(&exits.other),
            },
            migration,
            ft: shared.ft.status(),
        }
    }

    /// Pauses every vCPU; returns once all of them are outside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), ControlError> {
        const TIMEOUT: Duration = Duration::from_secs(2);
        let shared = &self.shared;
        {
            let mut run = shared.lock_run();
            match run.state {
                RunState::Paused => return Ok(()),
                RunState::Exiting => {
                    return Err(ControlError::WrongState {
                        operation: "pause",
                        state: "exiting",
                    });
                }
                RunState::Running => {
                    run.state = RunState::Paused;
                    shared.run_changed.notify_all();
                }
            }
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            shared.kick_vcpus();
            let run = shared.lock_run();
            let (run, _) = shared
                .run_changed
                .wait_timeout_while(run, Duration::from_millis(2), |run| {
                    run.state == RunState::Paused && run.paused < shared.vcpus
                })
                .expect("run-state lock");
            if run.state != RunState::Paused {
                return Err(ControlError::WrongState {
                    operation: "pause",
                    state: run.state.name(),
                });
            }
            if run.paused == shared.vcpus {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ControlError::PauseTimeout(TIMEOUT));
            }
        }
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut run = self.shared.lock_run();
        match run.state {
            RunState::Running => Ok(()),
            RunState::Exiting => Err(ControlError::WrongState {
                operation: "resume",
                state: "exiting",
            }),
            RunState::Paused => {
                run.state = RunState::Running;
                self.shared.run_changed.notify_all();
                drop(run);
                self.shared.wake_receive_pumps();
                Ok(())
            }
        }
    }

    /// Asks for power-off: the built-in guest acknowledges within a tick (or is stopped
    /// after the grace period); `force` or a Linux guest stops at once.
    pub fn power_off(&self, force: bool) -> Result<(), ControlError> {
        self.shared
            .events
            .send(VmEvent::RequestPowerOff { force })
            .map_err(|_| ControlError::Gone)?;
        // A paused guest cannot acknowledge: let it run so the request completes. The VM
        // may already be exiting because of this very request; that is success.
        match self.resume() {
            Ok(()) | Err(ControlError::WrongState { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Asks for a reboot (acknowledged by the built-in guest, immediate for Linux).
    pub fn reboot(&self) -> Result<(), ControlError> {
        self.shared
            .events
            .send(VmEvent::RequestReboot)
            .map_err(|_| ControlError::Gone)
    }

    /// Turns the built-in guest's burn mode on or off (its tick sleeps skipped).
    pub fn set_burn(&self, on: bool) -> Result<(), ControlError> {
        if !self.shared.builtin {
            return Err(ControlError::NeedsBuiltinGuest("set-burn"));
        }
        self.shared.telemetry.set_burn(on);
        Ok(())
    }

    /// Sets the built-in guest's dirty-page rate.
    pub fn set_dirty_rate(&self, pages_per_second: u64) -> Result<(), ControlError> {
        if !self.shared.builtin {
            return Err(ControlError::NeedsBuiltinGuest("set-dirty-rate"));
        }
        self.shared.telemetry.set_dirty_rate(pages_per_second);
        Ok(())
    }

    /// Turns `KVM_MEM_LOG_DIRTY_PAGES` on or off for all guest RAM.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), ControlError> {
        self.ram.register(&self.vm_fd, on)?;
        Ok(())
    }

    /// Pages written since the last call (or since logging started); clears the log.
    pub fn take_dirty_pages(&self) -> Result<u64, ControlError> {
        Ok(self.take_dirty_bitmap()?.count())
    }

    /// Which pages were written since the last read (or since logging started); clears
    /// the log. Live migration reads this between copy rounds.
    pub fn take_dirty_bitmap(&self) -> Result<DirtyBitmap, ControlError> {
        if !self.ram.dirty_logging() {
            return Err(ControlError::WrongState {
                operation: "read the dirty log of",
                state: "not dirty-logging",
            });
        }
        Ok(self.ram.take_dirty_bitmap(&self.vm_fd)?)
    }

    /// The guest's memory, for bounds-checked reads of dirty pages (migration).
    pub fn guest_memory(&self) -> &crate::memory::GuestMemoryMmap {
        self.ram.memory()
    }

    /// Asks the built-in guest to run its block self-test again.
    pub fn block_test(&self) -> Result<(), ControlError> {
        if !self.shared.builtin {
            return Err(ControlError::NeedsBuiltinGuest("block-test"));
        }
        if self.shared.blocks.is_empty() {
            return Err(ControlError::NoDisk);
        }
        self.shared
            .telemetry
            .pending_command
            .store(abi::CMD_BLOCK_TEST, Ordering::Release);
        Ok(())
    }

    /// Who this process is: the VM's name, the incarnation id the node gave it at
    /// spawn, and its process id (what a restarted agent checks before adopting it).
    pub fn identity(&self) -> crate::control::VmIdentity {
        crate::control::VmIdentity {
            name: self.name.clone(),
            incarnation: self.incarnation.clone(),
            pid: std::process::id(),
        }
    }

    /// Has the built-in guest write a pattern to, or read and checksum, a range of one of
    /// its disks, and waits for its report (the `guest-disk-io` request).
    pub fn guest_disk_io(
        &self,
        request: &GuestDiskIoRequest,
    ) -> Result<GuestDiskIoResult, ControlError> {
        let refuse = |message: String| Err(ControlError::GuestDiskIo(message));
        if !self.shared.builtin {
            return Err(ControlError::NeedsBuiltinGuest("guest-disk-io"));
        }
        let disks = self.shared.blocks.len();
        let Some(block) = self.shared.blocks.get(request.disk as usize) else {
            return refuse(format!(
                "disk {} does not exist; the VM has {disks} disk(s), numbered from 0",
                request.disk
            ));
        };
        let (size, read_only) = {
            let block = block.lock().expect("block lock");
            (block.size_bytes(), block.read_only())
        };
        if !request.offset.is_multiple_of(512)
            || !request.length.is_multiple_of(512)
            || request.length == 0
        {
            return refuse(format!(
                "offset {} and length {} must be multiples of 512 and the length at least 512",
                request.offset, request.length
            ));
        }
        if request.length > MAX_GUEST_IO_BYTES {
            return refuse(format!(
                "length {} is more than the {MAX_GUEST_IO_BYTES} bytes (1 GiB) one command may cover",
                request.length
            ));
        }
        if request
            .offset
            .checked_add(request.length)
            .is_none_or(|end| end > size)
        {
            return refuse(format!(
                "bytes {}..{} are beyond the end of disk {} ({size} bytes)",
                request.offset,
                request.offset.saturating_add(request.length),
                request.disk
            ));
        }
        if read_only && request.action == GuestDiskAction::WritePattern {
            return refuse(format!("disk {} is read-only", request.disk));
        }
        if self.state() != RunState::Running {
            return Err(ControlError::WrongState {
                operation: "run guest disk I/O on",
                state: self.state().name(),
            });
        }
        let args = DiskIoArgs {
            op: match request.action {
                GuestDiskAction::WritePattern => abi::IO_OP_WRITE_PATTERN,
                GuestDiskAction::ReadChecksum => abi::IO_OP_READ_CHECKSUM,
            },
            disk: request.disk,
            sector: request.offset / 512,
            sectors: (request.length / 512) as u32,
            seed: request.seed,
        };
        let timeout = Duration::from_millis(request.timeout_ms.unwrap_or(30_000).max(1));
        let started = Instant::now();
        let report = self
            .shared
            .telemetry
            .run_disk_io(args, timeout)
            .map_err(|error| ControlError::GuestDiskIo(error.to_string()))?;
        let [requests, bytes_read, bytes_written, errors] = report.counters;
        let counters = GuestDiskCounters {
            requests,
            bytes_read,
            bytes_written,
            errors,
        };
        let failure = match report.result {
            abi::IO_OK => {
                // The answer is output like a frame: on a fault-tolerance primary it
                // leaves only once the checkpoint holding the guest's report is
                // acknowledged (its writes are then on the secondary's copy).
                if !self.shared.ft.wait_committed(timeout) {
                    return Err(ControlError::GuestDiskIo(
                        "the guest finished, but the checkpoint holding it was not acknowledged by the fault-tolerance secondary in time".into(),
                    ));
                }
                return Ok(GuestDiskIoResult {
                    crc32c: report.checksum,
                    counters,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                });
            }
            abi::IO_NO_DEVICE => "the guest found no virtio-blk device there",
            abi::IO_DEVICE_ERROR => "a virtio-blk request failed (see the VMM's block errors)",
            abi::IO_OUT_OF_RANGE => "the range is beyond the capacity the device reports",
            abi::IO_FEATURES_REJECTED => "the device refused the guest's features",
            _ => "the guest refused the command",
        };
        refuse(format!(
            "disk {}: {failure} (guest result {}; its counters: {requests} requests, {errors} errors)",
            request.disk, report.result
        ))
    }

    /// Sets the fence deadline ([`crate::fence::Fence::set`]).
    pub fn set_fence(&self, deadline_boottime_ns: u64) -> Result<(), ControlError> {
        self.shared
            .fence
            .set(deadline_boottime_ns)
            .map_err(ControlError::Fence)
    }

    /// Makes the built-in guest crash (triple fault), to exercise crash handling.
    pub fn guest_crash(&self) -> Result<(), ControlError> {
        if !self.shared.builtin {
            return Err(ControlError::NeedsBuiltinGuest("guest-crash"));
        }
        self.shared
            .telemetry
            .pending_command
            .store(abi::CMD_CRASH, Ordering::Release);
        Ok(())
    }

    /// Waits up to `timeout` for the first heartbeat; returns the time from the start of
    /// [`crate::Vm::create`] to it.
    pub fn wait_first_heartbeat(&self, timeout: Duration) -> Option<Duration> {
        self.shared.telemetry.wait_first_heartbeat(timeout)
    }
}

impl VmHandle {
    /// Starts a live migration to `to` ([`crate::migration::run_source`]) on its own
    /// thread; returns once it has begun.
    pub fn migrate(
        &self,
        to: &str,
        max_downtime_ms: u64,
        stop_and_copy: bool,
    ) -> Result<(), ControlError> {
        if self.shared.ft.active() {
            return Err(ControlError::Migration(
                "fault tolerance runs on this VM: stop it first (ft-stop)".into(),
            ));
        }
        if self.state() != RunState::Running {
            return Err(ControlError::WrongState {
                operation: "migrate",
                state: self.state().name(),
            });
        }
        self.shared
            .migration
            .begin(crate::control::MigrationStatus {
                role: "source".into(),
                phase: "pre-copy".into(),
                peer: to.to_string(),
                memory_bytes: self.ram.size_bytes(),
                resident_bytes: self.ram.resident_bytes(),
                ..Default::default()
            })
            .map_err(ControlError::Migration)?;
        let hello = crate::migration::Hello {
            protocol: crate::migration::PROTOCOL_VERSION,
            memory_bytes: self.ram.size_bytes(),
            vcpus: self.shared.vcpus as u32,
            disks: self.shared.blocks.len() as u32,
            nics: self.shared.nets.len() as u32,
            builtin: self.shared.builtin,
        };
        let request = crate::migration::MigrateRequest {
            to: to.to_string(),
            max_downtime: Duration::from_millis(max_downtime_ms),
            stop_and_copy,
        };
        let source: Arc<dyn crate::migration::SourceVm> = Arc::new(self.clone());
        std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || crate::migration::run_source(source, request, hello))
            .map_err(|error| {
                self.shared.migration.end();
                ControlError::Migration(format!("cannot start the migration thread: {error}"))
            })?;
        Ok(())
    }

    /// The migration's status, if one ever began.
    pub fn migration_status(&self) -> Option<crate::control::MigrationStatus> {
        self.shared.migration.status()
    }

    /// The commander's decision ([`crate::migration::Decision`]); waits up to 10 s for
    /// the migration to act on it and returns its status then.
    pub fn migration_decide(
        &self,
        decision: crate::migration::Decision,
    ) -> Result<crate::control::MigrationStatus, ControlError> {
        let status = self
            .shared
            .migration
            .status()
            .ok_or_else(|| ControlError::Migration("no migration was started".into()))?;
        match decision_verdict(&status.role, &status.phase, decision) {
            Verdict::Act => {}
            // Already what the commander asks: the destination commits on the
            // source's word too, so a commit told to both at once finds one of them
            // committed. Not an error: the answer is the status.
            Verdict::Done => return Ok(status),
            Verdict::Refused => {
                return Err(ControlError::Migration(format!(
                    "cannot {} a migration whose {} is {}",
                    match decision {
                        crate::migration::Decision::Commit => "commit",
                        crate::migration::Decision::Abort => "abort",
                    },
                    status.role,
                    status.phase
                )));
            }
        }
        self.shared
            .migration
            .decide(decision)
            .map_err(ControlError::Migration)?;
        let settled = |status: &crate::control::MigrationStatus| {
            matches!(
                status.phase.as_str(),
                "committed" | "aborted" | "failed-resumed" | "failed"
            )
        };
        Ok(self
            .shared
            .migration
            .wait_status(Duration::from_secs(10), settled)
            .unwrap_or(status))
    }

    /// CRC-32C of all guest RAM.
    pub fn memory_hash(&self) -> u32 {
        self.ram.crc32c()
    }

    /// The destination's received and re-saved state JSON.
    pub fn migration_states(&self) -> Option<[String; 2]> {
        self.shared.migration.states()
    }
}

impl VmHandle {
    /// Makes this VM a fault-tolerance primary checkpointing to `to` every `epoch_ms`
    /// ([`crate::ft::run_primary`], on its own thread).
    pub fn ft_start(&self, to: &str, epoch_ms: u64, sync_disks: bool) -> Result<(), ControlError> {
        if self.state() != RunState::Running {
            return Err(ControlError::WrongState {
                operation: "start fault tolerance on",
                state: self.state().name(),
            });
        }
        if !(1..=10_000).contains(&epoch_ms) {
            return Err(ControlError::Ft(format!(
                "epoch_ms {epoch_ms} is out of range: give 1 to 10000 (default {})",
                crate::ft::DEFAULT_EPOCH_MS
            )));
        }
        crate::ft::start_primary(
            self,
            crate::ft::FtRequest {
                to: to.to_string(),
                epoch: Duration::from_millis(epoch_ms),
                sync_disks,
            },
        )
        .map_err(ControlError::Ft)
    }

    /// Fault tolerance's status, if this VM is or was one side of a pair.
    pub fn ft_status(&self) -> Option<crate::control::wire::FtStatus> {
        self.shared.ft.status()
    }

    /// Promotes this secondary; answers once its vCPUs run (or after 10 s).
    pub fn ft_promote(&self) -> Result<crate::control::wire::FtStatus, ControlError> {
        self.shared.ft.promote().map_err(ControlError::Ft)?;
        self.shared
            .ft
            .wait_status(Duration::from_secs(10), |status| {
                matches!(status.phase.as_str(), "promoted" | "stopped")
            });
        self.ft_status()
            .ok_or_else(|| ControlError::Ft("no status".into()))
    }

    /// Ends fault tolerance here (a primary runs alone, a secondary gives up); answers
    /// once that is done (or after 10 s).
    pub fn ft_stop(&self) -> Result<crate::control::wire::FtStatus, ControlError> {
        self.shared.ft.stop().map_err(ControlError::Ft)?;
        self.shared
            .ft
            .wait_status(Duration::from_secs(10), |status| {
                matches!(status.phase.as_str(), "unprotected" | "stopped")
            });
        self.ft_status()
            .ok_or_else(|| ControlError::Ft("no status".into()))
    }

    /// Points the built-in guest's beacon at `target` (`IPV4:PORT`) or stops it.
    pub fn set_beacon(&self, target: Option<&str>) -> Result<(), ControlError> {
        if !self.shared.builtin {
            return Err(ControlError::NeedsBuiltinGuest("set-beacon"));
        }
        let target = target
            .map(|text| {
                text.parse::<std::net::SocketAddrV4>().map_err(|_| {
                    ControlError::Beacon(format!(
                        "{text:?} is not an IPv4 address and port (e.g. 10.0.0.1:7000)"
                    ))
                })
            })
            .transpose()?;
        if target.is_some_and(|target| target.ip().is_unspecified() || target.port() == 0) {
            return Err(ControlError::Beacon(
                "the beacon needs a non-zero address and port".into(),
            ));
        }
        self.shared.telemetry.set_beacon(target);
        Ok(())
    }

    /// A secondary that will not run: why (its status says `stopped`).
    pub fn ft_failed(&self, error: &str) {
        self.shared.ft.failed(error);
    }

    /// A secondary's vCPUs run: its promotion is done.
    pub fn ft_promoted(&self) {
        self.shared.ft.promoted();
    }

    /// Fault tolerance: stop the vCPUs for a checkpoint (answered through the
    /// migration cell's freeze slot).
    pub(crate) fn request_checkpoint_freeze(&self) {
        if self.shared.events.send(VmEvent::CheckpointFreeze).is_err() {
            self.shared
                .migration
                .set_freeze(Err("the VM is shutting down".into()));
        }
    }

    /// Starts the vCPUs a freeze stopped again and waits for it.
    pub(crate) fn resume_after_freeze(&self) -> Result<(), String> {
        crate::migration::SourceVm::request_resume(self);
        self.shared.migration.wait_resume(Duration::from_secs(10))
    }
}

impl crate::migration::SourceVm for VmHandle {
    fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn cell(&self) -> &crate::migration::MigrationCell {
        &self.shared.migration
    }

    fn set_dirty_logging(&self, on: bool) -> Result<(), String> {
        VmHandle::set_dirty_logging(self, on).map_err(|error| error.to_string())
    }

    fn take_dirty(&self) -> Result<DirtyBitmap, String> {
        self.ram
            .take_dirty_bitmap(&self.vm_fd)
            .map_err(|error| error.to_string())
    }

    fn take_vmm_dirty(&self) -> DirtyBitmap {
        self.ram.take_vmm_dirty_bitmap()
    }

    fn request_freeze(&self) {
        if self.shared.events.send(VmEvent::MigrationFreeze).is_err() {
            self.shared
                .migration
                .set_freeze(Err("the VM is shutting down".into()));
        }
    }

    fn request_resume(&self) {
        if self.shared.events.send(VmEvent::MigrationResume).is_err() {
            self.shared
                .migration
                .set_resume(Err("the VM is shutting down".into()));
        }
    }

    fn committed(&self, peer: &str) {
        self.shared
            .send(VmEvent::MigrationCommitted(peer.to_string()));
    }

    fn pause(&self, paused: bool) {
        let _ = if paused { self.pause() } else { self.resume() };
    }

    fn set_throttle(&self, percent: u8) {
        self.shared.telemetry.set_throttle(percent);
    }
}

/// The most one guest disk I/O command may cover.
pub const MAX_GUEST_IO_BYTES: u64 = 1 << 30;

/// Resident set size of this process (`/proc/self/statm`), in bytes.
pub fn process_rss_bytes() -> u64 {
    let Ok(statm) = fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page_size.max(0) as u64
}

/// What a commander's decision does to a migration in `phase` on its `role` side.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The decision is carried out.
    Act,
    /// The migration is already where the decision leads (a commit of a committed
    /// migration): answered with its status.
    Done,
    /// Not in this phase.
    Refused,
}

fn decision_verdict(role: &str, phase: &str, decision: crate::migration::Decision) -> Verdict {
    use crate::migration::Decision::{Abort, Commit};
    let act = match (role, decision) {
        (_, Commit) if phase == "committed" => return Verdict::Done,
        ("source", Commit) => matches!(phase, "ready-to-commit" | "failed-paused"),
        ("source", Abort) => matches!(
            phase,
            "pre-copy" | "stop-and-copy" | "ready-to-commit" | "failed-paused"
        ),
        ("destination", Commit) => phase == "ready",
        _ => matches!(phase, "incoming" | "receiving" | "ready"),
    };
    if act { Verdict::Act } else { Verdict::Refused }
}

#[cfg(test)]
mod decision_tests {
    use super::{Verdict, decision_verdict};
    use crate::migration::Decision::{Abort, Commit};

    #[test]
    fn a_commit_told_to_a_side_already_committed_is_done_not_refused() {
        // The destination commits on the source's word; the commander's own commit,
        // sent to both at once, can arrive after it.
        assert_eq!(
            decision_verdict("destination", "committed", Commit),
            Verdict::Done
        );
        assert_eq!(
            decision_verdict("source", "committed", Commit),
            Verdict::Done
        );
        assert_eq!(
            decision_verdict("destination", "ready", Commit),
            Verdict::Act
        );
        assert_eq!(
            decision_verdict("source", "ready-to-commit", Commit),
            Verdict::Act
        );
        // A commit before the final state, and an abort after the commit, stay refused.
        assert_eq!(
            decision_verdict("destination", "receiving", Commit),
            Verdict::Refused
        );
        assert_eq!(
            decision_verdict("source", "pre-copy", Commit),
            Verdict::Refused
        );
        assert_eq!(
            decision_verdict("destination", "committed", Abort),
            Verdict::Refused
        );
        assert_eq!(
            decision_verdict("source", "committed", Abort),
            Verdict::Refused
        );
        assert_eq!(
            decision_verdict("destination", "receiving", Abort),
            Verdict::Act
        );
    }
}
