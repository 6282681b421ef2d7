//! virtio-net over virtio-MMIO ([`super::virtio`]) on a host tap device.
//!
//! Queue 0 receives, queue 1 transmits. Offered features: `VIRTIO_F_VERSION_1` and
//! `VIRTIO_NET_F_MAC` (the MAC is in config space); no checksum or segmentation
//! offloads and no mergeable buffers, so every frame is one chain headed by the
//! 12-byte `virtio_net_hdr_v1` with no offload flags, and the driver must post receive
//! buffers of at least [`MIN_RX_BUFFER`] bytes.
//!
//! The tap is opened with `IFF_VNET_HDR` and a vnet header size of 12 ([`open_tap`]), so
//! what the guest transmits (header and frame) is written to the tap as is, one `write`
//! per frame, and what the tap delivers is copied to the guest as is. Transmission runs
//! on the vCPU thread that notifies queue 1. Reception runs on a pump thread per device
//! (`vm.rs`) that reads the tap when the driver has buffers posted and calls
//! [`VirtioMmioNet::deliver`].
//!
//! Architecture invariant: as for every virtio device, guest buffers are reached only
//! through vm-memory's bounds-checked accessors, and a frame longer than the guest's
//! buffer chain is dropped and counted, never truncated into it or written past it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use super::virtio::{Interrupt, QueueFault, Transport, VIRTIO_F_VERSION_1};

/// virtio device ID of a network device.
pub const DEVICE_ID_NET: u32 = 1;
/// Feature bit: the device has a MAC address in config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of `virtio_net_hdr_v1` (virtio 1.x always has `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Smallest receive chain that holds any frame of a 1500-byte MTU: header plus a full
/// Ethernet frame without FCS.
pub const MIN_RX_BUFFER: usize = NET_HDR_LEN + 1514;
/// Largest frame (with header) the device moves in either direction.
pub const MAX_FRAME: usize = NET_HDR_LEN + 65_535;
/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;

/// Frame counters, readable while the VM runs.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (frames without the virtio header).
    pub rx_bytes: AtomicU64,
    /// Frames from the tap that the guest could not take: its driver was not running,
    /// or its buffer was too small.
    pub rx_dropped: AtomicU64,
    /// Frames the guest transmitted to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes the guest transmitted (frames without the virtio header).
    pub tx_bytes: AtomicU64,
    /// Transmissions that failed: a malformed chain or a tap write error.
    pub tx_errors: AtomicU64,
}

/// What became of a frame offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written into a receive buffer and returned to the driver.
    Delivered,
    /// The driver has no receive buffer posted now: keep the frame and retry after
    /// the driver notifies the receive queue.
    NoBuffer,
    /// Dropped (counted in `rx_dropped`): the driver is not running or the frame does
    /// not fit the buffer it posted.
    Dropped,
}

/// One virtio-net device on the MMIO transport.
#[derive(Debug)]
pub struct VirtioMmioNet {
    transport: Transport,
    mac: [u8; 6],
    tap: Arc<File>,
    stats: Arc<NetStats>,
    /// The VM's fence: once it lapses no frame reaches the tap ([`crate::fence`]).
    fence: Option<Arc<crate::fence::Fence>>,
    /// Fault tolerance's output commit: while it holds, frames wait there for their
    /// checkpoint's acknowledgement instead of reaching the tap ([`crate::ft`]).
    gate: Option<Arc<crate::ft::OutputGate>>,
}

impl VirtioMmioNet {
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

    /// A device with address `mac` whose frames go to and come from `tap` (a tap opened
    /// by [`open_tap`], or in tests any packet-preserving file such as a datagram
    /// socket). `interrupt` is raised after used-ring updates (Linux guests).
    pub fn new(tap: Arc<File>, mac: [u8; 6], interrupt: Option<Interrupt>) -> Self {
        Self {
            transport: Transport::new(
                DEVICE_ID_NET,
                VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC,
                2,
                interrupt,
            ),
            mac,
            tap,
            stats: Arc::new(NetStats::default()),
            fence: None,
            gate: None,
        }
    }

