//! A small NBD server (fixed newstyle handshake) serving [`BlockDevice`]s to local
//! clients, so qemu-img, qemu-io, nbdinfo, nbdcopy and nbd-client can read and write
//! volumes.
//!
//! Supported: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`,
//! `NBD_OPT_ABORT`, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT` and
//! `NBD_OPT_SET_META_CONTEXT` (the one context `base:allocation`); commands READ, WRITE,
//! FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS and DISC. With structured replies a read is
//! answered by one data chunk and an error carries a message; block status reports the
//! device's holes ([`BlockDevice::allocation`]) as `NBD_STATE_HOLE | NBD_STATE_ZERO`, so
//! clients skip what a thin volume never allocated. Requests that are not aligned to the
//! device's block size are read-modify-written here.
//!
//! NBD has no authentication of its own, so a server listens only where the operating
//! system decides who may connect:
//! - [`NbdServer::start_unix`]: a unix socket with mode 0600 whose peers must also run as
//!   the server's user (or root), checked with `SO_PEERCRED`; the URI is
//!   `nbd+unix:///EXPORT?socket=PATH`. This is what the agent exports volumes on.
//! - [`NbdServer::start`]: TCP on a loopback address (any local user can connect; for
//!   tests and tools on single-user machines).
//!
//! Every connection is served by its own thread and closed when the client disconnects
//! (`NBD_CMD_DISC`, `NBD_OPT_ABORT` or a dropped socket); the server keeps a handle to
//! open connections only, so it can close them when it stops.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

use crate::device::{AllocationRun, BlockDevice};
use crate::error::StorageError;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
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
const TFLAG_SEND_DF: u16 = 1 << 7;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The metadata context this server offers, and the id it is given when selected.
const BASE_ALLOCATION: &str = "base:allocation";
const BASE_ALLOCATION_ID: u32 = 1;
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Largest READ or WRITE payload accepted, also advertised as the maximum block size.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
const MAX_OPTION: u32 = 64 << 10;
/// Options a refused client may send before the server hangs up on it.
const MAX_REFUSED_OPTIONS: u32 = 16;
/// Longest unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Errors of the NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The server refuses to listen on TCP beyond loopback: NBD has no authentication.
    #[error("refusing to serve nbd on non-loopback address {addr}; nbd has no authentication")]
    NotLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// A unix socket path that the kernel cannot bind.
    #[error(
        "nbd socket path {path} is {length} bytes long, at most {MAX_SOCKET_PATH} fit in a unix socket address; use a shorter directory"
    )]
    SocketPathTooLong {
        /// The path asked for.
        path: PathBuf,
        /// Its length in bytes.
        length: usize,
    },
    /// Something other than a stale socket is in the way of the socket path, or another
    /// server is listening there.
    #[error("cannot serve nbd on {path}: {reason}")]
    SocketInUse {
        /// The path asked for.
        path: PathBuf,
        /// What is there.
        reason: String,
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

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A loopback TCP address.
    Tcp(SocketAddr),
    /// A unix socket, owner-only.
    Unix(PathBuf),
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn try_clone(&self) -> io::Result<Listener> {
        Ok(match self {
            Listener::Tcp(l) => Listener::Tcp(l.try_clone()?),
            Listener::Unix(l) => Listener::Unix(l.try_clone()?),
        })
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        })
    }

    /// Wakes a thread blocked in `accept` on this socket (it returns an error).
    fn wake(&self) {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        };
        // SAFETY: `fd` is an open socket owned by `self` for the whole call; shutdown
        // takes no memory. On Linux, shutting down a listening socket makes a blocked
        // accept return EINVAL; an error here means there is nothing to wake.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }
}

