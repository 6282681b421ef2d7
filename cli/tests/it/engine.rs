//! plan / apply / status / dev up|down against real `cairn-node` processes.
//!
//! Each test copies the quickstart spec, points its three nodes at free ports on
//! 127.0.0.1, runs `cairn dev up` and tears the cluster down when it ends (also on
//! failure). `cairn-node` and `cairn-vmm` are taken from next to the `cairn` binary
//! (a workspace build puts them there); otherwise they are built once into
//! `TARGET/cairn-it-nodes` (a separate target directory, because the running
//! `cargo test` holds the lock of its own). Tests that start VMs need a usable
//! /dev/kvm and say so when they skip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::{Run, TempDir, repo_root};

/// Copies the spec files of `from` (not its `.cairn/`: a quickstart cluster
/// running from the repository keeps sockets and databases there).
pub(crate) fn copy_specs(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let path = e.expect("dir entry").path();
        if path.extension().is_some_and(|x| x == "kdl") {
            std::fs::copy(&path, to.join(path.file_name().expect("file name"))).expect("copy");
        }
    }
}

/// The directory holding cairn-node and cairn-vmm.
pub(crate) fn node_binaries() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cairn = PathBuf::from(env!("CARGO_BIN_EXE_cairn"));
        let beside = cairn.parent().expect("cairn has a directory").to_owned();
        if beside.join("cairn-node").is_file() && beside.join("cairn-vmm").is_file() {
            return beside;
        }
        // TARGET/debug/cairn → TARGET/cairn-it-nodes
        let target = beside.parent().expect("target dir").join("cairn-it-nodes");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!(
            "building cairn-node and cairn-vmm into {} (not found next to cairn)",
            target.display()
        );
        let status = Command::new(cargo)
            .args(["build", "-p", "node-runtime", "-p", "vmm"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(repo_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building cairn-node failed");
        target.join("debug")
    })
}

pub(crate) fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The quickstart's fault-tolerant VM (`availability "ft"`), which needs the site's
/// witness.
pub(crate) const QUICKSTART_FT_VM: &str = "ledger";

/// `text` without the spec block whose first line starts with `head` (after
/// indentation), with the comment lines just above it, up to its closing `}` at the
/// same indentation (a one-line node when its line has no `{`), and one blank line
/// after it. Panics when `head` is not there (`what` names the text): the copy would
/// be wrong.
fn remove_block(text: &str, head: &str, what: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with(head))
        .unwrap_or_else(|| panic!("{what} has no `{head}`"));
    let indent = &lines[at][..lines[at].len() - lines[at].trim_start().len()];
    let mut first = at;
    while first > 0 && lines[first - 1].trim_start().starts_with("//") {
        first -= 1;
    }
    let mut last = at;
    if lines[at].trim_end().ends_with('{') {
        let close = format!("{indent}}}");
        last = at
            + lines[at..]
                .iter()
                .position(|l| l.trim_end() == close)
                .unwrap_or_else(|| panic!("`{head}` in {what} is not closed"));
    }
    if lines.get(last + 1).is_some_and(|l| l.trim().is_empty()) {
        last += 1;
    }
    lines[..first]
        .iter()
        .chain(&lines[last + 1..])
        .map(|l| format!("{l}\n"))
        .collect()
}

/// [`remove_block`] in the file `path`.
fn remove_block_in(path: &Path, head: &str) {
    let text = std::fs::read_to_string(path).expect("read the spec file");
    let kept = remove_block(&text, head, &path.display().to_string());
    std::fs::write(path, kept).expect("write the spec file");
}

/// The quickstart's `workloads.kdl` without its FT VM (which needs the site's
/// witness that [`without_ft`] removes).
pub(crate) fn quickstart_workloads_without_ft() -> String {
    let path = repo_root().join("examples/quickstart/workloads.kdl");
    let text = std::fs::read_to_string(&path).expect("the quickstart's workloads.kdl");
    remove_block(
        &text,
        &format!("vm \"{QUICKSTART_FT_VM}\""),
        "workloads.kdl",
    )
}

