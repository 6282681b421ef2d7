//! A backup of the control plane's state in etcd, and its restore into another etcd
//! or prefix (`cairn controller backup|restore`, issue 24 item 7).
//!
//! A backup is every durable key under `PREFIX/`, read at one revision, as JSON lines:
//!
//! | line | content |
//! |---|---|
//! | first | the header: `{"format": "cairn-state-backup/v1", "prefix", "revision", "state_format", "token_base", "created_unix"}` |
//! | then, one per key | `{"key": KEY relative to PREFIX/, "value": BASE64}`, in key order |
//! | last | `{"end": true, "keys": N, "sha256": HEX}`: the SHA-256 of every line before it |
//!
//! Left out, because they belong to processes and time, not to the state: the
//! election key and the record of the last term's lease (`election_lease`), the apply
//! lock, the node lease grants (`leases/`) and any key on an etcd lease. A new leader
//! campaigns afresh and, knowing no previous lease, waits out one TTL before its first
//! node call, as after a cold start.
//!
//! The fencing tokens. Nodes refuse a controller whose token is lower than the
//! highest they have seen, and a token is the election key's create revision, which
//! starts low again in a new etcd. So the header's `token_base` is the source's base
//! plus the revision it was read at (no token the source issued is higher), and the
//! restore writes it as `meta/token_base`, which [`crate::election`] adds to every
//! token.
//!
//! A restore goes only into an empty prefix. It reads and checks the whole file
//! first, then marks the prefix `meta/restoring` (the backup's SHA-256, only if the
//! prefix has neither it nor `meta/format_version`), writes the keys in transactions
//! that each compare that mark, and in the last one writes the format version and the
//! token base and removes the mark. A prefix with the mark is refused by
//! [`crate::EtcdStore::open`] (a controller never starts on half a state), and a
//! restore of the same file cut off half-way can be run again: it goes on.

use std::io::{BufRead, Write};

use base64::Engine as _;
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use reconciler::state::{STATE_FORMAT_VERSION, StateError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{EtcdStore, prefix_end};

/// The key of the token base (under `PREFIX/`).
pub const TOKEN_BASE: &str = "meta/token_base";
/// The key of an unfinished restore's mark (under `PREFIX/`).
pub(crate) const RESTORING: &str = "meta/restoring";
/// The backup's format.
pub const FORMAT: &str = "cairn-state-backup/v1";

const FORMAT_KEY: &str = "meta/format_version";
/// Keys per page when reading.
const PAGE: i64 = 500;
/// Operations per restore transaction (etcd allows 128).
const MAX_OPS: usize = 100;
/// Value bytes per restore transaction (etcd takes at most 1.5 MiB per request).
const MAX_TXN_BYTES: usize = 1024 * 1024;

/// The first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    format: String,
    prefix: String,
    revision: i64,
    state_format: u32,
    token_base: u64,
    created_unix: u64,
}

/// One key.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    key: String,
    value: String,
}

/// The last line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    end: bool,
    keys: usize,
    sha256: String,
}

/// What a backup or a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Keys written.
    pub keys: usize,
    /// Value bytes (decoded).
    pub bytes: u64,
    /// The source's revision the backup was read at.
    pub revision: i64,
    /// The token base a restore sets (every fencing token after it is higher).
    pub token_base: u64,
    /// The backup's SHA-256 (of every line before the trailer).
    pub sha256: String,
}

/// Whether `key` (relative to the prefix) is left out of a backup.
fn transient(key: &str) -> bool {
    key == "election"
        || key == crate::election::LEASE_RECORD
        || key == "meta/lock"
        || key == RESTORING
        || key == TOKEN_BASE
        || key == FORMAT_KEY
        || key.starts_with("leases/")
}

fn etcd_error(store: &EtcdStore, operation: &'static str, message: String) -> StateError {
    StateError::Etcd {
        url: store.url().to_owned(),
        operation,
        message,
    }
}

