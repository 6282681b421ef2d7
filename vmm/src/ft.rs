//! Fault tolerance (issue 22), the VMM half: continuous checkpointing from a primary
//! `cairn-vmm` to a secondary one over the live-migration stream, Remus-style, with
//! output commit. The protocol and its failure cases are in vmm/ARCHITECTURE.md
//! ("Fault tolerance"); this module is:
//! - [`OutputGate`]: the frames the guest transmits during epoch N, held until the
//!   secondary acknowledged checkpoint N;
//! - [`DiskJournal`]: every guest disk write of the epoch, recorded to be shipped with
//!   the checkpoint (the secondary applies and flushes them to its own copy before it
//!   acknowledges);
//! - [`run_primary`]: pause, stage the dirty pages, disk writes and state, resume,
//!   stream; one thread of the running VM, started by the `ft-start` control request;
//! - [`run_secondary`]: a `cairn-vmm --ft-secondary ADDR` that applies each complete
//!   checkpoint, acknowledges it, and hands the last complete one to the caller when
//!   `ft-promote` comes.
//!
//! Architecture invariants: no frame the guest sent in epoch N leaves the primary
//! before the secondary acknowledged N; the secondary acknowledges N only once N's
//! memory, state and disk writes are all applied (disk writes flushed); it never
//! applies a part of a checkpoint, and never applies one after the promotion began.
//! The VMM never decides who runs: promotion and `ft-stop` come from the commander.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::control::wire::FtStatus;
use crate::devices::block::BlockBackend;
use crate::handle::VmHandle;
use crate::memory::PAGE_SIZE;
use crate::migration::{self, Hello, frame, read_frame, write_frame};
use crate::state::VmState;

/// The epoch when `ft-start` names none.
pub const DEFAULT_EPOCH_MS: u64 = 30;
/// Frames held at most while the secondary is lost (beyond: dropped and counted, as a
/// full queue would).
const MAX_HELD_FRAMES: usize = 16_384;
/// Recent samples kept for the medians in the status.
const SAMPLES: usize = 512;
/// Disk bytes per `CKPT_DISK`/`DISK_SYNC` frame.
const DISK_FRAME_BYTES: usize = 1 << 20;

fn median(samples: &VecDeque<f64>) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted: Vec<f64> = samples.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn push_sample(samples: &mut VecDeque<f64>, value: f64) {
    if samples.len() == SAMPLES {
        samples.pop_front();
    }
    samples.push_back(value);
}

#[derive(Debug)]
struct HeldFrame {
    epoch: u64,
    tap: Arc<File>,
    frame: Vec<u8>,
    at: Instant,
}

#[derive(Debug, Default)]
struct GateInner {
    held: VecDeque<HeldFrame>,
    delays_ms: VecDeque<f64>,
}

/// Output commit for network frames: while holding, every frame a NIC transmits is
/// kept with the epoch it belongs to and written to its tap only by
/// [`OutputGate::release_through`] (the secondary acknowledged that epoch) or
/// [`OutputGate::release_all`] (the commander let this side run alone).
#[derive(Debug, Default)]
pub struct OutputGate {
    holding: AtomicBool,
    /// The checkpoint the frames transmitted now belong to.
    epoch: AtomicU64,
    inner: Mutex<GateInner>,
    released: AtomicU64,
    discarded: AtomicU64,
}

