//! The controller's own records: `DATA_DIR/events.redb`, kept open for the
//! controller's life.
//!
//! - `events`: sequence number → one [`Event`] (JSON): syncs, refusals, steps,
//!   drift, nodes, pauses. The newest [`KEEP`] are kept.
//! - `meta`: `applied` → the last commit the controller applied ([`AppliedCommit`]),
//!   `last_sync` → the last sync's summary ([`LastSync`]).
//! - `action_nonces`: nonce → [`NonceRecord`], the challenges of signed actions
//!   (`crate::actions`): issued, then used once; kept here so a restart can
//!   neither forget an outstanding challenge nor accept a used one again.
//!
//! With controller replicas the events are also appended to etcd's shared log
//! ([`EventLog::share_through`], `state_etcd::SharedLog`) and read from it, so every
//! replica shows one history; each event then names the replica that recorded it.
//!
//! Why not a table in the reconciler's `state.redb`: that file is opened and closed
//! for every operation so that `cairn plan`/`status` can read it while an apply
//! runs (redb allows one opener per file); the controller writes an event every
//! few seconds and reads them on every `GET /api/v1/events`, and keeping its own
//! file open for its whole life costs the CLI nothing. Nothing here is needed to
//! run: losing the file loses history, and the next sync re-verifies from the head.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const NONCES: TableDefinition<&str, &[u8]> = TableDefinition::new("action_nonces");

/// How long a used or expired action nonce is remembered after it expires.
const NONCE_KEEP_MS: u64 = 24 * 3600 * 1000;

/// How many events are kept.
pub const KEEP: u64 = 20_000;

/// One event (`GET /api/v1/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number (increasing).
    pub seq: u64,
    /// When, RFC 3339 UTC with milliseconds.
    pub at: String,
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// `sync-started`, `sync`, `step`, `drift`, `vm` (crashed, from a node's watch),
    /// `crash-loop`, `node`, `settled`, `paused`, `resumed`, `source`, `controller`,
    /// `protection` (a snapshot schedule or a replication failed, missed runs, or
    /// works again: `crate::protection_events`).
    pub kind: String,
    /// The commit it is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The plan it is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    /// The object (`vm web-1`, `node lab-2`, a step `start_vm web-1@lab-1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// `started`, `succeeded`, `partial`, `failed`, `refused`, `found`,
    /// `repaired`, `reported`, `skipped`, `unreachable`, `ready`, `held`, `ok`,
    /// `missed`.
    pub result: String,
    /// Why (the root cause, for people).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// More (a sync: author, signer, steps, phase durations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// With controller replicas: the replica that recorded it (its HTTP URL), since
    /// every replica shows one shared history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

impl Event {
    /// An event of `kind` with `result`, now.
    pub fn new(kind: &str, result: &str) -> Event {
        let at_unix_ms = reconciler::state::now_ms();
        Event {
            seq: 0,
            at: rfc3339(at_unix_ms),
            at_unix_ms,
            kind: kind.to_owned(),
            commit: None,
            plan_id: None,
            object: None,
            result: result.to_owned(),
            reason: None,
            detail: None,
            replica: None,
        }
    }

    /// With the commit.
    pub fn commit(mut self, commit: &str) -> Event {
        self.commit = Some(commit.to_owned());
        self
    }

    /// With the plan id.
    pub fn plan(mut self, plan_id: &str) -> Event {
        self.plan_id = Some(plan_id.to_owned());
        self
    }

    /// With the object.
    pub fn object(mut self, object: impl Into<String>) -> Event {
        self.object = Some(object.into());
        self
    }

    /// With the reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Event {
        self.reason = Some(reason.into());
        self
    }

    /// With detail.
    pub fn detail(mut self, detail: serde_json::Value) -> Event {
        self.detail = Some(detail);
        self
    }
}

/// The commit the controller applied last (drift is planned against it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedCommit {
    /// Full commit id.
    pub commit: String,
    /// The plan that applied it.
    pub plan_id: String,
    /// When.
    pub at_unix_ms: u64,
}

/// The last sync (`controller.last_sync` of `/api/v1/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastSync {
    /// The commit synced.
    pub commit: String,
    /// `succeeded`, `partial`, `failed`, `refused`.
    pub result: String,
    /// When it ended, RFC 3339.
    pub at: String,
    /// Its plan (none when it stopped before planning).
    pub plan_id: Option<String>,
    /// Why it did not succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Errors of the event log.
