//! Live migration, `cairn-vmm` to `cairn-vmm` over TCP, pre-copy with auto-converge and
//! one commit point. The protocol, its phases and failure cases are described in
//! vmm/ARCHITECTURE.md ("Live migration"); this module is its two ends:
//! [`run_source`] (a thread of the running VM, started by the `migrate` control request)
//! and [`receive`] (the destination, `cairn-vmm --incoming ADDR`, before its VM starts).
//!
//! Architecture invariant: exactly one side runs the guest. The source stops its vCPUs
//! for good once it has begun sending the final state: after that only a decision of
//! the commander (`migrate-commit`, `migrate-abort` on the control socket) ends the
//! pause; a failure before that point resumes the source by itself. The destination
//! never starts without a commit.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::control::wire::MigrationStatus;
use crate::memory::{DirtyBitmap, GuestRam, PAGE_SIZE, ram_ranges};
use crate::state::VmState;

/// The protocol's version, in the `hello` frame.
pub const PROTOCOL_VERSION: u32 = 1;

/// Frame kinds. A frame is `kind: u8`, `length: u32` (little endian), `length` bytes.
pub(crate) mod frame {
    /// Source → destination: JSON [`super::Hello`].
    pub const HELLO: u8 = 1;
    /// Destination → source: the configuration matches; send memory.
    pub const HELLO_OK: u8 = 2;
    /// Source → destination: pages, each `guest-physical address: u64` + 4096 bytes.
    pub const PAGES: u8 = 3;
    /// Source → destination: JSON [`crate::state::VmState`], the last frame of data.
    pub const STATE: u8 = 4;
    /// Destination → source: everything received and restored; waiting for the commit.
    pub const READY: u8 = 5;
    /// Source → destination: the commander committed; start.
    pub const COMMIT: u8 = 6;
    /// Destination → source: started.
    pub const STARTED: u8 = 7;
    /// Source → destination: the commander aborted; discard.
    pub const ABORT: u8 = 8;
    /// Either way: UTF-8 text of why this side gives up.
    pub const ERROR: u8 = 9;
    /// Source → destination: the end of a pre-copy round; answer with `SYNC_ACK` once
    /// everything before it was received (the link rate is measured to that answer, not
    /// to the socket buffer).
    pub const SYNC: u8 = 10;
    /// Destination → source: the round arrived.
    pub const SYNC_ACK: u8 = 11;
    /// Fault tolerance (`crate::ft`), primary → secondary: pages of the checkpoint
    /// being sent, like `PAGES`; the secondary stages them until `CKPT_END`.
    pub const CKPT_PAGES: u8 = 12;
    /// Primary → secondary: guest disk writes of the checkpoint, each `disk: u32`,
    /// `offset: u64`, `length: u32`, bytes; staged until `CKPT_END`.
    pub const CKPT_DISK: u8 = 13;
    /// Primary → secondary: JSON `crate::ft::CheckpointEnd` (epoch and VM state), the
    /// checkpoint's last frame: the secondary applies what it staged, then acknowledges.
    pub const CKPT_END: u8 = 14;
    /// Secondary → primary: checkpoint `epoch: u64` is complete and durable there.
    pub const CKPT_ACK: u8 = 15;
    /// Primary → secondary: disk contents of the initial copy (the `CKPT_DISK` record),
    /// written at once.
    pub const DISK_SYNC: u8 = 16;
}

/// Largest frame accepted (a state with 64 vCPUs is well under this).
const MAX_FRAME: u32 = 64 << 20;
/// Pages per `PAGES` frame.
pub(crate) const PAGES_PER_FRAME: usize = 256;
/// Most pre-copy rounds before the switch-over is forced (auto-converge has throttled
/// the guest hard by then).
pub const MAX_ROUNDS: u32 = 30;
/// How long a socket read or write may block before the link counts as broken.
pub(crate) const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// A round smaller than this says little about the link (it fits in socket buffers and
/// one round trip dominates): it neither measures the rate nor needs one to be sent in
/// the final round.
const SMALL_ROUND_BYTES: u64 = 256 << 10;

