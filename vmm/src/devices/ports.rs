//! The built-in guest's port interface (see `guest/abi.inc`): heartbeats, the dirty-page
//! rate limiter, the tick, commands and the block self-test result, plus the guest
//! telemetry they feed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::guest::{BlockTestResult, abi};

/// What the vCPU loop must do after a guest port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    /// Nothing: resume the guest.
    Continue,
    /// The first heartbeat of the VM arrived: resume the guest and tell the supervisor.
    FirstHeartbeat,
    /// Park this vCPU for the given time (interruptible by pause and stop).
    Sleep(Duration),
    /// The guest acknowledged a power-off request.
    PowerOff,
    /// The guest acknowledged a reboot request.
    Reboot,
}

/// Grants the guest pages to dirty at a configured rate (a token bucket holding at most
/// one second's worth), so the rate is met whatever the guest's tick.
#[derive(Debug)]
pub struct DirtyRateLimiter {
    pages_per_second: u64,
    tokens: f64,
    last: Instant,
}

impl DirtyRateLimiter {
    /// A limiter granting `pages_per_second`, starting empty at `now`.
    pub fn new(pages_per_second: u64, now: Instant) -> Self {
        Self {
            pages_per_second,
            tokens: 0.0,
            last: now,
        }
    }

    /// Changes the rate; pending tokens are capped at the new rate.
    pub fn set_rate(&mut self, pages_per_second: u64, now: Instant) {
        self.refill(now);
        self.pages_per_second = pages_per_second;
        self.tokens = self.tokens.min(pages_per_second as f64);
    }

    /// The configured rate.
    pub fn rate(&self) -> u64 {
        self.pages_per_second
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.pages_per_second as f64)
            .min(self.pages_per_second as f64);
    }

    /// Pages the guest may dirty now (whole pages; the fraction carries over).
    pub fn take(&mut self, now: Instant) -> u64 {
        self.refill(now);
        let granted = self.tokens.floor();
        self.tokens -= granted;
        granted as u64
    }
}

/// One disk I/O command for the built-in guest (`CMD_DISK_IO`): what it reads from the
/// `PORT_IO_*` ports once it has taken the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskIoArgs {
    /// `IO_OP_WRITE_PATTERN` or `IO_OP_READ_CHECKSUM`.
    pub op: u64,
    /// Disk index.
    pub disk: u32,
    /// First 512-byte sector.
    pub sector: u64,
    /// Number of sectors.
    pub sectors: u32,
    /// Pattern seed (write-pattern).
    pub seed: u64,
}

/// What the guest reported for one disk I/O command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskIoReport {
    /// The `IO_*` result.
    pub result: u64,
    /// CRC-32C of the bytes written or read (meaningful when `result` is `IO_OK`).
    pub checksum: u32,
    /// The guest's own counters of that disk after the command (`IO_STAT_*` order).
    pub counters: [u64; IO_STATS],
}

/// Why a disk I/O command has no report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiskIoWaitError {
    /// Another guest command stayed pending the whole time.
    #[error("another command for the guest stayed pending for {0:?}")]
    Busy(Duration),
    /// The guest did not take the command in time (paused, rebooting, hung).
    #[error("the guest did not take the command within {0:?}")]
    NotTaken(Duration),
    /// The guest took the command but did not finish it in time.
    #[error("the guest did not finish the command within {0:?} (it may still complete it)")]
    NotFinished(Duration),
}

const IO_STATS: usize = abi::IO_STATS as usize;
const IO_MAX_DISKS: usize = abi::IO_MAX_DISKS as usize;

/// The host side of the disk I/O mailbox: the command posted, the one the guest took,
/// its result, and the counters the guest reported. Each command has a ticket, so a
/// late result of a command whose caller gave up is never taken for another's.
#[derive(Debug, Default)]
struct DiskIoMailbox {
    next_ticket: u64,
    posted: Option<(u64, DiskIoArgs)>,
    taken: Option<(u64, DiskIoArgs)>,
    checksum: u32,
    done: Option<(u64, u64, u32)>,
    stat_select: u32,
    stat_low: u32,
    counters: [[u64; IO_STATS]; IO_MAX_DISKS],
}