/// One client connection, TCP or unix.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        // Failure means the peer is already gone.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Why this peer may not use the exports, if it may not: on a unix socket the peer
    /// must run as the server's user or as root.
    fn refusal(&self) -> Option<String> {
        let Stream::Unix(s) = self else {
            return None;
        };
        let mut credentials = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: the descriptor is an open unix socket owned by `s`; `credentials` and
        // `length` are live, writable and sized for SO_PEERCRED's `struct ucred`.
        let result = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut credentials).cast(),
                &mut length,
            )
        };
        if result != 0 {
            return Some("the peer's credentials cannot be read".into());
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let owner = unsafe { libc::geteuid() };
        if credentials.uid == owner || credentials.uid == 0 {
            return None;
        }
        Some(format!(
            "permission denied: this export is for uid {owner} only, the client runs as uid {}",
            credentials.uid
        ))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Open connections, so the server can close them when it stops. A connection removes
/// itself when it ends, which drops the last descriptor of its socket.
#[derive(Debug, Default)]
struct Connections {
    open: Mutex<(u64, HashMap<u64, Stream>)>,
}

impl Connections {
    fn add(&self, stream: Stream) -> u64 {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 += 1;
        let id = open.0;
        open.1.insert(id, stream);
        id
    }

    fn remove(&self, id: u64) {
        let removed = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .remove(&id);
        drop(removed);
    }

    fn count(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).1.len()
    }

    fn close_all(&self) {
        let streams: Vec<Stream> = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .drain()
            .map(|(_, stream)| stream)
            .collect();
        for stream in streams {
            stream.shutdown();
        }
    }
}

/// Removes a connection from [`Connections`] when its thread ends, however it ends.
struct Registered {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.remove(self.id);
    }
}

/// A running NBD server. Dropping it stops accepting, closes open connections and (for a
/// unix socket) removes the socket file.
#[derive(Debug)]
pub struct NbdServer {
    endpoint: Endpoint,
    /// The socket file's device and inode, so only our own socket is removed.
    socket_identity: Option<(u64, u64)>,
    stop: Arc<AtomicBool>,
    waker: Listener,
    connections: Arc<Connections>,
    accept_thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Binds `addr` (loopback only; port 0 picks a free port) and serves `exports` on a
    /// background thread, one thread per connection. Any local user can connect.
    pub fn start(addr: SocketAddr, exports: Arc<Exports>) -> Result<NbdServer, NbdError> {
        if !addr.ip().is_loopback() {
            return Err(NbdError::NotLoopback { addr });
        }
        let listener = TcpListener::bind(addr)?;
        let endpoint = Endpoint::Tcp(listener.local_addr()?);
        Self::serve(Listener::Tcp(listener), endpoint, None, exports)
    }

    /// Binds a unix socket at `path` with mode 0600 and serves `exports` to clients that
    /// run as this process's user (or as root); others get `NBD_REP_ERR_POLICY`. A stale
    /// socket at `path` (nobody listening) is replaced. Put the socket in a directory only
    /// its owner can enter, so there is no moment at which others could connect.
    pub fn start_unix(path: &Path, exports: Arc<Exports>) -> Result<NbdServer, NbdError> {
        let length = path.as_os_str().len();
        if length > MAX_SOCKET_PATH {
            return Err(NbdError::SocketPathTooLong {
                path: path.to_owned(),
                length,
            });
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(NbdError::SocketInUse {
                        path: path.to_owned(),
                        reason: "another server is listening there".into(),
                    });
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(NbdError::SocketInUse {
                    path: path.to_owned(),
                    reason: "a file that is not a socket is in the way".into(),
                });
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error.into()),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let meta = std::fs::symlink_metadata(path)?;
        Self::serve(
            Listener::Unix(listener),
            Endpoint::Unix(path.to_owned()),
            Some((meta.dev(), meta.ino())),
            exports,
        )
    }

