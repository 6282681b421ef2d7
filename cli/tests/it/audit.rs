//! `cairn audit verify` against a real dev cluster: an intact log exits 0 with
//! its head; an altered entry exits 1 naming it; a log whose newest entries were
//! cut off (a consistent, correctly signed shorter chain) passes `--offline` but
//! fails against the nodes, which saw the longer head with each request.

use redb::{Database, ReadableTable, TableDefinition};

use crate::engine::Cluster;

const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// Rewrites the audit table of the cluster's state store.
fn tamper(cluster: &Cluster, f: impl FnOnce(&mut redb::Table<u64, &[u8]>)) {
    let db = Database::create(cluster.path().join(".cairn/state.redb")).expect("open state");
    let tx = db.begin_write().expect("begin");
    {
        let mut table = tx.open_table(AUDIT).expect("audit table");
        f(&mut table);
    }
    tx.commit().expect("commit");
}

#[test]
fn audit_verify_finds_an_altered_entry_and_a_cut_tail_through_the_nodes_anchors() {
    let cluster = Cluster::up("audit");
    let none = cluster.cairn(&["audit", "verify", "."]);
    assert_eq!(none.code, 1, "{none:?}");
    assert!(none.stderr.contains("there is no state store"), "{none:?}");
    // Four audited plans; `status` then carries the head (entry 4) to every node.
    for _ in 0..4 {
        let plan = cluster.cairn(&["plan", "."]);
        assert!(plan.code == 0 || plan.code == 3, "{plan:?}");
    }
    let status = cluster.cairn(&["status", "."]);
    assert_eq!(status.code, 0, "{status:?}");
    let intact = cluster.cairn(&["audit", "verify", "."]);
    assert_eq!(intact.code, 0, "{intact:?}");
    assert!(
        intact
            .stdout
            .contains("intact: 4 entries, head entry 4 hash "),
        "{intact:?}"
    );
    assert!(
        intact
            .stdout
            .contains("3 of 3 nodes answered; the highest entry a node saw is 4"),
        "{intact:?}"
    );

    // Cut the tail: entries 3 and 4 go; 1..2 are still a valid signed chain.
    let mut saved = vec![];
    tamper(&cluster, |t| {
        for seq in [3u64, 4] {
            saved.push((seq, t.get(seq).unwrap().unwrap().value().to_vec()));
            t.remove(seq).unwrap();
        }
    });
    let offline = cluster.cairn(&["audit", "verify", ".", "--offline"]);
    assert_eq!(offline.code, 0, "{offline:?}");
    assert!(offline.stdout.contains("head entry 2 "), "{offline:?}");
    let cut = cluster.cairn(&["audit", "verify", "."]);
    assert_eq!(cut.code, 1, "{cut:?}");
    assert!(
        cut.stderr.contains("the log's tail was cut: node ")
            && cut.stderr.contains(" saw entry 4 (hash ")
            && cut.stderr.contains("the log ends at entry 2"),
        "{cut:?}"
    );

    // Put them back, then alter entry 2's detail: named by its seq.
    tamper(&cluster, |t| {
        for (seq, bytes) in &saved {
            t.insert(*seq, bytes.as_slice()).unwrap();
        }
        let text = String::from_utf8(t.get(2).unwrap().unwrap().value().to_vec()).unwrap();
        assert!(text.contains("\"steps\":"), "{text}");
        let altered = text.replacen("\"steps\":", "\"steps\":1", 1);
        t.insert(2, altered.as_bytes()).unwrap();
    });
    let altered = cluster.cairn(&["audit", "verify", "."]);
    assert_eq!(altered.code, 1, "{altered:?}");
    assert!(
        altered.stderr.contains(
            "is broken at entry 2: its content (event `plan`) does not match its content hash"
        ),
        "{altered:?}"
    );
}
