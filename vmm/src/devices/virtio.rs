//! The virtio-MMIO transport (virtio 1.x, "modern" MMIO version 2) and split
//! virtqueues, shared by every virtio device of the VMM ([`super::virtio_blk`],
//! [`super::virtio_net`]).
//!
//! A device owns a [`Transport`] (the common registers, feature negotiation, device
//! status and its queues) and adds its device ID, feature bits, config space and what
//! a queue notification means.
//!
//! Architecture invariant: every guest address followed (rings, descriptors, buffers)
//! goes through vm-memory's bounds-checked accessors, descriptor chains are bounded by
//! the queue size, and a driver that breaks the protocol gets `FAILED` or a returned
//! chain, never a hang or an access outside its memory.

use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// `MagicValue` register content ("virt").
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The MMIO transport version implemented.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported ("CRN").
pub const VENDOR_ID: u32 = 0x004e_5243;
/// Largest queue a device accepts.
pub const QUEUE_SIZE_MAX: u16 = 256;
/// Feature bit: the device follows virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = 2;

/// Device status bit: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status bit: the guest has a driver for it.
pub const STATUS_DRIVER: u32 = 2;
/// Device status bit: the driver is ready; queues run.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status bit: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Device status bit: something went wrong; the device stops.
pub const STATUS_FAILED: u32 = 128;

/// The callback that raises a device's interrupt line (Linux guests); the built-in
/// guest polls and needs none.
pub struct Interrupt(pub Box<dyn Fn() + Send>);

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Interrupt")
    }
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `DESC_F_*` flags.
    pub flags: u16,
}

impl Descriptor {
    /// Whether the device may write this buffer.
    pub fn writable(&self) -> bool {
        self.flags & DESC_F_WRITE != 0
    }
}

/// The driver broke the queue protocol (a ring outside guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFault;

/// A split virtqueue as the driver configured it, and the device's positions in it.
/// It is also the queue's saved state for migration: these seven fields are all a
/// split queue's device side holds (the rings themselves are guest memory).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Queue {
    /// Number of descriptors (a power of two, at most [`QUEUE_SIZE_MAX`]).
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (available) ring address.
    pub avail: u64,
    /// Device (used) ring address.
    pub used: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

impl Queue {
    /// Takes the next chain the driver made available: its head index, or `None` when
    /// the driver has made nothing new available.
    pub fn pop(&mut self, memory: &GuestMemoryMmap) -> Result<Option<u16>, QueueFault> {
        if !self.ready || self.size == 0 {
            return Ok(None);
        }
        let avail_index: u16 = memory
            .read_obj(GuestAddress(self.avail + 2))
            .map_err(|_| QueueFault)?;
        fence(Ordering::Acquire);
        if avail_index == self.next_avail {
            return Ok(None);
        }
        let slot = u64::from(self.next_avail % self.size);
        let head: u16 = memory
            .read_obj(GuestAddress(self.avail + 4 + slot * 2))
            .map_err(|_| QueueFault)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Whether the driver has made a chain available that the device has not taken.
    pub fn has_available(&self, memory: &GuestMemoryMmap) -> bool {
        self.ready
            && self.size > 0
            && memory
                .read_obj::<u16>(GuestAddress(self.avail + 2))
                .is_ok_and(|index| index != self.next_avail)
    }

    /// The descriptors of the chain starting at `head`, or `None` for an index out of
    /// range, a loop, or a table outside guest memory.
    pub fn chain(&self, memory: &GuestMemoryMmap, head: u16) -> Option<Vec<Descriptor>> {
        let mut chain = Vec::new();
        let mut index = head;
        loop {
            if index >= self.size || chain.len() >= usize::from(self.size) {
                return None;
            }
            let address = self.desc + u64::from(index) * 16;
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

    /// Returns chain `head` to the driver with `written` bytes written into it.
    pub fn push_used(
        &mut self,
        memory: &GuestMemoryMmap,
        head: u16,
        written: u32,
    ) -> Result<(), QueueFault> {
        let slot = u64::from(self.next_used % self.size);
        let element = GuestAddress(self.used + 4 + slot * 8);
        memory
            .write_obj(u32::from(head), element)
            .map_err(|_| QueueFault)?;
        memory
            .write_obj(written, GuestAddress(element.0 + 4))
            .map_err(|_| QueueFault)?;
        self.next_used = self.next_used.wrapping_add(1);
        fence(Ordering::Release);
        memory
            .write_obj(self.next_used, GuestAddress(self.used + 2))
            .map_err(|_| QueueFault)
    }
}

/// The saved state of one virtio-MMIO [`Transport`] (migration): the registers the
/// driver wrote and the queues' positions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// Format version of this value ([`TRANSPORT_STATE_VERSION`]).
    pub version: u16,
    /// The device type (checked on restore: a state restores only into its own kind).
    pub device_id: u32,
    /// Features the device offered (checked on restore: the destination must offer the
    /// same, or the driver's negotiated set may not hold there).
    pub device_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Device status.
    pub status: u32,
    /// `QueueSel`.
    pub queue_select: u32,
    /// The queues.
    pub queues: Vec<Queue>,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
}

/// The [`TransportState`] format this VMM writes and reads.
pub const TRANSPORT_STATE_VERSION: u16 = 1;

/// The common registers of one virtio-MMIO device: feature negotiation, status,
/// queue configuration and the interrupt status.
#[derive(Debug)]
pub struct Transport {
    device_id: u32,
    device_features: u64,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    queue_select: u32,
    /// The device's queues, by index.
    pub queues: Vec<Queue>,
    interrupt_status: u32,
    interrupt: Option<Interrupt>,
}

impl Transport {
    /// A device of type `device_id` offering `device_features` (which must include
    /// [`VIRTIO_F_VERSION_1`]) with `queues` queues.
    pub fn new(
        device_id: u32,
        device_features: u64,
        queues: usize,
        interrupt: Option<Interrupt>,
    ) -> Self {
        Self {
            device_id,
            device_features,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: vec![Queue::default(); queues],
            interrupt_status: 0,
            interrupt,
        }
    }

    /// The saved state (migration).
    pub fn save(&self) -> TransportState {
        TransportState {
            version: TRANSPORT_STATE_VERSION,
            device_id: self.device_id,
            device_features: self.device_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            queues: self.queues.clone(),
            interrupt_status: self.interrupt_status,
        }
    }

    /// Takes over a saved state; refuses one of another version, device type, feature
    /// set or queue count.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        if state.version != TRANSPORT_STATE_VERSION {
            return Err(format!(
                "virtio transport state version {} (this VMM reads {TRANSPORT_STATE_VERSION})",
                state.version
            ));
        }
        if state.device_id != self.device_id
            || state.device_features != self.device_features
            || state.queues.len() != self.queues.len()
        {
            return Err(format!(
                "virtio device {} with features {:#x} and {} queues cannot take the state of device {} with features {:#x} and {} queues",
                self.device_id,
                self.device_features,
                self.queues.len(),
                state.device_id,
                state.device_features,
                state.queues.len()
            ));
        }
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.queue_select = state.queue_select;
        self.queues = state.queues.clone();
        self.interrupt_status = state.interrupt_status;
        Ok(())
    }