    fn serve(
        listener: Listener,
        endpoint: Endpoint,
        socket_identity: Option<(u64, u64)>,
        exports: Arc<Exports>,
    ) -> Result<NbdServer, NbdError> {
        let waker = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Connections> = Arc::default();
        let accept_thread = {
            let stop = stop.clone();
            let connections = connections.clone();
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&listener, &stop, &connections, &exports))?
        };
        Ok(NbdServer {
            endpoint,
            socket_identity,
            stop,
            waker,
            connections,
            accept_thread: Some(accept_thread),
        })
    }

    /// Where the server listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The TCP address the server listens on, if it listens on TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.endpoint {
            Endpoint::Tcp(addr) => Some(*addr),
            Endpoint::Unix(_) => None,
        }
    }

    /// The unix socket the server listens on, if it listens on one.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Tcp(_) => None,
            Endpoint::Unix(path) => Some(path),
        }
    }

    /// The URI qemu tools and libnbd accept: `nbd://ADDR/EXPORT` or
    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn uri(&self, export: &str) -> String {
        match &self.endpoint {
            Endpoint::Tcp(addr) => format!("nbd://{addr}/{}", percent_encode(export)),
            Endpoint::Unix(path) => format!(
                "nbd+unix:///{}?socket={}",
                percent_encode(export),
                percent_encode(&path.to_string_lossy())
            ),
        }
    }

    /// Connections open right now (each served by one thread). A connection counts until
    /// its socket is closed.
    pub fn live_connections(&self) -> usize {
        self.connections.count()
    }

    /// Stops accepting, closes every connection, joins the accept thread and removes the
    /// socket file of a unix server.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        // Every connection was registered before the accept thread ended.
        self.connections.close_all();
        if let (Endpoint::Unix(path), Some((dev, ino))) = (&self.endpoint, self.socket_identity)
            && std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        {
            let _ = std::fs::remove_file(path);
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

fn accept_loop(
    listener: &Listener,
    stop: &AtomicBool,
    connections: &Arc<Connections>,
    exports: &Arc<Exports>,
) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok(stream) => stream,
            Err(_) => {
                // Out of descriptors or an aborted handshake: do not spin on it.
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let registered = Registered {
            connections: connections.clone(),
            id: connections.add(handle),
        };
        let exports = exports.clone();
        // If the thread cannot be spawned, the closure (and with it the stream and the
        // registration) is dropped, which closes the connection.
        let _ = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let _registered = registered;
                let refusal = stream.refusal();
                // A client that misbehaves or disconnects only ends its own connection;
                // there is nobody to report to but the client.
                let _ = serve_connection(&stream, &exports, refusal.as_deref());
                stream.shutdown();
            });
    }
}

/// Percent-encodes everything but unreserved characters and `/` (for URI paths and the
/// `socket=` query parameter).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
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

fn transmission_flags(dev: &dyn BlockDevice, structured: bool) -> u16 {
    // Every write is durable when acknowledged and nothing is cached per connection, so
    // several connections to one export see each other's writes (multi-conn is safe).
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN;
    if dev.read_only() {
        flags |= TFLAG_READ_ONLY;
    }
    if structured {
        // A read is always answered by a single chunk, so "do not fragment" holds.
        flags |= TFLAG_SEND_DF;
    }
    flags
}

