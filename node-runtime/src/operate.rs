//! The operator's day-to-day actions on one VM of this node (issue 20, item 4):
//! `Apply.RebootVm` (a reboot in the same VMM process: node, disks, NICs and cgroup
//! stay) and the serial console (`Apply.ReadConsole`, `Apply.WriteConsole`), which
//! `cairn vm console` reaches through the controller.
//!
//! The console is the VM's console log (`RUN_DIR/VM/console.log`, appended by its VMM,
//! which keeps it across restarts and reboots) read from a byte offset, and bytes
//! typed into its 16550's receive FIFO over the VMM's control socket (`console-input`).
//! A read waits for output by polling the log (every [`POLL`]); before each look it
//! asks a running VMM to flush its line buffer (`console-tail` of 0 bytes), so a
//! prompt without a newline shows too. Reading changes nothing, so a stopped VM's last
//! output can be read as well; typing needs a running VMM.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::v1::{self, VmState};
use tonic::Status;
use vmm::control::{ControlClient, Request};

use crate::validate;
use crate::vms::Vms;

/// How often a waiting console read looks at the log.
pub const POLL: Duration = Duration::from_millis(50);
/// The longest a console read may wait (the node API's calls time out after 30 s).
pub const MAX_WAIT_MS: u32 = 25_000;
/// Bytes a console read returns when the request names no maximum.
pub const DEFAULT_READ_BYTES: u32 = 64 << 10;
/// The most bytes one console read returns.
pub const MAX_READ_BYTES: u32 = 1 << 20;
/// The most bytes one console write carries.
pub const MAX_WRITE_BYTES: usize = 4096;
/// How long a reboot may take to show as a new boot.
pub const REBOOT_TIMEOUT: Duration = Duration::from_secs(10);

const CONTROL_TIMEOUT: Duration = Duration::from_millis(500);

/// A VM's run directory and VMM, or why the action cannot be done.
async fn running_vmm(vms: &Vms, name: &str, what: &str) -> Result<PathBuf, Status> {
    let Some((dir, state, pid)) = vms.run_state(name).await else {
        return Err(Status::not_found(format!(
            "no VM named {name} on this node"
        )));
    };
    if state != VmState::Running || pid == 0 {
        return Err(Status::failed_precondition(format!(
            "VM {name} is {}, not running: {what} needs a running VM",
            state.as_str_name()
        )));
    }
    Ok(dir.join("control.sock"))
}