/// The quickstart copy in `dir` without its FT VM and the site's witness: tests that
/// are not about fault tolerance keep the five VMs they count, and start no witness
/// on the quickstart's own 127.0.0.14 (`ft.rs` runs the quickstart with both).
pub(crate) fn without_ft(dir: &Path) {
    remove_block_in(
        &dir.join("workloads.kdl"),
        &format!("vm \"{QUICKSTART_FT_VM}\""),
    );
    without_witness(dir);
}

/// The quickstart's `cluster.kdl` in `dir` without the site's witness (for a test
/// that rewrites it from the quickstart's again after [`without_ft`]).
pub(crate) fn without_witness(dir: &Path) {
    remove_block_in(&dir.join("cluster.kdl"), "witness address=");
}

/// A copy of the quickstart's specs whose three nodes listen on free ports of
/// 127.0.0.1 (the quickstart's own 127.0.0.11-14 belong to `cargo xtask quickstart`),
/// without its FT VM and witness ([`without_ft`]).
pub(crate) fn quickstart_copy(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    copy_specs(&repo_root().join("examples/quickstart"), &dir.0);
    without_ft(&dir.0);
    let cluster_file = dir.0.join("cluster.kdl");
    let mut text = std::fs::read_to_string(&cluster_file).expect("read cluster.kdl");
    for n in 11..=13 {
        text = text.replace(
            &format!("127.0.0.{n}:7100"),
            &format!("127.0.0.1:{}", free_port()),
        );
    }
    std::fs::write(&cluster_file, text).expect("write cluster.kdl");
    dir
}

/// `cairn dev up . --gitops` with the controller's HTTP and gRPC on free ports.
pub(crate) fn gitops_up_args() -> Vec<String> {
    let listen = format!("127.0.0.1:{}", free_port());
    let grpc = format!("127.0.0.1:{}", free_port());
    ["dev", "up", ".", "--gitops", "--controller-listen", &listen]
        .into_iter()
        .chain(["--controller-grpc-listen", &grpc])
        .map(String::from)
        .collect()
}

/// A port free on 127.0.0.1 (see `crate::ports`).
pub(crate) fn free_port() -> u16 {
    crate::ports::free_port_on("127.0.0.1")
}

/// A quickstart copy with its own dev cluster; `dev down` on drop.
pub(crate) struct Cluster {
    pub(crate) dir: TempDir,
}

/// How many bond steps `cairn dev up` clusters get: one per node (the quickstart's
/// `data` bond) where nodes get their own network namespaces, none elsewhere
/// (nodes then refuse network actions and the plan says so).
pub(crate) fn bond_steps() -> usize {
    if network::netns_capability().is_ok() {
        3
    } else {
        0
    }
}

/// How many tenant network segment steps applying the quickstart takes: dev-net on
/// each of the three nodes and ops-net on backup's (issue 19; the spec's `underlay=`
/// gives dev-cluster nodes their tunnel endpoint), none without namespaces.
pub(crate) fn segment_steps() -> usize {
    if bond_steps() > 0 { 4 } else { 0 }
}

impl Cluster {
    pub(crate) fn up(tag: &str) -> Cluster {
        Self::up_with(tag, &[])
    }

    /// A quickstart copy without the spec files named in `without`.
    pub(crate) fn up_with(tag: &str, without: &[&str]) -> Cluster {
        Self::up_with_env(tag, without, &[])
    }

    /// A quickstart copy without `without`, `dev up` run with `env`.
    pub(crate) fn up_with_env(tag: &str, without: &[&str], env: &[(&str, &str)]) -> Cluster {
        // The copy's node ports were free when `free_port` looked; on a machine
        // running the whole suite another process can take one before its node binds
        // it (`dev up` stops every node then). A new copy gets new ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let dir = quickstart_copy(tag);
            for file in without {
                std::fs::remove_file(dir.0.join(file)).expect("remove spec file");
            }
            let cluster = Cluster { dir };
            let out = cluster
                .command(&["dev", "up", "."])
                .envs(env.iter().copied())
                .output()
                .expect("cairn dev up runs");
            let up = Run {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            };
            if up.code != 0 && up.stderr.contains("Address already in use") && attempt < 3 {
                eprintln!(
                    "dev up: a node's port was taken meanwhile, again with new ports: {up:?}"
                );
                continue;
            }
            assert_eq!(up.code, 0, "dev up failed: {up:?}");
            assert!(up.stdout.contains("dev cluster up: 3 nodes"), "{up:?}");
            return cluster;
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.dir.0
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.args(args)
            .current_dir(self.path())
            .env("NO_COLOR", "1")
            .env("CAIRN_NODE_BIN", node_binaries().join("cairn-node"));
        c
    }

