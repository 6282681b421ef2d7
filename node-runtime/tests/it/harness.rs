//! Starting and stopping `cairn-node` processes, and a signed client for them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::auth::{Identity, RequestSigner};
use proto::client::NodeClient;
use proto::v1::{ApplyRequest, ApplyResponse, apply_request::Action};

/// A controller identity shared by a test.
pub fn controller() -> Identity {
    Identity::generate().expect("random source")
}

/// One running `cairn-node` process.
pub struct TestNode {
    pub name: String,
    pub data_dir: PathBuf,
    pub address: String,
    child: Option<Child>,
}

impl TestNode {
    /// Starts a node whose dev-mode controller key file trusts `controller`.
    pub fn start(name: &str, data_dir: &Path, controller: &Identity) -> TestNode {
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::write(
            data_dir.join("trusted-controllers"),
            format!("{} test-controller\n", controller.public_key_hex()),
        )
        .unwrap();
        Self::start_at(name, data_dir, "127.0.0.1:0")
    }

    /// Starts a node like [`TestNode::start`] but listening on loopback address `ip`
    /// (tests that run beside others use their own 127.0.0.x).
    pub fn start_on(name: &str, data_dir: &Path, controller: &Identity, ip: &str) -> TestNode {
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::write(
            data_dir.join("trusted-controllers"),
            format!("{} test-controller\n", controller.public_key_hex()),
        )
        .unwrap();
        Self::start_at(name, data_dir, &format!("{ip}:0"))
    }

    /// Starts (or restarts) a node listening on `listen`.
    pub fn start_at(name: &str, data_dir: &Path, listen: &str) -> TestNode {
        Self::start_with_disks(name, data_dir, listen, 4, 1 << 30)
    }

    /// Starts a node with `disks` file disks of `capacity` bytes each.
    pub fn start_with_disks(
        name: &str,
        data_dir: &Path,
        listen: &str,
        disks: u32,
        capacity: u64,
    ) -> TestNode {
        let disks = disks.to_string();
        let capacity = capacity.to_string();
        Self::start_with_args(
            name,
            data_dir,
            listen,
            &["--disks", &disks, "--disk-capacity", &capacity],
        )
    }

    /// Starts a node with extra command-line arguments.
    pub fn start_with_args(name: &str, data_dir: &Path, listen: &str, extra: &[&str]) -> TestNode {
        Self::start_with_env(name, data_dir, listen, extra, &[])
    }

    /// Starts a node with extra command-line arguments and environment variables.
    pub fn start_with_env(
        name: &str,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> TestNode {
        let address_file = data_dir.join("listen-address");
        let _ = std::fs::remove_file(&address_file);
        let log = std::fs::File::create(data_dir.join("node.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-node"))
            .args(["--name", name, "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn cairn-node");
        let deadline = Instant::now() + Duration::from_secs(20);
        let address = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file)
                && text.ends_with('\n')
            {
                break text.trim().to_string();
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "cairn-node {name} exited with {status} before listening:\n{}",
                    std::fs::read_to_string(data_dir.join("node.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "cairn-node {name} did not start within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        *live_agents().entry(data_dir.to_path_buf()).or_default() += 1;
        TestNode {
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            address,
            child: Some(child),
        }
    }

    /// The node's public key (from its data directory).
    pub fn public_key_hex(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("identity.pub"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A signed client.
    pub async fn client(&self, identity: &Identity) -> NodeClient {
        NodeClient::connect(&self.address, RequestSigner::new(identity.clone()))
            .await
            .expect("connect to node")
    }

    /// The node's process id (0 once it was stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as a crash.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: kill takes a pid and a signal number; it has no memory effects.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("node.log")).unwrap_or_default()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill_9();
        // VMMs outlive their agent (it adopts them when it comes back): once no test
        // agent of this data directory is left, its VMMs are killed too.
        let mut live = live_agents();
        let count = live.entry(self.data_dir.clone()).or_default();
        *count = count.saturating_sub(1);
        if *count == 0 {
            live.remove(&self.data_dir);
            kill_vmms_of(&self.data_dir);
        }
    }
}

/// Test agents alive per data directory.
fn live_agents() -> std::sync::MutexGuard<'static, std::collections::HashMap<PathBuf, usize>> {
    static LIVE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<PathBuf, usize>>> =
        std::sync::OnceLock::new();
    LIVE.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// SIGKILLs every `cairn-vmm --config DATA_DIR/vms/...` process.
pub fn kill_vmms_of(data_dir: &Path) {
    for pid in reconciler::state::vmms_under(&data_dir.join("vms")) {
        // SAFETY: kill takes a pid and a signal number; it has no memory effects.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// An `ApplyRequest` with a fresh-looking id.
pub fn request(id: &str, action: Action) -> ApplyRequest {
    ApplyRequest {
        request_id: id.to_string(),
        action: Some(action),
    }
}

/// Applies and panics with the status on failure.
pub async fn apply_ok(client: &mut NodeClient, id: &str, action: Action) -> ApplyResponse {
    match client.apply(request(id, action)).await {
        Ok(response) => response,
        Err(status) => panic!(
            "apply {id} failed: {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
