//! Copies rebuilt after the loss of a node (issue 15 item 7), in a dev cluster under
//! the GitOps controller: the node holding `db-data`'s replica is killed for good; after
//! the rebuild delay (60 s) the controller makes a new copy on the third node through
//! the writer, which ships it the whole volume; the copy joins the in-sync set, and only
//! then is the lost copy dropped. And copies moved live off a node in maintenance
//! while the guest writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ha::HaCluster;

/// The controller log's lines about `volume db-data`.
fn db_data_lines(ha: &HaCluster) -> Vec<String> {
    std::fs::read_to_string(ha.cluster.path().join(".cairn/dev/controller.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("volume db-data"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_lost_nodes_copy_is_rebuilt_on_another_node_before_it_is_dropped() {
    // The web group without `spread "node"` (two nodes are left).
    let Some(ha) = HaCluster::up_in(
        "rebuild-lost",
        |dir| {
            let path = dir.join("workloads.kdl");
            let text = std::fs::read_to_string(&path).expect("read workloads.kdl");
            let text: String = text
                .lines()
                .filter(|l| !l.contains("spread \"node\""))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&path, text).expect("write workloads.kdl");
        },
        None,
    ) else {
        return;
    };
    let (writer, lost) = adopted_copies(&ha);
    let third = ["lab-1", "lab-2", "lab-3"]
        .into_iter()
        .find(|n| *n != writer && *n != lost)
        .expect("a third node")
        .to_owned();
    eprintln!("db-data: writer {writer}, replica {lost}; killing {lost} for good");
    let killed = ha.kill_node(&lost);
    let dropped = ha.wait(
        "the lost copy rebuilt and dropped",
        Duration::from_secs(240),
        |_| {
            db_data_lines(&ha)
                .into_iter()
                .position(|l| l.contains(&format!("the lost copy on {lost} is forgotten")))
                .map(|at| (at, killed.elapsed()))
        },
    );
    let lines = db_data_lines(&ha);
    for line in &lines {
        eprintln!("  {}", line.chars().take(240).collect::<String>());
    }
    let position = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in the controller log:\n{}", lines.join("\n")))
    };
    let new_copy = position(&format!("new copy on {third}"));
    let joined = position(&format!("added copy {third}"));
    assert!(
        new_copy < joined && joined < dropped.0,
        "new copy, then in sync, then the lost one dropped"
    );
    // Not before the rebuild delay.
    let rebuilding = position("volume-copy");
    assert!(rebuilding <= new_copy, "{}", lines[rebuilding]);
    eprintln!(
        "{lost} killed → copy rebuilt on {third}, in sync, {lost}'s dropped after {:?}",
        dropped.1
    );
    assert!(dropped.1 >= Duration::from_secs(60), "{:?}", dropped.1);
    let final_epoch = lines
        .iter()
        .rev()
        .find(|l| l.contains("volume-epoch") && l.contains("in sync: "))
        .expect("an epoch line");
    assert!(
        final_epoch.contains(&format!("in sync: {}", {
            let mut both = [writer.clone(), third.clone()];
            both.sort();
            both.join(", ")
        })),
        "{final_epoch}"
    );
}

/// `db-data`'s writer and replica from the controller's first epoch line for it.
fn adopted_copies(ha: &HaCluster) -> (String, String) {
    let adopted = ha.wait("db-data's epoch adopted", Duration::from_secs(60), |_| {
        db_data_lines(ha)
            .into_iter()
            .find(|l| l.contains("volume-epoch") && l.contains("in sync: "))
    });
    let after = |line: &str, key: &str| -> String {
        let at = line
            .find(key)
            .unwrap_or_else(|| panic!("`{key}` in {line}"))
            + key.len();
        line[at..].to_owned()
    };
    let writer: String = after(&adopted, "writer ")
        .chars()
        .take_while(|c| *c != ',')
        .collect();
    let replica = after(&adopted, "in sync: ")
        .split([',', ';', '"'])
        .take(2)
        .map(|n| n.trim().to_owned())
        .find(|n| *n != writer)
        .unwrap_or_else(|| panic!("a replica in {adopted}"));
    (writer, replica)
}

/// An acknowledged guest write: where, its seed, the guest's CRC-32C, when it was
/// asked for and when the acknowledgement came.
struct Acked {
    offset: u64,
    seed: u64,
    crc: String,
    asked: Instant,
    at: Instant,
}