impl OutputGate {
    fn lock(&self) -> MutexGuard<'_, GateInner> {
        self.inner.lock().expect("gate lock")
    }

    /// Whether frames are held now.
    pub fn holding(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    /// Takes `frame` (virtio header included) for `tap` if holding; gives it back
    /// otherwise (the caller writes it).
    pub fn hold(&self, tap: &Arc<File>, frame: Vec<u8>) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        if !self.holding() {
            return Some(frame);
        }
        if inner.held.len() >= MAX_HELD_FRAMES {
            self.discarded.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        inner.held.push_back(HeldFrame {
            epoch: self.epoch.load(Ordering::Acquire),
            tap: Arc::clone(tap),
            frame,
            at: Instant::now(),
        });
        None
    }

    /// Starts holding; what is transmitted from now on belongs to checkpoint `epoch`.
    /// The hold times measured are this protection's: an earlier one's (frames held
    /// through a lost secondary, for instance) are forgotten.
    fn start(&self, epoch: u64) {
        let mut inner = self.lock();
        inner.delays_ms.clear();
        self.epoch.store(epoch, Ordering::Release);
        self.holding.store(true, Ordering::Release);
    }

    /// The vCPUs are stopped for checkpoint `epoch`: what they transmitted belongs to
    /// it; what they transmit after the resume belongs to the next.
    fn seal(&self, epoch: u64) {
        let _inner = self.lock();
        self.epoch.store(epoch + 1, Ordering::Release);
    }

    /// Writes every held frame of checkpoints up to `epoch` to its tap (none once the
    /// fence lapsed: they are discarded). Returns how many.
    fn release_through(&self, epoch: u64, fence: &crate::fence::Fence) -> usize {
        let mut inner = self.lock();
        self.release_locked(&mut inner, epoch, fence)
    }

    /// [`Self::release_through`] under the caller's lock.
    fn release_locked(
        &self,
        inner: &mut GateInner,
        epoch: u64,
        fence: &crate::fence::Fence,
    ) -> usize {
        let mut released = 0;
        while inner.held.front().is_some_and(|held| held.epoch <= epoch) {
            let held = inner.held.pop_front().expect("checked");
            if fence.lapsed() {
                self.discarded.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let _ = (&*held.tap).write(&held.frame);
            push_sample(
                &mut inner.delays_ms,
                held.at.elapsed().as_secs_f64() * 1000.0,
            );
            released += 1;
        }
        self.released.fetch_add(released as u64, Ordering::Relaxed);
        released
    }

    /// Stops holding and releases everything held (this side runs alone now). Both
    /// under one lock: [`Self::hold`] decides under it too, so no frame can be queued
    /// between the release and the end of holding, where nothing would ever release
    /// it (a CI run saw `frames_held: 1` left after `ft-stop`).
    fn release_all(&self, fence: &crate::fence::Fence) {
        let mut inner = self.lock();
        self.release_locked(&mut inner, u64::MAX, fence);
        self.holding.store(false, Ordering::Release);
    }

    fn held(&self) -> u64 {
        self.lock().held.len() as u64
    }

    fn median_delay_ms(&self) -> f64 {
        median(&self.lock().delays_ms)
    }
}

/// A guest disk that records its writes while fault tolerance runs (the primary ships
/// them with the checkpoint) and whose backend the secondary writes checkpoints to.
#[derive(Debug)]
pub struct DiskJournal {
    inner: Arc<dyn BlockBackend>,
    recording: AtomicBool,
    writes: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl DiskJournal {
    /// Wraps `inner`; nothing is recorded until fault tolerance starts.
    pub fn new(inner: Arc<dyn BlockBackend>) -> Self {
        Self {
            inner,
            recording: AtomicBool::new(false),
            writes: Mutex::new(Vec::new()),
        }
    }

    fn set_recording(&self, on: bool) {
        let mut writes = self.writes.lock().expect("journal lock");
        writes.clear();
        self.recording.store(on, Ordering::Release);
    }

    fn take(&self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut *self.writes.lock().expect("journal lock"))
    }
}

impl BlockBackend for DiskJournal {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buffer, offset)
    }

    fn write_at(&self, buffer: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buffer, offset)?;
        if self.recording.load(Ordering::Acquire) {
            self.writes
                .lock()
                .expect("journal lock")
                .push((offset, buffer.to_vec()));
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
}

/// What `CKPT_END` carries.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct CheckpointEnd {
    /// The checkpoint's number (1 is the first after the initial copy).
    pub epoch: u64,
    /// The VM's state at the pause.
    pub state: VmState,
}

#[derive(Debug, Default)]
struct FtInner {
    status: Option<FtStatus>,
    active: bool,
    /// The commander: stop fault tolerance (primary: run alone; secondary: give up).
    stop: bool,
    /// The commander: promote (secondary), and when.
    promote: bool,
    promote_at: Option<Instant>,
    /// Secondary: the last complete checkpoint.
    checkpoint: Option<VmState>,
    /// Primary: the link broke.
    link_lost: bool,
    /// The link, to shut down on a decision (a blocked read or write ends).
    link: Option<TcpStream>,
    /// Primary: checkpoints sent and not acknowledged yet, with their pause instant.
    unacked: VecDeque<(u64, Instant)>,
    epoch_bytes: VecDeque<f64>,
    epoch_pages: VecDeque<f64>,
    paused_ms: VecDeque<f64>,
    ack_ms: VecDeque<f64>,
}

/// Fault tolerance's shared state: the status, the commander's decisions, the output
/// gate and (secondary) the last complete checkpoint.
#[derive(Debug, Default)]
pub struct FtCell {
    inner: Mutex<FtInner>,
    changed: Condvar,
    /// The NICs' output gate.
    pub gate: Arc<OutputGate>,
}