/// What the source says first: enough of its configuration to refuse a destination
/// that could not hold the VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Disks.
    pub disks: u32,
    /// NICs.
    pub nics: u32,
    /// Built-in guest (`true`) or Linux.
    pub builtin: bool,
}

/// What the commander decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The commit point was recorded: the destination runs the VM.
    Commit,
    /// Give up: the source runs the VM.
    Abort,
}

#[derive(Debug, Default)]
struct CellInner {
    status: Option<MigrationStatus>,
    decision: Option<Decision>,
    freeze: Option<Result<VmState, String>>,
    resume: Option<Result<(), String>>,
    states: Option<[String; 2]>,
    active: bool,
}

/// The migration's shared state: its status for the control socket, the commander's
/// decision, and the supervising loop's answers to freeze and resume.
#[derive(Debug, Default)]
pub struct MigrationCell {
    inner: Mutex<CellInner>,
    changed: Condvar,
}

impl MigrationCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, CellInner> {
        self.inner.lock().expect("migration lock")
    }

    /// The current status, if a migration ever began.
    pub fn status(&self) -> Option<MigrationStatus> {
        self.lock().status.clone()
    }

    /// Changes the status.
    pub fn update(&self, change: impl FnOnce(&mut MigrationStatus)) {
        let mut inner = self.lock();
        if let Some(status) = &mut inner.status {
            change(status);
        }
        self.changed.notify_all();
    }

    /// Begins a migration; refuses a second one while the first is active.
    pub fn begin(&self, status: MigrationStatus) -> Result<(), String> {
        let mut inner = self.lock();
        if inner.active {
            return Err("a migration is already under way".into());
        }
        *inner = CellInner {
            status: Some(status),
            active: true,
            ..CellInner::default()
        };
        Ok(())
    }

    /// Whether a migration is under way.
    pub fn active(&self) -> bool {
        self.lock().active
    }

    /// The migration ended (committed, aborted, failed and resumed).
    pub fn end(&self) {
        self.lock().active = false;
        self.changed.notify_all();
    }

    /// Records the commander's decision (the first one stands).
    pub fn decide(&self, decision: Decision) -> Result<(), String> {
        let mut inner = self.lock();
        if !inner.active {
            return Err("no migration is under way".into());
        }
        match inner.decision {
            Some(earlier) if earlier != decision => {
                return Err(format!(
                    "the migration was already told to {}",
                    match earlier {
                        Decision::Commit => "commit",
                        Decision::Abort => "abort",
                    }
                ));
            }
            _ => inner.decision = Some(decision),
        }
        self.changed.notify_all();
        Ok(())
    }

    /// The decision, if one was made.
    pub fn decision(&self) -> Option<Decision> {
        self.lock().decision
    }

    /// Waits until a decision is made; returns it.
    pub fn wait_decision(&self) -> Decision {
        let inner = self.lock();
        let inner = self
            .changed
            .wait_while(inner, |inner| inner.decision.is_none())
            .expect("migration lock");
        inner.decision.expect("waited for it")
    }

    /// Waits up to `timeout` for the status to satisfy `done`.
    pub fn wait_status(
        &self,
        timeout: Duration,
        done: impl Fn(&MigrationStatus) -> bool,
    ) -> Option<MigrationStatus> {
        let inner = self.lock();
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |inner| {
                !inner.status.as_ref().is_some_and(&done)
            })
            .expect("migration lock");
        inner.status.clone()
    }

    pub(crate) fn set_freeze(&self, result: Result<VmState, String>) {
        self.lock().freeze = Some(result);
        self.changed.notify_all();
    }

    pub(crate) fn set_resume(&self, result: Result<(), String>) {
        self.lock().resume = Some(result);
        self.changed.notify_all();
    }

    pub(crate) fn wait_freeze(&self, timeout: Duration) -> Result<VmState, String> {
        let inner = self.lock();
        let (mut inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |inner| inner.freeze.is_none())
            .expect("migration lock");
        inner
            .freeze
            .take()
            .unwrap_or_else(|| Err(format!("the VM did not stop within {timeout:?}")))
    }

    pub(crate) fn wait_resume(&self, timeout: Duration) -> Result<(), String> {
        let inner = self.lock();
        let (mut inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |inner| inner.resume.is_none())
            .expect("migration lock");
        inner
            .resume
            .take()
            .unwrap_or_else(|| Err(format!("the VM did not resume within {timeout:?}")))
    }

    /// Forgets a migration status (an FT secondary is built like a destination but is
    /// none).
    pub(crate) fn clear(&self) {
        *self.lock() = CellInner::default();
    }

    /// The destination's received and re-saved state (JSON).
    pub fn states(&self) -> Option<[String; 2]> {
        self.lock().states.clone()
    }

    fn set_states(&self, states: [String; 2]) {
        self.lock().states = Some(states);
    }
}

