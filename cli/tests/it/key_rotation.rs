//! `cairn controller key rotate|revoke` with real processes (issue 24, item 7): a
//! `cairn controller` following a signed spec of two nodes, and two enrolled
//! `cairn-node` processes renewing their leases with it, all on 127.0.0.58 (this
//! test's address; ports drawn free). A rotation with a node down stops before the
//! switch and names the node; the controller is killed (-9) and restarted, the node
//! comes back, and the same command resumes and finishes the rotation, while the
//! nodes keep renewing, none refused. Then the old key is refused by the nodes and,
//! as a renewal's address, by the controller; the audit chain verifies across the
//! change; a recovery key is revoked everywhere.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::enroll::{Process, free_port, git, node_binary, token};
use crate::{TempDir, cairn};

const IP: &str = "127.0.0.58";

struct Setup {
    dir: TempDir,
    grpc: String,
    ports: [u16; 2],
    ssh_key: std::path::PathBuf,
}

/// `cairn controller` following the test's repository, on its addresses.
fn controller_command(setup: &Setup) -> Command {
    let dir = &setup.dir.0;
    let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
    command
        .args(["controller", "--repo"])
        .arg(dir.join("repo"))
        .args(["--data-dir", ".cairn", "--listen"])
        .arg(format!("{IP}:0"))
        .args(["--grpc-listen", &setup.grpc, "--poll", "2s"])
        .current_dir(dir)
        .stdin(Stdio::null());
    command
}

