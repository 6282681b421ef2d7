//! Live migration of a VM with a disk through `cairn plan` and `cairn apply` (issue
//! 17): two real cairn-nodes on 127.0.0.41-42 (helper P's range), the VM's disk a
//! volume with a copy on each node. Draining its node plans one `migrate_vm` step;
//! while it runs the guest keeps writing to its disk; after the commit the disk's
//! writer is the destination's copy (the epoch says so on both copies, so the
//! source's copy refuses to write), and every write the guest had acknowledged —
//! before, during and after the move — reads back through the new node. Then the
//! way back, with the source's VMM killed (kill -9) after the commit record: the VM
//! runs on exactly one node and no acknowledged write is lost.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::TempDir;
use crate::engine::{Cluster, free_port, kvm_usable};
use crate::migration::{
    apply_held, heartbeat_logs, heartbeats, two_node_specs, vm_row, vmm_on, wait_for,
};

const VOLUME: &str = "mv-data";

/// The guest writes acknowledged so far: (offset, seed, the guest's CRC-32C).
type Acked = Arc<Mutex<Vec<(u64, u64, String)>>>;

fn specs(dir: &Path, maintenance: Option<&str>, ports: (u16, u16)) {
    two_node_specs(dir, maintenance, ("127.0.0.41", "127.0.0.42"), ports, true);
}

/// `cairn vm disk-io mv OP --disk data` on 64 KiB at `offset`: the guest's CRC-32C,
/// or `None` when it was not acknowledged.
fn guest_io(dir: &Path, op: &str, offset: u64, seed: u64) -> Option<String> {
    let (offset_text, seed_text) = (offset.to_string(), seed.to_string());
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .args([
            "vm",
            "disk-io",
            "mv",
            op,
            ".",
            "--disk",
            "data",
            "--offset",
            &offset_text,
            "--length",
            "65536",
            "--seed",
            &seed_text,
            "--timeout",
            "25s",
        ])
        .output()
        .expect("cairn runs");
    if !out.status.success() {
        eprintln!(
            "disk-io {op} at {offset}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("crc32c "))
        .map(str::to_owned)
}

/// Each node's view of the volume's epoch: (epoch, writer), from its Observe.
fn epochs(cluster: &Cluster, nodes: &[(&str, String)]) -> Vec<(String, u64, String)> {
    let key = proto::auth::Identity::load(&cluster.path().join(".cairn/controller.key"))
        .expect("the dev cluster's controller key");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut out = vec![];
        for (node, address) in nodes {
            let mut client = proto::client::NodeClient::connect(
                address,
                proto::auth::RequestSigner::new(key.clone()),
            )
            .await
            .expect("connect");
            let observed = client.observe().await.expect("observe");
            let volume = observed
                .volumes
                .iter()
                .find(|v| v.name == VOLUME)
                .unwrap_or_else(|| panic!("{node} holds no copy of {VOLUME}"));
            out.push((
                (*node).to_owned(),
                volume.epoch,
                volume.epoch_writer.clone(),
            ));
        }
        out
    })
}

/// Guest writes in a loop (64 KiB each, the i-th at 64 KiB · (first_seed + i), so
/// runs with seeds far enough apart do not overlap) until `stop`; the acknowledged
/// ones: (offset, seed, crc).
fn keep_writing(
    dir: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    acked: Acked,
    first_seed: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) && i < 100 {
            // Each run of writes its own region: 64 KiB · (first seed + i).
            let (offset, seed) = ((first_seed + i) << 16, first_seed + i);
            if let Some(crc) = guest_io(&dir, "write-pattern", offset, seed) {
                acked.lock().unwrap().push((offset, seed, crc));
            }
            i += 1;
        }
    })
}