    pub(crate) fn cairn(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().expect("cairn runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `cairn` with no standard input (nobody to answer a question).
    pub(crate) fn cairn_unattended(&self, args: &[&str]) -> Run {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .expect("cairn runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub(crate) fn pids(&self) -> Vec<(String, u32)> {
        let text = std::fs::read_to_string(self.path().join(".cairn/dev/pids.json"))
            .unwrap_or_else(|_| "{}".into());
        let map: std::collections::BTreeMap<String, u32> =
            serde_json::from_str(&text).expect("pids.json is JSON");
        map.into_iter().collect()
    }

    pub(crate) fn status_json(&self) -> serde_json::Value {
        let run = self.cairn(&["status", ".", "--format", "json"]);
        assert_eq!(run.code, 0, "{run:?}");
        serde_json::from_str(&run.stdout).expect("status JSON")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pids = self.pids();
        let _ = self.command(&["dev", "down", "."]).output();
        for (_, pid) in pids {
            // Leave nothing running even when dev down itself is broken, but
            // only while the pid is still our node: pids are recycled, and a
            // group kill of a recycled pid would hit someone else.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if alive(pid) && comm.trim() == "cairn-node" {
                let _ = Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
    }
}

pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        })
        .unwrap_or(false)
}

#[test]
fn apply_converges_second_plan_is_empty_added_vm_exits_3_and_dev_down_leaves_nothing() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("apply");
    let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(plan.code, 3, "{plan:?}");
    assert!(
        plan.stdout.contains(&format!(
            "Plan: {} to add, 0 to change, 0 to destroy, 0 to move.",
            10 + bond_steps() + segment_steps()
        )),
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains("tenant dev:"), "{}", plan.stdout);

    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    assert!(
        apply.stdout.contains(&format!(
            "Apply complete: {} succeeded",
            15 + bond_steps() + segment_steps()
        )),
        "{}",
        apply.stdout
    );

    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("No changes."), "{}", again.stdout);

    let status = cluster.status_json();
    let vms = status["vms"].as_array().expect("vms array");
    assert_eq!(vms.len(), 5, "{status}");
    for vm in vms {
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["drift"], "none", "{vm}");
        assert!(
            vm["node"].as_str().is_some_and(|n| n.starts_with("lab-")),
            "{vm}"
        );
    }
    assert_eq!(status["drifted"], 0, "{status}");

    if bond_steps() > 0 {
        // Each VM NIC is a tap on its tenant network's bridge in the node's namespace.
        let record: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(cluster.path().join(".cairn/dev/network.json")).unwrap(),
        )
        .unwrap();
        let mut broken = None;
        for vm in vms {
            let ns = record["nodes"][vm["node"].as_str().unwrap()]
                .as_str()
                .unwrap();
            let nics = vm["nics"].as_array().expect("nics");
            assert_eq!(nics.len(), 1, "{vm}");
            let nic = &nics[0];
            assert_eq!(nic["ready"], true, "{vm}");
            // The VMM runs in the node's namespace on this tap, and the guest's
            // virtio-net driver is up.
            assert_eq!(nic["guest_up"], true, "{vm}");
            assert!(nic["mac"].as_str().unwrap().starts_with("02:ca:"), "{vm}");
            let tap = nic["tap"].as_str().unwrap();
            let bridge = nic["bridge"].as_str().unwrap();
            let link = in_netns("ip", ns, &["-o", "link", "show", tap]);
            assert!(link.contains(&format!("master {bridge}")), "{link}");
            broken.get_or_insert((
                vm["name"].as_str().unwrap().to_owned(),
                ns.to_owned(),
                tap.to_owned(),
                nic["network"].as_str().unwrap().to_owned(),
            ));
        }
        // A tap deleted behind cairn's back is planned as a repair and made again.
        let (vm, ns, tap, network) = broken.expect("a VM");
        in_netns("ip", &ns, &["link", "del", &tap]);
        let repair = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
        assert_eq!(repair.code, 3, "{repair:?}");
        assert!(
            repair.stdout.contains(&format!("~   vm {vm} on "))
                && repair.stdout.contains(&format!(
                    "repair: nic 0 ({network}): tap {tap} does not exist"
                )),
            "{}",
            repair.stdout
        );
        let fixed = cluster.cairn(&["apply", ".", "--auto-approve"]);
        assert_eq!(fixed.code, 0, "{fixed:?}");
        assert!(in_netns("ip", &ns, &["-o", "link", "show", &tap]).contains("master cbr"));
        let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
        assert_eq!(again.code, 0, "{again:?}");
    }

    // One more VM: exit 3 and a readable change.
    let mut workloads = std::fs::read_to_string(cluster.path().join("workloads.kdl")).unwrap();
    workloads.push_str(
        "\nvm \"cache\" tenant=\"dev\" site=\"lab\" {\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n    nic network=\"dev-net\"\n}\n",
    );
    std::fs::write(cluster.path().join("workloads.kdl"), workloads).unwrap();
    let added = cluster.cairn(&["plan", ".", "--detailed-exitcode", "--concise"]);
    assert_eq!(added.code, 3, "{added:?}");
    assert!(
        added.stdout.contains("+   vm cache on lab-"),
        "{}",
        added.stdout
    );
    // The other two nodes' dev-net segments gain a forwarding entry for cache's NIC.
    let segment_updates = if segment_steps() > 0 { 2 } else { 0 };
    assert!(
        added.stdout.contains(&format!(
            "Plan: 1 to add, {segment_updates} to change, 0 to destroy, 0 to move."
        )),
        "{}",
        added.stdout
    );
    let json = cluster.cairn(&["plan", ".", "--format", "json"]);
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).expect("plan JSON");
    assert_eq!(doc["format_version"], 2);
    let cache = doc["changes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["object"] == "vm"))
        .expect("the VM's change");
    assert_eq!(cache["kind"], "create");
    assert_eq!(cache["name"], "cache");
    assert_eq!(
        doc["steps"].as_array().map(Vec::len),
        Some(2 + segment_updates)
    );

    // dev down stops every node and every VM process.
    let pids = cluster.pids();
    assert_eq!(pids.len(), 3);
    let down = cluster.cairn(&["dev", "down", "."]);
    assert_eq!(down.code, 0, "{down:?}");
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} (pid {pid}) still runs after dev down");
    }
    let leftover = Command::new("pgrep")
        .args(["-f", &cluster.path().display().to_string()])
        .output()
        .expect("pgrep runs");
    assert!(
        String::from_utf8_lossy(&leftover.stdout).trim().is_empty(),
        "processes of this cluster survived dev down: {}",
        String::from_utf8_lossy(&leftover.stdout)
    );
}

