//! [`NbdBackend`]: a [`BlockBackend`] on an NBD export served on a unix socket — how a
//! VM's disk reaches a volume of the node's volume engine.
//!
//! The node serves each volume of a VM on its own owner-only unix socket (see
//! `node-runtime/src/exports.rs`); every write that arrives there goes through the
//! node's replicated write path and is acknowledged only once every copy holds it, so
//! a completed virtio-blk write is durable on every copy.
//!
//! Protocol: fixed newstyle handshake, `NBD_OPT_GO` with the export name, simple
//! replies (the VMM never needs structured ones: it reads whole ranges and asks for no
//! block status). `NBD_CMD_READ`, `WRITE` (with `FUA` when the export offers it),
//! `FLUSH`, `DISC`.
//!
//! Queue depth: the server handles one request at a time per connection, so when the
//! export allows several connections (`NBD_FLAG_CAN_MULTI_CONN`: nothing is cached per
//! connection) the backend opens [`CONNECTIONS`] of them and each request takes an idle
//! one; vCPU threads (and callers driving the backend from several threads) then have
//! that many requests in flight.
//!
//! Reconnecting: a connection that fails is reopened and the request sent again (block
//! reads and writes are idempotent): at once, then with a backoff from 10 ms doubling
//! to 1 s, for up to [`RECONNECT_FOR`] (the volume's freeze bound, 30 s). Meanwhile
//! the request, and the guest's I/O behind it, waits. This is what carries a VM
//! through a restart of its node agent (an upgrade, or a crash): the old agent's
//! server goes away with the request in flight, the new agent serves the disk again on
//! the same socket path, and the write is sent again there, neither lost nor failed.
//! Only after the bound is the request failed. A VM whose fence deadline lapses
//! ([`NbdBackend::with_fence`]) stops retrying at once: a fenced VM must not write.
//!
//! Socket buffers: each connection asks for [`SOCKET_BUFFER`] bytes of send and receive
//! buffer (`SO_SNDBUFFORCE`, which root may set beyond `net.core.wmem_max`, else
//! `SO_SNDBUF` up to that limit). With the kernel's default (`wmem_default`, 208 KiB
//! here) a 1 MiB write crosses the socket in five pieces, each a wake-up of the node's
//! reader; with the larger buffer the request's header and payload go in one `writev`.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::block::BlockBackend;
use crate::fence::Fence;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

/// Connections opened to an export that allows several.
pub const CONNECTIONS: usize = 4;
/// Largest request sent (larger reads and writes are split).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Send and receive buffer each connection asks for: room for a whole 1 MiB request
/// and more (the kernel counts its bookkeeping in it too).
pub const SOCKET_BUFFER: usize = 4 << 20;
/// A server that does not answer a request in this long fails it (the node's write
/// path waits for every replica, which gives up on an unreachable peer sooner).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request keeps reconnecting to a server that went away (the volume's
/// freeze bound: a node agent restarting within it loses no I/O).
pub const RECONNECT_FOR: Duration = Duration::from_secs(30);
/// The first wait between reconnection attempts (after an immediate one); doubles.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// The longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest option reply the handshake accepts.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// What the server said about the export in the handshake.
#[derive(Debug, Clone, Copy)]
struct ExportInfo {
    size: u64,
    flags: u16,
}

/// A [`BlockBackend`] on an NBD export on a unix socket.
#[derive(Debug)]
pub struct NbdBackend {
    socket: PathBuf,
    export: String,
    size: u64,
    flags: u16,
    read_only: bool,
    connections: Vec<Mutex<Option<UnixStream>>>,
    next: AtomicUsize,
    cookie: AtomicU64,
    /// How long a request keeps reconnecting ([`RECONNECT_FOR`]).
    reconnect_for: Duration,
    /// The VM's fence: once it lapsed, no request is sent again.
    fence: Option<Arc<Fence>>,
    /// Requests that had to be sent again on a new connection.
    resent: AtomicU64,
    /// Socket buffer each connection asks for (0: the kernel's default).
    socket_buffer: usize,
}