/// `cairn apply --auto-approve` with the migration hold at `point`; the guest writes
/// from before the apply until it ends. With `kill`, the VMM of `mv` on that node is
/// killed (SIGKILL) at the hold.
fn apply_writing(
    cluster: &Cluster,
    point: &str,
    kill: Option<&str>,
    acked: &Acked,
    first_seed: u64,
) -> crate::Run {
    let marker = cluster.path().join(format!("hold-{point}-{first_seed}"));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(
        cluster.path().to_owned(),
        stop.clone(),
        acked.clone(),
        first_seed,
    );
    let run = apply_held(cluster, point, &marker, 2000, kill);
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("the writer thread");
    run
}

/// Every acknowledged write reads back (through the node the VM runs on now).
fn all_there(cluster: &Cluster, acked: &[(u64, u64, String)]) {
    for (offset, seed, crc) in acked {
        let read = guest_io(cluster.path(), "checksum", *offset, *seed);
        assert_eq!(
            read.as_deref(),
            Some(crc.as_str()),
            "the write acknowledged at {offset} (seed {seed}) is not there"
        );
    }
}

/// Runs `apply` (a migration of `mv` from `source` to `destination`) and measures the
/// guest's downtime from the VMMs' heartbeat logs: the source's last heartbeat (read
/// every 2 ms until the apply ends: its directory goes with the source's DeleteVm)
/// to the destination's first after it. The built-in guest beats every 10 ms, and
/// not while it carries out a disk command.
fn measured(
    cluster: &Cluster,
    source: &str,
    destination: &str,
    apply: impl FnOnce() -> crate::Run,
) -> (crate::Run, f64) {
    let logs = |node: &str| {
        cluster
            .path()
            .join(".cairn/dev")
            .join(node)
            .join("vms/mv/heartbeats")
    };
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, source) = (done.clone(), logs(source));
        std::thread::spawn(move || {
            let mut last = 0;
            while !done.load(Ordering::SeqCst) {
                for (_, l) in heartbeat_logs(&source) {
                    last = last.max(l);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            last
        })
    };
    let run = apply();
    done.store(true, Ordering::SeqCst);
    let source_last = watcher.join().expect("the watcher");
    let destination_first = heartbeat_logs(&logs(destination))
        .into_iter()
        .map(|(first, _)| first)
        .filter(|first| *first > source_last)
        .min()
        .unwrap_or_else(|| panic!("no heartbeat on {destination} after {source}'s last: {run:?}"));
    (run, (destination_first - source_last) as f64 / 1e6)
}