#[test]
fn stale_saved_plan_is_refused_with_what_moved_and_a_tampered_plan_is_refused() {
    let cluster = Cluster::up("stale");
    let plan = cluster.cairn(&["plan", ".", "--out", "saved.plan"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let saved = cluster.path().join("saved.plan");

    // Tampering breaks the signature.
    let text = std::fs::read_to_string(&saved).unwrap();
    let tampered = cluster.path().join("tampered.plan");
    std::fs::write(
        &tampered,
        text.replacen("\"size_bytes\": 134217728", "\"size_bytes\": 268435456", 1),
    )
    .unwrap();
    assert_ne!(
        std::fs::read_to_string(&tampered).unwrap(),
        text,
        "the edit applied"
    );
    let refused = cluster.cairn(&["apply", "tampered.plan"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("was changed after it was signed"),
        "{}",
        refused.stderr
    );

    // The cluster moves: one node stops answering.
    let (name, pid) = cluster
        .pids()
        .into_iter()
        .find(|(n, _)| n == "lab-3")
        .expect("lab-3 runs");
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let stale = cluster.cairn(&["apply", "saved.plan"]);
    assert_eq!(stale.code, 1, "{stale:?}");
    assert!(
        stale
            .stderr
            .contains("the cluster changed since the plan was made"),
        "{}",
        stale.stderr
    );
    assert!(
        stale
            .stderr
            .contains(&format!("node {name}: answered, now unreachable")),
        "{}",
        stale.stderr
    );

    // Planning with a node down reports it and leaves its objects alone; the
    // plan is not "converged", so it exits 1 and says why.
    let partial = cluster.cairn(&["plan", ".", "--concise"]);
    assert_eq!(partial.code, 1, "{partial:?}");
    assert!(
        partial
            .stdout
            .contains("Even after these changes the cluster will not match the specs"),
        "{}",
        partial.stdout
    );
    assert!(
        partial.stdout.contains("! node lab-3 did not answer"),
        "{}",
        partial.stdout
    );
    assert!(
        partial
            .stdout
            .contains("left alone because their node did not answer"),
        "{}",
        partial.stdout
    );
    assert!(
        !partial.stdout.contains("on lab-3\n"),
        "nothing is planned on the dead node: {}",
        partial.stdout
    );
}

#[test]
fn apply_killed_halfway_is_settled_and_finished_without_repeating_an_action() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("resume");
    let mut child = cluster
        .command(&["apply", ".", "--auto-approve", "--parallelism", "1"])
        .env("CAIRN_APPLY_STEP_DELAY_MS", "300")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cairn apply starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut done = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("stdout line");
        if line.starts_with("ok: ") {
            done += 1;
            if done == 4 {
                break;
            }
        }
    }
    assert_eq!(done, 4, "apply finished before it could be killed");
    // Let the fifth step reach its node; the test delay then holds its outcome
    // unjournaled, so the kill most likely lands between "done" and "journaled"
    // (the case settling must get right). The assertions hold wherever it lands.
    std::thread::sleep(std::time::Duration::from_millis(150));
    child.kill().expect("kill -9 cairn apply");
    child.wait().expect("reap");

    let status = cluster.status_json();
    let last = &status["last_apply"];
    assert_eq!(last["finished"], false, "{status}");
    let total = last["steps"].as_u64().unwrap();
    assert_eq!(total as usize, 15 + bond_steps() + segment_steps());
    assert!(last["succeeded"].as_u64().unwrap() >= 4, "{last}");
    assert!(last["succeeded"].as_u64().unwrap() < total, "{last}");
    let interrupted_execution = last["execution_id"].as_str().unwrap().to_owned();

    // The same specs: the next apply settles the step in flight (asking its node,
    // read-only), plans again from what runs now and finishes without asking,
    // because the new plan only finishes what was approved.
    let resumed = cluster.cairn_unattended(&["apply", "."]);
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert!(resumed.stdout.contains("was interrupted"), "{resumed:?}");
    assert!(
        resumed.stdout.contains("Continuing without asking"),
        "{resumed:?}"
    );
    assert!(resumed.stderr.contains("took over the lock"), "{resumed:?}");

    let status = cluster.status_json();
    let last = &status["last_apply"];
    assert_eq!(last["finished"], true, "{last}");
    assert_ne!(
        last["execution_id"],
        interrupted_execution.as_str(),
        "{last}"
    );
    assert_eq!(last["in_flight"], 0, "{last}");
    assert_eq!(last["failed"], 0, "{last}");
    // The new plan holds only what was left: with the steps done before, every
    // step of the first plan was carried out once.
    let left = last["steps"].as_u64().unwrap();
    assert!(left < total, "{last}");
    eprintln!("after the interruption: {last}");
    let vms = status["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 5);
    for vm in vms {
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["crash_count"], 0, "{vm}");
    }
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "converged after the resume: {again:?}");
}

