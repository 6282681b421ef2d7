//! A small NBD server (fixed newstyle handshake, simple replies) serving [`BlockDevice`]s
//! over TCP on loopback, so qemu-img, qemu-io and nbd-client can read and write volumes.
//!
//! Supported: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`,
//! `NBD_OPT_ABORT`; commands READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and DISC. Structured
//! replies and block status are not offered (clients fall back to simple replies).
//! Requests that are not aligned to the device's block size are read-modify-written here.
//!
//! NBD has no authentication, so the server only binds loopback addresses: the agent
//! exports a volume to a local consumer (qemu, a VMM), never to the network.

use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use crate::device::BlockDevice;
use crate::error::StorageError;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Largest READ or WRITE payload accepted, also advertised as the maximum block size.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
const MAX_OPTION: u32 = 64 << 10;

/// Errors of the NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The server refuses to listen beyond loopback: NBD has no authentication.
    #[error("refusing to serve nbd on non-loopback address {addr}; nbd has no authentication")]
    NotLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// A socket operation failed.
    #[error("nbd i/o error")]
    Io(#[from] io::Error),
    /// The client broke the protocol.
    #[error("nbd protocol error: {0}")]
    Protocol(String),
}

/// The set of named devices a server exports; can change while the server runs.
#[derive(Default)]
pub struct Exports {
    devices: RwLock<BTreeMap<String, Arc<dyn BlockDevice>>>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports")
            .field("names", &self.names())
            .finish()
    }
}

impl Exports {
    /// An empty set.
    pub fn new() -> Self {
        Exports::default()
    }

    /// Exports `device` as `name`, replacing any export of that name.
    pub fn insert(&self, name: impl Into<String>, device: Arc<dyn BlockDevice>) {
        self.devices
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), device);
    }

    /// Stops exporting `name` to new connections; returns whether it was exported.
    pub fn remove(&self, name: &str) -> bool {
        self.devices
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .is_some()
    }

    /// Exported names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The device for `name`; the empty name selects the only export if there is one.
    fn get(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() && devices.len() == 1 {
            return devices.values().next().cloned();
        }
        devices.get(name).cloned()
    }
}

/// A running NBD server. Dropping it stops accepting and closes open connections.
#[derive(Debug)]
pub struct NbdServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    accept_thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Binds `addr` (loopback only; port 0 picks a free port) and serves `exports` on a
    /// background thread, one thread per connection.
    pub fn start(addr: SocketAddr, exports: Arc<Exports>) -> Result<NbdServer, NbdError> {
        if !addr.ip().is_loopback() {
            return Err(NbdError::NotLoopback { addr });
        }
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accept_thread = {
            let stop = stop.clone();
            let connections = connections.clone();
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        if let Ok(clone) = stream.try_clone() {
                            connections
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(clone);
                        }
                        let exports = exports.clone();
                        let _ =
                            std::thread::Builder::new()
                                .name("nbd-conn".into())
                                .spawn(move || {
                                    // A client that misbehaves or disconnects only ends its own
                                    // connection; there is nobody to report to but the client.
                                    let _ = serve_connection(stream, &exports);
                                });
                    }
                })?
        };
        Ok(NbdServer {
            local_addr,
            stop,
            connections,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `nbd://ADDR/EXPORT`, the URI qemu tools accept.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.local_addr)
    }

    /// Stops accepting, closes every connection and joins the accept thread.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; failure means it is already gone.
        let _ = TcpStream::connect(self.local_addr);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for c in self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if self.accept_thread.is_some() {
            self.stop_now();
        }
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(w: &mut impl Write, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&option.to_be_bytes())?;
    w.write_all(&reply.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)
}

fn transmission_flags(dev: &dyn BlockDevice) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES;
    if dev.read_only() {
        flags |= TFLAG_READ_ONLY;
    }
    flags
}