impl FtCell {
    fn lock(&self) -> MutexGuard<'_, FtInner> {
        self.inner.lock().expect("ft lock")
    }

    /// Whether fault tolerance runs (either role).
    pub fn active(&self) -> bool {
        self.lock().active
    }

    /// The status with its medians, if fault tolerance ever began here.
    pub fn status(&self) -> Option<FtStatus> {
        let inner = self.lock();
        let mut status = inner.status.clone()?;
        status.median_epoch_bytes = median(&inner.epoch_bytes);
        status.median_epoch_pages = median(&inner.epoch_pages);
        status.median_paused_ms = median(&inner.paused_ms);
        status.median_ack_ms = median(&inner.ack_ms);
        drop(inner);
        status.frames_held = self.gate.held();
        status.frames_released = self.gate.released.load(Ordering::Relaxed);
        status.frames_discarded = self.gate.discarded.load(Ordering::Relaxed);
        status.median_output_delay_ms = self.gate.median_delay_ms();
        Some(status)
    }

    fn update(&self, change: impl FnOnce(&mut FtStatus)) {
        let mut inner = self.lock();
        if let Some(status) = &mut inner.status {
            change(status);
        }
        self.changed.notify_all();
    }

    fn begin(&self, status: FtStatus) -> Result<(), String> {
        let mut inner = self.lock();
        if inner.active {
            return Err("fault tolerance already runs on this VM".into());
        }
        *inner = FtInner {
            status: Some(status),
            active: true,
            ..FtInner::default()
        };
        Ok(())
    }

    fn end(&self) {
        let mut inner = self.lock();
        inner.active = false;
        inner.link = None;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for the status to satisfy `done`; returns it then.
    pub fn wait_status(&self, timeout: Duration, done: impl Fn(&FtStatus) -> bool) -> bool {
        let inner = self.lock();
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |inner| {
                !inner.status.as_ref().is_some_and(&done)
            })
            .expect("ft lock");
        inner.status.as_ref().is_some_and(&done)
    }

    /// On a primary whose output is held: waits until the next checkpoint (which holds
    /// whatever the guest did before this call) is acknowledged. True at once
    /// elsewhere; false when it is not acknowledged within `timeout`.
    pub fn wait_committed(&self, timeout: Duration) -> bool {
        if !self.gate.holding() {
            return true;
        }
        // What the guest did before now belongs to this checkpoint or an earlier one.
        let target = self.gate.epoch.load(Ordering::Acquire);
        let inner = self.lock();
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |inner| {
                inner.active
                    && !inner.stop
                    && !inner.link_lost
                    && inner
                        .status
                        .as_ref()
                        .is_some_and(|status| status.last_acked < target)
            })
            .expect("ft lock");
        inner
            .status
            .as_ref()
            .is_some_and(|status| status.last_acked >= target)
            || !self.gate.holding()
    }

    /// The commander's promotion of a secondary: refused unless it holds a complete
    /// checkpoint. From here no checkpoint is applied any more.
    pub fn promote(&self) -> Result<(), String> {
        let mut inner = self.lock();
        let Some(status) = &inner.status else {
            return Err("this VMM is not a fault-tolerance secondary".into());
        };
        if status.role != "secondary" {
            return Err(format!(
                "cannot promote a {} (only a secondary)",
                status.role
            ));
        }
        if inner.stop {
            return Err("fault tolerance was stopped here".into());
        }
        if inner.promote {
            return Ok(());
        }
        if inner.checkpoint.is_none() {
            return Err(
                "no complete checkpoint was received yet: there is nothing to resume".into(),
            );
        }
        inner.promote = true;
        inner.promote_at = Some(Instant::now());
        if let Some(link) = inner.link.take() {
            let _ = link.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
        Ok(())
    }

    /// The commander's `ft-stop`: a primary runs alone from now (releasing what it
    /// held), a secondary gives up (its process exits without having run).
    pub fn stop(&self) -> Result<(), String> {
        let mut inner = self.lock();
        if !inner.active {
            return Err("fault tolerance does not run here".into());
        }
        if inner.promote {
            return Err("this secondary is being promoted".into());
        }
        inner.stop = true;
        if let Some(link) = inner.link.take() {
            let _ = link.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.lock().stop
    }

    /// Marks the secondary promoted (its vCPUs run now).
    pub fn promoted(&self) {
        let took = self.lock().promote_at.map(|at| at.elapsed());
        self.update(|status| {
            status.phase = "promoted".into();
            status.promote_ms = took.unwrap_or_default().as_secs_f64() * 1000.0;
        });
        self.end();
    }

    /// A secondary that did not start: why.
    pub fn failed(&self, error: &str) {
        self.update(|status| {
            status.phase = "stopped".into();
            status.error = Some(error.to_string());
        });
        self.end();
    }
}

/// Parameters of `ft-start`.
#[derive(Debug, Clone)]
pub struct FtRequest {
    /// The secondary's `HOST:PORT`.
    pub to: String,
    /// Time from one checkpoint's pause to the next one's.
    pub epoch: Duration,
    /// Copy every disk whole to the secondary first (off when its copies are already
    /// equal, e.g. replicas kept by the storage layer).
    pub sync_disks: bool,
}

fn hello_of(vm: &VmHandle) -> Hello {
    Hello {
        protocol: migration::PROTOCOL_VERSION,
        memory_bytes: vm.ram.size_bytes(),
        vcpus: vm.shared.vcpus as u32,
        disks: vm.shared.blocks.len() as u32,
        nics: vm.shared.nets.len() as u32,
        builtin: vm.shared.builtin,
    }
}

/// Starts the primary on its own thread (`ft-start`).
pub(crate) fn start_primary(vm: &VmHandle, request: FtRequest) -> Result<(), String> {
    if vm.shared.migration.active() {
        return Err("a live migration is under way".into());
    }
    vm.shared.ft.begin(FtStatus {
        role: "primary".into(),
        phase: "connecting".into(),
        peer: request.to.clone(),
        epoch_ms: request.epoch.as_millis() as u64,
        ..FtStatus::default()
    })?;
    let vm = vm.clone();
    thread::Builder::new()
        .name("ft-primary".into())
        .spawn(move || run_primary(vm, request))
        .map(|_| ())
        .map_err(|error| format!("cannot start the checkpoint thread: {error}"))
}

/// Where the primary failed: before any checkpoint could be complete on the secondary
/// (it can never resume: this side runs alone at once), or after.
enum PrimaryFailure {
    Unprotected(String),
    MayHoldCheckpoint(String),
}

/// The primary: the initial copy, then one checkpoint per epoch until `ft-stop` or a
/// failure. See the module's invariants.
pub fn run_primary(vm: VmHandle, request: FtRequest) {
    let cell = &vm.shared.ft;
    let outcome = primary(&vm, &request);
    for journal in &vm.shared.disk_journals {
        journal.set_recording(false);
    }
    let _ = vm.set_dirty_logging(false);
    let error = match outcome {
        Ok(()) => None,
        Err(PrimaryFailure::Unprotected(error)) => Some(error),
        Err(PrimaryFailure::MayHoldCheckpoint(error)) => {
            // The secondary may resume from what it holds: nothing of what the guest
            // did since may leave, until the commander says this side runs on.
            cell.update(|status| {
                status.phase = "secondary-lost".into();
                status.error = Some(format!(
                    "{error}; the secondary may hold a complete checkpoint, so output stays held until ft-stop"
                ));
            });
            let inner = cell.lock();
            drop(
                cell.changed
                    .wait_while(inner, |inner| !inner.stop)
                    .expect("ft lock"),
            );
            None
        }
    };
    cell.gate.release_all(&vm.shared.fence);
    cell.update(|status| {
        status.phase = "unprotected".into();
        if let Some(error) = error {
            status.error = Some(error);
        }
    });
    cell.end();
}

fn primary(vm: &VmHandle, request: &FtRequest) -> Result<(), PrimaryFailure> {
    use PrimaryFailure::{MayHoldCheckpoint, Unprotected};
    let cell = &vm.shared.ft;
    let io_error =
        |what: &'static str| move |error: io::Error| Unprotected(format!("{what}: {error}"));
    let address = request
        .to
        .to_socket_addrs()
        .map_err(io_error("resolving the secondary"))?
        .next()
        .ok_or_else(|| Unprotected(format!("{} resolves to no address", request.to)))?;
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .map_err(io_error("connecting to the secondary"))?;
    stream.set_nodelay(true).map_err(io_error("TCP_NODELAY"))?;
    stream
        .set_write_timeout(Some(migration::LINK_TIMEOUT))
        .map_err(io_error("socket timeout"))?;
    stream
        .set_read_timeout(Some(migration::LINK_TIMEOUT))
        .map_err(io_error("socket timeout"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io_error("socket"))?);
    {
        let mut inner = cell.lock();
        if inner.stop {
            return Err(Unprotected("stopped before it began".into()));
        }
        inner.link = stream.try_clone().ok();
    }
    let mut writer = BufWriter::with_capacity(1 << 20, stream);
    let hello = serde_json::to_vec(&hello_of(vm)).expect("hello serializes");
    write_frame(&mut writer, frame::HELLO, &hello)
        .and_then(|()| writer.flush())
        .map_err(io_error("sending hello"))?;
    match read_frame(&mut reader).map_err(io_error("reading the secondary's answer"))? {
        (frame::HELLO_OK, _) => {}
        (kind, payload) => return Err(Unprotected(migration::error_text(kind, &payload))),
    }

    // From here the guest's output is held (it belongs to checkpoint 1), its disk writes
    // recorded, its memory writes logged: checkpoint 1 carries all of it, so what the
    // initial copy reads from running memory and disks is made whole by it.
    cell.update(|status| status.phase = "initial-copy".into());
    let started = Instant::now();
    cell.gate.start(1);
    for journal in &vm.shared.disk_journals {
        journal.set_recording(true);
    }
    vm.set_dirty_logging(true)
        .map_err(|error| Unprotected(error.to_string()))?;
    let _ = vm.ram.take_vmm_dirty_bitmap();
    let (pages, _) =
        migration::send_pages(&mut writer, &vm.ram, migration::all_pages(&vm.ram), true)
            .map_err(io_error("sending memory"))?;
    let mut initial_bytes = pages * (8 + PAGE_SIZE);
    if request.sync_disks {
        for (index, journal) in vm.shared.disk_journals.iter().enumerate() {
            initial_bytes += send_disk(&mut writer, index as u32, journal)
                .map_err(io_error("copying a disk"))?;
        }
    }
    write_frame(&mut writer, frame::SYNC, &[])
        .and_then(|()| writer.flush())
        .map_err(io_error("ending the initial copy"))?;
    match read_frame(&mut reader).map_err(io_error("waiting for the initial copy's answer"))? {
        (frame::SYNC_ACK, _) => {}
        (kind, payload) => return Err(Unprotected(migration::error_text(kind, &payload))),
    }
    cell.update(|status| {
        status.initial_bytes = initial_bytes;
        status.initial_ms = started.elapsed().as_secs_f64() * 1000.0;
        status.bytes_total = initial_bytes;
    });

    // The acknowledgements: each releases the output of its checkpoint.
    {
        let vm = vm.clone();
        let _ = reader.get_ref().set_read_timeout(None);
        thread::Builder::new()
            .name("ft-acks".into())
            .spawn(move || read_acks(&vm, reader))
            .map_err(|error| Unprotected(format!("cannot start the ack thread: {error}")))?;
    }

    let mut epoch = 0u64;
    let mut next = Instant::now();
    loop {
        {
            let inner = cell.lock();
            let (inner, _) = cell
                .changed
                .wait_timeout_while(
                    inner,
                    next.saturating_duration_since(Instant::now()),
                    |inner| !inner.stop && !inner.link_lost,
                )
                .expect("ft lock");
            if inner.stop {
                return Ok(());
            }
            if inner.link_lost {
                let error = inner
                    .status
                    .as_ref()
                    .and_then(|status| status.error.clone())
                    .unwrap_or_else(|| "the link to the secondary broke".into());
                return Err(if epoch == 0 {
                    Unprotected(error)
                } else {
                    MayHoldCheckpoint(error)
                });
            }
        }
        epoch += 1;
        let failure = |what: &'static str| {
            move |error: String| {
                if epoch == 1 {
                    Unprotected(format!("{what}: {error}"))
                } else {
                    MayHoldCheckpoint(format!("{what}: {error}"))
                }
            }
        };
        // 1. pause
        let paused_at = Instant::now();
        next = paused_at + request.epoch;
        vm.request_checkpoint_freeze();
        let state = vm
            .shared
            .migration
            .wait_freeze(Duration::from_secs(10))
            .map_err(failure("pausing the VM"))?;
        // 2. stage: dirty pages, disk writes, the state (saved by the freeze)
        let vmm_only = vm.ram.take_vmm_dirty_bitmap();
        let dirty = match vm.ram.take_dirty_bitmap(&vm.vm_fd) {
            Ok(dirty) => migration::union(dirty, &vmm_only),
            Err(error) => {
                let _ = vm.resume_after_freeze();
                return Err(failure("reading the dirty log")(error.to_string()));
            }
        };
        let mut staged = Vec::with_capacity(dirty.count() as usize * (8 + PAGE_SIZE as usize));
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut staged_pages = 0u64;
        for address in dirty.pages() {
            if vm
                .ram
                .memory()
                .read_slice(&mut page, GuestAddress(address))
                .is_ok()
            {
                staged.extend_from_slice(&address.to_le_bytes());
                staged.extend_from_slice(&page);
                staged_pages += 1;
            }
        }
        let writes: Vec<Vec<(u64, Vec<u8>)>> = vm
            .shared
            .disk_journals
            .iter()
            .map(|journal| journal.take())
            .collect();
        cell.gate.seal(epoch);
        // 3. resume
        vm.resume_after_freeze()
            .map_err(failure("resuming the VM"))?;
        let paused_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
        // 4. stream
        cell.lock().unacked.push_back((epoch, paused_at));
        let sent = send_checkpoint(&mut writer, epoch, &staged, &writes, &state)
            .map_err(|error| failure("sending a checkpoint")(error.to_string()))?;
        {
            let mut inner = cell.lock();
            push_sample(&mut inner.epoch_bytes, sent as f64);
            push_sample(&mut inner.epoch_pages, staged_pages as f64);
            push_sample(&mut inner.paused_ms, paused_ms);
            if let Some(status) = &mut inner.status {
                if epoch == 1 {
                    status.phase = "protected".into();
                }
                status.epoch = epoch;
                status.last_epoch_bytes = sent;
                status.bytes_total += sent;
                status.disk_writes_shipped += writes.iter().map(|w| w.len() as u64).sum::<u64>();
            }
            cell.changed.notify_all();
        }
    }
}