/// The copies other tests use are the quickstart minus its FT VM and its witness, and
/// nothing else: five VMs, no witness to start on 127.0.0.14.
#[test]
fn a_quickstart_copy_without_ft_keeps_the_other_five_vms_and_starts_no_witness() {
    let whole = crate::cairn(&repo_root(), &["validate", "examples/quickstart"]);
    assert_eq!(whole.code, 0, "{whole:?}");
    assert!(whole.stdout.contains("6 VMs"), "{whole:?}");
    let dir = quickstart_copy("h-no-ft");
    let run = crate::cairn(&dir.0, &["validate", "."]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("5 VMs, 5 volumes"), "{run:?}");
    let cluster = std::fs::read_to_string(dir.0.join("cluster.kdl")).expect("cluster.kdl");
    let workloads = std::fs::read_to_string(dir.0.join("workloads.kdl")).expect("workloads");
    assert!(!cluster.contains("witness"), "{cluster}");
    assert!(
        !workloads.contains(QUICKSTART_FT_VM) && !workloads.contains("\"ft\""),
        "{workloads}"
    );
    assert!(
        !workloads.contains("\n\n\n"),
        "no blank lines left behind: {workloads}"
    );
    assert_eq!(workloads, quickstart_workloads_without_ft());
}

#[test]
fn force_unlock_needs_the_lock_id() {
    let dir = TempDir::new("unlock");
    copy_specs(&repo_root().join("examples/quickstart"), &dir.0);
    let run = crate::cairn(&dir.0, &["force-unlock", "0123456789abcdef", "."]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("it is not locked"), "{}", run.stderr);
}

