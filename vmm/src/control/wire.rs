//! The control protocol's wire contract: every request and response as serde types.
//! Both ends depend on this module; it depends on nothing of the VMM but the block
//! self-test result it reports.
//!
//! Architecture invariant: fields are only ever added (with `#[serde(default)]`), so an
//! older agent reads a newer VMM's status and the other way round.

use serde::{Deserialize, Serialize};

use crate::guest::BlockTestResult;

/// Version of this protocol, reported in every status.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Report [`VmStatus`].
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
    /// Power off: graceful (the built-in guest acknowledges) unless `force`.
    PowerOff {
        /// Stop at once instead of waiting for the guest.
        #[serde(default)]
        force: bool,
    },
    /// Reboot the guest.
    Reboot,
    /// Set how many pages per second the built-in guest dirties.
    SetDirtyRate {
        /// Pages per second (0 stops dirtying).
        pages_per_second: u64,
    },
    /// Burn mode of the built-in guest: its tick sleeps are skipped, so it uses all the
    /// CPU it is given and its heartbeat counter counts the loops it ran (the CPU
    /// contention test of SLA classes).
    SetBurn {
        /// On or off.
        on: bool,
    },
    /// Control or read the KVM dirty-page log.
    DirtyLog {
        /// What to do.
        action: DirtyLogAction,
    },
    /// Make the built-in guest rerun its block self-test.
    BlockTest,
    /// Make the built-in guest crash (triple fault), to test crash handling.
    GuestCrash,
    /// Set the fence deadline ([`crate::fence`]): an absolute `CLOCK_BOOTTIME` time in
    /// nanoseconds after which the VM stops itself unless a later request moves it; 0
    /// disarms. Refused once the deadline has lapsed.
    SetFence {
        /// `CLOCK_BOOTTIME` nanoseconds.
        deadline_boottime_ns: u64,
    },
    /// Who this process is ([`VmIdentity`]): a restarted node agent asks before it
    /// adopts a running VMM.
    Identify,
    /// Make the built-in guest write a seeded pattern to, or read and checksum, a range
    /// of one of its disks through its own virtio-blk driver, and wait for its report.
    GuestDiskIo(GuestDiskIoRequest),
    /// Start a live migration of this VM to a `cairn-vmm --incoming ADDR` destination
    /// (pre-copy over TCP, see vmm/ARCHITECTURE.md "Live migration"). Answers at once;
    /// `migration-status` (or `status.migration`) follows it to `ready-to-commit`.
    Migrate {
        /// The destination's `HOST:PORT`.
        to: String,
        /// The downtime the last round may take (default 50 ms): pre-copy rounds go on
        /// until the dirty remainder is expected to be sent within it.
        #[serde(default = "default_max_downtime_ms")]
        max_downtime_ms: u64,
        /// Skip pre-copy: stop the VM first, then send all of its memory (the
        /// benchmark's baseline; a downtime of the whole transfer).
        #[serde(default)]
        stop_and_copy: bool,
    },
    /// The migration's progress and figures.
    MigrationStatus,
    /// The commit point: whoever recorded the destination as the VM's owner says so.
    /// On the destination: start the VM. On the source: tell the destination to start
    /// (if the link still works) and exit 0; the source never runs again.
    MigrateCommit,
    /// Give the migration up. On the source: resume the VM (after the final state was
    /// sent, only the commander may decide this). On the destination: discard it.
    MigrateAbort,
    /// CRC-32C of all guest RAM (meaningful while paused: a migration's source and
    /// destination give the same at `ready-to-commit`).
    MemoryHash,
    /// The destination's copy of the state it received and the state it saves again
    /// after restoring it (the save → restore → save check), as JSON text.
    MigrationState,
    /// Fault tolerance: make this VM a primary that checkpoints to the `cairn-vmm
    /// --ft-secondary ADDR` at `to` every `epoch_ms` (vmm/ARCHITECTURE.md "Fault
    /// tolerance"). Answers at once; `ft-status` follows it to `protected`.
    FtStart {
        /// The secondary's `HOST:PORT`.
        to: String,
        /// The epoch in milliseconds (default 30).
        #[serde(default = "default_epoch_ms")]
        epoch_ms: u64,
        /// Copy every disk whole first (default true; false when the secondary's
        /// copies are known equal).
        #[serde(default = "default_true")]
        sync_disks: bool,
    },
    /// Fault tolerance's state and figures ([`FtStatus`]).
    FtStatus,
    /// The commander's promotion of a secondary: restore the last complete checkpoint
    /// and run the VM here. Refused without a complete checkpoint.
    FtPromote,
    /// The commander's end of fault tolerance: a primary releases the output it holds
    /// and runs alone; a secondary gives up (exits 7, never having run).
    FtStop,
    /// Points the built-in guest's beacon (a UDP datagram carrying an increasing
    /// counter every tick, Ethernet broadcast on its first NIC) at `target`
    /// (`IPV4:PORT`), or stops it (absent).
    SetBeacon {
        /// `IPV4:PORT`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
    /// Bytes typed into the serial console (its UART's receive FIFO, 64 bytes): the
    /// answer's `console_accepted` says how many it took.
    ConsoleInput {
        /// The bytes.
        data: Vec<u8>,
    },
    /// The last bytes of the serial console log.
    ConsoleTail {
        /// How many bytes (from the end); 4096 when absent.
        #[serde(default = "default_tail_bytes")]
        bytes: u64,
    },
}

