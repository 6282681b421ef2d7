//! The heartbeat log: when this incarnation of a VM first and last heartbeated, on the
//! host's clocks, so that "a VM never runs twice" can be checked from files after the
//! fact instead of by sampling processes (a stopped VMM still exists, and a short
//! overlap slips between samples).
//!
//! Each VMM process is one incarnation, named `PID-BOOTTIME_NS` (its pid and the
//! `CLOCK_BOOTTIME` of its start: unique on one host). It keeps one small file,
//! `heartbeats/INCARNATION` beside its control socket (the VM's directory), of two
//! fixed-width lines:
//!
//! ```text
//! first REALTIME_NS BOOTTIME_NS
//! last  REALTIME_NS BOOTTIME_NS
//! ```
//!
//! (20 digits each, `CLOCK_REALTIME` and `CLOCK_BOOTTIME` in ns). `first` is written at
//! the first heartbeat; `last` is rewritten in place (`pwrite`) at every heartbeat, so
//! the file holds the last one even after a SIGKILL (it is in the page cache). The
//! clocks are read before the fence check: a heartbeat handled at or after the fence
//! deadline is not recorded (the VMM is stopping, like a frame it drops at the tap),
//! so a VMM frozen between a guest's heartbeat and its handling never records it late.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::fence::{Fence, boottime_ns};

/// Bytes of one line: a 5-character tag, 2 × (space + 20 digits), newline.
const LINE: u64 = 5 + 2 * 21 + 1;

/// Nanoseconds of `CLOCK_REALTIME` now.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One incarnation's heartbeat file.
#[derive(Debug)]
pub struct HeartbeatLog {
    file: Mutex<(File, bool)>,
    path: PathBuf,
}

impl HeartbeatLog {
    /// Creates `DIR/heartbeats/PID-BOOTTIME_NS` for this process.
    pub fn create(vm_dir: &Path) -> std::io::Result<HeartbeatLog> {
        let dir = vm_dir.join("heartbeats");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}-{}", std::process::id(), boottime_ns()));
        let file = File::create(&path)?;
        Ok(HeartbeatLog {
            file: Mutex::new((file, false)),
            path,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A guest heartbeat arrived now. Errors are ignored: the log is an observation,
    /// and a full disk must not stop a VM.
    pub fn record(&self, fence: &Fence) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (realtime, boottime) = (realtime_ns(), boottime_ns());
        if fence.lapsed_at_ns().is_some() || fence.deadline_ns().is_some_and(|d| boottime >= d) {
            return;
        }
        let line = |tag: &str| format!("{tag:<5} {realtime:020} {boottime:020}\n");
        if !file.1 {
            let _ = file.0.write_all_at(line("first").as_bytes(), 0);
            file.1 = true;
        }
        let _ = file.0.write_all_at(line("last").as_bytes(), LINE);
    }
}

/// One incarnation's first and last heartbeat, read back (realtime, boottime ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The first heartbeat: (`CLOCK_REALTIME`, `CLOCK_BOOTTIME`) ns.
    pub first: (u64, u64),
    /// The last heartbeat recorded, the same way.
    pub last: (u64, u64),
}

/// Reads a heartbeat file; None when it holds no heartbeat yet or is not one.
pub fn read(path: &Path) -> Option<Recorded> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let mut parse = |tag: &str| -> Option<(u64, u64)> {
        let mut fields = lines.next()?.split_whitespace();
        (fields.next()? == tag).then_some(())?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    };
    Some(Recorded {
        first: parse("first")?,
        last: parse("last")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stays_last_moves_and_nothing_is_recorded_past_the_fence() {
        let dir = std::env::temp_dir().join(format!("cairn-hb-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = HeartbeatLog::create(&dir).expect("create");
        assert_eq!(read(log.path()), None, "no heartbeat yet");
        let fence = Fence::default();
        log.record(&fence);
        let one = read(log.path()).expect("one heartbeat");
        assert_eq!(one.first, one.last);
        std::thread::sleep(std::time::Duration::from_millis(2));
        log.record(&fence);
        let two = read(log.path()).expect("two heartbeats");
        assert_eq!(two.first, one.first);
        assert!(
            two.last.0 > one.last.0 && two.last.1 > one.last.1,
            "{two:?}"
        );
        // Armed with a deadline in the past: the heartbeat is not recorded.
        fence.set(boottime_ns() - 1).expect("set");
        log.record(&fence);
        assert_eq!(read(log.path()), Some(two));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
