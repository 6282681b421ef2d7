//! virtio-blk over virtio-MMIO (virtio 1.x, "modern" MMIO transport version 2), with
//! one split virtqueue, processed synchronously on the vCPU thread that notifies it.
//!
//! Offered features: `VIRTIO_F_VERSION_1`, `VIRTIO_BLK_F_FLUSH`, and `VIRTIO_BLK_F_RO`
//! for read-only backends. Requests: `IN`, `OUT`, `FLUSH`, `GET_ID`; anything else
//! completes with `VIRTIO_BLK_S_UNSUPP`.
//!
//! Architecture invariant: every guest address the device follows (rings, descriptors,
//! buffers) is resolved through vm-memory's bounds-checked accessors, descriptor chains
//! are bounded by the queue size, and disk offsets are checked against the backend's
//! size before any I/O, so a hostile driver can make requests fail but cannot reach
//! memory or disk bytes outside its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::block::BlockBackend;

/// `MagicValue` register content ("virt").
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The MMIO transport version implemented.
pub const MMIO_VERSION: u32 = 2;
/// virtio device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Vendor ID reported ("CRN").
pub const VENDOR_ID: u32 = 0x004e_5243;
/// Largest queue the device accepts.
pub const QUEUE_SIZE_MAX: u16 = 256;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// Feature bit: the device follows virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature bit: the device supports the flush command.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// Request counters, readable while the VM runs.
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Completed read requests.
    pub reads: AtomicU64,
    /// Completed write requests.
    pub writes: AtomicU64,
    /// Completed flush requests.
    pub flushes: AtomicU64,
    /// Bytes read from the backend.
    pub bytes_read: AtomicU64,
    /// Bytes written to the backend.
    pub bytes_written: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Queue {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
}

/// One virtio-blk device on the MMIO transport.
#[derive(Debug)]
pub struct VirtioMmioBlock {
    backend: Arc<dyn BlockBackend>,
    stats: Arc<BlockStats>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    queue_select: u32,
    queue: Queue,
    interrupt_status: u32,
    interrupt: Option<Interrupt>,
}

/// The callback that raises the device's interrupt line.
pub struct Interrupt(pub Box<dyn Fn() + Send>);

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Interrupt")
    }
}

impl VirtioMmioBlock {
    /// A device serving `backend`. `interrupt`, when given, is called after used-ring
    /// updates (Linux guests); the built-in guest polls and needs none.
    pub fn new(backend: Arc<dyn BlockBackend>, interrupt: Option<Interrupt>) -> Self {
        Self {
            backend,
            stats: Arc::new(BlockStats::default()),
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queue: Queue::default(),
            interrupt_status: 0,
            interrupt,
        }
    }

    /// The request counters.
    pub fn stats(&self) -> Arc<BlockStats> {
        Arc::clone(&self.stats)
    }

