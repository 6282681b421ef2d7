//! The control channel between the node agent and one `cairn-vmm` process: a Unix stream
//! socket (`control.sock` in the VM directory) speaking line-delimited JSON. Each request
//! is one JSON object on one line; each gets exactly one JSON response line, in order.
//! A connection may carry any number of requests; several connections may be open.
//!
//! Requests (`"op"` selects the operation):
//!
//! ```text
//! {"op":"status"}                                   -> {"ok":true,"status":{...VmStatus...}}
//! {"op":"pause"}                                    -> {"ok":true}   (all vCPUs out of KVM_RUN)
//! {"op":"resume"}                                   -> {"ok":true}
//! {"op":"power-off","force":false}                  -> {"ok":true}   (the process then exits 0)
//! {"op":"reboot"}                                   -> {"ok":true}
//! {"op":"set-dirty-rate","pages_per_second":1000}   -> {"ok":true}
//! {"op":"dirty-log","action":"start"|"stop"|"fetch"} -> {"ok":true,"dirty_pages":N} (fetch)
//! {"op":"block-test"}                               -> {"ok":true}   (result in status.block_test)
//! {"op":"guest-crash"}                              -> {"ok":true}   (the process then exits 4)
//! {"op":"console-tail","bytes":4096}                -> {"ok":true,"console":"..."}
//! ```
//!
//! Errors: `{"ok":false,"error":"..."}`; the connection stays usable.
//!
//! Architecture invariant: these types are the wire contract (serde lives here and on
//! nothing internal); fields are only ever added.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::controller::Controller;
use crate::guest::BlockTestResult;

/// Version of this protocol, reported in every status.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Report [`VmStatus`].
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
    /// Power off: graceful (the built-in guest acknowledges) unless `force`.
    PowerOff {
        /// Stop at once instead of waiting for the guest.
        #[serde(default)]
        force: bool,
    },
    /// Reboot the guest.
    Reboot,
    /// Set how many pages per second the built-in guest dirties.
    SetDirtyRate {
        /// Pages per second (0 stops dirtying).
        pages_per_second: u64,
    },
    /// Control or read the KVM dirty-page log.
    DirtyLog {
        /// What to do.
        action: DirtyLogAction,
    },
    /// Make the built-in guest rerun its block self-test.
    BlockTest,
    /// Make the built-in guest crash (triple fault), to test crash handling.
    GuestCrash,
    /// The last bytes of the serial console log.
    ConsoleTail {
        /// How many bytes (from the end); 4096 when absent.
        #[serde(default = "default_tail_bytes")]
        bytes: u64,
    },
}

/// Operations on the dirty-page log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyLogAction {
    /// Turn `KVM_MEM_LOG_DIRTY_PAGES` on.
    Start,
    /// Turn it off.
    Stop,
    /// Count and clear pages dirtied since the last fetch.
    Fetch,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    /// Dirty pages, for `dirty-log` `fetch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_pages: Option<u64>,
    /// Console text, for `console-tail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
}

fn default_tail_bytes() -> u64 {
    4096
}

impl Response {
    fn ok() -> Self {
        Self {
            ok: true,
            error: None,
            status: None,
            dirty_pages: None,
            console: None,
        }
    }

    fn error(message: String) -> Self {
        Self {
            ok: false,
            error: Some(message),
            status: None,
            dirty_pages: None,
            console: None,
        }
    }
}