/// A cursor over an option's payload; every getter returns `None` past the end.
struct Payload<'a> {
    data: &'a [u8],
}

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let length = self.u32()? as usize;
        Some(std::str::from_utf8(self.take(length)?).ok()?.to_owned())
    }
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// `NBD_OPT_GO` / `NBD_OPT_INFO`: an export name and a list of info requests (which are
/// answered the same whatever they ask).
fn parse_go(data: &[u8]) -> Option<String> {
    let mut payload = Payload { data };
    let name = payload.string()?;
    let n_requests = payload.u16()?;
    payload.take(2 * usize::from(n_requests))?;
    payload.is_empty().then_some(name)
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: an export name and queries.
fn parse_meta_context(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut payload = Payload { data };
    let name = payload.string()?;
    let n_queries = payload.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n_queries {
        queries.push(payload.string()?);
    }
    payload.is_empty().then_some((name, queries))
}

/// What the handshake settled for the transmission phase.
#[derive(Debug, Default)]
struct Session {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    structured: bool,
    /// `base:allocation` is selected (for the export that was finally chosen).
    base_allocation: bool,
}

fn serve_connection(
    stream: &Stream,
    exports: &Exports,
    refusal: Option<&str>,
) -> Result<(), NbdError> {
    if let Stream::Tcp(s) = stream {
        s.set_nodelay(true)?;
    }
    let mut reader = BufReader::with_capacity(1 << 20, stream.try_clone()?);
    let mut writer = BufWriter::with_capacity(1 << 20, stream.try_clone()?);
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
    let mut structured = false;
    // The export `base:allocation` was selected for by the last SET_META_CONTEXT.
    let mut meta_export: Option<String> = None;
    let mut refused_options = 0;
    let (device, export_name) = loop {
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
        if let Some(reason) = refusal {
            match option {
                OPT_ABORT => {
                    option_reply(&mut writer, option, REP_ACK, &[])?;
                    writer.flush()?;
                    return Ok(());
                }
                // This option has no error reply: the protocol says to close.
                OPT_EXPORT_NAME => return Err(NbdError::Protocol(reason.to_owned())),
                _ => {
                    refused_options += 1;
                    if refused_options > MAX_REFUSED_OPTIONS {
                        return Err(NbdError::Protocol(reason.to_owned()));
                    }
                    option_reply(&mut writer, option, REP_ERR_POLICY, reason.as_bytes())?;
                    writer.flush()?;
                    continue;
                }
            }
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(dev) = exports.get(&name) else {
                    // This option has no error reply: the protocol says to close.
                    return Err(NbdError::Protocol(format!("unknown export `{name}`")));
                };
                let size = dev.size().map_err(|e| NbdError::Protocol(e.to_string()))?;
                writer.write_all(&size.to_be_bytes())?;
                writer.write_all(&transmission_flags(dev.as_ref(), structured).to_be_bytes())?;
                if !no_zeroes {
                    writer.write_all(&[0u8; 124])?;
                }
                writer.flush()?;
                break (dev, name);
            }
            OPT_GO | OPT_INFO => {
                let Some(name) = parse_go(&data) else {
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
                info.extend_from_slice(&transmission_flags(dev.as_ref(), structured).to_be_bytes());
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
                    break (dev, name);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    option_reply(&mut writer, option, REP_ACK, &[])?;
                } else {
                    option_reply(
                        &mut writer,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY carries no data",
                    )?;
                }
                writer.flush()?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // Replaces the previous selection, also when it fails.
                    meta_export = None;
                }
                let parsed = parse_meta_context(&data);
                let (reply, message) = match &parsed {
                    _ if !structured => (
                        REP_ERR_INVALID,
                        "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts".into(),
                    ),
                    None => (
                        REP_ERR_INVALID,
                        "malformed NBD_OPT_LIST/SET_META_CONTEXT payload".into(),
                    ),
                    Some((name, _)) if exports.get(name).is_none() => {
                        (REP_ERR_UNKNOWN, format!("unknown export `{name}`"))
                    }
                    Some(_) => (REP_ACK, String::new()),
                };
                if reply != REP_ACK {
                    option_reply(&mut writer, option, reply, message.as_bytes())?;
                    writer.flush()?;
                    continue;
                }
                let Some((name, queries)) = parsed else {
                    continue;
                };
                // LIST with no query, or with the `base:` namespace, lists everything;
                // SET selects only what it names exactly.
                let matches = |query: &str| query == BASE_ALLOCATION || (!set && query == "base:");
                let selected = if queries.is_empty() {
                    !set
                } else {
                    queries.iter().any(|query| matches(query))
                };
                if selected {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut context = id.to_be_bytes().to_vec();
                    context.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(&mut writer, option, REP_META_CONTEXT, &context)?;
                    if set {
                        meta_export = Some(name);
                    }
                }
                option_reply(&mut writer, option, REP_ACK, &[])?;
                writer.flush()?;
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
    let session = Session {
        structured,
        base_allocation: structured && meta_export.as_deref() == Some(export_name.as_str()),
    };
    transmission(&mut reader, &mut writer, device.as_ref(), &session)
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

fn write_any(dev: &dyn BlockDevice, offset: u64, data: Vec<u8>) -> Result<(), StorageError> {
    let bs = u64::from(dev.block_size());
    let (start, len) = aligned(offset, data.len() as u64, bs);
    if start == offset && len == data.len() as u64 {
        return dev.write_owned(offset, data);
    }
    let mut tmp = vec![0u8; len as usize];
    // Only the partial head and tail blocks need the old content.
    dev.read_at(start, &mut tmp[..bs as usize])?;
    if len > bs {
        let tail = (len - bs) as usize;
        dev.read_at(start + len - bs, &mut tmp[tail..])?;
    }
    let skip = (offset - start) as usize;
    tmp[skip..skip + data.len()].copy_from_slice(&data);
    dev.write_owned(start, tmp)
}

fn zero_any(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<(), StorageError> {
    let bs = u64::from(dev.block_size());
    let inner_start = offset.div_ceil(bs) * bs;
    let inner_end = (offset + len) / bs * bs;
    if inner_start >= inner_end {
        return write_any(dev, offset, vec![0u8; len as usize]);
    }
    if inner_start > offset {
        write_any(dev, offset, vec![0u8; (inner_start - offset) as usize])?;
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
            vec![0u8; (offset + len - inner_end) as usize],
        )?;
    }
    Ok(())
}

/// Starts a structured reply chunk.
fn chunk_header(
    w: &mut impl Write,
    flags: u16,
    kind: u16,
    handle: u64,
    length: usize,
) -> io::Result<()> {
    w.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&flags.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&handle.to_be_bytes())?;
    w.write_all(&(length as u32).to_be_bytes())
}

/// Answers a failed request: a structured error chunk with `message` when structured
/// replies are on (the client can show the reason), a simple reply otherwise.
fn error_reply(
    w: &mut impl Write,
    session: &Session,
    handle: u64,
    error: u32,
    message: &str,
) -> io::Result<()> {
    if !session.structured {
        return simple_reply(w, error, handle);
    }
    // Error strings are capped at 4096 bytes by the protocol; cut at a char boundary.
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message[..end];
    chunk_header(
        w,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + message.len(),
    )?;
    w.write_all(&error.to_be_bytes())?;
    w.write_all(&(message.len() as u16).to_be_bytes())?;
    w.write_all(message.as_bytes())
}

/// Answers a request whose result is only an error code (0 for success).
fn status_reply(
    w: &mut impl Write,
    session: &Session,
    handle: u64,
    result: Result<(), (u32, String)>,
) -> io::Result<()> {
    match result {
        Ok(()) => simple_reply(w, 0, handle),
        Err((error, message)) => error_reply(w, session, handle, error, &message),
    }
}

fn storage_failure(error: StorageError) -> (u32, String) {
    (errno(&error), error.to_string())
}

/// The `base:allocation` descriptors for a block-status request: at most one when the
/// client set `NBD_CMD_FLAG_REQ_ONE`, never past the requested range.
fn block_status_payload(runs: &[AllocationRun], length: u32, req_one: bool) -> Option<Vec<u8>> {
    let mut payload = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    let mut left = u64::from(length);
    for run in runs {
        let run_length = run.length.min(left);
        if run_length == 0 {
            break;
        }
        let state = if run.allocated {
            0
        } else {
            STATE_HOLE | STATE_ZERO
        };
        payload.extend_from_slice(&(run_length as u32).to_be_bytes());
        payload.extend_from_slice(&state.to_be_bytes());
        left -= run_length;
        if req_one {
            break;
        }
    }
    (payload.len() > 4).then_some(payload)
}

/// Requests of one connection served at the same time (each by its own worker thread);
/// the reader stops reading while that many are in flight.
const QUEUE_DEPTH: usize = 16;

/// One request of the transmission phase, as read from the socket.
struct Request {
    ticket: u64,
    flags: u16,
    command: u16,
    handle: u64,
    offset: u64,
    len: u32,
    /// A write's payload, or why it was refused while it was read.
    payload: Result<Vec<u8>, (u32, String)>,
}

/// What a request does to the device, for ordering.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// Reads `[start, end)` (read, block status).
    Read(u64, u64),
    /// Changes `[start, end)` (write, trim, write zeroes).
    Change(u64, u64),
    /// Waits for every earlier change (flush).
    Barrier,
    /// Touches nothing.
    None,
}

impl Access {
    fn of(command: u16, offset: u64, len: u32) -> Access {
        let end = offset.saturating_add(u64::from(len));
        match command {
            CMD_READ | CMD_BLOCK_STATUS => Access::Read(offset, end),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => Access::Change(offset, end),
            CMD_FLUSH => Access::Barrier,
            _ => Access::None,
        }
    }

    /// Whether `self`, received later, must wait for `earlier` to finish: overlapping
    /// requests of which one changes the range keep their order, and a flush waits for
    /// every change received before it.
    fn waits_for(self, earlier: Access) -> bool {
        let overlap = |a: u64, b: u64, c: u64, d: u64| a < d && c < b;
        match (self, earlier) {
            (Access::Barrier, Access::Change(..)) => true,
            (Access::Change(a, b), Access::Change(c, d) | Access::Read(c, d))
            | (Access::Read(a, b), Access::Change(c, d)) => overlap(a, b, c, d),
            _ => false,
        }
    }
}

/// The requests of one connection in flight, by ticket (the order they were received).
#[derive(Default)]
struct InFlight {
    requests: Mutex<BTreeMap<u64, Access>>,
    finished: std::sync::Condvar,
}

impl InFlight {
    fn admit(&self, ticket: u64, access: Access) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ticket, access);
    }

    /// Waits until no request received before `ticket` that it must follow is in flight.
    fn wait_turn(&self, ticket: u64, access: Access) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        while requests
            .range(..ticket)
            .any(|(_, earlier)| access.waits_for(*earlier))
        {
            requests = self
                .finished
                .wait(requests)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn done(&self, ticket: u64) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ticket);
        self.finished.notify_all();
    }
}