/// Counters and state the built-in guest reports, shared by vCPU threads and the
/// control channel.
#[derive(Debug)]
pub struct GuestTelemetry {
    epoch: Instant,
    /// Heartbeats per vCPU (the guest's own counter, last value written).
    pub heartbeats: Vec<AtomicU64>,
    /// Microseconds since `epoch` of the last heartbeat of any vCPU, plus one (0: none).
    last_heartbeat_us: AtomicU64,
    first_heartbeat: Mutex<Option<Duration>>,
    first_heartbeat_seen: Condvar,
    /// Last boot stage the guest reported.
    pub boot_stage: AtomicU64,
    /// Last block self-test result (raw port value).
    pub block_result: AtomicU64,
    /// Number of block self-tests completed.
    pub block_tests: AtomicU64,
    /// Checksum of the 4 KiB the last block self-test read back (guest-computed).
    pub block_checksum: AtomicU64,
    /// Pages the guest reports having dirtied.
    pub pages_dirtied: AtomicU64,
    /// The command waiting for the guest to read it (`CMD_*`).
    pub pending_command: AtomicU64,
    limiter: Mutex<DirtyRateLimiter>,
    tick_us: u64,
    dirty_end_page: u64,
    net_ipv4: u32,
    net_replies: AtomicU64,
    disk_io: Mutex<DiskIoMailbox>,
    disk_io_done: Condvar,
    disk_io_turn: Mutex<()>,
    throttle_percent: AtomicU64,
    /// Burn mode (`set-burn`): the guest's tick sleeps are skipped, so its main loop
    /// runs without pause and uses all the CPU it is given; its heartbeat counter
    /// then counts the loops it ran (a CPU-contention load and its measure).
    burn: std::sync::atomic::AtomicBool,
    /// The beacon's target (`set-beacon`): the IPv4 address as it sits in a packet
    /// (0: no beacon) and the UDP port, answered on `PORT_BEACON_IPV4`/`_PORT`.
    beacon_ipv4: AtomicU64,
    beacon_port: AtomicU64,
}

/// The [`PortsState`] format this VMM writes and reads.
pub const PORTS_STATE_VERSION: u16 = 1;

/// The saved state of the cairn-guest port interface ([`GuestTelemetry::save_state`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct PortsState {
    pub version: u16,
    pub heartbeats: Vec<u64>,
    pub boot_stage: u64,
    pub block_result: u64,
    pub block_tests: u64,
    pub block_checksum: u64,
    pub pages_dirtied: u64,
    pub pending_command: u64,
    pub dirty_rate: u64,
    pub net_replies: u64,
    pub disk_io_counters: Vec<[u64; IO_STATS]>,
    /// The disk I/O command the guest took and has not finished: `[op, disk, sector,
    /// sectors, seed]` (it reads them again on the destination).
    pub disk_io_taken: Option<[u64; 5]>,
    /// The disk I/O command posted for the guest and not taken yet (`pending_command`
    /// says so): the destination hands it to the guest, which carries it out there
    /// (its waiter stayed on the source). Absent in states saved before it existed.
    #[serde(default)]
    pub disk_io_posted: Option<[u64; 5]>,
    /// The beacon's target: `[IPv4 as it sits in a packet, UDP port]` (absent: none).
    #[serde(default)]
    pub beacon: Option<[u64; 2]>,
}

fn args_of([op, disk, sector, sectors, seed]: [u64; 5]) -> DiskIoArgs {
    DiskIoArgs {
        op,
        disk: disk as u32,
        sector,
        sectors: sectors as u32,
        seed,
    }
}

fn saved_args(args: &DiskIoArgs) -> [u64; 5] {
    [
        args.op,
        u64::from(args.disk),
        args.sector,
        u64::from(args.sectors),
        args.seed,
    ]
}

