//! Crash safety: `kill -9` mid-stream, and full disks.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use storage::{EngineKind, StorageError, Store, StoreOptions};

use crate::{check_read, pattern, spec, store_with_disks};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const CHILD_ENV: &str = "CAIRN_STORAGE_CRASH_CHILD_DIR";
const VOLUME_SIZE: u64 = 4 * MIB;
const SNAPSHOT_AFTER: u64 = 100;

/// Operation `i` of the stream: offset and data. Offsets wrap so later writes overwrite
/// earlier ones in place, every seventh write overwrites the one just before it, and
/// lengths vary so writes straddle stripe units.
fn op(i: u64) -> (u64, Vec<u8>) {
    let slot = if i % 7 == 3 { i - 1 } else { i };
    let offset = (slot % 96) * 20 * KIB;
    let len = 4096 * (1 + i % 3) as usize;
    (offset, pattern(1000 + i, len))
}

/// The volume content after operations `0..n`.
fn model(n: u64) -> Vec<u8> {
    let mut content = vec![0u8; VOLUME_SIZE as usize];
    for i in 0..n {
        let (offset, data) = op(i);
        content[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    content
}

fn child(dir: &str, engine: EngineKind) {
    let store = Store::open(dir, StoreOptions { engine }).expect("child opens store");
    let vol = store.volume("stream").expect("volume exists");
    let mut out = std::io::stdout().lock();
    for i in 0.. {
        if i == SNAPSHOT_AFTER {
            store.create_snapshot("stream", "mid").expect("snapshot");
            writeln!(out, "snap")
                .and_then(|()| out.flush())
                .expect("parent listens");
        }
        let (offset, data) = op(i);
        vol.write_at(offset, &data).expect("write");
        writeln!(out, "ack {i}")
            .and_then(|()| out.flush())
            .expect("parent listens");
    }
}

#[test]
fn kill_9_during_a_write_stream_loses_no_acknowledged_write_io_uring() {
    if storage::FileEngine::new(EngineKind::IoUring).is_err() {
        eprintln!("skipping: io_uring is not available on this kernel");
        return;
    }
    kill_9_scenario(
        EngineKind::IoUring,
        "crash::kill_9_during_a_write_stream_loses_no_acknowledged_write_io_uring",
        false,
    );
}

/// The same stream, but the kill is a power cut: every write no fdatasync covered is
/// discarded before the store reopens (`storage::power_loss`, debug builds only).
#[test]
fn power_loss_during_a_write_stream_loses_no_acknowledged_write_io_uring() {
    if storage::FileEngine::new(EngineKind::IoUring).is_err() {
        eprintln!("skipping: io_uring is not available on this kernel");
        return;
    }
    kill_9_scenario(
        EngineKind::IoUring,
        "crash::power_loss_during_a_write_stream_loses_no_acknowledged_write_io_uring",
        true,
    );
}

#[test]
fn power_loss_during_a_write_stream_loses_no_acknowledged_write_sync_engine() {
    kill_9_scenario(
        EngineKind::Sync,
        "crash::power_loss_during_a_write_stream_loses_no_acknowledged_write_sync_engine",
        true,
    );
}

#[test]
fn kill_9_during_a_write_stream_loses_no_acknowledged_write_sync_engine() {
    kill_9_scenario(
        EngineKind::Sync,
        "crash::kill_9_during_a_write_stream_loses_no_acknowledged_write_sync_engine",
        false,
    );
}

/// The parent half kills a child (this test binary re-executed as `test_name`) that writes
/// and acknowledges a stream of blocks, then checks the reopened store. With
/// `power_loss`, the child records what it overwrites and the parent discards every
/// unsynced write after the kill.
fn kill_9_scenario(engine: EngineKind, test_name: &str, power_loss: bool) {
    if !cfg!(debug_assertions) && power_loss {
        eprintln!("skipping: simulated power loss exists in debug builds only");
        return;
    }
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir, engine);
        return;
    }
    let (dir, store) = store_with_disks(2, 16 * MIB, engine);
    store
        .create_volume(&spec("stream", VOLUME_SIZE, 16 * KIB, 2))
        .unwrap();
    drop(store);

    // Kill at a point that varies from run to run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let kill_after = 150 + u64::from(nanos % 150);
    let undo_log = dir.path().join("power-loss.undo");
    let mut command = Command::new(std::env::current_exe().unwrap());
    if power_loss {
        command.env(storage::power_loss::ENV, &undo_log);
    }
    let mut proc = command
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = proc.stdout.take().unwrap();
    let mut acked: Option<u64> = None;
    let mut snap_acked = false;
    let mut killed = false;
    // Acknowledgements still in the pipe after the kill were sent before the child died,
    // so they count too: read to the end.
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line == "snap" {
            snap_acked = true;
        } else if let Some(n) = line.strip_prefix("ack ") {
            let n: u64 = n.parse().unwrap();
            acked = Some(n);
            if n >= kill_after && !killed {
                proc.kill().unwrap(); // SIGKILL
                killed = true;
            }
        }
    }
    let status = proc.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished");
    let acked = acked.expect("the child acknowledged writes before it was killed");
    assert!(acked >= kill_after);

    eprintln!(
        "child killed with SIGKILL after acknowledging op {acked} (snapshot acknowledged: {snap_acked})"
    );
    if power_loss {
        let recorded = std::fs::metadata(&undo_log).map_or(0, |meta| meta.len());
        assert!(recorded > 0, "the child recorded no write: the mode is off");
        // Whether anything is unsynced at the kill depends on where it lands (an
        // in-place overwrite not yet flushed, redb pages not yet synced).
        let cut = storage::power_loss::cut(&undo_log).unwrap();
        eprintln!("power cut ({recorded} bytes of undo log): {cut:?}");
    }
    let store = Store::open(dir.path(), StoreOptions { engine }).unwrap();
    let recovery = store.recovery();
    eprintln!("recovery: {recovery:?}");
    assert!(
        recovery.journal_records_replayed > 0,
        "the child never checkpointed its last writes, so the journal must be replayed"
    );
    let vol = store.volume("stream").unwrap();
    let mut actual = vec![0u8; VOLUME_SIZE as usize];
    vol.read_at(0, &mut actual)
        .expect("every block verifies its checksum after the crash");
    assert!(vol.scrub().unwrap().is_empty());
    // Every acknowledged write is there. The write in flight at the kill may have landed
    // block by block or not at all, nothing else.
    let old = model(acked + 1);
    let new = model(acked + 2);
    for (b, ((a, o), n)) in actual
        .chunks(4096)
        .zip(old.chunks(4096))
        .zip(new.chunks(4096))
        .enumerate()
    {
        assert!(
            a == o || a == n,
            "block {b} lost an acknowledged write (acked up to op {acked})"
        );
    }
    // The sequence number counts exactly the writes that fully landed: the replication
    // layer relies on it to resend what a replica missed.
    let seq = vol.info().unwrap().seq;
    assert!(
        seq == acked + 1 || seq == acked + 2,
        "seq {seq} after acknowledging op {acked}"
    );
    if seq == acked + 2 {
        assert!(actual == new, "a sequenced write landed completely");
    }
    if snap_acked {
        let mut snap = vec![0u8; VOLUME_SIZE as usize];
        store
            .snapshot("stream", "mid")
            .unwrap()
            .read_at(0, &mut snap)
            .unwrap();
        assert!(
            snap == model(SNAPSHOT_AFTER),
            "the snapshot holds the state at the time it was taken"
        );
    }
    // The store keeps working after recovery.
    let (offset, data) = op(acked + 2);
    vol.write_at(offset, &data).unwrap();
    check_read(&vol, offset, &data);
}