fn protocol(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn read_u16(stream: &mut UnixStream) -> io::Result<u16> {
    let mut bytes = [0u8; 2];
    stream.read_exact(&mut bytes)?;
    Ok(u16::from_be_bytes(bytes))
}

fn read_u32(stream: &mut UnixStream) -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

fn read_u64(stream: &mut UnixStream) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes)?;
    Ok(u64::from_be_bytes(bytes))
}

/// Sets one socket buffer option: `force` (root, beyond the sysctl limit), else
/// `plain` (capped at the limit by the kernel).
fn set_buffer(stream: &UnixStream, force: libc::c_int, plain: libc::c_int, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [force, plain] {
        // SAFETY: the descriptor is an open socket owned by `stream` for the whole call;
        // `value` is a live c_int and the length given is its size.
        let result = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result == 0 {
            return;
        }
    }
    // Neither took: the connection works with the kernel's default, only slower.
}

/// Connects and negotiates `export` with `NBD_OPT_GO`; the stream is then in the
/// transmission phase. `socket_buffer` (0: the default) sizes its buffers.
fn handshake(
    socket: &Path,
    export: &str,
    socket_buffer: usize,
) -> io::Result<(UnixStream, ExportInfo)> {
    let mut stream = UnixStream::connect(socket)?;
    if socket_buffer > 0 {
        set_buffer(
            &stream,
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            socket_buffer,
        );
        set_buffer(
            &stream,
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            socket_buffer,
        );
    }
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    if read_u64(&mut stream)? != NBDMAGIC || read_u64(&mut stream)? != IHAVEOPT {
        return Err(protocol("not a newstyle NBD server (bad greeting magic)"));
    }
    let server_flags = read_u16(&mut stream)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("the NBD server does not speak fixed newstyle"));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
    let name = export.as_bytes();
    let mut option = Vec::with_capacity(32 + name.len());
    option.extend_from_slice(&client_flags.to_be_bytes());
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&OPT_GO.to_be_bytes());
    option.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    option.extend_from_slice(&(name.len() as u32).to_be_bytes());
    option.extend_from_slice(name);
    option.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    stream.write_all(&option)?;
    let mut info = None;
    loop {
        if read_u64(&mut stream)? != OPT_REPLY_MAGIC {
            return Err(protocol("bad option reply magic"));
        }
        let _option = read_u32(&mut stream)?;
        let reply = read_u32(&mut stream)?;
        let length = read_u32(&mut stream)?;
        if length > MAX_OPTION_REPLY {
            return Err(protocol(format!("option reply of {length} bytes")));
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data)?;
        match reply {
            REP_ACK => break,
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                let flags = u16::from_be_bytes([data[10], data[11]]);
                info = Some(ExportInfo { size, flags });
            }
            REP_INFO => {}
            error if error & (1 << 31) != 0 => {
                let message = String::from_utf8_lossy(&data);
                return Err(io::Error::other(format!(
                    "the NBD server refused export `{export}` (reply {:#x}): {message}",
                    error
                )));
            }
            other => return Err(protocol(format!("unexpected option reply {other}"))),
        }
    }
    let info = info.ok_or_else(|| protocol("the NBD server sent no export information"))?;
    Ok((stream, info))
}

impl NbdBackend {
    /// Connects to `export` on the NBD server listening on `socket`. `read_only` serves
    /// the disk read-only even when the export is writable.
    pub fn connect(socket: &Path, export: &str, read_only: bool) -> io::Result<Self> {
        Self::connect_with_buffer(socket, export, read_only, SOCKET_BUFFER)
    }