/// The error of a store whose prefix holds an unfinished restore of the backup `sha`.
pub(crate) fn unfinished(store: &EtcdStore, sha: &[u8]) -> StateError {
    StateError::Unfinished {
        url: store.url().to_owned(),
        message: format!(
            "a restore into this prefix did not finish (the backup with sha256 {}): run `cairn controller restore --state {} FILE` again with that file, or delete the prefix (`etcdctl del --prefix {}/`) and restore again",
            String::from_utf8_lossy(sha),
            store.url(),
            store.target().prefix
        ),
    }
}

/// Writes a backup of the state at `url` (`etcd://HOSTS/PREFIX`) to `out`.
pub fn backup(url: &str, out: &mut dyn Write) -> Result<Summary, StateError> {
    let store = EtcdStore::connect(url)?;
    if let Some((sha, _, _)) = store.get(RESTORING)? {
        return Err(unfinished(&store, &sha));
    }
    let Some((format, _, _)) = store.get(FORMAT_KEY)? else {
        return Err(etcd_error(
            &store,
            "backup",
            format!(
                "no cairn state under {}/ (no {FORMAT_KEY}): check the URL's prefix (the controller's --state)",
                store.target().prefix
            ),
        ));
    };
    let state_format: u32 = std::str::from_utf8(&format)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| {
            etcd_error(
                &store,
                "backup",
                format!(
                    "{FORMAT_KEY} is not a number: {:?}",
                    String::from_utf8_lossy(&format)
                ),
            )
        })?;
    let base = store
        .get(TOKEN_BASE)?
        .and_then(|(value, _, _)| std::str::from_utf8(&value).ok()?.trim().parse::<u64>().ok())
        .unwrap_or(0);

    // Every key at one revision, in pages.
    let start = store.target().key("");
    let end = prefix_end(&start);
    let strip = start.len();
    let mut from = start.clone().into_bytes();
    let mut revision = 0;
    let mut kvs: Vec<(String, Vec<u8>)> = vec![];
    loop {
        let options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE)
            .with_revision(revision);
        let mut client = store.client();
        let key = from.clone();
        let response = store.run(
            "backup",
            async move { client.get(key, Some(options)).await },
        )?;
        if revision == 0 {
            revision = response.header().map_or(0, |h| h.revision());
        }
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let rest = key.get(strip..).unwrap_or_default();
            if kv.lease() != 0 || transient(rest) {
                continue;
            }
            kvs.push((rest.to_owned(), kv.value().to_vec()));
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    let header = Header {
        format: FORMAT.to_owned(),
        prefix: store.target().prefix.clone(),
        revision,
        state_format,
        token_base: base + revision.max(0) as u64,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let mut sha = Sha256::new();
    let mut bytes = 0u64;
    let io = |e: std::io::Error| etcd_error(&store, "write the backup", e.to_string());
    let mut line = |out: &mut dyn Write, text: String| -> Result<(), StateError> {
        let text = text + "\n";
        sha.update(text.as_bytes());
        out.write_all(text.as_bytes()).map_err(io)
    };
    line(
        out,
        serde_json::to_string(&header).expect("headers serialize"),
    )?;
    for (key, value) in &kvs {
        bytes += value.len() as u64;
        let entry = Entry {
            key: key.clone(),
            value: base64::engine::general_purpose::STANDARD.encode(value),
        };
        line(
            out,
            serde_json::to_string(&entry).expect("entries serialize"),
        )?;
    }
    let sha256 = proto::auth::to_hex(&sha.finalize());
    let trailer = Trailer {
        end: true,
        keys: kvs.len(),
        sha256: sha256.clone(),
    };
    writeln!(
        out,
        "{}",
        serde_json::to_string(&trailer).expect("trailers serialize")
    )
    .and_then(|()| out.flush())
    .map_err(|e| etcd_error(&store, "write the backup", e.to_string()))?;
    Ok(Summary {
        keys: kvs.len(),
        bytes,
        revision,
        token_base: header.token_base,
        sha256,
    })
}