#[test]
fn a_full_disk_gives_no_space_and_corrupts_nothing() {
    // Four 64 KiB extents fit on the disk.
    let (dir, store) = store_with_disks(1, 256 * KIB, EngineKind::Auto);
    let vol = store
        .create_volume(&spec("v", 2 * MIB, 64 * KIB, 1))
        .unwrap();
    let first = pattern(50, 256 * KIB as usize);
    vol.write_at(0, &first).unwrap();
    let seq = vol.info().unwrap().seq;

    match vol.write_at(MIB, &pattern(51, 4096)) {
        Err(StorageError::NoSpace { disk, needed }) => {
            assert_eq!(disk, "d0");
            assert_eq!(needed, 64 * KIB);
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    // A write half in an existing extent and half in a new one fails as a whole.
    assert!(matches!(
        vol.write_at(192 * KIB, &pattern(52, 128 * KIB as usize)),
        Err(StorageError::NoSpace { .. })
    ));
    check_read(&vol, 0, &first);
    check_read(&vol, 256 * KIB, &vec![0u8; 128 * KIB as usize]);
    assert_eq!(
        vol.info().unwrap().seq,
        seq,
        "failed writes are not sequenced"
    );
    assert_eq!(store.disks()[0].allocated, 256 * KIB);

    // Space freed by a trim is usable again, and all of it survives a reopen.
    vol.trim(0, 64 * KIB).unwrap();
    vol.write_at(MIB, &pattern(51, 4096)).unwrap();
    drop((vol, store));
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let vol = store.volume("v").unwrap();
    check_read(&vol, 0, &vec![0u8; 64 * KIB as usize]);
    check_read(&vol, 64 * KIB, &first[64 * KIB as usize..]);
    check_read(&vol, MIB, &pattern(51, 4096));
    assert_eq!(store.disks()[0].allocated, 256 * KIB);
    assert!(vol.scrub().unwrap().is_empty());
}

const LOST_CHILD_ENV: &str = "CAIRN_STORAGE_LOST_WRITE_CHILD_DIR";

/// Simulates power loss after a write's journal record reached the disk but its data did
/// not: the child process writes twice and exits without a clean shutdown; the parent
/// then erases the second write's data from the disk file before reopening.
#[test]
fn a_write_whose_data_never_landed_is_rolled_back_on_recovery() {
    if let Ok(dir) = std::env::var(LOST_CHILD_ENV) {
        let store = Store::open(&dir, StoreOptions::default()).expect("child opens store");
        let vol = store.volume("v").expect("volume exists");
        vol.write_at(0, &pattern(70, 8192)).expect("first write");
        vol.write_at(64 * KIB, &pattern(71, 8192))
            .expect("second write");
        let loc = vol.locate(64 * KIB).unwrap().expect("allocated");
        println!("lost {} {}", loc.path.display(), loc.physical_offset);
        // No drop: no checkpoint, exactly as if the process had died here.
        std::process::exit(0);
    }
    let (dir, store) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    store.create_volume(&spec("v", MIB, 64 * KIB, 1)).unwrap();
    drop(store);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash::a_write_whose_data_never_landed_is_rolled_back_on_recovery",
            "--exact",
            "--nocapture",
        ])
        .env(LOST_CHILD_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("lost "))
        .expect("child reported the location");
    let (path, offset) = line.rsplit_once(' ').unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0u8; 8192], offset.parse().unwrap()).unwrap();
    file.sync_all().unwrap();

    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let recovery = store.recovery();
    assert_eq!(recovery.journal_records_replayed, 2, "{recovery:?}");
    assert_eq!(recovery.blocks_dropped, 2, "{recovery:?}");
    assert_eq!(recovery.sequence_rolled_back.as_deref(), Some("v"));
    let vol = store.volume("v").unwrap();
    assert_eq!(
        vol.info().unwrap().seq,
        1,
        "only the write that landed is sequenced"
    );
    check_read(&vol, 0, &pattern(70, 8192));
    check_read(&vol, 64 * KIB, &[0u8; 8192]);
    assert!(vol.scrub().unwrap().is_empty());
}