#[test]
fn a_vm_with_a_disk_moves_live_its_writer_follows_and_no_acknowledged_write_is_lost() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here; the test migrates a running VM");
        return;
    }
    let dir = TempDir::new("migration-disks");
    let ports = (free_port(), free_port());
    specs(&dir.0, None, ports);
    let cluster = Cluster { dir };
    let addresses = [
        ("n-1", format!("127.0.0.41:{}", ports.0)),
        ("n-2", format!("127.0.0.42:{}", ports.1)),
    ];
    let up = cluster.cairn(&["dev", "up", "."]);
    assert_eq!(up.code, 0, "{up:?}");
    let first = cluster.cairn_unattended(&["apply", ".", "--auto-approve"]);
    assert_eq!(first.code, 0, "{first:?}");
    let row = wait_for("mv running", Duration::from_secs(60), || {
        let row = vm_row(&cluster.status_json());
        (row["state"] == "running").then_some(row)
    });
    let a = row["node"].as_str().expect("a node").to_owned();
    let b = if a == "n-1" { "n-2" } else { "n-1" }.to_owned();

    // Before: one write through A.
    let acked: Acked = Arc::new(Mutex::new(vec![]));
    let crc = guest_io(cluster.path(), "write-pattern", 0, 1).expect("a write before the move");
    acked.lock().unwrap().push((0, 1, crc));

    // Drain A: one live step, the disk staying, its writer moving at the commit.
    specs(cluster.path(), Some(&a), ports);
    let plan = cluster.cairn(&["plan", "."]);
    assert!(
        plan.stdout.contains(&format!("migrate_vm mv@{b}"))
            && plan
                .stdout
                .contains(&format!("disks stay: {VOLUME} writer -> {b} at the commit"))
            && !plan.stdout.contains("not live"),
        "{plan:?}"
    );

    // During: the guest writes from the prepare until the apply ends.
    let (_, socket) = vmm_on(&cluster, &a).expect("the VMM on A");
    let beats = heartbeats(&socket).expect("heartbeats on A");
    let (run, downtime_ms) = measured(&cluster, &a, &b, || {
        apply_writing(&cluster, "prepared", None, &acked, 100)
    });
    eprintln!("the drain of {a}: {run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    eprintln!("downtime from the heartbeat logs, the guest writing: {downtime_ms:.1} ms");
    let row = wait_for("mv running on B", Duration::from_secs(30), || {
        let row = vm_row(&cluster.status_json());
        (row["node"] == b.as_str() && row["state"] == "running").then_some(row)
    });
    assert!(
        vmm_on(&cluster, &a).is_none(),
        "the source's VMM runs: {row:#}"
    );
    let (_, socket) = vmm_on(&cluster, &b).expect("the VMM on B");
    let moved = heartbeats(&socket).expect("heartbeats on B");
    assert!(moved >= beats, "the guest rebooted: {moved} < {beats}");
    let during = acked.lock().unwrap().len() - 1;
    eprintln!(
        "{during} guest writes acknowledged during the migration; its figures: {}",
        row["last_migration"]["figures"]
    );
    assert!(
        during >= 1,
        "no guest write was acknowledged during the migration"
    );

    // The writer is B's copy on both copies (A's copy refuses to write from now on).
    let seen = epochs(&cluster, &addresses);
    assert!(
        seen.iter()
            .all(|(_, epoch, writer)| *writer == b && *epoch == seen[0].1),
        "{seen:?}"
    );
    let last = &row["last_migration"];
    assert_eq!(last["phase"], "completed", "{row:#}");

    // After: a write through B, and every acknowledged write reads back there.
    let crc =
        guest_io(cluster.path(), "write-pattern", 40 << 20, 7).expect("a write after the move");
    acked.lock().unwrap().push((40 << 20, 7, crc));
    all_there(&cluster, &acked.lock().unwrap());

    // The way back, the source's VMM killed after the commit record: the VM runs on
    // A alone, and nothing acknowledged is lost.
    specs(cluster.path(), Some(&b), ports);
    let run = apply_writing(&cluster, "committed", Some(&b), &acked, 500);
    eprintln!("the drain of {b}, its VMM killed after the commit: {run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    let row = wait_for("mv running on A", Duration::from_secs(30), || {
        let row = vm_row(&cluster.status_json());
        (row["node"] == a.as_str() && row["state"] == "running").then_some(row)
    });
    assert!(vmm_on(&cluster, &b).is_none(), "a VMM runs on B: {row:#}");
    let seen = epochs(&cluster, &addresses);
    assert!(seen.iter().all(|(_, _, writer)| *writer == a), "{seen:?}");
    let crc = guest_io(cluster.path(), "write-pattern", 48 << 20, 9).expect("a write on A again");
    acked.lock().unwrap().push((48 << 20, 9, crc));
    all_there(&cluster, &acked.lock().unwrap());
    eprintln!(
        "{} acknowledged writes read back after two moves",
        acked.lock().unwrap().len()
    );

    // A clean drain of A again (no guest disk command running), measured.
    specs(cluster.path(), Some(&a), ports);
    let (run, downtime_ms) = measured(&cluster, &a, &b, || {
        cluster.cairn_unattended(&["apply", ".", "--auto-approve"])
    });
    assert_eq!(run.code, 0, "{run:?}");
    let row = vm_row(&cluster.status_json());
    eprintln!(
        "a clean drain with a disk: downtime from the heartbeat logs {downtime_ms:.1} ms; the commander's figures {}",
        row["last_migration"]["figures"]
    );
    all_there(&cluster, &acked.lock().unwrap());
}