fn send_disk(writer: &mut impl Write, index: u32, journal: &DiskJournal) -> io::Result<u64> {
    let size = journal.size();
    let mut buffer = vec![0u8; DISK_FRAME_BYTES];
    let mut record = Vec::with_capacity(DISK_FRAME_BYTES + 16);
    let mut offset = 0;
    let mut sent = 0;
    while offset < size {
        let length = (size - offset).min(DISK_FRAME_BYTES as u64) as usize;
        journal.inner.read_at(&mut buffer[..length], offset)?;
        record.clear();
        encode_disk_write(&mut record, index, offset, &buffer[..length]);
        write_frame(writer, frame::DISK_SYNC, &record)?;
        sent += record.len() as u64 + 5;
        offset += length as u64;
    }
    Ok(sent)
}

fn encode_disk_write(record: &mut Vec<u8>, disk: u32, offset: u64, data: &[u8]) {
    record.extend_from_slice(&disk.to_le_bytes());
    record.extend_from_slice(&offset.to_le_bytes());
    record.extend_from_slice(&(data.len() as u32).to_le_bytes());
    record.extend_from_slice(data);
}

/// One guest disk write on the wire: disk index, byte offset, bytes.
type DiskWrite<'a> = (u32, u64, &'a [u8]);

/// Disk writes of a `CKPT_DISK`/`DISK_SYNC` frame.
fn decode_disk_writes(payload: &[u8]) -> Result<Vec<DiskWrite<'_>>, String> {
    let mut writes = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        if rest.len() < 16 {
            return Err(format!("a disk record of {} bytes", rest.len()));
        }
        let disk = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
        let offset = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
        let length = u32::from_le_bytes(rest[12..16].try_into().expect("4 bytes")) as usize;
        if rest.len() < 16 + length {
            return Err("a disk record longer than its frame".into());
        }
        writes.push((disk, offset, &rest[16..16 + length]));
        rest = &rest[16 + length..];
    }
    Ok(writes)
}