/// A backup read and checked whole.
struct Checked {
    header: Header,
    keys: Vec<(String, Vec<u8>)>,
    sha256: String,
}

/// Reads a backup from `input` (named `source` in errors) and checks it.
fn read(source: &str, input: &mut dyn BufRead) -> Result<Checked, String> {
    let mut sha = Sha256::new();
    let mut header: Option<Header> = None;
    let mut keys = vec![];
    let mut trailer: Option<(usize, Trailer)> = None;
    let mut number = 0;
    let mut text = String::new();
    loop {
        text.clear();
        let read = input
            .read_line(&mut text)
            .map_err(|e| format!("{source}: cannot read line {}: {e}", number + 1))?;
        if read == 0 {
            break;
        }
        number += 1;
        let at = |what: String| format!("{source} line {number}: {what}");
        if let Some((end, _)) = &trailer {
            return Err(at(format!(
                "text after the end line (line {end}): the file is not one backup"
            )));
        }
        if !text.ends_with('\n') {
            return Err(at(
                "the line is cut off (no newline): the file is truncated".into(),
            ));
        }
        let line = text.trim_end_matches('\n');
        if header.is_none() {
            let parsed: Header = serde_json::from_str(line).map_err(|e| {
                at(format!(
                    "not a cairn state backup header ({e}); a backup starts with {{\"format\": \"{FORMAT}\", …}}"
                ))
            })?;
            if parsed.format != FORMAT {
                return Err(at(format!(
                    "format `{}` is not `{FORMAT}` (written by another cairn version?)",
                    parsed.format
                )));
            }
            sha.update(text.as_bytes());
            header = Some(parsed);
        } else if line.contains("\"end\"") && !line.contains("\"key\"") {
            let parsed: Trailer = serde_json::from_str(line).map_err(|e| {
                at(format!(
                    "not an end line {{\"end\", \"keys\", \"sha256\"}}: {e}"
                ))
            })?;
            trailer = Some((number, parsed));
        } else {
            let entry: Entry = serde_json::from_str(line)
                .map_err(|e| at(format!("not a key line {{\"key\", \"value\"}}: {e}")))?;
            let value = base64::engine::general_purpose::STANDARD
                .decode(&entry.value)
                .map_err(|e| at(format!("the value of `{}` is not base64: {e}", entry.key)))?;
            if entry.key.is_empty() || transient(&entry.key) {
                return Err(at(format!(
                    "key `{}` is not one a backup holds (election, lock, leases and the store's own marks are left out)",
                    entry.key
                )));
            }
            sha.update(text.as_bytes());
            keys.push((entry.key, value));
        }
    }
    let header = header.ok_or_else(|| format!("{source}: empty: not a cairn state backup"))?;
    let (_, trailer) = trailer.ok_or_else(|| {
        format!(
            "{source}: no end line after line {number}: the file is truncated (a backup ends with {{\"end\": true, \"keys\", \"sha256\"}})"
        )
    })?;
    let sha256 = proto::auth::to_hex(&sha.finalize());
    if trailer.sha256 != sha256 || trailer.keys != keys.len() || !trailer.end {
        return Err(format!(
            "{source}: the end line says {} keys with sha256 {}, the file holds {} keys with sha256 {sha256}: the file was changed or damaged",
            trailer.keys,
            trailer.sha256,
            keys.len()
        ));
    }
    if keys.windows(2).any(|pair| pair[0].0 >= pair[1].0) {
        return Err(format!(
            "{source}: keys are not in order or repeat: the file was changed"
        ));
    }
    Ok(Checked {
        header,
        keys,
        sha256,
    })
}