/// What the built-in guest does on its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestDiskAction {
    /// Write the pattern of `seed` over the range (see [`crate::guest::disk_pattern`]).
    WritePattern,
    /// Read the range and report the CRC-32C of its bytes.
    ReadChecksum,
}

/// A disk I/O command for the built-in guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDiskIoRequest {
    /// Disk index, in `--disk` (VmConfig) order.
    pub disk: u32,
    /// What to do.
    pub action: GuestDiskAction,
    /// Byte offset, a multiple of 512.
    pub offset: u64,
    /// Bytes, a multiple of 512, at least 512, at most 1 GiB.
    pub length: u64,
    /// Pattern seed (write-pattern only).
    #[serde(default)]
    pub seed: u64,
    /// How long to wait for the guest, in milliseconds (default 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// What the built-in guest reported for a [`GuestDiskIoRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDiskIoResult {
    /// CRC-32C of the bytes the guest wrote or read.
    pub crc32c: u32,
    /// The guest's own counters of that disk after the command.
    pub counters: GuestDiskCounters,
    /// Milliseconds from posting the command to the guest's report.
    pub elapsed_ms: u64,
}

/// The built-in guest's own I/O counters of one disk, as it counts them in its driver
/// and last reported them (zero for a Linux guest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDiskCounters {
    /// virtio-blk requests it submitted.
    pub requests: u64,
    /// Bytes it read.
    pub bytes_read: u64,
    /// Bytes it wrote.
    pub bytes_written: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// Operations on the dirty-page log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyLogAction {
    /// Turn `KVM_MEM_LOG_DIRTY_PAGES` on.
    Start,
    /// Turn it off.
    Stop,
    /// Count and clear pages dirtied since the last fetch.
    Fetch,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    /// Dirty pages, for `dirty-log` `fetch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_pages: Option<u64>,
    /// The guest's report, for `guest-disk-io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_disk_io: Option<GuestDiskIoResult>,
    /// Console text, for `console-tail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// Bytes the UART took, for `console-input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_accepted: Option<u32>,
    /// Who answered, for `identify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<VmIdentity>,
    /// The migration, for `migrate`, `migration-status`, `migrate-commit`, `migrate-abort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// CRC-32C of guest RAM, for `memory-hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_crc32c: Option<u32>,
    /// `[received, restored-and-saved-again]` state JSON, for `migration-state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_states: Option<[String; 2]>,
    /// Fault tolerance, for `ft-start`, `ft-status`, `ft-promote`, `ft-stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<FtStatus>,
}

/// One side of a fault-tolerant pair ([`crate::ft`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FtStatus {
    /// `primary` or `secondary`.
    pub role: String,
    /// Primary: `connecting`, `initial-copy`, `protected`, `secondary-lost` (output
    /// held until `ft-stop`), `unprotected` (runs alone). Secondary: `waiting`,
    /// `initial-copy`, `protected`, `primary-lost` (holds its last checkpoint, waits
    /// for `ft-promote`), `failed` (nothing to resume), `promoting`, `promoted`,
    /// `stopped`.
    pub phase: String,
    /// The other side's address.
    pub peer: String,
    /// The epoch length in ms.
    pub epoch_ms: u64,
    /// Primary: the last checkpoint taken. Secondary: the last complete one.
    pub epoch: u64,
    /// The last checkpoint the secondary acknowledged (complete and durable there).
    pub last_acked: u64,
    /// Bytes of the initial copy (memory and disks).
    pub initial_bytes: u64,
    /// Duration of the initial copy in ms (primary).
    pub initial_ms: f64,
    /// Bytes on the wire so far.
    pub bytes_total: u64,
    /// Bytes of the last checkpoint.
    pub last_epoch_bytes: u64,
    /// Median bytes per checkpoint (recent 512).
    pub median_epoch_bytes: f64,
    /// Median dirty pages per checkpoint (recent 512).
    pub median_epoch_pages: f64,
    /// Median time the VM stayed paused per checkpoint, in ms (primary).
    pub median_paused_ms: f64,
    /// Median time from a checkpoint's pause to its acknowledgement, in ms (primary).
    pub median_ack_ms: f64,
    /// Median time a transmitted frame was held before it left, in ms (primary): the
    /// added latency of output.
    pub median_output_delay_ms: f64,
    /// Frames held now (primary).
    pub frames_held: u64,
    /// Frames released after their checkpoint's acknowledgement (primary).
    pub frames_released: u64,
    /// Frames dropped: past the hold limit or the fence (primary).
    pub frames_discarded: u64,
    /// Guest disk writes shipped with checkpoints (primary: writes; secondary:
    /// frames applied).
    pub disk_writes_shipped: u64,
    /// Secondary: from `ft-promote` to the vCPUs running, in ms.
    pub promote_ms: f64,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn default_epoch_ms() -> u64 {
    crate::ft::DEFAULT_EPOCH_MS
}

