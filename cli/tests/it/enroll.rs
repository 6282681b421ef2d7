//! Node enrollment by a one-time token with real processes (issue 24, item 7): a
//! `cairn controller` on 127.0.0.72 (gRPC listener), `cairn node token create`, and
//! `cairn-node --enroll` processes on 127.0.0.73: a node enrolls and then obeys the
//! controller's key; the same token again, an expired token and a token for another
//! node are refused with the reason, and the refused node does not start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{TempDir, cairn};

const CONTROLLER_IP: &str = "127.0.0.72";
const NODE_IP: &str = "127.0.0.73";

/// A port free on `ip` (see `crate::ports`).
pub(crate) fn free_port(ip: &str) -> u16 {
    crate::ports::free_port_on(ip)
}

pub(crate) fn node_binary() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_cairn")).with_file_name("cairn-node")
}

/// A process killed when dropped.
pub(crate) struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .stdout(Stdio::null())
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?}");
}

/// A controller following an empty repository, its gRPC listener at the returned
/// address, its data directory `dir/.cairn`.
pub(crate) fn controller(dir: &Path) -> (Process, String) {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(
        &repo,
        &[
            "-c",
            "commit.gpgsign=false",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "empty",
        ],
    );
    let data = dir.join(".cairn");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("allowed-signers"), "").unwrap();
    let grpc = format!("{CONTROLLER_IP}:{}", free_port(CONTROLLER_IP));
    let log = std::fs::File::create(dir.join("controller.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["controller", "--repo"])
        .arg(&repo)
        .args(["--data-dir", ".cairn", "--listen"])
        .arg(format!("{CONTROLLER_IP}:0"))
        .args(["--grpc-listen", &grpc])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cairn controller starts");
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&grpc).is_err() || !data.join("controller.url").exists() {
        assert!(
            Instant::now() < deadline,
            "the controller's gRPC listener {grpc} did not open: {}",
            std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (process, grpc)
}

/// `cairn node token create NODE --ttl TTL` for the controller of `dir`.
pub(crate) fn token(dir: &Path, node: &str, ttl: &str) -> String {
    let run = cairn(dir, &["node", "token", "create", node, "--ttl", ttl]);
    assert_eq!(run.code, 0, "{run:?}");
    let token = run.stdout.trim().to_owned();
    assert!(token.starts_with("cairn-enroll-"), "{run:?}");
    token
}

/// `cairn-node --name NAME --enroll TOKEN --controller GRPC` in `data`.
pub(crate) fn enrolling_node(data: &Path, name: &str, token: &str, grpc: &str) -> Child {
    Command::new(node_binary())
        .args(["--name", name, "--listen"])
        .arg(format!("{NODE_IP}:0"))
        .arg("--data-dir")
        .arg(data)
        .args(["--enroll", token, "--controller", grpc])
        .args(["--network-disabled", "enrollment test", "--cgroups", "off"])
        .args(["--disks", "1", "--disk-capacity", "16777216"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cairn-node starts")
}

/// Waits for a node to write its listen address; panics with its stderr if it exits.
pub(crate) fn serving(child: &mut Child, data: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(address) = std::fs::read_to_string(data.join("listen-address")) {
            return address.trim().to_owned();
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            use std::io::Read as _;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!("cairn-node exited with {status}: {stderr}");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = std::mem::replace(child, Command::new("true").spawn().expect("true runs"));
            let stderr = out.wait_with_output().map(|o| o.stderr).unwrap_or_default();
            panic!(
                "cairn-node did not serve within 60 s: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a node that must refuse to start: its exit code and stderr.
fn refused(data: &Path, name: &str, token: &str, grpc: &str) -> (i32, String) {
    let child = enrolling_node(data, name, token, grpc);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_node_enrolls_once_by_token_and_a_reused_expired_or_misdirected_token_is_refused() {
    let dir = TempDir::new("enroll");
    let (_controller, grpc) = controller(&dir.0);
    let controller_key = std::fs::read_to_string(dir.0.join(".cairn/controller.pub")).unwrap();

    // Enrolls, then serves, and obeys the controller's key.
    let token = token(&dir.0, "lab-4", "15m");
    let first = dir.0.join("lab-4");
    let mut node = Process(enrolling_node(&first, "lab-4", &token, &grpc));
    let address = serving(&mut node.0, &first);
    let trusted = std::fs::read_to_string(first.join("trusted-controllers")).unwrap();
    assert!(trusted.contains(controller_key.trim()), "{trusted}");
    let identity = proto::auth::Identity::load(&dir.0.join(".cairn/controller.key")).unwrap();
    let inventory = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client =
            proto::client::NodeClient::connect(&address, proto::auth::RequestSigner::new(identity))
                .await
                .unwrap();
        client.get_inventory().await
    });
    let inventory = inventory.expect("the enrolled node accepts the controller's signature");
    assert_eq!(inventory.node_name, "lab-4");
    let node_key = std::fs::read_to_string(first.join("identity.pub")).unwrap();
    let keys = cairn(&dir.0, &["node", "keys"]);
    assert!(
        keys.stdout
            .contains(&format!("lab-4 {} (token)", node_key.trim())),
        "{keys:?}"
    );

    // The same token again (a second machine calling itself lab-4): refused.
    let (code, stderr) = refused(&dir.0.join("lab-4-again"), "lab-4", &token, &grpc);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("was already used") && stderr.contains("cairn node token create lab-4"),
        "{stderr}"
    );
    assert!(!dir.0.join("lab-4-again/trusted-controllers").exists());

    // An expired token: refused.
    let short = self::token(&dir.0, "lab-5", "1s");
    std::thread::sleep(Duration::from_millis(1200));
    let (code, stderr) = refused(&dir.0.join("lab-5"), "lab-5", &short, &grpc);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");

    // A token made for another node: refused, and still good for its own node.
    let other = self::token(&dir.0, "lab-6", "15m");
    let (code, stderr) = refused(&dir.0.join("lab-7"), "lab-7", &other, &grpc);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is for node lab-6, not lab-7"), "{stderr}");

    // The enrolled node restarts with the same command line: it does not enroll again.
    drop(node);
    let _ = std::fs::remove_file(first.join("listen-address"));
    let mut again = Process(enrolling_node(&first, "lab-4", &token, &grpc));
    serving(&mut again.0, &first);
}

/// Pushes `keys` to the node at `address` (`target`), signed by `signer`.
async fn push_keys(
    address: &str,
    target: &proto::auth::NodeTarget,
    signer: &proto::auth::Identity,
    keys: &[(&proto::auth::Identity, &str)],
) -> Result<Vec<proto::v1::ControllerKey>, String> {
    let mut client = proto::client::NodeClient::connect(
        address,
        proto::auth::RequestSigner::new(signer.clone()),
    )
    .await
    .unwrap()
    .with_target(target.clone());
    client
        .set_controller_keys(
            keys.iter()
                .map(|(key, name)| proto::v1::ControllerKey {
                    public_key_hex: key.public_key_hex(),
                    name: (*name).to_owned(),
                })
                .collect(),
        )
        .await
        .map_err(|status| status.message().to_owned())
}

/// One Observe call signed by `key` for `target`.
async fn observe_with(
    address: &str,
    target: &proto::auth::NodeTarget,
    key: &proto::auth::Identity,
) -> Result<(), String> {
    let mut client =
        proto::client::NodeClient::connect(address, proto::auth::RequestSigner::new(key.clone()))
            .await
            .unwrap()
            .with_target(target.clone());
    client
        .observe()
        .await
        .map(|_| ())
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
}

#[test]
fn controller_keys_rotate_without_a_refused_request_and_a_revoked_key_is_refused_by_a_real_node() {
    use proto::auth::{Identity, NodeTarget};
    let dir = TempDir::new("rotate");
    let (_controller, grpc) = controller(&dir.0);
    let token = token(&dir.0, "lab-4", "15m");
    let data = dir.0.join("lab-4");
    let mut node = Process(enrolling_node(&data, "lab-4", &token, &grpc));
    let address = serving(&mut node.0, &data);
    let old = Identity::load(&dir.0.join(".cairn/controller.key")).unwrap();
    let new = Identity::generate().unwrap();
    let recovery = Identity::generate().unwrap();
    let node_key = std::fs::read_to_string(data.join("identity.pub")).unwrap();
    let target = NodeTarget::new("lab-4", node_key.trim()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();

    runtime.block_on(async {
        // Requests keep coming, signed by whichever key the controller signs with now,
        // while the set is pushed, signing switches, and the old key is retired.
        let signing = std::sync::Arc::new(std::sync::Mutex::new(old.clone()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let traffic = {
            let (signing, stop, address, target) = (
                signing.clone(),
                stop.clone(),
                address.clone(),
                target.clone(),
            );
            tokio::spawn(async move {
                let mut calls = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let key = signing.lock().unwrap().clone();
                    if let Err(status) = observe_with(&address, &target, &key).await {
                        return Err(format!("call {calls} refused: {status}"));
                    }
                    calls += 1;
                }
                Ok(calls)
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // 1. Add the next key (and an offline recovery key), signed by the old one.
        let set = push_keys(
            &address,
            &target,
            &old,
            &[
                (&old, "controller"),
                (&new, "controller-next"),
                (&recovery, "recovery"),
            ],
        )
        .await
        .expect("the old key pushes the set with the next key");
        assert_eq!(set.len(), 3);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // 2. Sign with the new key.
        *signing.lock().unwrap() = new.clone();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // 3. Retire the old key, signed by the new one.
        push_keys(
            &address,
            &target,
            &new,
            &[(&new, "controller"), (&recovery, "recovery")],
        )
        .await
        .expect("the new key retires the old one");
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let calls = traffic
            .await
            .unwrap()
            .expect("no request refused during the rotation");
        assert!(calls > 5, "only {calls} calls during the rotation");
        eprintln!("{calls} requests during the rotation, none refused");

        // The revoked key is refused, naming it.
        let refused = observe_with(&address, &target, &old).await.unwrap_err();
        assert!(
            refused.starts_with("Unauthenticated") && refused.contains("not trusted"),
            "{refused}"
        );
        // A set that leaves out its own signer is refused (revoke with another key).
        let locked_out = push_keys(&address, &target, &new, &[(&recovery, "recovery")])
            .await
            .unwrap_err();
        assert!(
            locked_out.contains("leaves out the key that signed it"),
            "{locked_out}"
        );
        // A revoked key cannot push a set either.
        assert!(
            push_keys(&address, &target, &old, &[(&old, "controller")])
                .await
                .is_err()
        );
    });

    // After a restart (kill -9) the node still refuses the revoked key.
    drop(node);
    let _ = std::fs::remove_file(data.join("listen-address"));
    let mut node = Process(enrolling_node(&data, "lab-4", &token, &grpc));
    let address = serving(&mut node.0, &data);
    runtime.block_on(async {
        assert!(observe_with(&address, &target, &old).await.is_err());
        observe_with(&address, &target, &new)
            .await
            .expect("the current key after a restart");
        // controller.key is lost: the offline recovery key installs a new one.
        let replacement = Identity::generate().unwrap();
        push_keys(
            &address,
            &target,
            &recovery,
            &[(&replacement, "controller"), (&recovery, "recovery")],
        )
        .await
        .expect("the recovery key replaces a lost controller key");
        observe_with(&address, &target, &replacement)
            .await
            .expect("the replacement key is trusted");
        assert!(observe_with(&address, &target, &new).await.is_err());
    });
}