/// Sends one staged checkpoint; returns the bytes on the wire.
fn send_checkpoint(
    writer: &mut impl Write,
    epoch: u64,
    staged: &[u8],
    writes: &[Vec<(u64, Vec<u8>)>],
    state: &VmState,
) -> io::Result<u64> {
    let mut sent = 0u64;
    let record = 8 + PAGE_SIZE as usize;
    for chunk in staged.chunks(record * migration::PAGES_PER_FRAME) {
        write_frame(writer, frame::CKPT_PAGES, chunk)?;
        sent += chunk.len() as u64 + 5;
    }
    let mut frame_buffer = Vec::new();
    for (disk, writes) in writes.iter().enumerate() {
        for (offset, data) in writes {
            encode_disk_write(&mut frame_buffer, disk as u32, *offset, data);
            if frame_buffer.len() >= DISK_FRAME_BYTES {
                write_frame(writer, frame::CKPT_DISK, &frame_buffer)?;
                sent += frame_buffer.len() as u64 + 5;
                frame_buffer.clear();
            }
        }
    }
    if !frame_buffer.is_empty() {
        write_frame(writer, frame::CKPT_DISK, &frame_buffer)?;
        sent += frame_buffer.len() as u64 + 5;
    }
    let end = serde_json::to_vec(&CheckpointEnd {
        epoch,
        state: state.clone(),
    })
    .expect("state serializes");
    write_frame(writer, frame::CKPT_END, &end)?;
    sent += end.len() as u64 + 5;
    writer.flush()?;
    Ok(sent)
}