    /// Frames go through `gate` (held while fault tolerance runs).
    pub fn with_gate(mut self, gate: Arc<crate::ft::OutputGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The device checks `fence` before every tap write.
    pub fn with_fence(mut self, fence: Arc<crate::fence::Fence>) -> Self {
        self.fence = Some(fence);
        self
    }

    /// The frame counters.
    pub fn stats(&self) -> Arc<NetStats> {
        Arc::clone(&self.stats)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Attaches the device to another tap (the same tap made again after it was
    /// deleted); queues and the driver's state are kept.
    pub fn set_tap(&mut self, tap: Arc<File>) {
        self.tap = tap;
    }

    /// Whether the guest's driver has brought the device up.
    pub fn driver_ok(&self) -> bool {
        self.transport.driver_ok()
    }

    /// Back to power-on state (a VM reboot): queues forgotten, driver not running.
    pub fn reset(&mut self) {
        self.transport.reset();
    }

    /// Handles a guest read at `offset` in the MMIO window; config space is the MAC.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data, &self.mac);
    }

    /// Handles a guest write at `offset`. A transmit notify sends every frame the driver
    /// made available before returning. Returns true when the driver notified the
    /// receive queue (new buffers: the pump should retry a frame it holds).
    pub fn mmio_write(&mut self, memory: &GuestMemoryMmap, offset: u64, data: &[u8]) -> bool {
        match self.transport.write(offset, data) {
            Some(queue) if queue as usize == TX_QUEUE => {
                self.transmit(memory);
                false
            }
            Some(queue) => queue as usize == RX_QUEUE,
            None => false,
        }
    }

    /// Whether the driver runs and has a receive buffer posted.
    pub fn can_receive(&self, memory: &GuestMemoryMmap) -> bool {
        self.transport.driver_ok() && self.transport.queues[RX_QUEUE].has_available(memory)
    }

    /// Sends every frame the driver made available on the transmit queue.
    fn transmit(&mut self, memory: &GuestMemoryMmap) {
        let mut completed = false;
        // At most one queue's worth per notify: bounds the loop for a broken driver.
        for _ in 0..self.transport.queues[TX_QUEUE].size {
            let head = match self.transport.queues[TX_QUEUE].pop(memory) {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(QueueFault) => {
                    self.transport.fail();
                    break;
                }
            };
            // Past the fence deadline another incarnation may own this MAC: the frame
            // is dropped, never written (the descriptor still completes, so the queue
            // does not wedge meanwhile).
            let fenced = self.fence.as_ref().filter(|fence| fence.lapsed());
            match self.gather(memory, head) {
                Some(_) if fenced.is_some() => {
                    if let Some(fence) = fenced {
                        fence.frames_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                }
                Some(mut frame) => {
                    // No offloads were negotiated: whatever the header says, the frame
                    // is complete, so the tap gets a header without offload requests.
                    frame[..NET_HDR_LEN].fill(0);
                    let length = (frame.len() - NET_HDR_LEN) as u64;
                    // Fault tolerance holds the frame until its checkpoint is
                    // acknowledged (or drops it past the hold limit): it counts as sent.
                    let unheld = match &self.gate {
                        Some(gate) => gate.hold(&self.tap, frame),
                        None => Some(frame),
                    };
                    // A tap takes a frame whole or not at all; a short count would be
                    // a broken frame, so it counts as an error like a failed write.
                    let sent = unheld.is_none_or(|frame| {
                        matches!((&*self.tap).write(&frame), Ok(written) if written == frame.len())
                    });
                    if sent {
                        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                        self.stats.tx_bytes.fetch_add(length, Ordering::Relaxed);
                    } else {
                        self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {
                    self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if self.transport.queues[TX_QUEUE]
                .push_used(memory, head, 0)
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

    /// The bytes of a transmit chain: device-readable buffers only, at least a header
    /// and an Ethernet header, at most [`MAX_FRAME`].
    fn gather(&self, memory: &GuestMemoryMmap, head: u16) -> Option<Vec<u8>> {
        let chain = self.transport.queues[TX_QUEUE].chain(memory, head)?;
        let total: usize = chain.iter().map(|descriptor| descriptor.len as usize).sum();
        if chain.iter().any(|descriptor| descriptor.writable())
            || !(NET_HDR_LEN + 14..=MAX_FRAME).contains(&total)
        {
            return None;
        }
        let mut frame = vec![0u8; total];
        let mut at = 0;
        for descriptor in &chain {
            let end = at + descriptor.len as usize;
            memory
                .read_slice(&mut frame[at..end], GuestAddress(descriptor.addr))
                .ok()?;
            at = end;
        }
        Some(frame)
    }

    /// Offers `frame` (virtio header and Ethernet frame, as read from the tap) to the
    /// guest: written into the next receive chain with a clean header.
    pub fn deliver(&mut self, memory: &GuestMemoryMmap, frame: &[u8]) -> Delivery {
        if !self.transport.driver_ok() || frame.len() < NET_HDR_LEN {
            self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return Delivery::Dropped;
        }
        let head = match self.transport.queues[RX_QUEUE].pop(memory) {
            Ok(Some(head)) => head,
            Ok(None) => return Delivery::NoBuffer,
            Err(QueueFault) => {
                self.transport.fail();
                self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return Delivery::Dropped;
            }
        };
        let written = self.transport.queues[RX_QUEUE]
            .chain(memory, head)
            .and_then(|chain| write_chain(memory, &chain, frame));
        let delivered = written.is_some();
        if self.transport.queues[RX_QUEUE]
            .push_used(memory, head, written.unwrap_or(0) as u32)
            .is_err()
        {
            self.transport.fail();
        }
        self.transport.signal_used();
        if delivered {
            self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            self.stats
                .rx_bytes
                .fetch_add((frame.len() - NET_HDR_LEN) as u64, Ordering::Relaxed);
            Delivery::Delivered
        } else {
            self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
            Delivery::Dropped
        }
    }
}

/// Writes a clean header (no flags, no GSO, `num_buffers` 1) and the frame after the
/// tap's header into the device-writable buffers of `chain`; `None` (nothing written)
/// when the chain has a device-readable buffer or is too small for the frame.
fn write_chain(
    memory: &GuestMemoryMmap,
    chain: &[super::virtio::Descriptor],
    frame: &[u8],
) -> Option<usize> {
    let capacity: usize = chain.iter().map(|descriptor| descriptor.len as usize).sum();
    if chain.iter().any(|descriptor| !descriptor.writable()) || capacity < frame.len() {
        return None;
    }
    let mut header = [0u8; NET_HDR_LEN];
    header[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut rest: Vec<u8> = Vec::with_capacity(frame.len());
    rest.extend_from_slice(&header);
    rest.extend_from_slice(&frame[NET_HDR_LEN..]);
    let mut at = 0;
    for descriptor in chain {
        if at == rest.len() {
            break;
        }
        let end = (at + descriptor.len as usize).min(rest.len());
        memory
            .write_slice(&rest[at..end], GuestAddress(descriptor.addr))
            .ok()?;
        at = end;
    }
    Some(rest.len())
}

/// Opens the existing tap `name` of the current network namespace for a virtio-net
/// device: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, vnet header size 12, non-blocking.
pub fn open_tap(name: &str) -> io::Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a network device name (1 to 15 characters, no '/' or spaces)"),
        ));
    }
    // TUNSETIFF with an unknown name would create a fresh tap on no bridge: insist that
    // the tap the node made exists (looked up in this process's namespace).
    let c_name = std::ffi::CString::new(name).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "a device name has no NUL byte")
    })?;
    // SAFETY: c_name is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no network device named {name} in this network namespace"),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: the fd is an open /dev/net/tun and ifr a valid, NUL-terminated ifreq
    // that outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let size: libc::c_int = NET_HDR_LEN as libc::c_int;
    // SAFETY: same fd; TUNSETVNETHDRSZ reads an int through the pointer, which is valid
    // for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// A `--nic` argument of `cairn-vmm`: `tap=NAME[,mac=aa:bb:cc:dd:ee:ff][,ipv4=ADDRESS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicArg {
    /// The existing tap to attach to (in the VMM's network namespace).
    pub tap: String,
    /// The guest's MAC; [`default_mac`] when absent.
    pub mac: Option<[u8; 6]>,
    /// The address the built-in guest answers ARP and ping for.
    pub ipv4: Option<std::net::Ipv4Addr>,
}

impl std::str::FromStr for NicArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        let mut ipv4 = None;
        for part in text.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("{part:?} is not KEY=VALUE (expected tap=NAME[,mac=MAC][,ipv4=ADDRESS])")
            })?;
            match key {
                "tap" => tap = Some(value.to_string()),
                "mac" => {
                    let parsed = parse_mac(value).ok_or_else(|| {
                        format!("mac {value:?} is not six hex bytes like 02:ca:00:00:00:01")
                    })?;
                    if parsed[0] & 1 != 0 {
                        return Err(format!(
                            "mac {value} is a multicast address; a NIC needs a unicast one (first byte even)"
                        ));
                    }
                    mac = Some(parsed);
                }
                "ipv4" => {
                    ipv4 = Some(value.parse().map_err(|_| {
                        format!("ipv4 {value:?} is not an IPv4 address like 10.0.0.2")
                    })?);
                }
                other => {
                    return Err(format!("unknown key {other:?} (expected tap, mac or ipv4)"));
                }
            }
        }
        let tap = tap.ok_or("tap=NAME is required")?;
        Ok(Self { tap, mac, ipv4 })
    }
}