pub(crate) fn write_frame(writer: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    writer.write_all(&[kind])?;
    writer.write_all(&(payload.len() as u32).to_le_bytes())?;
    writer.write_all(payload)
}

pub(crate) fn read_frame(reader: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    reader.read_exact(&mut header)?;
    let length = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    if length > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {length} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut payload = vec![0u8; length as usize];
    reader.read_exact(&mut payload)?;
    Ok((header[0], payload))
}

pub(crate) fn error_text(kind: u8, payload: &[u8]) -> String {
    if kind == frame::ERROR {
        format!("the peer gave up: {}", String::from_utf8_lossy(payload))
    } else {
        format!("unexpected frame kind {kind}")
    }
}

/// What the source thread needs of the VM; implemented by [`crate::VmHandle`].
pub trait SourceVm: Send + Sync {
    /// Guest RAM.
    fn ram(&self) -> &GuestRam;
    /// The migration cell.
    fn cell(&self) -> &MigrationCell;
    /// Turns dirty logging on or off.
    fn set_dirty_logging(&self, on: bool) -> Result<(), String>;
    /// Reads and clears the dirty log (KVM's and the VMM's).
    fn take_dirty(&self) -> Result<DirtyBitmap, String>;
    /// Reads and clears the VMM's own bitmap only (to count it separately).
    fn take_vmm_dirty(&self) -> DirtyBitmap;
    /// Asks the supervising loop to stop the vCPUs and save the state (answered through
    /// the cell).
    fn request_freeze(&self);
    /// Asks the supervising loop to start the vCPUs again (answered through the cell).
    fn request_resume(&self);
    /// Tells the supervising loop the VM now runs elsewhere: it ends, exit 0.
    fn committed(&self, peer: &str);
    /// Pauses or resumes the vCPUs (auto-converge's duty cycle).
    fn pause(&self, paused: bool);
    /// Scales the built-in guest's metered dirtying down by `percent`.
    fn set_throttle(&self, percent: u8);
}

/// Sends pages as `PAGES` frames; returns the pages sent and the time spent writing to
/// the socket (the link's share, without reading and zero-checking memory). `skip_zero`
/// leaves out pages that are all zeros (the first round: the destination's fresh
/// memory is zero).
pub(crate) fn send_pages(
    writer: &mut impl Write,
    ram: &GuestRam,
    pages: impl Iterator<Item = u64>,
    skip_zero: bool,
) -> io::Result<(u64, Duration)> {
    let mut writing = Duration::ZERO;
    let mut frame_buffer = Vec::with_capacity(PAGES_PER_FRAME * (8 + PAGE_SIZE as usize));
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut in_frame = 0;
    let mut sent = 0;
    for address in pages {
        ram.memory()
            .read_slice(&mut page, GuestAddress(address))
            .map_err(|error| io::Error::other(format!("page {address:#x}: {error}")))?;
        if skip_zero && page.iter().all(|byte| *byte == 0) {
            continue;
        }
        frame_buffer.extend_from_slice(&address.to_le_bytes());
        frame_buffer.extend_from_slice(&page);
        in_frame += 1;
        sent += 1;
        if in_frame == PAGES_PER_FRAME {
            let start = Instant::now();
            write_frame(writer, frame::PAGES, &frame_buffer)?;
            writing += start.elapsed();
            frame_buffer.clear();
            in_frame = 0;
        }
    }
    let start = Instant::now();
    if in_frame > 0 {
        write_frame(writer, frame::PAGES, &frame_buffer)?;
    }
    writer.flush()?;
    writing += start.elapsed();
    Ok((sent, writing))
}

