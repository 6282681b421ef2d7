//! A bounded log that every controller replica appends to and reads the same
//! (`SharedLog`): the controller's events (issue 24), so `cairn events` shows one
//! history whichever replica answers, and a new leader shows its predecessor's.
//!
//! Keys under `PREFIX/`:
//! - `NAME/SEQ20`: one record (the caller's bytes), `SEQ` from 1, zero-padded;
//! - `NAME_seq`: the last sequence number given.
//!
//! An append reads `NAME_seq` and commits, in one transaction comparing its
//! `mod_revision`, the new counter and the records (up to [`BATCH`] per
//! transaction): two replicas appending at once never give one number twice, and
//! the loser reads the counter again. Appends are not fenced: a follower's events
//! (that it follows, that it cannot reach etcd) belong to the history too.
//!
//! Retention: each append that crosses a multiple of [`TRIM_EVERY`] deletes, in the
//! same transaction, every record more than `keep` behind the newest.
//!
//! Reads go backwards from the counter in pages of [`PAGE`] sequence numbers, each
//! an ascending range read of at most that many keys (etcd sorts a descending read
//! over the whole range before its limit).

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, TxnOp};
use reconciler::state::StateError;

use crate::store::EtcdStore;

/// Records per append transaction (etcd allows 128 operations in one).
pub const BATCH: usize = 100;

/// Records are trimmed when an append crosses a multiple of this.
pub const TRIM_EVERY: u64 = 500;

/// Sequence numbers per page of a backward read.
pub const PAGE: u64 = 500;

/// A bounded log in etcd shared by every replica.
#[derive(Debug, Clone)]
pub struct SharedLog {
    store: EtcdStore,
    name: String,
    keep: u64,
}

impl SharedLog {
    /// The log `name` in `store` (its writes are never fenced), keeping the newest
    /// `keep` records.
    pub fn new(store: &EtcdStore, name: &str, keep: u64) -> SharedLog {
        SharedLog {
            store: store.unfenced(),
            name: name.to_owned(),
            keep: keep.max(1),
        }
    }

    fn record_key(&self, seq: u64) -> String {
        self.store.target().key(&format!("{}/{seq:020}", self.name))
    }

    fn counter(&self) -> Result<(u64, Option<i64>), StateError> {
        let rest = format!("{}_seq", self.name);
        match self.store.get(&rest)? {
            Some((bytes, mod_revision, _)) => {
                Ok((self.store.decode::<u64>(&rest, &bytes)?, Some(mod_revision)))
            }
            None => Ok((0, None)),
        }
    }

    /// The newest sequence number given (0: none yet).
    pub fn last(&self) -> Result<u64, StateError> {
        Ok(self.counter()?.0)
    }

    /// Appends `records` in order; returns the sequence number of the first.
    pub fn append(&self, records: &[Vec<u8>]) -> Result<u64, StateError> {
        let mut first = None;
        for batch in records.chunks(BATCH) {
            let start = self.append_batch(batch)?;
            first.get_or_insert(start);
        }
        Ok(first.unwrap_or(0))
    }

    fn append_batch(&self, batch: &[Vec<u8>]) -> Result<u64, StateError> {
        let counter_key = self.store.target().key(&format!("{}_seq", self.name));
        for _ in 0..50 {
            let (last, mod_revision) = self.counter()?;
            let compare = match mod_revision {
                Some(revision) => {
                    Compare::mod_revision(counter_key.clone(), CompareOp::Equal, revision)
                }
                None => Compare::create_revision(counter_key.clone(), CompareOp::Equal, 0),
            };
            let next = last + batch.len() as u64;
            let mut ops = vec![TxnOp::put(
                counter_key.clone(),
                serde_json::to_vec(&next).expect("numbers serialize"),
                None,
            )];
            for (n, record) in batch.iter().enumerate() {
                ops.push(TxnOp::put(
                    self.record_key(last + 1 + n as u64),
                    record.clone(),
                    None,
                ));
            }
            if next / TRIM_EVERY != last / TRIM_EVERY && next > self.keep {
                // Every record older than the newest `keep`: [NAME/0…, NAME/(next-keep+1)).
                ops.push(TxnOp::delete(
                    self.record_key(0),
                    Some(DeleteOptions::new().with_range(self.record_key(next - self.keep + 1))),
                ));
            }
            if self
                .store
                .commit("append to shared log", vec![compare], ops)?
            {
                return Ok(last + 1);
            }
        }
        Err(StateError::Etcd {
            url: self.store.url().to_owned(),
            operation: "append to shared log",
            message: format!(
                "`{}`: the sequence number moved under 50 attempts in a row",
                self.name
            ),
        })
    }