    /// Features the device offers.
    pub fn device_features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
        if self.backend.read_only() {
            features |= VIRTIO_BLK_F_RO;
        }
        features
    }

    fn reset(&mut self) {
        self.driver_features = 0;
        self.status = 0;
        self.queue = Queue::default();
        self.interrupt_status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the MMIO window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let config = self.backend.size() / SECTOR_SIZE;
            let config = config.to_le_bytes();
            for (index, byte) in data.iter_mut().enumerate() {
                *byte = config
                    .get((offset - 0x100) as usize + index)
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        let value: u32 = match offset {
            0x000 => MMIO_MAGIC,
            0x004 => MMIO_VERSION,
            0x008 => DEVICE_ID_BLOCK,
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_select {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            0x034 if self.queue_select == 0 => u32::from(QUEUE_SIZE_MAX),
            0x044 => u32::from(self.queue_select == 0 && self.queue.ready),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => 0,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let length = data.len().min(4);
        data[..length].copy_from_slice(&bytes[..length]);
    }

    /// Handles a guest write at `offset` in the MMIO window; a queue notify processes the
    /// queue against `memory` before returning.
    pub fn mmio_write(&mut self, memory: &GuestMemoryMmap, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            return; // the block config space is read-only for the driver
        }
        let mut bytes = [0u8; 4];
        let length = data.len().min(4);
        bytes[..length].copy_from_slice(&data[..length]);
        let value = u32::from_le_bytes(bytes);
        let queue_writable = self.queue_select == 0 && self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x014 => self.device_features_select = value,
            // Features are frozen once FEATURES_OK is set.
            0x020 if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_select {
                0 => self.driver_features = set_low(self.driver_features, value),
                1 => self.driver_features = set_high(self.driver_features, value),
                _ => {}
            },
            0x024 => self.driver_features_select = value,
            0x030 => self.queue_select = value,
            0x038
                if queue_writable
                    && value.is_power_of_two()
                    && value <= u32::from(QUEUE_SIZE_MAX) =>
            {
                self.queue.size = value as u16;
            }
            0x044 if self.queue_select == 0 => self.queue.ready = value == 1 && self.queue.size > 0,
            0x050 if value == 0 && self.status & STATUS_DRIVER_OK != 0 && self.queue.ready => {
                self.process_queue(memory);
            }
            0x064 => self.interrupt_status &= !value,
            0x070 => self.write_status(value),
            0x080 if queue_writable => self.queue.desc = set_low(self.queue.desc, value),
            0x084 if queue_writable => self.queue.desc = set_high(self.queue.desc, value),
            0x090 if queue_writable => self.queue.avail = set_low(self.queue.avail, value),
            0x094 if queue_writable => self.queue.avail = set_high(self.queue.avail, value),
            0x0a0 if queue_writable => self.queue.used = set_low(self.queue.used, value),
            0x0a4 if queue_writable => self.queue.used = set_high(self.queue.used, value),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Accept only features we offered, and insist on VERSION_1 (no legacy mode).
            let offered = self.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                value &= !STATUS_FEATURES_OK;
            }
        }
        let allowed = STATUS_ACKNOWLEDGE
            | STATUS_DRIVER
            | STATUS_FEATURES_OK
            | STATUS_DRIVER_OK
            | STATUS_FAILED;
        self.status = value & allowed;
    }

    /// Completes every request the driver has made available.
    fn process_queue(&mut self, memory: &GuestMemoryMmap) {
        let queue = self.queue;
        let Ok(avail_index) = memory.read_obj::<u16>(GuestAddress(queue.avail + 2)) else {
            self.status |= STATUS_FAILED;
            return;
        };
        fence(Ordering::Acquire);
        let mut completed = false;
        let mut next_avail = queue.next_avail;
        // Never process more than one queue's worth per notify: a driver that moves the
        // index by more than the queue size is broken, and this bounds the loop.
        let mut budget = queue.size;
        while next_avail != avail_index && budget > 0 {
            budget -= 1;
            let slot = u64::from(next_avail % queue.size);
            let Ok(head) = memory.read_obj::<u16>(GuestAddress(queue.avail + 4 + slot * 2)) else {
                self.status |= STATUS_FAILED;
                break;
            };
            next_avail = next_avail.wrapping_add(1);
            let written = self.handle_request(memory, head);
            let used_slot = u64::from(self.queue.next_used % queue.size);
            let element = GuestAddress(queue.used + 4 + used_slot * 8);
            if memory.write_obj(u32::from(head), element).is_err()
                || memory
                    .write_obj(written, GuestAddress(element.0 + 4))
                    .is_err()
            {
                self.status |= STATUS_FAILED;
                break;
            }
            self.queue.next_used = self.queue.next_used.wrapping_add(1);
            fence(Ordering::Release);
            if memory
                .write_obj(self.queue.next_used, GuestAddress(queue.used + 2))
                .is_err()
            {
                self.status |= STATUS_FAILED;
                break;
            }
            completed = true;
        }
        self.queue.next_avail = next_avail;
        if completed {
            self.interrupt_status |= 1;
            if let Some(interrupt) = &self.interrupt {
                (interrupt.0)();
            }
        }
    }

    /// Runs the request whose chain starts at descriptor `head`; returns the number of
    /// bytes written into guest buffers (data plus the status byte).
    fn handle_request(&mut self, memory: &GuestMemoryMmap, head: u16) -> u32 {
        let Some(chain) = self.read_chain(memory, head) else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        // The chain is: header (device-readable), data..., status (device-writable, last).
        let Some((status_descriptor, rest)) = chain.split_last() else {
            return 0;
        };
        let Some((header_descriptor, data)) = rest.split_first() else {
            return 0;
        };
        if status_descriptor.flags & DESC_F_WRITE == 0
            || status_descriptor.len < 1
            || header_descriptor.len < 16
        {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let status_address = GuestAddress(status_descriptor.addr);
        let request_type = memory.read_obj::<u32>(GuestAddress(header_descriptor.addr));
        let sector = memory.read_obj::<u64>(GuestAddress(header_descriptor.addr + 8));
        let (Ok(request_type), Ok(sector)) = (request_type, sector) else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let (status, written) = self.execute(memory, request_type, sector, data);
        if status != VIRTIO_BLK_S_OK {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        if memory.write_obj(status, status_address).is_err() {
            return written;
        }
        written + 1
    }

    fn execute(
        &self,
        memory: &GuestMemoryMmap,
        request_type: u32,
        sector: u64,
        data: &[Descriptor],
    ) -> (u8, u32) {
        let total: u64 = data
            .iter()
            .map(|descriptor| u64::from(descriptor.len))
            .sum();
        let Some(start) = sector.checked_mul(SECTOR_SIZE) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        match request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let within = start
                    .checked_add(total)
                    .is_some_and(|end| end <= self.backend.size());
                if !within || !total.is_multiple_of(SECTOR_SIZE) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
            }
            _ => {}
        }
        match request_type {
            VIRTIO_BLK_T_IN => {
                let mut offset = start;
                let mut written = 0u32;
                for descriptor in data {
                    if descriptor.flags & DESC_F_WRITE == 0 {
                        return (VIRTIO_BLK_S_IOERR, written);
                    }
                    let mut buffer = vec![0u8; descriptor.len as usize];
                    if self.backend.read_at(&mut buffer, offset).is_err()
                        || memory
                            .write_slice(&buffer, GuestAddress(descriptor.addr))
                            .is_err()
                    {
                        return (VIRTIO_BLK_S_IOERR, written);
                    }
                    offset += u64::from(descriptor.len);
                    written += descriptor.len;
                }
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_read.fetch_add(total, Ordering::Relaxed);
                (VIRTIO_BLK_S_OK, written)
            }
            VIRTIO_BLK_T_OUT => {
                if self.backend.read_only() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut offset = start;
                for descriptor in data {
                    if descriptor.flags & DESC_F_WRITE != 0 {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    let mut buffer = vec![0u8; descriptor.len as usize];
                    if memory
                        .read_slice(&mut buffer, GuestAddress(descriptor.addr))
                        .is_err()
                        || self.backend.write_at(&buffer, offset).is_err()
                    {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    offset += u64::from(descriptor.len);
                }
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_written.fetch_add(total, Ordering::Relaxed);
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.backend.flush().is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let Some(descriptor) = data
                    .first()
                    .filter(|descriptor| descriptor.flags & DESC_F_WRITE != 0)
                else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let mut id = [0u8; 20];
                id[..11].copy_from_slice(b"cairn-disk0");
                let length = (descriptor.len as usize).min(id.len());
                if memory
                    .write_slice(&id[..length], GuestAddress(descriptor.addr))
                    .is_err()
                {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, length as u32)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    fn read_chain(&self, memory: &GuestMemoryMmap, head: u16) -> Option<Vec<Descriptor>> {
        let mut chain = Vec::new();
        let mut index = head;
        loop {
            if index >= self.queue.size || chain.len() >= usize::from(self.queue.size) {
                return None; // out-of-range index or a loop in the chain
            }
            let address = self.queue.desc + u64::from(index) * 16;
            let descriptor = Descriptor {
                addr: memory.read_obj(GuestAddress(address)).ok()?,
                len: memory.read_obj(GuestAddress(address + 8)).ok()?,
                flags: memory.read_obj(GuestAddress(address + 12)).ok()?,
            };
            let next: u16 = memory.read_obj(GuestAddress(address + 14)).ok()?;
            let has_next = descriptor.flags & DESC_F_NEXT != 0;
            chain.push(descriptor);
            if !has_next {
                return Some(chain);
            }
            index = next;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
}

fn set_low(current: u64, value: u32) -> u64 {
    (current & !0xffff_ffff) | u64::from(value)
}

fn set_high(current: u64, value: u32) -> u64 {
    (current & 0xffff_ffff) | (u64::from(value) << 32)
}

#[cfg(test)]
mod tests {
    use super::super::block::MemoryBackend;
    use super::*;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HEADER: u64 = 0x4000;
    const STATUS: u64 = 0x4100;
    const DATA: u64 = 0x5000;

    struct Driver {
        memory: GuestMemoryMmap,
        device: VirtioMmioBlock,
        backend: Arc<MemoryBackend>,
        avail_index: u16,
    }

    fn write32(device: &mut VirtioMmioBlock, memory: &GuestMemoryMmap, offset: u64, value: u32) {
        device.mmio_write(memory, offset, &value.to_le_bytes());
    }

    fn read32(device: &mut VirtioMmioBlock, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        device.mmio_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Brings a device up the way a driver does (virtio 1.2, 3.1.1), with `features`.
    fn driver(disk_bytes: u64, features: u64) -> (Driver, u32) {
        let memory =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let backend = Arc::new(MemoryBackend::new(disk_bytes));
        let mut device = VirtioMmioBlock::new(backend.clone(), None);
        assert_eq!(read32(&mut device, 0x000), MMIO_MAGIC);
        assert_eq!(read32(&mut device, 0x004), 2);
        assert_eq!(read32(&mut device, 0x008), DEVICE_ID_BLOCK);
        write32(&mut device, &memory, 0x070, 0);
        write32(
            &mut device,
            &memory,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
        );
        write32(&mut device, &memory, 0x024, 0);
        write32(&mut device, &memory, 0x020, features as u32);
        write32(&mut device, &memory, 0x024, 1);
        write32(&mut device, &memory, 0x020, (features >> 32) as u32);
        write32(
            &mut device,
            &memory,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        let status = read32(&mut device, 0x070);
        write32(&mut device, &memory, 0x030, 0);
        write32(&mut device, &memory, 0x038, 8);
        write32(&mut device, &memory, 0x080, DESC as u32);
        write32(&mut device, &memory, 0x090, AVAIL as u32);
        write32(&mut device, &memory, 0x0a0, USED as u32);
        write32(&mut device, &memory, 0x044, 1);
        write32(&mut device, &memory, 0x070, status | STATUS_DRIVER_OK);
        (
            Driver {
                memory,
                device,
                backend,
                avail_index: 0,
            },
            status,
        )
    }

    impl Driver {
        fn descriptor(&self, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
            let base = DESC + index * 16;
            self.memory
                .write_obj(addr, GuestAddress(base))
                .expect("desc");
            self.memory
                .write_obj(len, GuestAddress(base + 8))
                .expect("desc");
            self.memory
                .write_obj(flags, GuestAddress(base + 12))
                .expect("desc");
            self.memory
                .write_obj(next, GuestAddress(base + 14))
                .expect("desc");
        }

        /// Submits a request with `data_len` bytes of data and returns (status, used len).
        fn request(&mut self, request_type: u32, sector: u64, data_len: u32) -> (u8, u32) {
            self.memory
                .write_obj(request_type, GuestAddress(HEADER))
                .expect("header");
            self.memory
                .write_obj(sector, GuestAddress(HEADER + 8))
                .expect("header");
            self.memory
                .write_obj(0xffu8, GuestAddress(STATUS))
                .expect("status");
            let device_writes =
                request_type == VIRTIO_BLK_T_IN || request_type == VIRTIO_BLK_T_GET_ID;
            if data_len > 0 {
                self.descriptor(0, HEADER, 16, DESC_F_NEXT, 1);
                self.descriptor(
                    1,
                    DATA,
                    data_len,
                    DESC_F_NEXT | if device_writes { DESC_F_WRITE } else { 0 },
                    2,
                );
                self.descriptor(2, STATUS, 1, DESC_F_WRITE, 0);
            } else {
                self.descriptor(0, HEADER, 16, DESC_F_NEXT, 2);
                self.descriptor(2, STATUS, 1, DESC_F_WRITE, 0);
            }
            let slot = u64::from(self.avail_index % 8);
            self.memory
                .write_obj(0u16, GuestAddress(AVAIL + 4 + slot * 2))
                .expect("avail");
            self.avail_index = self.avail_index.wrapping_add(1);
            self.memory
                .write_obj(self.avail_index, GuestAddress(AVAIL + 2))
                .expect("avail");
            write32(&mut self.device, &self.memory, 0x050, 0);
            let used_index: u16 = self.memory.read_obj(GuestAddress(USED + 2)).expect("used");
            assert_eq!(
                used_index, self.avail_index,
                "request completed synchronously"
            );
            let used_slot = u64::from((used_index - 1) % 8);
            let used_id: u32 = self
                .memory
                .read_obj(GuestAddress(USED + 4 + used_slot * 8))
                .expect("used");
            assert_eq!(used_id, 0, "used element names the head descriptor");
            let used_len: u32 = self
                .memory
                .read_obj(GuestAddress(USED + 8 + used_slot * 8))
                .expect("used");
            (
                self.memory.read_obj(GuestAddress(STATUS)).expect("status"),
                used_len,
            )
        }
    }

    #[test]
    fn write_then_read_round_trips_through_the_backend() {
        let (mut driver, status) = driver(1 << 20, VIRTIO_F_VERSION_1);
        assert_ne!(status & STATUS_FEATURES_OK, 0, "VERSION_1 is accepted");
        let pattern: Vec<u8> = (0..4096u32).map(|index| (index * 7 + 3) as u8).collect();
        driver
            .memory
            .write_slice(&pattern, GuestAddress(DATA))
            .expect("data");
        assert_eq!(
            driver.request(VIRTIO_BLK_T_OUT, 16, 4096),
            (VIRTIO_BLK_S_OK, 1)
        );
        assert_eq!(
            &driver.backend.contents()[16 * 512..16 * 512 + 4096],
            &pattern[..],
            "bytes reached the backend"
        );
        driver
            .memory
            .write_slice(&[0u8; 4096], GuestAddress(DATA))
            .expect("clear");
        assert_eq!(
            driver.request(VIRTIO_BLK_T_IN, 16, 4096),
            (VIRTIO_BLK_S_OK, 4097)
        );
        let mut read_back = vec![0u8; 4096];
        driver
            .memory
            .read_slice(&mut read_back, GuestAddress(DATA))
            .expect("data");
        assert_eq!(read_back, pattern);
        let stats = driver.device.stats();
        assert_eq!(
            (
                stats.reads.load(Ordering::Relaxed),
                stats.writes.load(Ordering::Relaxed)
            ),
            (1, 1)
        );
    }

    #[test]
    fn capacity_is_reported_in_sectors_in_config_space() {
        let (mut driver, _) = driver(3 << 20, VIRTIO_F_VERSION_1);
        let low = read32(&mut driver.device, 0x100);
        let high = read32(&mut driver.device, 0x104);
        assert_eq!(u64::from(low) | (u64::from(high) << 32), (3 << 20) / 512);
    }

    #[test]
    fn requests_beyond_the_end_fail_without_touching_the_disk() {
        let (mut driver, _) = driver(64 * 1024, VIRTIO_F_VERSION_1);
        driver
            .memory
            .write_slice(&[0xaa; 4096], GuestAddress(DATA))
            .expect("data");
        assert_eq!(
            driver.request(VIRTIO_BLK_T_OUT, 127, 4096).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            driver.request(VIRTIO_BLK_T_OUT, u64::MAX / 256, 4096).0,
            VIRTIO_BLK_S_IOERR
        );
        assert!(driver.backend.contents().iter().all(|byte| *byte == 0));
    }

    #[test]
    fn backend_failures_become_io_errors() {
        let (mut driver, _) = driver(1 << 20, VIRTIO_F_VERSION_1);
        driver.backend.set_failing(true);
        assert_eq!(
            driver.request(VIRTIO_BLK_T_IN, 0, 512).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            driver.request(VIRTIO_BLK_T_FLUSH, 0, 0).0,
            VIRTIO_BLK_S_IOERR
        );
        driver.backend.set_failing(false);
        assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, 0).0, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn get_id_and_unknown_requests() {
        let (mut driver, _) = driver(1 << 20, VIRTIO_F_VERSION_1);
        assert_eq!(
            driver.request(VIRTIO_BLK_T_GET_ID, 0, 20),
            (VIRTIO_BLK_S_OK, 21)
        );
        let mut id = [0u8; 11];
        driver
            .memory
            .read_slice(&mut id, GuestAddress(DATA))
            .expect("id");
        assert_eq!(&id, b"cairn-disk0");
        assert_eq!(driver.request(99, 0, 512).0, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn legacy_drivers_without_version_1_are_refused() {
        let (_, status) = driver(1 << 20, 0);
        assert_eq!(status & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn a_descriptor_loop_is_an_error_not_a_hang() {
        let (mut driver, _) = driver(1 << 20, VIRTIO_F_VERSION_1);
        driver.descriptor(0, HEADER, 16, DESC_F_NEXT, 1);
        driver.descriptor(1, DATA, 512, DESC_F_NEXT, 0);
        driver
            .memory
            .write_obj(0u16, GuestAddress(AVAIL + 4))
            .expect("avail");
        driver
            .memory
            .write_obj(1u16, GuestAddress(AVAIL + 2))
            .expect("avail");
        write32(&mut driver.device, &driver.memory, 0x050, 0);
        let used_index: u16 = driver
            .memory
            .read_obj(GuestAddress(USED + 2))
            .expect("used");
        assert_eq!(
            used_index, 1,
            "the broken chain is returned, not retried forever"
        );
        assert_eq!(driver.device.stats().errors.load(Ordering::Relaxed), 1);
    }
}
