//! The volumes' epochs in etcd (`reconciler::epochs::EpochStore`), so that controller
//! replicas share one epoch authority: a new leader holds the epochs its predecessor
//! raised, and never hands a volume to a writer the old leader fenced off.
//!
//! Keys under `PREFIX/`:
//! - `epochs/VOLUME`: the volume's current `VolumeEpoch` (JSON);
//! - `epoch_journal/VOLUME/EPOCH20`: the `EpochChange` that made that epoch.
//!
//! A change is one transaction that compares the volume key's `mod_revision` with the
//! one its current state was read at (`create_revision == 0` when it had none), plus
//! the leader's fencing token like every write of the store, and puts the state and
//! its journal record together. Two writers that read the same epoch: the first
//! transaction lands, the second finds the key moved and nothing of it is written.
//!
//! The journal is trimmed in that same transaction: a volume keeps the records of its
//! newest [`JOURNAL_KEPT`] epochs (one range delete below them). Recovery needs none
//! of it: a new leader reads `epochs/VOLUME` and compares against its revision; the
//! journal explains the recent changes (the `volume-epoch` events name the record of
//! the epoch just made). Without the trim 100,000 volumes would grow it for ever.

use etcd_client::{Compare, CompareOp, DeleteOptions, TxnOp};
use reconciler::epochs::{EpochChange, EpochStore, Swapped, VolumeEpoch, journal_key};
use reconciler::state::StateError;

use crate::store::EtcdStore;

fn state_key(volume: &str) -> String {
    format!("epochs/{volume}")
}

fn journal_rest(volume: &str, epoch: u64) -> String {
    format!("epoch_journal/{}", journal_key(volume, epoch))
}

/// Journal records kept per volume in etcd: its newest epochs' changes.
pub const JOURNAL_KEPT: u64 = 64;

impl EtcdStore {
    /// A volume's stored state with the revision its key was last changed at.
    fn epoch_at(&self, volume: &str) -> Result<Option<(VolumeEpoch, i64)>, StateError> {
        let rest = state_key(volume);
        match self.get(&rest)? {
            Some((bytes, mod_revision, _)) => Ok(Some((self.decode(&rest, &bytes)?, mod_revision))),
            None => Ok(None),
        }
    }
}

impl EpochStore for EtcdStore {
    fn epoch_store_name(&self) -> String {
        self.url().to_owned()
    }

    fn epoch(&self, volume: &str) -> Result<Option<VolumeEpoch>, StateError> {
        Ok(self.epoch_at(volume)?.map(|(state, _)| state))
    }

    fn epochs(&self) -> Result<Vec<VolumeEpoch>, StateError> {
        self.range("epochs/", false)?
            .into_iter()
            .map(|(key, bytes)| self.decode(&key, &bytes))
            .collect()
    }

    fn epoch_journal(&self, volume: &str) -> Result<Vec<EpochChange>, StateError> {
        self.range(&format!("epoch_journal/{volume}/"), false)?
            .into_iter()
            .map(|(key, bytes)| self.decode(&key, &bytes))
            .collect()
    }

