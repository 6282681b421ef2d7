//! Versions of what the store leaves on disk: the metadata format in `meta.redb` and the
//! journal frames at the end of each disk. What this build wrote opens again; a newer
//! format is refused with a message saying so, never half-read.

use std::os::unix::fs::FileExt;

use redb::{Database, ReadableDatabase, TableDefinition};
use storage::{DiskSource, EngineKind, StorageError, Store, StoreOptions};

use crate::{check_read, pattern, spec};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The metadata format this build writes (see `meta::FORMAT_VERSION`).
const FORMAT: u64 = 3;
const CAPACITY: u64 = 8 << 20;

fn options() -> StoreOptions {
    StoreOptions {
        engine: EngineKind::Sync,
    }
}

/// A store with one disk and one written volume, closed again.
fn written_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), options()).expect("open");
    store
        .add_disk("d0", DiskSource::File { capacity: CAPACITY })
        .expect("disk");
    let volume = store
        .create_volume(&spec("v", 1 << 20, 65536, 1))
        .expect("volume");
    volume.write_at(0, &pattern(7, 65536)).expect("write");
    dir
}

fn set_format(dir: &std::path::Path, format: u64) {
    let db = Database::create(dir.join("meta.redb")).expect("meta.redb");
    let txn = db.begin_write().expect("begin");
    txn.open_table(META)
        .expect("meta table")
        .insert("format", format)
        .expect("insert");
    txn.commit().expect("commit");
}

#[test]
fn a_store_records_its_format_and_opens_again() {
    let dir = written_store();
    {
        let db = Database::create(dir.path().join("meta.redb")).expect("meta.redb");
        let txn = db.begin_read().expect("read");
        let format = txn
            .open_table(META)
            .expect("meta")
            .get("format")
            .expect("get")
            .map(|v| v.value());
        assert_eq!(
            format,
            Some(FORMAT),
            "the on-disk format changed: bump FORMAT_VERSION, read the previous format, and update this test"
        );
    }
    let store = Store::open(dir.path(), options()).expect("reopen");
    check_read(&store.volume("v").expect("volume"), 0, &pattern(7, 65536));
}

#[test]
fn a_newer_metadata_format_is_refused_saying_so() {
    let dir = written_store();
    set_format(dir.path(), FORMAT + 1);
    let error = Store::open(dir.path(), options()).expect_err("newer format refused");
    assert!(
        matches!(
            error,
            StorageError::NewerFormat {
                what: "metadata",
                found: 4,
                supported: 3,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("format 4, written by a newer cairn-node")
            && message.contains("this build reads format 3")
            && message.contains("meta.redb"),
        "{message}"
    );
}

#[test]
fn an_older_development_format_is_refused_saying_so() {
    let dir = written_store();
    set_format(dir.path(), 2);
    let message = Store::open(dir.path(), options())
        .expect_err("old format refused")
        .to_string();
    assert!(
        message.contains("format version 2 is a development format older than 3"),
        "{message}"
    );
}

#[test]
fn a_journal_frame_of_a_newer_version_is_refused_not_skipped() {
    let dir = written_store();
    let disk = dir.path().join("disks/d0.img");
    // The ring starts right after the disk's capacity.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .expect("disk file");
    let mut header = [0u8; 8];
    file.read_exact_at(&mut header, CAPACITY)
        .expect("journal head");
    assert_eq!(&header, b"CAIRNJR1", "the write left a version-1 frame");
    file.write_all_at(b"CAIRNJR2", CAPACITY).expect("write");
    drop(file);
    let error = Store::open(dir.path(), options()).expect_err("newer journal refused");
    let message = error.to_string();
    assert!(
        matches!(
            error,
            StorageError::NewerFormat {
                what: "journal",
                found: 2,
                supported: 1,
                ..
            }
        ) && message.contains("d0.img"),
        "{message}"
    );
}