fn default_true() -> bool {
    true
}

/// One side of a live migration: where it is and what it cost so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// `source` or `destination`.
    pub role: String,
    /// Source: `pre-copy`, `stop-and-copy`, `ready-to-commit`, `committed`, `aborted`
    /// (running again), `failed-resumed` (failed before the final state left: running
    /// again), `failed-paused` (failed after it left: paused until `migrate-commit` or
    /// `migrate-abort`). Destination: `incoming`, `receiving`, `ready`, `committed`
    /// (running), `aborted`, `failed`.
    pub phase: String,
    /// The peer's address.
    pub peer: String,
    /// Memory rounds sent (the first full copy is round 1; the final round included).
    pub rounds: u32,
    /// Guest pages sent (or received).
    pub pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Guest memory resident when the migration began.
    pub resident_bytes: u64,
    /// Dirty pages found by each round's log read (KVM's and the VMM's own writes).
    pub dirty_pages_per_round: Vec<u64>,
    /// Of those, pages only the VMM wrote (virtio receive and completions), per round.
    pub vmm_dirty_pages_per_round: Vec<u64>,
    /// Link rate measured over the rounds, in MB/s.
    pub link_mb_per_s: f64,
    /// vCPU throttle applied by auto-converge, in percent (0: none).
    pub throttle_percent: u8,
    /// Source: from the pause to the destination's `ready`, in ms (the switch-over's
    /// share of the downtime; the commit adds the commander's round trip).
    pub paused_ms: f64,
    /// From the start to `ready` (or now), in ms.
    pub total_ms: f64,
    /// Whether the destination confirmed that it started (source, after commit).
    pub destination_started: bool,
    /// What went wrong, for the failed phases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn default_max_downtime_ms() -> u64 {
    50
}

/// Who a VMM process is: what a node agent that did not spawn it checks before it
/// adopts it (with the process's start time from `/proc`, which it recorded at spawn).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// The VM's name (its config's `name`).
    pub name: String,
    /// The incarnation id the node passed in the config at spawn (empty when none).
    pub incarnation: String,
    /// The process id of the VMM that answered.
    pub pid: u32,
}

fn default_tail_bytes() -> u64 {
    4096
}

impl Response {
    /// Success without a payload.
    pub fn ok() -> Self {
        Self {
            ok: true,
            error: None,
            status: None,
            dirty_pages: None,
            guest_disk_io: None,
            console: None,
            console_accepted: None,
            identity: None,
            migration: None,
            memory_crc32c: None,
            vm_states: None,
            ft: None,
        }
    }

    /// A refusal saying why.
    pub fn error(message: String) -> Self {
        Self {
            ok: false,
            error: Some(message),
            status: None,
            dirty_pages: None,
            guest_disk_io: None,
            console: None,
            console_accepted: None,
            identity: None,
            migration: None,
            memory_crc32c: None,
            vm_states: None,
            ft: None,
        }
    }
}

