//! Emulated devices: the 16550 serial console ([`serial`]), the built-in guest's port
//! interface ([`ports`]), the virtio-MMIO transport ([`virtio`]) with virtio-blk
//! ([`virtio_blk`]) on a [`block::BlockBackend`] (a file, or a node volume over NBD:
//! [`nbd_client`]) and virtio-net ([`virtio_net`]) on a
//! host tap.

pub mod block;
pub mod nbd_client;
pub mod ports;
pub mod serial;
pub mod virtio;
pub mod virtio_blk;
pub mod virtio_net;