const INLINE_CHILD_ENV: &str = "CAIRN_STORAGE_INLINE_CHILD_DIR";

/// A small overwrite is acknowledged once its journal record (which carries the data) is
/// durable; the in-place copy is written without waiting. If that copy is lost in a crash,
/// recovery writes it again from the journal.
#[test]
fn a_small_overwrite_lost_in_place_is_redone_from_the_journal() {
    if let Ok(dir) = std::env::var(INLINE_CHILD_ENV) {
        let store = Store::open(&dir, StoreOptions::default()).expect("child opens store");
        let vol = store.volume("v").expect("volume exists");
        vol.write_at(0, &pattern(80, 16384)).expect("first write");
        vol.write_at(4096, &pattern(81, 8192))
            .expect("small overwrite");
        let loc = vol.locate(4096).unwrap().expect("allocated");
        println!("inline {} {}", loc.path.display(), loc.physical_offset);
        std::process::exit(0);
    }
    let (dir, store) = store_with_disks(1, 4 * MIB, EngineKind::Auto);
    store.create_volume(&spec("v", MIB, 64 * KIB, 1)).unwrap();
    drop(store);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash::a_small_overwrite_lost_in_place_is_redone_from_the_journal",
            "--exact",
            "--nocapture",
        ])
        .env(INLINE_CHILD_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("inline "))
        .expect("child reported the location");
    let (path, offset) = line.rsplit_once(' ').unwrap();
    // Put the old bytes back, as if the in-place write had never reached the disk.
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &file,
        &pattern(80, 16384)[4096..12288],
        offset.parse().unwrap(),
    )
    .unwrap();
    file.sync_all().unwrap();

    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.recovery().journal_records_replayed, 2);
    assert_eq!(store.recovery().blocks_dropped, 0, "{:?}", store.recovery());
    let vol = store.volume("v").unwrap();
    let mut expected = pattern(80, 16384);
    expected[4096..12288].copy_from_slice(&pattern(81, 8192));
    check_read(&vol, 0, &expected);
    assert_eq!(vol.info().unwrap().seq, 2);
}