/// Hands requests from a connection's reader to its workers, the most recently idle
/// worker first. With one request at a time the same worker serves every request, so
/// the same thread submits every write to the store: io_uring keeps its async workers
/// per submitting thread, and a write from a thread whose workers went cold (or were
/// never created) waits for them to be woken or spawned. A shared queue handed each
/// request to the worker that had waited longest, rotating over all of them.
struct Handoff {
    state: Mutex<HandoffState>,
    /// One per worker: woken when a request is put in its slot, or at the end.
    wake: Vec<std::sync::Condvar>,
    /// Woken when a queued request is taken (the reader waits for room).
    room: std::sync::Condvar,
}

#[derive(Default)]
struct HandoffState {
    /// Idle workers, the most recent last.
    idle: Vec<usize>,
    /// A request given to a worker that was idle.
    slots: Vec<Option<Request>>,
    /// Requests waiting for a worker (every worker was busy).
    queue: std::collections::VecDeque<Request>,
    /// The reader is done: workers finish what is there, then end.
    closed: bool,
    /// Workers still running.
    live: usize,
}

impl Handoff {
    fn new(workers: usize) -> Handoff {
        Handoff {
            state: Mutex::new(HandoffState {
                slots: (0..workers).map(|_| None).collect(),
                live: workers,
                ..HandoffState::default()
            }),
            wake: (0..workers).map(|_| std::sync::Condvar::new()).collect(),
            room: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HandoffState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `request` to the most recently idle worker, or queues it (waiting while
    /// [`QUEUE_DEPTH`] are queued). `Err` gives it back when every worker has ended.
    fn give(&self, request: Request) -> Result<(), Request> {
        let mut state = self.lock();
        while state.live > 0 && state.idle.is_empty() && state.queue.len() >= QUEUE_DEPTH {
            state = self.room.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.live == 0 {
            return Err(request);
        }
        match state.idle.pop() {
            Some(worker) => {
                state.slots[worker] = Some(request);
                self.wake[worker].notify_one();
            }
            None => state.queue.push_back(request),
        }
        Ok(())
    }

    /// The next request for `worker`; `None` once the reader is done and nothing is left.
    fn take(&self, worker: usize) -> Option<Request> {
        let mut state = self.lock();
        loop {
            if let Some(request) = state.slots[worker].take() {
                return Some(request);
            }
            if let Some(request) = state.queue.pop_front() {
                state.idle.retain(|&idle| idle != worker);
                self.room.notify_one();
                return Some(request);
            }
            if state.closed {
                state.idle.retain(|&idle| idle != worker);
                return None;
            }
            if !state.idle.contains(&worker) {
                state.idle.push(worker);
            }
            state = self.wake[worker]
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        for wake in &self.wake {
            wake.notify_all();
        }
    }

    /// A worker ends (its client stopped reading replies).
    fn leave(&self, worker: usize) {
        let mut state = self.lock();
        state.live -= 1;
        state.idle.retain(|&idle| idle != worker);
        self.room.notify_all();
    }
}

/// The transmission phase. Requests are read in order and served by up to
/// [`QUEUE_DEPTH`] workers at once, replies sent as each finishes (NBD matches them by
/// handle). Overlapping requests of which one changes the range are served in the
/// order they were received, and a flush only after every change received before it
/// finished (its reply then covers them all; every write is durable when acknowledged
/// anyway, so FUA needs nothing more). Requests go to the most recently idle worker
/// ([`Handoff`]).
fn transmission<W: Write + Send>(
    reader: &mut impl Read,
    writer: W,
    dev: &dyn BlockDevice,
    session: &Session,
) -> Result<(), NbdError> {
    let writer = Mutex::new(writer);
    let in_flight = InFlight::default();
    let handoff = Handoff::new(QUEUE_DEPTH);
    std::thread::scope(|scope| {
        for worker in 0..QUEUE_DEPTH {
            let (writer, in_flight, handoff) = (&writer, &in_flight, &handoff);
            let spawned = std::thread::Builder::new()
                .name("nbd-io".into())
                .spawn_scoped(scope, move || {
                    while let Some(mut request) = handoff.take(worker) {
                        let access = Access::of(request.command, request.offset, request.len);
                        in_flight.wait_turn(request.ticket, access);
                        let mut reply = Vec::new();
                        let served = serve_request(dev, session, &mut request, &mut reply);
                        let sent = served.and_then(|()| {
                            let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
                            writer.write_all(&reply)?;
                            writer.flush()
                        });
                        in_flight.done(request.ticket);
                        if sent.is_err() {
                            // The client is gone; the reader sees it too.
                            break;
                        }
                    }
                    handoff.leave(worker);
                });
            if let Err(error) = spawned {
                handoff.close();
                return Err(NbdError::Io(error));
            }
        }
        let result = read_requests(reader, &handoff, &in_flight);
        // Workers finish what was received, then see the end.
        handoff.close();
        result
    })
}

/// Reads requests until `NBD_CMD_DISC`, an error or the end of the stream, handing each
/// to the workers.
fn read_requests(
    reader: &mut impl Read,
    handoff: &Handoff,
    in_flight: &InFlight,
) -> Result<(), NbdError> {
    let mut ticket = 0u64;
    loop {
        let magic = read_u32(reader)?;
        if magic != REQUEST_MAGIC {
            return Err(NbdError::Protocol(format!("bad request magic {magic:#x}")));
        }
        let flags = read_u16(reader)?;
        let command = read_u16(reader)?;
        let handle = read_u64(reader)?;
        let offset = read_u64(reader)?;
        let len = read_u32(reader)?;
        if command == CMD_DISC {
            // The caller closes the socket once the requests in flight are answered.
            return Ok(());
        }
        let payload = if command != CMD_WRITE {
            Ok(Vec::new())
        } else if len > MAX_REQUEST {
            // Drain the payload so the stream stays in sync, then refuse.
            io::copy(&mut reader.by_ref().take(u64::from(len)), &mut io::sink())?;
            Err((
                EINVAL,
                format!("write of {len} bytes is larger than the {MAX_REQUEST} allowed"),
            ))
        } else {
            // Read into spare capacity, not a zeroed buffer: this buffer is the one the
            // device gets (`write_owned`), so a write's bytes are copied once, out of the
            // socket.
            let mut data = Vec::with_capacity(len as usize);
            reader
                .by_ref()
                .take(u64::from(len))
                .read_to_end(&mut data)?;
            if data.len() != len as usize {
                return Err(NbdError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the connection closed after {} of a write's {len} bytes",
                        data.len()
                    ),
                )));
            }
            Ok(data)
        };
        ticket += 1;
        in_flight.admit(ticket, Access::of(command, offset, len));
        let request = Request {
            ticket,
            flags,
            command,
            handle,
            offset,
            len,
            payload,
        };
        if handoff.give(request).is_err() {
            // Every worker ended: the client stopped reading replies.
            in_flight.done(ticket);
            return Err(NbdError::Protocol("the connection's workers ended".into()));
        }
    }
}

/// Serves one request, writing its reply into `writer`.
fn serve_request(
    dev: &dyn BlockDevice,
    session: &Session,
    request: &mut Request,
    writer: &mut Vec<u8>,
) -> io::Result<()> {
    let Request {
        flags,
        command,
        handle,
        offset,
        len,
        ..
    } = *request;
    let size = dev.size().unwrap_or(0);
    let in_range = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= size);
    let out_of_range = || {
        (
            EINVAL,
            format!("offset {offset} + length {len} is past the end of the export ({size} bytes)"),
        )
    };
    let read_only = || (EPERM, "the export is read-only".to_owned());
    match command {
        CMD_READ => {
            let mut buf = Vec::new();
            let checked = if len > MAX_REQUEST {
                Err((
                    EINVAL,
                    format!("read of {len} bytes is larger than the {MAX_REQUEST} allowed"),
                ))
            } else if !in_range {
                Err(out_of_range())
            } else {
                buf.resize(len as usize, 0);
                read_any(dev, offset, &mut buf).map_err(storage_failure)
            };
            match checked {
                Ok(()) if session.structured => {
                    chunk_header(
                        writer,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        handle,
                        8 + buf.len(),
                    )?;
                    writer.write_all(&offset.to_be_bytes())?;
                    writer.write_all(&buf)?;
                }
                Ok(()) => {
                    simple_reply(writer, 0, handle)?;
                    writer.write_all(&buf)?;
                }
                Err((error, message)) => {
                    error_reply(writer, session, handle, error, &message)?;
                }
            }
        }
        CMD_WRITE => {
            // The payload goes to the device as it is (`write_owned`), not copied.
            let payload = std::mem::replace(&mut request.payload, Ok(Vec::new()));
            let result = match payload {
                Err(refusal) => Err(refusal),
                Ok(_) if dev.read_only() => Err(read_only()),
                Ok(_) if !in_range => {
                    let (_, message) = out_of_range();
                    Err((ENOSPC, message))
                }
                Ok(data) => write_any(dev, offset, data).map_err(storage_failure),
            };
            status_reply(writer, session, handle, result)?;
        }
        CMD_FLUSH => {
            let result = dev.flush().map_err(storage_failure);
            status_reply(writer, session, handle, result)?;
        }
        CMD_TRIM => {
            let result = if dev.read_only() {
                Err(read_only())
            } else if !in_range {
                Err(out_of_range())
            } else {
                // Trim is advisory: only whole blocks inside the range are discarded.
                let bs = u64::from(dev.block_size());
                let start = offset.div_ceil(bs) * bs;
                let end = (offset + u64::from(len)) / bs * bs;
                if start < end {
                    dev.trim(start, end - start).map_err(storage_failure)
                } else {
                    Ok(())
                }
            };
            status_reply(writer, session, handle, result)?;
        }
        CMD_WRITE_ZEROES => {
            let result = if dev.read_only() {
                Err(read_only())
            } else if !in_range {
                let (_, message) = out_of_range();
                Err((ENOSPC, message))
            } else {
                zero_any(dev, offset, u64::from(len)).map_err(storage_failure)
            };
            status_reply(writer, session, handle, result)?;
        }
        CMD_BLOCK_STATUS => {
            let runs = if !session.base_allocation {
                Err((
                    EINVAL,
                    "select the base:allocation metadata context before asking for block status"
                        .to_owned(),
                ))
            } else if len == 0 || !in_range {
                Err(out_of_range())
            } else {
                dev.allocation(offset, u64::from(len))
                    .map_err(storage_failure)
            };
            let payload = runs.and_then(|runs| {
                block_status_payload(&runs, len, flags & CMD_FLAG_REQ_ONE != 0).ok_or((
                    EIO,
                    format!("the device reported no allocation at offset {offset}"),
                ))
            });
            match payload {
                Ok(payload) => {
                    chunk_header(
                        writer,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_BLOCK_STATUS,
                        handle,
                        payload.len(),
                    )?;
                    writer.write_all(&payload)?;
                }
                Err((error, message)) => {
                    error_reply(writer, session, handle, error, &message)?;
                }
            }
        }
        _ => error_reply(
            writer,
            session,
            handle,
            EINVAL,
            &format!("unsupported command {command}"),
        )?,
    }
    Ok(())
}