fn serve_connection(stream: TcpStream, exports: &Exports) -> Result<(), NbdError> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(1 << 20, stream.try_clone()?);
    let mut writer = BufWriter::with_capacity(1 << 20, stream);
    writer.write_all(&NBDMAGIC.to_be_bytes())?;
    writer.write_all(&IHAVEOPT.to_be_bytes())?;
    writer.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    writer.flush()?;
    let client_flags = read_u32(&mut reader)?;
    if client_flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    let device = loop {
        if read_u64(&mut reader)? != IHAVEOPT {
            return Err(NbdError::Protocol("bad option magic".into()));
        }
        let option = read_u32(&mut reader)?;
        let len = read_u32(&mut reader)?;
        if len > MAX_OPTION {
            return Err(NbdError::Protocol(format!(
                "option of {len} bytes is too long"
            )));
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(dev) = exports.get(&name) else {
                    // This option has no error reply: the protocol says to close.
                    return Err(NbdError::Protocol(format!("unknown export `{name}`")));
                };
                let size = dev.size().map_err(|e| NbdError::Protocol(e.to_string()))?;
                writer.write_all(&size.to_be_bytes())?;
                writer.write_all(&transmission_flags(dev.as_ref()).to_be_bytes())?;
                if !no_zeroes {
                    writer.write_all(&[0u8; 124])?;
                }
                writer.flush()?;
                break dev;
            }
            OPT_GO | OPT_INFO => {
                let parsed = (|| {
                    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
                    let name = std::str::from_utf8(data.get(4..4 + name_len)?)
                        .ok()?
                        .to_owned();
                    let n =
                        u16::from_be_bytes(data.get(4 + name_len..6 + name_len)?.try_into().ok()?)
                            as usize;
                    (data.len() == 6 + name_len + 2 * n).then_some(name)
                })();
                let Some(name) = parsed else {
                    option_reply(
                        &mut writer,
                        option,
                        REP_ERR_INVALID,
                        b"malformed NBD_OPT_GO/INFO payload",
                    )?;
                    writer.flush()?;
                    continue;
                };
                let found = exports
                    .get(&name)
                    .and_then(|d| d.size().ok().map(|s| (d, s)));
                let Some((dev, size)) = found else {
                    option_reply(
                        &mut writer,
                        option,
                        REP_ERR_UNKNOWN,
                        format!("unknown export `{name}`").as_bytes(),
                    )?;
                    writer.flush()?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&transmission_flags(dev.as_ref()).to_be_bytes());
                option_reply(&mut writer, option, REP_INFO, &info)?;
                let mut block = Vec::with_capacity(14);
                block.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                block.extend_from_slice(&1u32.to_be_bytes());
                block.extend_from_slice(&dev.block_size().to_be_bytes());
                block.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(&mut writer, option, REP_INFO, &block)?;
                option_reply(&mut writer, option, REP_ACK, &[])?;
                writer.flush()?;
                if option == OPT_GO {
                    break dev;
                }
            }
            OPT_LIST => {
                for name in exports.names() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    option_reply(&mut writer, option, REP_SERVER, &d)?;
                }
                option_reply(&mut writer, option, REP_ACK, &[])?;
                writer.flush()?;
            }
            OPT_ABORT => {
                option_reply(&mut writer, option, REP_ACK, &[])?;
                writer.flush()?;
                return Ok(());
            }
            _ => {
                option_reply(&mut writer, option, REP_ERR_UNSUP, &[])?;
                writer.flush()?;
            }
        }
    };
    transmission(&mut reader, &mut writer, device.as_ref())
}

fn errno(e: &StorageError) -> u32 {
    match e {
        StorageError::NoSpace { .. } => ENOSPC,
        StorageError::ReadOnly { .. } => EPERM,
        StorageError::InvalidArgument { .. }
        | StorageError::Misaligned { .. }
        | StorageError::OutOfRange { .. } => EINVAL,
        _ => EIO,
    }
}

fn simple_reply(w: &mut impl Write, error: u32, handle: u64) -> io::Result<()> {
    w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&error.to_be_bytes())?;
    w.write_all(&handle.to_be_bytes())
}

/// The block-aligned range covering `[offset, offset + len)`.
fn aligned(offset: u64, len: u64, bs: u64) -> (u64, u64) {
    let start = offset - offset % bs;
    let end = (offset + len).div_ceil(bs) * bs;
    (start, end - start)
}

fn read_any(dev: &dyn BlockDevice, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
    let bs = u64::from(dev.block_size());
    let (start, len) = aligned(offset, buf.len() as u64, bs);
    if start == offset && len == buf.len() as u64 {
        return dev.read_at(offset, buf);
    }
    let mut tmp = vec![0u8; len as usize];
    dev.read_at(start, &mut tmp)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
    Ok(())
}