fn read_acks(vm: &VmHandle, mut reader: BufReader<TcpStream>) {
    let cell = &vm.shared.ft;
    let error = loop {
        match read_frame(&mut reader) {
            Ok((frame::CKPT_ACK, payload)) if payload.len() == 8 => {
                let epoch = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                cell.gate.release_through(epoch, &vm.shared.fence);
                let mut inner = cell.lock();
                while inner
                    .unacked
                    .front()
                    .is_some_and(|(pending, _)| *pending <= epoch)
                {
                    let (pending, paused_at) = inner.unacked.pop_front().expect("checked");
                    if pending == epoch {
                        push_sample(
                            &mut inner.ack_ms,
                            paused_at.elapsed().as_secs_f64() * 1000.0,
                        );
                    }
                }
                if let Some(status) = &mut inner.status {
                    status.last_acked = epoch;
                }
                cell.changed.notify_all();
            }
            Ok((kind, payload)) => break migration::error_text(kind, &payload),
            Err(error) => break format!("reading acknowledgements: {error}"),
        }
    };
    let mut inner = cell.lock();
    if !inner.stop {
        inner.link_lost = true;
        if let Some(status) = &mut inner.status {
            status.error = Some(error);
        }
    }
    cell.changed.notify_all();
}

/// Marks a VM just built ([`crate::vm::Vm::create_ft_secondary`]) a fault-tolerance
/// secondary waiting for its primary. It runs before the control socket is served, so
/// a commander's first `ft-stop` or `ft-status` finds the secondary (not "does not run
/// here") however soon it comes.
pub(crate) fn begin_secondary(vm: &VmHandle) {
    *vm.shared.ft.lock() = FtInner {
        status: Some(FtStatus {
            role: "secondary".into(),
            phase: "waiting".into(),
            ..FtStatus::default()
        }),
        active: true,
        ..FtInner::default()
    };
}