impl GuestTelemetry {
    /// Telemetry for `vcpus` vCPUs; `dirty_end` is the end of the guest's dirty region.
    /// `epoch` is when VM creation began: first-heartbeat times are measured from it.
    pub fn new(
        vcpus: usize,
        tick: Duration,
        dirty_pages_per_second: u64,
        dirty_end: u64,
        epoch: Instant,
    ) -> Self {
        Self {
            epoch,
            heartbeats: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            last_heartbeat_us: AtomicU64::new(0),
            first_heartbeat: Mutex::new(None),
            first_heartbeat_seen: Condvar::new(),
            boot_stage: AtomicU64::new(0),
            block_result: AtomicU64::new(0),
            block_tests: AtomicU64::new(0),
            block_checksum: AtomicU64::new(0),
            pages_dirtied: AtomicU64::new(0),
            pending_command: AtomicU64::new(abi::CMD_NONE),
            limiter: Mutex::new(DirtyRateLimiter::new(dirty_pages_per_second, epoch)),
            tick_us: tick.as_micros().clamp(1, u128::from(u32::MAX)) as u64,
            dirty_end_page: dirty_end / 4096,
            net_ipv4: 0,
            net_replies: AtomicU64::new(0),
            disk_io: Mutex::new(DiskIoMailbox::default()),
            disk_io_done: Condvar::new(),
            disk_io_turn: Mutex::new(()),
            throttle_percent: AtomicU64::new(0),
            burn: std::sync::atomic::AtomicBool::new(false),
            beacon_ipv4: AtomicU64::new(0),
            beacon_port: AtomicU64::new(0),
        }
    }

    /// Points the built-in guest's beacon at `target` (a UDP datagram with its
    /// increasing counter every tick, see `guest/abi.inc`), or stops it (`None`).
    pub fn set_beacon(&self, target: Option<std::net::SocketAddrV4>) {
        let (address, port) = target.map_or((0, 0), |target| {
            (
                u64::from(u32::from_le_bytes(target.ip().octets())),
                u64::from(target.port()),
            )
        });
        self.beacon_port.store(port, Ordering::Release);
        self.beacon_ipv4.store(address, Ordering::Release);
    }

    /// Gives the guest `address` for its first network device (answered on
    /// `PORT_NET_IPV4` as the four bytes sit in a packet).
    pub fn with_net_ipv4(mut self, address: std::net::Ipv4Addr) -> Self {
        self.net_ipv4 = u32::from_le_bytes(address.octets());
        self
    }

    /// ARP and ICMP echo requests the guest has answered.
    pub fn net_replies(&self) -> u64 {
        self.net_replies.load(Ordering::Acquire)
    }

    /// The instant this VM's telemetry started (just before the VM was created).
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Time from the epoch to the first heartbeat, if there was one.
    pub fn first_heartbeat(&self) -> Option<Duration> {
        *self.first_heartbeat.lock().expect("telemetry lock")
    }

    /// Waits up to `timeout` for the first heartbeat; returns its time since the epoch.
    pub fn wait_first_heartbeat(&self, timeout: Duration) -> Option<Duration> {
        let guard = self.first_heartbeat.lock().expect("telemetry lock");
        let (guard, _) = self
            .first_heartbeat_seen
            .wait_timeout_while(guard, timeout, |first| first.is_none())
            .expect("telemetry lock");
        *guard
    }