    /// Features the device offers.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Whether the driver has set `DRIVER_OK` (and the device has not failed).
    pub fn driver_ok(&self) -> bool {
        self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_DRIVER_OK
    }

    /// Marks the device failed (the driver broke the protocol).
    pub fn fail(&mut self) {
        self.status |= STATUS_FAILED;
    }

    /// Back to the state after power-on (a status write of 0, or a VM reboot).
    pub fn reset(&mut self) {
        let queues = self.queues.len();
        self.driver_features = 0;
        self.status = 0;
        self.queues = vec![Queue::default(); queues];
        self.interrupt_status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }

    /// Tells the driver that used rings changed: interrupt status bit 0, and the
    /// interrupt line where there is one.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= 1;
        if let Some(interrupt) = &self.interrupt {
            (interrupt.0)();
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// A guest read of `data.len()` bytes at `offset`; offsets from 0x100 on read
    /// `config` (the device-specific configuration space).
    pub fn read(&self, offset: u64, data: &mut [u8], config: &[u8]) {
        if offset >= 0x100 {
            for (index, byte) in data.iter_mut().enumerate() {
                *byte = config
                    .get((offset - 0x100) as usize + index)
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        let queue = self.queues.get(self.queue_select as usize);
        let value: u32 = match offset {
            0x000 => MMIO_MAGIC,
            0x004 => MMIO_VERSION,
            0x008 => self.device_id,
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_select {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 if queue.is_some() => u32::from(QUEUE_SIZE_MAX),
            0x044 => u32::from(queue.is_some_and(|queue| queue.ready)),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let length = data.len().min(4);
        data[..length].copy_from_slice(&bytes[..length]);
    }

    /// A guest write at `offset` (config space writes are ignored). Returns the index
    /// of the queue the driver notified, when the device should process it now.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<u32> {
        if offset >= 0x100 {
            return None;
        }
        let mut bytes = [0u8; 4];
        let length = data.len().min(4);
        bytes[..length].copy_from_slice(&data[..length]);
        let value = u32::from_le_bytes(bytes);
        let configurable = self.status & STATUS_DRIVER_OK == 0;
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
                if configurable
                    && value.is_power_of_two()
                    && value <= u32::from(QUEUE_SIZE_MAX) =>
            {
                if let Some(queue) = self.selected() {
                    queue.size = value as u16;
                }
            }
            0x044 => {
                if let Some(queue) = self.selected() {
                    queue.ready = value == 1 && queue.size > 0;
                }
            }
            0x050 if self.driver_ok() => {
                let ready = self
                    .queues
                    .get(value as usize)
                    .is_some_and(|queue| queue.ready);
                return ready.then_some(value);
            }
            0x064 => self.interrupt_status &= !value,
            0x070 => self.write_status(value),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if configurable => {
                if let Some(queue) = self.selected() {
                    let field = match offset & !0x7 {
                        0x080 => &mut queue.desc,
                        0x090 => &mut queue.avail,
                        _ => &mut queue.used,
                    };
                    *field = if offset & 0x4 == 0 {
                        set_low(*field, value)
                    } else {
                        set_high(*field, value)
                    };
                }
            }
            _ => {}
        }
        None
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Accept only features we offered, and insist on VERSION_1 (no legacy mode).
            if self.driver_features & !self.device_features != 0
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
}

fn set_low(current: u64, value: u32) -> u64 {
    (current & !0xffff_ffff) | u64::from(value)
}

fn set_high(current: u64, value: u32) -> u64 {
    (current & 0xffff_ffff) | (u64::from(value) << 32)
}

/// A driver in tests: brings a device up the way a guest does (virtio 1.2, 3.1.1), one
/// queue region per queue, and submits and reaps chains.
#[cfg(test)]
pub(crate) mod test_driver {
    use super::*;

    /// Guest-physical layout of queue `index`: descriptors, avail, used.
    pub const fn rings(index: u64) -> (u64, u64, u64) {
        let base = 0x1000 + index * 0x1000;
        (base, base + 0x400, base + 0x800)
    }

    /// The size every test queue has.
    pub const SIZE: u16 = 8;

    /// Writes `value` to register `offset` through `write`.
    pub fn write32(write: &mut dyn FnMut(u64, &[u8]), offset: u64, value: u32) {
        write(offset, &value.to_le_bytes());
    }

    /// Negotiates `features` and sets up `queues` queues; returns the status the
    /// device kept after FEATURES_OK.
    pub fn bring_up(
        write: &mut dyn FnMut(u64, &[u8]),
        read: &mut dyn FnMut(u64) -> u32,
        features: u64,
        queues: u64,
    ) -> u32 {
        write32(write, 0x070, 0);
        write32(write, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write32(write, 0x024, 0);
        write32(write, 0x020, features as u32);
        write32(write, 0x024, 1);
        write32(write, 0x020, (features >> 32) as u32);
        write32(
            write,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        let status = read(0x070);
        for index in 0..queues {
            let (desc, avail, used) = rings(index);
            write32(write, 0x030, index as u32);
            write32(write, 0x038, u32::from(SIZE));
            write32(write, 0x080, desc as u32);
            write32(write, 0x090, avail as u32);
            write32(write, 0x0a0, used as u32);
            write32(write, 0x044, 1);
        }
        write32(write, 0x070, status | STATUS_DRIVER_OK);
        status
    }

    /// Writes descriptor `index` of queue `queue`.
    pub fn descriptor(
        memory: &GuestMemoryMmap,
        queue: u64,
        index: u64,
        descriptor: Descriptor,
        next: u16,
    ) {
        let base = rings(queue).0 + index * 16;
        memory
            .write_obj(descriptor.addr, GuestAddress(base))
            .expect("desc");
        memory
            .write_obj(descriptor.len, GuestAddress(base + 8))
            .expect("desc");
        memory
            .write_obj(descriptor.flags, GuestAddress(base + 12))
            .expect("desc");
        memory
            .write_obj(next, GuestAddress(base + 14))
            .expect("desc");
    }

    /// Makes chain `head` available on `queue` as the `count`-th submission (0-based).
    pub fn make_available(memory: &GuestMemoryMmap, queue: u64, head: u16, count: u16) {
        let avail = rings(queue).1;
        let slot = u64::from(count % SIZE);
        memory
            .write_obj(head, GuestAddress(avail + 4 + slot * 2))
            .expect("avail");
        memory
            .write_obj(count.wrapping_add(1), GuestAddress(avail + 2))
            .expect("avail");
    }

    /// The used ring of `queue`: its index, and the (id, len) of entry `position`.
    pub fn used(memory: &GuestMemoryMmap, queue: u64, position: u16) -> (u16, u32, u32) {
        let used = rings(queue).2;
        let index: u16 = memory.read_obj(GuestAddress(used + 2)).expect("used");
        let slot = u64::from(position % SIZE);
        let id: u32 = memory
            .read_obj(GuestAddress(used + 4 + slot * 8))
            .expect("used");
        let len: u32 = memory
            .read_obj(GuestAddress(used + 8 + slot * 8))
            .expect("used");
        (index, id, len)
    }
}
