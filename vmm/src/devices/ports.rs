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
        }
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
                granted.min(u64::from(u32::MAX)) as u32
            }
            abi::PORT_COMMAND => self.pending_command.swap(abi::CMD_NONE, Ordering::AcqRel) as u32,
            abi::PORT_NET_IPV4 => self.net_ipv4,
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