    /// [`NbdBackend::connect`] with connections that ask for `socket_buffer` bytes of
    /// socket buffer (0: the kernel's default; benchmarks compare the two).
    pub fn connect_with_buffer(
        socket: &Path,
        export: &str,
        read_only: bool,
        socket_buffer: usize,
    ) -> io::Result<Self> {
        let (first, info) = handshake(socket, export, socket_buffer)?;
        let count = if info.flags & TFLAG_CAN_MULTI_CONN != 0 {
            CONNECTIONS
        } else {
            1
        };
        let mut connections = vec![Mutex::new(Some(first))];
        for _ in 1..count {
            let (stream, _) = handshake(socket, export, socket_buffer)?;
            connections.push(Mutex::new(Some(stream)));
        }
        Ok(Self {
            socket: socket.to_path_buf(),
            export: export.to_string(),
            size: info.size & !511,
            flags: info.flags,
            read_only: read_only || info.flags & TFLAG_READ_ONLY != 0,
            connections,
            next: AtomicUsize::new(0),
            cookie: AtomicU64::new(1),
            reconnect_for: RECONNECT_FOR,
            fence: None,
            resent: AtomicU64::new(0),
            socket_buffer,
        })
    }

    /// Stops reconnecting once `fence` has lapsed (the VM is stopping and must not write).
    pub fn with_fence(mut self, fence: Arc<Fence>) -> Self {
        self.fence = Some(fence);
        self
    }

    /// How long a request keeps reconnecting before it fails (default [`RECONNECT_FOR`]).
    pub fn with_reconnect_for(mut self, bound: Duration) -> Self {
        self.reconnect_for = bound;
        self
    }

    /// Requests sent again on a new connection after theirs failed.
    pub fn resent(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }

    /// Connections open to the server (the queue depth the backend can keep).
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// The first idle connection if there is one, else waits for the next in turn.
    /// The first, not the next in turn: one request at a time then always goes over the
    /// same connection, so the server's same worker thread serves it (its store writes
    /// keep their io_uring workers warm: storage's `nbd::Handoff`).
    fn connection(&self) -> MutexGuard<'_, Option<UnixStream>> {
        for connection in &self.connections {
            if let Ok(guard) = connection.try_lock() {
                return guard;
            }
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.connections.len();
        self.connections[start % count]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends one request and reads its reply into `read_into` (reads). When the
    /// connection fails it is reopened and the request sent again: at once, then with
    /// a growing backoff, for up to `reconnect_for`, unless the VM's fence lapses.
    fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        write: &[u8],
        read_into: &mut [u8],
    ) -> io::Result<()> {
        let mut guard = self.connection();
        let started = Instant::now();
        let mut backoff = BACKOFF_FIRST;
        for attempt in 0u64.. {
            let failure = match guard.as_mut() {
                None => match handshake(&self.socket, &self.export, self.socket_buffer) {
                    Ok((stream, _)) => {
                        *guard = Some(stream);
                        continue;
                    }
                    Err(error) => error,
                },
                Some(stream) => {
                    match self.exchange(stream, command, flags, offset, write, read_into) {
                        Ok(Ok(())) => return Ok(()),
                        // The server answered with an error: the connection is fine.
                        Ok(Err(error)) => return Err(error),
                        Err(error) => {
                            *guard = None;
                            error
                        }
                    }
                }
            };
            if self.fence.as_ref().is_some_and(|fence| fence.lapsed()) {
                return Err(io::Error::other(format!(
                    "NBD export `{}` on {}: not sent again, the VM's fence deadline lapsed: {failure}",
                    self.export,
                    self.socket.display()
                )));
            }
            if started.elapsed() >= self.reconnect_for {
                return Err(io::Error::new(
                    failure.kind(),
                    format!(
                        "NBD export `{}` on {}: the server could not be reached for {} ms: {failure}",
                        self.export,
                        self.socket.display(),
                        self.reconnect_for.as_millis()
                    ),
                ));
            }
            if attempt == 0 {
                self.resent.fetch_add(1, Ordering::Relaxed);
            } else {
                let left = self.reconnect_for.saturating_sub(started.elapsed());
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        unreachable!("the loop returns")
    }

    /// One request and its reply. The outer error is the connection's (it must be
    /// reopened), the inner one the server's answer.
    fn exchange(
        &self,
        stream: &mut UnixStream,
        command: u16,
        flags: u16,
        offset: u64,
        write: &[u8],
        read_into: &mut [u8],
    ) -> io::Result<io::Result<()>> {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let length = if command == CMD_READ {
            read_into.len()
        } else {
            write.len()
        };
        let mut header = [0u8; 28];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&command.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..28].copy_from_slice(&(length as u32).to_be_bytes());
        // Header and payload in one writev where the socket buffer takes both.
        let mut slices = [IoSlice::new(&header), IoSlice::new(write)];
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            match stream.write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(sent) => IoSlice::advance_slices(&mut slices, sent),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        let mut reply = [0u8; 16];
        stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[0..4].try_into().expect("4 bytes"));
        let error = u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"));
        let answered = u64::from_be_bytes(reply[8..16].try_into().expect("8 bytes"));
        if magic != SIMPLE_REPLY_MAGIC || answered != cookie {
            return Err(protocol(format!(
                "bad NBD reply (magic {magic:#x}, cookie {answered} for {cookie})"
            )));
        }
        if error != 0 {
            return Ok(Err(io::Error::from_raw_os_error(error as i32)));
        }
        if command == CMD_READ {
            stream.read_exact(read_into)?;
        }
        Ok(Ok(()))
    }
}