/// `cairn vm disk-io db OP --disk data` on 64 KiB at `offset`: the guest's CRC-32C, or
/// `None` when the command failed (not acknowledged).
fn guest_io(ha: &HaCluster, op: &str, offset: u64, seed: u64) -> Option<String> {
    let (offset, seed) = (offset.to_string(), seed.to_string());
    let out = ha.cluster.cairn(&[
        "vm",
        "disk-io",
        "db",
        op,
        ".",
        "--disk",
        "data",
        "--offset",
        &offset,
        "--length",
        "65536",
        "--seed",
        &seed,
        "--timeout",
        "25s",
    ]);
    if out.code != 0 {
        eprintln!("disk-io {op} at {offset}: {out:?}");
        return None;
    }
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("crc32c "))
        .map(str::to_owned)
}

/// Every byte and block checksum of `volume`'s copy on the node at `address`
/// (`Replication.ReplicaRead` signed with the dev cluster's controller key).
fn read_copy(ha: &HaCluster, address: &str, volume: &str, size: u64) -> (Vec<u8>, Vec<u32>) {
    let key = proto::auth::Identity::load(&ha.cluster.path().join(".cairn/controller.key"))
        .expect("the dev cluster's controller key");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut client =
            proto::client::NodeClient::connect(address, proto::auth::RequestSigner::new(key))
                .await
                .expect("connect");
        let (mut data, mut sums) = (Vec::new(), Vec::new());
        for offset in (0..size).step_by(4 << 20) {
            let read = client
                .replica_read(proto::v1::ReplicaReadRequest {
                    volume: volume.into(),
                    offset,
                    length: (4 << 20).min(size - offset),
                })
                .await
                .unwrap_or_else(|status| panic!("read {volume} at {address}: {status:?}"));
            data.extend(read.data);
            sums.extend(read.checksums);
        }
        (data, sums)
    })
}

/// The names of the volumes the node at `address` holds a copy of.
fn volumes_on(ha: &HaCluster, address: &str) -> Vec<String> {
    let key = proto::auth::Identity::load(&ha.cluster.path().join(".cairn/controller.key"))
        .expect("the dev cluster's controller key");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut client =
            proto::client::NodeClient::connect(address, proto::auth::RequestSigner::new(key))
                .await
                .expect("connect");
        let seen = client.observe().await.expect("observe");
        seen.volumes.into_iter().map(|v| v.name).collect()
    })
}