/// The secondary (`cairn-vmm --ft-secondary`, begun by [`begin_secondary`]): accepts
/// one primary on `listener`, applies each complete checkpoint and acknowledges it,
/// until the commander promotes it (returns the last complete checkpoint's state, to
/// restore and run) or stops it.
pub fn run_secondary(vm: &VmHandle, listener: TcpListener) -> Result<VmState, String> {
    let cell = &vm.shared.ft;
    if !cell.active() {
        return Err("this VM was not begun as a fault-tolerance secondary".into());
    }
    {
        let vm = vm.clone();
        thread::Builder::new()
            .name("ft-receive".into())
            .spawn(move || {
                let result = receive(&vm, &listener);
                let cell = &vm.shared.ft;
                let mut inner = cell.lock();
                let holds = inner.checkpoint.is_some();
                if !inner.promote
                    && !inner.stop
                    && let Some(status) = &mut inner.status
                {
                    status.phase = if holds { "primary-lost" } else { "failed" }.into();
                    status.error = result.err();
                }
                cell.changed.notify_all();
            })
            .map_err(|error| format!("cannot start the receiving thread: {error}"))?;
    }
    let inner = cell.lock();
    let mut inner = cell
        .changed
        .wait_while(inner, |inner| !inner.promote && !inner.stop)
        .expect("ft lock");
    if inner.promote {
        if let Some(status) = &mut inner.status {
            status.phase = "promoting".into();
        }
        return inner
            .checkpoint
            .take()
            .ok_or_else(|| "no complete checkpoint".to_string());
    }
    Err("fault tolerance was stopped by the commander before a promotion".into())
}

fn receive(vm: &VmHandle, listener: &TcpListener) -> Result<(), String> {
    let cell = &vm.shared.ft;
    listener
        .set_nonblocking(true)
        .map_err(|error| format!("listening socket: {error}"))?;
    let stream = loop {
        if cell.stopping() {
            return Ok(());
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                cell.update(|status| {
                    status.phase = "initial-copy".into();
                    status.peer = peer.to_string();
                });
                break stream;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(error) => return Err(format!("accepting the primary: {error}")),
        }
    };
    let io_error = |what: &'static str| move |error: io::Error| format!("{what}: {error}");
    stream.set_nonblocking(false).map_err(io_error("socket"))?;
    stream.set_nodelay(true).map_err(io_error("socket"))?;
    {
        let mut inner = cell.lock();
        if inner.stop || inner.promote {
            return Ok(());
        }
        inner.link = stream.try_clone().ok();
    }
    let mut writer = stream.try_clone().map_err(io_error("socket"))?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let (kind, payload) = read_frame(&mut reader).map_err(io_error("reading hello"))?;
    if kind != frame::HELLO {
        return Err(migration::error_text(kind, &payload));
    }
    let theirs: Hello =
        serde_json::from_slice(&payload).map_err(|error| format!("hello: {error}"))?;
    let ours = hello_of(vm);
    if theirs != ours {
        let why = format!(
            "the primary's VM ({theirs:?}) does not match this secondary's configuration ({ours:?})"
        );
        let _ = write_frame(&mut writer, frame::ERROR, why.as_bytes());
        return Err(why);
    }
    write_frame(&mut writer, frame::HELLO_OK, &[]).map_err(io_error("answering hello"))?;
    let record = 8 + PAGE_SIZE as usize;
    let mut staged_pages: Vec<u8> = Vec::new();
    let mut staged_disk: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0u64;
    let mut epoch_bytes = 0u64;
    loop {
        let (kind, payload) = read_frame(&mut reader).map_err(io_error("receiving"))?;
        bytes += payload.len() as u64 + 5;
        epoch_bytes += payload.len() as u64 + 5;
        match kind {
            frame::PAGES => {
                // The initial copy: no checkpoint is complete yet, so there is nothing
                // to tear; written at once.
                write_pages(vm, &payload)?;
            }
            frame::DISK_SYNC => {
                for (disk, offset, data) in decode_disk_writes(&payload)? {
                    disk_of(vm, disk)?
                        .inner
                        .write_at(data, offset)
                        .map_err(|error| format!("disk {disk} at {offset}: {error}"))?;
                }
            }
            frame::SYNC => {
                for journal in &vm.shared.disk_journals {
                    journal
                        .inner
                        .flush()
                        .map_err(|error| format!("flushing the disk copy: {error}"))?;
                }
                write_frame(&mut writer, frame::SYNC_ACK, &[])
                    .map_err(io_error("acknowledging the initial copy"))?;
                cell.update(|status| {
                    status.initial_bytes = bytes;
                    status.bytes_total = bytes;
                });
                epoch_bytes = 0;
            }
            frame::CKPT_PAGES => {
                if !payload.len().is_multiple_of(record) {
                    return Err(format!(
                        "a checkpoint pages frame of {} bytes",
                        payload.len()
                    ));
                }
                staged_pages.extend_from_slice(&payload);
            }
            frame::CKPT_DISK => {
                decode_disk_writes(&payload)?;
                staged_disk.push(payload);
            }
            frame::CKPT_END => {
                let end: CheckpointEnd = serde_json::from_slice(&payload)
                    .map_err(|error| format!("a checkpoint's state is unreadable: {error}"))?;
                // Applied under the cell's lock: a promotion waits for it, or comes
                // first and then nothing more is applied.
                let mut inner = cell.lock();
                if inner.promote || inner.stop {
                    return Ok(());
                }
                write_pages(vm, &staged_pages)?;
                for payload in &staged_disk {
                    for (disk, offset, data) in decode_disk_writes(payload)? {
                        disk_of(vm, disk)?
                            .inner
                            .write_at(data, offset)
                            .map_err(|error| format!("disk {disk} at {offset}: {error}"))?;
                    }
                }
                if !staged_disk.is_empty() {
                    for journal in &vm.shared.disk_journals {
                        journal
                            .inner
                            .flush()
                            .map_err(|error| format!("flushing the disk copy: {error}"))?;
                    }
                }
                let pages = (staged_pages.len() / record) as f64;
                inner.checkpoint = Some(end.state);
                push_sample(&mut inner.epoch_bytes, epoch_bytes as f64);
                push_sample(&mut inner.epoch_pages, pages);
                if let Some(status) = &mut inner.status {
                    status.phase = "protected".into();
                    status.epoch = end.epoch;
                    status.last_acked = end.epoch;
                    status.last_epoch_bytes = epoch_bytes;
                    status.bytes_total = bytes;
                    status.disk_writes_shipped += staged_disk.len() as u64;
                }
                cell.changed.notify_all();
                drop(inner);
                staged_pages.clear();
                staged_disk.clear();
                epoch_bytes = 0;
                write_frame(&mut writer, frame::CKPT_ACK, &end.epoch.to_le_bytes())
                    .map_err(io_error("acknowledging a checkpoint"))?;
            }
            other => return Err(migration::error_text(other, &payload)),
        }
    }
}