    fn swap_epoch(
        &self,
        expected: Option<u64>,
        change: &EpochChange,
    ) -> Result<Swapped, StateError> {
        let volume = change.state.volume.as_str();
        let key = self.target().key(&state_key(volume));
        let current = self.epoch_at(volume)?;
        let found = current.as_ref().map(|(state, _)| state.epoch);
        if found != expected {
            return Ok(Swapped::Found(found));
        }
        let compare = match &current {
            Some((_, mod_revision)) => {
                Compare::mod_revision(key.clone(), CompareOp::Equal, *mod_revision)
            }
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        let mut ops = vec![
            TxnOp::put(
                key,
                serde_json::to_vec(&change.state).expect("epochs serialize"),
                None,
            ),
            TxnOp::put(
                self.target().key(&journal_rest(volume, change.state.epoch)),
                serde_json::to_vec(change).expect("epochs serialize"),
                None,
            ),
        ];
        // Records of epochs below the newest JOURNAL_KEPT go in the same transaction
        // (zero-padded keys: [epoch 0, first kept) is one range).
        let first_kept = change.state.epoch.saturating_sub(JOURNAL_KEPT - 1);
        if first_kept > 0 {
            ops.push(TxnOp::delete(
                self.target().key(&journal_rest(volume, 0)),
                Some(
                    DeleteOptions::new()
                        .with_range(self.target().key(&journal_rest(volume, first_kept))),
                ),
            ));
        }
        if self.commit("swap volume epoch", vec![compare], ops)? {
            return Ok(Swapped::Stored);
        }
        // Another writer changed it between the read and the transaction.
        Ok(Swapped::Found(self.epoch(volume)?.map(|state| state.epoch)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Barrier};

    use reconciler::epochs::{EpochAuthority, EpochError};

    use super::*;
    use crate::testing::Etcd;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// etcd on 127.0.0.35 at `port` (apart from the store tests' 127.0.0.31).
    fn etcd(port: u16) -> Option<(Etcd, tempfile::TempDir)> {
        crate::store::tests::etcd_on("127.0.0.35", port)
    }

    #[test]
    fn epochs_in_etcd_are_journaled_compare_and_swaps_and_racing_writers_have_one_winner() {
        let Some((etcd, _dir)) = etcd(23801) else {
            return;
        };
        let a = EtcdStore::open(&etcd.url("ep")).unwrap();
        let b = EtcdStore::open(&etcd.url("ep")).unwrap();
        let abc = names(&["a", "b", "c"]);
        let first = EpochAuthority::new(&a)
            .adopt("vol", "a", &abc, &abc, 4, "first seen")
            .unwrap();
        assert_eq!(first.epoch, 5, "above the floor the copies reported");
        // The other replica's store sees it, and its changes build on it.
        let seen = EpochAuthority::new(&b).get("vol").unwrap().unwrap();
        assert_eq!(seen, first);
        let moved = EpochAuthority::new(&b)
            .set_writer("vol", 5, "b", "a failed")
            .unwrap();
        assert_eq!((moved.epoch, moved.writer.as_str()), (6, "b"));
        // A change from the epoch a saw before is refused, naming the one stored.
        let stale = EpochAuthority::new(&a)
            .remove_copy("vol", 5, "c", "late")
            .unwrap_err();
        assert!(
            matches!(
                stale,
                EpochError::Conflict {
                    expected: 5,
                    found: 6,
                    ..
                }
            ),
            "{stale}"
        );
        // Adopting a volume that has an epoch is refused too.
        assert!(matches!(
            EpochAuthority::new(&a).adopt("vol", "a", &abc, &abc, 0, "again"),
            Err(EpochError::Conflict { found: 6, .. })
        ));
        let journal = EpochAuthority::new(&a).journal("vol").unwrap();
        let epochs: Vec<u64> = journal.iter().map(|c| c.state.epoch).collect();
        assert_eq!(epochs, [5, 6]);
        assert_eq!(journal[1].change, "writer a → b");
        assert_eq!(journal[1].previous, 5);

        // Racing writers: 8 threads, each with its own connection, all read epoch 6
        // and try a different change from it at once. etcd's transaction lets exactly
        // one land; every other is a conflict naming epoch 7, and the journal holds
        // one record for epoch 7.
        let stores: Vec<EtcdStore> = (0..8)
            .map(|_| EtcdStore::open(&etcd.url("ep")).unwrap())
            .collect();
        let barrier = Arc::new(Barrier::new(stores.len()));
        let outcomes: Vec<Result<VolumeEpoch, EpochError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(n, store)| {
                    let barrier = barrier.clone();
                    scope.spawn(move || {
                        barrier.wait();
                        EpochAuthority::new(store).set_clients(
                            "vol",
                            6,
                            &names(&[&format!("client-{n}")]),
                            &format!("writer {n}"),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<&VolumeEpoch> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "exactly one CAS wins: {outcomes:?}");
        for outcome in &outcomes {
            if let Err(error) = outcome {
                assert!(
                    matches!(
                        error,
                        EpochError::Conflict {
                            expected: 6,
                            found: 7,
                            ..
                        }
                    ),
                    "{error}"
                );
            }
        }
        let stored = EpochAuthority::new(&b).get("vol").unwrap().unwrap();
        assert_eq!(&stored, won[0]);
        let journal = EpochAuthority::new(&b).journal("vol").unwrap();
        assert_eq!(journal.len(), 3);
        assert_eq!(journal[2].state, stored);

        // Another prefix holds none of it; `all` lists every volume.
        let other = EtcdStore::open(&etcd.url("elsewhere")).unwrap();
        assert!(EpochAuthority::new(&other).all().unwrap().is_empty());
        EpochAuthority::new(&b)
            .adopt("vol2", "c", &names(&["c"]), &names(&["c"]), 0, "new")
            .unwrap();
        let all: Vec<String> = EpochAuthority::new(&a)
            .all()
            .unwrap()
            .into_iter()
            .map(|s| s.volume)
            .collect();
        assert_eq!(all, ["vol", "vol2"]);
    }

    #[test]
    fn the_epoch_journal_keeps_each_volumes_newest_records_and_a_new_leader_builds_on_the_state() {
        let Some((etcd, _dir)) = etcd(23811) else {
            return;
        };
        let a = EtcdStore::open(&etcd.url("trim")).unwrap();
        let abc = names(&["a", "b", "c"]);
        // "vol1" shares "vol"'s first letters: its records must not be in vol's range.
        EpochAuthority::new(&a)
            .adopt("vol1", "a", &abc, &abc, 0, "neighbour")
            .unwrap();
        let mut state = EpochAuthority::new(&a)
            .adopt("vol", "a", &abc, &abc, 0, "first seen")
            .unwrap();
        assert_eq!(state.epoch, 1);
        let changes = JOURNAL_KEPT + 36;
        for n in 0..changes {
            let writer = if n % 2 == 0 { "b" } else { "a" };
            state = EpochAuthority::new(&a)
                .set_writer("vol", state.epoch, writer, &format!("move {n}"))
                .unwrap();
        }
        let newest = 1 + changes;
        assert_eq!(state.epoch, newest);
        let journal = EpochAuthority::new(&a).journal("vol").unwrap();
        let epochs: Vec<u64> = journal.iter().map(|c| c.state.epoch).collect();
        let expected: Vec<u64> = (newest + 1 - JOURNAL_KEPT..=newest).collect();
        assert_eq!(epochs, expected, "the newest {JOURNAL_KEPT} records");
        assert_eq!(journal.last().unwrap().state, state);
        assert_eq!(
            journal.last().unwrap().reason,
            format!("move {}", changes - 1)
        );
        // The neighbour's journal is whole.
        let neighbour = EpochAuthority::new(&a).journal("vol1").unwrap();
        assert_eq!(neighbour.len(), 1);
        // What etcd holds under the prefix: the trimmed records are gone, not hidden.
        let keys = a.range("epoch_journal/vol/", true).unwrap();
        assert_eq!(keys.len() as u64, JOURNAL_KEPT, "{keys:?}");
        // Another replica (a new leader) recovers from the state alone: it sees the
        // newest epoch, a change from an older one is refused, and its own lands.
        let b = EtcdStore::open(&etcd.url("trim")).unwrap();
        assert_eq!(EpochAuthority::new(&b).get("vol").unwrap().unwrap(), state);
        assert!(matches!(
            EpochAuthority::new(&b).set_writer("vol", newest - 1, "c", "stale"),
            Err(EpochError::Conflict { found, .. }) if found == newest
        ));
        let next = EpochAuthority::new(&b)
            .set_writer("vol", newest, "c", "new leader")
            .unwrap();
        assert_eq!(next.epoch, newest + 1);
        let journal = EpochAuthority::new(&b).journal("vol").unwrap();
        assert_eq!(journal.len() as u64, JOURNAL_KEPT);
        assert_eq!(
            journal.first().unwrap().state.epoch,
            newest + 2 - JOURNAL_KEPT
        );
    }
}
