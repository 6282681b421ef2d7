//! Spawning `cairn-vmm` children, talking to their control sockets, waiting on them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmm::control::{ControlClient, Request, VmStatus};
use vmm::kvm::HostKvm;

/// True when KVM is usable; otherwise prints why `test` skips.
pub fn kvm_available(test: &str) -> bool {
    match HostKvm::detect() {
        HostKvm::Missing => {
            eprintln!("skipping {test}: no usable /dev/kvm on this host");
            false
        }
        HostKvm::Pvm | HostKvm::Hardware => true,
    }
}

/// Polls `condition` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One `cairn-vmm` child with its own VM directory; killed when dropped.
pub struct VmProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl VmProcess {
    /// Spawns `cairn-vmm --vm-dir <tempdir> <args>`.
    pub fn spawn(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::spawn_in(dir, args)
    }

    /// Spawns a 32 MiB VM with two disks in its directory: `disk.img` (1 MiB, as
    /// [`disk_image`] makes it) and `data.img` (`second_bytes` of zeros); returns both
    /// paths.
    pub fn spawn_two_disks(second_bytes: usize) -> (Self, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = disk_image(dir.path(), 1 << 20);
        let second = dir.path().join("data.img");
        std::fs::write(&second, vec![0u8; second_bytes]).expect("second disk");
        let args = [
            "--memory",
            "32MiB",
            "--disk",
            first.to_str().expect("utf-8"),
            "--disk",
            second.to_str().expect("utf-8"),
        ]
        .map(str::to_owned);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (Self::spawn_in(dir, &args), first, second)
    }

    /// Spawns into an existing directory (for disks prepared in it).
    pub fn spawn_in(dir: tempfile::TempDir, args: &[&str]) -> Self {
        Self::spawn_via(&[], dir, args)
    }

    /// Spawns `cairn-vmm` through `prefix` (for example `ip netns exec NAME`, which
    /// execs, so the child is the VMM itself).
    pub fn spawn_via(prefix: &[&str], dir: tempfile::TempDir, args: &[&str]) -> Self {
        let vmm = env!("CARGO_BIN_EXE_cairn-vmm");
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(vmm);
                command
            }
            None => Command::new(vmm),
        };
        let child = command
            .arg("--vm-dir")
            .arg(dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cairn-vmm");
        Self { child, dir }
    }

    /// Spawns `cairn-vmm --config FILE` for `config` (written to `dir/vm.json`); its
    /// console and control socket should be in `dir` for the helpers here to find them.
    pub fn spawn_config(dir: tempfile::TempDir, config: &vm_config::VmConfig) -> Self {
        let path = dir.path().join("vm.json");
        std::fs::write(&path, serde_json::to_string_pretty(config).expect("json"))
            .expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_cairn-vmm"))
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cairn-vmm");
        Self { child, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Connects to the control socket, waiting for the VMM to serve it.
    pub fn client(&mut self) -> ControlClient {
        let socket = self.path("control.sock");
        let mut last_error = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "cairn-vmm exited early with {status}: {}",
                    self.stderr_now()
                );
            }
            match ControlClient::connect(&socket, Duration::from_secs(5)) {
                Ok(client) => return client,
                Err(error) => last_error = error.to_string(),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!(
            "control socket {} never answered: {last_error}",
            socket.display()
        );
    }

    /// Status through a fresh connection.
    pub fn status(&mut self) -> VmStatus {
        self.client().status().expect("status")
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "cairn-vmm did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Everything the VMM printed on stderr (call after it exited).
    pub fn stderr(&mut self) -> String {
        self.stderr_now()
    }

    fn stderr_now(&mut self) -> String {
        use std::io::Read as _;
        let mut text = String::new();
        if let Some(stderr) = self.child.stderr.as_mut() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }

    /// Everything the VMM printed on stdout (call after it exited).
    pub fn stdout(&mut self) -> String {
        use std::io::Read as _;
        let mut text = String::new();
        if let Some(stdout) = self.child.stdout.as_mut() {
            let _ = stdout.read_to_string(&mut text);
        }
        text
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.path("console.log")).unwrap_or_default()
    }

    /// Waits until a status satisfies `condition`; returns that status.
    pub fn wait_status(
        &mut self,
        timeout: Duration,
        mut condition: impl FnMut(&VmStatus) -> bool,
    ) -> VmStatus {
        let mut client = self.client();
        let mut last = client.status().expect("status");
        let found = wait_until(timeout, || {
            last = client.status().expect("status");
            condition(&last)
        });
        assert!(
            found,
            "condition not reached within {timeout:?}; last status: {last:#?}"
        );
        last
    }

    pub fn request(&mut self, request: &Request) -> vmm::control::Response {
        self.client().request(request).expect("request accepted")
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Creates a zeroed disk image of `bytes` in `dir`.
pub fn disk_image(dir: &Path, bytes: u64) -> PathBuf {
    let path = dir.join("disk.img");
    let file = std::fs::File::create(&path).expect("create disk");
    file.set_len(bytes).expect("size disk");
    path
}

/// A network namespace of one test's own (`PREFIX-PID-N`: the tests of this binary run
/// side by side in one process), set up by commands run in it; deleted on drop.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    /// `None` (with the reason printed) where this host cannot make one: needs root and
    /// `/dev/net/tun`. Runs `setup` in it, each command asserted to succeed.
    pub fn new(test: &str, prefix: &str, setup: &[&str]) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping {test}: needs root for a network namespace and taps");
            return None;
        }
        if !Path::new("/dev/net/tun").exists() {
            eprintln!("skipping {test}: no /dev/net/tun");
            return None;
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let index = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{index}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|status| status.success());
        if !made {
            eprintln!("skipping {test}: cannot create a network namespace here");
            return None;
        }
        let namespace = Self { name };
        namespace.run_all(setup);
        Some(namespace)
    }

    /// Runs `command` (split at spaces) in the namespace.
    pub fn run(&self, command: &str) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(command.split_whitespace())
            .output()
            .expect("ip netns exec")
    }

    /// Runs each command, asserting it succeeds.
    pub fn run_all(&self, commands: &[&str]) {
        for command in commands {
            let output = self.run(command);
            assert!(
                output.status.success(),
                "{command}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
