//! The control socket inside `cairn-vmm`: binds the socket, serves each connection on
//! its own thread, and carries out each [`Request`] on the VM's [`VmHandle`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use super::wire::{DirtyLogAction, Request, Response};
use crate::handle::VmHandle;

/// Carries out one request on the VM behind `vm`.
pub fn execute(vm: &VmHandle, request: &Request) -> Response {
    let result = match request {
        Request::Status => {
            return Response {
                status: Some(vm.status()),
                ..Response::ok()
            };
        }
        Request::Pause => vm.pause(),
        Request::Resume => vm.resume(),
        Request::PowerOff { force } => vm.power_off(*force),
        Request::Reboot => vm.reboot(),
        Request::SetDirtyRate { pages_per_second } => vm.set_dirty_rate(*pages_per_second),
        Request::SetBurn { on } => vm.set_burn(*on),
        Request::DirtyLog {
            action: DirtyLogAction::Start,
        } => vm.set_dirty_logging(true),
        Request::DirtyLog {
            action: DirtyLogAction::Stop,
        } => vm.set_dirty_logging(false),
        Request::DirtyLog {
            action: DirtyLogAction::Fetch,
        } => {
            return match vm.take_dirty_pages() {
                Ok(pages) => Response {
                    dirty_pages: Some(pages),
                    ..Response::ok()
                },
                Err(error) => Response::error(error.to_string()),
            };
        }
        Request::Migrate {
            to,
            max_downtime_ms,
            stop_and_copy,
        } => {
            return match vm.migrate(to, *max_downtime_ms, *stop_and_copy) {
                Ok(()) => Response {
                    migration: vm.migration_status(),
                    ..Response::ok()
                },
                Err(error) => Response::error(error.to_string()),
            };
        }
        Request::MigrationStatus => {
            return match vm.migration_status() {
                Some(status) => Response {
                    migration: Some(status),
                    ..Response::ok()
                },
                None => Response::error("no migration was started".into()),
            };
        }
        Request::MigrateCommit | Request::MigrateAbort => {
            let decision = if matches!(request, Request::MigrateCommit) {
                crate::migration::Decision::Commit
            } else {
                crate::migration::Decision::Abort
            };
            return match vm.migration_decide(decision) {
                Ok(status) => Response {
                    migration: Some(status),
                    ..Response::ok()
                },
                Err(error) => Response::error(error.to_string()),
            };
        }
        Request::MemoryHash => {
            return Response {
                memory_crc32c: Some(vm.memory_hash()),
                ..Response::ok()
            };
        }
        Request::MigrationState => {
            return match vm.migration_states() {
                Some(states) => Response {
                    vm_states: Some(states),
                    ..Response::ok()
                },
                None => Response::error(
                    "no state was received (only a migration's destination has one, once ready)"
                        .into(),
                ),
            };
        }
        Request::FtStart {
            to,
            epoch_ms,
            sync_disks,
        } => {
            return match vm.ft_start(to, *epoch_ms, *sync_disks) {
                Ok(()) => Response {
                    ft: vm.ft_status(),
                    ..Response::ok()
                },
                Err(error) => Response::error(error.to_string()),
            };
        }
        Request::FtStatus => {
            return match vm.ft_status() {
                Some(status) => Response {
                    ft: Some(status),
                    ..Response::ok()
                },
                None => {
                    Response::error("this VM is no fault-tolerance primary or secondary".into())
                }
            };
        }
        Request::FtPromote | Request::FtStop => {
            let result = if matches!(request, Request::FtPromote) {
                vm.ft_promote()
            } else {
                vm.ft_stop()
            };
            return match result {
                Ok(status) => Response {
                    ft: Some(status),
                    ..Response::ok()
                },
                Err(error) => Response::error(error.to_string()),
            };
        }
        Request::SetBeacon { target } => vm.set_beacon(target.as_deref()),
        Request::BlockTest => vm.block_test(),
        Request::GuestCrash => vm.guest_crash(),
        Request::SetFence {
            deadline_boottime_ns,
        } => vm.set_fence(*deadline_boottime_ns),
        Request::Identify => {
            return Response {
                identity: Some(vm.identity()),
                ..Response::ok()
            };
        }
        Request::GuestDiskIo(io) => {
            return match vm.guest_disk_io(io) {
                Ok(result) => Response {
                    guest_disk_io: Some(result),
                    ..Response::ok()
                },
                Err(error) => Response::error(error.to_string()),
            };
        }
        Request::ConsoleInput { data } => {
            return Response {
                console_accepted: Some(vm.console_input(data)),
                ..Response::ok()
            };
        }
        Request::ConsoleTail { bytes } => {
            return match vm.console_tail(*bytes) {
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
pub fn serve(path: &Path, vm: VmHandle) -> io::Result<ControlServer> {
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
                let vm = vm.clone();
                let in_flight = Arc::clone(&in_flight);
                let _ = thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_connection(stream, &vm, &in_flight));
            }
        })?;
    Ok(server)
}

fn serve_connection(stream: UnixStream, vm: &VmHandle, in_flight: &InFlight) {
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
            Ok(request) => execute(vm, &request),
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