impl BlockBackend for NbdBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        for (index, chunk) in buffer.chunks_mut(MAX_REQUEST_BYTES).enumerate() {
            let at = offset + (index * MAX_REQUEST_BYTES) as u64;
            self.request(CMD_READ, 0, at, &[], chunk)?;
        }
        Ok(())
    }

    fn write_at(&self, buffer: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ));
        }
        // FUA: the node acknowledges a write only once every copy holds it durably; the
        // flag says so explicitly where the export honours it.
        let fua = if self.flags & TFLAG_SEND_FUA != 0 {
            CMD_FLAG_FUA
        } else {
            0
        };
        for (index, chunk) in buffer.chunks(MAX_REQUEST_BYTES).enumerate() {
            let at = offset + (index * MAX_REQUEST_BYTES) as u64;
            self.request(CMD_WRITE, fua, at, chunk, &mut [])?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, &[], &mut [])
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        // Tell the server goodbye (NBD_CMD_DISC has no reply).
        for connection in &self.connections {
            let mut guard = connection
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(stream) = guard.as_mut() {
                let mut header = [0u8; 28];
                header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                header[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
                let _ = stream.write_all(&header);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use storage::nbd::{Exports, NbdServer};
    use storage::{DiskSource, Store, StoreOptions, VolumeSpec};

    use super::*;

    /// A volume of a real volume store served by the storage crate's NBD server on a
    /// unix socket, as the node serves a VM's disk.
    fn served(dir: &Path) -> (Store, NbdServer, PathBuf) {
        let store = Store::open(dir.join("store"), StoreOptions::default()).expect("store");
        store
            .add_disk("d0", DiskSource::File { capacity: 64 << 20 })
            .expect("disk");
        let volume = store
            .create_volume(&VolumeSpec {
                name: "vm-a-root".into(),
                size: 16 << 20,
                stripe_unit: 1 << 20,
                stripe_width: 1,
                disks: vec![],
            })
            .expect("volume");
        let exports = Arc::new(Exports::new());
        exports.insert("vm-a-root", Arc::new(volume));
        let socket = dir.join("disk.sock");
        let server = NbdServer::start_unix(&socket, exports).expect("server");
        (store, server, socket)
    }

    /// A socket's send buffer as the kernel reports it (it doubles what was set).
    fn send_buffer(stream: &UnixStream) -> usize {
        let mut value: libc::c_int = 0;
        let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the descriptor is an open socket owned by `stream`; `value` and
        // `length` are live, writable and sized for SO_SNDBUF's int.
        let result = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&raw mut value).cast(),
                &mut length,
            )
        };
        assert_eq!(result, 0, "getsockopt: {}", io::Error::last_os_error());
        usize::try_from(value).expect("a size")
    }

    #[test]
    fn connections_take_a_whole_request_in_their_socket_buffer_and_a_write_still_lands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, _server, socket) = served(dir.path());
        let backend = NbdBackend::connect(&socket, "vm-a-root", false).expect("connect");
        for connection in &backend.connections {
            let guard = connection.lock().expect("lock");
            let stream = guard.as_ref().expect("connected");
            // Root gets SOCKET_BUFFER (the kernel reports it doubled) through
            // SO_SNDBUFFORCE, whatever net.core.wmem_max says; anyone else what that
            // limit allows.
            let got = send_buffer(stream);
            if is_root() {
                assert!(got >= SOCKET_BUFFER, "{got} bytes of send buffer");
            } else {
                eprintln!("not root: {got} bytes of send buffer (net.core.wmem_max)");
            }
        }
        let kernel_default = NbdBackend::connect_with_buffer(&socket, "vm-a-root", false, 0)
            .expect("connect with the default");
        let default = send_buffer(
            kernel_default.connections[0]
                .lock()
                .expect("lock")
                .as_ref()
                .expect("connected"),
        );
        eprintln!("send buffer: {default} bytes by default, set: see above");
        // A 4 MiB write (one request, header and payload in one writev) reads back.
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        backend.write_at(&data, 8 << 20).expect("write");
        let mut back = vec![0u8; data.len()];
        kernel_default.read_at(&mut back, 8 << 20).expect("read");
        assert!(back == data, "the bytes read back");
    }

    /// Whether this process runs as root (SO_SNDBUFFORCE needs CAP_NET_ADMIN).
    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                == Some("0")
        })
    }

    #[test]
    fn reads_and_writes_a_volume_through_the_nbd_server_on_several_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, server, socket) = served(dir.path());
        let backend = Arc::new(NbdBackend::connect(&socket, "vm-a-root", false).expect("connect"));
        assert_eq!(backend.size(), 16 << 20);
        assert!(!backend.read_only());
        assert_eq!(
            backend.connections(),
            CONNECTIONS,
            "the export allows several"
        );
        // Four threads write at once (one request in flight on each connection), then
        // every byte reads back, through the backend and from the store itself.
        let writers: Vec<_> = (0..4u8)
            .map(|thread| {
                let backend = Arc::clone(&backend);
                std::thread::spawn(move || {
                    for round in 0..8u64 {
                        let offset = (u64::from(thread) * 8 + round) * 65536;
                        let data = vec![thread * 16 + round as u8 + 1; 65536];
                        backend.write_at(&data, offset).expect("write");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer");
        }
        backend.flush().expect("flush");
        let volume = store.volume("vm-a-root").expect("volume");
        for thread in 0..4u8 {
            for round in 0..8u64 {
                let offset = (u64::from(thread) * 8 + round) * 65536;
                let expected = vec![thread * 16 + round as u8 + 1; 65536];
                let mut through = vec![0u8; 65536];
                backend.read_at(&mut through, offset).expect("read");
                assert_eq!(through, expected, "read back through NBD at {offset}");
                let mut direct = vec![0u8; 65536];
                volume.read_at(offset, &mut direct).expect("store read");
                assert_eq!(direct, expected, "the volume holds it at {offset}");
            }
        }
        // A read larger than one request is split and still whole.
        let mut big = vec![0u8; MAX_REQUEST_BYTES + 8192];
        backend.read_at(&mut big, 0).expect("big read");
        assert_eq!(big[0], 1);
        drop(backend);
        server.shutdown();
    }

    #[test]
    fn an_unknown_export_or_a_missing_socket_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, server, socket) = served(dir.path());
        let error = NbdBackend::connect(&socket, "vm-b-root", false).expect_err("unknown");
        assert!(error.to_string().contains("vm-b-root"), "{error}");
        server.shutdown();
        assert!(NbdBackend::connect(&dir.path().join("none.sock"), "x", false).is_err());
    }

    #[test]
    fn a_request_after_the_server_restarts_is_served_on_a_new_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, server, socket) = served(dir.path());
        let backend = NbdBackend::connect(&socket, "vm-a-root", false).expect("connect");
        backend.write_at(&[7u8; 4096], 0).expect("write");
        server.shutdown();
        let exports = Arc::new(Exports::new());
        exports.insert(
            "vm-a-root",
            Arc::new(store.volume("vm-a-root").expect("volume")),
        );
        let server = NbdServer::start_unix(&socket, exports).expect("restart");
        let mut buffer = [0u8; 4096];
        backend.read_at(&mut buffer, 0).expect("read after restart");
        assert_eq!(buffer, [7u8; 4096]);
        server.shutdown();
    }

    #[test]
    fn a_write_while_the_server_is_gone_waits_and_lands_when_it_is_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, server, socket) = served(dir.path());
        let backend = Arc::new(NbdBackend::connect(&socket, "vm-a-root", false).expect("connect"));
        backend.write_at(&[1u8; 4096], 0).expect("first write");
        // The node agent goes away (its server and every connection with it).
        server.shutdown();
        let _ = std::fs::remove_file(&socket);
        let writer = {
            let backend = Arc::clone(&backend);
            std::thread::spawn(move || {
                let started = Instant::now();
                let result = backend.write_at(&[9u8; 4096], 8192);
                (result, started.elapsed())
            })
        };
        // A new agent serves the same volume on the same path 400 ms later.
        std::thread::sleep(Duration::from_millis(400));
        let exports = Arc::new(Exports::new());
        exports.insert(
            "vm-a-root",
            Arc::new(store.volume("vm-a-root").expect("volume")),
        );
        let server = NbdServer::start_unix(&socket, exports).expect("restart");
        let (result, waited) = writer.join().expect("writer");
        result.expect("the write waited for the server instead of failing");
        assert!(
            waited >= Duration::from_millis(350),
            "the write completed after {waited:?}, before the server was back"
        );
        assert!(backend.resent() >= 1);
        let mut direct = vec![0u8; 4096];
        let volume = store.volume("vm-a-root").expect("volume");
        volume.read_at(8192, &mut direct).expect("store read");
        assert_eq!(direct, vec![9u8; 4096], "the write is on the volume");
        drop(backend);
        server.shutdown();
    }

    #[test]
    fn a_server_gone_longer_than_the_bound_or_a_lapsed_fence_fails_the_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, server, socket) = served(dir.path());
        let backend = NbdBackend::connect(&socket, "vm-a-root", false)
            .expect("connect")
            .with_reconnect_for(Duration::from_millis(300));
        server.shutdown();
        let started = Instant::now();
        let error = backend.write_at(&[1u8; 4096], 0).expect_err("no server");
        let waited = started.elapsed();
        assert!(
            error
                .to_string()
                .contains("could not be reached for 300 ms"),
            "{error}"
        );
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        // With a lapsed fence it gives up at once: a fenced VM must not write.
        let fence = Arc::new(Fence::default());
        fence.set(crate::fence::boottime_ns() + 1).expect("arm");
        std::thread::sleep(Duration::from_millis(2));
        assert!(fence.lapsed());
        let fenced = backend
            .with_fence(fence)
            .with_reconnect_for(Duration::from_secs(30));
        let started = Instant::now();
        let error = fenced.write_at(&[1u8; 4096], 0).expect_err("fenced");
        assert!(
            error.to_string().contains("fence deadline lapsed"),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