/// One request to a VMM's control socket, off the async runtime.
async fn control(socket: PathBuf, request: Request) -> Result<vmm::control::Response, String> {
    tokio::task::spawn_blocking(move || {
        let mut client =
            ControlClient::connect(&socket, CONTROL_TIMEOUT).map_err(|e| e.to_string())?;
        client.request(&request).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn boot_count(socket: &Path) -> Option<u64> {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || {
        ControlClient::connect(&socket, CONTROL_TIMEOUT)
            .ok()?
            .status()
            .ok()
            .map(|status| status.boot_count)
    })
    .await
    .ok()
    .flatten()
}

/// `Apply.RebootVm`: asks the VMM to reboot its guest and waits until it reports the
/// new boot.
pub async fn reboot(vms: &Vms, request: &v1::RebootVm) -> Result<v1::VmResult, Status> {
    validate::name("reboot_vm.name", &request.name)?;
    let socket = running_vmm(vms, &request.name, "a reboot").await?;
    let before = boot_count(&socket).await.ok_or_else(|| {
        Status::unavailable(format!(
            "VM {}: its VMM does not answer on its control socket; try again",
            request.name
        ))
    })?;
    control(socket.clone(), Request::Reboot)
        .await
        .map_err(|e| Status::internal(format!("VM {}: reboot refused: {e}", request.name)))?;
    let deadline = tokio::time::Instant::now() + REBOOT_TIMEOUT;
    loop {
        if boot_count(&socket).await.is_some_and(|now| now > before) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Status::deadline_exceeded(format!(
                "VM {}: asked to reboot, but its VMM reported no new boot within {} s (boot {before})",
                request.name,
                REBOOT_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    let (_, state, pid) =
        vms.run_state(&request.name)
            .await
            .unwrap_or((PathBuf::new(), VmState::Unspecified, 0));
    Ok(v1::VmResult {
        name: request.name.clone(),
        state: state.as_str_name().to_owned(),
        pid,
    })
}

/// Where reading starts in a log of `length` bytes.
fn start_of(request: &v1::ReadConsoleRequest, length: u64) -> u64 {
    if request.from_end {
        length.saturating_sub(request.offset)
    } else if request.offset > length {
        // The log was replaced (the VM deleted and defined again): from its start.
        0
    } else {
        request.offset
    }
}

fn read_range(log: &Path, start: u64, max: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let mut file = match std::fs::File::open(log) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let length = file.metadata()?.len();
    if start >= length {
        return Ok((Vec::new(), length));
    }
    file.seek(SeekFrom::Start(start))?;
    let mut data = Vec::new();
    file.take(max.min(length - start)).read_to_end(&mut data)?;
    Ok((data, length))
}

/// `Apply.ReadConsole`.
pub async fn read_console(
    vms: &Vms,
    request: v1::ReadConsoleRequest,
) -> Result<v1::ReadConsoleResponse, Status> {
    const FIELD: &str = "read_console_request";
    validate::name(&format!("{FIELD}.vm"), &request.vm)?;
    if request.wait_ms > MAX_WAIT_MS {
        return Err(validate::invalid(
            &format!("{FIELD}.wait_ms"),
            format!("{} is more than {MAX_WAIT_MS}", request.wait_ms),
        ));
    }
    let max = match request.max_bytes {
        0 => DEFAULT_READ_BYTES,
        n @ 1..=MAX_READ_BYTES => n,
        other => {
            return Err(validate::invalid(
                &format!("{FIELD}.max_bytes"),
                format!("{other} is more than {MAX_READ_BYTES} (or 0 for {DEFAULT_READ_BYTES})"),
            ));
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(request.wait_ms));
    loop {
        let Some((dir, state, pid)) = vms.run_state(&request.vm).await else {
            return Err(Status::not_found(format!(
                "no VM named {} on this node",
                request.vm
            )));
        };
        let running = state == VmState::Running && pid != 0;
        let mut boots = 0;
        if running {
            // Flush the VMM's line buffer first (a prompt has no newline).
            let _ = control(dir.join("control.sock"), Request::ConsoleTail { bytes: 0 }).await;
            boots = boot_count(&dir.join("control.sock")).await.unwrap_or(0);
        }
        let log = dir.join("console.log");
        let length = std::fs::metadata(&log).map_or(0, |m| m.len());
        let start = start_of(&request, length);
        let waited_enough = tokio::time::Instant::now() >= deadline;
        if length > start || waited_enough || !running {
            let (data, _) = read_range(&log, start, u64::from(max))
                .map_err(|e| Status::internal(format!("cannot read {}: {e}", log.display())))?;
            // A stopped VM's log does not grow: answer at once with what it has.
            return Ok(v1::ReadConsoleResponse {
                next_offset: start + data.len() as u64,
                data,
                state: state.as_str_name().to_owned(),
                boot_count: boots,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `Apply.WriteConsole`.
pub async fn write_console(
    vms: &Vms,
    request: v1::WriteConsoleRequest,
) -> Result<v1::WriteConsoleResponse, Status> {
    const FIELD: &str = "write_console_request";
    validate::name(&format!("{FIELD}.vm"), &request.vm)?;
    if request.data.is_empty() || request.data.len() > MAX_WRITE_BYTES {
        return Err(validate::invalid(
            &format!("{FIELD}.data"),
            format!("{} bytes; send 1 to {MAX_WRITE_BYTES}", request.data.len()),
        ));
    }
    let socket = running_vmm(vms, &request.vm, "typing into its console").await?;
    let answer = control(socket, Request::ConsoleInput { data: request.data })
        .await
        .map_err(|e| Status::unavailable(format!("VM {}: its VMM: {e}", request.vm)))?;
    Ok(v1::WriteConsoleResponse {
        accepted: answer.console_accepted.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_starts_at_its_offset_from_the_end_or_again_at_0_past_the_end() {
        let at = |offset, from_end| v1::ReadConsoleRequest {
            offset,
            from_end,
            ..Default::default()
        };
        assert_eq!(start_of(&at(10, false), 100), 10);
        assert_eq!(start_of(&at(100, false), 100), 100);
        assert_eq!(start_of(&at(150, false), 100), 0);
        assert_eq!(start_of(&at(30, true), 100), 70);
        assert_eq!(start_of(&at(300, true), 100), 0);
    }
}
