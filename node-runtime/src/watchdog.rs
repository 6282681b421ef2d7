//! The hardware watchdog (issue 16, item 2): the last line of fencing when the node
//! itself stops working.
//!
//! The VMMs enforce their fence deadlines without the agent ([`vmm::fence`]), but a
//! kernel that hangs, or a host that stops scheduling, enforces nothing. Where the
//! machine has a watchdog device, `cairn-node --watchdog /dev/watchdog` opens it (which
//! arms it) and pets it while the node holds quorum ([`crate::quorum`]); once the
//! node loses quorum it stops petting, and the device resets the machine when its
//! timeout runs out. A graceful exit of the agent disarms it with the magic close
//! (`V` written before closing); a crash does not, so a dead agent on a live kernel
//! also ends in a reset.
//!
//! Never armed by default: the build machines have no watchdog, and one armed on a
//! dev host would reset every dev node at once. `--watchdog` needs `--lease-from`
//! (without a lease the node never holds quorum, and the device would reset the
//! machine at its first timeout). The device's own timeout applies; it must be longer
//! than the lease's renewal interval (T/3) plus [`PET_EVERY`].
//!
//! [`Watchdog`] is the seam: [`DeviceWatchdog`] is the Linux device, [`FakeWatchdog`]
//! records what it was asked for tests.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the node looks at its quorum to pet the watchdog.
pub const PET_EVERY: Duration = Duration::from_millis(500);

/// A watchdog: reset the machine unless petted in time.
pub trait Watchdog: Send + std::fmt::Debug {
    /// Keeps the machine alive for another timeout.
    fn pet(&mut self) -> std::io::Result<()>;
    /// Disarms it (graceful exit: the magic close).
    fn disarm(&mut self) -> std::io::Result<()>;
}

/// The Linux watchdog device (`/dev/watchdog`): armed when opened, petted by any
/// write, disarmed by writing `V` before closing (unless the driver is `nowayout`).
#[derive(Debug)]
pub struct DeviceWatchdog {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl DeviceWatchdog {
    /// Opens (and so arms) the device at `path`.
    pub fn open(path: &Path) -> std::io::Result<DeviceWatchdog> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(DeviceWatchdog {
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let file = self.file.as_mut().ok_or_else(|| {
            std::io::Error::other(format!("watchdog {} was disarmed", self.path.display()))
        })?;
        file.write_all(bytes)?;
        file.flush()
    }
}

impl Watchdog for DeviceWatchdog {
    fn pet(&mut self) -> std::io::Result<()> {
        // Any byte but `V` pets without announcing a close.
        self.write(b"\0")
    }

    fn disarm(&mut self) -> std::io::Result<()> {
        self.write(b"V")?;
        self.file = None;
        Ok(())
    }
}

/// What a [`FakeWatchdog`] was asked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeLog {
    /// Pets so far.
    pub pets: u64,
    /// Whether it was disarmed.
    pub disarmed: bool,
}

/// A watchdog that only records (tests); cloned handles share the log.
#[derive(Debug, Default, Clone)]
pub struct FakeWatchdog {
    log: Arc<Mutex<FakeLog>>,
}

impl FakeWatchdog {
    /// What it was asked so far.
    pub fn log(&self) -> FakeLog {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Watchdog for FakeWatchdog {
    fn pet(&mut self) -> std::io::Result<()> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.disarmed {
            return Err(std::io::Error::other("petted after it was disarmed"));
        }
        log.pets += 1;
        Ok(())
    }

    fn disarm(&mut self) -> std::io::Result<()> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).disarmed = true;
        Ok(())
    }
}

/// One look at the quorum: pets `watchdog` when the node holds quorum now
/// (`holds_until_ns` is later than `now_ns`, both `CLOCK_BOOTTIME`); returns whether it
/// petted.
pub fn tend(
    watchdog: &mut dyn Watchdog,
    holds_until_ns: u64,
    now_ns: u64,
) -> std::io::Result<bool> {
    if holds_until_ns > now_ns {
        watchdog.pet()?;
        return Ok(true);
    }
    Ok(false)
}

/// Pets `watchdog` every [`PET_EVERY`] while `holds_until_ns()` says the node holds
/// quorum, until `stop` turns true: then it is disarmed (the graceful exit).
pub async fn run(
    mut watchdog: Box<dyn Watchdog>,
    holds_until_ns: impl Fn() -> u64 + Send,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut petting = None;
    loop {
        if *stop.borrow() {
            break;
        }
        match tend(
            watchdog.as_mut(),
            holds_until_ns(),
            vmm::fence::boottime_ns(),
        ) {
            Ok(petted) if petting != Some(petted) => {
                petting = Some(petted);
                if petted {
                    eprintln!("cairn-node: watchdog: the node holds quorum; petting it");
                } else {
                    eprintln!(
                        "cairn-node: watchdog: the node does not hold quorum; not petting it (the machine resets at its timeout)"
                    );
                }
            }
            Ok(_) => {}
            Err(error) => eprintln!("cairn-node: watchdog: cannot pet it: {error}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
    }
    if let Err(error) = watchdog.disarm() {
        eprintln!("cairn-node: watchdog: cannot disarm it: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_is_petted_only_while_the_node_holds_quorum() {
        let fake = FakeWatchdog::default();
        let mut watchdog = fake.clone();
        assert!(tend(&mut watchdog, 2_000, 1_000).unwrap());
        assert!(tend(&mut watchdog, 2_000, 1_999).unwrap());
        // At the end of the quorum, and with none at all, it is left to expire.
        assert!(!tend(&mut watchdog, 2_000, 2_000).unwrap());
        assert!(!tend(&mut watchdog, 0, 1).unwrap());
        assert_eq!(
            fake.log(),
            FakeLog {
                pets: 2,
                disarmed: false
            }
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_loop_stops_petting_when_quorum_is_lost_and_disarms_on_a_graceful_exit() {
        let fake = FakeWatchdog::default();
        let holds = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = {
            let holds = holds.clone();
            tokio::spawn(run(
                Box::new(fake.clone()),
                move || holds.load(std::sync::atomic::Ordering::SeqCst),
                Duration::from_millis(20),
                stopped,
            ))
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let while_held = fake.log().pets;
        assert!(
            while_held >= 5,
            "{while_held} pets in 300 ms, one due every 20 ms"
        );
        // Quorum lost: no more pets.
        holds.store(0, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let at_loss = fake.log().pets;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(fake.log().pets, at_loss, "petted without quorum");
        assert!(!fake.log().disarmed);
        // Quorum back: petted again.
        holds.store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(fake.log().pets > at_loss);
        // Graceful exit: the magic close.
        stop.send(true).unwrap();
        task.await.unwrap();
        assert!(fake.log().disarmed);
    }

    #[test]
    fn the_device_is_petted_by_a_write_and_disarmed_by_the_magic_close() {
        // A plain file stands in for /dev/watchdog: what reaches the driver is the bytes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        std::fs::write(&path, b"").unwrap();
        let mut device = DeviceWatchdog::open(&path).unwrap();
        device.pet().unwrap();
        device.pet().unwrap();
        device.disarm().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0V");
        assert!(device.pet().is_err(), "no pet after the magic close");
        assert!(DeviceWatchdog::open(&dir.path().join("none")).is_err());
    }
}