/// Restores the backup read from `input` (named `source` in errors) into the empty
/// prefix of `url` (`etcd://HOSTS/PREFIX`), or finishes a cut-off restore of it.
pub fn restore(url: &str, source: &str, input: &mut dyn BufRead) -> Result<Summary, StateError> {
    let invalid = |message: String| StateError::Etcd {
        url: url.to_owned(),
        operation: "restore",
        message,
    };
    let checked = read(source, input).map_err(invalid)?;
    if checked.header.state_format > STATE_FORMAT_VERSION {
        return Err(StateError::Newer {
            path: source.to_owned(),
            found: checked.header.state_format,
        });
    }
    let store = EtcdStore::connect(url)?;
    let sha = checked.sha256.clone();
    let mark = store.target().key(RESTORING);
    let resuming = match store.get(RESTORING)? {
        Some((found, _, _)) if found == sha.as_bytes() => true,
        Some((found, _, _)) => return Err(unfinished(&store, &found)),
        None => false,
    };
    if !resuming {
        let start = store.target().key("");
        let options = GetOptions::new()
            .with_range(prefix_end(&start))
            .with_keys_only()
            .with_count_only();
        let mut client = store.client();
        let count = store.run(
            "restore",
            async move { client.get(start, Some(options)).await },
        )?;
        if count.count() > 0 {
            let first = store.target().key("");
            let options = GetOptions::new()
                .with_range(prefix_end(&first))
                .with_keys_only()
                .with_limit(1);
            let mut client = store.client();
            let found = store.run(
                "restore",
                async move { client.get(first, Some(options)).await },
            )?;
            let key = found
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .unwrap_or_default();
            return Err(etcd_error(
                &store,
                "restore",
                format!(
                    "{}/ holds {} keys (the first: {key}): a restore goes only into an empty prefix; name another prefix, or delete this one (`etcdctl del --prefix {}/`) once no controller uses it",
                    store.target().prefix,
                    count.count(),
                    store.target().prefix
                ),
            ));
        }
        let begin = Txn::new()
            .when([
                Compare::create_revision(mark.clone(), CompareOp::Equal, 0),
                Compare::create_revision(store.target().key(FORMAT_KEY), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(mark.clone(), sha.clone(), None)]);
        let mut client = store.client();
        let begun = store.run("restore", async move { client.txn(begin).await })?;
        if !begun.succeeded() {
            return Err(etcd_error(
                &store,
                "restore",
                "another process began writing this prefix at the same time (a controller or another restore): nothing was restored".into(),
            ));
        }
    }
    let marked = || Compare::value(mark.clone(), CompareOp::Equal, sha.clone());
    let mut bytes = 0u64;
    let mut batch: Vec<TxnOp> = vec![];
    let mut batch_bytes = 0;
    let flush = |batch: &mut Vec<TxnOp>| -> Result<(), StateError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = Txn::new().when([marked()]).and_then(std::mem::take(batch));
        let mut client = store.client();
        let done = store.run("restore", async move { client.txn(txn).await })?;
        if done.succeeded() {
            Ok(())
        } else {
            Err(etcd_error(
                &store,
                "restore",
                "the prefix's restore mark changed under this restore (another process wrote it): stopped; run the restore again".into(),
            ))
        }
    };
    for (key, value) in &checked.keys {
        if batch.len() == MAX_OPS || batch_bytes + value.len() > MAX_TXN_BYTES {
            flush(&mut batch)?;
            batch_bytes = 0;
        }
        bytes += value.len() as u64;
        batch_bytes += value.len();
        batch.push(TxnOp::put(store.target().key(key), value.clone(), None));
    }
    flush(&mut batch)?;
    let token_base = checked.header.token_base;
    let finish = Txn::new().when([marked()]).and_then([
        TxnOp::put(
            store.target().key(FORMAT_KEY),
            serde_json::to_vec(&checked.header.state_format).expect("numbers serialize"),
            None,
        ),
        TxnOp::put(store.target().key(TOKEN_BASE), token_base.to_string(), None),
        TxnOp::delete(mark.clone(), None),
    ]);
    let mut client = store.client();
    let finished = store.run("restore", async move { client.txn(finish).await })?;
    if !finished.succeeded() {
        return Err(etcd_error(
            &store,
            "restore",
            "the prefix's restore mark changed before the last write: run the restore again".into(),
        ));
    }
    Ok(Summary {
        keys: checked.keys.len(),
        bytes,
        revision: checked.header.revision,
        token_base,
        sha256: sha,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use reconciler::epochs::EpochStore as _;
    use reconciler::state::{Applied, PlanRecord, StateStore as _, StepRecord, StepStatus};

    use super::*;
    use crate::Election;
    use crate::store::tests::etcd;

    fn step(step: usize) -> StepRecord {
        StepRecord {
            step,
            request_id: format!("e.{step}"),
            status: StepStatus::Succeeded,
            replayed: false,
            attempts: 1,
            error: None,
            at_unix_ms: 1,
        }
    }

    /// Leads `store`'s election: its fenced store and its token.
    fn lead(store: &EtcdStore, me: &str) -> (Arc<Election>, EtcdStore, i64) {
        let election = Election::start(
            store,
            me,
            Duration::from_secs(2),
            proto::fence::SharedFence::default(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(token) = election.acting_token() {
                return (
                    election.clone(),
                    store.clone().with_election(election),
                    token,
                );
            }
            assert!(Instant::now() < deadline, "{me} never led");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every key under the prefix of `store` but the transient ones, with its value.
    fn durable(store: &EtcdStore) -> Vec<(String, Vec<u8>)> {
        store
            .range("", false)
            .unwrap()
            .into_iter()
            .filter(|(key, _)| !transient(key))
            .collect()
    }

    #[test]
    fn a_backup_restored_into_a_new_etcd_is_the_same_state_and_its_leader_outranks_the_old() {
        let Some((source, _a)) = etcd(23786) else {
            return;
        };
        let Some((target, _b)) = etcd(23788) else {
            return;
        };
        // The source: a leader's fenced writes (an execution with a 3.2 MB plan, so a
        // chunked value, its journal, the applied commit) and a volume epoch.
        let plain = EtcdStore::open(&source.url("cairn")).unwrap();
        // A source etcd with some history: its leader's token (the election key's
        // create revision) is above every revision the new etcd reaches in this test.
        for n in 0..300 {
            let applied = Applied {
                revision: format!("r{n}"),
                plan_id: "p-0".into(),
                at_unix_ms: n,
            };
            plain.set_applied(&applied).unwrap();
        }
        let (_election, leader, old_token) = lead(&plain, "http://old");
        let big: Vec<String> = (0..100_000).map(|n| format!("step-{n:025}")).collect();
        leader
            .start_execution(&PlanRecord {
                execution_id: "x-1".into(),
                plan: serde_json::json!(big),
                finished: false,
                ended: None,
                started_at_unix_ms: 1,
            })
            .unwrap();
        leader
            .journal_many("x-1", &(0..150).map(step).collect::<Vec<_>>())
            .unwrap();
        let applied = Applied {
            revision: "abc".into(),
            plan_id: "p-1".into(),
            at_unix_ms: 9,
        };
        leader.set_applied(&applied).unwrap();
        leader.lock("cairn controller").unwrap();
        let copies: std::collections::BTreeSet<String> = ["n1".to_owned(), "n2".to_owned()].into();
        let swapped = reconciler::epochs::EpochAuthority::new(&leader)
            .adopt("db-data", "n1", &copies, &copies, 3, "test")
            .unwrap();
        let mut file = vec![];
        let summary = backup(&source.url("cairn"), &mut file).unwrap();
        assert_eq!(summary.keys, durable(&plain).len());
        assert!(summary.bytes > 3_000_000, "{summary:?}");
        let text = String::from_utf8(file.clone()).unwrap();
        assert!(
            !text.contains("\"key\":\"election\""),
            "the election is left out"
        );
        assert!(
            !text.contains("\"key\":\"meta/lock\""),
            "the lock is left out"
        );
        assert!(
            summary.token_base >= old_token as u64,
            "{summary:?} {old_token}"
        );

        // Restored into another etcd and prefix: the same records.
        let url = target.url("restored");
        let restored = restore(&url, "backup.jsonl", &mut file.as_slice()).unwrap();
        assert_eq!(restored.keys, summary.keys);
        assert_eq!(restored.sha256, summary.sha256);
        let store = EtcdStore::open(&url).unwrap();
        assert_eq!(durable(&store), durable(&plain));
        assert_eq!(store.applied().unwrap(), Some(applied));
        assert_eq!(
            store.executions().unwrap()[0].1.plan,
            serde_json::json!(big)
        );
        assert_eq!(store.journal_of("x-1").unwrap().len(), 150);
        assert_eq!(store.epoch("db-data").unwrap(), Some(swapped));
        assert!(store.lock_holder().unwrap().is_none(), "no lock restored");

        // The restored control plane's leader: a token above every old one (the new
        // etcd's revisions are low), and its fenced writes land.
        let (_new_election, new_leader, new_token) = lead(&store, "http://new");
        assert!(
            new_token > old_token,
            "the new leader's token {new_token} must outrank the old {old_token}"
        );
        new_leader.journal("x-1", &step(150)).unwrap();
        assert_eq!(new_leader.journal_of("x-1").unwrap().len(), 151);

        // Only into an empty prefix.
        let again = restore(&url, "backup.jsonl", &mut file.as_slice()).unwrap_err();
        assert!(
            again.to_string().contains("only into an empty prefix"),
            "{again}"
        );
    }

    #[test]
    fn a_damaged_backup_is_refused_before_anything_is_written_and_a_cut_off_restore_goes_on() {
        let Some((etcd, _dir)) = etcd(23784) else {
            return;
        };
        let source = EtcdStore::open(&etcd.url("src")).unwrap();
        source
            .journal_many("e", &(0..5).map(step).collect::<Vec<_>>())
            .unwrap();
        let mut file = vec![];
        backup(&etcd.url("src"), &mut file).unwrap();
        let text = String::from_utf8(file.clone()).unwrap();
        let refused = |bytes: &[u8], prefix: &str| {
            let url = etcd.url(prefix);
            let error = restore(&url, "b.jsonl", &mut &bytes[..])
                .unwrap_err()
                .to_string();
            let left = EtcdStore::connect(&url).unwrap().range("", true).unwrap();
            assert!(left.is_empty(), "{error}: wrote {left:?}");
            error
        };
        // Cut off before its end line.
        let cut = &text[..text.trim_end().rfind('\n').unwrap() + 1];
        let error = refused(cut.as_bytes(), "d1");
        assert!(error.contains("truncated"), "{error}");
        // One value changed.
        let changed = text.replacen("\"value\":\"", "\"value\":\"AAAA", 1);
        let error = refused(changed.as_bytes(), "d2");
        assert!(error.contains("changed or damaged"), "{error}");
        // Not a backup at all.
        let error = refused(b"hello\n", "d3");
        assert!(error.contains("b.jsonl line 1"), "{error}");

        // A restore cut off after its mark and some keys: the prefix is refused by
        // open, and the same restore run again finishes it.
        let url = etcd.url("cut");
        let checked = read("b.jsonl", &mut file.as_slice()).unwrap();
        let store = EtcdStore::connect(&url).unwrap();
        let (key, value) = &checked.keys[0];
        let mut client = store.client();
        let ops = vec![
            TxnOp::put(store.target().key(RESTORING), checked.sha256.clone(), None),
            TxnOp::put(store.target().key(key), value.clone(), None),
        ];
        store
            .run(
                "test",
                async move { client.txn(Txn::new().and_then(ops)).await },
            )
            .unwrap();
        let error = EtcdStore::open(&url).unwrap_err().to_string();
        assert!(error.contains("did not finish"), "{error}");
        let error = backup(&url, &mut vec![]).unwrap_err().to_string();
        assert!(error.contains("did not finish"), "{error}");
        restore(&url, "b.jsonl", &mut file.as_slice()).unwrap();
        let store = EtcdStore::open(&url).unwrap();
        assert_eq!(store.journal_of("e").unwrap().len(), 5);
        assert_eq!(durable(&store), durable(&source));
    }
}