fn controller(setup: &Setup) -> Process {
    let dir = &setup.dir.0;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("controller.log"))
        .unwrap();
    let child = controller_command(setup)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cairn controller starts");
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let _ = std::fs::remove_file(dir.join(".cairn/controller.url"));
    while std::net::TcpStream::connect(&setup.grpc).is_err()
        || !dir.join(".cairn/controller.url").exists()
    {
        assert!(
            Instant::now() < deadline,
            "the controller did not start: {}",
            std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    process
}

fn node(setup: &Setup, index: usize, token: &str) -> Process {
    node_with(setup, index, token, &[])
}

fn node_with(setup: &Setup, index: usize, token: &str, extra: &[&str]) -> Process {
    match start_node(setup, index, token, extra) {
        Ok(process) => process,
        Err(log) => panic!("{log}"),
    }
}

/// Starts node `index` (enrolling with `token` if it has not); `Err` is its log when
/// it exited before serving.
fn start_node(setup: &Setup, index: usize, token: &str, extra: &[&str]) -> Result<Process, String> {
    let name = format!("lab-{}", index + 1);
    let data = setup.dir.0.join(&name);
    std::fs::create_dir_all(&data).unwrap();
    let _ = std::fs::remove_file(data.join("listen-address"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(setup.dir.0.join(format!("{name}.log")))
        .unwrap();
    let child = Command::new(node_binary())
        .args(["--name", &name, "--listen"])
        .arg(format!("{IP}:{}", setup.ports[index]))
        .arg("--data-dir")
        .arg(&data)
        .args(["--enroll", token, "--lease-from", &setup.grpc])
        .args([
            "--network-disabled",
            "key rotation test",
            "--cgroups",
            "off",
        ])
        .args(["--disks", "1", "--disk-capacity", "16777216"])
        .args(extra)
        .env("CAIRN_QUORUM_TRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("cairn-node starts");
    let mut process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !data.join("listen-address").exists() {
        if let Ok(Some(status)) = process.0.try_wait() {
            return Err(format!(
                "{name} exited with {status}: {}",
                log_of(setup, &name)
            ));
        }
        assert!(Instant::now() < deadline, "{name} did not serve");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(process)
}

fn log_of(setup: &Setup, name: &str) -> String {
    std::fs::read_to_string(setup.dir.0.join(format!("{name}.log"))).unwrap_or_default()
}

/// The renewal outcomes a node's trace printed after byte `from` of its log.
fn renewals(setup: &Setup, name: &str, from: usize) -> Vec<String> {
    let log = log_of(setup, name);
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once("; renewal ").map(|(_, rest)| rest))
        .map(|rest| rest.split("; lease ").next().unwrap_or(rest).to_owned())
        .collect()
}

/// Whether a renewal outcome is a refusal (of the address, key or signature), not a
/// timeout of a loaded machine.
fn refusal(outcome: &str) -> bool {
    [
        "addressed",
        "trusted",
        "signature",
        "denied",
        "Unauthenticated",
        "refused",
    ]
    .iter()
    .any(|word| outcome.contains(word))
}

/// Waits until both nodes' renewals are granted (the commit is applied).
fn wait_granted(setup: &Setup) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let marks = [log_of(setup, "lab-1").len(), log_of(setup, "lab-2").len()];
    loop {
        let granted = ["lab-1", "lab-2"]
            .iter()
            .zip(marks)
            .all(|(name, mark)| renewals(setup, name, mark).iter().any(|r| r == "granted"));
        if granted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes' renewals were not granted: {}\n{}\ncontroller: {}",
            log_of(setup, "lab-1"),
            log_of(setup, "lab-2"),
            std::fs::read_to_string(setup.dir.0.join("controller.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rotate(setup: &Setup) -> crate::Run {
    let key = setup.ssh_key.display().to_string();
    cairn(
        &setup.dir.0,
        &[
            "controller",
            "key",
            "rotate",
            "--key",
            &key,
            "--format",
            "json",
        ],
    )
}

fn read_key(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

fn trusted(setup: &Setup, name: &str) -> String {
    std::fs::read_to_string(setup.dir.0.join(name).join("trusted-controllers")).unwrap()
}

/// Both nodes trust every key of `keys` and not `gone`.
fn trusted_everywhere(setup: &Setup, keys: &[&str], gone: &str) {
    for name in ["lab-1", "lab-2"] {
        let set = trusted(setup, name);
        assert!(
            keys.iter().all(|k| set.contains(k)) && !set.contains(gone),
            "{name}: {set}"
        );
    }
}

/// One lease renewal of `name`, signed with its key, addressed to the controller key
/// `to`.
async fn renew_addressed_to(setup: &Setup, name: &str, to: &str) -> Result<(), String> {
    let identity = proto::auth::Identity::load(&setup.dir.0.join(name).join("identity.key"))
        .expect("the node's key");
    let signer = proto::auth::RequestSigner::new(identity);
    let target = proto::auth::NodeTarget::new("controller", to).unwrap();
    let request = signer
        .sign(
            proto::methods::RENEW_LEASE,
            &target,
            proto::v1::RenewLeaseRequest {
                node: name.to_owned(),
                incarnation: "key-rotation-test".into(),
                ..Default::default()
            },
        )
        .unwrap();
    proto::v1::lease_client::LeaseClient::connect(format!("http://{}", setup.grpc))
        .await
        .map_err(|e| e.to_string())?
        .renew(request)
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[test]
fn the_controller_key_rotates_through_a_node_outage_and_a_kill_9_without_a_refused_renewal() {
    for tool in ["git", "ssh-keygen"] {
        assert!(crate::controller::have(tool), "{tool} is needed");
    }
    let dir = TempDir::new("key-rotation");
    let ssh_key = dir.0.join("ops");
    crate::controller::run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f"])
            .arg(&ssh_key),
    );
    let setup = Setup {
        grpc: format!("{IP}:{}", free_port(IP)),
        ports: [free_port(IP), free_port(IP)],
        ssh_key: ssh_key.clone(),
        dir,
    };
    let root = &setup.dir.0;
    // The signed spec: two nodes on this test's address.
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("cluster.kdl"),
        format!(
            "node-class \"small\" {{\n    cpu 2\n    memory \"1GiB\"\n    disk \"disk0\" size=\"16MiB\" class=\"ssd\"\n    nic \"eth0\" speed=\"1Gbps\"\n}}\n\nsite \"lab\" {{\n    failure-detect after=\"3s\"\n    rack \"r1\" {{\n        node \"lab-1\" class=\"small\" address=\"{IP}:{}\"\n        node \"lab-2\" class=\"small\" address=\"{IP}:{}\"\n    }}\n}}\n",
            setup.ports[0], setup.ports[1]
        ),
    )
    .unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    let signing = format!("user.signingkey={}", ssh_key.display());
    git(
        &repo,
        &[
            "-c",
            "gpg.format=ssh",
            "-c",
            &signing,
            "commit",
            "-q",
            "-S",
            "-m",
            "two nodes",
        ],
    );
    let data = root.join(".cairn");
    std::fs::create_dir_all(&data).unwrap();
    let public = std::fs::read_to_string(ssh_key.with_extension("pub")).unwrap();
    std::fs::write(
        data.join("allowed-signers"),
        format!("ops@example.com {public}"),
    )
    .unwrap();
    // Two offline recovery keys in the set the nodes are told to trust: the first is
    // revoked below, the second replaces a lost controller key at the end.
    let recovery = proto::auth::Identity::generate().unwrap();
    let offsite = proto::auth::Identity::generate().unwrap();
    let mut controller_process = controller(&setup);
    let old = read_key(&data.join("controller.pub"));
    let old_secret = proto::auth::Identity::load(&data.join("controller.key")).unwrap();
    std::fs::write(
        data.join("controller-keys"),
        format!(
            "{old} controller\n{} recovery\n{} recovery-offsite\n",
            recovery.public_key_hex(),
            offsite.public_key_hex()
        ),
    )
    .unwrap();
    let tokens = [token(root, "lab-1", "15m"), token(root, "lab-2", "15m")];
    let mut nodes = vec![node(&setup, 0, &tokens[0]), node(&setup, 1, &tokens[1])];
    wait_granted(&setup);
    assert!(trusted(&setup, "lab-1").contains(&recovery.public_key_hex()));

    // lab-2 is down: the rotation adds the next key on lab-1, names lab-2, switches
    // nothing.
    drop(nodes.pop());
    let run = rotate(&setup);
    assert_eq!(run.code, 1, "{run:?}");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["phase"], "adding", "{run:?}");
    assert_eq!(report["missed"][0]["node"], "lab-2", "{run:?}");
    assert_eq!(report["pushed"][0], "lab-1", "{run:?}");
    assert_eq!(
        read_key(&data.join("controller.pub")),
        old,
        "nothing switched"
    );
    let next = report["to"].as_str().unwrap().to_owned();
    assert!(trusted(&setup, "lab-1").contains(&next));
    assert!(trusted(&setup, "lab-1").contains(&old));

    // The controller is killed (-9) and started again; lab-2 comes back.
    let _ = controller_process.0.kill();
    let _ = controller_process.0.wait();
    controller_process = controller(&setup);
    nodes.push(node(&setup, 1, &tokens[1]));
    wait_granted(&setup);

    // Run again: it resumes the same rotation and finishes it while both nodes renew.
    let marks = [log_of(&setup, "lab-1").len(), log_of(&setup, "lab-2").len()];
    let started = Instant::now();
    let run = rotate(&setup);
    let took = started.elapsed();
    assert_eq!(run.code, 0, "{run:?}");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["phase"], "done", "{run:?}");
    assert_eq!(report["to"].as_str(), Some(next.as_str()), "{run:?}");
    assert_eq!(read_key(&data.join("controller.pub")), next);
    assert!(!data.join("controller.key.old").exists());
    assert!(!data.join("controller-key-rotation.json").exists());
    trusted_everywhere(&setup, &[&next, &recovery.public_key_hex()], &old);
    // Renewals go on, addressed to the new key, and none was refused.
    std::thread::sleep(Duration::from_secs(4));
    for (name, mark) in ["lab-1", "lab-2"].iter().zip(marks) {
        let seen = renewals(&setup, name, mark);
        let granted = seen.iter().filter(|r| *r == "granted").count();
        assert!(granted >= 3, "{name}: {seen:?}");
        assert!(
            !seen.iter().any(|r| refusal(r)),
            "{name}: a renewal was refused during the rotation ({} ms): {seen:?}",
            took.as_millis()
        );
    }
    eprintln!(
        "rotation resumed and finished in {} ms; renewals after it: lab-1 {}, lab-2 {}, all granted",
        took.as_millis(),
        renewals(&setup, "lab-1", marks[0]).len(),
        renewals(&setup, "lab-2", marks[1]).len()
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // The controller accepts a renewal addressed to its key, refuses one addressed
        // to the retired key.
        renew_addressed_to(&setup, "lab-1", &next)
            .await
            .expect("a renewal addressed to the new key");
        let refused = renew_addressed_to(&setup, "lab-1", &old).await.unwrap_err();
        assert!(
            refused.starts_with("Unauthenticated") && refused.contains("addressed"),
            "{refused}"
        );
    });
    let address = std::fs::read_to_string(root.join("lab-1/listen-address")).unwrap();
    let observe_with = |key: &proto::auth::Identity| {
        runtime.block_on(async {
            let signer = proto::auth::RequestSigner::new(key.clone());
            let mut client = proto::client::NodeClient::connect(address.trim(), signer)
                .await
                .unwrap();
            client
                .observe()
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_owned())
        })
    };
    // The nodes refuse the retired key; the recovery key is still trusted.
    let refused = observe_with(&old_secret).unwrap_err();
    assert!(refused.contains("not trusted"), "{refused}");
    observe_with(&recovery).expect("the recovery key is trusted");

    // The audit chain verifies across the change.
    let verify = cairn(root, &["audit", "verify"]);
    assert_eq!(verify.code, 0, "{verify:?}");
    assert!(
        verify.stdout.contains(&old[..16]) || verify.stdout.contains(&old),
        "{verify:?}"
    );

    // Revoking the signing key is refused; revoking the recovery key reaches every node.
    let key = setup.ssh_key.display().to_string();
    let run = cairn(root, &["controller", "key", "revoke", &next, "--key", &key]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("rotate it"), "{run:?}");
    let run = cairn(
        root,
        &[
            "controller",
            "key",
            "revoke",
            &recovery.public_key_hex(),
            "--key",
            &key,
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    for name in ["lab-1", "lab-2"] {
        assert!(!trusted(&setup, name).contains(&recovery.public_key_hex()));
    }
    let refused = observe_with(&recovery).unwrap_err();
    assert!(refused.contains("not trusted"), "{refused}");

    // lab-1's own key is rotated by an agent restart with --rotate-key: the controller
    // pins the new key (`cairn node keys`), and its renewals are granted with it.
    let before = read_key(&root.join("lab-1/identity.pub"));
    drop(nodes.remove(0));
    let mark = log_of(&setup, "lab-1").len();
    let lab1 = node_with(&setup, 0, &tokens[0], &["--rotate-key"]);
    let after = read_key(&root.join("lab-1/identity.pub"));
    assert_ne!(before, after);
    assert!(root.join("lab-1/identity.key.old").exists());
    let keys = cairn(root, &["node", "keys"]);
    assert!(
        keys.stdout.contains(&format!("lab-1 {after} (rotated)")),
        "{keys:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !renewals(&setup, "lab-1", mark)
        .iter()
        .any(|r| r == "granted")
    {
        assert!(
            Instant::now() < deadline,
            "lab-1's renewals with its new key: {}",
            log_of(&setup, "lab-1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !renewals(&setup, "lab-1", mark).iter().any(|r| refusal(r)),
        "{:?}",
        renewals(&setup, "lab-1", mark)
    );
    // A rotation signed by the key rotated out is refused.
    std::fs::copy(
        root.join("lab-1/identity.key.old"),
        root.join("lab-1-stale.key"),
    )
    .unwrap();
    let stale = proto::auth::Identity::load(&root.join("lab-1-stale.key")).unwrap();
    let refused = runtime.block_on(async {
        proto::v1::enrollment_client::EnrollmentClient::connect(format!("http://{}", setup.grpc))
            .await
            .unwrap()
            .rotate_node_key(proto::enroll::rotation_request(
                &stale,
                &proto::auth::Identity::generate().unwrap(),
                "lab-1",
                reconciler::state::now_ms(),
            ))
            .await
            .unwrap_err()
    });
    assert_eq!(
        format!("{:?}", refused.code()),
        "PermissionDenied",
        "{refused:?}"
    );
    assert!(refused.message().contains("pinned"), "{refused:?}");

    // The controller key is lost: the controller is killed (-9) and its key deleted.
    // Started again it refuses to draw a key no node trusts, and names the recovery.
    let lost = proto::auth::Identity::load(&data.join("controller.key")).unwrap();
    assert_eq!(lost.public_key_hex(), next);
    let _ = controller_process.0.kill();
    let _ = controller_process.0.wait();
    std::fs::remove_file(data.join("controller.key")).unwrap();
    let refused = refused_start(&setup);
    assert!(
        refused.contains("controller.key is missing") && refused.contains("key recover"),
        "{refused}"
    );
    assert!(!data.join("controller.key").exists(), "no key was drawn");
    // A key that is not a recovery key of the set is refused, and nothing changes.
    let stranger = root.join("stranger.key");
    std::fs::write(
        &stranger,
        format!(
            "{}\n",
            proto::auth::Identity::generate().unwrap().secret_seed_hex()
        ),
    )
    .unwrap();
    let run = recover(root, &stranger);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("not a recovery key"), "{run:?}");
    assert!(!data.join("controller.key").exists(), "{run:?}");
    // With the offline recovery key: a new key, pushed to both nodes (the specs of
    // the controller's last checkout), the lost key no longer trusted.
    let offsite_file = root.join("offsite.key");
    std::fs::write(&offsite_file, format!("{}\n", offsite.secret_seed_hex())).unwrap();
    let run = recover(root, &offsite_file);
    assert_eq!(run.code, 0, "{run:?}");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["phase"], "done", "{run:?}");
    assert_eq!(report["from"].as_str(), Some(next.as_str()), "{run:?}");
    assert_eq!(
        report["pushed"],
        serde_json::json!(["lab-1", "lab-2"]),
        "{run:?}"
    );
    let recovered = read_key(&data.join("controller.pub"));
    assert_eq!(report["to"].as_str(), Some(recovered.as_str()), "{run:?}");
    assert_ne!(recovered, next);
    assert!(!data.join("controller-key-recovery.json").exists());
    trusted_everywhere(&setup, &[&recovered, &offsite.public_key_hex()], &next);
    let refused = observe_with(&lost).unwrap_err();
    assert!(refused.contains("not trusted"), "{refused}");
    let new_key = proto::auth::Identity::load(&data.join("controller.key")).unwrap();
    observe_with(&new_key).expect("the recovered key is trusted");
    // Run again with the key present (forsaken rather than lost): another new key, and
    // the present one is kept aside, not destroyed.
    let again = recover(root, &offsite_file);
    assert_eq!(again.code, 0, "{again:?}");
    let report: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(
        report["from"].as_str(),
        Some(recovered.as_str()),
        "{again:?}"
    );
    assert_ne!(report["to"].as_str(), Some(recovered.as_str()), "{again:?}");
    let kept = proto::auth::Identity::load(&data.join("controller.key.lost")).unwrap();
    assert_eq!(kept.public_key_hex(), recovered);
    let recovered = read_key(&data.join("controller.pub"));
    // The audit chain verifies across the rotation and both recoveries.
    let verify = cairn(root, &["audit", "verify"]);
    assert_eq!(verify.code, 0, "{verify:?}");
    // The controller starts on the recovered key and the nodes' renewals are granted.
    let controller_process = controller(&setup);
    wait_granted(&setup);
    assert_eq!(read_key(&data.join("controller.pub")), recovered);

    // lab-2's key is revoked (a signed action): its renewals are refused naming the
    // revocation, `cairn node keys` says so, and asking again changes nothing.
    let lab2_key = read_key(&root.join("lab-2/identity.pub"));
    let mark = log_of(&setup, "lab-2").len();
    let run = cairn(root, &["node", "revoke", "lab-2", "--key", &key]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("is revoked"), "{run:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !renewals(&setup, "lab-2", mark)
        .iter()
        .any(|r| r.contains("was revoked"))
    {
        assert!(
            Instant::now() < deadline,
            "lab-2's renewals after the revocation: {:?}",
            renewals(&setup, "lab-2", mark)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let keys = cairn(root, &["node", "keys"]);
    assert!(
        keys.stdout.contains(&format!("lab-2 {lab2_key} (revoked)")),
        "{keys:?}"
    );
    let again = cairn(root, &["node", "revoke", "lab-2", "--key", &key]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("revoked before"), "{again:?}");
    let unknown = cairn(root, &["node", "revoke", "lab-9", "--key", &key]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    // lab-2 does not enroll again with the revoked key (the token stays unused), and
    // does with a new key.
    drop(nodes);
    std::fs::remove_file(root.join("lab-2/trusted-controllers")).unwrap();
    let token2 = token(root, "lab-2", "15m");
    let refused = start_node(&setup, 1, &token2, &[]).err().expect("refused");
    assert!(refused.contains("was revoked"), "{refused}");
    for file in ["identity.key", "identity.pub"] {
        std::fs::remove_file(root.join("lab-2").join(file)).unwrap();
    }
    let lab2 = node(&setup, 1, &token2);
    assert_ne!(read_key(&root.join("lab-2/identity.pub")), lab2_key);
    wait_granted(&setup);
    drop(lab2);
    drop(lab1);
    drop(controller_process);
}

/// `cairn controller key recover` with the recovery key in `file`, JSON output.
fn recover(root: &Path, file: &Path) -> crate::Run {
    let file = file.display().to_string();
    cairn(
        root,
        &[
            "controller",
            "key",
            "recover",
            "--recovery-key",
            &file,
            "--format",
            "json",
        ],
    )
}

/// Starts the controller expecting it to refuse; its error output.
fn refused_start(setup: &Setup) -> String {
    let mut child = controller_command(setup)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cairn controller starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut text = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut text).unwrap();
            assert!(!status.success(), "the controller started: {text}");
            return text;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the controller started without its key");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