pub(crate) fn all_pages(ram: &GuestRam) -> impl Iterator<Item = u64> {
    ram_ranges(ram.size_bytes())
        .into_iter()
        .flat_map(|(start, length)| {
            (0..length / PAGE_SIZE).map(move |page| start + page * PAGE_SIZE)
        })
}

pub(crate) fn union(mut first: DirtyBitmap, second: &DirtyBitmap) -> DirtyBitmap {
    for ((_, words), (_, other)) in first.ranges.iter_mut().zip(&second.ranges) {
        for (word, other) in words.iter_mut().zip(other) {
            *word |= other;
        }
    }
    first
}

/// Parameters of a `migrate` request.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    /// Destination `HOST:PORT`.
    pub to: String,
    /// The downtime the final round may take.
    pub max_downtime: Duration,
    /// No pre-copy: stop first, then send everything (the benchmark's baseline).
    pub stop_and_copy: bool,
}

/// Where the source failed: before the final state began to leave (the source may
/// resume by itself) or after (only the commander may decide).
enum SourceFailure {
    BeforeFinal(String),
    AfterFinal(String),
}

/// Auto-converge's duty cycle: pauses the vCPUs for `percent` of every 50 ms.
struct Throttle {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    percent: Arc<std::sync::atomic::AtomicU8>,
}