#[derive(Debug, thiserror::Error)]
#[error("controller event log {path}: {message}")]
pub struct EventError {
    path: String,
    message: String,
}

/// `DATA_DIR/events.redb`, open for the controller's life; with controller replicas
/// the events are also etcd's shared log ([`EventLog::share_through`]).
#[derive(Debug)]
pub struct EventLog {
    db: Database,
    path: String,
    shared: std::sync::OnceLock<(state_etcd::SharedLog, String)>,
    /// When the shared log last failed: for [`SHARED_RETRY`] after, events are
    /// written and read locally only (a frozen etcd answers nothing for its call
    /// timeout, which would stall every caller recording an event).
    shared_failed: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long the shared log is left alone after it failed.
const SHARED_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl EventLog {
    /// Opens (creates) the log.
    pub fn open(path: &Path) -> Result<EventLog, EventError> {
        let err = |message: String| EventError {
            path: path.display().to_string(),
            message,
        };
        let db = Database::create(path).map_err(|e| err(e.to_string()))?;
        let log = EventLog {
            db,
            path: path.display().to_string(),
            shared: std::sync::OnceLock::new(),
            shared_failed: std::sync::Mutex::new(None),
        };
        let tx = log.db.begin_write().map_err(|e| log.err(e))?;
        tx.open_table(EVENTS).map_err(|e| log.err(e))?;
        tx.open_table(META).map_err(|e| log.err(e))?;
        tx.open_table(NONCES).map_err(|e| log.err(e))?;
        tx.commit().map_err(|e| log.err(e))?;
        Ok(log)
    }

    fn err(&self, e: impl std::fmt::Display) -> EventError {
        EventError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// With controller replicas: every replica appends its events to `log` (etcd)
    /// and reads the events from it, so `GET /api/v1/events` and the console show
    /// one history whichever replica answers, and a new leader shows its
    /// predecessor's; each event names the replica that recorded it (`me`, its
    /// HTTP URL). The file keeps this replica's own, read when etcd cannot be.
    pub fn share_through(&self, log: state_etcd::SharedLog, me: &str) {
        let _ = self.shared.set((log, me.to_owned()));
    }

    /// The shared log, unless it failed less than [`SHARED_RETRY`] ago.
    fn shared_up(&self) -> Option<&state_etcd::SharedLog> {
        let (log, _) = self.shared.get()?;
        let failed = *self.shared_failed.lock().expect("failed lock");
        failed
            .is_none_or(|at| at.elapsed() >= SHARED_RETRY)
            .then_some(log)
    }

    fn shared_down(&self) {
        *self.shared_failed.lock().expect("failed lock") = Some(std::time::Instant::now());
    }

    /// Appends events (one transaction); returns them with their sequence numbers
    /// (the shared log's with replicas).
    pub fn record_all(&self, events: Vec<Event>) -> Result<Vec<Event>, EventError> {
        if events.is_empty() {
            return Ok(events);
        }
        let Some((_, me)) = self.shared.get() else {
            return self.record_locally(events);
        };
        let events = events
            .into_iter()
            .map(|event| Event {
                replica: Some(me.clone()),
                ..event
            })
            .collect();
        let local = self.record_locally(events)?;
        let Some(shared) = self.shared_up() else {
            return Ok(local);
        };
        // Stored without their number: a record's number is its key's.
        let records: Vec<Vec<u8>> = local
            .iter()
            .map(|event| {
                serde_json::to_vec(&Event {
                    seq: 0,
                    ..event.clone()
                })
                .expect("events serialize")
            })
            .collect();
        match shared.append(&records) {
            Ok(first) => Ok(local
                .into_iter()
                .zip(first..)
                .map(|(event, seq)| Event { seq, ..event })
                .collect()),
            Err(e) => {
                self.shared_down();
                eprintln!(
                    "warning: events not recorded in the shared log ({e}); this replica's file has them (the shared log is tried again in {} s)",
                    SHARED_RETRY.as_secs()
                );
                Ok(local)
            }
        }
    }

    fn record_locally(&self, events: Vec<Event>) -> Result<Vec<Event>, EventError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(events.len());
        {
            let mut table = tx.open_table(EVENTS).map_err(|e| self.err(e))?;
            let mut next = table
                .last()
                .map_err(|e| self.err(e))?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(1);
            for mut event in events {
                event.seq = next;
                next += 1;
                let bytes = serde_json::to_vec(&event).expect("events serialize");
                table
                    .insert(event.seq, bytes.as_slice())
                    .map_err(|e| self.err(e))?;
                out.push(event);
            }
            if table.len().map_err(|e| self.err(e))? > KEEP + 1000 {
                let cut = next.saturating_sub(KEEP);
                table
                    .retain_in(..cut, |_, _| false)
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// The newest `limit` events, newest first; `kind` filters.
    pub fn newest(&self, limit: usize, kind: Option<&str>) -> Result<Vec<Event>, EventError> {
        self.newest_where(usize::MAX, limit, kind, |_| true)
    }

    /// The newest `limit` events of `kind` that `admits`, among the newest `scan`
    /// records: a page of a filtered list reads only as far back as it must.
    pub fn newest_where(
        &self,
        scan: usize,
        limit: usize,
        kind: Option<&str>,
        admits: impl Fn(&Event) -> bool,
    ) -> Result<Vec<Event>, EventError> {
        if let Some(shared) = self.shared_up() {
            let mut out = vec![];
            let read = shared.newest(scan, |seq, bytes| {
                let Ok(event) = serde_json::from_slice::<Event>(bytes) else {
                    return true;
                };
                if kind.is_some_and(|k| k != event.kind) || !admits(&event) {
                    return true;
                }
                out.push(Event { seq, ..event });
                out.len() < limit
            });
            match read {
                Ok(()) => return Ok(out),
                Err(e) => {
                    self.shared_down();
                    eprintln!(
                        "warning: the shared event log cannot be read ({e}); showing this replica's own events"
                    );
                }
            }
        }
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(EVENTS).map_err(|e| self.err(e))?;
        let mut out = vec![];
        for row in table.iter().map_err(|e| self.err(e))?.rev().take(scan) {
            let (_, v) = row.map_err(|e| self.err(e))?;
            let Ok(event) = serde_json::from_slice::<Event>(v.value()) else {
                continue;
            };
            if kind.is_some_and(|k| k != event.kind) || !admits(&event) {
                continue;
            }
            out.push(event);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// A `meta` record.
    pub fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, EventError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(META).map_err(|e| self.err(e))?;
        let Some(v) = table.get(key).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    /// Writes a `meta` record.
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), EventError> {
        let bytes = serde_json::to_vec(value).expect("meta records serialize");
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(META).map_err(|e| self.err(e))?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }
}

/// A challenge nonce of a signed action (`action_nonces`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonceRecord {
    /// When it was issued.
    pub issued_unix_ms: u64,
    /// After this it is refused.
    pub expires_unix_ms: u64,
    /// When it was used (it is refused from then on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_unix_ms: Option<u64>,
    /// Who used it, and for what (`pause by ops@example.com (SHA256:…)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
}

impl EventLog {
    /// Records a new nonce (and forgets those expired for a day).
    pub fn issue_nonce(&self, nonce: &str, record: &NonceRecord) -> Result<(), EventError> {
        let bytes = serde_json::to_vec(record).expect("nonces serialize");
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(NONCES).map_err(|e| self.err(e))?;
            let cut = record.issued_unix_ms.saturating_sub(NONCE_KEEP_MS);
            table
                .retain(|_, v| {
                    serde_json::from_slice::<NonceRecord>(v).is_ok_and(|r| r.expires_unix_ms >= cut)
                })
                .map_err(|e| self.err(e))?;
            table
                .insert(nonce, bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The record of a nonce, if this log issued it.
    pub fn nonce(&self, nonce: &str) -> Result<Option<NonceRecord>, EventError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(NONCES).map_err(|e| self.err(e))?;
        let Some(v) = table.get(nonce).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    /// Marks a nonce used, in one transaction with the check that it was issued
    /// and is unused: `Ok(None)` when this call used it, else what it found
    /// (`Some` of a used record, or `None` inside `Err` when unknown).
    pub fn use_nonce(
        &self,
        nonce: &str,
        now_ms: u64,
        by: &str,
    ) -> Result<Result<(), Option<NonceRecord>>, EventError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let outcome = {
            let mut table = tx.open_table(NONCES).map_err(|e| self.err(e))?;
            let found: Option<NonceRecord> = table
                .get(nonce)
                .map_err(|e| self.err(e))?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            match found {
                Some(r) if r.used_unix_ms.is_none() && r.expires_unix_ms > now_ms => {
                    let used = NonceRecord {
                        used_unix_ms: Some(now_ms),
                        used_by: Some(by.to_owned()),
                        ..r
                    };
                    let bytes = serde_json::to_vec(&used).expect("nonces serialize");
                    table
                        .insert(nonce, bytes.as_slice())
                        .map_err(|e| self.err(e))?;
                    Ok(())
                }
                other => Err(other),
            }
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(outcome)
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of Unix milliseconds.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = (unix_ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's algorithm; the inverse of `policy::sshsig::days_from_civil`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates_and_inverts_days_from_civil() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_000), "2026-12-31T23:59:59.000Z");
        for days in [-1000, 0, 59, 10_956, 20_000, 40_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(policy::sshsig::days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn events_come_back_newest_first_with_increasing_sequence_numbers() {
        let dir =
            std::env::temp_dir().join(format!("cairn-events-{}", reconciler::state::random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = EventLog::open(&dir.join("events.redb")).unwrap();
        log.record_all(vec![Event::new("sync-started", "started").commit("a")])
            .unwrap();
        log.record_all(vec![
            Event::new("step", "succeeded").object("start_vm x@n"),
            Event::new("sync", "succeeded").commit("a").plan("p"),
        ])
        .unwrap();
        let all = log.newest(10, None).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 2, 1]);
        assert_eq!(log.newest(10, Some("step")).unwrap().len(), 1);
        log.put(
            "applied",
            &AppliedCommit {
                commit: "a".into(),
                plan_id: "p".into(),
                at_unix_ms: 1,
            },
        )
        .unwrap();
        let applied: AppliedCommit = log.get("applied").unwrap().unwrap();
        assert_eq!(applied.commit, "a");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn with_replicas_every_replica_shows_the_same_events_from_etcd() {
        if let Err(why) = state_etcd::testing::binary() {
            eprintln!("skipped: {why}");
            return;
        }
        let dir =
            std::env::temp_dir().join(format!("cairn-events-{}", reconciler::state::random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let etcd = state_etcd::testing::Etcd::start("127.0.0.35", 23809, &dir).expect("etcd");
        let replica = |name: &str| {
            let log = EventLog::open(&dir.join(format!("{name}.redb"))).unwrap();
            let store = state_etcd::EtcdStore::open(&etcd.url("ev")).unwrap();
            log.share_through(
                state_etcd::SharedLog::new(&store, "events", KEEP),
                &format!("http://{name}"),
            );
            log
        };
        let (a, b) = (replica("a"), replica("b"));
        // a leads and syncs; b, a follower, shows what a did.
        let recorded = a
            .record_all(vec![
                Event::new("sync-started", "started").commit("c1"),
                Event::new("sync", "succeeded").commit("c1").plan("p1"),
            ])
            .unwrap();
        assert_eq!(recorded.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        let seen = b.newest(10, None).unwrap();
        assert_eq!(seen, recorded.iter().rev().cloned().collect::<Vec<_>>());
        // a dies; b leads and records: one history, numbered on, on both.
        b.record_all(vec![Event::new("drift", "repaired").object("vm web-1")])
            .unwrap();
        let c = replica("c");
        for log in [&a, &b, &c] {
            let all = log.newest(10, None).unwrap();
            assert_eq!(
                all.iter().map(|e| e.replica.as_deref()).collect::<Vec<_>>(),
                [Some("http://b"), Some("http://a"), Some("http://a")],
                "each event names the replica that recorded it"
            );
            assert_eq!(
                all.iter()
                    .map(|e| (e.seq, e.kind.as_str()))
                    .collect::<Vec<_>>(),
                [(3, "drift"), (2, "sync"), (1, "sync-started")]
            );
            assert_eq!(
                log.newest(10, Some("sync")).unwrap()[0].plan_id.as_deref(),
                Some("p1")
            );
            assert_eq!(log.newest(1, None).unwrap().len(), 1);
        }
        // Each file still holds only its own replica's.
        let own = |log: &EventLog| {
            let table = log.db.begin_read().unwrap();
            table.open_table(EVENTS).unwrap().len().unwrap()
        };
        assert_eq!((own(&a), own(&b), own(&c)), (2, 1, 0));
        // etcd gone: a replica shows its own events rather than nothing.
        drop(etcd);
        let fallback = a.newest(10, None).unwrap();
        assert_eq!(fallback.len(), 2);
        // Left alone for a while after it failed: recorded and read locally.
        assert!(a.shared_up().is_none());
        let local = a
            .record_all(vec![Event::new("node", "unreachable")])
            .unwrap();
        assert_eq!(local[0].seq, 3, "this replica's own numbering");
        assert_eq!(local[0].replica.as_deref(), Some("http://a"));
        assert_eq!(a.newest(10, None).unwrap().len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