/// `tc -n NETNS ARGS...` (or `ip`), stdout; panics with the output on failure.
fn in_netns(tool: &str, netns: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(["-n", netns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} runs: {e}"));
    assert!(
        out.status.success(),
        "{tool} -n {netns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The HTB classes of `dev` as (classid, rate, ceil), as `tc` prints them.
fn htb_classes(netns: &str, dev: &str) -> Vec<(String, String, String)> {
    let text = in_netns("tc", netns, &["class", "show", "dev", dev]);
    let mut out: Vec<(String, String, String)> = text
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .map(|w| (*w).to_owned())
            };
            Some((words.get(2)?.to_string(), after("rate")?, after("ceil")?))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn dev_cluster_bonds_live_in_each_nodes_namespace_at_the_spec_rates_and_drift_is_repaired() {
    if let Err(why) = network::netns_capability() {
        eprintln!("skipped: the dev cluster cannot give nodes network namespaces here: {why}");
        return;
    }
    if Command::new("tc").arg("-V").output().is_err() {
        eprintln!("skipped: the iproute2 `tc` binary is not installed");
        return;
    }
    // The quickstart's site and bond without its workloads: only networking is
    // planned, so this test needs no KVM.
    let cluster = Cluster::up_with("bonds", &["workloads.kdl"]);
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cluster.path().join(".cairn/dev/network.json"))
            .expect("dev up records its namespaces"),
    )
    .expect("network.json is JSON");
    let namespaces: Vec<(String, String)> = record["nodes"]
        .as_object()
        .expect("nodes")
        .iter()
        .map(|(node, ns)| (node.clone(), ns.as_str().expect("name").to_owned()))
        .collect();
    assert_eq!(namespaces.len(), 3, "{record}");

    let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(plan.code, 3, "{plan:?}");
    for (node, _) in &namespaces {
        assert!(
            plan.stdout.contains(&format!("+   bond data on {node}")),
            "{}",
            plan.stdout
        );
    }
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "applying twice changes nothing: {again:?}");

    // In each node's namespace: the bond's device, its members, and one HTB class
    // per traffic class at the spec's rates (1 Gbit/s capacity, quickstart values).
    let want: Vec<(String, String, String)> = [
        ("1:1", "1Gbit", "1Gbit"),
        ("1:10", "300Mbit", "1Gbit"),   // storage
        ("1:20", "100Mbit", "500Mbit"), // migration
        ("1:30", "300Mbit", "1Gbit"),   // guest
        ("1:40", "50Mbit", "1Gbit"),    // management
    ]
    .iter()
    .map(|(c, r, l)| ((*c).to_owned(), (*r).to_owned(), (*l).to_owned()))
    .collect();
    for (node, ns) in &namespaces {
        let device = in_netns("ip", ns, &["-o", "link", "show", "data"]);
        assert!(device.contains("state UP"), "{node}: {device}");
        let nics = in_netns("ip", ns, &["-o", "link", "show"]);
        assert!(
            nics.contains(" eth0@") && nics.contains(" eth1@"),
            "{node}: {nics}"
        );
        let attached = in_netns("ip", ns, &["-o", "link", "show", "master", "data"]);
        assert!(
            attached.contains(" eth0@") || attached.contains(" eth1@"),
            "{node}: a member carries the bond: {attached}"
        );
        assert_eq!(htb_classes(ns, "data"), want, "{node}");
    }
    let status = cluster.status_json();
    let bonds = status["bonds"].as_array().expect("bonds");
    assert_eq!(bonds.len(), 3, "{status}");
    for bond in bonds {
        assert_eq!(bond["drift"], "none", "{bond}");
        assert_eq!(bond["health"], "healthy", "{bond}");
        assert!(
            ["kernel-bond", "bridge-fallback"].contains(&bond["implementation"].as_str().unwrap()),
            "{bond}"
        );
    }

    // Drift behind cairn's back: a changed rate on one node, a member set down
    // on another. Plan names both; apply repairs them; the next plan is empty.
    let (node_a, ns_a) = &namespaces[0];
    let (node_b, ns_b) = &namespaces[1];
    in_netns(
        "tc",
        ns_a,
        &[
            "class", "change", "dev", "data", "parent", "1:1", "classid", "1:10", "htb", "rate",
            "100Mbit", "ceil", "1Gbit",
        ],
    );
    in_netns("ip", ns_b, &["link", "set", "eth1", "down"]);
    let drift = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(drift.code, 3, "{drift:?}");
    assert!(
        drift
            .stdout
            .contains(&format!("~   bond data on {node_a} — update"))
            && drift
                .stdout
                .contains("repair: traffic class storage min is 100Mbit/s"),
        "{}",
        drift.stdout
    );
    assert!(
        drift
            .stdout
            .contains(&format!("~   bond data on {node_b} — update"))
            && drift
                .stdout
                .contains("repair: member eth1 is administratively down"),
        "{}",
        drift.stdout
    );
    let status = cluster.status_json();
    let drifted: Vec<&str> = status["bonds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["drift"] == "device")
        .map(|b| b["node"].as_str().unwrap())
        .collect();
    assert_eq!(drifted, vec![node_a.as_str(), node_b.as_str()], "{status}");
    let repair = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(repair.code, 0, "{repair:?}");
    assert_eq!(htb_classes(ns_a, "data"), want, "{node_a} repaired");
    assert!(
        in_netns("ip", ns_b, &["-o", "link", "show", "eth1"]).contains("state UP"),
        "{node_b}: eth1 up again"
    );
    let converged = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(converged.code, 0, "{converged:?}");

    // A spec change reaches every node's classes.
    let cluster_file = cluster.path().join("cluster.kdl");
    let text = std::fs::read_to_string(&cluster_file).unwrap();
    std::fs::write(
        &cluster_file,
        text.replace(
            r#"traffic "storage" min="300Mbps""#,
            r#"traffic "storage" min="400Mbps""#,
        ),
    )
    .unwrap();
    let changed = cluster.cairn(&["plan", "."]);
    assert!(
        changed
            .stdout
            .contains("traffic storage: min 300Mbps → 400Mbps"),
        "{}",
        changed.stdout
    );
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    for (node, ns) in &namespaces {
        assert!(
            htb_classes(ns, "data").contains(&(
                "1:10".to_owned(),
                "400Mbit".to_owned(),
                "1Gbit".to_owned()
            )),
            "{node}"
        );
    }

    // dev down removes every namespace it made.
    let down = cluster.cairn(&["dev", "down", "."]);
    assert_eq!(down.code, 0, "{down:?}");
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    for (_, ns) in &namespaces {
        assert!(
            !left.contains(ns.as_str()),
            "{ns} survived dev down: {left}"
        );
    }
}