impl Throttle {
    fn new(vm: Arc<dyn SourceVm>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let percent = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let percent = Arc::clone(&percent);
            thread::Builder::new()
                .name("migrate-throttle".into())
                .spawn(move || {
                    const PERIOD: Duration = Duration::from_millis(50);
                    while !stop.load(Ordering::Acquire) {
                        let share = u32::from(percent.load(Ordering::Acquire));
                        if share == 0 {
                            thread::sleep(PERIOD);
                            continue;
                        }
                        vm.pause(true);
                        thread::sleep(PERIOD * share / 100);
                        vm.pause(false);
                        thread::sleep(PERIOD * (100 - share) / 100);
                    }
                })
                .ok()
        };
        Self {
            stop,
            thread,
            percent,
        }
    }

    fn set(&self, percent: u8) {
        self.percent.store(percent, Ordering::Release);
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The source side: runs on its own thread until the migration is committed (the
/// supervising loop then ends the VM), aborted or failed (the VM runs again here), or
/// failed after the final state left (paused until the commander decides).
pub fn run_source(vm: Arc<dyn SourceVm>, request: MigrateRequest, hello: Hello) {
    let started = Instant::now();
    let mut throttle = Throttle::new(Arc::clone(&vm));
    let outcome = precopy_and_switch(&vm, &request, &hello, started, &mut throttle);
    throttle.stop();
    vm.set_throttle(0);
    let cell = vm.cell();
    let (writer, reader) = match outcome {
        Ok(link) => link,
        Err(SourceFailure::BeforeFinal(error)) => {
            // The destination cannot have the final state: the VM is ours to run.
            let _ = vm.set_dirty_logging(false);
            let resumed = resume(vm.as_ref());
            // An abort the commander asked for during pre-copy is no failure.
            let aborted = cell.decision() == Some(Decision::Abort);
            cell.update(|status| {
                status.phase = if aborted { "aborted" } else { "failed-resumed" }.into();
                status.error = Some(match &resumed {
                    Ok(()) => error.clone(),
                    Err(resume_error) => format!("{error}; resuming failed too: {resume_error}"),
                });
            });
            cell.end();
            return;
        }
        Err(SourceFailure::AfterFinal(error)) => {
            cell.update(|status| {
                status.phase = "failed-paused".into();
                status.error = Some(format!(
                    "{error}; the destination may hold the final state, so this VM stays paused until migrate-commit or migrate-abort"
                ));
            });
            (None, None)
        }
    };
    match cell.wait_decision() {
        Decision::Commit => {
            let mut destination_started = false;
            if let (Some(mut writer), Some(mut reader)) = (writer, reader)
                && write_frame(&mut writer, frame::COMMIT, &[])
                    .and_then(|()| writer.flush())
                    .is_ok()
            {
                destination_started = matches!(read_frame(&mut reader), Ok((frame::STARTED, _)));
            }
            cell.update(|status| {
                status.phase = "committed".into();
                status.destination_started = destination_started;
            });
            vm.committed(&request.to);
            cell.end();
        }
        Decision::Abort => {
            if let Some(mut writer) = writer {
                let _ = write_frame(&mut writer, frame::ABORT, &[]).and_then(|()| writer.flush());
            }
            let _ = vm.set_dirty_logging(false);
            let resumed = resume(vm.as_ref());
            cell.update(|status| {
                status.phase = "aborted".into();
                if let Err(error) = &resumed {
                    status.error = Some(format!("resuming failed: {error}"));
                }
            });
            cell.end();
        }
    }
}

fn resume(vm: &dyn SourceVm) -> Result<(), String> {
    vm.request_resume();
    vm.cell().wait_resume(Duration::from_secs(10))
}

type Link = (Option<BufWriter<TcpStream>>, Option<BufReader<TcpStream>>);

fn precopy_and_switch(
    vm: &Arc<dyn SourceVm>,
    request: &MigrateRequest,
    hello: &Hello,
    started: Instant,
    throttle: &mut Throttle,
) -> Result<Link, SourceFailure> {
    use SourceFailure::{AfterFinal, BeforeFinal};
    let cell = vm.cell();
    let ram = vm.ram();
    let before = |what: &str| {
        let what = what.to_string();
        move |error: io::Error| BeforeFinal(format!("{what}: {error}"))
    };
    let address = request
        .to
        .to_socket_addrs()
        .map_err(before("resolving the destination"))?
        .next()
        .ok_or_else(|| BeforeFinal(format!("{} resolves to no address", request.to)))?;
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .map_err(before("connecting to the destination"))?;
    stream.set_nodelay(true).map_err(before("TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(LINK_TIMEOUT))
        .map_err(before("socket timeout"))?;
    stream
        .set_write_timeout(Some(LINK_TIMEOUT))
        .map_err(before("socket timeout"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(before("socket"))?);
    let mut writer = BufWriter::with_capacity(1 << 20, stream);
    let hello_json = serde_json::to_vec(hello).expect("hello serializes");
    write_frame(&mut writer, frame::HELLO, &hello_json)
        .and_then(|()| writer.flush())
        .map_err(before("sending hello"))?;
    match read_frame(&mut reader).map_err(before("reading the destination's answer"))? {
        (frame::HELLO_OK, _) => {}
        (kind, payload) => return Err(BeforeFinal(error_text(kind, &payload))),
    }

    vm.set_dirty_logging(true).map_err(BeforeFinal)?;
    // The VMM's own bitmap has tracked every write since boot; only those from now on
    // matter (the first round copies everything).
    let _ = vm.take_vmm_dirty();
    let mut bytes_sent = 0u64;
    let mut pages_sent = 0u64;
    let mut send_time = Duration::ZERO;
    // The link rate from the pre-copy rounds big enough to say something, each timed
    // from its first page to the destination's SYNC_ACK.
    let mut rate_bytes = 0u64;
    let mut rate_time = Duration::ZERO;
    let account = |pages: u64,
                   elapsed: Duration,
                   bytes_sent: &mut u64,
                   pages_sent: &mut u64,
                   send_time: &mut Duration| {
        *pages_sent += pages;
        *bytes_sent += pages * (8 + PAGE_SIZE) + 5 * pages.div_ceil(PAGES_PER_FRAME as u64);
        *send_time += elapsed;
        cell.update(|status| {
            status.rounds += 1;
            status.pages = *pages_sent;
            status.bytes = *bytes_sent;
            status.total_ms = started.elapsed().as_secs_f64() * 1000.0;
        });
    };
    let sync_round = |writer: &mut BufWriter<TcpStream>,
                      reader: &mut BufReader<TcpStream>,
                      pages: u64,
                      round_start: Instant,
                      rate_bytes: &mut u64,
                      rate_time: &mut Duration|
     -> Result<(), SourceFailure> {
        write_frame(writer, frame::SYNC, &[])
            .and_then(|()| writer.flush())
            .map_err(before("ending a round"))?;
        match read_frame(reader).map_err(before("waiting for the round's acknowledgement"))? {
            (frame::SYNC_ACK, _) => {}
            (kind, payload) => return Err(BeforeFinal(error_text(kind, &payload))),
        }
        let bytes = pages * (8 + PAGE_SIZE);
        if bytes >= SMALL_ROUND_BYTES {
            *rate_bytes += bytes;
            *rate_time += round_start.elapsed();
            let rate = *rate_bytes as f64 / rate_time.as_secs_f64().max(1e-6) / 1e6;
            cell.update(|status| status.link_mb_per_s = rate);
        }
        Ok(())
    };

    // Stop-and-copy (the benchmark's baseline): no pre-copy round at all.
    let pending = if request.stop_and_copy {
        None
    } else {
        // Round 1: everything the guest ever wrote.
        let round_start = Instant::now();
        let (pages, writing) =
            send_pages(&mut writer, ram, all_pages(ram), true).map_err(before("sending memory"))?;
        account(
            pages,
            writing,
            &mut bytes_sent,
            &mut pages_sent,
            &mut send_time,
        );
        sync_round(
            &mut writer,
            &mut reader,
            pages,
            round_start,
            &mut rate_bytes,
            &mut rate_time,
        )?;

        let mut previous_dirty = u64::MAX;
        let mut throttle_percent = 0u8;
        let pending = loop {
            if cell.decision() == Some(Decision::Abort) {
                return Err(BeforeFinal(
                    "aborted by the commander during pre-copy".into(),
                ));
            }
            let vmm_only = vm.take_vmm_dirty();
            let dirty = union(vm.take_dirty().map_err(BeforeFinal)?, &vmm_only);
            let count = dirty.count();
            cell.update(|status| {
                status.dirty_pages_per_round.push(count);
                status.vmm_dirty_pages_per_round.push(vmm_only.count());
            });
            let remainder = count * (PAGE_SIZE + 8);
            let rounds = cell.status().map_or(0, |status| status.rounds);
            let fits = remainder <= SMALL_ROUND_BYTES
                || (rate_bytes > 0
                    && remainder as f64 / rate_bytes as f64 * rate_time.as_secs_f64()
                        <= request.max_downtime.as_secs_f64());
            if fits || rounds >= MAX_ROUNDS {
                break dirty;
            }
            // Not shrinking by a quarter a round: the guest dirties about as fast as the
            // link carries. Throttle its vCPUs harder each such round.
            if rounds >= 2 && count * 4 > previous_dirty * 3 {
                throttle_percent = (throttle_percent + 20).min(95);
                throttle.set(throttle_percent);
                vm.set_throttle(throttle_percent);
                cell.update(|status| status.throttle_percent = throttle_percent);
            }
            previous_dirty = count;
            let round_start = Instant::now();
            let (pages, writing) = send_pages(&mut writer, ram, dirty.pages(), false)
                .map_err(before("sending memory"))?;
            account(
                pages,
                writing,
                &mut bytes_sent,
                &mut pages_sent,
                &mut send_time,
            );
            sync_round(
                &mut writer,
                &mut reader,
                pages,
                round_start,
                &mut rate_bytes,
                &mut rate_time,
            )?;
        };
        Some(pending)
    };

    // Switch-over: the vCPUs stop for good here (until a decision or a failure before
    // the final state leaves), block requests are drained and flushed, state is saved.
    // The duty cycle ends before the stop (its thread joined, the vCPUs running), so
    // no late pause or resume of it can touch the vCPUs after the freeze.
    throttle.stop();
    vm.set_throttle(0);
    vm.pause(false);
    cell.update(|status| status.phase = "stop-and-copy".into());
    let paused_at = Instant::now();
    vm.request_freeze();
    let state = cell
        .wait_freeze(Duration::from_secs(10))
        .map_err(BeforeFinal)?;
    let vmm_only = vm.take_vmm_dirty();
    let last = union(
        vm.take_dirty().map_err(|error| {
            // The vCPUs are stopped but nothing left yet: resuming is safe.
            BeforeFinal(error)
        })?,
        &vmm_only,
    );
    cell.update(|status| {
        status.dirty_pages_per_round.push(last.count());
        status.vmm_dirty_pages_per_round.push(vmm_only.count());
    });
    let (pages, writing) = match pending {
        Some(pending) => send_pages(&mut writer, ram, union(last, &pending).pages(), false),
        None => send_pages(&mut writer, ram, all_pages(ram), true),
    }
    .map_err(before("sending the last memory round"))?;
    account(
        pages,
        writing,
        &mut bytes_sent,
        &mut pages_sent,
        &mut send_time,
    );
    let state_json = serde_json::to_vec(&state).expect("state serializes");
    // From the first byte of the state on, the destination may end up with all of it.
    let after = |what: &'static str| move |error: io::Error| AfterFinal(format!("{what}: {error}"));
    write_frame(&mut writer, frame::STATE, &state_json)
        .and_then(|()| writer.flush())
        .map_err(after("sending the final state"))?;
    bytes_sent += state_json.len() as u64 + 5;
    match read_frame(&mut reader).map_err(after("waiting for the destination's ready"))? {
        (frame::READY, _) => {}
        (kind, payload) => return Err(AfterFinal(error_text(kind, &payload))),
    }
    let paused_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
    cell.update(|status| {
        status.phase = "ready-to-commit".into();
        status.bytes = bytes_sent;
        status.paused_ms = paused_ms;
        status.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    });
    Ok((Some(writer), Some(reader)))
}

/// What the destination needs of its VM before it starts; implemented by [`crate::Vm`].
pub trait DestinationVm {
    /// Guest RAM.
    fn ram(&self) -> &GuestRam;
    /// The migration cell (shared with the control socket).
    fn cell(&self) -> &MigrationCell;
    /// This VM's [`Hello`], to compare with the source's.
    fn hello(&self) -> Hello;
    /// Restores the state into the VM.
    fn restore(&mut self, state: &VmState) -> Result<(), String>;
    /// Saves the restored state again (the save → restore → save check).
    fn resave(&mut self) -> Result<VmState, String>;
}

/// The destination side: accepts one source on `listener`, receives memory and state,
/// answers ready, and waits for the commander. Returns the decision and the link (for
/// [`confirm_started`]); a failure before ready is an error (nothing to run).
pub fn receive(
    vm: &mut dyn DestinationVm,
    listener: &TcpListener,
) -> Result<(Decision, Option<TcpStream>), String> {
    let started = Instant::now();
    listener
        .set_nonblocking(true)
        .map_err(|error| format!("listening socket: {error}"))?;
    let stream = loop {
        if vm.cell().decision() == Some(Decision::Abort) {
            return Ok((Decision::Abort, None));
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                vm.cell().update(|status| {
                    status.phase = "receiving".into();
                    status.peer = peer.to_string();
                });
                break stream;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(error) => return Err(format!("accepting the source: {error}")),
        }
    };
    let io_error = |what: &'static str| move |error: io::Error| format!("{what}: {error}");
    stream.set_nonblocking(false).map_err(io_error("socket"))?;
    stream.set_nodelay(true).map_err(io_error("socket"))?;
    stream
        .set_read_timeout(Some(LINK_TIMEOUT))
        .map_err(io_error("socket"))?;
    let mut writer = stream.try_clone().map_err(io_error("socket"))?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let (kind, payload) = read_frame(&mut reader).map_err(io_error("reading hello"))?;
    if kind != frame::HELLO {
        return Err(error_text(kind, &payload));
    }
    let theirs: Hello =
        serde_json::from_slice(&payload).map_err(|error| format!("hello: {error}"))?;
    let ours = vm.hello();
    if theirs != ours {
        let why = format!(
            "the source's VM ({theirs:?}) does not match this destination's configuration ({ours:?})"
        );
        let _ = write_frame(&mut writer, frame::ERROR, why.as_bytes());
        return Err(why);
    }
    write_frame(&mut writer, frame::HELLO_OK, &[]).map_err(io_error("answering hello"))?;
    let page_size = PAGE_SIZE as usize;
    let mut pages = 0u64;
    let mut bytes = 0u64;
    let state: VmState = loop {
        let (kind, payload) = read_frame(&mut reader).map_err(io_error("receiving memory"))?;
        bytes += payload.len() as u64 + 5;
        match kind {
            frame::PAGES => {
                if payload.len() % (8 + page_size) != 0 {
                    return Err(format!("a pages frame of {} bytes", payload.len()));
                }
                for record in payload.chunks_exact(8 + page_size) {
                    let address = u64::from_le_bytes(record[..8].try_into().expect("8 bytes"));
                    if address % PAGE_SIZE != 0 {
                        return Err(format!("page address {address:#x} is not page-aligned"));
                    }
                    vm.ram()
                        .memory()
                        .write_slice(&record[8..], GuestAddress(address))
                        .map_err(|error| format!("page {address:#x}: {error}"))?;
                    pages += 1;
                }
                vm.cell().update(|status| {
                    status.pages = pages;
                    status.bytes = bytes;
                });
            }
            frame::SYNC => {
                write_frame(&mut writer, frame::SYNC_ACK, &[])
                    .map_err(io_error("acknowledging a round"))?;
            }
            frame::STATE => {
                break serde_json::from_slice(&payload)
                    .map_err(|error| format!("the final state is unreadable: {error}"))?;
            }
            frame::ABORT => return Ok((Decision::Abort, None)),
            other => return Err(error_text(other, &payload)),
        }
    };
    if let Err(error) = vm.restore(&state) {
        let _ = write_frame(&mut writer, frame::ERROR, error.as_bytes());
        return Err(error);
    }
    vm.cell().update(|status| {
        status.phase = "ready".into();
        status.pages = pages;
        status.bytes = bytes;
        status.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    });
    // A link that breaks here is not fatal: this side holds everything, and the
    // commander may still commit it on the control socket.
    let _ = write_frame(&mut writer, frame::READY, &[]);
    // The second save is for the save → restore → save check, off the downtime's path.
    let resaved = vm.resave()?;
    vm.cell().set_states([
        serde_json::to_string(&state).expect("state serializes"),
        serde_json::to_string(&resaved).expect("state serializes"),
    ]);
    // From here the link only carries the source's relay of the decision; the control
    // socket can bring it too, and a broken link changes nothing.
    let cell_reader = {
        // The reader thread posts what the source relays.
        let _ = reader.get_ref().set_read_timeout(None);
        reader
    };
    let (sender, receiver) = std::sync::mpsc::channel::<Decision>();
    {
        let mut reader = cell_reader;
        let _ = thread::Builder::new()
            .name("migrate-relay".into())
            .spawn(move || {
                if let Ok((kind, _)) = read_frame(&mut reader) {
                    let decision = match kind {
                        frame::COMMIT => Decision::Commit,
                        frame::ABORT => Decision::Abort,
                        _ => return,
                    };
                    let _ = sender.send(decision);
                }
            });
    }
    let decision = loop {
        if let Some(decision) = vm.cell().decision() {
            break decision;
        }
        if let Ok(decision) = receiver.recv_timeout(Duration::from_millis(5)) {
            // The source relays the commander's decision; record it as if it came on
            // the control socket (a conflicting one there is refused).
            let _ = vm.cell().decide(decision);
        }
    };
    Ok((decision, Some(writer)))
}

/// Tells the source (if the link still works) that the destination's vCPUs run.
pub fn confirm_started(link: Option<TcpStream>) {
    if let Some(mut link) = link {
        let _ = write_frame(&mut link, frame::STARTED, &[]);
    }
}
