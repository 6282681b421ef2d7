//! What the node benches share: `cairn-node` processes on loopback that trust one
//! controller and each other, the bench directory and runtime, medians, Apply.

#![allow(dead_code)] // each bench uses its part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::auth::{Identity, RequestSigner};
use proto::client::NodeClient;
use proto::v1::{ApplyRequest, Peer, SetPeers, apply_request::Action};

/// A `cairn-node` process, killed and reaped on drop (also if it never started).
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub address: String,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// Starts a node listening on `listen` with `disks` file disks of `capacity` bytes
    /// whose dev-mode controller key file trusts `controller`.
    pub fn start(
        name: &str,
        dir: &Path,
        controller: &Identity,
        listen: &str,
        disks: u32,
        capacity: u64,
    ) -> Node {
        Self::start_with(name, dir, controller, listen, disks, capacity, &[])
    }

    /// [`Node::start`] with extra command-line arguments.
    pub fn start_with(
        name: &str,
        dir: &Path,
        controller: &Identity,
        listen: &str,
        disks: u32,
        capacity: u64,
        extra: &[&str],
    ) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let trusted = format!("{}\n", controller.public_key_hex());
        std::fs::write(dir.join("trusted-controllers"), trusted).unwrap();
        // `CAIRN_BENCH_NODE_BINARY=PATH`: another build of cairn-node (a saved copy of
        // the one before a change), so one bench binary compares both.
        let binary = std::env::var_os("CAIRN_BENCH_NODE_BINARY")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_cairn-node").into());
        let child = Command::new(binary)
            .args(["--name", name, "--listen", listen, "--data-dir"])
            .arg(dir)
            .args(["--disks", &disks.to_string()])
            .args(["--disk-capacity", &capacity.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cairn-node");
        let mut node = Node {
            name: name.into(),
            dir: dir.into(),
            address: String::new(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.address.is_empty() {
            match std::fs::read_to_string(dir.join("listen-address")) {
                Ok(text) if text.ends_with('\n') => node.address = text.trim().into(),
                _ => {
                    assert!(Instant::now() < deadline, "node {name} did not start");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        node
    }

    /// The node as a peer of the others.
    pub fn peer(&self) -> Peer {
        Peer {
            name: self.name.clone(),
            address: self.address.clone(),
            public_key_hex: std::fs::read_to_string(self.dir.join("identity.pub"))
                .unwrap()
                .trim()
                .into(),
        }
    }
}

/// The bench's directory (under `CAIRN_BENCH_DIR`, else /var/tmp: a disk, not tmpfs),
/// a multi-threaded runtime and a controller identity.
pub fn setup() -> (tempfile::TempDir, tokio::runtime::Runtime, Identity) {
    let base = tempfile::tempdir_in(
        std::env::var_os("CAIRN_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()),
    )
    .unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    (base, runtime, Identity::generate().unwrap())
}

/// Makes every node a peer of every other.
pub async fn push_peers(nodes: &[&Node], signer: &RequestSigner) {
    let peers: Vec<Peer> = nodes.iter().map(|node| node.peer()).collect();
    for node in nodes {
        let mut client = NodeClient::connect(&node.address, signer.clone())
            .await
            .unwrap();
        let set = Action::SetPeers(SetPeers {
            peers: peers.clone(),
        });
        apply(&mut client, "peers".into(), set).await;
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub async fn apply(
    client: &mut NodeClient,
    id: String,
    action: Action,
) -> proto::v1::ApplyResponse {
    client
        .apply(ApplyRequest {
            request_id: id,
            action: Some(action),
        })
        .await
        .expect("apply")
}