/// A snapshot of one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// `running`, `paused` or `exiting`.
    pub state: String,
    /// `cairn-guest` or `linux`.
    pub boot: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Configured guest RAM.
    pub memory_bytes: u64,
    /// Guest RAM resident in host memory (mincore over the mapping).
    pub guest_resident_bytes: u64,
    /// Resident set of the whole VMM process (guest RAM included).
    pub vmm_rss_bytes: u64,
    /// Time since the vCPUs first started.
    pub uptime_ms: u64,
    /// Boots so far (1 + reboots).
    pub boot_count: u64,
    /// Last boot stage the built-in guest reported (0 none, 1 entered, 2 main loop).
    pub boot_stage: u64,
    /// Last heartbeat counter of each vCPU.
    pub heartbeats: Vec<u64>,
    /// Sum of `heartbeats`.
    pub heartbeat_total: u64,
    /// Milliseconds since the last heartbeat of any vCPU.
    pub last_heartbeat_age_ms: Option<f64>,
    /// Microseconds from the start of VM creation to the first heartbeat.
    pub first_heartbeat_us: Option<u64>,
    /// Dirty-page rate asked of the guest.
    pub dirty_rate_pages_per_second: u64,
    /// Pages the guest reports having dirtied.
    pub pages_dirtied: u64,
    /// Whether KVM dirty logging is on.
    pub dirty_logging: bool,
    /// Whether guest RAM is advised `MADV_MERGEABLE` (KSM may deduplicate it).
    #[serde(default)]
    pub ksm_mergeable: bool,
    /// Last block self-test result.
    pub block_test: BlockTestResult,
    /// Block self-tests completed.
    pub block_tests: u64,
    /// virtio-blk counters of the first disk (the one the built-in guest tests), if any.
    pub block: Option<BlockStatus>,
    /// virtio-blk counters of every disk, in `--disk` order.
    #[serde(default)]
    pub disks: Vec<BlockStatus>,
    /// virtio-net devices, in `--nic` order.
    #[serde(default)]
    pub nics: Vec<NicStatus>,
    /// ARP and ICMP echo requests the built-in guest has answered.
    #[serde(default)]
    pub net_replies: u64,
    /// VM exits by kind.
    pub exits: ExitCounts,
}

/// A virtio-net device and its frame counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStatus {
    /// The host tap it is attached to.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// Whether the guest's driver has brought it up.
    pub driver_ok: bool,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames the guest could not take (driver not running, buffer too small).
    pub rx_dropped: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Bytes the guest sent.
    pub tx_bytes: u64,
    /// Frames that could not be sent.
    pub tx_errors: u64,
    /// Times the VMM attached to the tap again after it was deleted and made anew.
    #[serde(default)]
    pub tap_reattached: u64,
}

/// virtio-blk request counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStatus {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// VM exits by kind, over all vCPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Triple faults.
    pub shutdown: u64,
    /// `KVM_RUN` interrupted by a kick.
    pub interrupted: u64,
    /// Anything else.
    pub other: u64,
}

/// Executes one request against `controller`.
pub fn handle(controller: &Controller, request: &Request) -> Response {
    let result = match request {
        Request::Status => {
            return Response {
                status: Some(controller.status()),
                ..Response::ok()
            };
        }
        Request::Pause => controller.pause(),
        Request::Resume => controller.resume(),
        Request::PowerOff { force } => controller.power_off(*force),
        Request::Reboot => controller.reboot(),
        Request::SetDirtyRate { pages_per_second } => controller.set_dirty_rate(*pages_per_second),
        Request::DirtyLog {
            action: DirtyLogAction::Start,
        } => controller.set_dirty_logging(true),
        Request::DirtyLog {
            action: DirtyLogAction::Stop,
        } => controller.set_dirty_logging(false),
        Request::DirtyLog {
            action: DirtyLogAction::Fetch,
        } => {
            return match controller.take_dirty_pages() {
                Ok(pages) => Response {
                    dirty_pages: Some(pages),
                    ..Response::ok()
                },
                Err(error) => Response::error(error.to_string()),
            };
        }
        Request::BlockTest => controller.block_test(),
        Request::GuestCrash => controller.guest_crash(),
        Request::ConsoleTail { bytes } => {
            return match controller.console_tail(*bytes) {
                Ok(console) => Response {
                    console: Some(console),
                    ..Response::ok()
                },
                Err(error) => Response::error(error.to_string()),
            };
        }
    };
    match result {
        Ok(()) => Response::ok(),
        Err(error) => Response::error(error.to_string()),
    }
}

/// Requests being handled right now, so the process can let their responses out before
/// it exits (a `power-off` is answered before the VMM is gone).
#[derive(Debug, Default)]
struct InFlight {
    count: Mutex<usize>,
    done: Condvar,
}