    /// Time since the last heartbeat of any vCPU.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        let last = self.last_heartbeat_us.load(Ordering::Acquire);
        if last == 0 {
            return None;
        }
        let now = self.epoch.elapsed().as_micros() as u64;
        Some(Duration::from_micros(now.saturating_sub(last - 1)))
    }

    /// Forgets what belongs to the previous boot (boot stage, block result, pending
    /// command); counters and the first-heartbeat time stay.
    pub fn reset_for_boot(&self) {
        self.boot_stage.store(0, Ordering::Release);
        self.block_result.store(0, Ordering::Release);
        self.pending_command.store(abi::CMD_NONE, Ordering::Release);
        // The guest starts again with zero counters and no command in hand.
        let mut mailbox = self.disk_io.lock().expect("disk io lock");
        mailbox.posted = None;
        mailbox.taken = None;
        mailbox.counters = Default::default();
    }

    /// The guest's own I/O counters of disk `disk` as it last reported them
    /// (`IO_STAT_*` order; zeros before its first report).
    pub fn guest_disk_counters(&self, disk: usize) -> [u64; IO_STATS] {
        let mailbox = self.disk_io.lock().expect("disk io lock");
        mailbox.counters.get(disk).copied().unwrap_or_default()
    }

    /// Posts a disk I/O command for the built-in guest and waits up to `timeout` for its
    /// report. One command at a time: a second caller waits for the first.
    pub fn run_disk_io(
        &self,
        args: DiskIoArgs,
        timeout: Duration,
    ) -> Result<DiskIoReport, DiskIoWaitError> {
        let deadline = Instant::now() + timeout;
        let _turn = self.disk_io_turn.lock().expect("disk io turn lock");
        let ticket = {
            let mut mailbox = self.disk_io.lock().expect("disk io lock");
            mailbox.next_ticket += 1;
            mailbox.posted = Some((mailbox.next_ticket, args));
            mailbox.next_ticket
        };
        // The guest reads one command per tick: wait while another one is pending.
        while self
            .pending_command
            .compare_exchange(
                abi::CMD_NONE,
                abi::CMD_DISK_IO,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            if Instant::now() >= deadline {
                self.disk_io.lock().expect("disk io lock").posted = None;
                return Err(DiskIoWaitError::Busy(timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mailbox = self.disk_io.lock().expect("disk io lock");
        let (mut mailbox, _) = self
            .disk_io_done
            .wait_timeout_while(
                mailbox,
                deadline.saturating_duration_since(Instant::now()),
                |mailbox| mailbox.done.is_none_or(|(done, _, _)| done != ticket),
            )
            .expect("disk io lock");
        match mailbox.done {
            Some((done, result, checksum)) if done == ticket => Ok(DiskIoReport {
                result,
                checksum,
                counters: mailbox
                    .counters
                    .get(args.disk as usize)
                    .copied()
                    .unwrap_or_default(),
            }),
            _ if mailbox.posted.is_some_and(|(posted, _)| posted == ticket) => {
                // Withdraw it, so the guest never runs a command nobody waits for.
                mailbox.posted = None;
                let _ = self.pending_command.compare_exchange(
                    abi::CMD_DISK_IO,
                    abi::CMD_NONE,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                Err(DiskIoWaitError::NotTaken(timeout))
            }
            _ => Err(DiskIoWaitError::NotFinished(timeout)),
        }
    }

    fn disk_io_arg(&self, port: u64) -> u32 {
        let mailbox = self.disk_io.lock().expect("disk io lock");
        let Some((_, args)) = mailbox.taken else {
            return 0;
        };
        match port {
            abi::PORT_IO_OP => args.op as u32,
            abi::PORT_IO_DISK => args.disk,
            abi::PORT_IO_SECTOR_LO => args.sector as u32,
            abi::PORT_IO_SECTOR_HI => (args.sector >> 32) as u32,
            abi::PORT_IO_SECTORS => args.sectors,
            abi::PORT_IO_SEED_LO => args.seed as u32,
            abi::PORT_IO_SEED_HI => (args.seed >> 32) as u32,
            _ => 0,
        }
    }

    fn disk_io_report(&self, port: u64, value: u32) {
        let mut mailbox = self.disk_io.lock().expect("disk io lock");
        match port {
            abi::PORT_IO_CHECKSUM => mailbox.checksum = value,
            abi::PORT_IO_STAT_SELECT => mailbox.stat_select = value,
            abi::PORT_IO_STAT_LO => mailbox.stat_low = value,
            abi::PORT_IO_STAT_HI => {
                let select = mailbox.stat_select as usize;
                let counter = u64::from(value) << 32 | u64::from(mailbox.stat_low);
                if let Some(slot) = mailbox
                    .counters
                    .get_mut(select / IO_STATS)
                    .and_then(|disk| disk.get_mut(select % IO_STATS))
                {
                    *slot = counter;
                }
            }
            abi::PORT_IO_DONE => {
                let ticket = mailbox.taken.take().map_or(0, |(ticket, _)| ticket);
                let checksum = std::mem::take(&mut mailbox.checksum);
                mailbox.done = Some((ticket, u64::from(value), checksum));
                self.disk_io_done.notify_all();
            }
            _ => {}
        }
    }

    /// The guest-visible state of the port interface (migration): the guest's counters
    /// as last reported, its boot stage and block results, the pending command, the
    /// dirty rate and the disk I/O counters. Host-side times (first heartbeat, heartbeat
    /// age) are not state: the destination measures its own.
    pub fn save_state(&self) -> PortsState {
        let load = |counter: &AtomicU64| counter.load(Ordering::Acquire);
        let mailbox = self.disk_io.lock().expect("disk io lock");
        PortsState {
            version: PORTS_STATE_VERSION,
            heartbeats: self.heartbeats.iter().map(load).collect(),
            boot_stage: load(&self.boot_stage),
            block_result: load(&self.block_result),
            block_tests: load(&self.block_tests),
            block_checksum: load(&self.block_checksum),
            pages_dirtied: load(&self.pages_dirtied),
            pending_command: load(&self.pending_command),
            dirty_rate: self.dirty_rate(),
            net_replies: self.net_replies(),
            disk_io_counters: mailbox.counters.to_vec(),
            disk_io_taken: mailbox.taken.map(|(_, args)| saved_args(&args)),
            disk_io_posted: mailbox
                .posted
                .filter(|_| load(&self.pending_command) == abi::CMD_DISK_IO)
                .map(|(_, args)| saved_args(&args)),
            beacon: Some(load(&self.beacon_ipv4))
                .filter(|address| *address != 0)
                .map(|address| [address, load(&self.beacon_port)]),
        }
    }

    /// Takes over a saved port state.
    pub fn restore_state(&self, state: &PortsState) -> Result<(), String> {
        if state.version != PORTS_STATE_VERSION {
            return Err(format!(
                "guest port state version {} (this VMM reads {PORTS_STATE_VERSION})",
                state.version
            ));
        }
        if state.heartbeats.len() != self.heartbeats.len() {
            return Err(format!(
                "guest port state of {} vCPUs for a VM of {}",
                state.heartbeats.len(),
                self.heartbeats.len()
            ));
        }
        for (counter, value) in self.heartbeats.iter().zip(&state.heartbeats) {
            counter.store(*value, Ordering::Release);
        }
        self.boot_stage.store(state.boot_stage, Ordering::Release);
        self.block_result
            .store(state.block_result, Ordering::Release);
        self.block_tests.store(state.block_tests, Ordering::Release);
        self.block_checksum
            .store(state.block_checksum, Ordering::Release);
        self.pages_dirtied
            .store(state.pages_dirtied, Ordering::Release);
        self.pending_command
            .store(state.pending_command, Ordering::Release);
        self.net_replies.store(state.net_replies, Ordering::Release);
        self.set_dirty_rate(state.dirty_rate);
        let [address, port] = state.beacon.unwrap_or([0, 0]);
        self.beacon_port.store(port, Ordering::Release);
        self.beacon_ipv4.store(address, Ordering::Release);
        let mut mailbox = self.disk_io.lock().expect("disk io lock");
        for (slot, saved) in mailbox.counters.iter_mut().zip(&state.disk_io_counters) {
            *slot = *saved;
        }
        // The command's waiter stayed on the source; its report here finds none.
        mailbox.taken = state.disk_io_taken.map(|saved| (0, args_of(saved)));
        mailbox.posted = state.disk_io_posted.map(|saved| (0, args_of(saved)));
        if state.pending_command == abi::CMD_DISK_IO && mailbox.posted.is_none() {
            // A state from before `disk_io_posted`: the command's arguments are lost,
            // so it is not handed to the guest at all.
            self.pending_command.store(abi::CMD_NONE, Ordering::Release);
        }
        Ok(())
    }

    /// Turns burn mode on or off (see the `burn` field).
    pub fn set_burn(&self, on: bool) {
        self.burn.store(on, Ordering::Release);
    }

    /// Whether burn mode is on.
    pub fn burning(&self) -> bool {
        self.burn.load(Ordering::Acquire)
    }

    /// Throttles the guest's metered dirtying to `percent` of its rate less (migration's
    /// auto-converge: the built-in guest's dirtier is paced by the VMM, so pausing its
    /// vCPUs alone would not slow it; a CPU-bound dirtier slows with its vCPU time).
    pub fn set_throttle(&self, percent: u8) {
        self.throttle_percent
            .store(u64::from(percent.min(99)), Ordering::Release);
    }

    /// The dirty-page rate in pages per second.
    pub fn dirty_rate(&self) -> u64 {
        self.limiter.lock().expect("limiter lock").rate()
    }

    /// Sets the dirty-page rate in pages per second.
    pub fn set_dirty_rate(&self, pages_per_second: u64) {
        self.limiter
            .lock()
            .expect("limiter lock")
            .set_rate(pages_per_second, Instant::now());
    }

    /// The block self-test result.
    pub fn block_test(&self) -> BlockTestResult {
        BlockTestResult::from_port_value(self.block_result.load(Ordering::Acquire))
    }

    /// Whether `port` belongs to this interface.
    pub fn owns(port: u16) -> bool {
        (abi::PORT_FIRST..=abi::PORT_LAST).contains(&u64::from(port))
    }

    /// A guest `in` from `port`.
    pub fn read(&self, port: u16) -> u32 {
        match u64::from(port) {
            abi::PORT_TICK_US => self.tick_us as u32,
            abi::PORT_DIRTY_END => self.dirty_end_page.min(u64::from(u32::MAX)) as u32,
            abi::PORT_DIRTY_QUOTA => {
                let granted = self
                    .limiter
                    .lock()
                    .expect("limiter lock")
                    .take(Instant::now());
                let throttle = self.throttle_percent.load(Ordering::Acquire);
                let granted = granted * (100 - throttle) / 100;
                granted.min(u64::from(u32::MAX)) as u32
            }
            abi::PORT_COMMAND => {
                let command = self.pending_command.swap(abi::CMD_NONE, Ordering::AcqRel);
                if command == abi::CMD_DISK_IO {
                    let mut mailbox = self.disk_io.lock().expect("disk io lock");
                    mailbox.taken = mailbox.posted.take();
                }
                command as u32
            }
            port @ abi::PORT_IO_OP..=abi::PORT_IO_SEED_HI => self.disk_io_arg(port),
            abi::PORT_NET_IPV4 => self.net_ipv4,
            abi::PORT_BEACON_IPV4 => self.beacon_ipv4.load(Ordering::Acquire) as u32,
            abi::PORT_BEACON_PORT => self.beacon_port.load(Ordering::Acquire) as u32,
            _ => 0,
        }
    }

    /// A guest `out` of `value` to `port` from vCPU `vcpu`.
    pub fn write(&self, vcpu: usize, port: u16, value: u32) -> PortAction {
        let value = u64::from(value);
        match u64::from(port) {
            abi::PORT_HEARTBEAT => {
                if let Some(counter) = self.heartbeats.get(vcpu) {
                    counter.store(value, Ordering::Release);
                }
                let now = self.epoch.elapsed();
                self.last_heartbeat_us
                    .store(now.as_micros() as u64 + 1, Ordering::Release);
                let mut first = self.first_heartbeat.lock().expect("telemetry lock");
                if first.is_none() {
                    *first = Some(now);
                    self.first_heartbeat_seen.notify_all();
                    return PortAction::FirstHeartbeat;
                }
                PortAction::Continue
            }
            abi::PORT_DIRTY_DONE => {
                self.pages_dirtied.fetch_add(value, Ordering::AcqRel);
                PortAction::Continue
            }
            abi::PORT_SLEEP_US if self.burning() => PortAction::Continue,
            abi::PORT_SLEEP_US => PortAction::Sleep(Duration::from_micros(value)),
            abi::PORT_BLOCK_CHECKSUM => {
                self.block_checksum.store(value, Ordering::Release);
                PortAction::Continue
            }
            abi::PORT_BLOCK_RESULT => {
                self.block_result.store(value, Ordering::Release);
                self.block_tests.fetch_add(1, Ordering::AcqRel);
                PortAction::Continue
            }
            abi::PORT_NET_REPLIED => {
                self.net_replies.fetch_add(1, Ordering::AcqRel);
                PortAction::Continue
            }
            abi::PORT_BOOT_STAGE => {
                self.boot_stage.store(value, Ordering::Release);
                PortAction::Continue
            }
            port @ abi::PORT_IO_CHECKSUM..=abi::PORT_IO_DONE => {
                self.disk_io_report(port, value as u32);
                PortAction::Continue
            }
            abi::PORT_ACK => match value {
                abi::CMD_POWER_OFF => PortAction::PowerOff,
                abi::CMD_REBOOT => PortAction::Reboot,
                _ => PortAction::Continue,
            },
            _ => PortAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_meets_the_rate_over_a_second_whatever_the_tick() {
        let start = Instant::now();
        let mut limiter = DirtyRateLimiter::new(1000, start);
        let mut granted = 0;
        for tick in 1..=300u64 {
            granted += limiter.take(start + Duration::from_micros(tick * 3_333));
        }
        assert!(
            (995..=1000).contains(&granted),
            "about 1000 pages in one second: {granted}"
        );
    }

    #[test]
    fn limiter_bursts_at_most_one_second() {
        let start = Instant::now();
        let mut limiter = DirtyRateLimiter::new(500, start);
        assert_eq!(limiter.take(start + Duration::from_secs(10)), 500);
        limiter.set_rate(0, start + Duration::from_secs(11));
        assert_eq!(limiter.take(start + Duration::from_secs(12)), 0);
    }

    #[test]
    fn heartbeats_and_commands_flow_through_ports() {
        let telemetry =
            GuestTelemetry::new(2, Duration::from_millis(10), 0, 8 << 20, Instant::now());
        assert_eq!(telemetry.read(abi::PORT_TICK_US as u16), 10_000);
        assert_eq!(telemetry.read(abi::PORT_DIRTY_END as u16), 2048);
        assert!(telemetry.heartbeat_age().is_none());
        assert_eq!(
            telemetry.write(1, abi::PORT_HEARTBEAT as u16, 7),
            PortAction::FirstHeartbeat
        );
        assert_eq!(
            telemetry.write(1, abi::PORT_HEARTBEAT as u16, 8),
            PortAction::Continue
        );
        assert_eq!(telemetry.heartbeats[1].load(Ordering::Acquire), 8);
        assert!(telemetry.first_heartbeat().is_some());
        assert!(telemetry.heartbeat_age().expect("age") < Duration::from_secs(1));
        telemetry
            .pending_command
            .store(abi::CMD_POWER_OFF, Ordering::Release);
        assert_eq!(
            u64::from(telemetry.read(abi::PORT_COMMAND as u16)),
            abi::CMD_POWER_OFF
        );
        assert_eq!(
            u64::from(telemetry.read(abi::PORT_COMMAND as u16)),
            abi::CMD_NONE,
            "a command is read once"
        );
        assert_eq!(
            telemetry.write(0, abi::PORT_ACK as u16, abi::CMD_POWER_OFF as u32),
            PortAction::PowerOff
        );
        assert_eq!(
            telemetry.write(0, abi::PORT_SLEEP_US as u16, 250),
            PortAction::Sleep(Duration::from_micros(250))
        );
        telemetry.write(0, abi::PORT_BLOCK_RESULT as u16, abi::BLOCK_PASS as u32);
        assert_eq!(telemetry.block_test(), BlockTestResult::Pass);
        assert_eq!(
            telemetry.read(abi::PORT_NET_IPV4 as u16),
            0,
            "no address given"
        );
    }

    #[test]
    fn the_guest_reads_its_address_as_packet_bytes_and_counts_replies() {
        let telemetry =
            GuestTelemetry::new(1, Duration::from_millis(10), 0, 8 << 20, Instant::now())
                .with_net_ipv4(std::net::Ipv4Addr::new(10, 213, 0, 2));
        // `in eax` then `cmp eax, [packet]`: the dword must equal the bytes in order.
        let value = telemetry.read(abi::PORT_NET_IPV4 as u16);
        assert_eq!(value.to_le_bytes(), [10, 213, 0, 2]);
        telemetry.write(0, abi::PORT_NET_REPLIED as u16, 1);
        telemetry.write(0, abi::PORT_NET_REPLIED as u16, 1);
        assert_eq!(telemetry.net_replies(), 2);
    }
}