    /// Visits the records newest first, with their sequence numbers, until `visit`
    /// returns false or `scan` records were visited.
    pub fn newest(
        &self,
        scan: usize,
        mut visit: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StateError> {
        let (last, _) = self.counter()?;
        let oldest = last.saturating_sub(self.keep + TRIM_EVERY);
        let mut high = last;
        let mut seen = 0;
        while high > oldest && seen < scan {
            let low = high.saturating_sub(PAGE).max(oldest) + 1;
            let options = GetOptions::new()
                .with_range(self.record_key(high + 1))
                .with_limit(PAGE as i64);
            let mut client = self.store.client();
            let key = self.record_key(low);
            let response = self.store.run("read shared log", async move {
                client.get(key, Some(options)).await
            })?;
            for kv in response.kvs().iter().rev() {
                let key = String::from_utf8_lossy(kv.key());
                let Some(seq) = key.rsplit('/').next().and_then(|s| s.parse::<u64>().ok()) else {
                    continue;
                };
                seen += 1;
                if !visit(seq, kv.value()) || seen >= scan {
                    return Ok(());
                }
            }
            high = low - 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Etcd;

    /// etcd on 127.0.0.35 at `port` (apart from the store tests' 127.0.0.31).
    fn etcd(port: u16) -> Option<(Etcd, tempfile::TempDir)> {
        crate::store::tests::etcd_on("127.0.0.35", port)
    }

    fn newest(log: &SharedLog, scan: usize) -> Vec<(u64, String)> {
        let mut out = vec![];
        log.newest(scan, |seq, bytes| {
            out.push((seq, String::from_utf8_lossy(bytes).into_owned()));
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn replicas_append_to_one_numbered_history_and_the_oldest_records_are_trimmed() {
        let Some((etcd, _dir)) = etcd(23807) else {
            return;
        };
        let store = || EtcdStore::open(&etcd.url("log")).unwrap();
        let (a, b) = (store(), store());
        let (a, b) = (
            SharedLog::new(&a, "events", 1000),
            SharedLog::new(&b, "events", 1000),
        );
        assert_eq!(a.last().unwrap(), 0);
        assert!(newest(&b, 10).is_empty());
        assert_eq!(a.append(&[b"a1".to_vec(), b"a2".to_vec()]).unwrap(), 1);
        assert_eq!(b.append(&[b"b3".to_vec()]).unwrap(), 3);
        assert_eq!(
            newest(&a, 10),
            [(3, "b3".into()), (2, "a2".into()), (1, "a1".into())]
        );
        assert_eq!(newest(&b, 2), [(3, "b3".into()), (2, "a2".into())]);

        // Six replicas append 50 batches of 7 at once: every number is given once,
        // and each batch keeps its order.
        let logs: Vec<SharedLog> = (0..6)
            .map(|_| SharedLog::new(&store(), "events", 1000))
            .collect();
        std::thread::scope(|scope| {
            for (r, log) in logs.iter().enumerate() {
                scope.spawn(move || {
                    for n in 0..50 {
                        let batch: Vec<Vec<u8>> = (0..7)
                            .map(|i| format!("{r}.{n}.{i}").into_bytes())
                            .collect();
                        log.append(&batch).unwrap();
                    }
                });
            }
        });
        assert_eq!(a.last().unwrap(), 3 + 6 * 50 * 7);
        let all = newest(&a, usize::MAX);
        let seqs: Vec<u64> = all.iter().map(|(seq, _)| *seq).collect();
        let expected: Vec<u64> = (2103 - seqs.len() as u64 + 1..=2103).rev().collect();
        assert_eq!(seqs, expected, "the newest records, every number once");
        for pair in all.windows(2) {
            let (newer, older) = (&pair[0].1, &pair[1].1);
            let (n, o): (Vec<&str>, Vec<&str>) =
                (newer.split('.').collect(), older.split('.').collect());
            if n.len() == 3 && o.len() == 3 && n[0] == o[0] && n[1] == o[1] {
                assert!(
                    n[2] > o[2],
                    "a batch keeps its order: {older} before {newer}"
                );
            }
        }
        // Bounded: at most `keep` plus one trim interval are left.
        assert!(
            all.len() >= 1000 && all.len() as u64 <= 1000 + TRIM_EVERY,
            "{} records kept",
            all.len()
        );
        // Another prefix holds none of it.
        let other = SharedLog::new(&EtcdStore::open(&etcd.url("other")).unwrap(), "events", 10);
        assert!(newest(&other, 10).is_empty());
    }
}