/// The running control server.
#[derive(Debug, Clone)]
pub struct ControlServer {
    in_flight: Arc<InFlight>,
}

impl ControlServer {
    /// Waits up to `timeout` for requests being handled to have written their responses.
    pub fn drain(&self, timeout: Duration) {
        let count = self.in_flight.count.lock().expect("in-flight lock");
        let _ = self
            .in_flight
            .done
            .wait_timeout_while(count, timeout, |count| *count > 0);
    }
}

/// Binds the control socket at `path` (replacing a stale one) and serves it on a
/// background thread, one thread per connection.
pub fn serve(path: &Path, controller: Controller) -> io::Result<ControlServer> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(path)?;
    let server = ControlServer {
        in_flight: Arc::new(InFlight::default()),
    };
    let in_flight = Arc::clone(&server.in_flight);
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let controller = controller.clone();
                let in_flight = Arc::clone(&in_flight);
                let _ = thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_connection(stream, &controller, &in_flight));
            }
        })?;
    Ok(server)
}

fn serve_connection(stream: UnixStream, controller: &Controller, in_flight: &InFlight) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        *in_flight.count.lock().expect("in-flight lock") += 1;
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(controller, &request),
            Err(error) => Response::error(format!("malformed request: {error}")),
        };
        let mut text = serde_json::to_string(&response).expect("responses serialize");
        text.push('\n');
        let written = writer.write_all(text.as_bytes());
        *in_flight.count.lock().expect("in-flight lock") -= 1;
        in_flight.done.notify_all();
        if written.is_err() {
            return;
        }
    }
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, sending or receiving failed.
    #[error("control socket i/o failed")]
    Io(#[from] io::Error),
    /// The VMM answered something that is not a response.
    #[error("malformed response from the VMM: {0}")]
    Malformed(String),
    /// The VMM closed the connection (it is exiting).
    #[error("the VMM closed the control connection")]
    Closed,
    /// The VMM refused the request.
    #[error("the VMM refused the request: {0}")]
    Refused(String),
}

/// A client of the control socket (for the node agent and tests).
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to the socket at `path`, with `timeout` for each read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends `request` and returns the raw response.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let mut text = serde_json::to_string(request).expect("requests serialize");
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&line)
            .map_err(|error| ClientError::Malformed(format!("{error}: {line}")))
    }

    /// Sends `request`; a refusal becomes [`ClientError::Refused`].
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        let response = self.call(request)?;
        if !response.ok {
            return Err(ClientError::Refused(response.error.unwrap_or_default()));
        }
        Ok(response)
    }

    /// The VM's status.
    pub fn status(&mut self) -> Result<VmStatus, ClientError> {
        self.request(&Request::Status)?
            .status
            .ok_or_else(|| ClientError::Malformed("status without status".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_wire_form() {
        let cases = [
            (Request::Status, r#"{"op":"status"}"#),
            (
                Request::PowerOff { force: true },
                r#"{"op":"power-off","force":true}"#,
            ),
            (
                Request::SetDirtyRate {
                    pages_per_second: 5,
                },
                r#"{"op":"set-dirty-rate","pages_per_second":5}"#,
            ),
            (
                Request::DirtyLog {
                    action: DirtyLogAction::Fetch,
                },
                r#"{"op":"dirty-log","action":"fetch"}"#,
            ),
            (Request::GuestCrash, r#"{"op":"guest-crash"}"#),
        ];
        for (request, wire) in cases {
            assert_eq!(serde_json::to_string(&request).expect("serialize"), wire);
            assert_eq!(
                serde_json::from_str::<Request>(wire).expect("parse"),
                request
            );
        }
        let graceful: Request =
            serde_json::from_str(r#"{"op":"power-off"}"#).expect("force defaults to false");
        assert_eq!(graceful, Request::PowerOff { force: false });
    }

    #[test]
    fn errors_carry_a_message_and_no_payload() {
        let text = serde_json::to_string(&Response::error("nope".into())).expect("serialize");
        assert_eq!(text, r#"{"ok":false,"error":"nope"}"#);
    }
}
