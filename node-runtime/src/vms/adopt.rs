//! Adopting running VMMs after an agent restart (issue 16, item 5: agent restarts are
//! not node failures).
//!
//! A VMM runs in its own process group and outlives the agent that spawned it: a crash
//! of `cairn-node` (kill -9) or a graceful stop for an upgrade leaves it running, its
//! guest untouched, its disk I/O waiting for the NBD server to come back (the VMM's
//! NBD client reconnects for up to the freeze bound), its fence deadline counting down.
//! The next agent adopts it only once it has proved to be the process this node
//! started, for this VM, in this incarnation:
//!
//! 1. a pidfd on the recorded pid (`pidfd_open`): from then on the process cannot be
//!    swapped for another under the same pid, and its exit is watched through it;
//! 2. its start time (field 22 of `/proc/PID/stat`, clock ticks since boot) equals the
//!    one recorded at spawn: a reused pid is a younger process;
//! 3. its command line is `cairn-vmm --config DATA_DIR/vms/VM/vm-config.json` (this
//!    node's VM, not another node's on a one-host dev cluster);
//! 4. its control socket answers `identify` with the VM's name, the incarnation id the
//!    node generated and passed in its config at spawn, and the same pid.
//!
//! A process that fails 1–3 is not ours: it is neither adopted nor touched. One that
//! passes 1–3 but fails the handshake is this node's VMM of that VM, yet not provably
//! the incarnation recorded (its socket answers as someone else, or not at all): it is
//! not adopted and is killed through its pidfd (no pid race), so the reconciler can
//! start the VM again without two copies of it. Either way the VM is reported
//! `CRASHED` with a detail saying which check failed.

use std::io::Read as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// How long the identity handshake waits for each read and write, first.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// How many times the handshake is tried, each waiting twice as long as the one
/// before (1 + 2 + 4 + 8 s), while the process lives: a VMM slow to answer on a loaded
/// machine is not killed for it (a CI run saw `Resource temporarily unavailable`
/// after 1 s, and the VM was killed instead of adopted; a later one saw a spot VMM
/// starved past 1 + 2 + 4 s beside three busy loops, before its control thread left
/// the spot class's cpu cgroup for its own, `svc-NAME`). The node serves only
/// after adoption, so the wait is bounded well below a lease.
pub const HANDSHAKE_TRIES: u32 = 4;

