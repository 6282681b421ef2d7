//! Emulated devices: the 16550 serial console ([`serial`]), the built-in guest's port
//! interface ([`ports`]), and virtio-blk over virtio-MMIO ([`virtio_blk`]) on a
//! [`block::BlockBackend`].

pub mod block;
pub mod ports;
pub mod serial;
pub mod virtio_blk;