fn write_any(dev: &dyn BlockDevice, offset: u64, data: &[u8]) -> Result<(), StorageError> {
    let bs = u64::from(dev.block_size());
    let (start, len) = aligned(offset, data.len() as u64, bs);
    if start == offset && len == data.len() as u64 {
        return dev.write_at(offset, data);
    }
    let mut tmp = vec![0u8; len as usize];
    // Only the partial head and tail blocks need the old content.
    dev.read_at(start, &mut tmp[..bs as usize])?;
    if len > bs {
        let tail = (len - bs) as usize;
        dev.read_at(start + len - bs, &mut tmp[tail..])?;
    }
    let skip = (offset - start) as usize;
    tmp[skip..skip + data.len()].copy_from_slice(data);
    dev.write_at(start, &tmp)
}

fn zero_any(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<(), StorageError> {
    let bs = u64::from(dev.block_size());
    let inner_start = offset.div_ceil(bs) * bs;
    let inner_end = (offset + len) / bs * bs;
    if inner_start >= inner_end {
        return write_any(dev, offset, &vec![0u8; len as usize]);
    }
    if inner_start > offset {
        write_any(dev, offset, &vec![0u8; (inner_start - offset) as usize])?;
    }
    for chunk_start in (inner_start..inner_end).step_by(MAX_REQUEST as usize) {
        dev.write_zeroes(
            chunk_start,
            (inner_end - chunk_start).min(u64::from(MAX_REQUEST)),
        )?;
    }
    if offset + len > inner_end {
        write_any(
            dev,
            inner_end,
            &vec![0u8; (offset + len - inner_end) as usize],
        )?;
    }
    Ok(())
}

fn transmission(
    reader: &mut impl Read,
    writer: &mut impl Write,
    dev: &dyn BlockDevice,
) -> Result<(), NbdError> {
    let mut buf = Vec::new();
    loop {
        let magic = read_u32(reader)?;
        if magic != REQUEST_MAGIC {
            return Err(NbdError::Protocol(format!("bad request magic {magic:#x}")));
        }
        let _flags = read_u16(reader)?;
        let command = read_u16(reader)?;
        let handle = read_u64(reader)?;
        let offset = read_u64(reader)?;
        let len = read_u32(reader)?;
        let size = dev.size().unwrap_or(0);
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size);
        match command {
            CMD_READ => {
                if !in_range || len > MAX_REQUEST {
                    simple_reply(writer, EINVAL, handle)?;
                } else {
                    buf.resize(len as usize, 0);
                    match read_any(dev, offset, &mut buf) {
                        Ok(()) => {
                            simple_reply(writer, 0, handle)?;
                            writer.write_all(&buf)?;
                        }
                        Err(e) => simple_reply(writer, errno(&e), handle)?,
                    }
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    // Drain the payload so the stream stays in sync, then refuse.
                    io::copy(&mut reader.by_ref().take(u64::from(len)), &mut io::sink())?;
                    simple_reply(writer, EINVAL, handle)?;
                } else {
                    buf.resize(len as usize, 0);
                    reader.read_exact(&mut buf)?;
                    let error = if dev.read_only() {
                        EPERM
                    } else if !in_range {
                        ENOSPC
                    } else {
                        write_any(dev, offset, &buf).err().map_or(0, |e| errno(&e))
                    };
                    simple_reply(writer, error, handle)?;
                }
            }
            CMD_DISC => {
                writer.flush()?;
                return Ok(());
            }
            CMD_FLUSH => {
                let error = dev.flush().err().map_or(0, |e| errno(&e));
                simple_reply(writer, error, handle)?;
            }
            CMD_TRIM => {
                let error = if dev.read_only() {
                    EPERM
                } else if !in_range {
                    EINVAL
                } else {
                    // Trim is advisory: only whole blocks inside the range are discarded.
                    let bs = u64::from(dev.block_size());
                    let start = offset.div_ceil(bs) * bs;
                    let end = (offset + u64::from(len)) / bs * bs;
                    if start < end {
                        dev.trim(start, end - start).err().map_or(0, |e| errno(&e))
                    } else {
                        0
                    }
                };
                simple_reply(writer, error, handle)?;
            }
            CMD_WRITE_ZEROES => {
                let error = if dev.read_only() {
                    EPERM
                } else if !in_range {
                    ENOSPC
                } else {
                    zero_any(dev, offset, u64::from(len))
                        .err()
                        .map_or(0, |e| errno(&e))
                };
                simple_reply(writer, error, handle)?;
            }
            _ => simple_reply(writer, EINVAL, handle)?,
        }
        writer.flush()?;
    }
}
