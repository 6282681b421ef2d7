//! virtio-blk over virtio-MMIO ([`super::virtio`]), with one split virtqueue,
//! processed synchronously on the vCPU thread that notifies it.
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
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use super::block::BlockBackend;
pub use super::virtio::Interrupt;
use super::virtio::{Descriptor, QueueFault, Transport, VIRTIO_F_VERSION_1};

/// virtio device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

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

/// One virtio-blk device on the MMIO transport.
#[derive(Debug)]
pub struct VirtioMmioBlock {
    backend: Arc<dyn BlockBackend>,
    stats: Arc<BlockStats>,
    transport: Transport,
}

impl VirtioMmioBlock {
    /// The device's saved state (migration): its transport and queues. The device
    /// holds nothing else between requests (every request completes in the notify that
    /// started it, or for receive in one delivery under the device lock).
    pub fn save_state(&self) -> crate::devices::virtio::TransportState {
        self.transport.save()
    }

    /// Takes over a saved state ([`crate::devices::virtio::Transport::restore`]).
    pub fn restore_state(
        &mut self,
        state: &crate::devices::virtio::TransportState,
    ) -> Result<(), String> {
        self.transport.restore(state)
    }

    /// A device serving `backend`. `interrupt`, when given, is called after used-ring
    /// updates (Linux guests); the built-in guest polls and needs none.
    pub fn new(backend: Arc<dyn BlockBackend>, interrupt: Option<Interrupt>) -> Self {
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
        if backend.read_only() {
            features |= VIRTIO_BLK_F_RO;
        }
        Self {
            backend,
            stats: Arc::new(BlockStats::default()),
            transport: Transport::new(DEVICE_ID_BLOCK, features, 1, interrupt),
        }
    }

    /// Flushes the backend (migration's switch-over: every write the guest was told is
    /// done is on the disk before the destination may write it).
    pub fn flush_backend(&self) -> std::io::Result<()> {
        self.backend.flush()
    }

    /// The disk's size in bytes (the backend's).
    pub fn size_bytes(&self) -> u64 {
        self.backend.size()
    }

    /// Whether the disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.backend.read_only()
    }

    /// The request counters.
    pub fn stats(&self) -> Arc<BlockStats> {
        Arc::clone(&self.stats)
    }

    /// Features the device offers.
    pub fn device_features(&self) -> u64 {
        self.transport.device_features()
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the MMIO window; the
    /// config space holds the capacity in sectors.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let capacity = (self.backend.size() / SECTOR_SIZE).to_le_bytes();
        self.transport.read(offset, data, &capacity);
    }

    /// Handles a guest write at `offset` in the MMIO window; a queue notify processes the
    /// queue against `memory` before returning.
    pub fn mmio_write(&mut self, memory: &GuestMemoryMmap, offset: u64, data: &[u8]) {
        if self.transport.write(offset, data) == Some(0) {
            self.process_queue(memory);
        }
    }

    /// Completes every request the driver has made available.
    fn process_queue(&mut self, memory: &GuestMemoryMmap) {
        let mut completed = false;
        // Never process more than one queue's worth per notify: a driver that moves the
        // index by more than the queue size is broken, and this bounds the loop.
        for _ in 0..self.transport.queues[0].size {
            let head = match self.transport.queues[0].pop(memory) {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(QueueFault) => {
                    self.transport.fail();
                    break;
                }
            };
            let written = self.handle_request(memory, head);
            if self.transport.queues[0]
                .push_used(memory, head, written)
                .is_err()
            {
                self.transport.fail();
                break;
            }
            completed = true;
        }
        if completed {
            self.transport.signal_used();
        }
    }

    /// Runs the request whose chain starts at descriptor `head`; returns the number of
    /// bytes written into guest buffers (data plus the status byte).
    fn handle_request(&mut self, memory: &GuestMemoryMmap, head: u16) -> u32 {
        let Some(chain) = self.transport.queues[0].chain(memory, head) else {
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
        if !status_descriptor.writable() || status_descriptor.len < 1 || header_descriptor.len < 16
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
                    if !descriptor.writable() {
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
                    if descriptor.writable() {
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
                let Some(descriptor) = data.first().filter(|descriptor| descriptor.writable())
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
}

#[cfg(test)]
mod tests {
    use super::super::block::MemoryBackend;
    use super::super::virtio::test_driver::{self, rings};
    use super::super::virtio::{DESC_F_NEXT, DESC_F_WRITE, MMIO_MAGIC, STATUS_FEATURES_OK};
    use super::*;

    const AVAIL: u64 = rings(0).1;
    const USED: u64 = rings(0).2;
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

    /// Brings a device up the way a driver does, with `features`.
    fn driver(disk_bytes: u64, features: u64) -> (Driver, u32) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let backend = Arc::new(MemoryBackend::new(disk_bytes));
        let device = VirtioMmioBlock::new(backend.clone(), None);
        let device = std::cell::RefCell::new(device);
        assert_eq!(read32(&mut device.borrow_mut(), 0x000), MMIO_MAGIC);
        assert_eq!(read32(&mut device.borrow_mut(), 0x004), 2);
        assert_eq!(read32(&mut device.borrow_mut(), 0x008), DEVICE_ID_BLOCK);
        let status = test_driver::bring_up(
            &mut |offset, data| device.borrow_mut().mmio_write(&memory, offset, data),
            &mut |offset| read32(&mut device.borrow_mut(), offset),
            features,
            1,
        );
        (
            Driver {
                memory,
                device: device.into_inner(),
                backend,
                avail_index: 0,
            },
            status,
        )
    }

    impl Driver {
        fn descriptor(&self, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
            test_driver::descriptor(
                &self.memory,
                0,
                index,
                Descriptor { addr, len, flags },
                next,
            );
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