/// A snapshot of one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// `running`, `paused` or `exiting`.
    pub state: String,
    /// `cairn-guest` or `linux`.
    pub boot: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Configured guest RAM.
    pub memory_bytes: u64,
    /// Guest RAM resident in host memory (mincore over the mapping).
    pub guest_resident_bytes: u64,
    /// Resident set of the whole VMM process (guest RAM included).
    pub vmm_rss_bytes: u64,
    /// Time since the vCPUs first started.
    pub uptime_ms: u64,
    /// Boots so far (1 + reboots).
    pub boot_count: u64,
    /// Last boot stage the built-in guest reported (0 none, 1 entered, 2 main loop).
    pub boot_stage: u64,
    /// Last heartbeat counter of each vCPU.
    pub heartbeats: Vec<u64>,
    /// Sum of `heartbeats`.
    pub heartbeat_total: u64,
    /// Milliseconds since the last heartbeat of any vCPU.
    pub last_heartbeat_age_ms: Option<f64>,
    /// Microseconds from the start of VM creation to the first heartbeat.
    pub first_heartbeat_us: Option<u64>,
    /// Dirty-page rate asked of the guest.
    pub dirty_rate_pages_per_second: u64,
    /// Pages the guest reports having dirtied.
    pub pages_dirtied: u64,
    /// Whether KVM dirty logging is on.
    pub dirty_logging: bool,
    /// Whether guest RAM is advised `MADV_MERGEABLE` (KSM may deduplicate it).
    #[serde(default)]
    pub ksm_mergeable: bool,
    /// Last block self-test result.
    pub block_test: BlockTestResult,
    /// Block self-tests completed.
    pub block_tests: u64,
    /// The guest's checksum of the 4 KiB its last block self-test read back from its
    /// first disk (low 32 bits of the wrapping sum of the qwords, qword i rotated left
    /// by i mod 64); 0 before the first read.
    #[serde(default)]
    pub block_checksum: u64,
    /// virtio-blk counters of the first disk (the one the built-in guest tests), if any.
    pub block: Option<BlockStatus>,
    /// virtio-blk counters of every disk, in `--disk` order.
    #[serde(default)]
    pub disks: Vec<BlockStatus>,
    /// The built-in guest's own I/O counters of every disk, in `--disk` order (as it
    /// last reported them: after its self-test and after each disk I/O command).
    #[serde(default)]
    pub guest_disks: Vec<GuestDiskCounters>,
    /// virtio-net devices, in `--nic` order.
    #[serde(default)]
    pub nics: Vec<NicStatus>,
    /// ARP and ICMP echo requests the built-in guest has answered.
    #[serde(default)]
    pub net_replies: u64,
    /// The fence deadline (`CLOCK_BOOTTIME` ns), when armed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_deadline_boottime_ns: Option<u64>,
    /// Milliseconds left before the fence deadline (negative once it lapsed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_remaining_ms: Option<f64>,
    /// VM exits by kind.
    pub exits: ExitCounts,
    /// The live migration under way or last done, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// Fault tolerance, when this VM is or was one side of a pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<FtStatus>,
}

/// A virtio-net device and its frame counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStatus {
    /// The host tap it is attached to.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// Whether the guest's driver has brought it up.
    pub driver_ok: bool,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames the guest could not take (driver not running, buffer too small).
    pub rx_dropped: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Bytes the guest sent.
    pub tx_bytes: u64,
    /// Frames that could not be sent.
    pub tx_errors: u64,
    /// Times the VMM attached to the tap again after it was deleted and made anew.
    #[serde(default)]
    pub tap_reattached: u64,
}

/// virtio-blk request counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStatus {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// VM exits by kind, over all vCPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Triple faults.
    pub shutdown: u64,
    /// `KVM_RUN` interrupted by a kick.
    pub interrupted: u64,
    /// Anything else.
    pub other: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_wire_form() {
        let cases = [
            (Request::Status, r#"{"op":"status"}"#),
            (
                Request::PowerOff { force: true },
                r#"{"op":"power-off","force":true}"#,
            ),
            (
                Request::SetDirtyRate {
                    pages_per_second: 5,
                },
                r#"{"op":"set-dirty-rate","pages_per_second":5}"#,
            ),
            (
                Request::DirtyLog {
                    action: DirtyLogAction::Fetch,
                },
                r#"{"op":"dirty-log","action":"fetch"}"#,
            ),
            (Request::GuestCrash, r#"{"op":"guest-crash"}"#),
            (
                Request::SetBurn { on: true },
                r#"{"op":"set-burn","on":true}"#,
            ),
            (
                Request::GuestDiskIo(GuestDiskIoRequest {
                    disk: 1,
                    action: GuestDiskAction::WritePattern,
                    offset: 4096,
                    length: 8192,
                    seed: 7,
                    timeout_ms: None,
                }),
                r#"{"op":"guest-disk-io","disk":1,"action":"write-pattern","offset":4096,"length":8192,"seed":7}"#,
            ),
            (Request::Identify, r#"{"op":"identify"}"#),
        ];
        for (request, wire) in cases {
            assert_eq!(serde_json::to_string(&request).expect("serialize"), wire);
            assert_eq!(
                serde_json::from_str::<Request>(wire).expect("parse"),
                request
            );
        }
        let graceful: Request =
            serde_json::from_str(r#"{"op":"power-off"}"#).expect("force defaults to false");
        assert_eq!(graceful, Request::PowerOff { force: false });
    }

    #[test]
    fn errors_carry_a_message_and_no_payload() {
        let text = serde_json::to_string(&Response::error("nope".into())).expect("serialize");
        assert_eq!(text, r#"{"ok":false,"error":"nope"}"#);
    }
}