fn disk_of(vm: &VmHandle, disk: u32) -> Result<&DiskJournal, String> {
    vm.shared
        .disk_journals
        .get(disk as usize)
        .map(AsRef::as_ref)
        .ok_or_else(|| format!("a write to disk {disk}, which this VM does not have"))
}

fn write_pages(vm: &VmHandle, payload: &[u8]) -> Result<(), String> {
    let record = 8 + PAGE_SIZE as usize;
    if !payload.len().is_multiple_of(record) {
        return Err(format!("a pages frame of {} bytes", payload.len()));
    }
    for chunk in payload.chunks_exact(record) {
        let address = u64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
        if !address.is_multiple_of(PAGE_SIZE) {
            return Err(format!("page address {address:#x} is not page-aligned"));
        }
        vm.ram
            .memory()
            .write_slice(&chunk[8..], GuestAddress(address))
            .map_err(|error| format!("page {address:#x}: {error}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_frames_leave_only_up_to_the_acknowledged_epoch() {
        let gate = OutputGate::default();
        let fence = crate::fence::Fence::default();
        let (reader, writer) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let tap = Arc::new(File::from(std::os::fd::OwnedFd::from(writer)));
        assert_eq!(gate.hold(&tap, vec![0]), Some(vec![0]), "not holding yet");
        gate.start(1);
        assert!(gate.hold(&tap, vec![1]).is_none());
        gate.seal(1);
        assert!(gate.hold(&tap, vec![2]).is_none());
        assert_eq!(gate.release_through(0, &fence), 0);
        assert_eq!(gate.release_through(1, &fence), 1);
        let mut buffer = [0u8; 4];
        assert_eq!(reader.recv(&mut buffer).expect("frame"), 1);
        assert_eq!(buffer[0], 1, "epoch 1's frame");
        reader.set_nonblocking(true).expect("nonblocking");
        assert!(reader.recv(&mut buffer).is_err(), "epoch 2's frame is held");
        gate.seal(2);
        assert_eq!(gate.release_through(2, &fence), 1);
        assert_eq!(reader.recv(&mut buffer).expect("frame"), 1);
        assert_eq!(buffer[0], 2);
        assert_eq!(gate.released.load(Ordering::Relaxed), 2);
        assert!(gate.median_delay_ms() >= 0.0 && !gate.lock().delays_ms.is_empty());
        // A new protection measures its own hold times only.
        gate.release_all(&fence);
        gate.start(1);
        assert!(gate.lock().delays_ms.is_empty());
    }

    #[test]
    fn disk_records_round_trip_and_bad_ones_are_refused() {
        let mut record = Vec::new();
        encode_disk_write(&mut record, 1, 4096, b"abc");
        encode_disk_write(&mut record, 0, 0, b"");
        let writes = decode_disk_writes(&record).expect("decodes");
        assert_eq!(writes, vec![(1, 4096, &b"abc"[..]), (0, 0, &b""[..])]);
        assert!(decode_disk_writes(&record[..10]).is_err());
        assert!(decode_disk_writes(&record[..18]).is_err());
    }

    #[test]
    fn the_journal_records_writes_only_while_recording() {
        let inner: Arc<dyn BlockBackend> =
            Arc::new(crate::devices::block::MemoryBackend::new(8192));
        let journal = DiskJournal::new(inner);
        journal.write_at(&[1; 512], 0).expect("write");
        assert!(journal.take().is_empty());
        journal.set_recording(true);
        journal.write_at(&[2; 512], 512).expect("write");
        let writes = journal.take();
        assert_eq!(writes, vec![(512, vec![2; 512])]);
        let mut back = [0u8; 512];
        journal.read_at(&mut back, 512).expect("read");
        assert_eq!(back, [2; 512]);
    }
}