/// A pidfd: a handle on one process that a reused pid cannot redirect.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// `pidfd_open(pid)`.
    pub fn open(pid: u32) -> std::io::Result<PidFd> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor the kernel just gave us and nothing else owns.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Whether the process has exited (the pidfd polls readable then).
    pub fn exited(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd it is given, without blocking.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready > 0 && poll.revents & libc::POLLIN != 0
    }

    /// Sends `signal` to exactly this process (`pidfd_send_signal`).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal takes our descriptor, a signal number, a null
        // siginfo and no flags; it touches no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Resolves once the process has exited.
    pub async fn exit(self) {
        // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which owns it until it is
        // dropped: the descriptor stays open and the same for the registration's life.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self.0, tokio::io::Interest::READABLE)
        };
        match registered {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            // Cannot register it: poll instead.
            Err(error) => {
                let fd = PidFd(error.into_parts().0);
                while !fd.exited() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The start time of process `pid`: field 22 of `/proc/PID/stat`, in clock ticks since
/// boot. `None` when there is no such process.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    start_ticks_of(&stat)
}

/// Field 22 (starttime) of a `/proc/PID/stat` line; the command name (field 2) may
/// hold spaces and parentheses, so fields are counted from its last `)`.
fn start_ticks_of(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state).
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// A fresh incarnation id for a spawn: 128 random bits, hex.
pub fn new_incarnation() -> String {
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // Unique enough without randomness: this agent's pid and the boot clock.
        let now = vmm::fence::boottime_ns().to_le_bytes();
        bytes[..8].copy_from_slice(&now);
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the checks found about a recorded VMM.
#[derive(Debug)]
pub enum Verdict {
    /// It is this node's VMM of the VM, in the recorded incarnation.
    Adopt(PidFd),
    /// No process runs under the recorded pid any more.
    Gone(String),
    /// A process runs under the recorded pid but is not the VMM that was started: it
    /// is left alone.
    NotOurs(String),
    /// This node's VMM of the VM (pid, start time, command line) that did not prove
    /// to be the recorded incarnation: not adopted; the caller kills it through the
    /// pidfd.
    Unverified(PidFd, String),
}

/// What was recorded at spawn about a VM's VMM.
#[derive(Debug, Clone)]
pub struct Recorded<'a> {
    /// The VM's name.
    pub vm: &'a str,
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot (0: recorded by an older agent).
    pub start_ticks: u64,
    /// The incarnation id passed at spawn.
    pub incarnation: &'a str,
    /// Its `vm-config.json`.
    pub config: &'a Path,
    /// Its control socket.
    pub socket: &'a Path,
}

/// Runs the four checks on a recorded VMM (blocking: reads /proc, talks to the
/// control socket).
pub fn verify(recorded: &Recorded<'_>) -> Verdict {
    let pid = recorded.pid;
    let pidfd = match PidFd::open(pid) {
        Ok(pidfd) => pidfd,
        Err(error) if error.raw_os_error() == Some(libc::ESRCH) => {
            return Verdict::Gone(format!(
                "its cairn-vmm (pid {pid}) ended while the node agent was down"
            ));
        }
        Err(error) => {
            return Verdict::NotOurs(format!(
                "pidfd_open of its cairn-vmm's pid {pid} failed ({error}); not adopted and not touched"
            ));
        }
    };
    // An exited process (a zombie not reaped yet included) is gone, whoever it was.
    let gone = || {
        Verdict::Gone(format!(
            "its cairn-vmm (pid {pid}) ended while the node agent was down"
        ))
    };
    if pidfd.exited() {
        return gone();
    }
    let Some(ticks) = start_ticks(pid) else {
        return gone();
    };
    if recorded.start_ticks == 0 {
        // Recorded by an agent that kept no start time: the command line is all there
        // is, as before adoption existed.
        return if super::process_is_vmm_of(pid, recorded.config) && !pidfd.exited() {
            Verdict::Unverified(
                pidfd,
                format!(
                    "its cairn-vmm (pid {pid}) was recorded by an older agent without a start time or incarnation"
                ),
            )
        } else {
            Verdict::NotOurs(format!(
                "pid {pid} is not its cairn-vmm any more; not adopted and not touched"
            ))
        };
    }
    if ticks != recorded.start_ticks {
        return Verdict::NotOurs(format!(
            "pid {pid} is now another process (started {ticks} clock ticks after boot; its cairn-vmm started at {}); not adopted and not touched",
            recorded.start_ticks
        ));
    }
    if !super::process_is_vmm_of(pid, recorded.config) {
        return Verdict::NotOurs(format!(
            "pid {pid} started at the recorded time but is not `cairn-vmm --config {}`; not adopted and not touched",
            recorded.config.display()
        ));
    }
    if pidfd.exited() {
        return gone();
    }
    let mut identity = vmm::control::ControlClient::connect(recorded.socket, HANDSHAKE_TIMEOUT)
        .and_then(|mut client| client.identify());
    for attempt in 1..HANDSHAKE_TRIES {
        if identity.is_ok() {
            break;
        }
        if pidfd.exited() {
            return gone();
        }
        identity = vmm::control::ControlClient::connect(
            recorded.socket,
            HANDSHAKE_TIMEOUT * (2 << (attempt - 1)),
        )
        .and_then(|mut client| client.identify());
    }
    match identity {
        Err(error) => Verdict::Unverified(
            pidfd,
            format!(
                "its cairn-vmm (pid {pid}) did not answer the identity handshake on {}: {}",
                recorded.socket.display(),
                crate::error_chain(&error)
            ),
        ),
        Ok(identity)
            if identity.name == recorded.vm
                && identity.incarnation == recorded.incarnation
                && identity.pid == pid =>
        {
            Verdict::Adopt(pidfd)
        }
        Ok(identity) => Verdict::Unverified(
            pidfd,
            format!(
                "its control socket {} answered as vm `{}` incarnation `{}` (pid {}), not vm `{}` incarnation `{}` (pid {pid})",
                recorded.socket.display(),
                identity.name,
                identity.incarnation,
                identity.pid,
                recorded.vm,
                recorded.incarnation,
            ),
        ),
    }
}

/// How an adopted VMM ended, from the `exited` event it wrote last to its log (the
/// agent that adopted it is not its parent and cannot read its exit status): the
/// text for `last_exit` and whether it stopped cleanly (exit 0).
pub fn exit_from_log(log: &Path) -> (String, bool) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let exited = text.lines().rev().find_map(|line| {
        let event: serde_json::Value = serde_json::from_str(line).ok()?;
        (event["event"] == "exited").then_some(event)
    });
    match exited {
        Some(event) => {
            let code = event["exit_code"].as_i64().unwrap_or(-1);
            let outcome = event["outcome"].as_str().unwrap_or("unknown");
            let detail = event["detail"].as_str().unwrap_or("");
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            };
            (format!("exit status: {code} ({outcome}{detail})"), code == 0)
        }
        None => (
            "ended without an exit event (killed by a signal?); it was adopted after an agent restart, so its exit status cannot be read".into(),
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_field_22_even_when_the_command_name_has_spaces_and_parentheses() {
        let stat = "4242 (cairn vmm) (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 12 3 0 0 20 0 5 0 987654 123456 789";
        assert_eq!(start_ticks_of(stat), Some(987_654));
        assert_eq!(start_ticks_of("4242 (x) S 1"), None);
        let me = start_ticks(std::process::id()).expect("this process has a start time");
        assert!(me > 0);
    }

    #[test]
    fn a_pidfd_sees_its_process_exit_and_signals_only_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pidfd = PidFd::open(child.id()).expect("pidfd");
        assert!(!pidfd.exited());
        pidfd.signal(libc::SIGKILL).expect("signal");
        let _ = child.wait();
        assert!(pidfd.exited());
        // Signalling an exited process through its pidfd is an error, never a kill of
        // whoever has the pid now.
        assert!(pidfd.signal(libc::SIGKILL).is_err());
        assert_eq!(
            PidFd::open(child.id()).map_err(|e| e.raw_os_error()).err(),
            Some(Some(libc::ESRCH))
        );
    }

    #[test]
    fn an_adopted_vmms_exit_is_read_from_its_last_exited_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("vmm.log");
        std::fs::write(
            &log,
            "{\"event\":\"started\"}\n{\"event\":\"exited\",\"outcome\":\"fenced\",\"detail\":\"the fence deadline lapsed\",\"exit_code\":6}\n",
        )
        .expect("write");
        let (exit, clean) = exit_from_log(&log);
        assert_eq!(
            exit, "exit status: 6 (fenced: the fence deadline lapsed)",
            "{exit}"
        );
        assert!(!clean);
        std::fs::write(
            &log,
            "{\"event\":\"exited\",\"outcome\":\"stopped\",\"detail\":\"\",\"exit_code\":0}\n",
        )
        .expect("write");
        assert!(exit_from_log(&log).1);
        std::fs::write(&log, "{\"event\":\"started\"}\n").expect("write");
        assert!(exit_from_log(&log).0.contains("without an exit event"));
    }

    #[test]
    fn incarnations_are_distinct() {
        let a = new_incarnation();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_incarnation());
    }
}
