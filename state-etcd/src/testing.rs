//! A real etcd for tests and benches: one member on a loopback address, its data in a
//! temporary directory, killed (process group) when dropped.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    /// Its client address (`HOST:PORT`).
    pub client: SocketAddr,
    /// Its data directory and log (`etcd.log`).
    pub dir: PathBuf,
}

/// The etcd binary (`CAIRN_ETCD_BIN`, else `etcd` on PATH), or why there is none.
pub fn binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CAIRN_ETCD_BIN") {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "no etcd binary (install Debian's etcd-server, `cargo xtask` does, or set CAIRN_ETCD_BIN)"
                .to_owned()
        })
}

impl Etcd {
    /// Starts etcd on `host` (a loopback address) at `client_port` (peers at the next
    /// port), in a fresh directory under `parent`; waits until it answers.
    pub fn start(host: &str, client_port: u16, parent: &std::path::Path) -> Result<Etcd, String> {
        let binary = binary()?;
        // Both ports must be free: etcd that cannot bind exits, and a connect to the
        // port would then reach whoever holds it (a test's etcd whose peer port was
        // this client port answered for a frozen one in CI).
        for port in [client_port, client_port + 1] {
            std::net::TcpListener::bind((host, port)).map_err(|e| {
                format!("cannot start etcd: {host}:{port} is not free ({e}); pick other ports")
            })?;
        }
        let dir = parent.join(format!("etcd-{host}-{client_port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = std::fs::File::create(dir.join("etcd.log")).map_err(|e| e.to_string())?;
        let client = format!("http://{host}:{client_port}");
        let peer = format!("http://{host}:{}", client_port + 1);
        let child = Command::new(&binary)
            .args(["--name", "cairn-test", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("cairn-test={peer}")])
            .args(["--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let address: SocketAddr = format!("{host}:{client_port}")
            .parse()
            .map_err(|e| format!("{host}:{client_port}: {e}"))?;
        let mut etcd = Etcd {
            child,
            client: address,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline || etcd.child.try_wait().ok().flatten().is_some() {
                let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                return Err(format!(
                    "etcd on {address} did not start:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // It is ours that answers: a child that exited (say, its port was taken in
        // between) is an error, not a running etcd.
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(Some(status)) = etcd.child.try_wait() {
            let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            return Err(format!(
                "etcd on {address} exited ({status}) although the port answered:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        Ok(etcd)
    }

    /// `etcd://HOST:PORT/PREFIX`.
    /// The etcd process's id (to freeze it in a fault test).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `etcd://…/PREFIX` for this etcd.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.client)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