#[test]
fn a_node_in_maintenance_has_its_copies_moved_live_while_the_guest_writes() {
    let Some(ha) = HaCluster::up_in("drain-data", |_| {}, None) else {
        return;
    };
    let (writer, leaving) = adopted_copies(&ha);
    let third = ["lab-1", "lab-2", "lab-3"]
        .into_iter()
        .find(|n| *n != writer && *n != leaving)
        .expect("a third node")
        .to_owned();
    let status = ha.status();
    let address = |node: &str| -> String {
        status["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["name"] == node))
            .and_then(|n| n["address"].as_str())
            .unwrap_or_else(|| panic!("{node}'s address in {status:#}"))
            .to_owned()
    };
    eprintln!("db-data: writer {writer}, replica {leaving}; {leaving} goes into maintenance");

    // The guest writes 64 KiB after 64 KiB, each with its own seed, from before the
    // move to after it.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let failed = Arc::new(Mutex::new(0u32));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for k in 0u64.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (offset, seed) = ((8 << 20) + k * 65536, 1000 + k);
                let asked = Instant::now();
                match guest_io(&ha, "write-pattern", offset, seed) {
                    Some(crc) => acked.lock().unwrap().push(Acked {
                        offset,
                        seed,
                        crc,
                        asked,
                        at: Instant::now(),
                    }),
                    None => *failed.lock().unwrap() += 1,
                }
            }
        });
        ha.wait(
            "two guest writes before the move",
            Duration::from_secs(120),
            |_| (acked.lock().unwrap().len() >= 2).then_some(()),
        );
        let key = ha.cluster.path().join(".cairn/dev/gitops/operator_ed25519");
        let on = ha.cluster.cairn(&[
            "node",
            "maintenance",
            &leaving,
            "--on",
            "--data-dir",
            ".cairn",
            "--key",
            &key.to_string_lossy(),
        ]);
        assert_eq!(on.code, 0, "{on:?}");
        assert!(on.stdout.contains("moved live"), "{on:?}");
        let started = Instant::now();
        // Watch the log for the new copy and the drop, and the status for progress.
        let mut new_copy_seen = None;
        let mut progress = Vec::new();
        let dropped_seen = ha.wait(
            "the copy moved off the node in maintenance",
            Duration::from_secs(240),
            |s| {
                let lines = db_data_lines(&ha);
                if new_copy_seen.is_none()
                    && lines
                        .iter()
                        .any(|l| l.contains(&format!("new copy on {third}")))
                {
                    new_copy_seen = Some(Instant::now());
                }
                if let Some(r) = s["volumes"]
                    .as_array()
                    .and_then(|v| v.iter().find(|v| v["name"] == "db-data"))
                    .map(|v| v["rebuild"].clone())
                    .filter(|r| !r.is_null())
                {
                    // The VM's disk row carries the same progress (issue 15 item 6).
                    let disk = s["vms"]
                        .as_array()
                        .and_then(|vms| vms.iter().find(|v| v["name"] == "db"))
                        .and_then(|vm| vm["disks"].as_array())
                        .and_then(|d| d.iter().find(|d| d["volume"] == "db-data"))
                        .map(|d| d["rebuild"].clone());
                    assert_eq!(disk.as_ref(), Some(&r), "db's disk row in {s:#}");
                    if progress.last() != Some(&r["percent_done"]) {
                        progress.push(r["percent_done"].clone());
                    }
                }
                lines
                    .iter()
                    .any(|l| l.contains(&format!("the moved copy on {leaving} is forgotten")))
                    .then(Instant::now)
            },
        );
        let new_copy_seen = new_copy_seen.expect("the new copy seen before the drop");
        eprintln!(
            "moved in {:?}; status showed the rebuild's percent done as {progress:?}",
            started.elapsed()
        );
        // One more write after the move, then stop.
        let count = acked.lock().unwrap().len();
        ha.wait(
            "a guest write after the move",
            Duration::from_secs(120),
            |_| (acked.lock().unwrap().len() > count).then_some(()),
        );
        stop.store(true, Ordering::SeqCst);
        let during = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.at >= new_copy_seen && w.asked <= dropped_seen)
            .count();
        eprintln!("{during} guest write(s) in flight between the new copy and the drop");
        assert!(
            during >= 1,
            "a guest write was in flight while the copy moved"
        );
    });
    let lines = db_data_lines(&ha);
    for line in &lines {
        eprintln!("  {}", line.chars().take(240).collect::<String>());
    }
    let position = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in the controller log:\n{}", lines.join("\n")))
    };
    let new_copy = position(&format!("new copy on {third}"));
    let joined = position(&format!("added copy {third}"));
    let dropped = position(&format!("the moved copy on {leaving} is forgotten"));
    assert!(
        new_copy < joined && joined < dropped,
        "new copy, then in sync, then the leaving one dropped"
    );
    assert!(lines[new_copy].contains(&format!("live move of the copy on {leaving}")));
    // The copy staying in the set learnt the new one from the epoch (no refusal, no
    // write refused by it meanwhile).
    assert!(
        !lines.iter().any(|l| l.contains("not installed")),
        "every epoch installed on every copy:\n{}",
        lines.join("\n")
    );

    // No acknowledged write lost: the guest reads back each one's bytes.
    let acked = acked.lock().unwrap();
    eprintln!(
        "{} guest writes acknowledged, {} failed (not acknowledged)",
        acked.len(),
        failed.lock().unwrap()
    );
    for w in acked.iter() {
        let read = guest_io(&ha, "checksum", w.offset, w.seed);
        assert_eq!(
            read.as_deref(),
            Some(w.crc.as_str()),
            "the write of seed {} at {}",
            w.seed,
            w.offset
        );
    }
    // Both copies the same, byte for byte and checksum for checksum; the leaving
    // node holds no copy any more.
    let size = 256 << 20;
    let (w_bytes, w_sums) = read_copy(&ha, &address(&writer), "db-data", size);
    let (t_bytes, t_sums) = read_copy(&ha, &address(&third), "db-data", size);
    assert_eq!(
        w_sums, t_sums,
        "block checksums of {writer} and {third} differ"
    );
    assert!(w_bytes == t_bytes, "bytes of {writer} and {third} differ");
    let last = acked.last().expect("writes");
    let at = last.offset as usize;
    assert!(w_bytes[at..at + 65536].iter().any(|b| *b != 0));
    assert!(
        !volumes_on(&ha, &address(&leaving)).contains(&"db-data".to_owned()),
        "db-data's copy deleted on {leaving}"
    );
}