/// A stable, locally administered unicast MAC for NIC `index` of VM `vm`:
/// `02:ca` and four bytes of an FNV-1a hash of both.
pub fn default_mac(vm: &str, index: usize) -> [u8; 6] {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in vm.bytes().chain([0]).chain(index.to_le_bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let [a, b, c, d] = hash.to_be_bytes();
    [0x02, 0xca, a, b, c, d]
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The frame a NIC announces itself with after a live migration (issue 17), behind a
/// zero vnet header, ready for the tap: with the guest's IPv4 address, a gratuitous
/// ARP request (sender and target that address, broadcast), which moves the bridge's
/// forwarding entry and every neighbour's ARP entry; without one (a Linux guest
/// configures its own), QEMU's self-announce, a RARP request for the MAC (ethertype
/// 0x8035), which moves the forwarding entries only.
pub fn announcement(mac: [u8; 6], ipv4: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = vec![0u8; NET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    let (ethertype, operation, address) = match ipv4 {
        Some(address) => ([0x08, 0x06], 1u16, address),
        None => ([0x80, 0x35], 3u16, [0; 4]),
    };
    frame.extend_from_slice(&ethertype);
    // Ethernet, IPv4, 6-byte and 4-byte addresses, the operation.
    frame.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]);
    frame.extend_from_slice(&operation.to_be_bytes());
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&address);
    match ipv4 {
        Some(_) => frame.extend_from_slice(&[0; 6]),
        None => frame.extend_from_slice(&mac),
    }
    frame.extend_from_slice(&address);
    // Padded to Ethernet's 60-byte minimum.
    frame.resize(NET_HDR_LEN + 60, 0);
    frame
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::super::virtio::test_driver;
    use super::super::virtio::{DESC_F_NEXT, DESC_F_WRITE, Descriptor, STATUS_FEATURES_OK};
    use super::*;

    const RX_BUF: u64 = 0x10000;
    const TX_BUF: u64 = 0x20000;
    const MAC: [u8; 6] = [0x02, 0xca, 0x00, 0x00, 0x00, 0x01];

    struct Harness {
        memory: GuestMemoryMmap,
        device: VirtioMmioNet,
        host: UnixDatagram,
        rx_posted: u16,
        tx_sent: u16,
    }

    fn harness(features: u64) -> (Harness, u32) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let (host, device_end) = UnixDatagram::pair().expect("socketpair");
        host.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        let file = File::from(std::os::fd::OwnedFd::from(device_end));
        let device = std::cell::RefCell::new(VirtioMmioNet::new(Arc::new(file), MAC, None));
        let status = test_driver::bring_up(
            &mut |offset, data| {
                device.borrow_mut().mmio_write(&memory, offset, data);
            },
            &mut |offset| {
                let mut data = [0u8; 4];
                device.borrow_mut().mmio_read(offset, &mut data);
                u32::from_le_bytes(data)
            },
            features,
            2,
        );
        (
            Harness {
                memory,
                device: device.into_inner(),
                host,
                rx_posted: 0,
                tx_sent: 0,
            },
            status,
        )
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; NET_HDR_LEN];
        frame.extend_from_slice(&[0xff; 6]); // broadcast
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        frame.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        frame.extend_from_slice(payload);
        frame
    }

    impl Harness {
        /// Posts one receive chain of `lengths` buffers (descriptors from 0).
        fn post_rx(&mut self, lengths: &[u32]) {
            let mut address = RX_BUF;
            for (index, length) in lengths.iter().enumerate() {
                let last = index + 1 == lengths.len();
                test_driver::descriptor(
                    &self.memory,
                    RX_QUEUE as u64,
                    index as u64,
                    Descriptor {
                        addr: address,
                        len: *length,
                        flags: DESC_F_WRITE | if last { 0 } else { DESC_F_NEXT },
                    },
                    index as u16 + 1,
                );
                address += u64::from(*length);
            }
            test_driver::make_available(&self.memory, RX_QUEUE as u64, 0, self.rx_posted);
            self.rx_posted += 1;
            let notify = 0u32.to_le_bytes();
            assert!(self.device.mmio_write(&self.memory, 0x050, &notify));
        }

        fn transmit(&mut self, bytes: &[u8]) {
            self.memory
                .write_slice(bytes, GuestAddress(TX_BUF))
                .expect("tx");
            test_driver::descriptor(
                &self.memory,
                TX_QUEUE as u64,
                0,
                Descriptor {
                    addr: TX_BUF,
                    len: bytes.len() as u32,
                    flags: 0,
                },
                0,
            );
            test_driver::make_available(&self.memory, TX_QUEUE as u64, 0, self.tx_sent);
            self.tx_sent += 1;
            assert!(
                !self
                    .device
                    .mmio_write(&self.memory, 0x050, &1u32.to_le_bytes())
            );
        }
    }

    #[test]
    fn a_moved_nic_announces_itself_with_a_gratuitous_arp_or_a_rarp() {
        let mac = [0x02, 0xca, 1, 2, 3, 4];
        let garp = announcement(mac, Some([10, 20, 0, 5]));
        let frame = &garp[NET_HDR_LEN..];
        assert_eq!(frame.len(), 60);
        assert_eq!(&frame[..6], &[0xff; 6], "broadcast");
        assert_eq!(&frame[6..12], &mac);
        assert_eq!(&frame[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&frame[20..22], &[0, 1], "request");
        assert_eq!(&frame[22..28], &mac, "sender MAC");
        assert_eq!(&frame[28..32], &[10, 20, 0, 5], "sender address");
        assert_eq!(&frame[32..38], &[0; 6]);
        assert_eq!(&frame[38..42], &[10, 20, 0, 5], "target address = sender's");
        let rarp = announcement(mac, None);
        let frame = &rarp[NET_HDR_LEN..];
        assert_eq!(&frame[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(&frame[20..22], &[0, 3], "reverse request");
        assert_eq!(&frame[32..38], &mac, "target MAC = its own");
    }

    #[test]
    fn the_mac_is_in_config_space_and_offered() {
        let (mut harness, status) = harness(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        assert_ne!(status & STATUS_FEATURES_OK, 0);
        let mut mac = [0u8; 6];
        harness.device.mmio_read(0x100, &mut mac);
        assert_eq!(mac, MAC);
        let mut id = [0u8; 4];
        harness.device.mmio_read(0x008, &mut id);
        assert_eq!(u32::from_le_bytes(id), DEVICE_ID_NET);
        assert!(harness.device.driver_ok());
    }

    #[test]
    fn offloads_the_device_does_not_offer_are_refused() {
        let checksum_offload = 1 << 0;
        let (_, status) = harness(VIRTIO_F_VERSION_1 | checksum_offload);
        assert_eq!(status & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn a_transmitted_frame_reaches_the_tap_whole_with_a_clean_header() {
        let (mut harness, _) = harness(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        let mut bytes = frame(b"hello from the guest");
        bytes[0] = 1; // a checksum request the device never offered
        harness.transmit(&bytes);
        let mut received = vec![0u8; 2048];
        let length = harness.host.recv(&mut received).expect("frame on tap");
        assert_eq!(length, bytes.len());
        assert_eq!(&received[..NET_HDR_LEN], &[0u8; NET_HDR_LEN]);
        assert_eq!(&received[NET_HDR_LEN..length], &bytes[NET_HDR_LEN..]);
        let (used, id, _) = test_driver::used(&harness.memory, TX_QUEUE as u64, 0);
        assert_eq!((used, id), (1, 0), "the chain went back to the driver");
        let stats = harness.device.stats();
        assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.tx_bytes.load(Ordering::Relaxed),
            (bytes.len() - NET_HDR_LEN) as u64
        );
    }

    #[test]
    fn once_the_fence_lapses_no_frame_reaches_the_tap_and_the_queue_still_completes() {
        let (harness, _) = harness(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        let fence = Arc::new(crate::fence::Fence::default());
        let mut harness = Harness {
            device: harness.device.with_fence(Arc::clone(&fence)),
            ..harness
        };
        // Armed, not lapsed: frames go out.
        fence
            .set(crate::fence::boottime_ns() + 60_000_000_000)
            .expect("arm");
        harness.transmit(&frame(b"before the deadline"));
        let mut received = vec![0u8; 2048];
        assert!(
            harness.host.recv(&mut received).is_ok(),
            "sent while the lease holds"
        );
        // Lapsed: the next frame is dropped, never written.
        fence.set(crate::fence::boottime_ns() + 1).expect("move");
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(fence.lapsed());
        harness.transmit(&frame(b"after the deadline"));
        harness
            .host
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        assert!(
            harness.host.recv(&mut received).is_err(),
            "no frame reaches the tap after the fence deadline"
        );
        assert_eq!(fence.frames_dropped(), 1);
        let (used, id, _) = test_driver::used(&harness.memory, TX_QUEUE as u64, 1);
        assert_eq!(
            (used, id),
            (2, 0),
            "the dropped chain went back to the driver"
        );
        assert_eq!(harness.device.stats().tx_frames.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_received_frame_is_written_across_the_chain_with_num_buffers_one() {
        let (mut harness, _) = harness(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        assert!(!harness.device.can_receive(&harness.memory));
        let bytes = frame(&[0x5a; 100]);
        assert_eq!(
            harness.device.deliver(&harness.memory, &bytes),
            Delivery::NoBuffer,
            "kept for later, not dropped"
        );
        harness.post_rx(&[20, 1600]);
        assert!(harness.device.can_receive(&harness.memory));
        let mut tap_header = bytes.clone();
        tap_header[0] = 2; // DATA_VALID from the tap: not negotiated, so not passed on
        assert_eq!(
            harness.device.deliver(&harness.memory, &tap_header),
            Delivery::Delivered
        );
        let (used, id, len) = test_driver::used(&harness.memory, RX_QUEUE as u64, 0);
        assert_eq!((used, id, len as usize), (1, 0, bytes.len()));
        let mut written = vec![0u8; bytes.len()];
        harness
            .memory
            .read_slice(&mut written, GuestAddress(RX_BUF))
            .expect("rx");
        assert_eq!(&written[..10], &[0u8; 10]);
        assert_eq!(&written[10..12], &1u16.to_le_bytes());
        assert_eq!(&written[NET_HDR_LEN..], &bytes[NET_HDR_LEN..]);
        assert_eq!(harness.device.stats().rx_frames.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_frame_larger_than_the_buffer_is_dropped_not_truncated() {
        let (mut harness, _) = harness(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        harness.post_rx(&[64]);
        harness
            .memory
            .write_slice(&[0xee; 64], GuestAddress(RX_BUF))
            .expect("fill");
        let bytes = frame(&[0x11; 200]);
        assert_eq!(
            harness.device.deliver(&harness.memory, &bytes),
            Delivery::Dropped
        );
        let (used, _, len) = test_driver::used(&harness.memory, RX_QUEUE as u64, 0);
        assert_eq!((used, len), (1, 0), "the buffer goes back empty");
        let mut buffer = [0u8; 64];
        harness
            .memory
            .read_slice(&mut buffer, GuestAddress(RX_BUF))
            .expect("rx");
        assert_eq!(buffer, [0xee; 64], "not a byte written");
        assert_eq!(harness.device.stats().rx_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn frames_before_the_driver_runs_are_dropped_and_a_reset_stops_the_device() {
        let (mut harness, _) = harness(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        harness.device.reset();
        assert!(!harness.device.driver_ok());
        assert_eq!(
            harness.device.deliver(&harness.memory, &frame(b"x")),
            Delivery::Dropped
        );
    }

    #[test]
    fn a_malformed_transmit_chain_is_returned_and_counted() {
        let (mut harness, _) = harness(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        harness.transmit(&[0u8; 8]); // shorter than the header
        assert_eq!(harness.device.stats().tx_errors.load(Ordering::Relaxed), 1);
        assert_eq!(test_driver::used(&harness.memory, TX_QUEUE as u64, 0).0, 1);
        harness.host.set_nonblocking(true).expect("nonblocking");
        let mut buffer = [0u8; 64];
        assert!(harness.host.recv(&mut buffer).is_err(), "nothing sent");
    }

    #[test]
    fn nic_arguments_parse_with_clear_errors() {
        let nic: NicArg = "tap=ct1,mac=02:ca:00:00:00:07,ipv4=10.9.0.2"
            .parse()
            .expect("nic");
        assert_eq!(nic.tap, "ct1");
        assert_eq!(nic.mac, Some([2, 0xca, 0, 0, 0, 7]));
        assert_eq!(nic.ipv4, Some(std::net::Ipv4Addr::new(10, 9, 0, 2)));
        assert_eq!("tap=ct1".parse::<NicArg>().expect("nic").mac, None);
        let error = |text: &str| text.parse::<NicArg>().expect_err(text);
        assert!(error("mac=02:ca:00:00:00:07").contains("tap=NAME is required"));
        assert!(error("tap=a,mac=03:00:00:00:00:01").contains("multicast"));
        assert!(error("tap=a,ipv4=10.0.0").contains("not an IPv4 address"));
        assert!(error("tap=a,speed=10").contains("unknown key \"speed\""));
        assert!(error("tap").contains("not KEY=VALUE"));
        let mac = default_mac("web-1", 0);
        assert_eq!(&mac[..2], &[0x02, 0xca]);
        assert_ne!(mac, default_mac("web-1", 1));
        assert_eq!(mac, default_mac("web-1", 0));
    }

    #[test]
    fn macs_parse_and_format() {
        assert_eq!(
            parse_mac("02:ca:0a:ff:00:01"),
            Some([2, 0xca, 0x0a, 0xff, 0, 1])
        );
        assert_eq!(format_mac([2, 0xca, 0x0a, 0xff, 0, 1]), "02:ca:0a:ff:00:01");
        for bad in [
            "",
            "02:ca:0a:ff:00",
            "02:ca:0a:ff:00:01:02",
            "2:ca:0a:ff:00:01",
            "zz:ca:0a:ff:00:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
